"""CLI: ``echofleet registry ...`` — the edge release registry.

Heavy imports (grpc, cryptography) happen inside the commands so ``echofleet --help`` stays fast.

Secrets are never required on the command line: the admin token is read from
``ECHOFLEET_REGISTRY_ADMIN_TOKEN`` when ``--admin-token`` is not given.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from echofleet.cli.common import fail as _fail

ADMIN_TOKEN_ENV = "ECHOFLEET_REGISTRY_ADMIN_TOKEN"
REGISTRY_ENV = "ECHOFLEET_REGISTRY"

console = Console()

registry_app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Edge release registry (gRPC). The coordinator runs `serve`; release managers `publish` signed "
        "bundles (to canary) and `promote` them (to stable); IT enrols scanners with `devices add` and "
        "watches them with `devices list`. Scanners run `echofleet edge agent`."
    ),
)
devices_app = typer.Typer(no_args_is_help=True, help="Enrol, list and remove scanners (admin token).")
registry_app.add_typer(devices_app, name="devices")


def _when(ts: float | None) -> str:
    if not ts:
        return "never"
    return dt.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    s = max(0, int(now - ts))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


# ------------------------------------------------------------------------------------- options
RegistryOpt = typer.Option(..., "--registry", "-r", envvar=REGISTRY_ENV, help="Registry address host:port.")
CaOpt = typer.Option(None, "--ca", help="CA certificate (PEM) to pin for TLS; default: system roots.")
InsecureOpt = typer.Option(False, "--insecure", help="Plaintext gRPC (loopback testing only; tokens travel in clear).")
ServerNameOpt = typer.Option(None, "--server-name", help="TLS name to verify when it differs from the host dialled.")
AdminTokenOpt = typer.Option(
    None, "--admin-token", envvar=ADMIN_TOKEN_ENV, show_envvar=True,
    help="Admin token (prefer the environment variable: command lines are visible to other users).",
)


def _admin_client(registry: str, admin_token: Optional[str], ca: Optional[Path], insecure: bool,
                  server_name: Optional[str]):
    from server.registry.client import ConnectionConfig, RegistryClient, RegistryError

    if not admin_token:
        raise _fail(f"no admin token: pass --admin-token or set {ADMIN_TOKEN_ENV}", 2)
    try:
        return RegistryClient(ConnectionConfig(registry, admin_token, ca=ca, insecure=insecure, server_name=server_name))
    except RegistryError as e:
        raise _fail(e.details, 2) from None


def _registry_call(fn):
    """Run ``fn()``; a RegistryError becomes a red one-line error and exit code 1."""
    from server.registry.client import RegistryError

    try:
        return fn()
    except RegistryError as e:
        raise _fail(f"{e.code.name}: {e.details}") from None


# ------------------------------------------------------------------------------------- registry
@registry_app.command("serve")
def serve(
    db: Path = typer.Option(Path("registry/registry.db"), "--db", help="SQLite state file (WAL)."),
    blobs: Path = typer.Option(Path("registry/blobs"), "--blobs", help="Content-addressed bundle storage."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 for all; loopback by default)."),
    port: int = typer.Option(50071, "--port", help="TCP port (0: any free port)."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="Server certificate (echofleet certs server)."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="Server private key."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve plaintext (loopback testing only)."),
    trusted_key: list[Path] = typer.Option(
        ..., "--trusted-key", help="Release-signing public key(s) (Ed25519 PEM) accepted at publish; repeatable."
    ),
    admin_token: Optional[str] = typer.Option(
        None, "--admin-token", envvar=ADMIN_TOKEN_ENV, show_envvar=True,
        help="Admin token for publish/promote/devices (>= 16 chars; prefer the environment variable).",
    ),
    max_bundle_mb: float = typer.Option(512.0, "--max-bundle-mb", help="Largest bundle tarball accepted at publish."),
    workers: int = typer.Option(64, "--workers", help="Concurrent RPCs served (thread pool size)."),
) -> None:
    """Run the registry until Ctrl-C / SIGTERM. TLS unless --insecure."""
    import logging
    import signal
    import threading

    from server.registry.service import RegistryConfig, RegistryServer

    if not insecure and (tls_cert is None or tls_key is None):
        raise _fail("give --tls-cert and --tls-key (echofleet certs server ...), or --insecure for loopback tests", 2)
    if insecure and host not in ("127.0.0.1", "::1", "localhost"):
        raise _fail("--insecure is only allowed on a loopback --host", 2)
    if not admin_token:
        raise _fail(f"no admin token: pass --admin-token or set {ADMIN_TOKEN_ENV}", 2)
    for p in [*trusted_key, *([tls_cert, tls_key] if not insecure else [])]:
        if p is not None and not Path(p).is_file():
            raise _fail(f"{p}: no such file", 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = RegistryConfig(
            db=db, blobs=blobs, trusted_keys=list(trusted_key), admin_token=admin_token, host=host, port=port,
            tls_cert=None if insecure else tls_cert, tls_key=None if insecure else tls_key,
            max_bundle_bytes=int(max_bundle_mb * 1024 * 1024), max_workers=workers,
        )
        server = RegistryServer(cfg)
    except (ValueError, OSError) as e:
        raise _fail(str(e), 2) from None
    server.start()
    table = Table(title="echofleet registry", show_header=False)
    table.add_row("address", server.address)
    table.add_row("transport", "TLS" if server.tls else "[yellow]plaintext (--insecure)[/]")
    table.add_row("database", str(db))
    table.add_row("blobs", str(blobs))
    table.add_row("trusted keys", ", ".join(str(k) for k in trusted_key))
    table.add_row("max bundle", f"{max_bundle_mb:g} MiB")
    table.add_row("device classes", ", ".join(server.store.list_classes()) or "(none yet)")
    console.print(table)
    done = threading.Event()

    def _stop(signum, frame):  # noqa: ARG001
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    done.wait()
    console.print("stopping registry ...")
    server.stop(grace=5.0)


@registry_app.command("publish")
def publish(
    bundle: Path = typer.Argument(..., exists=True, dir_okay=False, help="Signed bundle tarball (.tar.gz)."),
    registry: str = RegistryOpt,
    device_class: str = typer.Option(
        "", "--device-class", "-c", help="Target class; only needed when the manifest has no `device_class`."
    ),
    channel: str = typer.Option("canary", "--channel", help="canary (default) or stable."),
    admin_token: Optional[str] = AdminTokenOpt,
    ca: Optional[Path] = CaOpt,
    insecure: bool = InsecureOpt,
    server_name: Optional[str] = ServerNameOpt,
) -> None:
    """Upload a signed bundle; the registry checks its signature before storing it."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    if channel not in ("canary", "stable"):
        raise _fail(f"--channel {channel!r}: expected canary or stable", 2)
    with _admin_client(registry, admin_token, ca, insecure, server_name) as client:
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), console=console, transient=True) as progress:
            task = progress.add_task(f"uploading {bundle.name}", total=bundle.stat().st_size)
            reply = _registry_call(lambda: client.publish(
                bundle, device_class=device_class, channel=channel,
                on_progress=lambda n: progress.advance(task, n),
            ))
    r = reply.release
    table = Table(title="published" if not reply.already_present else "already published (identical)")
    for col in ("device class", "version", "channel", "size", "sha256"):
        table.add_column(col)
    table.add_row(r.device_class, r.version, "stable" if r.promoted_at else "canary", f"{r.size:,} B", r.sha256[:16] + "...")
    console.print(table)


