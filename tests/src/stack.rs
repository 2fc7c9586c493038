//! A whole ebb deployment for one test: NATS, Redis, an in-process gateway,
//! and worker processes on the tiny model.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::Parser as _;
use ebb_nats::access::Role;
use ebb_nats::{Heartbeat, WorkerState, subjects};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::eventually;
use crate::servers::{NatsLogin, NatsServer, RedisLogin, RedisServer};

pub const TINY_MODEL: &str = "ebb/tiny-qwen2";
pub const TINY_REVISION: &str = "test";

/// Knobs a test may turn; the rest are production defaults.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub ack_wait: &'static str,
    pub max_deliver: u32,
    pub queue_max_messages: u32,
    /// Gateway flags beyond the shared ones. The default serves without keys
    /// and with no practical rate limit, for tests about other things.
    pub gateway_args: Vec<String>,
}

impl StackOptions {
    /// The defaults with exactly these gateway flags (beyond the shared ones).
    pub fn with_gateway_args(args: &[&str]) -> StackOptions {
        StackOptions {
            gateway_args: args.iter().map(|arg| arg.to_string()).collect(),
            ..StackOptions::default()
        }
    }
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            ack_wait: "3s",
            max_deliver: 5,
            queue_max_messages: 100_000,
            gateway_args: ["--insecure-dev", "--rate-limit-per-ip", "1000000"]
                .map(str::to_owned)
                .to_vec(),
        }
    }
}

/// The tiny model, written once per build tree and shared by every test.
pub fn tiny_model_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Named by size, so a changed tiny shape is written afresh.
        let name = format!("tiny-seed42-{}", ebb_worker::tiny::Shape::TINY.parameters());
        let dir = target_dir().join("ebb-test-models").join(name);
        if !dir.join("model.safetensors").is_file() {
            // Write elsewhere and rename: parallel test processes race here.
            let staging = dir.with_extension(format!("tmp-{}", std::process::id()));
            ebb_worker::tiny::write_random_model(
                &staging,
                ebb_worker::tiny::Shape::TINY,
                42,
                candle_core::DType::F32,
            )
            .expect("write the tiny model");
            if std::fs::rename(&staging, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&staging);
            }
        }
        dir
    })
    .clone()
}

/// Flags the gateway and workers of a deployment on these servers share
/// (they must agree): logins as `role`, the tiny model, `options`' queue.
pub fn shared_args(
    nats: &impl NatsLogin,
    redis: &impl RedisLogin,
    role: Role,
    options: &StackOptions,
) -> Vec<String> {
    let mut args = nats.login_args(role);
    args.extend(redis.login_args(role));
    args.extend(
        [
            "--model",
            TINY_MODEL,
            "--model-revision",
            TINY_REVISION,
            "--ack-wait",
            options.ack_wait,
            "--max-deliver",
            &options.max_deliver.to_string(),
            "--queue-max-messages",
            &options.queue_max_messages.to_string(),
        ]
        .map(str::to_owned),
    );
    args
}

/// Stores `answer` in Redis's cache under the key the gateway gives the
/// question `body` (a `POST /v1/questions` body) for the tiny model, for an
/// hour; returns the key.
pub async fn prime_cache(
    store: &ebb_store::Store,
    body: &serde_json::Value,
    answer: &str,
) -> String {
    let limits = ebb_gateway::question::Limits {
        default_max_tokens: 512,
        max_tokens_limit: 4096,
    };
    let key = ebb_gateway::question::NewQuestion::from_json(body.to_string().as_bytes(), limits)
        .expect("a valid question")
        .cache_key(&format!("{TINY_MODEL}@{TINY_REVISION}"))
        .expect("a greedy question has a cache key");
    let cached = ebb_nats::CachedAnswer {
        answer: answer.to_owned(),
        model: format!("{TINY_MODEL}@{TINY_REVISION}"),
        finish_reason: Default::default(),
        language: None,
    };
    store
        .put_cached_answer(&key, &cached, Duration::from_secs(3600))
        .await
        .expect("prime the cache");
    key
}

