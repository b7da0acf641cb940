//! Admission on a real API server (DESIGN.md §6.3): the CRD applies and becomes
//! Established, every example is accepted, bad manifests are rejected at admission with
//! the offending field named, the server applies the schema's defaults, and `kubectl get
//! tj` shows the printer columns.
//!
//! They need `etcd` and a `kube-apiserver` from `tests/envtest/install.sh`, and fail
//! (never skip) without them.

use std::process::Output;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kubetrain_api::TrainingJob;
use kubetrain_e2e::envtest::{self, TestNamespace, namespace_with_crd, server};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// Untyped TrainingJobs: what reaches the server is exactly what the test wrote, with no
/// serde defaults filled in on the client side.
fn raw_jobs(ns: &TestNamespace) -> Api<DynamicObject> {
    Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &ApiResource::erase::<TrainingJob>(&()),
    )
}

/// Runs kubectl with `stdin` (if any) and returns its output.
async fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = server().await.kubectl();
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("run kubectl");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.expect("write stdin");
    }
    drop(input);
    child.wait_with_output().await.expect("kubectl output")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A small valid job, as plain JSON.
fn valid_job(name: &str) -> Value {
    json!({
        "apiVersion": "kubetrain.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "mode": "DataParallel",
            "replicaSpecs": {
                "ps": {"replicas": 1, "restartPolicy": "OnFailure"},
                "worker": {"replicas": 2, "restartPolicy": "ExitCode"}
            },
            "training": {
                "model": {"kind": "mlp", "hidden": [16]},
                "dataset": {"builtin": "digits"},
                "optimizer": {"kind": "sgd", "learningRate": 0.05},
                "batchSize": 32,
                "epochs": 2
            }
        }
    })
}

#[tokio::test]
async fn kubectl_applies_the_crd_and_it_is_established() {
    // The harness installs the CRD by server-side apply; a user runs kubectl apply.
    let ns = namespace_with_crd("crd-apply").await;
    let crd = envtest::crd_path();
    let crd = crd.to_str().expect("utf-8 path");
    let out = kubectl(&["apply", "-f", crd], None).await;
    assert!(
        out.status.success(),
        "kubectl apply of the CRD: {}",
        text(&out)
    );
    let out = kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/trainingjobs.kubetrain.io",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "CRD not Established: {}", text(&out));
    // And the applied CRD still serves the kind.
    let out = kubectl(&["get", "trainingjobs.kubetrain.io", "-n", &ns.name], None).await;
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test]
async fn every_example_is_accepted_by_the_server() {
    let ns = namespace_with_crd("examples-dry-run").await;
    let dir = envtest::workspace_root().join("examples");
    let yaml_in = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .expect("examples/")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
            .collect()
    };
    let mut examples = yaml_in(&dir);
    examples.extend(yaml_in(&dir.join("tensorflow")));
    examples.sort();
    assert!(examples.len() >= 7, "examples: {examples:?}");
    // The TensorFlow examples' kustomization (ConfigMap and jobs) too, as a user applies it.
    examples.push(dir.join("tensorflow"));
    for example in &examples {
        let path = example.to_str().expect("utf-8 path");
        let how = if example.is_dir() { "-k" } else { "-f" };
        let out = kubectl(
            &["apply", "--dry-run=server", "-n", &ns.name, how, path],
            None,
        )
        .await;
        assert!(
            out.status.success(),
            "{} rejected: {}",
            example.display(),
            text(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("trainingjob.kubetrain.io/") && stdout.contains("(server dry run)"),
            "{}: {}",
            example.display(),
            text(&out)
        );
    }
    // A dry run stores nothing.
    let left = raw_jobs(&ns).list(&Default::default()).await.expect("list");
    assert!(left.items.is_empty(), "{:?}", left.items);
}

