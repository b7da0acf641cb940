//! One worker's step loop: pull, compute the gradient of a batch, push, and keep the
//! running loss, rate and timings from step to step. The chief also evaluates at each
//! epoch's end and publishes progress.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::data::{Batcher, Examples, Schedule};
use crate::error::TrainerError;
use crate::model::{Evaluation, Network, as_matrix, divergence, evaluate_examples};
use crate::progress::ProgressState;
use crate::run_log;
use crate::termination::Termination;

use super::links::{Links, StepError};

/// How long a step in progress may go on after SIGTERM: ample for a step that can end
/// (milliseconds), well inside the pod's grace period for one that cannot.
const STEP_GRACE_ON_SIGTERM: Duration = Duration::from_secs(1);

/// What one step gives back: its loss, its pull/compute/push times, and (Sync) the next
/// step's parameters, pulled during the push.
type StepResult = (f64, [Duration; 3], Option<Vec<f32>>);

/// Everything the loop carries from step to step.
pub(super) struct StepLoop {
    pub index: usize,
    pub sync: bool,
    pub net: Arc<Network>,
    pub train: Arc<Examples>,
    /// Chief only, with `progress`.
    pub test: Option<Arc<Examples>>,
    pub progress: Option<ProgressState>,
    pub schedule: Schedule,
    pub batcher: Batcher,
    pub links: Links,
    pub total_steps: u64,
    /// The next step to train (the parameter servers' step on a resume).
    pub step: u64,
    /// How long the loop may go without a step before the job fails.
    pub stall_limit: Duration,
    steps_done: u64,
    global_batch: f64,
    started: Instant,
    last_line: Instant,
    pub last_progress: Instant,
    loss_avg: Option<f64>,
    /// Time spent pulling, computing (data + gradient) and pushing, for the final line:
    /// where a step's time goes decides what to optimise. (Sync pulls the next step's
    /// parameters during the push, so there the push time includes waiting for the other
    /// workers.)
    timing: [Duration; 3],
    /// Sync: the next step's parameters, pulled while this step's push was under way.
    prefetched: Option<Vec<f32>>,
    /// The widened batch buffers, kept across steps instead of allocated for each one.
    batch: (Vec<f32>, Vec<u8>),
}

/// What the loop has to show when it ends.
pub(super) struct Trained {
    pub loss: f64,
    pub samples_per_second: f64,
    /// `pull_ms=.. compute_ms=.. push_ms=..` per step.
    pub timing: String,
}

impl StepLoop {
    /// The loop's running state starts with these.
    #[allow(clippy::too_many_arguments)] // one call site, each a different part of the job
    pub fn new(
        index: usize,
        workers: usize,
        sync: bool,
        net: Arc<Network>,
        train: Arc<Examples>,
        test: Option<Arc<Examples>>,
        progress: Option<ProgressState>,
        schedule: Schedule,
        links: Links,
        total_steps: u64,
        resume: u64,
        stall_limit: Duration,
        seed: u64,
    ) -> Self {
        let batcher = Batcher::new(schedule, seed, index, train.len());
        let now = Instant::now();
        Self {
            index,
            sync,
            net,
            train,
            test,
            progress,
            schedule,
            batcher,
            links,
            total_steps,
            step: resume,
            stall_limit,
            steps_done: 0,
            global_batch: (schedule.batch * workers) as f64,
            started: now,
            last_line: now,
            last_progress: now,
            loss_avg: None,
            timing: [Duration::ZERO; 3],
            prefetched: None,
            batch: (Vec::new(), Vec::new()),
        }
    }

