//! The follower proxy's wire format. With `follower-proxy yes`, a follower that receives a command
//! only the leader may serve sends it to the leader's side port as
//! `FORWARD <db> <2|3> <command> <arg>...` and relays what comes back to its client:
//! a bulk string holding the command's reply exactly as Redis produced it (RESP2 or RESP3, as the
//! client speaks), or an error line when the cluster could not run it (`MOVED`, `CLUSTERDOWN`,
//! `TIMEOUT`: the same errors a client talking to the leader would get).

use crate::resp::{self, Frame};
use bytes::BytesMut;
use std::sync::Arc;

/// A command forwarded by a follower on behalf of its client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardRequest {
    /// The client's selected database.
    pub db: u32,
    /// The client speaks RESP3, so the reply must be produced in RESP3.
    pub resp3: bool,
    pub argv: Vec<Vec<u8>>,
}

/// The raw reply, or an error line (without the leading `-`).
pub type ForwardReply = Result<Vec<u8>, String>;

/// Called once with the outcome of a forwarded command.
pub type ForwardDone = Box<dyn FnOnce(ForwardReply) + Send>;

/// What the leader does with a forwarded command (given to the transport by the module).
pub type ForwardHandler = Arc<dyn Fn(ForwardRequest, ForwardDone) + Send + Sync>;

impl ForwardRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        let db = self.db.to_string();
        let mut parts: Vec<&[u8]> = vec![b"FORWARD", db.as_bytes(), if self.resp3 { b"3" } else { b"2" }];
        parts.extend(self.argv.iter().map(|a| a.as_slice()));
        resp::encode_command(&parts, out);
    }

    /// Parses the arguments after `FORWARD`.
    pub fn decode(args: &[Frame]) -> Result<ForwardRequest, String> {
        let usage = || "usage: FORWARD <db> <2|3> <command> [arg ...]".to_string();
        if args.len() < 3 {
            return Err(usage());
        }
        let bulk = |f: &Frame| match f {
            Frame::Bulk(b) => Ok(b.to_vec()),
            _ => Err(usage()),
        };
        let db = std::str::from_utf8(&bulk(&args[0])?).ok().and_then(|s| s.parse().ok()).ok_or_else(usage)?;
        let resp3 = match bulk(&args[1])?.as_slice() {
            b"2" => false,
            b"3" => true,
            _ => return Err(usage()),
        };
        let argv = args[2..].iter().map(bulk).collect::<Result<Vec<_>, _>>()?;
        Ok(ForwardRequest { db, resp3, argv })
    }
}

/// The frame that carries a forwarded command's outcome back.
pub fn reply_frame(reply: ForwardReply) -> Frame {
    match reply {
        Ok(raw) => Frame::Bulk(raw.into()),
        Err(e) => Frame::Error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_survives_the_wire() {
        let req = ForwardRequest { db: 3, resp3: true, argv: vec![b"SET".to_vec(), b"k".to_vec(), b"v\r\n".to_vec()] };
        let mut out = BytesMut::new();
        req.encode(&mut out);
        let Some(Frame::Array(items)) = resp::parse(&mut out).unwrap() else { panic!("not an array") };
        assert_eq!(items[0], Frame::Bulk("FORWARD".into()));
        assert_eq!(ForwardRequest::decode(&items[1..]).unwrap(), req);
    }

    #[test]
    fn malformed_requests_are_refused() {
        let b = |s: &str| Frame::Bulk(s.to_string().into());
        assert!(ForwardRequest::decode(&[b("0"), b("2")]).is_err());
        assert!(ForwardRequest::decode(&[b("x"), b("2"), b("GET")]).is_err());
        assert!(ForwardRequest::decode(&[b("0"), b("4"), b("GET")]).is_err());
        assert!(ForwardRequest::decode(&[b("0"), b("2"), Frame::Integer(1)]).is_err());
    }
}
