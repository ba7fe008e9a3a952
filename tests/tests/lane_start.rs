//! Where a lane starts: from its own committed positions; on an upgrade from a host before
//! lanes, from the positions that host committed in `group_id` (no replay, no gap); and a
//! plugin added later from its `start` setting. Plain Debezium envelopes produced into a topic
//! of the test's own; the testkit plugin records exactly which events each lane delivered.

use std::time::Duration;

use fanout_tests::*;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::ClientConfig;

const WAIT: Duration = Duration::from_secs(60);

fn ids(events: &[serde_json::Value]) -> Vec<i64> {
    let mut v: Vec<i64> = events
        .iter()
        .filter_map(|e| e["event_id"].as_i64())
        .collect();
    v.sort();
    v
}

/// What a host before lanes did: consume in `group` as a member and commit after `n`
/// messages.
async fn old_host_commits(stack: &Stack, group: &str, topic: &str, n: usize) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .create()
        .expect("old host consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut read = 0;
    let deadline = std::time::Instant::now() + WAIT;
    while read < n {
        assert!(
            std::time::Instant::now() < deadline,
            "old host read {read} of {n}"
        );
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
            read += 1;
            if read == n {
                consumer
                    .commit_message(&m, CommitMode::Sync)
                    .expect("old host commit");
            }
        }
    }
    consumer.unsubscribe();
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_resumes_from_the_host_group_and_new_plugins_follow_start() {
    let Some(stack) = Stack::get() else { return };
    let topic = unique("upgrade");
    create_topic(&stack, &topic, 1).await;
    produce_events(&stack, &topic, 1..=10).await;
    let mut cfg = ConfigBuilder::new(&stack, &topic, "", "");
    old_host_commits(&stack, &cfg.group_id, &topic, 6).await;

    let (rec_key, late_key) = (unique("rec"), unique("late"));
    cfg = cfg.testkit("rec", "record", &rec_key, "fail-fast", 3);
    cfg.extra = "[health]\nlag_interval_ms = 300\n".into();
    let mut host = HostProc::start("upgrade", &cfg.render(), &cfg.metrics_addr);
    let r = redis(&stack).await;

    // The upgraded host's lane inherits the old host's position: events 7..10, no replay.
    let got = eventually(
        WAIT,
        "rec takes the events after the old commit",
        || async {
            let v = recorded(&r, &rec_key).await;
            (v.len() >= 4).then_some(v)
        },
    )
    .await;
    assert_eq!(ids(&got), vec![7, 8, 9, 10]);
    assert!(
        host.proc
            .log_text()
            .contains("starting from the host group's committed positions"),
        "the upgrade is logged"
    );
    eventually(WAIT, "rec committed everything", || async {
        let m = host.metrics().await;
        (m.contains("fanout_lane_lag_messages{plugin=\"rec\"} 0")).then_some(())
    })
    .await;
    host.proc.kill9();

    // `late` is added once lanes run, with start = latest: only what is produced from now on.
    cfg = cfg.testkit("late", "record", &late_key, "fail-fast", 3);
    cfg.plugins[1] = cfg.plugins[1].replace(
        "failure_policy = \"fail-fast\"",
        "failure_policy = \"fail-fast\"\nstart = \"latest\"",
    );
    let mut host = HostProc::start("upgrade-added", &cfg.render(), &cfg.metrics_addr);
    eventually(WAIT, "late holds its partition", || async {
        (host
            .metric("fanout_lane_assigned_partitions{plugin=\"late\"}")
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    assert!(
        host.proc.log_text().contains("new plugin"),
        "{}",
        host.proc.log_text()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    produce_events(&stack, &topic, 11..=13).await;
    eventually(WAIT, "both lanes take 11..13", || async {
        (recorded(&r, &rec_key).await.len() >= 7 && recorded(&r, &late_key).await.len() >= 3)
            .then_some(())
    })
    .await;
    assert_eq!(ids(&recorded(&r, &late_key).await), vec![11, 12, 13]);
    assert_eq!(
        ids(&recorded(&r, &rec_key).await),
        (7..=13).collect::<Vec<_>>()
    );

    // Both lanes committed in their own groups: a kill -9 and restart replays nothing.
    eventually(WAIT, "both lanes committed everything", || async {
        let m = host.metrics().await;
        (metric_value(&m, "fanout_lane_lag_messages{plugin=\"rec\"}") == 0.0
            && metric_value(&m, "fanout_lane_lag_messages{plugin=\"late\"}") == 0.0
            && m.contains("fanout_lane_lag_messages{plugin=\"late\"}"))
        .then_some(())
    })
    .await;
    host.restart("upgrade-added");
    produce_events(&stack, &topic, 14..=14).await;
    eventually(WAIT, "both lanes take 14 after the restart", || async {
        (recorded(&r, &rec_key).await.len() >= 8 && recorded(&r, &late_key).await.len() >= 4)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        ids(&recorded(&r, &rec_key).await),
        (7..=14).collect::<Vec<_>>()
    );
    assert_eq!(ids(&recorded(&r, &late_key).await), vec![11, 12, 13, 14]);

    // Each lane's position lives in its own group, and the old group is left as it was.
    let committed_in = |group: String| {
        let stack = stack.clone();
        let topic = topic.clone();
        async move {
            let c: StreamConsumer = ClientConfig::new()
                .set("bootstrap.servers", &stack.kafka_brokers)
                .set("group.id", &group)
                .create()
                .expect("consumer");
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition(&topic, 0);
            c.committed_offsets(tpl, Duration::from_secs(10))
                .expect("committed")
                .elements()[0]
                .offset()
        }
    };
    assert_eq!(
        committed_in(format!("{}.rec", cfg.group_id)).await,
        rdkafka::Offset::Offset(14)
    );
    assert_eq!(
        committed_in(cfg.group_id.clone()).await,
        rdkafka::Offset::Offset(6)
    );
}
