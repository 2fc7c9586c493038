//! Rate limits every gateway shares: the buckets live in Redis
//! ([`ebb_store::limits`]), so N gateways together allow the configured
//! rate, not N times it. While Redis cannot be reached each gateway falls
//! back to its own buckets ([`RateLimiter`]) with a warning: limits per
//! process, never no limit.
//!
//! A client with a high limit takes up to a second's worth of tokens in one
//! round trip and spends them here ([`Allowance`]): a gateway asks Redis
//! once per batch, not once per request (a cache hit from memory then
//! needs no round trip at all). Limits under 120 a minute take one token at
//! a time, exactly as before. An allowance unspent after a second is
//! dropped, counted as spent: together the gateways never allow more than
//! the limit, and a client loses at most a second's worth per gateway. A
//! refusal is kept until a token can have come back, so a client retrying
//! in a loop costs Redis one call per refill, not one per request.

use std::collections::HashMap;
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

/// The most tokens one round trip takes for a client.
const MAX_BATCH: u32 = 100;
/// How long tokens taken ahead are kept for their client.
const ALLOWANCE_FOR: Duration = Duration::from_secs(1);

/// Tokens a round trip takes for a client of `per_minute`: a second's worth.
fn batch(per_minute: u32) -> u32 {
    (per_minute / 60).clamp(1, MAX_BATCH)
}

/// Tokens taken from the shared buckets ahead of need, with the decision
/// Redis's answer made (its headers, less what is spent since).
#[derive(Debug, Clone, Copy)]
struct Allowance {
    left: u32,
    decision: Decision,
    until: Instant,
}

/// A client: its IP, and its API key's name when it gave one.
type Client = (IpAddr, Option<String>);

/// Per-client buckets: in Redis, or this process's own while it is away.
#[derive(Debug)]
pub struct ClientLimits {
    store: Store,
    redis: RedisPause,
    ip: RateLimiter<IpAddr>,
    /// One bucket per configured key: bounded by the config.
    keys: RateLimiter<String>,
    /// Tokens taken ahead, per client; at most `max_clients` entries.
    allowances: Mutex<HashMap<Client, Allowance>>,
    max_clients: usize,
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
            allowances: Mutex::default(),
            max_clients,
        }
    }

    /// One token of the client's allowance, if it has one left; or its
    /// refusal again while no token can have come back (exact: the
    /// buckets refill on a fixed clock, and other gateways only take).
    fn spend_allowance(&self, client: &Client, now: Instant) -> Option<Decision> {
        let mut allowances = self.allowances.lock().expect("allowances lock");
        let allowance = allowances.get_mut(client).filter(|a| a.until > now)?;
        if !allowance.decision.allowed {
            let retry_after = allowance.until - now;
            return Some(Decision {
                retry_after,
                ..allowance.decision
            });
        }
        allowance.left = allowance.left.checked_sub(1)?;
        Some(Decision {
            remaining: allowance.decision.remaining + allowance.left,
            ..allowance.decision
        })
    }

    /// Keeps what a round trip took beyond this request's token, or the
    /// refusal it made, for the client's next requests.
    fn keep_allowance(&self, client: Client, taken: u32, decision: Decision, now: Instant) {
        let until = if decision.allowed {
            now + ALLOWANCE_FOR
        } else {
            now + decision.retry_after.min(ALLOWANCE_FOR)
        };
        let left = taken.saturating_sub(1);
        if decision.allowed && left == 0 {
            return;
        }
        let mut allowances = self.allowances.lock().expect("allowances lock");
        if let Some(kept) = allowances.get_mut(&client)
            && kept.until > now
            && kept.decision.allowed
            && decision.allowed
        {
            // Concurrent requests found the allowance spent and each took a
            // batch: all of it is the client's, none is dropped.
            kept.left += left;
            kept.decision = decision;
            kept.until = until;
            return;
        }
        if allowances.len() >= self.max_clients && !allowances.contains_key(&client) {
            // Full: this client asks Redis each time until a sweep.
            return;
        }
        allowances.insert(
            client,
            Allowance {
                left,
                decision,
                until,
            },
        );
    }

    /// One token from the client IP's bucket and, with a key, the key's
    /// bucket (`(name, per_minute)`); the stricter decision of the two.
    pub async fn take(&self, ip: IpAddr, per_ip: u32, key: Option<(&str, u32)>) -> Decision {
        let now = Instant::now();
        let want = batch(per_ip).min(key.map_or(MAX_BATCH, |(_, per_minute)| batch(per_minute)));
        let client = (ip, key.map(|(name, _)| name.to_owned()));
        if let Some(decision) = self.spend_allowance(&client, now) {
            return decision;
        }
        let mut buckets = vec![Bucket::new("ip", &ip.to_string(), per_ip)];
        if let Some((name, per_minute)) = key {
            buckets.push(Bucket::new("key", name, per_minute));
        }
        if let Some(taken) = self
            .redis
            .call(&self.store, self.store.take_tokens(&buckets, want))
            .await
        {
            let decision = buckets
                .iter()
                .zip(&taken.tokens)
                .map(|(bucket, &tokens)| {
                    // A bucket with a token left refused nothing itself.
                    let allowed = taken.allowed() || tokens >= 1.0;
                    crate::rate_limit::decision(bucket.per_minute, tokens, allowed)
                })
                .reduce(Decision::stricter)
                .expect("the IP's bucket at least");
            self.keep_allowance(client, taken.taken, decision, now);
            return decision;
        }
        let decision = self.ip.take(&ip, per_ip, now);
        match key {
            Some((name, per_minute)) => {
                decision.stricter(self.keys.take(&name.to_owned(), per_minute, now))
            }
            None => decision,
        }
    }

    /// Drops the fallback's idle IP buckets and the allowances that ran out.
    pub fn sweep(&self, per_ip: u32, now: Instant) {
        self.ip.sweep(per_ip, now);
        let mut allowances = self.allowances.lock().expect("allowances lock");
        allowances.retain(|_, allowance| allowance.until > now);
    }

    /// Client IPs in the fallback's buckets.
    pub fn local_clients(&self) -> usize {
        self.ip.clients()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(remaining: u32) -> Decision {
        crate::rate_limit::decision(60_000, f64::from(remaining), true)
    }

    #[tokio::test]
    async fn batches_taken_at_once_are_all_spent_before_asking_again() {
        let limits = ClientLimits::new(Store::connect_lazy("redis://127.0.0.1:1").unwrap(), 10);
        let client: Client = ("10.0.0.1".parse().unwrap(), None);
        let now = Instant::now();
        // Two requests found no allowance and took 100 tokens each.
        limits.keep_allowance(client.clone(), 100, allowed(800), now);
        limits.keep_allowance(client.clone(), 100, allowed(700), now);
        let spent = std::iter::from_fn(|| limits.spend_allowance(&client, now))
            .take(1_000)
            .collect::<Vec<_>>();
        assert_eq!(spent.len(), 198, "each batch less its own request's token");
        assert_eq!(spent[0].remaining, 700 + 197, "the newest bucket reading");
        assert!(
            limits
                .spend_allowance(&client, now + ALLOWANCE_FOR)
                .is_none(),
            "gone after a second"
        );
    }
}
