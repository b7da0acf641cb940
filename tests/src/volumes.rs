//! The test kubelet's volumes: a pod's mounts become host directories.
//!
//! A process has no mount namespace, so each volume the main container mounts is made a
//! directory under the pod's working directory (ConfigMaps written from the API, emptyDirs
//! empty) or taken as it is (hostPath), and the mount paths in its argv and env are pointed
//! there ([`PathMap`]). Other volume kinds are left unmounted.

use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Volume};
use kube::ResourceExt;
use kube::api::Api;
use kubetrain_operator::podsim::paths::PathMap;

use crate::kubelet::KubeletError;

/// Makes the main container's volumes and returns where each mount path is.
pub async fn mount(api: &Api<Pod>, pod: &Pod, workdir: &Path) -> Result<PathMap, KubeletError> {
    let mut map = PathMap::default();
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(map);
    };
    let Some(container) = spec
        .containers
        .get(kubetrain_operator::plan::main_container_index(
            &spec.containers,
        ))
    else {
        return Ok(map);
    };
    let namespace = pod.namespace().unwrap_or_default();
    for mount in container.volume_mounts.iter().flatten() {
        let Some(volume) = spec.volumes.iter().flatten().find(|v| v.name == mount.name) else {
            continue;
        };
        let fail = |message: String| KubeletError::MountVolume {
            pod: pod.name_any(),
            volume: volume.name.clone(),
            message,
        };
        let Some(dir) = materialise(api, &namespace, volume, workdir)
            .await
            .map_err(fail)?
        else {
            continue;
        };
        let dir = match &mount.sub_path {
            Some(sub) if !sub.is_empty() => dir.join(sub),
            _ => dir,
        };
        map.mount(mount.mount_path.clone(), dir);
    }
    Ok(map)
}

/// The host directory standing in for `volume`, or None for kinds it does not emulate.
async fn materialise(
    api: &Api<Pod>,
    namespace: &str,
    volume: &Volume,
    workdir: &Path,
) -> Result<Option<PathBuf>, String> {
    let dir = workdir.join("volumes").join(&volume.name);
    if let Some(source) = &volume.config_map {
        let configs: Api<ConfigMap> = Api::namespaced(api.clone().into_client(), namespace);
        let config = match configs.get_opt(&source.name).await {
            Ok(Some(config)) => config,
            Ok(None) if source.optional == Some(true) => ConfigMap::default(),
            Ok(None) => return Err(format!("configmap {:?} not found", source.name)),
            Err(e) => return Err(format!("reading configmap {:?}: {e}", source.name)),
        };
        write_config_map(&config, source.items.as_deref(), &dir)?;
        return Ok(Some(dir));
    }
    if volume.empty_dir.is_some() {
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        return Ok(Some(dir));
    }
    if let Some(host) = &volume.host_path {
        return Ok(Some(PathBuf::from(&host.path)));
    }
    Ok(None)
}

/// Writes a ConfigMap's keys as files, as the kubelet does (all keys, or only `items`).
fn write_config_map(
    config: &ConfigMap,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    dir: &Path,
) -> Result<(), String> {
    // A restart sees the ConfigMap as it is now, not a mix with what it was.
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let data = config.data.clone().unwrap_or_default();
    let files: Vec<(String, String)> = match items {
        Some(items) => items
            .iter()
            .map(|item| {
                data.get(&item.key)
                    .map(|value| (item.path.clone(), value.clone()))
                    .ok_or_else(|| format!("configmap has no key {:?}", item.key))
            })
            .collect::<Result<_, _>>()?,
        None => data.into_iter().collect(),
    };
    for (path, value) in files {
        if path.split('/').any(|part| part == "..") {
            return Err(format!("item path {path:?} leaves the volume"));
        }
        let file = dir.join(&path);
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        fs::write(&file, value).map_err(|e| format!("writing {}: {e}", file.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::KeyToPath;

    fn config_map() -> ConfigMap {
        ConfigMap {
            data: Some(
                [
                    ("train.py".to_string(), "print('hi')".to_string()),
                    ("mwms.py".to_string(), "pass".to_string()),
                ]
                .into(),
            ),
            ..ConfigMap::default()
        }
    }

    #[test]
    fn every_key_becomes_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("programs");
        write_config_map(&config_map(), None, &target).unwrap();
        assert_eq!(
            fs::read_to_string(target.join("train.py")).unwrap(),
            "print('hi')"
        );
        assert!(target.join("mwms.py").is_file());
    }

    #[test]
    fn items_pick_keys_and_paths_and_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let item = |key: &str, path: &str| KeyToPath {
            key: key.into(),
            path: path.into(),
            mode: None,
        };
        write_config_map(
            &config_map(),
            Some(&[item("train.py", "bin/run.py")]),
            dir.path(),
        )
        .unwrap();
        assert!(dir.path().join("bin/run.py").is_file());
        assert!(!dir.path().join("mwms.py").exists());

        let missing = write_config_map(&config_map(), Some(&[item("nope", "x")]), dir.path());
        assert!(missing.unwrap_err().contains("nope"));
        let escape = write_config_map(&config_map(), Some(&[item("train.py", "../x")]), dir.path());
        assert!(escape.unwrap_err().contains("leaves the volume"));
    }
}