/// A bad manifest must be rejected at admission, both through the API (422 Invalid)
/// and through kubectl (client-side validation off, so the server is the one that says
/// no), with `field` named in the message.
async fn assert_rejected(ns: &TestNamespace, case: &str, job: Value, field: &str) {
    let object: DynamicObject = serde_json::from_value(job.clone()).expect("job JSON");
    match raw_jobs(ns).create(&PostParams::default(), &object).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{case}: {status:?}");
            assert!(
                status.message.contains(field),
                "{case}: the API error does not name {field}: {}",
                status.message
            );
        }
        Err(other) => panic!("{case}: unexpected error {other:?}"),
        Ok(created) => panic!("{case}: accepted by the server: {created:?}"),
    }

    let manifest = serde_json::to_string(&job).expect("JSON");
    let out = kubectl(
        &["create", "--validate=false", "-n", &ns.name, "-f", "-"],
        Some(&manifest),
    )
    .await;
    assert!(
        !out.status.success(),
        "{case}: kubectl create succeeded: {}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is invalid") && stderr.contains(field),
        "{case}: kubectl's error does not name {field}: {}",
        text(&out)
    );
}

#[tokio::test]
async fn bad_manifests_are_rejected_with_the_field_named() {
    let ns = namespace_with_crd("admission").await;
    let cases: [(&str, &str, &str, Value); 6] = [
        (
            "negative ps replicas",
            "/spec/replicaSpecs/ps/replicas",
            "spec.replicaSpecs.ps.replicas",
            json!(-1),
        ),
        (
            "unknown restartPolicy",
            "/spec/replicaSpecs/worker/restartPolicy",
            "spec.replicaSpecs.worker.restartPolicy",
            json!("Sometimes"),
        ),
        (
            "zero batchSize",
            "/spec/training/batchSize",
            "spec.training.batchSize",
            json!(0),
        ),
        (
            "zero learningRate",
            "/spec/training/optimizer/learningRate",
            "spec.training.optimizer.learningRate",
            json!(0),
        ),
        (
            "zero workers",
            "/spec/replicaSpecs/worker/replicas",
            "spec.replicaSpecs.worker.replicas",
            json!(0),
        ),
        ("unknown mode", "/spec/mode", "spec.mode", json!("Hybrid")),
    ];
    for (i, (case, pointer, field, value)) in cases.into_iter().enumerate() {
        let mut job = valid_job(&format!("bad-{i}"));
        *job.pointer_mut(pointer)
            .unwrap_or_else(|| panic!("{case}: {pointer} not in the base job")) = value;
        assert_rejected(&ns, case, job, field).await;
    }
    // A second chief or evaluator: TensorFlow knows one of each per cluster.
    for role in ["chief", "evaluator"] {
        let mut job = valid_job(&format!("two-{role}s"));
        job["spec"]["training"] = Value::Null;
        job["spec"]["replicaSpecs"][role] = json!({"replicas": 2});
        let field = format!("spec.replicaSpecs.{role}.replicas");
        assert_rejected(&ns, &format!("two {role}s"), job, &field).await;
    }
    // The base job itself is fine: the rejections above are about the one field.
    let object: DynamicObject = serde_json::from_value(valid_job("good")).expect("job JSON");
    raw_jobs(&ns)
        .create(&PostParams::default(), &object)
        .await
        .expect("the unmodified job is accepted");
    let left: Vec<String> = raw_jobs(&ns)
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .filter_map(|j| j.metadata.name)
        .collect();
    assert_eq!(left, ["good"], "no bad job was stored");
}

