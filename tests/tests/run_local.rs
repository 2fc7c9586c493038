//! `scripts/run-local` as a new user runs it, on this build's binaries
//! (`EBB_BIN_DIR`) and free ports: no worker until a question comes, one
//! started for it and stopped after the idle window, nothing left behind
//! after SIGTERM (the scaler's workers included); a part that cannot start
//! stops it with a non-zero exit and a message naming the part.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ebb_tests::{TempDir, eventually, free_port, worker_binary};
use serde_json::{Value, json};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/run-local")
}

/// This build's binaries (`target/debug`).
fn bin_dir() -> PathBuf {
    worker_binary()
        .parent()
        .expect("the worker binary has a directory")
        .to_path_buf()
}

#[derive(Debug)]
struct Ports {
    gateway: u16,
    scaler: u16,
    nats: u16,
    nats_monitor: u16,
    redis: u16,
}

impl Ports {
    fn free() -> Ports {
        Ports {
            gateway: free_port(),
            scaler: free_port(),
            nats: free_port(),
            nats_monitor: free_port(),
            redis: free_port(),
        }
    }
}

/// A running `scripts/run-local`, its output in a file.
#[derive(Debug)]
struct RunLocal {
    child: Option<Child>,
    state: TempDir,
    output: PathBuf,
    ports: Ports,
}

impl RunLocal {
    /// Starts the script with `env` on top of the test's settings.
    fn start(env: &[(&str, &str)]) -> RunLocal {
        RunLocal::start_in(Ports::free(), bin_dir(), env)
    }

    fn start_in(ports: Ports, bin: PathBuf, env: &[(&str, &str)]) -> RunLocal {
        let state = TempDir::new("run-local");
        let output = state.path().with_extension("output");
        let log = std::fs::File::create(&output).expect("create the output file");
        let child = Command::new(script())
            .env("EBB_BIN_DIR", &bin)
            .env("EBB_LOCAL_STATE", state.path())
            .env("EBB_GATEWAY_PORT", ports.gateway.to_string())
            .env("EBB_SCALER_PORT", ports.scaler.to_string())
            .env("EBB_NATS_PORT", ports.nats.to_string())
            .env("EBB_NATS_MONITOR_PORT", ports.nats_monitor.to_string())
            .env("EBB_REDIS_PORT", ports.redis.to_string())
            // Far away: no pre-warmed worker muddles "none until asked".
            .env("EBB_LOCAL_WINDOW_MINUTES", "600")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(env.iter().copied())
            // Its own group, so a failed test can still stop all of it.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the output file"))
            .stderr(log)
            .spawn()
            .expect("run scripts/run-local");
        RunLocal {
            child: Some(child),
            state,
            output,
            ports,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().expect("wait for the script"))
    }

    /// Waits until the script says everything runs.
    async fn wait_running(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.output().contains("ebb is running") {
            if let Some(status) = self.exited() {
                panic!("run-local exited ({status}):\n{}", self.output());
            }
            assert!(
                Instant::now() < deadline,
                "run-local not running within 120 s:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the script to exit on its own.
    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "run-local did not exit within {within:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("the script runs").id();
        let status = Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid} failed");
    }

    fn scaler_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports.scaler)
    }

    fn gateway_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports.gateway)
    }

    async fn scaler_status(&self) -> Value {
        reqwest::get(self.scaler_url("/status"))
            .await
            .expect("the scaler answers")
            .json()
            .await
            .expect("status JSON")
    }

    /// Polls the scaler's `/status` until `done` holds.
    async fn wait_status(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let done = &done;
        eventually(Duration::from_secs(90), what, || async move {
            let status = self.scaler_status().await;
            if done(&status) {
                Ok(status)
            } else {
                Err(status)
            }
        })
        .await
    }

    /// Pids in the scaler's worker records.
    fn recorded_workers(&self) -> Vec<u32> {
        let dir = self.state.path().join("scaler").join("local");
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "json"))
            .filter_map(|entry| std::fs::read(entry.path()).ok())
            .filter_map(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .filter_map(|record| record["pid"].as_u64().map(|pid| pid as u32))
            .collect()
    }

    /// Live processes of this run: those that inherited its
    /// `EBB_LOCAL_STATE`, or name its state directory or one of its ports
    /// on their command line.
    fn leftovers(&self) -> Vec<String> {
        let state = self.state.path().display().to_string();
        let marker = format!("EBB_LOCAL_STATE={state}");
        let ports = [
            self.ports.gateway,
            self.ports.scaler,
            self.ports.nats,
            self.ports.redis,
        ];
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
            let path = entry.path();
            let Some(pid) = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == std::process::id() || is_zombie(&path) {
                continue;
            }
            let environ = std::fs::read(path.join("environ")).unwrap_or_default();
            let cmdline =
                String::from_utf8_lossy(&std::fs::read(path.join("cmdline")).unwrap_or_default())
                    .replace('\0', " ");
            let inherited = environ
                .split(|byte| *byte == 0)
                .any(|variable| variable == marker.as_bytes());
            let named = cmdline.contains(&state)
                || ports.iter().any(|port| {
                    cmdline.contains(&format!(":{port} ")) || cmdline.contains(&format!(" {port} "))
                });
            if inherited || named {
                found.push(format!("{pid}: {cmdline}"));
            }
        }
        found
    }

    /// Waits (briefly: killed processes take a moment to go) until none is left.
    async fn assert_nothing_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "processes left behind:\n{}\noutput:\n{}",
                left.join("\n"),
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn is_zombie(proc_dir: &Path) -> bool {
    std::fs::read_to_string(proc_dir.join("status"))
        .unwrap_or_default()
        .lines()
        .any(|line| line.starts_with("State:") && line.contains('Z'))
}

