//! How a robust connection reconnects: backoff, failover order, how long calls wait.

use std::time::Duration;

/// The order in which failover URLs are tried (Kombu's `failover_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailoverStrategy {
    /// In the order given, starting after the URL that failed (Kombu's `round-robin`).
    #[default]
    RoundRobin,
    /// A random URL on each attempt (Kombu's `shuffle`).
    Shuffle,
}

/// Backoff between reconnection attempts, with Kombu's names: the first retry waits
/// `interval_start`, then the wait doubles from `interval_step` up to `interval_max`; each wait is
/// shortened by a random `jitter` fraction so many clients do not reconnect in lockstep.
///
/// ```
/// use std::time::Duration;
/// let p = kelp::recovery::ReconnectPolicy::default().jitter(0.0);
/// assert_eq!(p.delay(0), Duration::ZERO);
/// assert_eq!(p.delay(1), Duration::from_millis(500));
/// assert_eq!(p.delay(2), Duration::from_secs(1));
/// assert_eq!(p.delay(20), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReconnectPolicy {
    /// Give up after this many failed attempts (`None`: never give up).
    pub max_retries: Option<u32>,
    /// The wait before the first retry.
    pub interval_start: Duration,
    /// The wait before the second retry; it doubles after each further failure.
    pub interval_step: Duration,
    /// The longest wait.
    pub interval_max: Duration,
    /// The fraction (0.0–1.0) of each wait that is randomised away.
    pub jitter: f64,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            max_retries: None,
            interval_start: Duration::ZERO,
            interval_step: Duration::from_millis(500),
            interval_max: Duration::from_secs(5),
            jitter: 0.2,
        }
    }
}

impl ReconnectPolicy {
    /// Give up after `n` failed attempts (`None`: never).
    ///
    /// ```
    /// let p = kelp::recovery::ReconnectPolicy::default().max_retries(Some(10));
    /// assert_eq!(p.max_retries, Some(10));
    /// ```
    pub fn max_retries(mut self, n: Option<u32>) -> Self {
        self.max_retries = n;
        self
    }
    /// The wait before the first retry.
    ///
    /// ```
    /// let p = kelp::recovery::ReconnectPolicy::default().interval_start(std::time::Duration::from_millis(50));
    /// ```
    pub fn interval_start(mut self, d: Duration) -> Self {
        self.interval_start = d;
        self
    }
    /// The wait before the second retry (doubling after that).
    ///
    /// ```
    /// let p = kelp::recovery::ReconnectPolicy::default().interval_step(std::time::Duration::from_millis(200));
    /// ```
    pub fn interval_step(mut self, d: Duration) -> Self {
        self.interval_step = d;
        self
    }
    /// The longest wait.
    ///
    /// ```
    /// let p = kelp::recovery::ReconnectPolicy::default().interval_max(std::time::Duration::from_secs(1));
    /// ```
    pub fn interval_max(mut self, d: Duration) -> Self {
        self.interval_max = d;
        self
    }
    /// The randomised fraction of each wait (clamped to 0.0–1.0).
    ///
    /// ```
    /// let p = kelp::recovery::ReconnectPolicy::default().jitter(0.0);
    /// assert_eq!(p.jitter, 0.0);
    /// ```
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        self
    }

    /// The wait before retry number `attempt` (0-based), before jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        if attempt == 0 {
            return self.interval_start.min(self.interval_max);
        }
        let factor = 1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX);
        self.interval_step
            .saturating_mul(factor)
            .min(self.interval_max)
    }

    /// The wait before retry number `attempt`, with jitter applied.
    pub fn jittered_delay(&self, attempt: u32) -> Duration {
        let d = self.delay(attempt);
        if self.jitter <= 0.0 || d.is_zero() {
            return d;
        }
        d.mul_f64(1.0 - self.jitter * fastrand::f64())
    }
}

/// The settings of a robust connection.
///
/// ```
/// use std::time::Duration;
/// use kelp::recovery::{FailoverStrategy, ReconnectPolicy, RecoveryOptions};
/// let opts = RecoveryOptions::default()
///     .reconnect(ReconnectPolicy::default().interval_max(Duration::from_secs(2)))
///     .outage_timeout(Duration::from_secs(60))
///     .failover_strategy(FailoverStrategy::Shuffle)
///     .fail_fast(false);
/// assert!(!opts.fail_fast);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryOptions {
    /// Backoff between reconnection attempts.
    pub reconnect: ReconnectPolicy,
    /// How long a call made while the connection is down waits for it to come back before it
    /// fails with [`Error::ConnectionDown`](crate::Error::ConnectionDown) (default 30 s).
    pub outage_timeout: Duration,
    /// On the very first connect, return the error at once (default, as aio-pika) instead of
    /// retrying with the reconnect policy.
    pub fail_fast: bool,
    /// The order failover URLs are tried in.
    pub failover_strategy: FailoverStrategy,
    /// When the broker cancels a consumer (its queue was deleted), consume again once the queue
    /// exists again (checked on each reconnect and every `outage_timeout`). Off by default: the
    /// cancel reaches the consumer as [`Error::ConsumerCancelled`](crate::Error).
    pub reconsume_on_cancel: bool,
}

impl Default for RecoveryOptions {
    fn default() -> Self {
        RecoveryOptions {
            reconnect: ReconnectPolicy::default(),
            outage_timeout: Duration::from_secs(30),
            fail_fast: true,
            failover_strategy: FailoverStrategy::RoundRobin,
            reconsume_on_cancel: false,
        }
    }
}

impl RecoveryOptions {
    /// Backoff between reconnection attempts.
    ///
    /// ```
    /// let o = kelp::recovery::RecoveryOptions::default().reconnect(Default::default());
    /// ```
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }
    /// How long calls wait during an outage.
    ///
    /// ```
    /// let o = kelp::recovery::RecoveryOptions::default().outage_timeout(std::time::Duration::from_secs(5));
    /// ```
    pub fn outage_timeout(mut self, d: Duration) -> Self {
        self.outage_timeout = d;
        self
    }
    /// Fail the first connect at once (`true`, the default) or retry it.
    ///
    /// ```
    /// let o = kelp::recovery::RecoveryOptions::default().fail_fast(false);
    /// ```
    pub fn fail_fast(mut self, on: bool) -> Self {
        self.fail_fast = on;
        self
    }
    /// The order failover URLs are tried in.
    ///
    /// ```
    /// let o = kelp::recovery::RecoveryOptions::default()
    ///     .failover_strategy(kelp::recovery::FailoverStrategy::Shuffle);
    /// ```
    pub fn failover_strategy(mut self, s: FailoverStrategy) -> Self {
        self.failover_strategy = s;
        self
    }
    /// Consume again when a queue the broker cancelled a consumer for comes back.
    ///
    /// ```
    /// let o = kelp::recovery::RecoveryOptions::default().reconsume_on_cancel(true);
    /// ```
    pub fn reconsume_on_cancel(mut self, on: bool) -> Self {
        self.reconsume_on_cancel = on;
        self
    }
}
