//! A test kubelet: runs the pods of TrainingJobs as local processes and
//! reports their status through the pod `status` subresource, so the operator
//! under test sees pods go Pending → Running → Succeeded/Failed as on a cluster.
//!
//! What it does, per pod carrying the `kubetrain.io/job-name` label (the
//! selector is configurable):
//!
//! * **Program.** The main container is the one named `trainer`, else the
//!   first. Its `command` + `args` run as a local process; the image is ignored.
//!   `argv[0]` is looked up in [`KubeletConfig::commands`] (full string, then
//!   file name), so `kubetrain-trainer` becomes the workspace-built binary; a
//!   container without `command` runs [`KubeletConfig::default_command`] (the
//!   image's entrypoint, i.e. the trainer).
//! * **Addresses and names** come from `kubetrain_operator::podsim`, which
//!   `kubetrain local` uses too. Every pod gets its own loopback address,
//!   reported as `status.podIP` and passed as `POD_IP`, and a host port of its
//!   own for the contract port, so a program that binds `0.0.0.0:<port>` (as
//!   TensorFlow's servers do) never collides with another pod. Pod DNS names in
//!   env values become those addresses, `:2222` after a name the mapped port;
//!   `podIP:2222` is forwarded to the mapped port for whoever dials it (the
//!   operator's progress client). An address is fixed at first sight of its
//!   name, so a pod may start before the peers it names exist.
//! * **Volumes.** ConfigMap volumes are written from the API into the pod's
//!   directory, emptyDirs are directories there, hostPaths are themselves; the
//!   main container's mount paths in argv and env point at them.
//! * **Restarts.** `restartPolicy` is followed like a kubelet: `Always`
//!   restarts on any exit, `OnFailure` on a non-zero exit, `Never` never;
//!   restarts happen in place after an exponential backoff, with
//!   `restartCount` incremented and the previous run in `lastState`.
//! * **Deletion.** A deleted pod's process group is killed. A pod that is only
//!   *terminating* (`deletionTimestamp` set, which the API server does for pods
//!   with a `nodeName`) gets SIGTERM, then SIGKILL after its
//!   `terminationGracePeriodSeconds` (30 by default) as from a real kubelet, and is then
//!   deleted with grace period 0, because no real kubelet exists to finish the deletion.
//! * **Cleanup.** Each pod process runs in its own process group (so `sh -c`
//!   grandchildren die with it) guarded by a [`Watchdog`]; dropping the
//!   [`Kubelet`] kills every group. Output (stdout and stderr) goes to
//!   `<log_dir>/<namespace>/<pod>.log`, one section per attempt.
//!
//! Supported `valueFrom`: `fieldRef` for `metadata.name`, `metadata.namespace`,
//! `metadata.uid`, `metadata.labels['k']`, `metadata.annotations['k']`,
//! `spec.nodeName`, `spec.serviceAccountName`, `status.podIP`, `status.hostIP`.
//! Anything else fails the pod with reason `CreateContainerConfigError`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateWaiting, ContainerStatus,
    HostIP, Pod, PodCondition, PodIP, PodStatus, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, ResourceExt};
use kubetrain_api::contract;
use kubetrain_operator::podsim;
use kubetrain_operator::podsim::container::{self, Exit};
use kubetrain_operator::podsim::forward::PortForward;
use kubetrain_operator::podsim::network::{DnsContext, DnsKey, PodAddress, PodNetwork};
use kubetrain_operator::podsim::paths::PathMap;
use kubetrain_operator::podsim::termination;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::process::{Target, Watchdog};
use crate::{pod_secrets, volumes};

/// The label every pod of a TrainingJob carries (DESIGN.md §2).
pub const JOB_NAME_LABEL: &str = "kubetrain.io/job-name";
/// The trainer's command name, substituted by [`KubeletConfig::trainer`].
pub const TRAINER_COMMAND: &str = "kubetrain-trainer";
/// Environment passed through from the test process: enough to find programs
/// and get useful diagnostics, nothing that would make pods depend on the host.
const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "RUST_BACKTRACE",
    "RUST_LOG",
    "LLVM_PROFILE_FILE",
];

