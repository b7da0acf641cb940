//! Issue 4: how many API calls the operator makes for a job with N replicas, from creation
//! to Running (docs/benchmarks.md, "Operator API calls per job").
//!
//! ```sh
//! cargo bench -p kubetrain-e2e --bench api_calls
//! ```
//!
//! Runs `controller::run` in-process against the test API server (tests/README.md) with a
//! client whose tower stack has a counting layer: every request the operator sends is
//! recorded as method + path (query dropped) and classified. For each N (1 PS + N-1
//! workers, the quickstart's `training` block) and each way of starting the pods, a fresh
//! namespace and a fresh operator:
//!
//! 1. start the operator and wait until its three watches (jobs, pods, Services) are open;
//!    the calls up to there are start-up cost, not the job's, and are not counted;
//! 2. create the job, wait until its N pods exist;
//! 3. play the kubelet through the pod `status` subresource (no kubelet runs here):
//!    *burst* marks all pods Running + Ready at once (concurrently), *staggered* one pod
//!    every 100 ms, as pods really come up;
//! 4. wait until the job's Running condition is True with all workers ready, then 2 s more
//!    for anything late.
//!
//! A watch on the job records every status version the server stored, so status patches
//! can be compared with what they changed: a lifecycle condition, or only the replica
//! counts. The bench prints markdown tables; it fails only if the harness does.

use kubetrain_api::fixtures::JobFixture;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::join_all;
use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::client::ClientBuilder;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use kubetrain_api::TrainingJob;
use kubetrain_api::condition::types;
use kubetrain_e2e::envtest::{ApiServer, TestNamespace, server};
use kubetrain_e2e::operator::{lifecycle, set_pod_running, wait_for_pods};
use kubetrain_operator::api_requests::{ApiCall, path_template};
use kubetrain_operator::controller::{self, Context};
use kubetrain_operator::metrics::Metrics;
use kubetrain_operator::plan::PlanSettings;

/// Replica counts measured (1 PS + N-1 workers).
const SIZES: [usize; 3] = [2, 8, 32];
/// Quiet time after Running, for late writes.
const SETTLE: Duration = Duration::from_secs(2);
/// Gap between pods in the staggered pass.
const STAGGER: Duration = Duration::from_millis(100);
/// Upper bound for any wait.
const TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// The counting layer.

/// What one request was, as far as issue 4 cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    PodApply,
    PodDelete,
    ServiceApply,
    StatusPatch,
    EventCreate,
    EventPatch,
    List,
    Get,
    Watch,
    Other,
}

/// One request the operator sent.
#[derive(Clone, Debug)]
struct Call {
    kind: Kind,
    method: Method,
    /// The path without the query, names replaced: `/api/v1/namespaces/{ns}/pods/{name}`.
    template: String,
    /// The response status, once the response headers arrived.
    status: Option<u16>,
}

/// The shared log the layer writes to.
#[derive(Clone, Default)]
struct CallLog(Arc<Mutex<Vec<Call>>>);

impl CallLog {
    fn push(&self, call: Call) -> usize {
        let mut calls = self.0.lock().expect("call log lock");
        calls.push(call);
        calls.len() - 1
    }

    fn set_status(&self, index: usize, status: Option<u16>) {
        if let Some(call) = self.0.lock().expect("call log lock").get_mut(index) {
            call.status = status;
        }
    }

    fn len(&self) -> usize {
        self.0.lock().expect("call log lock").len()
    }

    fn since(&self, start: usize) -> Vec<Call> {
        self.0.lock().expect("call log lock")[start..].to_vec()
    }
}

/// A tower layer that records every request in a [`CallLog`].
struct CountingLayer(CallLog);

impl<S> tower_layer::Layer<S> for CountingLayer {
    type Service = Counting<S>;

    fn layer(&self, inner: S) -> Counting<S> {
        Counting {
            inner,
            log: self.0.clone(),
        }
    }
}

/// The service [`CountingLayer`] wraps around kube's stack.
struct Counting<S> {
    inner: S,
    log: CallLog,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower_service::Service<Request<B>> for Counting<S>
where
    S: tower_service::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let index = self.log.push(classify(&request));
        let log = self.log.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            log.set_status(index, response.as_ref().ok().map(|r| r.status().as_u16()));
            response
        })
    }
}