@registry_app.command("promote")
def promote(
    device_class: str = typer.Option(..., "--device-class", "-c", help="Device class."),
    version: str = typer.Option(..., "--version", "-v", help="Published version to put on stable (again)."),
    registry: str = RegistryOpt,
    admin_token: Optional[str] = AdminTokenOpt,
    ca: Optional[Path] = CaOpt,
    insecure: bool = InsecureOpt,
    server_name: Optional[str] = ServerNameOpt,
) -> None:
    """Make a release the current stable one. Promoting an older release rolls the fleet back to it."""
    with _admin_client(registry, admin_token, ca, insecure, server_name) as client:
        r = _registry_call(lambda: client.promote(device_class, version))
    console.print(f"[green]{r.device_class} {r.version} is now the current stable release[/]")


@registry_app.command("list")
def list_releases(
    device_class: str = typer.Option(..., "--device-class", "-c", help="Device class."),
    channel: str = typer.Option("stable", "--channel", help="canary or stable."),
    registry: str = RegistryOpt,
    admin_token: Optional[str] = AdminTokenOpt,
    ca: Optional[Path] = CaOpt,
    insecure: bool = InsecureOpt,
    server_name: Optional[str] = ServerNameOpt,
) -> None:
    """Releases of a device class on a channel, newest first (the first is current)."""
    import json

    if channel not in ("canary", "stable"):
        raise _fail(f"--channel {channel!r}: expected canary or stable", 2)
    with _admin_client(registry, admin_token, ca, insecure, server_name) as client:
        releases = _registry_call(lambda: client.list_releases(device_class, channel))
    table = Table(title=f"{device_class} / {channel}")
    for col in ("", "version", "name", "task", "size", "published", "promoted", "sha256"):
        table.add_column(col)
    for r in releases:
        m = json.loads(r.manifest_json)
        table.add_row("*" if r.current else "", r.version, str(m.get("name", "")), str(m.get("task", "")),
                      f"{r.size:,} B", _when(r.published_at), _when(r.promoted_at), r.sha256[:12])
    console.print(table if releases else f"no releases on {channel} for {device_class}")


