//! The controller on a fake clock: adoption, activation, the order of
//! stops, unhealthy workers, the crash-loop backoff, losses and restarts
//! kept apart from activations.

use chrono::TimeZone;

use super::*;
use crate::config::ScalerConfig;
use ebb_nats::{PriorityDepth, WorkerState};

const CONFIG: &str = r#"
resources: {min_instances: 0, max_instances: 6}
cooldowns: {scale_down_stabilization: 0s, scale_to_zero_idle: 300s}
target: {utilization: 1.0, attainment: 0, drain_target: 30s, latency_goal: 60s, default_service_time: 2s}
health: {init_timeout: 60s, heartbeat_timeout: 10s, restart_backoff: 10s}
backend: {kind: process}
"#;

fn controller() -> Controller<EbbPolicy> {
    let config = ScalerConfig::parse(CONFIG).expect("valid config");
    let health = config.health.clone();
    Controller::new(EbbPolicy::new(Policy::new(config)), health, 1)
}

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 10, 0, 0).unwrap() + chrono::Duration::seconds(seconds)
}

fn running(id: &str, started: i64) -> PoolWorker {
    PoolWorker {
        id: id.to_owned(),
        started_at: at(started),
        phase: Phase::Running,
    }
}

fn beat(id: &str, state: WorkerState, active: u32, now: i64) -> Heartbeat {
    serde_json::from_value(serde_json::json!({
        "worker_id": id, "state": state, "model": "m@main", "started_at_ms": 0,
        "ready_at_ms": 1, "jobs_done": 0, "jobs_failed": 0, "slots": 4,
        "active": active, "sent_at_ms": at(now).timestamp_millis(),
    }))
    .expect("a heartbeat")
}

fn empty() -> QueueDepth {
    QueueDepth {
        priorities: Vec::new(),
    }
}

fn waiting(pending: u64) -> QueueDepth {
    QueueDepth {
        priorities: vec![PriorityDepth {
            priority: ebb_nats::Priority::Normal,
            pending,
            ack_pending: 0,
            oldest_waiting: Duration::ZERO,
        }],
    }
}

fn step(
    controller: &mut Controller<EbbPolicy>,
    workers: &[PoolWorker],
    depth: &QueueDepth,
    now: i64,
) -> Plan {
    controller.step(
        Inputs {
            workers,
            depth,
            heard_since: Some(at(0)),
        },
        at(now),
    )
}

#[test]
fn the_first_step_adopts_the_running_workers_and_a_question_at_zero_starts_one() {
    let mut controller = controller();
    let fleet = [running("a", -100), running("b", -100)];
    for id in ["a", "b"] {
        controller.heartbeat(beat(id, WorkerState::Ready, 0, 0), at(0));
    }
    let plan = step(&mut controller, &fleet, &empty(), 0);
    assert_eq!(plan.previous, 2, "continues from what runs");
    assert_eq!((plan.start, plan.stop.len()), (0, 1), "{plan:?}");

    let mut alone = self::controller();
    let plan = step(&mut alone, &[], &empty(), 0);
    assert_eq!((plan.verdict.desired, plan.start), (0, 0));
    alone.question_arrived(at(5));
    let plan = step(&mut alone, &[], &waiting(1), 6);
    assert_eq!(plan.start, 1);
    assert_eq!(
        plan.unserved_since,
        Some(at(5)),
        "the activation delay starts at the arrival"
    );
}

#[test]
fn surplus_workers_stop_idle_first_then_starting_then_the_least_busy() {
    let mut controller = controller();
    let fleet = [
        running("busy-2", 0),
        running("busy-1", 0),
        running("loading", 0),
        running("idle-old", 0),
        running("idle-new", 5),
    ];
    controller.heartbeat(beat("busy-2", WorkerState::Busy, 2, 10), at(10));
    controller.heartbeat(beat("busy-1", WorkerState::Busy, 1, 10), at(10));
    controller.heartbeat(beat("loading", WorkerState::Loading, 0, 10), at(10));
    controller.heartbeat(beat("idle-old", WorkerState::Ready, 0, 10), at(10));
    controller.heartbeat(beat("idle-new", WorkerState::Ready, 0, 10), at(10));
    // Two in flight, one-slot workers at full utilization: 2 are needed
    // of the 5 adopted; stabilization is 0 s, so 3 go at once.
    let depth = QueueDepth {
        priorities: vec![PriorityDepth {
            priority: ebb_nats::Priority::Normal,
            pending: 0,
            ack_pending: 3,
            oldest_waiting: Duration::ZERO,
        }],
    };
    let plan = step(&mut controller, &fleet, &depth, 10);
    assert_eq!(
        (plan.previous, plan.verdict.desired),
        (5, 1),
        "{}",
        plan.verdict.reason
    );
    assert_eq!(plan.stop, ["idle-new", "idle-old", "loading", "busy-1"]);
}

