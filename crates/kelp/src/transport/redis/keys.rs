//! Kombu's Redis key layout and transport options (`kombu/transport/redis.py`), and the URLs
//! that name a Redis server:
//!
//! - `redis://[[user]:password@]host[:port][/db][?option=value…]` — plain TCP (port 6379);
//! - `rediss://[[user]:password@]host[:port][/db][?option=value…]` — TLS (rustls), with
//!   redis-py's options: `ssl_cert_reqs=required|optional|none` (`CERT_REQUIRED`, … too;
//!   `optional` verifies the server as `required` does, since a server always shows a
//!   certificate; `none` accepts any certificate), `ssl_ca_certs=/path/ca.pem` (the CAs to
//!   trust instead of the system's), `ssl_certfile=/path/cert.pem` and `ssl_keyfile=/path/key.pem`
//!   (a client certificate; without `ssl_keyfile` the key is looked for in `ssl_certfile`),
//!   `ssl_check_hostname=false` (accept a valid certificate for another name);
//! - `sentinel://[[user]:password@]host[:port][;sentinel://host2[:port2]…][/db]?master_name=name`
//!   — Redis Sentinel (port 26379), Kombu's `SentinelChannel`: the sentinels are asked for the
//!   master called `master_name` (required), and everything goes to that master; the user,
//!   password and database apply to the master, as in Kombu. `sentinel_password=` (and
//!   `sentinel_username=`) authenticate to the sentinels themselves (Kombu's
//!   `sentinel_kwargs`). After a failover the robust connection reconnects, asks the sentinels
//!   again and so reaches the new master.
//!
//! The other options (`visibility_timeout`, `global_keyprefix`, `priority_steps`,
//! `fanout_prefix`, `fanout_patterns`, `socket_timeout`, `brpop_timeout`) mean the same for all
//! three schemes; options kelp does not know are ignored, as Kombu ignores transport options it
//! does not know.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::Error;

/// The separator Kombu puts inside binding members and priority queue names.
pub const SEP: &str = "\x06\x16";

/// The default port of a sentinel.
const SENTINEL_PORT: u16 = 26379;

/// The options of a `redis://`, `rediss://` or `sentinel://` URL, with Kombu's names and
/// defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisOptions {
    /// The URL handed to the `redis` crate (query options removed, the database made explicit).
    /// For `sentinel://` the server is the master the sentinels name, and this is the URL as
    /// given, options removed.
    pub server_url: String,
    /// The database number (`/0` by default).
    pub db: i64,
    /// Messages delivered but not acknowledged for this long are restored (default 1 h).
    pub visibility_timeout: Duration,
    /// Prepended to every key Kombu uses.
    pub global_keyprefix: String,
    /// Priority levels (default `[0, 3, 6, 9]`).
    pub priority_steps: Vec<u8>,
    /// Prefix of fanout PUB/SUB channels; `None` for none (Kombu `fanout_prefix=False`).
    pub fanout_prefix: Option<String>,
    /// Fanout channels carry the routing key (`/0.exchange/routing_key`).
    pub fanout_patterns: bool,
    /// Socket timeout for commands.
    pub socket_timeout: Option<Duration>,
    /// How long a BRPOP waits before looking again (Kombu's `brpop_timeout`, 1 s).
    pub brpop_timeout: Duration,
    /// TLS settings: `Some` for `rediss://`, `None` otherwise.
    pub tls: Option<RedisTls>,
    /// Where the master is asked for: `Some` for `sentinel://`, `None` otherwise.
    pub sentinel: Option<SentinelOptions>,
}

/// How a `rediss://` connection checks the server's certificate (redis-py's `ssl_cert_reqs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertReqs {
    /// `required` (the default): the certificate must chain to a trusted CA and name the host.
    Required,
    /// `optional`: on the client side the same as `required` (a server always presents a
    /// certificate, and one that is presented is verified).
    Optional,
    /// `none`: any certificate is accepted, unverified. For tests and trusted networks only.
    Disabled,
}

