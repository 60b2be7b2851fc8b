//! The one error enum of the virtual broker core.

use std::fmt;

use kelp_amqp::error::reply_code;

/// What kind of entity an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntityKind {
    /// An exchange.
    Exchange,
    /// A queue.
    Queue,
    /// A consumer (by consumer tag).
    Consumer,
}

impl fmt::Display for EntityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntityKind::Exchange => "exchange",
            EntityKind::Queue => "queue",
            EntityKind::Consumer => "consumer",
        })
    }
}

/// An error of the virtual broker. Each maps to the AMQP reply code RabbitMQ would use
/// ([`BrokerError::amqp_reply_code`]), and its message names the entity involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The exchange, queue or consumer does not exist (404 NOT_FOUND).
    #[error("no {kind} '{name}'")]
    NotFound {
        /// Entity kind.
        kind: EntityKind,
        /// Entity name.
        name: String,
    },
    /// A redeclaration differs from the existing entity (406 PRECONDITION_FAILED).
    #[error(
        "inequivalent arg '{argument}' for {kind} '{name}': received {received} but current is {current}"
    )]
    Inequivalent {
        /// Entity kind.
        kind: EntityKind,
        /// Entity name.
        name: String,
        /// The differing property or argument (`type`, `durable`, `x-message-ttl`, …).
        argument: String,
        /// What the redeclaration asked for.
        received: String,
        /// What the entity has.
        current: String,
    },
    /// `if_unused` delete of an entity that is in use (406 PRECONDITION_FAILED).
    #[error("{kind} '{name}' in use")]
    InUse {
        /// Entity kind.
        kind: EntityKind,
        /// Entity name.
        name: String,
    },
    /// `if_empty` delete of a queue that holds messages (406 PRECONDITION_FAILED).
    #[error("queue '{queue}' not empty")]
    NotEmpty {
        /// Queue name.
        queue: String,
    },
    /// An argument of a declaration or binding is invalid (406 PRECONDITION_FAILED).
    #[error("invalid arg '{argument}' for {kind} '{name}': {reason}")]
    InvalidArgument {
        /// Entity kind.
        kind: EntityKind,
        /// Entity name.
        name: String,
        /// The argument.
        argument: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A message's `expiration` property is not a non-negative integer (406 PRECONDITION_FAILED).
    #[error("invalid expiration '{value}': not a non-negative integer of milliseconds")]
    InvalidExpiration {
        /// The property value.
        value: String,
    },
    /// Ack/nack/reject of a delivery tag the session does not hold (406 PRECONDITION_FAILED).
    #[error("unknown delivery tag {tag}")]
    UnknownDeliveryTag {
        /// The delivery tag.
        tag: u64,
    },
    /// An exclusive queue of another owner (405 RESOURCE_LOCKED).
    #[error("cannot obtain exclusive access to locked queue '{queue}'")]
    ResourceLocked {
        /// Queue name.
        queue: String,
    },
    /// The operation is not permitted on this entity (403 ACCESS_REFUSED): reserved `amq.*` names,
    /// the default exchange, internal exchanges, queues in exclusive consumer use.
    #[error("access to {kind} '{name}' refused: {reason}")]
    AccessRefused {
        /// Entity kind.
        kind: EntityKind,
        /// Entity name.
        name: String,
        /// Why.
        reason: String,
    },
    /// An exchange type the core does not implement (503 COMMAND_INVALID, a connection error).
    #[error("unknown exchange type '{kind}'")]
    UnknownExchangeType {
        /// The type name.
        kind: String,
    },
    /// The consumer tag is already used on this session (530 NOT_ALLOWED, a connection error).
    #[error("attempt to reuse consumer tag '{tag}'")]
    ConsumerTagInUse {
        /// The consumer tag.
        tag: String,
    },
    /// The session id is not open (504 CHANNEL_ERROR, a connection error).
    #[error("session {session} is not open")]
    UnknownSession {
        /// The session id.
        session: u64,
    },
}

impl BrokerError {
    pub(crate) fn not_found(kind: EntityKind, name: &str) -> Self {
        BrokerError::NotFound {
            kind,
            name: name.to_owned(),
        }
    }

    pub(crate) fn access_refused(kind: EntityKind, name: &str, reason: &str) -> Self {
        BrokerError::AccessRefused {
            kind,
            name: name.to_owned(),
            reason: reason.to_owned(),
        }
    }

    pub(crate) fn invalid_arg(
        kind: EntityKind,
        name: &str,
        argument: &str,
        reason: String,
    ) -> Self {
        BrokerError::InvalidArgument {
            kind,
            name: name.to_owned(),
            argument: argument.to_owned(),
            reason,
        }
    }

    pub(crate) fn inequivalent(
        kind: EntityKind,
        name: &str,
        argument: &str,
        received: String,
        current: String,
    ) -> Self {
        BrokerError::Inequivalent {
            kind,
            name: name.to_owned(),
            argument: argument.to_owned(),
            received,
            current,
        }
    }

    /// The AMQP reply code RabbitMQ uses for this error (404, 406, 405, 403, 503, 530, 504).
    pub fn amqp_reply_code(&self) -> u16 {
        match self {
            BrokerError::NotFound { .. } => reply_code::NOT_FOUND,
            BrokerError::Inequivalent { .. }
            | BrokerError::InUse { .. }
            | BrokerError::NotEmpty { .. }
            | BrokerError::InvalidArgument { .. }
            | BrokerError::InvalidExpiration { .. }
            | BrokerError::UnknownDeliveryTag { .. } => reply_code::PRECONDITION_FAILED,
            BrokerError::ResourceLocked { .. } => reply_code::RESOURCE_LOCKED,
            BrokerError::AccessRefused { .. } => reply_code::ACCESS_REFUSED,
            BrokerError::UnknownExchangeType { .. } => reply_code::COMMAND_INVALID,
            BrokerError::ConsumerTagInUse { .. } => reply_code::NOT_ALLOWED,
            BrokerError::UnknownSession { .. } => reply_code::CHANNEL_ERROR,
        }
    }

    /// True when AMQP would close the whole connection rather than just the channel.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            BrokerError::UnknownExchangeType { .. }
                | BrokerError::ConsumerTagInUse { .. }
                | BrokerError::UnknownSession { .. }
        )
    }
}
