//! Shedding: a new question is refused (`429 overloaded`) when the questions
//! already waiting could not all be served within the latency goal even by
//! the most workers the scaler may run. Queueing it anyway would only grow
//! the queue and every student's wait; refusing keeps memory and latency
//! bounded, and cache hits are still answered.
//!
//! The estimate is `(waiting + 1) / (max_workers * throughput)`, where
//! `max_workers` is the scaler's `resources.max_instances` as it announces
//! it on `ebb.scaler.status` (every 2 s) while it was heard in the last 10
//! s, and `--max-workers` before the first announcement or once the scaler
//! went quiet (a copy of the scaler's config kept by hand goes stale),
//! `waiting` is the queue's `num_pending` (read every 250 ms) plus the
//! questions being queued now or queued since (a place is reserved before
//! the estimate, so a burst of concurrent requests cannot all pass on one
//! count). Places are shared by every gateway in Redis
//! ([`ebb_store::limits`]), taken by the script that looks the answer up
//! and writes the question's record (one round trip per accept) and kept
//! in batches: a gateway counts every place still being
//! queued and every place queued since its own last reading started (by
//! Redis's clock), which that reading may not include; while Redis is away
//! each gateway counts its own since its last reading. And `throughput` is
//! the mean over the workers
//! heard in the last 10 s of what each answers when full: `slots /
//! mean_job_ms` from its heartbeat (a worker batching 8 questions that take
//! 10 s each answers 0.8 a second). Until a worker reports, a worker is
//! taken to answer one question at a time in `--service-time-estimate`:
//! the gateway cannot know the fleet's batch size before it hears from it,
//! and one slot errs on the side of shedding early, never late.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::{Message, Subscriber};
use ebb_nats::{FleetStatus, Heartbeat, Topology, subjects};
use ebb_store::{PlaceRequest, Store};
use futures::StreamExt;

use crate::config::OverloadArgs;
use crate::error::ApiError;
use crate::shared_limits::RedisPause;

const DEPTH_INTERVAL: Duration = Duration::from_millis(250);
/// The most places Redis holds: past it a gateway sheds anyway (no
/// deployment queues 100,000 questions a second within its goal).
const MAX_PLACES: u64 = 100_000;
/// How often kept places are flushed to Redis, and how many make a flush
/// at once: one call for many accepts.
const KEEP_EVERY: Duration = Duration::from_millis(10);
const KEEP_BATCH: usize = 256;
/// A worker silent this long no longer counts towards the throughput.
const HEARTBEAT_STALE: Duration = Duration::from_secs(10);
/// A scaler silent this long (five announcements missed) is taken to be
/// gone, and `--max-workers` applies again: a stopped scaler's maximum no
/// longer bounds anything.
pub const FLEET_STATUS_STALE: Duration = Duration::from_secs(10);

/// The scaler's maximum, and when this gateway heard it (its own clock, not
/// `published_at_ms`: the two machines' clocks may disagree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learned {
    pub max_workers: u32,
    pub heard_at: Instant,
}

/// Where the maximum the estimate uses comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxWorkers {
    /// Announced by the scaler within [`FLEET_STATUS_STALE`].
    Scaler(u32),
    /// `--max-workers`: no scaler heard, or not lately.
    Flag(u32),
}

impl MaxWorkers {
    pub fn count(self) -> u32 {
        match self {
            MaxWorkers::Scaler(count) | MaxWorkers::Flag(count) => count,
        }
    }
}

/// The scaler's maximum when it was heard within [`FLEET_STATUS_STALE`]
/// of `now`, else the `flag`.
pub fn max_workers(learned: Option<Learned>, flag: u32, now: Instant) -> MaxWorkers {
    match learned {
        Some(learned) if now.saturating_duration_since(learned.heard_at) < FLEET_STATUS_STALE => {
            MaxWorkers::Scaler(learned.max_workers)
        }
        _ => MaxWorkers::Flag(flag),
    }
}