/// The `/metrics` text of the process serving `url`.
pub async fn metrics_of(url: &str) -> String {
    reqwest::get(format!("{url}/metrics"))
        .await
        .and_then(|response| response.error_for_status())
        .expect("/metrics answers")
        .text()
        .await
        .expect("/metrics text")
}

/// A job as the gateway would queue it for the tiny model.
pub fn tiny_job(question: &str, max_tokens: u32, grade: Option<u8>) -> ebb_nats::Job {
    ebb_nats::Job {
        id: "q".into(),
        question: question.into(),
        grade,
        course: None,
        language: None,
        max_tokens,
        sampling: Default::default(),
        priority: Default::default(),
        model: "ebb/tiny-qwen2@test".into(),
        cache_key: None,
        enqueued_at_ms: 0,
        owner: None,
        history: Vec::new(),
        callback_url: None,
    }
}

/// `target/<profile>`, found from the running binary: a test or bench
/// (`.../deps/name-hash`) or an example (`.../examples/name`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|dir| dir.parent())
        .expect("test binaries live in target/<profile>/deps or examples")
        .to_path_buf()
}

/// The `ebb-worker` binary of this build (`cargo build --bins` makes it).
pub fn worker_binary() -> PathBuf {
    let path = target_dir().join("ebb-worker");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

#[derive(Debug)]
pub struct Stack {
    pub nats: NatsServer,
    pub redis: RedisServer,
    pub gateway_url: String,
    pub http: reqwest::Client,
    pub options: StackOptions,
    gateway: Option<Gateway>,
}

impl Stack {
    /// Asks questions that do not wait until the gateway sheds one with
    /// `429 overloaded`; returns how many it accepted (at most `most`: one
    /// more is a failed test) and the refusal's headers. A question accepted
    /// while the queue depth is being read may count twice (never zero
    /// times), so shedding may start one early.
    pub async fn fill_until_shed(&self, most: u64) -> (u64, reqwest::header::HeaderMap) {
        let mut accepted = 0u64;
        loop {
            let response = self
                .http
                .post(format!("{}/v1/questions", self.gateway_url))
                .json(&serde_json::json!({"question": format!("Backlog {accepted}?"), "wait_seconds": 0}))
                .send()
                .await
                .expect("gateway reachable");
            let (code, headers) = (response.status().as_u16(), response.headers().clone());
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if code != 202 {
                assert_eq!(code, 429, "{body}");
                assert_eq!(body["error"]["type"], "overloaded", "{body}");
                return (accepted, headers);
            }
            accepted += 1;
            assert!(
                accepted <= most,
                "more than {most} waiting questions accepted"
            );
        }
    }

    pub async fn start(options: StackOptions) -> Stack {
        let nats = NatsServer::start();
        let redis = RedisServer::start();
        let mut stack = Stack {
            nats,
            redis,
            gateway_url: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(150))
                .build()
                .expect("HTTP client"),
            options,
            gateway: None,
        };
        stack.start_gateway().await;
        stack
    }

    /// Flags shared by the gateway and workers (they must agree), logged
    /// in as `role`.
    pub fn shared_args(&self, role: Role) -> Vec<String> {
        shared_args(&self.nats, &self.redis, role, &self.options)
    }

    /// The queue settings the shared flags give (what the gateway created).
    pub fn queue_config(&self) -> ebb_nats::QueueConfig {
        ebb_nats::QueueConfig {
            ack_wait: ebb_runtime::duration::parse(self.options.ack_wait).expect("ack wait parses"),
            max_deliver: self.options.max_deliver.into(),
            max_messages: self.options.queue_max_messages.into(),
            ..ebb_nats::QueueConfig::default()
        }
    }

    /// Stops the gateway and starts a new one on the same servers (on
    /// another port: `gateway_url` follows).
    pub async fn restart_gateway(&mut self) {
        drop(self.gateway.take());
        self.start_gateway().await;
    }

    async fn start_gateway(&mut self) {
        let mut args = self.shared_args(Role::Gateway);
        args.extend(self.options.gateway_args.iter().cloned());
        let gateway = Gateway::start(args).await;
        self.gateway_url = gateway.url.clone();
        self.gateway = Some(gateway);
    }

    /// The gateway's `/metrics` text.
    pub async fn metrics(&self) -> String {
        metrics_of(&self.gateway_url).await
    }

    /// Starts an `ebb-worker` process on the tiny model.
    pub fn worker(&self, extra_args: &[&str]) -> WorkerProcess {
        WorkerProcess::spawn(self, extra_args, Stdio::inherit())
    }

    /// Starts a worker whose logs (stderr) go to `log`.
    pub fn worker_logging_to(&self, extra_args: &[&str], log: &std::path::Path) -> WorkerProcess {
        let file = std::fs::File::create(log).expect("create the worker log");
        WorkerProcess::spawn(self, extra_args, Stdio::from(file))
    }

    /// A NATS client of the test's own.
    pub async fn nats_client(&self) -> async_nats::Client {
        self.nats.client().await
    }

    /// Waits until a worker with this id announces `Ready`.
    pub async fn wait_ready(&self, worker: &WorkerProcess) {
        let client = self.nats_client().await;
        let mut beats = client
            .subscribe(subjects::HEARTBEAT)
            .await
            .expect("subscribe");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let message = tokio::time::timeout_at(deadline, beats.next())
                .await
                .unwrap_or_else(|_| panic!("worker {} not ready within 60 s", worker.id))
                .expect("heartbeat subscription open");
            let beat: Heartbeat = serde_json::from_slice(&message.payload).expect("heartbeat JSON");
            if beat.worker_id == worker.id && beat.state == WorkerState::Ready {
                return;
            }
        }
    }

    /// POSTs a question; returns the status and JSON body.
    pub async fn ask(&self, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/v1/questions", self.gateway_url))
            .json(&body)
            .send()
            .await
            .expect("gateway reachable");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    pub async fn status_of(&self, id: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}/v1/questions/{id}", self.gateway_url))
            .send()
            .await
            .expect("gateway reachable");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    /// Waits until the status record says a worker is generating.
    pub async fn wait_running(&self, id: &str) {
        eventually(
            Duration::from_secs(30),
            &format!("{id} running"),
            || async move {
                let (_, record) = self.status_of(id).await;
                if record["status"] == "running" {
                    Ok(())
                } else {
                    Err(record)
                }
            },
        )
        .await
    }

    /// Polls the status record until it is terminal; returns it.
    pub async fn wait_terminal(&self, id: &str, within: Duration) -> Value {
        eventually(within, &format!("question {id} finished"), || async move {
            let (code, record) = self.status_of(id).await;
            if code == 200 && matches!(record["status"].as_str(), Some("done" | "failed")) {
                Ok(record)
            } else {
                Err(record)
            }
        })
        .await
    }

    /// Questions stored in the queue right now.
    pub async fn queued_messages(&self) -> u64 {
        let info = self
            .questions_stream()
            .await
            .get_info()
            .await
            .expect("stream info");
        info.state.messages
    }

    /// The dead letter kept for a question, if any.
    pub async fn dead_letter(&self, id: &str) -> Option<ebb_nats::DeadLetter> {
        let letter = async_nats::jetstream::new(self.nats_client().await)
            .get_stream(subjects::DEAD_STREAM)
            .await
            .expect("dead-letter stream exists")
            .direct_get_last_for_subject(subjects::dead_letter(id))
            .await
            .ok()?;
        Some(serde_json::from_slice(&letter.payload).expect("dead letters are JSON"))
    }

    /// Stream handle of the question queue.
    pub async fn questions_stream(&self) -> async_nats::jetstream::stream::Stream {
        async_nats::jetstream::new(self.nats_client().await)
            .get_stream(subjects::QUESTIONS_STREAM)
            .await
            .expect("question stream exists")
    }
}

