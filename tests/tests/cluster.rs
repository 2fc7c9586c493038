//! ebb on a three-node JetStream cluster of real containers (`ebb-nats`
//! images on a Docker network of their own): streams with three replicas,
//! every process given all three seed URLs. Nodes die, are cut off and
//! restarted under a steady load; every accepted question is answered, and
//! the queue depth the scaler reads is always the consumer leader's.
//!
//! `scripts/test` builds the images first; without a Docker engine it
//! skips this file, saying so.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ebb_nats::access::Role;
use ebb_nats::subjects::{self, Priority};
use ebb_tests::cluster::{NatsCluster, js_request};
use ebb_tests::stack::{Gateway, all_answered, shared_args};
use ebb_tests::{RedisServer, StackOptions, WorkerProcess};
use serde_json::{Value, json};

const REPLICAS: &str = "3";

/// Gateway flags on the cluster: three replicas, no practical rate limit.
fn gateway_args(cluster: &NatsCluster, redis: &RedisServer) -> Vec<String> {
    let mut args = shared_args(cluster, redis, Role::Gateway, &StackOptions::default());
    args.extend(
        [
            "--stream-replicas",
            REPLICAS,
            "--insecure-dev",
            "--rate-limit-per-ip",
            "1000000",
        ]
        .map(str::to_owned),
    );
    args
}

fn worker(cluster: &NatsCluster, redis: &RedisServer) -> WorkerProcess {
    let args = shared_args(cluster, redis, Role::Worker, &StackOptions::default());
    WorkerProcess::spawn_with(args, &["--stream-replicas", REPLICAS], Stdio::null())
}

/// What the load saw: each accepted id, and every other answer by status.
#[derive(Debug, Default)]
struct Ledger {
    accepted: Vec<String>,
    refused: BTreeMap<u16, Vec<Value>>,
    /// When each question was accepted: the gaps show how long the queue
    /// was unavailable (refusing, or holding a publish unacked).
    accepted_at: Vec<Instant>,
}

