"""Local federations for researchers: N virtual hospitals on one machine (Flower simulation engine).

``simulate`` lays out one site policy per virtual hospital (its share of the data, its own state
directory with feature cache and privacy ledger), then runs the same ServerApp logic and ClientApp
as a real deployment through Flower's simulation engine (Ray backend). Flower's home and state stay
inside the run directory, and Flower's runtime dependency installation is never involved (apps are
passed in-process, no ``flwr run``).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fed.policy import SitePolicy, write_policy

log = logging.getLogger(__name__)


@dataclass
class SimulationConfig:
    data: str = "phantom:150?profiles=linear-a,convex-b,linear-c&seed=0"
    task: str = "classify"
    sites: int = 3
    partition: str = "iid"  # iid | dirichlet:ALPHA | by-device
    rounds: int = 3
    epsilon: float = 8.0  # target epsilon per site for the whole run
    site_epsilons: list[float] = field(default_factory=list)  # per-site policy budgets (default: epsilon)
    encoder: str = "echocare-tiny"
    checkpoint: str | None = None
    out: str = "runs/sim"
    strategy: str = "fedavg"
    labels: str = ""  # default: the data's classes
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.5
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    seed: int = 0
    resume: bool = False
    cache_dir: str | None = None
    cpus_per_site: float = 1.0
    quiet: bool = False  # hide Flower's and the virtual sites' own log lines (progress comes from `progress`)
    extra: dict = field(default_factory=dict)  # further run-config keys (dashes), e.g. {"max-update-norm": 5}


def layout_sites(cfg: SimulationConfig, run_dir: Path) -> Path:
    """Write one policy per virtual hospital under ``run_dir/sites/site-K/policy.toml``."""
    sites_dir = run_dir / "sites"
    budgets = cfg.site_epsilons or [cfg.epsilon] * cfg.sites
    if len(budgets) != cfg.sites:
        raise ValueError(f"--site-epsilons has {len(budgets)} values for {cfg.sites} sites")
    for k in range(cfg.sites):
        policy = SitePolicy(data=cfg.data, site_name=f"site-{k}", state_dir=str(sites_dir / f"site-{k}" / "state"),
                            allowed_tasks=[cfg.task], target_epsilon=float(budgets[k]),
                            max_local_epochs=max(5, cfg.local_epochs), partition=cfg.partition,
                            partition_index=k, partition_count=cfg.sites, partition_seed=cfg.seed,
                            cache_dir=cfg.cache_dir)
        write_policy(policy, sites_dir / f"site-{k}" / "policy.toml")
    return sites_dir


def default_labels(data_spec: str) -> str:
    from echocare.data import open_data

    return ",".join(open_data(data_spec).classes)


def simulate(cfg: SimulationConfig, progress=None, client_app=None) -> dict:
    """Run the federation; returns the run report (also written to ``cfg.out``).

    ``client_app``: optional factory ``sites_dir -> ClientApp`` (tests wrap the real one to watch
    or corrupt the messages a site sends)."""
    run_dir = Path(cfg.out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["FLWR_HOME"] = str(run_dir / ".flwr")  # Flower's home and state stay in the run dir
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fed.client_app import make_client_app
    from server.coordinator.server_app import ServerConfig, run_federation

    sites_dir = layout_sites(cfg, run_dir)
    run_config = {
        "num-server-rounds": cfg.rounds, "strategy": cfg.strategy, "task": cfg.task,
        "labels": cfg.labels or (default_labels(cfg.data) if cfg.task == "classify" else ""), "encoder-config": cfg.encoder,
        "encoder-checkpoint": cfg.checkpoint or "", "local-epochs": cfg.local_epochs, "batch-size": cfg.batch_size,
        "lr": cfg.lr, "max-grad-norm": cfg.max_grad_norm, "target-epsilon": cfg.epsilon,
        "noise-multiplier": cfg.noise_multiplier, "seed": cfg.seed, "run-dir": str(run_dir), "resume": cfg.resume,
        "num-sites": cfg.sites, "sim-sites-dir": str(sites_dir),
        **({"public-cache-dir": cfg.cache_dir} if cfg.cache_dir else {}), **cfg.extra,
    }
    server_cfg = ServerConfig.from_run_config(run_config)
    if server_cfg.extra:
        raise ValueError(f"unknown run-config keys {sorted(server_cfg.extra)}")
    out: dict = {}

    server = ServerApp()

    @server.main()
    def _main(grid, context) -> None:
        out["report"] = run_federation(grid, server_cfg, progress=progress)

    init_args = {"num_cpus": max(1, os.cpu_count() or 1), "include_dashboard": False}
    flwr_log = logging.getLogger("flwr")
    old_level = flwr_log.level
    if cfg.quiet:
        init_args["log_to_driver"] = False
        flwr_log.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=server, client_app=(client_app or make_client_app)(str(sites_dir)), num_supernodes=cfg.sites,
                       backend_config={"client_resources": {"num_cpus": cfg.cpus_per_site, "num_gpus": 0.0},
                                       "init_args": init_args})
    flwr_log.setLevel(old_level)
    if "report" not in out:
        raise RuntimeError(f"the federation in {run_dir} did not complete; see the log above")
    return out["report"]
