//! The redis-topn plugin (plugins/dist/redis_topn.wasm) against the stack's Redis, driven
//! in-process through the host's plugin loader: exactly the keys of SPEC 5B with their TTLs,
//! per-minute buckets by event time, idempotent replays, `content:last` by event time, and the
//! 10-minute list across minute boundaries. Each test owns a key prefix (config + grant).

use std::collections::{BTreeMap, BTreeSet};

use fanout::plugin::{WitEvent, WriteOutcome};
use fanout_tests::*;
use redis::AsyncCommands;
use serde_json::Value;

const MINUTE: i64 = 60_000_000;

async fn load(stack: &Stack, prefix: &str) -> LoadedPlugin {
    LoadedPlugin::load(stack, &plugin_toml::redis_topn("topn", prefix)).await
}

/// `YYYYMMDDHHMM` of the UTC minute of `micros`.
fn minute(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .expect("time")
        .format("%Y%m%d%H%M")
        .to_string()
}

async fn keys(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> BTreeSet<String> {
    let all: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(conn)
        .await
        .expect("KEYS");
    all.into_iter()
        .map(|k| k[prefix.len()..].to_string())
        .collect()
}

async fn zset(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> BTreeMap<String, f64> {
    let v: Vec<(String, f64)> = conn.zrange_withscores(key, 0, -1).await.expect("ZRANGE");
    v.into_iter().collect()
}

async fn ttl(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    conn.ttl(key).await.expect("TTL")
}

fn accepted(out: WriteOutcome) {
    assert!(matches!(out, WriteOutcome::Accepted), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_ttls_buckets_window_and_replays() {
    let Some(stack) = Stack::get() else { return };
    let p = format!("{}:", unique("topn"));
    let plugin = load(&stack, &p).await;
    let mut r = redis(&stack).await;

    // Relative to now, two minutes apart at least, so each lands in its own minute bucket;
    // content 30 has an event 12 minutes ago only: counted, but outside the 10-minute list.
    let now = now_micros();
    let (m1, m2, m5, m12) = (
        now - MINUTE,
        now - 2 * MINUTE,
        now - 5 * MINUTE,
        now - 12 * MINUTE,
    );
    let batch: Vec<WitEvent> = vec![
        wit_event(1, Some(10), m2),
        wit_event(2, Some(10), m2), // same time as 1: the tie goes to the higher event_id
        wit_event(3, Some(20), m2),
        wit_event(4, Some(20), m1),
        wit_event(5, Some(20), m1),
        wit_event(6, Some(20), m5),
        wit_event(7, Some(30), m12),
        wit_event(8, None, m1), // no content_id: touches nothing
    ];
    accepted(plugin.write("t/0:0-7", &batch).await);

    let got = keys(&mut r, &p).await;
    let mut want: BTreeSet<String> = BTreeSet::new();
    for c in [10, 20, 30] {
        want.insert(format!("content:last:{c}"));
        want.insert(format!("content:count:{c}"));
    }
    for m in [m1, m2, m5, m12] {
        want.insert(format!("top:content:bucket:{}", minute(m)));
    }
    want.insert("top:content:10m".into());
    // The exactly-once bookkeeping: these batches carry no Kafka positions (as a backfill's),
    // so one bitmap of event ids; no key per event.
    want.insert("fanout:once:backfilled:0".into());
    assert_eq!(
        got, want,
        "exactly the keys of SPEC 5B (plus the exactly-once bookkeeping)"
    );

    // Counts, buckets by event time, the merged 10-minute list.
    let count = |c: i64| format!("{p}content:count:{c}");
    let counts = |r: redis::aio::MultiplexedConnection| async move {
        let mut r = r;
        let v: Vec<i64> = r
            .mget(&[count(10), count(20), count(30)])
            .await
            .expect("MGET");
        v
    };
    assert_eq!(counts(r.clone()).await, vec![2, 4, 1]);
    let bucket = |m: i64| format!("{p}top:content:bucket:{}", minute(m));
    let b2 = zset(&mut r, &bucket(m2)).await;
    assert_eq!(
        b2,
        BTreeMap::from([("10".to_string(), 2.0), ("20".to_string(), 1.0)])
    );
    assert_eq!(
        zset(&mut r, &bucket(m1)).await,
        BTreeMap::from([("20".to_string(), 2.0)])
    );
    assert_eq!(
        zset(&mut r, &bucket(m12)).await,
        BTreeMap::from([("30".to_string(), 1.0)])
    );
    let top_key = format!("{p}top:content:10m");
    let top = zset(&mut r, &top_key).await;
    assert_eq!(
        top,
        BTreeMap::from([("10".to_string(), 2.0), ("20".to_string(), 4.0)]),
        "merged across minutes, content 30 (12 min old) dropped"
    );
    let ranked: Vec<String> = r.zrevrange(&top_key, 0, 9).await.expect("ZREVRANGE");
    assert_eq!(ranked, vec!["20", "10"]);

    // TTLs: last ~1 h, count none, bucket = end of its minute + 15 min, top ~120 s.
    let last_ttl = ttl(&mut r, &format!("{p}content:last:10")).await;
    assert!(
        (3590..=3600).contains(&last_ttl),
        "content:last TTL {last_ttl}"
    );
    assert_eq!(
        ttl(&mut r, &count(10)).await,
        -1,
        "content:count has no TTL"
    );
    let top_ttl = ttl(&mut r, &top_key).await;
    assert!((110..=120).contains(&top_ttl), "top TTL {top_ttl}");
    let now_s = now_micros() / 1_000_000;
    for m in [m1, m2, m5, m12] {
        let want = (m / MINUTE * 60) + 60 + 900 - now_s;
        let got = ttl(&mut r, &bucket(m)).await;
        assert!(
            (want - 2..=want + 1).contains(&got),
            "bucket {} TTL {got}, want ~{want}",
            minute(m)
        );
        assert!(got <= 900, "a bucket never lives longer than 15 minutes");
    }

    // content:last holds the SPEC-4 JSON of the newest event of that content.
    let last: String = r.get(format!("{p}content:last:10")).await.expect("GET");
    let last: Value = serde_json::from_str(&last).expect("json");
    assert_eq!(last["event_id"], 2);
    assert_eq!(last["content_id"], 10);
    assert_eq!(last["engagement_pct"], 0.02);
    assert_eq!(last.as_object().map(|o| o.len()), Some(11), "{last}");
    let last20: Value = serde_json::from_str(
        &r.get::<_, String>(format!("{p}content:last:20"))
            .await
            .expect("GET"),
    )
    .expect("json");
    assert_eq!(
        last20["event_id"], 5,
        "newest by event time, tie broken by event_id"
    );

    // Replaying the same batch (and a fresh instance replaying it, as after a crash) changes no
    // count, score or last event.
    let before_top = zset(&mut r, &top_key).await;
    accepted(plugin.write("t/0:0-7", &batch).await);
    let again = load(&stack, &p).await;
    accepted(again.write("t/0:0-7", &batch).await);
    assert_eq!(
        counts(r.clone()).await,
        vec![2, 4, 1],
        "a replay must not count twice"
    );
    assert_eq!(zset(&mut r, &bucket(m2)).await, b2);
    assert_eq!(zset(&mut r, &top_key).await, before_top);
    assert_eq!(plugin.counter("events_new"), 7.0);
    assert_eq!(plugin.counter("events_replayed"), 7.0);
    assert_eq!(again.counter("events_replayed"), 7.0);
    assert_eq!(plugin.counter("events_without_content_id"), 2.0);

    // A batch mixing a replayed event with a new one counts only the new one.
    accepted(
        plugin
            .write(
                "t/0:7-8",
                &[wit_event(7, Some(30), m12), wit_event(9, Some(10), m1)],
            )
            .await,
    );
    assert_eq!(counts(r.clone()).await, vec![3, 4, 1]);
    assert_eq!(
        zset(&mut r, &top_key).await,
        BTreeMap::from([("10".to_string(), 3.0), ("20".to_string(), 4.0)])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn last_event_is_newest_by_event_time_not_arrival() {
    let Some(stack) = Stack::get() else { return };
    let p = format!("{}:", unique("topn"));
    let plugin = load(&stack, &p).await;
    let mut r = redis(&stack).await;
    let now = now_micros();
    let last = |r: redis::aio::MultiplexedConnection| {
        let key = format!("{p}content:last:42");
        async move {
            let mut r = r;
            let s: String = r.get(&key).await.expect("GET content:last");
            serde_json::from_str::<Value>(&s).expect("json")["event_id"]
                .as_i64()
                .expect("event_id")
        }
    };
    // The newer event arrives first, the older one later: the newer stays.
    accepted(
        plugin
            .write("a", &[wit_event(101, Some(42), now - MINUTE)])
            .await,
    );
    accepted(
        plugin
            .write("b", &[wit_event(100, Some(42), now - 3 * MINUTE)])
            .await,
    );
    assert_eq!(last(r.clone()).await, 101);
    // In one batch too, out of order.
    accepted(
        plugin
            .write(
                "c",
                &[
                    wit_event(103, Some(42), now - 10_000_000),
                    wit_event(102, Some(42), now - 20_000_000),
                ],
            )
            .await,
    );
    assert_eq!(last(r.clone()).await, 103);
    // All four are counted, whatever their order.
    let count: i64 = r.get(format!("{p}content:count:42")).await.expect("count");
    assert_eq!(count, 4);
    let ttl = ttl(&mut r, &format!("{p}content:last:42")).await;
    assert!(
        (3590..=3600).contains(&ttl),
        "TTL refreshed when replaced: {ttl}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn window_slides_and_drops_content_older_than_ten_minutes() {
    let Some(stack) = Stack::get() else { return };
    let p = format!("{}:", unique("topn"));
    let plugin = load(&stack, &p).await;
    let mut r = redis(&stack).await;
    let top_key = format!("{p}top:content:10m");
    // Not in the last seconds of a minute, so that the write and the checks see the same window.
    while now_micros() % MINUTE > 50_000_000 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let now = now_micros();
    // Content 1 at the edges of the window: 9 minutes ago (in) and 11 minutes ago (out);
    // content 2 spread over three minutes in the window; content 3 only 10+ minutes ago.
    let start_minute = now / MINUTE;
    accepted(
        plugin
            .write(
                "w",
                &[
                    wit_event(1, Some(1), (start_minute - 9) * MINUTE + 5_000_000),
                    wit_event(2, Some(1), (start_minute - 11) * MINUTE + 5_000_000),
                    wit_event(3, Some(2), now - 3 * MINUTE),
                    wit_event(4, Some(2), now - 4 * MINUTE),
                    wit_event(5, Some(2), now),
                    wit_event(6, Some(3), (start_minute - 10) * MINUTE + 59_000_000),
                ],
            )
            .await,
    );
    // The window is the 10 buckets start_minute-9 ..= start_minute.
    let top = zset(&mut r, &top_key).await;
    assert_eq!(
        top,
        BTreeMap::from([("1".to_string(), 1.0), ("2".to_string(), 3.0)]),
        "window of 10 minute buckets"
    );
    // Every batch rebuilds the window; an old event's bucket that already expired is not
    // recreated, and content whose events are all older than 10 minutes is not listed.
    accepted(
        plugin
            .write("old", &[wit_event(7, Some(4), now - 30 * MINUTE)])
            .await,
    );
    let top = zset(&mut r, &top_key).await;
    assert!(!top.contains_key("3") && !top.contains_key("4"), "{top:?}");
    assert_eq!(top.get("2"), Some(&3.0));
    let count4: i64 = r.get(format!("{p}content:count:4")).await.expect("count");
    assert_eq!(count4, 1, "an old event still counts");
    let bucket_old = format!("{p}top:content:bucket:{}", minute(now - 30 * MINUTE));
    let exists: bool = r.exists(&bucket_old).await.expect("EXISTS");
    assert!(
        !exists,
        "a bucket already past its 15 minutes is not created"
    );
}
