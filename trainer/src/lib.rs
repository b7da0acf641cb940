//! The kubetrain trainer: data-parallel training with sharded parameter servers, or
//! model-parallel training as a pipeline of stages, over gRPC.
//!
//! Configuration comes only from the pod contract (`kubetrain_api::contract`), as env or
//! the equivalent flags; see [`config`]. [`run`] is what the binary calls.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod compute_threads;
pub mod config;
pub mod consistency;
pub mod credential;
pub mod data;
mod error;
pub mod local;
pub mod loopback;
pub mod metrics;
pub mod model;
pub mod parameter_transfer;
pub mod pipeline;
pub mod progress;
pub mod ps;
pub mod run_log;
pub mod run_setup;
pub mod tensorboard;
pub mod termination;
pub mod transport;
pub mod worker;

/// The generated gRPC code (crate `kubetrain-proto`), under the name the trainer's modules
/// use for it.
pub use kubetrain_proto as proto;

use std::path::Path;
use std::sync::Arc;

use kubetrain_api::Mode;
use kubetrain_api::contract::{FinalProgress, Role};
use prometheus_client::registry::Registry;
use tracing::info;

pub use config::{Cli, Config};
pub use error::TrainerError;
pub use worker::WorkerOutcome;

/// What a trainer process did.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A parameter server that was shut down by the chief.
    ParameterServer,
    /// A worker (or, in ModelParallel mode, a pipeline stage) that ran all its steps.
    Worker(WorkerOutcome),
}

/// Runs this process's role to the end. Ok means exit 0.
pub async fn run(config: Config) -> Result<Outcome, TrainerError> {
    info!(role = %config.role, index = config.index, job = %config.job, "kubetrain-trainer starting");
    let mut registry = Registry::default();
    let ps_metrics = (config.role == Role::Ps).then(|| {
        let m = metrics::PsMetrics::default();
        m.register(&mut registry);
        m
    });
    let events = open_event_log(&config)?;
    let progress = config
        .is_chief()
        .then(|| progress::ProgressState::new(&mut registry).with_events(events.clone()));
    let final_progress = progress.clone();
    let termination = termination::Termination::listen();
    let termination_log = config.termination_log.clone();
    // Metrics are for watching; a port someone else holds must not cost the training.
    let metrics_task = match config.metrics {
        Some(addr) => match metrics::serve(addr, Arc::new(registry)).await {
            Ok(task) => Some(task),
            Err(error) => {
                tracing::warn!(%error, "training without a metrics endpoint");
                None
            }
        },
        None => None,
    };
    let outcome = match ps_metrics {
        Some(m) => ps::run_ps(config, m, events, termination)
            .await
            .map(|()| Outcome::ParameterServer),
        None if config.mode == Mode::ModelParallel => {
            pipeline::run_stage(config, progress, events, termination)
                .await
                .map(Outcome::Worker)
        }
        None => worker::run_worker(config, progress, termination)
            .await
            .map(Outcome::Worker),
    };
    if let Some(task) = metrics_task {
        task.abort();
    }
    if let (Ok(_), Some(path), Some(progress)) = (&outcome, &termination_log, &final_progress) {
        let report = progress.snapshot();
        let last_words = FinalProgress {
            step: report.step,
            epoch: report.epoch,
            loss: report.loss,
            accuracy: report.final_accuracy,
            samples_per_second: report.samples_per_second,
        };
        leave_last_words(
            path,
            &serde_json::to_string(&last_words).expect("plain numbers always serialise"),
        );
    }
    outcome
}

/// This process's TensorBoard run under `spec.training.logDir`, for the processes that
/// have something to show: the chief, every PS and every pipeline stage. Other
/// data-parallel workers would only add empty runs.
fn open_event_log(config: &Config) -> Result<tensorboard::EventLog, TrainerError> {
    let Some(log_dir) = &config.training.log_dir else {
        return Ok(tensorboard::EventLog::off());
    };
    if !(config.is_chief() || config.role == Role::Ps || config.mode == Mode::ModelParallel) {
        return Ok(tensorboard::EventLog::off());
    }
    let path = tensorboard::run_dir(Path::new(log_dir), config.role, config.index);
    tensorboard::EventLog::create(&path)
        .map_err(|source| TrainerError::CreateEventLog { path, source })
}

/// Writes the termination message. Losing it loses no work, so a failure is only logged.
fn leave_last_words(path: &Path, message: &str) {
    if let Err(error) = std::fs::write(path, message) {
        tracing::warn!(path = %path.display(), %error, "termination message not written");
    }
}

/// The whole command: configuration from `cli` (and the contract env), then [`run`]; a
/// failure is printed as one `kubetrain-trainer: error: ...` line and exits 1. Shared by
/// the `kubetrain-trainer` binary and `kubetrain trainer`.
pub async fn main_with(cli: Cli) -> std::process::ExitCode {
    // Workers and pipeline stages compute; a PS only applies updates.
    if cli.role == Role::Worker {
        let threads = compute_threads::wanted(cli.compute_threads);
        match compute_threads::ensure(threads) {
            None => info!(
                threads = threads.get(),
                "matrix products on {threads} thread(s)"
            ),
            Some(error) => tracing::warn!(
                %error,
                "could not restart with MATMUL_NUM_THREADS={threads}; matrix products use matrixmultiply's own thread count"
            ),
        }
    }
    let termination_log = cli.termination_log.clone();
    let result = match Config::from_cli(cli) {
        Ok(config) => run(config).await.map(|_| ()),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if let Some(path) = &termination_log {
                leave_last_words(path, &e.to_string());
            }
            eprintln!("kubetrain-trainer: error: {e}");
            match e {
                TrainerError::Diverged(_) => {
                    std::process::ExitCode::from(kubetrain_api::contract::EXIT_DIVERGED)
                }
                TrainerError::Terminated { .. } => {
                    std::process::ExitCode::from(termination::EXIT_TERMINATED)
                }
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}
