//! `scripts/bench` runs this (release build) against the local stack and writes BENCHMARKS.md.
//!
//! 1. Wasm boundary: the same 500-event batch handed to a no-op Wasm plugin and to a native
//!    no-op sink, in one process, one run.
//! 2. Events per CPU-second with a source that is not the bottleneck: librdkafka's mock
//!    cluster in this process, pre-filled; a bare rdkafka consumer drains it (the source's
//!    ceiling), then the host (the library, in this process) with the no-op plugin. CPU: this
//!    process's utime+stime over the drain (the mock broker's threads, `rdk:mock`, included
//!    and shown apart).
//! 3. Events per CPU-second against tansu: one pre-filled topic drained by a bare consumer, by
//!    the host binary (a child process; CPU from /proc/<pid>/stat, per thread from
//!    /proc/<pid>/task/*/stat) with the no-op plugin, each default plugin alone, the three
//!    together; and by a plain Python consumer doing the same sink work
//!    (scripts/bench_python_consumer.py). Then the three default plugins with the API
//!    `per-event` on a smaller topic of its own.
//! 4. Backfill: rows/s over a table of BACKFILL_ROWS rows, and the process's peak memory.
//!
//! Sizes and selection by environment: BENCH_EVENTS (tansu topic), BENCH_MOCK_EVENTS (per
//! round, at most 52,000: the mock broker keeps 5 MiB per partition) x BENCH_MOCK_ROUNDS,
//! BENCH_EVENTS_DEFAULT_PLUGINS (the per-event run), BACKFILL_ROWS; BENCH_ONLY=a,b runs only
//! those items (boundary, mock, bare, noop, clickhouse, redis-topn, external-api, three,
//! python, per-event, backfill) and leaves BENCHMARKS.md alone; BENCH_PERF_DIR=dir records
//! each host drain against tansu with `perf record` into dir/<run>.data (scripts/profile).

#[path = "bench/capabilities.rs"]
mod capabilities;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fanout::plugin::{PluginBatch, WitBatch, WitEvent};
use fanout_tests::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// BENCH_ONLY: the items to run (all when unset).
fn selected(item: &str) -> bool {
    match std::env::var("BENCH_ONLY") {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|s| s.trim() == item),
        _ => true,
    }
}

fn partial_run() -> bool {
    std::env::var("BENCH_ONLY").is_ok_and(|v| !v.trim().is_empty())
}

fn event(id: i64) -> WitEvent {
    WitEvent {
        user_id: Some(id % 1000),
        ..wit_event(id, Some(1 + id % 20), 1_767_882_112_000_000 + id)
    }
}

fn envelope(id: i64) -> String {
    format!(
        r#"{{"before":null,"after":{{"id":{id},"content_id":{},"user_id":{},"event_type":"play","event_ts":"{}","duration_ms":7000,"device":"web"}},"source":{{"version":"3.6.3.Final","connector":"postgresql","name":"bench","db":"engagement","schema":"public","table":"engagement_events"}},"op":"c","ts_ms":1767882112000}}"#,
        1 + id % 20,
        id % 1000,
        chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
    )
}

// ---------------------------------------------------------------------------------------------
// CPU and memory of a process and its threads, from /proc.

/// Clock ticks per second of /proc's utime and stime.
fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// (comm, utime + stime in seconds) of a /proc/.../stat file.
fn stat_cpu(path: &str) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let comm = stat[open + 1..close].to_string();
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((comm, ticks / clk_tck()))
}

/// The CPU time of a whole process (`"self"` or a pid), exited threads included.
fn process_cpu(pid: &str) -> f64 {
    stat_cpu(&format!("/proc/{pid}/stat")).map_or(0.0, |(_, s)| s)
}

/// tid -> (thread name, CPU seconds) of every live thread of a process. The CPU time is the
/// scheduler's run time in nanoseconds (`schedstat`): a thread's utime+stime moves in whole
/// clock ticks, which loses most of what a thread that runs in short bursts uses over a
/// few seconds. Falls back to utime+stime.
fn thread_cpu(pid: &str) -> BTreeMap<String, (String, f64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return BTreeMap::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            let tid = e.file_name().to_string_lossy().into_owned();
            let (comm, ticks) = stat_cpu(&format!("/proc/{pid}/task/{tid}/stat"))?;
            let ns = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok());
            Some((tid, (comm, ns.map_or(ticks, |ns| ns / 1e9))))
        })
        .collect()
}

/// Threads grouped by what they are. Linux keeps 15 bytes of a name: `plugin-clickhouse`
/// is `plugin-clickhou`.
fn thread_group(comm: &str) -> String {
    if comm.starts_with("rdk:broker") {
        "rdk:broker* (librdkafka, one per broker and client)".into()
    } else if comm == "rdk:main" {
        "rdk:main (librdkafka, one per client)".into()
    } else if comm == "tokio-runtime-w" || comm == "tokio-rt-worker" {
        "tokio-runtime-w (tokio workers and blocking pool)".into()
    } else {
        comm.to_string()
    }
}

/// A CPU snapshot of a process: total and per thread, and the last CPU time seen of every
/// thread since (a thread that ends keeps what it used up to its last observation).
struct CpuMark {
    pid: String,
    total: f64,
    threads: BTreeMap<String, (String, f64)>,
    seen: BTreeMap<String, (String, f64)>,
    at: Instant,
}

impl CpuMark {
    fn take(pid: &str) -> CpuMark {
        let threads = thread_cpu(pid);
        CpuMark {
            pid: pid.to_string(),
            total: process_cpu(pid),
            seen: threads.clone(),
            threads,
            at: Instant::now(),
        }
    }

    /// Notes every live thread's CPU so far.
    fn observe(&mut self) {
        self.seen.extend(thread_cpu(&self.pid));
    }

    /// CPU since the mark: total (exited threads included), wall seconds, thread groups
    /// sorted by CPU, then what threads that ended used after their last observation.
    fn since(mut self) -> CpuUse {
        self.observe();
        let total = process_cpu(&self.pid) - self.total;
        let wall = self.at.elapsed().as_secs_f64();
        let mut groups: BTreeMap<String, f64> = BTreeMap::new();
        for (tid, (comm, cpu)) in &self.seen {
            let before = self.threads.get(tid).map_or(0.0, |(_, c)| *c);
            *groups.entry(thread_group(comm)).or_default() += cpu - before;
        }
        let seen: f64 = groups.values().sum();
        let mut groups: Vec<(String, f64)> = groups.into_iter().filter(|(_, c)| *c > 0.0).collect();
        groups.sort_by(|a, b| b.1.total_cmp(&a.1));
        if (total - seen).abs() >= 0.01 {
            groups.push((
                "(difference: threads that ended, the total's whole ticks)".into(),
                total - seen,
            ));
        }
        CpuUse {
            cpu: total,
            wall,
            groups,
        }
    }
}