/// The TLS settings of a `rediss://` URL (redis-py's `ssl_*` options).
///
/// ```
/// # use kelp::transport::redis::keys::{CertReqs, RedisOptions};
/// let o = RedisOptions::parse("rediss://h:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required")?;
/// let tls = o.tls.expect("rediss:// has TLS settings");
/// assert_eq!(tls.cert_reqs, CertReqs::Required);
/// assert_eq!(tls.ca_certs.as_deref(), Some(std::path::Path::new("/etc/ca.pem")));
/// # Ok::<(), kelp::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTls {
    /// How the server's certificate is checked (`ssl_cert_reqs`, default `required`).
    pub cert_reqs: CertReqs,
    /// PEM file of the CAs to trust (`ssl_ca_certs`); `None`: the system's trust store.
    pub ca_certs: Option<PathBuf>,
    /// PEM file of the client certificate chain (`ssl_certfile`).
    pub certfile: Option<PathBuf>,
    /// PEM file of the client certificate's private key (`ssl_keyfile`); `None` with a
    /// `certfile`: the key is in the `certfile`.
    pub keyfile: Option<PathBuf>,
    /// Check that the certificate names the host (`ssl_check_hostname`, default true).
    pub check_hostname: bool,
}

/// Where a `sentinel://` URL asks for the master, and how it logs in there. The passwords are
/// not shown by `Debug`.
///
/// ```
/// # use kelp::transport::redis::RedisOptions;
/// let o = RedisOptions::parse(
///     "sentinel://:pw@s1:26379;sentinel://s2/2?master_name=mymaster&sentinel_password=spw",
/// )?;
/// let s = o.sentinel.as_ref().expect("sentinel:// names its sentinels");
/// assert_eq!(s.sentinels, vec![("s1".to_owned(), 26379), ("s2".to_owned(), 26379)]);
/// assert_eq!(s.master_name, "mymaster");
/// assert_eq!(s.password.as_deref(), Some("pw"));
/// assert_eq!(s.sentinel_password.as_deref(), Some("spw"));
/// assert_eq!(o.db, 2);
/// # Ok::<(), kelp::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelOptions {
    /// The sentinels, asked in this order: host and port.
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the master under (Kombu's `master_name`).
    pub master_name: String,
    /// The user to log in to the master as (from the URL).
    pub username: Option<String>,
    /// The master's password (from the URL).
    pub password: Option<String>,
    /// The user to log in to the sentinels as (`sentinel_username`).
    pub sentinel_username: Option<String>,
    /// The sentinels' password (`sentinel_password`).
    pub sentinel_password: Option<String>,
}

impl fmt::Debug for SentinelOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |p: &Option<String>| p.as_ref().map(|_| "****");
        f.debug_struct("SentinelOptions")
            .field("sentinels", &self.sentinels)
            .field("master_name", &self.master_name)
            .field("username", &self.username)
            .field("password", &hidden(&self.password))
            .field("sentinel_username", &self.sentinel_username)
            .field("sentinel_password", &hidden(&self.sentinel_password))
            .finish()
    }
}

/// `url` with every password masked: each `;`-separated URL's, and `sentinel_password`.
pub(crate) fn mask(url: &str) -> String {
    crate::error::mask_url(url)
}

fn bad(url: &str, reason: impl Into<String>) -> Error {
    Error::Url {
        url: mask(url),
        reason: reason.into(),
    }
}

fn secs(url: &str, key: &str, v: &str) -> Result<Duration, Error> {
    let f: f64 = v
        .parse()
        .map_err(|_| bad(url, format!("{key}={v:?} is not a number of seconds")))?;
    if !f.is_finite() || f < 0.0 {
        return Err(bad(url, format!("{key}={v:?} is not a number of seconds")));
    }
    Ok(Duration::from_secs_f64(f))
}