    /// Trains until the last step, a stop, or a failure.
    pub async fn run(
        &mut self,
        termination: &Termination,
        abort: &watch::Receiver<Option<String>>,
    ) -> Result<Trained, TrainerError> {
        let mut stop = termination.clone();
        while self.step < self.total_steps {
            if let Some(reason) = abort.borrow().clone() {
                return Err(TrainerError::JobFailed(reason));
            }
            let step = self.step;
            if termination.requested() {
                // Pushed gradients are applied; nothing of this worker is half-way anywhere.
                return Err(TrainerError::Terminated { step });
            }
            let outcome = {
                let attempt = self.step_once();
                tokio::pin!(attempt);
                tokio::select! {
                    outcome = &mut attempt => outcome,
                    () = stop.wait() => {
                        // The step in progress gets a moment to end; one that cannot (its PS
                        // is gone too, say) is abandoned rather than retried past the grace
                        // period. Nothing is half-applied: a push that breaks off is never
                        // applied, and Sync's replacement redoes a step whose gradient is in
                        // on some shards only.
                        match tokio::time::timeout(STEP_GRACE_ON_SIGTERM, &mut attempt).await {
                            Ok(outcome) => outcome,
                            Err(_) => return Err(TrainerError::Terminated { step }),
                        }
                    }
                }
            };
            match outcome {
                Ok(done) => self.record(done)?,
                Err(StepError::Retry(why)) => {
                    if self.last_progress.elapsed() > self.stall_limit {
                        return Err(TrainerError::JobFailed(format!(
                            "no training progress for {:.0}s (--ps-timeout-secs, plus Sync's workerGracePeriodSeconds): {why}",
                            self.last_progress.elapsed().as_secs_f64()
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(StepError::Fatal(e)) => return Err(e),
            }
        }
        self.links.done_all().await;
        let per_step = |t: Duration| t.as_secs_f64() * 1e3 / self.steps_done.max(1) as f64;
        Ok(Trained {
            loss: self.loss_avg.unwrap_or_default(),
            samples_per_second: self.rate(),
            timing: format!(
                "pull_ms={:.2} compute_ms={:.2} push_ms={:.2}",
                per_step(self.timing[0]),
                per_step(self.timing[1]),
                per_step(self.timing[2])
            ),
        })
    }

    fn rate(&self) -> f64 {
        self.steps_done as f64 * self.global_batch / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    /// One step: its parameters, the chief's evaluation at an epoch's end, the gradient of
    /// its batch, and the push.
    async fn step_once(&mut self) -> Result<StepResult, StepError> {
        let step = self.step;
        let t0 = Instant::now();
        let params = match self.prefetched.take() {
            Some(params) => params,
            None => self.links.pull_all(step, self.sync).await?,
        };
        let t1 = Instant::now();
        if let (Some(progress), Some(test)) = (&self.progress, &self.test)
            && step > 0
            && step.is_multiple_of(self.schedule.steps_per_epoch as u64)
        {
            let eval = evaluate(self.net.clone(), params.clone(), test.clone()).await?;
            progress.evaluated(step, eval.accuracy, eval.loss);
            run_log::epoch_done(self.schedule.epoch_of(step), step, eval.accuracy, eval.loss);
        }
        let indices = self.batcher.indices(step).to_vec();
        let (net, train) = (self.net.clone(), self.train.clone());
        let (mut x, mut y) = std::mem::take(&mut self.batch);
        let (result, params, x, y) = tokio::task::spawn_blocking(move || {
            x.clear();
            y.clear();
            train.gather(&indices, &mut x, &mut y);
            let result = net.loss_and_gradient(&params, as_matrix(&x, net.inputs()), &y);
            (result, params, x, y)
        })
        .await
        .map_err(|e| StepError::Fatal(TrainerError::Compute(e.to_string())))?;
        self.batch = (x, y);
        self.links.recycle(params);
        let (loss, grad) = result.map_err(|e| StepError::Fatal(e.into()))?;
        divergence::check_gradient(step + 1, &grad).map_err(|e| StepError::Fatal(e.into()))?;
        let t2 = Instant::now();
        let mut next = None;
        if self.sync && step + 1 < self.total_steps {
            // A failed pull only means the next step pulls again (its error has already
            // marked the PS for re-registration where needed).
            next = self.links.push_and_pull(step, Arc::new(grad)).await?.ok();
        } else {
            self.links.push_all(step, Arc::new(grad)).await?;
        }
        Ok((loss, [t1 - t0, t2 - t1, t2.elapsed()], next))
    }

    /// A finished step: the running loss, the divergence check, progress and the log line.
    fn record(&mut self, (loss, times, next): StepResult) -> Result<(), TrainerError> {
        self.prefetched = next;
        for (total, t) in self.timing.iter_mut().zip(times) {
            *total += t;
        }
        self.step += 1;
        self.steps_done += 1;
        self.last_progress = Instant::now();
        let smoothed = self.loss_avg.map_or(loss, |a| 0.9 * a + 0.1 * loss);
        self.loss_avg = Some(smoothed);
        divergence::check_loss(self.step, loss, smoothed, self.net.classes())?;
        let rate = self.rate();
        // Counting from 1, as status.progress.epoch does, in the log line too.
        let epoch = self.schedule.epoch_of(self.step.saturating_sub(1)) as u32 + 1;
        if let Some(progress) = &self.progress {
            progress.trained(self.step, self.total_steps, epoch, smoothed, rate);
        }
        if self.last_line.elapsed() >= Duration::from_secs(2) {
            self.last_line = Instant::now();
            let (index, step, total) = (self.index, self.step, self.total_steps);
            run_log::training(index, step, total, u64::from(epoch), smoothed, rate);
        }
        Ok(())
    }
}

/// The test-set evaluation of `params`, off the async threads.
pub(super) async fn evaluate(
    net: Arc<Network>,
    params: Vec<f32>,
    test: Arc<Examples>,
) -> Result<Evaluation, StepError> {
    tokio::task::spawn_blocking(move || evaluate_examples(&net, &params, &test))
        .await
        .map_err(|e| StepError::Fatal(TrainerError::Compute(e.to_string())))?
        .map_err(|e| StepError::Fatal(e.into()))
}
