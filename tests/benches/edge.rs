//! Gateway overhead, measured against the raw call it wraps, in one run on
//! the same servers (this machine is shared and noisy: only the ratios side
//! by side mean anything).
//!
//! 1. cache-hit requests/s through the gateway (driven by `wrk`; after the
//!    first, served from the gateway's hot cache) vs raw Redis GETs/s of the
//!    same cache entry (driven by `redis-benchmark`): both C load generators
//!    in their own process, one request in flight per connection, the same
//!    number of connections; goal >= 1.0. Beside them, the ceiling HTTP
//!    sets here: the same HTTP stack (axum on hyper, in the same runtime)
//!    answering every request with the hit's bytes and doing nothing else;
//! 2. accepted questions/s (`wait_seconds: 0`, driven by `wrk`) vs raw
//!    async-nats JetStream publish-with-ack/s of the same job at the same
//!    concurrency; goal >= 0.5. Beside them, the ceiling HTTP sets: the
//!    same HTTP stack publishing a job with ack per request and doing
//!    nothing else;
//! 3. what durability costs: the same raw publishes to a server on
//!    `nats/server.conf` (`sync_interval: always`: an fsync before each ack)
//!    vs one syncing on nats-server's default interval, at the same
//!    concurrency and one at a time.
//!
//! Rounds alternate between the two sides; medians are reported, and
//! written to `target/bench/edge.json`.
//!
//! `cargo bench -p ebb-tests --bench edge` (needs `apt-get install wrk`;
//! EBB_BENCH_SECONDS, EBB_BENCH_CONNECTIONS)

use std::process::Command;

/// The gateway runs in this process: the allocator of its binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use ebb_nats::subjects;
use ebb_store::Store;
use ebb_tests::bench::{env_or, median, publish_with_ack, publishes, report, wrk};
use ebb_tests::{Stack, StackOptions};
use serde_json::json;

const ROUNDS: usize = 3;

