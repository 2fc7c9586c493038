//! The discrete-event replay: arrivals from a trace, a FIFO queue per
//! priority, workers with cold starts, per-worker slots and graceful
//! drain, and the live scaler's own [`Controller`] stepped on its
//! autoscaler's schedule: the replay feeds it what live workers and NATS
//! would (arrivals, heartbeats, a pool listing, the queue depth) and
//! carries out its plan, so classification, observation, the order of
//! stops and the restart backoff are the live code, not a model of it.
//! Time is virtual (seconds since the trace's start) and every random draw
//! comes from the seed, so a replay is a pure function of its inputs.
//!
//! A question's answer is planned when it starts; with a worker profile
//! (its decode rate depends on how many questions share the worker), every
//! join and leave re-plans the others on that worker from their work left
//! (`Sequence::replan`) and the event of the old plan is skipped as stale.
//! The event heap orders by time, then insertion, so ties replay the same.

mod outcome;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ebb_nats::messages::moving_average;
use ebb_nats::{Heartbeat, Priority, PriorityDepth, QueueDepth, WorkerState};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::trace::Trace;
pub use super::worker::WorkerModel;
use super::worker::{ColdStart, Sequence};
use ebb_control::config::Health;
pub use ebb_control::controller::Autoscaler;
use ebb_control::controller::{Controller, Inputs, Plan};
use ebb_control::listing::{Phase, PoolWorker};
pub use outcome::{Fate, Outcome, Sample, measured_seconds};

/// What every replay of one run shares.
#[derive(Debug, Clone, Copy)]
pub struct Setup<'a> {
    pub trace: &'a Trace,
    pub model: &'a WorkerModel,
    /// Fixes cold starts and cache draws: every policy gets the same draws.
    pub seed: u64,
    /// Seconds into the trace from which cost and questions count; the
    /// warm-up before only teaches the policy.
    pub measure_from: f64,
    /// When the controller calls a worker unhealthy, as live.
    pub health: &'a Health,
}

/// Plot resolution.
pub const PLOT_BUCKETS: usize = 600;

#[derive(Debug)]
struct Worker {
    /// As the pool names it; `w<index>`.
    id: String,
    requested_at: f64,
    ready: bool,
    /// When it became ready, as its heartbeat reports; `None` for a worker
    /// the replay starts warm (its cold start was before the trace).
    ready_at: Option<f64>,
    jobs_done: u64,
    /// The questions it answers now, in the order they joined.
    sequences: Vec<Sequence>,
    stopping: bool,
    exited_at: Option<f64>,
    /// Moving averages as its heartbeats would report them.
    mean_job: Option<f64>,
    mean_response: Option<f64>,
}

impl Worker {
    fn active(&self) -> u32 {
        self.sequences.len() as u32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Ready(usize),
    /// Worker, arrival index, and the plan it was scheduled for (a later
    /// plan makes it stale).
    Done(usize, usize, u32),
    Decide,
}

/// Min-heap key: time, then insertion order, so ties replay the same way.
#[derive(Debug, PartialEq)]
struct Scheduled(f64, u64, Event);

impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// Replays the trace against `autoscaler`, starting with `initial_workers`
/// ready, as if they had been answering the trace's first questions (their
/// reported service time is the mean of the first five minutes').
pub fn replay(setup: &Setup, autoscaler: &mut dyn Autoscaler, initial_workers: u32) -> Outcome {
    let (trace, model) = (setup.trace, setup.model);
    let mut sim = Sim::new(setup, autoscaler);
    let early: Vec<f64> = trace
        .arrivals
        .iter()
        .take_while(|a| a.at < 300.0)
        .map(|a| model.service(a).1)
        .collect();
    let early_mean = (!early.is_empty()).then(|| early.iter().sum::<f64>() / early.len() as f64);
    for _ in 0..initial_workers {
        let worker = sim.add_worker(true);
        sim.workers[worker].mean_job = early_mean;
        sim.workers[worker].mean_response = early_mean;
    }
    sim.schedule(0.0, Event::Decide);
    sim.run();
    sim.finish()
}

struct Sim<'a> {
    trace: &'a Trace,
    measure_from: f64,
    model: &'a WorkerModel,
    controller: Controller<&'a mut dyn Autoscaler>,
    cold_start: ColdStart,
    cold_start_rng: ChaCha8Rng,
    cache_rng: ChaCha8Rng,
    now: f64,
    events: BinaryHeap<Reverse<Scheduled>>,
    sequence: u64,
    next_arrival: usize,
    queues: [VecDeque<usize>; 3],
    /// Questions being answered, by priority lane.
    in_service: [u64; 3],
    /// Every worker ever started (their cost counts), and the ones not exited.
    workers: Vec<Worker>,
    alive: Vec<usize>,
    desired: u32,
    /// The next Decide already scheduled, if any.
    decide_at: Option<f64>,
    fates: Vec<Option<Fate>>,
    answered_ids: HashSet<&'a str>,
    started: u64,
    scale_events: u64,
    last_done: f64,
    bucket_seconds: f64,
    samples: Vec<Sample>,
    /// The bucket and state of the last sample, carried across quiet buckets.
    sampled: (usize, Sample),
}