@devices_app.command("add")
def devices_add(
    device_id: str = typer.Argument(..., help="Device id (letters, digits, '_' or '-'), e.g. the scanner's asset tag."),
    device_class: str = typer.Option(..., "--device-class", "-c", help="Which releases it runs, e.g. cart-x86."),
    registry: str = RegistryOpt,
    admin_token: Optional[str] = AdminTokenOpt,
    ca: Optional[Path] = CaOpt,
    insecure: bool = InsecureOpt,
    server_name: Optional[str] = ServerNameOpt,
    token_file: Optional[Path] = typer.Option(
        None, "--token-file", help="Also write the token to this file (mode 0600) instead of only printing it."
    ),
) -> None:
    """Enrol a scanner. Prints its token ONCE: the registry keeps only a hash."""
    import os

    with _admin_client(registry, admin_token, ca, insecure, server_name) as client:
        device, token = _registry_call(lambda: client.enroll_device(device_id, device_class))
    if token_file is not None:
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        console.print(f"token written to {token_file}")
    console.print(f"[green]enrolled {device.device_id} ({device.device_class})[/]")
    console.print("device token (shown once; give it to the scanner as ECHOFLEET_DEVICE_TOKEN):")
    print(token)


@devices_app.command("list")
def devices_list(
    registry: str = RegistryOpt,
    device_class: str = typer.Option("", "--device-class", "-c", help="Only this class."),
    admin_token: Optional[str] = AdminTokenOpt,
    ca: Optional[Path] = CaOpt,
    insecure: bool = InsecureOpt,
    server_name: Optional[str] = ServerNameOpt,
) -> None:
    """Enrolled scanners: class, running version, health, last seen."""
    import time

    from server.registry.client import CHANNEL_NAMES, HEALTH_NAMES

    with _admin_client(registry, admin_token, ca, insecure, server_name) as client:
        devices = _registry_call(lambda: client.list_devices(device_class))
    now = time.time()
    table = Table(title=f"{len(devices)} device(s)")
    for col in ("id", "class", "channel", "version", "health", "last seen", "message"):
        table.add_column(col)
    colors = {"healthy": "green", "unhealthy": "red", "unknown": "yellow"}
    for d in devices:
        health = HEALTH_NAMES.get(d.health, "unknown")
        table.add_row(d.device_id, d.device_class, CHANNEL_NAMES.get(d.channel, ""), d.running_version or "-",
                      f"[{colors[health]}]{health}[/]", _ago(d.last_seen, now), d.message[:80])
    console.print(table)


@devices_app.command("remove")
def devices_remove(
    device_id: str = typer.Argument(..., help="Device id to revoke."),
    registry: str = RegistryOpt,
    admin_token: Optional[str] = AdminTokenOpt,
    ca: Optional[Path] = CaOpt,
    insecure: bool = InsecureOpt,
    server_name: Optional[str] = ServerNameOpt,
) -> None:
    """Revoke a scanner's token (a lost or retired device)."""
    with _admin_client(registry, admin_token, ca, insecure, server_name) as client:
        _registry_call(lambda: client.remove_device(device_id))
    console.print(f"[green]removed {device_id}; its token no longer works[/]")
