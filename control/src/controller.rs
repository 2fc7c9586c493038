//! The controller both loops execute: the live scaler (`ebb_scaler::scaler`)
//! and the simulator's replay engine feed it the same inputs (question
//! arrivals, heartbeats, a pool listing, the queue depth) and carry out the
//! [`Plan`] its [`Controller::step`] returns. Everything between the raw
//! signals and "start 2, stop these" lives here, once: classifying workers,
//! building the observation, asking the [`Autoscaler`], replacing unhealthy
//! workers, the restart backoff of a crash loop, and which workers go first
//! when the count drops. Pure: no I/O, the clock passed in.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ebb_nats::{Heartbeat, QueueDepth};
use serde::Serialize;

use crate::config::Health;
use crate::listing::{Phase, PoolWorker};
use crate::policy::{Observation, Override, Policy, PolicyState, decide};
use crate::reason::Reason;
use crate::signals::{Condition, RateWindows, Signals, WorkerView};
use ebb_schedule::timetable::{Timetable, Window};

/// Longest wait before replacing a crash-looping worker.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(300);
/// Losses kept for `/status`.
const LOSS_HISTORY: usize = 10;

/// What decides the count: ebb's [`EbbPolicy`] live; in the simulator also
/// the compared KEDA-, Knative-like and fixed models.
pub trait Autoscaler {
    /// Workers wanted now, why, and when to be asked again.
    fn decide(&mut self, observation: &Observation, now: DateTime<Utc>) -> Verdict;
    /// Whether a question arriving while no worker is wanted asks at once
    /// (ebb's wake-up, Knative's activator) rather than at the next poll.
    fn wakes_on_arrival(&self) -> bool;
    /// Windows of the stable and the panic arrival rates it reads.
    fn rate_windows(&self) -> RateWindows {
        RateWindows {
            stable: Duration::from_secs(60),
            panic: Duration::from_secs(6),
        }
    }
    /// The first round found `running` workers already there (a restarted
    /// scaler, or a replay that starts warm): continue from them.
    fn adopt(&mut self, _running: u32) {}
    /// A manual `POST /scale`; models without one ignore it.
    fn manual_override(&mut self, _manual: Override) {}
}

impl<A: Autoscaler + ?Sized> Autoscaler for &mut A {
    fn decide(&mut self, observation: &Observation, now: DateTime<Utc>) -> Verdict {
        (**self).decide(observation, now)
    }
    fn wakes_on_arrival(&self) -> bool {
        (**self).wakes_on_arrival()
    }
    fn rate_windows(&self) -> RateWindows {
        (**self).rate_windows()
    }
    fn adopt(&mut self, running: u32) {
        (**self).adopt(running)
    }
    fn manual_override(&mut self, manual: Override) {
        (**self).manual_override(manual)
    }
}

/// An autoscaler's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub desired: u32,
    pub reason: Reason,
    /// When a new decision could differ even without new signals.
    pub next_wake: Duration,
    /// The timetable window holding a floor now, if any.
    pub floor: Option<Window>,
}

impl Verdict {
    /// A compared model's count, asked again after `next_wake`.
    pub fn of(model: &'static str, desired: u32, next_wake: Duration) -> Verdict {
        Verdict {
            desired,
            reason: Reason::Model(model),
            next_wake,
            floor: None,
        }
    }
}

/// ebb's own policy: [`decide`] with the state it hands itself.
#[derive(Debug, Clone)]
pub struct EbbPolicy {
    pub policy: Policy,
    pub state: PolicyState,
}

impl EbbPolicy {
    pub fn new(policy: Policy) -> EbbPolicy {
        EbbPolicy {
            policy,
            state: PolicyState::default(),
        }
    }

    pub fn timetable(&self) -> &Timetable {
        &self.policy.config.timetable
    }
}

impl Autoscaler for EbbPolicy {
    fn decide(&mut self, observation: &Observation, now: DateTime<Utc>) -> Verdict {
        let decision = decide(observation, &self.state, &self.policy, now);
        self.state = decision.state;
        Verdict {
            desired: decision.desired,
            reason: decision.reason,
            next_wake: decision.next_wake,
            floor: decision.floor,
        }
    }

