"""One source of run configuration: pyproject's ``[tool.flwr.app.config]`` == ``fed.config.RunConfig``
== the defaults of everything that reads it; strict typed parsing; and ``echofleet simulate`` /
``echofleet evaluate`` refusing bad arguments with one line and exit code 2 before any work."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from echofleet.cli import app
from echofleet.simulation import RUN_FIELDS, SHARED_FIELDS, SimulationConfig
from fed.config import KEYS, RunConfig, RunConfigError, key_of
from fed.task import RoundConfig

REPO = Path(__file__).resolve().parents[2]
APP_CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_and_the_dataclass_have_the_same_keys_and_defaults():
    fields = {key_of(f.name): f.default for f in dataclasses.fields(RunConfig)}
    assert sorted(APP_CONFIG) == sorted(fields), "keys differ: " + str(set(APP_CONFIG) ^ set(fields))
    for key, value in APP_CONFIG.items():
        assert type(value) is type(fields[key]) and value == fields[key], f"{key}: pyproject {value!r}, RunConfig {fields[key]!r}"
    assert RunConfig.from_run_config(APP_CONFIG) == RunConfig()
    assert list(KEYS) == list(fields)


def test_round_config_defaults_are_the_run_configs():
    rc, run = RoundConfig(), RunConfig()
    for name in ("task", "local_epochs", "batch_size", "lr", "max_grad_norm", "target_epsilon", "noise_multiplier",
                 "seed", "val_fraction"):
        assert getattr(rc, name) == getattr(run, name), name
    assert rc.num_rounds == run.num_server_rounds and rc.labels == run.task_labels()
    assert rc.encoder == run.encoder_ref()
    assert RoundConfig.from_record({}) == rc  # a missing key takes the same defaults
    assert RoundConfig.from_record(run.round_config("k").to_record()) == run.round_config("k")


def _simulate_options() -> dict:
    command = typer.main.get_command(app).commands["simulate"]
    return {p.name: p.default for p in command.params}


def test_simulate_option_defaults_are_the_dataclass_defaults():
    options, sim, run = _simulate_options(), SimulationConfig(), RunConfig()
    # options that are run-config keys: the run config's defaults (through SimulationConfig)
    own_meaning = ("checkpoint", "cache_dir", "out")  # None = none / own run dir: compared with SimulationConfig below
    for name in SHARED_FIELDS + tuple(RUN_FIELDS):
        if name in options and name not in own_meaning:
            expected = getattr(run, RUN_FIELDS.get(name, name))
            assert options[name] == expected == getattr(sim, name), f"--{name.replace('_', '-')}: {options[name]!r} vs {expected!r}"
    for name in ("central_dp_noise", "max_update_norm"):
        assert options[name] == getattr(run, name), name
    # the simulation's own options: SimulationConfig's defaults
    for name in ("data", "sites", "partition", "checkpoint", "cache_dir", "device", "site_state"):
        assert options[name] == getattr(sim, name), name
    assert str(options["out"]) == sim.out and options["site_epsilons"] is None and sim.site_epsilons == []
    assert options["verbose"] is False  # the CLI shows a progress bar, not Flower's log lines
    # the NOT PRIVATE test switch is off unless asked for, in the CLI and in SimulationConfig
    assert options["insecure_deterministic_noise"] is False is sim.insecure_deterministic_noise
    assert not set(options) - set(SHARED_FIELDS) - set(RUN_FIELDS) - {
        "data", "sites", "partition", "site_epsilons", "central_dp_noise", "max_update_norm", "verbose",
        "insecure_deterministic_noise", "device", "site_state"}, \
        "a new option: say here where its default comes from"


@pytest.mark.parametrize("values, key, words", [
    ({"lr": "abc"}, "lr", "must be a number"),
    ({"num-server-rounds": 2.5}, "num-server-rounds", "must be an integer"),
    ({"num-server-rounds": True}, "num-server-rounds", "must be an integer"),
    ({"resume": "yes"}, "resume", "must be true or false"),
    ({"labels": 3}, "labels", "must be a string"),
    ({"num_server_rounds": 2}, "num_server_rounds", "did you mean 'num-server-rounds'"),
    ({"learning-rate": 0.1}, "learning-rate", "is not a run-config key"),
    ({"num-server-rounds": 0}, "num-server-rounds", "at least 1"),
    ({"target-epsilon": 0.0}, "target-epsilon", "> 0"),
    ({"task": "nope"}, "task", "classify"),
    ({"encoder-config": "nope"}, "encoder-config", "echocare-tiny"),
    ({"val-fraction": 1.0}, "val-fraction", "between 0 and 1"),
])
def test_a_bad_run_config_value_is_an_error_naming_the_key(values, key, words):
    with pytest.raises(RunConfigError) as err:
        RunConfig.from_run_config(values)
    assert err.value.key == key and f"'{key}'" in str(err.value) and words in str(err.value)


def test_run_config_round_trips_and_accepts_an_int_for_a_float():
    cfg = RunConfig.from_run_config({"lr": 1, "strategy": "fedprox", "resume": True, "run-dir": "/x"})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert RunConfig.from_run_config(cfg.as_run_config()) == cfg


# ---- bad arguments: one line, exit code 2, before any work -------------------------------------

BAD_SIMULATE = [
    (["--data", "busi:/nonexistent"], ["--data", "/nonexistent", "not found"]),
    (["--data", "nope:x"], ["--data", "unknown data kind"]),
    (["--partition", "dirichlet:abc"], ["--partition", "dirichlet:abc"]),
    (["--partition", "dirichlet:-1"], ["--partition", "positive"]),
    (["--partition", "random"], ["--partition", "random", "iid"]),
    (["--task", "nope"], ["--task", "nope", "classify"]),
    (["--strategy", "fedsgd"], ["--strategy", "fedsgd", "fedavg"]),
    (["--encoder", "resnet"], ["--encoder", "resnet", "echocare-tiny"]),
    (["--sites", "0"], ["--sites", "at least 1"]),
    (["--rounds", "0"], ["--rounds", "at least 1"]),
    (["--epsilon", "0"], ["--epsilon", "> 0"]),
    (["--epsilon", "-2"], ["--epsilon", "> 0"]),
    (["--site-epsilons", "8,x,1"], ["--site-epsilons", "8,x,1"]),
    (["--site-epsilons", "8,8"], ["--site-epsilons", "2 values for 3 sites"]),
    (["--site-epsilons", "8,0,1"], ["--site-epsilons", "> 0"]),
    (["--lr", "0"], ["--lr", "> 0"]),
    (["--local-epochs", "0"], ["--local-epochs", "at least 1"]),
    (["--checkpoint", "/nonexistent/encoder.pth"], ["--checkpoint", "not found"]),
    (["--central-dp-noise", "1", "--strategy", "fedprox"], ["--central-dp-noise", "fedavg"]),
    (["--max-update-norm", "-1"], ["--max-update-norm", ">= 0"]),
]


@pytest.mark.parametrize("args, words", BAD_SIMULATE, ids=[" ".join(a) for a, _ in BAD_SIMULATE])
def test_simulate_refuses_a_bad_argument_with_one_line_and_exit_2(tmp_path, args, words):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["simulate", "--out", str(out), *args])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) < 5 and text.startswith("error: "), res.output
    assert all(w in text for w in words), res.output
    assert not out.exists(), "work started before the arguments were checked"


def test_simulate_refuses_an_out_that_is_a_file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    res = CliRunner().invoke(app, ["simulate", "--out", str(f)])
    assert res.exit_code == 2 and "--out" in res.output and "not a folder" in res.output, res.output


def test_evaluate_refuses_bad_arguments_with_one_line_and_exit_2(tmp_path):
    run = tmp_path / "run"
    (run / "global").mkdir(parents=True)
    (run / "global" / "model.json").write_text("{}")  # the data is checked before the model is read
    for args, words in ([str(tmp_path / "nope"), "--data", "phantom:5"], ["no global model"]), \
                       ([str(run), "--data", "busi:/nonexistent"], ["--data", "/nonexistent"]), \
                       ([str(run), "--data", "phantom:abc"], ["--data", "phantom:"]):
        res = CliRunner().invoke(app, ["evaluate", *args])
        text = " ".join(res.output.split())
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) < 5, res.output
        assert text.startswith("error: ") and all(w in text for w in words), res.output
