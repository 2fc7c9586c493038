//! `compose.cluster.yaml` on the real Docker engine, offline: three NATS
//! nodes, two gateways behind haproxy, a Redis master and replica with
//! three Sentinels, the scaler and its tiny-model worker containers. Under
//! a steady load through the balancer one gateway is killed (SIGKILL) and
//! later started again, then the Redis master is killed: clients that retry
//! with their `Idempotency-Key` lose nothing, no question is asked twice,
//! and the Sentinels' new master serves every answer.
//!
//! `scripts/test` builds the images first; without a Docker engine it
//! skips this file, saying so.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ebb_tests::cluster::{docker, require_image};
use ebb_tests::compose::{Services, tiny_project};
use ebb_tests::stack::all_answered;
use ebb_tests::{TempDir, eventually};
use serde_json::{Value, json};

/// The demo key of deploy/gateway.yaml.
const KEY: &str = "ebb-local-demo-key";

/// One question asked until a gateway takes it, the same key each time.
/// Returns its id and how many tries were dropped by a dying gateway.
async fn ask_with_retries(http: &reqwest::Client, balancer: &str, n: usize) -> (String, u32) {
    let key = format!("cluster-load-{n}");
    let mut dropped = 0;
    for _ in 1..=240 {
        let sent = http
            .post(format!("{balancer}/v1/questions"))
            .bearer_auth(KEY)
            .header("idempotency-key", &key)
            // Held open for the answer: a gateway killed meanwhile drops it.
            .json(&json!({"question": format!("Gateway loss {n}?"), "max_tokens": 16, "wait_seconds": 10}))
            .send()
            .await;
        if let Ok(response) = sent {
            let code = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            match code {
                200 | 202 => return (body["id"].as_str().unwrap().to_owned(), dropped),
                // The balancer's answer when the gateway holding the
                // request died (no JSON body: not the gateway's).
                502..=504 if body.is_null() => dropped += 1,
                // The gateway's 503 while a node is elected; 429 when the
                // one worker is behind (shedding).
                429 | 503 => {}
                _ => panic!("{code}: {body}"),
            }
        } else {
            dropped += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("question {n} never accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_gateway_behind_the_balancer_loses_no_question() {
    for image in [
        "ebb-gateway",
        "ebb-worker",
        "ebb-scaler",
        "ebb-credentials",
        "ebb-nats",
        "ebb-redis",
        "ebb-haproxy",
    ] {
        require_image(image);
    }
    let project = format!("ebbcluster{}", std::process::id());
    let dir = TempDir::new("compose-cluster");
    let (mut compose, port, _) = tiny_project(
        &project,
        "compose.cluster.yaml",
        Services::CLUSTER,
        dir.path(),
    );
    // Every request comes from the balancer's side of one address.
    compose
        .env
        .push(("EBB_RATE_LIMIT_PER_IP".into(), "100000".into()));
    let up = compose.run(&["up", "-d", "--no-build"]);
    assert!(
        up.status.success(),
        "compose up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let balancer = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(70))
        .build()
        .unwrap();
    let healthz = &format!("{balancer}/healthz");
    let http_ref = &http;
    eventually(
        Duration::from_secs(90),
        "the gateways healthy behind the balancer",
        || async move {
            match http_ref.get(healthz).send().await {
                Ok(response) if response.status().is_success() => Ok(()),
                Ok(response) => Err(response.status().to_string()),
                Err(err) => Err(err.to_string()),
            }
        },
    )
    .await;
    // The first answer starts a worker container; the gateways may still
    // be joining the balancer's rotation.
    let first = eventually(
        Duration::from_secs(120),
        "a first answer through the balancer",
        || async {
            let response = http
            .post(format!("{balancer}/v1/questions"))
            .bearer_auth(KEY)
            .json(&json!({"question": "Why is the sky blue?", "max_tokens": 8, "wait_seconds": 60}))
            .send()
            .await
            .map_err(|err| err.to_string())?;
            let text = response.text().await.map_err(|err| err.to_string())?;
            serde_json::from_str::<Value>(&text).map_err(|_| text)
        },
    )
    .await;
    assert_eq!(first["status"], "done", "{first}");

    // Three clients asking one question after another, each held open
    // for its answer: a killed gateway always holds some.
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = (0..3)
        .map(|client| {
            let (http, balancer, stop) = (http.clone(), balancer.clone(), stop.clone());
            tokio::spawn(async move {
                let mut asked = Vec::new();
                let mut n = client;
                while !stop.load(Ordering::Relaxed) {
                    asked.push(ask_with_retries(&http, &balancer, n).await);
                    n += 3;
                }
                asked
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let gateway_1 = format!("{project}_gateway-1_1");
    docker(&["kill", &gateway_1]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    docker(&["start", &gateway_1]);
    tokio::time::sleep(Duration::from_secs(6)).await;
    // The Redis master goes; the Sentinels (5 s to call it down) promote
    // the replica and every process follows it.
    let master = redis_master(&project).expect("the Sentinels name a master");
    docker(&["kill", &format!("{project}_{master}_1")]);
    let killed = std::time::Instant::now();
    let promoted = async {
        // Asked each second, not each 50 ms: two cores run the whole
        // cluster, and a Sentinel starved for 2 s stops acting a while.
        while redis_master(&project).is_none_or(|now| now == master) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), promoted)
        .await
        .is_err()
    {
        let logs: Vec<String> = (1..=3)
            .map(|n| {
                let sentinel = format!("{project}_sentinel-{n}_1");
                ebb_tests::compose::output("docker", &["logs", "--tail", "40", &sentinel])
            })
            .collect();
        panic!("the Sentinels promoted no replica of {master} in 60 s: {logs:#?}");
    }
    println!(
        "{master} killed: the other node promoted after {:?}",
        killed.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let mut asked = Vec::new();
    for load in loads {
        asked.extend(load.await.unwrap());
    }
    let retried = asked.iter().filter(|(_, dropped)| *dropped > 0).count();
    eprintln!(
        "{} questions through the balancer, {retried} dropped by the killed gateway and retried",
        asked.len()
    );
    assert!(asked.len() >= 20, "the load ran: {asked:?}");
    assert!(
        retried > 0,
        "the kill dropped no request in flight: {asked:?}"
    );
    let mut ids: Vec<&String> = asked.iter().map(|(id, _)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), asked.len(), "two questions under one id");
    let ids: Vec<String> = ids.into_iter().cloned().collect();
    all_answered(&balancer, &ids, Some(KEY)).await;
}

/// The Redis node sentinel-1 names master (`redis-1` or `redis-2`, at their
/// fixed addresses .11 and .12), asked with the image's busybox `nc` (the
/// Sentinels' port is not published).
fn redis_master(project: &str) -> Option<&'static str> {
    let ask = r#"printf 'SENTINEL get-master-addr-by-name ebb\r\n' | /bin/busybox nc -w 1 127.0.0.1 26379"#;
    let sentinel = format!("{project}_sentinel-1_1");
    let answer = ebb_tests::compose::output(
        "docker",
        &["exec", &sentinel, "/bin/busybox", "sh", "-c", ask],
    );
    // *2, $11, 10.213.53.11, $4, 6379
    let address = answer.lines().nth(2)?.trim();
    match address.rsplit('.').next()? {
        "11" => Some("redis-1"),
        "12" => Some("redis-2"),
        _ => None,
    }
}

#[test]
fn the_cluster_file_publishes_only_the_balancer_and_gives_every_process_all_nodes() {
    let text = ebb_tests::compose::merged_config(&["compose.cluster.yaml"]);
    let seeds = "nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222";
    // Both gateways and the scaler: every node, and the gateways' three replicas.
    assert_eq!(
        text.matches(&format!("EBB_NATS_URL: {seeds}")).count(),
        3,
        "{text}"
    );
    assert_eq!(
        text.matches("EBB_STREAM_REPLICAS: '3'").count(),
        2,
        "{text}"
    );
    // Both gateways ask the Sentinels where the Redis master is.
    let (_, sentinels) = Services::CLUSTER.redis;
    assert_eq!(
        text.matches(&format!("EBB_REDIS_SENTINELS: {sentinels}"))
            .count(),
        2,
        "{text}"
    );
    assert!(!text.contains("EBB_REDIS_URL"), "{text}");
    // Published beyond this host: the balancer's port alone.
    let mut service = "";
    let mut open = Vec::new();
    for line in text.lines() {
        // `  name:` opens a service (under `services:`, indented by two).
        if line.len() > 2
            && line.starts_with("  ")
            && !line.starts_with("   ")
            && line.ends_with(':')
        {
            service = line.trim().trim_end_matches(':');
        }
        let entry = line.trim_start().trim_start_matches("- ");
        let short_form_open = entry.chars().next().is_some_and(|c| c.is_ascii_digit())
            && entry.contains(':')
            && !entry.starts_with("127.0.0.1:");
        if entry.starts_with("published:") || short_form_open {
            open.push((service.to_owned(), entry.to_owned()));
        }
    }
    assert_eq!(
        open,
        [("balancer".to_owned(), "published: 8080".to_owned())],
        "{text}"
    );
    assert!(
        text.contains("- 127.0.0.1:8222:8222/tcp") && text.contains("- 127.0.0.1:9090:9090/tcp"),
        "{text}"
    );
    let config = ebb_control::config::ScalerConfig::load(
        &ebb_tests::compose::repo_root().join("deploy/scaler.cluster.yaml"),
    )
    .expect("valid");
    let ebb_control::config::BackendConfig::Docker(docker) = config.backend else {
        panic!("the cluster's scaler runs containers");
    };
    assert_eq!(
        docker.env.get("EBB_NATS_URL").map(String::as_str),
        Some(seeds)
    );
    assert_eq!(
        docker.env.get("EBB_REDIS_SENTINELS").map(String::as_str),
        Some(sentinels)
    );
}
