"""Redis, ClickHouse, PostgreSQL, Kafka and the external API mock answer for real."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import psycopg
import redis
from confluent_kafka.admin import AdminClient


def http(method: str, url: str, body=None, headers=None, timeout: float = 10):
    """Minimal HTTP client: returns (status, headers, parsed JSON or text)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        status, hdrs, raw = err.code, err.headers, err.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode()


def test_postgres_schema_and_seed(stack_env):
    with psycopg.connect(stack_env["PG_URL"]) as conn:
        assert conn.execute("SHOW wal_level").fetchone()[0] == "logical"
        assert int(conn.execute("SHOW max_replication_slots").fetchone()[0]) >= 20
        assert int(conn.execute("SHOW max_wal_senders").fetchone()[0]) >= 20
        rows = dict(conn.execute(
            "SELECT content_id, length_seconds FROM content WHERE content_id <= 20").fetchall())
        assert len(rows) == 20
        assert None in rows.values() and 0 in rows.values()
        conn.execute("SELECT id, content_id, user_id, event_type, event_ts, duration_ms, device "
                     "FROM engagement_events LIMIT 1")


def test_kafka_topics_exist(stack_env):
    md = AdminClient({"bootstrap.servers": stack_env["KAFKA_BROKERS"]}).list_topics(timeout=10)
    want = {"dbserver1.public.engagement_events": 4, "dbserver1.public.content": 1,
            "fanout.dead_letter": 1}
    for name, parts in want.items():
        assert name in md.topics, name
        assert len(md.topics[name].partitions) == parts, name


def test_redis(stack_env):
    r = redis.Redis.from_url(stack_env["REDIS_URL"])
    assert r.ping()
    key = f"stacktest:{uuid.uuid4().hex}"
    r.set(key, "v", ex=30)
    assert r.get(key) == b"v"
    r.zadd(key + ":z", {"1": 2, "7": 5})
    assert r.zrevrange(key + ":z", 0, 0) == [b"7"]
    r.delete(key, key + ":z")


def clickhouse(stack_env, sql: str, user: str | None = None, password: str | None = None):
    """Runs `sql` over ClickHouse's HTTP interface (as the admin unless told); returns
    (status, body)."""
    user = user or stack_env.get("CLICKHOUSE_ADMIN_USER", "default")
    if password is None:
        password = stack_env.get("CLICKHOUSE_ADMIN_PASSWORD", "")
    req = urllib.request.Request(stack_env["CLICKHOUSE_URL"] + "/", data=sql.encode(),
                                 headers={"X-ClickHouse-User": user, "X-ClickHouse-Key": password})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_clickhouse(stack_env):
    base = stack_env["CLICKHOUSE_URL"]
    with urllib.request.urlopen(base + "/ping") as resp:
        assert resp.read() == b"Ok.\n"
    assert clickhouse(stack_env, "SELECT version()")[1].startswith("18.16")
    assert "engagement" in clickhouse(stack_env, "SHOW DATABASES")[1].split()
    table = f"engagement.stacktest_{uuid.uuid4().hex[:8]}"
    for sql in (f"CREATE TABLE {table} (id UInt64, pct Nullable(Float64)) "
                f"ENGINE = ReplacingMergeTree ORDER BY id",
                f"INSERT INTO {table} VALUES (1, 0.5), (1, 0.5), (2, NULL)"):
        assert clickhouse(stack_env, sql)[0] == 200, sql
    assert clickhouse(stack_env, f"SELECT count(), uniqExact(id) FROM {table} FINAL")[1].split() \
        == ["2", "2"]
    clickhouse(stack_env, f"DROP TABLE {table}")


def test_clickhouse_users(stack_env):
    """`default` needs its password; the host's user reaches only its databases."""
    if not stack_env.get("CLICKHOUSE_ADMIN_PASSWORD"):
        return  # a stack started before the users existed: nothing to check yet
    assert clickhouse(stack_env, "SELECT 1", password="")[0] != 200
    host = {"user": stack_env["CLICKHOUSE_HOST_USER"],
            "password": stack_env["CLICKHOUSE_HOST_PASSWORD"]}
    assert clickhouse(stack_env, "SELECT 1", **host) == (200, "1\n")
    secret = f"stacksecret_{uuid.uuid4().hex[:8]}"
    clickhouse(stack_env, f"CREATE DATABASE {secret}")
    try:
        clickhouse(stack_env, f"CREATE TABLE {secret}.t (s String) ENGINE = Memory")
        status, body = clickhouse(stack_env, f"SELECT * FROM {secret}.t", **host)
        assert status != 200 and "Access denied" in body, body
    finally:
        clickhouse(stack_env, f"DROP DATABASE IF EXISTS {secret}")


