//! TFJob-style chief and evaluator replicas: who decides success, who is stopped.

use super::*;

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
