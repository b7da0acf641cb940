//! A test kubelet: runs the pods of TrainingJobs as local processes and
//! reports their status through the pod `status` subresource, so the operator
//! under test sees pods go Pending → Running → Succeeded/Failed as on a cluster.
//!
//! Everything a pod's process is and does comes from `kubetrain_operator::podsim`, which
//! `kubetrain local` runs its pods through too: the program, argv and env a container
//! starts as ([`launch`]), its own loopback address and contract port, the crash-loop
//! restarts, SIGTERM and the grace period when a pod is deleted, the process groups, and
//! the status written at each step (`podsim::run`). What is this module's own, per pod
//! carrying the `kubetrain.io/job-name` label (the selector is configurable):
//!
//! * **The API.** Pods are watched; every status goes to the `status` subresource.
//! * **Programs.** `argv[0]` is looked up in [`KubeletConfig::commands`], so
//!   `kubetrain-trainer` becomes the workspace-built binary, and a container without
//!   `command` runs the image's entrypoint, the trainer.
//! * **Volumes and Secrets** are read from the API: ConfigMap volumes are written into the
//!   pod's directory, emptyDirs are directories there, hostPaths are themselves.
//! * **Deletion.** A pod that is only *terminating* (`deletionTimestamp` set, which the
//!   API server does for pods with a `nodeName`) is stopped with its grace period and then
//!   deleted with grace period 0, because no real kubelet exists to finish the deletion.
//!   Dropping the [`Kubelet`] kills every pod's process group. Output goes to
//!   `<log_dir>/<namespace>/<pod>.log`, one section per attempt.

use std::collections::HashMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, ResourceExt};
use kubetrain_api::contract;
use kubetrain_operator::podsim;
use kubetrain_operator::podsim::forward::PortForward;
use kubetrain_operator::podsim::launch::{self, Commands, LaunchContext, Program};
use kubetrain_operator::podsim::network::{PodAddress, PodNetwork};
use kubetrain_operator::podsim::pod_status::PodStatusWriter;
use kubetrain_operator::podsim::process_group::LiveGroups;
use kubetrain_operator::podsim::run::{Ended, PodRun, StatusSink, Stop};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{pod_secrets, volumes};

/// The label every pod of a TrainingJob carries (DESIGN.md §2).
pub const JOB_NAME_LABEL: &str = "kubetrain.io/job-name";
/// The trainer's command name, substituted by [`KubeletConfig::trainer`].
pub const TRAINER_COMMAND: &str = "kubetrain-trainer";

/// What can go wrong running a pod. Failures are also reported in the pod's
/// status; these values end up in the kubelet's tracing output.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("reporting status of pod {pod}: {source}")]
    PatchStatus {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("pod {pod}: env {var}: {message}")]
    EnvSecret {
        pod: String,
        var: String,
        message: String,
    },
    #[error("pod {pod}: volume {volume}: {message}")]
    MountVolume {
        pod: String,
        volume: String,
        message: String,
    },
    #[error("deleting terminating pod {pod}: {source}")]
    DeletePod {
        pod: String,
        #[source]
        source: kube::Error,
    },
}

/// How the test kubelet runs pods.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// Namespace to watch; `None` watches all namespaces.
    pub namespace: Option<String>,
    /// Label selector for the pods to run.
    pub label_selector: String,
    /// `argv[0]` substitutions, and the program for containers without `command` (the
    /// image's entrypoint).
    pub commands: Commands,
    /// Where `<namespace>/<pod>.log` files go; also each pod's working
    /// directory lives under it (`<namespace>/<pod>.d`).
    pub log_dir: PathBuf,
    /// First restart delay; doubles per restart up to `max_restart_backoff`.
    /// Real kubelets start at 10 s; tests want quick restarts.
    pub restart_backoff: Duration,
    pub max_restart_backoff: Duration,
    /// Reported as `status.hostIP`.
    pub host_ip: Ipv4Addr,
    /// The pods' contract port: mapped to a host port of each pod's own, and forwarded
    /// from `podIP:<this port>` (see `kubetrain_operator::podsim`).
    pub contract_port: u16,
}

