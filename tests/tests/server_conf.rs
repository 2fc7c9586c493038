//! `nats/server.conf`, the config the compose stack runs, is valid and gives
//! a server on which the whole queue topology can be built; a process that
//! only opens the topology verifies it and never changes it.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ebb_credentials::Credentials;
use ebb_nats::{Priority, QueueConfig, QueueError, Topology, subjects};
use ebb_tests::{NatsServer, TempDir, free_port};
use serde_json::Value;

fn conf_path() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../nats/server.conf"))
}

/// With the users `ebb-credentials` writes where compose mounts them.
#[test]
fn the_config_file_is_valid() {
    let dir = TempDir::new("conf");
    Credentials::ensure(&dir.path().join("credentials"), None).unwrap();
    let copy = dir.path().join("server.conf");
    std::fs::copy(conf_path(), &copy).unwrap();
    let output = Command::new("nats-server")
        .args(["-c", &copy.display().to_string(), "-t"])
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
    let server = NatsServer::start_with(Some(conf_path()), vec!["-m".into(), monitor]);
    let client = server.client().await;
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

#[tokio::test]
async fn opening_before_the_owner_created_the_queue_says_not_created() {
    let server = NatsServer::start();
    let client = server.client().await;
    let opened = Topology::open(client.clone(), &QueueConfig::default()).await;
    assert!(
        matches!(opened, Err(QueueError::NotCreated { .. })),
        "{opened:?}"
    );
    let stream = Topology::question_stream(client).await;
    assert!(
        matches!(stream, Err(QueueError::NotCreated { .. })),
        "{stream:?}"
    );
}

#[tokio::test]
async fn a_process_with_other_flags_logs_each_difference_and_changes_nothing() {
    let server = NatsServer::start();
    let client = server.client().await;
    let owner = QueueConfig {
        max_messages: 1_000,
        ..QueueConfig::default()
    };
    Topology::ensure(client.clone(), &owner).await.unwrap();

    let other = QueueConfig {
        max_messages: 50,
        ack_wait: Duration::from_secs(10),
        ..QueueConfig::default()
    };
    let logs = CapturedLogs::default();
    let topology = {
        let _capturing = tracing::subscriber::set_default(logs.subscriber());
        Topology::open(client, &other).await.unwrap()
    };

    let warnings = logs.warnings();
    let about = |setting: &str| {
        warnings
            .iter()
            .filter(|fields| fields["setting"] == setting)
            .collect::<Vec<_>>()
    };
    let max_messages = about("max_messages");
    assert_eq!(max_messages.len(), 1, "{warnings:#?}");
    assert_eq!(max_messages[0]["stream"], subjects::QUESTIONS_STREAM);
    assert_eq!(max_messages[0]["expected"], "50");
    assert_eq!(max_messages[0]["actual"], "1000");
    let ack_wait = about("ack_wait");
    assert_eq!(ack_wait.len(), Priority::ALL.len(), "{warnings:#?}");
    assert_eq!(ack_wait[0]["expected"], "10s");
    assert_eq!(ack_wait[0]["actual"], "30s");
    assert_eq!(
        warnings.len(),
        1 + Priority::ALL.len(),
        "nothing else differs: {warnings:#?}"
    );

    // The server keeps the owner's settings.
    let info = topology.questions.get_info().await.unwrap();
    assert_eq!(info.config.max_messages, 1_000);
    let consumer = topology.consumer(Priority::High).await.unwrap();
    assert_eq!(
        consumer.cached_info().config.ack_wait,
        Duration::from_secs(30)
    );
}

/// Log lines written while its subscriber is the default, as JSON.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + use<> {
        let logs = self.clone();
        tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || logs.clone())
            .finish()
    }

    /// The fields of each warning.
    fn warnings(&self) -> Vec<Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .filter(|line| line["level"] == "WARN")
            .map(|line| line["fields"].clone())
            .collect()
    }
}