/// Waits until every question in `ids` has ended `done` at the gateway
/// `gateway` (read with the API key `key`, when questions have owners).
pub async fn all_answered(gateway: &str, ids: &[String], key: Option<&str>) {
    let http = reqwest::Client::new();
    for id in ids {
        let url = format!("{gateway}/v1/questions/{id}");
        let record = eventually(
            Duration::from_secs(120),
            "an accepted question answered",
            || async {
                let mut request = http.get(&url);
                if let Some(key) = key {
                    request = request.bearer_auth(key);
                }
                let response = request.send().await.map_err(|err| err.to_string())?;
                let body: Value = response.json().await.map_err(|err| err.to_string())?;
                match body["status"].as_str() {
                    Some("done" | "failed") => Ok(body),
                    _ => Err(format!("{id}: {body}")),
                }
            },
        )
        .await;
        assert_eq!(record["status"], "done", "{record}");
    }
}

/// A gateway served in this process on a port of its own; stopped on Drop.
#[derive(Debug)]
pub struct Gateway {
    pub url: String,
    running: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl Gateway {
    /// Serves a gateway with these flags and waits until it is healthy.
    pub async fn start(args: Vec<String>) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gateway");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let config = ebb_gateway::Config::try_parse_from(
            std::iter::once("ebb-gateway".to_owned()).chain(args),
        )
        .expect("gateway flags parse");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(err) = ebb_gateway::run(config, listener, shutdown).await {
                panic!("gateway failed: {err}");
            }
        });
        let gateway = Gateway {
            url,
            running: Some((stop, task)),
        };
        gateway.wait_healthy().await;
        gateway
    }

    async fn wait_healthy(&self) {
        let http = reqwest::Client::new();
        let url = &format!("{}/healthz", self.url);
        eventually(Duration::from_secs(20), "the gateway healthy", || async {
            match http.get(url).send().await {
                Ok(response) if response.status().is_success() => Ok(()),
                Ok(response) => Err(response.status().to_string()),
                Err(err) => Err(err.to_string()),
            }
        })
        .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            task.abort();
        }
    }
}