impl KubeletConfig {
    /// Runs pods labelled `kubetrain.io/job-name` in `namespace`, logging to
    /// `log_dir`.
    pub fn new(namespace: impl Into<String>, log_dir: impl Into<PathBuf>) -> Self {
        Self {
            namespace: Some(namespace.into()),
            label_selector: JOB_NAME_LABEL.to_string(),
            commands: Commands::default(),
            log_dir: log_dir.into(),
            restart_backoff: Duration::from_millis(200),
            max_restart_backoff: Duration::from_secs(5),
            host_ip: Ipv4Addr::LOCALHOST,
            contract_port: contract::DEFAULT_PORT,
        }
    }

    /// Runs `kubetrain-trainer` (and containers without a command) as `path`,
    /// normally the workspace-built trainer binary.
    pub fn trainer(mut self, path: impl Into<PathBuf>) -> Self {
        let trainer = Program::new(path);
        self.commands
            .by_name
            .insert(TRAINER_COMMAND.to_string(), trainer.clone());
        self.commands.default = Some(trainer);
        self
    }

    /// Runs command `name` as `path`.
    pub fn command(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.commands
            .by_name
            .insert(name.into(), Program::new(path));
        self
    }

    /// Runs pods matching `selector` instead of every TrainingJob pod.
    pub fn label_selector(mut self, selector: impl Into<String>) -> Self {
        self.label_selector = selector.into();
        self
    }
}

#[derive(Debug)]
struct PodHandle {
    uid: String,
    stop: Option<oneshot::Sender<Stop>>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    config: KubeletConfig,
    network: Mutex<PodNetwork>,
    /// Live process groups, so `Drop` can kill them synchronously.
    groups: Arc<LiveGroups>,
}

/// A running test kubelet. Dropping it kills every pod process.
#[derive(Debug)]
pub struct Kubelet {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Kubelet {
    /// Starts watching pods and running them. Must be called inside a tokio
    /// runtime; the kubelet lives on that runtime.
    pub fn start(client: Client, config: KubeletConfig) -> Self {
        let shared = Arc::new(Shared {
            network: Mutex::new(PodNetwork::new(config.contract_port)),
            config,
            groups: Arc::default(),
        });
        let task = tokio::spawn(dispatch(client, shared.clone()));
        Self { shared, task }
    }

    /// The directory holding `<namespace>/<pod>.log`.
    pub fn log_dir(&self) -> &Path {
        &self.shared.config.log_dir
    }

    /// Path of a pod's log file (all attempts, stdout and stderr).
    pub fn log_path(&self, namespace: &str, pod: &str) -> PathBuf {
        log_path(&self.shared.config.log_dir, namespace, pod)
    }

    /// A pod's captured output so far (empty if it never ran).
    pub fn logs(&self, namespace: &str, pod: &str) -> String {
        fs::read_to_string(self.log_path(namespace, pod)).unwrap_or_default()
    }

    /// The loopback address given to `<hostname>.<subdomain>` in `namespace`
    /// (allocating it if nobody asked before).
    pub fn pod_ip(&self, namespace: &str, subdomain: &str, hostname: &str) -> Ipv4Addr {
        self.pod_address(namespace, subdomain, hostname).ip
    }

    /// The address and mapped contract port of `<hostname>.<subdomain>` in `namespace`.
    pub fn pod_address(&self, namespace: &str, subdomain: &str, hostname: &str) -> PodAddress {
        self.shared
            .network
            .lock()
            .expect("pod network lock")
            .address(&(
                namespace.to_string(),
                subdomain.to_string(),
                hostname.to_string(),
            ))
    }

