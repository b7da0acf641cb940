//! Helpers for running the kubetrain controller in-process against the test API server
//! and for playing the kubelet by hand (DESIGN.md §6.3).
//!
//! * [`OperatorTask`]: `controller::run` restricted to one namespace, in a tokio task that
//!   is aborted when the handle drops.
//! * [`set_pod_running`], [`set_pod_terminated`]: pod status written through the `status`
//!   subresource the way a kubelet would, without running anything.
//! * [`JobWatch`]: waits on a TrainingJob with a watch and a deadline, remembers the
//!   lifecycle states it went through, and on timeout fails with the job's status and
//!   its pods.
//! * [`wait_until`], [`wait_for_object`]: polling and watching with a deadline for lists
//!   and for objects that are not typed TrainingJobs.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus, Pod,
    PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use kubetrain_api::{JobCondition, TrainingJob};
use kubetrain_operator::controller::{self, Context};
use kubetrain_operator::metrics::Metrics;
use kubetrain_operator::plan::{self, PlanSettings};
use kubetrain_operator::replica;
use serde::de::DeserializeOwned;

use crate::envtest::TestNamespace;

/// How long a test waits for anything the operator or the API server should do.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The controller running in-process, watching one namespace. Dropping the handle stops it.
pub struct OperatorTask {
    handle: tokio::task::JoinHandle<()>,
    /// The context the controller runs with (its metrics, client and settings).
    pub context: Arc<Context>,
}

impl OperatorTask {
    /// Starts `controller::run` for `ns` only, with default plan settings, reporting
    /// events as instance `test`.
    pub fn start(ns: &TestNamespace) -> Self {
        Self::start_with(ns, PlanSettings::default())
    }

    /// [`OperatorTask::start`] with other plan settings (gang scheduler, port).
    pub fn start_with(ns: &TestNamespace, settings: PlanSettings) -> Self {
        let context = Arc::new(Context::new(
            ns.client.clone(),
            settings,
            Some("test".into()),
            Arc::new(Metrics::new()),
        ));
        let handle = tokio::spawn(controller::run(context.clone(), Some(ns.name.clone())));
        Self { handle, context }
    }

    /// Whether the controller has stopped (it never should during a test).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

impl Drop for OperatorTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// The one True lifecycle condition of a job (Created, Running, ...), if any.
pub fn lifecycle(job: &TrainingJob) -> Option<&JobCondition> {
    job.status.as_ref()?.lifecycle()
}

/// Whether the job's condition `type_` is True.
pub fn condition_true(job: &TrainingJob, type_: &str) -> bool {
    job.status.as_ref().is_some_and(|s| s.is(type_))
}

/// The job's condition of type `type_`.
pub fn condition<'a>(job: &'a TrainingJob, type_: &str) -> Option<&'a JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

type ObjectStream<K> = Pin<Box<dyn Stream<Item = Result<Option<K>, watcher::Error>> + Send>>;

/// A watch on one TrainingJob. Every state the watch delivers is recorded, so a
/// short-lived lifecycle state (Restarting) is seen even when the job has moved on by the
/// time the test looks.
pub struct JobWatch {
    jobs: Api<TrainingJob>,
    pods: Api<Pod>,
    name: String,
    stream: ObjectStream<TrainingJob>,
    last: Option<TrainingJob>,
    history: Vec<String>,
    timeout: Duration,
}

impl JobWatch {
    /// Starts watching job `name` in `ns` (it need not exist yet).
    pub fn new(ns: &TestNamespace, name: &str) -> Self {
        let jobs: Api<TrainingJob> = ns.api();
        Self {
            stream: Box::pin(watcher::watch_object(jobs.clone(), name)),
            jobs,
            pods: ns.api(),
            name: name.to_string(),
            last: None,
            history: Vec::new(),
            timeout: TIMEOUT,
        }
    }