/// Runs `redis-benchmark` with one command, as the operator; returns
/// requests/s.
fn redis_benchmark(
    redis: &ebb_tests::RedisServer,
    connections: usize,
    requests: usize,
    command: &[&str],
) -> f64 {
    let (user, password) = redis.operator_login();
    let output = Command::new("redis-benchmark")
        .args(["--user", &user, "-a", &password])
        .args([
            "-p",
            &redis.port.to_string(),
            "-c",
            &connections.to_string(),
            "-n",
            &requests.to_string(),
            "--csv",
        ])
        .args(command)
        .output()
        .expect("redis-benchmark runs");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .last()
        .and_then(|line| line.split(',').nth(1))
        .and_then(|rate| rate.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no rate in redis-benchmark output:\n{text}"))
}

/// The servers under test and the load every scenario applies.
struct Edge {
    stack: Stack,
    store: Store,
    url: String,
    connections: usize,
    seconds: f64,
}

impl Edge {
    async fn start() -> Edge {
        let seconds: f64 = env_or("EBB_BENCH_SECONDS", 4.0);
        let connections: usize = env_or("EBB_BENCH_CONNECTIONS", 32);
        // Shedding and rate limits stay on (their cost is measured) but never
        // trigger: this measures the accept path, not refusals.
        let stack = Stack::start(StackOptions {
            queue_max_messages: 10_000_000,
            ..StackOptions::with_gateway_args(&[
                "--insecure-dev",
                "--rate-limit-per-ip",
                "1000000000",
                "--max-workers",
                "1000000000",
            ])
        })
        .await;
        println!(
            "edge benchmark: {connections} connections, {ROUNDS} alternating rounds of ~{seconds} s, {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let url = format!("{}/v1/questions", stack.gateway_url);
        // Lazy: it first connects when priming the cache.
        let store = Store::connect_lazy(&stack.redis.url()).expect("redis url");
        Edge {
            stack,
            store,
            url,
            connections,
            seconds,
        }
    }
}

/// Primes one answer and checks the gateway serves it from the cache;
/// returns the question's body and its cache key.
async fn prime_cache(edge: &Edge) -> (serde_json::Value, String) {
    let body = json!({"question": "What is photosynthesis?", "max_tokens": 64});
    let answer = "Plants turn light, water and air into sugar and oxygen. ".repeat(10);
    let key = ebb_tests::stack::prime_cache(&edge.store, &body, &answer).await;
    let (code, first) = edge.stack.ask(body.clone()).await;
    assert_eq!(
        (code, first["cached"].as_bool()),
        (200, Some(true)),
        "{first}"
    );
    (body, key)
}

/// Serves `router` on the same HTTP stack as the gateway's (axum on
/// hyper, in this runtime) with nothing in front; returns the question URL.
async fn bare_axum(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/v1/questions",
        listener.local_addr().expect("addr")
    );
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

/// Answers every request with `body` and does nothing else: what HTTP
/// alone costs on this machine.
async fn fixed_bytes_server(body: axum::body::Bytes) -> String {
    let answer = move || {
        let body = body.clone();
        async move { ([("content-type", "application/json")], body) }
    };
    bare_axum(axum::Router::new().route("/v1/questions", axum::routing::post(answer))).await
}

/// Publishes a job with ack for every request, then answers `202` with its
/// id, and does nothing else: what HTTP and the publish alone cost.
async fn publishing_server(jetstream: async_nats::jetstream::Context) -> String {
    let numbers = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let accept = move || {
        let (jetstream, numbers) = (jetstream.clone(), numbers.clone());
        async move {
            let n = numbers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let job = ebb_nats::Job {
                id: format!("bare-{n}"),
                ..ebb_tests::bench::raw_job(n)
            };
            publish_with_ack(&jetstream, question_subject(), &job).await;
            (
                axum::http::StatusCode::ACCEPTED,
                axum::Json(json!({"id": job.id, "status": "queued"})),
            )
        }
    };
    bare_axum(axum::Router::new().route("/v1/questions", axum::routing::post(accept))).await
}

/// 1. Cache hits through the gateway vs raw GETs of the same entry, beside
///    the same hit's bytes from a server that does nothing else.
async fn cache_hits(edge: &Edge) -> serde_json::Value {
    let (body, key) = prime_cache(edge).await;
    let hit = reqwest::Client::new()
        .post(&edge.url)
        .json(&body)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .expect("a cache hit");
    let fixed_url = fixed_bytes_server(hit.bytes().await.expect("the hit's body")).await;
    let hit_script = format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = '{body}'\n"
    );
    let cache_entry = ebb_store::store::cache_key(&key);
    let (mut gateway_hits, mut redis_gets, mut fixed) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        gateway_hits.push(wrk(&edge.url, &hit_script, edge.connections, edge.seconds));
        let requests = (median(gateway_hits.clone()) * 2.0 * edge.seconds) as usize;
        redis_gets.push(redis_benchmark(
            &edge.stack.redis,
            edge.connections,
            requests,
            &["GET", &cache_entry],
        ));
        fixed.push(wrk(&fixed_url, &hit_script, edge.connections, edge.seconds));
    }
    report_with_ceiling(
        ("gateway cache hits (wrk)", &gateway_hits),
        ("the same bytes from bare axum (wrk)", &fixed),
        ("raw Redis GET (redis-benchmark)", &redis_gets),
        1.0,
    )
}

/// A measured side: its name and its rounds' rates.
type Side<'a> = (&'a str, &'a [f64]);

/// `ours` vs `baseline` against `goal`, and beside them the ceiling HTTP
/// sets: `http_ceiling` (it vs the baseline) and `of_http_ceiling` (ours
/// vs it).
fn report_with_ceiling(ours: Side, ceiling: Side, baseline: Side, goal: f64) -> serde_json::Value {
    let mut figure = report(ours.0, ours.1, baseline.0, baseline.1, Some(goal));
    let indented = |name: &str| format!("  {name}");
    figure["http_ceiling"] = report(
        &indented(ceiling.0),
        ceiling.1,
        baseline.0,
        baseline.1,
        None,
    );
    figure["of_http_ceiling"] = report(&indented(ours.0), ours.1, ceiling.0, ceiling.1, None);
    figure
}