/// An `ebb-worker` process, killed on Drop.
#[derive(Debug)]
pub struct WorkerProcess {
    pub id: String,
    child: Option<Child>,
}

impl WorkerProcess {
    fn spawn(stack: &Stack, extra_args: &[&str], stderr: Stdio) -> WorkerProcess {
        WorkerProcess::spawn_with(stack.shared_args(Role::Worker), extra_args, stderr)
    }

    /// A tiny-model worker with `shared_args` (its logins and the queue
    /// flags it shares with the gateway; [`shared_args`]).
    pub fn spawn_with(
        shared_args: Vec<String>,
        extra_args: &[&str],
        stderr: Stdio,
    ) -> WorkerProcess {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = format!(
            "test-worker-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let child = Command::new(worker_binary())
            .args(shared_args)
            .arg("--model-dir")
            .arg(tiny_model_dir())
            .args(["--worker-id", &id])
            .args(extra_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start ebb-worker");
        WorkerProcess {
            id,
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("worker running").id()
    }

    /// Sends a signal by name (`TERM`, `KILL`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Whether the process has exited (reaped if so).
    pub fn has_exited(&mut self) -> bool {
        match &mut self.child {
            None => true,
            Some(child) => {
                let exited = child.try_wait().expect("wait").is_some();
                if exited {
                    self.child = None;
                }
                exited
            }
        }
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .expect("worker running")
                .try_wait()
                .expect("wait")
            {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker {} did not exit within {within:?}",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
