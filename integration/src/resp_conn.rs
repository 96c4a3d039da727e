//! A bare RESP2 connection that hands back each reply as a frame, errors and nested errors
//! included, for tests that compare replies exactly (the `redis` crate turns an error reply into
//! an `Err`, and one error inside an array into an error for the whole array).

use bytes::BytesMut;
use raftis::resp::{self, Frame};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct RespConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl RespConn {
    pub fn connect(port: u16) -> anyhow::Result<RespConn> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        stream.set_nodelay(true)?;
        Ok(RespConn { stream, buf: BytesMut::new() })
    }

    /// Sends the commands in one write, then reads one reply per command.
    pub fn pipeline(&mut self, commands: &[Vec<Vec<u8>>]) -> anyhow::Result<Vec<Frame>> {
        let mut out = BytesMut::new();
        for args in commands {
            let parts: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            resp::encode_command(&parts, &mut out);
        }
        self.stream.write_all(&out)?;
        commands.iter().map(|_| self.reply()).collect()
    }

    pub fn call(&mut self, args: &[&[u8]]) -> anyhow::Result<Frame> {
        let args: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
        Ok(self.pipeline(&[args])?.remove(0))
    }

    fn reply(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some(frame) = resp::parse(&mut self.buf)? {
                return Ok(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk)?;
            anyhow::ensure!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
