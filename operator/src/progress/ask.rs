//! The one edge of progress: asking the chief's `Progress` service, and bringing a
//! decision's `status.progress` up to date by the pure rules of [`super`]. The controller
//! and `kubetrain local` both call [`observe`], so a job's progress is read the same way on
//! a cluster and on one machine.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kubetrain_api::TrainingJob;
use tracing::debug;

use super::{ASK_TIMEOUT, ChiefReport, chief_to_ask, from_chief_exit, next_ask, to_status};
use crate::decide::Decision;

/// Updates `decision` with the chief's progress: its termination message once it has
/// exited (the last word), else its Progress service when the last report is `every` old;
/// and asks to be woken when the next report is due.
pub async fn observe(
    job: &TrainingJob,
    decision: &mut Decision,
    pods: &[Pod],
    port: u16,
    every: Duration,
    now: Timestamp,
) {
    if let Some(endpoint) = chief_to_ask(job, &decision.status, pods, port, every, now) {
        // A chief that does not answer yet (starting, or between restarts) is not an error:
        // the next ask comes with the next requeue.
        match ask_chief(&endpoint).await {
            Ok(report) => decision.status.progress = Some(to_status(&report, now)),
            Err(error) => debug!(%endpoint, %error, "chief progress not available"),
        }
    }
    if let Some(last) = from_chief_exit(pods) {
        decision.status.progress = Some(last);
    }
    if let Some(next) = next_ask(job, &decision.status, pods, every) {
        decision.requeue_after = Some(decision.requeue_after.map_or(next, |r| r.min(next)));
    }
}

/// Asks the chief's Progress service once, within [`ASK_TIMEOUT`].
pub async fn ask_chief(
    endpoint: &str,
) -> Result<ChiefReport, Box<dyn std::error::Error + Send + Sync>> {
    use kubetrain_proto::{GetProgressRequest, progress_client::ProgressClient};
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(ASK_TIMEOUT)
        .timeout(ASK_TIMEOUT)
        .connect()
        .await?;
    let report = ProgressClient::new(channel)
        .get_progress(GetProgressRequest {})
        .await?
        .into_inner();
    Ok(ChiefReport {
        step: report.step,
        epoch: report.epoch,
        loss: report.loss,
        accuracy: report.accuracy,
        samples_per_second: report.samples_per_second,
        finished: report.finished,
        final_accuracy: report.final_accuracy,
    })
}
