//! The `sink` scenario's fake AMQP server, and the tiny hand-written frame encoder and
//! splitter it (and [`crate::decode`]) use.
//!
//! The server runs in a separate process (the bench re-executes itself with the hidden
//! [`SUBCOMMAND`]) so its CPU time does not count against the client being measured. It
//! prints its port on stdout, completes the AMQP 0-9-1 handshake, answers the few
//! synchronous methods a publisher needs, counts `basic.publish` method frames, and on
//! `connection.close` prints `closed <publishes>` and only then sends `close-ok`, so a
//! client that has its close-ok has had everything it sent before the close processed.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::BenchResult;

/// Hidden subcommand that runs [`serve_forever`].
pub const SUBCOMMAND: &str = "__sink-server";

/// Hand-written AMQP 0-9-1 frame encoding: just enough for the fake server and the
/// recorded `decode` stream.
pub mod wire {
    pub const FRAME_METHOD: u8 = 1;
    pub const FRAME_HEADER: u8 = 2;
    pub const FRAME_BODY: u8 = 3;
    pub const FRAME_END: u8 = 0xCE;
    pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

    /// A field-table value (only the kinds the fake server sends).
    #[derive(Debug, Clone)]
    pub enum Value<'a> {
        Bool(bool),
        LongStr(&'a str),
        Table(&'a [(&'a str, Value<'a>)]),
    }

    pub fn shortstr(out: &mut Vec<u8>, s: &str) {
        let bytes = &s.as_bytes()[..s.len().min(255)];
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }

    pub fn longstr(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s);
    }

