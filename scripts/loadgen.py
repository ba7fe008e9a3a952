#!/usr/bin/env python3
"""Load generator with a fault schedule, end-to-end freshness and a verdict (docs/load-testing.md).

Runs its own pipeline instance on the local stack (own PostgreSQL database, Debezium producer
and topic prefix, host process, Redis key prefix, ClickHouse database, consumer group,
dead-letter topic and API mock), inserts engagement events at a target rate, applies the
faults of a schedule, measures for a sample of events the time from the INSERT's commit to
its effect in each sink, then accounts for every inserted event in every sink and writes a
report (HTML + PNG). Exit code 1 when an event was lost or duplicated in any sink.

Started by scripts/loadgen (which sets up the venv's Python and the stack's environment).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psycopg
import redis as redis_lib

ROOT = Path(__file__).resolve().parent.parent
SINKS = ("redis", "clickhouse", "api")
# The host's plugin names for the three sinks (the [[plugins]] entries written below).
PLUGIN_OF = {"redis": "redis-topn", "clickhouse": "clickhouse", "api": "external-api"}
PROBE_CONTENT_BASE = 10_000_000
EVENT_TYPES = ("play", "pause", "finish", "click")
DEVICES = ("web", "ios", "android")
CONTENT_TYPES = ("video", "podcast", "newsletter")


def log(msg: str) -> None:
    print(f"[loadgen] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ schedule

DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")


def parse_duration(text: str) -> float:
    """'500ms', '30s', '2m', '1h' or a bare number of seconds, in seconds."""
    m = DURATION_RE.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 500ms, 30s, 2m)")
    value, unit = float(m.group(1)), m.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


@dataclass
class Fault:
    at: float
    kind: str  # kill-host | restart | api-slow | api-down
    text: str
    service: str = ""
    delay_ms: int = 0
    duration: float = 0.0
    restart_after: float = 0.0


SERVICES = {"redis": "redis", "clickhouse": "clickhouse", "broker": "kafka", "kafka": "kafka"}


def parse_fault(line: str) -> Optional[Fault]:
    """One schedule line; None for blank lines and comments. Raises ValueError with the line."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    low = " ".join(text.lower().split())
    m = re.match(r"^at (\S+) (.+)$", low)
    if not m:
        raise ValueError(f"schedule: expected 'at <time> <fault>': {line.strip()!r}")
    at, what = parse_duration(m.group(1)), m.group(2)
    if mm := re.match(r"^kill(?: -9)? host(?: and restart)?(?:,? restart after (\S+))?$", what):
        after = parse_duration(mm.group(1)) if mm.group(1) else 0.0
        return Fault(at, "kill-host", text, restart_after=after)
    if mm := re.match(r"^restart (redis|clickhouse|broker|kafka)$", what):
        return Fault(at, "restart", text, service=SERVICES[mm.group(1)])
    if mm := re.match(r"^api slow (\S+) for (\S+)$", what):
        delay = parse_duration(mm.group(1))
        return Fault(at, "api-slow", text, delay_ms=int(delay * 1000), duration=parse_duration(mm.group(2)))
    if mm := re.match(r"^api down (?:for )?(\S+)$", what):
        return Fault(at, "api-down", text, duration=parse_duration(mm.group(1)))
    raise ValueError(
        f"schedule: unknown fault {line.strip()!r} (kill -9 host and restart | restart "
        "redis|clickhouse|broker | api slow 50ms for 60s | api down 30s)"
    )


def parse_schedule(text: str) -> list[Fault]:
    faults = [f for f in (parse_fault(line) for line in text.splitlines()) if f]
    return sorted(faults, key=lambda f: f.at)


# ------------------------------------------------------------------------------ rate profile


@dataclass
class Profile:
    """Target events/s over the run: steady, a linear ramp, or bursts over a base rate."""

    kind: str
    base: float
    peak: float = 0.0
    every: float = 0.0
    burst_for: float = 0.0

    @staticmethod
    def parse(text: str) -> "Profile":
        kind, _, rest = text.partition(":")
        try:
            if kind == "steady":
                return Profile("steady", float(rest))
            if kind == "ramp":
                lo, hi = rest.split("-")
                return Profile("ramp", float(lo), float(hi))
            if kind == "burst":
                base, peak, every, dur = rest.split(",")
                return Profile("burst", float(base), float(peak), parse_duration(every), parse_duration(dur))
        except ValueError as e:
            raise ValueError(f"--profile {text!r}: {e}") from None
        raise ValueError(
            f"--profile {text!r}: expected steady:RATE, ramp:FROM-TO or burst:BASE,PEAK,EVERY,FOR"
        )

    def rate(self, t: float, duration: float) -> float:
        if self.kind == "ramp":
            return self.base + (self.peak - self.base) * min(1.0, t / max(duration, 1e-9))
        if self.kind == "burst":
            return self.peak if (t % self.every) < self.burst_for else self.base
        return self.base

    def describe(self) -> str:
        if self.kind == "ramp":
            return f"ramp {self.base:g} to {self.peak:g} events/s"
        if self.kind == "burst":
            return f"{self.base:g} events/s with bursts of {self.peak:g} for {self.burst_for:g}s every {self.every:g}s"
        return f"steady {self.base:g} events/s"


# ------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: Optional[bytes] = None, auth: Optional[tuple[str, str]] = None,
         timeout: float = 10.0, content_type: str = "application/json") -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", content_type)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


METRIC_RE = re.compile(r'^(\w+)\{plugin="([^"]*)"\}\s+(\S+)$')


def parse_plugin_metrics(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for line in text.splitlines():
        m = METRIC_RE.match(line)
        if m:
            try:
                out[(m.group(1), m.group(2))] = float(m.group(3))
            except ValueError:
                pass
    return out


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], logfile: Path, env: Optional[dict] = None):
        self.name, self.cmd, self.logfile, self.env = name, cmd, logfile, env
        self.popen: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        out = open(self.logfile, "ab")
        self.popen = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=self.env)
        out.close()

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen else -1

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.popen.pid, signal.SIGKILL)
        if self.popen:
            self.popen.wait()

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""


