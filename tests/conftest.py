"""Shared fixtures. Real data lives in ../shared/data beside the repository (never copied in)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ECHOFLEET_SHARED_DATA", REPO.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set ECHOFLEET_SHARED_DATA to ../shared/data)")
    return path


@pytest.fixture(scope="session")
def busi_root() -> Path:
    return _need(SHARED_DATA / "busi" / "Dataset_BUSI_with_GT")


@pytest.fixture(scope="session")
def hc18_root() -> Path:
    return _need(SHARED_DATA / "hc18")


@pytest.fixture(scope="session")
def pocus_root() -> Path:
    return _need(SHARED_DATA / "pocus")


# ------------------------------------------------------------------ shared by the federation tests
#: The phantom sets the federation tests train on are prefixes of this one (``phantom:N`` with the same
#: profiles and seed lists images 0..N-1 in the same order), so one session cache holds their features.
PHANTOM_PROFILES = "profiles=linear-a,convex-b,linear-c"


#: The public reference phantoms of every classification head's projection (fed.features.DEFAULT_REFERENCE)
#: and the first 90 of the federation tests' phantom set (``phantom:90?...``: tests/echofleet/test_federation*.py,
#: test_secagg.py): what the federation tests on both pytest workers encode first.
WARM_SPECS = ("phantom:90?profiles=linear-a,convex-b,linear-c&seed=0",)


@pytest.fixture(scope="session")
def phantom_feature_cache(tmp_path_factory) -> str:
    """One feature cache for every simulated federation of the test run (sites' images and the
    coordinator's public reference phantoms), shared by the pytest workers (``-n 2``: a folder beside
    their own temp folders): each image is encoded once, however many federations, on whichever worker,
    use it. Safe to share: keys are content hashes of image, encoder and preprocessing (a site never
    reads another image's features), and each shard is written to a temp folder and renamed into
    place (fed/cache.py: the sites of one federation already write it concurrently)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp is RUN_TEMP/popen-gwN
        base = base.parent
    path = base / "phantom-feature-cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def warm_phantom_features(phantom_feature_cache) -> str:
    """``phantom_feature_cache`` holding the features every phantom federation test needs first: the
    300 public reference phantoms of the default projection (echocare-tiny, default preprocessing,
    as the coordinator computes it) and :data:`WARM_SPECS`. Encoded once per test run, in this process
    (both cores), by the first worker that asks; another worker asking meanwhile waits on the lock
    instead of encoding the same images again (300 reference phantoms: 1-2 min on 2 cores)."""
    from filelock import FileLock

    cache = Path(phantom_feature_cache)
    with FileLock(str(cache / ".warm.lock")):
        done = cache / ".warm.done"
        if not done.exists():
            from echocare.data import open_data
            from echocare.preprocess import PreprocessSpec
            from fed.config import RunConfig
            from fed.features import DEFAULT_REFERENCE, pooled_features

            # the encoder and preprocessing a run config names (RunConfig.round_config), on the CPU in fp32
            # as on this machine's sites and as the coordinator's projection always is: the same cache keys
            ref = RunConfig(encoder_config="echocare-tiny").encoder_ref()
            for data in (DEFAULT_REFERENCE, *WARM_SPECS):
                pooled_features(open_data(data), ref, PreprocessSpec(), cache)
            done.touch()
    return phantom_feature_cache


@pytest.fixture(scope="session")
def one_ray():
    """One Ray instance for every in-process Flower simulation of the session.

    Flower's Ray backend starts Ray when it is not running and shuts it down at the end of each
    simulation (``RayBackend.terminate``); a start costs 5-15 s on 2 cores, paid once per simulation.
    Here ``terminate`` still ends the simulation's actors (each simulation builds its own pool, whose
    ClientApp processes start fresh) but leaves Ray running for the next simulation; Ray is shut down
    when the session ends. The first simulation's ``init_args`` start it (every test passes the same
    CPU count). A simulation in a subprocess (``echofleet simulate``) starts its own Ray as users see it."""
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    def terminate_actors_only(self: RayBackend) -> None:
        # every actor of the pool, idle or still busy (a failed simulation), so none keeps its CPUs
        if self.pool:
            for actor in [*self.pool.pool, *self.pool._future_to_actor.values()]:
                ray.kill(actor)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RayBackend, "terminate", terminate_actors_only)
        yield
    if ray.is_initialized():
        ray.shutdown()




