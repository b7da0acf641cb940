//! The single-process reference trainer: the same model, data and optimizer, no network.
//!
//! With `workers = N` it trains on the union of the N partitions' batches at every step:
//! one process with an N-times batch (as the mean of the N batch gradients). Sync data-parallel training must match it, which is
//! what the equivalence test checks; the benchmark uses it as the throughput baseline.

use std::time::Instant;

use kubetrain_api::TrainingSpec;

use crate::data::{self, Batcher, Partition};
use crate::error::TrainerError;
use crate::model::{Evaluation, Optimizer, as_matrix};
use crate::run_setup;

/// What a local run produced.
#[derive(Debug, Clone)]
pub struct LocalOutcome {
    pub params: Vec<f32>,
    pub steps: u64,
    pub evaluation: Evaluation,
    pub samples_per_second: f64,
}

/// Trains in this process as if `workers` Sync workers each took `batchSize` examples.
pub fn train(
    training: &TrainingSpec,
    workers: usize,
    max_steps: Option<u64>,
) -> Result<LocalOutcome, TrainerError> {
    let parts: Vec<_> = (0..workers)
        .map(|index| {
            data::load(
                &training.dataset,
                training.seed,
                Partition {
                    index,
                    count: workers,
                },
                index == 0,
            )
        })
        .collect::<Result<_, _>>()?;
    let first = &parts[0];
    let (net, schedule, total) = run_setup::training_shape(training, first, workers, max_steps)?;
    let mut params = net.init(training.seed);
    let mut optimizer = Optimizer::new(&training.optimizer, params.len());
    let mut batchers: Vec<Batcher> = parts
        .iter()
        .enumerate()
        .map(|(w, p)| Batcher::new(schedule, training.seed, w, p.train.len()))
        .collect();
    let started = Instant::now();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let scale = 1.0 / workers as f32;
    for step in 0..total {
        // The mean of the partitions' batch gradients, summed in rank order and scaled as a
        // Sync parameter server does: the same value as one gradient over the union of the
        // batches, and the same rounding as Sync, so the two stay bit for bit together
        // instead of drifting apart by float rounding over thousands of steps.
        let mut sum: Option<Vec<f32>> = None;
        for (part, batcher) in parts.iter().zip(&mut batchers) {
            x.clear();
            y.clear();
            part.train.gather(batcher.indices(step), &mut x, &mut y);
            let (_, grad) = net.loss_and_gradient(&params, as_matrix(&x, net.inputs()), &y)?;
            match &mut sum {
                None => sum = Some(grad),
                Some(sum) => sum.iter_mut().zip(&grad).for_each(|(s, g)| *s += g),
            }
        }
        let mut grad = sum.unwrap_or_default();
        grad.iter_mut().for_each(|g| *g *= scale);
        optimizer.apply(&mut params, &grad)?;
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    let evaluation = match &first.test {
        Some(test) => crate::model::evaluate_examples(&net, &params, test)?,
        None => {
            return Err(TrainerError::Compute(
                "partition 0 has no test split".into(),
            ));
        }
    };
    Ok(LocalOutcome {
        params,
        steps: total,
        evaluation,
        samples_per_second: (total as f64 * (schedule.batch * workers) as f64) / seconds,
    })
}