    fn wakes_on_arrival(&self) -> bool {
        true
    }

    fn rate_windows(&self) -> RateWindows {
        let target = &self.policy.config.target;
        RateWindows {
            stable: target.stable_window,
            panic: target.panic_window,
        }
    }

    fn adopt(&mut self, running: u32) {
        // Any scale-down from here still goes through the cooldowns.
        self.state.desired = running;
    }

    fn manual_override(&mut self, manual: Override) {
        self.state.manual = Some(manual);
    }
}

/// What one step looks at besides the signals heard since the last one.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// Every worker the pool tracks, exits since the last listing included.
    pub workers: &'a [PoolWorker],
    pub depth: &'a QueueDepth,
    /// Since when heartbeats can reach the scaler (its NATS connection's
    /// last connect); `None` while it is down. See [`Signals::classify`].
    pub heard_since: Option<DateTime<Utc>>,
}

/// A worker lost to a crash, a failed start or bad health.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lost {
    pub id: String,
    pub at: DateTime<Utc>,
    pub why: String,
    /// How it exited, once it has (a worker stopped for bad health exits
    /// after its loss).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<String>,
    /// The fatal start error of its `failed` heartbeat, if one came.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last lines it wrote, once it has exited.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub last_output: Vec<String>,
    pub crashes_in_a_row: u32,
    /// How long replacements wait.
    #[serde(rename = "backoff_ms", serialize_with = "serialize_ms")]
    pub backoff: Duration,
}

fn serialize_ms<S: serde::Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(value.as_millis() as u64)
}

/// What the loop carries out, and what it shows.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The desired count before this step.
    pub previous: u32,
    pub verdict: Verdict,
    /// Workers to start now.
    pub start: u32,
    /// Workers to stop now, in order: unhealthy ones, then the surplus
    /// (idle first, then ones still starting, the least busy last).
    pub stop: Vec<String>,
    /// Starts are held back by the restart backoff until then.
    pub held_back_until: Option<DateTime<Utc>>,
    /// When the first question with no worker to take it arrived, if this
    /// plan starts the first worker for it (the activation delay's start).
    /// Never set for a restart: see `replacing_since`.
    pub unserved_since: Option<DateTime<Utc>>,
    /// When the loss happened that this plan's starts replace, if they are
    /// restarts after a crash (the restart delay's start; its backoff
    /// included). Kept apart from activations, which measure only the way
    /// from a question at zero workers to a start.
    pub replacing_since: Option<DateTime<Utc>>,
    /// Workers lost in this step.
    pub lost: Vec<Lost>,
    /// Workers lost in an earlier step (stopped for bad health) that
    /// exited in this one: their losses with the exit and last output.
    pub exited_after_loss: Vec<Lost>,
    pub workers: Vec<WorkerView>,
    pub observation: Observation,
}

/// Crash-loop protection: each loss in a row doubles the wait before the
/// next start, until a worker started after the last loss comes up.
#[derive(Debug)]
struct Restarts {
    base: Duration,
    in_a_row: u32,
    allowed_from: DateTime<Utc>,
    last_loss: Option<DateTime<Utc>>,
    /// The first loss no start has replaced yet.
    unreplaced_since: Option<DateTime<Utc>>,
    /// The most recent losses, oldest first.
    history: VecDeque<Lost>,
}

impl Restarts {
    fn lost(&mut self, id: &str, why: String, now: DateTime<Utc>) -> Lost {
        self.in_a_row += 1;
        let backoff =
            ebb_runtime::backoff::exponential(self.base, self.in_a_row.into(), MAX_RESTART_BACKOFF);
        self.allowed_from = now + backoff;
        self.last_loss = Some(now);
        self.unreplaced_since.get_or_insert(now);
        let lost = Lost {
            id: id.to_owned(),
            at: now,
            why,
            exit_status: None,
            error: None,
            last_output: Vec::new(),
            crashes_in_a_row: self.in_a_row,
            backoff,
        };
        self.remember(lost.clone());
        lost
    }

    fn remember(&mut self, lost: Lost) {
        self.history.push_back(lost);
        while self.history.len() > LOSS_HISTORY {
            self.history.pop_front();
        }
    }

