//! [`VirtualBroker`]: router + queues + sessions, with RabbitMQ's semantics.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Arc;

use kelp_amqp::{FieldTable, FieldValue, ShortString};

use super::deadletter::{dead_lettered, is_cycle, DeathReason};
use super::error::{BrokerError, EntityKind};
use super::exchange::{ExchangeKind, ExchangeOptions, RoutedQueues, Router};
use super::message::{message_ttl, Delivery, Message, QueuedMessage};
use super::queue::{MessageQueue, Overflow, PushOutcome, QueueArgs};
use super::session::{Consumer, OwnerId, Session, SessionId, Settled};

/// The flags of queue.declare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueOptions {
    /// Only check that the queue exists (and report its counts).
    pub passive: bool,
    /// Survives a broker restart (recorded and compared; the memory core keeps nothing).
    pub durable: bool,
    /// Owned by the declaring owner: others get RESOURCE_LOCKED, and it is deleted by
    /// [`VirtualBroker::close_owner`].
    pub exclusive: bool,
    /// Deleted when its last consumer is cancelled (if it ever had one).
    pub auto_delete: bool,
}

/// The flags and arguments of basic.consume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// Deliveries need no ack (and are not limited by prefetch).
    pub no_ack: bool,
    /// No other consumer may use the queue while this one exists.
    pub exclusive: bool,
    /// Consumer priority (`x-priority`; 0 by default, negative allowed). A queue's messages go
    /// to its highest-priority consumers that have prefetch room (round-robin among equals);
    /// lower ones get messages only while every higher one is blocked.
    pub priority: i64,
}

impl ConsumeOptions {
    /// Apply the basic.consume `arguments` for `queue` (the name is for error messages):
    /// `x-priority` must be an integer (PRECONDITION_FAILED otherwise). Others are ignored.
    pub fn with_arguments(
        mut self,
        queue: &str,
        arguments: &FieldTable,
    ) -> Result<Self, BrokerError> {
        if let Some(v) = arguments.get("x-priority") {
            self.priority = v.as_i64().ok_or_else(|| {
                BrokerError::invalid_arg(
                    EntityKind::Queue,
                    queue,
                    "x-priority",
                    format!("expected an integer, got {v:?}"),
                )
            })?;
        }
        Ok(self)
    }
}

/// What [`VirtualBroker::take_turn`] handed out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Turn {
    /// Deliveries appended.
    pub taken: usize,
    /// Messages are left that other consumers of the queue might take now (an equal-priority
    /// one, or a lower one if this one is now blocked): wake them.
    pub wake_others: bool,
}

/// The answer to queue.declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDeclareOk {
    /// The queue's name (generated `amq.gen-…` when declared with an empty name).
    pub queue: Arc<str>,
    /// Ready messages.
    pub message_count: u32,
    /// Consumers.
    pub consumer_count: u32,
}

/// A queue's declared properties and counts.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueInfo {
    /// Name.
    pub name: Arc<str>,
    /// Declared durable.
    pub durable: bool,
    /// The owner of an exclusive queue.
    pub exclusive_owner: Option<OwnerId>,
    /// Declared auto-delete.
    pub auto_delete: bool,
    /// Declaration arguments.
    pub arguments: FieldTable,
    /// Ready messages.
    pub message_count: u32,
    /// Total body bytes of ready messages.
    pub message_bytes: u64,
    /// Consumers.
    pub consumer_count: u32,
}

/// What happened to a published message.
#[derive(Debug, Clone, Default)]
pub struct PublishOutcome {
    /// The queues that enqueued it: wake their consumers.
    pub queues: RoutedQueues,
    /// Queues that refused it (`x-overflow: reject-publish`): nack a confirm-mode publisher.
    pub rejected: Vec<Arc<str>>,
    /// Held by an `x-delayed-message` exchange until its `x-delay` has passed.
    pub delayed: bool,
    /// Published `mandatory` and routed to no queue: send it back (basic.return, NO_ROUTE).
    pub returned: bool,
}

impl PublishOutcome {
    /// True when no queue received or refused the message and no exchange holds it.
    pub fn is_unroutable(&self) -> bool {
        self.queues.is_empty() && self.rejected.is_empty() && !self.delayed
    }

    /// True when a confirm-mode publisher should get basic.nack rather than basic.ack.
    pub fn should_nack(&self) -> bool {
        !self.rejected.is_empty()
    }
}

/// Something the transport should react to, reported by [`VirtualBroker::take_notices`].
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// Messages arrived in this queue other than by the publish that reported it (requeue,
    /// dead-lettering, a delayed message falling due): wake its consumers.
    QueueReady(Arc<str>),
    /// The broker cancelled a consumer because its queue was deleted (send basic.cancel).
    ConsumerCancelled {
        /// The consumer's session.
        session: SessionId,
        /// The consumer tag.
        consumer_tag: ShortString,
        /// The deleted queue.
        queue: Arc<str>,
    },
    /// A queue was deleted (by request, auto-delete, `x-expires` or its exclusive owner
    /// closing).
    QueueDeleted(Arc<str>),
}

#[derive(Debug)]
struct QueueState {
    id: u64,
    name: Arc<str>,
    durable: bool,
    auto_delete: bool,
    exclusive_owner: Option<OwnerId>,
    arguments: FieldTable,
    store: MessageQueue,
    /// Its consumers in the order they started.
    consumers: Vec<ConsumerRef>,
    /// Every consumer has the same priority (no priority checks needed).
    uniform_priority: bool,
    /// With `x-single-active-consumer`: the one consumer that gets messages.
    active: Option<(SessionId, u64)>,
    /// Where the search for a consumer to push to starts (round-robin), in `consumers`.
    next_turn: usize,
    exclusive_consumer: bool,
    last_used_ms: u64,
    /// Listed in `VirtualBroker::timed`.
    timed: bool,
}

impl QueueState {
    fn check_owner(&self, owner: OwnerId) -> Result<(), BrokerError> {
        match self.exclusive_owner {
            Some(o) if o != owner => Err(BrokerError::ResourceLocked {
                queue: self.name.to_string(),
            }),
            _ => Ok(()),
        }
    }

    fn needs_timer(&self) -> bool {
        let a = self.store.args();
        a.message_ttl.is_some() || a.expires.is_some() || self.store.has_expiring()
    }

    fn expires_deadline(&self) -> Option<u64> {
        let e = self.store.args().expires?;
        self.consumers
            .is_empty()
            .then(|| self.last_used_ms.saturating_add(e))
    }

    fn consumer_count(&self) -> u32 {
        count_u32(self.consumers.len())
    }

    fn single_active(&self) -> bool {
        self.store.args().single_active_consumer
    }

