//! The policy on a fake clock: every rule, cooldown, panic entry and exit,
//! clamp, override expiry and timetable floor.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use super::*;
use ebb_schedule::timetable::Timetable;

const BASE: &str = r#"
resources: {min_instances: 0, max_instances: 6}
cooldowns: {scale_down_stabilization: 60s, scale_to_zero_idle: 300s}
target: {utilization: 0.8, attainment: 0, drain_target: 30s, latency_goal: 10s, default_service_time: 2s, stable_window: 60s, panic_window: 6s}
backend: {kind: process}
"#;

fn policy(extra: &str) -> Policy {
    Policy::new(ScalerConfig::parse(&format!("{BASE}{extra}")).expect("valid config"))
}

/// A Wednesday, 2026-11-25 10:00:00 UTC.
fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 10, 0, 0).unwrap()
}

fn at(seconds: i64) -> DateTime<Utc> {
    t0() + chrono::Duration::seconds(seconds)
}

/// One-slot workers, as before batching: each busy one has its slot in use.
fn workers(idle: u32, busy: u32) -> WorkerCounts {
    WorkerCounts {
        idle,
        busy,
        slots: idle + busy,
        active_slots: busy,
        ..WorkerCounts::default()
    }
}

fn state(desired: u32) -> PolicyState {
    PolicyState {
        desired,
        ..PolicyState::default()
    }
}

/// Runs `decide` once a second from `from` to `to` (inclusive) with the same
/// observation; returns the last decision.
fn run(
    policy: &Policy,
    observation: &Observation,
    mut state: PolicyState,
    from: i64,
    to: i64,
) -> Decision {
    let mut decision = None;
    for second in from..=to {
        let made = decide(observation, &state, policy, at(second));
        state = made.state.clone();
        decision = Some(made);
    }
    decision.expect("at least one decision")
}

#[test]
fn a_question_at_zero_workers_activates_one_at_once() {
    let policy = policy("");
    let observation = Observation {
        lag: 1,
        waiting: 1,
        new_arrivals: 1,
        ..Observation::default()
    };
    let decision = decide(&observation, &state(0), &policy, t0());
    assert_eq!(decision.desired, 1);
    assert!(
        matches!(decision.reason, Reason::Target { workers: 1, .. }),
        "{}",
        decision.reason
    );
    // Rules that would never fire on one question still activate a worker.
    let rules = self::policy(RULES);
    let decision = decide(&observation, &state(0), &rules, t0());
    assert_eq!(decision.desired, 1);
    assert_eq!(decision.reason, Reason::Activation { waiting: 1 });
    assert_eq!(
        decision.reason.to_string(),
        "activation: 1 question(s) waiting at zero workers"
    );
}

#[test]
fn target_tracking_covers_arrivals_and_the_backlog() {
    let policy = policy("");
    // 2/s x 2 s = 4 busy workers; 30 waiting x 2 s over a 30 s drain = 2 more; at 80% -> 8, max 6.
    let observation = Observation {
        arrival_rate: 2.0,
        panic_arrival_rate: 2.0,
        lag: 32,
        waiting: 30,
        workers: workers(4, 2),
        ..Observation::default()
    };
    let decision = decide(&observation, &state(6), &policy, t0());
    assert_eq!(decision.desired, 6);
    assert!(
        matches!(&decision.reason, Reason::Capped { max: 6, wanted } if matches!(**wanted, Reason::Target { workers: 8, .. })),
        "{}",
        decision.reason
    );
    // Measured service time replaces the default: 1/s x 4 s / 0.8 = 5.
    let observation = Observation {
        arrival_rate: 1.0,
        panic_arrival_rate: 1.0,
        service_time: Some(Duration::from_secs(4)),
        workers: workers(2, 3),
        ..Observation::default()
    };
    assert_eq!(
        decide(&observation, &state(2), &policy, t0()).desired,
        5,
        "scale-up is immediate"
    );
    // Questions being answered are already in the first term.
    let answering = Observation {
        lag: 3,
        waiting: 0,
        ..observation
    };
    assert_eq!(decide(&answering, &state(2), &policy, t0()).desired, 5);
}

