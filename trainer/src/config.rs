//! The trainer's configuration: the pod contract env (DESIGN.md §5) or the same values as
//! flags, plus a few tuning flags with defaults.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use kubetrain_api::contract::{
    ClusterSpec, DEFAULT_PORT, ENV_CLUSTER, ENV_INDEX, ENV_JOB, ENV_JOB_TOKEN, ENV_METRICS_PORT,
    ENV_MODE, ENV_POD_IP, ENV_ROLE, ENV_TERMINATION_LOG, ENV_TRAINING, Role,
};
use kubetrain_api::{ConsistencyKind, Mode, TrainingSpec};

use crate::consistency::Consistency;
use crate::credential::JobToken;
use crate::error::TrainerError;

/// Command line; every contract value can also come from its env variable.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kubetrain-trainer",
    version,
    about = "kubetrain's built-in trainer: parameter server, data-parallel worker or pipeline stage"
)]
pub struct Cli {
    /// JSON {"ps": ["host:port"], "worker": ["host:port"]}.
    #[arg(long, env = ENV_CLUSTER)]
    pub cluster: String,
    /// `ps` or `worker`.
    #[arg(long, env = ENV_ROLE)]
    pub role: Role,
    /// Index within the role (worker 0 is the chief).
    #[arg(long, env = ENV_INDEX)]
    pub index: usize,
    /// `namespace/name` of the TrainingJob (for logs).
    #[arg(long, env = ENV_JOB, default_value = "")]
    pub job: String,
    /// The TrainingJob's spec.training as JSON.
    #[arg(long, env = ENV_TRAINING)]
    pub training: String,
    /// `DataParallel` or `ModelParallel`.
    #[arg(long, env = ENV_MODE, default_value = "DataParallel")]
    pub mode: String,
    /// Address to bind; 0.0.0.0 when unset.
    #[arg(long, env = ENV_POD_IP)]
    pub pod_ip: Option<IpAddr>,
    /// The job's credential (the operator sets it from the job's Secret). Servers refuse
    /// calls without it; unset, they accept every call, and say so at start.
    #[arg(long, env = ENV_JOB_TOKEN, hide_env_values = true)]
    pub job_token: Option<String>,
    /// Serve Prometheus metrics on this port at /metrics (off when unset).
    #[arg(long, env = ENV_METRICS_PORT)]
    pub metrics_port: Option<u16>,
    /// Chief only: write the final parameters here as little-endian f32.
    #[arg(long)]
    pub dump_params: Option<PathBuf>,
    /// Leave the final progress (JSON) or the error here on exit: the container's
    /// terminationMessagePath.
    #[arg(long, env = ENV_TERMINATION_LOG)]
    pub termination_log: Option<PathBuf>,
    /// A peer silent this long is dead.
    #[arg(long, default_value_t = 3000)]
    pub heartbeat_timeout_ms: u64,
    /// How often workers heartbeat to every PS.
    #[arg(long, default_value_t = 500)]
    pub heartbeat_interval_ms: u64,
    /// PS: exit non-zero after this long without any worker contact, and give workers this
    /// long to register at start. Pipeline stages: how long to wait for every stage to come
    /// up and, after the last step, for the chief to finish.
    #[arg(long, default_value_t = 120)]
    pub idle_timeout_secs: u64,
    /// Worker: give up on a PS that makes no progress (down, restarting) for this long.
    /// Pipeline stage: give up on a neighbour whose tensor has not come for this long.
    #[arg(long, default_value_t = 60)]
    pub ps_timeout_secs: u64,
    /// Stop after this many steps even if the epochs are not done (tests, benchmarks).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Threads for the forward and backward pass's matrix products (default: the CPUs this
    /// process may use, from its cgroup quota).
    #[arg(long, env = kubetrain_api::contract::ENV_COMPUTE_THREADS)]
    pub compute_threads: Option<std::num::NonZeroUsize>,
}

impl Cli {
    /// Parses the command line and the contract env. A pod has no command line, so an
    /// error names the env variable a missing or bad argument comes from, and is left in
    /// the termination log as well as printed; `Err` holds the exit code.
    pub fn from_env_and_args() -> Result<Self, std::process::ExitCode> {
        match Cli::try_parse() {
            Ok(cli) => Ok(cli),
            Err(error) if !error.use_stderr() => error.exit(),
            Err(error) => {
                let message = explain_cli_error(&error.render().to_string());
                eprint!("{message}");
                if let Some(path) = std::env::var_os(ENV_TERMINATION_LOG) {
                    let _ = std::fs::write(path, message.trim_end());
                }
                Err(std::process::ExitCode::from(2))
            }
        }
    }
}

