//! What every run derives from its spec and its data before the first step, the same way
//! for a data-parallel worker, the first pipeline stage and the one-process reference: the
//! network, the batch schedule over the workers' partitions, and the total steps.

use kubetrain_api::TrainingSpec;
use kubetrain_api::validation::effective_hidden;

use crate::data::{LoadedData, Schedule};
use crate::error::TrainerError;
use crate::model::Network;

/// The network the spec names for `data`, its schedule over `workers` partitions, and the
/// run's total steps: `epochs` of them, capped by `max_steps` (`--max-steps`).
pub fn training_shape(
    training: &TrainingSpec,
    data: &LoadedData,
    workers: usize,
    max_steps: Option<u64>,
) -> Result<(Network, Schedule, u64), TrainerError> {
    let hidden: Vec<usize> = effective_hidden(&training.model)
        .iter()
        .map(|&h| h as usize)
        .collect();
    let net = Network::new(data.inputs, &hidden, data.classes);
    let schedule = Schedule::new(data.train_total, workers, training.batch_size as usize)?;
    let epochs = u64::from(training.epochs) * schedule.steps_per_epoch as u64;
    let total_steps = max_steps.map_or(epochs, |max| epochs.min(max));
    Ok((net, schedule, total_steps))
}
