//! Celery task messages (protocol v2): build and parse them, send tasks Celery workers run.
//!
//! A [`TaskMessage`] is what Celery 5's `apply_async` / `send_task` publishes
//! (`celery/app/amqp.py`, `as_task_v2`): the task's name, id and options in the headers, the
//! id again as `correlation_id`, and a JSON body `[args, kwargs, {"callbacks", "errbacks",
//! "chain", "chord"}]`. [`send_task`] publishes one through kelp's [`Producer`] on any
//! transport (a Celery worker on the same broker runs it), [`TaskMessage::from_message`] reads
//! one a Celery client sent, and [`result_from_redis`] reads a result from Celery's Redis result
//! backend.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kelp::celery::CeleryError> {
//! use std::time::Duration;
//! use kelp::celery::{self, TaskMessage, TaskRoute};
//! use serde_json::json;
//!
//! let conn = kelp::Connection::open("redis://127.0.0.1:6379/0").await?;
//! let ch = conn.channel().await?;
//! let task = TaskMessage::new("tasks.add").arg(2).arg(3);
//! let id = celery::send_task(&ch, &task, &TaskRoute::default()).await?;
//! let result = celery::result_from_redis("redis://127.0.0.1:6379/1", &id, Duration::from_secs(10)).await?;
//! assert_eq!(result.result, json!(5));
//! # Ok(()) }
//! ```

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kelp_amqp::{FieldTable, FieldValue};
use serde_json::{json, Map, Value};

use crate::channel::Channel;
use crate::entity::{DeliveryMode, Exchange, Queue};
use crate::error::Error;
use crate::message::Message;
use crate::producer::{Producer, PublishOptions};

/// The longest `argsrepr` / `kwargsrepr` kelp generates (Celery's `argsrepr_maxsize`).
const REPR_MAX: usize = 1024;

/// What can go wrong reading, sending or waiting for Celery tasks.
///
/// ```
/// use kelp::celery::{CeleryError, TaskMessage};
/// let err = TaskMessage::from_json(&serde_json::json!({}), &serde_json::json!([[], {}, {}]))
///     .unwrap_err();
/// assert!(matches!(err, CeleryError::NotProtocolV2(_)));
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CeleryError {
    /// Not a protocol v2 task message (protocol v1 keeps the task in the body; other
    /// messages have no `task` header at all).
    #[error("not a Celery protocol v2 task message: {0}")]
    NotProtocolV2(String),
    /// A v2 message with a field of the wrong shape.
    #[error("malformed Celery task message: {0}")]
    Malformed(String),
    /// kelp failed (publishing, decoding the body, …).
    #[error(transparent)]
    Kelp(#[from] Error),
    /// The result backend failed or holds something that is not a Celery result.
    #[error("Celery result backend: {0}")]
    Backend(String),
    /// The task's result did not appear in time.
    #[error("no result for task {id} within {after:?}")]
    Timeout {
        /// The task id.
        id: String,
        /// How long was waited.
        after: Duration,
    },
}

/// A Celery task message, protocol v2 (`celery/app/amqp.py`, `as_task_v2`).
///
/// Build one with [`TaskMessage::new`] and its setters, or read one with
/// [`TaskMessage::from_message`]. The fields are the message's headers, properties and body.
///
/// ```
/// use kelp::celery::TaskMessage;
/// use serde_json::json;
/// let t = TaskMessage::new("tasks.add").arg(2).arg(3).kwarg("debug", true).retries(1);
/// assert_eq!(t.headers_json()["task"], json!("tasks.add"));
/// assert_eq!(t.body(), json!([[2, 3], {"debug": true},
///     {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    /// The task's registered name (header `task`).
    pub task: String,
    /// The task id, a UUID (header `id`, property `correlation_id`).
    pub id: String,
    /// Positional arguments (body\[0\]).
    pub args: Vec<Value>,
    /// Keyword arguments (body\[1\]).
    pub kwargs: Map<String, Value>,
    /// The sender's language (header `lang`, `"py"` as Celery writes it).
    pub lang: String,
    /// A name shown in logs instead of the task's (header `shadow`).
    pub shadow: Option<String>,
    /// Run no earlier than this ISO 8601 time (header `eta`).
    pub eta: Option<String>,
    /// Discard if not started by this ISO 8601 time (header `expires`).
    pub expires: Option<String>,
    /// The group id (header `group`).
    pub group: Option<String>,
    /// The task's index in its group (header `group_index`).
    pub group_index: Option<u64>,
    /// How many times it has been retried (header `retries`).
    pub retries: u32,
    /// Hard and soft time limits in seconds (header `timelimit`, `[hard, soft]`).
    pub timelimit: (Option<f64>, Option<f64>),
    /// The id of the first task of the workflow (header `root_id`; the task's own id if unset).
    pub root_id: Option<String>,
    /// The id of the task that sent this one (header `parent_id`).
    pub parent_id: Option<String>,
    /// A repr of the args for logs (header `argsrepr`; generated if unset).
    pub argsrepr: Option<String>,
    /// A repr of the kwargs for logs (header `kwargsrepr`; generated if unset).
    pub kwargsrepr: Option<String>,
    /// Who sent it, `gen<pid>@<hostname>` (header `origin`).
    pub origin: Option<String>,
    /// Do not store the result (header `ignore_result`).
    pub ignore_result: bool,
    /// How many times the task was replaced (header `replaced_task_nesting`).
    pub replaced_task_nesting: u32,
    /// Names of stamped headers (header `stamped_headers`).
    pub stamped_headers: Option<Vec<String>>,
    /// Stamps (header `stamps`).
    pub stamps: Map<String, Value>,
    /// Where to send replies (property `reply_to`; `""` when unset, as Celery sends it).
    pub reply_to: Option<String>,
    /// Message priority (property `priority`).
    pub priority: Option<u8>,
    /// Signatures to call on success (body\[2\]`.callbacks`).
    pub callbacks: Value,
    /// Signatures to call on failure (body\[2\]`.errbacks`).
    pub errbacks: Value,
    /// The rest of a chain (body\[2\]`.chain`).
    pub chain: Value,
    /// The chord callback (body\[2\]`.chord`).
    pub chord: Value,
}

