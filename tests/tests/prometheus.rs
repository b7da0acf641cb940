//! A real Prometheus (Debian's 2.42) runs every query of the shipped Grafana dashboard
//! against a live job: the operator as its own process, the quickstart's pods as trainer
//! processes of the test kubelet, both scraped with the configuration the Prometheus
//! Operator generates from the chart's ServiceMonitor and PodMonitor, relabelled as the
//! chart says. The pods are found through a watch on the real API server (Debian's
//! Prometheus has no Kubernetes discovery; see `kubetrain_e2e::prometheus`).
//!
//! Needs `etcd`, `kube-apiserver`, `helm` and `prometheus` (`scripts/test.sh` installs
//! them) and fails, never skips, without them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kubetrain_api::TrainingJob;
use kubetrain_e2e::dashboard;
use kubetrain_e2e::deploy_tools::render;
use kubetrain_e2e::envtest::{self, namespace_with_crd};
use kubetrain_e2e::kubelet::{Kubelet, KubeletConfig};
use kubetrain_e2e::operator::JobWatch;
use kubetrain_e2e::operator_log;
use kubetrain_e2e::prometheus::{self, PodTargets, Prometheus};
use tokio::process::Command;

/// Scrape interval of both jobs. The chart's defaults (30 s, 15 s) would make the test
/// minutes long; every label and relabel rule is the chart's own.
const SCRAPE_S: u64 = 1;
/// Resolution of the range queries, as a dashboard of a few minutes asks for.
const STEP_S: u64 = 1;
/// Until every query has answered: pod discovery reaches the scrape loop at most every
/// 5 s (Prometheus's own throttle), then rates need two scrapes.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
const JOB: &str = "quickstart";
/// Where the chart is installed: the operator's own namespace, not the jobs'.
const RELEASE_NAMESPACE: &str = "kubetrain-system";

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// The chart's PodMonitor and ServiceMonitor, rendered by the real helm.
fn monitors() -> (serde_yaml::Value, serde_yaml::Value) {
    let text = render(
        RELEASE_NAMESPACE,
        &[
            "--set",
            "podMonitor.enabled=true",
            "--set",
            "serviceMonitor.enabled=true",
        ],
    );
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML"))
        .collect();
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .cloned()
            .unwrap_or_else(|| panic!("the chart renders no {kind}"))
    };
    (find("PodMonitor"), find("ServiceMonitor"))
}

/// The quickstart as shipped, with more epochs: it must still be training while
/// Prometheus discovers its pods and scrapes them a few times.
fn long_quickstart() -> TrainingJob {
    kubetrain_api::fixtures::JobFixture::quickstart()
        .with(|job| job.spec.training.as_mut().expect("spec.training").epochs = 2000)
        .build()
}

