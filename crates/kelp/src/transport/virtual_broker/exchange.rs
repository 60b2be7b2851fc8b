//! Exchanges, bindings and routing: the part of the broker that needs no queue storage.
//!
//! [`Router`] holds the topology (exchanges, the names of existing queues, bindings) and
//! answers "which queues does this message go to?". Transports that store messages elsewhere
//! (Redis, SQLite) can use it alone.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use kelp_amqp::{FieldTable, FieldValue};

use super::error::{BrokerError, EntityKind};
use super::headers::HeadersMatcher;
use super::topic::TopicTrie;

/// The type of an exchange.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    /// Routes to bindings whose key equals the routing key.
    Direct,
    /// Routes by pattern: `*` matches one dot-separated word, `#` zero or more.
    Topic,
    /// Routes to every binding.
    Fanout,
    /// Routes by message headers against binding arguments (`x-match`).
    Headers,
    /// Any other type name. `x-delayed-message` (RabbitMQ's delayed-message plugin) is
    /// supported: it routes like its `x-delayed-type` argument and holds messages carrying a
    /// positive integer `x-delay` header (ms) until [`expire`](super::VirtualBroker::expire)
    /// reaches their due time. Other names are refused at declaration with
    /// [`BrokerError::UnknownExchangeType`], as RabbitMQ does without the plugin.
    Other(String),
}

impl ExchangeKind {
    /// The type name of the delayed-message plugin's exchange.
    pub const DELAYED_MESSAGE: &'static str = "x-delayed-message";

    /// Parse a type name (`"direct"`, `"topic"`, …); unknown names become [`ExchangeKind::Other`].
    pub fn parse(name: &str) -> Self {
        match name {
            "direct" => ExchangeKind::Direct,
            "topic" => ExchangeKind::Topic,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            other => ExchangeKind::Other(other.to_owned()),
        }
    }

    /// The type name.
    pub fn as_str(&self) -> &str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Headers => "headers",
            ExchangeKind::Other(s) => s,
        }
    }
}

impl From<&str> for ExchangeKind {
    fn from(s: &str) -> Self {
        ExchangeKind::parse(s)
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The flags of exchange.declare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangeOptions {
    /// Only check that the exchange exists.
    pub passive: bool,
    /// Survives a broker restart (recorded and compared; the memory core keeps nothing).
    pub durable: bool,
    /// Deleted when its last binding (as source) is removed.
    pub auto_delete: bool,
    /// Cannot be published to directly, only through exchange-to-exchange bindings.
    pub internal: bool,
}

/// Where a binding delivers: a queue or another exchange.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// A queue, by name.
    Queue(Arc<str>),
    /// An exchange, by name.
    Exchange(Arc<str>),
}

impl Destination {
    /// The destination's name.
    pub fn name(&self) -> &Arc<str> {
        match self {
            Destination::Queue(n) | Destination::Exchange(n) => n,
        }
    }
}

/// One binding, as listed by [`Router::bindings`].
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// The source exchange.
    pub source: Arc<str>,
    /// The destination.
    pub destination: Destination,
    /// The binding key.
    pub routing_key: Arc<str>,
    /// The binding arguments.
    pub arguments: FieldTable,
}

#[derive(Debug)]
struct HeadersBinding {
    arguments: FieldTable,
    matcher: HeadersMatcher,
    destination: Destination,
}

/// The routing index of one exchange, by kind.
#[derive(Debug)]
enum Table {
    Direct(HashMap<Arc<str>, Vec<Destination>>),
    Topic(TopicTrie<Destination>),
    Fanout(Vec<Destination>),
    Headers(Vec<HeadersBinding>),
}

/// Binding arguments identify a binding regardless of their order (RabbitMQ sorts them).
fn same_arguments(a: &FieldTable, b: &FieldTable) -> bool {
    a.len() == b.len() && a.iter().all(|(k, v)| b.get(k) == Some(v))
}

