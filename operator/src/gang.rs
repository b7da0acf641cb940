//! PURE: gang scheduling. A job with `runPolicy.schedulingPolicy.gang` gets a PodGroup for
//! the configured gang scheduler, its pods name the scheduler and the group, and the
//! PodGroup's status becomes the job's `GangPending` condition.
//!
//! Volcano and scheduler-plugins spell the same idea differently (API group, field names,
//! how a pod joins its group, which phases mean "admitted"); this module is the one place
//! that knows both spellings.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ObjectMeta};
use kube::{Resource, ResourceExt};
use kubetrain_api::TrainingJob;
use serde_json::{Value, json};

use crate::replica;

/// Gang schedulers the operator can create PodGroups for (`--gang-scheduler`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GangScheduler {
    /// Volcano (`scheduling.volcano.sh/v1beta1` PodGroups, scheduler `volcano`).
    Volcano,
    /// scheduler-plugins coscheduling (`scheduling.x-k8s.io/v1alpha1` PodGroups).
    SchedulerPlugins,
}

/// Volcano finds a pod's group through this annotation.
pub const VOLCANO_GROUP_ANNOTATION: &str = "scheduling.k8s.io/group-name";
/// scheduler-plugins finds a pod's group through this label.
pub const SCHEDULER_PLUGINS_GROUP_LABEL: &str = "scheduling.x-k8s.io/pod-group";

impl GangScheduler {
    /// The `schedulerName` pods of gang-scheduled jobs get.
    pub fn scheduler_name(self) -> &'static str {
        match self {
            GangScheduler::Volcano => "volcano",
            GangScheduler::SchedulerPlugins => "scheduler-plugins-scheduler",
        }
    }

    /// The PodGroup kind of this scheduler.
    pub fn api_resource(self) -> ApiResource {
        let gvk = match self {
            GangScheduler::Volcano => {
                GroupVersionKind::gvk("scheduling.volcano.sh", "v1beta1", "PodGroup")
            }
            GangScheduler::SchedulerPlugins => {
                GroupVersionKind::gvk("scheduling.x-k8s.io", "v1alpha1", "PodGroup")
            }
        };
        ApiResource::from_gvk_with_plural(&gvk, "podgroups")
    }

    /// Phases in which the scheduler has admitted the whole gang.
    fn admitted_phases(self) -> &'static [&'static str] {
        match self {
            // Inqueue: resources are reserved and the pods are being bound.
            GangScheduler::Volcano => &["Inqueue", "Running", "Completed"],
            GangScheduler::SchedulerPlugins => &["Scheduled", "Running", "Succeeded", "Finished"],
        }
    }
}

/// The gang scheduler a job's pods go through, if the job asks for one and the operator
/// has one configured.
pub fn active(job: &TrainingJob, configured: Option<GangScheduler>) -> Option<GangScheduler> {
    configured.filter(|_| wanted(job))
}

/// Whether the job asks for gang scheduling.
pub fn wanted(job: &TrainingJob) -> bool {
    job.spec
        .run_policy
        .scheduling_policy
        .as_ref()
        .is_some_and(|p| p.gang)
}

/// Pods that must be placeable together: `minAvailable`, or every replica of the job.
pub fn min_member(job: &TrainingJob) -> i32 {
    let all = replica::replica_ids(job).len() as i32;
    job.spec
        .run_policy
        .scheduling_policy
        .as_ref()
        .and_then(|p| p.min_available)
        .unwrap_or(all)
}

/// The PodGroup named after the job, owned by it.
pub fn pod_group(job: &TrainingJob, scheduler: GangScheduler) -> DynamicObject {
    let resource = scheduler.api_resource();
    let policy = job
        .spec
        .run_policy
        .scheduling_policy
        .clone()
        .unwrap_or_default();
    let spec = match scheduler {
        GangScheduler::Volcano => {
            let mut spec = json!({ "minMember": min_member(job) });
            if let Some(queue) = &policy.queue {
                spec["queue"] = json!(queue);
            }
            if let Some(priority) = &policy.priority_class {
                spec["priorityClassName"] = json!(priority);
            }
            spec
        }
        // scheduler-plugins has no queues; priority comes from the pods' priorityClassName.
        GangScheduler::SchedulerPlugins => json!({ "minMember": min_member(job) }),
    };
    let metadata = ObjectMeta {
        name: Some(job.name_any()),
        namespace: job.namespace(),
        labels: Some(replica::job_labels(job)),
        owner_references: job.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    };
    let mut group = DynamicObject::new(&job.name_any(), &resource).data(json!({ "spec": spec }));
    group.metadata = metadata;
    group
}

