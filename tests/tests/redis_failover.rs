//! Redis behind Sentinels (issue 15): the master is killed under a steady
//! load of questions; the Sentinels promote the replica, the gateway and
//! the workers follow it, and every accepted question is answered, its
//! record read back from the new master while the old one is still down.
//! The old master then comes back as a replica. Without following the
//! master (the first one the Sentinels named kept), every status read
//! after the kill fails and the test times out.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ebb_nats::access::Role;
use ebb_tests::sentinel::SentinelRedis;
use ebb_tests::stack::{Gateway, all_answered, shared_args};
use ebb_tests::{NatsServer, StackOptions, WorkerProcess, eventually};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// What a steady client saw.
#[derive(Debug, Default)]
struct Asked {
    /// Accepted ids, and when each was accepted.
    accepted: Vec<(Instant, String)>,
    /// Refusals by status code and error type.
    refused: BTreeMap<(u16, String), usize>,
}

/// Asks a question every 50 ms until `stop`.
async fn ask_steadily(gateway: String, stop: CancellationToken) -> Asked {
    let http = reqwest::Client::new();
    let mut asked = Asked::default();
    let mut n = 0;
    while !stop.is_cancelled() {
        n += 1;
        let response = http
            .post(format!("{gateway}/v1/questions"))
            .json(
                &json!({"question": format!("Failover {n}?"), "max_tokens": 4, "wait_seconds": 0}),
            )
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("the gateway answers");
        let code = response.status().as_u16();
        let body: Value = response.json().await.expect("a JSON body");
        match body["id"].as_str() {
            Some(id) if code == 202 || code == 200 => {
                asked.accepted.push((Instant::now(), id.to_owned()))
            }
            _ => {
                let kind = body["error"]["type"]
                    .as_str()
                    .unwrap_or("no error type")
                    .to_owned();
                *asked.refused.entry((code, kind)).or_default() += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    asked
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_redis_master_fails_over_and_no_accepted_question_is_lost() {
    let nats = NatsServer::start();
    let mut redis = SentinelRedis::start().await;
    let options = StackOptions::default();
    let mut gateway_args = shared_args(&nats, &redis, Role::Gateway, &options);
    gateway_args.extend(options.gateway_args.iter().cloned());
    let gateway = Gateway::start(gateway_args).await;
    let _workers: Vec<WorkerProcess> = (0..2)
        .map(|_| {
            WorkerProcess::spawn_with(
                shared_args(&nats, &redis, Role::Worker, &options),
                &[],
                Stdio::null(),
            )
        })
        .collect();

    let stop = CancellationToken::new();
    let load = tokio::spawn(ask_steadily(gateway.url.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let old = redis
        .master_port()
        .await
        .expect("the Sentinels name a master");
    let killed_at = Instant::now();
    redis.node(old).stop(); // SIGKILL
    let new = eventually(
        Duration::from_secs(30),
        "the Sentinels promote the replica",
        || async {
            match redis.master_port().await {
                Some(port) if port != old => Ok(port),
                seen => Err(format!("{seen:?}")),
            }
        },
    )
    .await;
    let promoted_after = killed_at.elapsed();
    // Questions keep coming after the failover, answered through the new master.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    let asked = load.await.expect("the client ran");

    // Every question, those answered before the kill included, read back
    // while the old master is still down: from the new one.
    let ids: Vec<String> = asked.accepted.iter().map(|(_, id)| id.clone()).collect();
    let started = Instant::now();
    all_answered(&gateway.url, &ids, None).await;
    let read_back = started.elapsed();

    redis.node(old).resume();
    eventually(
        Duration::from_secs(30),
        "the old master back as a replica",
        || async {
            match redis.role_of(old).await {
                Ok(role) if role == "slave" => Ok(()),
                seen => Err(format!("{seen:?}")),
            }
        },
    )
    .await;
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "an id accepted twice");
    let after_failover = asked
        .accepted
        .iter()
        .filter(|(at, _)| *at > killed_at + promoted_after)
        .count();
    println!(
        "{}",
        json!({
            "accepted": ids.len(),
            "accepted_after_failover": after_failover,
            "refused": format!("{:?}", asked.refused),
            "promoted_after_ms": promoted_after.as_millis() as u64,
            "all_read_back_ms": read_back.as_millis() as u64,
            "old_master": old,
            "new_master": new,
        })
    );
    assert!(ids.len() > 50, "only {} accepted", ids.len());
    assert!(
        after_failover > 20,
        "only {after_failover} accepted after the failover"
    );
    for (code, kind) in asked.refused.keys() {
        assert!(*code == 503 || *code == 429, "refused with {code} {kind}");
    }
}
