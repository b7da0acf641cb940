//! The operator against a real API server (DESIGN.md §6.3): the controller runs
//! in-process, restricted to the test's namespace, and the tests play the kubelet by
//! writing pod status by hand. They check what the exact-request tests cannot: that the
//! server accepts what the operator sends (server-side apply of pods and Service, status
//! through the subresource, events.k8s.io/v1 Events), that watches drive reconciles, and
//! that a settled job causes no writes.
//!
//! They need `etcd` and a `kube-apiserver` from `tests/envtest/install.sh`, and fail
//! (never skip) without them.

use kubetrain_api::fixtures::JobFixture;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams};
use kube::{Resource, ResourceExt};
use kubetrain_api::condition::{reasons, types};
use kubetrain_api::contract::{self, ClusterSpec, Role};
use kubetrain_api::{MANAGER, RestartPolicy, TrainingJob};
use kubetrain_e2e::envtest::{self, TestNamespace, server};
use kubetrain_e2e::metrics_text;
use kubetrain_e2e::operator::{
    JobWatch, OperatorTask, assert_unchanged_for, condition, condition_true, lifecycle,
    pod_summary, set_pod_running, set_pod_terminated, wait_for_object, wait_for_pods, wait_until,
};
use serde_json::{Value, json};

/// A fresh namespace with the CRD installed and the operator watching it.
async fn setup(prefix: &str) -> (TestNamespace, OperatorTask) {
    let server = server().await;
    server.install_crd().await.unwrap_or_else(|e| panic!("{e}"));
    let ns = server
        .namespace(prefix)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let operator = OperatorTask::start(&ns);
    (ns, operator)
}

/// A manifest file as a typed TrainingJob.
fn load(path: &Path) -> TrainingJob {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    JobFixture::from_yaml(&text).build()
}

/// The quickstart example (1 PS, 2 workers under ExitCode) under another name.
fn quickstart(name: &str) -> TrainingJob {
    JobFixture::quickstart().name(name).build()
}

async fn create(ns: &TestNamespace, job: &TrainingJob) -> TrainingJob {
    ns.api::<TrainingJob>()
        .create(&PostParams::default(), job)
        .await
        .unwrap_or_else(|e| panic!("create TrainingJob {}: {e}", job.name_any()))
}

fn replicas(job: &TrainingJob, role: Role) -> usize {
    job.spec.replica_specs.replicas(role)
}

fn pod_names(job: &str, ps: usize, workers: usize) -> Vec<String> {
    pod_names_of_roles(job, &[(Role::Ps, ps), (Role::Worker, workers)])
}

/// `<job>-<role>-<i>` for `n` pods of each role, sorted.
fn pod_names_of_roles(job: &str, counts: &[(Role, usize)]) -> Vec<String> {
    let mut names: Vec<String> = counts
        .iter()
        .flat_map(|&(role, n)| (0..n).map(move |i| contract::pod_name(job, role, i)))
        .collect();
    names.sort();
    names
}

/// Waits until the job has exactly the pods `names` (sorted), none terminating.
async fn wait_for_exactly(pods: &Api<Pod>, job: &str, names: &[String]) -> Vec<Pod> {
    wait_for_pods(pods, job, &format!("exactly {names:?}"), |list| {
        list.iter().map(|p| p.name_any()).collect::<Vec<_>>() == names
            && list.iter().all(|p| p.metadata.deletion_timestamp.is_none())
    })
    .await
}

