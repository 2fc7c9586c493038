//! Who is calling: API keys on the public routes, the admin token on
//! `/admin/*`.
//!
//! Keys are configured as SHA-256 digests (`printf %s "$KEY" | sha256sum`),
//! so the config file holds no secret. A presented key is hashed and
//! compared with every configured digest in constant time, with no early
//! exit, so timing tells nothing about which prefix matched.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// One configured API key.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Shown in logs and metrics, e.g. `tutor-app`.
    pub name: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    /// Questions per minute for this key (default: `--rate-limit-per-key`).
    #[serde(default)]
    pub per_minute: Option<u32>,
}

/// The caller of a public route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Key {
        name: String,
        per_minute: u32,
    },
    /// The admin token, on a public route: may read every question.
    Admin,
    /// `--insecure-dev`: no key needed.
    Anonymous,
}

impl Caller {
    /// The name a question asked by this caller is owned under: its API
    /// key's (admin and anonymous questions belong to no key).
    pub fn owner(&self) -> Option<&str> {
        match self {
            Caller::Key { name, .. } => Some(name),
            Caller::Admin | Caller::Anonymous => None,
        }
    }

    /// Whether this caller may read a question owned by `owner`: its own
    /// key's questions, or any with the admin token. A question no key owns
    /// (asked anonymously, a cached answer, a record from before owners
    /// were kept) is anyone's.
    pub fn may_read(&self, owner: Option<&str>) -> bool {
        match (self, owner) {
            (Caller::Admin, _) | (_, None) => true,
            (caller, owner) => caller.owner() == owner,
        }
    }
}

#[derive(Debug)]
pub struct Keys {
    keys: Vec<([u8; 32], String, Option<u32>)>,
    admin: Option<[u8; 32]>,
    insecure_dev: bool,
    default_per_minute: u32,
}

impl Keys {
    /// Validates the digests; the error names the offending key entry.
    pub fn new(
        keys: &[ApiKey],
        admin_token: Option<&str>,
        insecure_dev: bool,
        default_per_minute: u32,
    ) -> Result<Keys, String> {
        let keys = keys
            .iter()
            .enumerate()
            .map(|(index, key)| {
                let digest = parse_digest(&key.sha256).ok_or_else(|| {
                    format!("api_keys[{index}].sha256: must be 64 hex digits (the key's SHA-256)")
                })?;
                Ok((digest, key.name.clone(), key.per_minute))
            })
            .collect::<Result<_, String>>()?;
        Ok(Keys {
            keys,
            admin: admin_token.filter(|token| !token.is_empty()).map(digest),
            insecure_dev,
            default_per_minute,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The configured keys' names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(_, name, _)| name.as_str())
    }

    /// Checks the `Authorization: Bearer` header of a public route.
    pub fn caller(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let Some(presented) = bearer(authorization) else {
            if self.insecure_dev {
                return Ok(Caller::Anonymous);
            }
            return Err(ApiError::Unauthorized(
                "missing `Authorization: Bearer <api key>`",
            ));
        };
        let presented = digest(presented);
        let mut found = None;
        for (digest, name, per_minute) in &self.keys {
            if bool::from(digest.ct_eq(&presented)) {
                found = Some(Caller::Key {
                    name: name.clone(),
                    per_minute: per_minute.unwrap_or(self.default_per_minute),
                });
            }
        }
        if let Some(admin) = &self.admin
            && bool::from(admin.ct_eq(&presented))
        {
            found = Some(Caller::Admin);
        }
        match found {
            Some(caller) => Ok(caller),
            None if self.insecure_dev => Ok(Caller::Anonymous),
            None => Err(ApiError::Unauthorized("the API key is not valid")),
        }
    }

    /// Checks the bearer token of an admin route: 401 without a valid
    /// credential, 403 for a valid API key that is not the admin token.
    pub fn admin(&self, authorization: Option<&str>) -> Result<(), ApiError> {
        let Some(admin) = &self.admin else {
            return Err(ApiError::Forbidden(
                "admin routes are off: the gateway has no --admin-token",
            ));
        };
        let Some(presented) = bearer(authorization) else {
            return Err(ApiError::Unauthorized(
                "missing `Authorization: Bearer <admin token>`",
            ));
        };
        if bool::from(digest(presented).ct_eq(admin)) {
            return Ok(());
        }
        match self.caller(Some(&format!("Bearer {presented}"))) {
            Ok(Caller::Key { .. }) => {
                Err(ApiError::Forbidden("an API key cannot use admin routes"))
            }
            _ => Err(ApiError::Unauthorized("the admin token is not valid")),
        }
    }
}

fn bearer(authorization: Option<&str>) -> Option<&str> {
    let value = authorization?.trim();
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Hex SHA-256 of a key, as the config file wants it.
pub fn hex_digest(secret: &str) -> String {
    digest(secret).iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_question_is_its_keys_or_the_admins_and_an_unowned_one_anyones() {
        let app = Caller::Key {
            name: "app".into(),
            per_minute: 60,
        };
        let other = Caller::Key {
            name: "other".into(),
            per_minute: 60,
        };
        assert!(app.may_read(Some("app")));
        assert!(!other.may_read(Some("app")));
        assert!(!Caller::Anonymous.may_read(Some("app")));
        assert!(Caller::Admin.may_read(Some("app")));
        for caller in [&app, &other, &Caller::Anonymous, &Caller::Admin] {
            assert!(caller.may_read(None), "{caller:?}");
        }
    }

    fn keys(insecure_dev: bool) -> Keys {
        let key = ApiKey {
            name: "app".into(),
            sha256: hex_digest("sk-app"),
            per_minute: Some(5),
        };
        Keys::new(&[key], Some("admin-secret"), insecure_dev, 600).unwrap()
    }

    #[test]
    fn keys_are_checked_by_digest() {
        let keys = keys(false);
        assert_eq!(
            keys.caller(Some("Bearer sk-app")).unwrap(),
            Caller::Key {
                name: "app".into(),
                per_minute: 5
            }
        );
        assert!(matches!(keys.caller(None), Err(ApiError::Unauthorized(_))));
        assert!(matches!(
            keys.caller(Some("Bearer sk-other")),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            keys.caller(Some("Basic sk-app")),
            Err(ApiError::Unauthorized(_))
        ));
    }

    #[test]
    fn insecure_dev_lets_anyone_in() {
        assert_eq!(keys(true).caller(None).unwrap(), Caller::Anonymous);
    }

    #[test]
    fn admin_routes_want_the_admin_token() {
        let keys = keys(false);
        assert!(keys.admin(Some("Bearer admin-secret")).is_ok());
        assert!(matches!(keys.admin(None), Err(ApiError::Unauthorized(_))));
        assert!(matches!(
            keys.admin(Some("Bearer sk-app")),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            keys.admin(Some("Bearer nope")),
            Err(ApiError::Unauthorized(_))
        ));
    }

    #[test]
    fn a_bad_digest_is_named() {
        let key = ApiKey {
            name: "x".into(),
            sha256: "abc".into(),
            per_minute: None,
        };
        let err = Keys::new(&[key], None, false, 1).unwrap_err();
        assert!(err.starts_with("api_keys[0].sha256"), "{err}");
    }
}
