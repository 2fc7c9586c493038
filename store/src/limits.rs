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
//! and capped in size).

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
    /// Whether every bucket had a token (then each gave one; else none did).
    pub allowed: bool,
    /// Tokens left in each bucket afterwards, in the order given.
    pub tokens: Vec<f64>,
}

impl Store {
    /// Takes one token from each of `buckets`, all or none: a client
    /// refused by its key's bucket spends nothing from its IP's.
    pub async fn take_tokens(&self, buckets: &[Bucket]) -> Result<Taken, StoreError> {
        let script = redis::Script::new(
            r#"
            local time = redis.call('TIME')
            local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
            local left, allowed = {}, true
            for i, key in ipairs(KEYS) do
              local size = tonumber(ARGV[i]) * 1000
              local stored = redis.call('HMGET', key, 'm', 'at')
              local milli, at = tonumber(stored[1]), tonumber(stored[2])
              if milli == nil or at == nil then milli, at = size, now end
              -- size / 60 s refill: size milli-tokens a minute = size/60000 a ms.
              milli = math.min(size, milli + math.max(0, now - at) * size / 60000)
              left[i] = milli
              if milli < 1000 then allowed = false end
            end
            for i, key in ipairs(KEYS) do
              local size = tonumber(ARGV[i]) * 1000
              if allowed then left[i] = left[i] - 1000 end
              left[i] = math.floor(left[i])
              redis.call('HSET', key, 'm', left[i], 'at', now)
              redis.call('PEXPIRE', key, math.ceil((size - left[i]) * 60000 / size) + 1000)
            end
            return {allowed and 1 or 0, left}
            "#,
        );
        let mut invocation = script.prepare_invoke();
        for bucket in buckets {
            invocation.key(&bucket.key);
        }
        for bucket in buckets {
            invocation.arg(bucket.per_minute);
        }
        let mut connection = self.connection.clone();
        let (allowed, left): (i64, Vec<i64>) = invocation.invoke_async(&mut connection).await?;
        Ok(Taken {
            allowed: allowed == 1,
            tokens: left
                .into_iter()
                .map(|milli| milli as f64 / 1000.0)
                .collect(),
        })
    }

    /// Takes a shedding place named `id` for a question about to be queued
    /// and returns how many places the caller's last depth reading did not
    /// include: every place still being queued (by any gateway), and every
    /// place queued at or after `reading_started_ms` (Redis time; 0 when
    /// unknown: then all places of the last [`KEPT_FOR`]). At `cap` places the
    /// set grows no more.
    pub async fn reserve_place(
        &self,
        id: &str,
        reading_started_ms: u64,
        cap: u64,
    ) -> Result<u64, StoreError> {
        // A place being queued is scored a minute ahead, so it counts as
        // "after any reading" and still goes if its gateway dies with it.
        let script = redis::Script::new(
            r#"
            local time = redis.call('TIME')
            local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
            redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]))
            local ahead = redis.call('ZCOUNT', KEYS[1], ARGV[2], '+inf')
            if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
              redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), ARGV[1])
            end
            redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]) + tonumber(ARGV[4]))
            return ahead
            "#,
        );
        let mut connection = self.connection.clone();
        let ahead: u64 = script
            .key(PLACES_KEY)
            .arg(id)
            .arg(reading_started_ms)
            .arg(cap)
            .arg(KEPT_FOR.as_millis() as u64)
            .arg(QUEUEING_FOR.as_millis() as u64)
            .invoke_async(&mut connection)
            .await?;
        Ok(ahead)
    }

    /// Place `id`'s question is queued: from now on it counts only for
    /// depth readings that started before now (Redis time).
    pub async fn keep_place(&self, id: &str) -> Result<(), StoreError> {
        let script = redis::Script::new(
            r#"
            local time = redis.call('TIME')
            local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
            return redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
            "#,
        );
        let mut connection = self.connection.clone();
        let _: i64 = script
            .key(PLACES_KEY)
            .arg(id)
            .invoke_async(&mut connection)
            .await?;
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
