//! One scenario per test: a job, pods in some state, and what the operator must decide.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, PodCondition,
    PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;
use crate::plan::{self, PlanSettings};
use crate::replica::ReplicaId;

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn job_with(policy_yaml: &str) -> TrainingJob {
    let yaml = format!(
        r#"
apiVersion: kubetrain.io/v1alpha1
kind: TrainingJob
metadata: {{name: j, namespace: ns, uid: u1, generation: 2}}
spec:
  replicaSpecs:
    ps: {{replicas: 1, restartPolicy: OnFailure}}
    worker: {{replicas: 2, restartPolicy: {policy_yaml}}}
  training:
    model: {{kind: softmax}}
    dataset: {{builtin: digits}}
    optimizer: {{kind: sgd}}
"#
    );
    serde_yaml::from_str(&yaml).unwrap()
}

fn job() -> TrainingJob {
    job_with("ExitCode")
}

fn pod(job: &TrainingJob, role: Role, index: usize) -> Pod {
    let mut pod = plan::pod(job, ReplicaId { role, index }, &PlanSettings::default());
    pod.metadata.uid = Some(format!("{}-uid", pod.name_any()));
    pod.metadata.creation_timestamp = Some(Time(t(0)));
    pod
}

fn with_phase(mut pod: Pod, phase: &str) -> Pod {
    let ready = phase == "Running";
    pod.status = Some(PodStatus {
        phase: Some(phase.into()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            ..PodCondition::default()
        }]),
        container_statuses: Some(vec![ContainerStatus {
            name: "trainer".into(),
            ..ContainerStatus::default()
        }]),
        ..PodStatus::default()
    });
    pod
}

fn exited(mut pod: Pod, code: i32) -> Pod {
    let phase = if code == 0 { "Succeeded" } else { "Failed" };
    pod = with_phase(pod, phase);
    let status = pod.status.as_mut().unwrap();
    status.container_statuses.as_mut().unwrap()[0].state = Some(ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: code,
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    });
    pod
}

fn restarted(mut pod: Pod, times: i32, last_code: i32) -> Pod {
    let status = pod.status.as_mut().unwrap();
    let container = &mut status.container_statuses.as_mut().unwrap()[0];
    container.restart_count = times;
    container.last_state = Some(ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: last_code,
            finished_at: Some(Time(t(5))),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    });
    pod
}

fn all_running(job: &TrainingJob) -> Vec<Pod> {
    vec![
        with_phase(pod(job, Role::Ps, 0), "Running"),
        with_phase(pod(job, Role::Worker, 0), "Running"),
        with_phase(pod(job, Role::Worker, 1), "Running"),
    ]
}

/// The job as the API server would hold it after the status of `d` was written.
fn after(job: &TrainingJob, d: &Decision) -> TrainingJob {
    let mut next = job.clone();
    next.status = Some(d.status.clone());
    next
}

fn state(d: &Decision) -> (&str, &str) {
    let c = d
        .status
        .conditions
        .iter()
        .find(|c| c.is_true())
        .expect("a True condition");
    (c.type_.as_str(), c.reason.as_str())
}

fn condition<'a>(d: &'a Decision, type_: &str) -> &'a JobCondition {
    d.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap()
}

#[test]
fn a_new_job_creates_every_pod_and_the_service() {
    let job = job();
    let d = decide(&job, &[], t(0));
    assert_eq!(
        d.actions,
        vec![
            Action::EnsureService,
            Action::CreatePod(ReplicaId {
                role: Role::Ps,
                index: 0
            }),
            Action::CreatePod(ReplicaId {
                role: Role::Worker,
                index: 0
            }),
            Action::CreatePod(ReplicaId {
                role: Role::Worker,
                index: 1
            }),
        ]
    );
    assert_eq!(state(&d), ("Created", reasons::PODS_CREATED));
    assert_eq!(d.status.start_time, Some(Time(t(0))));
    assert_eq!(d.status.observed_generation, Some(2));
    assert_eq!(d.status.workers_ready.as_deref(), Some("0/2"));
    // The pods being created count as active already: once the watch shows them Pending,
    // the next decision computes the same status and writes nothing.
    assert_eq!(
        (
            d.status.replica_statuses.ps.active,
            d.status.replica_statuses.worker.active
        ),
        (1, 2)
    );
    let created: Vec<&str> = d
        .events
        .iter()
        .filter(|e| e.reason == "PodCreated")
        .map(|e| e.note.as_str())
        .collect();
    assert_eq!(
        created,
        vec!["created 3 pods: j-ps-0, j-worker-0, j-worker-1"]
    );
}