/// Clap names `--cluster <CLUSTER>`; the operator sets `KUBETRAIN_CLUSTER`. Each flag that
/// has an env variable is named by both.
fn explain_cli_error(rendered: &str) -> String {
    use clap::CommandFactory;
    let command = Cli::command();
    let mut message = rendered.to_string();
    for arg in command.get_arguments() {
        let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
            continue;
        };
        let value = arg
            .get_value_names()
            .and_then(|names| names.first().map(|n| n.to_string()))
            .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
        let flag = format!("--{long} <{value}>");
        let both = format!("{} (or {flag})", env.to_string_lossy());
        message = message.replace(&flag, &both);
    }
    message
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster: ClusterSpec,
    /// DataParallel (parameter servers and workers) or ModelParallel (pipeline stages).
    pub mode: Mode,
    pub role: Role,
    pub index: usize,
    pub job: String,
    pub training: TrainingSpec,
    pub consistency: Consistency,
    pub bind: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub dump_params: Option<PathBuf>,
    pub termination_log: Option<PathBuf>,
    pub heartbeat_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub idle_timeout: Duration,
    pub ps_timeout: Duration,
    pub max_steps: Option<u64>,
    /// Sent with every call to a peer, and required of every call that drives training.
    pub token: JobToken,
}

impl Config {
    /// Parses and checks the contract values.
    pub fn from_cli(cli: Cli) -> Result<Self, TrainerError> {
        let cluster =
            ClusterSpec::from_env(&cli.cluster).map_err(|e| TrainerError::Config(e.to_string()))?;
        let training = parse_training(&cli.training)?;
        let mode: Mode = serde_json::from_value(serde_json::Value::String(cli.mode.clone()))
            .map_err(|_| {
                TrainerError::Config(format!(
                    "{ENV_MODE} {:?} is neither DataParallel nor ModelParallel",
                    cli.mode
                ))
            })?;
        // The operator validated the job at admission, but this env can be written by
        // hand, and a bad value must be named here rather than panic deep in training.
        let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
        kubetrain_api::validation::validate_training(
            &training,
            mode,
            count(cluster.ps.len()),
            count(cluster.worker.len()),
        )
        .map_err(|invalid| {
            TrainerError::Config(format!(
                "{ENV_TRAINING} is not a valid spec.training: {invalid}"
            ))
        })?;
        let own = cluster.role(cli.role).get(cli.index).ok_or_else(|| {
            TrainerError::Config(format!(
                "{ENV_INDEX}={} but {ENV_CLUSTER} lists {} {} address(es)",
                cli.index,
                cluster.role(cli.role).len(),
                cli.role
            ))
        })?;
        match mode {
            Mode::DataParallel => {
                if cluster.ps.is_empty() || cluster.worker.is_empty() {
                    return Err(TrainerError::Config(format!(
                        "{ENV_CLUSTER} needs at least one ps and one worker for DataParallel training"
                    )));
                }
            }
            Mode::ModelParallel => {
                if cli.role == Role::Ps {
                    return Err(TrainerError::Config(
                        "a ModelParallel job has no parameter servers: every stage is a worker"
                            .into(),
                    ));
                }
                if cluster.worker.len() < 2 {
                    return Err(TrainerError::Config(format!(
                        "{ENV_CLUSTER} lists {} worker(s); a ModelParallel pipeline needs at least 2 stages",
                        cluster.worker.len()
                    )));
                }
                if training.consistency.kind != ConsistencyKind::Sync {
                    return Err(TrainerError::Config(
                        "a ModelParallel pipeline always updates synchronously; use consistency kind Sync".into(),
                    ));
                }
            }
        }
        let port = port_of(own)?;
        let consistency = match (training.consistency.kind, training.consistency.staleness) {
            (ConsistencyKind::Sync, _) => Consistency::Sync,
            (ConsistencyKind::Async, _) => Consistency::Async,
            (ConsistencyKind::BoundedStaleness, Some(s)) => Consistency::BoundedStaleness(s.into()),
            (ConsistencyKind::BoundedStaleness, None) => {
                return Err(TrainerError::Config(
                    "BoundedStaleness needs consistency.staleness".into(),
                ));
            }
        };
        if training.batch_size == 0 || training.epochs == 0 {
            return Err(TrainerError::Config(
                "batchSize and epochs must be at least 1".into(),
            ));
        }
        let ip = cli.pod_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let token = match cli.job_token.as_deref() {
            Some(token) => JobToken::new(token)?,
            None => JobToken::none(),
        };
        Ok(Self {
            token,
            cluster,
            mode,
            role: cli.role,
            index: cli.index,
            job: cli.job,
            training,
            consistency,
            bind: SocketAddr::new(ip, port),
            metrics: cli.metrics_port.map(|p| SocketAddr::new(ip, p)),
            dump_params: cli.dump_params,
            termination_log: cli.termination_log,
            heartbeat_timeout: Duration::from_millis(cli.heartbeat_timeout_ms),
            heartbeat_interval: Duration::from_millis(cli.heartbeat_interval_ms),
            idle_timeout: Duration::from_secs(cli.idle_timeout_secs),
            ps_timeout: Duration::from_secs(cli.ps_timeout_secs),
            max_steps: cli.max_steps,
        })
    }