/// What can go wrong running a pod. Failures are also reported in the pod's
/// status; these values end up in the kubelet's tracing output.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("pod {pod} has no containers")]
    NoContainer { pod: String },
    #[error(
        "container {container} of pod {pod} has no command and no default command is configured"
    )]
    NoCommand { pod: String, container: String },
    #[error("env var {var} of pod {pod}: {what} is not supported by the test kubelet")]
    UnsupportedEnvSource {
        pod: String,
        var: String,
        what: String,
    },
    #[error("creating log file {}: {source}", path.display())]
    LogFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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
    /// `argv[0]` substitutions: command name (or file name) → local program.
    pub commands: HashMap<String, PathBuf>,
    /// Program for containers without `command` (the image's entrypoint).
    pub default_command: Option<PathBuf>,
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
            commands: HashMap::new(),
            default_command: None,
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
        let path = path.into();
        self.commands
            .insert(TRAINER_COMMAND.to_string(), path.clone());
        self.default_command = Some(path);
        self
    }

    /// Runs command `name` as `path`.
    pub fn command(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.commands.insert(name.into(), path.into());
        self
    }

    /// Runs pods matching `selector` instead of every TrainingJob pod.
    pub fn label_selector(mut self, selector: impl Into<String>) -> Self {
        self.label_selector = selector.into();
        self
    }
}

/// Why a pod's process is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The pod is gone from the API.
    Deleted,
    /// The pod has a deletionTimestamp: kill, then finish the deletion.
    Terminating,
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
    /// Live process groups by pod key, so `Drop` can kill them synchronously.
    groups: Mutex<HashMap<(String, String), u32>>,
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
            groups: Mutex::new(HashMap::new()),
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
        let groups: Vec<u32> = self
            .shared
            .groups
            .lock()
            .map(|g| g.values().copied().collect())
            .unwrap_or_default();
        for pgid in groups {
            Target::Group(pgid).kill_now();
        }
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

/// Everything needed to start the main container.
#[derive(Debug, Clone)]
struct Launch {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The host file standing in for the container's `terminationMessagePath`.
    termination_log: PathBuf,
    /// The pod's `terminationGracePeriodSeconds`: how long a deleted pod's process has
    /// between SIGTERM and SIGKILL, as with a real kubelet.
    grace: Duration,
}

