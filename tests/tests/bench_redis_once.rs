//! Benchmark, not a test (ignored): what redis-topn's replay bookkeeping costs Redis. Writes
//! `FANOUT_BENCH_EVENTS` events (default 1,000,000; content ids 1..=1000, event time now) in
//! batches of 500 through the plugin, loaded in-process with the host's loader, to a fresh key
//! prefix, and prints the growth of Redis's `used_memory`, the bookkeeping keys' own memory
//! (`MEMORY USAGE`), and redis-server CPU per event (`INFO cpu`, system + user).
//!
//! ```bash
//! . .stack/env
//! # this version (exactly-once primitive: one hash per partition)
//! cargo test --release -p fanout-tests --test bench_redis_once -- --ignored --nocapture
//! # the previous one (a marker key per event), built from d0dba21 in a scratch worktree
//! FANOUT_BENCH_TOPN_WASM=/tmp/old/plugins/dist/redis_topn.wasm \
//!   cargo test --release -p fanout-tests --test bench_redis_once -- --ignored --nocapture
//! ```
//!
//! Redis is shared: run it on an otherwise idle stack, the CPU and memory figures are global.

use std::time::Instant;

use fanout::plugin::WriteOutcome;
use fanout_tests::*;

async fn info(r: &mut redis::aio::MultiplexedConnection, section: &str, field: &str) -> f64 {
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query_async(r)
        .await
        .expect("INFO");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("INFO {section} has no {field}"))
}

async fn cpu(r: &mut redis::aio::MultiplexedConnection) -> f64 {
    info(r, "cpu", "used_cpu_sys").await + info(r, "cpu", "used_cpu_user").await
}

async fn memory_usage(r: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query_async::<Option<i64>>(r)
        .await
        .expect("MEMORY USAGE")
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn redis_topn_bookkeeping_memory_and_cpu() {
    let Some(stack) = Stack::get() else { return };
    let total: i64 = std::env::var("FANOUT_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let old = std::env::var("FANOUT_BENCH_TOPN_WASM").ok();
    let p = format!("{}:", unique("bench"));
    let mut toml = plugin_toml::redis_topn("topn", &p);
    if let Some(path) = &old {
        toml = toml.replace(&plugin_wasm("redis_topn").display().to_string(), path);
    }
    let plugin = LoadedPlugin::load(&stack, &toml).await;
    let mut r = redis(&stack).await;
    let _: () = redis::cmd("MEMORY")
        .arg("PURGE")
        .query_async(&mut r)
        .await
        .unwrap_or(());
    let mem0 = info(&mut r, "memory", "used_memory").await;
    let cpu0 = cpu(&mut r).await;
    let started = Instant::now();
    let now = now_micros();
    let batch = 500;
    let mut id = 0i64;
    while id < total {
        let n = batch.min(total - id);
        let events: Vec<_> = (id + 1..=id + n)
            .map(|i| wit_event(i, Some(1 + i % 1000), now))
            .collect();
        let offsets: Vec<Option<i64>> = (id + 1..=id + n).map(Some).collect();
        let out = plugin.write_at("bench", 0, &events, &offsets).await;
        assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");
        id += n;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu1 = cpu(&mut r).await;
    let mem1 = info(&mut r, "memory", "used_memory").await;
    // The bookkeeping alone: the marks hash, or the markers (sampled: 1000 of them).
    let book = match old {
        None => memory_usage(&mut r, &format!("{p}fanout:once:marks")).await,
        Some(_) => {
            let mut sum = 0;
            for i in 1..=1000 {
                sum += memory_usage(&mut r, &format!("{p}fanout:seen:{i}")).await;
            }
            sum * total / 1000
        }
    };
    let count: i64 = redis::cmd("GET")
        .arg(format!("{p}content:count:1"))
        .query_async(&mut r)
        .await
        .expect("count");
    assert_eq!(count, total / 1000);
    println!(
        "BENCH redis-topn {}: {total} events in {secs:.1} s ({:.0} ev/s); used_memory +{:.1} MB \
         ({:.1} B/event); bookkeeping keys {} bytes; redis-server CPU {:.2} s = {:.2} us/event",
        if old.is_some() {
            "previous (seen markers)"
        } else {
            "exactly-once primitive"
        },
        total as f64 / secs,
        (mem1 - mem0) / 1e6,
        (mem1 - mem0) / total as f64,
        book,
        cpu1 - cpu0,
        (cpu1 - cpu0) * 1e6 / total as f64,
    );
    // Clean up (the markers of the previous version are 1M keys: UNLINK in slices; SCAN
    // again until a pass finds nothing, as one pass while deleting was seen to miss some).
    let mut cursor = 0u64;
    let mut found = false;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{p}*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut r)
            .await
            .expect("SCAN");
        if !keys.is_empty() {
            found = true;
            let _: i64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut r)
                .await
                .expect("UNLINK");
        }
        if next == 0 {
            if !found {
                break;
            }
            found = false;
        }
        cursor = next;
    }
}
