//! How a job combines its workers' updates, as the trainer runs it: the PS's shards
//! apply it, the config reads it from `training.consistency`.

/// How updates from different workers are combined (from `training.consistency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Wait for every worker's gradient for the current version, sum them in rank order,
    /// apply the mean once.
    Sync,
    /// Apply each gradient when it arrives.
    Async,
    /// Apply on arrival, but hold back a worker's pull while it is more than `s` steps
    /// ahead of the slowest live worker.
    BoundedStaleness(u64),
}
