//! The clickhouse plugin (plugins/dist/clickhouse.wasm) against the stack's ClickHouse, driven
//! in-process through the host's plugin loader: values and NULLs as SPEC 4/5A say, one row per
//! event_id under replays, and the SPEC's query answering the right averages.
//! Each test has its own ClickHouse database (the plugin's `database` config and grant).

use fanout::plugin::{WitEvent, WriteOutcome};
use fanout_tests::*;
use serde_json::{json, Value};

/// 2026-01-08 14:21:52 UTC, the SPEC example's event time.
const SPEC_TS: i64 = 1_767_882_112_000_000;

async fn load(stack: &Stack, db: &str) -> LoadedPlugin {
    // The test creates its database as the admin; the host connects as the admin too, since
    // the stack's host user `fanout` may only use a fixed list of databases (18.16).
    clickhouse_query(stack, &format!("CREATE DATABASE IF NOT EXISTS {db}")).await;
    LoadedPlugin::load(stack, &plugin_toml::clickhouse("ch", db)).await
}

fn ev(
    id: i64,
    content: Option<i64>,
    duration_ms: Option<i32>,
    length: Option<i32>,
    pct: Option<f64>,
) -> WitEvent {
    let mut e = wit_event(id, content, SPEC_TS + id * 1_000_000);
    e.duration_ms = duration_ms;
    e.engagement_seconds = duration_ms.map(|d| f64::from(d) / 1000.0);
    e.length_seconds = length;
    e.engagement_pct = pct;
    e
}

