"""Signed edge bundles: write, verify, unpack safely. numpy/torch-free (only ``cryptography``).

A bundle is a directory ``<name>-<version>/`` holding

- ``manifest.json``: what the model is (task, labels, input and preprocessing spec, model card)
  and, under ``"artifacts"``, every other file with its ``sha256``, ``size``, ``precision`` and
  ``target``;
- ``manifest.sig``: the base64 Ed25519 signature of the exact bytes of ``manifest.json``;
- the artifacts themselves (ONNX / OpenVINO IR / build configs / self-test sample ...).

The same directory is also written as ``<name>-<version>.tar.gz`` for shipping. Verification
checks the signature first, then every listed artifact's size and hash, and refuses any file the
manifest does not list, so one flipped byte anywhere makes :func:`verify_bundle` raise
:class:`BundleError`. :func:`safe_extract` refuses tar members that could write outside the
destination (absolute paths, ``..``), links and device files before anything is extracted.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import shutil
import tarfile
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from echocare.atomic import atomic_write_bytes

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = "echofleet-bundle/1"  # one model (or one model per backend) chosen by the runtime's backend order
# /2: ``--precision auto``: the manifest's "candidates" list several gated precisions of one model and
# the scanner times them and runs the fastest (:func:`candidates_of`); everything else as /1
FORMAT_CANDIDATES = "echofleet-bundle/2"
FORMATS = (FORMAT, FORMAT_CANDIDATES)  # what this code reads; a bundle without "format" is /1
CANDIDATES = "candidates"
# A bundle name and version become a directory name: keep them to a safe alphabet (no '/', no
# leading '.', so never '..'). Scanner agents check the registry's versions against it too.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)
# Unpacking refuses archives that would expand beyond this (a gzip bomb guard); override per call.
DEFAULT_MAX_UNPACKED_BYTES = 8 * 1024**3


class BundleError(Exception):
    """A bundle (or key) is unusable. ``str(e)`` names the file or artifact and the reason."""


def safe_name(text: str) -> str:
    """``text`` in the alphabet of bundle names and versions (anything else becomes ``-``)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.")[:100] or "model"