/// Classifies a request by method, path and (for PATCH) patch type.
fn classify<B>(request: &Request<B>) -> Call {
    let method = request.method().clone();
    let path = request.uri().path();
    let query = request.uri().query().unwrap_or("");
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    // Verb and resource as the operator's own request metrics classify them.
    let call = ApiCall::classify(&method, path, query, content_type);
    let kind = match (call.verb, call.resource, call.subresource) {
        ("watch", _, _) => Kind::Watch,
        ("list", _, _) => Kind::List,
        ("get", _, _) => Kind::Get,
        ("apply", "pods", None) => Kind::PodApply,
        ("delete", "pods", None) => Kind::PodDelete,
        ("apply", "services", None) => Kind::ServiceApply,
        ("apply" | "patch", "trainingjobs", Some("status")) => Kind::StatusPatch,
        ("create", "events", _) => Kind::EventCreate,
        ("patch", "events", _) => Kind::EventPatch,
        _ => Kind::Other,
    };
    Call {
        kind,
        method,
        template: path_template(path),
        status: None,
    }
}

// ---------------------------------------------------------------------------------------
// One measured run.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// All pods marked Running at once.
    Burst,
    /// One pod every [`STAGGER`].
    Staggered,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Burst => "burst",
            Pass::Staggered => "staggered",
        }
    }
}

/// What a run measured.
struct Run {
    replicas: usize,
    pass: Pass,
    calls: Vec<Call>,
    /// Calls made before the kubelet pass started (creation phase).
    calls_before_running: usize,
    /// Distinct status contents stored, in order (from the job watch).
    statuses: Vec<StatusVersion>,
    /// Lifecycle states the job went through (`Created/PodsCreated`, ...).
    lifecycle: Vec<String>,
    /// Creation to Running.
    to_running: Duration,
}

/// One status version the server stored.
struct StatusVersion {
    /// The conditions as (type, status, reason).
    conditions: BTreeSet<(String, String, String)>,
    /// The True lifecycle condition as `Type/Reason: message`.
    lifecycle: String,
    /// Everything in the status.
    json: String,
}

impl Run {
    fn count(&self, kind: Kind) -> usize {
        self.calls.iter().filter(|c| c.kind == kind).count()
    }

    /// Status versions whose conditions differ from the previous version's.
    fn condition_changes(&self) -> usize {
        let mut previous = BTreeSet::new();
        let mut changes = 0;
        for s in &self.statuses {
            if s.conditions != previous {
                changes += 1;
            }
            previous = s.conditions.clone();
        }
        changes
    }

    /// Status versions that changed only counts (replica statuses, workersReady, ...).
    fn count_only_changes(&self) -> usize {
        self.statuses.len() - self.condition_changes()
    }

    /// Lifecycle transitions: the True lifecycle condition changed (Created, Running).
    fn lifecycle_transitions(&self) -> usize {
        self.lifecycle.iter().filter(|s| *s != "(none)").count()
    }

    /// Calls that failed; a GET answered 404 is the operator's `get_opt` finding nothing.
    fn failed_calls(&self) -> Vec<&Call> {
        self.calls
            .iter()
            .filter(|c| {
                c.status
                    .is_some_and(|s| s >= 400 && !(c.kind == Kind::Get && s == 404))
            })
            .collect()
    }
}

/// The quickstart example as `name` with 1 PS and `replicas - 1` workers.
fn job(name: &str, replicas: usize) -> TrainingJob {
    JobFixture::quickstart()
        .name(name)
        .ps(1)
        .workers(i32::try_from(replicas - 1).expect("replica count fits i32"))
        .build()
}

/// Polls `probe` every 20 ms until it holds; panics with `what` after [`TIMEOUT`].
async fn wait(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !probe() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Records every version of job `name` the watch delivers.
fn watch_job(
    ns: &TestNamespace,
    name: &str,
) -> (Arc<Mutex<Vec<TrainingJob>>>, tokio::task::JoinHandle<()>) {
    let seen: Arc<Mutex<Vec<TrainingJob>>> = Arc::default();
    let stream = watcher::watch_object(ns.api::<TrainingJob>(), name);
    let sink = seen.clone();
    let handle = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(Some(job)) => {
                    let mut seen = sink.lock().expect("seen lock");
                    if seen.last().map(|j| j.resource_version()) != Some(job.resource_version()) {
                        seen.push(job);
                    }
                }
                Ok(None) => {}
                Err(error) => eprintln!("job watch error (retrying): {error}"),
            }
        }
    });
    (seen, handle)
}