# ------------------------------------------------------------------ two pytest workers (`make test`)
#: The xdist group of every test file that starts a Flower federation (a SuperLink, SuperNodes or a
#: Ray simulation): such a file says ``pytestmark = pytest.mark.xdist_group("flower")``. Under
#: ``pytest -n 2 --dist loadgroup`` the whole group runs on one worker, one federation after the other,
#: while the other worker takes every other file: two federations never compete for the 2 cores, but
#: that chain alone is longer than the whole run under ``--dist loadfile`` (the Makefile's comment).
FLOWER_GROUP = "flower"

#: The test files that take minutes on 2 cores (``--durations``, `make test`, 2026-11-30), longest first,
#: except that the second is one that needs no feature warm-up (``warm_phantom_features``): the second
#: worker starts it instead of waiting for the first worker's warm-up. Under ``--dist loadfile
#: --no-loadscope-reorder`` (the Makefile) the workers take these first, each the next one when it is
#: free, and the short files fill in at the end: the run does not end with one worker on a long
#: federation while the other idles. Other files keep their collection order.
SLOW_FILES = (
    "tests/echofleet/test_federation.py",  # phantom_run (600 phantoms, 2 rounds), BUSI, HC18
    "tests/echofleet/test_deploy_localhost.py",  # a TLS SuperLink, SuperNodes, a SecAgg+ round
    "tests/echofleet/test_federation_small.py",  # killed and resumed (two 3-round runs), same seed, ...
    "tests/echofleet/test_release_federation.py",
    "tests/echofleet/test_flwr_run.py",
    "tests/echofleet/test_site_state.py",
    "tests/echofleet/test_secagg.py",
    "tests/edge/test_precision_auto.py",
    "tests/edge/test_edge_quantize.py",
    "tests/edge/test_edge_build.py",
)


def _slow_rank(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    return SLOW_FILES.index(path) if path in SLOW_FILES else len(SLOW_FILES)


def _group(item: pytest.Item) -> str | None:
    """The item's xdist group, read as pytest-xdist reads the mark (first argument or ``name``)."""
    for mark in item.iter_markers("xdist_group"):
        return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a pytest-xdist worker only (a plain ``pytest`` run is untouched): :data:`SLOW_FILES` first
    (``--dist loadfile``, the Makefile), except on a ``--dist loadgroup`` worker, where

    - the scheduler reads an item's group from a ``@group`` suffix of its node id, which pytest-xdist
      3.8 writes into ``item._nodeid``; pytest 9.2 keeps node ids in ``item._id`` and ignores that, so
      every group was silently spread over the workers (pytest-dev/pytest-xdist#1386). The suffix is
      written here where this pytest keeps it (with an older pytest, pytest-xdist's hook does it);
    - the Flower group comes first. With ``--no-loadscope-reorder`` (the Makefile) the scheduler hands
      out groups in collection order, so the longest chain starts at once on one worker."""
    if getattr(config, "workerinput", None) is None:  # not a pytest-xdist worker
        return
    if not getattr(config.option, "loadgroup", False):  # set by pytest-xdist on its workers (its "dist" is "no")
        items.sort(key=_slow_rank)  # stable: each file stays contiguous; see SLOW_FILES
        return
    for item in items:
        group = _group(item)
        if group is not None and hasattr(item, "_id") and not item.nodeid.endswith(f"@{group}"):
            item._id = type(item._id).parse(f"{item.nodeid}@{group}")
    items.sort(key=lambda item: _group(item) != FLOWER_GROUP)  # stable: each file stays contiguous, in order


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown (and unused) where xdist is not installed
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile``: a worker's next file is queued when one of its tests is left (not two).

    ``--dist loadgroup`` with one change: a test without a group is scheduled with its file, as
    ``--dist loadfile`` does (plain loadgroup hands such tests out one by one, and a module fixture
    shared by tests of one file would then be built on both workers)."""
    if config.getoption("dist") == "loadfile":
        from xdist.scheduler import LoadFileScheduling

        class FileWhenFree(LoadFileScheduling):
            def _reschedule(self, node) -> None:
                # pytest-xdist queues a worker's next file when 2 of its tests are left; this queues it
                # when 1 is left (a worker holds its last test until it knows what follows). With long
                # tests a file queued early waits behind them while the other worker may run dry.
                if node.shutting_down or not self.workqueue or self._pending_of(self.assigned_work[node]) <= 1:
                    super()._reschedule(node)

        return FileWhenFree(config, log)
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class GroupOrFile(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)  # the group after "@", else the node id itself
            return nodeid.split("::", 1)[0] if scope == nodeid else scope

    return GroupOrFile(config, log)
