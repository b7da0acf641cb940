//! A real Prometheus (Debian's `prometheus` package, 2.42, from
//! `tests/prometheus/install.sh`) on loopback, and the scrape configuration the
//! Prometheus Operator would generate from the chart's PodMonitor and ServiceMonitor.
//!
//! Debian builds Prometheus without its Kubernetes service discovery (the client-go tree
//! is not packaged; `strings /usr/bin/prometheus` lists no `discovery/kubernetes`), and
//! this machine reaches no other source of a Prometheus binary. So the pods are
//! discovered here instead: [`PodTargets`] watches the real API server and writes the
//! target groups Kubernetes discovery (`role: pod`) would produce, with the same
//! `__meta_kubernetes_pod_*` labels, to a file Prometheus reads through `file_sd_configs`.
//! Everything from there on (relabelling, scraping, storage, PromQL) is Prometheus's own.
//!
//! The translation follows what the Prometheus Operator writes for these two objects
//! (its `podMonitor/<ns>/<name>/<i>` and `serviceMonitor/...` jobs): the selector as
//! `keep` rules on the `labelpresent` meta labels, the port-name `keep`, the dropped
//! finished pods, the `namespace`/`pod`/`container`/`job`/`endpoint` target labels, then
//! the object's own `relabelings`, and `honorLabels` as `honor_labels`. So the label names
//! the dashboard queries are the ones a Prometheus fed by the shipped chart attaches.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::{Value as Json, json};
use serde_yaml::Value as Yaml;
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::envtest::log_tail;
use crate::http;
use kubetrain_operator::podsim::process_group::{Target, Watchdog};

