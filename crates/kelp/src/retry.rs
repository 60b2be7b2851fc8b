//! Retry policies with Kombu's names (`max_retries`, `interval_start`, `interval_step`,
//! `interval_max`).

use std::future::Future;
use std::time::Duration;

use crate::error::Error;

/// When and how often to retry an operation that failed with a connection error.
///
/// ```
/// use std::time::Duration;
/// let p = kelp::RetryPolicy::default().max_retries(Some(5)).interval_step(Duration::from_millis(500));
/// assert_eq!(p.delay(0), Duration::ZERO);
/// assert_eq!(p.delay(1), Duration::from_millis(500));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Give up after this many retries (`None`: never give up). Kombu's default is 3.
    pub max_retries: Option<u32>,
    /// The first wait (default 0).
    pub interval_start: Duration,
    /// Added to the wait after each retry (default 1 s).
    pub interval_step: Duration,
    /// The longest wait (default 1 s).
    pub interval_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: Some(3),
            interval_start: Duration::ZERO,
            interval_step: Duration::from_secs(1),
            interval_max: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// Set `max_retries`.
    ///
    /// ```
    /// assert_eq!(kelp::RetryPolicy::default().max_retries(None).max_retries, None);
    /// ```
    pub fn max_retries(mut self, n: Option<u32>) -> Self {
        self.max_retries = n;
        self
    }
    /// Set `interval_start`.
    ///
    /// ```
    /// use std::time::Duration;
    /// assert_eq!(kelp::RetryPolicy::default().interval_start(Duration::from_secs(2)).delay(0), Duration::from_secs(1));
    /// ```
    pub fn interval_start(mut self, d: Duration) -> Self {
        self.interval_start = d;
        self
    }
    /// Set `interval_step`.
    ///
    /// ```
    /// use std::time::Duration;
    /// let p = kelp::RetryPolicy::default().interval_step(Duration::from_millis(10));
    /// assert_eq!(p.interval_step, Duration::from_millis(10));
    /// ```
    pub fn interval_step(mut self, d: Duration) -> Self {
        self.interval_step = d;
        self
    }
    /// Set `interval_max`.
    ///
    /// ```
    /// use std::time::Duration;
    /// let p = kelp::RetryPolicy::default().interval_max(Duration::from_secs(30));
    /// assert_eq!(p.interval_max, Duration::from_secs(30));
    /// ```
    pub fn interval_max(mut self, d: Duration) -> Self {
        self.interval_max = d;
        self
    }

    /// The wait before retry number `attempt` (0-based): start + attempt × step, capped at max.
    ///
    /// ```
    /// use std::time::Duration;
    /// let p = kelp::RetryPolicy::default();
    /// assert_eq!(p.delay(5), Duration::from_secs(1));
    /// ```
    pub fn delay(&self, attempt: u32) -> Duration {
        self.interval_start
            .saturating_add(self.interval_step.saturating_mul(attempt))
            .min(self.interval_max)
    }

    /// Run `op` until it succeeds, fails with an error that is not a connection error, or the
    /// retries run out. `errback` sees each error and the wait before the next try.
    ///
    /// ```
    /// # async fn demo() -> Result<(), kelp::Error> {
    /// let p = kelp::RetryPolicy::default().max_retries(Some(2)).interval_step(std::time::Duration::ZERO);
    /// let mut tries = 0;
    /// let out = p
    ///     .run(
    ///         || { tries += 1; async { Ok::<_, kelp::Error>(7) } },
    ///         |_e, _wait| {},
    ///     )
    ///     .await?;
    /// assert_eq!(out, 7);
    /// # Ok(()) }
    /// ```
    pub async fn run<T, F, Fut>(
        &self,
        mut op: F,
        mut errback: impl FnMut(&Error, Duration),
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut attempt = 0u32;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_connection_error() => return Err(e),
                Err(e) => {
                    if self.max_retries.is_some_and(|m| attempt >= m) {
                        return Err(e);
                    }
                    let wait = self.delay(attempt);
                    errback(&e, wait);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }
}
