//! AMQP URLs: `amqp://user:pass@host:port/vhost?query` and `amqps://…`.
//!
//! Parsing follows the [RabbitMQ URI specification](https://www.rabbitmq.com/docs/uri-spec)
//! and its [query parameters](https://www.rabbitmq.com/docs/uri-query-parameters), plus the
//! forms accepted by Kombu (Celery):
//!
//! - the scheme is case-insensitive and must be `amqp` or `amqps`;
//! - user name, password, host, vhost and query values are percent-decoded (`+` is *not* a
//!   space);
//! - a missing user info means `guest`/`guest`; `amqp://@host` and `amqp://:@host` mean an empty
//!   user name and password; `amqp://user@host` keeps the default password (`guest`);
//! - an empty host means `localhost`; an IPv6 literal is written `[::1]` and stored without the
//!   brackets; an empty or missing port means 5672 (`amqp`) or 5671 (`amqps`);
//! - the vhost is everything after the first `/` of the path, percent-decoded: no path, an empty
//!   path segment (`amqp://host/`), `%2f` and Kombu's `amqp://host//` all mean the vhost `/`,
//!   and `amqp://host/a/b` means the vhost `a/b`;
//! - query parameters `heartbeat` (seconds), `frame_max`, `channel_max`, `connection_timeout`
//!   (milliseconds), `auth_mechanism` (`PLAIN`, `AMQPLAIN`, `EXTERNAL`), and for TLS
//!   `cacertfile`, `certfile`, `keyfile`, `verify` (`verify_peer`, `verify_none`) and
//!   `server_name_indication` (`disable` turns it off). Unknown parameters are ignored; a known
//!   parameter with a bad value is an error.
//!
//! The password is never shown by [`Display`](std::fmt::Display) or [`Debug`] (it is printed as
//! `****`), and no [`UrlError`] message contains it.
//!
//! ```
//! use kelp_amqp::url::{AmqpUrl, Scheme};
//!
//! let url: AmqpUrl = "amqps://bob:s%40cret@rabbit.example:5671/%2f?heartbeat=30".parse()?;
//! assert_eq!(url.scheme, Scheme::Amqps);
//! assert_eq!(url.username, "bob");
//! assert_eq!(url.password(), "s@cret");
//! assert_eq!(url.vhost, "/");
//! assert_eq!(url.heartbeat, Some(30));
//! assert_eq!(
//!     url.to_string(),
//!     "amqps://bob:****@rabbit.example:5671/%2F?heartbeat=30"
//! );
//! # Ok::<(), kelp_amqp::url::UrlError>(())
//! ```

use std::fmt;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Characters percent-encoded when a URL is displayed: everything but RFC 3986 "unreserved".
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

const DEFAULT_USER: &str = "guest";
const DEFAULT_PASSWORD: &str = "guest";
const DEFAULT_HOST: &str = "localhost";
const DEFAULT_VHOST: &str = "/";

/// The URL scheme: plain TCP or TLS.
///
/// ```
/// use kelp_amqp::url::Scheme;
///
/// assert_eq!(Scheme::Amqps.default_port(), 5671);
/// assert_eq!(Scheme::Amqp.as_str(), "amqp");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scheme {
    /// `amqp://`: plain TCP, default port 5672.
    #[default]
    Amqp,
    /// `amqps://`: TLS, default port 5671.
    Amqps,
}

impl Scheme {
    /// The port used when the URL does not give one: 5672 for `amqp`, 5671 for `amqps`.
    pub const fn default_port(self) -> u16 {
        match self {
            Scheme::Amqp => 5672,
            Scheme::Amqps => 5671,
        }
    }

    /// The scheme as written in a URL (`"amqp"` or `"amqps"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Scheme::Amqp => "amqp",
            Scheme::Amqps => "amqps",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The SASL mechanism used to authenticate (query parameter `auth_mechanism`).
///
/// ```
/// use kelp_amqp::url::{AmqpUrl, AuthMechanism};
///
/// let url = AmqpUrl::parse("amqps://host?auth_mechanism=external")?;
/// assert_eq!(url.auth_mechanism, AuthMechanism::External);
/// assert_eq!(url.auth_mechanism.as_str(), "EXTERNAL");
/// # Ok::<(), kelp_amqp::url::UrlError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AuthMechanism {
    /// `PLAIN` (the default): user name and password.
    #[default]
    Plain,
    /// `AMQPLAIN`: user name and password in an AMQP field table.
    AmqPlain,
    /// `EXTERNAL`: identity taken from the TLS client certificate.
    External,
}

impl AuthMechanism {
    /// The SASL mechanism name: `"PLAIN"`, `"AMQPLAIN"` or `"EXTERNAL"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            AuthMechanism::Plain => "PLAIN",
            AuthMechanism::AmqPlain => "AMQPLAIN",
            AuthMechanism::External => "EXTERNAL",
        }
    }
}

/// Whether the server's TLS certificate is verified (query parameter `verify`).
///
/// ```
/// use kelp_amqp::url::{AmqpUrl, Verify};
///
/// assert_eq!(AmqpUrl::parse("amqps://host")?.tls.verify, Verify::Peer);
/// assert_eq!(AmqpUrl::parse("amqps://host?verify=verify_none")?.tls.verify, Verify::None);
/// # Ok::<(), kelp_amqp::url::UrlError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Verify {
    /// `verify_peer` (the default): verify the certificate chain and the server name.
    #[default]
    Peer,
    /// `verify_none`: accept any certificate (insecure; explicit opt-in only).
    None,
}

/// TLS settings taken from the query string; used only for `amqps` URLs.
///
/// ```
/// use kelp_amqp::url::AmqpUrl;
///
/// let url = AmqpUrl::parse("amqps://host?cacertfile=%2Fetc%2Fca.pem&server_name_indication=rmq")?;
/// assert_eq!(url.tls.cacertfile.as_deref(), Some(std::path::Path::new("/etc/ca.pem")));
/// assert_eq!(url.tls_server_name(), "rmq");
/// # Ok::<(), kelp_amqp::url::UrlError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsOptions {
    /// PEM file of CA certificates to trust (`cacertfile`); `None` means the built-in roots.
    pub cacertfile: Option<PathBuf>,
    /// PEM file with the client certificate chain (`certfile`).
    pub certfile: Option<PathBuf>,
    /// PEM file with the client private key (`keyfile`).
    pub keyfile: Option<PathBuf>,
    /// Certificate verification (`verify`).
    pub verify: Verify,
    /// Name sent as SNI and checked against the certificate instead of the host
    /// (`server_name_indication`); the value `disable` gives `None` and sets `sni_disabled`.
    pub server_name_indication: Option<String>,
    /// `server_name_indication=disable`: send no SNI extension.
    pub sni_disabled: bool,
}

