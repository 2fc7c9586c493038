//! A three-node JetStream cluster of real containers (the `ebb-nats` image
//! of `scripts/build-images`, `nats/cluster/server.conf`) on a Docker
//! network of its own, each node's client port published on 127.0.0.1
//! only; removed with its network on Drop. Nodes can be killed, restarted,
//! cut off the network and put back, as machines fail.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ebb_credentials::{Credentials, Role, Service};
use serde_json::Value;

use crate::eventually;
use crate::servers::{NatsLogin, TempDir, free_port, nats_login_args, wait_for_port};

/// The user the images run as (scripts/build-images).
const IMAGE_USER: u32 = 10001;

/// Runs `docker args...`, panicking with its stderr when it fails.
pub fn docker(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        output.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Panics unless `image:latest` exists (scripts/build-images makes it).
pub fn require_image(image: &str) {
    let found = Command::new("docker")
        .args(["image", "inspect", &format!("{image}:latest")])
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        found,
        "image {image}:latest is missing: run scripts/build-images"
    );
}

/// One node: its container and the host port of its client listener.
#[derive(Debug)]
pub struct Node {
    /// `nats-1`..: the server name, and the host name on the network.
    pub name: String,
    pub container: String,
    pub port: u16,
}

#[derive(Debug)]
pub struct NatsCluster {
    pub network: String,
    pub nodes: Vec<Node>,
    credentials: Credentials,
    _dir: TempDir,
}

impl NatsCluster {
    /// Starts three nodes and waits until JetStream answers.
    pub async fn start() -> NatsCluster {
        require_image("ebb-nats");
        let dir = TempDir::new("cluster");
        let credentials = Credentials::ensure(&dir.path().join("credentials"), Some(IMAGE_USER))
            .expect("write the credentials");
        let network = format!("ebb-cluster-{}", uuid::Uuid::now_v7().simple());
        docker(&["network", "create", &network]);
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nats/cluster/server.conf");
        let users = credentials.nats_users();
        let users_dir = users.parent().expect("users.conf has a directory");
        let nodes = (1..=3)
            .map(|n| {
                let name = format!("nats-{n}");
                let node = Node {
                    container: format!("{network}-{name}"),
                    port: free_port(),
                    name,
                };
                docker(&[
                    "run",
                    "-d",
                    "--name",
                    &node.container,
                    "--network",
                    &network,
                    "--network-alias",
                    &node.name,
                    "-p",
                    &format!("127.0.0.1:{}:4222", node.port),
                    "-e",
                    &format!("EBB_NATS_NAME={}", node.name),
                    "-v",
                    &format!("{}:/etc/nats/server.conf:ro", config.display()),
                    "-v",
                    &format!(
                        "{}:/etc/nats/credentials/nats-server:ro",
                        users_dir.display()
                    ),
                    "ebb-nats:latest",
                    "-c",
                    "/etc/nats/server.conf",
                    "-js",
                    "-sd",
                    "/data",
                ]);
                node
            })
            .collect::<Vec<_>>();
        let cluster = NatsCluster {
            network,
            nodes,
            credentials,
            _dir: dir,
        };
        for node in &cluster.nodes {
            wait_for_port(node.port, &node.container);
        }
        cluster.wait_for_jetstream().await;
        cluster
    }

    /// Every node's client URL, comma-separated: `--nats-url` for a cluster.
    pub fn url(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|node| format!("nats://127.0.0.1:{}", node.port))
            .collect();
        urls.join(",")
    }

    fn operator_password(&self) -> String {
        let password = self.credentials.password(Role::Operator, Service::Nats);
        password
            .expect("the operator has a NATS password")
            .to_owned()
    }

    /// The file holding `role`'s NATS password.
    pub fn password_file(&self, role: Role) -> std::path::PathBuf {
        self.credentials.password_file(role, Service::Nats)
    }

    /// A client of the operator's, given every node.
    pub async fn client(&self) -> async_nats::Client {
        let urls: Vec<String> = self.url().split(',').map(str::to_owned).collect();
        async_nats::ConnectOptions::with_user_and_password(
            Role::Operator.user(),
            self.operator_password(),
        )
        .retry_on_initial_connect()
        .connect(&urls[..])
        .await
        .expect("connect to the cluster as the operator")
    }

    /// The node whose server name is `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|node| node.name == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    /// Kills a node's server at once (SIGKILL), as a machine dies.
    pub fn kill(&self, node: &Node) {
        docker(&["kill", &node.container]);
    }

    /// Starts a killed node again, with its store.
    pub fn restart(&self, node: &Node) {
        docker(&["start", &node.container]);
        wait_for_port(node.port, &node.container);
    }

    /// Cuts a node off the network: no peer and no client reaches it.
    pub fn disconnect(&self, node: &Node) {
        docker(&["network", "disconnect", &self.network, &node.container]);
    }

    /// Puts a cut-off node back on the network, under its host name.
    pub fn reconnect(&self, node: &Node) {
        docker(&[
            "network",
            "connect",
            "--alias",
            &node.name,
            &self.network,
            &node.container,
        ]);
    }

    /// The server name of `stream`'s leader, once it has one.
    pub async fn stream_leader(&self, client: &async_nats::Client, stream: &str) -> String {
        let subject = format!("$JS.API.STREAM.INFO.{stream}");
        let info = js_request(client, &subject, "a stream leader", |info| {
            info["cluster"]["leader"].as_str().is_some()
        })
        .await;
        info["cluster"]["leader"].as_str().unwrap().to_owned()
    }

    async fn wait_for_jetstream(&self) {
        let client = self.client().await;
        js_request(&client, "$JS.API.INFO", "JetStream in the cluster", |_| {
            true
        })
        .await;
    }
}

/// Asks the JetStream API `subject` until it answers without an error and
/// `ready` holds of the answer (elections take a few seconds).
pub async fn js_request(
    client: &async_nats::Client,
    subject: &str,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    eventually(Duration::from_secs(60), what, || async {
        let reply = tokio::time::timeout(
            Duration::from_secs(3),
            client.request(subject.to_owned(), "".into()),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|err| err.to_string())?;
        let answer: Value =
            serde_json::from_slice(&reply.payload).map_err(|err| err.to_string())?;
        if answer.get("error").is_some() || !ready(&answer) {
            return Err(answer.to_string());
        }
        Ok(answer)
    })
    .await
}

impl NatsLogin for NatsCluster {
    fn login_args(&self, role: Role) -> Vec<String> {
        nats_login_args(&self.url(), &self.credentials, role)
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v", &node.container])
                .output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}
