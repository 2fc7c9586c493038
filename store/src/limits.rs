//! Limits every gateway shares: token buckets per client and the places
//! reserved under the shedding estimate live in Redis, changed by scripts
//! (atomic: two gateways cannot both spend the last token), on Redis's
//! clock (the gateways' clocks may disagree).
//!
//! Keys: `ebb:rate:<kind>:<client>` (hash: `m` milli-tokens left, `at` ms
//! of the last update; expires once the bucket would be full again, so
//! idle clients hold no memory) and [`PLACES_KEY`] (sorted set of
//! reservation ids scored by the ms they were taken; trimmed to the last
//! window at each reservation and capped in size).

use std::time::Duration;

use crate::{Store, StoreError};

/// The sorted set of shedding places taken in the last window.
pub const PLACES_KEY: &str = "ebb:shedding:places";

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

    /// Takes a shedding place named `id` and returns how many other places
    /// were taken, by any gateway, in the last `window` (the questions
    /// being queued now or queued too recently for every gateway's depth
    /// reading to include them). At `cap` places the set grows no more.
    pub async fn reserve_place(
        &self,
        id: &str,
        window: Duration,
        cap: u64,
    ) -> Result<u64, StoreError> {
        let script = redis::Script::new(
            r#"
            local time = redis.call('TIME')
            local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
            local window = tonumber(ARGV[2])
            redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
            local others = redis.call('ZCARD', KEYS[1])
            if others < tonumber(ARGV[3]) then
              redis.call('ZADD', KEYS[1], now, ARGV[1])
            end
            redis.call('PEXPIRE', KEYS[1], window)
            return others
            "#,
        );
        let mut connection = self.connection.clone();
        let others: u64 = script
            .key(PLACES_KEY)
            .arg(id)
            .arg(window.as_millis() as u64)
            .arg(cap)
            .invoke_async(&mut connection)
            .await?;
        Ok(others)
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