#[test]
fn the_status_written_with_new_pods_is_the_one_their_pending_pods_give() {
    let mut job = job();
    let first = decide(&job, &[], t(0));
    job.status = Some(first.status.clone());
    let pending = vec![
        with_phase(pod(&job, Role::Ps, 0), "Pending"),
        with_phase(pod(&job, Role::Worker, 0), "Pending"),
        with_phase(pod(&job, Role::Worker, 1), "Pending"),
    ];
    let second = decide(&job, &pending, t(1));
    assert_eq!(second.status, first.status, "a second status write");
    assert_eq!(second.actions, vec![]);
}

#[test]
fn the_created_pods_event_names_a_burst_within_an_events_note() {
    let one = super::created_note(&["a-ps-0".to_string()]);
    assert_eq!(one, "created pod a-ps-0");
    let names: Vec<String> = (0..200).map(|i| format!("big-job-worker-{i}")).collect();
    let note = super::created_note(&names);
    assert!(note.len() <= 1024, "{}", note.len());
    assert!(note.starts_with("created 200 pods: big-job-worker-0, big-job-worker-1, "));
    let shown = note.matches("big-job-worker-").count();
    assert!(
        note.ends_with(&format!(" and {} more", 200 - shown)),
        "{note}"
    );
}

#[test]
fn all_pods_running_makes_the_job_running() {
    let job = job();
    let created = decide(&job, &[], t(0));
    let job = after(&job, &created);
    let pods = all_running(&job);
    let d = decide(&job, &pods, t(10));
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert_eq!(state(&d), ("Running", reasons::ALL_REPLICAS_RUNNING));
    let created_cond = condition(&d, types::CREATED);
    assert_eq!(created_cond.status, "False");
    assert_eq!(d.status.replica_statuses.worker.ready, 2);
    assert_eq!(d.status.replica_statuses.ps.active, 1);
    assert_eq!(d.status.workers_ready.as_deref(), Some("2/2"));
}

#[test]
fn a_second_look_changes_nothing_and_keeps_transition_times() {
    let job = job();
    let job = after(&job, &decide(&job, &[], t(0)));
    let pods = all_running(&job);
    let first = decide(&job, &pods, t(10));
    let job = after(&job, &first);
    let second = decide(&job, &pods, t(99));
    assert_eq!(
        second.status, first.status,
        "no status change means no write"
    );
    assert!(second.actions.is_empty());
    assert!(second.events.is_empty());
}

#[test]
fn chief_success_succeeds_the_job_and_removes_the_parameter_servers() {
    let job = job();
    let job = after(&job, &decide(&job, &[], t(0)));
    let pods = vec![
        with_phase(pod(&job, Role::Ps, 0), "Running"),
        exited(pod(&job, Role::Worker, 0), 0),
        with_phase(pod(&job, Role::Worker, 1), "Running"),
    ];
    let d = decide(&job, &pods, t(20));
    assert_eq!(state(&d), ("Succeeded", reasons::JOB_SUCCEEDED));
    assert_eq!(d.status.completion_time, Some(Time(t(20))));
    assert!(d.actions.contains(&Action::DeletePod {
        name: "j-ps-0".into(),
        uid: Some("j-ps-0-uid".into())
    }));
    assert!(d.actions.contains(&Action::DeletePod {
        name: "j-worker-1".into(),
        uid: Some("j-worker-1-uid".into())
    }));
    assert!(d.actions.contains(&Action::DeleteService));
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::DeletePod { name, .. } if name == "j-worker-0"))
    );
}

#[test]
fn all_workers_policy_waits_for_every_worker() {
    let mut job = job();
    job.spec.success_policy = SuccessPolicy::AllWorkers;
    let job = after(&job, &decide(&job, &[], t(0)));
    let mut pods = vec![
        with_phase(pod(&job, Role::Ps, 0), "Running"),
        exited(pod(&job, Role::Worker, 0), 0),
        with_phase(pod(&job, Role::Worker, 1), "Running"),
    ];
    let d = decide(&job, &pods, t(20));
    assert_ne!(state(&d).0, "Succeeded");
    pods[2] = exited(pod(&job, Role::Worker, 1), 0);
    let d = decide(&job, &pods, t(30));
    assert_eq!(state(&d), ("Succeeded", reasons::JOB_SUCCEEDED));
}

