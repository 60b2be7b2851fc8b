//! The robust transport: a [`Transport`] that outlives the connections under it. A supervisor
//! task waits for the current connection to close, reconnects with backoff (over every failover
//! URL), restores the recorded topology, then reopens every channel.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch, Notify};

use super::channel::ChannelInner;
use super::events::{RecoveryEvent, RecoveryEvents};
use super::is_connection_loss;
use super::policy::{FailoverStrategy, RecoveryOptions};
use super::topology::Topology;
use crate::connection::ConnectOptions;
use crate::error::{mask_url, Error};
use crate::transport::{self, BoxFuture, Transport, TransportChannel};

/// Split a failover URL list: `amqp://h1;amqp://h2` (Kombu's form). Consecutive
/// `sentinel://` URLs stay together as one URL: Kombu's `sentinel://h1:26379;sentinel://h2:26379`
/// is one connection that asks either sentinel for the master, not two brokers to fail over
/// between.
pub(crate) fn split_urls(url: &str) -> Vec<String> {
    let is_sentinel = |u: &str| {
        u.split_once("://")
            .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("sentinel"))
    };
    let mut out: Vec<String> = Vec::new();
    let mut last_was_sentinel = false;
    for u in url.split(';').map(str::trim).filter(|u| !u.is_empty()) {
        let sentinel = is_sentinel(u);
        match out.last_mut() {
            Some(prev) if sentinel && last_was_sentinel => {
                prev.push(';');
                prev.push_str(u);
            }
            _ => out.push(u.to_owned()),
        }
        last_was_sentinel = sentinel;
    }
    out
}

