//! Gang scheduling: GangPending and pods held back until the gang can be admitted.

use super::*;
use crate::gang;

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
