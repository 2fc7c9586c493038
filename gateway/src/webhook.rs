//! Delivering webhook calls (see `ebb_nats::webhook`): POST the final
//! record to the question's `callback_url`, signed, bounded in time, retried
//! with backoff, and never to an address inside the deployment (SSRF).
//!
//! Signature: `X-Ebb-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>" under --webhook-secret>`. Receivers recompute it and reject
//! old timestamps, so a captured call cannot be replayed later.
//!
//! SSRF: the host is resolved here, every address must be public (or in
//! `--webhook-allow`), and the request goes to the checked address (no second
//! lookup a rebinding DNS server could answer differently; no redirects).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use ebb_nats::Topology;
use ebb_nats::webhook::{self, WebhookCall};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use sha2::Sha256;
use tokio::sync::Semaphore;

use crate::config::WebhookArgs;

/// Calls in flight at once per gateway.
const CONCURRENT_CALLS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TargetError {
    #[error("{0} is a private, local or reserved address (not in --webhook-allow)")]
    Private(IpAddr),
    #[error("cannot resolve {host}: {message}")]
    Resolve { host: String, message: String },
}

/// Ranges a webhook may never reach unless allow-listed: private, local and
/// reserved space, and every IPv6 prefix that carries an IPv4 address to a
/// translator or tunnel (NAT64, 6to4, Teredo, IPv4-compatible), since the
/// IPv4 address inside may be an internal one.
const INTERNAL: [&str; 26] = [
    "0.0.0.0/8",       // "this network"
    "10.0.0.0/8",      // private
    "100.64.0.0/10",   // carrier-grade NAT
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local (cloud metadata)
    "172.16.0.0/12",   // private
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // documentation
    "192.88.99.0/24",  // 6to4 relay anycast
    "192.168.0.0/16",  // private
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // documentation
    "203.0.113.0/24",  // documentation
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, broadcast included
    "::/96",           // unspecified, loopback, IPv4-compatible
    "::ffff:0:0/96",   // IPv4-mapped
    "64:ff9b::/96",    // NAT64, well-known prefix
    "64:ff9b:1::/48",  // NAT64, local use
    "100::/64",        // discard-only
    "2001::/32",       // Teredo
    "2001:db8::/32",   // documentation
    "2002::/16",       // 6to4
    "fc00::/7",        // unique local
    "fe80::/10",       // link-local
    "fec0::/10",       // site-local (deprecated, still routed by some)
];

/// Whether a webhook may never reach `ip` unless allow-listed (see
/// [`INTERNAL`]; IPv6 multicast too).
pub fn is_internal(ip: IpAddr) -> bool {
    static RANGES: std::sync::LazyLock<Vec<IpNet>> = std::sync::LazyLock::new(|| {
        INTERNAL
            .iter()
            .map(|net| net.parse().expect("valid ranges"))
            .collect()
    });
    let multicast_v6 = matches!(ip, IpAddr::V6(v6) if v6.is_multicast());
    multicast_v6 || RANGES.iter().any(|net| net.contains(&ip))
}

/// Refuses `ip` unless it is public or allow-listed.
pub fn check_address(ip: IpAddr, allow: &[IpNet]) -> Result<(), TargetError> {
    if is_internal(ip) && !allow.iter().any(|net| net.contains(&ip)) {
        return Err(TargetError::Private(ip));
    }
    Ok(())
}

/// The address to call: every resolved address must pass, the first is used.
pub async fn resolve(url: &reqwest::Url, allow: &[IpNet]) -> Result<SocketAddr, TargetError> {
    let host = url.host_str().unwrap_or_default().to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let resolve_error = |message: String| TargetError::Resolve {
        host: host.clone(),
        message,
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|err| resolve_error(err.to_string()))?
            .collect(),
    };
    for address in &addresses {
        check_address(address.ip(), allow)?;
    }
    addresses
        .first()
        .copied()
        .ok_or_else(|| resolve_error("no addresses".into()))
}

/// `t=<unix>,v1=<hex>` over `"<t>.<body>"`.
pub fn signature(secret: &str, unix_seconds: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={unix_seconds},v1={hex}")
}

/// Backoff before delivery `n + 1`: 2^(n-1) s, capped at 5 minutes.
fn retry_delay(deliveries: i64) -> Duration {
    let deliveries = deliveries.max(0) as u64;
    ebb_runtime::backoff::exponential(Duration::from_secs(1), deliveries, Duration::from_secs(300))
}

#[derive(Debug)]
enum Outcome {
    Delivered,
    Retry(String),
    GiveUp(String),
}

/// Delivers queued calls until `stop` resolves.
pub async fn run(args: WebhookArgs, topology: Topology, stop: impl Future<Output = ()>) {
    let Some(secret) = args.webhook_secret.clone() else {
        tracing::info!("webhooks off: no --webhook-secret");
        return;
    };
    let args = Arc::new((args, secret));
    let slots = Arc::new(Semaphore::new(CONCURRENT_CALLS));
    tokio::pin!(stop);
    loop {
        let consumer: jetstream::consumer::PullConsumer =
            match topology.webhooks.get_consumer(webhook::CONSUMER).await {
                Ok(consumer) => consumer,
                Err(err) => {
                    tracing::warn!(cause = %err, "webhook consumer unavailable; retrying");
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
        let mut messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!(cause = %err, "cannot pull webhook calls; retrying");
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let slot = tokio::select! {
                _ = &mut stop => return,
                slot = slots.clone().acquire_owned() => slot.expect("semaphore never closes"),
            };
            let message = tokio::select! {
                _ = &mut stop => return,
                message = messages.next() => message,
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    tracing::debug!(cause = %err, "webhook pull error");
                    continue;
                }
                None => break,
            };
            let args = args.clone();
            tokio::spawn(async move {
                deliver_message(&args.0, &args.1, message).await;
                drop(slot);
            });
        }
    }
}

