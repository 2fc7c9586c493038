//! `ebb-store`: a question's state after the gateway accepts it.
//!
//! # Layout
//! - [`access`]: each role's Redis ACL rules.
//! - [`store`]: Redis status records, the answer cache and the streamed
//!   pieces late joiners read ([`Store`]); [`Store::degradable`] is the one
//!   way a Redis failure is allowed to only degrade service.
//! - [`cache`]: the cache as the gateway's edge uses it: a lookup that
//!   writes the `queued` record on a miss in the same round trip, and the
//!   popularity counts a starting gateway warms its memory from.
//! - [`connection`]: the connection every clone shares; behind Redis
//!   Sentinels it follows the master through a failover.
//! - [`limits`]: the rate-limit buckets and shedding places all gateways
//!   share, changed atomically by scripts on Redis's clock.
//! - [`lifecycle`]: the only writer of terminal records: [`Lifecycle::finish`]
//!   (cache, record, event, webhook) and [`Lifecycle::fail`] (dead letter,
//!   record, event, webhook), used by the worker and the reaper alike.
//! - [`reaper`]: fails questions whose worker died during their last
//!   delivery, from the server's max-deliveries advisories.
//! - [`janitor`]: settles what a crashed nats-server left below the
//!   consumers' ack floors (ended questions' messages, lost advisories).
//!
//! The JSON of records is part of the queue contract (`ebb_nats::record`).

pub mod access;
pub mod cache;
pub mod connection;
pub mod janitor;
pub mod lifecycle;
pub mod limits;
pub mod reaper;
pub mod store;

pub use cache::Lookup;
pub use lifecycle::{Answer, Ending, Lifecycle};
pub use limits::{Bucket, PlaceRequest, Taken};
pub use reaper::run_reaper;
pub use store::{Pieces, Put, Store, StoreError};
