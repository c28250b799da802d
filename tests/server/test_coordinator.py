"""Coordinator pieces without a running federation: strategies, SiteGuard screening, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.coordinator.checkpoint import CheckpointStore, config_hash
from server.coordinator.strategy import STRATEGIES, SiteGuard, build_strategy


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower messages need a task identity (the simulation engine sets one the same way)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield


def _reply(node: int, site: str, w: np.ndarray, status: str = "ok") -> Message:
    content = RecordDict({"site": ConfigRecord({"site": site, "status": status, "reason": "", "accountant": "rdp"}),
                          "metrics": MetricRecord({"num-examples": 10, "epsilon": 1.0})})
    if status == "ok":
        content["arrays"] = ArrayRecord({"w": Array(w.astype(np.float32))})
    m = Message(content, dst_node_id=0, message_type="train")
    m.metadata.__dict__["_src_node_id"] = node  # as if it came back from that node
    return m


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_aggregates_through_the_guard(name):
    guard = SiteGuard(build_strategy(name, min_sites=1), min_sites=1)
    base = np.zeros(4, np.float32)
    guard._global = {"w": base}
    if hasattr(guard.inner, "current_arrays"):
        guard.inner.current_arrays = {"w": base}
    replies = [_reply(i, f"site-{i}", base + i + 1) for i in range(3)]
    arrays, _ = guard.aggregate_train(1, replies)
    assert arrays is not None and np.all(np.isfinite(arrays["w"].numpy()))


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_site_without_a_defined_auroc_does_not_make_the_federation_figure_nan(name):
    # e.g. a small site whose validation split has a single class: its AUROC is undefined
    def ev(node: int, site: str, n: int, auroc: float) -> Message:
        content = RecordDict({"site": ConfigRecord({"site": site, "status": "ok", "reason": "", "accountant": "rdp"}),
                              "metrics": MetricRecord({"num-examples": n, "auroc": auroc, "val_loss": 1.0 + node})})
        m = Message(content, dst_node_id=0, message_type="evaluate")
        m.metadata.__dict__["_src_node_id"] = node
        return m

    guard = SiteGuard(build_strategy(name, min_sites=1), min_sites=1)
    metrics = guard.aggregate_evaluate(1, [ev(0, "site-0", 10, 0.6), ev(1, "site-1", 3, float("nan")), ev(2, "site-2", 30, 0.8)])
    assert metrics["auroc"] == pytest.approx((10 * 0.6 + 30 * 0.8) / 40)
    assert metrics["val_loss"] == pytest.approx((10 * 1.0 + 3 * 2.0 + 30 * 3.0) / 43)
    assert guard._log(1).evaluate["site-1"]["auroc"] != guard._log(1).evaluate["site-1"]["auroc"]  # still reported as NaN


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="fedavg"):
        build_strategy("fedsgdx")


def test_guard_rejects_nan_and_outlier_updates_and_names_the_site():
    guard = SiteGuard(build_strategy("fedavg"), min_sites=2, outlier_factor=5.0)
    guard._global = {"w": np.zeros(4, np.float32)}
    replies = [_reply(1, "a", np.full(4, 0.1)), _reply(2, "b", np.full(4, 0.12)), _reply(3, "c", np.full(4, 0.11)),
               _reply(4, "nan-site", np.array([0, np.nan, 0, 0])), _reply(5, "far-site", np.full(4, 50.0))]
    arrays, _ = guard.aggregate_train(1, replies)
    rl = guard.rounds[1]
    assert "non-finite" in rl.rejected["nan-site"] and "outlier" in rl.rejected["far-site"]
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(4, 0.11), rtol=1e-5)


def test_guard_keeps_the_global_model_when_too_few_sites_remain():
    guard = SiteGuard(build_strategy("fedavg"), min_sites=2, max_update_norm=1.0)
    guard._global = {"w": np.zeros(4, np.float32)}
    arrays, _ = guard.aggregate_train(1, [_reply(1, "a", np.full(4, 0.1)), _reply(2, "b", np.full(4, 9.0))])
    assert arrays is None and "above the bound" in guard.rounds[1].rejected["b"]


def test_guard_excludes_exhausted_sites_from_later_selection():
    guard = SiteGuard(build_strategy("fedavg"), min_sites=1)
    guard._global = {"w": np.zeros(4, np.float32)}
    guard.aggregate_train(1, [_reply(1, "a", np.full(4, 0.1)), _reply(7, "spent", None, status="budget-exhausted")])
    assert guard.exhausted_sites == {"spent"} and 7 in guard.excluded_nodes

    class Grid:
        def get_node_ids(self):
            return [1, 7]

    from server.coordinator.strategy import _SelectableGrid

    assert _SelectableGrid(Grid(), guard.excluded_nodes).get_node_ids() == [1]


def test_checkpoints_are_atomic_and_latest_wins(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(1, {"w": np.ones(3, np.float32)}, {}, {"config_hash": "x", "rounds": {}})
    store.save(2, {"w": np.full(3, 2, np.float32)}, {"m_t/w": np.zeros(3)}, {"config_hash": "x", "rounds": {}})
    ck = store.latest()
    assert ck.round == 2 and ck.weights["w"][0] == 2 and "m_t/w" in ck.strategy_arrays

    import os

    def crash(*a, **k):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.save(3, {"w": np.full(3, 3, np.float32)}, {}, {"config_hash": "x", "rounds": {}})
    monkeypatch.undo()
    assert store.latest().round == 2  # LATEST still points at the last completed round


def test_config_hash_ignores_where_things_are_written():
    a = {"lr": 0.1, "run-dir": "/a", "resume": False}
    assert config_hash(a) == config_hash({**a, "run-dir": "/b", "resume": True})
    assert config_hash(a) != config_hash({**a, "lr": 0.2})
