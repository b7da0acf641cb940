//! PURE: a TrainingJob plus the pods observed for it become the job's next status and the
//! actions that bring the world closer to the spec (create, delete, clean up).
//!
//! Every policy decision lives here, one concept a module: the job's lifecycle in this
//! one ([`decide`]); what each replica's pod means under its restart policy and which pods
//! to create or delete (`replicas`); success, backoff and the deadlines that end a job
//! (`policies`); gang admission (`gang_admission`); suspension, clean-up and TTL
//! (`cleanup`); condition bookkeeping (`conditions`); and the per-role counts (`counts`).
//! The controller and the local runner only carry the actions out, so both behave the
//! same. The submodules add methods to the one [`Decider`] a decision runs, and import
//! nothing of each other but its type.

mod cleanup;
mod conditions;
mod counts;
mod gang_admission;
mod policies;
mod replicas;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kubetrain_api::condition::{reasons, types};
use kubetrain_api::contract::Role;
use kubetrain_api::{JobCondition, TrainingJob, TrainingJobStatus};

pub use replicas::{PodVerdict, classify};

use crate::gang::GangObservation;
use crate::replica::{self, ReplicaId};

/// Something the job needs done to the world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create the pod of this replica.
    CreatePod(ReplicaId),
    /// Delete a pod (only the incarnation with this UID).
    DeletePod {
        /// Pod name.
        name: String,
        /// UID precondition, so a newer pod of the same name is never deleted by mistake.
        uid: Option<String>,
    },
    /// Make sure the headless Service exists as planned.
    EnsureService,
    /// Delete the headless Service.
    DeleteService,
    /// Delete the TrainingJob itself (ttlSecondsAfterFinished has passed).
    DeleteJob,
}

/// An Event to record on the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobEvent {
    /// Warning rather than Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// CamelCase action the operator took.
    pub action: &'static str,
    /// Human-readable note.
    pub note: String,
}

impl JobEvent {
    fn normal(reason: &'static str, action: &'static str, note: String) -> Self {
        Self {
            warning: false,
            reason,
            action,
            note,
        }
    }
    fn warning(reason: &'static str, action: &'static str, note: String) -> Self {
        Self {
            warning: true,
            reason,
            action,
            note,
        }
    }
}

/// The outcome of looking at a job once.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The status the job should have now.
    pub status: TrainingJobStatus,
    /// What to do, in order.
    pub actions: Vec<Action>,
    /// Events to record.
    pub events: Vec<JobEvent>,
    /// When to look again even if nothing changes (deadlines, TTL), if ever.
    pub requeue_after: Option<Duration>,
}

/// Decides the next status and actions of `job`, given its pods as observed `now`.
pub fn decide(job: &TrainingJob, pods: &[Pod], now: Timestamp) -> Decision {
    decide_with_gang(job, pods, &GangObservation::Off, now)
}

/// How often a job whose gang scheduler's CRD is missing looks again: the CRD may be
/// installed later, and a calm recheck is no error loop.
pub const GANG_CRD_RECHECK: Duration = Duration::from_secs(60);

/// How often a job whose gang waits for admission rereads its PodGroup: the operator does
/// not watch PodGroups (their CRD may not exist), and the condition must not go stale.
pub const GANG_PENDING_RECHECK: Duration = Duration::from_secs(10);