    /// Stops the kubelet and kills all pod processes.
    pub async fn shutdown(self) {
        // Drop does the work synchronously; nothing to await beyond the abort.
        drop(self);
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
        // The aborted tasks kill their children when the runtime drops them, but
        // that may happen later (or never, if the runtime is leaked): kill the
        // process groups now.
        self.shared.groups.kill_all();
    }
}

async fn dispatch(client: Client, shared: Arc<Shared>) {
    let api: Api<Pod> = match &shared.config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let cfg = watcher::Config::default().labels(&shared.config.label_selector);
    let mut events = std::pin::pin!(watcher(api, cfg).default_backoff());
    let mut pods: HashMap<(String, String), PodHandle> = HashMap::new();
    // Keys seen since the last (re)list, to notice deletions missed while the
    // watch was down.
    let mut relisted: Option<Vec<(String, String)>> = None;

    // Dropping `pods` (on abort) drops the stop senders; each pod task then
    // kills its process and ends.
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => relisted = Some(Vec::new()),
            Ok(Event::InitApply(pod)) => {
                if let Some(seen) = relisted.as_mut() {
                    seen.push(pod_key(&pod));
                }
                on_apply(&client, &shared, &mut pods, pod);
            }
            Ok(Event::InitDone) => {
                if let Some(seen) = relisted.take() {
                    let gone: Vec<_> = pods.keys().filter(|k| !seen.contains(k)).cloned().collect();
                    for key in gone {
                        stop_pod(&mut pods, &key, Stop::Deleted);
                    }
                }
            }
            Ok(Event::Apply(pod)) => on_apply(&client, &shared, &mut pods, pod),
            Ok(Event::Delete(pod)) => {
                let key = pod_key(&pod);
                if pods
                    .get(&key)
                    .is_some_and(|h| Some(&h.uid) == pod.metadata.uid.as_ref())
                {
                    stop_pod(&mut pods, &key, Stop::Deleted);
                }
            }
            Err(err) => tracing::warn!(%err, "test kubelet: pod watch error (retrying)"),
        }
        // Forget finished pods whose objects are gone, so the map stays small.
        pods.retain(|_, h| !(h.task.is_finished() && h.stop.is_none()));
    }
}

fn pod_key(pod: &Pod) -> (String, String) {
    (pod.namespace().unwrap_or_default(), pod.name_any())
}

fn stop_pod(pods: &mut HashMap<(String, String), PodHandle>, key: &(String, String), why: Stop) {
    if let Some(handle) = pods.get_mut(key)
        && let Some(tx) = handle.stop.take()
    {
        let _ = tx.send(why);
    }
}

fn on_apply(
    client: &Client,
    shared: &Arc<Shared>,
    pods: &mut HashMap<(String, String), PodHandle>,
    pod: Pod,
) {
    let key = pod_key(&pod);
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let terminating = pod.metadata.deletion_timestamp.is_some();

    if let Some(handle) = pods.get(&key) {
        if handle.uid == uid {
            if terminating {
                stop_pod(pods, &key, Stop::Terminating);
            }
            return;
        }
        // Same name, new object: the old one was deleted and recreated.
        stop_pod(pods, &key, Stop::Deleted);
        pods.remove(&key);
    }

    let api: Api<Pod> = Api::namespaced(client.clone(), &key.0);
    if terminating {
        // Terminating before we ever ran it: only the deletion needs finishing.
        let name = key.1.clone();
        tokio::spawn(async move {
            if let Err(err) = force_delete(&api, &name, &uid).await {
                tracing::warn!(%err, "test kubelet");
            }
        });
        return;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return;
    }

    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(run_pod(api, shared.clone(), pod, rx));
    pods.insert(
        key,
        PodHandle {
            uid,
            stop: Some(tx),
            task,
        },
    );
}

/// Deletes a terminating pod for good, if it is still the same object.
async fn force_delete(api: &Api<Pod>, name: &str, uid: &str) -> Result<(), KubeletError> {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(()),
        // Already gone, or replaced by a new object with the same name.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(source) => Err(KubeletError::DeletePod {
            pod: name.to_string(),
            source,
        }),
    }
}