fn truthy(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

/// A boolean option that must say yes or no.
fn boolean(url: &str, key: &str, v: &str) -> Result<bool, Error> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(bad(url, format!("{key}={v:?} is not true or false"))),
    }
}

fn path(url: &str, key: &str, v: &str) -> Result<PathBuf, Error> {
    if v.is_empty() {
        return Err(bad(url, format!("{key} is empty: it names a PEM file")));
    }
    Ok(PathBuf::from(v))
}

fn decode<'a>(url: &str, what: &str, s: &'a str) -> Result<std::borrow::Cow<'a, str>, Error> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map_err(|_| bad(url, format!("the {what} is not UTF-8")))
}

/// One `scheme://authority/path` of a URL: its parts, not yet checked.
struct Part<'a> {
    userinfo: Option<&'a str>,
    hostport: &'a str,
    path: &'a str,
}

fn split_part(part: &str) -> Option<Part<'_>> {
    let (_, rest) = part.split_once("://")?;
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    Some(Part {
        userinfo,
        hostport,
        path,
    })
}

/// `host[:port]` or `[v6]:port`.
fn host_port(url: &str, hostport: &str, default: u16) -> Result<(String, u16), Error> {
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| bad(url, format!("{hostport:?}: `[` without `]`")))?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or_else(|| {
                    bad(url, format!("{hostport:?}: expected `:port` after `]`"))
                })?),
            ),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(bad(url, "no host"));
    }
    let port = match port {
        None | Some("") => default,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(url, format!("port {p:?} is not a number from 1 to 65535")))?,
    };
    Ok((host.to_owned(), port))
}

fn parse_db(url: &str, path: &str) -> Result<Option<i64>, Error> {
    match path.trim_start_matches('/') {
        "" => Ok(None),
        d => d
            .parse::<i64>()
            .ok()
            .filter(|n| (0..=1_000_000).contains(n))
            .map(Some)
            .ok_or_else(|| bad(url, format!("database {d:?} is not a number"))),
    }
}

/// `[user]:password` → user and password, decoded; a userinfo without `:` is a user.
fn credentials(url: &str, userinfo: &str) -> Result<(Option<String>, Option<String>), Error> {
    let (user, password) = match userinfo.split_once(':') {
        Some((u, p)) => (u, Some(p)),
        None => (userinfo, None),
    };
    let user = Some(decode(url, "user name", user)?.into_owned()).filter(|u| !u.is_empty());
    let password = match password {
        Some(p) => Some(decode(url, "password", p)?.into_owned()),
        None => None,
    };
    Ok((user, password))
}

/// The sentinels of `sentinel://…[;sentinel://…]` (query already removed), with the master's
/// credentials and the database (each may be given in any one of the URLs; given twice they
/// must agree).
#[allow(clippy::type_complexity)]
fn sentinels(
    url: &str,
    base: &str,
) -> Result<
    (
        Vec<(String, u16)>,
        Option<String>,
        Option<String>,
        Option<i64>,
    ),
    Error,
> {
    let mut hosts = Vec::new();
    let (mut user, mut password, mut db) = (None, None, None);
    for part in base.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let scheme = part.split_once("://").map(|(s, _)| s).unwrap_or("");
        if !scheme.eq_ignore_ascii_case("sentinel") {
            return Err(bad(
                url,
                format!("{scheme:?} among sentinel URLs: every part must be sentinel://"),
            ));
        }
        let p = split_part(part).ok_or_else(|| bad(url, "no scheme"))?;
        hosts.push(host_port(url, p.hostport, SENTINEL_PORT)?);
        if let Some(info) = p.userinfo {
            let (u, pw) = credentials(url, info)?;
            if user.is_some() && u.is_some() && user != u {
                return Err(bad(url, "the sentinel URLs give different user names"));
            }
            if password.is_some() && pw.is_some() && password != pw {
                return Err(bad(url, "the sentinel URLs give different passwords"));
            }
            user = user.or(u);
            password = password.or(pw);
        }
        if let Some(d) = parse_db(url, p.path)? {
            if db.is_some_and(|known| known != d) {
                return Err(bad(url, "the sentinel URLs give different databases"));
            }
            db = Some(d);
        }
    }
    if hosts.is_empty() {
        return Err(bad(url, "no sentinel"));
    }
    Ok((hosts, user, password, db))
}

