//! `redis://`: Redis, with the same keys and message envelope as Kombu's Redis transport, so
//! Python peers (Kombu, Celery) read what kelp writes and the reverse.
//!
//! The layout, as Kombu 5.7 writes it (`kombu/transport/redis.py`):
//!
//! - a queue is a list per priority step (`queue`, `queue\x06\x163`, …); publish is `LPUSH`,
//!   consume is `BRPOP` over every consumed queue, step 0 first (on Redis a *lower* priority
//!   number is served first, as in Kombu), rotating the queues so each gets its turn;
//! - each list entry is Kombu's JSON envelope ([`envelope`]);
//! - bindings are the set `_kombu.binding.<exchange>` (and `_kombu.binding_permanent.<exchange>`)
//!   of `routing_key\x06\x16pattern\x06\x16queue`, the pattern being Kombu's regex for topic
//!   bindings; direct and topic routing read them on every publish, so every process sees the
//!   same bindings;
//! - fanout exchanges go through PUB/SUB (`/<db>.<exchange>[/<routing_key>]`): only consumers
//!   listening at the time get the message;
//! - a delivered, unacknowledged message sits in the hash `unacked` (tag → `[envelope,
//!   exchange, routing_key]`) and the sorted set `unacked_index` (tag → time); ack removes it,
//!   reject with requeue puts it back with `redelivered` set (`LPUSH`: after what is queued),
//!   closing the channel puts its unacked messages back (`RPUSH`: served next), and any process
//!   restores messages left unacknowledged longer than `visibility_timeout` (default 1 h; the
//!   `unacked_mutex` lock keeps two processes from doing it at once).
//!
//! Exchange types live in the process that declares them (as in Kombu); a publisher that did
//! not declare an exchange routes by the stored bindings (a binding with a pattern is a topic
//! binding). There are no headers exchanges, exchange-to-exchange bindings, TTLs or
//! dead-lettering on Redis (Kombu has none either): those calls return
//! [`Error::NotSupported`].

mod acks;
mod connect;
pub mod envelope;
pub mod keys;
mod scripts;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kelp_amqp::{BasicProperties, FieldTable, FieldValue, ShortString};
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, watch, Notify};

pub use keys::RedisOptions;

use super::virtual_broker::{BrokerError, EntityKind};
use super::{
    BoxFuture, ConsumeSpec, DeliveryStream, ExchangeFlags, PublishOutcome, QueueDeclared,
    QueueFlags, RawDelivery, RawReturn, Transport, TransportChannel,
};
use crate::error::Error;

