"""What every command group shares: one way to report a bad argument or a failure."""

from __future__ import annotations

import typer
from rich.console import Console

err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: MESSAGE`` on one line (stderr) and return the ``typer.Exit`` to raise.

    Code 2 is for bad arguments (the user can fix the command line), 1 for failures of the work."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(code)
