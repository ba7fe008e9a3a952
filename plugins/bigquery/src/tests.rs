use super::*;
use fanout_sdk::http::Response;
use fanout_sdk::testing::{batch, event, Call, MockHost};
use fanout_sdk::CapabilityError;

fn cfg(extra: serde_json::Value) -> Config {
    let mut base = serde_json::json!({"project": "p-1", "url": "http://bq/"});
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    Config::from_json(base).unwrap()
}

fn json_response(status: u16, body: serde_json::Value) -> Result<Response, CapabilityError> {
    Ok(Response {
        status,
        headers: vec![],
        body: body.to_string().into_bytes(),
    })
}

/// Ready schema (create_table off) so the script starts at the lookup.
fn ready(extra: serde_json::Value) -> BigQuerySink {
    let mut c = cfg(extra);
    c.create_table = false;
    BigQuerySink::new(c)
}

fn lookup_answer(ids: &[i64]) -> Result<Response, CapabilityError> {
    let rows: Vec<serde_json::Value> = ids
        .iter()
        .map(|i| serde_json::json!({"f": [{"v": i.to_string()}]}))
        .collect();
    json_response(
        200,
        serde_json::json!({"jobComplete": true, "jobReference": {"jobId": "j"}, "rows": rows}),
    )
}

fn http_calls(host: &MockHost) -> Vec<(String, String, String)> {
    host.service_calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Http {
                method, url, body, ..
            } => Some((method, url, body)),
            _ => None,
        })
        .collect()
}

#[test]
fn config_defaults_and_validation() {
    assert!(
        Config::from_json(serde_json::json!({})).is_err(),
        "project is required"
    );
    let c = cfg(serde_json::json!({}));
    assert_eq!(c.target().qualified(), "`p-1.engagement.events_enriched`");
    assert_eq!(c.target().base, "http://bq");
    for bad in [
        serde_json::json!({"project": "p", "table": "x; DROP"}),
        serde_json::json!({"project": "p", "dataset": "a.b"}),
        serde_json::json!({"project": "p`x"}),
        serde_json::json!({"project": "p", "concurrency": 0}),
        serde_json::json!({"project": "p", "url": "ftp://x"}),
        serde_json::json!({"project": "p", "tabel": "x"}),
    ] {
        assert!(Config::from_json(bad.clone()).is_err(), "{bad}");
    }
}

#[test]
fn creates_dataset_and_table_then_inserts_with_insert_ids() {
    let host = MockHost::new();
    host.push_http_status(200, &[]); // dataset
    host.push_http(json_response(
        409,
        serde_json::json!({"error": {"message": "Already Exists", "errors": [{"reason": "duplicate"}]}}),
    )); // table exists: fine
    host.push_http(lookup_answer(&[]));
    host.push_http(json_response(200, serde_json::json!({})));
    let mut s = BigQuerySink::new(cfg(serde_json::json!({"token": "tok"})));
    let mut spec = event(16, Some(1), 1_767_882_112_000_000);
    spec.engagement_pct = Some(0.02);
    let out = s.write_with(&host, &batch(vec![spec, event(17, None, 0)]));
    assert_eq!(out, WriteOutcome::Accepted);
    let calls = http_calls(&host);
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[0].1, "http://bq/bigquery/v2/projects/p-1/datasets");
    assert_eq!(
        calls[1].1,
        "http://bq/bigquery/v2/projects/p-1/datasets/engagement/tables"
    );
    let table: serde_json::Value = serde_json::from_str(&calls[1].2).unwrap();
    assert_eq!(table["schema"]["fields"][4]["type"], "TIMESTAMP");
    assert_eq!(table["schema"]["fields"].as_array().unwrap().len(), 11);
    assert_eq!(calls[2].1, "http://bq/bigquery/v2/projects/p-1/queries");
    assert!(calls[2].2.contains(
        "SELECT DISTINCT event_id FROM `p-1.engagement.events_enriched` WHERE event_id IN (16,17)"
    ));
    assert!(calls[3]
        .1
        .ends_with("/datasets/engagement/tables/events_enriched/insertAll"));
    let body: serde_json::Value = serde_json::from_str(&calls[3].2).unwrap();
    assert_eq!(body["skipInvalidRows"], true);
    assert_eq!(body["rows"][0]["insertId"], "16");
    assert_eq!(body["rows"][0]["json"]["event_ts"], "2026-01-08 14:21:52");
    assert_eq!(body["rows"][0]["json"]["engagement_pct"], 0.02);
    assert!(body["rows"][1]["json"]["content_id"].is_null());
    let auth = host.calls().into_iter().find_map(|c| match c {
        Call::Http { headers, .. } => headers
            .into_iter()
            .find(|(k, _)| k == "Authorization")
            .map(|(_, v)| v),
        _ => None,
    });
    assert_eq!(auth.as_deref(), Some("Bearer tok"));
    assert_eq!(host.counter("rows_inserted"), 2);
}

