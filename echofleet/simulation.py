"""Local federations for researchers: N virtual hospitals on one machine (Flower simulation engine).

``simulate`` checks its configuration first (:func:`check`: every bad argument is one
:class:`SimulationConfigError` naming it, before any work starts), lays out one site policy per
virtual hospital (its share of the data, its own state directory with feature cache and privacy
ledger), then runs the same ServerApp logic and ClientApp as a real deployment through Flower's
simulation engine (Ray backend). The run config is a :class:`fed.config.RunConfig` built from
this configuration; its defaults are those of ``[tool.flwr.app.config]``.

Why ``flwr.simulation.run_simulation`` and not ``flwr run``: Flower 1.42 marks ``run_simulation``
deprecated in favour of ``flwr run``, and ``flwr run .`` does work for this project (see
docs/federation.md; a simulated site without a policy then gets a phantom default). But
``flwr run`` builds the project directory into a FAB and hands it to a detached, long-lived local
SuperLink on fixed ports (one per user, shared by every run and every test), which installs and
executes its own copy of the code in other processes. ``echofleet simulate`` needs what that path
cannot give: an installed package without a project directory, the progress callback and a
wrapped ClientApp in this process (tests watch what leaves a site), concurrent runs, and Flower's
home and state inside the run directory. So it stays on ``run_simulation``, and the deprecation
notice it logs is filtered out here; Flower's runtime dependency installation is never involved
(apps are passed in-process).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fed.config import PHANTOM_DATA, RunConfig, RunConfigError, field_of
from fed.policy import SitePolicy, write_policy

log = logging.getLogger(__name__)


@dataclass
class SimulationConfig:
    """A local federation. Fields that are run-config keys take their defaults from RunConfig."""

    data: str = PHANTOM_DATA  # data spec shared out to the virtual hospitals
    task: str = RunConfig.task
    sites: int = 3
    partition: str = "iid"  # iid | dirichlet:ALPHA | by-device
    rounds: int = RunConfig.num_server_rounds
    epsilon: float = RunConfig.target_epsilon  # target epsilon per site for the whole run
    site_epsilons: list[float] = field(default_factory=list)  # per-site policy budgets (default: epsilon)
    encoder: str = RunConfig.encoder_config
    checkpoint: str | None = None  # encoder checkpoint; None: seeded random initialisation
    out: str = "runs/sim"  # the run directory (run-dir)
    strategy: str = RunConfig.strategy
    labels: str = ""  # default: the data's classes
    local_epochs: int = RunConfig.local_epochs
    batch_size: int = RunConfig.batch_size
    lr: float = RunConfig.lr
    max_grad_norm: float = RunConfig.max_grad_norm
    noise_multiplier: float = RunConfig.noise_multiplier
    seed: int = RunConfig.seed
    resume: bool = RunConfig.resume
    cache_dir: str | None = None  # shared feature cache (default: each site's state dir)
    # Where the virtual hospitals keep their state (policy, lifetime ledger, stored replies, splits,
    # feature cache) across runs, one folder DIR/site-K each, as a real hospital's SuperNode does.
    # None: inside ``out`` (out/sites/site-K), i.e. a fresh hospital every run directory.
    site_state: str | None = None
    cpus_per_site: float = 1.0
    device: str = "auto"  # every virtual hospital's policy device: auto | cpu | cuda | cuda:N
    quiet: bool = False  # hide Flower's and the virtual sites' own log lines (progress comes from `progress`)
    # TESTS / reproducible research only: every virtual hospital seeds its DP noise and sampling from values
    # the coordinator knows, so nothing the run releases is private (reports and model cards say NOT PRIVATE).
    insecure_deterministic_noise: bool = False
    extra: dict = field(default_factory=dict)  # further run-config keys (dashes), e.g. {"max-update-norm": 5}


#: SimulationConfig field -> RunConfig field, where the names differ (the others are equal).
RUN_FIELDS = {"rounds": "num_server_rounds", "epsilon": "target_epsilon", "encoder": "encoder_config",
              "checkpoint": "encoder_checkpoint", "out": "run_dir", "cache_dir": "public_cache_dir"}
SHARED_FIELDS = ("task", "strategy", "labels", "local_epochs", "batch_size", "lr", "max_grad_norm",
                 "noise_multiplier", "seed", "resume")
PARTITIONS = ("iid", "dirichlet:ALPHA", "by-device")


class SimulationConfigError(ValueError):
    """A bad simulation argument: ``field`` names it (a SimulationConfig field or a run-config key)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def check(cfg: SimulationConfig) -> RunConfig:
    """Check every argument before any work; return the run config (paths not yet filled in).

    Raises :class:`SimulationConfigError` for the first bad argument."""
    from server.coordinator.strategy import STRATEGIES

    def bad(name: str, problem: str) -> SimulationConfigError:
        return SimulationConfigError(name, problem)

    if cfg.sites < 1:
        raise bad("sites", f"must be at least 1, got {cfg.sites}")
    if cfg.rounds < 1:
        raise bad("rounds", f"must be at least 1, got {cfg.rounds}")
    if not cfg.epsilon > 0:
        raise bad("epsilon", f"must be > 0, got {cfg.epsilon}")
    if cfg.site_epsilons:
        if len(cfg.site_epsilons) != cfg.sites:
            raise bad("site_epsilons", f"has {len(cfg.site_epsilons)} values for {cfg.sites} sites")
        if not all(e > 0 for e in cfg.site_epsilons):
            raise bad("site_epsilons", f"every budget must be > 0, got {cfg.site_epsilons}")
    if cfg.strategy.lower() not in STRATEGIES:
        raise bad("strategy", f"unknown strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    problem = partition_problem(cfg.partition)
    if problem:
        raise bad("partition", problem)
    if not cfg.cpus_per_site > 0:
        raise bad("cpus_per_site", f"must be > 0, got {cfg.cpus_per_site}")
    device_problem = _device_problem(cfg.device)
    if device_problem:
        raise bad("device", device_problem)
    if cfg.checkpoint and not cfg.checkpoint.startswith("hf://") and not Path(cfg.checkpoint).is_file():
        raise bad("checkpoint", f"{cfg.checkpoint} not found")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise bad("out", f"{cfg.out} exists and is not a folder")
    if cfg.cache_dir and Path(cfg.cache_dir).exists() and not Path(cfg.cache_dir).is_dir():
        raise bad("cache_dir", f"{cfg.cache_dir} exists and is not a folder")
    if cfg.site_state:
        problem = _site_state_problem(cfg)
        if problem:
            raise bad("site_state", problem)
    run = _run_config(cfg)  # types and ranges of every run-config value (task, encoder, lr, ...)
    try:
        classes = _data_classes(cfg.data)
    except (ValueError, OSError, ImportError) as e:
        raise bad("data", str(e)) from None
    if cfg.task == "classify":
        if not cfg.labels and len(classes) < 2:
            raise bad("data", f"{cfg.data}: classify needs images of at least two classes, found {classes or 'none'}")
        run = run.replace(labels=cfg.labels or ",".join(classes))
    if run.central_dp_noise > 0 and run.strategy != "fedavg":
        raise bad("central-dp-noise", "central DP accounting needs strategy fedavg (equal site weights)")
    return run


def partition_problem(scheme: str) -> str | None:
    """Why ``scheme`` is not a partition scheme of echocare.data.split.partition (None: it is)."""
    name, sep, arg = scheme.partition(":")
    if name in ("iid", "by-device") and not sep:
        return None
    if name == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = -1.0
        if alpha > 0 and alpha != float("inf"):
            return None
        return f"{scheme!r}: dirichlet needs a positive concentration ALPHA, e.g. dirichlet:0.5"
    return f"unknown scheme {scheme!r}; choose one of {', '.join(PARTITIONS)}"


def _run_config(cfg: SimulationConfig) -> RunConfig:
    """The RunConfig of this simulation (further keys from ``cfg.extra`` win), errors named by argument."""
    values = {name: getattr(cfg, name) for name in SHARED_FIELDS}
    values.update({run: getattr(cfg, sim) for sim, run in RUN_FIELDS.items()})
    values.update(encoder_checkpoint=cfg.checkpoint or "", public_cache_dir=cfg.cache_dir or "",
                  num_sites=cfg.sites)
    by_run_field = {run: sim for sim, run in RUN_FIELDS.items()}
    try:
        run = RunConfig(**values)
        return RunConfig.from_run_config({**run.as_run_config(), **cfg.extra})
    except RunConfigError as e:
        name = field_of(e.key)
        if e.key in cfg.extra:
            raise SimulationConfigError(e.key, e.problem) from None
        raise SimulationConfigError(by_run_field.get(name, name), e.problem) from None


def _device_problem(device: str) -> str | None:
    """Why the virtual hospitals cannot use ``device`` on this machine (None: they can)."""
    from echocare.device import DeviceError, parse_request, resolve_device

    try:
        if parse_request(device)[0] == "cuda":  # auto and cpu always work (auto falls back to the CPU)
            resolve_device(device)
    except (ValueError, DeviceError) as e:
        return str(e)
    return None


def _gpus_per_site(cfg: SimulationConfig) -> float:
    """The share of a GPU Ray gives each virtual hospital: none on the CPU (Ray then hides the GPUs
    from the site processes), an equal share of one GPU when the sites use one."""
    from echocare.device import parse_request, resolve_device

    if parse_request(cfg.device)[0] == "cpu" or not resolve_device(cfg.device).is_cuda:
        return 0.0
    return 1.0 / max(1, cfg.sites)


def _data_classes(data_spec: str) -> list[str]:
    from echocare.data import open_data

    return list(open_data(data_spec).classes)


def _site_policy(cfg: SimulationConfig, sites_dir: Path, k: int) -> SitePolicy:
    """Virtual hospital ``k``'s policy as this simulation lays it out."""
    budgets = cfg.site_epsilons or [cfg.epsilon] * cfg.sites
    return SitePolicy(data=cfg.data, site_name=f"site-{k}", state_dir=str(sites_dir / f"site-{k}" / "state"),
                      allowed_tasks=[cfg.task], target_epsilon=float(budgets[k]),
                      max_local_epochs=max(5, cfg.local_epochs), partition=cfg.partition,
                      partition_index=k, partition_count=cfg.sites, partition_seed=cfg.seed,
                      cache_dir=cfg.cache_dir, device=cfg.device,
                      # as a hospital installs the released weights: the site's own copy, its only checkpoint
                      encoder_checkpoint=cfg.checkpoint or "",
                      # the researcher holds every virtual hospital's data: exact metrics and the
                      # accountant's inputs are disclosed (a real site's policy defaults: docs/privacy.md)
                      evaluation="disclosed", disclosed_evaluations_per_run=cfg.rounds + 1, disclose_accounting=True,
                      insecure_deterministic_noise=cfg.insecure_deterministic_noise)


#: What a kept virtual hospital must still hold for a later run: its dataset (the ledger's key).
_DATASET_FIELDS = ("data", "partition", "partition_index", "partition_count", "partition_seed")


def _site_state_problem(cfg: SimulationConfig) -> str | None:
    """Why ``cfg.site_state`` cannot hold this run's virtual hospitals (None: it can). A kept
    hospital keeps its dataset: a run that shares out other data, another partition or another
    number of sites would be a different hospital, so it is refused rather than mixed."""
    from fed.policy import PolicyError, load_policy

    root = Path(cfg.site_state)
    if root.exists() and not root.is_dir():
        return f"{root} exists and is not a folder"
    for k in range(cfg.sites):
        path = root / f"site-{k}" / "policy.toml"
        if not path.exists():
            continue
        try:
            kept = load_policy(path)
        except PolicyError as e:
            return str(e)
        wanted = _site_policy(cfg, root, k)
        differ = [f for f in _DATASET_FIELDS if getattr(kept, f) != getattr(wanted, f)]
        if differ:
            return (f"{path} holds site-{k} with {differ[0]} {getattr(kept, differ[0])!r}, this run asks for "
                    f"{getattr(wanted, differ[0])!r}; use another --site-state folder for other data")
    return None


def layout_sites(cfg: SimulationConfig, run_dir: Path) -> Path:
    """One policy per virtual hospital at ``SITES/site-K/policy.toml`` with its state (lifetime
    ledger, stored replies, splits, feature cache) in ``SITES/site-K/state``; SITES is
    ``cfg.site_state`` when given, else ``run_dir/sites``. The policy is written for every run (the
    researcher administers every virtual hospital; :func:`check` refused a kept hospital whose
    dataset differs), the state is kept: a later run spends from the same lifetime ledger."""
    sites_dir = Path(cfg.site_state).resolve() if cfg.site_state else run_dir / "sites"
    for k in range(cfg.sites):
        if cfg.site_state and (sites_dir / f"site-{k}" / "state").exists():
            log.info("site-%d: state kept from an earlier run in %s", k, sites_dir / f"site-{k}" / "state")
        write_policy(_site_policy(cfg, sites_dir, k), sites_dir / f"site-{k}" / "policy.toml")
    return sites_dir


class _DropRunSimulationDeprecation(logging.Filter):
    """Hide Flower's notice that ``run_simulation`` is deprecated (why we use it: module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def simulate(cfg: SimulationConfig, progress=None, client_app=None) -> dict:
    """Run the federation; returns the run report (also written to ``cfg.out``).

    A report whose ``global_model`` is None says in ``problem`` why no site trained.
    ``client_app``: optional factory ``sites_dir -> ClientApp`` (tests wrap the real one to watch
    or corrupt the messages a site sends)."""
    run = check(cfg)
    run_dir = Path(cfg.out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["FLWR_HOME"] = str(run_dir / ".flwr")  # Flower's home and state stay in the run dir
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fed.client_app import make_client_app
    from server.coordinator.server_app import run_federation

    sites_dir = layout_sites(cfg, run_dir)
    run = run.replace(run_dir=str(run_dir), sim_sites_dir=str(sites_dir))
    out: dict = {}

    server = ServerApp()

    @server.main()
    def _main(grid, context) -> None:
        out["report"] = run_federation(grid, run, progress=progress)

    init_args = {"num_cpus": max(1, os.cpu_count() or 1), "include_dashboard": False}
    flwr_log = logging.getLogger("flwr")
    old_level = flwr_log.level
    drop = _DropRunSimulationDeprecation()
    flwr_log.addFilter(drop)
    if cfg.quiet:
        init_args["log_to_driver"] = False
        flwr_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # Ray's notice about a future default for GPU visibility
            warnings.filterwarnings("ignore", message=".*Ray will no longer override accelerator", category=FutureWarning)
            run_simulation(server_app=server, client_app=(client_app or make_client_app)(str(sites_dir)),
                           num_supernodes=cfg.sites,
                           backend_config={"client_resources": {"num_cpus": cfg.cpus_per_site, "num_gpus": _gpus_per_site(cfg)},
                                           "init_args": init_args})
    finally:
        flwr_log.setLevel(old_level)
        flwr_log.removeFilter(drop)
    if "report" not in out:
        raise RuntimeError(f"the federation in {run_dir} did not complete; see the log above")
    return out["report"]
