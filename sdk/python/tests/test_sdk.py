"""The Python SDK under plain CPython: the packed reader against Python-packed buffers and a
buffer written by the Rust writer (sdk/tests/python_fixtures.rs keeps the fixtures current),
SPEC-4 JSON against the Rust SDK's text, the exactly-once script and EVAL against the Rust
SDK's, and the device_counter example against a real Redis (FANOUT_TEST_REDIS=host:port)."""

import math
import os
import pathlib
import struct
import subprocess
import sys

import pytest

import fanout_sdk
from fanout_sdk import (ACCEPTED, Batch, MockHost, PackedError, PackedEvents, PackedWriter,
                        Position, RedisOnce, RetryLater, event_json_string)
from fanout_sdk.exactly_once import SCRIPT, key_mask
from fanout_sdk.host import arg_bytes
from fanout_sdk.packed import ROW

FIX = pathlib.Path(__file__).resolve().parent / "fixtures"
SDK = pathlib.Path(__file__).resolve().parents[1]
TOPIC = "dbserver1.public.engagement_events"


def test_row_layout_is_the_documented_one():
    assert ROW.format == "<qqqqddqiiiIIIII" and ROW.size == 88


def test_python_packed_roundtrip():
    w = PackedWriter()
    w.push(16, 1_767_882_112_000_000, content_id=1, user_id=999, event_type="play",
           duration_ms=7000, device="web", content_type="video", length_seconds=300,
           engagement_seconds=7.0, engagement_pct=0.02, position=(TOPIC, 2, 10))
    w.push(17, 5, device="web", event_type="play")
    buf = w.finish()
    assert buf[:4] == b"FPB1"
    assert struct.unpack_from("<III", buf, 4) == (2, 88, 4)  # play, web, video, topic
    ev = PackedEvents(buf)
    assert len(ev) == 2
    a, b = list(ev)
    assert a.fields() == {
        "event_id": 16, "content_id": 1, "user_id": 999, "event_type": "play",
        "event_ts_micros": 1_767_882_112_000_000, "duration_ms": 7000, "device": "web",
        "content_type": "video", "length_seconds": 300, "engagement_seconds": 7.0,
        "engagement_pct": 0.02, "position": (TOPIC, 2, 10)}
    assert a.position() == Position(TOPIC, 2, 10) and a.position().field() == TOPIC + "/2"
    assert b.content_id is None and b.engagement_pct is None and b.position() is None
    assert ev[-1].event_id == 17
    with pytest.raises(IndexError):
        ev[2]


def test_rows_longer_than_version_1_are_stepped_over():
    w = PackedWriter()
    for i in range(3):
        w.push(i, i, device="d%d" % i)
    buf = w.finish()
    count = 3
    rows = buf[16:16 + 88 * count]
    wide = b"".join(rows[i * 88:(i + 1) * 88] + b"\xee" * 8 for i in range(count))
    buf2 = buf[:8] + struct.pack("<I", 96) + buf[12:16] + wide + buf[16 + 88 * count:]
    assert [(e.event_id, e.device) for e in PackedEvents(buf2)] == [(0, "d0"), (1, "d1"), (2, "d2")]


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b[:10], "shorter than its header"),
    (lambda b: b"XPB1" + b[4:], "bad magic"),
    (lambda b: b[:8] + struct.pack("<I", 80) + b[12:], "rows shorter"),
    (lambda b: b[:4] + struct.pack("<I", 99) + b[8:], "rows run past"),
    (lambda b: b[:12] + struct.pack("<I", 99) + b[16:], "string index runs past"),
    (lambda b: b[:16 + 68] + struct.pack("<I", 7) + b[16 + 72:], "does not exist"),
    (lambda b: b[:-1] + b"\xff", "not UTF-8"),
])
def test_invalid_buffers_are_refused(mutate, msg):
    buf = PackedWriter().push(1, 0, device="web", position=(TOPIC, 0, 1)).finish()
    with pytest.raises(PackedError, match=msg):
        PackedEvents(mutate(buf))