    /// Worker 0.
    pub fn is_chief(&self) -> bool {
        self.role == Role::Worker && self.index == 0
    }
}

/// `KUBETRAIN_TRAINING`, refusing fields that `TrainingSpec` does not know: a misspelt
/// `batchsize` would otherwise train with the default batch.
fn parse_training(text: &str) -> Result<TrainingSpec, TrainerError> {
    let invalid = |e: &dyn std::fmt::Display| {
        TrainerError::Config(format!("{ENV_TRAINING} is not a valid spec.training: {e}"))
    };
    let written: serde_json::Value = serde_json::from_str(text).map_err(|e| invalid(&e))?;
    let training: TrainingSpec =
        serde_json::from_value(written.clone()).map_err(|e| invalid(&e))?;
    let understood = serde_json::to_value(&training).map_err(|e| invalid(&e))?;
    let unknown =
        kubetrain_api::unknown_fields::unknown_fields(&written, &understood, "spec.training");
    if !unknown.is_empty() {
        return Err(invalid(&format!(
            "unknown field(s) {}; remove them or correct their spelling",
            unknown.join(", ")
        )));
    }
    Ok(training)
}

fn port_of(address: &str) -> Result<u16, TrainerError> {
    match address.rsplit_once(':') {
        None => Ok(DEFAULT_PORT),
        Some((_, port)) => port.parse().map_err(|_| {
            TrainerError::Config(format!(
                "{ENV_CLUSTER} address {address:?} has no valid port"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(role: &str, index: &str, pod_ip: Option<&str>) -> Cli {
        let cluster = r#"{"ps":["p:7001"],"worker":["w0:7002","w1:7003"]}"#;
        let training = r#"{"model":{"kind":"softmax"},"dataset":{"builtin":"digits"},"optimizer":{"kind":"sgd"}}"#;
        let mut args = vec![
            "t",
            "--cluster",
            cluster,
            "--role",
            role,
            "--index",
            index,
            "--training",
            training,
        ];
        if let Some(ip) = pod_ip {
            args.extend(["--pod-ip", ip]);
        }
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn binds_on_pod_ip_and_own_port() {
        let config = Config::from_cli(cli("worker", "1", Some("10.0.0.5"))).unwrap();
        assert_eq!(config.bind, "10.0.0.5:7003".parse().unwrap());
        let config = Config::from_cli(cli("ps", "0", None)).unwrap();
        assert_eq!(config.bind, "0.0.0.0:7001".parse().unwrap());
        assert_eq!(config.training.batch_size, 64);
    }

    #[test]
    fn model_parallel_needs_two_workers_and_no_parameter_server_role() {
        let training = r#"{"model":{"kind":"mlp","hidden":[8]},"dataset":{"builtin":"digits"},"optimizer":{"kind":"sgd"}}"#;
        let parse = |cluster: &str, role: &str| {
            Config::from_cli(
                Cli::try_parse_from([
                    "t",
                    "--cluster",
                    cluster,
                    "--role",
                    role,
                    "--index",
                    "0",
                    "--training",
                    training,
                    "--mode",
                    "ModelParallel",
                ])
                .unwrap(),
            )
        };
        let config = parse(r#"{"worker":["w0:7002","w1:7003"]}"#, "worker").unwrap();
        assert_eq!(config.mode, Mode::ModelParallel);
        let err = parse(r#"{"worker":["w0:7002"]}"#, "worker").unwrap_err();
        // The operator's own validation answers first, naming the field to change.
        assert!(
            err.to_string()
                .contains("spec.replicaSpecs.worker.replicas: a ModelParallel job"),
            "{err}"
        );
        let err = parse(r#"{"ps":["p:1"],"worker":["w0:7002","w1:7003"]}"#, "ps").unwrap_err();
        assert!(err.to_string().contains("no parameter servers"), "{err}");
    }

    #[test]
    fn index_outside_cluster_is_a_config_error() {
        let err = Config::from_cli(cli("worker", "2", None)).unwrap_err();
        assert!(err.to_string().contains("KUBETRAIN_INDEX=2"), "{err}");
    }
}
