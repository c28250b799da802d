"""End-to-end federations through Flower's simulation engine: 3 virtual hospitals, 2 rounds,
the small encoder, on phantoms and on a real BUSI subset (test_federation_small.py: the short runs
whose subject is not what the head learns; it imports this file's helpers).

Cost on 2 cores: every federation of the test run shares one Ray instance per worker (``one_ray``)
and one feature cache (``warm_phantom_features``, shared by the pytest workers: each phantom is encoded
once); one phantom federation (``phantom_run``) serves the tests that only read its outputs."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from echofleet.simulation import SimulationConfig, simulate
from dp_helpers import independent_epsilon
from sim_helpers import SITE_CPUS

warnings.filterwarnings("ignore")
# one Ray for every simulation; one worker runs every file that starts a Flower federation (tests/conftest.py)
pytestmark = [pytest.mark.usefixtures("one_ray"), pytest.mark.xdist_group("flower")]
PHANTOMS = "phantom:600?profiles=linear-a,convex-b,linear-c&seed=0"
# The first 90 of PHANTOMS (their features are in the shared cache once phantom_run ran): for runs whose
# subject is not what the head learns.
SMALL = PHANTOMS.replace("phantom:600", "phantom:90")
# For runs whose subject is not the model: no public projection, so no virtual hospital regenerates the
# 300 reference phantoms to recompute it (25-60 ms of CPU each, in every Ray worker of every run).
NO_PROJECTION = {"feature-projection": 0}
REPLY_METRICS = {"num-examples", "dp-weight", "train_loss", "epsilon", "delta", "noise_multiplier", "sample_rate",
                 "steps", "val_loss", "auroc", "balanced_accuracy"}
REPLY_SITE_KEYS = {"site", "status", "reason", "accountant"}  # always there; "privacy-unit" and "device" may be


def _cfg(tmp_path: Path, name: str, cache: str | None = None, **kw) -> SimulationConfig:
    """A test federation (its sites in one Ray actor: ``SITE_CPUS``)."""
    base = dict(data=PHANTOMS, sites=3, rounds=2, epsilon=8.0, encoder="echocare-tiny", local_epochs=5,
                batch_size=64, lr=0.5, out=str(tmp_path / name), partition="iid", seed=0, cache_dir=cache,
                cpus_per_site=SITE_CPUS)
    base.update(kw)
    return SimulationConfig(**base)


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "global" / "head.safetensors"))


def _watching_client_app(log_path: Path, nan_site: int | None = None):
    """The real ClientApp, wrapped: every reply is written to ``log_path`` (what left the site);
    optionally one site's update is replaced by NaNs (a broken hospital)."""

    def factory(sites_dir):
        from flwr.app import Array, ArrayRecord
        from flwr.clientapp import ClientApp

        from fed.client_app import handle_evaluate, handle_train

        app = ClientApp()

        def dump(kind, reply):
            c = reply.content
            rec = {"kind": kind,
                   "arrays": {k: list(v.numpy().shape) for a in c.array_records.values() for k, v in a.items()},
                   "metrics": {k: v for m in c.metric_records.values() for k, v in m.items()},
                   "configs": {k: v for m in c.config_records.values() for k, v in m.items()}}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

        @app.train()
        def train(msg, context):
            reply = handle_train(msg, context, sites_dir)
            if nan_site is not None and int(context.node_config["partition-id"]) == nan_site and "arrays" in reply.content:
                bad = {k: Array(np.full(v.numpy().shape, np.nan, np.float32)) for k, v in reply.content["arrays"].items()}
                reply.content["arrays"] = ArrayRecord(bad)
            dump("train", reply)
            return reply

        @app.evaluate()
        def evaluate(msg, context):
            reply = handle_evaluate(msg, context, sites_dir)
            dump("evaluate", reply)
            return reply

        return app

    return factory


def _check_report(report: dict, run_dir: Path) -> None:
    for f in ("report.json", "report.csv", "auroc_per_round.png", "epsilon_per_site.png", "MODEL_CARD.md",
              "global/model.json", "global/head.safetensors", "checkpoints/LATEST"):
        assert (run_dir / f).exists(), f
    rounds = {r["round"]: r for r in report["rounds"]}
    assert set(rounds) == {0, 1, 2}
    # every site's reported epsilon equals an independent recomputation from its logged figures
    for rnd in (1, 2):
        for site, e in rounds[rnd]["sites"].items():
            if e["status"] != "ok":
                continue
            p = e["privacy"]
            assert p["accountant"] == "rdp" and p["steps"] > 0 and p["noise_multiplier"] > 0
            assert p["epsilon"] == pytest.approx(independent_epsilon(
                [(p["noise_multiplier"], p["sample_rate"], p["steps"])], p["delta"]), rel=0.02)
            assert p["epsilon"] <= 8.0 * 1.01


