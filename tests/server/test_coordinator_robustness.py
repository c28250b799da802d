"""The coordinator when sites run out of budget, misbehave, or lie about their weight.

Each test plays a small federation through ``SiteGuard.start`` (Flower's own round loop) with a
fake Grid whose "sites" are plain Python objects: no Ray, no SuperNodes, no training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import strategy_utils
from flwr.supercore.task_identity import TaskIdentity

from server.coordinator.strategy import STRATEGIES, SiteGuard, build_strategy

SIZE = 4096  # parameters in the fake head: enough to measure the central DP noise's spread


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower messages need a task identity (the simulation engine sets one the same way)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield


@pytest.fixture(autouse=True)
def _no_waiting_for_nodes(monkeypatch):
    """Flower's node sampling sleeps until enough nodes are connected; here that would be forever."""

    def waits(_seconds):
        raise AssertionError("the strategy waits for nodes that will never become eligible (the run stalls)")

    monkeypatch.setattr(strategy_utils, "sleep", waits)


@dataclass
class Site:
    """A fake hospital: adds ``step`` to every global weight, ``budget`` times, then is exhausted."""

    name: str
    step: float = 0.01
    budget: int = 100
    weight: object = 1.0  # what it sends as "num-examples" (None: sends none)
    poison: float | None = None  # written into every update (NaN: a broken site)
    metrics: dict = field(default_factory=dict)  # extra train metrics it discloses
    trained: int = 0

    def _weight(self) -> dict:
        # "dp-weight" as fed.client_app sends it today (for Flower's accounted central DP FedAvg)
        return {**({"num-examples": self.weight} if self.weight is not None else {}), "dp-weight": 1.0}

    def train(self, msg: Message) -> RecordDict:
        status = "ok" if self.trained < self.budget else "budget-exhausted"
        metrics = {**self._weight(), "epsilon": 0.5, **self.metrics}
        content = RecordDict({"site": ConfigRecord({"site": self.name, "status": status, "reason": "", "accountant": "rdp"}),
                              "metrics": MetricRecord(metrics)})
        if status == "ok":
            self.trained += 1
            update = {k: (v.numpy() + self.step).astype(np.float32) for k, v in msg.content["arrays"].items()}
            if self.poison is not None:
                update["w"].flat[0] = self.poison
            content["arrays"] = ArrayRecord({k: Array(v) for k, v in update.items()})
        return content

    def evaluate(self, msg: Message) -> RecordDict:
        metrics = {**self._weight(), "val_loss": 1.0 + self.step}
        return RecordDict({"site": ConfigRecord({"site": self.name, "status": "ok", "reason": "", "accountant": "rdp"}),
                           "metrics": MetricRecord(metrics)})


class FakeGrid:
    """Delivers each message to the site behind its node id and hands back the site's reply."""

    def __init__(self, sites: list[Site]):
        self.sites = {node: site for node, site in enumerate(sites, start=1)}
        self.sent: list[tuple[str, list[str]]] = []  # (message type, sites addressed), in order

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else "none"
        self.sent.append((kind, sorted(self.sites[m.metadata.dst_node_id].name for m in messages)))
        replies = []
        for m in messages:
            site = self.sites[m.metadata.dst_node_id]
            content = site.train(m) if m.metadata.message_type == "train" else site.evaluate(m)
            reply = Message(content, dst_node_id=0, message_type=m.metadata.message_type)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id  # as if it came back from that node
            replies.append(reply)
        return replies

    def trained_in(self, round_index: int) -> list[str]:
        trains = [names for kind, names in self.sent if kind == "train"]
        return trains[round_index - 1] if round_index <= len(trains) else []


def _run(guard: SiteGuard, grid: FakeGrid, rounds: int, start: float = 0.0):
    initial = ArrayRecord({"w": Array(np.full(SIZE, start, np.float32))})
    result = guard.start(grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=1.0,
                         train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}))
    return result.arrays["w"].numpy()


# -- every site exhausted ---------------------------------------------------------------------------

def test_a_run_whose_sites_are_all_exhausted_ends_instead_of_waiting_for_nodes():
    grid = FakeGrid([Site("a", budget=1), Site("b", budget=1)])
    guard = SiteGuard(build_strategy("fedavg"), min_sites=1)
    w = _run(guard, grid, rounds=5)
    # round 1 trains, round 2 both answer "budget-exhausted", round 3 is never configured
    assert [kind for kind, _ in grid.sent] == ["train", "evaluate", "train", "evaluate"]
    assert guard.exhausted_sites == {"a", "b"}
    np.testing.assert_allclose(w, 0.01, rtol=1e-6)  # the global head of round 1 is the result
    assert guard.stopped is not None and "a, b" in guard.stopped and "exhausted" in guard.stopped
    assert sorted(guard.rounds) == [1, 2]  # no phantom rounds in the report


