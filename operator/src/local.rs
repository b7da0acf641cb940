//! `kubetrain local -f job.yaml`: the same TrainingJob, run as local processes.
//!
//! This is a thin shell, like the controller: `plan` makes the pods, `decide::decide`
//! decides everything, and the kubelet's part (start the container, restart it in place,
//! stop it with its grace period, write its status) is [`crate::podsim::run`], the same
//! loop the test kubelet runs pods through; only here the status stays in memory instead
//! of going to an API server. Addresses, names and mounts come from [`crate::podsim`] too:
//! each pod gets its own loopback address and a host port for its contract port, so
//! programs that bind `0.0.0.0:<port>` (TensorFlow's servers) work, and each runs in a
//! working directory of its own that survives its restarts, as a container's does.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, PodStatus, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kubetrain_api::condition::types;
use kubetrain_api::contract::{self, Role};
use kubetrain_api::{TrainingJob, TrainingJobStatus};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::decide::{self, Action};
use crate::isolation;
use crate::plan::{self, PlanSettings};
use crate::podsim;
use crate::podsim::forward::PortForward;
use crate::podsim::launch::{self, Commands, LaunchContext, Program};
use crate::podsim::network::PodNetwork;
use crate::podsim::paths::PathMap;
use crate::podsim::pod_status::{PodStatusWriter, whole_seconds};
use crate::podsim::process_group::LiveGroups;
use crate::podsim::run::{PodRun, StatusSink, Stop};
use crate::progress;
use crate::replica::{self, ReplicaId};

mod view;
use view::{View, report};

/// `kubetrain local` options.
#[derive(clap::Args, Debug, Clone)]
pub struct LocalArgs {
    /// The TrainingJob manifest to run.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Print the final TrainingJob, status included, as the operator would have written it.
    #[arg(short = 'o', long = "output", value_enum)]
    pub output: Option<OutputFormat>,
    /// Stream one process's log, for example `worker-0` or `ps-1`.
    #[arg(long, value_name = "ROLE-INDEX")]
    pub follow: Option<String>,
    /// Where run directories (logs, by default checkpoints) are created.
    #[arg(long, default_value = ".kubetrain-runs")]
    pub run_dir: PathBuf,
    /// The trainer executable; by default `kubetrain-trainer` next to this binary, else
    /// this binary's own built-in trainer.
    #[arg(long, env = "KUBETRAIN_TRAINER_BIN")]
    pub trainer_bin: Option<PathBuf>,
    /// Plain periodic lines instead of progress bars (the default when not on a terminal).
    #[arg(long)]
    pub no_progress_bars: bool,
    /// Mount a host directory at a container path, as `HOST_DIR:CONTAINER_PATH` (for
    /// example `examples/tensorflow:/opt/train`, where the cluster mounts a ConfigMap).
    /// Command lines and env values that name the container path name the directory
    /// instead. Repeat for more mounts.
    #[arg(short = 'v', long = "volume", value_name = "HOST_DIR:CONTAINER_PATH", value_parser = parse_volume)]
    pub volumes: Vec<(PathBuf, String)>,
}

fn parse_volume(text: &str) -> Result<(PathBuf, String), String> {
    let (host, container) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not HOST_DIR:CONTAINER_PATH"))?;
    if !container.starts_with('/') {
        return Err(format!(
            "the container path {container:?} must be absolute, as a volumeMount's mountPath is"
        ));
    }
    let host = std::fs::canonicalize(host).map_err(|e| format!("host directory {host:?}: {e}"))?;
    Ok((host, container.to_string()))
}

/// Output formats of `-o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// The final TrainingJob as YAML.
    Yaml,
}

/// Entry point of the subcommand; the exit code is 0 only when the job succeeded.
pub async fn main(args: LocalArgs) -> ExitCode {
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("kubetrain local: {error}");
            ExitCode::from(2)
        }
    }
}

/// Why a local run could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The manifest file could not be read.
    #[error("reading {path}: {source}")]
    ReadManifest {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The manifest is not a TrainingJob.
    #[error("{path} is not a valid TrainingJob: {source}")]
    ParseManifest {
        /// The file.
        path: PathBuf,
        /// The YAML error, with line and column.
        source: serde_yaml::Error,
    },
    /// The spec breaks a rule; the same text the operator puts in the InvalidSpec condition.
    #[error("{0}")]
    InvalidSpec(String),
    /// The run directory could not be created.
    #[error("creating run directory {path}: {source}")]
    CreateRunDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `--follow` names no replica of the job.
    #[error("--follow {0}: the job has no such replica; use ROLE-INDEX, for example worker-0")]
    UnknownFollow(String),
}