@dataclass
class PhantomRun:
    cfg: SimulationConfig
    report: dict
    log: Path  # every reply that left a site (_watching_client_app)


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory, warm_phantom_features) -> PhantomRun:
    """The module's reference federation: 600 phantoms, 3 sites, 2 rounds, every reply logged."""
    tmp = tmp_path_factory.mktemp("phantom-run")
    cfg = _cfg(tmp, "run", warm_phantom_features)
    log = tmp / "replies.jsonl"
    return PhantomRun(cfg, simulate(cfg, client_app=_watching_client_app(log)), log)


def test_phantom_federation_learns_with_dp_and_leaks_nothing(tmp_path, phantom_run):
    log, report, run_dir = phantom_run.log, phantom_run.report, Path(phantom_run.cfg.out)
    _check_report(report, run_dir)
    agg = {r["round"]: r["aggregated"]["evaluate"] for r in report["rounds"]}
    assert agg[0]["auroc"] == pytest.approx(0.5)  # the zero-initialised head has no opinion yet
    assert agg[1]["auroc"] > agg[0]["auroc"] + 0.03 and agg[2]["auroc"] > agg[0]["auroc"] + 0.03, agg
    # epsilon grows round over round, per site
    for site in report["rounds"][1]["sites"]:
        assert report["rounds"][2]["sites"][site]["privacy"]["epsilon"] > report["rounds"][1]["sites"][site]["privacy"]["epsilon"]

    # `echofleet evaluate` on held-out phantoms (another seed) through the CLI, JSON out
    from typer.testing import CliRunner

    from echofleet.cli import app

    res = CliRunner().invoke(app, ["evaluate", str(run_dir), "--data", "phantom:45?seed=77", "--json"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.output.strip().splitlines()[-1])
    assert ev["n"] == 45 and 0.5 < ev["auroc"] <= 1.0 and 0.0 <= ev["balanced_accuracy"] <= 1.0
    bad = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope"), "--data", "phantom:5"])
    assert bad.exit_code == 2 and "no global model" in " ".join(bad.output.split())  # rich wraps lines

    # What actually left the sites: head parameters of the head's shapes, whitelisted numbers, the pseudonym.
    from echocare.models.encoder import get_config
    from echocare.models.heads import build_head

    from fed.config import RunConfig

    head = build_head("classify", get_config("echocare-tiny"), 3, proj_dim=RunConfig.feature_projection)
    head_shapes = {k: list(v.shape) for k, v in head.named_parameters()}  # trainable parameters only
    replies = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(replies) == 3 * 2 * 2 + 3  # train+evaluate per site per round, plus round-0 evaluation
    for r in replies:
        assert r["arrays"] in ({}, head_shapes)
        assert set(r["metrics"]) <= REPLY_METRICS, set(r["metrics"]) - REPLY_METRICS
        assert REPLY_SITE_KEYS <= set(r["configs"]) <= REPLY_SITE_KEYS | {"privacy-unit", "device"}, r["configs"]
        assert r["configs"]["site"].startswith("site-") and r["configs"]["reason"] == ""
        # the privacy unit is a word, the device a class of machine (docs/privacy.md)
        assert r["configs"].get("privacy-unit", "image") in ("image", "patient")
        assert r["configs"].get("device", "cpu") == "cpu" or r["configs"]["device"].startswith("cuda:")
        text = json.dumps(r)
        for forbidden in (".png", ".jpg", "/", "phantom", "benign_", "malignant_"):
            assert forbidden not in text, (forbidden, text)


def test_busi_subset_federation(tmp_path, busi_root, warm_phantom_features):
    # the shared cache holds the public reference phantoms' features (the coordinator's projection,
    # which each site recomputes): only the 90 BUSI images are encoded here
    cfg = _cfg(tmp_path, "busi", warm_phantom_features, data=f"busi:{busi_root}?limit=90&seed=0", partition="dirichlet:1.0")
    report = simulate(cfg)
    _check_report(report, Path(cfg.out))
    assert report["labels"] == ["benign", "malignant", "normal"]


def test_hc_federation_trains_a_segmentation_head_with_dp(tmp_path, hc18_root):
    """Fetal head circumference: a light segmentation head over cached encoder maps, DP-SGD with a
    per-image loss, per patient (HC18 names its patients: each patient's summed gradient is clipped),
    HC in mm from the fitted ellipse at each site."""
    cfg = _cfg(tmp_path, "hc", data=f"hc18:{hc18_root}?limit=40&seed=0", task="hc", sites=2, local_epochs=2,
               batch_size=16, lr=0.05)
    report = simulate(cfg)
    assert report["labels"] == ["background", "head"] and report["metric"] == "hc_mae_mm"
    agg = {r["round"]: r["aggregated"]["evaluate"] for r in report["rounds"]}
    assert {"dice", "hc_mae_mm"} <= set(agg[2])
    assert agg[2]["val_loss"] < agg[0]["val_loss"], agg
    assert (Path(cfg.out) / "hc_mae_mm_per_round.png").exists()
    for site, e in report["rounds"][2]["sites"].items():
        assert e["privacy"]["epsilon"] <= 8.0 * 1.01 and e["privacy"]["steps"] > 0
