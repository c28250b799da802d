"""The scanner-side release agent: poll the registry, download, verify, install, self-test, report.

One :meth:`Agent.run_once` cycle:

1. ask the registry for the current release of this device class on this channel;
2. if it is not what runs here (and has not failed here before), download it into
   ``downloads/<version>-<sha>.tar.gz.part`` — resuming from the part file's size after an
   interrupted download — and check the size and sha256 the registry announced;
3. verify it with the pinned publisher key (:func:`echocare.bundle.verify_bundle`): signature, every
   artifact hash, no unlisted files; the manifest's version (and ``device_class``, when present)
   must be the release's;
4. install: unpack into a temporary folder, move it to ``versions/<version>-<sha12>/``, then one
   switch: a temporary symlink renamed over ``current`` (``os.replace`` is atomic, so ``current``
   is always either the old bundle or the new one, never half of one);
5. run the bundle's self-test through ``current``; on failure switch ``current`` back to the
   previous bundle (or remove it when there was none), remember the failed release so it is not
   retried, and report ``unhealthy``;
6. report status (running version, health, message) to the registry.

:meth:`Agent.run_forever` repeats that every ``interval_s`` (with ±10 % jitter so a fleet does not
poll in lockstep); while the registry is unreachable, or the device itself fails (``OSError``: a
full disk, a read-only mount), it logs, retries with exponential backoff and jitter capped at
``backoff_max_s``, and keeps running.

Everything the registry says is untrusted until the bundle's signature is checked, and the
release's ``version`` and ``sha256`` name files here: a release whose version is not a plain bundle
version (:data:`echocare.bundle.NAME_PATTERN`, so no ``/`` and no ``..``) or whose sha256 is not 64
hex digits is refused before anything is written (``action="refused"``, reported unhealthy). The
device directory::

    DIR/current -> versions/<version>-<sha12>    what applications load
    DIR/versions/<version>-<sha12>/              installed bundles (current + previous kept)
    DIR/downloads/*.tar.gz.part                  partial downloads (resumed)
    DIR/state.json                               current/previous/failed releases (atomic writes)
    DIR/precision.json                           an auto bundle's precision choice on this CPU
    DIR/.lock                                    one agent per directory

The self-test is injectable (``self_test=``): by default it loads ``current`` with
:func:`edge.device.runtime.load_bundle` and runs :meth:`BundleRuntime.self_test` on the sample shipped
in the bundle. For an auto bundle (several precision candidates) that load times the candidates on
this CPU and self-tests the fastest; the choice is written to ``DIR/precision.json`` (what
``echofleet edge infer --choice-file`` reuses) and reported to the registry in the status message
of the install and of every later poll. Imports are torch-free (grpcio, protobuf, cryptography, numpy + a backend).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from echocare.atomic import atomic_write_bytes, fsync_dir
from echocare.bundle import NAME_PATTERN, BundleError, load_public_key, safe_extract, sha256_file, verify_bundle
from server.registry.client import ConnectionConfig, RegistryClient, RegistryError

log = logging.getLogger(__name__)

MAX_FAILED_REMEMBERED = 50
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_DEVICE_CLASS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # as the registry's device classes
SelfTest = Callable[[Path], tuple[bool, str]]


CHOICE_FILE = "precision.json"


def runtime_self_test(bundle_dir: Path, choice_file: Path | None = None) -> tuple[bool, str]:
    """Load the bundle with the edge runtime and run its shipped self-test sample; for an auto bundle
    the candidates are timed on this CPU first, the fastest is self-tested and the choice is written
    to ``choice_file`` (and named in the message)."""
    from edge.device.runtime import load_bundle  # numpy + inference backend: imported only when needed

    try:
        with load_bundle(bundle_dir, backend="auto", choice_file=choice_file) as rt:
            ok, msg = rt.self_test()
            return ok, msg + (f"; {rt.choice.summary()}" if rt.choice is not None else "")
    except Exception as e:  # a bundle that cannot even load has failed its self-test
        return False, f"bundle failed to load: {type(e).__name__}: {e}"


@dataclass
class Backoff:
    """Exponential backoff with jitter: attempt n waits in [d/2, d], d = min(max_s, initial_s * 2**n)."""

    initial_s: float = 1.0
    max_s: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        d = min(self.max_s, self.initial_s * (2.0 ** min(attempt, 30)))
        return d / 2 + self.rng.uniform(0, d / 2)


@dataclass
class AgentConfig:
    """What ``echofleet edge agent`` is given."""

    registry: str  # host:port
    device_class: str
    pubkey: Path  # pinned release-signing public key (Ed25519 PEM)
    dir: Path
    token: str  # this device's token (from `echofleet registry devices add`)
    ca: Path | None = None  # registry CA certificate to pin (TLS)
    insecure: bool = False  # plaintext: loopback tests only
    server_name: str | None = None
    channel: str = "stable"
    interval_s: float = 60.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 30.0
    chunk_size: int = 0  # download chunk (0: the registry's default)

    def __post_init__(self) -> None:
        if self.channel not in ("canary", "stable"):
            raise ValueError(f"channel {self.channel!r}: expected 'canary' or 'stable'")
        if not _DEVICE_CLASS_RE.fullmatch(self.device_class):
            raise ValueError(f"device class {self.device_class!r}: use 1-64 letters, digits, '_' or '-'")


@dataclass
class CycleResult:
    """What one poll did.

    ``action``: ``installed``, ``up-to-date``, ``no-release``, ``rolled-back`` (self-test failed),
    ``refused`` (verification failed) or ``skipped`` (this release failed here before).
    """

    action: str
    running_version: str
    target_version: str
    health: str
    message: str
    resumed_from: int = 0
    reported: bool = False


class AgentError(Exception):
    """The device directory is unusable (message names the path and the reason)."""


class _Refused(Exception):
    """The downloaded release must not be installed (recorded as failed)."""


class Agent:
    """Keeps ``cfg.dir/current`` on the registry's current release for this device class and channel."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        client: RegistryClient | None = None,
        self_test: SelfTest | None = None,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
    ):
        self.cfg = cfg
        self.root = Path(cfg.dir)
        self.versions, self.downloads = self.root / "versions", self.root / "downloads"
        self.current_link, self.state_path = self.root / "current", self.root / "state.json"
        self.public_key = load_public_key(Path(cfg.pubkey))
        self.choice_path = self.root / CHOICE_FILE
        self.self_test = self_test or (lambda bundle_dir: runtime_self_test(bundle_dir, self.choice_path))
        self._rng = rng or random.Random()
        self.backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s, self._rng)
        self._stop = threading.Event()
        self._sleep = sleep or (lambda s: self._stop.wait(s))
        self._client = client
        self._owns_client = client is None
        for d in (self.versions, self.downloads):
            d.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise AgentError(f"{self.root}: another agent is running on this directory") from None
        self.recover()

    # ------------------------------------------------------------------ lifecycle
    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = RegistryClient(
                ConnectionConfig(
                    address=self.cfg.registry, token=self.cfg.token, ca=self.cfg.ca, insecure=self.cfg.insecure,
                    server_name=self.cfg.server_name, timeout_s=self.cfg.timeout_s,
                    max_reconnect_backoff_s=self.cfg.backoff_max_s,
                )
            )
        return self._client

    def close(self) -> None:
        if self._client is not None and self._owns_client:
            self._client.close()
            self._client = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> None:
        """Ask :meth:`run_forever` to return (from another thread or a signal handler)."""
        self._stop.set()

    # ------------------------------------------------------------------ state
    def _load_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            state = {}
        except (OSError, ValueError) as e:
            raise AgentError(f"{self.state_path}: unreadable agent state ({e}); move it away to start fresh") from None
        state.setdefault("current", None)  # {"folder", "version", "sha256"} of the confirmed-good bundle
        state.setdefault("previous", None)
        state.setdefault("pending", None)  # the entry being switched to (crash recovery)
        state.setdefault("failed", {})  # sha256 -> {"version", "reason", "at"}
        return state

    def _save_state(self, state: dict) -> None:
        failed = state["failed"]
        for sha in sorted(failed, key=lambda k: failed[k].get("at", 0))[:-MAX_FAILED_REMEMBERED]:
            del failed[sha]  # forget the oldest failures: the list must not grow forever
        atomic_write_bytes(self.state_path, json.dumps(state, indent=2, sort_keys=True).encode(), 0o600)
        fsync_dir(self.root)

    def current_folder(self) -> str | None:
        """The ``versions/`` folder ``current`` points at, or None when nothing is installed."""
        if not self.current_link.is_symlink():
            if self.current_link.exists():
                raise AgentError(f"{self.current_link}: exists but is not a symlink (not managed by the agent)")
            return None
        return Path(os.readlink(self.current_link)).name

    def running_version(self) -> str:
        entry = self._load_state()["current"]
        return entry["version"] if entry and entry["folder"] == self.current_folder() else ""

    def _switch(self, folder: str | None) -> None:
        """Point ``current`` at ``versions/folder`` in one atomic rename (None: remove ``current``)."""
        if folder is None:
            self.current_link.unlink(missing_ok=True)
        else:
            tmp = self.root / f".current.{os.getpid()}.{self._rng.getrandbits(32):08x}"
            tmp.unlink(missing_ok=True)
            os.symlink(f"versions/{folder}", tmp)
            try:
                os.replace(tmp, self.current_link)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        fsync_dir(self.root)

    def recover(self) -> None:
        """Make the directory consistent after a crash (called at start).

        Removes temp links and unpack folders; if ``current`` points at a bundle that was switched
        to but never confirmed (crash between the switch and the self-test), runs the self-test
        now and keeps or rolls back exactly as an install would.
        """
        for p in self.root.glob(".current.*"):
            p.unlink(missing_ok=True)
        for p in self.versions.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        state = self._load_state()
        folder = self.current_folder()
        confirmed = state["current"]["folder"] if state["current"] else None
        if folder is not None and not (self.versions / folder).is_dir():
            log.warning("current -> %s, which is missing; switching back to %s", folder, confirmed)
            folder = None
            self._switch(confirmed if confirmed and (self.versions / confirmed).is_dir() else None)
        if folder is not None and folder != confirmed:
            pending = state["pending"]
            entry = pending if pending and pending["folder"] == folder else _entry_from_folder(folder)
            ok, msg = self._run_self_test()
            if ok:
                state["previous"], state["current"] = state["current"], entry
            else:
                self._switch(confirmed if confirmed and (self.versions / confirmed).is_dir() else None)
                state["failed"][entry["sha256"]] = {"version": entry["version"], "reason": msg, "at": time.time()}
            state["pending"] = None
            self._save_state(state)

    # ------------------------------------------------------------------ one cycle
    def run_once(self) -> CycleResult:
        """Poll once; install the current release if needed; report. Raises :class:`RegistryError`
        when the registry cannot be reached (callers retry), after leaving the directory consistent."""
        release = self.client.current_release(self.cfg.device_class, self.cfg.channel)
        state = self._load_state()
        running = self.running_version()
        problem = None if release is None else release_problem(release, self.cfg.device_class)
        if release is None:
            result = CycleResult("no-release", running, "", "healthy" if running else "unknown",
                                 f"no release on the {self.cfg.channel} channel yet")
        elif problem is not None:  # before any path is built from it: nothing is written
            log.error("refused the registry's release: %s", problem)
            result = CycleResult("refused", running, "", "unhealthy", f"refused the registry's release: {problem}")
        elif running and self.current_folder() == _folder(release):
            if state["current"]["sha256"] != release.sha256:  # entry rebuilt from the folder name
                state["current"]["sha256"] = release.sha256
                self._save_state(state)
            result = CycleResult("up-to-date", running, release.version, "healthy", f"running {running}{self._choice_note(running)}")
        elif release.sha256 in state["failed"]:
            why = state["failed"][release.sha256]["reason"]
            result = CycleResult("skipped", running, release.version, "unhealthy",
                                 f"release {release.version} failed here before: {why}")
        else:
            result = self._install(release)
        result.reported = self._report(result)
        return result

    def _choice_note(self, version: str) -> str:
        """``"; precision candidate X: why"`` when ``DIR/precision.json`` is the running bundle's choice, else ""."""
        try:
            rec = json.loads(self.choice_path.read_text())
            if str(rec.get("bundle", "")).endswith(f"-{version}") and rec.get("candidate"):
                return f"; precision candidate {rec['candidate']}: {rec.get('reason', '')}"
        except (OSError, ValueError, AttributeError):
            pass
        return ""

    def _report(self, result: CycleResult) -> bool:
        try:
            self.client.report_status(result.running_version, result.health, result.message, self.cfg.channel)
            return True
        except RegistryError as e:
            log.warning("status report failed: %s", e)
            return False

    def _install(self, release) -> CycleResult:
        sha, version = release.sha256, release.version
        folder = _folder(release)
        tarball, resumed = self._download(release)
        state = self._load_state()
        previous = self.current_folder()
        previous_version = self.running_version()
        try:
            self._unpack_verified(tarball, folder, release)
        except _Refused as e:
            state["failed"][sha] = {"version": version, "reason": str(e), "at": time.time()}
            self._save_state(state)
            tarball.unlink(missing_ok=True)
            log.error("refused release %s: %s", version, e)
            return CycleResult("refused", previous_version, version, "unhealthy",
                               f"refused release {version}: {e}", resumed)
        tarball.unlink(missing_ok=True)

        entry = {"folder": folder, "version": version, "sha256": sha}
        state["pending"] = entry
        self._save_state(state)
        self._switch(folder)
        ok, msg = self._run_self_test()
        state["pending"] = None
        if ok:
            state["previous"], state["current"] = state["current"], entry
            self._save_state(state)
            self._prune(keep={folder, previous})
            log.info("installed %s (%s)", version, msg)
            return CycleResult("installed", version, version, "healthy", f"installed {version}: {msg}", resumed)
        # Roll back: the previous bundle if there was one, else nothing at all.
        self._switch(previous)
        state["failed"][sha] = {"version": version, "reason": msg, "at": time.time()}
        self._save_state(state)
        shutil.rmtree(self.versions / folder, ignore_errors=True)
        log.error("release %s failed its self-test, rolled back to %s: %s", version, previous_version or "nothing", msg)
        return CycleResult("rolled-back", previous_version, version, "unhealthy",
                           f"release {version} failed its self-test ({msg}); rolled back to "
                           f"{previous_version or 'no bundle'}", resumed)

    def _run_self_test(self) -> tuple[bool, str]:
        try:
            return self.self_test(self.current_link)
        except Exception as e:
            return False, f"self-test crashed: {type(e).__name__}: {e}"

    # ------------------------------------------------------------------ download + unpack
    def _download(self, release) -> tuple[Path, int]:
        """The complete, hash-checked tarball of ``release``; resumes from a ``.part`` file."""
        stem = f"{release.version}-{release.sha256[:16]}.tar.gz"
        final, part = self.downloads / stem, self.downloads / (stem + ".part")
        for stale in self.downloads.iterdir():  # parts of releases that are no longer current
            if stale.name not in (stem, stem + ".part"):
                stale.unlink(missing_ok=True)
        if final.is_file() and sha256_file(final) == release.sha256:
            return final, 0
        offset = part.stat().st_size if part.is_file() else 0
        if offset > release.size:
            part.unlink()
            offset = 0
        resumed = offset
        for attempt in (0, 1):
            with open(part, "ab") as out:
                self.client.download(
                    self.cfg.device_class, release.version, out, offset=offset, chunk_size=self.cfg.chunk_size
                )
                out.flush()
                os.fsync(out.fileno())
            size = part.stat().st_size
            if size == release.size and sha256_file(part) == release.sha256:
                os.replace(part, final)
                return final, resumed
            part.unlink(missing_ok=True)
            if attempt == 0 and offset > 0:
                log.warning("resumed download of %s did not match its sha256; downloading it again", release.version)
                offset = resumed = 0
                continue
            break
        raise RegistryError(
            grpc.StatusCode.DATA_LOSS, f"download of {release.version} ({size} bytes) does not match the registry's size/sha256",
            "Download",
        )

    def _unpack_verified(self, tarball: Path, folder: str, release) -> None:
        """Unpack ``tarball`` as ``versions/folder`` after verifying it; raises :class:`_Refused`."""
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder}-", dir=self.versions))
        try:
            try:
                bundle_dir = safe_extract(tarball, tmp)
                manifest = verify_bundle(bundle_dir, self.public_key)
            except BundleError as e:
                raise _Refused(str(e).replace(str(tmp) + "/", "")) from None
            if str(manifest.get("version")) != release.version:
                raise _Refused(f"manifest version {manifest.get('version')!r} is not the release's {release.version!r}")
            signed_class = manifest.get("device_class")
            if signed_class and signed_class != self.cfg.device_class:
                raise _Refused(f"bundle is signed for device class {signed_class!r}, this is {self.cfg.device_class!r}")
            dest = self.versions / folder
            if dest.exists():  # left over from an earlier failed attempt; never the running bundle
                if folder == self.current_folder():
                    raise AgentError(f"{dest}: would replace the running bundle")
                shutil.rmtree(dest)
            os.replace(bundle_dir, dest)
            fsync_dir(self.versions)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _prune(self, keep: set[str | None]) -> None:
        """Remove installed bundles other than ``keep`` (the new current and its rollback target)."""
        for p in self.versions.iterdir():
            if p.is_dir() and not p.name.startswith(".tmp-") and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ loops
    def run_once_with_retries(self, max_attempts: int = 5) -> CycleResult:
        """:meth:`run_once`, retrying transient registry failures with backoff (for ``--once``)."""
        for attempt in range(max_attempts):
            try:
                return self.run_once()
            except RegistryError as e:
                if not e.retryable or attempt == max_attempts - 1:
                    raise
                delay = self.backoff.delay(attempt)
                log.warning("registry unreachable (%s); retrying in %.1f s", e.code.name, delay)
                self._sleep(delay)
                if self._stop.is_set():
                    raise
        raise AssertionError("unreachable")

    def run_forever(self, on_cycle: Callable[[CycleResult | RegistryError | OSError | AgentError], None] | None = None) -> None:
        """Poll until :meth:`stop`. Transient registry failures and failures of the device itself
        (``OSError``: a full disk; :class:`AgentError`: e.g. a ``current`` that someone replaced)
        back off exponentially (bounded by ``backoff_max_s``) and the loop keeps running; other
        registry errors (bad token, unknown class) are logged and retried at the normal interval,
        since an administrator may fix them on the registry side."""
        failures = 0
        while not self._stop.is_set():
            outcome: CycleResult | RegistryError | OSError | AgentError
            try:
                outcome = self.run_once()
                failures = 0
                delay = self.cfg.interval_s * self._rng.uniform(0.9, 1.1)
            except RegistryError as e:
                outcome = e
                if e.retryable:
                    delay = self.backoff.delay(failures)
                    failures += 1
                    log.warning("registry unreachable (%s); retrying in %.1f s", e.code.name, delay)
                else:
                    delay = self.cfg.interval_s
                    log.error("registry refused the agent: %s", e)
            except (OSError, AgentError) as e:  # the device's own failure: the directory stays consistent
                outcome = e
                delay = self.backoff.delay(failures)
                failures += 1
                log.error("cycle failed on this device (%s: %s); retrying in %.1f s", type(e).__name__, e, delay)
            if on_cycle:
                on_cycle(outcome)
            if self._stop.is_set():
                break
            self._sleep(delay)


def release_problem(release, device_class: str) -> str | None:
    """Why a release announced by the registry must not be used here (its fields name files), or None."""
    version, sha = getattr(release, "version", None), getattr(release, "sha256", None)
    announced_class = getattr(release, "device_class", "") or ""
    if announced_class and announced_class != device_class:
        return (f"the registry announced a release of device class {announced_class!r}, this is {device_class!r}; "
                "nothing was written")
    if not isinstance(version, str) or not re.fullmatch(NAME_PATTERN, version):
        return f"version {version!r} is not a bundle version (must match {NAME_PATTERN}); nothing was written"
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        return f"sha256 {sha!r} of release {version} is not 64 lowercase hex digits; nothing was written"
    size = getattr(release, "size", None)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        return f"size {size!r} of release {version} is not a positive number of bytes; nothing was written"
    return None


def _folder(release) -> str:
    """Where a release is installed: ``versions/<version>-<first 12 hex of its sha256>``."""
    return f"{release.version}-{release.sha256[:12]}"


def _entry_from_folder(folder: str) -> dict:
    """Best effort for a folder switched to by an agent that crashed before recording it."""
    version, _, sha12 = folder.rpartition("-")
    return {"folder": folder, "version": version, "sha256": sha12}
