//! Turning raw events (question arrivals, heartbeats, pool listings, queue
//! depth) into the [`Observation`] the policy decides on.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ebb_nats::{DownloadProgress, Heartbeat, PhaseTime, QueueDepth, StartPhase, WorkerState};
use serde::Serialize;

use crate::config::Health;
use crate::listing::{Phase, PoolWorker};
use crate::policy::{Observation, WorkerCounts};

/// Cold starts kept for the p90.
const COLD_START_SAMPLES: usize = 50;
/// A ready time this recent (two heartbeat intervals) is a new cold start.
const FRESH_READY_MS: u64 = 5_000;
/// New cold starts held until the loop takes them.
const NEW_COLD_STARTS: usize = 16;

/// One worker's cold start: start to ready, and its phases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewColdStart {
    pub whole: Duration,
    pub phases: Vec<PhaseTime>,
}

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
    /// What its last heartbeat said (`None` before the first).
    pub state: Option<WorkerState>,
    /// While loading: the start phase in progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<StartPhase>,
    /// While downloading its model: how far, and the same as text
    /// (`downloading 3.1 of 15.2 GB (...)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadProgress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_text: Option<String>,
    /// The start phases it finished, with their durations.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub start_phases: Vec<PhaseTime>,
    /// With state `failed`: why it cannot start, in its own words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Cold starts as `/status` shows them: the 90th percentiles, in ms.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ColdStarts {
    /// Cold starts measured (the most recent ones are kept).
    pub samples: usize,
    /// Start to ready, whole.
    pub p90_ms: Option<f64>,
    /// Start to ready without the download phase: what the pre-warm lead
    /// plans with.
    pub p90_without_download_ms: Option<f64>,
    /// Each reported phase's own p90, by phase name.
    pub phase_p90_ms: BTreeMap<&'static str, f64>,
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
    /// The same starts without their download phase (the whole start when
    /// a worker reports no phases).
    cold_starts_without_download: VecDeque<Duration>,
    phase_times: HashMap<StartPhase, VecDeque<Duration>>,
    /// Cold starts since the loop last took them.
    new_cold_starts: VecDeque<NewColdStart>,
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
            cold_starts_without_download: VecDeque::new(),
            phase_times: HashMap::new(),
            new_cold_starts: VecDeque::new(),
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
            self.cold_start(&beat, ready);
        }
        self.heartbeats.insert(beat.worker_id.clone(), (beat, now));
    }

    fn cold_start(&mut self, beat: &Heartbeat, ready_at_ms: u64) {
        let whole = Duration::from_millis(ready_at_ms.saturating_sub(beat.started_at_ms));
        let download = beat
            .start_phases
            .iter()
            .filter(|p| p.phase == StartPhase::Download)
            .map(|p| Duration::from_millis(p.ms))
            .sum();
        push_bounded(&mut self.cold_starts, whole, COLD_START_SAMPLES);
        push_bounded(
            &mut self.cold_starts_without_download,
            whole.saturating_sub(download),
            COLD_START_SAMPLES,
        );
        for time in &beat.start_phases {
            let samples = self.phase_times.entry(time.phase).or_default();
            push_bounded(samples, Duration::from_millis(time.ms), COLD_START_SAMPLES);
        }
        let start = NewColdStart {
            whole,
            phases: beat.start_phases.clone(),
        };
        push_bounded(&mut self.new_cold_starts, start, NEW_COLD_STARTS);
    }

    /// The cold starts since the last call (at most the last
    /// [`NEW_COLD_STARTS`]), for histograms.
    pub fn take_new_cold_starts(&mut self) -> Vec<NewColdStart> {
        self.new_cold_starts.drain(..).collect()
    }

    /// The cold-start p90 the pre-warm lead plans with: without the
    /// download phase. A model download happens once per model cache (the
    /// `HF_HOME` volume workers share); a lead learnt from the first start
    /// of a fresh machine, 15 GB fetched, would wake workers far too early
    /// every day after. Workers that report no phases count whole. (Where
    /// every start downloads, with no shared cache, set `prewarm_lead`.)
    fn cold_start_p90(&self) -> Option<Duration> {
        p90(&self.cold_starts_without_download)
    }

    pub fn cold_starts(&self) -> ColdStarts {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        ColdStarts {
            samples: self.cold_starts.len(),
            p90_ms: p90(&self.cold_starts).map(ms),
            p90_without_download_ms: self.cold_start_p90().map(ms),
            phase_p90_ms: StartPhase::ALL
                .iter()
                .filter_map(|phase| {
                    let p = p90(self.phase_times.get(phase)?)?;
                    Some((phase.as_str(), ms(p)))
                })
                .collect(),
        }
    }

    /// The fatal start error a worker's last heartbeat gave, if it said
    /// `failed`.
    pub fn fatal_error(&self, worker_id: &str) -> Option<String> {
        let (beat, _) = self.heartbeats.get(worker_id)?;
        (beat.state == WorkerState::Failed).then(|| {
            beat.error
                .clone()
                .unwrap_or_else(|| "no reason given".into())
        })
    }

    /// Classifies each pool worker from its heartbeats and age. Silence
    /// counts only from `heard_since` (the scaler's own NATS link): while
    /// the link is down (`None`) no worker is judged by silence, and after
    /// it is back each gets a whole heartbeat timeout to be heard again, so
    /// a NATS outage does not read as a fleet of dead workers.
    pub fn classify(
        &mut self,
        workers: &[PoolWorker],
        health: &Health,
        heard_since: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Vec<WorkerView> {
        let link_up = heard_since.is_some();
        let silent_for = |last: DateTime<Utc>| {
            let from = heard_since.map_or(last, |since| last.max(since));
            (now - from).to_std().unwrap_or_default()
        };
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
                        if link_up && silent_for(*heard) > health.heartbeat_timeout =>
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
                        WorkerState::Failed => (
                            Condition::Unhealthy,
                            Some(format!(
                                "cannot start: {}",
                                beat.error.as_deref().unwrap_or("no reason given")
                            )),
                        ),
                    },
                    (_, None) if link_up && silent_for(known_since) > health.init_timeout => (
                        Condition::Unhealthy,
                        Some(format!("no heartbeat within {:?}", health.init_timeout)),
                    ),
                    (_, None) => (Condition::Starting, None),
                };
                let (slots, active) = beat.map_or((0, 0), |(b, _)| slots_in_use(b));
                let beat = beat.map(|(b, _)| b);
                let download = beat.and_then(|b| b.download.clone());
                WorkerView {
                    id: worker.id.clone(),
                    condition,
                    started_at: worker.started_at,
                    ready_at_ms: beat.and_then(|b| b.ready_at_ms),
                    jobs_done: beat.map_or(0, |b| b.jobs_done),
                    slots,
                    active,
                    prefill_tokens: beat.map_or(0, |b| b.prefill_tokens),
                    prefill_tokens_saved: beat.map_or(0, |b| b.prefill_tokens_saved),
                    why_unhealthy: why,
                    state: beat.map(|b| b.state),
                    phase: beat.and_then(|b| b.phase),
                    download_text: download.as_ref().map(ToString::to_string),
                    download,
                    start_phases: beat.map(|b| b.start_phases.clone()).unwrap_or_default(),
                    error: beat.and_then(|b| b.error.clone()),
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

fn push_bounded<T>(samples: &mut VecDeque<T>, sample: T, bound: usize) {
    samples.push_back(sample);
    while samples.len() > bound {
        samples.pop_front();
    }
}

fn p90(samples: &VecDeque<Duration>) -> Option<Duration> {
    let mut sorted: Vec<Duration> = samples.iter().copied().collect();
    sorted.sort();
    ebb_runtime::quantile::nearest_rank(&sorted, 0.9)
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
#[path = "signals_tests.rs"]
mod tests;
