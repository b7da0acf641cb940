//! What a pod's main container starts as a local process: program, argv and env, with the
//! cluster's names, mounts and downward-API values resolved as a kubelet would.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, Secret};
use kube::ResourceExt;
use kubetrain_api::contract;

use super::network::{DnsContext, DnsKey, PodNetwork};
use super::paths::PathMap;
use super::secrets;
use crate::plan;

/// A pod's `terminationGracePeriodSeconds` when it sets none (the API server's default).
pub const DEFAULT_GRACE_SECONDS: i64 = 30;

/// Why a pod's container cannot start. A kubelet reports these as the container's
/// `CreateContainerConfigError`, and so do both runners.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("pod {pod} has no containers")]
    NoContainer { pod: String },
    #[error("container {container} of pod {pod} has no command and the runner has no default")]
    NoCommand { pod: String, container: String },
    #[error("env var {var} of pod {pod}: {what} is not supported by a local runner")]
    UnsupportedEnvSource {
        pod: String,
        var: String,
        what: String,
    },
    #[error("pod {pod}: env {var}: {message}")]
    EnvSecret {
        pod: String,
        var: String,
        message: String,
    },
}

/// A program that stands in for a command name, with the arguments that go before the
/// container's own (`kubetrain trainer` for `kubetrain-trainer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub path: PathBuf,
    pub leading_args: Vec<String>,
}

impl Program {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            leading_args: Vec::new(),
        }
    }
}

/// `argv[0]` substitutions: a container's command name (the full string, then its file
/// name) becomes a local program; a container without a command runs `default` (the
/// image's entrypoint).
#[derive(Debug, Clone, Default)]
pub struct Commands {
    pub by_name: HashMap<String, Program>,
    pub default: Option<Program>,
}

impl Commands {
    fn substitute(&self, argv0: &str) -> Program {
        let file_name = Path::new(argv0)
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or(argv0);
        self.by_name
            .get(argv0)
            .or_else(|| self.by_name.get(file_name))
            .cloned()
            .unwrap_or_else(|| Program::new(argv0))
    }
}

/// Everything needed to start the main container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The host file standing in for the container's `terminationMessagePath`.
    pub termination_log: PathBuf,
    /// How long a stopped pod's process has between SIGTERM and SIGKILL.
    pub grace: Duration,
}

/// What the runner's world gives a pod: its addresses, mounts, Secrets and programs.
pub struct LaunchContext<'a> {
    pub pod_ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
    pub network: &'a mut PodNetwork,
    pub mounts: &'a PathMap,
    pub secrets: &'a [Secret],
    pub commands: &'a Commands,
    pub termination_log: PathBuf,
    /// Env vars the runner leaves out (`kubetrain local` serves no metrics port).
    pub unset: &'a [&'a str],
}

/// The pod's DNS identity: namespace, subdomain (the job's Service), hostname.
pub fn dns_key(pod: &Pod) -> DnsKey {
    let spec = pod.spec.as_ref();
    (
        pod.namespace().unwrap_or_default(),
        spec.and_then(|s| s.subdomain.clone()).unwrap_or_default(),
        spec.and_then(|s| s.hostname.clone())
            .unwrap_or_else(|| pod.name_any()),
    )
}

/// The container the runners start, as the operator reads it.
pub fn main_container(pod: &Pod) -> Option<&Container> {
    let containers = &pod.spec.as_ref()?.containers;
    containers.get(plan::main_container_index(containers))
}