/// How long the last of `waiting` questions waits for a worker, when each
/// of `max_workers` takes `per_question` per question (1 / its throughput):
/// `waiting / (max_workers * throughput)`.
pub fn estimated_wait(waiting: u64, per_question: Duration, max_workers: u32) -> Duration {
    per_question.mul_f64(waiting as f64 / f64::from(max_workers.max(1)))
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Questions a second one worker answers when full: its `slots` over the
/// time one of them takes; `None` until it has measured that time.
pub fn worker_throughput(beat: &Heartbeat) -> Option<f64> {
    let job_ms = beat.mean_job_ms.filter(|ms| ms.is_finite() && *ms > 0.0)?;
    Some(f64::from(beat.slots.max(1)) * 1000.0 / job_ms)
}

#[derive(Debug)]
pub struct Overload {
    args: OverloadArgs,
    /// `num_pending` at the last reading.
    waiting: AtomicU64,
    /// Queued by this gateway since that reading.
    accepted_since: AtomicU64,
    /// Places reserved by requests still publishing.
    in_flight: AtomicU64,
    /// Time a worker takes per question, 1 / the mean throughput of the
    /// workers heard (ns; an atomic, so the hot path takes no lock).
    per_question_ns: AtomicU64,
    /// Each live worker's throughput and when it was heard: one entry per
    /// worker id, pruned at every depth reading.
    workers: Mutex<HashMap<String, (f64, Instant)>>,
    /// The maximum in use, copied out of `fleet` for the lock-free hot path.
    max_workers: AtomicU32,
    /// The scaler's last announcement, and the choice made from it.
    fleet: Mutex<(Option<Learned>, MaxWorkers)>,
    /// Places shared with the other gateways; `None` counts alone.
    shared: Option<SharedPlaces>,
    /// When the last depth reading started, by Redis's clock (ms; 0 when
    /// unknown, and every recent place counts).
    reading_started_ms: AtomicU64,
}

/// The places every gateway takes, in Redis.
#[derive(Debug)]
struct SharedPlaces {
    store: Store,
    redis: RedisPause,
    /// Names this gateway's places apart from the others'.
    gateway: uuid::Uuid,
    next: AtomicU64,
    /// Places whose questions are queued, kept in Redis in one call every
    /// [`KEEP_EVERY`] (or at [`KEEP_BATCH`] of them): until then each
    /// counts as still being queued, which sheds a little early, never late.
    kept: Mutex<Vec<String>>,
}

impl SharedPlaces {
    /// A new place's name, unique across gateways.
    fn name(&self) -> String {
        format!(
            "{}-{}",
            self.gateway,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The kept places waiting for the next flush, taken out.
    fn take_kept(&self) -> Vec<String> {
        std::mem::take(&mut *self.kept.lock().expect("kept places lock"))
    }
}

impl Overload {
    /// With a `store`, places are counted with every gateway's.
    pub fn new(args: OverloadArgs, store: Option<Store>) -> Self {
        // One slot: a question per estimate.
        Overload {
            per_question_ns: AtomicU64::new(nanos(args.service_time_estimate)),
            max_workers: AtomicU32::new(args.max_workers),
            fleet: Mutex::new((None, MaxWorkers::Flag(args.max_workers))),
            args,
            waiting: AtomicU64::new(0),
            accepted_since: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            workers: Mutex::new(HashMap::new()),
            shared: store.map(|store| SharedPlaces {
                store,
                redis: RedisPause::default(),
                gateway: uuid::Uuid::now_v7(),
                next: AtomicU64::new(0),
                kept: Mutex::new(Vec::with_capacity(KEEP_BATCH)),
            }),
            reading_started_ms: AtomicU64::new(0),
        }
    }

    /// Starts a place for one more question: counted in flight here at
    /// once and, when places are shared, named for Redis, where the lookup
    /// that writes the question's record takes it
    /// ([`Reservation::place`]); then [`Reservation::decide`] refuses or
    /// admits it. The place is taken before the estimate, so concurrent
    /// requests cannot all pass on the same count; it is given back when
    /// the guard drops unkept.
    pub fn begin(&self) -> Reservation<'_> {
        Reservation {
            overload: self,
            others_here: self.in_flight.fetch_add(1, Ordering::Relaxed),
            kept: false,
            name: self.shared.as_ref().map(SharedPlaces::name),
            taken: None,
        }
    }

    /// Sends the kept places to Redis, off the request's path.
    fn flush_kept(&self) {
        let Some(shared) = &self.shared else { return };
        let places = shared.take_kept();
        if places.is_empty() {
            return;
        }
        self.spawn_on_store(move |store| async move {
            store
                .degradable("shedding places", store.keep_places(&places))
                .await;
        });
    }

    /// Runs `call` on the shared store in the background (off the
    /// request's path), when there is one.
    fn spawn_on_store<F: Future<Output = ()> + Send + 'static>(
        &self,
        call: impl FnOnce(Store) -> F,
    ) {
        if let (Some(shared), Ok(runtime)) = (&self.shared, tokio::runtime::Handle::try_current()) {
            runtime.spawn(call(shared.store.clone()));
        }
    }

    /// Waiting at the last reading plus queued since (not in-flight places).
    fn waiting_now(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed) + self.accepted_since.load(Ordering::Relaxed)
    }

    fn per_question(&self) -> Duration {
        Duration::from_nanos(self.per_question_ns.load(Ordering::Relaxed))
    }

    /// Current figures, for `/admin/queue` and metrics: the questions
    /// waiting, and the time a worker takes per question (1 / throughput:
    /// a worker with 8 slots of 10 s each takes 1.25 s per question).
    pub fn snapshot(&self) -> (u64, Duration) {
        (self.waiting_now(), self.per_question())
    }

    /// The most workers the estimate counts on now.
    pub fn max_workers(&self) -> MaxWorkers {
        self.fleet.lock().expect("fleet lock").1
    }

    /// Keeps the figures fresh until `stop` resolves.
    pub async fn watch(&self, topology: Topology, stop: impl Future<Output = ()>) {
        let client = topology.jetstream.client();
        let mut heartbeats = subscribe(&client, subjects::HEARTBEAT, "service time").await;
        let mut fleet = subscribe(&client, subjects::SCALER_STATUS, "--max-workers").await;
        let mut ticker = tokio::time::interval(DEPTH_INTERVAL);
        let mut keep = tokio::time::interval(KEEP_EVERY);
        keep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return self.flush_kept(),
                _ = ticker.tick() => self.read_depth(&topology).await,
                _ = keep.tick() => self.flush_kept(),
                Some(message) = next(&mut heartbeats) => {
                    if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&message.payload) {
                        self.heard(beat);
                    }
                }
                Some(message) = next(&mut fleet) => {
                    match serde_json::from_slice::<FleetStatus>(&message.payload) {
                        Ok(status) => self.heard_fleet(&status, Instant::now()),
                        Err(err) => tracing::debug!(cause = %err, "unreadable fleet status"),
                    }
                }
            }
        }
    }

    async fn read_depth(&self, topology: &Topology) {
        // Only what was queued before the query is surely in its answer:
        // questions queued during it may count twice (shedding a little
        // early), never zero times.
        let counted = self.accepted_since.load(Ordering::Relaxed);
        let started = match &self.shared {
            Some(shared) => {
                let now = shared.store.redis_time_ms();
                shared.redis.call(&shared.store, now).await.unwrap_or(0)
            }
            None => 0,
        };
        match ebb_nats::queue_depth(&topology.questions).await {
            Ok(depth) => {
                self.waiting.store(depth.waiting(), Ordering::Relaxed);
                // After `waiting`: a reservation in between pairs the new
                // count with the older start, counting more places, not fewer.
                self.reading_started_ms.store(started, Ordering::Relaxed);
                self.accepted_since.fetch_sub(counted, Ordering::Relaxed);
            }
            Err(err) => tracing::debug!(cause = %err, "queue depth unknown; keeping the last"),
        }
        let now = Instant::now();
        self.refresh_throughput(now);
        self.refresh_max_workers(now);
    }

    /// Forgets silent workers and sets the throughput to the mean of the
    /// others'; with none left, the last figure stays (a fleet scaled to
    /// zero is no faster or slower than it was).
    fn refresh_throughput(&self, now: Instant) {
        let mut workers = self.workers.lock().expect("workers lock");
        workers.retain(|_, (_, seen)| now.duration_since(*seen) < HEARTBEAT_STALE);
        if !workers.is_empty() {
            let mean = workers.values().map(|(rate, _)| rate).sum::<f64>() / workers.len() as f64;
            // Rates are positive (see `worker_throughput`), so this is finite.
            let per_question = Duration::try_from_secs_f64(1.0 / mean).unwrap_or(Duration::MAX);
            self.per_question_ns
                .store(nanos(per_question), Ordering::Relaxed);
        }
    }

    fn heard_fleet(&self, status: &FleetStatus, now: Instant) {
        if status.max_workers == 0 {
            // Not a maximum any scaler would run with (its config refuses 0).
            tracing::debug!("fleet status with max_workers 0 ignored");
            return;
        }
        self.fleet.lock().expect("fleet lock").0 = Some(Learned {
            max_workers: status.max_workers,
            heard_at: now,
        });
        self.refresh_max_workers(now);
    }

    /// Re-makes the choice of maximum; logs only when it changes, not at
    /// every announcement.
    fn refresh_max_workers(&self, now: Instant) {
        let mut fleet = self.fleet.lock().expect("fleet lock");
        let chosen = max_workers(fleet.0, self.args.max_workers, now);
        if chosen == fleet.1 {
            return;
        }
        let previous = fleet.1.count();
        fleet.1 = chosen;
        self.max_workers.store(chosen.count(), Ordering::Relaxed);
        match chosen {
            MaxWorkers::Scaler(count) => {
                tracing::info!(
                    max_workers = count,
                    previous,
                    "shedding at the scaler's maximum"
                );
            }
            MaxWorkers::Flag(count) => tracing::info!(
                max_workers = count,
                previous,
                silent_s = FLEET_STATUS_STALE.as_secs(),
                "no scaler heard lately; shedding at --max-workers"
            ),
        }
    }

    fn heard(&self, beat: Heartbeat) {
        if let Some(throughput) = worker_throughput(&beat) {
            let mut workers = self.workers.lock().expect("workers lock");
            // Bounded by the fleet: one entry per live worker id, and silent
            // ones are dropped at every depth reading.
            workers.insert(beat.worker_id, (throughput, Instant::now()));
        }
    }
}

