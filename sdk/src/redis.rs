//! Redis, one way: build commands into a [`Pipeline`] and send them in one round trip.
//!
//! ```
//! use fanout_sdk::testing::MockHost;
//! use fanout_sdk::Host;
//!
//! let host = MockHost::new();
//! let key = "my:n";
//! let replies = host
//!     .redis()
//!     .cmd("INCR").arg(key)
//!     .cmd("EXPIRE").arg(key).arg(60)
//!     .send()?;                      // one reply per command, in order
//! assert_eq!(replies.len(), 2);
//! // A single command is a pipeline of one.
//! let n = host.redis().cmd("GET").arg(key).send()?[0].as_int();
//! # let _ = n;
//! # Ok::<(), fanout_sdk::CapabilityError>(())
//! ```
//!
//! Arguments are text, bytes, integers, floats or `format_args!(...)`, each written straight
//! into the argument list that crosses the WIT boundary (`list<list<u8>>`): one allocation per
//! argument, none for a `String` or `Vec<u8>` handed over by value. The exactly-once primitive
//! ([`crate::exactly_once::RedisOnce`]) takes its per-event commands through the same builder
//! ([`Commands`]).

use std::fmt;
use std::io::Write as _;

use crate::{CapabilityError, Host};

pub use crate::bindings::fanout::sink::redis::{Command, Reply, Scalar};

/// A value usable as a Redis argument: its bytes, moved when it owns them.
pub trait ToArg {
    /// The argument's bytes, as Redis receives them.
    fn into_arg(self) -> Vec<u8>;
}

impl ToArg for &str {
    fn into_arg(self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}
impl ToArg for String {
    fn into_arg(self) -> Vec<u8> {
        self.into_bytes()
    }
}
impl ToArg for &String {
    fn into_arg(self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}
impl ToArg for &[u8] {
    fn into_arg(self) -> Vec<u8> {
        self.to_vec()
    }
}
impl<const N: usize> ToArg for &[u8; N] {
    fn into_arg(self) -> Vec<u8> {
        self.to_vec()
    }
}
impl ToArg for Vec<u8> {
    fn into_arg(self) -> Vec<u8> {
        self
    }
}
impl ToArg for &Vec<u8> {
    fn into_arg(self) -> Vec<u8> {
        self.clone()
    }
}
/// `format_args!("{prefix}count:{id}")`: formatted straight into the argument, without an
/// intermediate `String`.
impl ToArg for fmt::Arguments<'_> {
    fn into_arg(self) -> Vec<u8> {
        if let Some(text) = self.as_str() {
            return text.as_bytes().to_vec();
        }
        // Most keys fit: one allocation.
        let mut out = Vec::with_capacity(64);
        // Writing into a Vec cannot fail; a `Display` impl that errors leaves what it wrote.
        let _ = out.write_fmt(self);
        out
    }
}
/// Integers as their decimal text (`1`, `-7`), as Redis reads numbers: written by `itoa`
/// (a per-event path; `to_string` goes through `core::fmt`).
macro_rules! integer_arg {
    ($($t:ty),*) => {$(
        impl ToArg for $t {
            fn into_arg(self) -> Vec<u8> {
                itoa::Buffer::new().format(self).as_bytes().to_vec()
            }
        }
    )*};
}
integer_arg!(i32, i64, u32, u64, usize);

/// A float as `Display` prints it (`0.5`, `7`).
impl ToArg for f64 {
    fn into_arg(self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

/// Redis commands under construction: the list that crosses the WIT boundary, built in place.
/// `cmd` starts a command, `arg` appends to the last one. Used by [`Pipeline`] and by
/// [`RedisOnce::event`](crate::exactly_once::RedisOnce::event).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commands {
    list: Vec<Command>,
}

impl Commands {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts command `name` (`"SET"`, `"HINCRBY"`, ...).
    pub fn cmd(&mut self, name: &str) -> &mut Self {
        // Name and three arguments without growing: most commands.
        let mut c = Vec::with_capacity(4);
        c.push(name.as_bytes().to_vec());
        self.list.push(c);
        self
    }