struct CpuUse {
    cpu: f64,
    wall: f64,
    groups: Vec<(String, f64)>,
}

impl CpuUse {
    fn group(&self, prefix: &str) -> f64 {
        self.groups
            .iter()
            .filter(|(g, _)| g.starts_with(prefix))
            .map(|(_, c)| c)
            .sum()
    }
}

/// Peak resident memory (VmHWM, KiB) of a running process.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// One measured drain: `events` over `wall` seconds of throughput, `cpu_events` processed
/// during the CPU window.
struct Run {
    label: String,
    events: usize,
    rate: f64,
    cpu_events: f64,
    cpu: CpuUse,
    peak_kib: u64,
    /// With several plugins: (messages decoded, messages taken already decoded by another
    /// lane), from the host's log at its stop.
    decoded: Option<(u64, u64)>,
}

impl Run {
    /// Adds `r` to `sum`: events, CPU, wall time and thread groups; the rate over the summed
    /// windows.
    fn accumulate(sum: &mut Option<Run>, r: Run) {
        let Some(s) = sum else {
            *sum = Some(r);
            return;
        };
        s.events += r.events;
        s.cpu_events += r.cpu_events;
        s.cpu.cpu += r.cpu.cpu;
        s.cpu.wall += r.cpu.wall;
        for (g, c) in r.cpu.groups {
            match s.cpu.groups.iter_mut().find(|(h, _)| *h == g) {
                Some((_, d)) => *d += c,
                None => s.cpu.groups.push((g, c)),
            }
        }
        s.cpu.groups.sort_by(|a, b| b.1.total_cmp(&a.1));
        s.rate = s.cpu_events / s.cpu.wall;
        s.peak_kib = s.peak_kib.max(r.peak_kib);
    }

    fn per_cpu_second(&self) -> f64 {
        self.cpu_events / self.cpu.cpu.max(1e-9)
    }

    fn micros_per_event(&self) -> f64 {
        1e6 / self.per_cpu_second()
    }

    fn row(&self, baseline: Option<&Run>) -> String {
        let ratio = baseline.map_or(String::from("1.00x"), |b| {
            format!("{:.2}x", self.per_cpu_second() / b.per_cpu_second())
        });
        let rss = if self.peak_kib > 0 {
            format!("{} MiB", self.peak_kib / 1024)
        } else {
            "-".into()
        };
        format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.1} | {ratio} | {rss} |",
            self.label,
            self.events,
            self.rate,
            self.cpu.cpu,
            self.cpu.cpu / self.cpu.wall.max(1e-9),
            self.per_cpu_second(),
            self.micros_per_event(),
        )
    }
}

const RUN_HEADER: &str = "| run | events | events/s | CPU-s | cores busy | events per CPU-second | CPU µs/event | events/CPU-s vs first row | peak RSS |\n|---|---|---|---|---|---|---|---|---|";

fn groups_table(out: &mut String, cpu: &CpuUse) {
    let _ = writeln!(out, "| thread group | CPU-s | share |\n|---|---|---|");
    for (g, c) in &cpu.groups {
        let _ = writeln!(
            out,
            "| `{g}` | {c:.2} | {:.1}% |",
            100.0 * c / cpu.cpu.max(1e-9)
        );
    }
    let _ = writeln!(out, "| all (process utime+stime) | {:.2} | 100% |", cpu.cpu);
}

// ---------------------------------------------------------------------------------------------
// 1. The Wasm boundary.

/// One plugin loaded on its own engine, as the host loads it.
async fn load_boundary_plugin(
    stack: &Stack,
    wasm: &std::path::Path,
    mode: &str,
    fuel: bool,
) -> fanout::plugin::Plugin {
    let toml = format!(
        r#"
[kafka]
brokers = "{}"
[services]
redis_url = "{}"
[[plugins]]
name = "boundary"
path = "{}"
[plugins.config]
mode = "{mode}"
"#,
        stack.kafka_brokers,
        stack.redis_url,
        wasm.display()
    );
    let cfg = fanout::config::Config::from_toml(
        &toml,
        std::path::Path::new("bench.toml"),
        std::iter::empty(),
    )
    .expect("config");
    let metrics = fanout::metrics::Metrics::default();
    let services = fanout::plugin::capabilities::Services::connect(&cfg.services, metrics)
        .await
        .expect("services");
    let engine = fanout::plugin::engine_with(fuel).expect("engine");
    let linker = fanout::plugin::linker(&engine).expect("linker");
    let pc = cfg.plugins[0].clone();
    tokio::task::spawn_blocking(move || fanout::plugin::Plugin::load(pc, &engine, linker, services))
        .await
        .expect("join")
        .expect("load")
}

/// The median of 9 trials of `rounds` runs of `f`, ns per event of a `events`-event batch: a
/// trial the shared machine interrupts (the stack's services run on the same 2 cores) moves
/// it little.
async fn median_ns<F, Fut>(events: usize, rounds: usize, mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let trials = 9;
    let mut figures = Vec::with_capacity(trials);
    for _ in 0..trials {
        let t = Instant::now();
        for _ in 0..rounds {
            f().await;
        }
        figures.push(t.elapsed().as_nanos() as f64 / (rounds * events) as f64);
    }
    figures.sort_by(f64::total_cmp);
    figures[trials / 2]
}

/// ns per event of handing `batch` to `plugin`, the whole call path: packing (a lane packs
/// while it enriches; `pack` false: one batch packed beforehand, the call alone), the worker
/// thread hop, records read back for a records-world plugin, lowering, plugin code, answer.
async fn ns_per_event(plugin: &fanout::plugin::Plugin, batch: &WitBatch, pack: bool) -> f64 {
    let once = Arc::new(PluginBatch::new(batch, &[]));
    let next = || {
        if pack {
            Arc::new(PluginBatch::new(batch, &[]))
        } else {
            Arc::clone(&once)
        }
    };
    for _ in 0..40 {
        plugin.write(next()).await.expect("warm-up");
    }
    median_ns(batch.events.len(), 100, || {
        let b = next();
        async move {
            plugin.write(b).await.expect("write");
        }
    })
    .await
}

