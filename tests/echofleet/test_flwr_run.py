"""``flwr run .`` as a Flower user runs it, and the two things that made it fail before:

1. a simulated SuperNode without a site policy gets a clearly labelled phantom default policy;
2. a federation in which no site trains ends cleanly (report, clear reason, no global model)
   instead of crashing in ``save_task_model``.

The end-to-end test starts Flower's managed local SuperLink (fresh ``FLWR_HOME`` and its own ports
inside the test), with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` as docs/federation.md
says, and proves no dependency was installed; it stops every process it caused at the end.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fed.client_app import phantom_default_policy, policy_from_context
from fed.config import PHANTOM_DATA, RunConfig
from server.coordinator.server_app import main, run_federation

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.xdist_group("flower")  # starts a Flower federation: one worker runs them all (tests/conftest.py)
NO_POLICY = "no site policy: start the SuperNode with --node-config 'policy=\"/path/policy.toml\"'"


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower messages need a task identity (the simulation engine sets one the same way)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield


class _EverySiteFails:
    """A Grid whose every SuperNode answers each message with an error, as a site without a policy did."""

    def __init__(self, node_ids: list[int]):
        self.node_ids, self.sent = node_ids, 0

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        messages = list(messages)
        self.sent += len(messages)
        return [Message(Error(0, f"ClientAppException: {NO_POLICY}"), reply_to=m) for m in messages]


def _cheap(tmp_path: Path, **kw) -> RunConfig:
    # feature-projection 0: no public projection to compute (it is not what is tested here)
    return RunConfig(**{"run_dir": str(tmp_path / "run"), "feature_projection": 0, **kw})


def test_coordinator_ends_cleanly_when_no_site_trains(tmp_path, caplog):
    grid = _EverySiteFails([11, 12])
    cfg = _cheap(tmp_path, num_server_rounds=2)
    with caplog.at_level(logging.ERROR, logger="echofleet.server"):
        report = run_federation(grid, cfg)
    run_dir = Path(cfg.run_dir)
    assert grid.sent == 2 + 2 * 2 * 2  # round 0 evaluation, then train + evaluate in both rounds: it really ran
    assert report["global_model"] is None
    assert report["problem"].startswith("no site trained in 2 round(s) (2 site(s) answered)")
    assert "no site policy" in report["problem"]
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert all("no site policy" in e["rejected"] for r in report["rounds"][1:] for e in r["sites"].values())
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["problem"] == report["problem"] and (run_dir / "report.csv").exists()
    assert not (run_dir / "global").exists() and not (run_dir / "MODEL_CARD.md").exists()
    assert any("no site trained" in r.getMessage() and "no global model written" in r.getMessage() for r in caplog.records)

    # the ServerApp's entry point (what `flwr run` calls) returns normally too
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=_cheap(tmp_path, num_server_rounds=1, run_dir=str(tmp_path / "main")).as_run_config())
    main(_EverySiteFails([11]), context)
    assert json.loads((tmp_path / "main" / "report.json").read_text())["global_model"] is None


def test_one_accepted_update_is_enough_to_write_the_global_model(tmp_path):
    """The other side of the rule above: a site that trains once gives a model (so the rule cannot pass vacuously)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    class OneSiteTrains(_EverySiteFails):
        def send_and_receive(self, messages, timeout=None):
            out = []
            for m in messages:
                if m.metadata.message_type == "train" and m.metadata.dst_node_id == 11:
                    arrays = {k: Array(np.ascontiguousarray(v.numpy() + 0.01)) for k, v in m.content["arrays"].items()}
                    out.append(Message(RecordDict({
                        "site": ConfigRecord({"site": "site-a", "status": "ok", "reason": "", "accountant": "rdp"}),
                        "metrics": MetricRecord({"num-examples": 10, "dp-weight": 1.0, "train_loss": 1.0}),
                        "arrays": ArrayRecord(arrays)}), reply_to=m))
                else:
                    out.append(Message(Error(0, NO_POLICY), reply_to=m))
            return out

    report = run_federation(OneSiteTrains([11, 12]), _cheap(tmp_path, num_server_rounds=1))
    assert report["global_model"] == "global" and "problem" not in report
    assert (tmp_path / "run" / "global" / "model.json").exists()


