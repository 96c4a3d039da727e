//! Minimal RESP2 framing, as spoken on the side port (and by the module's tiny RESP client).
//!
//! Parsing is incremental: [`parse`] looks at whatever has been read so far and either returns a
//! whole frame (consuming its bytes) or says it needs more. Everything here faces the network,
//! so every size is bounded and malformed input is a typed error, never a panic.
//!
//! Parsing takes two passes over the buffer: the first only validates and measures the frame
//! without allocating, so a big frame arriving in many small reads costs a cheap rescan per read
//! instead of a rebuild; the second runs once the frame is complete and hands out bulk strings as
//! zero-copy slices of the consumed bytes.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt::Write as _;
use thiserror::Error;

/// Largest bulk string accepted. Raft snapshots travel as one bulk, so this is generous, but it
/// still stops a bogus length from making us buffer without limit.
pub const MAX_BULK: usize = 256 * 1024 * 1024;
/// Most elements accepted in one array.
pub const MAX_ARRAY: usize = 1024 * 1024;
/// Deepest array nesting accepted (a top-level array is depth 1). Bounds the parser's recursion.
pub const MAX_DEPTH: usize = 8;
/// Longest header line (simple string, error, integer or length) accepted. Without it, a peer
/// that never sends CRLF would make us buffer forever waiting for the end of the line.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Bytes),
    /// RESP2's null bulk string (`$-1`) or null array (`*-1`).
    Null,
    Array(Vec<Frame>),
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("unknown frame type byte 0x{0:02x}")]
    UnknownType(u8),
    #[error("invalid length {0:?}")]
    BadLength(String),
    #[error("negative length {0}")]
    NegativeLength(i64),
    #[error("bulk string of {0} bytes is over the limit of {MAX_BULK}")]
    BulkTooLong(u64),
    #[error("array of {0} elements is over the limit of {MAX_ARRAY}")]
    ArrayTooLong(u64),
    #[error("arrays nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("invalid integer {0:?}")]
    BadInteger(String),
    #[error("missing CRLF")]
    MissingCrlf,
    #[error("line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// The validating pass accepted bytes the building pass could not read. Cannot happen unless
    /// the two passes disagree; reported rather than panicking.
    #[error("frame ended early")]
    Truncated,
}

/// Why a frame could not be read (yet).
enum Fail {
    /// Not an error: more bytes are needed.
    Incomplete,
    Invalid(ProtocolError),
}

impl From<ProtocolError> for Fail {
    fn from(e: ProtocolError) -> Self {
        Fail::Invalid(e)
    }
}

/// Reads one frame from the front of `buf`. `Ok(None)` means the frame is not complete yet (read
/// more and call again); `buf` is then untouched. On success the frame's bytes are consumed. On
/// error the stream cannot be resynchronised and the connection should be closed.
pub fn parse(buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
    let mut len = 0;
    match walk(buf, &mut len, 0, None) {
        Ok(_) => {}
        Err(Fail::Incomplete) => return Ok(None),
        Err(Fail::Invalid(e)) => return Err(e),
    }
    let bytes = buf.split_to(len).freeze();
    match walk(&bytes, &mut 0, 0, Some(&bytes)) {
        Ok(Some(frame)) => Ok(Some(frame)),
        Ok(None) | Err(Fail::Incomplete) => Err(ProtocolError::Truncated),
        Err(Fail::Invalid(e)) => Err(e),
    }
}