    /// Completes the remembered loss of a worker that has now exited;
    /// returns it if there was one.
    fn exited(&mut self, id: &str, status: &str, last_output: &[String]) -> Option<Lost> {
        let lost = self
            .history
            .iter_mut()
            .rev()
            .find(|lost| lost.id == id && lost.exit_status.is_none())?;
        lost.exit_status = Some(status.to_owned());
        lost.last_output = last_output.to_vec();
        Some(lost.clone())
    }

    /// A worker started after the last loss came up: the loop is broken.
    fn recovered(&mut self, workers: &[WorkerView]) {
        let Some(last) = self.last_loss else { return };
        if workers.iter().any(|w| {
            matches!(w.condition, Condition::Idle | Condition::Busy) && w.started_at > last
        }) {
            self.in_a_row = 0;
            self.last_loss = None;
        }
    }
}

/// The controller: signals in, plans out.
#[derive(Debug)]
pub struct Controller<A> {
    autoscaler: A,
    signals: Signals,
    health: Health,
    restarts: Restarts,
    desired: u32,
    /// Whether the first step has taken over the workers already running.
    adopted: bool,
}

impl<A: Autoscaler> Controller<A> {
    /// `planned_slots` is what a worker is assumed to answer at once
    /// before any reports its own.
    pub fn new(autoscaler: A, health: Health, planned_slots: u32) -> Controller<A> {
        let signals = Signals::new(autoscaler.rate_windows(), planned_slots);
        Controller {
            restarts: Restarts {
                base: health.restart_backoff,
                in_a_row: 0,
                allowed_from: DateTime::<Utc>::MIN_UTC,
                last_loss: None,
                unreplaced_since: None,
                history: VecDeque::new(),
            },
            autoscaler,
            signals,
            health,
            desired: 0,
            adopted: false,
        }
    }

    pub fn autoscaler(&self) -> &A {
        &self.autoscaler
    }

    /// For state restored from outside, e.g. the learned profiles a
    /// restarted scaler reads back before its first step.
    pub fn autoscaler_mut(&mut self) -> &mut A {
        &mut self.autoscaler
    }

    /// The count the last step wanted.
    pub fn desired(&self) -> u32 {
        self.desired
    }

    pub fn question_arrived(&mut self, now: DateTime<Utc>) {
        self.signals.question_arrived(now);
    }

    pub fn heartbeat(&mut self, beat: Heartbeat, now: DateTime<Utc>) {
        self.signals.heartbeat(beat, now);
    }

    /// Takes effect at the next step.
    pub fn manual_override(&mut self, manual: Override) {
        self.autoscaler.manual_override(manual);
    }

    /// A start the pool could not carry out backs off like a crash, so a
    /// bad command is not retried every round.
    pub fn start_failed(&mut self, why: String, now: DateTime<Utc>) -> Lost {
        self.restarts.lost("(not started)", why, now)
    }

    /// The most recent losses (at most [`LOSS_HISTORY`]), oldest first.
    pub fn losses(&self) -> &VecDeque<Lost> {
        &self.restarts.history
    }

    /// Losses since a worker last came up (0 once one has).
    pub fn crashes_in_a_row(&self) -> u32 {
        self.restarts.in_a_row
    }

    pub fn cold_starts(&self) -> crate::signals::ColdStarts {
        self.signals.cold_starts()
    }

    /// The cold starts since the last call.
    pub fn take_new_cold_starts(&mut self) -> Vec<crate::signals::NewColdStart> {
        self.signals.take_new_cold_starts()
    }

    /// Losses among the pool's exits: those the scaler did not ask for,
    /// with the fatal error of a `failed` heartbeat (read before classifying
    /// drops the worker's heartbeats), and the exits of workers lost
    /// earlier, completed with how they ended.
    fn exits(&mut self, workers: &[PoolWorker], now: DateTime<Utc>) -> (Vec<Lost>, Vec<Lost>) {
        let (mut lost, mut completed) = (Vec::new(), Vec::new());
        for worker in workers {
            let Phase::Exited {
                status,
                requested,
                last_output,
            } = &worker.phase
            else {
                continue;
            };
            if let Some(earlier) = self.restarts.exited(&worker.id, status, last_output) {
                completed.push(earlier);
                continue;
            }
            if *requested {
                continue;
            }
            let error = self.signals.fatal_error(&worker.id);
            let why = match &error {
                Some(error) => format!("exited on its own: {status}; cannot start: {error}"),
                None => format!("exited on its own: {status}"),
            };
            self.restarts.lost(&worker.id, why, now);
            let record = self
                .restarts
                .exited(&worker.id, status, last_output)
                .expect("just remembered");
            lost.push(self.with_error(record, error));
        }
        (lost, completed)
    }