impl TaskMessage {
    /// A message for task `task` with a new uuid4 id, no arguments, and Celery's defaults
    /// (`origin` is `gen<pid>@<hostname>`).
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("tasks.add");
    /// assert_eq!(t.id.len(), 36);
    /// assert!(t.origin.as_deref().unwrap().starts_with("gen"));
    /// ```
    pub fn new(task: impl Into<String>) -> Self {
        TaskMessage {
            task: task.into(),
            id: crate::ids::uuid4(),
            args: Vec::new(),
            kwargs: Map::new(),
            lang: "py".into(),
            shadow: None,
            eta: None,
            expires: None,
            group: None,
            group_index: None,
            retries: 0,
            timelimit: (None, None),
            root_id: None,
            parent_id: None,
            argsrepr: None,
            kwargsrepr: None,
            origin: Some(origin()),
            ignore_result: false,
            replaced_task_nesting: 0,
            stamped_headers: None,
            stamps: Map::new(),
            reply_to: None,
            priority: None,
            callbacks: Value::Null,
            errbacks: Value::Null,
            chain: Value::Null,
            chord: Value::Null,
        }
    }

    /// Use `id` as the task id.
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").id("9f8e0e5e-0000-4000-8000-000000000001");
    /// assert_eq!(t.id, "9f8e0e5e-0000-4000-8000-000000000001");
    /// ```
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Replace the positional arguments.
    ///
    /// ```
    /// use serde_json::json;
    /// let t = kelp::celery::TaskMessage::new("t").args(vec![json!(1), json!("two")]);
    /// assert_eq!(t.args, vec![json!(1), json!("two")]);
    /// ```
    pub fn args(mut self, args: Vec<Value>) -> Self {
        self.args = args;
        self
    }

    /// Append one positional argument.
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").arg(1).arg("two").arg(vec![3.5]);
    /// assert_eq!(t.args.len(), 3);
    /// ```
    pub fn arg(mut self, value: impl Into<Value>) -> Self {
        self.args.push(value.into());
        self
    }

    /// Replace the keyword arguments.
    ///
    /// ```
    /// let mut kw = serde_json::Map::new();
    /// kw.insert("x".into(), 1.into());
    /// let t = kelp::celery::TaskMessage::new("t").kwargs(kw);
    /// assert_eq!(t.kwargs["x"], 1);
    /// ```
    pub fn kwargs(mut self, kwargs: Map<String, Value>) -> Self {
        self.kwargs = kwargs;
        self
    }

    /// Add one keyword argument.
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").kwarg("x", 1).kwarg("name", "kelp");
    /// assert_eq!(t.kwargs["name"], "kelp");
    /// ```
    pub fn kwarg(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.kwargs.insert(key.into(), value.into());
        self
    }

    /// Show this name in logs instead of the task's.
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").shadow("nicer-name");
    /// assert_eq!(t.shadow.as_deref(), Some("nicer-name"));
    /// ```
    pub fn shadow(mut self, name: impl Into<String>) -> Self {
        self.shadow = Some(name.into());
        self
    }

    /// Run no earlier than `at` (written as ISO 8601 UTC, as Celery does).
    ///
    /// ```
    /// use std::time::{Duration, UNIX_EPOCH};
    /// let t = kelp::celery::TaskMessage::new("t").eta(UNIX_EPOCH + Duration::from_secs(86_400));
    /// assert_eq!(t.eta.as_deref(), Some("1970-01-02T00:00:00+00:00"));
    /// ```
    pub fn eta(mut self, at: SystemTime) -> Self {
        self.eta = Some(iso8601(at));
        self
    }

    /// Run no earlier than `delay` from now (Celery's `countdown`).
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").countdown(std::time::Duration::from_secs(10));
    /// assert!(t.eta.is_some());
    /// ```
    pub fn countdown(self, delay: Duration) -> Self {
        self.eta(SystemTime::now() + delay)
    }

    /// Discard the task if it has not started by `at`.
    ///
    /// ```
    /// use std::time::{Duration, UNIX_EPOCH};
    /// let t = kelp::celery::TaskMessage::new("t").expires(UNIX_EPOCH + Duration::from_millis(1_500));
    /// assert_eq!(t.expires.as_deref(), Some("1970-01-01T00:00:01.500000+00:00"));
    /// ```
    pub fn expires(mut self, at: SystemTime) -> Self {
        self.expires = Some(iso8601(at));
        self
    }

