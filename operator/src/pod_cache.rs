//! The operator's view of its pods: a reflector cache of the label-scoped pod watch,
//! holding only what the decision reads ([`CachedPod`]), plus the pods the operator itself created or
//! deleted that the watch has not shown yet.
//!
//! Before issue 22 every reconcile LISTed its job's pods; with 5,000 pods in a namespace
//! each such LIST made the API server read them all, so a burst of 1,000 jobs took
//! minutes. The cache answers from memory instead. A cache lags the writes the operator
//! just made, so, as Kubernetes' own Job controller does with its "expectations", the
//! pods it applied or deleted are laid over the cache until the watch delivers them:
//! a reconcile never creates a pod twice, or restarts one twice, because its own last
//! write had not come back yet.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::watcher;
use kubetrain_api::contract::LABEL_JOB_NAME;

use crate::cached_pod::CachedPod;

/// How long an unconfirmed write is laid over the cache. Kubernetes' controllers use
/// the same 5 minutes: long past any watch delay, short enough that a write whose event
/// was lost (a relist in between) cannot hide the truth for long.
pub const PENDING_FOR: Duration = Duration::from_secs(300);

/// The cache of the operator's pods, shared by every reconcile.
pub struct PodCache {
    store: Store<CachedPod>,
    writer: Mutex<Option<Writer<CachedPod>>>,
    pending: Mutex<Pending>,
}

impl Default for PodCache {
    fn default() -> Self {
        let (store, writer) = reflector::store();
        Self {
            store,
            writer: Mutex::new(Some(writer)),
            pending: Mutex::default(),
        }
    }
}

impl PodCache {
    /// The writer the pod watch fills the cache through; there is one, taken once.
    pub fn take_writer(&self) -> Option<Writer<CachedPod>> {
        self.writer.lock().expect("pod cache lock").take()
    }

    /// Waits until the pod watch has listed once; false if it never will (its stream
    /// ended before that).
    pub async fn wait_until_ready(&self) -> bool {
        self.store.wait_until_ready().await.is_ok()
    }

    /// The pods of job `name` in `namespace`, as the cache and the operator's own
    /// unconfirmed writes together say.
    pub fn of_job(&self, namespace: &str, name: &str) -> Vec<Pod> {
        // The pending lock is held across the store read: a watch event reaches the store
        // before it can clear its pending entry, so a pod is in one or the other (or
        // both) and never missed.
        let mut pending = self.pending.lock().expect("pod cache lock");
        pending.expire(Instant::now());
        let cached: Vec<CachedPod> = self
            .store
            .state_filter(|p| {
                p.metadata.namespace.as_deref() == Some(namespace)
                    && p.labels().get(LABEL_JOB_NAME).map(String::as_str) == Some(name)
            })
            .into_iter()
            .map(|p| CachedPod::clone(&p))
            .collect();
        pending
            .overlay(cached, namespace, name, Timestamp::now())
            .iter()
            .map(CachedPod::to_pod)
            .collect()
    }

    /// Records a pod the operator just applied (the API server's answer).
    pub fn created(&self, mut pod: CachedPod) {
        pod.strip();
        let key = reflector::ObjectRef::from_obj(&pod);
        // Applying an unchanged pod produces no watch event: the cache already is right.
        if self
            .store
            .get(&key)
            .is_some_and(|cached| cached.metadata.uid == pod.metadata.uid)
        {
            return;
        }
        self.pending
            .lock()
            .expect("pod cache lock")
            .created(pod, Instant::now());
    }

    /// Records a pod the operator just deleted.
    pub fn deleted(&self, uid: &str) {
        self.pending
            .lock()
            .expect("pod cache lock")
            .deleted(uid, Instant::now());
    }

    /// Confirms pending writes from a pod watch event (after the store has applied it).
    pub fn observe(&self, event: &watcher::Event<CachedPod>) {
        self.pending.lock().expect("pod cache lock").observe(event);
    }
}

/// `(namespace, job name)`.
type JobKey = (String, String);

