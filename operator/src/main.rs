//! `kubetrain`: the operator (`kubetrain operator`), the local runner (`kubetrain local`),
//! the CRD printer (`kubetrain crd`), and the built-in trainer (`kubetrain trainer`).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use kubetrain_operator::api_requests::ApiRequestsLayer;
use kubetrain_operator::cli::{Cli, Command, OperatorArgs};
use kubetrain_operator::controller::{self, Context};
use kubetrain_operator::leader::{Elector, Timing};
#[cfg(feature = "local")]
use kubetrain_operator::local;
use kubetrain_operator::metrics::{self, Metrics};
use kubetrain_operator::plan::{OperatorPods, PlanSettings};
use kubetrain_operator::telemetry;

#[tokio::main]
async fn main() -> ExitCode {
    // `kubetrain trainer ...` is the built-in trainer, so `kubetrain local` works from the
    // one binary that `cargo run -p kubetrain-operator` builds. Its flags are the trainer's.
    #[cfg(feature = "local")]
    if std::env::args().nth(1).as_deref() == Some("trainer") {
        return run_trainer().await;
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", kubetrain_api::crd_yaml());
            ExitCode::SUCCESS
        }
        #[cfg(feature = "local")]
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
    let metrics = Arc::new(Metrics::new());
    let config = kube::Config::infer().await?;
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&ApiRequestsLayer::new(metrics.clone()))
        .build();
    let addr = SocketAddr::from(([0, 0, 0, 0], args.metrics_port));
    let server = tokio::spawn(metrics::serve(addr, metrics.clone()));
    let settings = PlanSettings {
        trainer_image: args.trainer_image,
        gang_scheduler: args.gang_scheduler.map(Into::into),
        trainer_metrics_port: (args.trainer_metrics_port != 0).then_some(args.trainer_metrics_port),
        job_network_policy: args.job_network_policy.then(|| OperatorPods {
            namespace: args.operator_namespace.clone(),
            labels: args.operator_pod_labels.clone(),
        }),
        ..PlanSettings::default()
    };
    let identity = args.instance.clone().unwrap_or_else(|| {
        format!(
            "kubetrain-{}-{}",
            std::process::id(),
            k8s_openapi::jiff::Timestamp::now().as_millisecond()
        )
    });
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        Some(identity.clone()),
        metrics.clone(),
    ));
    // Standbys are healthy and ready: they serve metrics and wait for the lease.
    metrics.set_ready(true);
    tracing::info!(%addr, leader_elect = args.leader_elect, "kubetrain operator started");

    let result = if args.leader_elect {
        let elector = Elector::new(
            client,
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            Timing::default(),
        );
        tokio::select! {
            _ = elector.acquire() => {}
            _ = shutdown_signal() => { server.abort(); return Ok(()) }
        }
        let outcome = tokio::select! {
            // The controller ends on SIGTERM/SIGINT (shutdown_on_signal).
            _ = controller::run(ctx, args.namespace) => Ok(()),
            lost = elector.hold() => Err(lost.into()),
        };
        if outcome.is_ok() {
            elector.release().await;
        }
        outcome
    } else {
        controller::run(ctx, args.namespace).await;
        Ok(())
    };
    server.abort();
    result
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(feature = "local")]
async fn run_trainer() -> ExitCode {
    let args = std::env::args()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, a)| a);
    let cli = kubetrain_trainer::Cli::parse_from(args);
    telemetry::init(telemetry::LogFormat::Text);
    kubetrain_trainer::main_with(cli).await
}