/// Subscribes to `subject`; without it, `what` stays at its fallback.
async fn subscribe(client: &async_nats::Client, subject: &str, what: &str) -> Option<Subscriber> {
    match client.subscribe(subject.to_owned()).await {
        Ok(subscriber) => Some(subscriber),
        Err(err) => {
            tracing::warn!(cause = %err, subject, fallback = what, "not subscribed: its figure stays at the fallback");
            None
        }
    }
}

/// The next message, or never when there is no subscription.
async fn next(subscriber: &mut Option<Subscriber>) -> Option<Message> {
    match subscriber.as_mut() {
        Some(subscriber) => subscriber.next().await,
        None => std::future::pending().await,
    }
}

/// A place in the estimate for one question; given back on drop unless the
/// question was queued.
#[derive(Debug)]
pub struct Reservation<'a> {
    overload: &'a Overload,
    /// Places this gateway had in flight when this one began.
    others_here: u64,
    kept: bool,
    /// Its name in Redis, when places are shared.
    name: Option<String>,
    /// The same, once Redis has taken it.
    taken: Option<String>,
}

impl Reservation<'_> {
    /// What the lookup that writes the question's record is to take in
    /// Redis; `None` when places are not shared.
    pub fn place(&self) -> Option<PlaceRequest<'_>> {
        Some(PlaceRequest {
            id: self.name.as_deref()?,
            reading_started_ms: self.overload.reading_started_ms.load(Ordering::Relaxed),
            cap: MAX_PLACES,
        })
    }

    /// Admits the question, or refuses it (`Overloaded`) when it could
    /// not be served in time. `shared_ahead` is what taking the place in
    /// Redis counted, `None` when it was not taken there (no Redis, or no
    /// shared places): then this gateway counts alone, its places queued
    /// since its last reading and those in flight.
    pub fn decide(mut self, shared_ahead: Option<u64>) -> Result<Self, ApiError> {
        let overload = self.overload;
        let ahead = match shared_ahead {
            Some(ahead) => {
                self.taken = self.name.take();
                ahead
            }
            None => overload.accepted_since.load(Ordering::Relaxed) + self.others_here,
        };
        let waiting = overload.waiting.load(Ordering::Relaxed) + ahead + 1;
        let max_workers = overload.max_workers.load(Ordering::Relaxed);
        let wait = estimated_wait(waiting, overload.per_question(), max_workers);
        let goal = overload.args.latency_goal;
        if wait > goal {
            return Err(ApiError::Overloaded {
                retry_after: (wait - goal).min(Duration::from_secs(300)),
            });
        }
        Ok(self)
    }

    /// The question is queued: it now counts until the next depth reading.
    pub fn keep(mut self) {
        self.kept = true;
        let overload = self.overload;
        overload.accepted_since.fetch_add(1, Ordering::Relaxed);
        if let (Some(place), Some(shared)) = (self.taken.take(), &overload.shared) {
            let mut kept = shared.kept.lock().expect("kept places lock");
            kept.push(place);
            let full = kept.len() >= KEEP_BATCH;
            drop(kept);
            if full {
                overload.flush_kept();
            }
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        // Kept or not, the place is no longer in flight (`keep` counted it).
        self.overload.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.kept {
            return;
        }
        // Not queued: the other gateways need not count it.
        if let Some(place) = self.taken.take() {
            self.overload.spawn_on_store(move |store| async move {
                store
                    .degradable("a shedding place", store.release_place(&place))
                    .await;
            });
        }
    }
}

#[cfg(test)]
#[path = "overload_tests.rs"]
mod tests;