/// What one dashboard query answered, or why it does not count.
async fn answer(
    prometheus: &Prometheus,
    query: &str,
    namespace: &str,
    start: f64,
) -> Result<String, String> {
    let rate = format!("{}s", dashboard::rate_interval_seconds(STEP_S, SCRAPE_S));
    let expr = dashboard::substitute(query, &rate, namespace, JOB);
    let end = now_s();
    if let Some((selector, label)) = dashboard::label_values(&expr) {
        let values = prometheus
            .label_values(selector, label, start, end)
            .await
            .map_err(|e| e.to_string())?;
        let wanted = if label == "namespace" { namespace } else { JOB };
        return if values.iter().any(|v| v == wanted) {
            Ok(format!("{values:?}"))
        } else {
            Err(format!("{expr}: offers {values:?}, not {wanted:?}"))
        };
    }
    let series = prometheus
        .query_range(&expr, start, end, STEP_S)
        .await
        .map_err(|e| e.to_string())?;
    if series.is_empty() {
        return Err(format!("{expr}: no series"));
    }
    // A `by (...)` label the series lack would be a legend of empty strings: the label
    // the dashboard groups by must be one Prometheus really attached.
    let grouping = regex::Regex::new(r"\bby\s*\(([^)]*)\)").unwrap();
    for g in grouping.captures_iter(&expr) {
        for label in g[1].split(',').map(str::trim).filter(|l| *l != "le") {
            if let Some(s) = series.iter().find(|s| !s.labels.contains_key(label)) {
                return Err(format!("{expr}: a series without {label}: {:?}", s.labels));
            }
        }
    }
    Ok(format!("{} series", series.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_answers_every_dashboard_query_during_a_job() {
    let (trainer, operator) = tokio::task::spawn_blocking(|| {
        (
            envtest::workspace_binary("kubetrain-trainer", "kubetrain-trainer"),
            envtest::workspace_binary("kubetrain-operator", "kubetrain"),
        )
    })
    .await
    .unwrap();
    let (pod_monitor, service_monitor) = tokio::task::spawn_blocking(monitors).await.unwrap();
    let server = envtest::shared().await.expect("the API server harness");
    let ns = namespace_with_crd("prom").await;
    let logs = tempfile::tempdir().unwrap();
    let kubelet = Kubelet::start(
        ns.client.clone(),
        KubeletConfig::new(&ns.name, logs.path()).trainer(&trainer),
    );

    let operator_log = logs.path().join("operator.log");
    let _operator = Command::new(&operator)
        .args(["operator", "--namespace", &ns.name, "--metrics-port", "0"])
        .env("KUBECONFIG", server.kubeconfig_path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&operator_log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("kubetrain operator starts");

    let metrics_port = operator_log::wait_for_metrics_port(&operator_log).await;
    let operator_addr = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let pods: Api<Pod> = match prometheus::pod_monitor_namespaces(&pod_monitor) {
        None => Api::all(ns.client.clone()),
        Some(names) => {
            assert_eq!(
                names,
                std::slice::from_ref(&ns.name),
                "the test watches one namespace"
            );
            ns.api()
        }
    };
    let targets_file = PodTargets::start(pods, logs.path().join("pod-targets.json"))
        .expect("the pod targets file");
    let config = prometheus::config(
        SCRAPE_S,
        vec![
            prometheus::service_monitor_job(&service_monitor, operator_addr, SCRAPE_S),
            prometheus::pod_monitor_job(&pod_monitor, targets_file.path(), SCRAPE_S),
        ],
    );
    let prometheus = Prometheus::start(&config)
        .await
        .unwrap_or_else(|e| panic!("{e}\nconfig:\n{config}"));
    let start = now_s();

    let jobs: Api<TrainingJob> = ns.api();
    jobs.create(&PostParams::default(), &long_quickstart())
        .await
        .expect("create the job");
    let created = now_s();
    let mut watch = JobWatch::new(&ns, JOB);
    watch.until_state("Running").await;

    let queries = dashboard::queries();
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    let answers = loop {
        let mut answered = Vec::new();
        let mut missing = Vec::new();
        for q in &queries {
            match answer(&prometheus, q, &ns.name, start).await {
                Ok(a) => answered.push(format!("{q} -> {a}")),
                Err(e) => missing.push(e),
            }
        }
        if missing.is_empty() {
            break answered;
        }
        if tokio::time::Instant::now() >= deadline {
            let targets = prometheus.active_targets().await.unwrap_or_default();
            panic!(
                "after {ANSWER_TIMEOUT:?}, {} of {} dashboard queries have no answer:\n{}\n\n\
                 targets: {targets:#?}\n\nprometheus log:\n{}\n\nconfig:\n{config}\n\n\
                 operator log:\n{}",
                missing.len(),
                queries.len(),
                missing.join("\n"),
                prometheus.log_tail(),
                envtest::log_tail(&operator_log),
            );
        }
        // New samples arrive once per scrape interval; asking faster only repeats.
        tokio::time::sleep(Duration::from_secs(SCRAPE_S)).await;
    };
    assert_eq!(answers.len(), queries.len());
    eprintln!(
        "every dashboard query answered {:.1} s after the job was created:\n{}",
        now_s() - created,
        answers.join("\n")
    );

    // The scrape targets carry the labels the chart's relabelling promises: each trainer
    // pod its job and role, the operator its Service's.
    let targets = prometheus.active_targets().await.expect("targets");
    let label = |t: &serde_json::Value, l: &str| t["labels"][l].as_str().map(str::to_string);
    let trainers: BTreeSet<(Option<String>, Option<String>, Option<String>)> = targets
        .iter()
        .filter(|t| {
            t["scrapePool"]
                .as_str()
                .is_some_and(|p| p.starts_with("podMonitor/"))
        })
        .map(|t| (label(t, "pod"), label(t, "job_name"), label(t, "role")))
        .collect();
    let pod = |role: &str, i: u32| {
        (
            Some(format!("{JOB}-{role}-{i}")),
            Some(JOB.to_string()),
            Some(role.to_string()),
        )
    };
    assert_eq!(
        trainers,
        [pod("ps", 0), pod("worker", 0), pod("worker", 1)].into(),
        "trainer targets: {targets:#?}"
    );
    let operator_target = targets
        .iter()
        .find(|t| {
            t["scrapePool"]
                .as_str()
                .is_some_and(|p| p.starts_with("serviceMonitor/"))
        })
        .expect("the operator target");
    assert_eq!(operator_target["health"], "up", "{operator_target:#}");

    // The chief itself was scraped, under its pod's job and role.
    let rate = format!("{}s", dashboard::rate_interval_seconds(STEP_S, SCRAPE_S));
    let chief = prometheus
        .query_range(
            &format!(
                "max_over_time(kubetrain_trainer_step{{namespace=\"{}\", job_name=\"{JOB}\", \
                 role=\"worker\", pod=\"{JOB}-worker-0\"}}[{rate}])",
                ns.name
            ),
            start,
            now_s(),
            STEP_S,
        )
        .await
        .expect("chief query");
    assert!(
        chief.iter().any(|s| s.points > 0),
        "the chief's step was never scraped: {chief:?}"
    );
    // honorLabels: the operator's per-job series keep the job's namespace and name, not
    // the scrape target's (which would become exported_namespace / exported_job).
    let per_job = prometheus
        .query_range("kubetrain_job_step", start, now_s(), STEP_S)
        .await
        .expect("kubetrain_job_step");
    assert!(
        per_job.iter().all(|s| {
            s.labels.get("namespace") == Some(&ns.name)
                && s.labels.get("job").map(String::as_str) == Some(JOB)
                && !s.labels.contains_key("exported_namespace")
        }),
        "{per_job:?}"
    );

    kubelet.shutdown().await;
}
