//! A pod's main container run as a local process, as a kubelet runs it: a process group of
//! its own, restarts in place as the pod's `restartPolicy` says after the crash-loop
//! backoff, SIGTERM then SIGKILL after the grace period when the pod is stopped, and every
//! change of state reported as the pod's status. `kubetrain local` and the test kubelet
//! both run pods through [`run`]; only where the status goes differs ([`StatusSink`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::PodStatus;
use k8s_openapi::jiff::Timestamp;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::container::{self, Exit};
use super::launch::Launch;
use super::pod_status::PodStatusWriter;
use super::process_group::{LiveGroups, Target, Watchdog};
use super::termination;

/// Environment passed through from the runner: enough to find programs and get useful
/// diagnostics, nothing that would make pods depend on the host.
const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "RUST_BACKTRACE",
    "RUST_LOG",
    "LLVM_PROFILE_FILE",
];

/// Why a pod's process is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The pod is gone: kill at once.
    Deleted,
    /// The pod is being deleted: SIGTERM, the grace period, then SIGKILL.
    Terminating,
}

/// Where a pod's status goes: the API's status subresource, or the local runner's memory.
pub trait StatusSink: Send {
    type Error: std::error::Error + Send + Sync + 'static;

    fn report(&mut self, status: PodStatus)
    -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// How a pod's run ended.
#[derive(Debug)]
pub enum Ended<E> {
    /// Its container exited and its restart policy does not restart it.
    Finished,
    /// It was stopped.
    Stopped(Stop),
    /// Its status could not be written (on a cluster: most likely the pod is gone). The
    /// process is killed.
    ReportFailed(E),
}

/// What stays the same across one pod's attempts.
#[derive(Debug, Clone)]
pub struct PodRun {
    pub uid: String,
    pub restart_policy: Option<String>,
    /// Stdout and stderr of every attempt, each after a `=== attempt N` line. The pod's
    /// working directory is next to it (`<log>.d`) and survives restarts, as a
    /// container's filesystem does.
    pub log: PathBuf,
    /// First restart delay; doubles per restart up to `max_restart_backoff`.
    pub restart_backoff: Duration,
    pub max_restart_backoff: Duration,
    /// Also copy the output to stderr, each line after this prefix (`kubetrain local
    /// --follow`).
    pub echo: Option<String>,
    pub groups: Arc<LiveGroups>,
}

/// Runs the pod until its container is done for good or `stop` says so. Dropping the
/// future kills the process group.
pub async fn run<S: StatusSink>(
    launch: &Launch,
    pod: &PodRun,
    writer: &mut PodStatusWriter,
    sink: &mut S,
    stop: &mut oneshot::Receiver<Stop>,
) -> Ended<S::Error> {
    let mut restarts: i32 = 0;
    loop {
        let exit = match run_once(launch, pod, restarts, writer, sink, stop).await {
            Attempt::Exited(exit) => exit,
            Attempt::Stopped(why) => return Ended::Stopped(why),
            Attempt::ReportFailed(err) => return Ended::ReportFailed(err),
        };
        if !container::restarts(pod.restart_policy.as_deref(), exit.exit_code) {
            return match sink.report(writer.finished(&exit, restarts)).await {
                Ok(()) => Ended::Finished,
                Err(err) => Ended::ReportFailed(err),
            };
        }
        restarts += 1;
        if let Err(err) = sink.report(writer.back_off(&exit, restarts)).await {
            return Ended::ReportFailed(err);
        }
        // The backoff is the restart policy itself, not synchronisation; a stop cuts it
        // short.
        tokio::select! {
            () = tokio::time::sleep(container::backoff(
                u32::try_from(restarts).unwrap_or(u32::MAX),
                pod.restart_backoff,
                pod.max_restart_backoff,
            )) => {}
            why = &mut *stop => return Ended::Stopped(why.unwrap_or(Stop::Deleted)),
        }
    }
}

enum Attempt<E> {
    Exited(Exit),
    Stopped(Stop),
    ReportFailed(E),
}

async fn run_once<S: StatusSink>(
    launch: &Launch,
    pod: &PodRun,
    attempt: i32,
    writer: &mut PodStatusWriter,
    sink: &mut S,
    stop: &mut oneshot::Receiver<Stop>,
) -> Attempt<S::Error> {
    let started_at = Timestamp::now();
    // Every container start gets an empty termination-message file, as with a kubelet.
    termination::clear(&launch.termination_log);
    let Spawned {
        mut child,
        group,
        echoes,
    } = match spawn(launch, pod, attempt) {
        Ok(spawned) => spawned,
        // Like a container runtime's StartError: counts as a failed run.
        Err(message) => {
            return Attempt::Exited(Exit {
                exit_code: 128,
                signal: None,
                reason: "StartError",
                message: Some(message),
                started_at,
                finished_at: Timestamp::now(),
                container_id: String::new(),
            });
        }
    };
    let container_id = format!("kubetrain-local://{}", group.pgid);
    if let Err(err) = sink
        .report(writer.running(started_at, &container_id, attempt))
        .await
    {
        drop(group);
        let _ = child.wait().await;
        futures::future::join_all(echoes).await;
        return Attempt::ReportFailed(err);
    }

    let status: io::Result<ExitStatus> = tokio::select! {
        status = child.wait() => status,
        why = &mut *stop => {
            let why = why.unwrap_or(Stop::Deleted);
            if why == Stop::Terminating {
                // A stopped pod's program hears SIGTERM and has its grace period to end
                // (a PS writes its final checkpoint); the group is killed after that.
                Target::Group(group.pgid).terminate();
                let _ = tokio::time::timeout(launch.grace, child.wait()).await;
            }
            drop(group);
            let _ = child.wait().await;
            futures::future::join_all(echoes).await;
            return Attempt::Stopped(why);
        }
    };
    // The main process is gone; anything it left in its group goes too, as when a
    // container's cgroup is torn down.
    drop(group);
    // The group is dead, so its pipes are closed and the copies end.
    futures::future::join_all(echoes).await;
    let message = termination::read(&launch.termination_log);
    Attempt::Exited(Exit {
        container_id,
        ..Exit::of(status, message, started_at, Timestamp::now())
    })
}

/// Kills the group on every way out of an attempt, a panic or an aborted task included.
struct GroupGuard {
    pgid: u32,
    uid: String,
    watchdog: Option<Watchdog>,
    groups: Arc<LiveGroups>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(w) = self.watchdog.take() {
            w.disarm();
        }
        Target::Group(self.pgid).kill_now();
        self.groups.remove(&self.uid, self.pgid);
    }
}

