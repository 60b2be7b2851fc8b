//! The record of what a robust connection declared, kept to declare it again after a reconnect.

use std::collections::{HashMap, HashSet};

use kelp_amqp::FieldTable;

use crate::transport::{ExchangeFlags, QueueFlags};

/// An exchange as declared.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ExchangeRec {
    pub name: String,
    pub kind: String,
    pub flags: ExchangeFlags,
    pub arguments: FieldTable,
}

/// A queue as declared.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QueueRec {
    /// Its name now (for a server-named queue: the name the broker gave it last).
    pub name: String,
    /// Declared with an empty name: the broker names it.
    pub server_named: bool,
    pub flags: QueueFlags,
    pub arguments: FieldTable,
}

/// A binding: `destination` receives from `source` (an exchange) under `routing_key`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BindingRec {
    pub destination: String,
    pub source: String,
    pub routing_key: String,
    pub arguments: FieldTable,
}

impl BindingRec {
    fn new(destination: &str, source: &str, routing_key: &str, arguments: &FieldTable) -> Self {
        BindingRec {
            destination: destination.to_owned(),
            source: source.to_owned(),
            routing_key: routing_key.to_owned(),
            arguments: arguments.clone(),
        }
    }
}

/// Everything declared through a robust connection's channels, in declaration order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Topology {
    pub exchanges: Vec<ExchangeRec>,
    pub exchange_bindings: Vec<BindingRec>,
    pub queues: Vec<QueueRec>,
    pub queue_bindings: Vec<BindingRec>,
    /// Queues declared with `robust(false)`: neither they nor their bindings are restored.
    pub excluded: HashSet<String>,
    /// Old name → current name, for server-named queues renamed by a restore.
    pub renames: HashMap<String, String>,
}

impl Topology {
    /// The name a queue has now, following renames.
    pub fn resolve<'a>(&'a self, name: &'a str) -> &'a str {
        self.renames.get(name).map(String::as_str).unwrap_or(name)
    }

    pub fn exchange_declared(
        &mut self,
        name: &str,
        kind: &str,
        flags: ExchangeFlags,
        arguments: &FieldTable,
    ) {
        // The default exchange and the broker's own `amq.*` ones always exist.
        if flags.passive || name.is_empty() || name.starts_with("amq.") {
            return;
        }
        if flags.skip_recovery {
            self.exchanges.retain(|e| e.name != name);
            return;
        }
        let rec = ExchangeRec {
            name: name.to_owned(),
            kind: kind.to_owned(),
            flags,
            arguments: arguments.clone(),
        };
        match self.exchanges.iter_mut().find(|e| e.name == name) {
            Some(e) => *e = rec,
            None => self.exchanges.push(rec),
        }
    }

    pub fn exchange_deleted(&mut self, name: &str) {
        self.exchanges.retain(|e| e.name != name);
        self.exchange_bindings
            .retain(|b| b.source != name && b.destination != name);
        self.queue_bindings.retain(|b| b.source != name);
    }

    pub fn exchange_bound(
        &mut self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) {
        let rec = BindingRec::new(destination, source, routing_key, arguments);
        if !self.exchange_bindings.contains(&rec) {
            self.exchange_bindings.push(rec);
        }
    }

    pub fn exchange_unbound(
        &mut self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) {
        let rec = BindingRec::new(destination, source, routing_key, arguments);
        self.exchange_bindings.retain(|b| *b != rec);
    }

    /// `requested` is the name asked for (empty for a server-named queue), `name` the one the
    /// broker answered with.
    pub fn queue_declared(
        &mut self,
        requested: &str,
        name: &str,
        flags: QueueFlags,
        arguments: &FieldTable,
    ) {
        if flags.passive {
            return;
        }
        if flags.skip_recovery {
            self.excluded.insert(name.to_owned());
            self.queues.retain(|q| q.name != name);
            return;
        }
        self.excluded.remove(name);
        let rec = QueueRec {
            name: name.to_owned(),
            server_named: requested.is_empty()
                || self.queues.iter().any(|q| q.name == name && q.server_named),
            flags,
            arguments: arguments.clone(),
        };
        match self.queues.iter_mut().find(|q| q.name == name) {
            Some(q) => *q = rec,
            None => self.queues.push(rec),
        }
    }