async fn run_pod(api: Api<Pod>, shared: Arc<Shared>, pod: Pod, mut stop: oneshot::Receiver<Stop>) {
    let name = pod.name_any();
    let ns = pod.namespace().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let restart_policy = pod.spec.as_ref().and_then(|s| s.restart_policy.clone());
    let config = &shared.config;
    let address = shared
        .network
        .lock()
        .expect("pod network lock")
        .address(&own_dns_key(&pod));
    let pod_ip = address.ip;
    let mut reporter = StatusReporter::new(api.clone(), &pod, pod_ip, config.host_ip);

    let log = log_path(&config.log_dir, &ns, &name);
    let workdir = log.with_extension("d");
    let mounted = match volumes::mount(&api, &pod, &workdir).await {
        Ok(mounts) => pod_secrets::read(&api, &pod)
            .await
            .map(|secrets| (mounts, secrets)),
        Err(err) => Err(err),
    };
    let launch = mounted.and_then(|(mounts, secrets)| {
        let mut network = shared.network.lock().expect("pod network lock");
        prepare_launch(&pod, config, pod_ip, &mut network, &mounts, &secrets)
    });
    // Whoever dials podIP:<contract port>, as the operator does for progress, reaches
    // the program on its mapped port. Held for the pod's life.
    let _forward = match PortForward::start(
        SocketAddr::from((pod_ip, config.contract_port)),
        SocketAddr::from((pod_ip, address.port)),
    )
    .await
    {
        Ok(forward) => Some(forward),
        Err(err) => {
            tracing::warn!(%err, pod = %name, "test kubelet: contract port not forwarded");
            None
        }
    };
    let launch = match launch {
        Ok(l) => l,
        Err(err) => {
            tracing::warn!(%err, "test kubelet: cannot start pod");
            if let Err(err) = reporter.config_error(&err.to_string()).await {
                tracing::warn!(%err, "test kubelet");
            }
            return;
        }
    };

    let mut restarts: i32 = 0;
    loop {
        let outcome = run_once(
            &shared,
            &launch,
            &log,
            &workdir,
            restarts,
            &uid,
            &mut reporter,
            &mut stop,
        )
        .await;
        let exit = match outcome {
            RunOutcome::Exited(exit) => exit,
            RunOutcome::Stopped(why) => {
                if why == Stop::Terminating
                    && let Err(err) = force_delete(&api, &name, &uid).await
                {
                    tracing::warn!(%err, "test kubelet");
                }
                return;
            }
            RunOutcome::ReportFailed(err) => {
                // Most likely the pod is gone; the process is already killed.
                tracing::debug!(%err, "test kubelet: giving up on pod");
                return;
            }
        };
        if !container::restarts(restart_policy.as_deref(), exit.exit_code) {
            if let Err(err) = reporter.finished(&exit, restarts).await {
                tracing::debug!(%err, "test kubelet: final status not written");
            }
            return;
        }
        restarts += 1;
        if let Err(err) = reporter.back_off(&exit, restarts).await {
            tracing::debug!(%err, "test kubelet: giving up on pod");
            return;
        }
        // The backoff is the restart policy itself, not synchronisation; a stop
        // request cuts it short.
        tokio::select! {
            () = tokio::time::sleep(container::backoff(
                u32::try_from(restarts).unwrap_or(u32::MAX),
                config.restart_backoff,
                config.max_restart_backoff,
            )) => {}
            why = &mut stop => {
                let why = why.unwrap_or(Stop::Deleted);
                if why == Stop::Terminating
                    && let Err(err) = force_delete(&api, &name, &uid).await
                {
                    tracing::warn!(%err, "test kubelet");
                }
                return;
            }
        }
    }
}

enum RunOutcome {
    Exited(Exit),
    Stopped(Stop),
    ReportFailed(KubeletError),
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename these
async fn run_once(
    shared: &Shared,
    launch: &Launch,
    log: &Path,
    workdir: &Path,
    attempt: i32,
    uid: &str,
    reporter: &mut StatusReporter,
    stop: &mut oneshot::Receiver<Stop>,
) -> RunOutcome {
    let started_at = Timestamp::now();
    // Every container start gets an empty termination-message file, as with a real kubelet.
    termination::clear(&launch.termination_log);
    let spawned = spawn_process(launch, log, workdir, attempt, uid);
    let (mut child, pgid, watchdog) = match spawned {
        Ok(x) => x,
        Err(message) => {
            // Like a container runtime's StartError: counts as a failed run.
            return RunOutcome::Exited(Exit {
                exit_code: 128,
                signal: None,
                reason: "StartError",
                message: Some(message),
                started_at,
                finished_at: Timestamp::now(),
                container_id: String::new(),
            });
        }
    };
    let key = (reporter.namespace.clone(), reporter.name.clone());
    shared
        .groups
        .lock()
        .expect("groups lock")
        .insert(key.clone(), pgid);
    // Kills the group on every path out of this function, including a panic or
    // the task being aborted.
    let group = GroupGuard {
        pgid,
        watchdog: Some(watchdog),
        shared,
        key,
    };
    let container_id = format!("kubetrain-local://{pgid}");

    if let Err(err) = reporter.running(started_at, &container_id, attempt).await {
        drop(group);
        let _ = child.wait().await;
        return RunOutcome::ReportFailed(err);
    }

    let status: io::Result<ExitStatus> = tokio::select! {
        status = child.wait() => status,
        why = stop => {
            let why = why.unwrap_or(Stop::Deleted);
            if why == Stop::Terminating {
                // A deleted pod's program hears SIGTERM and has its grace period to stop
                // (a PS writes its final checkpoint); the group is killed after that.
                Target::Group(pgid).terminate();
                let _ = tokio::time::timeout(launch.grace, child.wait()).await;
            }
            drop(group);
            let _ = child.wait().await;
            return RunOutcome::Stopped(why);
        }
    };
    // The main process is gone; anything it left in its group goes too, as
    // when a container's cgroup is torn down.
    drop(group);
    let message = termination::read(&launch.termination_log);
    let exit = Exit::of(status, message, started_at, Timestamp::now());
    RunOutcome::Exited(Exit {
        container_id,
        ..exit
    })
}

struct GroupGuard<'a> {
    pgid: u32,
    watchdog: Option<Watchdog>,
    shared: &'a Shared,
    key: (String, String),
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.watchdog.take() {
            w.disarm();
        }
        Target::Group(self.pgid).kill_now();
        if let Ok(mut groups) = self.shared.groups.lock()
            && groups.get(&self.key) == Some(&self.pgid)
        {
            groups.remove(&self.key);
        }
    }
}