#[test]
fn scale_down_waits_for_the_stabilization_window_then_takes_its_peak() {
    let policy = policy("");
    let quiet = Observation {
        arrival_rate: 0.4,
        panic_arrival_rate: 0.4,
        workers: workers(3, 1),
        ..Observation::default()
    };
    // Wants ceil(0.4 x 2 / 0.8) = 1 of 4.
    assert_eq!(
        run(&policy, &quiet, state(4), 0, 59).desired,
        4,
        "not before 60 s"
    );
    let decision = run(&policy, &quiet, state(4), 0, 60);
    assert_eq!(decision.desired, 1, "straight to what was wanted all along");
    assert!(
        matches!(decision.reason, Reason::Stable { to: 1, window, .. } if window == Duration::from_secs(60)),
        "{}",
        decision.reason
    );

    // A busier moment inside the window sets how far it may go.
    let busier = Observation {
        arrival_rate: 0.8,
        ..quiet.clone()
    };
    let mut state = run(&policy, &quiet, state(4), 0, 29).state;
    state = decide(&busier, &state, &policy, at(30)).state;
    let decision = run(&policy, &quiet, state, 31, 60);
    assert_eq!(
        decision.desired, 2,
        "the window's peak: ceil(0.8 x 2 / 0.8)"
    );
    assert_eq!(
        run(&policy, &quiet, decision.state.clone(), 61, 119).desired,
        2,
        "the rest waits a new window"
    );
    assert_eq!(run(&policy, &quiet, decision.state, 61, 120).desired, 1);
}

#[test]
fn the_last_worker_stops_only_after_the_idle_window() {
    let policy = policy("");
    let idle = Observation {
        workers: workers(1, 0),
        ..Observation::default()
    };
    assert_eq!(run(&policy, &idle, state(1), 0, 299).desired, 1);
    let decision = run(&policy, &idle, state(1), 0, 300);
    assert_eq!(decision.desired, 0);
    assert!(
        matches!(decision.reason, Reason::IdleToZero { idle, .. } if idle == Duration::from_secs(300)),
        "{}",
        decision.reason
    );

    // Any work restarts the idle clock.
    let mut state = run(&policy, &idle, state(1), 0, 200).state;
    let busy = Observation {
        workers: workers(0, 1),
        lag: 1,
        ..Observation::default()
    };
    state = decide(&busy, &state, &policy, at(201)).state;
    assert_eq!(
        run(&policy, &idle, state.clone(), 202, 500).desired,
        1,
        "idle since 202 only"
    );
    assert_eq!(run(&policy, &idle, state, 202, 502).desired, 0);
}

#[test]
fn scale_to_zero_and_stabilization_are_separate_windows() {
    let mut policy = policy("");
    policy.config.cooldowns.scale_down_stabilization = Duration::from_secs(10);
    policy.config.cooldowns.scale_to_zero_idle = Duration::from_secs(100);
    let idle = Observation {
        workers: workers(3, 0),
        ..Observation::default()
    };
    let mut state = state(3);
    let mut reached_one_at = None;
    for second in 0..=200 {
        let decision = decide(&idle, &state, &policy, at(second));
        if decision.desired == 1 && reached_one_at.is_none() {
            reached_one_at = Some(second);
        }
        state = decision.state;
        if state.desired == 0 {
            assert!(second >= 100, "1 -> 0 waits the idle window, got {second}");
            assert_eq!(reached_one_at, Some(10), "3 -> 1 after 10 s");
            return;
        }
    }
    panic!("never reached zero");
}

