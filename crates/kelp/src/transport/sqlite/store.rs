//! The SQLite file: schema, topology and message operations. Everything here is synchronous
//! and runs on tokio's blocking pool, one connection per kelp connection; several processes
//! share the file through SQLite's locking (WAL, `BEGIN IMMEDIATE` for every write).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kelp_amqp::codec::{ContentHeader, Writer};
use kelp_amqp::{BasicProperties, FieldTable};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::super::virtual_broker::{
    dead_lettered, BrokerError, DeathReason, EntityKind, ExchangeKind, ExchangeOptions,
    MessageData, Overflow, QueueArgs, RoutedQueues, Router,
};
use crate::error::Error;

/// The schema this code writes and reads.
pub const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kelp_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kelp_exchanges (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, durable INTEGER NOT NULL,
    auto_delete INTEGER NOT NULL, internal INTEGER NOT NULL, arguments BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS kelp_queues (
    name TEXT PRIMARY KEY, durable INTEGER NOT NULL, exclusive_owner TEXT,
    auto_delete INTEGER NOT NULL, arguments BLOB NOT NULL, last_used INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS kelp_bindings (
    source TEXT NOT NULL, destination TEXT NOT NULL, to_exchange INTEGER NOT NULL,
    routing_key TEXT NOT NULL, arguments BLOB NOT NULL,
    PRIMARY KEY (source, destination, to_exchange, routing_key, arguments));
CREATE TABLE IF NOT EXISTS kelp_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    state INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until INTEGER,
    expires_at INTEGER,
    redelivered INTEGER NOT NULL DEFAULT 0,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    properties BLOB NOT NULL,
    body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS kelp_messages_ready ON kelp_messages (queue, state, priority DESC, id);
CREATE INDEX IF NOT EXISTS kelp_messages_owner ON kelp_messages (owner);
CREATE INDEX IF NOT EXISTS kelp_messages_expiry ON kelp_messages (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS kelp_messages_leases ON kelp_messages (lease_until) WHERE state = 1;
";

pub(crate) fn db_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl Fn(rusqlite::Error) -> Error + 'a {
    move |e| Error::Sqlite {
        path: path.display().to_string(),
        what,
        reason: e.to_string(),
    }
}

fn encode_table(t: &FieldTable) -> Vec<u8> {
    t.encode_entries().map(|b| b.to_vec()).unwrap_or_default()
}

fn decode_table(b: Vec<u8>) -> FieldTable {
    FieldTable::decode_entries(Bytes::from(b)).unwrap_or_default()
}

fn encode_properties(p: &BasicProperties) -> Result<Vec<u8>, Error> {
    let mut buf = BytesMut::with_capacity(64);
    let header = ContentHeader {
        class_id: 60,
        body_size: 0,
        properties: p.clone(),
    };
    header
        .encode(&mut Writer::new(&mut buf))
        .map_err(kelp_amqp::Error::from)?;
    Ok(buf.to_vec())
}

fn decode_properties(b: Vec<u8>) -> BasicProperties {
    ContentHeader::decode(Bytes::from(b))
        .map(|h| h.properties)
        .unwrap_or_default()
}

/// Open (creating if needed) the file, check its schema version, set WAL.
pub(crate) fn open(path: &Path) -> Result<Connection, Error> {
    let e = db_err(path, "opening");
    let conn = Connection::open(path).map_err(&e)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(&e)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(&e)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(&e)?;
    conn.execute_batch(SCHEMA).map_err(|err| Error::Sqlite {
        path: path.display().to_string(),
        what: "creating the schema (is this a kelp database?)",
        reason: err.to_string(),
    })?;
    let version: Option<i64> = conn
        .query_row(
            "SELECT value FROM kelp_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(&e)?;
    match version {
        None => {
            conn.execute(
                "INSERT OR IGNORE INTO kelp_meta (key, value) VALUES ('schema_version', ?1), ('topology_version', 0)",
                params![SCHEMA_VERSION],
            )
            .map_err(&e)?;
        }
        Some(v) if v == SCHEMA_VERSION => {}
        Some(v) => {
            return Err(Error::Sqlite {
                path: path.display().to_string(),
                what: "checking the schema version",
                reason: format!(
                    "the file has kelp schema version {v}, this kelp reads version \
                     {SCHEMA_VERSION}: use a kelp that matches, or a new file"
                ),
            })
        }
    }
    Ok(conn)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A queue's settings, as far as storage needs them.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueueMeta {
    pub args: QueueArgs,
    pub exclusive_owner: Option<String>,
    pub auto_delete: bool,
    pub durable: bool,
    pub arguments: FieldTable,
}

/// The topology as of `version`, rebuilt when another writer changed it.
#[derive(Debug)]
pub(crate) struct Topology {
    pub version: i64,
    pub router: Router,
    pub queues: HashMap<String, QueueMeta>,
    /// Queues with a consumer in this process, as the caller saw them (for TTL-0 delivery
    /// and `x-expires`).
    pub live: std::collections::HashSet<String>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            version: -1,
            router: Router::new(),
            queues: HashMap::new(),
            live: Default::default(),
        }
    }
}

fn topology_version(tx: &Connection) -> rusqlite::Result<i64> {
    tx.query_row(
        "SELECT value FROM kelp_meta WHERE key = 'topology_version'",
        [],
        |r| r.get(0),
    )
}

fn bump(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE kelp_meta SET value = value + 1 WHERE key = 'topology_version'",
        [],
    )
    .map(|_| ())
}