/// A password that never shows up in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

/// A parsed AMQP URL.
///
/// `Display` gives a URL with the password replaced by `****`; `Debug` hides it as well.
///
/// ```
/// use kelp_amqp::url::{AmqpUrl, Scheme};
///
/// let url = AmqpUrl::parse("amqp://user:s3cret@[::1]:5673//?channel_max=64")?;
/// assert_eq!(url.scheme, Scheme::Amqp);
/// assert_eq!(url.host, "::1");
/// assert_eq!(url.authority(), "[::1]:5673");
/// assert_eq!(url.vhost, "/");
/// assert_eq!(url.channel_max, Some(64));
/// assert_eq!(url.password(), "s3cret");
/// assert!(!format!("{url} {url:?}").contains("s3cret"));
///
/// assert_eq!(AmqpUrl::default(), AmqpUrl::parse("amqp://guest:guest@localhost:5672/")?);
/// # Ok::<(), kelp_amqp::url::UrlError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    /// `amqp` or `amqps`.
    pub scheme: Scheme,
    /// Host name or IP address (an IPv6 address without its brackets); default `localhost`.
    pub host: String,
    /// TCP port; default 5672 for `amqp`, 5671 for `amqps`.
    pub port: u16,
    /// User name, percent-decoded; default `guest`.
    pub username: String,
    password: Secret,
    /// Virtual host, percent-decoded; default `/`.
    pub vhost: String,
    /// Requested heartbeat interval in seconds (`heartbeat`); 0 disables heartbeats.
    pub heartbeat: Option<u16>,
    /// Requested maximum frame size in bytes (`frame_max`).
    pub frame_max: Option<u32>,
    /// Requested maximum number of channels (`channel_max`).
    pub channel_max: Option<u16>,
    /// Time allowed to connect (`connection_timeout`, given in milliseconds).
    pub connection_timeout: Option<Duration>,
    /// SASL mechanism (`auth_mechanism`); default `PLAIN`.
    pub auth_mechanism: AuthMechanism,
    /// TLS settings (used for `amqps`).
    pub tls: TlsOptions,
}

impl Default for AmqpUrl {
    /// `amqp://guest:guest@localhost:5672/` with vhost `/`.
    fn default() -> Self {
        AmqpUrl {
            scheme: Scheme::Amqp,
            host: DEFAULT_HOST.to_owned(),
            port: Scheme::Amqp.default_port(),
            username: DEFAULT_USER.to_owned(),
            password: Secret(DEFAULT_PASSWORD.to_owned()),
            vhost: DEFAULT_VHOST.to_owned(),
            heartbeat: None,
            frame_max: None,
            channel_max: None,
            connection_timeout: None,
            auth_mechanism: AuthMechanism::Plain,
            tls: TlsOptions::default(),
        }
    }
}

