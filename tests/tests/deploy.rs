//! Checks of the deployment artefacts (issue 9): `deploy/` (kustomize), the Helm chart
//! `charts/kubetrain` (lint, render with the defaults and with every option), offline
//! schema validation with `kubernetes-validate --strict`, `kubectl apply --dry-run=server`
//! against the real API server, the CRD copies, RBAC hygiene, the documented values and
//! the Grafana dashboard's metric names.
//!
//! Tools: `helm` and `kubernetes-validate` (see `kubetrain_e2e::deploy_tools`). A missing
//! tool fails the tests; nothing is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use kubetrain_e2e::dashboard;
use kubetrain_e2e::deploy_tools::{RELEASE, helm, render, run, tools};
use kubetrain_e2e::envtest::{self, ApiServer, server};
use serde::Deserialize;
use serde_yaml::Value;

/// Kinds whose schema is a CRD (Prometheus Operator): `kubernetes-validate` has no schema
/// for them and the test API server does not serve them. Every other kind is checked.
const CRD_TYPED_KINDS: &[&str] = &["ServiceMonitor", "PodMonitor"];

/// Kubernetes versions to validate against offline: the oldest `kubernetes-validate`
/// ships schemas for (closest to the 1.20 test API server) and the version
/// `k8s-openapi` is built for in this workspace.
const VALIDATE_VERSIONS: &[&str] = &["1.25.0", "1.33.0"];

fn root() -> PathBuf {
    envtest::workspace_root()
}

fn read(path: &str) -> String {
    let full = root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {}: {e}", full.display()))
}

fn render_defaults() -> String {
    render("kubetrain-system", &[])
}

fn render_all_options() -> String {
    render("kubetrain-system", &["-f", "tests/deploy/all-options.yaml"])
}

/// `kubectl kustomize deploy/`.
fn kustomize() -> String {
    let kubectl = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
    let (ok, stdout, stderr) = run(Command::new(kubectl).args(["kustomize", "deploy"]));
    assert!(ok, "kubectl kustomize deploy/ failed:\n{stderr}");
    stdout
}

// --- YAML helpers -------------------------------------------------------------------------

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("bad YAML: {e}\n{text}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

fn find<'a>(docs: &'a [Value], k: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| kind(d) == k).collect()
}

fn one<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    let found = find(docs, k);
    assert_eq!(found.len(), 1, "expected one {k}, got {}", found.len());
    found[0]
}

