//! One active scaler per pool, however many run: a lease in the NATS KV
//! bucket [`BUCKET`] under `pool.<pool>`, whose value names the holder.
//!
//! The bucket's `max_age` is the lease's TTL: an entry nobody renews
//! vanishes from the server that long after it was written. The holder
//! renews with a revision-checked update every third of it; the others try
//! a create every second, which succeeds only once the entry is gone. The
//! holder acts only until its last renewal *sent* could have expired, less
//! a margin ([`may_act`]); the server's clock starts later (when it stored
//! the renewal), so a holder cut off from NATS stops acting before a
//! standby can take the lease. A standby takes over within the TTL plus a
//! second of a holder's death or partition, then adopts its workers by
//! listing the pool (Docker labels, process records).
//!
//! A scaler restarted under the same id (`--scaler-id`, by default the
//! host name) takes its own lease back at once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// The lease bucket (one key per pool).
pub const BUCKET: &str = ebb_nats::subjects::SCALER_LEASE_BUCKET;

/// How often a standby asks for the lease.
const STANDBY_POLL: Duration = Duration::from_secs(1);

/// The holder stops acting this much before its lease could expire
/// (clock rates, a reply in flight).
fn margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(500))
}

/// Who this scaler is to the others, and how long a lease lasts.
#[derive(Debug, Clone, clap::Args)]
pub struct LeaseArgs {
    /// This scaler's name in the lease (by default the host name, so a
    /// restarted scaler takes its own lease back at once). Scalers of one
    /// pool on the same host need different names.
    #[arg(long, env = "EBB_SCALER_ID")]
    pub scaler_id: Option<String>,
    /// How long the active scaler's lease outlives its last renewal: a
    /// standby takes over within this (plus a second) of the active one's
    /// death or partition. The bucket keeps the TTL it was created with.
    #[arg(long, env = "EBB_SCALER_LEASE_TTL", default_value = "10s", value_parser = ebb_runtime::duration::parse)]
    pub lease_ttl: Duration,
}

impl LeaseArgs {
    pub fn id(&self) -> String {
        self.scaler_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().to_owned())
                .ok()
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| format!("scaler-{}", std::process::id()))
        })
    }
}

/// A renewal the server accepted: its revision, and when it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub revision: u64,
    pub sent_at: Instant,
}

/// Whether the holder of `held` may act at `now`: until the lease it last
/// renewed could have expired, less [`margin`].
pub fn may_act(held: Option<Held>, ttl: Duration, now: Instant) -> bool {
    held.is_some_and(|held| now < held.sent_at + ttl.saturating_sub(margin(ttl)))
}

/// What `/status` says of the lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "role")]
pub enum LeaseView {
    /// Not decided yet (the bucket is being opened, or the first attempt
    /// on the lease has not come back).
    #[default]
    Starting,
    Active {
        id: String,
    },
    Standby {
        id: String,
        holder: Option<String>,
    },
}

/// This scaler's side of the lease, shared with the loop and the API.
#[derive(Debug)]
pub struct Lease {
    id: String,
    state: Mutex<LeaseState>,
}

#[derive(Debug, Default)]
struct LeaseState {
    ttl: Duration,
    held: Option<Held>,
    /// The holder last read, when it is another scaler.
    other: Option<String>,
    /// Whether the first attempt has made this scaler active or standby.
    decided: bool,
}

