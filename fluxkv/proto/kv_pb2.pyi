from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("found", "value", "mod_revision", "ttl_ms")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    found: bool
    value: bytes
    mod_revision: int
    ttl_ms: int
    def __init__(self, found: _Optional[bool] = ..., value: _Optional[bytes] = ..., mod_revision: _Optional[int] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class SetRequest(_message.Message):
    __slots__ = ("key", "value", "ttl_ms", "expect_revision")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    EXPECT_REVISION_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: bytes
    ttl_ms: int
    expect_revision: int
    def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ..., ttl_ms: _Optional[int] = ..., expect_revision: _Optional[int] = ...) -> None: ...

class SetResponse(_message.Message):
    __slots__ = ("revision", "created")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    revision: int
    created: bool
    def __init__(self, revision: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key", "expect_revision")
    KEY_FIELD_NUMBER: _ClassVar[int]
    EXPECT_REVISION_FIELD_NUMBER: _ClassVar[int]
    key: str
    expect_revision: int
    def __init__(self, key: _Optional[str] = ..., expect_revision: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "revision")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    revision: int
    def __init__(self, deleted: _Optional[bool] = ..., revision: _Optional[int] = ...) -> None: ...

class MultiGetRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class MultiGetResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[GetResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[GetResponse, _Mapping]]] = ...) -> None: ...

class MultiSetRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SetRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[SetRequest, _Mapping]]] = ...) -> None: ...

class SetResult(_message.Message):
    __slots__ = ("applied", "revision", "created")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    revision: int
    created: bool
    def __init__(self, applied: _Optional[bool] = ..., revision: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...

class MultiSetResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SetResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SetResult, _Mapping]]] = ...) -> None: ...

class ScanRequest(_message.Message):
    __slots__ = ("prefix", "cursor", "limit", "include_values")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VALUES_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    cursor: str
    limit: int
    include_values: bool
    def __init__(self, prefix: _Optional[str] = ..., cursor: _Optional[str] = ..., limit: _Optional[int] = ..., include_values: _Optional[bool] = ...) -> None: ...

