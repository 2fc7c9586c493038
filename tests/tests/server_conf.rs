//! `nats/server.conf`, the config the compose stack runs, is valid and gives
//! a server on which the whole queue topology can be built.

use std::process::Command;

use ebb_nats::{QueueConfig, Topology, subjects};
use ebb_tests::{NatsServer, free_port};

fn conf_path() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../nats/server.conf").to_owned()
}

#[test]
fn the_config_file_is_valid() {
    let output = Command::new("nats-server")
        .args(["-c", &conf_path(), "-t"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn the_topology_builds_on_a_server_run_from_the_config() {
    let monitor = free_port().to_string();
    let server = NatsServer::start_with(vec!["-c".into(), conf_path(), "-m".into(), monitor]);
    let client = async_nats::connect(format!("nats://127.0.0.1:{}", server.port))
        .await
        .unwrap();
    let topology = Topology::ensure(client.clone(), &QueueConfig::default())
        .await
        .unwrap();
    // Idempotent: a second process ensuring the same topology changes nothing.
    let again = Topology::ensure(client, &QueueConfig::default())
        .await
        .unwrap();
    let info = again.questions.get_info().await.unwrap();
    assert_eq!(info.config.name, subjects::QUESTIONS_STREAM);
    assert_eq!(
        info.config.subjects,
        vec![subjects::QUESTIONS_WILDCARD.to_owned()]
    );
    assert_eq!(info.config.max_messages, 100_000);
    assert!(info.config.duplicate_window >= std::time::Duration::from_secs(120));
    let depth = ebb_nats::queue_depth(&topology.questions).await.unwrap();
    assert_eq!(depth.lag(), 0);
}
