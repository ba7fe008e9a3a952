//! Misbehaving plugins are contained: the host survives, the other plugins keep receiving,
//! each plugin's failure policy is applied, and ungranted capabilities are refused.
//! These tests feed the events topic directly (no Debezium needed): the host only reads it.

use std::time::Duration;

use fanout_tests::*;

const WAIT: Duration = Duration::from_secs(60);

/// The events of these tests: one Debezium insert at a fixed time.
fn envelope(id: i64, content_id: i64) -> Vec<u8> {
    event_envelope(id, content_id, "2026-01-08T14:21:52Z")
}

struct Topics {
    events: String,
    content: String,
}

async fn topics(stack: &Stack) -> Topics {
    let t = Topics {
        events: unique("events"),
        content: unique("content"),
    };
    create_topic(stack, &t.events, 2).await;
    create_topic(stack, &t.content, 1).await;
    t
}

#[tokio::test(flavor = "multi_thread")]
async fn trap_loop_and_oom_plugins_are_contained() {
    let Some(stack) = Stack::get() else { return };
    let t = topics(&stack).await;
    let good = unique("good");
    let cfg = ConfigBuilder::new(&stack, &t.events, &t.content, "")
        .testkit("good", "record", &good, "fail-fast", 3)
        .testkit("trapper", "trap", &unique("trap"), "best-effort", 1)
        .testkit("looper", "loop", &unique("loop"), "best-effort", 0)
        .testkit("hog", "oom", &unique("oom"), "best-effort", 0);
    let mut host = HostProc::start("contain", &cfg.render(), &cfg.metrics_addr);
    for id in 1..=5 {
        produce(&stack, &t.events, None, Some(&envelope(id, 1))).await;
    }
    let r = redis(&stack).await;
    eventually(WAIT, "the good plugin receives all events", || async {
        (recorded(&r, &good).await.len() >= 5).then_some(())
    })
    .await;
    // Best-effort: each bad plugin's events end in the dead-letter topic, with its name.
    let letters = read_topic(&stack, &cfg.dead_letter_topic, 15, WAIT);
    for plugin in ["trapper", "looper", "hog"] {
        let mine: Vec<_> = letters
            .iter()
            .filter(|l| l.header("fanout.plugin") == Some(plugin))
            .collect();
        assert!(
            !mine.is_empty(),
            "no dead letters for {plugin}: {letters:?}"
        );
        assert!(mine
            .iter()
            .all(|l| l.header("fanout.stage") == Some("plugin")));
        assert!(
            mine.iter().all(|l| l
                .payload
                .as_deref()
                .is_some_and(|p| p.starts_with(b"{\"before\""))),
            "original bytes kept"
        );
    }
    let reasons = |p: &str| {
        letters
            .iter()
            .filter(|l| l.header("fanout.plugin") == Some(p))
            .filter_map(|l| l.header("fanout.reason").map(str::to_string))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    assert!(
        reasons("looper").contains("CPU budget"),
        "{}",
        reasons("looper")
    );
    assert!(reasons("hog").contains("memory"), "{}", reasons("hog"));
    assert!(
        reasons("trapper").contains("trapped"),
        "{}",
        reasons("trapper")
    );
    assert!(
        host.proc.is_running(),
        "the host must survive misbehaving plugins"
    );
    let m = host.metrics().await;
    assert!(
        metric_value(
            &m,
            "fanout_plugin_failures_total{kind=\"fuel\",plugin=\"looper\"}"
        ) >= 1.0
            || m.contains("plugin=\"looper\""),
        "{m}"
    );
    assert!(
        metric_value(&m, "fanout_commits_total{plugin=\"good\"}") >= 1.0,
        "the good lane goes on and commits"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_fast_plugin_stops_commits_until_it_recovers() {
    let Some(stack) = Stack::get() else { return };
    let t = topics(&stack).await;
    let key = unique("ff");
    // Answers retry-later 4 times (beyond max_retries = 1), then records.
    let cfg = ConfigBuilder::new(&stack, &t.events, &t.content, "").plugin_raw(&format!(
        r#"
[[plugins]]
name = "flaky"
path = "{}"
failure_policy = "fail-fast"
max_retries = 1
retry_backoff_ms = 300
max_backoff_ms = 300
[plugins.grants]
redis = {{ key_prefix = "{key}" }}
[plugins.config]
key = "{key}"
mode = "retry-first"
retries = 4
"#,
        plugin_wasm("testkit").display()
    ));
    let host = HostProc::start("failfast", &cfg.render(), &cfg.metrics_addr);
    produce(&stack, &t.events, None, Some(&envelope(1, 1))).await;
    // While the plugin fails, nothing is committed and health says why.
    eventually(WAIT, "unhealthy while failing", || async {
        let url = format!("http://{}/healthz", cfg.metrics_addr);
        let resp = reqwest::get(&url).await.ok()?;
        (resp.status() == 503).then_some(())
    })
    .await;
    assert_eq!(
        host.metric("fanout_commits_total{plugin=\"flaky\"}").await,
        0.0
    );
    let r = redis(&stack).await;
    eventually(WAIT, "delivered after recovery", || async {
        (recorded(&r, &key).await.len() == 1).then_some(())
    })
    .await;
    eventually(WAIT, "committed after recovery", || async {
        (host.metric("fanout_commits_total{plugin=\"flaky\"}").await >= 1.0).then_some(())
    })
    .await;
    assert!(
        read_topic(&stack, &cfg.dead_letter_topic, 1, Duration::from_secs(2)).is_empty(),
        "fail-fast never dead-letters"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ungranted_capabilities_are_refused() {
    let Some(stack) = Stack::get() else { return };
    let t = topics(&stack).await;
    let key = unique("ungranted");
    let cfg = ConfigBuilder::new(&stack, &t.events, &t.content, "").testkit(
        "nosy",
        "ungranted",
        &key,
        "fail-fast",
        1,
    );
    let _host = HostProc::start("ungranted", &cfg.render(), &cfg.metrics_addr);
    produce(&stack, &t.events, None, Some(&envelope(1, 1))).await;
    let r = redis(&stack).await;
    let items: Vec<String> = eventually(WAIT, "the plugin's report", || async {
        let mut c = r.clone();
        let v: Vec<String> = redis::cmd("LRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .ok()?;
        (!v.is_empty()).then_some(v)
    })
    .await;
    let report: serde_json::Value = serde_json::from_str(&items[0]).expect("json report");
    assert!(
        report["http"]
            .as_str()
            .is_some_and(|s| s.contains("NotGranted")),
        "{report}"
    );
    assert!(
        report["redis"]
            .as_str()
            .is_some_and(|s| s.contains("NotGranted")),
        "{report}"
    );
    let mut c = r.clone();
    let outside: Option<String> = redis::cmd("GET")
        .arg("outside:prefix")
        .query_async(&mut c)
        .await
        .unwrap_or(None);
    assert!(
        outside.is_none(),
        "the refused write must not have happened"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_rejected_events_are_dead_lettered_with_reasons() {
    let Some(stack) = Stack::get() else { return };
    let t = topics(&stack).await;
    let key = unique("rej");
    let cfg = ConfigBuilder::new(&stack, &t.events, &t.content, "").testkit(
        "picky",
        "reject-odd",
        &key,
        "fail-fast",
        1,
    );
    let host = HostProc::start("dlq", &cfg.render(), &cfg.metrics_addr);
    produce(&stack, &t.events, Some(b"k1"), Some(b"{this is not json")).await;
    produce(
        &stack,
        &t.events,
        None,
        Some(br#"{"op":"c","after":{"content_id":1}}"#),
    )
    .await;
    produce(&stack, &t.events, None, None).await; // tombstone: skipped, not dead-lettered
    produce(&stack, &t.events, None, Some(&envelope(10, 1))).await;
    produce(&stack, &t.events, None, Some(&envelope(11, 1))).await;
    let letters = read_topic(&stack, &cfg.dead_letter_topic, 3, WAIT);
    let decode: Vec<_> = letters
        .iter()
        .filter(|l| l.header("fanout.stage") == Some("decode"))
        .collect();
    assert_eq!(decode.len(), 2, "{letters:?}");
    assert!(decode.iter().any(
        |l| l.payload.as_deref() == Some(b"{this is not json".as_slice())
            && l.key.as_deref() == Some(b"k1".as_slice())
    ));
    assert!(decode
        .iter()
        .all(|l| l.header("fanout.reason").is_some_and(|r| !r.is_empty())));
    assert!(decode
        .iter()
        .any(|l| l.header("fanout.reason").is_some_and(|r| r.contains("id"))));
    // Every letter names the lane it came from; the decode ones too (each lane decodes).
    assert!(
        letters
            .iter()
            .all(|l| l.header("fanout.plugin") == Some("picky")),
        "{letters:?}"
    );
    let rejected: Vec<_> = letters
        .iter()
        .filter(|l| l.header("fanout.stage") == Some("plugin"))
        .collect();
    assert_eq!(rejected.len(), 1, "{letters:?}");
    assert!(rejected[0]
        .header("fanout.reason")
        .is_some_and(|r| r.contains("odd")));
    let r = redis(&stack).await;
    let got = recorded(&r, &key).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["event_id"], 10);
    eventually(WAIT, "dead letters counted", || async {
        let m = host.metrics().await;
        (metric_value(
            &m,
            "fanout_dead_lettered_total{stage=\"decode\",plugin=\"picky\"}",
        ) == 2.0
            && metric_value(
                &m,
                "fanout_messages_skipped_total{plugin=\"picky\",reason=\"tombstone\"}",
            ) == 1.0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_cleanly_with_exit_code_0() {
    let Some(stack) = Stack::get() else { return };
    let t = topics(&stack).await;
    let key = unique("term");
    let cfg = ConfigBuilder::new(&stack, &t.events, &t.content, "").testkit(
        "rec",
        "record",
        &key,
        "fail-fast",
        1,
    );
    let mut host = HostProc::start("sigterm", &cfg.render(), &cfg.metrics_addr);
    produce(&stack, &t.events, None, Some(&envelope(1, 1))).await;
    eventually(WAIT, "a committed batch", || async {
        (host.metric("fanout_commits_total{plugin=\"rec\"}").await >= 1.0).then_some(())
    })
    .await;
    let status = host
        .proc
        .terminate(Duration::from_secs(20))
        .expect("the host exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", host.proc.log_text());
    assert!(host.proc.log_text().contains("stopped cleanly"));
}
