//! The thin loop around the [`Controller`]: list the pool, read the queue
//! depth, step the controller, carry out its plan, publish status. Wakes
//! every `tick`, and at once when a question arrives while no worker runs.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use chrono::{DateTime, Utc};
use ebb_nats::{PriorityDepth, QueueDepth};
use serde::Serialize;
use tokio::sync::Notify;

use crate::lease::{Lease, LeaseView};
use crate::pool::WorkerPool;
use ebb_control::controller::{Controller, EbbPolicy, Inputs, Lost, Plan};
use ebb_control::policy::{Observation, Override, WorkerCounts};
use ebb_control::reason::Reason;
use ebb_control::signals::{ColdStarts, WorkerView};
use ebb_schedule::timetable::Window;

/// How often a standby scaler looks at its lease.
const STANDBY_TICK: Duration = Duration::from_millis(500);
/// Decisions kept for `/status`.
const DECISION_LOG: usize = 50;
/// Activation (and restart) delays kept for the percentiles.
const ACTIVATION_SAMPLES: usize = 200;

/// One change of the desired count.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    pub at: DateTime<Utc>,
    pub from: u32,
    pub to: u32,
    pub reason: Reason,
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
    pub reason: Option<Reason>,
    pub timetable_floor: Option<Window>,
    pub next_window: Option<Window>,
    pub manual_override: Option<Override>,
    pub decisions: VecDeque<DecisionRecord>,
    /// First question at zero workers -> worker start issued, milliseconds.
    /// Only starts from zero: restarts after a crash are `restart_delays_ms`.
    pub activation_delays_ms: VecDeque<f64>,
    /// Worker lost -> its replacement's start issued (the crash backoff
    /// included), milliseconds.
    pub restart_delays_ms: VecDeque<f64>,
    /// Losses (crashes, failed starts, unhealthy workers) since a worker
    /// last came up.
    pub crashes_in_a_row: u32,
    /// The most recent losses, oldest first: why, the exit status, the
    /// worker's fatal error and its last lines of output.
    pub losses: VecDeque<Lost>,
    /// Measured cold starts: p90 whole, without downloads, per phase.
    pub cold_starts: ColdStarts,
    /// Changes of the desired count by [`Reason::label`].
    pub decisions_by_reason: BTreeMap<&'static str, u64>,
    pub last_error: Option<String>,
    /// What the `learn` timetable windows learned (kept across restarts).
    pub learned: ebb_control::learned::LearnedFloors,
    /// Active (this scaler starts and stops workers) or standby.
    pub lease: LeaseView,
}

/// What a starting scaler still waits for; `/healthz` names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Startup {
    #[default]
    Nats,
    QuestionStream,
    Lease,
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
            Startup::Lease => "taking part in the scaler lease (NATS KV)",
            Startup::Pool => "opening the worker pool",
            Startup::Ready => "ready",
        })
    }
}

/// State shared with the HTTP API and the signal listeners.
#[derive(Debug)]
pub struct Shared {
    pub startup: Mutex<Startup>,
    pub status: Mutex<Status>,
    /// A `POST /scale` waiting for the next decision.
    pub pending_override: Mutex<Option<Override>>,
    /// Arrivals and heartbeats go straight in; the loop steps it.
    pub controller: Mutex<Controller<EbbPolicy>>,
    /// Set while no worker is wanted: arrivals then wake the loop at once.
    pub asleep: AtomicBool,
    pub wake: Notify,
    /// Every activation delay, for `/metrics`.
    pub activation_delay: prometheus_client::metrics::histogram::Histogram,
    /// Every restart delay, for `/metrics`.
    pub restart_delay: prometheus_client::metrics::histogram::Histogram,
    /// Every reported cold start, for `/metrics`.
    pub cold_starts: crate::metrics::ColdStartHistograms,
    /// Arrivals, answer timings and cache hits, for `/metrics` and the console.
    pub traffic: crate::traffic::Traffic,
    /// Whether this scaler is the pool's active one.
    pub lease: Arc<Lease>,
    /// What the console plots.
    history: Mutex<crate::console::history::History>,
}

impl Shared {
    /// `scaler_id`: this scaler's name in the pool's lease; `console_step`:
    /// the resolution of the console's history.
    pub fn new(
        controller: Controller<EbbPolicy>,
        scaler_id: String,
        console_step: Duration,
    ) -> Shared {
        Shared {
            startup: Mutex::default(),
            status: Mutex::default(),
            pending_override: Mutex::default(),
            controller: Mutex::new(controller),
            asleep: AtomicBool::new(false),
            wake: Notify::new(),
            activation_delay: crate::metrics::activation_delay_histogram(),
            restart_delay: crate::metrics::activation_delay_histogram(),
            cold_starts: crate::metrics::ColdStartHistograms::default(),
            traffic: crate::traffic::Traffic::default(),
            lease: Arc::new(Lease::new(scaler_id)),
            history: Mutex::new(crate::console::history::History::new(console_step)),
        }
    }

