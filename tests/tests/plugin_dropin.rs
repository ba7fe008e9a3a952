//! Drop-in: a plugin author copies the SDK template (plugins/template), builds it on its own
//! with one cargo command, points the host config at the new .wasm, and the SAME host binary
//! (no rebuild) runs it: the plugin's metrics and logs show it received the events.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fanout_tests::*;

const WAIT: Duration = Duration::from_secs(60);

/// Copies plugins/template to `dir` as a standalone crate `dropin-sink` and builds it for
/// wasm32-wasip2. Returns the component's path.
fn build_template_copy(dir: &Path) -> std::path::PathBuf {
    let root = repo_root();
    std::fs::create_dir_all(dir.join("src")).expect("mkdir");
    std::fs::copy(
        root.join("plugins/template/src/lib.rs"),
        dir.join("src/lib.rs"),
    )
    .expect("copy template");
    // The same dependency versions as the default plugins (no registry look-up needed).
    std::fs::copy(root.join("plugins/Cargo.lock"), dir.join("Cargo.lock")).expect("copy lock");
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            r#"[package]
name = "dropin-sink"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
fanout-sdk = {{ path = "{}" }}

[workspace]

[profile.release]
opt-level = "s"
panic = "abort"
"#,
            root.join("sdk").display()
        ),
    )
    .expect("Cargo.toml");
    let target = root.join("target/dropin-target");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--target", "wasm32-wasip2", "--release"])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the template copy failed");
    let wasm = target.join("wasm32-wasip2/release/dropin_sink.wasm");
    assert!(wasm.exists(), "{} missing", wasm.display());
    wasm
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copied_template_plugin_runs_on_the_same_host_binary() {
    let Some(stack) = Stack::get() else { return };
    let host_bin = host_binary();
    let host_built = std::fs::metadata(&host_bin)
        .and_then(|m| m.modified())
        .expect("host binary");
    let wasm = build_template_copy(&repo_root().join("target/dropin/my-sink"));

    // The host checks the new component against the contract it serves.
    let check = Command::new(&host_bin)
        .args(["plugin", "check"])
        .arg(&wasm)
        .output()
        .expect("fanout plugin check");
    let text = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success() && text.contains("ok:"), "{text}");

    let events_topic = unique("events");
    let content_topic = unique("content");
    create_topic(&stack, &events_topic, 2).await;
    create_topic(&stack, &content_topic, 1).await;
    let label = unique("mysink");
    let cfg = ConfigBuilder::new(&stack, &events_topic, &content_topic, "").plugin_raw(&format!(
        r#"
[[plugins]]
name = "my-sink"
path = "{}"
[plugins.config]
label = "{label}"
"#,
        wasm.display()
    ));
    let host = HostProc::start("dropin", &cfg.render(), &cfg.metrics_addr);
    let series = "fanout_plugin_counter_total{plugin=\"my-sink\",name=\"events\"}";
    eventually(WAIT, "the host up", || async {
        (!host.metrics().await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(host.metric(series).await, 0.0);
    for id in 1..=5 {
        produce(
            &stack,
            &events_topic,
            None,
            Some(&event_envelope(id, 1, "2026-01-08T14:21:52Z")),
        )
        .await;
    }
    eventually(WAIT, "the drop-in plugin counts the 5 events", || async {
        (host.metric(series).await == 5.0).then_some(())
    })
    .await;
    let m = host.metrics().await;
    assert_eq!(
        metric_value(&m, "fanout_events_delivered_total{plugin=\"my-sink\"}"),
        5.0,
        "{m}"
    );
    eventually(WAIT, "committed", || async {
        (host
            .metric("fanout_commits_total{plugin=\"my-sink\"}")
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    // Its log lines reach the host's log, tagged with the plugin.
    let log = host.proc.log_text();
    assert!(
        log.contains(&format!("{label}: batch")),
        "plugin log line missing:\n{log}"
    );
    // No host rebuild happened.
    let after = std::fs::metadata(&host_bin)
        .and_then(|m| m.modified())
        .expect("host binary");
    assert_eq!(host_built, after, "the host binary must not change");
}

/// A plugin of the records world (`fanout:sink/sink`, what every plugin was before 0.1.2, built
/// here without the SDK) runs on this host next to a packed one: each gets every event.
#[tokio::test(flavor = "multi_thread")]
async fn a_records_world_plugin_still_runs_beside_a_packed_one() {
    let Some(stack) = Stack::get() else { return };
    let events_topic = unique("events");
    let content_topic = unique("content");
    create_topic(&stack, &events_topic, 2).await;
    create_topic(&stack, &content_topic, 1).await;
    let key = unique("compat");
    let cfg = ConfigBuilder::new(&stack, &events_topic, &content_topic, "")
        .plugin_raw(&format!(
            r#"
[[plugins]]
name = "records"
path = "{}"
[plugins.grants]
redis = {{ key_prefix = "{key}" }}
[plugins.config]
mode = "record"
key = "{key}:records"
"#,
            plugin_wasm("compat_records").display()
        ))
        .testkit("packed", "record", &format!("{key}:packed"), "fail-fast", 5);
    let host = HostProc::start("compat", &cfg.render(), &cfg.metrics_addr);
    produce_events(&stack, &events_topic, 1..=6).await;
    let conn = redis(&stack).await;
    let members = eventually(WAIT, "the records plugin takes all 6 events", || {
        let mut conn = conn.clone();
        let key = format!("{key}:records");
        async move {
            let m: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .ok()?;
            (m.len() == 6).then_some(m)
        }
    })
    .await;
    let mut ids: Vec<i64> = members
        .iter()
        .map(|m| m.split(':').next().unwrap().parse().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=6).collect::<Vec<_>>());
    let packed = eventually(WAIT, "the packed plugin takes all 6 events", || async {
        let r = recorded(&conn, &format!("{key}:packed")).await;
        (r.len() == 6).then_some(r)
    })
    .await;
    assert!(packed
        .iter()
        .all(|e| e["device"] == "web" && e["duration_ms"] == 7000));
    let log = host.proc.log_text();
    assert!(log.contains("fanout:sink/sink"), "{log}");
    assert!(log.contains("fanout:sink/packed-sink"), "{log}");
}
