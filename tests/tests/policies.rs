//! Run policies on the real API server (DESIGN.md §6.3): cleanPodPolicy, TTL, deadlines,
//! suspend/resume, stalled pods, live progress and gang scheduling. The controller runs
//! in-process for the test's namespace; the tests play the kubelet (and the gang
//! scheduler) by writing status by hand, and for progress they serve the chief's gRPC
//! Progress endpoint themselves.
//!
//! They need `etcd` and a `kube-apiserver` from `tests/envtest/install.sh`, and fail
//! (never skip) without them.

use kubetrain_api::fixtures::JobFixture;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use kubetrain_api::condition::{reasons, types};
use kubetrain_api::contract::{self, Role};
use kubetrain_api::{CleanPodPolicy, SchedulingPolicy, TrainingJob};
use kubetrain_e2e::envtest::{self, TestNamespace, namespace_with_crd, server};
use kubetrain_e2e::operator::{
    JobWatch, OperatorTask, condition, lifecycle, set_pod_running, set_pod_running_at,
    set_pod_terminated, set_pod_unschedulable, set_pod_waiting, wait_for_object, wait_for_pods,
    wait_until,
};
use kubetrain_operator::gang::{GangScheduler, VOLCANO_GROUP_ANNOTATION};
use kubetrain_operator::plan::PlanSettings;
use kubetrain_trainer::proto::progress_server::{Progress, ProgressServer};
use kubetrain_trainer::proto::{GetProgressRequest, ProgressReport};
use serde_json::json;

/// The quickstart (1 PS + 2 workers) named `name`, without its example run policy.
fn job(name: &str) -> TrainingJob {
    JobFixture::quickstart()
        .name(name)
        .with(|job| job.spec.run_policy = Default::default())
        .build()
}

async fn create(ns: &TestNamespace, job: &TrainingJob) -> TrainingJob {
    ns.api::<TrainingJob>()
        .create(&PostParams::default(), job)
        .await
        .unwrap_or_else(|e| panic!("create TrainingJob {}: {e}", job.name_any()))
}

fn all_pods(job: &str) -> Vec<String> {
    let mut names = vec![
        contract::pod_name(job, Role::Ps, 0),
        contract::pod_name(job, Role::Worker, 0),
        contract::pod_name(job, Role::Worker, 1),
    ];
    names.sort();
    names
}

fn names(pods: &[Pod]) -> Vec<String> {
    let mut names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
    names.sort();
    names
}

/// Waits until the job's pods, none terminating, are exactly `expected`.
async fn wait_for_exactly(pods: &Api<Pod>, job: &str, expected: &[String]) -> Vec<Pod> {
    wait_for_pods(pods, job, &format!("exactly {expected:?}"), |list| {
        names(list) == expected && list.iter().all(|p| p.metadata.deletion_timestamp.is_none())
    })
    .await
}

async fn run_all(pods: &Api<Pod>, job: &str) {
    wait_for_exactly(pods, job, &all_pods(job)).await;
    for name in all_pods(job) {
        set_pod_running(pods, &name)
            .await
            .unwrap_or_else(|e| panic!("set {name} Running: {e}"));
    }
}

/// The chief and the PS exit 0, as the real trainer ends a job.
async fn finish_successfully(pods: &Api<Pod>, job: &str) {
    for name in [
        contract::pod_name(job, Role::Ps, 0),
        contract::pod_name(job, Role::Worker, 0),
    ] {
        set_pod_terminated(pods, &name, 0)
            .await
            .unwrap_or_else(|e| panic!("{name} exits 0: {e}"));
    }
}

fn message(job: &TrainingJob, type_: &str) -> String {
    condition(job, type_).map_or_else(String::new, |c| c.message.clone())
}

