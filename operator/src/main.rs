//! `kubetrain`: the operator (`kubetrain operator`), the local runner (`kubetrain local`)
//! and the CRD printer (`kubetrain crd`).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use kubetrain_operator::controller::{self, Context};
use kubetrain_operator::local;
use kubetrain_operator::metrics::{self, Metrics};
use kubetrain_operator::plan::{DEFAULT_TRAINER_IMAGE, PlanSettings};
use kubetrain_operator::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "kubetrain",
    version,
    about = "Distributed training jobs on Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller against the cluster in KUBECONFIG or the in-cluster config.
    Operator(OperatorArgs),
    /// Run a TrainingJob on this machine as local processes, no cluster needed.
    Local(local::LocalArgs),
    /// Print the TrainingJob CustomResourceDefinition as YAML.
    Crd,
}

#[derive(clap::Args)]
struct OperatorArgs {
    /// Image for pods whose replica spec has no template.
    #[arg(long, env = "KUBETRAIN_TRAINER_IMAGE", default_value = DEFAULT_TRAINER_IMAGE)]
    trainer_image: String,
    /// Port of /metrics, /healthz and /readyz.
    #[arg(long, env = "KUBETRAIN_METRICS_PORT", default_value_t = 8080)]
    metrics_port: u16,
    /// Log format.
    #[arg(long, env = "KUBETRAIN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "KUBETRAIN_NAMESPACE")]
    namespace: Option<String>,
    /// Name of this operator instance in Events (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    // `kubetrain trainer ...` is the built-in trainer, so `kubetrain local` works from the
    // one binary that `cargo run -p kubetrain-operator` builds. Its flags are the trainer's.
    if std::env::args().nth(1).as_deref() == Some("trainer") {
        return run_trainer().await;
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", kubetrain_api::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Local(args) => local::main(args).await,
        Command::Operator(args) => match run_operator(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("kubetrain operator: {error}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn run_operator(args: OperatorArgs) -> Result<(), Box<dyn std::error::Error>> {
    telemetry::init(args.log_format);
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let addr = SocketAddr::from(([0, 0, 0, 0], args.metrics_port));
    let server = tokio::spawn(metrics::serve(addr, metrics.clone()));
    let settings = PlanSettings {
        trainer_image: args.trainer_image,
        ..PlanSettings::default()
    };
    let ctx = Arc::new(Context::new(
        client,
        settings,
        args.instance,
        metrics.clone(),
    ));
    metrics.set_ready(true);
    tracing::info!(%addr, "kubetrain operator started");
    controller::run(ctx, args.namespace).await;
    server.abort();
    Ok(())
}

async fn run_trainer() -> ExitCode {
    use clap::Parser as _;
    let args = std::env::args()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, a)| a);
    let cli = kubetrain_trainer::Cli::parse_from(args);
    tracing_subscriber_init();
    let result = match kubetrain_trainer::Config::from_cli(cli) {
        Ok(config) => kubetrain_trainer::run(config).await.map(|_| ()),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubetrain-trainer: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn tracing_subscriber_init() {
    telemetry::init(LogFormat::Text);
}
