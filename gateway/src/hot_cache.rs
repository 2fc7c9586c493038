//! The edge's hot cache: answers in the gateway's memory, in front of the
//! Redis cache. A cached answer never changes (its key covers the model,
//! revision, prompt template, sampling and question), so a copy cannot be
//! stale; each copy lives no longer than the Redis entry it was read from.
//!
//! Bounded by bytes (`--hot-cache-mib`). Admission is moka's TinyLFU: a
//! newcomer enters a full cache only if it has been asked more often than
//! the entry it would evict, so a flood of one-off questions does not push
//! out the class's favourite.
//!
//! Each entry also keeps the hit's response body once it is first
//! rendered ([`HotAnswer::rendered_once`]): a hit then costs no
//! serializing and no copy of the answer.
//!
//! Popularity: hits are counted here and added every few seconds to a
//! bounded sorted set in Redis ([`ebb_store::popularity`]: cache keys and
//! counts, no question text), from which a starting gateway loads the most
//! asked entries before it serves (see [`warm`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;
use moka::sync::Cache;

use ebb_nats::CachedAnswer;
use ebb_store::Store;

/// Keys whose hits wait for the next popularity flush; beyond, further
/// keys' hits are not counted until the flush (the hottest are in already).
const PENDING_KEYS: usize = 10_000;
/// How many of the most asked entries a starting gateway loads.
pub const WARM_TOP: usize = 1_000;
/// Longest a start waits for the warm-up (Redis away: start cold).
const WARM_TIMEOUT: Duration = Duration::from_secs(5);
/// How often hits are added to Redis's popularity counts.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// Bytes an entry costs beside its strings (moka's node, the Arc, the map).
const ENTRY_OVERHEAD: usize = 160;
/// A rendered body's bytes beside the strings it holds (field names,
/// escapes of a typical answer).
const RENDERED_OVERHEAD: usize = 160;

/// A cached answer as the gateway holds it in memory.
#[derive(Debug)]
pub struct HotAnswer {
    pub answer: CachedAnswer,
    /// The response body of a hit, rendered on the first.
    rendered: OnceLock<Bytes>,
}

impl HotAnswer {
    pub fn new(answer: CachedAnswer) -> HotAnswer {
        HotAnswer {
            answer,
            rendered: OnceLock::new(),
        }
    }

    /// The hit's response body: `render`ed on the first call, the same
    /// bytes after. The caller renders only what the entry determines.
    pub fn rendered_once(&self, render: impl FnOnce(&CachedAnswer) -> Bytes) -> Bytes {
        self.rendered.get_or_init(|| render(&self.answer)).clone()
    }
}

#[derive(Debug, Clone)]
struct Entry {
    answer: Arc<HotAnswer>,
    /// What was left of the Redis entry's TTL when it was copied.
    ttl: Duration,
}

/// Each copy expires with the Redis entry it came from.
struct WithRedis;

impl Expiry<String, Entry> for WithRedis {
    fn expire_after_create(&self, _key: &String, entry: &Entry, _at: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }
}

#[derive(Debug)]
pub struct HotCache {
    entries: Option<Cache<String, Entry>>,
    /// Hits since the last flush, by cache key.
    pending: Mutex<HashMap<String, u64>>,
}

