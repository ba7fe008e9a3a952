"""Shared fixtures for the stack tests (run with the stack's venv python).

The tests talk to the real services started by `scripts/stack up`; their
addresses come from the environment or, when unset, from `.stack/env`.
Tests that need change events run their own Debezium producer instance on
their own database, slot and topic prefix so they do not disturb (and are not
disturbed by) the stack's own instance or other tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_SQL = ROOT / "scripts" / "sql" / "schema.sql"
SEED_SQL = ROOT / "scripts" / "sql" / "seed.sql"
FIXTURES = ROOT / "tests" / "fixtures" / "envelopes"

ENV_KEYS = ("STACK_DIR", "STACK_PYTHON", "CDC_PRODUCER", "PG_URL", "PG_ADMIN_URL",
            "KAFKA_BROKERS", "REDIS_URL", "CLICKHOUSE_URL", "EXTERNAL_API_URL")


def _load_env() -> dict[str, str]:
    """Stack addresses: environment first, then .stack/env."""
    env: dict[str, str] = {}
    env_file = Path(os.environ.get("STACK_DIR", ROOT / ".stack")) / "env"
    if env_file.exists():
        for line in env_file.read_text().splitlines():
            if line.startswith("export ") and "=" in line:
                key, _, value = line[len("export "):].partition("=")
                env[key] = value
    for key in ENV_KEYS:
        if os.environ.get(key):
            env[key] = os.environ[key]
    missing = [k for k in ENV_KEYS if k not in env]
    if missing:
        pytest.exit(f"stack env incomplete ({missing}): run scripts/stack up", returncode=2)
    return env


@pytest.fixture(scope="session")
def stack_env() -> dict[str, str]:
    return _load_env()


def unique(prefix: str) -> str:
    """A short unique lower-case identifier usable as db/slot/topic name."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def pg_url_for(admin_url: str, database: str) -> str:
    """The admin URL pointing at another database."""
    return admin_url.rsplit("/", 1)[0] + "/" + database


@pytest.fixture
def scratch_db(stack_env) -> Iterator[str]:
    """A fresh database with the project's schema and seed rows; dropped afterwards."""
    name = unique("t")
    with psycopg.connect(stack_env["PG_ADMIN_URL"], autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(pg_url_for(stack_env["PG_ADMIN_URL"], name), autocommit=True) as conn:
        conn.execute(SCHEMA_SQL.read_text())
        conn.execute(SEED_SQL.read_text())
    yield name
    with psycopg.connect(stack_env["PG_ADMIN_URL"], autocommit=True) as conn:
        for (slot,) in conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)):
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class CdcInstance:
    """One running cdc_producer.py process with its own slot and topic prefix."""

    def __init__(self, env: dict[str, str], database: str, prefix: str, slot: str,
                 log_path: Path) -> None:
        self.env, self.database, self.prefix, self.slot = env, database, prefix, slot
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def events_topic(self) -> str:
        return f"{self.prefix}.public.engagement_events"

    @property
    def content_topic(self) -> str:
        return f"{self.prefix}.public.content"

    def start(self, *extra: str, timeout: float = 120) -> None:
        """Start the producer and wait until its replication slot streams."""
        cmd = [self.env["CDC_PRODUCER"], "--pg-url", self.env["PG_ADMIN_URL"],
               "--database", self.database, "--brokers", self.env["KAFKA_BROKERS"],
               "--topic-prefix", self.prefix, "--slot-name", self.slot,
               "--partitions", "1", "--heartbeat-ms", "1000", *extra]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.slot_active():
            if self.proc.poll() is not None:
                raise AssertionError(f"cdc producer exited {self.proc.returncode}: "
                                     f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"cdc producer not streaming after {timeout}s: "
                                     f"{self.log_tail()}")
            time.sleep(0.25)

    def slot_active(self) -> bool:
        with psycopg.connect(self.env["PG_ADMIN_URL"], autocommit=True) as conn:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                               (self.slot,)).fetchone()
        return bool(row and row[0])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        """Stop the process; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"cdc producer ignored signal {sig}: {self.log_tail()}")
        return self.proc.returncode

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


@pytest.fixture
def cdc_factory(stack_env, scratch_db, tmp_path) -> Iterator[Callable[..., CdcInstance]]:
    """Factory of producer instances on the scratch database; cleans up processes and topics."""
    instances: list[CdcInstance] = []

    def make(prefix: str | None = None, slot: str | None = None) -> CdcInstance:
        inst = CdcInstance(stack_env, scratch_db, prefix or unique("tp"),
                           slot or unique("slot"), tmp_path / f"cdc{len(instances)}.log")
        instances.append(inst)
        return inst

    yield make
    for inst in instances:
        if inst.proc is not None and inst.proc.poll() is None:
            inst.proc.kill()
            inst.proc.wait(10)
    # The instances' topics are NOT deleted: tansu 0.6.0 (sqlite engine)
    # deletes every topic of the cluster on a single DeleteTopics request
    # (see docs/stack.md). They are small and live in .stack/kafka/tansu.db.


STACK_TOPIC_PREFIXES = ("dbserver1.", "fanout.")


def is_stack_topic(topic: str) -> bool:
    """The stack's own long-lived topics (they keep everything the stack ever carried)."""
    return topic.startswith(STACK_TOPIC_PREFIXES)


