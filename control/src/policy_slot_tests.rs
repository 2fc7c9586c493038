//! The policy with batching workers: load, utilization, Erlang C and panic
//! counted in slots, workers = ceil(slots / slots per worker).

use super::*;

/// `count` ready workers of `slots` slots with `active` slots in use in all.
fn batched(count: u32, slots: u32, active: u32) -> WorkerCounts {
    let busy = active.min(count);
    WorkerCounts {
        idle: count - busy,
        busy,
        slots: count * slots,
        active_slots: active,
        ..WorkerCounts::default()
    }
}

#[test]
fn eight_slots_per_worker_need_fewer_workers_than_one_for_the_same_load() {
    let mut policy = policy("");
    policy.config.resources.max_instances = 50;
    // 2/s x 4 s = 8 busy slots; at 80 % that is 10 slots.
    let load = |slots_per_worker| Observation {
        arrival_rate: 2.0,
        panic_arrival_rate: 2.0,
        service_time: Some(Duration::from_secs(4)),
        slots_per_worker,
        workers: batched(2, slots_per_worker, 2),
        ..Observation::default()
    };
    assert_eq!(decide(&load(1), &state(2), &policy, t0()).desired, 10);
    let batched_decision = decide(&load(8), &state(2), &policy, t0());
    assert_eq!(batched_decision.desired, 2, "ceil(10 slots / 8)");
    assert!(
        matches!(
            batched_decision.reason,
            Reason::Target {
                slots_per_worker: 8,
                workers: 2,
                ..
            }
        ),
        "{}",
        batched_decision.reason
    );
    // Erlang C: c workers of s slots are c x s servers of the batched
    // service time, and the servers it needs go back to whole workers.
    policy.config.target.attainment = 0.999;
    let servers = erlang_staffing(8.0, 4.0, 5.0, 0.001);
    assert!(servers > 10, "the waiting goal wants room: {servers}");
    assert_eq!(decide(&load(1), &state(2), &policy, t0()).desired, servers);
    assert_eq!(
        decide(&load(8), &state(2), &policy, t0()).desired,
        servers.div_ceil(8)
    );
    // Before any heartbeat the observation says 0: one slot, never a division by zero.
    assert_eq!(decide(&load(0), &state(2), &policy, t0()).desired, servers);
}

#[test]
fn utilization_counts_active_slots_not_busy_workers() {
    assert_eq!(
        batched(1, 8, 4).utilization(),
        0.5,
        "8 slots, 4 active: half busy"
    );
    assert_eq!(batched(2, 8, 2).utilization(), 0.125);
    assert_eq!(
        workers(1, 3).utilization(),
        0.75,
        "one slot each: as before"
    );
    assert_eq!(WorkerCounts::default().utilization(), 0.0);
    // Four busy workers with one question each of eight slots are mostly
    // idle: the seed's "utilization < 30 %" scale-down holds.
    let policy = policy(RULES);
    let quiet = Observation {
        arrival_rate: 0.1,
        workers: batched(4, 8, 4),
        slots_per_worker: 8,
        ..Observation::default()
    };
    assert_eq!(quiet.workers.busy, 4);
    assert_eq!(run(&policy, &quiet, state(4), 0, 180).desired, 3);
    let full = Observation {
        workers: batched(4, 1, 4),
        slots_per_worker: 1,
        ..quiet
    };
    assert_eq!(run(&policy, &full, state(4), 0, 400).desired, 4);
}

#[test]
fn a_burst_panics_against_the_slots_it_needs() {
    let policy = policy("");
    // The short window's 4/s x 2 s (+ the backlog) at 80 % wants 11 slots:
    // 11 one-slot workers are far more than twice the one ready (panic, up
    // to max 6), while one worker of 16 slots already holds them.
    let burst = |slots_per_worker| Observation {
        arrival_rate: 0.2,
        panic_arrival_rate: 4.0,
        lag: 5,
        waiting: 4,
        slots_per_worker,
        workers: batched(1, slots_per_worker, 1),
        ..Observation::default()
    };
    assert_eq!(decide(&burst(1), &state(1), &policy, t0()).desired, 6);
    let wide = decide(&burst(16), &state(1), &policy, t0());
    assert!(wide.state.panic_until.is_none(), "{}", wide.reason);
    assert_eq!(wide.desired, 1, "16 slots hold the burst: {}", wide.reason);
}