    /// Waits up to `timeout` instead of [`TIMEOUT`], for jobs that run real programs.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The lifecycle states seen so far, in order, consecutive repeats folded
    /// (`"Created/PodsCreated"`, `"Running/AllReplicasRunning"`, ...).
    pub fn history(&self) -> &[String] {
        &self.history
    }

    /// The last version of the job the watch delivered.
    pub fn last(&self) -> Option<&TrainingJob> {
        self.last.as_ref()
    }

    /// Waits until `done` holds for the job; panics after the timeout with the job's
    /// current status, its pods and the states seen.
    pub async fn until(&mut self, what: &str, done: impl Fn(&TrainingJob) -> bool) -> TrainingJob {
        if let Some(job) = self.last.as_ref().filter(|j| done(j)) {
            return job.clone();
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => self.fail(what, "timed out").await,
                Ok(None) => self.fail(what, "the watch ended").await,
                Ok(Some(Err(error))) => self.fail(what, &format!("watch error: {error}")).await,
                Ok(Some(Ok(None))) => self.last = None,
                Ok(Some(Ok(Some(job)))) => {
                    self.record(&job);
                    let hit = done(&job);
                    self.last = Some(job);
                    if hit {
                        return self.last.clone().expect("just set");
                    }
                }
            }
        }
    }

    /// Waits until `type_` is the job's True lifecycle condition.
    pub async fn until_state(&mut self, type_: &str) -> TrainingJob {
        self.until(&format!("lifecycle condition {type_} True"), |job| {
            lifecycle(job).is_some_and(|c| c.type_ == type_)
        })
        .await
    }

    /// Asserts that the job does not change at all for `quiet`: no status churn, no
    /// reconcile storm. Panics with the change if one arrives.
    pub async fn assert_quiet_for(&mut self, quiet: Duration) {
        let before = self.last.as_ref().and_then(|j| j.resource_version());
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Some(job)))) if job.resource_version() == before => {
                    // A watch restart re-lists the same version: no change.
                }
                Ok(other) => {
                    let after = match &other {
                        Some(Ok(Some(job))) => format!(
                            "resourceVersion {:?} -> {:?}\nstatus now: {:#?}",
                            before,
                            job.resource_version(),
                            job.status
                        ),
                        other => format!("{other:?}"),
                    };
                    panic!(
                        "job {} changed while it should have been stable: {after}\nbefore: {:#?}",
                        self.name,
                        self.last.as_ref().and_then(|j| j.status.as_ref())
                    );
                }
            }
        }
    }

    fn record(&mut self, job: &TrainingJob) {
        let state = lifecycle(job).map_or_else(
            || "(none)".to_string(),
            |c| format!("{}/{}", c.type_, c.reason),
        );
        if self.history.last() != Some(&state) {
            self.history.push(state);
        }
    }

    async fn fail(&self, what: &str, why: &str) -> ! {
        let current = self.jobs.get_opt(&self.name).await;
        let status = match &current {
            Ok(Some(job)) => format!(
                "generation {:?}, resourceVersion {:?}\n{:#?}",
                job.metadata.generation,
                job.resource_version(),
                job.status
            ),
            Ok(None) => "the job does not exist".to_string(),
            Err(error) => format!("could not read the job: {error}"),
        };
        let pods = self
            .pods
            .list(&ListParams::default().labels(&replica::job_selector(&self.name)))
            .await
            .map(|l| pod_summary(&l.items))
            .unwrap_or_else(|e| format!("could not list pods: {e}"));
        panic!(
            "TrainingJob {} never reached {what} ({why} after {:?}).\n\
             states seen: {:?}\ncurrent status: {status}\npods: {pods}",
            self.name, self.timeout, self.history
        );
    }
}

