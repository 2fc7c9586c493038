//! What the scaler remembers across restarts: the profiles its `learn`
//! timetable windows learned ([`LearnedFloors`]), kept in the NATS KV
//! bucket [`BUCKET`] under `learned.<pool>`. NATS, not a file: every
//! backend has it (a Docker-run scaler keeps no state directory), and a
//! replacement scaler on another machine finds it too.
//!
//! Read at start, before the first decision, and again when a standby
//! takes over (within [`SAVE_EVERY`]); written by the active scaler only,
//! when it changed, at most every [`SAVE_EVERY`] (a profile changes at most
//! once a minute per window), and once more when the scaler stops. A
//! scaler killed outright loses at most the last [`SAVE_EVERY`] of
//! learning.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};

use tokio_util::sync::CancellationToken;

use crate::lease::LeaseView;
use crate::scaler::Shared;
use ebb_control::config::ScalerConfig;
use ebb_control::learned::LearnedFloors;

/// The scaler's KV bucket (one value per pool and kind of state).
pub const BUCKET: &str = ebb_nats::subjects::SCALER_STATE_BUCKET;
/// Longest a change waits before it is written.
pub const SAVE_EVERY: Duration = Duration::from_secs(10);
/// Largest value kept: a day-long `learn` window is 1,441 minutes.
const MAX_VALUE_BYTES: i32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
#[error("the scaler state bucket {BUCKET}: {0}")]
pub struct MemoryError(String);

/// One pool's remembered state.
#[derive(Clone)]
pub struct Memory {
    store: kv::Store,
    key: String,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory").field("key", &self.key).finish()
    }
}

/// The KV key of a pool's learned profiles.
pub fn learned_key(config: &ScalerConfig) -> String {
    format!("learned.{}", config.backend.pool())
}

/// The stream of a KV bucket with one value per key, made by hand:
/// `create_key_value` first asks for the account's info, which nats-server
/// 2.9 (Debian's) answers in a shape async-nats 0.51 cannot read.
pub(crate) fn kv_stream(
    bucket: &str,
    description: &str,
    replicas: usize,
) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: replicas.max(1),
        ..jetstream::stream::Config::default()
    }
}

impl Memory {
    /// Opens the bucket, creating it on first use.
    /// `replicas`: copies of the bucket in a cluster (the question
    /// stream's count, which the gateway decides).
    pub async fn open(
        client: &async_nats::Client,
        config: &ScalerConfig,
        replicas: usize,
    ) -> Result<Memory, MemoryError> {
        let context = jetstream::new(client.clone());
        let stream = jetstream::stream::Config {
            max_message_size: MAX_VALUE_BYTES,
            ..kv_stream(BUCKET, "ebb-scaler state kept across restarts", replicas)
        };
        context
            .get_or_create_stream(stream)
            .await
            .map_err(|err| MemoryError(err.to_string()))?;
        let store = context
            .get_key_value(BUCKET)
            .await
            .map_err(|err| MemoryError(err.to_string()))?;
        Ok(Memory {
            store,
            key: learned_key(config),
        })
    }

    /// The profiles saved last, if any. Unreadable ones (a format from
    /// another version) are logged and learned again.
    pub async fn load(&self) -> Result<Option<LearnedFloors>, MemoryError> {
        let Some(bytes) = self
            .store
            .get(&self.key)
            .await
            .map_err(|err| MemoryError(err.to_string()))?
        else {
            return Ok(None);
        };
        match serde_json::from_slice(&bytes) {
            Ok(learned) => Ok(Some(learned)),
            Err(err) => {
                tracing::warn!(key = %self.key, cause = %err, "unreadable learned profiles; learning again");
                Ok(None)
            }
        }
    }

    pub async fn save(&self, learned: &LearnedFloors) -> Result<(), MemoryError> {
        let bytes = serde_json::to_vec(learned).expect("learned floors serialize");
        self.store
            .put(&self.key, bytes.into())
            .await
            .map(|_| ())
            .map_err(|err| MemoryError(err.to_string()))
    }

    /// Writes the controller's learned profiles whenever they changed, at
    /// most every [`SAVE_EVERY`], and once more at `stopping`.
    pub async fn keep(
        self,
        shared: Arc<Shared>,
        mut saved: LearnedFloors,
        stopping: CancellationToken,
    ) {
        let mut every = tokio::time::interval(SAVE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The profiles were loaded just before the lease was first decided.
        let mut was_active = true;
        loop {
            let last = tokio::select! {
                () = stopping.cancelled() => true,
                _ = every.tick() => false,
            };
            let role = shared.lease.view(std::time::Instant::now());
            let active = matches!(role, LeaseView::Active { .. });
            if active && !was_active {
                // A standby taking over: what the last active scaler learned
                // since this one started is in the bucket, not in memory.
                match self.load().await {
                    Ok(loaded) => {
                        saved = loaded.unwrap_or_default();
                        set_learned(&shared, saved.clone());
                        tracing::info!(
                            profiles = saved.profiles.len(),
                            "learned profiles re-read on taking over"
                        );
                    }
                    Err(err) => {
                        tracing::warn!(cause = %err, "learned profiles not re-read on taking over")
                    }
                }
            }
            if !matches!(role, LeaseView::Starting) {
                was_active = active;
            }
            let learned = shared
                .controller
                .lock()
                .expect("controller lock")
                .autoscaler()
                .state
                .learned
                .clone();
            // Only the active scaler writes: a standby's profiles are stale.
            if active && learned != saved {
                match self.save(&learned).await {
                    Ok(()) => saved = learned,
                    // Kept in memory meanwhile; the next round tries again.
                    Err(err) => tracing::warn!(cause = %err, "learned profiles not saved"),
                }
            }
            if last {
                return;
            }
        }
    }
}

/// Puts the saved profiles into the controller before its first decision
/// and keeps them saved until `stopping`; await the handle for the last
/// save. Without a usable bucket the scaler still runs, learning in memory.
pub async fn remember(
    client: &async_nats::Client,
    config: &ScalerConfig,
    replicas: usize,
    shared: &Arc<Shared>,
    stopping: &CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let opened = async {
        let memory = Memory::open(client, config, replicas).await?;
        let learned = memory.load().await?;
        Ok::<_, MemoryError>((memory, learned.unwrap_or_default()))
    };
    let (memory, learned) = match opened.await {
        Ok(opened) => opened,
        Err(err) => {
            tracing::warn!(cause = %err, "learned profiles will not survive a restart");
            return None;
        }
    };
    tracing::info!(
        key = %memory.key,
        profiles = learned.profiles.len(),
        openings = learned.openings.len(),
        "learned timetable profiles loaded"
    );
    set_learned(shared, learned.clone());
    Some(tokio::spawn(memory.keep(
        shared.clone(),
        learned,
        stopping.clone(),
    )))
}

/// Puts `learned` into the controller, and into `/status` at once: a
/// scaler at zero workers may not step again (nor refresh its status)
/// until the next question or window.
fn set_learned(shared: &Shared, learned: LearnedFloors) {
    shared.status.lock().expect("status lock").learned = learned.clone();
    shared
        .controller
        .lock()
        .expect("controller lock")
        .autoscaler_mut()
        .state
        .learned = learned;
}