fn spawn_process(
    launch: &Launch,
    log: &Path,
    workdir: &Path,
    attempt: i32,
    uid: &str,
) -> Result<(tokio::process::Child, u32, Watchdog), String> {
    if let Some(parent) = log.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    fs::create_dir_all(workdir).map_err(|e| format!("creating {}: {e}", workdir.display()))?;
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("opening {}: {e}", log.display()))?;
    let _ = writeln!(
        file,
        "=== attempt {attempt} (pod uid {uid}): {} {}",
        launch.program.display(),
        launch.args.join(" ")
    );
    let err = file
        .try_clone()
        .map_err(|e| format!("opening {}: {e}", log.display()))?;

    let mut cmd = tokio::process::Command::new(&launch.program);
    cmd.args(&launch.args)
        .env_clear()
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    for var in INHERITED_ENV {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    for (k, v) in &launch.env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", launch.program.display()))?;
    let pgid = child.id().ok_or("process exited before its PID was read")?;
    let watchdog = match Watchdog::spawn(&[Target::Group(pgid)], None) {
        Ok(w) => w,
        Err(e) => {
            Target::Group(pgid).kill_now();
            return Err(format!("spawning watchdog: {e}"));
        }
    };
    Ok((child, pgid, watchdog))
}

fn log_path(dir: &Path, namespace: &str, pod: &str) -> PathBuf {
    dir.join(namespace).join(format!("{pod}.log"))
}

fn own_dns_key(pod: &Pod) -> DnsKey {
    let spec = pod.spec.as_ref();
    (
        pod.namespace().unwrap_or_default(),
        spec.and_then(|s| s.subdomain.clone()).unwrap_or_default(),
        spec.and_then(|s| s.hostname.clone())
            .unwrap_or_else(|| pod.name_any()),
    )
}

fn main_container(pod: &Pod) -> Option<&Container> {
    let containers = &pod.spec.as_ref()?.containers;
    containers
        .iter()
        .find(|c| c.name == "trainer")
        .or_else(|| containers.first())
}

