//! The pod contract between the operator and the trainer (DESIGN.md §5).
//!
//! The operator writes these environment variables into every pod; the trainer reads
//! only these and never talks to the Kubernetes API. Both sides use this module, so the
//! names and formats cannot drift apart.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// JSON `{"ps": ["host:port", ...], "worker": [...]}` (plus `chief` and `evaluator` when the
/// job has them): every replica's address, by role.
pub const ENV_CLUSTER: &str = "KUBETRAIN_CLUSTER";
/// This pod's role: `chief`, `ps`, `worker` or `evaluator`.
pub const ENV_ROLE: &str = "KUBETRAIN_ROLE";
/// This pod's index within its role, from 0.
pub const ENV_INDEX: &str = "KUBETRAIN_INDEX";
/// `namespace/name` of the TrainingJob.
pub const ENV_JOB: &str = "KUBETRAIN_JOB";
/// The TrainingJob's `spec.training` block as JSON (built-in trainer only).
pub const ENV_TRAINING: &str = "KUBETRAIN_TRAINING";
/// The TrainingJob's `spec.mode` (`DataParallel` or `ModelParallel`).
pub const ENV_MODE: &str = "KUBETRAIN_MODE";
/// TensorFlow's cluster description, so a TensorFlow image runs unchanged.
pub const ENV_TF_CONFIG: &str = "TF_CONFIG";
/// The pod's own IP (downward API `status.podIP`): the trainer binds its server there.
pub const ENV_POD_IP: &str = "POD_IP";
/// Where the trainer leaves its last words: a [`FinalProgress`] as JSON when it succeeds,
/// the error when it fails. The operator points it at the container's
/// `terminationMessagePath`, so the kubelet copies it into the pod status. That is how a
/// job too short for any progress poll still ends with its final step, loss and accuracy,
/// and how `kubectl describe pod` shows why a trainer failed, with no API access from pods.
pub const ENV_TERMINATION_LOG: &str = "KUBETRAIN_TERMINATION_LOG";
/// The job's credential for the built-in trainer: 64 hex digits the operator generates
/// once per job into the Secret [`token_secret_name`] (key [`TOKEN_SECRET_KEY`]), which
/// the job owns. The parameter servers and pipeline stages refuse every call that drives
/// training unless it carries this token, so only the job's own pods can drive the job.
pub const ENV_JOB_TOKEN: &str = "KUBETRAIN_JOB_TOKEN";
/// The key of the token in the job's Secret.
pub const TOKEN_SECRET_KEY: &str = "token";

/// The name of the Secret that holds a job's token.
pub fn token_secret_name(job: &str) -> String {
    format!("{job}-token")
}
/// The port the built-in trainer serves Prometheus `/metrics` on (unset: no metrics).
pub const ENV_METRICS_PORT: &str = "KUBETRAIN_METRICS_PORT";
/// How many threads the built-in trainer's matrix products use (unset: the CPUs the
/// container may use, from its cgroup quota). Set it in a replica's pod template.
pub const ENV_COMPUTE_THREADS: &str = "KUBETRAIN_COMPUTE_THREADS";
/// The trainer's metrics port in pods the operator plans, unless configured otherwise.
pub const DEFAULT_TRAINER_METRICS_PORT: u16 = 9090;
/// The name of that container port, which the chart's PodMonitor scrapes.
pub const METRICS_PORT_NAME: &str = "metrics";
/// The built-in trainer's exit code when training has diverged (a NaN or infinite
/// gradient or loss, or a loss that exploded). Restarting cannot help a run whose
/// parameters diverged, so the operator fails the job with the reason `Diverged` under
/// every restart policy, with the trainer's termination message. 65 is sysexits'
/// `EX_DATAERR` (the numbers went bad), far from the small codes programs use for any
/// error, and below 126, where the shell's and the signals' codes begin.
pub const EXIT_DIVERGED: u8 = 65;
/// The kubelet's default `terminationMessagePath`.
pub const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

/// The gRPC port every replica listens on.
pub const DEFAULT_PORT: u16 = 2222;
/// The name of that port on pods and the Service.
pub const PORT_NAME: &str = "kubetrain";
/// The container the contract env goes into, when a template has several.
pub const TRAINER_CONTAINER: &str = "trainer";
/// The second choice for the contract env: TensorFlow images' usual container name.
pub const TENSORFLOW_CONTAINER: &str = "tensorflow";

/// Label: the TrainingJob a pod or Service belongs to.
pub const LABEL_JOB_NAME: &str = "kubetrain.io/job-name";
/// Label: the pod's role.
pub const LABEL_ROLE: &str = "kubetrain.io/role";
/// Label: the pod's index within its role.
pub const LABEL_INDEX: &str = "kubetrain.io/index";

