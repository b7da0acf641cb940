//! The `kubetrain` command line. In the library so tests can check that the shipped
//! manifests pass arguments the binary really accepts.

use std::collections::BTreeMap;

use clap::{Parser, Subcommand};

#[cfg(feature = "local")]
use crate::local::LocalArgs;
use crate::plan::DEFAULT_TRAINER_IMAGE;
use crate::telemetry::LogFormat;

/// `kubetrain`.
#[derive(Parser, Debug)]
#[command(
    name = "kubetrain",
    version,
    about = "Distributed training jobs on Kubernetes"
)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller against the cluster in KUBECONFIG or the in-cluster config.
    Operator(OperatorArgs),
    /// Run a TrainingJob on this machine as local processes, no cluster needed.
    #[cfg(feature = "local")]
    Local(LocalArgs),
    /// Print the TrainingJob CustomResourceDefinition as YAML.
    Crd,
}

use crate::gang::GangScheduler;

/// The values of `--gang-scheduler`. The pure `gang` module knows no command line, so the
/// flag's spelling lives here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GangSchedulerArg {
    /// Volcano (`scheduling.volcano.sh/v1beta1` PodGroups, scheduler `volcano`).
    Volcano,
    /// scheduler-plugins coscheduling (`scheduling.x-k8s.io/v1alpha1` PodGroups).
    SchedulerPlugins,
}

impl From<GangSchedulerArg> for GangScheduler {
    fn from(arg: GangSchedulerArg) -> Self {
        match arg {
            GangSchedulerArg::Volcano => GangScheduler::Volcano,
            GangSchedulerArg::SchedulerPlugins => GangScheduler::SchedulerPlugins,
        }
    }
}

/// `kubetrain operator` options; each has an environment variable too.
#[derive(clap::Args, Debug)]
pub struct OperatorArgs {
    /// Image for pods whose replica spec has no template.
    #[arg(long, env = "KUBETRAIN_TRAINER_IMAGE", default_value = DEFAULT_TRAINER_IMAGE)]
    pub trainer_image: String,
    /// Port of /metrics, /healthz and /readyz (0: any free port, named in the log).
    #[arg(long, env = "KUBETRAIN_METRICS_PORT", default_value_t = 8080)]
    pub metrics_port: u16,
    /// Log format.
    #[arg(long, env = "KUBETRAIN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "KUBETRAIN_NAMESPACE")]
    pub namespace: Option<String>,
    /// Name of this operator instance in Events and in the leader Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
    /// Run only while holding the leader Lease, so several replicas can run safely.
    #[arg(long, env = "KUBETRAIN_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the leader Lease (default: the operator's own, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kubetrain-system")]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "KUBETRAIN_LEASE_NAME",
        default_value = "kubetrain-operator"
    )]
    pub lease_name: String,
    /// Port on which pods of the built-in trainer serve /metrics, as the container port
    /// named `metrics` (the chart's PodMonitor scrapes it); 0 turns trainer metrics off.
    #[arg(
        long,
        env = "KUBETRAIN_TRAINER_METRICS_PORT",
        default_value_t = kubetrain_api::contract::DEFAULT_TRAINER_METRICS_PORT
    )]
    pub trainer_metrics_port: u16,
    /// Give every job a NetworkPolicy that admits to its pods only the job's own pods,
    /// this operator's pods (the trainer port, for progress) and metric scrapes.
    #[arg(
        long,
        env = "KUBETRAIN_JOB_NETWORK_POLICY",
        action = clap::ArgAction::Set,
        default_value_t = true
    )]
    pub job_network_policy: bool,
    /// The labels of this operator's pods, `key=value,...`: the job NetworkPolicies admit
    /// pods with these labels in the operator's namespace (POD_NAMESPACE).
    #[arg(
        long,
        env = "KUBETRAIN_OPERATOR_POD_LABELS",
        value_parser = parse_labels,
        default_value = "app.kubernetes.io/name=kubetrain,app.kubernetes.io/component=operator"
    )]
    pub operator_pod_labels: BTreeMap<String, String>,
    /// The namespace this operator runs in (from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kubetrain-system")]
    pub operator_namespace: String,
    /// Create PodGroups for this gang scheduler for jobs with schedulingPolicy.gang.
    #[arg(long, env = "KUBETRAIN_GANG_SCHEDULER", value_enum)]
    pub gang_scheduler: Option<GangSchedulerArg>,
}

/// `key=value,key=value` as a label map; each key and value non-empty.
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .map(|pair| match pair.trim().split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("{pair:?} is not key=value")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_network_policies_are_on_by_default_and_labels_parse() {
        let parse = |extra: &[&str]| {
            let cli = Cli::try_parse_from([&["kubetrain", "operator"], extra].concat()).unwrap();
            let Command::Operator(args) = cli.command else {
                panic!("not the operator subcommand");
            };
            args
        };
        let args = parse(&[]);
        assert!(args.job_network_policy);
        assert_eq!(
            args.operator_pod_labels["app.kubernetes.io/component"],
            "operator"
        );
        assert!(!parse(&["--job-network-policy", "false"]).job_network_policy);
        assert!(parse_labels("a=b,c").is_err());
        assert!(parse_labels("=b").is_err());
    }

    #[test]
    fn gang_scheduler_flag_values_map_to_the_schedulers() {
        for (flag, scheduler) in [
            ("volcano", GangScheduler::Volcano),
            ("scheduler-plugins", GangScheduler::SchedulerPlugins),
        ] {
            let cli = Cli::try_parse_from(["kubetrain", "operator", "--gang-scheduler", flag])
                .unwrap_or_else(|e| panic!("{flag}: {e}"));
            let Command::Operator(args) = cli.command else {
                panic!("not the operator subcommand");
            };
            assert_eq!(
                args.gang_scheduler.map(GangScheduler::from),
                Some(scheduler)
            );
        }
        assert!(
            Cli::try_parse_from(["kubetrain", "operator", "--gang-scheduler", "kueue"]).is_err()
        );
    }
}