    pub fn table(out: &mut Vec<u8>, entries: &[(&str, Value<'_>)]) {
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        for (name, value) in entries {
            shortstr(out, name);
            match value {
                Value::Bool(b) => out.extend_from_slice(&[b't', u8::from(*b)]),
                Value::LongStr(s) => {
                    out.push(b'S');
                    longstr(out, s.as_bytes());
                }
                Value::Table(inner) => {
                    out.push(b'F');
                    table(out, inner);
                }
            }
        }
        patch_u32(out, len_at);
    }

    /// Appends one frame whose payload is written by `payload`.
    pub fn frame(
        out: &mut Vec<u8>,
        frame_type: u8,
        channel: u16,
        payload: impl FnOnce(&mut Vec<u8>),
    ) {
        out.push(frame_type);
        out.extend_from_slice(&channel.to_be_bytes());
        let size_at = out.len();
        out.extend_from_slice(&[0; 4]);
        payload(out);
        patch_u32(out, size_at);
        out.push(FRAME_END);
    }

    /// Method frame: class u16, method u16, then `args` (already encoded).
    pub fn method(out: &mut Vec<u8>, channel: u16, class: u16, method: u16, args: &[u8]) {
        frame(out, FRAME_METHOD, channel, |p| {
            p.extend_from_slice(&class.to_be_bytes());
            p.extend_from_slice(&method.to_be_bytes());
            p.extend_from_slice(args);
        });
    }

    /// Content header frame with no properties (property flags 0).
    pub fn content_header(out: &mut Vec<u8>, channel: u16, class: u16, body_size: u64) {
        frame(out, FRAME_HEADER, channel, |p| {
            p.extend_from_slice(&class.to_be_bytes());
            p.extend_from_slice(&0u16.to_be_bytes()); // weight
            p.extend_from_slice(&body_size.to_be_bytes());
            p.extend_from_slice(&0u16.to_be_bytes()); // property flags
        });
    }

    pub fn body(out: &mut Vec<u8>, channel: u16, body: &[u8]) {
        frame(out, FRAME_BODY, channel, |p| p.extend_from_slice(body));
    }

    /// Overwrites the 4 bytes at `at` with the big-endian length of what follows them.
    fn patch_u32(out: &mut [u8], at: usize) {
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// One frame split off the front of a buffer.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct RawFrame<'a> {
        pub frame_type: u8,
        pub channel: u16,
        pub payload: &'a [u8],
    }

    impl RawFrame<'_> {
        /// `(class, method, args)` if this is a method frame.
        pub fn method(&self) -> Option<(u16, u16, &[u8])> {
            if self.frame_type != FRAME_METHOD || self.payload.len() < 4 {
                return None;
            }
            let class = u16::from_be_bytes([self.payload[0], self.payload[1]]);
            let method = u16::from_be_bytes([self.payload[2], self.payload[3]]);
            Some((class, method, &self.payload[4..]))
        }
    }

    /// Splits the first frame off `buf`: `Ok(None)` if it is not complete yet, otherwise the
    /// frame and the number of bytes it took.
    pub fn split_frame(buf: &[u8]) -> Result<Option<(RawFrame<'_>, usize)>, String> {
        if buf.len() < 7 {
            return Ok(None);
        }
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
        let total = 7 + size + 1;
        if buf.len() < total {
            return Ok(None);
        }
        if buf[total - 1] != FRAME_END {
            return Err(format!("bad frame end byte {:#04x}", buf[total - 1]));
        }
        let frame = RawFrame {
            frame_type: buf[0],
            channel: u16::from_be_bytes([buf[1], buf[2]]),
            payload: &buf[7..7 + size],
        };
        Ok(Some((frame, total)))
    }
}

/// Reads the shortstr at the start of `args` (lossily: the fake server only echoes it).
fn read_shortstr(args: &[u8]) -> Option<(String, &[u8])> {
    let (&len, rest) = args.split_first()?;
    let len = usize::from(len);
    let s = rest.get(..len)?;
    Some((String::from_utf8_lossy(s).into_owned(), &rest[len..]))
}

fn connection_start(out: &mut Vec<u8>) {
    use wire::Value::{Bool, LongStr, Table};
    let capabilities = [
        ("publisher_confirms", Bool(true)),
        ("consumer_cancel_notify", Bool(true)),
        ("basic.nack", Bool(true)),
        ("exchange_exchange_bindings", Bool(true)),
        ("connection.blocked", Bool(true)),
        ("authentication_failure_close", Bool(true)),
        ("per_consumer_qos", Bool(true)),
    ];
    let properties = [
        ("capabilities", Table(&capabilities)),
        ("product", LongStr("kelp-bench sink")),
        ("version", LongStr("0.0.0")),
        ("platform", LongStr("tokio")),
    ];
    let mut args = vec![0, 9]; // version-major, version-minor
    wire::table(&mut args, &properties);
    wire::longstr(&mut args, b"PLAIN AMQPLAIN");
    wire::longstr(&mut args, b"en_US");
    wire::method(out, 0, 10, 10, &args);
}

/// What the connection should do after a method frame.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Continue,
    Close,
}

/// State of one client connection: counts publishes and queues replies into `out`.
#[derive(Debug, Default)]
struct SinkConn {
    publishes: u64,
}