/// The chief's termination message after a successful run (see [`ENV_TERMINATION_LOG`]).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FinalProgress {
    /// Global steps run.
    pub step: u64,
    /// Epochs run.
    pub epoch: u32,
    /// Mean training loss over the last steps.
    pub loss: f64,
    /// Test accuracy after the last step.
    pub accuracy: f64,
    /// Training throughput.
    pub samples_per_second: f64,
}

impl FinalProgress {
    /// The message, if `message` is one (anything else, such as an error text, is not).
    pub fn from_message(message: &str) -> Option<Self> {
        serde_json::from_str(message.trim()).ok()
    }
}

/// The role of a replica. The order is the order pods are planned in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The coordinator of a user's own program (TensorFlow's `chief`); the built-in
    /// trainer has none and uses worker 0.
    Chief,
    /// Parameter server.
    Ps,
    /// Worker (for the built-in trainer, index 0 is the chief).
    Worker,
    /// A side evaluator of a user's own program, outside the training cluster.
    Evaluator,
}

impl Role {
    /// Every role, in planning order.
    pub const ALL: [Role; 4] = [Role::Chief, Role::Ps, Role::Worker, Role::Evaluator];

    /// The spelling used in pod names, labels, env and TF_CONFIG task types.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Chief => "chief",
            Role::Ps => "ps",
            Role::Worker => "worker",
            Role::Evaluator => "evaluator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected \"chief\", \"ps\", \"worker\" or \"evaluator\"")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// `<job>-<role>-<index>`: the pod's name and hostname.
pub fn pod_name(job: &str, role: Role, index: usize) -> String {
    format!("{job}-{role}-{index}")
}

/// The pod's stable DNS name behind the job's headless Service:
/// `<job>-<role>-<index>.<job>.<namespace>.svc`.
pub fn pod_dns_name(job: &str, namespace: &str, role: Role, index: usize) -> String {
    format!("{}.{job}.{namespace}.svc", pod_name(job, role, index))
}

/// Every replica's `host:port`, by role: the value of `KUBETRAIN_CLUSTER`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterSpec {
    /// The chief, when the job has one (a user's own program only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chief: Vec<String>,
    /// Parameter servers, by index.
    #[serde(default)]
    pub ps: Vec<String>,
    /// Workers, by index; for the built-in trainer, worker 0 is the chief.
    #[serde(default)]
    pub worker: Vec<String>,
    /// The evaluator, when the job has one. Not part of the training cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evaluator: Vec<String>,
}

/// `KUBETRAIN_CLUSTER` could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "{ENV_CLUSTER} is not valid JSON of the form {{\"ps\": [\"host:port\"], \"worker\": [\"host:port\"]}}: {0}"
)]
pub struct InvalidClusterSpec(#[from] serde_json::Error);

impl ClusterSpec {
    /// The addresses of a job's replicas, as the operator plans them, from the number of
    /// replicas of each role.
    pub fn for_job(
        job: &str,
        namespace: &str,
        replicas: impl Fn(Role) -> usize,
        port: u16,
    ) -> Self {
        let addresses = |role| {
            (0..replicas(role))
                .map(|i| format!("{}:{port}", pod_dns_name(job, namespace, role, i)))
                .collect()
        };
        Self {
            chief: addresses(Role::Chief),
            ps: addresses(Role::Ps),
            worker: addresses(Role::Worker),
            evaluator: addresses(Role::Evaluator),
        }
    }

    /// The addresses of one role.
    pub fn role(&self, role: Role) -> &[String] {
        match role {
            Role::Chief => &self.chief,
            Role::Ps => &self.ps,
            Role::Worker => &self.worker,
            Role::Evaluator => &self.evaluator,
        }
    }

    /// The `KUBETRAIN_CLUSTER` value.
    pub fn to_env(&self) -> String {
        serde_json::to_string(self).expect("a ClusterSpec always serialises")
    }

    /// Parses a `KUBETRAIN_CLUSTER` value.
    pub fn from_env(value: &str) -> Result<Self, InvalidClusterSpec> {
        Ok(serde_json::from_str(value)?)
    }

    /// The `TF_CONFIG` value for one replica, as Kubeflow's TFJob writes it:
    /// `{"cluster": {"chief": [...], "ps": [...], "worker": [...]}, "task": {"type": "worker",
    /// "index": 0}, "environment": "cloud"}`. Roles without replicas are left out of
    /// `cluster`, as TensorFlow expects. The evaluator is never part of the training
    /// cluster: the training replicas do not see it, and its own `cluster` holds only itself.
    pub fn tf_config(&self, role: Role, index: usize) -> String {
        let members: &[Role] = if role == Role::Evaluator {
            &[Role::Evaluator]
        } else {
            &[Role::Chief, Role::Ps, Role::Worker]
        };
        let cluster = members
            .iter()
            .filter(|r| !self.role(**r).is_empty())
            .map(|r| (r.as_str(), self.role(*r).to_vec()))
            .collect();
        let config = TfConfig {
            cluster,
            task: TfTask {
                type_: role.as_str().to_string(),
                index,
            },
            environment: "cloud".to_string(),
        };
        serde_json::to_string(&config).expect("a TF_CONFIG always serialises")
    }
}

/// TensorFlow's `TF_CONFIG` document.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TfConfig<'a> {
    /// Addresses by TensorFlow job name.
    #[serde(borrow)]
    pub cluster: BTreeMap<&'a str, Vec<String>>,
    /// This process's place in the cluster.
    pub task: TfTask,
    /// Always `cloud`, as TensorFlow's own cluster resolvers write it.
    pub environment: String,
}