# ------------------------------------------------------------------------------ the run


@dataclass
class Probe:
    event_id: int
    content_id: int
    committed: float  # wall clock, after COMMIT returned
    seen: dict[str, float] = field(default_factory=dict)


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.env = os.environ
        self.run_id = f"lg_{time.strftime('%Y%m%d_%H%M%S', time.gmtime())}_{os.getpid()}"
        self.out = Path(args.out or (Path(self.env["STACK_DIR"]) / "loadgen" / self.run_id))
        self.out.mkdir(parents=True, exist_ok=True)
        self.profile = Profile.parse(args.profile)
        self.faults = parse_schedule(Path(args.schedule).read_text()) if args.schedule else []
        self.faults += [parse_fault(f"at {f}") for f in args.fault]
        self.faults.sort(key=lambda f: f.at)
        self.pg_admin = self.env["PG_ADMIN_URL"]
        self.db_url = self.pg_admin.rsplit("/", 1)[0] + "/" + self.run_id
        self.ch_url = self.env["CLICKHOUSE_URL"].rstrip("/")
        self.ch_auth = (self.env.get("CLICKHOUSE_ADMIN_USER", "default"), self.env["CLICKHOUSE_ADMIN_PASSWORD"])
        self.redis_prefix = f"{self.run_id}:"
        self.api_ns = self.run_id
        self.stop_event = threading.Event()  # end of the load phase
        self.done_event = threading.Event()  # end of everything (watchers stop)
        self.lock = threading.Lock()
        self.probes: dict[int, Probe] = {}
        self.t0 = 0.0
        self.inserted_per_s: dict[int, int] = defaultdict(int)
        self.inserted = 0
        self.published = 0
        self.api_ok: dict[int, str] = {}  # event id -> first idempotency key answered 200
        self.api_dup_ids: set[int] = set()
        self.api_redelivered = 0
        self.api_failed_requests = 0
        self.api_per_s: dict[int, int] = defaultdict(int)
        self.api_next = 0
        self.metric_samples: list[dict[str, Any]] = []
        self.delivered_base: dict[str, float] = {}
        self.delivered_last: dict[str, float] = {}
        self.marks: list[dict[str, Any]] = []  # faults and incidents on the time axis
        self.host: Optional[Proc] = None
        self.cdc: Optional[Proc] = None
        self.mock: Optional[Proc] = None
        self.host_killed_on_purpose = False
        self.errors: list[str] = []

    # -------------------------------------------------------------- setup

    def mark(self, label: str, start: float, end: Optional[float] = None, kind: str = "fault") -> None:
        with self.lock:
            self.marks.append({"label": label, "start": start - self.t0 if self.t0 else 0.0,
                               "end": (end - self.t0) if end and self.t0 else None, "kind": kind})
        log(f"t={start - self.t0:.1f}s {label}" if self.t0 else label)

    def setup(self) -> None:
        log(f"run {self.run_id}; output in {self.out}")
        with psycopg.connect(self.pg_admin, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {self.run_id}")
        with psycopg.connect(self.db_url, autocommit=True) as c:
            c.execute((ROOT / "scripts/sql/schema.sql").read_text())
            c.execute((ROOT / "scripts/sql/seed.sql").read_text())
            # A catalogue to pick from: 21..initial_content, some with NULL or zero length.
            rows = [(cid, random.choice(CONTENT_TYPES), self.random_length())
                    for cid in range(21, self.args.initial_content + 1)]
            with c.cursor() as cur:
                cur.executemany("INSERT INTO content VALUES (%s,%s,%s)", rows)
        self.published = self.args.initial_content
        self.start_cdc()
        self.start_mock()
        self.write_host_config()
        self.start_host()

    @staticmethod
    def random_length() -> Optional[int]:
        r = random.random()
        return None if r < 0.05 else 0 if r < 0.07 else random.randint(5, 3600)

    def start_cdc(self) -> None:
        if self.cdc is not None:
            self.cdc.stop()
        cmd = [self.env["CDC_PRODUCER"], "--pg-url", self.db_url, "--topic-prefix", self.run_id,
               "--slot-name", f"{self.run_id}_slot", "--brokers", self.env["KAFKA_BROKERS"],
               "--partitions", "4"]
        logfile = self.out / "cdc.log"
        offset = logfile.stat().st_size if logfile.exists() else 0
        self.cdc = Proc("cdc", cmd, logfile)
        deadline = time.time() + 180
        while time.time() < deadline:
            if "Processing messages" in self.cdc.log_text()[offset:]:
                return
            if not self.cdc.alive():
                raise RuntimeError(f"the CDC producer exited; see {logfile}")
            time.sleep(0.2)
        raise RuntimeError(f"Debezium did not start streaming within 180 s; see {logfile}")

    def start_mock(self) -> None:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.mock = Proc("mock", [sys.executable, str(ROOT / "scripts/mock_api.py"), "--port", str(port)],
                         self.out / "mock_api.log")
        for _ in range(150):
            try:
                if http("GET", f"{self.api_url}/healthz", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        self.api_control({})

    def api_control(self, control: dict[str, Any]) -> None:
        body = json.dumps({**control, "record_bodies": False}).encode()
        status, text = http("POST", f"{self.api_url}/ns/{self.api_ns}/control", body)
        if status != 200:
            raise RuntimeError(f"mock control: {status} {text[:200]!r}")

    def write_host_config(self) -> None:
        dist = ROOT / "plugins/dist"
        for wasm in ("clickhouse", "redis_topn", "external_api"):
            if not (dist / f"{wasm}.wasm").exists():
                raise RuntimeError(f"{dist}/{wasm}.wasm is missing: run scripts/build-plugins")
        self.metrics_addr = f"127.0.0.1:{free_port()}"
        p, a = self.redis_prefix, self.args
        self.host_config = self.out / "host.toml"
        self.host_config.write_text(f"""# Written by scripts/loadgen for run {self.run_id}: config/local.toml on the run's own resources.
[kafka]
brokers = "{self.env['KAFKA_BROKERS']}"
group_id = "{self.run_id}"
events_topic = "{self.run_id}.public.engagement_events"
content_topic = "{self.run_id}.public.content"
dead_letter_topic = "{self.run_id}.dead_letter"
properties = {{ "group.instance.id" = "{self.run_id}-host" }}

[postgres]
url = "{self.db_url}"

[enrich]
missing_content = "deliver"

[batch]
max_events = {a.batch_max_events}
max_wait_ms = {a.batch_max_wait_ms}

[health]
lag_interval_ms = 1000

[services]
redis_url = "{self.env['REDIS_URL']}"
clickhouse_url = "{self.ch_url}"
clickhouse_user = "{self.ch_auth[0]}"
clickhouse_password = "{self.ch_auth[1]}"

[http]
listen = "{self.metrics_addr}"

[[plugins]]
name = "clickhouse"
path = "{dist}/clickhouse.wasm"
failure_policy = "fail-fast"
[plugins.grants]
clickhouse = {{ databases = ["{self.run_id}"] }}
[plugins.config]
database = "{self.run_id}"
table = "events_enriched"

[[plugins]]
name = "redis-topn"
path = "{dist}/redis_topn.wasm"
failure_policy = "fail-fast"
[plugins.grants]
redis = {{ key_prefixes = ["{p}content:", "{p}top:content:", "{p}fanout:once:", "{p}fanout:seen:"], allow_scripts = true }}
[plugins.config]
key_prefix = "{p}"

[[plugins]]
name = "external-api"
path = "{dist}/external_api.wasm"
failure_policy = "best-effort"
max_retries = 2
call_timeout_ms = 60000
[plugins.grants]
http = {{ url_prefixes = ["{self.api_url}/"] }}
[plugins.config]
url = "{self.api_url}/ns/{self.api_ns}/events"
mode = "{a.api_mode}"
policy = "best-effort"
concurrency = 32
max_retries = 3
timeout_ms = 5000
batch_budget_ms = 40000
""")

    def host_binary(self) -> str:
        if self.args.host_bin:
            return self.args.host_bin
        for cand in (ROOT / "target/release/fanout", ROOT / "target/debug/fanout"):
            if cand.exists():
                return str(cand)
        raise RuntimeError("no host binary: cargo build -p fanout --release (or --host-bin)")

    def start_host(self) -> None:
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")}
        self.host = Proc("host", [self.host_binary(), "run", "--config", str(self.host_config)],
                         self.out / "host.log", env)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                http("GET", f"http://{self.metrics_addr}/healthz", timeout=1)
                return
            except OSError:
                pass
            if not self.host.alive():
                raise RuntimeError(f"the host exited at start; see {self.host.logfile}")
            time.sleep(0.2)
        raise RuntimeError(f"the host did not answer on {self.metrics_addr}; see {self.host.logfile}")

    # -------------------------------------------------------------- load

    def event_rows(self, n: int) -> list[tuple]:
        rows = []
        top = self.published
        for _ in range(n):
            if random.random() < self.args.unknown_share:
                # Content not published (yet): the next ids, some of which appear during the run.
                cid = top + random.randint(1, 50)
            else:
                # Zipf-like popularity: P(k) ~ 1/k over the published catalogue.
                cid = max(1, int(top ** random.random()))
            duration = None if random.random() < 0.1 else random.randint(0, 600_000)
            rows.append((cid, random.randint(1, 100_000), random.choice(EVENT_TYPES), duration,
                         random.choice(DEVICES)))
        return rows

    def generator(self) -> None:
        """Inserts at the profile's rate with COPY, in ticks of 50 ms; publishes content."""
        conn = psycopg.connect(self.db_url)
        sent, last_publish, tick, last = 0.0, self.t0, 0.05, self.t0
        while not self.stop_event.is_set():
            now = time.time()
            t = now - self.t0
            if t >= self.args.duration:
                break
            # Target count: the integral of the rate over the time that really passed (a tick
            # on a busy machine takes longer than 50 ms), so ramps and bursts come out exact.
            sent += self.profile.rate(t, self.args.duration) * (now - last)
            last = now
            n = int(sent) - self.inserted
            if n > 0:
                rows = self.event_rows(min(n, 20_000))
                with conn.cursor() as cur:
                    with cur.copy("COPY engagement_events (content_id, user_id, event_type, duration_ms, device) FROM STDIN") as cp:
                        for r in rows:
                            cp.write_row(r)
                    if now - last_publish >= self.args.publish_every:
                        self.published += 1
                        cur.execute("INSERT INTO content VALUES (%s,%s,%s) ON CONFLICT DO NOTHING",
                                    (self.published, random.choice(CONTENT_TYPES), self.random_length()))
                        last_publish = now
                conn.commit()
                self.inserted += len(rows)
                self.inserted_per_s[int(time.time() - self.t0)] += len(rows)
            # Behind by more than a second: the generator (or PostgreSQL) is the limit; say so.
            if self.inserted < int(sent) - max(self.profile.rate(t, self.args.duration), 1) * 1.0:
                self.generator_behind = max(getattr(self, "generator_behind", 0), int(sent) - self.inserted)
            sleep = tick - (time.time() - now)
            if sleep > 0:
                time.sleep(sleep)
        conn.close()

    def prober(self) -> None:
        """Every probe_interval: one event of a fresh content id, committed alone, timed."""
        conn = psycopg.connect(self.db_url)
        k = 0
        while not self.stop_event.is_set():
            if time.time() - self.t0 >= self.args.duration:
                break
            k += 1
            cid = PROBE_CONTENT_BASE + k
            with conn.cursor() as cur:
                cur.execute("INSERT INTO content VALUES (%s,'video',600)", (cid,))
                cur.execute(
                    "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device) "
                    "VALUES (%s, 1, 'play', 60000, 'web') RETURNING id", (cid,))
                eid = cur.fetchone()[0]
            conn.commit()
            committed = time.time()
            with self.lock:
                self.probes[eid] = Probe(eid, cid, committed)
            time.sleep(self.args.probe_interval)
        conn.close()

    def pending(self, sink: str, limit: int = 2000) -> list[Probe]:
        with self.lock:
            return [p for p in self.probes.values() if sink not in p.seen][:limit]

    def watch_redis(self) -> None:
        r = redis_lib.Redis.from_url(self.env["REDIS_URL"], socket_timeout=5)
        while not self.done_event.is_set():
            try:
                todo = self.pending("redis")
                if todo:
                    pipe = r.pipeline(transaction=False)
                    for p in todo:
                        pipe.exists(f"{self.redis_prefix}content:count:{p.content_id}")
                    found = pipe.execute()
                    now = time.time()
                    with self.lock:
                        for p, f in zip(todo, found):
                            if f:
                                p.seen["redis"] = now
            except redis_lib.RedisError:
                pass  # Redis restarting (a fault): try again
            time.sleep(0.1)

    def ch(self, sql: str, timeout: float = 30) -> str:
        status, body = http("POST", f"{self.ch_url}/", sql.encode(), self.ch_auth, timeout, "text/plain")
        if status != 200:
            raise RuntimeError(f"clickhouse {status}: {body[:300]!r}")
        return body.decode()

    def watch_clickhouse(self) -> None:
        while not self.done_event.is_set():
            try:
                todo = self.pending("clickhouse")
                if todo:
                    ids = ",".join(str(p.event_id) for p in todo)
                    text = self.ch(f"SELECT DISTINCT event_id FROM {self.run_id}.events_enriched WHERE event_id IN ({ids}) FORMAT TSV", 10)
                    now = time.time()
                    got = {int(x) for x in text.split()}
                    with self.lock:
                        for p in todo:
                            if p.event_id in got:
                                p.seen["clickhouse"] = now
            except (OSError, RuntimeError):
                pass  # table not created yet, or ClickHouse restarting
            time.sleep(0.2)

    def poll_api(self) -> None:
        status, body = http("GET", f"{self.api_url}/ns/{self.api_ns}/seen?after={self.api_next}", timeout=30)
        if status != 200:
            return
        answer = json.loads(body)
        with self.lock:
            for at_ms, st, key, ids in answer["items"]:
                if st != 200:
                    self.api_failed_requests += 1
                    continue
                self.api_per_s[int(at_ms / 1000 - self.t0)] += len(ids)
                for eid in ids:
                    if eid is None:
                        continue
                    first = self.api_ok.get(eid)
                    if first is None:
                        self.api_ok[eid] = key
                        p = self.probes.get(eid)
                        if p is not None and "api" not in p.seen:
                            p.seen["api"] = at_ms / 1000
                    elif first == key:
                        self.api_redelivered += 1
                    else:
                        self.api_dup_ids.add(eid)
            self.api_next = answer["next"]

    def watch_api(self) -> None:
        while not self.done_event.is_set():
            try:
                self.poll_api()
            except (OSError, ValueError):
                pass
            time.sleep(0.2)

    def watch_metrics(self) -> None:
        """Per-plugin delivered counters and lag from the host's /metrics, every second."""
        while not self.done_event.is_set():
            if not self.t0:
                time.sleep(0.2)
                continue
            try:
                _, body = http("GET", f"http://{self.metrics_addr}/metrics", timeout=2)
                m = parse_plugin_metrics(body.decode())
                sample: dict[str, Any] = {"t": time.time() - self.t0}
                for sink, plugin in PLUGIN_OF.items():
                    d = m.get(("fanout_events_delivered_total", plugin), 0.0)
                    last = self.delivered_last.get(plugin, 0.0)
                    if d < last:  # the host restarted: its counters start again from 0
                        self.delivered_base[plugin] = self.delivered_base.get(plugin, 0.0) + last
                    self.delivered_last[plugin] = d
                    sample[f"delivered:{sink}"] = self.delivered_base.get(plugin, 0.0) + d
                    sample[f"lag_messages:{sink}"] = m.get(("fanout_lane_lag_messages", plugin))
                    sample[f"lag_seconds:{sink}"] = m.get(("fanout_lane_lag_seconds", plugin))
                with self.lock:
                    self.metric_samples.append(sample)
            except OSError:
                pass  # the host is down (a fault)
            time.sleep(1.0)

    # -------------------------------------------------------------- faults

    def run_fault(self, f: Fault) -> None:
        start = time.time()
        if f.kind == "kill-host":
            self.host_killed_on_purpose = True
            pid = self.host.pid
            self.host.kill9()
            if f.restart_after:
                time.sleep(f.restart_after)
            self.start_host()
            self.host_killed_on_purpose = False
            self.mark(f"kill -9 host (pid {pid}), restarted", start, time.time())
        elif f.kind == "restart":
            res = subprocess.run([str(ROOT / "scripts/stack"), "restart", f.service],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                self.errors.append(f"restart {f.service} failed: {res.stderr[-500:]}")
            self.mark(f"restart {f.service}", start, time.time())
        elif f.kind == "api-slow":
            self.api_control({"delay_ms": f.delay_ms})
            threading.Timer(f.duration, self.api_control, args=({},)).start()
            self.mark(f"api slow {f.delay_ms}ms", start, start + f.duration)
        elif f.kind == "api-down":
            self.api_control({"fail_status": 503, "fail_count": None})
            threading.Timer(f.duration, self.api_control, args=({},)).start()
            self.mark("api down (503)", start, start + f.duration)

    def fault_runner(self) -> None:
        for f in self.faults:
            while time.time() - self.t0 < f.at:
                if self.stop_event.wait(0.1):
                    return
            try:
                self.run_fault(f)
            except Exception as e:  # a failed fault is reported, the run goes on
                self.errors.append(f"fault {f.text!r}: {e}")
                log(f"fault {f.text!r} failed: {e}")

    def supervise(self) -> None:
        """Restarts what died without being told to: the run's CDC producer exits when the
        broker goes away (like the stack's), and a host that exits is an incident."""
        while not self.done_event.is_set():
            if self.cdc and not self.cdc.alive():
                now = time.time()
                try:
                    self.start_cdc()
                    self.mark("CDC producer exited, restarted", now, time.time(), "incident")
                except RuntimeError as e:
                    self.errors.append(str(e))
            if self.host and not self.host.alive() and not self.host_killed_on_purpose:
                now = time.time()
                code = self.host.popen.returncode if self.host.popen else None
                self.errors.append(f"host exited by itself (code {code})")
                try:
                    self.start_host()
                except RuntimeError as e:
                    self.errors.append(str(e))
                self.mark(f"host exited (code {code}), restarted", now, time.time(), "incident")
            time.sleep(0.5)

    # -------------------------------------------------------------- progress

    def freshness_now(self, window: float = 10.0) -> dict[str, Optional[float]]:
        cutoff = time.time() - window
        out = {}
        with self.lock:
            for s in SINKS:
                vals = [p.seen[s] - p.committed for p in self.probes.values()
                        if s in p.seen and p.seen[s] >= cutoff]
                out[s] = percentile(vals, 0.99)
        return out

    def progress_line(self, final: bool = False) -> str:
        t = time.time() - self.t0
        d = self.args.duration
        width = 24
        filled = int(width * min(1.0, t / d))
        fresh = self.freshness_now()
        last = self.metric_samples[-1] if self.metric_samples else {}
        fr = " ".join(f"{s}={'-' if fresh[s] is None else f'{fresh[s]:.2f}s'}" for s in SINKS)
        lag = " ".join(f"{s}={int(last.get(f'lag_messages:{s}') or 0)}" for s in SINKS)
        return (f"[{'#' * filled}{'.' * (width - filled)}] {min(t, d):5.0f}/{d:.0f}s "
                f"target {self.profile.rate(min(t, d), d):6.0f}/s inserted {self.inserted:8d} "
                f"| p99 fresh {fr} | lag {lag}")

    # -------------------------------------------------------------- main

    def warm_up(self) -> None:
        """One event through every sink before the clock starts: the host has joined its
        groups and every plugin has created what it writes."""
        self.t0 = time.time()
        conn = psycopg.connect(self.db_url, autocommit=True)
        cid = PROBE_CONTENT_BASE
        conn.execute("INSERT INTO content VALUES (%s,'video',600)", (cid,))
        eid = conn.execute("INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device) "
                           "VALUES (%s, 1, 'play', 60000, 'web') RETURNING id", (cid,)).fetchone()[0]
        conn.close()
        with self.lock:
            self.probes[eid] = Probe(eid, cid, time.time())
        deadline = time.time() + 180
        while time.time() < deadline:
            p = self.probes[eid]
            if all(s in p.seen for s in SINKS):
                log("warm-up event reached every sink: " + ", ".join(
                    f"{s} {p.seen[s] - p.committed:.2f}s" for s in SINKS))
                with self.lock:
                    del self.probes[eid]  # counted in the verdict, not in the time series
                return
            time.sleep(0.2)
        raise RuntimeError(f"the warm-up event did not reach every sink within 180 s: {self.probes[eid].seen}; see {self.host.logfile}")

    def drain(self) -> bool:
        """After the load: waits until every sink has taken everything (no lag, every probe
        seen, ClickHouse and the API hold as many events as were inserted)."""
        deadline = time.time() + self.args.drain_timeout
        expected = self.count_inserted()
        calm = 0
        while time.time() < deadline:
            time.sleep(1.0)
            try:
                ch_rows = int(self.ch(f"SELECT count() FROM {self.run_id}.events_enriched").strip() or 0)
            except (OSError, RuntimeError):
                ch_rows = -1
            last = self.metric_samples[-1] if self.metric_samples else {}
            lag0 = all((last.get(f"lag_messages:{s}") == 0) for s in SINKS)
            # API probes the plugin dead-lettered (best-effort, `api down`) never arrive.
            probes_in = not any(self.pending(s, 1) for s in ("redis", "clickhouse"))
            with self.lock:
                api_n = len(self.api_ok)
            if sys.stderr.isatty():
                print(f"\r[loadgen] draining: clickhouse {ch_rows}/{expected} api {api_n}/{expected} "
                      f"lag {'0' if lag0 else '>0'} probes {'in' if probes_in else 'pending'}   ",
                      end="", file=sys.stderr, flush=True)
            # Lag 0 for 3 samples in a row with every probe and ClickHouse row in: caught up
            # (the API may hold fewer events than inserted for good: its dead letters).
            if lag0 and probes_in and ch_rows >= expected:
                calm += 1
                if calm >= 3:
                    break
            else:
                calm = 0
        if sys.stderr.isatty():
            print(file=sys.stderr)
        return calm >= 3

    def count_inserted(self) -> int:
        with psycopg.connect(self.db_url) as c:
            return c.execute("SELECT count(*) FROM engagement_events").fetchone()[0]

    def run(self) -> int:
        self.setup()
        self.watchers = [threading.Thread(target=fn, daemon=True, name=fn.__name__) for fn in
                         (self.watch_redis, self.watch_clickhouse, self.watch_api, self.watch_metrics, self.supervise)]
        for w in self.watchers:
            w.start()
        self.warm_up()
        log(f"load: {self.profile.describe()} for {self.args.duration:g}s, {len(self.faults)} faults, "
            f"one timed probe every {self.args.probe_interval:g}s")
        self.t0 = time.time()
        self.marks.clear()
        workers = [threading.Thread(target=fn, daemon=True, name=fn.__name__)
                   for fn in (self.generator, self.prober, self.fault_runner)]
        for w in workers:
            w.start()
        tty = sys.stderr.isatty()
        last_line = 0.0
        while workers[0].is_alive():
            time.sleep(0.5)
            if tty:
                print("\r" + self.progress_line(), end="", file=sys.stderr, flush=True)
            elif time.time() - last_line >= 10:
                print(self.progress_line(), file=sys.stderr, flush=True)
                last_line = time.time()
        self.stop_event.set()
        if tty:
            print(file=sys.stderr)
        for w in workers:
            w.join(timeout=600)
        self.load_end = time.time() - self.t0
        log(f"load done: {self.inserted} events inserted; draining (up to {self.args.drain_timeout:g}s)")
        drained = self.drain()
        if not drained:
            self.errors.append(f"the sinks did not catch up within {self.args.drain_timeout:g}s of the load's end")
        self.poll_api()
        self.done_event.set()
        verdict = self.verdict()
        self.save(verdict)
        write_report(self.out, self.data)
        log(f"report: {self.out / 'report.html'}")
        print(verdict["line"])
        return 0 if verdict["pass"] else 1

    # -------------------------------------------------------------- verdict

    def dead_letters(self) -> dict[str, set[int]]:
        """Event ids in the run's dead-letter topic, by plugin ('*' for every sink)."""
        from confluent_kafka import Consumer, TopicPartition

        topic = f"{self.run_id}.dead_letter"
        c = Consumer({"bootstrap.servers": self.env["KAFKA_BROKERS"], "group.id": f"{self.run_id}-verdict",
                      "enable.auto.commit": False})
        out: dict[str, set[int]] = defaultdict(set)
        try:
            md = c.list_topics(topic, timeout=10)
            parts = md.topics.get(topic)
            if parts is None or parts.error is not None:
                return out
            tps = []
            for p in parts.partitions:
                lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if hi > lo:
                    tps.append((p, lo, hi))
            c.assign([TopicPartition(topic, p, lo) for p, lo, _ in tps])
            remaining = {p: hi for p, _, hi in tps}
            deadline = time.time() + 120
            while remaining and time.time() < deadline:
                for m in c.consume(500, 1.0):
                    if m.error():
                        continue
                    if m.offset() + 1 >= remaining.get(m.partition(), 0):
                        remaining.pop(m.partition(), None)
                    headers = {k: (v or b"").decode() for k, v in (m.headers() or [])}
                    plugin = headers.get("fanout.plugin") or "*"
                    try:
                        env = json.loads(m.value() or b"null")
                        env = env.get("payload", env) if isinstance(env, dict) and "payload" in env else env
                        out[plugin].add(int(env["after"]["id"]))
                    except (ValueError, KeyError, TypeError):
                        out["undecodable"].add(m.offset())
        finally:
            c.close()
        return out

    def verdict(self) -> dict[str, Any]:
        with psycopg.connect(self.db_url) as c:
            rows = c.execute("SELECT id, content_id FROM engagement_events").fetchall()
        ids = {r[0] for r in rows}
        per_content: dict[int, int] = defaultdict(int)
        for _, cid in rows:
            per_content[cid] += 1
        dl = self.dead_letters()
        everywhere = dl.get("*", set())
        result: dict[str, Any] = {"inserted": len(ids), "sinks": {}}

        # ClickHouse: rows per event id (duplicates that a merge would fold away still count).
        ch_counts: dict[int, int] = {}
        try:
            text = self.ch(f"SELECT event_id, count() FROM {self.run_id}.events_enriched GROUP BY event_id FORMAT TSV", 300)
            for line in text.splitlines():
                a, b = line.split("\t")
                ch_counts[int(a)] = int(b)
        except (OSError, RuntimeError) as e:
            self.errors.append(f"verdict: clickhouse: {e}")
        dead = (dl.get(PLUGIN_OF["clickhouse"], set()) | everywhere) & ids
        result["sinks"]["clickhouse"] = {
            "examples": [f"event {e}: {ch_counts.get(e, 0)} rows" for e in sorted(
                (ids - set(ch_counts) - dead) | {e for e, n in ch_counts.items() if n > 1})[:10]],
            "lost": len(ids - set(ch_counts) - dead),
            "duplicated": sum(n - 1 for n in ch_counts.values() if n > 1),
            "dead_lettered": len(dead),
            "unexpected": len(set(ch_counts) - ids),
        }

        # Redis: content:count:{id} against the events inserted per content id.
        r = redis_lib.Redis.from_url(self.env["REDIS_URL"], socket_timeout=30)
        cids = sorted(per_content)
        got: dict[int, int] = {}
        for i in range(0, len(cids), 5000):
            chunk = cids[i:i + 5000]
            vals = r.mget([f"{self.redis_prefix}content:count:{cid}" for cid in chunk])
            got.update({cid: int(v or 0) for cid, v in zip(chunk, vals)})
        dead_r = (dl.get(PLUGIN_OF["redis"], set()) | everywhere) & ids
        dead_by_cid: dict[int, int] = defaultdict(int)
        if dead_r:
            cid_of = dict(rows)
            for eid in dead_r:
                dead_by_cid[cid_of[eid]] += 1
        lost = dup = 0
        off = []
        for cid, n in per_content.items():
            want = n - dead_by_cid.get(cid, 0)
            lost += max(0, want - got[cid])
            dup += max(0, got[cid] - want)
            if got[cid] != want:
                off.append(f"content:count:{cid}={got[cid]} want {want}")
        result["sinks"]["redis"] = {"lost": lost, "duplicated": dup, "dead_lettered": len(dead_r),
                                    "unexpected": 0, "examples": off[:10]}

        # API: event ids answered 200, under how many idempotency keys.
        dead_a = (dl.get(PLUGIN_OF["api"], set()) | everywhere) & ids
        with self.lock:
            ok = set(self.api_ok)
            result["sinks"]["api"] = {
                "examples": [f"event {e}: not received" for e in sorted(ids - ok - dead_a)[:5]]
                + [f"event {e}: under 2+ keys" for e in sorted(self.api_dup_ids)[:5]],
                "lost": len(ids - ok - dead_a),
                "duplicated": len(self.api_dup_ids),
                "dead_lettered": len(dead_a),
                "unexpected": len(ok - ids),
                "redelivered_same_key": self.api_redelivered,
                "failed_requests": self.api_failed_requests,
            }
        bad = any(s["lost"] or s["duplicated"] or s["unexpected"] for s in result["sinks"].values())
        result["pass"] = not bad
        parts = [f"{s} lost={v['lost']} dup={v['duplicated']} dead-lettered={v['dead_lettered']}"
                 for s, v in result["sinks"].items()]
        result["line"] = (f"verdict: {'PASS' if not bad else 'FAIL'} inserted={len(ids)} | "
                          + " | ".join(parts))
        for sink, v in result["sinks"].items():
            for ex in v["examples"]:
                log(f"verdict {sink}: {ex}")
        if self.errors:
            result["errors"] = self.errors
        return result

    def save(self, verdict: dict[str, Any]) -> None:
        with self.lock:
            probes = [{"event_id": p.event_id, "committed": p.committed - self.t0,
                       **{s: (p.seen[s] - p.committed) if s in p.seen else None for s in SINKS}}
                      for p in self.probes.values()]
        fresh = {}
        for s in SINKS:
            vals = [p[s] for p in probes if p[s] is not None]
            fresh[s] = {"p50": percentile(vals, 0.5), "p99": percentile(vals, 0.99),
                        "max": max(vals) if vals else None, "probes": len(vals),
                        "missing": sum(1 for p in probes if p[s] is None)}
        self.data = {
            "run_id": self.run_id,
            "profile": self.profile.describe(),
            "duration": self.args.duration,
            "load_end": self.load_end,
            "faults": [f.text for f in self.faults],
            "api_mode": self.args.api_mode,
            "host_binary": self.host_binary(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0)),
            "inserted_per_s": dict(self.inserted_per_s),
            "api_per_s": dict(self.api_per_s),
            "metrics": self.metric_samples,
            "probes": probes,
            "freshness": fresh,
            "marks": self.marks,
            "verdict": verdict,
            "generator_max_behind": getattr(self, "generator_behind", 0),
        }
        (self.out / "run.json").write_text(json.dumps(self.data, indent=1))
        for s in SINKS:
            f = fresh[s]
            if f["p50"] is not None:
                log(f"freshness {s}: p50 {f['p50']:.3f}s p99 {f['p99']:.3f}s max {f['max']:.3f}s "
                    f"({f['probes']} probes, {f['missing']} never seen)")
        for e in self.errors:
            log(f"problem: {e}")

    def cleanup(self) -> None:
        self.stop_event.set()
        self.done_event.set()
        for p in (self.host, self.cdc, self.mock):
            if p is not None:
                p.stop()
        if self.args.keep:
            log(f"--keep: database {self.run_id}, ClickHouse database {self.run_id} and Redis keys {self.redis_prefix}* left in place")
            return
        try:
            self.ch(f"DROP DATABASE IF EXISTS {self.run_id}")
        except (OSError, RuntimeError):
            pass
        try:
            r = redis_lib.Redis.from_url(self.env["REDIS_URL"])
            batch = []
            for k in r.scan_iter(f"{self.redis_prefix}*", count=1000):
                batch.append(k)
                if len(batch) >= 1000:
                    r.delete(*batch)
                    batch = []
            if batch:
                r.delete(*batch)
        except redis_lib.RedisError:
            pass
        try:
            with psycopg.connect(self.pg_admin, autocommit=True) as c:
                c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (self.run_id,))
                time.sleep(0.5)
                c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s AND NOT active", (self.run_id,))
                c.execute(f"DROP DATABASE IF EXISTS {self.run_id} WITH (FORCE)")
        except psycopg.Error as e:
            log(f"cleanup: {e}")


# ------------------------------------------------------------------------------ report


def write_report(out: Path, data: dict[str, Any]) -> None:
    """PNG plots and one self-contained HTML file (the PNGs inlined) from run.json's data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {"inserted": "black", "redis": "tab:red", "clickhouse": "tab:orange", "api": "tab:blue"}
    marks = data["marks"]
    # Samples before the load's start (set-up, warm-up) are not plotted.
    data = {**data, "metrics": [m for m in data["metrics"] if 0 <= m["t"] < data["duration"] + 3600],
            "api_per_s": {k: v for k, v in data["api_per_s"].items() if int(k) >= 0}}
    end = max(data["load_end"], max((m["t"] for m in data["metrics"]), default=0))

    def mark_faults(ax) -> None:
        for m in marks:
            c = "tab:purple" if m["kind"] == "fault" else "tab:gray"
            if m["end"] is not None and m["end"] - m["start"] > 1:
                ax.axvspan(m["start"], m["end"], color=c, alpha=0.12)
            ax.axvline(m["start"], color=c, lw=1, ls="--")
            ax.text(m["start"], 1.0, " " + m["label"], transform=ax.get_xaxis_transform(),
                    rotation=90, va="top", ha="left", fontsize=7, color=c)
        ax.axvline(data["load_end"], color="black", lw=0.8, ls=":")
        ax.set_xlim(0, end)
        ax.grid(alpha=0.3)

    def series_per_s(per_s: dict) -> tuple[list, list]:
        by_s = {int(k): v for k, v in per_s.items()}  # run.json's keys are strings
        xs = list(range(min(by_s), max(by_s) + 1)) if by_s else []
        return xs, [by_s.get(x, 0) for x in xs]

    figs = {}
    # 1. events/s in and per sink (delivered, from the host's counters; the API from the mock)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    xs, ys = series_per_s(data["inserted_per_s"])
    ax.plot(xs, ys, color=colors["inserted"], lw=1.2, label="inserted (PostgreSQL)")
    ms = data["metrics"]
    for s in SINKS:
        pts = [(m["t"], m.get(f"delivered:{s}")) for m in ms if m.get(f"delivered:{s}") is not None]
        rate = [(t2, (v2 - v1) / (t2 - t1)) for (t1, v1), (t2, v2) in zip(pts, pts[1:]) if t2 > t1 and v2 >= v1]
        if rate:
            ax.plot([r[0] for r in rate], [r[1] for r in rate], color=colors[s], lw=1,
                    label=f"{PLUGIN_OF[s]} (delivered)")
    xs, ys = series_per_s(data["api_per_s"])
    ax.plot(xs, ys, color=colors["api"], lw=0.8, ls=":", label="API received (mock, HTTP 200)")
    ax.set_ylabel("events/s")
    ax.set_title("Events per second: inserted vs taken by each sink")
    mark_faults(ax)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figs["throughput"] = fig

    # 2. freshness p50/p99 per sink over time (10 s windows by commit time)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    window = 10.0
    for s in SINKS:
        buckets: dict[int, list[float]] = defaultdict(list)
        for p in data["probes"]:
            if p[s] is not None:
                buckets[int(p["committed"] // window)].append(p[s])
        xs = sorted(buckets)
        if not xs:
            continue
        ax.plot([x * window + window / 2 for x in xs], [percentile(buckets[x], 0.99) for x in xs],
                color=colors[s], lw=1.2, label=f"{s} p99")
        ax.plot([x * window + window / 2 for x in xs], [percentile(buckets[x], 0.5) for x in xs],
                color=colors[s], lw=1, ls="--", label=f"{s} p50")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("seconds from COMMIT")
    ax.set_title(f"Freshness: INSERT commit to effect in the sink (timed probes, {window:g} s windows)")
    mark_faults(ax)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figs["freshness"] = fig

    # 3. lag per plugin (messages behind, from the host's lag monitor)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for s in SINKS:
        pts = [(m["t"], m.get(f"lag_messages:{s}")) for m in ms if m.get(f"lag_messages:{s}") is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[s], lw=1, label=PLUGIN_OF[s])
    ax.set_ylabel("messages behind")
    ax.set_title("Lag per plugin (fanout_lane_lag_messages)")
    ax.set_xlabel("seconds since the start of the load")
    mark_faults(ax)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figs["lag"] = fig

    images = {}
    for name, fig in figs.items():
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=90)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        images[name] = base64.b64encode(buf.getvalue()).decode()
        plt.close(fig)
    # One picture of all three (the README's).
    v = data["verdict"]
    rows = "".join(
        f"<tr><td>{s}</td><td>{x['lost']}</td><td>{x['duplicated']}</td><td>{x['dead_lettered']}</td>"
        f"<td>{fmt(data['freshness'][s]['p50'])}</td><td>{fmt(data['freshness'][s]['p99'])}</td>"
        f"<td>{fmt(data['freshness'][s]['max'])}</td></tr>"
        for s, x in v["sinks"].items())
    faults = "".join(f"<li>{esc(m['label'])} at {m['start']:.1f} s</li>" for m in marks)
    errors = "".join(f"<li>{esc(e)}</li>" for e in v.get("errors", []))
    html = f"""<!doctype html><html><head><meta charset="utf-8"><title>fanout load test {esc(data['run_id'])}</title>
<style>body{{font-family:sans-serif;max-width:1040px;margin:1em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
.pass{{color:#070}}.fail{{color:#b00}}img{{max-width:100%}}</style></head><body>
<h1>fanout load test</h1>
<p>Run <code>{esc(data['run_id'])}</code>, started {data['started_utc']}: {esc(data['profile'])} for {data['duration']:g} s,
API mode {esc(data['api_mode'])}, host <code>{esc(data['host_binary'])}</code>.</p>
<h2 class="{'pass' if v['pass'] else 'fail'}">{esc(v['line'])}</h2>
<table><tr><th>sink</th><th>lost</th><th>duplicated</th><th>dead-lettered</th><th>fresh p50 (s)</th><th>p99 (s)</th><th>max (s)</th></tr>{rows}</table>
<p>API: {v['sinks']['api'].get('redelivered_same_key', 0)} events delivered again under the same idempotency key (recognisable retries),
{v['sinks']['api'].get('failed_requests', 0)} requests answered with an error.</p>
<h3>Faults and incidents</h3><ul>{faults or '<li>none</li>'}</ul>
{f'<h3>Problems</h3><ul>{errors}</ul>' if errors else ''}
<img src="data:image/png;base64,{images['throughput']}">
<img src="data:image/png;base64,{images['freshness']}">
<img src="data:image/png;base64,{images['lag']}">
<p>Freshness: a timed probe event (a fresh content id, committed alone) every few hundred ms; seen in Redis when
<code>content:count:ID</code> exists, in ClickHouse when its row is selectable, at the API when the mock received it
(polling every 100-200 ms adds up to that much). The dotted vertical line is the end of the load.</p>
</body></html>"""
    (out / "report.html").write_text(html)


def fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def esc(s: str) -> str:
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ------------------------------------------------------------------------------ cli


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/loadgen",
        description="Load test of the whole pipeline on the local stack, with faults (docs/load-testing.md).")
    ap.add_argument("--duration", type=parse_duration, default=60.0, help="load phase, e.g. 10m (default 60s)")
    ap.add_argument("--profile", default="steady:200",
                    help="steady:RATE | ramp:FROM-TO | burst:BASE,PEAK,EVERY,FOR (events/s; default steady:200)")
    ap.add_argument("--schedule", help="fault schedule file (config/loadgen/*.schedule)")
    ap.add_argument("--fault", action="append", default=[], help="one more fault, e.g. '60s kill -9 host and restart'")
    ap.add_argument("--probe-interval", type=float, default=0.25, help="seconds between timed probe events")
    ap.add_argument("--unknown-share", type=float, default=0.03, help="share of events naming unpublished content")
    ap.add_argument("--initial-content", type=int, default=500, help="content rows before the load")
    ap.add_argument("--publish-every", type=float, default=1.0, help="seconds between new content rows")
    ap.add_argument("--api-mode", default="per-event", choices=("per-event", "batch"))
    ap.add_argument("--batch-max-events", type=int, default=500)
    ap.add_argument("--batch-max-wait-ms", type=int, default=200)
    ap.add_argument("--drain-timeout", type=parse_duration, default=180.0)
    ap.add_argument("--host-bin", help="host binary (default target/release/fanout, else target/debug/fanout)")
    ap.add_argument("--out", help="output directory (default .stack/loadgen/RUN)")
    ap.add_argument("--keep", action="store_true", help="keep the run's database, ClickHouse database and Redis keys")
    ap.add_argument("--report-only", metavar="RUN_JSON", help="write the report again from a run.json")
    args = ap.parse_args()
    if args.report_only:
        p = Path(args.report_only)
        write_report(p.parent, json.loads(p.read_text()))
        print(p.parent / "report.html")
        return 0
    try:
        run = Run(args)
    except (ValueError, OSError) as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    try:
        return run.run()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except RuntimeError as e:
        log(f"error: {e}")
        return 2
    finally:
        run.cleanup()


if __name__ == "__main__":
    sys.exit(main())
