"""CLI: ``echofleet registry ...`` — the edge release registry.

Heavy imports (grpc, cryptography) happen inside the commands so ``echofleet --help`` stays fast.

Secrets are never required on the command line: the admin token is read from
``ECHOFLEET_REGISTRY_ADMIN_TOKEN`` when ``--admin-token`` is not given.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from echofleet.cli.common import fail as _fail

ADMIN_TOKEN_ENV = "ECHOFLEET_REGISTRY_ADMIN_TOKEN"
REGISTRY_ENV = "ECHOFLEET_REGISTRY"

console = Console()

registry_app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Edge release registry (gRPC). The coordinator runs `serve`; release managers `publish` signed "
        "bundles (to canary) and `promote` them (to stable: only a release whose signed acceptance record "
        "passed, or with --force --reason, written to the audit log that `audit` prints); IT enrols scanners "
        "with `devices add` and watches them with `devices list`. Scanners run `echofleet edge agent`."
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


# ------------------------------------------------------------------------------------- connection
# The five options every admin command takes, defined once: `@connection_options` adds them to a
# command's command line (after the sub-command, as before: `echofleet registry list -c cart
# --registry host:port --ca ca.crt`), checks them before the command runs, and hands the command
# one `RegistryConnection` as its `conn` parameter.


@dataclass(frozen=True)
class RegistryConnection:
    """Where the registry is, how to reach it, and the admin token to present."""

    address: str
    admin_token: Optional[str] = None
    ca: Optional[Path] = None
    insecure: bool = False
    server_name: Optional[str] = None

    def check(self) -> None:
        """Raise a one-line exit-2 error for a bad address, a missing token or an unreadable CA file."""
        problem = address_problem(self.address)
        if problem:
            raise _fail(f"--registry {self.address!r} (or {REGISTRY_ENV}): {problem}", 2)
        if not self.admin_token:
            raise _fail(f"no admin token: pass --admin-token or set {ADMIN_TOKEN_ENV}", 2)
        if self.ca is not None and not Path(self.ca).is_file():
            raise _fail(f"--ca {self.ca}: no such file (the CA certificate, e.g. ca/ca.crt from `echofleet certs init`)", 2)

    def client(self):
        """An admin :class:`server.registry.client.RegistryClient` (a context manager)."""
        from server.registry.client import ConnectionConfig, RegistryClient, RegistryError

        try:
            return RegistryClient(ConnectionConfig(self.address, self.admin_token or "", ca=self.ca,
                                                   insecure=self.insecure, server_name=self.server_name))
        except RegistryError as e:
            raise _fail(e.details, 2) from None


def address_problem(address: str) -> Optional[str]:
    """Why ``address`` is not ``HOST:PORT`` (``[IPv6]:PORT`` too), or None when it is."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host:
        return "expected HOST:PORT, e.g. registry.hospital.example:50071"
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            return "expected [IPV6]:PORT for an IPv6 address"
    elif not all(c.isalnum() or c in ".-_" for c in host):
        return f"host {host!r} is not a DNS name or an IPv4 address (no scheme, path or spaces)"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"port {port!r} is not a number from 1 to 65535"
    return None


_CONNECTION_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=option)
    for name, annotation, option in [
        ("registry", str, typer.Option(..., "--registry", "-r", envvar=REGISTRY_ENV, show_envvar=True,
                                       help="Registry address host:port.")),
        ("admin_token", Optional[str], typer.Option(
            None, "--admin-token", envvar=ADMIN_TOKEN_ENV, show_envvar=True,
            help="Admin token (prefer the environment variable: command lines are visible to other users).")),
        ("ca", Optional[Path], typer.Option(None, "--ca", help="CA certificate (PEM) to pin for TLS; default: system roots.")),
        ("insecure", bool, typer.Option(False, "--insecure",
                                        help="Plaintext gRPC (loopback testing only; tokens travel in clear).")),
        ("server_name", Optional[str], typer.Option(
            None, "--server-name", help="TLS name to verify when it differs from the host dialled.")),
    ]
]


