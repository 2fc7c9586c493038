//! Shedding: a new question is refused (`429 overloaded`) when the questions
//! already waiting could not all be served within the latency goal even by
//! `--max-workers` workers. Queueing it anyway would only grow the queue and
//! every student's wait; refusing keeps memory and latency bounded, and cache
//! hits are still answered.
//!
//! The estimate is `(waiting + 1) * service_time / max_workers`, where
//! `waiting` is the queue's `num_pending` (read every 250 ms) plus the
//! questions this gateway queued since and those it is queueing now (a place
//! is reserved before the estimate, so a burst of concurrent requests cannot
//! all pass on one count), and `service_time` is the mean of
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
    /// Queued by this gateway since that reading.
    accepted_since: AtomicU64,
    /// Places reserved by requests still publishing.
    in_flight: AtomicU64,
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
            in_flight: AtomicU64::new(0),
            workers: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a place for one more question, or refuses it (`Overloaded`)
    /// when it could not be served in time. The place is taken before the
    /// estimate, so concurrent requests cannot all pass on the same count;
    /// it is given back when the returned guard drops unkept.
    pub fn reserve(&self) -> Result<Reservation<'_>, ApiError> {
        let others = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let reservation = Reservation {
            overload: self,
            kept: false,
        };
        let waiting = self.waiting_now() + others + 1;
        let service = Duration::from_millis(self.service_time_ms.load(Ordering::Relaxed));
        let wait = estimated_wait(waiting, service, self.args.max_workers);
        if wait > self.args.latency_goal {
            return Err(ApiError::Overloaded {
                retry_after: (wait - self.args.latency_goal).min(Duration::from_secs(300)),
            });
        }
        Ok(reservation)
    }

    /// Waiting at the last reading plus queued since (not in-flight places).
    fn waiting_now(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed) + self.accepted_since.load(Ordering::Relaxed)
    }

    /// Current figures, for `/admin/queue` and metrics.
    pub fn snapshot(&self) -> (u64, Duration) {
        (
            self.waiting_now(),
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
        // Only what was queued before the query is surely in its answer:
        // questions queued during it may count twice (shedding a little
        // early), never zero times.
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

/// A place in the estimate for one question; given back on drop unless the
/// question was queued.
#[derive(Debug)]
pub struct Reservation<'a> {
    overload: &'a Overload,
    kept: bool,
}

impl Reservation<'_> {
    /// The question is queued: it now counts until the next depth reading.
    pub fn keep(mut self) {
        self.kept = true;
        self.overload.accepted_since.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        // Kept or not, the place is no longer in flight (`keep` counted it).
        self.overload.in_flight.fetch_sub(1, Ordering::Relaxed);
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
        overload.waiting.store(4, Ordering::Relaxed);
        overload.reserve().unwrap().keep();
        // A place not kept (the publish failed) is given back.
        drop(overload.reserve().unwrap());
        overload.reserve().unwrap().keep();
        match overload.reserve() {
            Err(ApiError::Overloaded { retry_after }) => {
                assert_eq!(retry_after, Duration::from_secs(5))
            }
            other => panic!("expected overloaded, got {other:?}"),
        }
    }
}
