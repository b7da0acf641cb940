//! The chief's progress: what `GetProgress` answers, `/metrics` shows and stdout prints.

use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;
use tonic::{Request, Response, Status};

use crate::metrics::ChiefMetrics;
use crate::proto::progress_server::Progress;
use crate::proto::{GetProgressRequest, ProgressReport};

/// Shared between the training loop and the Progress service.
#[derive(Clone, Default)]
pub struct ProgressState {
    report: Arc<Mutex<ProgressReport>>,
    metrics: ChiefMetrics,
}

impl ProgressState {
    pub fn new(registry: &mut Registry) -> Self {
        let state = Self::default();
        state.metrics.register(registry);
        state
    }

    /// Applies a change to the report and mirrors it into the metrics.
    pub fn update(&self, change: impl FnOnce(&mut ProgressReport)) {
        let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut report);
        self.metrics.step.set(report.step as i64);
        self.metrics.epoch.set(report.epoch.into());
        self.metrics.loss.set(report.loss);
        self.metrics.accuracy.set(report.accuracy);
        self.metrics
            .samples_per_second
            .set(report.samples_per_second);
        self.metrics.finished.set(report.finished.into());
    }

    pub fn snapshot(&self) -> ProgressReport {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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
