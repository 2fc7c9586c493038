//! ebb's metrics in a real Prometheus (Debian's package): `promtool`
//! accepts `deploy/prometheus/`, Prometheus scrapes a live gateway and
//! scaler, and the "questions waiting with no worker" alert fires while an
//! override holds the scaler at zero. The Grafana dashboard and the alert
//! rules use only names ebb exports.

use std::collections::BTreeSet;
use std::time::Duration;

use ebb_tests::prometheus::{Prometheus, deploy_dir, promtool};
use ebb_tests::stack::metrics_of;
use ebb_tests::{ScalerProcess, Stack, StackOptions, eventually};
use serde_json::{Value, json};

const AT_ZERO: &str = r#"
tick: 200ms
resources: {min_instances: 0, max_instances: 2}
target: {latency_goal: 30s, stable_window: 5s, panic_window: 2s}
cooldowns: {scale_down_stabilization: 1s, scale_to_zero_idle: 3s}
health: {init_timeout: 30s, restart_backoff: 200ms}
"#;

const NO_WORKER_ALERT: &str = "EbbQuestionsWaitingWithNoWorker";

fn read(relative: &str) -> String {
    let path = deploy_dir().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The alert rules with `alert`'s `for` shortened to a second, its
/// expression as shipped.
fn rules_with_quick(alert: &str) -> String {
    let rules = read("alerts.yml");
    let at = rules
        .find(&format!("alert: {alert}"))
        .expect("the alert is in the rules");
    let (before, after) = rules.split_at(at);
    let for_at = after.find("for: ").expect("the alert waits a while");
    let line_end = for_at + after[for_at..].find('\n').unwrap();
    format!("{before}{}for: 1s{}", &after[..for_at], &after[line_end..])
}

/// Names a query can use, from the `# TYPE` lines of OpenMetrics text.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|suffix| format!("{name}{suffix}")));
    }
    names
}

/// The `ebb_` and `ebb:` names a text's queries use.
fn names_used(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("ebb_") || word.starts_with("ebb:"))
        .map(str::to_owned)
        .collect()
}

async fn live_stack() -> (Stack, ScalerProcess) {
    let stack = Stack::start(StackOptions::default()).await;
    let scaler = ScalerProcess::start(&stack, AT_ZERO, &[]);
    (stack, scaler)
}

#[test]
fn promtool_accepts_the_scrape_config_and_the_alert_rules() {
    let (ok, output) = promtool(&["check", "config", "prometheus.yml"]);
    assert!(ok, "{output}");
    let (ok, output) = promtool(&["check", "rules", "alerts.yml"]);
    assert!(ok && output.contains("SUCCESS"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_live_stack_and_the_no_worker_alert_fires_at_zero() {
    let (stack, scaler) = live_stack().await;
    // Held at zero: an operator's override.
    scaler.hold_at_zero().await;
    let (code, body) = stack
        .ask(json!({"question": "Who holds the workers?", "wait_seconds": 0}))
        .await;
    assert_eq!(code, 202, "{body}");

    let host = |url: &str| url.trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(
        &[
            ("ebb-gateway", host(&stack.gateway_url)),
            ("ebb-scaler", host(&scaler.url)),
        ],
        &rules_with_quick(NO_WORKER_ALERT),
    );
    prometheus.wait_targets_up(2, Duration::from_secs(60)).await;

    let firing = eventually(
        Duration::from_secs(60),
        "the no-worker alert firing",
        || async {
            let alerts = prometheus.api("alerts").await?;
            let alerts = alerts["alerts"].as_array().cloned().unwrap_or_default();
            alerts
                .iter()
                .find(|a| a["labels"]["alertname"] == NO_WORKER_ALERT && a["state"] == "firing")
                .cloned()
                .ok_or_else(|| Value::Array(alerts).to_string())
        },
    )
    .await;
    assert_eq!(firing["labels"]["severity"], "page", "{firing}");
    assert_eq!(
        firing["value"].as_str().map(str::parse::<f64>),
        Some(Ok(1.0))
    );
    let status = scaler.status().await;
    assert!(
        status["workers"].as_array().unwrap().is_empty(),
        "held at zero: {status}"
    );

    // The SLO rules read the 10 s bucket: Prometheus holds it under that label.
    let bucket = prometheus
        .api("query?query=ebb_worker_response_seconds_bucket%7Ble%3D%2210.0%22%7D")
        .await
        .unwrap();
    assert_eq!(
        bucket["result"].as_array().map(Vec::len),
        Some(1),
        "{bucket}"
    );
    // Nothing else is wrong with this stack.
    let alerts = prometheus.api("alerts").await.unwrap();
    let others: Vec<&Value> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["labels"]["alertname"] != NO_WORKER_ALERT)
        .collect();
    assert!(others.is_empty(), "{others:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alert_rules_use_only_names_ebb_exports() {
    let (stack, scaler) = live_stack().await;
    // One question through a worker the scaler starts: every labelled
    // series (a language, a decision's reason, start phases) has a value.
    let (code, body) = stack
        .ask(
            json!({"question": "What does a metric measure?", "max_tokens": 5, "wait_seconds": 60}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    scaler
        .wait_status(
            Duration::from_secs(10),
            "the worker's cold start counted",
            |s| s["cold_starts"]["samples"].as_u64() > Some(0),
        )
        .await;
    let mut exported = exported_names(&metrics_of(&stack.gateway_url).await);
    exported.extend(exported_names(&metrics_of(&scaler.url).await));
    for name in &exported {
        assert!(
            name.starts_with("ebb_"),
            "{name}: every name has ebb's prefix"
        );
    }

    let rules = read("alerts.yml");
    let recorded: BTreeSet<String> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- record: "))
        .map(|name| name.trim().to_owned())
        .collect();
    assert!(!recorded.is_empty());
    let dashboard: Value = serde_json::from_str(&read("../grafana/ebb-dashboard.json")).unwrap();
    let queries: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .map(|target| target["expr"].as_str().unwrap())
        .collect();
    assert!(queries.len() >= 15, "{} queries", queries.len());

    for (file, used) in [
        ("alerts.yml", names_used(&rules)),
        ("ebb-dashboard.json", names_used(&queries.join("\n"))),
    ] {
        let unknown: Vec<&String> = used
            .iter()
            .filter(|name| !exported.contains(*name) && !recorded.contains(*name))
            .collect();
        assert!(
            unknown.is_empty(),
            "{file} uses names ebb does not export: {unknown:?}"
        );
        assert!(used.len() >= 5, "{file}: {used:?}");
    }
    // The histograms the issue asks for are exported and on the dashboard.
    let shown = names_used(&queries.join("\n"));
    for histogram in [
        "ebb_worker_first_token_seconds_bucket",
        "ebb_worker_queue_wait_seconds_bucket",
        "ebb_worker_inference_seconds_bucket",
        "ebb_worker_cold_start_seconds_bucket",
    ] {
        assert!(
            shown.contains(histogram),
            "{histogram} is not on the dashboard"
        );
    }
}