/// Make `topo` current (reload from the file if its version moved).
pub(crate) fn refresh(conn: &Connection, topo: &mut Topology) -> rusqlite::Result<()> {
    let v = topology_version(conn)?;
    if v == topo.version {
        return Ok(());
    }
    let mut router = Router::new();
    let mut queues = HashMap::new();
    {
        let mut st = conn.prepare(
            "SELECT name, kind, durable, auto_delete, internal, arguments FROM kelp_exchanges",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, bool>(4)?,
                r.get::<_, Vec<u8>>(5)?,
            ))
        })?;
        for row in rows {
            let (name, kind, durable, auto_delete, internal, args) = row?;
            let opts = ExchangeOptions {
                passive: false,
                durable,
                auto_delete,
                internal,
            };
            let _ = router.declare_exchange(
                &name,
                &ExchangeKind::parse(&kind),
                opts,
                &decode_table(args),
            );
        }
    }
    {
        let mut st = conn.prepare(
            "SELECT name, durable, exclusive_owner, auto_delete, arguments FROM kelp_queues",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, Vec<u8>>(4)?,
            ))
        })?;
        for row in rows {
            let (name, durable, exclusive_owner, auto_delete, args) = row?;
            let arguments = decode_table(args);
            router.add_queue(Arc::from(name.as_str()));
            queues.insert(
                name.clone(),
                QueueMeta {
                    args: QueueArgs::parse(&name, &arguments).unwrap_or_default(),
                    exclusive_owner,
                    auto_delete,
                    durable,
                    arguments,
                },
            );
        }
    }
    {
        let mut st = conn.prepare(
            "SELECT source, destination, to_exchange, routing_key, arguments FROM kelp_bindings",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Vec<u8>>(4)?,
            ))
        })?;
        for row in rows {
            let (source, dest, to_exchange, key, args) = row?;
            let args = decode_table(args);
            let _ = if to_exchange {
                router.bind_exchange(&dest, &source, &key, &args)
            } else {
                router.bind_queue(&dest, &source, &key, &args)
            };
        }
    }
    *topo = Topology {
        version: v,
        router,
        queues,
        live: std::mem::take(&mut topo.live),
    };
    Ok(())
}

/// A write transaction on `conn` with a fresh topology.
pub(crate) fn write<'c, T>(
    conn: &'c mut Connection,
    topo: &mut Topology,
    path: &Path,
    f: impl FnOnce(&Transaction<'c>, &mut Topology) -> Result<T, Error>,
) -> Result<T, Error> {
    let e = db_err(path, "writing");
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&e)?;
    refresh(&tx, topo).map_err(&e)?;
    let before = topo.version;
    let out = f(&tx, topo)?;
    tx.commit().map_err(&e)?;
    // What this transaction changed is reloaded next time.
    if topo.version != before {
        topo.version = -1;
    }
    Ok(out)
}

/// Record that the topology changed (the cache reloads).
pub(crate) fn changed(tx: &Transaction<'_>, topo: &mut Topology) -> rusqlite::Result<()> {
    bump(tx)?;
    topo.version = -2;
    Ok(())
}

pub(crate) fn declare_exchange(
    tx: &Transaction<'_>,
    topo: &mut Topology,
    name: &str,
    kind: &str,
    opts: ExchangeOptions,
    args: &FieldTable,
) -> Result<(), Error> {
    let created = topo
        .router
        .declare_exchange(name, &ExchangeKind::parse(kind), opts, args)?;
    if created {
        tx.execute(
            "INSERT OR REPLACE INTO kelp_exchanges (name, kind, durable, auto_delete, internal, arguments) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![name, kind, opts.durable, opts.auto_delete, opts.internal, encode_table(args)],
        )
        .map_err(|e| sql(e, "declaring an exchange"))?;
        changed(tx, topo).map_err(|e| sql(e, "declaring an exchange"))?;
    }
    Ok(())
}

