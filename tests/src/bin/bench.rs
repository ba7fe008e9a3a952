//! `scripts/bench` runs this (release build) against the local stack and writes BENCHMARKS.md.
//!
//! 1. Wasm boundary: the same 500-event batch handed to a no-op Wasm plugin and to a native
//!    no-op sink, in one process, one run.
//! 2. Host throughput: a topic pre-filled with Debezium envelopes, drained by the host binary
//!    with one no-op plugin, then with the three default plugins.
//! 3. Backfill: rows/s over a table of BACKFILL_ROWS rows, and the process's peak memory.

use std::fmt::Write as _;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fanout::plugin::{PluginBatch, WitBatch, WitEvent};
use fanout_tests::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

/// Peak resident memory (VmHWM, KiB) of a running process.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn boundary(report: &mut String) {
    let stack = Stack::get().expect("stack");
    let toml = format!(
        r#"
[kafka]
brokers = "{}"
[services]
redis_url = "{}"
[[plugins]]
name = "noop"
path = "{}"
[plugins.config]
mode = "noop"
"#,
        stack.kafka_brokers,
        stack.redis_url,
        plugin_wasm("testkit").display()
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
    let engine = fanout::plugin::engine().expect("engine");
    let linker = fanout::plugin::linker(&engine).expect("linker");
    let pc = cfg.plugins[0].clone();
    let plugin = tokio::task::spawn_blocking(move || {
        fanout::plugin::Plugin::load(pc, &engine, linker, services)
    })
    .await
    .expect("join")
    .expect("load");
    let batch = Arc::new(PluginBatch::unpositioned(WitBatch {
        id: "bench".into(),
        events: (0..500).map(event).collect(),
        sources: vec![],
    }));
    let rounds = 400;
    for _ in 0..20 {
        plugin.write(batch.clone()).await.expect("warm-up");
    }
    let t = Instant::now();
    for _ in 0..rounds {
        plugin.write(batch.clone()).await.expect("write");
    }
    let wasm = t.elapsed();
    // The native no-op sink receives the same batch through the same channel-free call path a
    // built-in sink would: a function over the batch.
    fn native_noop(batch: &WitBatch) -> usize {
        batch
            .events
            .iter()
            .map(|e| std::hint::black_box(e).event_id as usize)
            .sum()
    }
    let t = Instant::now();
    let mut sink = 0usize;
    for _ in 0..rounds {
        sink = sink.wrapping_add(native_noop(std::hint::black_box(&batch.wit)));
    }
    std::hint::black_box(sink);
    let native = t.elapsed();
    let events = (rounds * batch.wit.events.len()) as f64;
    let wasm_ns = wasm.as_nanos() as f64 / events;
    let native_ns = native.as_nanos() as f64 / events;
    let _ = writeln!(
        report,
        "| Wasm boundary: 500-event batch to a no-op Wasm plugin | {wasm_ns:.0} ns/event ({:.0} µs/batch) |\n\
         | same batch to a native no-op sink, same run | {native_ns:.1} ns/event |\n\
         | ratio Wasm / native | {:.0}x |",
        wasm.as_micros() as f64 / rounds as f64,
        wasm_ns / native_ns.max(0.001)
    );
}

async fn prefill(stack: &Stack, topic: &str, n: usize) -> Duration {
    create_topic(stack, topic, 4).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
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
            use futures::StreamExt;
            while let Some(r) = pending.next().await {
                r.expect("produce");
            }
        }
    }
    use futures::StreamExt;
    while let Some(r) = pending.next().await {
        r.expect("produce");
    }
    t.elapsed()
}

