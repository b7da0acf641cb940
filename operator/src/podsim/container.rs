//! A container played by a process: how its exit reads as a container state, whether the
//! pod's restart policy restarts it, and how long the kubelet's crash-loop backoff waits.
//! Pure, so that `kubetrain local` and the test kubelet report exits and restart alike.

use std::process::ExitStatus;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// One finished run of a pod's main container.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    /// As a container runtime reports it: a signal N is 128 + N.
    pub exit_code: i32,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// `Completed`, `Error` or `StartError`.
    pub reason: &'static str,
    /// What it left at its termination-message path.
    pub message: Option<String>,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    /// Empty when the runner has none to give.
    pub container_id: String,
}

impl Exit {
    /// A process that ran and ended with `status` (an error waiting for it reads as a
    /// failed run, 128, with the error as its message).
    pub fn of(
        status: std::io::Result<ExitStatus>,
        message: Option<String>,
        started_at: Timestamp,
        finished_at: Timestamp,
    ) -> Self {
        use std::os::unix::process::ExitStatusExt as _;
        let (exit_code, signal, message) = match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => (code, None, message),
                (None, Some(sig)) => (128 + sig, Some(sig), message),
                (None, None) => (128, None, message),
            },
            Err(e) => (128, None, Some(format!("waiting for process: {e}"))),
        };
        Self {
            exit_code,
            signal,
            reason: if exit_code == 0 { "Completed" } else { "Error" },
            message,
            started_at,
            finished_at,
            container_id: String::new(),
        }
    }

    /// The terminated state a kubelet reports for this run.
    pub fn terminated_state(&self) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: self.exit_code,
                signal: self.signal,
                reason: Some(self.reason.to_string()),
                message: self.message.clone(),
                started_at: Some(Time(self.started_at)),
                finished_at: Some(Time(self.finished_at)),
                container_id: (!self.container_id.is_empty()).then(|| self.container_id.clone()),
            }),
            ..ContainerState::default()
        }
    }
}

/// Whether a pod with `restart_policy` (`Always` when unset, as the API server defaults
/// it) restarts its container after it exited with `exit_code`.
pub fn restarts(restart_policy: Option<&str>, exit_code: i32) -> bool {
    match restart_policy.unwrap_or("Always") {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// The crash-loop backoff before restart number `restart` (1 for the first): `first`,
/// doubled each time, at most `max`, as the kubelet's (10 s, doubling, 5 min) shortened.
pub fn backoff(restart: u32, first: Duration, max: Duration) -> Duration {
    let doublings = restart.saturating_sub(1).min(31);
    first.saturating_mul(1 << doublings).min(max)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn an_exit_reads_as_a_runtime_reports_it() {
        let exited = |raw| Exit::of(Ok(ExitStatus::from_raw(raw)), None, at(0), at(1));
        let clean = exited(0);
        assert_eq!(
            (clean.exit_code, clean.signal, clean.reason),
            (0, None, "Completed")
        );
        // A wait status: exit code 3 is 3 << 8; SIGKILL is 9.
        let failed = exited(3 << 8);
        assert_eq!(
            (failed.exit_code, failed.signal, failed.reason),
            (3, None, "Error")
        );
        let killed = exited(9);
        assert_eq!((killed.exit_code, killed.signal), (137, Some(9)));
        let lost = Exit::of(Err(std::io::Error::other("gone")), None, at(0), at(1));
        assert_eq!(lost.exit_code, 128);
        assert_eq!(lost.message.as_deref(), Some("waiting for process: gone"));
    }

    #[test]
    fn the_terminated_state_carries_code_signal_message_and_times() {
        let mut exit = Exit::of(
            Ok(ExitStatus::from_raw(15)),
            Some("last words".into()),
            at(2),
            at(7),
        );
        let state = exit.terminated_state().terminated.unwrap();
        assert_eq!((state.exit_code, state.signal), (143, Some(15)));
        assert_eq!(state.reason.as_deref(), Some("Error"));
        assert_eq!(state.message.as_deref(), Some("last words"));
        assert_eq!(state.started_at, Some(Time(at(2))));
        assert_eq!(state.finished_at, Some(Time(at(7))));
        assert_eq!(state.container_id, None);
        exit.container_id = "kubetrain-local://42".into();
        let state = exit.terminated_state().terminated.unwrap();
        assert_eq!(state.container_id.as_deref(), Some("kubetrain-local://42"));
    }

    #[test]
    fn restart_policies_restart_as_a_kubelet_does() {
        for (policy, code, restart) in [
            (None, 0, true),
            (Some("Always"), 0, true),
            (Some("Always"), 1, true),
            (Some("OnFailure"), 0, false),
            (Some("OnFailure"), 137, true),
            (Some("Never"), 1, false),
            (Some("Never"), 0, false),
        ] {
            assert_eq!(restarts(policy, code), restart, "{policy:?} {code}");
        }
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(10));
        let waits: Vec<u64> = (1..=6).map(|n| backoff(n, first, max).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert_eq!(backoff(u32::MAX, first, max), max);
        assert_eq!(backoff(0, first, max), first);
    }
}
