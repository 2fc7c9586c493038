//! The thin loop around [`decide`]: gather signals, decide, reconcile the
//! pool, publish status. Wakes every `tick`, and at once when a question
//! arrives while no worker runs.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use chrono::{DateTime, Utc};
use ebb_nats::{PriorityDepth, QueueDepth};
use serde::Serialize;
use tokio::sync::Notify;

use crate::policy::{Decision, Observation, Override, Policy, PolicyState, WorkerCounts, decide};
use crate::pool::{Phase, WorkerPool};
use crate::signals::{Condition, Signals, WorkerView};
use ebb_schedule::timetable::Window;

/// Decisions kept for `/status`.
/// What one control round saw and did, for `/status`.
struct Round<'a> {
    previous: u32,
    decision: &'a Decision,
    workers: Vec<WorkerView>,
    signals: Observation,
    activation: Option<Duration>,
    errors: Vec<String>,
}

const DECISION_LOG: usize = 50;
/// Activation delays kept for the percentiles.
const ACTIVATION_SAMPLES: usize = 200;
/// Longest wait before replacing a crash-looping worker.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(300);

/// One change of the desired count.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    pub at: DateTime<Utc>,
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

/// What `/status` and `/metrics` show.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// When this status was made (the end of the last decision round).
    pub updated_at: Option<DateTime<Utc>>,
    pub desired: u32,
    pub actual: WorkerCounts,
    pub workers: Vec<WorkerView>,
    pub signals: Observation,
    pub lag_by_priority: Vec<PriorityDepth>,
    pub reason: String,
    pub timetable_floor: Option<Window>,
    pub next_window: Option<Window>,
    pub manual_override: Option<Override>,
    pub decisions: VecDeque<DecisionRecord>,
    /// First question at zero workers -> worker start issued, milliseconds.
    pub activation_delays_ms: VecDeque<f64>,
    pub decisions_by_reason: std::collections::BTreeMap<String, u64>,
    pub last_error: Option<String>,
}

/// What a starting scaler still waits for; `/healthz` names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Startup {
    #[default]
    Nats,
    QuestionStream,
    Pool,
    Ready,
}

impl std::fmt::Display for Startup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Startup::Nats => "connecting to NATS",
            Startup::QuestionStream => {
                "waiting for the question stream (the gateway creates it; is NATS reachable?)"
            }
            Startup::Pool => "opening the worker pool",
            Startup::Ready => "ready",
        })
    }
}

/// State shared with the HTTP API.
#[derive(Debug, Default)]
pub struct Shared {
    pub startup: Mutex<Startup>,
    pub status: Mutex<Status>,
    /// A `POST /scale` waiting for the next decision.
    pub pending_override: Mutex<Option<Override>>,
    pub signals: Mutex<Option<Signals>>,
    /// Set while no worker is wanted: arrivals then wake the loop at once.
    pub asleep: AtomicBool,
    pub wake: Notify,
}

impl Shared {
    pub fn status(&self) -> Status {
        self.status.lock().expect("status lock").clone()
    }

    pub fn starting(&self, step: Startup) {
        *self.startup.lock().expect("startup lock") = step;
        if step != Startup::Ready {
            tracing::info!(step = %step, "scaler starting");
        }
    }

    pub fn startup(&self) -> Startup {
        *self.startup.lock().expect("startup lock")
    }
}

/// The reconcile loop and what it carries between ticks.
pub struct Scaler<P: WorkerPool> {
    pub policy: Policy,
    pub pool: P,
    pub questions: Stream,
    pub shared: Arc<Shared>,
    pub state: PolicyState,
    crashes_in_a_row: u32,
    next_start_allowed: DateTime<Utc>,
    last_crash_at: Option<DateTime<Utc>>,
    /// Whether the first round has taken over the workers already running.
    adopted: bool,
    last_depth: QueueDepth,
}

