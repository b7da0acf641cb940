//! The generated CRD, the examples and the spec rules, checked without a cluster.

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use kubetrain_api::{TrainingJob, TrainingJobSpec};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_crd_matches_the_generated_one() {
    let committed =
        std::fs::read_to_string(repo_root().join("crds/kubetrain.io_trainingjobs.yaml"))
            .expect("crds/kubetrain.io_trainingjobs.yaml exists");
    assert!(
        committed == kubetrain_api::crd_yaml(),
        "crds/kubetrain.io_trainingjobs.yaml is stale: run `cargo run -p kubetrain-api --bin crdgen` and commit the result"
    );
}

#[test]
fn crd_names_and_subresources() {
    let crd = TrainingJob::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("trainingjobs.kubetrain.io")
    );
    let names = &crd.spec.names;
    assert_eq!(names.plural, "trainingjobs");
    assert_eq!(names.short_names.as_deref(), Some(&["tj".to_string()][..]));
    assert_eq!(
        names.categories.as_deref(),
        Some(&["kubetrain".to_string()][..])
    );
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<&str> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "State", "Ready", "Replicas", "Step", "Loss", "Accuracy", "Age"
        ]
    );
    let replicas = &version.additional_printer_columns.as_ref().unwrap()[2];
    assert_eq!(
        replicas.priority,
        Some(1),
        "Replicas shows with -o wide only"
    );
}

/// Walks the schema and returns the node at a dotted path of property names.
fn schema_at<'a>(root: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    path.split('.').fold(root, |node, key| {
        node.get("properties")
            .and_then(|p| p.get(key))
            .unwrap_or_else(|| panic!("no schema property {key} on the way to {path}"))
    })
}