#[test]
fn never_policy_fails_the_job_on_a_failed_pod() {
    let job = job_with("Never");
    let job = after(&job, &decide(&job, &[], t(0)));
    let mut pods = all_running(&job);
    pods[2] = exited(pod(&job, Role::Worker, 1), 137);
    let d = decide(&job, &pods, t(20));
    assert_eq!(state(&d), ("Failed", reasons::POD_FAILED));
    assert!(condition(&d, types::FAILED).message.contains("j-worker-1"));
    assert!(condition(&d, types::FAILED).message.contains("137"));
    assert!(
        d.events
            .iter()
            .any(|e| e.warning && e.reason == reasons::POD_FAILED)
    );
}

#[test]
fn exit_code_policy_fails_on_a_permanent_code() {
    let job = job();
    let job = after(&job, &decide(&job, &[], t(0)));
    let mut pods = all_running(&job);
    pods[2] = exited(pod(&job, Role::Worker, 1), 1);
    let d = decide(&job, &pods, t(20));
    assert_eq!(state(&d), ("Failed", reasons::POD_FAILED));
    assert!(condition(&d, types::FAILED).message.contains("exit code 1"));
}

#[test]
fn exit_code_policy_recreates_a_pod_killed_by_a_signal_once_per_uid() {
    let job = job();
    let job = after(&job, &decide(&job, &[], t(0)));
    let mut pods = all_running(&job);
    pods[2] = exited(pod(&job, Role::Worker, 1), 137);
    let d = decide(&job, &pods, t(20));
    assert_eq!(state(&d), ("Restarting", reasons::POD_RESTARTING));
    assert_eq!(
        d.actions,
        vec![Action::DeletePod {
            name: "j-worker-1".into(),
            uid: Some("j-worker-1-uid".into())
        }]
    );
    assert_eq!(d.status.recreated_pods["j-worker-1"].count, 1);
    assert_eq!(d.status.replica_statuses.worker.restarts, 1);

    // The delete failed and the same pod is seen again: not counted twice.
    let job = after(&job, &d);
    let again = decide(&job, &pods, t(21));
    assert_eq!(again.status.recreated_pods["j-worker-1"].count, 1);

    // The pod is gone: it is created again and the job shows Restarting until it runs.
    let gone = &pods[..2];
    let d = decide(&job, gone, t(22));
    assert!(d.actions.contains(&Action::CreatePod(ReplicaId {
        role: Role::Worker,
        index: 1
    })));
    assert_eq!(state(&d).0, "Restarting");

    let job = after(&job, &d);
    let running = all_running(&job);
    let d = decide(&job, &running, t(30));
    assert_eq!(state(&d).0, "Running");
    assert_eq!(
        d.status.replica_statuses.worker.restarts, 1,
        "the restart stays counted"
    );
}

#[test]
fn on_failure_restarts_are_counted_and_bounded_by_the_backoff_limit() {
    let job = job_with("OnFailure");
    let job = after(&job, &decide(&job, &[], t(0)));
    let mut pods = all_running(&job);
    pods[1] = restarted(with_phase(pod(&job, Role::Worker, 0), "Running"), 2, 3);
    let d = decide(&job, &pods, t(20));
    assert_eq!(state(&d).0, "Running");
    assert_eq!(d.status.replica_statuses.worker.restarts, 2);

    pods[1] = restarted(with_phase(pod(&job, Role::Worker, 0), "Running"), 4, 3);
    let d = decide(&job, &pods, t(30));
    assert_eq!(state(&d), ("Failed", reasons::BACKOFF_LIMIT_EXCEEDED));
    let message = &condition(&d, types::FAILED).message;
    assert!(
        message.contains("4 restarts exceed runPolicy.backoffLimit 3"),
        "{message}"
    );
    assert!(
        message.contains("pod j-worker-0 exited with code 3"),
        "{message}"
    );
}

fn with_termination_message(mut pod: Pod, message: &str) -> Pod {
    let container = &mut pod
        .status
        .as_mut()
        .unwrap()
        .container_statuses
        .as_mut()
        .unwrap()[0];
    for state in [&mut container.state, &mut container.last_state]
        .into_iter()
        .flatten()
    {
        if let Some(t) = state.terminated.as_mut() {
            t.message = Some(message.into());
        }
    }
    pod
}

const DIVERGED: i32 = contract::EXIT_DIVERGED as i32;

