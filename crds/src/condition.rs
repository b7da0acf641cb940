//! The condition vocabulary of a TrainingJob: types and reasons, spelled once.
//!
//! Lifecycle conditions are mutually exclusive: exactly one of them is True at a time, so
//! the `State` printer column (the first condition whose status is True) always shows the
//! current state. Detail conditions never come first in the list.

/// Condition types.
pub mod types {
    /// Pods have been created and are starting.
    pub const CREATED: &str = "Created";
    /// All pods of the job are running.
    pub const RUNNING: &str = "Running";
    /// A pod failed and is being restarted under its restartPolicy.
    pub const RESTARTING: &str = "Restarting";
    /// The job is suspended: no pods exist.
    pub const SUSPENDED: &str = "Suspended";
    /// The job finished successfully.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The job failed; the reason says why.
    pub const FAILED: &str = "Failed";
    /// Detail: a pod is stuck Pending (image pull, config or scheduling error).
    pub const PODS_STALLED: &str = "PodsStalled";
    /// Detail: the gang scheduler has not admitted the PodGroup yet.
    pub const GANG_PENDING: &str = "GangPending";

    /// The lifecycle conditions in the order they are listed in status.
    pub const LIFECYCLE: [&str; 6] = [CREATED, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED];
}

/// Condition reasons.
pub mod reasons {
    /// The spec cannot run; the message names the field and the fix.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Pods were created.
    pub const PODS_CREATED: &str = "PodsCreated";
    /// Every pod is running.
    pub const ALL_REPLICAS_RUNNING: &str = "AllReplicasRunning";
    /// A pod failed and is being restarted.
    pub const POD_RESTARTING: &str = "PodRestarting";
    /// The success policy was met.
    pub const JOB_SUCCEEDED: &str = "JobSucceeded";
    /// A pod failed under restartPolicy Never, or with a permanent exit code under ExitCode.
    pub const POD_FAILED: &str = "PodFailed";
    /// Restarts exceeded runPolicy.backoffLimit.
    pub const BACKOFF_LIMIT_EXCEEDED: &str = "BackoffLimitExceeded";
    /// The built-in trainer found a NaN or infinite gradient or loss, or an exploded loss
    /// (it exits with `contract::EXIT_DIVERGED`); the message names the pod and the step.
    pub const DIVERGED: &str = "Diverged";
    /// The job ran past runPolicy.activeDeadlineSeconds.
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    /// A pod stayed Pending past runPolicy.startupDeadlineSeconds.
    pub const STARTUP_DEADLINE_EXCEEDED: &str = "StartupDeadlineExceeded";
    /// runPolicy.suspend is true.
    pub const JOB_SUSPENDED: &str = "JobSuspended";
    /// runPolicy.suspend went back to false.
    pub const JOB_RESUMED: &str = "JobResumed";
    /// The gang scheduler admitted the PodGroup (or every pod is placed).
    pub const GANG_ADMITTED: &str = "GangAdmitted";
    /// The PodGroup waits for the scheduler; the message counts the pending pods.
    pub const POD_GROUP_PENDING: &str = "PodGroupPending";
    /// The scheduler says the gang cannot be placed; the message carries its reason.
    pub const GANG_UNSCHEDULABLE: &str = "GangUnschedulable";
    /// The configured gang scheduler's PodGroup CRD is not installed.
    pub const POD_GROUP_CRD_MISSING: &str = "PodGroupCRDMissing";
    /// The job asks for gang scheduling but the operator has no `--gang-scheduler`.
    pub const GANG_SCHEDULER_NOT_CONFIGURED: &str = "GangSchedulerNotConfigured";
    /// The lifecycle has moved on to another state.
    pub const SUPERSEDED: &str = "Superseded";
}
