use kubetrain_api::fixtures::JobFixture;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::watcher::Event;
use kubetrain_api::TrainingJob;
use serde_json::json;

use super::{PENDING_FOR, Pending, PodCache};
use crate::cached_pod::CachedPod;
use crate::decide;
use crate::plan::{self, PlanSettings};
use crate::pod_state;

fn job() -> TrainingJob {
    JobFixture::quickstart()
        .namespace("ns")
        .uid("job-uid")
        .build()
}

/// The job's planned pods as the API server would hold them: a UID each.
fn full_pods(job: &TrainingJob) -> Vec<Pod> {
    plan::pods(job, &PlanSettings::default())
        .into_iter()
        .map(|mut p| {
            p.metadata.uid = Some(format!("{}-uid", p.name_any()));
            p
        })
        .collect()
}

/// The same pods as the cache holds them.
fn pods(job: &TrainingJob) -> Vec<CachedPod> {
    full_pods(job).iter().map(CachedPod::from).collect()
}

/// The projection the watch makes: the pod's JSON read into a `CachedPod`.
fn as_watched(pod: &Pod) -> CachedPod {
    let mut cached: CachedPod = serde_json::from_value(serde_json::to_value(pod).unwrap()).unwrap();
    cached.strip();
    cached
}

fn with_uid(mut pod: CachedPod, uid: &str) -> CachedPod {
    pod.metadata.uid = Some(uid.into());
    pod
}

fn names<K: ResourceExt>(pods: &[K]) -> Vec<String> {
    pods.iter().map(ResourceExt::name_any).collect()
}

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

