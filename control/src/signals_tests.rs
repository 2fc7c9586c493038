//! Signals on a fake clock: rates, capacity in slots, cold starts by phase.

use super::*;
use chrono::TimeZone;

#[test]
fn rates_cover_their_window_and_forget_the_rest() {
    let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let mut counter = RateCounter::new(Duration::from_secs(60));
    for second in 0..60 {
        counter.add(
            t + chrono::Duration::seconds(second),
            if second >= 54 { 10 } else { 1 },
        );
    }
    let now = t + chrono::Duration::seconds(59);
    assert_eq!(counter.rate(now, Duration::from_secs(6)), 10.0);
    assert!((counter.rate(now, Duration::from_secs(60)) - 114.0 / 60.0).abs() < 1e-9);
    let later = t + chrono::Duration::seconds(200);
    counter.add(later, 0);
    assert_eq!(counter.rate(later, Duration::from_secs(60)), 0.0);
    assert!(counter.buckets.len() <= 2, "old buckets are dropped");
}

/// From JSON, as the wire brings it: fields added to the contract later
/// take their defaults here too.
fn beat(id: &str, state: WorkerState, slots: u32, active: u32) -> Heartbeat {
    serde_json::from_value(serde_json::json!({
        "worker_id": id, "state": state, "model": "m@main", "started_at_ms": 0,
        "ready_at_ms": 1, "jobs_done": 0, "jobs_failed": 0, "slots": slots,
        "active": active, "mean_job_ms": 4000.0, "sent_at_ms": 60_000,
    }))
    .expect("a heartbeat")
}

#[test]
fn capacity_is_counted_in_the_slots_the_workers_report() {
    let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let windows = RateWindows {
        stable: Duration::from_secs(60),
        panic: Duration::from_secs(6),
    };
    let mut signals = Signals::new(windows, 4);
    let pool: Vec<PoolWorker> = ["a", "b", "c", "old"]
        .iter()
        .map(|id| PoolWorker {
            id: (*id).to_owned(),
            started_at: t,
            phase: Phase::Running,
        })
        .collect();
    let depth = QueueDepth { priorities: vec![] };
    let health = Health::default();
    // Before any heartbeat: the config's slots per worker, no capacity yet.
    let views = signals.classify(&pool, &health, Some(t), t);
    let observation = signals.observe(&depth, &views, t);
    assert_eq!(observation.slots_per_worker, 4);
    assert_eq!(observation.workers.slots, 0);

    signals.heartbeat(beat("a", WorkerState::Busy, 8, 4), t);
    // Says ready, but has a question in flight: busy.
    signals.heartbeat(beat("b", WorkerState::Ready, 8, 1), t);
    signals.heartbeat(beat("c", WorkerState::Ready, 8, 0), t);
    // A worker from before batching: no slots or active in its JSON.
    let mut old = serde_json::to_value(beat("old", WorkerState::Busy, 1, 0)).unwrap();
    old.as_object_mut()
        .unwrap()
        .retain(|k, _| k != "slots" && k != "active");
    signals.heartbeat(serde_json::from_value(old).unwrap(), t);

    let views = signals.classify(&pool, &health, Some(t), t);
    let conditions: Vec<Condition> = views.iter().map(|v| v.condition).collect();
    use Condition::{Busy, Idle};
    assert_eq!(conditions, [Busy, Busy, Idle, Busy]);
    assert_eq!(
        (views[3].slots, views[3].active),
        (1, 1),
        "busy means one in use"
    );
    let observation = signals.observe(&depth, &views, t);
    assert_eq!(observation.slots_per_worker, 8, "most workers have 8");
    assert_eq!(observation.workers.slots, 25);
    assert_eq!(observation.workers.active_slots, 6);
    assert!((observation.workers.utilization() - 6.0 / 25.0).abs() < 1e-12);
    assert_eq!(observation.service_time, Some(Duration::from_secs(4)));
}

