//! The pod status a kubelet writes for one main container: phase, conditions, the
//! container's state and its last run. Pure, so that the test kubelet (which patches it
//! into the API) and `kubetrain local` (which hands it to `decide`) write the same status.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateWaiting, ContainerStatus, HostIP, Pod,
    PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::container::Exit;
use super::launch;

/// A time as an API server keeps it: whole seconds.
pub fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// One pod's status as its kubelet knows it, moved along by the container's life.
#[derive(Debug, Clone)]
pub struct PodStatusWriter {
    container: String,
    image: String,
    pod_ip: Ipv4Addr,
    host_ip: Ipv4Addr,
    start_time: Option<Timestamp>,
    last_state: Option<ContainerState>,
}

impl PodStatusWriter {
    pub fn new(pod: &Pod, pod_ip: Ipv4Addr, host_ip: Ipv4Addr) -> Self {
        let container = launch::main_container(pod);
        Self {
            container: container.map(|c| c.name.clone()).unwrap_or_default(),
            image: container.and_then(|c| c.image.clone()).unwrap_or_default(),
            pod_ip,
            host_ip,
            start_time: pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0),
            last_state: None,
        }
    }

    /// The container runs (attempt `restarts`, counted from 0).
    pub fn running(
        &mut self,
        started_at: Timestamp,
        container_id: &str,
        restarts: i32,
    ) -> PodStatus {
        let state = ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(whole_seconds(started_at))),
            }),
            ..ContainerState::default()
        };
        self.status("Running", true, state, container_id, restarts, None)
    }

    /// The container exited and waits out the crash-loop backoff before restart `restarts`.
    pub fn back_off(&mut self, exit: &Exit, restarts: i32) -> PodStatus {
        let waiting = ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("CrashLoopBackOff".to_string()),
                message: Some(format!(
                    "back-off restarting failed container {}",
                    self.container
                )),
            }),
            ..ContainerState::default()
        };
        self.last_state = Some(terminated(exit));
        self.status(
            "Running",
            false,
            waiting,
            &exit.container_id,
            restarts,
            None,
        )
    }

    /// The container exited and its restart policy does not restart it: the pod is done.
    pub fn finished(&mut self, exit: &Exit, restarts: i32) -> PodStatus {
        let phase = if exit.exit_code == 0 {
            "Succeeded"
        } else {
            "Failed"
        };
        self.status(
            phase,
            false,
            terminated(exit),
            &exit.container_id,
            restarts,
            None,
        )
    }

    /// The container cannot be created from the pod's spec; a kubelet keeps the pod Pending.
    pub fn config_error(&mut self, message: &str) -> PodStatus {
        let waiting = ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("CreateContainerConfigError".to_string()),
                message: Some(message.to_string()),
            }),
            ..ContainerState::default()
        };
        self.status("Pending", false, waiting, "", 0, Some(message))
    }

    fn status(
        &mut self,
        phase: &str,
        ready: bool,
        state: ContainerState,
        container_id: &str,
        restarts: i32,
        message: Option<&str>,
    ) -> PodStatus {
        let now = Time(whole_seconds(Timestamp::now()));
        let start = *self
            .start_time
            .get_or_insert_with(|| whole_seconds(Timestamp::now()));
        let condition = |type_: &str, status: bool, reason: Option<&str>| PodCondition {
            type_: type_.to_string(),
            status: if status { "True" } else { "False" }.to_string(),
            reason: reason.map(str::to_string),
            last_transition_time: Some(now.clone()),
            ..PodCondition::default()
        };
        let not_ready_reason = match phase {
            "Succeeded" | "Failed" => Some("PodCompleted"),
            _ if ready => None,
            _ => Some("ContainersNotReady"),
        };
        let started = state.running.is_some();
        PodStatus {
            phase: Some(phase.to_string()),
            message: message.map(str::to_string),
            pod_ip: Some(self.pod_ip.to_string()),
            pod_ips: Some(vec![PodIP {
                ip: self.pod_ip.to_string(),
            }]),
            host_ip: Some(self.host_ip.to_string()),
            host_ips: Some(vec![HostIP {
                ip: self.host_ip.to_string(),
            }]),
            start_time: Some(Time(start)),
            conditions: Some(vec![
                condition("PodScheduled", true, None),
                condition("Initialized", true, None),
                condition("ContainersReady", ready, not_ready_reason),
                condition("Ready", ready, not_ready_reason),
            ]),
            container_statuses: Some(vec![ContainerStatus {
                name: self.container.clone(),
                image: self.image.clone(),
                image_id: String::new(),
                container_id: (!container_id.is_empty()).then(|| container_id.to_string()),
                ready,
                started: Some(started),
                restart_count: restarts,
                state: Some(state),
                last_state: self.last_state.clone(),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        }
    }
}

/// An exit's terminated state, in the API server's whole seconds.
fn terminated(exit: &Exit) -> ContainerState {
    Exit {
        started_at: whole_seconds(exit.started_at),
        finished_at: whole_seconds(exit.finished_at),
        ..exit.clone()
    }
    .terminated_state()
}

#[cfg(test)]
mod tests;
