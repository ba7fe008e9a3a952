"""PostgreSQL -> Debezium -> Kafka is real: change events arrive, in Debezium's format.

Set UPDATE_FIXTURES=1 to (re)write tests/fixtures/envelopes/*.json from the
events captured here (one file per case: topic, raw key, raw value).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import psycopg

from conftest import FIXTURES, payload, pg_url_for

INSERT = ("INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device) "
          "VALUES (%s, %s, %s, %s, %s) RETURNING id")


def _by_user(user_id: int):
    """Predicate on a raw Debezium value: after.user_id (or before.user_id) == user_id."""
    def match(m) -> bool:
        p = payload(m["value"])
        if p is None:
            return False
        row = p.get("after") or p.get("before") or {}
        return row.get("user_id") == user_id
    return match


def _save_fixture(case: str, msg: dict) -> None:
    if os.environ.get("UPDATE_FIXTURES") != "1":
        return
    FIXTURES.mkdir(parents=True, exist_ok=True)
    doc = {"case": case, "topic": msg["topic"], "key": msg["key"], "value": msg["value"]}
    (FIXTURES / f"{case}.json").write_text(json.dumps(doc, indent=2) + "\n")


def test_stack_insert_reaches_topic_once(stack_env, topic_reader):
    """An INSERT in the stack's database yields exactly one op=c message on the stack topic."""
    user_id = random.randint(10**12, 10**13)
    # From the topic's end as it is now (a used stack holds everything it ever carried);
    # only messages after it are checked, each once.
    reader = topic_reader("dbserver1.public.engagement_events")
    with psycopg.connect(stack_env["PG_URL"], autocommit=True) as conn:
        started = time.time()
        (event_id,) = conn.execute(INSERT, (1, user_id, "play", 7000, "web")).fetchone()
        committed = time.time()
    matches = reader.wait_for(_by_user(user_id), count=1, timeout=60, settle=2.0)
    assert len(matches) == 1, matches
    p = payload(matches[0]["value"])
    assert p["op"] == "c"
    assert p["before"] is None
    after = p["after"]
    assert after["id"] == event_id
    assert (after["content_id"], after["user_id"], after["event_type"],
            after["duration_ms"], after["device"]) == (1, user_id, "play", 7000, "web")
    assert after["event_ts"].endswith("Z")
    assert p["source"]["table"] == "engagement_events"
    key = json.loads(matches[0]["key"])
    assert (key.get("payload") or key)["id"] == event_id
    # Time from the commit to the producer handing the message to Kafka (its
    # CreateTime), and to this consumer receiving it (includes group join).
    latency = matches[0]["timestamp_ms"] / 1000.0 - committed
    seen = matches[0]["received"] - committed
    print(f"INSERT -> topic: {latency:.3f}s, -> consumer: {seen:.3f}s "
          f"(insert took {committed - started:.3f}s)")
    assert latency < 5, f"INSERT took {latency:.2f}s to reach the topic"