async fn measure(server: &ApiServer, replicas: usize, pass: Pass) -> Run {
    let ns = server
        .namespace(&format!("bench-api-{replicas}-{}", pass.name()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let log = CallLog::default();
    let config = server.config().await.unwrap_or_else(|e| panic!("{e}"));
    let client = ClientBuilder::try_from(config)
        .unwrap_or_else(|e| panic!("client: {e}"))
        .with_layer(&CountingLayer(log.clone()))
        .build();
    let context = Arc::new(Context::new(
        client,
        PlanSettings::default(),
        Some("bench".into()),
        Arc::new(Metrics::new()),
    ));
    let operator = tokio::spawn(controller::run(context, Some(ns.name.clone())));

    // Start-up: initial lists and the three watches. Not the job's cost.
    wait("the operator's three watches", || {
        log.since(0)
            .iter()
            .filter(|c| c.kind == Kind::Watch)
            .count()
            >= 3
    })
    .await;
    let start = log.len();

    let name = "bench";
    let (seen, watch) = watch_job(&ns, name);
    let created = Instant::now();
    ns.api::<TrainingJob>()
        .create(&PostParams::default(), &job(name, replicas))
        .await
        .unwrap_or_else(|e| panic!("create job: {e}"));

    let pods: Api<Pod> = ns.api();
    let listed = wait_for_pods(&pods, name, &format!("{replicas} pods"), |list| {
        list.len() == replicas
    })
    .await;
    let calls_before_running = log.len() - start;

    let names: Vec<String> = listed.iter().map(|p| p.name_any()).collect();
    match pass {
        Pass::Burst => {
            let results = join_all(names.iter().map(|n| set_pod_running(&pods, n))).await;
            for (n, r) in names.iter().zip(results) {
                r.unwrap_or_else(|e| panic!("set pod {n} Running: {e}"));
            }
        }
        Pass::Staggered => {
            // In name order (PS, then workers); Running comes with the last pod.
            for n in &names {
                set_pod_running(&pods, n)
                    .await
                    .unwrap_or_else(|e| panic!("set pod {n} Running: {e}"));
                tokio::time::sleep(STAGGER).await;
            }
        }
    }

    let workers = replicas - 1;
    let ready = format!("{workers}/{workers}");
    wait("the job Running with all workers ready", || {
        seen.lock().expect("seen lock").last().is_some_and(|j| {
            lifecycle(j).is_some_and(|c| c.type_ == types::RUNNING)
                && j.status.as_ref().and_then(|s| s.workers_ready.as_deref())
                    == Some(ready.as_str())
        })
    })
    .await;
    let to_running = created.elapsed();
    tokio::time::sleep(SETTLE).await;

    operator.abort();
    watch.abort();
    let calls = log.since(start);
    let versions = seen.lock().expect("seen lock").clone();
    let mut statuses = Vec::new();
    let mut lifecycle_states: Vec<String> = Vec::new();
    for job in &versions {
        let state = lifecycle(job).map_or_else(
            || "(none)".to_string(),
            |c| format!("{}/{}", c.type_, c.reason),
        );
        if lifecycle_states.last() != Some(&state) {
            lifecycle_states.push(state);
        }
        let Some(status) = &job.status else { continue };
        let json = serde_json::to_string(status).expect("status serializes");
        if statuses
            .last()
            .is_some_and(|s: &StatusVersion| s.json == json)
        {
            continue;
        }
        statuses.push(StatusVersion {
            conditions: status
                .conditions
                .iter()
                .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
                .collect(),
            lifecycle: lifecycle(job).map_or_else(String::new, |c| {
                format!("{}/{}: {:?}", c.type_, c.reason, c.message)
            }),
            json,
        });
    }
    Run {
        replicas,
        pass,
        calls,
        calls_before_running,
        statuses,
        lifecycle: lifecycle_states,
        to_running,
    }
}

// ---------------------------------------------------------------------------------------
// Reporting.

fn check(ok: bool) -> &'static str {
    if ok { "✓" } else { "✗" }
}

fn summary(runs: &[Run]) {
    println!(
        "| N | kubelet pass | pod applies | Service applies | status patches | status versions \
         stored (condition change + counts only) | lifecycle transitions | events | reads \
         (LIST + GET) | other writes | creation → Running | pods = N | Service = 1 | \
         status ≤ 1 per condition change | no no-op status patch |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for run in runs {
        let pods = run.count(Kind::PodApply);
        let services = run.count(Kind::ServiceApply);
        let patches = run.count(Kind::StatusPatch);
        let events = run.count(Kind::EventCreate) + run.count(Kind::EventPatch);
        let lists = run.count(Kind::List);
        let gets = run.count(Kind::Get);
        let other = run.count(Kind::PodDelete) + run.count(Kind::Other);
        let conditions = run.condition_changes();
        println!(
            "| {} | {} | {} | {} | {} | {} ({} + {}) | {} ({}) | {} | {} ({} + {}) | {} | {:.1} s | {} | {} | {} | {} |",
            run.replicas,
            run.pass.name(),
            pods,
            services,
            patches,
            run.statuses.len(),
            conditions,
            run.count_only_changes(),
            run.lifecycle_transitions(),
            run.lifecycle.join(" → "),
            events,
            lists + gets,
            lists,
            gets,
            other,
            run.to_running.as_secs_f64(),
            check(pods == run.replicas),
            check(services == 1),
            check(patches <= conditions),
            check(patches <= run.statuses.len()),
        );
    }
}

fn details(runs: &[Run]) {
    println!();
    println!("Every call, by run (method, path template, response status: count):");
    for run in runs {
        println!();
        println!(
            "- N = {}, {} ({} calls, {} of them before the pods were marked Running):",
            run.replicas,
            run.pass.name(),
            run.calls.len(),
            run.calls_before_running
        );
        let mut grouped: BTreeMap<(Kind, String, String, String), usize> = BTreeMap::new();
        for c in &run.calls {
            let status = c.status.map_or_else(|| "-".to_string(), |s| s.to_string());
            *grouped
                .entry((c.kind, c.method.to_string(), c.template.clone(), status))
                .or_default() += 1;
        }
        for ((kind, method, template, status), count) in grouped {
            println!("  - {kind:?}: `{method} {template}` → {status}: {count}");
        }
        println!("  - status versions stored, with what each changed:");
        let mut previous = serde_json::Value::Null;
        for (i, version) in run.statuses.iter().enumerate() {
            let value: serde_json::Value =
                serde_json::from_str(&version.json).expect("stored status is JSON");
            let mut changed = Vec::new();
            changed_paths("", &previous, &value, &mut changed);
            println!(
                "    {}. [{}] changed: {}",
                i + 1,
                version.lifecycle,
                changed.join(", ")
            );
            previous = value;
        }
        let failed = run.failed_calls();
        if !failed.is_empty() {
            println!("  - failed calls: {}", failed.len());
        }
    }
}

/// The leaf paths where `before` and `after` differ (arrays compared whole).
fn changed_paths(
    prefix: &str,
    before: &serde_json::Value,
    after: &serde_json::Value,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let keys: BTreeSet<&String> = b.keys().chain(a.keys()).collect();
            for key in keys {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                changed_paths(
                    &path,
                    b.get(key).unwrap_or(&Value::Null),
                    a.get(key).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Null, Value::Object(a)) => {
            changed_paths(prefix, &Value::Object(Default::default()), after, out);
            if a.is_empty() {
                out.push(prefix.to_string());
            }
        }
        (b, a) if b != a => out.push(if a.is_number() || a.is_string() {
            format!("{prefix}={a}")
        } else {
            prefix.to_string()
        }),
        _ => {}
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let server = server().await;
        server.install_crd().await.unwrap_or_else(|e| panic!("{e}"));
        let mut runs = Vec::new();
        for replicas in SIZES {
            for pass in [Pass::Burst, Pass::Staggered] {
                let run = measure(server, replicas, pass).await;
                eprintln!(
                    "N = {replicas} {}: {} calls, Running after {:.1} s",
                    pass.name(),
                    run.calls.len(),
                    run.to_running.as_secs_f64()
                );
                runs.push(run);
            }
        }
        println!("## Operator API calls from creation to Running");
        println!();
        summary(&runs);
        details(&runs);
    });
}