#[test]
fn an_unhealthy_worker_is_stopped_and_replaced_after_a_doubling_backoff() {
    let mut controller = controller();
    controller.question_arrived(at(0));
    let plan = step(&mut controller, &[], &waiting(1), 0);
    assert_eq!(plan.start, 1);
    // It never sends a heartbeat: unhealthy after the 60 s init timeout.
    let silent = [running("w1", 0)];
    assert!(
        step(&mut controller, &silent, &waiting(1), 1)
            .stop
            .is_empty()
    );
    let plan = step(&mut controller, &silent, &waiting(1), 62);
    assert_eq!(plan.stop, ["w1"]);
    assert_eq!(plan.lost.len(), 1);
    assert_eq!(plan.lost[0].backoff, Duration::from_secs(10));
    assert!(
        plan.lost[0].why.contains("no heartbeat within"),
        "{:?}",
        plan.lost
    );
    // Its replacement waits out the backoff.
    let gone = [PoolWorker {
        phase: Phase::Exited {
            status: "signal 15".into(),
            requested: true,
            last_output: Vec::new(),
        },
        ..running("w1", 0)
    }];
    let held = step(&mut controller, &gone, &waiting(1), 63);
    assert_eq!((held.start, held.held_back_until), (0, Some(at(72))));
    assert!(held.lost.is_empty(), "a requested exit is no crash");
    assert_eq!(step(&mut controller, &[], &waiting(1), 72).start, 1);
    // The next one exits on its own: the backoff doubles.
    let crashed = [PoolWorker {
        phase: Phase::Exited {
            status: "exit status 1".into(),
            requested: false,
            last_output: Vec::new(),
        },
        ..running("w2", 72)
    }];
    let plan = step(&mut controller, &crashed, &waiting(1), 80);
    assert_eq!(plan.lost[0].backoff, Duration::from_secs(20));
    assert_eq!(plan.lost[0].crashes_in_a_row, 2);
    assert_eq!(plan.held_back_until, Some(at(100)));
    // One started after the last loss comes up: the loop is broken.
    let healthy = [running("w3", 100)];
    assert_eq!(step(&mut controller, &[], &waiting(1), 100).start, 1);
    controller.heartbeat(beat("w3", WorkerState::Ready, 0, 130), at(130));
    step(&mut controller, &healthy, &waiting(1), 130);
    let lost = controller.start_failed("no such file".into(), at(131));
    assert_eq!(lost.crashes_in_a_row, 1, "counted from one again");
}

fn exited(id: &str, started: i64, requested: bool, last_output: &[&str]) -> PoolWorker {
    PoolWorker {
        phase: Phase::Exited {
            status: "exit status: 1".into(),
            requested,
            last_output: last_output.iter().map(|l| (*l).to_owned()).collect(),
        },
        ..running(id, started)
    }
}