def test_the_run_ends_when_fewer_sites_than_min_sites_can_still_train():
    grid = FakeGrid([Site("a"), Site("b", budget=1), Site("c")])
    guard = SiteGuard(build_strategy("fedavg", min_sites=3), min_sites=3)
    _run(guard, grid, rounds=4)
    assert grid.trained_in(2) == ["a", "b", "c"] and len([k for k, _ in grid.sent if k == "train"]) == 2
    assert "min_sites=3" in guard.stopped and "b" in guard.stopped


def test_sites_that_have_not_connected_yet_are_still_awaited(monkeypatch):
    # the end-of-run rule is about exhausted sites only: Flower still waits for sites to connect
    grid = FakeGrid([Site("a"), Site("b")])
    sites, grid.sites = grid.sites, {}
    monkeypatch.setattr(strategy_utils, "sleep", lambda _s: grid.sites.update(sites))  # they connect while it waits
    guard = SiteGuard(build_strategy("fedavg", min_sites=2), min_sites=2)
    w = _run(guard, grid, rounds=2)
    np.testing.assert_allclose(w, 0.02, rtol=1e-6)
    assert guard.stopped is None


# -- central DP (Flower's server-side fixed clipping, accounted) ------------------------------------

def _central_dp(num_sites: int, noise: float = 1.0, clip: float = 1.0, min_sites: int = 1) -> SiteGuard:
    inner = build_strategy("fedavg", min_sites=min_sites, central_dp_noise=noise, central_dp_clip=clip, num_sites=num_sites)
    return SiteGuard(inner, min_sites=min_sites)


def test_central_dp_with_an_exhausted_site_neither_crashes_nor_skips_rounds():
    grid = FakeGrid([Site("a", step=1e-4), Site("b", step=1e-4), Site("c", step=1e-4, budget=0)])
    guard = _central_dp(num_sites=3)
    w = _run(guard, grid, rounds=3)
    assert grid.trained_in(2) == ["a", "b"]  # the exhausted site is no longer asked
    assert [guard.rounds[r].central_dp["releases"] for r in (1, 2, 3)] == [1, 2, 3]
    # the noise is calibrated to the two sites averaged: std of the mean = z * C / 2 per round
    assert np.std(w) == pytest.approx(np.sqrt(3) * 1.0 / 2, rel=0.06)


def test_central_dp_with_a_rejected_nan_site_releases_every_round_over_the_others():
    grid = FakeGrid([Site("a", step=1e-4), Site("b", step=1e-4), Site("nan-site", poison=float("nan"))])
    guard = _central_dp(num_sites=3, noise=0.5)
    w = _run(guard, grid, rounds=3)
    assert all("non-finite" in guard.rounds[r].rejected["nan-site"] for r in (1, 2, 3))
    assert guard.rounds[3].central_dp["releases"] == 3
    assert np.std(w) == pytest.approx(np.sqrt(3) * 0.5 / 2, rel=0.06)


def test_central_dp_round_below_min_sites_keeps_the_model_and_the_next_round_runs():
    a, b = Site("a", step=1e-4), Site("b", step=1e-4, poison=float("nan"))
    grid = FakeGrid([a, b])
    guard = _central_dp(num_sites=2, min_sites=2)
    guard.start(grid=grid, initial_arrays=ArrayRecord({"w": Array(np.zeros(SIZE, np.float32))}), num_rounds=1,
                train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}))
    assert not guard.rounds[1].central_dp  # nothing released in round 1
    b.poison = None
    guard.round_offset = 1
    w = _run(guard, grid, rounds=1)
    assert guard.rounds[2].central_dp["releases"] == 1 and np.std(w) > 0.1


# -- reported weights ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam"])
def test_a_site_claiming_a_billion_examples_cannot_dominate_the_average(name):
    honest = [Site(f"h{i}", step=0.01, weight=1) for i in range(3)]
    liar = Site("liar", step=0.03, weight=1e9)  # within the update-norm screen (3x the median, factor 5)
    guard = SiteGuard(build_strategy(name), min_sites=1)
    _run(guard, FakeGrid([*honest, liar]), rounds=1)
    note = guard.rounds[1].train["liar"]["weight_capped"]
    assert "1e+09" in note and "5" in note
    ratio = guard.max_weight_ratio
    weights = {s: guard.rounds[1].train[s]["aggregation_weight"] for s in ("h0", "h1", "h2", "liar")}
    assert weights == {"h0": 1.0, "h1": 1.0, "h2": 1.0, "liar": ratio * 1.0}


