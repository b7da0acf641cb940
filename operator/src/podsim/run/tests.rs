//! Real processes (`sh`), a sink that hands every status to the test.

use std::convert::Infallible;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use tokio::sync::mpsc;

use super::*;

struct Statuses(mpsc::UnboundedSender<PodStatus>);

impl StatusSink for Statuses {
    type Error = Infallible;

    async fn report(&mut self, status: PodStatus) -> Result<(), Infallible> {
        let _ = self.0.send(status);
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    pod: PodRun,
}

fn fixture(restart_policy: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let pod = PodRun {
        uid: "u-1".into(),
        restart_policy: Some(restart_policy.into()),
        log: dir.path().join("ml/job-worker-0.log"),
        restart_backoff: Duration::from_millis(10),
        max_restart_backoff: Duration::from_millis(10),
        echo: None,
        groups: Arc::new(LiveGroups::default()),
    };
    Fixture { dir, pod }
}

fn shell(script: &str, f: &Fixture) -> Launch {
    Launch {
        program: "sh".into(),
        args: vec!["-c".into(), script.into()],
        env: vec![(
            "TERMINATION_LOG".into(),
            f.dir.path().join("termination-log").display().to_string(),
        )],
        termination_log: f.dir.path().join("termination-log"),
        grace: Duration::from_secs(30),
    }
}

fn writer() -> PodStatusWriter {
    let pod = Pod {
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "trainer".into(),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    PodStatusWriter::new(
        &pod,
        std::net::Ipv4Addr::LOCALHOST,
        std::net::Ipv4Addr::LOCALHOST,
    )
}

/// Runs `launch` to its end with no stop, returning how it ended and every status.
async fn run_to_end(launch: &Launch, pod: &PodRun) -> (Ended<Infallible>, Vec<PodStatus>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (_keep, mut stop) = oneshot::channel();
    let ended = run(launch, pod, &mut writer(), &mut Statuses(tx), &mut stop).await;
    let mut statuses = Vec::new();
    while let Ok(s) = rx.try_recv() {
        statuses.push(s);
    }
    (ended, statuses)
}

fn summary(status: &PodStatus) -> (String, i32, String) {
    let c = &status.container_statuses.as_ref().unwrap()[0];
    let state = c.state.as_ref().unwrap();
    let state = match (&state.running, &state.waiting, &state.terminated) {
        (Some(_), _, _) => "running".to_string(),
        (_, Some(w), _) => w.reason.clone().unwrap_or_default(),
        (_, _, Some(t)) => format!("exited {}", t.exit_code),
        _ => String::new(),
    };
    (
        status.phase.clone().unwrap_or_default(),
        c.restart_count,
        state,
    )
}

#[tokio::test]
async fn a_crash_restarts_in_place_until_the_container_succeeds() {
    let f = fixture("OnFailure");
    // The working directory survives the restart, so the second attempt finds the mark.
    let launch = shell(
        "echo attempt-output; if [ -f tried ]; then exit 0; fi; touch tried; \
         echo 'out of memory' > \"$TERMINATION_LOG\"; exit 3",
        &f,
    );
    let (ended, statuses) = run_to_end(&launch, &f.pod).await;
    assert!(matches!(ended, Ended::Finished));
    let seen: Vec<_> = statuses.iter().map(summary).collect();
    let expect = |p: &str, r: i32, s: &str| (p.to_string(), r, s.to_string());
    assert_eq!(
        seen,
        vec![
            expect("Running", 0, "running"),
            expect("Running", 1, "CrashLoopBackOff"),
            expect("Running", 1, "running"),
            expect("Succeeded", 1, "exited 0"),
        ]
    );
    let last = statuses[3].container_statuses.as_ref().unwrap()[0]
        .last_state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(
        (last.exit_code, last.message.as_deref()),
        (3, Some("out of memory"))
    );
    let log = fs::read_to_string(&f.pod.log).unwrap();
    assert_eq!(
        log.lines().filter(|l| *l == "attempt-output").count(),
        2,
        "{log}"
    );
    assert!(log.contains("=== attempt 1 (pod uid u-1): sh -c"), "{log}");
    assert!(f.pod.groups.pgids().is_empty());
}

#[tokio::test]
async fn a_program_that_cannot_start_is_a_start_error() {
    let f = fixture("Never");
    let launch = Launch {
        program: f.dir.path().join("no-such-program"),
        ..shell("", &f)
    };
    let (ended, statuses) = run_to_end(&launch, &f.pod).await;
    assert!(matches!(ended, Ended::Finished));
    let terminated = statuses
        .last()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(terminated.exit_code, 128);
    assert_eq!(terminated.reason.as_deref(), Some("StartError"));
    assert!(terminated.message.unwrap().contains("no-such-program"));
}

#[tokio::test]
async fn echoed_output_still_reaches_the_log() {
    let mut f = fixture("Never");
    f.pod.echo = Some("[worker-0] ".into());
    let launch = shell("echo to-stdout; echo to-stderr >&2", &f);
    let (ended, _) = run_to_end(&launch, &f.pod).await;
    assert!(matches!(ended, Ended::Finished));
    let log = fs::read_to_string(&f.pod.log).unwrap();
    assert!(
        log.contains("to-stdout\n") && log.contains("to-stderr\n"),
        "{log}"
    );
}

/// A program that says when its SIGTERM handler is in place by writing its PID (its
/// group's id) to a FIFO the test reads (a blocking open and read: no polling), and
/// records a SIGTERM in `termed`.
fn terminable(f: &Fixture) -> (Launch, PathBuf) {
    let fifo = f.dir.path().join("ready");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(status.success());
    let script = format!(
        "trap 'echo term > termed; exit 0' TERM; echo $$ > '{}'; \
         while :; do sleep 1 & wait $!; done",
        fifo.display()
    );
    (shell(&script, f), fifo)
}

async fn stopped_by(why: Stop) -> (Fixture, Ended<Infallible>, u32) {
    let f = fixture("Always");
    let (launch, fifo) = terminable(&f);
    let (tx, _rx) = mpsc::unbounded_channel();
    let (stop_tx, mut stop) = oneshot::channel();
    let pod = f.pod.clone();
    let task = tokio::spawn(async move {
        run(&launch, &pod, &mut writer(), &mut Statuses(tx), &mut stop).await
    });
    let ready = tokio::task::spawn_blocking(move || fs::read_to_string(fifo))
        .await
        .unwrap()
        .unwrap();
    let pgid: u32 = ready.trim().parse().expect("the shell's PID");
    assert_eq!(f.pod.groups.pgids(), vec![pgid]);
    stop_tx.send(why).unwrap();
    let ended = task.await.unwrap();
    (f, ended, pgid)
}

#[tokio::test]
async fn a_terminating_pod_hears_sigterm_before_its_group_is_killed() {
    let (f, ended, pgid) = stopped_by(Stop::Terminating).await;
    assert!(matches!(ended, Ended::Stopped(Stop::Terminating)));
    let workdir = f.pod.log.with_extension("d");
    assert_eq!(
        fs::read_to_string(workdir.join("termed")).unwrap(),
        "term\n"
    );
    assert!(!f.pod.groups.pgids().contains(&pgid));
}

#[tokio::test]
async fn a_deleted_pod_is_killed_without_a_grace_period() {
    let (f, ended, pgid) = stopped_by(Stop::Deleted).await;
    assert!(matches!(ended, Ended::Stopped(Stop::Deleted)));
    assert!(!f.pod.log.with_extension("d").join("termed").exists());
    assert!(!f.pod.groups.pgids().contains(&pgid));
}