/// The process a pod's main container becomes.
pub fn prepare(pod: &Pod, ctx: &mut LaunchContext<'_>) -> Result<Launch, LaunchError> {
    let pod_name = pod.name_any();
    let container = main_container(pod).ok_or_else(|| LaunchError::NoContainer {
        pod: pod_name.clone(),
    })?;
    let command = container.command.clone().unwrap_or_default();
    let own_args = container.args.clone().unwrap_or_default();
    let (program, rest) = match command.split_first() {
        Some((argv0, rest)) => (ctx.commands.substitute(&ctx.mounts.apply(argv0)), rest),
        None => (
            ctx.commands
                .default
                .clone()
                .ok_or_else(|| LaunchError::NoCommand {
                    pod: pod_name.clone(),
                    container: container.name.clone(),
                })?,
            &[][..],
        ),
    };
    let args = program
        .leading_args
        .iter()
        .cloned()
        .chain(rest.iter().chain(&own_args).map(|a| ctx.mounts.apply(a)))
        .collect();
    Ok(Launch {
        program: program.path,
        args,
        env: environment(pod, container, ctx)?,
        termination_log: ctx.termination_log.clone(),
        grace: grace(pod),
    })
}

fn environment(
    pod: &Pod,
    container: &Container,
    ctx: &mut LaunchContext<'_>,
) -> Result<Vec<(String, String)>, LaunchError> {
    let pod_name = pod.name_any();
    let (ns, subdomain, hostname) = dns_key(pod);
    // A process cannot have a file mounted at the container's termination-message path, so
    // a host file stands in for it, and env values naming that path name the file instead.
    let in_container = container
        .termination_message_path
        .clone()
        .unwrap_or_else(|| contract::DEFAULT_TERMINATION_MESSAGE_PATH.to_string());
    let dns = DnsContext {
        namespace: &ns,
        subdomain: (!subdomain.is_empty()).then_some(subdomain.as_str()),
    };
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container.env.iter().flatten() {
        if ctx.unset.contains(&var.name.as_str()) {
            continue;
        }
        let unsupported = |what: String| LaunchError::UnsupportedEnvSource {
            pod: pod_name.clone(),
            var: var.name.clone(),
            what,
        };
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => ctx.mounts.apply(&ctx.network.rewrite(v, &dns)),
            (None, None) => String::new(),
            (None, Some(source)) => match (&source.field_ref, &source.secret_key_ref) {
                (Some(field), _) => field_value(pod, &field.field_path, ctx.pod_ip, ctx.host_ip)
                    .ok_or_else(|| unsupported(format!("fieldRef {}", field.field_path)))?,
                (None, Some(selector)) => ctx
                    .secrets
                    .iter()
                    .filter(|s| s.metadata.name.as_deref() == Some(selector.name.as_str()))
                    .find_map(|s| secrets::value(s, selector))
                    .ok_or_else(|| LaunchError::EnvSecret {
                        pod: pod_name.clone(),
                        var: var.name.clone(),
                        message: secrets::missing(selector),
                    })?,
                (None, None) => {
                    return Err(unsupported(
                        "valueFrom other than fieldRef or secretKeyRef".to_string(),
                    ));
                }
            },
        };
        let value = if value == in_container {
            ctx.termination_log.display().to_string()
        } else {
            value
        };
        env.push((var.name.clone(), value));
    }
    // Downward-API conventions the trainer relies on to bind its own address.
    for (k, v) in [
        (contract::ENV_POD_IP, ctx.pod_ip.to_string()),
        ("HOSTNAME", hostname),
    ] {
        if !env.iter().any(|(name, _)| name == k) {
            env.push((k.to_string(), v));
        }
    }
    Ok(env)
}

fn grace(pod: &Pod) -> Duration {
    let seconds = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(DEFAULT_GRACE_SECONDS);
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// The downward API's `fieldRef` paths a kubelet resolves for env vars.
fn field_value(pod: &Pod, path: &str, pod_ip: Ipv4Addr, host_ip: Ipv4Addr) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.as_ref()?.get(key).cloned().unwrap_or_default())
    };
    Some(match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => pod_ip.to_string(),
        "status.hostIP" => host_ip.to_string(),
        _ => keyed("metadata.labels['", &meta.labels)
            .or_else(|| keyed("metadata.annotations['", &meta.annotations))?,
    })
}

#[cfg(test)]
mod tests;