impl SinkConn {
    fn on_method(
        &mut self,
        channel: u16,
        class: u16,
        method: u16,
        args: &[u8],
        out: &mut Vec<u8>,
    ) -> Next {
        match (class, method) {
            (60, 40) => self.publishes += 1, // basic.publish: the hot path
            // connection.start-ok -> connection.tune
            (10, 11) => {
                let mut tune = Vec::with_capacity(8);
                tune.extend_from_slice(&2047u16.to_be_bytes());
                tune.extend_from_slice(&131_072u32.to_be_bytes());
                tune.extend_from_slice(&0u16.to_be_bytes());
                wire::method(out, 0, 10, 30, &tune);
            }
            (10, 31) => {}                                  // connection.tune-ok
            (10, 40) => wire::method(out, 0, 10, 41, &[0]), // connection.open -> open-ok (known-hosts "")
            (10, 50) => return Next::Close, // connection.close: caller reports, then close-ok
            (10, 51) => return Next::Close, // connection.close-ok (we never close first)
            (20, 10) => wire::method(out, channel, 20, 11, &[0, 0, 0, 0]), // channel.open -> open-ok
            (20, 40) => wire::method(out, channel, 20, 41, &[]), // channel.close -> close-ok
            (60, 10) => wire::method(out, channel, 60, 11, &[]), // basic.qos -> qos-ok
            // confirm.select (unless no-wait) -> select-ok; the sink never acks publishes
            (85, 10) if args.first().is_none_or(|bits| bits & 1 == 0) => {
                wire::method(out, channel, 85, 11, &[])
            }
            // queue.declare: ticket, name, bits (no-wait is bit 4) -> declare-ok(name, 0, 0)
            (50, 10) => {
                if let Some((name, rest)) = args.get(2..).and_then(read_shortstr) {
                    if rest.first().is_none_or(|bits| bits & 0x10 == 0) {
                        let name = if name.is_empty() {
                            "amq.gen-sink".to_owned()
                        } else {
                            name
                        };
                        let mut ok = Vec::new();
                        wire::shortstr(&mut ok, &name);
                        ok.extend_from_slice(&[0; 8]);
                        wire::method(out, channel, 50, 11, &ok);
                    }
                }
            }
            // queue.delete: ticket, name, bits (no-wait is bit 2) -> delete-ok(0)
            (50, 40) => {
                if let Some((_, rest)) = args.get(2..).and_then(read_shortstr) {
                    if rest.first().is_none_or(|bits| bits & 0x04 == 0) {
                        wire::method(out, channel, 50, 41, &[0; 4]);
                    }
                }
            }
            _ => {} // anything else: read and discard
        }
        Next::Continue
    }
}

/// Serves one client connection; returns the number of publishes it received.
pub async fn serve_conn(mut sock: TcpStream) -> BenchResult<u64> {
    sock.set_nodelay(true)?;
    let mut header = [0u8; 8];
    sock.read_exact(&mut header).await?;
    if &header != wire::PROTOCOL_HEADER {
        sock.write_all(wire::PROTOCOL_HEADER).await?;
        return Err(format!("unsupported protocol header {header:?}").into());
    }
    let mut out = Vec::with_capacity(4096);
    connection_start(&mut out);
    sock.write_all(&out).await?;
    out.clear();

    let mut conn = SinkConn::default();
    let mut buf = BytesMut::with_capacity(256 * 1024);
    loop {
        if sock.read_buf(&mut buf).await? == 0 {
            return Err("client went away without connection.close".into());
        }
        let mut consumed = 0;
        let mut close = false;
        while let Some((frame, len)) = wire::split_frame(&buf[consumed..])? {
            consumed += len;
            if let Some((class, method, args)) = frame.method() {
                if conn.on_method(frame.channel, class, method, args, &mut out) == Next::Close {
                    close = true;
                    break;
                }
            }
        }
        buf.advance(consumed);
        if close {
            // Report first, so the count is on stdout by the time the client has close-ok.
            {
                let mut stdout = std::io::stdout().lock();
                writeln!(stdout, "closed {}", conn.publishes)?;
                stdout.flush()?;
            }
            wire::method(&mut out, 0, 10, 51, &[]);
            sock.write_all(&out).await?;
            sock.shutdown().await?;
            return Ok(conn.publishes);
        }
        if !out.is_empty() {
            sock.write_all(&out).await?;
            out.clear();
        }
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(256 * 1024);
        }
    }
}

/// The `__sink-server` subcommand: binds 127.0.0.1:0, prints the port, serves until killed.
pub fn serve_forever() -> BenchResult<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{port}")?;
            stdout.flush()?;
        }
        loop {
            let (sock, _) = listener.accept().await?;
            tokio::spawn(async move {
                if let Err(e) = serve_conn(sock).await {
                    eprintln!("sink server: {e}");
                }
            });
        }
    })
}

/// The sink server child process, killed when dropped.
#[derive(Debug)]
pub struct SinkProcess {
    child: Child,
    stdout: BufReader<ChildStdout>,
    port: u16,
}

