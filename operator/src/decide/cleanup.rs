//! PURE: suspending a job, finishing it, and what a finished job still needs: its pods and
//! Service cleaned up as `cleanPodPolicy` says, then its TTL.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kubetrain_api::CleanPodPolicy;
use kubetrain_api::condition::{reasons, types};
use kubetrain_api::contract::Role;

use super::{Action, Decider, JobEvent};
use crate::pod_state::{is_terminating, phase};
use crate::replica::ReplicaId;

impl Decider<'_> {
    pub(super) fn suspend(&mut self, pods: &[Pod]) {
        let live: Vec<&Pod> = pods.iter().filter(|p| !is_terminating(p)).collect();
        for pod in &live {
            self.delete(pod);
        }
        if !pods.is_empty() || !self.lifecycle_is(types::SUSPENDED) {
            self.actions.push(Action::DeleteService);
        }
        if !self.lifecycle_is(types::SUSPENDED) {
            self.events.push(JobEvent::normal(
                reasons::JOB_SUSPENDED,
                "Suspend",
                format!("runPolicy.suspend is true: deleting {} pods", live.len()),
            ));
        }
        self.set_lifecycle(
            types::SUSPENDED,
            reasons::JOB_SUSPENDED,
            "runPolicy.suspend is true; set it to false to resume".into(),
        );
    }

    /// Moves the job to a final state and cleans up.
    pub(super) fn finish(
        &mut self,
        type_: &'static str,
        reason: &'static str,
        message: String,
        pods: &[Pod],
    ) {
        self.set_lifecycle(type_, reason, message);
        for detail in [types::PODS_STALLED, types::GANG_PENDING] {
            self.set_detail(detail, false, "JobFinished", "the job has finished".into());
        }
        if self.status.completion_time.is_none() {
            self.status.completion_time = Some(Time(self.now));
        }
        self.clean_up_finished(pods);
    }

    /// What a finished job still needs: clean-up of pods and Service, then the TTL.
    pub(super) fn clean_up_finished(&mut self, pods: &[Pod]) {
        let policy = self.job.spec.run_policy.clean_pod_policy;
        let mut kept_failed = Vec::new();
        for pod in pods.iter().filter(|p| !is_terminating(p)) {
            let finished = matches!(phase(pod), "Succeeded" | "Failed");
            let role = ReplicaId::from_pod(pod).map(|r| r.role);
            // Parameter servers only serve the workers: once the job is over they go, even
            // when the chief already told them to exit.
            let ps = role == Some(Role::Ps);
            // An evaluator waits for checkpoints that no longer come: it never outlives
            // the job, whatever the policy keeps.
            let idle_evaluator = role == Some(Role::Evaluator) && !finished;
            let remove = idle_evaluator
                || match policy {
                    CleanPodPolicy::All => true,
                    CleanPodPolicy::Running => !finished || ps,
                    CleanPodPolicy::None => false,
                };
            if remove {
                self.delete(pod);
            } else if phase(pod) == "Failed" {
                kept_failed.push(pod.name_any());
            }
        }
        if policy != CleanPodPolicy::None {
            self.actions.push(Action::DeleteService);
        }
        if !kept_failed.is_empty()
            && let Some(c) =
                self.status.conditions.iter_mut().find(|c| {
                    c.is_true() && (c.type_ == types::FAILED || c.type_ == types::SUCCEEDED)
                })
        {
            let note = format!(
                " (failed pods kept for their logs: {})",
                kept_failed.join(", ")
            );
            if !c.message.ends_with(&note) {
                c.message.push_str(&note);
            }
        }

        if let (Some(ttl), Some(done)) = (
            self.job.spec.run_policy.ttl_seconds_after_finished,
            self.status.completion_time.as_ref(),
        ) {
            let elapsed = self.now.duration_since(done.0).as_secs();
            if elapsed >= ttl {
                self.actions.push(Action::DeleteJob);
            } else {
                self.wake_in(Duration::from_secs((ttl - elapsed) as u64));
            }
        }
    }
}
