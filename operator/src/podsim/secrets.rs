//! Env values from Secrets (`valueFrom.secretKeyRef`), resolved as a kubelet does: the
//! key's bytes as UTF-8. The test kubelet reads the Secrets from the API server;
//! `kubetrain local` holds the ones the plan made for the job.

use k8s_openapi::api::core::v1::{Secret, SecretKeySelector};

/// Why a secretKeyRef has no value; a kubelet leaves such a container in
/// CreateContainerConfigError with the same words.
pub fn missing(selector: &SecretKeySelector) -> String {
    format!(
        "secret {:?} or its key {:?} not found",
        selector.name, selector.key
    )
}

/// The value `selector` names in `secret`, from `data` or `stringData`.
pub fn value(secret: &Secret, selector: &SecretKeySelector) -> Option<String> {
    if let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(&selector.key)) {
        return String::from_utf8(bytes.0.clone()).ok();
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(&selector.key))
        .cloned()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    #[test]
    fn a_key_is_read_from_data_or_string_data() {
        let select = |key: &str| SecretKeySelector {
            name: "s".into(),
            key: key.into(),
            optional: None,
        };
        let secret = Secret {
            data: Some(BTreeMap::from([("a".into(), ByteString(b"1".to_vec()))])),
            string_data: Some(BTreeMap::from([("b".into(), "2".into())])),
            ..Secret::default()
        };
        assert_eq!(value(&secret, &select("a")).as_deref(), Some("1"));
        assert_eq!(value(&secret, &select("b")).as_deref(), Some("2"));
        assert_eq!(value(&secret, &select("c")), None);
        assert!(missing(&select("c")).contains("\"c\""));
    }
}
