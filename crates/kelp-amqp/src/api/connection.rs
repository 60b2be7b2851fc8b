//! [`Connection`]: open, make channels, close.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::channel::Channel;
use super::shared::{ChannelShared, ConnShared, Tuning};
use crate::codec::FieldTable;
use crate::driver::{connect, Command};
use crate::engine::{Config, Sasl};
use crate::error::Error;
use crate::url::{AmqpUrl, AuthMechanism};

/// A connection to an AMQP 0-9-1 broker. Cheap to clone; all clones share one socket and one
/// background task. The connection closes when [`Connection::close`] is called or when every
/// handle (connections, channels, consumers) is dropped.
///
/// ```no_run
/// # async fn demo() -> Result<(), kelp_amqp::Error> {
/// use kelp_amqp::Connection;
/// let conn = Connection::open("amqp://guest:guest@localhost:5672/%2f").await?;
/// let ch = conn.channel().await?;
/// conn.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connection {
    tx: mpsc::Sender<Command>,
    shared: Arc<ConnShared>,
    url: Arc<AmqpUrl>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("url", &self.url.to_string())
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Options beyond the URL.
///
/// ```no_run
/// # async fn demo() -> Result<(), kelp_amqp::Error> {
/// use kelp_amqp::ConnectionBuilder;
/// let conn = ConnectionBuilder::new("amqp://localhost//")?
///     .connection_name("billing-worker")
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ConnectionBuilder {
    url: AmqpUrl,
    config: Config,
}

impl ConnectionBuilder {
    /// Start from a URL string.
    pub fn new(url: &str) -> Result<Self, Error> {
        Ok(Self::from_url(
            AmqpUrl::parse(url).map_err(|e| Error::Url(Arc::new(e)))?,
        ))
    }
    /// Start from a parsed URL.
    pub fn from_url(url: AmqpUrl) -> Self {
        let config = config_from_url(&url);
        ConnectionBuilder { url, config }
    }
    /// Name shown in the broker's management UI.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.config.connection_name = Some(name.into());
        self
    }
    /// Extra client properties.
    pub fn client_properties(mut self, props: FieldTable) -> Self {
        self.config.client_properties = props;
        self
    }
    /// Largest message body accepted from the broker (default 128 MiB).
    pub fn max_message_size(mut self, bytes: u64) -> Self {
        self.config.max_message_size = bytes;
        self
    }
    /// Open the connection.
    pub async fn connect(self) -> Result<Connection, Error> {
        let shared = Arc::new(ConnShared::new());
        let tx = connect(&self.url, self.config, shared.clone()).await?;
        Ok(Connection {
            tx,
            shared,
            url: Arc::new(self.url),
        })
    }
}

fn config_from_url(url: &AmqpUrl) -> Config {
    let defaults = Config::default();
    let (user, password) = (url.username.clone(), url.password().to_owned());
    let sasl = match url.auth_mechanism {
        AuthMechanism::External => Sasl::External,
        AuthMechanism::AmqPlain => Sasl::AmqPlain { user, password },
        _ => Sasl::Plain { user, password },
    };
    Config {
        sasl,
        vhost: url.vhost.clone(),
        heartbeat: url.heartbeat.or(defaults.heartbeat),
        frame_max: url.frame_max.unwrap_or(defaults.frame_max),
        channel_max: url.channel_max.unwrap_or(defaults.channel_max),
        ..defaults
    }
}

impl Connection {
    /// Connect to `url` (`amqp://user:pass@host:port/vhost?heartbeat=10`, `amqps://…`).
    pub async fn open(url: &str) -> Result<Connection, Error> {
        ConnectionBuilder::new(url)?.connect().await
    }

    /// Connect to a parsed URL.
    pub async fn open_url(url: AmqpUrl) -> Result<Connection, Error> {
        ConnectionBuilder::from_url(url).connect().await
    }

    /// Open a new channel.
    pub async fn channel(&self) -> Result<Channel, Error> {
        self.open_channel(None).await
    }

    /// Open a channel with a chosen id.
    pub async fn channel_with_id(&self, id: u16) -> Result<Channel, Error> {
        self.open_channel(Some(id)).await
    }

