//! The decision: how many workers should run, and why. A pure function of
//! what was observed, what was decided before, the config and the time, so
//! the live loop and the replay simulator run exactly the same code.
//!
//! [`decide`] runs named stages in order:
//! 1. `manual_decision`: a manual override, while it lasts, replaces the
//!    policy;
//! 2. `apply_rules` (seed-style rules) or `target_tracking` (with panic
//!    mode, in [`crate::target`]) proposes a count; `activate`: questions waiting at zero workers
//!    always get one;
//! 3. `within_limits`: the timetable raises it to its floor (for `learn`
//!    entries, at least what the entry's previous opening needed);
//!    `min`/`max` clamp it;
//! 4. `cool_down`: going up happens at once; going down waits for the
//!    stabilization window, then goes to the most the policy wanted during
//!    it (rules: one `step_down`), and, for the last worker, waits for the
//!    idle window; `next_wake` says when to ask again.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{Condition, Metric, Rules, ScalerConfig};
use crate::learned::LearnedFloors;
use crate::miss_budget::{MissBudget, ScaleToZero};
use crate::reason::{Reading, Reason};
use crate::target::target_tracking;
pub use crate::target::{erlang_staffing, workers_for};
use ebb_schedule::timetable::{Window, highest_floor};

/// Workers by state, as the scaler sees them, and the slots of the ready
/// ones: a worker answers up to `slots` questions at once (its batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WorkerCounts {
    /// Started, model still loading.
    pub starting: u32,
    /// Ready and idle.
    pub idle: u32,
    /// Ready with at least one question in flight.
    pub busy: u32,
    /// Finishing their last question before stopping.
    pub draining: u32,
    /// Not ready in time, silent, or crash-looping: not capacity.
    pub unhealthy: u32,
    /// Slots of the idle and busy workers.
    pub slots: u32,
    /// Of those, the ones answering a question now.
    pub active_slots: u32,
}

impl WorkerCounts {
    /// Workers that are or will soon be able to answer.
    pub fn capacity(&self) -> u32 {
        self.starting + self.idle + self.busy
    }

    pub fn ready(&self) -> u32 {
        self.idle + self.busy
    }

    /// Busy fraction of the ready workers' slots (0 when none is ready): a
    /// worker with 8 slots and 4 questions in flight is half busy, not busy.
    pub fn utilization(&self) -> f64 {
        match self.slots {
            0 => 0.0,
            slots => f64::from(self.active_slots.min(slots)) / f64::from(slots),
        }
    }
}

/// Signals gathered for one decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Observation {
    /// Questions waiting or being answered (`num_pending + num_ack_pending`).
    pub lag: u64,
    /// Of those, the questions no worker has taken yet (`num_pending`).
    pub waiting: u64,
    /// Age of the oldest question no worker has taken.
    #[serde(serialize_with = "ebb_runtime::duration::serialize_seconds")]
    pub oldest_waiting: Duration,
    /// Arrivals per second over the stable window.
    pub arrival_rate: f64,
    /// Arrivals per second over the short panic window.
    pub panic_arrival_rate: f64,
    /// Answers per second over the stable window.
    pub completion_rate: f64,
    /// Questions that arrived since the previous decision.
    pub new_arrivals: u64,
    /// Mean time one question spends in its worker (batched with the
    /// others in flight there), once measured: the service time of a slot.
    #[serde(serialize_with = "serialize_optional_seconds")]
    pub service_time: Option<Duration>,
    /// Slots per worker the plan counts on: what the workers report (the
    /// most common `slots`), or `target.slots_per_worker` before any does.
    pub slots_per_worker: u32,
    /// Mean acceptance-to-answer time, once measured.
    #[serde(serialize_with = "serialize_optional_seconds")]
    pub avg_response_time: Option<Duration>,
    /// 90th percentile of measured worker cold starts, their download
    /// phase left out (see `Signals::cold_start_p90`).
    #[serde(serialize_with = "serialize_optional_seconds")]
    pub cold_start_p90: Option<Duration>,
    pub workers: WorkerCounts,
}

fn serialize_optional_seconds<S: serde::Serializer>(
    value: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(duration) => serializer.serialize_some(&duration.as_secs_f64()),
        None => serializer.serialize_none(),
    }
}

