//! The `TrainingJob` status: what the operator observed, written only by the operator.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use crate::schema::without_default;

/// What the operator observed about the job.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobStatus {
    /// The metadata.generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The job's conditions. Exactly one lifecycle condition (Created, Running,
    /// Restarting, Suspended, Succeeded, Failed) is True at a time; others (for example
    /// PodsStalled, GangPending) add detail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_list_map")]
    pub conditions: Vec<JobCondition>,

    /// Pod counts per role.
    #[serde(default)]
    pub replica_statuses: ReplicaStatuses,

    /// Workers ready out of workers desired, as `ready/total`, for the Ready column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_ready: Option<String>,

    /// Ready pods out of desired pods for every role the job has, for example
    /// `chief 1/1, ps 1/1, worker 2/2`: the Replicas column of `kubectl get -o wide`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_ready: Option<String>,

    /// Live training progress reported by the chief.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TrainingProgress>,

    /// When the job's pods were first started (reset on resume from suspend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the job reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// Bookkeeping: pods the operator deleted and recreated (restartPolicy ExitCode, or a
    /// pod the kubelet gave up on), by pod name. Their restarts count against backoffLimit
    /// even though the new pod starts with a restart count of 0.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub recreated_pods: BTreeMap<String, PodRecreation>,
}

/// How often the operator recreated one pod.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodRecreation {
    /// Times the pod was deleted to be recreated.
    pub count: i32,
    /// UID of the last pod counted, so a retried deletion is not counted twice.
    pub last_uid: String,
    /// Exit code of that pod's main container, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit_code: Option<i32>,
}

/// One condition of the job, in the Kubernetes condition convention.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobCondition {
    /// Condition type, for example Running or Succeeded (see the `condition` constants).
    #[serde(rename = "type")]
    pub type_: String,

    /// `True`, `False` or `Unknown`.
    pub status: String,

    /// A CamelCase machine-readable reason, for example BackoffLimitExceeded.
    #[serde(default)]
    #[schemars(transform = without_default)]
    pub reason: String,

    /// A human-readable explanation.
    #[serde(default)]
    #[schemars(transform = without_default)]
    pub message: String,

    /// When the status last changed between True, False and Unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

impl TrainingJobStatus {
    /// The one True lifecycle condition (Created, Running, Restarting, Suspended,
    /// Succeeded, Failed), if the job has one yet.
    pub fn lifecycle(&self) -> Option<&JobCondition> {
        self.conditions
            .iter()
            .find(|c| c.is_true() && crate::condition::types::LIFECYCLE.contains(&c.type_.as_str()))
    }

    /// Whether condition `type_` is True.
    pub fn is(&self, type_: &str) -> bool {
        self.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.is_true())
    }

    /// The True Succeeded or Failed condition, once the job has finished.
    pub fn finished(&self) -> Option<&JobCondition> {
        use crate::condition::types::{FAILED, SUCCEEDED};
        self.conditions
            .iter()
            .find(|c| (c.type_ == SUCCEEDED || c.type_ == FAILED) && c.is_true())
    }

    /// Whether the job has reached Succeeded or Failed.
    pub fn is_finished(&self) -> bool {
        self.finished().is_some()
    }
}

impl JobCondition {
    /// Whether the condition's status is `True`.
    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}

/// Pod counts for each role.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatuses {
    /// The chief pod, when the job has a chief.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chief: Option<ReplicaStatus>,
    /// Parameter-server pods.
    #[serde(default)]
    pub ps: ReplicaStatus,
    /// Worker pods.
    #[serde(default)]
    pub worker: ReplicaStatus,
    /// The evaluator pod, when the job has an evaluator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluator: Option<ReplicaStatus>,
}

impl ReplicaStatuses {
    /// The counts of a role; None for a chief or evaluator the job does not have.
    pub fn role(&self, role: crate::contract::Role) -> Option<&ReplicaStatus> {
        use crate::contract::Role;
        match role {
            Role::Chief => self.chief.as_ref(),
            Role::Ps => Some(&self.ps),
            Role::Worker => Some(&self.worker),
            Role::Evaluator => self.evaluator.as_ref(),
        }
    }
}

/// Pod counts for one role.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Pods that exist and have not finished (Pending or Running).
    #[serde(default)]
    pub active: i32,
    /// Pods running with their Ready condition True.
    #[serde(default)]
    pub ready: i32,
    /// Pods that exited 0.
    #[serde(default)]
    pub succeeded: i32,
    /// Pods that failed and were not (or not yet) restarted.
    #[serde(default)]
    pub failed: i32,
    /// Restarts so far: in-place container restarts plus pods recreated by the operator.
    #[serde(default)]
    pub restarts: i32,
}

/// Live training progress as reported by the chief.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingProgress {
    /// Global step (parameter version).
    #[serde(default)]
    pub step: i64,
    /// Current epoch, from 1.
    #[serde(default)]
    pub epoch: i64,
    /// Latest training loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Latest accuracy on the test split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Training throughput over all workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_second: Option<f64>,
    /// When the operator last read these values from the chief.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Time>,
}

/// Conditions are a list-map keyed by `type`, so server-side apply merges them per type
/// instead of replacing the whole list.
fn conditions_list_map(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = <Vec<JobCondition>>::json_schema(generator);
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert("x-kubernetes-list-map-keys".into(), vec!["type"].into());
    schema
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::condition::types;

    fn condition(type_: &str, status: &str) -> JobCondition {
        JobCondition {
            type_: type_.into(),
            status: status.into(),
            reason: String::new(),
            message: String::new(),
            last_transition_time: None,
        }
    }

    #[test]
    fn the_lifecycle_is_the_true_lifecycle_condition_and_details_do_not_count() {
        let status = TrainingJobStatus {
            conditions: vec![
                condition(types::CREATED, "False"),
                condition(types::RUNNING, "True"),
                condition(types::PODS_STALLED, "True"),
            ],
            ..TrainingJobStatus::default()
        };
        assert_eq!(
            status.lifecycle().map(|c| c.type_.as_str()),
            Some(types::RUNNING)
        );
        assert!(status.is(types::RUNNING) && status.is(types::PODS_STALLED));
        assert!(!status.is(types::CREATED));
        assert!(!status.is_finished() && status.finished().is_none());

        let detail_only = TrainingJobStatus {
            conditions: vec![condition(types::PODS_STALLED, "True")],
            ..TrainingJobStatus::default()
        };
        assert!(detail_only.lifecycle().is_none());
        assert!(TrainingJobStatus::default().lifecycle().is_none());
    }

    #[test]
    fn succeeded_and_failed_finish_a_job() {
        for type_ in [types::SUCCEEDED, types::FAILED] {
            let status = TrainingJobStatus {
                conditions: vec![condition(types::RUNNING, "False"), condition(type_, "True")],
                ..TrainingJobStatus::default()
            };
            assert!(status.is_finished(), "{type_}");
            assert_eq!(status.finished().map(|c| c.type_.as_str()), Some(type_));
        }
        let not_yet = TrainingJobStatus {
            conditions: vec![condition(types::SUCCEEDED, "False")],
            ..TrainingJobStatus::default()
        };
        assert!(!not_yet.is_finished());
    }
}