/// Walks the frame starting at `buf[*pos]`, advancing `*pos` past it. With `src` (the same bytes
/// as `buf`, owned) it builds the frame; without, it only validates and returns `None`. One
/// function for both passes keeps them from ever disagreeing about the grammar.
fn walk(buf: &[u8], pos: &mut usize, depth: usize, src: Option<&Bytes>) -> Result<Option<Frame>, Fail> {
    let ty = *buf.get(*pos).ok_or(Fail::Incomplete)?;
    *pos += 1;
    match ty {
        b'+' | b'-' => {
            let line = line(buf, pos)?;
            Ok(src.map(|_| {
                let text = String::from_utf8_lossy(line).into_owned();
                if ty == b'+' {
                    Frame::Simple(text)
                } else {
                    Frame::Error(text)
                }
            }))
        }
        b':' => {
            let line = line(buf, pos)?;
            let n = parse_i64(line).ok_or_else(|| ProtocolError::BadInteger(lossy_prefix(line)))?;
            Ok(src.map(|_| Frame::Integer(n)))
        }
        b'$' => {
            let Some(len) = length(line(buf, pos)?)? else {
                return Ok(src.map(|_| Frame::Null));
            };
            if len > MAX_BULK as u64 {
                return Err(ProtocolError::BulkTooLong(len).into());
            }
            let len = len as usize; // fits: at most MAX_BULK
            let start = *pos;
            let rest = buf.get(start..).unwrap_or_default();
            if rest.len() < len + 2 {
                return Err(Fail::Incomplete);
            }
            if &rest[len..len + 2] != b"\r\n" {
                return Err(ProtocolError::MissingCrlf.into());
            }
            *pos += len + 2;
            Ok(src.map(|b| Frame::Bulk(b.slice(start..start + len))))
        }
        b'*' => {
            // Checked before reading on, so a too-deep frame fails at once, not when complete.
            if depth + 1 > MAX_DEPTH {
                return Err(ProtocolError::TooDeep.into());
            }
            let Some(n) = length(line(buf, pos)?)? else {
                return Ok(src.map(|_| Frame::Null));
            };
            if n > MAX_ARRAY as u64 {
                return Err(ProtocolError::ArrayTooLong(n).into());
            }
            // Only the building pass allocates, and by then every element is known to be in
            // the buffer, so the capacity is backed by real bytes.
            let mut items = Vec::with_capacity(if src.is_some() { n as usize } else { 0 });
            for _ in 0..n {
                if let Some(item) = walk(buf, pos, depth + 1, src)? {
                    items.push(item);
                }
            }
            Ok(src.map(|_| Frame::Array(items)))
        }
        other => Err(ProtocolError::UnknownType(other).into()),
    }
}

/// The CRLF-terminated line starting at `buf[*pos]`, without its terminator; advances past it.
/// A lone CR or LF is an error rather than data: RESP2 header lines never contain them.
fn line<'a>(buf: &'a [u8], pos: &mut usize) -> Result<&'a [u8], Fail> {
    let rest = buf.get(*pos..).unwrap_or_default();
    let window = &rest[..rest.len().min(MAX_LINE + 2)];
    match window.iter().position(|&b| b == b'\r' || b == b'\n') {
        Some(i) if window[i] == b'\n' => Err(ProtocolError::MissingCrlf.into()),
        Some(i) => match window.get(i + 1) {
            Some(b'\n') => {
                *pos += i + 2;
                Ok(&rest[..i])
            }
            Some(_) => Err(ProtocolError::MissingCrlf.into()),
            None if i > MAX_LINE => Err(ProtocolError::LineTooLong.into()),
            None => Err(Fail::Incomplete),
        },
        None if window.len() > MAX_LINE => Err(ProtocolError::LineTooLong.into()),
        None => Err(Fail::Incomplete),
    }
}

/// A bulk or array length: `None` for the null marker -1.
fn length(line: &[u8]) -> Result<Option<u64>, ProtocolError> {
    match parse_i64(line) {
        Some(-1) => Ok(None),
        Some(n) if n < 0 => Err(ProtocolError::NegativeLength(n)),
        Some(n) => Ok(Some(n as u64)),
        None => Err(ProtocolError::BadLength(lossy_prefix(line))),
    }
}

fn parse_i64(line: &[u8]) -> Option<i64> {
    std::str::from_utf8(line).ok()?.parse().ok()
}

