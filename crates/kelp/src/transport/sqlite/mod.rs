//! `sqlite://path/to/file.db`: an embedded, durable broker in one SQLite file — no server.
//!
//! Exchanges, queues, bindings and messages live in the file (WAL mode, `synchronous=NORMAL`:
//! a commit survives a process crash; an OS crash can lose the last moments), so several
//! processes on one machine can publish and consume through the same file and messages survive
//! restarts. Routing is the shared [`virtual_broker`](super::virtual_broker) router (every
//! exchange type, exchange-to-exchange bindings, alternate exchanges), rebuilt when another
//! process changes the topology.
//!
//! Queues keep priorities (`x-max-priority`), TTLs (`x-message-ttl`, per-message
//! `expiration`), length limits (`x-max-length` with `x-overflow`) and dead-lettering
//! (`x-dead-letter-exchange`/`-routing-key`, with `x-death`). A delivered message is leased to
//! its connection; the connection renews its leases while it lives, so the messages of a
//! process that died (even `kill -9`) go back to their queue, marked redelivered, once the
//! lease (`visibility_timeout`, default 30 s) runs out.
//!
//! Consumers in the same process are woken at once by a publish; consumers in other processes
//! notice within the poll interval (`poll_interval`, default 50 ms; the check is a cheap
//! `PRAGMA data_version` read, so an idle consumer costs nearly no CPU).
//!
//! URL options: `?visibility_timeout=<seconds>&poll_interval=<ms>`.

mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use kelp_amqp::{BasicProperties, FieldTable, ShortString};
use tokio::sync::{mpsc, watch, Notify};

use super::virtual_broker::{BrokerError, EntityKind, ExchangeOptions, MessageData};
use super::{
    BoxFuture, ConsumeSpec, DeliveryStream, ExchangeFlags, PublishOutcome, QueueDeclared,
    QueueFlags, RawDelivery, RawReturn, Transport, TransportChannel,
};
use crate::error::Error;

pub use store::SCHEMA_VERSION;

/// Parsed `sqlite://` URL.
#[derive(Debug, Clone, PartialEq)]
pub struct SqliteOptions {
    /// The database file.
    pub path: PathBuf,
    /// How long a delivered message stays leased to a connection that stopped renewing it.
    pub visibility_timeout: Duration,
    /// The longest a consumer in another process waits to notice a new message.
    pub poll_interval: Duration,
}

impl SqliteOptions {
    /// Parse `sqlite://relative/file.db`, `sqlite:///absolute/file.db` (+ options).
    ///
    /// ```
    /// # use kelp::transport::sqlite::SqliteOptions;
    /// let o = SqliteOptions::parse("sqlite:///var/lib/app/q.db?visibility_timeout=5")?;
    /// assert_eq!(o.path, std::path::Path::new("/var/lib/app/q.db"));
    /// assert_eq!(o.visibility_timeout.as_secs(), 5);
    /// assert_eq!(SqliteOptions::parse("sqlite://kelp.db")?.path, std::path::Path::new("kelp.db"));
    /// # Ok::<(), kelp::Error>(())
    /// ```
    pub fn parse(url: &str) -> Result<SqliteOptions, Error> {
        let bad = |reason: String| Error::Url {
            url: url.to_owned(),
            reason,
        };
        let rest = url
            .split_once("://")
            .map(|(_, r)| r)
            .ok_or_else(|| bad("no scheme".into()))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = percent_encoding::percent_decode_str(path)
            .decode_utf8()
            .map_err(|_| bad("the path is not UTF-8".into()))?;
        let path = if path.is_empty() {
            "kelp.db".into()
        } else {
            path
        };
        let mut o = SqliteOptions {
            path: PathBuf::from(path.as_ref()),
            visibility_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(50),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let num = || {
                v.parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .ok_or_else(|| bad(format!("{k}={v:?} is not a number")))
            };
            match k {
                "visibility_timeout" => o.visibility_timeout = Duration::from_secs_f64(num()?),
                "poll_interval" => o.poll_interval = Duration::from_secs_f64(num()? / 1000.0),
                _ => {}
            }
        }
        Ok(o)
    }
}

/// The one `T` of a database file in this process (by canonical path), shared by all its
/// connections while any holds it.
fn per_file<T: Default + Send + Sync + 'static>(
    all: &'static OnceLock<Mutex<HashMap<PathBuf, Weak<T>>>>,
    path: &Path,
) -> Arc<T> {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let Ok(mut map) = all.get_or_init(Default::default).lock() else {
        return Arc::default();
    };
    map.retain(|_, w| w.strong_count() > 0);
    if let Some(t) = map.get(&key).and_then(Weak::upgrade) {
        return t;
    }
    let t = Arc::<T>::default();
    map.insert(key, Arc::downgrade(&t));
    t
}

type PerFile<T> = OnceLock<Mutex<HashMap<PathBuf, Weak<T>>>>;

/// One process-wide wake-up per database file, so publishes wake consumers of every
/// connection in the process at once.
fn wake_for(path: &Path) -> Arc<Notify> {
    static WAKES: PerFile<Notify> = OnceLock::new();
    per_file(&WAKES, path)
}

/// Consumers per queue of a database file, across the process's connections (for
/// `consumer_count`, auto-delete and `if_unused`).
type ConsumerCounts = Arc<Mutex<HashMap<String, usize>>>;

fn counts_for(path: &Path) -> ConsumerCounts {
    static COUNTS: PerFile<Mutex<HashMap<String, usize>>> = OnceLock::new();
    per_file(&COUNTS, path)
}

/// A consumer as the other consumers of its queue in this process see it (for single active
/// consumer and consumer priorities).
#[derive(Debug)]
struct Reg {
    id: u64,
    priority: i64,
    /// Its channel has prefetch room now.
    room: Arc<AtomicBool>,
    /// Messages handed to it so far (consumers of equal priority take turns).
    served: Arc<AtomicU64>,
}

type Registry = Arc<Mutex<HashMap<String, Vec<Reg>>>>;

fn registry_for(path: &Path) -> Registry {
    static REGS: PerFile<Mutex<HashMap<String, Vec<Reg>>>> = OnceLock::new();
    per_file(&REGS, path)
}

static NEXT_REG: AtomicU64 = AtomicU64::new(1);

