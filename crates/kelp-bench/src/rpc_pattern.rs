//! The `rpc-pattern` scenario: kelp's RPC pattern (`kelp::patterns::Rpc`, JSON format) against
//! aio-pika's `JsonRPC`, measured in the same run.
//!
//! Each side runs callee and caller in one process on two connections: the callee registers
//! a method whose handler echoes its keyword arguments (declared auto-delete, as aio-pika's
//! `register(..., auto_delete=True)`), the caller calls it with `{"i": i}` and checks the
//! echo. After [`WARMUP`] untimed calls, one run measures
//!
//! - `count` calls with [`WINDOW`] in flight (the headline: calls/s and CPU per call), timed
//!   from the first call to the last answer;
//! - `count` calls one at a time, each timed on its own (p50, p99).
//!
//! kelp runs twice: replies through its result queue (aio-pika's way) and through RabbitMQ's
//! direct reply-to (`RpcOptions::direct_reply_to`). aio-pika runs in
//! `python/aio_pika_rpc_bench.py` (one process per run; it times itself, so the
//! interpreter's start-up is not counted). With `--repeat R` the three take turns R times
//! and each measurement reports its best run. CPU is the whole process's (callee and caller
//! both; `getrusage` here, `time.process_time` in Python), never the broker's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use kelp::patterns::{Format, RegisterOptions, Rpc, RpcError, RpcOptions};
use kelp::{Connection, Queue};

use crate::common::{
    block_on_timeout, json_number, json_phase, json_string, python_with, ratio_goal_note,
    run_script, DEFAULT_PYTHON,
};
use crate::report::{format_line, format_ratio, Measurement, Percentiles, Timer};
use crate::{fresh_queue_name, BenchResult};

/// Calls in flight in the windowed measurement, for kelp and aio-pika.
pub const WINDOW: usize = 64;
/// Untimed calls before the timed ones.
const WARMUP: u64 = 100;
/// The headline goal: kelp at least this many times aio-pika's calls/s.
const GOAL: f64 = 10.0;
/// Bounds one aio-pika run (seconds).
const AIO_PIKA_TIMEOUT_SECS: u64 = 600;
const SCENARIO: &str = "rpc-pattern";

/// The keyword arguments of a call, and what the callee answers (it echoes them).
type Kwargs = BTreeMap<String, u64>;

/// One run's two figures.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    /// [`WINDOW`] calls in flight.
    windowed: Measurement,
    /// One call at a time, with p50/p99.
    seq: Measurement,
}

/// One call to `method` with `{"i": i}`; fails unless the answer echoes it.
async fn call(rpc: &Rpc, method: &str, i: u64) -> BenchResult<()> {
    let kwargs = Kwargs::from([("i".to_owned(), i)]);
    let answer = rpc.call(method, &kwargs).await?;
    match answer.get("i").and_then(|v| v.as_u64()) {
        Some(got) if got == i => Ok(()),
        _ => Err(format!("rpc-pattern: call {i} answered {answer}").into()),
    }
}

/// `count` calls with at most `window` in flight.
async fn call_all(rpc: &Rpc, method: &str, count: u64, window: usize) -> BenchResult<()> {
    let mut in_flight = FuturesUnordered::new();
    for i in 0..count {
        if in_flight.len() >= window {
            if let Some(done) = in_flight.next().await {
                done?;
            }
        }
        in_flight.push(call(rpc, method, i));
    }
    while let Some(done) = in_flight.next().await {
        done?;
    }
    Ok(())
}

