//! The spec rules that the schema cannot express, one scenario each.

use kubetrain_api::TrainingJob;

fn job(yaml: &str) -> TrainingJob {
    serde_yaml::from_str(yaml).expect("test manifest parses")
}

const BASE: &str = r#"
apiVersion: kubetrain.io/v1alpha1
kind: TrainingJob
metadata: {name: t}
spec:
  replicaSpecs:
    ps: {replicas: 1}
    worker: {replicas: 2}
  training:
    model: {kind: mlp, hidden: [32]}
    dataset: {builtin: digits}
    optimizer: {kind: sgd, learningRate: 0.1}
"#;

/// Applies a JSON merge patch to BASE and returns the validation errors as `field: message`.
fn errors_with(patch: serde_json::Value) -> Vec<String> {
    let mut value: serde_json::Value = serde_yaml::from_str(BASE).unwrap();
    merge(&mut value, patch);
    let job: TrainingJob = serde_json::from_value(value).expect("patched manifest parses");
    match job.spec.validate() {
        Ok(()) => Vec::new(),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

fn merge(target: &mut serde_json::Value, patch: serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge(t.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}

fn assert_one_error(patch: serde_json::Value, field: &str, hint: &str) {
    let errors = errors_with(patch);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with(&format!("{field}: ")), "{errors:?}");
    assert!(
        errors[0].contains(hint),
        "{errors:?} should mention {hint:?}"
    );
}

#[test]
fn the_base_spec_is_valid() {
    assert!(job(BASE).spec.validate().is_ok());
}

#[test]
fn schema_bounds_are_enforced_without_an_api_server() {
    use serde_json::json;
    assert_one_error(
        json!({"spec": {"replicaSpecs": {"ps": {"replicas": -1}}}}),
        "spec.replicaSpecs.ps.replicas",
        "0 or more",
    );
    assert_one_error(
        json!({"spec": {"replicaSpecs": {"worker": {"replicas": 0}}}}),
        "spec.replicaSpecs.worker.replicas",
        "at least 1",
    );
    assert_one_error(
        json!({"spec": {"training": {"batchSize": 0}}}),
        "spec.training.batchSize",
        "at least 1",
    );
    assert_one_error(
        json!({"spec": {"training": {"epochs": 0}}}),
        "spec.training.epochs",
        "at least 1",
    );
    assert_one_error(
        json!({"spec": {"training": {"optimizer": {"learningRate": 0.0}}}}),
        "spec.training.optimizer.learningRate",
        "greater than 0",
    );
    assert_one_error(
        json!({"spec": {"runPolicy": {"activeDeadlineSeconds": 0}}}),
        "spec.runPolicy.activeDeadlineSeconds",
        "at least 1",
    );
    assert_one_error(
        json!({"spec": {"runPolicy": {"backoffLimit": -2}}}),
        "spec.runPolicy.backoffLimit",
        "0 or more",
    );
}

#[test]
fn unknown_enum_values_fail_to_parse_with_the_allowed_values() {
    let mut value: serde_json::Value = serde_yaml::from_str(BASE).unwrap();
    merge(
        &mut value,
        serde_json::json!({"spec": {"replicaSpecs": {"worker": {"restartPolicy": "Sometimes"}}}}),
    );
    let err = serde_json::from_value::<TrainingJob>(value)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Sometimes") && err.contains("ExitCode"),
        "{err}"
    );
}

#[test]
fn cross_field_rules() {
    use serde_json::json;
    assert_one_error(
        json!({"spec": {"training": {"pipeline": {"microBatches": 4}}}}),
        "spec.training.pipeline",
        "ModelParallel",
    );
    assert_one_error(
        json!({"spec": {"replicaSpecs": {"ps": {"replicas": 0}}}}),
        "spec.replicaSpecs.ps.replicas",
        "at least 1 parameter server",
    );
    assert_one_error(
        json!({"spec": {"training": {"consistency": {"kind": "BoundedStaleness"}}}}),
        "spec.training.consistency.staleness",
        "needs `staleness`",
    );
    assert_one_error(
        json!({"spec": {"training": {"consistency": {"kind": "Async", "staleness": 3}}}}),
        "spec.training.consistency.staleness",
        "only applies",
    );
    assert_one_error(
        json!({"spec": {"training": {"consistency": {"kind": "Sync", "staleGradients": "Apply"}}}}),
        "spec.training.consistency.staleGradients",
        "Sync never applies a stale gradient",
    );
    assert_one_error(
        json!({"spec": {"training": {"consistency": {"kind": "Async", "workerGracePeriodSeconds": 60}}}}),
        "spec.training.consistency.workerGracePeriodSeconds",
        "only Sync waits for a lost worker",
    );
    assert_one_error(
        json!({"spec": {"training": {"consistency": {"kind": "Sync", "workerGracePeriodSeconds": 0}}}}),
        "spec.training.consistency.workerGracePeriodSeconds",
        "between 1 and 86400",
    );
    assert_one_error(
        json!({"spec": {"training": {"model": {"kind": "softmax"}}}}),
        "spec.training.model.hidden",
        "no hidden layers",
    );
    assert_one_error(
        json!({"spec": {"training": {"optimizer": {"kind": "adam", "momentum": 0.9}}}}),
        "spec.training.optimizer.momentum",
        "beta1",
    );
    assert_one_error(
        json!({"spec": {"training": {"dataset": {"builtin": null, "path": "/data/x.csv"}}}}),
        "spec.training.dataset.format",
        "csv",
    );
    assert_one_error(
        json!({"spec": {"training": {"dataset": {"path": "/tmp/x"}}}}),
        "spec.training.dataset.path",
        "takes no path",
    );
    assert_one_error(
        json!({"spec": {"replicaSpecs": {"worker": {"template": {"spec": {"containers": []}}}}}}),
        "spec.replicaSpecs.worker.template.spec.containers",
        "no containers",
    );
    assert_one_error(
        json!({"spec": {"runPolicy": {"schedulingPolicy": {"gang": true, "minAvailable": 9}}}}),
        "spec.runPolicy.schedulingPolicy.minAvailable",
        "3 replicas",
    );
}

#[test]
fn model_parallel_rules() {
    use serde_json::json;
    let mp = |workers: i32, hidden: serde_json::Value| {
        errors_with(json!({"spec": {
            "mode": "ModelParallel",
            "replicaSpecs": {"ps": null, "worker": {"replicas": workers}},
            "training": {"model": {"kind": "mlp", "hidden": hidden}, "pipeline": {"microBatches": 4}}
        }}))
    };
    assert!(mp(2, json!([32])).is_empty(), "{:?}", mp(2, json!([32])));
    let too_few = mp(1, json!([32]));
    assert!(
        too_few.iter().any(|e| e.contains("at least 2 workers")),
        "{too_few:?}"
    );
    let too_many = mp(3, json!([32]));
    assert!(
        too_many.iter().any(|e| e.contains("only 2 layer(s)")),
        "{too_many:?}"
    );
}

#[test]
fn without_training_every_role_needs_a_template() {
    let errors = errors_with(serde_json::json!({"spec": {"training": null}}));
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].starts_with("spec.replicaSpecs.ps.template: "));
    assert!(errors[1].starts_with("spec.replicaSpecs.worker.template: "));
}