fn sql(e: rusqlite::Error, what: &'static str) -> Error {
    Error::Sqlite {
        path: String::new(),
        what,
        reason: e.to_string(),
    }
}

pub(crate) fn delete_exchange(
    tx: &Transaction<'_>,
    topo: &mut Topology,
    name: &str,
    if_unused: bool,
) -> Result<(), Error> {
    topo.router.delete_exchange(name, if_unused)?;
    let w = |e| sql(e, "deleting an exchange");
    tx.execute("DELETE FROM kelp_exchanges WHERE name = ?1", params![name])
        .map_err(w)?;
    tx.execute(
        "DELETE FROM kelp_bindings WHERE source = ?1 OR (to_exchange = 1 AND destination = ?1)",
        params![name],
    )
    .map_err(w)?;
    // Auto-delete exchanges the router dropped with it.
    let live: Vec<String> = topo
        .router
        .exchanges()
        .map(|x| x.name().to_string())
        .collect();
    prune_exchanges(tx, &live)?;
    changed(tx, topo).map_err(w)?;
    Ok(())
}

fn prune_exchanges(tx: &Transaction<'_>, live: &[String]) -> Result<(), Error> {
    let w = |e| sql(e, "removing auto-deleted exchanges");
    let names: Vec<String> = {
        let mut st = tx.prepare("SELECT name FROM kelp_exchanges").map_err(w)?;
        let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(w)?;
        rows.collect::<Result<_, _>>().map_err(w)?
    };
    for n in names.iter().filter(|n| !live.contains(n)) {
        tx.execute("DELETE FROM kelp_exchanges WHERE name = ?1", params![n])
            .map_err(w)?;
        tx.execute(
            "DELETE FROM kelp_bindings WHERE source = ?1 OR (to_exchange = 1 AND destination = ?1)",
            params![n],
        )
        .map_err(w)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn bind(
    tx: &Transaction<'_>,
    topo: &mut Topology,
    source: &str,
    destination: &str,
    to_exchange: bool,
    key: &str,
    args: &FieldTable,
    unbind: bool,
) -> Result<(), Error> {
    let w = |e| sql(e, "binding");
    let did = match (to_exchange, unbind) {
        (false, false) => topo.router.bind_queue(destination, source, key, args)?,
        (false, true) => topo.router.unbind_queue(destination, source, key, args)?,
        (true, false) => topo.router.bind_exchange(destination, source, key, args)?,
        (true, true) => topo
            .router
            .unbind_exchange(destination, source, key, args)?,
    };
    if !did {
        return Ok(());
    }
    if unbind {
        tx.execute(
            "DELETE FROM kelp_bindings WHERE source = ?1 AND destination = ?2 AND to_exchange = ?3 AND routing_key = ?4 AND arguments = ?5",
            params![source, destination, to_exchange, key, encode_table(args)],
        )
        .map_err(w)?;
        let live: Vec<String> = topo
            .router
            .exchanges()
            .map(|x| x.name().to_string())
            .collect();
        prune_exchanges(tx, &live)?;
    } else {
        tx.execute(
            "INSERT OR IGNORE INTO kelp_bindings (source, destination, to_exchange, routing_key, arguments) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![source, destination, to_exchange, key, encode_table(args)],
        )
        .map_err(w)?;
    }
    changed(tx, topo).map_err(w)?;
    Ok(())
}

/// What `declare_queue` found or made.
pub(crate) struct Declared {
    pub message_count: u32,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn declare_queue(
    tx: &Transaction<'_>,
    topo: &mut Topology,
    owner: &str,
    name: &str,
    passive: bool,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
    args: &FieldTable,
) -> Result<Declared, Error> {
    let w = |e| sql(e, "declaring a queue");
    let now = now_ms();
    expire_queues(tx, topo, now)?;
    if let Some(q) = topo.queues.get(name) {
        if let Some(o) = &q.exclusive_owner {
            if o != owner {
                return Err(BrokerError::ResourceLocked {
                    queue: name.to_owned(),
                }
                .into());
            }
        }
        if !passive && (q.durable != durable || q.arguments != *args) {
            let (argument, received, current) = if q.durable != durable {
                (
                    "durable".to_owned(),
                    durable.to_string(),
                    q.durable.to_string(),
                )
            } else {
                (
                    "arguments".to_owned(),
                    format!("{args:?}"),
                    format!("{:?}", q.arguments),
                )
            };
            return Err(BrokerError::Inequivalent {
                kind: EntityKind::Queue,
                name: name.to_owned(),
                argument,
                received,
                current,
            }
            .into());
        }
    } else if passive {
        return Err(BrokerError::NotFound {
            kind: EntityKind::Queue,
            name: name.to_owned(),
        }
        .into());
    } else {
        QueueArgs::parse(name, args)?;
        tx.execute(
            "INSERT INTO kelp_queues (name, durable, exclusive_owner, auto_delete, arguments, last_used) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![name, durable, exclusive.then_some(owner), auto_delete, encode_table(args), now],
        )
        .map_err(w)?;
        changed(tx, topo).map_err(w)?;
    }
    touch(tx, name, now)?;
    let n: i64 = tx
        .query_row(
            "SELECT COUNT(*) FROM kelp_messages WHERE queue = ?1 AND state = 0",
            params![name],
            |r| r.get(0),
        )
        .map_err(w)?;
    Ok(Declared {
        message_count: u32::try_from(n).unwrap_or(u32::MAX),
    })
}

pub(crate) fn purge(tx: &Transaction<'_>, queue: &str) -> Result<u32, Error> {
    let n = tx
        .execute(
            "DELETE FROM kelp_messages WHERE queue = ?1 AND state = 0",
            params![queue],
        )
        .map_err(|e| sql(e, "purging"))?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

pub(crate) fn delete_queue(
    tx: &Transaction<'_>,
    topo: &mut Topology,
    queue: &str,
    if_empty: bool,
) -> Result<u32, Error> {
    let w = |e| sql(e, "deleting a queue");
    if !topo.queues.contains_key(queue) {
        // As RabbitMQ: deleting a queue that is not there is not an error.
        return Ok(0);
    }
    let n: i64 = tx
        .query_row(
            "SELECT COUNT(*) FROM kelp_messages WHERE queue = ?1 AND state = 0",
            params![queue],
            |r| r.get(0),
        )
        .map_err(w)?;
    if if_empty && n > 0 {
        return Err(BrokerError::NotEmpty {
            queue: queue.to_owned(),
        }
        .into());
    }
    tx.execute("DELETE FROM kelp_messages WHERE queue = ?1", params![queue])
        .map_err(w)?;
    tx.execute("DELETE FROM kelp_queues WHERE name = ?1", params![queue])
        .map_err(w)?;
    tx.execute(
        "DELETE FROM kelp_bindings WHERE to_exchange = 0 AND destination = ?1",
        params![queue],
    )
    .map_err(w)?;
    topo.router.remove_queue(queue);
    let live: Vec<String> = topo
        .router
        .exchanges()
        .map(|x| x.name().to_string())
        .collect();
    prune_exchanges(tx, &live)?;
    changed(tx, topo).map_err(w)?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// How a publish went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// Stored in at least one queue.
    Routed,
    /// No queue matched.
    Unroutable,
    /// A queue refused it (`x-overflow: reject-publish`).
    Refused,
}

/// Route and store one message (dead-lettering what overflow pushes out).
pub(crate) fn publish(
    tx: &Transaction<'_>,
    topo: &Topology,
    msg: &MessageData,
    now: i64,
) -> Result<Stored, Error> {
    if let Some(x) = topo.router.exchange(&msg.exchange) {
        if x.is_internal() {
            return Err(BrokerError::AccessRefused {
                kind: EntityKind::Exchange,
                name: msg.exchange.to_string(),
                reason: "it is internal".into(),
            }
            .into());
        }
    }
    let mut routed = RoutedQueues::default();
    topo.router.route(
        &msg.exchange,
        &msg.routing_key,
        msg.properties.headers.as_ref(),
        &mut routed,
    )?;
    let queues: Vec<Arc<str>> = routed.iter().cloned().collect();
    if queues.is_empty() {
        return Ok(Stored::Unroutable);
    }
    let mut refused = false;
    for q in &queues {
        if !store(tx, topo, q, msg, now, false)? {
            refused = true;
        }
    }
    Ok(if refused {
        Stored::Refused
    } else {
        Stored::Routed
    })
}

/// Store `msg` in `queue`. False if the queue refused it.
fn store(
    tx: &Transaction<'_>,
    topo: &Topology,
    queue: &str,
    msg: &MessageData,
    now: i64,
    redelivered: bool,
) -> Result<bool, Error> {
    let w = |e| sql(e, "storing a message");
    let meta = topo.queues.get(queue).cloned().unwrap_or_default();
    let per_message = msg
        .properties
        .expiration
        .as_deref()
        .and_then(|e| e.parse::<i64>().ok());
    let ttl = match (per_message, meta.args.message_ttl) {
        (Some(a), Some(b)) => Some(a.min(i64::try_from(b).unwrap_or(i64::MAX))),
        (Some(a), None) => Some(a),
        (None, Some(b)) => Some(i64::try_from(b).unwrap_or(i64::MAX)),
        (None, None) => None,
    };
    // RabbitMQ delivers a TTL-0 message only to a consumer ready at once: with a consumer
    // here it gets a moment to be taken, without one it expires on arrival.
    let ttl = match ttl {
        Some(0) if topo.live.contains(queue) => Some(1000),
        Some(0) => {
            dead_letter(tx, topo, queue, msg, DeathReason::Expired, now)?;
            return Ok(true);
        }
        t => t,
    };
    let priority = match meta.args.max_priority {
        Some(max) => i64::from(msg.properties.priority.unwrap_or(0).min(max)),
        None => 0,
    };
    if let Some(max) = meta.args.max_length {
        let ready: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM kelp_messages WHERE queue = ?1 AND state = 0",
                params![queue],
                |r| r.get(0),
            )
            .map_err(w)?;
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        if ready >= max {
            match meta.args.overflow {
                Overflow::RejectPublish => return Ok(false),
                Overflow::RejectPublishDlx => {
                    dead_letter(tx, topo, queue, msg, DeathReason::Maxlen, now)?;
                    return Ok(false);
                }
                Overflow::DropHead => {
                    let drop_n = ready - max + 1;
                    let heads = take_ready(tx, queue, drop_n)?;
                    for t in heads {
                        tx.execute("DELETE FROM kelp_messages WHERE id = ?1", params![t.id])
                            .map_err(w)?;
                        dead_letter(tx, topo, queue, &t.message, DeathReason::Maxlen, now)?;
                    }
                }
            }
        }
    }
    if let Some(max_bytes) = meta.args.max_length_bytes {
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let size = i64::try_from(msg.body.len()).unwrap_or(i64::MAX);
        loop {
            let total: i64 = tx
                .query_row(
                    "SELECT COALESCE(SUM(LENGTH(body)), 0) FROM kelp_messages WHERE queue = ?1 AND state = 0",
                    params![queue],
                    |r| r.get(0),
                )
                .map_err(w)?;
            if total + size <= max_bytes {
                break;
            }
            match meta.args.overflow {
                Overflow::RejectPublish => return Ok(false),
                Overflow::RejectPublishDlx => {
                    dead_letter(tx, topo, queue, msg, DeathReason::Maxlen, now)?;
                    return Ok(false);
                }
                Overflow::DropHead => {
                    let heads = take_ready(tx, queue, 1)?;
                    if heads.is_empty() {
                        // The message alone is bigger than the limit: it is the one dropped.
                        dead_letter(tx, topo, queue, msg, DeathReason::Maxlen, now)?;
                        return Ok(true);
                    }
                    for t in heads {
                        tx.execute("DELETE FROM kelp_messages WHERE id = ?1", params![t.id])
                            .map_err(w)?;
                        dead_letter(tx, topo, queue, &t.message, DeathReason::Maxlen, now)?;
                    }
                }
            }
        }
    }
    tx.execute(
        "INSERT INTO kelp_messages (queue, priority, state, expires_at, redelivered, exchange, routing_key, properties, body) VALUES (?1, ?2, 0, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            queue,
            priority,
            ttl.map(|t| now.saturating_add(t)),
            redelivered,
            msg.exchange.as_str(),
            msg.routing_key.as_str(),
            encode_properties(&msg.properties)?,
            msg.body.as_ref()
        ],
    )
    .map_err(w)?;
    Ok(true)
}

/// The first `n` ready messages of `queue`, in delivery order.
fn take_ready(tx: &Transaction<'_>, queue: &str, n: i64) -> Result<Vec<Taken>, Error> {
    let w = |e| sql(e, "reading messages");
    let mut st = tx
        .prepare_cached(
            "SELECT id, exchange, routing_key, properties, body, redelivered, priority, expires_at FROM kelp_messages WHERE queue = ?1 AND state = 0 ORDER BY priority DESC, id LIMIT ?2",
        )
        .map_err(w)?;
    let rows = st
        .query_map(params![queue, n], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, bool>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<i64>>(7)?,
            ))
        })
        .map_err(w)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, ex, rk, props, body, redelivered, priority, expires_at) = row.map_err(w)?;
        out.push(Taken {
            id,
            message: MessageData::new(ex, rk, decode_properties(props), body),
            redelivered,
            priority,
            expires_at,
        });
    }
    Ok(out)
}