fn remove_one(v: &mut Vec<Destination>, d: &Destination) -> bool {
    match v.iter().position(|x| x == d) {
        Some(i) => {
            v.swap_remove(i);
            true
        }
        None => false,
    }
}

impl Table {
    fn new(kind: &ExchangeKind) -> Option<Self> {
        Some(match kind {
            ExchangeKind::Direct => Table::Direct(HashMap::new()),
            ExchangeKind::Topic => Table::Topic(TopicTrie::new()),
            ExchangeKind::Fanout => Table::Fanout(Vec::new()),
            ExchangeKind::Headers => Table::Headers(Vec::new()),
            ExchangeKind::Other(_) => return None,
        })
    }

    fn insert(
        &mut self,
        key: &Arc<str>,
        arguments: &FieldTable,
        matcher: Option<HeadersMatcher>,
        d: Destination,
    ) {
        match self {
            Table::Direct(m) => m.entry(key.clone()).or_default().push(d),
            Table::Topic(t) => t.insert(key, d),
            Table::Fanout(v) => v.push(d),
            Table::Headers(v) => {
                if let Some(matcher) = matcher {
                    v.push(HeadersBinding {
                        arguments: arguments.clone(),
                        matcher,
                        destination: d,
                    });
                }
            }
        }
    }

    fn remove(&mut self, key: &str, arguments: &FieldTable, d: &Destination) {
        match self {
            Table::Direct(m) => {
                if let Some(v) = m.get_mut(key) {
                    remove_one(v, d);
                    if v.is_empty() {
                        m.remove(key);
                    }
                }
            }
            Table::Topic(t) => {
                t.remove(key, d);
            }
            Table::Fanout(v) => {
                remove_one(v, d);
            }
            Table::Headers(v) => {
                if let Some(i) = v
                    .iter()
                    .position(|b| b.destination == *d && same_arguments(&b.arguments, arguments))
                {
                    v.swap_remove(i);
                }
            }
        }
    }

    /// Call `f` for each matching destination; returns whether there was any.
    #[inline]
    fn for_each_match<'a, F: FnMut(&'a Destination)>(
        &'a self,
        key: &str,
        headers: Option<&FieldTable>,
        f: &mut F,
    ) -> bool {
        let mut any = false;
        let mut g = |d: &'a Destination| {
            any = true;
            f(d)
        };
        match self {
            Table::Direct(m) => {
                if let Some(v) = m.get(key) {
                    v.iter().for_each(&mut g);
                }
            }
            Table::Topic(t) => t.for_each_match(key, &mut g),
            Table::Fanout(v) => v.iter().for_each(&mut g),
            Table::Headers(v) => v
                .iter()
                .filter(|b| b.matcher.matches(headers))
                .for_each(|b| g(&b.destination)),
        }
        any
    }
}

/// An exchange: its declared properties and its bindings.
#[derive(Debug)]
pub struct Exchange {
    name: Arc<str>,
    kind: ExchangeKind,
    durable: bool,
    auto_delete: bool,
    internal: bool,
    arguments: FieldTable,
    alternate: Option<Arc<str>>,
    delayed: bool,
    table: Table,
    /// Bindings with this exchange as source, by destination: (key, arguments).
    outgoing: HashMap<Destination, Vec<(Arc<str>, FieldTable)>>,
    binding_count: usize,
}

impl Exchange {
    /// Its name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }
    /// Its type.
    pub fn kind(&self) -> &ExchangeKind {
        &self.kind
    }
    /// Declared durable.
    pub fn is_durable(&self) -> bool {
        self.durable
    }
    /// Declared auto-delete.
    pub fn is_auto_delete(&self) -> bool {
        self.auto_delete
    }
    /// Declared internal (not publishable directly).
    pub fn is_internal(&self) -> bool {
        self.internal
    }
    /// The declaration arguments.
    pub fn arguments(&self) -> &FieldTable {
        &self.arguments
    }
    /// The `alternate-exchange` argument: where messages it cannot route go.
    pub fn alternate_exchange(&self) -> Option<&str> {
        self.alternate.as_deref()
    }
    /// True for an `x-delayed-message` exchange.
    pub fn is_delayed(&self) -> bool {
        self.delayed
    }
    /// Number of bindings with this exchange as source.
    pub fn binding_count(&self) -> usize {
        self.binding_count
    }
}