fn rerr(context: &'static str) -> impl FnOnce(redis::RedisError) -> Error {
    move |e| Error::Redis {
        context,
        source: Arc::new(e),
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn not_supported(what: &'static str) -> Error {
    Error::NotSupported {
        transport: "redis",
        what,
    }
}

fn not_found(kind: EntityKind, name: &str) -> Error {
    Error::Broker(BrokerError::NotFound {
        kind,
        name: name.to_owned(),
    })
}

/// What this process knows of an exchange.
#[derive(Debug, Clone)]
struct ExchangeMeta {
    kind: String,
}

/// One connection to Redis.
#[derive(Debug)]
struct Shared {
    opts: RedisOptions,
    client: redis::Client,
    conn: MultiplexedConnection,
    exchanges: Mutex<HashMap<String, ExchangeMeta>>,
    /// Queues bound to fanout exchanges: queue → (exchange, routing key pattern).
    fanout_queues: Mutex<HashMap<String, (String, String)>>,
    /// Queue bindings declared here, to remove them when the queue is deleted.
    bindings: Mutex<Vec<(String, String, String)>>,
    declared: Mutex<HashSet<String>>,
    /// Open channels, to close (and requeue their unacked messages) with the connection.
    channels: Mutex<Vec<Weak<RedisChannel>>>,
    closed: watch::Sender<Option<Error>>,
    next_channel: AtomicU64,
    /// Acks (and rejects) waiting to be written, coalesced.
    acks: acks::AckQueue,
}

/// The most messages one take ([`scripts`]) moves, whatever the prefetch window.
const TAKE_MAX: usize = 256;

/// A message taken off one of a queue's lists.
#[derive(Debug)]
struct Taken {
    /// The list it came from.
    key: String,
    raw: Bytes,
    /// Its Kombu delivery tag, if the take already recorded it in `unacked`.
    recorded: Option<String>,
}

impl Shared {
    fn conn(&self) -> MultiplexedConnection {
        self.conn.clone()
    }

    fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    /// A connection error closes the transport (a robust connection then reconnects); other
    /// errors pass through.
    fn note(&self, e: Error) -> Error {
        if e.is_connection_error() {
            self.closed.send_if_modified(|c| {
                if c.is_none() {
                    tracing::warn!(error = %e, "Redis connection lost");
                    *c = Some(e.clone());
                    true
                } else {
                    false
                }
            });
        }
        e
    }

    fn kind_of(&self, exchange: &str) -> Option<String> {
        self.exchanges
            .lock()
            .ok()
            .and_then(|m| m.get(exchange).map(|e| e.kind.clone()))
    }

    /// The queues a publish to `exchange` with `routing_key` goes to (Kombu's `_lookup`).
    async fn lookup(&self, exchange: &str, routing_key: &str) -> Result<Vec<String>, Error> {
        if exchange.is_empty() {
            return Ok(vec![routing_key.to_owned()]);
        }
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.opts.binding_key(exchange))
            .query_async(&mut self.conn())
            .await
            .map_err(rerr("reading bindings"))?;
        let kind = self.kind_of(exchange);
        let mut out: Vec<String> = Vec::new();
        for m in &members {
            let Some((rkey, pattern, queue)) = keys::parse_binding(m) else {
                continue;
            };
            let hit = match kind.as_deref() {
                Some("fanout") => true,
                Some("topic") => keys::topic_matches(rkey, routing_key),
                Some(_) => rkey == routing_key,
                // Not declared here: a binding with a pattern is a topic binding.
                None if !pattern.is_empty() => keys::topic_matches(rkey, routing_key),
                None => rkey == routing_key,
            };
            if hit && !out.iter().any(|q| q == queue) {
                out.push(queue.to_owned());
            }
        }
        Ok(out)
    }

    /// Put an envelope back on every queue its exchange routes it to, marked redelivered,
    /// and drop it from the unacked indices, atomically (`restore_by_tag`).
    async fn restore_by_tag(&self, tag: &str, leftmost: bool) -> Result<bool, Error> {
        let unacked = self.opts.key("unacked");
        let index = self.opts.key("unacked_index");
        let mut conn = self.conn();
        let entry: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(&unacked)
            .arg(tag)
            .query_async(&mut conn)
            .await
            .map_err(rerr("reading an unacked message"))?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("ZREM").arg(&index).arg(tag).ignore();
        pipe.cmd("HDEL").arg(&unacked).arg(tag).ignore();
        let mut restored = false;
        if let Some(entry) = entry {
            if let Ok(serde_json::Value::Array(parts)) =
                serde_json::from_slice::<serde_json::Value>(&entry)
            {
                let envelope = parts.first().map(|v| v.to_string()).unwrap_or_default();
                let exchange = parts.get(1).and_then(|v| v.as_str()).unwrap_or("");
                let rk = parts.get(2).and_then(|v| v.as_str()).unwrap_or("");
                let marked = envelope::mark_redelivered(&envelope);
                let step = self.opts.step_for(envelope::priority_of(marked.as_bytes()));
                for q in self.lookup(exchange, rk).await? {
                    let cmd = if leftmost { "LPUSH" } else { "RPUSH" };
                    pipe.cmd(cmd)
                        .arg(self.opts.queue_key(&q, step))
                        .arg(&marked)
                        .ignore();
                    restored = true;
                }
            }
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(rerr("restoring a message"))?;
        Ok(restored)
    }

    /// Kombu's `restore_visible`: under `unacked_mutex`, put back messages unacknowledged for
    /// longer than the visibility timeout.
    async fn restore_visible(&self) -> Result<usize, Error> {
        let mut conn = self.conn();
        let mutex = self.opts.key("unacked_mutex");
        let me = envelope::uuid4();
        let got: Option<String> = redis::cmd("SET")
            .arg(&mutex)
            .arg(&me)
            .arg("NX")
            .arg("EX")
            .arg(300)
            .query_async(&mut conn)
            .await
            .map_err(rerr("taking unacked_mutex"))?;
        if got.is_none() {
            return Ok(0);
        }
        let ceil = now_secs() - self.opts.visibility_timeout.as_secs_f64();
        let tags: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.opts.key("unacked_index"))
            .arg(ceil)
            .arg(0)
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(10)
            .query_async(&mut conn)
            .await
            .map_err(rerr("listing unacked messages"))?;
        let mut n = 0;
        for tag in &tags {
            if self.restore_by_tag(tag, false).await? {
                n += 1;
            }
        }
        // Release only our own lock.
        let holder: Option<String> = redis::cmd("GET")
            .arg(&mutex)
            .query_async(&mut conn)
            .await
            .map_err(rerr("reading unacked_mutex"))?;
        if holder.as_deref() == Some(me.as_str()) {
            let _: () = redis::cmd("DEL")
                .arg(&mutex)
                .query_async(&mut conn)
                .await
                .map_err(rerr("releasing unacked_mutex"))?;
        }
        if n > 0 {
            tracing::info!(
                restored = n,
                "restored messages past the visibility timeout"
            );
        }
        Ok(n)
    }
}

/// A connection to Redis speaking Kombu's layout (see the [module docs](self)).
#[derive(Debug)]
pub struct RedisTransport {
    shared: Arc<Shared>,
}

impl RedisTransport {
    /// Connect to `url` (`redis://[[user]:password@]host[:port][/db][?options]`).
    pub async fn connect(
        url: &str,
        options: &crate::connection::ConnectOptions,
    ) -> Result<Self, Error> {
        let opts = RedisOptions::parse(url)?;
        let (client, conn) = connect::open(url, &opts, options).await?;
        let shared = Arc::new_cyclic(|me: &Weak<Shared>| Shared {
            acks: acks::AckQueue::start(
                me.clone(),
                conn.clone(),
                opts.key("unacked_index"),
                opts.key("unacked"),
            ),
            opts,
            client,
            conn,
            exchanges: Mutex::new(
                [
                    ("amq.direct", "direct"),
                    ("amq.topic", "topic"),
                    ("amq.fanout", "fanout"),
                ]
                .into_iter()
                .map(|(n, k)| (n.to_owned(), ExchangeMeta { kind: k.to_owned() }))
                .collect(),
            ),
            channels: Mutex::new(Vec::new()),
            fanout_queues: Mutex::new(HashMap::new()),
            bindings: Mutex::new(Vec::new()),
            declared: Mutex::new(HashSet::new()),
            closed: watch::channel(None).0,
            next_channel: AtomicU64::new(1),
        });
        // Any live process restores what a dead consumer left unacknowledged.
        let weak = Arc::downgrade(&shared);
        let every = (shared.opts.visibility_timeout / 4)
            .clamp(Duration::from_millis(200), Duration::from_secs(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(s) = weak.upgrade() else { return };
                if s.is_closed() {
                    return;
                }
                if let Err(e) = s.restore_visible().await {
                    tracing::debug!(error = %e, "restore_visible");
                }
            }
        });
        Ok(RedisTransport { shared })
    }

    /// The transport options in effect.
    pub fn options(&self) -> &RedisOptions {
        &self.shared.opts
    }
}