/// Reads a manifest and checks it exactly as the operator would.
pub fn load_job(path: &Path) -> Result<TrainingJob, LocalError> {
    let text = std::fs::read_to_string(path).map_err(|source| LocalError::ReadManifest {
        path: path.to_path_buf(),
        source,
    })?;
    let mut job: TrainingJob =
        serde_yaml::from_str(&text).map_err(|source| LocalError::ParseManifest {
            path: path.to_path_buf(),
            source,
        })?;
    // A cluster's API server prunes fields it does not know and kubectl warns; here a
    // misspelt field would silently become its default.
    let written: serde_json::Value =
        serde_yaml::from_str(&text).map_err(|source| LocalError::ParseManifest {
            path: path.to_path_buf(),
            source,
        })?;
    let understood = serde_json::to_value(&job).expect("a TrainingJob always serialises");
    let unknown = kubetrain_api::unknown_fields::unknown_fields(&written, &understood, "");
    if !unknown.is_empty() {
        let fields: Vec<String> = unknown
            .iter()
            .map(|f| format!("{f}: unknown field; remove it or correct its spelling"))
            .collect();
        return Err(LocalError::InvalidSpec(format!(
            "invalid spec: {}",
            fields.join("; ")
        )));
    }
    if let Err(invalid) = job.spec.validate() {
        // Same words as the operator's InvalidSpec condition message.
        return Err(LocalError::InvalidSpec(format!("invalid spec: {invalid}")));
    }
    job.metadata
        .namespace
        .get_or_insert_with(|| "local".to_string());
    job.metadata.uid.get_or_insert_with(|| "local".to_string());
    job.metadata.generation.get_or_insert(1);
    job.metadata.creation_timestamp = Some(Time(whole_seconds(Timestamp::now())));
    Ok(job)
}

/// How the "image" runs: `kubetrain-trainer` next to this binary, else this binary's own
/// built-in trainer.
fn trainer_program(explicit: Option<PathBuf>) -> Program {
    if let Some(program) = explicit {
        return Program::new(program);
    }
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("kubetrain"));
    let sibling = me.with_file_name(TRAINER_COMMAND);
    if sibling.is_file() {
        return Program::new(sibling);
    }
    // `cargo run -p kubetrain-operator` builds only this binary: it carries the trainer.
    Program {
        path: me,
        leading_args: vec!["trainer".to_string()],
    }
}

/// The trainer's command name in the pods the operator plans.
const TRAINER_COMMAND: &str = "kubetrain-trainer";

/// One pod, played by a local process through [`podsim::run`], as the test kubelet plays
/// it; its status lives here instead of in an API server.
struct LocalPod {
    pod: Pod,
    status: watch::Receiver<PodStatus>,
    stop: Option<oneshot::Sender<Stop>>,
    task: JoinHandle<()>,
    /// `podIP:<contract port>` forwarded to the mapped port, as in the test kubelet.
    _forward: Option<PortForward>,
}

impl LocalPod {
    /// The pod as `decide` reads it from a cluster: spec and the latest status.
    fn observed(&self) -> Pod {
        Pod {
            status: Some(self.status.borrow().clone()),
            ..self.pod.clone()
        }
    }

    fn container_running(&self) -> bool {
        let status = self.status.borrow();
        status
            .container_statuses
            .iter()
            .flatten()
            .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
    }

    /// Stops the pod as a kubelet does: SIGTERM, then SIGKILL once the pod's
    /// `terminationGracePeriodSeconds` has passed. The trainer needs the grace: a PS
    /// writes its final checkpoint, a worker ends its step.
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Stop::Terminating);
        }
        let _ = (&mut self.task).await;
    }
}

/// The in-memory status of a local pod.
struct InMemory(watch::Sender<PodStatus>);

impl StatusSink for InMemory {
    type Error = Infallible;

    async fn report(&mut self, status: PodStatus) -> Result<(), Infallible> {
        self.0.send_replace(status);
        Ok(())
    }
}

/// How often the chief is asked for progress: no API write is at stake here, so more often
/// than the operator's [`progress::MIN_WRITE_INTERVAL`], for a live view.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

