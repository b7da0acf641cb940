//! The `kubetrain operator` binary as separate processes against the real API server:
//! leader election between two replicas (one reconciles, the other takes over when the
//! leader dies, nothing is created twice), the Prometheus endpoint after a job ran, and
//! JSON logs with a span per reconcile.
//!
//! They need `etcd` and a `kube-apiserver` from `tests/envtest/install.sh`, and fail
//! (never skip) without them.

use kubetrain_api::fixtures::JobFixture;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::{Resource, ResourceExt};
use kubetrain_api::condition::types;
use kubetrain_api::contract::{self, Role};
use kubetrain_api::{MANAGER, TrainingJob};
use kubetrain_e2e::envtest::{self, TestNamespace, namespace_with_crd, server};
use kubetrain_e2e::http;
use kubetrain_e2e::metrics_text::value;
use kubetrain_e2e::operator::{JobWatch, lifecycle, set_pod_running, wait_for_pods, wait_until};
use kubetrain_e2e::operator_log;
use kubetrain_operator::leader::Timing;
use tokio::process::{Child, Command};

const LEASE: &str = "kubetrain-test-leader";

/// One `kubetrain operator` process; killed (SIGKILL) when dropped.
struct Replica {
    identity: String,
    metrics_port: u16,
    log: PathBuf,
    child: Child,
}

