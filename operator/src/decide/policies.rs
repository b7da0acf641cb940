//! PURE: what ends a job besides its pods' own exits: the success policy, the backoff
//! limit, and the active and startup deadlines.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kubetrain_api::SuccessPolicy;
use kubetrain_api::condition::{reasons, types};
use kubetrain_api::contract::Role;

use super::{Decider, JobEvent};
use crate::pod_state::{is_terminating, last_restart, phase, restart_count, stall_reason};
use crate::replica::{self, ReplicaId};

impl Decider<'_> {
    pub(super) fn success(&self, by_replica: &BTreeMap<ReplicaId, &Pod>) -> Option<String> {
        let workers = replica::replicas(self.job, Role::Worker);
        let role_succeeded = |role, index| {
            by_replica
                .get(&ReplicaId { role, index })
                .is_some_and(|p| phase(p) == "Succeeded")
        };
        let succeeded = |index| role_succeeded(Role::Worker, index);
        // As in Kubeflow's TFJob: a chief, when there is one, alone decides success.
        if replica::replicas(self.job, Role::Chief) > 0 {
            return role_succeeded(Role::Chief, 0)
                .then(|| "the chief completed successfully".to_string());
        }
        match self.job.spec.success_policy {
            SuccessPolicy::ChiefWorker if succeeded(0) => {
                Some("the chief (worker 0) completed successfully".into())
            }
            SuccessPolicy::AllWorkers if workers > 0 && (0..workers).all(succeeded) => {
                Some(format!("all {workers} workers completed successfully"))
            }
            _ => None,
        }
    }

    pub(super) fn backoff_exceeded(&self, pods: &[Pod]) -> Option<String> {
        let limit = self.job.spec.run_policy.backoff_limit;
        let in_place: i32 = pods.iter().map(restart_count).sum();
        let recreated: i32 = self.status.recreated_pods.values().map(|r| r.count).sum();
        let total = in_place + recreated;
        if total <= limit {
            return None;
        }
        // Name the pod that restarted last and how it exited.
        let last = pods
            .iter()
            .filter(|p| restart_count(p) > 0)
            .filter_map(|p| last_restart(p).map(|(at, code)| (at, p.name_any(), code)))
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, name, code)| (name, code))
            .or_else(|| {
                self.status
                    .recreated_pods
                    .iter()
                    .next_back()
                    .map(|(name, r)| (name.clone(), r.last_exit_code))
            });
        let last = last.map_or(String::new(), |(name, code)| {
            format!(
                "; last: pod {name} exited with {}",
                code.map_or("no exit code".into(), |c| format!("code {c}"))
            )
        });
        Some(format!(
            "{total} restarts exceed runPolicy.backoffLimit {limit}{last}"
        ))
    }

    /// Fails the job when it has run past activeDeadlineSeconds; otherwise asks to be
    /// woken when it would.
    pub(super) fn deadline_passed(&mut self, pods: &[Pod]) -> bool {
        let (Some(limit), Some(start)) = (
            self.job.spec.run_policy.active_deadline_seconds,
            self.status.start_time.as_ref(),
        ) else {
            return false;
        };
        let elapsed = self.now.duration_since(start.0).as_secs();
        if elapsed >= limit {
            let message =
                format!("the job ran {elapsed}s, past runPolicy.activeDeadlineSeconds {limit}");
            self.events.push(JobEvent::warning(
                reasons::DEADLINE_EXCEEDED,
                "Fail",
                message.clone(),
            ));
            self.finish(types::FAILED, reasons::DEADLINE_EXCEEDED, message, pods);
            return true;
        }
        self.wake_in(Duration::from_secs((limit - elapsed) as u64));
        false
    }

    /// Reports pods stuck Pending, and fails the job when one stays stuck past
    /// startupDeadlineSeconds.
    pub(super) fn startup_deadline_passed(&mut self, pods: &[Pod]) -> bool {
        let stalled: Vec<(String, String, Option<Timestamp>)> = pods
            .iter()
            .filter(|p| !is_terminating(p) && phase(p) == "Pending")
            .filter_map(|p| {
                stall_reason(p)
                    .map(|reason| (p.name_any(), reason, p.creation_timestamp().map(|t| t.0)))
            })
            .collect();
        if stalled.is_empty() {
            self.set_detail(
                types::PODS_STALLED,
                false,
                "NoStalledPods",
                "no pod is stuck".into(),
            );
            return false;
        }
        let message = stalled
            .iter()
            .map(|(name, reason, _)| format!("pod {name} is stuck: {reason}"))
            .collect::<Vec<_>>()
            .join("; ");
        self.set_detail(types::PODS_STALLED, true, "PodsStalled", message.clone());
        let Some(limit) = self.job.spec.run_policy.startup_deadline_seconds else {
            return false;
        };
        let oldest = stalled.iter().filter_map(|(_, _, created)| *created).min();
        let Some(oldest) = oldest else { return false };
        let waited = self.now.duration_since(oldest).as_secs();
        if waited >= limit {
            let message = format!(
                "{message}; pending {waited}s, past runPolicy.startupDeadlineSeconds {limit}"
            );
            self.events.push(JobEvent::warning(
                reasons::STARTUP_DEADLINE_EXCEEDED,
                "Fail",
                message.clone(),
            ));
            self.finish(
                types::FAILED,
                reasons::STARTUP_DEADLINE_EXCEEDED,
                message,
                pods,
            );
            return true;
        }
        self.wake_in(Duration::from_secs((limit - waited) as u64));
        false
    }
}
