"""device_counter (Python): per-device event counts in Redis, exactly once.

Per event, ``HINCRBY {key_prefix}devcount:{device} {event_type} 1`` (``unknown`` for a missing
device or type), as plugins/device-counter does in Rust. ``HINCRBY`` is not idempotent, so the
increments go through the SDK's exactly-once primitive (the same Lua script as the Rust SDK's):
a replayed batch counts nothing twice. Its bookkeeping lives under ``{key_prefix}once:``.

Config: ``key_prefix`` (default ``pydc:``). Grant: ``redis = { key_prefix = "<key_prefix>",
allow_scripts = true }``.
"""

from dataclasses import dataclass

from fanout_sdk import ACCEPTED, CapabilityError, RedisOnce, RetryLater, Sink


@dataclass
class Config:
    """``[plugins.config]``: parsed before ``init``; an unknown key or a wrong type is refused
    naming it."""
    key_prefix: str = "pydc:"


class DeviceCounter(Sink):
    Config = Config

    def init(self, config, host):
        self.prefix = config.key_prefix
        host.info("device_counter: counting under %sdevcount:*" % self.prefix)

    def write(self, host, batch):
        once = RedisOnce(self.prefix + "once:")
        for e in batch.events:
            key = "%sdevcount:%s" % (self.prefix, e.device or "unknown")
            once.event(e).cmd("HINCRBY", key, e.event_type or "unknown", 1)
        try:
            applied = once.apply(host)
        except CapabilityError as err:
            return RetryLater(err.describe())
        host.counter_add("events_counted", applied.applied())
        host.counter_add("events_skipped", applied.skipped())
        return ACCEPTED