/// How long Prometheus may take to answer `/-/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed step of running Prometheus; the variant names it.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    /// The binary is not installed.
    #[error(
        "no prometheus at {0}: run `bash tests/prometheus/install.sh` (or set KUBETRAIN_PROMETHEUS)"
    )]
    Locate(PathBuf),
    /// Writing the config or creating the data directory failed.
    #[error("writing {path}: {source}")]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Spawning the process failed.
    #[error("starting prometheus: {0}")]
    Spawn(std::io::Error),
    /// It exited or never became ready.
    #[error("prometheus not ready within {READY_TIMEOUT:?}: {reason}; log tail:\n{log}")]
    NotReady {
        /// What was seen.
        reason: String,
        /// The end of its log.
        log: String,
    },
    /// An API call failed or answered something other than success.
    #[error("prometheus {path}: {reason}")]
    Query {
        /// The API path.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// One series of a query result: its labels and how many points it has.
#[derive(Debug, Clone)]
pub struct Series {
    /// The series' labels (`__name__` included for plain selectors).
    pub labels: BTreeMap<String, String>,
    /// Points in the evaluated range.
    pub points: usize,
}

/// A running Prometheus; killed when dropped.
pub struct Prometheus {
    addr: SocketAddr,
    log: PathBuf,
    child: Child,
    watchdog: Option<Watchdog>,
    _dir: TempDir,
}

impl Prometheus {
    /// The binary the tests run: `KUBETRAIN_PROMETHEUS`, else Debian's `/usr/bin/prometheus`.
    pub fn binary() -> PathBuf {
        std::env::var_os("KUBETRAIN_PROMETHEUS")
            .map_or_else(|| PathBuf::from("/usr/bin/prometheus"), PathBuf::from)
    }

    /// Starts Prometheus on a free loopback port with `config` (YAML) and waits until it
    /// is ready.
    pub async fn start(config: &str) -> Result<Self, PrometheusError> {
        let binary = Self::binary();
        if !binary.is_file() {
            return Err(PrometheusError::Locate(binary));
        }
        let dir = tempfile::Builder::new()
            .prefix("kubetrain-prometheus-")
            .tempdir()
            .map_err(|source| PrometheusError::WriteFile {
                path: std::env::temp_dir(),
                source,
            })?;
        let config_path = dir.path().join("prometheus.yml");
        write(&config_path, config)?;
        let log = dir.path().join("prometheus.log");
        let log_file =
            std::fs::File::create(&log).map_err(|source| PrometheusError::WriteFile {
                path: log.clone(),
                source,
            })?;
        let addr = own_loopback_addr();
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(PrometheusError::Spawn)?;
        let watchdog = child
            .id()
            .map(|pid| Watchdog::spawn(&[Target::Process(pid)], None))
            .transpose()
            .map_err(PrometheusError::Spawn)?;
        let mut prometheus = Self {
            addr,
            log,
            child,
            watchdog,
            _dir: dir,
        };
        prometheus.wait_ready().await?;
        Ok(prometheus)
    }

    async fn wait_ready(&mut self) -> Result<(), PrometheusError> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let reason = match self.child.try_wait() {
                Ok(Some(status)) => {
                    return Err(PrometheusError::NotReady {
                        reason: format!("exited with {status}"),
                        log: self.log_tail(),
                    });
                }
                _ => match http::get(self.addr, "/-/ready").await {
                    Ok(r) if r.code == 200 => return Ok(()),
                    Ok(r) => format!("/-/ready answered {}", r.code),
                    Err(e) => format!("/-/ready: {e}"),
                },
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(PrometheusError::NotReady {
                    reason,
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The end of Prometheus's own log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// `POST /api/v1/query_range`: the series `expr` has between `start` and `end` (Unix
    /// seconds) at resolution `step_s`, as a Grafana time-series panel asks for them.
    pub async fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step_s: u64,
    ) -> Result<Vec<Series>, PrometheusError> {
        let (start, end, step) = (start.to_string(), end.to_string(), step_s.to_string());
        let data = self
            .api(
                "/api/v1/query_range",
                &[
                    ("query", expr),
                    ("start", &start),
                    ("end", &end),
                    ("step", &step),
                ],
            )
            .await?;
        let series = data["result"].as_array().cloned().unwrap_or_default();
        Ok(series
            .iter()
            .map(|s| Series {
                labels: serde_json::from_value(s["metric"].clone()).unwrap_or_default(),
                points: s["values"].as_array().map_or(0, Vec::len),
            })
            .collect())
    }

    /// `GET /api/v1/label/<label>/values` restricted to `selector` (2.42 takes no POST
    /// there): what Grafana's `label_values(selector, label)` variable offers.
    pub async fn label_values(
        &self,
        selector: &str,
        label: &str,
        start: f64,
        end: f64,
    ) -> Result<Vec<String>, PrometheusError> {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("match[]", selector)
            .append_pair("start", &start.to_string())
            .append_pair("end", &end.to_string())
            .finish();
        let data = self
            .api_get(&format!("/api/v1/label/{label}/values?{query}"))
            .await?;
        Ok(serde_json::from_value(data).unwrap_or_default())
    }

    /// `GET /api/v1/targets`: the active targets (labels, health, last error).
    pub async fn active_targets(&self) -> Result<Vec<Json>, PrometheusError> {
        let data = self.api_get("/api/v1/targets?state=active").await?;
        Ok(data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    async fn api(&self, path: &str, form: &[(&str, &str)]) -> Result<Json, PrometheusError> {
        let response = http::post_form(self.addr, path, form).await;
        Self::data(path, response)
    }

    async fn api_get(&self, path: &str) -> Result<Json, PrometheusError> {
        let response = http::get(self.addr, path).await;
        Self::data(path, response)
    }

    fn data(
        path: &str,
        response: std::io::Result<http::Response>,
    ) -> Result<Json, PrometheusError> {
        let fail = |reason: String| PrometheusError::Query {
            path: path.to_string(),
            reason,
        };
        let response = response.map_err(|e| fail(e.to_string()))?;
        let body: Json = serde_json::from_str(&response.body)
            .map_err(|e| fail(format!("{e} in {:?}", response.body)))?;
        if response.code != 200 || body["status"] != "success" {
            return Err(fail(format!("{}: {body}", response.code)));
        }
        Ok(body["data"].clone())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(w) = self.watchdog.take() {
            w.disarm();
        }
        let _ = self.child.start_kill();
    }
}

fn write(path: &Path, text: &str) -> Result<(), PrometheusError> {
    std::fs::write(path, text).map_err(|source| PrometheusError::WriteFile {
        path: path.to_path_buf(),
        source,
    })
}

/// Prometheus's own loopback address, on its well-known port: nothing picked free and
/// released before it binds (`kubetrain_trainer::loopback`).
fn own_loopback_addr() -> SocketAddr {
    SocketAddr::from((kubetrain_trainer::loopback::next_ip(), 9090))
}

// --- pod discovery --------------------------------------------------------------------------

/// The target groups Prometheus's Kubernetes discovery (`role: pod`) makes of `pods`: one
/// target per container port at `<pod IP>:<port>` (a container without ports: one at the
/// pod IP), labelled with the pod's and the container's `__meta_kubernetes_*` labels. A
/// pod without an IP yet has no targets, as there.
pub fn pod_target_groups(pods: &[Pod]) -> Json {
    let m = "__meta_kubernetes_pod";
    let groups: Vec<Json> = pods
        .iter()
        .filter_map(|pod| {
            let status = pod.status.as_ref()?;
            let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
            let spec = pod.spec.as_ref()?;
            let mut common = serde_json::Map::new();
            let mut set = |k: String, v: &str| {
                common.insert(k, Json::from(v));
            };
            set(
                "__meta_kubernetes_namespace".into(),
                &pod.namespace().unwrap_or_default(),
            );
            set(format!("{m}_name"), &pod.name_any());
            set(format!("{m}_ip"), ip);
            set(format!("{m}_uid"), pod.uid().as_deref().unwrap_or_default());
            set(
                format!("{m}_phase"),
                status.phase.as_deref().unwrap_or_default(),
            );
            set(
                format!("{m}_node_name"),
                spec.node_name.as_deref().unwrap_or_default(),
            );
            set(
                format!("{m}_host_ip"),
                status.host_ip.as_deref().unwrap_or_default(),
            );
            let ready = status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Ready")
                .map_or(
                    "unknown",
                    |c| if c.status == "True" { "true" } else { "false" },
                );
            set(format!("{m}_ready"), ready);
            if let Some(owner) = pod
                .owner_references()
                .iter()
                .find(|o| o.controller == Some(true))
            {
                set(format!("{m}_controller_kind"), &owner.kind);
                set(format!("{m}_controller_name"), &owner.name);
            }
            for (k, v) in pod.labels() {
                set(format!("{m}_label_{}", sanitize(k)), v);
                set(format!("{m}_labelpresent_{}", sanitize(k)), "true");
            }
            for (k, v) in pod.annotations() {
                set(format!("{m}_annotation_{}", sanitize(k)), v);
                set(format!("{m}_annotationpresent_{}", sanitize(k)), "true");
            }
            let containers = spec
                .init_containers
                .iter()
                .flatten()
                .map(|c| (c, "true"))
                .chain(spec.containers.iter().map(|c| (c, "false")));
            let targets: Vec<Json> = containers
                .flat_map(|(c, init)| {
                    let mut base = common.clone();
                    base.insert(format!("{m}_container_name"), Json::from(c.name.as_str()));
                    base.insert(format!("{m}_container_init"), Json::from(init));
                    base.insert(
                        format!("{m}_container_image"),
                        Json::from(c.image.as_deref().unwrap_or_default()),
                    );
                    let ports = c.ports.clone().unwrap_or_default();
                    if ports.is_empty() {
                        return vec![(ip.to_string(), base)];
                    }
                    ports
                        .iter()
                        .map(|p| {
                            let mut labels = base.clone();
                            let name = p.name.as_deref().unwrap_or_default();
                            labels.insert(format!("{m}_container_port_name"), Json::from(name));
                            labels.insert(
                                format!("{m}_container_port_number"),
                                Json::from(p.container_port.to_string()),
                            );
                            labels.insert(
                                format!("{m}_container_port_protocol"),
                                Json::from(p.protocol.as_deref().unwrap_or("TCP")),
                            );
                            (format!("{ip}:{}", p.container_port), labels)
                        })
                        .collect()
                })
                .map(|(address, labels)| json!({"targets": [address], "labels": labels}))
                .collect();
            Some(targets)
        })
        .flatten()
        .collect();
    Json::Array(groups)
}

/// Keeps a `file_sd_configs` file equal to [`pod_target_groups`] of the pods `api` lists,
/// rewritten (atomically, by rename) on every change a watch reports; stops when dropped.
pub struct PodTargets {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl PodTargets {
    /// Starts the watch; `path` is written with an empty list at once.
    pub fn start(api: Api<Pod>, path: PathBuf) -> Result<Self, PrometheusError> {
        write_atomically(&path, "[]")?;
        let (reader, writer) = reflector::store();
        let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
        let file = path.clone();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Err(error) = event {
                    tracing::warn!(%error, "pod watch for the Prometheus targets");
                    continue;
                }
                let pods: Vec<Pod> = reader.state().iter().map(|p| Pod::clone(p)).collect();
                let text = pod_target_groups(&pods).to_string();
                if let Err(error) = write_atomically(&file, &text) {
                    tracing::warn!(%error, "writing the Prometheus targets");
                }
            }
        });
        Ok(Self { path, task })
    }

    /// The file Prometheus reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PodTargets {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Prometheus re-reads the file on every change notification; a rename means it never
/// sees half a file.
fn write_atomically(path: &Path, text: &str) -> Result<(), PrometheusError> {
    let tmp = path.with_extension("tmp");
    write(&tmp, text)?;
    std::fs::rename(&tmp, path).map_err(|source| PrometheusError::WriteFile {
        path: path.to_path_buf(),
        source,
    })
}

// --- the Prometheus Operator's translation ------------------------------------------------

/// A Kubernetes label name as a Prometheus meta-label suffix (`kubetrain.io/job-name` →
/// `kubetrain_io_job_name`).
fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn str_at<'a>(v: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

/// A Prometheus Operator `RelabelConfig` (camelCase) as a Prometheus `relabel_config`.
fn relabel_config(r: &Yaml) -> Json {
    let mut out = serde_json::Map::new();
    if let Some(sources) = r.get("sourceLabels").and_then(Yaml::as_sequence) {
        let names: Vec<Json> = sources
            .iter()
            .filter_map(Yaml::as_str)
            .map(Json::from)
            .collect();
        out.insert("source_labels".into(), Json::Array(names));
    }
    for (from, to) in [
        ("targetLabel", "target_label"),
        ("regex", "regex"),
        ("replacement", "replacement"),
        ("separator", "separator"),
        ("modulus", "modulus"),
    ] {
        if let Some(v) = r.get(from) {
            let v: Json = serde_json::to_value(v).unwrap_or(Json::Null);
            out.insert(to.into(), v);
        }
    }
    if let Some(action) = r.get("action").and_then(Yaml::as_str) {
        out.insert("action".into(), Json::from(action.to_lowercase()));
    }
    Json::Object(out)
}

/// The `keep`/`drop` rules a label selector becomes, on meta labels `<prefix>_label_*`
/// and `<prefix>_labelpresent_*`.
fn selector_rules(selector: &Yaml, prefix: &str) -> Vec<Json> {
    let mut rules = Vec::new();
    if let Some(labels) = selector.get("matchLabels").and_then(Yaml::as_mapping) {
        for (k, v) in labels {
            let (k, v) = (
                k.as_str().unwrap_or_default(),
                v.as_str().unwrap_or_default(),
            );
            let k = sanitize(k);
            rules.push(json!({
                "action": "keep",
                "source_labels": [format!("{prefix}_label_{k}"), format!("{prefix}_labelpresent_{k}")],
                "regex": format!("({v});true"),
            }));
        }
    }
    for e in selector
        .get("matchExpressions")
        .and_then(Yaml::as_sequence)
        .into_iter()
        .flatten()
    {
        let key = sanitize(str_at(e, &["key"]).unwrap_or_default());
        let values: Vec<&str> = e
            .get("values")
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(Yaml::as_str)
            .collect();
        let label = format!("{prefix}_label_{key}");
        let present = format!("{prefix}_labelpresent_{key}");
        let rule = match str_at(e, &["operator"]).unwrap_or_default() {
            "In" => json!({"action": "keep", "source_labels": [label, present],
                           "regex": format!("({});true", values.join("|"))}),
            "NotIn" => json!({"action": "drop", "source_labels": [label, present],
                              "regex": format!("({});true", values.join("|"))}),
            "Exists" => json!({"action": "keep", "source_labels": [present], "regex": "true"}),
            "DoesNotExist" => {
                json!({"action": "drop", "source_labels": [present], "regex": "true"})
            }
            other => panic!("unknown selector operator {other:?}"),
        };
        rules.push(rule);
    }
    rules
}

/// The namespaces a PodMonitor's `namespaceSelector` picks: `None` for `any: true`.
pub fn pod_monitor_namespaces(pod_monitor: &Yaml) -> Option<Vec<String>> {
    let selector = &pod_monitor["spec"]["namespaceSelector"];
    if selector["any"].as_bool() == Some(true) {
        return None;
    }
    let names: Vec<String> = selector["matchNames"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(Yaml::as_str)
        .map(str::to_string)
        .collect();
    Some(if names.is_empty() {
        // No selector: the PodMonitor's own namespace.
        vec![
            str_at(pod_monitor, &["metadata", "namespace"])
                .unwrap_or_default()
                .to_string(),
        ]
    } else {
        names
    })
}

/// The scrape job of a PodMonitor's first endpoint, scraped every `interval_s` seconds,
/// its pods discovered from `targets_file` (see [`PodTargets`]).
pub fn pod_monitor_job(pod_monitor: &Yaml, targets_file: &Path, interval_s: u64) -> Json {
    let ns = str_at(pod_monitor, &["metadata", "namespace"]).expect("PodMonitor namespace");
    let name = str_at(pod_monitor, &["metadata", "name"]).expect("PodMonitor name");
    let spec = &pod_monitor["spec"];
    let endpoint = &spec["podMetricsEndpoints"][0];
    let port = str_at(endpoint, &["port"]).expect("podMetricsEndpoints[0].port");
    let sd = json!({
        "files": [targets_file.display().to_string()],
        "refresh_interval": format!("{interval_s}s"),
    });
    let m = "__meta_kubernetes_pod";
    let mut relabel = vec![
        json!({"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}),
        // The operator's default (filterRunning): finished pods are not scraped.
        json!({"action": "drop", "source_labels": [format!("{m}_phase")], "regex": "(Failed|Succeeded)"}),
    ];
    relabel.extend(selector_rules(&spec["selector"], m));
    relabel.extend([
        json!({"action": "keep", "source_labels": [format!("{m}_container_port_name")], "regex": port}),
        json!({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}),
        json!({"source_labels": [format!("{m}_container_name")], "target_label": "container"}),
        json!({"source_labels": [format!("{m}_name")], "target_label": "pod"}),
        json!({"target_label": "job", "replacement": format!("{ns}/{name}")}),
        json!({"target_label": "endpoint", "replacement": port}),
    ]);
    relabel.extend(
        endpoint["relabelings"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(relabel_config),
    );
    json!({
        "job_name": format!("podMonitor/{ns}/{name}/0"),
        "honor_labels": endpoint["honorLabels"].as_bool().unwrap_or(false),
        "scrape_interval": format!("{interval_s}s"),
        "metrics_path": str_at(endpoint, &["path"]).unwrap_or("/metrics"),
        "file_sd_configs": [sd],
        "relabel_configs": relabel,
    })
}

/// The scrape job of a ServiceMonitor's first endpoint, for a target that is not behind
/// a Service of the API server (the harness runs no endpoints controller): `target` with
/// the target labels the operator's endpoints discovery would give it (`namespace`,
/// `service`, `job` = the Service's name, `endpoint` = the port name).
pub fn service_monitor_job(service_monitor: &Yaml, target: SocketAddr, interval_s: u64) -> Json {
    let ns = str_at(service_monitor, &["metadata", "namespace"]).expect("ServiceMonitor namespace");
    let name = str_at(service_monitor, &["metadata", "name"]).expect("ServiceMonitor name");
    let endpoint = &service_monitor["spec"]["endpoints"][0];
    let port = str_at(endpoint, &["port"]).expect("endpoints[0].port");
    json!({
        "job_name": format!("serviceMonitor/{ns}/{name}/0"),
        "honor_labels": endpoint["honorLabels"].as_bool().unwrap_or(false),
        "scrape_interval": format!("{interval_s}s"),
        "metrics_path": str_at(endpoint, &["path"]).unwrap_or("/metrics"),
        "static_configs": [{
            "targets": [target.to_string()],
            "labels": {"namespace": ns, "service": name, "job": name, "endpoint": port},
        }],
        "relabel_configs": endpoint["relabelings"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(relabel_config)
            .collect::<Vec<_>>(),
    })
}

/// A whole `prometheus.yml` with these scrape jobs.
pub fn config(scrape_interval_s: u64, jobs: Vec<Json>) -> String {
    let config = json!({
        "global": {
            "scrape_interval": format!("{scrape_interval_s}s"),
            "evaluation_interval": format!("{scrape_interval_s}s"),
        },
        "scrape_configs": jobs,
    });
    serde_yaml::to_string(&config).expect("config is YAML")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Yaml {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn a_pod_monitor_becomes_the_operators_relabel_rules_then_its_own() {
        let pm = yaml(
            r#"
metadata: {name: t, namespace: mon}
spec:
  selector:
    matchLabels: {app.kubernetes.io/name: x}
    matchExpressions: [{key: kubetrain.io/job-name, operator: Exists}]
  namespaceSelector: {any: true}
  podMetricsEndpoints:
    - port: metrics
      relabelings:
        - sourceLabels: [__meta_kubernetes_pod_label_kubetrain_io_role]
          targetLabel: role
"#,
        );
        assert_eq!(pod_monitor_namespaces(&pm), None);
        let job = pod_monitor_job(&pm, Path::new("/t.json"), 2);
        assert_eq!(job["job_name"], "podMonitor/mon/t/0");
        assert_eq!(job["scrape_interval"], "2s");
        assert_eq!(job["honor_labels"], false);
        assert_eq!(
            job["file_sd_configs"],
            json!([{"files": ["/t.json"], "refresh_interval": "2s"}])
        );
        let rules = job["relabel_configs"].as_array().unwrap();
        assert_eq!(
            rules[2],
            json!({"action": "keep", "regex": "(x);true", "source_labels": [
                "__meta_kubernetes_pod_label_app_kubernetes_io_name",
                "__meta_kubernetes_pod_labelpresent_app_kubernetes_io_name"]})
        );
        assert_eq!(
            rules[3],
            json!({"action": "keep", "regex": "true", "source_labels": [
                "__meta_kubernetes_pod_labelpresent_kubetrain_io_job_name"]})
        );
        assert_eq!(
            rules.last().unwrap(),
            &json!({"source_labels": ["__meta_kubernetes_pod_label_kubetrain_io_role"],
                    "target_label": "role"})
        );
    }

    #[test]
    fn a_pod_becomes_one_target_per_container_port_with_kubernetes_meta_labels() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "j-worker-0", "namespace": "team",
                         "labels": {"kubetrain.io/job-name": "j"}},
            "spec": {"containers": [{"name": "trainer", "image": "t", "ports": [
                {"name": "trainer", "containerPort": 2222},
                {"name": "metrics", "containerPort": 9090}]}]},
            "status": {"podIP": "127.9.0.3", "phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        let pending: Pod = serde_json::from_value(json!({
            "metadata": {"name": "no-ip", "namespace": "team"},
            "spec": {"containers": [{"name": "c"}]},
        }))
        .unwrap();
        let groups = pod_target_groups(&[pod, pending]);
        let groups = groups.as_array().unwrap();
        assert_eq!(groups.len(), 2, "{groups:#?}");
        let metrics = &groups[1];
        assert_eq!(metrics["targets"], json!(["127.9.0.3:9090"]));
        let l = &metrics["labels"];
        assert_eq!(l["__meta_kubernetes_pod_container_port_name"], "metrics");
        assert_eq!(l["__meta_kubernetes_pod_label_kubetrain_io_job_name"], "j");
        assert_eq!(
            l["__meta_kubernetes_pod_labelpresent_kubetrain_io_job_name"],
            "true"
        );
        assert_eq!(l["__meta_kubernetes_pod_phase"], "Running");
        assert_eq!(l["__meta_kubernetes_pod_ready"], "true");
        assert_eq!(l["__meta_kubernetes_namespace"], "team");
        assert_eq!(l["__meta_kubernetes_pod_container_init"], "false");
    }

    #[test]
    fn a_service_monitor_keeps_honor_labels_and_names_the_service() {
        let sm = yaml(
            "metadata: {name: op, namespace: sys}\n\
             spec: {endpoints: [{port: metrics, path: /metrics, honorLabels: true}]}\n",
        );
        let job = service_monitor_job(&sm, "127.0.0.1:8080".parse().unwrap(), 1);
        assert_eq!(job["honor_labels"], true);
        assert_eq!(
            job["static_configs"][0]["labels"],
            json!({"namespace": "sys", "service": "op", "job": "op", "endpoint": "metrics"})
        );
        let text = config(1, vec![job]);
        assert!(text.contains("scrape_interval: 1s"), "{text}");
    }
}
