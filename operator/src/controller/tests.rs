//! Exact-request tests (DESIGN.md §6 tier 2): the reconcile's calls to the API, pinned
//! down over a tower-test mock, the controller-rs way. Each test is one scenario; the
//! scenario task answers the requests it expects, in order, and fails on anything else.

use kubetrain_api::fixtures::JobFixture;

use std::sync::Arc;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::client::Body;
use kube::core::DeserializeGuard;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use kubetrain_api::TrainingJob;
use serde_json::{Value, json};

use super::{Context, reconcile};
use crate::decide;
use crate::metrics::Metrics;
use crate::plan::{self, PlanSettings};
use crate::replica::{self, ReplicaId};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn job() -> TrainingJob {
    JobFixture::quickstart()
        .namespace("ns")
        .uid("job-uid")
        .generation(1)
        .build()
}

fn context() -> (Arc<Context>, Handle) {
    context_with(PlanSettings::default())
}

fn context_with(settings: PlanSettings) -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "ns");
    let ctx = Context::new(
        client,
        settings,
        Some("test".into()),
        Arc::new(Metrics::new()),
    );
    (Arc::new(ctx), handle)
}

/// One expected call: method, path (and query), and a check of the body.
struct Expect<'a> {
    method: Method,
    path_and_query: &'a str,
    respond: Value,
    status: u16,
}

async fn expect(handle: &mut Handle, e: Expect<'_>) -> Value {
    let (request, send) = handle
        .next_request()
        .await
        .unwrap_or_else(|| panic!("expected {} {}, got no request", e.method, e.path_and_query));
    assert_eq!(request.method(), e.method, "method of {}", request.uri());
    let actual = request.uri().path_and_query().unwrap().as_str().to_string();
    // A trailing `*` matches names the client makes up (event names carry a timestamp).
    match e.path_and_query.strip_suffix('*') {
        Some(prefix) => assert!(
            actual.starts_with(prefix),
            "request {actual} does not start with {prefix}"
        ),
        None => assert_eq!(
            actual, e.path_and_query,
            "request for {} {}",
            e.method, e.path_and_query
        ),
    }
    let body = request.into_body().collect_bytes().await.unwrap();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    };
    send.send_response(
        Response::builder()
            .status(e.status)
            .body(Body::from(serde_json::to_vec(&e.respond).unwrap()))
            .unwrap(),
    );
    body
}

const APPLY_QUERY: &str = "?&force=true&fieldManager=kubetrain.io%2Foperator";

/// Fills the context's pod cache as the pod watch's first list would (and lists no
/// Service): the reconcile reads its pods and Service from there, with no request.
fn cached(ctx: &Context, pods: &[Pod]) {
    let mut writer = ctx.pods.take_writer().expect("the cache's one writer");
    let events = std::iter::once(watcher::Event::Init)
        .chain(
            pods.iter()
                .map(|p| watcher::Event::InitApply(crate::cached_pod::CachedPod::from(p))),
        )
        .chain(std::iter::once(watcher::Event::InitDone));
    for event in events {
        writer.apply_watcher_event(&event);
    }
    let mut services = ctx
        .service_writer
        .lock()
        .unwrap()
        .take()
        .expect("the Service cache's one writer");
    services.apply_watcher_event(&watcher::Event::Init);
    services.apply_watcher_event(&watcher::Event::InitDone);
}

/// A server-side apply of the job's status; returns the body sent.
async fn expect_status_patch(handle: &mut Handle, job_json: &Value) -> Value {
    expect(handle, Expect {
        method: Method::PATCH,
        path_and_query: &format!("/apis/kubetrain.io/v1alpha1/namespaces/ns/trainingjobs/quickstart/status{APPLY_QUERY}"),
        respond: job_json.clone(),
        status: 200,
    })
    .await
}

/// A minimal valid object for responses whose content the reconcile does not use.
fn any_object(api_version: &str, kind: &str, name: &str) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": "ns"}})
}

fn running_pods(job: &TrainingJob) -> Vec<Pod> {
    replica::replica_ids(job)
        .into_iter()
        .map(|replica| {
            let mut pod = plan::pod(job, replica, &PlanSettings::default());
            pod.metadata.uid = Some(format!("{}-uid", pod.name_any()));
            pod.status = Some(serde_json::from_value(json!({
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "trainer", "ready": true, "restartCount": 0, "image": "", "imageID": ""}]
            })).unwrap());
            pod
        })
        .collect()
}

fn guard(job: TrainingJob) -> Arc<DeserializeGuard<TrainingJob>> {
    Arc::new(DeserializeGuard(Ok(job)))
}

