"""``echofleet simulate --site-state DIR``: virtual hospitals keep their state across runs (issue 9).

Two short federations (2 sites, 1 round, tiny encoder, 24 phantoms) with the same ``site_state``:
the second run's lifetime ledger holds both runs' releases and its epsilon grew, as a real
hospital's SuperNode would; without the flag each run directory starts fresh hospitals.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from sim_helpers import SITE_CPUS

from echofleet.simulation import SimulationConfig, SimulationConfigError, check, simulate
from fed.ledger import PrivacyLedger
from fed.policy import load_policy

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.xdist_group("flower")  # starts a Flower federation: one worker runs them all (tests/conftest.py)
DATA = "phantom:24?profiles=linear-a,convex-b,linear-c&seed=0"


def _cfg(tmp_path: Path, out: str, cache: str | None = None, **kw) -> SimulationConfig:
    base = dict(data=DATA, sites=2, rounds=1, epsilon=8.0, encoder="echocare-tiny", local_epochs=1, batch_size=8,
                lr=0.5, out=str(tmp_path / out), seed=0, cache_dir=cache or str(tmp_path / "cache"), quiet=True,
                extra={"feature-projection": 0},  # a plain linear head: no public projection of 300 reference phantoms to compute
                cpus_per_site=SITE_CPUS)
    return SimulationConfig(**{**base, **kw})


def _ledger(site_dir: Path) -> dict:
    policy = load_policy(site_dir / "policy.toml")
    return PrivacyLedger.load(policy.ledger_path).to_dict()


def test_two_runs_with_one_site_state_spend_from_one_lifetime_ledger(tmp_path, phantom_feature_cache, one_ray):
    state = tmp_path / "hospitals"
    first = simulate(_cfg(tmp_path, "run-1", phantom_feature_cache, site_state=str(state)))
    assert first["global_model"] is not None
    after_one = {k: _ledger(state / f"site-{k}") for k in range(2)}
    assert not (tmp_path / "run-1" / "sites").exists()  # the state lives in --site-state, not in --out
    second = simulate(_cfg(tmp_path, "run-2", phantom_feature_cache, site_state=str(state)))  # another run directory: another run key
    assert second["global_model"] is not None
    for k in range(2):
        book = _ledger(state / f"site-{k}")
        runs = {r["run"] for r in book["releases"]}
        assert len(book["releases"]) > len(after_one[k]["releases"]) and len(runs) == 2, runs
        assert book["releases"][:len(after_one[k]["releases"])] == after_one[k]["releases"]  # run 1's, kept
        assert book["epsilon"] > after_one[k]["epsilon"] > 0
    # the second run's report shows the lifetime epsilon, above the first run's
    eps = lambda rep: max(e["privacy"]["epsilon"] for r in rep["rounds"] for e in r["sites"].values() if "privacy" in e)  # noqa: E731
    assert eps(second) > eps(first)
    # without the flag a run directory holds fresh hospitals of its own
    assert json.loads((tmp_path / "run-2" / "report.json").read_text())["rounds"]


def test_a_kept_hospital_cannot_be_handed_other_data(tmp_path):
    state = tmp_path / "hospitals"
    from echofleet.simulation import layout_sites

    cfg = _cfg(tmp_path, "run", site_state=str(state))
    check(cfg)
    layout_sites(cfg, tmp_path / "run")
    assert load_policy(state / "site-0" / "policy.toml").state_dir == str((state / "site-0" / "state").resolve())
    with pytest.raises(SimulationConfigError) as e:
        check(_cfg(tmp_path, "run", site_state=str(state), sites=3))  # another partition of the data
    assert e.value.field == "site_state" and "partition_count" in e.value.problem
    (tmp_path / "file").write_text("")
    with pytest.raises(SimulationConfigError, match="not a folder"):
        check(_cfg(tmp_path, "run", site_state=str(tmp_path / "file")))
