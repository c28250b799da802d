"""A real Flower deployment on loopback (echofleet.deploy, run by examples/deploy-localhost/run.py;
documented in docs/deploy.md).

1. The example end to end: CA + TLS SuperLink with SuperNode authentication, a SQLite state file and
   runtime dependency installation disabled; 2 registered SuperNodes with site policies; a 2-round
   ``flwr run``; the coordinator's run report with every site's privacy figures; every process stopped.
2. What the SuperLink refuses: a SuperNode whose key was never registered, and plaintext connections
   (the Flower CLI and a SuperNode), each next to the same call that works (registered key / TLS), so
   the refusals cannot pass by accident.

Every process runs in its own process group inside a temp run dir and is stopped on failure too; the
tests then look for any process left whose command line or environment names the run dir (there must
be none) and kill it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from echofleet.deploy import DeployConfig, Deployment

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "deploy-localhost" / "run.py"
APP_CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
# The coordinator whitens features with a projection computed from 300 public phantoms, and every
# hospital recomputes it (minutes on 2 cores). `flwr run` only accepts overrides of keys listed in
# pyproject's [tool.flwr.app.config]; where the app lists them, the test asks for a 16-dim projection
# from 24 reference phantoms (more images than dimensions): the same path, a fraction of the encoding.
CHEAP_OVERRIDES = {"feature-projection": 16,
                   "projection-reference": "phantom:24?profiles=linear-a,convex-b,linear-c&seed=9001"}
# The smallest federation that still averages: each hospital is a SuperNode and a ClientApp process that
# imports torch and encodes its images, so 2 hospitals (30 phantoms each, as 3 of the default 90 had)
# cost two thirds of 3 and exercise the same code.
SITES = 2
DATA = f"phantom:{30 * SITES}?profiles=linear-a,convex-b,linear-c&seed=0"


def _alive_leftovers(run_dir: Path) -> list[tuple[int, str]]:
    """Live processes whose command line or environment names ``run_dir``, other than this test's own:
    the example's SuperLink and SuperNodes and every helper Flower starts for them (flower-superexec,
    flwr-serverapp, flwr-clientapp inherit ``FLWR_HOME`` inside the run dir)."""
    alive = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if (str(run_dir) in cmdline or str(run_dir) in environ) and state != "Z":
            alive.append((int(proc.name), cmdline[:200]))
    return alive


def _kill_leftovers(run_dir: Path) -> None:
    for pid, _ in _alive_leftovers(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.timeout(1300)
def test_example_runs_a_two_round_federation_and_stops_everything(tmp_path):
    run_dir = tmp_path / "deploy"
    # the training runs under SecAgg+ (issue 9): the coordinator sees only the sum of the hospitals' updates
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**CHEAP_OVERRIDES, "secure-aggregation": True}.items() if k in APP_CONFIG]
    cmd = [sys.executable, str(EXAMPLE), "--run-dir", str(run_dir), "--sites", str(SITES), "--data", DATA,
           "--rounds", "2", "--timeout", "900", *[a for o in overrides for a in ("-c", o)]]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=1100)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # the example stops its processes on SIGINT
        out, _ = proc.communicate(timeout=90)
        pytest.fail(f"the example did not finish in time:\n{out[-4000:]}")
    finally:
        leftovers = _alive_leftovers(run_dir)
        _kill_leftovers(run_dir)
    assert proc.returncode == 0, out[-6000:]
    assert leftovers == [], f"processes still running after the example exited: {leftovers}"

    # the coordinator's run report: 2 rounds, every site trained with DP and reported its privacy figures
    fed = run_dir / "coordinator" / "federation"
    report = json.loads((fed / "report.json").read_text())
    assert report["num_rounds"] == 2 and report["rounds_completed"] == 2
    rounds = {r["round"]: r for r in report["rounds"]}
    assert set(rounds) == {0, 1, 2}
    sites = {f"site-{k}" for k in range(SITES)}
    for rnd in (1, 2):
        assert set(rounds[rnd]["sites"]) == sites and rounds[rnd]["excluded"] == []
        for site, entry in rounds[rnd]["sites"].items():
            assert entry["status"] == "ok", (site, entry)
            p = entry["privacy"]
            assert p["accountant"] == "rdp"
            assert 0 < p["epsilon"] <= 8.0 * 1.01 and 0 < p["delta"] < 1e-3
            # real hospitals keep the private defaults: the accountant's inputs (which reveal N) stay at the site
            assert p["steps"] is None and p["noise_multiplier"] is None and p["sample_rate"] is None
        # SecAgg+ over TLS: every hospital's masked update summed (each weighs the fixed 1, inside the sum)
        secure = rounds[rnd]["aggregated"]["train"]
        assert secure["secure_aggregation"] == 1 and secure["sites_summed"] == SITES and "rejected" not in secure, secure
    for site in sites:  # the budget is spent cumulatively over the rounds
        assert rounds[2]["sites"][site]["privacy"]["epsilon"] > rounds[1]["sites"][site]["privacy"]["epsilon"]
    model = json.loads((fed / "global" / "model.json").read_text())
    assert json.dumps(model).count("site-") >= SITES and (fed / "global" / "head.safetensors").is_file()

    # every process the example started has exited; Flower's state stayed inside the run dir
    deployment = json.loads((run_dir / "deployment.json").read_text())
    assert {p["name"] for p in deployment["processes"]} == {"superlink"} | {f"supernode-{s}" for s in sites}
    assert all(p["returncode"] is not None for p in deployment["processes"]), deployment["processes"]
    assert (run_dir / "coordinator" / "superlink-state.db").stat().st_size > 0
    assert (run_dir / "coordinator" / "flwr-home" / "config.toml").is_file()
    for site in sites:  # each SuperNode installed the app (FAB) into its own FLWR_HOME
        assert any((run_dir / "hospitals" / site / "flwr-home").rglob("pyproject.toml")), site
    superlink_log = (run_dir / "logs" / "superlink.log").read_text()
    for h in deployment["hospitals"]:
        assert f"Activated node_id={h['node_id']}" in superlink_log, h["name"]
    assert "epsilon" in out and "report:" in out  # the printed summary


@pytest.mark.timeout(400)
def test_superlink_refuses_unregistered_and_plaintext_and_keeps_registrations(tmp_path):
    cfg = DeployConfig(run_dir=tmp_path / "refusals", sites=2, startup_timeout=90)
    cfg.run_dir.mkdir()
    try:
        with Deployment(cfg) as d:
            d.prepare_coordinator()
            for h in d.hospitals:
                d.prepare_hospital(h)
            registered, stranger = d.hospitals  # the stranger made a key pair the coordinator never registered
            d.start_superlink()
            d.register(registered)

            # control: the registered key gets in over TLS
            d.start_supernode(registered)
            d.wait_online([registered.name])

            # (a) an unregistered SuperNode is refused by the SuperLink and gives up ...
            refused = d.start_supernode(stranger, max_wait=20)
            assert refused.popen.wait(timeout=120) != 0
            assert "Failed to activate SuperNode" in refused.log.read_text()
            assert "No SuperNode found with the given public key" in (d.run_dir / "logs" / "superlink.log").read_text()
            # ... and so is one that presents no key at all (what --enable-supernode-auth adds: without
            # the flag such a SuperNode is let in; measured with Flower 1.42)
            keyless = d.start(f"supernode-{stranger.name}-keyless", d.supernode_command(stranger, key=False, max_wait=20),
                              stranger.root, stranger.flwr_home)
            assert keyless.popen.wait(timeout=120) != 0
            assert "SuperNode authentication is enabled" in keyless.log.read_text()
            assert d.nodes() == {d.node_ids[registered.name]: "online"}

            # (b) plaintext: the CLI over an insecure connection fails where the TLS one works ...
            d.write_connection("plaintext", insecure=True)
            plain = d.flwr("supernode", "list", connection="plaintext", check=False, timeout=120)
            assert not plain.ok and "unavailable" in plain.reason.lower(), plain
            assert d.flwr("supernode", "list").ok
            # ... a SuperNode dialing plaintext HTTP cannot even reach the Fleet API ...
            plain_node = d.start(f"supernode-{stranger.name}-plaintext",
                                 d.supernode_command(stranger, tls=False, key=False, max_wait=15),
                                 stranger.root, stranger.flwr_home)
            assert plain_node.popen.wait(timeout=120) != 0
            assert "Failed to initialize the connection to the SuperLink" in plain_node.log.read_text()
            # ... and a SuperNode asked to authenticate over plaintext refuses by itself (auth needs TLS)
            keyed = d.start(f"supernode-{stranger.name}-plaintext-keyed",
                            d.supernode_command(stranger, tls=False, max_wait=15), stranger.root, stranger.flwr_home)
            assert keyed.popen.wait(timeout=120) != 0
            assert "TLS is not enabled" in keyed.log.read_text()
            assert d.nodes() == {d.node_ids[registered.name]: "online"}

            # (c) the registration lives in the SQLite state (--database): after a SuperLink restart on
            # the same file the node is still known and the running SuperNode comes back online
            superlink = next(p for p in d.processes if p.name == "superlink")
            assert d.stop(superlink) is not None
            d.start_superlink()
            d.wait_online([registered.name])
            assert d.nodes() == {d.node_ids[registered.name]: "online"}
    finally:
        _kill_leftovers(cfg.run_dir)
    assert _alive_leftovers(cfg.run_dir) == []
