//! What a plugin's grant allows: pure checks, applied before any capability does I/O.

use crate::config::{HttpGrant, RedisGrant, RedisUsers};

/// Where the keys of a Redis command are among its arguments (index 0 is the command name).
#[derive(Clone, Copy)]
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

/// The data commands a sink may be granted (`grants.redis.commands`; all of them by default).
/// Nothing administrative, no pub/sub, no command that lists or scans the keyspace.
/// `GETBIT`/`SETBIT` are the backfill bitmaps of the SDK's exactly-once primitive
/// (`fanout_sdk::exactly_once::SCRIPT_COMMANDS`).
#[rustfmt::skip]
pub const REDIS_DATA_COMMANDS: &[&str] = &[
    "PING", "TIME", "ECHO", "GET", "SET", "SETNX", "SETEX", "PSETEX", "GETSET", "GETDEL", "GETEX",
    "INCR", "INCRBY", "INCRBYFLOAT", "DECR", "DECRBY", "APPEND", "STRLEN", "GETBIT", "SETBIT",
    "EXPIRE", "PEXPIRE",
    "EXPIREAT", "PEXPIREAT", "TTL", "PTTL", "PERSIST", "TYPE", "HSET", "HSETNX", "HGET", "HMSET",
    "HMGET", "HGETALL", "HDEL", "HINCRBY", "HEXISTS", "HLEN", "HKEYS", "HVALS", "LPUSH", "RPUSH",
    "LPOP", "RPOP", "LRANGE", "LLEN", "LTRIM", "SADD", "SREM", "SMEMBERS", "SISMEMBER", "SCARD",
    "ZADD", "ZINCRBY", "ZSCORE", "ZRANGE", "ZREVRANGE", "ZRANGEBYSCORE", "ZREVRANGEBYSCORE",
    "ZREM", "ZCARD", "ZCOUNT", "ZRANK", "ZREVRANK", "ZREMRANGEBYSCORE", "ZREMRANGEBYRANK",
    "PFADD", "DEL", "UNLINK", "EXISTS", "MGET", "TOUCH", "PFCOUNT", "MSET", "MSETNX",
    "ZUNIONSTORE", "ZINTERSTORE",
];

/// Added to the allowed commands by `allow_scripts = true`.
pub const REDIS_SCRIPT_COMMANDS: &[&str] = &["EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO"];

fn key_positions(command: &str) -> Option<KeyPositions> {
    use KeyPositions::*;
    Some(match command {
        "PING" | "TIME" | "ECHO" => None,
        "DEL" | "UNLINK" | "EXISTS" | "MGET" | "TOUCH" | "PFCOUNT" => All,
        "MSET" | "MSETNX" => EveryOther,
        "ZUNIONSTORE" | "ZINTERSTORE" => StoreWithNumKeys,
        "EVAL" | "EVALSHA" | "EVAL_RO" | "EVALSHA_RO" => ScriptKeys,
        c if REDIS_DATA_COMMANDS.contains(&c) => First,
        _ => return Option::None,
    })
}

/// The commands the grant allows, upper case: its `commands` (or every data command), plus
/// the script commands when `allow_scripts`.
pub fn redis_allowed_commands(grant: &RedisGrant) -> Vec<String> {
    let mut out: Vec<String> = match &grant.commands {
        Some(list) => list.iter().map(|c| c.to_ascii_uppercase()).collect(),
        None => REDIS_DATA_COMMANDS.iter().map(|c| c.to_string()).collect(),
    };
    if grant.allow_scripts {
        out.extend(REDIS_SCRIPT_COMMANDS.iter().map(|c| c.to_string()));
    }
    out.sort();
    out.dedup();
    out
}

/// Whether the grant allows the command `name` (upper case): what [`redis_allowed_commands`]
/// lists, without building the list (this runs for every command a plugin sends).
fn command_granted(grant: &RedisGrant, name: &str) -> bool {
    let listed = match &grant.commands {
        Some(list) => list.iter().any(|c| c.eq_ignore_ascii_case(name)),
        None => REDIS_DATA_COMMANDS.contains(&name),
    };
    listed || (grant.allow_scripts && REDIS_SCRIPT_COMMANDS.contains(&name))
}

