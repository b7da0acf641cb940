//! The chief's progress: what `GetProgress` answers, `/metrics` shows, stdout prints and
//! the TensorBoard event log records.

use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;
use tonic::{Request, Response, Status};

use crate::metrics::ChiefMetrics;
use crate::proto::progress_server::Progress;
use crate::proto::{GetProgressRequest, ProgressReport};
use crate::tensorboard::EventLog;

/// Shared between the training loop and the Progress service.
#[derive(Clone, Default)]
pub struct ProgressState {
    report: Arc<Mutex<Reported>>,
    metrics: ChiefMetrics,
    events: EventLog,
}

#[derive(Default)]
struct Reported {
    report: ProgressReport,
    /// The step of the newest train scalars in the event log.
    logged_step: u64,
}

impl ProgressState {
    pub fn new(registry: &mut Registry) -> Self {
        let state = Self::default();
        state.metrics.register(registry);
        state
    }

    /// Also writes every update as TensorBoard scalars.
    pub fn with_events(mut self, events: EventLog) -> Self {
        self.events = events;
        self
    }

    /// Applies a change to the report and mirrors it into the metrics and, once per step,
    /// the event log.
    pub fn update(&self, change: impl FnOnce(&mut ProgressReport)) {
        let mut reported = self.report.lock().unwrap_or_else(|p| p.into_inner());
        let Reported {
            report,
            logged_step,
        } = &mut *reported;
        change(report);
        self.metrics.step.set(report.step as i64);
        self.metrics.epoch.set(report.epoch.into());
        self.metrics.loss.set(report.loss);
        self.metrics.accuracy.set(report.accuracy);
        self.metrics
            .samples_per_second
            .set(report.samples_per_second);
        self.metrics.finished.set(report.finished.into());
        if report.step > *logged_step {
            self.events.scalars(
                report.step,
                &[
                    ("train/loss", report.loss),
                    ("train/samples_per_second", report.samples_per_second),
                ],
            );
            *logged_step = report.step;
        }
        if report.finished {
            self.events.flush();
        }
    }

    /// Records an evaluation on the test split at `step`.
    pub fn evaluated(&self, step: u64, accuracy: f64, loss: f64) {
        self.update(|r| r.accuracy = accuracy);
        self.events
            .scalars(step, &[("test/accuracy", accuracy), ("test/loss", loss)]);
    }

    /// Records a training step: where the run is, its smoothed loss and its samples/s.
    pub fn trained(&self, step: u64, total_steps: u64, epoch: u32, loss: f64, rate: f64) {
        self.update(|r| {
            r.step = step;
            r.total_steps = total_steps;
            r.epoch = epoch;
            r.loss = loss;
            r.samples_per_second = rate;
        });
    }

    /// Records the final evaluation after `steps` steps; the run is finished.
    pub fn finished(&self, steps: u64, accuracy: f64, loss: f64) {
        self.evaluated(steps, accuracy, loss);
        self.update(|r| {
            r.finished = true;
            r.final_accuracy = accuracy;
            r.accuracy = accuracy;
            r.step = steps;
        });
    }

    pub fn snapshot(&self) -> ProgressReport {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .report
            .clone()
    }
}

/// The gRPC `Progress` service the operator polls.
#[derive(Clone)]
pub struct ProgressService(pub ProgressState);

#[tonic::async_trait]
impl Progress for ProgressService {
    async fn get_progress(
        &self,
        _: Request<GetProgressRequest>,
    ) -> Result<Response<ProgressReport>, Status> {
        Ok(Response::new(self.0.snapshot()))
    }
}