    fn add_consumer(&mut self, c: ConsumerRef) {
        if self.single_active() && self.active.is_none() {
            self.active = Some((c.session, c.id));
        }
        self.uniform_priority &= self
            .consumers
            .first()
            .is_none_or(|f| f.priority == c.priority);
        self.consumers.push(c);
    }

    fn remove_consumer(&mut self, session: SessionId, id: u64) {
        let Some(pos) = self
            .consumers
            .iter()
            .position(|c| c.session == session && c.id == id)
        else {
            return;
        };
        self.consumers.remove(pos);
        if self.next_turn > pos {
            self.next_turn -= 1;
        }
        self.uniform_priority = self
            .consumers
            .windows(2)
            .all(|w| w.first().map(|c| c.priority) == w.last().map(|c| c.priority));
        if self.active == Some((session, id)) {
            // As RabbitMQ's classic queues: the highest-priority consumer left takes over,
            // the earliest started among equals.
            let mut next: Option<&ConsumerRef> = None;
            for c in &self.consumers {
                if next.is_none_or(|n| c.priority > n.priority) {
                    next = Some(c);
                }
            }
            self.active = next.map(|c| (c.session, c.id));
        }
    }

    /// How consumer `id` of `session` (with `priority`) stands on this queue now.
    fn claim(
        &self,
        sessions: &HashMap<SessionId, Session>,
        session: SessionId,
        id: u64,
        priority: i64,
    ) -> Claim {
        if self.single_active() {
            return Claim {
                eligible: self.active == Some((session, id)),
                peers: false,
                others: false,
            };
        }
        let shared = self.consumers.len() > 1;
        if self.uniform_priority {
            return Claim {
                eligible: true,
                peers: shared,
                others: shared,
            };
        }
        let mut claim = Claim {
            eligible: true,
            peers: false,
            others: false,
        };
        for c in &self.consumers {
            if c.session == session && c.id == id {
                continue;
            }
            match c.priority.cmp(&priority) {
                Ordering::Greater => {
                    if claim.eligible && has_room(sessions, c) {
                        claim.eligible = false;
                    }
                }
                Ordering::Equal => {
                    claim.peers = true;
                    claim.others = true;
                }
                Ordering::Less => claim.others = true,
            }
        }
        claim
    }

    /// The consumer RabbitMQ would push a message to now, as an index into `consumers`: the
    /// single active consumer, or the highest-priority consumer with room (round-robin among
    /// equals); `None` when none has room.
    fn pick(&self, sessions: &HashMap<SessionId, Session>) -> Option<usize> {
        if self.single_active() {
            let i = self
                .consumers
                .iter()
                .position(|c| Some((c.session, c.id)) == self.active)?;
            return self
                .consumers
                .get(i)
                .is_some_and(|c| has_room(sessions, c))
                .then_some(i);
        }
        let n = self.consumers.len();
        let mut best: Option<(i64, usize)> = None;
        for k in 0..n {
            let i = (self.next_turn + k) % n;
            let Some(c) = self.consumers.get(i) else {
                continue;
            };
            if best.is_some_and(|(p, _)| c.priority <= p) {
                continue;
            }
            if has_room(sessions, c) {
                best = Some((c.priority, i));
            }
        }
        best.map(|(_, i)| i)
    }
}

/// A consumer as its queue lists it.
#[derive(Debug, Clone, Copy)]
struct ConsumerRef {
    session: SessionId,
    id: u64,
    priority: i64,
}

/// How a consumer stands on its queue at a moment.
#[derive(Debug, Clone, Copy)]
struct Claim {
    /// It may take messages: it is the single active consumer, or no consumer of a higher
    /// priority has room.
    eligible: bool,
    /// Another consumer has the same claim (same priority, no single active consumer).
    peers: bool,
    /// Another consumer could take what it leaves (one of equal or lower priority).
    others: bool,
}

/// True when consumer `c` could take a message now (its prefetch limits allow).
fn has_room(sessions: &HashMap<SessionId, Session>, c: &ConsumerRef) -> bool {
    sessions.get(&c.session).is_some_and(|s| {
        s.consumer_by_id(c.id)
            .is_some_and(|i| s.consumer_has_credit(i))
    })
}

/// Deliver `m` to consumer `i` of `q` at once (tracked on its session, waiting in its
/// `pending` until it takes it). Gives the message back if that consumer is gone.
fn hand(
    q: &mut QueueState,
    sessions: &mut HashMap<SessionId, Session>,
    i: usize,
    m: QueuedMessage,
) -> Option<QueuedMessage> {
    let target = q.consumers.get(i).and_then(|c| {
        let s = sessions.get_mut(&c.session)?;
        let ci = s.consumer_by_id(c.id)?;
        Some((s, ci))
    });
    let Some((s, ci)) = target else {
        return Some(m);
    };
    let no_ack = s.consumers.get(ci).is_some_and(|c| c.no_ack);
    let d = deliver(s, q, m, no_ack, Some(ci));
    if let Some(c) = s.consumers.get_mut(ci) {
        c.pending.push_back(d);
    }
    q.next_turn = i + 1;
    None
}

/// Hand `q`'s ready messages to its consumers while they have room, as RabbitMQ's push would
/// have by now. Returns a consumer (index into `q.consumers`) that still has room once nothing
/// is left ready, if any. Expired messages met are appended to `expired`.
fn dispatch(
    q: &mut QueueState,
    sessions: &mut HashMap<SessionId, Session>,
    now_ms: u64,
    expired: &mut Vec<QueuedMessage>,
) -> Option<usize> {
    loop {
        let i = q.pick(sessions)?;
        let Some(m) = q.store.pop(now_ms, expired) else {
            return Some(i);
        };
        if let Some(m) = hand(q, sessions, i, m) {
            q.store.requeue(m);
            return None;
        }
    }
}

/// A message that died in a queue with a dead-letter exchange, waiting to be republished.
#[derive(Debug)]
struct PendingDeath {
    queue: Arc<str>,
    exchange: Arc<str>,
    routing_key: Option<Arc<str>>,
    message: Message,
    reason: DeathReason,
}

/// A message held by a delayed-message exchange.
#[derive(Debug)]
struct Delayed {
    due: u64,
    seq: u64,
    exchange: Arc<str>,
    message: Message,
}

impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delayed {
    /// Reversed, so that the max-heap pops the earliest due first.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// Most dead letters processed by one operation; a safety net behind cycle detection.
const DEAD_LETTER_BUDGET: usize = 100_000;

/// Schedule `msgs`, which died in `q`, for dead-lettering (or drop them when `q` has no DLX).
fn schedule_dead(
    pending: &mut VecDeque<PendingDeath>,
    q: &QueueState,
    msgs: &mut Vec<QueuedMessage>,
    reason: DeathReason,
) {
    match &q.store.args().dead_letter_exchange {
        None => msgs.clear(),
        Some(dlx) => {
            let key = &q.store.args().dead_letter_routing_key;
            pending.extend(msgs.drain(..).map(|m| PendingDeath {
                queue: q.name.clone(),
                exchange: dlx.clone(),
                routing_key: key.clone(),
                message: m.message,
                reason,
            }));
        }
    }
}

fn random_name(hasher: &RandomState, counter: &mut u64, prefix: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    *counter += 1;
    let mut bits = [0u8; 16];
    for (i, half) in bits.chunks_mut(8).enumerate() {
        let mut h = hasher.build_hasher();
        h.write_u64(*counter);
        h.write_usize(i);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    let v = u128::from_le_bytes(bits);
    let mut s = String::with_capacity(prefix.len() + 22);
    s.push_str(prefix);
    for i in 0..22 {
        let idx = ((v >> (i * 6)) & 63) as usize;
        s.push(char::from(ALPHABET.get(idx).copied().unwrap_or(b'A')));
    }
    s
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Lower `slot` to `t` when `t` is sooner.
fn sooner(slot: &mut Option<u64>, t: Option<u64>) {
    if let Some(t) = t {
        if slot.is_none_or(|s| t < s) {
            *slot = Some(t);
        }
    }
}

/// Record in `slot` when `q` next has something due: the expiry of a message at the head of
/// one of its priority levels, or its `x-expires` while it has no consumer.
fn note_deadlines(slot: &mut Option<u64>, q: &QueueState) {
    if q.store.has_expiring() {
        sooner(slot, q.store.next_expiry());
    }
    sooner(slot, q.expires_deadline());
}

/// An in-process, single-threaded model of an AMQP 0-9-1 broker (one vhost).
///
/// Synchronous and clock-free: every call that depends on time takes `now_ms` (milliseconds
/// since the Unix epoch). Wrap it in a mutex to share it; a transport calls
/// [`take_notices`](Self::take_notices) after operations to learn which queues gained
/// messages and which consumers were cancelled, and [`next_expiry`](Self::next_expiry) to know
/// when to call [`expire`](Self::expire).
#[derive(Debug)]
pub struct VirtualBroker {
    router: Router,
    queues: HashMap<Arc<str>, QueueState>,
    sessions: HashMap<SessionId, Session>,
    next_session: u64,
    next_queue_id: u64,
    hasher: RandomState,
    name_counter: u64,
    /// Queues that have TTLs, `x-expires` or expiring messages.
    timed: HashSet<Arc<str>>,
    delayed: BinaryHeap<Delayed>,
    delayed_seq: u64,
    notices: Vec<Notice>,
    /// The soonest deadline scheduled since [`take_new_deadline`](Self::take_new_deadline)
    /// last ran (see there).
    new_deadline: Option<u64>,
    pending_dead: VecDeque<PendingDeath>,
    /// Reused buffers.
    scratch: Vec<QueuedMessage>,
    settled: Vec<Settled>,
}

impl Default for VirtualBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtualBroker {
    /// An empty broker with the standard exchanges.
    pub fn new() -> Self {
        VirtualBroker {
            router: Router::new(),
            queues: HashMap::new(),
            sessions: HashMap::new(),
            next_session: 1,
            next_queue_id: 1,
            hasher: RandomState::new(),
            name_counter: 0,
            timed: HashSet::new(),
            delayed: BinaryHeap::new(),
            delayed_seq: 0,
            notices: Vec::new(),
            new_deadline: None,
            pending_dead: VecDeque::new(),
            scratch: Vec::new(),
            settled: Vec::new(),
        }
    }

    /// The routing topology (exchanges, bindings).
    pub fn router(&self) -> &Router {
        &self.router
    }

    // ---------------------------------------------------------------- exchanges

    /// exchange.declare; see [`Router::declare_exchange`] for the checks.
    pub fn declare_exchange(
        &mut self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
        arguments: &FieldTable,
    ) -> Result<(), BrokerError> {
        self.router
            .declare_exchange(name, &kind, options, arguments)
            .map(drop)
    }

    /// exchange.delete; deleting a missing exchange succeeds.
    pub fn delete_exchange(&mut self, name: &str, if_unused: bool) -> Result<(), BrokerError> {
        self.router.delete_exchange(name, if_unused).map(drop)
    }

    /// exchange.bind: route what `source` matches for this binding on through `destination`.
    pub fn bind_exchange(
        &mut self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), BrokerError> {
        self.router
            .bind_exchange(destination, source, routing_key, arguments)
            .map(drop)
    }

    /// exchange.unbind; a missing binding is not an error.
    pub fn unbind_exchange(
        &mut self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), BrokerError> {
        self.router
            .unbind_exchange(destination, source, routing_key, arguments)
            .map(drop)
    }

    // ---------------------------------------------------------------- queues

    /// queue.declare by `owner`. An empty name gets a server-generated `amq.gen-…` name.
    /// A passive declaration only checks existence; redeclaring with other flags or arguments
    /// fails with [`BrokerError::Inequivalent`] (exclusivity mismatches and other owners'
    /// exclusive queues with [`BrokerError::ResourceLocked`]); new `amq.*` names are refused.
    pub fn declare_queue(
        &mut self,
        owner: OwnerId,
        name: &str,
        options: QueueOptions,
        arguments: &FieldTable,
        now_ms: u64,
    ) -> Result<QueueDeclareOk, BrokerError> {
        if let Some(q) = self.queues.get_mut(name) {
            q.check_owner(owner)?;
            if !options.passive {
                let ineq = |arg: &str, received: String, current: String| {
                    BrokerError::inequivalent(EntityKind::Queue, name, arg, received, current)
                };
                if options.exclusive.then_some(owner) != q.exclusive_owner {
                    return Err(BrokerError::ResourceLocked {
                        queue: name.to_owned(),
                    });
                }
                if options.durable != q.durable {
                    return Err(ineq(
                        "durable",
                        options.durable.to_string(),
                        q.durable.to_string(),
                    ));
                }
                if options.auto_delete != q.auto_delete {
                    return Err(ineq(
                        "auto_delete",
                        options.auto_delete.to_string(),
                        q.auto_delete.to_string(),
                    ));
                }
                let args = QueueArgs::parse(name, arguments)?;
                if let Some((arg, received, current)) = args.difference(q.store.args()) {
                    return Err(ineq(arg, received, current));
                }
            }
            q.last_used_ms = now_ms;
            return Ok(QueueDeclareOk {
                queue: q.name.clone(),
                message_count: count_u32(q.store.len()),
                consumer_count: q.consumer_count(),
            });
        }
        if options.passive {
            return Err(BrokerError::not_found(EntityKind::Queue, name));
        }
        let generated;
        let name = if name.is_empty() {
            generated = loop {
                let n = random_name(&self.hasher, &mut self.name_counter, "amq.gen-");
                if !self.queues.contains_key(n.as_str()) {
                    break n;
                }
            };
            generated.as_str()
        } else if name.starts_with("amq.") {
            return Err(BrokerError::access_refused(
                EntityKind::Queue,
                name,
                "queue names starting with 'amq.' are reserved",
            ));
        } else {
            name
        };
        let args = QueueArgs::parse(name, arguments)?;
        let name: Arc<str> = Arc::from(name);
        let id = self.next_queue_id;
        self.next_queue_id += 1;
        let q = QueueState {
            id,
            name: name.clone(),
            durable: options.durable,
            auto_delete: options.auto_delete,
            exclusive_owner: options.exclusive.then_some(owner),
            arguments: arguments.clone(),
            store: MessageQueue::new(args),
            consumers: Vec::new(),
            uniform_priority: true,
            active: None,
            next_turn: 0,
            exclusive_consumer: false,
            last_used_ms: now_ms,
            timed: false,
        };
        let mut q = q;
        if q.needs_timer() {
            q.timed = true;
            self.timed.insert(name.clone());
            note_deadlines(&mut self.new_deadline, &q);
        }
        self.queues.insert(name.clone(), q);
        self.router.add_queue(name.clone());
        Ok(QueueDeclareOk {
            queue: name,
            message_count: 0,
            consumer_count: 0,
        })
    }

    fn queue_for(&self, owner: OwnerId, queue: &str) -> Result<&QueueState, BrokerError> {
        let q = self
            .queues
            .get(queue)
            .ok_or_else(|| BrokerError::not_found(EntityKind::Queue, queue))?;
        q.check_owner(owner)?;
        Ok(q)
    }

    fn queue_for_mut(
        &mut self,
        owner: OwnerId,
        queue: &str,
    ) -> Result<&mut QueueState, BrokerError> {
        let q = self
            .queues
            .get_mut(queue)
            .ok_or_else(|| BrokerError::not_found(EntityKind::Queue, queue))?;
        q.check_owner(owner)?;
        Ok(q)
    }

    /// queue.bind by `owner`.
    pub fn bind_queue(
        &mut self,
        owner: OwnerId,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), BrokerError> {
        self.queue_for(owner, queue)?;
        self.router
            .bind_queue(queue, exchange, routing_key, arguments)
            .map(drop)
    }

    /// queue.unbind by `owner`; a missing binding is not an error.
    pub fn unbind_queue(
        &mut self,
        owner: OwnerId,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), BrokerError> {
        self.queue_for(owner, queue)?;
        self.router
            .unbind_queue(queue, exchange, routing_key, arguments)
            .map(drop)
    }

    /// queue.purge by `owner`: drop the ready messages (not the unacked ones); returns how many.
    pub fn purge_queue(&mut self, owner: OwnerId, queue: &str) -> Result<u32, BrokerError> {
        let q = self.queue_for_mut(owner, queue)?;
        Ok(count_u32(q.store.purge()))
    }

    /// queue.delete by `owner`; returns the number of ready messages dropped with it. Deleting
    /// a missing queue succeeds with 0, as in RabbitMQ. `if_unused` refuses when it has
    /// consumers, `if_empty` when it holds ready messages. Its consumers are cancelled
    /// ([`Notice::ConsumerCancelled`]); its unacked messages are dropped when settled.
    pub fn delete_queue(
        &mut self,
        owner: OwnerId,
        queue: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, BrokerError> {
        let Some(q) = self.queues.get(queue) else {
            return Ok(0);
        };
        q.check_owner(owner)?;
        if if_unused && !q.consumers.is_empty() {
            return Err(BrokerError::InUse {
                kind: EntityKind::Queue,
                name: queue.to_owned(),
            });
        }
        if if_empty && !q.store.is_empty() {
            return Err(BrokerError::NotEmpty {
                queue: queue.to_owned(),
            });
        }
        Ok(self.remove_queue(queue).unwrap_or(0))
    }

    fn remove_queue(&mut self, name: &str) -> Option<u32> {
        let q = self.queues.remove(name)?;
        self.router.remove_queue(name);
        if q.timed {
            self.timed.remove(name);
        }
        if !q.consumers.is_empty() {
            for (sid, s) in self.sessions.iter_mut() {
                let notices = &mut self.notices;
                s.consumers.retain(|c| {
                    if c.queue_id != q.id {
                        return true;
                    }
                    notices.push(Notice::ConsumerCancelled {
                        session: *sid,
                        consumer_tag: c.tag.clone(),
                        queue: q.name.clone(),
                    });
                    false
                });
            }
        }
        self.notices.push(Notice::QueueDeleted(q.name.clone()));
        Some(count_u32(q.store.len()))
    }

    /// A queue's properties and counts.
    pub fn queue_info(&self, queue: &str) -> Option<QueueInfo> {
        let q = self.queues.get(queue)?;
        Some(QueueInfo {
            name: q.name.clone(),
            durable: q.durable,
            exclusive_owner: q.exclusive_owner,
            auto_delete: q.auto_delete,
            arguments: q.arguments.clone(),
            message_count: count_u32(q.store.len()),
            message_bytes: q.store.bytes() as u64,
            consumer_count: q.consumer_count(),
        })
    }

    /// The ready messages of a queue in delivery order (inspection, tests).
    pub fn peek_queue(&self, queue: &str) -> Option<impl Iterator<Item = &QueuedMessage>> {
        self.queues.get(queue).map(|q| q.store.iter())
    }

    /// Names of all queues.
    pub fn queue_names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.queues.keys()
    }

    // ---------------------------------------------------------------- publish

    /// basic.publish to `message.exchange` with `message.routing_key`.
    ///
    /// Fails when the exchange does not exist (NOT_FOUND), is internal (ACCESS_REFUSED) or the
    /// `expiration` property is not a number of ms (PRECONDITION_FAILED). Otherwise reports the
    /// queues that took it, those that refused it (`reject-publish`), and whether it must be
    /// returned (`mandatory` and unroutable). Messages dropped or dead-lettered on the way are
    /// reported through [`take_notices`](Self::take_notices).
    pub fn publish(
        &mut self,
        message: impl Into<Message>,
        mandatory: bool,
        now_ms: u64,
    ) -> Result<PublishOutcome, BrokerError> {
        let message: Message = message.into();
        let ttl = message_ttl(&message.properties)?;
        let mut out = PublishOutcome::default();
        let exchange = message.exchange.as_str();
        if exchange.is_empty() {
            self.router
                .route_default(&message.routing_key, &mut out.queues);
        } else {
            let x = self
                .router
                .exchange(exchange)
                .ok_or_else(|| BrokerError::not_found(EntityKind::Exchange, exchange))?;
            if x.is_internal() {
                return Err(BrokerError::access_refused(
                    EntityKind::Exchange,
                    exchange,
                    "cannot publish to an internal exchange",
                ));
            }
            if x.is_delayed() {
                let delay = message
                    .properties
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("x-delay"))
                    .and_then(FieldValue::as_i64)
                    .unwrap_or(0);
                if delay > 0 {
                    let due = now_ms.saturating_add(delay.unsigned_abs());
                    sooner(&mut self.new_deadline, Some(due));
                    self.delayed_seq += 1;
                    self.delayed.push(Delayed {
                        due,
                        seq: self.delayed_seq,
                        exchange: x.name().clone(),
                        message,
                    });
                    out.delayed = true;
                    return Ok(out);
                }
            }
            let headers = message.properties.headers.as_ref();
            self.router
                .route_exchange(x, &message.routing_key, headers, &mut out.queues);
        }
        if !out.queues.is_empty() {
            self.enqueue(&mut out.queues, &message, ttl, now_ms, &mut out.rejected);
        }
        out.returned = mandatory && out.is_unroutable();
        if !self.pending_dead.is_empty() {
            self.process_dead_letters(now_ms);
        }
        Ok(out)
    }

    /// Push `message` into each of `routed`; refusals move from `routed` to `rejected`.
    ///
    /// A message whose TTL in a queue is 0 goes straight to a consumer with room, as RabbitMQ
    /// delivers it (after the ready messages ahead of it, which such consumers are handed
    /// first); when none can take it, it expires on arrival (or when it reaches the head).
    fn enqueue(
        &mut self,
        routed: &mut RoutedQueues,
        message: &Message,
        ttl: Option<u64>,
        now_ms: u64,
        rejected: &mut Vec<Arc<str>>,
    ) {
        let before = rejected.len();
        for name in routed.iter() {
            let Some(q) = self.queues.get_mut(&**name) else {
                continue;
            };
            let ttl0 = q.store.effective_ttl(ttl) == Some(0);
            if ttl0 && !q.consumers.is_empty() {
                let target = dispatch(q, &mut self.sessions, now_ms, &mut self.scratch);
                if !self.scratch.is_empty() {
                    schedule_dead(
                        &mut self.pending_dead,
                        q,
                        &mut self.scratch,
                        DeathReason::Expired,
                    );
                }
                // Handing out messages exposes new heads.
                note_deadlines(&mut self.new_deadline, q);
                if let Some(i) = target.filter(|_| !q.store.would_reject(message)) {
                    let m = q.store.admit(message, ttl, now_ms);
                    if hand(q, &mut self.sessions, i, m).is_none() {
                        continue;
                    }
                }
            }
            match q.store.push(message, ttl, now_ms, &mut self.scratch) {
                PushOutcome::Enqueued => {
                    if !self.scratch.is_empty() {
                        schedule_dead(
                            &mut self.pending_dead,
                            q,
                            &mut self.scratch,
                            DeathReason::Maxlen,
                        );
                    }
                    if ttl0 {
                        q.store.expire(now_ms, &mut self.scratch);
                        if !self.scratch.is_empty() {
                            schedule_dead(
                                &mut self.pending_dead,
                                q,
                                &mut self.scratch,
                                DeathReason::Expired,
                            );
                        }
                    }
                    if !q.timed && q.store.has_expiring() {
                        q.timed = true;
                        self.timed.insert(q.name.clone());
                    }
                    note_deadlines(&mut self.new_deadline, q);
                }
                PushOutcome::Rejected => {
                    rejected.push(q.name.clone());
                    if q.store.args().overflow == Overflow::RejectPublishDlx {
                        self.scratch.push(QueuedMessage {
                            message: message.clone(),
                            redelivered: false,
                            expires_at: None,
                            priority: 0,
                            seq: 0,
                        });
                        schedule_dead(
                            &mut self.pending_dead,
                            q,
                            &mut self.scratch,
                            DeathReason::Maxlen,
                        );
                    }
                }
            }
        }
        if rejected.len() > before {
            let refused = &rejected[before..];
            routed.retain(|q| !refused.contains(q));
        }
    }

    /// Republish pending dead letters (and those they cause) to their dead-letter exchanges.
    fn process_dead_letters(&mut self, now_ms: u64) {
        let mut budget = DEAD_LETTER_BUDGET;
        let mut routed = RoutedQueues::new();
        let mut rejected = Vec::new();
        while let Some(d) = self.pending_dead.pop_front() {
            if budget == 0 {
                tracing::warn!(
                    dropped = self.pending_dead.len() + 1,
                    "dead-letter budget exhausted; dropping the rest"
                );
                self.pending_dead.clear();
                break;
            }
            budget -= 1;
            let key = d
                .routing_key
                .as_deref()
                .unwrap_or(d.message.routing_key.as_str());
            let msg: Message = Arc::new(dead_lettered(
                &d.message,
                &d.queue,
                d.reason,
                &d.exchange,
                key,
                now_ms,
            ));
            routed.clear();
            let headers = msg.properties.headers.as_ref();
            if self
                .router
                .route(&d.exchange, &msg.routing_key, headers, &mut routed)
                .is_err()
            {
                tracing::debug!(exchange = %d.exchange, queue = %d.queue, "dead-letter exchange missing; message dropped");
                continue;
            }
            if d.reason != DeathReason::Rejected {
                routed.retain(|q| !is_cycle(q, &msg));
            }
            rejected.clear();
            self.enqueue(&mut routed, &msg, None, now_ms, &mut rejected);
            for q in routed.iter() {
                self.notices.push(Notice::QueueReady(q.clone()));
            }
        }
    }

    // ---------------------------------------------------------------- sessions

    /// Open a session (an AMQP channel) for `owner`.
    pub fn open_session(&mut self, owner: OwnerId) -> SessionId {
        let id = SessionId(self.next_session);
        self.next_session += 1;
        self.sessions.insert(id, Session::new(owner));
        id
    }

    /// Close a session: its unacked messages are requeued (redelivered), its consumers
    /// cancelled (auto-delete queues left without consumers are deleted). Returns how many
    /// messages were requeued.
    pub fn close_session(&mut self, session: SessionId, now_ms: u64) -> Result<usize, BrokerError> {
        let mut s = self
            .sessions
            .remove(&session)
            .ok_or(BrokerError::UnknownSession { session: session.0 })?;
        let mut settled = std::mem::take(&mut self.settled);
        s.settle_all(&mut settled);
        let n = self.requeue(&mut settled);
        self.settled = settled;
        for c in s.consumers.drain(..) {
            self.release_consumer(session, &c, now_ms);
        }
        Ok(n)
    }

    /// Close every session of `owner` (as [`close_session`](Self::close_session)) and delete
    /// its exclusive queues; returns the deleted queues' names.
    pub fn close_owner(&mut self, owner: OwnerId, now_ms: u64) -> Vec<Arc<str>> {
        let ids: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.owner == owner)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            // Cannot fail: the id was just listed.
            let _ = self.close_session(id, now_ms);
        }
        let mine: Vec<Arc<str>> = self
            .queues
            .values()
            .filter(|q| q.exclusive_owner == Some(owner))
            .map(|q| q.name.clone())
            .collect();
        for q in &mine {
            self.remove_queue(q);
        }
        mine
    }

    /// basic.qos. With `global = false` (RabbitMQ's meaning) `prefetch_count` limits each
    /// consumer started afterwards; with `global = true` it limits the unacked consumer
    /// deliveries of the whole session. 0 = unlimited. basic.get ignores both.
    pub fn qos(
        &mut self,
        session: SessionId,
        prefetch_count: u16,
        global: bool,
    ) -> Result<(), BrokerError> {
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(BrokerError::UnknownSession { session: session.0 })?;
        if global {
            s.global_prefetch = prefetch_count;
            // Its consumers' room changed: on a queue with consumer priorities, others may now
            // be the ones to take messages.
            for c in &s.consumers {
                self.notices.push(Notice::QueueReady(c.queue.clone()));
            }
        } else {
            s.prefetch = prefetch_count;
        }
        Ok(())
    }

    /// basic.consume on `queue`; an empty `consumer_tag` gets a generated `amq.ctag-…`.
    /// Returns the tag. Fails with ACCESS_REFUSED when the queue has an exclusive consumer or
    /// an exclusive consumer is asked for a queue that has consumers.
    pub fn consume(
        &mut self,
        session: SessionId,
        queue: &str,
        consumer_tag: &str,
        options: ConsumeOptions,
        now_ms: u64,
    ) -> Result<ShortString, BrokerError> {
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(BrokerError::UnknownSession { session: session.0 })?;
        let q = self
            .queues
            .get_mut(queue)
            .ok_or_else(|| BrokerError::not_found(EntityKind::Queue, queue))?;
        q.check_owner(s.owner)?;
        // An exclusive consumer needs the queue to itself; RabbitMQ never grants one on a
        // single-active-consumer queue.
        let alone = q.consumers.is_empty() && !q.single_active();
        if q.exclusive_consumer || (options.exclusive && !alone) {
            return Err(BrokerError::access_refused(
                EntityKind::Queue,
                queue,
                "queue in exclusive use",
            ));
        }
        let tag = if consumer_tag.is_empty() {
            ShortString::from(random_name(
                &self.hasher,
                &mut self.name_counter,
                "amq.ctag-",
            ))
        } else if s.consumer_index(consumer_tag).is_some() {
            return Err(BrokerError::ConsumerTagInUse {
                tag: consumer_tag.to_owned(),
            });
        } else {
            ShortString::from(consumer_tag)
        };
        let id = s.new_consumer_id();
        s.consumers.push(Consumer {
            tag: tag.clone(),
            id,
            queue: q.name.clone(),
            queue_id: q.id,
            no_ack: options.no_ack,
            exclusive: options.exclusive,
            prefetch: s.prefetch,
            unacked: 0,
            priority: options.priority,
            pending: VecDeque::new(),
        });
        q.add_consumer(ConsumerRef {
            session,
            id,
            priority: options.priority,
        });
        q.exclusive_consumer |= options.exclusive;
        q.last_used_ms = now_ms;
        Ok(tag)
    }

    /// basic.cancel; returns whether the consumer existed. Its unacked messages stay unacked
    /// on the session, except those the broker handed it that it never took (see
    /// [`take_turn`](Self::take_turn)): they are requeued. An auto-delete queue losing its last
    /// consumer is deleted; with `x-single-active-consumer`, the next consumer takes over.
    pub fn cancel(
        &mut self,
        session: SessionId,
        consumer_tag: &str,
        now_ms: u64,
    ) -> Result<bool, BrokerError> {
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(BrokerError::UnknownSession { session: session.0 })?;
        let Some(i) = s.consumer_index(consumer_tag) else {
            return Ok(false);
        };
        let c = s.consumers.remove(i);
        if !c.pending.is_empty() && !c.no_ack {
            let mut settled = std::mem::take(&mut self.settled);
            settled.clear();
            for d in &c.pending {
                // Cannot fail: the tag is tracked until settled.
                let _ = s.settle(d.delivery_tag, false, &mut settled);
            }
            self.requeue(&mut settled);
            self.settled = settled;
        }
        self.release_consumer(session, &c, now_ms);
        Ok(true)
    }

    fn release_consumer(&mut self, session: SessionId, c: &Consumer, now_ms: u64) {
        let Some(q) = self.queues.get_mut(&*c.queue) else {
            return;
        };
        if q.id != c.queue_id {
            return;
        }
        q.remove_consumer(session, c.id);
        if c.exclusive {
            q.exclusive_consumer = false;
        }
        q.last_used_ms = now_ms;
        if q.consumers.is_empty() {
            if q.auto_delete {
                let name = q.name.clone();
                self.remove_queue(&name);
            } else {
                // Unused from now on: its `x-expires` starts running.
                note_deadlines(&mut self.new_deadline, q);
            }
        } else if !q.store.is_empty() {
            // Another consumer may take over: the next single active consumer, or lower
            // priorities.
            self.notices.push(Notice::QueueReady(q.name.clone()));
        }
    }

    /// basic.get: the next message of `queue`, ignoring prefetch. Unless `no_ack`, it stays
    /// unacked on the session until acked, rejected or the session closes. Expired messages met
    /// on the way are dead-lettered.
    pub fn get(
        &mut self,
        session: SessionId,
        queue: &str,
        no_ack: bool,
        now_ms: u64,
    ) -> Result<Option<Delivery>, BrokerError> {
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(BrokerError::UnknownSession { session: session.0 })?;
        let q = self
            .queues
            .get_mut(queue)
            .ok_or_else(|| BrokerError::not_found(EntityKind::Queue, queue))?;
        q.check_owner(s.owner)?;
        q.last_used_ms = now_ms;
        let popped = q.store.pop(now_ms, &mut self.scratch);
        if !self.scratch.is_empty() {
            schedule_dead(
                &mut self.pending_dead,
                q,
                &mut self.scratch,
                DeathReason::Expired,
            );
        }
        // Taking the head exposes the next one (and moves `x-expires` on).
        note_deadlines(&mut self.new_deadline, q);
        let delivery = popped.map(|m| deliver(s, q, m, no_ack, None));
        if !self.pending_dead.is_empty() {
            self.process_dead_letters(now_ms);
        }
        Ok(delivery)
    }

    /// The next message for consumer `consumer_tag` of `session`, or `None` when its queue is
    /// empty or a prefetch limit is reached (settle deliveries to make room).
    pub fn next_for_consumer(
        &mut self,
        session: SessionId,
        consumer_tag: &str,
        now_ms: u64,
    ) -> Result<Option<Delivery>, BrokerError> {
        let mut one = Vec::with_capacity(1);
        self.drain_for_consumer(session, consumer_tag, 1, now_ms, &mut one)?;
        Ok(one.pop())
    }

    /// Up to `max` messages for consumer `consumer_tag`, appended to `out` (stopping early at
    /// an empty queue or a prefetch limit); returns how many. One lookup for the whole batch.
    ///
    /// Only a consumer entitled to its queue's messages gets them: with
    /// `x-single-active-consumer` the active one, otherwise one that no consumer of a higher
    /// priority with room comes before. Messages the broker already handed the consumer (see
    /// [`take_turn`](Self::take_turn)) come first.
    pub fn drain_for_consumer(
        &mut self,
        session: SessionId,
        consumer_tag: &str,
        max: usize,
        now_ms: u64,
        out: &mut Vec<Delivery>,
    ) -> Result<usize, BrokerError> {
        self.take(session, consumer_tag, max, false, now_ms, out)
            .map(|t| t.taken)
    }

    /// [`drain_for_consumer`](Self::drain_for_consumer) for a transport that wakes all the
    /// consumers of a queue when messages arrive: it takes only one message when another
    /// consumer has an equal claim on the queue (same priority, no single active consumer), so
    /// that consumers woken together take turns as RabbitMQ's round-robin has them, and reports
    /// whether to wake the others for what is left.
    ///
    /// Not every message waits for a consumer to take it: one whose TTL in its queue is 0 is
    /// delivered when it arrives (RabbitMQ hands it to a consumer with room, or drops it), and
    /// waits in that consumer's own buffer for its next call here. Its queue is among the
    /// publish outcome's (or a [`Notice::QueueReady`]), so waking the queue's consumers then
    /// reaches it.
    pub fn take_turn(
        &mut self,
        session: SessionId,
        consumer_tag: &str,
        max: usize,
        now_ms: u64,
        out: &mut Vec<Delivery>,
    ) -> Result<Turn, BrokerError> {
        self.take(session, consumer_tag, max, true, now_ms, out)
    }

    fn take(
        &mut self,
        session: SessionId,
        consumer_tag: &str,
        max: usize,
        fair: bool,
        now_ms: u64,
        out: &mut Vec<Delivery>,
    ) -> Result<Turn, BrokerError> {
        let s = self
            .sessions
            .get(&session)
            .ok_or(BrokerError::UnknownSession { session: session.0 })?;
        let ci = s
            .consumer_index(consumer_tag)
            .ok_or_else(|| BrokerError::not_found(EntityKind::Consumer, consumer_tag))?;
        let Some(c) = s.consumers.get(ci) else {
            return Ok(Turn::default());
        };
        let (id, priority, no_ack) = (c.id, c.priority, c.no_ack);
        let Some(q) = self.queues.get_mut(&*c.queue) else {
            return Ok(Turn::default());
        };
        let claim = q.claim(&self.sessions, session, id, priority);
        let Some(s) = self.sessions.get_mut(&session) else {
            return Ok(Turn::default());
        };
        let max = if fair && claim.peers { max.min(1) } else { max };
        let mut n = 0;
        if let Some(c) = s.consumers.get_mut(ci) {
            while n < max {
                let Some(d) = c.pending.pop_front() else {
                    break;
                };
                out.push(d);
                n += 1;
            }
        }
        if claim.eligible {
            while n < max && s.consumer_has_credit(ci) {
                let Some(m) = q.store.pop(now_ms, &mut self.scratch) else {
                    break;
                };
                out.push(deliver(s, q, m, no_ack, Some(ci)));
                n += 1;
            }
        }
        let left = !q.store.is_empty();
        if claim.eligible {
            // Taking heads exposes the next ones.
            note_deadlines(&mut self.new_deadline, q);
        }
        if !self.scratch.is_empty() {
            schedule_dead(
                &mut self.pending_dead,
                q,
                &mut self.scratch,
                DeathReason::Expired,
            );
            self.process_dead_letters(now_ms);
        }
        Ok(Turn {
            taken: n,
            wake_others: n > 0 && left && claim.others,
        })
    }

    /// basic.ack: settle `delivery_tag` (with `multiple`, every tag up to it; 0 + multiple =
    /// all). Returns how many messages were acked. An unknown tag fails
    /// ([`BrokerError::UnknownDeliveryTag`]) and settles nothing.
    pub fn ack(
        &mut self,
        session: SessionId,
        delivery_tag: u64,
        multiple: bool,
    ) -> Result<usize, BrokerError> {
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(BrokerError::UnknownSession { session: session.0 })?;
        self.settled.clear();
        s.settle(delivery_tag, multiple, &mut self.settled)?;
        let n = self.settled.len();
        self.settled.clear();
        Ok(n)
    }

    /// basic.nack: like [`ack`](Self::ack) but the messages are requeued at their original
    /// positions in their queues (`requeue`, marked redelivered) or dead-lettered with reason
    /// `rejected` (dropped when the queue has no dead-letter exchange). Returns how many.
    pub fn nack(
        &mut self,
        session: SessionId,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
        now_ms: u64,
    ) -> Result<usize, BrokerError> {
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(BrokerError::UnknownSession { session: session.0 })?;
        let mut settled = std::mem::take(&mut self.settled);
        settled.clear();
        let r = s.settle(delivery_tag, multiple, &mut settled);
        let n = settled.len();
        if r.is_ok() {
            if requeue {
                self.requeue(&mut settled);
            } else {
                self.reject_settled(&mut settled, now_ms);
            }
        }
        settled.clear();
        self.settled = settled;
        r.map(|()| n)
    }

    /// basic.reject: [`nack`](Self::nack) of one tag.
    pub fn reject(
        &mut self,
        session: SessionId,
        delivery_tag: u64,
        requeue: bool,
        now_ms: u64,
    ) -> Result<(), BrokerError> {
        self.nack(session, delivery_tag, false, requeue, now_ms)
            .map(drop)
    }

    /// basic.recover: requeue every unacked message of the session (redelivered). RabbitMQ
    /// does not implement `requeue = false` (redelivery to the same consumer); it is treated as
    /// `true`. Returns how many.
    pub fn recover(&mut self, session: SessionId, requeue: bool) -> Result<usize, BrokerError> {
        let _ = requeue;
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(BrokerError::UnknownSession { session: session.0 })?;
        let mut settled = std::mem::take(&mut self.settled);
        settled.clear();
        s.settle_all(&mut settled);
        let n = self.requeue(&mut settled);
        self.settled = settled;
        Ok(n)
    }

    /// Unacked deliveries held by `session`.
    pub fn unacked_count(&self, session: SessionId) -> Option<usize> {
        self.sessions.get(&session).map(Session::unacked_count)
    }

    /// The length of `session`'s unacked list, settled entries not yet dropped included (tests).
    #[cfg(test)]
    pub(crate) fn tracked_entries(&self, session: SessionId) -> Option<usize> {
        self.sessions.get(&session).map(Session::tracked_entries)
    }

    /// Put settled messages back at their original positions in their queues; messages of
    /// deleted queues are dropped. Returns how many were requeued.
    fn requeue(&mut self, settled: &mut Vec<Settled>) -> usize {
        let mut n = 0;
        for st in settled.drain(..).rev() {
            let Some(q) = self.queues.get_mut(&*st.queue) else {
                continue;
            };
            if q.id != st.queue_id {
                continue;
            }
            let mut m = st.message;
            m.redelivered = true;
            q.store.requeue(m);
            if !q.timed && q.store.has_expiring() {
                q.timed = true;
                self.timed.insert(q.name.clone());
            }
            note_deadlines(&mut self.new_deadline, q);
            n += 1;
            let fresh =
                !matches!(self.notices.last(), Some(Notice::QueueReady(last)) if *last == q.name);
            if fresh {
                self.notices.push(Notice::QueueReady(q.name.clone()));
            }
        }
        n
    }

    fn reject_settled(&mut self, settled: &mut Vec<Settled>, now_ms: u64) {
        for st in settled.drain(..) {
            let Some(q) = self.queues.get(&*st.queue) else {
                continue;
            };
            if q.id != st.queue_id {
                continue;
            }
            self.scratch.push(st.message);
            schedule_dead(
                &mut self.pending_dead,
                q,
                &mut self.scratch,
                DeathReason::Rejected,
            );
        }
        if !self.pending_dead.is_empty() {
            self.process_dead_letters(now_ms);
        }
    }

    // ---------------------------------------------------------------- time

    /// Do everything due at `now_ms`: route delayed messages that fell due, remove (and
    /// dead-letter) expired messages at the heads of queues, delete queues unused for their
    /// `x-expires`. Returns how many messages expired.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let mut routed = RoutedQueues::new();
        let mut rejected = Vec::new();
        while self.delayed.peek().is_some_and(|d| d.due <= now_ms) {
            let Some(d) = self.delayed.pop() else {
                break;
            };
            let Some(x) = self.router.exchange(&d.exchange) else {
                continue;
            };
            routed.clear();
            rejected.clear();
            let headers = d.message.properties.headers.as_ref();
            self.router
                .route_exchange(x, &d.message.routing_key, headers, &mut routed);
            let ttl = message_ttl(&d.message.properties).ok().flatten();
            self.enqueue(&mut routed, &d.message, ttl, now_ms, &mut rejected);
            for q in routed.iter() {
                self.notices.push(Notice::QueueReady(q.clone()));
            }
        }

        let mut expired = 0;
        let mut unused = Vec::new();
        let names: Vec<Arc<str>> = self.timed.iter().cloned().collect();
        for name in names {
            let Some(q) = self.queues.get_mut(&*name) else {
                self.timed.remove(&name);
                continue;
            };
            expired += q.store.expire(now_ms, &mut self.scratch);
            if !self.scratch.is_empty() {
                schedule_dead(
                    &mut self.pending_dead,
                    q,
                    &mut self.scratch,
                    DeathReason::Expired,
                );
            }
            if q.expires_deadline().is_some_and(|t| t <= now_ms) {
                unused.push(name);
            } else if !q.needs_timer() {
                q.timed = false;
                self.timed.remove(&name);
            }
        }
        self.process_dead_letters(now_ms);
        for name in unused {
            self.remove_queue(&name);
        }
        let next = self.next_expiry();
        sooner(&mut self.new_deadline, next);
        expired
    }

    /// The earliest time at which [`expire`](Self::expire) has work: a message at the head of
    /// a queue expiring, an unused queue reaching its `x-expires`, a delayed message falling
    /// due. Recompute after each operation (consuming a head can expose an earlier expiry).
    pub fn next_expiry(&self) -> Option<u64> {
        let mut best = self.delayed.peek().map(|d| d.due);
        for name in &self.timed {
            if let Some(q) = self.queues.get(&**name) {
                for t in [q.store.next_expiry(), q.expires_deadline()]
                    .into_iter()
                    .flatten()
                {
                    best = Some(best.map_or(t, |b| b.min(t)));
                }
            }
        }
        best
    }

    /// The soonest deadline scheduled by the calls since the last call of this (a message
    /// reaching the head of a queue where it can expire, a delayed message, an unused queue's
    /// `x-expires` starting to run), or `None` when nothing was scheduled.
    ///
    /// For a transport that sleeps until [`next_expiry`](Self::next_expiry) to call
    /// [`expire`](Self::expire): when this is sooner than its timer, it must re-arm it, or the
    /// expiry (and the dead-lettering or delayed delivery it brings) waits for some unrelated
    /// call. A deadline reported here may already be past, and may be the only report of it;
    /// one that turns out not to be due by then is harmless (`expire` finds nothing).
    pub fn take_new_deadline(&mut self) -> Option<u64> {
        self.new_deadline.take()
    }

    // ---------------------------------------------------------------- notices

    /// Take the notices gathered since the last call (each ready queue reported once).
    pub fn take_notices(&mut self) -> Vec<Notice> {
        let mut v = std::mem::take(&mut self.notices);
        if v.len() > 1 {
            let mut seen: HashSet<Arc<str>> = HashSet::new();
            v.retain(|n| match n {
                Notice::QueueReady(q) => seen.insert(q.clone()),
                _ => true,
            });
        }
        v
    }

    /// True when notices are waiting.
    pub fn has_notices(&self) -> bool {
        !self.notices.is_empty()
    }
}

/// Hand `m` out on session `s`, tracking it unless `no_ack`.
#[inline]
fn deliver(
    s: &mut Session,
    q: &QueueState,
    m: QueuedMessage,
    no_ack: bool,
    consumer: Option<usize>,
) -> Delivery {
    let delivery_tag = s.take_tag();
    let d = Delivery {
        delivery_tag,
        redelivered: m.redelivered,
        message: m.message.clone(),
        message_count: count_u32(q.store.len()),
    };
    if !no_ack {
        s.track(delivery_tag, q.name.clone(), q.id, m, consumer);
    }
    d
}