/// The options of the Wasm boundary, measured on the same 500-event batch: events as records
/// (`sink`, a plugin built without the SDK) against one packed buffer (`packed-sink`, the SDK),
/// a no-op plugin and one that reads every field, with and without fuel metering (epoch
/// interruption is on in every case: it enforces call deadlines). Instances are created once
/// and reused across calls (the host's own pre-instantiation).
async fn boundary(report: &mut String) {
    let stack = Stack::get().expect("stack");
    let batch = WitBatch {
        id: "bench".into(),
        events: (0..500).map(event).collect(),
        sources: vec![],
    };
    let records = plugin_wasm("compat_records");
    let packed = plugin_wasm("testkit");
    let mut rows = Vec::new();
    for (world, wasm) in [
        ("records (`sink`)", &records),
        ("packed (`packed-sink`)", &packed),
    ] {
        for mode in ["noop", "read-all"] {
            let mut figures = Vec::new();
            for fuel in [true, false] {
                let plugin = load_boundary_plugin(&stack, wasm, mode, fuel).await;
                figures.push(ns_per_event(&plugin, &batch, true).await);
            }
            rows.push((world, mode, figures[0], figures[1]));
        }
    }
    // The same packed no-op with the batch packed once: the call without the packing, and the
    // packing alone.
    let mut call_only = Vec::new();
    for fuel in [true, false] {
        let plugin = load_boundary_plugin(&stack, &packed, "noop", fuel).await;
        call_only.push(ns_per_event(&plugin, &batch, false).await);
    }
    let packing_ns = median_ns(batch.events.len(), 100, || {
        std::hint::black_box(PluginBatch::new(&batch, &[]));
        std::future::ready(())
    })
    .await;
    // The native no-op sink receives the same batch through a plain function call.
    fn native_noop(batch: &WitBatch) -> usize {
        batch
            .events
            .iter()
            .map(|e| std::hint::black_box(e).event_id as usize)
            .sum()
    }
    let rounds = 400;
    let t = Instant::now();
    let mut sink = 0usize;
    for _ in 0..rounds {
        sink = sink.wrapping_add(native_noop(std::hint::black_box(&batch)));
    }
    std::hint::black_box(sink);
    let native_ns = t.elapsed().as_nanos() as f64 / (rounds * batch.events.len()) as f64;
    let _ = writeln!(
        report,
        "\n### Wasm boundary: a 500-event batch, ns per event (whole call path)\n\n\
         The call path: packing the batch (a lane packs while it enriches), the worker-thread \
         hop, records read back for a records-world plugin, lowering, plugin code, answer. \
         Median of 9 trials of 100 calls each.\n\n\
         | world | plugin | fuel + epochs | epochs only |\n|---|---|---|---|"
    );
    for (world, mode, fuel, epochs) in &rows {
        let _ = writeln!(report, "| {world} | {mode} | {fuel:.0} | {epochs:.0} |");
    }
    let _ = writeln!(
        report,
        "| packed (`packed-sink`), batch packed once: the call alone | noop | {:.0} | {:.0} |",
        call_only[0], call_only[1]
    );
    let _ = writeln!(
        report,
        "\nPacking the 500 events alone (`PluginBatch::new`, from WIT records): {packing_ns:.0} ns/event."
    );
    let _ = writeln!(
        report,
        "\nSame batch to a native no-op function, same run: {native_ns:.1} ns/event.\n"
    );
}

// ---------------------------------------------------------------------------------------------
// Filling topics, and the bare consumer.

/// Produces `n` envelopes (ids 1..=n, keyed by id) to `topic` at `brokers`.
async fn fill(brokers: &str, topic: &str, n: usize) -> Duration {
    use futures::StreamExt;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let t = Instant::now();
    let mut pending = futures::stream::FuturesUnordered::new();
    for id in 1..=n as i64 {
        let value = envelope(id);
        let key = format!("{{\"id\":{id}}}");
        let p = producer.clone();
        let topic = topic.to_string();
        pending.push(async move {
            p.send(
                FutureRecord::to(&topic).key(&key).payload(&value),
                Duration::from_secs(60),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
        });
        if pending.len() >= 5000 {
            while let Some(r) = pending.next().await {
                r.expect("produce");
            }
        }
    }
    while let Some(r) = pending.next().await {
        r.expect("produce");
    }
    t.elapsed()
}

/// A topic of the stack (4 partitions) pre-filled with `n` envelopes.
async fn prefill(stack: &Stack, topic: &str, n: usize) -> Duration {
    create_topic(stack, topic, 4).await;
    fill(&stack.kafka_brokers, topic, n).await
}

/// A plain rdkafka consumer (own group, the lanes' prefetch) reading `n` messages and
/// touching their payloads: what the source gives at most. Runs on a thread of its own; CPU
/// is this whole process's.
async fn bare_consumer(label: &str, brokers: &str, topic: &str, n: usize) -> Run {
    let (label, brokers, topic) = (label.to_string(), brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique("bench-bare"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("queued.max.messages.kbytes", "16384")
            .create()
            .expect("consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        let deadline = Instant::now() + Duration::from_secs(600);
        let (mut count, mut bytes) = (0usize, 0usize);
        let mut mark = None;
        while count < n {
            assert!(Instant::now() < deadline, "bare consumer: {count} of {n}");
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    if mark.is_none() {
                        mark = Some(CpuMark::take("self"));
                    }
                    count += 1;
                    bytes += std::hint::black_box(m.payload().map_or(0, <[u8]>::len));
                }
                Some(Err(e)) => eprintln!("bench {label}: consume error: {e}"),
                None => {}
            }
        }
        std::hint::black_box(bytes);
        let cpu = mark.expect("a message").since();
        drop(consumer);
        Run {
            label,
            events: n,
            rate: n as f64 / cpu.wall,
            cpu_events: n as f64,
            cpu,
            peak_kib: 0,
            decoded: None,
        }
    })
    .await
    .expect("bare consumer thread")
}

// ---------------------------------------------------------------------------------------------
// 2. The mock cluster: source ceiling and the host in this process.

/// librdkafka's mock broker keeps at most 5 MiB (and 100,000 messages) per partition and
/// drops the oldest message sets past it (`rdkafka_mock.c`, fixed): about 14,000 of the
/// bench's envelopes per partition. Above this a 4-partition topic loses events before they
/// are read.
const MOCK_MAX_EVENTS: usize = 52_000;

