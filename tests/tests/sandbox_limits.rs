//! Time attacks against the sandbox, on the real stack: a plugin sleeping in WASI, one calling
//! a slow HTTP API in a loop, one flooding the log with 8 MiB lines, one spinning with fuel to
//! spare, and one whose `init` never returns. Each is stopped at its call's deadline and
//! classified as a timeout; its instance and thread do not outlive the call (host threads and
//! RSS come back to the baseline), no request leaves after the deadline, and a good plugin
//! beside them keeps delivering and committing.
//!
//! Memory: components with 12 memories or 100 tables (written in WAT: a Rust plugin cannot
//! have them) are refused by `fanout plugin check` and by a host at start, saying why. That
//! memories and tables share one budget at run time is a unit test of host/src/plugin/mod.rs
//! (core WAT modules under the plugin limiter); growth past the budget is `oom` in
//! plugin_containment.rs.

use std::time::{Duration, Instant};

use fanout_tests::*;

const WAIT: Duration = Duration::from_secs(90);

/// (threads, RSS KiB) of a process, from /proc.
fn threads_and_rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("Threads:"), field("VmRSS:"))
}

/// Names of the threads of a process (as the kernel keeps them: 15 bytes at most).
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    dir.filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// A `[[plugins]]` testkit entry with a 1 s call timeout and fuel to spare, best-effort;
/// `grants` are `[plugins.grants]` lines, `config` more lines of its `[plugins.config]`.
fn hostile(
    name: &str,
    mode: &str,
    key: &str,
    max_retries: u32,
    grants: &str,
    config: &str,
) -> String {
    format!(
        r#"
[[plugins]]
name = "{name}"
path = "{path}"
failure_policy = "best-effort"
max_retries = {max_retries}
retry_backoff_ms = 50
max_backoff_ms = 100
fuel_per_call = 1000000000000000
memory_mb = 48
call_timeout_ms = 1000
[plugins.grants]
{grants}
[plugins.config]
key = "{key}"
mode = "{mode}"
hold_mb = 16
{config}
"#,
        path = plugin_wasm("testkit").display()
    )
}