#[test]
fn a_cached_pod_decides_exactly_as_the_full_one() {
    let job = job();
    let mut full = full_pods(&job);
    // Every state the decision reads: running, finished with a message, waiting.
    let statuses = [
        json!({"phase": "Running", "podIP": "10.0.0.1",
               "conditions": [{"type": "Ready", "status": "True"}],
               "containerStatuses": [{"name": "trainer", "ready": true, "restartCount": 1, "image": "", "imageID": "",
                   "state": {"running": {}}}]}),
        json!({"phase": "Succeeded",
               "containerStatuses": [{"name": "trainer", "ready": false, "restartCount": 0, "image": "", "imageID": "",
                   "state": {"terminated": {"exitCode": 0, "message": "{\"step\": 3}"}}}]}),
        json!({"phase": "Pending",
               "containerStatuses": [{"name": "trainer", "ready": false, "restartCount": 0, "image": "", "imageID": "",
                   "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]}),
    ];
    for (pod, status) in full.iter_mut().zip(statuses) {
        pod.status = Some(serde_json::from_value(status).unwrap());
        pod.metadata.managed_fields = Some(vec![Default::default()]);
        pod.annotations_mut().insert("note".into(), "x".repeat(100));
    }
    // The watch's projection (serde) and the one from a `Pod` are the same.
    let cached: Vec<CachedPod> = full.iter().map(as_watched).collect();
    assert_eq!(cached, full.iter().map(CachedPod::from).collect::<Vec<_>>());
    assert!(
        cached
            .iter()
            .all(|p| p.metadata.managed_fields.is_none() && p.metadata.annotations.is_none())
    );
    let seen: Vec<Pod> = cached.iter().map(CachedPod::to_pod).collect();
    assert!(
        seen.iter()
            .flat_map(|p| &p.spec.as_ref().unwrap().containers)
            .all(|c| c.env.is_none() && c.args.is_none() && c.image.is_none()),
        "{seen:?}"
    );
    let size = |pods: &[CachedPod]| serde_json::to_vec(pods).unwrap().len();
    let full_size = serde_json::to_vec(&full).unwrap().len();
    assert!(
        size(&cached) * 2 < full_size,
        "{} vs {full_size}",
        size(&cached)
    );
    // Most of a `Pod` is inline fields no decision reads.
    assert!(
        std::mem::size_of::<CachedPod>() * 2 < std::mem::size_of::<Pod>(),
        "{} vs {}",
        std::mem::size_of::<CachedPod>(),
        std::mem::size_of::<Pod>()
    );
    assert_eq!(
        decide::decide(&job, &seen, now()),
        decide::decide(&job, &full, now())
    );
}

#[test]
fn an_applied_pod_fills_its_gap_until_the_watch_shows_it() {
    let job = job();
    let all = pods(&job);
    let mut pending = Pending::default();
    let t = Instant::now();
    pending.created(all[1].clone(), t);
    let view = pending.overlay(vec![all[0].clone()], "ns", "quickstart", now());
    assert_eq!(names(&view), names(&all[..2]));
    // Another job's pending pods stay out of this one's view.
    assert_eq!(pending.overlay(vec![], "ns", "other", now()), vec![]);
    assert_eq!(
        pending.overlay(vec![], "other-ns", "quickstart", now()),
        vec![]
    );

    pending.observe(&Event::Apply(all[1].clone()));
    assert!(pending.is_empty());
}

#[test]
fn an_event_of_an_older_incarnation_confirms_nothing() {
    let job = job();
    let pod = pods(&job).remove(1);
    let mut pending = Pending::default();
    pending.created(with_uid(pod.clone(), "new"), Instant::now());
    pending.observe(&Event::Apply(with_uid(pod.clone(), "old")));
    assert_eq!(pending.len(), 1);
    // The cache still holds the old incarnation: the new one replaces it in the view.
    let view = pending.overlay(
        vec![with_uid(pod.clone(), "old")],
        "ns",
        "quickstart",
        now(),
    );
    assert_eq!(view.len(), 1);
    assert_eq!(view[0].metadata.uid.as_deref(), Some("new"));
    pending.observe(&Event::Delete(with_uid(pod, "new")));
    assert!(pending.is_empty());
}

#[test]
fn a_deleted_pod_is_terminating_until_the_watch_shows_it_gone() {
    let job = job();
    let all = pods(&job);
    let mut pending = Pending::default();
    pending.deleted("quickstart-worker-1-uid", Instant::now());
    let view = pending.overlay(all.clone(), "ns", "quickstart", now());
    let terminating: Vec<String> = view
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(terminating, vec!["quickstart-worker-1".to_string()]);
    pending.observe(&Event::Delete(all[2].clone()));
    assert!(pending.is_empty());
    assert!(
        pending
            .overlay(all, "ns", "quickstart", now())
            .iter()
            .all(|p| p.metadata.deletion_timestamp.is_none())
    );
}

#[test]
fn a_relist_or_five_minutes_clears_what_was_never_confirmed() {
    let job = job();
    let all = pods(&job);
    let t = Instant::now();
    let mut pending = Pending::default();
    pending.created(all[0].clone(), t);
    pending.deleted("x", t);
    pending.expire(t + PENDING_FOR - Duration::from_secs(1));
    assert_eq!(pending.len(), 2);
    pending.expire(t + PENDING_FOR);
    assert!(pending.is_empty());

    pending.created(all[0].clone(), t);
    pending.deleted("x", t);
    pending.observe(&Event::Init);
    assert!(pending.is_empty());
}

#[tokio::test]
async fn the_cache_serves_a_jobs_pods_once_listed_with_its_own_writes_over_them() {
    let job = job();
    let all = pods(&job);
    let cache = PodCache::default();
    let mut writer = cache.take_writer().expect("one writer");
    assert!(cache.take_writer().is_none());
    let mut other = all[0].clone();
    other.labels_mut().insert(
        kubetrain_api::contract::LABEL_JOB_NAME.into(),
        "other".into(),
    );
    other.metadata.name = Some("other-ps-0".into());
    for event in [
        Event::Init,
        Event::InitApply(all[0].clone()),
        Event::InitApply(other),
        Event::InitDone,
    ] {
        writer.apply_watcher_event(&event);
        cache.observe(&event);
    }
    assert!(cache.wait_until_ready().await);
    assert_eq!(names(&cache.of_job("ns", "quickstart")), names(&all[..1]));

    cache.created(all[1].clone());
    cache.created(all[2].clone());
    // Re-applying a pod the cache already holds records nothing.
    cache.created(all[0].clone());
    assert_eq!(names(&cache.of_job("ns", "quickstart")), names(&all));
    assert_eq!(cache.pending.lock().unwrap().len(), 2);

    for pod in &all[1..] {
        let event = Event::Apply(pod.clone());
        writer.apply_watcher_event(&event);
        cache.observe(&event);
    }
    assert!(cache.pending.lock().unwrap().is_empty());
    assert_eq!(names(&cache.of_job("ns", "quickstart")), names(&all));
}

#[test]
fn a_pod_with_a_sidecar_keeps_its_container_names_so_the_main_one_is_still_found() {
    let job = job();
    let mut pod = full_pods(&job).remove(1);
    let spec = pod.spec.as_mut().unwrap();
    let trainer = spec.containers.remove(0);
    spec.containers = vec![
        k8s_openapi::api::core::v1::Container {
            name: "a-sidecar".into(),
            image: Some("busybox".into()),
            ..Default::default()
        },
        trainer,
    ];
    // Statuses come sorted by name: the sidecar's first.
    pod.status = Some(
        serde_json::from_value(json!({"phase": "Failed", "containerStatuses": [
        {"name": "a-sidecar", "ready": false, "restartCount": 0, "image": "", "imageID": "",
         "state": {"terminated": {"exitCode": 0}}},
        {"name": "trainer", "ready": false, "restartCount": 0, "image": "", "imageID": "",
         "state": {"terminated": {"exitCode": 137}}}]}))
        .unwrap(),
    );
    let seen = as_watched(&pod).to_pod();
    let names: Vec<&str> = seen
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, vec!["a-sidecar", "trainer"]);
    assert_eq!(pod_state::exit_code(&seen), Some(137));
    assert_eq!(pod_state::exit_code(&pod), Some(137));

    let mut single = full_pods(&job).remove(0);
    single.status = Some(
        serde_json::from_value(json!({"phase": "Failed", "containerStatuses": [
        {"name": "trainer", "ready": false, "restartCount": 0, "image": "", "imageID": "",
         "state": {"terminated": {"exitCode": 3}}}]}))
        .unwrap(),
    );
    let seen = as_watched(&single).to_pod();
    assert_eq!(seen.spec.as_ref().unwrap().containers.len(), 1);
    assert_eq!(pod_state::exit_code(&seen), Some(3));
}