#[test]
fn the_built_in_trainer_has_no_chief_or_evaluator() {
    for role in ["chief", "evaluator"] {
        assert_one_error(
            serde_json::json!({"spec": {"replicaSpecs": {role: {"replicas": 1}}}}),
            &format!("spec.replicaSpecs.{role}"),
            "worker 0 is its chief",
        );
    }
}

#[test]
fn chief_and_evaluator_are_single_replicas_of_a_users_program() {
    let template =
        serde_json::json!({"spec": {"containers": [{"name": "tensorflow", "image": "tf"}]}});
    let own = |extra: serde_json::Value| {
        let mut patch = serde_json::json!({"spec": {"training": null, "replicaSpecs": {
            "ps": {"replicas": 1, "template": template},
            "worker": {"replicas": 2, "template": template},
            "chief": {"replicas": 1, "template": template},
            "evaluator": {"replicas": 1, "template": template},
        }}});
        merge(&mut patch, extra);
        patch
    };
    assert_eq!(
        errors_with(own(serde_json::json!({}))),
        Vec::<String>::new()
    );
    assert_one_error(
        own(serde_json::json!({"spec": {"replicaSpecs": {"chief": {"replicas": 2}}}})),
        "spec.replicaSpecs.chief.replicas",
        "must be 0 or 1, got 2",
    );
    assert_one_error(
        own(serde_json::json!({"spec": {"replicaSpecs": {"evaluator": {"template": null}}}})),
        "spec.replicaSpecs.evaluator.template",
        "your own image",
    );
    // minAvailable counts the chief and the evaluator too.
    assert_eq!(
        errors_with(own(
            serde_json::json!({"spec": {"runPolicy": {"schedulingPolicy": {"gang": true, "minAvailable": 5}}}})
        )),
        Vec::<String>::new()
    );
}
