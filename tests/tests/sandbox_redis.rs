//! Issue 9, Redis: a hostile plugin granted scripts is held to its key prefix by Redis itself
//! (the plugin's ACL user), not only by the host's check. Against the stack's Redis: keys
//! outside its prefix stay as they were, FLUSHALL / CONFIG / KEYS / ACL are refused, a
//! busy-looping script is killed within a bounded time and Redis answers again, and the
//! default redis-topn plugin beside it keeps delivering with its lane committing.

use std::time::{Duration, Instant};

use fanout_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

async fn commits(host: &HostProc) -> f64 {
    host.metric("fanout_commits_total{plugin=\"redis-topn\"}")
        .await
}

async fn get(r: &redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    let mut c = r.clone();
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap_or(None)
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_scripts_are_contained_by_redis_acl() {
    let Some(stack) = Stack::get() else { return };
    let events = unique("events");
    let content = unique("content");
    create_topic(&stack, &events, 2).await;
    create_topic(&stack, &content, 1).await;

    let r = redis(&stack).await;
    let mut admin = r.clone();
    // The sentinels: one the plugin tries to overwrite, the database it tries to flush.
    let sentinel = unique("sentinel");
    let _: () = redis::cmd("SET")
        .arg(&sentinel)
        .arg("keep")
        .query_async(&mut admin)
        .await
        .expect("plant the sentinel");
    let maxmemory: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .query_async(&mut admin)
        .await
        .expect("CONFIG GET");

    let key = unique("hostile");
    let topn = format!("{}:", unique("topn"));
    let cfg = ConfigBuilder::new(&stack, &events, &content, "")
        .plugin_raw(&format!(
            r#"
[[plugins]]
name = "hostile"
path = "{path}"
failure_policy = "best-effort"
max_retries = 0
call_timeout_ms = 30000
[plugins.grants]
redis = {{ key_prefix = "{key}", allow_scripts = true, timeout_ms = 1000 }}
[plugins.config]
key = "{key}"
mode = "redis-hostile"
outside = "{sentinel}"
"#,
            path = plugin_wasm("testkit").display()
        ))
        .redis_topn(&topn);
    let host = HostProc::start("sandbox-redis", &cfg.render(), &cfg.metrics_addr);

    produce(
        &stack,
        &events,
        None,
        Some(&event_envelope(1, 7, "2026-01-08T14:21:52Z")),
    )
    .await;
    let started = Instant::now();
    let reports: Vec<Value> = eventually(WAIT, "the hostile plugin's reports", || async {
        let got = recorded(&r, &key).await;
        (got.len() >= 11).then_some(got)
    })
    .await;
    let by_name = |name: &str| -> Value {
        reports
            .iter()
            .find(|v| v["attempt"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no report of {name}: {reports:?}"))
    };
    let log = || host.proc.log_text();

    // Refused by Redis: the host cannot see keys a script computes, the ACL user can.
    for attempt in [
        "script-set-outside",
        "script-del-outside",
        "script-flushall",
        "script-config-set",
        "script-keys",
        "script-acl",
    ] {
        let rep = by_name(attempt);
        let error = rep["error"].as_str().unwrap_or_default();
        assert!(
            rep["ok"].is_null() && error.contains("Failed("),
            "{attempt} must be refused by Redis: {rep}"
        );
        assert!(
            error.contains("can't access")
                || error.contains("can't run")
                || error.contains("not allowed from script")
                || error.contains("NOPERM"),
            "{attempt}: refused for its permissions: {rep}"
        );
    }
    // Refused by the host's check, before Redis sees them.
    for attempt in ["declared-key-outside", "flushall", "config-set"] {
        let rep = by_name(attempt);
        assert!(
            rep["error"]
                .as_str()
                .is_some_and(|e| e.contains("NotGranted(")),
            "{attempt}: {rep}"
        );
    }
    // A reply past max_reply_bytes never reaches the plugin.
    let big = by_name("big-reply");
    assert!(
        big["error"]
            .as_str()
            .is_some_and(|e| e.contains("max_reply_bytes")),
        "{big}"
    );
    // The busy script: the call ends at the grant's timeout, the script is killed (Redis
    // takes SCRIPT KILL once the script has run busy-reply-threshold, 5 s by default).
    let busy = by_name("busy-script");
    let error = busy["error"].as_str().unwrap_or_default();
    assert!(error.contains("killed"), "busy script killed: {busy}");
    let ms = busy["ms"].as_i64().unwrap_or(i64::MAX);
    assert!(ms < 15_000, "killed within a bounded time: {busy}");
    let mut c = r.clone();
    let pong: String = redis::cmd("PING")
        .query_async(&mut c)
        .await
        .expect("Redis answers after the kill");
    assert_eq!(pong, "PONG");

    // Nothing outside the prefix changed.
    assert_eq!(
        get(&r, &sentinel).await.as_deref(),
        Some("keep"),
        "{}",
        log()
    );
    let after: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .query_async(&mut c)
        .await
        .expect("CONFIG GET");
    assert_eq!(after, maxmemory, "CONFIG SET refused");
    let users: Vec<String> = redis::cmd("ACL")
        .arg("USERS")
        .query_async(&mut c)
        .await
        .expect("ACL USERS");
    assert!(!users.iter().any(|u| u == "evil"), "ACL SETUSER refused");
    // The plugin's user is what its grant says and nothing more.
    let acl: Vec<String> = redis::cmd("ACL")
        .arg("LIST")
        .query_async(&mut c)
        .await
        .expect("ACL LIST");
    let mine = acl
        .iter()
        .find(|l| l.starts_with("user fanout-plugin-hostile-") && l.contains(&format!("~{key}*")))
        .unwrap_or_else(|| panic!("the hostile plugin's ACL user: {acl:?}"));
    assert!(
        mine.contains("-@all") && !mine.contains("+@all") && !mine.contains("~* "),
        "{mine}"
    );
    let user = mine.split(' ').nth(1).unwrap_or_default();
    for cmd in [
        vec!["FLUSHALL"],
        vec!["CONFIG", "SET", "maxmemory", "1"],
        vec!["KEYS", "*"],
        vec!["SET", sentinel.as_str(), "x"],
    ] {
        let verdict: String = redis::cmd("ACL")
            .arg("DRYRUN")
            .arg(user)
            .arg(&cmd)
            .query_async(&mut c)
            .await
            .expect("ACL DRYRUN");
        assert_ne!(verdict, "OK", "{user} may run {cmd:?}");
    }

    // The default plugin beside it keeps delivering, and its lane commits.
    let count_key = format!("{topn}content:count:7");
    eventually(WAIT, "redis-topn counts event 1", || async {
        (get(&r, &count_key).await.as_deref() == Some("1")).then_some(())
    })
    .await;
    eventually(WAIT, "redis-topn commits", || async {
        (commits(&host).await >= 1.0).then_some(())
    })
    .await;
    // A restarted Redis has lost the users (they live in memory): deleting redis-topn's user
    // (which also drops its connection) must not stop it; the host sets the user up again.
    let acl: Vec<String> = redis::cmd("ACL")
        .arg("LIST")
        .query_async(&mut c)
        .await
        .expect("ACL LIST");
    let topn_user = acl
        .iter()
        .find(|l| l.starts_with("user fanout-plugin-redis-topn-") && l.contains(&topn))
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_else(|| panic!("redis-topn's ACL user: {acl:?}"))
        .to_string();
    let _: i64 = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&topn_user)
        .query_async(&mut c)
        .await
        .expect("ACL DELUSER");
    let before = commits(&host).await;
    for id in 2..=4 {
        produce(
            &stack,
            &events,
            None,
            Some(&event_envelope(id, 7, "2026-01-08T14:21:53Z")),
        )
        .await;
    }
    eventually(WAIT, "redis-topn counts events 2-4", || async {
        (get(&r, &count_key).await.as_deref() == Some("4")).then_some(())
    })
    .await;
    eventually(WAIT, "redis-topn's commits move on", || async {
        (commits(&host).await > before).then_some(())
    })
    .await;
    assert!(
        host.metric("fanout_redis_scripts_killed_total{plugin=\"hostile\"}")
            .await
            >= 1.0,
        "the kill is counted"
    );
    assert_eq!(get(&r, &sentinel).await.as_deref(), Some("keep"));
    eprintln!(
        "sandbox_redis: contained in {:?}; busy script ended after {ms} ms",
        started.elapsed()
    );
    let _: () = redis::cmd("DEL")
        .arg(&sentinel)
        .query_async(&mut c)
        .await
        .unwrap_or(());
}

/// `services.redis_users = "provided"`: the host connects as the operator's user and makes
/// none of its own; a wrong password is a failed call, not a fallback to the admin connection.
#[tokio::test(flavor = "multi_thread")]
async fn operator_provided_users_are_used_as_given() {
    let Some(stack) = Stack::get() else { return };
    let key = unique("provided");
    let user = unique("fanout-test-provided");
    let password = unique("pw");
    let r = redis(&stack).await;
    let mut c = r.clone();
    // The operator's user: RPUSH on the plugin's list, nothing else.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg(format!("~{key}*"))
        .arg("-@all")
        .arg("+rpush")
        .query_async(&mut c)
        .await
        .expect("ACL SETUSER");
    let toml = |pw: &str| {
        format!(
            r#"
[[plugins]]
name = "provided"
path = "{path}"
[plugins.grants]
redis = {{ key_prefix = "{key}", user = "{user}", password = "{pw}" }}
[plugins.config]
key = "{key}"
mode = "record"
"#,
            path = plugin_wasm("testkit").display()
        )
    };
    let provided = "redis_users = \"provided\"";
    let plugin =
        LoadedPlugin::load_with(&stack, &toml(&password), &stack.clickhouse_admin, provided).await;
    let out = plugin
        .write("b1", &[wit_event(1, Some(7), now_micros())])
        .await;
    assert!(
        matches!(out, fanout::plugin::WriteOutcome::Accepted),
        "{out:?}"
    );
    assert_eq!(recorded(&r, &key).await.len(), 1);
    let users: Vec<String> = redis::cmd("ACL")
        .arg("USERS")
        .query_async(&mut c)
        .await
        .expect("ACL USERS");
    assert!(
        !users
            .iter()
            .any(|u| u.starts_with("fanout-plugin-provided-")),
        "the host made no user: {users:?}"
    );
    let wrong =
        LoadedPlugin::load_with(&stack, &toml("wrong"), &stack.clickhouse_admin, provided).await;
    let out = wrong
        .write("b2", &[wit_event(2, Some(7), now_micros())])
        .await;
    assert!(
        matches!(out, fanout::plugin::WriteOutcome::RetryLater(_)),
        "{out:?}"
    );
    assert_eq!(recorded(&r, &key).await.len(), 1, "nothing written");
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut c)
        .await
        .map(|_: i64| ())
        .unwrap_or(());
}