    /// Appends one argument to the last command (before any `cmd`, it starts one).
    pub fn arg(&mut self, arg: impl ToArg) -> &mut Self {
        let arg = arg.into_arg();
        match self.list.last_mut() {
            Some(c) => c.push(arg),
            None => self.list.push(vec![arg]),
        }
        self
    }

    /// Appends every item as an argument of the last command.
    pub fn args<A: ToArg>(&mut self, args: impl IntoIterator<Item = A>) -> &mut Self {
        for a in args {
            self.arg(a);
        }
        self
    }

    /// The commands so far.
    pub fn as_slice(&self) -> &[Command] {
        &self.list
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn into_vec(self) -> Vec<Command> {
        self.list
    }
}

impl From<Vec<Command>> for Commands {
    fn from(list: Vec<Command>) -> Self {
        Commands { list }
    }
}

/// Commands for one round trip to Redis through a [`Host`]: `host.redis()` (or
/// `Pipeline::new(host)` for a `&dyn Host`), then `cmd`/`arg`, then [`Pipeline::send`].
#[must_use = "a pipeline does nothing until it is sent"]
pub struct Pipeline<'h, H: Host + ?Sized> {
    host: &'h H,
    commands: Commands,
    atomic: bool,
}

impl<'h, H: Host + ?Sized> Pipeline<'h, H> {
    pub fn new(host: &'h H) -> Self {
        Pipeline {
            host,
            commands: Commands::new(),
            atomic: false,
        }
    }

    /// Starts command `name`.
    pub fn cmd(&mut self, name: &str) -> &mut Self {
        self.commands.cmd(name);
        self
    }

    /// Appends one argument to the last command.
    pub fn arg(&mut self, arg: impl ToArg) -> &mut Self {
        self.commands.arg(arg);
        self
    }

    /// Appends every item as an argument of the last command.
    pub fn args<A: ToArg>(&mut self, args: impl IntoIterator<Item = A>) -> &mut Self {
        self.commands.args(args);
        self
    }

    /// Runs the commands inside `MULTI`/`EXEC`.
    pub fn atomic(&mut self) -> &mut Self {
        self.atomic = true;
        self
    }

    /// The commands built so far.
    pub fn commands(&self) -> &Commands {
        &self.commands
    }

    /// Sends the commands in one round trip and empties the pipeline (it can be filled and
    /// sent again). One reply per command, in order; an empty pipeline sends nothing. A Redis
    /// error reply anywhere fails the whole call.
    pub fn send(&mut self) -> Result<Vec<Reply>, CapabilityError> {
        let commands = std::mem::take(&mut self.commands);
        send_commands(self.host, commands.as_slice(), self.atomic)
    }
}

/// Sends `commands` through `host` and checks there is one reply per command.
pub(crate) fn send_commands<H: Host + ?Sized>(
    host: &H,
    commands: &[Command],
    atomic: bool,
) -> Result<Vec<Reply>, CapabilityError> {
    if commands.is_empty() {
        return Ok(Vec::new());
    }
    let replies = host.redis_pipeline(commands, atomic)?;
    one_reply_each(replies, commands.len())
}

/// `replies`, when there is one per command sent (`count`).
pub(crate) fn one_reply_each(
    replies: Vec<Reply>,
    count: usize,
) -> Result<Vec<Reply>, CapabilityError> {
    if replies.len() != count {
        return Err(CapabilityError::Failed(format!(
            "redis: {} replies for {count} commands",
            replies.len()
        )));
    }
    Ok(replies)
}

impl Reply {
    /// The integer of an integer reply, or of a numeric bulk string (`GET` of a counter).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Reply::Integer(i) => Some(*i),
            Reply::Data(d) => std::str::from_utf8(d).ok()?.parse().ok(),
            _ => None,
        }
    }

    /// The text of a bulk, status or integer reply (bulk bytes decoded lossily).
    pub fn as_string(&self) -> Option<String> {
        match self {
            Reply::Data(d) => Some(String::from_utf8_lossy(d).into_owned()),
            Reply::Status(s) => Some(s.clone()),
            Reply::Integer(i) => Some(i.to_string()),
            _ => None,
        }
    }

