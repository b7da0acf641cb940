//! PURE: what each replica's pod means under its restart policy ([`classify`]), and from
//! that the pods to create, recreate or delete and the job's lifecycle while it runs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kubetrain_api::condition::{reasons, types};
use kubetrain_api::{PodRecreation, RestartPolicy};

use super::counts::created_note;
use super::{Action, Decider, JobEvent};
use crate::pod_state::{crash_looping, diverged, exit_code, is_terminating, phase};
use crate::replica::{self, ReplicaId};

/// What one existing pod means for its replica, under the replica's restart policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodVerdict {
    /// Being deleted: the replica waits for it to go.
    Terminating,
    /// Failed, and the restart policy makes that final for the job.
    FailedForGood {
        /// "exit code 3" or "no exit code".
        code_text: String,
    },
    /// Failed; to be deleted and created again.
    Recreate {
        /// The main container's exit code, if it had one.
        code: Option<i32>,
        /// "exit code 137" or "no exit code".
        code_text: String,
    },
    /// Running; `crash_loop` names why a container waits to be restarted in place.
    Running {
        /// For example `CrashLoopBackOff`.
        crash_loop: Option<String>,
    },
    /// Completed.
    Succeeded,
    /// Not started yet (Pending, or no phase reported).
    Starting,
}

/// The verdict on `pod` under restart policy `policy`.
pub fn classify(pod: &Pod, policy: RestartPolicy) -> PodVerdict {
    if is_terminating(pod) {
        return PodVerdict::Terminating;
    }
    match phase(pod) {
        "Failed" => {
            let code = exit_code(pod);
            let code_text = code.map_or("no exit code".to_string(), |c| format!("exit code {c}"));
            let for_good = match policy {
                RestartPolicy::Never => true,
                RestartPolicy::ExitCode => code.is_some_and(|c| (1..=127).contains(&c)),
                // The kubelet restarts these in place; a pod that still ends Failed
                // (evicted, node lost) is recreated.
                RestartPolicy::OnFailure | RestartPolicy::Always => false,
            };
            if for_good {
                PodVerdict::FailedForGood { code_text }
            } else {
                PodVerdict::Recreate { code, code_text }
            }
        }
        "Running" => PodVerdict::Running {
            crash_loop: crash_looping(pod),
        },
        "Succeeded" => PodVerdict::Succeeded,
        _ => PodVerdict::Starting,
    }
}

/// What the wanted replicas' pods add up to.
#[derive(Debug, Default)]
struct Survey {
    /// Why the job is Restarting, one entry per replica that is.
    restarting: Vec<String>,
    /// The first pod whose failure is final.
    failed_for_good: Option<String>,
    /// Replicas running or completed.
    started: usize,
    /// Replicas without a pod.
    to_create: Vec<ReplicaId>,
}