def test_a_buffer_written_by_the_rust_writer():
    ev = PackedEvents((FIX / "rust_packed_v1.bin").read_bytes())
    assert len(ev) == 4
    e0, e1, e2, e3 = ev
    assert e0.fields() == {
        "event_id": 16, "content_id": 1, "user_id": 999, "event_type": "play",
        "event_ts_micros": 1_767_882_112_000_000, "duration_ms": 7000, "device": "web",
        "content_type": "video", "length_seconds": 300, "engagement_seconds": 7.0,
        "engagement_pct": 0.02, "position": (TOPIC, 3, 41)}
    assert e1.event_id == 17 and e1.position() == (TOPIC, 3, 42)
    assert all(getattr(e1, f) is None for f in (
        "content_id", "user_id", "event_type", "duration_ms", "device", "content_type",
        "length_seconds", "engagement_seconds", "engagement_pct"))
    assert (e2.event_id, e2.user_id, e2.device, e2.position()) == (
        -5, 2**63 - 1, "télé \"quoted\"\n", None)
    assert (e2.length_seconds, e2.duration_ms, e2.engagement_pct) == (0, -3, 2.57)
    assert e3.position() == (TOPIC, 3, 43)
    # The Python writer writes the same bytes as the Rust writer.
    w = PackedWriter()
    for e in ev:
        f = e.fields()
        w.push(f.pop("event_id"), f.pop("event_ts_micros"), **f)
    assert w.finish() == (FIX / "rust_packed_v1.bin").read_bytes()


def test_event_json_is_the_rust_sdks_text():
    ev = PackedEvents((FIX / "rust_packed_v1.bin").read_bytes())
    want = (FIX / "rust_event_json.txt").read_text(encoding="utf-8").splitlines()
    assert [event_json_string(e) for e in ev] == want


def test_event_json_non_finite_is_null_and_formats():
    w = PackedWriter().push(1, 0, engagement_pct=math.nan, engagement_seconds=math.inf)
    s = event_json_string(PackedEvents(w.finish())[0])
    assert '"engagement_seconds":null,"engagement_pct":null' in s
    assert '"event_ts":"1970-01-01 00:00:00"' in s
    assert fanout_sdk.format_datetime(1_767_882_112_999_999) == "2026-01-08 14:21:52"
    assert fanout_sdk.minute_key(1_767_882_112_000_000) == "202601081421"


def test_once_script_is_the_rust_sdks_byte_for_byte():
    sys.path.insert(0, str(SDK))
    import sync_once_script
    assert SCRIPT == sync_once_script.rust_script()
    assert subprocess.run([sys.executable, str(SDK / "sync_once_script.py"), "--check"]).returncode == 0


def command(*args):
    return [arg_bytes(a) for a in args]


def _once_for(ev):
    once = RedisOnce("pydc:once:")
    for e in ev:
        once.event(e).cmd("HINCRBY", "pydc:devcount:" + (e.device or "unknown"),
                          e.event_type or "unknown", 1)
    return once


def test_eval_command_is_the_rust_sdks():
    ev = PackedEvents((FIX / "rust_packed_v1.bin").read_bytes())
    want = [bytes.fromhex(l) for l in (FIX / "rust_once_eval.hex").read_text().splitlines()]
    assert _once_for(ev).eval_command() == want


def test_key_mask():
    assert key_mask(command("HINCRBY", "k", "f", 1)) == [False, True, False, False]
    assert key_mask(command("DEL", "a", "b")) == [False, True, True]
    assert key_mask(command("MSET", "a", 1, "b", 2)) == [False, True, False, True, False]
    assert key_mask(command("ZUNIONSTORE", "d", 2, "a", "b", "WEIGHTS", 1, 1))[:6] == [
        False, True, False, True, True, False]
    with pytest.raises(fanout_sdk.NotGranted):
        key_mask(command("EVAL", "return 1", 0))


def _redis_handler():
    addr = os.environ.get("FANOUT_TEST_REDIS")
    if not addr:
        if os.environ.get("FANOUT_REQUIRE_STACK"):
            pytest.fail("FANOUT_TEST_REDIS is not set")
        pytest.skip("FANOUT_TEST_REDIS (host:port of a Redis) is not set")
    import redis

    host, port = addr.rsplit(":", 1)
    r = redis.Redis(host=host, port=int(port))

    def handle(cmds, atomic):
        p = r.pipeline(transaction=atomic)
        for c in cmds:
            p.execute_command(*c)
        return p.execute()
    return r, handle