/// The documents, minus the CRD-typed kinds, as one multi-document YAML string.
fn without_crd_typed(docs: &[Value]) -> (String, Vec<String>) {
    let mut skipped = Vec::new();
    let mut out = String::new();
    for doc in docs {
        if CRD_TYPED_KINDS.contains(&kind(doc)) {
            skipped.push(format!("{}/{}", kind(doc), name(doc)));
            continue;
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(doc).expect("YAML serialises"));
    }
    (out, skipped)
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

// --- the CRD copies -----------------------------------------------------------------------

#[test]
fn crd_copies_are_byte_equal_to_the_generated_crd() {
    let generated = read("crds/kubetrain.io_trainingjobs.yaml");
    for copy in [
        "deploy/crd.yaml",
        "charts/kubetrain/files/kubetrain.io_trainingjobs.yaml",
    ] {
        assert!(
            read(copy) == generated,
            "{copy} differs from crds/kubetrain.io_trainingjobs.yaml; refresh it:\n  \
             cp crds/kubetrain.io_trainingjobs.yaml {copy}"
        );
    }
}

#[test]
fn rendered_crd_equals_the_generated_crd_plus_the_keep_annotation() {
    let generated: Value =
        serde_yaml::from_str(&read("crds/kubetrain.io_trainingjobs.yaml")).expect("CRD YAML");

    let docs = documents(&render_defaults());
    let mut crd = one(&docs, "CustomResourceDefinition").clone();
    let annotations = crd["metadata"]
        .as_mapping_mut()
        .expect("metadata")
        .remove("annotations")
        .expect("crds.keep (default true) annotates the CRD");
    assert_eq!(
        serde_yaml::to_string(&annotations).unwrap().trim(),
        "helm.sh/resource-policy: keep",
        "the only annotation the chart adds"
    );
    assert!(
        crd == generated,
        "rendered CRD differs from crds/kubetrain.io_trainingjobs.yaml"
    );

    let unkept = documents(&render("kubetrain-system", &["--set", "crds.keep=false"]));
    assert!(
        *one(&unkept, "CustomResourceDefinition") == generated,
        "crds.keep=false renders the CRD unchanged"
    );
    // Byte for byte, too: the file's text with the two annotation lines inserted.
    let shown = render("kubetrain-system", &["--show-only", "templates/crd.yaml"]);
    let body = shown
        .strip_prefix("---\n# Source: kubetrain/templates/crd.yaml\n")
        .unwrap_or_else(|| panic!("unexpected helm output:\n{shown}"));
    let expected = read("crds/kubetrain.io_trainingjobs.yaml").replacen(
        "\nmetadata:\n",
        "\nmetadata:\n  annotations:\n    helm.sh/resource-policy: keep\n",
        1,
    );
    assert!(
        body.trim_end() == expected.trim_end(),
        "rendered CRD text is not the committed file plus the keep annotation"
    );

    let without = documents(&render(
        "kubetrain-system",
        &["--set", "crds.enabled=false"],
    ));
    assert!(find(&without, "CustomResourceDefinition").is_empty());
}

// --- helm ---------------------------------------------------------------------------------

#[test]
fn helm_lint_passes_with_defaults_and_every_option() {
    for extra in [&[][..], &["-f", "tests/deploy/all-options.yaml"][..]] {
        let mut args = vec!["lint", "--strict", "charts/kubetrain"];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = helm(&args);
        assert!(ok, "helm {args:?} failed:\n{stdout}{stderr}");
    }
}

#[test]
fn all_options_renders_every_optional_object() {
    let docs = documents(&render_all_options());
    let kinds: BTreeSet<&str> = docs.iter().map(kind).collect();
    for k in [
        "CustomResourceDefinition",
        "ServiceMonitor",
        "PodMonitor",
        "ConfigMap",
        "NetworkPolicy",
        "Deployment",
        "Service",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
    ] {
        assert!(kinds.contains(k), "all-options renders no {k}: {kinds:?}");
    }
    let deployment = one(&docs, "Deployment");
    let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for arg in [
        "operator",
        "--leader-elect",
        "--metrics-port=9090",
        "--trainer-metrics-port=9191",
        "--log-format=text",
        "--namespace=ml-team",
        "--gang-scheduler=volcano",
    ] {
        assert!(args.contains(&arg), "{arg} missing from {args:?}");
    }
    // One watched namespace: namespaced permissions by a RoleBinding there, not cluster-wide.
    let bindings = find(&docs, "RoleBinding");
    assert!(
        bindings.iter().any(|b| name(b) == "kubetrain-operator"
            && str_at(b, &["metadata", "namespace"]) == Some("ml-team")),
        "RoleBinding in the watched namespace"
    );
    let crbs: Vec<&str> = find(&docs, "ClusterRoleBinding")
        .into_iter()
        .map(name)
        .collect();
    assert_eq!(crbs, ["kubetrain-operator-podgroup-crd"]);
    let dashboard = one(&docs, "ConfigMap");
    assert_eq!(
        str_at(dashboard, &["metadata", "labels", "grafana_dashboard"]),
        Some("1")
    );
    let json = str_at(dashboard, &["data", "kubetrain.json"]).expect("dashboard JSON");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(json).expect("dashboard is JSON"),
        serde_json::from_str::<serde_json::Value>(&read(
            "charts/kubetrain/dashboards/kubetrain.json"
        ))
        .unwrap()
    );
}