/// Runs the host binary on a pre-filled topic until every event is delivered to every plugin.
async fn drain(
    stack: &Stack,
    name: &str,
    n: usize,
    plugins_toml: &str,
    plugins: &[&str],
) -> (f64, u64) {
    let topic = unique(&format!("bench_{name}"));
    let fill = prefill(stack, &topic, n).await;
    eprintln!("bench {name}: pre-filled {n} events in {fill:?}");
    let cfg = ConfigBuilder::new(stack, &topic, "", "").plugin_raw(plugins_toml);
    let host = HostProc::start(&format!("bench-{name}"), &cfg.render(), &cfg.metrics_addr);
    let pid = host.proc.child.id();
    let bin_started = Instant::now();
    // Time from the first delivered batch, so plugin compilation at start is not counted.
    let mut first: Option<Instant> = None;
    let mut peak = 0;
    loop {
        let m = host.metrics().await;
        peak = peak.max(vm_hwm_kib(pid).unwrap_or(0));
        let delivered = plugins
            .iter()
            .map(|p| {
                metric_value(
                    &m,
                    &format!("fanout_events_delivered_total{{plugin=\"{p}\"}}"),
                ) as usize
            })
            .min()
            .unwrap_or(0);
        if delivered > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if delivered >= n {
            break;
        }
        assert!(
            bin_started.elapsed() < Duration::from_secs(1800),
            "bench {name} took too long"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = first.map(|t| t.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
    ((n as f64) / secs, peak)
}

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
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
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

/// The three default plugins together, the external API in `mode` ("per-event" or "batch").
async fn three_plugins(stack: &Stack, n3: usize, mode: &str, report: &mut String) {
    let ch_db = unique("bench");
    let prefix = format!("{}:", unique("bench"));
    let ns = unique("bench");
    let three = plugin_toml::defaults(stack, &ch_db, &prefix, &ns, mode);
    let (rate3, peak3) = drain(
        stack,
        &format!("three-{mode}"),
        n3,
        &three,
        &["clickhouse", "redis-topn", "external-api"],
    )
    .await;
    let _ = writeln!(
        report,
        "| host + the three default plugins (ClickHouse, Redis top-N, external API `{mode}` to the mock), {n3} events | {rate3:.0} events/s, peak RSS {} MiB |",
        peak3 / 1024
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let stack = Stack::get().expect("the local stack: scripts/stack up; . .stack/env");
    let n = env_usize("BENCH_EVENTS", 100_000);
    let n3 = env_usize("BENCH_EVENTS_DEFAULT_PLUGINS", 10_000);
    let rows = env_usize("BACKFILL_ROWS", 1_000_000);
    let mut report = String::new();

    boundary(&mut report).await;

    let noop = format!(
        "[[plugins]]\nname = \"noop\"\npath = \"{}\"\n[plugins.config]\nmode = \"noop\"\n",
        plugin_wasm("testkit").display()
    );
    let (rate, peak) = drain(&stack, "noop", n, &noop, &["noop"]).await;
    let _ = writeln!(report, "| host + one no-op plugin, {n} events from a pre-filled topic (4 partitions) | {rate:.0} events/s, peak RSS {} MiB |", peak / 1024);

    for mode in ["per-event", "batch"] {
        three_plugins(&stack, n3, mode, &mut report).await;
    }

    backfill_bench(&stack, rows, &mut report).await;

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let doc = format!(
        "# Benchmarks\n\nReproduce: `scripts/bench` (starts the stack, builds release binaries, runs \
`cargo run --release -p fanout-tests --bin bench`, rewrites this file). Sizes: `BENCH_EVENTS`, \
`BENCH_EVENTS_DEFAULT_PLUGINS`, `BACKFILL_ROWS`.\n\nOne run on {cpus} cores ({cpu}), {date}, shared \
and noisy machine: compare ratios within the run, not absolute numbers across machines. \
Everything runs on the local stack (tansu 0.6.0 with sqlite storage, Redis 7, ClickHouse 18.16, \
the FastAPI mock), all on the same two cores as the host.\n\n| what | result |\n|---|---|\n{report}",
        cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
    );
    std::fs::write(repo_root().join("BENCHMARKS.md"), &doc).expect("write BENCHMARKS.md");
    println!("{doc}");
}