async fn run(args: LocalArgs) -> Result<bool, LocalError> {
    let mut job = load_job(&args.file)?;
    let name = job.name_any();
    let run_dir = create_run_dir(&args.run_dir, &name)?;
    // Curves for every local run: TensorBoard events in the run directory unless the job
    // names its own folder.
    if let Some(training) = job.spec.training.as_mut() {
        training
            .log_dir
            .get_or_insert_with(|| run_dir.display().to_string());
    }
    let follow = match &args.follow {
        Some(f) => Some(parse_follow(&job, f)?),
        None => None,
    };
    let mut cluster = LocalCluster::new(&job, &args, run_dir.clone(), follow);
    let view = View::new(&job, !args.no_progress_bars && follow.is_none());
    view.line(format!(
        "kubetrain local: running {name} ({} ps, {} workers); logs in {}",
        replica::replicas(&job, Role::Ps),
        replica::replicas(&job, Role::Worker),
        run_dir.display()
    ));

    let started = Instant::now();
    let mut signals = Signals::new();
    let mut interrupted = false;
    loop {
        let observed_pods: Vec<Pod> = cluster.pods.values().map(LocalPod::observed).collect();
        let now = Timestamp::now();
        let mut decision = decide::decide(&job, &observed_pods, now);
        // Progress as the operator reads it: the chief's Progress service at its pod IP,
        // then its termination message; its stdout is for people only.
        let port = cluster.settings.port;
        progress::ask::observe(
            &job,
            &mut decision,
            &observed_pods,
            port,
            PROGRESS_EVERY,
            now,
        )
        .await;
        job.status = Some(decision.status);
        for event in &decision.events {
            let kind = if event.warning { "Warning" } else { "Normal" };
            view.line(format!("{kind} {}: {}", event.reason, event.note));
        }
        for action in decision.actions {
            cluster.carry_out(action, &job).await;
        }

        view.render(&job, |role| cluster.running(role));
        let finished = job
            .status
            .as_ref()
            .is_some_and(TrainingJobStatus::is_finished);
        if finished && !cluster.any_process() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            signal = signals.next() => {
                view.line(format!("kubetrain local: {signal}: stopping every process"));
                interrupted = true;
                break;
            }
        }
    }
    cluster.stop_all().await;
    view.finish();

    let succeeded = !interrupted && job.status.as_ref().is_some_and(|s| s.is(types::SUCCEEDED));
    let report = report(&job, started.elapsed(), &run_dir);
    eprintln!("{report}");
    if args.output == Some(OutputFormat::Yaml) {
        print!(
            "{}",
            serde_yaml::to_string(&job).expect("a TrainingJob always serialises")
        );
    }
    Ok(succeeded)
}

/// `<base>/<job>-<time>`, absolute: pods run in directories of their own, so every path
/// handed to them must be.
fn create_run_dir(base: &Path, name: &str) -> Result<PathBuf, LocalError> {
    let stamp = Timestamp::now().strftime("%Y%m%d-%H%M%S").to_string();
    let run_dir = base.join(format!("{name}-{stamp}"));
    let failed = |source| LocalError::CreateRunDir {
        path: run_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&run_dir).map_err(failed)?;
    std::fs::canonicalize(&run_dir).map_err(failed)
}

/// The cluster's part for one job: its pods, and what the API server, DNS and kubelets
/// would give them.
struct LocalCluster {
    settings: PlanSettings,
    world: World,
    run_dir: PathBuf,
    /// The replica whose output is copied to stderr.
    follow: Option<ReplicaId>,
    pods: BTreeMap<ReplicaId, LocalPod>,
}

impl LocalCluster {
    fn new(
        job: &TrainingJob,
        args: &LocalArgs,
        run_dir: PathBuf,
        follow: Option<ReplicaId>,
    ) -> Self {
        let settings = PlanSettings::default();
        let program = trainer_program(args.trainer_bin.clone());
        let mut world = World {
            network: PodNetwork::new(settings.port),
            mounts: PathMap::default(),
            // As the operator creates it before the first pod.
            secrets: isolation::uses_token(job)
                .then(|| isolation::token_secret(job, &isolation::new_token()))
                .into_iter()
                .collect(),
            commands: Commands {
                by_name: [(TRAINER_COMMAND.to_string(), program.clone())].into(),
                default: Some(program),
            },
            groups: Arc::default(),
        };
        for (host, container) in &args.volumes {
            world.mounts.mount(container.clone(), host.clone());
        }
        Self {
            settings,
            world,
            run_dir,
            follow,
            pods: BTreeMap::new(),
        }
    }

    async fn carry_out(&mut self, action: Action, job: &TrainingJob) {
        match action {
            Action::CreatePod(replica) => {
                let pod = plan::pod(job, replica, &self.settings);
                let echo = (self.follow == Some(replica))
                    .then(|| format!("[{}-{}] ", replica.role, replica.index));
                let local = start_pod(pod, &mut self.world, &self.run_dir, echo).await;
                self.pods.insert(replica, local);
            }
            Action::DeletePod { name, .. } => {
                let replica = self
                    .pods
                    .iter()
                    .find(|(_, p)| p.pod.name_any() == name)
                    .map(|(r, _)| *r);
                if let Some(mut local) = replica.and_then(|r| self.pods.remove(&r)) {
                    local.stop().await;
                }
            }
            // No Service and no API object: names are mapped to loopback instead.
            Action::EnsureService | Action::DeleteService | Action::DeleteJob => {}
        }
    }

    /// How many pods of `role` have their container running.
    fn running(&self, role: Role) -> usize {
        self.pods
            .iter()
            .filter(|(r, p)| r.role == role && p.container_running())
            .count()
    }

