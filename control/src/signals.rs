//! Turning raw events (question arrivals, heartbeats, pool listings, queue
//! depth) into the [`Observation`] the policy decides on.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ebb_nats::{Heartbeat, QueueDepth, WorkerState};
use serde::Serialize;

use crate::config::Health;
use crate::listing::{Phase, PoolWorker};
use crate::policy::{Observation, WorkerCounts};

/// Cold starts kept for the p90.
const COLD_START_SAMPLES: usize = 50;
/// A ready time this recent (two heartbeat intervals) is a new cold start.
const FRESH_READY_MS: u64 = 5_000;

/// Events per second, counted in one-second buckets over a bounded window.
#[derive(Debug, Default)]
pub struct RateCounter {
    buckets: VecDeque<(i64, u64)>,
    horizon: i64,
}

impl RateCounter {
    pub fn new(horizon: Duration) -> RateCounter {
        RateCounter {
            buckets: VecDeque::new(),
            horizon: horizon.as_secs().max(1) as i64,
        }
    }

    pub fn add(&mut self, now: DateTime<Utc>, count: u64) {
        let second = now.timestamp();
        match self.buckets.back_mut() {
            Some((last, total)) if *last == second => *total += count,
            _ => self.buckets.push_back((second, count)),
        }
        while self
            .buckets
            .front()
            .is_some_and(|(s, _)| *s <= second - self.horizon)
        {
            self.buckets.pop_front();
        }
    }

    /// Mean rate over the last `window` (at most the horizon).
    pub fn rate(&self, now: DateTime<Utc>, window: Duration) -> f64 {
        let seconds = (window.as_secs().max(1) as i64).min(self.horizon);
        let from = now.timestamp() - seconds;
        let count: u64 = self
            .buckets
            .iter()
            .filter(|(s, _)| *s > from)
            .map(|(_, c)| c)
            .sum();
        count as f64 / seconds as f64
    }
}

/// How the scaler classifies one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    Starting,
    Idle,
    Busy,
    Draining,
    Unhealthy,
}

/// One worker as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    pub id: String,
    pub condition: Condition,
    pub started_at: DateTime<Utc>,
    pub ready_at_ms: Option<u64>,
    pub jobs_done: u64,
    /// Questions it answers at once, and how many it answers now (0 and 0
    /// before its first heartbeat).
    pub slots: u32,
    pub active: u32,
    /// Prompt tokens it ran, and those its prefix cache saved it running.
    pub prefill_tokens: u64,
    pub prefill_tokens_saved: u64,
    pub why_unhealthy: Option<String>,
}

/// The two windows arrival rates are read over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateWindows {
    pub stable: Duration,
    pub panic: Duration,
}

/// Everything the scaler has heard, between decisions.
#[derive(Debug)]
pub struct Signals {
    windows: RateWindows,
    /// Slots per worker the plan counts on before any worker reports its own.
    planned_slots: u32,
    arrivals: RateCounter,
    completions: RateCounter,
    new_arrivals: u64,
    heartbeats: HashMap<String, (Heartbeat, DateTime<Utc>)>,
    /// When this scaler first listed each worker: an adopted worker's
    /// silence is timed from here, not from its (old) start.
    first_seen: HashMap<String, DateTime<Utc>>,
    cold_starts: VecDeque<Duration>,
    /// The first question no worker has been there to take.
    pub(crate) first_unserved_arrival: Option<DateTime<Utc>>,
}

impl Signals {
    pub fn new(windows: RateWindows, planned_slots: u32) -> Signals {
        let horizon = windows.stable.max(windows.panic);
        Signals {
            windows,
            planned_slots,
            arrivals: RateCounter::new(horizon),
            completions: RateCounter::new(horizon),
            new_arrivals: 0,
            heartbeats: HashMap::new(),
            first_seen: HashMap::new(),
            cold_starts: VecDeque::new(),
            first_unserved_arrival: None,
        }
    }

