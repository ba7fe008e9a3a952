"""fanout_sdk: write fanout sink plugins in Python (componentize-py components of the world
``fanout:sink/packed-sink-plugin@0.1.2``). See docs/plugin-authoring.md, "Python"."""

from .event import event_json_string, event_record, format_datetime, minute_key
from .exactly_once import Applied, RedisOnce
from .host import (CapabilityError, Failed, Host, MockHost, NotGranted, Response, Status,
                   WasmHost, command)
from .packed import Event, PackedError, PackedEvents, PackedWriter, Position
from .sink import ACCEPTED, Accepted, Batch, Rejected, RetryLater, Sink, SourceRange

__all__ = [
    "ACCEPTED", "Accepted", "Applied", "Batch", "CapabilityError", "Event", "Failed", "Host",
    "MockHost", "NotGranted", "PackedError", "PackedEvents", "PackedWriter", "Position",
    "RedisOnce", "Rejected", "Response", "RetryLater", "Sink", "SourceRange", "Status",
    "WasmHost", "command", "event_json_string", "event_record", "format_datetime",
    "minute_key",
]