/// One kelp run: callee and caller on two connections, the caller's replies through the
/// result queue or (`direct`) direct reply-to.
async fn kelp_run(url: &str, count: u64, direct: bool) -> BenchResult<Run> {
    let callee_conn = Connection::open(url).await?;
    let caller_conn = Connection::open(url).await?;
    let callee_ch = callee_conn.channel().await?;
    let callee = Rpc::create(&callee_ch, RpcOptions::new(Format::Json)).await?;
    let method = fresh_queue_name(if direct { "kelp-direct" } else { "kelp" }, SCENARIO);
    let method = method.as_str();
    let register = RegisterOptions {
        auto_delete: true,
        ..Default::default()
    };
    callee
        .register_with(method, register, |kwargs: Kwargs| async move {
            Ok::<_, RpcError>(kwargs)
        })
        .await?;
    let caller_ch = caller_conn.channel().await?;
    let caller = Rpc::create(
        &caller_ch,
        RpcOptions::new(Format::Json).direct_reply_to(direct),
    )
    .await?;

    let result = async {
        for i in 0..WARMUP {
            call(&caller, method, i).await?;
        }
        let timer = Timer::start()?;
        call_all(&caller, method, count, WINDOW).await?;
        let windowed = timer.stop(count)?;

        let mut samples = Vec::with_capacity(usize::try_from(count)?);
        let timer = Timer::start()?;
        for i in 0..count {
            let t = Instant::now();
            call(&caller, method, i).await?;
            samples.push(t.elapsed());
        }
        let seq = timer
            .stop(count)?
            .with_latency(Percentiles::from_samples(&mut samples));
        BenchResult::Ok(Run { windowed, seq })
    }
    .await;

    let closed = async {
        caller.close().await?;
        callee.close().await?;
        // Cancelling the consumer deleted the auto-delete method queue; this is in case not.
        Queue::new(method)
            .delete(&callee_ch, false, false)
            .await
            .ok();
        caller_conn.close().await?;
        callee_conn.close().await?;
        BenchResult::Ok(())
    }
    .await;
    let run = result?;
    closed?;
    Ok(run)
}

/// One kelp run under `timeout`.
fn kelp_once(
    rt: &tokio::runtime::Runtime,
    url: &str,
    count: u64,
    direct: bool,
    timeout: Duration,
) -> BenchResult<Run> {
    block_on_timeout(rt, timeout, kelp_run(url, count, direct))
}

/// Of several runs, the highest calls/s of each measurement.
fn best_run(runs: Vec<Run>) -> BenchResult<Run> {
    let (windowed, seq): (Vec<_>, Vec<_>) = runs.into_iter().map(|r| (r.windowed, r.seq)).unzip();
    Ok(Run {
        windowed: Measurement::best(windowed).ok_or("no runs")?,
        seq: Measurement::best(seq).ok_or("no runs")?,
    })
}

/// The script's JSON line: its version and its run.
fn parse_aio_pika(json: &str) -> BenchResult<(String, Run)> {
    json_number(json, "count").ok_or("no count")?;
    let phase = |wall: &str, cpu: &str| json_phase(json, wall, cpu);
    let latency = match (
        json_number(json, "seq_p50_us"),
        json_number(json, "seq_p99_us"),
    ) {
        (Some(p50_us), Some(p99_us)) => Some(Percentiles { p50_us, p99_us }),
        _ => None,
    };
    let run = Run {
        windowed: phase("windowed_s", "windowed_cpu_s").ok_or("no windowed figures")?,
        seq: phase("seq_s", "seq_cpu_s")
            .ok_or("no sequential figures")?
            .with_latency(latency),
    };
    let version = json_string(json, "aio_pika").unwrap_or_else(|| "?".into());
    Ok((version, run))
}

/// One aio-pika run in a child Python process (`python/aio_pika_rpc_bench.py`).
fn aio_pika_run(python: &str, url: &str, count: u64) -> BenchResult<(String, Run)> {
    let (count, window) = (count.to_string(), WINDOW.to_string());
    let (warmup, timeout) = (WARMUP.to_string(), AIO_PIKA_TIMEOUT_SECS.to_string());
    let args = [
        ("--url", url),
        ("--count", &count),
        ("--window", &window),
        ("--warmup", &warmup),
        ("--timeout", &timeout),
    ];
    run_script(
        "aio-pika",
        python,
        "aio_pika_rpc_bench.py",
        &args,
        parse_aio_pika,
    )
}