    /// The integers of an array reply (non-integers skipped), or of a single integer reply.
    pub fn as_ints(&self) -> Vec<i64> {
        match self {
            Reply::Array(items) => items
                .iter()
                .filter_map(|s| match s {
                    Scalar::Integer(i) => Some(*i),
                    Scalar::Data(d) => std::str::from_utf8(d).ok()?.parse().ok(),
                    _ => None,
                })
                .collect(),
            other => other.as_int().into_iter().collect(),
        }
    }

    /// The texts of an array reply (`ZRANGE`, `HGETALL`; nils skipped).
    pub fn as_strings(&self) -> Vec<String> {
        match self {
            Reply::Array(items) => items
                .iter()
                .filter_map(|s| match s {
                    Scalar::Data(d) => Some(String::from_utf8_lossy(d).into_owned()),
                    Scalar::Status(s) => Some(s.clone()),
                    Scalar::Integer(i) => Some(i.to_string()),
                    Scalar::Nil => None,
                })
                .collect(),
            other => other.as_string().into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Call, MockHost};

    fn text(c: &Command) -> Vec<String> {
        c.iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }

    #[test]
    fn builds_commands_in_place() {
        let mut c = Commands::new();
        let id = 42i64;
        c.cmd("ZINCRBY")
            .arg(format_args!("k:{id}"))
            .arg(1)
            .arg(id)
            .cmd("SET")
            .arg(String::from("s"))
            .arg(&b"v\x00"[..])
            .arg(0.5)
            .cmd("DEL")
            .args(["a", "b"]);
        let text: Vec<Vec<String>> = c.as_slice().iter().map(text).collect();
        assert_eq!(
            text,
            [
                vec!["ZINCRBY", "k:42", "1", "42"],
                vec!["SET", "s", "v\0", "0.5"],
                vec!["DEL", "a", "b"]
            ]
        );
        // An argument before any command starts one.
        let mut c = Commands::new();
        c.arg("PING");
        assert_eq!(c.as_slice(), [vec![b"PING".to_vec()]]);
    }

    #[test]
    fn a_pipeline_is_one_round_trip_and_can_be_sent_again() {
        let host = MockHost::new();
        host.push_redis(Ok(vec![Reply::Integer(3), Reply::Integer(1)]));
        let mut p = host.redis();
        p.cmd("INCR").arg("k").cmd("EXPIRE").arg("k").arg(60);
        let replies = p.send().unwrap();
        assert_eq!(replies[0].as_int(), Some(3));
        assert!(p.commands().is_empty(), "sent commands are gone");
        assert_eq!(p.send().unwrap(), vec![], "nothing to send: no call");
        let replies = host.redis().cmd("GET").arg("k").atomic().send().unwrap();
        assert_eq!(replies, vec![Reply::Nil]);
        assert_eq!(
            host.service_calls(),
            vec![
                Call::Redis {
                    commands: vec![
                        vec!["INCR".into(), "k".into()],
                        vec!["EXPIRE".into(), "k".into(), "60".into()]
                    ],
                    atomic: false
                },
                Call::Redis {
                    commands: vec![vec!["GET".into(), "k".into()]],
                    atomic: true
                }
            ]
        );
        // A reply count that does not match is an error, not a silent shift.
        host.push_redis(Ok(vec![]));
        assert!(matches!(
            host.redis().cmd("GET").arg("k").send(),
            Err(CapabilityError::Failed(_))
        ));
    }

    #[test]
    fn reads_replies() {
        assert_eq!(Reply::Data(b"7".to_vec()).as_int(), Some(7));
        assert_eq!(
            Reply::Array(vec![Scalar::Integer(2), Scalar::Integer(1)]).as_ints(),
            vec![2, 1]
        );
        assert_eq!(
            Reply::Array(vec![Scalar::Data(b"a".to_vec()), Scalar::Nil]).as_strings(),
            vec!["a"]
        );
        assert_eq!(
            Reply::Status("OK".into()).as_string().as_deref(),
            Some("OK")
        );
    }
}
