"""Secure aggregation (Flower's SecAgg+): the coordinator sees only the sum of the sites' updates.

Fast tests run the real protocol (Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod`` around
echofleet's site and coordinator code) over an in-process grid whose messages go through Flower's
protobuf serialisation, with a stand-in for local training (known updates). The slow test runs a
whole federation in Flower's simulation engine: 3 phantom hospitals, 2 rounds, echocare-tiny.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from sim_helpers import SITE_CPUS

from fed.config import RunConfig, RunConfigError
from fed.secagg import NonFiniteUpdate, bound_update, check_unmask_request, secure_aggregation_mod
from fed.task import STATUS_EXHAUSTED, STATUS_OK, Reply, RoundConfig
from server.coordinator.secagg import (QUANTIZATION_RANGE, MeteredGrid, SecAggSettings, check_secagg_config,
                                       secure_round)
from server.coordinator.strategy import SiteGuard, build_strategy

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.xdist_group("flower")  # starts a Flower federation: one worker runs them all (tests/conftest.py)
BOUND = 2.0
SHAPES = {"net.weight": (3, 16), "net.bias": (3,)}
KEYS = list(SHAPES)


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps new messages with the running task's identity (set by its runtime)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


# -- the site-side bound ---------------------------------------------------------------------------

def test_bound_update_clips_the_update_norm_and_refuses_non_finite():
    rng = np.random.default_rng(0)
    g = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    big = {k: g[k] + 3.0 * rng.normal(size=s) for k, s in SHAPES.items()}
    small = {k: g[k] + 1e-3 * rng.normal(size=s) for k, s in SHAPES.items()}
    u = bound_update(big, g, KEYS, BOUND)
    norm = math.sqrt(sum(float(np.sum(d ** 2)) for d in u.delta.values()))
    assert u.norm > BOUND and norm == pytest.approx(BOUND)
    for k in KEYS:  # same direction, only shorter
        np.testing.assert_allclose(u.delta[k], (big[k] - g[k]) * BOUND / u.norm)
    v = bound_update(small, g, KEYS, BOUND)  # within the bound: unchanged
    assert v.scale == 1.0
    for k in KEYS:
        np.testing.assert_array_equal(v.delta[k], small[k] - g[k])
    bad = {**small, "net.bias": np.array([0.0, np.nan, 0.0])}
    with pytest.raises(NonFiniteUpdate):
        bound_update(bad, g, KEYS, BOUND)
    with pytest.raises(ValueError, match="no parameter"):
        bound_update({"net.weight": small["net.weight"]}, g, KEYS, BOUND)


def test_settings_and_incompatible_run_configs_are_refused_naming_the_key():
    with pytest.raises(RunConfigError, match="'secagg-update-bound' must be > 0"):
        SecAggSettings(secagg_update_bound=0.0)
    with pytest.raises(RunConfigError, match="'secagg-num-shares'"):
        SecAggSettings(secagg_num_shares=1.5)
    with pytest.raises(RunConfigError, match="'secagg-reconstruction-threshold' must be in \\(0.5, 1\\]"):
        SecAggSettings(secagg_reconstruction_threshold=0.5)
    assert SecAggSettings.from_run_config(RunConfig()).secagg_update_bound == SecAggSettings.secagg_update_bound
    # once the RunConfig has the keys, they are read from it
    cfg = SimpleNamespace(secure_aggregation=True, secagg_update_bound=3.0)
    s = SecAggSettings.from_run_config(cfg)
    assert s.secure_aggregation and s.secagg_update_bound == 3.0 and s.secagg_num_shares == 1.0
    with pytest.raises(RunConfigError, match="'strategy' must be fedavg or fedprox"):
        check_secagg_config(RunConfig(strategy="fedmedian"))
    with pytest.raises(RunConfigError, match="'central-dp-noise' must be 0"):
        check_secagg_config(RunConfig(central_dp_noise=1.0))
    check_secagg_config(RunConfig(strategy="fedprox"))


def test_a_site_refuses_to_be_called_dropped_after_it_sent_its_masked_update():
    def unmask(dead: list[int]) -> Message:
        cfg = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [2, 3], Key.DEAD_NODE_ID_LIST: dead})
        return Message(RecordDict({RECORD_KEY_CONFIGS: cfg}), dst_node_id=7, message_type="train")

    check_unmask_request(unmask([3]))  # a neighbour dropped: fine
    with pytest.raises(ValueError, match="claims this site dropped out"):
        check_unmask_request(unmask([7]))


# -- the protocol, in process -----------------------------------------------------------------------

def _copy(content: RecordDict) -> RecordDict:
    """What crosses the network: Flower's protobuf form of the content."""
    return recorddict_from_proto(recorddict_to_proto(content))