#[test]
fn schema_rejects_unknown_keys_and_unsupported_values() {
    for (set, why) in [
        ("watchNamespaces={a,b}", "more than one watched namespace"),
        ("gangScheduler=kube-batch", "an unknown gang scheduler"),
        ("logFormat=xml", "an unknown log format"),
        ("trainerMetricsPort=70000", "a port above 65535"),
        ("typo=1", "an unknown top-level key"),
        ("image.digest=sha256:0", "an unknown nested key"),
        (
            "securityContext.runAsUsr=1",
            "an unknown securityContext key",
        ),
        (
            "serviceMonitor.enabled=yes",
            "a string where a boolean belongs",
        ),
    ] {
        let (ok, _, stderr) = helm(&["template", RELEASE, "charts/kubetrain", "--set", set]);
        assert!(!ok, "values.schema.json accepts {why} ({set}): {stderr}");
    }
    // The sensible alternatives are accepted.
    for set in [
        "watchNamespaces={team-a}",
        "gangScheduler=scheduler-plugins",
        "logFormat=text",
        "leaderElection.enabled=false,replicaCount=1",
        "trainerMetricsPort=0",
    ] {
        render("kubetrain-system", &["--set", set]);
    }
}

/// Every object in values.schema.json closes its keys: `additionalProperties: false` where
/// the keys are fixed; maps (labels, nodeSelector) constrain their values instead; only
/// Kubernetes pass-through objects (affinity terms, peers) are open, and say so.
#[test]
fn schema_closes_every_object() {
    fn walk(path: &str, node: &serde_json::Value, problems: &mut Vec<String>) {
        let Some(obj) = node.as_object() else { return };
        if obj.get("type") == Some(&"object".into()) {
            match obj.get("additionalProperties") {
                Some(serde_json::Value::Bool(false)) => {}
                Some(serde_json::Value::Object(_)) if !obj.contains_key("properties") => {}
                None if obj.contains_key("description") && !obj.contains_key("properties") => {}
                other => problems.push(format!("{path}: additionalProperties {other:?}")),
            }
        }
        for (key, child) in obj {
            match key.as_str() {
                "properties" => {
                    for (name, prop) in child.as_object().into_iter().flatten() {
                        walk(&format!("{path}.{name}"), prop, problems);
                    }
                }
                "items" | "additionalProperties" => walk(&format!("{path}[]"), child, problems),
                _ => {}
            }
        }
    }
    let schema: serde_json::Value =
        serde_json::from_str(&read("charts/kubetrain/values.schema.json")).expect("schema JSON");
    let mut problems = Vec::new();
    walk("", &schema, &mut problems);
    assert!(
        problems.is_empty(),
        "open objects in values.schema.json: {problems:#?}"
    );

    // And every value in values.yaml has a place in the schema.
    fn covered(path: &str, value: &Value, schema: &serde_json::Value, missing: &mut Vec<String>) {
        let Some(map) = value.as_mapping() else {
            return;
        };
        for (k, v) in map {
            let k = k.as_str().unwrap_or_default();
            match schema.get("properties").and_then(|p| p.get(k)) {
                Some(sub) => covered(&format!("{path}.{k}"), v, sub, missing),
                None if schema
                    .get("additionalProperties")
                    .is_some_and(|a| a.is_object()) => {}
                None => missing.push(format!("{path}.{k}")),
            }
        }
    }
    let values: Value =
        serde_yaml::from_str(&read("charts/kubetrain/values.yaml")).expect("values YAML");
    let mut missing = Vec::new();
    covered("", &values, &schema, &mut missing);
    assert!(
        missing.is_empty(),
        "values not in values.schema.json: {missing:?}"
    );
}

/// cert-manager's habit: a comment right above every key of values.yaml.
#[test]
fn every_value_is_documented() {
    let text = read("charts/kubetrain/values.yaml");
    let mut undocumented = Vec::new();
    let mut previous = "";
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let is_key = !trimmed.starts_with('#')
            && !trimmed.starts_with('-')
            && trimmed.split_once(':').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_alphanumeric() || "-_.".contains(c))
            });
        if is_key && !previous.trim_start().starts_with('#') {
            undocumented.push(format!("line {}: {line}", n + 1));
        }
        if !trimmed.is_empty() {
            previous = line;
        }
    }
    assert!(
        undocumented.is_empty(),
        "values without a comment above them: {undocumented:#?}"
    );
}

