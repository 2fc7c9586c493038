//! The scaler end to end with the process backend, real NATS, Redis and
//! tiny-model workers: from zero to max and back to zero, timetable
//! pre-warm, restart adoption, crash replacement and the admin API.

use std::process::Command;
use std::time::Duration;

use chrono::{Timelike, Utc};
use ebb_nats::access::Role;
use ebb_nats::{QueueConfig, Topology};
use ebb_tests::{
    ADMIN_TOKEN, NatsServer, ScalerProcess, Stack, StackOptions, eventually, scaler_binary,
};
use serde_json::{Value, json};

const ELASTIC: &str = r#"
tick: 200ms
resources: {min_instances: 0, max_instances: 3}
target: {utilization: 1.0, drain_target: 2s, latency_goal: 60s, default_service_time: 1s, stable_window: 5s, panic_window: 2s}
cooldowns: {scale_down_stabilization: 1s, scale_to_zero_idle: 3s}
health: {init_timeout: 30s, restart_backoff: 200ms, stop_grace: 20s}
"#;

/// `count` distinct questions at once; their ids.
async fn ask_burst(stack: &Stack, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..count {
        let (code, body) = stack
            .ask(json!({"question": format!("Burst question {n}?"), "max_tokens": 20, "wait_seconds": 0}))
            .await;
        assert_eq!(code, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    ids
}

fn workers(status: &Value, state: &str) -> u64 {
    status["actual"][state].as_u64().unwrap_or(0)
}

fn running(status: &Value) -> u64 {
    ["starting", "idle", "busy", "draining", "unhealthy"]
        .iter()
        .map(|s| workers(status, s))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_scales_from_zero_to_max_answers_everything_and_returns_to_zero() {
    let stack = Stack::start(StackOptions::default()).await;
    // One question at a time per worker: the backlog is the burst itself,
    // however fast the first workers start and take questions.
    let scaler = ScalerProcess::start(
        &stack,
        ELASTIC,
        &["--debug-token-delay", "40ms", "--max-batch", "1"],
    );
    let idle = scaler
        .wait_status(Duration::from_secs(10), "zero workers at rest", |s| {
            s["desired"] == 0
        })
        .await;
    assert_eq!(running(&idle), 0);

    let ids = ask_burst(&stack, 12).await;
    let started = scaler
        .wait_status(Duration::from_secs(5), "a worker started", |s| {
            !s["activation_delays_ms"].as_array().unwrap().is_empty()
        })
        .await;
    let activation_ms = started["activation_delays_ms"][0].as_f64().unwrap();
    assert!(
        activation_ms < 1000.0,
        "first worker start issued {activation_ms} ms after the first question"
    );

    scaler
        .wait_status(
            Duration::from_secs(10),
            "scaled to max under backlog",
            |s| s["desired"] == 3,
        )
        .await;
    for id in &ids {
        let record = stack.wait_terminal(id, Duration::from_secs(120)).await;
        assert_eq!(record["status"], "done", "{record}");
    }
    let asleep = scaler
        .wait_status(
            Duration::from_secs(60),
            "back to zero running workers",
            |s| s["desired"] == 0 && running(s) == 0,
        )
        .await;
    let reasons: Vec<&str> = asleep["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["reason"].as_str())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("idle ") && r.ends_with("-> 0")),
        "{reasons:?}"
    );
    assert!(
        scaler.worker_pids().is_empty(),
        "every worker process exited"
    );

    let metrics = scaler.metrics().await;
    assert!(
        metrics.contains("ebb_scaler_desired_workers 0"),
        "{metrics}"
    );
    // The activation above is in the histogram, in a bucket under 1 s.
    let sample = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        sample("ebb_scaler_activation_delay_seconds_count ") >= 1.0,
        "{metrics}"
    );
    assert!(
        sample("ebb_scaler_activation_delay_seconds_bucket{le=\"1.0\"} ") >= 1.0,
        "{metrics}"
    );
}

/// The same 12-question burst on workers of `slots` slots (the scaler told
/// so until their heartbeats say it): the most workers running at once.
/// Every question must be answered and the fleet must return to zero.
async fn burst_peak_workers(slots: u32) -> u64 {
    let stack = Stack::start(StackOptions::default()).await;
    let policy = format!(
        "tick: 200ms\n\
         resources: {{min_instances: 0, max_instances: 6}}\n\
         target: {{utilization: 1.0, drain_target: 2s, latency_goal: 60s, default_service_time: 1s, slots_per_worker: {slots}, stable_window: 5s, panic_window: 2s}}\n\
         cooldowns: {{scale_down_stabilization: 1s, scale_to_zero_idle: 3s}}\n\
         health: {{init_timeout: 30s, restart_backoff: 200ms, stop_grace: 20s}}\n"
    );
    let slots_arg = slots.to_string();
    let worker_args = ["--debug-token-delay", "40ms", "--max-batch", &slots_arg];
    let scaler = ScalerProcess::start(&stack, &policy, &worker_args);
    scaler
        .wait_status(Duration::from_secs(10), "zero workers at rest", |s| {
            s["desired"] == 0
        })
        .await;
    let ids = ask_burst(&stack, 12).await;
    let mut peak = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut unanswered = ids.clone();
    while !unanswered.is_empty() {
        peak = peak.max(running(&scaler.status().await));
        let mut still = Vec::new();
        for id in unanswered {
            let (_, record) = stack.status_of(&id).await;
            match record["status"].as_str() {
                Some("done") => {}
                Some("failed") => panic!("{record}"),
                _ => still.push(id),
            }
        }
        unanswered = still;
        assert!(
            std::time::Instant::now() < deadline,
            "unanswered: {unanswered:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every burst question has the same system prompt: the workers' prefix
    // caches saved its prefill, and the scaler's /metrics says so.
    let metrics = scaler.metrics().await;
    let saved: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("ebb_scaler_worker_prefill_tokens_saved_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(saved > 0.0, "no prefill saved: {metrics}");
    scaler
        .wait_status(
            Duration::from_secs(60),
            "back to zero running workers",
            |s| s["desired"] == 0 && running(s) == 0,
        )
        .await;
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_workers_meet_a_burst_with_fewer_workers() {
    let one_slot = burst_peak_workers(1).await;
    let four_slots = burst_peak_workers(4).await;
    assert!(
        four_slots < one_slot,
        "workers of 4 slots peaked at {four_slots}, of 1 slot at {one_slot}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timetable_window_prewarms_workers_before_it_opens() {
    let stack = Stack::start(StackOptions::default()).await;
    // The next minute boundary at least 15 s away opens a 1-minute window; the
    // lead makes pre-warm start ~3 s from now.
    let now = Utc::now();
    let mut opens =
        now.with_second(0).unwrap().with_nanosecond(0).unwrap() + chrono::Duration::minutes(1);
    if (opens - now).num_seconds() < 15 {
        opens += chrono::Duration::minutes(1);
    }
    let lead = (opens - now).num_seconds() - 3;
    let policy = format!(
        "{ELASTIC}prewarm_lead: {lead}s\ntimetable:\n  - {{name: period-1, cron: \"{} {} * * *\", timezone: UTC, duration: 1m, min_workers: 2}}\n",
        opens.minute(),
        opens.hour()
    );
    let scaler = ScalerProcess::start(&stack, &policy, &[]);
    let warm = scaler
        .wait_status(Duration::from_secs(30), "two ready workers", |s| {
            workers(s, "idle") == 2
        })
        .await;
    assert!(
        Utc::now() < opens,
        "ready before the window opens at {opens}"
    );
    assert_eq!(warm["reason"], "timetable floor 'period-1' 2");
    assert_eq!(warm["timetable_floor"]["name"], "period-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaler_started_before_the_queue_answers_healthz_at_once_naming_what_it_waits_for() {
    let nats = NatsServer::start();
    let scaler = ScalerProcess::start_before_the_queue(nats.login_args(Role::Scaler), ELASTIC);
    let (code, body) = scaler.healthz().await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "starting");
    let waiting_for = body["waiting_for"].as_str().unwrap_or_default();
    assert!(
        waiting_for.contains("question stream") || waiting_for.contains("NATS"),
        "{body}"
    );
    // What the gateway does at its start.
    let client = nats.client().await;
    Topology::ensure(client, &QueueConfig::default())
        .await
        .expect("create the streams");
    let scaler = &scaler;
    let body = eventually(
        Duration::from_secs(20),
        "the scaler healthy",
        || async move {
            let (code, body) = scaler.healthz().await;
            if code == 200 { Ok(body) } else { Err(body) }
        },
    )
    .await;
    assert_eq!(body["status"], "healthy");
}

async fn scale(scaler: &ScalerProcess, token: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/scale", scaler.url))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Long cooldowns (nothing scales down by itself during the test) and a
/// short init timeout (adopted workers are older than it).
const STEADY: &str = r#"
tick: 200ms
resources: {min_instances: 0, max_instances: 3}
cooldowns: {scale_down_stabilization: 10m, scale_to_zero_idle: 10m}
health: {init_timeout: 2s, restart_backoff: 200ms, stop_grace: 20s}
"#;

fn ids(status: &Value) -> Vec<String> {
    let mut ids: Vec<String> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaler_adopts_its_workers_replaces_crashed_ones_and_obeys_overrides() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut scaler = ScalerProcess::start(&stack, STEADY, &[]);

    // Admin API: authentication and validation first.
    let (code, body) = scale(&scaler, None, r#"{"action":"set","count":2}"#).await;
    assert_eq!(
        (code, body["error"]["type"].as_str()),
        (401, Some("unauthorized"))
    );
    let (code, _) = scale(&scaler, Some("wrong"), r#"{"action":"set","count":2}"#).await;
    assert_eq!(code, 401);
    for (bad, field) in [
        (r#"{"action":"sideways"}"#, "action"),
        (r#"{"action":"set"}"#, "count"),
        (r#"{"action":"set","count":-1}"#, "count"),
        (r#"{"action":"up","ttl_seconds":0}"#, "ttl_seconds"),
    ] {
        let (code, body) = scale(&scaler, Some(ADMIN_TOKEN), bad).await;
        assert_eq!(
            (code, body["error"]["field"].as_str()),
            (422, Some(field)),
            "{bad}: {body}"
        );
    }
    let (code, body) = scale(&scaler, Some(ADMIN_TOKEN), "not json").await;
    assert_eq!(
        (code, body["error"]["type"].as_str()),
        (400, Some("invalid_json"))
    );

    // Two workers by override, with a TTL.
    let (code, body) = scale(
        &scaler,
        Some(ADMIN_TOKEN),
        r#"{"action":"set","count":2,"ttl_seconds":4}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let two = scaler
        .wait_status(Duration::from_secs(30), "two workers by override", |s| {
            workers(s, "idle") == 2
        })
        .await;
    assert!(
        two["reason"]
            .as_str()
            .unwrap()
            .starts_with("manual override 2"),
        "{two}"
    );
    let before = ids(&two);
    let pids = scaler.worker_pids();
    assert_eq!(pids.len(), 2);
    scaler
        .wait_status(Duration::from_secs(10), "the override expired", |s| {
            s["manual_override"].is_null()
        })
        .await;

    // A restarted scaler (its override gone, older workers than init_timeout)
    // adopts both and stops neither: scale-down waits for the cooldowns.
    scaler.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    scaler.restart();
    let adopted = scaler
        .wait_status(Duration::from_secs(15), "both adopted", |s| {
            workers(s, "idle") == 2
        })
        .await;
    assert_eq!(ids(&adopted), before);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = scaler.status().await;
    assert_eq!(
        (later["desired"].as_u64(), workers(&later, "idle")),
        (Some(2), 2),
        "{later}"
    );
    assert_eq!(
        scaler.worker_pids().len(),
        2,
        "nothing stopped, nothing new started"
    );

    // A worker killed behind the scaler's back is replaced.
    Command::new("kill")
        .args(["-KILL", &pids[0].to_string()])
        .status()
        .unwrap();
    let replaced = scaler
        .wait_status(Duration::from_secs(30), "a replacement", |s| {
            workers(s, "idle") == 2 && ids(s) != before
        })
        .await;
    assert_eq!(
        ids(&replaced)
            .iter()
            .filter(|id| before.contains(id))
            .count(),
        1
    );
}

#[test]
fn a_bad_config_exits_non_zero_naming_the_key() {
    let dir = ebb_tests::TempDir::new("bad-config");
    let path = dir.path().join("scaler.yaml");
    std::fs::write(
        &path,
        "resources: {min_instances: 5, max_instances: 2}\nbackend: {kind: process}\n",
    )
    .unwrap();
    for args in [
        vec!["check-config", path.to_str().unwrap()],
        vec!["--config", path.to_str().unwrap()],
    ] {
        let output = Command::new(scaler_binary()).args(&args).output().unwrap();
        assert!(!output.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("resources.min_instances"),
            "{args:?}: {stderr}"
        );
    }
    std::fs::write(&path, "resources: {min_instances: 0, max_instances: 2}\nbackend: {kind: process}\ntimetable:\n  - {name: x, cron: \"0 8 * * 1-5\", timezone: Europe/Atlantis, duration: 1h, min_workers: 1}\n").unwrap();
    let output = Command::new(scaler_binary())
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("timetable[0].timezone"));
    let output = Command::new(scaler_binary()).output().unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--config"),
        "a missing config is named"
    );
}

#[test]
fn the_timetable_command_prints_local_and_utc_times() {
    let dir = ebb_tests::TempDir::new("timetable-cmd");
    let path = dir.path().join("scaler.yaml");
    std::fs::write(
        &path,
        "resources: {min_instances: 0, max_instances: 4}\nbackend: {kind: process}\ntimetable:\n  - {name: morning-classes, cron: \"50 7 * * 1-5\", timezone: Asia/Shanghai, duration: 90m, min_workers: 2}\n",
    )
    .unwrap();
    let output = Command::new(scaler_binary())
        .args(["timetable", path.to_str().unwrap(), "--days", "7"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        5,
        "five weekday windows in any 7 days:\n{text}"
    );
    for line in lines {
        assert!(
            line.contains("07:50 -> 09:20 Asia/Shanghai")
                && line.contains("(")
                && line.contains("23:50 -> 01:20 UTC"),
            "{line}"
        );
    }
}

#[test]
fn the_readme_config_example_is_valid() {
    let example = ebb_tests::readme_block_after("or seconds):\n\n```yaml\n");
    let dir = ebb_tests::TempDir::new("readme-config");
    let path = dir.path().join("scaler.yaml");
    std::fs::write(&path, example).unwrap();
    let output = Command::new(scaler_binary())
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
