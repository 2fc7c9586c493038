//! An `ebb-scaler` process with the process backend running tiny-model
//! workers, for end-to-end tests. Dropping it kills the scaler and every
//! worker recorded in its state directory.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ebb_nats::access::Role;
use serde_json::Value;

use crate::servers::{TempDir, free_port};
use crate::stack::{Stack, target_dir, tiny_model_dir, worker_binary};

pub const ADMIN_TOKEN: &str = "test-admin-token";

#[derive(Debug)]
pub struct ScalerProcess {
    child: Option<Child>,
    pub url: String,
    pub config_path: PathBuf,
    state: TempDir,
    port: u16,
    /// How it reaches NATS: `--nats-url` and its login.
    nats_args: Vec<String>,
}

/// The `ebb-scaler` binary of this build.
pub fn scaler_binary() -> PathBuf {
    let path = target_dir().join("ebb-scaler");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// Backend section running tiny-model workers against `stack`.
pub fn process_backend(stack: &Stack, state_dir: &std::path::Path, worker_args: &[&str]) -> String {
    process_backend_of(stack, state_dir, &tiny_model_dir(), worker_args)
}

/// Backend section running workers of the model in `model_dir`.
pub fn process_backend_of(
    stack: &Stack,
    state_dir: &std::path::Path,
    model_dir: &std::path::Path,
    worker_args: &[&str],
) -> String {
    process_backend_with(
        stack.shared_args(Role::Worker),
        state_dir,
        model_dir,
        worker_args,
    )
}

/// Backend section running workers with `shared_args` (the flags they
/// share with the gateway) on the model in `model_dir`.
pub fn process_backend_with(
    mut args: Vec<String>,
    state_dir: &std::path::Path,
    model_dir: &std::path::Path,
    worker_args: &[&str],
) -> String {
    args.extend(["--model-dir".to_owned(), model_dir.display().to_string()]);
    args.extend(worker_args.iter().map(|a| a.to_string()));
    format!(
        "backend:\n  kind: process\n  command: {}\n  state_dir: {}\n  pool: test\n  args: {}\n",
        worker_binary().display(),
        state_dir.display(),
        serde_json::to_string(&args).expect("args JSON")
    )
}

impl ScalerProcess {
    /// Starts a scaler with `policy` (YAML without the backend section) and
    /// waits until its loop runs.
    pub fn start(stack: &Stack, policy: &str, worker_args: &[&str]) -> ScalerProcess {
        let mut scaler =
            ScalerProcess::configure(stack.nats.login_args(Role::Scaler), |state_dir| {
                format!(
                    "{policy}\n{}",
                    process_backend(stack, state_dir, worker_args)
                )
            });
        scaler.restart();
        scaler
    }

    /// Starts a scaler whose workers load the model in `model_dir` (one
    /// that may be missing or broken) and waits until its loop runs.
    pub fn start_with_model(
        stack: &Stack,
        policy: &str,
        model_dir: &std::path::Path,
        worker_args: &[&str],
    ) -> ScalerProcess {
        let mut scaler =
            ScalerProcess::configure(stack.nats.login_args(Role::Scaler), |state_dir| {
                format!(
                    "{policy}\n{}",
                    process_backend_of(stack, state_dir, model_dir, worker_args)
                )
            });
        scaler.restart();
        scaler
    }

    /// Starts a scaler against a NATS server that may not hold ebb's
    /// streams yet (`nats_args`: its URL and login); returns once it
    /// listens, without waiting for health.
    pub fn start_before_the_queue(nats_args: Vec<String>, policy: &str) -> ScalerProcess {
        let mut scaler = ScalerProcess::configure(nats_args, |state_dir| {
            format!(
                "{policy}\nbackend:\n  kind: process\n  command: {}\n  state_dir: {}\n  pool: test\n",
                worker_binary().display(),
                state_dir.display()
            )
        });
        scaler.launch();
        scaler
    }

    /// A scaler on `config` (made from its workers' state directory), not
    /// started yet: [`ScalerProcess::restart`] starts it.
    pub fn configured(
        nats_args: Vec<String>,
        config: impl FnOnce(&std::path::Path) -> String,
    ) -> ScalerProcess {
        ScalerProcess::configure(nats_args, config)
    }

    fn configure(
        nats_args: Vec<String>,
        config: impl FnOnce(&std::path::Path) -> String,
    ) -> ScalerProcess {
        let state = TempDir::new("scaler");
        let config_path = state.path().join("scaler.yaml");
        std::fs::write(&config_path, config(&state.path().join("workers"))).expect("write config");
        ScalerProcess {
            child: None,
            url: String::new(),
            config_path,
            state,
            port: free_port(),
            nats_args,
        }
    }

    /// (Re)starts the scaler process on the same config and state and waits
    /// until `/healthz` says its loop runs.
    pub fn restart(&mut self) {
        self.launch();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.health_status() != Some(200) {
            assert!(Instant::now() < deadline, "ebb-scaler never became healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The status code of `GET /healthz` (plain HTTP/1.0: this is called
    /// from synchronous code), or `None` if it does not answer.
    fn health_status(&self) -> Option<u16> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    }

    /// `GET /healthz`: status code and body.
    pub async fn healthz(&self) -> (u16, Value) {
        let response = reqwest::get(format!("{}/healthz", self.url))
            .await
            .expect("scaler reachable");
        let code = response.status().as_u16();
        (code, response.json().await.expect("healthz JSON"))
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "scaler already running");
        self.url = format!("http://127.0.0.1:{}", self.port);
        let child = Command::new(scaler_binary())
            .args(["--config", &self.config_path.display().to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(&self.nats_args)
            .env("EBB_SCALER_ADMIN_TOKEN", ADMIN_TOKEN)
            // The console's plots at test speed.
            .env("EBB_CONSOLE_STEP", "1s")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("start ebb-scaler");
        self.child = Some(child);
        crate::servers::wait_for_port(self.port, "ebb-scaler");
    }

    /// The scaler process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("scaler running").id()
    }

    /// SIGKILLs the scaler only; its workers keep running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The body of `GET path` on the scaler.
    async fn get(&self, path: &str) -> String {
        reqwest::get(format!("{}{path}", self.url))
            .await
            .expect("scaler reachable")
            .text()
            .await
            .expect("a body")
    }

    /// The scaler's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.get("/metrics").await
    }

    /// Pins the scaler at zero workers for ten minutes (`POST /scale`
    /// with the admin token) and waits until the override is in force.
    pub async fn hold_at_zero(&self) {
        let response = reqwest::Client::new()
            .post(format!("{}/scale", self.url))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({"action": "set", "count": 0, "ttl_seconds": 600}))
            .send()
            .await
            .expect("scaler reachable");
        assert_eq!(response.status().as_u16(), 200);
        self.wait_status(Duration::from_secs(30), "the override", |status| {
            status["manual_override"].is_object()
        })
        .await;
    }

    pub async fn status(&self) -> Value {
        serde_json::from_str(&self.get("/status").await).expect("status JSON")
    }

    /// Polls `/status` until `done` holds; returns that status.
    pub async fn wait_status(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let done = &done;
        crate::eventually(within, what, || async move {
            let status = self.status().await;
            if done(&status) {
                Ok(status)
            } else {
                Err(status)
            }
        })
        .await
    }

    /// Pids of the workers recorded in the state directory.
    pub fn worker_pids(&self) -> Vec<u32> {
        let dir = self.state.path().join("workers").join("test");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "json"))
            .filter_map(|entry| std::fs::read(entry.path()).ok())
            .filter_map(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .filter_map(|record| record["pid"].as_u64().map(|pid| pid as u32))
            .collect()
    }
}

impl Drop for ScalerProcess {
    fn drop(&mut self) {
        self.kill();
        for pid in self.worker_pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}