struct Db {
    conn: rusqlite::Connection,
    topo: store::Topology,
    regs: Registry,
}

fn live_queues(regs: &Registry) -> std::collections::HashSet<String> {
    regs.lock()
        .map(|r| {
            r.iter()
                .filter(|(_, l)| !l.is_empty())
                .map(|(q, _)| q.clone())
                .collect()
        })
        .unwrap_or_default()
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Shared {
    opts: SqliteOptions,
    ops: Mutex<std::sync::mpsc::Sender<Op>>,
    owner: String,
    wake: Arc<Notify>,
    closed: watch::Sender<Option<Error>>,
    channels: Mutex<Vec<Weak<SqliteChannel>>>,
    next_channel: AtomicU64,
    consumers: ConsumerCounts,
    regs: Registry,
    /// Bumped by this connection's own writes that can make messages ready (SQLite's
    /// `data_version` only moves for other connections' commits).
    local_writes: AtomicU64,
}

/// Work for the connection's writer thread, which owns the SQLite connection and runs the
/// work in arrival order. Consecutive publishes and acks go into one transaction (group
/// commit).
type Work = Box<dyn FnOnce(&mut Db, &Path) + Send>;

enum Op {
    Run(Work),
    Publish {
        msg: Box<MessageData>,
        reply: tokio::sync::oneshot::Sender<Result<store::Stored, Error>>,
    },
    /// Acks have no reply, as in AMQP: later work of this connection sees them (it runs
    /// after them), other connections as soon as the batch commits.
    Ack {
        ids: Vec<i64>,
    },
}

/// The most publishes and acks committed together.
const MAX_BATCH: usize = 512;

fn writer(mut db: Db, path: PathBuf, rx: std::sync::mpsc::Receiver<Op>) {
    let mut next: Option<Op> = None;
    loop {
        let op = match next.take() {
            Some(op) => op,
            None => match rx.recv() {
                Ok(op) => op,
                Err(_) => return,
            },
        };
        match op {
            Op::Run(f) => f(&mut db, &path),
            first => {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(op @ (Op::Publish { .. } | Op::Ack { .. })) => batch.push(op),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                run_batch(&mut db, &path, batch);
            }
        }
    }
}

fn run_batch(db: &mut Db, path: &Path, batch: Vec<Op>) {
    let now = store::now();
    let live = live_queues(&db.regs);
    let Db { conn, topo, .. } = db;
    let results = store::write(conn, topo, path, |tx, topo| {
        topo.live = live;
        let mut out = Vec::with_capacity(batch.len());
        for op in &batch {
            out.push(match op {
                Op::Publish { msg, .. } => store::publish(tx, topo, msg, now),
                Op::Ack { ids } => store::ack(tx, ids).map(|()| store::Stored::Routed),
                Op::Run(_) => Ok(store::Stored::Routed),
            });
        }
        Ok(out)
    });
    match results {
        Ok(results) => {
            for (op, r) in batch.into_iter().zip(results) {
                match op {
                    Op::Publish { reply, .. } => {
                        let _ = reply.send(r);
                    }
                    Op::Ack { .. } => {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "acknowledging");
                        }
                    }
                    Op::Run(_) => {}
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "a batch of publishes and acks failed");
            for op in batch {
                if let Op::Publish { reply, .. } = op {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

impl Shared {
    /// Run `f` on the database, on the connection's writer thread.
    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut rusqlite::Connection, &mut store::Topology, &Path) -> Result<T, Error>
            + Send
            + 'static,
    ) -> Result<T, Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Op::Run(Box::new(move |db: &mut Db, path: &Path| {
            let Db { conn, topo, .. } = db;
            let _ = tx.send(f(conn, topo, path));
        })))?;
        rx.await.map_err(|_| Error::Closed {
            what: "SQLite writer",
        })?
    }

    fn send(&self, op: Op) -> Result<(), Error> {
        self.ops
            .lock()
            .map_err(|_| Error::Closed {
                what: "SQLite writer",
            })?
            .send(op)
            .map_err(|_| Error::Closed {
                what: "SQLite writer",
            })
    }

    /// Run `f` in one write transaction.
    async fn write<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&rusqlite::Transaction<'_>, &mut store::Topology) -> Result<T, Error>
            + Send
            + 'static,
    ) -> Result<T, Error> {
        let live = live_queues(&self.regs);
        self.run(move |conn, topo, path| {
            topo.live = live;
            store::write(conn, topo, path, f)
        })
        .await
    }

    /// Route and store a message (batched with other publishes and acks).
    async fn publish(&self, msg: MessageData) -> Result<store::Stored, Error> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Op::Publish {
            msg: Box::new(msg),
            reply,
        })?;
        rx.await.map_err(|_| Error::Closed {
            what: "SQLite writer",
        })?
    }

    fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.opts.visibility_timeout.as_millis()).unwrap_or(i64::MAX)
    }
}

/// An embedded broker in a SQLite file (see the [module docs](self)).
#[derive(Debug)]
pub struct SqliteTransport {
    shared: Arc<Shared>,
}

impl SqliteTransport {
    /// Open (creating if needed) the file a `sqlite://` URL names.
    pub async fn open(url: &str) -> Result<Self, Error> {
        let opts = SqliteOptions::parse(url)?;
        let path = opts.path.clone();
        let conn = tokio::task::spawn_blocking(move || store::open(&path))
            .await
            .map_err(|_| Error::Closed {
                what: "SQLite worker",
            })??;
        let path_for_counts = opts.path.clone();
        let regs = registry_for(&opts.path);
        let (ops, rx) = std::sync::mpsc::channel();
        let db = Db {
            conn,
            topo: store::Topology::default(),
            regs: regs.clone(),
        };
        let writer_path = opts.path.clone();
        std::thread::Builder::new()
            .name("kelp-sqlite".into())
            .spawn(move || writer(db, writer_path, rx))
            .map_err(|e| Error::Sqlite {
                path: opts.path.display().to_string(),
                what: "starting the writer thread",
                reason: e.to_string(),
            })?;
        let shared = Arc::new(Shared {
            wake: wake_for(&opts.path),
            opts,
            ops: Mutex::new(ops),
            owner: crate::ids::uuid4(),
            closed: watch::channel(None).0,
            channels: Mutex::new(Vec::new()),
            next_channel: AtomicU64::new(1),
            consumers: counts_for(&path_for_counts),
            regs,
            local_writes: AtomicU64::new(0),
        });
        // Keep this connection's leases alive while it lives.
        let weak = Arc::downgrade(&shared);
        let every = (shared.opts.visibility_timeout / 3).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(s) = weak.upgrade() else { return };
                if s.is_closed() {
                    return;
                }
                let owner = s.owner.clone();
                let lease = s.lease_ms();
                let r = s
                    .run(move |c, _, path| {
                        store::renew(c, &owner, lease)
                            .map_err(store::db_err(path, "renewing leases"))
                    })
                    .await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "renewing leases");
                }
            }
        });
        Ok(SqliteTransport { shared })
    }
}