    /// Discard the task if it has not started within `ttl` from now.
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").expires_in(std::time::Duration::from_secs(60));
    /// assert!(t.expires.is_some());
    /// ```
    pub fn expires_in(self, ttl: Duration) -> Self {
        self.expires(SystemTime::now() + ttl)
    }

    /// Make it the `index`th task of group `group`.
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").group("g-1", 0);
    /// assert_eq!((t.group.as_deref(), t.group_index), (Some("g-1"), Some(0)));
    /// ```
    pub fn group(mut self, group: impl Into<String>, index: u64) -> Self {
        self.group = Some(group.into());
        self.group_index = Some(index);
        self
    }

    /// Set how many times it has been retried.
    ///
    /// ```
    /// assert_eq!(kelp::celery::TaskMessage::new("t").retries(2).retries, 2);
    /// ```
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Set the hard and soft time limits (seconds).
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").time_limit(Some(30.0), Some(25.0));
    /// assert_eq!(t.timelimit, (Some(30.0), Some(25.0)));
    /// ```
    pub fn time_limit(mut self, hard: Option<f64>, soft: Option<f64>) -> Self {
        self.timelimit = (hard, soft);
        self
    }

    /// Set the workflow's root task id.
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").root_id("root");
    /// assert_eq!(t.headers_json()["root_id"], "root");
    /// ```
    pub fn root_id(mut self, id: impl Into<String>) -> Self {
        self.root_id = Some(id.into());
        self
    }

    /// Set the id of the task that sends this one.
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").parent_id("parent");
    /// assert_eq!(t.parent_id.as_deref(), Some("parent"));
    /// ```
    pub fn parent_id(mut self, id: impl Into<String>) -> Self {
        self.parent_id = Some(id.into());
        self
    }

    /// Set what logs show for the args (instead of the generated Python-style repr).
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").arg("secret").argsrepr("(…)");
    /// assert_eq!(t.headers_json()["argsrepr"], "(…)");
    /// ```
    pub fn argsrepr(mut self, repr: impl Into<String>) -> Self {
        self.argsrepr = Some(repr.into());
        self
    }

    /// Set what logs show for the kwargs.
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").kwarg("password", "x").kwargsrepr("{…}");
    /// assert_eq!(t.headers_json()["kwargsrepr"], "{…}");
    /// ```
    pub fn kwargsrepr(mut self, repr: impl Into<String>) -> Self {
        self.kwargsrepr = Some(repr.into());
        self
    }

