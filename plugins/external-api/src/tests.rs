use super::*;
use fanout_sdk::testing::{batch, event, Call, MockHost};

const T: i64 = 1_767_882_112_000_000;

fn api(extra: serde_json::Value) -> ExternalApi {
    let mut cfg = serde_json::json!({"url": "http://127.0.0.1:58080/events"});
    if let (Some(base), Some(more)) = (cfg.as_object_mut(), extra.as_object()) {
        base.extend(more.clone());
    }
    ExternalApi::init(config(cfg).unwrap(), &MockHost::new()).unwrap()
}

/// The config of `json` as the host passes it, through `init`'s checks.
fn config(json: serde_json::Value) -> Result<Config, String> {
    fanout_sdk::config::parse::<Config>(&json.to_string())?.validated()
}

/// The idempotency key of every request, in the order sent.
fn keys(host: &MockHost) -> Vec<String> {
    posts(host)
        .into_iter()
        .map(|(headers, _)| {
            headers
                .into_iter()
                .find(|(k, _)| k == "Idempotency-Key")
                .map(|(_, v)| v)
                .unwrap_or_default()
        })
        .collect()
}

fn ok() -> Result<Response, CapabilityError> {
    status(200)
}

fn status(status: u16) -> Result<Response, CapabilityError> {
    Ok(Response {
        status,
        headers: Vec::new(),
        body: Vec::new(),
    })
}

