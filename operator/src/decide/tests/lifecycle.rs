//! A job from creation to Running, and back from an invalid spec.

use super::*;

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
    let one = crate::decide::counts::created_note(&["a-ps-0".to_string()]);
    assert_eq!(one, "created pod a-ps-0");
    let names: Vec<String> = (0..200).map(|i| format!("big-job-worker-{i}")).collect();
    let note = crate::decide::counts::created_note(&names);
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
