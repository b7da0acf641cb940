//! `kubetrain local -f job.yaml`: the same TrainingJob, run as local processes.
//!
//! This is a thin shell, like the controller: `plan` makes the pods, `decide::decide`
//! decides everything, and this module plays the parts a cluster would (the kubelet that
//! runs containers and restarts them in place, DNS that maps pod names to addresses).
//! Addresses, names and mounts come from [`crate::podsim`], as in the test kubelet: each
//! pod gets its own loopback address and a host port for its contract port, so programs
//! that bind `0.0.0.0:<port>` (TensorFlow's servers) work too, and each runs in a working
//! directory of its own that survives its restarts, as a container's does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStatus, EnvVarSource, Pod, PodCondition,
    PodStatus, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kubetrain_api::condition::types;
use kubetrain_api::contract::{self, Role};
use kubetrain_api::{TrainingJob, TrainingJobStatus};
use kubetrain_trainer::tensorboard;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::curves;
use crate::decide::{self, Action};
use crate::isolation;
use crate::plan::{self, PlanSettings};
use crate::podsim::container::{self, Exit};
use crate::podsim::forward::PortForward;
use crate::podsim::network::{DnsContext, DnsKey, PodAddress, PodNetwork};
use crate::podsim::paths::PathMap;
use crate::podsim::secrets;
use crate::podsim::termination;
use crate::progress;
use crate::replica::{self, ReplicaId};

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
    /// A process could not be started.
    #[error("starting {program} for pod {pod}: {source}")]
    SpawnProcess {
        /// The program.
        program: String,
        /// The pod.
        pod: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An env value of a pod could not be resolved.
    #[error("pod {pod}: env {var}: {reason}")]
    ResolveEnv {
        /// The pod.
        pod: String,
        /// The env variable.
        var: String,
        /// Why.
        reason: String,
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

fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// How the "image" is run: the program and the arguments that come before the pod's own.
#[derive(Clone, Debug)]
struct TrainerProgram {
    program: PathBuf,
    leading_args: Vec<String>,
}

fn trainer_program(explicit: Option<PathBuf>) -> TrainerProgram {
    if let Some(program) = explicit {
        return TrainerProgram {
            program,
            leading_args: Vec::new(),
        };
    }
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("kubetrain"));
    let sibling = me.with_file_name("kubetrain-trainer");
    if sibling.is_file() {
        return TrainerProgram {
            program: sibling,
            leading_args: Vec::new(),
        };
    }
    // `cargo run -p kubetrain-operator` builds only this binary: it carries the trainer.
    TrainerProgram {
        program: me,
        leading_args: vec!["trainer".to_string()],
    }
}

/// One pod, played by a local process.
struct LocalPod {
    pod: Pod,
    address: PodAddress,
    /// `podIP:<contract port>` forwarded to the mapped port, as in the test kubelet.
    _forward: Option<PortForward>,
    child: Option<Child>,
    /// When the running child started.
    started_at: Timestamp,
    restarts: i32,
    /// The last run's end, for `lastState` (or `state`, once the pod is done).
    last: Option<Exit>,
    restart_at: Option<Instant>,
    log_path: PathBuf,
}

impl LocalPod {
    /// Stands in for the container's `terminationMessagePath`: no file is mounted there
    /// for a local process, so its last words go next to its log.
    fn termination_log(&self) -> PathBuf {
        self.log_path.with_extension("termination-log")
    }
}

/// How often the chief is asked for progress: no API write is at stake here, so more often
/// than the operator's [`progress::MIN_WRITE_INTERVAL`], for a live view.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

async fn run(args: LocalArgs) -> Result<bool, LocalError> {
    let mut job = load_job(&args.file)?;
    let name = job.name_any();
    let stamp = Timestamp::now().strftime("%Y%m%d-%H%M%S").to_string();
    let run_dir = args.run_dir.join(format!("{name}-{stamp}"));
    std::fs::create_dir_all(&run_dir).map_err(|source| LocalError::CreateRunDir {
        path: run_dir.clone(),
        source,
    })?;
    // Pods run in directories of their own, so every path handed to them is absolute.
    let run_dir = std::fs::canonicalize(&run_dir).map_err(|source| LocalError::CreateRunDir {
        path: run_dir.clone(),
        source,
    })?;
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

    let settings = PlanSettings::default();
    let program = trainer_program(args.trainer_bin.clone());
    let mut world = World {
        network: PodNetwork::new(settings.port),
        mounts: PathMap::default(),
        // As the operator creates it before the first pod.
        secrets: isolation::uses_token(&job)
            .then(|| isolation::token_secret(&job, &isolation::new_token()))
            .into_iter()
            .collect(),
    };
    for (host, container) in &args.volumes {
        world.mounts.mount(container.clone(), host.clone());
    }
    let view = View::new(&job, !args.no_progress_bars && follow.is_none());
    view.line(format!(
        "kubetrain local: running {name} ({} ps, {} workers); logs in {}",
        replica::replicas(&job, Role::Ps),
        replica::replicas(&job, Role::Worker),
        run_dir.display()
    ));

    let started = Instant::now();
    let mut pods: BTreeMap<ReplicaId, LocalPod> = BTreeMap::new();
    let mut signals = Signals::new();
    let mut interrupted = false;

    loop {
        // The kubelet's part: notice exits, restart in place as the pod's policy says.
        for local in pods.values_mut() {
            kubelet_step(local, &program, follow, &mut world).await?;
        }

        let observed_pods: Vec<Pod> = pods.values().map(|p| p.pod.clone()).collect();
        let now = Timestamp::now();
        let mut decision = decide::decide(&job, &observed_pods, now);
        // Progress as the operator reads it: the chief's Progress service at its pod IP,
        // then its termination message; its stdout is for people only.
        progress::ask::observe(
            &job,
            &mut decision,
            &observed_pods,
            settings.port,
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
            match action {
                Action::CreatePod(replica) => {
                    let pod = plan::pod(&job, replica, &settings);
                    let log_path = run_dir.join(format!("{}.log", pod.name_any()));
                    let address = world.network.address(&own_dns_key(&pod));
                    let forward = PortForward::start(
                        SocketAddr::from((address.ip, settings.port)),
                        SocketAddr::from((address.ip, address.port)),
                    )
                    .await
                    .ok();
                    let mut local = LocalPod {
                        pod,
                        address,
                        _forward: forward,
                        child: None,
                        started_at: Timestamp::now(),
                        restarts: 0,
                        last: None,
                        restart_at: Some(Instant::now()),
                        log_path,
                    };
                    set_pending(&mut local.pod, &local.address.ip.to_string());
                    pods.insert(replica, local);
                }
                Action::DeletePod { name: pod_name, .. } => {
                    if let Some((replica, _)) =
                        pods.iter().find(|(_, p)| p.pod.name_any() == pod_name)
                    {
                        let replica = *replica;
                        if let Some(mut local) = pods.remove(&replica) {
                            stop(&mut local).await;
                        }
                    }
                }
                // No Service and no API object: names are mapped to loopback instead.
                Action::EnsureService | Action::DeleteService | Action::DeleteJob => {}
            }
        }

        view.render(&job, &pods);
        let finished = job
            .status
            .as_ref()
            .is_some_and(TrainingJobStatus::is_finished);
        let running = pods.values().any(|p| p.child.is_some());
        if finished && !running {
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

    // All at once, as a kubelet stops the pods of a deleted job: each gets its grace
    // period side by side, not one after another.
    futures::future::join_all(pods.values_mut().map(stop)).await;
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

/// What the local "cluster" gives every pod: addresses and mounts.
struct World {
    network: PodNetwork,
    mounts: PathMap,
    /// The job's Secrets (its token), for env `secretKeyRef`s.
    secrets: Vec<Secret>,
}

/// The pod's DNS identity: namespace, subdomain (the job's Service), hostname.
fn own_dns_key(pod: &Pod) -> DnsKey {
    let spec = pod.spec.as_ref();
    (
        pod.namespace().unwrap_or_default(),
        spec.and_then(|s| s.subdomain.clone()).unwrap_or_default(),
        spec.and_then(|s| s.hostname.clone())
            .unwrap_or_else(|| pod.name_any()),
    )
}

fn set_pending(pod: &mut Pod, ip: &str) {
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

/// The kubelet's part for one pod: notice an exit, restart in place as the pod's restart
/// policy says (after the crash-loop backoff), and keep its container status current.
async fn kubelet_step(
    local: &mut LocalPod,
    program: &TrainerProgram,
    follow: Option<ReplicaId>,
    world: &mut World,
) -> Result<(), LocalError> {
    if let Some(child) = local.child.as_mut()
        && let Ok(Some(status)) = child.try_wait()
    {
        local.child = None;
        let message = termination::read(&local.termination_log());
        // Whole seconds, as an API server keeps them.
        let (started, now) = (
            whole_seconds(local.started_at),
            whole_seconds(Timestamp::now()),
        );
        let exit = Exit::of(Ok(status), message, started, now);
        let policy = local
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone());
        if container::restarts(policy.as_deref(), exit.exit_code) {
            local.restarts += 1;
            // The kubelet's crash-loop backoff, shortened for a laptop: 1 s, 2 s, 4 s ... 10 s.
            let delay = container::backoff(
                u32::try_from(local.restarts).unwrap_or(u32::MAX),
                Duration::from_secs(1),
                Duration::from_secs(10),
            );
            local.restart_at = Some(Instant::now() + delay);
            local.last = Some(exit);
            set_container(local, "Running", false, None);
            waiting_crash_loop(&mut local.pod);
        } else {
            let phase = if exit.exit_code == 0 {
                "Succeeded"
            } else {
                "Failed"
            };
            let last = local.last.take();
            set_container(local, phase, false, Some(&exit));
            local.last = last;
        }
    }

    if local.child.is_none()
        && let Some(at) = local.restart_at
        && Instant::now() >= at
    {
        local.restart_at = None;
        let replica = ReplicaId::from_pod(&local.pod).expect("planned pods carry replica labels");
        let child = spawn(local, program, follow == Some(replica), world).await?;
        local.child = Some(child);
        local.started_at = Timestamp::now();
        set_container(local, "Running", true, None);
    }
    Ok(())
}

/// Writes the pod's phase, readiness and main container status: running, or terminated
/// with `exit`; the previous run as `lastState` while it runs again.
fn set_container(local: &mut LocalPod, phase: &str, ready: bool, exit: Option<&Exit>) {
    let pod = &mut local.pod;
    let name = pod
        .spec
        .as_ref()
        .map(|s| {
            s.containers[plan::main_container_index(&s.containers)]
                .name
                .clone()
        })
        .unwrap_or_default();
    let now = Time(whole_seconds(Timestamp::now()));
    let status = pod.status.get_or_insert_with(PodStatus::default);
    status.phase = Some(phase.into());
    status.start_time.get_or_insert_with(|| now.clone());
    status.conditions = Some(vec![PodCondition {
        type_: "Ready".into(),
        status: if ready { "True" } else { "False" }.into(),
        ..PodCondition::default()
    }]);
    let state = match exit {
        Some(exit) => exit.terminated_state(),
        None => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(whole_seconds(local.started_at))),
            }),
            ..ContainerState::default()
        },
    };
    status.container_statuses = Some(vec![ContainerStatus {
        name,
        ready,
        restart_count: local.restarts,
        state: Some(state),
        last_state: local
            .last
            .as_ref()
            .filter(|_| exit.is_none())
            .map(Exit::terminated_state),
        ..ContainerStatus::default()
    }]);
}

