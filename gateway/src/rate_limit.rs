//! Token-bucket rate limits per client IP and per API key, as one process
//! keeps them (the fallback of [`crate::shared_limits`] while Redis is
//! away, and the failed-authentication budget), and finding the client's IP
//! behind trusted proxies.
//!
//! A bucket holds up to `per_minute` tokens and refills continuously at
//! `per_minute / 60` a second; each question takes one. Buckets live in a
//! bounded map: full buckets (clients idle for a minute) are dropped by
//! [`RateLimiter::sweep`], and when the map is full a new client is refused
//! rather than the map growing.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// Outcome of taking one token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// The bucket's size (`X-RateLimit-Limit`, per minute).
    pub limit: u32,
    /// Whole tokens left after this request (`X-RateLimit-Remaining`).
    pub remaining: u32,
    /// Until the bucket is full again (`X-RateLimit-Reset`).
    pub reset: Duration,
    /// Until one token is available (`Retry-After`); zero when allowed.
    pub retry_after: Duration,
}

impl Decision {
    /// The stricter of two decisions: refused beats allowed, then fewer left.
    pub fn stricter(self, other: Decision) -> Decision {
        match (self.allowed, other.allowed) {
            (true, false) => other,
            (false, true) => self,
            (false, false) if other.retry_after > self.retry_after => other,
            (true, true) if other.remaining < self.remaining => other,
            _ => self,
        }
    }
}

/// The decision for a bucket of `per_minute` left with `tokens` after a
/// request it `allowed` (took a token for) or refused.
pub fn decision(per_minute: u32, tokens: f64, allowed: bool) -> Decision {
    let capacity = f64::from(per_minute.max(1));
    let refill_per_second = capacity / 60.0;
    let seconds = |tokens: f64| Duration::from_secs_f64((tokens / refill_per_second).max(0.0));
    Decision {
        allowed,
        limit: per_minute,
        remaining: tokens.floor() as u32,
        reset: seconds(capacity - tokens),
        retry_after: if allowed {
            Duration::ZERO
        } else {
            seconds(1.0 - tokens)
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Buckets keyed by client (IP or API key name).
#[derive(Debug)]
pub struct RateLimiter<K> {
    buckets: Mutex<HashMap<K, Bucket>>,
    max_clients: usize,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(max_clients: usize) -> Self {
        RateLimiter {
            buckets: Mutex::new(HashMap::new()),
            max_clients,
        }
    }

    /// Takes one token from `client`'s bucket of `per_minute`.
    pub fn take(&self, client: &K, per_minute: u32, now: Instant) -> Decision {
        let capacity = f64::from(per_minute.max(1));
        let refill_per_second = capacity / 60.0;
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if !buckets.contains_key(client) && buckets.len() >= self.max_clients {
            sweep_full(&mut buckets, capacity, refill_per_second, now);
            if buckets.len() >= self.max_clients {
                return Decision {
                    allowed: false,
                    limit: per_minute,
                    remaining: 0,
                    reset: Duration::from_secs(60),
                    retry_after: Duration::from_secs(60),
                };
            }
        }
        let bucket = buckets.entry(client.clone()).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * refill_per_second).min(capacity);
        bucket.updated = now;
        let allowed = bucket.tokens >= 1.0;
        if allowed {
            bucket.tokens -= 1.0;
        }
        decision(per_minute, bucket.tokens, allowed)
    }

    /// How long until `client` has a token again, if its bucket is empty
    /// now; nothing is taken (and an unknown client has a full bucket).
    pub fn exhausted(&self, client: &K, per_minute: u32, now: Instant) -> Option<Duration> {
        let capacity = f64::from(per_minute.max(1));
        let refill_per_second = capacity / 60.0;
        let buckets = self.buckets.lock().expect("rate limiter lock");
        let bucket = buckets.get(client)?;
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        let tokens = (bucket.tokens + elapsed * refill_per_second).min(capacity);
        (tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - tokens) / refill_per_second))
    }

    /// Drops buckets that have refilled completely: they hold no state.
    pub fn sweep(&self, per_minute: u32, now: Instant) {
        let capacity = f64::from(per_minute.max(1));
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        sweep_full(&mut buckets, capacity, capacity / 60.0, now);
    }

    pub fn clients(&self) -> usize {
        self.buckets.lock().expect("rate limiter lock").len()
    }
}