// --- deploy/ and the rendered chart agree on the operator -----------------------------------

fn operator_container(docs: &[Value]) -> &Value {
    &one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

#[test]
fn deploy_manifests_are_complete_and_restricted() {
    let docs = documents(&kustomize());
    let namespace = one(&docs, "Namespace");
    assert_eq!(name(namespace), "kubetrain-system");

    let accounts: BTreeMap<&str, &Value> = find(&docs, "ServiceAccount")
        .into_iter()
        .map(|a| (name(a), a))
        .collect();
    assert!(accounts.contains_key("kubetrain-operator"));
    assert_eq!(
        accounts["kubetrain-trainer"]["automountServiceAccountToken"],
        Value::Bool(false)
    );
    // Nothing is bound to the trainer account.
    for binding in find(&docs, "ClusterRoleBinding")
        .into_iter()
        .chain(find(&docs, "RoleBinding"))
    {
        for subject in binding["subjects"].as_sequence().into_iter().flatten() {
            assert_ne!(subject["name"].as_str(), Some("kubetrain-trainer"));
        }
    }

    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], Value::from(2));
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["serviceAccountName"].as_str(),
        Some("kubetrain-operator")
    );
    let c = operator_container(&docs);
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        args,
        [
            "operator",
            "--leader-elect",
            "--metrics-port=8080",
            "--trainer-metrics-port=9090",
            "--log-format=json"
        ]
    );
    let env: BTreeMap<&str, &Value> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    assert_eq!(
        str_at(env["POD_NAME"], &["valueFrom", "fieldRef", "fieldPath"]),
        Some("metadata.name")
    );
    assert_eq!(
        str_at(
            env["POD_NAMESPACE"],
            &["valueFrom", "fieldRef", "fieldPath"]
        ),
        Some("metadata.namespace")
    );
    assert!(env.contains_key("KUBETRAIN_TRAINER_IMAGE"));
    assert_eq!(c["ports"][0]["name"].as_str(), Some("metrics"));
    assert_eq!(c["ports"][0]["containerPort"], Value::from(8080));
    assert_eq!(
        str_at(c, &["livenessProbe", "httpGet", "path"]),
        Some("/healthz")
    );
    assert_eq!(
        str_at(c, &["readinessProbe", "httpGet", "path"]),
        Some("/readyz")
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(str_at(c, &[probe, "httpGet", "port"]), Some("metrics"));
    }
    for what in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                !c["resources"][what][res].is_null(),
                "resources.{what}.{res}"
            );
        }
    }
    assert_restricted(pod, c);

    let service = one(&docs, "Service");
    assert_eq!(
        service["spec"]["ports"][0]["name"].as_str(),
        Some("metrics")
    );
}

fn assert_restricted(pod: &Value, c: &Value) {
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], Value::Bool(true), "runAsNonRoot");
    assert_eq!(
        sc["readOnlyRootFilesystem"],
        Value::Bool(true),
        "readOnlyRootFilesystem"
    );
    assert_eq!(
        sc["allowPrivilegeEscalation"],
        Value::Bool(false),
        "allowPrivilegeEscalation"
    );
    assert_eq!(
        sc["capabilities"]["drop"][0].as_str(),
        Some("ALL"),
        "drop ALL"
    );
    assert_eq!(
        str_at(sc, &["seccompProfile", "type"]),
        Some("RuntimeDefault")
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], Value::Bool(true));
    assert_eq!(
        str_at(&pod["securityContext"], &["seccompProfile", "type"]),
        Some("RuntimeDefault")
    );
}