/// Asks questions one after another until `stop`, never waiting for answers.
async fn steady_load(gateway: String, stop: Arc<AtomicBool>) -> Ledger {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut ledger = Ledger::default();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let asked = http
            .post(format!("{gateway}/v1/questions"))
            .json(&json!({"question": format!("Cluster question {n}?"), "max_tokens": 4, "wait_seconds": 0}))
            .send()
            .await;
        let Ok(response) = asked else {
            ledger.refused.entry(0).or_default().push(Value::Null);
            continue;
        };
        let code = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        match code {
            202 => {
                ledger
                    .accepted
                    .push(body["id"].as_str().unwrap().to_owned());
                ledger.accepted_at.push(Instant::now());
            }
            _ => ledger.refused.entry(code).or_default().push(body),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ledger
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replicated_queue_answers_every_accepted_question_through_node_loss_and_partition() {
    let cluster = NatsCluster::start().await;
    let redis = RedisServer::start();
    let gateway = Gateway::start(gateway_args(&cluster, &redis)).await;
    let _workers = [worker(&cluster, &redis), worker(&cluster, &redis)];
    let client = cluster.client().await;
    let info = js_request(
        &client,
        "$JS.API.STREAM.INFO.EBB_QUESTIONS",
        "the stream",
        |_| true,
    )
    .await;
    assert_eq!(info["config"]["num_replicas"], 3, "{info}");

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(steady_load(gateway.url.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The stream leader's machine dies, and comes back later.
    let leader = cluster
        .stream_leader(&client, subjects::QUESTIONS_STREAM)
        .await;
    let mut phases = vec![("leader killed", Instant::now())];
    cluster.kill(cluster.node(&leader));
    tokio::time::sleep(Duration::from_secs(8)).await;
    cluster.restart(cluster.node(&leader));
    tokio::time::sleep(Duration::from_secs(5)).await;

    // The new leader is cut off the network, then put back.
    let leader = cluster
        .stream_leader(&client, subjects::QUESTIONS_STREAM)
        .await;
    phases.push(("leader cut off", Instant::now()));
    cluster.disconnect(cluster.node(&leader));
    tokio::time::sleep(Duration::from_secs(8)).await;
    cluster.reconnect(cluster.node(&leader));
    tokio::time::sleep(Duration::from_secs(5)).await;

    // A rolling restart: one node at a time, each back before the next.
    phases.push(("rolling restart", Instant::now()));
    for node in &cluster.nodes {
        cluster.kill(node);
        cluster.restart(node);
        cluster
            .stream_leader(&client, subjects::QUESTIONS_STREAM)
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    stop.store(true, Ordering::Relaxed);
    let ledger = load.await.unwrap();
    for (n, (phase, started)) in phases.iter().enumerate() {
        let ended = phases.get(n + 1).map(|(_, at)| *at);
        let longest_gap = ledger
            .accepted_at
            .windows(2)
            .filter(|pair| pair[1] > *started && ended.is_none_or(|end| pair[0] < end))
            .map(|pair| pair[1] - pair[0])
            .max();
        eprintln!("{phase}: longest time without an acceptance {longest_gap:?}");
    }
    eprintln!(
        "accepted {}, refused {:?}",
        ledger.accepted.len(),
        ledger
            .refused
            .iter()
            .map(|(code, bodies)| (code, bodies.len()))
            .collect::<Vec<_>>()
    );
    assert!(ledger.accepted.len() > 50, "the load ran: {ledger:?}");
    // Publishes during an election are refused clearly, never accepted and lost.
    for (code, bodies) in &ledger.refused {
        assert_eq!(*code, 503, "only 503 while the cluster elects: {bodies:?}");
        for body in bodies {
            assert_eq!(body["error"]["type"], "queue_unavailable", "{body}");
        }
    }
    let mut unique = ledger.accepted.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ledger.accepted.len(), "an id accepted twice");
    all_answered(&gateway.url, &ledger.accepted, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_depth_the_scaler_reads_is_the_leaders_through_leader_moves() {
    let cluster = NatsCluster::start().await;
    let redis = RedisServer::start();
    let gateway = Gateway::start(gateway_args(&cluster, &redis)).await;
    let http = reqwest::Client::new();
    // A held backlog: no worker runs.
    const BACKLOG: u64 = 40;
    for n in 0..BACKLOG {
        let response = http
            .post(format!("{}/v1/questions", gateway.url))
            .json(&json!({"question": format!("Held {n}?"), "wait_seconds": 0}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }

    // Read as the scaler reads, with its login and every seed URL.
    let scaler_args = ebb_runtime::NatsArgs {
        nats_url: cluster.url(),
        nats_user: Some(Role::Scaler.user()),
        nats_password_file: Some(cluster.password_file(Role::Scaler)),
    };
    let scaler = ebb_nats::connect(&scaler_args, "test-scaler", None)
        .await
        .unwrap();
    let questions = ebb_nats::Topology::question_stream(scaler).await.unwrap();
    // Readings are kept by the round of leader moves they were taken in.
    const ROUNDS: usize = 3;
    let round_now = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let round_now = round_now.clone();
        async move {
            let mut lags = Vec::new();
            let mut failures = 0;
            // Until a reading after the last move, when every node is back.
            while lags.last().is_none_or(|&(round, _)| round < ROUNDS) {
                let round = round_now.load(Ordering::Relaxed);
                match ebb_nats::queue_depth(&questions).await {
                    Ok(depth) => lags.push((round, depth.lag())),
                    Err(_) => failures += 1,
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (lags, failures)
        }
    });

    let client = cluster.client().await;
    let consumer = subjects::consumer(Priority::Normal);
    let consumer_info = format!(
        "$JS.API.CONSUMER.INFO.{}.{consumer}",
        subjects::QUESTIONS_STREAM
    );
    for round in 0..ROUNDS {
        // Step-down requests: the leaders move to another node.
        let stepdown = format!(
            "$JS.API.CONSUMER.LEADER.STEPDOWN.{}.{consumer}",
            subjects::QUESTIONS_STREAM
        );
        js_request(&client, &stepdown, "a consumer step-down", |_| true).await;
        let stepdown = format!(
            "$JS.API.STREAM.LEADER.STEPDOWN.{}",
            subjects::QUESTIONS_STREAM
        );
        js_request(&client, &stepdown, "a stream step-down", |_| true).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The consumer leader's machine dies (and comes back).
        let info = js_request(&client, &consumer_info, "a consumer leader", |info| {
            info["cluster"]["leader"].as_str().is_some()
        })
        .await;
        let node = cluster.node(info["cluster"]["leader"].as_str().unwrap());
        cluster.kill(node);
        tokio::time::sleep(Duration::from_secs(4)).await;
        cluster.restart(node);
        tokio::time::sleep(Duration::from_secs(3)).await;
        eprintln!("round {round} done");
        round_now.store(round + 1, Ordering::Relaxed);
    }
    let (lags, failures) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("a depth reading once every node is back")
        .unwrap();
    eprintln!(
        "{} readings, {failures} failed during elections, lags seen: {:?}",
        lags.len(),
        lags.iter()
            .map(|&(_, lag)| lag)
            .collect::<std::collections::BTreeSet<_>>()
    );
    // Under load a reading can fail or take seconds through a whole round
    // of elections; some must still have been made while leaders moved.
    assert!(
        lags.iter().any(|&(taken_in, _)| taken_in < ROUNDS),
        "no depth reading while the leaders moved: {lags:?}"
    );
    assert!(
        lags.iter().all(|&(_, lag)| lag <= BACKLOG),
        "a reading above the true backlog of {BACKLOG}: {lags:?}"
    );
    assert_eq!(
        lags.last().map(|&(_, lag)| lag),
        Some(BACKLOG),
        "the backlog read after the moves"
    );
}
