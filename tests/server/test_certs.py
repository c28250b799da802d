"""server/certs/pki.py and `echofleet certs`: CA, server certificates with SANs, Flower SuperNode keys."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from typer.testing import CliRunner

from server.certs.pki import CertError, create_node_keypair, init_ca, issue_server_cert
from echofleet.cli.certs import certs_app


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify_for(ca: x509.Certificate, leaf: x509.Certificate, name: x509.GeneralName) -> None:
    """Full RFC 5280 path validation for a TLS server named ``name`` (raises VerificationError)."""
    builder = PolicyBuilder().store(Store([ca])).time(dt.datetime.now(dt.timezone.utc))
    builder.build_server_verifier(name).verify(leaf, [])


def test_server_certificate_chains_to_the_ca_with_the_requested_sans(tmp_path):
    ca_files = init_ca(tmp_path / "ca")
    server = issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["localhost", "127.0.0.1", "registry.hospital.example"])
    ca, leaf = _load(ca_files.cert), _load(server.cert)

    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.DNSName("registry.hospital.example")):
        _verify_for(ca, leaf, name)
    with pytest.raises(VerificationError):
        _verify_for(ca, leaf, x509.DNSName("evil.example"))  # not a SAN
    other_ca = _load(init_ca(tmp_path / "other").cert)
    with pytest.raises(VerificationError):
        _verify_for(other_ca, leaf, x509.DNSName("localhost"))  # signed by another CA

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert (tmp_path / "srv" / "ca.crt").read_bytes() == ca_files.cert.read_bytes()
    for key in (ca_files.key, server.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_existing_keys_are_not_overwritten_and_bad_input_is_named(tmp_path):
    init_ca(tmp_path / "ca")
    before = (tmp_path / "ca" / "ca.key").read_bytes()
    with pytest.raises(CertError, match="already exists"):
        init_ca(tmp_path / "ca")
    assert (tmp_path / "ca" / "ca.key").read_bytes() == before
    with pytest.raises(CertError, match="not a DNS name or an IP"):
        issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["bad name"])
    with pytest.raises(CertError, match="at least one --san"):
        issue_server_cert(tmp_path / "ca", tmp_path / "srv", [])
    with pytest.raises(CertError, match=r"ca\.key: not found"):
        issue_server_cert(tmp_path / "nowhere", tmp_path / "srv", ["localhost"])
    assert not (tmp_path / "srv").exists()
    create_node_keypair(tmp_path / "node")
    with pytest.raises(CertError, match="already exists"):
        create_node_keypair(tmp_path / "node")


def test_supernode_keys_load_with_flowers_own_loaders_and_sign_verifiably(tmp_path):
    pytest.importorskip("flwr")
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_public_key,
        public_key_to_bytes,
        sign_message,
        verify_signature,
    )
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    pair = create_node_keypair(tmp_path / "hospital-a", comment="hospital-a")
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
    assert pair.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")

    # What `flower-supernode --auth-supernode-private-key` does with the file.
    loaded = _try_setup_client_authentication(
        argparse.Namespace(auth_supernode_private_key=str(pair.private_key), auth_supernode_public_key=None)
    )
    assert loaded is not None
    private_key, public_key = loaded
    assert isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(private_key.curve, ec.SECP384R1)
    # What `flwr supernode register PUB` sends to the SuperLink.
    registered = try_load_public_key(pair.public_key)
    assert registered == public_key_to_bytes(public_key)
    # The SuperLink verifies the SuperNode's signatures with the registered key.
    message = b"2026-01-01T00:00:00Z"
    signature = sign_message(private_key, message)
    assert verify_signature(bytes_to_public_key(registered), message, signature)
    other = create_node_keypair(tmp_path / "hospital-b")
    assert not verify_signature(bytes_to_public_key(try_load_public_key(other.public_key)), message, signature)


def test_certs_cli_init_server_node(tmp_path):
    app = typer.Typer()
    app.add_typer(certs_app, name="certs")
    runner = CliRunner()
    r = runner.invoke(app, ["certs", "init", "--out", str(tmp_path / "ca")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["certs", "server", "--ca", str(tmp_path / "ca"), "--san", "localhost",
                            "--san", "127.0.0.1", "--out", str(tmp_path / "superlink")])
    assert r.exit_code == 0, r.output
    assert "--ssl-certfile" in r.output
    sans = _load(tmp_path / "superlink" / "server.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    r = runner.invoke(app, ["certs", "node", "--out", str(tmp_path / "keys" / "site1")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "keys" / "site1.pub").is_file()
    r = runner.invoke(app, ["certs", "init", "--out", str(tmp_path / "ca")])
    assert r.exit_code == 1 and "already exists" in r.output
