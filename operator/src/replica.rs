//! PURE: a job's replicas (role and index), their pod names, and the labels every child
//! of a job carries. A leaf: planning, gang scheduling and the decision all name replicas
//! and select children, and import it rather than each other.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kubetrain_api::contract::{self, Role};
use kubetrain_api::{ReplicaSpec, TrainingJob};

/// One replica of the job: its role and index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId {
    /// The role.
    pub role: Role,
    /// The index within the role.
    pub index: usize,
}

impl ReplicaId {
    /// The pod name of this replica in `job`.
    pub fn pod_name(&self, job: &str) -> String {
        contract::pod_name(job, self.role, self.index)
    }

    /// Reads the replica from a pod's kubetrain labels.
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let labels = pod.metadata.labels.as_ref()?;
        let role = labels.get(contract::LABEL_ROLE)?.parse().ok()?;
        let index = labels.get(contract::LABEL_INDEX)?.parse().ok()?;
        Some(Self { role, index })
    }
}

/// The replica spec of a role, if the job has that role.
pub fn replica_spec(job: &TrainingJob, role: Role) -> Option<&ReplicaSpec> {
    job.spec.replica_specs.get(role)
}

/// The number of replicas of a role (0 when the role is absent).
pub fn replicas(job: &TrainingJob, role: Role) -> usize {
    job.spec.replica_specs.replicas(role)
}

/// Every replica the job should have, in role order (chief, ps, worker, evaluator), then
/// index order.
pub fn replica_ids(job: &TrainingJob) -> Vec<ReplicaId> {
    Role::ALL
        .into_iter()
        .flat_map(|role| (0..replicas(job, role)).map(move |index| ReplicaId { role, index }))
        .collect()
}

/// The labels every child of the job carries; the watches select on them.
pub fn job_labels(job: &TrainingJob) -> BTreeMap<String, String> {
    BTreeMap::from([
        (contract::LABEL_JOB_NAME.to_string(), job.name_any()),
        (
            "app.kubernetes.io/name".to_string(),
            "kubetrain".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), job.name_any()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "kubetrain-operator".to_string(),
        ),
    ])
}

/// The label selector of all of a job's children.
pub fn job_selector(job_name: &str) -> String {
    format!("{}={job_name}", contract::LABEL_JOB_NAME)
}