impl Decider<'_> {
    pub(super) fn reconcile_replicas(
        &mut self,
        pods: &[Pod],
        by_replica: &BTreeMap<ReplicaId, &Pod>,
    ) {
        let wanted = replica::replica_ids(self.job);
        self.delete_unwanted(pods, &wanted);
        let mut survey = self.survey(&wanted, by_replica);
        if self.finish_if_decided(pods, by_replica, survey.failed_for_good.take()) {
            return;
        }
        if self.startup_deadline_passed(pods) {
            return;
        }
        if !self.gang_allows_pods(by_replica) {
            survey.to_create.clear();
        }
        self.create(std::mem::take(&mut survey.to_create));
        self.set_running_lifecycle(&survey, wanted.len());
    }

    /// Pods beyond the wanted replicas (the job was scaled down) go away.
    fn delete_unwanted(&mut self, pods: &[Pod], wanted: &[ReplicaId]) {
        for pod in pods {
            let ours = ReplicaId::from_pod(pod).is_some_and(|id| wanted.contains(&id));
            if !ours && !is_terminating(pod) {
                self.delete(pod);
            }
        }
    }

    /// Classifies every wanted replica's pod, recreating those whose failure is not final.
    fn survey(&mut self, wanted: &[ReplicaId], by_replica: &BTreeMap<ReplicaId, &Pod>) -> Survey {
        let mut survey = Survey::default();
        for &replica in wanted {
            let name = replica.pod_name(&self.job.name_any());
            let recreated = self.status.recreated_pods.contains_key(&name);
            let Some(pod) = by_replica.get(&replica) else {
                if recreated {
                    survey.restarting.push(format!("{name} is being recreated"));
                }
                survey.to_create.push(replica);
                continue;
            };
            let policy = replica::replica_spec(self.job, replica.role)
                .map(|s| s.restart_policy)
                .unwrap_or_default();
            match classify(pod, policy) {
                PodVerdict::Terminating => {
                    survey.restarting.push(format!("{name} is terminating"));
                }
                PodVerdict::FailedForGood { code_text } => {
                    survey.failed_for_good.get_or_insert_with(|| {
                        let codes = if policy == RestartPolicy::ExitCode {
                            ": codes 1-127 are permanent"
                        } else {
                            ""
                        };
                        format!(
                            "pod {name} failed with {code_text} (restartPolicy {policy:?}{codes})"
                        )
                    });
                }
                PodVerdict::Recreate { code, code_text } => {
                    self.recreate(pod, code, &code_text);
                    survey.restarting.push(format!(
                        "{name} failed with {code_text} and is being recreated"
                    ));
                }
                PodVerdict::Running { crash_loop } => {
                    survey.started += 1;
                    if let Some(waiting) = crash_loop {
                        survey
                            .restarting
                            .push(format!("{name} is restarting ({waiting})"));
                    }
                }
                PodVerdict::Succeeded => survey.started += 1,
                // A recreated pod that has not started yet is still part of the restart.
                PodVerdict::Starting if recreated => {
                    survey
                        .restarting
                        .push(format!("{name} was recreated and is starting"));
                }
                PodVerdict::Starting => {}
            }
        }
        survey
    }

    /// Finishes the job when its pods decide it: a diverged trainer, success, a failure
    /// that is final, or more restarts than the backoff limit allows, in that order.
    fn finish_if_decided(
        &mut self,
        pods: &[Pod],
        by_replica: &BTreeMap<ReplicaId, &Pod>,
        failed_for_good: Option<String>,
    ) -> bool {
        let diverged = self
            .job
            .spec
            .training
            .is_some()
            .then(|| by_replica.values().find_map(|pod| diverged(pod)))
            .flatten();
        let (type_, reason, action, message) = if let Some(message) = diverged {
            (types::FAILED, reasons::DIVERGED, "Fail", message)
        } else if let Some(message) = self.success(by_replica) {
            (
                types::SUCCEEDED,
                reasons::JOB_SUCCEEDED,
                "Complete",
                message,
            )
        } else if let Some(message) = failed_for_good {
            (types::FAILED, reasons::POD_FAILED, "Fail", message)
        } else if let Some(message) = self.backoff_exceeded(pods) {
            (
                types::FAILED,
                reasons::BACKOFF_LIMIT_EXCEEDED,
                "Fail",
                message,
            )
        } else {
            return false;
        };
        let event = if type_ == types::SUCCEEDED {
            JobEvent::normal(reason, action, message.clone())
        } else {
            JobEvent::warning(reason, action, message.clone())
        };
        self.events.push(event);
        self.finish(type_, reason, message, pods);
        true
    }

    /// Creates the replicas' pods, and the Service and start time with the first.
    fn create(&mut self, to_create: Vec<ReplicaId>) {
        if to_create.is_empty() {
            return;
        }
        if self.status.start_time.is_none() {
            self.status.start_time = Some(Time(self.now));
        }
        self.actions.push(Action::EnsureService);
        let names: Vec<String> = to_create
            .iter()
            .map(|r| r.pod_name(&self.job.name_any()))
            .collect();
        // One Event per job and reconcile, not one per pod: a 1,000-pod burst is one
        // write, and `kubectl describe` still names every pod.
        self.events.push(JobEvent::normal(
            "PodCreated",
            "CreatePod",
            created_note(&names),
        ));
        self.actions
            .extend(to_create.into_iter().map(Action::CreatePod));
    }

    /// Restarting, Running or Created, from what the replicas' pods are doing.
    fn set_running_lifecycle(&mut self, survey: &Survey, wanted: usize) {
        if !survey.restarting.is_empty() {
            self.set_lifecycle(
                types::RESTARTING,
                reasons::POD_RESTARTING,
                survey.restarting.join("; "),
            );
        } else if survey.started == wanted {
            self.set_lifecycle(
                types::RUNNING,
                reasons::ALL_REPLICAS_RUNNING,
                format!("all {wanted} pods are running"),
            );
        } else {
            self.set_lifecycle(
                types::CREATED,
                reasons::PODS_CREATED,
                format!("{} of {wanted} pods started", survey.started),
            );
        }
    }

    /// Records that `pod` is being recreated (once per pod UID) and deletes it.
    fn recreate(&mut self, pod: &Pod, code: Option<i32>, code_text: &str) {
        let name = pod.name_any();
        let uid = pod.uid().unwrap_or_default();
        let entry = self.status.recreated_pods.entry(name.clone()).or_default();
        if entry.last_uid != uid {
            *entry = PodRecreation {
                count: entry.count + 1,
                last_uid: uid,
                last_exit_code: code,
            };
            self.events.push(JobEvent::warning(
                reasons::POD_RESTARTING,
                "RecreatePod",
                format!("recreating pod {name} after it failed with {code_text}"),
            ));
        }
        self.delete(pod);
    }

    pub(super) fn delete(&mut self, pod: &Pod) {
        self.actions.push(Action::DeletePod {
            name: pod.name_any(),
            uid: pod.uid(),
        });
    }
}