impl Transport for SqliteTransport {
    fn name(&self) -> &'static str {
        "sqlite"
    }
    fn open_channel(&self) -> BoxFuture<'_, Result<Arc<dyn TransportChannel>, Error>> {
        Box::pin(async move {
            if self.shared.is_closed() {
                return Err(Error::Closed { what: "connection" });
            }
            let id = self.shared.next_channel.fetch_add(1, Ordering::Relaxed);
            let ch = SqliteChannel::new(self.shared.clone(), id);
            if let Ok(mut list) = self.shared.channels.lock() {
                list.retain(|w| w.strong_count() > 0);
                list.push(Arc::downgrade(&ch));
            }
            let ch: Arc<dyn TransportChannel> = ch;
            Ok(ch)
        })
    }
    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if self.shared.is_closed() {
                return Ok(());
            }
            let channels: Vec<Arc<SqliteChannel>> = self
                .shared
                .channels
                .lock()
                .map(|c| c.iter().filter_map(Weak::upgrade).collect())
                .unwrap_or_default();
            for ch in channels {
                let _ = TransportChannel::close(&*ch).await;
            }
            let owner = self.shared.owner.clone();
            let r = self
                .shared
                .write(move |tx, topo| store::release_owner(tx, topo, &owner))
                .await;
            self.shared
                .closed
                .send_replace(Some(Error::Closed { what: "connection" }));
            self.shared.local_writes.fetch_add(1, Ordering::AcqRel);
            self.shared.wake.notify_waiters();
            r
        })
    }
    fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }
    fn close_signal(&self) -> BoxFuture<'static, Error> {
        let mut rx = self.shared.closed.subscribe();
        Box::pin(async move {
            match rx.wait_for(Option::is_some).await {
                Ok(e) => e.clone().unwrap_or(Error::Closed { what: "connection" }),
                Err(_) => Error::Closed { what: "connection" },
            }
        })
    }
}

impl Drop for SqliteTransport {
    fn drop(&mut self) {
        if self.shared.is_closed() {
            return;
        }
        // Dropped without close: give back what this connection holds.
        let shared = self.shared.clone();
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let owner = shared.owner.clone();
                let _ = shared
                    .write(move |tx, topo| store::release_owner(tx, topo, &owner))
                    .await;
                shared
                    .closed
                    .send_replace(Some(Error::Closed { what: "connection" }));
                shared.local_writes.fetch_add(1, Ordering::AcqRel);
                shared.wake.notify_waiters();
            });
        }
    }
}

#[derive(Debug)]
struct Entry {
    queue: String,
    no_ack: bool,
    /// The per-consumer prefetch in effect when it started (0: none).
    prefetch: u16,
    tx: mpsc::Sender<Result<RawDelivery, Error>>,
    /// Its registration among the queue's consumers in this process.
    reg: u64,
    priority: i64,
    /// Its queue has `x-single-active-consumer`.
    single_active: bool,
    room: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct ChanState {
    next_tag: u64,
    /// Channel tag → (message id, queue, consumer tag).
    unacked: BTreeMap<u64, (i64, String, Option<String>)>,
    /// `basic.qos` with `global = false`: for consumers started after it.
    prefetch: u16,
    /// `basic.qos` with `global = true`: the whole channel.
    prefetch_global: u16,
    consumers: Vec<(String, Entry)>,
    next_consumer: usize,
}

/// A channel on a SQLite file.
#[derive(Debug)]
pub struct SqliteChannel {
    shared: Arc<Shared>,
    id: u64,
    me: Weak<SqliteChannel>,
    state: Mutex<ChanState>,
    credit: Notify,
    confirm: AtomicBool,
    closed: AtomicBool,
    pump: Mutex<Option<tokio::task::JoinHandle<()>>>,
    returns_tx: mpsc::UnboundedSender<RawReturn>,
    returns_rx: Mutex<Option<mpsc::UnboundedReceiver<RawReturn>>>,
}

impl Drop for SqliteChannel {
    fn drop(&mut self) {
        let regs: Vec<(String, u64)> = self
            .state
            .lock()
            .map(|s| {
                s.consumers
                    .iter()
                    .map(|(_, e)| (e.queue.clone(), e.reg))
                    .collect()
            })
            .unwrap_or_default();
        for (q, reg) in regs {
            self.unregister(&q, reg);
        }
        if let Ok(mut p) = self.pump.lock() {
            if let Some(h) = p.take() {
                h.abort();
            }
        }
        let ids = self.take_unacked_ids();
        if ids.is_empty() || self.shared.is_closed() {
            return;
        }
        let shared = self.shared.clone();
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = shared.write(move |tx, _| store::release(tx, &ids)).await;
                shared.local_writes.fetch_add(1, Ordering::AcqRel);
                shared.wake.notify_waiters();
            });
        }
    }
}

fn raw_delivery(tag: u64, t: store::Taken, consumer_tag: &str) -> RawDelivery {
    RawDelivery {
        delivery_tag: tag,
        redelivered: t.redelivered,
        exchange: t.message.exchange,
        routing_key: t.message.routing_key,
        consumer_tag: ShortString::from(consumer_tag),
        properties: t.message.properties,
        body: t.message.body,
    }
}

