"""CLI: ``echofleet edge agent`` — keep a scanner on the registry's current release.

Registered by :mod:`echofleet.cli.edge` as ``edge_app.command("agent")(agent)``. Imports grpc and the
agent inside the command (``echofleet --help`` stays fast; no torch is ever imported).

Exit codes with ``--once``: 0 healthy (installed, up to date, or nothing published yet),
1 unhealthy (a release was refused or failed its self-test and was rolled back),
2 the registry could not be reached or refused the agent (bad token, wrong class).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

DEVICE_TOKEN_ENV = "ECHOFLEET_DEVICE_TOKEN"

console = Console()


def _read_token(token: Optional[str], token_file: Optional[Path]) -> str:
    if token:
        return token.strip()
    if token_file is not None:
        try:
            return token_file.read_text().strip()
        except OSError as e:
            console.print(f"[bold red]error:[/] {token_file}: cannot read token ({e.strerror})")
            raise typer.Exit(2) from None
    console.print(f"[bold red]error:[/] no device token: set {DEVICE_TOKEN_ENV}, or pass --token-file / --token")
    raise typer.Exit(2)


def agent(
    registry: str = typer.Option(..., "--registry", "-r", envvar="ECHOFLEET_REGISTRY", help="Registry address host:port."),
    device_class: str = typer.Option(..., "--device-class", "-c", help="This scanner's class (as enrolled)."),
    pubkey: Path = typer.Option(..., "--pubkey", exists=True, dir_okay=False,
                                help="Pinned release-signing public key (Ed25519 PEM): only bundles it signed are installed."),
    device_dir: Path = typer.Option(..., "--dir", help="Device folder: DIR/current is what applications load."),
    token: Optional[str] = typer.Option(None, "--token", envvar=DEVICE_TOKEN_ENV, show_envvar=True,
                                        help="Device token from `registry devices add` (prefer the environment variable)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Read the device token from this file."),
    ca: Optional[Path] = typer.Option(None, "--ca", exists=True, dir_okay=False,
                                      help="Registry CA certificate to pin (TLS); default: system roots."),
    insecure: bool = typer.Option(False, "--insecure", help="Plaintext gRPC (loopback testing only)."),
    server_name: Optional[str] = typer.Option(None, "--server-name", help="TLS name to verify if it differs from the host."),
    channel: str = typer.Option("stable", "--channel", help="stable (default) or canary."),
    once: bool = typer.Option(False, "--once", help="One poll (with retries), then exit with a health exit code."),
    interval: float = typer.Option(60.0, "--interval", help="Seconds between polls (±10 % jitter)."),
    backoff_max: float = typer.Option(60.0, "--backoff-max", help="Longest wait between retries while the registry is down."),
    retries: int = typer.Option(5, "--retries", help="With --once: attempts before giving up on an unreachable registry."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every step."),
) -> None:
    """Poll the registry; download, verify (pinned key), install atomically, self-test, roll back on failure, report.

    Survives registry downtime (exponential backoff with jitter) and resumes partial downloads.
    """
    import logging
    import signal

    from edge.device.agent import Agent, AgentConfig, AgentError, CycleResult
    from echocare.bundle import BundleError
    from server.registry.client import RegistryError

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if channel not in ("canary", "stable"):
        console.print(f"[bold red]error:[/] --channel {channel!r}: expected stable or canary")
        raise typer.Exit(2)
    cfg = AgentConfig(
        registry=registry, device_class=device_class, pubkey=pubkey, dir=device_dir,
        token=_read_token(token, token_file), ca=ca, insecure=insecure, server_name=server_name,
        channel=channel, interval_s=interval, backoff_max_s=backoff_max,
    )
    try:
        runner = Agent(cfg)
    except (AgentError, BundleError, RegistryError) as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None

    colors = {"healthy": "green", "unhealthy": "red", "unknown": "yellow"}

    def show(outcome: CycleResult | RegistryError) -> None:
        if isinstance(outcome, RegistryError):
            console.print(f"[yellow]registry: {outcome.code.name}: {outcome.details}[/]")
        else:
            console.print(f"[{colors[outcome.health]}]{outcome.action}[/] running={outcome.running_version or '-'} "
                          f"target={outcome.target_version or '-'}: {outcome.message}")

    with runner:
        if once:
            try:
                result = runner.run_once_with_retries(max_attempts=retries)
            except RegistryError as e:
                console.print(f"[bold red]error:[/] {e}")
                raise typer.Exit(2) from None
            table = Table(title=f"edge agent ({device_class}, {channel})", show_header=False)
            table.add_row("action", result.action)
            table.add_row("running", result.running_version or "-")
            table.add_row("target", result.target_version or "-")
            table.add_row("health", f"[{colors[result.health]}]{result.health}[/]")
            table.add_row("resumed from", f"{result.resumed_from:,} B" if result.resumed_from else "-")
            table.add_row("reported", "yes" if result.reported else "[yellow]no (registry unreachable)[/]")
            table.add_row("message", result.message)
            console.print(table)
            raise typer.Exit(1 if result.health == "unhealthy" else 0)

        signal.signal(signal.SIGTERM, lambda *_: runner.stop())
        signal.signal(signal.SIGINT, lambda *_: runner.stop())
        console.print(f"agent: {device_class}/{channel} from {registry}, every {interval:g}s; Ctrl-C to stop")
        runner.run_forever(on_cycle=show)
