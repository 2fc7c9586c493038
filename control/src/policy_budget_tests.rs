//! The miss-budget rule for the last worker on a fake clock: zero when the
//! budget pays for the next wake-up's late first questions, floor 1 when
//! it does not, the reason saying which; floors and limits still apply.

use super::*;
use crate::miss_budget::BudgetReading;

/// A 45 s cold start against a 5 s wait goal, budgeted over an hour.
fn budgeted(attainment: f64, extra: &str) -> Policy {
    let mut policy = policy(extra);
    policy.config.target.attainment = attainment;
    policy.config.target.miss_budget_window = Duration::from_secs(3600);
    policy
}

fn cold(cold_start_s: u64) -> Observation {
    Observation {
        cold_start_p90: Some(Duration::from_secs(cold_start_s)),
        ..Observation::default()
    }
}

/// One ready idle worker from `from` to `to`, a question every 15 s until
/// `last_question`, a decision a second; returns the last decision.
fn sparse(
    policy: &Policy,
    mut state: PolicyState,
    from: i64,
    last_question: i64,
    to: i64,
    cold_start_s: u64,
) -> Decision {
    let mut decision = None;
    for second in from..=to {
        let asked = second <= last_question && (second - from) % 15 == 0;
        let observation = Observation {
            new_arrivals: u64::from(asked),
            workers: workers(1, 0),
            ..cold(cold_start_s)
        };
        let made = decide(&observation, &state, policy, at(second));
        state = made.state.clone();
        decision = Some(made);
    }
    decision.expect("at least one decision")
}

fn budget_of(reason: &Reason) -> &BudgetReading {
    match reason {
        Reason::IdleToZero {
            budget: Some(budget),
            ..
        }
        | Reason::MissBudgetFloor(budget) => budget,
        other => panic!("no budget in {other}"),
    }
}

#[test]
fn the_last_worker_goes_when_the_budget_pays_for_a_late_first_question() {
    // 201 questions in 3,000 s; idle for 300 s after the last.
    let decision = sparse(&budgeted(0.95, ""), state(1), 0, 3000, 3301, 45);
    assert_eq!(decision.desired, 0, "{}", decision.reason);
    let budget = budget_of(&decision.reason);
    assert_eq!((budget.questions, budget.spent), (201, 0));
    // 1 + 201 q / 3,301 s x (45 s - 5 s) late questions expected.
    assert!((budget.cost - (1.0 + 201.0 / 3301.0 * 40.0)).abs() < 1e-9);
    assert_eq!(decision.reason.label(), "idle");
    let words = decision.reason.to_string();
    assert!(
        words.starts_with("idle 300s; the miss budget (10.05 of 201 questions at 95 % over 1h, 0 spent) pays for 3.4 late")
            && words.ends_with("-> 0"),
        "{words}"
    );
}

#[test]
fn the_floor_stays_at_one_when_the_budget_cannot_pay() {
    let decision = sparse(&budgeted(0.99, ""), state(1), 0, 3000, 3301, 45);
    assert_eq!(decision.desired, 1);
    assert_eq!(decision.reason.label(), "miss_budget");
    assert_eq!(
        decision.reason.to_string(),
        "floor 1: the miss budget (2.01 of 201 questions at 99 % over 1h, 0 spent) cannot pay for 3.4 late first question(s) (cold start 45s, wait goal 5s)"
    );
    // Still so an hour of idling later: the window's questions are gone.
    let later = sparse(&budgeted(0.99, ""), decision.state, 3302, 0, 7000, 45);
    assert_eq!((later.desired, budget_of(&later.reason).questions), (1, 0));
}

#[test]
fn a_wake_up_spends_the_budget_on_the_questions_that_waited_its_cold_start() {
    let policy = budgeted(0.97, "");
    // At zero, a question arrives; two more come while the worker loads.
    let first = Observation {
        lag: 1,
        waiting: 1,
        new_arrivals: 1,
        ..cold(45)
    };
    let mut woken = decide(&first, &state(0), &policy, at(0));
    assert_eq!(woken.desired, 1);
    for second in 1..=44 {
        let loading = Observation {
            lag: 1,
            new_arrivals: u64::from(second == 10 || second == 20),
            workers: WorkerCounts {
                starting: 1,
                ..WorkerCounts::default()
            },
            ..cold(45)
        };
        woken = decide(&loading, &woken.state, &policy, at(second));
    }
    assert_eq!(woken.state.miss_budget.spent(), 3);
    let decision = sparse(&policy, woken.state, 45, 3000, 3301, 45);
    // 6.03 allowed for 201 questions, 3 spent: 3.03 left < 3.4 expected.
    assert_eq!(decision.desired, 1, "{}", decision.reason);
    assert_eq!(budget_of(&decision.reason).spent, 3);
    // Without that wake-up the same traffic could go to zero.
    let unspent = sparse(&policy, state(1), 0, 3000, 3301, 45);
    assert_eq!(unspent.desired, 0, "{}", unspent.reason);
}

#[test]
fn a_cold_start_within_the_wait_goal_costs_nothing() {
    let decision = sparse(&budgeted(0.999, ""), state(1), 0, 30, 331, 3);
    assert_eq!(decision.desired, 0, "{}", decision.reason);
    assert_eq!(
        decision.reason.to_string(),
        "idle 300s; a wake-up costs no late question (cold start 3s within the wait goal 5s) -> 0"
    );
}

#[test]
fn always_and_never_do_not_ask_the_budget() {
    let always = sparse(
        &budgeted(0.999, "scale_to_zero: always\n"),
        state(1),
        0,
        30,
        331,
        45,
    );
    assert_eq!(always.desired, 0);
    assert_eq!(
        always.reason,
        Reason::IdleToZero {
            idle: Duration::from_secs(300),
            budget: None
        }
    );
    let never = sparse(
        &budgeted(0.0, "scale_to_zero: never\n"),
        state(1),
        0,
        30,
        3000,
        3,
    );
    assert_eq!((never.desired, never.reason), (1, Reason::NeverToZero));
}

#[test]
fn floors_and_min_instances_still_hold_when_the_budget_pays() {
    let mut min_one = budgeted(0.5, "");
    min_one.config.resources.min_instances = 1;
    let decision = sparse(&min_one, state(1), 0, 3000, 3301, 45);
    assert_eq!(
        (decision.desired, decision.reason),
        (1, Reason::MinInstances(1))
    );
    // The window opens at 10:30 (t = 1800) for an hour.
    let window = budgeted(
        0.5,
        "timetable:\n  - {name: lesson, cron: \"30 10 * * *\", timezone: UTC, duration: 1h, min_workers: 1}\n",
    );
    let zero = sparse(&window, state(1), 0, 1400, 1720, 45);
    assert_eq!(zero.desired, 0, "{}", zero.reason);
    let held = sparse(&window, zero.state, 1721, 0, 1900, 45);
    assert_eq!(held.desired, 1);
    assert_eq!(
        held.reason,
        Reason::TimetableFloor {
            window: "lesson".into(),
            workers: 1
        }
    );
}
