//! The sans-IO connection state machine.
//!
//! [`Engine`] knows AMQP and nothing about sockets or runtimes: feed it the bytes you read
//! ([`Engine::handle_input`]), the time ([`Engine::handle_timeout`]) and the user's requests
//! ([`Engine::call`], [`Engine::publish`], …); take from it the bytes to write
//! ([`Engine::transmit`]) and the [`Event`]s to act on ([`Engine::poll_event`]).
//!
//! Requests carry a caller-chosen token `T` that comes back with their reply, their failure or
//! their publisher confirm, so a driver can map replies to whoever waits for them.
//!
//! ```
//! use std::time::Instant;
//! use kelp_amqp::engine::{Config, Engine};
//! let mut engine: Engine<u32> = Engine::new(Config::default(), Instant::now());
//! let mut out = std::collections::VecDeque::new();
//! engine.transmit().drain_into(&mut out);
//! assert_eq!(&out[0][..], b"AMQP\x00\x00\x09\x01");
//! ```

mod channel;
mod config;
mod event;
mod transmit;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tracing::{debug, trace, warn};

use crate::codec::{
    decode_header_into, encode_body_frame_start, encode_header, encode_heartbeat, encode_method,
    max_body_chunk, split_frame, BasicDeliver, BasicProperties, ChannelCloseOk, ChannelFlowOk,
    ConnectionClose, ConnectionCloseOk, ConnectionOpen, ConnectionStartOk, ConnectionTuneOk,
    DecodeError, FieldTable, Method, RawFrame, Reader, ShortString, FRAME_BODY, FRAME_END,
    FRAME_HEADER, FRAME_METHOD, FRAME_MIN_SIZE, PROTOCOL_HEADER,
};
use crate::error::{reply_code, CloseReason, Error, ProtocolError};

use channel::{Chan, ChanState, ContentKind, Expect, Held, Incoming, Pending, Unconfirmed};
pub use config::{Config, Sasl};
pub use event::{Confirmation, Delivery, Event, GetMessage, Reply, ReturnedMessage};
pub use transmit::{Transmit, COPY_BODY_MAX};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitStart,
    AwaitTune,
    AwaitOpenOk,
    Open,
    Closing,
    Closed,
}

/// An AMQP 0-9-1 client connection as a state machine. See the [module docs](self).
#[derive(Debug)]
pub struct Engine<T> {
    config: Config,
    state: State,
    tx: Transmit,
    events: VecDeque<Event<T>>,
    channels: Vec<Option<Chan<T>>>,
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    last_recv: Instant,
    last_send: Instant,
    close_token: Option<T>,
    secret_token: Option<T>,
    error: Option<Error>,
    blocked: bool,
    server_properties: FieldTable,
}

impl<T> Engine<T> {
    /// A new engine; its first output is the protocol header.
    pub fn new(config: Config, now: Instant) -> Self {
        let mut tx = Transmit::default();
        tx.buf().extend_from_slice(PROTOCOL_HEADER);
        let frame_max = config.frame_max.max(FRAME_MIN_SIZE);
        Engine {
            config,
            state: State::AwaitStart,
            tx,
            events: VecDeque::new(),
            channels: Vec::new(),
            frame_max,
            channel_max: 0,
            heartbeat: 0,
            last_recv: now,
            last_send: now,
            close_token: None,
            secret_token: None,
            error: None,
            blocked: false,
            server_properties: FieldTable::new(),
        }
    }

    // ----- observation -------------------------------------------------------------------------

