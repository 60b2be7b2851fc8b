//! The `redis-publish` and `redis-consume` scenarios: kelp's `redis://` transport against
//! Python Kombu's Redis transport, measured in the same run, beside `redis-benchmark`'s
//! LPUSH/RPOP rate as the physical limit.
//!
//! - kelp publishes `count` raw 100-byte bodies with a Producer to the default exchange of a
//!   fresh queue, [`WINDOW`] publishes in flight on the one multiplexed connection (the
//!   headline), and again one at a time (each awaits its LPUSH reply); timed until the last
//!   reply, when Redis holds all of them;
//! - kelp consumes a prefilled queue (filled by kelp's Producer, untimed) with prefetch
//!   [`PREFETCH`], acking each message before taking the next; timed from building the
//!   Consumer to the last ack;
//! - Kombu does the same in `python/kombu_redis_bench.py` (one process per run, timing each
//!   phase itself: the interpreter's start-up is not counted);
//! - `redis-benchmark -t lpush,rpop -n N -d 100 -q` (50 clients, one command each in flight).
//!
//! CPU is each client process's own (`getrusage` here, `time.process_time` in Python), never
//! Redis's. After each kelp timed section, `INFO commandstats` (through `redis-cli`, when it
//! is there) shows the Redis commands kelp sent per message and the server time they took.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use kelp::{Connection, Producer, Queue};

use crate::common::{
    ack_each, expect_body_bytes, expect_size, json_number, json_phase, json_string, publish_all,
    python_with, queue_consumer, ratio_goal_note, repeat_runs, run_script, DEFAULT_PYTHON,
};
use crate::report::{format_line, format_ratio, Measurement, Timer};
use crate::{fresh_queue_name, BenchResult, MSG_SIZE};

/// The Redis server when `--url` is not a `redis://` URL.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// Consumer prefetch, for kelp and Kombu.
pub const PREFETCH: u16 = 100;
/// Publishes in flight in kelp's pipelined publish.
pub const WINDOW: usize = 64;
/// The headline goal: kelp at least this many times Kombu's msg/s.
const GOAL: f64 = 10.0;
/// Bounds the Kombu run's consume loop (seconds).
const KOMBU_TIMEOUT_SECS: u64 = 600;

/// Which half of the work a scenario measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Publish,
    Consume,
}

impl Phase {
    fn scenario(self) -> &'static str {
        match self {
            Self::Publish => "redis-publish",
            Self::Consume => "redis-consume",
        }
    }
}

/// `url` if it names a Redis server, else [`DEFAULT_REDIS_URL`] (the bench's default `--url`
/// is RabbitMQ's).
pub fn redis_url(url: &str) -> String {
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        url.to_owned()
    } else {
        DEFAULT_REDIS_URL.to_owned()
    }
}

/// Delete `queue`; if that fails, purge it (its list is then gone: Redis drops empty lists).
///
/// The delete scans every `_kombu.binding*` key and reads each as a set, so it fails with
/// WRONGTYPE while Kombu 5.7's `_kombu.binding_deadlines` (a sorted set) exists on the same
/// database; the bench's queue has no bindings, so purging it leaves nothing behind.
async fn remove_queue(ch: &kelp::Channel, queue: &str) -> BenchResult<()> {
    if let Err(e) = Queue::new(queue).delete(ch, false, false).await {
        eprintln!("kelp-bench: deleting {queue} failed ({e}); purging it instead");
        Queue::new(queue).purge(ch).await?;
    }
    Ok(())
}

/// Redis command calls and server µs, per command, from `INFO commandstats`.
type CommandStats = BTreeMap<String, (u64, u64)>;

