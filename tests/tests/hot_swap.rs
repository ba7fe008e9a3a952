//! Hot swap (SIGHUP) on the real stack: a testkit plugin recording events into Redis is
//! replaced, under a steady produce, by a version with another config (another list key, and
//! so another grant and Redis ACL user), without restarting the host. Asserted: every
//! produced event is recorded exactly once across the two lists (the new version resumes
//! where the old one was committed: no replay, no skip), the process is the same, the swap is
//! counted; then replacements that do not load (not a component; an `init` over its memory
//! limit) are refused while the running version keeps taking events, and /healthz says so
//! without turning unhealthy.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fanout_tests::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

const WAIT: Duration = Duration::from_secs(90);

fn sighup(host: &HostProc) {
    let status = Command::new("kill")
        .args(["-HUP", &host.proc.child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success(), "kill -HUP failed");
}

/// Produces ids `from..=to` one every `every`, in order, on one producer.
async fn produce_steadily(stack: &Stack, topic: &str, from: i64, to: i64, every: Duration) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("linger.ms", "0")
        .create()
        .expect("producer");
    let mut tick = tokio::time::interval(every);
    for id in from..=to {
        tick.tick().await;
        let payload = event_envelope(id, 1, "2026-01-08T14:21:52Z");
        producer
            .send(
                FutureRecord::<[u8], [u8]>::to(topic).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }
}

async fn ids(conn: &redis::aio::MultiplexedConnection, key: &str) -> Vec<i64> {
    recorded(conn, key)
        .await
        .iter()
        .filter_map(|e| e["event_id"].as_i64())
        .collect()
}

async fn healthz(addr: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .expect("healthz");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_swaps_a_changed_plugin_between_batches_and_refuses_a_broken_one() {
    let Some(stack) = Stack::get() else { return };
    let events_topic = unique("events");
    let content_topic = unique("content");
    create_topic(&stack, &events_topic, 2).await;
    create_topic(&stack, &content_topic, 1).await;
    let (key_a, key_b) = (unique("swap:a"), unique("swap:b"));
    let cfg = ConfigBuilder::new(&stack, &events_topic, &content_topic, "").testkit(
        "rec",
        "record",
        &key_a,
        "fail-fast",
        3,
    );
    let addr = cfg.metrics_addr.clone();
    let config_a = cfg.render();
    let mut cfg = cfg;
    cfg.plugins.clear();
    let config_b = cfg
        .testkit("rec", "record", &key_b, "fail-fast", 3)
        .render();

    let mut host = HostProc::start("hot_swap", &config_a, &addr);
    let pid = host.proc.child.id();
    eventually(WAIT, "the host up", || async {
        (!host.metrics().await.is_empty()).then_some(())
    })
    .await;
    // The lane holds both partitions (its group joined) before the produce starts, so the
    // events arrive at the pace they are produced.
    eventually(WAIT, "the lane holds the partitions", || async {
        let held = host
            .metric("fanout_lane_assigned_partitions{plugin=\"rec\"}")
            .await;
        (held == 2.0).then_some(())
    })
    .await;
    let conn = redis(&stack).await;

    // A steady produce: 1,500 events at about 250/s, the swap in the middle of it.
    const N: i64 = 1500;
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let (stack, topic, producing) = (stack.clone(), events_topic.clone(), producing.clone());
        tokio::spawn(async move {
            produce_steadily(&stack, &topic, 1, N, Duration::from_millis(4)).await;
            producing.store(false, Ordering::SeqCst);
        })
    };
    eventually(WAIT, "the first version records events", || async {
        (ids(&conn, &key_a).await.len() >= 200).then_some(())
    })
    .await;
    std::fs::write(&host.config_path, &config_b).expect("rewrite the config");
    let hup_at = Instant::now();
    sighup(&host);
    let ok = "fanout_plugin_swaps_total{plugin=\"rec\",result=\"ok\"}";
    eventually(WAIT, "the swap counted", || async {
        (host.metric(ok).await == 1.0).then_some(())
    })
    .await;
    let swapped_after = hup_at.elapsed();
    assert!(
        producing.load(Ordering::SeqCst),
        "the swap must land while events are being produced"
    );
    producer.await.expect("producer");

    let (a, b) = eventually(WAIT, "every event recorded", || async {
        let (a, b) = (ids(&conn, &key_a).await, ids(&conn, &key_b).await);
        (a.len() + b.len() >= N as usize).then_some((a, b))
    })
    .await;
    // Nothing more trickles in (a replay would).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (a2, b2) = (ids(&conn, &key_a).await, ids(&conn, &key_b).await);
    assert_eq!((a2.len(), b2.len()), (a.len(), b.len()), "late records");
    let set_a: BTreeSet<i64> = a.iter().copied().collect();
    let set_b: BTreeSet<i64> = b.iter().copied().collect();
    assert_eq!(
        set_a.len(),
        a.len(),
        "an id recorded twice by the old version"
    );
    assert_eq!(
        set_b.len(),
        b.len(),
        "an id recorded twice by the new version"
    );
    let both: Vec<_> = set_a.intersection(&set_b).collect();
    assert!(both.is_empty(), "ids handed to both versions: {both:?}");
    let union: BTreeSet<i64> = set_a.union(&set_b).copied().collect();
    assert_eq!(union, (1..=N).collect::<BTreeSet<i64>>(), "lost events");
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both versions took events: {} / {}",
        a.len(),
        b.len()
    );
    assert!(host.proc.is_running(), "the host is still running");
    assert_eq!(host.proc.child.id(), pid, "same process");
    let log = host.proc.log_text();
    assert_eq!(
        log.matches("lane started").count(),
        1,
        "the lane never restarted"
    );
    assert!(log.contains("plugin swapped"), "swap logged");
    let gap_line = log
        .lines()
        .find(|l| l.contains("first batch taken by the new version"))
        .expect("the swap gap is logged");
    let gap = metric_value(
        &host.metrics().await,
        "fanout_plugin_swap_gap_seconds{plugin=\"rec\"}",
    );
    assert!(gap > 0.0 && gap < 5.0, "swap gap {gap}s");
    println!(
        "swap: counted {swapped_after:?} after SIGHUP; old version took {} events, new {}; gap {:.1} ms\n{gap_line}",
        a.len(),
        b.len(),
        gap * 1000.0
    );

    // Broken replacements are refused; the running version (key_b) keeps taking events.
    let broken = repo_root().join(format!("target/test-logs/{}.wasm", unique("broken")));
    std::fs::write(&broken, b"not a component").expect("broken file");
    let testkit_path = plugin_wasm("testkit").display().to_string();
    let config_c = config_b.replace(&testkit_path, &broken.display().to_string());
    assert_ne!(config_c, config_b);
    // `init` allocating 64 MiB under a 32 MiB limit: the real limits refuse it.
    let config_d = config_b.replace("mode = \"record\"", "mode = \"record\"\nhold_mb = 64");
    assert_ne!(config_d, config_b);
    let refused = "fanout_plugin_swaps_total{plugin=\"rec\",result=\"refused\"}";
    for (n, config) in [(1.0, &config_c), (2.0, &config_d)] {
        std::fs::write(&host.config_path, config).expect("rewrite the config");
        sighup(&host);
        eventually(WAIT, "the refusal counted", || async {
            (host.metric(refused).await == n).then_some(())
        })
        .await;
    }
    assert_eq!(host.metric(ok).await, 1.0, "no further swap");
    let (status, body) = healthz(&addr).await;
    assert_eq!(
        status, 200,
        "a refused swap leaves the host healthy: {body}"
    );
    assert!(
        body.starts_with("ok\n") && body.contains("note: plugin rec: swap refused"),
        "{body}"
    );
    println!("/healthz after the refusals:\n{body}");
    produce_steadily(
        &stack,
        &events_topic,
        N + 1,
        N + 100,
        Duration::from_millis(2),
    )
    .await;
    eventually(WAIT, "the running version takes the new events", || async {
        (ids(&conn, &key_b).await.len() == b.len() + 100).then_some(())
    })
    .await;
    let after: BTreeSet<i64> = ids(&conn, &key_b).await.into_iter().collect();
    assert!(((N + 1)..=(N + 100)).all(|id| after.contains(&id)));
    assert_eq!(ids(&conn, &key_a).await.len(), a.len());
    let log = host.proc.log_text();
    assert!(
        log.contains("plugin swap refused") && log.contains("WARN"),
        "refusal logged at WARN"
    );
    assert!(host.proc.is_running(), "the host is still running");

    // Back to a config that loads (the running one): the note goes.
    std::fs::write(&host.config_path, &config_b).expect("rewrite the config");
    sighup(&host);
    eventually(WAIT, "the note cleared", || async {
        let (status, body) = healthz(&addr).await;
        (status == 200 && body == "ok\n").then_some(())
    })
    .await;
    assert_eq!(host.metric(ok).await, 1.0, "unchanged: nothing swapped");
    let _ = host.proc.terminate(Duration::from_secs(20));
    let _ = std::fs::remove_file(&broken);
}
