//! Workers that cannot start, end to end with the process backend, real
//! NATS and Redis: the scaler's `/status` says why in the worker's own
//! words (its last lines of output), counts the crashes in a row, keeps the
//! question queued, and counts the restarts apart from activations.

use std::time::Duration;

use ebb_tests::{ScalerProcess, Stack, StackOptions, TempDir};
use serde_json::{Value, json};

/// Restarts come quickly (200 ms, doubling), so a few crashes fit a test.
const CRASH_LOOP: &str = r#"
tick: 200ms
resources: {min_instances: 0, max_instances: 1}
target: {utilization: 1.0, drain_target: 2s, latency_goal: 60s, default_service_time: 1s, stable_window: 5s, panic_window: 2s}
cooldowns: {scale_down_stabilization: 1s, scale_to_zero_idle: 60s}
health: {init_timeout: 30s, restart_backoff: 200ms, stop_grace: 5s}
"#;

fn losses(status: &Value) -> &[Value] {
    status["losses"].as_array().map_or(&[], Vec::as_slice)
}

fn samples(status: &Value, key: &str) -> usize {
    status[key].as_array().map_or(0, Vec::len)
}

/// The value of a `/metrics` series, 0 if absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_start_says_why_in_status_and_its_question_stays_queued() {
    let stack = Stack::start(StackOptions::default()).await;
    let scratch = TempDir::new("no-model");
    let missing = scratch.path().join("missing-model-dir");
    let scaler = ScalerProcess::start_with_model(&stack, CRASH_LOOP, &missing, &[]);

    let (code, body) = stack
        .ask(json!({"question": "Why is the sky blue?", "max_tokens": 8, "wait_seconds": 0}))
        .await;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();

    // Three crashes in a row, each with the worker's own last words.
    let status = scaler
        .wait_status(Duration::from_secs(60), "three crashes in a row", |s| {
            s["crashes_in_a_row"].as_u64() >= Some(3)
                && losses(s).len() >= 3
                && losses(s).iter().all(|l| l["exit_status"].is_string())
        })
        .await;
    let text = status.to_string();
    assert!(
        !text.contains("sky blue"),
        "no question text in /status: {text}"
    );
    let crashes: Vec<&Value> = losses(&status).iter().collect();
    for (n, lost) in crashes.iter().enumerate() {
        let lines: Vec<&str> = lost["last_output"]
            .as_array()
            .unwrap_or_else(|| panic!("loss {n} has no last output: {lost}"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            lines.iter().any(|l| l.contains("missing-model-dir")),
            "the worker's own error names the missing directory: {lines:#?}"
        );
        assert!(
            lines.iter().all(|l| !l.contains('\u{1b}')),
            "colour codes are stripped: {lines:?}"
        );
        assert!(lost["why"].as_str().unwrap().contains("exited"), "{lost}");
        assert_eq!(lost["crashes_in_a_row"].as_u64(), Some(n as u64 + 1));
        assert!(lost["backoff_ms"].as_u64().unwrap() >= 200, "{lost}");
    }
    if let Some(error) = crashes.iter().find_map(|l| l["error"].as_str()) {
        // Workers that publish a `failed` heartbeat: its error is shown too.
        assert!(error.contains("missing-model-dir"), "{error}");
    }

    // Only the first start was an activation from zero; the rest restarts.
    assert_eq!(samples(&status, "activation_delays_ms"), 1, "{status}");
    assert!(samples(&status, "restart_delays_ms") >= 2, "{status}");
    for delay in status["restart_delays_ms"].as_array().unwrap() {
        assert!(delay.as_f64().unwrap() >= 200.0, "after a backoff: {delay}");
    }
    assert!(
        status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["state"] != "ready"),
        "{status}"
    );

    // The question is still queued, not lost with the workers.
    let (code, record) = stack.status_of(&id).await;
    assert_eq!(
        (code, record["status"].as_str()),
        (200, Some("queued")),
        "{record}"
    );
    assert!(status["signals"]["lag"].as_u64() >= Some(1), "{status}");

    let metrics = scaler.metrics().await;
    assert_eq!(
        sample(&metrics, "ebb_scaler_activation_delay_seconds_count "),
        1.0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "ebb_scaler_restart_delay_seconds_count ") >= 2.0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "ebb_scaler_worker_crashes_in_a_row ") >= 3.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_shows_its_start_phases_in_status_and_the_scaler_their_percentiles() {
    let stack = Stack::start(StackOptions::default()).await;
    let scaler = ScalerProcess::start(&stack, CRASH_LOOP, &[]);
    let (code, body) = stack
        .ask(json!({"question": "What is 2 + 2?", "max_tokens": 4, "wait_seconds": 0}))
        .await;
    assert_eq!(code, 202, "{body}");
    let status = scaler
        .wait_status(Duration::from_secs(60), "a ready worker", |s| {
            s["workers"].as_array().is_some_and(|w| {
                w.iter()
                    .any(|w| w["state"] == "ready" || w["state"] == "busy")
            })
        })
        .await;
    let worker = &status["workers"][0];
    let phases: Vec<&str> = worker["start_phases"]
        .as_array()
        .unwrap_or_else(|| panic!("no start phases: {worker}"))
        .iter()
        .filter_map(|p| p["phase"].as_str())
        .collect();
    assert!(
        phases.contains(&"weights") && phases.contains(&"tokenizer"),
        "{worker}"
    );
    let status = scaler
        .wait_status(Duration::from_secs(10), "cold-start percentiles", |s| {
            s["cold_starts"]["samples"].as_u64() >= Some(1)
        })
        .await;
    let cold = &status["cold_starts"];
    assert!(cold["p90_ms"].as_f64().is_some(), "{cold}");
    assert!(
        cold["p90_without_download_ms"].as_f64() <= cold["p90_ms"].as_f64(),
        "{cold}"
    );
    assert!(cold["phase_p90_ms"]["weights"].as_f64().is_some(), "{cold}");
    assert_eq!(samples(&status, "activation_delays_ms"), 1, "{status}");
    assert_eq!(samples(&status, "restart_delays_ms"), 0, "{status}");
    let metrics = scaler.metrics().await;
    assert!(
        sample(
            &metrics,
            "ebb_scaler_worker_start_phase_seconds_count{phase=\"weights\"} "
        ) >= 1.0,
        "{metrics}"
    );
}
