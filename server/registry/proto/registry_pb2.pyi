from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Channel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANNEL_UNSPECIFIED: _ClassVar[Channel]
    CANARY: _ClassVar[Channel]
    STABLE: _ClassVar[Channel]

class Health(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_UNSPECIFIED: _ClassVar[Health]
    HEALTHY: _ClassVar[Health]
    UNHEALTHY: _ClassVar[Health]
CHANNEL_UNSPECIFIED: Channel
CANARY: Channel
STABLE: Channel
HEALTH_UNSPECIFIED: Health
HEALTHY: Health
UNHEALTHY: Health

class PublishHeader(_message.Message):
    __slots__ = ("device_class", "total_size", "channel")
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    device_class: str
    total_size: int
    channel: Channel
    def __init__(self, device_class: _Optional[str] = ..., total_size: _Optional[int] = ..., channel: _Optional[_Union[Channel, str]] = ...) -> None: ...

class PublishChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PublishHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PublishHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("device_class", "version", "sha256", "size", "manifest_json", "published_at", "promoted_at", "current")
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_AT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    device_class: str
    version: str
    sha256: str
    size: int
    manifest_json: str
    published_at: float
    promoted_at: float
    current: bool
    def __init__(self, device_class: _Optional[str] = ..., version: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., manifest_json: _Optional[str] = ..., published_at: _Optional[float] = ..., promoted_at: _Optional[float] = ..., current: _Optional[bool] = ...) -> None: ...

class PublishReply(_message.Message):
    __slots__ = ("release", "already_present")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    release: Release
    already_present: bool
    def __init__(self, release: _Optional[_Union[Release, _Mapping]] = ..., already_present: _Optional[bool] = ...) -> None: ...

class ListReleasesRequest(_message.Message):
    __slots__ = ("device_class", "channel")
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    device_class: str
    channel: Channel
    def __init__(self, device_class: _Optional[str] = ..., channel: _Optional[_Union[Channel, str]] = ...) -> None: ...

class ListReleasesReply(_message.Message):
    __slots__ = ("releases",)
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    releases: _containers.RepeatedCompositeFieldContainer[Release]
    def __init__(self, releases: _Optional[_Iterable[_Union[Release, _Mapping]]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("device_class", "version", "force", "reason")
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    device_class: str
    version: str
    force: bool
    reason: str
    def __init__(self, device_class: _Optional[str] = ..., version: _Optional[str] = ..., force: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("at", "event", "device_class", "version", "sha256", "reason", "acceptance", "actor")
    AT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    at: float
    event: str
    device_class: str
    version: str
    sha256: str
    reason: str
    acceptance: str
    actor: str
    def __init__(self, at: _Optional[float] = ..., event: _Optional[str] = ..., device_class: _Optional[str] = ..., version: _Optional[str] = ..., sha256: _Optional[str] = ..., reason: _Optional[str] = ..., acceptance: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class PromoteReply(_message.Message):
    __slots__ = ("release", "audit")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    release: Release
    audit: AuditEvent
    def __init__(self, release: _Optional[_Union[Release, _Mapping]] = ..., audit: _Optional[_Union[AuditEvent, _Mapping]] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("device_class",)
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    device_class: str
    def __init__(self, device_class: _Optional[str] = ...) -> None: ...

class ListAuditReply(_message.Message):
    __slots__ = ("events", "unreadable_lines")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    UNREADABLE_LINES_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    unreadable_lines: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., unreadable_lines: _Optional[_Iterable[int]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("device_class", "version", "offset", "chunk_size")
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    device_class: str
    version: str
    offset: int
    chunk_size: int
    def __init__(self, device_class: _Optional[str] = ..., version: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class DownloadChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    sha256: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class StatusReport(_message.Message):
    __slots__ = ("running_version", "health", "message", "channel")
    RUNNING_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    running_version: str
    health: Health
    message: str
    channel: Channel
    def __init__(self, running_version: _Optional[str] = ..., health: _Optional[_Union[Health, str]] = ..., message: _Optional[str] = ..., channel: _Optional[_Union[Channel, str]] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("server_time",)
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    server_time: float
    def __init__(self, server_time: _Optional[float] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("device_id", "device_class", "running_version", "health", "message", "last_seen", "enrolled_at", "channel")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_AT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_class: str
    running_version: str
    health: Health
    message: str
    last_seen: float
    enrolled_at: float
    channel: Channel
    def __init__(self, device_id: _Optional[str] = ..., device_class: _Optional[str] = ..., running_version: _Optional[str] = ..., health: _Optional[_Union[Health, str]] = ..., message: _Optional[str] = ..., last_seen: _Optional[float] = ..., enrolled_at: _Optional[float] = ..., channel: _Optional[_Union[Channel, str]] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("device_class",)
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    device_class: str
    def __init__(self, device_class: _Optional[str] = ...) -> None: ...

class ListDevicesReply(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ...) -> None: ...

class EnrollDeviceRequest(_message.Message):
    __slots__ = ("device_id", "device_class")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_class: str
    def __init__(self, device_id: _Optional[str] = ..., device_class: _Optional[str] = ...) -> None: ...

class EnrollDeviceReply(_message.Message):
    __slots__ = ("device", "token")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    device: Device
    token: str
    def __init__(self, device: _Optional[_Union[Device, _Mapping]] = ..., token: _Optional[str] = ...) -> None: ...

class RemoveDeviceRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class RemoveDeviceReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
