//! Issue 5: the operator at scale (docs/benchmarks.md, "Operator at scale").
//!
//! ```sh
//! cargo bench -p kubetrain-e2e --bench scale
//! ```
//!
//! Runs the release `kubetrain operator` binary as its own process against the test API
//! server (tests/README.md), watching one namespace per part:
//!
//! 1. **Burst**: 100 TrainingJobs of 6 pods (1 PS + 5 workers) are created at once; the
//!    time until all 600 pods exist. Baseline, same run: the bench itself server-side
//!    applies the same 600 pods (from the same plan) with the controller's concurrency
//!    (32), into another namespace: the API server's own speed for that work.
//! 2. **Memory**: 1,000 TrainingJobs of 5 pods (1 PS + 4 workers), so 5,000 pods in the
//!    operator's caches; its RSS (VmRSS, and the peak VmHWM) once every pod exists and the
//!    status writes have settled. Baseline, same run: the same process idle before the
//!    first job.
//!
//! No kubelet runs: pods stay Pending, which is the most the operator holds per pod
//! anyway. The bench prints a markdown table; it fails only if the harness does.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use kubetrain_api::TrainingJob;
use kubetrain_e2e::envtest::{self, ApiServer, TestNamespace};
use kubetrain_operator::plan::{self, PlanSettings};

/// The controller's reconcile concurrency, also used by the baseline.
const CONCURRENCY: usize = 32;
/// Upper bound for any wait.
const TIMEOUT: Duration = Duration::from_secs(600);

async fn server() -> &'static ApiServer {
    match envtest::shared().await {
        Ok(s) => s,
        Err(e) => panic!("test API server unavailable: {e}"),
    }
}

/// The quickstart example as `name` with 1 PS and `workers` workers.
fn job(name: &str, workers: i32) -> TrainingJob {
    let path = envtest::workspace_root().join("examples/quickstart.yaml");
    let text = std::fs::read_to_string(&path).expect("quickstart example");
    let mut job: TrainingJob = serde_yaml::from_str(&text).expect("quickstart parses");
    job.metadata.name = Some(name.to_string());
    job.spec.replica_specs.worker.replicas = workers;
    job
}

/// One operator process watching `ns`; killed when dropped.
struct Operator {
    child: tokio::process::Child,
}

impl Operator {
    fn start(binary: &Path, server: &ApiServer, ns: &TestNamespace) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let child = tokio::process::Command::new(binary)
            .args(["operator", "--namespace", &ns.name, "--metrics-port"])
            .arg(port.to_string())
            .env("KUBECONFIG", server.kubeconfig_path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("kubetrain operator starts");
        Self { child }
    }

