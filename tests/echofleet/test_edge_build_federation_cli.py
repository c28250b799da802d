"""``echofleet edge build RUN --calib sites --accept sites --federation NAME``: the checks before anything
is built, and the one-line errors, without Flower (the ``flwr`` CLI is never started here: where a test
needs its answer, ``FlowerFederation.flwr`` or ``subprocess.run`` is replaced). The release over a real
TLS SuperLink is tests/echofleet/test_release_federation.py (slow)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from echofleet.cli import app
from echofleet.deploy import DeployError, FlowerFederation, FlwrReply

PUBLIC = "phantom:9?seed=9"


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder as a training run leaves it, as far as these checks read it: report.json's config
    (a simulation's, so the release must clear sim-sites-dir for real SuperNodes)."""
    from fed.config import RunConfig

    run = tmp_path / "run"
    run.mkdir()
    config = RunConfig(run_dir=str(run), sim_sites_dir=str(run / "sites"), seed=3)
    (run / "report.json").write_text(json.dumps({"config": config.as_run_config()}))
    return run


@pytest.fixture
def key(tmp_path) -> Path:
    from echocare.bundle import generate_keypair

    return generate_keypair(tmp_path / "keys" / "release")[0]


def _home(root: Path, connections: str) -> Path:
    home = root / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "hospitals"\n' + connections)
    return home


def _ca(root: Path) -> Path:
    ca = root / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    return ca


def _build(run: Path, key: Path, *extra: str):
    args = ["edge", "build", str(run), "--target", "onnxruntime-cpu", "--key", str(key), "--out", str(run.parent / "dist"),
            *extra]
    return CliRunner().invoke(app, args)


def _one_error_line(r, code: int = 2) -> str:
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


SITES_STEPS = ("--calib", "sites", "--accept", "sites")


def test_federation_needs_a_step_at_the_sites_and_its_options_need_federation(run, key, tmp_path):
    line = _one_error_line(_build(run, key, "--calib", PUBLIC, "--val", PUBLIC, "--federation", "hospitals"))
    assert "--federation hospitals: nothing to ask the sites" in line
    for option in ("--flwr-home", "--app"):
        line = _one_error_line(_build(run, key, *SITES_STEPS, option, str(tmp_path)))
        assert f"{option} {tmp_path}: only with --federation NAME" in line


def test_unknown_federation_names_the_config_file_and_its_connections(run, key, tmp_path):
    home = _home(tmp_path, f'[superlink.hospitals]\naddress = "203.0.113.10:9093"\nroot-certificates = "{_ca(tmp_path)}"\n')
    line = _one_error_line(_build(run, key, *SITES_STEPS, "--federation", "hospitalz", "--flwr-home", str(home)))
    assert "federation 'hospitalz'" in line and str(home / "config.toml") in line
    assert "no [superlink.hospitalz] connection (its connections: hospitals)" in line


def test_without_flwr_home_the_run_folder_is_flowers_home_never_the_users(run, key):
    line = _one_error_line(_build(run, key, *SITES_STEPS, "--federation", "hospitals"))
    assert f"no Flower config {run / '.flwr' / 'config.toml'}" in line and "--flwr-home DIR" in line
    assert not (run / ".flwr").exists()  # flwr was not started (it would write a default config there)


@pytest.mark.parametrize(("connection", "expected"), [
    ('address = "203.0.113.10:9093"\ninsecure = true\n', "is plaintext (insecure = true); releases go over TLS only"),
    ('options.num-supernodes = 3\n', "is not a remote SuperLink"),
    ('address = "203.0.113.10:9093"\nroot-certificates = "/nonexistent/ca.crt"\n', "root-certificates /nonexistent/ca.crt"),
])
def test_a_connection_that_is_not_tls_to_a_superlink_is_refused(run, key, tmp_path, connection, expected):
    home = _home(tmp_path, f"[superlink.hospitals]\n{connection}")
    line = _one_error_line(_build(run, key, *SITES_STEPS, "--federation", "hospitals", "--flwr-home", str(home)))
    assert "federation 'hospitals'" in line and expected in line


def test_the_run_folder_must_hold_its_training_runs_config_and_the_app_must_be_a_flower_app(run, key, tmp_path):
    home = _home(tmp_path, f'[superlink.hospitals]\naddress = "203.0.113.10:9093"\nroot-certificates = "{_ca(tmp_path)}"\n')
    line = _one_error_line(_build(run, key, *SITES_STEPS, "--federation", "hospitals", "--flwr-home", str(home),
                                  "--app", str(tmp_path)))
    assert f"{tmp_path / 'pyproject.toml'}: not a Flower app" in line
    (run / "report.json").unlink()
    line = _one_error_line(_build(run, key, *SITES_STEPS, "--federation", "hospitals", "--flwr-home", str(home)))
    assert f"--federation hospitals: {run / 'report.json'}: no run config to release from" in line


