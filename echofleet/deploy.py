"""A real Flower deployment of echofleet on one machine: one coordinator, N hospitals, on loopback.

Everything ``docs/deploy.md`` tells a coordinator and a hospital to do, done for real on 127.0.0.1
(:func:`deploy` runs the steps in this order):

1. coordinator: a CA and the SuperLink's TLS certificate (``echofleet certs init`` / ``certs server``)
   and a ``$FLWR_HOME/config.toml`` connection that pins the CA;
2. each hospital: a SuperNode key pair (``echofleet certs node``) and a site policy (its share of
   the data, its privacy budget, its state folder); only the PUBLIC key goes to the coordinator;
3. coordinator: ``flower-superlink`` with TLS, SuperNode authentication, a SQLite state file and
   runtime dependency installation disabled, then ``flwr supernode register`` for every hospital key;
4. each hospital: ``flower-supernode`` with its private key, the CA certificate and a node config
   pointing at its policy;
5. coordinator: ``flwr run`` of the Flower app (this repository) with run-config overrides; wait
   until the run finishes and its report is written;
6. optionally (``DeployConfig.release_target``) the edge release: ``edge build RUN --calib sites``
   whose calibration is a second ``flwr run`` with ``mode = "release"`` over the same TLS SuperLink
   (each hospital answers with noisy activation scales charged to its ledger; no patient image
   reaches the coordinator), then the central gate on public phantoms, sign, verify;
7. stop every process started here (also on error, timeout or Ctrl-C).

Every file (keys, policies, Flower homes, the SuperLink database, logs, the run report) lands in
the run directory; nothing is written to ``~/.flwr``.

Every ``flwr`` call of the coordinator (submit, wait, log, and the release steps) goes through
:class:`FlowerFederation`, which holds the app, the SuperLink connection's name, ``FLWR_HOME`` and
the environment: :class:`Deployment` makes one for the SuperLink it started, and ``echofleet edge
build RUN --calib sites --accept sites --federation NAME`` one for a federation somebody else started. ``examples/deploy-localhost/run.py`` is the
command line around :func:`deploy`; ``tests/echofleet/test_deploy_localhost.py`` also drives
:class:`Deployment` step by step to show that an unregistered SuperNode and plaintext
connections are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: JetPack 6 (Jetson) ships it, and its TensorRT bindings are built for it
    import tomli as tomllib

from echocare.atomic import atomic_write_bytes
from echocare.bundle import sha256_file

# The Flower app `flwr run` bundles: the checkout this package lives in (its pyproject.toml holds
# [tool.flwr.app]). An installed, non-editable echofleet has no app next to it: pass DeployConfig.app.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "phantom:90?profiles=linear-a,convex-b,linear-c&seed=0"
CONNECTION = "echofleet-local"  # the name of the SuperLink connection in $FLWR_HOME/config.toml
# Flower phones home (telemetry, update check) unless told not to; a hospital network may not allow it.
QUIET_FLOWER = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}


class DeployError(RuntimeError):
    """A step of the deployment failed; the message (one line) says which and where its log is,
    ``detail`` holds the log's last lines where there is one."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


# ------------------------------------------------------------------------------------------------
# Configuration and layout


@dataclass
class DeployConfig:
    """What to deploy. ``run_config``: further run-config overrides (keys of pyproject's
    ``[tool.flwr.app.config]``, values as TOML types)."""

    run_dir: Path
    sites: int = 3
    data: str = DEFAULT_DATA
    rounds: int = 2
    encoder: str = "echocare-tiny"
    epsilon: float = 8.0
    app: Path = PROJECT_ROOT
    run_config: dict = field(default_factory=dict)
    timeout: float = 900.0  # seconds for the whole federation (flwr run until the report is written)
    startup_timeout: float = 90.0  # seconds for the SuperLink / SuperNodes to come up
    # after training: an INT8 edge build of the global model for this target, calibrated at the hospitals
    # (`edge build RUN --calib sites`), gated on public phantoms (release_val), signed with a key made here
    release_target: str | None = None
    release_val: str | None = None  # None: no central gate, the hospitals accept (federated acceptance)
    release_pubkey: Path | None = None  # the release key every hospital pins (deploy() makes the pair first)


@dataclass
class Hospital:
    """One hospital's files (what would live on its own machine) and its SuperNode's port."""

    name: str
    root: Path
    port: int

    @property
    def private_key(self) -> Path:
        return self.root / "keys" / "supernode"

    @property
    def public_key(self) -> Path:
        return self.root / "keys" / "supernode.pub"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def policy(self) -> Path:
        return self.root / "policy.toml"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"