class TopicReader:
    """Reads one topic in batches, from where it ended when the reader was created.

    A long-lived topic (the stack's `dbserver1.*`, which a used stack fills with
    hundreds of thousands of messages) is read from its high watermarks taken in
    the constructor: create the reader *before* the action under test and it
    sees exactly what happened since. `from_beginning=True` is for a test's own
    topic (unique prefix, a few messages, e.g. a snapshot that may precede the
    reader); it is refused on the stack's topics.

    Partitions are assigned explicitly (no group join, nothing committed) and
    read with `consume(num_messages=BATCH)`; predicates run once per batch or,
    with `wait_for`, only on the messages that are new.
    """

    BATCH = 500
    POLL_S = 0.1  # consume() blocks this long when the batch is not full

    def __init__(self, brokers: str, topic: str, *, from_beginning: bool = False,
                 metadata_timeout: float = 30) -> None:
        if from_beginning and is_stack_topic(topic):
            raise ValueError(f"{topic} is a long-lived stack topic: read it from the end")
        self.topic = topic
        self.messages: list[dict[str, Any]] = []
        self.consumer = Consumer({
            "bootstrap.servers": brokers,
            "group.id": unique("g"),  # never joined: partitions are assigned
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,  # what `received` measures, not the broker's long poll
        })
        partitions = self._partitions(metadata_timeout)
        if from_beginning:
            self.start = {p: OFFSET_BEGINNING for p in partitions}
        else:
            self.start = {p: self.consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=10, cached=False)[1] for p in partitions}
        self.consumer.assign([TopicPartition(topic, p, off) for p, off in self.start.items()])

    def _partitions(self, timeout: float) -> list[int]:
        """The topic's partition ids, waiting for a topic that is being created."""
        deadline = time.monotonic() + timeout
        while True:
            md = self.consumer.list_topics(self.topic, timeout=5).topics.get(self.topic)
            if md is not None and md.error is None and md.partitions:
                return sorted(md.partitions)
            if time.monotonic() > deadline:
                raise AssertionError(f"topic {self.topic} not found: {md and md.error}")
            time.sleep(0.2)

    def poll_batch(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """The next batch (possibly empty), also appended to `messages`.

        Each message is {"topic", "partition", "offset", "key", "value",
        "received", "timestamp_ms"} with key/value as the raw decoded strings
        (value None for tombstones).
        """
        batch = self.consumer.consume(num_messages=self.BATCH,
                                      timeout=self.POLL_S if timeout is None else timeout)
        received = time.time()
        new = []
        for msg in batch:
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError(f"consumer error on {self.topic}: {msg.error()}")
            key, value = msg.key(), msg.value()
            new.append({
                "topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
                "key": key.decode() if key is not None else None,
                "value": value.decode() if value is not None else None,
                "received": received,
                "timestamp_ms": msg.timestamp()[1],  # producer CreateTime
            })
        self.messages.extend(new)
        return new

    def read(self, want: Callable[[list[dict[str, Any]]], bool], timeout: float = 30,
             settle: float = 0.0) -> list[dict[str, Any]]:
        """Read until want(messages) is true (then `settle` seconds more).

        `want` sees every message this reader read so far (cumulative across
        calls) and runs once per batch: meant for counts on a test's own
        topic. On a busy topic use `wait_for`. Returns `messages`.
        """
        deadline = time.monotonic() + timeout
        while not want(self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(self._timeout_text())
            self.poll_batch()
        settle_until = time.monotonic() + settle
        while time.monotonic() < settle_until:
            self.poll_batch(min(self.POLL_S, max(0.0, settle_until - time.monotonic())))
        return self.messages

    def wait_for(self, match: Callable[[dict[str, Any]], bool], count: int = 1,
                 timeout: float = 30, settle: float = 0.0) -> list[dict[str, Any]]:
        """Read until `count` messages satisfy `match`, then `settle` seconds more.

        `match` runs once per message, on messages not seen by an earlier call
        (already read messages are checked first). Returns every matching
        message, including any extra ones seen while settling.
        """
        found = [m for m in self.messages if match(m)]
        deadline = time.monotonic() + timeout
        while len(found) < count:
            if time.monotonic() > deadline:
                raise AssertionError(self._timeout_text(f"{len(found)}/{count} matches"))
            found.extend(m for m in self.poll_batch() if match(m))
        settle_until = time.monotonic() + settle
        while time.monotonic() < settle_until:
            found.extend(m for m in self.poll_batch(
                min(self.POLL_S, max(0.0, settle_until - time.monotonic()))) if match(m))
        return found

    def _timeout_text(self, what: str = "") -> str:
        return (f"timeout reading {self.topic} from {self.start}: {what} got "
                f"{len(self.messages)} messages: {[m['value'] for m in self.messages][-5:]}")

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def topic_reader(stack_env) -> Iterator[Callable[..., TopicReader]]:
    """topic_reader(topic) reads from the topic's current end; pass
    from_beginning=True for a test's own topic."""
    readers: list[TopicReader] = []

    def make(topic: str, *, from_beginning: bool = False) -> TopicReader:
        reader = TopicReader(stack_env["KAFKA_BROKERS"], topic, from_beginning=from_beginning)
        readers.append(reader)
        return reader

    yield make
    for r in readers:
        r.close()


def payload(value: str | None) -> dict[str, Any] | None:
    """Debezium value -> the envelope, with or without the schema/payload wrapper."""
    if value is None:
        return None
    doc = json.loads(value)
    if isinstance(doc, dict) and "payload" in doc and "schema" in doc:
        return doc["payload"]
    return doc
