"""The registry's gRPC service (see ``proto/registry.proto`` for the API and its status codes).

:class:`RegistryServer` wires a :class:`~server.registry.store.RegistryStore` to a grpc server::

    cfg = RegistryConfig(db=Path("reg/registry.db"), blobs=Path("reg/blobs"),
                         trusted_keys=[Path("release.pub")], admin_token=token,
                         tls_cert=Path("tls/server.crt"), tls_key=Path("tls/server.key"))
    with RegistryServer(cfg) as server:      # binds, starts; stops on exit
        print(server.address)                 # "127.0.0.1:<port>"
        server.wait()

Every request is checked before it changes anything: the caller's token first (admin-only methods
refuse device tokens, devices only see their own class), then the request's fields, then (for
Publish) the upload's size, its archive layout and the bundle signature and hashes against the
trusted publisher keys. Only then is the blob committed and the release row written.

Promotion to ``stable`` is gated by the release's signed acceptance record and audited (see
:mod:`server.registry.store` and :mod:`server.registry.audit`); ``ListAudit`` returns the log.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc

from echocare.bundle import BundleError, load_public_key, safe_extract, verify_bundle
from server.registry import auth
from server.registry.audit import AuditEvent, read_audit
from server.registry.proto import registry_pb2 as pb
from server.registry.proto import registry_pb2_grpc as pb_grpc
from server.registry.store import (
    AuditUnavailable,
    Conflict,
    GateRefused,
    DeviceRecord,
    Invalid,
    NotFound,
    RegistryStore,
    ReleaseRecord,
    StoreError,
    check_name,
    check_version,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
CHANNEL_TO_PB = {"canary": pb.CANARY, "stable": pb.STABLE}
CHANNEL_FROM_PB = {pb.CANARY: "canary", pb.STABLE: "stable"}
HEALTH_TO_PB = {"unknown": pb.HEALTH_UNSPECIFIED, "healthy": pb.HEALTHY, "unhealthy": pb.UNHEALTHY}
HEALTH_FROM_PB = {v: k for k, v in HEALTH_TO_PB.items()}
REQUIRED_MANIFEST_FIELDS = ("name", "version", "task")


@dataclass
class RegistryConfig:
    """Everything ``registry serve`` needs. Sizes in bytes."""

    db: Path
    blobs: Path
    trusted_keys: list[Path]
    admin_token: str
    audit_log: Path | None = None  # append-only JSON lines; default: audit.jsonl beside the database
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (read it back from RegistryServer.port)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_bundle_bytes: int = 512 * MiB
    # Unpacked size limit checked before anything is extracted (a gzip bomb guard).
    max_unpacked_bytes: int = 4 * 1024 * MiB
    chunk_size: int = 1 * MiB  # Download chunk default; requests may ask for less, never more
    # Largest single gRPC message accepted (upload chunks; clients send 1 MiB). Larger ones are
    # refused by grpc itself with RESOURCE_EXHAUSTED before any handler code runs.
    max_message_bytes: int = 4 * MiB
    max_workers: int = 64
    grpc_options: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.admin_token or len(self.admin_token) < 16:
            raise ValueError("the admin token must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        if not self.trusted_keys:
            raise ValueError("at least one trusted publisher public key is required (--trusted-key)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.max_bundle_bytes <= 0:
            raise ValueError("max_bundle_bytes must be positive")


class RegistryServicer(pb_grpc.RegistryServicer):
    """The nine RPCs. Stateless besides the store and the verified configuration."""

    def __init__(self, store: RegistryStore, cfg: RegistryConfig):
        self.store, self.cfg = store, cfg
        self._admin_hash = auth.sha256_hex(cfg.admin_token)
        self._trusted = []
        for p in cfg.trusted_keys:
            try:
                self._trusted.append(load_public_key(Path(p)))
            except BundleError as e:
                raise ValueError(f"trusted publisher key: {e}") from None

    # ------------------------------------------------------------------ auth helpers
    def _caller(self, context: grpc.ServicerContext) -> auth.Caller:
        token = auth.bearer_from_metadata(context.invocation_metadata())
        if token is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
        is_admin = auth.hashes_match(self._admin_hash, token)
        parts = auth.split_device_token(token)
        stored = self.store.device_token_hash(parts[0]) if parts else None
        device_ok = auth.hashes_match(stored[0] if stored else None, parts[1] if parts else token)
        if is_admin:
            return auth.ADMIN
        if device_ok and parts and stored:
            return auth.Caller(is_admin=False, device_id=parts[0], device_class=stored[1])
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token (unknown, revoked or mistyped)")
        raise AssertionError  # unreachable: abort raises

    def _admin(self, context: grpc.ServicerContext) -> auth.Caller:
        caller = self._caller(context)
        if not caller.is_admin:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "this call needs the admin token, not a device token")
        return caller

    def _may_read_class(self, caller: auth.Caller, device_class: str, context: grpc.ServicerContext) -> None:
        if not caller.is_admin and caller.device_class != device_class:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"device {caller.device_id} belongs to class {caller.device_class!r}, not {device_class!r}",
            )

    # ------------------------------------------------------------------ publish
    def Publish(self, request_iterator: Iterator[pb.PublishChunk], context: grpc.ServicerContext) -> pb.PublishReply:
        self._admin(context)
        out, tmp = self.store.new_upload()
        try:
            header, total = None, 0
            with out:
                for chunk in request_iterator:
                    part = chunk.WhichOneof("part")
                    if header is None:
                        if part != "header":
                            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be the header")
                        header = chunk.header
                        if header.total_size > self.cfg.max_bundle_bytes:
                            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._too_big(header.total_size))
                        continue
                    if part != "data":
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only the first message may be a header")
                    total += len(chunk.data)
                    if total > self.cfg.max_bundle_bytes:
                        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._too_big(total))
                    out.write(chunk.data)
            if header is None or total == 0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty upload: send a header, then the tarball")
            if header.total_size and header.total_size != total:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"upload truncated: header says {header.total_size} bytes, received {total}",
                )
            manifest = self._verify_upload(tmp, context)
            device_class = self._target_class(manifest, header.device_class, context)
            channel = "stable" if header.channel == pb.STABLE else "canary"
            version = str(manifest["version"])
            with self._status_on_store_errors(context):
                check_version(version)
                sha256, size = self.store.digest(tmp)
                if channel == "stable":  # gated (and a refusal audited) before any blob is kept
                    self.store.gate(manifest, f"publishing {device_class} {version} straight to stable", device_class,
                                    version, sha256=sha256, actor=_actor(context))
                self.store.check_new_release(device_class, version, sha256)  # before any blob is kept
                self.store.commit_blob(tmp, sha256)
                rec, already = self.store.add_release(device_class, version, sha256, size, manifest, channel=channel,
                                                      actor=_actor(context))
            log.info("published %s %s (%s, %d bytes)%s", device_class, rec.version, sha256[:12], size,
                     " [already present]" if already else "")
            return pb.PublishReply(release=_release_pb(rec), already_present=already)
        finally:
            tmp.unlink(missing_ok=True)

    def _too_big(self, n: int) -> str:
        return f"bundle of {n} bytes exceeds this registry's limit of {self.cfg.max_bundle_bytes} bytes"

    def _verify_upload(self, tar_path: Path, context: grpc.ServicerContext) -> dict:
        """Unpack into a scratch folder (layout + size checks), then signature + hashes; the manifest."""
        scratch = Path(tempfile.mkdtemp(prefix="verify-", dir=self.store.incoming))
        try:
            try:
                bundle_dir = safe_extract(tar_path, scratch, max_bytes=self.cfg.max_unpacked_bytes)
            except BundleError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a bundle tarball: " + _strip(e, tar_path))
            errors: list[str] = []
            for key in self._trusted:
                try:
                    manifest = verify_bundle(bundle_dir, key)
                    break
                except BundleError as e:
                    errors.append(_strip(e, scratch))
            else:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "bundle refused (not signed by a trusted publisher, or modified): " + " | ".join(dict.fromkeys(errors)),
                )
            missing = [k for k in REQUIRED_MANIFEST_FIELDS if not str(manifest.get(k) or "").strip()]
            if missing:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bundle manifest lacks {missing}")
            return manifest
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _target_class(self, manifest: dict, requested: str, context: grpc.ServicerContext) -> str:
        signed = str(manifest.get("device_class") or "")
        if signed and requested and signed != requested:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the bundle is signed for device class {signed!r}, not {requested!r}",
            )
        device_class = signed or requested
        if not device_class:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "no device class: put `device_class` in the bundle manifest or pass it with the upload",
            )
        with self._status_on_store_errors(context):
            check_name("device class", device_class)
        return device_class

    # ------------------------------------------------------------------ releases
    def ListReleases(self, request: pb.ListReleasesRequest, context: grpc.ServicerContext) -> pb.ListReleasesReply:
        caller = self._caller(context)
        self._may_read_class(caller, request.device_class, context)
        channel = CHANNEL_FROM_PB.get(request.channel, "stable")
        with self._status_on_store_errors(context):
            records = self.store.list_releases(request.device_class, channel)
        return pb.ListReleasesReply(releases=[_release_pb(r) for r in records])

    def Promote(self, request: pb.PromoteRequest, context: grpc.ServicerContext) -> pb.PromoteReply:
        self._admin(context)
        with self._status_on_store_errors(context):
            rec, event = self.store.promote(request.device_class, request.version, force=request.force,
                                            reason=request.reason, actor=_actor(context))
        if event.event == "promote-forced":
            log.warning("FORCED promotion of %s %s to stable (%s): %s", rec.device_class, rec.version,
                        event.acceptance, event.reason)
        else:
            log.info("promoted %s %s to stable (%s)", rec.device_class, rec.version, event.acceptance)
        return pb.PromoteReply(release=_release_pb(rec, current=True), audit=_audit_pb(event))

    def ListAudit(self, request: pb.ListAuditRequest, context: grpc.ServicerContext) -> pb.ListAuditReply:
        self._admin(context)
        try:
            found = read_audit(self.store.audit.path)
        except OSError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"audit log: cannot be read ({e.strerror or e})")
        events = [e for e in found.events if not request.device_class or e.device_class == request.device_class]
        return pb.ListAuditReply(events=[_audit_pb(e) for e in events], unreadable_lines=found.unreadable_lines)

    def Download(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[pb.DownloadChunk]:
        caller = self._caller(context)
        self._may_read_class(caller, request.device_class, context)
        with self._status_on_store_errors(context):
            rec = self.store.get_release(request.device_class, request.version)
        if request.offset > rec.size:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end ({rec.size} bytes)")
        chunk = min(request.chunk_size or self.cfg.chunk_size, self.cfg.chunk_size)
        pos = request.offset
        if pos == rec.size:  # nothing left: one empty chunk tells the client the size and hash
            yield pb.DownloadChunk(offset=pos, data=b"", total_size=rec.size, sha256=rec.sha256)
            return
        with self._status_on_store_errors(context):
            for block in self.store.iter_blob(rec.sha256, pos, chunk):
                yield pb.DownloadChunk(offset=pos, data=block, total_size=rec.size, sha256=rec.sha256)
                pos += len(block)

    # ------------------------------------------------------------------ devices
    def ReportStatus(self, request: pb.StatusReport, context: grpc.ServicerContext) -> pb.StatusReply:
        caller = self._caller(context)
        if caller.is_admin:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "status reports come from devices (use a device token)")
        with self._status_on_store_errors(context):
            now = self.store.report_status(
                caller.device_id,
                request.running_version,
                HEALTH_FROM_PB.get(request.health, "unknown"),
                request.message,
                CHANNEL_FROM_PB.get(request.channel, ""),
            )
        return pb.StatusReply(server_time=now)

    def ListDevices(self, request: pb.ListDevicesRequest, context: grpc.ServicerContext) -> pb.ListDevicesReply:
        self._admin(context)
        with self._status_on_store_errors(context):
            records = self.store.list_devices(request.device_class)
        return pb.ListDevicesReply(devices=[_device_pb(d) for d in records])

    def EnrollDevice(self, request: pb.EnrollDeviceRequest, context: grpc.ServicerContext) -> pb.EnrollDeviceReply:
        self._admin(context)
        with self._status_on_store_errors(context):
            check_name("device id", request.device_id)
            check_name("device class", request.device_class)
            token, token_hash = auth.new_device_token(request.device_id)
            rec = self.store.add_device(request.device_id, request.device_class, token_hash)
        log.info("enrolled device %s (%s)", rec.device_id, rec.device_class)
        return pb.EnrollDeviceReply(device=_device_pb(rec), token=token)

    def RemoveDevice(self, request: pb.RemoveDeviceRequest, context: grpc.ServicerContext) -> pb.RemoveDeviceReply:
        self._admin(context)
        with self._status_on_store_errors(context):
            self.store.remove_device(request.device_id)
        log.info("removed device %s", request.device_id)
        return pb.RemoveDeviceReply()

    # ------------------------------------------------------------------ errors
    @contextmanager
    def _status_on_store_errors(self, context: grpc.ServicerContext) -> Iterator[None]:
        try:
            yield
        except NotFound as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except Conflict as e:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except Invalid as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except GateRefused as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except AuditUnavailable as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except StoreError as e:  # pragma: no cover - every StoreError is one of the above
            context.abort(grpc.StatusCode.INTERNAL, str(e))


def _strip(err: Exception, path: Path) -> str:
    """An error message without the server's scratch paths."""
    return str(err).replace(str(path) + "/", "").replace(str(path), "<upload>")


