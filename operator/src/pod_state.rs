//! PURE: what a pod's status says, read the same way by every decision: phase, readiness,
//! the main container's exit code and restarts, divergence, and why a Pending pod is stuck.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kubetrain_api::contract;

use crate::plan;

/// The waiting reasons that mean a pod will not start without someone's help.
pub const STALLED_REASONS: [&str; 4] = [
    "ImagePullBackOff",
    "ErrImagePull",
    "CreateContainerConfigError",
    "Unschedulable",
];

/// The pod's phase, or "" before the kubelet reported one.
pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// Whether the pod is being deleted.
pub fn is_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Whether the pod reports the Ready condition True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The status of the pod's main container (the one the contract env goes into). A pod
/// whose spec lists no containers (as some tests and a status-only view have it) has
/// one status, the main container's.
fn main_container_status(pod: &Pod) -> Option<&ContainerStatus> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let Some(main) = containers.get(plan::main_container_index(containers)) else {
        return statuses.first();
    };
    statuses
        .iter()
        .find(|s| s.name == main.name)
        .or_else(|| statuses.first())
}

/// The exit code of the pod's main container, if it terminated.
pub fn exit_code(pod: &Pod) -> Option<i32> {
    let status = main_container_status(pod)?;
    status
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| {
            status
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
        })
        .map(|t| t.exit_code)
}

/// Why the built-in trainer in this pod said its training diverged, if its main container
/// (now or before a restart) exited with `contract::EXIT_DIVERGED`: under `OnFailure` the
/// kubelet would otherwise restart it into the same divergence until the backoff limit.
pub fn diverged(pod: &Pod) -> Option<String> {
    let status = main_container_status(pod)?;
    let terminated = [&status.state, &status.last_state]
        .into_iter()
        .flatten()
        .filter_map(|s| s.terminated.as_ref())
        .find(|t| t.exit_code == i32::from(contract::EXIT_DIVERGED))?;
    let why = terminated
        .message
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .unwrap_or("training diverged (no termination message)");
    Some(format!("pod {}: {why}", pod.name_any()))
}

/// In-place restarts of all the pod's containers.
pub fn restart_count(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum())
}

/// When the main container last terminated before its restart, and with which code.
pub fn last_restart(pod: &Pod) -> Option<(Option<Timestamp>, Option<i32>)> {
    let status = main_container_status(pod)?;
    let last = status.last_state.as_ref()?.terminated.as_ref()?;
    Some((last.finished_at.as_ref().map(|t| t.0), Some(last.exit_code)))
}

/// A container waiting to be restarted after a crash (for example CrashLoopBackOff).
pub fn crash_looping(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|s| {
        let waiting = s.state.as_ref()?.waiting.as_ref()?;
        (s.restart_count > 0).then(|| waiting.reason.clone().unwrap_or_else(|| "waiting".into()))
    })
}

/// Why a Pending pod will not start by itself, if it will not.
pub fn stall_reason(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let waiting = status
        .container_statuses
        .iter()
        .chain(status.init_container_statuses.iter())
        .flatten()
        .find_map(|s| {
            let w = s.state.as_ref()?.waiting.as_ref()?;
            let reason = w.reason.as_deref()?;
            STALLED_REASONS.contains(&reason).then(|| match &w.message {
                Some(m) if !m.is_empty() => format!("{reason} ({m})"),
                _ => reason.to_string(),
            })
        });
    waiting.or_else(|| {
        status.conditions.iter().flatten().find_map(|c| {
            (c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable"))
            .then(|| match &c.message {
                Some(m) if !m.is_empty() => format!("Unschedulable ({m})"),
                _ => "Unschedulable".to_string(),
            })
        })
    })
}
