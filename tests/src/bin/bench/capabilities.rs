//! Capability call overhead: the same Redis pipeline, HTTP request and ClickHouse insert made
//! by a plugin through the host (testkit's `cap-*` modes) and natively by this process with
//! the same client crates the host uses. The difference is what a call costs for being a
//! plugin's: lifting its arguments out of Wasm memory, the grant checks, the sandbox limits,
//! the worker-thread hop and lowering the answer.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fanout::plugin::{PluginBatch, WitBatch, WitEvent};
use fanout_tests::*;

const CALLS: u32 = 200;
const REDIS_COMMANDS: i64 = 500;
const CLICKHOUSE_ROWS: usize = 500;

fn event(id: i64) -> WitEvent {
    WitEvent {
        event_id: id,
        content_id: Some(1),
        user_id: None,
        event_type: None,
        event_ts_micros: 0,
        duration_ms: None,
        device: None,
        content_type: None,
        length_seconds: None,
        engagement_seconds: None,
        engagement_pct: None,
    }
}

async fn load(stack: &Stack, plugin_toml: &str) -> fanout::plugin::Plugin {
    let toml = format!(
        "[kafka]\nbrokers = \"{}\"\n[services]\nredis_url = \"{}\"\nclickhouse_url = \"{}\"\n{}\n{plugin_toml}",
        stack.kafka_brokers,
        stack.redis_url,
        stack.clickhouse_url,
        stack.clickhouse_admin.services_toml(),
    );
    let cfg = fanout::config::Config::from_toml(
        &toml,
        std::path::Path::new("bench.toml"),
        std::iter::empty(),
    )
    .expect("config");
    let services = fanout::plugin::capabilities::Services::connect(
        &cfg.services,
        fanout::metrics::Metrics::default(),
    )
    .await
    .expect("services");
    let engine = fanout::plugin::engine_for(&cfg.plugins).expect("engine");
    let linker = fanout::plugin::linker(&engine).expect("linker");
    let pc = cfg.plugins[0].clone();
    tokio::task::spawn_blocking(move || fanout::plugin::Plugin::load(pc, &engine, linker, services))
        .await
        .expect("join")
        .expect("load")
}

/// Mean time of one plugin call with `batch`, after a warm-up.
async fn plugin_call(plugin: &fanout::plugin::Plugin, batch: &Arc<PluginBatch>) -> Duration {
    for _ in 0..10 {
        let out = plugin.write(batch.clone()).await.expect("warm-up");
        assert!(
            matches!(out, fanout::plugin::WriteOutcome::Accepted),
            "{out:?}"
        );
    }
    let t = Instant::now();
    for _ in 0..CALLS {
        plugin.write(batch.clone()).await.expect("call");
    }
    t.elapsed() / CALLS
}

async fn timed<F, Fut>(mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..10 {
        f().await;
    }
    let t = Instant::now();
    for _ in 0..CALLS {
        f().await;
    }
    t.elapsed() / CALLS
}