def test_a_simulated_site_without_policy_gets_the_phantom_default(tmp_path, caplog):
    run = RunConfig(run_dir=str(tmp_path / "run"), target_epsilon=3.0, task="segment")
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                      run_config=run.as_run_config())
    phantom_default_policy.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fed.client_app"):
        policy = policy_from_context(context)
    assert policy.data == PHANTOM_DATA and policy.data.startswith("phantom:")
    assert policy.site_name == "phantom-site-1"
    assert Path(policy.state_dir).is_relative_to(tmp_path / "run")
    assert (policy.partition, policy.partition_index, policy.partition_count) == ("iid", 1, 2)
    assert policy.target_epsilon == 3.0 and policy.allowed_tasks == ("segment",)
    assert any("simulation default: phantom data, not patients" in r.getMessage() for r in caplog.records)

    # a real SuperNode (no partition-id) without a policy still gets the clear error, never phantoms
    real = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config=run.as_run_config())
    with pytest.raises(RuntimeError, match="no site policy"):
        policy_from_context(real)


# ---- `flwr run .` end to end -------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_naming(needle: str) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose command line or environment contains ``needle``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and (needle in cmdline or needle in environ):
            found.append((int(proc.name), cmdline))
    return found


def _stop_everything_started_with(flwr_home: Path) -> list[str]:
    """Stop the managed SuperLink and every helper it started (all inherit ``FLWR_HOME``); returns what was left.

    The simulation process first gets time to end by itself (it shuts Ray down), then SIGTERM, then SIGKILL."""
    deadline = time.time() + 120
    while any("flwr-simulation" in c for _, c in _processes_naming(str(flwr_home))) and time.time() < deadline:
        time.sleep(1)
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for pid, _ in _processes_naming(str(flwr_home)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while _processes_naming(str(flwr_home)) and time.time() < deadline:
            time.sleep(0.5)
    return [c for _, c in _processes_naming(str(flwr_home))]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_flwr_run_dot_runs_a_local_simulation_without_installing_dependencies(tmp_path):
    flwr = Path(sys.executable).parent / "flwr"
    home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    http_port, control_port = _free_port(), _free_port()
    env = {**os.environ,
           "PATH": f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(home),
           # the documented switch (docs/federation.md): the managed local SuperLink inherits it
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           # this test's own local SuperLink, never one that is already running on the default ports
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    overrides = f'run-dir="{run_dir}" num-server-rounds=1 feature-projection=0'
    try:
        for attempt in range(5):  # Flower gives its local SuperLink a fixed 15 s to start: not always enough on 2 busy cores
            proc = subprocess.run([str(flwr), "run", ".", "local", "--run-config", overrides, "--stream"], cwd=REPO,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1100)
            if "Failed to start local SuperLink within" not in proc.stdout:
                break
            time.sleep(10 * (attempt + 1))
        # the SuperExec that runs the app was started without the install flag (the SuperLink honoured the switch)
        superexec = [c for _, c in _processes_naming(str(home)) if "flower-superexec" in c]
    finally:
        leftovers = _stop_everything_started_with(home)
    out = proc.stdout
    tail = out[-3000:]
    assert proc.returncode == 0, tail
    assert superexec and not any("--allow-runtime-dependency-installation" in c for c in superexec), superexec
    assert "Installing application dependencies" not in out and "uv sync" not in out, tail
    assert not (home / "runtime-envs").exists()
    assert "simulation default: phantom data, not patients" in out, tail

    report = json.loads((run_dir / "report.json").read_text())
    assert report["global_model"] == "global" and (run_dir / "global" / "model.json").exists(), tail
    sites = report["rounds"][-1]["sites"]
    assert set(sites) == {"phantom-site-0", "phantom-site-1"}  # Flower's default: 2 simulated SuperNodes
    for e in sites.values():
        assert e["status"] == "ok" and 0 < e["privacy"]["epsilon"] <= RunConfig.target_epsilon * 1.01
    assert all((run_dir / "phantom-sites" / s / "state").is_dir() for s in sites)  # site state under the run dir
    assert not leftovers, leftovers
