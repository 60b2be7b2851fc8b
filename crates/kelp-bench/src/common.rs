//! Helpers the scenario modules share: runs under a timeout, kelp publish / consume loops and
//! queue checks, the comparison scripts' Python and their flat JSON lines, goal verdicts.
//!
//! The kelp and Python helpers serve only the scenarios that need the `kelp` feature, so they
//! are built with it.

use std::future::Future;
use std::time::Duration;

#[cfg(feature = "kelp")]
use std::{path::PathBuf, process::Command};

#[cfg(feature = "kelp")]
use futures_util::stream::{FuturesUnordered, StreamExt};
#[cfg(feature = "kelp")]
use kelp::{Consumer, Producer, PublishOptions, Queue};

use crate::BenchResult;
#[cfg(feature = "kelp")]
use crate::{MSG_SIZE, PAYLOAD};

/// `fut` to completion on `rt`, failing with "timed out after …" if it takes over `timeout`.
pub fn block_on_timeout<T>(
    rt: &tokio::runtime::Runtime,
    timeout: Duration,
    fut: impl Future<Output = BenchResult<T>>,
) -> BenchResult<T> {
    rt.block_on(async {
        match tokio::time::timeout(timeout, fut).await {
            Ok(out) => out,
            Err(_) => Err(format!("timed out after {timeout:?}").into()),
        }
    })
}

/// `repeat` runs of `f` one after the other, each under `timeout`; the first error ends them.
#[cfg(feature = "kelp")]
pub fn repeat_runs<T, F, Fut>(
    rt: &tokio::runtime::Runtime,
    repeat: usize,
    timeout: Duration,
    mut f: F,
) -> BenchResult<Vec<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = BenchResult<T>>,
{
    let mut runs = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        runs.push(block_on_timeout(rt, timeout, f())?);
    }
    Ok(runs)
}

/// `met` or `NOT met`, for the goal notes.
#[cfg(feature = "kelp")]
pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// `  (goal >= <goal>x <unit>: met)` (or `NOT met`): whether `ours` has at least `goal` times
/// the throughput of `theirs`.
#[cfg(feature = "kelp")]
pub fn ratio_goal_note(
    ours: &crate::report::Measurement,
    theirs: &crate::report::Measurement,
    goal: f64,
    unit: &str,
) -> String {
    let ratio = ours.msgs_per_sec() / theirs.msgs_per_sec().max(1e-9);
    format!("  (goal >= {goal:.0}x {unit}: {})", verdict(ratio >= goal))
}

/// Publish `count` bodies ([`PAYLOAD`]) with at most `window` publishes in flight.
#[cfg(feature = "kelp")]
pub async fn publish_all(producer: &Producer, count: u64, window: usize) -> BenchResult<()> {
    let mut in_flight = FuturesUnordered::new();
    for _ in 0..count {
        if in_flight.len() >= window {
            if let Some(done) = in_flight.next().await {
                done?;
            }
        }
        in_flight.push(producer.publish(&PAYLOAD[..], PublishOptions::default()));
    }
    while let Some(done) = in_flight.next().await {
        done?;
    }
    Ok(())
}

/// Messages in `queue` now (a passive declare).
#[cfg(feature = "kelp")]
pub async fn queue_size(ch: &kelp::Channel, queue: &str) -> BenchResult<u64> {
    Ok(u64::from(
        Queue::new(queue)
            .passive(true)
            .declare(ch)
            .await?
            .message_count,
    ))
}

/// Fails unless `queue` holds exactly `count` messages now.
#[cfg(feature = "kelp")]
pub async fn expect_size(ch: &kelp::Channel, queue: &str, count: u64) -> BenchResult<()> {
    let got = queue_size(ch, queue).await?;
    if got != count {
        return Err(format!("queue {queue} holds {got} messages, expected {count}").into());
    }
    Ok(())
}

/// A Consumer with `prefetch` on `queue`, which exists already (it is not declared).
#[cfg(feature = "kelp")]
pub async fn queue_consumer(
    ch: &kelp::Channel,
    queue: &str,
    prefetch: u16,
) -> BenchResult<Consumer> {
    Ok(Consumer::builder(ch)
        .queue(Queue::new(queue).no_declare(true))
        .prefetch_count(prefetch)
        .build()
        .await?)
}

/// Take `count` messages from `consumer`, acking each before taking the next; returns their
/// body bytes. `who` (`kelp redis`) starts the error if the consumer ends early.
#[cfg(feature = "kelp")]
pub async fn ack_each(consumer: &mut Consumer, count: u64, who: &str) -> BenchResult<usize> {
    let mut bytes = 0usize;
    for _ in 0..count {
        let mut msg = consumer
            .next()
            .await
            .ok_or_else(|| format!("{who}: consumer ended early"))??;
        bytes += msg.body().len();
        msg.ack().await?;
    }
    Ok(bytes)
}

