//! Dead letters an operator can act on: a plugin rejects the odd events (dead-lettered with
//! their reason), `fanout dlq list|show` finds them with their headers, `fanout dlq replay`
//! delivers them to the plugin once it accepts them (the effects land in its sink), and a
//! second replay of the same letters delivers nothing (the ledger).

use std::process::Command;
use std::time::Duration;

use fanout_tests::*;

const WAIT: Duration = Duration::from_secs(90);

/// Runs `fanout ARGS`, returning (exit code, stdout, stderr).
fn fanout(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(host_binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run fanout");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The event ids a testkit plugin recorded under `key`.
async fn recorded_ids(conn: &redis::aio::MultiplexedConnection, key: &str) -> Vec<i64> {
    let mut ids: Vec<i64> = recorded(conn, key)
        .await
        .iter()
        .filter_map(|e| e["event_id"].as_i64())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_events_are_listed_replayed_once_and_never_twice() {
    let Some(stack) = Stack::get() else { return };
    let topic = unique("dlq-events");
    create_topic(&stack, &topic, 2).await;
    let key = unique("dlq-rec");
    let cfg = ConfigBuilder::new(&stack, &topic, "", "").testkit(
        "picky",
        "reject-odd",
        &key,
        "fail-fast",
        3,
    );
    let dlq_topic = cfg.dead_letter_topic.clone();
    let rejecting = cfg.render();
    // The same plugin entry, fixed: it now takes every event (what replay delivers to).
    let fixed = rejecting.replace("mode = \"reject-odd\"", "mode = \"record\"");
    assert_ne!(rejecting, fixed);

    produce_events(&stack, &topic, 1..=20).await;
    let host = HostProc::start("dlq-live", &rejecting, &cfg.metrics_addr);
    let conn = redis(&stack).await;
    eventually(WAIT, "the even events recorded, the odd ones dead-lettered", || async {
        let letters = host
            .metric("fanout_dead_letters_total{plugin=\"picky\",stage=\"plugin\",reason=\"rejected\"}")
            .await;
        (recorded_ids(&conn, &key).await.len() == 10 && letters == 10.0).then_some(())
    })
    .await;
    let config_path = host.config_path.clone();
    drop(host);
    let config = config_path.to_string_lossy().into_owned();

    // list: the ten letters, each with its reason and class.
    let (code, out, err) = fanout(&[
        "dlq", "list", "--config", &config, "--plugin", "picky", "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let letters: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON letter per line"))
        .collect();
    assert_eq!(letters.len(), 10, "{out}");
    for l in &letters {
        assert_eq!(l["reason"], "odd event ids are rejected", "{l}");
        assert_eq!(l["reason_class"], "rejected", "{l}");
        assert_eq!(l["stage"], "plugin", "{l}");
        assert_eq!(l["source_topic"].as_str(), Some(topic.as_str()), "{l}");
    }
    let (_, none, _) = fanout(&[
        "dlq", "list", "--config", &config, "--reason", "gave_up", "--json",
    ]);
    assert!(none.trim().is_empty(), "no letter gave up: {none}");
    let first = format!("{}@{}", letters[0]["partition"], letters[0]["offset"]);
    let (code, shown, err) = fanout(&["dlq", "show", "--config", &config, &first]);
    assert_eq!(code, 0, "{err}");
    assert!(
        shown.contains("fanout.reason: odd event ids are rejected"),
        "{shown}"
    );
    assert!(shown.contains("fanout.reason.class: rejected"), "{shown}");
    assert!(
        shown.contains("\"op\": \"c\""),
        "the payload is the source message: {shown}"
    );

    // replay to the fixed plugin: the odd events land in its sink.
    let fixed_path = repo_root().join(format!("target/test-logs/{}.toml", unique("dlq-fixed")));
    std::fs::write(&fixed_path, &fixed).expect("write config");
    let fixed_config = fixed_path.to_string_lossy().into_owned();
    let ledger = repo_root().join(format!("target/test-logs/{}.jsonl", unique("dlq-ledger")));
    let ledger_arg = ledger.to_string_lossy().into_owned();
    let replay = || {
        fanout(&[
            "dlq",
            "replay",
            "--config",
            &fixed_config,
            "--plugin",
            "picky",
            "--ledger",
            &ledger_arg,
        ])
    };
    let (code, out, err) = replay();
    eprintln!("first replay:\n{out}{err}");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("matched=10 already_replayed=0 replayed=10 dead_lettered_again=0"),
        "{out}"
    );
    let ids = recorded_ids(&conn, &key).await;
    assert_eq!(
        ids,
        (1..=20).collect::<Vec<i64>>(),
        "every event once in the sink"
    );
    let ledger_lines = std::fs::read_to_string(&ledger).expect("ledger written");
    assert_eq!(ledger_lines.lines().count(), 10, "{ledger_lines}");
    assert!(ledger_lines.contains(&format!("\"dlq_topic\":\"{dlq_topic}\"")));

    // A second replay of the same letters changes nothing.
    let (code, out, err) = replay();
    eprintln!("second replay:\n{out}{err}");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("matched=10 already_replayed=10 replayed=0"),
        "{out}"
    );
    assert_eq!(
        recorded_ids(&conn, &key).await.len(),
        20,
        "nothing delivered twice"
    );
    assert_eq!(
        std::fs::read_to_string(&ledger).unwrap().lines().count(),
        10
    );

    // Replaying into the still-rejecting plugin dead-letters them again (the live path).
    let again = repo_root().join(format!("target/test-logs/{}.jsonl", unique("dlq-ledger")));
    let (code, out, err) = fanout(&[
        "dlq",
        "replay",
        "--config",
        &config,
        "--plugin",
        "picky",
        "--ledger",
        &again.to_string_lossy(),
        "--id",
        &first,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("matched=1 already_replayed=0 replayed=1 dead_lettered_again=1"),
        "{out}"
    );
    let _ = std::fs::remove_file(&ledger);
    let _ = std::fs::remove_file(&again);
}
