//! Live training progress: when to ask the chief, and how its report becomes
//! `status.progress`. The rules here are pure; [`ask`] is the one edge that asks the chief
//! (gRPC), used alike by the controller and by `kubetrain local`.

pub mod ask;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kubetrain_api::condition::types;
use kubetrain_api::contract::{FinalProgress, Role};
use kubetrain_api::{TrainingJob, TrainingJobStatus, TrainingProgress};

use crate::pod_state::phase;
use crate::replica::ReplicaId;

/// At most one progress write per this interval per job.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(10);
/// How long one ask of the chief may take.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The chief's progress as it reported it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChiefReport {
    /// Global step.
    pub step: u64,
    /// Epoch.
    pub epoch: u32,
    /// Training loss.
    pub loss: f64,
    /// Latest test accuracy (0 before the first evaluation).
    pub accuracy: f64,
    /// Throughput.
    pub samples_per_second: f64,
    /// Training finished.
    pub finished: bool,
    /// Test accuracy after the last step, once finished.
    pub final_accuracy: f64,
}

/// Where to ask, if the job is running the built-in trainer and its chief is up, and it is
/// time to ask again (the last report is at least `every` old: [`MIN_WRITE_INTERVAL`] for
/// the operator, whose every report is an API write).
pub fn chief_to_ask(
    job: &TrainingJob,
    status: &TrainingJobStatus,
    pods: &[Pod],
    port: u16,
    every: Duration,
    now: Timestamp,
) -> Option<String> {
    job.spec.training.as_ref()?;
    let active = is_training(status);
    if !active {
        return None;
    }
    let last = status.progress.as_ref().and_then(|p| p.updated_at.as_ref());
    if let Some(last) = last
        && now.duration_since(last.0).as_secs_f64() < every.as_secs_f64()
    {
        return None;
    }
    let chief = chief(pods)?;
    if phase(chief) != "Running" {
        return None;
    }
    let ip = chief.status.as_ref()?.pod_ip.as_ref()?;
    Some(format!("http://{ip}:{port}"))
}

/// Whether the job is in a lifecycle state in which its chief may be training.
fn is_training(status: &TrainingJobStatus) -> bool {
    status.lifecycle().is_some_and(|c| {
        [types::CREATED, types::RUNNING, types::RESTARTING].contains(&c.type_.as_str())
    })
}

/// How long until progress is due again (`every`): while the job runs the built-in trainer
/// and its chief is Running. A chief that is not running yet needs no timer: its pod's
/// next status change wakes the job anyway, and a thousand pending jobs must not poll.
pub fn next_ask(
    job: &TrainingJob,
    status: &TrainingJobStatus,
    pods: &[Pod],
    every: Duration,
) -> Option<Duration> {
    job.spec.training.as_ref()?;
    let active = is_training(status);
    let chief_running = chief(pods).is_some_and(|p| phase(p) == "Running");
    (active && chief_running).then_some(every)
}

/// The chief's own final report, once it has exited successfully, from its termination
/// message ([`kubetrain_api::contract::ENV_TERMINATION_LOG`]). It is the last word on
/// progress: a run too short for any poll still ends with its step, loss and accuracy.
/// Stamped with the exit time, so every later reconcile computes the same value and
/// writes nothing.
pub fn from_chief_exit(pods: &[Pod]) -> Option<TrainingProgress> {
    let chief = chief(pods)?;
    let statuses = chief.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|container| {
        let exited = container.state.as_ref()?.terminated.as_ref()?;
        if exited.exit_code != 0 {
            return None;
        }
        let last = FinalProgress::from_message(exited.message.as_deref()?)?;
        let report = ChiefReport {
            step: last.step,
            epoch: last.epoch,
            loss: last.loss,
            accuracy: last.accuracy,
            samples_per_second: last.samples_per_second,
            finished: true,
            final_accuracy: last.accuracy,
        };
        Some(to_status(&report, exited.finished_at.as_ref()?.0))
    })
}

/// Worker 0, the chief, if its pod exists.
fn chief(pods: &[Pod]) -> Option<&Pod> {
    let wanted = Some(ReplicaId {
        role: Role::Worker,
        index: 0,
    });
    pods.iter().find(|p| ReplicaId::from_pod(p) == wanted)
}

/// The status progress for a chief's report.
pub fn to_status(report: &ChiefReport, now: Timestamp) -> TrainingProgress {
    let accuracy = if report.finished {
        report.final_accuracy
    } else {
        report.accuracy
    };
    TrainingProgress {
        step: i64::try_from(report.step).unwrap_or(i64::MAX),
        epoch: i64::from(report.epoch),
        loss: report.loss.is_finite().then_some(round(report.loss)),
        // 0 means "not evaluated yet", not "0 % accurate".
        accuracy: (accuracy > 0.0).then_some(round(accuracy)),
        samples_per_second: report
            .samples_per_second
            .is_finite()
            .then_some(report.samples_per_second.round()),
        updated_at: Some(Time(Timestamp::from_second(now.as_second()).unwrap_or(now))),
    }
}

