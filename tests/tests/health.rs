//! Health tells the truth about partitions nobody consumes: two hosts share a lane's group
//! with static membership, one dies (kill -9; tansu 0.6.0 never evicts a static member), and
//! the survivor reports the stranded partitions as unhealthy, with lag per partition on
//! /metrics, even though nothing in its own process fails.

use std::time::{Duration, Instant};

use fanout_tests::*;

const WAIT: Duration = Duration::from_secs(90);

async fn healthz(addr: &str) -> (u16, String) {
    match reqwest::get(format!("http://{addr}/healthz")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_static_member_strands_partitions_and_the_survivor_says_so() {
    let Some(stack) = Stack::get() else { return };
    let topic = unique("stranded");
    create_topic(&stack, &topic, 4).await;
    let key = unique("rec");
    let mut cfg =
        ConfigBuilder::new(&stack, &topic, "", "").testkit("rec", "record", &key, "fail-fast", 3);
    cfg.extra = "[health]\nlag_interval_ms = 500\nstall_after_ms = 8000\n".into();
    let group = cfg.group_id.clone();
    // Two hosts of one group, each its own static member id and metrics address.
    let mut render_for = |member: &str| {
        cfg.metrics_addr = free_addr();
        let text = cfg.render().replace(
            &format!("\"{group}-host\""),
            &format!("\"{group}-{member}\""),
        );
        (text, cfg.metrics_addr.clone())
    };
    let (cfg1, addr1) = render_for("one");
    let (cfg2, addr2) = render_for("two");
    let survivor = HostProc::start("health-one", &cfg1, &addr1);
    let mut victim = HostProc::start("health-two", &cfg2, &addr2);

    // Both hold partitions: the survivor alone does not hold all four.
    eventually(
        WAIT,
        "the partitions are split between the hosts",
        || async {
            let held = survivor
                .metric("fanout_lane_assigned_partitions{plugin=\"rec\"}")
                .await;
            (1.0..4.0).contains(&held).then_some(())
        },
    )
    .await;
    victim.proc.kill9();
    let killed = Instant::now();

    // Keep inserting: keys spread over all four partitions.
    let producing = {
        let (stack, topic) = (stack.clone(), topic.clone());
        tokio::spawn(async move {
            for id in 1..=600i64 {
                produce(
                    &stack,
                    &topic,
                    Some(format!("{{\"id\":{id}}}").as_bytes()),
                    Some(&event_envelope(id, 1, "2026-01-08T14:21:52Z")),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let reason = eventually(
        WAIT,
        "the survivor reports the stranded partitions",
        || async {
            let (status, body) = healthz(&addr1).await;
            (status == 503 && body.contains("stalled")).then_some(body)
        },
    )
    .await;
    let detected = killed.elapsed();
    eprintln!("stranded partitions reported {detected:?} after the kill:\n{reason}");
    producing.abort();
    assert!(
        reason.contains(&format!("{group}.rec")),
        "the group is named: {reason}"
    );
    assert!(
        reason.contains(&topic),
        "the partitions are named: {reason}"
    );
    assert!(
        reason.contains("held by member") || reason.contains("not held by this host"),
        "who holds them: {reason}"
    );
    let m = survivor.metrics().await;
    let lagging: Vec<f64> = (0..4)
        .map(|p| {
            metric_value(
                &m,
                &format!("fanout_lag_messages{{plugin=\"rec\",partition=\"{p}\"}}"),
            )
        })
        .collect();
    eprintln!("lag per partition on the survivor: {lagging:?}");
    assert!(
        (0..4).all(|p| m.contains(&format!(
            "fanout_lag_messages{{plugin=\"rec\",partition=\"{p}\"}}"
        ))),
        "lag of every partition is on /metrics:\n{m}"
    );
    assert!(
        lagging.iter().any(|l| *l > 0.0),
        "stranded partitions show lag: {lagging:?}"
    );
    assert!(metric_value(&m, "fanout_healthy") == 0.0);
}