/// Fails unless `bytes` is `count` bodies of [`MSG_SIZE`] bytes.
#[cfg(feature = "kelp")]
pub fn expect_body_bytes(who: &str, bytes: usize, count: u64) -> BenchResult<()> {
    if bytes as u64 != count * MSG_SIZE as u64 {
        return Err(format!("{who}: {bytes} body bytes for {count} messages").into());
    }
    Ok(())
}

/// Python for the comparison scripts when `$KELP_PYTHON` is not set.
#[cfg(feature = "kelp")]
pub const DEFAULT_PYTHON: &str = "/work/pyenv/bin/python";

/// `$KELP_PYTHON`, else [`DEFAULT_PYTHON`]: `Ok` if it can `import <modules>` (`"kombu,
/// redis"`), else `Err` with it.
#[cfg(feature = "kelp")]
pub fn python_with(modules: &str) -> Result<String, String> {
    let python = std::env::var("KELP_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PYTHON.to_owned());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Ok(python)
    } else {
        Err(python)
    }
}

/// One run of this crate's `python/<script>` with `args` (`--flag value` pairs): its last
/// stdout line that starts with `{` (the script's figures, timed by the script itself, so the
/// interpreter's start-up is not counted), through `parse`. Errors start with `who` (`kombu`,
/// `aio-pika`).
#[cfg(feature = "kelp")]
pub fn run_script<T>(
    who: &str,
    python: &str,
    script: &str,
    args: &[(&str, &str)],
    parse: impl FnOnce(&str) -> BenchResult<T>,
) -> BenchResult<T> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let out = Command::new(python)
        .arg(&script)
        .args(args.iter().flat_map(|&(flag, value)| [flag, value]))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{who}: {} {} failed ({}): {}",
            python,
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| format!("{who}: no JSON line in {stdout:?}"))?;
    parse(line).map_err(|e| format!("{who}: {e} in {line:?}").into())
}

/// The number after `"key":` in a flat JSON object (`None` if absent or `null`).
#[cfg(feature = "kelp")]
pub fn json_number(json: &str, key: &str) -> Option<f64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json.get(at..)?.trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest.get(..end)?.trim().parse().ok()
}

/// The string after `"key":` in a flat JSON object (no escapes expected).
#[cfg(feature = "kelp")]
pub fn json_string(json: &str, key: &str) -> Option<String> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json.get(at..)?.trim_start().strip_prefix('"')?;
    Some(rest.get(..rest.find('"')?)?.to_owned())
}

/// One timed phase a comparison script printed: `count` operations, wall seconds under
/// `wall`, CPU seconds under `cpu` (`None` if either is missing or not a duration).
#[cfg(feature = "kelp")]
pub fn json_phase(json: &str, wall: &str, cpu: &str) -> Option<crate::report::Measurement> {
    let count = json_number(json, "count")?;
    let (wall, cpu) = (json_number(json, wall)?, json_number(json, cpu)?);
    Some(crate::report::Measurement {
        // A count printed by the script: a whole number.
        msgs: count as u64,
        wall: Duration::try_from_secs_f64(wall).ok()?,
        cpu: Duration::try_from_secs_f64(cpu).ok()?,
        latency: None,
    })
}

#[cfg(all(test, feature = "kelp"))]
mod tests {
    use super::*;

    #[test]
    fn reads_flat_json() {
        let json = r#"{"kombu": "5.7.0", "count": 20000, "publish_s": 2.5, "consume_s": null}"#;
        assert_eq!(json_string(json, "kombu").as_deref(), Some("5.7.0"));
        assert_eq!(json_number(json, "count"), Some(20000.0));
        assert_eq!(json_number(json, "publish_s"), Some(2.5));
        assert_eq!(json_number(json, "consume_s"), None);
        assert_eq!(json_number(json, "nope"), None);
        assert_eq!(json_string(json, "count"), None);
    }

    #[test]
    fn goal_notes() {
        let m = |msgs: u64| crate::report::Measurement {
            msgs,
            wall: Duration::from_secs(1),
            cpu: Duration::ZERO,
            latency: None,
        };
        assert_eq!(
            ratio_goal_note(&m(1000), &m(100), 10.0, "msgs/s"),
            "  (goal >= 10x msgs/s: met)"
        );
        assert_eq!(
            ratio_goal_note(&m(999), &m(100), 10.0, "calls/s"),
            "  (goal >= 10x calls/s: NOT met)"
        );
    }
}