pub async fn capability_overhead(report: &mut String) {
    let stack = Stack::get().expect("stack");
    let testkit = plugin_wasm("testkit");
    let mut rows: Vec<(&str, Duration, Duration)> = Vec::new();

    // Redis: a pipeline of 500 SETs.
    let prefix = unique("bench-cap");
    let plugin = load(
        &stack,
        &format!(
            "[[plugins]]\nname = \"cap\"\npath = \"{}\"\n[plugins.grants]\nredis = {{ key_prefix = \"{prefix}\" }}\n[plugins.config]\nmode = \"cap-redis\"\nkey = \"{prefix}:p\"\n",
            testkit.display()
        ),
    )
    .await;
    let batch = Arc::new(PluginBatch::unpositioned(WitBatch {
        id: "cap".into(),
        events: (1..=REDIS_COMMANDS).map(event).collect(),
        sources: vec![],
    }));
    let via_plugin = plugin_call(&plugin, &batch).await;
    let conn = redis(&stack).await;
    let native = timed(|| {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move {
            let mut pipe = redis::pipe();
            for id in 1..=REDIS_COMMANDS {
                pipe.cmd("SET")
                    .arg(format!("{prefix}:n:{id}"))
                    .arg("x")
                    .ignore();
            }
            let _: () = pipe.query_async(&mut conn).await.expect("native pipeline");
        }
    })
    .await;
    rows.push(("Redis pipeline of 500 SET", via_plugin, native));

    // HTTP: one POST of a 16 KiB JSON body to the mock API.
    let url = format!(
        "{}/ns/{}/events",
        stack.external_api_url.trim_end_matches('/'),
        unique("bench-cap")
    );
    let body = format!("[{{\"pad\":\"{}\"}}]", "x".repeat(16 * 1024));
    let plugin = load(
        &stack,
        &format!(
            "[[plugins]]\nname = \"cap\"\npath = \"{}\"\n[plugins.grants]\nhttp = {{ url_prefixes = [\"{url}\"] }}\n[plugins.config]\nmode = \"cap-http\"\nurl = \"{url}\"\nbody = '{body}'\n",
            testkit.display()
        ),
    )
    .await;
    let one = Arc::new(PluginBatch::unpositioned(WitBatch {
        id: "cap".into(),
        events: vec![event(1)],
        sources: vec![],
    }));
    let via_plugin = plugin_call(&plugin, &one).await;
    let client = reqwest::Client::new();
    let native = timed(|| {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        async move {
            let r = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("native POST");
            assert!(r.status().is_success());
            let _ = r.bytes().await;
        }
    })
    .await;
    rows.push((
        "HTTP POST, 16 KiB body, to the mock API",
        via_plugin,
        native,
    ));

    // ClickHouse: one JSONEachRow insert of 500 rows.
    let db = unique("bench_cap").replace('-', "_");
    clickhouse_query(&stack, &format!("CREATE DATABASE {db}")).await;
    clickhouse_query(
        &stack,
        &format!("CREATE TABLE {db}.t (id UInt64, s String) ENGINE = MergeTree() ORDER BY id"),
    )
    .await;
    let json_rows: Vec<String> = (0..CLICKHOUSE_ROWS)
        .map(|i| format!("{{\"id\":{i},\"s\":\"row {i} of the capability benchmark\"}}"))
        .collect();
    let rows_toml = json_rows
        .iter()
        .map(|r| format!("'{r}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let plugin = load(
        &stack,
        &format!(
            "[[plugins]]\nname = \"cap\"\npath = \"{}\"\n[plugins.grants]\nclickhouse = {{ databases = [\"{db}\"] }}\n[plugins.config]\nmode = \"cap-clickhouse\"\ninserts = [[\"{db}\", \"t\"]]\nrows = [{rows_toml}]\n",
            testkit.display()
        ),
    )
    .await;
    let via_plugin = plugin_call(&plugin, &one).await;
    let insert_url = format!(
        "{}/?query={}",
        stack.clickhouse_url.trim_end_matches('/'),
        urlencode(&format!("INSERT INTO {db}.t FORMAT JSONEachRow"))
    );
    let body = json_rows.join("\n");
    let admin = stack.clickhouse_admin.clone();
    let native = timed(|| {
        let (client, url, body, admin) = (
            client.clone(),
            insert_url.clone(),
            body.clone(),
            admin.clone(),
        );
        async move {
            let r = client
                .post(&url)
                .header("X-ClickHouse-User", &admin.user)
                .header("X-ClickHouse-Key", &admin.password)
                .body(body)
                .send()
                .await
                .expect("native insert");
            assert!(r.status().is_success(), "{:?}", r.text().await);
        }
    })
    .await;
    rows.push((
        "ClickHouse insert of 500 JSON rows (native: reqwest POST)",
        via_plugin,
        native,
    ));
    // The host made its inserts with the `clickhouse` crate until it switched to the plain POST
    // above: that call natively, for reference.
    let ch = clickhouse::Client::default()
        .with_url(&stack.clickhouse_url)
        .with_user(&admin.user)
        .with_password(&admin.password)
        .with_compression(clickhouse::Compression::None);
    let native_crate = timed(|| {
        let (ch, body) = (ch.clone(), bytes::Bytes::from(json_rows.join("\n") + "\n"));
        let sql = format!("INSERT INTO `{db}`.`t` FORMAT JSONEachRow");
        async move {
            let mut insert = ch.insert_formatted_with(sql);
            insert.send(body).await.expect("crate insert");
            insert.end().await.expect("crate insert end");
        }
    })
    .await;
    rows.push((
        "ClickHouse insert of 500 JSON rows (native: clickhouse crate, the host's way before)",
        via_plugin,
        native_crate,
    ));
    clickhouse_query(&stack, &format!("DROP DATABASE {db}")).await;

    let _ = writeln!(
        report,
        "\n### Capability calls: from a plugin through the host against the same call made natively\n\n\
         | call | from a plugin | native (same client crates) | host's own overhead per call |\n|---|---|---|---|"
    );
    for (what, p, n) in rows {
        let _ = writeln!(
            report,
            "| {what} | {:.0} µs | {:.0} µs | {:.0} µs |",
            p.as_secs_f64() * 1e6,
            n.as_secs_f64() * 1e6,
            (p.as_secs_f64() - n.as_secs_f64()) * 1e6
        );
    }
    let _ = writeln!(
        report,
        "\nThe plugin's figure includes its whole call: worker-thread hop, lowering a 1-event batch \
         (500 events for Redis, which also builds the 500 commands in Wasm), and the answer."
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