#[test]
fn a_diverged_trainer_fails_the_job_as_diverged_under_every_restart_policy() {
    let message = "training diverged at step 12: the gradient has NaN at parameter 3; lower spec.training.optimizer.learningRate (or momentum) and start again";
    for policy in ["OnFailure", "Always", "Never", "ExitCode"] {
        let job = job_with(policy);
        let job = after(&job, &decide(&job, &[], t(0)));
        let mut pods = all_running(&job);
        // The kubelet restarts an OnFailure/Always container in place; the code is then in
        // lastState. Never and ExitCode pods end Failed with it.
        pods[2] = match policy {
            "OnFailure" | "Always" => restarted(
                with_phase(pod(&job, Role::Worker, 1), "Running"),
                1,
                DIVERGED,
            ),
            _ => exited(pod(&job, Role::Worker, 1), DIVERGED),
        };
        pods[2] = with_termination_message(pods[2].clone(), message);
        let d = decide(&job, &pods, t(20));
        assert_eq!(state(&d), ("Failed", reasons::DIVERGED), "{policy}");
        let failed = &condition(&d, types::FAILED).message;
        assert!(
            failed.starts_with(&format!("pod j-worker-1: {message}")),
            "{policy}: {failed}"
        );
        assert!(
            d.events
                .iter()
                .any(|e| e.warning && e.reason == reasons::DIVERGED),
            "{policy}"
        );
        assert!(
            !d.actions.iter().any(|a| matches!(a, Action::CreatePod(_))),
            "{policy}: a diverged run is not restarted"
        );
    }
}

#[test]
fn a_diverged_exit_without_a_message_still_names_the_pod() {
    let job = job_with("OnFailure");
    let job = after(&job, &decide(&job, &[], t(0)));
    let mut pods = all_running(&job);
    pods[1] = restarted(
        with_phase(pod(&job, Role::Worker, 0), "Running"),
        1,
        DIVERGED,
    );
    let d = decide(&job, &pods, t(20));
    assert_eq!(state(&d), ("Failed", reasons::DIVERGED));
    assert_eq!(
        condition(&d, types::FAILED).message,
        "pod j-worker-0: training diverged (no termination message)"
    );
}

#[test]
fn a_users_program_exiting_with_the_diverged_code_is_only_a_failure() {
    // Exit code 65 means Diverged only for the built-in trainer; a user's program is
    // restarted as its policy says.
    let job = tensorflow_job("Running");
    let job = after(&job, &decide(&job, &[], t(0)));
    let chief = restarted(
        with_phase(pod(&job, Role::Chief, 0), "Running"),
        1,
        DIVERGED,
    );
    let d = decide(&job, &tensorflow_pods(&job, chief), t(20));
    assert_ne!(state(&d).1, reasons::DIVERGED);
    assert_eq!(state(&d).0, "Running");
}

#[test]
fn crash_looping_pods_show_as_restarting() {
    let job = job_with("OnFailure");
    let job = after(&job, &decide(&job, &[], t(0)));
    let mut pods = all_running(&job);
    let mut crashing = restarted(with_phase(pod(&job, Role::Worker, 1), "Running"), 1, 2);
    crashing
        .status
        .as_mut()
        .unwrap()
        .container_statuses
        .as_mut()
        .unwrap()[0]
        .state = Some(ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some("CrashLoopBackOff".into()),
            message: None,
        }),
        ..ContainerState::default()
    });
    pods[2] = crashing;
    let d = decide(&job, &pods, t(20));
    assert_eq!(state(&d), ("Restarting", reasons::POD_RESTARTING));
    assert!(
        condition(&d, types::RESTARTING)
            .message
            .contains("CrashLoopBackOff")
    );
}

#[test]
fn an_invalid_spec_fails_without_pods_and_recovers_when_fixed() {
    let mut job = job();
    job.spec.training.as_mut().unwrap().pipeline = Some(kubetrain_api::PipelineSpec {
        micro_batches: 4,
        schedule: Default::default(),
    });
    let d = decide(&job, &[], t(0));
    assert_eq!(state(&d), ("Failed", reasons::INVALID_SPEC));
    assert!(d.actions.iter().all(|a| !matches!(a, Action::CreatePod(_))));
    assert!(
        condition(&d, types::FAILED)
            .message
            .contains("spec.training.pipeline")
    );
    assert!(
        d.events
            .iter()
            .any(|e| e.warning && e.reason == reasons::INVALID_SPEC)
    );

    let mut fixed = after(&job, &d);
    fixed.spec.training.as_mut().unwrap().pipeline = None;
    let d = decide(&fixed, &[], t(5));
    assert_eq!(state(&d).0, "Created");
    assert_eq!(condition(&d, types::FAILED).status, "False");
    assert!(d.actions.contains(&Action::CreatePod(ReplicaId {
        role: Role::Worker,
        index: 0
    })));
}

