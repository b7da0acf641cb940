use k8s_openapi::api::core::v1::{Container, PodSpec};

use super::*;

fn writer() -> PodStatusWriter {
    let pod = Pod {
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "trainer".into(),
                image: Some("kubetrain:dev".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    PodStatusWriter::new(&pod, Ipv4Addr::new(127, 0, 3, 1), Ipv4Addr::LOCALHOST)
}

fn exit(code: i32) -> Exit {
    let at = Timestamp::from_millisecond(1_700_000_000_123).unwrap();
    Exit {
        exit_code: code,
        signal: None,
        reason: if code == 0 { "Completed" } else { "Error" },
        message: Some("bye".into()),
        started_at: at,
        finished_at: at,
        container_id: "kubetrain-local://42".into(),
    }
}

fn condition(status: &PodStatus, type_: &str) -> (String, Option<String>) {
    let c = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone())
}

fn container(status: &PodStatus) -> &ContainerStatus {
    &status.container_statuses.as_ref().unwrap()[0]
}

#[test]
fn a_running_container_is_ready_with_the_pod_addresses() {
    let status = writer().running(Timestamp::now(), "kubetrain-local://7", 0);
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("127.0.3.1"));
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(condition(&status, "Ready"), ("True".into(), None));
    assert_eq!(condition(&status, "PodScheduled").0, "True");
    let c = container(&status);
    assert_eq!(
        (c.name.as_str(), c.image.as_str()),
        ("trainer", "kubetrain:dev")
    );
    assert!(c.ready && c.started == Some(true));
    assert_eq!(c.container_id.as_deref(), Some("kubetrain-local://7"));
    assert!(c.state.as_ref().unwrap().running.is_some());
}

#[test]
fn a_crash_backs_off_with_the_run_as_last_state_then_runs_again_keeping_it() {
    let mut w = writer();
    let backing_off = w.back_off(&exit(3), 1);
    assert_eq!(backing_off.phase.as_deref(), Some("Running"));
    assert_eq!(
        condition(&backing_off, "Ready"),
        ("False".into(), Some("ContainersNotReady".into()))
    );
    let c = container(&backing_off);
    assert_eq!(c.restart_count, 1);
    let waiting = c.state.as_ref().unwrap().waiting.as_ref().unwrap();
    assert_eq!(waiting.reason.as_deref(), Some("CrashLoopBackOff"));
    let last = c.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!((last.exit_code, last.message.as_deref()), (3, Some("bye")));
    // The API server's whole seconds.
    assert_eq!(
        last.started_at.as_ref().unwrap().0,
        Timestamp::from_second(1_700_000_000).unwrap()
    );

    let again = w.running(Timestamp::now(), "kubetrain-local://43", 1);
    let c = container(&again);
    assert_eq!(c.restart_count, 1);
    assert_eq!(
        c.last_state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .exit_code,
        3
    );
}

#[test]
fn an_exit_without_restart_ends_the_pod_by_its_code() {
    for (code, phase) in [(0, "Succeeded"), (1, "Failed")] {
        let status = writer().finished(&exit(code), 0);
        assert_eq!(status.phase.as_deref(), Some(phase));
        assert_eq!(
            condition(&status, "Ready"),
            ("False".into(), Some("PodCompleted".into()))
        );
        let terminated = container(&status)
            .state
            .clone()
            .unwrap()
            .terminated
            .unwrap();
        assert_eq!(terminated.exit_code, code);
    }
}

#[test]
fn a_config_error_keeps_the_pod_pending_and_says_why() {
    let status = writer().config_error("env var X: fieldRef spec.foo is not supported");
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert_eq!(
        status.message.as_deref(),
        Some("env var X: fieldRef spec.foo is not supported")
    );
    let waiting = container(&status).state.clone().unwrap().waiting.unwrap();
    assert_eq!(
        waiting.reason.as_deref(),
        Some("CreateContainerConfigError")
    );
}

#[test]
fn the_start_time_is_fixed_at_the_first_status() {
    let mut w = writer();
    let first = w.config_error("x").start_time;
    assert!(first.is_some());
    assert_eq!(w.running(Timestamp::now(), "", 0).start_time, first);
}
