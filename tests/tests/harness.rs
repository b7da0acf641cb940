//! Tests of the test harness itself: the real API server fixture (CRD, SSA,
//! status, watches, kubectl) and the test kubelet (phases, exit codes,
//! restarts, addresses, deletion).
//!
//! They need `etcd` and a `kube-apiserver` from `tests/envtest/install.sh`, and
//! fail (never skip) without them.

use kubetrain_api::fixtures::JobFixture;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, PodSpec};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::{Condition, await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use kubetrain_api::TrainingJob;
use kubetrain_e2e::envtest::{self, TestNamespace, server};
use kubetrain_e2e::kubelet::{JOB_NAME_LABEL, Kubelet, KubeletConfig};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

async fn namespace(prefix: &str) -> TestNamespace {
    server()
        .await
        .namespace(prefix)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn install_crd() {
    server()
        .await
        .install_crd()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// `examples/quickstart.yaml` as a typed TrainingJob.
fn quickstart() -> TrainingJob {
    JobFixture::quickstart().build()
}

#[tokio::test]
async fn crd_create_get_apply_and_status_round_trip() {
    install_crd().await;
    let ns = namespace("crd-round-trip").await;
    let api: Api<TrainingJob> = ns.api();

    let created = api
        .create(
            &PostParams {
                field_manager: Some("kubetrain-e2e-creator".into()),
                ..PostParams::default()
            },
            &quickstart(),
        )
        .await
        .expect("create TrainingJob");
    assert_eq!(created.metadata.generation, Some(1));

    let fetched = api.get("quickstart").await.expect("get TrainingJob");
    assert_eq!(
        fetched.spec,
        quickstart().spec,
        "spec survives the round trip"
    );

    // Server-side apply of a partial object, as the operator does. The field
    // belongs to the creator, so a non-forced apply must conflict (proof that
    // the server tracks field ownership), and a forced one takes it over.
    let partial = json!({
        "apiVersion": "kubetrain.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "quickstart"},
        "spec": {"runPolicy": {"backoffLimit": 5}},
    });
    let conflict = api
        .patch(
            "quickstart",
            &PatchParams::apply("kubetrain-e2e-test"),
            &Patch::Apply(&partial),
        )
        .await
        .expect_err("apply over another manager's field conflicts");
    assert!(
        matches!(&conflict, kube::Error::Api(s) if s.code == 409),
        "{conflict:?}"
    );
    let applied = api
        .patch(
            "quickstart",
            &PatchParams::apply("kubetrain-e2e-test").force(),
            &Patch::Apply(&partial),
        )
        .await
        .expect("forced server-side apply");
    assert_eq!(
        applied.metadata.generation,
        Some(2),
        "spec change bumps generation"
    );
    let managers: Vec<_> = applied
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m == "kubetrain-e2e-test"),
        "{managers:?}"
    );

    // Status goes through the subresource and leaves the spec alone.
    let with_status = api
        .patch_status(
            "quickstart",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observedGeneration": 2, "workersReady": "0/2"}})),
        )
        .await
        .expect("patch status");
    assert_eq!(
        with_status.metadata.generation,
        Some(2),
        "status does not bump generation"
    );
    let status = api
        .get_status("quickstart")
        .await
        .expect("get status")
        .status
        .expect("status is set");
    assert_eq!(status.observed_generation, Some(2));
    assert_eq!(status.workers_ready.as_deref(), Some("0/2"));
}

#[tokio::test]
async fn a_watch_sees_a_later_change() {
    install_crd().await;
    let ns = namespace("watch").await;
    let api: Api<TrainingJob> = ns.api();
    api.create(&PostParams::default(), &quickstart())
        .await
        .expect("create TrainingJob");

    let cfg = watcher::Config::default().fields("metadata.name=quickstart");
    let mut objects = std::pin::pin!(watcher(api.clone(), cfg).applied_objects());
    let first = tokio::time::timeout(TIMEOUT, objects.try_next())
        .await
        .expect("initial object within timeout")
        .expect("watch ok")
        .expect("stream open");
    assert_eq!(first.labels().get("changed"), None);

    api.patch(
        "quickstart",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"changed": "yes"}}})),
    )
    .await
    .expect("patch label");

    let seen = tokio::time::timeout(TIMEOUT, async {
        while let Some(obj) = objects.try_next().await.expect("watch ok") {
            if obj.labels().get("changed").map(String::as_str) == Some("yes") {
                return obj;
            }
        }
        panic!("watch ended")
    })
    .await
    .expect("the change arrives within the timeout");
    assert!(seen.resource_version() > first.resource_version());
}