fn schema() -> serde_json::Value {
    let crd = TrainingJob::crd();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn schema_carries_the_minimums_enums_and_defaults() {
    let s = schema();
    let min = |path: &str| schema_at(&s, path)["minimum"].as_f64();
    assert_eq!(min("spec.replicaSpecs.ps.replicas"), Some(0.0));
    assert_eq!(min("spec.replicaSpecs.worker.replicas"), Some(1.0));
    assert_eq!(min("spec.training.batchSize"), Some(1.0));
    assert_eq!(min("spec.training.epochs"), Some(1.0));
    assert_eq!(min("spec.training.consistency.staleness"), Some(0.0));
    assert_eq!(
        min("spec.training.consistency.workerGracePeriodSeconds"),
        Some(1.0)
    );
    assert_eq!(
        schema_at(&s, "spec.training.consistency.workerGracePeriodSeconds")["maximum"],
        86400.0
    );
    assert_eq!(min("spec.runPolicy.activeDeadlineSeconds"), Some(1.0));
    assert_eq!(min("spec.runPolicy.startupDeadlineSeconds"), Some(1.0));
    let lr = schema_at(&s, "spec.training.optimizer.learningRate");
    assert_eq!(lr["minimum"], 0.0);
    assert_eq!(lr["exclusiveMinimum"], true);

    let enum_of = |path: &str| -> Vec<String> {
        serde_json::from_value(schema_at(&s, path)["enum"].clone()).unwrap()
    };
    assert_eq!(enum_of("spec.mode"), ["DataParallel", "ModelParallel"]);
    assert_eq!(
        enum_of("spec.replicaSpecs.worker.restartPolicy"),
        ["Never", "OnFailure", "Always", "ExitCode"]
    );
    assert_eq!(
        enum_of("spec.training.consistency.kind"),
        ["Sync", "Async", "BoundedStaleness"]
    );
    assert_eq!(enum_of("spec.training.model.kind"), ["softmax", "mlp"]);
    assert_eq!(enum_of("spec.training.optimizer.kind"), ["sgd", "adam"]);
    assert_eq!(
        enum_of("spec.training.dataset.builtin"),
        ["digits", "fashion-mnist"]
    );
    assert_eq!(
        enum_of("spec.runPolicy.cleanPodPolicy"),
        ["Running", "All", "None"]
    );
    assert_eq!(enum_of("spec.successPolicy"), ["ChiefWorker", "AllWorkers"]);
    assert_eq!(
        enum_of("spec.training.pipeline.schedule"),
        ["1F1B", "GPipe"]
    );

    assert_eq!(schema_at(&s, "spec.runPolicy.backoffLimit")["default"], 3);
    assert_eq!(
        schema_at(&s, "spec.runPolicy.cleanPodPolicy")["default"],
        "Running"
    );
    assert_eq!(
        schema_at(&s, "spec.successPolicy")["default"],
        "ChiefWorker"
    );

    let conditions = schema_at(&s, "status.conditions");
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
}

/// Every property in the schema has a description, so `kubectl explain` teaches each field.
#[test]
fn every_schema_property_is_documented() {
    fn walk(node: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
        if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
            for (key, child) in props {
                let child_path = format!("{path}.{key}");
                let described = child
                    .get("description")
                    .and_then(|d| d.as_str())
                    .is_some_and(|d| !d.trim().is_empty());
                if !described {
                    missing.push(child_path.clone());
                }
                walk(child, &child_path, missing);
            }
        }
        if let Some(items) = node.get("items") {
            walk(items, path, missing);
        }
    }
    let s = schema();
    let mut missing = Vec::new();
    walk(&s["properties"]["spec"], "spec", &mut missing);
    walk(&s["properties"]["status"], "status", &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

/// Every TrainingJob under examples/ (one level of folders deep), by its path there.
fn examples() -> Vec<(String, TrainingJob)> {
    let root = repo_root().join("examples");
    let mut out = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && dir == root {
                dirs.push(path);
                continue;
            }
            let is_job = path.extension().is_some_and(|e| e == "yaml")
                && path.file_name().is_some_and(|n| n != "kustomization.yaml");
            if is_job {
                let text = std::fs::read_to_string(&path).unwrap();
                let job: TrainingJob = serde_yaml::from_str(&text)
                    .unwrap_or_else(|e| panic!("{} is not a TrainingJob: {e}", path.display()));
                let name = path.strip_prefix(&root).unwrap();
                out.push((name.to_string_lossy().into_owned(), job));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_example_parses_and_is_valid() {
    let examples = examples();
    let names: Vec<&str> = examples.iter().map(|(n, _)| n.as_str()).collect();
    for required in [
        "quickstart.yaml",
        "fashion-mnist.yaml",
        "async.yaml",
        "bounded-staleness.yaml",
        "model-parallel.yaml",
        "tensorflow/ps-strategy.yaml",
        "tensorflow/multi-worker.yaml",
    ] {
        assert!(names.contains(&required), "examples/{required} is missing");
    }
    for (name, job) in &examples {
        job.spec
            .validate()
            .unwrap_or_else(|e| panic!("examples/{name} is invalid: {e}"));
    }
}

#[test]
fn quickstart_is_the_small_data_parallel_job() {
    let (_, job) = examples()
        .into_iter()
        .find(|(n, _)| n == "quickstart.yaml")
        .unwrap();
    let spec: &TrainingJobSpec = &job.spec;
    assert_eq!(spec.mode, kubetrain_api::Mode::DataParallel);
    assert_eq!(spec.replica_specs.ps.as_ref().unwrap().replicas, 1);
    assert_eq!(spec.replica_specs.worker.replicas, 2);
    let training = spec.training.as_ref().unwrap();
    assert_eq!(
        training.dataset.builtin,
        Some(kubetrain_api::BuiltinDataset::Digits)
    );
}

#[test]
fn tensorflow_examples_need_no_training_block() {
    let examples = examples();
    let find = |name: &str| &examples.iter().find(|(n, _)| n == name).unwrap().1;
    let ps = find("tensorflow/ps-strategy.yaml");
    assert!(ps.spec.training.is_none());
    let chief = ps.spec.replica_specs.chief.as_ref().expect("a chief");
    assert_eq!(chief.replicas, 1);
    let template = chief.template.as_ref().unwrap();
    assert_eq!(
        template.spec.as_ref().unwrap().containers[0].name,
        "tensorflow"
    );
    let mwms = find("tensorflow/multi-worker.yaml");
    assert!(mwms.spec.replica_specs.ps.is_none());
    assert_eq!(
        mwms.spec.success_policy,
        kubetrain_api::SuccessPolicy::AllWorkers
    );
}