    pub fn question_arrived(&mut self, now: DateTime<Utc>) {
        self.arrivals.add(now, 1);
        self.new_arrivals += 1;
        self.first_unserved_arrival.get_or_insert(now);
    }

    pub fn heartbeat(&mut self, beat: Heartbeat, now: DateTime<Utc>) {
        let previous = self.heartbeats.get(&beat.worker_id).map(|(b, _)| b);
        let done_before = previous.map_or(beat.jobs_done, |b| b.jobs_done);
        self.completions
            .add(now, beat.jobs_done.saturating_sub(done_before));
        // A cold start counts once, while fresh: a worker whose entry was
        // pruned (another pool's, or one already gone) must not count again.
        let fresh = beat
            .ready_at_ms
            .is_some_and(|ready| beat.sent_at_ms.saturating_sub(ready) <= FRESH_READY_MS);
        let newly_ready = previous.is_none_or(|b| b.ready_at_ms.is_none()) && fresh;
        if newly_ready && let Some(ready) = beat.ready_at_ms {
            self.cold_starts.push_back(Duration::from_millis(
                ready.saturating_sub(beat.started_at_ms),
            ));
            if self.cold_starts.len() > COLD_START_SAMPLES {
                self.cold_starts.pop_front();
            }
        }
        self.heartbeats.insert(beat.worker_id.clone(), (beat, now));
    }

    fn cold_start_p90(&self) -> Option<Duration> {
        let mut samples: Vec<Duration> = self.cold_starts.iter().copied().collect();
        samples.sort();
        ebb_runtime::quantile::nearest_rank(&samples, 0.9)
    }

    /// Classifies each pool worker from its heartbeats and age.
    pub fn classify(
        &mut self,
        workers: &[PoolWorker],
        health: &Health,
        now: DateTime<Utc>,
    ) -> Vec<WorkerView> {
        for worker in workers {
            self.first_seen.entry(worker.id.clone()).or_insert(now);
        }
        self.first_seen
            .retain(|id, _| workers.iter().any(|w| &w.id == id));
        workers
            .iter()
            .filter(|w| !matches!(w.phase, Phase::Exited { .. }))
            .map(|worker| {
                let beat = self.heartbeats.get(&worker.id);
                let known_since = self
                    .first_seen
                    .get(&worker.id)
                    .map_or(worker.started_at, |seen| (*seen).max(worker.started_at));
                let age = (now - known_since).to_std().unwrap_or_default();
                let (condition, why) = match (&worker.phase, beat) {
                    (Phase::Stopping { .. }, _) => (Condition::Draining, None),
                    (_, Some((_, heard)))
                        if (now - *heard).to_std().unwrap_or_default()
                            > health.heartbeat_timeout =>
                    {
                        (
                            Condition::Unhealthy,
                            Some(format!("no heartbeat for {:?}", health.heartbeat_timeout)),
                        )
                    }
                    (_, Some((beat, _))) => match beat.state {
                        WorkerState::Loading if age > health.init_timeout => (
                            Condition::Unhealthy,
                            Some(format!("not ready after {:?}", health.init_timeout)),
                        ),
                        WorkerState::Loading => (Condition::Starting, None),
                        // A batching worker may say `ready` while it still
                        // has free slots; with a question in flight it is busy.
                        WorkerState::Ready if beat.active > 0 => (Condition::Busy, None),
                        WorkerState::Ready => (Condition::Idle, None),
                        WorkerState::Busy => (Condition::Busy, None),
                        WorkerState::Draining => (Condition::Draining, None),
                    },
                    (_, None) if age > health.init_timeout => (
                        Condition::Unhealthy,
                        Some(format!("no heartbeat within {:?}", health.init_timeout)),
                    ),
                    (_, None) => (Condition::Starting, None),
                };
                let (slots, active) = beat.map_or((0, 0), |(b, _)| slots_in_use(b));
                WorkerView {
                    id: worker.id.clone(),
                    condition,
                    started_at: worker.started_at,
                    ready_at_ms: beat.and_then(|(b, _)| b.ready_at_ms),
                    jobs_done: beat.map_or(0, |(b, _)| b.jobs_done),
                    slots,
                    active,
                    prefill_tokens: beat.map_or(0, |(b, _)| b.prefill_tokens),
                    prefill_tokens_saved: beat.map_or(0, |(b, _)| b.prefill_tokens_saved),
                    why_unhealthy: why,
                }
            })
            .collect()
    }

