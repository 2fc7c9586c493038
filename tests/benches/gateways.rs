//! What the cluster costs and what a second gateway adds, in one run on one
//! three-node cluster (`ebb-nats` containers) and one Redis:
//!
//! 1. accepted questions/s through two gateways vs one (streams with 3
//!    replicas): one `ebb-gateway` process driven by `wrk` with C
//!    connections vs two processes driven at once by a `wrk` each with C/2
//!    (their rates summed);
//! 2. raw JetStream publish-with-ack/s (async-nats, C in flight) to a
//!    stream with 3 replicas vs one with 1;
//! 3. one gateway's accepted questions/s with `--stream-replicas 3` vs 1
//!    (ebb's streams deleted between the two, so each gateway makes them
//!    anew at its count).
//!
//! Rounds alternate; medians are reported and written to
//! `target/bench/gateways.json` (`{"two_vs_one" | "publish_r3_vs_r1" |
//! "accepts_r3_vs_r1": {per_second, baseline_per_second, ratio}}`).
//!
//! `cargo build --release --bins && scripts/build-images ebb-nats &&
//! cargo bench -p ebb-tests --bench gateways` (needs `wrk`, a Docker engine;
//! EBB_BENCH_SECONDS, EBB_BENCH_CONNECTIONS)

use std::process::{Child, Command, Stdio};

use async_nats::jetstream::{self, stream};
use ebb_nats::access::Role;
use ebb_tests::bench::{env_or, publishes, report, wrk};
use ebb_tests::cluster::NatsCluster;
use ebb_tests::servers::wait_for_port;
use ebb_tests::stack::shared_args;
use ebb_tests::{RedisServer, StackOptions, free_port};
use serde_json::json;

const ROUNDS: usize = 3;

const ACCEPT_SCRIPT: &str = "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
    counter = 0\nrequest = function()\n  counter = counter + 1\n  return wrk.format(nil, nil, nil, \
    '{\"question\":\"Question ' .. math.random(1e9) .. ' number ' .. counter .. '?\",\"wait_seconds\":0}')\nend\n";

/// An `ebb-gateway` process of the release build, killed on Drop.
struct GatewayProcess {
    child: Child,
    url: String,
}