/// `kubectl get trainingjob`'s printer columns for the job, header name -> value.
async fn printed_columns(ns: &TestNamespace, name: &str) -> Vec<(String, String)> {
    let out = server()
        .await
        .kubectl()
        .args(["get", "trainingjobs", name, "-n", &ns.name])
        .output()
        .await
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl get: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    header
        .iter()
        .zip(row.iter().chain(std::iter::repeat(&"")))
        .map(|(h, v)| (h.to_string(), v.to_string()))
        .collect()
}

async fn printed(ns: &TestNamespace, name: &str, column: &str) -> String {
    printed_columns(ns, name)
        .await
        .into_iter()
        .find(|(h, _)| h == column)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {column} column"))
}

/// Waits for an Event of `type_` with `reason` regarding `job` (events are recorded after
/// the status write, so they can trail it).
async fn wait_for_event(ns: &TestNamespace, job: &str, reason: &str, type_: &str) -> Event {
    let api = ns.api::<Event>();
    wait_until(&format!("a {type_} {reason} event on {job}"), || async {
        let events = api
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let seen: Vec<(Option<String>, Option<String>)> = events
            .items
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(job))
            .map(|e| (e.type_.clone(), e.reason.clone()))
            .collect();
        events
            .items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(job)
                    && e.reason.as_deref() == Some(reason)
                    && e.type_.as_deref() == Some(type_)
            })
            .ok_or_else(|| format!("{seen:?}"))
    })
    .await
}

