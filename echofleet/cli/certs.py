"""CLI: ``echofleet certs ...`` — the private CA, TLS server certificates and SuperNode keys.

``cryptography`` is imported inside the commands so ``echofleet --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from echofleet.cli.common import fail as _fail
from echofleet.cli.common import unwritable_folder

MAX_DAYS = 36500  # 100 years: beyond that a date overflows X.509's and Python's calendars anyway

console = Console()

certs_app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Certificates and keys for a real deployment: a private CA (`init`), TLS certificates for the "
        "SuperLink and the registry (`server`), SuperNode authentication keys (`node`)."
    ),
)


@certs_app.command("init")
def certs_init(
    out: Path = typer.Option(..., "--out", help="Folder for ca.key (keep it private, offline) and ca.crt."),
    common_name: str = typer.Option("echofleet deployment CA", "--cn", help="CA common name."),
    days: int = typer.Option(3650, "--days", min=1, max=MAX_DAYS, help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace an existing CA (invalidates every issued certificate)."),
) -> None:
    """Create a certificate authority (EC P-384)."""
    from server.certs.pki import CertError, describe_certificate, init_ca

    _check_out_folder(out)
    try:
        files = init_ca(out, common_name=common_name, days=days, overwrite=force)
    except CertError as e:
        raise _fail(str(e)) from None
    info = describe_certificate(files.cert)
    table = Table(title="CA created", show_header=False)
    table.add_row("private key", f"{files.key} (mode 0600: keep it off the network)")
    table.add_row("certificate", f"{files.cert} (give this to every site and scanner)")
    table.add_row("subject", info["subject"])
    table.add_row("valid until", info["not_after"])
    table.add_row("sha256", info["sha256"])
    console.print(table)


@certs_app.command("server")
def certs_server(
    ca: Path = typer.Option(..., "--ca", help="CA folder (from `certs init`)."),
    san: list[str] = typer.Option(..., "--san", help="DNS name or IP clients dial; repeatable (--san localhost --san 127.0.0.1)."),
    out: Path = typer.Option(..., "--out", help="Folder for server.key, server.crt and a copy of ca.crt."),
    common_name: Optional[str] = typer.Option(None, "--cn", help="Common name (default: the first --san)."),
    days: int = typer.Option(825, "--days", min=1, max=MAX_DAYS, help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace an existing server key/certificate."),
) -> None:
    """Issue the TLS certificate of a SuperLink or of the registry, signed by the CA."""
    from server.certs.pki import CertError, describe_certificate, issue_server_cert, load_ca, parse_san

    for name in san:  # bad arguments are refused before any key is made
        try:
            parse_san(name)
        except CertError as e:
            raise _fail(f"--san: {e}", 2) from None
    try:
        load_ca(ca)
    except CertError as e:
        raise _fail(f"--ca {ca}: {e}", 2) from None
    _check_out_folder(out)
    try:
        files = issue_server_cert(ca, out, san, common_name=common_name, days=days, overwrite=force)
    except CertError as e:
        raise _fail(str(e)) from None
    info = describe_certificate(files.cert)
    table = Table(title="server certificate issued", show_header=False)
    table.add_row("certificate", str(files.cert))
    table.add_row("private key", f"{files.key} (mode 0600)")
    table.add_row("CA certificate", str(files.ca_cert))
    table.add_row("subjectAltNames", ", ".join(info["sans"]))
    table.add_row("valid until", info["not_after"])
    table.add_row(
        "SuperLink",
        f"--ssl-ca-certfile {files.ca_cert} --ssl-certfile {files.cert} --ssl-keyfile {files.key}",
    )
    table.add_row("registry", f"--tls-cert {files.cert} --tls-key {files.key}")
    console.print(table)


@certs_app.command("node")
def certs_node(
    out: Path = typer.Option(..., "--out", help="Key path prefix: writes PREFIX (private) and PREFIX.pub."),
    comment: str = typer.Option("", "--comment", help="Comment appended to the public key line (e.g. the hospital)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair."),
) -> None:
    """Create a SuperNode authentication key pair (ECDSA P-384, OpenSSH formats, as Flower 1.42 reads them)."""
    from server.certs.pki import CertError, create_node_keypair

    if out.is_dir():
        raise _fail(f"--out {out}: is a folder; give a key path prefix inside it, e.g. {out / 'supernode'}", 2)
    _check_out_folder(out.parent)
    try:
        pair = create_node_keypair(out, comment=comment, overwrite=force)
    except CertError as e:
        raise _fail(str(e)) from None
    table = Table(title="SuperNode key pair created", show_header=False)
    table.add_row("private key", f"{pair.private_key} (mode 0600, stays at the hospital)")
    table.add_row("public key", f"{pair.public_key} (send to the coordinator)")
    table.add_row("hospital", f"flower-supernode --auth-supernode-private-key {pair.private_key} ...")
    table.add_row("coordinator", f"flwr supernode register {pair.public_key} ...")
    console.print(table)


def _check_out_folder(folder: Path) -> None:
    """Refuse (exit 2) an output folder that cannot be created or written into."""
    problem = unwritable_folder(folder)
    if problem:
        raise _fail(f"--out {folder}: {problem}", 2)
