//! A bare RESP connection that hands back each reply whole, errors and nested errors included,
//! in RESP2 or RESP3, for tests that compare replies exactly (the `redis` crate turns an error
//! reply into an `Err`, and one error inside an array into an error for the whole array).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One reply, as the server typed it: two replies are equal when their bytes are.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reply {
    /// Simple string `+`, error `-`, integer `:`, double `,`, boolean `#`, big number `(`: the line.
    Line(u8, Vec<u8>),
    /// Bulk string `$`, blob error `!`, verbatim string `=`: the payload.
    Blob(u8, Vec<u8>),
    /// `$-1`, `*-1` (RESP2) or `_` (RESP3).
    Null(u8),
    /// Array `*`, set `~`, push `>`, map `%` and attribute `|` (keys and values alternate).
    Aggregate(u8, Vec<Reply>),
}

/// Readable in a failed assertion: the type byte, then the text or the elements.
impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Line(kind, data) | Reply::Blob(kind, data) => write!(f, "{}{:?}", *kind as char, String::from_utf8_lossy(data)),
            Reply::Null(kind) => write!(f, "{}null", *kind as char),
            Reply::Aggregate(kind, items) => {
                write!(f, "{}", *kind as char)?;
                f.debug_list().entries(items).finish()
            }
        }
    }
}

impl Reply {
    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Line(b'-', _) | Reply::Blob(b'!', _))
    }

    /// The text of a simple string, error, bulk string, or of an integer.
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Line(_, data) | Reply::Blob(_, data) => Some(String::from_utf8_lossy(data).into_owned()),
            _ => None,
        }
    }

    pub fn integer(&self) -> Option<i64> {
        match self {
            Reply::Line(b':', data) => std::str::from_utf8(data).ok()?.parse().ok(),
            _ => None,
        }
    }

    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Reply::Line(_, data) | Reply::Blob(_, data) => Some(data),
            _ => None,
        }
    }

    pub fn items(&self) -> Option<&[Reply]> {
        match self {
            Reply::Aggregate(_, items) => Some(items),
            _ => None,
        }
    }

    /// Every scalar in the reply, sorted: what replies whose order follows a hash table agree on.
    pub fn sorted_leaves(&self) -> Vec<&Reply> {
        fn walk<'a>(reply: &'a Reply, out: &mut Vec<&'a Reply>) {
            match reply {
                Reply::Aggregate(_, items) => items.iter().for_each(|i| walk(i, out)),
                other => out.push(other),
            }
        }
        let mut out = Vec::new();
        walk(self, &mut out);
        out.sort();
        out
    }
}