    /// Builds the observation and resets the per-decision arrival count.
    /// Heartbeats of workers the pool no longer has are dropped.
    pub fn observe(
        &mut self,
        depth: &QueueDepth,
        workers: &[WorkerView],
        now: DateTime<Utc>,
    ) -> Observation {
        self.heartbeats
            .retain(|id, _| workers.iter().any(|w| &w.id == id));
        let mut counts = WorkerCounts::default();
        for worker in workers {
            match worker.condition {
                Condition::Starting => counts.starting += 1,
                Condition::Idle => counts.idle += 1,
                Condition::Busy => counts.busy += 1,
                Condition::Draining => counts.draining += 1,
                Condition::Unhealthy => counts.unhealthy += 1,
            }
            // Only ready workers' slots are capacity (a draining one takes no
            // new question).
            if matches!(worker.condition, Condition::Idle | Condition::Busy) {
                counts.slots += worker.slots;
                counts.active_slots += worker.active;
            }
        }
        let mean = |field: fn(&Heartbeat) -> Option<f64>| {
            let values: Vec<f64> = self
                .heartbeats
                .values()
                .filter_map(|(b, _)| field(b))
                .collect();
            (!values.is_empty()).then(|| {
                Duration::from_secs_f64(values.iter().sum::<f64>() / values.len() as f64 / 1000.0)
            })
        };
        Observation {
            lag: depth.lag(),
            waiting: depth.waiting(),
            oldest_waiting: depth.oldest_waiting(),
            arrival_rate: self.arrivals.rate(now, self.windows.stable),
            panic_arrival_rate: self.arrivals.rate(now, self.windows.panic),
            completion_rate: self.completions.rate(now, self.windows.stable),
            new_arrivals: std::mem::take(&mut self.new_arrivals),
            service_time: mean(|b| b.mean_job_ms),
            slots_per_worker: common_slots(self.heartbeats.values().map(|(b, _)| b))
                .unwrap_or(self.planned_slots),
            avg_response_time: mean(|b| b.mean_response_ms),
            cold_start_p90: self.cold_start_p90(),
            workers: counts,
        }
    }
}

/// A heartbeat's slots and questions in flight. A worker from before
/// batching sends neither: one slot, in use while it says `busy`.
fn slots_in_use(beat: &Heartbeat) -> (u32, u32) {
    let slots = beat.slots.max(1);
    let active = match beat.state {
        WorkerState::Busy => beat.active.max(1),
        _ => beat.active,
    };
    (slots, active.min(slots))
}