impl SinkProcess {
    /// Starts `current_exe() __sink-server` and reads its port.
    pub fn spawn() -> BenchResult<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg(SUBCOMMAND)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("sink server has no stdout")?;
        let mut this = Self {
            child,
            stdout: BufReader::new(stdout),
            port: 0,
        };
        this.port = this.read_line()?.parse()?;
        Ok(this)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Waits for the `closed <n>` line of the connection that just closed and checks `n`.
    pub fn expect_closed(&mut self, expected: u64) -> BenchResult<()> {
        let line = self.read_line()?;
        let got: u64 = line
            .strip_prefix("closed ")
            .ok_or_else(|| format!("unexpected sink line {line:?}"))?
            .parse()?;
        if got != expected {
            return Err(format!("sink server counted {got} publishes, expected {expected}").into());
        }
        Ok(())
    }

    fn read_line(&mut self) -> BenchResult<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err("sink server exited".into());
        }
        Ok(line.trim_end().to_owned())
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        // Only our own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::wire::*;
    use super::*;

    #[test]
    fn frames_round_trip() -> BenchResult<()> {
        let mut buf = Vec::new();
        method(&mut buf, 3, 60, 40, &[0, 0, 0, 1, b'q', 0]);
        content_header(&mut buf, 3, 60, 100);
        body(&mut buf, 3, &[7; 100]);
        assert_eq!(buf.len(), (8 + 10) + (8 + 14) + (8 + 100));
        let (f, n) = split_frame(&buf)?.ok_or("incomplete")?;
        assert_eq!(f.method(), Some((60, 40, &[0u8, 0, 0, 1, b'q', 0][..])));
        assert_eq!(f.channel, 3);
        let (f, m) = split_frame(&buf[n..])?.ok_or("incomplete")?;
        assert_eq!((f.frame_type, f.payload.len()), (FRAME_HEADER, 14));
        let (f, _) = split_frame(&buf[n + m..])?.ok_or("incomplete")?;
        assert_eq!((f.frame_type, f.payload), (FRAME_BODY, &[7u8; 100][..]));
        assert_eq!(split_frame(&buf[..n - 1])?, None);
        let mut bad = buf[..n].to_vec();
        bad[n - 1] = 0;
        assert!(split_frame(&bad).is_err());
        Ok(())
    }

    #[test]
    fn table_encoding() {
        let mut out = Vec::new();
        table(
            &mut out,
            &[
                ("a", Value::Bool(true)),
                ("t", Value::Table(&[("b", Value::LongStr("xy"))])),
            ],
        );
        let expected: &[u8] = &[
            0, 0, 0, 20, // table size
            1, b'a', b't', 1, // a: true
            1, b't', b'F', 0, 0, 0, 9, // t: table of 9 bytes
            1, b'b', b'S', 0, 0, 0, 2, b'x', b'y',
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn handshake_replies_and_counting() {
        let mut conn = SinkConn::default();
        let mut out = Vec::new();
        assert_eq!(conn.on_method(0, 10, 11, &[], &mut out), Next::Continue);
        assert_eq!(
            out,
            [1, 0, 0, 0, 0, 0, 12, 0, 10, 0, 30, 7, 0xff, 0, 2, 0, 0, 0, 0, 0xCE]
        );
        out.clear();
        conn.on_method(1, 50, 10, &[0, 0, 1, b'q', 0], &mut out);
        assert_eq!(
            out,
            [1, 0, 1, 0, 0, 0, 14, 0, 50, 0, 11, 1, b'q', 0, 0, 0, 0, 0, 0, 0, 0, 0xCE]
        );
        out.clear();
        conn.on_method(1, 50, 10, &[0, 0, 1, b'q', 0x10], &mut out); // no-wait
        assert!(out.is_empty());
        for _ in 0..3 {
            conn.on_method(1, 60, 40, &[], &mut out);
        }
        assert_eq!(conn.publishes, 3);
        assert_eq!(conn.on_method(0, 10, 50, &[], &mut out), Next::Close);
    }
}