#[test]
fn stored_ids_are_not_inserted_again() {
    let host = MockHost::new();
    host.push_http(lookup_answer(&[1, 2]));
    let mut s = ready(serde_json::json!({}));
    let b = batch(vec![
        event(1, Some(1), 0),
        event(2, Some(1), 0),
        event(3, None, 0),
        event(3, None, 0),
    ]);
    assert_eq!(s.write_with(&host, &b), WriteOutcome::Accepted);
    let calls = http_calls(&host);
    assert_eq!(calls.len(), 2);
    let body: serde_json::Value = serde_json::from_str(&calls[1].2).unwrap();
    assert_eq!(body["rows"].as_array().unwrap().len(), 1);
    assert_eq!(body["rows"][0]["insertId"], "3");
    assert_eq!(host.counter("rows_skipped_duplicate"), 2);

    // Everything stored: no insert at all.
    host.push_http(lookup_answer(&[1, 2, 3]));
    assert_eq!(s.write_with(&host, &b), WriteOutcome::Accepted);
    assert_eq!(http_calls(&host).len(), 3);
}

#[test]
fn lookup_follows_pages_of_a_slow_query() {
    let host = MockHost::new();
    host.push_http(json_response(
        200,
        serde_json::json!({"jobComplete": false, "jobReference": {"jobId": "j1", "location": "EU"}}),
    ));
    host.push_http(json_response(
        200,
        serde_json::json!({"jobComplete": true, "jobReference": {"jobId": "j1"}, "pageToken": "2",
                           "rows": [{"f": [{"v": "1"}]}]}),
    ));
    host.push_http(lookup_answer(&[2]));
    let mut s = ready(serde_json::json!({}));
    let b = batch(vec![
        event(1, None, 0),
        event(2, None, 0),
        event(3, None, 0),
    ]);
    assert_eq!(s.write_with(&host, &b), WriteOutcome::Accepted);
    let calls = http_calls(&host);
    assert_eq!(calls[1].0, "GET");
    assert!(calls[1].1.contains("/queries/j1?") && calls[1].1.contains("location=EU"));
    assert!(calls[2].1.contains("pageToken=2"));
    let body: serde_json::Value = serde_json::from_str(&calls[3].2).unwrap();
    assert_eq!(body["rows"].as_array().unwrap().len(), 1, "{body}");
}

#[test]
fn invalid_rows_are_rejected_with_bigquerys_reason_and_transient_rows_resent() {
    let host = MockHost::new();
    host.push_http(lookup_answer(&[]));
    host.push_http(json_response(
        200,
        serde_json::json!({"insertErrors": [
            {"index": 1, "errors": [{"reason": "invalid", "location": "content_id",
                                     "message": "Missing required field: content_id."}]},
            {"index": 2, "errors": [{"reason": "backendError", "message": "try again"}]},
        ]}),
    ));
    host.push_http(json_response(200, serde_json::json!({})));
    // Under fail-fast too: no retry makes an invalid row valid.
    let mut s = ready(serde_json::json!({"policy": "fail-fast"}));
    let b = batch(vec![
        event(1, Some(1), 0),
        event(2, None, 0),
        event(3, Some(1), 0),
    ]);
    let out = s.write_with(&host, &b);
    let WriteOutcome::Rejected(r) = out else {
        panic!("{out:?}")
    };
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].event_id, 2);
    assert!(
        r[0].reason
            .contains("invalid at content_id: Missing required field: content_id."),
        "{}",
        r[0].reason
    );
    let calls = http_calls(&host);
    assert_eq!(calls.len(), 3);
    let resent: serde_json::Value = serde_json::from_str(&calls[2].2).unwrap();
    assert_eq!(resent["rows"].as_array().unwrap().len(), 1);
    assert_eq!(resent["rows"][0]["insertId"], "3");
    assert_eq!(host.counter("rows_inserted"), 2);
    assert_eq!(host.counter("rows_dead_lettered"), 1);
    assert_eq!(host.sleeps().len(), 1);
}