async fn mock_section(stack: &Stack, pg_url: &str, n: usize, rounds: usize, out: &mut String) {
    use rdkafka::mocking::MockCluster;
    assert!(
        n <= MOCK_MAX_EVENTS,
        "BENCH_MOCK_EVENTS={n}: a 4-partition topic of the mock cluster keeps about \
         {MOCK_MAX_EVENTS} envelopes (5 MiB per partition); raise BENCH_MOCK_ROUNDS instead"
    );
    let mock = MockCluster::new(1).expect("mock cluster");
    let brokers = mock.bootstrap_servers();
    let (content, dlq) = ("bench_content", "bench_dead_letter");
    mock.create_topic(content, 1, 1).expect("content topic");
    mock.create_topic(dlq, 1, 1).expect("dead-letter topic");
    let mut bare: Option<Run> = None;
    let mut host: Option<Run> = None;
    let mut took = Duration::ZERO;
    for round in 0..rounds {
        let topic = format!("bench_events_{round}");
        mock.create_topic(&topic, 4, 1).expect("events topic");
        took += fill(&brokers, &topic, n).await;
        let b = bare_consumer(
            "bare rdkafka consumer (BaseConsumer::poll), mock cluster",
            &brokers,
            &topic,
            n,
        )
        .await;
        let h = mock_host(stack, pg_url, &brokers, &topic, content, dlq, n).await;
        eprintln!(
            "bench mock round {round}: bare {:.0} msg/s {:.2} CPU-s; host {:.0} events/s {:.2} CPU-s",
            b.rate, b.cpu.cpu, h.rate, h.cpu.cpu
        );
        Run::accumulate(&mut bare, b);
        Run::accumulate(&mut host, h);
    }
    let (bare, host) = (bare.expect("a round"), host.expect("a round"));
    let total = n * rounds;
    let _ = writeln!(
        out,
        "## 1. Source not the bottleneck: librdkafka's mock cluster, in the bench process\n\n\
         {rounds} rounds; each: a new 4-partition topic of the mock cluster \
         (`rdkafka::mocking::MockCluster`, one broker, running as threads `rdk:mock` of this \
         process) pre-filled with {n} Debezium envelopes (the mock keeps 5 MiB per partition, \
         so a round holds no more), drained by a bare consumer, then by the host as a library \
         (`fanout::app::App::start` + `run`, one lane, testkit `noop` plugin, content table from \
         PostgreSQL, batches of 500; `App` started anew per round, plugin from the compile \
         cache). Figures are the sums over the rounds ({total} events; filling took {:.1} s). \
         CPU: this process's utime+stime (all threads) from the first message consumed to the \
         last event consumed (resp. delivered), the group join before it not counted; events/s \
         over the same window. Nothing subtracted: the mock broker's own CPU is in both and \
         shown apart.\n\n{RUN_HEADER}\n{}\n{}\n",
        took.as_secs_f64(),
        bare.row(None),
        host.row(Some(&bare)),
    );
    let (bare_mock, host_mock) = (bare.cpu.group("rdk:mock"), host.cpu.group("rdk:mock"));
    let _ = writeln!(
        out,
        "- of that CPU, the mock broker (`rdk:mock`): bare {bare_mock:.2} s, host {host_mock:.2} s; \
         without it: bare {:.0} events per CPU-second, host {:.0} ({:.1} CPU µs/event)\n\
         - the host takes {:.1}x the bare consumer's CPU per event, and reaches {:.0}% of its rate\n",
        bare.cpu_events / (bare.cpu.cpu - bare_mock).max(1e-9),
        host.cpu_events / (host.cpu.cpu - host_mock).max(1e-9),
        1e6 * (host.cpu.cpu - host_mock) / host.cpu_events,
        bare.per_cpu_second() / host.per_cpu_second(),
        100.0 * host.rate / bare.rate,
    );
    let _ = writeln!(out, "Host runs, CPU by thread (sum of the rounds):\n");
    groups_table(out, &host.cpu);
    let _ = writeln!(out);
}

