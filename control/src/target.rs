//! Target tracking: how many workers the arrival rate, the backlog and the
//! goals need (utilization and Erlang C over every slot), and panic mode,
//! which scales up at once on a real burst or an aging queue and never
//! down while it lasts. One stage of [`crate::policy::decide`].

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::TargetTracking;
use crate::policy::{Observation, Policy, PolicyState, Proposal};
use crate::reason::Reason;

/// Target tracking. The load, in busy slots, is arrival rate x service
/// time plus the waiting questions' work spread over the drain target
/// (questions being answered are in the first term: counting them in the
/// backlog too would pay for them twice). Slots = the more of
/// load / utilization and what the Erlang C queue needs for `attainment`,
/// with every slot a server (c workers of s slots are c x s servers, each
/// taking the batched service time); workers = ceil(slots / s).
/// Panic when the short window asks for at least twice the ready workers
/// (and is no mere noise), or the oldest question is older than half the
/// latency goal: then scale up at once and never down. Also returns the
/// stable window's need, which learning timetable windows remember.
pub(crate) fn target_tracking(
    policy: &Policy,
    observation: &Observation,
    current: u32,
    next: &mut PolicyState,
    now: DateTime<Utc>,
) -> (Proposal, u32) {
    let target = &policy.config.target;
    let sizing = Sizing::of(target, observation);
    let stable = sizing.workers(observation.arrival_rate);
    let burst = sizing.workers(observation.panic_arrival_rate);
    let ready = observation.workers.ready();

    let too_old = observation.oldest_waiting > target.latency_goal / 2;
    // At zero ready workers every need is "twice the ready ones": that case
    // is activation, not panic.
    let burst_panic =
        ready > 0 && burst >= 2 * ready && surprising_burst(observation, target.panic_window);
    if too_old || burst_panic {
        next.panic_until = Some(now + target.stable_window);
    }
    let panicking = next.panic_until.is_some_and(|until| until > now);
    if !panicking {
        next.panic_until = None;
    }
    let reason = if too_old {
        Reason::PanicQueueAge {
            age: observation.oldest_waiting,
            limit: target.latency_goal / 2,
        }
    } else if burst_panic {
        Reason::PanicBurst {
            arrival_rate: observation.panic_arrival_rate,
            window: target.panic_window,
            needed: burst,
            ready,
        }
    } else if panicking {
        Reason::PanicHolding
    } else {
        Reason::Target {
            arrival_rate: observation.arrival_rate,
            service_time: Duration::from_secs_f64(sizing.service),
            waiting: observation.waiting,
            drain_target: target.drain_target,
            utilization: target.utilization,
            slots_per_worker: sizing.slots,
            workers: stable,
        }
    };
    // While questions age, add a worker per decision, but only once the
    // previous one has finished starting (it may be all that is missing).
    let add_one = too_old && observation.workers.starting == 0;
    // Panic never scales down (at least the current count while it lasts),
    // and adds to what actually runs, not to what was merely wanted.
    let capacity = observation.workers.capacity();
    let wanted = if panicking {
        stable
            .max(burst)
            .max(current)
            .max(capacity + u32::from(add_one))
    } else {
        stable
    };
    // What the load itself asks for over the stable window, without
    // panic's holding or the short window's spikes: what a learning
    // timetable window remembers.
    (Proposal { wanted, reason }, stable)
}

/// How many workers an arrival rate needs, given the service time, the
/// backlog to drain and the goals.
struct Sizing<'a> {
    target: &'a TargetTracking,
    /// Seconds a slot spends per question.
    service: f64,
    /// Slot-seconds per second the backlog adds, spread over the drain target.
    backlog: f64,
    slots: u32,
}

impl<'a> Sizing<'a> {
    fn of(target: &'a TargetTracking, observation: &Observation) -> Sizing<'a> {
        let service = observation
            .service_time
            .unwrap_or(target.default_service_time)
            .as_secs_f64();
        Sizing {
            target,
            service,
            backlog: observation.waiting as f64 * service / target.drain_target.as_secs_f64(),
            slots: observation.slots_per_worker.max(1),
        }
    }

    /// Workers for `rate` arrivals a second: enough slots for the
    /// utilization target and, with an attainment goal, for Erlang C's wait.
    fn workers(&self, rate: f64) -> u32 {
        let target = self.target;
        let load = rate * self.service + self.backlog;
        let by_utilization = (load / target.utilization).ceil().min(u32::MAX as f64) as u32;
        let wait_goal = (target.latency_goal / 2).as_secs_f64();
        let by_waiting = match target.attainment {
            0.0 => 0,
            attainment => erlang_staffing(load, self.service, wait_goal, 1.0 - attainment),
        };
        workers_for(by_utilization.max(by_waiting), self.slots)
    }
}

/// Whether the short window's arrivals stand out from the stable rate's own
/// noise: at a few questions a minute, three in six seconds is chance, not
/// a burst.
fn surprising_burst(observation: &Observation, window: Duration) -> bool {
    let seconds = window.as_secs_f64();
    let expected = observation.arrival_rate * seconds;
    let seen = observation.panic_arrival_rate * seconds;
    seen > expected + 3.0 * expected.sqrt() + 1.0
}

/// Workers that hold `servers` slots: a worker's slots cannot be split.
pub fn workers_for(servers: u32, slots_per_worker: u32) -> u32 {
    servers.div_ceil(slots_per_worker.max(1))
}

/// The fewest servers for which an M/M/N queue with `load` erlangs and mean
/// service time `service` s keeps P(wait > `wait_goal`) within `miss`:
/// P(wait > t) = C(N, load) exp(-(N - load) t / service), with Erlang C from
/// the Erlang B recursion.
pub fn erlang_staffing(load: f64, service: f64, wait_goal: f64, miss: f64) -> u32 {
    if !(load > 0.0 && service > 0.0) {
        return 0;
    }
    // Far past any fleet worth planning; stops a pathological load looping.
    let limit = load + 20.0 * load.sqrt() + 100.0;
    let mut blocking = 1.0;
    let mut workers = 0.0;
    loop {
        workers += 1.0;
        blocking = load * blocking / (workers + load * blocking);
        if workers <= load {
            continue;
        }
        let waits = workers * blocking / (workers - load * (1.0 - blocking));
        let late = waits * (-(workers - load) * wait_goal / service).exp();
        if late <= miss || workers >= limit {
            return workers.min(u32::MAX as f64) as u32;
        }
    }
}
