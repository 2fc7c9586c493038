//! The discrete-event replay: arrivals from a trace, a FIFO queue per
//! priority, workers with cold starts, per-worker slots and graceful
//! drain, and one [`Autoscaler`] asked on its own schedule. Time is virtual
//! (seconds since the trace's start) and every random draw comes from the
//! seed, so a replay is a pure function of its inputs.
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
use ebb_nats::Priority;
use ebb_nats::messages::moving_average;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::trace::Trace;
pub use super::worker::WorkerModel;
use super::worker::{ColdStart, Sequence};
use crate::policy::{Observation, WorkerCounts};
use crate::signals::RateCounter;
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
}

/// A scaling policy as the replay sees it.
pub trait Autoscaler {
    /// Workers wanted now, and when to be asked again.
    fn decide(&mut self, observation: &Observation, now: DateTime<Utc>) -> (u32, Duration);
    /// Whether a question arriving while no worker is wanted asks at once
    /// (ebb's wake-up, Knative's activator) rather than at the next poll.
    fn wakes_on_arrival(&self) -> bool;
    /// Windows of the stable and the panic arrival rates it reads.
    fn rate_windows(&self) -> (Duration, Duration) {
        (Duration::from_secs(60), Duration::from_secs(6))
    }
}

/// Plot resolution.
pub const PLOT_BUCKETS: usize = 600;
/// Cold starts kept for the p90 the policy sees (as live).
const COLD_START_SAMPLES: usize = 50;

#[derive(Debug)]
struct Worker {
    requested_at: f64,
    ready: bool,
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
    sim.desired = initial_workers;
    sim.schedule(0.0, Event::Decide);
    sim.run();
    sim.finish()
}

