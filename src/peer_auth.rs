//! The cluster's shared secret, `raft-password`.
//!
//! Without it the side port serves anyone who can reach it: a forwarded command runs on the
//! leader with no Redis user behind it, and a forged Raft message is as good as a real one. So
//! when a password is set, every side-port connection starts with `AUTH <password>` (answered
//! `+OK`), and anything else first gets `-NOAUTH` and the connection closed. The module asks the
//! same proof of a node before adding it to the cluster (`RAFT._AUTH` on the client port).
//!
//! The password crosses the network in clear, as Redis' own `AUTH` does; what it keeps out is
//! whoever can reach the ports without knowing it.

use crate::resp::{self, Frame};
use anyhow::{bail, Context as _};
use bytes::BytesMut;
use std::fmt;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;

/// How long a peer may take to answer `AUTH`.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// The reply to a command sent before `AUTH`, in Redis' words.
pub const NOAUTH: &str = "NOAUTH Authentication required.";
/// The reply to a wrong password (the connection is closed after it).
pub const WRONGPASS: &str = "WRONGPASS invalid raft-password";

/// A `raft-password`. Never printed: `Debug` shows only that there is one.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Arc<[u8]>);

impl Password {
    /// `None` for an empty value (no password), as for Redis' `requirepass ""`.
    pub fn new(value: &[u8]) -> Option<Password> {
        (!value.is_empty()).then(|| Password(value.into()))
    }

    /// Whether `given` is this password, in a time that does not depend on where they differ.
    pub fn matches(&self, given: &[u8]) -> bool {
        let same_len = given.len() == self.0.len();
        // Compare against ourselves when the lengths differ, so the work done is the same.
        let other = if same_len { given } else { &self.0[..] };
        let diff = self.0.iter().zip(other).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        same_len && diff == 0
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// `AUTH <password>`, as the side port expects it first.
    pub fn auth_command(&self, out: &mut BytesMut) {
        resp::encode_command(&[b"AUTH", &self.0], out);
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(..)")
    }
}

/// What the side port makes of a connection's frame before it is authenticated, or of an `AUTH`.
#[derive(Debug, PartialEq, Eq)]
pub enum Gate {
    /// Not an `AUTH`, and none is needed (any more): serve the frame.
    Pass,
    /// A good `AUTH`: answer `+OK`; the connection is served from now on.
    Accepted,
    /// Close the connection with this error line.
    Refuse(String),
}

/// Judges one frame arriving on a side-port connection. `authenticated` is the connection's
/// state; it becomes true on a good `AUTH`.
pub fn gate(password: Option<&Password>, authenticated: &mut bool, frame: &Frame) -> Gate {
    let args = match frame {
        Frame::Array(args) => &args[..],
        _ => &[],
    };
    let is_auth = matches!(args.first(), Some(Frame::Bulk(name)) if name.eq_ignore_ascii_case(b"AUTH"));
    if !is_auth {
        return if *authenticated { Gate::Pass } else { Gate::Refuse(NOAUTH.into()) };
    }
    let Some(password) = password else {
        return Gate::Refuse("ERR AUTH: this node has no raft-password; give every node of the cluster the same one".into());
    };
    let [_, Frame::Bulk(given)] = args else {
        return Gate::Refuse("ERR usage: AUTH <raft-password>".into());
    };
    if password.matches(given) {
        *authenticated = true;
        Gate::Accepted
    } else {
        Gate::Refuse(WRONGPASS.into())
    }
}

/// Authenticates a fresh connection to a peer's side port.
pub async fn authenticate(stream: &mut tokio::net::TcpStream, password: &Password) -> anyhow::Result<()> {
    let mut out = BytesMut::new();
    password.auth_command(&mut out);
    let exchange = async {
        stream.write_all(&out).await?;
        resp::read_frame_async(stream, &mut BytesMut::new()).await
    };
    let reply = tokio::time::timeout(AUTH_TIMEOUT, exchange).await.map_err(|_| anyhow::anyhow!("AUTH was not answered"))?;
    judge_reply(reply.context("AUTH")?)
}

/// [`authenticate`] for a blocking socket.
pub fn authenticate_blocking(stream: &mut std::net::TcpStream, password: &Password) -> anyhow::Result<()> {
    let mut out = BytesMut::new();
    password.auth_command(&mut out);
    stream.write_all(&out).context("AUTH")?;
    judge_reply(resp::read_frame(stream, &mut BytesMut::new()).context("AUTH")?)
}

fn judge_reply(reply: Frame) -> anyhow::Result<()> {
    match reply {
        Frame::Simple(ok) if ok == "OK" => Ok(()),
        Frame::Error(e) => bail!("the peer refused our raft-password: {e}"),
        other => bail!("the peer answered AUTH with {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn command(parts: &[&str]) -> Frame {
        Frame::Array(parts.iter().map(|p| Frame::Bulk(Bytes::copy_from_slice(p.as_bytes()))).collect())
    }

    #[test]
    fn passwords_match_only_themselves_and_never_print() {
        let pw = Password::new(b"s3cret").unwrap();
        assert!(pw.matches(b"s3cret"));
        for other in [&b"s3cre"[..], b"s3cret!", b"S3cret", b""] {
            assert!(!pw.matches(other), "{other:?}");
        }
        assert_eq!(Password::new(b""), None);
        assert!(!format!("{pw:?}").contains("s3cret"));
    }

    #[test]
    fn a_connection_is_served_only_after_a_good_auth() {
        let pw = Password::new(b"s3cret").unwrap();
        let mut authenticated = false;
        assert_eq!(gate(Some(&pw), &mut authenticated, &command(&["PING"])), Gate::Refuse(NOAUTH.into()));
        assert_eq!(gate(Some(&pw), &mut authenticated, &command(&["AUTH", "wrong"])), Gate::Refuse(WRONGPASS.into()));
        assert!(!authenticated);
        assert!(matches!(gate(Some(&pw), &mut authenticated, &command(&["AUTH", "a", "b"])), Gate::Refuse(_)));
        assert_eq!(gate(Some(&pw), &mut authenticated, &command(&["auth", "s3cret"])), Gate::Accepted);
        assert!(authenticated);
        assert_eq!(gate(Some(&pw), &mut authenticated, &command(&["PING"])), Gate::Pass);
        // A second AUTH is judged again, as in Redis.
        assert_eq!(gate(Some(&pw), &mut authenticated, &command(&["AUTH", "wrong"])), Gate::Refuse(WRONGPASS.into()));
    }

    #[test]
    fn a_node_without_a_password_refuses_auth_rather_than_pretend() {
        let mut authenticated = true;
        assert_eq!(gate(None, &mut authenticated, &command(&["PING"])), Gate::Pass);
        assert!(matches!(gate(None, &mut authenticated, &command(&["AUTH", "x"])), Gate::Refuse(e) if e.contains("no raft-password")));
    }
}
