//! Bring your own TensorFlow (issue 17), proven with real TensorFlow (`tensorflow-cpu` from
//! PyPI, see `kubetrain_e2e::tensorflow`), not a stand-in:
//!
//! - TensorFlow's own `TFConfigClusterResolver` reads the TF_CONFIG the operator plans;
//! - a ParameterServerStrategy program (chief + 1 PS + 2 workers), a
//!   MultiWorkerMirroredStrategy program (2 workers, AllWorkers), and a worker that fails
//!   once each reach Succeeded, under `kubetrain local` and end to end (`kubectl apply`,
//!   the operator, the test kubelet);
//! - TensorBoard (issue 20): its event reader and its server (`tensorboard --logdir`)
//!   show the curves the trainer writes under `spec.training.logDir`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::ListParams;
use kubetrain_api::TrainingJob;
use kubetrain_api::condition::types;
use kubetrain_api::contract::{self, Role};
use kubetrain_e2e::envtest::{self, TestNamespace, namespace_with_crd};
use kubetrain_e2e::kubelet::{Kubelet, KubeletConfig};
use kubetrain_e2e::operator::{JobWatch, OperatorTask, lifecycle, wait_until};
use kubetrain_e2e::tensorflow;
use kubetrain_operator::plan::{self, PlanSettings};
use kubetrain_operator::replica;
use tokio::io::AsyncWriteExt;

/// A TensorFlow job here takes tens of seconds (imports alone take several on 2 cores).
const TF_TIMEOUT: Duration = Duration::from_secs(300);

fn root() -> PathBuf {
    envtest::workspace_root()
}

fn load(path: &str) -> TrainingJob {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    kubetrain_api::fixtures::JobFixture::from_yaml(&text)
        .namespace("team")
        .build()
}