def test_isolated_producer_envelopes(stack_env, scratch_db, cdc_factory, topic_reader):
    """Own producer instance: snapshot, insert, update, delete + tombstone, content insert;
    then restart with --no-schemas and check it resumes from its stored offsets."""
    url = pg_url_for(stack_env["PG_ADMIN_URL"], scratch_db)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(INSERT, (2, 1, "pause", None, "ios"))  # before the snapshot
    cdc = cdc_factory()
    cdc.start()

    # This instance's own topics, from the beginning: the snapshot may precede the readers.
    events = topic_reader(cdc.events_topic, from_beginning=True)
    content = topic_reader(cdc.content_topic, from_beginning=True)

    # Snapshot: the 20 seed rows of content and the one earlier event, as op=r.
    snap = content.read(lambda ms: len(ms) >= 20, timeout=60, settle=0.5)
    assert len(snap) == 20
    assert {payload(m["value"])["op"] for m in snap} == {"r"}
    assert {payload(m["value"])["after"]["content_id"] for m in snap} == set(range(1, 21))

    with psycopg.connect(url, autocommit=True) as conn:
        (eid,) = conn.execute(INSERT, (1, 42, "play", 7000, "web")).fetchone()
        conn.execute("UPDATE engagement_events SET duration_ms = 9000 WHERE id = %s", (eid,))
        conn.execute("DELETE FROM engagement_events WHERE id = %s", (eid,))
        conn.execute("INSERT INTO content VALUES (21, 'podcast', 1234)")

    msgs = events.read(lambda ms: len(ms) >= 5, timeout=60, settle=1.0)
    ops = [payload(m["value"])["op"] if m["value"] is not None else None for m in msgs]
    assert ops == ["r", "c", "u", "d", None], ops
    snap_ev, ins, upd, dele, tomb = msgs
    assert payload(ins["value"])["after"]["duration_ms"] == 7000
    assert payload(upd["value"])["before"]["duration_ms"] == 7000  # REPLICA IDENTITY FULL
    assert payload(upd["value"])["after"]["duration_ms"] == 9000
    assert payload(dele["value"])["after"] is None
    assert tomb["value"] is None and tomb["key"] == dele["key"]
    with_schema = json.loads(ins["value"])
    assert set(with_schema) == {"schema", "payload"}

    new_content = content.read(lambda ms: len(ms) >= 21, timeout=30)[20]
    assert payload(new_content["value"])["op"] == "c"
    assert payload(new_content["value"])["after"] == {
        "content_id": 21, "content_type": "podcast", "length_seconds": 1234}

    for case, m in [("snapshot_read", snap_ev), ("insert_with_schema", ins),
                    ("update", upd), ("delete", dele), ("tombstone", tomb),
                    ("content_insert", new_content), ("content_snapshot", snap[0])]:
        _save_fixture(case, m)

    # Clean stop, then restart on the same slot without the schema wrapper:
    # it must resume from the offsets stored in PostgreSQL (no new snapshot).
    assert cdc.stop(signal.SIGTERM) == 0, cdc.log_tail()
    cdc.start("--no-schemas")
    with psycopg.connect(url, autocommit=True) as conn:
        (eid2,) = conn.execute(INSERT, (5, 43, "finish", 1500, "android")).fetchone()
    msgs = events.read(lambda ms: len(ms) >= 6, timeout=60, settle=2.0)
    assert len(msgs) == 6, [m["value"] for m in msgs[5:]]
    plain = json.loads(msgs[5]["value"])
    assert "schema" not in plain and plain["op"] == "c"
    assert plain["after"]["id"] == eid2 and plain["after"]["user_id"] == 43
    assert json.loads(msgs[5]["key"]) == {"id": eid2}
    _save_fixture("insert_no_schema", msgs[5])
    assert len(content.read(lambda ms: len(ms) >= 21, timeout=5, settle=1.0)) == 21


def test_heartbeat_advances_idle_slot(stack_env, scratch_db, cdc_factory):
    """With the captured tables idle, writes elsewhere must not pin WAL on the slot."""
    url = pg_url_for(stack_env["PG_ADMIN_URL"], scratch_db)
    cdc = cdc_factory()
    cdc.start()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE noise (x int)")
        conn.execute("INSERT INTO noise SELECT generate_series(1, 1000)")
        (lsn,) = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
    with psycopg.connect(stack_env["PG_ADMIN_URL"], autocommit=True) as conn:
        deadline = time.monotonic() + 30
        while True:
            (ok,) = conn.execute(
                "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                "WHERE slot_name = %s", (lsn, cdc.slot)).fetchone()
            if ok:
                break
            assert time.monotonic() < deadline, "slot did not advance past idle-table WAL"
            time.sleep(0.5)


def test_kill9_resumes_without_loss(stack_env, scratch_db, cdc_factory, topic_reader):
    """kill -9 of the producer loses nothing: offsets live in PostgreSQL, the slot keeps WAL."""
    url = pg_url_for(stack_env["PG_ADMIN_URL"], scratch_db)
    cdc = cdc_factory()
    cdc.start("--no-schemas")
    events = topic_reader(cdc.events_topic)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(INSERT, (1, 100, "play", 1000, "web"))
    events.read(lambda ms: len(ms) >= 1, timeout=30)
    time.sleep(1.5)  # let Debezium commit its offset (offset.flush.interval.ms=1000)
    cdc.stop(signal.SIGKILL)
    with psycopg.connect(url, autocommit=True) as conn:  # written while CDC is down
        for uid in (101, 102, 103):
            conn.execute(INSERT, (2, uid, "click", None, "ios"))
    cdc.start("--no-schemas")
    msgs = events.read(lambda ms: {101, 102, 103} <= {
        payload(m["value"])["after"]["user_id"] for m in ms}, timeout=60, settle=1.0)
    users = [payload(m["value"])["after"]["user_id"] for m in msgs]
    # At-least-once: the event before the crash may be repeated, nothing is missing.
    assert sorted(set(users)) == [100, 101, 102, 103], users
    assert users.count(101) == users.count(102) == users.count(103) == 1, users
