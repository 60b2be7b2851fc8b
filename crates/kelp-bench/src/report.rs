//! Measuring (wall clock + process CPU via `getrusage(RUSAGE_SELF)`) and printing.

use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::time::TimeValLike;

use crate::BenchResult;

/// User + system CPU time this process has used so far (all threads).
pub fn process_cpu() -> BenchResult<Duration> {
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    let micros = usage.user_time().num_microseconds() + usage.system_time().num_microseconds();
    Ok(Duration::from_micros(u64::try_from(micros)?))
}

/// Started right before a timed section; [`Timer::stop`] turns it into a [`Measurement`].
#[derive(Debug)]
pub struct Timer {
    wall: Instant,
    cpu: Duration,
}

impl Timer {
    pub fn start() -> BenchResult<Self> {
        let cpu = process_cpu()?;
        Ok(Self {
            wall: Instant::now(),
            cpu,
        })
    }

    /// Ends the timed section, which handled `msgs` messages (or round trips).
    pub fn stop(self, msgs: u64) -> BenchResult<Measurement> {
        let wall = self.wall.elapsed();
        let cpu = process_cpu()?.saturating_sub(self.cpu);
        Ok(Measurement {
            msgs,
            wall,
            cpu,
            latency: None,
        })
    }
}

/// Latency percentiles of a run, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Percentiles {
    /// Sorts `samples` in place and picks the nearest-rank p50 and p99.
    pub fn from_samples(samples: &mut [Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let pick = |pct: usize| {
            // Nearest rank: the smallest sample with at least pct% of samples <= it.
            let rank = (samples.len() * pct).div_ceil(100).max(1);
            samples[rank - 1].as_secs_f64() * 1e6
        };
        Some(Self {
            p50_us: pick(50),
            p99_us: pick(99),
        })
    }
}

/// One client's result for one scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub msgs: u64,
    pub wall: Duration,
    pub cpu: Duration,
    pub latency: Option<Percentiles>,
}