    /// Set who sent it.
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").origin("gen1@host");
    /// assert_eq!(t.origin.as_deref(), Some("gen1@host"));
    /// ```
    pub fn origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = Some(origin.into());
        self
    }

    /// Ask the worker not to store the result.
    ///
    /// ```
    /// assert!(kelp::celery::TaskMessage::new("t").ignore_result(true).ignore_result);
    /// ```
    pub fn ignore_result(mut self, on: bool) -> Self {
        self.ignore_result = on;
        self
    }

    /// Set `reply_to`.
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").reply_to("replies");
    /// assert_eq!(t.reply_to.as_deref(), Some("replies"));
    /// ```
    pub fn reply_to(mut self, queue: impl Into<String>) -> Self {
        self.reply_to = Some(queue.into());
        self
    }

    /// Set the message priority.
    ///
    /// ```
    /// assert_eq!(kelp::celery::TaskMessage::new("t").priority(5).priority, Some(5));
    /// ```
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Set a header stamp (and list its name in `stamped_headers`).
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").stamp("tenant", "acme");
    /// assert_eq!(t.headers_json()["stamps"]["tenant"], "acme");
    /// assert_eq!(t.headers_json()["stamped_headers"], serde_json::json!(["tenant"]));
    /// ```
    pub fn stamp(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        let name = name.into();
        let names = self.stamped_headers.get_or_insert_with(Vec::new);
        if !names.contains(&name) {
            names.push(name.clone());
        }
        self.stamps.insert(name, value.into());
        self
    }

    /// Set the success callbacks (a list of Celery signatures, as JSON).
    ///
    /// ```
    /// use serde_json::json;
    /// let t = kelp::celery::TaskMessage::new("t").callbacks(json!([{"task": "tasks.log"}]));
    /// assert_eq!(t.body()[2]["callbacks"][0]["task"], "tasks.log");
    /// ```
    pub fn callbacks(mut self, signatures: Value) -> Self {
        self.callbacks = signatures;
        self
    }

    /// Set the failure callbacks (a list of Celery signatures, as JSON).
    ///
    /// ```
    /// use serde_json::json;
    /// let t = kelp::celery::TaskMessage::new("t").errbacks(json!([{"task": "tasks.alert"}]));
    /// assert_eq!(t.body()[2]["errbacks"][0]["task"], "tasks.alert");
    /// ```
    pub fn errbacks(mut self, signatures: Value) -> Self {
        self.errbacks = signatures;
        self
    }

    /// Set the rest of the chain (a list of Celery signatures, as JSON).
    ///
    /// ```
    /// use serde_json::json;
    /// let t = kelp::celery::TaskMessage::new("t").chain(json!([{"task": "tasks.next"}]));
    /// assert_eq!(t.body()[2]["chain"][0]["task"], "tasks.next");
    /// ```
    pub fn chain(mut self, signatures: Value) -> Self {
        self.chain = signatures;
        self
    }

    /// Set the chord callback (a Celery signature, as JSON).
    ///
    /// ```
    /// use serde_json::json;
    /// let t = kelp::celery::TaskMessage::new("t").chord(json!({"task": "tasks.sum"}));
    /// assert_eq!(t.body()[2]["chord"]["task"], "tasks.sum");
    /// ```
    pub fn chord(mut self, signature: Value) -> Self {
        self.chord = signature;
        self
    }

    /// The headers as JSON, exactly the keys and order `as_task_v2` writes (`root_id`
    /// defaults to the id; `argsrepr`/`kwargsrepr` to a Python-style repr).
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("tasks.add").arg(1).arg("é");
    /// let h = t.headers_json();
    /// assert_eq!(h["lang"], "py");
    /// assert_eq!(h["root_id"], t.id.as_str());
    /// assert_eq!(h["argsrepr"], "[1, 'é']");
    /// assert_eq!(h["timelimit"], serde_json::json!([null, null]));
    /// ```
    pub fn headers_json(&self) -> Value {
        let opt = |v: &Option<String>| v.as_ref().map_or(Value::Null, |s| json!(s));
        let num = |v: Option<f64>| v.map_or(Value::Null, |n| json!(n));
        let args = Value::Array(self.args.clone());
        let kwargs = Value::Object(self.kwargs.clone());
        json!({
            "lang": self.lang,
            "task": self.task,
            "id": self.id,
            "shadow": opt(&self.shadow),
            "eta": opt(&self.eta),
            "expires": opt(&self.expires),
            "group": opt(&self.group),
            "group_index": self.group_index,
            "retries": self.retries,
            "timelimit": [num(self.timelimit.0), num(self.timelimit.1)],
            "root_id": self.root_id.as_deref().unwrap_or(&self.id),
            "parent_id": opt(&self.parent_id),
            "argsrepr": self.argsrepr.clone().unwrap_or_else(|| py_repr_max(&args)),
            "kwargsrepr": self.kwargsrepr.clone().unwrap_or_else(|| py_repr_max(&kwargs)),
            "origin": opt(&self.origin),
            "ignore_result": self.ignore_result,
            "replaced_task_nesting": self.replaced_task_nesting,
            "stamped_headers": self.stamped_headers,
            "stamps": self.stamps,
        })
    }

    /// The headers as an AMQP field table (nulls as void, as Kombu sends them).
    ///
    /// ```
    /// let h = kelp::celery::TaskMessage::new("tasks.add").headers();
    /// assert_eq!(h.get("task").and_then(|v| v.as_str()), Some("tasks.add"));
    /// ```
    pub fn headers(&self) -> FieldTable {
        match json_to_field(&self.headers_json()) {
            FieldValue::Table(t) => t,
            _ => FieldTable::new(),
        }
    }

    /// The body: `[args, kwargs, {"callbacks", "errbacks", "chain", "chord"}]`.
    ///
    /// ```
    /// let b = kelp::celery::TaskMessage::new("t").arg(1).body();
    /// assert_eq!(b[0], serde_json::json!([1]));
    /// ```
    pub fn body(&self) -> Value {
        json!([
            self.args,
            self.kwargs,
            {"callbacks": self.callbacks, "errbacks": self.errbacks,
             "chain": self.chain, "chord": self.chord}
        ])
    }

    /// The publish options Celery uses: the headers, `correlation_id` = id, `reply_to` (or
    /// `""`), persistent delivery, the priority, and the `json` serializer
    /// (`application/json`, `utf-8`).
    ///
    /// ```
    /// let t = kelp::celery::TaskMessage::new("t").priority(3);
    /// let o = t.publish_options();
    /// assert_eq!(o.correlation_id.as_deref(), Some(t.id.as_str()));
    /// assert_eq!(o.priority, Some(3));
    /// ```
    pub fn publish_options(&self) -> PublishOptions {
        let mut o = PublishOptions::default()
            .serializer("json")
            .delivery_mode(DeliveryMode::Persistent)
            .correlation_id(self.id.as_str())
            .reply_to(self.reply_to.clone().unwrap_or_default());
        o.headers = self.headers();
        if let Some(p) = self.priority {
            o = o.priority(p);
        }
        o
    }

    /// Parse a task message from its headers and (decoded) body, as JSON. Errors are typed:
    /// [`CeleryError::NotProtocolV2`] without a `task` header (a protocol v1 message keeps it
    /// in the body), [`CeleryError::Malformed`] for a field of the wrong shape.
    ///
    /// ```
    /// use kelp::celery::{CeleryError, TaskMessage};
    /// use serde_json::json;
    /// let t = TaskMessage::from_json(
    ///     &json!({"task": "tasks.add", "id": "abc", "retries": 2}),
    ///     &json!([[1, 2], {"z": 3}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]),
    /// ).unwrap();
    /// assert_eq!((t.task.as_str(), t.retries), ("tasks.add", 2));
    /// let v1 = TaskMessage::from_json(&json!({}), &json!({"task": "tasks.add", "id": "abc"}));
    /// assert!(matches!(v1, Err(CeleryError::NotProtocolV2(_))));
    /// let bad = TaskMessage::from_json(&json!({"task": "t", "id": "i"}), &json!([1, 2, 3]));
    /// assert!(matches!(bad, Err(CeleryError::Malformed(_))));
    /// ```
    pub fn from_json(headers: &Value, body: &Value) -> Result<Self, CeleryError> {
        let empty = Map::new();
        let h = match headers {
            Value::Object(h) => h,
            Value::Null => &empty,
            _ => return Err(malformed("the headers are not a table")),
        };
        let Some(task) = h.get("task") else {
            let why = if body.get("task").is_some() && body.get("id").is_some() {
                "protocol v1 (the task name is in the body, not in the headers)"
            } else {
                "no `task` header"
            };
            return Err(CeleryError::NotProtocolV2(why.into()));
        };
        let task = task
            .as_str()
            .ok_or_else(|| malformed("header `task` is not a string"))?;
        let id = h
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("header `id` is missing or not a string"))?;
        let parts = body
            .as_array()
            .filter(|a| a.len() == 3)
            .ok_or_else(|| malformed("the body is not [args, kwargs, embed]"))?;
        let args = parts[0]
            .as_array()
            .cloned()
            .ok_or_else(|| malformed("args (body[0]) is not a list"))?;
        let kwargs = parts[1]
            .as_object()
            .cloned()
            .ok_or_else(|| malformed("kwargs (body[1]) is not a mapping"))?;
        let embed = match &parts[2] {
            Value::Object(m) => m.clone(),
            Value::Null => Map::new(),
            _ => return Err(malformed("embed (body[2]) is not a mapping")),
        };
        let text = |k: &str| -> Result<Option<String>, CeleryError> {
            match h.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(malformed(&format!("header `{k}` is not a string: {other}"))),
            }
        };
        let uint = |k: &str| -> Result<Option<u64>, CeleryError> {
            match h.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    malformed(&format!("header `{k}` is not a non-negative integer: {v}"))
                }),
            }
        };
        let small = |k: &str| -> Result<u32, CeleryError> {
            uint(k)?
                .map(|n| u32::try_from(n).map_err(|_| malformed(&format!("header `{k}` too big"))))
                .transpose()
                .map(Option::unwrap_or_default)
        };
        let limit = |v: Option<&Value>| -> Result<Option<f64>, CeleryError> {
            match v {
                None | Some(Value::Null) => Ok(None),
                Some(n) => n
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| malformed("header `timelimit` holds a non-number")),
            }
        };
        let timelimit = match h.get("timelimit") {
            None | Some(Value::Null) => (None, None),
            Some(Value::Array(a)) if a.len() == 2 => (limit(a.first())?, limit(a.get(1))?),
            Some(_) => return Err(malformed("header `timelimit` is not [hard, soft]")),
        };
        let stamped_headers = match h.get("stamped_headers") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| malformed("header `stamped_headers` holds a non-string"))?,
            ),
            Some(_) => return Err(malformed("header `stamped_headers` is not a list")),
        };
        let stamps = match h.get("stamps") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(malformed("header `stamps` is not a mapping")),
        };
        let ignore_result = match h.get("ignore_result") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(malformed("header `ignore_result` is not a boolean")),
        };
        let embedded = |k: &str| embed.get(k).cloned().unwrap_or(Value::Null);
        Ok(TaskMessage {
            task: task.to_owned(),
            id: id.to_owned(),
            args,
            kwargs,
            lang: text("lang")?.unwrap_or_else(|| "py".into()),
            shadow: text("shadow")?,
            eta: text("eta")?,
            expires: text("expires")?,
            group: text("group")?,
            group_index: uint("group_index")?,
            retries: small("retries")?,
            timelimit,
            root_id: text("root_id")?,
            parent_id: text("parent_id")?,
            argsrepr: text("argsrepr")?,
            kwargsrepr: text("kwargsrepr")?,
            origin: text("origin")?,
            ignore_result,
            replaced_task_nesting: small("replaced_task_nesting")?,
            stamped_headers,
            stamps,
            reply_to: None,
            priority: None,
            callbacks: embedded("callbacks"),
            errbacks: embedded("errbacks"),
            chain: embedded("chain"),
            chord: embedded("chord"),
        })
    }

    /// Parse a task message a Celery client sent: headers, body (decoded with the message's
    /// serializer, after the consumer's accept list and decompression), `reply_to` and
    /// `priority`.
    ///
    /// ```no_run
    /// # async fn demo(mut consumer: kelp::Consumer) -> Result<(), kelp::celery::CeleryError> {
    /// while let Some(msg) = consumer.next().await {
    ///     let mut msg = msg?;
    ///     let task = kelp::celery::TaskMessage::from_message(&msg)?;
    ///     println!("{}[{}] args={:?} kwargs={:?}", task.task, task.id, task.args, task.kwargs);
    ///     msg.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn from_message(message: &Message) -> Result<Self, CeleryError> {
        let headers = message.headers().map(table_to_json).unwrap_or(Value::Null);
        if headers.get("task").is_none() {
            // Decide v1 vs. no task at all without requiring the body to decode.
            let body: Option<Value> = message.decode().ok();
            return Self::from_json(&headers, &body.unwrap_or(Value::Null));
        }
        let body: Value = message.decode()?;
        let mut t = Self::from_json(&headers, &body)?;
        t.reply_to = message
            .reply_to()
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        t.priority = message.properties().priority;
        Ok(t)
    }
}