#[test]
fn the_active_deadline_fails_the_job_and_is_requeued_exactly() {
    let mut job = job();
    job.spec.run_policy.active_deadline_seconds = Some(100);
    let job = after(&job, &decide(&job, &[], t(0)));
    let pods = all_running(&job);
    let d = decide(&job, &pods, t(30));
    assert_eq!(d.requeue_after, Some(Duration::from_secs(70)));
    let d = decide(&job, &pods, t(100));
    assert_eq!(state(&d), ("Failed", reasons::DEADLINE_EXCEEDED));
    assert_eq!(
        d.actions
            .iter()
            .filter(|a| matches!(a, Action::DeletePod { .. }))
            .count(),
        3
    );
}

#[test]
fn clean_pod_policy_all_and_none() {
    for (policy, deleted) in [
        (CleanPodPolicy::All, 3),
        (CleanPodPolicy::None, 0),
        (CleanPodPolicy::Running, 2),
    ] {
        let mut job = job();
        job.spec.run_policy.clean_pod_policy = policy;
        let job = after(&job, &decide(&job, &[], t(0)));
        let pods = vec![
            with_phase(pod(&job, Role::Ps, 0), "Running"),
            exited(pod(&job, Role::Worker, 0), 0),
            with_phase(pod(&job, Role::Worker, 1), "Running"),
        ];
        let d = decide(&job, &pods, t(20));
        let deletes = d
            .actions
            .iter()
            .filter(|a| matches!(a, Action::DeletePod { .. }))
            .count();
        assert_eq!(deletes, deleted, "{policy:?}");
        assert_eq!(
            d.actions.contains(&Action::DeleteService),
            policy != CleanPodPolicy::None
        );
    }
}

#[test]
fn parameter_servers_that_already_exited_are_removed_too() {
    let job = job();
    let job = after(&job, &decide(&job, &[], t(0)));
    let pods = vec![
        exited(pod(&job, Role::Ps, 0), 0),
        exited(pod(&job, Role::Worker, 0), 0),
        exited(pod(&job, Role::Worker, 1), 0),
    ];
    let d = decide(&job, &pods, t(20));
    assert_eq!(
        d.actions
            .iter()
            .filter(|a| matches!(a, Action::DeletePod { .. }))
            .collect::<Vec<_>>(),
        vec![&Action::DeletePod {
            name: "j-ps-0".into(),
            uid: Some("j-ps-0-uid".into())
        }]
    );
}

#[test]
fn failed_pods_kept_for_logs_are_named() {
    let job = job_with("Never");
    let job = after(&job, &decide(&job, &[], t(0)));
    let mut pods = all_running(&job);
    pods[2] = exited(pod(&job, Role::Worker, 1), 2);
    let d = decide(&job, &pods, t(20));
    assert!(
        condition(&d, types::FAILED)
            .message
            .contains("failed pods kept for their logs: j-worker-1")
    );
    let job = after(&job, &d);
    let again = decide(&job, &pods, t(25));
    assert_eq!(
        again.status.conditions, d.status.conditions,
        "the note is added once"
    );
}

#[test]
fn ttl_deletes_the_job_after_it_finished() {
    let mut job = job();
    job.spec.run_policy.ttl_seconds_after_finished = Some(60);
    let job = after(&job, &decide(&job, &[], t(0)));
    let pods = vec![exited(pod(&job, Role::Worker, 0), 0)];
    let d = decide(&job, &pods, t(20));
    assert_eq!(d.requeue_after, Some(Duration::from_secs(60)));
    let job = after(&job, &d);
    let d = decide(&job, &pods, t(50));
    assert_eq!(d.requeue_after, Some(Duration::from_secs(30)));
    assert!(!d.actions.contains(&Action::DeleteJob));
    let d = decide(&job, &pods, t(80));
    assert!(d.actions.contains(&Action::DeleteJob));
}

