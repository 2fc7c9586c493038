//! Learned timetable profiles survive a scaler restart: a `learn` window
//! (every other minute, for a minute) learns from real questions on real
//! NATS, Redis and tiny-model workers; the scaler keeps the profile in the
//! NATS KV bucket `ebb_scaler_state`, is killed outright, restarts, and
//! `/status` shows the same profile again.

use std::time::Duration;

use ebb_tests::{ScalerProcess, Stack, StackOptions, eventually};
use serde_json::{Value, json};

const LEARNING: &str = r#"
tick: 200ms
resources: {min_instances: 0, max_instances: 2}
target: {utilization: 1.0, drain_target: 2s, latency_goal: 60s, default_service_time: 1s, stable_window: 10s, panic_window: 2s}
cooldowns: {scale_down_stabilization: 1s, scale_to_zero_idle: 3s}
prewarm_lead: 1s
timetable:
  - {name: lesson, cron: "*/2 * * * *", timezone: UTC, duration: 1m, min_workers: 0, learn: true}
health: {init_timeout: 30s, restart_backoff: 200ms, stop_grace: 20s}
"#;

/// Every minute the `lesson` window learned, in its opening being watched
/// and its last finished one.
fn learned_minutes(learned: &Value) -> Vec<u64> {
    let opening = &learned["openings"]["lesson"]["profile"];
    let finished = &learned["profiles"]["lesson"];
    [opening, finished]
        .into_iter()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(Value::as_u64)
        .collect()
}

/// The profile arrays (opening, then finished) of `lesson`.
fn profiles(learned: &Value) -> Vec<Value> {
    [
        learned["openings"]["lesson"]["profile"].clone(),
        learned["profiles"]["lesson"].clone(),
    ]
    .into_iter()
    .filter(|profile| !profile.is_null())
    .collect()
}

/// The learned profiles the scaler saved in NATS KV.
async fn saved(nats: &ebb_tests::NatsServer) -> Option<Value> {
    let client = nats.operator().connect(nats.url()).await.ok()?;
    let store = async_nats::jetstream::new(client)
        .get_key_value("ebb_scaler_state")
        .await
        .ok()?;
    let bytes = store.get("learned.test").await.ok()??;
    serde_json::from_slice(&bytes).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_profiles_are_shown_again_after_a_restart() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut scaler = ScalerProcess::start(&stack, LEARNING, &[]);

    // Questions until an opening of the window has learned that it needed
    // a worker (at most one whole 2-minute cycle, plus a cold start).
    let mut asked = 0;
    let learned = eventually(Duration::from_secs(200), "a learned profile", || {
        asked += 1;
        let question = json!({"question": format!("Learning question {asked}?"), "max_tokens": 4, "wait_seconds": 0});
        let (stack, scaler) = (&stack, &scaler);
        async move {
            let (code, body) = stack.ask(question).await;
            assert_eq!(code, 202, "{body}");
            let status = scaler.status().await;
            let learned = status["learned"].clone();
            if learned_minutes(&learned).iter().any(|&workers| workers > 0) {
                Ok(learned)
            } else {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Err(learned)
            }
        }
    })
    .await;
    assert!(
        learned["openings"]["lesson"]["start"].is_string(),
        "{learned}"
    );

    // Once the stable window has forgotten the questions the profile stops
    // changing; within the save interval NATS holds what /status shows.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let nats = &stack.nats;
    let kept = eventually(
        Duration::from_secs(30),
        "the profile saved in NATS KV",
        || {
            let scaler = &scaler;
            async move {
                let shown = scaler.status().await["learned"].clone();
                match saved(nats).await {
                    Some(saved) if saved == shown => Ok(saved),
                    other => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        Err(json!({"saved": other, "shown": shown}))
                    }
                }
            }
        },
    )
    .await;
    let peak = learned_minutes(&kept).into_iter().max().unwrap_or(0);
    assert!(peak > 0, "{kept}");

    // Killed outright, then restarted on the same config.
    scaler.kill();
    scaler.restart();
    let after = scaler
        .wait_status(Duration::from_secs(15), "a first decision", |s| {
            !s["updated_at"].is_null()
        })
        .await["learned"]
        .clone();
    // The same profiles; a new opening starting meanwhile only files the
    // watched one as finished.
    for profile in profiles(&kept) {
        assert!(
            profiles(&after).contains(&profile),
            "{profile} missing after the restart: {after}"
        );
    }
    assert_eq!(
        learned_minutes(&after).into_iter().max(),
        Some(peak),
        "{after}"
    );
}

/// Two scalers of one pool: what the active one learns reaches the standby
/// only through the bucket, so a standby that takes over re-reads it (it
/// loaded the profiles when it started, before anything was learned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_takes_over_shows_what_the_active_one_learned() {
    let stack = Stack::start(StackOptions::default()).await;
    let args = |id: &str| {
        let mut args = stack.nats.login_args(ebb_nats::access::Role::Scaler);
        args.extend(["--scaler-id", id, "--lease-ttl", "3s"].map(str::to_owned));
        args
    };
    let mut config = String::new();
    let mut a = ScalerProcess::configured(args("a"), |workers| {
        config = format!(
            "{LEARNING}\n{}",
            ebb_tests::scaler::process_backend(&stack, workers, &[])
        );
        config.clone()
    });
    let mut b = ScalerProcess::configured(args("b"), |_| config.clone());
    a.restart();
    b.restart();
    assert_eq!(a.status().await["lease"]["role"], "active");

    let mut asked = 0;
    eventually(Duration::from_secs(200), "a learned profile", || {
        asked += 1;
        let question = json!({"question": format!("Learning question {asked}?"), "max_tokens": 4, "wait_seconds": 0});
        let (stack, a) = (&stack, &a);
        async move {
            let (code, body) = stack.ask(question).await;
            assert_eq!(code, 202, "{body}");
            let learned = a.status().await["learned"].clone();
            if learned_minutes(&learned).iter().any(|&workers| workers > 0) {
                Ok(())
            } else {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Err(learned)
            }
        }
    })
    .await;
    eventually(Duration::from_secs(30), "a profile saved", || async {
        match saved(&stack.nats).await {
            Some(saved) if learned_minutes(&saved).iter().any(|&w| w > 0) => Ok(()),
            other => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                Err(format!("{other:?}"))
            }
        }
    })
    .await;
    // Nothing left to answer: what `b` shows after taking over can only
    // come from the bucket, not from needing workers itself.
    eventually(Duration::from_secs(60), "the queue empty", || async {
        match stack.queued_messages().await {
            0 => Ok(()),
            left => Err(left),
        }
    })
    .await;
    let standby = b.status().await;
    assert_eq!(standby["lease"]["role"], "standby", "{standby}");
    assert!(
        !learned_minutes(&standby["learned"]).iter().any(|&w| w > 0),
        "the standby already shows a learned minute: {standby}"
    );

    a.kill();
    let last_saved = saved(&stack.nats).await.expect("a saved profile");
    let peak = learned_minutes(&last_saved).into_iter().max();
    assert!(peak > Some(0), "{last_saved}");
    b.wait_status(
        Duration::from_secs(30),
        "the saved profile on the new active scaler",
        |s| {
            s["lease"]["role"] == "active"
                && learned_minutes(&s["learned"]).into_iter().max() == peak
        },
    )
    .await;
}
