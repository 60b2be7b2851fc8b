//! [`FaultProxy`]: a loopback TCP proxy that forwards to one upstream address and can break the
//! connections going through it on demand (FIN, RST, stall, latency, 1-byte slicing, refusal).
//!
//! Every accepted connection is served by one task that runs the two pump directions
//! concurrently, raced against a `watch` channel of control state, so `drop_all`, `reset_all` and
//! `unstall` reach existing connections at once. Must be started inside a tokio runtime.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Size of the forwarding buffer of each direction.
const CHUNK: usize = 16 * 1024;
/// How long to wait for the upstream to accept a proxied connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a graceful close waits for the peers to close their side after our FIN.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Control state broadcast to every connection task. Generations (not flags) so that a quick
/// `stall(); unstall();` or two `drop_all()` in a row are never missed by a task.
#[derive(Debug, Clone, Copy, Default)]
struct Ctl {
    drop_gen: u64,
    reset_gen: u64,
    /// Bumped by every `stall()`.
    stall_gen: u64,
    stalled: bool,
    shutdown: bool,
}

#[derive(Debug)]
struct Shared {
    upstream: String,
    ctl: watch::Sender<Ctl>,
    latency_us: AtomicU64,
    slicing: AtomicBool,
    refuse: AtomicBool,
    live: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
}

/// A loopback TCP proxy with fault injection. Dropping it stops the listener and closes every
/// proxied connection.
#[derive(Debug)]
pub struct FaultProxy {
    shared: Arc<Shared>,
    port: u16,
    listener: JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on 127.0.0.1:0, forward every accepted connection to `upstream` (e.g.
    /// "127.0.0.1:5672"). Upstream is connected per accepted connection, so it may be down now.
    pub async fn start(upstream: &str) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            ctl: watch::channel(Ctl::default()).0,
            latency_us: AtomicU64::new(0),
            slicing: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let listener = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy {
            shared,
            port,
            listener,
        })
    }

    /// The local port the proxy listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `template` with its `{}` replaced by `127.0.0.1:PORT`, e.g.
    /// `url("amqp://guest:guest@{}/%2f")`.
    pub fn url(&self, template: &str) -> String {
        template.replace("{}", &format!("127.0.0.1:{}", self.port))
    }

    /// Close every live proxied connection on both sides with a graceful FIN. New connections
    /// are accepted normally.
    pub fn drop_all(&self) {
        self.shared.ctl.send_modify(|c| c.drop_gen += 1);
    }

    /// Close every live proxied connection on both sides with a TCP RST (`SO_LINGER` 0).
    pub fn reset_all(&self) {
        self.shared.ctl.send_modify(|c| c.reset_gen += 1);
    }

    /// From now on forward nothing, in either direction, on any connection (existing and new;
    /// new ones are accepted but not connected upstream) until [`unstall`](Self::unstall).
    pub fn stall(&self) {
        self.shared.ctl.send_modify(|c| {
            c.stall_gen += 1;
            c.stalled = true;
        });
    }

    /// End a [`stall`](Self::stall): every connection that lived during it is closed (FIN), as
    /// its protocol state is broken; new connections work.
    pub fn unstall(&self) {
        self.shared.ctl.send_modify(|c| c.stalled = false);
    }

    /// Delay every forwarded chunk (both directions) by `d`; zero turns it off. Chunks of one
    /// direction are delayed one after another, so a busy stream also loses throughput.
    pub fn set_latency(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.shared.latency_us.store(us, Ordering::Relaxed);
    }

    /// Forward in 1-byte writes (each flushed, `TCP_NODELAY`, then a task yield) while on.
    pub fn set_slicing(&self, on: bool) {
        self.shared.slicing.store(on, Ordering::Relaxed);
    }

    /// While on, accept new connections and close them at once (FIN) without forwarding. Applies
    /// to every `accept()` from now on, which may include a client whose `connect()` already
    /// returned (the kernel completes the handshake before the proxy accepts).
    pub fn set_refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::Relaxed);
    }

    /// Proxied connections open now (refused ones never count; stalled ones do).
    pub fn live_connections(&self) -> usize {
        self.shared.live.load(Ordering::Relaxed)
    }

    /// Connections accepted since start, refused ones included.
    pub fn total_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections closed at once because [`set_refuse`](Self::set_refuse) was on.
    pub fn total_refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Wait until `live_connections() == n`; `false` on timeout.
    pub async fn wait_live(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.live_connections() != n {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.listener.abort();
        self.shared.ctl.send_modify(|c| c.shutdown = true);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            // E.g. EMFILE or a connection aborted before accept: keep listening.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        if shared.refuse.load(Ordering::Relaxed) {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            drop(sock);
            continue;
        }
        shared.live.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(sock, shared.clone()));
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Both directions saw EOF, or one failed: just drop the sockets.
    Done,
    /// `drop_all`/`unstall`: FIN both sides.
    Fin,
    /// `reset_all`: RST both sides.
    Rst,
    /// The proxy is gone.
    Shutdown,
}