/// Checks one command against the grant. Err carries the reason given to the plugin.
/// Redis checks it again as the plugin's ACL user (scripts included); this is the first fence.
pub fn check_redis_command<A: AsRef<[u8]>>(grant: &RedisGrant, args: &[A]) -> Result<(), String> {
    let name = args
        .first()
        .map(|n| String::from_utf8_lossy(n.as_ref()).to_ascii_uppercase())
        .ok_or("empty command")?;
    let positions = key_positions(&name)
        .ok_or_else(|| format!("command {name} is not available to plugins"))?;
    if matches!(positions, KeyPositions::ScriptKeys) && !grant.allow_scripts {
        return Err(format!(
            "{name} needs `allow_scripts = true` in the redis grant"
        ));
    }
    if !command_granted(grant, &name) {
        return Err(format!("command {name} is not in the grant's `commands`"));
    }
    let keys: Vec<&A> = match positions {
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
            let n = num_keys(args, 2, &name)?;
            args.iter().skip(3).take(n).collect()
        }
    };
    for key in keys {
        let key = key.as_ref();
        let mut prefixes = grant.key_prefix.iter().chain(&grant.key_prefixes);
        if !prefixes.any(|p| key.starts_with(p.as_bytes())) {
            return Err(format!(
                "{name} on key `{}` is outside the granted prefixes {:?}",
                String::from_utf8_lossy(key),
                grant.prefixes()
            ));
        }
    }
    Ok(())
}

fn num_keys<A: AsRef<[u8]>>(args: &[A], at: usize, name: &str) -> Result<usize, String> {
    let n: usize = args
        .get(at)
        .and_then(|v| std::str::from_utf8(v.as_ref()).ok())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{name}: argument {at} must be the number of keys"))?;
    if args.len() < at + 1 + n {
        return Err(format!("{name}: fewer keys than numkeys says"));
    }
    Ok(n)
}

/// A redis grant as a config error: explicit prefixes that are literal ACL key patterns,
/// known commands, the user fields matching `services.redis_users`.
pub fn check_redis_grant(grant: &RedisGrant, users: RedisUsers) -> Result<(), String> {
    let prefixes = grant.prefixes();
    if prefixes.is_empty() {
        return Err("name the key prefixes the plugin uses (`key_prefixes = [..]`)".into());
    }
    for p in prefixes {
        // `""` would be every key; glob characters would widen the ACL pattern `~prefix*`.
        if p.is_empty() {
            return Err("an empty key prefix would grant every key".into());
        }
        if p.chars().any(|c| {
            matches!(c, '*' | '?' | '[' | ']' | '\\') || c.is_whitespace() || c.is_control()
        }) {
            return Err(format!(
                "key prefix `{p}`: no glob characters (*?[]\\), spaces or control characters"
            ));
        }
    }
    for c in grant.commands.iter().flatten() {
        let up = c.to_ascii_uppercase();
        if REDIS_SCRIPT_COMMANDS.contains(&up.as_str()) {
            return Err(format!(
                "`{c}` in commands: scripts are granted by allow_scripts"
            ));
        }
        if !REDIS_DATA_COMMANDS.contains(&up.as_str()) {
            return Err(format!(
                "`{c}` in commands is not a data command plugins may use"
            ));
        }
    }
    if grant.max_reply_bytes == Some(0) || grant.timeout_ms == Some(0) {
        return Err("max_reply_bytes and timeout_ms must be positive".into());
    }
    match (users, &grant.user, &grant.password) {
        (RedisUsers::Host, None, None) => Ok(()),
        (RedisUsers::Host, _, _) => Err(
            "user/password are for services.redis_users = \"provided\"; the host makes its own"
                .into(),
        ),
        (RedisUsers::Provided, Some(u), Some(_)) if !u.is_empty() => Ok(()),
        (RedisUsers::Provided, _, _) => {
            Err("services.redis_users = \"provided\": set user and password".into())
        }
    }
}

