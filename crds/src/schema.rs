//! Schema pieces that `#[derive(JsonSchema)]` cannot express by itself.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

use crate::spec::ReplicaSpec;
use crate::status::JobCondition;

/// A pod template is accepted as an opaque object: the full PodTemplateSpec schema would
/// make the CRD several hundred KiB (past `kubectl apply`'s annotation limit and Helm's
/// release size), and the API server validates the pods themselves when the operator
/// creates them. The operator reports a template it cannot use as InvalidSpec.
pub fn preserve_unknown_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Workers share `ReplicaSpec` with the parameter servers but need at least one replica.
pub fn worker_replica_spec(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = ReplicaSpec::json_schema(generator);
    if let Some(replicas) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut("replicas"))
        .and_then(|r| r.as_object_mut())
    {
        replicas.insert("minimum".into(), 1.into());
        replicas.insert(
            "description".into(),
            "Number of worker pods. Default 1, at least 1.".into(),
        );
    }
    schema
}

/// The chief and the evaluator are single replicas, as in Kubeflow's TFJob: TensorFlow
/// knows one coordinator and one side evaluator per cluster.
pub fn single_replica_spec(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = ReplicaSpec::json_schema(generator);
    if let Some(replicas) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut("replicas"))
        .and_then(|r| r.as_object_mut())
    {
        replicas.insert("maximum".into(), 1.into());
        replicas.insert(
            "description".into(),
            "Number of pods of this role: 0 or 1. Default 1.".into(),
        );
    }
    schema
}

/// Conditions are a list-map keyed by `type`, so server-side apply merges them per type
/// instead of replacing the whole list.
pub fn conditions_list_map(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = <Vec<JobCondition>>::json_schema(generator);
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert("x-kubernetes-list-map-keys".into(), vec!["type"].into());
    schema
}

/// Drops a `default` from a field's schema. Kubernetes 1.20 rejects a CRD whose list-map
/// items carry `default: ""` on string fields, although decoding still wants the serde
/// default for conditions written by hand.
pub fn without_default(schema: &mut Schema) {
    schema.remove("default");
}
