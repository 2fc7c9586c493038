//! Shedding: a new question is refused (`429 overloaded`) when the questions
//! already waiting could not all be served within the latency goal even by
//! `--max-workers` workers. Queueing it anyway would only grow the queue and
//! every student's wait; refusing keeps memory and latency bounded, and cache
//! hits are still answered.
//!
//! The estimate is `(waiting + 1) * service_time / max_workers`, where
//! `waiting` is the queue's `num_pending` (read every 250 ms) plus the
//! questions this gateway accepted since, and `service_time` is the mean of
//! the workers' heartbeat `mean_job_ms` (until one reports:
//! `--service-time-estimate`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ebb_nats::{Heartbeat, Topology, subjects};
use futures::StreamExt;

use crate::config::OverloadArgs;
use crate::error::ApiError;

const DEPTH_INTERVAL: Duration = Duration::from_millis(250);
/// A worker silent this long no longer counts towards the service time.
const HEARTBEAT_STALE: Duration = Duration::from_secs(10);

/// How long the last of `waiting` questions waits for a worker.
pub fn estimated_wait(waiting: u64, service_time: Duration, max_workers: u32) -> Duration {
    service_time.mul_f64(waiting as f64 / f64::from(max_workers.max(1)))
}

#[derive(Debug)]
pub struct Overload {
    args: OverloadArgs,
    /// `num_pending` at the last reading.
    waiting: AtomicU64,
    /// Accepted by this gateway since that reading.
    accepted_since: AtomicU64,
    service_time_ms: AtomicU64,
    workers: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Overload {
    pub fn new(args: OverloadArgs) -> Self {
        Overload {
            service_time_ms: AtomicU64::new(args.service_time_estimate.as_millis() as u64),
            args,
            waiting: AtomicU64::new(0),
            accepted_since: AtomicU64::new(0),
            workers: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(Overloaded)` when one more question could not be served in time.
    pub fn check(&self) -> Result<(), ApiError> {
        let waiting =
            self.waiting.load(Ordering::Relaxed) + self.accepted_since.load(Ordering::Relaxed) + 1;
        let service = Duration::from_millis(self.service_time_ms.load(Ordering::Relaxed));
        let wait = estimated_wait(waiting, service, self.args.max_workers);
        if wait > self.args.latency_goal {
            return Err(ApiError::Overloaded {
                retry_after: (wait - self.args.latency_goal).min(Duration::from_secs(300)),
            });
        }
        Ok(())
    }

    pub fn accepted(&self) {
        self.accepted_since.fetch_add(1, Ordering::Relaxed);
    }

    /// Current figures, for `/admin/queue` and metrics.
    pub fn snapshot(&self) -> (u64, Duration) {
        (
            self.waiting.load(Ordering::Relaxed) + self.accepted_since.load(Ordering::Relaxed),
            Duration::from_millis(self.service_time_ms.load(Ordering::Relaxed)),
        )
    }

    /// Keeps the figures fresh until `stop` resolves.
    pub async fn watch(&self, topology: Topology, stop: impl Future<Output = ()>) {
        let client = topology.jetstream.client();
        let mut heartbeats = match client.subscribe(subjects::HEARTBEAT).await {
            Ok(subscriber) => Some(subscriber),
            Err(err) => {
                tracing::warn!(cause = %err, "no heartbeats: service time stays at the estimate");
                None
            }
        };
        let mut ticker = tokio::time::interval(DEPTH_INTERVAL);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = ticker.tick() => self.read_depth(&topology).await,
                Some(message) = async {
                    match heartbeats.as_mut() {
                        Some(subscriber) => subscriber.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&message.payload) {
                        self.heard(beat);
                    }
                }
            }
        }
    }

    async fn read_depth(&self, topology: &Topology) {
        // Only what was accepted before the query is surely in its answer:
        // those accepted during it may count twice (shedding a little early),
        // never zero times.
        let counted = self.accepted_since.load(Ordering::Relaxed);
        match ebb_nats::queue_depth(&topology.questions).await {
            Ok(depth) => {
                self.waiting.store(depth.waiting(), Ordering::Relaxed);
                self.accepted_since.fetch_sub(counted, Ordering::Relaxed);
            }
            Err(err) => tracing::debug!(cause = %err, "queue depth unknown; keeping the last"),
        }
        let now = Instant::now();
        let mut workers = self.workers.lock().expect("workers lock");
        workers.retain(|_, (_, seen)| now.duration_since(*seen) < HEARTBEAT_STALE);
        if !workers.is_empty() {
            let mean = workers.values().map(|(ms, _)| ms).sum::<f64>() / workers.len() as f64;
            self.service_time_ms
                .store(mean.round().max(1.0) as u64, Ordering::Relaxed);
        }
    }

    fn heard(&self, beat: Heartbeat) {
        if let Some(mean_job_ms) = beat.mean_job_ms {
            let mut workers = self.workers.lock().expect("workers lock");
            // Bounded by the fleet: one entry per live worker id.
            workers.insert(beat.worker_id, (mean_job_ms, Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overload(max_workers: u32, goal_s: u64, service_s: u64) -> Overload {
        Overload::new(OverloadArgs {
            max_workers,
            latency_goal: Duration::from_secs(goal_s),
            service_time_estimate: Duration::from_secs(service_s),
        })
    }

    #[test]
    fn the_wait_scales_with_backlog_over_workers() {
        assert_eq!(
            estimated_wait(100, Duration::from_secs(10), 50),
            Duration::from_secs(20)
        );
    }

    #[test]
    fn questions_past_the_goal_are_shed_with_the_excess_as_retry_after() {
        // 2 workers, 10 s each, 30 s goal: 6 waiting questions fit, the 7th not.
        let overload = overload(2, 30, 10);
        overload.waiting.store(5, Ordering::Relaxed);
        assert!(overload.check().is_ok());
        overload.accepted();
        match overload.check() {
            Err(ApiError::Overloaded { retry_after }) => {
                assert_eq!(retry_after, Duration::from_secs(5))
            }
            other => panic!("expected overloaded, got {other:?}"),
        }
    }
}