fn posts(host: &MockHost) -> Vec<(Vec<(String, String)>, String)> {
    host.service_calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Http {
                method,
                headers,
                body,
                ..
            } => {
                assert_eq!(method, "POST");
                Some((headers, body))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn config_parsing() {
    let c = config(serde_json::json!({})).unwrap();
    assert_eq!(
        (c.mode, c.policy, c.max_retries),
        (Mode::PerEvent, Policy::FailFast, 5)
    );
    let c = config(serde_json::json!({"mode": "batch", "policy": "best-effort",
        "headers": {"X-Api-Key": "k"}}))
    .unwrap();
    assert_eq!((c.mode, c.policy), (Mode::Batch, Policy::BestEffort));
    let e = config(serde_json::json!({"policy": "sometimes"})).unwrap_err();
    assert!(
        e.starts_with("config: policy: unknown variant `sometimes`"),
        "{e}"
    );
    assert!(config(serde_json::json!({"url": "ftp://x"})).is_err());
}

#[test]
fn backoff_grows_caps_and_honours_retry_after() {
    let mut j = Jitter::new(16);
    for retry in 0..10 {
        let exp = (200u64 << retry).min(10_000);
        let w = backoff_ms(retry, 200, 10_000, None, &mut j);
        assert!(
            w >= exp / 2 && w <= exp,
            "retry {retry}: {w} not in {}..={exp}",
            exp / 2
        );
    }
    assert_eq!(backoff_ms(0, 200, 10_000, Some(3), &mut j), 3_000);
    assert_eq!(backoff_ms(0, 200, 10_000, Some(60), &mut j), 10_000);
    assert_eq!(backoff_ms(0, 200, 10_000, Some(0), &mut j), 0);
    assert!(backoff_ms(200, 200, 10_000, None, &mut j) <= 10_000);
    // Same seed, same sequence; different seeds diverge.
    let a: Vec<u64> = (0..4).map(|_| Jitter::new(1).next_u64()).collect();
    assert!(a.windows(2).all(|w| w[0] == w[1]));
    assert_ne!(Jitter::new(1).next_u64(), Jitter::new(2).next_u64());
}

#[test]
fn classifies_answers() {
    let resp = |status: u16, headers: Vec<(String, String)>| {
        Ok(Response {
            status,
            headers,
            body: Vec::new(),
        })
    };
    assert_eq!(classify(&resp(201, vec![])), Attempt::Delivered);
    assert_eq!(
        classify(&resp(429, vec![("Retry-After".into(), " 2 ".into())])),
        Attempt::Retriable {
            reason: "HTTP 429".into(),
            retry_after: Some(2)
        }
    );
    assert!(matches!(
        classify(&resp(503, vec![])),
        Attempt::Retriable {
            retry_after: None,
            ..
        }
    ));
    assert!(matches!(
        classify(&resp(408, vec![])),
        Attempt::Retriable { .. }
    ));
    assert!(matches!(
        classify(&resp(400, vec![])),
        Attempt::Final {
            not_granted: false,
            ..
        }
    ));
    assert!(matches!(
        classify(&Err(CapabilityError::Failed("timeout".into()))),
        Attempt::Retriable { .. }
    ));
    assert!(matches!(
        classify(&Err(CapabilityError::NotGranted("url".into()))),
        Attempt::Final {
            not_granted: true,
            ..
        }
    ));
}

#[test]
fn per_event_posts_spec_json_with_idempotency_key() {
    let host = MockHost::at(T);
    let b = batch(vec![
        event(16, Some(1), T),
        event(17, None, T),
        event(16, Some(1), T),
    ]);
    assert!(matches!(
        api(serde_json::json!({})).write(&host, &b),
        WriteOutcome::Accepted
    ));
    let p = posts(&host);
    assert_eq!(p.len(), 2, "duplicates inside a batch are sent once");
    assert!(p[0]
        .0
        .contains(&("Idempotency-Key".into(), "event-16".into())));
    assert!(p[0]
        .0
        .contains(&("Content-Type".into(), "application/json".into())));
    let body: serde_json::Value = serde_json::from_str(&p[0].1).unwrap();
    assert_eq!(body["event_id"], 16);
    assert_eq!(body["event_ts"], "2026-01-08 14:21:52");
    assert_eq!(host.counter("events_delivered"), 2);
}

#[test]
fn retries_with_backoff_then_succeeds() {
    let host = MockHost::at(T);
    host.push_http_status(503, &[]);
    host.push_http(Err(CapabilityError::Failed("connection refused".into())));
    host.push_http_status(429, &[("Retry-After", "1")]);
    host.push_http_status(200, &[]);
    let b = batch(vec![event(1, Some(1), T)]);
    assert!(matches!(
        api(serde_json::json!({})).write(&host, &b),
        WriteOutcome::Accepted
    ));
    let sleeps = host.sleeps();
    assert_eq!(sleeps.len(), 3);
    assert!((100..=200).contains(&sleeps[0]), "{sleeps:?}");
    assert!((200..=400).contains(&sleeps[1]), "{sleeps:?}");
    assert_eq!(sleeps[2], 1_000, "Retry-After wins");
    assert_eq!(posts(&host).len(), 4);
}

#[test]
fn fail_fast_gives_the_batch_back_after_last_retry() {
    let host = MockHost::at(T);
    // Wave 1: event 1 fails, event 2 is delivered; waves 2 and 3: only event 1, failing.
    host.push_http_status(500, &[]);
    host.push_http_status(200, &[]);
    host.push_http_status(500, &[]);
    host.push_http_status(500, &[]);
    let b = batch(vec![event(1, Some(1), T), event(2, Some(1), T)]);
    let out = api(serde_json::json!({"max_retries": 2})).write(&host, &b);
    match out {
        WriteOutcome::RetryLater(r) => {
            assert!(r.contains("HTTP 500 (after 3 attempts)"), "{r}");
            assert!(r.contains("event 1"), "{r}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(keys(&host), ["event-1", "event-2", "event-1", "event-1"]);
    assert_eq!(host.counter("batches_failed"), 1);
    assert_eq!(
        host.counter("events_delivered"),
        0,
        "counted when the batch is accepted"
    );
}

#[test]
fn best_effort_dead_letters_failed_events_and_goes_on() {
    let host = MockHost::at(T);
    // Wave 1: 502, 422 (final), 200; waves 2 and 3: event 1 alone, 502 again.
    host.push_http_status(502, &[]);
    host.push_http_status(422, &[]);
    host.push_http_status(200, &[]);
    host.push_http_status(502, &[]);
    host.push_http_status(502, &[]);
    let b = batch(vec![
        event(1, Some(1), T),
        event(2, Some(1), T),
        event(3, Some(1), T),
    ]);
    let out = api(serde_json::json!({"max_retries": 2, "policy": "best-effort"})).write(&host, &b);
    match out {
        WriteOutcome::Rejected(r) => {
            assert_eq!(r.len(), 2);
            assert_eq!(r[0].event_id, 1);
            assert!(
                r[0].reason.contains("HTTP 502 (after 3 attempts)"),
                "{}",
                r[0].reason
            );
            assert_eq!(r[1].event_id, 2);
            assert!(
                r[1].reason.contains("HTTP 422 (not retriable)"),
                "{}",
                r[1].reason
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        keys(&host),
        ["event-1", "event-2", "event-3", "event-1", "event-1"]
    );
    assert_eq!(host.counter("events_dead_lettered"), 2);
    assert_eq!(host.counter("events_delivered"), 1);
}

#[test]
fn one_send_all_per_wave_with_the_configured_concurrency() {
    let host = MockHost::at(T);
    let events: Vec<_> = (1..=100).map(|id| event(id, Some(1), T)).collect();
    // Answers come back in request order: every tenth event gets a final 422.
    for id in 1..=100 {
        if id % 10 == 0 {
            host.push_http_status(422, &[]);
        } else {
            host.push_http_status(200, &[]);
        }
    }
    let mut a = api(serde_json::json!({"concurrency": 8, "policy": "best-effort"}));
    let WriteOutcome::Rejected(r) = a.write(&host, &batch(events)) else {
        panic!("expected rejections")
    };
    assert_eq!(
        r.iter().map(|r| r.event_id).collect::<Vec<_>>(),
        (1..=10).map(|i| i * 10).collect::<Vec<_>>(),
        "each answer is matched to its own event"
    );
    assert_eq!(host.http_send_alls(), [(8, 100)], "one wave, 8 in flight");
    assert_eq!(host.counter("events_delivered"), 90);
    // The default: 32 in flight.
    let host = MockHost::at(T);
    api(serde_json::json!({})).write(&host, &batch(vec![event(1, None, T)]));
    assert_eq!(host.http_send_alls(), [(32, 1)]);
}

#[test]
fn only_failed_events_are_resent_with_the_same_key() {
    let host = MockHost::at(T);
    // Wave 1: 1 ok, 2 503, 3 ok, 4 no response, 5 ok; wave 2: 2 ok, 4 503; wave 3: 4 ok.
    for r in [
        ok(),
        status(503),
        ok(),
        Err(CapabilityError::Failed("timeout".into())),
        ok(),
        ok(),
        status(503),
        ok(),
    ] {
        host.push_http(r);
    }
    let b = batch((1..=5).map(|id| event(id, Some(1), T)).collect());
    let mut a = api(serde_json::json!({}));
    assert_eq!(a.write(&host, &b), WriteOutcome::Accepted);
    assert_eq!(host.http_send_alls(), [(32, 5), (32, 2), (32, 1)]);
    assert_eq!(
        keys(&host),
        ["event-1", "event-2", "event-3", "event-4", "event-5", "event-2", "event-4", "event-4"]
    );
    // The same body on every attempt of an event.
    let p = posts(&host);
    assert_eq!(p[3].1, p[6].1);
    assert_eq!(p[6].1, p[7].1);
    let sleeps = host.sleeps();
    assert_eq!(sleeps.len(), 2);
    assert!((100..=200).contains(&sleeps[0]), "{sleeps:?}");
    assert!((200..=400).contains(&sleeps[1]), "{sleeps:?}");
    assert_eq!(host.counter("retries"), 3);
    assert_eq!(host.counter("events_delivered"), 5);

    // A replay of the batch (the host retrying it) sends the same keys again.
    let again = MockHost::at(T);
    assert_eq!(a.write(&again, &b), WriteOutcome::Accepted);
    assert_eq!(keys(&again), keys(&host)[..5]);
}

#[test]
fn retry_after_sets_the_wave_wait() {
    let host = MockHost::at(T);
    host.push_http_status(429, &[("Retry-After", "3")]);
    host.push_http_status(503, &[]);
    host.push_http_status(200, &[]);
    let b = batch(vec![
        event(1, Some(1), T),
        event(2, Some(1), T),
        event(3, None, T),
    ]);
    assert_eq!(
        api(serde_json::json!({})).write(&host, &b),
        WriteOutcome::Accepted
    );
    assert_eq!(
        host.sleeps(),
        [3_000],
        "the longest wait of the wave: Retry-After"
    );
    assert_eq!(
        keys(&host),
        ["event-1", "event-2", "event-3", "event-1", "event-2"]
    );
    // Capped by max_backoff_ms like any wait.
    let host = MockHost::at(T);
    host.push_http_status(429, &[("Retry-After", "3600")]);
    let mut a = api(serde_json::json!({"max_backoff_ms": 5000}));
    assert_eq!(a.write(&host, &b), WriteOutcome::Accepted);
    assert_eq!(host.sleeps(), [5_000]);
}

#[test]
fn rate_cap_paces_the_requests_across_waves_and_calls() {
    let host = MockHost::at(T);
    let mut a = api(serde_json::json!({"max_requests_per_second": 10}));
    let b = batch((1..=25).map(|id| event(id, Some(1), T)).collect());
    assert_eq!(a.write(&host, &b), WriteOutcome::Accepted);
    // 10/s: slices of one request, 100 ms apart.
    let waves = host.http_send_alls();
    assert_eq!(waves.len(), 25);
    assert!(waves.iter().all(|w| *w == (32, 1)), "{waves:?}");
    assert_eq!(host.sleeps(), vec![100; 24]);
    // The next call right after waits for its slot too: no burst at a batch boundary.
    let b2 = batch(vec![event(26, Some(1), T)]);
    assert_eq!(a.write(&host, &b2), WriteOutcome::Accepted);
    assert_eq!(host.sleeps().len(), 25);
    assert_eq!(host.now_micros() - T, 2_500_000, "26 requests at 10/s");

    // 100/s: slices of 10, 100 ms apart; retries are paced like first attempts.
    let host = MockHost::at(T);
    for _ in 0..10 {
        host.push_http_status(503, &[]);
    }
    let mut a = api(
        serde_json::json!({"max_requests_per_second": 100, "concurrency": 4,
        "base_backoff_ms": 10, "max_backoff_ms": 10}),
    );
    let b = batch((1..=30).map(|id| event(id, Some(1), T)).collect());
    assert_eq!(a.write(&host, &b), WriteOutcome::Accepted);
    assert_eq!(host.http_send_alls(), vec![(4, 10); 4]);
    let total: u64 = host.sleeps().iter().sum();
    assert!(total >= 300, "40 requests at 100/s take >= 300 ms: {total}");
}

#[test]
fn budget_ends_pacing_and_leaves_the_rest_unattempted() {
    let host = MockHost::at(T);
    let cfg = serde_json::json!({"policy": "best-effort", "max_requests_per_second": 1,
        "batch_budget_ms": 2500});
    let b = batch((1..=5).map(|id| event(id, Some(1), T)).collect());
    let WriteOutcome::Rejected(r) = api(cfg).write(&host, &b) else {
        panic!("expected rejections")
    };
    // Sent at 0, 1 and 2 s; the slot at 3 s is past the budget.
    assert_eq!(keys(&host), ["event-1", "event-2", "event-3"]);
    assert_eq!(r.iter().map(|r| r.event_id).collect::<Vec<_>>(), [4, 5]);
    assert!(
        r.iter().all(|r| r.reason.contains("not attempted")),
        "{r:?}"
    );
}

#[test]
fn config_bounds_concurrency() {
    let c = config(serde_json::json!({})).unwrap();
    assert_eq!((c.concurrency, c.max_requests_per_second), (32, 0));
    assert!(config(serde_json::json!({"concurrency": 0})).is_err());
    assert!(config(serde_json::json!({"concurrency": 257})).is_err());
    assert!(config(serde_json::json!({"concurrency": 256})).is_ok());
}

#[test]
fn fail_fast_still_rejects_what_no_retry_can_fix() {
    let host = MockHost::at(T);
    host.push_http_status(400, &[]);
    let b = batch(vec![event(1, Some(1), T), event(2, Some(1), T)]);
    match api(serde_json::json!({})).write(&host, &b) {
        WriteOutcome::Rejected(r) => assert_eq!(r.len(), 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn not_granted_is_retry_later_under_both_policies() {
    for policy in ["fail-fast", "best-effort"] {
        let host = MockHost::at(T);
        host.push_http(Err(CapabilityError::NotGranted("url not in grant".into())));
        let b = batch(vec![event(1, Some(1), T)]);
        let out = api(serde_json::json!({"policy": policy})).write(&host, &b);
        assert!(matches!(out, WriteOutcome::RetryLater(_)), "{policy}");
    }
}

#[test]
fn budget_stops_retries_and_dead_letters_the_rest() {
    let host = MockHost::at(T);
    for _ in 0..50 {
        host.push_http(Err(CapabilityError::Failed("timeout".into())));
    }
    let b = batch(vec![event(1, Some(1), T), event(2, Some(1), T)]);
    let cfg = serde_json::json!({"policy": "best-effort", "batch_budget_ms": 1000,
        "max_retries": 100, "base_backoff_ms": 200, "max_backoff_ms": 400});
    match api(cfg).write(&host, &b) {
        WriteOutcome::Rejected(r) => {
            assert_eq!(r.len(), 2);
            for r in &r {
                assert!(
                    r.reason.contains("no response: timeout") && r.reason.contains("budget"),
                    "{}",
                    r.reason
                );
            }
        }
        other => panic!("{other:?}"),
    }
    assert!(host.sleeps().iter().sum::<u64>() <= 1000);
    // Fail-fast gives the batch back instead.
    let host = MockHost::at(T);
    for _ in 0..50 {
        host.push_http(Err(CapabilityError::Failed("timeout".into())));
    }
    let cfg = serde_json::json!({"batch_budget_ms": 1000, "max_retries": 100,
        "base_backoff_ms": 200, "max_backoff_ms": 400});
    let out = api(cfg).write(&host, &b);
    assert!(
        matches!(&out, WriteOutcome::RetryLater(r) if r.contains("budget") && r.contains("1 more")),
        "{out:?}"
    );
}

#[test]
fn batch_mode_one_post_with_stable_key() {
    let host = MockHost::at(T);
    let b = batch(vec![
        event(2, Some(1), T),
        event(1, None, T),
        event(2, Some(1), T),
    ]);
    let mut a = api(serde_json::json!({"mode": "batch"}));
    assert!(matches!(a.write(&host, &b), WriteOutcome::Accepted));
    let p = posts(&host);
    assert_eq!(p.len(), 1);
    let body: serde_json::Value = serde_json::from_str(&p[0].1).unwrap();
    assert_eq!(body.as_array().map(Vec::len), Some(2));
    let key = p[0]
        .0
        .iter()
        .find(|(k, _)| k == "Idempotency-Key")
        .unwrap()
        .1
        .clone();
    assert!(key.starts_with("batch-") && key.len() == 22, "{key}");
    // Same events in another order: same key.
    let b = batch(vec![event(2, Some(1), T), event(1, None, T)]);
    let all: Vec<_> = b.events.iter().collect();
    assert_eq!(batch_key(&all), key);
    assert_ne!(batch_key(&all[1..]), key);

    // Best-effort batch failure dead-letters every event of the request.
    let host = MockHost::at(T);
    host.push_http_status(404, &[]);
    let mut a = api(serde_json::json!({"mode": "batch", "policy": "best-effort"}));
    match a.write(&host, &b) {
        WriteOutcome::Rejected(r) => assert_eq!(r.len(), 2),
        other => panic!("{other:?}"),
    }
}

/// The batch body is the JSON array of the records, the first copy of each event id kept.
#[test]
fn batch_body_is_the_array_of_first_copies() {
    let mut second = event(1, Some(9), T + 1);
    second.device = Some("tv".into());
    let b = batch(vec![
        event(1, Some(1), T),
        event(2, None, T),
        second,
        event(3, Some(2), T),
    ]);
    let events = first_by_event_id(&b);
    let ids: Vec<i64> = events.iter().map(|e| e.event_id()).collect();
    assert_eq!(ids, [1, 2, 3]);
    assert_eq!(events[0].content_id(), Some(1), "the first copy");
    let rows: Vec<String> = events.iter().map(|e| event_json_string(*e)).collect();
    assert_eq!(json_array(&events), format!("[{}]", rows.join(",")));
    assert_eq!(json_array(&[]), "[]");
}