fn sweep_full<K>(
    buckets: &mut HashMap<K, Bucket>,
    capacity: f64,
    refill_per_second: f64,
    now: Instant,
) {
    buckets.retain(|_, bucket| {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens + elapsed * refill_per_second < capacity
    });
}

/// The bucket a client address counts in: an IPv6 client is its /64 (one
/// subscriber usually holds a whole /64, so per-address buckets would
/// give it 2^64 of them); an IPv4-mapped address is its IPv4 address.
pub fn bucket_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy;
/// then the rightmost `X-Forwarded-For` entry that is not a trusted proxy
/// (entries left of it were written by the client and prove nothing).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            // A malformed hop: nothing left of it can be trusted either.
            Err(_) => break,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        let bucket = |ip: &str| bucket_of(ip.parse().unwrap());
        assert_eq!(bucket("2001:db8:1:2::1"), bucket("2001:db8:1:2:ffff::9"));
        assert_eq!(
            bucket("2001:db8:1:2::1"),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_ne!(bucket("2001:db8:1:2::1"), bucket("2001:db8:1:3::1"));
        assert_eq!(bucket("::ffff:10.0.0.1"), bucket("10.0.0.1"));
        assert_eq!(bucket("10.0.0.1"), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn an_exhausted_bucket_is_seen_without_taking_from_it() {
        let limiter = RateLimiter::new(10);
        let start = Instant::now();
        assert_eq!(limiter.exhausted(&"a", 2, start), None);
        limiter.take(&"a", 2, start);
        assert_eq!(limiter.exhausted(&"a", 2, start), None);
        limiter.take(&"a", 2, start);
        let wait = limiter.exhausted(&"a", 2, start).expect("empty");
        assert_eq!(wait, Duration::from_secs(30));
        // Looking took nothing: half a minute later one token is back.
        assert_eq!(
            limiter.exhausted(&"a", 2, start + Duration::from_secs(30)),
            None
        );
    }

    #[test]
    fn a_bucket_allows_its_size_then_refills_over_a_minute() {
        let limiter = RateLimiter::new(10);
        let start = Instant::now();
        for n in 0..100 {
            let decision = limiter.take(&"a", 100, start);
            assert!(decision.allowed, "request {n}");
            assert_eq!(decision.remaining, 99 - n);
        }
        let refused = limiter.take(&"a", 100, start);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_millis(600));
        assert_eq!(refused.reset, Duration::from_secs(60));
        // 0.6 s later one token is back; another client is independent.
        assert!(
            limiter
                .take(&"a", 100, start + Duration::from_millis(600))
                .allowed
        );
        assert!(
            !limiter
                .take(&"a", 100, start + Duration::from_millis(600))
                .allowed
        );
        assert!(limiter.take(&"b", 100, start).allowed);
    }

    #[test]
    fn the_map_is_bounded_and_full_buckets_are_swept() {
        let limiter = RateLimiter::new(2);
        let start = Instant::now();
        assert!(limiter.take(&1, 60, start).allowed);
        assert!(limiter.take(&2, 60, start).allowed);
        assert!(!limiter.take(&3, 60, start).allowed, "map full");
        // A minute on, both buckets are full again and make room.
        let later = start + Duration::from_secs(60);
        assert!(limiter.take(&3, 60, later).allowed);
        limiter.sweep(60, later + Duration::from_secs(60));
        assert_eq!(limiter.clients(), 0);
    }

    #[test]
    fn stricter_prefers_refusal_then_fewer_tokens() {
        let limiter = RateLimiter::new(10);
        let now = Instant::now();
        let roomy = limiter.take(&"roomy", 100, now);
        let tight = limiter.take(&"tight", 2, now);
        assert_eq!(roomy.stricter(tight).limit, 2);
        limiter.take(&"tight", 2, now);
        let refused = limiter.take(&"tight", 2, now);
        assert!(!roomy.stricter(refused).allowed);
    }

    fn forwarded(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", value.parse().unwrap());
        headers
    }

    #[test]
    fn forwarded_for_counts_only_behind_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        let headers = forwarded("198.51.100.1, 203.0.113.7, 10.0.0.9");
        // Behind two trusted hops the client is the first untrusted one from the right.
        assert_eq!(
            client_ip(proxy, &headers, &trusted),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        // An untrusted peer's header is ignored: it could say anything.
        assert_eq!(client_ip(stranger, &headers, &trusted), stranger);
        // Garbage stops the walk at the last good hop.
        assert_eq!(
            client_ip(proxy, &forwarded("nonsense, 10.0.0.9"), &trusted),
            "10.0.0.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
    }
}