    /// True once negotiation finished and until the connection closes.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }
    /// True once the connection is closed (cleanly or not).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }
    /// Why the connection closed, unless it closed cleanly by request.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }
    /// Negotiated frame_max.
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }
    /// Negotiated channel_max.
    pub fn channel_max(&self) -> u16 {
        self.channel_max
    }
    /// Negotiated heartbeat interval (0 = off).
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat.into())
    }
    /// True while the broker has blocked publishers (`connection.blocked`).
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }
    /// The server's properties from `connection.start`.
    pub fn server_properties(&self) -> &FieldTable {
        &self.server_properties
    }
    /// True if `channel` is open (or opening) in this engine.
    pub fn has_channel(&self, channel: u16) -> bool {
        self.chan(channel).is_some()
    }
    /// True if `channel` is in confirm mode.
    pub fn is_confirm(&self, channel: u16) -> bool {
        self.chan(channel).is_some_and(|c| c.confirm)
    }
    /// Number of publishes awaiting a confirm on `channel` (those published with a token, and
    /// mandatory ones: a `basic.return` may name them).
    pub fn unconfirmed(&self, channel: u16) -> usize {
        self.chan(channel).map_or(0, |c| c.unconfirmed.len())
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event<T>> {
        self.events.pop_front()
    }

    /// Bytes to write. Call [`Engine::on_transmit`] after taking them.
    pub fn transmit(&mut self) -> &mut Transmit {
        &mut self.tx
    }

    /// Record that output was handed to the socket at `now` (resets the heartbeat send timer).
    pub fn on_transmit(&mut self, now: Instant) {
        self.last_send = now;
    }

    /// When [`Engine::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.heartbeat == 0 || self.state == State::Closed {
            return None;
        }
        let hb = self.heartbeat();
        Some((self.last_send + hb / 2).min(self.last_recv + hb * 2))
    }

    // ----- time and input ----------------------------------------------------------------------

    /// Drive heartbeats: send one when idle for half the interval, fail the connection when the
    /// server sent nothing for two intervals.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.heartbeat == 0 || self.state == State::Closed {
            return;
        }
        let hb = self.heartbeat();
        let silent = now.saturating_duration_since(self.last_recv);
        if silent >= hb * 2 {
            warn!(?silent, "server missed heartbeats; closing connection");
            self.fail(Error::MissedHeartbeats(silent), None);
            return;
        }
        if now.saturating_duration_since(self.last_send) >= hb / 2 && self.tx.is_empty() {
            encode_heartbeat(self.tx.buf());
            self.last_send = now;
        }
    }

    /// The I/O layer stopped reading on purpose (a consumer's buffer is full). The server's
    /// silence meanwhile is ours, not its: it is not counted as missed heartbeats.
    pub fn note_read_paused(&mut self, now: Instant) {
        self.last_recv = now;
    }

    /// The peer closed the socket.
    pub fn handle_eof(&mut self) {
        if self.state == State::Closed {
            return;
        }
        let err = match self.state {
            State::AwaitTune => Error::AuthenticationFailed {
                user: self.config.sasl.user().to_owned(),
                mechanism: self.config.sasl.mechanism(),
                detail: "the server closed the connection during authentication".into(),
            },
            State::Closing if self.close_token.is_some() => {
                // Our close raced the socket close: treat as a clean close.
                self.finish_close();
                return;
            }
            _ => Error::io(
                "reading from the server",
                std::io::ErrorKind::UnexpectedEof.into(),
            ),
        };
        self.fail(err, None);
    }

    /// The socket failed.
    pub fn handle_io_error(&mut self, error: Error) {
        if self.state != State::Closed {
            self.fail(error, None);
        }
    }

    /// Consume whole frames from the front of `buf` (what the socket delivered).
    /// Protocol errors close the connection (an event reports it); the rest of `buf` is discarded.
    pub fn handle_input(&mut self, buf: &mut BytesMut, now: Instant) {
        if !buf.is_empty() {
            self.last_recv = now;
        }
        while self.state != State::Closed {
            match split_frame(buf, self.frame_max) {
                Ok(Some(frame)) => {
                    if let Err(e) = self.handle_frame(frame) {
                        self.protocol_failure(e);
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.protocol_failure(ProtocolError::Decode(e));
                }
            }
        }
        buf.clear();
    }

    fn protocol_failure(&mut self, e: ProtocolError) {
        let code = match &e {
            ProtocolError::Decode(crate::codec::DecodeError::UnknownMethod { .. }) => {
                reply_code::NOT_IMPLEMENTED
            }
            ProtocolError::Decode(crate::codec::DecodeError::UnknownFieldType(_))
            | ProtocolError::Decode(crate::codec::DecodeError::InvalidUtf8)
            | ProtocolError::Decode(crate::codec::DecodeError::TooDeep(_)) => {
                reply_code::SYNTAX_ERROR
            }
            ProtocolError::Decode(_) => reply_code::FRAME_ERROR,
            ProtocolError::UnexpectedFrame { .. } | ProtocolError::BodyTooLong { .. } => {
                reply_code::UNEXPECTED_FRAME
            }
            ProtocolError::MessageTooLarge { .. } => reply_code::CONTENT_TOO_LARGE,
            _ => reply_code::INTERNAL_ERROR,
        };
        warn!(error = %e, "protocol error; closing connection");
        if matches!(
            self.state,
            State::Open | State::AwaitOpenOk | State::AwaitTune
        ) {
            let text: String = format!("{e}").chars().take(200).collect();
            let close = ConnectionClose {
                reply_code: code,
                reply_text: text.into(),
                class_id: 0,
                method_id: 0,
            };
            let _ = encode_method(self.tx.buf(), 0, &close.into(), self.frame_max);
        }
        self.fail(Error::Protocol(e), None);
    }

    fn handle_frame(&mut self, frame: RawFrame) -> Result<(), ProtocolError> {
        let RawFrame {
            kind,
            channel,
            payload,
        } = frame;
        match kind {
            FRAME_METHOD if channel == 0 => self.connection_method(Method::decode(payload)?),
            // basic.deliver is decoded straight into the delivery it starts (the hot path).
            FRAME_METHOD if payload.starts_with(&[0, 60, 0, 60]) => {
                self.start_delivery(channel, payload)
            }
            FRAME_METHOD => self.channel_method(channel, Method::decode(payload)?),
            FRAME_HEADER => {
                let limit = self.config.max_message_size;
                let Some(ch) = self
                    .channels
                    .get_mut(usize::from(channel))
                    .and_then(Option::as_mut)
                else {
                    // Still validated: a malformed header is a protocol error on any channel.
                    decode_header_into(payload, &mut BasicProperties::default())?;
                    return Ok(());
                };
                match &mut ch.incoming {
                    Some(inc) if inc.size.is_none() => {
                        let size = decode_header_into(payload, inc.properties_mut())?;
                        if size > limit {
                            return Err(ProtocolError::MessageTooLarge {
                                channel,
                                size,
                                limit,
                            });
                        }
                        inc.size = Some(size);
                        if size == 0 {
                            self.finish_content(channel);
                        }
                        Ok(())
                    }
                    _ => Err(unexpected(
                        channel,
                        "content header",
                        "not expecting content",
                    )),
                }
            }
            FRAME_BODY => {
                let Some(ch) = self
                    .channels
                    .get_mut(usize::from(channel))
                    .and_then(Option::as_mut)
                else {
                    return Ok(());
                };
                match &mut ch.incoming {
                    Some(Incoming {
                        size: Some(size),
                        body,
                        ..
                    }) => {
                        let size = *size;
                        if (body.len() + payload.len()) as u64 > size {
                            return Err(ProtocolError::BodyTooLong {
                                channel,
                                announced: size,
                            });
                        }
                        body.push(payload);
                        if body.len() as u64 == size {
                            self.finish_content(channel);
                        }
                        Ok(())
                    }
                    _ => Err(unexpected(channel, "body frame", "not expecting a body")),
                }
            }
            _ => Ok(()),
        }
    }

    fn start_delivery(&mut self, channel: u16, payload: Bytes) -> Result<(), ProtocolError> {
        let mut r = Reader::new(payload);
        r.u32()?;
        let d = BasicDeliver::read(&mut r)?;
        if r.remaining() > 0 {
            return Err(DecodeError::TrailingBytes {
                method: "basic.deliver",
                trailing: r.remaining(),
            }
            .into());
        }
        let Some(ch) = self
            .channels
            .get_mut(usize::from(channel))
            .and_then(Option::as_mut)
        else {
            debug!(channel, "basic.deliver for unknown channel ignored");
            return Ok(());
        };
        if ch.incoming.is_some() {
            return Err(unexpected(channel, "basic.deliver", "expecting content"));
        }
        if ch.held.is_some() {
            release_held(ch, &mut self.events);
        }
        ch.incoming = Some(Incoming::new(ContentKind::Deliver(Box::new(Delivery {
            channel,
            consumer_tag: d.consumer_tag,
            delivery_tag: d.delivery_tag,
            redelivered: d.redelivered,
            exchange: d.exchange,
            routing_key: d.routing_key,
            properties: BasicProperties::default(),
            body: Bytes::new(),
        }))));
        Ok(())
    }

    fn connection_method(&mut self, method: Method) -> Result<(), ProtocolError> {
        trace!(method = method.name(), "connection method");
        match (self.state, method) {
            (State::AwaitStart, Method::ConnectionStart(start)) => {
                if (start.version_major, start.version_minor) != (0, 9) {
                    return Err(ProtocolError::Version {
                        major: start.version_major,
                        minor: start.version_minor,
                    });
                }
                let mech = self.config.sasl.mechanism();
                let offered = String::from_utf8_lossy(&start.mechanisms).into_owned();
                if !offered.split_ascii_whitespace().any(|m| m == mech) {
                    return Err(ProtocolError::MechanismUnavailable {
                        wanted: mech,
                        offered,
                    });
                }
                self.server_properties = start.server_properties;
                let response = self.config.sasl.response().unwrap_or_default();
                let ok = ConnectionStartOk {
                    client_properties: self.config.client_properties(),
                    mechanism: ShortString::from_static(mech),
                    response,
                    locale: ShortString::from_static("en_US"),
                };
                self.send_conn(ok.into());
                self.state = State::AwaitTune;
                Ok(())
            }
            (State::AwaitTune, Method::ConnectionSecure(_)) => {
                // None of our mechanisms has a second step; answer with the same response.
                let response = self.config.sasl.response().unwrap_or_default();
                self.send_conn(crate::codec::ConnectionSecureOk { response }.into());
                Ok(())
            }
            (State::AwaitTune, Method::ConnectionTune(tune)) => {
                let pick16 = |ours: u16, theirs: u16| match (ours, theirs) {
                    (0, t) => t,
                    (o, 0) => o,
                    (o, t) => o.min(t),
                };
                self.channel_max = match pick16(self.config.channel_max, tune.channel_max) {
                    0 => u16::MAX,
                    n => n,
                };
                let fm = match (self.config.frame_max, tune.frame_max) {
                    (0, t) => t,
                    (o, 0) => o,
                    (o, t) => o.min(t),
                };
                self.frame_max = if fm == 0 {
                    self.config.frame_max.max(FRAME_MIN_SIZE)
                } else {
                    fm.max(FRAME_MIN_SIZE)
                };
                self.heartbeat = match self.config.heartbeat {
                    None => tune.heartbeat,
                    Some(0) => 0,
                    Some(h) if tune.heartbeat == 0 => h,
                    Some(h) => h.min(tune.heartbeat),
                };
                debug!(
                    channel_max = self.channel_max,
                    frame_max = self.frame_max,
                    heartbeat = self.heartbeat,
                    "tuned"
                );
                let ok = ConnectionTuneOk {
                    channel_max: self.channel_max,
                    frame_max: self.frame_max,
                    heartbeat: self.heartbeat,
                };
                self.send_conn(ok.into());
                let open = ConnectionOpen {
                    virtual_host: self.config.vhost.as_str().into(),
                    ..Default::default()
                };
                self.send_conn(open.into());
                self.state = State::AwaitOpenOk;
                Ok(())
            }
            (State::AwaitOpenOk, Method::ConnectionOpenOk(_)) => {
                self.state = State::Open;
                self.events.push_back(Event::Connected {
                    server_properties: self.server_properties.clone(),
                });
                Ok(())
            }
            (state, Method::ConnectionClose(close)) => {
                let reason = close_reason(
                    close.reply_code,
                    &close.reply_text,
                    close.class_id,
                    close.method_id,
                );
                self.send_conn(ConnectionCloseOk {}.into());
                let err = match state {
                    State::AwaitTune | State::AwaitStart
                        if reason.code == reply_code::ACCESS_REFUSED =>
                    {
                        Error::AuthenticationFailed {
                            user: self.config.sasl.user().to_owned(),
                            mechanism: self.config.sasl.mechanism(),
                            detail: reason.text,
                        }
                    }
                    State::AwaitOpenOk => Error::VhostAccess {
                        vhost: self.config.vhost.clone(),
                        reason,
                    },
                    _ => Error::ConnectionClosed(reason),
                };
                self.fail(err, None);
                Ok(())
            }
            (State::Closing, Method::ConnectionCloseOk(_)) => {
                self.finish_close();
                Ok(())
            }
            (State::Closing, _) => Ok(()),
            (State::Open, Method::ConnectionBlocked(b)) => {
                self.blocked = true;
                self.events.push_back(Event::Blocked {
                    reason: b.reason.to_string(),
                });
                Ok(())
            }
            (State::Open, Method::ConnectionUnblocked(_)) => {
                self.blocked = false;
                self.events.push_back(Event::Unblocked);
                Ok(())
            }
            (State::Open, Method::ConnectionUpdateSecretOk(_)) => {
                if let Some(token) = self.secret_token.take() {
                    self.events.push_back(Event::Reply {
                        token,
                        reply: Reply::Method(Method::ConnectionUpdateSecretOk(Default::default())),
                    });
                }
                Ok(())
            }
            (_, m) => Err(unexpected(0, m.name(), "on the connection")),
        }
    }

    fn channel_method(&mut self, channel: u16, method: Method) -> Result<(), ProtocolError> {
        let frame_max = self.frame_max;
        let Some(ch) = self
            .channels
            .get_mut(usize::from(channel))
            .and_then(Option::as_mut)
        else {
            debug!(
                channel,
                method = method.name(),
                "method for unknown channel ignored"
            );
            return Ok(());
        };
        if ch.incoming.is_some() {
            return Err(unexpected(channel, method.name(), "expecting content"));
        }
        if ch.held.is_some() && !matches!(method, Method::BasicAck(_) | Method::BasicNack(_)) {
            // Any other frame ends the confirms that followed a return: see `on_confirm`.
            release_held(ch, &mut self.events);
        }
        match method {
            Method::BasicDeliver(d) => {
                ch.incoming = Some(Incoming::new(ContentKind::Deliver(Box::new(Delivery {
                    channel,
                    consumer_tag: d.consumer_tag,
                    delivery_tag: d.delivery_tag,
                    redelivered: d.redelivered,
                    exchange: d.exchange,
                    routing_key: d.routing_key,
                    properties: BasicProperties::default(),
                    body: Bytes::new(),
                }))));
            }
            Method::BasicReturn(r) => {
                ch.incoming = Some(Incoming::new(ContentKind::Return(Box::new(
                    ReturnedMessage {
                        channel,
                        reply_code: r.reply_code,
                        reply_text: r.reply_text,
                        exchange: r.exchange,
                        routing_key: r.routing_key,
                        properties: BasicProperties::default(),
                        body: Bytes::new(),
                    },
                ))));
            }
            Method::BasicAck(a) => {
                if !ch.confirm {
                    return Err(unexpected(channel, "basic.ack", "not in confirm mode"));
                }
                on_confirm(ch, &mut self.events, a.delivery_tag, a.multiple, true);
            }
            Method::BasicNack(n) => {
                if !ch.confirm {
                    return Err(unexpected(channel, "basic.nack", "not in confirm mode"));
                }
                on_confirm(ch, &mut self.events, n.delivery_tag, n.multiple, false);
            }
            Method::BasicCancel(c) => {
                if !c.nowait {
                    let ok = crate::codec::BasicCancelOk {
                        consumer_tag: c.consumer_tag.clone(),
                    };
                    let _ = encode_method(self.tx.buf(), channel, &ok.into(), frame_max);
                }
                self.events.push_back(Event::ConsumerCancelled {
                    channel,
                    consumer_tag: c.consumer_tag,
                });
            }
            Method::ChannelFlow(f) => {
                ch.active = f.active;
                let _ = encode_method(
                    self.tx.buf(),
                    channel,
                    &ChannelFlowOk { active: f.active }.into(),
                    frame_max,
                );
                self.events.push_back(Event::Flow {
                    channel,
                    active: f.active,
                });
            }
            Method::ChannelClose(c) => {
                let _ = encode_method(self.tx.buf(), channel, &ChannelCloseOk {}.into(), frame_max);
                let reason = close_reason(c.reply_code, &c.reply_text, c.class_id, c.method_id);
                debug!(channel, %reason, "channel closed by broker");
                let err = Error::ChannelClosed { channel, reason };
                self.drop_channel(channel, Some(err));
            }
            Method::BasicGetOk(g) => {
                if !matches!(ch.pending.front(), Some(p) if p.expect == Expect::Get) {
                    return Err(unexpected(channel, "basic.get-ok", "no basic.get pending"));
                }
                ch.incoming = Some(Incoming::new(ContentKind::GetOk(Box::new(GetMessage {
                    delivery: Delivery {
                        channel,
                        consumer_tag: ShortString::empty(),
                        delivery_tag: g.delivery_tag,
                        redelivered: g.redelivered,
                        exchange: g.exchange,
                        routing_key: g.routing_key,
                        properties: BasicProperties::default(),
                        body: Bytes::new(),
                    },
                    message_count: g.message_count,
                }))));
            }
            reply => {
                let Some(p) = ch.pending.front() else {
                    return Err(unexpected(channel, reply.name(), "no request pending"));
                };
                if !p.expect.matches(&reply) {
                    return Err(unexpected(channel, reply.name(), "awaiting another reply"));
                }
                let Some(p) = ch.pending.pop_front() else {
                    return Ok(());
                };
                match reply {
                    Method::ChannelOpenOk(_) => {
                        ch.state = ChanState::Open;
                        self.events.push_back(Event::Reply {
                            token: p.token,
                            reply: Reply::ChannelOpened(channel),
                        });
                    }
                    Method::ChannelCloseOk(_) => {
                        // The channel's close is reported before the close's own reply, so
                        // whoever waits for that reply finds the channel closed already.
                        self.drop_channel(channel, None);
                        self.events.push_back(Event::Reply {
                            token: p.token,
                            reply: Reply::Method(reply),
                        });
                    }
                    Method::BasicGetEmpty(_) => {
                        self.events.push_back(Event::Reply {
                            token: p.token,
                            reply: Reply::GetEmpty,
                        });
                    }
                    Method::ChannelFlowOk(ref f) => {
                        ch.active = f.active;
                        self.events.push_back(Event::Reply {
                            token: p.token,
                            reply: Reply::Method(reply),
                        });
                    }
                    other => {
                        self.events.push_back(Event::Reply {
                            token: p.token,
                            reply: Reply::Method(other),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn finish_content(&mut self, channel: u16) {
        let Some(ch) = self
            .channels
            .get_mut(usize::from(channel))
            .and_then(Option::as_mut)
        else {
            return;
        };
        let Some(inc) = ch.incoming.take() else {
            return;
        };
        let body = inc.body.into_bytes();
        match inc.kind {
            ContentKind::Deliver(mut d) => {
                d.body = body;
                self.events.push_back(Event::Delivery(d));
            }
            ContentKind::Return(mut r) => {
                r.body = body;
                if ch.confirm {
                    // RabbitMQ sends a return just before the ack of the same publish: keep it
                    // for that ack (`on_confirm`), if a mandatory publish can still claim it.
                    release_held(ch, &mut self.events);
                    if let Some(old) = ch.returned.take() {
                        self.events.push_back(Event::Returned(old));
                    }
                    if ch.mandatory > 0 {
                        ch.returned = Some(r);
                    } else {
                        self.events.push_back(Event::Returned(r));
                    }
                } else {
                    self.events.push_back(Event::Returned(r));
                }
            }
            ContentKind::GetOk(mut g) => {
                g.delivery.body = body;
                if let Some(p) = ch.pending.pop_front() {
                    self.events.push_back(Event::Reply {
                        token: p.token,
                        reply: Reply::Get(g),
                    });
                }
            }
        }
    }

    // ----- requests ----------------------------------------------------------------------------

    /// Open a channel: the lowest free id, or `id` if given. The reply is
    /// [`Reply::ChannelOpened`] with the id.
    pub fn open_channel(&mut self, id: Option<u16>, token: T) -> Result<u16, (T, Error)> {
        if let Some(e) = self.unusable() {
            return Err((token, e));
        }
        let max = self.channel_max;
        let id = match id {
            Some(0) => return Err((token, Error::InvalidUse("channel 0 is the connection's"))),
            Some(id) if id > max => return Err((token, Error::ChannelsExhausted(max))),
            Some(id) if self.has_channel(id) => {
                return Err((token, Error::InvalidUse("channel id already in use")))
            }
            Some(id) => id,
            None => match (1..=max).find(|i| !self.has_channel(*i)) {
                Some(id) => id,
                None => return Err((token, Error::ChannelsExhausted(max))),
            },
        };
        let idx = usize::from(id);
        if self.channels.len() <= idx {
            self.channels.resize_with(idx + 1, || None);
        }
        let mut ch = Chan::new();
        ch.pending.push_back(Pending {
            token,
            expect: Expect::Method(20, 11),
        });
        if let Some(slot) = self.channels.get_mut(idx) {
            *slot = Some(ch);
        }
        let _ = encode_method(
            self.tx.buf(),
            id,
            &crate::codec::ChannelOpen::default().into(),
            self.frame_max,
        );
        Ok(id)
    }

    /// Send a request on `channel`. Its reply (or [`Reply::Sent`] when none is expected) comes
    /// back as [`Event::Reply`] with `token`; a failure as [`Event::Failed`].
    pub fn call(&mut self, channel: u16, method: Method, token: T) {
        if let Err(error) = self.try_call(channel, &method) {
            self.events.push_back(Event::Failed { token, error });
            return;
        }
        let Some(ch) = self
            .channels
            .get_mut(usize::from(channel))
            .and_then(Option::as_mut)
        else {
            return;
        };
        match Expect::for_request(&method) {
            Some(expect) => ch.pending.push_back(Pending { token, expect }),
            None => self.events.push_back(Event::Reply {
                token,
                reply: Reply::Sent,
            }),
        }
    }

    fn try_call(&mut self, channel: u16, method: &Method) -> Result<(), Error> {
        if let Some(e) = self.unusable() {
            return Err(e);
        }
        let frame_max = self.frame_max;
        let Some(ch) = self
            .channels
            .get_mut(usize::from(channel))
            .and_then(Option::as_mut)
        else {
            return Err(Error::InvalidUse("channel is not open"));
        };
        if ch.state == ChanState::Closing {
            return Err(Error::ChannelClosedByClient(channel));
        }
        encode_method(self.tx.buf(), channel, method, frame_max)?;
        let Some(ch) = self
            .channels
            .get_mut(usize::from(channel))
            .and_then(Option::as_mut)
        else {
            return Ok(());
        };
        match method {
            Method::ConfirmSelect(_) if !ch.confirm => {
                ch.confirm = true;
                ch.next_seq = 1;
            }
            Method::ChannelClose(_) => ch.state = ChanState::Closing,
            _ => {}
        }
        Ok(())
    }

    /// Send a method that has no reply (`basic.ack`, `basic.nack`, `basic.reject`,
    /// `basic.recover-async`, …).
    pub fn send(&mut self, channel: u16, method: &Method) -> Result<(), Error> {
        self.try_call(channel, method)
    }

    /// Publish a message. In confirm mode the `token` comes back with [`Event::Confirm`] when the
    /// broker acks or nacks it (or returns it, for a mandatory message no queue took:
    /// `Confirmation::Returned`); otherwise with `Confirmation::NotRequested` at once.
    /// Returns the publish sequence number in confirm mode.
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        &mut self,
        channel: u16,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        immediate: bool,
        properties: &BasicProperties,
        body: Bytes,
        token: Option<T>,
    ) -> Result<Option<u64>, (Option<T>, Error)> {
        if let Some(e) = self.unusable() {
            return Err((token, e));
        }
        let frame_max = self.frame_max;
        let Some(ch) = self.chan(channel) else {
            return Err((token, Error::InvalidUse("channel is not open")));
        };
        if ch.state == ChanState::Closing {
            return Err((token, Error::ChannelClosedByClient(channel)));
        }
        let buf = self.tx.buf();
        let start = buf.len();
        // basic.publish encoded by hand: this is the hot path.
        let encoded = (|| -> Result<(), crate::codec::EncodeError> {
            publish_frame(buf, channel, exchange, routing_key, mandatory, immediate)?;
            encode_header(buf, channel, body.len() as u64, properties, frame_max)
        })();
        if let Err(e) = encoded {
            self.tx.buf().truncate(start);
            return Err((token, e.into()));
        }
        let chunk = max_body_chunk(frame_max);
        let mut rest = body;
        while !rest.is_empty() {
            let part = rest.split_to(chunk.min(rest.len()));
            encode_body_frame_start(self.tx.buf(), channel, part.len() as u32);
            self.tx.put_body(part);
            self.tx.buf().put_u8(FRAME_END);
        }
        let Some(ch) = self
            .channels
            .get_mut(usize::from(channel))
            .and_then(Option::as_mut)
        else {
            return Ok(None);
        };
        if ch.confirm {
            let seq = ch.next_seq;
            ch.next_seq += 1;
            if token.is_some() || mandatory {
                ch.mandatory += usize::from(mandatory);
                ch.unconfirmed.push_back(Unconfirmed {
                    seq,
                    token,
                    mandatory,
                });
            }
            Ok(Some(seq))
        } else {
            if let Some(token) = token {
                self.events.push_back(Event::Confirm {
                    token,
                    confirmation: Confirmation::NotRequested,
                });
            }
            Ok(None)
        }
    }

    /// Close the connection; `token` comes back with [`Event::Reply`] once the server confirmed.
    pub fn close(&mut self, code: u16, text: &str, token: T) {
        match self.state {
            State::Closed => match self.error.clone() {
                Some(error) => self.events.push_back(Event::Failed { token, error }),
                None => self.events.push_back(Event::Reply {
                    token,
                    reply: Reply::Sent,
                }),
            },
            State::Closing => self.events.push_back(Event::Reply {
                token,
                reply: Reply::Sent,
            }),
            _ => {
                let close = ConnectionClose {
                    reply_code: code,
                    reply_text: text.into(),
                    class_id: 0,
                    method_id: 0,
                };
                self.send_conn(close.into());
                self.close_token = Some(token);
                self.state = State::Closing;
            }
        }
    }

    /// `connection.update-secret` (refresh an OAuth token). One at a time.
    pub fn update_secret(&mut self, secret: Bytes, reason: &str, token: T) {
        if let Some(error) = self.unusable() {
            self.events.push_back(Event::Failed { token, error });
            return;
        }
        if self.secret_token.is_some() {
            self.events.push_back(Event::Failed {
                token,
                error: Error::InvalidUse("an update-secret is already pending"),
            });
            return;
        }
        self.send_conn(
            crate::codec::ConnectionUpdateSecret {
                new_secret: secret,
                reason: reason.into(),
            }
            .into(),
        );
        self.secret_token = Some(token);
    }

    // ----- internals ---------------------------------------------------------------------------

    fn unusable(&self) -> Option<Error> {
        match self.state {
            State::Open => None,
            State::Closed => Some(
                self.error
                    .clone()
                    .unwrap_or(Error::ConnectionClosedByClient),
            ),
            State::Closing => Some(Error::ConnectionClosedByClient),
            _ => Some(Error::InvalidUse("connection is not open yet")),
        }
    }

    fn chan(&self, id: u16) -> Option<&Chan<T>> {
        self.channels.get(usize::from(id)).and_then(Option::as_ref)
    }

    fn send_conn(&mut self, m: Method) {
        if let Err(e) = encode_method(self.tx.buf(), 0, &m, self.frame_max) {
            warn!(error = %e, method = m.name(), "could not encode connection method");
        }
    }

    /// Remove a channel, failing whatever waited on it. The channel's close is reported first,
    /// so a driver marks it closed before any waiter learns of the failure.
    fn drop_channel(&mut self, channel: u16, error: Option<Error>) {
        let Some(mut ch) = self
            .channels
            .get_mut(usize::from(channel))
            .and_then(Option::take)
        else {
            return;
        };
        release_held(&mut ch, &mut self.events);
        if let Some(r) = ch.returned.take() {
            self.events.push_back(Event::Returned(r));
        }
        let err = error
            .clone()
            .unwrap_or(Error::ChannelClosedByClient(channel));
        self.events
            .push_back(Event::ChannelClosed { channel, error });
        for p in ch.pending {
            self.events.push_back(Event::Failed {
                token: p.token,
                error: err.clone(),
            });
        }
        for u in ch.unconfirmed {
            if let Some(token) = u.token {
                self.events.push_back(Event::Failed {
                    token,
                    error: err.clone(),
                });
            }
        }
    }

    fn finish_close(&mut self) {
        self.state = State::Closed;
        let ids: Vec<u16> = (0..self.channels.len())
            .filter_map(|i| u16::try_from(i).ok())
            .collect();
        for id in ids {
            self.drop_channel(id, Some(Error::ConnectionClosedByClient));
        }
        if let Some(token) = self.secret_token.take() {
            self.events.push_back(Event::Failed {
                token,
                error: Error::ConnectionClosedByClient,
            });
        }
        if let Some(token) = self.close_token.take() {
            self.events.push_back(Event::Reply {
                token,
                reply: Reply::Method(Method::ConnectionCloseOk(ConnectionCloseOk {})),
            });
        }
        self.events.push_back(Event::Closed { error: None });
    }

    /// Close the connection because of `error`: everything pending fails with it.
    fn fail(&mut self, error: Error, _ctx: Option<&str>) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        let ids: Vec<u16> = (0..self.channels.len())
            .filter_map(|i| u16::try_from(i).ok())
            .collect();
        for id in ids {
            self.drop_channel(id, Some(error.clone()));
        }
        for token in [self.close_token.take(), self.secret_token.take()]
            .into_iter()
            .flatten()
        {
            self.events.push_back(Event::Failed {
                token,
                error: error.clone(),
            });
        }
        self.error = Some(error.clone());
        self.events.push_back(Event::Closed { error: Some(error) });
    }
}

/// `basic.ack` / `basic.nack` from the broker in confirm mode, with a `basic.return` possibly
/// waiting for the ack of its publish.
///
/// RabbitMQ sends a return while it routes the publish, then (before anything else on that
/// channel) the confirms it has gathered: at most one multiple ack for the oldest ones, then
/// single acks in ascending order, the last of which is the returned publish's own (its
/// sequence number is the highest they confirm). So the return belongs to the first ack after
/// it whose tag is a mandatory publish, except when that ack is a multiple one: it may then be
/// an earlier flush of routed publishes' confirms, with the returned publish's single ack
/// still to come. That can only be when another mandatory publish waits behind a publish that
/// is still unconfirmed; then the decision waits for the next frame ([`Held`]): a single ack of
/// such a mandatory publish, with an unconfirmed one below it, takes the return over; anything
/// else leaves it with the held one. (Exact while a channel's routed publishes are confirmed in
/// order, as with one queue; with several queues confirming out of order an ack may be matched
/// wrongly.)
fn on_confirm<T>(
    ch: &mut Chan<T>,
    events: &mut VecDeque<Event<T>>,
    tag: u64,
    multiple: bool,
    ack: bool,
) {
    if ch.returned.is_none() && ch.held.is_none() {
        // The common case: no return in sight.
        settle(ch, events, tag, multiple, ack);
        return;
    }
    if let Some(h) = ch.held.take() {
        let takes_over = ack
            && !multiple
            && tag > h.seq
            && ch.unconfirmed.front().is_some_and(|u| u.seq < tag)
            && position(ch, tag)
                .is_some_and(|i| ch.unconfirmed.get(i).is_some_and(|u| u.mandatory));
        if takes_over {
            if let Some(token) = h.token {
                events.push_back(Event::Confirm {
                    token,
                    confirmation: Confirmation::Ack,
                });
            }
            ch.returned = Some(h.returned);
        } else {
            emit_returned(events, h.token, h.returned);
        }
    }
    let Some(returned) = ch.returned.take() else {
        settle(ch, events, tag, multiple, ack);
        return;
    };
    let own = if ack {
        position(ch, tag).filter(|&i| ch.unconfirmed.get(i).is_some_and(|u| u.mandatory))
    } else {
        None
    };
    let Some(own) = own.and_then(|i| take(ch, i)) else {
        settle(ch, events, tag, multiple, ack);
        ch.returned = Some(returned);
        return;
    };
    if multiple {
        settle(ch, events, tag, true, true);
        let front_mandatory = ch.unconfirmed.front().is_some_and(|u| u.mandatory);
        if ch.mandatory > usize::from(front_mandatory) {
            ch.held = Some(Held {
                seq: own.seq,
                token: own.token,
                returned,
            });
            return;
        }
    }
    emit_returned(events, own.token, returned);
}

/// A held publish was the returned one after all (the frames that could say otherwise are over).
fn release_held<T>(ch: &mut Chan<T>, events: &mut VecDeque<Event<T>>) {
    if let Some(h) = ch.held.take() {
        emit_returned(events, h.token, h.returned);
    }
}

/// A publish came back: its token learns it, or, without one, the returns stream.
fn emit_returned<T>(
    events: &mut VecDeque<Event<T>>,
    token: Option<T>,
    returned: Box<ReturnedMessage>,
) {
    events.push_back(match token {
        Some(token) => Event::Confirm {
            token,
            confirmation: Confirmation::Returned(returned),
        },
        None => Event::Returned(returned),
    });
}

fn position<T>(ch: &Chan<T>, seq: u64) -> Option<usize> {
    ch.unconfirmed.binary_search_by_key(&seq, |u| u.seq).ok()
}

fn take<T>(ch: &mut Chan<T>, i: usize) -> Option<Unconfirmed<T>> {
    let u = ch.unconfirmed.remove(i)?;
    ch.mandatory = ch.mandatory.saturating_sub(usize::from(u.mandatory));
    Some(u)
}

fn settle<T>(
    ch: &mut Chan<T>,
    events: &mut VecDeque<Event<T>>,
    tag: u64,
    multiple: bool,
    ack: bool,
) {
    let mut confirmed = |u: Unconfirmed<T>| {
        if let Some(token) = u.token {
            events.push_back(Event::Confirm {
                token,
                confirmation: if ack {
                    Confirmation::Ack
                } else {
                    Confirmation::Nack
                },
            });
        }
    };
    if multiple {
        // Tag 0 with multiple means "everything outstanding" (AMQP 0-9-1 basic.ack).
        let tag = if tag == 0 { u64::MAX } else { tag };
        while ch.unconfirmed.front().is_some_and(|u| u.seq <= tag) {
            if let Some(u) = ch.unconfirmed.pop_front() {
                ch.mandatory = ch.mandatory.saturating_sub(usize::from(u.mandatory));
                confirmed(u);
            }
        }
    } else if let Some(u) = position(ch, tag).and_then(|i| take(ch, i)) {
        confirmed(u);
    }
}

fn publish_frame(
    buf: &mut BytesMut,
    channel: u16,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    immediate: bool,
) -> Result<(), crate::codec::EncodeError> {
    let too_long = |s: &str| crate::codec::EncodeError::ShortStringTooLong {
        len: s.len(),
        preview: s.chars().take(32).collect(),
    };
    let el = u8::try_from(exchange.len()).map_err(|_| too_long(exchange))?;
    let rl = u8::try_from(routing_key.len()).map_err(|_| too_long(routing_key))?;
    let size = 2 + 2 + 2 + 1 + exchange.len() + 1 + routing_key.len() + 1;
    buf.reserve(size + 8);
    buf.put_u8(crate::codec::FRAME_METHOD);
    buf.put_u16(channel);
    buf.put_u32(size as u32);
    buf.put_u16(60);
    buf.put_u16(40);
    buf.put_u16(0);
    buf.put_u8(el);
    buf.put_slice(exchange.as_bytes());
    buf.put_u8(rl);
    buf.put_slice(routing_key.as_bytes());
    buf.put_u8(u8::from(mandatory) | (u8::from(immediate) << 1));
    buf.put_u8(FRAME_END);
    Ok(())
}

fn close_reason(code: u16, text: &ShortString, class_id: u16, method_id: u16) -> CloseReason {
    CloseReason {
        code,
        text: text.to_string(),
        class_id,
        method_id,
    }
}

fn unexpected(channel: u16, what: &str, state: &'static str) -> ProtocolError {
    ProtocolError::UnexpectedFrame {
        channel,
        what: what.to_owned(),
        state,
    }
}

#[cfg(test)]
mod tests;