impl Replica {
    /// Starts a replica and returns once it serves its probes. It binds port 0 and names
    /// the port it got in its log: a port picked here and released for it could be taken
    /// by anything in between.
    async fn start(binary: &Path, ns: &TestNamespace, identity: &str, logs: &Path) -> Self {
        let log = logs.join(format!("{identity}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary)
            .args([
                "operator",
                "--leader-elect",
                "--log-format",
                "json",
                "--namespace",
                &ns.name,
                "--lease-namespace",
                &ns.name,
                "--lease-name",
                LEASE,
                "--instance",
                identity,
                "--metrics-port",
                "0",
            ])
            .env("KUBECONFIG", server_kubeconfig())
            .env("RUST_LOG", "info,kubetrain_operator=debug")
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("kubetrain operator starts");
        let metrics_port = operator_log::wait_for_metrics_port(&log).await;
        Self {
            identity: identity.to_string(),
            metrics_port,
            log,
            child,
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.metrics_port));
        let response = http::get(addr, path)
            .await
            .unwrap_or_else(|e| panic!("GET :{}{path}: {e}", self.metrics_port));
        (response.code, response.body)
    }

    async fn metrics(&self) -> String {
        let (code, body) = self.get("/metrics").await;
        assert_eq!(code, 200, "{} /metrics: {body}", self.identity);
        body
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn server_kubeconfig() -> PathBuf {
    // `shared()` has been awaited by every test before replicas start.
    SERVER_KUBECONFIG
        .get()
        .cloned()
        .expect("the test server is up")
}

static SERVER_KUBECONFIG: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

fn quickstart(name: &str) -> TrainingJob {
    JobFixture::quickstart().name(name).build()
}

fn all_pods(job: &str) -> Vec<String> {
    let mut names = vec![
        contract::pod_name(job, Role::Ps, 0),
        contract::pod_name(job, Role::Worker, 0),
        contract::pod_name(job, Role::Worker, 1),
    ];
    names.sort();
    names
}

/// (name, uid) of the job's pods, sorted.
fn identities(pods: &[Pod]) -> Vec<(String, String)> {
    let mut ids: Vec<(String, String)> = pods
        .iter()
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_and_the_standby_takes_over_without_double_creates() {
    let server = server().await;
    SERVER_KUBECONFIG.get_or_init(|| server.kubeconfig_path().to_path_buf());
    let binary = tokio::task::spawn_blocking(|| {
        envtest::workspace_binary("kubetrain-operator", "kubetrain")
    })
    .await
    .expect("build");
    let ns = namespace_with_crd("leader").await;
    let logs = tempfile::tempdir().expect("log dir");
    let leases: Api<Lease> = ns.api();
    let pods: Api<Pod> = ns.api();
    let jobs: Api<TrainingJob> = ns.api();
    let timing = Timing::default();

    let a = Replica::start(&binary, &ns, "replica-a", logs.path()).await;
    let first = wait_until("replica-a holds the lease", || async {
        match holder(&leases).await {
            Some(h) => Ok(h),
            None => Err(format!("no holder yet; replica-a log:\n{}", a.logs())),
        }
    })
    .await;
    assert_eq!(first, "replica-a");
    let mut b = Replica::start(&binary, &ns, "replica-b", logs.path()).await;
    // Both are healthy and ready: a standby serves probes while it waits.
    wait_until("replica-b serving /readyz", || async {
        match tokio::net::TcpStream::connect(("127.0.0.1", b.metrics_port)).await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("{e}; log:\n{}", b.logs())),
        }
    })
    .await;
    for replica in [&a, &b] {
        assert_eq!(replica.get("/healthz").await.0, 200, "{}", replica.identity);
        assert_eq!(replica.get("/readyz").await.0, 200, "{}", replica.identity);
    }

    let mut watch = JobWatch::new(&ns, "elected");
    jobs.create(&PostParams::default(), &quickstart("elected"))
        .await
        .expect("create job");
    let created = wait_for_pods(&pods, "elected", "3 pods", |p| p.len() == 3).await;
    for name in all_pods("elected") {
        set_pod_running(&pods, &name).await.expect("pod running");
    }
    let running = watch.until_state(types::RUNNING).await;

    // Exactly one reconciles: only the leader's counter moves, only it created pods.
    let (a_metrics, b_metrics) = (a.metrics().await, b.metrics().await);
    let a_reconciles = value(&a_metrics, "kubetrain_reconciles_total", &[]).unwrap_or(0.0);
    let b_reconciles = value(&b_metrics, "kubetrain_reconciles_total", &[]).unwrap_or(0.0);
    assert!(a_reconciles >= 1.0, "leader reconciles: {a_reconciles}");
    assert_eq!(b_reconciles, 0.0, "the standby reconciled");
    assert_eq!(holder(&leases).await.as_deref(), Some("replica-a"));

    // Kill the leader without letting it release the lease: the standby must wait the
    // lease out, then take over.
    let mut a = a;
    a.child.start_kill().expect("SIGKILL the leader");
    let _ = a.child.wait().await;
    let killed = Instant::now();
    let bound = timing.lease_duration + timing.retry_period + Duration::from_secs(2);
    let taken = loop {
        if holder(&leases).await.as_deref() == Some("replica-b") {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < bound,
            "no takeover within {bound:?}; replica-b log:\n{}",
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "takeover {taken:?} after the leader died (lease {:?})",
        timing.lease_duration
    );

    // The new leader adopts what exists: same pods (same UIDs), same status.
    let b_running = wait_until("replica-b reconciled the job", || async {
        let n = value(&b.metrics().await, "kubetrain_reconciles_total", &[]).unwrap_or(0.0);
        if n >= 1.0 {
            Ok(n)
        } else {
            Err(format!("{n} reconciles; log:\n{}", b.logs()))
        }
    })
    .await;
    assert!(b_running >= 1.0);
    let after = pods
        .list(&ListParams::default().labels("kubetrain.io/job-name=elected"))
        .await
        .expect("list pods");
    assert_eq!(
        identities(&after.items),
        identities(&created),
        "pods were recreated across the failover"
    );
    let job = jobs.get("elected").await.expect("get job");
    assert_eq!(
        lifecycle(&job).map(|c| (c.type_.clone(), c.last_transition_time.clone())),
        lifecycle(&running).map(|c| (c.type_.clone(), c.last_transition_time.clone())),
        "the status changed across the failover"
    );
    assert_eq!(
        job.status.as_ref().and_then(|s| s.start_time.clone()),
        running.status.as_ref().and_then(|s| s.start_time.clone())
    );

    // And it really is in charge: a pod finishing moves the job on.
    kubetrain_e2e::operator::set_pod_terminated(&pods, "elected-ps-0", 0)
        .await
        .expect("ps exits");
    kubetrain_e2e::operator::set_pod_terminated(&pods, "elected-worker-0", 0)
        .await
        .expect("chief exits");
    watch.until_state(types::SUCCEEDED).await;

    // Metrics after the job ran, scraped over HTTP from the new leader.
    let metrics = b.metrics().await;
    for name in [
        "kubetrain_reconciles_total",
        "kubetrain_reconcile_duration_seconds_count",
        "kubetrain_job_time_to_running_seconds_count",
        "kubetrain_job_time_to_first_progress_seconds_count",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    assert_eq!(
        value(&metrics, "kubetrain_jobs", &[("state", "Succeeded")]),
        Some(1.0),
        "{metrics}"
    );
    let restarts = [
        ("namespace", ns.name.as_str()),
        ("job", "elected"),
        ("role", "worker"),
    ];
    assert_eq!(
        value(&metrics, "kubetrain_pod_restarts", &restarts),
        Some(0.0),
        "{metrics}"
    );
    // Every error counter exists from the start, at 0: nothing failed here.
    for kind in kubetrain_operator::controller::Error::KINDS {
        assert_eq!(
            value(
                &metrics,
                "kubetrain_reconcile_errors_total",
                &[("kind", kind)]
            ),
            Some(0.0),
            "{metrics}"
        );
    }

    // JSON logs: every line is one object, and reconciles carry the job in their span.
    // The in-span line here is the clean-up's "deleting pod", which comes after the
    // Succeeded status write the watch above saw, so wait for it rather than read once.
    wait_until("a log line inside a reconcile span", || async {
        let log = b.logs();
        let mut in_span = 0;
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let entry: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let span = &entry["span"];
            if span["name"] == "reconcile" {
                assert_eq!(span["namespace"], ns.name.as_str(), "{line}");
                assert_eq!(span["job"], "elected", "{line}");
                in_span += 1;
            }
        }
        if in_span > 0 { Ok(()) } else { Err(log) }
    })
    .await;

    // Only the operator's field manager wrote the pods.
    for pod in &after.items {
        let managers: Vec<&str> = pod
            .meta()
            .managed_fields
            .iter()
            .flatten()
            .filter(|m| m.operation.as_deref() == Some("Apply"))
            .filter_map(|m| m.manager.as_deref())
            .collect();
        assert_eq!(managers, vec![MANAGER], "{}", pod.name_any());
    }
    b.child.start_kill().ok();
}
