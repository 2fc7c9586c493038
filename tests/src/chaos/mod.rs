//! The chaos run (issue 14): the whole product as separate processes
//! (nats-server, redis-server, `ebb-gateway`, `ebb-scaler` with the process
//! backend and its workers), thousands of questions of every kind, and on a
//! seeded schedule the faults a deployment meets: workers killed, paused
//! past the ack wait and stopped; NATS, Redis, the gateway and the scaler
//! killed with -9 and restarted, once with a NATS outage longer than the
//! heartbeat timeout. At the end every accepted question must have ended
//! (`done`, or `failed` for the poison ones only), once, the same in its
//! record, its events and its webhook calls.
//!
//! The ledger of accepted ids is the harness's own (and a tap on the
//! question subjects, for questions stored but never reported to their
//! client), never Redis, which is one of the things that fail.
//!
//! # Layout
//! - [`mod@self`]: [`Options`], [`run`], the [`Summary`] it prints.
//! - `cast`: the processes, each killable and restartable.
//! - `load`: the questions and their clients.
//! - `faults`: the seeded fault schedule.
//! - `ledger`: what the clients and the webhook receiver saw, and the end
//!   checks.

mod cast;
mod faults;
mod ledger;
mod load;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use cast::Cast;
use ledger::Ledger;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub questions: usize,
    pub seed: u64,
    /// Clients asking at once.
    pub concurrency: usize,
    /// Questions asked per second at most, so the faults meet a steady load.
    pub rate_per_second: f64,
    /// Whether to inject faults (a calm run checks the harness itself).
    pub faults: bool,
    /// Seconds between two faults.
    pub fault_every: Duration,
    /// How long every question has to end once the load is over.
    pub settle: Duration,
}

impl Options {
    pub fn new(questions: usize, seed: u64) -> Options {
        Options {
            questions,
            seed,
            concurrency: 16,
            rate_per_second: 20.0,
            faults: true,
            fault_every: Duration::from_secs(4),
            settle: Duration::from_secs(300),
        }
    }
}

/// The run's outcome; printed as one JSON line at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub asked: u64,
    pub accepted: u64,
    /// Questions a client gave up on, by the status that refused them for
    /// good (`0`: still refused when the client stopped retrying).
    pub refused: BTreeMap<u16, u64>,
    pub done: u64,
    pub failed: u64,
    /// Accepted (or stored) questions that never ended: must be 0.
    pub lost: u64,
    /// Repeats that are allowed (at-least-once) but counted.
    pub duplicates: BTreeMap<&'static str, u64>,
    pub faults: BTreeMap<&'static str, u64>,
    /// Broken promises, described; must be empty.
    pub violations: Vec<String>,
    pub gateway_rss_mib: u64,
    pub redis_used_mib: u64,
    pub longest_piece_list: u64,
    pub seconds: f64,
}

impl Summary {
    /// Whether every promise held.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.violations.is_empty()
    }
}

/// Runs the chaos run; every process it started is gone when it returns.
pub async fn run(options: Options) -> Summary {
    let started = std::time::Instant::now();
    let cast = Arc::new(tokio::sync::Mutex::new(Cast::start().await));
    let (gateway_url, nats, redis_url) = {
        let cast = cast.lock().await;
        let nats = (cast.nats.operator(), cast.nats.url());
        (cast.gateway_url(), nats, cast.redis_url())
    };
    let ledger = Arc::new(Ledger::new(&redis_url));
    let receiver = ledger.listen_for_webhooks().await;
    let tap = ledger.tap(nats.0, nats.1);
    let stop_faults = CancellationToken::new();
    let schedule = options.faults.then(|| {
        tokio::spawn(faults::inject(
            cast.clone(),
            options.seed,
            options.fault_every,
            stop_faults.clone(),
        ))
    });
    let watch = tokio::spawn(ledger.clone().watch_terminal_records(stop_faults.clone()));
    load::ask_all(&options, &gateway_url, &receiver, &ledger).await;
    stop_faults.cancel();
    let faults = match schedule {
        Some(schedule) => schedule.await.expect("the fault schedule"),
        None => BTreeMap::new(),
    };
    cast.lock().await.ensure_all_running().await;
    let _ = watch.await;
    let mut summary = ledger
        .settle_and_check(&cast, &gateway_url, options.settle)
        .await;
    tap.abort();
    summary.seed = options.seed;
    summary.faults = faults;
    summary.seconds = started.elapsed().as_secs_f64();
    summary
}