/// The queues a message is routed to, each once. Holds one queue without allocating.
#[derive(Debug, Clone, Default)]
pub struct RoutedQueues {
    first: Option<Arc<str>>,
    rest: Vec<Arc<str>>,
    index: Option<HashSet<Arc<str>>>,
}

/// Above this many queues, de-duplication switches from a scan to a hash set.
const INDEX_AT: usize = 8;

#[inline]
fn same(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

impl RoutedQueues {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `queue` unless present; returns whether it was added.
    pub fn push(&mut self, queue: &Arc<str>) -> bool {
        let Some(first) = &self.first else {
            self.first = Some(queue.clone());
            return true;
        };
        if same(first, queue) {
            return false;
        }
        match &mut self.index {
            Some(ix) => {
                if !ix.insert(queue.clone()) {
                    return false;
                }
            }
            None => {
                if self.rest.iter().any(|r| same(r, queue)) {
                    return false;
                }
                if self.rest.len() >= INDEX_AT {
                    let mut ix: HashSet<Arc<str>> = self.rest.iter().cloned().collect();
                    ix.insert(first.clone());
                    ix.insert(queue.clone());
                    self.index = Some(ix);
                }
            }
        }
        self.rest.push(queue.clone());
        true
    }

    /// Number of queues.
    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// The queues, in routing order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        self.first.iter().chain(self.rest.iter())
    }

    /// True when `queue` is in the set.
    pub fn contains(&self, queue: &str) -> bool {
        self.iter().any(|q| &**q == queue)
    }

    /// Keep only the queues for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&Arc<str>) -> bool) {
        let all: Vec<Arc<str>> = self
            .first
            .take()
            .into_iter()
            .chain(self.rest.drain(..))
            .collect();
        self.index = None;
        for q in all.iter().filter(|q| keep(q)) {
            self.push(q);
        }
    }

    /// Remove all.
    pub fn clear(&mut self) {
        self.first = None;
        self.rest.clear();
        self.index = None;
    }
}

impl<'a> IntoIterator for &'a RoutedQueues {
    type Item = &'a Arc<str>;
    type IntoIter =
        std::iter::Chain<std::option::Iter<'a, Arc<str>>, std::slice::Iter<'a, Arc<str>>>;
    fn into_iter(self) -> Self::IntoIter {
        self.first.iter().chain(self.rest.iter())
    }
}