/// Why an AMQP URL could not be parsed. No message contains the URL's password.
///
/// ```
/// use kelp_amqp::url::{AmqpUrl, UrlError};
///
/// assert!(matches!(AmqpUrl::parse("http://host"), Err(UrlError::UnsupportedScheme(s)) if s == "http"));
/// assert!(matches!(AmqpUrl::parse("amqp://host:99999"), Err(UrlError::InvalidPort { .. })));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// The string was empty (or only whitespace).
    #[error("empty AMQP URL")]
    Empty,
    /// The string does not start with a URL scheme (`amqp:` or `amqps:`).
    #[error("missing URL scheme: expected a URL starting with amqp:// or amqps://")]
    MissingScheme,
    /// The scheme is neither `amqp` nor `amqps`.
    #[error("unsupported URL scheme `{0}`: expected amqp or amqps")]
    UnsupportedScheme(String),
    /// The scheme is not followed by `//` (e.g. `amqp:host`).
    #[error("missing `//` after the URL scheme: expected amqp://host or amqps://host")]
    MissingAuthority,
    /// The host is malformed. The host text is not repeated, as a malformed URL may have the
    /// password in its place.
    #[error("invalid host in AMQP URL: {reason}")]
    InvalidHost {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The port is not a number in 1..=65535. The port text is not repeated, as in a URL
    /// missing its host (`amqp://user:password`) it is the password.
    #[error("invalid port in AMQP URL: {reason}")]
    InvalidPort {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `%` not followed by two hex digits, or percent-encoded bytes that are not UTF-8.
    #[error("invalid percent-encoding in the {part} of the AMQP URL")]
    InvalidPercentEncoding {
        /// Which part: `"user name"`, `"password"`, `"host"`, `"vhost"` or `"query"`.
        part: &'static str,
    },
    /// A known query parameter has a value that cannot be used.
    #[error("invalid value `{value}` for query parameter `{key}` in AMQP URL: {reason}")]
    InvalidQueryValue {
        /// The parameter name.
        key: String,
        /// The (decoded) value.
        value: String,
        /// What was expected.
        reason: &'static str,
    },
}

impl AmqpUrl {
    /// Parse an `amqp://` or `amqps://` URL (see the [module docs](self) for the rules).
    ///
    /// Leading and trailing whitespace is ignored.
    ///
    /// ```
    /// use kelp_amqp::url::AmqpUrl;
    ///
    /// let url = AmqpUrl::parse("amqp://localhost//")?;
    /// assert_eq!((url.host.as_str(), url.port, url.vhost.as_str()), ("localhost", 5672, "/"));
    /// # Ok::<(), kelp_amqp::url::UrlError>(())
    /// ```
    pub fn parse(s: &str) -> Result<AmqpUrl, UrlError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(UrlError::Empty);
        }
        let (scheme_str, rest) = s.split_once(':').ok_or(UrlError::MissingScheme)?;
        if !is_scheme_syntax(scheme_str) {
            return Err(UrlError::MissingScheme);
        }
        let scheme = if scheme_str.eq_ignore_ascii_case("amqp") {
            Scheme::Amqp
        } else if scheme_str.eq_ignore_ascii_case("amqps") {
            Scheme::Amqps
        } else {
            return Err(UrlError::UnsupportedScheme(scheme_str.to_owned()));
        };
        let rest = rest.strip_prefix("//").ok_or(UrlError::MissingAuthority)?;

        // Drop the fragment, then split authority / path / query.
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let (rest, query) = match rest.split_once('?') {
            Some((before, q)) => (before, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };

        let mut url = AmqpUrl {
            scheme,
            port: scheme.default_port(),
            ..AmqpUrl::default()
        };

        let host_port = match authority.rsplit_once('@') {
            Some((userinfo, host_port)) => {
                match userinfo.split_once(':') {
                    Some((user, pass)) => {
                        url.username = decode(user, "user name")?;
                        url.password = Secret(decode(pass, "password")?);
                    }
                    None => {
                        url.username = decode(userinfo, "user name")?;
                        // `amqp://@host` means no credentials at all (empty user and password);
                        // `amqp://user@host` keeps the default password, as in the RabbitMQ spec.
                        if userinfo.is_empty() {
                            url.password = Secret(String::new());
                        }
                    }
                }
                host_port
            }
            None => authority,
        };
        let (host, port) = split_host_port(host_port)?;
        if !host.is_empty() {
            url.host = host;
        }
        if let Some(port) = port {
            url.port = port;
        }

        url.vhost = match path {
            None | Some("" | "/") => DEFAULT_VHOST.to_owned(),
            // Everything after the first '/': Kombu's `//` gives "/", `/a/b` gives "a/b".
            Some(p) => decode(p.get(1..).unwrap_or(""), "vhost")?,
        };

        if let Some(query) = query {
            url.apply_query(query)?;
        }
        Ok(url)
    }

    /// The password (default `guest`).
    pub fn password(&self) -> &str {
        &self.password.0
    }

    /// Replace the password.
    ///
    /// ```
    /// use kelp_amqp::url::AmqpUrl;
    ///
    /// let mut url = AmqpUrl::default();
    /// url.set_password("hunter2");
    /// assert_eq!(url.password(), "hunter2");
    /// ```
    pub fn set_password(&mut self, p: impl Into<String>) {
        self.password = Secret(p.into());
    }

    /// Whether the connection uses TLS (`amqps`).
    pub fn is_tls(&self) -> bool {
        self.scheme == Scheme::Amqps
    }

    /// Host used for SNI / cert verification: server_name_indication if given, else host.
    pub fn tls_server_name(&self) -> &str {
        self.tls
            .server_name_indication
            .as_deref()
            .unwrap_or(&self.host)
    }

    /// "host:port" for connecting; an IPv6 address is put in brackets (`[::1]:5672`).
    pub fn authority(&self) -> String {
        if self.host_is_ipv6() {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn host_is_ipv6(&self) -> bool {
        self.host.contains(':')
    }

    fn apply_query(&mut self, query: &str) -> Result<(), UrlError> {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode(raw_key, "query")?;
            let key = key.to_ascii_lowercase();
            let known = matches!(
                key.as_str(),
                "heartbeat"
                    | "frame_max"
                    | "channel_max"
                    | "connection_timeout"
                    | "auth_mechanism"
                    | "cacertfile"
                    | "certfile"
                    | "keyfile"
                    | "verify"
                    | "server_name_indication"
            );
            if !known {
                continue; // unknown parameters are ignored, like other RabbitMQ clients do
            }
            let value = decode(raw_value, "query")?;
            let bad = |reason: &'static str| UrlError::InvalidQueryValue {
                key: key.clone(),
                value: value.clone(),
                reason,
            };
            match key.as_str() {
                "heartbeat" => {
                    self.heartbeat = Some(
                        parse_uint(&value)
                            .ok_or_else(|| bad("expected seconds, an integer in 0..=65535"))?,
                    );
                }
                "frame_max" => {
                    self.frame_max = Some(
                        parse_uint(&value)
                            .ok_or_else(|| bad("expected bytes, an integer in 0..=4294967295"))?,
                    );
                }
                "channel_max" => {
                    self.channel_max = Some(
                        parse_uint(&value)
                            .ok_or_else(|| bad("expected an integer in 0..=65535"))?,
                    );
                }
                "connection_timeout" => {
                    let ms: u64 = parse_uint(&value)
                        .filter(|&ms| ms > 0)
                        .ok_or_else(|| bad("expected a positive number of milliseconds"))?;
                    self.connection_timeout = Some(Duration::from_millis(ms));
                }
                "auth_mechanism" => {
                    self.auth_mechanism = if value.eq_ignore_ascii_case("plain") {
                        AuthMechanism::Plain
                    } else if value.eq_ignore_ascii_case("amqplain") {
                        AuthMechanism::AmqPlain
                    } else if value.eq_ignore_ascii_case("external") {
                        AuthMechanism::External
                    } else {
                        return Err(bad("expected PLAIN, AMQPLAIN or EXTERNAL"));
                    };
                }
                "cacertfile" | "certfile" | "keyfile" => {
                    if value.is_empty() {
                        return Err(bad("expected a file path"));
                    }
                    let path = Some(PathBuf::from(&value));
                    match key.as_str() {
                        "cacertfile" => self.tls.cacertfile = path,
                        "certfile" => self.tls.certfile = path,
                        _ => self.tls.keyfile = path,
                    }
                }
                "verify" => {
                    self.tls.verify = if value.eq_ignore_ascii_case("verify_peer") {
                        Verify::Peer
                    } else if value.eq_ignore_ascii_case("verify_none") {
                        Verify::None
                    } else {
                        return Err(bad("expected verify_peer or verify_none"));
                    };
                }
                _ => {
                    // server_name_indication
                    if value.is_empty() {
                        return Err(bad("expected a host name or `disable`"));
                    }
                    self.tls.sni_disabled = value.eq_ignore_ascii_case("disable");
                    self.tls.server_name_indication = if self.tls.sni_disabled {
                        None
                    } else {
                        Some(value.clone())
                    };
                }
            }
        }
        Ok(())
    }
}

impl FromStr for AmqpUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AmqpUrl::parse(s)
    }
}