class InProcessGrid:
    """A Grid whose sites are in-process callables; every message is serialised both ways."""

    def __init__(self, sites: dict[int, object]):
        self.sites = sites
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in sites}
        self.run = SimpleNamespace(run_id=1)
        self.replies: list[Message] = []  # everything that reached the coordinator

    def get_node_ids(self):
        return list(self.sites)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            n = m.metadata.dst_node_id
            incoming = Message(_copy(m.content), dst_node_id=n, message_type=m.metadata.message_type,
                               group_id=m.metadata.group_id)
            try:
                reply = self.sites[n](incoming, self.contexts[n])
                reply = Message(_copy(reply.content), reply_to=incoming)
            except Exception as e:  # a site that fails answers with an error (as Flower's ClientApp does)
                reply = Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=incoming)
            self.replies.append(reply)
            out.append(reply)
        return out


def _site(name: str, delta: dict[str, np.ndarray] | None, status: str = STATUS_OK, seen: dict | None = None):
    """A site whose local training moves the global head by ``delta`` (NaN allowed: a broken site)."""

    def train(policy, rc: RoundConfig, global_):
        if seen is not None:
            seen[name] = {k: np.array(v) for k, v in global_.items()}
        if status != STATUS_OK:
            return Reply(status, name, reason="budget exhausted" if status == STATUS_EXHAUSTED else "no")
        return Reply(STATUS_OK, name, arrays={k: global_[k] + delta[k] for k in KEYS},
                     metrics={"epsilon": 1.0, "delta": 1e-5})

    mod = secure_aggregation_mod(lambda ctx: SimpleNamespace(site_name=name, device="cpu"), train=train)

    def plain(msg, ctx):
        raise AssertionError("a SecAgg+ message reached the plain handler")

    return lambda msg, ctx: mod(msg, ctx, plain)


def _run(sites: dict[int, object], weights: dict[str, np.ndarray], rnd: int = 1, guard: SiteGuard | None = None):
    grid = MeteredGrid(InProcessGrid(sites))
    guard = guard or SiteGuard(build_strategy("fedavg"))
    new = secure_round(grid, rnd, weights, RoundConfig(server_round=rnd), KEYS, SecAggSettings(secagg_update_bound=BOUND),
                       guard)
    return new, guard, grid


def _clip(d: dict[str, np.ndarray], bound: float = BOUND) -> dict[str, np.ndarray]:
    """The bounded update, computed here independently of fed.secagg.bound_update."""
    n = math.sqrt(sum(float(np.sum(v ** 2)) for v in d.values()))
    return {k: v * min(1.0, bound / n) for k, v in d.items()}


@pytest.fixture()
def head():
    rng = np.random.default_rng(1)
    return {**{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()},
            "proj_mean": rng.normal(size=(16,)).astype(np.float32)}  # a fixed buffer: never updated