impl<P: WorkerPool> std::fmt::Debug for Scaler<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scaler")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<P: WorkerPool> Scaler<P> {
    pub fn new(policy: Policy, pool: P, questions: Stream, shared: Arc<Shared>) -> Self {
        Scaler {
            policy,
            pool,
            questions,
            shared,
            state: PolicyState::default(),
            crashes_in_a_row: 0,
            next_start_allowed: DateTime::<Utc>::MIN_UTC,
            last_crash_at: None,
            adopted: false,
            last_depth: QueueDepth {
                priorities: Vec::new(),
            },
        }
    }

    /// Runs until `shutdown` resolves. Workers keep running after the scaler
    /// stops: a restarted scaler adopts them.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let next_wake = self.tick().await;
            tokio::select! {
                _ = tokio::time::sleep(next_wake) => {}
                _ = self.shared.wake.notified() => {}
                _ = &mut shutdown => return,
            }
        }
    }

    /// One round: observe, decide, reconcile. Returns when to wake next.
    pub async fn tick(&mut self) -> Duration {
        let now = Utc::now();
        // Set before observing, so an arrival during this round still wakes
        // the next one at once.
        self.shared
            .asleep
            .store(self.state.desired == 0, Ordering::Relaxed);
        let mut errors = Vec::new();
        let listed = match self.pool.list().await {
            Ok(listed) => listed,
            Err(err) => {
                // Without the list, "no workers" would start a fleet: skip the round.
                let error = format!("listing workers: {err}");
                tracing::warn!(cause = %error, "skipping this round");
                self.shared.status.lock().expect("status lock").last_error = Some(error);
                return self.policy.config.tick;
            }
        };
        for worker in &listed {
            if let Phase::Exited {
                status,
                requested: false,
            } = &worker.phase
            {
                self.crashed(&worker.id, &format!("exited on its own: {status}"), now);
            }
        }
        match ebb_nats::queue_depth(&self.questions).await {
            Ok(depth) => self.last_depth = depth,
            Err(err) => errors.push(format!("queue depth: {err}")),
        }
        if let Some(manual) = self
            .shared
            .pending_override
            .lock()
            .expect("override lock")
            .take()
        {
            self.state.manual = Some(manual);
        }
        let config = &self.policy.config;
        let (views, observation, first_unserved) = {
            let mut signals = self.shared.signals.lock().expect("signals lock");
            let signals = signals.get_or_insert_with(|| Signals::new(&config.target));
            let views = signals.classify(&listed, &config.health, now);
            let observation = signals.observe(&self.last_depth, &views, &config.target, now);
            if observation.workers.capacity() > 0 {
                signals.first_unserved_arrival = None;
            }
            (views, observation, signals.first_unserved_arrival)
        };
        if !self.adopted {
            // A restarted scaler continues from the workers it finds, so any
            // scale-down still goes through the cooldowns.
            self.adopted = true;
            self.state.desired = observation.workers.capacity();
        }
        let last_crash = self.last_crash_at;
        if views.iter().any(|w| {
            matches!(w.condition, Condition::Idle | Condition::Busy)
                && last_crash.is_some_and(|at| w.started_at > at)
        }) {
            // A worker started after the last loss came up: the loop is broken.
            self.crashes_in_a_row = 0;
            self.last_crash_at = None;
        }

        let decision = decide(&observation, &self.state, &self.policy, now);
        let previous = self.state.desired;
        self.state = decision.state.clone();
        if decision.desired != previous {
            tracing::info!(from = previous, to = decision.desired, reason = %decision.reason, "desired workers changed");
        }
        let activation = self
            .reconcile(&views, decision.desired, first_unserved, now, &mut errors)
            .await;
        let round = Round {
            previous,
            decision: &decision,
            workers: views,
            signals: observation,
            activation,
            errors,
        };
        self.publish(round, now);
        self.shared
            .asleep
            .store(decision.desired == 0, Ordering::Relaxed);
        tracing::debug!(
            desired = decision.desired,
            next_wake_ms = decision.next_wake.as_millis() as u64,
            "decision round done"
        );
        decision.next_wake
    }

    fn crashed(&mut self, id: &str, why: &str, now: DateTime<Utc>) {
        self.crashes_in_a_row += 1;
        let backoff = ebb_runtime::backoff::exponential(
            self.policy.config.health.restart_backoff,
            self.crashes_in_a_row.into(),
            MAX_RESTART_BACKOFF,
        );
        self.next_start_allowed = now + backoff;
        self.last_crash_at = Some(now);
        tracing::warn!(worker_id = %id, why, crashes_in_a_row = self.crashes_in_a_row, backoff_ms = backoff.as_millis() as u64, "worker lost; replacing it after a backoff");
    }

    /// Starts or stops workers to match `desired`; returns the activation
    /// delay when this round started the first worker for waiting questions.
    async fn reconcile(
        &mut self,
        views: &[WorkerView],
        desired: u32,
        first_unserved: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        errors: &mut Vec<String>,
    ) -> Option<Duration> {
        for unhealthy in views.iter().filter(|w| w.condition == Condition::Unhealthy) {
            let why = unhealthy.why_unhealthy.clone().unwrap_or_default();
            self.crashed(&unhealthy.id, &format!("unhealthy: {why}"), now);
            if let Err(err) = self.pool.stop(&unhealthy.id).await {
                errors.push(format!("stopping {}: {err}", unhealthy.id));
            }
        }
        let healthy: Vec<&WorkerView> = views
            .iter()
            .filter(|w| {
                matches!(
                    w.condition,
                    Condition::Starting | Condition::Idle | Condition::Busy
                )
            })
            .collect();
        let count = healthy.len() as u32;
        let mut activation = None;
        if desired > count {
            if now < self.next_start_allowed {
                errors.push(format!(
                    "restart backoff until {}",
                    self.next_start_allowed.format("%H:%M:%S")
                ));
            } else {
                for _ in count..desired {
                    match self.pool.start().await {
                        Ok(_) => {
                            if count == 0
                                && activation.is_none()
                                && let Some(since) = first_unserved
                            {
                                activation =
                                    Some((Utc::now() - since).to_std().unwrap_or_default());
                            }
                        }
                        Err(err) => {
                            // A start that fails backs off like a crash, so a
                            // bad command is not retried every round.
                            self.crashed("(not started)", &err.to_string(), now);
                            errors.push(err.to_string());
                            break;
                        }
                    }
                }
            }
        } else if desired < count {
            // Idle workers first, then ones still loading, busy ones last:
            // a busy worker drains its question before it stops anyway.
            let mut victims = healthy.clone();
            victims.sort_by_key(|w| match w.condition {
                Condition::Idle => 0,
                Condition::Starting => 1,
                _ => 2,
            });
            for victim in victims.into_iter().take((count - desired) as usize) {
                if let Err(err) = self.pool.stop(&victim.id).await {
                    errors.push(format!("stopping {}: {err}", victim.id));
                }
            }
        }
        activation
    }

    fn publish(&self, round: Round<'_>, now: DateTime<Utc>) {
        let Round {
            previous,
            decision,
            workers,
            signals,
            activation,
            errors,
        } = round;
        let next_window = self.policy.timetable.next_window(now);
        let mut status = self.shared.status.lock().expect("status lock");
        if decision.desired != previous {
            let reason_kind = decision
                .reason
                .split([' ', ':'])
                .next()
                .unwrap_or_default()
                .to_owned();
            *status.decisions_by_reason.entry(reason_kind).or_default() += 1;
            status.decisions.push_back(DecisionRecord {
                at: now,
                from: previous,
                to: decision.desired,
                reason: decision.reason.clone(),
            });
            if status.decisions.len() > DECISION_LOG {
                status.decisions.pop_front();
            }
        }
        if let Some(delay) = activation {
            tracing::info!(
                activation_ms = delay.as_secs_f64() * 1000.0,
                "started a worker for questions waiting at zero"
            );
            status
                .activation_delays_ms
                .push_back(delay.as_secs_f64() * 1000.0);
            if status.activation_delays_ms.len() > ACTIVATION_SAMPLES {
                status.activation_delays_ms.pop_front();
            }
        }
        for error in &errors {
            tracing::warn!(cause = %error, "scaler round had a problem");
        }
        status.updated_at = Some(now);
        status.desired = decision.desired;
        status.actual = signals.workers;
        status.workers = workers;
        status.signals = signals;
        status.lag_by_priority = self.last_depth.priorities.clone();
        status.reason = decision.reason.clone();
        status.timetable_floor = decision.floor.clone();
        status.next_window = next_window;
        status.manual_override = decision.state.manual.clone();
        status.last_error = errors.into_iter().next();
    }
}
