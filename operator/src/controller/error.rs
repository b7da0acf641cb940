//! How a reconcile step fails: one variant per failed action, and its label for metrics.

/// A reconcile step that failed; the variant names the action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pod or Service cache will never be filled: its watch ended (the operator is
    /// stopping).
    #[error("reading the pods and Service of {job}: their watch has ended")]
    ReadCache {
        /// `namespace/name` of the job.
        job: String,
    },
    /// Applying a pod failed.
    #[error("applying pod {name}: {source}")]
    ApplyPod {
        /// Pod name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting a pod failed.
    #[error("deleting pod {name}: {source}")]
    DeletePod {
        /// Pod name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Applying the Service failed.
    #[error("applying service {name}: {source}")]
    ApplyService {
        /// Service name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting the Service failed.
    #[error("deleting service {name}: {source}")]
    DeleteService {
        /// Service name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Creating the job's token Secret failed.
    #[error("creating secret {name}: {source}")]
    CreateTokenSecret {
        /// Secret name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting the job's token Secret failed.
    #[error("deleting secret {name}: {source}")]
    DeleteTokenSecret {
        /// Secret name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Applying the job's NetworkPolicy failed.
    #[error("applying networkpolicy {name}: {source}")]
    ApplyNetworkPolicy {
        /// NetworkPolicy name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting the job's NetworkPolicy failed.
    #[error("deleting networkpolicy {name}: {source}")]
    DeleteNetworkPolicy {
        /// NetworkPolicy name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Reading the job's PodGroup failed.
    #[error("reading podgroup {name}: {source}")]
    GetPodGroup {
        /// PodGroup name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Applying the job's PodGroup failed.
    #[error("applying podgroup {name}: {source}")]
    ApplyPodGroup {
        /// PodGroup name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Writing the job's status failed.
    #[error("patching status of {job}: {source}")]
    PatchStatus {
        /// `namespace/name` of the job.
        job: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting the finished job (TTL) failed.
    #[error("deleting job {job} after its TTL: {source}")]
    DeleteJob {
        /// `namespace/name` of the job.
        job: String,
        /// The API error.
        source: kube::Error,
    },
}

impl Error {
    /// Every value [`Error::kind`] can return. The error counter starts each of them at 0,
    /// so `rate(kubetrain_reconcile_errors_total[..])` is a series of zeros on a healthy
    /// operator instead of "no data", and the first error is a rise, not a new series.
    pub const KINDS: &'static [&'static str] = &[
        "read_cache",
        "apply_pod",
        "delete_pod",
        "apply_service",
        "delete_service",
        "create_token_secret",
        "delete_token_secret",
        "apply_network_policy",
        "delete_network_policy",
        "get_pod_group",
        "apply_pod_group",
        "patch_status",
        "delete_job",
    ];

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::ReadCache { .. } => "read_cache",
            Error::ApplyPod { .. } => "apply_pod",
            Error::DeletePod { .. } => "delete_pod",
            Error::ApplyService { .. } => "apply_service",
            Error::DeleteService { .. } => "delete_service",
            Error::CreateTokenSecret { .. } => "create_token_secret",
            Error::DeleteTokenSecret { .. } => "delete_token_secret",
            Error::ApplyNetworkPolicy { .. } => "apply_network_policy",
            Error::DeleteNetworkPolicy { .. } => "delete_network_policy",
            Error::GetPodGroup { .. } => "get_pod_group",
            Error::ApplyPodGroup { .. } => "apply_pod_group",
            Error::PatchStatus { .. } => "patch_status",
            Error::DeleteJob { .. } => "delete_job",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn every_error_kind_is_listed_once_in_kinds() {
        let api = || kube::Error::TlsRequired;
        let s = String::new;
        let all = [
            Error::ReadCache { job: s() },
            Error::ApplyPod {
                name: s(),
                source: api(),
            },
            Error::DeletePod {
                name: s(),
                source: api(),
            },
            Error::ApplyService {
                name: s(),
                source: api(),
            },
            Error::DeleteService {
                name: s(),
                source: api(),
            },
            Error::CreateTokenSecret {
                name: s(),
                source: api(),
            },
            Error::DeleteTokenSecret {
                name: s(),
                source: api(),
            },
            Error::ApplyNetworkPolicy {
                name: s(),
                source: api(),
            },
            Error::DeleteNetworkPolicy {
                name: s(),
                source: api(),
            },
            Error::GetPodGroup {
                name: s(),
                source: api(),
            },
            Error::ApplyPodGroup {
                name: s(),
                source: api(),
            },
            Error::PatchStatus {
                job: s(),
                source: api(),
            },
            Error::DeleteJob {
                job: s(),
                source: api(),
            },
        ];
        let mut kinds: Vec<&str> = all.iter().map(Error::kind).collect();
        kinds.sort_unstable();
        let mut listed = Error::KINDS.to_vec();
        listed.sort_unstable();
        assert_eq!(kinds, listed);
    }
}