def test_secagg_round_applies_the_mean_of_bounded_updates_and_the_coordinator_sees_only_masks(head):
    rng = np.random.default_rng(2)
    deltas = {f"site-{i}": {k: s * rng.normal(size=v) for k, v in SHAPES.items()}
              for i, s in enumerate([0.05, 0.1, 1.0])}  # site-2's update is far above the bound: clipped
    seen: dict = {}
    new, guard, grid = _run({i + 1: _site(n, d, seen=seen) for i, (n, d) in enumerate(deltas.items())}, head)
    assert new is not None
    step = 2 * BOUND / QUANTIZATION_RANGE
    expected = {k: np.mean([_clip(d)[k] for d in deltas.values()], axis=0) for k in KEYS}
    for k in KEYS:
        np.testing.assert_allclose(new[k] - head[k].astype(np.float64), expected[k], atol=3 * step + 1e-6)
        assert new[k].dtype == np.float32
    np.testing.assert_array_equal(new["proj_mean"], head["proj_mean"])
    for name in deltas:  # every site trained from the coordinator's head, buffers included
        assert set(seen[name]) == set(head) and all(np.array_equal(seen[name][k], head[k]) for k in head)
    rl = guard.rounds[1]
    assert rl.aggregated_train["sites_summed"] == 3 and rl.aggregated_train["update_norm"] <= BOUND
    assert {s: e["status"] for s, e in rl.train.items()} == {n: "ok" for n in deltas}
    assert {s: e["device"] for s, e in rl.train.items()} == {n: "cpu" for n in deltas}  # a capability, in plain view
    assert rl.aggregated_train["secagg_bytes_up_per_site"] > 0

    # What reached the coordinator from each site: no parameter array, and a masked vector that
    # bears no relation to the site's update (its plain quantization would correlate ~1).
    masked = [r for r in grid._grid.replies if r.has_content() and Key.MASKED_PARAMETERS in
              r.content.config_records.get(RECORD_KEY_CONFIGS, {})]
    assert len(masked) == 3
    for r, d in zip(sorted(masked, key=lambda r: r.metadata.src_node_id), deltas.values()):
        assert all(len(a) == 0 for a in r.content.array_records.values())
        vectors = [_nd(b) for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        assert [v.shape for v in vectors] == [(1,)] + [SHAPES[k] for k in KEYS]  # weight factor, then the update
        seen_by_coordinator = np.concatenate([a.ravel() for a in dequantize(vectors[1:], BOUND, QUANTIZATION_RANGE)])
        plain = np.concatenate([_clip(d)[k].ravel() for k in KEYS])
        assert abs(np.corrcoef(seen_by_coordinator, plain)[0, 1]) < 0.5
        assert np.ptp(np.concatenate([v.ravel() for v in vectors[1:]])) > 2**31  # spread over the modulus


def _nd(b: bytes) -> np.ndarray:
    from flwr.common import bytes_to_ndarray

    return bytes_to_ndarray(b)


def test_a_broken_site_drops_out_and_an_exhausted_site_adds_nothing(head):
    rng = np.random.default_rng(3)
    good = [{k: 0.1 * rng.normal(size=v) for k, v in SHAPES.items()} for _ in range(2)]
    nan = {k: np.full(v, np.nan) for k, v in SHAPES.items()}
    sites = {1: _site("site-0", good[0]), 2: _site("site-1", good[1]), 3: _site("site-2", nan),
             4: _site("site-3", None, status=STATUS_EXHAUSTED)}
    new, guard, _ = _run(sites, head)
    expected = {k: (good[0][k] + good[1][k]) / 2 for k in KEYS}  # the NaN site dropped, the exhausted one weighs 0
    for k in KEYS:
        np.testing.assert_allclose(new[k] - head[k].astype(np.float64), expected[k], atol=3 * 2 * BOUND / QUANTIZATION_RANGE + 1e-6)
        assert np.all(np.isfinite(new[k]))
    rl = guard.rounds[1]
    assert rl.aggregated_train["sites_summed"] == 2 and rl.aggregated_train["sites_dropped"] == 1
    assert rl.excluded == ["site-3"] and 4 in guard.excluded_nodes
    # next round: the exhausted site is not asked again
    asked = []
    sites[3] = _site("site-2", good[0])  # repaired
    sites2 = {n: (lambda f, n: (lambda m, c: (asked.append(n), f(m, c))[1]))(f, n) for n, f in sites.items()}
    _run(sites2, new, rnd=2, guard=guard)
    assert 4 not in asked and {1, 2, 3} <= set(asked)


def test_a_site_that_skips_its_bound_gets_the_aggregate_rejected(head):
    """The coordinator cannot screen one update; it checks the sum. A site that bypasses its own
    bound (here: every coordinate at +bound, the most SecAgg+'s quantization lets through) pushes
    the mean's norm above the bound: the round is refused and the global head stays."""
    rng = np.random.default_rng(4)
    honest = [{k: 0.05 * rng.normal(size=v) for k, v in SHAPES.items()} for _ in range(2)]

    def rogue(msg, ctx):
        import fed.secagg as site_side

        real = site_side.bound_update
        try:  # this site's code does not clip
            site_side.bound_update = lambda t, g, keys, b: site_side.BoundedUpdate(
                {k: np.full(np.shape(g[k]), b) for k in keys}, 0.0, 1.0)
            return _site("site-2", honest[0])(msg, ctx)
        finally:
            site_side.bound_update = real

    new, guard, _ = _run({1: _site("site-0", honest[0]), 2: _site("site-1", honest[1]), 3: rogue}, head)
    assert new is None
    assert "exceeds the sites' bound" in guard.rounds[1].aggregated_train["rejected"]
    # the same round without the rogue site is accepted
    new, guard, _ = _run({1: _site("site-0", honest[0]), 2: _site("site-1", honest[1]),
                          3: _site("site-2", honest[0])}, head)
    assert new is not None and "rejected" not in guard.rounds[1].aggregated_train


def test_plain_messages_pass_through_the_mod_unchanged():
    mod = secure_aggregation_mod(lambda ctx: SimpleNamespace(site_name="site-0"))
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1, message_type="train")
    sentinel = object()
    assert mod(msg, None, lambda m, c: sentinel) is sentinel
    ev = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({})}), dst_node_id=1, message_type="evaluate")
    assert mod(ev, None, lambda m, c: sentinel) is sentinel