impl Measurement {
    pub fn msgs_per_sec(&self) -> f64 {
        self.msgs as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    pub fn cpu_us_per_msg(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / (self.msgs.max(1) as f64)
    }

    pub fn with_latency(mut self, latency: Option<Percentiles>) -> Self {
        self.latency = latency;
        self
    }

    /// Of several runs of the same thing, the best of each: the shortest wall time and, from
    /// whichever run it came, the least CPU. Where the machine is shared (the broker, other
    /// jobs), a run's CPU per message swings with how its writes happened to batch; the least
    /// is the least disturbed, and what a comparison of two layers should use.
    #[cfg_attr(not(feature = "kelp"), allow(dead_code))] // Only `library` uses it.
    pub fn best_each(runs: &[Self]) -> Option<Self> {
        let wall = runs.iter().map(|m| m.wall).min()?;
        let cpu = runs.iter().map(|m| m.cpu).min()?;
        let first = runs.first()?;
        Some(Self {
            msgs: first.msgs,
            wall,
            cpu,
            latency: None,
        })
    }

    /// Of several runs of the same thing, the one with the highest throughput.
    pub fn best(runs: Vec<Self>) -> Option<Self> {
        runs.into_iter()
            .max_by(|a, b| a.msgs_per_sec().total_cmp(&b.msgs_per_sec()))
    }
}

/// `<scenario> <client:10> <msgs/s> msgs/s  <cpu µs/msg> µs/msg cpu  [p50 <x> µs p99 <y> µs]`
pub fn format_line(scenario: &str, client: &str, m: &Measurement) -> String {
    let mut line = format!(
        "{scenario} {client:<10} {:>10.0} msgs/s  {:>7.2} µs/msg cpu",
        m.msgs_per_sec(),
        m.cpu_us_per_msg()
    );
    if let Some(p) = m.latency {
        line.push_str(&format!("  p50 {:.1} µs p99 {:.1} µs", p.p50_us, p.p99_us));
    }
    line
}

/// `kelp-amqp vs lapin: 1.85x msgs/s, 0.40x cpu/msg[, 0.70x p50]`
pub fn format_ratio(
    ours: &str,
    ours_m: &Measurement,
    theirs: &str,
    theirs_m: &Measurement,
) -> String {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let mut line = format!(
        "{ours} vs {theirs}: {:.2}x msgs/s, {:.2}x cpu/msg",
        ratio(ours_m.msgs_per_sec(), theirs_m.msgs_per_sec()),
        ratio(ours_m.cpu_us_per_msg(), theirs_m.cpu_us_per_msg())
    );
    if let (Some(a), Some(b)) = (ours_m.latency, theirs_m.latency) {
        line.push_str(&format!(", {:.2}x p50", ratio(a.p50_us, b.p50_us)));
    }
    line
}

/// `publish: kelp library vs kelp-amqp: -3.0% msgs/s (+3.1% time/msg), +25.9% cpu/msg`: what
/// the library layer costs on top of the engine it runs on.
#[cfg_attr(not(feature = "kelp"), allow(dead_code))] // Only `library` uses it.
pub fn format_overhead(what: &str, lib: &Measurement, raw: &Measurement) -> String {
    let pct = |a: f64, b: f64| {
        if b > 0.0 {
            (a / b - 1.0) * 100.0
        } else {
            f64::NAN
        }
    };
    format!(
        "{what}: kelp library vs kelp-amqp: {:+.1}% msgs/s ({:+.1}% time/msg), {:+.1}% cpu/msg",
        pct(lib.msgs_per_sec(), raw.msgs_per_sec()),
        pct(raw.msgs_per_sec(), lib.msgs_per_sec()),
        pct(lib.cpu_us_per_msg(), raw.cpu_us_per_msg())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(msgs: u64, wall_ms: u64, cpu_ms: u64) -> Measurement {
        Measurement {
            msgs,
            wall: Duration::from_millis(wall_ms),
            cpu: Duration::from_millis(cpu_ms),
            latency: None,
        }
    }

    #[test]
    fn percentiles_nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let p = Percentiles::from_samples(&mut v);
        assert_eq!(
            p,
            Some(Percentiles {
                p50_us: 50.0,
                p99_us: 99.0
            })
        );
        let mut one = vec![Duration::from_micros(7)];
        let p = Percentiles::from_samples(&mut one);
        assert_eq!(
            p,
            Some(Percentiles {
                p50_us: 7.0,
                p99_us: 7.0
            })
        );
        assert_eq!(Percentiles::from_samples(&mut []), None);
    }

    #[test]
    fn line_and_ratio_format() {
        let a = m(100_000, 500, 250);
        let b = m(100_000, 1000, 1000);
        assert_eq!(
            format_line("publish", "lapin", &b),
            "publish lapin          100000 msgs/s    10.00 µs/msg cpu"
        );
        assert_eq!(
            format_ratio("kelp-amqp", &a, "lapin", &b),
            "kelp-amqp vs lapin: 2.00x msgs/s, 0.25x cpu/msg"
        );
        let lat = Some(Percentiles {
            p50_us: 70.0,
            p99_us: 90.0,
        });
        let lat_b = Some(Percentiles {
            p50_us: 100.0,
            p99_us: 200.0,
        });
        let line = format_ratio(
            "kelp-amqp",
            &a.clone().with_latency(lat),
            "amqprs",
            &b.clone().with_latency(lat_b),
        );
        assert_eq!(
            line,
            "kelp-amqp vs amqprs: 2.00x msgs/s, 0.25x cpu/msg, 0.70x p50"
        );
        assert!(format_line("rpc", "amqprs", &b.with_latency(lat_b))
            .ends_with("  p50 100.0 µs p99 200.0 µs"));
    }

    #[test]
    fn best_each_takes_least_wall_and_least_cpu() {
        let best = Measurement::best_each(&[m(10, 100, 9), m(10, 50, 12), m(10, 200, 4)]);
        assert_eq!(
            best.map(|b| (b.wall, b.cpu)),
            Some((Duration::from_millis(50), Duration::from_millis(4)))
        );
        assert_eq!(Measurement::best_each(&[]), None);
    }

    #[test]
    fn overhead_format() {
        let lib = m(100_000, 1250, 1500);
        let raw = m(100_000, 1000, 1000);
        assert_eq!(
            format_overhead("publish", &lib, &raw),
            "publish: kelp library vs kelp-amqp: -20.0% msgs/s (+25.0% time/msg), +50.0% cpu/msg"
        );
    }

    #[test]
    fn best_is_highest_throughput() {
        let best = Measurement::best(vec![m(10, 100, 1), m(10, 50, 9), m(10, 200, 1)]);
        assert_eq!(best.map(|b| b.wall), Some(Duration::from_millis(50)));
    }

    #[test]
    fn cpu_clock_advances() -> BenchResult<()> {
        let t = Timer::start()?;
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        let r = t.stop(1)?;
        assert!(
            r.cpu > Duration::ZERO && r.wall > Duration::ZERO,
            "{r:?} {x}"
        );
        Ok(())
    }
}