struct Sim<'a> {
    trace: &'a Trace,
    measure_from: f64,
    model: &'a WorkerModel,
    autoscaler: &'a mut dyn Autoscaler,
    cold_start: ColdStart,
    cold_start_rng: ChaCha8Rng,
    cache_rng: ChaCha8Rng,
    now: f64,
    events: BinaryHeap<Reverse<Scheduled>>,
    sequence: u64,
    next_arrival: usize,
    queues: [VecDeque<usize>; 3],
    in_service: u64,
    /// Every worker ever started (their cost counts), and the ones not exited.
    workers: Vec<Worker>,
    alive: Vec<usize>,
    desired: u32,
    /// The next Decide already scheduled, if any.
    decide_at: Option<f64>,
    fates: Vec<Option<Fate>>,
    answered_ids: HashSet<&'a str>,
    arrivals: RateCounter,
    completions: RateCounter,
    new_arrivals: u64,
    cold_starts: VecDeque<f64>,
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
        let (stable, panic) = autoscaler.rate_windows();
        let stream = |id: u64| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(id);
            rng
        };
        Sim {
            trace,
            measure_from: setup.measure_from,
            model,
            autoscaler,
            cold_start: model.cold_start(),
            cold_start_rng: stream(1),
            cache_rng: stream(2),
            now: 0.0,
            events: BinaryHeap::new(),
            sequence: 0,
            next_arrival: 0,
            queues: Default::default(),
            in_service: 0,
            workers: Vec::new(),
            alive: Vec::new(),
            desired: 0,
            decide_at: None,
            fates: vec![None; trace.arrivals.len()],
            answered_ids: HashSet::new(),
            arrivals: RateCounter::new(stable.max(panic)),
            completions: RateCounter::new(stable.max(panic)),
            new_arrivals: 0,
            cold_starts: VecDeque::new(),
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

    fn work_left(&self) -> bool {
        self.next_arrival < self.trace.arrivals.len() || self.waiting() + self.in_service > 0
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
        if self.waiting() + self.in_service >= self.model.queue_max {
            self.fates[index] = Some(Fate::Rejected);
            return;
        }
        let at = self.virtual_time(self.now);
        self.arrivals.add(at, 1);
        self.new_arrivals += 1;
        let lane = Priority::ALL
            .iter()
            .position(|p| *p == arrival.priority)
            .unwrap_or(1);
        self.queues[lane].push_back(index);
        if self.desired == 0
            && self.autoscaler.wakes_on_arrival()
            && self.decide_at != Some(self.now)
        {
            self.schedule(self.now, Event::Decide);
        }
    }

    fn ready(&mut self, worker: usize) {
        let worker = &mut self.workers[worker];
        if worker.exited_at.is_some() {
            return;
        }
        worker.ready = true;
        self.cold_starts.push_back(self.now - worker.requested_at);
        if self.cold_starts.len() > COLD_START_SAMPLES {
            self.cold_starts.pop_front();
        }
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
        self.in_service -= 1;
        self.last_done = self.now;
        let at = self.virtual_time(self.now);
        self.completions.add(at, 1);
        if let Some(id) = arrival.question_id.as_deref() {
            self.answered_ids.insert(id);
        }
        let response = self.now - arrival.at;
        let worker = &mut self.workers[worker_index];
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
            self.in_service += 1;
            self.schedule(at, Event::Done(worker_index, question, 0));
            if joined.last() != Some(&worker_index) {
                joined.push(worker_index);
            }
        }
        for worker_index in joined {
            self.replan(worker_index);
        }
    }

    fn decide(&mut self) {
        if self.decide_at == Some(self.now) {
            self.decide_at = None;
        }
        let observation = self.observe();
        let now = self.virtual_time(self.now);
        let (desired, next) = self.autoscaler.decide(&observation, now);
        if desired != self.desired {
            self.scale_events += u64::from(self.now >= self.measure_from);
            self.desired = desired;
        }
        self.reconcile();
        // A decision already due sooner (an arrival's wake-up) stands.
        let at = self.now + next.as_secs_f64().max(1e-3);
        if self.decide_at.is_none_or(|due| due > at) {
            self.schedule(at, Event::Decide);
        }
    }

    fn observe(&mut self) -> Observation {
        let now = self.virtual_time(self.now);
        let (stable, panic) = self.autoscaler.rate_windows();
        let slots = self.model.concurrency;
        let mut counts = WorkerCounts::default();
        self.prune();
        // In slots, as the live scaler counts heartbeats: a worker with a
        // question in flight is busy, its slots in use are its questions.
        for worker in self.alive.iter().map(|&i| &self.workers[i]) {
            if worker.stopping {
                counts.draining += 1;
            } else if worker.ready {
                match worker.active() {
                    0 => counts.idle += 1,
                    _ => counts.busy += 1,
                }
                counts.slots += slots;
                counts.active_slots += worker.active();
            } else {
                counts.starting += 1;
            }
        }
        let oldest = self
            .queues
            .iter()
            .filter_map(|q| q.front())
            .map(|&i| self.trace.arrivals[i].at)
            .fold(f64::INFINITY, f64::min);
        let mut cold_starts: Vec<f64> = self.cold_starts.iter().copied().collect();
        cold_starts.sort_by(f64::total_cmp);
        let p90 =
            ebb_runtime::quantile::nearest_rank(&cold_starts, 0.9).map(Duration::from_secs_f64);
        // As live: the mean over the workers there now of what each reports.
        let mean = |field: fn(&Worker) -> Option<f64>| {
            let values: Vec<f64> = self
                .alive
                .iter()
                .filter_map(|&i| field(&self.workers[i]))
                .collect();
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        let mean_job = mean(|w| w.mean_job);
        let mean_response = mean(|w| w.mean_response);
        Observation {
            lag: self.waiting() + self.in_service,
            waiting: self.waiting(),
            oldest_waiting: Duration::from_secs_f64((self.now - oldest).max(0.0)),
            arrival_rate: self.arrivals.rate(now, stable),
            panic_arrival_rate: self.arrivals.rate(now, panic),
            completion_rate: self.completions.rate(now, stable),
            new_arrivals: std::mem::take(&mut self.new_arrivals),
            // As live: one question's time in its worker (its slot's
            // service time), and the slots each worker has.
            service_time: mean_job.map(Duration::from_secs_f64),
            slots_per_worker: slots,
            avg_response_time: mean_response.map(Duration::from_secs_f64),
            cold_start_p90: p90,
            workers: counts,
        }
    }

    /// Starts or stops workers to match the desired count: idle ones stop
    /// first, then ones still starting, busy ones last (they drain).
    fn reconcile(&mut self) {
        self.prune();
        let running: Vec<usize> = self
            .alive
            .iter()
            .copied()
            .filter(|&i| !self.workers[i].stopping)
            .collect();
        let count = running.len() as u32;
        if self.desired > count {
            for _ in count..self.desired {
                let delay = self.cold_start.sample(&mut self.cold_start_rng);
                let worker = self.add_worker(false);
                self.started += u64::from(self.now >= self.measure_from);
                self.schedule(self.now + delay, Event::Ready(worker));
            }
        } else if self.desired < count {
            let mut victims = running;
            victims.sort_by_key(|&i| {
                let worker = &self.workers[i];
                match (worker.ready, worker.active()) {
                    (true, 0) => (0, 0, Reverse(i)),
                    (false, _) => (1, 0, Reverse(i)),
                    (true, active) => (2, active, Reverse(i)),
                }
            });
            for i in victims.into_iter().take((count - self.desired) as usize) {
                let worker = &mut self.workers[i];
                worker.stopping = true;
                if worker.sequences.is_empty() {
                    worker.exited_at = Some(self.now);
                }
            }
        }
    }

    fn add_worker(&mut self, ready: bool) -> usize {
        self.workers.push(Worker {
            requested_at: self.now,
            ready,
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
