//! The one retry backoff: doubling from a base, capped; and the one way a
//! process retries a startup step.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Before attempt `attempt + 1`: `base x 2^(attempt - 1)`, at most `max`
/// (attempts 0 and 1 both wait `base`).
pub fn exponential(base: Duration, attempt: u64, max: Duration) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16) as u32;
    base.saturating_mul(1 << doublings).min(max)
}

/// How a startup step (NATS still starting, the queue not created yet by
/// the gateway) is retried.
#[derive(Debug, Clone, Copy)]
pub struct StartupRetry {
    /// Wait after the first failure: short, so a process started a moment
    /// before its dependency (every test, `compose up`) is ready soon after it.
    pub first: Duration,
    /// The wait doubles up to this, so a dependency back after a long outage
    /// is noticed within it.
    pub max: Duration,
    /// A step still failing is logged again this often: a long wait stays
    /// visible without a line per attempt.
    pub log_every: Duration,
}

/// The policy every process uses at startup.
pub const STARTUP: StartupRetry = StartupRetry {
    first: Duration::from_millis(200),
    max: Duration::from_secs(2),
    log_every: Duration::from_secs(30),
};

/// Runs `step` until it succeeds, under [`STARTUP`]: the first failure and
/// then one every 30 s are logged at warn, naming `what`. It never gives up:
/// a caller that must stop on shutdown races it against the signal.
pub async fn retry_startup<T, E, Step, Attempt>(what: &str, step: Step) -> T
where
    E: Display,
    Step: FnMut() -> Attempt,
    Attempt: Future<Output = Result<T, E>>,
{
    STARTUP.retry(what, step).await
}

impl StartupRetry {
    /// [`retry_startup`] under this policy.
    pub async fn retry<T, E, Step, Attempt>(self, what: &str, mut step: Step) -> T
    where
        E: Display,
        Step: FnMut() -> Attempt,
        Attempt: Future<Output = Result<T, E>>,
    {
        let started = Instant::now();
        let mut logged_at: Option<Instant> = None;
        let mut failures = 0u64;
        loop {
            let err = match step().await {
                Ok(value) => {
                    if failures > 0 {
                        tracing::info!(
                            step = what,
                            failures,
                            waited_ms = started.elapsed().as_millis() as u64,
                            "startup step succeeded after retrying"
                        );
                    }
                    return value;
                }
                Err(err) => err,
            };
            failures += 1;
            let now = Instant::now();
            if self.log_due(logged_at.map(|at| now - at)) {
                logged_at = Some(now);
                tracing::warn!(
                    step = what,
                    cause = %err,
                    failures,
                    waited_ms = (now - started).as_millis() as u64,
                    "startup step failed; retrying"
                );
            }
            tokio::time::sleep(exponential(self.first, failures, self.max)).await;
        }
    }

    /// Whether a failure is logged, given how long ago the last one was
    /// (`None`: none was yet).
    fn log_due(self, since_last_log: Option<Duration>) -> bool {
        since_last_log.is_none_or(|since| since >= self.log_every)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_base_up_to_the_cap() {
        let second = Duration::from_secs(1);
        let minute = Duration::from_secs(60);
        let waits: Vec<u64> = (0..9)
            .map(|attempt| exponential(second, attempt, minute).as_secs())
            .collect();
        assert_eq!(waits, [1, 1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(exponential(second, u64::MAX, minute), minute);
    }

    #[test]
    fn startup_retries_soon_then_every_two_seconds() {
        let waits: Vec<u128> = (1..7)
            .map(|failures| exponential(STARTUP.first, failures, STARTUP.max).as_millis())
            .collect();
        assert_eq!(waits, [200, 400, 800, 1600, 2000, 2000]);
    }

    #[test]
    fn a_failing_step_is_logged_first_and_then_every_log_interval() {
        assert!(STARTUP.log_due(None));
        assert!(!STARTUP.log_due(Some(Duration::from_secs(2))));
        assert!(!STARTUP.log_due(Some(Duration::from_millis(29_999))));
        assert!(STARTUP.log_due(Some(Duration::from_secs(30))));
    }

    #[tokio::test]
    async fn retries_until_the_step_succeeds() {
        let quick = StartupRetry {
            first: Duration::from_millis(1),
            max: Duration::from_millis(2),
            log_every: Duration::from_secs(30),
        };
        let mut attempts = 0;
        let value = quick
            .retry("count to three", || {
                attempts += 1;
                let attempt = attempts;
                async move {
                    if attempt < 3 {
                        Err(format!("only {attempt}"))
                    } else {
                        Ok(attempt)
                    }
                }
            })
            .await;
        assert_eq!((value, attempts), (3, 3));
    }
}
