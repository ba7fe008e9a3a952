#!/usr/bin/env python3
"""A plain Python consumer doing the default sinks' work, for scripts/bench to compare with.

What a team would write without the host: a confluent-kafka consumer reading the Debezium
topic in batches of --batch messages (or what arrived within --max-wait-ms), keeping the
inserts, enriching them from the content table (loaded once from PostgreSQL), and per batch:

  * Redis: one redis-py pipeline (no transaction) with, per event with a content id,
    SET content:last:{id} <json> EX 3600, INCR content:count:{id},
    ZINCRBY top:content:bucket:{YYYYMMDDHHMM} 1 {id}, EXPIRE <bucket> 900; then
    ZUNIONSTORE top:content:10m over the last 10 minute buckets and EXPIRE it 120 s;
  * ClickHouse: one INSERT ... FORMAT JSONEachRow over HTTP;
  * the external API: one POST of the batch as a JSON array.

No idempotency markers (no seen-keys, no ClickHouse lookup, no Idempotency-Key): offsets are
stored after a batch is written and committed by librdkafka every second (at least once).

It stops after --events inserts and prints one JSON line on stdout: events, batches, wall
seconds and CPU seconds of the whole process (getrusage: all threads, the Python thread and
librdkafka's) from the first message to the end (and CPU from subscribing, group join
included), and the CPU per thread name from the first message.

Run by scripts/bench (tests/src/bin/bench.rs) with the stack's venv: .stack/venv/bin/python.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from datetime import datetime, timezone

import redis
import requests
from confluent_kafka import Consumer, KafkaError, TopicPartition

CLK_TCK = os.sysconf("SC_CLK_TCK")

DDL = """CREATE TABLE IF NOT EXISTS `{db}`.`{table}` (
    event_id Int64,
    content_id Nullable(Int64),
    user_id Nullable(Int64),
    event_type Nullable(String),
    event_ts DateTime('UTC'),
    duration_ms Nullable(Int32),
    device Nullable(String),
    content_type Nullable(String),
    length_seconds Nullable(Int32),
    engagement_seconds Nullable(Float64),
    engagement_pct Nullable(Float64)
) ENGINE = ReplacingMergeTree() ORDER BY event_id PARTITION BY toYYYYMM(event_ts)"""


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def thread_cpu() -> dict[int, tuple[str, float]]:
    """tid -> (thread name, CPU seconds) of every thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        try:
            # The scheduler's run time in ns: utime+stime move in whole ticks.
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                cpu = int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
        out[int(tid)] = (name, cpu)
    return out


def thread_groups(before: dict, after: dict) -> dict[str, float]:
    groups: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        start = before.get(tid, (name, 0.0))[1]
        groups[name] = groups.get(name, 0.0) + cpu - start
    return {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}


def load_content(pg_url: str) -> dict[int, tuple[str | None, int | None]]:
    if not pg_url:
        return {}
    import psycopg

    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT content_id, content_type, length_seconds FROM content"
        ).fetchall()
    return {int(cid): (ctype, length) for cid, ctype, length in rows}


def engagement_pct(duration_ms: int, length_seconds: int) -> float | None:
    """round(duration_ms / 1000 / length_seconds, 2), half away from zero, as the host."""
    if length_seconds == 0:
        return None
    n, d = abs(duration_ms), abs(10 * length_seconds)
    hundredths = (2 * n + d) // (2 * d)
    if (duration_ms < 0) != (length_seconds < 0):
        hundredths = -hundredths
    return hundredths / 100.0


def event_micros(ts) -> int:
    """Debezium's event_ts: an ISO string (no zone = UTC) or epoch milli/micro/nanoseconds."""
    if isinstance(ts, (int, float)):
        v = int(ts)
        if abs(v) < 10**14:
            return v * 1000
        if abs(v) < 10**17:
            return v
        return v // 1000
    dt = datetime.fromisoformat(ts)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1_000_000)


def enrich(after: dict, content: dict) -> dict:
    cid = after.get("content_id")
    known = content.get(cid) if cid is not None else None
    ctype, length = known if known else (None, None)
    duration = after.get("duration_ms")
    micros = event_micros(after["event_ts"])
    return {
        "event_id": after["id"],
        "content_id": cid,
        "user_id": after.get("user_id"),
        "event_type": after.get("event_type"),
        "event_ts": datetime.fromtimestamp(micros // 1_000_000, timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S"
        ),
        "duration_ms": duration,
        "device": after.get("device"),
        "content_type": ctype,
        "length_seconds": length,
        "engagement_seconds": duration / 1000.0
        if duration is not None and length is not None
        else None,
        "engagement_pct": engagement_pct(duration, length)
        if duration is not None and length is not None
        else None,
        "_micros": micros,
    }