async fn set_running(pods: &Api<Pod>, names: &[String]) {
    for name in names {
        set_pod_running(pods, name)
            .await
            .unwrap_or_else(|e| panic!("set pod {name} Running: {e}"));
    }
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn true_lifecycle_count(job: &TrainingJob) -> usize {
    // Counted, not `lifecycle()`, which takes the first: exactly one must be True.
    job.status.as_ref().map_or(0, |s| {
        s.conditions
            .iter()
            .filter(|c| c.is_true() && types::LIFECYCLE.contains(&c.type_.as_str()))
            .count()
    })
}

/// The one controller owner reference of `object`, pointing at `job`.
fn assert_controlled_by(what: &str, owners: Option<&Vec<OwnerReference>>, job: &TrainingJob) {
    let owners = owners.unwrap_or_else(|| panic!("{what} has no ownerReferences"));
    let controllers: Vec<_> = owners
        .iter()
        .filter(|o| o.controller == Some(true))
        .collect();
    assert_eq!(controllers.len(), 1, "{what}: {owners:?}");
    let owner = controllers[0];
    assert_eq!(owner.api_version, "kubetrain.io/v1alpha1", "{what}");
    assert_eq!(owner.kind, "TrainingJob", "{what}");
    assert_eq!(owner.name, job.name_any(), "{what}");
    assert_eq!(Some(&owner.uid), job.metadata.uid.as_ref(), "{what}");
}

/// The container the contract env goes into: `trainer`, else `tensorflow`, else the first.
fn main_container(pod: &Pod) -> &Container {
    let containers = &pod.spec.as_ref().expect("pod spec").containers;
    ["trainer", "tensorflow"]
        .iter()
        .find_map(|n| containers.iter().find(|c| c.name == *n))
        .or_else(|| containers.first())
        .unwrap_or_else(|| panic!("pod {} has no containers", pod.name_any()))
}

fn env_map(container: &Container) -> BTreeMap<String, String> {
    container
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
        .collect()
}

/// Everything DESIGN.md §2 and §5 promise about one pod of `job`.
fn check_pod(pod: &Pod, job: &TrainingJob, role: Role, index: usize) {
    let ns = job.namespace().expect("namespace");
    let name = job.name_any();
    let pod_name = pod.name_any();
    assert_eq!(pod_name, contract::pod_name(&name, role, index));

    let labels = pod.labels();
    assert_eq!(
        labels.get(contract::LABEL_JOB_NAME),
        Some(&name),
        "{pod_name}"
    );
    assert_eq!(
        labels.get(contract::LABEL_ROLE).map(String::as_str),
        Some(role.as_str()),
        "{pod_name}"
    );
    assert_eq!(
        labels.get(contract::LABEL_INDEX),
        Some(&index.to_string()),
        "{pod_name}"
    );

    let spec = pod.spec.as_ref().expect("pod spec");
    assert_eq!(spec.hostname.as_deref(), Some(pod_name.as_str()));
    assert_eq!(spec.subdomain.as_deref(), Some(name.as_str()));
    assert_controlled_by(&pod_name, pod.metadata.owner_references.as_ref(), job);

    let replica = job
        .spec
        .replica_specs
        .get(role)
        .unwrap_or_else(|| panic!("{pod_name}: the job has no {role} spec"));
    let expected_policy = match replica.restart_policy {
        RestartPolicy::Never | RestartPolicy::ExitCode => "Never",
        RestartPolicy::OnFailure => "OnFailure",
        RestartPolicy::Always => "Always",
    };
    assert_eq!(
        spec.restart_policy.as_deref(),
        Some(expected_policy),
        "{pod_name}: replica restartPolicy {:?}",
        replica.restart_policy
    );

    let container = main_container(pod);
    let env = env_map(container);
    let cluster = ClusterSpec::for_job(
        &name,
        &ns,
        |role| replicas(job, role),
        contract::DEFAULT_PORT,
    );
    let got_cluster = ClusterSpec::from_env(
        env.get(contract::ENV_CLUSTER)
            .unwrap_or_else(|| panic!("{pod_name}: no {}: {env:?}", contract::ENV_CLUSTER)),
    )
    .expect("KUBETRAIN_CLUSTER parses");
    assert_eq!(got_cluster, cluster, "{pod_name}");
    assert_eq!(
        got_cluster.worker[0],
        format!("{name}-worker-0.{name}.{ns}.svc:2222"),
        "{pod_name}"
    );
    assert_eq!(
        env.get(contract::ENV_ROLE).map(String::as_str),
        Some(role.as_str()),
        "{pod_name}"
    );
    assert_eq!(
        env.get(contract::ENV_INDEX),
        Some(&index.to_string()),
        "{pod_name}"
    );
    assert_eq!(
        env.get(contract::ENV_JOB),
        Some(&format!("{ns}/{name}")),
        "{pod_name}"
    );
    let tf_config: Value = serde_json::from_str(
        env.get(contract::ENV_TF_CONFIG)
            .unwrap_or_else(|| panic!("{pod_name}: no TF_CONFIG")),
    )
    .expect("TF_CONFIG is JSON");
    assert_eq!(
        tf_config["task"],
        json!({"type": role.as_str(), "index": index}),
        "{pod_name}"
    );
    assert_eq!(tf_config["cluster"]["worker"], json!(cluster.worker));
    if cluster.ps.is_empty() {
        assert!(tf_config["cluster"].get("ps").is_none(), "{tf_config}");
    } else {
        assert_eq!(tf_config["cluster"]["ps"], json!(cluster.ps));
    }
    match &job.spec.training {
        Some(training) => {
            let got: Value = serde_json::from_str(
                env.get(contract::ENV_TRAINING)
                    .unwrap_or_else(|| panic!("{pod_name}: no KUBETRAIN_TRAINING")),
            )
            .expect("KUBETRAIN_TRAINING is JSON");
            assert_eq!(
                got,
                serde_json::to_value(training).expect("JSON"),
                "{pod_name}"
            );
        }
        None => assert!(
            !env.contains_key(contract::ENV_TRAINING),
            "{pod_name}: KUBETRAIN_TRAINING without a training block"
        ),
    }
    let ports = container.ports.as_deref().unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|p| p.container_port == 2222 && p.name.as_deref() == Some(contract::PORT_NAME)),
        "{pod_name}: ports {ports:?}"
    );

    assert_applied_by_operator(&pod_name, &pod.metadata);
}

