//! Which Redis keys and commands each role may use: the ACL rules
//! `ebb-credentials` writes into the server's ACL file, next to the key
//! layout they name ([`crate::store`]).
//!
//! No role runs the dangerous commands (`FLUSHALL`, `KEYS`, `CONFIG`,
//! `DEBUG`, ...), no role uses pub/sub channels, and a worker reaches only
//! the keys of questions and answers (not the gateway's idempotency keys).

use ebb_nats::access::Role;

/// The ACL rules of `role` after its password (`~pattern`s, channels,
/// commands); `None` for a role that does not use Redis (the scaler).
pub fn acl_rules(role: Role) -> Option<&'static str> {
    match role {
        Role::Gateway => Some("resetchannels ~ebb:* +@all -@dangerous"),
        Role::Worker => Some(
            "resetchannels ~ebb:question:* ~ebb:pieces:* ~ebb:pieces-attempt:* ~ebb:cache:* +@all -@dangerous",
        ),
        Role::Scaler => None,
        Role::Operator => Some("~* &* +@all"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{cache_key, pieces_attempt_key, pieces_key, record_key};

    #[test]
    fn a_worker_reaches_every_key_it_writes() {
        let rules = acl_rules(Role::Worker).unwrap();
        for key in [
            record_key("q"),
            pieces_key("q"),
            pieces_attempt_key("q"),
            cache_key("k"),
        ] {
            let prefix = key.trim_end_matches(['q', 'k']);
            assert!(rules.contains(&format!("~{prefix}*")), "{key}");
        }
        assert!(!rules.contains("~ebb:*"));
    }
}
