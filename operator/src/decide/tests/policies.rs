//! Success policies, the active deadline, and stalled pods past the startup deadline.

use super::*;

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