def test_device_counter_counts_each_event_once_on_a_real_redis():
    from device_counter import DeviceCounter

    r, handle = _redis_handler()
    prefix = "pytest-dc-%d-%d:" % (os.getpid(), id(r))
    try:
        host = MockHost(handle)
        sink = DeviceCounter()
        sink.init(fanout_sdk.config.from_value(DeviceCounter.Config, {"key_prefix": prefix}), host)
        w = PackedWriter()
        for i in range(1, 7):
            w.push(i, 0, device=("ios" if i % 2 else None), event_type="play",
                   position=(TOPIC, 0, 100 + i))
        w.push(0, 0, device="ios", event_type="pause")  # backfilled (no position), below the live ids
        batch = Batch("t/0:101-106", w.finish())
        assert sink.write(host, batch) == ACCEPTED
        assert sink.write(host, batch) == ACCEPTED  # the replay
        assert r.hgetall(prefix + "devcount:ios") == {b"play": b"3", b"pause": b"1"}
        assert r.hgetall(prefix + "devcount:unknown") == {b"play": b"3"}
        assert host.counters == {"events_counted": 7, "events_skipped": 7}
        assert r.hget(prefix + "once:marks", TOPIC + "/0") == b"106"
    finally:
        for k in r.scan_iter(match=prefix + "*", count=10000):
            r.delete(k)


def test_a_producer_resend_at_a_new_offset_applies_once_on_a_real_redis():
    # Debezium (at-least-once) re-sent event 7239 after a broker restart at a new offset.
    from fanout_sdk.exactly_once import APPLIED, RESENT

    r, handle = _redis_handler()
    scope = "pytest-resend-%d-%d:" % (os.getpid(), id(r))
    try:
        host = MockHost(handle)
        outcomes = []
        for offset in (1814, 1815):
            once = RedisOnce(scope)
            w = PackedWriter().push(7239, 0, position=(TOPIC, 3, offset)).finish()
            once.event(PackedEvents(w)[0]).cmd("INCR", scope + "n")
            applied = once.apply(host)
            outcomes.append(applied.events)
        assert outcomes == [[(7239, APPLIED)], [(7239, RESENT)]]
        assert applied.skipped() == 1 and applied.applied() == 0
        assert r.get(scope + "n") == b"1"
        assert r.hget(scope + "marks", TOPIC + "/3") == b"1815"
        assert 80_000 < r.ttl(scope + "live:0") <= 24 * 3600
    finally:
        for k in r.scan_iter(match=scope + "*", count=10000):
            r.delete(k)


def test_resent_is_an_outcome_counted_as_skipped():
    from fanout_sdk.exactly_once import RESENT

    once = RedisOnce("s:once:")
    once.event_at(1, ("t", 0, 1))
    once.event_at(1, ("t", 0, 2))
    applied = once.parse_reply(b"ad")
    assert applied.events == [(1, "a"), (1, RESENT)]
    assert (applied.applied(), applied.skipped()) == (1, 1)
    cmd = once.eval_command()
    keys = cmd[3:3 + int(cmd[2])]
    assert keys == [b"s:once:marks", b"s:once:backfilled:0", b"s:once:live:0"]


def test_device_counter_retries_when_redis_fails():
    from device_counter import DeviceCounter

    def fail(cmds, atomic):
        raise fanout_sdk.Failed("connection refused")
    host = MockHost(fail)
    sink = DeviceCounter()
    sink.init(DeviceCounter.Config(), host)
    out = sink.write(host, Batch("b", PackedWriter().push(1, 0).finish()))
    assert out == RetryLater("failed: connection refused")


def test_device_counter_config_errors_name_the_field():
    from device_counter import DeviceCounter

    parse = fanout_sdk.config.parse
    assert parse(DeviceCounter.Config, "").key_prefix == "pydc:"
    assert parse(DeviceCounter.Config, '{"key_prefix": "x:"}').key_prefix == "x:"
    with pytest.raises(fanout_sdk.ConfigError, match=r"^config: unknown field `nope`"):
        parse(DeviceCounter.Config, '{"nope": 1}')
    with pytest.raises(fanout_sdk.ConfigError, match=r"^config: key_prefix: expected str, got int 3"):
        parse(DeviceCounter.Config, '{"key_prefix": 3}')