    pub fn history(&self) -> std::sync::MutexGuard<'_, crate::console::history::History> {
        self.history.lock().expect("history lock")
    }

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

    fn controller(&self) -> std::sync::MutexGuard<'_, Controller<EbbPolicy>> {
        self.controller.lock().expect("controller lock")
    }
}

/// The reconcile loop and what it carries between ticks.
pub struct Scaler<P: WorkerPool> {
    pub pool: P,
    pub questions: Stream,
    pub shared: Arc<Shared>,
    tick: Duration,
    last_depth: QueueDepth,
    /// The connection heartbeats come over.
    client: async_nats::Client,
    /// Since when it has been up (see `Inputs::heard_since`).
    heard_since: Option<DateTime<Utc>>,
    /// Whether the last round held the lease (see [`crate::lease`]).
    active: bool,
}

impl<P: WorkerPool> std::fmt::Debug for Scaler<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scaler")
            .field("tick", &self.tick)
            .finish_non_exhaustive()
    }
}

impl<P: WorkerPool> Scaler<P> {
    pub fn new(
        pool: P,
        client: async_nats::Client,
        questions: Stream,
        shared: Arc<Shared>,
        tick: Duration,
    ) -> Self {
        Scaler {
            pool,
            questions,
            shared,
            tick,
            last_depth: QueueDepth {
                priorities: Vec::new(),
            },
            client,
            heard_since: None,
            active: false,
        }
    }

