//! Prometheus metrics of the operator, served at `/metrics` next to `/healthz` and `/readyz`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kubetrain_api::condition::types;
use kubetrain_api::{TrainingJob, TrainingJobStatus};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiRequestLabels {
    verb: String,
    resource: String,
    /// The HTTP status, or "error" when no response came back.
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLatencyLabels {
    verb: String,
    resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    namespace: String,
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    namespace: String,
    job: String,
    role: String,
}

/// Every metric the operator exports, names prefixed `kubetrain_`.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_errors: Family<ErrorLabels, Counter>,
    reconcile_duration: Histogram,
    api_requests: Family<ApiRequestLabels, Counter>,
    api_request_duration: Family<ApiLatencyLabels, Histogram, fn() -> Histogram>,
    jobs: Family<StateLabels, Gauge>,
    pod_restarts: Family<RoleLabels, Gauge>,
    time_to_running: Histogram,
    time_to_first_progress: Histogram,
    progress_step: Family<JobLabels, Gauge>,
    progress_loss: Family<JobLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    progress_accuracy: Family<JobLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    progress_samples: Family<JobLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    state_by_job: Mutex<HashMap<String, String>>,
    seen_running: Mutex<HashSet<String>>,
    seen_progress: Mutex<HashSet<String>>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kubetrain");
        let reconciles = Counter::default();
        registry.register(
            "reconciles",
            "TrainingJob reconciles run",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by the action that failed",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            reconcile_duration.clone(),
        );
        let api_requests = Family::<ApiRequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Requests the operator sent to the API server, by verb, resource and HTTP status",
            api_requests.clone(),
        );
        let api_request_duration: Family<ApiLatencyLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 14)));
        registry.register(
            "api_request_duration_seconds",
            "Time until the API server's response head, by verb and resource (a watch: until it opened)",
            api_request_duration.clone(),
        );
        let jobs = Family::<StateLabels, Gauge>::default();
        registry.register("jobs", "TrainingJobs by lifecycle state", jobs.clone());
        let pod_restarts = Family::<RoleLabels, Gauge>::default();
        registry.register(
            "pod_restarts",
            "Pod restarts of a job (in place plus recreated), by role",
            pod_restarts.clone(),
        );
        let time_to_running = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        registry.register(
            "job_time_to_running_seconds",
            "Time from a job's creation until all its pods ran",
            time_to_running.clone(),
        );
        let time_to_first_progress = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        registry.register(
            "job_time_to_first_progress_seconds",
            "Time from a job's creation until the chief first reported progress",
            time_to_first_progress.clone(),
        );
        let progress_step = Family::<JobLabels, Gauge>::default();
        registry.register(
            "job_step",
            "Training step reported by the chief",
            progress_step.clone(),
        );
        let progress_loss = Family::default();
        registry.register(
            "job_loss",
            "Training loss reported by the chief",
            Family::clone(&progress_loss),
        );
        let progress_accuracy = Family::default();
        registry.register(
            "job_accuracy",
            "Test accuracy reported by the chief",
            Family::clone(&progress_accuracy),
        );
        let progress_samples = Family::default();
        registry.register(
            "job_samples_per_second",
            "Training throughput reported by the chief",
            Family::clone(&progress_samples),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            api_requests,
            api_request_duration,
            jobs,
            pod_restarts,
            time_to_running,
            time_to_first_progress,
            progress_step,
            progress_loss,
            progress_accuracy,
            progress_samples,
            state_by_job: Mutex::default(),
            seen_running: Mutex::default(),
            seen_progress: Mutex::default(),
            ready: AtomicBool::new(false),
        }
    }

    /// Records one reconcile and, if it failed, the kind of failure.
    pub fn observe_reconcile(&self, took: Duration, error_kind: Option<&str>) {
        self.reconciles.inc();
        self.reconcile_duration.observe(took.as_secs_f64());
        if let Some(kind) = error_kind {
            self.reconcile_errors
                .get_or_create(&ErrorLabels {
                    kind: kind.to_string(),
                })
                .inc();
        }
    }

    /// Records one API request (see `api_requests`); `code` is None when no response came.
    pub fn observe_api_request(
        &self,
        verb: &str,
        resource: &str,
        code: Option<u16>,
        took: Duration,
    ) {
        self.api_requests
            .get_or_create(&ApiRequestLabels {
                verb: verb.to_string(),
                resource: resource.to_string(),
                code: code.map_or_else(|| "error".to_string(), |c| c.to_string()),
            })
            .inc();
        self.api_request_duration
            .get_or_create(&ApiLatencyLabels {
                verb: verb.to_string(),
                resource: resource.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Creates the error counter of each kind at 0 (see `controller::Error::KINDS`).
    pub fn start_error_kinds_at_zero(&self, kinds: &[&str]) {
        for kind in kinds {
            drop(self.reconcile_errors.get_or_create(&ErrorLabels {
                kind: (*kind).to_string(),
            }));
        }
    }

    /// Updates the per-job gauges from the status just decided.
    pub fn observe_job(&self, job: &TrainingJob, status: &TrainingJobStatus) {
        let namespace = job.namespace().unwrap_or_default();
        let name = job.name_any();
        let key = format!("{namespace}/{name}");
        let state = status
            .lifecycle()
            .map_or("Pending".to_string(), |c| c.type_.clone());

        let mut states = self.state_by_job.lock().expect("metrics lock");
        if let Some(previous) = states.insert(key.clone(), state.clone()) {
            if previous != state {
                self.jobs
                    .get_or_create(&StateLabels { state: previous })
                    .dec();
                self.jobs
                    .get_or_create(&StateLabels {
                        state: state.clone(),
                    })
                    .inc();
            }
        } else {
            self.jobs
                .get_or_create(&StateLabels {
                    state: state.clone(),
                })
                .inc();
        }
        drop(states);

        for role in kubetrain_api::contract::Role::ALL {
            let Some(restarts) = status.replica_statuses.role(role).map(|r| r.restarts) else {
                continue;
            };
            self.pod_restarts
                .get_or_create(&RoleLabels {
                    namespace: namespace.clone(),
                    job: name.clone(),
                    role: role.as_str().to_string(),
                })
                .set(i64::from(restarts));
        }

        let since_creation = || {
            job.creation_timestamp()
                .map(|t| Timestamp::now().duration_since(t.0).as_secs_f64().max(0.0))
        };
        if state == types::RUNNING
            && self
                .seen_running
                .lock()
                .expect("metrics lock")
                .insert(key.clone())
            && let Some(secs) = since_creation()
        {
            self.time_to_running.observe(secs);
        }
        if let Some(progress) = &status.progress {
            let labels = JobLabels {
                namespace: namespace.clone(),
                job: name.clone(),
            };
            self.progress_step.get_or_create(&labels).set(progress.step);
            if let Some(loss) = progress.loss {
                self.progress_loss.get_or_create(&labels).set(loss);
            }
            if let Some(accuracy) = progress.accuracy {
                self.progress_accuracy.get_or_create(&labels).set(accuracy);
            }
            if let Some(rate) = progress.samples_per_second {
                self.progress_samples.get_or_create(&labels).set(rate);
            }
            if self.seen_progress.lock().expect("metrics lock").insert(key)
                && let Some(secs) = since_creation()
            {
                self.time_to_first_progress.observe(secs);
            }
        }
    }

    /// Drops the series of every job `still_there(namespace, name)` denies. A deleted job
    /// gets no last reconcile, so without this it would count in its state forever and
    /// its per-job series would pile up.
    pub fn forget_deleted_jobs(&self, still_there: impl Fn(&str, &str) -> bool) {
        let mut states = self.state_by_job.lock().expect("metrics lock");
        let gone: Vec<(String, String)> = states
            .iter()
            .filter(|(key, _)| {
                let (namespace, name) = key.split_once('/').unwrap_or(("", key));
                !still_there(namespace, name)
            })
            .map(|(key, state)| (key.clone(), state.clone()))
            .collect();
        for (key, state) in gone {
            states.remove(&key);
            self.jobs.get_or_create(&StateLabels { state }).dec();
            self.seen_running.lock().expect("metrics lock").remove(&key);
            self.seen_progress
                .lock()
                .expect("metrics lock")
                .remove(&key);
            let (namespace, name) = key.split_once('/').unwrap_or(("", &key));
            let job = JobLabels {
                namespace: namespace.to_string(),
                job: name.to_string(),
            };
            self.progress_step.remove(&job);
            self.progress_loss.remove(&job);
            self.progress_accuracy.remove(&job);
            self.progress_samples.remove(&job);
            for role in kubetrain_api::contract::Role::ALL {
                self.pod_restarts.remove(&RoleLabels {
                    namespace: job.namespace.clone(),
                    job: job.job.clone(),
                    role: role.as_str().to_string(),
                });
            }
        }
    }

    /// Marks the operator ready (its watches are running).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether `/readyz` answers OK.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding metrics into a String cannot fail");
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends. Port 0
/// takes any free port; the log line "serving metrics and probes" names the one bound, so
/// that tests need not pick a port and release it before the operator binds it (a race).
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: std::sync::Arc<Metrics>,
) -> std::io::Result<()> {
    use axum::{Router, http::StatusCode, routing::get};
    let for_metrics = metrics.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = for_metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let m = metrics.clone();
                async move {
                    if m.is_ready() {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving metrics and probes");
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubetrain_api::TrainingProgress;

    fn job(name: &str) -> TrainingJob {
        kubetrain_api::fixtures::JobFixture::quickstart()
            .namespace("team")
            .name(name)
            .build()
    }

    fn running() -> TrainingJobStatus {
        serde_json::from_value(serde_json::json!({
            "conditions": [{"type": "Running", "status": "True", "reason": "PodsRunning",
                            "message": "", "lastTransitionTime": "2027-01-15T08:00:00Z"}]
        }))
        .unwrap()
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn a_deleted_job_leaves_no_count_and_no_series_behind() {
        let metrics = Metrics::new();
        let mut status = running();
        status.progress = Some(TrainingProgress {
            step: 10,
            loss: Some(0.5),
            ..TrainingProgress::default()
        });
        metrics.observe_job(&job("kept"), &status);
        metrics.observe_job(&job("deleted"), &status);
        let before = metrics.encode();
        assert_eq!(
            line(&before, "kubetrain_jobs{state=\"Running\"}"),
            ["kubetrain_jobs{state=\"Running\"} 2"]
        );
        assert_eq!(line(&before, "kubetrain_job_step").len(), 2);

        metrics.forget_deleted_jobs(|namespace, name| namespace == "team" && name == "kept");
        let after = metrics.encode();
        assert_eq!(
            line(&after, "kubetrain_jobs{state=\"Running\"}"),
            ["kubetrain_jobs{state=\"Running\"} 1"]
        );
        assert!(!after.contains("job=\"deleted\""), "{after}");
        assert!(after.contains("job=\"kept\""), "{after}");
    }

    #[test]
    fn error_kinds_start_at_zero_and_count_from_there() {
        let metrics = Metrics::new();
        metrics.start_error_kinds_at_zero(&["apply_pod", "patch_status"]);
        metrics.observe_reconcile(Duration::from_millis(1), Some("apply_pod"));
        let text = metrics.encode();
        let mut errors = line(&text, "kubetrain_reconcile_errors_total{");
        // A family encodes in hash order.
        errors.sort_unstable();
        assert_eq!(
            errors,
            [
                "kubetrain_reconcile_errors_total{kind=\"apply_pod\"} 1",
                "kubetrain_reconcile_errors_total{kind=\"patch_status\"} 0",
            ]
        );
    }
}