#[test]
fn an_old_question_means_panic_up_at_once_and_no_scale_down_while_it_lasts() {
    let policy = policy("");
    let stuck = Observation {
        lag: 3,
        waiting: 1,
        oldest_waiting: Duration::from_secs(6),
        workers: workers(0, 2),
        ..Observation::default()
    };
    let panic = decide(&stuck, &state(2), &policy, t0());
    assert_eq!(panic.desired, 3, "one more worker at once");
    assert!(
        panic.reason
            == Reason::PanicQueueAge {
                age: Duration::from_secs(6),
                limit: Duration::from_secs(5)
            },
        "{}",
        panic.reason
    );
    // Still stuck while the new worker starts: no pile-up of starts.
    let starting = Observation {
        workers: WorkerCounts {
            starting: 1,
            busy: 2,
            ..Default::default()
        },
        ..stuck.clone()
    };
    assert_eq!(decide(&starting, &panic.state, &policy, at(1)).desired, 3);

    // Load vanishes: panic holds the workers for the stable window...
    let calm = Observation {
        workers: workers(3, 0),
        ..Observation::default()
    };
    let held = run(&policy, &calm, panic.state.clone(), 1, 59);
    assert_eq!(held.desired, 3);
    assert_eq!(held.reason, Reason::PanicHolding);
    // ...then normal scale-down resumes, with its own stabilization.
    assert_eq!(run(&policy, &calm, panic.state.clone(), 1, 61).desired, 3);
    assert_eq!(run(&policy, &calm, panic.state, 1, 121).desired, 1);
}

#[test]
fn a_burst_in_the_short_window_panics() {
    let policy = policy("");
    // Stable rate still low, but the last 6 s ran at 4/s: 4 x 2 / 0.8 = 10 -> max 6, vs 1 ready.
    let burst = Observation {
        arrival_rate: 0.2,
        panic_arrival_rate: 4.0,
        lag: 5,
        waiting: 4,
        workers: workers(0, 1),
        ..Observation::default()
    };
    let decision = decide(&burst, &state(1), &policy, t0());
    assert_eq!(decision.desired, 6);
    assert!(
        matches!(&decision.reason, Reason::Capped { wanted, max: 6 }
            if matches!(**wanted, Reason::PanicBurst { arrival_rate: 4.0, needed: 11, ready: 1, .. })),
        "{}",
        decision.reason
    );
    assert!(decision.state.panic_until.is_some());
}

#[test]
fn min_and_max_clamp_every_outcome() {
    let policy = policy("").config;
    let policy = Policy::new(ScalerConfig {
        resources: crate::config::Resources {
            min_instances: 2,
            max_instances: 3,
            instance_type: None,
            price_per_hour: None,
        },
        timetable: Timetable::new(&[]).unwrap(),
        ..policy
    });
    let idle = Observation::default();
    let decision = run(&policy, &idle, state(2), 0, 1000);
    assert_eq!(decision.desired, 2);
    let flood = Observation {
        lag: 10_000,
        waiting: 10_000,
        arrival_rate: 100.0,
        panic_arrival_rate: 100.0,
        ..Observation::default()
    };
    assert_eq!(decide(&flood, &state(2), &policy, t0()).desired, 3);
}

#[test]
fn a_manual_override_holds_until_it_expires_and_is_clamped() {
    let policy = policy("");
    let idle = Observation::default();
    let manual = PolicyState {
        manual: Some(Override {
            count: 4,
            expires: at(30),
        }),
        ..state(0)
    };
    let during = decide(&idle, &manual, &policy, at(10));
    assert_eq!(during.desired, 4);
    assert!(
        matches!(during.reason, Reason::Manual { count: 4, .. }),
        "{}",
        during.reason
    );
    assert!(during.next_wake <= Duration::from_secs(20));
    let after = decide(&idle, &during.state, &policy, at(30));
    assert_eq!(after.state.manual, None, "expired overrides are dropped");
    assert_eq!(after.desired, 4, "then ordinary scale-down rules apply");
    let too_many = PolicyState {
        manual: Some(Override {
            count: 99,
            expires: at(30),
        }),
        ..state(0)
    };
    assert_eq!(decide(&idle, &too_many, &policy, at(0)).desired, 6);
}

