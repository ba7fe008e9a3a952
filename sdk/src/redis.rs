//! Redis helpers over [`Host::redis_pipeline`].

use crate::{CapabilityError, Host, WasmHost};

pub use crate::bindings::fanout::sink::redis::{Command, Reply, Scalar};

/// Builds a command from text arguments: `command(&["SET", "k", "v"])`.
pub fn command(args: &[&str]) -> Command {
    args.iter().map(|a| a.as_bytes().to_vec()).collect()
}

/// A command builder for mixed arguments: `Cmd::new("EXPIRE").arg("k").arg(120)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmd(Command);

impl Cmd {
    pub fn new(name: &str) -> Self {
        Cmd(vec![name.as_bytes().to_vec()])
    }

    /// Appends one argument (text, bytes or a number).
    pub fn arg(mut self, arg: impl ToArg) -> Self {
        self.0.push(arg.to_arg());
        self
    }

    pub fn into_command(self) -> Command {
        self.0
    }
}

/// A value usable as a Redis argument.
pub trait ToArg {
    fn to_arg(&self) -> Vec<u8>;
}

impl ToArg for &str {
    fn to_arg(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}
impl ToArg for String {
    fn to_arg(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}
impl ToArg for &String {
    fn to_arg(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}
impl ToArg for &[u8] {
    fn to_arg(&self) -> Vec<u8> {
        self.to_vec()
    }
}
impl ToArg for Vec<u8> {
    fn to_arg(&self) -> Vec<u8> {
        self.clone()
    }
}
macro_rules! int_arg {
    ($($t:ty),*) => {$(
        impl ToArg for $t {
            fn to_arg(&self) -> Vec<u8> { self.to_string().into_bytes() }
        }
    )*};
}
int_arg!(i32, i64, u32, u64, usize);

/// Sends text commands to the real host in one round trip (not atomic):
/// `redis::pipeline(&[&["INCR", "k"], &["EXPIRE", "k", "60"]])`.
pub fn pipeline(commands: &[&[&str]]) -> Result<Vec<Reply>, CapabilityError> {
    pipeline_on(&WasmHost, commands, false)
}

/// [`pipeline`] on any [`Host`] (for code that tests run against a recorder).
pub fn pipeline_on(
    host: &(impl Host + ?Sized),
    commands: &[&[&str]],
    atomic: bool,
) -> Result<Vec<Reply>, CapabilityError> {
    let commands: Vec<Command> = commands.iter().map(|c| command(c)).collect();
    host.redis_pipeline(&commands, atomic)
}

/// The integer in a reply, if it is one (also a numeric bulk string).
pub fn reply_int(reply: &Reply) -> Option<i64> {
    match reply {
        Reply::Integer(i) => Some(*i),
        Reply::Data(d) => std::str::from_utf8(d).ok()?.parse().ok(),
        _ => None,
    }
}

/// The text of a bulk or status reply.
pub fn reply_string(reply: &Reply) -> Option<String> {
    match reply {
        Reply::Data(d) => Some(String::from_utf8_lossy(d).into_owned()),
        Reply::Status(s) => Some(s.clone()),
        Reply::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

/// The integers of an array reply (non-integers are skipped).
pub fn reply_ints(reply: &Reply) -> Vec<i64> {
    match reply {
        Reply::Array(items) => items
            .iter()
            .filter_map(|s| match s {
                Scalar::Integer(i) => Some(*i),
                Scalar::Data(d) => std::str::from_utf8(d).ok()?.parse().ok(),
                _ => None,
            })
            .collect(),
        other => reply_int(other).into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_commands() {
        let c = Cmd::new("ZINCRBY")
            .arg("k")
            .arg(1)
            .arg(42i64)
            .into_command();
        assert_eq!(c, command(&["ZINCRBY", "k", "1", "42"]));
        assert_eq!(reply_int(&Reply::Data(b"7".to_vec())), Some(7));
        assert_eq!(
            reply_ints(&Reply::Array(vec![Scalar::Integer(2), Scalar::Integer(1)])),
            vec![2, 1]
        );
    }
}