/// [`decide`] for a job whose gang scheduling the controller has looked at: the PodGroup's
/// state becomes the `GangPending` condition, and without the scheduler's CRD no pod is
/// created (it would wait forever for a scheduler that is not there).
pub fn decide_with_gang(
    job: &TrainingJob,
    pods: &[Pod],
    gang: &GangObservation,
    now: Timestamp,
) -> Decision {
    // The API server keeps whole seconds; deciding with nanoseconds would make every
    // written status differ from the one read back, and reconcile forever.
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let mut d = Decider {
        job,
        gang,
        now,
        status: job.status.clone().unwrap_or_default(),
        actions: Vec::new(),
        events: Vec::new(),
        requeue_after: None,
    };
    d.status.observed_generation = job.metadata.generation;
    let by_replica = index_pods(pods);
    d.run(pods, &by_replica);
    let has = |role| replica::replica_spec(job, role).is_some();
    let counts = |role| counts::replica_status(job, role, pods, &d.status);
    d.status.replica_statuses = kubetrain_api::ReplicaStatuses {
        chief: has(Role::Chief).then(|| counts(Role::Chief)),
        ps: counts(Role::Ps),
        worker: counts(Role::Worker),
        evaluator: has(Role::Evaluator).then(|| counts(Role::Evaluator)),
    };
    counts::count_created_as_active(&mut d.status.replica_statuses, &d.actions);
    d.status.workers_ready = Some(format!(
        "{}/{}",
        d.status.replica_statuses.worker.ready,
        replica::replicas(job, Role::Worker)
    ));
    d.status.replicas_ready = Some(counts::replicas_ready(job, &d.status.replica_statuses));
    conditions::sort_conditions(&mut d.status.conditions);
    Decision {
        status: d.status,
        actions: d.actions,
        events: d.events,
        requeue_after: d.requeue_after,
    }
}

/// One decision in the making: the job, what was observed, and what it has decided so far.
struct Decider<'a> {
    job: &'a TrainingJob,
    gang: &'a GangObservation,
    now: Timestamp,
    status: TrainingJobStatus,
    actions: Vec<Action>,
    events: Vec<JobEvent>,
    requeue_after: Option<Duration>,
}

/// The job's pods by replica; pods that are not ours or carry bad labels are left out.
fn index_pods(pods: &[Pod]) -> BTreeMap<ReplicaId, &Pod> {
    pods.iter()
        .filter_map(|p| ReplicaId::from_pod(p).map(|id| (id, p)))
        .collect()
}

impl Decider<'_> {
    fn run(&mut self, pods: &[Pod], by_replica: &BTreeMap<ReplicaId, &Pod>) {
        // A spec fixed after InvalidSpec gets a fresh start; any other finish is final.
        if let Some(finished) = self.finished_condition() {
            let invalid =
                finished.type_ == types::FAILED && finished.reason == reasons::INVALID_SPEC;
            if !(invalid && self.job.spec.validate().is_ok()) {
                self.clean_up_finished(pods);
                return;
            }
            self.status.completion_time = None;
        }

        if let Err(invalid) = self.job.spec.validate() {
            let message = format!("invalid spec: {invalid}");
            self.events.push(JobEvent::warning(
                reasons::INVALID_SPEC,
                "Validate",
                message.clone(),
            ));
            self.finish(types::FAILED, reasons::INVALID_SPEC, message, pods);
            return;
        }

        if self.job.spec.run_policy.suspend {
            self.suspend(pods);
            return;
        }
        if self.lifecycle_is(types::SUSPENDED) {
            self.set_lifecycle(
                types::CREATED,
                reasons::JOB_RESUMED,
                "the job was resumed; its pods are being recreated".into(),
            );
            self.status.start_time = None;
            self.events.push(JobEvent::normal(
                reasons::JOB_RESUMED,
                "Resume",
                "runPolicy.suspend is false: recreating the pods".into(),
            ));
        }

        if self.deadline_passed(pods) {
            return;
        }

        self.reconcile_replicas(pods, by_replica);
    }

    fn finished_condition(&self) -> Option<&JobCondition> {
        self.status.finished()
    }

    fn lifecycle_is(&self, type_: &str) -> bool {
        self.status.is(type_)
    }

    fn wake_in(&mut self, after: Duration) {
        self.requeue_after = Some(match self.requeue_after {
            Some(current) => current.min(after),
            None => after,
        });
    }
}

/// Whether the job has reached Succeeded or Failed.
pub fn is_finished(job: &TrainingJob) -> bool {
    job.status
        .as_ref()
        .is_some_and(TrainingJobStatus::is_finished)
}

/// Whether the job has failed with InvalidSpec.
pub fn failed_for_invalid_spec(job: &TrainingJob) -> bool {
    job.status
        .as_ref()
        .and_then(TrainingJobStatus::finished)
        .is_some_and(|c| c.type_ == types::FAILED && c.reason == reasons::INVALID_SPEC)
}

#[cfg(test)]
mod tests;
