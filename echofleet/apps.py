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

from flwr.app import ConfigRecord, RecordDict

from edge.federated.accept import AcceptanceReply, AcceptanceRequest, accept_at_site, reply_record, request_from_record
from edge.federated.coordinator import SiteCalibration, SiteAnswer, ask_accept, ask_sites, load_plan, save_answers
from edge.federated.plan import Plan
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


def handle_accept(msg: Message, context: Context, sites_dir: str | None = None) -> Message:
    policy = policy_from_context(context, sites_dir)
    candidate, request = request_from_record(msg.content["config"])  # a malformed request: an error reply
    reply = accept_at_site(policy, candidate, request)
    return Message(RecordDict({"acceptance": ConfigRecord(reply_record(reply))}), reply_to=msg)


def make_client_app(sites_dir: str | None = None) -> ClientApp:
    """fed.client_app's ClientApp (train, evaluate, SecAgg+) plus the release queries."""
    client = make_training_client_app(sites_dir)

    @client.query("calibrate")
    def calibrate(msg: Message, context: Context) -> Message:
        return handle_calibrate(msg, context, sites_dir)

    @client.query("accept")
    def accept(msg: Message, context: Context) -> Message:
        return handle_accept(msg, context, sites_dir)

    return client


# ------------------------------------------------------------------------------- coordinator
def release_round_config(run: RunConfig, plan: Plan) -> RoundConfig:
    """What the sites need beside the plan: the run's task, preprocessing and train/val split
    (seed, validation share: the same split their training used); its run key names the plan."""
    return replace(run.round_config(f"release-{plan.digest()[:16]}"), server_round=0)


def plan_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RELEASE_DIR / "plan.npz"


def answers_path(run_dir: str | Path, plan: Plan) -> Path:
    return Path(run_dir) / RELEASE_DIR / f"answers-{plan.digest()[:16]}.npz"


def step_path(run_dir: str | Path) -> Path:
    """``RUN/release/step.json``: which release step the next ``mode = "release"`` run carries out
    (``{"step": "calibrate"}`` or ``{"step": "accept"}``), written by the build before it submits the run."""
    return Path(run_dir) / RELEASE_DIR / "step.json"


def accept_request_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RELEASE_DIR / "accept-request.json"


def accept_replies_path(run_dir: str | Path, candidate_sha: str) -> Path:
    return Path(run_dir) / RELEASE_DIR / f"accept-replies-{candidate_sha[:16]}.json"


def run_release(grid: Grid, run: RunConfig, timeout: float = 3600.0) -> list:
    """``mode = "release"``: the step ``RUN/release/step.json`` names (calibrate when absent): send
    ``RUN/release/plan.npz`` (calibration) or the candidate of ``accept-request.json`` (acceptance)
    to the connected sites and save their answers beside it."""
    from echocare.atomic import atomic_write_bytes

    step = json.loads(step_path(run.run_dir).read_text()).get("step") if step_path(run.run_dir).is_file() else "calibrate"
    if step == "accept":
        req = json.loads(accept_request_path(run.run_dir).read_text())
        request = AcceptanceRequest(reference=Path(req["reference"]), run_key=req["run_key"], round=0,
                                    val_fraction=run.val_fraction, seed=run.seed)
        replies = ask_accept(grid, Path(req["candidate"]), request, timeout)
        out = accept_replies_path(run.run_dir, req["candidate_sha256"])
        atomic_write_bytes(out, json.dumps([r.fields() for r in replies]).encode(), 0o600)
        log.info("acceptance replies of %d site(s) written to %s", len(replies), out)
        return replies
    if step != "calibrate":
        raise ValueError(f"{step_path(run.run_dir)}: unknown release step {step!r} (calibrate | accept)")
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