# --------------------------------------------------------------------------------------- keys
def generate_keypair(prefix: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: private key (PEM, PKCS8, mode 0600) at ``prefix``, public at ``prefix.pub``.

    Refuses to replace an existing private key unless ``overwrite`` (losing it means no more
    releases can be signed under the public key the scanners trust).
    """
    prefix = Path(prefix)
    pub_path = prefix.with_name(prefix.name + ".pub")
    if not overwrite:
        for p in (prefix, pub_path):
            if p.exists():
                raise BundleError(f"{p}: already exists; refusing to overwrite a key (pass overwrite=True / --force)")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(prefix, private_pem, mode=0o600)
    atomic_write_bytes(pub_path, public_pem, mode=0o644)
    return prefix, pub_path


def load_private_key(path: Path | str | bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file path or PEM bytes (unencrypted PKCS8)."""
    data, where = _read_key_material(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise BundleError(f"{where}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{where}: is a {type(key).__name__}, expected an Ed25519 private key")
    return key


def load_public_key(path_or_pem: Path | str | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, PEM text/bytes, or a path to a PEM file."""
    if isinstance(path_or_pem, Ed25519PublicKey):
        return path_or_pem
    data, where = _read_key_material(path_or_pem)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise BundleError(f"{where}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{where}: is a {type(key).__name__}, expected an Ed25519 public key")
    return key


def _read_key_material(src: Path | str | bytes) -> tuple[bytes, str]:
    if isinstance(src, bytes):
        return src, "<PEM bytes>"
    if isinstance(src, str) and src.lstrip().startswith("-----BEGIN"):
        return src.encode(), "<PEM text>"
    p = Path(src)
    try:
        return p.read_bytes(), str(p)
    except OSError as e:
        raise BundleError(f"{p}: cannot read key ({e.strerror or e})") from None


# ------------------------------------------------------------------------------------ hashing
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_rel_path(rel: str, where: str) -> PurePosixPath:
    """An artifact path must be relative, normalised, inside the bundle, and not a reserved name."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or "\\" in rel or any(part in ("", ".", "..") for part in rel.split("/")):
        raise BundleError(f"{where}: artifact path {rel!r} is not a plain relative path inside the bundle")
    if rel in (MANIFEST, SIGNATURE):
        raise BundleError(f"{where}: artifact path {rel!r} is reserved for the bundle's own files")
    return p


# -------------------------------------------------------------------------------------- write
def write_bundle(out_dir: Path, manifest: dict, artifacts: dict[str, Path], private_key: Path | str | bytes) -> Path:
    """Write ``out_dir/<name>-<version>/`` and ``out_dir/<name>-<version>.tar.gz``; return the tarball.

    ``manifest`` must carry ``name`` and ``version``. ``artifacts`` maps a path inside the bundle
    (e.g. ``"model/model.xml"``) to the file to copy there. Per-artifact ``precision`` and
    ``target`` are taken from ``manifest["artifacts"]`` when the caller pre-fills it as a list of
    ``{"path": ..., "precision": ..., "target": ..., (any other keys)}``; ``sha256`` and
    ``size`` are always computed here. The manifest is then signed with the Ed25519 private key.

    Both outputs are replaced atomically: a crash mid-write leaves any previous bundle intact.
    """
    out_dir = Path(out_dir)
    key = load_private_key(private_key)
    name, version = str(manifest.get("name", "")), str(manifest.get("version", ""))
    for field_name, value in (("name", name), ("version", version)):
        if not _NAME_RE.fullmatch(value):
            raise BundleError(f"manifest: {field_name} {value!r} must match {_NAME_RE.pattern} (it names the bundle directory)")
    described = {a["path"]: a for a in manifest.get("artifacts", []) if isinstance(a, dict) and "path" in a}
    unknown = sorted(set(described) - set(artifacts))
    if unknown:
        raise BundleError(f"manifest: artifacts {unknown} are described but no file was given for them")

    entries = []
    for rel, src in sorted(artifacts.items()):
        _check_rel_path(rel, "write_bundle")
        src = Path(src)
        if not src.is_file():
            raise BundleError(f"{src}: artifact {rel!r} is not a readable file")
        info = dict(described.get(rel, {}))
        info.update(path=rel, sha256=sha256_file(src), size=src.stat().st_size)
        info.setdefault("precision", None)
        info.setdefault("target", None)
        entries.append(info)
    full = dict(manifest)
    full.setdefault("format", FORMAT)
    full["artifacts"] = entries
    manifest_bytes = (json.dumps(full, indent=2, sort_keys=True) + "\n").encode()
    signature = base64.b64encode(key.sign(manifest_bytes)) + b"\n"

    stem = f"{name}-{version}"
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=out_dir))
    try:
        for rel, src in artifacts.items():
            dst = tmp_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        # Copies are re-hashed: a file that changed while being copied must not be shipped.
        for e in entries:
            if sha256_file(tmp_dir / e["path"]) != e["sha256"]:
                raise BundleError(f"{artifacts[e['path']]}: changed while the bundle was written")
        (tmp_dir / MANIFEST).write_bytes(manifest_bytes)
        (tmp_dir / SIGNATURE).write_bytes(signature)
        tar_tmp = out_dir / f".{stem}.tar.gz.tmp"
        _write_tar(tmp_dir, stem, tar_tmp)
        _replace_dir(tmp_dir, out_dir / stem)
        tar_path = out_dir / f"{stem}.tar.gz"
        os.replace(tar_tmp, tar_path)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        Path(out_dir / f".{stem}.tar.gz.tmp").unlink(missing_ok=True)
        raise
    return tar_path


def _write_tar(src_dir: Path, top: str, dest: Path) -> None:
    """A reproducible tar.gz of ``src_dir`` under the top-level folder ``top`` (regular files only)."""

    def norm(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = 0
        ti.mode = 0o755 if ti.isdir() else 0o644
        return ti

    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(src_dir, arcname=top, recursive=False, filter=norm)
            for path in sorted(src_dir.rglob("*")):
                tar.add(path, arcname=f"{top}/{path.relative_to(src_dir).as_posix()}", recursive=False, filter=norm)
        raw.flush()
        os.fsync(raw.fileno())


def _replace_dir(new: Path, final: Path) -> None:
    """Move ``new`` to ``final``; an existing ``final`` is swapped out first and removed after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------- verify
def verify_bundle(path: Path, public_key: Any) -> dict:
    """Check a bundle directory or ``.tar.gz``; return its manifest dict.

    Raises :class:`BundleError` when the signature does not match ``manifest.json``, when any
    artifact is missing or differs in size or sha256, when a file is present that the manifest
    does not list, when the bundle contains links, or (for a tarball) when it is unsafe to unpack.
    """
    path = Path(path)
    key = load_public_key(public_key)
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix="echofleet-verify-") as tmp:
            bundle_dir = safe_extract(path, Path(tmp))
            return _verify_dir(bundle_dir, key, label=str(path))
    if path.is_dir():
        return _verify_dir(path, key, label=str(path))
    raise BundleError(f"{path}: no such bundle (expected a bundle directory or a .tar.gz)")


def _verify_dir(bundle_dir: Path, key: Ed25519PublicKey, label: str) -> dict:
    man_path, sig_path = bundle_dir / MANIFEST, bundle_dir / SIGNATURE
    for p in (man_path, sig_path):
        if p.is_symlink() or not p.is_file():
            raise BundleError(f"{label}: {p.name} is missing (not a signed bundle)")
    manifest_bytes = man_path.read_bytes()
    try:
        signature = base64.b64decode(sig_path.read_bytes().strip(), validate=True)
    except ValueError:
        raise BundleError(f"{label}: {SIGNATURE} is not valid base64") from None
    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise BundleError(f"{label}: {MANIFEST} does not match its signature (modified, or signed with another key)") from None
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as e:  # signed but unparseable: the signer made a broken bundle
        raise BundleError(f"{label}: {MANIFEST} is signed but not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list):
        raise BundleError(f"{label}: {MANIFEST} has no artifact list")
    fmt = manifest.get("format", FORMAT)
    if fmt not in FORMATS:
        raise BundleError(f"{label}: bundle format {fmt!r} is newer than this runtime reads ({', '.join(FORMATS)}); "
                          "update echofleet on this device")

    listed = set()
    for a in manifest["artifacts"]:
        rel = str(a.get("path", ""))
        _check_rel_path(rel, f"{label}: {MANIFEST}")
        listed.add(rel)
        f = bundle_dir / rel
        if f.is_symlink() or not f.is_file():
            raise BundleError(f"{label}: artifact {rel} is missing")
        if f.stat().st_size != a.get("size"):
            raise BundleError(f"{label}: artifact {rel} has {f.stat().st_size} bytes, the manifest says {a.get('size')}")
        if sha256_file(f) != a.get("sha256"):
            raise BundleError(f"{label}: artifact {rel} does not match its sha256 in the manifest (modified)")
    for p in sorted(bundle_dir.rglob("*")):
        rel = p.relative_to(bundle_dir).as_posix()
        if p.is_symlink():
            raise BundleError(f"{label}: {rel} is a link; bundles hold regular files only")
        if p.is_dir():
            continue
        if not p.is_file():
            raise BundleError(f"{label}: {rel} is not a regular file")
        if rel not in listed and rel not in (MANIFEST, SIGNATURE):
            raise BundleError(f"{label}: {rel} is not listed in the manifest (unexpected file)")
    return manifest


# ------------------------------------------------------------------------------------- unpack
def safe_extract(tar_path: Path, dest: Path, *, max_bytes: int = DEFAULT_MAX_UNPACKED_BYTES) -> Path:
    """Unpack a bundle tarball into ``dest``; return the bundle directory inside it.

    Every member is checked before anything is written: only regular files and directories,
    all under one top-level folder, no absolute paths, no ``..``, no links or devices, and no
    more than ``max_bytes`` in total. The extraction itself then also runs with Python's
    ``"data"`` filter as a second guard.
    """
    tar_path, dest = Path(tar_path), Path(dest)
    try:
        tar = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleError(f"{tar_path}: not a readable tar archive ({e})") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
            raise BundleError(f"{tar_path}: corrupt archive ({e})") from None
        tops, total = set(), 0
        for m in members:
            name = m.name
            if m.issym() or m.islnk():
                raise BundleError(f"{tar_path}: member {name!r} is a link; refused")
            if not (m.isreg() or m.isdir()):
                raise BundleError(f"{tar_path}: member {name!r} is not a regular file or directory (device/fifo); refused")
            if name.startswith("/") or name.startswith("\\") or re.match(r"^[A-Za-z]:", name):
                raise BundleError(f"{tar_path}: member {name!r} has an absolute path; refused")
            parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
            if ".." in parts:
                raise BundleError(f"{tar_path}: member {name!r} contains '..'; refused")
            if not parts:
                raise BundleError(f"{tar_path}: member {name!r} has an empty path; refused")
            tops.add(parts[0])
            total += max(0, m.size)
            if total > max_bytes:
                raise BundleError(f"{tar_path}: unpacks to more than {max_bytes} bytes; refused")
        if len(tops) != 1:
            raise BundleError(f"{tar_path}: expected one top-level bundle folder, found {sorted(tops) or 'none'}")
        top = tops.pop()
        if not _NAME_RE.fullmatch(top):
            raise BundleError(f"{tar_path}: top-level folder {top!r} is not a valid bundle name")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            tar.extractall(dest, members=members, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BundleError(f"{tar_path}: extraction failed ({e})") from None
    return dest / top


def read_manifest_unverified(bundle_dir: Path) -> dict:
    """The manifest of an already-verified bundle directory (no checks: call :func:`verify_bundle` first)."""
    try:
        return json.loads((Path(bundle_dir) / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{bundle_dir}: cannot read {MANIFEST} ({e})") from None


def artifact_for(manifest: dict, *, role: str | None = None, path: str | None = None) -> dict | None:
    """The first artifact entry with the given ``role`` (e.g. ``"model"``) or ``path``."""
    for a in manifest.get("artifacts", []):
        if (role is None or a.get("role") == role) and (path is None or a.get("path") == path):
            return a
    return None



# ------------------------------------------------------------------------ release records (manifest)
# Two signed manifest sections describe how a release came to be; the registry and `edge verify
# --explain` read them, the build writes them. Both are plain JSON in the manifest (the signature
# covers them); the dataclasses below are their schema, with one validating reader each.
ACCEPTANCE = "acceptance"
PROVENANCE = "provenance"


@dataclass(frozen=True)
class SiteAcceptance:
    """One site's acceptance check of the candidate build (the torch-free runtime on its own validation split).

    ``delta`` is the drop of the site's metric from the FP32 reference to the candidate
    (``fp32 - candidate``: positive means the candidate is worse); the site passes when
    ``delta <= bound``. ``delta`` is None when the site's policy disclosed only pass/fail;
    ``p50_ms`` is None when the site did not report its latency. ``reason`` says why a site failed
    (or did not take part) in words.
    """

    site: str
    metric: str
    delta: float | None
    bound: float
    p50_ms: float | None
    passed: bool
    reason: str = ""


@dataclass(frozen=True)
class AcceptanceRecord:
    """``manifest["acceptance"]``: the gate a release passed (or not) before it was signed.

    - ``passed``: the build's verdict;
    - ``method``: ``"federated"`` (each site checked the candidate on its own data) or ``"central"``
      (the build machine's ``--val`` data; ``sites`` then holds one entry named ``"central"``);
    - ``metric`` / ``bound``: the gate (e.g. ``"auroc"``, 0.02);
    - ``quorum``: how many sites must pass (the number of entries in ``sites`` when all must);
    - ``sites``: one :class:`SiteAcceptance` per participating site;
    - ``reason``: for a refusal, the site(s) and metric that failed.

    :meth:`verdict` does not trust ``passed`` alone: it recounts the sites against the quorum.
    """

    passed: bool
    method: str
    metric: str
    bound: float
    quorum: int
    sites: tuple[SiteAcceptance, ...]
    reason: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sites"] = [asdict(s) for s in self.sites]
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> "AcceptanceRecord":
        """Parse and check ``d``; :class:`BundleError` names the field and the reason."""
        w = f"{where}: {ACCEPTANCE}"
        _require_object(d, w)
        method = _field(d, "method", str, w)
        if method not in ("federated", "central"):
            raise BundleError(f"{w}.method {method!r}: expected 'federated' or 'central'")
        raw_sites = _field(d, "sites", list, w)
        sites = []
        for i, s in enumerate(raw_sites):
            sw = f"{w}.sites[{i}]"
            _require_object(s, sw)
            sites.append(SiteAcceptance(
                site=_field(s, "site", str, sw), metric=_field(s, "metric", str, sw),
                delta=_number(s, "delta", sw, optional=True), bound=_number(s, "bound", sw),
                p50_ms=_number(s, "p50_ms", sw, optional=True), passed=_field(s, "passed", bool, sw),
                reason=str(s.get("reason") or "")))
        quorum = _field(d, "quorum", int, w)
        if isinstance(quorum, bool) or not 0 < quorum <= max(len(sites), 1):
            raise BundleError(f"{w}.quorum {quorum!r}: expected 1 to the number of sites ({len(sites)})")
        return cls(passed=_field(d, "passed", bool, w), method=method, metric=_field(d, "metric", str, w),
                   bound=_number(d, "bound", w), quorum=quorum, sites=tuple(sites), reason=str(d.get("reason") or ""))

    def verdict(self) -> tuple[bool, str]:
        """(accepted, why): the record says passed, and at least ``quorum`` sites passed consistently."""
        if not self.sites:
            return False, "the acceptance record lists no site"
        bad = [s for s in self.sites if s.passed and s.delta is not None and not s.delta <= s.bound]
        if bad:
            return False, "inconsistent acceptance record: " + ", ".join(
                f"site {s.site} is marked passed with a {s.metric} drop of {s.delta:g} > bound {s.bound:g}" for s in bad)
        ok = [s.site for s in self.sites if s.passed]
        failed = ", ".join(_site_failure(s) for s in self.sites if not s.passed) or "none"
        if not self.passed:
            return False, f"the build refused it{': ' + self.reason if self.reason else ''} (failed sites: {failed})"
        if len(ok) < self.quorum:
            return False, f"only {len(ok)} of the required {self.quorum} sites passed (failed sites: {failed})"
        return True, f"{self.method} acceptance passed at {len(ok)}/{len(self.sites)} sites (quorum {self.quorum})"


def _site_failure(s: SiteAcceptance) -> str:
    drop = f"drop {s.delta:g} > bound {s.bound:g}" if s.delta is not None else "not disclosed"
    return f"{s.site} ({s.metric} {drop}{'; ' + s.reason if s.reason else ''})"


def acceptance_of(manifest: dict, where: str = "manifest") -> AcceptanceRecord | None:
    """The manifest's acceptance record, None when it has none; :class:`BundleError` when malformed."""
    raw = manifest.get(ACCEPTANCE)
    return None if raw is None else AcceptanceRecord.from_dict(raw, where)


def _require_object(d: Any, where: str) -> None:
    """:class:`BundleError` naming ``where`` and what it is instead, unless ``d`` is a JSON object."""
    if not isinstance(d, dict):
        raise BundleError(f"{where} is a {type(d).__name__}, expected an object")


def _field(d: dict, key: str, kind: type, where: str) -> Any:
    if key not in d:
        raise BundleError(f"{where}.{key} is missing")
    v = d[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise BundleError(f"{where}.{key} {v!r}: expected {kind.__name__}")
    return v


def _number(d: dict, key: str, where: str, optional: bool = False) -> float | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BundleError(f"{where}.{key} {v!r}: expected a finite number")
    return float(v)


@dataclass(frozen=True)
class AppIdentity:
    """Which Flower app the coordinator and the sites ran.

    ``kind="fab"``: ``sha256`` is the FAB hash Flower computed for the app that ``flwr run``
    shipped to the SuperLink and every SuperNode (``fab_id`` / ``fab_version`` from its
    pyproject). ``kind="source"``: a simulation (``run_simulation`` builds no FAB), ``sha256`` hashes
    the app's Python sources as the coordinator imported them (every virtual hospital imports the
    same files on the same machine); ``packages`` names what was hashed.
    """

    kind: str
    sha256: str
    fab_id: str = ""
    fab_version: str = ""
    packages: tuple[str, ...] = ()
    flower_run_id: int | None = None


@dataclass(frozen=True)
class Provenance:
    """``manifest["provenance"]``: where the model in a bundle came from.

    - ``run_id``: the run key the sites' privacy ledgers record for every release of this run
      (run folder name + run-config hash); empty when the run report had no run config;
    - ``apps``: the :class:`AppIdentity` of each start of the run (more than one: it was resumed
      with another app), None when the run recorded none;
    - ``encoder``: ``{"config", "sha256"}`` (sha256 None: seeded random initialisation, no weights);
    - ``rounds``, ``strategy``;
    - ``epsilon``: per site, only what the site disclosed in the run report:
      ``{"epsilon", "delta", "unit"}`` (its lifetime total on its dataset, docs/privacy.md);
    - ``not_private``: the sites that trained with the insecure deterministic-noise test switch
      (their noise was derivable by the coordinator): **no privacy guarantee holds for this model**
      when it is not empty; every reader of the bundle shows it as "NOT PRIVATE".

    Calibration and acceptance have their own manifest sections (``calibration``,
    :data:`ACCEPTANCE`); :func:`release_chain` puts the three together.
    """

    run_id: str
    apps: tuple[AppIdentity, ...] | None
    encoder: dict
    rounds: int
    strategy: str
    epsilon: dict
    not_private: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["not_private"] = list(self.not_private)
        d["apps"] = None if self.apps is None else [asdict(a) | {"packages": list(a.packages)} for a in self.apps]
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> "Provenance":
        w = f"{where}: {PROVENANCE}"
        _require_object(d, w)
        apps = None
        if d.get("apps") is not None:
            apps = []
            for i, a in enumerate(_field(d, "apps", list, w)):
                aw = f"{w}.apps[{i}]"
                _require_object(a, aw)
                kind = _field(a, "kind", str, aw)
                if kind not in ("fab", "source"):
                    raise BundleError(f"{aw}.kind {kind!r}: expected 'fab' or 'source'")
                rid = a.get("flower_run_id")
                apps.append(AppIdentity(kind=kind, sha256=_field(a, "sha256", str, aw), fab_id=str(a.get("fab_id") or ""),
                                        fab_version=str(a.get("fab_version") or ""),
                                        packages=tuple(str(p) for p in a.get("packages") or ()),
                                        flower_run_id=rid if isinstance(rid, int) and not isinstance(rid, bool) else None))
            apps = tuple(apps)
        return cls(run_id=_field(d, "run_id", str, w), apps=apps, encoder=_field(d, "encoder", dict, w),
                   rounds=_field(d, "rounds", int, w), strategy=str(d.get("strategy") or ""),
                   epsilon=_field(d, "epsilon", dict, w),
                   not_private=tuple(str(x) for x in (_field(d, "not_private", list, w) if "not_private" in d else ())))


def provenance_of(manifest: dict, where: str = "manifest") -> Provenance | None:
    """The manifest's provenance, None when it has none (not built from a federation run)."""
    raw = manifest.get(PROVENANCE)
    return None if raw is None else Provenance.from_dict(raw, where)


def release_chain(manifest: dict) -> dict:
    """The provenance chain of a verified manifest, for people (``edge verify --explain``): what
    the bundle is, the run and app it came from, each site's disclosed privacy spend, how it was
    calibrated, how it was accepted and the acceptance verdict. Malformed sections are reported
    in ``problems`` rather than hidden."""
    problems: list[str] = []
    try:
        prov = provenance_of(manifest)
    except BundleError as e:
        prov, problems = None, problems + [str(e)]
    try:
        acc = acceptance_of(manifest)
    except BundleError as e:
        acc, problems = None, problems + [str(e)]
    verdict = acc.verdict() if acc is not None else (False, "no acceptance record")
    return {
        "bundle": {k: manifest.get(k) for k in ("name", "version", "created", "task", "target", "precision", "device_class")},
        "provenance": prov.to_dict() if prov is not None else None,
        "calibration": manifest.get("calibration"),
        "quantization": manifest.get("quantization"),
        "acceptance": acc.to_dict() if acc is not None else None,
        "verdict": {"accepted": verdict[0], "why": verdict[1]},
        "problems": problems,
    }


# ------------------------------------------------------------------ precision candidates (format /2)
@dataclass(frozen=True)
class ModelCandidate:
    """One entry of ``manifest["candidates"]`` (``--precision auto``): a gated way to run the bundle's model.

    ``path`` is a model artifact of the bundle (its hash is in the artifact list, so the signature
    covers it); several candidates may share one file and differ only in ``inference_precision``
    (OpenVINO: ``f32`` | ``bf16`` | ``f16``). ``gate`` is the accuracy gate it passed at build time,
    ``metrics`` its validation metrics, ``build_p50_ms`` its batch-1 latency on the build machine
    (``build_cpu``): a record, not what the scanner will see.
    """

    name: str
    path: str
    precision: str
    inference_precision: str
    gate: dict
    metrics: dict
    build_p50_ms: float | None = None
    build_cpu: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def candidates_of(manifest: dict, where: str = "manifest") -> tuple[ModelCandidate, ...]:
    """The manifest's precision candidates, best-known order; () for a one-model (format /1) bundle.

    :class:`BundleError` when the list is malformed, names a file that is not a model artifact of
    the bundle, repeats a name, or lists a candidate whose gate did not pass."""
    raw = manifest.get(CANDIDATES)
    if raw is None:
        return ()
    w = f"{where}: {CANDIDATES}"
    if manifest.get("format") != FORMAT_CANDIDATES:
        raise BundleError(f"{w} needs format {FORMAT_CANDIDATES!r}, the manifest says {manifest.get('format')!r}")
    if not isinstance(raw, list) or not raw:
        raise BundleError(f"{w} is not a non-empty list")
    models = {a.get("path") for a in manifest.get("artifacts", []) if isinstance(a, dict) and a.get("role") == "model"}
    out, seen = [], set()
    for i, c in enumerate(raw):
        cw = f"{w}[{i}]"
        _require_object(c, cw)
        name, path = _field(c, "name", str, cw), _field(c, "path", str, cw)
        if name in seen:
            raise BundleError(f"{cw}.name {name!r} is listed twice")
        if path not in models:
            raise BundleError(f"{cw}.path {path!r} is not a model artifact of the bundle")
        gate = _field(c, "gate", dict, cw)
        if gate.get("passed") is not True:
            raise BundleError(f"{cw}: candidate {name!r} did not pass the accuracy gate")
        seen.add(name)
        out.append(ModelCandidate(name=name, path=path, precision=_field(c, "precision", str, cw),
                                  inference_precision=_field(c, "inference_precision", str, cw), gate=gate,
                                  metrics=dict(c.get("metrics") or {}),
                                  build_p50_ms=_number(c, "build_p50_ms", cw, optional=True),
                                  build_cpu=str(c.get("build_cpu") or "")))
    return tuple(out)

