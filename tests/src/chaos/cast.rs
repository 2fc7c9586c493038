//! The processes of a chaos run, each killable (`SIGKILL`) and restartable
//! on the same port and state.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ebb_nats::access::Role;

use crate::scaler::{ScalerProcess, process_backend_with};
use crate::servers::{NatsServer, RedisServer, TempDir, free_port, wait_for_port};
use crate::stack::{self, StackOptions, target_dir, tiny_model_dir};

/// The webhook signing secret of the run.
pub const WEBHOOK_SECRET: &str = "chaos-webhook-secret";
/// Worker flags: poison questions fail, retries come quickly.
pub const POISON: &str = "POISON";
/// Short enough that a paused worker's question moves on within the run.
pub const ACK_WAIT: Duration = Duration::from_secs(5);
/// [`ACK_WAIT`] as the workers' and gateway's flag.
const ACK_WAIT_FLAG: &str = "5s";
/// The scaler's heartbeat timeout (its minimum).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

const POLICY: &str = r#"
tick: 200ms
resources: {min_instances: 1, max_instances: 3}
target: {utilization: 1.0, drain_target: 2s, latency_goal: 30s, default_service_time: 1s, stable_window: 5s, panic_window: 2s}
cooldowns: {scale_down_stabilization: 2s, scale_to_zero_idle: 30s}
health: {init_timeout: 30s, heartbeat_timeout: 5s, restart_backoff: 200ms, stop_grace: 10s}
"#;

/// nats-server, redis-server, the gateway and the scaler (which runs the
/// workers).
#[derive(Debug)]
pub struct Cast {
    pub nats: NatsServer,
    pub redis: RedisServer,
    gateway: Option<Child>,
    gateway_port: u16,
    pub scaler: ScalerProcess,
    scaler_running: bool,
    _logs: TempDir,
}

impl Cast {
    pub async fn start() -> Cast {
        let nats = NatsServer::start();
        let redis = RedisServer::start();
        let logs = TempDir::new("chaos");
        let mut cast = Cast {
            scaler: ScalerProcess::configured(nats.login_args(Role::Scaler), |state_dir| {
                format!(
                    "{POLICY}\n{}",
                    process_backend_with(
                        shared_args(&nats, &redis, Role::Worker),
                        state_dir,
                        &tiny_model_dir(),
                        &["--debug-fail-marker", POISON, "--retry-backoff", "100ms"],
                    )
                )
            }),
            nats,
            redis,
            gateway: None,
            gateway_port: free_port(),
            scaler_running: false,
            _logs: logs,
        };
        cast.start_gateway();
        cast.start_scaler().await;
        cast
    }

    pub fn gateway_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway_port)
    }

    pub fn nats_url(&self) -> String {
        self.nats.url()
    }

    pub fn redis_url(&self) -> String {
        self.redis.url()
    }

    pub fn gateway_pid(&self) -> Option<u32> {
        self.gateway.as_ref().map(Child::id)
    }

    pub fn start_gateway(&mut self) {
        assert!(self.gateway.is_none(), "the gateway already runs");
        let child = Command::new(target_dir().join("ebb-gateway"))
            .args(shared_args(&self.nats, &self.redis, Role::Gateway))
            .args(["--listen", &format!("127.0.0.1:{}", self.gateway_port)])
            .args(["--insecure-dev", "--rate-limit-per-ip", "100000000"])
            .args([
                "--webhook-secret",
                WEBHOOK_SECRET,
                "--webhook-allow",
                "127.0.0.0/8",
            ])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("start ebb-gateway (cargo build --workspace --all-targets)");
        self.gateway = Some(child);
        wait_for_port(self.gateway_port, "ebb-gateway");
    }

    pub fn kill_gateway(&mut self) {
        if let Some(mut child) = self.gateway.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn start_scaler(&mut self) {
        // Waits for health in a blocking loop (needs the multi-thread runtime).
        tokio::task::block_in_place(|| self.scaler.restart());
        self.scaler_running = true;
    }

    pub fn kill_scaler(&mut self) {
        self.scaler.kill();
        self.scaler_running = false;
    }

    /// Process ids of the workers the scaler runs now.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.scaler.worker_pids()
    }

    /// After the faults: every part up again.
    pub async fn ensure_all_running(&mut self) {
        if !self.nats.is_running() {
            self.nats.resume();
        }
        if !self.redis.is_running() {
            self.redis.resume();
        }
        if self.gateway.is_none() {
            self.start_gateway();
        }
        if !self.scaler_running {
            self.start_scaler().await;
        }
        for pid in self.worker_pids() {
            // A worker left paused would hold its questions for ever.
            signal(pid, "CONT");
        }
    }
}

impl Drop for Cast {
    fn drop(&mut self) {
        self.kill_gateway();
        // The scaler's Drop kills it and its workers; the servers' their own.
    }
}

/// Flags the gateway and workers share (they must agree), logged in as
/// `role`.
fn shared_args(nats: &NatsServer, redis: &RedisServer, role: Role) -> Vec<String> {
    let options = StackOptions {
        ack_wait: ACK_WAIT_FLAG,
        ..StackOptions::default()
    };
    stack::shared_args(nats, redis, role, &options)
}

/// `kill -<name> <pid>`; a process already gone is not an error.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}