/// Four decimals are what a person reads, and keep the status from changing on noise.
fn round(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::decide;
    use crate::plan::{self, PlanSettings};

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn job() -> TrainingJob {
        kubetrain_api::fixtures::JobFixture::quickstart()
            .namespace("ns")
            .build()
    }

    fn running_chief(job: &TrainingJob) -> Pod {
        let mut pod = plan::pod(
            job,
            ReplicaId {
                role: Role::Worker,
                index: 0,
            },
            &PlanSettings::default(),
        );
        pod.status = Some(
            serde_json::from_value(serde_json::json!({"phase": "Running", "podIP": "10.1.2.3"}))
                .unwrap(),
        );
        pod
    }

    #[test]
    fn asks_the_running_chief_by_pod_ip_at_most_every_ten_seconds() {
        let job = job();
        let mut status = decide(&job, &[], t(0)).status;
        let pods = vec![running_chief(&job)];
        assert_eq!(
            chief_to_ask(&job, &status, &pods, 2222, MIN_WRITE_INTERVAL, t(1)).as_deref(),
            Some("http://10.1.2.3:2222")
        );
        status.progress = Some(to_status(
            &ChiefReport {
                step: 5,
                ..Default::default()
            },
            t(1),
        ));
        assert_eq!(
            chief_to_ask(&job, &status, &pods, 2222, MIN_WRITE_INTERVAL, t(10)),
            None
        );
        assert!(chief_to_ask(&job, &status, &pods, 2222, MIN_WRITE_INTERVAL, t(11)).is_some());
    }

    #[test]
    fn never_asks_a_finished_job_or_one_without_the_built_in_trainer() {
        let mut job = job();
        let pods = vec![running_chief(&job)];
        let mut status = decide(&job, &[], t(0)).status;
        status
            .conditions
            .iter_mut()
            .for_each(|c| c.status = "False".into());
        assert_eq!(
            chief_to_ask(&job, &status, &pods, 2222, MIN_WRITE_INTERVAL, t(1)),
            None
        );
        let status = decide(&job, &[], t(0)).status;
        job.spec.training = None;
        assert_eq!(
            chief_to_ask(&job, &status, &pods, 2222, MIN_WRITE_INTERVAL, t(1)),
            None
        );
    }

    #[test]
    fn a_report_becomes_rounded_status_progress() {
        let report = ChiefReport {
            step: 120,
            epoch: 3,
            loss: 0.123456,
            accuracy: 0.0,
            samples_per_second: 1234.56,
            finished: false,
            final_accuracy: 0.0,
        };
        let p = to_status(&report, t(5));
        assert_eq!(p.step, 120);
        assert_eq!(p.loss, Some(0.1235));
        assert_eq!(p.accuracy, None, "not evaluated yet");
        assert_eq!(p.samples_per_second, Some(1235.0));
        let done = to_status(
            &ChiefReport {
                finished: true,
                final_accuracy: 0.96123,
                accuracy: 0.9,
                ..report
            },
            t(6),
        );
        assert_eq!(done.accuracy, Some(0.9612));
    }

    #[test]
    fn a_chief_that_exited_cleanly_leaves_its_final_progress() {
        let job = job();
        let mut chief = running_chief(&job);
        let exited = |code: i32, message: &str| {
            serde_json::from_value::<k8s_openapi::api::core::v1::PodStatus>(serde_json::json!({
                "phase": if code == 0 { "Succeeded" } else { "Failed" },
                "containerStatuses": [{
                    "name": "trainer", "image": "x", "imageID": "", "ready": false,
                    "restartCount": 0,
                    "state": {"terminated": {
                        "exitCode": code, "message": message,
                        "finishedAt": "2027-01-15T08:00:07Z"
                    }}
                }]
            }))
            .unwrap()
        };
        chief.status = Some(exited(
            0,
            r#"{"step":330,"epoch":15,"loss":0.06843,"accuracy":0.96378,"samplesPerSecond":27191.5}"#,
        ));
        let last = from_chief_exit(std::slice::from_ref(&chief)).expect("final progress");
        assert_eq!(
            (
                last.step,
                last.epoch,
                last.loss,
                last.accuracy,
                last.samples_per_second
            ),
            (330, 15, Some(0.0684), Some(0.9638), Some(27192.0))
        );
        assert_eq!(
            last.updated_at.unwrap().0.to_string(),
            "2027-01-15T08:00:07Z",
            "stamped with the exit, so reconciles after it write nothing new"
        );

        // An error text, or any exit but 0, is not a progress report.
        chief.status = Some(exited(1, "kubetrain-trainer: error: data file missing"));
        assert_eq!(from_chief_exit(std::slice::from_ref(&chief)), None);
        chief.status = Some(exited(0, "done"));
        assert_eq!(from_chief_exit(std::slice::from_ref(&chief)), None);
        // A running chief has said nothing yet.
        assert_eq!(from_chief_exit(&[running_chief(&job)]), None);
    }

    #[test]
    fn only_a_running_chief_sets_the_progress_timer() {
        let job = job();
        let created = decide(&job, &[], t(0)).status;
        let mut chief = plan::pod(
            &job,
            ReplicaId {
                role: Role::Worker,
                index: 0,
            },
            &PlanSettings::default(),
        );
        assert_eq!(
            next_ask(
                &job,
                &created,
                std::slice::from_ref(&chief),
                MIN_WRITE_INTERVAL
            ),
            None
        );
        chief.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        });
        assert_eq!(
            next_ask(
                &job,
                &created,
                std::slice::from_ref(&chief),
                MIN_WRITE_INTERVAL
            ),
            Some(MIN_WRITE_INTERVAL)
        );
    }
}
