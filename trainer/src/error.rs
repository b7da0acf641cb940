use std::net::SocketAddr;
use std::path::PathBuf;

use crate::checkpoint::CheckpointError;
use crate::data::DataError;
use crate::model::{Diverged, ModelError};

/// Why a trainer process stopped with a failure. Each variant names what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("reading the configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("binding the gRPC server on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("connecting to {role} {index} at {addr}: {reason}")]
    Connect {
        role: &'static str,
        index: usize,
        addr: String,
        reason: String,
    },
    #[error("calling {call} on ps {index} ({addr}): {status}")]
    Rpc {
        call: &'static str,
        index: usize,
        addr: String,
        status: tonic::Status,
    },
    #[error("training failed: {0}")]
    JobFailed(String),
    /// Exits with `contract::EXIT_DIVERGED`, so that the operator fails the job with the
    /// reason `Diverged` instead of restarting a run that would diverge again.
    #[error(transparent)]
    Diverged(#[from] Diverged),
    /// Exits with [`crate::termination::EXIT_TERMINATED`].
    #[error("stopped by SIGTERM between steps, after step {step}")]
    Terminated { step: u64 },
    #[error("parameter server gave up: {0}")]
    PsGaveUp(String),
    #[error("writing parameters to {path}: {source}")]
    DumpParams {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serving metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("running the model computation: {0}")]
    Compute(String),
    #[error(
        "spec.training.logDir: creating TensorBoard events in {path}: {source}; mount a volume this pod can write at logDir, or remove logDir"
    )]
    CreateEventLog {
        path: PathBuf,
        source: std::io::Error,
    },
}