impl GatewayProcess {
    /// A gateway whose streams have `replicas` copies; returns once it
    /// accepted a first question (its streams exist and have leaders).
    async fn start(cluster: &NatsCluster, redis: &RedisServer, replicas: u8) -> GatewayProcess {
        let binary =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/ebb-gateway");
        assert!(binary.is_file(), "run `cargo build --release --bins` first");
        let port = free_port();
        let options = StackOptions {
            queue_max_messages: 10_000_000,
            ..StackOptions::default()
        };
        let child = Command::new(binary)
            .args(shared_args(cluster, redis, Role::Gateway, &options))
            .args(["--stream-replicas", &replicas.to_string(), "--insecure-dev"])
            .args(["--rate-limit-per-ip", "100000000"])
            // Shedding off the measurement's path: the backlog only grows.
            .args(["--max-workers", "1000000", "--latency-goal", "1h"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ebb-gateway");
        wait_for_port(port, "ebb-gateway");
        let gateway = GatewayProcess {
            child,
            url: format!("http://127.0.0.1:{port}/v1/questions"),
        };
        let response = reqwest::Client::new()
            .post(&gateway.url)
            .json(&json!({"question": "Ready?", "wait_seconds": 0}))
            .send()
            .await
            .expect("gateway reachable");
        let code = response.status().as_u16();
        assert_eq!(code, 202, "{}", response.text().await.unwrap_or_default());
        // Let the streams settle on their leaders before measuring.
        wrk(&gateway.url, ACCEPT_SCRIPT, 2, 1.0);
        gateway
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 1. Two gateways vs one, both at 3 replicas.
async fn two_vs_one(
    cluster: &NatsCluster,
    redis: &RedisServer,
    connections: usize,
    seconds: f64,
) -> serde_json::Value {
    let gateways = [
        GatewayProcess::start(cluster, redis, 3).await,
        GatewayProcess::start(cluster, redis, 3).await,
    ];
    let (mut two, mut one) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let half = (connections / 2).max(1);
        let both = std::thread::scope(|scope| {
            let runs: Vec<_> = gateways
                .iter()
                .map(|gateway| scope.spawn(|| wrk(&gateway.url, ACCEPT_SCRIPT, half, seconds)))
                .collect();
            runs.into_iter()
                .map(|run| run.join().expect("wrk thread"))
                .sum::<f64>()
        });
        two.push(both);
        one.push(wrk(&gateways[0].url, ACCEPT_SCRIPT, connections, seconds));
    }
    report(
        "accepted questions, two gateways",
        &two,
        "one gateway",
        &one,
        None,
    )
}

/// 2. Raw publish-with-ack to a stream of 3 replicas vs one of 1.
async fn publish_r3_vs_r1(
    jetstream: &jetstream::Context,
    connections: usize,
    seconds: f64,
) -> serde_json::Value {
    for replicas in [1, 3] {
        jetstream
            .create_stream(stream::Config {
                name: format!("bench_r{replicas}"),
                subjects: vec![format!("bench.r{replicas}")],
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .expect("create a bench stream");
    }
    let (mut r3, mut r1) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        r3.push(publishes(jetstream, "bench.r3".into(), connections, seconds).await);
        r1.push(publishes(jetstream, "bench.r1".into(), connections, seconds).await);
    }
    for replicas in [1, 3] {
        let _ = jetstream.delete_stream(format!("bench_r{replicas}")).await;
    }
    report(
        "raw JetStream publish+ack, 3 replicas",
        &r3,
        "1 replica",
        &r1,
        None,
    )
}

/// 3. One gateway with `--stream-replicas 3` vs 1.
async fn accepts_r3_vs_r1(
    cluster: &NatsCluster,
    redis: &RedisServer,
    jetstream: &jetstream::Context,
    connections: usize,
    seconds: f64,
) -> serde_json::Value {
    let (mut r3, mut r1) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for (replicas, rates) in [(3, &mut r3), (1, &mut r1)] {
            delete_streams(jetstream).await;
            let gateway = GatewayProcess::start(cluster, redis, replicas).await;
            rates.push(wrk(&gateway.url, ACCEPT_SCRIPT, connections, seconds));
        }
    }
    report(
        "accepted questions, streams with 3 replicas",
        &r3,
        "1 replica",
        &r1,
        None,
    )
}

/// Deletes every stream (ebb's queue, its dead letters, webhooks and KV
/// buckets), so the next gateway makes them at its replica count.
async fn delete_streams(jetstream: &jetstream::Context) {
    use futures::TryStreamExt;
    let names: Vec<String> = jetstream
        .stream_names()
        .try_collect()
        .await
        .expect("list streams");
    for name in names {
        jetstream
            .delete_stream(&name)
            .await
            .expect("delete a stream");
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let seconds: f64 = env_or("EBB_BENCH_SECONDS", 5.0);
    let connections: usize = env_or("EBB_BENCH_CONNECTIONS", 16);
    let cluster = NatsCluster::start().await;
    let redis = RedisServer::start();
    let jetstream = jetstream::new(cluster.client().await);
    let figures = json!({
        "two_vs_one": two_vs_one(&cluster, &redis, connections, seconds).await,
        "publish_r3_vs_r1": publish_r3_vs_r1(&jetstream, connections, seconds).await,
        "accepts_r3_vs_r1": accepts_r3_vs_r1(&cluster, &redis, &jetstream, connections, seconds).await,
    });
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench"));
    std::fs::create_dir_all(dir).expect("create target/bench");
    let path = dir.join("gateways.json");
    std::fs::write(&path, serde_json::to_string_pretty(&figures).unwrap()).expect("write");
    println!("wrote {}", path.display());
}