/// The chart with its defaults runs the operator exactly as deploy/ does.
#[test]
fn chart_defaults_match_deploy() {
    let plain = documents(&kustomize());
    let chart = documents(&render_defaults());
    let (p, c) = (operator_container(&plain), operator_container(&chart));
    for field in [
        "args",
        "env",
        "ports",
        "livenessProbe",
        "readinessProbe",
        "resources",
        "securityContext",
    ] {
        assert!(
            p[field] == c[field],
            "container {field} differs between deploy/ and the chart"
        );
    }
    let pod = |docs: &[Value]| one(docs, "Deployment")["spec"]["template"]["spec"].clone();
    assert!(pod(&plain)["securityContext"] == pod(&chart)["securityContext"]);
    assert_eq!(
        one(&plain, "Deployment")["spec"]["replicas"],
        one(&chart, "Deployment")["spec"]["replicas"]
    );
    assert_eq!(
        str_at(&pod(&chart), &["serviceAccountName"]),
        Some("kubetrain-operator")
    );
    assert_restricted(&pod(&chart), c);

    // Same rules, apart from the PodGroup ones the chart grants only with gangScheduler.
    let rules = |docs: &[Value], name_: &str| -> Vec<Value> {
        find(docs, "ClusterRole")
            .into_iter()
            .chain(find(docs, "Role"))
            .filter(|r| name(r) == name_)
            .flat_map(|r| r["rules"].as_sequence().cloned().unwrap_or_default())
            .filter(|r| {
                !r["apiGroups"].as_sequence().unwrap().iter().any(|g| {
                    matches!(
                        g.as_str(),
                        Some(
                            "scheduling.volcano.sh"
                                | "scheduling.x-k8s.io"
                                | "apiextensions.k8s.io"
                        )
                    )
                })
            })
            .collect()
    };
    for role in ["kubetrain-operator", "kubetrain-operator-leader-election"] {
        assert_eq!(rules(&plain, role), rules(&chart, role), "{role} rules");
        assert!(!rules(&plain, role).is_empty(), "{role} has rules");
    }
}

// --- RBAC hygiene -------------------------------------------------------------------------

/// Every rule carries a comment saying why; Secrets only to create and delete (never to
/// read), no ConfigMaps, no wildcards, no escalation verbs.
#[test]
fn rbac_is_least_privilege_and_explained() {
    for file in ["deploy/rbac.yaml", "charts/kubetrain/templates/rbac.yaml"] {
        let text = read(file);
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("- apiGroups:") {
                let above = lines[..n]
                    .iter()
                    .rev()
                    .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with("{{"))
                    .unwrap_or(&"");
                assert!(
                    above.trim_start().starts_with('#'),
                    "{file}:{}: RBAC rule without a comment above it",
                    n + 1
                );
            }
        }
    }
    for (source, text) in [
        ("deploy/", kustomize()),
        ("chart defaults", render_defaults()),
        ("chart all-options", render_all_options()),
        (
            "chart scheduler-plugins",
            render(
                "kubetrain-system",
                &["--set", "gangScheduler=scheduler-plugins"],
            ),
        ),
    ] {
        let docs = documents(&text);
        for role in find(&docs, "ClusterRole")
            .into_iter()
            .chain(find(&docs, "Role"))
        {
            for rule in role["rules"].as_sequence().expect("rules") {
                let words = |k: &str| -> Vec<String> {
                    rule[k]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                };
                let (resources, verbs) = (words("resources"), words("verbs"));
                let what = format!("{source}: {} rule {rule:?}", name(role));
                assert!(!resources.iter().any(|r| r == "configmaps"), "{what}");
                // Each job's token: created and deleted, never read (#21).
                if resources.iter().any(|r| r == "secrets") {
                    assert_eq!(resources, ["secrets"], "{what}");
                    assert_eq!(verbs, ["create", "delete"], "{what}");
                }
                assert!(
                    !resources.iter().chain(&verbs).any(|w| w.contains('*')),
                    "{what}"
                );
                assert!(
                    !verbs
                        .iter()
                        .any(|v| ["escalate", "bind", "impersonate"].contains(&v.as_str())),
                    "{what}"
                );
                if resources.iter().any(|r| r == "customresourcedefinitions") {
                    assert_eq!(verbs, ["get"], "{what}");
                    assert!(
                        !words("resourceNames").is_empty(),
                        "{what}: CRD get by name only"
                    );
                }
            }
        }
    }
}