    /// Whether any pod's process (or its restart) is still under way.
    fn any_process(&self) -> bool {
        self.pods.values().any(|p| !p.task.is_finished())
    }

    /// All at once, as a kubelet stops the pods of a deleted job: each gets its grace
    /// period side by side, not one after another.
    async fn stop_all(&mut self) {
        futures::future::join_all(self.pods.values_mut().map(LocalPod::stop)).await;
    }
}

fn parse_follow(job: &TrainingJob, text: &str) -> Result<ReplicaId, LocalError> {
    let unknown = || LocalError::UnknownFollow(text.to_string());
    let (role, index) = text.rsplit_once('-').ok_or_else(unknown)?;
    let replica = ReplicaId {
        role: role.parse().map_err(|_| unknown())?,
        index: index.parse().map_err(|_| unknown())?,
    };
    if replica::replica_ids(job).contains(&replica) {
        Ok(replica)
    } else {
        Err(unknown())
    }
}

/// What the local "cluster" gives every pod: addresses, mounts, Secrets and programs.
struct World {
    network: PodNetwork,
    mounts: PathMap,
    /// The job's Secrets (its token), for env `secretKeyRef`s.
    secrets: Vec<Secret>,
    commands: Commands,
    groups: Arc<LiveGroups>,
}

/// What the API server and the scheduler would have done: a uid, a creation time, an IP.
fn set_pending(pod: &mut Pod, ip: Ipv4Addr) {
    pod.metadata.uid = Some(format!(
        "{}-{}",
        pod.name_any(),
        Timestamp::now().as_nanosecond()
    ));
    pod.metadata.creation_timestamp = Some(Time(whole_seconds(Timestamp::now())));
    pod.status = Some(PodStatus {
        phase: Some("Pending".into()),
        pod_ip: Some(ip.to_string()),
        ..PodStatus::default()
    });
}

/// The kubelet's part for a new pod: an address, the process, its restarts and status.
async fn start_pod(
    mut pod: Pod,
    world: &mut World,
    run_dir: &Path,
    echo: Option<String>,
) -> LocalPod {
    let address = world.network.address(&launch::dns_key(&pod));
    set_pending(&mut pod, address.ip);
    let contract_port = world.network.contract_port();
    let forward = PortForward::start(
        SocketAddr::from((address.ip, contract_port)),
        SocketAddr::from((address.ip, address.port)),
    )
    .await
    .ok();
    let log = run_dir.join(format!("{}.log", pod.name_any()));
    let prepared = launch::prepare(
        &pod,
        &mut LaunchContext {
            pod_ip: address.ip,
            host_ip: Ipv4Addr::LOCALHOST,
            network: &mut world.network,
            mounts: &world.mounts,
            secrets: &world.secrets,
            commands: &world.commands,
            termination_log: log.with_extension("termination-log"),
            // Every local trainer shares this machine's ports with whatever else runs
            // here (a Prometheus on 9090, say), and nothing scrapes them.
            unset: &[contract::ENV_METRICS_PORT],
        },
    );
    let run = PodRun {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        restart_policy: pod.spec.as_ref().and_then(|s| s.restart_policy.clone()),
        log,
        // The kubelet's crash-loop backoff, shortened for a laptop: 1 s, 2 s, 4 s ... 10 s.
        restart_backoff: Duration::from_secs(1),
        max_restart_backoff: Duration::from_secs(10),
        echo,
        groups: world.groups.clone(),
    };
    let (status, status_rx) = watch::channel(pod.status.clone().unwrap_or_default());
    let mut sink = InMemory(status);
    let mut writer = PodStatusWriter::new(&pod, address.ip, Ipv4Addr::LOCALHOST);
    let (stop, mut stop_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let _ = match prepared {
            // As on a cluster: the pod stays Pending with CreateContainerConfigError, and
            // `decide` fails the job with the message.
            Err(err) => sink.report(writer.config_error(&err.to_string())).await,
            Ok(launch) => {
                podsim::run::run(&launch, &run, &mut writer, &mut sink, &mut stop_rx).await;
                Ok(())
            }
        };
    });
    LocalPod {
        pod,
        status: status_rx,
        stop: Some(stop),
        task,
        _forward: forward,
    }
}

/// SIGINT and SIGTERM as one stream. Both handlers are installed once, up front: a
/// handler made afresh on each wait (as `tokio::signal::ctrl_c()` is) misses a signal
/// that arrives while the loop is busy between waits, and the runner then never stops.
struct Signals {
    interrupt: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            interrupt: signal(SignalKind::interrupt()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
        }
    }

    async fn next(&mut self) -> &'static str {
        async fn recv(s: Option<&mut tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            _ = recv(self.interrupt.as_mut()) => "interrupted",
            _ = recv(self.terminate.as_mut()) => "terminated",
        }
    }
}
