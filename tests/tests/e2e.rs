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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_trains_to_succeeded_on_the_real_api_server() {
    let trainer = tokio::task::spawn_blocking(trainer_binary).await.unwrap();
    let ns = namespace_with_crd("e2e").await;
    let logs = tempfile::tempdir().unwrap();
    let kubelet = Kubelet::start(
        ns.client.clone(),
        KubeletConfig::new(&ns.name, logs.path()).trainer(&trainer),
    );
    let _operator = OperatorTask::start(&ns);
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
    let trainer = tokio::task::spawn_blocking(trainer_binary).await.unwrap();
    let ns = namespace_with_crd("e2e-delete").await;
    let logs = tempfile::tempdir().unwrap();
    let kubelet = Kubelet::start(
        ns.client.clone(),
        KubeletConfig::new(&ns.name, logs.path()).trainer(&trainer),
    );
    let _operator = OperatorTask::start(&ns);
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

    let pods: kube::Api<Pod> = ns.api();
    let running = replaced
        .until("the chief past a tenth of its epochs", |job| {
            job.status
                .as_ref()
                .and_then(|s| s.progress.as_ref())
                .is_some_and(|p| p.epoch * 10 >= EPOCHS)
        })
        .await;
    let at = running.status.unwrap().progress.unwrap();
    let old_uid = pods.get("replaced-worker-1").await.unwrap().metadata.uid;
    kubectl(
        &[
            "delete",
            "pod",
            "-n",
            &ns.name,
            "replaced-worker-1",
            "--wait=false",
        ],
        None,
    )
    .await;
    let jobs: kube::Api<kubetrain_api::TrainingJob> = ns.api();
    let recreated = wait_until("replaced-worker-1 to be recreated", || {
        let (pods, jobs) = (pods.clone(), jobs.clone());
        let old_uid = old_uid.clone();
        async move {
            match pods.get_opt("replaced-worker-1").await {
                Ok(Some(pod)) if pod.metadata.uid != old_uid => Ok(pod),
                other => {
                    let status = jobs.get("replaced").await.map(|j| j.status);
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