impl fmt::Display for AmqpUrl {
    /// The URL with the password replaced by `****`. Parsing it back gives the same settings
    /// (except the password).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}:****@",
            self.scheme,
            utf8_percent_encode(&self.username, COMPONENT)
        )?;
        if self.host_is_ipv6() {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        write!(
            f,
            ":{}/{}",
            self.port,
            utf8_percent_encode(&self.vhost, COMPONENT)
        )?;

        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(v) = self.heartbeat {
            query.push(("heartbeat", v.to_string()));
        }
        if let Some(v) = self.frame_max {
            query.push(("frame_max", v.to_string()));
        }
        if let Some(v) = self.channel_max {
            query.push(("channel_max", v.to_string()));
        }
        if let Some(v) = self.connection_timeout {
            query.push(("connection_timeout", v.as_millis().to_string()));
        }
        if self.auth_mechanism != AuthMechanism::Plain {
            query.push(("auth_mechanism", self.auth_mechanism.as_str().to_owned()));
        }
        let files = [
            ("cacertfile", &self.tls.cacertfile),
            ("certfile", &self.tls.certfile),
            ("keyfile", &self.tls.keyfile),
        ];
        for (key, path) in files {
            if let Some(p) = path {
                query.push((key, p.to_string_lossy().into_owned()));
            }
        }
        if self.tls.verify == Verify::None {
            query.push(("verify", "verify_none".to_owned()));
        }
        if let Some(sni) = &self.tls.server_name_indication {
            query.push(("server_name_indication", sni.clone()));
        } else if self.tls.sni_disabled {
            query.push(("server_name_indication", "disable".to_owned()));
        }
        for (i, (key, value)) in query.iter().enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            write!(f, "{sep}{key}={}", utf8_percent_encode(value, COMPONENT))?;
        }
        Ok(())
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpUrl")
            .field("scheme", &self.scheme)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("vhost", &self.vhost)
            .field("heartbeat", &self.heartbeat)
            .field("frame_max", &self.frame_max)
            .field("channel_max", &self.channel_max)
            .field("connection_timeout", &self.connection_timeout)
            .field("auth_mechanism", &self.auth_mechanism)
            .field("tls", &self.tls)
            .finish()
    }
}

/// RFC 3986 scheme syntax: `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`.
fn is_scheme_syntax(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// Percent-decode `s`, rejecting a `%` not followed by two hex digits and non-UTF-8 results.
fn decode(s: &str, part: &'static str) -> Result<String, UrlError> {
    let bytes = s.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return Err(UrlError::InvalidPercentEncoding { part });
            }
        }
    }
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| UrlError::InvalidPercentEncoding { part })
}

/// An unsigned decimal integer: ASCII digits only (no sign, no spaces).
fn parse_uint<T: FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Split `host[:port]` or `[ipv6][:port]`; the host comes back decoded (empty if not given).
fn split_host_port(s: &str) -> Result<(String, Option<u16>), UrlError> {
    let (host, port) = if let Some(inner) = s.strip_prefix('[') {
        let (addr, after) = inner.split_once(']').ok_or(UrlError::InvalidHost {
            reason: "IPv6 address literal without a closing `]`",
        })?;
        if addr.parse::<Ipv6Addr>().is_err() {
            return Err(UrlError::InvalidHost {
                reason: "not a valid IPv6 address between `[` and `]`",
            });
        }
        let port = if after.is_empty() {
            None
        } else {
            Some(after.strip_prefix(':').ok_or(UrlError::InvalidHost {
                reason: "unexpected characters after an IPv6 address literal",
            })?)
        };
        (addr.to_owned(), port)
    } else {
        let (host, port) = match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        let host = decode(host, "host")?;
        if let Some(c) = host.chars().find(|&c| !is_host_char(c)) {
            return Err(UrlError::InvalidHost {
                reason: if c == '[' || c == ']' {
                    "misplaced `[` or `]` (an IPv6 address is written [::1])"
                } else {
                    "contains a character not allowed in a host name"
                },
            });
        }
        (host, port)
    };
    let port = match port {
        None | Some("") => None,
        Some(p) => {
            if !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(UrlError::InvalidPort {
                    reason: "not a decimal number",
                });
            }
            match p.parse::<u16>() {
                Ok(0) | Err(_) => {
                    return Err(UrlError::InvalidPort {
                        reason: "out of the range 1..=65535",
                    })
                }
                Ok(n) => Some(n),
            }
        }
    };
    Ok((host, port))
}

