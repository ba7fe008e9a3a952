//! What a plugin's grant allows: pure checks, applied before any capability does I/O.

use crate::config::{HttpGrant, RedisGrant};

/// Where the keys of a Redis command are among its arguments (index 0 is the command name).
enum KeyPositions {
    None,
    First,
    All,
    EveryOther,
    /// ZUNIONSTORE dest numkeys key...: destination then `numkeys` keys.
    StoreWithNumKeys,
    /// EVAL script numkeys key...
    ScriptKeys,
}

fn key_positions(command: &str) -> Option<KeyPositions> {
    use KeyPositions::*;
    Some(match command {
        "PING" | "TIME" | "ECHO" => None,
        "GET" | "SET" | "SETNX" | "SETEX" | "PSETEX" | "GETSET" | "GETDEL" | "GETEX" | "INCR"
        | "INCRBY" | "INCRBYFLOAT" | "DECR" | "DECRBY" | "APPEND" | "STRLEN" | "EXPIRE"
        | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" | "TTL" | "PTTL" | "PERSIST" | "TYPE" | "HSET"
        | "HSETNX" | "HGET" | "HMSET" | "HMGET" | "HGETALL" | "HDEL" | "HINCRBY" | "HEXISTS"
        | "HLEN" | "HKEYS" | "HVALS" | "LPUSH" | "RPUSH" | "LPOP" | "RPOP" | "LRANGE" | "LLEN"
        | "LTRIM" | "SADD" | "SREM" | "SMEMBERS" | "SISMEMBER" | "SCARD" | "ZADD" | "ZINCRBY"
        | "ZSCORE" | "ZRANGE" | "ZREVRANGE" | "ZRANGEBYSCORE" | "ZREVRANGEBYSCORE" | "ZREM"
        | "ZCARD" | "ZCOUNT" | "ZRANK" | "ZREVRANK" | "ZREMRANGEBYSCORE" | "ZREMRANGEBYRANK"
        | "PFADD" => First,
        "DEL" | "UNLINK" | "EXISTS" | "MGET" | "TOUCH" | "PFCOUNT" => All,
        "MSET" | "MSETNX" => EveryOther,
        "ZUNIONSTORE" | "ZINTERSTORE" => StoreWithNumKeys,
        "EVAL" | "EVALSHA" | "EVAL_RO" | "EVALSHA_RO" => ScriptKeys,
        _ => return Option::None,
    })
}

/// Checks one command against the grant. Err carries the reason given to the plugin.
pub fn check_redis_command(grant: &RedisGrant, args: &[Vec<u8>]) -> Result<(), String> {
    let name = args
        .first()
        .map(|n| String::from_utf8_lossy(n).to_ascii_uppercase())
        .ok_or("empty command")?;
    let positions = key_positions(&name)
        .ok_or_else(|| format!("command {name} is not available to plugins"))?;
    let keys: Vec<&Vec<u8>> = match positions {
        KeyPositions::None => vec![],
        KeyPositions::First => args.get(1).into_iter().collect(),
        KeyPositions::All => args.iter().skip(1).collect(),
        KeyPositions::EveryOther => args.iter().skip(1).step_by(2).collect(),
        KeyPositions::StoreWithNumKeys => {
            let n = num_keys(args, 2, &name)?;
            args.get(1)
                .into_iter()
                .chain(args.iter().skip(3).take(n))
                .collect()
        }
        KeyPositions::ScriptKeys => {
            if !grant.allow_scripts {
                return Err(format!(
                    "{name} needs `allow_scripts = true` in the redis grant"
                ));
            }
            let n = num_keys(args, 2, &name)?;
            args.iter().skip(3).take(n).collect()
        }
    };
    for key in keys {
        if !key.starts_with(grant.key_prefix.as_bytes()) {
            return Err(format!(
                "{name} on key `{}` is outside the granted prefix `{}`",
                String::from_utf8_lossy(key),
                grant.key_prefix
            ));
        }
    }
    Ok(())
}

fn num_keys(args: &[Vec<u8>], at: usize, name: &str) -> Result<usize, String> {
    let n: usize = args
        .get(at)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{name}: argument {at} must be the number of keys"))?;
    if args.len() < at + 1 + n {
        return Err(format!("{name}: fewer keys than numkeys says"));
    }
    Ok(n)
}

/// A URL is allowed when it starts with one of the granted prefixes, after parsing (so that
/// `http://allowed@evil/` style tricks do not pass) and it carries no credentials.
pub fn check_http_url(grant: &HttpGrant, url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("bad URL `{url}`: {e}"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!("URL `{url}` carries credentials"));
    }
    let normalized = parsed.as_str();
    if grant
        .url_prefixes
        .iter()
        .any(|p| !p.is_empty() && normalized.starts_with(p.as_str()))
    {
        Ok(parsed)
    } else {
        Err(format!(
            "URL `{url}` is outside the granted prefixes {:?}",
            grant.url_prefixes
        ))
    }
}

// ClickHouse statements are checked on a parse tree: see `super::clickhouse_sql`.

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(parts: &[&str]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.as_bytes().to_vec()).collect()
    }

    #[test]
    fn redis_prefix_is_enforced_on_every_key() {
        let g = RedisGrant {
            key_prefix: "t1:".into(),
            allow_scripts: false,
        };
        assert!(check_redis_command(&g, &cmd(&["INCR", "t1:count"])).is_ok());
        assert!(check_redis_command(&g, &cmd(&["incr", "other"])).is_err());
        assert!(check_redis_command(&g, &cmd(&["DEL", "t1:a", "t2:b"])).is_err());
        assert!(
            check_redis_command(&g, &cmd(&["ZUNIONSTORE", "t1:dst", "2", "t1:a", "t1:b"])).is_ok()
        );
        assert!(
            check_redis_command(&g, &cmd(&["ZUNIONSTORE", "t1:dst", "2", "t1:a", "x:b"])).is_err()
        );
        assert!(check_redis_command(&g, &cmd(&["FLUSHALL"])).is_err());
        assert!(check_redis_command(&g, &cmd(&["EVAL", "return 1", "0"])).is_err());
        let s = RedisGrant {
            key_prefix: "t1:".into(),
            allow_scripts: true,
        };
        assert!(check_redis_command(&s, &cmd(&["EVAL", "return 1", "1", "t1:k", "arg"])).is_ok());
        assert!(check_redis_command(&s, &cmd(&["EVAL", "return 1", "1", "x:k"])).is_err());
    }

    #[test]
    fn http_prefixes() {
        let g = HttpGrant {
            url_prefixes: vec!["http://127.0.0.1:58080/".into()],
        };
        assert!(check_http_url(&g, "http://127.0.0.1:58080/events").is_ok());
        assert!(check_http_url(&g, "http://127.0.0.1:58081/events").is_err());
        assert!(check_http_url(&g, "http://127.0.0.1:58080@evil.example/").is_err());
        assert!(check_http_url(&g, "http://user:pw@127.0.0.1:58080/").is_err());
    }
}