/// `rpc-pattern`: kelp (queue reply), kelp (direct reply-to) and aio-pika, then the ratios.
pub fn run(
    rt: &tokio::runtime::Runtime,
    url: &str,
    count: u64,
    repeat: usize,
    timeout: Duration,
) -> BenchResult<()> {
    let line = |who: &str, m: &Measurement, what: &str| {
        println!("{}  {what}", format_line(SCENARIO, who, m));
    };
    // The three sides take turns, so each sees the broker and the machine as the others do.
    let python = python_with("aio_pika");
    let (mut queue, mut direct, mut aio_pika) = (Vec::new(), Vec::new(), Vec::new());
    let mut version = String::new();
    for _ in 0..repeat {
        queue.push(kelp_once(rt, url, count, false, timeout)?);
        direct.push(kelp_once(rt, url, count, true, timeout)?);
        if let Ok(python) = &python {
            let (v, run) = aio_pika_run(python, url, count)?;
            version = v;
            aio_pika.push(run);
        }
    }
    let (queue, direct) = (best_run(queue)?, best_run(direct)?);

    let windowed = format!("{WINDOW} calls in flight");
    line(
        "kelp",
        &queue.windowed,
        &format!("Rpc.call (JSON), reply through the result queue, {windowed}"),
    );
    line(
        "kelp-direct",
        &direct.windowed,
        &format!("Rpc.call (JSON), reply through direct reply-to, {windowed}"),
    );
    let aio_pika = match python {
        Ok(_) => {
            let run = best_run(aio_pika)?;
            line(
                "aio-pika",
                &run.windowed,
                &format!("aio-pika {version} JsonRPC.call, {windowed}"),
            );
            Some(run)
        }
        Err(python) => {
            println!(
                "{SCENARIO} aio-pika: skipped ({python} cannot import aio_pika: set KELP_PYTHON \
                 to a Python with aio-pika 9.5, default {DEFAULT_PYTHON})"
            );
            None
        }
    };
    line("kelp-seq", &queue.seq, "one call at a time, result queue");
    line(
        "kelp-direct-seq",
        &direct.seq,
        "one call at a time, direct reply-to",
    );
    if let Some(run) = &aio_pika {
        line(
            "aio-pika-seq",
            &run.seq,
            &format!("aio-pika {version}, one call at a time"),
        );
        for (who, m) in [("kelp", &queue.windowed), ("kelp-direct", &direct.windowed)] {
            println!(
                "{}{}",
                format_ratio(who, m, "aio-pika", &run.windowed),
                ratio_goal_note(m, &run.windowed, GOAL, "calls/s")
            );
        }
        for (who, m) in [("kelp-seq", &queue.seq), ("kelp-direct-seq", &direct.seq)] {
            println!("{}", format_ratio(who, m, "aio-pika-seq", &run.seq));
        }
    }
    println!(
        "{}  (direct reply-to vs result queue)",
        format_ratio("kelp-direct", &direct.windowed, "kelp", &queue.windowed)
    );
    println!(
        "{}  (direct reply-to vs result queue)",
        format_ratio("kelp-direct-seq", &direct.seq, "kelp-seq", &queue.seq)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_aio_pika_json() -> BenchResult<()> {
        let (version, run) = parse_aio_pika(
            r#"{"aio_pika": "9.5.5", "count": 2000, "window": 64, "windowed_s": 2.0, "windowed_cpu_s": 1.5, "windowed_per_s": 1000.0, "seq_s": 4, "seq_cpu_s": 1, "seq_per_s": 500.0, "seq_p50_us": 1900.5, "seq_p99_us": 4000.0}"#,
        )?;
        assert_eq!(version, "9.5.5");
        assert_eq!(run.windowed.msgs, 2000);
        assert_eq!(run.windowed.wall, Duration::from_secs(2));
        assert_eq!(run.windowed.cpu, Duration::from_millis(1500));
        assert_eq!(run.windowed.latency, None);
        assert_eq!(run.seq.wall, Duration::from_secs(4));
        assert_eq!(
            run.seq.latency,
            Some(Percentiles {
                p50_us: 1900.5,
                p99_us: 4000.0
            })
        );
        assert!(parse_aio_pika("{}").is_err());
        assert!(parse_aio_pika(r#"{"count": 1, "windowed_s": 1, "windowed_cpu_s": 1}"#).is_err());
        Ok(())
    }

    #[test]
    fn best_run_takes_each_best() -> BenchResult<()> {
        let m = |wall_ms: u64| Measurement {
            msgs: 10,
            wall: Duration::from_millis(wall_ms),
            cpu: Duration::from_millis(1),
            latency: None,
        };
        let best = best_run(vec![
            Run {
                windowed: m(10),
                seq: m(90),
            },
            Run {
                windowed: m(20),
                seq: m(50),
            },
        ])?;
        assert_eq!(
            (best.windowed.wall, best.seq.wall),
            (Duration::from_millis(10), Duration::from_millis(50))
        );
        assert!(best_run(Vec::new()).is_err());
        Ok(())
    }
}