class SimulatedSites:
    """A local simulation's virtual hospitals (their policies, data shares and ledgers under
    ``RUN/sites``), asked through Flower's simulation engine with the apps of this module:
    :meth:`calibrate` is a :data:`~edge.federated.coordinator.SiteCalibration`, :meth:`accept` sends
    a candidate for federated acceptance. Each call is one short simulation (one query round)."""

    def __init__(self, run_dir: str | Path, *, cpus_per_site: float = 1.0):
        self.run_dir = Path(run_dir).resolve()
        self.sites = simulated_site_dirs(self.run_dir)
        if not self.sites:
            raise ValueError(f"{self.run_dir}: no simulated sites (sites/site-K/policy.toml); a real federation's "
                             "sites answer over `flwr run` with mode=\"release\" (docs/edge.md)")
        self.run = run_config_of(self.run_dir).replace(sim_sites_dir=str(self.run_dir / "sites"))
        self.cpus_per_site = cpus_per_site

    def _simulate(self, ask):
        from flwr.simulation import run_simulation

        out: dict = {}
        server = ServerApp()

        @server.main()
        def _release(grid: Grid, context: Context) -> None:
            try:
                out["answers"] = ask(grid)
            except BaseException as e:  # Flower would log it and go on: re-raised below, in this thread
                out["error"] = e

        os.environ.setdefault("FLWR_HOME", str(self.run_dir / ".flwr"))
        from echofleet.simulation import _DropRunSimulationDeprecation  # why run_simulation: that module

        flwr_log = logging.getLogger("flwr")
        level, drop = flwr_log.level, _DropRunSimulationDeprecation()
        flwr_log.setLevel(logging.WARNING)
        flwr_log.addFilter(drop)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # run_simulation: see echofleet/simulation.py
                warnings.filterwarnings("ignore", message=".*Ray will no longer override accelerator", category=FutureWarning)
                run_simulation(server_app=server, client_app=make_client_app(str(self.run_dir / "sites")),
                               num_supernodes=len(self.sites),
                               backend_config={"client_resources": {"num_cpus": self.cpus_per_site, "num_gpus": 0.0},
                                               "init_args": {"num_cpus": max(1, os.cpu_count() or 1),
                                                             "include_dashboard": False, "log_to_driver": False}})
        finally:
            flwr_log.setLevel(level)
            flwr_log.removeFilter(drop)
        if "error" in out:
            raise out["error"]
        if "answers" not in out:
            raise RuntimeError(f"the release federation of {self.run_dir} did not complete; see the log above")
        return out["answers"]

    def _calibrate(self, grid: Grid, plan: Plan) -> list[SiteAnswer]:
        answers = ask_sites(grid, plan, release_round_config(self.run, plan).to_record())
        save_answers(answers, answers_path(self.run_dir, plan))
        return answers

    def calibrate(self, plan: Plan) -> list[SiteAnswer]:
        """One simulation: the sites' calibration answers."""
        return self._simulate(lambda grid: self._calibrate(grid, plan))

    def accept(self, candidate: Path, request: AcceptanceRequest) -> list[AcceptanceReply]:
        """One simulation: the sites' acceptance replies."""
        return self._simulate(lambda grid: ask_accept(grid, candidate, request))

    def session(self, work):
        """``work(calibrate, accept)`` inside ONE simulation (one engine start for a whole build that
        calibrates and accepts); what ``work`` returns, or the exception it raised."""
        return self._simulate(lambda grid: work(lambda plan: self._calibrate(grid, plan),
                                                lambda candidate, request: ask_accept(grid, candidate, request)))

    def pin_release_key(self, public_pem: bytes) -> Path:
        """Simulation only: every virtual hospital pins ``public_pem`` as its release key
        (``RUN/sites/release-key.pub``); a real hospital's IT writes ``release_pubkey`` into its own
        policy, here the researcher holds them all."""
        from fed.policy import load_policy, write_policy

        pinned = self.run_dir / "sites" / "release-key.pub"
        pinned.write_bytes(public_pem)
        for site in self.sites:
            policy = load_policy(site / "policy.toml")
            if policy.release_pubkey != str(pinned):
                write_policy(replace(policy, release_pubkey=str(pinned)), site / "policy.toml")
        return pinned


def simulated_sites(run_dir: str | Path, *, cpus_per_site: float = 1.0) -> SiteCalibration:
    """The calibration of :class:`SimulatedSites` (``edge build RUN --calib sites`` on a simulation run)."""
    return SimulatedSites(run_dir, cpus_per_site=cpus_per_site).calibrate