/// The slots most workers have (a fleet runs one `--max-batch`; mid-rollout
/// the majority's is the better guess). Ties go to the smaller, which plans
/// more workers rather than fewer. `None` before any heartbeat.
fn common_slots<'a>(beats: impl Iterator<Item = &'a Heartbeat>) -> Option<u32> {
    let mut counts: Vec<(u32, usize)> = Vec::new();
    for beat in beats {
        let (slots, _) = slots_in_use(beat);
        match counts.iter_mut().find(|(s, _)| *s == slots) {
            Some((_, n)) => *n += 1,
            None => counts.push((slots, 1)),
        }
    }
    counts
        .into_iter()
        .max_by(|(a, n), (b, m)| n.cmp(m).then(b.cmp(a)))
        .map(|(slots, _)| slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn rates_cover_their_window_and_forget_the_rest() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let mut counter = RateCounter::new(Duration::from_secs(60));
        for second in 0..60 {
            counter.add(
                t + chrono::Duration::seconds(second),
                if second >= 54 { 10 } else { 1 },
            );
        }
        let now = t + chrono::Duration::seconds(59);
        assert_eq!(counter.rate(now, Duration::from_secs(6)), 10.0);
        assert!((counter.rate(now, Duration::from_secs(60)) - 114.0 / 60.0).abs() < 1e-9);
        let later = t + chrono::Duration::seconds(200);
        counter.add(later, 0);
        assert_eq!(counter.rate(later, Duration::from_secs(60)), 0.0);
        assert!(counter.buckets.len() <= 2, "old buckets are dropped");
    }

    /// From JSON, as the wire brings it: fields added to the contract later
    /// take their defaults here too.
    fn beat(id: &str, state: WorkerState, slots: u32, active: u32) -> Heartbeat {
        serde_json::from_value(serde_json::json!({
            "worker_id": id, "state": state, "model": "m@main", "started_at_ms": 0,
            "ready_at_ms": 1, "jobs_done": 0, "jobs_failed": 0, "slots": slots,
            "active": active, "mean_job_ms": 4000.0, "sent_at_ms": 60_000,
        }))
        .expect("a heartbeat")
    }

    #[test]
    fn capacity_is_counted_in_the_slots_the_workers_report() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let windows = RateWindows {
            stable: Duration::from_secs(60),
            panic: Duration::from_secs(6),
        };
        let mut signals = Signals::new(windows, 4);
        let pool: Vec<PoolWorker> = ["a", "b", "c", "old"]
            .iter()
            .map(|id| PoolWorker {
                id: (*id).to_owned(),
                started_at: t,
                phase: Phase::Running,
            })
            .collect();
        let depth = QueueDepth { priorities: vec![] };
        let health = Health::default();
        // Before any heartbeat: the config's slots per worker, no capacity yet.
        let views = signals.classify(&pool, &health, t);
        let observation = signals.observe(&depth, &views, t);
        assert_eq!(observation.slots_per_worker, 4);
        assert_eq!(observation.workers.slots, 0);

        signals.heartbeat(beat("a", WorkerState::Busy, 8, 4), t);
        // Says ready, but has a question in flight: busy.
        signals.heartbeat(beat("b", WorkerState::Ready, 8, 1), t);
        signals.heartbeat(beat("c", WorkerState::Ready, 8, 0), t);
        // A worker from before batching: no slots or active in its JSON.
        let mut old = serde_json::to_value(beat("old", WorkerState::Busy, 1, 0)).unwrap();
        old.as_object_mut()
            .unwrap()
            .retain(|k, _| k != "slots" && k != "active");
        signals.heartbeat(serde_json::from_value(old).unwrap(), t);

        let views = signals.classify(&pool, &health, t);
        let conditions: Vec<Condition> = views.iter().map(|v| v.condition).collect();
        use Condition::{Busy, Idle};
        assert_eq!(conditions, [Busy, Busy, Idle, Busy]);
        assert_eq!(
            (views[3].slots, views[3].active),
            (1, 1),
            "busy means one in use"
        );
        let observation = signals.observe(&depth, &views, t);
        assert_eq!(observation.slots_per_worker, 8, "most workers have 8");
        assert_eq!(observation.workers.slots, 25);
        assert_eq!(observation.workers.active_slots, 6);
        assert!((observation.workers.utilization() - 6.0 / 25.0).abs() < 1e-12);
        assert_eq!(observation.service_time, Some(Duration::from_secs(4)));
    }

    #[test]
    fn the_most_common_slots_win_and_ties_go_to_the_smaller() {
        let beats = [
            beat("a", WorkerState::Ready, 8, 0),
            beat("b", WorkerState::Ready, 4, 0),
            beat("c", WorkerState::Ready, 8, 0),
            beat("d", WorkerState::Ready, 4, 0),
        ];
        assert_eq!(common_slots(beats.iter()), Some(4));
        assert_eq!(common_slots(beats[..3].iter()), Some(8));
        assert_eq!(common_slots([].iter()), None);
        let zero = beat("z", WorkerState::Ready, 0, 0);
        assert_eq!(common_slots([zero].iter()), Some(1), "a worker has a slot");
    }
}
