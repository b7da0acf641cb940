//! Every write the controller makes to the API: carrying out `decide`'s actions (pods,
//! the Service, the job's isolation, the job itself), the status, and Events. All
//! server-side apply with the one field manager, where the write is an apply.

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use kubetrain_api::{MANAGER, TrainingJob, TrainingJobStatus};
use serde_json::json;
use tracing::{info, warn};

use super::context::Context;
use super::error::Error;
use crate::cached_pod::CachedPod;
use crate::decide::{Action, JobEvent};
use crate::isolation;
use crate::plan;
use crate::replica::ReplicaId;

/// Carries out the decided actions in order; the pods to create go last, all at once
/// (`create_pods`).
pub(super) async fn carry_out(
    job: &TrainingJob,
    ctx: &Context,
    actions: &[Action],
) -> Result<(), Error> {
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

pub(super) fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

pub(super) async fn patch_status(
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

pub(super) async fn publish(
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
pub(super) fn service_matches(existing: &Service, desired: &Service) -> bool {
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
