"""fanout_sdk: write fanout sink plugins in Python (componentize-py components of the world
``fanout:sink/packed-sink-plugin@0.1.3``). See docs/plugin-authoring.md, "Python"."""

from .config import ConfigError, NoConfig
from .event import event_json_string, event_record, format_datetime, minute_key
from .exactly_once import Applied, RedisOnce
from .host import (CapabilityError, Commands, Failed, Host, MockHost, NotGranted, Pipeline,
                   Response, Status, WasmHost, valid_metric_name)
from .packed import Event, PackedError, PackedEvents, PackedWriter, Position
from .sink import ACCEPTED, Accepted, Batch, Rejected, RetryLater, Sink, SourceRange

__all__ = [
    "ACCEPTED", "Accepted", "Applied", "Batch", "CapabilityError", "Commands", "ConfigError",
    "Event", "Failed", "Host", "MockHost", "NoConfig", "NotGranted", "PackedError",
    "PackedEvents", "PackedWriter", "Pipeline", "Position", "RedisOnce", "Rejected", "Response",
    "RetryLater", "Sink", "SourceRange", "Status", "WasmHost", "event_json_string",
    "event_record", "format_datetime", "minute_key", "valid_metric_name",
]