fn malformed(why: &str) -> CeleryError {
    CeleryError::Malformed(why.to_owned())
}

/// Where [`send_task`] publishes: a queue (declared first, with its binding, as Celery
/// declares its queues), the exchange and the routing key. The default is Celery's:
/// queue, exchange and routing key `celery`, a durable direct exchange.
///
/// ```
/// use kelp::celery::TaskRoute;
/// let r = TaskRoute::default();
/// assert_eq!((r.queue.as_str(), r.exchange.as_str(), r.routing_key.as_str()), ("celery", "celery", "celery"));
/// let r = TaskRoute::queue("reports");
/// assert_eq!(r.exchange, "reports");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRoute {
    /// The queue the worker consumes (declared durable and bound unless `declare` is false).
    pub queue: String,
    /// The exchange to publish to (`""`: the default exchange, routing key = queue).
    pub exchange: String,
    /// The exchange's type (`direct`, `topic`, `fanout`).
    pub exchange_type: String,
    /// The routing key.
    pub routing_key: String,
    /// Declare the queue, its exchange and its binding before publishing (once per
    /// connection).
    pub declare: bool,
}

impl Default for TaskRoute {
    fn default() -> Self {
        TaskRoute::queue("celery")
    }
}

impl TaskRoute {
    /// Celery's route for a queue named `name` (`task_create_missing_queues`): queue, direct
    /// exchange and routing key all `name`.
    ///
    /// ```
    /// let r = kelp::celery::TaskRoute::queue("images");
    /// assert_eq!((r.queue.as_str(), r.routing_key.as_str()), ("images", "images"));
    /// ```
    pub fn queue(name: impl Into<String>) -> Self {
        let name = name.into();
        TaskRoute {
            queue: name.clone(),
            exchange: name.clone(),
            exchange_type: "direct".into(),
            routing_key: name,
            declare: true,
        }
    }

