//! The kube-runtime shell around `plan` and `status`: watches, server-side apply, events
//! and requeues. Every decision is made by `decide::decide`; this module only reads the
//! world, asks, and carries the answer out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action as Requeue, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kubetrain_api::condition::{reasons, types};
use kubetrain_api::contract::LABEL_JOB_NAME;
use kubetrain_api::{MANAGER, TrainingJob, TrainingJobStatus};
use serde_json::json;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cached_pod::CachedPod;
use crate::decide::{self, Action, JobEvent};
use crate::gang::{self, GangObservation, PodGroupState};
use crate::isolation;
use crate::metrics::Metrics;
use crate::plan::{self, PlanSettings};
use crate::pod_cache::PodCache;
use crate::progress;
use crate::replica::ReplicaId;

/// Everything a reconcile needs, shared by all reconciles.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Operator settings the plan depends on.
    pub settings: PlanSettings,
    /// The one event recorder of this controller.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The operator's pods, filled by the pod watch of [`run`].
    pub pods: PodCache,
    /// The jobs' Services, filled by the Service watch of [`run`]: read to skip applying
    /// a Service that is already as planned. A stale miss costs one no-op apply.
    services: Store<Service>,
    service_writer: Mutex<Option<Writer<Service>>>,
    /// Consecutive failures per job, for per-job exponential backoff.
    failures: Mutex<HashMap<ObjectRef<DeserializeGuard<TrainingJob>>, u32>>,
}

impl Context {
    /// A context for `client`, reporting events as `instance`.
    pub fn new(
        client: Client,
        settings: PlanSettings,
        instance: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.to_string(),
            instance,
        };
        let (services, service_writer) = reflector::store();
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            pods: PodCache::default(),
            services,
            service_writer: Mutex::new(Some(service_writer)),
            failures: Mutex::default(),
        }
    }
}

