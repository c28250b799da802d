"""The registry's append-only audit log: one JSON object per line, never rewritten.

Every promotion to ``stable`` is recorded here, gated or forced, and so is every refused one::

    {"at": 1764466800.1, "event": "promote-forced", "device_class": "cart", "version": "1.4.0",
     "sha256": "ab12...", "reason": "hotfix: ticket 4711", "acceptance": "no acceptance record",
     "actor": "admin@ipv4:10.0.0.7:51122"}

``event`` is ``promote`` (the release's signed acceptance record passed), ``promote-forced`` (it did
not, and an administrator overrode the gate with a reason) or ``promote-refused``.

Durability: each event is appended with ``O_APPEND`` under an exclusive ``flock`` (one writer at a
time, across processes too), flushed and ``fsync``-ed before the caller acts on it, and the folder
is fsync-ed when the file is created. A crash can at worst leave the last line torn: the next
append starts on a fresh line, and :func:`read_audit` reports torn or foreign lines instead of
dropping them silently. Nothing here ever truncates, rewrites or deletes the file.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from echocare.atomic import fsync_dir

EVENTS = ("promote", "promote-forced", "promote-refused")


@dataclass(frozen=True)
class AuditEvent:
    """One line of the audit log."""

    at: float
    event: str
    device_class: str
    version: str
    sha256: str = ""
    reason: str = ""  # the administrator's justification (required for promote-forced)
    acceptance: str = ""  # the acceptance verdict, in words
    actor: str = ""  # who asked (the admin token's holder, and the peer address)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, ensure_ascii=True)


@dataclass(frozen=True)
class AuditRead:
    """What :func:`read_audit` found: the events, and the lines it could not read (1-based numbers)."""

    events: list[AuditEvent]
    unreadable_lines: list[int]


class AuditLog:
    """Appends :class:`AuditEvent` lines to ``path`` (created on first use)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, event: str, device_class: str, version: str, *, sha256: str = "", reason: str = "",
               acceptance: str = "", actor: str = "") -> AuditEvent:
        """Write one event durably; returns it. Raises ``OSError`` when it could not be written
        (callers must then not perform the action it records)."""
        if event not in EVENTS:
            raise ValueError(f"audit event {event!r}: expected one of {EVENTS}")
        rec = AuditEvent(at=time.time(), event=event, device_class=device_class, version=version, sha256=sha256,
                         reason=reason, acceptance=acceptance, actor=actor)
        line = (rec.to_json() + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size and _last_byte(self.path, size) != b"\n":
                    line = b"\n" + line  # a torn last line (crash mid-append) stays torn, on its own line
                _write_all(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)  # releases the flock
            if created:
                fsync_dir(self.path.parent)
        return rec


def read_audit(path: Path) -> AuditRead:
    """Every event in the log, oldest first (an absent log: no events)."""
    events, bad = [], []
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return AuditRead([], [])
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            d = json.loads(raw)
            events.append(AuditEvent(**{k: d[k] for k in AuditEvent.__dataclass_fields__ if k in d}))
        except (ValueError, TypeError):
            bad.append(n)
    return AuditRead(events, bad)


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