impl HotCache {
    /// A cache of at most `mib` MiB of answers; 0 keeps none (every
    /// lookup goes to Redis).
    pub fn new(mib: u64) -> HotCache {
        let entries = (mib > 0).then(|| {
            Cache::builder()
                .max_capacity(mib * 1024 * 1024)
                .weigher(|key: &String, entry: &Entry| {
                    let answer = &entry.answer.answer;
                    let strings = key.len()
                        + answer.answer.len()
                        + answer.model.len()
                        + answer.language.as_ref().map_or(0, String::len);
                    // Twice: the rendered body holds them all again.
                    let bytes = 2 * strings + RENDERED_OVERHEAD + ENTRY_OVERHEAD;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .expire_after(WithRedis)
                .build()
        });
        HotCache {
            entries,
            pending: Mutex::default(),
        }
    }

    /// The answer under `key`, if this gateway holds it; a hit counts
    /// towards the key's popularity.
    pub fn get(&self, key: &str) -> Option<Arc<HotAnswer>> {
        let entry = self.entries.as_ref()?.get(key)?;
        let mut pending = self.pending.lock().expect("popularity lock");
        if let Some(count) = pending.get_mut(key) {
            *count += 1;
        } else if pending.len() < PENDING_KEYS {
            pending.insert(key.to_owned(), 1);
        }
        Some(entry.answer)
    }

    /// Keeps a copy of an answer read from Redis with `ttl` left there;
    /// returns it as held (kept or not).
    pub fn insert(&self, key: &str, answer: CachedAnswer, ttl: Duration) -> Arc<HotAnswer> {
        let answer = Arc::new(HotAnswer::new(answer));
        if let Some(entries) = &self.entries
            && !ttl.is_zero()
        {
            let entry = Entry {
                answer: answer.clone(),
                ttl,
            };
            entries.insert(key.to_owned(), entry);
        }
        answer
    }

    /// The hits counted since the last call.
    pub fn take_popularity(&self) -> Vec<(String, u64)> {
        let mut pending = self.pending.lock().expect("popularity lock");
        pending.drain().collect()
    }

    /// Bytes held now (after moka's pending maintenance).
    pub fn weighted_size(&self) -> u64 {
        self.entries.as_ref().map_or(0, |entries| {
            entries.run_pending_tasks();
            entries.weighted_size()
        })
    }
}

/// Loads the most asked entries from Redis (two round trips). A Redis
/// that cannot be reached leaves the cache cold, with a warning: the
/// gateway still serves, from Redis once it is back.
pub async fn warm(cache: &HotCache, store: &Store) -> usize {
    let most_asked = tokio::time::timeout(WARM_TIMEOUT, store.most_asked(WARM_TOP)).await;
    match most_asked.unwrap_or_else(|_| Err(ebb_store::StoreError::TimedOut("the warm-up"))) {
        Ok(entries) => {
            let loaded = entries.len();
            for (key, answer, ttl) in entries {
                cache.insert(&key, answer, ttl);
            }
            loaded
        }
        Err(err) => {
            tracing::warn!(cause = %err, "cannot warm the hot cache: starting cold");
            0
        }
    }
}

/// Adds the hits of the last [`FLUSH_EVERY`] to Redis's popularity
/// counts until `stop`; one pipelined round trip per flush.
pub async fn keep_popularity(
    cache: Arc<HotCache>,
    store: Store,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    let mut every = tokio::time::interval(FLUSH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = every.tick() => {}
        }
        let hits = cache.take_popularity();
        if hits.is_empty() {
            continue;
        }
        let counted = store.count_asked(&hits);
        // Lost with Redis away: popularity only orders a future warm-up.
        store.degradable("cache popularity counts", counted).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ebb_nats::FinishReason;

    fn answer(text: &str) -> CachedAnswer {
        CachedAnswer {
            answer: text.to_owned(),
            model: "m@main".into(),
            language: None,
            finish_reason: FinishReason::Stop,
        }
    }

    #[test]
    fn hits_are_counted_for_popularity_and_taken_once() {
        let cache = HotCache::new(1);
        cache.insert("k", answer("a"), Duration::from_secs(60));
        assert!(cache.get("k").is_some());
        assert!(cache.get("k").is_some());
        assert!(cache.get("missing").is_none());
        assert_eq!(cache.take_popularity(), vec![("k".to_owned(), 2)]);
        assert!(cache.take_popularity().is_empty());
    }

    #[test]
    fn a_copy_expires_with_its_redis_entry() {
        let cache = HotCache::new(1);
        cache.insert("short", answer("a"), Duration::from_millis(50));
        cache.insert("gone", answer("b"), Duration::ZERO);
        assert!(cache.get("short").is_some());
        assert!(
            cache.get("gone").is_none(),
            "an expired entry is not copied"
        );
        std::thread::sleep(Duration::from_millis(120));
        assert!(cache.get("short").is_none());
    }

    #[test]
    fn the_bytes_stay_bounded_under_many_distinct_answers() {
        let cache = HotCache::new(1);
        let text = "x".repeat(1_000);
        for n in 0..5_000 {
            cache.insert(&format!("key-{n}"), answer(&text), Duration::from_secs(60));
        }
        let held = cache.weighted_size();
        assert!(held <= 1024 * 1024, "{held} bytes held");
        assert!(held > 512 * 1024, "the cache is used: {held} bytes");
    }

    #[test]
    fn a_frequent_question_survives_a_flood_of_one_off_ones() {
        let cache = HotCache::new(1);
        let text = "y".repeat(2_000);
        cache.insert("favourite", answer(&text), Duration::from_secs(60));
        for _ in 0..20 {
            assert!(cache.get("favourite").is_some());
        }
        for n in 0..5_000 {
            cache.insert(&format!("once-{n}"), answer(&text), Duration::from_secs(60));
            if n % 100 == 0 {
                cache.get("favourite");
            }
        }
        cache.weighted_size();
        assert!(
            cache.get("favourite").is_some(),
            "evicted by one-off questions"
        );
    }

    #[test]
    fn a_zero_size_cache_holds_nothing() {
        let cache = HotCache::new(0);
        cache.insert("k", answer("a"), Duration::from_secs(60));
        assert!(cache.get("k").is_none());
    }
}
