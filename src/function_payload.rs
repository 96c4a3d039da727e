//! `FUNCTION RESTORE`'s payload (`FUNCTION DUMP`'s), checked before it enters the log.
//!
//! Redis decodes the payload as the command runs, with its RDB reader. A few malformed strings
//! make that reader report a corrupt RDB file (`rdbReportError`): an unknown length or string
//! encoding, or an LZF-compressed string that does not decompress to its stated length. Inside a
//! client's command Redis only answers an error, but every node applies the log outside any
//! client's command, and there Redis exits. A `RESTORE` payload is tried in the client's command
//! instead (see the module's `restore_trial`), but `FUNCTION RESTORE` cannot be tried without
//! changing the libraries, so its payload is read here as Redis 7.0 reads it (`rdb.c`:
//! `rdbLoadLenByRef`, `rdbGenericLoadStringObject`, `rdbLoadLzfStringObject`, `rdbFunctionLoad`),
//! and one Redis would take for a corrupt file is refused. Everything else, including payloads
//! Redis refuses with an error of its own, is left to Redis.

/// RDB opcodes of a function library: the format of 7.0's release candidates (name, engine,
/// optional description, code) and the current one (the code alone).
const OPCODE_FUNCTION: u8 = 246;
const OPCODE_FUNCTION2: u8 = 245;
/// The newest RDB version Redis 7.0 reads.
const RDB_VERSION: u16 = 10;
/// A payload ends with its RDB version (2 bytes) and CRC-64 (8 bytes).
const FOOTER: usize = 10;

/// Checks a `FUNCTION RESTORE` payload: an error naming what Redis would take for a corrupt RDB
/// file, or Ok for a payload Redis reads, or refuses by itself, safely.
pub fn check(payload: &[u8]) -> Result<(), String> {
    if !passes_redis_verification(payload) {
        // Redis refuses it before reading anything.
        return Ok(());
    }
    let mut reader = Reader { data: payload, pos: 0 };
    while payload.len() - reader.pos > FOOTER {
        let Some(opcode) = reader.byte() else { return Ok(()) };
        let strings_read = match opcode {
            OPCODE_FUNCTION2 => reader.string().map(|_| ()),
            OPCODE_FUNCTION => reader.old_library(),
            // Redis answers "given type is not a function".
            _ => return Ok(()),
        };
        match strings_read {
            Ok(()) => {}
            Err(Stop::Harmless) => return Ok(()),
            Err(Stop::Corrupt(what)) => {
                return Err(format!(
                    "ERR the FUNCTION RESTORE payload is malformed ({what}): Redis would take it for a corrupt RDB file and stop"
                ))
            }
        }
    }
    Ok(())
}

/// Redis' `verifyDumpPayload`: long enough, a version it reads, and the right checksum.
fn passes_redis_verification(payload: &[u8]) -> bool {
    let Some(split) = payload.len().checked_sub(FOOTER) else { return false };
    let footer = &payload[split..];
    let version = u16::from_le_bytes([footer[0], footer[1]]);
    version <= RDB_VERSION && crc64(&payload[..payload.len() - 8]).to_le_bytes() == footer[2..]
}

