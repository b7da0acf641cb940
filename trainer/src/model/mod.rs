//! Pure model math over `ndarray`: dense networks, softmax cross-entropy, optimizers.
//!
//! Nothing here knows about the network or the runtime, so the same code runs on a worker,
//! on a parameter server (optimizers, which also take a gradient as the bytes it arrived
//! in, through [`ValueRuns`]) and in the single-process reference trainer.

pub mod divergence;
mod evaluate;
mod network;
mod optimizer;
mod stage;
mod stale_step;
mod value_runs;

pub use divergence::Diverged;
pub use evaluate::evaluate_examples;
pub use network::{Evaluation, Network, as_matrix};
pub use optimizer::{Optimizer, OptimizerState};
pub use stage::{StageModel, Stash};
pub use stale_step::{StaleSteps, StepAdjust};
pub use value_runs::ValueRuns;

/// A model call was given inputs of the wrong shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The flat parameter vector has the wrong length for this architecture.
    #[error("computing the model: expected {expected} parameters, got {got}")]
    ParameterCount { expected: usize, got: usize },
    /// The feature matrix has the wrong number of columns.
    #[error("computing the model: expected {expected} features per example, got {got}")]
    FeatureCount { expected: usize, got: usize },
    /// Labels and examples disagree in number, or a label is out of range.
    #[error("computing the model: {0}")]
    Labels(String),
    /// An optimizer was handed a gradient that does not match its parameters.
    #[error("applying the optimizer: gradient has {got} elements, parameters have {expected}")]
    GradientLength { expected: usize, got: usize },
    /// A pipeline stage was cut or fed inconsistently.
    #[error("computing a pipeline stage: {0}")]
    Stage(String),
}