struct Spawned {
    child: Child,
    group: GroupGuard,
    /// The copies of its output to stderr, with `PodRun::echo`.
    echoes: Vec<JoinHandle<()>>,
}

fn spawn(launch: &Launch, pod: &PodRun, attempt: i32) -> Result<Spawned, String> {
    let workdir = pod.log.with_extension("d");
    fs::create_dir_all(&workdir).map_err(|e| format!("creating {}: {e}", workdir.display()))?;
    let mut log = open_log(&pod.log)?;
    let _ = writeln!(
        log,
        "=== attempt {attempt} (pod uid {}): {} {}",
        pod.uid,
        launch.program.display(),
        launch.args.join(" ")
    );
    let mut cmd = tokio::process::Command::new(&launch.program);
    cmd.args(&launch.args)
        .env_clear()
        .current_dir(&workdir)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    if pod.echo.is_some() {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    } else {
        let copy = || {
            log.try_clone()
                .map_err(|e| format!("opening {}: {e}", pod.log.display()))
        };
        cmd.stdout(copy()?).stderr(copy()?);
    }
    for var in INHERITED_ENV {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    cmd.envs(launch.env.iter().map(|(k, v)| (k, v)));
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", launch.program.display()))?;
    let pgid = child.id().ok_or("process exited before its PID was read")?;
    pod.groups.insert(&pod.uid, pgid);
    let mut guard = GroupGuard {
        pgid,
        uid: pod.uid.clone(),
        watchdog: None,
        groups: pod.groups.clone(),
    };
    guard.watchdog = Some(
        Watchdog::spawn(&[Target::Group(pgid)], None)
            .map_err(|e| format!("spawning watchdog: {e}"))?,
    );
    let mut echoes = Vec::new();
    if let Some(prefix) = &pod.echo {
        let log = Arc::new(Mutex::new(log));
        if let Some(out) = child.stdout.take() {
            echoes.push(tokio::spawn(echo(out, log.clone(), prefix.clone())));
        }
        if let Some(err) = child.stderr.take() {
            echoes.push(tokio::spawn(echo(err, log, prefix.clone())));
        }
    }
    Ok(Spawned {
        child,
        group: guard,
        echoes,
    })
}

fn open_log(path: &Path) -> Result<File, String> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))
}

/// Copies one output stream into the log and to stderr; ends when the group's last
/// writer is gone.
async fn echo<R: tokio::io::AsyncRead + Unpin>(stream: R, log: Arc<Mutex<File>>, prefix: String) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("{prefix}{line}");
        if let Ok(mut file) = log.lock() {
            let _ = writeln!(file, "{line}");
        }
    }
}

#[cfg(test)]
mod tests;
