//! A worker's start as the scaler sees it on `ebb.workers.heartbeat`: the
//! `loading` phases in order and their durations, then `ready`; or, when
//! the worker cannot start, one `failed` heartbeat saying why before it
//! exits non-zero.

use std::process::{Command, Stdio};
use std::time::Duration;

use ebb_nats::access::Role;
use ebb_nats::{Heartbeat, StartPhase, WorkerState, subjects};
use ebb_tests::{Stack, StackOptions, TempDir, worker_binary};
use futures::StreamExt;

/// Position of `phase` in the start order.
fn rank(phase: StartPhase) -> usize {
    StartPhase::ALL
        .iter()
        .position(|p| *p == phase)
        .expect("a known phase")
}

/// Heartbeats of `worker_id` until one in `last` state (inclusive).
async fn beats_until(
    beats: &mut async_nats::Subscriber,
    worker_id: &str,
    last: WorkerState,
) -> Vec<Heartbeat> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let message = tokio::time::timeout_at(deadline, beats.next())
            .await
            .unwrap_or_else(|_| panic!("no {last:?} heartbeat within 60 s; saw {seen:#?}"))
            .expect("heartbeat subscription open");
        let beat: Heartbeat = serde_json::from_slice(&message.payload).expect("heartbeat JSON");
        if beat.worker_id != worker_id {
            continue;
        }
        let done = beat.state == last;
        seen.push(beat);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn a_starting_worker_reports_its_phases_in_order_then_ready_with_all_four() {
    let stack = Stack::start(StackOptions::default()).await;
    let client = stack.nats_client().await;
    let mut beats = client.subscribe(subjects::HEARTBEAT).await.unwrap();
    client.flush().await.unwrap();
    let worker = stack.worker(&[]);
    let seen = beats_until(&mut beats, &worker.id, WorkerState::Ready).await;

    let (ready, loading) = seen.split_last().expect("a ready heartbeat");
    assert!(!loading.is_empty(), "no loading heartbeat before ready");
    assert!(
        loading.iter().all(|b| b.state == WorkerState::Loading),
        "{loading:#?}"
    );
    // The first heartbeat is sent before loading starts.
    assert_eq!(loading[0].phase, Some(StartPhase::Download), "{loading:#?}");
    let mut last_rank = 0;
    for beat in loading {
        // The phase in progress is the first one not finished (none once
        // all are, while the KV budget and the queue consumers are set up).
        assert_eq!(
            beat.phase,
            ebb_worker::start::next_phase(&beat.start_phases),
            "{beat:#?}"
        );
        let rank = beat.phase.map_or(StartPhase::ALL.len(), rank);
        assert!(rank >= last_rank, "phases out of order: {loading:#?}");
        last_rank = rank;
    }

    let phases: Vec<StartPhase> = ready.start_phases.iter().map(|p| p.phase).collect();
    assert_eq!(phases, StartPhase::ALL, "{ready:#?}");
    assert_eq!(ready.phase, None);
    let ready_at = ready.ready_at_ms.expect("ready_at_ms");
    assert!(ready_at >= ready.started_at_ms);
    // The weights and the tokenizer load side by side: the start took at
    // least the download, the longer of the two, and the warm-up.
    let ms = |phase| ebb_worker::start::phase_ms(&ready.start_phases, phase);
    let critical = ms(StartPhase::Download)
        + ms(StartPhase::Weights).max(ms(StartPhase::Tokenizer))
        + ms(StartPhase::WarmUp);
    assert!(
        critical <= ready_at - ready.started_at_ms,
        "phases {critical} ms > start {} ms",
        ready_at - ready.started_at_ms
    );
}

#[tokio::test]
async fn a_worker_that_cannot_load_its_model_publishes_failed_with_the_reason_and_exits_non_zero() {
    let stack = Stack::start(StackOptions::default()).await;
    let client = stack.nats_client().await;
    let mut beats = client.subscribe(subjects::HEARTBEAT).await.unwrap();
    client.flush().await.unwrap();
    let scratch = TempDir::new("worker-start");
    let missing = scratch.path().join("no-such-model");
    let log = scratch.path().join("worker.log");
    let worker_id = format!("failing-worker-{}", std::process::id());
    let mut child = Command::new(worker_binary())
        .args(stack.shared_args(Role::Worker))
        .arg("--model-dir")
        .arg(&missing)
        .args(["--worker-id", &worker_id])
        .env("RUST_LOG", "info")
        .env("EBB_LOG_FORMAT", "json")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start ebb-worker");

    let seen = beats_until(&mut beats, &worker_id, WorkerState::Failed).await;
    let failed = seen.last().expect("a failed heartbeat");
    let error = failed
        .error
        .as_deref()
        .expect("the failed heartbeat has an error");
    assert!(
        error.contains(&missing.display().to_string()),
        "the error names the missing path: {error}"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success(), "exit status {status}");

    let logged = std::fs::read_to_string(&log).unwrap();
    let error_line = logged
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no error-level log line:\n{logged}"));
    assert!(
        error_line["fields"]["error"]
            .as_str()
            .is_some_and(|logged| logged.contains(&missing.display().to_string())),
        "{error_line}"
    );
}