async fn deliver_message(args: &WebhookArgs, secret: &str, message: jetstream::Message) {
    let deliveries = message.info().map(|info| info.delivered).unwrap_or(1);
    let call: WebhookCall = match serde_json::from_slice(&message.payload) {
        Ok(call) => call,
        Err(err) => {
            tracing::error!(cause = %err, "dropping an unreadable webhook call");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    // It may have waited in the pull buffer: restart its ack wait.
    let _ = message.ack_with(AckKind::Progress).await;
    let question_id = call.record.id.clone();
    let ack = match deliver(args, secret, &call).await {
        Outcome::Delivered => {
            tracing::info!(%question_id, deliveries, "webhook delivered");
            AckKind::Ack
        }
        Outcome::GiveUp(reason) => {
            tracing::error!(%question_id, deliveries, reason, "webhook refused; not retrying");
            AckKind::Term
        }
        Outcome::Retry(reason) if deliveries >= webhook::MAX_DELIVER => {
            tracing::error!(%question_id, deliveries, reason, "webhook failed; giving up");
            AckKind::Term
        }
        Outcome::Retry(reason) => {
            let delay = retry_delay(deliveries);
            tracing::warn!(%question_id, deliveries, reason, retry_in_s = delay.as_secs(), "webhook failed; will retry");
            AckKind::Nak(Some(delay))
        }
    };
    if let Err(err) = message.ack_with(ack).await {
        tracing::warn!(cause = %err, "webhook ack failed; the call may repeat");
    }
}

async fn deliver(args: &WebhookArgs, secret: &str, call: &WebhookCall) -> Outcome {
    let url = match reqwest::Url::parse(&call.callback_url) {
        Ok(url) => url,
        Err(err) => return Outcome::GiveUp(format!("bad callback_url: {err}")),
    };
    let address = match resolve(&url, &args.webhook_allow).await {
        Ok(address) => address,
        Err(err @ TargetError::Private(_)) => return Outcome::GiveUp(err.to_string()),
        Err(err) => return Outcome::Retry(err.to_string()),
    };
    let host = url.host_str().unwrap_or_default().to_owned();
    let client = match reqwest::Client::builder()
        .resolve(&host, address)
        .redirect(reqwest::redirect::Policy::none())
        // A proxy would resolve the host again, past the check.
        .no_proxy()
        .timeout(args.webhook_timeout)
        .build()
    {
        Ok(client) => client,
        Err(err) => return Outcome::Retry(format!("HTTP client: {err}")),
    };
    let body = serde_json::to_vec(&call.record).expect("records serialize");
    let now = ebb_nats::now_ms() / 1000;
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-ebb-signature", signature(secret, now, &body))
        .header("x-ebb-question-id", &call.record.id)
        .body(body)
        .send()
        .await;
    match response {
        Ok(response) if response.status().is_success() => Outcome::Delivered,
        Ok(response) => {
            let status = response.status();
            let reason = format!("receiver answered {status}");
            // Timeouts, throttling and server errors may pass; other client
            // errors say the receiver will never take this call.
            if status.is_server_error() || status == 408 || status == 429 {
                Outcome::Retry(reason)
            } else {
                Outcome::GiveUp(reason)
            }
        }
        Err(err) => Outcome::Retry(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            // Ranges added by issue 14: each one carries or reaches an
            // internal address.
            "64:ff9b::a00:1",  // NAT64 of 10.0.0.1
            "64:ff9b:1::1",    // NAT64, local use
            "2002:a00:1::1",   // 6to4 of 10.0.0.1
            "2001:0:a00:1::1", // Teredo
            "::10.0.0.1",      // IPv4-compatible
            "fec0::1",         // site-local
            "198.18.0.1",      // benchmarking
            "198.19.255.254",
            "192.0.0.8", // IETF protocol assignments
            "240.0.0.1", // reserved
            "255.255.255.255",
            "ff02::1", // multicast
        ] {
            assert!(check_address(ip(internal), &[]).is_err(), "{internal}");
        }
        for public in [
            "93.184.216.34",
            "2606:4700::1111",
            "100.128.0.1",
            "198.20.0.1",
            "192.0.1.1",
            "2001:4860::8888",
        ] {
            assert!(check_address(ip(public), &[]).is_ok(), "{public}");
        }
        let allow: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert!(check_address(ip("127.0.0.1"), &allow).is_ok());
        assert!(check_address(ip("10.0.0.1"), &allow).is_err());
    }

    #[tokio::test]
    async fn names_are_checked_after_resolution() {
        let url = reqwest::Url::parse("http://localhost:9/hook").unwrap();
        assert!(matches!(
            resolve(&url, &[]).await,
            Err(TargetError::Private(_))
        ));
        let allow: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert_eq!(resolve(&url, &allow).await.unwrap().port(), 9);
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_and_body() {
        // Computed independently with Python's hmac module.
        let signed = signature("secret", 1_700_000_000, b"{}");
        assert_eq!(
            signed,
            "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
        assert_ne!(signed, signature("other", 1_700_000_000, b"{}"));
        assert_ne!(signed, signature("secret", 1_700_000_001, b"{}"));
    }

    #[test]
    fn retries_back_off_to_five_minutes() {
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(4), Duration::from_secs(8));
        assert_eq!(retry_delay(20), Duration::from_secs(300));
    }
}
