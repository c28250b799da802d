"""What every command group shares: one way to report a bad argument or a failure, and the checks
that let a command refuse a bad output folder before it starts any work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

err_console = Console(stderr=True)


class ShortUsageErrors(TyperGroup):
    """The top-level ``echofleet`` group. Help stays Typer's rich help; a usage error (unknown
    option, missing or malformed value) is printed the way Click prints it, in 4 short lines
    ("Usage: ...", "Try ... --help", "Error: ..."), instead of Typer's panel, which wraps a long
    message over many lines. (``rich_markup_mode=None`` would do the same but also turns every help
    page into plain text that shows Typer's escaped ``\\[required]`` markers.)"""

    def main(self, *args, **kwargs):  # Click's own main: the same flow as Typer's, plain error display
        return click.Group.main(self, *args, **kwargs)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # as under Typer's main: Ctrl-C ends quietly with exit code 130
            raise click.exceptions.Exit(130) from None


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: MESSAGE`` on one line (stderr) and return the ``typer.Exit`` to raise.

    Code 2 is for bad arguments (the user can fix the command line), 1 for failures of the work.
    The message is printed as is (a ``[section]`` in it is text, not rich markup)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def unwritable_folder(folder: Path) -> Optional[str]:
    """Why ``folder`` cannot be created or written into, or None when it can.

    A folder that does not exist yet is judged by its nearest existing parent (it gets created)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return f"{folder} exists and is not a folder"
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None
