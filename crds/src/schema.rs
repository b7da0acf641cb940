//! Schema pieces that `#[derive(JsonSchema)]` cannot express by itself and that no one
//! type owns; those of one type (a replica's bounds, the conditions' list-map) live with it.

use schemars::{Schema, SchemaGenerator, json_schema};

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

/// Drops a `default` from a field's schema. Kubernetes 1.20 rejects a CRD whose list-map
/// items carry `default: ""` on string fields, although decoding still wants the serde
/// default for conditions written by hand.
pub fn without_default(schema: &mut Schema) {
    schema.remove("default");
}