/// Dead-letter `msg` from `queue` (if the queue has a dead-letter exchange), else drop it.
fn dead_letter(
    tx: &Transaction<'_>,
    topo: &Topology,
    queue: &str,
    msg: &MessageData,
    reason: DeathReason,
    now: i64,
) -> Result<(), Error> {
    let Some(meta) = topo.queues.get(queue) else {
        return Ok(());
    };
    let Some(dlx) = meta.args.dead_letter_exchange.clone() else {
        return Ok(());
    };
    let rk = meta
        .args
        .dead_letter_routing_key
        .clone()
        .map(|k| k.to_string())
        .unwrap_or_else(|| msg.routing_key.to_string());
    let dead = dead_lettered(
        msg,
        queue,
        reason,
        &dlx,
        &rk,
        u64::try_from(now).unwrap_or(0),
    );
    let mut routed = RoutedQueues::default();
    if topo
        .router
        .route(&dlx, &rk, dead.properties.headers.as_ref(), &mut routed)
        .is_err()
    {
        return Ok(());
    }
    let targets: Vec<Arc<str>> = routed.iter().cloned().collect();
    for q in targets {
        // A cycle back to the same queue for the same reason is dropped, as RabbitMQ does
        // (unless it was rejected).
        if &*q == queue && reason != DeathReason::Rejected {
            continue;
        }
        let mut dead_copy = dead.clone();
        dead_copy.exchange = kelp_amqp::ShortString::from(dlx.as_ref());
        store(tx, topo, &q, &dead_copy, now, false)?;
    }
    Ok(())
}

