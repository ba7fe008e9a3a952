//! The redis capability. Each plugin talks to Redis as an ACL user of its own, limited to its
//! grant's key prefixes and commands, so Redis itself holds it there (inside scripts too);
//! the host's own check (`grants::check_redis_command`) stays the first fence. The host's
//! connection (`services.redis_url`) is the admin one: `ACL SETUSER` and `SCRIPT KILL`.

use std::collections::HashMap;
use std::io::Read;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tracing::{error, info, warn};

use super::super::bindings::fanout::sink::errors::CapabilityError;
use super::super::bindings::fanout::sink::redis as wit_redis;
use super::super::grants;
use super::super::PluginState;
use super::{granted, Capabilities, ServicesError};
use crate::config::{RedisGrant, RedisUsers, ServicesConfig};
use crate::metrics::label;

/// Which connection a plugin's grant uses: a version of the plugin swapped in with another
/// grant (a reload) gets a connection, and an ACL user, of its own.
fn conn_key(plugin: &str, grant: &RedisGrant) -> String {
    format!(
        "{plugin}\n{}\n{}",
        grants::redis_acl_rules(grant).join(" "),
        grant.user.as_deref().unwrap_or_default()
    )
}

/// The admin connection and the plugins' own connections.
pub struct RedisAccess {
    client: ::redis::Client,
    admin: ConnectionManager,
    users: RedisUsers,
    /// This host's password for the users it makes: random per start, never written anywhere.
    password: String,
    plugins: tokio::sync::Mutex<HashMap<String, ConnectionManager>>,
}