/// The operator's writes the watch has not confirmed yet. Pure: time comes in.
#[derive(Clone, Debug, Default)]
pub struct Pending {
    /// Applied pods by job, then by pod name, as the API server answered.
    created: HashMap<JobKey, HashMap<String, (CachedPod, Instant)>>,
    /// Deleted pods by UID.
    deleted: HashMap<String, Instant>,
}

impl Pending {
    /// Records an applied pod.
    pub fn created(&mut self, pod: CachedPod, at: Instant) {
        self.created
            .entry(job_key(&pod))
            .or_default()
            .insert(pod.name_any(), (pod, at));
    }

    /// Records a deleted pod's UID.
    pub fn deleted(&mut self, uid: &str, at: Instant) {
        self.deleted.insert(uid.to_string(), at);
    }

    /// How many writes are unconfirmed.
    pub fn len(&self) -> usize {
        self.created.values().map(HashMap::len).sum::<usize>() + self.deleted.len()
    }

    /// Whether every write is confirmed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets writes older than [`PENDING_FOR`].
    pub fn expire(&mut self, now: Instant) {
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < PENDING_FOR;
        for pods in self.created.values_mut() {
            pods.retain(|_, (_, at)| fresh(at));
        }
        self.created.retain(|_, pods| !pods.is_empty());
        self.deleted.retain(|_, at| fresh(at));
    }

    /// Clears what a watch event confirms.
    pub fn observe(&mut self, event: &watcher::Event<CachedPod>) {
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                self.confirm_created(pod);
                if pod.metadata.deletion_timestamp.is_some() {
                    self.confirm_deleted(pod);
                }
            }
            watcher::Event::Delete(pod) => {
                self.confirm_created(pod);
                self.confirm_deleted(pod);
            }
            // A relist: what it lists is at least as new as the writes before it, and a
            // write it misses is only re-applied (server-side apply makes that a no-op).
            watcher::Event::Init => {
                self.created.clear();
                self.deleted.clear();
            }
            watcher::Event::InitDone => {}
        }
    }

    fn confirm_created(&mut self, pod: &CachedPod) {
        let key = job_key(pod);
        let Some(pods) = self.created.get_mut(&key) else {
            return;
        };
        let name = pod.name_any();
        if pods
            .get(&name)
            .is_some_and(|(p, _)| p.metadata.uid == pod.metadata.uid)
        {
            pods.remove(&name);
        }
        if pods.is_empty() {
            self.created.remove(&key);
        }
    }

    fn confirm_deleted(&mut self, pod: &CachedPod) {
        if let Some(uid) = &pod.metadata.uid {
            self.deleted.remove(uid);
        }
    }

    /// The cached pods of one job with the unconfirmed writes laid over them: a deleted
    /// pod is terminating, an applied pod replaces an older incarnation of its name or
    /// fills its gap.
    pub fn overlay(
        &self,
        cached: Vec<CachedPod>,
        namespace: &str,
        job: &str,
        now: Timestamp,
    ) -> Vec<CachedPod> {
        let mut pods: Vec<CachedPod> = cached
            .into_iter()
            .map(|mut pod| {
                let uid = pod.metadata.uid.as_deref().unwrap_or_default();
                if self.deleted.contains_key(uid) && pod.metadata.deletion_timestamp.is_none() {
                    pod.metadata.deletion_timestamp = Some(Time(now));
                }
                pod
            })
            .collect();
        let key = (namespace.to_string(), job.to_string());
        for (name, (created, _)) in self.created.get(&key).into_iter().flatten() {
            match pods.iter_mut().find(|p| p.name_any() == *name) {
                Some(cached) if cached.metadata.uid == created.metadata.uid => {}
                Some(older) => *older = created.clone(),
                None => pods.push(created.clone()),
            }
        }
        pods.sort_by_key(|p| p.name_any());
        pods
    }
}

fn job_key(pod: &CachedPod) -> JobKey {
    (
        pod.namespace().unwrap_or_default(),
        pod.labels()
            .get(LABEL_JOB_NAME)
            .cloned()
            .unwrap_or_default(),
    )
}

#[cfg(test)]
#[path = "pod_cache_tests.rs"]
mod tests;
