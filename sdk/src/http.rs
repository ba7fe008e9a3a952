//! HTTP helpers over [`Host::http_send`].

use crate::{CapabilityError, Host, WasmHost};

pub use crate::bindings::fanout::sink::http::{Request, Response};

/// A `POST` with a JSON body and `Content-Type: application/json`, plus `headers`.
pub fn json_post_request(
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
    timeout_ms: u32,
) -> Request {
    let mut all = vec![("Content-Type".to_string(), "application/json".to_string())];
    all.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Request {
        method: "POST".into(),
        url: url.into(),
        headers: all,
        body: body.as_bytes().to_vec(),
        timeout_ms,
    }
}

/// POSTs a JSON text to `url` through the real host.
pub fn post_json(
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
    timeout_ms: u32,
) -> Result<Response, CapabilityError> {
    post_json_on(&WasmHost, url, body, headers, timeout_ms)
}

/// [`post_json`] on any [`Host`].
pub fn post_json_on(
    host: &(impl Host + ?Sized),
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
    timeout_ms: u32,
) -> Result<Response, CapabilityError> {
    host.http_send(&json_post_request(url, body, headers, timeout_ms))
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