#[test]
fn restarts_after_a_crash_are_no_activations_and_are_timed_from_the_loss() {
    let mut controller = controller();
    controller.question_arrived(at(0));
    let first = step(&mut controller, &[], &waiting(1), 1);
    assert_eq!(first.start, 1);
    assert_eq!(first.unserved_since, Some(at(0)), "a start from zero");
    assert_eq!(first.replacing_since, None);

    // It crashes while the question still waits: the replacement waits out
    // the backoff, and is a restart, not an activation.
    let crashed = [exited("w1", 1, false, &["Error: no such model"])];
    let plan = step(&mut controller, &crashed, &waiting(1), 5);
    assert_eq!(plan.lost.len(), 1);
    assert_eq!((plan.start, plan.held_back_until), (0, Some(at(15))));
    assert_eq!(plan.unserved_since, None);
    let restart = step(&mut controller, &[], &waiting(1), 15);
    assert_eq!(restart.start, 1);
    assert_eq!(restart.unserved_since, None, "a restart is no activation");
    assert_eq!(restart.replacing_since, Some(at(5)), "timed from the crash");
    let again = step(&mut controller, &[running("w2", 15)], &waiting(1), 16);
    assert_eq!((again.start, again.replacing_since), (0, None));

    // The second worker crashes too, then the questions go: no replacement
    // is wanted, so the next question at zero is an activation again.
    let plan = step(
        &mut controller,
        &[exited("w2", 15, false, &[])],
        &empty(),
        20,
    );
    assert_eq!(plan.lost[0].crashes_in_a_row, 2);
    let quiet = step(&mut controller, &[], &empty(), 400);
    assert_eq!(
        (quiet.verdict.desired, quiet.start),
        (0, 0),
        "{}",
        quiet.verdict.reason
    );
    controller.question_arrived(at(500));
    let plan = step(&mut controller, &[], &waiting(1), 501);
    assert_eq!(plan.start, 1);
    assert!(plan.unserved_since.is_some(), "a start from zero");
    assert_eq!(plan.replacing_since, None);
}

#[test]
fn losses_keep_the_exit_status_last_output_and_fatal_error() {
    let mut controller = controller();
    controller.question_arrived(at(0));
    step(&mut controller, &[], &waiting(1), 0);
    // A worker that says it cannot start, then exits before the next step.
    let mut failed = beat("w1", WorkerState::Failed, 0, 2);
    failed.error = Some("cannot download config.json from huggingface.co".into());
    controller.heartbeat(failed, at(2));
    let plan = step(
        &mut controller,
        &[exited("w1", 0, false, &["ERROR cannot download"])],
        &waiting(1),
        3,
    );
    let lost = &plan.lost[0];
    assert_eq!(lost.exit_status.as_deref(), Some("exit status: 1"));
    assert_eq!(lost.last_output, ["ERROR cannot download"]);
    assert_eq!(
        lost.error.as_deref(),
        Some("cannot download config.json from huggingface.co")
    );
    assert!(
        lost.why.contains("cannot start: cannot download"),
        "{}",
        lost.why
    );
    assert_eq!(controller.losses().back(), Some(lost));

    // One that says so while still running: stopped as unhealthy, and its
    // exit (requested) completes the same loss instead of adding one.
    step(&mut controller, &[], &waiting(1), 13);
    let mut failed = beat("w2", WorkerState::Failed, 0, 14);
    failed.error = Some("no tokenizer.json".into());
    controller.heartbeat(failed, at(14));
    let plan = step(&mut controller, &[running("w2", 13)], &waiting(1), 14);
    assert_eq!(plan.stop, ["w2"]);
    assert_eq!(plan.lost[0].error.as_deref(), Some("no tokenizer.json"));
    assert_eq!(controller.crashes_in_a_row(), 2);
    let plan = step(
        &mut controller,
        &[exited("w2", 13, true, &["Error: no tokenizer.json"])],
        &waiting(1),
        15,
    );
    assert!(plan.lost.is_empty(), "{:?}", plan.lost);
    let completed = &plan.exited_after_loss[0];
    assert_eq!(completed.last_output, ["Error: no tokenizer.json"]);
    assert_eq!(completed.error.as_deref(), Some("no tokenizer.json"));
    assert_eq!(controller.losses().len(), 2);
    assert_eq!(controller.losses().back(), Some(completed));
}

#[test]
fn the_loss_history_is_bounded() {
    let mut controller = controller();
    for n in 0..(LOSS_HISTORY as i64 + 5) {
        controller.start_failed(format!("no such file {n}"), at(n));
    }
    assert_eq!(controller.losses().len(), LOSS_HISTORY);
    assert_eq!(controller.losses().back().unwrap().why, "no such file 14");
    assert_eq!(controller.crashes_in_a_row(), LOSS_HISTORY as u32 + 5);
}
