//! Infrastructure faults (issue 14): Redis restarts and outages, lost
//! events, workers that die after ending a question, messages that are not
//! jobs. Every accepted question still ends `done` or `failed`, once, and
//! the same everywhere.

use std::time::Duration;

use ebb_nats::{AnswerEvent, Priority, QuestionRecord, QuestionStatus, subjects};
use ebb_store::Store;
use ebb_tests::{Stack, StackOptions, eventually};
use futures::StreamExt;
use serde_json::json;

/// Slow enough generation (40 pieces x 100 ms) to act mid-answer.
const SLOW: [&str; 2] = ["--debug-token-delay", "100ms"];

async fn accepted_id(stack: &Stack, question: &str) -> String {
    let (code, body) = stack
        .ask(json!({"question": question, "max_tokens": 6, "wait_seconds": 0}))
        .await;
    assert_eq!(code, 202, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

/// Redis keeps its records across a crash (append-only file, written
/// before each reply): a question answered before `kill -9` is still
/// answered after the restart, not 404.
#[tokio::test]
async fn a_redis_crash_keeps_answered_questions() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let worker = stack.worker(&[]);
    let id = accepted_id(&stack, "What survives a restart?").await;
    let before = stack.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(before["status"], "done", "{before}");
    drop(worker);

    stack.redis.stop(); // SIGKILL
    stack.redis.resume();
    // The gateway's connection reconnects on first use after the restart.
    let after = eventually(
        Duration::from_secs(10),
        "the record after the crash",
        || async {
            match stack.status_of(&id).await {
                (200, record) => Ok(record),
                (code, body) => Err(format!("{code} {body}")),
            }
        },
    )
    .await;
    assert_eq!(after["answer"], before["answer"]);
    assert_eq!(after["status"], "done");
}

/// A worker that cannot record its answer keeps it and waits for Redis:
/// no delivery is spent on the outage (before issue 14 every attempt
/// failed and after about 15 s the question was `failed`).
#[tokio::test]
async fn a_redis_outage_at_finish_waits_and_spends_no_delivery() {
    let mut stack = Stack::start(StackOptions::default()).await;
    stack.redis.stop();
    let id = accepted_id(&stack, "Can you wait for Redis?").await;
    let worker = stack.worker(&[]);
    let stream = stack.questions_stream().await;
    let consumer = subjects::consumer(Priority::Normal);
    eventually(
        Duration::from_secs(30),
        "the question in the worker's hands",
        || async {
            let info = stream
                .consumer_info(&consumer)
                .await
                .map_err(|e| e.to_string())?;
            (info.num_ack_pending == 1)
                .then_some(())
                .ok_or(info.num_ack_pending.to_string())
        },
    )
    .await;
    // Longer than five deliveries with backoff took to fail it before.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let info = stream.consumer_info(&consumer).await.unwrap();
    assert_eq!(
        (info.num_ack_pending, info.num_redelivered),
        (1, 0),
        "still held by its first delivery: {info:?}"
    );

    stack.redis.resume();
    let record = stack.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(record["status"], "done", "{record}");
    assert_eq!(record["attempts"], 1, "{record}");
    drop(worker);
}

/// A worker that recorded `done` on the last delivery and died before its
/// event: the reaper finds the record and announces it (before issue 14 it
/// only deleted the message, and a waiting client never heard).
#[tokio::test]
async fn the_reaper_announces_a_question_its_dead_worker_ended() {
    let stack = Stack::start(StackOptions {
        ack_wait: "1s",
        max_deliver: 1,
        ..StackOptions::default()
    })
    .await;
    let mut worker = stack.worker(&SLOW);
    stack.wait_ready(&worker).await;
    let (code, body) = stack
        .ask(json!({"question": "Did anyone hear?", "max_tokens": 40, "wait_seconds": 0}))
        .await;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    stack.wait_running(&id).await;
    worker.signal("KILL");
    worker.wait_exit(Duration::from_secs(5)).await;
    // What the dead worker had recorded before it died.
    let done = QuestionRecord {
        status: QuestionStatus::Done,
        answer: Some("recorded before the crash".into()),
        model: Some("dead-worker".into()),
        attempts: 1,
        ..QuestionRecord::queued(&id, ebb_nats::now_ms())
    };
    let store = Store::connect_lazy(&stack.redis.url()).unwrap();
    assert!(store.put_record(&done).await.unwrap().is_none());
    let mut answers = stack
        .nats_client()
        .await
        .subscribe(subjects::answers(&id))
        .await
        .unwrap();

    let survivor = stack.worker(&[]);
    let event = tokio::time::timeout(Duration::from_secs(30), answers.next())
        .await
        .expect("the final event is announced again")
        .unwrap();
    let event: AnswerEvent = serde_json::from_slice(&event.payload).unwrap();
    assert!(
        matches!(&event, AnswerEvent::Done { answer, .. } if answer == "recorded before the crash"),
        "{event:?}"
    );
    drop(survivor);
    let (_, record) = stack.status_of(&id).await;
    assert_eq!(
        record["status"], "done",
        "not failed by the reaper: {record}"
    );
    assert!(stack.dead_letter(&id).await.is_none());
    eventually(Duration::from_secs(10), "the message gone", || async {
        match stack.queued_messages().await {
            0 => Ok(()),
            n => Err(n),
        }
    })
    .await;
}

/// Nothing replaces a terminal record: a second ending (a stale delivery,
/// a worker waking after the reaper) gets the standing record back.
#[tokio::test]
async fn a_terminal_record_is_never_replaced() {
    let stack = Stack::start(StackOptions::default()).await;
    let store = Store::connect_lazy(&stack.redis.url()).unwrap();
    let failed = QuestionRecord {
        status: QuestionStatus::Failed,
        error: Some("reaped".into()),
        ..QuestionRecord::queued("q-terminal", ebb_nats::now_ms())
    };
    assert!(store.put_record(&failed).await.unwrap().is_none());
    for later in [
        QuestionStatus::Running,
        QuestionStatus::Done,
        QuestionStatus::Failed,
    ] {
        let attempt = QuestionRecord {
            status: later,
            answer: Some("late".into()),
            error: None,
            ..failed.clone()
        };
        let standing = store.put_record(&attempt).await.unwrap();
        assert_eq!(standing.as_ref(), Some(&failed), "{later:?}");
    }
    assert_eq!(store.record("q-terminal").await.unwrap(), Some(failed));
}

/// A message on the question subjects that is not a job still ends: a
/// `failed` record under the id it carries and a dead letter, not a
/// record left `queued` until it expires.
#[tokio::test]
async fn a_message_that_is_not_a_job_is_failed_under_its_id() {
    let stack = Stack::start(StackOptions::default()).await;
    let store = Store::connect_lazy(&stack.redis.url()).unwrap();
    let queued = QuestionRecord::queued("q-unreadable", ebb_nats::now_ms());
    assert!(store.insert_queued(&queued).await.unwrap());
    let jetstream = async_nats::jetstream::new(stack.nats_client().await);
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(br#"{"id":"q-unreadable","question":42}"#.to_vec().into())
        .message_id("q-unreadable");
    jetstream
        .send_publish(subjects::question(Priority::Normal), publish)
        .await
        .unwrap()
        .await
        .unwrap();

    let worker = stack.worker(&[]);
    let record = stack
        .wait_terminal("q-unreadable", Duration::from_secs(30))
        .await;
    drop(worker);
    assert_eq!(record["status"], "failed", "{record}");
    assert!(
        record["error"].as_str().unwrap().contains("not a question"),
        "{record}"
    );
    let letter = stack
        .dead_letter("q-unreadable")
        .await
        .expect("a dead letter");
    assert!(letter.reason.contains("not a question"), "{letter:?}");
    assert_eq!(stack.queued_messages().await, 0);
}

/// A chat whose final event was lost (published while the gateway's
/// subscription was away) still answers from the record, within seconds,
/// not `504` after the whole wait.
#[tokio::test]
async fn a_chat_whose_final_event_is_lost_answers_from_the_record() {
    let stack = Stack::start(StackOptions::default()).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", stack.gateway_url);
    let chat = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let response = http
            .post(url)
            .json(&json!({"messages": [{"role": "user", "content": "Is anyone there?"}]}))
            .send()
            .await
            .unwrap();
        (
            started.elapsed(),
            response.status().as_u16(),
            response.json::<serde_json::Value>().await.unwrap(),
        )
    });
    // No worker: the question waits; its record is ended behind the
    // gateway's back, with no event.
    let mut redis = redis::Client::open(stack.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let id = eventually(
        Duration::from_secs(10),
        "the chat's question queued",
        || {
            let mut redis = redis.clone();
            async move {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg("ebb:question:*")
                    .query_async(&mut redis)
                    .await
                    .map_err(|e| e.to_string())?;
                keys.first()
                    .map(|key| key.trim_start_matches("ebb:question:").to_owned())
                    .ok_or_else(|| "none yet".to_owned())
            }
        },
    )
    .await;
    let done = QuestionRecord {
        status: QuestionStatus::Done,
        answer: Some("from the record".into()),
        model: Some("elsewhere".into()),
        attempts: 1,
        ..QuestionRecord::queued(&id, ebb_nats::now_ms())
    };
    let _: () = redis::cmd("SET")
        .arg(format!("ebb:question:{id}"))
        .arg(serde_json::to_string(&done).unwrap())
        .query_async(&mut redis)
        .await
        .unwrap();
    let (took, code, body) = chat.await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"], "from the record",
        "{body}"
    );
    assert!(
        took < Duration::from_secs(20),
        "answered from the record in {took:?}"
    );
}