#[test]
fn out_of_range_event_time_is_rejected_before_sending() {
    let host = MockHost::new();
    host.push_http(lookup_answer(&[]));
    let mut s = ready(serde_json::json!({}));
    let b = batch(vec![
        event(1, None, 0),
        event(2, None, api::MAX_TIMESTAMP_MICROS + 1),
    ]);
    let WriteOutcome::Rejected(r) = s.write_with(&host, &b) else {
        panic!()
    };
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].event_id, 2);
    assert!(r[0].reason.contains("TIMESTAMP range"));
    let calls = http_calls(&host);
    assert!(calls[0].2.contains("IN (1)"), "{}", calls[0].2);
}

#[test]
fn unavailable_bigquery_fail_fast_waits_best_effort_dead_letters() {
    for (policy, want_retry) in [("fail-fast", true), ("best-effort", false)] {
        let host = MockHost::new();
        host.push_http(lookup_answer(&[]));
        for _ in 0..3 {
            host.push_http(json_response(
                503,
                serde_json::json!({"error": {"message": "down", "errors": [{"reason": "backendError"}]}}),
            ));
        }
        let mut s = ready(serde_json::json!({"policy": policy, "max_retries": 2}));
        let out = s.write_with(&host, &batch(vec![event(1, None, 0), event(2, None, 0)]));
        match out {
            WriteOutcome::RetryLater(m) if want_retry => {
                assert!(
                    m.contains("HTTP 503 backendError: down (after 3 attempts)"),
                    "{m}"
                )
            }
            WriteOutcome::Rejected(r) if !want_retry => {
                assert_eq!(r.len(), 2);
                assert!(r[0].reason.contains("HTTP 503"), "{}", r[0].reason);
            }
            other => panic!("{policy}: {other:?}"),
        }
        assert_eq!(host.sleeps().len(), 2, "{policy}");
        // Backoff: 100-200 ms, then 200-400 ms.
        let sleeps = host.sleeps();
        assert!(
            (100..=200).contains(&sleeps[0]) && (200..=400).contains(&sleeps[1]),
            "{sleeps:?}"
        );
    }
}

#[test]
fn a_missing_table_or_token_problem_waits_under_both_policies() {
    for status in [401, 403, 404] {
        let host = MockHost::new();
        host.push_http(lookup_answer(&[]));
        host.push_http(json_response(
            status,
            serde_json::json!({"error": {"message": "nope", "errors": [{"reason": "notFound"}]}}),
        ));
        let mut s = ready(serde_json::json!({"policy": "best-effort"}));
        let out = s.write_with(&host, &batch(vec![event(1, None, 0)]));
        assert!(
            matches!(&out, WriteOutcome::RetryLater(m) if m.contains(&format!("HTTP {status}"))),
            "{out:?}"
        );
    }
}

#[test]
fn a_refused_lookup_waits_instead_of_dead_lettering() {
    let host = MockHost::new();
    host.push_http(json_response(
        400,
        serde_json::json!({"error": {"message": "Unrecognized name: event_id", "errors": [{"reason": "invalidQuery"}]}}),
    ));
    let mut s = ready(serde_json::json!({"policy": "best-effort"}));
    let out = s.write_with(&host, &batch(vec![event(1, None, 0)]));
    assert!(
        matches!(&out, WriteOutcome::RetryLater(m) if m.contains("Unrecognized name")),
        "{out:?}"
    );
}

#[test]
fn rate_limit_403_is_retried_and_retry_after_honoured() {
    let host = MockHost::new();
    host.push_http(lookup_answer(&[]));
    host.push_http(Ok(Response {
        status: 403,
        headers: vec![("Retry-After".into(), "2".into())],
        body: serde_json::json!({"error": {"message": "slow down", "errors": [{"reason": "rateLimitExceeded"}]}})
            .to_string()
            .into_bytes(),
    }));
    host.push_http(json_response(200, serde_json::json!({})));
    let mut s = ready(serde_json::json!({}));
    assert_eq!(
        s.write_with(&host, &batch(vec![event(1, None, 0)])),
        WriteOutcome::Accepted
    );
    assert_eq!(host.sleeps(), vec![2000]);
}

#[test]
fn requests_are_split_and_sent_concurrently() {
    let host = MockHost::new();
    host.push_http(lookup_answer(&[]));
    let mut s = ready(serde_json::json!({"rows_per_request": 2, "concurrency": 3}));
    let b = batch((1..=5).map(|i| event(i, None, 0)).collect());
    assert_eq!(s.write_with(&host, &b), WriteOutcome::Accepted);
    assert_eq!(host.http_send_alls(), vec![(3, 3)]);
    assert_eq!(host.counter("rows_inserted"), 5);
}