/// Why reading stopped.
enum Stop {
    /// Where Redis stops with an error of its own (a short read, say).
    Harmless,
    /// Where Redis reports a corrupt RDB file.
    Corrupt(&'static str),
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

/// What a length field holds.
enum Length {
    Plain(u64),
    /// A special string encoding (the low six bits of the first byte).
    Encoded(u8),
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn bytes(&mut self, n: u64) -> Result<&[u8], Stop> {
        let end =
            usize::try_from(n).ok().and_then(|n| self.pos.checked_add(n)).filter(|end| *end <= self.data.len()).ok_or(Stop::Harmless)?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    /// `rdbLoadLenByRef`.
    fn length(&mut self) -> Result<Length, Stop> {
        let first = self.byte().ok_or(Stop::Harmless)?;
        Ok(match first >> 6 {
            0 => Length::Plain(u64::from(first & 0x3f)),
            1 => Length::Plain((u64::from(first & 0x3f) << 8) | u64::from(self.byte().ok_or(Stop::Harmless)?)),
            3 => Length::Encoded(first & 0x3f),
            _ if first == 0x80 => Length::Plain(u64::from(u32::from_be_bytes(self.bytes(4)?.try_into().expect("4 bytes")))),
            _ if first == 0x81 => Length::Plain(u64::from_be_bytes(self.bytes(8)?.try_into().expect("8 bytes"))),
            _ => return Err(Stop::Corrupt("an unknown length encoding")),
        })
    }

    /// A length that is not a string encoding (`rdbLoadLen` without `isencoded`): an encoded
    /// one is read as its six bits.
    fn plain_length(&mut self) -> Result<u64, Stop> {
        Ok(match self.length()? {
            Length::Plain(n) => n,
            Length::Encoded(bits) => u64::from(bits),
        })
    }

    /// `rdbGenericLoadStringObject`.
    fn string(&mut self) -> Result<(), Stop> {
        match self.length()? {
            Length::Plain(n) => self.bytes(n).map(|_| ()),
            Length::Encoded(0) => self.bytes(1).map(|_| ()),
            Length::Encoded(1) => self.bytes(2).map(|_| ()),
            Length::Encoded(2) => self.bytes(4).map(|_| ()),
            Length::Encoded(3) => {
                let compressed = self.plain_length()?;
                let stated = self.plain_length()?;
                let input = self.bytes(compressed)?;
                match lzf_decompressed_len(input, stated) {
                    Some(n) if n == stated => Ok(()),
                    _ => Err(Stop::Corrupt("an LZF string that does not decompress to its length")),
                }
            }
            Length::Encoded(_) => Err(Stop::Corrupt("an unknown string encoding")),
        }
    }

    /// A library in the format of 7.0's release candidates (`rdbFunctionLoad`).
    fn old_library(&mut self) -> Result<(), Stop> {
        self.string()?; // name
        self.string()?; // engine
        if self.plain_length()? != 0 {
            self.string()?; // description
        }
        self.string() // code
    }
}

/// How many bytes LZF data `input` decompresses to with room for `room` (liblzf's
/// `lzf_decompress`, which Redis calls); None where it fails (0 to Redis).
fn lzf_decompressed_len(input: &[u8], room: u64) -> Option<u64> {
    let (mut ip, mut op) = (0usize, 0u64);
    loop {
        let ctrl = *input.get(ip)? as u64;
        ip += 1;
        if ctrl < 32 {
            // A literal run of ctrl + 1 bytes.
            let run = ctrl + 1;
            if op + run > room || ip as u64 + run > input.len() as u64 {
                return None;
            }
            ip += run as usize;
            op += run;
        } else {
            // A back reference: copy len + 2 bytes from earlier output.
            let mut len = ctrl >> 5;
            let mut back = ((ctrl & 0x1f) << 8) + 1;
            if ip >= input.len() {
                return None;
            }
            if len == 7 {
                len += input[ip] as u64;
                ip += 1;
                if ip >= input.len() {
                    return None;
                }
            }
            back += input[ip] as u64;
            ip += 1;
            if op + len + 2 > room || back > op {
                return None;
            }
            op += len + 2;
        }
        if ip >= input.len() {
            return Some(op);
        }
    }
}

/// Redis' CRC-64 (Jones polynomial, reflected), which ends a dump payload (`DUMP`'s and
/// `FUNCTION DUMP`'s).
pub fn crc64(data: &[u8]) -> u64 {
    const POLY: u64 = 0x95ac_9329_ac4b_c9b5;
    let mut crc = 0u64;
    for byte in data {
        crc ^= u64::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ POLY } else { crc >> 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload of `body` with Redis' footer (version 10 and the checksum).
    fn payload(body: &[u8]) -> Vec<u8> {
        let mut p = body.to_vec();
        p.extend_from_slice(&RDB_VERSION.to_le_bytes());
        let crc = crc64(&p);
        p.extend_from_slice(&crc.to_le_bytes());
        p
    }

    #[test]
    fn crc64_is_redis_own() {
        assert_eq!(crc64(b"123456789"), 0xe9c6_d914_c4b8_d9ca);
    }

    #[test]
    fn sound_payloads_pass() {
        let code = b"#!lua name=lib\nredis.register_function('f', function() return 1 end)";
        let mut body = vec![OPCODE_FUNCTION2, code.len() as u8];
        body.extend_from_slice(code);
        assert!(check(&payload(&body)).is_ok());
        // "aaaaaaaaaa" in LZF: a literal 'a', then a back reference of 9 bytes at distance 1.
        let lzf = [0x00, b'a', 0xe0, 0x00, 0x00];
        assert_eq!(lzf_decompressed_len(&lzf, 10), Some(10));
        let mut body = vec![OPCODE_FUNCTION2, 0xc3, lzf.len() as u8, 10];
        body.extend_from_slice(&lzf);
        assert!(check(&payload(&body)).is_ok());
        // Integer-encoded strings, and the old format with a description.
        let old = [OPCODE_FUNCTION, 0xc0, 7, 0x01, b'x', 0x01, 0xc1, 1, 2, 0x01, b'c'];
        assert!(check(&payload(&old)).is_ok());
    }

    #[test]
    fn what_redis_would_take_for_a_corrupt_file_is_refused() {
        // An LZF string that decompresses to 1 byte where it says 5.
        let short = payload(&[OPCODE_FUNCTION2, 0xc3, 2, 5, 0x00, b'a']);
        assert!(check(&short).unwrap_err().contains("LZF"));
        // A back reference before the start of the output.
        assert!(check(&payload(&[OPCODE_FUNCTION2, 0xc3, 2, 3, 0x20, 0x00])).is_err());
        // An unknown string encoding (4), and an unknown length encoding (0x82).
        assert!(check(&payload(&[OPCODE_FUNCTION2, 0xc4])).unwrap_err().contains("string encoding"));
        assert!(check(&payload(&[OPCODE_FUNCTION2, 0x82, 0, 0])).unwrap_err().contains("length encoding"));
        // In the old format's later strings too.
        assert!(check(&payload(&[OPCODE_FUNCTION, 0x01, b'n', 0xc4])).is_err());
    }

    #[test]
    fn what_redis_refuses_by_itself_is_left_to_it() {
        let short = payload(&[OPCODE_FUNCTION2, 0xc3, 2, 5, 0x00, b'a']);
        // A wrong checksum, a newer version, a payload too short: Redis reads none of them.
        let mut bad_crc = short.clone();
        *bad_crc.last_mut().unwrap() ^= 1;
        assert!(check(&bad_crc).is_ok());
        let mut newer = short.clone();
        let at = newer.len() - FOOTER;
        newer[at] = 11;
        assert!(check(&newer).is_ok());
        assert!(check(&short[..9]).is_ok());
        // Not a library, and a string cut short: Redis answers an error.
        assert!(check(&payload(&[7, 0xc4])).is_ok());
        assert!(check(&payload(&[OPCODE_FUNCTION2, 0x30, b'x'])).is_ok());
    }
}