def test_mock_api_records_and_isolates(stack_env):
    base = stack_env["EXTERNAL_API_URL"]
    assert http("GET", base + "/healthz")[0] == 200
    ns, other = f"t{uuid.uuid4().hex[:8]}", f"t{uuid.uuid4().hex[:8]}"
    status, _, body = http("POST", f"{base}/ns/{ns}/events", [{"event_id": 1}],
                           {"Idempotency-Key": "abc-1"})
    assert (status, body) == (200, {"ok": True})
    got = http("GET", f"{base}/ns/{ns}/received")[2]
    assert len(got) == 1
    assert got[0]["idempotency_key"] == "abc-1"
    assert got[0]["headers"]["idempotency-key"] == "abc-1"
    assert got[0]["body"] == [{"event_id": 1}]
    assert got[0]["failed"] is False and got[0]["received_at_ms"] > 0
    assert http("GET", f"{base}/ns/{other}/received")[2] == []
    status, _, text = http("GET", f"{base}/log")
    assert status == 200 and f"ns={ns}" in text
    assert http("POST", f"{base}/ns/{ns}/reset")[0] == 200
    assert http("GET", f"{base}/ns/{ns}/received")[2] == []


def test_mock_api_failures_and_retry_after(stack_env):
    base, ns = stack_env["EXTERNAL_API_URL"], f"t{uuid.uuid4().hex[:8]}"
    http("POST", f"{base}/ns/{ns}/control",
         {"fail_status": 503, "fail_count": 2, "retry_after": 3})
    results = [http("POST", f"{base}/ns/{ns}/events", {"n": i}) for i in range(3)]
    assert [r[0] for r in results] == [503, 503, 200]
    assert results[0][1]["Retry-After"] == "3"
    got = http("GET", f"{base}/ns/{ns}/received")[2]
    assert [g["failed"] for g in got] == [True, True, False]
    assert [g["status"] for g in got] == [503, 503, 200]
    # fail_count null = every request fails until changed
    http("POST", f"{base}/ns/{ns}/control", {"fail_status": 500})
    assert [http("POST", f"{base}/ns/{ns}/events", {})[0] for _ in range(3)] == [500] * 3
    http("POST", f"{base}/ns/{ns}/control", {})
    assert http("POST", f"{base}/ns/{ns}/events", {})[0] == 200
    http("POST", f"{base}/ns/{ns}/reset")


def test_mock_api_delay(stack_env):
    base, ns = stack_env["EXTERNAL_API_URL"], f"t{uuid.uuid4().hex[:8]}"
    http("POST", f"{base}/ns/{ns}/control", {"delay_ms": 700})
    t0 = time.monotonic()
    assert http("POST", f"{base}/ns/{ns}/events", {"slow": True})[0] == 200
    assert time.monotonic() - t0 >= 0.7
    http("POST", f"{base}/ns/{ns}/reset")
    t0 = time.monotonic()
    http("POST", f"{base}/ns/{ns}/events", {"fast": True})
    assert time.monotonic() - t0 < 0.5


def test_kafka_consumer_group_commit_resume(stack_env):
    """The broker keeps committed group offsets: a new consumer resumes after them."""
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import NewTopic

    brokers = stack_env["KAFKA_BROKERS"]
    topic, group = f"stacktest.{uuid.uuid4().hex[:8]}", f"g{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": brokers})
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(10)
    # Not deleted afterwards: DeleteTopics on tansu 0.6.0 drops every topic.
    prod = Producer({"bootstrap.servers": brokers, "acks": "all"})
    for i in range(6):
        prod.produce(topic, key=str(i).encode(), value=f"v{i}".encode())
    assert prod.flush(10) == 0

    def consume(n: int) -> list[bytes]:
        c = Consumer({"bootstrap.servers": brokers, "group.id": group,
                      "auto.offset.reset": "earliest", "enable.auto.commit": False})
        c.subscribe([topic])
        got, deadline = [], time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                got.append(m.value())
                c.commit(message=m, asynchronous=False)
        c.close()
        return got

    first = consume(6)
    assert sorted(first) == [f"v{i}".encode() for i in range(6)]
    prod.produce(topic, key=b"x", value=b"after")
    assert prod.flush(10) == 0
    assert consume(1) == [b"after"]