/// Characters allowed in a decoded host name: RFC 3986 unreserved and sub-delims, plus
/// non-ASCII (internationalised names) other than whitespace and controls.
fn is_host_char(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=".contains(c)
    } else {
        !c.is_whitespace() && !c.is_control()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const PW: &str = "s3cr3t-Pw";

    fn p(s: &str) -> AmqpUrl {
        match AmqpUrl::parse(s) {
            Ok(u) => u,
            Err(e) => panic!("{s:?} failed to parse: {e}"),
        }
    }

    fn err(s: &str) -> UrlError {
        match AmqpUrl::parse(s) {
            Ok(u) => panic!("{s:?} parsed unexpectedly: {u:?}"),
            Err(e) => e,
        }
    }

    fn assert_no_password(url: &AmqpUrl) {
        let shown = format!("{url}");
        let debug = format!("{url:?}");
        let pretty = format!("{url:#?}");
        for out in [&shown, &debug, &pretty] {
            assert!(!out.contains(url.password()), "password leaked: {out}");
            assert!(out.contains("****"), "no mask in: {out}");
        }
    }

    // ---- basic forms ----

    #[test]
    fn full_url() {
        let u = p("amqp://user:pass@host:10000/vhost");
        assert_eq!(u.scheme, Scheme::Amqp);
        assert_eq!(u.username, "user");
        assert_eq!(u.password(), "pass");
        assert_eq!(u.host, "host");
        assert_eq!(u.port, 10000);
        assert_eq!(u.vhost, "vhost");
        assert!(!u.is_tls());
        assert_eq!(u.authority(), "host:10000");
    }

    #[test]
    fn rabbitmq_spec_percent_example() {
        let u = p("amqp://user%61:%61pass@ho%61st:10000/v%2fhost");
        assert_eq!(u.username, "usera");
        assert_eq!(u.password(), "apass");
        assert_eq!(u.host, "hoast");
        assert_eq!(u.port, 10000);
        assert_eq!(u.vhost, "v/host");
    }

    #[test]
    fn bare_scheme_gives_defaults() {
        assert_eq!(p("amqp://"), AmqpUrl::default());
        let d = AmqpUrl::default();
        assert_eq!(d.scheme, Scheme::Amqp);
        assert_eq!(d.host, "localhost");
        assert_eq!(d.port, 5672);
        assert_eq!(d.username, "guest");
        assert_eq!(d.password(), "guest");
        assert_eq!(d.vhost, "/");
        assert_eq!(d.heartbeat, None);
        assert_eq!(d.frame_max, None);
        assert_eq!(d.channel_max, None);
        assert_eq!(d.connection_timeout, None);
        assert_eq!(d.auth_mechanism, AuthMechanism::Plain);
        assert_eq!(d.tls, TlsOptions::default());
        assert_eq!(d.tls.verify, Verify::Peer);
        assert_eq!(p("amqp://guest:guest@localhost:5672/"), d);
    }

    #[test]
    fn default_ports_per_scheme() {
        assert_eq!(p("amqp://h").port, 5672);
        let s = p("amqps://h");
        assert_eq!(s.scheme, Scheme::Amqps);
        assert_eq!(s.port, 5671);
        assert!(s.is_tls());
        assert_eq!(s.authority(), "h:5671");
        assert_eq!(p("amqps://h:5999").port, 5999);
        assert_eq!(p("amqp://h:").port, 5672, "empty port means the default");
        assert_eq!(p("amqps://h:/v").port, 5671);
    }

    #[test]
    fn scheme_is_case_insensitive() {
        assert_eq!(p("AMQP://h").scheme, Scheme::Amqp);
        assert_eq!(p("AmQpS://h").scheme, Scheme::Amqps);
        assert_eq!(p("AMQPS://h").port, 5671);
    }

    #[test]
    fn whitespace_is_trimmed() {
        assert_eq!(p("  amqp://h/v \n").vhost, "v");
    }

    #[test]
    fn from_str_works() {
        let u: AmqpUrl = "amqp://a:b@c:1/d".parse().unwrap();
        assert_eq!(u, p("amqp://a:b@c:1/d"));
        assert!("ftp://x".parse::<AmqpUrl>().is_err());
    }

    // ---- userinfo ----

    #[test]
    fn missing_userinfo_gives_guest() {
        let u = p("amqp://host");
        assert_eq!((u.username.as_str(), u.password()), ("guest", "guest"));
    }

    #[test]
    fn empty_userinfo_gives_empty_credentials() {
        let u = p("amqp://@host");
        assert_eq!((u.username.as_str(), u.password()), ("", ""));
        assert_eq!(u.host, "host");
        let u = p("amqp://:@host");
        assert_eq!((u.username.as_str(), u.password()), ("", ""));
        let u = p("amqp://:@/");
        assert_eq!((u.username.as_str(), u.password()), ("", ""));
        assert_eq!(u.host, "localhost");
    }

    #[test]
    fn user_without_password_keeps_default_password() {
        let u = p("amqp://user@host");
        assert_eq!((u.username.as_str(), u.password()), ("user", "guest"));
        let u = p("amqp://user:@host");
        assert_eq!((u.username.as_str(), u.password()), ("user", ""));
        let u = p("amqp://:pw@host");
        assert_eq!((u.username.as_str(), u.password()), ("", "pw"));
    }

    #[test]
    fn percent_encoded_password_with_at_and_colon() {
        let u = p("amqp://us%40er:p%40ss%3Aw%3ard%2F%25@host:5673/v");
        assert_eq!(u.username, "us@er");
        assert_eq!(u.password(), "p@ss:w:rd/%");
        assert_eq!(u.host, "host");
        assert_eq!(u.port, 5673);
        assert_eq!(u.vhost, "v");
    }

    #[test]
    fn raw_at_and_colon_in_password() {
        // Userinfo ends at the last '@' of the authority; user/pass split at the first ':'.
        let u = p("amqp://user:p@ss:w@rd@host/v");
        assert_eq!(u.username, "user");
        assert_eq!(u.password(), "p@ss:w@rd");
        assert_eq!(u.host, "host");
    }

    #[test]
    fn plus_is_not_a_space() {
        let u = p("amqp://a+b:c+d@host/e+f?server_name_indication=x+y");
        assert_eq!(u.username, "a+b");
        assert_eq!(u.password(), "c+d");
        assert_eq!(u.vhost, "e+f");
        assert_eq!(u.tls.server_name_indication.as_deref(), Some("x+y"));
    }

    #[test]
    fn utf8_userinfo() {
        let u = p("amqp://j%C3%BCrgen:p%C3%A4ss@host");
        assert_eq!(u.username, "jürgen");
        assert_eq!(u.password(), "päss");
    }

    #[test]
    fn set_password_replaces_it() {
        let mut u = p("amqp://u:old@h");
        u.set_password(String::from(PW));
        assert_eq!(u.password(), PW);
        u.set_password("x");
        assert_eq!(u.password(), "x");
    }

    // ---- host and port ----

    #[test]
    fn ipv6_hosts() {
        let u = p("amqp://[::1]");
        assert_eq!(u.host, "::1");
        assert_eq!(u.port, 5672);
        assert_eq!(u.authority(), "[::1]:5672");
        assert_eq!(u.tls_server_name(), "::1");
        let u = p("amqps://u:pw@[2001:db8::17]:5999/v");
        assert_eq!(u.host, "2001:db8::17");
        assert_eq!(u.port, 5999);
        assert_eq!(u.authority(), "[2001:db8::17]:5999");
        assert_eq!(u.vhost, "v");
        assert_eq!(u.password(), "pw");
        let u = p("amqp://[::ffff:10.0.0.1]:1//");
        assert_eq!(u.host, "::ffff:10.0.0.1");
        assert_eq!(u.vhost, "/");
    }

    #[test]
    fn bad_ipv6_hosts() {
        for s in [
            "amqp://[::1",
            "amqp://[]",
            "amqp://[not-ip]",
            "amqp://[::1]x",
            "amqp://[::1]5672",
            "amqp://[1.2.3.4]",
            "amqp://x[::1]",
            "amqp://[fe80::1%25eth0]",
        ] {
            assert!(
                matches!(err(s), UrlError::InvalidHost { .. }),
                "{s}: {:?}",
                err(s)
            );
        }
        // Unbracketed IPv6: the part after the first ':' is not a port.
        assert!(matches!(err("amqp://::1"), UrlError::InvalidPort { .. }));
    }

    #[test]
    fn ipv4_and_names() {
        let u = p("amqp://10.1.2.3:5673");
        assert_eq!(u.host, "10.1.2.3");
        assert_eq!(u.authority(), "10.1.2.3:5673");
        assert_eq!(
            p("amqp://Rabbit-1.Example.COM").host,
            "Rabbit-1.Example.COM"
        );
        assert_eq!(p("amqp://b%C3%BCcher.example").host, "bücher.example");
    }

    #[test]
    fn empty_host_is_localhost() {
        assert_eq!(p("amqp://:10000").host, "localhost");
        assert_eq!(p("amqp://:10000").port, 10000);
        assert_eq!(p("amqp:///vhost").host, "localhost");
        assert_eq!(p("amqp:///vhost").vhost, "vhost");
        assert_eq!(p("amqp://u:p@").host, "localhost");
        assert_eq!(p("amqp://u:p@").password(), "p");
    }

    #[test]
    fn bad_hosts() {
        for s in [
            "amqp://ho st",
            "amqp://ho%20st",
            "amqp://ho%2Fst",
            "amqp://ho%3Ast:1",
            "amqp://h\"x",
            "amqp://h<x>",
            "amqp://h\\x",
            "amqp://h%00",
            "amqp://h]",
        ] {
            assert!(
                matches!(err(s), UrlError::InvalidHost { .. }),
                "{s}: {:?}",
                err(s)
            );
        }
        assert_eq!(
            err("amqp://h%zz"),
            UrlError::InvalidPercentEncoding { part: "host" }
        );
    }

    #[test]
    fn ports() {
        assert_eq!(p("amqp://h:1").port, 1);
        assert_eq!(p("amqp://h:65535").port, 65535);
        assert_eq!(p("amqp://h:05672").port, 5672);
        for s in [
            "amqp://h:0",
            "amqp://h:65536",
            "amqp://h:99999999999999999999",
            "amqp://h:-1",
            "amqp://h:+1",
            "amqp://h:12a",
            "amqp://h: 1",
            "amqp://h:1:2",
            "amqp://h:port",
        ] {
            assert!(
                matches!(err(s), UrlError::InvalidPort { .. }),
                "{s}: {:?}",
                err(s)
            );
        }
    }

    // ---- vhost ----

    #[test]
    fn vhost_forms() {
        assert_eq!(p("amqp://host").vhost, "/");
        assert_eq!(p("amqp://host/").vhost, "/");
        assert_eq!(p("amqp://host//").vhost, "/", "Kombu form");
        assert_eq!(p("amqp://u:p@host:5672//").vhost, "/");
        assert_eq!(p("amqp://host/%2f").vhost, "/");
        assert_eq!(p("amqp://host/%2F").vhost, "/");
        assert_eq!(p("amqp://host/myvhost").vhost, "myvhost");
        assert_eq!(p("amqp://host/a/b").vhost, "a/b", "Kombu keeps raw slashes");
        assert_eq!(p("amqp://host//x").vhost, "/x");
        assert_eq!(p("amqp://host/%2fprod").vhost, "/prod");
        assert_eq!(p("amqp://host/a%20b").vhost, "a b");
        assert_eq!(p("amqp://host/caf%C3%A9").vhost, "café");
        assert_eq!(p("amqp://host?heartbeat=1").vhost, "/");
        assert_eq!(p("amqp://host/?heartbeat=1").vhost, "/");
        assert_eq!(p("amqp://host/v#frag").vhost, "v");
        assert_eq!(p("amqp://host#frag").vhost, "/");
    }

    #[test]
    fn bad_vhost_encoding() {
        for s in ["amqp://h/%", "amqp://h/%2", "amqp://h/%g1", "amqp://h/%ff"] {
            assert_eq!(
                err(s),
                UrlError::InvalidPercentEncoding { part: "vhost" },
                "{s}"
            );
        }
    }

    #[test]
    fn bad_userinfo_encoding() {
        assert_eq!(
            err("amqp://u%:p@h"),
            UrlError::InvalidPercentEncoding { part: "user name" }
        );
        assert_eq!(
            err(&format!("amqp://u:{PW}%@h")),
            UrlError::InvalidPercentEncoding { part: "password" }
        );
        assert_eq!(
            err("amqp://u:%C3@h"),
            UrlError::InvalidPercentEncoding { part: "password" }
        );
    }

    // ---- query ----

    #[test]
    fn numeric_query_options() {
        let u =
            p("amqp://h/v?heartbeat=30&frame_max=131072&channel_max=2047&connection_timeout=1500");
        assert_eq!(u.heartbeat, Some(30));
        assert_eq!(u.frame_max, Some(131_072));
        assert_eq!(u.channel_max, Some(2047));
        assert_eq!(u.connection_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(u.vhost, "v");
        let u = p("amqp://h?heartbeat=0&channel_max=0&frame_max=0");
        assert_eq!(u.heartbeat, Some(0));
        assert_eq!(u.channel_max, Some(0));
        assert_eq!(u.frame_max, Some(0));
        let u = p("amqp://h?heartbeat=65535&frame_max=4294967295&channel_max=65535");
        assert_eq!(u.heartbeat, Some(65535));
        assert_eq!(u.frame_max, Some(u32::MAX));
        assert_eq!(u.channel_max, Some(65535));
        // Percent-encoded values are decoded.
        assert_eq!(p("amqp://h?heartbeat=%31%30").heartbeat, Some(10));
    }

    #[test]
    fn auth_mechanism_option() {
        assert_eq!(p("amqp://h").auth_mechanism, AuthMechanism::Plain);
        assert_eq!(
            p("amqp://h?auth_mechanism=PLAIN").auth_mechanism,
            AuthMechanism::Plain
        );
        assert_eq!(
            p("amqp://h?auth_mechanism=AMQPLAIN").auth_mechanism,
            AuthMechanism::AmqPlain
        );
        assert_eq!(
            p("amqp://h?auth_mechanism=amqplain").auth_mechanism,
            AuthMechanism::AmqPlain
        );
        assert_eq!(
            p("amqp://h?auth_mechanism=EXTERNAL").auth_mechanism,
            AuthMechanism::External
        );
        assert_eq!(
            p("amqps://h?auth_mechanism=external").auth_mechanism,
            AuthMechanism::External
        );
        assert_eq!(AuthMechanism::AmqPlain.as_str(), "AMQPLAIN");
        assert!(matches!(
            err("amqp://h?auth_mechanism=CRAM-MD5"),
            UrlError::InvalidQueryValue { .. }
        ));
    }

    #[test]
    fn tls_query_options() {
        let u = p(
            "amqps://h?cacertfile=%2Fetc%2Fssl%2Fca.pem&certfile=/c/cert.pem\
                   &keyfile=key%20file.pem&verify=verify_peer&server_name_indication=rmq.example",
        );
        assert_eq!(u.tls.cacertfile, Some(PathBuf::from("/etc/ssl/ca.pem")));
        assert_eq!(u.tls.certfile, Some(PathBuf::from("/c/cert.pem")));
        assert_eq!(u.tls.keyfile, Some(PathBuf::from("key file.pem")));
        assert_eq!(u.tls.verify, Verify::Peer);
        assert_eq!(u.tls.server_name_indication.as_deref(), Some("rmq.example"));
        assert_eq!(u.tls_server_name(), "rmq.example");
        assert_eq!(u.host, "h");
        assert_eq!(u.vhost, "/");

        let u = p("amqps://h?verify=verify_none");
        assert_eq!(u.tls.verify, Verify::None);
        assert_eq!(p("amqps://h?verify=VERIFY_NONE").tls.verify, Verify::None);

        let u = p("amqps://h?server_name_indication=disable");
        assert_eq!(u.tls.server_name_indication, None);
        assert!(u.tls.sni_disabled);
        assert!(!p("amqps://h").tls.sni_disabled);
        assert_eq!(u.tls_server_name(), "h");
        assert_eq!(p("amqps://h").tls_server_name(), "h");
    }

    #[test]
    fn unknown_query_keys_are_ignored() {
        let u = p("amqp://h/v?foo=bar&heartbeat=5&x&&=&ssl=%zz&password=1&Heartbeat2=q");
        assert_eq!(u.heartbeat, Some(5));
        assert_eq!(u.vhost, "v");
        assert_eq!(p("amqp://h?"), p("amqp://h"));
        assert_eq!(p("amqp://h?&&&"), p("amqp://h"));
    }

    #[test]
    fn query_keys_case_and_repeat() {
        assert_eq!(p("amqp://h?HEARTBEAT=7").heartbeat, Some(7));
        assert_eq!(p("amqp://h?heartbeat=1&heartbeat=2").heartbeat, Some(2));
        assert_eq!(p("amqp://h?heart%62eat=3").heartbeat, Some(3));
    }

    #[test]
    fn bad_query_values() {
        let cases = [
            ("heartbeat", "amqp://h?heartbeat=abc", "abc"),
            ("heartbeat", "amqp://h?heartbeat=65536", "65536"),
            ("heartbeat", "amqp://h?heartbeat=-1", "-1"),
            ("heartbeat", "amqp://h?heartbeat=+1", "+1"),
            ("heartbeat", "amqp://h?heartbeat=", ""),
            ("heartbeat", "amqp://h?heartbeat", ""),
            ("heartbeat", "amqp://h?heartbeat=1.5", "1.5"),
            ("frame_max", "amqp://h?frame_max=4294967296", "4294967296"),
            ("channel_max", "amqp://h?channel_max=70000", "70000"),
            ("connection_timeout", "amqp://h?connection_timeout=0", "0"),
            ("connection_timeout", "amqp://h?connection_timeout=5s", "5s"),
            ("auth_mechanism", "amqp://h?auth_mechanism=", ""),
            ("verify", "amqps://h?verify=yes", "yes"),
            ("cacertfile", "amqps://h?cacertfile=", ""),
            ("certfile", "amqps://h?certfile", ""),
            ("keyfile", "amqps://h?keyfile=", ""),
            (
                "server_name_indication",
                "amqps://h?server_name_indication=",
                "",
            ),
        ];
        for (key, url, value) in cases {
            match err(url) {
                UrlError::InvalidQueryValue {
                    key: k,
                    value: v,
                    reason,
                } => {
                    assert_eq!(k, key, "{url}");
                    assert_eq!(v, value, "{url}");
                    assert!(!reason.is_empty());
                }
                e => panic!("{url}: unexpected {e:?}"),
            }
        }
        assert_eq!(
            err("amqp://h?heartbeat=%zz"),
            UrlError::InvalidPercentEncoding { part: "query" }
        );
    }

    // ---- scheme errors ----

    #[test]
    fn scheme_errors() {
        assert_eq!(err(""), UrlError::Empty);
        assert_eq!(err("   "), UrlError::Empty);
        assert_eq!(err("localhost"), UrlError::MissingScheme);
        assert_eq!(err("//host"), UrlError::MissingScheme);
        assert_eq!(err(":5672"), UrlError::MissingScheme);
        assert_eq!(err("1amqp://h"), UrlError::MissingScheme);
        assert_eq!(
            err("http://h"),
            UrlError::UnsupportedScheme("http".to_owned())
        );
        assert_eq!(
            err("pyamqp://h"),
            UrlError::UnsupportedScheme("pyamqp".to_owned())
        );
        assert_eq!(
            err("amqp+ssl://h"),
            UrlError::UnsupportedScheme("amqp+ssl".to_owned())
        );
        assert_eq!(err("amqp:host"), UrlError::MissingAuthority);
        assert_eq!(err("amqp:/host"), UrlError::MissingAuthority);
        assert_eq!(err("amqp:"), UrlError::MissingAuthority);
    }

    // ---- display / debug / secrecy ----

    #[test]
    fn display_masks_password() {
        let u = p(&format!("amqps://bob:{PW}@rabbit:5999/prod?heartbeat=10"));
        assert_eq!(u.password(), PW);
        assert_eq!(
            u.to_string(),
            "amqps://bob:****@rabbit:5999/prod?heartbeat=10"
        );
        assert_no_password(&u);
        let d = format!("{u:?}");
        assert!(d.contains("password: ****"), "{d}");
        assert!(d.contains("username: \"bob\""), "{d}");
    }

    #[test]
    fn display_default() {
        assert_eq!(
            AmqpUrl::default().to_string(),
            "amqp://guest:****@localhost:5672/%2F"
        );
    }

    #[test]
    fn display_encodes_and_round_trips() {
        let sources = [
            "amqp://",
            "amqps://us%40er:x@[::1]:5999/a%2Fb%20c",
            "amqp://h//",
            "amqp://h/a/b",
            "amqp://@h",
            "amqp://j%C3%BCrgen:x@b%C3%BCcher.example/caf%C3%A9",
            "amqps://u:p@h/v?heartbeat=0&frame_max=4096&channel_max=9&connection_timeout=2500\
             &auth_mechanism=external&cacertfile=%2Fca%20dir%2Fca.pem&certfile=c.pem\
             &keyfile=k%26.pem&verify=verify_none&server_name_indication=a.b&unknown=1",
            "amqp://h?auth_mechanism=amqplain",
        ];
        for s in sources {
            let u = p(s);
            let shown = u.to_string();
            let back = p(&shown);
            assert_eq!(back.password(), "****", "{shown}");
            let mut expect = u.clone();
            expect.set_password("****");
            assert_eq!(back, expect, "{s} -> {shown}");
        }
    }

    #[test]
    fn display_shows_ipv6_in_brackets() {
        assert_eq!(
            p("amqp://[::1]:5673/v").to_string(),
            "amqp://guest:****@[::1]:5673/v"
        );
    }

    #[test]
    fn secret_debug_is_masked() {
        assert_eq!(format!("{:?}", Secret(PW.to_owned())), "****");
    }

    #[test]
    fn errors_never_contain_the_password() {
        // URLs whose (intended) password is PW and which fail to parse.
        let bad = [
            format!("amqp://user:{PW}"),
            format!("amqp://user:{PW}/vhost"),
            format!("amqp://user:{PW}?heartbeat=1"),
            format!("amqp://user:{PW}@host:99999"),
            format!("amqp://user:{PW}@host:0/v"),
            format!("amqp://user:{PW}@host:abc"),
            format!("amqp://user:{PW}@ho st"),
            format!("amqp://user:{PW}@[::1"),
            format!("amqp://user:{PW}@[zz]:1"),
            format!("amqp://user:{PW}@host/%zz"),
            format!("amqp://user:{PW}%@host"),
            format!("amqp://user:{PW}@host?heartbeat=nope"),
            format!("amqp://user:{PW}@host?verify=maybe"),
            format!("amqp://user:pa/{PW}@host"),
            format!("amqp://user:pa#{PW}@host"),
            format!("amqp://user:{PW}:1@host:x"),
            format!("http://user:{PW}@host"),
            format!("amqp:user:{PW}@host"),
            format!("user:{PW}@host"),
            PW.to_owned(),
            format!("amqp://user:{PW}@host:99999?auth_mechanism=nope"),
        ];
        for s in &bad {
            let e = err(s);
            let shown = e.to_string();
            let debug = format!("{e:?}");
            assert!(!shown.contains(PW), "{s}: Display leaks: {shown}");
            assert!(!debug.contains(PW), "{s}: Debug leaks: {debug}");
            assert!(!shown.contains("s3cr3t"), "{s}: {shown}");
        }
    }

    #[test]
    fn valid_urls_never_show_the_password() {
        let good = [
            format!("amqp://user:{PW}@host"),
            format!("amqps://user:{PW}@[::1]:5671//?heartbeat=5&verify=verify_none"),
            format!("amqp://{PW}:{PW}x@host"),
            "amqp://u:s3cr3t%2DPw@host".to_owned(),
        ];
        for s in &good {
            let u = p(s);
            assert!(u.password().contains(PW), "{s}");
            let shown = format!("{u}");
            let debug = format!("{u:?}");
            assert!(!shown.contains(&format!(":{}", u.password())), "{shown}");
            assert!(!debug.contains(&format!("\"{}\"", u.password())), "{debug}");
            if !u.username.contains(PW) {
                assert_no_password(&u);
            }
        }
    }

    #[test]
    fn error_messages_are_informative() {
        assert!(err("ftp://h").to_string().contains("ftp"));
        assert!(err("amqp://h:0").to_string().contains("port"));
        let e = err("amqp://h?heartbeat=x").to_string();
        assert!(e.contains("heartbeat") && e.contains("`x`"), "{e}");
        assert!(err("amqp://h/%").to_string().contains("vhost"));
    }

    // ---- robustness ----

    /// Tiny xorshift PRNG so the test needs no extra crates and is deterministic.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n as u64).unwrap_or(0)
        }
    }

    #[test]
    fn garbage_never_panics() {
        let seeds = [
            "amqp://user:pass@host:5672/vhost?heartbeat=10&frame_max=4096",
            "amqps://u%40x:p%3Ay@[::1]:5671//?verify=verify_none&cacertfile=%2Fca.pem",
            "amqp://h/a/b?auth_mechanism=external&server_name_indication=disable",
            "amqp://[2001:db8::1]:1/%2f?connection_timeout=10&channel_max=7",
            "AMQP://:@/",
        ];
        let mut inputs: Vec<String> = [
            "",
            " ",
            ":",
            "::",
            ":::",
            "//",
            "///",
            "?",
            "#",
            "@",
            "[",
            "]",
            "%",
            "%%",
            "%2",
            "amqp",
            "amqp:",
            "amqp:/",
            "amqp://",
            "amqp:///",
            "amqp:////",
            "amqp://@",
            "amqp://@@",
            "amqp://:",
            "amqp://::",
            "amqp://[",
            "amqp://]",
            "amqp://[]",
            "amqp://[:]",
            "amqp://[::]:",
            "amqp://[::]]",
            "amqp://[[::1]]",
            "amqp://%",
            "amqp://%%/%%?%%=%%",
            "amqp://h?=",
            "amqp://h?==",
            "amqp://h?heartbeat==1",
            "amqp://h?&=&=&",
            "amqp://h:65535:65535",
            "amqp://h:ü",
            "amqp://ü:ü@ü:ü/ü?ü=ü#ü",
            "amqp://h/\u{0}",
            "amqp://\u{0}",
            "amqp://h?heartbeat=\u{0}",
            "amqps://h?verify",
            "amqp://h?frame_max=18446744073709551616",
            "amqp://u:p@h:1/v?connection_timeout=\
             184467440737095516150",
            "amqp://h/%C3",
            "amqp://h/%C3%28",
            "amqp://h/%F0%9F%98",
            "😀://h",
            "amqp😀://h",
            "amqp://😀",
            "amqp://[😀]",
            "amqp://h:😀",
            "amqp://h/😀",
            "amqp://h?😀=😀",
            "amqp://h#😀",
            "\u{feff}amqp://h",
            "amqp://h\r\n/v",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        // Every prefix and suffix of the seeds (on char boundaries).
        for seed in seeds {
            for (i, _) in seed.char_indices() {
                inputs.push(seed[..i].to_owned());
                inputs.push(seed[i..].to_owned());
            }
        }
        // Random mutations: insert, delete or replace characters with URL-significant ones.
        let alphabet: Vec<char> = ":/@?#[]%&=.+-_~0123456789aAfFzZ \u{0}é😀".chars().collect();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..600 {
            let seed = seeds[round % seeds.len()];
            let mut chars: Vec<char> = seed.chars().collect();
            for _ in 0..=rng.below(4) {
                let c = alphabet[rng.below(alphabet.len())];
                match rng.below(3) {
                    0 => chars.insert(rng.below(chars.len() + 1), c),
                    1 if !chars.is_empty() => {
                        chars.remove(rng.below(chars.len()));
                    }
                    _ if !chars.is_empty() => {
                        let i = rng.below(chars.len());
                        chars[i] = c;
                    }
                    _ => chars.push(c),
                }
            }
            inputs.push(chars.into_iter().collect());
        }
        // Random strings from the alphabet behind a valid scheme.
        for _ in 0..200 {
            let len = rng.below(24);
            let tail: String = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            inputs.push(format!("amqp://{tail}"));
        }
        assert!(inputs.len() > 500, "{}", inputs.len());

        let mut ok = 0;
        for s in &inputs {
            match AmqpUrl::parse(s) {
                Ok(u) => {
                    ok += 1;
                    // Whatever parses must display, and the display must parse again.
                    let shown = u.to_string();
                    let back = AmqpUrl::parse(&shown);
                    assert!(back.is_ok(), "{s:?} -> {shown:?} -> {back:?}");
                    let _ = format!("{u:?}");
                    let _ = (u.authority(), u.tls_server_name(), u.is_tls());
                }
                Err(e) => {
                    let _ = (e.to_string(), format!("{e:?}"));
                }
            }
        }
        assert!(ok > 0 && ok < inputs.len(), "ok = {ok} of {}", inputs.len());
    }
}
