"""The registry's state: an embedded SQLite database (WAL) and a content-addressed blob folder.

Layout on disk::

    <db>                       SQLite: device classes, releases, devices (WAL journal beside it)
    <db folder>/audit.jsonl    append-only audit log of promotions (server.registry.audit)
    <blobs>/sha256/ab/abcd...  one tarball per distinct content, named by its sha256
    <blobs>/incoming/          uploads in progress (temp files; removed on failure and at start)

Gating: a release reaches ``stable`` (by :meth:`RegistryStore.promote` or a publish straight to
stable) only when its signed manifest carries a passing acceptance record
(:func:`echocare.bundle.acceptance_of`, recounted by its ``verdict``); otherwise only with
``force`` and a written reason. Every promotion, forced or not, and every refused one is
appended to the audit log before the database changes: an event that cannot be written stops the
promotion.

Write order makes every crash safe: a blob is complete (fsync + ``os.replace``) before the row
that references it is committed, so the database never points at a missing or partial blob; a
crash in between only leaves an unreferenced blob. Nothing here knows about gRPC or tokens except
that device tokens are stored as sha256 hashes (see :mod:`server.registry.auth`).

All methods are thread-safe (one connection, one lock: every statement here is short).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from echocare.atomic import fsync_dir
from echocare.bundle import BundleError, acceptance_of
from server.registry.audit import AuditEvent, AuditLog

CHANNELS = ("canary", "stable")
HEALTH = ("unknown", "healthy", "unhealthy")
# Device ids and class names appear in tokens ("<id>.<secret>"), paths and tables: keep them plain.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS device_classes (
    name        TEXT PRIMARY KEY,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    device_class  TEXT NOT NULL REFERENCES device_classes(name),
    version       TEXT NOT NULL,
    sha256        TEXT NOT NULL,
    size          INTEGER NOT NULL,
    manifest_json TEXT NOT NULL,
    published_at  REAL NOT NULL,
    published_seq INTEGER NOT NULL,
    promoted_at   REAL,
    promoted_seq  INTEGER,
    PRIMARY KEY (device_class, version)
);
CREATE TABLE IF NOT EXISTS devices (
    device_id       TEXT PRIMARY KEY,
    device_class    TEXT NOT NULL REFERENCES device_classes(name),
    token_sha256    TEXT NOT NULL,
    enrolled_at     REAL NOT NULL,
    running_version TEXT NOT NULL DEFAULT '',
    health          TEXT NOT NULL DEFAULT 'unknown',
    message         TEXT NOT NULL DEFAULT '',
    channel         TEXT NOT NULL DEFAULT '',
    last_seen       REAL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class StoreError(Exception):
    """Base class; ``str(e)`` says what and why."""


class NotFound(StoreError):
    """Unknown device class, release or device."""


class Conflict(StoreError):
    """The name is taken with different content."""


class Invalid(StoreError):
    """A malformed name, version or field."""


class GateRefused(StoreError):
    """The release has no passing acceptance record and the gate was not overridden."""


class AuditUnavailable(StoreError):
    """The audit log could not be written, so the action it would record was not taken."""


MAX_REASON_CHARS = 2000


def acceptance_verdict(manifest: dict) -> tuple[bool, str]:
    """(may go to stable, why): the signed manifest's acceptance record, recounted."""
    try:
        record = acceptance_of(manifest)
    except BundleError as e:
        return False, f"malformed acceptance record ({e})"
    if record is None:
        return False, "the signed manifest has no acceptance record"
    return record.verdict()


@dataclass(frozen=True)
class ReleaseRecord:
    device_class: str
    version: str
    sha256: str
    size: int
    manifest_json: str
    published_at: float
    promoted_at: float | None
    current: bool = False

    @property
    def manifest(self) -> dict:
        return json.loads(self.manifest_json)


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    device_class: str
    enrolled_at: float
    running_version: str
    health: str
    message: str
    channel: str
    last_seen: float | None