    /// Tracks the NATS link: `None` while down, else when it came up.
    fn link(&mut self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        self.heard_since = match (connected, self.heard_since) {
            (false, _) => None,
            (true, None) => {
                tracing::info!("NATS link up: heartbeat silence counts from now");
                Some(now)
            }
            (true, since) => since,
        };
        self.heard_since
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

    /// One round: list, step the controller, carry out its plan. Returns
    /// when to wake next.
    pub async fn tick(&mut self) -> Duration {
        let now = Utc::now();
        let lease = self.shared.lease.view(std::time::Instant::now());
        let active = matches!(lease, LeaseView::Active { .. });
        self.shared.status.lock().expect("status lock").lease = lease;
        if !active {
            // Standing by: another scaler runs the pool. Look again soon.
            self.active = false;
            return STANDBY_TICK.min(self.tick);
        }
        if !self.active {
            // Just became active: the workers are the last active one's.
            if let Err(err) = self.pool.adopt().await {
                let error = format!("adopting the pool's workers: {err}");
                tracing::warn!(cause = %error, "skipping this round");
                self.shared.status.lock().expect("status lock").last_error = Some(error);
                return self.tick;
            }
            self.active = true;
        }
        // Set before observing, so an arrival during this round still wakes
        // the next one at once.
        let desired = self.shared.controller().desired();
        self.shared.asleep.store(desired == 0, Ordering::Relaxed);
        let mut errors = Vec::new();
        let listed = match self.pool.list().await {
            Ok(listed) => listed,
            Err(err) => {
                // Without the list, "no workers" would start a fleet: skip the round.
                let error = format!("listing workers: {err}");
                tracing::warn!(cause = %error, "skipping this round");
                self.shared.status.lock().expect("status lock").last_error = Some(error);
                return self.tick;
            }
        };
        match ebb_nats::queue_depth(&self.questions).await {
            Ok(depth) => self.last_depth = depth,
            Err(err) => errors.push(format!("queue depth: {err}")),
        }
        let manual = self
            .shared
            .pending_override
            .lock()
            .expect("override lock")
            .take();
        let heard_since = self.link(now);
        let plan = {
            let mut controller = self.shared.controller();
            if let Some(manual) = manual {
                controller.manual_override(manual);
            }
            let inputs = Inputs {
                workers: &listed,
                depth: &self.last_depth,
                heard_since,
            };
            controller.step(inputs, now)
        };
        log_losses(&plan);
        let verdict = &plan.verdict;
        if verdict.desired != plan.previous {
            tracing::info!(from = plan.previous, to = verdict.desired, reason = %verdict.reason, "desired workers changed");
        }
        // The lease may have run out during the round: act only with it.
        let starts = if self.shared.lease.acting(std::time::Instant::now()) {
            self.carry_out(&plan, now, &mut errors).await
        } else {
            errors.push("lost the lease during the round; nothing carried out".to_owned());
            Starts::default()
        };
        self.publish(&plan, starts, errors, now);
        self.shared
            .asleep
            .store(verdict.desired == 0, Ordering::Relaxed);
        tracing::debug!(
            desired = verdict.desired,
            next_wake_ms = verdict.next_wake.as_millis() as u64,
            "decision round done"
        );
        verdict.next_wake
    }

    /// Stops and starts what the plan says; returns the delay of this
    /// round's starts: an activation when it started the first worker for
    /// questions waiting at zero, a restart when it replaced a lost one.
    async fn carry_out(
        &mut self,
        plan: &Plan,
        now: DateTime<Utc>,
        errors: &mut Vec<String>,
    ) -> Starts {
        for id in &plan.stop {
            if let Err(err) = self.pool.stop(id).await {
                errors.push(format!("stopping {id}: {err}"));
            }
        }
        if let Some(until) = plan.held_back_until {
            // Name the loss being backed off from: "backoff until" alone
            // leaves an operator guessing why workers do not come up.
            let last = self.shared.controller().losses().back().cloned();
            let why = last.map_or_else(String::new, |lost| {
                let cause = lost.error.unwrap_or(lost.why);
                format!(
                    " after {} crashes in a row (last: {cause})",
                    lost.crashes_in_a_row
                )
            });
            errors.push(format!(
                "restart backoff until {}{why}",
                until.format("%H:%M:%S")
            ));
        }
        let mut started = false;
        for _ in 0..plan.start {
            if let Err(err) = self.pool.start().await {
                let lost = self.shared.controller().start_failed(err.to_string(), now);
                tracing::warn!(why = %lost.why, crashes_in_a_row = lost.crashes_in_a_row, backoff_ms = lost.backoff.as_millis() as u64, "worker did not start; retrying after a backoff");
                errors.push(err.to_string());
                break;
            }
            started = true;
        }
        let issued = Utc::now();
        let delay = |since: DateTime<Utc>| (issued - since).to_std().unwrap_or_default();
        Starts {
            activation: plan.unserved_since.filter(|_| started).map(delay),
            restart: plan.replacing_since.filter(|_| started).map(delay),
        }
    }

    fn publish(&self, plan: &Plan, starts: Starts, errors: Vec<String>, now: DateTime<Utc>) {
        let (next_window, manual, losses, crashes_in_a_row, cold_starts) = {
            let mut controller = self.shared.controller();
            for start in controller.take_new_cold_starts() {
                self.shared.cold_starts.observe(&start);
            }
            let ebb = controller.autoscaler();
            (
                ebb.timetable().next_window(now),
                ebb.state.manual.clone(),
                controller.losses().clone(),
                controller.crashes_in_a_row(),
                controller.cold_starts(),
            )
        };
        let learned = self.shared.controller().autoscaler().state.learned.clone();
        let verdict = &plan.verdict;
        let mut status = self.shared.status.lock().expect("status lock");
        if verdict.desired != plan.previous {
            *status
                .decisions_by_reason
                .entry(verdict.reason.label())
                .or_default() += 1;
            status.decisions.push_back(DecisionRecord {
                at: now,
                from: plan.previous,
                to: verdict.desired,
                reason: verdict.reason.clone(),
            });
            if status.decisions.len() > DECISION_LOG {
                status.decisions.pop_front();
            }
        }
        if let Some(delay) = starts.activation {
            tracing::info!(
                activation_ms = delay.as_secs_f64() * 1000.0,
                "started a worker for questions waiting at zero"
            );
            self.shared.activation_delay.observe(delay.as_secs_f64());
            push_ms(&mut status.activation_delays_ms, delay);
        }
        if let Some(delay) = starts.restart {
            tracing::info!(
                restart_ms = delay.as_secs_f64() * 1000.0,
                "started a worker to replace a lost one"
            );
            self.shared.restart_delay.observe(delay.as_secs_f64());
            push_ms(&mut status.restart_delays_ms, delay);
        }
        status.losses = losses;
        status.crashes_in_a_row = crashes_in_a_row;
        status.cold_starts = cold_starts;
        for error in &errors {
            tracing::warn!(cause = %error, "scaler round had a problem");
        }
        status.updated_at = Some(now);
        status.desired = verdict.desired;
        status.actual = plan.observation.workers;
        status.workers = plan.workers.clone();
        status.signals = plan.observation.clone();
        status.lag_by_priority = self.last_depth.priorities.clone();
        status.reason = Some(verdict.reason.clone());
        status.timetable_floor = verdict.floor.clone();
        status.next_window = next_window;
        status.manual_override = manual;
        status.learned = learned;
        status.last_error = errors.into_iter().next();
    }
}

/// The delays of one round's starts.
#[derive(Debug, Clone, Copy, Default)]
struct Starts {
    activation: Option<Duration>,
    restart: Option<Duration>,
}

fn push_ms(samples: &mut VecDeque<f64>, delay: Duration) {
    samples.push_back(delay.as_secs_f64() * 1000.0);
    while samples.len() > ACTIVATION_SAMPLES {
        samples.pop_front();
    }
}

/// Logs each loss with the worker's own last lines: after a container is
/// removed, this log and `/status` are where its account of a crash is left.
/// The lines hold no question text: workers log questions at debug level at
/// most, and the backends leave debug lines out.
fn log_losses(plan: &Plan) {
    for lost in &plan.lost {
        tracing::warn!(
            worker_id = %lost.id,
            why = %lost.why,
            error = lost.error.as_deref(),
            crashes_in_a_row = lost.crashes_in_a_row,
            backoff_ms = lost.backoff.as_millis() as u64,
            last_output = ?lost.last_output,
            "worker lost; replacing it after a backoff"
        );
    }
    for lost in &plan.exited_after_loss {
        tracing::warn!(
            worker_id = %lost.id,
            status = lost.exit_status.as_deref(),
            last_output = ?lost.last_output,
            "a lost worker exited"
        );
    }
}
