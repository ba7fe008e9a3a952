#!/usr/bin/env python3
"""Create Kafka topics if they are missing (confluent_kafka AdminClient).

Used by `scripts/stack up` and imported by cdc_producer.py.

CLI: python kafka_topics.py --brokers 127.0.0.1:59092 name:partitions [name:partitions ...]
"""

from __future__ import annotations

import argparse
import sys
import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic


def ensure_topics(brokers: str, topics: dict[str, int], timeout: float = 30.0) -> list[str]:
    """Create every topic in `topics` (name -> partitions) that does not exist yet.

    Returns the names that were created. Existing topics are left alone (their
    partition count is not changed). Retries while the broker is still starting.
    """
    admin = AdminClient({"bootstrap.servers": brokers})
    deadline = time.monotonic() + timeout
    while True:
        try:
            existing = set(admin.list_topics(timeout=5).topics)
            break
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    missing = [NewTopic(name, num_partitions=n, replication_factor=1)
               for name, n in topics.items() if name not in existing]
    created = []
    if missing:
        for name, fut in admin.create_topics(missing, operation_timeout=10).items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    # Wait until the metadata shows every topic (creation is asynchronous).
    while True:
        md = admin.list_topics(timeout=5).topics
        if all(name in md and not md[name].error for name in topics):
            return created
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics not visible after {timeout}s: {sorted(topics)}")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("topics", nargs="+", metavar="NAME:PARTITIONS")
    args = parser.parse_args()
    wanted = {}
    for spec in args.topics:
        name, _, parts = spec.partition(":")
        wanted[name] = int(parts or 1)
    created = ensure_topics(args.brokers, wanted)
    for name in wanted:
        print(f"topic {name}: {'created' if name in created else 'exists'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