    pub fn queue_deleted(&mut self, name: &str) {
        self.queues.retain(|q| q.name != name);
        self.queue_bindings.retain(|b| b.destination != name);
        self.excluded.remove(name);
    }

    pub fn queue_bound(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) {
        if self.excluded.contains(queue) {
            return;
        }
        let rec = BindingRec::new(queue, exchange, routing_key, arguments);
        if !self.queue_bindings.contains(&rec) {
            self.queue_bindings.push(rec);
        }
    }

    pub fn queue_unbound(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) {
        let rec = BindingRec::new(queue, exchange, routing_key, arguments);
        self.queue_bindings.retain(|b| *b != rec);
    }

    /// A server-named queue came back as `new`: everything that named `old` follows.
    pub fn rename_queue(&mut self, old: &str, new: &str) {
        for q in self.queues.iter_mut().filter(|q| q.name == old) {
            q.name = new.to_owned();
        }
        for b in self
            .queue_bindings
            .iter_mut()
            .filter(|b| b.destination == old)
        {
            b.destination = new.to_owned();
        }
        for v in self.renames.values_mut().filter(|v| *v == old) {
            *v = new.to_owned();
        }
        self.renames.insert(old.to_owned(), new.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> FieldTable {
        FieldTable::default()
    }

    #[test]
    fn records_in_order_without_duplicates() {
        let mut t = Topology::default();
        t.exchange_declared("x", "topic", ExchangeFlags::default(), &args());
        t.exchange_declared("x", "topic", ExchangeFlags::default(), &args());
        t.exchange_declared("", "direct", ExchangeFlags::default(), &args());
        t.exchange_declared("amq.topic", "topic", ExchangeFlags::default(), &args());
        t.queue_declared("q", "q", QueueFlags::default(), &args());
        t.queue_bound("q", "x", "a.*", &args());
        t.queue_bound("q", "x", "a.*", &args());
        t.queue_bound("q", "x", "b.#", &args());
        assert_eq!(t.exchanges.len(), 1);
        assert_eq!(t.queues.len(), 1);
        assert_eq!(t.queue_bindings.len(), 2);
        t.queue_unbound("q", "x", "a.*", &args());
        assert_eq!(t.queue_bindings.len(), 1);
        t.exchange_deleted("x");
        assert!(t.exchanges.is_empty() && t.queue_bindings.is_empty());
    }

    #[test]
    fn passive_and_skipped_are_not_recorded() {
        let mut t = Topology::default();
        let passive = QueueFlags {
            passive: true,
            ..Default::default()
        };
        let skip = QueueFlags {
            skip_recovery: true,
            ..Default::default()
        };
        t.queue_declared("p", "p", passive, &args());
        t.queue_declared("s", "s", skip, &args());
        t.queue_bound("s", "x", "k", &args());
        assert!(t.queues.is_empty());
        assert!(t.queue_bindings.is_empty());
    }

    #[test]
    fn renames_follow_chains_and_bindings() {
        let mut t = Topology::default();
        t.queue_declared("", "amq.gen-1", QueueFlags::default(), &args());
        t.queue_bound("amq.gen-1", "x", "k", &args());
        assert!(t.queues[0].server_named);
        t.rename_queue("amq.gen-1", "amq.gen-2");
        t.rename_queue("amq.gen-2", "amq.gen-3");
        assert_eq!(t.resolve("amq.gen-1"), "amq.gen-3");
        assert_eq!(t.resolve("amq.gen-2"), "amq.gen-3");
        assert_eq!(t.resolve("other"), "other");
        assert_eq!(t.queue_bindings[0].destination, "amq.gen-3");
        assert_eq!(t.queues[0].name, "amq.gen-3");
        // Declaring it again under its generated name keeps it server-named.
        t.queue_declared("amq.gen-3", "amq.gen-3", QueueFlags::default(), &args());
        assert!(t.queues[0].server_named);
    }
}
