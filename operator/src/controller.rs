//! The kube-runtime shell around `plan` and `status`: watches, server-side apply, events
//! and requeues. Every decision is made by `decide::decide`; this module only reads the
//! world, asks, and carries the answer out.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DynamicObject, Patch};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action as Requeue, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use kubetrain_api::condition::{reasons, types};
use kubetrain_api::contract::LABEL_JOB_NAME;
use kubetrain_api::{TrainingJob, TrainingJobStatus};
use serde_json::json;
use tracing::{Instrument, debug, info_span, warn};

mod context;
mod error;
mod writes;

pub use context::Context;
pub use error::Error;
use writes::{apply_params, carry_out, patch_status, publish};

use crate::cached_pod::CachedPod;
use crate::decide::{self, JobEvent};
use crate::gang::{self, GangObservation, PodGroupState};
use crate::progress;

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

#[cfg(test)]
mod tests;
