//! PURE: a TrainingJob plus the pods observed for it become the job's next status and the
//! actions that bring the world closer to the spec (create, delete, clean up).
//!
//! Every policy decision lives here: restart policies and backoff, success policies,
//! deadlines, suspension, clean-up and TTL, stalled pods. The controller and the local
//! runner only carry the actions out, so both behave the same.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kubetrain_api::condition::{reasons, types};
use kubetrain_api::contract::{self, Role};
use kubetrain_api::{
    CleanPodPolicy, JobCondition, PodRecreation, ReplicaStatus, RestartPolicy, SuccessPolicy,
    TrainingJob, TrainingJobStatus,
};

use crate::gang::{self, GangObservation};
use crate::plan;
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

/// The waiting reasons that mean a pod will not start without someone's help.
pub const STALLED_REASONS: [&str; 4] = [
    "ImagePullBackOff",
    "ErrImagePull",
    "CreateContainerConfigError",
    "Unschedulable",
];

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
    let counts = |role| replica_status(job, role, pods, &d.status);
    d.status.replica_statuses = kubetrain_api::ReplicaStatuses {
        chief: has(Role::Chief).then(|| counts(Role::Chief)),
        ps: counts(Role::Ps),
        worker: counts(Role::Worker),
        evaluator: has(Role::Evaluator).then(|| counts(Role::Evaluator)),
    };
    count_created_as_active(&mut d.status.replica_statuses, &d.actions);
    d.status.workers_ready = Some(format!(
        "{}/{}",
        d.status.replica_statuses.worker.ready,
        replica::replicas(job, Role::Worker)
    ));
    d.status.replicas_ready = Some(replicas_ready(job, &d.status.replica_statuses));
    sort_conditions(&mut d.status.conditions);
    Decision {
        status: d.status,
        actions: d.actions,
        events: d.events,
        requeue_after: d.requeue_after,
    }
}

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

    fn reconcile_replicas(&mut self, pods: &[Pod], by_replica: &BTreeMap<ReplicaId, &Pod>) {
        let job = self.job;
        let wanted = replica::replica_ids(job);

        // Pods beyond the wanted replicas (the job was scaled down) go away.
        for pod in pods {
            let ours = ReplicaId::from_pod(pod).is_some_and(|id| wanted.contains(&id));
            if !ours && !is_terminating(pod) {
                self.delete(pod);
            }
        }

        let mut restarting: Vec<String> = Vec::new();
        let mut permanent_failure: Option<String> = None;
        let mut started = 0usize;
        let mut to_create = Vec::new();

        for &replica in &wanted {
            let name = replica.pod_name(&job.name_any());
            let Some(pod) = by_replica.get(&replica) else {
                if self.status.recreated_pods.contains_key(&name) {
                    restarting.push(format!("{name} is being recreated"));
                }
                to_create.push(replica);
                continue;
            };
            if is_terminating(pod) {
                restarting.push(format!("{name} is terminating"));
                continue;
            }
            let policy = replica::replica_spec(job, replica.role)
                .map(|s| s.restart_policy)
                .unwrap_or_default();
            match phase(pod) {
                "Failed" => {
                    let code = exit_code(pod);
                    let code_text =
                        code.map_or("no exit code".to_string(), |c| format!("exit code {c}"));
                    let permanent = match policy {
                        RestartPolicy::Never => true,
                        RestartPolicy::ExitCode => code.is_some_and(|c| (1..=127).contains(&c)),
                        // The kubelet restarts these in place; a pod that still ends Failed
                        // (evicted, node lost) is recreated.
                        RestartPolicy::OnFailure | RestartPolicy::Always => false,
                    };
                    if permanent {
                        permanent_failure.get_or_insert_with(|| {
                            format!(
                                "pod {name} failed with {code_text} (restartPolicy {policy:?}{})",
                                if policy == RestartPolicy::ExitCode {
                                    ": codes 1-127 are permanent"
                                } else {
                                    ""
                                }
                            )
                        });
                    } else {
                        self.recreate(pod, code, &code_text);
                        restarting.push(format!(
                            "{name} failed with {code_text} and is being recreated"
                        ));
                    }
                }
                "Running" => {
                    started += 1;
                    if let Some(waiting) = crash_looping(pod) {
                        restarting.push(format!("{name} is restarting ({waiting})"));
                    }
                }
                "Succeeded" => started += 1,
                // A recreated pod that has not started yet is still part of the restart.
                _ if self.status.recreated_pods.contains_key(&name) => {
                    restarting.push(format!("{name} was recreated and is starting"));
                }
                _ => {}
            }
        }

        if job.spec.training.is_some()
            && let Some(message) = by_replica.values().find_map(|pod| diverged(pod))
        {
            self.events.push(JobEvent::warning(
                reasons::DIVERGED,
                "Fail",
                message.clone(),
            ));
            self.finish(types::FAILED, reasons::DIVERGED, message, pods);
            return;
        }
        if let Some(message) = self.success(by_replica) {
            self.events.push(JobEvent::normal(
                reasons::JOB_SUCCEEDED,
                "Complete",
                message.clone(),
            ));
            self.finish(types::SUCCEEDED, reasons::JOB_SUCCEEDED, message, pods);
            return;
        }
        if let Some(message) = permanent_failure {
            self.events.push(JobEvent::warning(
                reasons::POD_FAILED,
                "Fail",
                message.clone(),
            ));
            self.finish(types::FAILED, reasons::POD_FAILED, message, pods);
            return;
        }
        if let Some(message) = self.backoff_exceeded(pods) {
            self.events.push(JobEvent::warning(
                reasons::BACKOFF_LIMIT_EXCEEDED,
                "Fail",
                message.clone(),
            ));
            self.finish(
                types::FAILED,
                reasons::BACKOFF_LIMIT_EXCEEDED,
                message,
                pods,
            );
            return;
        }
        if self.startup_deadline_passed(pods) {
            return;
        }
        if !self.gang_allows_pods(by_replica) {
            to_create.clear();
        }

        if !to_create.is_empty() {
            if self.status.start_time.is_none() {
                self.status.start_time = Some(Time(self.now));
            }
            self.actions.push(Action::EnsureService);
            let names: Vec<String> = to_create
                .iter()
                .map(|r| r.pod_name(&job.name_any()))
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

        if !restarting.is_empty() {
            self.set_lifecycle(
                types::RESTARTING,
                reasons::POD_RESTARTING,
                restarting.join("; "),
            );
        } else if started == wanted.len() {
            self.set_lifecycle(
                types::RUNNING,
                reasons::ALL_REPLICAS_RUNNING,
                format!("all {} pods are running", wanted.len()),
            );
        } else {
            self.set_lifecycle(
                types::CREATED,
                reasons::PODS_CREATED,
                format!("{} of {} pods started", started, wanted.len()),
            );
        }
    }

    /// Sets `GangPending` from what the controller saw of the gang; false when pods must
    /// not be created (the PodGroup CRD is missing).
    fn gang_allows_pods(&mut self, by_replica: &BTreeMap<ReplicaId, &Pod>) -> bool {
        let was = |reason: &str| {
            self.status
                .conditions
                .iter()
                .any(|c| c.type_ == types::GANG_PENDING && c.reason == reason)
        };
        match self.gang {
            GangObservation::Off => true,
            GangObservation::NotConfigured => {
                let message = "runPolicy.schedulingPolicy.gang is true, but the operator runs \
                    without --gang-scheduler: pods are scheduled one by one by the default \
                    scheduler. Start the operator with --gang-scheduler volcano or \
                    scheduler-plugins (Helm value gangScheduler)"
                    .to_string();
                if !was(reasons::GANG_SCHEDULER_NOT_CONFIGURED) {
                    self.events.push(JobEvent::warning(
                        reasons::GANG_SCHEDULER_NOT_CONFIGURED,
                        "ScheduleGang",
                        message.clone(),
                    ));
                }
                // Shown although False: it is the one place the user learns why the
                // gang they asked for is not there.
                upsert(
                    &mut self.status.conditions,
                    types::GANG_PENDING,
                    false,
                    reasons::GANG_SCHEDULER_NOT_CONFIGURED,
                    message,
                    self.now,
                );
                true
            }
            GangObservation::CrdMissing { scheduler, detail } => {
                let resource = scheduler.api_resource();
                let message = format!(
                    "gang scheduling needs the PodGroup CRD {} ({}), which this cluster does \
                     not serve ({detail}); no pods are created until it is installed. Install \
                     {scheduler:?}, or set runPolicy.schedulingPolicy.gang to false",
                    resource.api_version, resource.plural,
                );
                if !was(reasons::POD_GROUP_CRD_MISSING) {
                    self.events.push(JobEvent::warning(
                        reasons::POD_GROUP_CRD_MISSING,
                        "ScheduleGang",
                        message.clone(),
                    ));
                }
                self.set_detail(
                    types::GANG_PENDING,
                    true,
                    reasons::POD_GROUP_CRD_MISSING,
                    message,
                );
                self.wake_in(GANG_CRD_RECHECK);
                false
            }
            GangObservation::Group(group) => {
                let wanted = replica::replica_ids(self.job);
                let pending = wanted
                    .iter()
                    .filter(|r| !by_replica.get(r).is_some_and(|p| gang::is_scheduled(p)))
                    .count();
                if group.admitted() || pending == 0 {
                    self.set_detail(
                        types::GANG_PENDING,
                        false,
                        reasons::GANG_ADMITTED,
                        format!(
                            "PodGroup {} admitted the gang of {} pods",
                            group.name,
                            wanted.len()
                        ),
                    );
                } else {
                    let phase = if group.phase.is_empty() {
                        "not yet seen by the scheduler".to_string()
                    } else {
                        format!("phase {}", group.phase)
                    };
                    let why = group
                        .unschedulable
                        .as_ref()
                        .map_or(String::new(), |u| format!("; scheduler: {u}"));
                    self.wake_in(GANG_PENDING_RECHECK);
                    let reason = if group.unschedulable.is_some() {
                        reasons::GANG_UNSCHEDULABLE
                    } else {
                        reasons::POD_GROUP_PENDING
                    };
                    self.set_detail(
                        types::GANG_PENDING,
                        true,
                        reason,
                        format!(
                            "PodGroup {} ({phase}) has not admitted the gang: {pending} of {} \
                             pods still pending, minMember {}{why}",
                            group.name,
                            wanted.len(),
                            gang::min_member(self.job),
                        ),
                    );
                }
                true
            }
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

    fn delete(&mut self, pod: &Pod) {
        self.actions.push(Action::DeletePod {
            name: pod.name_any(),
            uid: pod.uid(),
        });
    }

    fn success(&self, by_replica: &BTreeMap<ReplicaId, &Pod>) -> Option<String> {
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

    fn backoff_exceeded(&self, pods: &[Pod]) -> Option<String> {
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
    fn deadline_passed(&mut self, pods: &[Pod]) -> bool {
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
    fn startup_deadline_passed(&mut self, pods: &[Pod]) -> bool {
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

    fn suspend(&mut self, pods: &[Pod]) {
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
    fn finish(&mut self, type_: &'static str, reason: &'static str, message: String, pods: &[Pod]) {
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
    fn clean_up_finished(&mut self, pods: &[Pod]) {
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

    fn wake_in(&mut self, after: Duration) {
        self.requeue_after = Some(match self.requeue_after {
            Some(current) => current.min(after),
            None => after,
        });
    }

    /// Makes `type_` the one True lifecycle condition.
    fn set_lifecycle(&mut self, type_: &'static str, reason: &'static str, message: String) {
        let now = self.now;
        for other in types::LIFECYCLE.iter().filter(|t| **t != type_) {
            if let Some(c) = self
                .status
                .conditions
                .iter_mut()
                .find(|c| c.type_ == *other)
                && c.is_true()
            {
                *c = JobCondition {
                    type_: c.type_.clone(),
                    status: "False".into(),
                    reason: reasons::SUPERSEDED.into(),
                    message: format!("the job is now {type_}"),
                    last_transition_time: Some(Time(now)),
                };
            }
        }
        upsert(
            &mut self.status.conditions,
            type_,
            true,
            reason,
            message,
            now,
        );
    }

    /// Sets a detail condition; a False detail that never was True is not added.
    fn set_detail(&mut self, type_: &'static str, on: bool, reason: &str, message: String) {
        let exists = self.status.conditions.iter().any(|c| c.type_ == type_);
        if on || exists {
            upsert(
                &mut self.status.conditions,
                type_,
                on,
                reason,
                message,
                self.now,
            );
        }
    }
}

/// Inserts or updates a condition; lastTransitionTime moves only when the status flips.
fn upsert(
    conditions: &mut Vec<JobCondition>,
    type_: &str,
    on: bool,
    reason: &str,
    message: String,
    now: Timestamp,
) {
    let status = if on { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Some(Time(now));
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message;
        }
        None => conditions.push(JobCondition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: Some(Time(now)),
        }),
    }
}

/// Lifecycle conditions first in their fixed order, then details by name, so the State
/// column (the first True condition) always shows the lifecycle state.
fn sort_conditions(conditions: &mut [JobCondition]) {
    let rank = |c: &JobCondition| {
        types::LIFECYCLE
            .iter()
            .position(|t| *t == c.type_)
            .unwrap_or(types::LIFECYCLE.len())
    };
    conditions.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.type_.cmp(&b.type_)));
}

/// Pod counts of one role.
fn replica_status(
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
fn replicas_ready(job: &TrainingJob, statuses: &kubetrain_api::ReplicaStatuses) -> String {
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

/// The pod's phase, or "" before the kubelet reported one.
pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// Whether the pod is being deleted.
pub fn is_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// A pod this decision creates is active (Pending) as soon as it is written. Counting it
/// now makes the status written with the pods the one the next reconcile computes when
/// the watch shows them, instead of a second write per job for the counts alone.
fn count_created_as_active(statuses: &mut kubetrain_api::ReplicaStatuses, actions: &[Action]) {
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
fn created_note(names: &[String]) -> String {
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

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The status of the pod's main container (the one the contract env goes into). A pod
/// whose spec lists no containers (as some tests and a status-only view have it) has
/// one status, the main container's.
fn main_container_status(pod: &Pod) -> Option<&ContainerStatus> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let Some(main) = containers.get(plan::main_container_index(containers)) else {
        return statuses.first();
    };
    statuses
        .iter()
        .find(|s| s.name == main.name)
        .or_else(|| statuses.first())
}

/// The exit code of the pod's main container, if it terminated.
pub fn exit_code(pod: &Pod) -> Option<i32> {
    let status = main_container_status(pod)?;
    status
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| {
            status
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
        })
        .map(|t| t.exit_code)
}

/// Why the built-in trainer in this pod said its training diverged, if its main container
/// (now or before a restart) exited with `contract::EXIT_DIVERGED`: under `OnFailure` the
/// kubelet would otherwise restart it into the same divergence until the backoff limit.
pub fn diverged(pod: &Pod) -> Option<String> {
    let status = main_container_status(pod)?;
    let terminated = [&status.state, &status.last_state]
        .into_iter()
        .flatten()
        .filter_map(|s| s.terminated.as_ref())
        .find(|t| t.exit_code == i32::from(contract::EXIT_DIVERGED))?;
    let why = terminated
        .message
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .unwrap_or("training diverged (no termination message)");
    Some(format!("pod {}: {why}", pod.name_any()))
}

/// In-place restarts of all the pod's containers.
pub fn restart_count(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum())
}

/// When the main container last terminated before its restart, and with which code.
fn last_restart(pod: &Pod) -> Option<(Option<Timestamp>, Option<i32>)> {
    let status = main_container_status(pod)?;
    let last = status.last_state.as_ref()?.terminated.as_ref()?;
    Some((last.finished_at.as_ref().map(|t| t.0), Some(last.exit_code)))
}

/// A container waiting to be restarted after a crash (for example CrashLoopBackOff).
fn crash_looping(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|s| {
        let waiting = s.state.as_ref()?.waiting.as_ref()?;
        (s.restart_count > 0).then(|| waiting.reason.clone().unwrap_or_else(|| "waiting".into()))
    })
}

/// Why a Pending pod will not start by itself, if it will not.
pub fn stall_reason(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let waiting = status
        .container_statuses
        .iter()
        .chain(status.init_container_statuses.iter())
        .flatten()
        .find_map(|s| {
            let w = s.state.as_ref()?.waiting.as_ref()?;
            let reason = w.reason.as_deref()?;
            STALLED_REASONS.contains(&reason).then(|| match &w.message {
                Some(m) if !m.is_empty() => format!("{reason} ({m})"),
                _ => reason.to_string(),
            })
        });
    waiting.or_else(|| {
        status.conditions.iter().flatten().find_map(|c| {
            (c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable"))
            .then(|| match &c.message {
                Some(m) if !m.is_empty() => format!("Unschedulable ({m})"),
                _ => "Unschedulable".to_string(),
            })
        })
    })
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