impl RedisOptions {
    /// Parse `redis://[[user]:password@]host[:port][/db][?option=value…]`, the same with
    /// `rediss://` (TLS), or `sentinel://[[user]:password@]host[:port][;sentinel://…][/db]?master_name=…`
    /// (see the [module docs](self) for the options).
    ///
    /// ```
    /// # use kelp::transport::redis::RedisOptions;
    /// let o = RedisOptions::parse("redis://localhost:6379/2?visibility_timeout=30&global_keyprefix=app:")?;
    /// assert_eq!(o.db, 2);
    /// assert_eq!(o.visibility_timeout.as_secs(), 30);
    /// assert_eq!(o.global_keyprefix, "app:");
    /// assert!(o.tls.is_none() && o.sentinel.is_none());
    ///
    /// let bad = RedisOptions::parse("rediss://localhost?ssl_cert_reqs=maybe").unwrap_err();
    /// assert!(matches!(bad, kelp::Error::Url { .. }));
    /// # Ok::<(), kelp::Error>(())
    /// ```
    pub fn parse(url: &str) -> Result<RedisOptions, Error> {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let scheme = base
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .ok_or_else(|| bad(url, "no scheme"))?;
        let (db, server_url, sentinel) = match scheme.as_str() {
            "redis" | "rediss" => {
                let part = split_part(base).ok_or_else(|| bad(url, "no scheme"))?;
                let db = parse_db(url, part.path)?.unwrap_or(0);
                let server_url = format!("{}/{db}", base.trim_end_matches(part.path));
                (db, server_url, None)
            }
            "sentinel" => {
                let (hosts, username, password, db) = sentinels(url, base)?;
                let s = SentinelOptions {
                    sentinels: hosts,
                    master_name: String::new(),
                    username,
                    password,
                    sentinel_username: None,
                    sentinel_password: None,
                };
                (db.unwrap_or(0), base.to_owned(), Some(s))
            }
            other => {
                return Err(bad(
                    url,
                    format!("{other}:// is not redis://, rediss:// or sentinel://"),
                ))
            }
        };
        let mut o = RedisOptions {
            server_url,
            db,
            visibility_timeout: Duration::from_secs(3600),
            global_keyprefix: String::new(),
            priority_steps: vec![0, 3, 6, 9],
            fanout_prefix: Some(format!("/{db}.")),
            fanout_patterns: true,
            socket_timeout: None,
            brpop_timeout: Duration::from_secs(1),
            tls: (scheme == "rediss").then_some(RedisTls {
                cert_reqs: CertReqs::Required,
                ca_certs: None,
                certfile: None,
                keyfile: None,
                check_hostname: true,
            }),
            sentinel,
        };
        let mut tls_options = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(url, k, v)?;
            if k.starts_with("ssl_") {
                tls_options.push(k);
            }
            match k {
                "visibility_timeout" => o.visibility_timeout = secs(url, k, &v)?,
                "socket_timeout" => o.socket_timeout = Some(secs(url, k, &v)?),
                "brpop_timeout" => o.brpop_timeout = secs(url, k, &v)?,
                "global_keyprefix" => o.global_keyprefix = v.into_owned(),
                "fanout_patterns" => o.fanout_patterns = truthy(&v),
                "fanout_prefix" => {
                    o.fanout_prefix = match v.as_ref() {
                        "" | "0" | "false" | "False" | "no" => None,
                        "1" | "true" | "True" | "yes" => Some(format!("/{db}.")),
                        custom => Some(custom.to_owned()),
                    }
                }
                "priority_steps" => {
                    let mut steps = Vec::new();
                    for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        let n: u8 =
                            s.parse().ok().filter(|n| *n <= 9).ok_or_else(|| {
                                bad(url, format!("priority step {s:?} is not 0–9"))
                            })?;
                        steps.push(n);
                    }
                    steps.sort_unstable();
                    steps.dedup();
                    if steps.first() != Some(&0) {
                        steps.insert(0, 0);
                    }
                    o.priority_steps = steps;
                }
                "ssl_cert_reqs" | "ssl_ca_certs" | "ssl_certfile" | "ssl_keyfile"
                | "ssl_check_hostname" => {
                    if let Some(tls) = o.tls.as_mut() {
                        match k {
                            "ssl_cert_reqs" => {
                                tls.cert_reqs = match v.to_ascii_lowercase().as_str() {
                                    "required" | "cert_required" => CertReqs::Required,
                                    "optional" | "cert_optional" => CertReqs::Optional,
                                    "none" | "cert_none" => CertReqs::Disabled,
                                    _ => {
                                        return Err(bad(
                                            url,
                                            format!(
                                            "ssl_cert_reqs={v:?} is not required, optional or none"
                                        ),
                                        ))
                                    }
                                }
                            }
                            "ssl_ca_certs" => tls.ca_certs = Some(path(url, k, &v)?),
                            "ssl_certfile" => tls.certfile = Some(path(url, k, &v)?),
                            "ssl_keyfile" => tls.keyfile = Some(path(url, k, &v)?),
                            _ => tls.check_hostname = boolean(url, k, &v)?,
                        }
                    }
                }
                "master_name" | "sentinel_password" | "sentinel_username" => {
                    if let Some(s) = o.sentinel.as_mut() {
                        match k {
                            "master_name" => s.master_name = v.into_owned(),
                            "sentinel_password" => s.sentinel_password = Some(v.into_owned()),
                            _ => {
                                s.sentinel_username = Some(v.into_owned()).filter(|u| !u.is_empty())
                            }
                        }
                    }
                }
                // The redis crate's own options (e.g. `protocol`) and unknown ones: ignored, as
                // Kombu ignores transport options it does not know.
                _ => {}
            }
        }
        if let Some(k) = tls_options.first() {
            match scheme.as_str() {
                "redis" => {
                    return Err(bad(
                        url,
                        format!("{k} needs TLS: use a rediss:// URL (redis:// is plain TCP)"),
                    ))
                }
                "sentinel" => {
                    return Err(bad(
                        url,
                        format!(
                        "{k}: TLS to the sentinels or the master is not supported with sentinel://"
                    ),
                    ))
                }
                _ => {}
            }
        }
        if let Some(tls) = &o.tls {
            if tls.keyfile.is_some() && tls.certfile.is_none() {
                return Err(bad(url, "ssl_keyfile without ssl_certfile"));
            }
        }
        if let Some(s) = &o.sentinel {
            if s.master_name.is_empty() {
                return Err(bad(
                    url,
                    "sentinel:// needs the name of the master: add ?master_name=<name> (Kombu's master_name transport option)",
                ));
            }
        }
        Ok(o)
    }

    /// A key with the global prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.global_keyprefix)
    }

    /// The list holding `queue`'s messages of priority step `step`.
    pub fn queue_key(&self, queue: &str, step: u8) -> String {
        if step == 0 {
            self.key(queue)
        } else {
            format!("{}{queue}{SEP}{step}", self.global_keyprefix)
        }
    }

    /// Every list of `queue`, highest Kombu precedence (step 0) first.
    pub fn queue_keys(&self, queue: &str) -> Vec<String> {
        self.priority_steps
            .iter()
            .map(|s| self.queue_key(queue, *s))
            .collect()
    }

    /// Kombu's `priority(n)`: the step a priority (clamped to 0–9) falls in.
    pub fn step_for(&self, priority: u8) -> u8 {
        let p = priority.min(9);
        self.priority_steps
            .iter()
            .copied()
            .filter(|s| *s <= p)
            .max()
            .unwrap_or(0)
    }

    /// The set of bindings of `exchange`.
    pub fn binding_key(&self, exchange: &str) -> String {
        self.key(&format!("_kombu.binding.{exchange}"))
    }

    /// Kombu 5.7's copy of the bindings that do not expire.
    pub fn binding_permanent_key(&self, exchange: &str) -> String {
        self.key(&format!("_kombu.binding_permanent.{exchange}"))
    }

    /// The PUB/SUB channel a fanout message to `exchange` with `routing_key` goes to.
    pub fn fanout_channel(&self, exchange: &str, routing_key: &str) -> String {
        let prefix = self.fanout_prefix.as_deref().unwrap_or("");
        if !routing_key.is_empty() && self.fanout_patterns {
            format!("{}{prefix}{exchange}/{routing_key}", self.global_keyprefix)
        } else {
            format!("{}{prefix}{exchange}", self.global_keyprefix)
        }
    }
}