/// The first connect: each URL once, in order; then, unless `fail_fast`, again with the
/// reconnect policy's backoff (logging each failure) until it succeeds or the retries run out.
/// Returns the index of the URL that answered.
pub(crate) async fn connect_first(
    urls: &[String],
    options: &ConnectOptions,
    recovery: &RecoveryOptions,
) -> Result<(usize, Arc<dyn Transport>), Error> {
    let mut attempt = 0u32;
    loop {
        let mut last = None;
        for (i, url) in urls.iter().enumerate() {
            match transport::open(url, options).await {
                Ok(t) => return Ok((i, t)),
                Err(e) => {
                    tracing::warn!(url = %mask_url(url), error = %e, "connect failed");
                    last = Some(e);
                }
            }
        }
        let err = last.unwrap_or_else(|| Error::Url {
            url: String::new(),
            reason: "no URL given".into(),
        });
        // Bad URLs, refused logins and missing vhosts do not get better by waiting.
        let hopeless = matches!(
            err,
            Error::Url { .. }
                | Error::UnknownTransport { .. }
                | Error::Amqp(
                    kelp_amqp::Error::Url(_)
                        | kelp_amqp::Error::AuthenticationFailed { .. }
                        | kelp_amqp::Error::VhostAccess { .. }
                )
        );
        if recovery.fail_fast
            || hopeless
            || recovery.reconnect.max_retries.is_some_and(|m| attempt >= m)
        {
            return Err(err);
        }
        let wait = recovery.reconnect.jittered_delay(attempt);
        tracing::warn!(attempt = attempt + 1, ?wait, error = %err, "first connect failed; retrying");
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// Where the robust connection is: connected (to which transport, after how many recoveries),
/// recovering, or closed for good.
#[derive(Debug, Clone)]
pub(crate) enum Link {
    Up {
        generation: u64,
        transport: Arc<dyn Transport>,
    },
    Down,
    Closed(Error),
}

/// What a robust connection's channels share.
#[derive(Debug)]
pub(crate) struct Shared {
    urls: Vec<String>,
    options: ConnectOptions,
    pub(crate) recovery: RecoveryOptions,
    name: &'static str,
    link: watch::Sender<Link>,
    topology: Mutex<Topology>,
    has_renames: AtomicBool,
    channels: Mutex<Vec<Weak<ChannelInner>>>,
    events: broadcast::Sender<RecoveryEvent>,
    user_closed: AtomicBool,
    blocked: AtomicBool,
    unblocked: Notify,
    next_url: AtomicUsize,
}

impl Shared {
    pub(crate) fn emit(&self, event: RecoveryEvent) {
        let _ = self.events.send(event);
    }

    pub(crate) fn subscribe(&self) -> RecoveryEvents {
        RecoveryEvents {
            rx: Some(self.events.subscribe()),
        }
    }

    /// True while connected.
    pub(crate) fn is_up(&self) -> bool {
        matches!(&*self.link.borrow(), Link::Up { transport, .. } if !transport.is_closed())
    }

    pub(crate) fn is_closed_for_good(&self) -> bool {
        matches!(&*self.link.borrow(), Link::Closed(_))
    }

    fn down_error(&self, waited: Duration) -> Error {
        Error::ConnectionDown {
            waited,
            url: self.urls.first().map(|u| mask_url(u)).unwrap_or_default(),
        }
    }

    /// The current connection, waiting (until `deadline`) while recovering.
    pub(crate) async fn wait_up(
        &self,
        started: Instant,
    ) -> Result<(u64, Arc<dyn Transport>), Error> {
        if let Link::Up {
            generation,
            transport,
        } = &*self.link.borrow()
        {
            return Ok((*generation, transport.clone()));
        }
        self.wait_link(started, |l| !matches!(l, Link::Down)).await
    }

    /// Wait until the connection is a newer one than `generation` (or closed for good).
    pub(crate) async fn wait_newer(
        &self,
        generation: u64,
        started: Instant,
    ) -> Result<(u64, Arc<dyn Transport>), Error> {
        self.wait_link(started, |l| {
            !matches!(l, Link::Up { generation: g, .. } if *g <= generation)
                && !matches!(l, Link::Down)
        })
        .await
    }

    async fn wait_link(
        &self,
        started: Instant,
        ready: impl FnMut(&Link) -> bool,
    ) -> Result<(u64, Arc<dyn Transport>), Error> {
        let limit = self.recovery.outage_timeout;
        let left = limit.saturating_sub(started.elapsed());
        let mut rx = self.link.subscribe();
        let link = match tokio::time::timeout(left, rx.wait_for(ready)).await {
            Ok(Ok(l)) => l.clone(),
            Ok(Err(_)) => return Err(Error::Closed { what: "connection" }),
            Err(_) => return Err(self.down_error(started.elapsed())),
        };
        match link {
            Link::Up {
                generation,
                transport,
            } => Ok((generation, transport)),
            Link::Closed(e) => Err(e),
            Link::Down => Err(self.down_error(started.elapsed())),
        }
    }

    /// The name a queue has now (a server-named queue is renamed by a restore).
    pub(crate) fn resolve<'a>(&self, name: &'a str) -> Cow<'a, str> {
        if !self.has_renames.load(Ordering::Acquire) {
            return Cow::Borrowed(name);
        }
        match self.topology.lock() {
            Ok(t) if t.renames.contains_key(name) => Cow::Owned(t.resolve(name).to_owned()),
            _ => Cow::Borrowed(name),
        }
    }

    pub(crate) fn record(&self, f: impl FnOnce(&mut Topology)) {
        if let Ok(mut t) = self.topology.lock() {
            f(&mut t);
        }
    }

    pub(crate) fn register_channel(&self, ch: Weak<ChannelInner>) {
        if let Ok(mut list) = self.channels.lock() {
            list.retain(|w| w.strong_count() > 0);
            list.push(ch);
        }
    }

    fn live_channels(&self) -> Vec<Arc<ChannelInner>> {
        match self.channels.lock() {
            Ok(mut list) => {
                list.retain(|w| w.strong_count() > 0);
                list.iter().filter_map(Weak::upgrade).collect()
            }
            Err(_) => Vec::new(),
        }
    }

    /// While the broker blocks publishers, wait.
    pub(crate) async fn wait_unblocked(&self) {
        loop {
            let notified = self.unblocked.notified();
            if !self.blocked.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    #[inline]
    pub(crate) fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    fn set_blocked(&self, reason: Option<String>) {
        match reason {
            Some(reason) => {
                if !self.blocked.swap(true, Ordering::AcqRel) {
                    tracing::warn!(%reason, "broker blocked publishers");
                    self.emit(RecoveryEvent::Blocked { reason });
                }
            }
            None => {
                if self.blocked.swap(false, Ordering::AcqRel) {
                    tracing::info!("broker unblocked publishers");
                    self.emit(RecoveryEvent::Unblocked);
                }
                self.unblocked.notify_waiters();
            }
        }
    }

    fn watch_blocked(self: &Arc<Self>, t: &Arc<dyn Transport>) {
        let Some(mut rx) = t.blocked() else { return };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let reason = rx.borrow_and_update().clone();
                match weak.upgrade() {
                    Some(s) => s.set_blocked(reason),
                    None => return,
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
            // That connection is gone: whatever blocked it does not block the next one.
            if let Some(s) = weak.upgrade() {
                s.set_blocked(None);
            }
        });
    }

    fn next_url(&self) -> (usize, &str) {
        let n = self.urls.len().max(1);
        let i = match self.recovery.failover_strategy {
            FailoverStrategy::RoundRobin => self.next_url.fetch_add(1, Ordering::Relaxed) % n,
            FailoverStrategy::Shuffle => fastrand::usize(..n),
        };
        (i, self.urls.get(i).map(String::as_str).unwrap_or(""))
    }

    /// Declare the recorded topology again on a fresh connection. Fails only if the connection
    /// is lost meanwhile; anything else that cannot be restored is reported and left out.
    async fn restore_topology(&self, t: &Arc<dyn Transport>) -> Result<(), Error> {
        let topo = match self.topology.lock() {
            Ok(t) => t.clone(),
            Err(_) => return Ok(()),
        };
        let mut ch = t.open_channel().await?;
        for ex in &topo.exchanges {
            let r = ch
                .exchange_declare(&ex.name, &ex.kind, ex.flags, &ex.arguments)
                .await;
            self.check(r, t, &mut ch, || format!("exchange {}", ex.name))
                .await?;
        }
        for b in &topo.exchange_bindings {
            let r = ch
                .exchange_bind(&b.destination, &b.source, &b.routing_key, &b.arguments)
                .await;
            self.check(r, t, &mut ch, || {
                format!(
                    "exchange binding {} <- {} ({})",
                    b.destination, b.source, b.routing_key
                )
            })
            .await?;
        }
        for q in &topo.queues {
            let started = Instant::now();
            loop {
                let requested = if q.server_named { "" } else { q.name.as_str() };
                match ch.queue_declare(requested, q.flags, &q.arguments).await {
                    Ok(d) => {
                        if q.server_named && d.name != q.name {
                            self.record(|t| t.rename_queue(&q.name, &d.name));
                            self.has_renames.store(true, Ordering::Release);
                            tracing::info!(old = %q.name, new = %d.name, "server-named queue renamed");
                            self.emit(RecoveryEvent::QueueRenamed {
                                old: q.name.clone(),
                                new: d.name,
                            });
                        }
                        break;
                    }
                    // An exclusive queue still held by the connection we lost: the broker
                    // drops it once it notices that connection is dead.
                    Err(e)
                        if e.reply_code() == Some(405)
                            && started.elapsed() < self.recovery.outage_timeout =>
                    {
                        tracing::debug!(queue = %q.name, "exclusive queue still locked; waiting");
                        if ch.is_closed() {
                            ch = t.open_channel().await?;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => {
                        self.check::<()>(Err(e), t, &mut ch, || format!("queue {}", q.name))
                            .await?;
                        break;
                    }
                }
            }
        }
        let bindings = match self.topology.lock() {
            Ok(t) => t.queue_bindings.clone(),
            Err(_) => Vec::new(),
        };
        for b in &bindings {
            let r = ch
                .queue_bind(&b.destination, &b.source, &b.routing_key, &b.arguments)
                .await;
            self.check(r, t, &mut ch, || {
                format!(
                    "binding {} <- {} ({})",
                    b.destination, b.source, b.routing_key
                )
            })
            .await?;
        }
        let _ = ch.close().await;
        Ok(())
    }

    async fn check<T>(
        &self,
        r: Result<T, Error>,
        t: &Arc<dyn Transport>,
        ch: &mut Arc<dyn TransportChannel>,
        what: impl FnOnce() -> String,
    ) -> Result<Option<T>, Error> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_connection_loss(&e) => Err(e),
            Err(e) => {
                let entity = what();
                tracing::warn!(%entity, error = %e, "could not restore");
                self.emit(RecoveryEvent::RestoreFailed { entity, error: e });
                if ch.is_closed() {
                    *ch = t.open_channel().await?;
                }
                Ok(None)
            }
        }
    }

    fn wake_all(&self) {
        for ch in self.live_channels() {
            ch.wake_consumers();
        }
    }
}

/// A connection that reconnects and restores itself (see the [module docs](super)).
#[derive(Debug)]
pub(crate) struct RobustTransport {
    shared: Arc<Shared>,
}

impl RobustTransport {
    pub(crate) async fn connect(
        urls: Vec<String>,
        options: ConnectOptions,
        recovery: RecoveryOptions,
    ) -> Result<RobustTransport, Error> {
        let (i, t) = connect_first(&urls, &options, &recovery).await?;
        let shared = Arc::new(Shared {
            next_url: AtomicUsize::new(i + 1),
            urls,
            options,
            recovery,
            name: t.name(),
            link: watch::channel(Link::Up {
                generation: 0,
                transport: t.clone(),
            })
            .0,
            topology: Mutex::new(Topology::default()),
            has_renames: AtomicBool::new(false),
            channels: Mutex::new(Vec::new()),
            events: broadcast::channel(256).0,
            user_closed: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            unblocked: Notify::new(),
        });
        shared.watch_blocked(&t);
        tokio::spawn(supervise(Arc::downgrade(&shared), t.close_signal()));
        Ok(RobustTransport { shared })
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// Wait for the connection to drop; reconnect; restore; repeat — until closed by the user, the
/// retries run out, or every handle is gone.
async fn supervise(weak: Weak<Shared>, mut signal: BoxFuture<'static, Error>) {
    let mut generation = 0u64;
    loop {
        let reason = signal.await;
        let down_at = Instant::now();
        {
            let Some(shared) = weak.upgrade() else { return };
            if shared.user_closed.load(Ordering::Acquire) {
                return;
            }
            shared.link.send_replace(Link::Down);
            tracing::warn!(error = %reason, "connection lost; recovering");
            shared.emit(RecoveryEvent::Disconnected { reason });
        }
        let mut attempt = 0u32;
        let (url, t, shared) = loop {
            let Some(shared) = weak.upgrade() else { return };
            if shared.user_closed.load(Ordering::Acquire) {
                return;
            }
            let (_, url) = shared.next_url();
            let url = url.to_owned();
            let opened = transport::open(&url, &shared.options).await;
            let opened = match opened {
                Ok(t) => match shared.restore_topology(&t).await {
                    Ok(()) if !t.is_closed() => Ok(t),
                    Ok(()) => Err(Error::Closed { what: "connection" }),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match opened {
                Ok(t) => break (url, t, shared),
                Err(e) => {
                    attempt += 1;
                    if shared
                        .recovery
                        .reconnect
                        .max_retries
                        .is_some_and(|m| attempt > m)
                    {
                        tracing::error!(error = %e, attempts = attempt, "giving up reconnecting");
                        shared.link.send_replace(Link::Closed(e.clone()));
                        shared.emit(RecoveryEvent::GaveUp { error: e });
                        shared.wake_all();
                        return;
                    }
                    let wait = shared.recovery.reconnect.jittered_delay(attempt - 1);
                    tracing::warn!(attempt, url = %mask_url(&url), error = %e, ?wait, "reconnect failed");
                    shared.emit(RecoveryEvent::ReconnectFailed {
                        attempt,
                        url: mask_url(&url),
                        error: e,
                        retry_in: wait,
                    });
                    drop(shared);
                    tokio::time::sleep(wait).await;
                }
            }
        };
        generation += 1;
        signal = t.close_signal();
        shared.watch_blocked(&t);
        shared.link.send_replace(Link::Up {
            generation,
            transport: t,
        });
        let downtime = down_at.elapsed();
        tracing::info!(url = %mask_url(&url), ?downtime, generation, "reconnected");
        shared.emit(RecoveryEvent::Reconnected {
            url: mask_url(&url),
            downtime,
            generation,
        });
        for ch in shared.live_channels() {
            tokio::spawn(async move {
                if let Err(e) = ch.reopen_after(generation).await {
                    tracing::warn!(error = %e, "could not reopen a channel after reconnecting");
                }
            });
        }
    }
}

impl Transport for RobustTransport {
    fn name(&self) -> &'static str {
        self.shared.name
    }
    fn open_channel(&self) -> BoxFuture<'_, Result<Arc<dyn TransportChannel>, Error>> {
        Box::pin(async move {
            let ch = ChannelInner::open(self.shared.clone()).await?;
            self.shared.register_channel(Arc::downgrade(&ch));
            let ch: Arc<dyn TransportChannel> = ch;
            Ok(ch)
        })
    }
    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.shared.user_closed.store(true, Ordering::Release);
            let prev = self
                .shared
                .link
                .send_replace(Link::Closed(Error::Closed { what: "connection" }));
            self.shared.wake_all();
            self.shared.unblocked.notify_waiters();
            match prev {
                Link::Up { transport, .. } => transport.close().await,
                _ => Ok(()),
            }
        })
    }
    fn is_closed(&self) -> bool {
        self.shared.is_closed_for_good()
    }
    fn close_signal(&self) -> BoxFuture<'static, Error> {
        let mut rx = self.shared.link.subscribe();
        Box::pin(async move {
            match rx.wait_for(|l| matches!(l, Link::Closed(_))).await {
                Ok(l) => match &*l {
                    Link::Closed(e) => e.clone(),
                    _ => Error::Closed { what: "connection" },
                },
                Err(_) => Error::Closed { what: "connection" },
            }
        })
    }
    fn heartbeat(&self) -> Option<Duration> {
        match &*self.shared.link.borrow() {
            Link::Up { transport, .. } => transport.heartbeat(),
            _ => None,
        }
    }
    fn blocked(&self) -> Option<watch::Receiver<Option<String>>> {
        match &*self.shared.link.borrow() {
            Link::Up { transport, .. } => transport.blocked(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_urls;

    #[test]
    fn failover_lists_split_but_sentinel_lists_stay_one_url() {
        assert_eq!(
            split_urls("amqp://h1; amqp://h2;;"),
            vec!["amqp://h1", "amqp://h2"]
        );
        // Kombu's form: one connection over several sentinels.
        assert_eq!(
            split_urls("sentinel://:pw@h1:26379;sentinel://h2:26380/0?master_name=m"),
            vec!["sentinel://:pw@h1:26379;sentinel://h2:26380/0?master_name=m"]
        );
        assert_eq!(
            split_urls("redis://a/0;SENTINEL://s1;sentinel://s2?master_name=m;redis://b/0"),
            vec![
                "redis://a/0",
                "SENTINEL://s1;sentinel://s2?master_name=m",
                "redis://b/0"
            ]
        );
        assert_eq!(
            split_urls("sentinel://s1?master_name=m"),
            vec!["sentinel://s1?master_name=m"]
        );
        assert!(split_urls("").is_empty());
    }
}