fn prepare_launch(
    pod: &Pod,
    config: &KubeletConfig,
    pod_ip: Ipv4Addr,
    network: &mut PodNetwork,
    mounts: &PathMap,
    secrets: &[Secret],
) -> Result<Launch, KubeletError> {
    let pod_name = pod.name_any();
    let container = main_container(pod).ok_or_else(|| KubeletError::NoContainer {
        pod: pod_name.clone(),
    })?;
    let command = container.command.clone().unwrap_or_default();
    let mut args = container.args.clone().unwrap_or_default();
    let program = match command.split_first() {
        Some((argv0, rest)) => {
            args.splice(0..0, rest.iter().cloned());
            substitute(&mounts.apply(argv0), &config.commands)
        }
        None => config
            .default_command
            .clone()
            .ok_or_else(|| KubeletError::NoCommand {
                pod: pod_name.clone(),
                container: container.name.clone(),
            })?,
    };

    let args = args.iter().map(|a| mounts.apply(a)).collect();
    let (ns, subdomain, hostname) = own_dns_key(pod);
    // A process cannot have a file mounted at the container's termination-message path, so
    // a host file stands in for it, and env values naming that path name the file instead.
    let in_container = container
        .termination_message_path
        .clone()
        .unwrap_or_else(|| contract::DEFAULT_TERMINATION_MESSAGE_PATH.to_string());
    let termination_log =
        log_path(&config.log_dir, &ns, &pod_name).with_extension("termination-log");
    let ctx = DnsContext {
        namespace: &ns,
        subdomain: (!subdomain.is_empty()).then_some(subdomain.as_str()),
    };
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => mounts.apply(&network.rewrite(v, &ctx)),
            (None, None) => String::new(),
            (None, Some(source)) => match (&source.field_ref, &source.secret_key_ref) {
                (Some(field), _) => field_value(pod, &field.field_path, pod_ip, config.host_ip)
                    .ok_or_else(|| KubeletError::UnsupportedEnvSource {
                        pod: pod_name.clone(),
                        var: var.name.clone(),
                        what: format!("fieldRef {}", field.field_path),
                    })?,
                (None, Some(selector)) => secrets
                    .iter()
                    .filter(|s| s.metadata.name.as_deref() == Some(selector.name.as_str()))
                    .find_map(|s| podsim::secrets::value(s, selector))
                    .ok_or_else(|| KubeletError::EnvSecret {
                        pod: pod_name.clone(),
                        var: var.name.clone(),
                        message: podsim::secrets::missing(selector),
                    })?,
                (None, None) => {
                    return Err(KubeletError::UnsupportedEnvSource {
                        pod: pod_name.clone(),
                        var: var.name.clone(),
                        what: "valueFrom other than fieldRef".to_string(),
                    });
                }
            },
        };
        let value = if value == in_container {
            termination_log.display().to_string()
        } else {
            value
        };
        env.push((var.name.clone(), value));
    }
    // Downward-API conventions the trainer relies on to bind its own address.
    for (k, v) in [("POD_IP", pod_ip.to_string()), ("HOSTNAME", hostname)] {
        if !env.iter().any(|(name, _)| name == k) {
            env.push((k.to_string(), v));
        }
    }
    // A real kubelet's default.
    let grace = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    Ok(Launch {
        program,
        args,
        env,
        termination_log,
        grace: Duration::from_secs(u64::try_from(grace).unwrap_or(0)),
    })
}

fn substitute(argv0: &str, commands: &HashMap<String, PathBuf>) -> PathBuf {
    if let Some(p) = commands.get(argv0) {
        return p.clone();
    }
    let file_name = Path::new(argv0)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or(argv0);
    commands
        .get(file_name)
        .cloned()
        .unwrap_or_else(|| PathBuf::from(argv0))
}

fn field_value(pod: &Pod, path: &str, pod_ip: Ipv4Addr, host_ip: Ipv4Addr) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.as_ref()?.get(key).cloned().unwrap_or_default())
    };
    Some(match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => pod_ip.to_string(),
        "status.hostIP" => host_ip.to_string(),
        _ => keyed("metadata.labels['", &meta.labels)
            .or_else(|| keyed("metadata.annotations['", &meta.annotations))?,
    })
}

/// Writes pod status the way a kubelet would, via JSON merge patches on the
/// `status` subresource (lists are replaced whole, so every patch carries the
/// complete `conditions` and `containerStatuses`).
struct StatusReporter {
    api: Api<Pod>,
    name: String,
    namespace: String,
    container: String,
    image: String,
    pod_ip: Ipv4Addr,
    host_ip: Ipv4Addr,
    start_time: Option<Timestamp>,
    last_state: Option<ContainerState>,
}