#[tokio::test]
async fn a_new_job_gets_its_status_service_and_pods_by_server_side_apply() {
    let job = job();
    let (ctx, mut handle) = context();
    cached(&ctx, &[]);
    let job_json = serde_json::to_value(&job).unwrap();
    let scenario = tokio::spawn(async move {
        let status = expect_status_patch(&mut handle, &job_json).await;
        assert_eq!(status["kind"], "TrainingJob");
        assert_eq!(status["status"]["conditions"][0]["type"], "Created");
        assert_eq!(status["status"]["conditions"][0]["status"], "True");
        assert_eq!(status["status"]["workersReady"], "0/2");

        let service = expect_service_apply(&mut handle).await;
        assert_eq!(service["spec"]["clusterIP"], "None");
        assert_eq!(service["metadata"]["ownerReferences"][0]["uid"], "job-uid");

        // Created (never applied nor read) before the pods that refer to it.
        let secret = expect_token_secret(&mut handle, 201).await;
        assert_eq!(secret["immutable"], true);
        assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "job-uid");
        // 64 hex digits, base64-encoded.
        assert_eq!(secret["data"]["token"].as_str().map(str::len), Some(88));

        let event = expect_quickstart_pods_and_event(&mut handle).await;
        assert_eq!(event["reason"], "PodCreated");
        assert_eq!(
            event["note"],
            "created 3 pods: quickstart-ps-0, quickstart-worker-0, quickstart-worker-1"
        );
        assert_eq!(event["reportingController"], "kubetrain.io/operator");
        handle
    });
    reconcile(guard(job), ctx)
        .await
        .expect("reconcile succeeds");
    let mut handle = scenario.await.unwrap();
    assert_no_more_requests(&mut handle).await;
}

async fn expect_service_apply(handle: &mut Handle) -> Value {
    expect(
        handle,
        Expect {
            method: Method::PATCH,
            path_and_query: &format!("/api/v1/namespaces/ns/services/quickstart{APPLY_QUERY}"),
            respond: any_object("v1", "Service", "quickstart"),
            status: 200,
        },
    )
    .await
}

/// The quickstart's three pod applies, each owned by the job, then the one `PodCreated`
/// Event; returns the Event.
async fn expect_quickstart_pods_and_event(handle: &mut Handle) -> Value {
    for name in [
        "quickstart-ps-0",
        "quickstart-worker-0",
        "quickstart-worker-1",
    ] {
        let pod = expect(
            handle,
            Expect {
                method: Method::PATCH,
                path_and_query: &format!("/api/v1/namespaces/ns/pods/{name}{APPLY_QUERY}"),
                respond: any_object("v1", "Pod", name),
                status: 200,
            },
        )
        .await;
        assert_eq!(pod["kind"], "Pod");
        assert_eq!(pod["metadata"]["name"], name);
        assert_eq!(pod["metadata"]["ownerReferences"][0]["controller"], true);
    }
    expect(
        handle,
        Expect {
            method: Method::POST,
            path_and_query: "/apis/events.k8s.io/v1/namespaces/ns/events?",
            respond: any_object("events.k8s.io/v1", "Event", "quickstart.1"),
            status: 201,
        },
    )
    .await
}

async fn expect_token_secret(handle: &mut Handle, status: u16) -> Value {
    let secret = expect(
        handle,
        Expect {
            method: Method::POST,
            path_and_query: "/api/v1/namespaces/ns/secrets?",
            respond: if status == 409 {
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "secrets \"quickstart-token\" already exists"})
            } else {
                any_object("v1", "Secret", "quickstart-token")
            },
            status,
        },
    )
    .await;
    assert_eq!(secret["metadata"]["name"], "quickstart-token");
    secret
}

#[tokio::test]
async fn an_existing_token_secret_is_kept_and_the_network_policy_comes_before_the_pods() {
    let job = job();
    let (ctx, mut handle) = context_with(PlanSettings {
        job_network_policy: Some(crate::plan::OperatorPods {
            namespace: "kubetrain-system".into(),
            labels: [("app.kubernetes.io/component".into(), "operator".into())].into(),
        }),
        ..PlanSettings::default()
    });
    cached(&ctx, &[]);
    let job_json = serde_json::to_value(&job).unwrap();
    let scenario = tokio::spawn(async move {
        expect_status_patch(&mut handle, &job_json).await;
        expect_service_apply(&mut handle).await;
        // A retried reconcile finds the Secret there: the pods keep the token they hold.
        expect_token_secret(&mut handle, 409).await;
        let policy = expect(
            &mut handle,
            Expect {
                method: Method::PATCH,
                path_and_query: &format!(
                    "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/quickstart{APPLY_QUERY}"
                ),
                respond: any_object("networking.k8s.io/v1", "NetworkPolicy", "quickstart"),
                status: 200,
            },
        )
        .await;
        assert_eq!(
            policy["spec"]["podSelector"]["matchLabels"]["kubetrain.io/job-name"],
            "quickstart"
        );
        assert_eq!(policy["metadata"]["ownerReferences"][0]["uid"], "job-uid");
        expect_quickstart_pods_and_event(&mut handle).await;
        handle
    });
    reconcile(guard(job), ctx)
        .await
        .expect("reconcile succeeds");
    let mut handle = scenario.await.unwrap();
    assert_no_more_requests(&mut handle).await;
}