def test_typed_config_nested_optional_lists_and_missing_fields():
    import dataclasses
    import typing

    @dataclasses.dataclass
    class Inner:
        ttl: int = 60

    @dataclasses.dataclass
    class Cfg:
        url: str
        inner: Inner = dataclasses.field(default_factory=Inner)
        ratio: float = 0.5
        tags: typing.List[str] = dataclasses.field(default_factory=list)
        limit: typing.Optional[int] = None
        on: bool = True

    c = fanout_sdk.config.from_value(Cfg, {"url": "u", "inner": {"ttl": 5}, "ratio": 1,
                                            "tags": ["a"], "limit": None, "on": False})
    assert c == Cfg("u", Inner(5), 1.0, ["a"], None, False)
    bad = [
        ({}, r"^config: missing field `url`"),
        ({"url": "u", "inner": {"ttl": "5"}}, r"^config: inner\.ttl: expected int, got str '5'"),
        ({"url": "u", "inner": {"tll": 5}}, r"^config: inner: unknown field `tll`"),
        ({"url": "u", "tags": ["a", 1]}, r"^config: tags\[1\]: expected str"),
        ({"url": "u", "on": 1}, r"^config: on: expected bool"),
        ({"url": "u", "limit": True}, r"^config: limit: expected int"),
    ]
    for value, msg in bad:
        with pytest.raises(fanout_sdk.ConfigError, match=msg):
            fanout_sdk.config.from_value(Cfg, value)
    assert fanout_sdk.config.parse(fanout_sdk.NoConfig, " ") == fanout_sdk.NoConfig()
    with pytest.raises(fanout_sdk.ConfigError, match="unknown field `a`"):
        fanout_sdk.config.parse(fanout_sdk.NoConfig, '{"a": 1}')
    assert fanout_sdk.config.parse(dict, '{"a": 1}') == {"a": 1}


def test_one_redis_call_style_and_then_commands():
    host = MockHost(lambda cmds, atomic: [len(c) for c in cmds])
    p = host.redis().cmd("INCR", "k").cmd("EXPIRE", "k", 60)
    assert p.send() == [2, 3]
    assert p.send() == [] and len(host.redis_calls) == 1, "sent commands are gone"
    assert host.redis().cmd("GET", "k").atomic().send() == [2]
    assert host.redis_calls[-1] == ([[b"GET", b"k"]], True)
    with pytest.raises(fanout_sdk.Failed, match="0 replies for 1 commands"):
        MockHost(lambda cmds, atomic: []).redis().cmd("GET", "k").send()
    # RedisOnce: the then commands follow the EVAL in the same pipeline.
    w = PackedWriter().push(1, 0, position=(TOPIC, 0, 1)).finish()
    once = RedisOnce("s:once:")
    once.event(PackedEvents(w)[0]).cmd("INCR", "s:n")
    once.then().cmd("EXPIRE", "s:n", 60)
    replies = {}

    def handle(cmds, atomic):
        replies["cmds"] = cmds
        return [b"a", 1]
    applied = once.apply(MockHost(handle))
    assert (applied.applied(), applied.replies) == (1, [1])
    assert replies["cmds"][0][0] == b"EVAL" and replies["cmds"][1] == [b"EXPIRE", b"s:n", b"60"]


def test_mock_host_refuses_metric_names_the_host_drops():
    host = MockHost()
    host.counter_add("rows_inserted", 2)
    for bad in ["Rows", "rows-inserted", "9x", "", "a" * 65]:
        with pytest.raises(ValueError, match="would be refused"):
            host.counter_add(bad)
    for i in range(99):
        host.gauge_set("g%d" % i, 1.0)
    with pytest.raises(ValueError, match="at most 100 names"):
        host.counter_add("one_too_many")
    assert fanout_sdk.valid_metric_name("a" * 64) and not fanout_sdk.valid_metric_name("a" * 65)