#[test]
fn cold_starts_are_kept_per_phase_and_the_lead_leaves_downloads_out() {
    let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let windows = RateWindows {
        stable: Duration::from_secs(60),
        panic: Duration::from_secs(6),
    };
    let mut signals = Signals::new(windows, 1);
    let phases = |download: u64| {
        vec![
            PhaseTime {
                phase: StartPhase::Download,
                ms: download,
            },
            PhaseTime {
                phase: StartPhase::Weights,
                ms: 2_000,
            },
            PhaseTime {
                phase: StartPhase::Tokenizer,
                ms: 100,
            },
            PhaseTime {
                phase: StartPhase::WarmUp,
                ms: 400,
            },
        ]
    };
    // Loading, downloading: shown as such.
    let mut loading = Heartbeat::loading("a", "m@main", 0);
    loading.phase = Some(StartPhase::Download);
    loading.download = Some(DownloadProgress {
        file: "model.safetensors".into(),
        bytes_done: 3_100_000_000,
        bytes_total: Some(15_200_000_000),
        bytes_per_second: 0.0,
    });
    signals.heartbeat(loading, t);
    let pool = [PoolWorker {
        id: "a".into(),
        started_at: t,
        phase: Phase::Running,
    }];
    let view = &signals.classify(&pool, &Health::default(), Some(t), t)[0];
    assert_eq!(view.state, Some(WorkerState::Loading));
    assert_eq!(view.phase, Some(StartPhase::Download));
    assert!(
        view.download_text
            .as_deref()
            .is_some_and(|text| text.starts_with("downloading 3.1 of 15.2 GB")),
        "{view:?}"
    );
    // Ready after a 60 s download; then nine starts from a warm cache.
    for (n, download) in [60_000].into_iter().chain([10; 9]).enumerate() {
        let mut ready = Heartbeat::loading(&format!("w{n}"), "m@main", 0);
        ready.state = WorkerState::Ready;
        ready.start_phases = phases(download);
        ready.ready_at_ms = Some(download + 2_500);
        ready.sent_at_ms = download + 3_000;
        signals.heartbeat(ready, t);
    }
    // One from before phases: counted whole.
    let mut old = Heartbeat::loading("old", "m@main", 0);
    old.state = WorkerState::Ready;
    old.ready_at_ms = Some(3_000);
    old.sent_at_ms = 3_000;
    signals.heartbeat(old, t);

    let stats = signals.cold_starts();
    assert_eq!(stats.samples, 11);
    assert_eq!(stats.p90_ms, Some(3_000.0));
    assert_eq!(stats.p90_without_download_ms, Some(2_500.0));
    assert_eq!(stats.phase_p90_ms["weights"], 2_000.0);
    assert_eq!(stats.phase_p90_ms["download"], 10.0);
    assert_eq!(stats.phase_p90_ms.len(), 4);
    let starts = signals.take_new_cold_starts();
    assert_eq!(starts.len(), 11, "the one from before phases counts whole");
    assert_eq!(starts.iter().map(|s| s.phases.len()).sum::<usize>(), 40);
    assert!(
        starts
            .iter()
            .any(|s| s.whole == Duration::from_millis(3_000))
    );
    assert!(signals.take_new_cold_starts().is_empty(), "taken once");
    // The one 62.5 s start weighs on the whole p90 but not the lead's.
    for n in 0..3 {
        let mut slow = Heartbeat::loading(&format!("s{n}"), "m@main", 0);
        slow.state = WorkerState::Ready;
        slow.start_phases = phases(60_000);
        slow.ready_at_ms = Some(62_500);
        slow.sent_at_ms = 63_000;
        signals.heartbeat(slow, t);
    }
    let stats = signals.cold_starts();
    assert_eq!(stats.p90_ms, Some(62_500.0));
    assert_eq!(stats.p90_without_download_ms, Some(2_500.0));
    let depth = QueueDepth { priorities: vec![] };
    let observation = signals.observe(&depth, &[], t);
    assert_eq!(
        observation.cold_start_p90,
        Some(Duration::from_millis(2_500))
    );
}

#[test]
fn the_most_common_slots_win_and_ties_go_to_the_smaller() {
    let beats = [
        beat("a", WorkerState::Ready, 8, 0),
        beat("b", WorkerState::Ready, 4, 0),
        beat("c", WorkerState::Ready, 8, 0),
        beat("d", WorkerState::Ready, 4, 0),
    ];
    assert_eq!(common_slots(beats.iter()), Some(4));
    assert_eq!(common_slots(beats[..3].iter()), Some(8));
    assert_eq!(common_slots([].iter()), None);
    let zero = beat("z", WorkerState::Ready, 0, 0);
    assert_eq!(common_slots([zero].iter()), Some(1), "a worker has a slot");
}

/// A NATS outage is not a fleet of dead workers: silence counts only while
/// the scaler's own link is up, and from when it came back.
#[test]
fn heartbeat_silence_counts_only_while_the_scalers_link_is_up() {
    let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let seconds = chrono::Duration::seconds;
    let health = Health::default();
    let timeout = chrono::Duration::from_std(health.heartbeat_timeout).unwrap();
    let mut signals = Signals::new(
        RateWindows {
            stable: Duration::from_secs(60),
            panic: Duration::from_secs(6),
        },
        4,
    );
    let pool = [PoolWorker {
        id: "a".into(),
        started_at: t,
        phase: Phase::Running,
    }];
    signals.heartbeat(beat("a", WorkerState::Ready, 4, 0), t);
    let later = t + timeout + seconds(1);
    let condition =
        |signals: &mut Signals, since| signals.classify(&pool, &health, since, later)[0].condition;
    // Link up throughout: silent past the timeout is unhealthy.
    assert_eq!(condition(&mut signals, Some(t)), Condition::Unhealthy);
    // Link down now: nobody is judged by silence.
    assert_eq!(condition(&mut signals, None), Condition::Idle);
    // Link back a moment ago: a whole timeout to be heard again.
    assert_eq!(
        condition(&mut signals, Some(later - seconds(1))),
        Condition::Idle
    );
    let much_later = later + timeout;
    assert_eq!(
        signals.classify(&pool, &health, Some(later - seconds(1)), much_later)[0].condition,
        Condition::Unhealthy
    );
}