#[test]
fn suspend_deletes_pods_and_resume_recreates_them_with_a_new_start_time() {
    let mut job = job();
    let job0 = after(&job, &decide(&job, &[], t(0)));
    let pods = all_running(&job0);
    job = job0.clone();
    job.spec.run_policy.suspend = true;
    let d = decide(&job, &pods, t(10));
    assert_eq!(state(&d), ("Suspended", reasons::JOB_SUSPENDED));
    assert_eq!(
        d.actions
            .iter()
            .filter(|a| matches!(a, Action::DeletePod { .. }))
            .count(),
        3
    );

    let mut job = after(&job, &d);
    job.spec.run_policy.suspend = false;
    let d = decide(&job, &[], t(50));
    assert_eq!(state(&d).0, "Created");
    assert_eq!(condition(&d, types::SUSPENDED).status, "False");
    assert_eq!(d.status.start_time, Some(Time(t(50))));
    assert_eq!(
        d.actions
            .iter()
            .filter(|a| matches!(a, Action::CreatePod(_)))
            .count(),
        3
    );
    // The State column takes the first True condition: it must be the lifecycle one.
    assert_eq!(
        d.status
            .conditions
            .iter()
            .find(|c| c.is_true())
            .unwrap()
            .type_,
        "Created"
    );
}

#[test]
fn a_stalled_pod_is_named_and_fails_the_job_past_the_startup_deadline() {
    let mut job = job();
    job.spec.run_policy.startup_deadline_seconds = Some(300);
    let job = after(&job, &decide(&job, &[], t(0)));
    let mut pods = all_running(&job);
    let mut stuck = with_phase(pod(&job, Role::Worker, 1), "Pending");
    stuck
        .status
        .as_mut()
        .unwrap()
        .container_statuses
        .as_mut()
        .unwrap()[0]
        .state = Some(ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some("ImagePullBackOff".into()),
            message: Some("no such image".into()),
        }),
        ..ContainerState::default()
    });
    pods[2] = stuck;
    let d = decide(&job, &pods, t(60));
    let stalled = condition(&d, types::PODS_STALLED);
    assert_eq!(stalled.status, "True");
    assert!(stalled.message.contains("j-worker-1") && stalled.message.contains("ImagePullBackOff"));
    assert_eq!(d.requeue_after, Some(Duration::from_secs(240)));
    assert_eq!(
        state(&d).0,
        "Created",
        "the lifecycle column still shows the state"
    );

    let d = decide(&job, &pods, t(300));
    assert_eq!(state(&d), ("Failed", reasons::STARTUP_DEADLINE_EXCEEDED));
}

#[test]
fn extra_pods_after_a_scale_down_are_deleted() {
    let job = job();
    let job = after(&job, &decide(&job, &[], t(0)));
    let mut pods = all_running(&job);
    let mut bigger = job.clone();
    bigger.spec.replica_specs.worker.replicas = 3;
    pods.push(with_phase(pod(&bigger, Role::Worker, 2), "Running"));
    let d = decide(&job, &pods, t(10));
    assert_eq!(
        d.actions,
        vec![Action::DeletePod {
            name: "j-worker-2".into(),
            uid: Some("j-worker-2-uid".into())
        }]
    );
}

fn gang_job() -> TrainingJob {
    let mut job = job();
    job.spec.run_policy.scheduling_policy = Some(kubetrain_api::SchedulingPolicy {
        gang: true,
        ..Default::default()
    });
    job
}

fn group(phase: &str, unschedulable: Option<&str>) -> GangObservation {
    GangObservation::Group(gang::PodGroupState {
        scheduler: gang::GangScheduler::Volcano,
        name: "j".into(),
        phase: phase.into(),
        unschedulable: unschedulable.map(str::to_string),
    })
}

#[test]
fn a_gang_not_yet_admitted_says_so_with_the_pending_count() {
    let job = gang_job();
    let d = decide_with_gang(&job, &[], &group("", None), t(0));
    assert_eq!(
        d.actions
            .iter()
            .filter(|a| matches!(a, Action::CreatePod(_)))
            .count(),
        3,
        "pods are created; the scheduler holds them: {:?}",
        d.actions
    );
    let c = condition(&d, types::GANG_PENDING);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", reasons::POD_GROUP_PENDING)
    );
    assert!(
        c.message.contains("3 of 3 pods still pending"),
        "{}",
        c.message
    );
    assert!(c.message.contains("minMember 3"), "{}", c.message);
    assert_eq!(
        state(&d).0,
        types::CREATED,
        "GangPending never hides the lifecycle"
    );

    // One pod bound, the scheduler explains why the rest cannot go.
    let job = after(&job, &d);
    let mut bound = with_phase(pod(&job, Role::Ps, 0), "Pending");
    bound.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
        type_: "PodScheduled".into(),
        status: "True".into(),
        ..PodCondition::default()
    }]);
    let pods = vec![
        bound,
        with_phase(pod(&job, Role::Worker, 0), "Pending"),
        with_phase(pod(&job, Role::Worker, 1), "Pending"),
    ];
    let d = decide_with_gang(
        &job,
        &pods,
        &group(
            "Pending",
            Some("NotEnoughResources: 2/3 tasks in gang unschedulable"),
        ),
        t(5),
    );
    let c = condition(&d, types::GANG_PENDING);
    assert_eq!(c.reason, reasons::GANG_UNSCHEDULABLE);
    assert!(
        c.message.contains("2 of 3 pods still pending"),
        "{}",
        c.message
    );
    assert!(c.message.contains("NotEnoughResources"), "{}", c.message);

    // Admitted: the condition flips to False.
    let job = after(&job, &d);
    let d = decide_with_gang(&job, &all_running(&job), &group("Running", None), t(9));
    let c = condition(&d, types::GANG_PENDING);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", reasons::GANG_ADMITTED)
    );
    assert_eq!(c.last_transition_time, Some(Time(t(9))));
    assert_eq!(state(&d).0, types::RUNNING);
}