class KeyValue(_message.Message):
    __slots__ = ("key", "value", "mod_revision", "ttl_ms")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: bytes
    mod_revision: int
    ttl_ms: int
    def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ..., mod_revision: _Optional[int] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class ScanResponse(_message.Message):
    __slots__ = ("items", "cursor")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[KeyValue]
    cursor: str
    def __init__(self, items: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ..., cursor: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardSummary(_message.Message):
    __slots__ = ("shards", "min_keys", "max_keys", "mean_keys")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    MIN_KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_KEYS_FIELD_NUMBER: _ClassVar[int]
    MEAN_KEYS_FIELD_NUMBER: _ClassVar[int]
    shards: int
    min_keys: int
    max_keys: int
    mean_keys: float
    def __init__(self, shards: _Optional[int] = ..., min_keys: _Optional[int] = ..., max_keys: _Optional[int] = ..., mean_keys: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_key_bytes", "max_value_bytes", "max_batch_items", "max_batch_bytes", "max_message_bytes")
    MAX_KEY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_key_bytes: int
    max_value_bytes: int
    max_batch_items: int
    max_batch_bytes: int
    max_message_bytes: int
    def __init__(self, max_key_bytes: _Optional[int] = ..., max_value_bytes: _Optional[int] = ..., max_batch_items: _Optional[int] = ..., max_batch_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class Subsystem(_message.Message):
    __slots__ = ("name", "state", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    detail: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("node_id", "address", "version", "revision", "key_count", "data_bytes", "rss_bytes", "uptime_seconds", "shards", "limits", "subsystems", "cdc", "epoch", "aof")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    KEY_COUNT_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SUBSYSTEMS_FIELD_NUMBER: _ClassVar[int]
    CDC_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    AOF_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    version: str
    revision: int
    key_count: int
    data_bytes: int
    rss_bytes: int
    uptime_seconds: float
    shards: ShardSummary
    limits: Limits
    subsystems: _containers.RepeatedCompositeFieldContainer[Subsystem]
    cdc: CdcStatus
    epoch: str
    aof: AofStatus
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., version: _Optional[str] = ..., revision: _Optional[int] = ..., key_count: _Optional[int] = ..., data_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., shards: _Optional[_Union[ShardSummary, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., subsystems: _Optional[_Iterable[_Union[Subsystem, _Mapping]]] = ..., cdc: _Optional[_Union[CdcStatus, _Mapping]] = ..., epoch: _Optional[str] = ..., aof: _Optional[_Union[AofStatus, _Mapping]] = ...) -> None: ...

class AofStatus(_message.Message):
    __slots__ = ("enabled", "path", "fsync_policy", "state", "size_bytes", "base_size_bytes", "written_revision", "durable_revision", "records_written", "batches_written", "fsyncs", "writes_delayed", "rewrites", "rewrite_in_progress", "last_rewrite_seconds", "cdc_checkpoint_revision", "error")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FSYNC_POLICY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BASE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_REVISION_FIELD_NUMBER: _ClassVar[int]
    DURABLE_REVISION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    BATCHES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    FSYNCS_FIELD_NUMBER: _ClassVar[int]
    WRITES_DELAYED_FIELD_NUMBER: _ClassVar[int]
    REWRITES_FIELD_NUMBER: _ClassVar[int]
    REWRITE_IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LAST_REWRITE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CDC_CHECKPOINT_REVISION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    path: str
    fsync_policy: str
    state: str
    size_bytes: int
    base_size_bytes: int
    written_revision: int
    durable_revision: int
    records_written: int
    batches_written: int
    fsyncs: int
    writes_delayed: int
    rewrites: int
    rewrite_in_progress: bool
    last_rewrite_seconds: float
    cdc_checkpoint_revision: int
    error: str
    def __init__(self, enabled: _Optional[bool] = ..., path: _Optional[str] = ..., fsync_policy: _Optional[str] = ..., state: _Optional[str] = ..., size_bytes: _Optional[int] = ..., base_size_bytes: _Optional[int] = ..., written_revision: _Optional[int] = ..., durable_revision: _Optional[int] = ..., records_written: _Optional[int] = ..., batches_written: _Optional[int] = ..., fsyncs: _Optional[int] = ..., writes_delayed: _Optional[int] = ..., rewrites: _Optional[int] = ..., rewrite_in_progress: _Optional[bool] = ..., last_rewrite_seconds: _Optional[float] = ..., cdc_checkpoint_revision: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class RewriteAofRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RewriteAofResponse(_message.Message):
    __slots__ = ("size_before", "size_after", "seconds")
    SIZE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    SIZE_AFTER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    size_before: int
    size_after: int
    seconds: float
    def __init__(self, size_before: _Optional[int] = ..., size_after: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class CdcStatus(_message.Message):
    __slots__ = ("enabled", "connection", "full_policy", "queued", "published", "confirmed", "republished", "dropped", "queue_depth", "queue_bytes", "writes_delayed", "writes_refused", "confirmed_revision", "spilled")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    FULL_POLICY_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    REPUBLISHED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITES_DELAYED_FIELD_NUMBER: _ClassVar[int]
    WRITES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_REVISION_FIELD_NUMBER: _ClassVar[int]
    SPILLED_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    connection: str
    full_policy: str
    queued: int
    published: int
    confirmed: int
    republished: int
    dropped: int
    queue_depth: int
    queue_bytes: int
    writes_delayed: int
    writes_refused: int
    confirmed_revision: int
    spilled: int
    def __init__(self, enabled: _Optional[bool] = ..., connection: _Optional[str] = ..., full_policy: _Optional[str] = ..., queued: _Optional[int] = ..., published: _Optional[int] = ..., confirmed: _Optional[int] = ..., republished: _Optional[int] = ..., dropped: _Optional[int] = ..., queue_depth: _Optional[int] = ..., queue_bytes: _Optional[int] = ..., writes_delayed: _Optional[int] = ..., writes_refused: _Optional[int] = ..., confirmed_revision: _Optional[int] = ..., spilled: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("prefix", "start_revision")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    start_revision: int
    def __init__(self, prefix: _Optional[str] = ..., start_revision: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("revision", "op", "key", "value", "expires_at_ms", "ts_ms", "shard")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OP_UNSPECIFIED: _ClassVar[Event.Op]
        OP_SET: _ClassVar[Event.Op]
        OP_DELETE: _ClassVar[Event.Op]
        OP_EXPIRE: _ClassVar[Event.Op]
    OP_UNSPECIFIED: Event.Op
    OP_SET: Event.Op
    OP_DELETE: Event.Op
    OP_EXPIRE: Event.Op
    REVISION_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    revision: int
    op: Event.Op
    key: str
    value: bytes
    expires_at_ms: int
    ts_ms: int
    shard: int
    def __init__(self, revision: _Optional[int] = ..., op: _Optional[_Union[Event.Op, str]] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ..., expires_at_ms: _Optional[int] = ..., ts_ms: _Optional[int] = ..., shard: _Optional[int] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...