    /// Sets the fatal error on a loss and on its remembered copy.
    fn with_error(&mut self, mut lost: Lost, error: Option<String>) -> Lost {
        if let Some(remembered) = self.restarts.history.back_mut()
            && remembered.id == lost.id
        {
            remembered.error.clone_from(&error);
        }
        lost.error = error;
        lost
    }

    /// One round: classify, observe, decide, and plan the starts and stops.
    pub fn step(&mut self, inputs: Inputs<'_>, now: DateTime<Utc>) -> Plan {
        let (mut lost, exited_after_loss) = self.exits(inputs.workers, now);
        let workers = self
            .signals
            .classify(inputs.workers, &self.health, inputs.heard_since, now);
        let observation = self.signals.observe(inputs.depth, &workers, now);
        let capacity = observation.workers.capacity();
        let unserved = self.signals.first_unserved_arrival;
        if capacity > 0 {
            self.signals.first_unserved_arrival = None;
        }
        if !self.adopted {
            self.adopted = true;
            self.autoscaler.adopt(capacity);
            self.desired = capacity;
        }
        self.restarts.recovered(&workers);

        let previous = self.desired;
        let verdict = self.autoscaler.decide(&observation, now);
        self.desired = verdict.desired;

        let mut stop = Vec::new();
        for worker in workers
            .iter()
            .filter(|w| w.condition == Condition::Unhealthy)
        {
            let why = worker.why_unhealthy.clone().unwrap_or_default();
            let loss = self
                .restarts
                .lost(&worker.id, format!("unhealthy: {why}"), now);
            lost.push(self.with_error(loss, worker.error.clone()));
            stop.push(worker.id.clone());
        }
        let healthy: Vec<&WorkerView> = workers
            .iter()
            .filter(|w| {
                matches!(
                    w.condition,
                    Condition::Starting | Condition::Idle | Condition::Busy
                )
            })
            .collect();
        let count = healthy.len() as u32;
        let (mut start, mut held_back_until) = (0, None);
        if verdict.desired > count {
            if now < self.restarts.allowed_from {
                held_back_until = Some(self.restarts.allowed_from);
            } else {
                start = verdict.desired - count;
            }
        }
        stop.extend(surplus(healthy, count.saturating_sub(verdict.desired)));
        let replacing_since = self.restarts.unreplaced_since.filter(|_| start > 0);
        if start > 0 || verdict.desired <= count {
            // Replaced, or no replacement wanted: a later start is no restart.
            self.restarts.unreplaced_since = None;
        }
        Plan {
            previous,
            start,
            stop,
            held_back_until,
            unserved_since: unserved
                .filter(|_| count == 0 && start > 0 && replacing_since.is_none()),
            replacing_since,
            lost,
            exited_after_loss,
            workers,
            observation,
            verdict,
        }
    }
}

/// The `excess` workers to stop: idle ones first, then ones still loading,
/// busy ones last and the least busy of those first (a busy worker drains
/// its questions before it stops anyway); among equals the newest.
fn surplus(mut healthy: Vec<&WorkerView>, excess: u32) -> Vec<String> {
    healthy.sort_by(|a, b| {
        let rank = |w: &WorkerView| match w.condition {
            Condition::Idle => 0,
            Condition::Starting => 1,
            _ => 2,
        };
        (rank(a), a.active)
            .cmp(&(rank(b), b.active))
            .then(b.started_at.cmp(&a.started_at))
            .then(b.id.cmp(&a.id))
    });
    healthy
        .into_iter()
        .take(excess as usize)
        .map(|w| w.id.clone())
        .collect()
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
