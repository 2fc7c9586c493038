//! Which Redis keys and commands each role may use: the ACL rules
//! `ebb-credentials` writes into the server's ACL file, next to the key
//! layout they name ([`crate::store`]).
//!
//! No role runs the dangerous commands (`FLUSHALL`, `KEYS`, `CONFIG`,
//! `DEBUG`, ...) but `ROLE` (a client behind Sentinels checks that the node
//! they name is the master), no role uses pub/sub channels, and a worker
//! reaches only the keys of questions and answers (not the gateway's
//! idempotency keys).

use ebb_nats::access::Role;

/// The Redis user that replicas and Sentinels log in to the master as
/// (`masteruser`, `sentinel auth-user`): not a role, since no ebb process
/// uses it.
pub const REPLICATION_USER: &str = "ebb-replication";

/// Its rules: a replica's sync (`PSYNC`, `REPLCONF`) and what a Sentinel
/// sends to watch the master and carry out a failover (Redis's own list).
pub const REPLICATION_RULES: &str = "resetchannels &__sentinel__:* +psync +replconf +ping \
     +multi +exec +slaveof +replicaof +config|rewrite +role +publish +subscribe +info \
     +client|setname +client|kill +script|kill";

/// The ACL rules of `role` after its password (`~pattern`s, channels,
/// commands); `None` for a role that does not use Redis (the scaler).
pub fn acl_rules(role: Role) -> Option<&'static str> {
    match role {
        Role::Gateway => Some("resetchannels ~ebb:* +@all -@dangerous +role"),
        Role::Worker => Some(
            "resetchannels ~ebb:question:* ~ebb:pieces:* ~ebb:pieces-attempt:* ~ebb:cache:* +@all -@dangerous +role",
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