/// A NATS outage longer than the heartbeat timeout, with a scaler and a
/// worker running: the scaler suspends heartbeat health while its own link
/// is down and gives the worker a whole timeout after it is back, so the
/// same worker is still serving afterwards and nothing counts as lost
/// (before issue 14 the scaler stopped it as unhealthy and counted a crash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_longer_than_the_heartbeat_timeout_loses_no_worker() {
    const ONE: &str = r#"
tick: 200ms
resources: {min_instances: 1, max_instances: 1}
target: {utilization: 1.0, drain_target: 2s, latency_goal: 60s, default_service_time: 1s, stable_window: 5s, panic_window: 2s}
cooldowns: {scale_down_stabilization: 1s, scale_to_zero_idle: 3s}
health: {init_timeout: 30s, heartbeat_timeout: 5s, restart_backoff: 200ms, stop_grace: 5s}
"#;
    let mut stack = Stack::start(StackOptions::default()).await;
    let scaler = ebb_tests::ScalerProcess::start(&stack, ONE, &[]);
    scaler
        .wait_status(Duration::from_secs(30), "one idle worker", |s| {
            s["actual"]["idle"] == 1
        })
        .await;
    let before = scaler.worker_pids();
    assert_eq!(before.len(), 1);

    stack.nats.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    stack.nats.resume();
    // Past the worker's reconnect and a whole timeout after it.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let status = scaler
        .wait_status(Duration::from_secs(20), "the worker idle again", |s| {
            s["actual"]["idle"] == 1
        })
        .await;
    assert_eq!(scaler.worker_pids(), before, "the same worker: {status}");
    assert_eq!(status["losses"], serde_json::json!([]), "{status}");
    let id = accepted_id(&stack, "Still there after the outage?").await;
    let record = stack.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(record["status"], "done", "{record}");
}
