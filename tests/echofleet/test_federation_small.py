"""Short federations through Flower's simulation engine whose subject is not what the head learns:
a site out of budget and a site sending NaNs, where a site's DP noise comes from, a killed and resumed
run, central DP. Split from test_federation.py (whose helpers they use) so that `make test`'s two
workers share the federation tests; each run's size is explained where it is set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_federation import NO_PROJECTION, SMALL, _cfg, _watching_client_app, _weights

from echofleet.simulation import SimulationConfig, simulate

warnings.filterwarnings("ignore")
# one Ray for every simulation of this worker; the feature cache of the test run (tests/conftest.py)
pytestmark = [pytest.mark.usefixtures("one_ray"), pytest.mark.xdist_group("flower")]


def test_budget_exhausted_site_is_excluded_and_nan_update_rejected(tmp_path, warm_phantom_features):
    # site-2's policy allows epsilon 0.5: with a fixed noise multiplier (2.0) its first round already
    # costs more (one local epoch over its 30 phantoms: above 0.9 whatever its sampling rate and delta);
    # the other sites (budget 8) can afford both rounds (below 3.2). site-1 is a broken hospital that sends NaNs.
    log = tmp_path / "replies.jsonl"
    cfg = _cfg(tmp_path, "run", warm_phantom_features, data=SMALL, local_epochs=1, site_epsilons=[8.0, 8.0, 0.5],
               noise_multiplier=2.0, extra=NO_PROJECTION)
    report = simulate(cfg, client_app=_watching_client_app(log, nan_site=1))
    rounds = {r["round"]: r for r in report["rounds"]}
    assert rounds[1]["excluded"] == ["site-2"]
    assert rounds[1]["sites"]["site-2"]["status"] == "budget-exhausted"
    assert rounds[2]["sites"]["site-2"]["status"] == "not-trained"
    assert rounds[2]["sites"]["site-0"]["status"] == "ok" and rounds[2]["excluded"] == []
    assert "non-finite" in rounds[1]["sites"]["site-1"]["rejected"]
    assert "non-finite" in rounds[2]["sites"]["site-1"]["rejected"]
    assert report["rounds_completed"] == 2
    w = _weights(Path(cfg.out))
    assert all(np.isfinite(v).all() for v in w.values())
    # site-2 was not asked to train again after it said "budget exhausted"
    trains = [json.loads(x) for x in log.read_text().splitlines() if '"kind": "train"' in x]
    assert sum(1 for t in trains if t["configs"]["site"] == "site-2") == 1


def test_two_runs_with_the_same_seed_give_different_heads(tmp_path, warm_phantom_features):
    """The coordinator's seed does not fix a site's DP noise (OS entropy): the same configuration run
    twice gives different heads. Small runs (2 sites, 1 round, 1 local epoch, 90 phantoms, no
    projection): the subject is where the noise comes from, not what the head learns. With the (NOT
    PRIVATE) deterministic-noise switch these two runs give identical heads (tried: the test fails)."""
    a = _cfg(tmp_path, "a", warm_phantom_features, data=SMALL, sites=2, rounds=1, local_epochs=1, extra=NO_PROJECTION)
    b = replace(a, out=str(tmp_path / "b"))
    simulate(a)
    simulate(b)
    wa, wb = _weights(Path(a.out)), _weights(Path(b.out))
    assert wa.keys() == wb.keys()
    assert any(not np.array_equal(wa[k], wb[k]) for k in wa)


def test_killed_and_resumed_run_reproduces_the_uninterrupted_checkpoint(tmp_path, warm_phantom_features):
    """Bitwise comparison of two separate runs needs the (NOT PRIVATE) deterministic-noise switch; the
    resumed run itself is exact without it (identical re-deliveries get the sites' stored replies)."""
    # 90 phantoms, 1 local epoch: how much the head learns does not matter, only that the resumed run
    # ends bitwise where the uninterrupted one did (the default projection stays: the CLI has no option for it)
    full = _cfg(tmp_path, "full", warm_phantom_features, data=SMALL, rounds=3, local_epochs=1, insecure_deterministic_noise=True)
    simulate(full)
    reference = _weights(Path(full.out))

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "echofleet.cli", "simulate", "--data", SMALL, "--sites", "3", "--rounds", "3",
           "--encoder", "echocare-tiny", "--local-epochs", "1", "--batch-size", "64", "--lr", "0.5",
           "--out", str(run_dir), "--seed", "0", "--cache-dir", warm_phantom_features, "--insecure-deterministic-noise"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while not (run_dir / "checkpoints" / "round-0001").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "checkpoints" / "round-0003").exists(), "killed too late to test resuming"
    report = simulate(SimulationConfig(**{**full.__dict__, "out": str(run_dir), "resume": True}))
    assert report["rounds_completed"] == 3
    resumed = _weights(run_dir)
    assert resumed.keys() == reference.keys()
    for k in reference:
        np.testing.assert_array_equal(resumed[k], reference[k])


def test_central_user_level_dp_through_flowers_fixed_clipping_wrapper(tmp_path, warm_phantom_features):
    # the first 90 of PHANTOMS: their features are in the shared cache already
    cfg = _cfg(tmp_path, "cdp", warm_phantom_features, data=SMALL, local_epochs=1,
               extra={"central-dp-noise": 1.0, "central-dp-clip": 1.0, **NO_PROJECTION})
    report = simulate(cfg)
    cdp = {r["round"]: r.get("central_dp") for r in report["rounds"]}
    assert cdp[1]["releases"] == 1 and cdp[2]["releases"] == 2
    assert 0 < cdp[1]["epsilon"] < cdp[2]["epsilon"]  # user-level epsilon grows with each noisy release
    assert report["central_dp"] == {"noise_multiplier": 1.0, "clip": 1.0}