/// The value of `fanout_plugin_failures_total` for this plugin and kind (any label order).
fn failures(metrics: &str, plugin: &str, kind: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("fanout_plugin_failures_total{"))
        .filter(|l| l.contains(&format!("plugin=\"{plugin}\"")))
        .filter(|l| l.contains(&format!("kind=\"{kind}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn mock_stats(stack: &Stack, ns: &str) -> serde_json::Value {
    let url = format!(
        "{}/ns/{ns}/stats",
        stack.external_api_url.trim_end_matches('/')
    );
    reqwest::get(&url)
        .await
        .expect("mock stats")
        .json()
        .await
        .expect("stats json")
}

#[tokio::test(flavor = "multi_thread")]
async fn time_attacks_are_stopped_at_the_deadline() {
    let Some(stack) = Stack::get() else { return };
    let events = unique("events");
    create_topic(&stack, &events, 1).await;
    let good = unique("good");
    let ns = unique("slow");
    // Every request is held 3 s by the mock: longer than the plugin's 1 s call.
    mock_control(&stack, &ns, serde_json::json!({ "delay_ms": 3000 })).await;
    let api = stack.external_api_url.trim_end_matches('/');
    let (sleeper_retries, caller_retries) = (4, 2);
    let cfg = ConfigBuilder::new(&stack, &events, "", "")
        .testkit("good", "record", &good, "fail-fast", 3)
        .plugin_raw(&hostile(
            "sleeper",
            "wasi-sleep",
            &unique("s"),
            sleeper_retries,
            "",
            "",
        ))
        .plugin_raw(&hostile(
            "caller",
            "http-loop",
            &unique("c"),
            caller_retries,
            &format!("http = {{ url_prefixes = [\"{api}/\"] }}"),
            &format!("url = \"{api}/ns/{ns}/events\""),
        ))
        .plugin_raw(&hostile("flooder", "log-flood", &unique("f"), 1, "", ""))
        .plugin_raw(&hostile("spinner", "loop", &unique("l"), 1, "", ""));
    let mut host = HostProc::start("time-attacks", &cfg.render(), &cfg.metrics_addr);
    let pid = host.proc.child.id();
    eventually(WAIT, "every lane started", || async {
        let log = host.proc.log_text();
        (log.contains("live path started") && log.matches("lane started").count() == 5)
            .then_some(())
    })
    .await;
    // Baseline: every plugin loaded (one instance, one worker thread each), every lane's
    // consumer connected (its threads stable for 2 s), nothing delivered.
    let mut last = threads_and_rss(pid);
    let settle = Instant::now();
    let (threads0, rss0) = loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = threads_and_rss(pid);
        if now.0 == last.0 || settle.elapsed() > Duration::from_secs(30) {
            break now;
        }
        last = now;
    };
    let workers0 = thread_names(pid)
        .iter()
        .filter(|n| n.starts_with("plugin-"))
        .count();
    assert_eq!(workers0, 5, "{:?}", thread_names(pid));

    let started = Instant::now();
    produce(
        &stack,
        &events,
        None,
        Some(&event_envelope(1, 1, "2026-01-08T14:21:52Z")),
    )
    .await;
    let letters = read_topic(&stack, &cfg.dead_letter_topic, 4, WAIT);
    let gave_up = started.elapsed();
    for plugin in ["sleeper", "caller", "flooder", "spinner"] {
        let reasons: Vec<&str> = letters
            .iter()
            .filter(|l| l.header("fanout.plugin") == Some(plugin))
            .filter_map(|l| l.header("fanout.reason"))
            .collect();
        assert!(
            reasons.iter().any(|r| r.contains("did not answer within")),
            "{plugin} is classified as a timeout: {reasons:?}"
        );
    }
    let m = host.metrics().await;
    assert_eq!(
        failures(&m, "sleeper", "timeout"),
        f64::from(sleeper_retries + 1),
        "{m}"
    );
    assert_eq!(
        failures(&m, "caller", "timeout"),
        f64::from(caller_retries + 1)
    );
    assert_eq!(failures(&m, "spinner", "timeout"), 2.0, "epochs, not fuel");
    assert_eq!(failures(&m, "flooder", "timeout"), 2.0);

    // One request per call: sent, dropped at the deadline, and every later one refused.
    let sent = mock_stats(&stack, &ns).await["received"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        sent,
        u64::from(caller_retries + 1),
        "requests reaching the mock"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = mock_stats(&stack, &ns).await["received"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(later, sent, "no request leaves after a deadline");

    // No thread or instance outlives its call.
    let (threads1, rss1) = threads_and_rss(pid);
    let workers1 = thread_names(pid)
        .iter()
        .filter(|n| n.starts_with("plugin-"))
        .count();
    eprintln!(
        "{} timeouts in {gave_up:?}: threads {threads0} -> {threads1}, RSS {} -> {} MiB",
        sleeper_retries + caller_retries + 2 + 2 + 2,
        rss0 / 1024,
        rss1 / 1024
    );
    assert_eq!(
        workers1,
        5,
        "one worker per plugin: {:?}",
        thread_names(pid)
    );
    assert!(threads1 <= threads0 + 2, "threads {threads0} -> {threads1}");
    assert!(
        rss1 <= rss0 + 48 * 1024,
        "RSS {} -> {} MiB",
        rss0 / 1024,
        rss1 / 1024
    );

    // The good plugin took the event and goes on delivering, its lane committing.
    let r = redis(&stack).await;
    eventually(WAIT, "the good plugin's first event", || async {
        (!recorded(&r, &good).await.is_empty()).then_some(())
    })
    .await;
    let commits = host.metric("fanout_commits_total{plugin=\"good\"}").await;
    assert!(commits >= 1.0, "the good lane commits");
    produce_events(&stack, &events, 2..=4).await;
    eventually(WAIT, "the good plugin keeps delivering", || async {
        (recorded(&r, &good).await.len() >= 4).then_some(())
    })
    .await;
    eventually(WAIT, "the good lane's commits move", || async {
        (host.metric("fanout_commits_total{plugin=\"good\"}").await > commits).then_some(())
    })
    .await;
    assert!(host.proc.is_running());
}

/// Loads one testkit plugin in `mode` in this process: the outcome and how long it took.
async fn load(
    stack: &Stack,
    mode: &str,
) -> (
    Result<fanout::plugin::Plugin, fanout::plugin::PluginError>,
    Duration,
) {
    // One compile cache for the test's loads: the second one times init, not the compiler.
    let cache = std::env::temp_dir().join(format!("fanout-limits-{}", std::process::id()));
    let text = format!(
        "[kafka]\nbrokers = \"{}\"\n[services]\nredis_url = \"{}\"\n{}",
        stack.kafka_brokers,
        stack.redis_url,
        hostile("init", mode, &unique("i"), 0, "", "")
    );
    let config = fanout::config::Config::from_toml(
        &text,
        std::path::Path::new("test.toml"),
        std::iter::empty(),
    )
    .expect("config");
    let mut pc = config.plugins.into_iter().next().expect("one plugin");
    pc.compile_cache = Some(cache);
    let services = fanout::plugin::capabilities::Services::connect(
        &config.services,
        fanout::metrics::Metrics::default(),
    )
    .await
    .expect("services");
    let started = Instant::now();
    let loaded = tokio::task::spawn_blocking(move || {
        let engine = fanout::plugin::engine_for(std::slice::from_ref(&pc)).expect("engine");
        let linker = fanout::plugin::linker(&engine).expect("linker");
        fanout::plugin::Plugin::load(pc, &engine, linker, services)
    })
    .await
    .expect("load task");
    (loaded, started.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_init_that_never_returns_is_stopped() {
    let Some(stack) = Stack::get() else { return };
    // The first load compiles the component into the cache (seconds in a debug build); the
    // second, cached, takes init's time and little else: measure that one too.
    let (ok, _) = load(&stack, "noop").await;
    assert!(ok.is_ok());
    let (ok, compile) = load(&stack, "noop").await;
    assert!(ok.is_ok());
    let (loaded, took) = load(&stack, "init-sleep").await;
    let Err(e) = loaded else {
        panic!("init sleeps for an hour: load must fail")
    };
    assert!(e.is_setup(), "an init failure, not the batch's: {e}");
    assert!(e.to_string().contains("did not answer within"), "{e}");
    eprintln!("load of a plugin with a sleeping init: {took:?} (a good one, cached: {compile:?})");
    assert!(
        took < compile + Duration::from_secs(4),
        "stopped at the 1 s deadline: {took:?} (a good one: {compile:?})"
    );
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("fanout-limits-{}", std::process::id())),
    );
}

/// A component instantiating one core module with `items`.
fn component_wat(items: &str) -> String {
    format!("(component (core module $m {items}) (core instance (instantiate $m)))")
}

#[tokio::test(flavor = "multi_thread")]
async fn components_with_many_memories_or_tables_are_refused_at_load() {
    let Some(stack) = Stack::get() else { return };
    let dir = repo_root().join("target/test-logs");
    std::fs::create_dir_all(&dir).expect("dir");
    let memories = dir.join(format!("{}.wat", unique("memories")));
    std::fs::write(&memories, component_wat(&"(memory 1)".repeat(12))).expect("write");
    let tables = dir.join(format!("{}.wat", unique("tables")));
    std::fs::write(
        &tables,
        component_wat(&"(table 1000000 funcref)".repeat(100)),
    )
    .expect("write");
    // `fanout plugin check` says why.
    for (file, why) in [
        (
            &memories,
            "defines 12 linear memories; a plugin may have at most 2",
        ),
        (&tables, "defines 100 tables; a plugin may have at most 4"),
    ] {
        let out = std::process::Command::new(host_binary())
            .args(["plugin", "check"])
            .arg(file)
            .output()
            .expect("run fanout plugin check");
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains(why), "{text}");
    }
    // A host configured with it refuses to start, naming the plugin and the reason.
    let events = unique("events");
    let cfg = ConfigBuilder::new(&stack, &events, "", "").plugin_raw(&format!(
        "[[plugins]]\nname = \"hoarder\"\npath = \"{}\"\n",
        memories.display()
    ));
    let mut host = HostProc::start("many-memories", &cfg.render(), &cfg.metrics_addr);
    let started = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = host.proc.child.try_wait() {
            break status;
        }
        assert!(
            started.elapsed() < WAIT,
            "the host refuses the plugin and exits"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!status.success());
    let log = host.proc.log_text();
    assert!(log.contains("12 linear memories"), "{log}");
    let _ = std::fs::remove_file(&memories);
    let _ = std::fs::remove_file(&tables);
}