/// The object's managedFields show the operator's server-side apply.
fn assert_applied_by_operator(what: &str, metadata: &ObjectMeta) {
    let managers: Vec<(Option<&str>, Option<&str>)> = metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| (m.manager.as_deref(), m.operation.as_deref()))
        .collect();
    assert!(
        managers.contains(&(Some(MANAGER), Some("Apply"))),
        "{what}: managedFields {managers:?}"
    );
}

#[tokio::test]
async fn every_example_gets_its_pods_and_headless_service() {
    let (ns, _operator) = setup("op-examples").await;
    let dir = envtest::workspace_root().join("examples");
    let jobs_in = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .expect("examples/")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
            .collect()
    };
    let mut files = jobs_in(&dir);
    files.extend(jobs_in(&dir.join("tensorflow")));
    files.sort();
    assert!(files.len() >= 7, "examples: {files:?}");
    for path in &files {
        let out = server()
            .await
            .kubectl()
            .args(["apply", "-n", &ns.name, "-f"])
            .arg(path)
            .output()
            .await
            .expect("run kubectl");
        assert!(
            out.status.success(),
            "kubectl apply {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let pods: Api<Pod> = ns.api();
    let services: Api<Service> = ns.api();
    for path in &files {
        let job_name = load(path).name_any();
        // The job as stored: server-side defaults applied, uid set.
        let mut watch = JobWatch::new(&ns, &job_name);
        let job = watch.until_state(types::CREATED).await;
        assert_eq!(
            condition(&job, types::CREATED).map(|c| c.reason.as_str()),
            Some(reasons::PODS_CREATED)
        );
        let counts: Vec<(Role, usize)> =
            Role::ALL.iter().map(|&r| (r, replicas(&job, r))).collect();
        let expected = pod_names_of_roles(&job_name, &counts);
        let list = wait_for_exactly(&pods, &job_name, &expected).await;
        for pod in &list {
            let labels = pod.labels();
            let role: Role = labels[contract::LABEL_ROLE].parse().expect("role label");
            let index: usize = labels[contract::LABEL_INDEX].parse().expect("index label");
            check_pod(pod, &job, role, index);
        }

        let service = wait_for_object(services.clone(), &job_name, "existing", |s| s.is_some())
            .await
            .expect("service");
        let spec = service.spec.as_ref().expect("service spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "headless");
        assert_eq!(
            spec.selector
                .as_ref()
                .and_then(|s| s.get(contract::LABEL_JOB_NAME)),
            Some(&job_name)
        );
        let ports: Vec<_> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.port))
            .collect();
        assert_eq!(ports, [(Some(contract::PORT_NAME), 2222)], "{job_name}");
        assert_controlled_by(
            &format!("service {job_name}"),
            service.metadata.owner_references.as_ref(),
            &job,
        );
        assert_applied_by_operator(&format!("service {job_name}"), &service.metadata);
    }
}