#[tokio::test]
async fn the_server_applies_the_schema_defaults() {
    let ns = namespace_with_crd("defaults").await;
    let minimal = json!({
        "apiVersion": "kubetrain.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "minimal"},
        "spec": {
            "replicaSpecs": {"ps": {}, "worker": {}},
            "training": {
                "model": {"kind": "mlp"},
                "dataset": {"builtin": "digits"},
                "optimizer": {"kind": "sgd"}
            }
        }
    });
    let object: DynamicObject = serde_json::from_value(minimal).expect("job JSON");
    let api = raw_jobs(&ns);
    api.create(&PostParams::default(), &object)
        .await
        .expect("create the minimal job");
    let stored = api.get("minimal").await.expect("get");
    let spec = &stored.data["spec"];
    let expect = [
        ("/runPolicy/backoffLimit", json!(3)),
        ("/runPolicy/cleanPodPolicy", json!("Running")),
        ("/runPolicy/suspend", json!(false)),
        ("/successPolicy", json!("ChiefWorker")),
        ("/mode", json!("DataParallel")),
        ("/replicaSpecs/ps/replicas", json!(1)),
        ("/replicaSpecs/ps/restartPolicy", json!("OnFailure")),
        ("/replicaSpecs/worker/replicas", json!(1)),
        ("/replicaSpecs/worker/restartPolicy", json!("OnFailure")),
        ("/training/batchSize", json!(64)),
        ("/training/epochs", json!(10)),
        ("/training/seed", json!(42)),
        ("/training/optimizer/learningRate", json!(0.1)),
        ("/training/consistency/kind", json!("Sync")),
    ];
    for (pointer, value) in expect {
        assert_eq!(
            spec.pointer(pointer),
            Some(&value),
            "spec{pointer} as stored: {spec:#}"
        );
    }
    // The typed view agrees, and it validates.
    let typed: TrainingJob = ns.api().get("minimal").await.expect("typed get");
    typed.spec.validate().expect("the defaulted job is valid");
}

#[tokio::test]
async fn kubectl_get_tj_prints_the_columns() {
    let ns = namespace_with_crd("columns").await;
    let object: DynamicObject = serde_json::from_value(valid_job("cols")).expect("job JSON");
    let api = raw_jobs(&ns);
    api.create(&PostParams::default(), &object)
        .await
        .expect("create");
    api.patch_status(
        "cols",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "conditions": [
                {"type": "Created", "status": "False", "reason": "Superseded",
                 "message": "the job is now Running"},
                {"type": "Running", "status": "True", "reason": "AllReplicasRunning",
                 "message": "all 3 pods are running"}
            ],
            "workersReady": "2/2",
            "progress": {"step": 120, "epoch": 1, "loss": 0.25, "accuracy": 0.875}
        }})),
    )
    .await
    .expect("patch status");

    let out = kubectl(&["get", "tj", "-n", &ns.name], None).await;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "STATE", "READY", "STEP", "LOSS", "ACCURACY", "AGE"],
        "{}",
        text(&out)
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        row.get(..6),
        Some(&["cols", "Running", "2/2", "120", "0.25", "0.875"][..]),
        "{}",
        text(&out)
    );
    assert_eq!(row.len(), 7, "an Age column: {}", text(&out));

    // `-o wide` adds every role's ready pods.
    api.patch_status(
        "cols",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"replicasReady": "chief 1/1, ps 1/1, worker 2/2"}})),
    )
    .await
    .expect("patch status");
    let out = kubectl(&["get", "tj", "-n", &ns.name, "-o", "wide"], None).await;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .next()
            .unwrap_or_default()
            .contains("REPLICAS"),
        "{stdout}"
    );
    assert!(stdout.contains("chief 1/1, ps 1/1, worker 2/2"), "{stdout}");
}

#[tokio::test]
async fn kubectl_explain_documents_the_chief_and_the_evaluator() {
    let _ns = namespace_with_crd("explain").await;
    for (role, words) in [
        ("chief", "alone decides success"),
        ("evaluator", "not part of the training cluster"),
    ] {
        let field = format!("trainingjob.spec.replicaSpecs.{role}");
        // The server publishes a CRD's schema to its OpenAPI document a moment after the
        // CRD is established.
        let explained =
            kubetrain_e2e::operator::wait_until(&format!("kubectl explain {field}"), || {
                let field = field.clone();
                async move {
                    let out = kubectl(&["explain", &field], None).await;
                    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                    if out.status.success() && stdout.contains("replicas") {
                        Ok(stdout)
                    } else {
                        Err(text(&out))
                    }
                }
            })
            .await;
        let flat = explained.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains(words), "{explained}");
        assert!(flat.contains("0 or 1"), "{explained}");
    }
}