impl<'a> Sim<'a> {
    fn new(setup: &Setup<'a>, autoscaler: &'a mut dyn Autoscaler) -> Sim<'a> {
        let (trace, model, seed) = (setup.trace, setup.model, setup.seed);
        let stream = |id: u64| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(id);
            rng
        };
        Sim {
            trace,
            measure_from: setup.measure_from,
            model,
            controller: Controller::new(autoscaler, setup.health.clone(), model.concurrency),
            cold_start: model.cold_start(),
            cold_start_rng: stream(1),
            cache_rng: stream(2),
            now: 0.0,
            events: BinaryHeap::new(),
            sequence: 0,
            next_arrival: 0,
            queues: Default::default(),
            in_service: [0; 3],
            workers: Vec::new(),
            alive: Vec::new(),
            desired: 0,
            decide_at: None,
            fates: vec![None; trace.arrivals.len()],
            answered_ids: HashSet::new(),
            started: 0,
            scale_events: 0,
            last_done: 0.0,
            bucket_seconds: (trace.duration / PLOT_BUCKETS as f64).max(1.0),
            samples: vec![Sample::default(); PLOT_BUCKETS + 1],
            sampled: (0, Sample::default()),
        }
    }

    fn schedule(&mut self, at: f64, event: Event) {
        if event == Event::Decide {
            self.decide_at = Some(at);
        }
        self.sequence += 1;
        self.events
            .push(Reverse(Scheduled(at, self.sequence, event)));
    }

    fn waiting(&self) -> u64 {
        self.queues.iter().map(|q| q.len() as u64).sum()
    }

    fn in_service(&self) -> u64 {
        self.in_service.iter().sum()
    }

    fn work_left(&self) -> bool {
        self.next_arrival < self.trace.arrivals.len() || self.waiting() + self.in_service() > 0
    }

    fn run(&mut self) {
        loop {
            let arrival_at = self.trace.arrivals.get(self.next_arrival).map(|a| a.at);
            let event_at = self.events.peek().map(|Reverse(s)| s.0);
            // Arrivals go first on ties: a decision at the same instant sees them.
            let take_arrival = match (arrival_at, event_at) {
                (Some(a), Some(e)) => a <= e,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if take_arrival {
                self.now = arrival_at.unwrap_or(self.now);
                self.arrive();
            } else {
                let Some(Reverse(Scheduled(at, _, event))) = self.events.pop() else {
                    break;
                };
                if !self.work_left() && at > self.trace.duration {
                    break;
                }
                self.now = at;
                match event {
                    Event::Ready(worker) => self.ready(worker),
                    Event::Done(worker, question, plan) => {
                        if !self.done(worker, question, plan) {
                            // A stale plan: nothing changed.
                            continue;
                        }
                    }
                    Event::Decide => self.decide(),
                }
            }
            self.dispatch();
            self.sample();
        }
        self.now = self.now.max(self.trace.duration).max(self.last_done);
    }

    fn arrive(&mut self) {
        let index = self.next_arrival;
        self.next_arrival += 1;
        let arrival = &self.trace.arrivals[index];
        self.bucket().arrivals += 1;
        let drawn_hit = self.model.cache_hit_ratio > 0.0
            && self.cache_rng.random::<f64>() < self.model.cache_hit_ratio;
        let repeated = arrival
            .question_id
            .as_deref()
            .is_some_and(|id| self.answered_ids.contains(id));
        if drawn_hit || repeated {
            self.fates[index] = Some(Fate::Cached);
            return;
        }
        if self.waiting() + self.in_service() >= self.model.queue_max {
            self.fates[index] = Some(Fate::Rejected);
            return;
        }
        let at = self.virtual_time(self.now);
        self.controller.question_arrived(at);
        self.queues[lane(arrival.priority)].push_back(index);
        if self.desired == 0
            && self.controller.autoscaler().wakes_on_arrival()
            && self.decide_at != Some(self.now)
        {
            self.schedule(self.now, Event::Decide);
        }
    }

    /// A worker finished loading; like a live one, it says so at once.
    fn ready(&mut self, index: usize) {
        let worker = &mut self.workers[index];
        if worker.exited_at.is_some() {
            return;
        }
        worker.ready = true;
        worker.ready_at = Some(self.now);
        let beat = self.heartbeat(index);
        self.controller.heartbeat(beat, self.virtual_time(self.now));
    }

    /// Finishes `question` if `plan` is still its plan; false if stale.
    fn done(&mut self, worker_index: usize, question: usize, plan: u32) -> bool {
        let sequences = &mut self.workers[worker_index].sequences;
        let Some(position) = sequences
            .iter()
            .position(|s| s.question == question && s.plan == plan)
        else {
            return false;
        };
        let sequence = sequences.remove(position);
        self.fates[question] = Some(Fate::Answered {
            first_token: (sequence.waited + sequence.first) as f32,
            total: (sequence.waited + sequence.total) as f32,
        });
        let arrival = &self.trace.arrivals[question];
        self.in_service[lane(arrival.priority)] -= 1;
        self.last_done = self.now;
        if let Some(id) = arrival.question_id.as_deref() {
            self.answered_ids.insert(id);
        }
        let response = self.now - arrival.at;
        let worker = &mut self.workers[worker_index];
        worker.jobs_done += 1;
        // As its heartbeat: the time this question spent in the worker.
        worker.mean_job = Some(moving_average(worker.mean_job, sequence.total));
        worker.mean_response = Some(moving_average(worker.mean_response, response));
        if worker.stopping && worker.sequences.is_empty() {
            worker.exited_at = Some(self.now);
        }
        self.replan(worker_index);
        true
    }

    /// Re-plans the questions on a worker whose decode rate changed (with a
    /// profile, any join or leave; without one, never).
    fn replan(&mut self, worker_index: usize) {
        let worker = &mut self.workers[worker_index];
        let rate = self.model.decode_rate(worker.active());
        let now = self.now;
        let events: Vec<(f64, Event)> = worker
            .sequences
            .iter_mut()
            .filter_map(|sequence| {
                sequence.replan(now, rate).then(|| {
                    let event = Event::Done(worker_index, sequence.question, sequence.plan);
                    (sequence.done_at(), event)
                })
            })
            .collect();
        for (at, event) in events {
            self.schedule(at, event);
        }
    }

    /// Hands waiting questions, most urgent first, to free ready workers;
    /// each worker that took one re-plans once, with all its joiners in.
    fn dispatch(&mut self) {
        let concurrency = self.model.concurrency;
        let mut position = 0;
        let mut joined: Vec<usize> = Vec::new();
        while self.queues.iter().any(|q| !q.is_empty()) {
            let Some(offset) = self.alive[position..].iter().position(|&i| {
                let w = &self.workers[i];
                w.ready && !w.stopping && w.exited_at.is_none() && w.active() < concurrency
            }) else {
                break;
            };
            position += offset;
            let worker_index = self.alive[position];
            let question = self
                .queues
                .iter_mut()
                .find_map(VecDeque::pop_front)
                .expect("a queue is not empty");
            let arrival = &self.trace.arrivals[question];
            let worker = &mut self.workers[worker_index];
            let rate = self.model.decode_rate(worker.active() + 1);
            let sequence = Sequence::start(self.model, arrival, question, self.now, rate);
            let at = sequence.done_at();
            worker.sequences.push(sequence);
            self.in_service[lane(arrival.priority)] += 1;
            self.schedule(at, Event::Done(worker_index, question, 0));
            if joined.last() != Some(&worker_index) {
                joined.push(worker_index);
            }
        }
        for worker_index in joined {
            self.replan(worker_index);
        }
    }

    /// Steps the controller with what live workers and NATS would tell
    /// it, and carries out its plan.
    fn decide(&mut self) {
        if self.decide_at == Some(self.now) {
            self.decide_at = None;
        }
        self.prune();
        let now = self.virtual_time(self.now);
        for index in self.alive.clone() {
            let beat = self.heartbeat(index);
            self.controller.heartbeat(beat, now);
        }
        let listing = self.listing();
        let depth = self.depth();
        let inputs = Inputs {
            workers: &listing,
            depth: &depth,
            // The simulated scaler never loses its link.
            heard_since: Some(DateTime::<Utc>::MIN_UTC),
        };
        let plan = self.controller.step(inputs, now);
        if plan.verdict.desired != self.desired {
            self.scale_events += u64::from(self.now >= self.measure_from);
            self.desired = plan.verdict.desired;
        }
        self.carry_out(&plan);
        // A decision already due sooner (an arrival's wake-up) stands.
        let at = self.now + plan.verdict.next_wake.as_secs_f64().max(1e-3);
        if self.decide_at.is_none_or(|due| due > at) {
            self.schedule(at, Event::Decide);
        }
    }

    /// What a live worker's heartbeat would say now.
    fn heartbeat(&self, index: usize) -> Heartbeat {
        let worker = &self.workers[index];
        let ms = |seconds: f64| self.virtual_time(seconds).timestamp_millis().max(0) as u64;
        let state = match (worker.stopping, worker.ready, worker.active()) {
            (true, _, _) => WorkerState::Draining,
            (false, false, _) => WorkerState::Loading,
            (false, true, 0) => WorkerState::Ready,
            (false, true, _) => WorkerState::Busy,
        };
        Heartbeat {
            state,
            ready_at_ms: worker.ready_at.map(ms),
            jobs_done: worker.jobs_done,
            slots: self.model.concurrency,
            active: worker.active(),
            mean_job_ms: worker.mean_job.map(|s| s * 1000.0),
            mean_response_ms: worker.mean_response.map(|s| s * 1000.0),
            sent_at_ms: ms(self.now),
            ..Heartbeat::loading(&worker.id, "", ms(worker.requested_at))
        }
    }

    /// The workers not exited, as the pool lists them.
    fn listing(&self) -> Vec<PoolWorker> {
        self.alive
            .iter()
            .map(|&i| {
                let worker = &self.workers[i];
                PoolWorker {
                    id: worker.id.clone(),
                    started_at: self.virtual_time(worker.requested_at),
                    phase: match worker.stopping {
                        true => Phase::Stopping {
                            since: self.virtual_time(self.now),
                        },
                        false => Phase::Running,
                    },
                }
            })
            .collect()
    }

    /// The queues as the worker consumers' state would show them.
    fn depth(&self) -> QueueDepth {
        let priorities = Priority::ALL
            .iter()
            .enumerate()
            .map(|(lane, &priority)| {
                let oldest = self.queues[lane]
                    .front()
                    .map_or(self.now, |&i| self.trace.arrivals[i].at);
                PriorityDepth {
                    priority,
                    pending: self.queues[lane].len() as u64,
                    ack_pending: self.in_service[lane],
                    oldest_waiting: Duration::from_secs_f64((self.now - oldest).max(0.0)),
                }
            })
            .collect();
        QueueDepth { priorities }
    }

    /// Stops the workers the plan names (they drain) and starts the ones it
    /// asks for, each ready after a drawn cold start.
    fn carry_out(&mut self, plan: &Plan) {
        for id in &plan.stop {
            let worker = &mut self.workers[index_of(id)];
            worker.stopping = true;
            if worker.sequences.is_empty() {
                worker.exited_at = Some(self.now);
            }
        }
        for _ in 0..plan.start {
            let delay = self.cold_start.sample(&mut self.cold_start_rng);
            let worker = self.add_worker(false);
            self.started += u64::from(self.now >= self.measure_from);
            self.schedule(self.now + delay, Event::Ready(worker));
        }
        self.prune();
    }

    fn add_worker(&mut self, ready: bool) -> usize {
        self.workers.push(Worker {
            id: format!("w{:08}", self.workers.len()),
            requested_at: self.now,
            ready,
            ready_at: None,
            jobs_done: 0,
            sequences: Vec::new(),
            stopping: false,
            exited_at: None,
            mean_job: None,
            mean_response: None,
        });
        self.alive.push(self.workers.len() - 1);
        self.workers.len() - 1
    }

    fn prune(&mut self) {
        let workers = &self.workers;
        self.alive.retain(|&i| workers[i].exited_at.is_none());
    }

    fn virtual_time(&self, seconds: f64) -> DateTime<Utc> {
        self.trace.start + chrono::Duration::nanoseconds((seconds * 1e9) as i64)
    }
}

/// The queue lane of a priority (high, normal, low).
fn lane(priority: Priority) -> usize {
    Priority::ALL
        .iter()
        .position(|p| *p == priority)
        .unwrap_or(1)
}

/// The worker index in an id from [`Sim::listing`].
fn index_of(id: &str) -> usize {
    id[1..].parse().expect("ids the replay made")
}