#[test]
fn a_timetable_window_is_a_floor_and_starts_early_by_the_cold_start() {
    // Weekdays 10:05 UTC for 30 minutes, floor 2; t0 is Wednesday 10:00 UTC.
    let policy = policy(
        "timetable:\n  - {name: period-2, cron: \"5 10 * * 1-5\", timezone: UTC, duration: 30m, min_workers: 2}\n",
    );
    let slow_start = Observation {
        cold_start_p90: Some(Duration::from_secs(120)),
        ..Observation::default()
    };
    assert_eq!(
        decide(&slow_start, &state(0), &policy, at(179)).desired,
        0,
        "more than the lead before"
    );
    let prewarm = decide(&slow_start, &state(0), &policy, at(180));
    assert_eq!(prewarm.desired, 2, "120 s lead before 10:05");
    assert_eq!(
        prewarm.reason,
        Reason::TimetableFloor {
            window: "period-2".into(),
            workers: 2
        }
    );
    // A floor, not a setpoint: more load still scales above it.
    let busy = Observation {
        arrival_rate: 2.0,
        panic_arrival_rate: 2.0,
        workers: workers(0, 2),
        ..slow_start.clone()
    };
    assert_eq!(decide(&busy, &state(2), &policy, at(400)).desired, 5);
    // After the window, the floor goes and ordinary scale-down follows.
    let after = run(&policy, &Observation::default(), state(2), 2101, 2101 + 61);
    assert_eq!(after.desired, 1);
    assert_eq!(after.floor, None);
}

#[test]
fn asleep_at_zero_the_next_wake_is_the_next_prewarm() {
    let policy = policy(
        "prewarm_lead: 60s\ntimetable:\n  - {name: later, cron: \"0 11 * * *\", timezone: UTC, duration: 10m, min_workers: 1}\n",
    );
    let decision = decide(&Observation::default(), &state(0), &policy, t0());
    assert_eq!(decision.desired, 0);
    assert_eq!(
        decision.next_wake,
        Duration::from_secs(60),
        "capped at a minute"
    );
    let decision = decide(&Observation::default(), &state(0), &policy, at(3600 - 90));
    assert_eq!(decision.next_wake, Duration::from_secs(30));
}

const RULES: &str = r#"
rules:
  scale_up:
    - {metric: queue_depth, threshold: 10, duration: 30s}
    - {metric: queue_age, threshold: 20, duration: 0s}
  scale_down:
    - {metric: worker_utilization, threshold: 0.3, duration: 120s}
    - {metric: request_per_second, threshold: 0.5, duration: 120s}
  step_up: 2
"#;

#[test]
fn rules_scale_up_when_any_condition_held_long_enough() {
    let policy = policy(RULES);
    let deep = Observation {
        lag: 12,
        workers: workers(0, 2),
        ..Observation::default()
    };
    assert_eq!(run(&policy, &deep, state(2), 0, 29).desired, 2);
    let decision = run(&policy, &deep, state(2), 0, 30);
    assert_eq!(decision.desired, 4, "step_up 2");
    // The decision log's words for a rule that fired.
    assert_eq!(
        decision.reason.to_string(),
        "queue_depth 12.00 > 10 for 30s"
    );
    assert_eq!(
        run(&policy, &deep, state(2), 0, 59).desired,
        4,
        "the next step waits a full duration"
    );
    assert_eq!(run(&policy, &deep, state(2), 0, 60).desired, 6);
    let old = Observation {
        oldest_waiting: Duration::from_secs(25),
        workers: workers(0, 2),
        ..Observation::default()
    };
    assert_eq!(
        decide(&old, &state(2), &policy, t0()).desired,
        4,
        "a zero duration fires at once"
    );
}

#[test]
fn rules_scale_down_only_when_all_conditions_held() {
    let policy = policy(RULES);
    let quiet_but_busy = Observation {
        arrival_rate: 0.1,
        workers: workers(1, 3),
        ..Observation::default()
    };
    assert_eq!(
        run(&policy, &quiet_but_busy, state(4), 0, 400).desired,
        4,
        "utilization 0.75 is not < 0.3"
    );
    let quiet = Observation {
        arrival_rate: 0.1,
        workers: workers(4, 0),
        ..Observation::default()
    };
    // Conditions hold from 0, fire at 120; the stabilization window then starts.
    assert_eq!(run(&policy, &quiet, state(4), 0, 179).desired, 4);
    let decision = run(&policy, &quiet, state(4), 0, 180);
    assert_eq!(decision.desired, 3);
    assert!(
        decision
            .reason
            .to_string()
            .starts_with("worker_utilization 0.00 < 0.3 for 180s, request_per_second 0.10 < 0.5"),
        "{}",
        decision.reason
    );
}