#[tokio::test]
async fn pod_phases_drive_the_job_from_running_to_succeeded() {
    let (ns, _operator) = setup("op-succeed").await;
    let pods: Api<Pod> = ns.api();
    let mut watch = JobWatch::new(&ns, "happy");
    let created = create(&ns, &quickstart("happy")).await;
    let all = pod_names("happy", 1, 2);
    wait_for_exactly(&pods, "happy", &all).await;

    set_running(&pods, &all).await;
    let running = watch
        .until("Running with 2/2 workers ready", |j| {
            lifecycle(j).is_some_and(|c| c.type_ == types::RUNNING)
                && j.status.as_ref().and_then(|s| s.workers_ready.as_deref()) == Some("2/2")
        })
        .await;
    let status = running.status.as_ref().expect("status");
    assert_eq!(
        lifecycle(&running).map(|c| c.reason.as_str()),
        Some(reasons::ALL_REPLICAS_RUNNING)
    );
    assert_eq!(status.observed_generation, created.metadata.generation);
    assert!(status.start_time.is_some(), "startTime: {status:#?}");
    assert!(status.completion_time.is_none(), "{status:#?}");
    let (ps, worker) = (&status.replica_statuses.ps, &status.replica_statuses.worker);
    assert_eq!((ps.active, ps.ready, ps.failed), (1, 1, 0), "{status:#?}");
    assert_eq!(
        (worker.active, worker.ready, worker.failed),
        (2, 2, 0),
        "{status:#?}"
    );
    assert_eq!(true_lifecycle_count(&running), 1, "{status:#?}");

    // As with the real trainer: the chief tells the parameter server to shut down (it
    // exits 0), then finishes itself. ChiefWorker success.
    set_pod_terminated(&pods, "happy-ps-0", 0)
        .await
        .expect("ps exits 0");
    set_pod_terminated(&pods, "happy-worker-0", 0)
        .await
        .expect("chief exits 0");
    let done = watch.until_state(types::SUCCEEDED).await;
    let status = done.status.as_ref().expect("status");
    assert_eq!(
        lifecycle(&done).map(|c| c.reason.as_str()),
        Some(reasons::JOB_SUCCEEDED)
    );
    assert_eq!(true_lifecycle_count(&done), 1, "{status:#?}");
    assert_eq!(
        condition(&done, types::RUNNING).map(|c| (c.status.as_str(), c.reason.as_str())),
        Some(("False", reasons::SUPERSEDED))
    );
    let (start, end) = (
        status.start_time.as_ref().expect("startTime").0,
        status.completion_time.as_ref().expect("completionTime").0,
    );
    assert!(start <= end, "startTime {start} after completionTime {end}");
    assert_eq!(status.observed_generation, created.metadata.generation);

    // cleanPodPolicy Running (the default): "pods still running (always including the
    // parameter servers); finished pods stay for their logs". The PS goes although it has
    // finished, so does the still-running worker; only the chief stays.
    let left = wait_for_exactly(&pods, "happy", &["happy-worker-0".to_string()]).await;
    assert_eq!(phase(&left[0]), "Succeeded");
    wait_for_object(ns.api::<Service>(), "happy", "deleted", |s| s.is_none()).await;
    let settled = watch
        .until("replica counts after clean-up", |j| {
            j.status.as_ref().is_some_and(|s| {
                s.replica_statuses.ps.active == 0
                    && s.replica_statuses.worker.active == 0
                    && s.replica_statuses.worker.succeeded == 1
            })
        })
        .await;
    assert!(condition_true(&settled, types::SUCCEEDED));
    assert_eq!(
        settled
            .status
            .as_ref()
            .and_then(|s| s.completion_time.clone()),
        done.status.as_ref().and_then(|s| s.completion_time.clone()),
        "completionTime is kept"
    );
}

