//! The shedding estimate on a gateway counting alone (no Redis).

use super::*;

/// A reservation decided on this gateway's own count.
fn reserve(overload: &Overload) -> Result<Reservation<'_>, ApiError> {
    overload.begin().decide(None)
}

fn overload(max_workers: u32, goal_s: u64, service_s: u64) -> Overload {
    Overload::new(
        OverloadArgs {
            max_workers,
            latency_goal: Duration::from_secs(goal_s),
            service_time_estimate: Duration::from_secs(service_s),
        },
        None,
    )
}

/// From JSON, as the wire brings it: fields added to the contract later
/// take their defaults here too.
fn beat(id: &str, slots: u32, mean_job_ms: Option<f64>) -> Heartbeat {
    serde_json::from_value(serde_json::json!({
        "worker_id": id, "state": "busy", "model": "m@main", "started_at_ms": 0,
        "ready_at_ms": 1, "jobs_done": 3, "jobs_failed": 0, "slots": slots,
        "active": slots, "mean_job_ms": mean_job_ms, "sent_at_ms": 2,
    }))
    .expect("a heartbeat")
}

#[test]
fn the_wait_is_the_backlog_over_the_fleet_throughput() {
    // 50 workers taking 10 s a question (0.1/s each): 100 take 20 s.
    assert_eq!(
        estimated_wait(100, Duration::from_secs(10), 50),
        Duration::from_secs(20)
    );
}

#[test]
fn a_worker_answers_its_slots_per_job_time() {
    let full = worker_throughput(&beat("w", 8, Some(10_000.0))).unwrap();
    assert!((full - 0.8).abs() < 1e-12, "8 slots of 10 s: {full}");
    let old = worker_throughput(&beat("w", 1, Some(10_000.0))).unwrap();
    assert!((old - 0.1).abs() < 1e-12);
    assert_eq!(
        worker_throughput(&beat("w", 8, None)),
        None,
        "not measured yet"
    );
    assert_eq!(worker_throughput(&beat("w", 8, Some(0.0))), None);
}

#[tokio::test]
async fn heartbeats_replace_the_one_slot_estimate_with_the_measured_throughput() {
    // 2 workers, 31 s goal, no heartbeat: 10 s a question, one at a time.
    let overload = overload(2, 31, 10);
    assert_eq!(overload.snapshot().1, Duration::from_secs(10));
    overload.heard(beat("a", 8, Some(10_000.0)));
    overload.heard(beat("b", 4, Some(10_000.0)));
    overload.heard(beat("c", 4, None));
    let now = Instant::now();
    overload.refresh_throughput(now);
    // Mean of 0.8 and 0.4 questions a second: 1/0.6 s per question.
    let per_question = overload.snapshot().1.as_secs_f64();
    assert!((per_question - 1.0 / 0.6).abs() < 1e-9, "{per_question}");
    // At 2 x 0.6/s, 37 questions take 30.8 s and fit, 38 take 31.7 s.
    overload.waiting.store(36, Ordering::Relaxed);
    reserve(&overload).unwrap().keep();
    assert!(matches!(
        reserve(&overload),
        Err(ApiError::Overloaded { .. })
    ));
    // Silent workers are forgotten; the last figure stays.
    overload.refresh_throughput(now + HEARTBEAT_STALE);
    assert!(overload.workers.lock().unwrap().is_empty());
    assert!((overload.snapshot().1.as_secs_f64() - 1.0 / 0.6).abs() < 1e-9);
}

#[test]
fn the_scalers_maximum_applies_while_fresh_and_the_flag_otherwise() {
    let start = Instant::now();
    assert_eq!(max_workers(None, 100, start), MaxWorkers::Flag(100));
    let learned = Some(Learned {
        max_workers: 3,
        heard_at: start,
    });
    assert_eq!(max_workers(learned, 100, start), MaxWorkers::Scaler(3));
    let almost = start + FLEET_STATUS_STALE - Duration::from_millis(1);
    assert_eq!(max_workers(learned, 100, almost), MaxWorkers::Scaler(3));
    let quiet = start + FLEET_STATUS_STALE;
    assert_eq!(max_workers(learned, 100, quiet), MaxWorkers::Flag(100));
}

#[tokio::test]
async fn shedding_follows_the_announced_maximum_until_the_scaler_goes_quiet() {
    // --max-workers 100, 1 s a question, 5 s goal: 500 would fit; the
    // scaler's single worker serves 5 in time.
    let overload = overload(100, 5, 1);
    overload.waiting.store(5, Ordering::Relaxed);
    reserve(&overload).unwrap();
    let now = Instant::now();
    let status = |max_workers| FleetStatus {
        max_workers,
        slots_per_worker: None,
        published_at_ms: 0,
    };
    overload.heard_fleet(&status(1), now);
    assert_eq!(overload.max_workers(), MaxWorkers::Scaler(1));
    assert!(matches!(
        reserve(&overload),
        Err(ApiError::Overloaded { .. })
    ));
    // A nonsensical announcement changes nothing.
    overload.heard_fleet(&status(0), now);
    assert_eq!(overload.max_workers(), MaxWorkers::Scaler(1));
    overload.refresh_max_workers(now + FLEET_STATUS_STALE);
    assert_eq!(overload.max_workers(), MaxWorkers::Flag(100));
    reserve(&overload).unwrap();
}

#[tokio::test]
async fn questions_past_the_goal_are_shed_with_the_excess_as_retry_after() {
    // 2 workers, 10 s each, 30 s goal: 6 waiting questions fit, the 7th not.
    let overload = overload(2, 30, 10);
    overload.waiting.store(4, Ordering::Relaxed);
    reserve(&overload).unwrap().keep();
    // A place not kept (the publish failed) is given back.
    drop(reserve(&overload).unwrap());
    reserve(&overload).unwrap().keep();
    match reserve(&overload) {
        Err(ApiError::Overloaded { retry_after }) => {
            assert_eq!(retry_after, Duration::from_secs(5))
        }
        other => panic!("expected overloaded, got {other:?}"),
    }
}