/// Puts a planned pod into the job's gang: scheduler name plus the group reference.
pub fn join(pod: &mut Pod, job: &TrainingJob, scheduler: GangScheduler) {
    let group = job.name_any();
    if let Some(spec) = pod.spec.as_mut() {
        spec.scheduler_name = Some(scheduler.scheduler_name().to_string());
    }
    match scheduler {
        GangScheduler::Volcano => {
            pod.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(VOLCANO_GROUP_ANNOTATION.to_string(), group);
        }
        GangScheduler::SchedulerPlugins => {
            pod.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(SCHEDULER_PLUGINS_GROUP_LABEL.to_string(), group);
        }
    }
}

/// Whether an existing PodGroup already has everything [`pod_group`] sets, so a reconcile
/// need not write it again.
pub fn matches(existing: &DynamicObject, desired: &DynamicObject) -> bool {
    existing.metadata.deletion_timestamp.is_none()
        && existing.data.get("spec").is_some_and(|spec| {
            desired.data["spec"]
                .as_object()
                .into_iter()
                .flatten()
                .all(|(k, v)| spec.get(k) == Some(v))
        })
        && existing.metadata.owner_references == desired.metadata.owner_references
}

/// What the operator found out about a job's gang, the input to its `GangPending` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GangObservation {
    /// The job does not ask for gang scheduling (or has finished).
    Off,
    /// The job asks for it, but the operator runs without `--gang-scheduler`.
    NotConfigured,
    /// The scheduler's PodGroup CRD is not installed in the cluster.
    CrdMissing {
        /// The scheduler whose CRD is missing.
        scheduler: GangScheduler,
        /// What the API server said.
        detail: String,
    },
    /// The job's PodGroup exists.
    Group(PodGroupState),
}

/// The parts of a PodGroup's status the job's condition reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodGroupState {
    /// The scheduler that owns the group.
    pub scheduler: GangScheduler,
    /// The group's name.
    pub name: String,
    /// `status.phase`, empty before the scheduler looked at the group.
    pub phase: String,
    /// Why the scheduler cannot place the gang (an `Unschedulable` condition), if it said.
    pub unschedulable: Option<String>,
}

