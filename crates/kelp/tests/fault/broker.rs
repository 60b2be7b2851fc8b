//! RabbitMQ fault and inspection helpers for the local broker (127.0.0.1:5672), through the
//! `rabbitmqctl` CLI. Each `rabbitmqctl` call takes ~0.6 s; the `list_*` functions see vhost
//! "/" only. All functions here block (call them from `spawn_blocking` if the runtime must keep
//! running meanwhile), except the `async` ones.
//!
//! Argument tables are printed by `rabbitmqctl --formatter json` as `[[key, type, value], …]`
//! (nested tables likewise; an `array` value prints as an object keyed by element type, which
//! loses repeats). [`normalise_arguments`] turns that into compact JSON with sorted keys and no
//! type tags, e.g. `{"x-max-length":10,"x-queue-type":"classic"}`; no arguments give `{}`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// The broker's AMQP address.
pub const RABBIT_ADDR: &str = "127.0.0.1:5672";

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5672))
}

/// The AMQP port accepts a TCP connection within 1 s.
pub fn rabbit_up() -> bool {
    TcpStream::connect_timeout(&addr(), Duration::from_secs(1)).is_ok()
}

/// The broker answers an AMQP 0-9-1 protocol header with a `connection.start` frame (within
/// 1 s): the application is running and accepting clients, not just the port open.
pub fn amqp_probe() -> bool {
    let probe = || -> io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr(), Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.write_all(b"AMQP\x00\x00\x09\x01")?;
        let mut head = [0u8; 11]; // frame type, channel, size, class id, method id
        s.read_exact(&mut head)?;
        Ok(head[0] == 1 && head[7..11] == [0, 10, 0, 10])
    };
    probe().unwrap_or(false)
}

/// Wait until [`amqp_probe`] succeeds (polled every 100 ms); `false` on timeout.
pub async fn wait_rabbit_up(timeout: Duration) -> bool {
    let wait = tokio::task::spawn_blocking(move || wait_rabbit_up_blocking(timeout));
    wait.await.unwrap_or(false)
}

