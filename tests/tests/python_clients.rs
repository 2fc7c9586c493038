//! Clients in another language, from PyPI: the `openai` client against the
//! OpenAI-compatible routes, `nats-py` speaking the queue contract directly,
//! and schemathesis checking every response against `/openapi.json`.
//!
//! The Python environment is `target/pyenv` (scripts/test makes it with
//! pinned versions) or the interpreter named by `EBB_PYTHON`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ebb_tests::{Stack, StackOptions, TempDir};

const KEY: &str = "sk-python-test";

fn python() -> PathBuf {
    let python = std::env::var_os("EBB_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python")
        });
    assert!(
        python.exists(),
        "{} is missing: run scripts/test (it installs openai, nats-py and schemathesis there) or set EBB_PYTHON",
        python.display()
    );
    python
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// A stack that wants `KEY`, with one tiny-model worker ready.
async fn keyed_stack(dir: &TempDir) -> (Stack, ebb_tests::WorkerProcess) {
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "api_keys:\n  - name: python\n    sha256: {}\n",
            ebb_gateway::auth::hex_digest(KEY)
        ),
    )
    .unwrap();
    let options = StackOptions::with_gateway_args(&[
        "--config",
        config.to_str().unwrap(),
        "--rate-limit-per-ip",
        "1000000",
    ]);
    let stack = Stack::start(options).await;
    let worker = stack.worker(&[]);
    stack.wait_ready(&worker).await;
    (stack, worker)
}

/// Runs a program to completion (on tokio: the gateway shares this runtime).
async fn run(program: &Path, args: &[&str], env: &[(&str, String)], within: Duration) -> String {
    let mut command = tokio::process::Command::new(program);
    command.args(args).kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(within, command.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} {args:?} did not finish in {within:?}",
                program.display()
            )
        })
        .expect("the program starts");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} {args:?} failed ({}):\n{stdout}\n{stderr}",
        program.display(),
        output.status
    );
    stdout
}

#[tokio::test]
async fn the_openai_python_client_chats_streams_and_gets_typed_errors() {
    let dir = TempDir::new("openai");
    let (stack, _worker) = keyed_stack(&dir).await;
    let env = [
        ("EBB_URL", stack.gateway_url.clone()),
        ("EBB_KEY", KEY.to_owned()),
        ("EBB_MODEL", ebb_tests::stack::TINY_MODEL.to_owned()),
    ];
    let script = script("openai_client.py");
    let out = run(
        &python(),
        &[script.to_str().unwrap()],
        &env,
        Duration::from_secs(180),
    )
    .await;
    assert!(out.contains("openai client: ok"), "{out}");
}

#[tokio::test]
async fn nats_py_publishes_a_job_in_the_documented_schema_and_gets_the_answer() {
    let dir = TempDir::new("nats-py");
    let (stack, _worker) = keyed_stack(&dir).await;
    let env = [
        ("EBB_NATS_URL", stack.nats.operator_url()),
        (
            "EBB_MODEL_IDENTITY",
            format!(
                "{}@{}",
                ebb_tests::stack::TINY_MODEL,
                ebb_tests::stack::TINY_REVISION
            ),
        ),
    ];
    let script = script("nats_contract.py");
    let out = run(
        &python(),
        &[script.to_str().unwrap()],
        &env,
        Duration::from_secs(120),
    )
    .await;
    assert!(out.contains("nats-py contract: ok"), "{out}");
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_response_off_the_document() {
    let dir = TempDir::new("schemathesis");
    let (stack, _worker) = keyed_stack(&dir).await;
    let st = python().with_file_name("st");
    let schema = format!("{}/openapi.json", stack.gateway_url);
    let auth = format!("Authorization: Bearer {KEY}");
    let out = run(
        &st,
        &[
            "run",
            &schema,
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--header",
            &auth,
            "--max-examples",
            "25",
            "--phases",
            "examples,coverage,fuzzing",
            "--seed",
            "1",
            "--request-timeout",
            "150",
            "--no-color",
            // Model ids hold `/`: most generated path values are filtered out.
            "--suppress-health-check",
            "filter_too_much",
        ],
        &[("SCHEMATHESIS_HOOKS", String::new())],
        Duration::from_secs(600),
    )
    .await;
    println!("{out}");
}
