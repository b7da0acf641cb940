//! Clean-up of pods and Service, TTL, and suspend / resume.

use super::*;

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
