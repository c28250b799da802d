"""The edge release registry over real gRPC on loopback: publish/list/promote/download, status codes
for every kind of bad request (each of which must change nothing), persistence across a restart,
hashed device tokens, TLS, the committed protobuf modules, and the `registry` CLI."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import grpc
import pytest
import typer
from typer.testing import CliRunner

from echocare.bundle import generate_keypair
from server.registry.client import ConnectionConfig, RegistryClient, RegistryError
from server.registry.proto import registry_pb2 as pb
from server.registry.proto import registry_pb2_grpc as pb_grpc
from server.registry.sample_bundle import make_classifier_bundle
from server.registry.service import RegistryConfig, RegistryServer

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]
ADMIN = "admin-" + secrets.token_hex(16)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    trusted = generate_keypair(d / "release")
    untrusted = generate_keypair(d / "intruder")
    return {"private": trusted[0], "public": trusted[1], "untrusted_private": untrusted[0]}


def _retar(src: Path, dest: Path, edit) -> Path:
    """Copy a bundle tarball, letting ``edit(name, bytes) -> bytes`` change member contents."""
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dest, "w:gz") as tout:
        for m in tin.getmembers():
            if m.isreg():
                data = edit(m.name, tin.extractfile(m).read())
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
            else:
                tout.addfile(m)
    return dest


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, keys):
    d = tmp_path_factory.mktemp("bundles")
    v1 = make_classifier_bundle(d / "v1", keys["private"], "1.0.0", seed=1)
    v2 = make_classifier_bundle(d / "v2", keys["private"], "1.1.0", seed=2)
    v1_other = make_classifier_bundle(d / "v1b", keys["private"], "1.0.0", seed=7)  # same version, other bytes
    other_class = make_classifier_bundle(d / "oc", keys["private"], "2.0.0", device_class="handheld", seed=3)
    untrusted = make_classifier_bundle(d / "u", keys["untrusted_private"], "9.0.0", seed=4)

    def flip(name: str, data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1]) if name.endswith("model.onnx") else data

    tampered = _retar(v2, d / "tampered.tar.gz", flip)
    garbage = d / "garbage.tar.gz"
    garbage.write_bytes(os.urandom(5000))
    return dict(v1=v1, v2=v2, v1_other=v1_other, other_class=other_class, untrusted=untrusted,
                tampered=tampered, garbage=garbage)


def _config(tmp: Path, keys, **kw) -> RegistryConfig:
    return RegistryConfig(db=tmp / "registry.db", blobs=tmp / "blobs", trusted_keys=[keys["public"]],
                          admin_token=ADMIN, **kw)


@pytest.fixture
def server(tmp_path, keys):
    with RegistryServer(_config(tmp_path, keys, max_bundle_bytes=64 * 1024)) as srv:
        yield srv


def _client(srv: RegistryServer, token: str = ADMIN) -> RegistryClient:
    return RegistryClient(ConnectionConfig(srv.address, token, insecure=True, timeout_s=10))


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(RegistryError) as e:
        fn()
    return e.value.code


def _snapshot(srv: RegistryServer) -> tuple:
    """Everything a bad request could change: rows, blobs, leftovers under incoming/."""
    store = srv.store
    releases = [(c, ch, [(r.version, r.sha256, r.current) for r in store.list_releases(c, ch)])
                for c in store.list_classes() for ch in ("canary", "stable")]
    devices = [(d.device_id, d.device_class, d.running_version, d.health, d.last_seen) for d in store.list_devices()]
    blobs = sorted(str(p.relative_to(store.blob_dir)) for p in store.blob_dir.rglob("*") if p.is_file())
    return releases, devices, blobs


# ------------------------------------------------------------------------------------ releases
def test_publish_list_promote_download_with_resume(server, bundles):
    admin = _client(server)
    reply = admin.publish(bundles["v1"])
    assert not reply.already_present and reply.release.version == "1.0.0"
    assert reply.release.sha256 == hashlib.sha256(bundles["v1"].read_bytes()).hexdigest()
    assert [r.version for r in admin.list_releases("cart", "canary")] == ["1.0.0"]
    assert admin.list_releases("cart", "stable") == []  # publish goes to canary only
    admin.publish(bundles["v2"])
    canary = admin.list_releases("cart", "canary")
    assert [(r.version, r.current) for r in canary] == [("1.1.0", True), ("1.0.0", False)]

    admin.promote("cart", "1.0.0")
    assert [(r.version, r.current) for r in admin.list_releases("cart", "stable")] == [("1.0.0", True)]
    admin.promote("cart", "1.1.0")
    admin.promote("cart", "1.0.0")  # promoting an older release again = fleet rollback
    assert [r.version for r in admin.list_releases("cart", "stable")] == ["1.0.0", "1.1.0"]

    data = bundles["v2"].read_bytes()
    buf = io.BytesIO()
    total, digest = admin.download("cart", "1.1.0", buf, chunk_size=1000)
    assert buf.getvalue() == data and total == len(data) and digest == hashlib.sha256(data).hexdigest()
    half = len(data) // 2
    resumed = io.BytesIO(data[:half])
    resumed.seek(half)
    admin.download("cart", "1.1.0", resumed, offset=half, chunk_size=777)
    assert resumed.getvalue() == data
    end = io.BytesIO()
    assert admin.download("cart", "1.1.0", end, offset=len(data))[0] == len(data) and end.getvalue() == b""
    assert _code(lambda: admin.download("cart", "1.1.0", io.BytesIO(), offset=len(data) + 1)) == grpc.StatusCode.OUT_OF_RANGE

    again = admin.publish(bundles["v1"])
    assert again.already_present


def test_bad_requests_get_the_right_status_and_change_nothing(server, bundles, keys):
    admin = _client(server)
    admin.publish(bundles["v1"])
    _, token = admin.enroll_device("scanner-1", "cart")
    _, other_token = admin.enroll_device("handheld-1", "handheld")
    device = _client(server, token)
    before = _snapshot(server)

    cases = {
        "tampered bundle": (lambda: admin.publish(bundles["tampered"]), grpc.StatusCode.INVALID_ARGUMENT),
        "untrusted signer": (lambda: admin.publish(bundles["untrusted"]), grpc.StatusCode.INVALID_ARGUMENT),
        "not a tarball": (lambda: admin.publish(bundles["garbage"]), grpc.StatusCode.INVALID_ARGUMENT),
        "same version, other bytes": (lambda: admin.publish(bundles["v1_other"]), grpc.StatusCode.ALREADY_EXISTS),
        "class differs from the signed one": (lambda: admin.publish(bundles["v2"], device_class="handheld"),
                                              grpc.StatusCode.INVALID_ARGUMENT),
        "wrong admin token": (lambda: _client(server, "x" * 40).publish(bundles["v2"]), grpc.StatusCode.UNAUTHENTICATED),
        "forged device token": (lambda: _client(server, "scanner-1.forged").list_releases("cart"),
                                grpc.StatusCode.UNAUTHENTICATED),
        "device token publishes": (lambda: device.publish(bundles["v2"]), grpc.StatusCode.PERMISSION_DENIED),
        "device token promotes": (lambda: device.promote("cart", "1.0.0"), grpc.StatusCode.PERMISSION_DENIED),
        "device token enrols": (lambda: device.enroll_device("x", "cart"), grpc.StatusCode.PERMISSION_DENIED),
        "device reads another class": (lambda: device.list_releases("handheld"), grpc.StatusCode.PERMISSION_DENIED),
        "device downloads another class": (lambda: _client(server, other_token).download("cart", "1.0.0", io.BytesIO()),
                                           grpc.StatusCode.PERMISSION_DENIED),
        "admin reports status": (lambda: admin.report_status("1.0.0", "healthy"), grpc.StatusCode.PERMISSION_DENIED),
        "unknown class (list)": (lambda: admin.list_releases("ultrasound-9000", "canary"), grpc.StatusCode.NOT_FOUND),
        "unknown class (promote)": (lambda: admin.promote("ultrasound-9000", "1.0.0"), grpc.StatusCode.NOT_FOUND),
        "unknown version": (lambda: admin.promote("cart", "7.7.7"), grpc.StatusCode.NOT_FOUND),
        "unknown device class (devices)": (lambda: admin.list_devices("ultrasound-9000"), grpc.StatusCode.NOT_FOUND),
        "bad device id": (lambda: admin.enroll_device("../etc", "cart"), grpc.StatusCode.INVALID_ARGUMENT),
        "device id taken": (lambda: admin.enroll_device("scanner-1", "cart"), grpc.StatusCode.ALREADY_EXISTS),
        "bad version in report": (lambda: device.report_status("../1", "healthy"), grpc.StatusCode.INVALID_ARGUMENT),
    }
    for what, (call, expected) in cases.items():
        assert _code(call) == expected, what
    assert _snapshot(server) == before
    assert not any(server.store.incoming.iterdir()), "an upload left files behind"


def test_malformed_and_oversized_uploads(server, bundles):
    """Raw streams: header rules, size limits (declared, streamed, and one huge message)."""
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.RegistryStub(channel)
    md = (("authorization", f"Bearer {ADMIN}"),)
    data = bundles["v1"].read_bytes()
    before = _snapshot(server)

    def upload(*messages) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as e:
            stub.Publish(iter(messages), metadata=md, timeout=10)
        return e.value.code()

    H = lambda **kw: pb.PublishChunk(header=pb.PublishHeader(**kw))  # noqa: E731
    D = lambda b: pb.PublishChunk(data=b)  # noqa: E731
    assert upload(D(data)) == grpc.StatusCode.INVALID_ARGUMENT  # no header
    assert upload(H(), H(), D(data)) == grpc.StatusCode.INVALID_ARGUMENT  # two headers
    assert upload(H()) == grpc.StatusCode.INVALID_ARGUMENT  # no bytes
    assert upload(H(total_size=len(data) + 10), D(data)) == grpc.StatusCode.INVALID_ARGUMENT  # truncated
    assert upload(H(total_size=10**9), D(data)) == grpc.StatusCode.RESOURCE_EXHAUSTED  # declared too big
    chunks = [D(os.urandom(16 * 1024)) for _ in range(6)]  # 96 KiB > the 64 KiB limit, undeclared
    assert upload(H(), *chunks) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert upload(H(), D(b"\0" * (5 * 1024 * 1024))) == grpc.StatusCode.RESOURCE_EXHAUSTED  # one message too big
    with pytest.raises(grpc.RpcError) as e:
        stub.ListReleases(pb.ListReleasesRequest(device_class="cart"), metadata=(("authorization", "Basic x"),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()
    assert _snapshot(server) == before
    assert not any(server.store.incoming.iterdir())


# ------------------------------------------------------------------------------------ devices
def test_device_tokens_are_stored_hashed_and_can_be_revoked(server, bundles):
    admin = _client(server)
    admin.publish(bundles["v1"])
    device_rec, token = admin.enroll_device("scanner-7", "cart")
    assert device_rec.device_class == "cart" and token.startswith("scanner-7.")
    device = _client(server, token)
    device.report_status("1.0.0", "healthy", "ok", "stable")
    listed = {d.device_id: d for d in admin.list_devices()}
    assert listed["scanner-7"].running_version == "1.0.0" and listed["scanner-7"].health == pb.HEALTHY
    assert abs(listed["scanner-7"].last_seen - time.time()) < 30

    secret = token.split(".", 1)[1]
    raw = b"".join(p.read_bytes() for p in server.cfg.db.parent.glob("registry.db*"))
    assert secret.encode() not in raw and token.encode() not in raw
    with sqlite3.connect(server.cfg.db) as db:
        (stored,) = db.execute("SELECT token_sha256 FROM devices WHERE device_id = 'scanner-7'").fetchone()
    assert stored == hashlib.sha256(secret.encode()).hexdigest()

    admin.remove_device("scanner-7")
    assert _code(lambda: device.list_releases("cart")) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: admin.remove_device("scanner-7")) == grpc.StatusCode.NOT_FOUND


def test_restart_keeps_releases_devices_and_tokens(tmp_path, keys, bundles):
    cfg = _config(tmp_path, keys)
    with RegistryServer(cfg) as srv:
        admin = _client(srv)
        admin.publish(bundles["v1"])
        admin.publish(bundles["v2"])
        admin.promote("cart", "1.0.0")
        _, token = admin.enroll_device("scanner-1", "cart")
        _client(srv, token).report_status("1.0.0", "unhealthy", "self-test failed", "stable")
        before = _snapshot(srv)
    with RegistryServer(cfg) as srv:  # same files, new process state
        assert _snapshot(srv) == before
        device = _client(srv, token)
        assert device.current_release("cart", "stable").version == "1.0.0"
        assert device.current_release("cart", "canary").version == "1.1.0"
        buf = io.BytesIO()
        device.download("cart", "1.1.0", buf)
        assert buf.getvalue() == bundles["v2"].read_bytes()
        (d,) = _client(srv).list_devices("cart")
        assert (d.running_version, d.health, d.message) == ("1.0.0", pb.UNHEALTHY, "self-test failed")


# ------------------------------------------------------------------------------------ TLS
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from server.certs.pki import init_ca, issue_server_cert

    d = tmp_path_factory.mktemp("pki")
    init_ca(d / "ca")
    init_ca(d / "other-ca")
    issue_server_cert(d / "ca", d / "server", ["localhost", "127.0.0.1"])
    return d


def test_tls_with_pinned_ca_works_and_plaintext_or_other_ca_fails(tmp_path, keys, bundles, pki):
    cfg = _config(tmp_path, keys, tls_cert=pki / "server" / "server.crt", tls_key=pki / "server" / "server.key")
    with RegistryServer(cfg) as srv:
        for host in ("127.0.0.1", "localhost"):
            client = RegistryClient(ConnectionConfig(f"{host}:{srv.port}", ADMIN, ca=pki / "ca" / "ca.crt", timeout_s=10))
            client.publish(bundles["v1"])
            assert client.current_release("cart", "canary").version == "1.0.0"
            client.close()
        plaintext = RegistryClient(ConnectionConfig(srv.address, ADMIN, insecure=True, timeout_s=5))
        assert _code(lambda: plaintext.list_releases("cart")) == grpc.StatusCode.UNAVAILABLE
        wrong_ca = RegistryClient(ConnectionConfig(srv.address, ADMIN, ca=pki / "other-ca" / "ca.crt", timeout_s=5))
        assert _code(lambda: wrong_ca.list_releases("cart")) == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------------------------ proto
def test_committed_grpc_modules_match_the_proto(tmp_path):
    """The committed modules were generated from the current registry.proto (compared as descriptors,
    so another grpcio-tools version with different boilerplate does not matter)."""
    pytest.importorskip("grpc_tools")
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    proto = "server/registry/proto/registry.proto"
    out = tmp_path / "registry.desc"
    assert protoc.main(["protoc", f"-I{REPO}", f"--descriptor_set_out={out}", str(REPO / proto)]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in fresh.message_type:  # protoc adds json_name here; the python generator drops it
        for f in message.field:
            f.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    hint = "stale generated modules: run `.venv/bin/python -m server.registry.proto.regenerate`"
    assert committed == fresh, hint
    grpc_module = (REPO / "server" / "registry" / "proto" / "registry_pb2_grpc.py").read_text()
    for method in fresh.service[0].method:
        assert f"'/echofleet.registry.v1.Registry/{method.name}'" in grpc_module, hint


# ------------------------------------------------------------------------------------ CLI
def test_registry_cli_publish_promote_devices(server, bundles, monkeypatch):
    from echofleet.cli.registry import registry_app

    app = typer.Typer()
    app.add_typer(registry_app, name="registry")
    runner = CliRunner()
    monkeypatch.setenv("ECHOFLEET_REGISTRY_ADMIN_TOKEN", ADMIN)
    conn = ["--registry", server.address, "--insecure"]

    r = runner.invoke(app, ["registry", "publish", str(bundles["v1"]), *conn])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["registry", "promote", "-c", "cart", "-v", "1.0.0", *conn])
    assert r.exit_code == 0 and "current stable" in r.output, r.output
    r = runner.invoke(app, ["registry", "list", "-c", "cart", *conn])
    assert r.exit_code == 0 and "1.0.0" in r.output, r.output
    r = runner.invoke(app, ["registry", "devices", "add", "cart-017", "-c", "cart", *conn])
    assert r.exit_code == 0, r.output
    token = r.output.strip().splitlines()[-1]
    assert token.startswith("cart-017.")
    _client(server, token).report_status("1.0.0", "healthy", "fine", "stable")
    r = runner.invoke(app, ["registry", "devices", "list", *conn])
    assert r.exit_code == 0 and "cart-017" in r.output and "healthy" in r.output, r.output
    r = runner.invoke(app, ["registry", "promote", "-c", "nope", "-v", "1", *conn])
    assert r.exit_code == 1 and "NOT_FOUND" in r.output
    monkeypatch.setenv("ECHOFLEET_REGISTRY_ADMIN_TOKEN", "wrong-token-wrong-token")
    r = runner.invoke(app, ["registry", "publish", str(bundles["v2"]), *conn])
    assert r.exit_code == 1 and "UNAUTHENTICATED" in r.output
    assert [x.version for x in _client(server).list_releases("cart", "canary")] == ["1.0.0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_runs_tls_and_stops_on_sigterm(tmp_path, keys, bundles, pki):
    port = _free_port()
    env = {**os.environ, "ECHOFLEET_REGISTRY_ADMIN_TOKEN": ADMIN}
    cmd = [sys.executable, "-c", "from echofleet.cli.registry import registry_app; registry_app()", "serve",
           "--db", str(tmp_path / "r.db"), "--blobs", str(tmp_path / "blobs"), "--port", str(port),
           "--tls-cert", str(pki / "server" / "server.crt"), "--tls-key", str(pki / "server" / "server.key"),
           "--trusted-key", str(keys["public"])]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = RegistryClient(ConnectionConfig(f"localhost:{port}", ADMIN, ca=pki / "ca" / "ca.crt", timeout_s=5))
        deadline = time.monotonic() + 30
        while True:
            try:
                client.publish(bundles["v1"])
                break
            except RegistryError as e:
                if e.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        assert client.current_release("cart", "canary").version == "1.0.0"
        client.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert "TLS" in out and "published cart 1.0.0" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # missing TLS flags without --insecure is refused up front
    bad = subprocess.run(cmd[:3] + ["serve", "--trusted-key", str(keys["public"]), "--port", "0"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--tls-cert" in bad.stderr