/// Blocking [`wait_rabbit_up`].
pub fn wait_rabbit_up_blocking(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !amqp_probe() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Runs `rabbitmqctl args…`; its stdout, or an error carrying its output.
pub fn rabbitmqctl(args: &[&str]) -> io::Result<String> {
    let out = Command::new("rabbitmqctl").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "rabbitmqctl {}: {}: {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim(),
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `rabbitmqctl -q --formatter json <command line>` as a list of JSON objects.
fn list_json(command_line: &str) -> io::Result<Vec<Map<String, Value>>> {
    let mut args = vec!["-q", "--formatter", "json"];
    args.extend(command_line.split_whitespace());
    let text = rabbitmqctl(&args)?;
    let start = text.find('[').unwrap_or(text.len());
    let rows: Vec<Value> = serde_json::from_str(text[start..].trim())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {text}")))?;
    Ok(rows
        .into_iter()
        .filter_map(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .collect())
}

fn text(row: &Map<String, Value>, key: &str) -> String {
    match row.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn flag(row: &Map<String, Value>, key: &str) -> bool {
    row.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn count(row: &Map<String, Value>, key: &str) -> u64 {
    row.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// An argument table as rabbitmqctl prints it (`[[key, type, value], …]`, nested tables
/// likewise) turned into a JSON object without type tags; anything else is returned as is.
fn untyped(v: &Value) -> Value {
    let Some(entries) = v.as_array() else {
        return v.clone();
    };
    let mut out = Map::new();
    for e in entries {
        let Some([Value::String(k), Value::String(ty), val]) = e.as_array().map(Vec::as_slice)
        else {
            return v.clone();
        };
        let val = if ty == "table" {
            untyped(val)
        } else {
            val.clone()
        };
        out.insert(k.clone(), val);
    }
    Value::Object(out)
}

/// `v` with the keys of every object sorted (whatever serde_json's map ordering).
fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut kv: Vec<(String, Value)> =
                m.iter().map(|(k, v)| (k.clone(), sorted(v))).collect();
            kv.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(kv.into_iter().collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// A stable string for an argument table printed by `rabbitmqctl --formatter json`: compact
/// JSON, sorted keys, no type tags. `[]` gives `{}`.
pub fn normalise_arguments(v: &Value) -> String {
    sorted(&untyped(v)).to_string()
}

fn args_of(row: &Map<String, Value>, key: &str) -> String {
    normalise_arguments(row.get(key).unwrap_or(&Value::Array(Vec::new())))
}

/// Close every client connection on the node (`close_all_connections --global`).
pub fn close_all_connections(reason: &str) -> io::Result<()> {
    rabbitmqctl(&["close_all_connections", "--global", reason]).map(drop)
}

/// Close the connections whose client-provided `connection_name` contains `name_substring`;
/// how many were closed. One `rabbitmqctl eval` (the JSON formatter prints pids in a form
/// `close_connection` does not accept).
pub fn close_connections_named(name_substring: &str) -> io::Result<usize> {
    // The name as a byte list: no quoting issues whatever it contains.
    let bytes: Vec<String> = name_substring.bytes().map(|b| b.to_string()).collect();
    let code = format!(
        "N = list_to_binary([{}]), \
         Cs = [P || P <- rabbit_networking:connections(), \
           case catch rabbit_networking:connection_info(P, [client_properties]) of \
             [{{client_properties, Props}}] -> \
               case lists:keyfind(<<\"connection_name\">>, 1, Props) of \
                 {{_, longstr, V}} -> binary:match(V, N) =/= nomatch; _ -> false end; \
             _ -> false end], \
         [rabbit_networking:close_connection(P, \"fault injection\") || P <- Cs], \
         length(Cs).",
        bytes.join(",")
    );
    let out = rabbitmqctl(&["eval", &code])?;
    out.trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {out}")))
}

/// The `connection_name` of every client connection (empty for connections without one).
pub fn list_connection_names() -> io::Result<Vec<String>> {
    Ok(list_json("list_connections client_properties")?
        .iter()
        .map(|row| {
            let props = untyped(row.get("client_properties").unwrap_or(&Value::Null));
            let name = props.get("connection_name").and_then(Value::as_str);
            name.unwrap_or_default().to_owned()
        })
        .collect())
}

/// One restart at a time in this process: `true` while a [`BrokerRestart`] is live.
static RESTARTING: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// Guard of a stopped broker application (`rabbitmqctl stop_app`): [`start`](Self::start) or
/// `Drop` (even during a panic) runs `start_app` and waits until AMQP answers (≤ 60 s). A
/// second `stop()` in the same process waits until the first guard is started.
#[derive(Debug)]
pub struct BrokerRestart {
    started: bool,
}

impl BrokerRestart {
    /// `rabbitmqctl stop_app` (every client connection drops; the port closes).
    pub fn stop() -> io::Result<BrokerRestart> {
        let (lock, cvar) = &RESTARTING;
        let mut busy = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *busy {
            busy = cvar.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy = true;
        drop(busy);
        // From here on, Drop restarts the app and releases the lock, also if stop_app fails.
        let guard = BrokerRestart { started: false };
        rabbitmqctl(&["stop_app"])?;
        Ok(guard)
    }

    /// `rabbitmqctl start_app`, then wait until AMQP answers.
    pub fn start(mut self) -> io::Result<()> {
        self.started = true;
        start_app_and_wait() // then Drop releases the lock
    }

    /// [`stop`](Self::stop) on the blocking pool.
    pub async fn stop_async() -> io::Result<BrokerRestart> {
        tokio::task::spawn_blocking(Self::stop)
            .await
            .map_err(io::Error::other)?
    }

    /// [`start`](Self::start) on the blocking pool.
    pub async fn start_async(self) -> io::Result<()> {
        tokio::task::spawn_blocking(move || self.start())
            .await
            .map_err(io::Error::other)?
    }
}

impl Drop for BrokerRestart {
    fn drop(&mut self) {
        if !self.started {
            if let Err(e) = start_app_and_wait() {
                eprintln!("BrokerRestart: could not restart RabbitMQ: {e}");
            }
        }
        let (lock, cvar) = &RESTARTING;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = false;
        cvar.notify_all();
    }
}

fn start_app_and_wait() -> io::Result<()> {
    rabbitmqctl(&["start_app"])?;
    wait_up_60s()
}

fn wait_up_60s() -> io::Result<()> {
    match wait_rabbit_up_blocking(Duration::from_secs(60)) {
        true => Ok(()),
        false => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "RabbitMQ down after 60 s",
        )),
    }
}

/// Make sure RabbitMQ answers AMQP: `start_app` if the node runs without the app,
/// `rabbitmq-server -detached` if the node is down; waits up to 60 s.
pub fn ensure_rabbit_running() -> io::Result<()> {
    if amqp_probe() {
        return Ok(());
    }
    if rabbitmqctl(&["ping"]).is_ok() {
        // The app may be mid-start (then start_app fails or no-ops); waiting decides.
        let _ = rabbitmqctl(&["start_app"]);
    } else {
        let null = std::process::Stdio::null;
        let mut server = Command::new("rabbitmq-server");
        server
            .arg("-detached")
            .stdin(null())
            .stdout(null())
            .stderr(null());
        server.status()?;
        let _ = rabbitmqctl(&["-t", "60", "await_startup"]);
    }
    wait_up_60s()
}

/// One row of `list_bindings` (the source is always an exchange; `""` is the default one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub source: String,
    pub destination: String,
    /// `queue` or `exchange`.
    pub destination_kind: String,
    pub routing_key: String,
    /// See [`normalise_arguments`].
    pub arguments: String,
}

/// Every binding of vhost "/", the default exchange's implicit ones included.
pub fn list_bindings() -> io::Result<Vec<Binding>> {
    let cols = "source_name destination_name destination_kind routing_key arguments";
    Ok(list_json(&format!("list_bindings {cols}"))?
        .iter()
        .map(|r| Binding {
            source: text(r, "source_name"),
            destination: text(r, "destination_name"),
            destination_kind: text(r, "destination_kind"),
            routing_key: text(r, "routing_key"),
            arguments: args_of(r, "arguments"),
        })
        .collect())
}

/// One row of `list_queues`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    pub name: String,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    /// See [`normalise_arguments`].
    pub arguments: String,
    pub messages: u64,
    pub consumers: u64,
}

/// Every queue of vhost "/".
pub fn list_queues() -> io::Result<Vec<QueueInfo>> {
    let cols = "name durable exclusive auto_delete arguments messages consumers";
    Ok(list_json(&format!("list_queues {cols}"))?
        .iter()
        .map(|r| QueueInfo {
            name: text(r, "name"),
            durable: flag(r, "durable"),
            exclusive: flag(r, "exclusive"),
            auto_delete: flag(r, "auto_delete"),
            arguments: args_of(r, "arguments"),
            messages: count(r, "messages"),
            consumers: count(r, "consumers"),
        })
        .collect())
}

/// One row of `list_consumers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    pub queue: String,
    pub tag: String,
    pub ack_required: bool,
    pub prefetch_count: u64,
    /// See [`normalise_arguments`].
    pub arguments: String,
    /// The channel's Erlang pid without its node part, e.g. `<1234.0>` (the JSON formatter
    /// prints `#PID<12576.1234.0>`, whose first number varies between calls).
    pub channel_pid: String,
}

/// `#PID<node.id.serial>` → `<id.serial>`; anything else unchanged.
fn local_pid(pid: &str) -> String {
    let inner = pid.strip_prefix("#PID<").and_then(|p| p.strip_suffix('>'));
    match inner.and_then(|p| p.split_once('.')) {
        Some((_, local)) => format!("<{local}>"),
        None => pid.to_owned(),
    }
}

/// Every consumer in vhost "/".
pub fn list_consumers() -> io::Result<Vec<ConsumerInfo>> {
    let cols = "queue_name consumer_tag ack_required prefetch_count arguments channel_pid";
    Ok(list_json(&format!("list_consumers {cols}"))?
        .iter()
        .map(|r| ConsumerInfo {
            queue: text(r, "queue_name"),
            tag: text(r, "consumer_tag"),
            ack_required: flag(r, "ack_required"),
            prefetch_count: count(r, "prefetch_count"),
            arguments: args_of(r, "arguments"),
            channel_pid: local_pid(&text(r, "channel_pid")),
        })
        .collect())
}

/// `(name, type, durable, auto_delete, arguments)`: one row of [`list_exchanges`].
pub type ExchangeRow = (String, String, bool, bool, String);

/// Every exchange of vhost "/" as `(name, type, durable, auto_delete, arguments)`; the default
/// exchange is `""`. `arguments`: see [`normalise_arguments`].
pub fn list_exchanges() -> io::Result<Vec<ExchangeRow>> {
    Ok(
        list_json("list_exchanges name type durable auto_delete arguments")?
            .iter()
            .map(|r| {
                (
                    text(r, "name"),
                    text(r, "type"),
                    flag(r, "durable"),
                    flag(r, "auto_delete"),
                    args_of(r, "arguments"),
                )
            })
            .collect(),
    )
}