impl Transport for RedisTransport {
    fn name(&self) -> &'static str {
        "redis"
    }
    fn open_channel(&self) -> BoxFuture<'_, Result<Arc<dyn TransportChannel>, Error>> {
        Box::pin(async move {
            if self.shared.is_closed() {
                return Err(Error::Closed { what: "connection" });
            }
            let id = self.shared.next_channel.fetch_add(1, Ordering::Relaxed);
            let ch = RedisChannel::new(self.shared.clone(), id);
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
            let channels: Vec<Arc<RedisChannel>> = self
                .shared
                .channels
                .lock()
                .map(|c| c.iter().filter_map(Weak::upgrade).collect())
                .unwrap_or_default();
            for ch in channels {
                if let Err(e) = TransportChannel::close(&*ch).await {
                    tracing::warn!(error = %e, "closing a channel with its connection");
                }
            }
            self.shared.closed.send_if_modified(|c| {
                if c.is_none() {
                    *c = Some(Error::Closed { what: "connection" });
                    true
                } else {
                    false
                }
            });
            Ok(())
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

/// A delivered message waiting for its ack.
#[derive(Debug)]
struct Pending {
    tag: String,
}

#[derive(Debug)]
struct ConsumerEntry {
    queue: String,
    no_ack: bool,
    tx: mpsc::Sender<Result<RawDelivery, Error>>,
}

/// How many messages the prefetch window must have room for before the consumer loop
/// takes more: a quarter of it, so a window emptied one ack at a time is refilled in batches
/// rather than a message per round trip.
fn low_water(prefetch: u16) -> usize {
    (usize::from(prefetch) / 4).max(1)
}

#[derive(Debug, Default)]
struct ChanState {
    next_tag: u64,
    unacked: BTreeMap<u64, Pending>,
    prefetch: u16,
    consumers: Vec<(String, ConsumerEntry)>,
    /// Rotation of consumed queues (Kombu's round-robin cycle).
    cycle: VecDeque<String>,
    next_consumer: u64,
}

/// A channel on Redis.
#[derive(Debug)]
pub struct RedisChannel {
    shared: Arc<Shared>,
    id: u64,
    me: Weak<RedisChannel>,
    state: Mutex<ChanState>,
    /// Prefetch credit freed, or consumers changed.
    wake: Notify,
    confirm: AtomicBool,
    closed: AtomicBool,
    pump: Mutex<Option<tokio::task::JoinHandle<()>>>,
    fanout: Mutex<Option<tokio::task::JoinHandle<()>>>,
    returns_tx: mpsc::UnboundedSender<RawReturn>,
    returns_rx: Mutex<Option<mpsc::UnboundedReceiver<RawReturn>>>,
}

impl Drop for RedisChannel {
    fn drop(&mut self) {
        // The consumer loop is not aborted: a BRPOP in flight may already have taken a
        // message, which the loop puts back when it returns and finds the channel gone.
        if let Ok(mut p) = self.fanout.lock() {
            if let Some(h) = p.take() {
                h.abort();
            }
        }
        // Unacked messages go back (served next), as Kombu does when a channel closes.
        let tags: Vec<String> = match self.state.lock() {
            Ok(mut s) => std::mem::take(&mut s.unacked)
                .into_values()
                .map(|p| p.tag)
                .collect(),
            Err(_) => Vec::new(),
        };
        if !tags.is_empty() {
            let shared = self.shared.clone();
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    for t in tags {
                        if let Err(e) = shared.restore_by_tag(&t, false).await {
                            tracing::warn!(error = %e, "could not restore an unacked message");
                        }
                    }
                });
            }
        }
    }
}

fn queue_of_key(opts: &RedisOptions, key: &str) -> String {
    let key = key.strip_prefix(&opts.global_keyprefix).unwrap_or(key);
    match key.rsplit_once(keys::SEP) {
        Some((q, step)) if step.parse::<u8>().is_ok() => q.to_owned(),
        _ => key.to_owned(),
    }
}

impl ChanState {
    /// How many messages the consumer loop may take now (0 below the low-water mark).
    fn room(&self) -> usize {
        if self.prefetch == 0 {
            return TAKE_MAX;
        }
        let room = usize::from(self.prefetch).saturating_sub(self.unacked.len());
        if room < low_water(self.prefetch) {
            0
        } else {
            room.min(TAKE_MAX)
        }
    }
}