#[tokio::test]
async fn a_failed_worker_under_never_fails_the_job() {
    let (ns, _operator) = setup("op-never").await;
    let pods: Api<Pod> = ns.api();
    let mut job = quickstart("strict");
    job.spec.replica_specs.worker.restart_policy = RestartPolicy::Never;
    let mut watch = JobWatch::new(&ns, "strict");
    create(&ns, &job).await;
    let all = pod_names("strict", 1, 2);
    wait_for_exactly(&pods, "strict", &all).await;
    set_running(&pods, &all).await;
    watch.until_state(types::RUNNING).await;

    set_pod_terminated(&pods, "strict-worker-1", 1)
        .await
        .expect("worker exits 1");
    let failed = watch.until_state(types::FAILED).await;
    let c = lifecycle(&failed).expect("lifecycle");
    assert_eq!(c.reason, reasons::POD_FAILED, "{c:?}");
    assert!(
        c.message.contains("strict-worker-1") && c.message.contains("exit code 1"),
        "the message names the pod and the exit code: {:?}",
        c.message
    );
    assert!(
        failed
            .status
            .as_ref()
            .is_some_and(|s| s.completion_time.is_some())
    );
    assert_eq!(true_lifecycle_count(&failed), 1);

    // Running pods are cleaned up; the failed one is kept for its logs.
    let left = wait_for_exactly(&pods, "strict", &["strict-worker-1".to_string()]).await;
    assert_eq!(phase(&left[0]), "Failed");
}

#[tokio::test]
async fn exit_code_137_recreates_the_pod_under_exit_code() {
    let (ns, _operator) = setup("op-exitcode").await;
    let pods: Api<Pod> = ns.api();
    let mut watch = JobWatch::new(&ns, "retry");
    create(&ns, &quickstart("retry")).await;
    let all = pod_names("retry", 1, 2);
    let first = wait_for_exactly(&pods, "retry", &all).await;
    let old_uid = first
        .iter()
        .find(|p| p.name_any() == "retry-worker-1")
        .and_then(|p| p.uid())
        .expect("uid");
    set_running(&pods, &all).await;
    watch.until_state(types::RUNNING).await;

    // Killed by a signal (128 + 9): retryable under ExitCode.
    set_pod_terminated(&pods, "retry-worker-1", 137)
        .await
        .expect("worker killed");
    let restarting = watch.until_state(types::RESTARTING).await;
    assert_eq!(
        lifecycle(&restarting).map(|c| c.reason.as_str()),
        Some(reasons::POD_RESTARTING)
    );

    let replacement = wait_for_pods(&pods, "retry", "a new retry-worker-1", |list| {
        list.iter().any(|p| {
            p.name_any() == "retry-worker-1"
                && p.uid().as_ref() != Some(&old_uid)
                && p.metadata.deletion_timestamp.is_none()
        })
    })
    .await
    .into_iter()
    .find(|p| p.name_any() == "retry-worker-1")
    .expect("replacement");
    assert_eq!(phase(&replacement), "Pending", "a fresh pod");
    assert_eq!(
        replacement
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref()),
        Some("Never"),
        "ExitCode pods never restart in place"
    );

    set_pod_running(&pods, "retry-worker-1")
        .await
        .expect("replacement runs");
    let back = watch
        .until("Running again after the restart", |j| {
            lifecycle(j).is_some_and(|c| c.type_ == types::RUNNING)
                && j.status.as_ref().and_then(|s| s.workers_ready.as_deref()) == Some("2/2")
        })
        .await;
    let history = watch.history().to_vec();
    let restart_at = history
        .iter()
        .position(|s| s.starts_with("Restarting/"))
        .expect("Restarting seen");
    assert!(
        history[restart_at..]
            .iter()
            .any(|s| s.starts_with("Running/")),
        "Running after Restarting: {history:?}"
    );
    let status = back.status.as_ref().expect("status");
    assert_eq!(status.replica_statuses.worker.restarts, 1, "{status:#?}");
    assert_eq!(status.replica_statuses.ps.restarts, 0, "{status:#?}");
    let recreated = status
        .recreated_pods
        .get("retry-worker-1")
        .unwrap_or_else(|| panic!("recreatedPods: {status:#?}"));
    assert_eq!(recreated.count, 1);
    assert_eq!(recreated.last_exit_code, Some(137));
    assert_eq!(recreated.last_uid, old_uid);
    assert_eq!(true_lifecycle_count(&back), 1, "{status:#?}");
}