/// The host (library) with the no-op plugin on a pre-filled topic of the mock cluster.
async fn mock_host(
    stack: &Stack,
    pg_url: &str,
    brokers: &str,
    topic: &str,
    content: &str,
    dlq: &str,
    n: usize,
) -> Run {
    let toml = format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
events_topic = "{topic}"
content_topic = "{content}"
dead_letter_topic = "{dlq}"
[postgres]
url = "{pg_url}"
[batch]
max_events = 500
max_wait_ms = 100
[services]
redis_url = "{redis}"
[http]
listen = ""
[[plugins]]
name = "noop"
path = "{wasm}"
[plugins.config]
mode = "noop"
"#,
        group = unique("bench-mock"),
        redis = stack.redis_url,
        wasm = plugin_wasm("testkit").display(),
    );
    let cfg = fanout::config::Config::from_toml(
        &toml,
        std::path::Path::new("bench-mock.toml"),
        std::iter::empty(),
    )
    .expect("config");
    let app = fanout::app::App::start(cfg).await.expect("host start");
    let metrics = app.metrics.clone();
    let series = fanout::metrics::label("plugin", "noop");
    let consumed = metrics.lane("noop");
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let run = app.run(shutdown);
    tokio::pin!(run);
    let started = Instant::now();
    // The window opens at the lane's first message (the group join before it is not counted)
    // and closes when the last event is delivered.
    let watch = async {
        let mut mark: Option<(CpuMark, usize)> = None;
        let mut polls = 0u32;
        loop {
            let delivered = metrics.labelled("fanout_events_delivered_total", &series) as usize;
            match &mut mark {
                None if consumed.messages_consumed.get() > 0 => {
                    mark = Some((CpuMark::take("self"), delivered));
                }
                Some((m, _)) if polls.is_multiple_of(10) => m.observe(),
                _ => {}
            }
            polls += 1;
            if delivered >= n {
                return mark.expect("a consumed message");
            }
            assert!(
                started.elapsed() < Duration::from_secs(900),
                "host on the mock cluster: {delivered} of {n} delivered"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (mark, d0) = tokio::select! {
        r = &mut run => panic!("the host stopped on the mock cluster: {r:?}"),
        mark = watch => mark,
    };
    let cpu = mark.since();
    let _ = stop.send(true);
    match tokio::time::timeout(Duration::from_secs(30), &mut run).await {
        Ok(r) => r.expect("host run"),
        Err(_) => eprintln!("bench mock: the host did not stop within 30 s"),
    }
    Run {
        label: "host + no-op plugin (library, in this process), mock cluster".into(),
        events: n,
        rate: (n - d0) as f64 / cpu.wall,
        cpu_events: (n - d0) as f64,
        cpu,
        peak_kib: 0,
        decoded: None,
    }
}

// ---------------------------------------------------------------------------------------------
// 3. The host binary against tansu.

/// `perf record` attached to a process until dropped (SIGINT, then wait).
struct Perf(Option<std::process::Child>);

impl Perf {
    fn attach(pid: u32, name: &str) -> Perf {
        let Ok(dir) = std::env::var("BENCH_PERF_DIR") else {
            return Perf(None);
        };
        let _ = std::fs::create_dir_all(&dir);
        let freq = std::env::var("BENCH_PERF_FREQ").unwrap_or_else(|_| "999".into());
        let graph = std::env::var("BENCH_PERF_CALL_GRAPH").unwrap_or_else(|_| "dwarf,16384".into());
        let child = Command::new("perf")
            .args(["record", "-q", "-F", &freq, "--call-graph", &graph, "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(format!("{dir}/{name}.data"))
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| eprintln!("bench: cannot start perf: {e}"))
            .ok();
        // perf needs a moment to attach to every thread.
        std::thread::sleep(Duration::from_millis(300));
        Perf(child)
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

/// What the tansu runs share: the pre-filled topic, an empty content topic, the seeded
/// content table.
struct Tansu<'a> {
    stack: &'a Stack,
    topic: String,
    content_topic: String,
    pg_url: String,
    n: usize,
}

/// Runs the host binary on `topic` (pre-filled with `n`) until every event is delivered to
/// every plugin of `plugins_toml`. CPU from /proc/<pid>/stat from the first message a lane
/// consumed to the last delivery of every lane; events/s of the slowest lane, from its first
/// message to its last delivery.
async fn drain(
    t: &Tansu<'_>,
    name: &str,
    label: &str,
    topic: &str,
    n: usize,
    plugins_toml: &str,
    plugins: &[&str],
) -> Run {
    let mut cfg =
        ConfigBuilder::new(t.stack, topic, &t.content_topic, &t.pg_url).plugin_raw(plugins_toml);
    // The stack's host user, limited to `engagement` and `fanout_sandbox`.
    cfg.clickhouse_user = t.stack.clickhouse_host.clone();
    let dir = repo_root().join("target/test-logs");
    let _ = std::fs::create_dir_all(&dir);
    let config_path = dir.join(format!("bench-{name}.toml"));
    std::fs::write(&config_path, cfg.render()).expect("write config");
    // As in production: info, not the tests' debug logging.
    let mut cmd = Command::new(host_binary());
    cmd.arg("run")
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "info");
    let host = HostProc {
        proc: Proc::spawn(cmd, &format!("host-bench-{name}-{}", unique("run"))),
        config_path,
        metrics_addr: cfg.metrics_addr.clone(),
    };
    let pid = host.proc.child.id();
    let started = Instant::now();
    let delivered: Vec<String> = plugins
        .iter()
        .map(|p| format!("fanout_events_delivered_total{{plugin=\"{p}\"}}"))
        .collect();
    let consumed: Vec<String> = plugins
        .iter()
        .map(|p| format!("fanout_messages_consumed_total{{plugin=\"{p}\"}}"))
        .collect();
    loop {
        if !host.metrics().await.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "bench {name}: the host did not start; see {}",
            host.proc.log.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The window opens when a lane has consumed its first message (the group join before it
    // is not counted) and closes when every lane has delivered the last event.
    let mut mark: Option<(CpuMark, Vec<f64>)> = None;
    let mut perf: Option<Perf> = None;
    // Per lane: (when it consumed its first message, delivered then) and when it delivered
    // the last event. The run's events/s is the slowest lane's over its own window (lanes
    // join their consumer groups one by one, seconds apart on tansu).
    let mut lane_start: Vec<Option<(Instant, f64)>> = vec![None; plugins.len()];
    let mut lane_end: Vec<Option<Instant>> = vec![None; plugins.len()];
    let mut peak = 0;
    loop {
        let m = host.metrics().await;
        let now = Instant::now();
        peak = peak.max(vm_hwm_kib(pid).unwrap_or(0));
        let values = |series: &[String]| -> Vec<f64> {
            series.iter().map(|s| metric_value(&m, s)).collect()
        };
        let (consumed_now, delivered_now) = (values(&consumed), values(&delivered));
        match &mut mark {
            None if consumed_now.iter().any(|c| *c > 0.0) => {
                mark = Some((CpuMark::take(&pid.to_string()), delivered_now.clone()));
                // scripts/profile: perf samples the same window (from about 0.3 s into it).
                perf = Some(Perf::attach(pid, name));
            }
            Some((cpu, _)) => cpu.observe(),
            _ => {}
        }
        for (i, (c, d)) in consumed_now.iter().zip(&delivered_now).enumerate() {
            if *c > 0.0 && lane_start[i].is_none() {
                lane_start[i] = Some((now, *d));
            }
            if *d >= n as f64 && lane_end[i].is_none() {
                lane_end[i] = Some(now);
            }
        }
        if mark.is_some() && lane_end.iter().all(Option::is_some) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "bench {name} took too long; see {}",
            host.proc.log.display()
        );
        // Every scrape costs the host CPU (HTTP, rendering every series: about 2% of the
        // three-plugin run at 20 a second), counted in its events per CPU-second; 10 a second
        // still places a lane's end within 100 ms.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mark, at_mark) = mark.expect("window");
    let cpu = mark.since();
    drop(perf);
    // Events processed in the window: per lane, those delivered after it opened.
    let cpu_events =
        at_mark.iter().map(|d| n as f64 - d).sum::<f64>() / at_mark.len().max(1) as f64;
    let lane_rates: Vec<f64> = lane_start
        .iter()
        .zip(&lane_end)
        .filter_map(|(s, e)| {
            let ((start, d0), end) = ((*s)?, (*e)?);
            Some((n as f64 - d0) / end.duration_since(start).as_secs_f64().max(1e-3))
        })
        .collect();
    eprintln!("bench {name}: events/s per lane {plugins:?}: {lane_rates:.0?}");
    let rate = lane_rates.iter().copied().fold(f64::INFINITY, f64::min);
    // Stopped (after the window) with SIGTERM: the host logs how often lanes shared decoding.
    let mut host = host;
    let decoded = if plugins.len() > 1 {
        host.proc.terminate(Duration::from_secs(30));
        decode_counts(&host.proc.log)
    } else {
        None
    };
    if let Some((decoded, shared)) = decoded {
        eprintln!("bench {name}: {decoded} messages decoded, {shared} taken already decoded");
    }
    let run = Run {
        label: label.to_string(),
        events: n,
        rate,
        cpu_events,
        cpu,
        peak_kib: peak,
        decoded,
    };
    eprintln!(
        "bench {name}: {:.0} events/s, {:.2} CPU-s, {:.0} events per CPU-second",
        run.rate,
        run.cpu.cpu,
        run.per_cpu_second()
    );
    run
}

/// (decoded, shared) from the host's stop line "messages decoded, and taken already decoded
/// by another lane decoded=N shared=M".
fn decode_counts(log: &std::path::Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("taken already decoded"))?;
    let field = |key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Some((field("decoded=")?, field("shared=")?))
}

/// The plain Python consumer on the same topic, with the same sinks (its own resources).
async fn python_consumer(t: &Tansu<'_>, ch_table: &str, prefix: &str, ns: &str) -> Run {
    let python = std::env::var("STACK_PYTHON").unwrap_or_else(|_| {
        repo_root()
            .join(".stack/venv/bin/python")
            .display()
            .to_string()
    });
    let api = format!(
        "{}/ns/{ns}/events",
        t.stack.external_api_url.trim_end_matches('/')
    );
    let dir = repo_root().join("target/test-logs");
    let _ = std::fs::create_dir_all(&dir);
    let log = dir.join("bench-python-consumer.log");
    let n = t.n.to_string();
    let mut child = Command::new(python)
        .arg(repo_root().join("scripts/bench_python_consumer.py"))
        .args(["--brokers", &t.stack.kafka_brokers])
        .args(["--topic", &t.topic])
        .args(["--group", &unique("bench-python")])
        .args(["--events", &n])
        .args(["--batch", "500", "--max-wait-ms", "100"])
        .args(["--pg-url", &t.pg_url])
        .args(["--redis-url", &t.stack.redis_url])
        .args(["--key-prefix", prefix])
        .args(["--clickhouse-url", &t.stack.clickhouse_url])
        .args(["--clickhouse-user", &t.stack.clickhouse_host.user])
        .args(["--clickhouse-password", &t.stack.clickhouse_host.password])
        .args(["--clickhouse-db", "fanout_sandbox"])
        .args(["--clickhouse-table", ch_table])
        .args(["--api-url", &api])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
        .spawn()
        .expect("python consumer");
    let pid = child.id();
    let mut peak = 0;
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        peak = peak.max(vm_hwm_kib(pid).unwrap_or(0));
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "python consumer took too long"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = child.wait_with_output().expect("python output");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python consumer failed: {text}; see {}",
        log.display()
    );
    let v: serde_json::Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("python consumer's JSON line");
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let mut groups: BTreeMap<String, f64> = BTreeMap::new();
    for (comm, c) in v["threads"].as_object().into_iter().flatten() {
        *groups.entry(thread_group(comm)).or_default() += c.as_f64().unwrap_or(0.0);
    }
    let mut groups: Vec<(String, f64)> = groups.into_iter().filter(|(_, c)| *c > 0.0).collect();
    groups.sort_by(|a, b| b.1.total_cmp(&a.1));
    let run = Run {
        label: "plain Python consumer (confluent-kafka, redis-py, requests), same three sinks"
            .into(),
        events: t.n,
        rate: f("events") / f("wall_s"),
        cpu_events: f("events"),
        cpu: CpuUse {
            cpu: f("cpu_s"),
            wall: f("wall_s"),
            groups,
        },
        peak_kib: peak,
        decoded: None,
    };
    eprintln!(
        "bench python: {:.0} events/s, {:.2} CPU-s, {:.0} events per CPU-second",
        run.rate,
        run.cpu.cpu,
        run.per_cpu_second()
    );
    run
}

async fn tansu_section(
    stack: &Stack,
    pg_url: &str,
    n: usize,
    n_per_event: usize,
    out: &mut String,
) {
    let topic = unique("bench_events");
    let content_topic = unique("bench_content");
    create_topic(stack, &content_topic, 1).await;
    let took = prefill(stack, &topic, n).await;
    eprintln!("bench tansu: pre-filled {n} events in {took:?}");
    let t = Tansu {
        stack,
        topic: topic.clone(),
        content_topic,
        pg_url: pg_url.to_string(),
        n,
    };
    let mut runs: Vec<Run> = Vec::new();
    let mut tables: Vec<String> = Vec::new();
    let ch = |name: &str, table: &str| {
        format!(
            "{}table = \"{table}\"\n",
            plugin_toml::clickhouse(name, "fanout_sandbox")
        )
    };
    let noop = format!(
        "[[plugins]]\nname = \"noop\"\npath = \"{}\"\n[plugins.config]\nmode = \"noop\"\n",
        plugin_wasm("testkit").display()
    );

    let bare = if selected("bare") {
        let r = bare_consumer(
            "bare rdkafka consumer (BaseConsumer::poll), tansu",
            &stack.kafka_brokers,
            &topic,
            n,
        )
        .await;
        eprintln!(
            "bench tansu bare: {:.0} msg/s, {:.2} CPU-s",
            r.rate, r.cpu.cpu
        );
        Some(r)
    } else {
        None
    };
    let mut three_cpu: Option<CpuUse> = None;
    let mut three_decoded: Option<(u64, u64)> = None;
    let mut noop_cpu: Option<CpuUse> = None;
    if selected("noop") {
        let r = drain(
            &t,
            "noop",
            "host + no-op plugin",
            &topic,
            n,
            &noop,
            &["noop"],
        )
        .await;
        noop_cpu = Some(CpuUse {
            cpu: r.cpu.cpu,
            wall: r.cpu.wall,
            groups: r.cpu.groups.clone(),
        });
        runs.push(r);
    }
    if selected("clickhouse") {
        let table = unique("bench_ch");
        tables.push(table.clone());
        runs.push(
            drain(
                &t,
                "clickhouse",
                "host + clickhouse alone",
                &topic,
                n,
                &ch("clickhouse", &table),
                &["clickhouse"],
            )
            .await,
        );
    }
    if selected("redis-topn") {
        let prefix = format!("{}:", unique("bench"));
        runs.push(
            drain(
                &t,
                "redis-topn",
                "host + redis-topn alone",
                &topic,
                n,
                &plugin_toml::redis_topn("redis-topn", &prefix),
                &["redis-topn"],
            )
            .await,
        );
    }
    if selected("external-api") {
        let ns = unique("bench");
        runs.push(
            drain(
                &t,
                "external-api",
                "host + external-api alone (`batch`)",
                &topic,
                n,
                &plugin_toml::external_api("external-api", stack, &ns, "batch"),
                &["external-api"],
            )
            .await,
        );
        mock_reset(stack, &ns).await;
    }
    // The Python example beside the Rust plugin doing the same work: HINCRBY per event through
    // the exactly-once primitive (plugins/device-counter, plugins/python/device_counter).
    // Both count into `{prefix}devcount:{device}` with their bookkeeping under `{prefix}once:`.
    for (item, label, wasm, name) in [
        (
            "device-counter",
            "host + device-counter (Rust) alone",
            "device_counter",
            "devices",
        ),
        (
            "python-device-counter",
            "host + the Python device counter alone",
            "python_device_counter",
            "py-devices",
        ),
    ] {
        if selected(item) {
            let prefix = format!("{}:", unique("bench"));
            let config = if item == "device-counter" {
                format!("key_prefix = \"{prefix}devcount:\"\nonce_key_prefix = \"{prefix}once:\"")
            } else {
                format!("key_prefix = \"{prefix}\"")
            };
            let toml = format!(
                "[[plugins]]\nname = \"{name}\"\npath = \"{}\"\nmemory_mb = 256\n\
                 [plugins.grants]\nredis = {{ key_prefix = \"{prefix}\", allow_scripts = true }}\n\
                 [plugins.config]\n{config}\n",
                plugin_wasm(wasm).display()
            );
            runs.push(drain(&t, item, label, &topic, n, &toml, &[name]).await);
        }
    }
    if selected("three") {
        let table = unique("bench_ch");
        tables.push(table.clone());
        let (prefix, ns) = (format!("{}:", unique("bench")), unique("bench"));
        let three = [
            ch("clickhouse", &table),
            plugin_toml::redis_topn("redis-topn", &prefix),
            plugin_toml::external_api("external-api", stack, &ns, "batch"),
        ]
        .concat();
        let r = drain(
            &t,
            "three",
            "host + all three (clickhouse, redis-topn, external-api `batch`)",
            &topic,
            n,
            &three,
            &["clickhouse", "redis-topn", "external-api"],
        )
        .await;
        three_cpu = Some(CpuUse {
            cpu: r.cpu.cpu,
            wall: r.cpu.wall,
            groups: r.cpu.groups.clone(),
        });
        three_decoded = r.decoded;
        runs.push(r);
        mock_reset(stack, &ns).await;
    }
    let python = if selected("python") {
        let table = unique("bench_py");
        tables.push(table.clone());
        let (prefix, ns) = (format!("{}:", unique("benchpy")), unique("benchpy"));
        let r = python_consumer(&t, &table, &prefix, &ns).await;
        mock_reset(stack, &ns).await;
        Some(r)
    } else {
        None
    };
    let per_event = if selected("per-event") {
        let topic = unique("bench_per_event");
        let took = prefill(stack, &topic, n_per_event).await;
        eprintln!("bench per-event: pre-filled {n_per_event} events in {took:?}");
        let table = unique("bench_ch");
        tables.push(table.clone());
        let (prefix, ns) = (format!("{}:", unique("bench")), unique("bench"));
        let three = [
            ch("clickhouse", &table),
            plugin_toml::redis_topn("redis-topn", &prefix),
            plugin_toml::external_api("external-api", stack, &ns, "per-event"),
        ]
        .concat();
        let r = drain(
            &t,
            "three-per-event",
            "host + all three, external-api `per-event` (one request per event)",
            &topic,
            n_per_event,
            &three,
            &["clickhouse", "redis-topn", "external-api"],
        )
        .await;
        mock_reset(stack, &ns).await;
        Some(r)
    } else {
        None
    };
    for table in &tables {
        let _ = clickhouse_query_as(
            stack,
            &stack.clickhouse_admin,
            &format!("DROP TABLE IF EXISTS fanout_sandbox.`{table}`"),
        )
        .await;
    }

    let _ = writeln!(
        out,
        "## 2. The host binary against tansu (separate process)\n\n\
         One 4-partition tansu topic pre-filled with {n} envelopes ({:.1} s) serves every run \
         below, each in consumer groups of its own. The host runs as `fanout run` (release, \
         `RUST_LOG=info`, batches of 500 / 100 ms, content table from PostgreSQL, an empty \
         content topic followed), its ClickHouse plugin as the stack's host user into a table of \
         its own in `fanout_sandbox`, Redis under a key prefix of its own, the API in a mock \
         namespace of its own. CPU: utime+stime of the host process (/proc/<pid>/stat, all \
         threads) from the first message a lane consumed to the last event delivered to every \
         plugin (the consumer group join before is not counted, for no consumer); events/s: the \
         slowest lane's, from its first message to its last delivery (lanes join their groups \
         one by one). The bare consumer and the Python consumer are measured from their \
         first message to their last. Sinks' own CPU (Redis's Lua, ClickHouse, the mock API) is \
         not counted for anyone.\n\n{RUN_HEADER}",
        took.as_secs_f64()
    );
    let base = runs.first();
    if let Some(b) = &bare {
        let _ = writeln!(out, "{}", b.row(None).replacen("| 1.00x |", "| - |", 1));
    }
    for r in &runs {
        let _ = writeln!(out, "{}", r.row(base));
    }
    if let Some(p) = &python {
        let _ = writeln!(out, "{}", p.row(base));
    }
    if let Some(p) = &per_event {
        let _ = writeln!(out, "{}", p.row(base));
    }
    let _ = writeln!(out);
    if let Some(b) = &bare {
        let _ = writeln!(
            out,
            "The bare consumer shows tansu's ceiling here ({:.0} msg/s): the no-op host's rate is \
             bounded by it, its CPU per event is not.\n",
            b.rate
        );
    }
    let three = runs
        .iter()
        .find(|r| r.label.starts_with("host + all three"));
    if let (Some(h), Some(p)) = (three, &python) {
        let _ = writeln!(
            out,
            "## 3. Host + three plugins vs a plain Python consumer, same topic, same sinks\n\n\
             | | events/s | CPU-s | events per CPU-second | CPU µs/event |\n|---|---|---|---|---|\n\
             | host + all three | {:.0} | {:.2} | {:.0} | {:.1} |\n\
             | plain Python consumer | {:.0} | {:.2} | {:.0} | {:.1} |\n\
             | **ratio host / Python** | {:.2}x | | **{:.2}x** | |\n\n\
             The Python consumer (`scripts/bench_python_consumer.py`, run with the stack's venv) \
             reads the same topic in batches of 500 (100 ms), decodes, keeps inserts, enriches from \
             the same content table, and per batch sends one redis-py pipeline (SET content:last, \
             INCR content:count, ZINCRBY + EXPIRE the minute bucket per event; ZUNIONSTORE + EXPIRE \
             of the 10-minute key), one ClickHouse `INSERT ... FORMAT JSONEachRow` over HTTP (host \
             user, a table of its own in `fanout_sandbox`: that user may use no other database) \
             and one POST of the batch to the mock API; offsets stored after a batch, committed \
             by librdkafka every second. It does less than the plugins: no idempotency (no seen \
             markers and no Lua script in Redis, no id lookup in ClickHouse, no Idempotency-Key), \
             the three sinks one after the other instead of three lanes in parallel. Its CPU is \
             its own getrusage (all threads) from its first message to its last batch.\n\n\
             Python's CPU by thread:\n",
            h.rate,
            h.cpu.cpu,
            h.per_cpu_second(),
            h.micros_per_event(),
            p.rate,
            p.cpu.cpu,
            p.per_cpu_second(),
            p.micros_per_event(),
            h.rate / p.rate,
            h.per_cpu_second() / p.per_cpu_second(),
        );
        groups_table(out, &p.cpu);
        let _ = writeln!(out);
    }
    if let Some(cpu) = &three_cpu {
        let _ = writeln!(
            out,
            "## Where the host's CPU goes: all three plugins\n\n\
             Per thread of the host process (run time from /proc/<pid>/task/*/schedstat; the \
             total is the process's utime+stime), grouped by name, over the run's CPU window. \
             `plugin-<name>` is a plugin's worker thread (Linux keeps 15 characters): its Wasm \
             code, the lowering of batches into it and the capability calls it blocks on (the I/O \
             of those calls is driven partly on the tokio workers). `dead-letter-pol` is the \
             dead-letter producer's delivery-report thread, `wasm-epoch` the deadline ticker: both cost \
             about the same per second whatever the load. `scripts/profile` breaks the CPU down \
             by function.\n"
        );
        groups_table(out, cpu);
        let _ = writeln!(out);
        if let Some((decoded, shared)) = three_decoded {
            let _ = writeln!(
                out,
                "Decoding shared by the three lanes (`kafka.shared_decode_bytes`, host log at \
                 its stop): {decoded} messages decoded, {shared} taken already decoded by \
                 another lane ({:.2} decodes per message of the topic).\n",
                decoded as f64 / n as f64
            );
        }
    }
    if let Some(cpu) = &noop_cpu {
        let _ = writeln!(out, "The same for the no-op plugin:\n");
        groups_table(out, cpu);
        let _ = writeln!(out);
    }
}

async fn mock_reset(stack: &Stack, ns: &str) {
    let url = format!(
        "{}/ns/{ns}/reset",
        stack.external_api_url.trim_end_matches('/')
    );
    let _ = reqwest::Client::new().post(&url).send().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Backfill, and the runs of the previous benchmark kept as they were.

async fn backfill_bench(stack: &Stack, rows: usize, report: &mut String) {
    let db = Database::create(stack, true).await;
    let pg = db.client().await;
    let t = Instant::now();
    pg.batch_execute(&format!(
        "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device)
         SELECT 1 + g % 24, g % 10000, 'play', timestamptz '2026-01-08 09:00:00+00' + (g % 3600) * interval '1 second',
                CASE WHEN g % 10 = 0 THEN NULL ELSE g % 600000 END, 'web'
         FROM generate_series(1, {rows}) g"
    ))
    .await
    .expect("fill engagement_events");
    eprintln!("bench backfill: inserted {rows} rows in {:?}", t.elapsed());
    let plugin = format!(
        "[[plugins]]\nname = \"noop\"\npath = \"{}\"\n[plugins.config]\nmode = \"noop\"\n",
        plugin_wasm("testkit").display()
    );
    let mut cfg = ConfigBuilder::new(stack, &unique("unused"), "", &db.url).plugin_raw(&plugin);
    cfg.max_events = 1000;
    let path = repo_root().join("target/test-logs/bench-backfill.toml");
    std::fs::write(&path, cfg.render()).expect("config");
    let state = std::env::temp_dir().join(unique("bench-backfill-state"));
    let started = Instant::now();
    let mut child = Command::new(host_binary())
        .args([
            "backfill",
            "--start",
            "2026-01-08T09:00:00",
            "--end",
            "2026-01-08T10:00:00",
            "--config",
        ])
        .arg(&path)
        .arg("--state-file")
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("backfill");
    let pid = child.id();
    let mut peak = 0;
    let status = loop {
        peak = peak.max(vm_hwm_kib(pid).unwrap_or(0));
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let secs = started.elapsed().as_secs_f64();
    let mut out = String::new();
    use std::io::Read;
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    assert!(status.success(), "backfill failed: {out}");
    let _ = writeln!(
        report,
        "| backfill, {rows} rows, no-op plugin (whole command: start-up, count, stream, deliver) | {:.0} rows/s ({secs:.1} s), peak RSS {} MiB; `{}` |",
        rows as f64 / secs,
        peak / 1024,
        out.trim()
    );
}

/// The commit measured: BENCH_COMMIT, else git's HEAD, marked `-dirty` when the host, the
/// plugins, the SDK or the WIT differ from it.
fn measured_commit() -> String {
    if let Ok(c) = std::env::var("BENCH_COMMIT") {
        return c;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "host",
        "plugins",
        "sdk",
        "wit",
    ])
    .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}-dirty")
    } else {
        head
    }
}

/// Hand-written notes at the end of BENCHMARKS.md, below this line, survive a rewrite.
const KEEP_MARKER: &str = "<!-- scripts/bench keeps what follows this line -->";

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let stack = Stack::get().expect("the local stack: scripts/stack up; . .stack/env");
    let n = env_usize("BENCH_EVENTS", 100_000);
    let n_mock = env_usize("BENCH_MOCK_EVENTS", 48_000);
    let mock_rounds = env_usize("BENCH_MOCK_ROUNDS", 6);
    let n_per_event = env_usize("BENCH_EVENTS_DEFAULT_PLUGINS", 10_000);
    let rows = env_usize("BACKFILL_ROWS", 300_000);
    // The content table of every live run: the seed's content 1..20, the ids the envelopes use.
    let db = Database::create(&stack, true).await;
    let mut sections = String::new();
    let mut wasm_out = String::new();
    let mut other = String::new();

    if selected("boundary") {
        boundary(&mut wasm_out).await;
    }
    if selected("capabilities") {
        capabilities::capability_overhead(&mut wasm_out).await;
    }
    if selected("mock") {
        mock_section(&stack, &db.url, n_mock, mock_rounds, &mut sections).await;
    }
    let tansu_items = [
        "bare",
        "noop",
        "clickhouse",
        "redis-topn",
        "external-api",
        "three",
        "python",
        "per-event",
        "device-counter",
        "python-device-counter",
    ];
    if tansu_items.iter().any(|i| selected(i)) {
        tansu_section(&stack, &db.url, n, n_per_event, &mut sections).await;
    }
    if selected("backfill") {
        backfill_bench(&stack, rows, &mut other).await;
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let path = repo_root().join("BENCHMARKS.md");
    let kept = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find(KEEP_MARKER).map(|i| old[i..].to_string()))
        .unwrap_or_else(|| format!("{KEEP_MARKER}\n"));
    let doc = format!(
        "# Benchmarks\n\nReproduce: `scripts/bench` (starts the stack, builds the plugins and the release \
binaries, installs the Python consumer's packages into the stack's venv, runs \
`target/release/bench`, rewrites this file above the marker at the end). Sizes: `BENCH_EVENTS={n}` \
(the tansu topic), `BENCH_MOCK_EVENTS={n_mock}` x `BENCH_MOCK_ROUNDS={mock_rounds}`, `BENCH_EVENTS_DEFAULT_PLUGINS={n_per_event}` (the \
per-event run), `BACKFILL_ROWS={rows}`. Profile: `scripts/profile`.\n\nOne run of commit {commit} on \
{cpus} cores ({cpu}), {date}, shared and noisy machine: compare ratios within the run, not absolute numbers \
across machines. Everything runs on the local stack (tansu 0.6.0 with sqlite storage, Redis 7, \
ClickHouse 18.16, the FastAPI mock, PostgreSQL), all on the same cores as the host. \"cores busy\" \
is CPU-s over the CPU window's wall time: near the number of cores means CPU-bound.\n\n\
{sections}## The Wasm boundary and capability calls\n{wasm_out}\n## Backfill\n\n| what | result |\n|---|---|\n{other}\n{kept}",
        cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        commit = measured_commit(),
    );
    if partial_run() {
        eprintln!("BENCH_ONLY is set: BENCHMARKS.md left as it is");
    } else {
        std::fs::write(&path, &doc).expect("write BENCHMARKS.md");
    }
    println!("{doc}");
}
