"""The Flower apps of echofleet: one ServerApp and one ClientApp for training and for releases.

``pyproject.toml``'s ``[tool.flwr.app.components]`` names ``echofleet.apps:server_app`` and
``echofleet.apps:client_app``. The run-config key ``mode`` selects what a run does:

- ``mode = "train"`` (default): the federation of :mod:`server.coordinator.server_app`; the sites
  answer with :mod:`fed.client_app`'s train and evaluate handlers;
- ``mode = "release"``: the coordinator sends the calibration plan that ``echofleet edge build
  RUN --calib sites`` wrote to ``RUN/release/plan.npz`` to every connected site (a Flower
  ``query.calibrate`` message) and writes their answers to ``RUN/release/answers-<plan>.npz``;
  each site answers with :func:`edge.federated.site.calibrate_round` (noisy, charged to its ledger).

They are composed here, in the shell, because the site's release code (``edge.federated``) sits
above the hospital package ``fed`` (import-linter's layers: echofleet > edge > server > fed).

:func:`simulated_sites` reaches the virtual hospitals of a local simulation (``RUN/sites``) with
the same apps through Flower's simulation engine: what ``edge build RUN --calib sites`` uses for a
run of ``echofleet simulate``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import replace
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from edge.federated.coordinator import SiteCalibration, SiteAnswer, ask_sites, load_plan, save_answers
from edge.federated.plan import CalibrationPlan
from edge.federated.site import calibrate_round
from fed.client_app import _arrays, make_client_app as make_training_client_app, policy_from_context, to_content
from fed.config import RunConfig
from fed.task import RoundConfig

log = logging.getLogger(__name__)

RELEASE_DIR = "release"


# ------------------------------------------------------------------------------------- sites
def handle_calibrate(msg: Message, context: Context, sites_dir: str | None = None) -> Message:
    policy = policy_from_context(context, sites_dir)
    cfg = RoundConfig.from_record(msg.content["config"])
    return Message(to_content(calibrate_round(policy, cfg, _arrays(msg))), reply_to=msg)


def make_client_app(sites_dir: str | None = None) -> ClientApp:
    """fed.client_app's ClientApp (train, evaluate, SecAgg+) plus the release queries."""
    client = make_training_client_app(sites_dir)

    @client.query("calibrate")
    def calibrate(msg: Message, context: Context) -> Message:
        return handle_calibrate(msg, context, sites_dir)

    return client


# ------------------------------------------------------------------------------- coordinator
def release_round_config(run: RunConfig, plan: CalibrationPlan) -> RoundConfig:
    """What the sites need beside the plan: the run's task, preprocessing and train/val split
    (seed, validation share: the same split their training used); its run key names the plan."""
    return replace(run.round_config(f"release-{plan.digest()[:16]}"), server_round=0)


def plan_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RELEASE_DIR / "plan.npz"


def answers_path(run_dir: str | Path, plan: CalibrationPlan) -> Path:
    return Path(run_dir) / RELEASE_DIR / f"answers-{plan.digest()[:16]}.npz"


def run_release(grid: Grid, run: RunConfig, timeout: float = 3600.0) -> list[SiteAnswer]:
    """``mode = "release"``: send ``RUN/release/plan.npz`` to the connected sites, save their answers."""
    plan = load_plan(plan_path(run.run_dir))
    answers = ask_sites(grid, plan, release_round_config(run, plan).to_record(), timeout)
    save_answers(answers, answers_path(run.run_dir, plan))
    log.info("calibration answers of %d site(s) written to %s", len(answers), answers_path(run.run_dir, plan))
    return answers


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run = RunConfig.from_run_config(context.run_config)
    if run.mode == "release":
        run_release(grid, run)
        return
    from server.coordinator.server_app import main as train_main

    train_main(grid, context)


client_app = make_client_app()


# -------------------------------------------------------------------------------- simulation
def run_config_of(run_dir: str | Path) -> RunConfig:
    """The run config a federation ran with (``RUN/report.json``), as a release run config."""
    report = Path(run_dir) / "report.json"
    try:
        config = json.loads(report.read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{report}: no run config to release from ({type(e).__name__}: {e})") from None
    return RunConfig.from_run_config(config).replace(mode="release", run_dir=str(Path(run_dir).resolve()))


def simulated_site_dirs(run_dir: str | Path) -> list[Path]:
    """The virtual hospitals ``echofleet simulate`` laid out under ``RUN/sites`` (site-0, site-1, ...)."""
    sites = Path(run_dir) / "sites"
    found = sorted((p for p in sites.glob("site-*") if (p / "policy.toml").is_file()),
                   key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else 1 << 30)
    return found


def simulated_sites(run_dir: str | Path, *, cpus_per_site: float = 1.0) -> SiteCalibration:
    """A :data:`~edge.federated.coordinator.SiteCalibration` that asks a local simulation's virtual
    hospitals (their policies, data shares and ledgers under ``RUN/sites``) through Flower's
    simulation engine, with the apps of this module."""
    run_dir = Path(run_dir).resolve()
    sites = simulated_site_dirs(run_dir)
    if not sites:
        raise ValueError(f"{run_dir}: no simulated sites (sites/site-K/policy.toml); a real federation's "
                         "sites answer over `flwr run` with mode=\"release\" (docs/edge.md)")
    run = run_config_of(run_dir).replace(sim_sites_dir=str(run_dir / "sites"))

    def ask(plan: CalibrationPlan) -> list[SiteAnswer]:
        from flwr.simulation import run_simulation

        out: dict = {}
        server = ServerApp()

        @server.main()
        def _release(grid: Grid, context: Context) -> None:
            out["answers"] = ask_sites(grid, plan, release_round_config(run, plan).to_record())

        os.environ.setdefault("FLWR_HOME", str(run_dir / ".flwr"))
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.WARNING)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # run_simulation: see echofleet/simulation.py
                warnings.filterwarnings("ignore", message=".*Ray will no longer override accelerator", category=FutureWarning)
                run_simulation(server_app=server, client_app=make_client_app(str(run_dir / "sites")),
                               num_supernodes=len(sites),
                               backend_config={"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
                                               "init_args": {"num_cpus": max(1, os.cpu_count() or 1),
                                                             "include_dashboard": False, "log_to_driver": False}})
        finally:
            flwr_log.setLevel(level)
        if "answers" not in out:
            raise RuntimeError(f"the calibration federation of {run_dir} did not complete; see the log above")
        save_answers(out["answers"], answers_path(run_dir, plan))
        return out["answers"]

    return ask