/// The `ACL SETUSER` rules of a grant, password aside: only its key patterns and commands,
/// nothing else the user may have had (selectors, channels, other keys).
pub fn redis_acl_rules(grant: &RedisGrant) -> Vec<String> {
    let mut rules: Vec<String> = [
        "on",
        "clearselectors",
        "resetkeys",
        "resetchannels",
        "-@all",
    ]
    .iter()
    .map(|r| r.to_string())
    .collect();
    rules.extend(
        redis_allowed_commands(grant)
            .iter()
            .map(|c| format!("+{}", c.to_ascii_lowercase())),
    );
    rules.extend(grant.prefixes().iter().map(|p| format!("~{p}*")));
    rules
}

/// The ACL user of a plugin: its name and a hash of its rules, so that hosts sharing a Redis
/// with the same grant share the user, and a changed grant never edits a user in use.
pub fn redis_acl_user(plugin: &str, rules: &[String]) -> String {
    // FNV-1a: stable across builds (the name must be the same on every host).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in rules.join(" ").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("fanout-plugin-{plugin}-{h:016x}")
}

/// A URL is allowed when, parsed, it falls under one of the granted prefixes (parsed too):
/// same scheme, host and port, and the prefix's path segments are the first segments of the
/// URL's path, compared whole (`/api` covers `/api/x`, never `/apix`). Parsing resolves dot
/// segments (`/api/../admin` is `/admin`, `%2e%2e` included); a segment that percent-decodes
/// to something a server could read as a separator or a dot segment (`..%2f`, `%5c`) is
/// refused, as are credentials and schemes other than http(s).
pub fn check_http_url(grant: &HttpGrant, url: &str) -> Result<reqwest::Url, String> {
    let mut parsed = reqwest::Url::parse(url).map_err(|e| format!("bad URL `{url}`: {e}"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!("URL `{url}` carries credentials"));
    }
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("URL `{url}`: only http and https are available"));
    }
    // The fragment is never sent; drop it so that what is checked is what goes out.
    parsed.set_fragment(None);
    let segments = decoded_segments(&parsed).map_err(|why| format!("URL `{url}`: {why}"))?;
    let covered = grant.url_prefixes.iter().any(|p| {
        reqwest::Url::parse(p)
            .ok()
            .is_some_and(|prefix| prefix_covers(&prefix, &parsed, &segments))
    });
    if covered {
        Ok(parsed)
    } else {
        Err(format!(
            "URL `{url}` is outside the granted prefixes {:?}",
            grant.url_prefixes
        ))
    }
}

/// The path segments of `url`, percent-decoded; Err for a segment that decodes to a separator,
/// a dot segment or a NUL (servers differ in whether they decode before routing).
fn decoded_segments(url: &reqwest::Url) -> Result<Vec<String>, String> {
    let Some(segments) = url.path_segments() else {
        return Err("has no path".into());
    };
    let mut out = Vec::new();
    for raw in segments {
        let bytes: Vec<u8> = percent_decode(raw.as_bytes());
        let seg = String::from_utf8_lossy(&bytes).into_owned();
        if seg.contains(['/', '\\', '\0']) || seg == "." || seg == ".." {
            return Err(format!("path segment `{raw}` decodes to `{seg}`"));
        }
        out.push(seg);
    }
    Ok(out)
}

fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            if let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    out
}

