//! An `ebb-scaler` process with the process backend running tiny-model
//! workers, for end-to-end tests. Dropping it kills the scaler and every
//! worker recorded in its state directory.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    nats_url: String,
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
    let mut args = stack.shared_args();
    args.extend([
        "--model-dir".to_owned(),
        tiny_model_dir().display().to_string(),
    ]);
    args.extend(worker_args.iter().map(|a| a.to_string()));
    format!(
        "backend:\n  kind: process\n  command: {}\n  state_dir: {}\n  pool: test\n  args: {}\n",
        worker_binary().display(),
        state_dir.display(),
        serde_json::to_string(&args).expect("args JSON")
    )
}

impl ScalerProcess {
    /// Starts a scaler with `policy` (YAML without the backend section).
    pub fn start(stack: &Stack, policy: &str, worker_args: &[&str]) -> ScalerProcess {
        let state = TempDir::new("scaler");
        let config_path = state.path().join("scaler.yaml");
        let backend = process_backend(stack, &state.path().join("workers"), worker_args);
        std::fs::write(&config_path, format!("{policy}\n{backend}")).expect("write config");
        let mut scaler = ScalerProcess {
            child: None,
            url: String::new(),
            config_path,
            state,
            port: free_port(),
            nats_url: stack.nats.url(),
        };
        scaler.restart();
        scaler
    }

    /// (Re)starts the scaler process on the same config and state.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "scaler already running");
        self.url = format!("http://127.0.0.1:{}", self.port);
        let child = Command::new(scaler_binary())
            .args(["--config", &self.config_path.display().to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--nats-url", &self.nats_url])
            .env("EBB_SCALER_ADMIN_TOKEN", ADMIN_TOKEN)
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
        let deadline = Instant::now() + within;
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "scaler never reached: {what}; last status: {status:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