impl SqliteChannel {
    fn new(shared: Arc<Shared>, id: u64) -> Arc<SqliteChannel> {
        let (returns_tx, returns_rx) = mpsc::unbounded_channel();
        Arc::new_cyclic(|me| SqliteChannel {
            shared,
            id,
            me: me.clone(),
            state: Mutex::new(ChanState::default()),
            credit: Notify::new(),
            confirm: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            pump: Mutex::new(None),
            returns_tx,
            returns_rx: Mutex::new(Some(returns_rx)),
        })
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed { what: "channel" });
        }
        if self.shared.is_closed() {
            return Err(Error::Closed { what: "connection" });
        }
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, ChanState>, Error> {
        self.state
            .lock()
            .map_err(|_| Error::Closed { what: "channel" })
    }

    /// Give channel tags to taken messages and remember what is unacked.
    fn register(
        &self,
        queue: &str,
        taken: Vec<store::Taken>,
        no_ack: bool,
        consumer: Option<&str>,
    ) -> Vec<(u64, store::Taken)> {
        let Ok(mut st) = self.state.lock() else {
            return Vec::new();
        };
        taken
            .into_iter()
            .map(|t| {
                st.next_tag += 1;
                let tag = st.next_tag;
                if !no_ack {
                    st.unacked
                        .insert(tag, (t.id, queue.to_owned(), consumer.map(str::to_owned)));
                }
                (tag, t)
            })
            .collect()
    }

    /// How many more messages consumer `tag` may have (its own prefetch and the channel's).
    fn room_for(st: &ChanState, tag: &str, prefetch: u16) -> usize {
        let mine = st
            .unacked
            .values()
            .filter(|(_, _, c)| c.as_deref() == Some(tag))
            .count();
        let own = if prefetch == 0 {
            usize::MAX
        } else {
            usize::from(prefetch).saturating_sub(mine)
        };
        let global = if st.prefetch_global == 0 {
            usize::MAX
        } else {
            usize::from(st.prefetch_global).saturating_sub(st.unacked.len())
        };
        own.min(global).min(256)
    }

    /// The consumer loop: take messages for each consumer within the prefetch, wait when
    /// there are none.
    async fn pump(weak: Weak<SqliteChannel>) {
        let mut idle = Duration::from_millis(1);
        let mut last_version: Option<(i64, u64)> = None;
        let mut last_full = tokio::time::Instant::now();
        // When the next ready message in the file expires (ms since the epoch): its expiry may
        // dead-letter it into a queue consumed here, with nothing else changing.
        let mut next_due: Option<i64> = None;
        loop {
            let Some(ch) = weak.upgrade() else { return };
            if ch.closed.load(Ordering::Acquire) || ch.shared.is_closed() {
                return;
            }
            type Want = (
                String,
                String,
                bool,
                mpsc::Sender<Result<RawDelivery, Error>>,
                usize,
            );
            let gone: Vec<String> = ch
                .state
                .lock()
                .map(|st| {
                    st.consumers
                        .iter()
                        .filter(|(_, e)| e.tx.is_closed())
                        .map(|(t, _)| t.clone())
                        .collect()
                })
                .unwrap_or_default();
            for tag in gone {
                // Its stream was dropped: it consumes no more.
                ch.forget_consumer(&tag);
            }
            let (consumers, any_consumer): (Vec<Want>, bool) = match ch.state.lock() {
                Ok(mut st) => {
                    let n = st.consumers.len();
                    let start = if n == 0 { 0 } else { st.next_consumer % n };
                    st.next_consumer = st.next_consumer.wrapping_add(1);
                    let all: Vec<Want> = (0..n)
                        .filter_map(|i| st.consumers.get((start + i) % n))
                        .filter(|(_, e)| !e.tx.is_closed())
                        .map(|(t, e)| {
                            let room = Self::room_for(&st, t, e.prefetch);
                            e.room.store(room > 0, Ordering::Release);
                            let room = if ch.eligible(e) { room } else { 0 };
                            (t.clone(), e.queue.clone(), e.no_ack, e.tx.clone(), room)
                        })
                        .collect();
                    let any = !all.is_empty();
                    // The channel-wide limit is shared: hand it out in turn.
                    let mut global_left = if st.prefetch_global == 0 {
                        usize::MAX
                    } else {
                        usize::from(st.prefetch_global).saturating_sub(st.unacked.len())
                    };
                    let all: Vec<Want> = all
                        .into_iter()
                        .map(|mut w| {
                            w.4 = w.4.min(global_left);
                            global_left -= w.4.min(global_left);
                            w
                        })
                        .collect();
                    (all.into_iter().filter(|w| w.4 > 0).collect(), any)
                }
                Err(_) => return,
            };
            let _ = any_consumer;
            if consumers.is_empty() {
                let credit = ch.credit.notified();
                let wake = ch.shared.wake.notified();
                tokio::select! {
                    _ = credit => {}
                    _ = wake => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            // Nothing changed anywhere since the last empty look: skip the write transaction
            // (but look for real every second, and when a message falls due: leases and TTLs
            // run out with time alone).
            let until_due = next_due.map(|t| {
                Duration::from_millis(u64::try_from(t.saturating_sub(store::now())).unwrap_or(0))
            });
            if idle > Duration::from_millis(1)
                && last_full.elapsed() < Duration::from_secs(1)
                && until_due.is_none_or(|d| !d.is_zero())
            {
                // Listen before looking, so a publish between the look and the wait counts.
                let wake = ch.shared.wake.notified();
                tokio::pin!(wake);
                wake.as_mut().enable();
                let v = ch.version().await;
                if v.is_some() && v == last_version {
                    let credit = ch.credit.notified();
                    let wait = until_due.map_or(idle, |d| idle.min(d));
                    tokio::select! {
                        _ = wake => { idle = Duration::from_millis(1); }
                        _ = credit => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
                last_version = v;
            }
            last_full = tokio::time::Instant::now();
            let owner = ch.shared.owner.clone();
            let lease = ch.shared.lease_ms();
            // Several consumers on one queue take turns one message at a time (RabbitMQ's
            // round robin); a lone consumer takes a batch.
            let shared_queues: Vec<bool> = {
                let counts = ch.shared.consumers.lock().ok();
                consumers
                    .iter()
                    .map(|(_, q, ..)| {
                        counts.as_ref().and_then(|c| c.get(q).copied()).unwrap_or(0) > 1
                    })
                    .collect()
            };
            let wanted: Vec<(String, bool, i64)> = consumers
                .iter()
                .zip(&shared_queues)
                .map(|((_, q, na, _, room), shared)| {
                    let n = if *shared { 1 } else { (*room).min(64) };
                    (q.clone(), *na, i64::try_from(n).unwrap_or(1))
                })
                .collect();
            let got = ch
                .shared
                .write(move |tx, topo| {
                    let mut out = Vec::with_capacity(wanted.len());
                    for (q, no_ack, n) in &wanted {
                        out.push(store::take(tx, topo, q, &owner, *n, lease, *no_ack));
                    }
                    Ok((out, store::next_due(tx)?))
                })
                .await;
            let got = match got {
                Ok((g, due)) => {
                    next_due = due;
                    g
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consumer poll");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut any = false;
            for ((ctag, queue, no_ack, tx, _), taken) in consumers.into_iter().zip(got) {
                match taken {
                    Ok(list) => {
                        if list.is_empty() {
                            continue;
                        }
                        let still_there = ch
                            .state
                            .lock()
                            .map(|st| st.consumers.iter().any(|(t, _)| *t == ctag))
                            .unwrap_or(false);
                        if !still_there {
                            // Cancelled while its messages were being taken: they were never
                            // delivered, and go back as they were.
                            ch.give_back(&queue, list, &[], no_ack).await;
                            continue;
                        }
                        any = true;
                        if let Ok(st) = ch.state.lock() {
                            if let Some((_, e)) = st.consumers.iter().find(|(t, _)| *t == ctag) {
                                e.served.fetch_add(list.len() as u64, Ordering::AcqRel);
                            }
                        }
                        // Once the consumer's stream is gone, nothing more reaches it: the
                        // message that could not be sent and the rest of the batch go back.
                        let mut back: Vec<store::Taken> = Vec::new();
                        let mut back_tags: Vec<u64> = Vec::new();
                        for (tag, t) in ch.register(&queue, list, no_ack, Some(&ctag)) {
                            if !back.is_empty() {
                                back.push(t);
                                back_tags.push(tag);
                                continue;
                            }
                            let (id, priority, expires_at) = (t.id, t.priority, t.expires_at);
                            let d = raw_delivery(tag, t, &ctag);
                            if let Err(mpsc::error::SendError(Ok(d))) = tx.send(Ok(d)).await {
                                back.push(store::Taken {
                                    id,
                                    message: MessageData {
                                        exchange: d.exchange,
                                        routing_key: d.routing_key,
                                        properties: d.properties,
                                        body: d.body,
                                    },
                                    redelivered: d.redelivered,
                                    priority,
                                    expires_at,
                                });
                                back_tags.push(tag);
                            }
                        }
                        if !back.is_empty() {
                            ch.give_back(&queue, back, &back_tags, no_ack).await;
                        }
                    }
                    Err(Error::Broker(BrokerError::NotFound { .. })) => {
                        // Its queue was deleted: the broker cancels the consumer.
                        ch.forget_consumer(&ctag);
                        let _ = tx
                            .send(Err(Error::ConsumerCancelled {
                                consumer_tag: ctag.clone(),
                                queue: queue.clone(),
                            }))
                            .await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                    }
                }
            }
            if any {
                idle = Duration::from_millis(1);
            } else {
                idle = (idle * 2).clamp(Duration::from_millis(2), ch.shared.opts.poll_interval);
                if last_version.is_none() {
                    last_version = ch.version().await;
                }
            }
        }
    }

    /// End every consumer of the channel: out of the channel's state and the file's consumer
    /// registry and counts. Returns their queues.
    fn drop_consumers(&self) -> Vec<String> {
        let regs: Vec<(String, u64)> = match self.state.lock() {
            Ok(mut s) => std::mem::take(&mut s.consumers)
                .into_iter()
                .map(|(_, e)| (e.queue, e.reg))
                .collect(),
            Err(_) => Vec::new(),
        };
        for (q, reg) in &regs {
            self.unregister(q, *reg);
        }
        let queues: Vec<String> = regs.into_iter().map(|(q, _)| q).collect();
        if let Ok(mut c) = self.shared.consumers.lock() {
            for q in &queues {
                if let Some(n) = c.get_mut(q) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        queues
    }

    /// Forget every unacked message of the channel; returns their ids, to release.
    fn take_unacked_ids(&self) -> Vec<i64> {
        match self.state.lock() {
            Ok(mut s) => std::mem::take(&mut s.unacked)
                .into_values()
                .map(|(id, _, _)| id)
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// A channel-level error (404, 405, 406, 403 …) closes the channel, as in AMQP: its
    /// unacked messages go back to their queues and its consumers end.
    fn soft_error(&self, e: Error) -> Error {
        if !matches!(e, Error::Broker(_)) || self.closed.swap(true, Ordering::AcqRel) {
            return e;
        }
        // The consumer loop is not aborted (a take in progress has already deleted its no_ack
        // messages from the file): it sees the channel closed and its consumers gone, gives
        // back what it took, and ends.
        self.drop_consumers();
        self.credit.notify_waiters();
        let ids = self.take_unacked_ids();
        if !ids.is_empty() {
            let shared = self.shared.clone();
            tokio::spawn(async move {
                let _ = shared.write(move |tx, _| store::release(tx, &ids)).await;
                shared.local_writes.fetch_add(1, Ordering::AcqRel);
                shared.wake.notify_waiters();
            });
        }
        tracing::debug!(error = %e, "channel closed by an error");
        e
    }

    /// One write transaction; a channel-level error closes the channel.
    async fn w<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>, &mut store::Topology) -> Result<T, Error>
            + Send
            + 'static,
    ) -> Result<T, Error> {
        self.shared.write(f).await.map_err(|e| self.soft_error(e))
    }

    /// What changes when anything may have become ready: other connections' commits
    /// (`data_version`) and this connection's own writes.
    async fn version(&self) -> Option<(i64, u64)> {
        let local = self.shared.local_writes.load(Ordering::Acquire);
        self.shared
            .run(|c, _, path| store::data_version(c).map_err(store::db_err(path, "polling")))
            .await
            .ok()
            .map(|v| (v, local))
    }

    /// May this consumer take messages now? With `x-single-active-consumer` only the earliest
    /// consumer of the queue (in this process) does; otherwise a consumer waits while one of
    /// higher `x-priority` has room.
    fn eligible(&self, e: &Entry) -> bool {
        let Ok(regs) = self.shared.regs.lock() else {
            return true;
        };
        let Some(list) = regs.get(&e.queue) else {
            return true;
        };
        if e.single_active {
            return list.iter().map(|r| r.id).min() == Some(e.reg);
        }
        let mine = e.served.load(Ordering::Acquire);
        !list.iter().any(|r| {
            r.id != e.reg
                && r.room.load(Ordering::Acquire)
                && (r.priority > e.priority
                    // Equal priority: round robin, the one served least goes first.
                    || (r.priority == e.priority && r.served.load(Ordering::Acquire) < mine))
        })
    }

    fn unregister(&self, queue: &str, reg: u64) {
        if let Ok(mut regs) = self.shared.regs.lock() {
            if let Some(list) = regs.get_mut(queue) {
                list.retain(|r| r.id != reg);
                if list.is_empty() {
                    regs.remove(queue);
                }
            }
        }
        // Someone else may take over (the next single active consumer, a lower priority).
        self.shared.wake.notify_waiters();
    }

    fn forget_consumer(&self, tag: &str) -> Option<String> {
        let mut st = self.state.lock().ok()?;
        let i = st.consumers.iter().position(|(t, _)| t == tag)?;
        let (_, e) = st.consumers.remove(i);
        drop(st);
        self.unregister(&e.queue, e.reg);
        let mut counts = self.shared.consumers.lock().ok()?;
        if let Some(n) = counts.get_mut(&e.queue) {
            *n = n.saturating_sub(1);
        }
        Some(e.queue)
    }

    fn ensure_pump(&self) {
        let Ok(mut slot) = self.pump.lock() else {
            return;
        };
        if slot.as_ref().is_some_and(|h| !h.is_finished()) {
            self.credit.notify_waiters();
            return;
        }
        *slot = Some(tokio::spawn(SqliteChannel::pump(self.me.clone())));
    }

    /// Put back messages taken for a consumer of `queue` that could not be handed to it (it
    /// was cancelled meanwhile, or its stream dropped), as if they had never been taken: leased
    /// ones (`tags`, forgotten here) become ready again, `no_ack` ones — already deleted — are
    /// re-inserted where they were. Then other consumers may take them.
    async fn give_back(&self, queue: &str, taken: Vec<store::Taken>, tags: &[u64], no_ack: bool) {
        if taken.is_empty() {
            return;
        }
        if let Ok(mut st) = self.state.lock() {
            for tag in tags {
                st.unacked.remove(tag);
            }
        }
        let q = queue.to_owned();
        let r = self
            .shared
            .write(move |tx, _| {
                if no_ack {
                    store::restore(tx, &q, &taken)
                } else {
                    let ids: Vec<i64> = taken.iter().map(|t| t.id).collect();
                    store::unclaim(tx, &ids)
                }
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, queue, "putting back messages a cancelled consumer did not get");
        }
        self.shared.local_writes.fetch_add(1, Ordering::AcqRel);
        self.credit.notify_waiters();
        self.shared.wake.notify_waiters();
    }

    /// Ack (`requeue == None`) or reject one tag or every tag up to it.
    async fn settle(&self, tag: u64, multiple: bool, requeue: Option<bool>) -> Result<(), Error> {
        let items: Vec<(i64, String)> = {
            let mut st = self.lock()?;
            if multiple {
                let rest = st.unacked.split_off(&(tag + 1));
                std::mem::replace(&mut st.unacked, rest)
                    .into_values()
                    .map(|(id, q, _)| (id, q))
                    .collect()
            } else {
                match st.unacked.remove(&tag) {
                    Some((id, q, _)) => vec![(id, q)],
                    None => {
                        drop(st);
                        return Err(self.soft_error(BrokerError::UnknownDeliveryTag { tag }.into()));
                    }
                }
            }
        };
        if items.is_empty() {
            self.credit.notify_waiters();
            return Ok(());
        }
        match requeue {
            None => {
                let ids: Vec<i64> = items.iter().map(|(id, _)| *id).collect();
                // Queued before any later take of this connection, so the freed credit can
                // be used at once.
                let r = self.shared.send(Op::Ack { ids });
                self.credit.notify_waiters();
                r
            }
            Some(requeue) => {
                let r = self
                    .shared
                    .write(move |tx, topo| store::reject(tx, topo, &items, requeue))
                    .await;
                // Only now: a requeued message must be back before the consumer takes more.
                self.shared.local_writes.fetch_add(1, Ordering::AcqRel);
                self.credit.notify_waiters();
                self.shared.wake.notify_waiters();
                r
            }
        }
    }
}

impl TransportChannel for SqliteChannel {
    fn exchange_declare<'a>(
        &'a self,
        name: &'a str,
        kind: &'a str,
        flags: ExchangeFlags,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.check_open()?;
            let (name, kind, args) = (name.to_owned(), kind.to_owned(), arguments.clone());
            let opts = ExchangeOptions {
                passive: flags.passive,
                durable: flags.durable,
                auto_delete: flags.auto_delete,
                internal: flags.internal,
            };
            self.w(move |tx, topo| store::declare_exchange(tx, topo, &name, &kind, opts, &args))
                .await
        })
    }
    fn exchange_delete<'a>(
        &'a self,
        name: &'a str,
        if_unused: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.check_open()?;
            let name = name.to_owned();
            self.w(move |tx, topo| store::delete_exchange(tx, topo, &name, if_unused))
                .await
        })
    }
    fn exchange_bind<'a>(
        &'a self,
        destination: &'a str,
        source: &'a str,
        routing_key: &'a str,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        self.binding(source, destination, true, routing_key, arguments, false)
    }
    fn exchange_unbind<'a>(
        &'a self,
        destination: &'a str,
        source: &'a str,
        routing_key: &'a str,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        self.binding(source, destination, true, routing_key, arguments, true)
    }
    fn queue_declare<'a>(
        &'a self,
        name: &'a str,
        flags: QueueFlags,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<QueueDeclared, Error>> {
        Box::pin(async move {
            self.check_open()?;
            let name = if name.is_empty() {
                format!("amq.gen-{}", crate::ids::uuid4())
            } else {
                name.to_owned()
            };
            let owner = self.shared.owner.clone();
            let (n, args) = (name.clone(), arguments.clone());
            let d = self
                .w(move |tx, topo| {
                    store::declare_queue(
                        tx,
                        topo,
                        &owner,
                        &n,
                        flags.passive,
                        flags.durable,
                        flags.exclusive,
                        flags.auto_delete,
                        &args,
                    )
                })
                .await?;
            let consumers = self
                .shared
                .consumers
                .lock()
                .ok()
                .and_then(|c| c.get(&name).copied())
                .unwrap_or(0);
            Ok(QueueDeclared {
                name,
                message_count: d.message_count,
                consumer_count: u32::try_from(consumers).unwrap_or(u32::MAX),
            })
        })
    }
    fn queue_bind<'a>(
        &'a self,
        queue: &'a str,
        exchange: &'a str,
        routing_key: &'a str,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        self.binding(exchange, queue, false, routing_key, arguments, false)
    }
    fn queue_unbind<'a>(
        &'a self,
        queue: &'a str,
        exchange: &'a str,
        routing_key: &'a str,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        self.binding(exchange, queue, false, routing_key, arguments, true)
    }
    fn queue_purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u32, Error>> {
        Box::pin(async move {
            self.check_open()?;
            let queue = queue.to_owned();
            let owner = self.shared.owner.clone();
            self.w(move |tx, topo| {
                store::check_owner(topo, &queue, &owner)?;
                if !topo.queues.contains_key(&queue) {
                    return Err(BrokerError::NotFound {
                        kind: EntityKind::Queue,
                        name: queue.clone(),
                    }
                    .into());
                }
                store::purge(tx, &queue)
            })
            .await
        })
    }
    fn queue_delete<'a>(
        &'a self,
        queue: &'a str,
        if_unused: bool,
        if_empty: bool,
    ) -> BoxFuture<'a, Result<u32, Error>> {
        Box::pin(async move {
            self.check_open()?;
            let in_use = self
                .shared
                .consumers
                .lock()
                .ok()
                .and_then(|c| c.get(queue).copied())
                .unwrap_or(0);
            if if_unused && in_use > 0 {
                return Err(BrokerError::InUse {
                    kind: EntityKind::Queue,
                    name: queue.to_owned(),
                }
                .into());
            }
            let q = queue.to_owned();
            let owner = self.shared.owner.clone();
            let n = self
                .w(move |tx, topo| {
                    store::check_owner(topo, &q, &owner)?;
                    store::delete_queue(tx, topo, &q, if_empty)
                })
                .await?;
            // Consumers here notice at their next look; wake them now.
            self.shared.local_writes.fetch_add(1, Ordering::AcqRel);
            self.shared.wake.notify_waiters();
            Ok(n)
        })
    }
    fn publish<'a>(
        &'a self,
        exchange: &'a str,
        routing_key: &'a str,
        mandatory: bool,
        properties: BasicProperties,
        body: Bytes,
    ) -> BoxFuture<'a, Result<PublishOutcome, Error>> {
        Box::pin(async move {
            self.check_open()?;
            let msg = MessageData::new(exchange, routing_key, properties, body);
            let stored = self
                .shared
                .publish(msg.clone())
                .await
                .map_err(|e| self.soft_error(e))?;
            let confirm = self.confirm.load(Ordering::Acquire);
            match stored {
                store::Stored::Routed => {
                    self.shared.local_writes.fetch_add(1, Ordering::AcqRel);
                    self.shared.wake.notify_waiters();
                }
                store::Stored::Refused => {
                    self.shared.local_writes.fetch_add(1, Ordering::AcqRel);
                    self.shared.wake.notify_waiters();
                    if confirm {
                        return Ok(PublishOutcome::Nacked);
                    }
                }
                store::Stored::Unroutable if mandatory => {
                    if confirm {
                        return Err(Error::Returned {
                            reply_code: 312,
                            reply_text: "NO_ROUTE".into(),
                            exchange: msg.exchange.to_string(),
                            routing_key: msg.routing_key.to_string(),
                        });
                    }
                    let _ = self.returns_tx.send(RawReturn {
                        reply_code: 312,
                        reply_text: "NO_ROUTE".into(),
                        exchange: msg.exchange.to_string(),
                        routing_key: msg.routing_key.to_string(),
                        properties: msg.properties,
                        body: msg.body,
                    });
                }
                store::Stored::Unroutable => {}
            }
            Ok(if confirm {
                PublishOutcome::Acked
            } else {
                PublishOutcome::Sent
            })
        })
    }
    fn get<'a>(
        &'a self,
        queue: &'a str,
        no_ack: bool,
    ) -> BoxFuture<'a, Result<Option<RawDelivery>, Error>> {
        Box::pin(async move {
            self.check_open()?;
            let (q, owner, lease) = (
                queue.to_owned(),
                self.shared.owner.clone(),
                self.shared.lease_ms(),
            );
            let taken = self
                .w(move |tx, topo| store::take(tx, topo, &q, &owner, 1, lease, no_ack))
                .await?;
            Ok(self
                .register(queue, taken, no_ack, None)
                .into_iter()
                .next()
                .map(|(tag, t)| raw_delivery(tag, t, "")))
        })
    }
    fn consume<'a>(
        &'a self,
        queue: &'a str,
        spec: ConsumeSpec,
    ) -> BoxFuture<'a, Result<(String, DeliveryStream), Error>> {
        Box::pin(async move {
            self.check_open()?;
            // The queue must exist.
            let q = queue.to_owned();
            let owner = self.shared.owner.clone();
            let single_active = self
                .w(move |_tx, topo| {
                    store::check_owner(topo, &q, &owner)?;
                    if let Some(meta) = topo.queues.get(&q) {
                        Ok(meta.args.single_active_consumer)
                    } else {
                        Err(BrokerError::NotFound {
                            kind: EntityKind::Queue,
                            name: q.clone(),
                        }
                        .into())
                    }
                })
                .await?;
            let (tag, rx) = {
                let mut st = self.lock()?;
                let tag = if spec.tag.is_empty() {
                    format!(
                        "kelp.sqlite.{}.{}",
                        self.id,
                        st.next_tag + st.consumers.len() as u64 + 1
                    )
                } else {
                    spec.tag.clone()
                };
                if st.consumers.iter().any(|(t, _)| *t == tag) {
                    return Err(BrokerError::ConsumerTagInUse { tag }.into());
                }
                let cap = usize::from(st.prefetch).clamp(16, 1024);
                let (tx, rx) = mpsc::channel(cap);
                let prefetch = if spec.no_ack { 0 } else { st.prefetch };
                let reg = NEXT_REG.fetch_add(1, Ordering::Relaxed);
                let priority = spec
                    .arguments
                    .get("x-priority")
                    .and_then(kelp_amqp::FieldValue::as_i64)
                    .unwrap_or(0);
                let room = Arc::new(AtomicBool::new(true));
                let served = Arc::new(AtomicU64::new(0));
                if let Ok(mut regs) = self.shared.regs.lock() {
                    let list = regs.entry(queue.to_owned()).or_default();
                    // A newcomer starts level with the others, not ahead of them.
                    let level = list
                        .iter()
                        .map(|r| r.served.load(Ordering::Acquire))
                        .min()
                        .unwrap_or(0);
                    served.store(level, Ordering::Release);
                    list.push(Reg {
                        id: reg,
                        priority,
                        room: room.clone(),
                        served: served.clone(),
                    });
                }
                st.consumers.push((
                    tag.clone(),
                    Entry {
                        queue: queue.to_owned(),
                        no_ack: spec.no_ack,
                        prefetch,
                        tx,
                        reg,
                        priority,
                        single_active,
                        room,
                        served,
                    },
                ));
                (tag, rx)
            };
            if let Ok(mut c) = self.shared.consumers.lock() {
                *c.entry(queue.to_owned()).or_insert(0) += 1;
            }
            self.ensure_pump();
            let mut rx = rx;
            let stream: DeliveryStream =
                Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
            Ok((tag, stream))
        })
    }
    fn cancel<'a>(&'a self, consumer_tag: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if let Some(queue) = self.forget_consumer(consumer_tag) {
                self.auto_delete_if_unused(&queue).await?;
            }
            self.credit.notify_waiters();
            Ok(())
        })
    }
    fn ack(&self, delivery_tag: u64, multiple: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { self.settle(delivery_tag, multiple, None).await })
    }
    fn nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { self.settle(delivery_tag, multiple, Some(requeue)).await })
    }
    fn reject(&self, delivery_tag: u64, requeue: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { self.settle(delivery_tag, false, Some(requeue)).await })
    }
    fn recover(&self, _requeue: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let last = self.lock()?.unacked.keys().next_back().copied();
            match last {
                Some(t) => self.settle(t, true, Some(true)).await,
                None => Ok(()),
            }
        })
    }
    fn qos(&self, prefetch_count: u16, global: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let mut st = self.lock()?;
            if global {
                st.prefetch_global = prefetch_count;
            } else {
                st.prefetch = prefetch_count;
            }
            drop(st);
            self.credit.notify_waiters();
            Ok(())
        })
    }
    fn flow(&self, _active: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            Err(Error::NotSupported {
                transport: "sqlite",
                what: "channel.flow",
            })
        })
    }
    fn confirm_select(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.confirm.store(true, Ordering::Release);
            Ok(())
        })
    }
    fn tx_select(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            Err(Error::NotSupported {
                transport: "sqlite",
                what: "transactions",
            })
        })
    }
    fn tx_commit(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.tx_select()
    }
    fn tx_rollback(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.tx_select()
    }
    fn take_returns(&self) -> Option<mpsc::UnboundedReceiver<RawReturn>> {
        self.returns_rx.lock().ok()?.take()
    }
    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if self.closed.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
            let queues = self.drop_consumers();
            // The consumer loop is not cut off mid-take (no_ack messages it is taking are
            // already deleted from the file): it finishes the take, finds the consumers gone,
            // gives the messages back and ends. Aborted only if it does not end in time.
            let pump = self.pump.lock().ok().and_then(|mut p| p.take());
            if let Some(h) = pump {
                let abort = h.abort_handle();
                self.credit.notify_waiters();
                if tokio::time::timeout(Duration::from_secs(5), h)
                    .await
                    .is_err()
                {
                    tracing::warn!("sqlite consumer loop did not end with its channel");
                    abort.abort();
                }
            }
            let ids = self.take_unacked_ids();
            if !ids.is_empty() {
                self.shared
                    .write(move |tx, _| store::release(tx, &ids))
                    .await?;
                self.shared.local_writes.fetch_add(1, Ordering::AcqRel);
                self.shared.wake.notify_waiters();
            }
            for q in queues {
                self.auto_delete_if_unused(&q).await?;
            }
            Ok(())
        })
    }
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.shared.is_closed()
    }
    fn transport(&self) -> &'static str {
        "sqlite"
    }
}