def minute_key(micros: int) -> str:
    return datetime.fromtimestamp(micros // 1_000_000, timezone.utc).strftime("%Y%m%d%H%M")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--events", type=int, required=True, help="stop after this many inserts")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--max-wait-ms", type=int, default=100)
    ap.add_argument("--pg-url", default="", help="content table source (none: all unknown)")
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--key-prefix", default="")
    ap.add_argument("--clickhouse-url", required=True)
    ap.add_argument("--clickhouse-user", default="default")
    ap.add_argument("--clickhouse-password", default="")
    ap.add_argument("--clickhouse-db", required=True)
    ap.add_argument("--clickhouse-table", required=True)
    ap.add_argument("--api-url", required=True, help="POST target, e.g. .../events")
    ap.add_argument("--timeout-s", type=float, default=1800)
    args = ap.parse_args()

    content = load_content(args.pg_url)
    r = redis.Redis.from_url(args.redis_url)
    r.ping()
    http = requests.Session()
    ch_auth = (args.clickhouse_user, args.clickhouse_password)
    ch_url = args.clickhouse_url.rstrip("/") + "/"
    resp = http.post(ch_url, data=DDL.format(db=args.clickhouse_db, table=args.clickhouse_table), auth=ch_auth)
    resp.raise_for_status()
    insert_query = f"INSERT INTO `{args.clickhouse_db}`.`{args.clickhouse_table}` FORMAT JSONEachRow"
    p = args.key_prefix
    top_key = f"{p}top:content:10m"

    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            "auto.commit.interval.ms": 1000,
        }
    )
    ready_cpu = cpu_seconds()
    consumer.subscribe([args.topic])

    done = batches = 0
    first_wall = first_cpu = first_threads = None
    deadline = time.monotonic() + args.timeout_s
    wait_s = args.max_wait_ms / 1000.0
    while done < args.events:
        if time.monotonic() > deadline:
            print(f"timed out after {done} events", file=sys.stderr)
            return 1
        msgs = consumer.consume(num_messages=args.batch, timeout=wait_s)
        if not msgs:
            continue
        if first_wall is None:
            first_wall, first_cpu, first_threads = time.monotonic(), cpu_seconds(), thread_cpu()
        events = []
        for m in msgs:
            if m.error():
                if m.error().code() != KafkaError._PARTITION_EOF:
                    print(f"consume error: {m.error()}", file=sys.stderr)
                continue
            value = m.value()
            if value is None:
                continue
            env = json.loads(value)
            if "payload" in env and "op" not in env:
                env = env["payload"]
            if env.get("op") != "c" or env.get("after") is None:
                continue
            events.append(enrich(env["after"], content))
        if events:
            now = int(time.time())
            rows = []
            pipe = r.pipeline(transaction=False)
            for e in events:
                micros = e.pop("_micros")
                js = json.dumps(e, separators=(",", ":"))
                rows.append(js)
                cid = e["content_id"]
                if cid is None:
                    continue
                bucket = f"{p}top:content:bucket:{minute_key(micros)}"
                pipe.set(f"{p}content:last:{cid}", js, ex=3600)
                pipe.incr(f"{p}content:count:{cid}")
                pipe.zincrby(bucket, 1, cid)
                pipe.expire(bucket, 900)
            window = [
                f"{p}top:content:bucket:{minute_key((now - 60 * back) * 1_000_000)}"
                for back in range(9, -1, -1)
            ]
            pipe.zunionstore(top_key, window)
            pipe.expire(top_key, 120)
            pipe.execute()
            resp = http.post(
                ch_url,
                params={"query": insert_query},
                data="\n".join(rows).encode(),
                auth=ch_auth,
            )
            resp.raise_for_status()
            resp = http.post(
                args.api_url,
                data=("[" + ",".join(rows) + "]").encode(),
                headers={"Content-Type": "application/json"},
            )
            resp.raise_for_status()
            done += len(events)
            batches += 1
        last: dict[tuple[str, int], int] = {}
        for m in msgs:
            if not m.error():
                last[(m.topic(), m.partition())] = m.offset()
        consumer.store_offsets(
            offsets=[TopicPartition(t, part, off + 1) for (t, part), off in last.items()]
        )
    end_wall, end_cpu, end_threads = time.monotonic(), cpu_seconds(), thread_cpu()
    consumer.close()
    print(
        json.dumps(
            {
                "events": done,
                "batches": batches,
                "wall_s": round(end_wall - first_wall, 3),
                "cpu_s": round(end_cpu - first_cpu, 3),
                "cpu_s_from_subscribe": round(end_cpu - ready_cpu, 3),
                "threads": thread_groups(first_threads, end_threads),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