impl RedisAccess {
    pub async fn connect(cfg: &ServicesConfig) -> Result<Self, ServicesError> {
        let redis_err = |source| ServicesError::Redis {
            url: cfg.redis_url.clone(),
            source,
        };
        let client = ::redis::Client::open(cfg.redis_url.as_str()).map_err(redis_err)?;
        let mgr_cfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        let admin = ConnectionManager::new_with_config(client.clone(), mgr_cfg)
            .await
            .map_err(redis_err)?;
        Ok(RedisAccess {
            client,
            admin,
            users: cfg.redis_users,
            password: random_password().map_err(ServicesError::Random)?,
            plugins: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The plugin's own connection, made at its first call: its ACL user is set up from the
    /// grant (`redis_users = "host"`) or taken from the grant (`"provided"`).
    async fn plugin_conn(
        &self,
        plugin: &str,
        grant: &RedisGrant,
    ) -> Result<ConnectionManager, CapabilityError> {
        let key = conn_key(plugin, grant);
        let mut conns = self.plugins.lock().await;
        if let Some(c) = conns.get(&key) {
            return Ok(c.clone());
        }
        let (user, password) = match self.users {
            RedisUsers::Host => {
                let rules = grants::redis_acl_rules(grant);
                let user = grants::redis_acl_user(plugin, &rules);
                let mut setuser = ::redis::cmd("ACL");
                setuser.arg("SETUSER").arg(&user).arg(&rules);
                // Added, not replacing: other hosts with the same grant share the user.
                setuser.arg(format!(">{}", self.password));
                let mut admin = self.admin.clone();
                setuser.query_async::<()>(&mut admin).await.map_err(|e| {
                    CapabilityError::Failed(format!("redis: ACL SETUSER {user}: {e}"))
                })?;
                info!(plugin, user, rules = %rules.join(" "), "redis: plugin's ACL user set up");
                (user, self.password.clone())
            }
            RedisUsers::Provided => (
                grant.user.clone().unwrap_or_default(),
                grant.password.clone().unwrap_or_default(),
            ),
        };
        let info = self.client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_username(&user)
            .set_password(&password)
            // CLIENT SETINFO is no command of a plugin's user.
            .set_skip_set_lib_name();
        let failed = |e: ::redis::RedisError| {
            CapabilityError::Failed(format!("redis: connecting as {user}: {e}"))
        };
        let client = ::redis::Client::open(info.set_redis_settings(settings)).map_err(failed)?;
        let mgr_cfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(grant.timeout() + Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        let conn = ConnectionManager::new_with_config(client, mgr_cfg)
            .await
            .map_err(failed)?;
        conns.insert(key, conn.clone());
        Ok(conn)
    }

    /// Drops the plugin's connection after a connection or authentication error: a restarted
    /// Redis has lost the ACL users (they live in memory), so the next call sets the user up
    /// again rather than reconnecting with a password Redis no longer knows.
    async fn forget(&self, plugin: &str, grant: &RedisGrant, e: &::redis::RedisError) {
        let text = e.to_string();
        if e.kind() == ::redis::ErrorKind::AuthenticationFailed
            || e.is_io_error()
            || e.is_connection_dropped()
            || text.contains("WRONGPASS")
            || text.contains("NOAUTH")
        {
            self.plugins.lock().await.remove(&conn_key(plugin, grant));
        }
    }

    /// After a script call outlived its time: `SCRIPT KILL` on the admin connection. Redis
    /// reads it once the script has run `busy-reply-threshold` (5 s by default); it kills any
    /// script running that long (one that wrote nothing). Returns what happened, for the plugin.
    async fn kill_script(&self, caps: &Capabilities) -> String {
        let plugin = caps.plugin.as_str();
        let mut admin = self.admin.clone();
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            ::redis::cmd("SCRIPT")
                .arg("KILL")
                .query_async::<()>(&mut admin),
        )
        .await;
        match answer {
            Ok(Ok(())) => {
                warn!(
                    plugin,
                    "redis: a script outlived its call and was killed (SCRIPT KILL)"
                );
                caps.services.metrics.add_labelled(
                    "fanout_redis_scripts_killed_total",
                    &label("plugin", plugin),
                    1.0,
                );
                "; its script was killed (SCRIPT KILL)".into()
            }
            Ok(Err(e)) if e.to_string().contains("NOTBUSY") => {
                "; no script was running any more".into()
            }
            Ok(Err(e)) if e.to_string().contains("UNKILLABLE") => {
                error!(
                    plugin,
                    "redis: a script that wrote keeps running and cannot be killed: Redis \
                     answers BUSY until it ends or is stopped with SHUTDOWN NOSAVE"
                );
                "; its script wrote and cannot be killed (UNKILLABLE)".into()
            }
            Ok(Err(e)) => format!("; SCRIPT KILL failed: {e}"),
            Err(_) => "; SCRIPT KILL got no answer".into(),
        }
    }
}

/// 24 random bytes from the OS, hex.
fn random_password() -> std::io::Result<String> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn is_script<A: AsRef<[u8]>>(command: &[A]) -> bool {
    command.first().is_some_and(|n| {
        let n = String::from_utf8_lossy(n.as_ref()).to_ascii_uppercase();
        grants::REDIS_SCRIPT_COMMANDS.contains(&n.as_str())
    })
}

/// A pipeline as text for `plugin test`'s report: each command's name and first argument.
fn describe<A: AsRef<[u8]>>(commands: &[Vec<A>]) -> String {
    let parts: Vec<String> = commands
        .iter()
        .map(|c| {
            c.iter()
                .take(2)
                .map(|a| String::from_utf8_lossy(a.as_ref()).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    format!("redis {}", parts.join("; "))
}

/// The commands as the WIT's `command` lists (what the trial's fakes take).
fn owned<A: AsRef<[u8]>>(commands: &[Vec<A>]) -> Vec<wit_redis::Command> {
    commands
        .iter()
        .map(|c| c.iter().map(|a| a.as_ref().to_vec()).collect())
        .collect()
}

/// The `pipeline-resp` capability call: the commands of `buf` (RESP), then as `pipeline`.
pub(super) fn pipeline_resp(
    state: &PluginState,
    buf: &[u8],
    atomic: bool,
) -> Result<Vec<wit_redis::Reply>, CapabilityError> {
    crate::plugin::check_args_size("redis", buf.len())?;
    let commands = fanout_sdk::resp::parse(buf)
        .map_err(|e| CapabilityError::Failed(format!("redis: pipeline-resp: {e}")))?;
    pipeline(state, &commands, atomic)
}

/// The `pipeline` capability call (and `pipeline-resp`'s, with borrowed arguments).
pub(super) fn pipeline<A: AsRef<[u8]>>(
    state: &PluginState,
    commands: &[Vec<A>],
    atomic: bool,
) -> Result<Vec<wit_redis::Reply>, CapabilityError> {
    let caps = &state.caps;
    if let Some(fakes) = state.unchecked_fakes() {
        return fakes.redis(&owned(commands), atomic);
    }
    let grant = state.note_refusal(
        || describe(commands),
        granted(&caps.grants.redis, "redis", &caps.plugin),
    )?;
    crate::plugin::check_args_size(
        "redis",
        commands.iter().flatten().map(|a| a.as_ref().len()).sum(),
    )?;
    for c in commands {
        let checked = grants::check_redis_command(grant, c).map_err(CapabilityError::NotGranted);
        state.note_refusal(|| describe(std::slice::from_ref(c)), checked)?;
    }
    if let Some(fakes) = state.fakes() {
        return fakes.redis(&owned(commands), atomic);
    }
    let access = caps
        .services
        .redis
        .as_ref()
        .ok_or_else(|| CapabilityError::Failed("the host has no redis_url".into()))?;
    let scripts = commands.iter().any(|c| is_script(c));
    let mut pipe = ::redis::pipe();
    if atomic {
        pipe.atomic();
    }
    for c in commands {
        // Checked above: no command is empty.
        let Some((name, args)) = c.split_first() else {
            continue;
        };
        let mut cmd = ::redis::cmd(&String::from_utf8_lossy(name.as_ref()));
        for arg in args {
            cmd.arg(arg.as_ref());
        }
        pipe.add_command(cmd);
    }
    // The grant's bound, and never past the plugin's call.
    let timeout = state.capability_timeout(grant.timeout().as_millis() as u64)?;
    let replies: Vec<::redis::Value> = caps.services.runtime.block_on(async {
        let mut conn = access.plugin_conn(&caps.plugin, grant).await?;
        match tokio::time::timeout(timeout, pipe.query_async(&mut conn)).await {
            Ok(Ok(replies)) => Ok(replies),
            Ok(Err(e)) => {
                access.forget(&caps.plugin, grant, &e).await;
                Err(CapabilityError::Failed(format!("redis: {e}")))
            }
            Err(_) => {
                let what = if scripts {
                    access.kill_script(caps).await
                } else {
                    String::new()
                };
                Err(CapabilityError::Failed(format!(
                    "redis: no answer within {} ms{what}",
                    timeout.as_millis()
                )))
            }
        }
    })?;
    let size: u64 = replies.iter().map(reply_bytes).sum();
    if size > grant.max_reply_bytes() {
        return Err(CapabilityError::Failed(format!(
            "redis: replies of {size} bytes exceed the grant's max_reply_bytes ({})",
            grant.max_reply_bytes()
        )));
    }
    replies.into_iter().map(to_reply).collect()
}

/// About what a reply costs the plugin: its data plus a little per element.
fn reply_bytes(v: &::redis::Value) -> u64 {
    use ::redis::Value as V;
    16 + match v {
        V::BulkString(b) => b.len() as u64,
        V::SimpleString(s) => s.len() as u64,
        V::VerbatimString { text, .. } => text.len() as u64,
        V::Array(items) | V::Set(items) => items.iter().map(reply_bytes).sum(),
        V::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| reply_bytes(k) + reply_bytes(v))
            .sum(),
        _ => 0,
    }
}

fn to_scalar(v: ::redis::Value) -> Result<wit_redis::Scalar, CapabilityError> {
    use ::redis::Value as V;
    use wit_redis::Scalar as S;
    Ok(match v {
        V::Nil => S::Nil,
        V::Int(i) => S::Integer(i),
        V::BulkString(b) => S::Data(b),
        V::SimpleString(s) => S::Status(s),
        V::Okay => S::Status("OK".into()),
        V::Double(d) => S::Data(d.to_string().into_bytes()),
        V::Boolean(b) => S::Integer(i64::from(b)),
        V::VerbatimString { text, .. } => S::Data(text.into_bytes()),
        V::BigNumber(n) => S::Data(n.to_string().into_bytes()),
        V::ServerError(e) => return Err(CapabilityError::Failed(format!("redis: {e:?}"))),
        other => {
            return Err(CapabilityError::Failed(format!(
                "redis reply nested too deep for the capability: {other:?}"
            )))
        }
    })
}

fn to_reply(v: ::redis::Value) -> Result<wit_redis::Reply, CapabilityError> {
    use ::redis::Value as V;
    use wit_redis::Reply as R;
    Ok(match v {
        V::Array(items) | V::Set(items) => {
            R::Array(items.into_iter().map(to_scalar).collect::<Result<_, _>>()?)
        }
        V::Map(pairs) => R::Array(
            pairs
                .into_iter()
                .flat_map(|(k, v)| [k, v])
                .map(to_scalar)
                .collect::<Result<_, _>>()?,
        ),
        scalar => match to_scalar(scalar)? {
            wit_redis::Scalar::Nil => R::Nil,
            wit_redis::Scalar::Integer(i) => R::Integer(i),
            wit_redis::Scalar::Data(d) => R::Data(d),
            wit_redis::Scalar::Status(s) => R::Status(s),
        },
    })
}
