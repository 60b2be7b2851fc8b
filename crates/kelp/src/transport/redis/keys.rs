//! Kombu's Redis key layout and transport options (`kombu/transport/redis.py`).

use std::time::Duration;

use crate::error::Error;

/// The separator Kombu puts inside binding members and priority queue names.
pub const SEP: &str = "\x06\x16";

/// The options of a `redis://` URL, with Kombu's names and defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisOptions {
    /// The URL handed to the `redis` crate (query options removed).
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
}

fn bad(url: &str, reason: impl Into<String>) -> Error {
    Error::Url {
        url: crate::error::mask_url(url),
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

impl RedisOptions {
    /// Parse `redis://[[user]:password@]host[:port][/db][?option=value…]`.
    ///
    /// ```
    /// # use kelp::transport::redis::RedisOptions;
    /// let o = RedisOptions::parse("redis://localhost:6379/2?visibility_timeout=30&global_keyprefix=app:")?;
    /// assert_eq!(o.db, 2);
    /// assert_eq!(o.visibility_timeout.as_secs(), 30);
    /// assert_eq!(o.global_keyprefix, "app:");
    /// # Ok::<(), kelp::Error>(())
    /// ```
    pub fn parse(url: &str) -> Result<RedisOptions, Error> {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let rest = base
            .split_once("://")
            .map(|(_, r)| r)
            .ok_or_else(|| bad(url, "no scheme"))?;
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let path = &rest[authority_end..];
        let db = match path.trim_start_matches('/') {
            "" => 0,
            d => d
                .parse::<i64>()
                .ok()
                .filter(|n| (0..=1_000_000).contains(n))
                .ok_or_else(|| bad(url, format!("database {d:?} is not a number")))?,
        };
        let mut o = RedisOptions {
            server_url: format!("{}/{db}", base.trim_end_matches(path)),
            db,
            visibility_timeout: Duration::from_secs(3600),
            global_keyprefix: String::new(),
            priority_steps: vec![0, 3, 6, 9],
            fanout_prefix: Some(format!("/{db}.")),
            fanout_patterns: true,
            socket_timeout: None,
            brpop_timeout: Duration::from_secs(1),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map_err(|_| bad(url, format!("{k} is not UTF-8")))?;
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
                // The redis crate's own options (e.g. `protocol`) and unknown ones: ignored, as
                // Kombu ignores transport options it does not know.
                _ => {}
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
    }
}
