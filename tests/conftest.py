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


@pytest.fixture(scope="session")
def phantom_feature_cache(tmp_path_factory) -> str:
    """One feature cache for every simulated federation of the session (sites' images and the
    coordinator's public reference phantoms): each image is encoded once, however many federations
    use it. Safe to share: keys are content hashes of image, encoder and preprocessing (a site never
    reads another image's features), written atomically (the sites of one federation already share it)."""
    return str(tmp_path_factory.mktemp("phantom-feature-cache"))


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
#: ``pytest -n 2 --dist loadgroup`` (the Makefile) the whole group runs on one worker, one federation
#: after the other, while the other worker takes every other file: two federations never compete for
#: the 2 cores (each slowed the other about 2x under ``--dist loadfile``).
FLOWER_GROUP = "flower"


def _group(item: pytest.Item) -> str | None:
    """The item's xdist group, read as pytest-xdist reads the mark (first argument or ``name``)."""
    for mark in item.iter_markers("xdist_group"):
        return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a ``--dist loadgroup`` worker only (a plain ``pytest`` run is untouched):

    - the scheduler reads an item's group from a ``@group`` suffix of its node id, which pytest-xdist
      3.8 writes into ``item._nodeid``; pytest 9.2 keeps node ids in ``item._id`` and ignores that, so
      every group was silently spread over the workers (pytest-dev/pytest-xdist#1386). The suffix is
      written here where this pytest keeps it (with an older pytest, pytest-xdist's hook does it);
    - the Flower group comes first. With ``--no-loadscope-reorder`` (the Makefile) the scheduler hands
      out groups in collection order, so the longest chain starts at once on one worker."""
    if not getattr(config.option, "loadgroup", False):  # set by pytest-xdist on its workers
        return
    for item in items:
        group = _group(item)
        if group is not None and hasattr(item, "_id") and not item.nodeid.endswith(f"@{group}"):
            item._id = type(item._id).parse(f"{item.nodeid}@{group}")
    items.sort(key=lambda item: _group(item) != FLOWER_GROUP)  # stable: each file stays contiguous, in order


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown (and unused) where xdist is not installed
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` with one change: a test without a group is scheduled with its file, as
    ``--dist loadfile`` does (plain loadgroup hands such tests out one by one, and a module fixture
    shared by tests of one file would then be built on both workers)."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class GroupOrFile(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)  # the group after "@", else the node id itself
            return nodeid.split("::", 1)[0] if scope == nodeid else scope

    return GroupOrFile(config, log)
