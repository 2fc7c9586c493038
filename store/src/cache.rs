//! The answer cache in Redis as the gateway's edge uses it: a lookup that,
//! on a miss, writes the question's first `queued` record in the same
//! round trip; the popularity counts a starting gateway warms its memory
//! from.
//!
//! Keys: `ebb:cache:<sha256>` (the entries, see [`crate::store`]) and
//! `ebb:cache-popularity` (a sorted set: cache key -> times asked, at most
//! [`POPULAR_KEPT`] members; keys and counts only, never question text).

use std::sync::LazyLock;
use std::time::Duration;

use ebb_nats::{CachedAnswer, QuestionRecord};

use crate::limits::{PLACES_KEY, PlaceRequest, take_place_lua};
use crate::store::{RECORD_TTL, Store, StoreError, cache_key, record_key};

/// The sorted set of how often each cache key was asked.
pub const POPULARITY_KEY: &str = "ebb:cache-popularity";
/// Members the popularity set keeps (the most asked).
pub const POPULAR_KEPT: usize = 10_000;

/// What one accept's round trip found.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// A cached answer, with what is left of its TTL.
    Hit { answer: CachedAnswer, ttl: Duration },
    /// No answer cached: the `queued` record is there; `wrote` unless a
    /// record was there already (a retry under the same idempotency key).
    /// With a place asked for, it is taken, and `places_ahead` counts the
    /// places the caller's last depth reading may not include.
    Queued {
        wrote: bool,
        places_ahead: Option<u64>,
    },
}

/// KEYS: the cache entry, the record, the popularity set, the shedding
/// places. ARGV: the record's JSON, its TTL in seconds, the cache key,
/// whether to look the cache up at all ("1"/"0"), then the place's name
/// ('' for none), the reading's start and the cap. A hit counts towards
/// popularity. Returns `{1, entry, PTTL, -1}` on a hit, else
/// `{0, '', 1 if it wrote the record, places ahead or -1}`.
const LOOKUP_OR_QUEUE: &str = r#"
if ARGV[4] == '1' then
  local hit = redis.call('GET', KEYS[1])
  if hit then
    redis.call('ZINCRBY', KEYS[3], 1, ARGV[3])
    return {1, hit, redis.call('PTTL', KEYS[1]), -1}
  end
end
local wrote = 0
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) then
  wrote = 1
end
local ahead = -1
if ARGV[5] ~= '' then
  ahead = take_place(KEYS[4], ARGV[5], ARGV[6], tonumber(ARGV[7]))
end
return {0, '', wrote, ahead}
"#;

/// [`LOOKUP_OR_QUEUE`] after the place-taking function, hashed once
/// (SHA-1, for EVALSHA).
static LOOKUP_OR_QUEUE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{}{LOOKUP_OR_QUEUE}", take_place_lua())));

fn corrupt(key: &str) -> impl FnOnce(serde_json::Error) -> StoreError + '_ {
    move |source| StoreError::Corrupt {
        key: key.to_owned(),
        source,
    }
}

/// A PTTL reply as a duration; a key without expiry (-1) counts as the
/// record TTL, a missing one (-2) as none.
fn remaining(pttl_ms: i64) -> Duration {
    match pttl_ms {
        -1 => RECORD_TTL,
        ms if ms > 0 => Duration::from_millis(ms as u64),
        _ => Duration::ZERO,
    }
}

impl Store {
    /// The answer cached under `key`, or, when there is none (or no key),
    /// `record` written as the question's first `queued` record (`SET NX`:
    /// a worker may have written a later one) and `place` taken: one round
    /// trip.
    pub async fn cached_or_queue(
        &self,
        key: Option<&str>,
        record: &QuestionRecord,
        place: Option<PlaceRequest<'_>>,
    ) -> Result<Lookup, StoreError> {
        let entry = cache_key(key.unwrap_or_default());
        let body = serde_json::to_string(record).expect("records serialize");
        let mut connection = self.connection.clone();
        let (hit, entry_body, number, ahead): (i64, Vec<u8>, i64, i64) = LOOKUP_OR_QUEUE_SCRIPT
            .key(&entry)
            .key(record_key(&record.id))
            .key(POPULARITY_KEY)
            .key(PLACES_KEY)
            .arg(body)
            .arg(RECORD_TTL.as_secs())
            .arg(key.unwrap_or_default())
            .arg(if key.is_some() { "1" } else { "0" })
            .arg(place.map_or("", |place| place.id))
            .arg(place.map_or(0, |place| place.reading_started_ms))
            .arg(place.map_or(0, |place| place.cap))
            .invoke_async(&mut connection)
            .await?;
        if hit == 0 {
            return Ok(Lookup::Queued {
                wrote: number == 1,
                places_ahead: u64::try_from(ahead).ok(),
            });
        }
        Ok(Lookup::Hit {
            answer: serde_json::from_slice(&entry_body).map_err(corrupt(&entry))?,
            ttl: remaining(number),
        })
    }

    /// The answer cached under `key` and what is left of its TTL.
    pub async fn cached_answer_with_ttl(
        &self,
        key: &str,
    ) -> Result<Option<(CachedAnswer, Duration)>, StoreError> {
        let entry = cache_key(key);
        let mut connection = self.connection.clone();
        let (body, pttl): (Option<Vec<u8>>, i64) = redis::pipe()
            .get(&entry)
            .pttl(&entry)
            .query_async(&mut connection)
            .await?;
        body.map(|body| {
            let answer = serde_json::from_slice(&body).map_err(corrupt(&entry))?;
            Ok((answer, remaining(pttl)))
        })
        .transpose()
    }

    /// Adds `hits` (cache key, times) to the popularity counts and trims
    /// them to the [`POPULAR_KEPT`] most asked: one pipelined round trip.
    pub async fn count_asked(&self, hits: &[(String, u64)]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for (key, times) in hits {
            pipe.zincr(POPULARITY_KEY, key, *times).ignore();
        }
        let keep_from = -(POPULAR_KEPT as isize) - 1;
        pipe.zremrangebyrank(POPULARITY_KEY, 0, keep_from).ignore();
        let mut connection = self.connection.clone();
        let () = pipe.query_async(&mut connection).await?;
        Ok(())
    }

    /// The `top` most asked entries still cached, with their TTLs left:
    /// two round trips (the ranking, then the entries). Unreadable or
    /// expired entries are skipped.
    pub async fn most_asked(
        &self,
        top: usize,
    ) -> Result<Vec<(String, CachedAnswer, Duration)>, StoreError> {
        let mut connection = self.connection.clone();
        let keys: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(POPULARITY_KEY)
            .arg(0)
            .arg(top.saturating_sub(1))
            .query_async(&mut connection)
            .await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.get(cache_key(key)).pttl(cache_key(key));
        }
        let replies: Vec<(Option<Vec<u8>>, i64)> = pipe.query_async(&mut connection).await?;
        Ok(keys
            .into_iter()
            .zip(replies)
            .filter_map(|(key, (body, pttl))| {
                let answer = serde_json::from_slice(&body?).ok()?;
                Some((key, answer, remaining(pttl)))
            })
            .collect())
    }
}