impl SqliteChannel {
    fn binding<'a>(
        &'a self,
        source: &'a str,
        destination: &'a str,
        to_exchange: bool,
        key: &'a str,
        args: &'a FieldTable,
        unbind: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.check_open()?;
            let (s, d, k, a) = (
                source.to_owned(),
                destination.to_owned(),
                key.to_owned(),
                args.clone(),
            );
            let owner = self.shared.owner.clone();
            self.w(move |tx, topo| {
                if !to_exchange {
                    store::check_owner(topo, &d, &owner)?;
                }
                store::bind(tx, topo, &s, &d, to_exchange, &k, &a, unbind)
            })
            .await
        })
    }

    /// An auto-delete queue goes with its last consumer (in this process).
    async fn auto_delete_if_unused(&self, queue: &str) -> Result<(), Error> {
        let left = self
            .shared
            .consumers
            .lock()
            .ok()
            .and_then(|c| c.get(queue).copied())
            .unwrap_or(0);
        if left > 0 {
            return Ok(());
        }
        let q = queue.to_owned();
        self.shared
            .write(move |tx, topo| {
                if topo.queues.get(&q).is_some_and(|m| m.auto_delete) {
                    store::delete_queue(tx, topo, &q, false)?;
                }
                Ok(())
            })
            .await
    }
}