impl PodGroupState {
    /// Reads the state out of a PodGroup of `scheduler`.
    pub fn from_object(scheduler: GangScheduler, group: &DynamicObject) -> Self {
        let status = group.data.get("status");
        let phase = status
            .and_then(|s| s.get("phase"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let unschedulable = status
            .and_then(|s| s.get("conditions"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Unschedulable" && c["status"] == "True")
            .map(|c| {
                let reason = c["reason"].as_str().unwrap_or("Unschedulable");
                match c["message"].as_str() {
                    Some(m) if !m.is_empty() => format!("{reason}: {m}"),
                    _ => reason.to_string(),
                }
            });
        Self {
            scheduler,
            name: group.name_any(),
            phase,
            unschedulable,
        }
    }

    /// Whether the scheduler has admitted the gang.
    pub fn admitted(&self) -> bool {
        self.scheduler
            .admitted_phases()
            .contains(&self.phase.as_str())
    }
}

/// Whether the scheduler has placed the pod (or it already ran).
pub fn is_scheduled(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    matches!(
        status.phase.as_deref(),
        Some("Running" | "Succeeded" | "Failed")
    ) || status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "PodScheduled" && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;
    use kubetrain_api::SchedulingPolicy;

    fn job(policy: Option<SchedulingPolicy>) -> TrainingJob {
        kubetrain_api::fixtures::JobFixture::quickstart()
            .namespace("ns")
            .uid("uid-1")
            .with(|job| job.spec.run_policy.scheduling_policy = policy)
            .build()
    }

    fn gang(min: Option<i32>) -> Option<SchedulingPolicy> {
        Some(SchedulingPolicy {
            gang: true,
            min_available: min,
            queue: Some("research".into()),
            priority_class: Some("high".into()),
        })
    }

    #[test]
    fn volcano_group_defaults_min_member_to_every_replica_and_carries_queue_and_priority() {
        let job = job(gang(None));
        let all = replica::replica_ids(&job).len() as i32;
        let group = pod_group(&job, GangScheduler::Volcano);
        assert_eq!(
            group.types.as_ref().map(|t| t.api_version.as_str()),
            Some("scheduling.volcano.sh/v1beta1")
        );
        assert_eq!(group.data["spec"]["minMember"], json!(all));
        assert_eq!(group.data["spec"]["queue"], json!("research"));
        assert_eq!(group.data["spec"]["priorityClassName"], json!("high"));
        let owner = &group.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(owner.uid, "uid-1");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(group.metadata.namespace.as_deref(), Some("ns"));
    }

    #[test]
    fn scheduler_plugins_group_takes_min_available_and_has_no_queue() {
        let job = job(gang(Some(2)));
        let group = pod_group(&job, GangScheduler::SchedulerPlugins);
        assert_eq!(
            group.types.as_ref().map(|t| t.api_version.as_str()),
            Some("scheduling.x-k8s.io/v1alpha1")
        );
        assert_eq!(group.data["spec"], json!({"minMember": 2}));
    }

    #[test]
    fn pods_join_the_group_the_way_each_scheduler_reads_it() {
        let job = job(gang(None));
        let mut pod = Pod {
            spec: Some(Default::default()),
            ..Pod::default()
        };
        join(&mut pod, &job, GangScheduler::Volcano);
        assert_eq!(
            pod.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()),
            Some("volcano")
        );
        assert_eq!(
            pod.annotations().get(VOLCANO_GROUP_ANNOTATION),
            Some(&job.name_any())
        );
        let mut pod = Pod {
            spec: Some(Default::default()),
            ..Pod::default()
        };
        join(&mut pod, &job, GangScheduler::SchedulerPlugins);
        assert_eq!(
            pod.labels().get(SCHEDULER_PLUGINS_GROUP_LABEL),
            Some(&job.name_any())
        );
    }

    #[test]
    fn gang_is_active_only_when_asked_for_and_configured() {
        assert_eq!(active(&job(gang(None)), None), None);
        assert_eq!(active(&job(None), Some(GangScheduler::Volcano)), None);
        assert_eq!(
            active(&job(gang(None)), Some(GangScheduler::Volcano)),
            Some(GangScheduler::Volcano)
        );
    }

    #[test]
    fn state_reads_phase_and_unschedulable_reason() {
        let job = job(gang(None));
        let mut group = pod_group(&job, GangScheduler::Volcano);
        group.data["status"] = json!({
            "phase": "Pending",
            "conditions": [{"type": "Unschedulable", "status": "True",
                "reason": "NotEnoughResources", "message": "3/3 tasks in gang unschedulable"}]
        });
        let state = PodGroupState::from_object(GangScheduler::Volcano, &group);
        assert_eq!(state.phase, "Pending");
        assert!(!state.admitted());
        assert_eq!(
            state.unschedulable.as_deref(),
            Some("NotEnoughResources: 3/3 tasks in gang unschedulable")
        );
        group.data["status"] = json!({"phase": "Inqueue"});
        assert!(PodGroupState::from_object(GangScheduler::Volcano, &group).admitted());
        group.data["status"] = json!({"phase": "Scheduling"});
        assert!(!PodGroupState::from_object(GangScheduler::SchedulerPlugins, &group).admitted());
        group.data["status"] = json!({"phase": "Scheduled"});
        assert!(PodGroupState::from_object(GangScheduler::SchedulerPlugins, &group).admitted());
    }

    #[test]
    fn matching_ignores_status_but_not_spec() {
        let job = job(gang(None));
        let desired = pod_group(&job, GangScheduler::Volcano);
        let mut existing = desired.clone();
        existing.data["status"] = json!({"phase": "Running"});
        existing.data["spec"]["minResources"] = json!({"cpu": "1"});
        assert!(matches(&existing, &desired));
        existing.data["spec"]["minMember"] = json!(1);
        assert!(!matches(&existing, &desired));
    }

    #[test]
    fn a_pod_counts_as_scheduled_once_bound_or_running() {
        let mut pod = Pod::default();
        assert!(!is_scheduled(&pod));
        pod.status = Some(PodStatus {
            phase: Some("Pending".into()),
            ..PodStatus::default()
        });
        assert!(!is_scheduled(&pod));
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            ..PodStatus::default()
        });
        assert!(is_scheduled(&pod));
    }
}
