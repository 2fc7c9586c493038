//! docker-compose projects for tests, removed with their volumes and the
//! scaler's worker containers on Drop (also when the test fails).

use std::path::Path;
use std::process::Command;

use crate::servers::free_port;

use ebb_scaler::pool::docker::POOL_LABEL;

/// The repository's root (where the compose files are).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `docker-compose -f <files>... config`: the merged configuration as
/// compose reads it (panics, with compose's error, if it is invalid).
pub fn merged_config(files: &[&str]) -> String {
    let mut command = Command::new("docker-compose");
    command.current_dir(repo_root());
    for file in files {
        command.args(["-f", file]);
    }
    let merged = command.arg("config").output().expect("docker-compose runs");
    assert!(
        merged.status.success(),
        "{}",
        String::from_utf8_lossy(&merged.stderr)
    );
    String::from_utf8_lossy(&merged.stdout).into_owned()
}

/// The trimmed stdout of a command (empty when it fails).
pub fn output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect("runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs docker-compose for one project with the test's environment.
#[derive(Debug)]
pub struct Compose {
    pub project: String,
    /// `compose.yaml` or `compose.cluster.yaml`.
    pub file: &'static str,
    pub env: Vec<(String, String)>,
}

impl Compose {
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker-compose")
            .current_dir(repo_root())
            .args(["-f", self.file, "-p", &self.project])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("docker-compose runs")
    }

    pub fn worker_containers(&self) -> String {
        output(
            "docker",
            &[
                "ps",
                "-aq",
                "--filter",
                &format!("label={POOL_LABEL}={}", self.project),
            ],
        )
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        // Workers belong to the scaler, not to compose: stop the scaler (or
        // it may start one more), remove its workers, or the network cannot
        // go, and only then the project.
        let _ = self.run(&["stop", "-t", "5", "scaler"]);
        let workers = self.worker_containers();
        if !workers.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(workers.lines())
                .output();
        }
        let _ = self.run(&["down", "-v", "--remove-orphans"]);
    }
}

/// A secret `credentials` wrote into `volume`.
pub fn secret_in(volume: &str, file: &str) -> String {
    let mountpoint = output(
        "docker",
        &["volume", "inspect", "-f", "{{.Mountpoint}}", volume],
    );
    let secret = std::fs::read_to_string(format!("{mountpoint}/{file}"))
        .unwrap_or_else(|err| panic!("{file} in {volume}: {err}"));
    let secret = secret.trim().to_owned();
    assert_eq!(secret.len(), 32, "a generated secret");
    secret
}

/// Where a project's workers find NATS and Redis: `EBB_NATS_URL` and the
/// Redis variable (`EBB_REDIS_URL` or `EBB_REDIS_SENTINELS`) with its value.
#[derive(Debug, Clone, Copy)]
pub struct Services<'a> {
    pub nats_url: &'a str,
    pub redis: (&'a str, &'a str),
}

impl Services<'_> {
    /// compose.yaml's: one NATS server, one Redis.
    pub const SINGLE: Services<'static> = Services {
        nats_url: "nats://nats:4222",
        redis: ("EBB_REDIS_URL", "redis://redis:6379"),
    };
    /// compose.cluster.yaml's: three NATS nodes, Redis behind Sentinels.
    pub const CLUSTER: Services<'static> = Services {
        nats_url: "nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222",
        redis: (
            "EBB_REDIS_SENTINELS",
            "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379",
        ),
    };
}

/// A project of `file` whose scaler runs tiny-model worker containers
/// (a fresh copy of the model in `dir`, workers given `services`), on free
/// host ports: returns it with its gateway and scaler ports.
pub fn tiny_project(
    project: &str,
    file: &'static str,
    services: Services,
    dir: &Path,
) -> (Compose, u16, u16) {
    // A fresh copy: the shared test model may predate world-readable weights.
    let model = dir.join("tiny");
    ebb_worker::tiny::write_random_model(
        &model,
        ebb_worker::tiny::Shape::TINY,
        42,
        candle_core::DType::F32,
    )
    .expect("write the tiny model");
    let config = dir.join("scaler.yaml");
    std::fs::write(
        &config,
        tiny_docker_scaler_config(project, &model, services),
    )
    .expect("write the scaler config");
    let (gateway_port, scaler_port) = (free_port(), free_port());
    let compose = Compose {
        project: project.to_owned(),
        file,
        env: vec![
            (
                "EBB_SCALER_CONFIG_FILE".into(),
                config.display().to_string(),
            ),
            ("EBB_NETWORK".into(), project.to_owned()),
            ("EBB_MODEL".into(), "ebb/tiny-qwen2".into()),
            ("EBB_GATEWAY_PORT".into(), gateway_port.to_string()),
            ("EBB_SCALER_PORT".into(), scaler_port.to_string()),
            ("EBB_NATS_MONITOR_PORT".into(), free_port().to_string()),
        ],
    };
    (compose, gateway_port, scaler_port)
}

/// A scaler config whose Docker backend runs tiny-model workers (the model
/// in `model`, mounted read-only) on the project's network, reaching NATS
/// and Redis as `services` says.
fn tiny_docker_scaler_config(project: &str, model: &std::path::Path, services: Services) -> String {
    let Services {
        nats_url,
        redis: (redis_variable, redis),
    } = services;
    format!(
        "tick: 200ms\nresources: {{min_instances: 0, max_instances: 1}}\n\
         target: {{stable_window: 3s, panic_window: 2s, default_service_time: 1s}}\n\
         cooldowns: {{scale_down_stabilization: 1s, scale_to_zero_idle: 3s}}\n\
         backend:\n  kind: docker\n  image: ebb-worker:latest\n  network: {project}\n  pool: {project}\n\
         \x20 env: {{EBB_NATS_URL: \"{nats_url}\", {redis_variable}: \"{redis}\", EBB_MODEL: ebb/tiny-qwen2, EBB_MODEL_DIR: /model, HF_HUB_OFFLINE: \"1\",\n\
         \x20   EBB_NATS_USER: ebb-worker, EBB_NATS_PASSWORD_FILE: /run/ebb/nats-password, EBB_REDIS_USER: ebb-worker, EBB_REDIS_PASSWORD_FILE: /run/ebb/redis-password}}\n\
         \x20 volumes: [\"{}:/model:ro\", \"{project}-worker-credentials:/run/ebb:ro\"]\n",
        model.display()
    )
}