def _actor(context: grpc.ServicerContext) -> str:
    """Who made an admin call, for the audit log (one admin token: its holder, and where from)."""
    return f"admin@{context.peer()}"


def _audit_pb(e: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(at=e.at, event=e.event, device_class=e.device_class, version=e.version, sha256=e.sha256,
                         reason=e.reason, acceptance=e.acceptance, actor=e.actor)


def _release_pb(r: ReleaseRecord, current: bool | None = None) -> pb.Release:
    return pb.Release(
        device_class=r.device_class,
        version=r.version,
        sha256=r.sha256,
        size=r.size,
        manifest_json=r.manifest_json,
        published_at=r.published_at,
        promoted_at=r.promoted_at or 0.0,
        current=r.current if current is None else current,
    )


def _device_pb(d: DeviceRecord) -> pb.Device:
    return pb.Device(
        device_id=d.device_id,
        device_class=d.device_class,
        running_version=d.running_version,
        health=HEALTH_TO_PB.get(d.health, pb.HEALTH_UNSPECIFIED),
        message=d.message,
        last_seen=d.last_seen or 0.0,
        enrolled_at=d.enrolled_at,
        channel=CHANNEL_TO_PB.get(d.channel, pb.CHANNEL_UNSPECIFIED),
    )


class RegistryServer:
    """A running registry: store + servicer + grpc server bound to ``cfg.host:cfg.port``."""

    def __init__(self, cfg: RegistryConfig):
        self.cfg = cfg
        self.store = RegistryStore(cfg.db, cfg.blobs, cfg.audit_log)
        try:
            servicer = RegistryServicer(self.store, cfg)
        except BaseException:
            self.store.close()
            raise
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes + 64 * 1024),
            ("grpc.max_send_message_length", cfg.chunk_size + 64 * 1024),
            ("grpc.so_reuseport", 0),
            *cfg.grpc_options,
        ]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_workers), options=options)
        pb_grpc.add_RegistryServicer_to_server(servicer, self._server)
        host = f"[{cfg.host}]" if ":" in cfg.host and not cfg.host.startswith("[") else cfg.host
        bind = f"{host}:{cfg.port}"
        try:
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                creds = grpc.ssl_server_credentials(
                    [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
                )
                self.port = self._server.add_secure_port(bind, creds)
            else:
                self.port = self._server.add_insecure_port(bind)
        except RuntimeError as e:
            self.store.close()
            raise OSError(f"cannot listen on {bind}: {e}") from None
        if not self.port:
            self.store.close()
            raise OSError(f"cannot listen on {bind} (port in use?)")
        self.address = f"{host}:{self.port}"
        self.tls = cfg.tls_cert is not None
        self._stopped = threading.Event()

    def start(self) -> "RegistryServer":
        self._server.start()
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, close the database."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._server.stop(grace).wait()
        self.store.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> "RegistryServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