#[test]
fn a_missing_pod_group_crd_creates_no_pods_and_rechecks_calmly() {
    let job = gang_job();
    let missing = GangObservation::CrdMissing {
        scheduler: gang::GangScheduler::SchedulerPlugins,
        detail: "404 page not found".into(),
    };
    let d = decide_with_gang(&job, &[], &missing, t(0));
    assert!(
        !d.actions.iter().any(|a| matches!(a, Action::CreatePod(_))),
        "{:?}",
        d.actions
    );
    let c = condition(&d, types::GANG_PENDING);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", reasons::POD_GROUP_CRD_MISSING)
    );
    assert!(
        c.message.contains("scheduling.x-k8s.io/v1alpha1"),
        "{}",
        c.message
    );
    assert!(
        c.message.contains("runPolicy.schedulingPolicy.gang"),
        "{}",
        c.message
    );
    assert_eq!(d.requeue_after, Some(GANG_CRD_RECHECK));
    assert_eq!(d.events.len(), 1, "{:?}", d.events);
    assert!(d.events[0].warning);

    // The next look writes nothing new and records no second event.
    let job = after(&job, &d);
    let again = decide_with_gang(&job, &[], &missing, t(60));
    assert_eq!(again.status, d.status);
    assert!(again.events.is_empty(), "{:?}", again.events);

    // Once the CRD is there, the pods are created.
    let d = decide_with_gang(&job, &[], &group("", None), t(120));
    assert_eq!(
        d.actions
            .iter()
            .filter(|a| matches!(a, Action::CreatePod(_)))
            .count(),
        3
    );
}

#[test]
fn gang_without_a_configured_scheduler_warns_once_and_runs_anyway() {
    let job = gang_job();
    let d = decide_with_gang(&job, &[], &GangObservation::NotConfigured, t(0));
    let c = condition(&d, types::GANG_PENDING);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", reasons::GANG_SCHEDULER_NOT_CONFIGURED)
    );
    assert!(c.message.contains("--gang-scheduler"), "{}", c.message);
    assert_eq!(
        d.actions
            .iter()
            .filter(|a| matches!(a, Action::CreatePod(_)))
            .count(),
        3
    );
    assert_eq!(
        d.events
            .iter()
            .filter(|e| e.reason == reasons::GANG_SCHEDULER_NOT_CONFIGURED)
            .count(),
        1
    );
    let d = decide_with_gang(&after(&job, &d), &[], &GangObservation::NotConfigured, t(1));
    assert!(
        !d.events
            .iter()
            .any(|e| e.reason == reasons::GANG_SCHEDULER_NOT_CONFIGURED)
    );
}

/// A user's own TensorFlow job: chief + 1 PS + 2 workers + evaluator, no spec.training.
fn tensorflow_job(clean: &str) -> TrainingJob {
    let template = "{spec: {containers: [{name: tensorflow, image: tf, command: [python, t.py]}]}}";
    let yaml = format!(
        r#"
apiVersion: kubetrain.io/v1alpha1
kind: TrainingJob
metadata: {{name: tf, namespace: ns, uid: u1, generation: 1}}
spec:
  replicaSpecs:
    chief: {{replicas: 1, restartPolicy: OnFailure, template: {template}}}
    ps: {{replicas: 1, restartPolicy: OnFailure, template: {template}}}
    worker: {{replicas: 2, restartPolicy: OnFailure, template: {template}}}
    evaluator: {{replicas: 1, restartPolicy: OnFailure, template: {template}}}
  successPolicy: AllWorkers
  runPolicy: {{backoffLimit: 1, cleanPodPolicy: {clean}}}
"#
    );
    serde_yaml::from_str(&yaml).unwrap()
}