impl Observation {
    fn metric(&self, metric: Metric) -> f64 {
        match metric {
            Metric::RequestPerSecond => self.arrival_rate,
            Metric::AvgResponseTime => self.avg_response_time.map_or(0.0, |d| d.as_secs_f64()),
            Metric::QueueDepth => self.lag as f64,
            Metric::QueueAge => self.oldest_waiting.as_secs_f64(),
            Metric::WorkerUtilization => self.workers.utilization(),
        }
    }

    /// Nothing waiting, arriving or being answered.
    fn is_idle(&self) -> bool {
        self.lag == 0
            && self.new_arrivals == 0
            && self.workers.busy == 0
            && self.workers.active_slots == 0
    }
}

/// A manual `POST /scale`, in force until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Override {
    pub count: u32,
    pub expires: DateTime<Utc>,
}

/// What one decision hands to the next.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PolicyState {
    pub desired: u32,
    /// Since when each rule condition has held (`scale_up` then `scale_down`).
    pub condition_since: Vec<Option<DateTime<Utc>>>,
    /// Since when the policy has wanted fewer workers than `desired`.
    pub lower_since: Option<DateTime<Utc>>,
    /// The most it has wanted since `lower_since`.
    pub lower_peak: Option<u32>,
    /// Since when there has been no work at all.
    pub idle_since: Option<DateTime<Utc>>,
    /// Panic mode lasts until then.
    pub panic_until: Option<DateTime<Utc>>,
    pub manual: Option<Override>,
    /// What the timetable's `learn` windows needed last time.
    pub learned: LearnedFloors,
    /// Questions and wake-ups' late ones over the miss-budget window.
    pub miss_budget: MissBudget,
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub desired: u32,
    /// Why `desired` is what it is, for the decision log.
    pub reason: Reason,
    /// When a new decision could differ even without new signals.
    #[serde(serialize_with = "ebb_runtime::duration::serialize_seconds")]
    pub next_wake: Duration,
    /// The timetable window holding a floor now, if any.
    pub floor: Option<Window>,
    pub state: PolicyState,
}

/// The config the policy reads (its timetable compiled).
#[derive(Debug, Clone)]
pub struct Policy {
    pub config: ScalerConfig,
}

/// Longest the scaler sleeps at zero workers (arrivals wake it anyway).
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Pre-warm lead when neither configured nor measured.
const DEFAULT_PREWARM_LEAD: Duration = Duration::from_secs(60);

impl Policy {
    pub fn new(config: ScalerConfig) -> Policy {
        Policy { config }
    }

    /// How early timetable windows start their workers.
    pub fn prewarm_lead(&self, observation: &Observation) -> Duration {
        self.config
            .prewarm_lead
            .or(observation.cold_start_p90)
            .unwrap_or(DEFAULT_PREWARM_LEAD)
    }
}

fn since(now: DateTime<Utc>, start: DateTime<Utc>) -> Duration {
    (now - start).to_std().unwrap_or_default()
}

/// What the policy alone proposes, before floors, limits and cooldowns.
pub(crate) struct Proposal {
    pub(crate) wanted: u32,
    pub(crate) reason: Reason,
}

