//! Headers-exchange matching: `x-match` = `all` / `any` / `all-with-x` / `any-with-x`.

use kelp_amqp::{FieldTable, FieldValue, ShortString};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    All,
    Any,
}

/// A headers binding's arguments, pre-processed for matching.
///
/// Like RabbitMQ: `x-match` defaults to `all`; with `all`/`any`, binding arguments whose name
/// starts with `x-` are ignored (`all-with-x`/`any-with-x` include them, `x-match` itself is
/// always ignored). A binding value of type void (`V`) only requires the header to be present.
/// `all` with no arguments matches every message; `any` with none matches nothing. Values
/// compare numerically across integer and float types, and long strings equal byte arrays with
/// the same bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadersMatcher {
    mode: Mode,
    pairs: Vec<(ShortString, FieldValue)>,
}

impl HeadersMatcher {
    /// Build from binding arguments; an invalid `x-match` value is an error (the message says
    /// what is accepted).
    pub fn new(args: &FieldTable) -> Result<Self, String> {
        let (mode, with_x) = match args.get("x-match") {
            None => (Mode::All, false),
            Some(v) => match v.as_str() {
                Some("all") => (Mode::All, false),
                Some("any") => (Mode::Any, false),
                Some("all-with-x") => (Mode::All, true),
                Some("any-with-x") => (Mode::Any, true),
                _ => {
                    return Err(format!(
                        "x-match must be one of all, any, all-with-x, any-with-x; got {v:?}"
                    ))
                }
            },
        };
        let pairs = args
            .iter()
            .filter(|(k, _)| k.as_str() != "x-match" && (with_x || !k.starts_with("x-")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(HeadersMatcher { mode, pairs })
    }

    /// Does a message with `headers` match?
    pub fn matches(&self, headers: Option<&FieldTable>) -> bool {
        let ok = |(k, want): &(ShortString, FieldValue)| match headers.and_then(|h| h.get(k)) {
            None => false,
            Some(_) if matches!(want, FieldValue::Void) => true,
            Some(have) => values_equal(want, have),
        };
        match self.mode {
            Mode::All => self.pairs.iter().all(ok),
            Mode::Any => self.pairs.iter().any(ok),
        }
    }
}

fn as_f64(v: &FieldValue) -> Option<f64> {
    match v {
        FieldValue::F32(f) => Some(f64::from(*f)),
        FieldValue::F64(f) => Some(*f),
        other => other.as_i64().map(|i| i as f64),
    }
}

fn bytes_of(v: &FieldValue) -> Option<&[u8]> {
    match v {
        FieldValue::LongString(b) | FieldValue::ByteArray(b) => Some(b),
        _ => None,
    }
}

/// Value equality the way RabbitMQ's headers exchange compares (Erlang `==`).
pub(crate) fn values_equal(a: &FieldValue, b: &FieldValue) -> bool {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (as_f64(a), as_f64(b)) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (bytes_of(a), bytes_of(b)) {
        return x == y;
    }
    a == b
}