/// Decrements the live count when the connection task ends (or is dropped with the runtime).
#[derive(Debug)]
struct Live(Arc<Shared>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(mut client: TcpStream, shared: Arc<Shared>) {
    let live = Live(shared.clone());
    let mut ctl = shared.ctl.subscribe();
    let start = *ctl.borrow_and_update();
    let _ = client.set_nodelay(true);
    let mut upstream = None;
    if !start.stalled && !start.shutdown {
        let connect = TcpStream::connect(shared.upstream.as_str());
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(up)) => {
                let _ = up.set_nodelay(true);
                upstream = Some(up);
            }
            _ => return,
        }
    }
    let end = match upstream.as_mut() {
        None => control(&mut ctl, start).await,
        Some(up) => {
            let (cr, cw) = client.split();
            let (ur, uw) = up.split();
            let pumps = async {
                tokio::try_join!(
                    pump(cr, uw, &shared, shared.ctl.subscribe()),
                    pump(ur, cw, &shared, shared.ctl.subscribe()),
                )
            };
            tokio::select! {
                biased;
                end = control(&mut ctl, start) => end,
                _ = pumps => End::Done,
            }
        }
    };
    drop(live);
    match end {
        End::Rst => {
            let _ = client.set_zero_linger();
            if let Some(up) = &upstream {
                let _ = up.set_zero_linger();
            }
        }
        End::Fin => {
            let up = async {
                if let Some(up) = upstream.as_mut() {
                    close_gracefully(up).await;
                }
            };
            tokio::join!(close_gracefully(&mut client), up);
        }
        End::Done | End::Shutdown => {}
    }
}

/// Resolves when this connection must end, per the control state.
async fn control(ctl: &mut watch::Receiver<Ctl>, start: Ctl) -> End {
    loop {
        let c = *ctl.borrow_and_update();
        if c.shutdown {
            return End::Shutdown;
        }
        if c.reset_gen != start.reset_gen {
            return End::Rst;
        }
        if c.drop_gen != start.drop_gen {
            return End::Fin;
        }
        if !c.stalled && (start.stalled || c.stall_gen != start.stall_gen) {
            return End::Fin;
        }
        if ctl.changed().await.is_err() {
            return End::Shutdown;
        }
    }
}

/// Waits while the proxy is stalled. (On `unstall` the connection's `control` ends it first.)
async fn gate(ctl: &mut watch::Receiver<Ctl>) {
    while ctl.borrow_and_update().stalled {
        if ctl.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// One direction: read a chunk, honour stall/latency/slicing, write it; EOF is passed on as a
/// write shutdown (half-close).
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    shared: &Shared,
    mut ctl: watch::Receiver<Ctl>,
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = from.read(&mut buf).await?;
        gate(&mut ctl).await;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        let latency = Duration::from_micros(shared.latency_us.load(Ordering::Relaxed));
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
            gate(&mut ctl).await;
        }
        if shared.slicing.load(Ordering::Relaxed) {
            for byte in buf[..n].chunks(1) {
                to.write_all(byte).await?;
                to.flush().await?;
                tokio::task::yield_now().await;
                gate(&mut ctl).await;
            }
        } else {
            to.write_all(&buf[..n]).await?;
        }
    }
}

/// FIN our side, then read and discard until the peer closes too (bounded), so that unread
/// bytes in our receive buffer don't turn the close into a RST.
async fn close_gracefully(sock: &mut TcpStream) {
    let _ = sock.shutdown().await;
    let mut buf = vec![0u8; CHUNK];
    let drain = async {
        while let Ok(n) = sock.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
}
