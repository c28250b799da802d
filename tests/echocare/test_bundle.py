"""Signed bundles: keys, write/verify, tampering, malicious tarballs, crash safety (no model needed)."""

from __future__ import annotations

import io
import json
import re
import stat
import tarfile
from pathlib import Path

import pytest

from echocare import bundle as B
from echocare.bundle import BundleError, generate_keypair, load_public_key, safe_extract, verify_bundle, write_bundle


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys" / "release")


@pytest.fixture()
def artifacts(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.onnx").write_bytes(bytes(range(256)) * 40)
    (src / "input.npy").write_bytes(b"\x93NUMPY fake sample" * 10)
    (src / "build.json").write_text(json.dumps({"precision": "int8"}))
    return {"model/model.onnx": src / "model.onnx", "selftest/input.npy": src / "input.npy", "build.json": src / "build.json"}


def _manifest() -> dict:
    return {
        "name": "busi-classify",
        "version": "3",
        "task": "classify",
        "labels": ["benign", "malignant", "normal"],
        "artifacts": [{"path": "model/model.onnx", "precision": "int8", "target": "onnxruntime-cpu", "role": "model"}],
    }


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def test_keygen_permissions_and_refuses_overwrite(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "k")
    assert pub == tmp_path / "k.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in priv.read_bytes() and b"BEGIN PUBLIC KEY" in pub.read_bytes()
    load_public_key(pub)
    load_public_key(pub.read_text())
    with pytest.raises(BundleError, match="already exists"):
        generate_keypair(tmp_path / "k")
    with pytest.raises(BundleError, match="expected an Ed25519 public key|not a PEM public key"):
        load_public_key(priv)


def test_write_and_verify_roundtrip(tmp_path: Path, keys, artifacts) -> None:
    priv, pub = keys
    tar = write_bundle(tmp_path / "out", _manifest(), artifacts, priv)
    assert tar == tmp_path / "out" / "busi-classify-3.tar.gz"
    bdir = tmp_path / "out" / "busi-classify-3"
    for target in (bdir, tar):
        man = verify_bundle(target, pub)
        assert man["task"] == "classify" and man["format"] == B.FORMAT
        by_path = {a["path"]: a for a in man["artifacts"]}
        assert set(by_path) == set(artifacts)
        assert by_path["model/model.onnx"]["precision"] == "int8"
        assert by_path["model/model.onnx"]["target"] == "onnxruntime-cpu"
        assert by_path["model/model.onnx"]["sha256"] == B.sha256_file(artifacts["model/model.onnx"])
        assert by_path["build.json"]["size"] == artifacts["build.json"].stat().st_size
    # The tarball is reproducible (mtime/uid normalised): rewriting gives identical bytes.
    first = tar.read_bytes()
    write_bundle(tmp_path / "out", _manifest(), artifacts, priv)
    assert tar.read_bytes() == first


def test_wrong_key_refused(tmp_path: Path, keys, artifacts) -> None:
    priv, _ = keys
    _, other_pub = generate_keypair(tmp_path / "other")
    tar = write_bundle(tmp_path / "out", _manifest(), artifacts, priv)
    with pytest.raises(BundleError, match="signature"):
        verify_bundle(tar, other_pub)


@pytest.mark.parametrize("victim", ["manifest.json", "manifest.sig", "model/model.onnx", "selftest/input.npy", "build.json"])
def test_any_flipped_byte_is_refused(tmp_path: Path, keys, artifacts, victim: str) -> None:
    priv, pub = keys
    write_bundle(tmp_path / "out", _manifest(), artifacts, priv)
    bdir = tmp_path / "out" / "busi-classify-3"
    size = (bdir / victim).stat().st_size
    for offset in (0, size // 2, size - 2):
        _flip(bdir / victim, offset)
        with pytest.raises(BundleError) as e:
            verify_bundle(bdir, pub)
        # The error names what is wrong: the manifest/signature, or the artifact itself.
        assert ("manifest" in str(e.value)) or (victim in str(e.value))
        _flip(bdir / victim, offset)  # restore
        verify_bundle(bdir, pub)


def test_flipped_byte_inside_tarball_refused(tmp_path: Path, keys, artifacts) -> None:
    """Repack the directory with one artifact byte flipped: the tarball must be refused too."""
    priv, pub = keys
    write_bundle(tmp_path / "out", _manifest(), artifacts, priv)
    bdir = tmp_path / "out" / "busi-classify-3"
    _flip(bdir / "model" / "model.onnx", 1000)
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as t:
        t.add(bdir, arcname="busi-classify-3")
    with pytest.raises(BundleError, match="model/model.onnx"):
        verify_bundle(evil, pub)


def test_unlisted_file_and_symlink_refused(tmp_path: Path, keys, artifacts) -> None:
    priv, pub = keys
    write_bundle(tmp_path / "out", _manifest(), artifacts, priv)
    bdir = tmp_path / "out" / "busi-classify-3"
    (bdir / "model" / "extra.so").write_bytes(b"payload")
    with pytest.raises(BundleError, match="not listed"):
        verify_bundle(bdir, pub)
    (bdir / "model" / "extra.so").unlink()
    (bdir / "model" / "link").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="link"):
        verify_bundle(bdir, pub)


def test_artifact_paths_and_names_validated(tmp_path: Path, keys, artifacts) -> None:
    priv, _ = keys
    with pytest.raises(BundleError, match="plain relative path"):
        write_bundle(tmp_path / "o", _manifest(), {**artifacts, "../escape.onnx": artifacts["build.json"]}, priv)
    with pytest.raises(BundleError, match="reserved"):
        write_bundle(tmp_path / "o", _manifest(), {**artifacts, "manifest.json": artifacts["build.json"]}, priv)
    with pytest.raises(BundleError, match="name"):
        write_bundle(tmp_path / "o", {**_manifest(), "name": "../x"}, artifacts, priv)
    with pytest.raises(BundleError, match="no file was given"):
        write_bundle(tmp_path / "o", _manifest(), {"build.json": artifacts["build.json"]}, priv)


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _reg(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, linkname
    return ti, None


MALICIOUS = {
    "absolute": ([_reg("/tmp/echofleet-evil-abs")], "absolute"),
    "dotdot": ([_reg("b-1/manifest.json"), _reg("b-1/../../echofleet-evil")], r"'\.\.'"),
    "symlink": ([_reg("b-1/manifest.json"), _special("b-1/model.onnx", tarfile.SYMTYPE, "/etc/passwd")], "link"),
    "hardlink": ([_reg("b-1/manifest.json"), _special("b-1/model.onnx", tarfile.LNKTYPE, "/etc/passwd")], "link"),
    "device": ([_reg("b-1/manifest.json"), _special("b-1/dev", tarfile.CHRTYPE)], "device"),
    "fifo": ([_reg("b-1/manifest.json"), _special("b-1/fifo", tarfile.FIFOTYPE)], "device|fifo"),
    "two-tops": ([_reg("a-1/manifest.json"), _reg("b-1/manifest.json")], "one top-level"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_tar_refused(tmp_path: Path, keys, case: str) -> None:
    members, reason = MALICIOUS[case]
    evil = tmp_path / f"{case}.tar.gz"
    evil.write_bytes(_tar(members))
    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match=reason) as e:
        safe_extract(evil, dest)
    assert str(evil) in str(e.value)
    # Nothing was written: checks run before extraction.
    assert not dest.exists() or not any(dest.rglob("*"))
    assert not (tmp_path / "echofleet-evil").exists()
    with pytest.raises(BundleError):
        verify_bundle(evil, keys[1])


def test_not_a_tarball_is_a_clear_error(tmp_path: Path, keys) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not gzip")
    with pytest.raises(BundleError, match="junk.tar.gz"):
        verify_bundle(junk, keys[1])


def test_crash_mid_write_keeps_previous_bundle(tmp_path: Path, keys, artifacts, monkeypatch) -> None:
    priv, pub = keys
    tar = write_bundle(tmp_path / "out", _manifest(), artifacts, priv)
    before = tar.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(B, "_write_tar", boom)
    artifacts["build.json"].write_text("changed")
    with pytest.raises(OSError, match="disk full"):
        write_bundle(tmp_path / "out", _manifest(), artifacts, priv)
    assert tar.read_bytes() == before
    verify_bundle(tmp_path / "out" / "busi-classify-3", pub)
    verify_bundle(tar, pub)
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    assert leftovers == []


# ------------------------------------------------------------------------ acceptance record schema
def _record(**over) -> dict:
    site = lambda name, delta, passed: {"site": name, "metric": "auroc", "delta": delta, "bound": 0.02,  # noqa: E731
                                        "p50_ms": 3.0, "passed": passed}
    d = {"passed": True, "method": "federated", "metric": "auroc", "bound": 0.02, "quorum": 2,
         "sites": [site("a", 0.01, True), site("b", 0.0, True), site("c", 0.05, False)]}
    d.update(over)
    return d


def test_acceptance_record_round_trip_and_quorum_verdict() -> None:
    rec = B.AcceptanceRecord.from_dict(_record())
    assert B.AcceptanceRecord.from_dict(rec.to_dict()) == rec
    assert rec.verdict() == (True, "federated acceptance passed at 2/3 sites (quorum 2)")
    ok, why = B.AcceptanceRecord.from_dict(_record(quorum=3)).verdict()  # says passed, but the count disagrees
    assert not ok and "only 2 of the required 3" in why and "c (auroc drop 0.05 > bound 0.02)" in why
    ok, why = B.AcceptanceRecord.from_dict(_record(passed=False, reason="site c: auroc")).verdict()
    assert not ok and why.startswith("the build refused it: site c: auroc")
    bad = _record()
    bad["sites"][2]["passed"] = True  # marked passed with a drop above its bound
    ok, why = B.AcceptanceRecord.from_dict(bad).verdict()
    assert not ok and "inconsistent" in why and "site c" in why
    assert B.acceptance_of({"name": "x"}) is None


@pytest.mark.parametrize("change, message", [
    ({"method": "vibes"}, "acceptance.method 'vibes'"),
    ({"quorum": 0}, "acceptance.quorum 0"),
    ({"quorum": True}, "acceptance.quorum"),
    ({"bound": float("nan")}, "acceptance.bound nan: expected a finite number"),
    ({"sites": "all"}, "acceptance.sites 'all': expected list"),
    ({"passed": "yes"}, "acceptance.passed 'yes': expected bool"),
])
def test_malformed_acceptance_records_name_the_field(change, message) -> None:
    with pytest.raises(BundleError, match=re.escape(message)):
        B.acceptance_of({"acceptance": _record(**change)}, where="dist/b.tar.gz")
    missing = _record()
    del missing["sites"][1]["metric"]
    with pytest.raises(BundleError, match=re.escape("dist/b.tar.gz: acceptance.sites[1].metric is missing")):
        B.acceptance_of({"acceptance": missing}, where="dist/b.tar.gz")
