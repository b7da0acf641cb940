//! End to end (DESIGN.md §6 tier 4): `kubectl apply` of an example on the real API server,
//! the operator in-process, the test kubelet running every pod's trainer as a local
//! process, and the TrainingJob reaching Succeeded with progress in its status.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kubetrain_api::contract::Role;
use kubetrain_e2e::envtest::{self, namespace_with_crd};
use kubetrain_e2e::kubelet::{Kubelet, KubeletConfig};
use kubetrain_e2e::operator::{JobWatch, OperatorTask, wait_until};

/// The workspace's trainer binary.
fn trainer_binary() -> PathBuf {
    envtest::workspace_binary("kubetrain-trainer", "kubetrain-trainer")
}

/// A namespace on the real API server with the operator watching it and the test kubelet
/// running its pods' trainers. Bind every field when taking it apart: `..` drops the
/// operator and the log directory on the spot.
struct Harness {
    ns: envtest::TestNamespace,
    kubelet: Kubelet,
    _operator: OperatorTask,
    _logs: tempfile::TempDir,
}

impl Harness {
    async fn start(prefix: &str) -> Self {
        let trainer = tokio::task::spawn_blocking(trainer_binary).await.unwrap();
        let ns = namespace_with_crd(prefix).await;
        let logs = tempfile::tempdir().unwrap();
        let kubelet = Kubelet::start(
            ns.client.clone(),
            KubeletConfig::new(&ns.name, logs.path()).trainer(&trainer),
        );
        let operator = OperatorTask::start(&ns);
        Self {
            ns,
            kubelet,
            _operator: operator,
            _logs: logs,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_trains_to_succeeded_on_the_real_api_server() {
    let Harness {
        ns,
        kubelet,
        _operator,
        _logs,
    } = Harness::start("e2e").await;
    let mut watch = JobWatch::new(&ns, "quickstart");

    let server = envtest::shared().await.unwrap();
    let applied = server
        .kubectl()
        .args(["apply", "-n", &ns.name, "-f"])
        .arg(envtest::workspace_root().join("examples/quickstart.yaml"))
        .output()
        .await
        .unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // The trainer runs for a few seconds; the default 30 s wait covers it.
    let done = watch.until_state("Succeeded").await;
    let status = done.status.clone().unwrap();
    assert!(status.completion_time.is_some());
    assert_eq!(status.replica_statuses.worker.succeeded, 2, "{status:?}");
    // The chief's progress reached the status through its gRPC endpoint.
    let history = watch.history().join(" -> ");
    let progress = status.progress.clone();
    let chief_log = kubelet.logs(&ns.name, "quickstart-worker-0");
    assert!(
        progress.as_ref().is_some_and(|p| p.step > 0),
        "no progress in status ({history}); chief log:\n{chief_log}"
    );

    // cleanPodPolicy Running: the parameter server is removed, finished workers stay.
    let pods: kube::Api<Pod> = ns.api();
    wait_until("the parameter server pod to be deleted", || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let names: Vec<String> = list
                .items
                .iter()
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            if names.iter().any(|n| n.contains(&format!("-{}-", Role::Ps))) {
                Err(format!("pods: {names:?}"))
            } else {
                Ok(names)
            }
        }
    })
    .await;
    // The final progress is the chief's own last report (its termination message), not a
    // sample taken somewhere during the run.
    let final_line = chief_log
        .lines()
        .find(|l| l.starts_with("kubetrain-trainer: final test_accuracy="))
        .unwrap_or_else(|| panic!("no final line in the chief log:\n{chief_log}"));
    let field = |key: &str| -> f64 {
        final_line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {final_line:?}"))
    };
    let progress = progress.unwrap();
    assert_eq!(progress.step as f64, field("steps"), "{final_line}");
    let accuracy = progress.accuracy.expect("final accuracy in status");
    assert!(
        (accuracy - field("test_accuracy")).abs() < 1e-3,
        "status {accuracy} vs log {final_line}"
    );
    kubelet.shutdown().await;
}

const EPOCHS: i64 = 400;

/// The quickstart as `name`, trained for longer so that a pod can be deleted mid-run.
fn long_quickstart(name: &str) -> String {
    let text = std::fs::read_to_string(envtest::workspace_root().join("examples/quickstart.yaml"))
        .expect("examples/quickstart.yaml");
    let mut job: serde_yaml::Value = serde_yaml::from_str(&text).expect("quickstart YAML");
    job["metadata"]["name"] = name.into();
    job["spec"]["training"]["epochs"] = EPOCHS.into();
    serde_yaml::to_string(&job).expect("YAML")
}

async fn kubectl(args: &[&str], stdin: Option<String>) -> String {
    use tokio::io::AsyncWriteExt as _;
    let server = envtest::shared().await.unwrap();
    let mut command = server.kubectl();
    command
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("kubectl");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Issue #21: `kubectl delete pod <job>-worker-1` during a Sync run. The test kubelet
/// gives the worker SIGTERM (it stops between steps), the operator recreates the pod, the
/// PS holds the step for the replacement (workerGracePeriodSeconds, default 120 s), and
/// the job ends Succeeded with the accuracy of an undisturbed run beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_job_survives_kubectl_delete_of_a_worker_pod() {
    let Harness {
        ns,
        kubelet,
        _operator,
        _logs,
    } = Harness::start("e2e-delete").await;
    let run_for = std::time::Duration::from_secs(240);
    let mut undisturbed = JobWatch::new(&ns, "undisturbed").with_timeout(run_for);
    let mut replaced = JobWatch::new(&ns, "replaced").with_timeout(run_for);
    for name in ["undisturbed", "replaced"] {
        kubectl(
            &["apply", "-n", &ns.name, "-f", "-"],
            Some(long_quickstart(name)),
        )
        .await;
    }

    let at = past_a_tenth(&mut replaced).await;
    delete_and_wait_for_replacement(&ns, "replaced", "replaced-worker-1").await;

    let done = replaced.until_state("Succeeded").await;
    let baseline = undisturbed.until_state("Succeeded").await;
    let accuracy = |job: &kubetrain_api::TrainingJob| {
        job.status
            .as_ref()
            .and_then(|s| s.progress.as_ref())
            .and_then(|p| p.accuracy)
            .expect("final accuracy in status")
    };
    let (replaced_accuracy, baseline_accuracy) = (accuracy(&done), accuracy(&baseline));
    let ps_log = kubelet.logs(&ns.name, "replaced-ps-0");
    let worker_log = kubelet.logs(&ns.name, "replaced-worker-1");
    eprintln!(
        "deleted worker-1 at step {} (epoch {}/{EPOCHS}): accuracy {replaced_accuracy:.4} vs undisturbed {baseline_accuracy:.4}",
        at.step, at.epoch
    );
    assert!(
        (replaced_accuracy - baseline_accuracy).abs() <= 0.005,
        "replaced {replaced_accuracy} vs undisturbed {baseline_accuracy}\nPS:\n{ps_log}\nworker 1:\n{worker_log}"
    );
    // The first worker-1 stopped on SIGTERM between steps; its replacement went on from
    // the step the PS held.
    assert!(
        worker_log.contains("stopped by SIGTERM between steps"),
        "{worker_log}"
    );
    assert!(
        worker_log.contains("continuing from the step"),
        "{worker_log}"
    );
    kubelet.shutdown().await;
}

/// Waits until `job` is past a tenth of its epochs; its progress then.
async fn past_a_tenth(job: &mut JobWatch) -> kubetrain_api::TrainingProgress {
    let running = job
        .until("the chief past a tenth of its epochs", |job| {
            job.status
                .as_ref()
                .and_then(|s| s.progress.as_ref())
                .is_some_and(|p| p.epoch * 10 >= EPOCHS)
        })
        .await;
    running.status.unwrap().progress.unwrap()
}

/// `kubectl delete pod <pod>` of job `job_name`, and waits for the operator to recreate it
/// (a new uid).
async fn delete_and_wait_for_replacement(ns: &envtest::TestNamespace, job_name: &str, pod: &str) {
    let pods: kube::Api<Pod> = ns.api();
    let old_uid = pods.get(pod).await.unwrap().metadata.uid;
    kubectl(
        &["delete", "pod", "-n", &ns.name, pod, "--wait=false"],
        None,
    )
    .await;
    let jobs: kube::Api<kubetrain_api::TrainingJob> = ns.api();
    let recreated = wait_until(&format!("{pod} to be recreated"), || {
        let (pods, jobs) = (pods.clone(), jobs.clone());
        let old_uid = old_uid.clone();
        async move {
            match pods.get_opt(pod).await {
                Ok(Some(pod)) if pod.metadata.uid != old_uid => Ok(pod),
                other => {
                    let status = jobs.get(job_name).await.map(|j| j.status);
                    Err(format!(
                        "pod {:?}; job status {status:?}",
                        other.map(|p| p.map(|p| p.metadata.uid))
                    ))
                }
            }
        }
    })
    .await;
    assert_ne!(recreated.metadata.uid, old_uid);
}

/// `key=<number>` from the first line of `log` that contains `what`.
fn logged(log: &str, what: &str, key: &str) -> Option<u64> {
    log.lines().find(|l| l.contains(what)).and_then(|l| {
        l.split(&format!("{key}="))
            .nth(1)?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

/// Issue #21: `kubectl delete pod <job>-ps-0` during a Sync run with checkpoints. The test
/// kubelet gives the PS SIGTERM, it writes a final checkpoint and exits; the operator
/// recreates the pod, the new PS resumes from the checkpoint, the workers register again,
/// and the job ends Succeeded, having lost no more than `everySteps` steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_job_survives_kubectl_delete_of_its_parameter_server_pod() {
    let Harness {
        ns,
        kubelet,
        _operator,
        _logs,
    } = Harness::start("e2e-delete-ps").await;
    let checkpoints = tempfile::tempdir().unwrap();
    let every: u64 = 200;
    let mut job: serde_yaml::Value =
        serde_yaml::from_str(&long_quickstart("ps-replaced")).expect("YAML");
    job["spec"]["training"]["checkpoint"]["path"] = checkpoints.path().display().to_string().into();
    job["spec"]["training"]["checkpoint"]["everySteps"] = every.into();
    kubectl(
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(serde_yaml::to_string(&job).unwrap()),
    )
    .await;
    let mut watch =
        JobWatch::new(&ns, "ps-replaced").with_timeout(std::time::Duration::from_secs(240));
    // Mid-run, and after a periodic checkpoint: the chief's progress reaches the status
    // only every 10 s, late in a run this short, so the PS's own log says when.
    wait_until("the PS to write its first checkpoint", || {
        let log = kubelet.logs(&ns.name, "ps-replaced-ps-0");
        async move {
            match logged(&log, "checkpoint written", "version") {
                Some(version) => Ok(version),
                None => Err(log.lines().last().unwrap_or("").to_string()),
            }
        }
    })
    .await;
    delete_and_wait_for_replacement(&ns, "ps-replaced", "ps-replaced-ps-0").await;
    let done = watch.until_state("Succeeded").await;
    let ps_log = kubelet.logs(&ns.name, "ps-replaced-ps-0");
    let stopped = logged(&ps_log, "stopping on SIGTERM", "version")
        .unwrap_or_else(|| panic!("the PS did not stop on SIGTERM\n{ps_log}"));
    let resumed = logged(&ps_log, "resumed shard from checkpoint", "version")
        .unwrap_or_else(|| panic!("the new PS did not resume from a checkpoint\n{ps_log}"));
    let progress = done.status.unwrap().progress.unwrap();
    eprintln!(
        "deleted ps-0 after its first checkpoint: stopped at version {stopped}, resumed at {resumed}; final step {}, accuracy {:?}",
        progress.step, progress.accuracy
    );
    assert!(
        stopped.saturating_sub(resumed) <= every,
        "lost {} steps, more than everySteps {every}\n{ps_log}",
        stopped - resumed
    );
    assert!(resumed > 0, "resumed from a checkpoint with steps in it");
    assert!(
        progress.accuracy.is_some_and(|a| a >= 0.9),
        "{progress:?}\n{ps_log}"
    );
    kubelet.shutdown().await;
}