/// A reconcile step that failed; the variant names the action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pod or Service cache will never be filled: its watch ended (the operator is
    /// stopping).
    #[error("reading the pods and Service of {job}: their watch has ended")]
    ReadCache {
        /// `namespace/name` of the job.
        job: String,
    },
    /// Applying a pod failed.
    #[error("applying pod {name}: {source}")]
    ApplyPod {
        /// Pod name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting a pod failed.
    #[error("deleting pod {name}: {source}")]
    DeletePod {
        /// Pod name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Applying the Service failed.
    #[error("applying service {name}: {source}")]
    ApplyService {
        /// Service name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting the Service failed.
    #[error("deleting service {name}: {source}")]
    DeleteService {
        /// Service name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Creating the job's token Secret failed.
    #[error("creating secret {name}: {source}")]
    CreateTokenSecret {
        /// Secret name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting the job's token Secret failed.
    #[error("deleting secret {name}: {source}")]
    DeleteTokenSecret {
        /// Secret name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Applying the job's NetworkPolicy failed.
    #[error("applying networkpolicy {name}: {source}")]
    ApplyNetworkPolicy {
        /// NetworkPolicy name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting the job's NetworkPolicy failed.
    #[error("deleting networkpolicy {name}: {source}")]
    DeleteNetworkPolicy {
        /// NetworkPolicy name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Reading the job's PodGroup failed.
    #[error("reading podgroup {name}: {source}")]
    GetPodGroup {
        /// PodGroup name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Applying the job's PodGroup failed.
    #[error("applying podgroup {name}: {source}")]
    ApplyPodGroup {
        /// PodGroup name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Writing the job's status failed.
    #[error("patching status of {job}: {source}")]
    PatchStatus {
        /// `namespace/name` of the job.
        job: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting the finished job (TTL) failed.
    #[error("deleting job {job} after its TTL: {source}")]
    DeleteJob {
        /// `namespace/name` of the job.
        job: String,
        /// The API error.
        source: kube::Error,
    },
}

impl Error {
    /// Every value [`Error::kind`] can return. The error counter starts each of them at 0,
    /// so `rate(kubetrain_reconcile_errors_total[..])` is a series of zeros on a healthy
    /// operator instead of "no data", and the first error is a rise, not a new series.
    pub const KINDS: &'static [&'static str] = &[
        "read_cache",
        "apply_pod",
        "delete_pod",
        "apply_service",
        "delete_service",
        "create_token_secret",
        "delete_token_secret",
        "apply_network_policy",
        "delete_network_policy",
        "get_pod_group",
        "apply_pod_group",
        "patch_status",
        "delete_job",
    ];

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::ReadCache { .. } => "read_cache",
            Error::ApplyPod { .. } => "apply_pod",
            Error::DeletePod { .. } => "delete_pod",
            Error::ApplyService { .. } => "apply_service",
            Error::DeleteService { .. } => "delete_service",
            Error::CreateTokenSecret { .. } => "create_token_secret",
            Error::DeleteTokenSecret { .. } => "delete_token_secret",
            Error::ApplyNetworkPolicy { .. } => "apply_network_policy",
            Error::DeleteNetworkPolicy { .. } => "delete_network_policy",
            Error::GetPodGroup { .. } => "get_pod_group",
            Error::ApplyPodGroup { .. } => "apply_pod_group",
            Error::PatchStatus { .. } => "patch_status",
            Error::DeleteJob { .. } => "delete_job",
        }
    }
}

/// Runs the controller until the process is told to stop.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let (jobs, pods, services) = match &namespace {
        Some(ns) => (
            Api::<DeserializeGuard<TrainingJob>>::namespaced(client.clone(), ns),
            Api::<CachedPod>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    // Only our children: the label-scoped watches keep every other pod in the cluster out
    // of the operator's memory.
    let children = watcher::Config::default()
        .labels(LABEL_JOB_NAME)
        .any_semantic();
    // The jobs' own cache, as `Controller::new` builds it, but without managedFields: a
    // decision never reads them, and with thousands of jobs they are much of the memory.
    let (job_store, job_writer) = reflector::store();
    let job_events = watcher(jobs, watcher::Config::default().any_semantic())
        .modify(strip_job)
        .reflect(job_writer)
        .applied_objects();
    let controller = Controller::for_stream(job_events, job_store);
    let known_jobs = controller.store();
    ctx.metrics.start_error_kinds_at_zero(Error::KINDS);
    let metrics = ctx.metrics.clone();
    let forget_deleted = tokio::spawn(async move {
        // Until the first list is in, an empty store is a cache still filling, not a
        // cluster without jobs.
        if known_jobs.wait_until_ready().await.is_err() {
            return;
        }
        let mut every = tokio::time::interval(FORGET_DELETED_JOBS_EVERY);
        loop {
            every.tick().await;
            metrics.forget_deleted_jobs(|namespace, name| {
                known_jobs
                    .get(&ObjectRef::new(name).within(namespace))
                    .is_some()
            });
        }
    });
    // The pod watch fills the pod cache the reconciles read (instead of one LIST each),
    // and confirms the operator's own writes that the cache lags.
    let writer = ctx
        .pods
        .take_writer()
        .expect("controller::run is called once per context");
    let confirming = ctx.clone();
    let pod_events = watcher(pods, children.clone())
        .default_backoff()
        .modify(CachedPod::strip)
        .reflect(writer)
        .inspect(move |event| {
            if let Ok(event) = event {
                confirming.pods.observe(event);
            }
        })
        .touched_objects();
    let service_writer = ctx
        .service_writer
        .lock()
        .expect("service cache lock")
        .take()
        .expect("controller::run is called once per context");
    let service_events = watcher(services, children)
        .default_backoff()
        .modify(strip_service)
        .reflect(service_writer)
        .touched_objects();
    controller
        .owns_stream(pod_events)
        .owns_stream(service_events)
        // Trailing-edge debounce: pods of a job start within moments of each other, and
        // one look after the burst writes one status instead of one per pod. Jobs are
        // not updated continuously, so a second cannot hide an update for long.
        .with_config(
            ControllerConfig::default()
                .concurrency(32)
                .debounce(Duration::from_secs(1)),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((job, _)) => debug!(job = %job, "reconciled"),
                Err(error) => debug!(%error, "reconcile loop"),
            }
        })
        .await;
    forget_deleted.abort();
}

fn strip_job(job: &mut DeserializeGuard<TrainingJob>) {
    job.meta_mut().managed_fields = None;
}

fn strip_service(service: &mut Service) {
    service.metadata.managed_fields = None;
}

/// How often the metrics drop the series of deleted jobs.
const FORGET_DELETED_JOBS_EVERY: Duration = Duration::from_secs(30);

/// One look at one job.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<TrainingJob>>,
    ctx: Arc<Context>,
) -> Result<Requeue, Error> {
    let started = std::time::Instant::now();
    let (namespace, name) = match &guard.0 {
        Ok(job) => (job.namespace().unwrap_or_default(), job.name_any()),
        Err(invalid) => (
            invalid.metadata.namespace.clone().unwrap_or_default(),
            invalid.metadata.name.clone().unwrap_or_default(),
        ),
    };
    // `job`, not `name`: JSON logs already use "name" for the span's own name.
    let span = info_span!("reconcile", namespace = %namespace, job = %name);
    let result = async {
        match &guard.0 {
            Ok(job) => reconcile_job(job, &ctx).await,
            Err(invalid) => report_undecodable(&namespace, &name, &invalid.error, &ctx).await,
        }
    }
    .instrument(span)
    .await;
    ctx.metrics
        .observe_reconcile(started.elapsed(), result.as_ref().err().map(Error::kind));
    if result.is_ok() {
        ctx.failures
            .lock()
            .expect("failure map lock")
            .remove(&ObjectRef::from_obj(guard.as_ref()));
    }
    result
}

/// Per-job exponential backoff: 1 s, 2 s, 4 s ... up to 5 minutes, so one broken job
/// neither spins nor slows the others.
pub fn error_policy(
    guard: Arc<DeserializeGuard<TrainingJob>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Requeue {
    let mut failures = ctx.failures.lock().expect("failure map lock");
    let count = failures
        .entry(ObjectRef::from_obj(guard.as_ref()))
        .or_insert(0);
    *count = count.saturating_add(1);
    let delay = Duration::from_secs(1u64 << (*count - 1).min(8)).min(Duration::from_secs(300));
    warn!(%error, retry_in = ?delay, "reconcile failed");
    Requeue::requeue(delay)
}

async fn reconcile_job(job: &TrainingJob, ctx: &Context) -> Result<Requeue, Error> {
    if job.metadata.deletion_timestamp.is_some() {
        // Owner references hand the children to the garbage collector.
        return Ok(Requeue::await_change());
    }
    let pods = cached_pods(job, ctx).await?;
    let gang = observe_gang(job, ctx).await?;
    let now = Timestamp::now();
    let mut decision = decide::decide_with_gang(job, &pods, &gang, now);
    progress::ask::observe(
        job,
        &mut decision,
        &pods,
        ctx.settings.port,
        progress::MIN_WRITE_INTERVAL,
        now,
    )
    .await;
    ctx.metrics.observe_job(job, &decision.status);
    write_status(job, ctx, &decision.status).await?;
    carry_out(job, ctx, &decision.actions).await?;
    for event in &decision.events {
        publish(ctx, &job.object_ref(&()), event).await;
    }
    Ok(decision
        .requeue_after
        .map_or_else(Requeue::await_change, Requeue::requeue))
}

/// The job's pods from the cache, once the pod and Service watches have listed: until
/// then an empty cache is not a job without pods.
async fn cached_pods(
    job: &TrainingJob,
    ctx: &Context,
) -> Result<Vec<k8s_openapi::api::core::v1::Pod>, Error> {
    let namespace = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let key = || format!("{namespace}/{name}");
    if !ctx.pods.wait_until_ready().await {
        return Err(Error::ReadCache { job: key() });
    }
    let pods = ctx.pods.of_job(&namespace, &name);
    if ctx.services.wait_until_ready().await.is_err() {
        return Err(Error::ReadCache { job: key() });
    }
    Ok(pods)
}

/// Writes the decided status, only when it differs from the one the job has.
async fn write_status(
    job: &TrainingJob,
    ctx: &Context,
    status: &TrainingJobStatus,
) -> Result<(), Error> {
    if *status == job.status.clone().unwrap_or_default() {
        return Ok(());
    }
    let namespace = job.namespace().unwrap_or_default();
    let job_api: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &namespace);
    patch_status(&job_api, &job.name_any(), status)
        .await
        .map_err(|source| Error::PatchStatus {
            job: format!("{namespace}/{}", job.name_any()),
            source,
        })
}

/// Carries out the decided actions in order; the pods to create go last, all at once
/// (`create_pods`).
async fn carry_out(job: &TrainingJob, ctx: &Context, actions: &[Action]) -> Result<(), Error> {
    let namespace = job.namespace().unwrap_or_default();
    let pod_api: Api<CachedPod> = Api::namespaced(ctx.client.clone(), &namespace);
    for action in actions {
        match action {
            Action::CreatePod(_) => {}
            Action::DeletePod { name, uid } => delete_pod(ctx, &pod_api, name, uid).await?,
            Action::EnsureService => ensure_service(job, ctx).await?,
            Action::DeleteService => delete_service(job, ctx).await?,
            Action::DeleteJob => delete_job(job, ctx).await?,
        }
    }
    let creates: Vec<ReplicaId> = actions
        .iter()
        .filter_map(|a| match a {
            Action::CreatePod(replica) => Some(*replica),
            _ => None,
        })
        .collect();
    create_pods(job, &creates, ctx, &pod_api).await
}

/// Deletes one incarnation of a pod (the UID precondition spares a newer one).
async fn delete_pod(
    ctx: &Context,
    pod_api: &Api<CachedPod>,
    name: &str,
    uid: &Option<String>,
) -> Result<(), Error> {
    info!(pod = %name, "deleting pod");
    let params = DeleteParams {
        preconditions: uid.clone().map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    ignore_gone(pod_api.delete(name, &params).await.map(|_| ())).map_err(|source| {
        Error::DeletePod {
            name: name.to_string(),
            source,
        }
    })?;
    if let Some(uid) = uid {
        ctx.pods.deleted(uid);
    }
    Ok(())
}

/// Applies the planned headless Service unless the cached one already matches it.
async fn ensure_service(job: &TrainingJob, ctx: &Context) -> Result<(), Error> {
    let (namespace, name) = (job.namespace().unwrap_or_default(), job.name_any());
    let desired = plan::service(job, &ctx.settings);
    let service_ref = ObjectRef::new(&name).within(&namespace);
    if ctx
        .services
        .get(&service_ref)
        .is_some_and(|s| service_matches(&s, &desired))
    {
        return Ok(());
    }
    let service_api: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    service_api
        .patch(&name, &apply_params(), &Patch::Apply(&desired))
        .await
        .map_err(|source| Error::ApplyService {
            name: name.clone(),
            source,
        })?;
    Ok(())
}

/// Deletes the Service, and with it the job's other pod-lifetime children.
async fn delete_service(job: &TrainingJob, ctx: &Context) -> Result<(), Error> {
    let (namespace, name) = (job.namespace().unwrap_or_default(), job.name_any());
    let service_ref = ObjectRef::new(&name).within(&namespace);
    let existing = ctx.services.get(&service_ref);
    if existing.is_none_or(|s| s.metadata.deletion_timestamp.is_some()) {
        return Ok(());
    }
    let service_api: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    ignore_gone(
        service_api
            .delete(&name, &DeleteParams::default())
            .await
            .map(|_| ()),
    )
    .map_err(|source| Error::DeleteService {
        name: name.clone(),
        source,
    })?;
    remove_isolation(job, ctx).await
}

/// Deletes the job itself: its ttlSecondsAfterFinished has passed.
async fn delete_job(job: &TrainingJob, ctx: &Context) -> Result<(), Error> {
    info!("deleting job: ttlSecondsAfterFinished has passed");
    let namespace = job.namespace().unwrap_or_default();
    let job_api: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &namespace);
    ignore_gone(
        job_api
            .delete(&job.name_any(), &DeleteParams::background())
            .await
            .map(|_| ()),
    )
    .map_err(|source| Error::DeleteJob {
        job: format!("{namespace}/{}", job.name_any()),
        source,
    })
}

/// How many of one job's pods are applied at once.
const PARALLEL_POD_APPLIES: usize = 16;

/// Applies the pods of `replicas` in parallel: a job's pods do not depend on each other,
/// and one after another a 32-pod job waited 32 round trips (kubeflow/trainer#2361 is
/// the same complaint about Kubeflow). Every apply runs to its end, so the pod cache
/// learns of each pod that was created even when another failed.
async fn create_pods(
    job: &TrainingJob,
    replicas: &[ReplicaId],
    ctx: &Context,
    api: &Api<CachedPod>,
) -> Result<(), Error> {
    if replicas.is_empty() {
        return Ok(());
    }
    ensure_isolation(job, ctx).await?;
    let applies = replicas.iter().copied().map(|replica| async move {
        let pod = plan::pod(job, replica, &ctx.settings);
        let name = pod.name_any();
        info!(pod = %name, "creating pod");
        let created = api
            .patch(&name, &apply_params(), &Patch::Apply(&pod))
            .await
            .map_err(|source| Error::ApplyPod { name, source })?;
        ctx.pods.created(created);
        Ok(())
    });
    let results: Vec<Result<(), Error>> = futures::stream::iter(applies)
        .buffer_unordered(PARALLEL_POD_APPLIES)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Before any pod of the job is created: its token Secret exists (a pod that refers to a
/// missing Secret cannot start), and so does its NetworkPolicy. Pods are created rarely
/// (at start, and to replace one), so this costs no request on a steady job.
///
/// The Secret is created, never applied: the operator may `create` and `delete` Secrets
/// but never read one, so an existing Secret (409) is left as it is, and the running
/// pods keep the token they hold.
async fn ensure_isolation(job: &TrainingJob, ctx: &Context) -> Result<(), Error> {
    let namespace = job.namespace().unwrap_or_default();
    if isolation::uses_token(job) {
        let secret = isolation::token_secret(job, &isolation::new_token());
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => info!(secret = %secret.name_any(), "created the job's token secret"),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(source) => {
                return Err(Error::CreateTokenSecret {
                    name: secret.name_any(),
                    source,
                });
            }
        }
    }
    if let Some(policy) = isolation::network_policy(job, &ctx.settings) {
        let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
        api.patch(&policy.name_any(), &apply_params(), &Patch::Apply(&policy))
            .await
            .map_err(|source| Error::ApplyNetworkPolicy {
                name: policy.name_any(),
                source,
            })?;
    }
    Ok(())
}

/// Deletes the job's token Secret and NetworkPolicy once its pods are cleaned up.
async fn remove_isolation(job: &TrainingJob, ctx: &Context) -> Result<(), Error> {
    let namespace = job.namespace().unwrap_or_default();
    let name = job.name_any();
    if isolation::uses_token(job) {
        let secret = kubetrain_api::contract::token_secret_name(&name);
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
        ignore_gone(
            api.delete(&secret, &DeleteParams::default())
                .await
                .map(|_| ()),
        )
        .map_err(|source| Error::DeleteTokenSecret {
            name: secret,
            source,
        })?;
    }
    if ctx.settings.job_network_policy.is_some() {
        let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
        ignore_gone(
            api.delete(&name, &DeleteParams::default())
                .await
                .map(|_| ()),
        )
        .map_err(|source| Error::DeleteNetworkPolicy { name, source })?;
    }
    Ok(())
}

/// Makes sure a gang-scheduled job's PodGroup exists (before any of its pods, so the
/// scheduler never sees a pod without its group) and reads its state.
async fn observe_gang(job: &TrainingJob, ctx: &Context) -> Result<GangObservation, Error> {
    // A finished job needs no gang, except one failed for InvalidSpec that has been fixed:
    // that one starts over.
    let restarting = job.spec.validate().is_ok() && decide::failed_for_invalid_spec(job);
    if !gang::wanted(job) || (decide::is_finished(job) && !restarting) {
        return Ok(GangObservation::Off);
    }
    let Some(scheduler) = ctx.settings.gang_scheduler else {
        return Ok(GangObservation::NotConfigured);
    };
    let name = job.name_any();
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &job.namespace().unwrap_or_default(),
        &scheduler.api_resource(),
    );
    let desired = gang::pod_group(job, scheduler);
    let crd_missing = |status: &kube::core::Status| GangObservation::CrdMissing {
        scheduler,
        detail: format!("{} {}", status.code, status.message),
    };
    // get_opt answers None for a missing object; a path the server does not serve at all
    // (no CRD) comes back as a 404 without a Status body, which kube reports as an error.
    let existing = match api.get_opt(&name).await {
        Ok(existing) => existing,
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(crd_missing(&status)),
        Err(source) => {
            return Err(Error::GetPodGroup {
                name: name.clone(),
                source,
            });
        }
    };
    let group = match existing {
        Some(group) if gang::matches(&group, &desired) => group,
        _ => match api
            .patch(&name, &apply_params(), &Patch::Apply(&desired))
            .await
        {
            Ok(group) => group,
            // Server-side apply creates missing objects, so a 404 means the type itself
            // is not served.
            Err(kube::Error::Api(status)) if status.code == 404 => {
                return Ok(crd_missing(&status));
            }
            Err(source) => return Err(Error::ApplyPodGroup { name, source }),
        },
    };
    Ok(GangObservation::Group(PodGroupState::from_object(
        scheduler, &group,
    )))
}

/// A TrainingJob that does not even decode (a wrong type somewhere the schema could not
/// catch) is failed with InvalidSpec instead of breaking the watch for every other job.
async fn report_undecodable(
    namespace: &str,
    name: &str,
    error: &str,
    ctx: &Context,
) -> Result<Requeue, Error> {
    use kube::api::ApiResource;
    let message = format!("invalid spec: the TrainingJob cannot be read: {error}");
    // By definition this object does not decode as a TrainingJob: read and write it untyped.
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        namespace,
        &ApiResource::erase::<TrainingJob>(&()),
    );
    let current = api.get_status(name).await.ok();
    let already = current
        .as_ref()
        .and_then(|j| j.data.get("status"))
        .and_then(|s| serde_json::from_value::<TrainingJobStatus>(s.clone()).ok())
        .is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == types::FAILED && c.is_true() && c.message == message)
        });
    if already {
        return Ok(Requeue::await_change());
    }
    let mut status = TrainingJobStatus::default();
    status.conditions.push(kubetrain_api::JobCondition {
        type_: types::FAILED.into(),
        status: "True".into(),
        reason: reasons::INVALID_SPEC.into(),
        message: message.clone(),
        last_transition_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::from_second(Timestamp::now().as_second())
                .unwrap_or_else(|_| Timestamp::now()),
        )),
    });
    let body = json!({
        "apiVersion": "kubetrain.io/v1alpha1",
        "kind": "TrainingJob",
        "status": status,
    });
    api.patch_status(name, &apply_params(), &Patch::Apply(&body))
        .await
        .map_err(|source| Error::PatchStatus {
            job: format!("{namespace}/{name}"),
            source,
        })?;
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("kubetrain.io/v1alpha1".into()),
        kind: Some("TrainingJob".into()),
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        uid: current.and_then(|j| j.metadata.uid),
        ..Default::default()
    };
    publish(
        ctx,
        &reference,
        &JobEvent {
            warning: true,
            reason: reasons::INVALID_SPEC,
            action: "Validate",
            note: message,
        },
    )
    .await;
    Ok(Requeue::await_change())
}

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

