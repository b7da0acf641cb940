//! What every reconcile shares: the client, the settings, the event recorder, the metrics
//! and the watches' caches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::core::DeserializeGuard;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kubetrain_api::{MANAGER, TrainingJob};

use crate::metrics::Metrics;
use crate::plan::PlanSettings;
use crate::pod_cache::PodCache;

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
    /// The operator's pods, filled by the pod watch of [`super::run`].
    pub pods: PodCache,
    /// The jobs' Services, filled by the Service watch of [`super::run`]: read to skip applying
    /// a Service that is already as planned. A stale miss costs one no-op apply.
    pub(super) services: Store<Service>,
    pub(super) service_writer: Mutex<Option<Writer<Service>>>,
    /// Consecutive failures per job, for per-job exponential backoff.
    pub(super) failures: Mutex<HashMap<ObjectRef<DeserializeGuard<TrainingJob>>, u32>>,
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
