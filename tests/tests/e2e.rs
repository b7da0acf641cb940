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