#[test]
fn a_learning_window_prewarms_to_what_its_last_opening_needed() {
    let policy = policy(
        "prewarm_lead: 60s\ntimetable:\n  - {name: break, cron: \"0 10 * * *\", timezone: UTC, duration: 10m, min_workers: 1, learn: true}\n",
    );
    let quiet = Observation::default();
    let burst = Observation {
        arrival_rate: 1.0,
        panic_arrival_rate: 1.0,
        workers: workers(0, 1),
        ..Observation::default()
    };
    let day = 86_400;
    let at_zero = |state: &PolicyState| PolicyState {
        desired: 0,
        ..state.clone()
    };
    // First opening: nothing learned yet, the configured floor of 1.
    let first = decide(&quiet, &state(0), &policy, at(-30));
    assert_eq!(first.desired, 1);
    // The break's load needs ceil(1/s x 2 s / 0.8) = 3.
    let during = run(&policy, &burst, first.state, 0, 120);
    assert_eq!(during.desired, 3);

    // Next day, a lead before the opening and with no load yet: 3 ready.
    let second = decide(&quiet, &at_zero(&during.state), &policy, at(day - 30));
    assert_eq!(second.desired, 3);
    assert_eq!(
        second.reason,
        Reason::TimetableFloor {
            window: "break".into(),
            workers: 3
        }
    );
    assert_eq!(second.floor.as_ref().map(|w| w.min_workers), Some(3));
    // A quiet opening teaches the next one that 1 is enough.
    let quiet_break = run(&policy, &quiet, second.state, day, day + 60);
    let third = decide(
        &quiet,
        &at_zero(&quiet_break.state),
        &policy,
        at(2 * day - 30),
    );
    assert_eq!(third.desired, 1);
}

#[test]
fn erlang_staffing_matches_the_textbook_and_keeps_small_fleets_roomy() {
    // 10 erlangs, 10 s service: P(wait > 0) <= 20 % needs 14 servers
    // (C(13, 10) = 0.22, C(14, 10) = 0.13 from the Erlang C tables).
    assert_eq!(erlang_staffing(10.0, 10.0, 0.0, 0.2), 14);
    // Waiting may last 4 s at most for 99.9 % of questions.
    let small = erlang_staffing(2.0, 10.0, 4.0, 0.001);
    assert!(small >= 6, "2 erlangs need room: {small}");
    let large = erlang_staffing(100.0, 10.0, 4.0, 0.001);
    assert!((110..=130).contains(&large), "economies of scale: {large}");
    assert_eq!(erlang_staffing(0.0, 10.0, 4.0, 0.001), 0);
}

#[test]
fn target_tracking_plans_for_the_waiting_goal_on_small_fleets() {
    let policy = policy("");
    let mut with_goal = policy.clone();
    with_goal.config.target.attainment = 0.999;
    with_goal.config.resources.max_instances = 20;
    // 0.2/s x 10 s = 2 erlangs: 80 % utilization says 3, the 5 s wait goal more.
    let observation = Observation {
        arrival_rate: 0.2,
        panic_arrival_rate: 0.2,
        service_time: Some(Duration::from_secs(10)),
        workers: workers(2, 1),
        ..Observation::default()
    };
    assert_eq!(decide(&observation, &state(3), &policy, t0()).desired, 3);
    let planned = decide(&observation, &state(3), &with_goal, t0()).desired;
    assert_eq!(planned, erlang_staffing(2.0, 10.0, 5.0, 0.001));
    assert!(planned > 3);
}

#[test]
fn a_few_questions_in_the_short_window_are_noise_not_a_burst() {
    let policy = policy("");
    // 0.2/s stable; 3 questions in 6 s (0.5/s) wants 2 >= 2 x 1 ready, but
    // that many arrive by chance every few minutes.
    let noise = Observation {
        arrival_rate: 0.2,
        panic_arrival_rate: 0.5,
        workers: workers(0, 1),
        ..Observation::default()
    };
    let decision = decide(&noise, &state(1), &policy, t0());
    assert!(decision.state.panic_until.is_none(), "{}", decision.reason);
}

/// Capacity in slots: batching workers (issue 11).
#[path = "policy_slot_tests.rs"]
mod slots;

/// The miss-budget rule for the last worker (issue 13).
#[path = "policy_budget_tests.rs"]
mod budget;