/// The standard exchanges every vhost has.
const STANDARD: [(&str, ExchangeKind); 5] = [
    ("amq.direct", ExchangeKind::Direct),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

fn is_reserved(name: &str) -> bool {
    name.starts_with("amq.")
}

fn default_exchange_refused() -> BrokerError {
    BrokerError::access_refused(
        EntityKind::Exchange,
        "",
        "operation not permitted on the default exchange",
    )
}

fn string_arg(args: &FieldTable, key: &str) -> Option<String> {
    args.get(key)
        .and_then(FieldValue::as_str)
        .map(str::to_owned)
}

/// The topology: exchanges, the names of existing queues, and the bindings between them.
///
/// The default exchange `""` is implicit: it routes to the queue named by the routing key, and
/// cannot be declared, deleted or bound. The standard `amq.direct`, `amq.topic`, `amq.fanout`,
/// `amq.headers` and `amq.match` exist from the start; other `amq.*` names are reserved.
#[derive(Debug)]
pub struct Router {
    exchanges: HashMap<Arc<str>, Exchange>,
    queues: HashSet<Arc<str>>,
    /// For each destination, the source exchange of each binding to it (one entry per binding).
    incoming: HashMap<Destination, Vec<Arc<str>>>,
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl Router {
    /// A router with the standard exchanges and no queues.
    pub fn new() -> Self {
        let mut r = Router {
            exchanges: HashMap::new(),
            queues: HashSet::new(),
            incoming: HashMap::new(),
        };
        for (name, kind) in STANDARD {
            let name: Arc<str> = Arc::from(name);
            if let Some(table) = Table::new(&kind) {
                r.exchanges.insert(
                    name.clone(),
                    Exchange {
                        name,
                        kind,
                        durable: true,
                        auto_delete: false,
                        internal: false,
                        arguments: FieldTable::new(),
                        alternate: None,
                        delayed: false,
                        table,
                        outgoing: HashMap::new(),
                        binding_count: 0,
                    },
                );
            }
        }
        r
    }

    /// The exchange called `name` (never the default exchange).
    pub fn exchange(&self, name: &str) -> Option<&Exchange> {
        self.exchanges.get(name)
    }

    /// All exchanges (not the default one).
    pub fn exchanges(&self) -> impl Iterator<Item = &Exchange> {
        self.exchanges.values()
    }

    /// Declare an exchange with RabbitMQ's checks: a passive declaration only tests existence;
    /// redeclaring with another type, `durable`, `auto_delete`, `internal` or
    /// `alternate-exchange` fails with [`BrokerError::Inequivalent`]; creating an `amq.*` name or
    /// touching the default exchange is refused. Returns true when it was created.
    pub fn declare_exchange(
        &mut self,
        name: &str,
        kind: &ExchangeKind,
        options: ExchangeOptions,
        arguments: &FieldTable,
    ) -> Result<bool, BrokerError> {
        if options.passive {
            return if name.is_empty() || self.exchanges.contains_key(name) {
                Ok(false)
            } else {
                Err(BrokerError::not_found(EntityKind::Exchange, name))
            };
        }
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        let (table_kind, delayed) =
            match kind {
                ExchangeKind::Other(k) if k == ExchangeKind::DELAYED_MESSAGE => {
                    let inner = arguments
                        .get("x-delayed-type")
                        .and_then(FieldValue::as_str)
                        .map(ExchangeKind::parse);
                    match inner {
                        Some(
                            k @ (ExchangeKind::Direct
                            | ExchangeKind::Topic
                            | ExchangeKind::Fanout
                            | ExchangeKind::Headers),
                        ) => (k, true),
                        _ => return Err(BrokerError::invalid_arg(
                            EntityKind::Exchange,
                            name,
                            "x-delayed-type",
                            "must name an existing exchange type (direct, topic, fanout, headers)"
                                .to_owned(),
                        )),
                    }
                }
                ExchangeKind::Other(k) => {
                    return Err(BrokerError::UnknownExchangeType { kind: k.clone() })
                }
                k => (k.clone(), false),
            };
        let alternate = string_arg(arguments, "alternate-exchange");
        if let Some(x) = self.exchanges.get(name) {
            let ineq = |arg: &str, received: String, current: String| {
                Err(BrokerError::inequivalent(
                    EntityKind::Exchange,
                    name,
                    arg,
                    received,
                    current,
                ))
            };
            if x.kind != *kind {
                return ineq("type", format!("'{kind}'"), format!("'{}'", x.kind));
            }
            if x.durable != options.durable {
                return ineq(
                    "durable",
                    options.durable.to_string(),
                    x.durable.to_string(),
                );
            }
            if x.auto_delete != options.auto_delete {
                return ineq(
                    "auto_delete",
                    options.auto_delete.to_string(),
                    x.auto_delete.to_string(),
                );
            }
            if x.internal != options.internal {
                return ineq(
                    "internal",
                    options.internal.to_string(),
                    x.internal.to_string(),
                );
            }
            if x.alternate.as_deref() != alternate.as_deref() {
                return ineq(
                    "alternate-exchange",
                    format!("{alternate:?}"),
                    format!("{:?}", x.alternate),
                );
            }
            if delayed {
                let have = x
                    .arguments
                    .get("x-delayed-type")
                    .and_then(FieldValue::as_str);
                let want = arguments.get("x-delayed-type").and_then(FieldValue::as_str);
                if have != want {
                    return ineq("x-delayed-type", format!("{want:?}"), format!("{have:?}"));
                }
            }
            return Ok(false);
        }
        if is_reserved(name) {
            return Err(BrokerError::access_refused(
                EntityKind::Exchange,
                name,
                "exchange names starting with 'amq.' are reserved",
            ));
        }
        let Some(table) = Table::new(&table_kind) else {
            return Err(BrokerError::UnknownExchangeType {
                kind: kind.to_string(),
            });
        };
        let name: Arc<str> = Arc::from(name);
        self.exchanges.insert(
            name.clone(),
            Exchange {
                name,
                kind: kind.clone(),
                durable: options.durable,
                auto_delete: options.auto_delete,
                internal: options.internal,
                arguments: arguments.clone(),
                alternate: alternate.map(Arc::from),
                delayed,
                table,
                outgoing: HashMap::new(),
                binding_count: 0,
            },
        );
        Ok(true)
    }

    /// Delete an exchange and every binding to or from it. Deleting a missing exchange succeeds
    /// (returns false), as in RabbitMQ; the default and `amq.*` exchanges cannot be deleted.
    /// With `if_unused`, an exchange that is the source of bindings is not deleted
    /// ([`BrokerError::InUse`]). Auto-delete exchanges left without bindings go too.
    pub fn delete_exchange(&mut self, name: &str, if_unused: bool) -> Result<bool, BrokerError> {
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        if is_reserved(name) {
            return Err(BrokerError::access_refused(
                EntityKind::Exchange,
                name,
                "exchange names starting with 'amq.' are reserved",
            ));
        }
        let Some(x) = self.exchanges.get(name) else {
            return Ok(false);
        };
        if if_unused && x.binding_count > 0 {
            return Err(BrokerError::InUse {
                kind: EntityKind::Exchange,
                name: name.to_owned(),
            });
        }
        let name = x.name.clone();
        self.remove_exchanges(name);
        Ok(true)
    }

    /// Remove an exchange, then any auto-delete exchange that lost its last binding as a result.
    fn remove_exchanges(&mut self, first: Arc<str>) {
        let mut work = vec![first];
        while let Some(name) = work.pop() {
            let Some(x) = self.exchanges.remove(&*name) else {
                continue;
            };
            for (dest, list) in &x.outgoing {
                for _ in list {
                    self.forget_incoming(dest, &x.name);
                }
            }
            self.detach_destination(&Destination::Exchange(x.name.clone()), &mut work);
        }
    }

    /// Drop one entry `source` from `incoming[dest]`.
    fn forget_incoming(&mut self, dest: &Destination, source: &str) {
        if let Some(v) = self.incoming.get_mut(dest) {
            if let Some(i) = v.iter().position(|s| &**s == source) {
                v.swap_remove(i);
            }
            if v.is_empty() {
                self.incoming.remove(dest);
            }
        }
    }

    /// Remove every binding to `dest`; auto-delete sources left unbound are pushed to `work`.
    fn detach_destination(&mut self, dest: &Destination, work: &mut Vec<Arc<str>>) {
        let Some(mut sources) = self.incoming.remove(dest) else {
            return;
        };
        sources.sort_unstable();
        sources.dedup();
        for src in sources {
            let Some(sx) = self.exchanges.get_mut(&*src) else {
                continue;
            };
            let Some(list) = sx.outgoing.remove(dest) else {
                continue;
            };
            for (key, args) in &list {
                sx.table.remove(key, args, dest);
            }
            sx.binding_count -= list.len();
            if sx.auto_delete && sx.binding_count == 0 {
                work.push(src);
            }
        }
    }

    /// Record that queue `name` exists (the default exchange routes to it; it can be bound).
    /// Returns false when it was already known.
    pub fn add_queue(&mut self, name: Arc<str>) -> bool {
        self.queues.insert(name)
    }

    /// Forget queue `name` and remove its bindings (auto-delete exchanges left unbound go too).
    /// Returns whether it was known.
    pub fn remove_queue(&mut self, name: &str) -> bool {
        let Some(name) = self.queues.take(name) else {
            return false;
        };
        let mut work = Vec::new();
        self.detach_destination(&Destination::Queue(name), &mut work);
        for x in work {
            self.remove_exchanges(x);
        }
        true
    }

    /// The stored name of queue `name`, if it exists.
    pub fn queue(&self, name: &str) -> Option<&Arc<str>> {
        self.queues.get(name)
    }

    fn queue_destination(&self, queue: &str) -> Result<Destination, BrokerError> {
        self.queues
            .get(queue)
            .map(|q| Destination::Queue(q.clone()))
            .ok_or_else(|| BrokerError::not_found(EntityKind::Queue, queue))
    }

    fn exchange_destination(&self, exchange: &str) -> Result<Destination, BrokerError> {
        if exchange.is_empty() {
            return Err(default_exchange_refused());
        }
        self.exchanges
            .get(exchange)
            .map(|x| Destination::Exchange(x.name.clone()))
            .ok_or_else(|| BrokerError::not_found(EntityKind::Exchange, exchange))
    }

    /// Bind `queue` to `exchange` (queue.bind). Binding twice is a no-op (returns false).
    pub fn bind_queue(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<bool, BrokerError> {
        let dest = self.queue_destination(queue)?;
        self.bind(exchange, dest, routing_key, arguments)
    }

    /// Remove a queue binding (queue.unbind). A missing binding is not an error (returns false).
    pub fn unbind_queue(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<bool, BrokerError> {
        let dest = self.queue_destination(queue)?;
        self.unbind(exchange, &dest, routing_key, arguments)
    }

    /// Bind exchange `destination` to exchange `source` (exchange.bind): messages routed by
    /// `source` to this binding continue through `destination`.
    pub fn bind_exchange(
        &mut self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<bool, BrokerError> {
        let dest = self.exchange_destination(destination)?;
        self.bind(source, dest, routing_key, arguments)
    }

    /// Remove an exchange-to-exchange binding (exchange.unbind).
    pub fn unbind_exchange(
        &mut self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<bool, BrokerError> {
        let dest = self.exchange_destination(destination)?;
        self.unbind(source, &dest, routing_key, arguments)
    }

    fn bind(
        &mut self,
        source: &str,
        dest: Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<bool, BrokerError> {
        if source.is_empty() {
            return Err(default_exchange_refused());
        }
        let x = self
            .exchanges
            .get_mut(source)
            .ok_or_else(|| BrokerError::not_found(EntityKind::Exchange, source))?;
        if let Some(list) = x.outgoing.get(&dest) {
            if list
                .iter()
                .any(|(k, a)| &**k == routing_key && same_arguments(a, arguments))
            {
                return Ok(false);
            }
        }
        let matcher = match x.table {
            Table::Headers(_) => Some(HeadersMatcher::new(arguments).map_err(|reason| {
                BrokerError::invalid_arg(EntityKind::Exchange, source, "x-match", reason)
            })?),
            _ => None,
        };
        let key: Arc<str> = Arc::from(routing_key);
        x.table.insert(&key, arguments, matcher, dest.clone());
        x.outgoing
            .entry(dest.clone())
            .or_default()
            .push((key, arguments.clone()));
        x.binding_count += 1;
        let src = x.name.clone();
        self.incoming.entry(dest).or_default().push(src);
        Ok(true)
    }

    fn unbind(
        &mut self,
        source: &str,
        dest: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<bool, BrokerError> {
        if source.is_empty() {
            return Err(default_exchange_refused());
        }
        let x = self
            .exchanges
            .get_mut(source)
            .ok_or_else(|| BrokerError::not_found(EntityKind::Exchange, source))?;
        let Some(list) = x.outgoing.get_mut(dest) else {
            return Ok(false);
        };
        let Some(i) = list
            .iter()
            .position(|(k, a)| &**k == routing_key && same_arguments(a, arguments))
        else {
            return Ok(false);
        };
        let (key, args) = list.swap_remove(i);
        if list.is_empty() {
            x.outgoing.remove(dest);
        }
        x.table.remove(&key, &args, dest);
        x.binding_count -= 1;
        let src = x.name.clone();
        let gone = x.auto_delete && x.binding_count == 0;
        self.forget_incoming(dest, &src);
        if gone {
            self.remove_exchanges(src);
        }
        Ok(true)
    }

    /// Every binding whose source is `exchange`.
    pub fn bindings(&self, exchange: &str) -> Vec<Binding> {
        let Some(x) = self.exchanges.get(exchange) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(x.binding_count);
        for (dest, list) in &x.outgoing {
            for (key, args) in list {
                out.push(Binding {
                    source: x.name.clone(),
                    destination: dest.clone(),
                    routing_key: key.clone(),
                    arguments: args.clone(),
                });
            }
        }
        out
    }

    /// Route a message published to `exchange` with `routing_key` and `headers`, adding each
    /// destination queue once to `out`. Exchange-to-exchange bindings are followed (each exchange
    /// at most once, so cycles end), and an exchange that matches nothing passes the message to
    /// its `alternate-exchange`. Fails only when `exchange` does not exist.
    pub fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut RoutedQueues,
    ) -> Result<(), BrokerError> {
        if exchange.is_empty() {
            self.route_default(routing_key, out);
            return Ok(());
        }
        let x = self
            .exchanges
            .get(exchange)
            .ok_or_else(|| BrokerError::not_found(EntityKind::Exchange, exchange))?;
        self.route_exchange(x, routing_key, headers, out);
        Ok(())
    }

    /// Route through the default exchange: to the queue named `routing_key`, if any.
    #[inline]
    pub fn route_default(&self, routing_key: &str, out: &mut RoutedQueues) {
        if let Some(q) = self.queues.get(routing_key) {
            out.push(q);
        }
    }

    /// Route from an exchange already looked up with [`Router::exchange`].
    pub fn route_exchange(
        &self,
        start: &Exchange,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut RoutedQueues,
    ) {
        let mut pending: Vec<&Exchange> = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        let mut x = start;
        loop {
            let matched = x
                .table
                .for_each_match(routing_key, headers, &mut |d| match d {
                    Destination::Queue(q) => {
                        out.push(q);
                    }
                    Destination::Exchange(e) => self.follow(e, start, &mut seen, &mut pending),
                });
            if !matched {
                if let Some(ae) = &x.alternate {
                    self.follow(ae, start, &mut seen, &mut pending);
                }
            }
            match pending.pop() {
                Some(next) => x = next,
                None => break,
            }
        }
    }

    /// Trie nodes visited to match `routing_key` on topic exchange `exchange` (tests: routing
    /// cost must not grow with the number of bindings).
    #[cfg(test)]
    pub(crate) fn topic_nodes_visited(&self, exchange: &str, routing_key: &str) -> Option<usize> {
        match &self.exchanges.get(exchange)?.table {
            Table::Topic(t) => Some(t.for_each_match_counted(routing_key, &mut |_| {})),
            _ => None,
        }
    }

    /// Queue exchange `name` for routing unless it was already visited.
    #[inline]
    fn follow<'a>(
        &'a self,
        name: &str,
        start: &Exchange,
        seen: &mut Vec<&'a str>,
        pending: &mut Vec<&'a Exchange>,
    ) {
        if *name == *start.name || seen.contains(&name) {
            return;
        }
        if let Some(x) = self.exchanges.get(name) {
            seen.push(&x.name);
            pending.push(x);
        }
    }
}