/// Decides the worker count. Pure: no I/O, no clock, no randomness.
pub fn decide(
    observation: &Observation,
    state: &PolicyState,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Decision {
    let mut next = state.clone();
    next.idle_since = match (observation.is_idle(), state.idle_since) {
        (false, _) => None,
        (true, Some(start)) => Some(start),
        (true, None) => Some(now),
    };
    next.miss_budget
        .observe(observation, state.desired, &policy.config, now);
    let lead = policy.prewarm_lead(observation);
    let active = policy.config.timetable.active_windows(now, lead);
    next.learned.open(&active);
    let floor = highest_floor(active.iter().cloned().map(|mut window| {
        if window.learn {
            window.min_workers = next.learned.floor(&window, now, lead);
        }
        window
    }));
    if let Some(manual) = state.manual.clone().filter(|manual| manual.expires > now) {
        return manual_decision(manual, policy, next, floor, now);
    }
    next.manual = None;

    let (proposal, demand) = match &policy.config.rules {
        Some(rules) => {
            let proposal = apply_rules(rules, observation, state, &mut next, now);
            let demand = proposal.wanted;
            (proposal, demand)
        }
        None => target_tracking(policy, observation, state.desired, &mut next, now),
    };
    next.learned.record(&active, now, demand);
    let proposal = within_limits(
        activate(proposal, observation, state.desired),
        floor.as_ref(),
        &policy.config,
    );
    let (desired, reason) = cool_down(proposal, policy, observation, &mut next, now);
    next.desired = desired;
    Decision {
        desired,
        reason,
        next_wake: next_wake(desired, floor.is_none(), observation, policy, now),
        floor,
        state: next,
    }
}

/// A manual override replaces the policy while it lasts.
fn manual_decision(
    manual: Override,
    policy: &Policy,
    mut next: PolicyState,
    floor: Option<Window>,
    now: DateTime<Utc>,
) -> Decision {
    let resources = &policy.config.resources;
    let desired = manual
        .count
        .clamp(resources.min_instances, resources.max_instances);
    next.desired = desired;
    next.lower_since = None;
    next.lower_peak = None;
    Decision {
        desired,
        reason: Reason::Manual {
            count: desired,
            until: manual.expires,
        },
        next_wake: policy.config.tick.min(since(manual.expires, now)),
        floor,
        state: next,
    }
}

/// Questions waiting at zero workers always get one, whatever the policy.
fn activate(proposal: Proposal, observation: &Observation, current: u32) -> Proposal {
    let asked = observation.lag > 0 || observation.new_arrivals > 0;
    if current == 0 && asked && proposal.wanted == 0 {
        return Proposal {
            wanted: 1,
            reason: Reason::Activation {
                waiting: observation.lag.max(observation.new_arrivals),
            },
        };
    }
    proposal
}

/// Raises the proposal to the timetable's floor, then clamps it to
/// `min_instances..=max_instances`.
fn within_limits(proposal: Proposal, floor: Option<&Window>, config: &ScalerConfig) -> Proposal {
    let Proposal {
        mut wanted,
        mut reason,
    } = proposal;
    if let Some(window) = floor
        && window.min_workers > wanted
    {
        wanted = window.min_workers;
        reason = Reason::TimetableFloor {
            window: window.name.clone(),
            workers: window.min_workers,
        };
    }
    let (min, max) = (
        config.resources.min_instances,
        config.resources.max_instances,
    );
    if wanted < min {
        reason = Reason::MinInstances(min);
    } else if wanted > max {
        reason = Reason::Capped {
            wanted: Box::new(reason),
            max,
        };
    }
    Proposal {
        wanted: wanted.clamp(min, max),
        reason,
    }
}

/// Going up happens at once; going down waits for the stabilization
/// window (the last worker, for the idle window and `scale_to_zero`).
fn cool_down(
    proposal: Proposal,
    policy: &Policy,
    observation: &Observation,
    next: &mut PolicyState,
    now: DateTime<Utc>,
) -> (u32, Reason) {
    let Proposal { wanted, reason } = proposal;
    let config = &policy.config;
    let cooldowns = &config.cooldowns;
    let current = next.desired;
    if wanted >= current || current == 1 {
        next.lower_since = None;
        next.lower_peak = None;
    }
    if wanted >= current {
        return (wanted, reason);
    }
    if current == 1 {
        return match next.idle_since {
            Some(idle) if since(now, idle) >= cooldowns.scale_to_zero_idle => {
                last_worker(since(now, idle), policy, observation, next, now)
            }
            _ => (
                current,
                Reason::AwaitingIdle {
                    window: cooldowns.scale_to_zero_idle,
                },
            ),
        };
    }
    let lower_since = *next.lower_since.get_or_insert(now);
    let peak = next.lower_peak.map_or(wanted, |peak| peak.max(wanted));
    next.lower_peak = Some(peak);
    if since(now, lower_since) < cooldowns.scale_down_stabilization {
        return (current, Reason::Stabilizing(Box::new(reason)));
    }
    // Target tracking drops to the most it wanted in the window (a big
    // fleet shrinks in one go once the load has really gone); rules move
    // one step_down at a time.
    let desired = match &config.rules {
        Some(rules) => current.saturating_sub(rules.step_down).max(wanted),
        None => peak,
    }
    .max(1);
    next.lower_since = (desired > wanted).then_some(now);
    next.lower_peak = (desired > wanted).then_some(wanted);
    let stable = Reason::Stable {
        wanted: Box::new(reason),
        window: cooldowns.scale_down_stabilization,
        to: desired,
    };
    (desired, stable)
}

/// Idle for the window: whether the last worker goes, by `scale_to_zero`.
fn last_worker(
    idle: Duration,
    policy: &Policy,
    observation: &Observation,
    next: &PolicyState,
    now: DateTime<Utc>,
) -> (u32, Reason) {
    match policy.config.scale_to_zero {
        ScaleToZero::Always => (0, Reason::IdleToZero { idle, budget: None }),
        ScaleToZero::Never => (1, Reason::NeverToZero),
        ScaleToZero::Budgeted => {
            let budget = next.miss_budget.reading(observation, &policy.config, now);
            if budget.pays() {
                let budget = Some(budget);
                (0, Reason::IdleToZero { idle, budget })
            } else {
                (1, Reason::MissBudgetFloor(budget))
            }
        }
    }
}

/// When a new decision could differ even without new signals: every tick,
/// except at zero with nothing running, where arrivals wake the scaler and
/// only the next timetable window needs a timer.
fn next_wake(
    desired: u32,
    no_floor: bool,
    observation: &Observation,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Duration {
    let tick = policy.config.tick;
    let nothing_running = observation.workers == WorkerCounts::default();
    if !(desired == 0 && no_floor && nothing_running) {
        return tick;
    }
    policy
        .config
        .timetable
        .next_window(now)
        .map(|window| since(window.start, now).saturating_sub(policy.prewarm_lead(observation)))
        .unwrap_or(MAX_SLEEP)
        .clamp(tick.min(MAX_SLEEP), MAX_SLEEP)
}

/// Seed-style rules: up by `step_up` when any `scale_up` condition has held
/// for its duration; down by `step_down` when all `scale_down` ones have.
fn apply_rules(
    rules: &Rules,
    observation: &Observation,
    state: &PolicyState,
    next: &mut PolicyState,
    now: DateTime<Utc>,
) -> Proposal {
    let conditions: Vec<(&Condition, bool)> = rules
        .scale_up
        .iter()
        .map(|c| (c, observation.metric(c.metric) > c.threshold))
        .chain(
            rules
                .scale_down
                .iter()
                .map(|c| (c, observation.metric(c.metric) < c.threshold)),
        )
        .collect();
    next.condition_since = conditions
        .iter()
        .enumerate()
        .map(|(index, (_, holds))| {
            match (holds, state.condition_since.get(index).copied().flatten()) {
                (false, _) => None,
                (true, Some(start)) => Some(start),
                (true, None) => Some(now),
            }
        })
        .collect();
    let ups = rules.scale_up.len();
    let held = |index: usize| {
        let (condition, _) = conditions[index];
        next.condition_since[index].filter(|start| since(now, *start) >= condition.duration)
    };
    let reading = |index: usize| {
        let (condition, _) = conditions[index];
        Reading {
            metric: condition.metric,
            value: observation.metric(condition.metric),
            above: index < ups,
            threshold: condition.threshold,
            held: since(now, next.condition_since[index].unwrap_or(now)),
        }
    };
    let current = state.desired;
    if let Some(index) = (0..ups).find(|&index| held(index).is_some()) {
        let reason = Reason::Rules(vec![reading(index)]);
        // Each step must be earned anew: the next one waits a full duration
        // again, giving the new workers time to start.
        for since in next.condition_since.iter_mut().take(ups).flatten() {
            *since = now;
        }
        return Proposal {
            wanted: current.saturating_add(rules.step_up),
            reason,
        };
    }
    let downs: Vec<usize> = (ups..conditions.len()).collect();
    if !downs.is_empty() && downs.iter().all(|&index| held(index).is_some()) {
        return Proposal {
            wanted: current.saturating_sub(rules.step_down),
            reason: Reason::Rules(downs.iter().map(|&index| reading(index)).collect()),
        };
    }
    Proposal {
        wanted: current,
        reason: Reason::RulesQuiet,
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
