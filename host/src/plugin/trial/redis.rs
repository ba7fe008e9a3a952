//! The in-memory Redis of `fanout plugin test`: strings, bitmaps, hashes, lists, sets, sorted
//! sets, HyperLogLogs (counted exactly), expiry, and `EVAL`/`EVALSHA` run in Lua 5.1 (the
//! language Redis embeds) with `redis.call`, `redis.pcall`, `redis.error_reply`,
//! `redis.status_reply`, `cjson.encode`/`decode`. So the SDK's exactly-once script and a
//! plugin's own scripts run as they would in Redis, against this store. A command it does
//! not implement is an error naming it, never a silent `nil`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::rc::Rc;

use mlua::{Lua, LuaSerdeExt, MultiValue, Value as LuaValue};

/// A reply as Redis forms it (nested arrays included: scripts may return them).
#[derive(Debug, Clone, PartialEq)]
pub enum RedisValue {
    Nil,
    Int(i64),
    Bulk(Vec<u8>),
    Status(String),
    Error(String),
    Array(Vec<RedisValue>),
}

impl RedisValue {
    fn bulk(s: impl Into<Vec<u8>>) -> Self {
        RedisValue::Bulk(s.into())
    }

    fn ok() -> Self {
        RedisValue::Status("OK".into())
    }

    fn err(message: impl Into<String>) -> Self {
        RedisValue::Error(message.into())
    }