async fn patch_status(
    api: &Api<TrainingJob>,
    name: &str,
    status: &TrainingJobStatus,
) -> Result<(), kube::Error> {
    let body = json!({
        "apiVersion": "kubetrain.io/v1alpha1",
        "kind": "TrainingJob",
        "status": status,
    });
    api.patch_status(name, &apply_params(), &Patch::Apply(&body))
        .await?;
    Ok(())
}

async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    event: &JobEvent,
) {
    let ev = Event {
        type_: if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: event.reason.to_string(),
        note: Some(event.note.clone()),
        action: event.action.to_string(),
        secondary: None,
    };
    // An event that cannot be recorded must not fail the reconcile that caused it.
    if let Err(error) = ctx.recorder.publish(&ev, reference).await {
        warn!(%error, reason = event.reason, "could not record event");
    }
}

fn ignore_gone(result: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match result {
        // Already gone, or a newer incarnation (UID precondition): nothing to do.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        other => other,
    }
}

/// Whether an existing Service already has everything the plan owns.
fn service_matches(existing: &Service, desired: &Service) -> bool {
    let (Some(e), Some(d)) = (&existing.spec, &desired.spec) else {
        return false;
    };
    let ports = |s: &k8s_openapi::api::core::v1::ServiceSpec| {
        s.ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.port))
            .collect::<Vec<_>>()
    };
    existing.metadata.deletion_timestamp.is_none()
        && e.cluster_ip == d.cluster_ip
        && e.selector == d.selector
        && e.publish_not_ready_addresses == d.publish_not_ready_addresses
        && ports(e) == ports(d)
        && existing.metadata.owner_references == desired.metadata.owner_references
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;