fn reconciles(operator: &OperatorTask) -> u64 {
    operator
        .context
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("kubetrain_reconciles_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn reconcile_errors(operator: &OperatorTask) -> u64 {
    operator
        .context
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("kubetrain_reconcile_errors_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn clean_pod_policy_all_removes_every_pod_and_none_keeps_them() {
    let ns = namespace_with_crd("pol-clean").await;
    let _operator = OperatorTask::start(&ns);
    let pods: Api<Pod> = ns.api();
    let services: Api<Service> = ns.api();

    let mut all = job("all");
    all.spec.run_policy.clean_pod_policy = CleanPodPolicy::All;
    let mut none = job("none");
    none.spec.run_policy.clean_pod_policy = CleanPodPolicy::None;
    let mut all_watch = JobWatch::new(&ns, "all");
    let mut none_watch = JobWatch::new(&ns, "none");
    create(&ns, &all).await;
    create(&ns, &none).await;
    run_all(&pods, "all").await;
    run_all(&pods, "none").await;
    wait_for_object(services.clone(), "none", "created", |s| s.is_some()).await;

    finish_successfully(&pods, "all").await;
    all_watch.until_state(types::SUCCEEDED).await;
    wait_for_exactly(&pods, "all", &[]).await;
    wait_for_object(services.clone(), "all", "deleted", |s| s.is_none()).await;

    // None: a worker fails under Never (the quickstart's ExitCode with a permanent code);
    // every pod stays, the failed one is named for its logs, and the Service stays too.
    set_pod_terminated(&pods, "none-worker-1", 1)
        .await
        .expect("worker 1 exits 1");
    let failed = none_watch
        .until("Failed naming the kept failed pod", |j| {
            message(j, types::FAILED).contains("failed pods kept for their logs: none-worker-1")
        })
        .await;
    assert_eq!(
        lifecycle(&failed).map(|c| c.reason.as_str()),
        Some(reasons::POD_FAILED)
    );
    none_watch.assert_quiet_for(Duration::from_secs(2)).await;
    let left = pods
        .list(&ListParams::default().labels("kubetrain.io/job-name=none"))
        .await
        .expect("list pods");
    assert_eq!(names(&left.items), all_pods("none"), "None keeps every pod");
    assert!(
        left.items
            .iter()
            .all(|p| p.metadata.deletion_timestamp.is_none()),
        "no pod is being deleted"
    );
    assert!(
        services
            .get_opt("none")
            .await
            .expect("get service")
            .is_some(),
        "None keeps the Service"
    );
}

#[tokio::test]
async fn ttl_deletes_the_finished_job_on_time_without_polling() {
    let ns = namespace_with_crd("pol-ttl").await;
    let operator = OperatorTask::start(&ns);
    let pods: Api<Pod> = ns.api();
    let jobs: Api<TrainingJob> = ns.api();
    let mut ttl = job("ttl");
    ttl.spec.run_policy.ttl_seconds_after_finished = Some(4);
    let mut watch = JobWatch::new(&ns, "ttl");
    create(&ns, &ttl).await;
    run_all(&pods, "ttl").await;
    finish_successfully(&pods, "ttl").await;
    let done = watch.until_state(types::SUCCEEDED).await;
    let completed = done
        .status
        .as_ref()
        .and_then(|s| s.completion_time.clone())
        .expect("completionTime")
        .0;
    // Count what the wait costs from when the clean-up is done and counted in the status
    // (cleanPodPolicy Running: only the chief's finished pod stays).
    wait_for_exactly(&pods, "ttl", &[contract::pod_name("ttl", Role::Worker, 0)]).await;
    watch
        .until("replica counts after clean-up", |j| {
            j.status.as_ref().is_some_and(|s| {
                s.replica_statuses.ps.active == 0 && s.replica_statuses.worker.active == 0
            })
        })
        .await;
    let before = reconciles(&operator);

    let gone = wait_until("the job deleted after its TTL", || async {
        match jobs.get_opt("ttl").await {
            Ok(None) => Ok(Timestamp::now()),
            Ok(Some(_)) => Err("the job still exists".to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    let after_completion = gone.duration_since(completed).as_secs_f64();
    // completionTime has whole seconds, so the true delay is up to 1 s longer.
    assert!(
        (4.0..7.0).contains(&after_completion),
        "deleted {after_completion:.1}s after completionTime, TTL 4s"
    );
    let waited = reconciles(&operator) - before;
    assert!(
        waited <= 3,
        "{waited} reconciles while waiting for the TTL: that is polling, not an exact requeue"
    );
}

#[tokio::test]
async fn the_active_deadline_fails_the_job_and_removes_its_running_pods() {
    let ns = namespace_with_crd("pol-deadline").await;
    let _operator = OperatorTask::start(&ns);
    let pods: Api<Pod> = ns.api();
    let mut late = job("late");
    late.spec.run_policy.active_deadline_seconds = Some(3);
    let mut watch = JobWatch::new(&ns, "late");
    let started = Instant::now();
    create(&ns, &late).await;
    run_all(&pods, "late").await;
    watch.until_state(types::RUNNING).await;
    let failed = watch.until_state(types::FAILED).await;
    let took = started.elapsed();
    assert_eq!(
        lifecycle(&failed).map(|c| c.reason.as_str()),
        Some(reasons::DEADLINE_EXCEEDED)
    );
    assert!(
        message(&failed, types::FAILED).contains("runPolicy.activeDeadlineSeconds 3"),
        "{}",
        message(&failed, types::FAILED)
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "failed after {took:?} with a 3 s deadline"
    );
    // cleanPodPolicy Running (the default): every pod was running, so every pod goes.
    wait_for_exactly(&pods, "late", &[]).await;
}

#[tokio::test]
async fn suspend_deletes_the_pods_and_resume_recreates_them_with_a_new_start_time() {
    let ns = namespace_with_crd("pol-suspend").await;
    let _operator = OperatorTask::start(&ns);
    let pods: Api<Pod> = ns.api();
    let jobs: Api<TrainingJob> = ns.api();
    let mut watch = JobWatch::new(&ns, "pause");
    create(&ns, &job("pause")).await;
    run_all(&pods, "pause").await;
    let running = watch.until_state(types::RUNNING).await;
    let first_start = running
        .status
        .as_ref()
        .and_then(|s| s.start_time.clone())
        .expect("startTime")
        .0;
    assert_eq!(printed(&ns, "pause", "STATE").await, "Running");

    let suspend = |on: bool| json!({"spec": {"runPolicy": {"suspend": on}}});
    jobs.patch(
        "pause",
        &PatchParams::default(),
        &Patch::Merge(&suspend(true)),
    )
    .await
    .expect("suspend");
    let suspended = watch.until_state(types::SUSPENDED).await;
    assert_eq!(
        lifecycle(&suspended).map(|c| c.reason.as_str()),
        Some(reasons::JOB_SUSPENDED)
    );
    wait_for_exactly(&pods, "pause", &[]).await;
    assert_eq!(printed(&ns, "pause", "STATE").await, "Suspended");

    // Start times have whole seconds: resume in a later second to see the reset.
    while Timestamp::now().as_second() <= first_start.as_second() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    jobs.patch(
        "pause",
        &PatchParams::default(),
        &Patch::Merge(&suspend(false)),
    )
    .await
    .expect("resume");
    let resumed = watch.until_state(types::CREATED).await;
    assert_eq!(
        condition(&resumed, types::SUSPENDED).map(|c| c.status.as_str()),
        Some("False")
    );
    let second_start = resumed
        .status
        .as_ref()
        .and_then(|s| s.start_time.clone())
        .expect("startTime after resume")
        .0;
    assert!(
        second_start > first_start,
        "startTime {second_start} not reset (was {first_start})"
    );
    assert_eq!(printed(&ns, "pause", "STATE").await, "Created");
    run_all(&pods, "pause").await;
    watch.until_state(types::RUNNING).await;
    assert_eq!(printed(&ns, "pause", "STATE").await, "Running");
    assert_eq!(printed(&ns, "pause", "READY").await, "2/2");
}

#[tokio::test]
async fn a_stalled_pod_is_named_at_once_and_fails_the_job_past_the_startup_deadline() {
    let ns = namespace_with_crd("pol-stall").await;
    let _operator = OperatorTask::start(&ns);
    let pods: Api<Pod> = ns.api();

    // No deadline: the condition names the pod and the reason, and goes away once fixed.
    let mut watch = JobWatch::new(&ns, "stuck");
    create(&ns, &job("stuck")).await;
    wait_for_exactly(&pods, "stuck", &all_pods("stuck")).await;
    let marked = Instant::now();
    set_pod_waiting(
        &pods,
        "stuck-worker-1",
        "ImagePullBackOff",
        "Back-off pulling image \"trainer:typo\"",
    )
    .await
    .expect("worker 1 waits");
    let stalled = watch
        .until("PodsStalled naming the pod", |j| {
            condition(j, types::PODS_STALLED).is_some_and(|c| c.status == "True")
        })
        .await;
    // One reconcile: the 1 s debounce plus the reconcile itself.
    assert!(
        marked.elapsed() < Duration::from_secs(5),
        "took {:?}",
        marked.elapsed()
    );
    let text = message(&stalled, types::PODS_STALLED);
    assert!(
        text.contains("stuck-worker-1") && text.contains("ImagePullBackOff"),
        "{text}"
    );
    set_pod_unschedulable(
        &pods,
        "stuck-ps-0",
        "0/3 nodes are available: 3 Insufficient cpu",
    )
    .await
    .expect("ps unschedulable");
    let both = watch
        .until("PodsStalled naming the unschedulable PS too", |j| {
            message(j, types::PODS_STALLED).contains("stuck-ps-0")
        })
        .await;
    assert!(
        message(&both, types::PODS_STALLED).contains("Unschedulable (0/3 nodes are available"),
        "{}",
        message(&both, types::PODS_STALLED)
    );
    run_all(&pods, "stuck").await;
    let fixed = watch.until_state(types::RUNNING).await;
    assert_eq!(
        condition(&fixed, types::PODS_STALLED).map(|c| c.status.as_str()),
        Some("False")
    );

    // With startupDeadlineSeconds the job fails once the pod has waited that long.
    let mut strict = job("strict");
    strict.spec.run_policy.startup_deadline_seconds = Some(4);
    let mut watch = JobWatch::new(&ns, "strict");
    create(&ns, &strict).await;
    wait_for_exactly(&pods, "strict", &all_pods("strict")).await;
    set_pod_waiting(
        &pods,
        "strict-worker-0",
        "CreateContainerConfigError",
        "secret \"data\" not found",
    )
    .await
    .expect("chief waits");
    let failed = watch.until_state(types::FAILED).await;
    assert_eq!(
        lifecycle(&failed).map(|c| c.reason.as_str()),
        Some(reasons::STARTUP_DEADLINE_EXCEEDED)
    );
    let text = message(&failed, types::FAILED);
    assert!(
        text.contains("strict-worker-0")
            && text.contains("CreateContainerConfigError")
            && text.contains("runPolicy.startupDeadlineSeconds 4"),
        "{text}"
    );
    wait_for_event(&ns, "strict", reasons::STARTUP_DEADLINE_EXCEEDED, "Warning").await;
}

/// The chief's Progress endpoint, reporting a step that grows with every ask.
struct FakeChief {
    asks: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl Progress for FakeChief {
    async fn get_progress(
        &self,
        _: tonic::Request<GetProgressRequest>,
    ) -> Result<tonic::Response<ProgressReport>, tonic::Status> {
        let n = self.asks.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(tonic::Response::new(ProgressReport {
            step: n * 100,
            total_steps: 10_000,
            epoch: n as u32,
            loss: 1.0 / n as f64,
            accuracy: 0.5 + 0.01 * n as f64,
            samples_per_second: 1234.0,
            ..ProgressReport::default()
        }))
    }
}

#[tokio::test]
async fn progress_is_at_most_15_s_old_with_one_write_per_10_s() {
    let ns = namespace_with_crd("pol-progress").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let asks = Arc::new(AtomicU64::new(0));
    let chief = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ProgressServer::new(FakeChief { asks: asks.clone() }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let _operator = OperatorTask::start_with(
        &ns,
        PlanSettings {
            port,
            ..PlanSettings::default()
        },
    );
    let pods: Api<Pod> = ns.api();
    let jobs: Api<TrainingJob> = ns.api();
    create(&ns, &job("live")).await;
    wait_for_exactly(&pods, "live", &all_pods("live")).await;
    for name in all_pods("live") {
        set_pod_running_at(&pods, &name, "127.0.0.1")
            .await
            .unwrap_or_else(|e| panic!("set {name} Running: {e}"));
    }
    let running_at = Timestamp::now();

    // Sample the stored status every second for 32 s.
    let mut updates: Vec<Timestamp> = Vec::new();
    let mut max_age = 0.0f64;
    let mut last_step = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(32) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let job = jobs.get("live").await.expect("get job");
        let now = Timestamp::now();
        match job.status.as_ref().and_then(|s| s.progress.as_ref()) {
            Some(progress) => {
                let at = progress.updated_at.as_ref().expect("updatedAt").0;
                if updates.last() != Some(&at) {
                    updates.push(at);
                }
                max_age = max_age.max(now.duration_since(at).as_secs_f64());
                assert!(progress.step >= last_step, "step went back");
                last_step = progress.step;
            }
            None => {
                let waited = now.duration_since(running_at).as_secs_f64();
                assert!(
                    waited < 15.0,
                    "no progress {waited:.0}s after the chief ran"
                );
            }
        }
    }
    chief.abort();

    assert!(
        updates.len() >= 3,
        "only {} progress writes in 32 s: {updates:?}",
        updates.len()
    );
    // updatedAt has whole seconds: a true 10 s gap can show as 9.
    for pair in updates.windows(2) {
        let gap = pair[1].duration_since(pair[0]).as_secs_f64();
        assert!(gap >= 9.0, "two progress writes {gap}s apart: {updates:?}");
    }
    assert!(max_age <= 15.0, "progress was {max_age:.1}s old");
    assert!(last_step >= 100 && last_step % 100 == 0, "step {last_step}");

    let columns = printed_columns(&ns, "live").await;
    let value = |name: &str| {
        columns
            .iter()
            .find(|(h, _)| h == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let job = jobs.get("live").await.expect("get job");
    let progress = job.status.and_then(|s| s.progress).expect("progress");
    assert_eq!(value("STEP"), progress.step.to_string(), "{columns:?}");
    assert_eq!(
        value("LOSS").parse::<f64>().ok(),
        progress.loss,
        "{columns:?}"
    );
    assert_eq!(
        value("ACCURACY").parse::<f64>().ok(),
        progress.accuracy,
        "{columns:?}"
    );
}

async fn ensure_priority_class(ns: &TestNamespace, name: &str) {
    let class: PriorityClass = serde_json::from_value(json!({
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": name},
        "value": 1000,
    }))
    .expect("priority class");
    Api::<PriorityClass>::all(ns.client.clone())
        .patch(
            name,
            &PatchParams::apply("kubetrain-tests").force(),
            &Patch::Apply(&class),
        )
        .await
        .expect("apply priority class");
}

fn gang(queue: Option<&str>, priority: Option<&str>) -> Option<SchedulingPolicy> {
    Some(SchedulingPolicy {
        gang: true,
        min_available: None,
        queue: queue.map(str::to_string),
        priority_class: priority.map(str::to_string),
    })
}

#[tokio::test]
async fn a_volcano_gang_gets_its_pod_group_and_a_pending_condition_until_admitted() {
    let server = server().await;
    server
        .install_crd_from(
            &envtest::workspace_root().join("tests/fixtures/podgroup-volcano.crd.yaml"),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ns = namespace_with_crd("pol-gang").await;
    ensure_priority_class(&ns, "kubetrain-test-high").await;
    let _operator = OperatorTask::start_with(
        &ns,
        PlanSettings {
            gang_scheduler: Some(GangScheduler::Volcano),
            ..PlanSettings::default()
        },
    );
    let pods: Api<Pod> = ns.api();
    let groups: Api<DynamicObject> = Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &GangScheduler::Volcano.api_resource(),
    );
    let mut team = job("team");
    team.spec.run_policy.scheduling_policy = gang(Some("research"), Some("kubetrain-test-high"));
    let mut watch = JobWatch::new(&ns, "team");
    let created = create(&ns, &team).await;

    let group = wait_for_object(groups.clone(), "team", "created", |g| g.is_some())
        .await
        .expect("PodGroup");
    assert_eq!(group.data["spec"]["minMember"], json!(3), "{group:?}");
    assert_eq!(group.data["spec"]["queue"], json!("research"));
    assert_eq!(
        group.data["spec"]["priorityClassName"],
        json!("kubetrain-test-high")
    );
    let owner = &group.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(Some(&owner.uid), created.meta().uid.as_ref());
    assert_eq!(owner.controller, Some(true));

    let created_pods = wait_for_exactly(&pods, "team", &all_pods("team")).await;
    for pod in &created_pods {
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(
            spec.scheduler_name.as_deref(),
            Some("volcano"),
            "{}",
            pod.name_any()
        );
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some("kubetrain-test-high")
        );
        assert_eq!(
            pod.annotations().get(VOLCANO_GROUP_ANNOTATION),
            Some(&"team".to_string()),
            "{}",
            pod.name_any()
        );
    }
    let pending = watch
        .until("GangPending with 3 of 3 pods pending", |j| {
            message(j, types::GANG_PENDING).contains("3 of 3 pods still pending")
        })
        .await;
    assert_eq!(
        condition(&pending, types::GANG_PENDING).map(|c| (c.status.as_str(), c.reason.as_str())),
        Some(("True", reasons::POD_GROUP_PENDING))
    );
    assert_eq!(
        lifecycle(&pending).map(|c| c.type_.as_str()),
        Some(types::CREATED)
    );

    // The scheduler cannot place the gang, and says why.
    groups
        .patch_status(
            "team",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Pending", "conditions": [{
                "type": "Unschedulable", "status": "True", "reason": "NotEnoughResources",
                "message": "3/3 tasks in gang unschedulable: 3 Insufficient cpu"}]}})),
        )
        .await
        .expect("podgroup status");
    for name in all_pods("team") {
        set_pod_unschedulable(&pods, &name, "3/3 tasks in gang unschedulable")
            .await
            .expect("pod unschedulable");
    }
    let unschedulable = watch
        .until("GangPending with the scheduler's reason", |j| {
            condition(j, types::GANG_PENDING)
                .is_some_and(|c| c.reason == reasons::GANG_UNSCHEDULABLE)
        })
        .await;
    assert!(
        message(&unschedulable, types::GANG_PENDING).contains("NotEnoughResources"),
        "{}",
        message(&unschedulable, types::GANG_PENDING)
    );

    // Admitted: the pods run and the condition turns False.
    groups
        .patch_status(
            "team",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running", "conditions": []}})),
        )
        .await
        .expect("podgroup status");
    run_all(&pods, "team").await;
    let admitted = watch
        .until("GangPending False", |j| {
            condition(j, types::GANG_PENDING).is_some_and(|c| c.status == "False")
        })
        .await;
    assert_eq!(
        condition(&admitted, types::GANG_PENDING).map(|c| c.reason.as_str()),
        Some(reasons::GANG_ADMITTED)
    );
    watch.until_state(types::RUNNING).await;
}

#[tokio::test]
async fn a_missing_pod_group_crd_is_a_clear_condition_not_an_error_loop() {
    // scheduler-plugins' CRD is never installed on the test server.
    let ns = namespace_with_crd("pol-nocrd").await;
    let operator = OperatorTask::start_with(
        &ns,
        PlanSettings {
            gang_scheduler: Some(GangScheduler::SchedulerPlugins),
            ..PlanSettings::default()
        },
    );
    let pods: Api<Pod> = ns.api();
    let mut lonely = job("lonely");
    lonely.spec.run_policy.scheduling_policy = gang(None, None);
    let mut watch = JobWatch::new(&ns, "lonely");
    create(&ns, &lonely).await;
    let missing = watch
        .until("GangPending PodGroupCRDMissing", |j| {
            condition(j, types::GANG_PENDING)
                .is_some_and(|c| c.reason == reasons::POD_GROUP_CRD_MISSING)
        })
        .await;
    let text = message(&missing, types::GANG_PENDING);
    assert!(
        text.contains("scheduling.x-k8s.io/v1alpha1") && text.contains("schedulingPolicy.gang"),
        "{text}"
    );
    // The status write echoes back as one more reconcile (after the 1 s debounce); after
    // that the job is only looked at again at the calm recheck.
    watch.assert_quiet_for(Duration::from_millis(1500)).await;
    let before = reconciles(&operator);
    watch.assert_quiet_for(Duration::from_secs(4)).await;
    let during = reconciles(&operator) - before;
    assert!(
        during == 0,
        "{during} reconciles in 4 s: the job is looked at in a loop"
    );
    assert_eq!(
        reconcile_errors(&operator),
        0,
        "a missing CRD is no reconcile error"
    );
    let listed = pods
        .list(&ListParams::default().labels("kubetrain.io/job-name=lonely"))
        .await
        .expect("list pods");
    assert!(
        listed.items.is_empty(),
        "pods without their gang: {:?}",
        names(&listed.items)
    );
    wait_for_event(&ns, "lonely", reasons::POD_GROUP_CRD_MISSING, "Warning").await;
}