fn waiting_crash_loop(pod: &mut Pod) {
    if let Some(cs) = pod
        .status
        .as_mut()
        .and_then(|s| s.container_statuses.as_mut())
        .and_then(|c| c.first_mut())
    {
        cs.state = Some(ContainerState {
            waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
                reason: Some("CrashLoopBackOff".into()),
                message: None,
            }),
            ..ContainerState::default()
        });
    }
}

/// The pod's main container command and env, with cluster names mapped to loopback.
async fn spawn(
    local: &LocalPod,
    program: &TrainerProgram,
    follow: bool,
    world: &mut World,
) -> Result<Child, LocalError> {
    let pod_name = local.pod.name_any();
    let spec = local.pod.spec.as_ref().expect("planned pods have a spec");
    let container = &spec.containers[plan::main_container_index(&spec.containers)];

    let mut argv: Vec<String> = container.command.clone().unwrap_or_default();
    argv.extend(container.args.clone().unwrap_or_default());
    let argv: Vec<String> = argv.iter().map(|a| world.mounts.apply(a)).collect();
    let workdir = local.log_path.with_extension("d");
    std::fs::create_dir_all(&workdir).map_err(|source| LocalError::CreateRunDir {
        path: workdir.clone(),
        source,
    })?;
    let (namespace, subdomain, _) = own_dns_key(&local.pod);
    let dns = DnsContext {
        namespace: &namespace,
        subdomain: (!subdomain.is_empty()).then_some(subdomain.as_str()),
    };
    let (cmd_program, rest): (PathBuf, Vec<String>) = match argv.split_first() {
        Some((first, rest)) if first != "kubetrain-trainer" => {
            (PathBuf::from(first), rest.to_vec())
        }
        Some((_, rest)) => (
            program.program.clone(),
            [program.leading_args.clone(), rest.to_vec()].concat(),
        ),
        None => (program.program.clone(), program.leading_args.clone()),
    };

    let mut command = Command::new(&cmd_program);
    command
        .args(&rest)
        .current_dir(&workdir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Ok(log) = std::env::var("RUST_LOG") {
        command.env("RUST_LOG", log);
    }
    for env in container.env.iter().flatten() {
        let value = match (&env.value, &env.value_from) {
            (Some(_), _) if env.name == contract::ENV_TERMINATION_LOG => {
                local.termination_log().display().to_string()
            }
            // Every local trainer shares this machine's ports with whatever else runs
            // here (a Prometheus on 9090, say), and nothing scrapes them.
            (Some(_), _) if env.name == contract::ENV_METRICS_PORT => continue,
            (Some(v), _) => world.mounts.apply(&world.network.rewrite(v, &dns)),
            // The only downward-API value the plan uses is the pod's IP.
            (None, Some(_)) if env.name == contract::ENV_POD_IP => local.address.ip.to_string(),
            (
                None,
                Some(EnvVarSource {
                    secret_key_ref: Some(selector),
                    ..
                }),
            ) => world
                .secrets
                .iter()
                .filter(|s| s.metadata.name.as_deref() == Some(selector.name.as_str()))
                .find_map(|s| secrets::value(s, selector))
                .ok_or_else(|| LocalError::ResolveEnv {
                    pod: pod_name.clone(),
                    var: env.name.clone(),
                    reason: secrets::missing(selector),
                })?,
            _ => continue,
        };
        command.env(&env.name, value);
    }
    // Every container start gets an empty termination-message file, as with a kubelet.
    termination::clear(&local.termination_log());
    let mut child = command.spawn().map_err(|source| LocalError::SpawnProcess {
        program: cmd_program.display().to_string(),
        pod: pod_name.clone(),
        source,
    })?;

    let log = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&local.log_path)
        .await
        .ok();
    let log = Arc::new(tokio::sync::Mutex::new(log));
    let replica = ReplicaId::from_pod(&local.pod).expect("planned pods carry replica labels");
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, log.clone(), replica, follow));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, log, replica, follow));
    }
    Ok(child)
}

