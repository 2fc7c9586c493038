//! `Idempotency-Key` on `POST /v1/questions` and `/v1/chat/completions`: a
//! client that retries after a lost reply gets the question it already
//! asked (same id, same answer), never a second one.
//!
//! Keys are per caller (API key name) and route, and live 24 h in Redis
//! under `ebb:idempotency:<sha256(caller, route, key)>`, holding the
//! question's id and a digest of the request body: the same key with a
//! different body is refused (`422 idempotency_key_reused`), as Stripe does.
//! The key also names the question: its id is derived from the same
//! digest, so concurrent retries publish one id and JetStream's duplicate
//! window keeps one message. The key is remembered only once its question
//! is published, so a retry after a refusal (NATS down) asks for real.

use std::time::Duration;

use axum::http::HeaderMap;
use ebb_nats::Priority;
use ebb_store::Store;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::error::ApiError;

pub const HEADER: &str = "idempotency-key";
/// How long a key keeps answering with its question.
pub const TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest key accepted (Stripe's limit).
const MAX_LEN: usize = 255;

/// A request's idempotency key, scoped and ready to claim.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    redis_key: String,
    request_sha256: String,
    question_id: String,
}

/// What a key stands for once claimed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claimed {
    pub id: String,
    pub request_sha256: String,
    pub priority: Priority,
    #[serde(default)]
    pub language: Option<String>,
    pub accepted_at_ms: u64,
}

impl IdempotencyKey {
    /// The request's key, if it sent one; `422` for an empty, over-long or
    /// non-printable one.
    pub fn from_request(
        headers: &HeaderMap,
        caller: Option<&Caller>,
        route: &str,
        body: &[u8],
    ) -> Result<Option<IdempotencyKey>, ApiError> {
        let Some(value) = headers.get(HEADER) else {
            return Ok(None);
        };
        let key = value
            .to_str()
            .ok()
            .filter(|key| {
                (1..=MAX_LEN).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
            })
            .ok_or_else(|| {
                ApiError::invalid(
                    "Idempotency-Key",
                    format!("must be 1 to {MAX_LEN} visible ASCII characters"),
                )
            })?;
        let caller = match caller {
            Some(Caller::Key { name, .. }) => name.as_str(),
            Some(Caller::Admin) => "\0admin",
            Some(Caller::Anonymous) | None => "",
        };
        let scope = Sha256::new()
            .chain_update(caller)
            .chain_update([0])
            .chain_update(route)
            .chain_update([0])
            .chain_update(key)
            .finalize();
        let id_bytes: [u8; 16] = scope[..16].try_into().expect("a SHA-256 has 32 bytes");
        Ok(Some(IdempotencyKey {
            redis_key: format!("ebb:idempotency:{}", hex(&scope)),
            request_sha256: hex(&Sha256::digest(body)),
            question_id: uuid::Uuid::new_v8(id_bytes).to_string(),
        }))
    }

    /// The question this key already stands for, if any.
    pub async fn existing(&self, store: &Store) -> Result<Option<Claimed>, ApiError> {
        let found = store
            .get_json::<Claimed>(&self.redis_key)
            .await
            .map_err(|err| ApiError::StoreUnavailable(err.to_string()))?;
        found.map(|claimed| self.same_request(claimed)).transpose()
    }

    /// The id of the question this key names.
    pub fn question_id(&self) -> String {
        self.question_id.clone()
    }

    /// Remembers the published question under the key (a concurrent
    /// request may have done so already: with another body, this one is
    /// refused, since only one of the two was asked).
    pub async fn remember(&self, store: &Store, claim: &Claimed) -> Result<(), ApiError> {
        let earlier = store
            .set_json_if_absent(&self.redis_key, claim, TTL)
            .await
            .map_err(|err| ApiError::StoreUnavailable(err.to_string()))?;
        match earlier {
            Some(earlier) => self.same_request(earlier).map(drop),
            None => Ok(()),
        }
    }

    pub fn request_sha256(&self) -> &str {
        &self.request_sha256
    }

    fn same_request(&self, claimed: Claimed) -> Result<Claimed, ApiError> {
        if claimed.request_sha256 == self.request_sha256 {
            Ok(claimed)
        } else {
            Err(ApiError::IdempotencyKeyReused)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(
        value: &str,
        caller: Option<&Caller>,
        route: &str,
        body: &[u8],
    ) -> Result<Option<IdempotencyKey>, ApiError> {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, value.parse().unwrap());
        IdempotencyKey::from_request(&headers, caller, route, body)
    }

    #[test]
    fn keys_are_scoped_by_caller_and_route() {
        let app = Caller::Key {
            name: "app".into(),
            per_minute: 60,
        };
        let other = Caller::Key {
            name: "other".into(),
            per_minute: 60,
        };
        let a = key("k1", Some(&app), "questions", b"{}").unwrap().unwrap();
        let b = key("k1", Some(&other), "questions", b"{}")
            .unwrap()
            .unwrap();
        let c = key("k1", Some(&app), "chat", b"{}").unwrap().unwrap();
        let again = key("k1", Some(&app), "questions", b"{}").unwrap().unwrap();
        assert_ne!(a.redis_key, b.redis_key);
        assert_ne!(a.redis_key, c.redis_key);
        assert_eq!(a.redis_key, again.redis_key);
        // The key names the question: the same id on every retry.
        assert_eq!(a.question_id(), again.question_id());
        assert_ne!(a.question_id(), b.question_id());
        assert!(uuid::Uuid::parse_str(&a.question_id()).is_ok());
    }

    #[test]
    fn no_header_is_no_key_and_a_bad_one_is_refused() {
        assert!(
            IdempotencyKey::from_request(&HeaderMap::new(), None, "questions", b"")
                .unwrap()
                .is_none()
        );
        for bad in ["", "has space", &"x".repeat(256)] {
            let err = key(bad, None, "questions", b"").unwrap_err();
            assert_eq!(
                err.status(),
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_same_key_with_another_body_is_refused() {
        let first = key("k", None, "questions", b"{\"question\":\"a\"}")
            .unwrap()
            .unwrap();
        let claimed = Claimed {
            id: "q1".into(),
            request_sha256: first.request_sha256.clone(),
            priority: Priority::Normal,
            language: None,
            accepted_at_ms: 1,
        };
        assert_eq!(first.same_request(claimed.clone()).unwrap(), claimed);
        let other = key("k", None, "questions", b"{\"question\":\"b\"}")
            .unwrap()
            .unwrap();
        assert!(matches!(
            other.same_request(claimed),
            Err(ApiError::IdempotencyKeyReused)
        ));
    }
}
