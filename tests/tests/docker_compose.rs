//! `compose.yaml` end to end on the real Docker engine, offline: images from
//! `scripts/build-images`, the tiny model mounted read-only. A question to the
//! gateway makes the scaler create a worker container, the answer arrives,
//! and after the idle window the container is gone; `docker-compose down -v`
//! leaves nothing behind, also when the test fails.
//!
//! `scripts/test` builds the images first, and skips this test, saying so,
//! when no Docker engine answers.

use std::process::Command;
use std::time::{Duration, Instant};

use ebb_tests::cluster::require_image;
use ebb_tests::compose::{Compose, Services, output, repo_root, secret_in, tiny_project};
use ebb_tests::{TempDir, eventually};
use serde_json::{Value, json};

const IMAGES: [&str; 6] = [
    "ebb-gateway",
    "ebb-worker",
    "ebb-scaler",
    "ebb-credentials",
    "ebb-nats",
    "ebb-redis",
];

async fn get_json(url: &str) -> Option<(u16, Value)> {
    let response = reqwest::get(url).await.ok()?;
    let code = response.status().as_u16();
    Some((code, response.json().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_compose_runs_the_stack_and_scales_workers_from_zero_and_back() {
    for image in IMAGES {
        require_image(image);
    }
    let started = Instant::now();
    let project = format!("ebbtest{}", std::process::id());
    let dir = TempDir::new("compose");
    let (compose, gateway_port, scaler_port) =
        tiny_project(&project, "compose.yaml", Services::SINGLE, dir.path());
    let up = compose.run(&["up", "-d", "--no-build"]);
    assert!(
        up.status.success(),
        "compose up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let gateway = format!("http://127.0.0.1:{gateway_port}");
    let healthz = &format!("{gateway}/healthz");
    eventually(
        Duration::from_secs(60),
        "the gateway healthy",
        || async move {
            match get_json(healthz).await {
                Some((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(
        compose.worker_containers().is_empty(),
        "no worker before the first question"
    );
    // Monitoring (in-flight question ids) and the scaler's API are bound to
    // this host only (issue 14); the gateway is the public door.
    for (service, port) in [("nats", "8222"), ("scaler", "9090")] {
        let published = compose.run(&["port", service, port]);
        let bound = String::from_utf8_lossy(&published.stdout);
        assert!(
            bound.trim().starts_with("127.0.0.1:"),
            "{service}:{port} published on {bound:?}"
        );
    }

    let response = reqwest::Client::new()
        .post(format!("{gateway}/v1/questions"))
        // The demo key of deploy/gateway.yaml.
        .bearer_auth("ebb-local-demo-key")
        .json(&json!({"question": "Why is the sky blue?", "max_tokens": 8, "wait_seconds": 60}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "done", "{body}");
    assert!(
        !compose.worker_containers().is_empty(),
        "the scaler created a worker container"
    );
    // The admin routes work with the token `credentials` made.
    let admin = secret_in(&format!("{project}_operator-credentials"), "admin-token");
    let queue = reqwest::Client::new()
        .get(format!("{gateway}/admin/queue"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert_eq!(queue.status().as_u16(), 200);

    let compose_ref = &compose;
    eventually(
        Duration::from_secs(60),
        "the worker container gone",
        || async move {
            let left = compose_ref.worker_containers();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;
    let (_, status) = get_json(&format!("http://127.0.0.1:{scaler_port}/status"))
        .await
        .expect("scaler status");
    assert_eq!(status["desired"], 0, "{status}");
    // The gateway forwards /admin/scale with the scaler token both read
    // from their volumes.
    let forwarded = reqwest::Client::new()
        .post(format!("{gateway}/admin/scale"))
        .bearer_auth(secret_in(
            &format!("{project}_operator-credentials"),
            "admin-token",
        ))
        .json(&json!({"action": "set", "count": 0, "ttl_seconds": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        forwarded.status().as_u16(),
        200,
        "{:?}",
        forwarded.text().await
    );
    no_secret_in_inspect(&compose);

    drop(compose);
    let leftovers = [
        output(
            "docker",
            &["ps", "-aq", "--filter", &format!("name={project}")],
        ),
        output(
            "docker",
            &[
                "network",
                "ls",
                "-q",
                "--filter",
                &format!("name={project}"),
            ],
        ),
        output(
            "docker",
            &["volume", "ls", "-q", "--filter", &format!("name={project}")],
        ),
    ];
    assert!(
        leftovers.iter().all(String::is_empty),
        "left behind: {leftovers:?}"
    );
    println!(
        "compose end-to-end took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The secrets `credentials` wrote are in no container's config.
fn no_secret_in_inspect(compose: &Compose) {
    let password = secret_in(
        &format!("{}-worker-credentials", compose.project),
        "nats-password",
    );
    let admin = secret_in(
        &format!("{}_operator-credentials", compose.project),
        "admin-token",
    );
    let containers = output(
        "docker",
        &[
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", compose.project),
        ],
    );
    assert!(containers.lines().count() >= 5, "{containers}");
    let mut inspect = Command::new("docker");
    inspect.arg("inspect").args(containers.lines());
    let described = String::from_utf8(inspect.output().unwrap().stdout).unwrap();
    assert!(
        !described.contains(&password),
        "a password in docker inspect"
    );
    assert!(
        !described.contains(&admin),
        "the admin token in docker inspect"
    );
    assert!(described.contains("EBB_NATS_PASSWORD_FILE=/run/ebb/nats-password"));
}

#[test]
fn docker_compose_gpu_override_switches_the_scaler_config_and_worker_image() {
    let text = ebb_tests::compose::merged_config(&["compose.yaml", "compose.gpu.yaml"]);
    assert_eq!(
        text.matches(":/etc/ebb/scaler.yaml:ro").count(),
        1,
        "one scaler config:\n{text}"
    );
    assert!(
        text.contains("deploy/scaler.gpu.yaml:/etc/ebb/scaler.yaml:ro"),
        "{text}"
    );
    assert!(
        text.contains("target: worker-cuda") && text.contains("ebb-worker:cuda"),
        "{text}"
    );
    let config =
        ebb_control::config::ScalerConfig::load(&repo_root().join("deploy/scaler.gpu.yaml"))
            .expect("valid");
    assert!(
        matches!(config.backend, ebb_control::config::BackendConfig::Docker(ref docker) if docker.gpus.is_some())
    );
    ebb_control::config::ScalerConfig::load(&repo_root().join("deploy/scaler.cpu.yaml"))
        .expect("valid");
}
