//! Accepted questions/s through two gateways vs one, on the same cluster,
//! in one run: three `ebb-nats` containers (streams with 3 replicas) and one
//! Redis; one `ebb-gateway` process driven by `wrk` with C connections vs
//! two processes driven at once by a `wrk` each with C/2 (their rates
//! summed). Rounds alternate; medians are reported and written to
//! `target/bench/gateways.json` (`{"two_vs_one": {per_second,
//! baseline_per_second, ratio}}`).
//!
//! `cargo build --release --bins && scripts/build-images ebb-nats &&
//! cargo bench -p ebb-tests --bench gateways` (needs `wrk`, a Docker engine;
//! EBB_BENCH_SECONDS, EBB_BENCH_CONNECTIONS)

use std::process::{Child, Command, Stdio};

use ebb_nats::access::Role;
use ebb_tests::bench::{env_or, report, wrk};
use ebb_tests::cluster::NatsCluster;
use ebb_tests::servers::wait_for_port;
use ebb_tests::stack::shared_args;
use ebb_tests::{RedisServer, StackOptions, free_port};
use serde_json::json;

const ROUNDS: usize = 3;

/// An `ebb-gateway` process of the release build, killed on Drop.
struct GatewayProcess {
    child: Child,
    url: String,
}

impl GatewayProcess {
    fn start(cluster: &NatsCluster, redis: &RedisServer) -> GatewayProcess {
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
            .args(["--stream-replicas", "3", "--insecure-dev"])
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
        GatewayProcess {
            child,
            url: format!("http://127.0.0.1:{port}/v1/questions"),
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let seconds: f64 = env_or("EBB_BENCH_SECONDS", 5.0);
    let connections: usize = env_or("EBB_BENCH_CONNECTIONS", 16);
    let cluster = NatsCluster::start().await;
    let redis = RedisServer::start();
    let gateways = [
        GatewayProcess::start(&cluster, &redis),
        GatewayProcess::start(&cluster, &redis),
    ];
    let accept_script = "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
        counter = 0\nrequest = function()\n  counter = counter + 1\n  return wrk.format(nil, nil, nil, \
        '{\"question\":\"Question ' .. math.random(1e9) .. ' number ' .. counter .. '?\",\"wait_seconds\":0}')\nend\n";
    for gateway in &gateways {
        let response = reqwest::Client::new()
            .post(&gateway.url)
            .json(&json!({"question": "Ready?", "wait_seconds": 0}))
            .send()
            .await
            .expect("gateway reachable");
        let code = response.status().as_u16();
        assert_eq!(code, 202, "{}", response.text().await.unwrap_or_default());
    }
    // Let the streams settle on their leaders before measuring.
    wrk(&gateways[0].url, accept_script, 2, 1.0);
    let (mut two, mut one) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let half = (connections / 2).max(1);
        let both = std::thread::scope(|scope| {
            let runs: Vec<_> = gateways
                .iter()
                .map(|gateway| scope.spawn(|| wrk(&gateway.url, accept_script, half, seconds)))
                .collect();
            runs.into_iter()
                .map(|run| run.join().expect("wrk thread"))
                .sum::<f64>()
        });
        two.push(both);
        one.push(wrk(&gateways[0].url, accept_script, connections, seconds));
    }
    let figure = report(
        "accepted questions, two gateways",
        &two,
        "one gateway",
        &one,
        None,
    );
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench"));
    std::fs::create_dir_all(dir).expect("create target/bench");
    let path = dir.join("gateways.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({"two_vs_one": figure})).unwrap(),
    )
    .expect("write");
    println!("wrote {}", path.display());
}