/// `name (phase, uid)` of each pod, for failure messages.
pub fn pod_summary(pods: &[Pod]) -> String {
    let parts: Vec<String> = pods
        .iter()
        .map(|p| {
            format!(
                "{} ({}{}, uid {})",
                p.name_any(),
                p.status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .unwrap_or("no phase"),
                if p.metadata.deletion_timestamp.is_some() {
                    ", terminating"
                } else {
                    ""
                },
                p.uid().unwrap_or_default()
            )
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Polls `probe` until it returns `Ok`, at most [`TIMEOUT`]. For lists, which have no
/// single-object watch; the deadline, not the interval, bounds the wait. On timeout,
/// panics with `what` and the last `Err` the probe gave (what it saw instead).
pub async fn wait_until<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let last = match probe().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {TIMEOUT:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lists the pods of job `job` until `done` accepts them (see [`wait_until`]).
pub async fn wait_for_pods(
    pods: &Api<Pod>,
    job: &str,
    what: &str,
    done: impl Fn(&[Pod]) -> bool,
) -> Vec<Pod> {
    let params = ListParams::default().labels(&replica::job_selector(job));
    wait_until(&format!("pods of {job}: {what}"), || {
        let params = params.clone();
        let done = &done;
        async move {
            let mut list = pods
                .list(&params)
                .await
                .map_err(|e| format!("list failed: {e}"))?
                .items;
            list.sort_by_key(|p| p.name_any());
            if done(&list) {
                Ok(list)
            } else {
                Err(pod_summary(&list))
            }
        }
    })
    .await
}

/// Watches one object of any kind until `done` holds (`None`: it does not exist), at most
/// [`TIMEOUT`]; panics with the last version seen.
pub async fn wait_for_object<K>(
    api: Api<K>,
    name: &str,
    what: &str,
    done: impl Fn(Option<&K>) -> bool,
) -> Option<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = std::pin::pin!(watcher::watch_object(api, name));
    let mut last: Option<K> = None;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(object))) => {
                if done(object.as_ref()) {
                    return object;
                }
                last = object;
            }
            other => panic!(
                "{name} never reached {what} within {TIMEOUT:?} ({}); last seen: {last:#?}",
                match other {
                    Err(_) => "timed out".to_string(),
                    Ok(None) => "watch ended".to_string(),
                    Ok(Some(Err(e))) => format!("watch error: {e}"),
                    Ok(Some(Ok(_))) => unreachable!("handled above"),
                }
            ),
        }
    }
}

/// Asserts that object `name` does not change at all for `quiet` (its resourceVersion
/// stays put): proof that nobody keeps rewriting it.
pub async fn assert_unchanged_for<K>(api: Api<K>, name: &str, quiet: Duration)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = std::pin::pin!(watcher::watch_object(api, name));
    let first = match tokio::time::timeout(TIMEOUT, stream.next()).await {
        Ok(Some(Ok(object))) => object,
        other => panic!("watching {name}: {other:?}"),
    };
    let version = first.as_ref().and_then(|o| o.resource_version());
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return,
            Ok(Some(Ok(object)))
                if object.as_ref().and_then(|o| o.resource_version()) == version => {}
            Ok(other) => panic!(
                "{name} changed within {quiet:?} (resourceVersion {version:?}); before: {first:#?}\nafter: {other:#?}"
            ),
        }
    }
}

/// The name and image of the pod's main container (the one the contract env goes into).
fn main_container(pod: &Pod) -> (String, String) {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    containers
        .get(plan::main_container_index(containers))
        .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
        .unwrap_or_default()
}

fn pod_status(pod: &Pod, phase: &str, ready: bool, state: ContainerState) -> PodStatus {
    let now = Time(Timestamp::now());
    let (name, image) = main_container(pod);
    let finished = matches!(phase, "Succeeded" | "Failed");
    let condition = |type_: &str, on: bool| PodCondition {
        type_: type_.to_string(),
        status: if on { "True" } else { "False" }.to_string(),
        reason: match (on, finished) {
            (true, _) => None,
            (false, true) => Some("PodCompleted".to_string()),
            (false, false) => Some("ContainersNotReady".to_string()),
        },
        last_transition_time: Some(now.clone()),
        ..PodCondition::default()
    };
    let started = state.running.is_some();
    PodStatus {
        phase: Some(phase.to_string()),
        start_time: pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.clone())
            .or(Some(now.clone())),
        conditions: Some(vec![
            condition("PodScheduled", true),
            condition("Initialized", true),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ]),
        container_statuses: Some(vec![ContainerStatus {
            name,
            image,
            image_id: String::new(),
            ready,
            started: Some(started),
            restart_count: 0,
            state: Some(state),
            ..ContainerStatus::default()
        }]),
        ..PodStatus::default()
    }
}