/// Warning Events with reason InvalidSpec about `job`, recorded by the operator.
async fn wait_for_invalid_spec_event(
    events: &Api<Event>,
    job: &str,
    operator: &OperatorTask,
) -> Event {
    wait_until(
        &format!("a Warning InvalidSpec Event about {job}"),
        || async {
            let list = events
                .list(&ListParams::default())
                .await
                .map_err(|e| format!("list events: {e}"))?
                .items;
            list.iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reasons::INVALID_SPEC)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(job)
                })
                .cloned()
                .ok_or_else(|| {
                    let seen: Vec<_> = list
                        .iter()
                        .map(|e| {
                            (
                                e.reason.clone(),
                                e.regarding.as_ref().and_then(|r| r.name.clone()),
                            )
                        })
                        .collect();
                    format!(
                        "events {seen:?}; operator reconcile metrics:\n{}",
                        reconcile_metrics(operator)
                    )
                })
        },
    )
    .await
}

/// The operator's reconcile counters (runs and errors by kind), for failure messages.
fn reconcile_metrics(operator: &OperatorTask) -> String {
    operator
        .context
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("kubetrain_reconcile") && !l.contains("_bucket"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn check_invalid_spec_event(event: &Event) {
    assert_eq!(event.type_.as_deref(), Some("Warning"), "{event:?}");
    assert_eq!(
        event.reporting_controller.as_deref(),
        Some(MANAGER),
        "{event:?}"
    );
    assert_eq!(
        event.reporting_instance.as_deref(),
        Some("test"),
        "{event:?}"
    );
    let regarding = event.regarding.as_ref().expect("regarding");
    assert_eq!(regarding.kind.as_deref(), Some("TrainingJob"), "{event:?}");
}

#[tokio::test]
async fn invalid_specs_fail_without_pods_and_with_a_warning_event() {
    let (ns, operator) = setup("op-invalid").await;
    // Admission cannot catch either: the schema has no cross-field rules (no CEL on 1.20)
    // and a template is preserved as written.
    let mut pipelined = quickstart("pipelined");
    pipelined.spec.training.as_mut().expect("training").pipeline =
        Some(serde_json::from_value(json!({"microBatches": 4})).expect("pipeline"));
    let mut empty = quickstart("empty");
    empty.spec.replica_specs.worker.template =
        Some(serde_json::from_value(json!({"spec": {"containers": []}})).expect("template"));

    let cases = [
        (pipelined, "spec.training.pipeline"),
        (empty, "spec.replicaSpecs.worker.template.spec.containers"),
    ];
    let events: Api<Event> = ns.api();
    for (job, field) in &cases {
        let name = job.name_any();
        let mut watch = JobWatch::new(&ns, &name);
        create(&ns, job).await;
        let failed = watch.until_state(types::FAILED).await;
        let c = lifecycle(&failed).expect("lifecycle");
        assert_eq!(c.reason, reasons::INVALID_SPEC, "{c:?}");
        assert!(
            c.message.contains(field),
            "{name}: the message names {field}: {:?}",
            c.message
        );
        assert_eq!(true_lifecycle_count(&failed), 1);
        let event = wait_for_invalid_spec_event(&events, &name, &operator).await;
        check_invalid_spec_event(&event);
        assert!(
            event.note.as_deref().is_some_and(|n| n.contains(field)),
            "{event:?}"
        );
        assert_eq!(event.action.as_deref(), Some("Validate"), "{event:?}");
    }

    // By now both jobs have been reconciled to Failed and their events written; nothing
    // was ever created for them.
    let pods = ns
        .api::<Pod>()
        .list(&ListParams::default())
        .await
        .expect("pods");
    assert!(pods.items.is_empty(), "pods: {}", pod_summary(&pods.items));
    let services = ns
        .api::<Service>()
        .list(&ListParams::default())
        .await
        .expect("services");
    assert!(services.items.is_empty(), "services: {:?}", services.items);
}

/// The operator's reconcile counter.
fn reconciles(operator: &OperatorTask) -> f64 {
    let samples = metrics_text::samples(&operator.context.metrics.encode());
    metrics_text::sum(&samples, "kubetrain_reconciles_total", &[])
}

#[tokio::test]
async fn finished_jobs_are_not_reconciled_again() {
    let (ns, operator) = setup("op-finished").await;
    let pods: Api<Pod> = ns.api();
    let names = ["done-a", "done-b", "done-c"];
    for name in names {
        create(&ns, &quickstart(name)).await;
    }
    for name in names {
        let all = pod_names(name, 1, 2);
        wait_for_exactly(&pods, name, &all).await;
        set_running(&pods, &all).await;
        set_pod_terminated(&pods, &format!("{name}-worker-0"), 0)
            .await
            .unwrap_or_else(|e| panic!("{name}: chief exits 0: {e}"));
    }
    for name in names {
        let mut watch = JobWatch::new(&ns, name);
        watch.until_state(types::SUCCEEDED).await;
        // Settled: clean-up done (only the chief's pod left) and counted in the status.
        wait_for_exactly(&pods, name, &[format!("{name}-worker-0")]).await;
        watch
            .until("replica counts after clean-up", |j| {
                j.status.as_ref().is_some_and(|s| {
                    s.replica_statuses.ps.active == 0 && s.replica_statuses.worker.active == 0
                })
            })
            .await;
    }
    let versions = || async {
        ns.api::<TrainingJob>()
            .list(&ListParams::default())
            .await
            .expect("jobs")
            .items
            .iter()
            .map(|j| (j.name_any(), j.resource_version()))
            .collect::<Vec<_>>()
    };
    // The last clean-up's own events (pod deletions) may still trigger one reconcile:
    // start counting once a second passes without one.
    let (mut last, mut since) = (reconciles(&operator), tokio::time::Instant::now());
    let deadline = since + Duration::from_secs(60);
    while since.elapsed() < Duration::from_secs(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reconciles never stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = reconciles(&operator);
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
        }
    }
    let (before, versions_before) = (reconciles(&operator), versions().await);

    // An observation window, not synchronisation: a periodic requeue of finished jobs
    // (a deadline, a progress ask, a resync) would fall inside it.
    tokio::time::sleep(Duration::from_secs(60)).await;

    assert_eq!(
        reconciles(&operator),
        before,
        "finished jobs were reconciled again; operator metrics:\n{}",
        reconcile_metrics(&operator)
    );
    assert_eq!(
        versions().await,
        versions_before,
        "a finished job was written"
    );
}

#[tokio::test]
async fn a_settled_running_job_causes_no_writes() {
    let (ns, _operator) = setup("op-quiet").await;
    let pods: Api<Pod> = ns.api();
    let mut watch = JobWatch::new(&ns, "steady");
    create(&ns, &quickstart("steady")).await;
    let all = pod_names("steady", 1, 2);
    wait_for_exactly(&pods, "steady", &all).await;
    set_running(&pods, &all).await;
    watch
        .until("Running with 2/2 workers ready", |j| {
            lifecycle(j).is_some_and(|c| c.type_ == types::RUNNING)
                && j.status.as_ref().and_then(|s| s.workers_ready.as_deref()) == Some("2/2")
        })
        .await;
    let versions = |list: &[Pod]| -> Vec<(String, Option<String>)> {
        list.iter()
            .map(|p| (p.name_any(), p.resource_version()))
            .collect()
    };
    let before = versions(&pods.list(&ListParams::default()).await.expect("pods").items);
    let service_before = ns
        .api::<Service>()
        .get("steady")
        .await
        .expect("service")
        .resource_version();

    // Over 3 s nothing may change: no status rewrite (timestamps, reordering), no re-apply.
    watch.assert_quiet_for(Duration::from_secs(3)).await;

    let after = versions(&pods.list(&ListParams::default()).await.expect("pods").items);
    assert_eq!(before, after, "pods were rewritten");
    let service_after = ns
        .api::<Service>()
        .get("steady")
        .await
        .expect("service")
        .resource_version();
    assert_eq!(service_before, service_after, "the Service was rewritten");
}

#[tokio::test]
async fn an_undecodable_job_fails_and_the_watch_keeps_working() {
    let (ns, operator) = setup("op-undecodable").await;
    // The schema preserves a template as written, so the server stores a pod spec whose
    // containers are a string; the operator's types cannot read it.
    let raw: Api<DynamicObject> = Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &ApiResource::erase::<TrainingJob>(&()),
    );
    let mut broken = serde_json::to_value(quickstart("broken")).expect("JSON");
    broken["spec"]["replicaSpecs"]["worker"]["template"] =
        json!({"spec": {"containers": "not-a-list"}});
    let broken: DynamicObject = serde_json::from_value(broken).expect("object");
    raw.create(&PostParams::default(), &broken)
        .await
        .expect("the schema accepts the broken template");

    let failed = wait_for_object(raw.clone(), "broken", "Failed/InvalidSpec", |j| {
        j.and_then(|j| j.data.pointer("/status/conditions"))
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["type"] == types::FAILED
                        && c["status"] == "True"
                        && c["reason"] == reasons::INVALID_SPEC
                })
            })
    })
    .await
    .expect("job");
    let message = failed.data["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == types::FAILED))
        .and_then(|c| c["message"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("cannot be read"), "{message:?}");
    let event = wait_for_invalid_spec_event(&ns.api(), "broken", &operator).await;
    check_invalid_spec_event(&event);
    assert_eq!(
        event.regarding.as_ref().and_then(|r| r.uid.clone()),
        failed.meta().uid,
        "{event:?}"
    );
    // Reported once, then left alone: no rewrite of the status on every pass.
    assert_unchanged_for(raw.clone(), "broken", Duration::from_secs(2)).await;

    // The same watch still delivers other jobs.
    let mut watch = JobWatch::new(&ns, "survivor");
    create(&ns, &quickstart("survivor")).await;
    wait_for_exactly(&ns.api(), "survivor", &pod_names("survivor", 1, 2)).await;
    watch.until_state(types::CREATED).await;
    assert!(!operator.is_finished(), "the controller is still running");
    let pods = ns
        .api::<Pod>()
        .list(&ListParams::default())
        .await
        .expect("pods");
    assert!(
        pods.items
            .iter()
            .all(|p| p.name_any().starts_with("survivor-")),
        "no pods for the broken job: {}",
        pod_summary(&pods.items)
    );
}