/// `INFO commandstats` through `redis-cli`, or `None` if that is not possible.
fn command_stats(url: &str) -> Option<CommandStats> {
    let out = Command::new("redis-cli")
        .args(["-u", url, "INFO", "commandstats"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut stats = CommandStats::new();
    for line in text.lines() {
        // cmdstat_lpush:calls=100000,usec=51234,usec_per_call=0.51,...
        let Some((name, fields)) = line.trim().split_once(':') else {
            continue;
        };
        let Some(name) = name.strip_prefix("cmdstat_") else {
            continue;
        };
        let field = |key: &str| {
            fields
                .split(',')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
        };
        if let (Some(calls), Some(usec)) = (field("calls"), field("usec")) {
            stats.insert(name.to_owned(), (calls, usec));
        }
    }
    Some(stats)
}

/// `<scenario> kelp redis calls/msg: lpush 1.000  (server 1.23 µs/msg)`: the commands a timed
/// section sent, from two `INFO commandstats` snapshots.
fn format_calls(
    scenario: &str,
    who: &str,
    before: &CommandStats,
    after: &CommandStats,
    count: u64,
) -> String {
    let per = |n: u64| n as f64 / count.max(1) as f64;
    let mut parts = Vec::new();
    let mut server_usec = 0u64;
    for (name, &(calls, usec)) in after {
        let (calls0, usec0) = before.get(name).copied().unwrap_or((0, 0));
        let calls = calls.saturating_sub(calls0);
        // Commands seen less than once per 1000 messages are the bench's own (declare, INFO);
        // batched ones (a take per window, an ack write per batch) are a few per 1000.
        if per(calls) >= 0.001 {
            parts.push(format!("{name} {:.3}", per(calls)));
            server_usec += usec.saturating_sub(usec0);
        }
    }
    format!(
        "{scenario} {who} redis calls/msg: {}  (server {:.2} µs/msg)",
        parts.join(", "),
        per(server_usec)
    )
}

/// What a kelp timed section produced: the measurement and its command line, if any.
#[derive(Debug)]
struct KelpRun {
    m: Measurement,
    calls: Option<String>,
}

/// A kelp run's measurement with the commands it sent since the `before` snapshot.
fn with_stats(
    url: &str,
    scenario: &str,
    who: &str,
    count: u64,
    m: Measurement,
    before: Option<CommandStats>,
) -> KelpRun {
    let calls = before
        .zip(command_stats(url))
        .map(|(b, a)| format_calls(scenario, who, &b, &a, count));
    KelpRun { m, calls }
}

/// kelp's publish: `count` bodies to a fresh queue, `window` in flight.
async fn kelp_publish(url: &str, count: u64, window: usize, who: &str) -> BenchResult<KelpRun> {
    let conn = Connection::open(url).await?;
    let ch = conn.channel().await?;
    let queue = fresh_queue_name("kelp", "redis-publish");
    ch.declare_queue(Queue::new(queue.as_str())).await?;
    let producer = Producer::new(&ch).routing_key(queue.as_str());
    let before = command_stats(url);
    let timer = Timer::start()?;
    publish_all(&producer, count, window).await?;
    let m = timer.stop(count)?;
    let run = with_stats(url, "redis-publish", who, count, m, before);
    expect_size(&ch, &queue, count).await?;
    remove_queue(&ch, &queue).await?;
    conn.close().await?;
    Ok(run)
}

/// kelp's consume: prefill (untimed, pipelined), then a Consumer with prefetch [`PREFETCH`]
/// acks each message.
async fn kelp_consume(url: &str, count: u64) -> BenchResult<KelpRun> {
    let conn = Connection::open(url).await?;
    let ch = conn.channel().await?;
    let queue = fresh_queue_name("kelp", "redis-consume");
    ch.declare_queue(Queue::new(queue.as_str())).await?;
    let producer = Producer::new(&ch).routing_key(queue.as_str());
    publish_all(&producer, count, WINDOW).await?;
    expect_size(&ch, &queue, count).await?;
    let cch = conn.channel().await?;
    let before = command_stats(url);
    let timer = Timer::start()?;
    let mut consumer = queue_consumer(&cch, &queue, PREFETCH).await?;
    let bytes = ack_each(&mut consumer, count, "kelp redis").await?;
    let m = timer.stop(count)?;
    let run = with_stats(url, "redis-consume", "kelp", count, m, before);
    expect_body_bytes("kelp redis", bytes, count)?;
    consumer.cancel().await?;
    remove_queue(&ch, &queue).await?;
    conn.close().await?;
    Ok(run)
}

/// Best (highest msg/s) of `repeat` kelp runs; the command line of the first.
fn kelp_best<F, Fut>(
    rt: &tokio::runtime::Runtime,
    repeat: usize,
    timeout: Duration,
    f: F,
) -> BenchResult<KelpRun>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = BenchResult<KelpRun>>,
{
    let runs = repeat_runs(rt, repeat, timeout, f)?;
    let calls = runs.iter().find_map(|run| run.calls.clone());
    let m = Measurement::best(runs.into_iter().map(|run| run.m).collect()).ok_or("no runs")?;
    Ok(KelpRun { m, calls })
}

/// One Kombu run's figures (the consume ones only for phase `both`).
#[derive(Debug, Clone, PartialEq)]
struct KombuRun {
    version: String,
    publish: Measurement,
    consume: Option<Measurement>,
}

fn parse_kombu(json: &str) -> BenchResult<KombuRun> {
    json_number(json, "count").ok_or("no count")?;
    let phase = |wall: &str, cpu: &str| json_phase(json, wall, cpu);
    Ok(KombuRun {
        version: json_string(json, "kombu").unwrap_or_else(|| "?".into()),
        publish: phase("publish_s", "publish_cpu_s").ok_or("no publish figures")?,
        consume: phase("consume_s", "consume_cpu_s"),
    })
}

/// One Kombu run in a child Python process (`python/kombu_redis_bench.py`).
fn kombu_run(python: &str, url: &str, count: u64, phase: Phase) -> BenchResult<KombuRun> {
    let (count, prefetch) = (count.to_string(), PREFETCH.to_string());
    let (size, timeout) = (MSG_SIZE.to_string(), KOMBU_TIMEOUT_SECS.to_string());
    let phase = match phase {
        Phase::Publish => "publish",
        Phase::Consume => "both",
    };
    let args = [
        ("--url", url),
        ("--count", &count),
        ("--prefetch", &prefetch),
        ("--size", &size),
        ("--timeout", &timeout),
        ("--phase", phase),
    ];
    run_script("kombu", python, "kombu_redis_bench.py", &args, parse_kombu)
}

/// Kombu's figure for `phase`, best of `repeat`, with its version; or why not.
fn kombu_best(url: &str, count: u64, phase: Phase, repeat: usize) -> BenchResult<KombuResult> {
    let Ok(python) = python_with("kombu, redis") else {
        return Ok(KombuResult::Skipped(format!(
            "kombu: skipped (no Python with kombu: set KELP_PYTHON or install kombu in \
             {DEFAULT_PYTHON})"
        )));
    };
    let mut runs = Vec::with_capacity(repeat);
    let mut version = String::new();
    for _ in 0..repeat {
        let run = kombu_run(&python, url, count, phase)?;
        version = run.version;
        let m = match phase {
            Phase::Publish => Some(run.publish),
            Phase::Consume => run.consume,
        };
        runs.push(m.ok_or("kombu: no consume figures")?);
    }
    let m = Measurement::best(runs).ok_or("no runs")?;
    Ok(KombuResult::Done { version, m })
}

#[derive(Debug)]
enum KombuResult {
    Done { version: String, m: Measurement },
    Skipped(String),
}

/// `LPUSH` and `RPOP` requests per second from `redis-benchmark -q` output (progress lines
/// end in `\r`, the results in `\n`).
fn parse_redis_benchmark(out: &str) -> Option<(f64, f64)> {
    let rate = |cmd: &str| {
        out.split(['\r', '\n']).find_map(|line| {
            let rest = line.trim().strip_prefix(cmd)?.strip_prefix(':')?;
            let (n, _) = rest.trim().split_once(" requests per second")?;
            n.trim().parse::<f64>().ok()
        })
    };
    Some((rate("LPUSH")?, rate("RPOP")?))
}

/// The `redis-benchmark` reference line.
fn redis_benchmark(scenario: &str, url: &str, count: u64) -> String {
    let n = count.to_string();
    let size = MSG_SIZE.to_string();
    let args = ["-t", "lpush,rpop", "-n", &n, "-d", &size, "-q"];
    let out = match Command::new("redis-benchmark")
        .args(["-u", url])
        .args(args)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return format!(
                "{scenario} redis-benchmark: not found (install redis-tools for the \
                 physical-limit reference)"
            )
        }
        Err(e) => return format!("{scenario} redis-benchmark: could not run it: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    match parse_redis_benchmark(&text) {
        Some((lpush, rpop)) => format!(
            "{scenario} redis-benchmark  LPUSH {lpush:.0} ops/s, RPOP {rpop:.0} ops/s  \
             (`redis-benchmark {}`: 50 clients, one command each in flight; the server's rate \
             for one-command messages)",
            args.join(" ")
        ),
        None => format!(
            "{scenario} redis-benchmark: no LPUSH/RPOP figures ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// `redis-publish` or `redis-consume`: kelp, Kombu and redis-benchmark, then the ratios.
pub fn run(
    rt: &tokio::runtime::Runtime,
    phase: Phase,
    url: &str,
    count: u64,
    repeat: usize,
    timeout: Duration,
) -> BenchResult<()> {
    let scenario = phase.scenario();
    let line = |who: &str, m: &Measurement, what: &str| {
        println!("{}  {what}", format_line(scenario, who, m));
    };
    let mut kelp_lines: Vec<(&str, Measurement)> = Vec::new();
    match phase {
        Phase::Publish => {
            let piped = kelp_best(rt, repeat, timeout, || {
                kelp_publish(url, count, WINDOW, "kelp")
            })?;
            let seq = kelp_best(rt, repeat, timeout, || {
                kelp_publish(url, count, 1, "kelp-seq")
            })?;
            line(
                "kelp",
                &piped.m,
                &format!("Producer.publish, {WINDOW} in flight on one multiplexed connection"),
            );
            line(
                "kelp-seq",
                &seq.m,
                "Producer.publish, one at a time (each awaits its LPUSH reply)",
            );
            for calls in [&piped.calls, &seq.calls].into_iter().flatten() {
                println!("{calls}");
            }
            kelp_lines.push(("kelp", piped.m));
            kelp_lines.push(("kelp-seq", seq.m));
        }
        Phase::Consume => {
            let run = kelp_best(rt, repeat, timeout, || kelp_consume(url, count))?;
            line(
                "kelp",
                &run.m,
                &format!("Consumer, prefetch {PREFETCH}, each message acked before the next"),
            );
            if let Some(calls) = &run.calls {
                println!("{calls}");
            }
            kelp_lines.push(("kelp", run.m));
        }
    }
    match kombu_best(url, count, phase, repeat)? {
        KombuResult::Done { version, m } => {
            let what = match phase {
                Phase::Publish => format!("Kombu {version} Producer.publish, one at a time"),
                Phase::Consume => format!(
                    "Kombu {version} Consumer, prefetch {PREFETCH}, ack in the callback, \
                     drain_events"
                ),
            };
            line("kombu", &m, &what);
            for (who, k) in &kelp_lines {
                println!(
                    "{}{}",
                    format_ratio(who, k, "kombu", &m),
                    ratio_goal_note(k, &m, GOAL, "msgs/s")
                );
            }
        }
        KombuResult::Skipped(why) => println!("{why}"),
    }
    println!("{}", redis_benchmark(scenario, url, count));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kombu_json() -> BenchResult<()> {
        let run = parse_kombu(
            r#"{"kombu": "5.7.0", "count": 20000, "publish_per_s": 5806.3, "publish_s": 2.0, "publish_cpu_s": 1.5, "consume_per_s": null, "consume_s": null, "consume_cpu_s": null}"#,
        )?;
        assert_eq!(run.version, "5.7.0");
        assert_eq!(run.publish.msgs, 20000);
        assert_eq!(run.publish.wall, Duration::from_secs(2));
        assert_eq!(run.publish.cpu, Duration::from_millis(1500));
        assert_eq!(run.consume, None);
        let both = parse_kombu(
            r#"{"kombu": "5.7.0", "count": 10, "publish_s": 1, "publish_cpu_s": 1, "consume_s": 0.5, "consume_cpu_s": 0.25}"#,
        )?;
        assert_eq!(
            both.consume.map(|m| m.wall),
            Some(Duration::from_millis(500))
        );
        assert!(parse_kombu("{}").is_err());
        Ok(())
    }

    #[test]
    fn parses_redis_benchmark() {
        let out = "LPUSH: rps=0.0 (overall: 0.0) avg_msec=-nan (overall: -nan)\r   \r\
                   LPUSH: 94966.77 requests per second, p50=0.263 msec\n\
                   RPOP: rps=93000.0 (overall: 93000.0) avg_msec=0.3\r  \r\
                   RPOP: 93196.65 requests per second, p50=0.271 msec\n";
        assert_eq!(parse_redis_benchmark(out), Some((94966.77, 93196.65)));
        assert_eq!(parse_redis_benchmark("LPUSH: rps=1.0\r"), None);
    }

    #[test]
    fn command_stats_per_message() {
        let before = CommandStats::from([("lpush".into(), (10, 100)), ("info".into(), (3, 9))]);
        let after = CommandStats::from([
            ("lpush".into(), (10_010, 10_100)),
            ("info".into(), (4, 12)),
            ("llen".into(), (1, 1)),
            // Acks written in batches: a few calls per 1000 messages, still shown.
            ("hdel".into(), (20, 30)),
        ]);
        assert_eq!(
            format_calls("redis-publish", "kelp", &before, &after, 10_000),
            "redis-publish kelp redis calls/msg: hdel 0.002, lpush 1.000  (server 1.00 µs/msg)"
        );
    }

    #[test]
    fn redis_url_falls_back() {
        assert_eq!(redis_url("redis://h:1/2"), "redis://h:1/2");
        assert_eq!(redis_url("amqp://guest:guest@h/%2f"), DEFAULT_REDIS_URL);
    }
}
