"""CLI: ``echofleet edge agent`` — keep a scanner on the registry's current release.

Registered by :mod:`echofleet.cli.edge` as ``edge_app.command("agent")(agent)``. Imports grpc and the
agent inside the command (``echofleet --help`` stays fast; no torch is ever imported).

Exit codes with ``--once``: 0 healthy (installed, up to date, or nothing published yet),
1 unhealthy (a release was refused or failed its self-test and was rolled back),
2 the registry could not be reached or refused the agent (bad token, wrong class), or a bad
argument (checked before anything starts; one ``error: ...`` line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from echofleet.cli.common import fail

DEVICE_TOKEN_ENV = "ECHOFLEET_DEVICE_TOKEN"

console = Console()


def _read_token(token: Optional[str], token_file: Optional[Path]) -> str:
    if token:
        return token.strip()
    if token_file is not None:
        try:
            text = token_file.read_text().strip()
        except OSError as e:
            raise fail(f"{token_file}: cannot read token ({e.strerror})", 2) from None
        if not text:
            raise fail(f"{token_file}: the token file is empty", 2)
        return text
    raise fail(f"no device token: set {DEVICE_TOKEN_ENV}, or pass --token-file / --token", 2)


def _file(path: Optional[Path], what: str) -> None:
    if path is None:
        return
    if not path.exists():
        raise fail(f"{path}: no such {what}", 2)
    if not path.is_file():
        raise fail(f"{path}: the {what} must be a file, not a directory", 2)


def agent(
    registry: str = typer.Option(..., "--registry", "-r", envvar="ECHOFLEET_REGISTRY", help="Registry address host:port."),
    device_class: str = typer.Option(..., "--device-class", "-c", help="This scanner's class (as enrolled)."),
    pubkey: Path = typer.Option(..., "--pubkey",
                                help="Pinned release-signing public key (Ed25519 PEM): only bundles it signed are installed."),
    device_dir: Path = typer.Option(..., "--dir", help="Device folder: DIR/current is what applications load."),
    token: Optional[str] = typer.Option(None, "--token", envvar=DEVICE_TOKEN_ENV, show_envvar=True,
                                        help="Device token from `registry devices add` (prefer the environment variable)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Read the device token from this file."),
    ca: Optional[Path] = typer.Option(None, "--ca",
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
    _file(pubkey, "public key")
    _file(ca, "CA certificate")
    if channel not in ("canary", "stable"):
        raise fail(f"--channel {channel!r}: expected stable or canary", 2)
    if not registry.strip() or ":" not in registry:
        raise fail(f"--registry {registry!r}: expected host:port", 2)
    if device_dir.exists() and not device_dir.is_dir():
        raise fail(f"{device_dir}: the device folder (--dir) is a file", 2)
    for value, option, low in ((interval, "--interval", 0.0), (backoff_max, "--backoff-max", 0.0)):
        if not value > low:
            raise fail(f"{option} {value:g}: must be more than {low:g} seconds", 2)
    if retries < 1:
        raise fail(f"--retries {retries}: must be at least 1", 2)
    device_token = _read_token(token, token_file)

    import logging
    import signal

    from echocare.bundle import BundleError
    from edge.device.agent import Agent, AgentConfig, AgentError, CycleResult
    from server.registry.client import RegistryError

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = AgentConfig(
            registry=registry, device_class=device_class, pubkey=pubkey, dir=device_dir,
            token=device_token, ca=ca, insecure=insecure, server_name=server_name,
            channel=channel, interval_s=interval, backoff_max_s=backoff_max,
        )
    except ValueError as e:
        raise fail(f"--device-class/--channel: {e}", 2) from None
    try:
        runner = Agent(cfg)
    except (AgentError, BundleError, RegistryError) as e:
        raise fail(str(e), 2) from None
    except OSError as e:
        raise fail(f"{device_dir}: cannot use the device folder ({e})", 2) from None

    colors = {"healthy": "green", "unhealthy": "red", "unknown": "yellow"}

    def show(outcome: CycleResult | RegistryError | OSError | AgentError) -> None:
        if isinstance(outcome, RegistryError):
            console.print(f"[yellow]registry: {outcome.code.name}: {outcome.details}[/]")
        elif isinstance(outcome, (OSError, AgentError)):  # the device's own failure (full disk...): retried
            console.print(f"[red]device: {type(outcome).__name__}: {outcome}[/]")
        else:
            console.print(f"[{colors[outcome.health]}]{outcome.action}[/] running={outcome.running_version or '-'} "
                          f"target={outcome.target_version or '-'}: {outcome.message}")

    with runner:
        if once:
            try:
                result = runner.run_once_with_retries(max_attempts=retries)
            except (RegistryError, AgentError) as e:
                raise fail(str(e), 2) from None
            except OSError as e:  # e.g. a full disk: one line naming the file, not a traceback
                raise fail(f"{device_dir}: {e}", 2) from None
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