/// The pod's status, as a kubelet writes it: JSON merge patches on the `status`
/// subresource (lists are replaced whole, and every status carries the complete
/// `conditions` and `containerStatuses`).
struct PatchStatus {
    api: Api<Pod>,
    name: String,
    namespace: String,
}

impl StatusSink for PatchStatus {
    type Error = KubeletError;

    async fn report(&mut self, status: PodStatus) -> Result<(), KubeletError> {
        let body = serde_json::json!({ "status": status });
        self.api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .map(|_| ())
            .map_err(|source| KubeletError::PatchStatus {
                pod: format!("{}/{}", self.namespace, self.name),
                source,
            })
    }
}

async fn run_pod(api: Api<Pod>, shared: Arc<Shared>, pod: Pod, mut stop: oneshot::Receiver<Stop>) {
    let name = pod.name_any();
    let ns = pod.namespace().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let config = &shared.config;
    let address = shared
        .network
        .lock()
        .expect("pod network lock")
        .address(&launch::dns_key(&pod));
    let mut writer = PodStatusWriter::new(&pod, address.ip, config.host_ip);
    let mut sink = PatchStatus {
        api: api.clone(),
        name: name.clone(),
        namespace: ns.clone(),
    };

    let log = log_path(&config.log_dir, &ns, &name);
    let mounted = match volumes::mount(&api, &pod, &log.with_extension("d")).await {
        Ok(mounts) => pod_secrets::read(&api, &pod)
            .await
            .map(|secrets| (mounts, secrets)),
        Err(err) => Err(err),
    };
    let prepared = mounted
        .map_err(|e| e.to_string())
        .and_then(|(mounts, secrets)| {
            let mut network = shared.network.lock().expect("pod network lock");
            let mut ctx = LaunchContext {
                pod_ip: address.ip,
                host_ip: config.host_ip,
                network: &mut network,
                mounts: &mounts,
                secrets: &secrets,
                commands: &config.commands,
                termination_log: log.with_extension("termination-log"),
                unset: &[],
            };
            launch::prepare(&pod, &mut ctx).map_err(|e| e.to_string())
        });
    // Whoever dials podIP:<contract port>, as the operator does for progress, reaches
    // the program on its mapped port. Held for the pod's life.
    let _forward = match PortForward::start(
        SocketAddr::from((address.ip, config.contract_port)),
        SocketAddr::from((address.ip, address.port)),
    )
    .await
    {
        Ok(forward) => Some(forward),
        Err(err) => {
            tracing::warn!(%err, pod = %name, "test kubelet: contract port not forwarded");
            None
        }
    };
    let launch = match prepared {
        Ok(l) => l,
        Err(message) => {
            tracing::warn!(%message, "test kubelet: cannot start pod");
            if let Err(err) = sink.report(writer.config_error(&message)).await {
                tracing::warn!(%err, "test kubelet");
            }
            return;
        }
    };

    let run = PodRun {
        uid: uid.clone(),
        restart_policy: pod.spec.as_ref().and_then(|s| s.restart_policy.clone()),
        log,
        restart_backoff: config.restart_backoff,
        max_restart_backoff: config.max_restart_backoff,
        echo: None,
        groups: shared.groups.clone(),
    };
    match podsim::run::run(&launch, &run, &mut writer, &mut sink, &mut stop).await {
        Ended::Finished | Ended::Stopped(Stop::Deleted) => {}
        // No real kubelet exists to finish the deletion.
        Ended::Stopped(Stop::Terminating) => {
            if let Err(err) = force_delete(&api, &name, &uid).await {
                tracing::warn!(%err, "test kubelet");
            }
        }
        // Most likely the pod is gone; the process is already killed.
        Ended::ReportFailed(err) => tracing::debug!(%err, "test kubelet: giving up on pod"),
    }
}

fn log_path(dir: &Path, namespace: &str, pod: &str) -> PathBuf {
    dir.join(namespace).join(format!("{pod}.log"))
}