/// Copies one output stream of a process into its log file (and to the terminal when
/// followed). Nothing is read out of it: progress comes from the chief, as on a cluster.
async fn pump<R: tokio::io::AsyncRead + Unpin>(
    stream: R,
    log: Arc<tokio::sync::Mutex<Option<tokio::fs::File>>>,
    replica: ReplicaId,
    follow: bool,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if follow {
            eprintln!("[{}-{}] {line}", replica.role, replica.index);
        }
        if let Some(file) = log.lock().await.as_mut() {
            let _ = file.write_all(format!("{line}\n").as_bytes()).await;
        }
    }
}

/// Stops a pod's process as a kubelet does: SIGTERM, then SIGKILL once the pod's
/// `terminationGracePeriodSeconds` (default 30) has passed. The trainer needs the grace:
/// a PS writes its final checkpoint, a worker ends its step.
async fn stop(local: &mut LocalPod) {
    if let Some(mut child) = local.child.take() {
        let grace = local
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(DEFAULT_GRACE_SECONDS);
        let grace = Duration::from_secs(u64::try_from(grace).unwrap_or(0));
        let terminated = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .is_some_and(|pid| kill(Pid::from_raw(pid), Signal::SIGTERM).is_ok());
        if terminated && tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
        let _ = child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }
}

