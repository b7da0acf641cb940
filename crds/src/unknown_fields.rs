//! Fields a manifest names that kubetrain does not know.
//!
//! Deserialising drops a misspelt field without a word, so `batchsize: 256` would train
//! with the default batch of 64. The API server prunes such fields at admission too (and
//! kubectl warns); `kubetrain local` and the trainer, which read YAML and env past any
//! API server, find them by comparing what was written with what was understood.

use serde_json::Value;

/// The dotted paths (under `prefix`) of fields in `written` that `understood`, the same
/// document after a round trip through its type, no longer has. Empty values (null, `[]`,
/// `{}`) are not reported: a type may leave out a field that holds its default.
pub fn unknown_fields(written: &Value, understood: &Value, prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    walk(written, understood, prefix, &mut found);
    found
}

fn walk(written: &Value, understood: &Value, path: &str, found: &mut Vec<String>) {
    match (written, understood) {
        (Value::Object(written), Value::Object(understood)) => {
            for (key, value) in written {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match understood.get(key) {
                    Some(known) => walk(value, known, &here, found),
                    None if is_empty(value) => {}
                    None => found.push(with_hint(here, key, understood)),
                }
            }
        }
        (Value::Array(written), Value::Array(understood)) => {
            for (i, (value, known)) in written.iter().zip(understood).enumerate() {
                walk(value, known, &format!("{path}[{i}]"), found);
            }
        }
        _ => {}
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// `spec.training.batchsize (did you mean batchSize?)` when a known sibling differs only
/// in case, dashes or underscores.
fn with_hint(path: String, key: &str, siblings: &serde_json::Map<String, Value>) -> String {
    let fold = |k: &str| k.replace(['-', '_'], "").to_ascii_lowercase();
    match siblings.keys().find(|k| fold(k) == fold(key)) {
        Some(known) => format!("{path} (did you mean {known}?)"),
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn misspelt_and_unknown_fields_are_named_with_a_hint() {
        let written = json!({"training": {"batchsize": 256, "epochs": 3, "colour": "red",
                              "model": {"kind": "mlp", "hiden": [4]}}});
        let understood = json!({"training": {"batchSize": 64, "epochs": 3,
                                 "model": {"kind": "mlp"}}});
        assert_eq!(
            unknown_fields(&written, &understood, "spec"),
            [
                "spec.training.batchsize (did you mean batchSize?)",
                "spec.training.colour",
                "spec.training.model.hiden",
            ]
        );
    }

    #[test]
    fn empty_values_and_list_items_are_compared_fairly() {
        let written = json!({"a": null, "b": [], "c": {}, "list": [{"x": 1, "y": 2}]});
        let understood = json!({"list": [{"x": 1}]});
        assert_eq!(unknown_fields(&written, &understood, ""), ["list[0].y"]);
        assert!(unknown_fields(&understood, &understood, "").is_empty());
    }
}