#[tokio::test]
async fn kubectl_applies_the_quickstart_example() {
    install_crd().await;
    let server = server().await;
    let ns = namespace("kubectl").await;
    let example = envtest::workspace_root().join("examples/quickstart.yaml");
    let out = server
        .kubectl()
        .args(["apply", "-n", &ns.name, "-f"])
        .arg(&example)
        .output()
        .await
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl apply failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The short name resolves through discovery, as for a user.
    let out = server
        .kubectl()
        .args(["get", "tj", "-n", &ns.name, "-o", "name"])
        .output()
        .await
        .expect("run kubectl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "trainingjob.kubetrain.io/quickstart",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = ns
        .api::<TrainingJob>()
        .get("quickstart")
        .await
        .expect("get");
    assert_eq!(job.spec, quickstart().spec);
}

// --- test kubelet --------------------------------------------------------------

/// A pod labelled like a TrainingJob's, running `sh -c script`.
fn shell_pod(name: &str, script: &str, restart_policy: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(
                JOB_NAME_LABEL.to_string(),
                "harness".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some(restart_policy.to_string()),
            containers: vec![Container {
                name: "trainer".to_string(),
                image: Some("ignored.invalid/trainer:latest".to_string()),
                command: Some(vec!["sh".into(), "-c".into(), script.to_string()]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

fn phase_is(phase: &'static str) -> impl Condition<Pod> {
    move |pod: Option<&Pod>| {
        pod.and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            == Some(phase)
    }
}

fn terminated_exit_code(pod: &Pod) -> Option<i32> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

struct KubeletFixture {
    ns: TestNamespace,
    kubelet: Kubelet,
    _logs: tempfile::TempDir,
}

impl KubeletFixture {
    async fn start(prefix: &str) -> Self {
        let ns = namespace(prefix).await;
        let logs = tempfile::tempdir().expect("log dir");
        let kubelet = Kubelet::start(
            ns.client.clone(),
            KubeletConfig::new(ns.name.clone(), logs.path()),
        );
        Self {
            ns,
            kubelet,
            _logs: logs,
        }
    }

    fn pods(&self) -> Api<Pod> {
        self.ns.api()
    }

    async fn run(&self, pod: Pod) -> Pod {
        self.pods()
            .create(&PostParams::default(), &pod)
            .await
            .expect("create pod")
    }

    async fn wait(&self, name: &str, phase: &'static str) -> Pod {
        let pods = self.pods();
        match tokio::time::timeout(
            TIMEOUT,
            await_condition(pods.clone(), name, phase_is(phase)),
        )
        .await
        {
            Ok(Ok(Some(pod))) => pod,
            other => panic!(
                "pod {name} did not reach {phase}: {other:?}\nlast state: {:#?}\nlogs:\n{}",
                pods.get_opt(name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|p| p.status),
                self.kubelet.logs(&self.ns.name, name)
            ),
        }
    }
}

#[tokio::test]
async fn kubelet_reports_success_with_exit_code_zero() {
    let k = KubeletFixture::start("kubelet-ok").await;
    k.run(shell_pod(
        "ok",
        "echo hello from $HOSTNAME at $POD_IP",
        "Never",
    ))
    .await;
    let pod = k.wait("ok", "Succeeded").await;
    assert_eq!(terminated_exit_code(&pod), Some(0));
    let status = pod.status.expect("status");
    let pod_ip = status.pod_ip.expect("podIP");
    assert!(pod_ip.starts_with("127."), "{pod_ip}");
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
    assert!(status.start_time.is_some());
    assert_eq!(
        status.container_statuses.expect("containerStatuses")[0].restart_count,
        0
    );
    let logs = k.kubelet.logs(&k.ns.name, "ok");
    assert!(
        logs.contains(&format!("hello from ok at {pod_ip}")),
        "{logs}"
    );
}

#[tokio::test]
async fn kubelet_reports_failure_with_the_exit_code() {
    let k = KubeletFixture::start("kubelet-fail").await;
    k.run(shell_pod("fail", "echo failing >&2; exit 1", "Never"))
        .await;
    let pod = k.wait("fail", "Failed").await;
    assert_eq!(terminated_exit_code(&pod), Some(1));
    let ready = pod
        .status
        .and_then(|s| s.conditions)
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .expect("Ready condition");
    assert_eq!(ready.status, "False");
    assert!(k.kubelet.logs(&k.ns.name, "fail").contains("failing"));
}

#[tokio::test]
async fn kubelet_restarts_on_failure_and_counts_restarts() {
    let k = KubeletFixture::start("kubelet-restart").await;
    // Fails twice, then succeeds: the working directory survives restarts.
    let script = "n=$(cat attempts 2>/dev/null || echo 0); n=$((n+1)); echo $n > attempts; \
                  echo attempt $n; [ $n -ge 3 ]";
    k.run(shell_pod("flaky", script, "OnFailure")).await;
    let pod = k.wait("flaky", "Succeeded").await;
    let cs = &pod
        .status
        .as_ref()
        .expect("status")
        .container_statuses
        .as_ref()
        .expect("cs")[0];
    assert_eq!(cs.restart_count, 2);
    let last = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref());
    assert_eq!(
        last.map(|t| t.exit_code),
        Some(1),
        "previous run in lastState"
    );
    assert_eq!(terminated_exit_code(&pod), Some(0));
}

#[tokio::test]
async fn kubelet_resolves_peer_names_to_their_pod_ips() {
    let k = KubeletFixture::start("kubelet-dns").await;
    let ns = k.ns.name.clone();
    let mut a = shell_pod("job-worker-0", "echo peer=$PEER", "Never");
    let spec = a.spec.as_mut().expect("spec");
    spec.hostname = Some("job-worker-0".into());
    spec.subdomain = Some("job".into());
    spec.containers[0].env = Some(vec![EnvVar {
        name: "PEER".into(),
        // The peer does not exist yet when this pod starts.
        value: Some(format!("job-ps-0.job.{ns}.svc:2222")),
        ..EnvVar::default()
    }]);
    k.run(a).await;
    k.wait("job-worker-0", "Succeeded").await;

    let mut b = shell_pod("job-ps-0", "true", "Never");
    let spec = b.spec.as_mut().expect("spec");
    spec.hostname = Some("job-ps-0".into());
    spec.subdomain = Some("job".into());
    k.run(b).await;
    let b = k.wait("job-ps-0", "Succeeded").await;
    let b_ip = b.status.and_then(|s| s.pod_ip).expect("podIP");
    // The contract port is mapped to a host port of the pod's own, so a program binding
    // 0.0.0.0:<port> cannot collide with another pod's.
    let address = k.kubelet.pod_address(&ns, "job", "job-ps-0");
    assert_eq!(address.ip.to_string(), b_ip);
    assert_ne!(address.port, 2222);
    let logs = k.kubelet.logs(&ns, "job-worker-0");
    assert!(
        logs.contains(&format!("peer={b_ip}:{}", address.port)),
        "{logs}"
    );
}

/// The PID from the kubelet's `kubetrain-local://<pgid>` container ID.
fn process_group(pod: &Pod) -> u32 {
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs[0].container_id.clone())
        .expect("containerID");
    id.trim_start_matches("kubetrain-local://")
        .parse()
        .expect("pgid")
}

async fn wait_gone(pid: u32) {
    let proc = format!("/proc/{pid}");
    tokio::time::timeout(TIMEOUT, async {
        // /proc has no change notification; a short poll with a deadline.
        while Path::new(&proc).exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("process {pid} still alive"));
}

#[tokio::test]
async fn kubelet_kills_the_process_of_a_deleted_pod() {
    let k = KubeletFixture::start("kubelet-delete").await;
    k.run(shell_pod("sleeper", "sleep 600 & wait", "Always"))
        .await;
    let pod = k.wait("sleeper", "Running").await;
    let pgid = process_group(&pod);
    assert!(Path::new(&format!("/proc/{pgid}")).exists());
    k.pods()
        .delete("sleeper", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(pgid).await;
}

#[tokio::test]
async fn kubelet_finishes_deletion_of_a_terminating_pod() {
    let k = KubeletFixture::start("kubelet-terminating").await;
    let mut pod = shell_pod("bound", "sleep 600", "Always");
    // With a nodeName the API server deletes gracefully: the pod only gets a
    // deletionTimestamp, and someone (normally the node's kubelet) must finish.
    pod.spec.as_mut().expect("spec").node_name = Some("envtest-node".into());
    k.run(pod).await;
    let pod = k.wait("bound", "Running").await;
    let pgid = process_group(&pod);
    let uid = pod.uid().expect("uid");
    k.pods()
        .delete("bound", &DeleteParams::default())
        .await
        .expect("delete");
    let pods = k.pods();
    tokio::time::timeout(
        TIMEOUT,
        await_condition(pods, "bound", conditions::is_deleted(&uid)),
    )
    .await
    .expect("pod deleted within timeout")
    .expect("watch ok");
    wait_gone(pgid).await;
}

#[tokio::test]
async fn dropping_the_kubelet_kills_its_processes() {
    let k = KubeletFixture::start("kubelet-drop").await;
    k.run(shell_pod("orphan", "sleep 600", "Always")).await;
    let pod = k.wait("orphan", "Running").await;
    let pgid = process_group(&pod);
    drop(k);
    wait_gone(pgid).await;
}

#[tokio::test]
async fn the_typed_pods_watch_streams_events() {
    // Pods created by a test are visible to an ordinary label-scoped watch,
    // which is what the operator relies on.
    let ns = namespace("pod-watch").await;
    let pods: Api<Pod> = ns.api();
    let cfg = watcher::Config::default().labels(JOB_NAME_LABEL);
    let mut stream = std::pin::pin!(watcher(pods.clone(), cfg).applied_objects());
    pods.create(
        &PostParams::default(),
        &shell_pod("watched", "true", "Never"),
    )
    .await
    .expect("create pod");
    let got = tokio::time::timeout(TIMEOUT, stream.next())
        .await
        .expect("event within timeout")
        .expect("stream open")
        .expect("watch ok");
    assert_eq!(got.name_any(), "watched");
    // Without a kubelet it stays Pending forever: nothing runs pods here.
    assert_eq!(got.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
}
