//! The Lua script against a real Redis: `FANOUT_TEST_REDIS=127.0.0.1:6379 cargo test
//! --manifest-path plugins/Cargo.toml -p redis-topn`. Skipped (passes) when the variable is
//! unset. Uses keys under a unique prefix and deletes them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use super::*;
use fanout_sdk::http::{Request, Response};
use fanout_sdk::redis::Scalar;
use fanout_sdk::testing::{batch, event};
use fanout_sdk::CapabilityError;

/// A minimal RESP2 client acting as the host's Redis capability.
struct RespHost {
    conn: std::cell::RefCell<BufReader<TcpStream>>,
    now: i64,
}

fn read_line(r: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    r.read_line(&mut line).expect("read");
    line.trim_end().to_string()
}

fn read_bulk(r: &mut BufReader<TcpStream>, len: i64) -> Option<Vec<u8>> {
    if len < 0 {
        return None;
    }
    let mut buf = vec![0u8; len as usize + 2];
    r.read_exact(&mut buf).expect("read bulk");
    buf.truncate(len as usize);
    Some(buf)
}

fn read_scalar(r: &mut BufReader<TcpStream>) -> Result<Scalar, String> {
    let line = read_line(r);
    let (t, rest) = line.split_at(1);
    Ok(match t {
        "+" => Scalar::Status(rest.into()),
        "-" => return Err(rest.into()),
        ":" => Scalar::Integer(rest.parse().expect("int")),
        "$" => read_bulk(r, rest.parse().expect("len")).map_or(Scalar::Nil, Scalar::Data),
        other => panic!("nested reply {other}"),
    })
}

fn read_reply(r: &mut BufReader<TcpStream>) -> Result<Reply, String> {
    let line = read_line(r);
    let (t, rest) = line.split_at(1);
    Ok(match t {
        "+" => Reply::Status(rest.into()),
        "-" => return Err(rest.into()),
        ":" => Reply::Integer(rest.parse().expect("int")),
        "$" => read_bulk(r, rest.parse().expect("len")).map_or(Reply::Nil, Reply::Data),
        "*" => {
            let n: i64 = rest.parse().expect("len");
            let mut items = Vec::new();
            for _ in 0..n.max(0) {
                items.push(read_scalar(r)?);
            }
            Reply::Array(items)
        }
        other => panic!("unknown reply type {other}"),
    })
}

impl Host for RespHost {
    fn redis_pipeline(
        &self,
        commands: &[Command],
        _atomic: bool,
    ) -> Result<Vec<Reply>, CapabilityError> {
        let mut conn = self.conn.borrow_mut();
        let mut out = Vec::new();
        for c in commands {
            out.extend_from_slice(format!("*{}\r\n", c.len()).as_bytes());
            for a in c {
                out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                out.extend_from_slice(a);
                out.extend_from_slice(b"\r\n");
            }
        }
        conn.get_mut().write_all(&out).expect("write");
        let mut replies = Vec::new();
        let mut error = None;
        for _ in commands {
            match read_reply(&mut conn) {
                Ok(r) => replies.push(r),
                Err(e) => error = Some(e),
            }
        }
        match error {
            Some(e) => Err(CapabilityError::Failed(e)),
            None => Ok(replies),
        }
    }
    fn http_send(&self, _: &Request) -> Result<Response, CapabilityError> {
        unimplemented!()
    }
    fn clickhouse_execute(&self, _: &str) -> Result<String, CapabilityError> {
        unimplemented!()
    }
    fn clickhouse_insert_json_rows(
        &self,
        _: &str,
        _: &str,
        _: &[String],
    ) -> Result<(), CapabilityError> {
        unimplemented!()
    }
    fn now_micros(&self) -> i64 {
        self.now
    }
}

fn get(host: &RespHost, args: &[&str]) -> Reply {
    let mut r = fanout_sdk::redis::pipeline_on(host, &[args], false).expect("redis");
    r.remove(0)
}

#[test]
fn script_is_idempotent_and_keeps_newest_last_event() {
    let Ok(addr) = std::env::var("FANOUT_TEST_REDIS") else {
        eprintln!("FANOUT_TEST_REDIS unset: skipped");
        return;
    };
    let stream = TcpStream::connect(&addr).expect("connect");
    let now = fanout_sdk::time::now_micros();
    let host = RespHost {
        conn: std::cell::RefCell::new(BufReader::new(stream)),
        now,
    };
    let prefix = format!("topn-test-{}-{}:", std::process::id(), now);
    let sink =
        RedisTopN::new(Config::from_json(serde_json::json!({"key_prefix": prefix})).unwrap());

    let min = MICROS_PER_MINUTE;
    let mut newest = event(2, Some(7), now - min);
    newest.device = Some("ios".into());
    let b = batch(vec![
        event(1, Some(7), now - 2 * min),
        newest,
        event(3, Some(8), now),
        event(4, None, now),
        event(5, Some(7), now - 30 * min), // too old for a bucket, still counted
    ]);
    assert!(matches!(sink.write_with(&host, &b), WriteOutcome::Accepted));
    // Replay, and an out-of-order older event arriving later.
    assert!(matches!(sink.write_with(&host, &b), WriteOutcome::Accepted));
    let late = batch(vec![event(6, Some(7), now - 3 * min)]);
    assert!(matches!(
        sink.write_with(&host, &late),
        WriteOutcome::Accepted
    ));

    let k = |s: &str| format!("{prefix}{s}");
    assert_eq!(
        fanout_sdk::redis::reply_int(&get(&host, &["GET", &k("content:count:7")])),
        Some(4)
    );
    assert_eq!(
        fanout_sdk::redis::reply_int(&get(&host, &["GET", &k("content:count:8")])),
        Some(1)
    );
    let last =
        fanout_sdk::redis::reply_string(&get(&host, &["GET", &k("content:last:7")])).unwrap();
    let last: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["event_id"], 2, "{last}");
    assert_eq!(last["device"], "ios");
    let ttl = fanout_sdk::redis::reply_int(&get(&host, &["TTL", &k("content:last:7")])).unwrap();
    assert!(ttl > 3500 && ttl <= 3600, "{ttl}");
    let top = get(
        &host,
        &["ZRANGE", &k("top:content:10m"), "0", "-1", "WITHSCORES"],
    );
    let top: Vec<String> = match top {
        Reply::Array(items) => items
            .iter()
            .map(|s| match s {
                Scalar::Data(d) => String::from_utf8_lossy(d).into_owned(),
                other => format!("{other:?}"),
            })
            .collect(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        top,
        vec!["8", "1", "7", "3"],
        "content 7 has 3 events in the window"
    );
    let ttl = fanout_sdk::redis::reply_int(&get(&host, &["TTL", &k("top:content:10m")])).unwrap();
    assert!(ttl > 100 && ttl <= 120, "{ttl}");
    let old_bucket = sink.cfg.bucket_key(now - 30 * min);
    assert_eq!(get(&host, &["EXISTS", &old_bucket]), Reply::Integer(0));

    // Clean up.
    let keys = get(&host, &["KEYS", &format!("{prefix}*")]);
    if let Reply::Array(items) = keys {
        for s in items {
            if let Scalar::Data(d) = s {
                get(&host, &["DEL", &String::from_utf8_lossy(&d)]);
            }
        }
    }
    for id in 1..=6 {
        get(&host, &["DEL", &sink.cfg.seen_key(id)]);
    }
}