    /// Publish to exchange `name` of type `kind`.
    ///
    /// ```
    /// let r = kelp::celery::TaskRoute::queue("q").exchange("tasks", "topic");
    /// assert_eq!(r.exchange_type, "topic");
    /// ```
    pub fn exchange(mut self, name: impl Into<String>, kind: impl Into<String>) -> Self {
        self.exchange = name.into();
        self.exchange_type = kind.into();
        self
    }

    /// Publish with routing key `key`.
    ///
    /// ```
    /// let r = kelp::celery::TaskRoute::queue("q").routing_key("q.high");
    /// assert_eq!(r.routing_key, "q.high");
    /// ```
    pub fn routing_key(mut self, key: impl Into<String>) -> Self {
        self.routing_key = key.into();
        self
    }

    /// Declare the queue before publishing (default true).
    ///
    /// ```
    /// assert!(!kelp::celery::TaskRoute::default().declare(false).declare);
    /// ```
    pub fn declare(mut self, on: bool) -> Self {
        self.declare = on;
        self
    }
}

/// Publish `task` on `channel` along `route` with kelp's [`Producer`], as Celery's
/// `send_task` does; returns the task id.
///
/// ```no_run
/// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
/// use kelp::celery::{send_task, TaskMessage, TaskRoute};
/// let id = send_task(ch, &TaskMessage::new("tasks.add").arg(2).arg(3), &TaskRoute::default()).await?;
/// println!("sent {id}");
/// # Ok(()) }
/// ```
pub async fn send_task(
    channel: &Channel,
    task: &TaskMessage,
    route: &TaskRoute,
) -> Result<String, Error> {
    let mut options = task
        .publish_options()
        .routing_key(route.routing_key.as_str());
    let producer = if route.exchange.is_empty() {
        if route.routing_key.is_empty() {
            options = options.routing_key(route.queue.as_str());
        }
        Producer::new(channel)
    } else {
        let exchange = Exchange::new(route.exchange.as_str()).kind(route.exchange_type.as_str());
        Producer::new(channel).exchange(exchange)
    };
    if route.declare {
        let mut queue = Queue::new(route.queue.as_str()).durable(true);
        if !route.exchange.is_empty() {
            queue = queue
                .exchange(Exchange::new(route.exchange.as_str()).kind(route.exchange_type.as_str()))
                .routing_key(route.routing_key.as_str());
        }
        options = options.declare(queue);
    }
    let body = task.body();
    producer.publish_serde(&body, options).await?;
    Ok(task.id.clone())
}

/// A task's state and result as Celery's result backend stores it
/// (`{"status", "result", "traceback", "children", "date_done", "task_id"}`).
///
/// ```
/// let r = kelp::celery::TaskResult::from_json(serde_json::json!(
///     {"status": "SUCCESS", "result": 5, "traceback": null, "children": [], "task_id": "x"}
/// )).unwrap();
/// assert!(r.is_success() && r.is_ready());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResult {
    /// The task id.
    pub task_id: String,
    /// `SUCCESS`, `FAILURE`, `RETRY`, `REVOKED`, `STARTED`, …
    pub status: String,
    /// The return value, or for a failure `{"exc_type", "exc_message", "exc_module"}`.
    pub result: Value,
    /// The Python traceback of a failure.
    pub traceback: Option<String>,
    /// When it finished (ISO 8601).
    pub date_done: Option<String>,
    /// Results of subtasks.
    pub children: Vec<Value>,
    /// The whole stored document.
    pub raw: Value,
}

