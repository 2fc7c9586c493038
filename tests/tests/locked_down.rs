//! NATS and Redis let in only ebb's users, each role with its permissions
//! (issue 14): a client without a login is refused by both, a worker's login
//! cannot forge a max-deliveries advisory, delete the queue or read the
//! gateway's keys, and a worker with a wrong password says why it waits.

use std::process::{Command, Stdio};
use std::time::Duration;

use async_nats::{Event, ServerError};
use ebb_nats::access::{Role, inbox_prefix};
use ebb_nats::subjects::{self, QUESTIONS_STREAM};
use ebb_tests::{
    NatsServer, RedisServer, Stack, StackOptions, TempDir, eventually, tiny_model_dir,
    worker_binary,
};
use serde_json::json;
use tokio::sync::mpsc;

#[tokio::test]
async fn nats_refuses_clients_without_a_valid_login() {
    let nats = NatsServer::start();
    let anonymous = async_nats::ConnectOptions::new().connect(nats.url()).await;
    let err = anonymous.expect_err("a client without a login is refused");
    assert!(
        err.to_string().to_lowercase().contains("authorization"),
        "{err}"
    );
    let wrong = async_nats::ConnectOptions::with_user_and_password(
        Role::Worker.user(),
        "not-the-password".into(),
    )
    .connect(nats.url())
    .await;
    assert!(wrong.is_err(), "a wrong password is refused");
    // The operator's login gets in (the harness's own clients use it).
    let operator = nats.client().await;
    operator.flush().await.expect("the operator is connected");
}

#[tokio::test]
async fn redis_refuses_clients_without_a_valid_login() {
    let redis = RedisServer::start();
    let anonymous = redis::Client::open(redis.anonymous_url()).unwrap();
    let mut connection = anonymous
        .get_multiplexed_async_connection()
        .await
        .expect("the connection itself opens");
    let refused: redis::RedisResult<Option<String>> = redis::cmd("GET")
        .arg("ebb:question:any")
        .query_async(&mut connection)
        .await;
    let err = refused.expect_err("an unauthenticated GET is refused");
    assert!(err.to_string().contains("NOAUTH"), "{err}");

    let operator = redis::Client::open(redis.url()).unwrap();
    let mut connection = operator.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("ebb:idempotency:k")
        .arg("q1")
        .query_async(&mut connection)
        .await
        .unwrap();
}

/// A worker's Redis login reaches question records but not the gateway's
/// idempotency keys, and no dangerous command.
#[tokio::test]
async fn a_workers_redis_login_reaches_only_question_keys() {
    let redis = RedisServer::start();
    let args = redis.login_args(Role::Worker);
    let password = std::fs::read_to_string(&args[5]).unwrap();
    let url = format!(
        "redis://{}:{}@127.0.0.1:{}",
        Role::Worker.user(),
        password.trim(),
        redis.port
    );
    let worker = redis::Client::open(url).unwrap();
    let mut connection = worker.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("ebb:question:q1")
        .arg("{}")
        .query_async(&mut connection)
        .await
        .expect("a worker writes records");
    for refused in [
        redis::cmd("GET").arg("ebb:idempotency:k").clone(),
        redis::cmd("FLUSHALL").clone(),
        redis::cmd("KEYS").arg("*").clone(),
    ] {
        let result: redis::RedisResult<redis::Value> = refused.query_async(&mut connection).await;
        let err = result.expect_err("refused");
        assert!(err.to_string().to_lowercase().contains("noperm"), "{err}");
    }
}

/// Connects with the worker's login as `ebb_nats::connect` does, with the
/// server's errors sent to the returned channel.
async fn worker_client(
    stack: &Stack,
) -> (async_nats::Client, mpsc::UnboundedReceiver<ServerError>) {
    let args = stack.nats.nats_args(Role::Worker);
    let password = std::fs::read_to_string(args.nats_password_file.unwrap()).unwrap();
    let (errors, received) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(
        Role::Worker.user(),
        password.trim().to_owned(),
    )
    .custom_inbox_prefix(inbox_prefix(&Role::Worker.user()))
    .event_callback(move |event| {
        let errors = errors.clone();
        async move {
            if let Event::ServerError(error) = event {
                let _ = errors.send(error);
            }
        }
    })
    .connect(args.nats_url)
    .await
    .expect("the worker's login gets in");
    (client, received)
}