@dataclass
class Started:
    """A process :class:`Deployment` started (its own process group, so its children stop with it)."""

    name: str
    popen: subprocess.Popen
    log: Path
    stopped: bool = False

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class FlwrReply:
    """What a ``flwr ... --format json`` call answered."""

    returncode: int
    data: dict
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.data.get("success"))

    @property
    def reason(self) -> str:
        return str(self.data.get("error-message") or self.stderr.strip() or self.stdout.strip())


def descendants(pid: int) -> list[tuple[int, str]]:
    """Live descendants of ``pid`` as (pid, start time), read from Linux's /proc (empty elsewhere).

    Needed because ``flower-superlink`` starts ``flower-superexec`` in a session of its own (and it
    the ``flwr-serverapp``): signalling the SuperLink's process group does not reach them."""
    children: dict[int, list[tuple[int, str]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append((int(stat.parent.name), fields[19]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _same_process(pid: int, start: str) -> bool:
    """``pid`` still runs and is the process seen before (not a new one that reused the number)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[19] == start and fields[0] != "Z"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_tool(name: str) -> str:
    """An executable installed next to this Python (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"'{name}' not found next to {sys.executable} or on PATH (pip install -e '.[train]')")
    return found


def toml_value(text: str):
    """``2`` -> 2, ``true`` -> True, ``"x"`` -> "x", anything not TOML -> the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def toml_dumps(table: dict) -> str:
    """A flat TOML table (str, bool, int, float values): what ``flwr run --run-config FILE`` reads."""

    def fmt(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string

    return "".join(f"{k} = {fmt(v)}\n" for k, v in table.items())


def parse_overrides(items: list[str]) -> dict:
    """``["local-epochs=2", 'lr=0.3']`` -> ``{"local-epochs": 2, "lr": 0.3}`` (values read as TOML).
    Raises ValueError naming the first item that is not KEY=VALUE."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--run-config {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = toml_value(value.strip())
    return overrides


def app_run_config(app: Path) -> dict:
    """The app's default run config: ``[tool.flwr.app.config]`` of its pyproject.toml."""
    path = Path(app) / "pyproject.toml"
    try:
        return tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as e:
        raise DeployError(f"{path}: not a Flower app with a [tool.flwr.app.config] table ({e!r})") from e


def federation_run_config(cfg: DeployConfig, federation_dir: Path) -> dict:
    """The run-config overrides for ``flwr run``. Flower accepts only keys the app's pyproject lists,
    so unknown keys fail here, with the list of known ones, before anything starts."""
    rc = {"num-server-rounds": cfg.rounds, "encoder-config": cfg.encoder, "target-epsilon": cfg.epsilon,
          "min-sites": cfg.sites, "run-dir": str(federation_dir)}
    rc.update(cfg.run_config)
    known = app_run_config(cfg.app)
    unknown = sorted(set(rc) - set(known))
    if unknown:
        raise DeployError(f"run-config key(s) {unknown} are not in {Path(cfg.app) / 'pyproject.toml'} "
                          f"[tool.flwr.app.config], and `flwr run` overrides only keys listed there; "
                          f"known: {sorted(known)}")
    return rc


# ------------------------------------------------------------------------------------------------
# A federation reached with the `flwr` CLI (the SuperLink of a Deployment, or one started elsewhere)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower command started here: its own ``FLWR_HOME`` (never
    ``~/.flwr``), no telemetry or update check, no runtime dependency installation by a SuperLink
    it starts, and this venv's tools first on PATH (``flower-superlink`` / ``flower-supernode``
    start ``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp`` by name)."""
    env = dict(os.environ, **QUIET_FLOWER, FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` folded into one line (a Flower error message spans several), cut at ``limit``."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass
class FlowerFederation:
    """A federation the coordinator reaches with the ``flwr`` CLI, and the edge release steps over it.

    ``name`` is a SuperLink connection in ``flwr_home/config.toml`` (``[superlink.NAME]`` with its
    ``address`` and ``root-certificates``: Flower 1.42 reads connections from there, docs/deploy.md).
    Every run is ``flwr run APP NAME --run-config FILE`` with ``FLWR_HOME=flwr_home`` and the
    environment of :func:`flower_env`. The release ServerApp reads its request from ``run_dir`` and
    writes the sites' answers there, so this runs on the machine of the SuperLink and its ServerApp
    (the coordinator's), where the run folder is. :class:`Deployment` makes one for the SuperLink it
    started; ``echofleet edge build RUN --federation NAME`` one for any other."""

    app: Path  # the Flower app `flwr run` bundles (its pyproject.toml holds [tool.flwr.app])
    name: str  # the SuperLink connection's name in flwr_home/config.toml
    flwr_home: Path
    run_dir: Path  # the ServerApp's run-dir: report.json, global/, release/ (absolute: the ServerApp's cwd differs)
    workdir: Path  # flwr's working directory: the run-config files submitted, serverapp.log
    run_config: dict = field(default_factory=dict)  # run config of the runs submitted (keys of the app's pyproject)
    timeout: float = 900.0  # seconds one run may take
    watch: Callable[[], None] = field(default=lambda: None, repr=False)  # raises when a process the runs need died
    active_run: str | None = None  # a run submitted and not yet finished (stopped on error or Ctrl-C)
    fab: str = ""  # the app and FAB hash of the last run submitted (for the progress lines)

    # -- the connection
    @property
    def config_file(self) -> Path:
        return Path(self.flwr_home) / "config.toml"

    def connection(self) -> dict:
        """This federation's ``[superlink.NAME]`` table, checked: it exists, names an address, its
        root certificate exists, and it is TLS to a real SuperLink (not plaintext, not a simulation).
        Raises :class:`DeployError` (one line naming the file and what is wrong) before anything runs."""
        where = f"federation {self.name!r}"
        if not self.config_file.is_file():
            raise DeployError(f"{where}: no Flower config {self.config_file} (give the Flower home whose config.toml "
                              f"has a [superlink.{self.name}] connection: --flwr-home DIR)")
        try:
            table = tomllib.loads(self.config_file.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise DeployError(f"{where}: {self.config_file} is not readable TOML ({_one_line(str(e))})") from None
        links = table.get("superlink") if isinstance(table.get("superlink"), dict) else {}
        conn = links.get(self.name)
        if not isinstance(conn, dict):
            known = sorted(k for k, v in links.items() if isinstance(v, dict))
            raise DeployError(f"{where}: {self.config_file} has no [superlink.{self.name}] connection "
                              f"(its connections: {', '.join(known) or 'none'})")
        if "options" in conn or not conn.get("address") or str(conn.get("address")).startswith(":"):
            raise DeployError(f"{where}: [superlink.{self.name}] in {self.config_file} is not a remote SuperLink "
                              "(no address, or Flower's local simulation); a simulation run's sites answer without "
                              "--federation")
        if conn.get("insecure"):
            raise DeployError(f"{where}: [superlink.{self.name}] in {self.config_file} is plaintext (insecure = true); "
                              "releases go over TLS only: set root-certificates to the SuperLink's CA certificate")
        cert = conn.get("root-certificates")
        if cert and not Path(str(cert)).expanduser().is_file():
            raise DeployError(f"{where}: root-certificates {cert} of [superlink.{self.name}] in {self.config_file} "
                              "does not exist")
        return conn

    def check_reachable(self, timeout: float = 120.0) -> None:
        """Ask the SuperLink for its runs (``flwr list``); raise :class:`DeployError` when it does not answer."""
        address = self.connection().get("address")
        reply = self.flwr("list", timeout=timeout, check=False)
        if not reply.ok:
            raise DeployError(f"federation {self.name!r}: the SuperLink at {address} cannot be reached "
                              f"({_one_line(reply.reason)})")

    # -- running flwr
    def env(self) -> dict[str, str]:
        return flower_env(Path(self.flwr_home))

    def flwr(self, *args: str, timeout: float = 120, check: bool = True, connection: str | None = None) -> FlwrReply:
        """``flwr <args> <connection> --format json`` (default: this federation), with this ``FLWR_HOME``."""
        connection = connection or self.name
        cmd = [find_tool("flwr"), *args, connection, "--format", "json"]
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=self.workdir,
                                  env=self.env())
        except subprocess.TimeoutExpired:
            raise DeployError(f"federation {connection!r}: flwr {' '.join(args)}: no answer within {timeout:.0f} s") from None
        try:
            data = json.loads(done.stdout)
        except json.JSONDecodeError:
            data = {}
        reply = FlwrReply(done.returncode, data if isinstance(data, dict) else {}, done.stdout, done.stderr)
        if check and not reply.ok:
            raise DeployError(f"federation {connection!r}: flwr {' '.join(args)} failed ({done.returncode}): "
                              f"{_one_line(reply.reason)}")
        return reply

    def submit(self, run_config: dict, name: str = "run-config") -> str:
        """``flwr run`` the app with ``run_config`` (written to ``workdir/NAME.toml``); the run id."""
        overrides = Path(self.workdir) / f"{name}.toml"
        overrides.parent.mkdir(parents=True, exist_ok=True)
        overrides.write_text(toml_dumps(run_config))
        reply = self.flwr("run", str(self.app), "--run-config", str(overrides), timeout=300).data
        self.active_run = str(reply["run-id"])
        self.fab = f"app {reply.get('fab-id')} {reply.get('fab-version')}, FAB {reply.get('fab-hash')}"
        return self.active_run

    def wait(self, run_id: str, progress: Callable[[str], None], nearly_done: Callable[[], bool]) -> str:
        """Wait until run ``run_id`` finishes (or the timeout stops it); its final status. A SuperLink
        that stops answering for a minute ends the wait with :class:`DeployError`."""
        deadline, last, asked, unanswered = time.monotonic() + self.timeout, "", 0.0, 0
        while True:
            self.watch()
            # Ask the SuperLink every 10 s (each `flwr list` starts a CLI: CPU the sites need), every 2 s once
            # the run's output is there (the run is about to finish).
            if time.monotonic() - asked >= (2.0 if nearly_done() else 10.0):
                asked = time.monotonic()
                reply = self.flwr("list", "--run-id", run_id, check=False, timeout=60)
                unanswered = 0 if reply.ok else unanswered + 1
                if unanswered >= 6:
                    self.active_run = None
                    raise DeployError(f"federation {self.name!r}: the SuperLink stopped answering while run {run_id} "
                                      f"was '{last or 'submitted'}' ({_one_line(reply.reason)})")
                runs = reply.data.get("runs", [])
                status = runs[0]["status"] if runs else "unknown"
                if status != last and reply.ok:
                    progress(f"run {run_id}: {status}")
                    last = status
                if status.startswith("finished"):
                    self.active_run = None
                    return last
            if time.monotonic() > deadline:
                self.stop_active_run()
                self.save_run_log(run_id)
                raise DeployError(f"federation {self.name!r}: run {run_id} still '{last}' after {self.timeout:.0f} s "
                                  f"(stopped); ServerApp log: {Path(self.workdir) / 'serverapp.log'}")
            time.sleep(1.0)

    def stop_active_run(self) -> None:
        """``flwr stop`` the run submitted and not finished, if any (best effort)."""
        if self.active_run is not None:
            run_id, self.active_run = self.active_run, None
            try:
                self.flwr("stop", run_id, check=False, timeout=60)
            except DeployError:
                pass

    def save_run_log(self, run_id: str) -> Path:
        """The ServerApp's log, fetched from the SuperLink (``flwr log RUN_ID NAME --show``), in ``workdir``."""
        path = Path(self.workdir) / "serverapp.log"
        try:
            done = subprocess.run([find_tool("flwr"), "log", run_id, self.name, "--show"], check=False, capture_output=True,
                                  text=True, timeout=60, cwd=self.workdir, env=self.env())
            path.write_text(done.stdout + done.stderr)
        except subprocess.TimeoutExpired:
            path.write_text("(flwr log timed out)")
        return path

    def run_until(self, run_config: dict, config_name: str, result: Path, what: str,
                  progress: Callable[[str], None]) -> str:
        """Submit one run, wait until it ends, and raise :class:`DeployError` (one line naming the
        federation, ``what`` and the ServerApp log; the log's tail in ``detail``) unless it completed and
        wrote ``result``. Ctrl-C or an unexpected error while waiting stops the run first (a
        :class:`DeployError` of :meth:`wait` has: the run was stopped, or the SuperLink is gone, or
        ``watch`` saw a process die and its owner stops what it started). Returns the run id."""
        run_id = self.submit(run_config, config_name)
        progress(f"{what}: run {run_id} submitted to federation {self.name!r} ({self.fab})")
        try:
            last = self.wait(run_id, progress, result.is_file)
        except DeployError:
            raise
        except BaseException:
            self.stop_active_run()
            raise
        log_path = self.save_run_log(run_id)
        if last != "finished:completed" or not result.is_file():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise DeployError(f"federation {self.name!r}: {what}: run {run_id} ended '{last}' without writing "
                              f"{result}; ServerApp log: {log_path}", tail)
        return run_id

    # -- the edge release (run-config mode = "release"; echofleet/apps.py)
    def release_config(self) -> dict:
        """The release runs' run config: this federation's, in mode "release", writing into ``run_dir``."""
        return {**self.run_config, "mode": "release", "run-dir": str(Path(self.run_dir).resolve())}

    def _release_step(self, step: str, result: Path, progress: Callable[[str], None]) -> str:
        return self.run_until(self.release_config(), "release-run-config", result, f"release step {step!r}", progress)

    def site_calibration(self, progress: Callable[[str], None] = print):
        """A :data:`edge.federated.coordinator.SiteCalibration` over this federation: the plan goes to
        ``RUN/release/plan.npz``, a ``flwr run`` with ``mode = "release"`` sends it to every connected
        SuperNode, and the answers are read back (none at all: :class:`DeployError`)."""
        from echofleet.apps import answers_path, plan_path, step_path
        from edge.federated.coordinator import load_answers, save_plan

        def ask(plan):
            save_plan(plan, plan_path(self.run_dir))
            atomic_write_bytes(step_path(self.run_dir), b'{"step": "calibrate"}')
            answers = answers_path(self.run_dir, plan)
            answers.unlink(missing_ok=True)
            run_id = self._release_step("calibrate", answers, progress)
            return self._answered("calibrate", run_id, load_answers(answers), "answer", "answered", progress)

        return ask

    def _answered(self, step: str, run_id, found: list, noun: str, verb: str, progress: Callable[[str], None]) -> list:
        """The sites' answers to a release step, or one error line naming the federation, step, run and log."""
        if not found:
            raise DeployError(f"federation {self.name!r}: release step '{step}': run {run_id} got no {noun} "
                              f"from any SuperNode (none connected?); ServerApp log: {Path(self.workdir) / 'serverapp.log'}")
        progress(f"release step '{step}': {len(found)} site(s) {verb}: " + ", ".join(f"{x.site} {x.status}" for x in found))
        return found

    def site_acceptance(self, progress: Callable[[str], None] = print):
        """Federated acceptance over this federation (``edge.build.pipeline.build(accept=...)``): the
        candidate and reference tarballs are named in ``RUN/release/accept-request.json``, a ``flwr run``
        with ``mode = "release"`` sends them to every connected SuperNode, and their replies are read back."""
        from echofleet.apps import accept_replies_path, accept_request_path, step_path
        from edge.federated.accept import AcceptanceReply

        def ask(candidate: Path, request) -> list:
            sha = sha256_file(Path(candidate))
            accept_request_path(self.run_dir).parent.mkdir(parents=True, exist_ok=True)  # accept without calibrate
            atomic_write_bytes(accept_request_path(self.run_dir), json.dumps({
                "candidate": str(Path(candidate).resolve()), "reference": str(Path(request.reference).resolve()),
                "run_key": request.run_key, "candidate_sha256": sha}).encode(), 0o600)
            atomic_write_bytes(step_path(self.run_dir), b'{"step": "accept"}')
            replies = accept_replies_path(self.run_dir, sha)
            replies.unlink(missing_ok=True)
            run_id = self._release_step("accept", replies, progress)
            found = [AcceptanceReply.from_fields(d) for d in json.loads(replies.read_text())]
            return self._answered("accept", run_id, found, "reply", "replied", progress)

        return ask


# ------------------------------------------------------------------------------------------------
# The deployment


class Deployment:
    """Coordinator and hospitals on loopback. Use as a context manager: ``close()`` stops every
    process started here (SIGINT, then SIGTERM, then SIGKILL to its process group)."""

    def __init__(self, cfg: DeployConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.coordinator = self.run_dir / "coordinator"
        self.flwr_home = self.coordinator / "flwr-home"
        self.superlink_port = free_port()
        self.hospitals = [Hospital(f"site-{k}", self.run_dir / "hospitals" / f"site-{k}", free_port())
                          for k in range(cfg.sites)]
        self.processes: list[Started] = []
        self.node_ids: dict[str, str] = {}
        # every `flwr` call of the coordinator: runs, their logs, the release steps (run_config set per run)
        self.link = FlowerFederation(app=Path(cfg.app), name=CONNECTION, flwr_home=self.flwr_home,
                                     run_dir=self.federation_dir, workdir=self.coordinator, timeout=cfg.timeout,
                                     watch=lambda: self.check_alive([h.name for h in self.hospitals]))

    # -- paths the coordinator owns
    @property
    def ca_dir(self) -> Path:
        return self.coordinator / "ca"

    @property
    def tls_dir(self) -> Path:
        return self.coordinator / "superlink-tls"

    @property
    def database(self) -> Path:
        return self.coordinator / "superlink-state.db"

    @property
    def federation_dir(self) -> Path:
        """The ServerApp's ``run-dir``: report.json, checkpoints, global model."""
        return self.coordinator / "federation"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running things
    def env(self, flwr_home: Path) -> dict[str, str]:
        return flower_env(flwr_home)

    def echofleet(self, *args: str) -> None:
        cmd = [find_tool("echofleet"), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise DeployError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def flwr(self, *args: str, timeout: float = 120, check: bool = True, connection: str = CONNECTION) -> FlwrReply:
        """``flwr <args> <connection> --format json``, run as the coordinator (its ``$FLWR_HOME``)."""
        return self.link.flwr(*args, timeout=timeout, check=check, connection=connection)

    def start(self, name: str, cmd: list[str], cwd: Path, flwr_home: Path) -> Started:
        cwd.mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(cmd, cwd=cwd, env=self.env(flwr_home), stdout=log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        proc = Started(name, popen, log_path)
        self.processes.append(proc)
        self._write_processes()
        return proc

    def _write_processes(self) -> None:
        """``processes.json``: every process started (pid = its process group), for a watchdog."""
        listing = [{"name": p.name, "pid": p.popen.pid, "log": str(p.log)} for p in self.processes]
        atomic_write_bytes(self.run_dir / "processes.json", json.dumps(listing).encode())

    def stop(self, proc: Started, grace: float = 10.0) -> int | None:
        """Stop one process and everything it started: SIGINT (Flower's graceful shutdown), a second SIGINT
        (the SuperLink's web server waits for open connections, e.g. a ServerApp mid-run, until a second
        Ctrl-C), SIGTERM, SIGKILL to its process group; then any descendant in a session of its own."""
        if proc.stopped:
            return proc.popen.returncode
        proc.stopped = True
        family = descendants(proc.popen.pid) if proc.alive() else []
        steps = ((signal.SIGINT, grace), (signal.SIGINT, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
        for sig, wait in steps:
            if proc.popen.poll() is not None:
                break
            try:
                os.killpg(proc.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.popen.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        try:  # children left in the group (a ClientApp mid-round) go too
            os.killpg(proc.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
            left = [(pid, start) for pid, start in family if _same_process(pid, start)]
            for pid, _ in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while left and time.monotonic() < deadline and any(_same_process(*p) for p in left):
                time.sleep(0.2)
        return proc.popen.returncode

    def close(self) -> None:
        """Stop everything: a run still going first (``flwr stop``), then SuperNodes, the SuperLink last."""
        if self.link.active_run is not None and (link := self.latest("superlink")) is not None and link.alive():
            self.link.stop_active_run()  # best effort: the processes are stopped below anyway
        self.link.active_run = None
        for proc in reversed(self.processes):
            self.stop(proc)

    # -- 1. coordinator: CA, SuperLink certificate, CLI connection
    def prepare_coordinator(self) -> None:
        self.echofleet("certs", "init", "--out", str(self.ca_dir))
        self.echofleet("certs", "server", "--ca", str(self.ca_dir), "--san", "localhost", "--san", "127.0.0.1",
                       "--out", str(self.tls_dir))
        self.write_connection(CONNECTION, root_certificates=self.ca_dir / "ca.crt")

    def write_connection(self, name: str, *, root_certificates: Path | None = None, insecure: bool = False) -> None:
        """Add a SuperLink connection to the coordinator's ``$FLWR_HOME/config.toml``."""
        path = self.flwr_home / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text() if path.exists() else f'[superlink]\ndefault = "{name}"\n'
        text += f"\n[superlink.{name}]\naddress = {json.dumps(self.address)}\n"
        if root_certificates is not None:
            text += f"root-certificates = {json.dumps(str(root_certificates))}\n"
        if insecure:
            text += "insecure = true\n"
        atomic_write_bytes(path, text.encode())

    # -- 2. hospital: key pair, CA certificate, site policy
    def prepare_hospital(self, h: Hospital) -> None:
        from fed.policy import SitePolicy, write_policy

        self.echofleet("certs", "node", "--out", str(h.private_key), "--comment", h.name)
        shutil.copyfile(self.ca_dir / "ca.crt", h.ca_cert)  # the coordinator hands out its CA certificate
        pinned = ""
        if self.cfg.release_pubkey is not None:  # the hospital's IT pins the release key it was given
            shutil.copyfile(self.cfg.release_pubkey, h.root / "release.pub")
            pinned = str(h.root / "release.pub")
        policy = SitePolicy(data=self.cfg.data, site_name=h.name, state_dir=str(h.root / "state"),
                            allowed_tasks=["classify"], target_epsilon=self.cfg.epsilon, partition="iid",
                            partition_index=self.hospitals.index(h), partition_count=self.cfg.sites, partition_seed=0,
                            release_pubkey=pinned)
        write_policy(policy, h.policy)

    # -- 3. coordinator: SuperLink, registration
    def start_superlink(self) -> Started:
        cmd = [find_tool("flower-superlink"),
               "--ssl-ca-certfile", str(self.tls_dir / "ca.crt"),
               "--ssl-certfile", str(self.tls_dir / "server.crt"),
               "--ssl-keyfile", str(self.tls_dir / "server.key"),
               "--enable-supernode-auth",
               "--database", str(self.database),
               "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(self.superlink_port)]
        proc = self.start("superlink", cmd, self.coordinator, self.flwr_home)
        deadline = time.monotonic() + self.cfg.startup_timeout
        while True:  # ready = the CLI lists nodes over TLS
            if not proc.alive():
                raise DeployError(f"flower-superlink exited ({proc.popen.returncode}); log {proc.log}:\n{proc.log_tail()}")
            if self.flwr("supernode", "list", check=False, timeout=60).data.get("success"):
                return proc
            if time.monotonic() > deadline:
                raise DeployError(f"flower-superlink not ready after {self.cfg.startup_timeout:.0f} s; log {proc.log}")
            time.sleep(1.0)

    def register(self, h: Hospital) -> str:
        """``flwr supernode register`` of the hospital's PUBLIC key; returns the node id."""
        received = self.coordinator / "received-keys" / f"{h.name}.pub"
        received.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(h.public_key, received)  # what the hospital sent (only the public key)
        reply = self.flwr("supernode", "register", str(received), "--name", h.name).data
        self.node_ids[h.name] = str(reply["node-id"])
        return self.node_ids[h.name]

    def nodes(self) -> dict[str, str]:
        """node id -> status ("registered", "online", "offline", ...) as the SuperLink reports it."""
        reply = self.flwr("supernode", "list").data
        return {str(n["node-id"]): n["status"] for n in reply.get("nodes", [])}

    # -- 4. hospital: SuperNode
    def supernode_command(self, h: Hospital, *, tls: bool = True, key: bool = True,
                          max_wait: float | None = None) -> list[str]:
        """The hospital's ``flower-supernode`` command. ``tls``/``key`` False: the refusals the tests show."""
        cmd = [find_tool("flower-supernode"), "--superlink", self.address]
        cmd += ["--root-certificates", str(h.ca_cert)] if tls else ["--insecure"]
        if key:
            cmd += ["--auth-supernode-private-key", str(h.private_key)]
        cmd += ["--node-config", f"policy={json.dumps(str(h.policy))}", "--host", "127.0.0.1", "--port", str(h.port)]
        if max_wait is not None:  # give up instead of retrying forever
            cmd += ["--max-retries", "3", "--max-wait-time", str(max_wait)]
        return cmd

    def start_supernode(self, h: Hospital, **kw) -> Started:
        return self.start(f"supernode-{h.name}", self.supernode_command(h, **kw), h.root, h.flwr_home)

    def latest(self, name: str) -> Started | None:
        """The most recent process started under ``name`` (a restart replaces the earlier one)."""
        return next((p for p in reversed(self.processes) if p.name == name), None)

    def check_alive(self, hospitals: list[str]) -> None:
        """Raise (with the log tail) if the SuperLink or one of these hospitals' SuperNodes has exited."""
        for name in ["superlink", *(f"supernode-{h}" for h in hospitals)]:
            p = self.latest(name)
            if p is None:
                raise DeployError(f"{name} was never started")
            if not p.alive():
                raise DeployError(f"{name} exited ({p.popen.returncode}); log {p.log}:\n{p.log_tail()}")

    def wait_online(self, names: list[str]) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout
        want = {self.node_ids[n] for n in names}
        while True:
            self.check_alive(names)
            status = self.nodes()
            if all(status.get(i) == "online" for i in want):
                return
            if time.monotonic() > deadline:
                raise DeployError(f"SuperNodes not online after {self.cfg.startup_timeout:.0f} s: {status}")
            time.sleep(1.0)

    # -- 5. coordinator: the run
    def bring_up(self, step: Callable[[str], None] = lambda _text: None) -> None:
        """Steps 1-4 in order: certificates, hospitals, the TLS SuperLink, registrations, every
        SuperNode, until all are online (``step`` is told each one)."""
        step(f"coordinator: CA + SuperLink certificate in {self.coordinator}")
        self.prepare_coordinator()
        for h in self.hospitals:
            step(f"{h.name}: SuperNode key pair + site policy in {h.root}")
            self.prepare_hospital(h)
        step(f"coordinator: flower-superlink on {self.address} (TLS, SuperNode auth, --database, no dependency install)")
        self.start_superlink()
        for h in self.hospitals:
            step(f"coordinator: flwr supernode register {h.name} -> node {self.register(h)}")
        for h in self.hospitals:
            step(f"{h.name}: flower-supernode (runtime API on 127.0.0.1:{h.port})")
            self.start_supernode(h)
        self.wait_online([h.name for h in self.hospitals])
        step(f"all {len(self.hospitals)} SuperNodes online")

    def run_config(self) -> dict:
        return federation_run_config(self.cfg, self.federation_dir)

    def run_federation(self, progress: Callable[[str], None] = print) -> tuple[str, dict]:
        """``flwr run`` the app; wait until it finishes and ``report.json`` exists. Returns (run id, report)."""
        report_path = self.federation_dir / "report.json"
        model_path = self.federation_dir / "global" / "model.json"
        run_id = self.link.run_until(self.run_config(), "run-config", report_path, "training", progress)
        if not model_path.is_file():
            raise DeployError(f"run {run_id} completed without writing {model_path}; ServerApp log: "
                              f"{self.coordinator / 'serverapp.log'}")
        return run_id, json.loads(report_path.read_text())

    # -- 6. coordinator: the edge release, calibrated at the hospitals (run-config mode = "release")
    def release_link(self) -> FlowerFederation:
        """The release steps over this deployment's SuperLink (the training run's config, mode "release")."""
        self.link.run_config = self.run_config()
        return self.link

    def site_calibration(self, progress: Callable[[str], None] = print):
        """:meth:`FlowerFederation.site_calibration` over this deployment: the plan goes to
        ``RUN/release/plan.npz``, a ``flwr run`` with ``mode = "release"`` (same TLS SuperLink, same
        registered SuperNodes) sends it to every hospital, and the answers are read back."""
        return self.release_link().site_calibration(progress)

    def site_acceptance(self, progress: Callable[[str], None] = print):
        """:meth:`FlowerFederation.site_acceptance` over this deployment (``edge.build.pipeline.build(accept=...)``)."""
        return self.release_link().site_acceptance(progress)

    def summary(self) -> dict:
        return {"superlink": self.address, "database": str(self.database), "run_dir": str(self.federation_dir),
                "hospitals": [dict(asdict(h), root=str(h.root), node_id=self.node_ids.get(h.name))
                              for h in self.hospitals],
                "processes": [{"name": p.name, "pid": p.popen.pid, "returncode": p.popen.returncode}
                              for p in self.processes]}


# ------------------------------------------------------------------------------------------------
# The whole deployment, start to end


def deploy(cfg: DeployConfig, say: Callable[[str], None] = print) -> dict:
    """Steps 1-6. Returns the run report; writes ``deployment.json`` (node ids, pids, exit codes)."""
    run_dir = Path(cfg.run_dir).resolve()
    if (run_dir / "coordinator").exists() or (run_dir / "hospitals").exists():
        raise DeployError(f"{run_dir} already holds a deployment: choose an empty --run-dir (or delete it)")
    federation_run_config(cfg, run_dir / "coordinator" / "federation")  # bad keys fail before anything starts
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.release_target and cfg.release_pubkey is None:  # the release key, made first: the hospitals pin it
        from echocare.bundle import generate_keypair

        cfg = replace(cfg, release_pubkey=generate_keypair(run_dir / "coordinator" / "keys" / "release")[1])
    t0 = time.monotonic()

    def step(text: str) -> None:
        say(f"[{time.monotonic() - t0:6.1f} s] {text}")

    with Deployment(cfg) as d:
        try:
            d.bring_up(step)
            step(f"coordinator: flwr run {cfg.app} with {d.run_config()}")
            run_id, report = d.run_federation(progress=step)
            step(f"run {run_id} completed: {d.federation_dir / 'report.json'}")
            if cfg.release_target:
                report["release"] = release(d, cfg, step)
        finally:
            step("stopping every process started here")
            d.close()
            summary = d.summary()
            atomic_write_bytes(run_dir / "deployment.json", json.dumps(summary, indent=2).encode())
    return report


def release(d: Deployment, cfg: DeployConfig, step: Callable[[str], None]) -> dict:
    """Step 6: an INT8 build of the run's global model for ``cfg.release_target``, calibrated at the
    hospitals over the deployment and, without ``release_val``, accepted by them; signed with the key
    :func:`deploy` made first (``coordinator/keys/release``, pinned in every hospital's policy)."""
    from edge.build.pipeline import build

    key = d.coordinator / "keys" / "release"
    step(f"coordinator: edge build {d.federation_dir} --target {cfg.release_target} --calib sites"
         + (f" --val {cfg.release_val}" if cfg.release_val else " --accept sites") + " (flwr run, mode=release)")
    from edge.build.gate import GateFailed
    from edge.build.pipeline import AcceptanceRefused

    try:
        summary = build(d.federation_dir, cfg.release_target, "sites", cfg.release_val, key, d.run_dir / "dist",
                        sites=d.site_calibration(progress=step), progress=step,
                        accept=None if cfg.release_val else d.site_acceptance(progress=step))
    except (GateFailed, AcceptanceRefused) as e:  # a refused build is an outcome, not a broken deployment
        step(f"edge release refused: {e}")
        return {"ok": False, "reason": str(e)}
    step(f"edge release {'ok' if summary.ok else 'FAILED'}: {summary.tarball}")
    return {"ok": summary.ok, "tarball": str(summary.tarball), "calibration": summary.manifest["calibration"],
            "gate": summary.gate.to_dict() if summary.gate else None, "acceptance": summary.manifest.get("acceptance")}


def print_summary(report: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"federation over Flower's deployment engine ({report['rounds_completed']} rounds)")
    sites = sorted({s for r in report["rounds"] for s in r["sites"]})
    table.add_column("round")
    table.add_column(report["metric"], justify="right")
    for s in sites:
        table.add_column(f"{s} epsilon", justify="right")
    for r in report["rounds"]:
        metric = r["aggregated"].get("evaluate", {}).get(report["metric"])
        eps = [r["sites"].get(s, {}).get("privacy", {}).get("epsilon") for s in sites]
        table.add_row(str(r["round"]), "-" if metric is None else f"{metric:.3f}",
                      *("-" if e is None else f"{e:.2f}" for e in eps))
    console = Console()
    console.print(table)
    console.print(f"report: {run_dir / 'coordinator' / 'federation' / 'report.json'}; "
                  f"global model: {run_dir / 'coordinator' / 'federation' / 'global'}")


