//! The seeded fault schedule: every kind of fault in a shuffled round,
//! round after round, one every `every`, until the load is over. The first
//! NATS outage outlasts the scaler's heartbeat timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::cast::{ACK_WAIT, Cast, HEARTBEAT_TIMEOUT, signal};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillWorker,
    PauseWorker,
    StopWorker,
    RestartNats,
    RestartRedis,
    RestartGateway,
    RestartScaler,
}

impl Fault {
    const ALL: [Fault; 7] = [
        Fault::KillWorker,
        Fault::PauseWorker,
        Fault::StopWorker,
        Fault::RestartNats,
        Fault::RestartRedis,
        Fault::RestartGateway,
        Fault::RestartScaler,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::KillWorker => "worker_sigkill",
            Fault::PauseWorker => "worker_sigstop_past_ack_wait",
            Fault::StopWorker => "worker_sigterm",
            Fault::RestartNats => "nats_kill9_restart",
            Fault::RestartRedis => "redis_kill9_restart",
            Fault::RestartGateway => "gateway_kill9_restart",
            Fault::RestartScaler => "scaler_kill9_restart",
        }
    }
}

/// Injects faults until `stop`; returns how many of each.
pub async fn inject(
    cast: Arc<Mutex<Cast>>,
    seed: u64,
    every: Duration,
    stop: CancellationToken,
) -> BTreeMap<&'static str, u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut counts = BTreeMap::new();
    let mut long_outage_done = false;
    loop {
        let mut round = Fault::ALL;
        round.shuffle(&mut rng);
        for fault in round {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return counts,
            }
            let name = if fault == Fault::RestartNats && !long_outage_done {
                long_outage_done = true;
                "nats_outage_past_heartbeat_timeout"
            } else {
                fault.name()
            };
            let outage = match name {
                "nats_outage_past_heartbeat_timeout" => HEARTBEAT_TIMEOUT + Duration::from_secs(3),
                _ => Duration::from_millis(rng.random_range(300..2_000)),
            };
            if apply(&cast, fault, outage, &mut rng).await {
                *counts.entry(name).or_insert(0) += 1;
            }
        }
    }
}

/// Applies one fault; `false` when there was nothing to apply it to (no
/// worker running at that moment).
async fn apply(cast: &Mutex<Cast>, fault: Fault, outage: Duration, rng: &mut ChaCha8Rng) -> bool {
    let worker = {
        let pids = cast.lock().await.worker_pids();
        (!pids.is_empty()).then(|| pids[rng.random_range(0..pids.len())])
    };
    match fault {
        Fault::KillWorker | Fault::PauseWorker | Fault::StopWorker => {
            let Some(pid) = worker else {
                return false;
            };
            match fault {
                Fault::KillWorker => signal(pid, "KILL"),
                Fault::StopWorker => signal(pid, "TERM"),
                _ => {
                    signal(pid, "STOP");
                    // Resumed later, in the background: its questions have
                    // gone to others by then, and it must not garble them.
                    tokio::spawn(async move {
                        tokio::time::sleep(ACK_WAIT + Duration::from_secs(2)).await;
                        signal(pid, "CONT");
                    });
                }
            }
        }
        Fault::RestartNats => {
            cast.lock().await.nats.stop();
            tokio::time::sleep(outage).await;
            let mut cast = cast.lock().await;
            tokio::task::block_in_place(|| cast.nats.resume());
        }
        Fault::RestartRedis => {
            cast.lock().await.redis.stop();
            tokio::time::sleep(outage).await;
            let mut cast = cast.lock().await;
            tokio::task::block_in_place(|| cast.redis.resume());
        }
        Fault::RestartGateway => {
            let mut cast = cast.lock().await;
            cast.kill_gateway();
            tokio::task::block_in_place(|| cast.start_gateway());
        }
        Fault::RestartScaler => {
            let mut cast = cast.lock().await;
            cast.kill_scaler();
            cast.start_scaler().await;
        }
    }
    true
}
