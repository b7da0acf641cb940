//! The Secrets a pod's main container takes env values from (`secretKeyRef`), read from
//! the API server as a kubelet reads them before it starts the container.

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::Api;

use crate::kubelet::KubeletError;

/// Every Secret the main container's env refers to. A missing one is an error, as it is
/// for a kubelet (CreateContainerConfigError), unless the reference is optional.
pub async fn read(api: &Api<Pod>, pod: &Pod) -> Result<Vec<Secret>, KubeletError> {
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(Vec::new());
    };
    let Some(container) = spec
        .containers
        .get(kubetrain_operator::plan::main_container_index(
            &spec.containers,
        ))
    else {
        return Ok(Vec::new());
    };
    let secrets: Api<Secret> = Api::namespaced(
        api.clone().into_client(),
        &pod.namespace().unwrap_or_default(),
    );
    let mut found: Vec<Secret> = Vec::new();
    for var in container.env.iter().flatten() {
        let Some(selector) = var
            .value_from
            .as_ref()
            .and_then(|source| source.secret_key_ref.as_ref())
        else {
            continue;
        };
        if found.iter().any(|s| s.name_any() == selector.name) {
            continue;
        }
        let fail = |message: String| KubeletError::EnvSecret {
            pod: pod.name_any(),
            var: var.name.clone(),
            message,
        };
        match secrets.get_opt(&selector.name).await {
            Ok(Some(secret)) => found.push(secret),
            Ok(None) if selector.optional == Some(true) => {}
            Ok(None) => {
                return Err(fail(kubetrain_operator::podsim::secrets::missing(selector)));
            }
            Err(e) => return Err(fail(format!("reading secret {:?}: {e}", selector.name))),
        }
    }
    Ok(found)
}