async fn next_violation(errors: &mut mpsc::UnboundedReceiver<ServerError>) -> String {
    let error = tokio::time::timeout(Duration::from_secs(10), errors.recv())
        .await
        .expect("the server reports the refusal")
        .expect("channel open");
    let text = error.to_string();
    assert!(text.contains("Permissions Violation"), "{text}");
    text
}

#[tokio::test]
async fn a_worker_cannot_forge_advisories_or_change_the_queue() {
    let stack = Stack::start(StackOptions::default()).await;
    let (code, accepted) = stack
        .ask(json!({"question": "Why do leaves fall?", "wait_seconds": 0}))
        .await;
    assert_eq!(code, 202, "{accepted}");
    let id = accepted["id"].as_str().unwrap().to_owned();
    let (worker, mut errors) = worker_client(&stack).await;

    // A forged "max deliveries reached" would make the reaper fail the
    // question without a worker ever trying it.
    let advisory = subjects::max_deliveries_advisory_wildcard().replace('*', "ebb-workers-normal");
    let forged = json!({"type": "io.nats.jetstream.advisory.v1.max_deliver", "stream": QUESTIONS_STREAM,
        "consumer": "ebb-workers-normal", "stream_seq": 1, "deliveries": 5});
    worker
        .publish(advisory.clone(), forged.to_string().into())
        .await
        .unwrap();
    worker.flush().await.unwrap();
    let refusal = next_violation(&mut errors).await;
    assert!(refusal.contains(&advisory), "{refusal}");

    // Deleting or purging the queue is the gateway's alone.
    for request in [
        format!("$JS.API.STREAM.DELETE.{QUESTIONS_STREAM}"),
        format!("$JS.API.STREAM.PURGE.{QUESTIONS_STREAM}"),
    ] {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            worker.request(request.clone(), "".into()),
        )
        .await;
        assert!(!matches!(answer, Ok(Ok(_))), "{request} answered");
        let refusal = next_violation(&mut errors).await;
        assert!(refusal.contains(&request), "{refusal}");
    }

    // Another role's replies are not the worker's to read.
    let snoop = format!("{}.>", inbox_prefix(&Role::Gateway.user()));
    let _subscription = worker.subscribe(snoop.clone()).await.unwrap();
    worker.flush().await.unwrap();
    let refusal = next_violation(&mut errors).await;
    assert!(
        refusal.contains("Subscription") && refusal.contains(&snoop),
        "{refusal}"
    );

    let operator = async_nats::jetstream::new(stack.nats_client().await);
    let mut advisories = operator
        .get_stream(subjects::ADVISORY_STREAM)
        .await
        .unwrap();
    assert_eq!(advisories.info().await.unwrap().state.messages, 0);
    assert_eq!(
        stack.queued_messages().await,
        1,
        "the question is still queued"
    );
    let (_, record) = stack.status_of(&id).await;
    assert_eq!(record["status"], "queued", "{record}");

    // And the worker's own work is allowed: it answers the question.
    let _worker = stack.worker(&[]);
    let record = stack.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(record["status"], "done", "{record}");
}

#[tokio::test]
async fn a_worker_with_a_wrong_password_logs_that_nats_refused_it() {
    let stack = Stack::start(StackOptions::default()).await;
    let dir = TempDir::new("wrong-password");
    let wrong = dir.path().join("nats-password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let log = dir.path().join("worker.log");
    let mut args = stack.shared_args(Role::Worker);
    let at = args
        .iter()
        .position(|arg| arg == "--nats-password-file")
        .unwrap();
    args[at + 1] = wrong.display().to_string();
    let mut worker = Command::new(worker_binary())
        .args(args)
        .arg("--model-dir")
        .arg(tiny_model_dir())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log = &log;
    eventually(
        Duration::from_secs(30),
        "the worker to log the refusal",
        || async move {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("NATS refused the login") && text.contains("ebb-worker") {
                Ok(())
            } else {
                Err(text)
            }
        },
    )
    .await;
    let _ = worker.kill();
    let _ = worker.wait();
}
