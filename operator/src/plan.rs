//! PURE: a TrainingJob becomes the pods and the headless Service it should have.
//!
//! No I/O here: the controller, the local runner and the tests all call these functions,
//! so the cluster and local mode cannot drift apart.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ObjectFieldSelector, Pod,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector,
    SecurityContext, Service, ServicePort, ServiceSpec, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use kubetrain_api::contract::{self, ClusterSpec};
use kubetrain_api::{RestartPolicy, TrainingJob};

use crate::gang::{self, GangScheduler};
use crate::replica::{ReplicaId, job_labels, replica_ids, replica_spec, replicas};

/// What the plan needs besides the job itself: operator settings.
#[derive(Clone, Debug)]
pub struct PlanSettings {
    /// Image for pods without a template (`--trainer-image`).
    pub trainer_image: String,
    /// The gRPC port every replica listens on.
    pub port: u16,
    /// The gang scheduler that gets a PodGroup for jobs with `schedulingPolicy.gang`.
    pub gang_scheduler: Option<GangScheduler>,
    /// The port the built-in trainer serves `/metrics` on, as the container port named
    /// `metrics` that the chart's PodMonitor scrapes; None for no trainer metrics.
    pub trainer_metrics_port: Option<u16>,
    /// Give every job a NetworkPolicy (`--job-network-policy`) that admits these operator
    /// pods to the trainer port; None for no policy.
    pub job_network_policy: Option<OperatorPods>,
}

/// The operator's own pods, which ask each job's chief for progress on the trainer port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorPods {
    /// The namespace they run in.
    pub namespace: String,
    /// Labels that select them there.
    pub labels: BTreeMap<String, String>,
}

impl Default for PlanSettings {
    fn default() -> Self {
        Self {
            trainer_image: DEFAULT_TRAINER_IMAGE.to_string(),
            port: contract::DEFAULT_PORT,
            gang_scheduler: None,
            trainer_metrics_port: Some(contract::DEFAULT_TRAINER_METRICS_PORT),
            job_network_policy: None,
        }
    }
}

/// The trainer image used when neither `--trainer-image` nor its env var is set.
pub const DEFAULT_TRAINER_IMAGE: &str = "ghcr.io/kubetrain/kubetrain-trainer:0.1.0";

