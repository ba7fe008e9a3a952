//! The host end to end on the real stack: PostgreSQL -> Debezium -> Kafka -> host -> Wasm
//! test plugin (plugins/testkit, which records what it receives in Redis).

use std::collections::BTreeSet;
use std::time::Duration;

use fanout_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn by_id(events: &[Value]) -> std::collections::BTreeMap<i64, Value> {
    events
        .iter()
        .map(|e| (e["event_id"].as_i64().unwrap_or(-1), e.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn inserts_reach_the_plugin_enriched_and_new_content_is_used() {
    let Some(stack) = Stack::get() else { return };
    let db = Database::create(&stack, true).await;
    let cdc = Cdc::start(&stack, &db);
    let key = unique("rec");
    let cfg = ConfigBuilder::new(&stack, &cdc.events_topic(), &cdc.content_topic(), &db.url)
        .testkit("rec", "record", &key, "fail-fast", 3);
    let host = HostProc::start("enrich", &cfg.render(), &cfg.metrics_addr);
    let r = redis(&stack).await;
    let pg = db.client().await;

    let play = db
        .insert_event(&pg, Some(1), 999, "play", Some(7000), "web")
        .await;
    let no_duration = db.insert_event(&pg, Some(1), 1, "click", None, "ios").await;
    let null_length = db
        .insert_event(&pg, Some(4), 2, "play", Some(5000), "web")
        .await;
    let zero_length = db
        .insert_event(&pg, Some(5), 3, "play", Some(5000), "web")
        .await;
    let unknown = db
        .insert_event(&pg, Some(424_242), 4, "play", Some(5000), "android")
        .await;
    let rounding = db
        .insert_event(&pg, Some(15), 5, "play", Some(1000), "web")
        .await; // 1/8 = 0.125

    let got = eventually(WAIT, "6 events at the plugin", || async {
        let v = recorded(&r, &key).await;
        (v.len() >= 6).then_some(v)
    })
    .await;
    let got = by_id(&got);
    let e = &got[&play];
    assert_eq!(e["content_id"], 1);
    assert_eq!(e["user_id"], 999);
    assert_eq!(e["event_type"], "play");
    assert_eq!(e["device"], "web");
    assert_eq!(e["duration_ms"], 7000);
    assert_eq!(e["content_type"], "video");
    assert_eq!(e["length_seconds"], 300);
    assert_eq!(e["engagement_seconds"], 7.0);
    assert_eq!(e["engagement_pct"], 0.02);
    assert!(
        e["event_ts"].as_str().is_some_and(|s| s.len() == 19),
        "event_ts {}",
        e["event_ts"]
    );

    assert!(got[&no_duration]["engagement_seconds"].is_null());
    assert!(got[&no_duration]["engagement_pct"].is_null());
    assert!(got[&null_length]["engagement_pct"].is_null());
    assert!(got[&null_length]["engagement_seconds"].is_null());
    assert_eq!(got[&zero_length]["engagement_seconds"], 5.0);
    assert!(got[&zero_length]["engagement_pct"].is_null());
    assert!(got[&unknown]["content_type"].is_null());
    assert!(got[&unknown]["length_seconds"].is_null());
    assert_eq!(
        got[&rounding]["engagement_pct"], 0.13,
        "half away from zero"
    );

    // Content published while the host runs is used for later events.
    pg.execute("INSERT INTO content VALUES (777001, 'podcast', 200)", &[])
        .await
        .expect("content");
    let later = db
        .insert_event(&pg, Some(777_001), 6, "finish", Some(50_000), "web")
        .await;
    let got = eventually(WAIT, "the event of the new content", || async {
        by_id(&recorded(&r, &key).await).get(&later).cloned()
    })
    .await;
    assert_eq!(got["content_type"], "podcast");
    assert_eq!(got["length_seconds"], 200);
    assert_eq!(got["engagement_pct"], 0.25);

    // Updates and deletes are skipped and counted, not delivered.
    pg.execute(
        "UPDATE engagement_events SET device = 'tv' WHERE id = $1",
        &[&play],
    )
    .await
    .expect("update");
    pg.execute(
        "DELETE FROM engagement_events WHERE id = $1",
        &[&no_duration],
    )
    .await
    .expect("delete");
    eventually(WAIT, "update and delete counted as skipped", || async {
        let m = host.metrics().await;
        (metric_value(
            &m,
            "fanout_messages_skipped_total{plugin=\"rec\",reason=\"update\"}",
        ) >= 1.0
            && metric_value(
                &m,
                "fanout_messages_skipped_total{plugin=\"rec\",reason=\"delete\"}",
            ) >= 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        recorded(&r, &key).await.len(),
        7,
        "updates/deletes must not reach plugins"
    );

    // A column added to the source table does not break the stream (SPEC 8).
    pg.batch_execute(
        "ALTER TABLE engagement_events ADD COLUMN title TEXT, ADD COLUMN payload JSONB",
    )
    .await
    .expect("alter table");
    let with_new_columns: i64 = pg
        .query_one(
            "INSERT INTO engagement_events (content_id, user_id, event_type, duration_ms, device, title, payload) \
             VALUES (2, 8, 'play', 90000, 'ios', 'Episode 1', '{\"k\": 1}') RETURNING id",
            &[],
        )
        .await
        .expect("insert with new columns")
        .get(0);
    let got = eventually(WAIT, "the event inserted after ALTER TABLE", || async {
        by_id(&recorded(&r, &key).await)
            .get(&with_new_columns)
            .cloned()
    })
    .await;
    assert_eq!(got["content_type"], "podcast");
    assert_eq!(got["engagement_pct"], 0.05);
    assert!(
        got.get("title").is_none(),
        "unknown columns are not passed on"
    );
    drop(cdc);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_stream_loses_nothing() {
    let Some(stack) = Stack::get() else { return };
    let db = Database::create(&stack, true).await;
    let cdc = Cdc::start(&stack, &db);
    let key = unique("rec");
    let mut cfg = ConfigBuilder::new(&stack, &cdc.events_topic(), &cdc.content_topic(), &db.url)
        .testkit("rec", "record", &key, "fail-fast", 3);
    cfg.max_events = 20;
    let mut host = HostProc::start("kill9", &cfg.render(), &cfg.metrics_addr);
    let r = redis(&stack).await;
    let pg = db.client().await;

    let mut inserted = BTreeSet::new();
    for i in 0..600 {
        inserted.insert(
            db.insert_event(&pg, Some(1 + i % 20), i, "play", Some(1000), "web")
                .await,
        );
        if i == 300 {
            // Wait until the host is mid-stream, then kill it without warning.
            eventually(WAIT, "some deliveries before the kill", || async {
                (recorded(&r, &key).await.len() > 50).then_some(())
            })
            .await;
            host.proc.kill9();
            host.restart("kill9");
        }
    }
    let delivered: BTreeSet<i64> = eventually(WAIT, "every inserted event delivered", || async {
        let ids: BTreeSet<i64> = recorded(&r, &key)
            .await
            .iter()
            .filter_map(|e| e["event_id"].as_i64())
            .collect();
        (ids.len() >= inserted.len()).then_some(ids)
    })
    .await;
    assert_eq!(
        delivered, inserted,
        "the set of delivered ids must equal the set inserted"
    );
    drop(cdc);
}