def connection_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` (which takes ``conn: RegistryConnection``) the five connection options.

    Typer builds a command line from the function's signature, so the wrapper shows Typer the
    command's own parameters plus the five options, and calls the command with one
    ``RegistryConnection`` in their place, checked first."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "conn"]

    @functools.wraps(command)
    def with_connection(*args, registry: str, admin_token: Optional[str], ca: Optional[Path], insecure: bool,
                        server_name: Optional[str], **kwargs) -> None:
        conn = RegistryConnection(registry, admin_token, ca, insecure, server_name)
        conn.check()
        command(*args, conn=conn, **kwargs)

    with_connection.__signature__ = inspect.Signature([*own, *_CONNECTION_OPTIONS])  # type: ignore[attr-defined]
    return with_connection


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
    audit_log: Optional[Path] = typer.Option(None, "--audit-log", help="Append-only audit log of promotions (JSON lines; default: audit.jsonl beside --db)."),
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
    if not 0 <= port <= 65535:
        raise _fail(f"--port {port}: expected 0 (any free port) to 65535", 2)
    if workers < 1 or max_bundle_mb <= 0:
        raise _fail("--workers must be >= 1 and --max-bundle-mb > 0", 2)
    for p in [*trusted_key, *([tls_cert, tls_key] if not insecure else [])]:
        if p is not None and not Path(p).is_file():
            raise _fail(f"{p}: no such file", 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = RegistryConfig(
            db=db, blobs=blobs, trusted_keys=list(trusted_key), admin_token=admin_token, audit_log=audit_log,
            host=host, port=port,
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
    table.add_row("audit log", str(server.store.audit.path))
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
@connection_options
def publish(
    conn: RegistryConnection,
    bundle: Path = typer.Argument(..., exists=True, dir_okay=False, help="Signed bundle tarball (.tar.gz)."),
    device_class: str = typer.Option(
        "", "--device-class", "-c", help="Target class; only needed when the manifest has no `device_class`."
    ),
    channel: str = typer.Option("canary", "--channel", help="canary (default) or stable (only with a passing signed acceptance record)."),
) -> None:
    """Upload a signed bundle; the registry checks its signature before storing it."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    if channel not in ("canary", "stable"):
        raise _fail(f"--channel {channel!r}: expected canary or stable", 2)
    with conn.client() as client:
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
@connection_options
def promote(
    conn: RegistryConnection,
    device_class: str = typer.Option(..., "--device-class", "-c", help="Device class."),
    version: str = typer.Option(..., "--version", "-v", help="Published version to put on stable (again)."),
    force: bool = typer.Option(False, "--force", help="Override a missing or failing acceptance record (needs --reason; audited)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why the override is justified (written to the audit log)."),
) -> None:
    """Make a release the current stable one. Promoting an older release rolls the fleet back to it.

    Only a release whose signed manifest carries a passing acceptance record is promoted; --force
    --reason TEXT overrides that, and the override is written to the registry's audit log."""
    if force and not (reason or "").strip():
        raise _fail("--force needs --reason TEXT: an override of the acceptance gate must say why (it is audited)", 2)
    if reason is not None and not force:
        raise _fail("--reason goes with --force (a release that passed its acceptance needs no override)", 2)
    with conn.client() as client:
        r, event = _registry_call(lambda: client.promote_audited(device_class, version, force=force, reason=reason or ""))
    if event.event == "promote-forced":
        console.print(f"[yellow]FORCED: {r.device_class} {r.version} is now the current stable release without a "
                      f"passing acceptance ({escape(event.acceptance)}); recorded in the audit log[/]")
    else:
        console.print(f"[green]{r.device_class} {r.version} is now the current stable release ({escape(event.acceptance)})[/]")


@registry_app.command("audit")
@connection_options
def audit(
    conn: RegistryConnection,
    device_class: str = typer.Option("", "--device-class", "-c", help="Only this class."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line (as stored)."),
) -> None:
    """The audit log: every promotion to stable, every forced override with its reason, every refusal."""
    import json

    with conn.client() as client:
        events, unreadable = _registry_call(lambda: client.audit(device_class))
    fields = ("at", "event", "device_class", "version", "sha256", "reason", "acceptance", "actor")
    if as_json:
        for e in events:
            print(json.dumps({k: getattr(e, k) for k in fields}, sort_keys=True))
    else:
        table = Table(title=f"audit log: {len(events)} event(s)")
        for col in ("when", "event", "class", "version", "sha256", "acceptance", "reason", "actor"):
            table.add_column(col, overflow="fold", no_wrap=col in ("when", "event", "version"))
        colors = {"promote": "green", "promote-forced": "yellow", "promote-refused": "red"}
        for e in events:
            table.add_row(_when(e.at), f"[{colors.get(e.event, 'white')}]{e.event}[/]", e.device_class, e.version,
                          e.sha256[:12], escape(e.acceptance), escape(e.reason or "-"), escape(e.actor))
        console.print(table)
    if unreadable:
        _fail(f"audit log: line(s) {', '.join(map(str, unreadable))} could not be read (torn by a crash, or edited)")
        raise typer.Exit(1)


@registry_app.command("list")
@connection_options
def list_releases(
    conn: RegistryConnection,
    device_class: str = typer.Option(..., "--device-class", "-c", help="Device class."),
    channel: str = typer.Option("stable", "--channel", help="canary or stable."),
) -> None:
    """Releases of a device class on a channel, newest first (the first is current)."""
    import json

    if channel not in ("canary", "stable"):
        raise _fail(f"--channel {channel!r}: expected canary or stable", 2)
    with conn.client() as client:
        releases = _registry_call(lambda: client.list_releases(device_class, channel))
    from server.registry.store import acceptance_verdict

    table = Table(title=f"{device_class} / {channel}")
    for col in ("", "version", "name", "task", "acceptance", "size", "published", "promoted", "sha256"):
        table.add_column(col)
    for r in releases:
        m = json.loads(r.manifest_json)
        accepted, why = acceptance_verdict(m)
        table.add_row("*" if r.current else "", r.version, str(m.get("name", "")), str(m.get("task", "")),
                      "[green]passed[/]" if accepted else f"[red]{escape(why[:60])}[/]",
                      f"{r.size:,} B", _when(r.published_at), _when(r.promoted_at), r.sha256[:12])
    console.print(table if releases else f"no releases on {channel} for {device_class}")


@devices_app.command("add")
@connection_options
def devices_add(
    conn: RegistryConnection,
    device_id: str = typer.Argument(..., help="Device id (letters, digits, '_' or '-'), e.g. the scanner's asset tag."),
    device_class: str = typer.Option(..., "--device-class", "-c", help="Which releases it runs, e.g. cart-x86."),
    token_file: Optional[Path] = typer.Option(
        None, "--token-file", help="Also write the token to this file (mode 0600) instead of only printing it."
    ),
) -> None:
    """Enrol a scanner. Prints its token ONCE: the registry keeps only a hash."""
    import os

    if token_file is not None and (token_file.exists() or not token_file.parent.is_dir()):
        why = "already exists (the token is never overwritten)" if token_file.exists() else "its folder does not exist"
        raise _fail(f"--token-file {token_file}: {why}", 2)
    with conn.client() as client:
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
@connection_options
def devices_list(
    conn: RegistryConnection,
    device_class: str = typer.Option("", "--device-class", "-c", help="Only this class."),
) -> None:
    """Enrolled scanners: class, running version, health, last seen."""
    import time

    from server.registry.client import CHANNEL_NAMES, HEALTH_NAMES

    with conn.client() as client:
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
@connection_options
def devices_remove(
    conn: RegistryConnection,
    device_id: str = typer.Argument(..., help="Device id to revoke."),
) -> None:
    """Revoke a scanner's token (a lost or retired device)."""
    with conn.client() as client:
        _registry_call(lambda: client.remove_device(device_id))
    console.print(f"[green]removed {device_id}; its token no longer works[/]")
