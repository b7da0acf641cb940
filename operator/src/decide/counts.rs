//! PURE: the status's pod counts per role, and the Event note that names created pods.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kubetrain_api::contract::Role;
use kubetrain_api::{ReplicaStatus, ReplicaStatuses, TrainingJob, TrainingJobStatus};

use super::Action;
use crate::pod_state::{is_ready, is_terminating, phase, restart_count};
use crate::replica::{self, ReplicaId};

/// Pod counts of one role.
pub(super) fn replica_status(
    job: &TrainingJob,
    role: Role,
    pods: &[Pod],
    status: &TrainingJobStatus,
) -> ReplicaStatus {
    let ours: Vec<&Pod> = pods
        .iter()
        .filter(|p| ReplicaId::from_pod(p).is_some_and(|id| id.role == role))
        .collect();
    let prefix = format!("{}-{}-", job.name_any(), role.as_str());
    let recreated: i32 = status
        .recreated_pods
        .iter()
        .filter(|(name, _)| name.starts_with(&prefix))
        .map(|(_, r)| r.count)
        .sum();
    let count = |f: &dyn Fn(&Pod) -> bool| ours.iter().filter(|p| f(p)).count() as i32;
    ReplicaStatus {
        active: count(&|p| !is_terminating(p) && matches!(phase(p), "Pending" | "Running" | "")),
        ready: count(&|p| phase(p) == "Running" && is_ready(p)),
        succeeded: count(&|p| phase(p) == "Succeeded"),
        failed: count(&|p| phase(p) == "Failed"),
        restarts: recreated + ours.iter().map(|p| restart_count(p)).sum::<i32>(),
    }
}

/// `chief 1/1, ps 1/1, worker 2/2`: ready out of desired pods of every role the job has.
pub(super) fn replicas_ready(job: &TrainingJob, statuses: &ReplicaStatuses) -> String {
    Role::ALL
        .into_iter()
        .filter(|role| replica::replicas(job, *role) > 0)
        .map(|role| {
            let ready = statuses.role(role).map_or(0, |s| s.ready);
            format!("{role} {ready}/{}", replica::replicas(job, role))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A pod this decision creates is active (Pending) as soon as it is written. Counting it
/// now makes the status written with the pods the one the next reconcile computes when
/// the watch shows them, instead of a second write per job for the counts alone.
pub(super) fn count_created_as_active(statuses: &mut ReplicaStatuses, actions: &[Action]) {
    for action in actions {
        let Action::CreatePod(replica) = action else {
            continue;
        };
        let status = match replica.role {
            Role::Chief => statuses.chief.as_mut(),
            Role::Ps => Some(&mut statuses.ps),
            Role::Worker => Some(&mut statuses.worker),
            Role::Evaluator => statuses.evaluator.as_mut(),
        };
        if let Some(status) = status {
            status.active += 1;
        }
    }
}

/// "created pod a" or "created 3 pods: a, b, c", the names cut short well within the
/// 1 kB an Event's note may hold.
pub(super) fn created_note(names: &[String]) -> String {
    const ROOM: usize = 800;
    if let [one] = names {
        return format!("created pod {one}");
    }
    let mut listed = String::new();
    let mut shown = 0;
    for name in names {
        if listed.len() + name.len() + 2 > ROOM {
            break;
        }
        if shown > 0 {
            listed.push_str(", ");
        }
        listed.push_str(name);
        shown += 1;
    }
    let rest = names.len() - shown;
    let more = if rest > 0 {
        format!(" and {rest} more")
    } else {
        String::new()
    };
    format!("created {} pods: {listed}{more}", names.len())
}