    async fn open_channel(&self, id: Option<u16>) -> Result<Channel, Error> {
        if let Some(e) = self.close_error() {
            return Err(e);
        }
        let shared = Arc::new(ChannelShared::new());
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::OpenChannel {
                id,
                shared: shared.clone(),
                reply,
            })
            .await
            .map_err(|_| self.gone())?;
        let id = rx.await.map_err(|_| self.gone())??;
        Ok(Channel::new(
            id,
            self.tx.clone(),
            shared,
            self.shared.clone(),
        ))
    }

    /// Close the connection (`connection.close` with 200) and wait for the broker's answer.
    /// From the moment it is called every channel and consumer of it fails with
    /// [`Error::ConnectionClosedByClient`]; when it returns, the connection is closed.
    pub async fn close(&self) -> Result<(), Error> {
        if let Some(e) = self.shared.closed() {
            return match e {
                Error::ConnectionClosedByClient => Ok(()),
                e => Err(e.clone()),
            };
        }
        self.shared.begin_close();
        // Orders the flag before the command (see `Channel::recheck`).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Close {
                code: 200,
                text: "bye".into(),
                reply,
            })
            .await
            .is_err()
        {
            return Ok(());
        }
        match rx.await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Ok(()),
        }
    }

    /// True once the connection is closed, for any reason, or this client began closing it.
    pub fn is_closed(&self) -> bool {
        self.shared.closed().is_some() || self.shared.is_closing() || self.tx.is_closed()
    }

    /// Wait until the connection closes, for any reason, and return why
    /// ([`Error::ConnectionClosedByClient`] after [`Connection::close`]). Any number of tasks
    /// may wait; it returns at once on a closed connection.
    ///
    /// ```no_run
    /// # async fn demo(conn: kelp_amqp::Connection) {
    /// tokio::spawn(async move {
    ///     let why = conn.closed().await;
    ///     eprintln!("connection lost: {why}");
    /// });
    /// # }
    /// ```
    pub async fn closed(&self) -> Error {
        let mut watch = self.shared.closed_watch();
        tokio::select! {
            _ = watch.wait_for(|closed| *closed) => {}
            // The connection task is gone without saying why (runtime shut down).
            _ = self.tx.closed() => {}
        }
        self.close_error().unwrap_or(Error::DriverGone)
    }

    /// A handle that waits for the close without keeping the connection alive (unlike a
    /// clone of the connection, which keeps it open until dropped). For close callbacks.
    ///
    /// ```no_run
    /// # fn demo(conn: &kelp_amqp::Connection) {
    /// let closing = conn.close_signal();
    /// tokio::spawn(async move { eprintln!("closed: {}", closing.wait().await) });
    /// # }
    /// ```
    pub fn close_signal(&self) -> CloseSignal {
        CloseSignal {
            shared: self.shared.clone(),
        }
    }

    /// Why the connection closed, if it did ([`Error::ConnectionClosedByClient`] as soon as
    /// [`Connection::close`] was called).
    pub fn close_error(&self) -> Option<Error> {
        match self.shared.closed() {
            Some(e) => Some(e.clone()),
            None if self.shared.is_closing() => Some(Error::ConnectionClosedByClient),
            None => None,
        }
    }

    /// Negotiated parameters and the server's properties.
    pub fn tuning(&self) -> Tuning {
        self.shared.tuning().cloned().unwrap_or_default()
    }

    /// The URL, password masked when displayed.
    pub fn url(&self) -> &AmqpUrl {
        &self.url
    }

    /// Watch `connection.blocked` / `unblocked`: `Some(reason)` while the broker blocks publishers.
    pub fn blocked(&self) -> watch::Receiver<Option<String>> {
        self.shared.blocked()
    }

    /// `connection.update-secret`: hand the broker a new secret (e.g. a refreshed OAuth token).
    pub async fn update_secret(
        &self,
        secret: impl Into<bytes::Bytes>,
        reason: &str,
    ) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::UpdateSecret {
                secret: secret.into(),
                reason: reason.into(),
                reply,
            })
            .await
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?.map(|_| ())
    }

    fn gone(&self) -> Error {
        self.shared.closed().cloned().unwrap_or(Error::DriverGone)
    }
}

/// Waits for a connection to close without keeping it open; see [`Connection::close_signal`].
#[derive(Debug, Clone)]
pub struct CloseSignal {
    shared: Arc<ConnShared>,
}

impl CloseSignal {
    /// Wait until the connection closes and return why.
    pub async fn wait(&self) -> Error {
        let mut watch = self.shared.closed_watch();
        // The sender lives in the shared state this handle holds, so it cannot vanish.
        let _ = watch.wait_for(|closed| *closed).await;
        self.shared.closed().cloned().unwrap_or(Error::DriverGone)
    }
}