def check_name(kind: str, value: str) -> str:
    """Raise :class:`Invalid` unless ``value`` is a plain identifier (letters, digits, ``_``, ``-``)."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise Invalid(f"{kind} {value!r}: use 1-64 letters, digits, '_' or '-' (starting with a letter or digit)")
    return value


def check_version(value: str) -> str:
    if not isinstance(value, str) or not VERSION_RE.fullmatch(value):
        raise Invalid(f"version {value!r}: use 1-128 letters, digits, '.', '_', '+' or '-'")
    return value


class RegistryStore:
    """SQLite + blobs. Open one per process; close with :meth:`close` (or use as a context manager)."""

    def __init__(self, db_path: Path, blob_dir: Path, audit_path: Path | None = None):
        self.db_path, self.blob_dir = Path(db_path), Path(blob_dir)
        self.audit = AuditLog(Path(audit_path) if audit_path else self.db_path.parent / "audit.jsonl")
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        (self.blob_dir / "sha256").mkdir(parents=True, exist_ok=True)
        self.incoming = self.blob_dir / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming.iterdir():  # uploads interrupted by a crash or a kill
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "RegistryStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self) -> "_Transaction":
        return _Transaction(self._db, self._lock)

    def _next_seq(self, db: sqlite3.Connection) -> int:
        db.execute("INSERT INTO counters(name, value) VALUES('seq', 0) ON CONFLICT(name) DO NOTHING")
        db.execute("UPDATE counters SET value = value + 1 WHERE name = 'seq'")
        return int(db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0])

    # ------------------------------------------------------------------ device classes
    def ensure_class(self, name: str) -> None:
        """Create a device class if it does not exist (admin actions only: publish, enrol)."""
        check_name("device class", name)
        with self._tx() as db:
            db.execute(
                "INSERT INTO device_classes(name, created_at) VALUES(?, ?) ON CONFLICT(name) DO NOTHING",
                (name, time.time()),
            )

    def class_exists(self, name: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM device_classes WHERE name = ?", (name,)).fetchone()
        return row is not None

    def list_classes(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT name FROM device_classes ORDER BY name")]

    # ------------------------------------------------------------------ blobs
    def blob_path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise Invalid(f"sha256 {sha256!r}: not a hex digest")
        return self.blob_dir / "sha256" / sha256[:2] / sha256

    def new_upload(self) -> tuple[BinaryIO, Path]:
        """An open temp file under ``incoming/`` for an upload in progress."""
        fd, tmp = tempfile.mkstemp(dir=self.incoming, prefix="upload-", suffix=".tar.gz")
        return os.fdopen(fd, "wb"), Path(tmp)

    @staticmethod
    def digest(path: Path) -> tuple[str, int]:
        """(sha256, size) of a file."""
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
        return h.hexdigest(), size

    def commit_blob(self, tmp: Path, digest: str) -> None:
        """Move a complete upload whose sha256 is ``digest`` to its content address."""
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)  # same content, same name: replacing an existing blob is harmless
        fsync_dir(final.parent)

    def check_new_release(self, device_class: str, version: str, sha256: str) -> None:
        """Raise :class:`Conflict` if ``version`` of ``device_class`` exists with other content
        (checked before the blob is committed, so a refused upload leaves no blob behind)."""
        with self._lock:
            row = self._db.execute(
                "SELECT sha256 FROM releases WHERE device_class = ? AND version = ?", (device_class, version)
            ).fetchone()
        if row is not None and row[0] != sha256:
            raise Conflict(
                f"{device_class} {version} is already published with different content "
                f"(sha256 {row[0][:12]}...); publish a new version instead"
            )

    def open_blob(self, sha256: str) -> BinaryIO:
        path = self.blob_path(sha256)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {sha256} is missing from {self.blob_dir} (was the blob folder moved?)") from None

    # ------------------------------------------------------------------ releases
    def add_release(
        self, device_class: str, version: str, sha256: str, size: int, manifest: dict, channel: str = "canary",
        actor: str = "",
    ) -> tuple[ReleaseRecord, bool]:
        """Record a release whose blob is already committed. Returns (record, already_present).

        Same class+version with the same sha256 is idempotent (``already_present``); with another
        sha256 it raises :class:`Conflict` and changes nothing. ``channel="stable"`` is gated like
        :meth:`promote` without ``force`` (see :meth:`check_promotable`) and audited.
        """
        check_name("device class", device_class)
        check_version(version)
        if channel not in CHANNELS:
            raise Invalid(f"channel {channel!r}: expected one of {CHANNELS}")
        if channel == "stable":
            verdict = self.check_promotable(manifest, f"publishing {device_class} {version} straight to stable")
            self._audit("promote", device_class, version, sha256=sha256, acceptance=verdict, actor=actor)
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO device_classes(name, created_at) VALUES(?, ?) ON CONFLICT(name) DO NOTHING",
                (device_class, now),
            )
            row = db.execute(
                "SELECT sha256 FROM releases WHERE device_class = ? AND version = ?", (device_class, version)
            ).fetchone()
            if row is not None:
                if row["sha256"] != sha256:
                    raise Conflict(
                        f"{device_class} {version} is already published with different content "
                        f"(sha256 {row['sha256'][:12]}...); publish a new version instead"
                    )
                already = True
            else:
                seq = self._next_seq(db)
                db.execute(
                    "INSERT INTO releases(device_class, version, sha256, size, manifest_json, published_at,"
                    " published_seq) VALUES(?, ?, ?, ?, ?, ?, ?)",
                    (device_class, version, sha256, size, json.dumps(manifest, sort_keys=True), now, seq),
                )
                already = False
            if channel == "stable":
                self._promote(db, device_class, version, now)
        return self.get_release(device_class, version), already

    def _promote(self, db: sqlite3.Connection, device_class: str, version: str, now: float) -> None:
        seq = self._next_seq(db)
        db.execute(
            "UPDATE releases SET promoted_at = ?, promoted_seq = ? WHERE device_class = ? AND version = ?",
            (now, seq, device_class, version),
        )

    @staticmethod
    def check_promotable(manifest: dict, what: str) -> str:
        """The acceptance verdict of a release that may go to stable; :class:`GateRefused` otherwise."""
        ok, verdict = acceptance_verdict(manifest)
        if not ok:
            raise GateRefused(f"{what} refused: {verdict}. Only a release with a passing acceptance record "
                              "goes to stable; to override, promote it with --force --reason TEXT (audited)")
        return verdict

    def gate(self, manifest: dict, what: str, device_class: str, version: str, *, sha256: str = "",
             actor: str = "") -> str:
        """:meth:`check_promotable`, with a refusal appended to the audit log (best effort: the
        refusal stands whether or not it could be recorded)."""
        try:
            return self.check_promotable(manifest, what)
        except GateRefused:
            try:
                self.audit.append("promote-refused", device_class, version, sha256=sha256,
                                  acceptance=acceptance_verdict(manifest)[1], actor=actor)
            except OSError:
                pass
            raise

    def _audit(self, event: str, device_class: str, version: str, **fields: str) -> AuditEvent:
        try:
            return self.audit.append(event, device_class, version, **fields)
        except OSError as e:
            raise AuditUnavailable(f"audit log {self.audit.path}: cannot be written ({e.strerror or e}); "
                                   "nothing was promoted") from None

    def promote(self, device_class: str, version: str, *, force: bool = False, reason: str = "",
                actor: str = "") -> tuple[ReleaseRecord, AuditEvent]:
        """Make a published release the current stable one (again, for a fleet rollback).

        Gated: the release's signed acceptance record must pass, or ``force`` with a ``reason``
        overrides the gate. The audit event is written (durably) before the database changes and
        returned; a refusal is audited too and raises :class:`GateRefused`.
        """
        reason = (reason or "").strip()
        if force and not reason:
            raise Invalid("--force needs --reason TEXT: an override of the acceptance gate must say why (it is audited)")
        if len(reason) > MAX_REASON_CHARS:
            raise Invalid(f"--reason: {len(reason)} characters, at most {MAX_REASON_CHARS}")
        rec = self.get_release(device_class, version)  # NotFound
        ok, verdict = acceptance_verdict(rec.manifest)
        if not ok and not force:
            self.gate(rec.manifest, f"promoting {device_class} {version} to stable", device_class, version,
                      sha256=rec.sha256, actor=actor)
        event = self._audit("promote" if ok else "promote-forced", device_class, version, sha256=rec.sha256,
                            reason=reason, acceptance=verdict, actor=actor)
        with self._tx() as db:
            self._require_class(db, device_class)
            row = db.execute(
                "SELECT 1 FROM releases WHERE device_class = ? AND version = ?", (device_class, version)
            ).fetchone()
            if row is None:
                raise NotFound(f"{device_class} has no release {version!r}")
            self._promote(db, device_class, version, time.time())
        return self.get_release(device_class, version), event

    def _require_class(self, db: sqlite3.Connection, device_class: str) -> None:
        if db.execute("SELECT 1 FROM device_classes WHERE name = ?", (device_class,)).fetchone() is None:
            raise NotFound(f"unknown device class {device_class!r}")

    def list_releases(self, device_class: str, channel: str) -> list[ReleaseRecord]:
        """Releases on ``channel``, newest first; the first is marked ``current``.

        ``canary`` holds every published release (newest publication first), ``stable`` the
        promoted ones (most recently promoted first).
        """
        if channel not in CHANNELS:
            raise Invalid(f"channel {channel!r}: expected one of {CHANNELS}")
        with self._lock:
            self._require_class(self._db, device_class)
            if channel == "canary":
                sql = "SELECT * FROM releases WHERE device_class = ? ORDER BY published_seq DESC"
            else:
                sql = (
                    "SELECT * FROM releases WHERE device_class = ? AND promoted_seq IS NOT NULL"
                    " ORDER BY promoted_seq DESC"
                )
            rows = self._db.execute(sql, (device_class,)).fetchall()
        return [_release(r, current=(i == 0)) for i, r in enumerate(rows)]

    def get_release(self, device_class: str, version: str) -> ReleaseRecord:
        with self._lock:
            self._require_class(self._db, device_class)
            row = self._db.execute(
                "SELECT * FROM releases WHERE device_class = ? AND version = ?", (device_class, version)
            ).fetchone()
        if row is None:
            raise NotFound(f"{device_class} has no release {version!r}")
        return _release(row)

    # ------------------------------------------------------------------ devices
    def add_device(self, device_id: str, device_class: str, token_sha256: str) -> DeviceRecord:
        check_name("device id", device_id)
        check_name("device class", device_class)
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)).fetchone():
                raise Conflict(f"device {device_id!r} is already enrolled (remove it first to re-enrol)")
            db.execute(
                "INSERT INTO device_classes(name, created_at) VALUES(?, ?) ON CONFLICT(name) DO NOTHING",
                (device_class, now),
            )
            db.execute(
                "INSERT INTO devices(device_id, device_class, token_sha256, enrolled_at) VALUES(?, ?, ?, ?)",
                (device_id, device_class, token_sha256, now),
            )
        return self.get_device(device_id)

    def remove_device(self, device_id: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,)).rowcount == 0:
                raise NotFound(f"no device {device_id!r}")

    def device_token_hash(self, device_id: str) -> tuple[str, str] | None:
        """(token_sha256, device_class) of an enrolled device, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT token_sha256, device_class FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        return (row[0], row[1]) if row else None

    def get_device(self, device_id: str) -> DeviceRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        if row is None:
            raise NotFound(f"no device {device_id!r}")
        return _device(row)

    def list_devices(self, device_class: str = "") -> list[DeviceRecord]:
        with self._lock:
            if device_class:
                self._require_class(self._db, device_class)
                rows = self._db.execute(
                    "SELECT * FROM devices WHERE device_class = ? ORDER BY device_id", (device_class,)
                ).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM devices ORDER BY device_class, device_id").fetchall()
        return [_device(r) for r in rows]

    def report_status(self, device_id: str, running_version: str, health: str, message: str, channel: str) -> float:
        """Record a device's report; returns the server time stored as ``last_seen``."""
        if health not in HEALTH:
            raise Invalid(f"health {health!r}: expected one of {HEALTH}")
        if running_version:
            check_version(running_version)
        if channel and channel not in CHANNELS:
            raise Invalid(f"channel {channel!r}: expected one of {CHANNELS}")
        now = time.time()
        with self._tx() as db:
            n = db.execute(
                "UPDATE devices SET running_version = ?, health = ?, message = ?, channel = ?, last_seen = ?"
                " WHERE device_id = ?",
                (running_version, health, message[:1000], channel, now, device_id),
            ).rowcount
            if n == 0:
                raise NotFound(f"no device {device_id!r}")
        return now

    def iter_blob(self, sha256: str, offset: int, chunk_size: int) -> Iterator[bytes]:
        """Chunks of a blob from ``offset`` (the caller checks the offset against the size)."""
        with self.open_blob(sha256) as f:
            f.seek(offset)
            while block := f.read(chunk_size):
                yield block


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception) under the store's lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.lock.release()


def _release(row: sqlite3.Row, current: bool = False) -> ReleaseRecord:
    return ReleaseRecord(
        device_class=row["device_class"],
        version=row["version"],
        sha256=row["sha256"],
        size=int(row["size"]),
        manifest_json=row["manifest_json"],
        published_at=float(row["published_at"]),
        promoted_at=None if row["promoted_at"] is None else float(row["promoted_at"]),
        current=current,
    )


def _device(row: sqlite3.Row) -> DeviceRecord:
    return DeviceRecord(
        device_id=row["device_id"],
        device_class=row["device_class"],
        enrolled_at=float(row["enrolled_at"]),
        running_version=row["running_version"],
        health=row["health"],
        message=row["message"],
        channel=row["channel"],
        last_seen=None if row["last_seen"] is None else float(row["last_seen"]),
    )