/// Reads from a blocking `reader` into `buf` until one whole frame is there, and returns it.
/// What follows the frame stays in `buf`, for the next call.
pub fn read_frame(reader: &mut impl std::io::Read, buf: &mut BytesMut) -> std::io::Result<Frame> {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if let Some(frame) = parse(buf).map_err(invalid_data)? {
            return Ok(frame);
        }
        match reader.read(&mut chunk) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A signal handled meanwhile (a socket with a timeout does not resume the read on
            // its own), not the peer: as `read_exact` does, read again.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// [`read_frame`] from an async reader.
pub async fn read_frame_async(reader: &mut (impl tokio::io::AsyncRead + Unpin), buf: &mut BytesMut) -> std::io::Result<Frame> {
    use tokio::io::AsyncReadExt as _;
    loop {
        if let Some(frame) = parse(buf).map_err(invalid_data)? {
            return Ok(frame);
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

fn invalid_data(e: ProtocolError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// Enough of a bad line to recognise it in an error message, without echoing megabytes.
fn lossy_prefix(line: &[u8]) -> String {
    String::from_utf8_lossy(&line[..line.len().min(32)]).into_owned()
}

/// Appends `frame` in RESP2. `Null` is written as a null bulk string.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    match frame {
        Frame::Simple(s) => encode_line(b'+', s, out),
        Frame::Error(s) => encode_line(b'-', s, out),
        Frame::Integer(n) => {
            // Writing into a BytesMut cannot fail: it grows as needed.
            let _ = write!(out, ":{n}\r\n");
        }
        Frame::Bulk(b) => encode_bulk(b, out),
        Frame::Null => out.put_slice(b"$-1\r\n"),
        Frame::Array(items) => {
            encode_array_len(items.len(), out);
            for item in items {
                encode(item, out);
            }
        }
    }
}

/// A command as clients send it: an array of bulk strings.
pub fn encode_command(parts: &[&[u8]], out: &mut BytesMut) {
    encode_array_len(parts.len(), out);
    for part in parts {
        encode_bulk(part, out);
    }
}

/// The header of an array of `len` elements; the caller appends the elements. Lets a sender
/// stream a big array without building a `Frame` first.
pub fn encode_array_len(len: usize, out: &mut BytesMut) {
    let _ = write!(out, "*{len}\r\n");
}

pub fn encode_bulk(data: &[u8], out: &mut BytesMut) {
    encode_bulk_with(data.len(), out, |out| out.put_slice(data));
}

/// A bulk string of `len` bytes written by `fill`, so a large payload (a raft snapshot) can be
/// serialised straight into the output buffer instead of through a temporary copy. `fill` must
/// write exactly `len` bytes; otherwise the receiver sees a missing CRLF and drops the connection.
pub fn encode_bulk_with(len: usize, out: &mut BytesMut, fill: impl FnOnce(&mut BytesMut)) {
    out.reserve(len + 16);
    let _ = write!(out, "${len}\r\n");
    fill(out);
    out.put_slice(b"\r\n");
}

/// Simple strings and errors are one line: a CR or LF inside would end the line early and
/// desynchronise the peer, so they are replaced by spaces.
fn encode_line(ty: u8, text: &str, out: &mut BytesMut) {
    out.reserve(text.len() + 3);
    out.put_u8(ty);
    for &b in text.as_bytes() {
        out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(frame: &Frame) -> BytesMut {
        let mut out = BytesMut::new();
        encode(frame, &mut out);
        out
    }

    fn parse_all(input: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        parse(&mut BytesMut::from(input))
    }

    #[test]
    fn a_blocking_read_that_a_signal_interrupts_goes_on() {
        // Hands out its bytes a few at a time, each time after an interrupted read.
        struct Interrupting(Vec<u8>, bool);
        impl std::io::Read for Interrupting {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                self.1 = !self.1;
                if self.1 {
                    return Err(std::io::ErrorKind::Interrupted.into());
                }
                let n = self.0.len().min(out.len()).min(3);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0.drain(..n);
                Ok(n)
            }
        }
        let mut reader = Interrupting(bytes_of(&sample()).to_vec(), false);
        assert_eq!(read_frame(&mut reader, &mut BytesMut::new()).unwrap(), sample());
    }

    fn sample() -> Frame {
        Frame::Array(vec![
            Frame::Simple("OK".into()),
            Frame::Error("ERR nope".into()),
            Frame::Integer(-42),
            Frame::Integer(i64::MAX),
            Frame::Bulk(Bytes::from_static(b"bin\r\n\0\xff")),
            Frame::Bulk(Bytes::new()),
            Frame::Null,
            Frame::Array(vec![]),
            Frame::Array(vec![Frame::Array(vec![Frame::Integer(1)])]),
        ])
    }

    #[test]
    fn round_trips() {
        for frame in [
            sample(),
            Frame::Simple(String::new()),
            Frame::Integer(0),
            Frame::Integer(i64::MIN),
            Frame::Null,
            Frame::Bulk(Bytes::from(vec![7u8; 100_000])),
        ] {
            let mut buf = bytes_of(&frame);
            assert_eq!(parse(&mut buf), Ok(Some(frame)));
            assert!(buf.is_empty(), "the frame's bytes are consumed");
        }
    }

    #[test]
    fn encodes_exact_bytes() {
        let mut out = BytesMut::new();
        encode_command(&[b"PING"], &mut out);
        assert_eq!(&out[..], b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(&bytes_of(&Frame::Null)[..], b"$-1\r\n");
        assert_eq!(&bytes_of(&Frame::Integer(-3))[..], b":-3\r\n");
        // A line break inside a simple string must not break the framing.
        assert_eq!(&bytes_of(&Frame::Error("a\r\nb".into()))[..], b"-a  b\r\n");
        assert_eq!(parse_all(b"*-1\r\n"), Ok(Some(Frame::Null)));
    }

    #[test]
    fn partial_input_waits_then_completes() {
        let frame = sample();
        let full = bytes_of(&frame);
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(parse(&mut buf), Ok(None), "prefix of {cut} bytes");
            assert_eq!(buf.len(), cut, "an incomplete frame is left in place");
            buf.extend_from_slice(&full[cut..]);
            assert_eq!(parse(&mut buf), Ok(Some(frame.clone())));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn back_to_back_frames_are_read_one_at_a_time() {
        let mut buf = bytes_of(&Frame::Integer(1));
        buf.extend_from_slice(&bytes_of(&Frame::Simple("two".into())));
        buf.extend_from_slice(b"$5\r\nthr");
        assert_eq!(parse(&mut buf), Ok(Some(Frame::Integer(1))));
        assert_eq!(parse(&mut buf), Ok(Some(Frame::Simple("two".into()))));
        assert_eq!(parse(&mut buf), Ok(None));
        buf.extend_from_slice(b"ee\r\n");
        assert_eq!(parse(&mut buf), Ok(Some(Frame::Bulk(Bytes::from_static(b"three")))));
    }

    #[test]
    fn garbage_is_rejected() {
        use ProtocolError::*;
        let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            (b"hello world\r\n".to_vec(), UnknownType(b'h')),
            (vec![0xff; 64], UnknownType(0xff)),
            (b"$abc\r\n".to_vec(), BadLength("abc".into())),
            (b"$\r\n".to_vec(), BadLength(String::new())),
            (b"*1x\r\n".to_vec(), BadLength("1x".into())),
            (b"$-2\r\n".to_vec(), NegativeLength(-2)),
            (b"*3\r\n$4\r\nMSGS\r\n$3\r\nabc\r\n$-9\r\n".to_vec(), NegativeLength(-9)),
            (format!("${}\r\n", MAX_BULK + 1).into_bytes(), BulkTooLong(MAX_BULK as u64 + 1)),
            (format!("*{}\r\n", MAX_ARRAY + 1).into_bytes(), ArrayTooLong(MAX_ARRAY as u64 + 1)),
            (b"*1\r\n".repeat(MAX_DEPTH + 1), TooDeep),
            (b":12a\r\n".to_vec(), BadInteger("12a".into())),
            (b"+OK\rX\r\n".to_vec(), MissingCrlf),
            (b"+OK\n".to_vec(), MissingCrlf),
            (b"$3\r\nabcXY".to_vec(), MissingCrlf),
            ([&b"+"[..], &vec![b'a'; MAX_LINE + 1]].concat(), LineTooLong),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_all(&input), Err(expected), "input {:?}", String::from_utf8_lossy(&input));
        }
        // Exactly the limits are fine.
        let mut deep = b"*1\r\n".repeat(MAX_DEPTH);
        deep.extend_from_slice(b":1\r\n");
        assert!(matches!(parse_all(&deep), Ok(Some(Frame::Array(_)))));
        assert_eq!(parse_all(format!("${MAX_BULK}\r\n").as_bytes()), Ok(None));
        assert_eq!(parse_all(format!("*{MAX_ARRAY}\r\n").as_bytes()), Ok(None));
    }

    /// Tiny deterministic PRNG: fuzzing without extra crates.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Parses `input` frame by frame until it is exhausted, incomplete or invalid; every frame
    /// read must consume bytes.
    fn drain(input: &[u8]) {
        let mut buf = BytesMut::from(input);
        while let Ok(Some(_)) = parse(&mut buf) {
            assert!(buf.len() < input.len());
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        // Biased towards RESP's own bytes so the parser gets past the first byte often.
        let alphabet = b"+-:$*\r\n0123456789-1";
        for _ in 0..5000 {
            let len = (rng.next() % 64) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    let r = rng.next();
                    if r & 1 == 0 {
                        alphabet[(r >> 8) as usize % alphabet.len()]
                    } else {
                        (r >> 8) as u8
                    }
                })
                .collect();
            drain(&input);
        }
    }

    #[test]
    fn mutated_frames_never_panic() {
        let mut rng = XorShift(42);
        let valid = bytes_of(&sample());
        for _ in 0..5000 {
            let mut input = valid.to_vec();
            for _ in 0..1 + rng.next() % 4 {
                let at = (rng.next() as usize) % input.len();
                input[at] = rng.next() as u8;
            }
            let keep = (rng.next() as usize) % (input.len() + 1);
            input.truncate(keep);
            drain(&input);
        }
    }
}