pub(crate) fn child_meta(
    job: &TrainingJob,
    name: String,
    labels: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: job.namespace(),
        labels: Some(labels),
        owner_references: job.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

/// The headless Service that gives every pod a stable DNS name `<pod>.<job>.<ns>.svc`.
pub fn service(job: &TrainingJob, settings: &PlanSettings) -> Service {
    Service {
        metadata: child_meta(job, job.name_any(), job_labels(job)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            // Peers must resolve each other before they are Ready: the trainer's own
            // readiness depends on reaching its peers.
            publish_not_ready_addresses: Some(true),
            selector: Some(BTreeMap::from([(
                contract::LABEL_JOB_NAME.to_string(),
                job.name_any(),
            )])),
            ports: Some(vec![ServicePort {
                name: Some(contract::PORT_NAME.to_string()),
                port: i32::from(settings.port),
                target_port: Some(IntOrString::Int(i32::from(settings.port))),
                protocol: Some("TCP".to_string()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The pod restart policy that implements a replica restart policy: `ExitCode` needs the
/// pod to stop (Never) so the operator can look at the exit code and decide.
pub fn pod_restart_policy(policy: RestartPolicy) -> &'static str {
    match policy {
        RestartPolicy::Never | RestartPolicy::ExitCode => "Never",
        RestartPolicy::OnFailure => "OnFailure",
        RestartPolicy::Always => "Always",
    }
}

/// The contract env of one replica (DESIGN.md §5).
pub fn contract_env(job: &TrainingJob, replica: ReplicaId, settings: &PlanSettings) -> Vec<EnvVar> {
    let namespace = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let cluster =
        ClusterSpec::for_job(&name, &namespace, |role| replicas(job, role), settings.port);
    let value = |name: &str, value: String| EnvVar {
        name: name.to_string(),
        value: Some(value),
        value_from: None,
    };
    let mut env = vec![
        value(contract::ENV_CLUSTER, cluster.to_env()),
        value(contract::ENV_ROLE, replica.role.as_str().to_string()),
        value(contract::ENV_INDEX, replica.index.to_string()),
        value(contract::ENV_JOB, format!("{namespace}/{name}")),
        value(
            contract::ENV_MODE,
            serde_json::to_value(job.spec.mode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        ),
        value(
            contract::ENV_TF_CONFIG,
            cluster.tf_config(replica.role, replica.index),
        ),
        EnvVar {
            name: contract::ENV_POD_IP.to_string(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "status.podIP".to_string(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
        },
    ];
    if let Some(training) = &job.spec.training {
        env.push(value(
            contract::ENV_TRAINING,
            serde_json::to_string(training).expect("a TrainingSpec always serialises"),
        ));
        // The built-in trainer refuses calls without the job's token (isolation.rs).
        env.push(EnvVar {
            name: contract::ENV_JOB_TOKEN.to_string(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: contract::token_secret_name(&name),
                    key: contract::TOKEN_SECRET_KEY.to_string(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
        });
    }
    env
}

/// The pod template used when a role has none: the trainer image with secure defaults.
fn default_template(settings: &PlanSettings) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: None,
        spec: Some(PodSpec {
            // Trainer pods never talk to the Kubernetes API (DESIGN.md §5).
            automount_service_account_token: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_string(),
                    localhost_profile: None,
                }),
                ..PodSecurityContext::default()
            }),
            containers: vec![Container {
                name: contract::TRAINER_CONTAINER.to_string(),
                image: Some(settings.trainer_image.clone()),
                command: Some(vec!["kubetrain-trainer".to_string()]),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".to_string()]),
                        add: None,
                    }),
                    ..SecurityContext::default()
                }),
                // A TCP probe rather than a gRPC one: the gRPC probe field does not exist
                // on older API servers, and server-side apply rejects unknown fields.
                readiness_probe: Some(Probe {
                    tcp_socket: Some(TCPSocketAction {
                        port: IntOrString::Int(i32::from(settings.port)),
                        host: None,
                    }),
                    period_seconds: Some(5),
                    ..Probe::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
    }
}

/// Which container gets the contract env: `trainer`, else `tensorflow`, else the first.
pub fn main_container_index(containers: &[Container]) -> usize {
    [contract::TRAINER_CONTAINER, contract::TENSORFLOW_CONTAINER]
        .iter()
        .find_map(|wanted| containers.iter().position(|c| c.name == *wanted))
        .unwrap_or(0)
}

/// The pod of one replica. The job must have passed validation (a template has at least
/// one container).
pub fn pod(job: &TrainingJob, replica: ReplicaId, settings: &PlanSettings) -> Pod {
    let name = job.name_any();
    let spec = replica_spec(job, replica.role).expect("replica ids come from the job's roles");
    let template = spec
        .template
        .as_deref()
        .cloned()
        .unwrap_or_else(|| default_template(settings));

    let mut labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.extend(job_labels(job));
    labels.insert(
        contract::LABEL_ROLE.to_string(),
        replica.role.as_str().to_string(),
    );
    labels.insert(contract::LABEL_INDEX.to_string(), replica.index.to_string());
    labels.insert(
        "app.kubernetes.io/component".to_string(),
        replica.role.as_str().to_string(),
    );

    let mut metadata = child_meta(job, replica.pod_name(&name), labels);
    metadata.annotations = template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone());

    let mut pod_spec = template.spec.unwrap_or_default();
    pod_spec.hostname = Some(replica.pod_name(&name));
    pod_spec.subdomain = Some(name.clone());
    pod_spec.restart_policy = Some(pod_restart_policy(spec.restart_policy).to_string());
    if let Some(priority) = job
        .spec
        .run_policy
        .scheduling_policy
        .as_ref()
        .and_then(|p| p.priority_class.clone())
    {
        pod_spec.priority_class_name.get_or_insert(priority);
    }

    if !pod_spec.containers.is_empty() {
        let main = main_container_index(&pod_spec.containers);
        let container = &mut pod_spec.containers[main];
        let mut contract_env = contract_env(job, replica, settings);
        contract_env.push(EnvVar {
            name: contract::ENV_TERMINATION_LOG.to_string(),
            value: Some(
                container
                    .termination_message_path
                    .clone()
                    .unwrap_or_else(|| contract::DEFAULT_TERMINATION_MESSAGE_PATH.to_string()),
            ),
            value_from: None,
        });
        let mut env: Vec<EnvVar> = container
            .env
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| !contract_env.iter().any(|c| c.name == e.name))
            .collect();
        env.extend(contract_env);
        container.env = Some(env);

        let ports = container.ports.get_or_insert_with(Vec::new);
        if !ports
            .iter()
            .any(|p| p.container_port == i32::from(settings.port))
        {
            ports.push(ContainerPort {
                name: Some(contract::PORT_NAME.to_string()),
                container_port: i32::from(settings.port),
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            });
        }
        expose_trainer_metrics(container, job, settings);
        if container.image.is_none() {
            container.image = Some(settings.trainer_image.clone());
        }
    }

    let mut pod = Pod {
        metadata,
        spec: Some(pod_spec),
        status: None,
    };
    if let Some(scheduler) = gang::active(job, settings.gang_scheduler) {
        gang::join(&mut pod, job, scheduler);
    }
    pod
}

/// Gives the built-in trainer (a job with spec.training; a user's own image serves no
/// kubetrain metrics) its metrics port: the env it reads and the container port named
/// `metrics` that the chart's PodMonitor scrapes. A port the template already set stays.
fn expose_trainer_metrics(container: &mut Container, job: &TrainingJob, settings: &PlanSettings) {
    let Some(default) = settings
        .trainer_metrics_port
        .filter(|_| job.spec.training.is_some())
    else {
        return;
    };
    let env = container.env.get_or_insert_with(Vec::new);
    let port = match env.iter().find(|e| e.name == contract::ENV_METRICS_PORT) {
        Some(set) => match set.value.as_deref().and_then(|v| v.parse::<u16>().ok()) {
            Some(port) => port,
            None => return,
        },
        None => {
            env.push(EnvVar {
                name: contract::ENV_METRICS_PORT.to_string(),
                value: Some(default.to_string()),
                value_from: None,
            });
            default
        }
    };
    let ports = container.ports.get_or_insert_with(Vec::new);
    if !ports.iter().any(|p| {
        p.container_port == i32::from(port)
            || p.name.as_deref() == Some(contract::METRICS_PORT_NAME)
    }) {
        ports.push(ContainerPort {
            name: Some(contract::METRICS_PORT_NAME.to_string()),
            container_port: i32::from(port),
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        });
    }
}

/// Every pod the job should have, PS first.
pub fn pods(job: &TrainingJob, settings: &PlanSettings) -> Vec<Pod> {
    replica_ids(job)
        .into_iter()
        .map(|replica| pod(job, replica, settings))
        .collect()
}

#[cfg(test)]
mod tests;