async fn write_pod_status(pods: &Api<Pod>, name: &str, status: PodStatus) -> kube::Result<Pod> {
    let body = serde_json::json!({ "status": status });
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
}

/// Reports pod `name` as a kubelet would once its main container runs and is ready:
/// phase Running, Ready and ContainersReady True, the container `running`.
pub async fn set_pod_running(pods: &Api<Pod>, name: &str) -> kube::Result<Pod> {
    let pod = pods.get(name).await?;
    let state = ContainerState {
        running: Some(ContainerStateRunning {
            started_at: Some(Time(Timestamp::now())),
        }),
        ..ContainerState::default()
    };
    write_pod_status(pods, name, pod_status(&pod, "Running", true, state)).await
}

/// Reports pod `name` as Running with pod IP `ip` (where the operator asks the chief for
/// progress).
pub async fn set_pod_running_at(pods: &Api<Pod>, name: &str, ip: &str) -> kube::Result<Pod> {
    let pod = pods.get(name).await?;
    let state = ContainerState {
        running: Some(ContainerStateRunning {
            started_at: Some(Time(Timestamp::now())),
        }),
        ..ContainerState::default()
    };
    let mut status = pod_status(&pod, "Running", true, state);
    status.pod_ip = Some(ip.to_string());
    write_pod_status(pods, name, status).await
}

/// Reports pod `name` as Pending with its main container waiting for `reason` (for
/// example `ImagePullBackOff`), as a kubelet does when it cannot start it.
pub async fn set_pod_waiting(
    pods: &Api<Pod>,
    name: &str,
    reason: &str,
    message: &str,
) -> kube::Result<Pod> {
    let pod = pods.get(name).await?;
    let state = ContainerState {
        waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
        }),
        ..ContainerState::default()
    };
    write_pod_status(pods, name, pod_status(&pod, "Pending", false, state)).await
}

/// Reports pod `name` as a scheduler does when no node fits it: Pending, PodScheduled
/// False with reason Unschedulable.
pub async fn set_pod_unschedulable(
    pods: &Api<Pod>,
    name: &str,
    message: &str,
) -> kube::Result<Pod> {
    let status = PodStatus {
        phase: Some("Pending".to_string()),
        conditions: Some(vec![PodCondition {
            type_: "PodScheduled".to_string(),
            status: "False".to_string(),
            reason: Some("Unschedulable".to_string()),
            message: Some(message.to_string()),
            last_transition_time: Some(Time(Timestamp::now())),
            ..PodCondition::default()
        }]),
        ..PodStatus::default()
    };
    write_pod_status(pods, name, status).await
}

/// Reports pod `name`'s main container as terminated with `exit_code`: phase Succeeded
/// for 0, Failed otherwise (as a kubelet does under pod restartPolicy Never).
pub async fn set_pod_terminated(pods: &Api<Pod>, name: &str, exit_code: i32) -> kube::Result<Pod> {
    let pod = pods.get(name).await?;
    let now = Time(Timestamp::now());
    let (phase, reason) = match exit_code {
        0 => ("Succeeded", "Completed"),
        137 => ("Failed", "OOMKilled"),
        _ => ("Failed", "Error"),
    };
    let state = ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code,
            reason: Some(reason.to_string()),
            started_at: Some(now.clone()),
            finished_at: Some(now),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    };
    write_pod_status(pods, name, pod_status(&pod, phase, false, state)).await
}