/// Where the gateway publishes a question of the default priority.
fn question_subject() -> String {
    subjects::question(Default::default())
}

/// 2. Accepted questions vs raw publish-with-ack of the same job.
async fn accepts(edge: &Edge) -> serde_json::Value {
    let accept_script = "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
        counter = 0\nrequest = function()\n  counter = counter + 1\n  return wrk.format(nil, nil, nil, \
        '{\"question\":\"Question number ' .. counter .. '?\",\"wait_seconds\":0}')\nend\n";
    let jetstream = ebb_nats::Topology::context(edge.stack.nats_client().await);
    let stream = edge.stack.questions_stream().await;
    let bare_url = publishing_server(jetstream.clone()).await;
    let (mut gateway_accepts, mut raw_publishes, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        gateway_accepts.push(wrk(
            &edge.url,
            accept_script,
            edge.connections,
            edge.seconds,
        ));
        stream.purge().await.expect("purge");
        raw_publishes.push(
            publishes(
                &jetstream,
                question_subject(),
                edge.connections,
                edge.seconds,
            )
            .await,
        );
        stream.purge().await.expect("purge");
        bare.push(wrk(
            &bare_url,
            accept_script,
            edge.connections,
            edge.seconds,
        ));
        stream.purge().await.expect("purge");
    }
    report_with_ceiling(
        ("gateway accepted questions (wrk)", &gateway_accepts),
        ("bare axum publishing each request with ack (wrk)", &bare),
        ("raw JetStream publish+ack (async-nats)", &raw_publishes),
        0.5,
    )
}

/// Part 3: publishes to a server that syncs each write (nats/server.conf)
/// vs one on the default 2-minute interval, each with ebb's question stream.
async fn durability(edge: &Edge) -> serde_json::Value {
    let conf = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../nats/server.conf"));
    let monitor = ebb_tests::free_port().to_string();
    let syncing = ebb_tests::NatsServer::start_with(Some(conf), vec!["-m".into(), monitor]);
    let config = ebb_nats::QueueConfig {
        max_messages: 10_000_000,
        ..ebb_nats::QueueConfig::default()
    };
    let always = ebb_nats::Topology::ensure(syncing.client().await, &config)
        .await
        .expect("the question stream on the syncing server");
    let default = edge.stack.nats_client().await;
    let default = ebb_nats::Topology::context(default);
    let mut figures = serde_json::Map::new();
    for concurrency in [edge.connections, 1] {
        let (mut synced, mut interval) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            synced.push(
                publishes(
                    &always.jetstream,
                    question_subject(),
                    concurrency,
                    edge.seconds,
                )
                .await,
            );
            always.questions.purge().await.expect("purge");
            interval.push(publishes(&default, question_subject(), concurrency, edge.seconds).await);
            edge.stack
                .questions_stream()
                .await
                .purge()
                .await
                .expect("purge");
        }
        let name = format!("publish+ack, sync_interval: always, {concurrency} in flight");
        let figure = report(&name, &synced, "the default interval", &interval, None);
        figures.insert(format!("in_flight_{concurrency}"), figure);
    }
    figures.into()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let edge = Edge::start().await;
    let figures = json!({
        "cache_hits": cache_hits(&edge).await,
        "accepts": accepts(&edge).await,
        "sync_always": durability(&edge).await,
    });
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench"));
    std::fs::create_dir_all(dir).expect("create target/bench");
    let path = dir.join("edge.json");
    std::fs::write(&path, serde_json::to_string_pretty(&figures).expect("json")).expect("write");
    println!("wrote {}", path.display());
}