def test_an_unreachable_superlink_is_one_line_naming_the_federation_and_address(run, key, tmp_path, monkeypatch):
    home = _home(tmp_path, f'[superlink.hospitals]\naddress = "203.0.113.10:9093"\nroot-certificates = "{_ca(tmp_path)}"\n')
    asked = []

    def flwr(self, *args, **kw):  # what `flwr list` answers when nothing listens at the address
        asked.append((self.name, args))
        return FlwrReply(1, {"success": False, "error-message": "Connection to the SuperLink is unavailable.\n"
                                                                "Please check the address."}, "", "")

    monkeypatch.setattr(FlowerFederation, "flwr", flwr)
    line = _one_error_line(_build(run, key, *SITES_STEPS, "--federation", "hospitals", "--flwr-home", str(home)))
    assert asked == [("hospitals", ("list",))]
    assert ("federation 'hospitals': the SuperLink at 203.0.113.10:9093 cannot be reached (Connection to the SuperLink "
            "is unavailable. Please check the address.)") in line


def test_every_flwr_call_uses_the_given_flower_home_and_never_installs_dependencies(run, tmp_path, monkeypatch):
    """The command line `flwr run` gets (the app, the connection name, the run config as a TOML file) and
    its environment; the release run config is the training run's, in mode "release", writing into RUN."""
    import subprocess

    from echofleet.cli.edge import _federation
    from echofleet.deploy import PROJECT_ROOT

    home = _home(tmp_path, f'[superlink.hospitals]\naddress = "203.0.113.10:9093"\nroot-certificates = "{_ca(tmp_path)}"\n')
    link = _federation(run, "hospitals", None, home)
    seen = {}

    def fake_run(cmd, **kw):
        seen.update(cmd=cmd, env=kw["env"], cwd=kw["cwd"])
        return subprocess.CompletedProcess(cmd, 0, json.dumps({"success": True, "run-id": 7, "fab-hash": "f"}), "")

    monkeypatch.setattr("echofleet.deploy.subprocess.run", fake_run)
    assert link.submit(link.release_config(), "release-run-config") == "7" and link.active_run == "7"
    file = run / "release" / "release-run-config.toml"
    assert seen["cmd"][1:] == ["run", str(PROJECT_ROOT), "--run-config", str(file), "hospitals", "--format", "json"]
    assert seen["env"]["FLWR_HOME"] == str(home.resolve()) and seen["cwd"] == run / "release"
    assert seen["env"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    sent = tomllib.loads(file.read_text())
    assert sent["mode"] == "release" and sent["run-dir"] == str(run.resolve()) and sent["sim-sites-dir"] == ""
    assert sent["seed"] == 3  # the training run's config, from its report.json


def _link(run: Path, tmp_path: Path) -> FlowerFederation:
    return FlowerFederation(app=tmp_path, name="hospitals", flwr_home=tmp_path / "home", run_dir=run,
                            workdir=run / "release")


def test_a_step_whose_run_writes_no_answers_names_the_federation_the_step_and_the_log(run, tmp_path, monkeypatch):
    from edge.federated.accept import AcceptanceRequest

    link = _link(run, tmp_path)
    monkeypatch.setattr(FlowerFederation, "submit", lambda self, rc, name: "12")
    monkeypatch.setattr(FlowerFederation, "wait", lambda self, run_id, progress, nearly_done: "finished:completed")
    monkeypatch.setattr(FlowerFederation, "save_run_log", lambda self, run_id: _log(run, "ERROR: no answer\n"))
    candidate = run / "candidate.tar.gz"
    candidate.write_bytes(b"signed candidate")
    lines = []
    with pytest.raises(DeployError) as e:
        link.site_acceptance(lines.append)(candidate, AcceptanceRequest(reference=candidate, run_key="k"))
    message = str(e.value)
    assert "\n" not in message and "federation 'hospitals': release step 'accept': run 12 ended 'finished:completed'" in message
    assert f"ServerApp log: {run / 'release' / 'serverapp.log'}" in message and "ERROR: no answer" in e.value.detail
    assert lines == ["release step 'accept': run 12 submitted to federation 'hospitals' ()"]  # a progress line per step


def test_a_calibration_no_site_answered_is_refused_naming_the_federation_and_step(run, tmp_path, monkeypatch):
    from edge.federated.coordinator import save_answers

    link = _link(run, tmp_path)

    def run_until(self, run_config, name, result, what, progress):
        assert run_config["mode"] == "release" and what == "release step 'calibrate'"
        save_answers([], result)  # the ServerApp found no SuperNode to ask
        return "13"

    monkeypatch.setattr(FlowerFederation, "run_until", run_until)
    plan = _tiny_plan(tmp_path)
    with pytest.raises(DeployError, match="federation 'hospitals': release step 'calibrate': run 13 got no answer "
                                          "from any SuperNode") as e:
        link.site_calibration(lambda _t: None)(plan)
    assert f"ServerApp log: {run / 'release' / 'serverapp.log'}" in str(e.value)
    assert (run / "release" / "plan.npz").is_file()
    assert json.loads((run / "release" / "step.json").read_text()) == {"step": "calibrate"}


def _log(run: Path, text: str) -> Path:
    path = run / "release" / "serverapp.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _tiny_plan(tmp_path: Path):
    """A calibration plan for a one-node ONNX graph (no model, no images)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from edge.federated.coordinator import make_plan

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())])
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return make_plan(path, ("MatMul",), np.ones((2, 1, 4), np.float32))  # two public "images" of one row