/// Expire what is due in `queue` (dead-lettering it), and return to the queue what a dead
/// consumer's lease left behind.
fn housekeep(tx: &Transaction<'_>, topo: &Topology, queue: &str, now: i64) -> Result<(), Error> {
    let w = |e| sql(e, "expiring messages");
    tx.execute(
        "UPDATE kelp_messages SET state = 0, owner = NULL, lease_until = NULL, redelivered = 1 WHERE queue = ?1 AND state = 1 AND lease_until < ?2",
        params![queue, now],
    )
    .map_err(w)?;
    let expired: Vec<(i64, MessageData)> = {
        let mut st = tx
            .prepare_cached(
                "SELECT id, exchange, routing_key, properties, body FROM kelp_messages WHERE queue = ?1 AND state = 0 AND expires_at IS NOT NULL AND expires_at <= ?2 ORDER BY id",
            )
            .map_err(w)?;
        let rows = st
            .query_map(params![queue, now], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                ))
            })
            .map_err(w)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, ex, rk, props, body) = row.map_err(w)?;
            out.push((id, MessageData::new(ex, rk, decode_properties(props), body)));
        }
        out
    };
    for (id, m) in expired {
        tx.execute("DELETE FROM kelp_messages WHERE id = ?1", params![id])
            .map_err(w)?;
        dead_letter(tx, topo, queue, &m, DeathReason::Expired, now)?;
    }
    Ok(())
}