// --- offline schema validation ------------------------------------------------------------

#[test]
fn manifests_validate_offline_with_kubernetes_validate_strict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for (label, text) in [
        ("deploy", kustomize()),
        ("chart-defaults", render_defaults()),
        ("chart-all-options", render_all_options()),
    ] {
        let (yaml, skip) = without_crd_typed(&documents(&text));
        skipped.extend(skip.into_iter().map(|s| format!("{label}: {s}")));
        let path = dir.path().join(format!("{label}.yaml"));
        std::fs::write(&path, yaml).expect("write manifests");
        files.push(path);
    }
    // Only the kinds listed in CRD_TYPED_KINDS are skipped, and only from all-options.
    assert_eq!(
        skipped,
        [
            "chart-all-options: PodMonitor/kubetrain-trainer",
            "chart-all-options: ServiceMonitor/kubetrain-operator"
        ]
    );
    for version in VALIDATE_VERSIONS {
        let (ok, stdout, stderr) = run(Command::new(&tools().validate)
            .args(["--strict", "--kubernetes-version", version])
            .args(&files));
        assert!(
            // A kind without a schema is only a WARN with exit 0: fail on it, so that
            // nothing beyond CRD_TYPED_KINDS goes unchecked.
            ok && !format!("{stdout}{stderr}").contains("ERROR")
                && !format!("{stdout}{stderr}").contains("Couldn't find schema"),
            "kubernetes-validate --strict -k {version} failed:\n{stdout}{stderr}"
        );
    }
}

// --- server-side dry run on the real API server ---------------------------------------------

async fn dry_run_apply(server: &ApiServer, label: &str, docs: &[Value]) {
    let (yaml, _) = without_crd_typed(docs);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(format!("{label}.yaml"));
    std::fs::write(&path, yaml).expect("write manifests");
    let out = server
        .kubectl()
        .args(["apply", "--dry-run=server", "-f"])
        .arg(&path)
        .output()
        .await
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl apply --dry-run=server ({label}) failed:\n{}{}\napiserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.apiserver_log_tail()
    );
}

#[tokio::test]
async fn manifests_pass_server_side_dry_run() {
    let server = server().await;
    // deploy/ hardcodes kubetrain-system. A dry run creates nothing, so the namespaced
    // objects need the namespace to exist for real (this test binary's server is its own).
    let client = server.client().await.unwrap_or_else(|e| panic!("{e}"));
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some("kubetrain-system".into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match Api::<Namespace>::all(client)
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating namespace kubetrain-system: {e}"),
    }
    dry_run_apply(server, "deploy", &documents(&kustomize())).await;

    let release = server
        .namespace("deploy-release")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let watched = server
        .namespace("deploy-watched")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    dry_run_apply(
        server,
        "chart-defaults",
        &documents(&render(&release.name, &[])),
    )
    .await;
    let watch = format!("watchNamespaces={{{}}}", watched.name);
    let all = render(
        &release.name,
        &["-f", "tests/deploy/all-options.yaml", "--set", &watch],
    );
    dry_run_apply(server, "chart-all-options", &documents(&all)).await;
}

// --- the Grafana dashboard -----------------------------------------------------------------