impl TaskResult {
    /// Read a stored result document.
    ///
    /// ```
    /// let r = kelp::celery::TaskResult::from_json(serde_json::json!({"status": "FAILURE",
    ///     "result": {"exc_type": "ValueError", "exc_message": ["bad"]}, "task_id": "x"})).unwrap();
    /// assert_eq!(r.result["exc_type"], "ValueError");
    /// ```
    pub fn from_json(doc: Value) -> Result<Self, CeleryError> {
        let status = doc
            .get("status")
            .and_then(Value::as_str)
            .ok_or_else(|| CeleryError::Backend(format!("no `status` in {doc}")))?
            .to_owned();
        let s = |k: &str| doc.get(k).and_then(Value::as_str).map(str::to_owned);
        Ok(TaskResult {
            task_id: s("task_id").unwrap_or_default(),
            status,
            result: doc.get("result").cloned().unwrap_or(Value::Null),
            traceback: s("traceback"),
            date_done: s("date_done"),
            children: doc
                .get("children")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            raw: doc,
        })
    }

    /// True for a final state (`SUCCESS`, `FAILURE`, `REVOKED`).
    ///
    /// ```
    /// let r = kelp::celery::TaskResult::from_json(serde_json::json!({"status": "RETRY"})).unwrap();
    /// assert!(!r.is_ready());
    /// ```
    pub fn is_ready(&self) -> bool {
        matches!(self.status.as_str(), "SUCCESS" | "FAILURE" | "REVOKED")
    }

    /// True if the task returned normally.
    ///
    /// ```
    /// let r = kelp::celery::TaskResult::from_json(serde_json::json!({"status": "SUCCESS"})).unwrap();
    /// assert!(r.is_success());
    /// ```
    pub fn is_success(&self) -> bool {
        self.status == "SUCCESS"
    }
}

/// Wait up to `timeout` for task `id`'s final result in Celery's Redis result backend at
/// `url` (key `celery-task-meta-<id>`, polled every 50 ms).
///
/// ```no_run
/// # async fn demo() -> Result<(), kelp::celery::CeleryError> {
/// let r = kelp::celery::result_from_redis(
///     "redis://127.0.0.1:6379/1",
///     "d6b0a6c2-4b1e-4a53-9bb4-2c1f0c0f1e11",
///     std::time::Duration::from_secs(10),
/// ).await?;
/// println!("{} → {}", r.status, r.result);
/// # Ok(()) }
/// ```
pub async fn result_from_redis(
    url: &str,
    id: &str,
    timeout: Duration,
) -> Result<TaskResult, CeleryError> {
    let backend = |e: redis::RedisError| CeleryError::Backend(e.to_string());
    let deadline = Instant::now() + timeout;
    let client = redis::Client::open(url).map_err(backend)?;
    let mut conn = tokio::time::timeout(timeout, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| {
            CeleryError::Backend(format!(
                "cannot connect to the result backend within {timeout:?}"
            ))
        })?
        .map_err(backend)?;
    let key = format!("celery-task-meta-{id}");
    loop {
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        if let Some(raw) = raw {
            let doc: Value = serde_json::from_slice(&raw)
                .map_err(|e| CeleryError::Backend(format!("{key} is not JSON: {e}")))?;
            let r = TaskResult::from_json(doc)?;
            if r.is_ready() {
                return Ok(r);
            }
        }
        if Instant::now() >= deadline {
            return Err(CeleryError::Timeout {
                id: id.to_owned(),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- helpers -----------------------------------------------------------------------------------

/// `gen<pid>@<hostname>`, Celery's `anon_nodename()`.
fn origin() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("gen{}@{host}", std::process::id())
}

/// `at` as Python's `datetime.isoformat()` of an aware UTC datetime.
fn iso8601(at: SystemTime) -> String {
    let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let micros = d.subsec_micros();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if micros == 0 {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}+00:00")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{micros:06}+00:00")
    }
}

fn py_repr_max(v: &Value) -> String {
    let mut s = String::new();
    py_repr(v, &mut s);
    if s.chars().count() > REPR_MAX {
        let cut: String = s.chars().take(REPR_MAX - 3).collect();
        return cut + "...";
    }
    s
}

/// A Python `repr()` of a JSON value (lists as lists, `None`/`True`/`False`).
fn py_repr(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (None, Some(u), _) => out.push_str(&u.to_string()),
            (None, None, Some(f)) => out.push_str(&py_float(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => py_str(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_str(k, out);
                out.push_str(": ");
                py_repr(x, out);
            }
            out.push('}');
        }
    }
}

fn py_float(f: f64) -> String {
    if f.is_finite() && f == f.trunc() && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

fn py_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

fn json_to_field(v: &Value) -> FieldValue {
    match v {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => FieldValue::I64(i),
            (None, Some(f)) => FieldValue::F64(f),
            (None, None) => FieldValue::LongString(Bytes::from(n.to_string())),
        },
        Value::String(s) => FieldValue::LongString(Bytes::from(s.clone())),
        Value::Array(a) => FieldValue::Array(a.iter().map(json_to_field).collect()),
        Value::Object(o) => {
            let mut t = FieldTable::new();
            for (k, x) in o {
                t.insert(k.as_str(), json_to_field(x));
            }
            FieldValue::Table(t)
        }
    }
}

fn field_to_json(v: &FieldValue) -> Value {
    match v {
        FieldValue::Bool(b) => Value::Bool(*b),
        FieldValue::F32(f) => json!(f),
        FieldValue::F64(f) => json!(f),
        FieldValue::Decimal(d) => json!(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        FieldValue::LongString(b) | FieldValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b).into_owned())
        }
        FieldValue::Array(a) => Value::Array(a.iter().map(field_to_json).collect()),
        FieldValue::Table(t) => table_to_json(t),
        FieldValue::Void => Value::Null,
        other => other.as_i64().map_or(Value::Null, |n| json!(n)),
    }
}