fn prefix_covers(prefix: &reqwest::Url, url: &reqwest::Url, segments: &[String]) -> bool {
    if prefix.scheme() != url.scheme()
        || prefix.host() != url.host()
        || prefix.port_or_known_default() != url.port_or_known_default()
        || !prefix.username().is_empty()
        || prefix.password().is_some()
    {
        return false;
    }
    let Ok(mut wanted) = decoded_segments(prefix) else {
        return false;
    };
    // A trailing `/` in the prefix means "anything below": its empty last segment is no part
    // of the match.
    if wanted.last().is_some_and(String::is_empty) {
        wanted.pop();
    }
    segments.len() >= wanted.len() && segments[..wanted.len()] == wanted[..]
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
            key_prefix: Some("t1:".into()),
            key_prefixes: vec!["t3:".into()],
            ..RedisGrant::default()
        };
        assert!(check_redis_command(&g, &cmd(&["INCR", "t1:count"])).is_ok());
        assert!(check_redis_command(&g, &cmd(&["INCR", "t3:count"])).is_ok());
        assert!(check_redis_command(&g, &cmd(&["incr", "other"])).is_err());
        assert!(check_redis_command(&g, &cmd(&["DEL", "t1:a", "t2:b"])).is_err());
        assert!(
            check_redis_command(&g, &cmd(&["ZUNIONSTORE", "t1:dst", "2", "t1:a", "t3:b"])).is_ok()
        );
        assert!(
            check_redis_command(&g, &cmd(&["ZUNIONSTORE", "t1:dst", "2", "t1:a", "x:b"])).is_err()
        );
        assert!(check_redis_command(&g, &cmd(&["FLUSHALL"])).is_err());
        assert!(check_redis_command(&g, &cmd(&["EVAL", "return 1", "0"])).is_err());
        let s = RedisGrant {
            key_prefix: Some("t1:".into()),
            allow_scripts: true,
            ..RedisGrant::default()
        };
        assert!(check_redis_command(&s, &cmd(&["EVAL", "return 1", "1", "t1:k", "arg"])).is_ok());
        assert!(check_redis_command(&s, &cmd(&["EVAL", "return 1", "1", "x:k"])).is_err());
        // A `commands` list narrows the default set.
        let narrow = RedisGrant {
            key_prefixes: vec!["t1:".into()],
            commands: Some(vec!["rpush".into()]),
            ..RedisGrant::default()
        };
        assert!(check_redis_command(&narrow, &cmd(&["RPUSH", "t1:l", "x"])).is_ok());
        assert!(check_redis_command(&narrow, &cmd(&["DEL", "t1:l"])).is_err());
    }

    #[test]
    fn the_sdk_exactly_once_script_runs_under_a_scripts_grant() {
        // Redis checks the plugin's ACL user inside the script: every command the SDK's
        // script runs must be one the grant (and so the ACL user) allows.
        let g = RedisGrant {
            key_prefixes: vec!["dc:".into()],
            allow_scripts: true,
            ..RedisGrant::default()
        };
        let allowed = redis_allowed_commands(&g);
        let rules = redis_acl_rules(&g);
        for c in fanout_sdk::exactly_once::SCRIPT_COMMANDS
            .iter()
            .chain(&["EVAL"])
        {
            assert!(allowed.contains(&c.to_string()), "{c}");
            assert!(
                rules.contains(&format!("+{}", c.to_ascii_lowercase())),
                "{c}"
            );
        }
        assert!(
            check_redis_command(&g, &cmd(&["SETBIT", "dc:once:backfilled:0", "7", "1"])).is_ok()
        );
        assert!(check_redis_command(&g, &cmd(&["GETBIT", "x:b", "7"])).is_err());
        // The EVAL the SDK builds passes the host's check: every key it declares is granted.
        let mut once = fanout_sdk::exactly_once::RedisOnce::new("dc:once:");
        once.event_at(1, None, vec![cmd(&["HINCRBY", "dc:device", "play", "1"])]);
        assert!(check_redis_command(&g, &once.eval_command().expect("eval")).is_ok());
        let mut outside = fanout_sdk::exactly_once::RedisOnce::new("dc:once:");
        outside.event_at(
            1,
            None,
            vec![cmd(&["HINCRBY", "other:device", "play", "1"])],
        );
        assert!(check_redis_command(&g, &outside.eval_command().expect("eval")).is_err());
    }

    #[test]
    fn redis_grants_are_explicit_and_become_acl_rules() {
        let ok = RedisGrant {
            key_prefixes: vec!["content:".into(), "top:content:".into()],
            allow_scripts: true,
            ..RedisGrant::default()
        };
        assert!(check_redis_grant(&ok, RedisUsers::Host).is_ok());
        assert!(check_redis_grant(&ok, RedisUsers::Provided).is_err());
        for bad in ["", "a*", "a?", "a[b]", "a b", "a\\"] {
            let g = RedisGrant {
                key_prefix: Some(bad.into()),
                ..RedisGrant::default()
            };
            assert!(check_redis_grant(&g, RedisUsers::Host).is_err(), "{bad:?}");
        }
        assert!(check_redis_grant(&RedisGrant::default(), RedisUsers::Host).is_err());
        for bad in ["FLUSHALL", "CONFIG", "EVAL", "KEYS", "SCRIPT"] {
            let g = RedisGrant {
                key_prefix: Some("a:".into()),
                commands: Some(vec![bad.into()]),
                ..RedisGrant::default()
            };
            assert!(check_redis_grant(&g, RedisUsers::Host).is_err(), "{bad}");
        }
        let rules = redis_acl_rules(&ok);
        assert_eq!(
            rules[..5],
            [
                "on",
                "clearselectors",
                "resetkeys",
                "resetchannels",
                "-@all"
            ]
        );
        assert!(rules.contains(&"+eval".to_string()) && rules.contains(&"+zincrby".to_string()));
        assert!(!rules
            .iter()
            .any(|r| r.contains("flushall") || r.contains("@") && r != "-@all"));
        assert_eq!(rules[rules.len() - 2..], ["~content:*", "~top:content:*"]);
        let user = redis_acl_user("topn", &rules);
        assert!(user.starts_with("fanout-plugin-topn-"), "{user}");
        assert_eq!(user, redis_acl_user("topn", &rules), "stable");
        assert_ne!(
            user,
            redis_acl_user("topn", &rules[1..]),
            "a changed grant, another user"
        );
    }

    fn http(prefixes: &[&str]) -> HttpGrant {
        HttpGrant {
            url_prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            max_response_bytes: None,
        }
    }

    #[test]
    fn http_prefixes() {
        let g = http(&["http://127.0.0.1:58080/"]);
        assert!(check_http_url(&g, "http://127.0.0.1:58080/events").is_ok());
        assert!(check_http_url(&g, "http://127.0.0.1:58081/events").is_err());
        assert!(check_http_url(&g, "http://127.0.0.1:58080@evil.example/").is_err());
        assert!(check_http_url(&g, "http://user:pw@127.0.0.1:58080/").is_err());
    }

    #[test]
    fn http_prefixes_match_parsed_urls_on_segment_boundaries() {
        let g = http(&["http://a/api"]);
        let ok = |u: &str| check_http_url(&g, u).map(|u| u.to_string());
        assert_eq!(ok("http://a/api").as_deref(), Ok("http://a/api"));
        assert!(ok("http://a/api/x/y?q=1#frag").is_ok_and(|u| !u.contains('#')));
        assert!(ok("http://A:80/api/x").is_ok(), "case and default port");
        for refused in [
            "http://a/apix",
            "http://a/apiary/x",
            "http://a/api/../admin",
            "http://a/api/%2e%2e/admin",
            "http://a/api/%2E%2E/admin",
            "http://a/api/..%2fadmin",
            "http://a/api%2f..%2fadmin",
            "http://a/api/%5c..%5cadmin",
            "http://a/api/x%00",
            "http://a/",
            "http://a.evil/api",
            "http://a.a/api",
            "http://a:81/api",
            "https://a/api",
            "ftp://a/api",
            "http://u@a/api",
            "not a url",
        ] {
            assert!(
                ok(refused).is_err(),
                "{refused} must be refused: {:?}",
                ok(refused)
            );
        }
        // A prefix ending in `/` covers everything below it, and the directory itself.
        let g = http(&["http://127.0.0.1:58080/v1/"]);
        assert!(check_http_url(&g, "http://127.0.0.1:58080/v1/events").is_ok());
        assert!(check_http_url(&g, "http://127.0.0.1:58080/v1").is_ok());
        assert!(check_http_url(&g, "http://127.0.0.1:58080/v1x/events").is_err());
        assert!(check_http_url(&g, "http://127.0.0.1:58080/v1/../v2").is_err());
        // Percent-encoded letters are the same segment once decoded.
        assert!(check_http_url(&g, "http://127.0.0.1:58080/%76%31/e").is_ok());
        // Numeric hosts are normalised before the comparison.
        assert!(check_http_url(&g, "http://2130706433:58080/v1/e").is_ok());
    }
}