def test_the_weighted_mean_uses_the_capped_weight():
    honest = [Site(f"h{i}", step=0.01, weight=1) for i in range(3)]
    liar = Site("liar", step=0.03, weight=1e9)
    guard = SiteGuard(build_strategy("fedavg"), min_sites=1)
    w = _run(guard, FakeGrid([*honest, liar]), rounds=1)
    assert w[0] < 0.025  # without the cap: 0.03 (the liar's update is the model)
    r = guard.max_weight_ratio
    np.testing.assert_allclose(w, (3 * 0.01 + r * 0.03) / (3 + r), rtol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5.0, 0.0])
def test_a_weight_that_is_not_a_positive_number_rejects_the_site_by_name(bad):
    sites = [Site("a"), Site("b"), Site("odd", weight=bad, step=0.02)]
    guard = SiteGuard(build_strategy("fedavg"), min_sites=1)
    w = _run(guard, FakeGrid(sites), rounds=1)
    assert "num-examples" in guard.rounds[1].rejected["odd"]
    np.testing.assert_allclose(w, 0.01, rtol=1e-6)


@pytest.mark.parametrize("name", STRATEGIES)
def test_sites_that_send_no_count_are_averaged_equally(name):
    # the sites' replies no longer carry an exact example count (docs/privacy.md)
    guard = SiteGuard(build_strategy(name), min_sites=1)
    w = _run(guard, FakeGrid([Site("a", weight=None), Site("b", weight=None, step=0.02), Site("c", weight=None, step=0.03)]), rounds=1)
    assert np.all(np.isfinite(w))
    if name in ("fedavg", "fedprox", "fedmedian"):
        np.testing.assert_allclose(w, 0.02, rtol=1e-5)


def test_sites_disclosing_different_metrics_are_still_aggregated():
    # one site's policy discloses its accountant inputs, the other's does not
    sites = [Site("a", metrics={"noise_multiplier": 1.1, "sample_rate": 0.01}), Site("b")]
    guard = SiteGuard(build_strategy("fedavg"), min_sites=1)
    w = _run(guard, FakeGrid(sites), rounds=1)
    np.testing.assert_allclose(w, 0.01, rtol=1e-6)
    assert guard.rounds[1].aggregated_train["noise_multiplier"] == pytest.approx(1.1)  # over the sites that sent it
    assert "num-examples" not in guard.rounds[1].aggregated_train


def test_evaluation_metrics_are_weighted_with_the_same_cap():
    sites = [Site("a", step=0.0, weight=1), Site("b", step=0.0, weight=1), Site("liar", step=1.0, weight=1e9)]
    guard = SiteGuard(build_strategy("fedavg"), min_sites=1)
    _run(guard, FakeGrid(sites), rounds=1)
    val_loss = guard.rounds[1].aggregated_evaluate["val_loss"]
    assert val_loss < 1.9  # without the cap: 2.0, the liar's figure
    r = guard.max_weight_ratio
    assert val_loss == pytest.approx((2 * 1.0 + r * 2.0) / (2 + r))


# -- the run report --------------------------------------------------------------------------------

def test_the_report_of_a_run_that_ran_out_of_sites_says_so(tmp_path):
    """The coordinator end to end (initial head, rounds, checkpoints, report) with sites that stop."""
    import json

    from fed.config import RunConfig
    from server.coordinator.server_app import run_federation

    class HeadSite(Site):  # discloses its accountant's figures (the model card lists them)
        def train(self, msg: Message) -> RecordDict:
            content = super().train(msg)
            content["metrics"] = MetricRecord({**content["metrics"], "delta": 1e-5, "noise_multiplier": 1.0,
                                               "sample_rate": 0.1, "steps": 10})
            return content

    grid = FakeGrid([HeadSite("a", budget=1), HeadSite("b", budget=1)])
    cfg = RunConfig.from_run_config({"num-server-rounds": 5, "feature-projection": 0, "run-dir": str(tmp_path / "run")})
    run_federation(grid, cfg)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["rounds_completed"] == 2 and report["num_rounds"] == 5
    assert "privacy budget exhausted: a, b" in report["stopped_early"]
    assert sorted(report["rounds"][-1]["excluded"]) == ["a", "b"]
    assert (tmp_path / "run" / "global").exists()  # round 1's head is the run's model
