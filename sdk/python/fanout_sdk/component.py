"""Exports a :class:`fanout_sdk.Sink` subclass as the component's ``packed-sink`` interface
(world ``fanout:sink/packed-sink-plugin@0.1.3``). The app module of ``componentize-py
componentize`` must hold a class named ``PackedSink``:

    from fanout_sdk.component import export_sink
    PackedSink = export_sink(MySink)
"""

import traceback

from . import config as config_
from .host import WasmHost
from .packed import PackedError, PackedEvents
from .sink import Accepted, Batch, Rejected, RetryLater, SourceRange


def export_sink(sink_class):
    """A ``PackedSink`` class for componentize-py that runs ``sink_class``."""
    from componentize_py_types import Err
    from wit_world import exports
    # Every import module now, while componentize-py pre-initialises the app: a module first
    # imported at run time (inside a call) is not found in the component.
    from wit_world.imports import clickhouse, errors, http, log, metrics, redis, types  # noqa: F401

    state = {}
    host = WasmHost()

    def outcome(o):
        if isinstance(o, Accepted):
            return types.WriteOutcome_Accepted()
        if isinstance(o, RetryLater):
            return types.WriteOutcome_RetryLater(o.reason)
        if isinstance(o, Rejected):
            return types.WriteOutcome_Rejected(
                [types.Rejection(i, r) for i, r in o.rejections])
        return types.WriteOutcome_RetryLater("write returned %r, not an outcome" % (o,))

    class PackedSink(exports.PackedSink):
        def init(self, config):
            try:
                cfg = config_.parse(sink_class.Config, config)
            except config_.ConfigError as e:
                raise Err(str(e))
            try:
                sink = sink_class()
                sink.init(cfg, host)
            except Exception as e:  # a configuration the plugin cannot run with
                raise Err("%s: %s" % (type(e).__name__, e))
            state["sink"] = sink

        def write(self, batch):
            sink = state.get("sink")
            if sink is None:
                return types.WriteOutcome_RetryLater("write before init")
            try:
                events = PackedEvents(batch.events)
            except PackedError as e:
                return types.WriteOutcome_RetryLater(str(e))
            b = Batch(batch.id, events,
                      [SourceRange(s.topic, s.partition, s.first_offset, s.last_offset)
                       for s in batch.sources])
            try:
                return outcome(sink.write(host, b))
            except Exception as e:
                tb = traceback.format_exc(limit=4)
                try:
                    host.error("write raised %s: %s\n%s" % (type(e).__name__, e, tb))
                except Exception:
                    pass
                return types.WriteOutcome_RetryLater("%s: %s" % (type(e).__name__, e))

    PackedSink.__name__ = "PackedSink"
    return PackedSink
