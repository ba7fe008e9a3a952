//! HTTP helpers over [`Host::http_send`] and [`Host::http_send_all`].

use crate::{CapabilityError, Host};

pub use crate::bindings::fanout::sink::http::{Request, Response};

/// The most requests the host keeps in flight for one [`Host::http_send_all`] call; a larger
/// `max_in_flight` is clamped to it.
pub const MAX_IN_FLIGHT: u32 = 256;

/// A `POST` with a JSON body and `Content-Type: application/json`, plus `headers`.
pub fn json_post_request(
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
    timeout_ms: u32,
) -> Request {
    json_post_request_owned(url, body.as_bytes().to_vec(), headers, timeout_ms)
}

/// [`json_post_request`] taking the body by value: a body built for the request (a batch's
/// JSON array, an event's record) moves into it instead of being copied.
pub fn json_post_request_owned(
    url: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
    timeout_ms: u32,
) -> Request {
    let mut all = Vec::with_capacity(1 + headers.len());
    all.push(("Content-Type".to_string(), "application/json".to_string()));
    all.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Request {
        method: "POST".into(),
        url: url.into(),
        headers: all,
        body,
        timeout_ms,
    }
}

/// POSTs a JSON text to `url` through `host`.
pub fn post_json(
    host: &(impl Host + ?Sized),
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
    timeout_ms: u32,
) -> Result<Response, CapabilityError> {
    host.http_send(&json_post_request(url, body, headers, timeout_ms))
}

/// The idempotency key of a request carrying these events: `fanout-` and a hash of their
/// sorted, distinct event ids. The same events (in any order, repeated or not) give the same
/// key, so a receiver that honours `Idempotency-Key` recognises a retry or a replay.
pub fn idempotency_key(event_ids: impl IntoIterator<Item = i64>) -> String {
    let mut ids: Vec<i64> = event_ids.into_iter().collect();
    ids.sort_unstable();
    ids.dedup();
    // FNV-1a: stable across builds and languages (the Python SDK computes the same).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in ids {
        for b in id.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("fanout-{h:016x}")
}

/// POSTs a JSON text carrying `events` with their [`idempotency_key`] as `Idempotency-Key`:
/// the exactly-once primitive of HTTP, on the receiver's side.
pub fn post_events_json(
    host: &(impl Host + ?Sized),
    url: &str,
    body: &str,
    events: &[crate::Event<'_>],
    timeout_ms: u32,
) -> Result<Response, CapabilityError> {
    let key = idempotency_key(events.iter().map(|e| e.event_id()));
    post_json(
        host,
        url,
        body,
        &[("Idempotency-Key", key.as_str())],
        timeout_ms,
    )
}

/// The first value of header `name` (case-insensitive).
pub fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The body as text (lossy), for error messages.
pub fn body_text(response: &Response) -> String {
    String::from_utf8_lossy(&response.body).into_owned()
}

#[cfg(test)]
mod idempotency_tests {
    use super::*;
    use crate::testing::{batch, event, Call, MockHost};

    #[test]
    fn same_events_same_key_in_any_order() {
        assert_eq!(idempotency_key([3, 1, 2, 2]), idempotency_key([1, 2, 3]));
        assert_ne!(idempotency_key([1, 2]), idempotency_key([1, 2, 3]));
        assert!(idempotency_key([1]).starts_with("fanout-"));
    }

    #[test]
    fn a_replayed_post_carries_the_same_key() {
        let host = MockHost::new();
        let b = batch(vec![event(1, Some(1), 0), event(2, None, 0)]);
        let events: Vec<_> = b.events.iter().collect();
        for _ in 0..2 {
            post_events_json(&host, "http://api/events", "[]", &events, 1000).unwrap();
        }
        let keys: Vec<String> = host
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Http { headers, .. } => headers
                    .into_iter()
                    .find(|(k, _)| k == "Idempotency-Key")
                    .map(|(_, v)| v),
                _ => None,
            })
            .collect();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], keys[1]);
        assert_eq!(keys[0], idempotency_key([1, 2]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Call, MockHost};

    #[test]
    fn send_all_answers_in_order_from_the_mock_script() {
        let host = MockHost::new();
        host.push_http_status(503, &[("Retry-After", "2")]);
        host.push_http(Err(CapabilityError::Failed("refused".into())));
        let requests: Vec<Request> = (0..3)
            .map(|i| json_post_request("http://api/x", &format!("{i}"), &[], 1000))
            .collect();
        let out = host.http_send_all(&requests, 8);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].as_ref().map(|r| r.status), Ok(503));
        assert!(matches!(out[1], Err(CapabilityError::Failed(_))));
        assert_eq!(
            out[2].as_ref().map(|r| r.status),
            Ok(200),
            "queue empty: 200"
        );
        assert_eq!(host.http_send_alls(), vec![(8, 3)]);
        let bodies: Vec<String> = host
            .service_calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Http { body, .. } => Some(body),
                _ => None,
            })
            .collect();
        assert_eq!(bodies, ["0", "1", "2"]);
    }

    #[test]
    fn native_wasm_host_refuses_every_request() {
        let requests = vec![json_post_request("http://api/x", "{}", &[], 1000); 2];
        let out = crate::WasmHost.http_send_all(&requests, 4);
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|r| matches!(r, Err(CapabilityError::NotGranted(_)))));
    }
}
