//! The decision's tests, one file a concept of `decide`, on shared pod and job builders:
//! one scenario per test, a job, pods in some state, and what the operator must decide.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, PodCondition,
    PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kubetrain_api::fixtures::JobFixture;

use kube::ResourceExt;
use kubetrain_api::contract;
use kubetrain_api::{CleanPodPolicy, RestartPolicy, SuccessPolicy};

use super::*;
use crate::plan::{self, PlanSettings};
use crate::replica::ReplicaId;

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn job_with(policy_yaml: &str) -> TrainingJob {
    let yaml = format!(
        r#"
apiVersion: kubetrain.io/v1alpha1
kind: TrainingJob
metadata: {{name: j, namespace: ns, uid: u1, generation: 2}}
spec:
  replicaSpecs:
    ps: {{replicas: 1, restartPolicy: OnFailure}}
    worker: {{replicas: 2, restartPolicy: {policy_yaml}}}
  training:
    model: {{kind: softmax}}
    dataset: {{builtin: digits}}
    optimizer: {{kind: sgd}}
"#
    );
    JobFixture::from_yaml(&yaml).build()
}

fn job() -> TrainingJob {
    job_with("ExitCode")
}

fn pod(job: &TrainingJob, role: Role, index: usize) -> Pod {
    let mut pod = plan::pod(job, ReplicaId { role, index }, &PlanSettings::default());
    pod.metadata.uid = Some(format!("{}-uid", pod.name_any()));
    pod.metadata.creation_timestamp = Some(Time(t(0)));
    pod
}

fn with_phase(mut pod: Pod, phase: &str) -> Pod {
    let ready = phase == "Running";
    pod.status = Some(PodStatus {
        phase: Some(phase.into()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            ..PodCondition::default()
        }]),
        container_statuses: Some(vec![ContainerStatus {
            name: "trainer".into(),
            ..ContainerStatus::default()
        }]),
        ..PodStatus::default()
    });
    pod
}

fn exited(mut pod: Pod, code: i32) -> Pod {
    let phase = if code == 0 { "Succeeded" } else { "Failed" };
    pod = with_phase(pod, phase);
    let status = pod.status.as_mut().unwrap();
    status.container_statuses.as_mut().unwrap()[0].state = Some(ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: code,
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    });
    pod
}

fn restarted(mut pod: Pod, times: i32, last_code: i32) -> Pod {
    let status = pod.status.as_mut().unwrap();
    let container = &mut status.container_statuses.as_mut().unwrap()[0];
    container.restart_count = times;
    container.last_state = Some(ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: last_code,
            finished_at: Some(Time(t(5))),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    });
    pod
}

fn all_running(job: &TrainingJob) -> Vec<Pod> {
    vec![
        with_phase(pod(job, Role::Ps, 0), "Running"),
        with_phase(pod(job, Role::Worker, 0), "Running"),
        with_phase(pod(job, Role::Worker, 1), "Running"),
    ]
}

/// The job as the API server would hold it after the status of `d` was written.
fn after(job: &TrainingJob, d: &Decision) -> TrainingJob {
    let mut next = job.clone();
    next.status = Some(d.status.clone());
    next
}

fn state(d: &Decision) -> (&str, &str) {
    let c = d
        .status
        .conditions
        .iter()
        .find(|c| c.is_true())
        .expect("a True condition");
    (c.type_.as_str(), c.reason.as_str())
}

fn condition<'a>(d: &'a Decision, type_: &str) -> &'a JobCondition {
    d.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap()
}

/// A user's own TensorFlow job: chief + 1 PS + 2 workers + evaluator, no spec.training.
fn tensorflow_job(clean: &str) -> TrainingJob {
    let template = "{spec: {containers: [{name: tensorflow, image: tf, command: [python, t.py]}]}}";
    let yaml = format!(
        r#"
apiVersion: kubetrain.io/v1alpha1
kind: TrainingJob
metadata: {{name: tf, namespace: ns, uid: u1, generation: 1}}
spec:
  replicaSpecs:
    chief: {{replicas: 1, restartPolicy: OnFailure, template: {template}}}
    ps: {{replicas: 1, restartPolicy: OnFailure, template: {template}}}
    worker: {{replicas: 2, restartPolicy: OnFailure, template: {template}}}
    evaluator: {{replicas: 1, restartPolicy: OnFailure, template: {template}}}
  successPolicy: AllWorkers
  runPolicy: {{backoffLimit: 1, cleanPodPolicy: {clean}}}
"#
    );
    JobFixture::from_yaml(&yaml).build()
}
fn tensorflow_pods(job: &TrainingJob, chief: Pod) -> Vec<Pod> {
    vec![
        chief,
        with_phase(pod(job, Role::Ps, 0), "Running"),
        with_phase(pod(job, Role::Worker, 0), "Running"),
        with_phase(pod(job, Role::Worker, 1), "Running"),
        with_phase(pod(job, Role::Evaluator, 0), "Running"),
    ]
}
fn deleted(d: &Decision) -> Vec<String> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::DeletePod { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect()
}

mod chief_and_evaluator;
mod cleanup;
mod gang_admission;
mod lifecycle;
mod policies;
mod replicas;
