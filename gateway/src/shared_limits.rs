//! Rate limits every gateway shares: the buckets live in Redis
//! ([`ebb_store::limits`]), so N gateways together allow the configured
//! rate, not N times it. While Redis cannot be reached each gateway falls
//! back to its own buckets ([`RateLimiter`]) with a warning: limits per
//! process, never no limit.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ebb_store::{Bucket, Store};

use crate::rate_limit::{Decision, RateLimiter};

/// After a failed Redis call, Redis is left alone this long: during an
/// outage every request would otherwise wait for the call's timeout.
const REDIS_RETRY: Duration = Duration::from_secs(2);

/// What a Redis outage costs these limits, for the outage's log line.
const LOSES: &str =
    "shared rate limits and shedding places: each gateway counts alone until Redis is back";

/// Whether shared state in Redis is worth asking for now: not for
/// [`REDIS_RETRY`] after a failure.
#[derive(Debug, Default)]
pub struct RedisPause {
    failed_at: Mutex<Option<Instant>>,
}

impl RedisPause {
    pub fn usable(&self, now: Instant) -> bool {
        match *self.failed_at.lock().expect("redis pause lock") {
            Some(failed) => now.saturating_duration_since(failed) >= REDIS_RETRY,
            None => true,
        }
    }

    /// Runs `call` on Redis unless paused; `None` (and a pause) on failure.
    pub async fn call<T>(
        &self,
        store: &Store,
        call: impl Future<Output = Result<T, ebb_store::StoreError>>,
    ) -> Option<T> {
        let now = Instant::now();
        if !self.usable(now) {
            return None;
        }
        let result = store.degradable(LOSES, call).await;
        *self.failed_at.lock().expect("redis pause lock") = result.is_none().then_some(now);
        result
    }
}

/// Per-client buckets: in Redis, or this process's own while it is away.
#[derive(Debug)]
pub struct ClientLimits {
    store: Store,
    redis: RedisPause,
    ip: RateLimiter<IpAddr>,
    /// One bucket per configured key: bounded by the config.
    keys: RateLimiter<String>,
}

impl ClientLimits {
    /// `max_clients` bounds the local fallback's IP buckets (Redis's expire
    /// once full).
    pub fn new(store: Store, max_clients: usize) -> Self {
        ClientLimits {
            store,
            redis: RedisPause::default(),
            ip: RateLimiter::new(max_clients),
            keys: RateLimiter::new(usize::MAX),
        }
    }

    /// One token from the client IP's bucket and, with a key, the key's
    /// bucket (`(name, per_minute)`); the stricter decision of the two.
    pub async fn take(&self, ip: IpAddr, per_ip: u32, key: Option<(&str, u32)>) -> Decision {
        let mut buckets = vec![Bucket::new("ip", &ip.to_string(), per_ip)];
        if let Some((name, per_minute)) = key {
            buckets.push(Bucket::new("key", name, per_minute));
        }
        if let Some(taken) = self
            .redis
            .call(&self.store, self.store.take_tokens(&buckets))
            .await
        {
            return buckets
                .iter()
                .zip(taken.tokens)
                .map(|(bucket, tokens)| {
                    // A bucket with a token left refused nothing itself.
                    let allowed = taken.allowed || tokens >= 1.0;
                    crate::rate_limit::decision(bucket.per_minute, tokens, allowed)
                })
                .reduce(Decision::stricter)
                .expect("the IP's bucket at least");
        }
        let now = Instant::now();
        let decision = self.ip.take(&ip, per_ip, now);
        match key {
            Some((name, per_minute)) => {
                decision.stricter(self.keys.take(&name.to_owned(), per_minute, now))
            }
            None => decision,
        }
    }

    /// Drops the fallback's idle IP buckets.
    pub fn sweep(&self, per_ip: u32, now: Instant) {
        self.ip.sweep(per_ip, now);
    }

    /// Client IPs in the fallback's buckets.
    pub fn local_clients(&self) -> usize {
        self.ip.clients()
    }
}