    /// (VmRSS, VmHWM) in MiB, from /proc.
    fn memory(&self) -> (f64, f64) {
        let pid = self.child.id().expect("operator still running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let kib = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
    }
}

async fn count_pods(pods: &Api<Pod>) -> usize {
    pods.list_metadata(&ListParams::default().labels("kubetrain.io/job-name"))
        .await
        .map(|l| l.items.len())
        .unwrap_or(0)
}

/// Waits until `want` pods exist, printing progress every 5 s; returns when.
async fn until_pods(pods: &Api<Pod>, want: usize, since: Instant) -> Duration {
    let mut last_line = Instant::now();
    loop {
        let n = count_pods(pods).await;
        if n >= want {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < TIMEOUT,
            "only {n} of {want} pods after {TIMEOUT:?}"
        );
        if last_line.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  {n}/{want} pods after {:.0} s",
                since.elapsed().as_secs_f64()
            );
            last_line = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_jobs(ns: &TestNamespace, count: usize, workers: i32) {
    let jobs: Api<TrainingJob> = ns.api();
    stream::iter(0..count)
        .for_each_concurrent(64, |i| {
            let jobs = jobs.clone();
            async move {
                jobs.create(
                    &PostParams::default(),
                    &job(&format!("job-{i:04}"), workers),
                )
                .await
                .unwrap_or_else(|e| panic!("create job-{i:04}: {e}"));
            }
        })
        .await;
}

/// Waits until every job in `ns` has a status (its first reconcile wrote it) and the
/// operator has been quiet for a moment, so RSS is read after the work, not during it.
async fn until_statuses(ns: &TestNamespace, count: usize) {
    let jobs: Api<TrainingJob> = ns.api();
    let started = Instant::now();
    loop {
        let list = jobs.list(&ListParams::default()).await.expect("list jobs");
        let done = list.items.iter().filter(|j| j.status.is_some()).count();
        if done >= count {
            return;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "{done}/{count} jobs have a status"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn burst(server: &ApiServer, binary: &Path) -> (Duration, Duration) {
    // Baseline: the same 600 pods applied by the bench itself.
    let raw = server.namespace("scale-raw").await.expect("namespace");
    let settings = PlanSettings::default();
    let mut planned = Vec::new();
    for i in 0..100 {
        let mut job = job(&format!("job-{i:04}"), 5);
        job.metadata.namespace = Some(raw.name.clone());
        job.metadata.uid = Some(format!("00000000-0000-0000-0000-{i:012}"));
        planned.extend(plan::pods(&job, &settings));
    }
    let pods: Api<Pod> = raw.api();
    let started = Instant::now();
    stream::iter(planned)
        .for_each_concurrent(CONCURRENCY, |pod| {
            let pods = pods.clone();
            async move {
                let mut pod = pod;
                // Owner references need a live owner UID for the garbage collector only;
                // none runs here, but keep the request the operator's size anyway.
                pod.metadata.owner_references = None;
                pods.patch(
                    &pod.name_any(),
                    &PatchParams::apply(kubetrain_api::MANAGER).force(),
                    &Patch::Apply(&pod),
                )
                .await
                .unwrap_or_else(|e| panic!("apply {}: {e}", pod.name_any()));
            }
        })
        .await;
    let baseline = started.elapsed();
    eprintln!("baseline: 600 pods applied by the bench in {baseline:?}");

    let ns = server.namespace("scale-burst").await.expect("namespace");
    let operator = Operator::start(binary, server, &ns);
    // Let the operator list and open its watches before the burst.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pods: Api<Pod> = ns.api();
    let started = Instant::now();
    create_jobs(&ns, 100, 5).await;
    let took = until_pods(&pods, 600, started).await;
    eprintln!("operator: 100 jobs x 6 pods exist after {took:?}");
    drop(operator);
    (took, baseline)
}

async fn memory(server: &ApiServer, binary: &Path) -> (f64, f64, f64, Duration) {
    let ns = server.namespace("scale-rss").await.expect("namespace");
    let operator = Operator::start(binary, server, &ns);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (idle, _) = operator.memory();
    let pods: Api<Pod> = ns.api();
    let started = Instant::now();
    create_jobs(&ns, 1000, 4).await;
    let took = until_pods(&pods, 5000, started).await;
    until_statuses(&ns, 1000).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss, peak) = operator.memory();
    eprintln!(
        "operator RSS: idle {idle:.1} MiB, with 1000 jobs / 5000 pods {rss:.1} MiB (peak {peak:.1})"
    );
    (idle, rss, peak, took)
}

fn check(ok: bool) -> &'static str {
    if ok { "✓" } else { "✗" }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let binary = tokio::task::spawn_blocking(|| {
            envtest::workspace_release_binary("kubetrain-operator", "kubetrain")
        })
        .await
        .expect("build");
        let server = server().await;
        server.install_crd().await.unwrap_or_else(|e| panic!("{e}"));
        let (took, baseline) = burst(server, &binary).await;
        let (idle, rss, peak, created) = memory(server, &binary).await;
        println!("## Operator at scale");
        println!();
        println!("| measurement | result | baseline (same run) | ratio | target | met |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| 100 jobs × 6 pods created at once: until all 600 pods exist | {:.1} s | {:.1} s (bench applies the 600 pods itself, concurrency {CONCURRENCY}) | {:.2}× | ≤ 15 s | {} |",
            took.as_secs_f64(),
            baseline.as_secs_f64(),
            took.as_secs_f64() / baseline.as_secs_f64(),
            check(took <= Duration::from_secs(15))
        );
        println!(
            "| operator RSS with 1,000 jobs and 5,000 pods cached | {rss:.1} MiB (peak {peak:.1} MiB) | {idle:.1} MiB (same process, idle, no jobs) | {:.2}× | ≤ 60 MiB | {} |",
            rss / idle,
            check(peak <= 60.0)
        );
        println!(
            "| (for scale) 1,000 jobs × 5 pods created at once: until all 5,000 pods exist | {:.1} s | | | | |",
            created.as_secs_f64()
        );
    });
}