fn tensorflow_pods(job: &TrainingJob, chief: Pod) -> Vec<Pod> {
    vec![
        chief,
        with_phase(pod(job, Role::Ps, 0), "Running"),
        with_phase(pod(job, Role::Worker, 0), "Running"),
        with_phase(pod(job, Role::Worker, 1), "Running"),
        with_phase(pod(job, Role::Evaluator, 0), "Running"),
    ]
}

fn deleted(d: &Decision) -> Vec<String> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::DeletePod { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_chief_exiting_zero_decides_success_and_the_servers_go() {
    let job = tensorflow_job("Running");
    let running = tensorflow_pods(&job, with_phase(pod(&job, Role::Chief, 0), "Running"));
    let d = decide(&job, &running, t(0));
    assert_eq!(state(&d), (types::RUNNING, reasons::ALL_REPLICAS_RUNNING));
    assert_eq!(
        d.status.replicas_ready.as_deref(),
        Some("chief 1/1, ps 1/1, worker 2/2, evaluator 1/1")
    );
    assert_eq!(d.status.replica_statuses.chief.as_ref().unwrap().ready, 1);
    assert_eq!(
        d.status.replica_statuses.evaluator.as_ref().unwrap().active,
        1
    );

    // Workers that never exit (tf.distribute.Server.join) do not hold the job up, and
    // AllWorkers does not apply when a chief exists.
    let pods = tensorflow_pods(&job, exited(pod(&job, Role::Chief, 0), 0));
    let d = decide(&after(&job, &d), &pods, t(10));
    assert_eq!(state(&d), (types::SUCCEEDED, reasons::JOB_SUCCEEDED));
    assert_eq!(
        condition(&d, types::SUCCEEDED).message,
        "the chief completed successfully"
    );
    assert_eq!(
        deleted(&d),
        ["tf-ps-0", "tf-worker-0", "tf-worker-1", "tf-evaluator-0"],
        "everything still running goes; the chief stays for its logs"
    );
    assert_eq!(
        d.status.replica_statuses.chief.as_ref().unwrap().succeeded,
        1
    );
}

#[test]
fn workers_finishing_first_do_not_end_a_job_with_a_chief() {
    let job = tensorflow_job("Running");
    let mut pods = tensorflow_pods(&job, with_phase(pod(&job, Role::Chief, 0), "Running"));
    pods[2] = exited(pod(&job, Role::Worker, 0), 0);
    pods[3] = exited(pod(&job, Role::Worker, 1), 0);
    let d = decide(&job, &pods, t(0));
    assert!(!is_finished(&after(&job, &d)), "{:?}", state(&d));
}

#[test]
fn a_running_evaluator_is_stopped_even_when_pods_are_kept() {
    let job = tensorflow_job("None");
    let pods = tensorflow_pods(&job, exited(pod(&job, Role::Chief, 0), 0));
    let d = decide(&job, &pods, t(0));
    assert_eq!(state(&d).0, types::SUCCEEDED);
    assert_eq!(deleted(&d), ["tf-evaluator-0"]);
}

#[test]
fn the_evaluator_never_decides_success_or_failure_alone() {
    let job = tensorflow_job("Running");
    let mut pods = tensorflow_pods(&job, with_phase(pod(&job, Role::Chief, 0), "Running"));
    pods[4] = exited(pod(&job, Role::Evaluator, 0), 0);
    let d = decide(&job, &pods, t(0));
    assert!(!is_finished(&after(&job, &d)), "{:?}", state(&d));
}

#[test]
fn a_failing_chief_follows_its_restart_policy_and_the_backoff_limit() {
    let job = tensorflow_job("Running");
    let chief = restarted(with_phase(pod(&job, Role::Chief, 0), "Running"), 1, 1);
    let d = decide(&job, &tensorflow_pods(&job, chief), t(0));
    assert!(
        !is_finished(&after(&job, &d)),
        "one restart is within backoffLimit 1"
    );
    assert_eq!(
        d.status.replica_statuses.chief.as_ref().unwrap().restarts,
        1
    );

    let chief = restarted(with_phase(pod(&job, Role::Chief, 0), "Running"), 2, 1);
    let d = decide(&job, &tensorflow_pods(&job, chief), t(0));
    assert_eq!(state(&d), (types::FAILED, reasons::BACKOFF_LIMIT_EXCEEDED));
    assert!(
        condition(&d, types::FAILED).message.contains("tf-chief-0"),
        "{}",
        condition(&d, types::FAILED).message
    );
}