/// Every series name the operator and the trainer export, with the label names seen on
/// their samples. Built from the real registries' encoded output, with one observation
/// of everything so that labelled families show their labels.
fn exported_metrics() -> BTreeMap<String, BTreeSet<String>> {
    use kubetrain_api::{TrainingJob, TrainingJobStatus};
    use prometheus_client::registry::Registry;

    let operator = kubetrain_operator::metrics::Metrics::new();
    operator.observe_reconcile(std::time::Duration::from_millis(3), Some("apply_pod"));
    let mut job: TrainingJob =
        serde_yaml::from_str(&read("examples/quickstart.yaml")).expect("quickstart");
    job.metadata.namespace = Some("default".into());
    job.metadata.creation_timestamp =
        serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).ok();
    let status: TrainingJobStatus = serde_json::from_value(serde_json::json!({
        "conditions": [{"type": "Running", "status": "True", "reason": "AllReplicasRunning"}],
        "progress": {"step": 10, "epoch": 1, "loss": 0.5, "accuracy": 0.9, "samplesPerSecond": 100.0},
    }))
    .expect("status");
    operator.observe_job(&job, &status);

    let mut registry = Registry::default();
    let ps = kubetrain_trainer::metrics::PsMetrics::default();
    ps.register(&mut registry);
    let _chief = kubetrain_trainer::progress::ProgressState::new(&mut registry);
    let mut trainer = String::new();
    prometheus_client::encoding::text::encode(&mut trainer, &registry).expect("encode");

    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for text in [operator.encode(), trainer] {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (family, kind) = rest.split_once(' ').expect("TYPE line");
                let names: Vec<String> = match kind {
                    "counter" => vec![format!("{family}_total")],
                    "histogram" => ["_bucket", "_sum", "_count"]
                        .iter()
                        .map(|s| format!("{family}{s}"))
                        .collect(),
                    _ => vec![family.to_string()],
                };
                for n in names {
                    out.entry(n).or_default();
                }
            } else if !line.starts_with('#') && !line.is_empty() {
                let (series, labels) = match line.split_once('{') {
                    Some((s, rest)) => (s, rest.split_once('}').map_or("", |(l, _)| l)),
                    None => (line.split_whitespace().next().unwrap_or(""), ""),
                };
                let set = out.entry(series.to_string()).or_default();
                for pair in labels.split(',').filter(|p| !p.is_empty()) {
                    set.insert(pair.split_once('=').map_or(pair, |(k, _)| k).to_string());
                }
            }
        }
    }
    out
}

/// Labels Prometheus adds at scrape time: every target's, plus what the chart's
/// PodMonitor relabels from the trainer pods' labels.
const TARGET_LABELS: &[&str] = &["instance", "pod", "container", "endpoint", "service"];
const TRAINER_TARGET_LABELS: &[&str] = &["namespace", "job_name", "role"];