impl Drop for RunLocal {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A failed test: let the script clean up, then make sure.
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.wait();
        }
        for line in self.leftovers() {
            if let Some((pid, _)) = line.split_once(':') {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = std::fs::remove_file(&self.output);
    }
}

fn workers(status: &Value) -> usize {
    status["workers"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread")]
async fn run_local_starts_a_worker_for_a_question_stops_it_when_idle_and_leaves_nothing() {
    let mut run = RunLocal::start(&[("EBB_SCALE_TO_ZERO_IDLE", "2s")]);
    run.wait_running().await;
    let banner = run.output();
    for shown in [
        format!("localhost:{}/v1/questions", run.ports.gateway),
        format!("localhost:{}/status", run.ports.scaler),
        "stops after 2s".to_owned(),
    ] {
        assert!(banner.contains(&shown), "no `{shown}` in:\n{banner}");
    }
    let idle = run.scaler_status().await;
    assert_eq!(
        (idle["desired"].as_u64(), workers(&idle)),
        (Some(0), 0),
        "{idle}"
    );

    let http = reqwest::Client::new();
    // Each question new: a cached answer would start no worker.
    let (http, asked) = (&http, run.gateway_url("/v1/questions"));
    let asked = &asked;
    let ask = move |question: &'static str| async move {
        let response = http
            .post(asked)
            .json(&json!({"question": question, "max_tokens": 4, "wait_seconds": 0}))
            .send()
            .await
            .expect("the gateway answers");
        assert_eq!(response.status().as_u16(), 202);
        let body: Value = response.json().await.expect("JSON");
        body["id"].as_str().expect("an id").to_owned()
    };
    let id = ask("Why is the sky blue?").await;
    run.wait_status("a worker started for the question", |s| workers(s) == 1)
        .await;
    let pids = run.recorded_workers();
    assert_eq!(pids.len(), 1, "one worker record: {pids:?}");
    let record = eventually(Duration::from_secs(60), "the answer", || async {
        let record: Value = reqwest::get(run.gateway_url(&format!("/v1/questions/{id}")))
            .await
            .expect("the gateway answers")
            .json()
            .await
            .expect("JSON");
        if record["status"] == "done" {
            Ok(record)
        } else {
            Err(record)
        }
    })
    .await;
    assert!(
        !record["answer"].as_str().unwrap_or_default().is_empty(),
        "{record}"
    );

    run.wait_status("the worker stopped after the idle window", |s| {
        s["desired"] == 0 && workers(s) == 0
    })
    .await;
    // The script tells as it sees it (it looks every second).
    eventually(
        Duration::from_secs(10),
        "the script reporting both",
        || async {
            let output = run.output();
            if output.contains("started (log:") && output.contains(" stopped\n") {
                Ok(())
            } else {
                Err(output)
            }
        },
    )
    .await;
    assert!(
        !Path::new(&format!("/proc/{}", pids[0])).exists(),
        "worker {} still runs",
        pids[0]
    );

    // Stopped while a worker runs: the scaler leaves its workers behind,
    // the script must not.
    ask("Why is the grass green?").await;
    run.wait_status("a worker for the second question", |s| workers(s) == 1)
        .await;
    assert_eq!(run.recorded_workers().len(), 1);
    run.signal("TERM");
    let status = run.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}:\n{}", run.output());
    run.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn run_local_names_the_part_that_cannot_start_and_exits_non_zero() {
    // A binary missing from EBB_BIN_DIR.
    let partial = TempDir::new("partial-bin");
    for binary in ["ebb-gateway", "ebb-worker"] {
        std::os::unix::fs::symlink(bin_dir().join(binary), partial.path().join(binary))
            .expect("link a binary");
    }
    let mut run = RunLocal::start_in(Ports::free(), partial.path().to_path_buf(), &[]);
    let status = run.wait_exit(Duration::from_secs(60)).await;
    let output = run.output();
    assert!(!status.success(), "{output}");
    assert!(output.contains("ebb-scaler is missing"), "{output}");

    // The gateway's port taken by someone else.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let ports = Ports {
        gateway: taken.local_addr().expect("address").port(),
        ..Ports::free()
    };
    let mut run = RunLocal::start_in(ports, bin_dir(), &[]);
    let status = run.wait_exit(Duration::from_secs(60)).await;
    let output = run.output();
    assert!(!status.success(), "{output}");
    let named = format!("port {} for the gateway is in use", run.ports.gateway);
    assert!(output.contains(&named), "{output}");
    assert!(output.contains("EBB_GATEWAY_PORT"), "{output}");
    run.assert_nothing_left().await;

    // The gateway failing after NATS and Redis started: they are stopped.
    let config = partial.path().join("gateway.yaml");
    std::fs::write(&config, "api_keys: [not, a, key]\n").expect("write a config");
    let mut run = RunLocal::start(&[("EBB_GATEWAY_CONFIG", &config.display().to_string())]);
    let status = run.wait_exit(Duration::from_secs(120)).await;
    let output = run.output();
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("the gateway exited while starting"),
        "{output}"
    );
    assert!(output.contains("gateway.log"), "{output}");
    run.assert_nothing_left().await;
}

#[test]
fn the_local_scaler_config_is_valid_and_scales_worker_processes_to_zero() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/scaler.local.yaml");
    let config = ebb_control::config::ScalerConfig::load(&path).expect("a valid config");
    assert_eq!(config.resources.min_instances, 0);
    assert!(matches!(
        config.backend,
        ebb_control::config::BackendConfig::Process(_)
    ));
    assert_eq!(config.timetable_entries.len(), 1, "the sample window");
}
