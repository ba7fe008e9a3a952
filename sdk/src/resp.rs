//! The Redis protocol (RESP) as `redis.pipeline-resp` carries commands: per command an array of
//! bulk strings, `*<count>\r\n`, then `$<length>\r\n<bytes>\r\n` per argument, back to back.
//! The SDK writes it; the host reads it with [`parse`] (the same code on both sides).

use crate::redis::Command;

/// `commands` in RESP.
pub fn encode(commands: &[Command]) -> Vec<u8> {
    let bytes: usize = commands
        .iter()
        .map(|c| 16 + c.iter().map(|a| a.len() + 16).sum::<usize>())
        .sum();
    let mut out = Vec::with_capacity(bytes);
    for c in commands {
        write_command(&mut out, c);
    }
    out
}

/// One command, `args` its name and arguments.
pub fn write_command<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    write_length(out, b'*', args.len());
    for a in args {
        write_bulk(out, a.as_ref());
    }
}

/// One argument: `$<length>\r\n<bytes>\r\n`.
pub fn write_bulk(out: &mut Vec<u8>, arg: &[u8]) {
    write_length(out, b'$', arg.len());
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

/// `<kind><n>\r\n` (`*` heads a command, `$` an argument).
pub fn write_length(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The arguments of a command still being written, counted: RESP puts the count first.
#[derive(Debug, Default)]
pub struct Args {
    buf: Vec<u8>,
    count: usize,
}

impl Args {
    pub fn with_capacity(bytes: usize) -> Self {
        Args {
            buf: Vec::with_capacity(bytes),
            count: 0,
        }
    }

    pub fn bytes(&mut self, arg: &[u8]) {
        write_bulk(&mut self.buf, arg);
        self.count += 1;
    }

    /// An integer argument, as its decimal text.
    pub fn number(&mut self, n: impl itoa::Integer) {
        self.bytes(itoa::Buffer::new().format(n).as_bytes());
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The written arguments (without a count).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Commands written as RESP arrays of bulk strings, back to back, their arguments borrowed from
/// `buf`. Nothing else is accepted: no inline commands, no other types, no leading zeros, no
/// bytes after the last command.
pub fn parse(buf: &[u8]) -> Result<Vec<Vec<&[u8]>>, String> {
    let mut commands = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let (count, mut next) = read_length(buf, at, b'*')?;
        if count == 0 {
            return Err(format!("empty command at byte {at}"));
        }
        // Every argument takes 6 bytes at least (`$0\r\n\r\n`): no capacity beyond the buffer.
        let mut args = Vec::with_capacity(count.min((buf.len() - next) / 6));
        for _ in 0..count {
            let (len, start) = read_length(buf, next, b'$')?;
            let end = start
                .checked_add(len)
                .filter(|end| buf.get(*end..end.saturating_add(2)) == Some(b"\r\n"))
                .ok_or_else(|| {
                    format!("argument at byte {next} does not end with CRLF where its length says")
                })?;
            args.push(&buf[start..end]);
            next = end + 2;
        }
        commands.push(args);
        at = next;
    }
    Ok(commands)
}

/// `<kind><decimal>\r\n` at `at`: the number, and where what follows it starts.
fn read_length(buf: &[u8], at: usize, kind: u8) -> Result<(usize, usize), String> {
    let bad = || format!("expected `{}<length>\\r\\n` at byte {at}", kind as char);
    if buf.get(at) != Some(&kind) {
        return Err(bad());
    }
    let digits = &buf[at + 1..];
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 10 || (n > 1 && digits[0] == b'0') || digits.get(n..n + 2) != Some(b"\r\n") {
        return Err(bad());
    }
    let value = std::str::from_utf8(&digits[..n])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((value, at + 1 + n + 2))
}

/// [`parse`], each argument copied: the commands as [`Command`]s.
pub fn parse_owned(buf: &[u8]) -> Result<Vec<Command>, String> {
    Ok(parse(buf)?
        .into_iter()
        .map(|c| c.into_iter().map(<[u8]>::to_vec).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_arrays_of_bulk_strings() {
        let commands = vec![
            vec![b"SET".to_vec(), b"k".to_vec(), Vec::new()],
            vec![b"ECHO".to_vec(), vec![b'x'; 1234]],
        ];
        let mut want =
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n*2\r\n$4\r\nECHO\r\n$1234\r\n".to_vec();
        want.extend_from_slice(&[b'x'; 1234]);
        want.extend_from_slice(b"\r\n");
        assert_eq!(encode(&commands), want);
        assert!(encode(&[]).is_empty());
        let mut args = Args::default();
        args.bytes(b"k");
        args.number(-12);
        assert_eq!(args.len(), 2);
        assert_eq!(args.as_bytes(), b"$1\r\nk\r\n$3\r\n-12\r\n");
    }

    #[test]
    fn reads_back_what_it_writes() {
        let commands = vec![
            vec![b"INCR".to_vec(), b"t1:count".to_vec()],
            vec![b"SET".to_vec(), b"k".to_vec(), Vec::new()],
            vec![b"EVAL".to_vec(), b"a\r\nb".to_vec(), b"0".to_vec()],
            vec![b"SET".to_vec(), b"k2".to_vec(), vec![b'x'; 12_345]],
        ];
        assert_eq!(parse_owned(&encode(&commands)), Ok(commands));
        assert_eq!(parse(b""), Ok(Vec::new()));
    }

    #[test]
    fn anything_but_strict_resp_is_refused() {
        let good = encode(&[vec![b"INCR".to_vec(), b"t1:count".to_vec()]]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("inline command", b"INCR t1:count\r\n".to_vec()),
            ("empty array", b"*0\r\n".to_vec()),
            ("length past the end", b"*1\r\n$9\r\nINCR\r\n".to_vec()),
            ("length short of the CRLF", b"*1\r\n$3\r\nINCR\r\n".to_vec()),
            (
                "fewer arguments than counted",
                b"*2\r\n$4\r\nINCR\r\n".to_vec(),
            ),
            ("leading zero", b"*01\r\n$4\r\nINCR\r\n".to_vec()),
            ("negative length", b"*1\r\n$-1\r\n".to_vec()),
            ("integer instead of bulk", b"*1\r\n:1\r\n".to_vec()),
            ("LF only", b"*1\n$4\nINCR\n".to_vec()),
            ("huge count", b"*9999999999\r\n$4\r\nINCR\r\n".to_vec()),
            ("huge length", b"*1\r\n$9999999999\r\nINCR\r\n".to_vec()),
            ("trailing bytes", [good.as_slice(), b"x"].concat()),
        ];
        for (what, buf) in cases {
            assert!(parse(&buf).is_err(), "{what} was accepted");
        }
    }
}
