"""device_counter (Python): per-device event counts in Redis, exactly once.

Per event, ``HINCRBY {key_prefix}devcount:{device} {event_type} 1`` (``unknown`` for a missing
device or type), as plugins/device-counter does in Rust. ``HINCRBY`` is not idempotent, so the
increments go through the SDK's exactly-once primitive (the same Lua script as the Rust SDK's):
a replayed batch counts nothing twice. Its bookkeeping lives under ``{key_prefix}once:``.

Config: ``key_prefix`` (default ``pydc:``). Grant: ``redis = { key_prefix = "<key_prefix>",
allow_scripts = true }``.
"""

from fanout_sdk import ACCEPTED, CapabilityError, RedisOnce, RetryLater, Sink, command


class DeviceCounter(Sink):
    def init(self, config):
        unknown = set(config) - {"key_prefix"}
        if unknown:
            raise ValueError("unknown config keys: %s" % ", ".join(sorted(unknown)))
        self.prefix = config.get("key_prefix", "pydc:")
        if not isinstance(self.prefix, str):
            raise ValueError("key_prefix must be a string")
        self.host.info("device_counter: counting under %sdevcount:*" % self.prefix)

    def write(self, batch):
        once = RedisOnce(self.prefix + "once:")
        for e in batch.events:
            key = "%sdevcount:%s" % (self.prefix, e.device or "unknown")
            once.event(e, [command("HINCRBY", key, e.event_type or "unknown", 1)])
        try:
            applied = once.apply(self.host)
        except CapabilityError as err:
            return RetryLater(err.describe())
        self.host.counter_add("events_counted", applied.applied())
        self.host.counter_add("events_skipped", applied.skipped())
        return ACCEPTED
