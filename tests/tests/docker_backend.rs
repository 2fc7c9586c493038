//! The scaler's Docker backend on the real Docker engine: it starts, lists,
//! drains and removes only the containers of its own pool, and a new pool
//! instance (a restarted scaler) adopts the survivors.
//!
//! Needs a Docker engine; `scripts/test` skips these tests, saying so, when
//! `docker info` fails. The image is built from local artefacts (the static
//! busybox of Debian's busybox-static), since no registry can be reached.

use std::process::Command;
use std::time::{Duration, Instant};

use ebb_control::config::DockerBackendConfig;
use ebb_scaler::pool::docker::{DockerPool, POOL_LABEL};
use ebb_scaler::pool::{Phase, PoolWorker, WorkerPool};
use ebb_tests::TempDir;

const IMAGE: &str = "ebb-test-busybox:1";

fn docker(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A scratch image holding only a static busybox, imported from a tarball.
fn ensure_test_image() {
    if Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return;
    }
    let root = TempDir::new("busybox-root");
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("busybox-static is installed (apt-get install busybox-static)");
    for applet in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    let tar = format!(
        "tar -C {} -c . | docker import - {IMAGE}",
        root.path().display()
    );
    let status = Command::new("sh").args(["-c", &tar]).status().unwrap();
    assert!(status.success(), "docker import failed");
}

/// Removes every container of a pool (and any extra names) when dropped.
struct Cleanup {
    pool: String,
    names: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let filter = format!("label={POOL_LABEL}={}", self.pool);
        let ids = Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output();
        let mut targets: Vec<String> = ids
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        targets.extend(self.names.iter().cloned());
        if !targets.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&targets)
                .output();
        }
    }
}

fn config(pool: &str) -> DockerBackendConfig {
    serde_norway_config(&format!(
        "image: {IMAGE}\npool: {pool}\ncommand: [\"/bin/sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 0.2; done\"]\nenv: {{EBB_NATS_URL: nats://nowhere:4222}}\n"
    ))
}

fn serde_norway_config(yaml: &str) -> DockerBackendConfig {
    let config = ebb_control::config::ScalerConfig::parse(&format!(
        "resources: {{min_instances: 0, max_instances: 2}}\nbackend:\n  kind: docker\n{}",
        yaml.lines()
            .map(|line| format!("  {line}\n"))
            .collect::<String>()
    ))
    .expect("valid docker backend config");
    match config.backend {
        ebb_control::config::BackendConfig::Docker(docker) => docker,
        other => panic!("expected the docker backend, got {other:?}"),
    }
}