/// A binding as Kombu stores it: `routing_key SEP pattern SEP queue`.
pub fn binding_member(routing_key: &str, pattern: &str, queue: &str) -> String {
    format!("{routing_key}{SEP}{pattern}{SEP}{queue}")
}

/// Split a binding member; `None` if it is not one.
pub fn parse_binding(member: &str) -> Option<(&str, &str, &str)> {
    let mut it = member.splitn(3, SEP);
    Some((it.next()?, it.next()?, it.next()?))
}

/// Kombu's `TopicExchange.key_to_pattern`: the regex it stores for a topic binding key.
pub fn topic_pattern(binding_key: &str) -> String {
    let words: Vec<String> = binding_key
        .split('.')
        .map(|w| match w {
            "*" => r"[^\.]+".to_owned(),
            "#" => ".*?".to_owned(),
            w => escape_regex(w),
        })
        .collect();
    format!("^{}$", words.join(r"\."))
}

/// `kombu.utils.text.escape_regex(p, white='.#*')`: every character that is not alphanumeric
/// (nor `.`, `#`, `*`) gets a backslash; NUL becomes `\\000`.
fn escape_regex(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for c in word.chars() {
        if c == '\0' {
            out.push_str("\\000");
            continue;
        }
        if !(c.is_alphanumeric() || c == '#' || c == '*') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
enum Tok<'a> {
    Lit(&'a str),
    Dot,
    Star,
    Hash,
}

/// Does `routing_key` match the topic `binding_key` the way Kombu's stored regex does?
/// (`*` is one or more characters without a dot, `#` any characters, dots included, even none;
/// so `a.#` needs the dot: it matches `a.` and `a.b.c` but not `a`.)
pub fn topic_matches(binding_key: &str, routing_key: &str) -> bool {
    let mut toks = Vec::new();
    for (i, w) in binding_key.split('.').enumerate() {
        if i > 0 {
            toks.push(Tok::Dot);
        }
        toks.push(match w {
            "*" => Tok::Star,
            "#" => Tok::Hash,
            w => Tok::Lit(w),
        });
    }
    let s = routing_key.as_bytes();
    // reach[j]: the tokens so far can consume exactly s[..j].
    let mut reach = vec![false; s.len() + 1];
    reach[0] = true;
    for t in &toks {
        let mut next = vec![false; s.len() + 1];
        for j in 0..=s.len() {
            if !reach[j] {
                continue;
            }
            match t {
                Tok::Lit(w) => {
                    let w = w.as_bytes();
                    if s[j..].starts_with(w) {
                        next[j + w.len()] = true;
                    }
                }
                Tok::Dot => {
                    if s.get(j) == Some(&b'.') {
                        next[j + 1] = true;
                    }
                }
                Tok::Star => {
                    let mut k = j;
                    while k < s.len() && s[k] != b'.' {
                        k += 1;
                        next[k] = true;
                    }
                }
                Tok::Hash => {
                    for n in next.iter_mut().skip(j) {
                        *n = true;
                    }
                }
            }
        }
        reach = next;
    }
    reach[s.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_kombus() {
        // Seen in Redis, written by Kombu 5.7.0.
        assert_eq!(topic_pattern("a.*"), r"^a\.[^\.]+$");
        assert_eq!(topic_pattern("a.#"), r"^a\..*?$");
        assert_eq!(topic_pattern("user-1.x"), r"^user\-1\.x$");
    }

    #[test]
    fn topic_matching_follows_the_regex() {
        assert!(topic_matches("a.*", "a.b"));
        assert!(!topic_matches("a.*", "a.b.c"));
        assert!(!topic_matches("a.*", "a."));
        assert!(topic_matches("a.#", "a.b.c"));
        assert!(topic_matches("a.#", "a."));
        assert!(!topic_matches("a.#", "a"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#", "x.y"));
        assert!(topic_matches("*.b", "a.b"));
        assert!(!topic_matches("*.b", ".b"));
        assert!(topic_matches("exact", "exact"));
        assert!(!topic_matches("exact", "exactly"));
    }

    #[test]
    fn options_and_keys() {
        let o = RedisOptions::parse("redis://:pw@h:1/3?priority_steps=0,5&fanout_patterns=false")
            .unwrap();
        assert_eq!(o.server_url, "redis://:pw@h:1/3");
        assert_eq!(o.priority_steps, vec![0, 5]);
        assert_eq!(o.step_for(4), 0);
        assert_eq!(o.step_for(7), 5);
        assert_eq!(o.queue_key("q", 5), "q\x06\x165");
        assert_eq!(o.fanout_channel("ex", "rk"), "/3.ex");
        let d = RedisOptions::parse("redis://localhost").unwrap();
        assert_eq!(d.server_url, "redis://localhost/0");
        assert_eq!(d.step_for(3), 3);
        assert_eq!(d.step_for(200), 9);
        assert_eq!(d.fanout_channel("ex", "rk"), "/0.ex/rk");
        assert!(RedisOptions::parse("redis://h/x").is_err());
        assert!(RedisOptions::parse("redis://h/0?visibility_timeout=-1").is_err());
        assert_eq!(
            parse_binding(&binding_member("a.*", "^a$", "q")),
            Some(("a.*", "^a$", "q"))
        );
        assert!(RedisOptions::parse("amqp://h/0").is_err());
    }

    fn reason(url: &str) -> String {
        match RedisOptions::parse(url) {
            Err(Error::Url { url, reason }) => {
                assert!(!url.contains("s3cret"), "password shown in {url}");
                reason
            }
            other => panic!("{url}: expected Error::Url, got {other:?}"),
        }
    }

    #[test]
    fn rediss_options() {
        let o = RedisOptions::parse(
            "rediss://:pw@h:6380/4?ssl_cert_reqs=CERT_OPTIONAL&ssl_ca_certs=%2Ftmp%2Fca.pem\
             &ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_check_hostname=false&visibility_timeout=9",
        )
        .unwrap();
        assert_eq!(o.server_url, "rediss://:pw@h:6380/4");
        assert_eq!(o.db, 4);
        assert_eq!(o.fanout_prefix.as_deref(), Some("/4."));
        assert_eq!(o.visibility_timeout, Duration::from_secs(9));
        assert_eq!(
            o.tls,
            Some(RedisTls {
                cert_reqs: CertReqs::Optional,
                ca_certs: Some("/tmp/ca.pem".into()),
                certfile: Some("/c.pem".into()),
                keyfile: Some("/k.pem".into()),
                check_hostname: false,
            })
        );
        assert!(o.sentinel.is_none());
        let d = RedisOptions::parse("rediss://h").unwrap();
        assert_eq!(d.server_url, "rediss://h/0");
        let tls = d.tls.unwrap();
        assert_eq!(tls.cert_reqs, CertReqs::Required);
        assert!(tls.check_hostname && tls.ca_certs.is_none());
        assert_eq!(
            RedisOptions::parse("rediss://h?ssl_cert_reqs=none")
                .unwrap()
                .tls
                .unwrap()
                .cert_reqs,
            CertReqs::Disabled
        );
        assert!(reason("rediss://:s3cret@h?ssl_cert_reqs=maybe").contains("ssl_cert_reqs"));
        assert!(reason("rediss://h?ssl_ca_certs=").contains("ssl_ca_certs"));
        assert!(reason("rediss://h?ssl_check_hostname=perhaps").contains("ssl_check_hostname"));
        assert!(reason("rediss://h?ssl_keyfile=/k.pem").contains("ssl_certfile"));
        assert!(reason("redis://:s3cret@h?ssl_cert_reqs=none").contains("rediss://"));
    }

    #[test]
    fn sentinel_options() {
        let o = RedisOptions::parse(
            "sentinel://u:p%40ss@h1:26379;sentinel://h2:26380;sentinel://[::1]/3\
             ?master_name=mymaster&sentinel_password=sp&global_keyprefix=k:",
        )
        .unwrap();
        assert_eq!(o.db, 3);
        assert_eq!(o.fanout_prefix.as_deref(), Some("/3."));
        assert_eq!(o.global_keyprefix, "k:");
        assert!(o.tls.is_none());
        let s = o.sentinel.as_ref().unwrap();
        assert_eq!(
            s.sentinels,
            vec![
                ("h1".to_owned(), 26379),
                ("h2".to_owned(), 26380),
                ("::1".to_owned(), 26379)
            ]
        );
        assert_eq!(s.master_name, "mymaster");
        assert_eq!(s.username.as_deref(), Some("u"));
        assert_eq!(s.password.as_deref(), Some("p@ss"));
        assert_eq!(s.sentinel_password.as_deref(), Some("sp"));
        assert_eq!(s.sentinel_username, None);
        let shown = format!("{o:?}");
        assert!(
            !shown.contains("\"sp\"") && !shown.contains("p@ss"),
            "{shown}"
        );
        // Kombu's form with the password in the first URL and the database in the last.
        let k = RedisOptions::parse("sentinel://:pw@a;sentinel://b:1/2?master_name=m").unwrap();
        assert_eq!(k.db, 2);
        assert_eq!(k.sentinel.unwrap().password.as_deref(), Some("pw"));
        assert!(reason("sentinel://:s3cret@h:26379/0").contains("master_name"));
        assert!(reason("sentinel://:s3cret@h;redis://h2?master_name=m").contains("sentinel://"));
        assert!(reason("sentinel://h/1;sentinel://h2/2?master_name=m").contains("databases"));
        assert!(reason("sentinel://h:0?master_name=m").contains("port"));
        assert!(reason("sentinel://:s3cret@?master_name=m").contains("host"));
        assert!(reason("sentinel://h?master_name=m&ssl_cert_reqs=none").contains("TLS"));
        let masked = reason(
            "sentinel://:a@h;sentinel://:s3cret@h2?master_name=m&sentinel_password=s3cret&x=1",
        );
        assert!(masked.contains("passwords"));
    }

    #[test]
    fn masking_covers_every_part() {
        assert_eq!(
            mask("sentinel://:a@h;sentinel://u:b@h2/0?master_name=m&sentinel_password=c"),
            "sentinel://:****@h;sentinel://u:****@h2/0?master_name=m&sentinel_password=****"
        );
        assert_eq!(mask("redis://h/0"), "redis://h/0");
    }
}