/// Fail with 405 RESOURCE_LOCKED if `queue` is exclusive to another connection.
pub(crate) fn check_owner(topo: &Topology, queue: &str, owner: &str) -> Result<(), Error> {
    match topo
        .queues
        .get(queue)
        .and_then(|q| q.exclusive_owner.as_deref())
    {
        Some(o) if o != owner => Err(BrokerError::ResourceLocked {
            queue: queue.to_owned(),
        }
        .into()),
        _ => Ok(()),
    }
}

/// Expire what is due in every queue, and return what dead consumers' leases left behind.
fn sweep(tx: &Transaction<'_>, topo: &Topology, now: i64) -> Result<(), Error> {
    let w = |e| sql(e, "sweeping expired messages");
    tx.execute(
        "UPDATE kelp_messages SET state = 0, owner = NULL, lease_until = NULL, redelivered = 1 WHERE state = 1 AND lease_until < ?1",
        params![now],
    )
    .map_err(w)?;
    let queues: Vec<String> = {
        let mut st = tx
            .prepare_cached(
                "SELECT DISTINCT queue FROM kelp_messages WHERE expires_at IS NOT NULL AND expires_at <= ?1 AND state = 0",
            )
            .map_err(w)?;
        let rows = st
            .query_map(params![now], |r| r.get::<_, String>(0))
            .map_err(w)?;
        rows.collect::<Result<_, _>>().map_err(w)?
    };
    for q in queues {
        housekeep(tx, topo, &q, now)?;
    }
    Ok(())
}