impl StatusReporter {
    fn new(api: Api<Pod>, pod: &Pod, pod_ip: Ipv4Addr, host_ip: Ipv4Addr) -> Self {
        let container = main_container(pod);
        Self {
            api,
            name: pod.name_any(),
            namespace: pod.namespace().unwrap_or_default(),
            container: container.map(|c| c.name.clone()).unwrap_or_default(),
            image: container.and_then(|c| c.image.clone()).unwrap_or_default(),
            pod_ip,
            host_ip,
            start_time: pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0),
            last_state: None,
        }
    }

    async fn running(
        &mut self,
        started_at: Timestamp,
        container_id: &str,
        restarts: i32,
    ) -> Result<(), KubeletError> {
        let state = ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(started_at)),
            }),
            ..ContainerState::default()
        };
        let status = self.status("Running", true, state, container_id, restarts, None);
        self.patch(status).await
    }

    async fn back_off(&mut self, exit: &Exit, restarts: i32) -> Result<(), KubeletError> {
        let terminated = exit.terminated_state();
        let waiting = ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("CrashLoopBackOff".to_string()),
                message: Some(format!(
                    "back-off restarting failed container {}",
                    self.container
                )),
            }),
            ..ContainerState::default()
        };
        self.last_state = Some(terminated);
        let status = self.status(
            "Running",
            false,
            waiting,
            &exit.container_id,
            restarts,
            None,
        );
        self.patch(status).await
    }

    async fn finished(&mut self, exit: &Exit, restarts: i32) -> Result<(), KubeletError> {
        let phase = if exit.exit_code == 0 {
            "Succeeded"
        } else {
            "Failed"
        };
        let status = self.status(
            phase,
            false,
            exit.terminated_state(),
            &exit.container_id,
            restarts,
            None,
        );
        self.patch(status).await
    }

    async fn config_error(&mut self, message: &str) -> Result<(), KubeletError> {
        let waiting = ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("CreateContainerConfigError".to_string()),
                message: Some(message.to_string()),
            }),
            ..ContainerState::default()
        };
        let status = self.status("Pending", false, waiting, "", 0, Some(message));
        self.patch(status).await
    }

    fn status(
        &mut self,
        phase: &str,
        ready: bool,
        state: ContainerState,
        container_id: &str,
        restarts: i32,
        message: Option<&str>,
    ) -> PodStatus {
        let now = Time(Timestamp::now());
        let start = *self.start_time.get_or_insert_with(Timestamp::now);
        let condition = |type_: &str, status: bool, reason: Option<&str>| PodCondition {
            type_: type_.to_string(),
            status: if status { "True" } else { "False" }.to_string(),
            reason: reason.map(str::to_string),
            last_transition_time: Some(now.clone()),
            ..PodCondition::default()
        };
        let not_ready_reason = match phase {
            "Succeeded" | "Failed" => Some("PodCompleted"),
            _ if ready => None,
            _ => Some("ContainersNotReady"),
        };
        let started = state.running.is_some();
        PodStatus {
            phase: Some(phase.to_string()),
            message: message.map(str::to_string),
            pod_ip: Some(self.pod_ip.to_string()),
            pod_ips: Some(vec![PodIP {
                ip: self.pod_ip.to_string(),
            }]),
            host_ip: Some(self.host_ip.to_string()),
            host_ips: Some(vec![HostIP {
                ip: self.host_ip.to_string(),
            }]),
            start_time: Some(Time(start)),
            conditions: Some(vec![
                condition("PodScheduled", true, None),
                condition("Initialized", true, None),
                condition("ContainersReady", ready, not_ready_reason),
                condition("Ready", ready, not_ready_reason),
            ]),
            container_statuses: Some(vec![ContainerStatus {
                name: self.container.clone(),
                image: self.image.clone(),
                image_id: String::new(),
                container_id: (!container_id.is_empty()).then(|| container_id.to_string()),
                ready,
                started: Some(started),
                restart_count: restarts,
                state: Some(state),
                last_state: self.last_state.clone(),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        }
    }

    async fn patch(&self, status: PodStatus) -> Result<(), KubeletError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_by_name_or_file_name() {
        let commands: HashMap<String, PathBuf> = [(
            TRAINER_COMMAND.to_string(),
            PathBuf::from("/build/kubetrain-trainer"),
        )]
        .into();
        assert_eq!(
            substitute("/usr/local/bin/kubetrain-trainer", &commands),
            PathBuf::from("/build/kubetrain-trainer")
        );
        assert_eq!(substitute("sh", &commands), PathBuf::from("sh"));
    }
}