/// The `task` part of `TF_CONFIG`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TfTask {
    /// The TensorFlow job name: `chief`, `ps`, `worker` or `evaluator`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The index within that job.
    pub index: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(chief: usize, ps: usize, worker: usize, evaluator: usize) -> impl Fn(Role) -> usize {
        move |role| match role {
            Role::Chief => chief,
            Role::Ps => ps,
            Role::Worker => worker,
            Role::Evaluator => evaluator,
        }
    }

    #[test]
    fn cluster_spec_round_trips_through_env() {
        let spec = ClusterSpec::for_job("digits", "team-a", counts(0, 2, 3, 0), DEFAULT_PORT);
        assert_eq!(spec.ps[1], "digits-ps-1.digits.team-a.svc:2222");
        assert_eq!(spec.worker.len(), 3);
        let parsed = ClusterSpec::from_env(&spec.to_env()).unwrap();
        assert_eq!(parsed, spec);
    }

    #[test]
    fn cluster_spec_env_has_the_documented_shape() {
        let spec = ClusterSpec::for_job("j", "ns", counts(0, 1, 1, 0), 2222);
        let value: serde_json::Value = serde_json::from_str(&spec.to_env()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"ps": ["j-ps-0.j.ns.svc:2222"], "worker": ["j-worker-0.j.ns.svc:2222"]})
        );
    }

    #[test]
    fn invalid_cluster_env_names_the_variable() {
        let err = ClusterSpec::from_env("{not json").unwrap_err();
        assert!(err.to_string().contains(ENV_CLUSTER), "{err}");
    }

    #[test]
    fn tf_config_is_tensorflows_format() {
        let spec = ClusterSpec::for_job("j", "ns", counts(0, 1, 2, 0), 2222);
        let value: serde_json::Value =
            serde_json::from_str(&spec.tf_config(Role::Worker, 1)).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "cluster": {
                    "ps": ["j-ps-0.j.ns.svc:2222"],
                    "worker": ["j-worker-0.j.ns.svc:2222", "j-worker-1.j.ns.svc:2222"]
                },
                "task": {"type": "worker", "index": 1},
                "environment": "cloud"
            })
        );
    }

    #[test]
    fn tf_config_round_trips_and_omits_empty_roles() {
        let spec = ClusterSpec::for_job("j", "ns", counts(0, 0, 2, 0), 2222);
        let text = spec.tf_config(Role::Worker, 0);
        let parsed: TfConfig<'_> = serde_json::from_str(&text).unwrap();
        assert!(!parsed.cluster.contains_key("ps"));
        assert_eq!(parsed.cluster["worker"], spec.worker);
        assert_eq!(
            parsed.task,
            TfTask {
                type_: "worker".into(),
                index: 0
            }
        );
    }

    #[test]
    fn tf_config_of_a_chief_job_keeps_the_evaluator_apart() {
        let spec = ClusterSpec::for_job("j", "ns", counts(1, 1, 2, 1), 2222);
        let chief: serde_json::Value =
            serde_json::from_str(&spec.tf_config(Role::Chief, 0)).unwrap();
        assert_eq!(
            chief,
            serde_json::json!({
                "cluster": {
                    "chief": ["j-chief-0.j.ns.svc:2222"],
                    "ps": ["j-ps-0.j.ns.svc:2222"],
                    "worker": ["j-worker-0.j.ns.svc:2222", "j-worker-1.j.ns.svc:2222"]
                },
                "task": {"type": "chief", "index": 0},
                "environment": "cloud"
            })
        );
        let evaluator: serde_json::Value =
            serde_json::from_str(&spec.tf_config(Role::Evaluator, 0)).unwrap();
        assert_eq!(
            evaluator,
            serde_json::json!({
                "cluster": {"evaluator": ["j-evaluator-0.j.ns.svc:2222"]},
                "task": {"type": "evaluator", "index": 0},
                "environment": "cloud"
            })
        );
        // The built-in trainer's variable keeps its two-role shape when there is no chief.
        let plain = ClusterSpec::for_job("j", "ns", counts(0, 1, 1, 0), 2222);
        assert!(!plain.to_env().contains("chief"), "{}", plain.to_env());
    }

    #[test]
    fn roles_parse_and_print() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        assert!("master".parse::<Role>().is_err());
    }
}