/// A command's arguments as the wire carries them.
pub fn args(a: &[&str]) -> Vec<Vec<u8>> {
    a.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// Runs one command and returns its reply; a test fails on a lost connection.
pub fn call(conn: &mut RespConn, a: &[&str]) -> Reply {
    conn.pipeline(&[args(a)]).unwrap().remove(0)
}

pub struct RespConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RespConn {
    pub fn connect(port: u16) -> anyhow::Result<RespConn> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        stream.set_nodelay(true)?;
        Ok(RespConn { stream, buf: Vec::new() })
    }

    /// How long [`RespConn::reply`] waits for bytes before it errs (15 s from `connect`).
    pub fn set_read_timeout(&mut self, timeout: Duration) -> anyhow::Result<()> {
        Ok(self.stream.set_read_timeout(Some(timeout))?)
    }

    /// Sends the commands in one write, then reads one reply per command.
    pub fn pipeline(&mut self, commands: &[Vec<Vec<u8>>]) -> anyhow::Result<Vec<Reply>> {
        self.send(commands)?;
        commands.iter().map(|_| self.reply()).collect()
    }

    /// Sends the commands in one write and reads nothing: [`RespConn::reply`] reads the replies.
    pub fn send(&mut self, commands: &[Vec<Vec<u8>>]) -> anyhow::Result<()> {
        let mut out = Vec::new();
        for args in commands {
            out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for a in args {
                out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                out.extend_from_slice(a);
                out.extend_from_slice(b"\r\n");
            }
        }
        self.stream.write_all(&out)?;
        Ok(())
    }

    pub fn call(&mut self, args: &[&[u8]]) -> anyhow::Result<Reply> {
        let args: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
        Ok(self.pipeline(&[args])?.remove(0))
    }

    /// The next reply (within the connection's read timeout).
    pub fn reply(&mut self) -> anyhow::Result<Reply> {
        loop {
            let mut pos = 0;
            if let Ok(reply) = parse(&self.buf, &mut pos) {
                self.buf.drain(..pos);
                return Ok(reply);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = match self.stream.read(&mut chunk) {
                // A signal cut the wait short, which says nothing about the server. A read with
                // a timeout fails with EINTR even for a signal that is then ignored (signal(7)),
                // and SIGCHLD, normally dropped at once, is queued and wakes another thread
                // while the child's parent thread blocks signals, as it does in `posix_spawn`
                // (seen as a bulk load failing while the tests beside it ran `losetup` and `cp`).
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                read => read?,
            };
            anyhow::ensure!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// More bytes are needed. (A malformed reply is a failed test: it panics.)
struct Incomplete;

fn line<'a>(buf: &'a [u8], pos: &mut usize) -> Result<&'a [u8], Incomplete> {
    let rest = &buf[*pos..];
    let end = rest.windows(2).position(|w| w == b"\r\n").ok_or(Incomplete)?;
    *pos += end + 2;
    Ok(&rest[..end])
}

fn parse(buf: &[u8], pos: &mut usize) -> Result<Reply, Incomplete> {
    let kind = *buf.get(*pos).ok_or(Incomplete)?;
    *pos += 1;
    let header = line(buf, pos)?;
    let number = || -> i64 {
        let text = std::str::from_utf8(header).unwrap_or_else(|_| panic!("a non-UTF-8 length after {}", kind as char));
        text.parse().unwrap_or_else(|_| panic!("a bad length {text:?} after {}", kind as char))
    };
    match kind {
        b'+' | b'-' | b':' | b',' | b'#' | b'(' => Ok(Reply::Line(kind, header.to_vec())),
        b'_' => Ok(Reply::Null(kind)),
        b'$' | b'!' | b'=' => {
            let len = number();
            if len < 0 {
                return Ok(Reply::Null(kind));
            }
            let len = len as usize;
            if buf.len() < *pos + len + 2 {
                return Err(Incomplete);
            }
            let data = buf[*pos..*pos + len].to_vec();
            *pos += len + 2;
            Ok(Reply::Blob(kind, data))
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let len = number();
            if len < 0 {
                return Ok(Reply::Null(kind));
            }
            let count = if kind == b'%' || kind == b'|' { len * 2 } else { len };
            let items = (0..count).map(|_| parse(buf, pos)).collect::<Result<Vec<_>, _>>()?;
            Ok(Reply::Aggregate(kind, items))
        }
        other => panic!("unknown reply type {:?}", other as char),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8]) -> Option<(Reply, usize)> {
        let mut pos = 0;
        parse(bytes, &mut pos).ok().map(|r| (r, pos))
    }

    #[test]
    fn resp2_and_resp3_replies_are_read_whole_or_not_at_all() {
        let map = b"%1\r\n+k\r\n*2\r\n:1\r\n-ERR x\r\nrest";
        let (reply, used) = one(map).unwrap();
        assert_eq!(used, map.len() - 4);
        let expected = Reply::Aggregate(
            b'%',
            vec![
                Reply::Line(b'+', b"k".to_vec()),
                Reply::Aggregate(b'*', vec![Reply::Line(b':', b"1".to_vec()), Reply::Line(b'-', b"ERR x".to_vec())]),
            ],
        );
        assert_eq!(reply, expected);
        assert!(one(b"$5\r\nhel").is_none());
        assert!(one(b"*2\r\n:1\r\n").is_none());
        assert_eq!(one(b"$-1\r\n").unwrap().0, Reply::Null(b'$'));
        assert_eq!(one(b"_\r\n").unwrap().0, Reply::Null(b'_'));
        assert!(one(b"!3\r\nERR\r\n").unwrap().0.is_error());
    }
}
