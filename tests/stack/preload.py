#!/usr/bin/env python3
"""Make the stack look used: top its events topic up to at least N messages.

scripts/test runs the stack tests a second time after this, so a stack that has
carried hundreds of thousands of events (a demo, a backfill) is covered, not only
a fresh one: tests that observe the stack's long-lived topics must start from
their end, not read their history.

The messages are harmless to a host consuming the topic (e.g. a `scripts/demo`
host on the same stack): Debezium update envelopes (`op: "u"`, which the host
skips and counts), keyed and partitioned like the stack's producer does (JSON
key `{"id": N}`, murmur2), ids far above any real row, header
`fanout.preload: 1`. Only the events topic: the content topic changes
enrichment and is read from the beginning by every host start.

Usage (with the stack's venv python, .stack/env sourced or --brokers):
    tests/stack/preload.py [--at-least 200000] [--with-schema]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

ROOT = Path(__file__).resolve().parents[2]
UPDATE_FIXTURE = ROOT / "tests" / "fixtures" / "envelopes" / "update.json"
ID_BASE = 10**15  # far above the stack's row ids


def topic_size(brokers: str, topic: str) -> int:
    """Messages currently in the topic (sum of high - low watermarks)."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": "fanout-preload-size"})
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        if md.error is not None:
            raise SystemExit(f"preload: topic {topic}: {md.error} (run scripts/stack up)")
        total = 0
        for p in md.partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10,
                                                cached=False)
            total += high - low
        return total
    finally:
        c.close()


def envelopes(prefix: str, with_schema: bool):
    """(key, value) factory for update envelopes shaped like the stack producer's."""
    schema_key = schema_value = None
    if with_schema:
        fixture = json.loads(UPDATE_FIXTURE.read_text())
        old = fixture["topic"].split(".")[0]
        schema_key = json.loads(fixture["key"].replace(old, prefix))["schema"]
        schema_value = json.loads(fixture["value"].replace(old, prefix))["schema"]
    now_ms = int(time.time() * 1000)
    source = {"version": "3.6.3.Final", "connector": "postgresql", "name": prefix,
              "ts_ms": now_ms, "snapshot": "false", "db": "engagement", "sequence": None,
              "ts_us": now_ms * 1000, "ts_ns": now_ms * 1_000_000, "schema": "public",
              "table": "engagement_events", "txId": None, "lsn": None, "xmin": None,
              "origin": None, "origin_lsn": None}
    devices, types = ("web", "ios", "android"), ("play", "pause", "finish", "click")

    def make(i: int) -> tuple[bytes, bytes]:
        row_id = ID_BASE + i
        row = {"id": row_id, "content_id": 1 + i % 20, "user_id": i % 10000,
               "event_type": types[i % 4], "event_ts": "2026-01-01T00:00:00.000000Z",
               "duration_ms": 1000 * (i % 600), "device": devices[i % 3]}
        key: dict = {"id": row_id}
        value: dict = {"before": row, "after": {**row, "device": "tv"}, "source": source,
                       "transaction": None, "op": "u", "ts_ms": now_ms,
                       "ts_us": now_ms * 1000, "ts_ns": now_ms * 1_000_000}
        if with_schema:
            key = {"schema": schema_key, "payload": key}
            value = {"schema": schema_value, "payload": value}
        return (json.dumps(key, separators=(",", ":")).encode(),
                json.dumps(value, separators=(",", ":")).encode())

    return make


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", default=os.environ.get("KAFKA_BROKERS", "127.0.0.1:59092"))
    ap.add_argument("--topic", default="dbserver1.public.engagement_events")
    ap.add_argument("--at-least", type=int, default=200_000,
                    help="produce until the topic holds this many messages (default 200000)")
    ap.add_argument("--with-schema", action="store_true",
                    help="JsonConverter schema/payload wrapper (~4 KB a message instead of ~0.6)")
    args = ap.parse_args()

    before = topic_size(args.brokers, args.topic)
    missing = max(0, args.at_least - before)
    if not missing:
        print(f"preload: {args.topic} already holds {before} messages (>= {args.at_least})")
        return 0
    make = envelopes(args.topic.split(".")[0], args.with_schema)
    producer = Producer({
        "bootstrap.servers": args.brokers,
        "acks": "all",
        "partitioner": "murmur2_random",  # the Java client's key -> partition mapping
        "linger.ms": 50,
        "batch.size": 1_000_000,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 200_000,
        "queue.buffering.max.kbytes": 512 * 1024,
        "message.timeout.ms": 120_000,
    })
    errors: list[str] = []

    def on_delivery(err, _msg) -> None:
        if err is not None and len(errors) < 5:
            errors.append(str(err))

    started = time.monotonic()
    start_id = int(time.time() * 1000) * 1000  # distinct keys on every run
    for i in range(missing):
        key, value = make(start_id + i)
        while True:
            try:
                producer.produce(args.topic, value=value, key=key, on_delivery=on_delivery,
                                 headers=[("fanout.preload", b"1")])
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    took = time.monotonic() - started
    if left or errors:
        print(f"preload: {left} messages not acknowledged, errors: {errors}", file=sys.stderr)
        return 1
    after = topic_size(args.brokers, args.topic)
    print(f"preload: produced {missing} messages to {args.topic} in {took:.1f}s "
          f"({missing / took:.0f}/s); it now holds {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
