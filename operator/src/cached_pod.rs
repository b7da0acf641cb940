//! A pod as the operator's pod cache keeps it: the few fields a decision reads, in a
//! type of its own that the watch deserializes into directly.
//!
//! A `k8s_openapi` `Pod` is 2,176 bytes before any of its strings, because every field of
//! its spec and status is inline; with 5,000 pods cached that alone was 10 MiB, and the
//! operator stayed above issue 22's 60 MiB at 1,000 jobs. Deserializing into this type
//! skips every other field as it is read (serde ignores unknown fields), so the full pod
//! is never built, not even for a moment. [`CachedPod::to_pod`] hands the decision the
//! `Pod` it is written against, holding just these fields.

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStatus, Pod, PodCondition, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// The projection of a pod the decision reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CachedPod {
    /// Names, labels, UID, owner, deletion mark (managed fields and annotations are
    /// dropped by [`CachedPod::strip`]).
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<CachedSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CachedStatus>,
}

/// The spec fields a decision reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedSpec {
    /// Container names only: they say which status is the main container's.
    #[serde(default)]
    pub containers: Vec<ContainerName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_name: Option<String>,
}

/// A container, by name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerName {
    pub name: String,
}

/// The status fields a decision reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<PodCondition>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_statuses: Option<Vec<CachedContainerStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_container_statuses: Option<Vec<CachedContainerStatus>>,
}

/// A container status without its image, resources and mounts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedContainerStatus {
    pub name: String,
    #[serde(default)]
    pub restart_count: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ContainerState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_state: Option<ContainerState>,
}

impl k8s_openapi::Resource for CachedPod {
    const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for CachedPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl CachedPod {
    /// Drops the metadata no decision reads: managed fields (most of a pod's metadata)
    /// and annotations (the operator wrote them itself).
    pub fn strip(&mut self) {
        self.metadata.managed_fields = None;
        self.metadata.annotations = None;
    }

    /// The pod the decision reads, holding just the cached fields.
    pub fn to_pod(&self) -> Pod {
        Pod {
            metadata: self.metadata.clone(),
            spec: self.spec.as_ref().map(|spec| PodSpec {
                containers: spec
                    .containers
                    .iter()
                    .map(|c| Container {
                        name: c.name.clone(),
                        ..Container::default()
                    })
                    .collect(),
                node_name: spec.node_name.clone(),
                scheduler_name: spec.scheduler_name.clone(),
                ..PodSpec::default()
            }),
            status: self.status.as_ref().map(|status| PodStatus {
                phase: status.phase.clone(),
                pod_ip: status.pod_ip.clone(),
                conditions: status.conditions.clone(),
                container_statuses: status.container_statuses.as_deref().map(to_statuses),
                init_container_statuses: status.init_container_statuses.as_deref().map(to_statuses),
                ..PodStatus::default()
            }),
        }
    }
}

fn to_statuses(statuses: &[CachedContainerStatus]) -> Vec<ContainerStatus> {
    statuses
        .iter()
        .map(|s| ContainerStatus {
            name: s.name.clone(),
            restart_count: s.restart_count,
            state: s.state.clone(),
            last_state: s.last_state.clone(),
            ..ContainerStatus::default()
        })
        .collect()
}

impl From<&Pod> for CachedPod {
    /// The same projection the watch makes, for pods that reach the operator as `Pod`s
    /// (tests, and anything read through an `Api<Pod>`).
    fn from(pod: &Pod) -> Self {
        let from_statuses = |statuses: &Vec<ContainerStatus>| {
            statuses
                .iter()
                .map(|s| CachedContainerStatus {
                    name: s.name.clone(),
                    restart_count: s.restart_count,
                    state: s.state.clone(),
                    last_state: s.last_state.clone(),
                })
                .collect()
        };
        let mut cached = Self {
            metadata: pod.metadata.clone(),
            spec: pod.spec.as_ref().map(|spec| CachedSpec {
                containers: spec
                    .containers
                    .iter()
                    .map(|c| ContainerName {
                        name: c.name.clone(),
                    })
                    .collect(),
                node_name: spec.node_name.clone(),
                scheduler_name: spec.scheduler_name.clone(),
            }),
            status: pod.status.as_ref().map(|status| CachedStatus {
                phase: status.phase.clone(),
                pod_ip: status.pod_ip.clone(),
                conditions: status.conditions.clone(),
                container_statuses: status.container_statuses.as_ref().map(from_statuses),
                init_container_statuses: status.init_container_statuses.as_ref().map(from_statuses),
            }),
        };
        cached.strip();
        cached
    }
}