#[tokio::test]
async fn a_reconcile_with_nothing_to_change_writes_nothing() {
    let mut job = job();
    let pods = running_pods(&job);
    // The job as the API server holds it after an earlier reconcile wrote its status.
    let first = decide::decide(&job, &[], k8s_openapi::jiff::Timestamp::now());
    job.status = Some(first.status);
    let second = decide::decide(&job, &pods, k8s_openapi::jiff::Timestamp::now());
    job.status = Some(second.status);

    let (ctx, handle) = context();
    cached(&ctx, &pods);
    let scenario = tokio::spawn(async move { handle });
    reconcile(guard(job), ctx)
        .await
        .expect("reconcile succeeds");
    let mut handle = scenario.await.unwrap();
    assert_no_more_requests(&mut handle).await;
}

#[tokio::test]
async fn a_status_change_is_one_status_patch_and_nothing_else() {
    let mut job = job();
    let pods = running_pods(&job);
    let first = decide::decide(&job, &[], k8s_openapi::jiff::Timestamp::now());
    job.status = Some(first.status);

    let (ctx, mut handle) = context();
    cached(&ctx, &pods);
    let job_json = serde_json::to_value(&job).unwrap();
    let scenario = tokio::spawn(async move {
        let patch = expect_status_patch(&mut handle, &job_json).await;
        let running = patch["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Running")
            .cloned()
            .unwrap();
        assert_eq!(running["status"], "True");
        assert_eq!(running["reason"], "AllReplicasRunning");
        assert_eq!(patch["status"]["replicaStatuses"]["worker"]["ready"], 2);
        handle
    });
    reconcile(guard(job), ctx)
        .await
        .expect("reconcile succeeds");
    let mut handle = scenario.await.unwrap();
    assert_no_more_requests(&mut handle).await;
}

#[tokio::test]
async fn an_exit_code_137_deletes_the_pod_with_a_uid_precondition() {
    let mut job = job();
    let mut pods = running_pods(&job);
    job.status = Some(decide::decide(&job, &pods, k8s_openapi::jiff::Timestamp::now()).status);
    let worker1 = pods
        .iter_mut()
        .find(|p| {
            ReplicaId::from_pod(p)
                == Some(ReplicaId {
                    role: kubetrain_api::contract::Role::Worker,
                    index: 1,
                })
        })
        .unwrap();
    worker1.status = Some(serde_json::from_value(json!({
        "phase": "Failed",
        "containerStatuses": [{"name": "trainer", "ready": false, "restartCount": 0, "image": "", "imageID": "",
            "state": {"terminated": {"exitCode": 137}}}]
    })).unwrap());

    let (ctx, mut handle) = context();
    cached(&ctx, &pods);
    let job_json = serde_json::to_value(&job).unwrap();
    let scenario = tokio::spawn(async move {
        let patch = expect_status_patch(&mut handle, &job_json).await;
        assert_eq!(
            patch["status"]["recreatedPods"]["quickstart-worker-1"]["count"],
            1
        );
        let delete = expect(
            &mut handle,
            Expect {
                method: Method::DELETE,
                path_and_query: "/api/v1/namespaces/ns/pods/quickstart-worker-1?",
                respond: any_object("v1", "Pod", "quickstart-worker-1"),
                status: 200,
            },
        )
        .await;
        assert_eq!(delete["preconditions"]["uid"], "quickstart-worker-1-uid");
        let event = expect(
            &mut handle,
            Expect {
                method: Method::POST,
                path_and_query: "/apis/events.k8s.io/v1/namespaces/ns/events?",
                respond: any_object("events.k8s.io/v1", "Event", "e"),
                status: 201,
            },
        )
        .await;
        assert_eq!(event["reason"], "PodRestarting");
        assert_eq!(event["type"], "Warning");
        handle
    });
    reconcile(guard(job), ctx)
        .await
        .expect("reconcile succeeds");
    let mut handle = scenario.await.unwrap();
    assert_no_more_requests(&mut handle).await;
}

/// Fails if the reconcile made any call the scenario did not expect.
async fn assert_no_more_requests(handle: &mut Handle) {
    let next =
        tokio::time::timeout(std::time::Duration::from_millis(50), handle.next_request()).await;
    if let Ok(Some((request, _))) = next {
        panic!("unexpected request {} {}", request.method(), request.uri());
    }
}

#[test]
fn service_comparison_ignores_server_filled_fields() {
    let job = job();
    let desired = plan::service(&job, &PlanSettings::default());
    let mut existing: Service = desired.clone();
    existing.metadata.resource_version = Some("7".into());
    existing.spec.as_mut().unwrap().session_affinity = Some("None".into());
    assert!(super::writes::service_matches(&existing, &desired));
    existing.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 9999;
    assert!(!super::writes::service_matches(&existing, &desired));
}
