"""A small client for the registry, used by the ``registry`` CLI, the edge agent and the benchmark.

Only ``grpcio`` + ``protobuf`` (no torch): scanners import it through :mod:`edge.device.agent`.

Connections are TLS by default, pinning the CA certificate given as ``ca`` (or trusting the
system's roots when ``ca`` is None); plaintext needs an explicit ``insecure=True`` and should
only ever be used on loopback.

Every failed call raises :class:`RegistryError` with the gRPC status code; its ``retryable``
tells transient failures (registry down, timeouts) from final answers (bad token, not found).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import grpc

from server.registry import auth
from server.registry.proto import registry_pb2 as pb
from server.registry.proto import registry_pb2_grpc as pb_grpc

MiB = 1024 * 1024
CHANNELS = {"canary": pb.CANARY, "stable": pb.STABLE}
HEALTH = {"unknown": pb.HEALTH_UNSPECIFIED, "healthy": pb.HEALTHY, "unhealthy": pb.UNHEALTHY}
HEALTH_NAMES = {v: k for k, v in HEALTH.items()}
CHANNEL_NAMES = {pb.CANARY: "canary", pb.STABLE: "stable", pb.CHANNEL_UNSPECIFIED: ""}
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
     grpc.StatusCode.DATA_LOSS}
)


class RegistryError(Exception):
    """A registry call failed. ``code`` is the grpc.StatusCode, ``details`` the server's reason."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = ""):
        self.code, self.details, self.method = code, details, method
        super().__init__(f"{method + ': ' if method else ''}{code.name}: {details}")

    @property
    def retryable(self) -> bool:
        """True for failures worth retrying later (unreachable, timed out, overloaded)."""
        return self.code in RETRYABLE


@dataclass(frozen=True)
class ConnectionConfig:
    """Where the registry is and how to reach it."""

    address: str  # host:port
    token: str
    ca: Path | None = None  # PEM CA certificate to pin; None: system roots
    insecure: bool = False  # plaintext (loopback tests only)
    server_name: str | None = None  # TLS name to check, when it differs from the host dialled
    timeout_s: float = 30.0  # per unary call
    download_timeout_s: float = 600.0  # per download stream
    # grpc's own reconnect backoff after a failed connection (its default grows to 120 s, which
    # would keep an agent away from a registry that is back long after the agent's own backoff).
    max_reconnect_backoff_s: float = 10.0


def open_channel(cfg: ConnectionConfig) -> grpc.Channel:
    """A grpc channel: TLS pinned to ``cfg.ca`` unless ``cfg.insecure``."""
    max_backoff_ms = max(100, int(cfg.max_reconnect_backoff_s * 1000))
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", 8 * MiB),
        ("grpc.max_send_message_length", 8 * MiB),
        # Own connection state per channel: by default grpc shares subchannels process-wide, so
        # one channel's connection backoff would make every other client to that address fail fast.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", min(1000, max_backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(1000, max_backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", max_backoff_ms),
    ]
    if cfg.insecure:
        return grpc.insecure_channel(cfg.address, options=options)
    root = None
    if cfg.ca is not None:
        try:
            root = Path(cfg.ca).read_bytes()
        except OSError as e:
            raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, f"{cfg.ca}: cannot read CA certificate ({e})") from None
    if cfg.server_name:
        options.append(("grpc.ssl_target_name_override", cfg.server_name))
    return grpc.secure_channel(cfg.address, grpc.ssl_channel_credentials(root_certificates=root), options=options)


