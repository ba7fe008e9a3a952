//! A sink plugin written in Python (plugins/python/device_counter, built by
//! scripts/build-python-plugins with componentize-py and the Python SDK in sdk/python) runs on
//! the unchanged host: per-device counters in Redis equal the events, and a replay of the whole
//! topic (a second host in a fresh consumer group, start = earliest) counts nothing twice,
//! thanks to the SDK's exactly-once primitive (the Rust SDK's Lua script).
//! Prints the component's size and the host's start time with a cold and a warm compile cache.

use std::time::{Duration, Instant};

use fanout_tests::*;
use redis::aio::MultiplexedConnection;

/// A cold start compiles ~20 MB of CPython with Cranelift (minutes in a debug host).
const START_WAIT: Duration = Duration::from_secs(900);
const WAIT: Duration = Duration::from_secs(120);

fn plugin(prefix: &str) -> String {
    format!(
        r#"
[[plugins]]
name = "py-devices"
path = "{}"
memory_mb = 256
[plugins.grants]
redis = {{ key_prefix = "{prefix}", allow_scripts = true }}
[plugins.config]
key_prefix = "{prefix}"
"#,
        plugin_wasm("python_device_counter").display()
    )
}

/// Starts a host and waits for its "plugin loaded" line: (host, seconds, cached).
async fn start(name: &str, cfg: &ConfigBuilder) -> (HostProc, f64, bool) {
    let t = Instant::now();
    let host = HostProc::start(name, &cfg.render(), &cfg.metrics_addr);
    let line = eventually(START_WAIT, "the Python plugin loaded", || async {
        let log = host.proc.log_text();
        assert!(
            !log.contains("plugin failed") && !log.contains("Error: "),
            "the host failed to start:\n{log}"
        );
        log.lines()
            .find(|l| l.contains("plugin loaded") && l.contains("plugin=py-devices"))
            .map(str::to_owned)
    })
    .await;
    let secs = t.elapsed().as_secs_f64();
    (host, secs, line.contains("cached=true"))
}

async fn hget(r: &MultiplexedConnection, key: &str, field: &str) -> i64 {
    let mut c = r.clone();
    let v: Option<i64> = redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(&mut c)
        .await
        .unwrap_or(None);
    v.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_plugin_counts_every_event_once_across_a_replay() {
    let Some(stack) = Stack::get() else { return };
    let wasm = plugin_wasm("python_device_counter");
    let size = std::fs::metadata(&wasm).expect("wasm").len();
    let events_topic = unique("pyevents");
    let content_topic = unique("pycontent");
    create_topic(&stack, &events_topic, 2).await;
    create_topic(&stack, &content_topic, 1).await;
    let p = format!("{}:", unique("pydc"));
    let cache = repo_root().join("target/test-logs").join(unique("pycache"));
    let mut cfg =
        ConfigBuilder::new(&stack, &events_topic, &content_topic, "").plugin_raw(&plugin(&p));
    cfg.max_events = 20;
    cfg.extra = format!("\n[cache]\ndir = \"{}\"\n", cache.display());

    let (host, cold_s, cold_cached) = start("python-cold", &cfg).await;
    assert!(!cold_cached, "a fresh cache dir compiles");
    let total = 60;
    produce_events(&stack, &events_topic, 1..=total).await;
    let r = redis(&stack).await;
    let key = format!("{p}devcount:web");
    eventually(WAIT, "every event counted", || async {
        (hget(&r, &key, "play").await >= total).then_some(())
    })
    .await;
    let counted = "fanout_plugin_counter_total{plugin=\"py-devices\",name=\"events_counted\"}";
    eventually(WAIT, "committed", || async {
        (host
            .metric("fanout_commits_total{plugin=\"py-devices\"}")
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(host.metric(counted).await, total as f64);
    let log = host.proc.log_text();
    assert!(
        log.contains(&format!("device_counter: counting under {p}devcount:*")),
        "the plugin's init log line reaches the host's log:\n{log}"
    );
    drop(host);

    // The whole topic again: a fresh consumer group starts at the earliest offset.
    cfg.group_id = unique("group");
    let (host, warm_s, warm_cached) = start("python-warm", &cfg).await;
    assert!(warm_cached, "the second start uses the compiled component");
    let skipped = "fanout_plugin_counter_total{plugin=\"py-devices\",name=\"events_skipped\"}";
    eventually(WAIT, "the replay delivered", || async {
        (host.metric(skipped).await >= total as f64).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        hget(&r, &key, "play").await,
        total,
        "a replay counts nothing twice"
    );
    assert_eq!(host.metric(counted).await, 0.0);
    let mut c = r.clone();
    let marks: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{p}once:marks"))
        .query_async(&mut c)
        .await
        .expect("marks");
    assert!(
        marks.contains_key("min_live_event_id") && marks.len() <= 3,
        "{marks:?}"
    );

    let figures = format!(
        "python_device_counter.wasm: {size} bytes; host start to \"plugin loaded\": \
         cold {cold_s:.1} s, cached {warm_s:.1} s\n"
    );
    eprintln!("{figures}");
    let _ = std::fs::write(
        repo_root().join("target/test-logs/plugin_python_figures.txt"),
        figures,
    );
    let _ = std::fs::remove_dir_all(&cache);
}