impl RedisChannel {
    fn new(shared: Arc<Shared>, id: u64) -> Arc<RedisChannel> {
        let (returns_tx, returns_rx) = mpsc::unbounded_channel();
        Arc::new_cyclic(|me| RedisChannel {
            shared,
            id,
            me: me.clone(),
            state: Mutex::new(ChanState::default()),
            wake: Notify::new(),
            confirm: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            pump: Mutex::new(None),
            fanout: Mutex::new(None),
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

    /// Record a delivery as unacked in Redis; returns its Kombu delivery tag.
    async fn record_unacked(
        &self,
        raw: &[u8],
        decoded: &Result<envelope::Decoded, envelope::EnvelopeError>,
    ) -> Result<String, Error> {
        let (kombu_tag, ex, rk) = match decoded {
            Ok(d) if !d.tag.is_empty() => {
                (d.tag.clone(), d.exchange.clone(), d.routing_key.clone())
            }
            Ok(d) => (envelope::uuid4(), d.exchange.clone(), d.routing_key.clone()),
            Err(_) => (envelope::uuid4(), String::new(), String::new()),
        };
        // `[envelope, exchange, routing_key]`, the envelope as JSON (a string if the entry was
        // not JSON, so nothing is lost).
        let text = String::from_utf8_lossy(raw);
        let first = if serde_json::from_slice::<serde::de::IgnoredAny>(raw).is_ok() {
            text.into_owned()
        } else {
            serde_json::Value::String(text.into_owned()).to_string()
        };
        let entry = format!(
            "[{first}, {}, {}]",
            serde_json::Value::String(ex),
            serde_json::Value::String(rk)
        );
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(self.shared.opts.key("unacked_index"))
            .arg(now_secs())
            .arg(&kombu_tag)
            .ignore();
        pipe.cmd("HSET")
            .arg(self.shared.opts.key("unacked"))
            .arg(&kombu_tag)
            .arg(entry)
            .ignore();
        pipe.query_async::<()>(&mut self.shared.conn())
            .await
            .map_err(rerr("recording an unacked message"))?;
        Ok(kombu_tag)
    }

    /// Give a taken message a channel tag, recording it as unacked (in Redis, unless the take
    /// did, and here) for a consumer that acknowledges.
    async fn track(
        &self,
        taken: &Taken,
        decoded: &Result<envelope::Decoded, envelope::EnvelopeError>,
        no_ack: bool,
    ) -> Result<u64, Error> {
        let kombu_tag = match (&taken.recorded, no_ack) {
            (Some(t), true) => {
                // Recorded for an acknowledging consumer that has gone since: forget it.
                self.shared.acks.remove(t.clone()).await?;
                None
            }
            (Some(t), false) => Some(t.clone()),
            (None, true) => None,
            (None, false) => Some(self.record_unacked(&taken.raw, decoded).await?),
        };
        let mut st = self
            .state
            .lock()
            .map_err(|_| Error::Closed { what: "channel" })?;
        st.next_tag += 1;
        let tag = st.next_tag;
        if let Some(k) = kombu_tag {
            st.unacked.insert(tag, Pending { tag: k });
        }
        Ok(tag)
    }

    /// Put a taken message back at the consuming end of its list (and out of `unacked` if the
    /// take recorded it there), in one step.
    async fn put_back(&self, taken: &Taken) {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("RPUSH")
            .arg(&taken.key)
            .arg(&taken.raw[..])
            .ignore();
        if let Some(tag) = &taken.recorded {
            pipe.cmd("ZREM")
                .arg(self.shared.opts.key("unacked_index"))
                .arg(tag)
                .ignore();
            pipe.cmd("HDEL")
                .arg(self.shared.opts.key("unacked"))
                .arg(tag)
                .ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut self.shared.conn()).await {
            tracing::warn!(error = %e, list = %taken.key, "could not put a message back");
        }
    }

    /// What the consumer loop takes next: the queue rotation, how many messages the prefetch
    /// window has room for, and whether any consumer acknowledges.
    fn plan(&self) -> (Vec<String>, usize, bool) {
        self.state
            .lock()
            .map(|s| {
                let room = s.room();
                let track = s.consumers.iter().any(|(_, c)| !c.no_ack);
                (s.cycle.iter().cloned().collect(), room, track)
            })
            .unwrap_or_default()
    }

    /// Take what is waiting, up to `max` messages, with the take script ([`scripts`]) (one round trip).
    async fn take_ready(
        &self,
        conn: &mut MultiplexedConnection,
        queues: &[String],
        max: usize,
        track: bool,
    ) -> Result<Vec<Taken>, redis::RedisError> {
        let opts = &self.shared.opts;
        let script = scripts::take_ready();
        let mut call = script.prepare_invoke();
        call.key(opts.key("unacked")).key(opts.key("unacked_index"));
        for step in &opts.priority_steps {
            for q in queues {
                call.key(opts.queue_key(q, *step));
            }
        }
        call.arg(max)
            .arg(now_secs())
            .arg(if track { "1" } else { "0" })
            .arg(queues.len());
        let flat: Vec<Vec<u8>> = call.invoke_async(conn).await?;
        let mut out = Vec::with_capacity(flat.len() / 3);
        let mut it = flat.into_iter();
        while let (Some(key), Some(raw), Some(tag)) = (it.next(), it.next(), it.next()) {
            out.push(Taken {
                key: String::from_utf8_lossy(&key).into_owned(),
                raw: Bytes::from(raw),
                recorded: String::from_utf8(tag).ok().filter(|t| !t.is_empty()),
            });
        }
        Ok(out)
    }

    fn delivery(
        tag: u64,
        raw: &Bytes,
        decoded: Result<envelope::Decoded, envelope::EnvelopeError>,
        consumer_tag: &str,
        queue: &str,
    ) -> RawDelivery {
        match decoded {
            Ok(d) => RawDelivery {
                delivery_tag: tag,
                redelivered: d.redelivered,
                exchange: ShortString::from(d.exchange),
                routing_key: ShortString::from(d.routing_key),
                consumer_tag: ShortString::from(consumer_tag),
                properties: d.properties,
                body: d.body,
            },
            // Not an envelope: hand over the raw entry, marked, so `on_decode_error` sees it
            // and the entry stays in `unacked` until it is rejected.
            Err(e) => {
                let headers = FieldTable::default()
                    .with("x-kelp-envelope-error", FieldValue::from(e.to_string()))
                    .with("x-kelp-queue", FieldValue::from(queue.to_owned()));
                RawDelivery {
                    delivery_tag: tag,
                    redelivered: false,
                    exchange: ShortString::from(""),
                    routing_key: ShortString::from(queue),
                    consumer_tag: ShortString::from(consumer_tag),
                    properties: BasicProperties {
                        content_type: Some(super::INVALID_ENTRY_CONTENT_TYPE.into()),
                        headers: Some(headers),
                        ..Default::default()
                    },
                    body: raw.clone(),
                }
            }
        }
    }

    /// The consumer loop: take what is waiting (up to the prefetch window, in one round trip,
    /// recorded as unacked atomically); when nothing is, wait with `BRPOP` over the consumed
    /// queues; hand each message to its consumer.
    async fn pump(weak: Weak<RedisChannel>, mut conn: MultiplexedConnection) {
        // Off when the server refuses scripts (`EVAL` disabled or denied): BRPOP alone then.
        let mut scripts = true;
        loop {
            let Some(ch) = weak.upgrade() else { return };
            if ch.closed.load(Ordering::Acquire) || ch.shared.is_closed() {
                return;
            }
            let (queues, room, track) = ch.plan();
            if queues.is_empty() || room == 0 {
                let notified = ch.wake.notified();
                let (queues, room, _) = ch.plan();
                if queues.is_empty() || room == 0 {
                    // Re-check now and then even without a wake-up (a dropped channel).
                    let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                }
                continue;
            }
            if scripts {
                match ch.take_ready(&mut conn, &queues, room, track).await {
                    Ok(batch) if !batch.is_empty() => {
                        // Decode the whole batch first, then hand it over in one burst: the
                        // consumer wakes once and finds the messages waiting, instead of
                        // being woken (a thread wake-up) for each one.
                        let decoded: Vec<_> = batch
                            .into_iter()
                            .map(|t| {
                                let d = envelope::decode(&t.raw);
                                (t, d)
                            })
                            .collect();
                        for (taken, d) in decoded {
                            ch.dispatch_decoded(taken, d).await;
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                        let err = ch.shared.note(rerr("taking messages")(e));
                        ch.fail_consumers(err);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Redis refuses the take script: BRPOP only");
                        scripts = false;
                    }
                }
            }
            let opts = &ch.shared.opts;
            let mut cmd = redis::cmd("BRPOP");
            for step in &opts.priority_steps {
                for q in &queues {
                    cmd.arg(opts.queue_key(q, *step));
                }
            }
            cmd.arg(opts.brpop_timeout.as_secs_f64().max(0.01));
            let weak2 = Arc::downgrade(&ch);
            drop(ch);
            let got: Result<Option<(String, Vec<u8>)>, _> = cmd.query_async(&mut conn).await;
            let Some(ch) = weak2.upgrade() else {
                // The channel went while we waited: put the message back where it was.
                if let Ok(Some((key, raw))) = got {
                    let _: Result<(), _> = redis::cmd("RPUSH")
                        .arg(key)
                        .arg(raw)
                        .query_async(&mut conn)
                        .await;
                }
                return;
            };
            match got {
                Ok(None) => continue,
                Ok(Some((key, raw))) if ch.closed.load(Ordering::Acquire) => {
                    let _: Result<(), _> = redis::cmd("RPUSH")
                        .arg(key)
                        .arg(raw)
                        .query_async(&mut conn)
                        .await;
                    return;
                }
                Ok(Some((key, raw))) => {
                    ch.dispatch(Taken {
                        key,
                        raw: Bytes::from(raw),
                        recorded: None,
                    })
                    .await;
                }
                Err(e) => {
                    let err = rerr("waiting for messages")(e);
                    tracing::warn!(error = %err, "consumer loop");
                    if err.is_connection_error() {
                        let err = ch.shared.note(err);
                        ch.fail_consumers(err);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Give a taken message to one of its queue's consumers (rotating the queue cycle).
    async fn dispatch(&self, taken: Taken) {
        let decoded = envelope::decode(&taken.raw);
        self.dispatch_decoded(taken, decoded).await;
    }

    /// [`dispatch`](Self::dispatch) with the entry already decoded.
    async fn dispatch_decoded(
        &self,
        taken: Taken,
        decoded: Result<envelope::Decoded, envelope::EnvelopeError>,
    ) {
        let queue = queue_of_key(&self.shared.opts, &taken.key);
        let picked = {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            if let Some(i) = st.cycle.iter().position(|q| *q == queue) {
                if let Some(q) = st.cycle.remove(i) {
                    st.cycle.push_back(q);
                }
            }
            let n = st.consumers.len();
            let start = usize::try_from(st.next_consumer).unwrap_or(0);
            let mut found = None;
            for off in 0..n {
                let i = (start + off) % n.max(1);
                if let Some((tag, c)) = st.consumers.get(i) {
                    if c.queue == queue && !c.tx.is_closed() {
                        found = Some((tag.clone(), c.no_ack, c.tx.clone()));
                        st.next_consumer = u64::try_from(i + 1).unwrap_or(0);
                        break;
                    }
                }
            }
            found
        };
        let Some((ctag, no_ack, tx)) = picked else {
            // Nobody consumes it any more: back to the consuming end.
            self.put_back(&taken).await;
            return;
        };
        let tag = match self.track(&taken, &decoded, no_ack).await {
            Ok(t) => t,
            Err(e) => {
                self.put_back(&taken).await;
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let d = Self::delivery(tag, &taken.raw, decoded, &ctag, &queue);
        if tx.send(Ok(d)).await.is_err() {
            // The consumer's stream is gone: its message goes back, and so does it.
            if no_ack {
                self.put_back(&Taken {
                    recorded: None,
                    ..taken
                })
                .await;
            } else {
                let _ = self.settle(tag, false, Some(true)).await;
            }
            if let Ok(mut st) = self.state.lock() {
                st.consumers.retain(|(t, _)| *t != ctag);
                let live: HashSet<String> =
                    st.consumers.iter().map(|(_, c)| c.queue.clone()).collect();
                st.cycle.retain(|q| live.contains(q));
            }
        }
    }

    fn fail_consumers(&self, e: Error) {
        if let Ok(st) = self.state.lock() {
            for (_, c) in &st.consumers {
                let _ = c.tx.try_send(Err(e.clone()));
            }
        }
    }

    fn ensure_pump(&self) -> Result<(), Error> {
        let mut slot = self
            .pump
            .lock()
            .map_err(|_| Error::Closed { what: "channel" })?;
        if slot.as_ref().is_some_and(|h| !h.is_finished()) {
            self.wake.notify_waiters();
            return Ok(());
        }
        let weak = self.me.clone();
        let client = self.shared.client.clone();
        *slot = Some(tokio::spawn(async move {
            // BRPOP blocks its connection: the loop gets one of its own.
            // No response timeout: BRPOP answers after up to `brpop_timeout`.
            let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
            match client
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                Ok(conn) => RedisChannel::pump(weak, conn).await,
                Err(e) => {
                    if let Some(ch) = weak.upgrade() {
                        ch.fail_consumers(rerr("connecting the consumer")(e));
                    }
                }
            }
        }));
        Ok(())
    }

    /// (Re)start the PUB/SUB listener for consumed queues bound to fanout exchanges.
    fn refresh_fanout(&self) {
        let patterns: Vec<(String, String)> = {
            let fq = match self.shared.fanout_queues.lock() {
                Ok(f) => f.clone(),
                Err(_) => return,
            };
            let st = match self.state.lock() {
                Ok(s) => s,
                Err(_) => return,
            };
            st.consumers
                .iter()
                .filter_map(|(_, c)| {
                    fq.get(&c.queue)
                        .map(|(ex, rk)| (self.shared.opts.fanout_channel(ex, rk), c.queue.clone()))
                })
                .collect()
        };
        let Ok(mut slot) = self.fanout.lock() else {
            return;
        };
        if let Some(h) = slot.take() {
            h.abort();
        }
        if patterns.is_empty() {
            return;
        }
        let weak = self.me.clone();
        let client = self.shared.client.clone();
        let prefix_len = self.shared.opts.global_keyprefix.len();
        *slot = Some(tokio::spawn(async move {
            let mut ps = match client.get_async_pubsub().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "fanout subscription");
                    return;
                }
            };
            for (p, _) in &patterns {
                if let Err(e) = ps.psubscribe(p).await {
                    tracing::warn!(error = %e, pattern = %p, "fanout subscription");
                }
            }
            let mut stream = ps.into_on_message();
            use futures_util::StreamExt as _;
            while let Some(msg) = stream.next().await {
                let Some(ch) = weak.upgrade() else { return };
                let pattern: String = msg.get_pattern().unwrap_or_default();
                let Ok(payload) = msg.get_payload::<Vec<u8>>() else {
                    continue;
                };
                let payload = Bytes::from(payload);
                let _ = prefix_len;
                for (p, q) in &patterns {
                    if *p == pattern {
                        ch.dispatch(Taken {
                            key: ch.shared.opts.key(q),
                            raw: payload.clone(),
                            recorded: None,
                        })
                        .await;
                    }
                }
            }
        }));
    }

    /// Ack (`requeue == None`), reject or requeue one tag (or every tag up to it).
    async fn settle(&self, tag: u64, multiple: bool, requeue: Option<bool>) -> Result<(), Error> {
        let pending: Vec<Pending> = {
            let mut st = self
                .state
                .lock()
                .map_err(|_| Error::Closed { what: "channel" })?;
            let before = st.room();
            let pending = if multiple {
                let rest = st.unacked.split_off(&(tag + 1));
                let taken = std::mem::replace(&mut st.unacked, rest);
                taken.into_values().collect()
            } else {
                match st.unacked.remove(&tag) {
                    Some(p) => vec![p],
                    None => return Err(Error::Broker(BrokerError::UnknownDeliveryTag { tag })),
                }
            };
            // The consumer loop waits only while there is no room: wake it when there is.
            if before == 0 && st.room() > 0 {
                self.wake.notify_waiters();
            }
            pending
        };
        match requeue {
            Some(true) => {
                for p in &pending {
                    self.shared.restore_by_tag(&p.tag, true).await?;
                }
            }
            _ => {
                // Written in the background, coalesced with other acks ([`acks`]).
                for p in pending {
                    self.shared.acks.remove(p.tag).await?;
                }
            }
        }
        Ok(())
    }

    /// Remove `queue` from every `_kombu.binding*` set.
    async fn unbind_everywhere(&self, queue: &str) -> Result<(), Error> {
        let mut conn = self.shared.conn();
        let pattern = self.shared.opts.key("_kombu.binding*");
        let suffix = format!("{}{queue}", keys::SEP);
        let mut cursor: u64 = 0;
        loop {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(rerr("listing binding sets"))?;
            let binding = self.shared.opts.key("_kombu.binding.");
            let permanent = self.shared.opts.key("_kombu.binding_permanent.");
            // Only the binding sets: Kombu 5.7 also keeps `_kombu.binding_deadlines`, a
            // sorted set.
            for set in found
                .into_iter()
                .filter(|k| k.starts_with(&binding) || k.starts_with(&permanent))
            {
                let members: Vec<String> = match redis::cmd("SMEMBERS")
                    .arg(&set)
                    .query_async(&mut conn)
                    .await
                {
                    Ok(m) => m,
                    // Not a set after all (WRONGTYPE): not a binding set.
                    Err(e) if e.code() == Some("WRONGTYPE") => continue,
                    Err(e) => return Err(rerr("reading bindings")(e)),
                };
                let gone: Vec<&String> = members.iter().filter(|m| m.ends_with(&suffix)).collect();
                if !gone.is_empty() {
                    let _: () = redis::cmd("SREM")
                        .arg(&set)
                        .arg(gone)
                        .query_async(&mut conn)
                        .await
                        .map_err(rerr("removing bindings"))?;
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    async fn size(&self, queue: &str) -> Result<u32, Error> {
        let mut pipe = redis::pipe();
        for k in self.shared.opts.queue_keys(queue) {
            pipe.cmd("LLEN").arg(k);
        }
        let sizes: Vec<u64> = pipe
            .query_async(&mut self.shared.conn())
            .await
            .map_err(rerr("measuring a queue"))?;
        Ok(u32::try_from(sizes.iter().sum::<u64>()).unwrap_or(u32::MAX))
    }
}

impl TransportChannel for RedisChannel {
    fn exchange_declare<'a>(
        &'a self,
        name: &'a str,
        kind: &'a str,
        flags: ExchangeFlags,
        _arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.check_open()?;
            if !matches!(kind, "direct" | "topic" | "fanout") {
                return Err(not_supported(
                    "exchange types other than direct, topic and fanout",
                ));
            }
            let mut ex = self
                .shared
                .exchanges
                .lock()
                .map_err(|_| Error::Closed { what: "connection" })?;
            if flags.passive {
                return match ex.get(name) {
                    Some(_) => Ok(()),
                    None => Err(not_found(EntityKind::Exchange, name)),
                };
            }
            if let Some(prev) = ex.get(name) {
                if prev.kind != kind {
                    return Err(Error::Broker(BrokerError::Inequivalent {
                        kind: EntityKind::Exchange,
                        name: name.to_owned(),
                        argument: "type".into(),
                        received: kind.to_owned(),
                        current: prev.kind.clone(),
                    }));
                }
            }
            ex.insert(
                name.to_owned(),
                ExchangeMeta {
                    kind: kind.to_owned(),
                },
            );
            Ok(())
        })
    }
    fn exchange_delete<'a>(
        &'a self,
        name: &'a str,
        _if_unused: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.check_open()?;
            if let Ok(mut ex) = self.shared.exchanges.lock() {
                ex.remove(name);
            }
            let _: () = redis::cmd("DEL")
                .arg(self.shared.opts.binding_key(name))
                .arg(self.shared.opts.binding_permanent_key(name))
                .query_async(&mut self.shared.conn())
                .await
                .map_err(rerr("deleting an exchange's bindings"))?;
            Ok(())
        })
    }
    fn exchange_bind<'a>(
        &'a self,
        _destination: &'a str,
        _source: &'a str,
        _routing_key: &'a str,
        _arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move { Err(not_supported("exchange-to-exchange bindings")) })
    }
    fn exchange_unbind<'a>(
        &'a self,
        _destination: &'a str,
        _source: &'a str,
        _routing_key: &'a str,
        _arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move { Err(not_supported("exchange-to-exchange bindings")) })
    }
    fn queue_declare<'a>(
        &'a self,
        name: &'a str,
        flags: QueueFlags,
        _arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<QueueDeclared, Error>> {
        Box::pin(async move {
            self.check_open()?;
            let name = if name.is_empty() {
                format!("amq.gen-{}", envelope::uuid4())
            } else {
                name.to_owned()
            };
            let count = self.size(&name).await?;
            if flags.passive {
                let known = self
                    .shared
                    .declared
                    .lock()
                    .map(|d| d.contains(&name))
                    .unwrap_or(false);
                if count == 0 && !known {
                    return Err(not_found(EntityKind::Queue, &name));
                }
            } else if let Ok(mut d) = self.shared.declared.lock() {
                d.insert(name.clone());
            }
            Ok(QueueDeclared {
                name,
                message_count: count,
                consumer_count: 0,
            })
        })
    }
    fn queue_bind<'a>(
        &'a self,
        queue: &'a str,
        exchange: &'a str,
        routing_key: &'a str,
        _arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.check_open()?;
            if exchange.is_empty() {
                // Every queue is bound to the default exchange already.
                return Ok(());
            }
            let kind = self.shared.kind_of(exchange);
            let pattern = match kind.as_deref() {
                Some("topic") => keys::topic_pattern(routing_key),
                _ => String::new(),
            };
            if kind.as_deref() == Some("fanout") {
                if let Ok(mut f) = self.shared.fanout_queues.lock() {
                    f.insert(
                        queue.to_owned(),
                        (exchange.to_owned(), routing_key.replace('#', "*")),
                    );
                }
            }
            let member = keys::binding_member(routing_key, &pattern, queue);
            let mut pipe = redis::pipe();
            pipe.cmd("SADD")
                .arg(self.shared.opts.binding_key(exchange))
                .arg(&member)
                .ignore();
            pipe.cmd("SADD")
                .arg(self.shared.opts.binding_permanent_key(exchange))
                .arg(&member)
                .ignore();
            pipe.query_async::<()>(&mut self.shared.conn())
                .await
                .map_err(rerr("binding a queue"))?;
            if let Ok(mut b) = self.shared.bindings.lock() {
                let key = (
                    queue.to_owned(),
                    exchange.to_owned(),
                    routing_key.to_owned(),
                );
                if !b.contains(&key) {
                    b.push(key);
                }
            }
            Ok(())
        })
    }
    fn queue_unbind<'a>(
        &'a self,
        queue: &'a str,
        exchange: &'a str,
        routing_key: &'a str,
        _arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.check_open()?;
            let pattern = match self.shared.kind_of(exchange).as_deref() {
                Some("topic") => keys::topic_pattern(routing_key),
                _ => String::new(),
            };
            let member = keys::binding_member(routing_key, &pattern, queue);
            let mut pipe = redis::pipe();
            pipe.cmd("SREM")
                .arg(self.shared.opts.binding_key(exchange))
                .arg(&member)
                .ignore();
            pipe.cmd("SREM")
                .arg(self.shared.opts.binding_permanent_key(exchange))
                .arg(&member)
                .ignore();
            pipe.query_async::<()>(&mut self.shared.conn())
                .await
                .map_err(rerr("unbinding a queue"))?;
            if let Ok(mut b) = self.shared.bindings.lock() {
                b.retain(|(q, e, r)| !(q == queue && e == exchange && r == routing_key));
            }
            Ok(())
        })
    }
    fn queue_purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u32, Error>> {
        Box::pin(async move {
            self.check_open()?;
            let mut pipe = redis::pipe();
            pipe.atomic();
            for k in self.shared.opts.queue_keys(queue) {
                pipe.cmd("LLEN").arg(&k);
                pipe.cmd("DEL").arg(&k).ignore();
            }
            let sizes: Vec<u64> = pipe
                .query_async(&mut self.shared.conn())
                .await
                .map_err(rerr("purging a queue"))?;
            Ok(u32::try_from(sizes.iter().sum::<u64>()).unwrap_or(u32::MAX))
        })
    }
    fn queue_delete<'a>(
        &'a self,
        queue: &'a str,
        _if_unused: bool,
        if_empty: bool,
    ) -> BoxFuture<'a, Result<u32, Error>> {
        Box::pin(async move {
            self.check_open()?;
            let n = self.size(queue).await?;
            if if_empty && n > 0 {
                return Err(Error::Broker(BrokerError::NotEmpty {
                    queue: queue.to_owned(),
                }));
            }
            let bound: Vec<(String, String, String)> = self
                .shared
                .bindings
                .lock()
                .map(|b| b.iter().filter(|(q, _, _)| q == queue).cloned().collect())
                .unwrap_or_default();
            let mut pipe = redis::pipe();
            for (q, ex, rk) in &bound {
                let pattern = match self.shared.kind_of(ex).as_deref() {
                    Some("topic") => keys::topic_pattern(rk),
                    _ => String::new(),
                };
                let member = keys::binding_member(rk, &pattern, q);
                pipe.cmd("SREM")
                    .arg(self.shared.opts.binding_key(ex))
                    .arg(&member)
                    .ignore();
                pipe.cmd("SREM")
                    .arg(self.shared.opts.binding_permanent_key(ex))
                    .arg(&member)
                    .ignore();
            }
            for k in self.shared.opts.queue_keys(queue) {
                pipe.cmd("DEL").arg(k).ignore();
            }
            pipe.query_async::<()>(&mut self.shared.conn())
                .await
                .map_err(rerr("deleting a queue"))?;
            // Bindings other processes made for it too (Kombu only drops its own).
            self.unbind_everywhere(queue).await?;
            if let Ok(mut b) = self.shared.bindings.lock() {
                b.retain(|(q, _, _)| q != queue);
            }
            if let Ok(mut d) = self.shared.declared.lock() {
                d.remove(queue);
            }
            if let Ok(mut f) = self.shared.fanout_queues.lock() {
                f.remove(queue);
            }
            // Its consumers here are cancelled, as a broker would.
            let cancelled: Vec<(String, ConsumerEntry)> = match self.state.lock() {
                Ok(mut st) => {
                    let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut st.consumers)
                        .into_iter()
                        .partition(|(_, c)| c.queue == queue);
                    st.consumers = keep;
                    st.cycle.retain(|q| q != queue);
                    gone
                }
                Err(_) => Vec::new(),
            };
            for (tag, c) in cancelled {
                let _ = c.tx.try_send(Err(Error::ConsumerCancelled {
                    consumer_tag: tag,
                    queue: queue.to_owned(),
                }));
            }
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
            let (raw, _tag) = envelope::encode(&properties, &body, exchange, routing_key);
            let kind = self.shared.kind_of(exchange);
            if kind.as_deref() == Some("fanout") {
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(self.shared.opts.fanout_channel(exchange, routing_key))
                    .arg(&raw)
                    .query_async(&mut self.shared.conn())
                    .await
                    .map_err(rerr("publishing to a fanout exchange"))?;
            } else {
                let step = self.shared.opts.step_for(properties.priority.unwrap_or(0));
                let routed = if exchange.is_empty() {
                    // The default exchange: the queue named by the routing key.
                    let _: () = redis::cmd("LPUSH")
                        .arg(self.shared.opts.queue_key(routing_key, step))
                        .arg(&raw)
                        .query_async(&mut self.shared.conn())
                        .await
                        .map_err(|e| self.shared.note(rerr("publishing")(e)))?;
                    1
                } else {
                    // Bindings read, matched and pushed to in one round trip.
                    let opts = &self.shared.opts;
                    let how = match kind.as_deref() {
                        Some("topic") => "topic",
                        Some(_) => "direct",
                        None => "auto",
                    };
                    let suffix = if step == 0 {
                        String::new()
                    } else {
                        format!("{}{step}", keys::SEP)
                    };
                    let n: u64 = scripts::publish()
                        .key(opts.binding_key(exchange))
                        .arg(routing_key)
                        .arg(how)
                        .arg(&raw)
                        .arg(&opts.global_keyprefix)
                        .arg(suffix)
                        .arg(keys::SEP)
                        .invoke_async(&mut self.shared.conn())
                        .await
                        .map_err(|e| self.shared.note(rerr("publishing")(e)))?;
                    n
                };
                if routed == 0 {
                    if mandatory {
                        let r = RawReturn {
                            reply_code: 312,
                            reply_text: "NO_ROUTE".into(),
                            exchange: exchange.to_owned(),
                            routing_key: routing_key.to_owned(),
                            properties,
                            body,
                        };
                        if self.confirm.load(Ordering::Acquire) {
                            return Err(Error::Returned {
                                reply_code: r.reply_code,
                                reply_text: r.reply_text,
                                exchange: r.exchange,
                                routing_key: r.routing_key,
                            });
                        }
                        let _ = self.returns_tx.send(r);
                    }
                    return Ok(if self.confirm.load(Ordering::Acquire) {
                        PublishOutcome::Acked
                    } else {
                        PublishOutcome::Sent
                    });
                }
            }
            Ok(if self.confirm.load(Ordering::Acquire) {
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
            let mut conn = self.shared.conn();
            for k in self.shared.opts.queue_keys(queue) {
                let item: Option<Vec<u8>> = redis::cmd("RPOP")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.shared.note(rerr("getting a message")(e)))?;
                if let Some(raw) = item {
                    let taken = Taken {
                        key: k,
                        raw: Bytes::from(raw),
                        recorded: None,
                    };
                    let decoded = envelope::decode(&taken.raw);
                    let tag = match self.track(&taken, &decoded, no_ack).await {
                        Ok(t) => t,
                        Err(e) => {
                            self.put_back(&taken).await;
                            return Err(e);
                        }
                    };
                    return Ok(Some(Self::delivery(tag, &taken.raw, decoded, "", queue)));
                }
            }
            Ok(None)
        })
    }
    fn consume<'a>(
        &'a self,
        queue: &'a str,
        spec: ConsumeSpec,
    ) -> BoxFuture<'a, Result<(String, DeliveryStream), Error>> {
        Box::pin(async move {
            self.check_open()?;
            let (tag, rx) = {
                let mut st = self
                    .state
                    .lock()
                    .map_err(|_| Error::Closed { what: "channel" })?;
                let tag = if spec.tag.is_empty() {
                    format!("kelp.redis.{}.{}", self.id, st.consumers.len() + 1)
                } else {
                    spec.tag.clone()
                };
                if st.consumers.iter().any(|(t, _)| *t == tag) {
                    return Err(Error::Broker(BrokerError::ConsumerTagInUse { tag }));
                }
                let cap = usize::from(st.prefetch).clamp(16, 1024);
                let (tx, rx) = mpsc::channel(cap);
                st.consumers.push((
                    tag.clone(),
                    ConsumerEntry {
                        queue: queue.to_owned(),
                        no_ack: spec.no_ack,
                        tx,
                    },
                ));
                if !st.cycle.iter().any(|q| q == queue) {
                    st.cycle.push_back(queue.to_owned());
                }
                (tag, rx)
            };
            self.ensure_pump()?;
            self.refresh_fanout();
            let stream: DeliveryStream = Box::pin(tokio_stream_from(rx));
            Ok((tag, stream))
        })
    }
    fn cancel<'a>(&'a self, consumer_tag: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if let Ok(mut st) = self.state.lock() {
                st.consumers.retain(|(t, _)| t != consumer_tag);
                let live: HashSet<String> =
                    st.consumers.iter().map(|(_, c)| c.queue.clone()).collect();
                st.cycle.retain(|q| live.contains(q));
            }
            self.refresh_fanout();
            self.wake.notify_waiters();
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
    fn recover(&self, requeue: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if !requeue {
                return Err(not_supported("basic.recover without requeue"));
            }
            let last = self
                .state
                .lock()
                .ok()
                .and_then(|s| s.unacked.keys().next_back().copied());
            match last {
                Some(t) => self.settle(t, true, Some(true)).await,
                None => Ok(()),
            }
        })
    }
    fn qos(&self, prefetch_count: u16, _global: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if let Ok(mut st) = self.state.lock() {
                st.prefetch = prefetch_count;
            }
            self.wake.notify_waiters();
            Ok(())
        })
    }
    fn flow(&self, _active: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { Err(not_supported("channel.flow")) })
    }
    fn confirm_select(&self) -> BoxFuture<'_, Result<(), Error>> {
        // Redis answers every write: a publish is confirmed when its reply arrives.
        Box::pin(async move {
            self.confirm.store(true, Ordering::Release);
            Ok(())
        })
    }
    fn tx_select(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { Err(not_supported("transactions")) })
    }
    fn tx_commit(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { Err(not_supported("transactions")) })
    }
    fn tx_rollback(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { Err(not_supported("transactions")) })
    }
    fn take_returns(&self) -> Option<mpsc::UnboundedReceiver<RawReturn>> {
        self.returns_rx.lock().ok()?.take()
    }
    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if self.closed.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
            self.wake.notify_waiters();
            // The consumer loop ends by itself; what a BRPOP in flight takes goes back.
            if let Ok(mut p) = self.fanout.lock() {
                if let Some(h) = p.take() {
                    h.abort();
                }
            }
            let tags: Vec<String> = match self.state.lock() {
                Ok(mut s) => {
                    s.consumers.clear();
                    std::mem::take(&mut s.unacked)
                        .into_values()
                        .map(|p| p.tag)
                        .collect()
                }
                Err(_) => Vec::new(),
            };
            for t in tags {
                self.shared.restore_by_tag(&t, false).await?;
            }
            // What was acked is written before the close returns.
            self.shared.acks.flush().await;
            Ok(())
        })
    }
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.shared.is_closed()
    }
    fn transport(&self) -> &'static str {
        "redis"
    }
}

/// A receiver as a stream.
fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<RawDelivery, Error>>,
) -> impl futures_core::Stream<Item = Result<RawDelivery, Error>> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