#[test]
fn dashboard_queries_only_exported_metrics_and_labels() {
    let exported = exported_metrics();
    let metric = regex::Regex::new(r"\b(kubetrain_[a-z0-9_]+)(\{([^}]*)\})?").unwrap();
    let label_in_selector = regex::Regex::new(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)").unwrap();
    let grouping = regex::Regex::new(r"\b(?:by|without)\s*\(([^)]*)\)").unwrap();
    let label_values = regex::Regex::new(r",\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$").unwrap();

    let queries = dashboard::queries();
    assert!(queries.len() >= 10, "dashboard has queries: {queries:?}");
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    for q in &queries {
        let mut labels_here: BTreeSet<String> =
            TARGET_LABELS.iter().map(|s| s.to_string()).collect();
        let mut wanted = BTreeSet::new();
        for m in metric.captures_iter(q) {
            let name = &m[1];
            used.insert(name.to_string());
            let Some(labels) = exported.get(name) else {
                problems.push(format!("{name} is not exported (query: {q})"));
                continue;
            };
            let mut known = labels.clone();
            known.extend(TARGET_LABELS.iter().map(|s| s.to_string()));
            if name.starts_with("kubetrain_trainer_") {
                known.extend(TRAINER_TARGET_LABELS.iter().map(|s| s.to_string()));
            }
            if let Some(sel) = m.get(3) {
                for l in label_in_selector.captures_iter(sel.as_str()) {
                    if !known.contains(&l[1]) {
                        problems.push(format!("{name} has no label {} (query: {q})", &l[1]));
                    }
                }
            }
            labels_here.extend(known);
        }
        for g in grouping.captures_iter(q) {
            wanted.extend(
                g[1].split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty()),
            );
        }
        if q.starts_with("label_values(")
            && let Some(l) = label_values.captures(q)
        {
            wanted.insert(l[1].to_string());
        }
        for l in wanted {
            if !labels_here.contains(&l) {
                problems.push(format!("no metric in the query has label {l} (query: {q})"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard problems:\n{}",
        problems.join("\n")
    );

    // The panels the issue asks for are there.
    for name in [
        "kubetrain_jobs",
        "kubetrain_job_time_to_running_seconds_bucket",
        "kubetrain_reconciles_total",
        "kubetrain_reconcile_errors_total",
        "kubetrain_job_loss",
        "kubetrain_job_accuracy",
        "kubetrain_job_samples_per_second",
        "kubetrain_trainer_ps_push_bytes_total",
        "kubetrain_trainer_ps_pull_bytes_total",
        "kubetrain_trainer_ps_request_duration_seconds_bucket",
        "kubetrain_trainer_ps_update_staleness_versions_bucket",
    ] {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
}

// --- Dockerfiles ---------------------------------------------------------------------------

/// No Docker engine exists here, so the Dockerfiles are only checked for their shape:
/// multi-stage, non-root final image, the right binary, the workspace .dockerignore.
#[test]
fn dockerfiles_are_multi_stage_and_non_root() {
    for (file, binary) in [
        ("docker/operator.Dockerfile", "kubetrain"),
        ("docker/trainer.Dockerfile", "kubetrain-trainer"),
    ] {
        let text = read(file);
        let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        assert!(froms.len() >= 2, "{file}: multi-stage build");
        assert!(
            froms[0].contains("rust:1-bookworm"),
            "{file}: builder {}",
            froms[0]
        );
        assert!(
            froms
                .last()
                .unwrap()
                .contains("distroless/cc-debian12:nonroot"),
            "{file}: runtime image {}",
            froms.last().unwrap()
        );
        assert!(text.contains("USER 65532:65532"), "{file}: non-root user");
        assert!(
            text.contains(&format!("--bin {binary}")),
            "{file}: builds {binary}"
        );
        assert!(
            text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]")),
            "{file}: runs {binary}"
        );
    }
    let ignore = read(".dockerignore");
    assert!(
        ignore
            .lines()
            .any(|l| l.trim() == "target" || l.trim() == "/target")
    );
}

/// The operator container's args, as `kubetrain` would receive them.
fn operator_args(docs: &[Value]) -> Vec<String> {
    let container = operator_container(docs);
    let mut args = vec!["kubetrain".to_string()];
    for part in ["command", "args"] {
        if let Some(list) = container.get(part).and_then(Value::as_sequence) {
            args.extend(list.iter().filter_map(Value::as_str).map(str::to_string));
        }
    }
    if args.get(1).is_some_and(|a| a.ends_with("kubetrain")) {
        args.remove(1);
    }
    args
}

#[test]
fn shipped_operator_args_are_accepted_by_the_real_cli() {
    use clap::Parser;
    use kubetrain_operator::cli::{Cli, Command};
    for (what, docs) in [
        ("deploy/", documents(&kustomize())),
        ("chart defaults", documents(&render_defaults())),
        ("chart with every option", documents(&render_all_options())),
    ] {
        let args = operator_args(&docs);
        let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| {
            panic!(
                "{what}: `{}` is rejected by kubetrain:\n{e}",
                args.join(" ")
            )
        });
        let Command::Operator(op) = cli.command else {
            panic!("{what}: the container does not run `kubetrain operator`: {args:?}");
        };
        // The every-option values move the metrics port and turn leader election off.
        if what != "chart with every option" {
            assert_eq!(
                op.metrics_port, 8080,
                "{what}: probes and Service use port 8080"
            );
            assert!(op.leader_elect, "{what}: 2 replicas need --leader-elect");
        }
    }
}