#[cfg(test)]
mod error_kind_tests {
    use super::Error;

    #[test]
    fn every_error_kind_is_listed_once_in_kinds() {
        let api = || kube::Error::TlsRequired;
        let s = String::new;
        let all = [
            Error::ReadCache { job: s() },
            Error::ApplyPod {
                name: s(),
                source: api(),
            },
            Error::DeletePod {
                name: s(),
                source: api(),
            },
            Error::ApplyService {
                name: s(),
                source: api(),
            },
            Error::DeleteService {
                name: s(),
                source: api(),
            },
            Error::CreateTokenSecret {
                name: s(),
                source: api(),
            },
            Error::DeleteTokenSecret {
                name: s(),
                source: api(),
            },
            Error::ApplyNetworkPolicy {
                name: s(),
                source: api(),
            },
            Error::DeleteNetworkPolicy {
                name: s(),
                source: api(),
            },
            Error::GetPodGroup {
                name: s(),
                source: api(),
            },
            Error::ApplyPodGroup {
                name: s(),
                source: api(),
            },
            Error::PatchStatus {
                job: s(),
                source: api(),
            },
            Error::DeleteJob {
                job: s(),
                source: api(),
            },
        ];
        let mut kinds: Vec<&str> = all.iter().map(Error::kind).collect();
        kinds.sort_unstable();
        let mut listed = Error::KINDS.to_vec();
        listed.sort_unstable();
        assert_eq!(kinds, listed);
    }
}