/// Runs `script` with the virtualenv's python, `input` on stdin; returns stdout.
async fn run_python(script: &str, input: &str) -> String {
    let mut child = tokio::process::Command::new(tensorflow::python())
        .args(["-c", script])
        .env("TF_CPP_MIN_LOG_LEVEL", "2")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python starts");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(TF_TIMEOUT, child.wait_with_output())
        .await
        .expect("python finishes")
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What TensorFlow's resolver makes of each TF_CONFIG on stdin (a JSON list).
const RESOLVE: &str = r#"
import json, os, sys
import tensorflow as tf
answers = []
for config in json.load(sys.stdin):
    os.environ["TF_CONFIG"] = config
    r = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    answers.append({
        "cluster": r.cluster_spec().as_dict(),
        "task_type": r.task_type,
        "task_id": r.task_id,
    })
print(json.dumps(answers))
"#;

#[tokio::test]
async fn tensorflow_reads_the_tf_config_the_operator_writes() {
    let mut job = load("examples/tensorflow/ps-strategy.yaml");
    let mut evaluator = job.spec.replica_specs.ps.clone().unwrap();
    evaluator.replicas = 1;
    job.spec.replica_specs.evaluator = Some(evaluator);
    let pods = plan::pods(&job, &PlanSettings::default());
    let tf_config = |pod: &Pod| -> String {
        let spec = pod.spec.as_ref().unwrap();
        let container = &spec.containers[plan::main_container_index(&spec.containers)];
        let env = container.env.as_ref().unwrap();
        env.iter()
            .find(|e| e.name == contract::ENV_TF_CONFIG)
            .and_then(|e| e.value.clone())
            .unwrap()
    };
    let configs: Vec<String> = pods.iter().map(tf_config).collect();
    // The resolver takes `environment` from its constructor only, so check it here.
    for config in &configs {
        let value: serde_json::Value = serde_json::from_str(config).unwrap();
        assert_eq!(value["environment"], "cloud", "{config}");
    }
    let answers = run_python(RESOLVE, &serde_json::to_string(&configs).unwrap()).await;
    let answers: Vec<serde_json::Value> = serde_json::from_str(answers.trim()).unwrap();

    let address =
        |role: Role, i: usize| format!("{}:2222", contract::pod_dns_name("tf-ps", "team", role, i));
    let training = serde_json::json!({
        "chief": [address(Role::Chief, 0)],
        "ps": [address(Role::Ps, 0)],
        "worker": [address(Role::Worker, 0), address(Role::Worker, 1)],
    });
    assert_eq!(answers.len(), 5);
    for (pod, answer) in pods.iter().zip(&answers) {
        let replica = replica::ReplicaId::from_pod(pod).unwrap();
        let expected_cluster = if replica.role == Role::Evaluator {
            serde_json::json!({"evaluator": [address(Role::Evaluator, 0)]})
        } else {
            training.clone()
        };
        assert_eq!(
            answer,
            &serde_json::json!({
                "cluster": expected_cluster,
                "task_type": replica.role.as_str(),
                "task_id": replica.index,
            }),
            "{}",
            pod.name_any()
        );
    }
}

/// Runs `kubetrain local` on a manifest with the given `-v` mounts; returns the final job
/// (`-o yaml`) and the run's log directory.
async fn run_local(manifest: &str, volumes: &[(&str, &str)]) -> (TrainingJob, PathBuf, String) {
    let kubetrain = tokio::task::spawn_blocking(|| {
        envtest::workspace_binary("kubetrain-operator", "kubetrain")
    })
    .await
    .unwrap();
    let runs = tempfile::tempdir().unwrap().keep();
    let mut command = tokio::process::Command::new(kubetrain);
    command
        .current_dir(root())
        .args(["local", "-f", manifest, "--no-progress-bars", "-o", "yaml"])
        .arg("--run-dir")
        .arg(&runs)
        .env("PATH", tensorflow::path_with_venv())
        .env("TF_CPP_MIN_LOG_LEVEL", "2")
        .kill_on_drop(true);
    for (host, container) in volumes {
        command.arg("-v").arg(format!("{host}:{container}"));
    }
    let out = tokio::time::timeout(TF_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("kubetrain local -f {manifest} did not finish"))
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let run_dir = std::fs::read_dir(&runs)
        .unwrap()
        .next()
        .expect("a run directory")
        .unwrap()
        .path();
    assert!(
        out.status.success(),
        "kubetrain local -f {manifest}: {}\n{stderr}\n{}",
        out.status,
        logs_of(&run_dir)
    );
    let job: TrainingJob = serde_yaml::from_slice(&out.stdout).unwrap();
    (job, run_dir, stderr)
}

/// Every pod log of a local run, for failure messages.
fn logs_of(run_dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(run_dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("--- {}\n", path.display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn succeeded(job: &TrainingJob) -> bool {
    lifecycle(job).is_some_and(|c| c.type_ == types::SUCCEEDED)
}

#[tokio::test]
async fn ps_strategy_succeeds_under_kubetrain_local() {
    let (job, run_dir, report) = run_local(
        "examples/tensorflow/ps-strategy.yaml",
        &[("examples/tensorflow", "/opt/train")],
    )
    .await;
    assert!(succeeded(&job), "{:?}\n{report}", job.status);
    let status = job.status.unwrap();
    assert_eq!(status.replica_statuses.chief.as_ref().unwrap().succeeded, 1);
    let chief_log = std::fs::read_to_string(run_dir.join("tf-ps-chief-0.log")).unwrap();
    assert!(
        chief_log.contains("final eval loss"),
        "the chief ran the training loop to its end:\n{chief_log}"
    );
    // The servers never exit by themselves; the job ended them (cleanPodPolicy Running).
    assert_eq!(status.replica_statuses.ps.succeeded, 0);
    assert!(
        report.contains("the chief completed successfully"),
        "{report}"
    );
}

#[tokio::test]
async fn multi_worker_mirrored_succeeds_under_kubetrain_local() {
    let (job, _, report) = run_local(
        "examples/tensorflow/multi-worker.yaml",
        &[("examples/tensorflow", "/opt/train")],
    )
    .await;
    assert!(succeeded(&job), "{:?}\n{report}", job.status);
    let status = job.status.unwrap();
    assert_eq!(status.replica_statuses.worker.succeeded, 2, "{status:?}");
    assert_eq!(status.replica_statuses.worker.restarts, 0);
}

#[tokio::test]
async fn a_worker_that_fails_once_is_restarted_under_kubetrain_local() {
    let (job, run_dir, report) = run_local(
        "tests/fixtures/tensorflow/fail-once.yaml",
        &[
            ("examples/tensorflow", "/opt/train"),
            ("tests/fixtures/tensorflow", "/opt/test"),
        ],
    )
    .await;
    assert!(succeeded(&job), "{:?}\n{report}", job.status);
    let status = job.status.unwrap();
    assert_eq!(status.replica_statuses.worker.succeeded, 2, "{status:?}");
    assert_eq!(status.replica_statuses.worker.restarts, 1, "{status:?}");
    let log = std::fs::read_to_string(run_dir.join("tf-fail-once-worker-1.log")).unwrap();
    assert!(log.contains("on purpose"), "{log}");
}

/// The test kubelet running `python` as the virtualenv's.
fn tensorflow_kubelet(ns: &TestNamespace, logs: &Path) -> Kubelet {
    let config = KubeletConfig::new(&ns.name, logs).command("python", tensorflow::python());
    Kubelet::start(ns.client.clone(), config)
}

async fn kubectl(ns: &TestNamespace, args: &[&str]) {
    let server = envtest::shared().await.unwrap();
    let out = server
        .kubectl()
        .current_dir(root())
        .args(["-n", &ns.name])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The names of the job's pods that still exist.
async fn pods_left(ns: &TestNamespace, job: &str) -> Vec<String> {
    let pods: kube::Api<Pod> = ns.api();
    let list = pods
        .list(&ListParams::default().labels(&replica::job_selector(job)))
        .await
        .unwrap();
    let mut names: Vec<String> = list.items.iter().map(|p| p.name_any()).collect();
    names.sort();
    names
}

/// Waits until exactly `expected` of the job's pods are left.
async fn until_pods_left(ns: &TestNamespace, job: &str, expected: &[&str]) {
    wait_until(&format!("{job} to keep only {expected:?}"), || async {
        let left = pods_left(ns, job).await;
        if left == expected {
            Ok(())
        } else {
            Err(format!("pods: {left:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorflow_examples_succeed_end_to_end() {
    let ns = namespace_with_crd("tensorflow").await;
    let logs = tempfile::tempdir().unwrap();
    let kubelet = tensorflow_kubelet(&ns, logs.path());
    let _operator = OperatorTask::start(&ns);
    let mut ps = JobWatch::new(&ns, "tf-ps").with_timeout(TF_TIMEOUT);
    let mut mwms = JobWatch::new(&ns, "tf-mwms").with_timeout(TF_TIMEOUT);

    // As a user would: the kustomization makes the programs' ConfigMap and both jobs.
    kubectl(&ns, &["apply", "-k", "examples/tensorflow"]).await;

    let done = ps.until_state(types::SUCCEEDED).await;
    let status = done.status.unwrap();
    assert_eq!(status.replica_statuses.chief.as_ref().unwrap().succeeded, 1);
    let chief_log = kubelet.logs(&ns.name, "tf-ps-chief-0");
    assert!(chief_log.contains("final eval loss"), "{chief_log}");
    // cleanPodPolicy Running: the serving PS and workers go, the finished chief stays.
    until_pods_left(&ns, "tf-ps", &["tf-ps-chief-0"]).await;

    let done = mwms.until_state(types::SUCCEEDED).await;
    assert_eq!(done.status.unwrap().replica_statuses.worker.succeeded, 2);
    until_pods_left(&ns, "tf-mwms", &["tf-mwms-worker-0", "tf-mwms-worker-1"]).await;
    kubelet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_fails_once_succeeds_end_to_end() {
    let ns = namespace_with_crd("tensorflow-fail-once").await;
    let logs = tempfile::tempdir().unwrap();
    let kubelet = tensorflow_kubelet(&ns, logs.path());
    let _operator = OperatorTask::start(&ns);
    let mut watch = JobWatch::new(&ns, "tf-fail-once").with_timeout(TF_TIMEOUT);

    let program = "--from-file=examples/tensorflow/mwms.py";
    kubectl(
        &ns,
        &["create", "configmap", "tensorflow-programs", program],
    )
    .await;
    let fail_once = "--from-file=tests/fixtures/tensorflow/fail_once.py";
    kubectl(
        &ns,
        &["create", "configmap", "tensorflow-fail-once", fail_once],
    )
    .await;
    kubectl(
        &ns,
        &["apply", "-f", "tests/fixtures/tensorflow/fail-once.yaml"],
    )
    .await;

    let done = watch.until_state(types::SUCCEEDED).await;
    let status = done.status.unwrap();
    assert_eq!(status.replica_statuses.worker.succeeded, 2, "{status:?}");
    assert_eq!(status.replica_statuses.worker.restarts, 1, "{status:?}");
    assert!(
        kubelet
            .logs(&ns.name, "tf-fail-once-worker-1")
            .contains("on purpose")
    );
    // cleanPodPolicy Running keeps the finished workers for their logs.
    until_pods_left(
        &ns,
        "tf-fail-once",
        &["tf-fail-once-worker-0", "tf-fail-once-worker-1"],
    )
    .await;
    kubelet.shutdown().await;
}

/// Every scalar TensorBoard's own event reader finds under a log folder (JSON on stdin):
/// {run: {tag: [[step, value], ...]}}.
const READ_EVENTS: &str = r#"
import json, os, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
log_dir = sys.stdin.read().strip()
runs = {}
for run in sorted(os.listdir(log_dir)):
    path = os.path.join(log_dir, run)
    if not os.path.isdir(path) or not any("tfevents" in f for f in os.listdir(path)):
        continue
    events = EventAccumulator(path, size_guidance={"scalars": 0})
    events.Reload()
    runs[run] = {
        tag: [[e.step, e.value] for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }
print(json.dumps(runs))
"#;

/// What a running TensorBoard server (`tensorboard --logdir`, its scalars plugin over
/// HTTP) shows for a log folder. stdin: {"log_dir": ..., "expect": Runs}; waits until the
/// server has loaded that many points of every expected series (it loads in the
/// background), then prints what it serves in the same shape.
const SERVE_EVENTS: &str = r#"
import json, sys, time, urllib.parse, urllib.request
from tensorboard import program
given = json.load(sys.stdin)
board = program.TensorBoard()
board.configure(argv=[None, "--logdir", given["log_dir"], "--host", "127.0.0.1",
                      "--port", "0", "--load_fast", "false"])
url = board.launch()
def get(path):
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.load(r)
def served():
    tags = get("data/plugin/scalars/tags")
    return {
        run: {
            tag: [[p[1], p[2]] for p in get("data/plugin/scalars/scalars?" +
                  urllib.parse.urlencode({"run": run, "tag": tag}))]
            for tag in tags[run]
        }
        for run in tags
    }
def loaded(runs):
    return all(len(runs.get(run, {}).get(tag, [])) == len(points)
               for run, tags in given["expect"].items() for tag, points in tags.items())
deadline = time.monotonic() + 120
runs = served()
while not loaded(runs) and time.monotonic() < deadline:
    time.sleep(0.2)
    runs = served()
print(json.dumps(runs))
"#;

type Runs = std::collections::BTreeMap<String, std::collections::BTreeMap<String, Vec<(u64, f64)>>>;

async fn tensorboard_runs(log_dir: &Path) -> Runs {
    let out = run_python(READ_EVENTS, &log_dir.display().to_string()).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

async fn tensorboard_serves(log_dir: &Path, expect: &Runs) -> Runs {
    let given = serde_json::json!({"log_dir": log_dir, "expect": expect});
    let out = run_python(SERVE_EVENTS, &given.to_string()).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn last(runs: &Runs, run: &str, tag: &str) -> (u64, f64) {
    *runs
        .get(run)
        .and_then(|tags| tags.get(tag))
        .and_then(|points| points.last())
        .unwrap_or_else(|| panic!("no {run}/{tag} in {runs:?}"))
}

/// The chief's curves in TensorBoard end at the run's own final numbers (the status that
/// `kubetrain local -o yaml` prints), with steps that only go forward.
fn assert_chief_curves_match(runs: &Runs, job: &TrainingJob) {
    let progress = job.status.clone().unwrap().progress.unwrap();
    let steps = u64::try_from(progress.step).unwrap();
    let chief = &runs["worker-0"];
    for tag in [
        "train/loss",
        "train/samples_per_second",
        "test/accuracy",
        "test/loss",
    ] {
        let points = &chief[tag];
        assert!(
            points.windows(2).all(|w| w[0].0 < w[1].0),
            "{tag} steps go forward: {points:?}"
        );
        assert_eq!(
            points.last().unwrap().0,
            steps,
            "{tag} ends at the last step"
        );
    }
    // Local status numbers come from log lines with four decimals.
    let (_, accuracy) = last(runs, "worker-0", "test/accuracy");
    assert!(
        (accuracy - progress.accuracy.unwrap()).abs() <= 6e-5,
        "TensorBoard accuracy {accuracy} vs status {:?}",
        progress.accuracy
    );
    let (_, loss) = last(runs, "worker-0", "train/loss");
    assert!(
        (loss - progress.loss.unwrap()).abs() <= 6e-5,
        "TensorBoard loss {loss} vs status {:?}",
        progress.loss
    );
    assert!(
        chief["test/accuracy"].len() >= 2,
        "one point per epoch and the final one"
    );
}

#[tokio::test]
async fn tensorboard_reads_the_async_curves_and_staleness_of_a_local_run() {
    tensorflow::venv();
    let (job, run_dir, stderr) = run_local("examples/async.yaml", &[]).await;
    assert!(succeeded(&job), "{stderr}");
    assert!(
        stderr.contains(&format!("tensorboard --logdir {}", run_dir.display())),
        "{stderr}"
    );
    let runs = tensorboard_runs(&run_dir).await;
    // `tensorboard --logdir` on the run directory: its server shows these very curves.
    assert_eq!(tensorboard_serves(&run_dir, &runs).await, runs);
    // The chief and each PS; the other workers have nothing of their own to show.
    assert_eq!(
        runs.keys().collect::<Vec<_>>(),
        ["ps-0", "ps-1", "worker-0"],
        "{runs:?}"
    );
    assert_chief_curves_match(&runs, &job);
    for ps in ["ps-0", "ps-1"] {
        let (_, mean) = last(&runs, ps, "staleness/mean");
        let (_, max) = last(&runs, ps, "staleness/max");
        let updates: f64 = runs[ps]["staleness/updates"].iter().map(|p| p.1).sum();
        assert!(mean >= 0.0 && max >= mean, "{ps}: mean {mean}, max {max}");
        // Every worker step pushes to every PS once: the windows add up to all of them.
        let steps = job.status.clone().unwrap().progress.unwrap().step as f64;
        assert!(
            updates >= steps,
            "{ps}: {updates} updates logged for {steps} steps of the chief"
        );
    }
}

#[tokio::test]
async fn tensorboard_reads_each_pipeline_stages_busy_and_idle_time() {
    tensorflow::venv();
    let (job, run_dir, stderr) = run_local("examples/model-parallel.yaml", &[]).await;
    assert!(succeeded(&job), "{stderr}");
    let runs = tensorboard_runs(&run_dir).await;
    assert_eq!(
        runs.keys().collect::<Vec<_>>(),
        ["worker-0", "worker-1", "worker-2"],
        "{runs:?}"
    );
    assert_chief_curves_match(&runs, &job);
    let steps = u64::try_from(job.status.clone().unwrap().progress.unwrap().step).unwrap();
    for stage in ["worker-0", "worker-1", "worker-2"] {
        let (step, busy) = last(&runs, stage, "pipeline/busy_seconds");
        let (_, idle) = last(&runs, stage, "pipeline/idle_seconds");
        let (_, fraction) = last(&runs, stage, "pipeline/idle_fraction");
        assert_eq!(step, steps, "{stage} logs its final time at the last step");
        assert!(
            busy > 0.0 && idle >= 0.0,
            "{stage}: busy {busy}, idle {idle}"
        );
        assert!(
            (fraction - idle / (busy + idle)).abs() < 1e-3,
            "{stage}: idle fraction {fraction} of busy {busy} + idle {idle}"
        );
    }
}
