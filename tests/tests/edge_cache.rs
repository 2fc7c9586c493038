//! The gateway's hot cache with real NATS, Redis and a tiny-model worker:
//! a memory hit answers exactly as a Redis hit, hot answers survive a
//! Redis outage, a restarted gateway starts with the most asked answers in
//! memory, and an accept's `queued` record is readable at once.

use std::time::Duration;

use ebb_nats::access::Role;
use ebb_tests::stack::Gateway;
use ebb_tests::{Stack, StackOptions, eventually};
use serde_json::{Value, json};

/// `ebb_gateway_cache_lookups_total{result}` of the gateway now.
async fn lookups(stack: &Stack, result: &str) -> u64 {
    let text = stack.metrics().await;
    let series = format!("ebb_gateway_cache_lookups_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series)?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// Asks through the gateway at `url`, waiting for the answer.
async fn ask_at(stack: &Stack, url: &str, question: &str) -> (u16, Value) {
    let response = stack
        .http
        .post(format!("{url}/v1/questions"))
        .json(&json!({"question": question, "max_tokens": 8, "wait_seconds": 30}))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn ask_and_wait(stack: &Stack, question: &str) -> Value {
    let (code, body) = ask_at(stack, &stack.gateway_url, question).await;
    assert_eq!(code, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_answer_is_kept_and_a_memory_hit_answers_as_a_redis_hit() {
    let stack = Stack::start(StackOptions::default()).await;
    let _worker = stack.worker(&[]);
    let first = ask_and_wait(&stack, "What is Pythagoras' theorem?").await;
    assert_eq!(first["cached"], false, "{first}");

    // The gateway relayed the answer: it kept a copy.
    let from_memory = ask_and_wait(&stack, "What is Pythagoras' theorem?").await;
    assert_eq!(
        (
            lookups(&stack, "memory").await,
            lookups(&stack, "redis").await
        ),
        (1, 0)
    );

    // Another gateway has no copy yet: its first hit reads Redis.
    let mut args = stack.shared_args(Role::Gateway);
    args.extend(stack.options.gateway_args.iter().cloned());
    let other = Gateway::start(args).await;
    let (code, from_redis) = ask_at(&stack, &other.url, "What is Pythagoras' theorem?").await;
    assert_eq!(code, 200, "{from_redis}");

    assert_eq!(
        from_redis, from_memory,
        "the same body from memory as from Redis"
    );
    assert_eq!(from_memory["cached"], true);
    assert_eq!(from_memory["answer"], first["answer"]);
    let id = from_memory["id"].as_str().unwrap();
    assert!(id.starts_with("cached-"), "{id}");
    let (code, by_id) = stack.status_of(id).await;
    assert_eq!(code, 200);
    assert_eq!(by_id["answer"], first["answer"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_answers_are_served_from_memory_while_redis_is_stopped() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let worker = stack.worker(&[]);
    let first = ask_and_wait(&stack, "Why is the sky blue?").await;
    drop(worker);

    stack.redis.stop();
    for _ in 0..3 {
        let hit = ask_and_wait(&stack, "Why is the sky blue?").await;
        assert_eq!(hit["answer"], first["answer"]);
        assert_eq!(hit["cached"], true);
    }
    assert_eq!(lookups(&stack, "memory").await, 3);
    assert_eq!(
        lookups(&stack, "redis").await,
        0,
        "kept from the relayed answer"
    );
    stack.redis.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_answers_the_most_asked_from_memory_at_once() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let worker = stack.worker(&[]);
    let favourite = ask_and_wait(&stack, "How many sides has a hexagon?").await;
    let once = ask_and_wait(&stack, "What is a prime number?").await;
    for _ in 0..4 {
        ask_and_wait(&stack, "How many sides has a hexagon?").await;
    }
    drop(worker);
    // The counts reach Redis within a flush (every 5 s).
    let operator = redis::Client::open(stack.redis.url()).unwrap();
    let mut redis = operator.get_multiplexed_async_connection().await.unwrap();
    eventually(
        Duration::from_secs(15),
        "popularity counted in Redis",
        || {
            let mut redis = redis.clone();
            async move {
                let top: Vec<(String, f64)> = redis::cmd("ZREVRANGE")
                    .arg("ebb:cache-popularity")
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut redis)
                    .await
                    .map_err(|err| err.to_string())?;
                match top.first() {
                    Some((_, score)) if *score >= 4.0 => Ok(()),
                    _ => Err(format!("{top:?}")),
                }
            }
        },
    )
    .await;
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg("ebb:cache-popularity")
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        members
            .iter()
            .all(|m| m.len() == 64 && m.chars().all(|c| c.is_ascii_hexdigit())),
        "cache keys only, no question text: {members:?}"
    );

    stack.restart_gateway().await;
    // With Redis away, only what the warm-up loaded can answer.
    stack.redis.stop();
    let hit = ask_and_wait(&stack, "How many sides has a hexagon?").await;
    assert_eq!(hit["answer"], favourite["answer"]);
    assert_eq!(lookups(&stack, "memory").await, 1);
    assert_eq!(lookups(&stack, "redis").await, 0, "no Redis read of it");
    stack.redis.resume();
    assert_ne!(once["answer"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_question_has_its_queued_record_at_once() {
    let stack = Stack::start(StackOptions::default()).await;
    for n in 0..20 {
        let (code, body) = stack
            .ask(json!({"question": format!("Queued at once {n}?"), "wait_seconds": 0}))
            .await;
        assert_eq!(code, 202, "{body}");
        let (code, status) = stack.status_of(body["id"].as_str().unwrap()).await;
        assert_eq!(
            (code, status["status"].as_str()),
            (200, Some("queued")),
            "{status}"
        );
    }
    assert_eq!(lookups(&stack, "miss").await, 20);
}