fn table_to_json(t: &FieldTable) -> Value {
    Value::Object(
        t.iter()
            .map(|(k, v)| (k.as_str().to_owned(), field_to_json(v)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_match_as_task_v2() {
        let t = TaskMessage::new("tasks.add")
            .id("38ed43e3-ef40-4c1e-85a2-c0ee00ed8ab1")
            .arg(1)
            .arg("\u{e9}")
            .kwarg("z", 1.5)
            .origin("gen4302@vm");
        let h = t.headers_json();
        let keys: Vec<&str> = h.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected = vec![
            "lang",
            "task",
            "id",
            "shadow",
            "eta",
            "expires",
            "group",
            "group_index",
            "retries",
            "timelimit",
            "root_id",
            "parent_id",
            "argsrepr",
            "kwargsrepr",
            "origin",
            "ignore_result",
            "replaced_task_nesting",
            "stamped_headers",
            "stamps",
        ];
        let mut got = keys.clone();
        got.sort_unstable();
        expected.sort_unstable();
        assert_eq!(got, expected);
        // What Celery 5.7 wrote for the same call (seen on Redis).
        assert_eq!(h["argsrepr"], json!("[1, '\u{e9}']"));
        assert_eq!(h["kwargsrepr"], json!("{'z': 1.5}"));
        assert_eq!(h["root_id"], json!("38ed43e3-ef40-4c1e-85a2-c0ee00ed8ab1"));
        assert_eq!(h["timelimit"], json!([null, null]));
        assert_eq!(h["stamps"], json!({}));
        assert_eq!(h["stamped_headers"], Value::Null);
        let back = TaskMessage::from_json(&h, &t.body()).unwrap();
        assert_eq!(back.root_id.as_deref(), Some(t.id.as_str()));
        assert_eq!(back.args, t.args);
        assert_eq!(back.kwargs, t.kwargs);
        assert_eq!(back.argsrepr.as_deref(), Some("[1, '\u{e9}']"));
    }

    #[test]
    fn field_table_round_trip() {
        let t = TaskMessage::new("t")
            .time_limit(Some(10.0), None)
            .stamp("a", 1);
        let table = t.headers();
        assert!(matches!(table.get("eta"), Some(FieldValue::Void)));
        assert_eq!(table_to_json(&table), t.headers_json());
    }

    #[test]
    fn reprs() {
        let mut s = String::new();
        py_repr(
            &json!([null, true, false, 2.0, 0.5, "it's", "a\"b", "x\ny", {"k": [1]}]),
            &mut s,
        );
        assert_eq!(
            s,
            r#"[None, True, False, 2.0, 0.5, "it's", 'a"b', 'x\ny', {'k': [1]}]"#
        );
        let long = json!(["x".repeat(2000)]);
        assert_eq!(py_repr_max(&long).chars().count(), REPR_MAX);
    }

    #[test]
    fn iso_dates() {
        let at = UNIX_EPOCH + Duration::from_secs(1_709_210_096) + Duration::from_micros(42);
        assert_eq!(iso8601(at), "2024-02-29T12:34:56.000042+00:00");
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00+00:00");
    }

    #[test]
    fn typed_errors() {
        let embed = json!({});
        let ok = |h: Value| TaskMessage::from_json(&h, &json!([[], {}, embed]));
        assert!(matches!(
            ok(json!({"task": 1, "id": "i"})),
            Err(CeleryError::Malformed(_))
        ));
        assert!(matches!(
            ok(json!({"task": "t"})),
            Err(CeleryError::Malformed(_))
        ));
        assert!(matches!(
            ok(json!({"task": "t", "id": "i", "retries": -1})),
            Err(CeleryError::Malformed(_))
        ));
        assert!(matches!(
            ok(json!({"task": "t", "id": "i", "timelimit": [1]})),
            Err(CeleryError::Malformed(_))
        ));
        assert!(matches!(ok(json!([])), Err(CeleryError::Malformed(_))));
        assert!(matches!(
            TaskMessage::from_json(&json!({"task": "t", "id": "i"}), &json!([{}, {}, {}])),
            Err(CeleryError::Malformed(_))
        ));
        assert!(matches!(
            TaskMessage::from_json(&json!({"task": "t", "id": "i"}), &json!([[], [], {}])),
            Err(CeleryError::Malformed(_))
        ));
        assert!(ok(json!({"task": "t", "id": "i"})).is_ok());
    }
}