struct DropDb<'a>(&'a Stack, String);
impl Drop for DropDb<'_> {
    fn drop(&mut self) {
        let (url, db) = (self.0.clickhouse_url.clone(), self.1.clone());
        let admin = self.0.clickhouse_admin.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(
                reqwest::Client::new()
                    .post(url)
                    .basic_auth(admin.user, Some(admin.password))
                    .body(format!("DROP DATABASE IF EXISTS {db}"))
                    .send(),
            )
            .ok()
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_hold_spec_values_and_nulls() {
    let Some(stack) = Stack::get() else { return };
    let db = unique("ch");
    let _cleanup = DropDb(&stack, db.clone());
    let plugin = load(&stack, &db).await;

    // The SPEC example, exactly.
    let mut spec = wit_event(16, Some(1), SPEC_TS);
    spec.event_ts_micros += 250_000; // a fraction of a second is dropped, not rounded up
    let mut unknown = ev(17, Some(424_242), Some(5000), None, None);
    unknown.content_type = None;
    let no_duration = ev(18, Some(1), None, Some(300), None);
    let zero_length = ev(19, Some(5), Some(5000), Some(0), None);
    let mut no_content = ev(20, None, Some(1000), None, None);
    no_content.content_type = None;
    no_content.device = None;
    no_content.user_id = None;
    no_content.event_type = None;
    let batch = vec![spec, unknown, no_duration, zero_length, no_content];
    let out = plugin.write("t/0:0-4", &batch).await;
    assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");

    let rows = clickhouse_rows(
        &stack,
        &format!("SELECT * FROM {db}.events_enriched ORDER BY event_id"),
    )
    .await;
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert_eq!(
        rows[0],
        json!({"event_id": 16, "content_id": 1, "user_id": 999, "event_type": "play",
               "event_ts": "2026-01-08 14:21:52", "duration_ms": 7000, "device": "web",
               "content_type": "video", "length_seconds": 300, "engagement_seconds": 7,
               "engagement_pct": 0.02}),
        "the SPEC example row"
    );
    // Unknown content: content fields and pct are NULL, the event is still stored.
    assert_eq!(rows[1]["content_id"], 424_242);
    assert!(
        rows[1]["content_type"].is_null() && rows[1]["length_seconds"].is_null(),
        "{}",
        rows[1]
    );
    assert!(rows[1]["engagement_pct"].is_null());
    assert_eq!(rows[1]["engagement_seconds"], 5);
    // NULL duration: seconds and pct NULL.
    assert!(
        rows[2]["duration_ms"].is_null()
            && rows[2]["engagement_seconds"].is_null()
            && rows[2]["engagement_pct"].is_null(),
        "{}",
        rows[2]
    );
    // length 0: pct NULL, not inf.
    assert_eq!(rows[3]["length_seconds"], 0);
    assert!(rows[3]["engagement_pct"].is_null(), "{}", rows[3]);
    // Every nullable column really holds NULL (not '' or 0).
    assert!(
        [
            "content_id",
            "user_id",
            "event_type",
            "device",
            "content_type",
            "length_seconds",
            "engagement_pct"
        ]
        .iter()
        .all(|c| rows[4][*c].is_null()),
        "{}",
        rows[4]
    );
    let nulls = clickhouse_query(
        &stack,
        &format!("SELECT countIf(isNull(engagement_pct)), countIf(isNull(content_id)), countIf(isNull(content_type)) FROM {db}.events_enriched"),
    )
    .await;
    assert_eq!(nulls.trim(), "4\t1\t2");
    // The columns are Nullable, so NULLs survive: the DDL keeps them.
    let types = clickhouse_query(&stack, &format!("SELECT name, type FROM system.columns WHERE database = '{db}' AND table = 'events_enriched' FORMAT TabSeparated")).await;
    assert!(
        types.contains("engagement_pct\tNullable(Float64)") && types.contains("event_id\tInt64"),
        "{types}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replays_leave_one_row_per_event_and_spec_query_averages() {
    let Some(stack) = Stack::get() else { return };
    let db = unique("ch");
    let _cleanup = DropDb(&stack, db.clone());
    let plugin = load(&stack, &db).await;

    // content 1: 0.02, 0.5, NULL -> avg 0.26; content 3: 0.13, 0.25 -> 0.19; content 9: NULL only.
    let first = vec![
        ev(1, Some(1), Some(6000), Some(300), Some(0.02)),
        ev(2, Some(1), Some(150_000), Some(300), Some(0.5)),
        ev(3, Some(1), None, Some(300), None),
        ev(4, Some(3), Some(15_600), Some(120), Some(0.13)),
    ];
    assert!(matches!(
        plugin.write("t/0:0-3", &first).await,
        WriteOutcome::Accepted
    ));
    // The same batch again (a replay after a crash), then one overlapping the first with a new
    // event and a duplicate inside the batch.
    assert!(matches!(
        plugin.write("t/0:0-3", &first).await,
        WriteOutcome::Accepted
    ));
    let second = vec![
        ev(3, Some(1), None, Some(300), None),
        ev(4, Some(3), Some(15_600), Some(120), Some(0.13)),
        ev(5, Some(3), Some(30_000), Some(120), Some(0.25)),
        ev(5, Some(3), Some(30_000), Some(120), Some(0.25)),
        ev(6, Some(9), None, None, None),
    ];
    assert!(matches!(
        plugin.write("t/0:2-6", &second).await,
        WriteOutcome::Accepted
    ));
    assert_eq!(plugin.counter("rows_inserted"), 6.0);
    assert!(
        plugin.counter("rows_skipped_duplicate") >= 7.0,
        "{}",
        plugin.counter("rows_skipped_duplicate")
    );

    // One row per event_id in the plain table, no FINAL needed.
    let counts = clickhouse_query(
        &stack,
        &format!("SELECT count(), uniqExact(event_id) FROM {db}.events_enriched"),
    )
    .await;
    assert_eq!(counts.trim(), "6\t6");

    // The SPEC's query, exactly in its documented form.
    let rows = clickhouse_rows(
        &stack,
        &format!(
            "SELECT content_id, avg(engagement_pct) FROM {db}.events_enriched GROUP BY content_id"
        ),
    )
    .await;
    let avg: std::collections::BTreeMap<i64, Value> = rows
        .iter()
        .map(|r| {
            (
                r["content_id"].as_i64().expect("content_id"),
                r["avg(engagement_pct)"].clone(),
            )
        })
        .collect();
    assert_eq!(avg.len(), 3, "{rows:?}");
    let close = |v: &Value, want: f64| v.as_f64().is_some_and(|x| (x - want).abs() < 1e-9);
    assert!(close(&avg[&1], 0.26), "content 1: {}", avg[&1]);
    assert!(close(&avg[&3], 0.19), "content 3: {}", avg[&3]);
    assert!(
        avg[&9].is_null(),
        "all-NULL content averages to NULL: {}",
        avg[&9]
    );

    // A fresh instance (the host restarted) replays the first batch: still nothing new.
    let again = load(&stack, &db).await;
    assert!(matches!(
        again.write("t/0:0-3", &first).await,
        WriteOutcome::Accepted
    ));
    assert_eq!(again.counter("rows_inserted"), 0.0);
    let counts =
        clickhouse_query(&stack, &format!("SELECT count() FROM {db}.events_enriched")).await;
    assert_eq!(counts.trim(), "6");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_write_answers_retry_later_and_the_retry_recovers() {
    let Some(stack) = Stack::get() else { return };
    let db = unique("ch");
    let _cleanup = DropDb(&stack, db.clone());
    let plugin = load(&stack, &db).await;
    // The table disappears under the plugin (schema managed elsewhere, a mistaken DROP): the
    // batch is not acknowledged, so the host retries it instead of losing it.
    clickhouse_query(&stack, &format!("DROP TABLE {db}.events_enriched")).await;
    let out = plugin
        .write(
            "t/0:0-0",
            &[ev(1, Some(1), Some(6000), Some(300), Some(0.02))],
        )
        .await;
    assert!(
        matches!(&out, WriteOutcome::RetryLater(r) if r.contains("clickhouse")),
        "{out:?}"
    );
    // The host's retry of the same batch succeeds: the plugin creates the table again.
    let out = plugin
        .write(
            "t/0:0-0",
            &[ev(1, Some(1), Some(6000), Some(300), Some(0.02))],
        )
        .await;
    assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");
    let counts =
        clickhouse_query(&stack, &format!("SELECT count() FROM {db}.events_enriched")).await;
    assert_eq!(counts.trim(), "1");
}