/// Delete queues whose `x-expires` ran out: unused (no consumer here, no get, no declare)
/// for that long.
pub(crate) fn expire_queues(
    tx: &Transaction<'_>,
    topo: &mut Topology,
    now: i64,
) -> Result<(), Error> {
    let w = |e| sql(e, "expiring queues");
    let candidates: Vec<(String, i64)> = topo
        .queues
        .iter()
        .filter(|(n, _)| !topo.live.contains(*n))
        .filter_map(|(n, m)| {
            m.args
                .expires
                .map(|e| (n.clone(), i64::try_from(e).unwrap_or(i64::MAX)))
        })
        .collect();
    for (name, expires) in candidates {
        let last: i64 = tx
            .query_row(
                "SELECT last_used FROM kelp_queues WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .map_err(w)?;
        if last.saturating_add(expires) <= now {
            delete_queue(tx, topo, &name, false)?;
        }
    }
    Ok(())
}

fn touch(tx: &Transaction<'_>, queue: &str, now: i64) -> Result<(), Error> {
    tx.execute(
        "UPDATE kelp_queues SET last_used = ?2 WHERE name = ?1",
        params![queue, now],
    )
    .map_err(|e| sql(e, "marking a queue used"))?;
    Ok(())
}

/// A message taken for delivery.
#[derive(Debug)]
pub(crate) struct Taken {
    pub id: i64,
    pub message: MessageData,
    pub redelivered: bool,
    /// Its priority level in its queue (kept to put it back where it was).
    pub priority: i64,
    /// When it expires (ms since the epoch), if it does.
    pub expires_at: Option<i64>,
}

/// Take up to `n` ready messages of `queue` for `owner`, leased until `now + lease_ms`.
pub(crate) fn take(
    tx: &Transaction<'_>,
    topo: &Topology,
    queue: &str,
    owner: &str,
    n: i64,
    lease_ms: i64,
    no_ack: bool,
) -> Result<Vec<Taken>, Error> {
    let now = now_ms();
    if !topo.queues.contains_key(queue) {
        return Err(BrokerError::NotFound {
            kind: EntityKind::Queue,
            name: queue.to_owned(),
        }
        .into());
    }
    check_owner(topo, queue, owner)?;
    sweep(tx, topo, now)?;
    touch(tx, queue, now)?;
    let w = |e| sql(e, "taking messages");
    let rows = take_ready(tx, queue, n)?;
    for t in &rows {
        if no_ack {
            tx.execute("DELETE FROM kelp_messages WHERE id = ?1", params![t.id])
                .map_err(w)?;
        } else {
            tx.execute(
                "UPDATE kelp_messages SET state = 1, owner = ?2, lease_until = ?3 WHERE id = ?1",
                params![t.id, owner, now.saturating_add(lease_ms)],
            )
            .map_err(w)?;
        }
    }
    Ok(rows)
}

/// When the next ready message of any queue expires (ms since the epoch), if one can.
pub(crate) fn next_due(tx: &Transaction<'_>) -> Result<Option<i64>, Error> {
    tx.query_row(
        "SELECT expires_at FROM kelp_messages WHERE expires_at IS NOT NULL AND state = 0 ORDER BY expires_at LIMIT 1",
        [],
        |r| r.get(0),
    )
    .optional()
    .map_err(|e| sql(e, "reading the next expiry"))
}

/// Ack: delete the messages.
pub(crate) fn ack(tx: &Transaction<'_>, ids: &[i64]) -> Result<(), Error> {
    let w = |e| sql(e, "acknowledging");
    let mut st = tx
        .prepare_cached("DELETE FROM kelp_messages WHERE id = ?1 AND state = 1")
        .map_err(w)?;
    for id in ids {
        st.execute(params![id]).map_err(w)?;
    }
    Ok(())
}

/// Reject: back to ready (marked redelivered) or dead-lettered / dropped.
pub(crate) fn reject(
    tx: &Transaction<'_>,
    topo: &Topology,
    ids: &[(i64, String)],
    requeue: bool,
) -> Result<(), Error> {
    let w = |e| sql(e, "rejecting");
    let now = now_ms();
    for (id, queue) in ids {
        if requeue {
            tx.execute(
                "UPDATE kelp_messages SET state = 0, owner = NULL, lease_until = NULL, redelivered = 1 WHERE id = ?1",
                params![id],
            )
            .map_err(w)?;
        } else {
            let row: Option<(String, String, Vec<u8>, Vec<u8>)> = tx
                .query_row(
                    "SELECT exchange, routing_key, properties, body FROM kelp_messages WHERE id = ?1",
                    params![id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()
                .map_err(w)?;
            tx.execute("DELETE FROM kelp_messages WHERE id = ?1", params![id])
                .map_err(w)?;
            if let Some((ex, rk, props, body)) = row {
                let m = MessageData::new(ex, rk, decode_properties(props), body);
                dead_letter(tx, topo, queue, &m, DeathReason::Rejected, now)?;
            }
        }
    }
    Ok(())
}

/// Keep `owner`'s leases alive.
pub(crate) fn renew(conn: &Connection, owner: &str, lease_ms: i64) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE kelp_messages SET lease_until = ?2 WHERE owner = ?1 AND state = 1",
        params![owner, now_ms().saturating_add(lease_ms)],
    )
}

/// Everything `owner` holds goes back (marked redelivered); its exclusive queues go.
pub(crate) fn release_owner(
    tx: &Transaction<'_>,
    topo: &mut Topology,
    owner: &str,
) -> Result<(), Error> {
    let w = |e| sql(e, "releasing a connection's messages");
    tx.execute(
        "UPDATE kelp_messages SET state = 0, owner = NULL, lease_until = NULL, redelivered = 1 WHERE owner = ?1 AND state = 1",
        params![owner],
    )
    .map_err(w)?;
    let exclusive: Vec<String> = topo
        .queues
        .iter()
        .filter(|(_, q)| q.exclusive_owner.as_deref() == Some(owner))
        .map(|(n, _)| n.clone())
        .collect();
    for q in exclusive {
        delete_queue(tx, topo, &q, false)?;
    }
    Ok(())
}

/// Return specific messages (a closed channel's) to their queues.
pub(crate) fn release(tx: &Transaction<'_>, ids: &[i64]) -> Result<(), Error> {
    let w = |e| sql(e, "releasing messages");
    for id in ids {
        tx.execute(
            "UPDATE kelp_messages SET state = 0, owner = NULL, lease_until = NULL, redelivered = 1 WHERE id = ?1 AND state = 1",
            params![id],
        )
        .map_err(w)?;
    }
    Ok(())
}

/// Put taken messages back as if they had never been delivered (their consumer was cancelled
/// while they were being taken).
pub(crate) fn unclaim(tx: &Transaction<'_>, ids: &[i64]) -> Result<(), Error> {
    let w = |e| sql(e, "putting messages back");
    for id in ids {
        tx.execute(
            "UPDATE kelp_messages SET state = 0, owner = NULL, lease_until = NULL WHERE id = ?1 AND state = 1",
            params![id],
        )
        .map_err(w)?;
    }
    Ok(())
}

/// Put messages taken with `no_ack` (so deleted) back into `queue` as they were — same id,
/// so at the same position, same priority, expiry and redelivered flag — because they could
/// not be handed to their consumer (cancelled, or its stream dropped). Nothing is put back
/// into a queue deleted meanwhile.
pub(crate) fn restore(tx: &Transaction<'_>, queue: &str, taken: &[Taken]) -> Result<(), Error> {
    let w = |e| sql(e, "putting messages back");
    let mut st = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO kelp_messages (id, queue, priority, state, expires_at, redelivered, exchange, routing_key, properties, body) \
             SELECT ?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, ?8, ?9 WHERE EXISTS (SELECT 1 FROM kelp_queues WHERE name = ?2)",
        )
        .map_err(w)?;
    for t in taken {
        st.execute(params![
            t.id,
            queue,
            t.priority,
            t.expires_at,
            t.redelivered,
            t.message.exchange.as_str(),
            t.message.routing_key.as_str(),
            encode_properties(&t.message.properties)?,
            t.message.body.as_ref()
        ])
        .map_err(w)?;
    }
    Ok(())
}

/// Has anyone else written to the file since last asked? (`PRAGMA data_version`.)
pub(crate) fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0))
}

pub(crate) fn now() -> i64 {
    now_ms()
}