async fn wait_for(
    pool: &mut DockerPool,
    what: &str,
    done: impl Fn(&[PoolWorker]) -> bool,
) -> Vec<PoolWorker> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = pool.list().await.expect("list");
        if done(&listed) {
            return listed;
        }
        assert!(
            Instant::now() < deadline,
            "never reached: {what}; last: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn docker_backend_manages_only_its_own_containers_and_adopts_them() {
    ensure_test_image();
    let pool_name = format!("test{}{}", std::process::id(), ebb_nats::now_ms() % 100_000);
    let foreign = format!("ebb-foreign-{pool_name}");
    let other_pool = format!("ebb-other-pool-{pool_name}");
    let _cleanup = Cleanup {
        pool: pool_name.clone(),
        names: vec![foreign.clone(), other_pool.clone()],
    };
    // Containers the backend must never touch: one unlabelled, one of another pool.
    docker(&["run", "-d", "--name", &foreign, IMAGE, "sleep", "600"]);
    docker(&[
        "run",
        "-d",
        "--name",
        &other_pool,
        "--label",
        &format!("{POOL_LABEL}=someone-else"),
        IMAGE,
        "sleep",
        "600",
    ]);

    let mut pool = DockerPool::connect(config(&pool_name), Duration::from_secs(10))
        .await
        .expect("engine reachable");
    let first = pool.start().await.expect("start");
    let second = pool.start().await.expect("start");
    let listed = wait_for(&mut pool, "two running", |l| {
        l.len() == 2 && l.iter().all(|w| w.phase == Phase::Running)
    })
    .await;
    let mut ids: Vec<&str> = listed.iter().map(|w| w.id.as_str()).collect();
    ids.sort();
    let mut expected = [first.as_str(), second.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    let env = docker(&[
        "inspect",
        "-f",
        "{{json .Config.Env}}",
        &format!("ebb-{first}"),
    ]);
    assert!(
        env.contains(&format!("EBB_WORKER_ID={first}"))
            && env.contains("EBB_NATS_URL=nats://nowhere:4222"),
        "{env}"
    );
    // Locked down (issue 14): no capabilities, no privilege escalation,
    // bounded processes.
    let host = docker(&[
        "inspect",
        "-f",
        "{{json .HostConfig.CapDrop}} {{json .HostConfig.SecurityOpt}} {{.HostConfig.PidsLimit}}",
        &format!("ebb-{first}"),
    ]);
    assert_eq!(
        host.trim(),
        r#"["ALL"] ["no-new-privileges:true"] 512"#,
        "{host}"
    );

    // Graceful stop: SIGTERM, the container exits by itself and is removed.
    pool.stop(&first).await.expect("stop");
    pool.stop(&first).await.expect("stopping twice is a no-op");
    let listed = wait_for(&mut pool, "the first exited on request", |l| {
        l.iter().any(|w| {
            w.id == first
                && matches!(
                    w.phase,
                    Phase::Exited {
                        requested: true,
                        ..
                    }
                )
        })
    })
    .await;
    assert!(
        listed
            .iter()
            .any(|w| w.id == second && w.phase == Phase::Running)
    );
    assert!(
        docker(&["ps", "-aq", "--filter", &format!("name=ebb-{first}")]).is_empty(),
        "removed"
    );

    // A restarted scaler adopts the survivor.
    let mut adopted = DockerPool::connect(config(&pool_name), Duration::from_secs(10))
        .await
        .unwrap();
    let listed = adopted.list().await.unwrap();
    assert_eq!(
        listed.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(),
        vec![second.as_str()]
    );
    adopted.stop(&second).await.unwrap();
    wait_for(&mut adopted, "the second gone", |l| {
        l.iter()
            .all(|w| w.id != second || matches!(w.phase, Phase::Exited { .. }))
    })
    .await;

    for untouched in [&foreign, &other_pool] {
        assert_eq!(
            docker(&["inspect", "-f", "{{.State.Running}}", untouched]),
            "true",
            "{untouched} left alone"
        );
    }
}

#[tokio::test]
async fn docker_backend_names_a_missing_image() {
    let mut config = config("missing-image");
    config.image = "ebb-no-such-image:never".into();
    let mut pool = DockerPool::connect(config, Duration::from_secs(1))
        .await
        .expect("engine reachable");
    let err = pool.start().await.expect_err("no such image");
    let message = err.to_string();
    assert!(
        message.contains("ebb-no-such-image:never") && message.contains("not found"),
        "{message}"
    );
}

#[test]
fn docker_readme_backend_example_is_valid() {
    let example = ebb_tests::readme_block_after("```yaml\nbackend:\n  kind: docker\n");
    let yaml = example
        .lines()
        .map(|line| line.trim_start_matches("  "))
        .collect::<Vec<_>>()
        .join("\n");
    let config = serde_norway_config(&yaml);
    assert_eq!(config.image, "ebb-worker:latest");
    assert!(matches!(
        config.gpus,
        Some(ebb_control::config::GpuRequest::Count { count: 1 })
    ));
}

#[tokio::test]
async fn docker_backend_explains_gpus_without_a_gpu_runtime() {
    ensure_test_image();
    let pool_name = format!("gpu{}", std::process::id());
    let _cleanup = Cleanup {
        pool: pool_name.clone(),
        names: Vec::new(),
    };
    let mut config = config(&pool_name);
    config.gpus = Some(ebb_control::config::GpuRequest::Count { count: 1 });
    let mut pool = DockerPool::connect(config, Duration::from_secs(1))
        .await
        .unwrap();
    match pool.start().await {
        // This engine has no NVIDIA runtime: the error must say what to install.
        Err(err) => assert!(
            err.to_string().contains("NVIDIA container runtime"),
            "{err}"
        ),
        // A machine with GPUs starts it; then it must be a labelled container of the pool.
        Ok(id) => assert_eq!(
            pool.list()
                .await
                .unwrap()
                .iter()
                .filter(|w| w.id == id)
                .count(),
            1
        ),
    }
}

#[tokio::test]
async fn docker_backend_keeps_the_last_output_of_a_crashed_container() {
    ensure_test_image();
    let pool_name = format!(
        "crash{}{}",
        std::process::id(),
        ebb_nats::now_ms() % 100_000
    );
    let _cleanup = Cleanup {
        pool: pool_name.clone(),
        names: Vec::new(),
    };
    let mut config = config(&pool_name);
    config.command = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        "i=0; while [ $i -lt 30 ]; do echo line $i; i=$((i+1)); done; echo 'cannot download config.json from huggingface.co' >&2; exit 1".into(),
    ]);
    let mut pool = DockerPool::connect(config, Duration::from_secs(10))
        .await
        .expect("engine reachable");
    let id = pool.start().await.expect("start");
    let listed = wait_for(&mut pool, "the container exited", |l| {
        l.iter()
            .any(|w| w.id == id && matches!(w.phase, Phase::Exited { .. }))
    })
    .await;
    let exit = listed.into_iter().find(|w| w.id == id).unwrap();
    let Phase::Exited {
        status,
        requested,
        last_output,
    } = exit.phase
    else {
        unreachable!()
    };
    assert!(!requested);
    assert!(status.contains("Exited (1)"), "{status}");
    assert_eq!(last_output.len(), ebb_scaler::pool::LAST_OUTPUT_LINES);
    // The engine keeps stdout and stderr apart: their order may differ.
    assert!(
        last_output
            .iter()
            .any(|l| l == "cannot download config.json from huggingface.co"),
        "{last_output:?}"
    );
    assert!(
        last_output.contains(&"line 29".to_owned()),
        "{last_output:?}"
    );
    assert!(
        !last_output.contains(&"line 5".to_owned()),
        "only the last lines"
    );
    assert!(
        docker(&["ps", "-aq", "--filter", &format!("name=ebb-{id}")]).is_empty(),
        "removed after its logs were read"
    );
}