impl Lease {
    pub fn new(id: String) -> Lease {
        Lease {
            id,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().expect("lease lock")
    }

    /// Whether this scaler may start and stop workers now.
    pub fn acting(&self, now: Instant) -> bool {
        let state = self.state();
        may_act(state.held, state.ttl, now)
    }

    pub fn view(&self, now: Instant) -> LeaseView {
        let state = self.state();
        if !state.decided {
            LeaseView::Starting
        } else if may_act(state.held, state.ttl, now) {
            LeaseView::Active {
                id: self.id.clone(),
            }
        } else {
            LeaseView::Standby {
                id: self.id.clone(),
                holder: state.other.clone(),
            }
        }
    }
}

/// Opens the lease bucket (creating it with `ttl` and `replicas`) and
/// keeps this scaler's side of the lease of `pool` until `stopping`;
/// `decided` is sent once the first attempt has made it active or standby.
pub async fn keep(
    client: async_nats::Client,
    pool: String,
    args: LeaseArgs,
    replicas: usize,
    lease: std::sync::Arc<Lease>,
    decided: tokio::sync::oneshot::Sender<()>,
    stopping: CancellationToken,
) {
    let open = || open_bucket(&client, args.lease_ttl, replicas);
    let (store, ttl) = ebb_runtime::backoff::retry_startup("open the lease bucket", open).await;
    if ttl != args.lease_ttl {
        tracing::warn!(
            bucket = BUCKET,
            ttl_s = ttl.as_secs_f64(),
            flag_s = args.lease_ttl.as_secs_f64(),
            "the lease bucket keeps the TTL it was created with; using it"
        );
    }
    lease.state().ttl = ttl;
    let key = format!("pool.{pool}");
    let mut decided = Some(decided);
    loop {
        let was_acting = lease.acting(Instant::now());
        let wait = step(&store, &key, &lease, ttl).await;
        if let Some(decided) = decided.take() {
            lease.state().decided = true;
            let _ = decided.send(());
        }
        let acting = lease.acting(Instant::now());
        if acting != was_acting {
            match acting {
                true => tracing::info!(id = %lease.id, pool, "took the scaler lease: active"),
                false => {
                    tracing::warn!(id = %lease.id, pool, holder = ?lease.state().other, "lost the scaler lease: standby")
                }
            }
        }
        tokio::select! {
            () = stopping.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One renewal or one attempt to take the lease; when to try again.
async fn step(store: &kv::Store, key: &str, lease: &Lease, ttl: Duration) -> Duration {
    let sent_at = Instant::now();
    let held = lease.state().held;
    let value = lease.id.clone().into_bytes().into();
    match held {
        Some(held) => match store.update(key, value, held.revision).await {
            Ok(revision) => {
                lease.state().held = Some(Held { revision, sent_at });
                ttl / 3
            }
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                lease.state().held = None;
                read_holder(store, key, lease).await;
                STANDBY_POLL
            }
            // Unknown whether it landed: the deadline of the last one stands.
            Err(err) => {
                tracing::warn!(cause = %err, "lease not renewed; retrying");
                STANDBY_POLL
            }
        },
        None => match store.create(key, value).await {
            Ok(revision) => {
                let mut state = lease.state();
                state.held = Some(Held { revision, sent_at });
                state.other = None;
                ttl / 3
            }
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                read_holder(store, key, lease).await;
                STANDBY_POLL
            }
            Err(err) => {
                tracing::debug!(cause = %err, "lease not taken; retrying");
                STANDBY_POLL
            }
        },
    }
}

/// Reads who holds the lease; takes it back when that is this scaler's
/// own name (a restart under the same id): renewing it proves it is still
/// this scaler's.
async fn read_holder(store: &kv::Store, key: &str, lease: &Lease) {
    let Ok(Some(entry)) = store.entry(key).await else {
        return;
    };
    let holder = String::from_utf8_lossy(&entry.value).into_owned();
    if holder == lease.id && entry.operation == kv::Operation::Put {
        let sent_at = Instant::now();
        let value = lease.id.clone().into_bytes().into();
        if let Ok(revision) = store.update(key, value, entry.revision).await {
            let mut state = lease.state();
            state.held = Some(Held { revision, sent_at });
            state.other = None;
            return;
        }
    }
    lease.state().other = Some(holder);
}

/// The bucket, and the TTL it has (the one it was created with).
async fn open_bucket(
    client: &async_nats::Client,
    ttl: Duration,
    replicas: usize,
) -> Result<(kv::Store, Duration), async_nats::Error> {
    let context = jetstream::new(client.clone());
    // A KV bucket whose entries expire `ttl` after they were written.
    let stream = jetstream::stream::Config {
        max_age: ttl,
        ..crate::memory::kv_stream(
            BUCKET,
            "ebb-scaler leases: one active scaler per pool",
            replicas,
        )
    };
    let mut stream = context.get_or_create_stream(stream).await?;
    let ttl = stream.info().await?.config.max_age;
    Ok((context.get_key_value(BUCKET).await?, ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_acts_until_its_last_renewal_could_expire_less_a_margin() {
        let ttl = Duration::from_secs(10);
        let sent_at = Instant::now();
        let held = Some(Held {
            revision: 7,
            sent_at,
        });
        assert!(may_act(held, ttl, sent_at));
        assert!(may_act(held, ttl, sent_at + Duration::from_millis(8_999)));
        // A second (ttl / 10) before the server could let a standby in.
        assert!(!may_act(held, ttl, sent_at + Duration::from_secs(9)));
        assert!(!may_act(None, ttl, sent_at));
    }

    #[test]
    fn short_leases_keep_half_a_second_of_margin() {
        let ttl = Duration::from_secs(2);
        let sent_at = Instant::now();
        let held = Some(Held {
            revision: 1,
            sent_at,
        });
        assert!(may_act(held, ttl, sent_at + Duration::from_millis(1_499)));
        assert!(!may_act(held, ttl, sent_at + Duration::from_millis(1_500)));
    }
}
