//! Two scalers of one pool: a lease in NATS KV makes exactly one active.
//! When the active one is killed the standby takes over within the lease's
//! TTL (plus a tick), adopts the workers it started and starts no
//! duplicates; a frozen active one (a stalled VM, a long pause) wakes up
//! standing by, its lease gone, and acts no more.

use std::process::Command;
use std::time::{Duration, Instant};

use ebb_nats::access::Role;
use ebb_tests::scaler::process_backend;
use ebb_tests::{ScalerProcess, Stack, StackOptions};
use serde_json::{Value, json};

const MAX_WORKERS: usize = 2;
const LEASE_TTL: Duration = Duration::from_secs(3);

fn policy() -> String {
    format!(
        "tick: 200ms\n\
         resources: {{min_instances: 0, max_instances: {MAX_WORKERS}}}\n\
         target: {{utilization: 1.0, drain_target: 2s, latency_goal: 60s, default_service_time: 1s, slots_per_worker: 1, stable_window: 5s, panic_window: 2s}}\n\
         cooldowns: {{scale_down_stabilization: 1s, scale_to_zero_idle: 30s}}\n\
         health: {{init_timeout: 30s, restart_backoff: 200ms, stop_grace: 20s}}\n"
    )
}

/// Scalers `a` and `b` of the same pool, sharing its worker records.
fn two_scalers(stack: &Stack) -> (ScalerProcess, ScalerProcess) {
    two_scalers_via(stack, None)
}

/// The same, `a` reaching NATS through the proxy on `a_port` when given.
fn two_scalers_via(stack: &Stack, a_port: Option<u16>) -> (ScalerProcess, ScalerProcess) {
    let args = |id: &str| {
        let mut args = stack.nats.login_args(Role::Scaler);
        if let (Some(port), "a") = (a_port, id) {
            args[1] = format!("nats://127.0.0.1:{port}");
        }
        args.extend(["--scaler-id", id, "--lease-ttl", "3s"].map(str::to_owned));
        args
    };
    let worker_args = ["--debug-token-delay", "40ms", "--max-batch", "1"];
    let mut config = String::new();
    let mut a = ScalerProcess::configured(args("a"), |workers| {
        config = format!(
            "{}\n{}",
            policy(),
            process_backend(stack, workers, &worker_args)
        );
        config.clone()
    });
    let mut b = ScalerProcess::configured(args("b"), |_| config.clone());
    a.restart();
    b.restart();
    (a, b)
}

fn role(status: &Value) -> &str {
    status["lease"]["role"].as_str().unwrap_or("?")
}