class RegistryClient:
    """Typed wrappers around the nine RPCs. Use as a context manager or call :meth:`close`."""

    def __init__(self, cfg: ConnectionConfig, channel: grpc.Channel | None = None):
        self.cfg = cfg
        self._channel = channel or open_channel(cfg)
        self._stub = pb_grpc.RegistryStub(self._channel)
        self._md = auth.auth_metadata(cfg.token)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: object, timeout: float | None = None) -> object:
        try:
            return getattr(self._stub, method)(request, metadata=self._md, timeout=timeout or self.cfg.timeout_s)
        except grpc.RpcError as e:
            raise _error(e, method) from None

    # ------------------------------------------------------------------ releases
    def publish(
        self,
        tarball: Path,
        device_class: str = "",
        channel: str = "canary",
        chunk_size: int = 1 * MiB,
        on_progress: Callable[[int], None] | None = None,
    ) -> pb.PublishReply:
        """Upload a signed bundle tarball. ``device_class`` only when the manifest has none."""
        tarball = Path(tarball)
        size = tarball.stat().st_size

        def chunks() -> Iterator[pb.PublishChunk]:
            yield pb.PublishChunk(
                header=pb.PublishHeader(device_class=device_class, total_size=size, channel=CHANNELS[channel])
            )
            with open(tarball, "rb") as f:
                while block := f.read(chunk_size):
                    yield pb.PublishChunk(data=block)
                    if on_progress:
                        on_progress(len(block))

        return self._call("Publish", chunks(), timeout=self.cfg.download_timeout_s)  # type: ignore[return-value]

    def list_releases(self, device_class: str, channel: str = "stable") -> list[pb.Release]:
        reply = self._call("ListReleases", pb.ListReleasesRequest(device_class=device_class, channel=CHANNELS[channel]))
        return list(reply.releases)  # type: ignore[attr-defined]

    def current_release(self, device_class: str, channel: str = "stable") -> pb.Release | None:
        """The release devices on ``channel`` should run, or None when the channel is empty."""
        releases = self.list_releases(device_class, channel)
        return releases[0] if releases else None

    def promote(self, device_class: str, version: str, *, force: bool = False, reason: str = "") -> pb.Release:
        """Put a release on stable. Refused (FAILED_PRECONDITION) without a passing acceptance record
        unless ``force`` with a ``reason`` (audited); :meth:`promote_audited` also returns the event."""
        return self.promote_audited(device_class, version, force=force, reason=reason)[0]

    def promote_audited(self, device_class: str, version: str, *, force: bool = False,
                        reason: str = "") -> tuple[pb.Release, pb.AuditEvent]:
        reply = self._call("Promote", pb.PromoteRequest(device_class=device_class, version=version, force=force,
                                                        reason=reason))
        return reply.release, reply.audit  # type: ignore[attr-defined]

    def audit(self, device_class: str = "") -> tuple[list[pb.AuditEvent], list[int]]:
        """The registry's audit log (oldest first) and the line numbers it could not read."""
        reply = self._call("ListAudit", pb.ListAuditRequest(device_class=device_class))
        return list(reply.events), list(reply.unreadable_lines)  # type: ignore[attr-defined]

    def download(
        self,
        device_class: str,
        version: str,
        out: BinaryIO,
        offset: int = 0,
        chunk_size: int = 0,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> tuple[int, str]:
        """Append the release's bytes from ``offset`` to ``out`` (flushed per chunk, so an interrupted
        download keeps what arrived). Returns ``(total_size, sha256)`` as announced by the registry;
        the caller checks the file's hash. Raises :class:`RegistryError` mid-way on disconnects.
        """
        request = pb.DownloadRequest(device_class=device_class, version=version, offset=offset, chunk_size=chunk_size)
        total, digest, pos = 0, "", offset
        try:
            stream = self._stub.Download(request, metadata=self._md, timeout=self.cfg.download_timeout_s)
            for chunk in stream:
                if chunk.offset != pos:
                    raise RegistryError(grpc.StatusCode.DATA_LOSS, f"chunk at {chunk.offset}, expected {pos}", "Download")
                out.write(chunk.data)
                out.flush()
                pos += len(chunk.data)
                total, digest = chunk.total_size, chunk.sha256
                if on_progress:
                    on_progress(pos, total)
        except grpc.RpcError as e:
            raise _error(e, "Download") from None
        return total, digest

    # ------------------------------------------------------------------ devices
    def report_status(self, running_version: str, health: str, message: str = "", channel: str = "") -> float:
        reply = self._call(
            "ReportStatus",
            pb.StatusReport(
                running_version=running_version, health=HEALTH[health], message=message,
                channel=CHANNELS.get(channel, pb.CHANNEL_UNSPECIFIED),
            ),
        )
        return reply.server_time  # type: ignore[attr-defined]

    def list_devices(self, device_class: str = "") -> list[pb.Device]:
        return list(self._call("ListDevices", pb.ListDevicesRequest(device_class=device_class)).devices)  # type: ignore[attr-defined]

    def enroll_device(self, device_id: str, device_class: str) -> tuple[pb.Device, str]:
        """Enrol a device; returns its record and its token (shown only this once)."""
        reply = self._call("EnrollDevice", pb.EnrollDeviceRequest(device_id=device_id, device_class=device_class))
        return reply.device, reply.token  # type: ignore[attr-defined]

    def remove_device(self, device_id: str) -> None:
        self._call("RemoveDevice", pb.RemoveDeviceRequest(device_id=device_id))


def _error(e: grpc.RpcError, method: str) -> RegistryError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return RegistryError(code or grpc.StatusCode.UNKNOWN, details or "", method)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def token_from_env(value: str | None, env: str) -> str:
    """``value`` or the environment variable ``env``; raises ValueError when neither is set."""
    token = value or os.environ.get(env, "")
    if not token:
        raise ValueError(f"no token: pass it or set {env}")
    return token
