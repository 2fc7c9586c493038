//! What a worker pool reports of its workers: the controller's view of a
//! backend's listing (the backends themselves live in `ebb-scaler`).

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Where a worker is in its life, as far as the backend can tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    Running,
    /// Asked to drain; killed if still there after the grace period.
    Stopping {
        since: DateTime<Utc>,
    },
    /// Gone. Reported once, then forgotten.
    Exited {
        status: String,
        requested: bool,
        /// The last lines the worker wrote (stdout and stderr), read before
        /// the backend dropped them with the worker: often the only record
        /// of why it could not start. Bounded by the backend.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        last_output: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolWorker {
    pub id: String,
    pub started_at: DateTime<Utc>,
    #[serde(flatten)]
    pub phase: Phase,
}