/// Asks `count` new questions (named by `label`) that do not wait; their ids.
async fn burst(stack: &Stack, label: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..count {
        let (code, body) = stack
            .ask(json!({"question": format!("{label} {n}?"), "max_tokens": 24, "wait_seconds": 0}))
            .await;
        assert_eq!(code, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// Waits for every id to be answered, checking all the while that the
/// pool (the worker records in `owner`'s state directory, which both
/// scalers share) never holds more live workers than its maximum.
async fn served_without_duplicates(stack: &Stack, owner: &ScalerProcess, ids: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut waiting = ids.to_vec();
    while !waiting.is_empty() {
        let workers = live(&owner.worker_pids());
        assert!(
            workers <= MAX_WORKERS,
            "{workers} workers: a duplicate start"
        );
        let mut still = Vec::new();
        for id in waiting {
            let (_, record) = stack.status_of(&id).await;
            match record["status"].as_str() {
                Some("done") => {}
                Some("failed") => panic!("{record}"),
                _ => still.push(id),
            }
        }
        waiting = still;
        assert!(Instant::now() < deadline, "unanswered: {waiting:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many of `pids` are alive.
fn live(pids: &[u32]) -> usize {
    pids.iter()
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .count()
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_a_killed_scaler_and_adopts_its_workers() {
    let stack = Stack::start(StackOptions::default()).await;
    let (mut a, b) = two_scalers(&stack);
    a.wait_status(Duration::from_secs(10), "a active", |s| role(s) == "active")
        .await;
    b.wait_status(Duration::from_secs(10), "b standing by for a", |s| {
        role(s) == "standby" && s["lease"]["holder"] == "a"
    })
    .await;
    // An override sent to the standby is refused, naming the active one.
    let refused = reqwest::Client::new()
        .post(format!("{}/scale", b.url))
        .bearer_auth(ebb_tests::ADMIN_TOKEN)
        .json(&json!({"action": "set", "count": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "standby", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains(" a"),
        "{body}"
    );

    let first = burst(&stack, "Before", 8).await;
    a.wait_status(Duration::from_secs(30), "a started workers", |s| {
        ["starting", "idle", "busy"]
            .iter()
            .any(|state| s["actual"][state].as_u64().unwrap_or(0) > 0)
    })
    .await;
    let adopted = a.worker_pids();
    a.kill();
    let killed = Instant::now();
    b.wait_status(Duration::from_secs(10), "b active", |s| role(s) == "active")
        .await;
    let takeover = killed.elapsed();
    println!("a SIGKILLed active scaler: b took over after {takeover:?}");
    assert!(
        takeover <= LEASE_TTL + Duration::from_secs(2),
        "took {takeover:?} with a {LEASE_TTL:?} lease"
    );
    // b adopted a's workers: it lists them as its own.
    let status = b
        .wait_status(Duration::from_secs(5), "b listing a's workers", |s| {
            s["workers"]
                .as_array()
                .is_some_and(|workers| !workers.is_empty())
        })
        .await;
    assert!(
        live(&adopted) > 0,
        "a's workers {adopted:?} are gone: {status}"
    );
    let second = burst(&stack, "After", 4).await;
    served_without_duplicates(&stack, &a, &[first, second].concat()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_active_scaler_wakes_up_standing_by() {
    let stack = Stack::start(StackOptions::default()).await;
    let (a, b) = two_scalers(&stack);
    a.wait_status(Duration::from_secs(10), "a active", |s| role(s) == "active")
        .await;
    let a_pid = a.pid();
    signal(a_pid, "STOP");
    b.wait_status(Duration::from_secs(10), "b active", |s| role(s) == "active")
        .await;
    let ids = burst(&stack, "Frozen", 6).await;
    signal(a_pid, "CONT");
    // a learns at its first look that its lease ran out.
    a.wait_status(Duration::from_secs(5), "a standing by for b", |s| {
        role(s) == "standby" && s["lease"]["holder"] == "b"
    })
    .await;
    served_without_duplicates(&stack, &a, &ids).await;
    assert_eq!(role(&b.status().await), "active");
}

/// Sets a manual override of `count` workers on `scaler`.
async fn set_workers(scaler: &ScalerProcess, count: u32) -> u16 {
    reqwest::Client::new()
        .post(format!("{}/scale", scaler.url))
        .bearer_auth(ebb_tests::ADMIN_TOKEN)
        .json(&json!({"action": "set", "count": count, "ttl_seconds": 600}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_scaler_cut_off_from_nats_stops_acting_and_the_standby_takes_over() {
    let stack = Stack::start(StackOptions::default()).await;
    let proxy = ebb_tests::proxy::CuttableProxy::start(stack.nats.port).await;
    let (a, b) = two_scalers_via(&stack, Some(proxy.port));
    a.wait_status(Duration::from_secs(10), "a active", |s| role(s) == "active")
        .await;
    b.wait_status(Duration::from_secs(10), "b standing by", |s| {
        role(s) == "standby"
    })
    .await;
    // a runs two workers on an override it keeps for ten minutes.
    assert_eq!(set_workers(&a, 2).await, 200);
    ebb_tests::eventually(Duration::from_secs(30), "a's two workers", || async {
        match live(&a.worker_pids()) {
            2 => Ok(()),
            n => Err(n),
        }
    })
    .await;

    proxy.cut();
    let cut = Instant::now();
    b.wait_status(Duration::from_secs(10), "b active", |s| role(s) == "active")
        .await;
    let takeover = cut.elapsed();
    println!("an active scaler cut off: b took over after {takeover:?}");
    assert!(
        takeover <= LEASE_TTL + Duration::from_secs(2),
        "took {takeover:?}"
    );
    // b wants none; a, cut off with its override of two, must not put
    // them back.
    assert_eq!(set_workers(&b, 0).await, 200);
    ebb_tests::eventually(
        Duration::from_secs(30),
        "b stopping the workers",
        || async {
            match live(&a.worker_pids()) {
                0 => Ok(()),
                n => Err(n),
            }
        },
    )
    .await;
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(4) {
        let workers = live(&a.worker_pids());
        assert_eq!(workers, 0, "the cut-off scaler started workers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = a.status().await;
    assert_eq!(role(&status), "standby", "{status}");
    proxy.heal();
    a.wait_status(Duration::from_secs(15), "a back, standing by for b", |s| {
        role(s) == "standby" && s["lease"]["holder"] == "b"
    })
    .await;
}

/// An operator's override through the gateway reaches the active scaler
/// even when the gateway lists the standby first; it never sits unused on
/// the standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_forwards_an_override_past_the_standby_to_the_active_scaler() {
    let stack = Stack::start(StackOptions::default()).await;
    let (a, b) = two_scalers(&stack);
    a.wait_status(Duration::from_secs(10), "a active", |s| role(s) == "active")
        .await;
    b.wait_status(Duration::from_secs(10), "b standing by", |s| {
        role(s) == "standby"
    })
    .await;
    let admin = "gateway-admin-token";
    let mut args = stack.shared_args(Role::Gateway);
    args.extend(
        [
            "--insecure-dev",
            "--admin-token",
            admin,
            "--scaler-url",
            &format!("{},{}", b.url, a.url),
            "--scaler-token",
            ebb_tests::ADMIN_TOKEN,
        ]
        .map(str::to_owned),
    );
    let gateway = ebb_tests::stack::Gateway::start(args).await;
    let answer = reqwest::Client::new()
        .post(format!("{}/admin/scale", gateway.url))
        .bearer_auth(admin)
        .json(&json!({"action": "set", "count": 1, "ttl_seconds": 60}))
        .send()
        .await
        .unwrap();
    let code = answer.status().as_u16();
    assert_eq!(code, 200, "{}", answer.text().await.unwrap());
    a.wait_status(Duration::from_secs(10), "a holding the override", |s| {
        s["manual_override"].is_object()
    })
    .await;
    assert!(b.status().await["manual_override"].is_null());
}
