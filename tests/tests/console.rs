//! The scaler's console in headless Chromium (Debian's package) against a
//! live stack: tiny-model workers of the process backend, real NATS and
//! Redis. After a burst, the page shows it in the depth plot, the worker
//! it started and the decision with its reason; the page's script
//! refreshes the panels; nothing is requested from another origin. A
//! screenshot is left at `target/console/console.png`.

use std::time::Duration;

use ebb_tests::chromium;
use ebb_tests::{ScalerProcess, Stack, StackOptions};
use serde_json::{Value, json};

/// A policy whose one timetable window opens six hours from now: inside
/// the console's next-24-hours strip, never active during the test (a
/// fixed hour made the test fail whenever CI ran inside it).
fn console_policy() -> String {
    let opens = chrono::Utc::now() + chrono::Duration::hours(6);
    format!(
        r#"
tick: 200ms
resources: {{min_instances: 0, max_instances: 2, price_per_hour: 3.6}}
target: {{utilization: 1.0, drain_target: 2s, latency_goal: 30s, default_service_time: 1s, stable_window: 5s, panic_window: 2s}}
cooldowns: {{scale_down_stabilization: 2s, scale_to_zero_idle: 5m}}
health: {{init_timeout: 30s, restart_backoff: 200ms, stop_grace: 20s}}
timetable:
  - name: homework
    cron: "0 {hour} * * *"
    timezone: UTC
    duration: 2h
    min_workers: 1
"#,
        hour = chrono::Timelike::hour(&opens)
    )
}

/// Chromium serializes text with `<`, `>` and `&` escaped.
fn unescape(html: &str) -> String {
    html.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

/// The largest `max N` in the legends of the section `id`.
fn legend_max(dom: &str, id: &str, line: &str) -> Option<f64> {
    let start = dom.find(&format!("id=\"{id}\""))?;
    let section = &dom[start..];
    let section = &section[..section.find("</section>")?];
    section
        .match_indices(&format!("{line} · now "))
        .filter_map(|(at, _)| {
            let rest = &section[at..];
            let max = rest.split(" · max ").nth(1)?;
            max.split('<').next()?.trim().parse().ok()
        })
        .reduce(f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_burst_the_worker_it_started_and_why() {
    let stack = Stack::start(StackOptions::default()).await;
    let scaler = ScalerProcess::start(
        &stack,
        &console_policy(),
        &["--debug-token-delay", "80ms", "--max-batch", "1"],
    );
    scaler
        .wait_status(Duration::from_secs(10), "zero workers at rest", |s| {
            s["desired"] == 0
        })
        .await;
    // A burst two workers need seconds to answer: the queue holds it for
    // several of the console's one-second samples. (Eight: the gateway
    // sheds past what two one-slot workers answer within its goal.)
    let mut ids = Vec::new();
    for n in 0..8 {
        let (code, body) = stack
            .ask(json!({"question": format!("Console burst {n}?"), "max_tokens": 20, "wait_seconds": 0}))
            .await;
        assert_eq!(code, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        let status = stack.wait_terminal(id, Duration::from_secs(90)).await;
        assert_eq!(status["status"], "done", "{status}");
    }
    // One more sample after the last answer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status: Value = scaler.status().await;
    let worker = status["workers"][0]["id"]
        .as_str()
        .expect("a worker runs")
        .to_owned();
    let decision = status["decisions"][0].clone();
    assert_eq!(decision["from"], 0, "{status}");

    let origin = scaler.url.clone();
    let page = chromium::load(&origin, &format!("{origin}/console?hours=1"), 4_000);
    let dom = unescape(&page.dom);

    let burst = legend_max(&dom, "queue", "normal").expect("the depth plot's legend");
    assert!(burst >= 4.0, "the depth plot shows the burst: max {burst}");
    assert!(
        legend_max(&dom, "traffic", "arrivals").is_some_and(|max| max >= 1.0),
        "arrivals plotted"
    );
    assert!(
        legend_max(&dom, "traffic", "first token p50").is_some_and(|max| max > 0.0),
        "first-token latency plotted from the workers' reports"
    );
    assert!(dom.contains(&worker), "the new worker {worker} is listed");
    let reason = decision["reason"].as_str().unwrap();
    assert!(
        dom.contains(&format!("0 → {}", decision["to"])) && dom.contains(reason),
        "the decision and its reason `{reason}` are shown"
    );
    assert!(
        dom.contains("homework"),
        "the timetable strip names its entry"
    );
    assert!(dom.contains("worker-hours ="), "the cost is priced");
    assert!(
        dom.contains("data-refreshes=\""),
        "the page's script fetched the panels again"
    );

    assert!(
        page.requested
            .iter()
            .any(|url| url.ends_with("/console/panels?hours=1")),
        "the refresh is in the net log: {:?}",
        page.requested
    );
    let elsewhere: Vec<_> = page
        .requested
        .iter()
        .filter(|url| !url.starts_with(&format!("{origin}/")))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "requests off the page's origin: {elsewhere:?}"
    );

    let shots = ebb_tests::stack::target_dir().join("../console");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("console.png");
    chromium::screenshot(
        &format!("{origin}/console?hours=1"),
        &png,
        (1300, 2300),
        2_000,
    );
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "a PNG screenshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_with_a_strict_policy_and_nothing_from_elsewhere() {
    let stack = Stack::start(StackOptions::default()).await;
    let scaler = ScalerProcess::start(&stack, &console_policy(), &[]);
    for path in [
        "/console",
        "/console/panels",
        "/console/console.js",
        "/console/console.css",
    ] {
        let response = reqwest::get(format!("{}{path}", scaler.url)).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let csp = response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
            "{path}: {csp}"
        );
        let body = response.text().await.unwrap();
        for outside in ["http://", "https://", "//cdn", "@import"] {
            let stray = body
                .match_indices(outside)
                .map(|(at, _)| &body[at..(at + 40).min(body.len())])
                // The SVG namespace names a document type, it loads nothing.
                .find(|found| !found.starts_with("http://www.w3.org/"));
            assert!(stray.is_none(), "{path} refers elsewhere: {stray:?}");
        }
    }
    // A login with a wrong token is refused; the right one sets the cookie.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = |token: &'static str| {
        client
            .post(format!("{}/console/login", scaler.url))
            .form(&[("token", token)])
            .send()
    };
    assert_eq!(login("guess").await.unwrap().status(), 401);
    let signed_in = login(ebb_tests::ADMIN_TOKEN).await.unwrap();
    assert_eq!(signed_in.status(), 303);
    let cookie = signed_in.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(ebb_tests::ADMIN_TOKEN),
        "the cookie holds a digest: {cookie}"
    );
}
