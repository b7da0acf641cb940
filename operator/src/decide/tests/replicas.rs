//! Restart policies: what each failed, diverged or crash-looping pod does to its replica.

use super::*;

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

#[test]
fn classify_gives_each_restart_policy_its_verdict_on_a_failed_pod() {
    let job = job();
    let failed = |code| exited(pod(&job, Role::Worker, 0), code);
    let for_good = |code: &str| PodVerdict::FailedForGood {
        code_text: code.to_string(),
    };
    let recreate = |code: i32| PodVerdict::Recreate {
        code: Some(code),
        code_text: format!("exit code {code}"),
    };
    assert_eq!(
        classify(&failed(3), RestartPolicy::Never),
        for_good("exit code 3")
    );
    assert_eq!(
        classify(&failed(137), RestartPolicy::Never),
        for_good("exit code 137")
    );
    // ExitCode: 1-127 are the program's own verdict, above that a signal.
    assert_eq!(
        classify(&failed(1), RestartPolicy::ExitCode),
        for_good("exit code 1")
    );
    assert_eq!(
        classify(&failed(127), RestartPolicy::ExitCode),
        for_good("exit code 127")
    );
    assert_eq!(
        classify(&failed(128), RestartPolicy::ExitCode),
        recreate(128)
    );
    assert_eq!(
        classify(&failed(137), RestartPolicy::ExitCode),
        recreate(137)
    );
    // The kubelet restarts these in place; still Failed means evicted or lost.
    assert_eq!(classify(&failed(2), RestartPolicy::OnFailure), recreate(2));
    assert_eq!(classify(&failed(2), RestartPolicy::Always), recreate(2));
    let no_code = with_phase(pod(&job, Role::Worker, 0), "Failed");
    assert_eq!(
        classify(&no_code, RestartPolicy::OnFailure),
        PodVerdict::Recreate {
            code: None,
            code_text: "no exit code".into()
        }
    );
    assert_eq!(
        classify(&no_code, RestartPolicy::Never),
        for_good("no exit code")
    );
}

#[test]
fn classify_reads_running_succeeded_starting_and_terminating_pods() {
    let job = job();
    let running = with_phase(pod(&job, Role::Worker, 0), "Running");
    assert_eq!(
        classify(&running, RestartPolicy::Never),
        PodVerdict::Running { crash_loop: None }
    );
    let mut looping = restarted(running.clone(), 2, 1);
    looping
        .status
        .as_mut()
        .unwrap()
        .container_statuses
        .as_mut()
        .unwrap()[0]
        .state = Some(ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some("CrashLoopBackOff".into()),
            ..ContainerStateWaiting::default()
        }),
        ..ContainerState::default()
    });
    assert_eq!(
        classify(&looping, RestartPolicy::OnFailure),
        PodVerdict::Running {
            crash_loop: Some("CrashLoopBackOff".into())
        }
    );
    assert_eq!(
        classify(&exited(pod(&job, Role::Worker, 0), 0), RestartPolicy::Never),
        PodVerdict::Succeeded
    );
    for phase in ["Pending", ""] {
        let pending = with_phase(pod(&job, Role::Worker, 0), phase);
        assert_eq!(
            classify(&pending, RestartPolicy::Never),
            PodVerdict::Starting
        );
    }
    // Being deleted outranks whatever the phase says, a failure included.
    let mut going = exited(pod(&job, Role::Worker, 0), 3);
    going.metadata.deletion_timestamp = Some(Time(t(9)));
    assert_eq!(
        classify(&going, RestartPolicy::Never),
        PodVerdict::Terminating
    );
}
