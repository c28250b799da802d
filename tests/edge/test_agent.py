"""The scanner agent against a real registry on loopback, with real signed bundles and the real
edge runtime self-test (ONNX Runtime / OpenVINO on a tiny ONNX classifier).

Covered: two agents updating on publish and on promote, tampered releases refused by the agent,
failed self-tests rolled back, resumed downloads, registry downtime (backoff, then recovery), crash
recovery between the switch and the self-test, the directory lock, and the `edge agent` CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import pytest
import typer
from typer.testing import CliRunner

from edge.device.agent import Agent, AgentConfig, AgentError, Backoff
from echocare.bundle import generate_keypair, verify_bundle
from server.registry.client import ConnectionConfig, RegistryClient, RegistryError
from server.registry.proto import registry_pb2 as pb
from server.registry.sample_bundle import make_classifier_bundle
from server.registry.service import RegistryConfig, RegistryServer

pytestmark = pytest.mark.timeout(120)
ADMIN = "admin-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair(d / "release")
    return {"private": private, "public": public}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, keys):
    d = tmp_path_factory.mktemp("bundles")
    make = lambda v, **kw: make_classifier_bundle(d / v, keys["private"], v, **kw)  # noqa: E731
    return {
        "1.0.0": make("1.0.0", seed=1),
        "1.1.0": make("1.1.0", seed=2),
        "1.2.0": make("1.2.0", seed=3),
        "broken": make("2.0.0-bad", broken=True, seed=4),
        "big": make("3.0.0", seed=5, payload_bytes=300_000),
    }


class Fleet:
    """A registry plus helpers to enrol devices and build agents for them."""

    def __init__(self, root: Path, keys: dict, port: int = 0):
        self.root, self.keys = root, keys
        self.cfg = RegistryConfig(db=root / "reg" / "registry.db", blobs=root / "reg" / "blobs",
                                  trusted_keys=[keys["public"]], admin_token=ADMIN, port=port, chunk_size=64 * 1024)
        self.server = RegistryServer(self.cfg).start()
        self.admin = RegistryClient(ConnectionConfig(self.server.address, ADMIN, insecure=True, timeout_s=10))
        self.agents: list[Agent] = []

    def agent(self, device_id: str, channel: str = "stable", device_class: str = "cart", **kw) -> Agent:
        _, token = self.admin.enroll_device(device_id, device_class)
        return self.agent_with_token(device_id, token, channel, device_class, **kw)

    def agent_with_token(self, device_id: str, token: str, channel: str = "stable", device_class: str = "cart",
                         address: str | None = None, **kw) -> Agent:
        agent_kw = {k: kw.pop(k) for k in ("self_test", "client", "sleep") if k in kw}
        cfg = AgentConfig(registry=address or self.server.address, device_class=device_class,
                          pubkey=self.keys["public"], dir=self.root / "devices" / device_id, token=token,
                          insecure=True, channel=channel, timeout_s=5, **kw)
        agent = Agent(cfg, **agent_kw)
        self.agents.append(agent)
        return agent

    def device(self, device_id: str):
        return {d.device_id: d for d in self.admin.list_devices()}[device_id]

    def close(self) -> None:
        for agent in self.agents:
            agent.close()
        self.admin.close()
        self.server.stop(grace=0.5)


@pytest.fixture
def fleet(tmp_path, keys):
    f = Fleet(tmp_path, keys)
    yield f
    f.close()


def _running(agent: Agent) -> str | None:
    """The version behind DIR/current, after checking the installed bundle is complete and signed."""
    if not agent.current_link.exists():
        return None
    return verify_bundle(agent.current_link, agent.public_key)["version"]


# ------------------------------------------------------------------------------ updates
def test_two_polling_agents_both_update_after_a_publish(fleet, bundles):
    agents = [fleet.agent("cart-a", channel="canary", interval_s=0.2), fleet.agent("cart-b", channel="canary", interval_s=0.2)]
    outcomes: list = []
    threads = [threading.Thread(target=a.run_forever, kwargs={"on_cycle": outcomes.append}, daemon=True) for a in agents]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)  # both poll an empty channel first
        assert all(_running(a) is None for a in agents)
        fleet.admin.publish(bundles["1.0.0"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            fleet.device(i).running_version == "1.0.0" for i in ("cart-a", "cart-b")
        ):
            time.sleep(0.1)  # installed, then reported
        assert [_running(a) for a in agents] == ["1.0.0", "1.0.0"]
    finally:
        for a in agents:
            a.stop()
        for t in threads:
            t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert not any(isinstance(o, RegistryError) for o in outcomes), outcomes
    for device_id in ("cart-a", "cart-b"):
        d = fleet.device(device_id)
        assert (d.running_version, d.health, d.channel) == ("1.0.0", pb.HEALTHY, pb.CANARY)
    for a in agents:
        a.close()


def test_canary_gets_a_release_first_and_stable_after_promote(fleet, bundles):
    canary, stable = fleet.agent("cart-c", channel="canary"), fleet.agent("cart-s", channel="stable")
    fleet.admin.publish(bundles["1.0.0"])
    assert canary.run_once().action == "installed"
    assert stable.run_once().action == "no-release" and _running(stable) is None
    fleet.admin.promote("cart", "1.0.0")
    assert stable.run_once().action == "installed" and _running(stable) == "1.0.0"

    fleet.admin.publish(bundles["1.1.0"])
    assert canary.run_once().action == "installed" and _running(canary) == "1.1.0"
    r = stable.run_once()
    assert (r.action, _running(stable)) == ("up-to-date", "1.0.0")
    fleet.admin.promote("cart", "1.1.0")
    assert stable.run_once().action == "installed" and _running(stable) == "1.1.0"
    # Re-promoting the older release rolls the stable fleet back to it.
    fleet.admin.promote("cart", "1.0.0")
    assert stable.run_once().action == "installed" and _running(stable) == "1.0.0"
    assert fleet.device("cart-s").running_version == "1.0.0"
    # Only the current bundle and its rollback target stay installed.
    assert len([p for p in stable.versions.iterdir() if p.is_dir()]) == 2


# ------------------------------------------------------------------------------ refusals
def _swap_blob(fleet: Fleet, version: str, data: bytes, update_row: bool) -> None:
    """Simulate a compromised registry: serve ``data`` for ``version`` (and, optionally, announce
    its real hash so the transfer check passes and only the signature check can catch it)."""
    store = fleet.server.store
    rel = store.get_release("cart", version)
    if not update_row:
        store.blob_path(rel.sha256).write_bytes(data)
        return
    sha = hashlib.sha256(data).hexdigest()
    path = store.blob_path(sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    with sqlite3.connect(fleet.cfg.db) as db:
        db.execute("UPDATE releases SET sha256 = ?, size = ? WHERE version = ?", (sha, len(data), version))


def _tampered(tarball: Path, tmp: Path) -> bytes:
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(tarball, "r:gz") as tin, tarfile.open(fileobj=out, mode="w:gz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isreg() else None
            if m.name.endswith("model.onnx"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def test_tampered_release_is_refused_by_the_registry_and_by_the_agent(fleet, bundles, tmp_path):
    agent = fleet.agent("cart-t", channel="canary")
    fleet.admin.publish(bundles["1.0.0"])
    assert agent.run_once().action == "installed"
    bad = _tampered(bundles["1.1.0"], tmp_path)
    (tmp_path / "bad.tar.gz").write_bytes(bad)
    with pytest.raises(RegistryError) as e:
        fleet.admin.publish(tmp_path / "bad.tar.gz")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT  # the registry refuses it

    # A compromised registry serves it anyway, announcing its true hash: the pinned key catches it.
    fleet.admin.publish(bundles["1.1.0"])
    _swap_blob(fleet, "1.1.0", bad, update_row=True)
    r = agent.run_once()
    assert r.action == "refused" and r.health == "unhealthy" and "sha256" in r.message
    assert _running(agent) == "1.0.0"
    assert not any(p.name.startswith("1.1.0") for p in agent.versions.iterdir())
    assert not list(agent.downloads.iterdir())
    d = fleet.device("cart-t")
    assert (d.running_version, d.health) == ("1.0.0", pb.UNHEALTHY) and "refused" in d.message
    assert agent.run_once().action == "skipped"  # not downloaded again


def test_corrupted_transfer_is_not_installed(fleet, bundles):
    agent = fleet.agent("cart-x", channel="canary")
    fleet.admin.publish(bundles["1.0.0"])
    agent.run_once()
    fleet.admin.publish(bundles["1.1.0"])
    data = bytearray(bundles["1.1.0"].read_bytes())
    data[100] ^= 0xFF
    _swap_blob(fleet, "1.1.0", bytes(data), update_row=False)  # bytes differ from the announced sha256
    with pytest.raises(RegistryError) as e:
        agent.run_once()
    assert e.value.code == grpc.StatusCode.DATA_LOSS and e.value.retryable
    assert _running(agent) == "1.0.0" and not list(agent.downloads.iterdir())


# ------------------------------------------------------------------------------ self-test
def test_failed_self_test_rolls_back_to_the_previous_bundle(fleet, bundles):
    agent = fleet.agent("cart-r", channel="canary")
    fleet.admin.publish(bundles["1.0.0"])
    assert agent.run_once().action == "installed"
    previous_target = os.readlink(agent.current_link)
    fleet.admin.publish(bundles["broken"])  # signed and intact, but its model disagrees with its sample

    r = agent.run_once()
    assert r.action == "rolled-back" and r.health == "unhealthy" and "self-test" in r.message
    assert os.readlink(agent.current_link) == previous_target and _running(agent) == "1.0.0"
    assert not any(p.name.startswith("2.0.0-bad") for p in agent.versions.iterdir())
    d = fleet.device("cart-r")
    assert (d.running_version, d.health) == ("1.0.0", pb.UNHEALTHY)
    assert agent.run_once().action == "skipped"

    fleet.admin.publish(bundles["1.1.0"])
    r = agent.run_once()
    assert r.action == "installed" and _running(agent) == "1.1.0"
    assert fleet.device("cart-r").health == pb.HEALTHY


def test_self_test_runs_on_the_switched_bundle_and_a_first_install_failure_leaves_nothing(fleet, bundles):
    seen: list[str] = []

    def crashing_self_test(current: Path) -> tuple[bool, str]:
        seen.append(json.loads((current / "manifest.json").read_text())["version"])
        raise RuntimeError("inference backend exploded")

    agent = fleet.agent("cart-f", channel="canary", self_test=crashing_self_test)
    fleet.admin.publish(bundles["1.0.0"])
    r = agent.run_once()
    assert seen == ["1.0.0"]  # the self-test saw the new bundle through `current`
    assert r.action == "rolled-back" and "exploded" in r.message
    assert not agent.current_link.exists() and not agent.current_link.is_symlink()
    assert [p for p in agent.versions.iterdir()] == []


def test_crash_between_switch_and_self_test_is_resolved_at_restart(fleet, bundles):
    agent = fleet.agent("cart-k", channel="canary")
    fleet.admin.publish(bundles["1.0.0"])
    agent.run_once()
    token = agent.cfg.token

    def killed(current: Path) -> tuple[bool, str]:
        raise KeyboardInterrupt  # the process dies while the new bundle is being tested

    agent.self_test = killed
    fleet.admin.publish(bundles["1.1.0"])
    with pytest.raises(KeyboardInterrupt):
        agent.run_once()
    agent.close()
    assert _running(agent) == "1.1.0"  # switched, not yet confirmed

    restarted = fleet.agent_with_token("cart-k", token, channel="canary",
                                       self_test=lambda current: (False, "sample mismatch"))
    assert _running(restarted) == "1.0.0"  # rolled back during recovery
    assert restarted.run_once().action == "skipped"
    restarted.close()


def test_lost_state_file_is_rebuilt_from_current(fleet, bundles):
    agent = fleet.agent("cart-z", channel="canary")
    fleet.admin.publish(bundles["1.0.0"])
    agent.run_once()
    token = agent.cfg.token
    agent.close()
    agent.state_path.unlink()
    restarted = fleet.agent_with_token("cart-z", token, channel="canary")  # re-tests `current`, keeps it
    r = restarted.run_once()
    assert (r.action, r.running_version, _running(restarted)) == ("up-to-date", "1.0.0", "1.0.0")


# ------------------------------------------------------------------------------ downloads
class DroppingClient(RegistryClient):
    """A client whose first download breaks after ``limit`` bytes, like a dropped connection."""

    def __init__(self, cfg: ConnectionConfig, limit: int):
        super().__init__(cfg)
        self.limit, self.offsets = limit, []

    def download(self, device_class, version, out, offset=0, chunk_size=0, on_progress=None):
        self.offsets.append(offset)
        if len(self.offsets) > 1:
            return super().download(device_class, version, out, offset, chunk_size, on_progress)

        def stop_early(pos: int, total: int) -> None:
            if pos >= self.limit:
                raise RegistryError(grpc.StatusCode.UNAVAILABLE, "connection dropped", "Download")

        return super().download(device_class, version, out, offset, chunk_size, stop_early)


def test_interrupted_download_resumes_from_the_part_file(fleet, bundles):
    _, token = fleet.admin.enroll_device("cart-d", "cart")
    client = DroppingClient(ConnectionConfig(fleet.server.address, token, insecure=True, timeout_s=10), limit=100_000)
    agent = fleet.agent_with_token("cart-d", token, channel="canary", client=client, chunk_size=32 * 1024)
    fleet.admin.publish(bundles["big"])
    with pytest.raises(RegistryError):
        agent.run_once()
    (part,) = agent.downloads.glob("*.part")
    kept = part.stat().st_size
    assert 100_000 <= kept < bundles["big"].stat().st_size
    assert part.read_bytes() == bundles["big"].read_bytes()[:kept]
    assert not agent.current_link.exists()

    r = agent.run_once()
    assert r.action == "installed" and r.resumed_from == kept and client.offsets == [0, kept]
    assert _running(agent) == "3.0.0" and not list(agent.downloads.iterdir())
    agent.close()


def test_a_corrupt_part_file_is_discarded_and_downloaded_again(fleet, bundles):
    agent = fleet.agent("cart-p", channel="canary")
    fleet.admin.publish(bundles["big"])
    sha = hashlib.sha256(bundles["big"].read_bytes()).hexdigest()
    (agent.downloads / f"3.0.0-{sha[:16]}.tar.gz.part").write_bytes(os.urandom(50_000))
    r = agent.run_once()
    assert r.action == "installed" and r.resumed_from == 0 and _running(agent) == "3.0.0"


# ------------------------------------------------------------------------------ downtime
def test_backoff_is_exponential_jittered_and_bounded():
    import random

    b = Backoff(initial_s=1.0, max_s=8.0, rng=random.Random(0))
    for attempt in range(12):
        d = min(8.0, 2.0**attempt)
        assert d / 2 <= b.delay(attempt) <= d
    assert len({round(b.delay(3), 6) for _ in range(20)}) > 1  # jittered


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_agent_survives_registry_downtime(tmp_path, keys, bundles):
    port = _free_port()
    fleet = Fleet(tmp_path, keys, port=port)
    fleet.admin.publish(bundles["1.0.0"])
    _, token = fleet.admin.enroll_device("cart-o", "cart")
    fleet.close()  # the registry goes down before the scanner ever reaches it

    delays: list[float] = []
    agent = fleet.agent_with_token("cart-o", token, channel="canary", address=f"127.0.0.1:{port}",
                                   backoff_initial_s=0.05, backoff_max_s=0.4, interval_s=0.2, sleep=delays.append)
    with pytest.raises(RegistryError) as e:
        agent.run_once_with_retries(max_attempts=4)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and len(delays) == 3
    assert all(0.025 <= d <= 0.4 for d in delays)
    agent.close()

    agent = fleet.agent_with_token("cart-o", token, channel="canary", address=f"127.0.0.1:{port}",
                                   backoff_initial_s=0.05, backoff_max_s=0.4, interval_s=0.2)
    outcomes: list = []
    thread = threading.Thread(target=agent.run_forever, kwargs={"on_cycle": outcomes.append}, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # several failed polls while the registry is down
        assert any(isinstance(o, RegistryError) for o in outcomes) and _running(agent) is None
        back = Fleet(tmp_path, keys, port=port)  # same database: the release is still there
        try:
            deadline = time.monotonic() + 30
            while back.device("cart-o").running_version != "1.0.0" and time.monotonic() < deadline:
                time.sleep(0.1)  # installed, then reported
            assert _running(agent) == "1.0.0"
            assert back.device("cart-o").running_version == "1.0.0"
        finally:
            agent.stop()
            thread.join(timeout=10)
            back.close()
    finally:
        agent.stop()
        agent.close()
    assert not thread.is_alive()


# ------------------------------------------------------------------------------ misc
def test_one_agent_per_directory(fleet):
    first = fleet.agent("cart-l")
    with pytest.raises(AgentError, match="another agent"):
        fleet.agent_with_token("cart-l", first.cfg.token)
    first.close()
    fleet.agent_with_token("cart-l", first.cfg.token).close()  # free again once closed


def test_agent_cli_once_exit_codes(fleet, bundles, keys, tmp_path, monkeypatch):
    from echofleet.cli.agent import agent as agent_command

    app = typer.Typer()
    app.command("agent")(agent_command)
    app.command("noop")(lambda: None)  # keep "agent" a sub-command
    runner = CliRunner()
    _, token = fleet.admin.enroll_device("cart-cli", "cart")
    args = ["agent", "--registry", fleet.server.address, "--device-class", "cart", "--pubkey", str(keys["public"]),
            "--dir", str(tmp_path / "cli-dev"), "--insecure", "--channel", "canary", "--once"]

    monkeypatch.setenv("ECHOFLEET_DEVICE_TOKEN", token)
    fleet.admin.publish(bundles["1.0.0"])
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "installed" in r.output, r.output
    fleet.admin.publish(bundles["broken"])
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "rolled-back" in r.output, r.output
    monkeypatch.setenv("ECHOFLEET_DEVICE_TOKEN", "cart-cli.wrong")
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "UNAUTHENTICATED" in r.output, r.output


def _auto_bundle(sample_tar: Path, out: Path, private_key: Path) -> Path:
    """The sample bundle re-signed as an auto (format /2) bundle with two precision candidates of its ONNX."""
    import tarfile

    from echocare.bundle import FORMAT_CANDIDATES, write_bundle

    with tarfile.open(sample_tar) as tar:
        tar.extractall(out / "src", filter="data")
    src = next((out / "src").iterdir())
    m = json.loads((src / "manifest.json").read_text())
    gate = {"metric": "top1_agreement", "drop": 0.0, "bound": 0.0, "passed": True, "reason": "sample"}
    m["format"], m["version"], m["precision"] = FORMAT_CANDIDATES, "4.0.0", "auto"
    m["candidates"] = [{"name": n, "path": "model.onnx", "precision": "fp32", "inference_precision": ip, "gate": gate,
                        "metrics": {}, "build_p50_ms": 0.1} for n, ip in (("fp32", "f32"), ("bf16", "bf16"))]
    expected = m["selftest"]["outputs"].pop("model.onnx")
    m["selftest"]["outputs"] = {"fp32": expected, "bf16": expected}
    m["selftest"]["tolerance"] = {"probability_atol": 0.05}
    files = {a["path"]: src / a["path"] for a in m["artifacts"]}
    return write_bundle(out, m, files, private_key)


def test_agent_times_an_auto_bundle_at_install_records_and_reports_the_choice(fleet, bundles, keys, tmp_path):
    tar = _auto_bundle(bundles["1.0.0"], tmp_path, keys["private"])
    agent = fleet.agent("cart-auto", channel="canary")
    fleet.admin.publish(tar)
    r = agent.run_once()
    assert r.action == "installed", r.message
    rec = json.loads((agent.root / "precision.json").read_text())
    assert rec["candidate"] in ("fp32", "bf16") and rec["bundle"] == "tiny-classifier-4.0.0" and "fastest" in rec["reason"]
    assert set(rec["timings_ms"]) | set(rec["skipped"]) == {"fp32", "bf16"}
    assert f"precision candidate {rec['candidate']}" in r.message
    assert f"precision candidate {rec['candidate']}" in fleet.device("cart-auto").message  # reported to the registry
    again = agent.run_once()  # later polls keep reporting the choice
    assert again.action == "up-to-date" and f"precision candidate {rec['candidate']}" in fleet.device("cart-auto").message
