"""Deployment certificates and keys: a private CA, TLS server certificates, SuperNode key pairs.

Three things a real deployment needs, all made with ``cryptography`` (no openssl shell-outs):

1. :func:`init_ca` — a certificate authority: ``ca.key`` (EC P-384, PKCS#8 PEM, mode 0600) and a
   self-signed ``ca.crt``. Every hospital and every scanner pins ``ca.crt``; ``ca.key`` stays with
   the coordinator, offline if possible.
2. :func:`issue_server_cert` — the TLS certificate of a SuperLink or of the edge release registry:
   ``server.key`` + ``server.crt`` signed by the CA, with the DNS names / IP addresses clients dial
   as subjectAltNames (TLS clients check SANs, not the common name). A copy of ``ca.crt`` is put
   next to them because ``flower-superlink`` wants all three (``--ssl-ca-certfile``,
   ``--ssl-certfile``, ``--ssl-keyfile``).
3. :func:`create_node_keypair` — a SuperNode authentication key pair in the formats Flower 1.42
   reads: ``flower-supernode --auth-supernode-private-key`` loads the private key with
   ``load_ssh_private_key`` and requires an elliptic-curve key; ``flwr supernode register`` loads
   the public key with ``load_ssh_public_key`` and requires a NIST curve. So: ECDSA on P-384
   (what Flower's own ``ssh-keygen -t ecdsa -b 384`` examples make), private key in OpenSSH
   format, public key as one OpenSSH line (``ecdsa-sha2-nistp384 AAAA...``).

Every file is written atomically (temp file + ``os.replace``); private keys are created with mode
0600. Existing keys are never overwritten unless ``overwrite=True``: replacing a CA key silently
would cut every site off.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from echocare.atomic import atomic_write_bytes

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_KEY, SERVER_CERT = "server.key", "server.crt"
# Certificates are back-dated a little so a peer whose clock runs slightly behind accepts them.
_CLOCK_SKEW = dt.timedelta(minutes=5)


class CertError(Exception):
    """A certificate or key could not be created or read; the message names the file and why."""


@dataclass(frozen=True)
class CAFiles:
    """The CA's key and self-signed certificate."""

    key: Path
    cert: Path


@dataclass(frozen=True)
class ServerFiles:
    """A server's key and certificate, and the CA certificate that signed it (a copy)."""

    key: Path
    cert: Path
    ca_cert: Path
    sans: tuple[str, ...]


@dataclass(frozen=True)
class NodeKeyPair:
    """A SuperNode authentication key pair (OpenSSH private key, OpenSSH public key line)."""

    private_key: Path
    public_key: Path


# --------------------------------------------------------------------------------------------
# Files


