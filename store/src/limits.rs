//! Limits every gateway shares: token buckets per client and the places
//! reserved under the shedding estimate live in Redis, changed by scripts
//! (atomic: two gateways cannot both spend the last token), on Redis's
//! clock (the gateways' clocks may disagree).
//!
//! Keys: `ebb:rate:<kind>:<client>` (hash: `m` milli-tokens left, `at` ms
//! of the last update; expires once the bucket would be full again, so
//! idle clients hold no memory) and [`PLACES_KEY`] (sorted set of
//! shedding places: scored [`QUEUEING_FOR`] ahead while their question is
//! being queued, then by the ms it was queued; trimmed at each reservation
//! and capped in size). A place is taken in the same script as the cache
//! lookup and the `queued` record ([`crate::cache`]): one round trip.

use std::sync::LazyLock;
use std::time::Duration;

use crate::{Store, StoreError};

/// The sorted set of shedding places.
pub const PLACES_KEY: &str = "ebb:shedding:places";
/// A queued place is kept this long: far past every gateway's next depth
/// reading (every 250 ms), which then includes its question.
pub const KEPT_FOR: Duration = Duration::from_secs(2);
/// A place being queued counts this long at most (a gateway that died
/// while publishing never gives it back).
pub const QUEUEING_FOR: Duration = Duration::from_secs(60);

/// A shedding place to take for a question about to be queued, in the
/// round trip that looks its answer up and writes its record
/// ([`Store::cached_or_queue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaceRequest<'a> {
    /// The place's name (unique per gateway and request).
    pub id: &'a str,
    /// When the caller's last depth reading started (Redis time, ms; 0 when
    /// unknown: then every place of the last [`KEPT_FOR`] counts).
    pub reading_started_ms: u64,
    /// At this many places the set grows no more.
    pub cap: u64,
}

/// Lua: `take_place(places, id, since, cap)` adds place `id` (scored
/// [`QUEUEING_FOR`] ahead, so it counts as "after any reading" and still
/// goes if its gateway dies with it) and returns how many places a reading
/// started at `since` may not include: every place still being queued (by
/// any gateway), and every place queued since. Trims places older than
/// [`KEPT_FOR`] first.
pub(crate) fn take_place_lua() -> String {
    format!(
        r#"
local function take_place(places, id, since, cap)
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', places, '-inf', now - {kept_for})
  local ahead = redis.call('ZCOUNT', places, since, '+inf')
  if redis.call('ZCARD', places) < cap then
    redis.call('ZADD', places, now + {queueing_for}, id)
  end
  redis.call('PEXPIRE', places, {queueing_for} + {kept_for})
  return ahead
end
"#,
        kept_for = KEPT_FOR.as_millis(),
        queueing_for = QUEUEING_FOR.as_millis(),
    )
}

/// A bucket to take from: its key and its size (tokens a minute, which is
/// also how fast it refills).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub key: String,
    pub per_minute: u32,
}

impl Bucket {
    /// The bucket of one client of a kind (`ip`, `key`).
    pub fn new(kind: &str, client: &str, per_minute: u32) -> Bucket {
        Bucket {
            key: format!("ebb:rate:{kind}:{client}"),
            per_minute: per_minute.max(1),
        }
    }
}

/// What [`Store::take_tokens`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Taken {
    /// Tokens taken from each bucket (the same from all; 0: refused, and
    /// none spent).
    pub taken: u32,
    /// Tokens left in each bucket afterwards, in the order given.
    pub tokens: Vec<f64>,
}

impl Taken {
    pub fn allowed(&self) -> bool {
        self.taken > 0
    }
}

impl Store {
    /// Takes up to `want` tokens (at least one) from each of `buckets`, as
    /// many as the emptiest one holds, all or none: a client refused by its
    /// key's bucket spends nothing from its IP's.
    pub async fn take_tokens(&self, buckets: &[Bucket], want: u32) -> Result<Taken, StoreError> {
        // Built once: a Script hashes its source (SHA-1, for EVALSHA) when made.
        static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
            redis::Script::new(
                r#"
            local time = redis.call('TIME')
            local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
            local want = tonumber(ARGV[#KEYS + 1])
            local left, take = {}, want
            for i, key in ipairs(KEYS) do
              local size = tonumber(ARGV[i]) * 1000
              local stored = redis.call('HMGET', key, 'm', 'at')
              local milli, at = tonumber(stored[1]), tonumber(stored[2])
              if milli == nil or at == nil then milli, at = size, now end
              -- size / 60 s refill: size milli-tokens a minute = size/60000 a ms.
              milli = math.min(size, milli + math.max(0, now - at) * size / 60000)
              left[i] = milli
              take = math.min(take, math.floor(milli / 1000))
            end
            for i, key in ipairs(KEYS) do
              local size = tonumber(ARGV[i]) * 1000
              left[i] = math.floor(left[i] - take * 1000)
              redis.call('HSET', key, 'm', left[i], 'at', now)
              redis.call('PEXPIRE', key, math.ceil((size - left[i]) * 60000 / size) + 1000)
            end
            return {take, left}
            "#,
            )
        });
        let script = &*SCRIPT;
        let mut invocation = script.prepare_invoke();
        for bucket in buckets {
            invocation.key(&bucket.key);
        }
        for bucket in buckets {
            invocation.arg(bucket.per_minute);
        }
        invocation.arg(want.max(1));
        let mut connection = self.connection.clone();
        let (taken, left): (i64, Vec<i64>) = invocation.invoke_async(&mut connection).await?;
        Ok(Taken {
            taken: u32::try_from(taken).unwrap_or(0),
            tokens: left
                .into_iter()
                .map(|milli| milli as f64 / 1000.0)
                .collect(),
        })
    }

    /// The questions of places `ids` are queued: from now on each counts
    /// only for depth readings that started before now (Redis time). One
    /// call for a batch (see the gateway's `overload`).
    pub async fn keep_places(&self, ids: &[String]) -> Result<(), StoreError> {
        // Built once: a Script hashes its source (SHA-1, for EVALSHA) when made.
        static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
            redis::Script::new(
                r#"
            local time = redis.call('TIME')
            local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
            for _, id in ipairs(ARGV) do
              redis.call('ZADD', KEYS[1], 'XX', now, id)
            end
            return #ARGV
            "#,
            )
        });
        if ids.is_empty() {
            return Ok(());
        }
        let mut invocation = SCRIPT.key(PLACES_KEY);
        for id in ids {
            invocation.arg(id);
        }
        let mut connection = self.connection.clone();
        let _: i64 = invocation.invoke_async(&mut connection).await?;
        Ok(())
    }

    /// Redis's clock (ms since the epoch): what depth readings are dated by.
    pub async fn redis_time_ms(&self) -> Result<u64, StoreError> {
        let mut connection = self.connection.clone();
        let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut connection).await?;
        Ok(seconds * 1000 + micros / 1000)
    }

    /// Gives back place `id` (its question was not queued).
    pub async fn release_place(&self, id: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: i64 = redis::cmd("ZREM")
            .arg(PLACES_KEY)
            .arg(id)
            .query_async(&mut connection)
            .await?;
        Ok(())
    }
}