/// A pod's terminationGracePeriodSeconds when it sets none (the API server's default).
const DEFAULT_GRACE_SECONDS: i64 = 30;

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

/// The live view: the chief's epochs as a bar and a summary line, or plain periodic lines,
/// all from `status.progress` as the operator would write it.
struct View {
    multi: Option<MultiProgress>,
    epochs: Option<ProgressBar>,
    summary: Option<ProgressBar>,
    last_line: Mutex<Instant>,
}

impl View {
    fn new(job: &TrainingJob, bars: bool) -> Self {
        use std::io::IsTerminal;
        if !(bars && std::io::stderr().is_terminal()) {
            return Self {
                multi: None,
                epochs: None,
                summary: None,
                last_line: Mutex::new(Instant::now()),
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style =
            ProgressStyle::with_template("{prefix:>10} {bar:30.cyan/blue} {pos:>6}/{len:6} {msg}")
                .expect("valid template")
                .progress_chars("=> ");
        let total = job.spec.training.as_ref().map_or(0, |t| t.epochs);
        let epochs = multi.add(ProgressBar::new(u64::from(total).max(1)).with_style(style));
        epochs.set_prefix("epochs");
        let summary = multi.add(ProgressBar::new_spinner());
        Self {
            multi: Some(multi),
            epochs: Some(epochs),
            summary: Some(summary),
            last_line: Mutex::new(Instant::now()),
        }
    }

    fn line(&self, text: String) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    fn render(&self, job: &TrainingJob, pods: &BTreeMap<ReplicaId, LocalPod>) {
        let status = job.status.clone().unwrap_or_default();
        let state = status
            .lifecycle()
            .map_or("Pending".to_string(), |c| c.type_.clone());
        let progress = status.progress.unwrap_or_default();
        let roles = Role::ALL
            .into_iter()
            .filter(|role| replica::replicas(job, *role) > 0)
            .map(|role| {
                let running = pods
                    .iter()
                    .filter(|(r, p)| r.role == role && p.child.is_some())
                    .count();
                let restarts = status.replica_statuses.role(role).map_or(0, |r| r.restarts);
                format!(
                    "{role} {running}/{} running, {restarts} restarts",
                    replica::replicas(job, role)
                )
            })
            .collect::<Vec<_>>()
            .join(" | ");
        let metrics = format!(
            "loss {} | accuracy {} | {} samples/s",
            progress.loss.map_or("-".into(), |l| format!("{l:.4}")),
            progress.accuracy.map_or("-".into(), |a| format!("{a:.4}")),
            progress
                .samples_per_second
                .map_or("-".into(), |s| format!("{s:.0}")),
        );
        if let Some(summary) = &self.summary {
            if let Some(bar) = &self.epochs {
                bar.set_position(u64::try_from(progress.epoch).unwrap_or(0));
                bar.set_message(format!("step {}", progress.step));
            }
            summary.set_message(format!("{state} | {metrics} | {roles}"));
            summary.tick();
        } else {
            let mut last = self.last_line.lock().expect("view lock");
            if last.elapsed() >= Duration::from_secs(5) {
                *last = Instant::now();
                eprintln!(
                    "[{state}] step {} epoch {} | {metrics} | {roles}",
                    progress.step, progress.epoch
                );
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.epochs {
            bar.abandon();
        }
        if let Some(summary) = &self.summary {
            summary.abandon();
        }
    }
}

/// `ps 0, workers 1`, plus the chief and the evaluator when the job has them.
fn restarts_by_role(job: &TrainingJob, status: &kubetrain_api::TrainingJobStatus) -> String {
    Role::ALL
        .into_iter()
        .filter(|role| {
            *role == Role::Ps || *role == Role::Worker || replica::replicas(job, *role) > 0
        })
        .map(|role| {
            let restarts = status.replica_statuses.role(role).map_or(0, |r| r.restarts);
            let name = if role == Role::Worker {
                "workers"
            } else {
                role.as_str()
            };
            format!("{name} {restarts}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The loss sparkline, `curves.png` and the TensorBoard command, from the chief's event
/// log under `spec.training.logDir`: the same numbers TensorBoard shows.
fn picture_rows(job: &TrainingJob, run_dir: &Path) -> Vec<(&'static str, String)> {
    let Some(log_dir) = job.spec.training.as_ref().and_then(|t| t.log_dir.as_ref()) else {
        return Vec::new();
    };
    let mut rows = vec![("tensorboard", format!("tensorboard --logdir {log_dir}"))];
    let chief = tensorboard::run_dir(Path::new(log_dir), Role::Worker, 0);
    let scalars = match tensorboard::read_scalars(&chief) {
        Ok(scalars) => scalars,
        Err(error) => {
            rows.push(("curves", format!("none: {error}")));
            return rows;
        }
    };
    let curve = |tag: &str| scalars.get(tag).cloned().unwrap_or_default();
    let (loss, accuracy) = (curve("train/loss"), curve("test/accuracy"));
    if loss.is_empty() {
        rows.push(("curves", "none: the chief logged no training step".into()));
        return rows;
    }
    let values: Vec<f32> = loss.iter().map(|&(_, v)| v).collect();
    rows.push(("loss curve", curves::sparkline(&values, 40)));
    let png = run_dir.join("curves.png");
    let drawn = curves::draw(&png, &job.name_any(), &loss, &accuracy);
    rows.push((
        "curves",
        drawn.map_or_else(|e| format!("none: {e}"), |()| png.display().to_string()),
    ));
    rows
}

fn report(job: &TrainingJob, wall: Duration, run_dir: &Path) -> String {
    let status = job.status.clone().unwrap_or_default();
    let state = status
        .lifecycle()
        .map(|c| format!("{} ({}): {}", c.type_, c.reason, c.message))
        .unwrap_or_else(|| "unknown".into());
    let progress = status.progress.clone().unwrap_or_default();
    let accuracy = progress.accuracy;
    let checkpoints = job
        .spec
        .training
        .as_ref()
        .and_then(|t| t.checkpoint.as_ref())
        .map_or("none (no spec.training.checkpoint)".to_string(), |c| {
            c.path.clone()
        });
    let rows = [
        ("state", state),
        (
            "test accuracy",
            accuracy.map_or("-".into(), |a| format!("{a:.4}")),
        ),
        (
            "loss",
            progress.loss.map_or("-".into(), |l| format!("{l:.4}")),
        ),
        ("steps", progress.step.to_string()),
        ("wall time", format!("{:.1}s", wall.as_secs_f64())),
        (
            "samples/s",
            progress
                .samples_per_second
                .map_or("-".into(), |s| format!("{s:.0}")),
        ),
        ("restarts", restarts_by_role(job, &status)),
        ("logs", run_dir.display().to_string()),
        ("checkpoints", checkpoints),
    ]
    .into_iter()
    .chain(picture_rows(job, run_dir))
    .collect::<Vec<_>>();
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!("\n{} {}\n", job.name_any(), "report");
    for (key, value) in rows {
        out.push_str(&format!("  {key:<width$}  {value}\n"));
    }
    out
}