# -- a whole federation in Flower's simulation engine ------------------------------------------------

PHANTOMS = "phantom:90?profiles=linear-a,convex-b,linear-c&seed=0"  # a prefix of test_federation's phantoms (cached)


def run_phantom_federation(out: Path, secure: bool, cache: str, rounds: int = 2, sites: int = 3,
                           watch_dir: Path | None = None, feature_projection: int = 0) -> tuple[dict, dict]:
    """Run a small phantom federation (plain or SecAgg+) with the real ServerApp logic and ClientApp
    handlers, as echofleet.simulation does. Returns (report, cost): wall seconds and content bytes
    per site per round of the training messages (``MeteredGrid``).

    ``watch_dir``: each site writes there the global head it received and its trained head
    (``train-<site>-<round>.npz``), and what left it in the masked-vector stage (``masked-...``)."""
    os.environ["FLWR_HOME"] = str(out / ".flwr")
    from flwr.app.message_type import MessageType
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from echocare.data import open_data
    from fed.client_app import handle_evaluate, handle_train, policy_from_context
    from fed.policy import SitePolicy, write_policy
    from fed.task import train_secure_round
    from server.coordinator.secagg import run_federation_secagg
    from server.coordinator.server_app import run_federation

    sites_dir = out / "sites"
    for k in range(sites):
        write_policy(SitePolicy(data=PHANTOMS, site_name=f"site-{k}", state_dir=str(sites_dir / f"site-{k}" / "state"),
                                allowed_tasks=["classify"], target_epsilon=8.0, partition="iid", partition_index=k,
                                partition_count=sites, cache_dir=cache), sites_dir / f"site-{k}" / "policy.toml")
    cfg = RunConfig(num_server_rounds=rounds, labels=",".join(open_data(PHANTOMS).classes), encoder_config="echocare-tiny",
                    feature_projection=feature_projection, local_epochs=1, batch_size=16, lr=0.5,
                    run_dir=str(out / "run"), num_sites=sites, sim_sites_dir=str(sites_dir), public_cache_dir=cache)
    result: dict = {}

    server = ServerApp()

    @server.main()
    def _main(grid, context) -> None:
        metered = MeteredGrid(grid)
        start = time.perf_counter()
        result["report"] = (run_federation_secagg(metered, cfg, SecAggSettings(secure_aggregation=True)) if secure
                            else run_federation(metered, cfg))
        result["seconds"] = time.perf_counter() - start
        result["bytes"] = {f"{t}-{d}": b for (t, d), b in metered.bytes.items()}

    def recording_train(policy, rc, global_):
        reply = train_secure_round(policy, rc, global_)
        if watch_dir is not None and reply.arrays is not None:
            np.savez(watch_dir / f"train-{policy.site_name}-{rc.server_round}.npz",
                     **{f"global/{k}": v for k, v in global_.items()}, **{f"trained/{k}": v for k, v in reply.arrays.items()})
        return reply

    def watch(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if watch_dir is not None and reply.has_content():
            cfgs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
            if Key.MASKED_PARAMETERS in cfgs:
                site = int(ctx.node_config["partition-id"])
                np.savez(watch_dir / f"masked-site-{site}-{time.time_ns()}.npz",
                         *[_nd(b) for b in cfgs[Key.MASKED_PARAMETERS]],
                         arrays=np.array(sum(len(a) for a in reply.content.array_records.values())))
        return reply

    client = ClientApp(mods=[watch, secure_aggregation_mod(lambda ctx: policy_from_context(ctx, str(sites_dir)),
                                                           train=recording_train)])

    @client.train()
    def train(msg, context):
        return handle_train(msg, context, str(sites_dir))

    @client.evaluate()
    def evaluate(msg, context):
        return handle_evaluate(msg, context, str(sites_dir))

    run_simulation(server_app=server, client_app=client, num_supernodes=sites,
                   backend_config={"client_resources": {"num_cpus": SITE_CPUS, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": max(1, os.cpu_count() or 1), "include_dashboard": False,
                                                 "log_to_driver": False}})
    assert "report" in result, "the federation did not complete"
    per = 1.0 / (rounds * sites)
    cost = {"seconds": result["seconds"],
            "train_bytes_up_per_site_round": result["bytes"].get(f"{MessageType.TRAIN}-up", 0) * per,
            "train_bytes_down_per_site_round": result["bytes"].get(f"{MessageType.TRAIN}-down", 0) * per,
            "bytes": result["bytes"]}
    return result["report"], cost


@pytest.mark.slow
def test_secagg_federation_in_simulation_sums_the_private_updates(tmp_path, phantom_feature_cache, one_ray):
    # the session's Ray and feature cache (conftest.py): no Ray start, no phantom encoded twice
    watch = tmp_path / "watch"
    watch.mkdir()
    report, cost = run_phantom_federation(tmp_path / "secagg", True, phantom_feature_cache, watch_dir=watch)
    print("secagg cost:", json.dumps(cost))
    assert report["rounds_completed"] == 2 and report.get("global_model") == "global"
    assert report["site_devices"] == {f"site-{k}": "cpu" for k in range(3)}  # the device class, as plain rounds report it
    rounds = {r["round"]: r for r in report["rounds"]}
    bound = SecAggSettings().secagg_update_bound
    step = 2 * bound / QUANTIZATION_RANGE
    from safetensors.numpy import load_file

    final = load_file(str(tmp_path / "secagg" / "run" / "global" / "head.safetensors"))
    for rnd in (1, 2):
        agg = rounds[rnd]["aggregated"]["train"]
        assert agg["secure_aggregation"] == 1 and agg["sites_summed"] == 3 and "rejected" not in agg, agg
        assert {s: e["status"] for s, e in rounds[rnd]["sites"].items()} == {f"site-{k}": "ok" for k in range(3)}
        runs = [np.load(watch / f"train-site-{k}-{rnd}.npz") for k in range(3)]
        keys = sorted(k.split("/", 1)[1] for k in runs[0].files if k.startswith("trained/"))
        received = {k: runs[0][f"global/{k}"] for k in keys}
        for r in runs[1:]:  # every site trained from the same global head
            assert all(np.array_equal(r[f"global/{k}"], received[k]) for k in keys)
        # the mean of the sites' private (DP, bounded) updates
        deltas = [_clip({k: r[f"trained/{k}"].astype(np.float64) - received[k] for k in keys}, bound) for r in runs]
        expected = {k: received[k] + np.mean([d[k] for d in deltas], axis=0) for k in keys}
        after = final if rnd == 2 else {k: np.load(watch / "train-site-0-2.npz")[f"global/{k}"] for k in keys}
        for k in keys:
            np.testing.assert_allclose(after[k], expected[k], atol=3 * step + 1e-6)
            assert not np.allclose(after[k], received[k])  # the head did move
    # What left each site in the masked-vector stage: no arrays; masked integers, not its update.
    masked = sorted(watch.glob("masked-site-*.npz"))
    assert len(masked) == 6
    for f in masked:
        z = np.load(f)
        assert int(z["arrays"]) == 0
        vec = np.concatenate([z[f"arr_{i}"].ravel() for i in range(1, len(z.files) - 1)])
        assert vec.min() >= 0 and vec.max() < 2**32 and np.ptp(vec) > 2**31  # uniform over the modulus
        assert np.abs(vec.astype(np.float64) - QUANTIZATION_RANGE / 2).mean() > 2**28  # a plain update sits near 2**21



def test_a_site_whose_policy_requires_secure_aggregation_refuses_plain_training():
    policy = SimpleNamespace(site_name="site-0", require_secure_aggregation=True)
    mod = secure_aggregation_mod(lambda ctx: policy)
    plain = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1, message_type="train")
    trained = []
    reply = mod(plain, None, lambda m, c: trained.append(m))
    assert trained == []  # nothing trained, nothing charged
    site = reply.content.config_records["site"]
    assert site["status"] == "refused" and "only under secure aggregation" in site["reason"]
    assert "arrays" not in reply.content
    ev = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="evaluate")
    assert mod(ev, None, lambda m, c: "evaluated") == "evaluated"  # evaluation is not an update: unchanged