    /// As `redis-cli` would print it, on one line.
    pub fn text(&self) -> String {
        match self {
            RedisValue::Nil => "(nil)".into(),
            RedisValue::Int(i) => i.to_string(),
            RedisValue::Bulk(b) => format!("{:?}", String::from_utf8_lossy(b)),
            RedisValue::Status(s) => s.clone(),
            RedisValue::Error(e) => format!("(error) {e}"),
            RedisValue::Array(items) => format!(
                "[{}]",
                items
                    .iter()
                    .map(|v| v.text())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

#[derive(Debug, Clone)]
enum Data {
    Str(Vec<u8>),
    Hash(BTreeMap<Vec<u8>, Vec<u8>>),
    List(VecDeque<Vec<u8>>),
    Set(BTreeSet<Vec<u8>>),
    ZSet(BTreeMap<Vec<u8>, f64>),
    /// A HyperLogLog, kept as the exact set of its elements.
    Hll(BTreeSet<Vec<u8>>),
}

impl Data {
    fn type_name(&self) -> &'static str {
        match self {
            Data::Str(_) | Data::Hll(_) => "string",
            Data::Hash(_) => "hash",
            Data::List(_) => "list",
            Data::Set(_) => "set",
            Data::ZSet(_) => "zset",
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Data::Str(_) | Data::Hll(_) => false,
            Data::Hash(h) => h.is_empty(),
            Data::List(l) => l.is_empty(),
            Data::Set(s) => s.is_empty(),
            Data::ZSet(z) => z.is_empty(),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    data: Data,
    /// Unix milliseconds.
    expires_at: Option<i64>,
}

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The store: keys and the scripts seen (by SHA-1, for `EVALSHA`).
#[derive(Debug, Default, Clone)]
pub struct FakeRedis {
    keys: BTreeMap<Vec<u8>, Entry>,
    scripts: HashMap<String, Vec<u8>>,
    /// The commands scripts ran (`redis.call`/`pcall`) since the last [`FakeRedis::take_script_calls`].
    script_calls: Vec<Vec<String>>,
}

type Args<'a> = &'a [Vec<u8>];

fn text(a: &[u8]) -> String {
    String::from_utf8_lossy(a).into_owned()
}

fn int(a: &[u8]) -> Result<i64, RedisValue> {
    std::str::from_utf8(a)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RedisValue::err("ERR value is not an integer or out of range"))
}

fn float(a: &[u8]) -> Result<f64, RedisValue> {
    let s = std::str::from_utf8(a).unwrap_or("").to_ascii_lowercase();
    match s.as_str() {
        "+inf" | "inf" => Ok(f64::INFINITY),
        "-inf" => Ok(f64::NEG_INFINITY),
        _ => s
            .parse::<f64>()
            .ok()
            .filter(|f| !f.is_nan())
            .ok_or_else(|| RedisValue::err("ERR value is not a valid float")),
    }
}

/// A score as Redis prints it: integers without a fraction, others in the shortest form.
fn score_text(f: f64) -> Vec<u8> {
    if f.is_infinite() {
        return if f > 0.0 {
            b"inf".to_vec()
        } else {
            b"-inf".to_vec()
        };
    }
    if f.fract() == 0.0 && f.abs() < 1e17 {
        return format!("{}", f as i64).into_bytes();
    }
    format!("{f}").into_bytes()
}

fn arity(args: Args, min: usize) -> Result<(), RedisValue> {
    if args.len() < min {
        return Err(RedisValue::err(format!(
            "ERR wrong number of arguments for '{}' command",
            text(&args[0]).to_ascii_lowercase()
        )));
    }
    Ok(())
}

/// Resolves Redis's inclusive, possibly negative, range over `len` items.
fn range(start: i64, stop: i64, len: usize) -> Option<(usize, usize)> {
    let len = len as i64;
    let s = if start < 0 {
        (len + start).max(0)
    } else {
        start
    };
    let e = if stop < 0 {
        len + stop
    } else {
        stop.min(len - 1)
    };
    (s <= e && s < len).then_some((s as usize, e as usize))
}

impl FakeRedis {
    /// The commands scripts ran since the last call, as text.
    pub fn take_script_calls(&mut self) -> Vec<Vec<String>> {
        std::mem::take(&mut self.script_calls)
    }

    /// Every live key with its type, value and TTL, for the report.
    pub fn dump(&self) -> Vec<(String, String, String, Option<i64>)> {
        let now = now_ms();
        self.keys
            .iter()
            .filter(|(_, e)| e.expires_at.is_none_or(|t| t > now))
            .map(|(k, e)| {
                let value = match &e.data {
                    Data::Str(s) => format!("{:?}", text(s)),
                    Data::Hash(h) => format!(
                        "{{{}}}",
                        h.iter()
                            .map(|(f, v)| format!("{}: {:?}", text(f), text(v)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    Data::List(l) => format!(
                        "[{}]",
                        l.iter()
                            .map(|v| format!("{:?}", text(v)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    Data::Set(s) | Data::Hll(s) => format!(
                        "{{{}}}",
                        s.iter()
                            .map(|v| format!("{:?}", text(v)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    Data::ZSet(z) => {
                        let mut items: Vec<_> = z.iter().collect();
                        items.sort_by(|a, b| b.1.total_cmp(a.1).then(b.0.cmp(a.0)));
                        format!(
                            "{{{}}}",
                            items
                                .iter()
                                .map(|(m, s)| format!("{}: {}", text(m), text(&score_text(**s))))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                };
                let ttl = e.expires_at.map(|t| (t - now + 999) / 1000);
                (text(k), e.data.type_name().to_string(), value, ttl)
            })
            .collect()
    }

    fn live(&mut self, key: &[u8]) -> Option<&mut Entry> {
        let now = now_ms();
        if self
            .keys
            .get(key)
            .is_some_and(|e| e.expires_at.is_some_and(|t| t <= now))
        {
            self.keys.remove(key);
        }
        self.keys.get_mut(key)
    }

    fn exists(&mut self, key: &[u8]) -> bool {
        self.live(key).is_some()
    }

    /// The key's data, made with `make` when absent; WRONGTYPE when `matches` says no.
    fn entry(
        &mut self,
        key: &[u8],
        make: fn() -> Data,
        matches: fn(&Data) -> bool,
    ) -> Result<&mut Data, RedisValue> {
        if self.live(key).is_none() {
            self.keys.insert(
                key.to_vec(),
                Entry {
                    data: make(),
                    expires_at: None,
                },
            );
        }
        let e = self
            .keys
            .get_mut(key)
            .ok_or_else(|| RedisValue::err("ERR"))?;
        if matches(&e.data) {
            Ok(&mut e.data)
        } else {
            Err(RedisValue::err(WRONGTYPE))
        }
    }

    fn drop_if_empty(&mut self, key: &[u8]) {
        if self.keys.get(key).is_some_and(|e| e.data.is_empty()) {
            self.keys.remove(key);
        }
    }

    fn get_str(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, RedisValue> {
        match self.live(key).map(|e| &e.data) {
            None => Ok(None),
            Some(Data::Str(s)) => Ok(Some(s.clone())),
            Some(_) => Err(RedisValue::err(WRONGTYPE)),
        }
    }

    fn set_str(&mut self, key: &[u8], value: Vec<u8>, expires_at: Option<i64>) {
        self.keys.insert(
            key.to_vec(),
            Entry {
                data: Data::Str(value),
                expires_at,
            },
        );
    }

    fn incr_by(&mut self, key: &[u8], by: i64) -> Result<RedisValue, RedisValue> {
        let cur = match self.get_str(key)? {
            None => 0,
            Some(s) => int(&s)?,
        };
        let next = cur
            .checked_add(by)
            .ok_or_else(|| RedisValue::err("ERR increment or decrement would overflow"))?;
        let ttl = self.live(key).and_then(|e| e.expires_at);
        self.set_str(key, next.to_string().into_bytes(), ttl);
        Ok(RedisValue::Int(next))
    }

    fn zset(&mut self, key: &[u8]) -> Result<&mut BTreeMap<Vec<u8>, f64>, RedisValue> {
        match self.entry(
            key,
            || Data::ZSet(BTreeMap::new()),
            |d| matches!(d, Data::ZSet(_)),
        )? {
            Data::ZSet(z) => Ok(z),
            _ => Err(RedisValue::err(WRONGTYPE)),
        }
    }

    fn zset_read(&mut self, key: &[u8]) -> Result<BTreeMap<Vec<u8>, f64>, RedisValue> {
        match self.live(key).map(|e| &e.data) {
            None => Ok(BTreeMap::new()),
            Some(Data::ZSet(z)) => Ok(z.clone()),
            Some(Data::Set(s)) => Ok(s.iter().map(|m| (m.clone(), 1.0)).collect()),
            Some(_) => Err(RedisValue::err(WRONGTYPE)),
        }
    }

    fn hash(&mut self, key: &[u8]) -> Result<&mut BTreeMap<Vec<u8>, Vec<u8>>, RedisValue> {
        match self.entry(
            key,
            || Data::Hash(BTreeMap::new()),
            |d| matches!(d, Data::Hash(_)),
        )? {
            Data::Hash(h) => Ok(h),
            _ => Err(RedisValue::err(WRONGTYPE)),
        }
    }

    fn set(&mut self, key: &[u8]) -> Result<&mut BTreeSet<Vec<u8>>, RedisValue> {
        match self.entry(
            key,
            || Data::Set(BTreeSet::new()),
            |d| matches!(d, Data::Set(_)),
        )? {
            Data::Set(s) => Ok(s),
            _ => Err(RedisValue::err(WRONGTYPE)),
        }
    }

    fn list(&mut self, key: &[u8]) -> Result<&mut VecDeque<Vec<u8>>, RedisValue> {
        match self.entry(
            key,
            || Data::List(VecDeque::new()),
            |d| matches!(d, Data::List(_)),
        )? {
            Data::List(l) => Ok(l),
            _ => Err(RedisValue::err(WRONGTYPE)),
        }
    }

    /// Sorted members, lowest score first (ties by member), as Redis orders them.
    fn sorted(z: &BTreeMap<Vec<u8>, f64>) -> Vec<(Vec<u8>, f64)> {
        let mut items: Vec<_> = z.iter().map(|(m, s)| (m.clone(), *s)).collect();
        items.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        items
    }

    fn with_scores(items: &[(Vec<u8>, f64)], scores: bool) -> RedisValue {
        let mut out = Vec::new();
        for (m, s) in items {
            out.push(RedisValue::bulk(m.clone()));
            if scores {
                out.push(RedisValue::bulk(score_text(*s)));
            }
        }
        RedisValue::Array(out)
    }

    fn expire_at(&mut self, key: &[u8], at_ms: i64) -> RedisValue {
        match self.live(key) {
            None => RedisValue::Int(0),
            Some(e) => {
                e.expires_at = Some(at_ms);
                if at_ms <= now_ms() {
                    self.keys.remove(key);
                }
                RedisValue::Int(1)
            }
        }
    }

    /// Runs one command; an error reply is `Err`.
    pub fn execute(&mut self, args: &[Vec<u8>]) -> Result<RedisValue, RedisValue> {
        let name = args
            .first()
            .map(|n| text(n).to_ascii_uppercase())
            .ok_or_else(|| RedisValue::err("ERR empty command"))?;
        if name == "EVAL" || name == "EVALSHA" {
            arity(args, 3)?;
            let script = if name == "EVAL" {
                let body = args[1].clone();
                self.scripts.insert(sha1_hex(&body), body.clone());
                body
            } else {
                let sha = text(&args[1]).to_ascii_lowercase();
                self.scripts.get(&sha).cloned().ok_or_else(|| {
                    RedisValue::err("NOSCRIPT No matching script. Please use EVAL.")
                })?
            };
            let numkeys = usize::try_from(int(&args[2])?)
                .ok()
                .filter(|n| 3 + n <= args.len())
                .ok_or_else(|| {
                    RedisValue::err("ERR Number of keys can't be greater than number of args")
                })?;
            let keys = args[3..3 + numkeys].to_vec();
            let argv = args[3 + numkeys..].to_vec();
            return run_script(self, &script, keys, argv);
        }
        let k = || args[1].as_slice();
        let reply = match name.as_str() {
            "PING" => RedisValue::Status("PONG".into()),
            "ECHO" => {
                arity(args, 2)?;
                RedisValue::bulk(args[1].clone())
            }
            "TIME" => {
                let us = now_ms() * 1000;
                RedisValue::Array(vec![
                    RedisValue::bulk((us / 1_000_000).to_string()),
                    RedisValue::bulk((us % 1_000_000).to_string()),
                ])
            }
            "GET" => {
                arity(args, 2)?;
                self.get_str(k())?.map_or(RedisValue::Nil, RedisValue::Bulk)
            }
            "SET" => {
                arity(args, 3)?;
                let (mut nx, mut xx, mut ttl, mut keep, mut get) =
                    (false, false, None, false, false);
                let mut i = 3;
                while i < args.len() {
                    let opt = text(&args[i]).to_ascii_uppercase();
                    let next = || {
                        args.get(i + 1)
                            .ok_or_else(|| RedisValue::err("ERR syntax error"))
                    };
                    match opt.as_str() {
                        "NX" => nx = true,
                        "XX" => xx = true,
                        "KEEPTTL" => keep = true,
                        "GET" => get = true,
                        "EX" => {
                            ttl = Some(now_ms() + int(next()?)? * 1000);
                            i += 1;
                        }
                        "PX" => {
                            ttl = Some(now_ms() + int(next()?)?);
                            i += 1;
                        }
                        "EXAT" => {
                            ttl = Some(int(next()?)? * 1000);
                            i += 1;
                        }
                        "PXAT" => {
                            ttl = Some(int(next()?)?);
                            i += 1;
                        }
                        _ => return Err(RedisValue::err("ERR syntax error")),
                    }
                    i += 1;
                }
                let old = if get { self.get_str(k())? } else { None };
                let present = self.exists(k());
                if (nx && present) || (xx && !present) {
                    return Ok(if get {
                        old.map_or(RedisValue::Nil, RedisValue::Bulk)
                    } else {
                        RedisValue::Nil
                    });
                }
                let ttl = if keep {
                    self.live(k()).and_then(|e| e.expires_at)
                } else {
                    ttl
                };
                self.set_str(k(), args[2].clone(), ttl);
                if get {
                    old.map_or(RedisValue::Nil, RedisValue::Bulk)
                } else {
                    RedisValue::ok()
                }
            }
            "SETNX" => {
                arity(args, 3)?;
                if self.exists(k()) {
                    RedisValue::Int(0)
                } else {
                    self.set_str(k(), args[2].clone(), None);
                    RedisValue::Int(1)
                }
            }
            "SETEX" | "PSETEX" => {
                arity(args, 4)?;
                let n = int(&args[2])?;
                let ms = if name == "SETEX" { n * 1000 } else { n };
                self.set_str(k(), args[3].clone(), Some(now_ms() + ms));
                RedisValue::ok()
            }
            "GETSET" => {
                arity(args, 3)?;
                let old = self.get_str(k())?;
                self.set_str(k(), args[2].clone(), None);
                old.map_or(RedisValue::Nil, RedisValue::Bulk)
            }
            "GETDEL" => {
                arity(args, 2)?;
                let old = self.get_str(k())?;
                self.keys.remove(k());
                old.map_or(RedisValue::Nil, RedisValue::Bulk)
            }
            "INCR" => {
                arity(args, 2)?;
                self.incr_by(k(), 1)?
            }
            "DECR" => {
                arity(args, 2)?;
                self.incr_by(k(), -1)?
            }
            "INCRBY" => {
                arity(args, 3)?;
                let by = int(&args[2])?;
                self.incr_by(k(), by)?
            }
            "DECRBY" => {
                arity(args, 3)?;
                let by = int(&args[2])?;
                self.incr_by(k(), -by)?
            }
            "INCRBYFLOAT" => {
                arity(args, 3)?;
                let cur = match self.get_str(k())? {
                    None => 0.0,
                    Some(s) => float(&s)?,
                };
                let next = cur + float(&args[2])?;
                let ttl = self.live(k()).and_then(|e| e.expires_at);
                self.set_str(k(), score_text(next), ttl);
                RedisValue::bulk(score_text(next))
            }
            "APPEND" => {
                arity(args, 3)?;
                let mut cur = self.get_str(k())?.unwrap_or_default();
                cur.extend_from_slice(&args[2]);
                let n = cur.len();
                let ttl = self.live(k()).and_then(|e| e.expires_at);
                self.set_str(k(), cur, ttl);
                RedisValue::Int(n as i64)
            }
            "STRLEN" => {
                arity(args, 2)?;
                RedisValue::Int(self.get_str(k())?.map_or(0, |s| s.len()) as i64)
            }
            "MGET" => {
                arity(args, 2)?;
                let mut out = Vec::new();
                for key in &args[1..] {
                    // MGET answers nil for a key of another type.
                    out.push(
                        self.get_str(key)
                            .ok()
                            .flatten()
                            .map_or(RedisValue::Nil, RedisValue::Bulk),
                    );
                }
                RedisValue::Array(out)
            }
            "MSET" | "MSETNX" => {
                if args.len() < 3 || args.len().is_multiple_of(2) {
                    return Err(RedisValue::err(
                        "ERR wrong number of arguments for 'mset' command",
                    ));
                }
                if name == "MSETNX" && args[1..].chunks(2).any(|p| self.exists(&p[0])) {
                    return Ok(RedisValue::Int(0));
                }
                for p in args[1..].chunks(2) {
                    self.set_str(&p[0], p[1].clone(), None);
                }
                if name == "MSET" {
                    RedisValue::ok()
                } else {
                    RedisValue::Int(1)
                }
            }
            "GETBIT" => {
                arity(args, 3)?;
                let bit = usize::try_from(int(&args[2])?).map_err(|_| {
                    RedisValue::err("ERR bit offset is not an integer or out of range")
                })?;
                let s = self.get_str(k())?.unwrap_or_default();
                let byte = s.get(bit / 8).copied().unwrap_or(0);
                RedisValue::Int(i64::from((byte >> (7 - bit % 8)) & 1))
            }
            "SETBIT" => {
                arity(args, 4)?;
                let bit = usize::try_from(int(&args[2])?)
                    .ok()
                    .filter(|b| *b < (1 << 32))
                    .ok_or_else(|| {
                        RedisValue::err("ERR bit offset is not an integer or out of range")
                    })?;
                let on = match args[3].as_slice() {
                    b"1" => true,
                    b"0" => false,
                    _ => return Err(RedisValue::err("ERR bit is not an integer or out of range")),
                };
                let mut s = self.get_str(k())?.unwrap_or_default();
                if s.len() <= bit / 8 {
                    s.resize(bit / 8 + 1, 0);
                }
                let mask = 1u8 << (7 - bit % 8);
                let old = (s[bit / 8] & mask) != 0;
                if on {
                    s[bit / 8] |= mask;
                } else {
                    s[bit / 8] &= !mask;
                }
                let ttl = self.live(k()).and_then(|e| e.expires_at);
                self.set_str(k(), s, ttl);
                RedisValue::Int(i64::from(old))
            }
            "DEL" | "UNLINK" => {
                arity(args, 2)?;
                let mut n = 0;
                for key in &args[1..] {
                    if self.exists(key) {
                        self.keys.remove(key);
                        n += 1;
                    }
                }
                RedisValue::Int(n)
            }
            "EXISTS" | "TOUCH" => {
                arity(args, 2)?;
                RedisValue::Int(args[1..].iter().filter(|key| self.exists(key)).count() as i64)
            }
            "TYPE" => {
                arity(args, 2)?;
                RedisValue::Status(
                    self.live(k())
                        .map_or("none", |e| e.data.type_name())
                        .to_string(),
                )
            }
            "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" => {
                arity(args, 3)?;
                let n = int(&args[2])?;
                let at = match name.as_str() {
                    "EXPIRE" => now_ms() + n * 1000,
                    "PEXPIRE" => now_ms() + n,
                    "EXPIREAT" => n * 1000,
                    _ => n,
                };
                self.expire_at(k(), at)
            }
            "TTL" | "PTTL" => {
                arity(args, 2)?;
                match self.live(k()) {
                    None => RedisValue::Int(-2),
                    Some(Entry {
                        expires_at: None, ..
                    }) => RedisValue::Int(-1),
                    Some(Entry {
                        expires_at: Some(t),
                        ..
                    }) => {
                        let left = *t - now_ms();
                        RedisValue::Int(if name == "TTL" {
                            (left + 500) / 1000
                        } else {
                            left
                        })
                    }
                }
            }
            "PERSIST" => {
                arity(args, 2)?;
                match self.live(k()) {
                    Some(e) if e.expires_at.is_some() => {
                        e.expires_at = None;
                        RedisValue::Int(1)
                    }
                    _ => RedisValue::Int(0),
                }
            }
            "HSET" | "HMSET" => {
                if args.len() < 4 || !args.len().is_multiple_of(2) {
                    return Err(RedisValue::err(format!(
                        "ERR wrong number of arguments for '{}' command",
                        name.to_ascii_lowercase()
                    )));
                }
                let h = self.hash(k())?;
                let mut added = 0;
                for p in args[2..].chunks(2) {
                    if h.insert(p[0].clone(), p[1].clone()).is_none() {
                        added += 1;
                    }
                }
                if name == "HSET" {
                    RedisValue::Int(added)
                } else {
                    RedisValue::ok()
                }
            }
            "HSETNX" => {
                arity(args, 4)?;
                let h = self.hash(k())?;
                if h.contains_key(&args[2]) {
                    RedisValue::Int(0)
                } else {
                    h.insert(args[2].clone(), args[3].clone());
                    RedisValue::Int(1)
                }
            }
            "HGET" => {
                arity(args, 3)?;
                let v = self.hash(k())?.get(&args[2]).cloned();
                self.drop_if_empty(k());
                v.map_or(RedisValue::Nil, RedisValue::Bulk)
            }
            "HMGET" => {
                arity(args, 3)?;
                let h = self.hash(k())?;
                let out = args[2..]
                    .iter()
                    .map(|f| h.get(f).cloned().map_or(RedisValue::Nil, RedisValue::Bulk))
                    .collect();
                self.drop_if_empty(k());
                RedisValue::Array(out)
            }
            "HGETALL" | "HKEYS" | "HVALS" | "HLEN" => {
                arity(args, 2)?;
                let h = self.hash(k())?.clone();
                self.drop_if_empty(k());
                match name.as_str() {
                    "HLEN" => RedisValue::Int(h.len() as i64),
                    "HKEYS" => RedisValue::Array(h.into_keys().map(RedisValue::Bulk).collect()),
                    "HVALS" => RedisValue::Array(h.into_values().map(RedisValue::Bulk).collect()),
                    _ => RedisValue::Array(
                        h.into_iter()
                            .flat_map(|(f, v)| [RedisValue::Bulk(f), RedisValue::Bulk(v)])
                            .collect(),
                    ),
                }
            }
            "HDEL" => {
                arity(args, 3)?;
                let h = self.hash(k())?;
                let n = args[2..].iter().filter(|f| h.remove(*f).is_some()).count();
                self.drop_if_empty(k());
                RedisValue::Int(n as i64)
            }
            "HEXISTS" => {
                arity(args, 3)?;
                let n = self.hash(k())?.contains_key(&args[2]);
                self.drop_if_empty(k());
                RedisValue::Int(i64::from(n))
            }
            "HINCRBY" => {
                arity(args, 4)?;
                let by = int(&args[3])?;
                let h = self.hash(k())?;
                let cur = match h.get(&args[2]) {
                    None => 0,
                    Some(v) => {
                        int(v).map_err(|_| RedisValue::err("ERR hash value is not an integer"))?
                    }
                };
                let next = cur + by;
                h.insert(args[2].clone(), next.to_string().into_bytes());
                RedisValue::Int(next)
            }
            "LPUSH" | "RPUSH" => {
                arity(args, 3)?;
                let l = self.list(k())?;
                for v in &args[2..] {
                    if name == "LPUSH" {
                        l.push_front(v.clone());
                    } else {
                        l.push_back(v.clone());
                    }
                }
                RedisValue::Int(l.len() as i64)
            }
            "LPOP" | "RPOP" => {
                arity(args, 2)?;
                let l = self.list(k())?;
                let v = if name == "LPOP" {
                    l.pop_front()
                } else {
                    l.pop_back()
                };
                self.drop_if_empty(k());
                v.map_or(RedisValue::Nil, RedisValue::Bulk)
            }
            "LLEN" => {
                arity(args, 2)?;
                let n = self.list(k())?.len();
                self.drop_if_empty(k());
                RedisValue::Int(n as i64)
            }
            "LRANGE" | "LTRIM" => {
                arity(args, 4)?;
                let (start, stop) = (int(&args[2])?, int(&args[3])?);
                let l = self.list(k())?;
                let kept: VecDeque<Vec<u8>> = match range(start, stop, l.len()) {
                    Some((s, e)) => l.iter().skip(s).take(e - s + 1).cloned().collect(),
                    None => VecDeque::new(),
                };
                let reply = if name == "LRANGE" {
                    RedisValue::Array(kept.iter().cloned().map(RedisValue::Bulk).collect())
                } else {
                    *l = kept;
                    RedisValue::ok()
                };
                self.drop_if_empty(k());
                reply
            }
            "SADD" => {
                arity(args, 3)?;
                let s = self.set(k())?;
                RedisValue::Int(args[2..].iter().filter(|m| s.insert((*m).clone())).count() as i64)
            }
            "SREM" => {
                arity(args, 3)?;
                let s = self.set(k())?;
                let n = args[2..].iter().filter(|m| s.remove(*m)).count();
                self.drop_if_empty(k());
                RedisValue::Int(n as i64)
            }
            "SMEMBERS" | "SCARD" => {
                arity(args, 2)?;
                let s = self.set(k())?.clone();
                self.drop_if_empty(k());
                if name == "SCARD" {
                    RedisValue::Int(s.len() as i64)
                } else {
                    RedisValue::Array(s.into_iter().map(RedisValue::Bulk).collect())
                }
            }
            "SISMEMBER" => {
                arity(args, 3)?;
                let n = self.set(k())?.contains(&args[2]);
                self.drop_if_empty(k());
                RedisValue::Int(i64::from(n))
            }
            "PFADD" => {
                arity(args, 2)?;
                let d = self.entry(
                    k(),
                    || Data::Hll(BTreeSet::new()),
                    |d| matches!(d, Data::Hll(_)),
                )?;
                let Data::Hll(s) = d else {
                    return Err(RedisValue::err(WRONGTYPE));
                };
                let changed = args[2..].iter().filter(|m| s.insert((*m).clone())).count();
                RedisValue::Int(i64::from(changed > 0 || args.len() == 2))
            }
            "PFCOUNT" => {
                arity(args, 2)?;
                let mut all = BTreeSet::new();
                for key in &args[1..] {
                    match self.live(key).map(|e| &e.data) {
                        None => {}
                        Some(Data::Hll(s)) => all.extend(s.iter().cloned()),
                        Some(_) => return Err(RedisValue::err(WRONGTYPE)),
                    }
                }
                RedisValue::Int(all.len() as i64)
            }
            "ZADD" => {
                arity(args, 4)?;
                let mut i = 2;
                let (mut nx, mut xx, mut ch, mut incr) = (false, false, false, false);
                while i < args.len() {
                    match text(&args[i]).to_ascii_uppercase().as_str() {
                        "NX" => nx = true,
                        "XX" => xx = true,
                        "CH" => ch = true,
                        "INCR" => incr = true,
                        _ => break,
                    }
                    i += 1;
                }
                let pairs = &args[i..];
                if pairs.is_empty() || pairs.len() % 2 == 1 {
                    return Err(RedisValue::err("ERR syntax error"));
                }
                let parsed: Vec<(f64, Vec<u8>)> = pairs
                    .chunks(2)
                    .map(|p| Ok((float(&p[0])?, p[1].clone())))
                    .collect::<Result<_, RedisValue>>()?;
                let z = self.zset(k())?;
                let (mut added, mut changed) = (0, 0);
                let mut last = None;
                for (score, m) in parsed {
                    let old = z.get(&m).copied();
                    if (nx && old.is_some()) || (xx && old.is_none()) {
                        continue;
                    }
                    let new = if incr {
                        old.unwrap_or(0.0) + score
                    } else {
                        score
                    };
                    if old.is_none() {
                        added += 1;
                    } else if old != Some(new) {
                        changed += 1;
                    }
                    z.insert(m, new);
                    last = Some(new);
                }
                self.drop_if_empty(k());
                if incr {
                    last.map_or(RedisValue::Nil, |s| RedisValue::bulk(score_text(s)))
                } else {
                    RedisValue::Int(if ch { added + changed } else { added })
                }
            }
            "ZINCRBY" => {
                arity(args, 4)?;
                let by = float(&args[2])?;
                let z = self.zset(k())?;
                let s = z.entry(args[3].clone()).or_insert(0.0);
                *s += by;
                RedisValue::bulk(score_text(*s))
            }
            "ZSCORE" => {
                arity(args, 3)?;
                let s = self.zset_read(k())?.get(&args[2]).copied();
                s.map_or(RedisValue::Nil, |s| RedisValue::bulk(score_text(s)))
            }
            "ZCARD" => {
                arity(args, 2)?;
                RedisValue::Int(self.zset_read(k())?.len() as i64)
            }
            "ZRANK" | "ZREVRANK" => {
                arity(args, 3)?;
                let mut items = Self::sorted(&self.zset_read(k())?);
                if name == "ZREVRANK" {
                    items.reverse();
                }
                items
                    .iter()
                    .position(|(m, _)| *m == args[2])
                    .map_or(RedisValue::Nil, |i| RedisValue::Int(i as i64))
            }
            "ZREM" => {
                arity(args, 3)?;
                let z = self.zset(k())?;
                let n = args[2..].iter().filter(|m| z.remove(*m).is_some()).count();
                self.drop_if_empty(k());
                RedisValue::Int(n as i64)
            }
            "ZRANGE" | "ZREVRANGE" => {
                arity(args, 4)?;
                let opts: Vec<String> = args[4..]
                    .iter()
                    .map(|a| text(a).to_ascii_uppercase())
                    .collect();
                if opts
                    .iter()
                    .any(|o| o == "BYSCORE" || o == "BYLEX" || o == "LIMIT")
                {
                    return Err(RedisValue::err(
                        "ERR plugin test's Redis implements ZRANGE by rank only (use ZRANGEBYSCORE)",
                    ));
                }
                let scores = opts.iter().any(|o| o == "WITHSCORES");
                let rev = name == "ZREVRANGE" || opts.iter().any(|o| o == "REV");
                let mut items = Self::sorted(&self.zset_read(k())?);
                if rev {
                    items.reverse();
                }
                let picked = match range(int(&args[2])?, int(&args[3])?, items.len()) {
                    Some((s, e)) => items[s..=e].to_vec(),
                    None => Vec::new(),
                };
                Self::with_scores(&picked, scores)
            }
            "ZRANGEBYSCORE" | "ZREVRANGEBYSCORE" | "ZCOUNT" | "ZREMRANGEBYSCORE" => {
                arity(args, 4)?;
                let (lo_arg, hi_arg) = if name == "ZREVRANGEBYSCORE" {
                    (&args[3], &args[2])
                } else {
                    (&args[2], &args[3])
                };
                let bound = |a: &[u8]| -> Result<(f64, bool), RedisValue> {
                    match a.strip_prefix(b"(") {
                        Some(rest) => Ok((float(rest)?, true)),
                        None => Ok((float(a)?, false)),
                    }
                };
                let ((lo, lo_x), (hi, hi_x)) =
                    (bound(lo_arg.as_slice())?, bound(hi_arg.as_slice())?);
                let inside = |s: f64| {
                    (if lo_x { s > lo } else { s >= lo }) && (if hi_x { s < hi } else { s <= hi })
                };
                let mut items: Vec<_> = Self::sorted(&self.zset_read(k())?)
                    .into_iter()
                    .filter(|(_, s)| inside(*s))
                    .collect();
                match name.as_str() {
                    "ZCOUNT" => RedisValue::Int(items.len() as i64),
                    "ZREMRANGEBYSCORE" => {
                        let z = self.zset(k())?;
                        for (m, _) in &items {
                            z.remove(m);
                        }
                        self.drop_if_empty(k());
                        RedisValue::Int(items.len() as i64)
                    }
                    _ => {
                        if name == "ZREVRANGEBYSCORE" {
                            items.reverse();
                        }
                        let scores = args[4..]
                            .iter()
                            .any(|a| text(a).eq_ignore_ascii_case("WITHSCORES"));
                        Self::with_scores(&items, scores)
                    }
                }
            }
            "ZREMRANGEBYRANK" => {
                arity(args, 4)?;
                let items = Self::sorted(&self.zset_read(k())?);
                let gone = match range(int(&args[2])?, int(&args[3])?, items.len()) {
                    Some((s, e)) => items[s..=e].to_vec(),
                    None => Vec::new(),
                };
                let z = self.zset(k())?;
                for (m, _) in &gone {
                    z.remove(m);
                }
                self.drop_if_empty(k());
                RedisValue::Int(gone.len() as i64)
            }
            "ZUNIONSTORE" | "ZINTERSTORE" => {
                arity(args, 4)?;
                let n = usize::try_from(int(&args[2])?)
                    .ok()
                    .filter(|n| *n >= 1 && 3 + n <= args.len())
                    .ok_or_else(|| RedisValue::err("ERR syntax error"))?;
                let sources = &args[3..3 + n];
                let mut weights = vec![1.0; n];
                let mut aggregate = "SUM".to_string();
                let mut i = 3 + n;
                while i < args.len() {
                    match text(&args[i]).to_ascii_uppercase().as_str() {
                        "WEIGHTS" => {
                            for (w, a) in weights.iter_mut().zip(args.iter().skip(i + 1)) {
                                *w = float(a)?;
                            }
                            i += 1 + n;
                        }
                        "AGGREGATE" => {
                            aggregate = args
                                .get(i + 1)
                                .map(|a| text(a).to_ascii_uppercase())
                                .ok_or_else(|| RedisValue::err("ERR syntax error"))?;
                            i += 2;
                        }
                        _ => return Err(RedisValue::err("ERR syntax error")),
                    }
                }
                let mut out: BTreeMap<Vec<u8>, f64> = BTreeMap::new();
                let mut counts: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
                for (key, w) in sources.iter().zip(&weights) {
                    for (m, s) in self.zset_read(key)? {
                        let s = s * w;
                        *counts.entry(m.clone()).or_default() += 1;
                        out.entry(m)
                            .and_modify(|cur| {
                                *cur = match aggregate.as_str() {
                                    "MIN" => cur.min(s),
                                    "MAX" => cur.max(s),
                                    _ => *cur + s,
                                }
                            })
                            .or_insert(s);
                    }
                }
                if name == "ZINTERSTORE" {
                    out.retain(|m, _| counts.get(m) == Some(&n));
                }
                let len = out.len();
                self.keys.remove(k());
                if len > 0 {
                    self.keys.insert(
                        k().to_vec(),
                        Entry {
                            data: Data::ZSet(out),
                            expires_at: None,
                        },
                    );
                }
                RedisValue::Int(len as i64)
            }
            other => {
                return Err(RedisValue::err(format!(
                    "ERR plugin test's in-memory Redis does not implement `{other}`"
                )))
            }
        };
        Ok(reply)
    }
}

/// SHA-1 of a script, hex: the name `EVALSHA` takes.
pub fn sha1_hex(script: &[u8]) -> String {
    sha1_smol::Sha1::from(script).digest().to_string()
}

/// Runs a script in Lua 5.1 against `store`, the way Redis does: `KEYS`, `ARGV`,
/// `redis.call` (an error reply raises), `redis.pcall` (an error reply is a table with
/// `err`), `redis.error_reply`, `redis.status_reply`, `cjson`; the return value converted as
/// Redis converts it.
fn run_script(
    store: &mut FakeRedis,
    script: &[u8],
    keys: Vec<Vec<u8>>,
    argv: Vec<Vec<u8>>,
) -> Result<RedisValue, RedisValue> {
    let lua_err = |e: mlua::Error| RedisValue::err(format!("ERR script: {e}"));
    let shared = Rc::new(RefCell::new(std::mem::take(store)));
    let result = (|| -> mlua::Result<Result<RedisValue, RedisValue>> {
        let lua = Lua::new();
        let globals = lua.globals();
        let to_table = |items: &[Vec<u8>]| -> mlua::Result<mlua::Table> {
            let t = lua.create_table()?;
            for (i, v) in items.iter().enumerate() {
                t.raw_set(i + 1, lua.create_string(v)?)?;
            }
            Ok(t)
        };
        globals.set("KEYS", to_table(&keys)?)?;
        globals.set("ARGV", to_table(&argv)?)?;
        let redis = lua.create_table()?;
        for (name, protected) in [("call", false), ("pcall", true)] {
            let store = shared.clone();
            let f = lua.create_function(move |lua, args: MultiValue| {
                let mut command = Vec::with_capacity(args.len());
                for a in args {
                    command.push(match a {
                        LuaValue::String(s) => s.as_bytes().to_vec(),
                        LuaValue::Integer(i) => i.to_string().into_bytes(),
                        LuaValue::Number(n) => lua_number_text(n),
                        _ => {
                            return Err(mlua::Error::runtime(
                                "Lua redis lib command arguments must be strings or integers",
                            ))
                        }
                    });
                }
                let mut store = store
                    .try_borrow_mut()
                    .map_err(|_| mlua::Error::runtime("the store is busy"))?;
                store
                    .script_calls
                    .push(command.iter().map(|a| text(a)).collect());
                let reply = store.execute(&command);
                drop(store);
                match reply {
                    Ok(v) => to_lua(lua, &v),
                    Err(RedisValue::Error(e)) if !protected => Err(mlua::Error::runtime(e)),
                    Err(e) => to_lua(lua, &e),
                }
            })?;
            redis.set(name, f)?;
        }
        redis.set(
            "error_reply",
            lua.create_function(|lua, msg: mlua::LuaString| {
                let t = lua.create_table()?;
                t.set("err", msg)?;
                Ok(t)
            })?,
        )?;
        redis.set(
            "status_reply",
            lua.create_function(|lua, msg: mlua::LuaString| {
                let t = lua.create_table()?;
                t.set("ok", msg)?;
                Ok(t)
            })?,
        )?;
        redis.set(
            "sha1hex",
            lua.create_function(|_, s: mlua::LuaString| Ok(sha1_hex(&s.as_bytes())))?,
        )?;
        redis.set("log", lua.create_function(|_, _: MultiValue| Ok(()))?)?;
        globals.set("redis", redis)?;
        let cjson = lua.create_table()?;
        cjson.set(
            "decode",
            lua.create_function(|lua, s: mlua::LuaString| {
                let v: serde_json::Value = serde_json::from_slice(&s.as_bytes())
                    .map_err(|e| mlua::Error::runtime(format!("cjson.decode: {e}")))?;
                lua.to_value(&v)
            })?,
        )?;
        cjson.set(
            "encode",
            lua.create_function(|lua, v: LuaValue| {
                let v: serde_json::Value = lua.from_value(v)?;
                Ok(v.to_string())
            })?,
        )?;
        globals.set("cjson", cjson)?;
        let value: LuaValue = lua.load(script).set_name("@user_script").eval()?;
        Ok(from_lua(&value))
    })();
    *store = Rc::try_unwrap(shared)
        .map(RefCell::into_inner)
        .unwrap_or_else(|rc| rc.borrow().clone());
    match result {
        Ok(reply) => reply,
        Err(e) => Err(lua_err(e)),
    }
}

/// A Lua number as Redis passes it in a command: integral ones without a fraction.
fn lua_number_text(n: f64) -> Vec<u8> {
    if n.fract() == 0.0 && n.abs() < 1e17 {
        format!("{}", n as i64).into_bytes()
    } else {
        format!("{n}").into_bytes()
    }
}

/// A Redis reply as Lua sees it: nil is `false`, status and error replies are tables.
fn to_lua(lua: &Lua, v: &RedisValue) -> mlua::Result<LuaValue> {
    Ok(match v {
        RedisValue::Nil => LuaValue::Boolean(false),
        RedisValue::Int(i) => LuaValue::Integer(*i),
        RedisValue::Bulk(b) => LuaValue::String(lua.create_string(b)?),
        RedisValue::Status(s) => {
            let t = lua.create_table()?;
            t.set("ok", s.as_str())?;
            LuaValue::Table(t)
        }
        RedisValue::Error(e) => {
            let t = lua.create_table()?;
            t.set("err", e.as_str())?;
            LuaValue::Table(t)
        }
        RedisValue::Array(items) => {
            let t = lua.create_table()?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, to_lua(lua, item)?)?;
            }
            LuaValue::Table(t)
        }
    })
}

/// A script's return value as Redis converts it: numbers truncated to integers, `false` is
/// nil, `true` is 1, tables with `err`/`ok` are error/status replies, other tables arrays up
/// to their first nil.
fn from_lua(v: &LuaValue) -> Result<RedisValue, RedisValue> {
    Ok(match v {
        LuaValue::Nil | LuaValue::Boolean(false) => RedisValue::Nil,
        LuaValue::Boolean(true) => RedisValue::Int(1),
        LuaValue::Integer(i) => RedisValue::Int(*i),
        LuaValue::Number(n) => RedisValue::Int(*n as i64),
        LuaValue::String(s) => RedisValue::Bulk(s.as_bytes().to_vec()),
        LuaValue::Table(t) => {
            if let Ok(LuaValue::String(e)) = t.raw_get::<LuaValue>("err") {
                return Err(RedisValue::Error(e.to_string_lossy()));
            }
            if let Ok(LuaValue::String(s)) = t.raw_get::<LuaValue>("ok") {
                return Ok(RedisValue::Status(s.to_string_lossy()));
            }
            let mut out = Vec::new();
            for i in 1.. {
                let item: LuaValue = t.raw_get(i).unwrap_or(LuaValue::Nil);
                if item.is_nil() {
                    break;
                }
                out.push(from_lua(&item).unwrap_or_else(|e| e));
            }
            RedisValue::Array(out)
        }
        _ => RedisValue::Nil,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(r: &mut FakeRedis, args: &[&str]) -> Result<RedisValue, RedisValue> {
        let args: Vec<Vec<u8>> = args.iter().map(|a| a.as_bytes().to_vec()).collect();
        r.execute(&args)
    }

    #[test]
    fn strings_hashes_sorted_sets_and_expiry() {
        let mut r = FakeRedis::default();
        assert_eq!(cmd(&mut r, &["INCRBY", "n", "5"]), Ok(RedisValue::Int(5)));
        assert_eq!(
            cmd(&mut r, &["HINCRBY", "h", "f", "2"]),
            Ok(RedisValue::Int(2))
        );
        assert!(
            cmd(&mut r, &["HINCRBY", "n", "f", "2"]).is_err(),
            "wrong type"
        );
        cmd(&mut r, &["ZINCRBY", "z", "2", "a"]).unwrap();
        cmd(&mut r, &["ZINCRBY", "z", "1", "b"]).unwrap();
        cmd(&mut r, &["ZADD", "y", "5", "b"]).unwrap();
        assert_eq!(
            cmd(&mut r, &["ZUNIONSTORE", "u", "2", "z", "y"]),
            Ok(RedisValue::Int(2))
        );
        assert_eq!(
            cmd(&mut r, &["ZREVRANGE", "u", "0", "-1", "WITHSCORES"])
                .unwrap()
                .text(),
            r#"["b", "6", "a", "2"]"#
        );
        assert_eq!(cmd(&mut r, &["EXPIRE", "n", "100"]), Ok(RedisValue::Int(1)));
        assert_eq!(cmd(&mut r, &["TTL", "n"]), Ok(RedisValue::Int(100)));
        assert_eq!(cmd(&mut r, &["TTL", "h"]), Ok(RedisValue::Int(-1)));
        assert_eq!(
            cmd(&mut r, &["SETBIT", "b", "9", "1"]),
            Ok(RedisValue::Int(0))
        );
        assert_eq!(cmd(&mut r, &["GETBIT", "b", "9"]), Ok(RedisValue::Int(1)));
        assert!(
            matches!(cmd(&mut r, &["FLUSHALL"]), Err(RedisValue::Error(e)) if e.contains("FLUSHALL"))
        );
    }

    /// The SDK's exactly-once script, run here in Lua, gives the outcomes of the SDK's own
    /// in-memory rules (`MockHost`) over live, replayed and backfilled deliveries, and applies
    /// each event's command once.
    #[test]
    fn the_sdk_exactly_once_script_matches_the_sdk_mock() {
        use fanout_sdk::exactly_once::RedisOnce;
        use fanout_sdk::redis::Reply;
        use fanout_sdk::testing::MockHost;
        use fanout_sdk::{Host, Position};
        let mock = MockHost::new();
        let mut fake = FakeRedis::default();
        let live =
            |ids: std::ops::RangeInclusive<i64>| ids.map(|i| (i, Some(i * 10))).collect::<Vec<_>>();
        let back = |ids: std::ops::RangeInclusive<i64>| ids.map(|i| (i, None)).collect::<Vec<_>>();
        for delivery in [
            back(6..=8),
            live(3..=7),
            live(3..=9),
            back(1..=12),
            back(1..=12),
            live(10..=12),
            // A producer re-send of 4 at a new offset (skipped by its id), then 13.
            vec![(4, Some(130)), (13, Some(140))],
        ] {
            let mut once = RedisOnce::new("o:");
            for (id, offset) in &delivery {
                let position = offset.map(|offset| Position {
                    topic: "t",
                    partition: 0,
                    offset,
                });
                once.event_at(
                    *id,
                    position,
                    vec![vec![
                        b"RPUSH".to_vec(),
                        b"log".to_vec(),
                        id.to_string().into_bytes(),
                    ]],
                );
            }
            let expected = mock.redis_once(once.clone()).expect("mock");
            let reply = match fake.execute(&once.eval_command().expect("eval")) {
                Ok(RedisValue::Bulk(b)) => Reply::Data(b),
                other => panic!("{other:?}"),
            };
            assert_eq!(
                once.parse_reply(&reply).expect("reply"),
                expected,
                "{delivery:?}"
            );
        }
        let mut log: Vec<i64> = match cmd(&mut fake, &["LRANGE", "log", "0", "-1"]).unwrap() {
            RedisValue::Array(items) => items
                .iter()
                .map(|v| match v {
                    RedisValue::Bulk(b) => text(b).parse().unwrap(),
                    other => panic!("{other:?}"),
                })
                .collect(),
            other => panic!("{other:?}"),
        };
        log.sort();
        assert_eq!(log, (1..=13).collect::<Vec<_>>(), "each event once");
        assert_eq!(
            cmd(&mut fake, &["HGET", "o:marks", "t/0"]),
            Ok(RedisValue::bulk("140"))
        );
    }

    #[test]
    fn scripts_run_in_lua_against_the_store() {
        let mut r = FakeRedis::default();
        let script = "redis.call('SET', KEYS[1], ARGV[1]); local v = cjson.decode(redis.call('GET', KEYS[1])); return {v['a'], redis.call('EXISTS', 'nope'), redis.pcall('INCR', KEYS[1])['err'] ~= nil}";
        let out = cmd(&mut r, &["EVAL", script, "1", "k", r#"{"a":"x"}"#]).unwrap();
        assert_eq!(out.text(), r#"["x", 0, 1]"#);
        let sha = sha1_hex(script.as_bytes());
        assert!(cmd(&mut r, &["EVALSHA", &sha, "1", "k", "{}"]).is_ok());
        assert!(cmd(&mut r, &["EVALSHA", "0000", "0"]).is_err());
        let e = cmd(
            &mut r,
            &["EVAL", "return redis.call('INCR', KEYS[1])", "1", "k"],
        );
        assert!(matches!(e, Err(RedisValue::Error(m)) if m.contains("not an integer")));
    }
}