def _write_atomic(path: Path, data: bytes, mode: int = 0o644, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise CertError(f"{path}: already exists (pass overwrite/--force to replace it)")
    atomic_write_bytes(path, data, mode)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_ca(ca_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Load ``ca.key`` and ``ca.crt`` from ``ca_dir`` (made by :func:`init_ca`)."""
    ca_dir = Path(ca_dir)
    key_path, cert_path = ca_dir / CA_KEY, ca_dir / CA_CERT
    for p in (key_path, cert_path):
        if not p.is_file():
            raise CertError(f"{p}: not found (create the CA first: echofleet certs init --out {ca_dir})")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise CertError(f"{key_path}: not an unencrypted PEM private key ({e})") from e
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as e:
        raise CertError(f"{cert_path}: not a PEM certificate ({e})") from e
    if cert.public_key() != key.public_key():
        raise CertError(f"{cert_path}: does not belong to the key in {key_path}")
    return key, cert  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# CA and server certificates


def _name(common_name: str, organization: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    """Digital signatures only (ECDSA keys); a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=signs_certificates, crl_sign=signs_certificates,
        encipher_only=False, decipher_only=False,
    )


def init_ca(
    out_dir: Path,
    common_name: str = "echofleet deployment CA",
    organization: str | None = "echofleet",
    days: int = 3650,
    overwrite: bool = False,
) -> CAFiles:
    """Create a CA in ``out_dir``: ``ca.key`` (0600) and a self-signed ``ca.crt``.

    The CA may only sign end-entity certificates (``pathLength=0``). Raises :class:`CertError` if
    ``ca.key`` exists and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    key_path, cert_path = out_dir / CA_KEY, out_dir / CA_CERT
    if key_path.exists() and not overwrite:
        raise CertError(f"{key_path}: a CA already exists here (use --force to replace it)")
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(common_name, organization)
    now = dt.datetime.now(dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_atomic(key_path, _private_pem(key), mode=0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return CAFiles(key=key_path, cert=cert_path)


def parse_san(value: str) -> x509.GeneralName:
    """``"127.0.0.1"``/``"::1"`` -> IPAddress, anything else -> DNSName (validated loosely)."""
    value = value.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    label_ok = all(part and len(part) <= 63 for part in value.lstrip("*.").split("."))
    if not value or " " in value or "/" in value or not label_ok:
        raise CertError(f"subjectAltName {value!r}: not a DNS name or an IP address")
    return x509.DNSName(value)


def issue_server_cert(
    ca_dir: Path,
    out_dir: Path,
    sans: list[str] | tuple[str, ...],
    common_name: str | None = None,
    days: int = 825,
    overwrite: bool = False,
    client_auth: bool = False,
) -> ServerFiles:
    """Issue a TLS server certificate signed by the CA in ``ca_dir``; write it to ``out_dir``.

    Writes ``server.key`` (EC P-384, 0600), ``server.crt`` and a copy of ``ca.crt``. ``sans`` are
    the names clients dial (``localhost``, ``127.0.0.1``, ``registry.hospital.example``); at least
    one is required. ``client_auth`` also allows the certificate for TLS client authentication.
    """
    if not sans:
        raise CertError("a server certificate needs at least one --san (the name clients connect to)")
    names = [parse_san(s) for s in sans]
    ca_key, ca_cert = load_ca(Path(ca_dir))
    out_dir = Path(out_dir)
    key_path, cert_path = out_dir / SERVER_KEY, out_dir / SERVER_CERT
    if key_path.exists() and not overwrite:
        raise CertError(f"{key_path}: already exists (use --force to replace it)")
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name or str(sans[0]), None))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_atomic(key_path, _private_pem(key), mode=0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    ca_copy = out_dir / CA_CERT
    if ca_copy.resolve() != (Path(ca_dir) / CA_CERT).resolve():
        _write_atomic(ca_copy, ca_cert.public_bytes(serialization.Encoding.PEM))
    return ServerFiles(key=key_path, cert=cert_path, ca_cert=ca_copy, sans=tuple(str(s) for s in sans))


# --------------------------------------------------------------------------------------------
# SuperNode authentication keys (Flower 1.42)


def create_node_keypair(prefix: Path, comment: str = "", overwrite: bool = False) -> NodeKeyPair:
    """Create a SuperNode key pair: ``PREFIX`` (OpenSSH private key, 0600) and ``PREFIX.pub``.

    - hospital: ``flower-supernode --auth-supernode-private-key PREFIX ...``
    - coordinator: ``flwr supernode register PREFIX.pub ...``
    """
    prefix = Path(prefix)
    pub_path = prefix.with_name(prefix.name + ".pub")
    if (prefix.exists() or pub_path.exists()) and not overwrite:
        raise CertError(f"{prefix}: a key pair already exists here (use --force to replace it)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode()
    _write_atomic(prefix, private, mode=0o600)
    _write_atomic(pub_path, public + b"\n")
    return NodeKeyPair(private_key=prefix, public_key=pub_path)


def describe_certificate(path: Path) -> dict:
    """Subject, issuer, validity and SANs of a PEM certificate (for the CLI's summary tables)."""
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise CertError(f"{path}: cannot read certificate ({e})") from e
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
            str(v) for v in san.get_values_for_type(x509.IPAddress)
        ]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat(timespec="seconds"),
        "sans": sans,
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }
