"""The scanner side, attacked (issue 10, item 6): a malicious registry's release names, a device
whose disk fails mid-download, and ``edge bench`` on a bundle nobody verified.

The registry is a small in-process fake (no gRPC): what it announces is exactly what a compromised
registry could send, and it records every download the agent asks for.
"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from echocare.bundle import generate_keypair
from edge.device.agent import Agent, AgentConfig, CycleResult
from server.registry.proto import registry_pb2 as pb
from server.registry.sample_bundle import make_classifier_bundle

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("hardening")
    private, public = generate_keypair(d / "release")
    tarball = make_classifier_bundle(d / "dist", private, "1.0.0", seed=1)
    return {"public": public, "tarball": tarball, "data": tarball.read_bytes()}


class FakeRegistry:
    """Announces ``announced`` as the current release and serves ``data``; ``fail_writes`` downloads
    hit an ``OSError`` (ENOSPC) on the agent's first write."""

    def __init__(self, announced: pb.Release, data: bytes, fail_writes: int = 0):
        self.announced, self.data, self.fail_writes = announced, data, fail_writes
        self.download_paths: list[Path] = []
        self.reports: list[tuple[str, str, str]] = []

    def current_release(self, device_class: str, channel: str = "stable") -> pb.Release:
        return self.announced

    def download(self, device_class, version, out, offset=0, chunk_size=0, on_progress=None):
        self.download_paths.append(Path(out.name).resolve())
        if self.fail_writes > 0:
            self.fail_writes -= 1
            out.write(self.data[offset:offset + 100])  # some bytes land, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        out.write(self.data[offset:])
        return len(self.data), hashlib.sha256(self.data).hexdigest()

    def report_status(self, running_version: str, health: str, message: str, channel: str) -> None:
        self.reports.append((running_version, health, message))

    def close(self) -> None:
        pass


def _agent(root: Path, public: Path, client: FakeRegistry, **kw) -> Agent:
    cfg = AgentConfig(registry="127.0.0.1:1", device_class="cart", pubkey=public, dir=root, token="cart-1.x",
                      insecure=True, interval_s=30.0, backoff_initial_s=1.0, backoff_max_s=4.0)
    return Agent(cfg, client=client, self_test=lambda p: (True, "self-test ok"), **kw)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# ----------------------------------------------------------------- registry-supplied names
@pytest.mark.parametrize("version, sha, problem", [
    ("../../outside", None, "version '../../outside' is not a bundle version"),
    ("..", None, "version '..' is not a bundle version"),
    ("1.0/../../x", None, "is not a bundle version"),
    ("1.0.0\n", None, "is not a bundle version"),
    ("1.0.0", "../../outside" + "0" * 51, "is not 64 lowercase hex digits"),
    ("1.0.0@other-class", None, "announced a release of device class 'handheld', this is 'cart'"),
])
def test_a_malicious_release_name_is_refused_before_anything_is_written(tmp_path, release, version, sha, problem):
    data = release["data"]
    version, _, other_class = version.partition("@")
    announced = pb.Release(device_class="handheld" if other_class else "cart", version=version, sha256=sha or hashlib.sha256(data).hexdigest(),
                           size=len(data))
    fake = FakeRegistry(announced, data)
    device = tmp_path / "fleet" / "dev"
    with _agent(device, release["public"], fake) as agent:
        before_outside = _files(tmp_path) - {p for p in _files(tmp_path) if p.startswith("fleet/dev")}
        before_device = _files(device)
        result = agent.run_once()
    assert fake.download_paths == [], f"the agent downloaded to {fake.download_paths}"
    assert result.action == "refused" and result.health == "unhealthy", result
    assert problem in result.message and "nothing was written" in result.message, result.message
    assert fake.reports and fake.reports[-1][1] == "unhealthy"  # the registry's operator sees why
    after = _files(tmp_path)
    assert after - {p for p in after if p.startswith("fleet/dev")} == before_outside  # nothing outside the device dir
    assert _files(device) == before_device  # and nothing inside it either (no state, no download, no folder)


def test_a_bad_device_class_in_the_config_is_refused(tmp_path, release):
    with pytest.raises(ValueError, match=r"device class '\.\./x'"):
        AgentConfig(registry="127.0.0.1:1", device_class="../x", pubkey=release["public"], dir=tmp_path, token="t")


# ----------------------------------------------------------------- a failing disk
def test_the_loop_survives_a_full_disk_with_bounded_backoff(tmp_path, release):
    data = release["data"]
    announced = pb.Release(device_class="cart", version="1.0.0", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    fake = FakeRegistry(announced, data, fail_writes=4)
    outcomes: list = []
    delays: list[float] = []

    with _agent(tmp_path / "dev", release["public"], fake, sleep=delays.append) as agent:
        def on_cycle(outcome):
            outcomes.append(outcome)
            if isinstance(outcome, CycleResult) or len(outcomes) > 10:
                agent.stop()

        agent.run_forever(on_cycle=on_cycle)  # raised OSError (and the loop died) before the fix
        running = agent.running_version()

    assert [type(o).__name__ for o in outcomes] == ["OSError"] * 4 + ["CycleResult"], outcomes
    assert all(o.errno == errno.ENOSPC for o in outcomes[:4])
    assert outcomes[-1].action == "installed" and running == "1.0.0"
    # exponential, jittered into [d/2, d] with d = min(4, 1 * 2**n): 1, 2, 4, 4 (bounded)
    for n, delay in enumerate(delays):
        d = min(4.0, 2.0 ** n)
        assert d / 2 <= delay <= d, (n, delays)
    assert len(delays) == 4  # stop() after the install: no sleep after it
    # every failed write stayed inside the device's downloads/ folder and the download resumed
    assert all(p.parent == (tmp_path / "dev" / "downloads").resolve() for p in fake.download_paths)
    assert len(fake.download_paths) == 5


# ----------------------------------------------------------------- edge bench needs a key
def test_edge_bench_refuses_an_unverified_bundle(release, tmp_path, monkeypatch):
    from echofleet.cli import app

    monkeypatch.delenv("ECHOFLEET_PUBKEY", raising=False)
    runner = CliRunner()
    r = runner.invoke(app, ["edge", "bench", str(release["tarball"]), "--iters", "1", "--no-peak"])
    assert r.exit_code == 2, r.output
    assert "no --pubkey (or ECHOFLEET_PUBKEY): refusing to run an unverified bundle" in r.output
    # the same message as `edge infer`
    r2 = runner.invoke(app, ["edge", "infer", str(release["tarball"]), str(release["tarball"])])
    assert r2.exit_code == 2 and r.output.strip() == r2.output.strip(), (r.output, r2.output)
    # and a key from the environment is used: the wrong one refuses the bundle before any model runs
    _, other = generate_keypair(tmp_path / "other")
    monkeypatch.setenv("ECHOFLEET_PUBKEY", str(other))
    r3 = runner.invoke(app, ["edge", "bench", str(release["tarball"]), "--iters", "1", "--no-peak"])
    assert r3.exit_code == 1 and "REFUSED" in r3.output and "signature" in r3.output, r3.output


def test_edge_agent_cli_refuses_a_device_class_that_is_not_a_name(release, tmp_path):
    from echofleet.cli import app

    r = CliRunner().invoke(app, ["edge", "agent", "--registry", "127.0.0.1:1", "--device-class", "../x",
                                 "--pubkey", str(release["public"]), "--dir", str(tmp_path / "dev"), "--token", "a.b",
                                 "--insecure", "--once"])
    assert r.exit_code == 2 and "device class '../x'" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "dev").exists()
