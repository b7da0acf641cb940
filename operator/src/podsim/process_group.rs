//! Process hygiene for what a runner spawns: the pods of `kubetrain local` and the test
//! kubelet, and the test harness's API server and Prometheus.
//!
//! Two guarantees, both without `unsafe` (the workspace forbids it, so
//! `prctl(PR_SET_PDEATHSIG)` in a `pre_exec` hook is not available):
//!
//! * **Drop kills.** Owners kill what they spawned in `Drop` (also during a
//!   panic unwind) and reap it, so a finished test leaves nothing behind.
//! * **Death of the runner kills.** Statics are never dropped and a
//!   `SIGKILL`ed runner (a test binary, `kubetrain local`) runs no destructors, so each spawned process gets a
//!   [`Watchdog`]: a tiny `sh` that blocks reading a pipe whose only write end
//!   lives in this process. When this process exits for any reason the kernel
//!   closes that end, `read` returns, and the watchdog kills its targets. No
//!   polling: the wake-up is the EOF itself.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// What a [`Watchdog`] kills when the runner goes away.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// A single process.
    Process(u32),
    /// A whole process group (every simulated pod's process runs in a group of its
    /// own, so `sh -c '... &'` grandchildren die too).
    Group(u32),
}

impl Target {
    fn as_kill_arg(self) -> String {
        match self {
            Target::Process(pid) => pid.to_string(),
            // `kill -KILL -PGID` signals the group.
            Target::Group(pgid) => format!("-{pgid}"),
        }
    }

    /// Sends SIGKILL now. "No such process" is fine: it is already gone.
    pub fn kill_now(self) {
        self.signal(Signal::SIGKILL);
    }

    /// Sends SIGTERM, as a kubelet does first when it stops a container.
    pub fn terminate(self) {
        self.signal(Signal::SIGTERM);
    }

    fn signal(self, signal: Signal) {
        let result = match self {
            Target::Process(pid) => kill(to_pid(pid), signal),
            Target::Group(pgid) => killpg(to_pid(pgid), signal),
        };
        if let Err(err) = result
            && err != nix::errno::Errno::ESRCH
        {
            tracing::warn!(?self, %err, "kill failed");
        }
    }
}

fn to_pid(id: u32) -> Pid {
    // PIDs fit in i32 on Linux (pid_max <= 2^22).
    Pid::from_raw(i32::try_from(id).unwrap_or(i32::MAX))
}

/// Kills [`Target`]s (and optionally removes a directory) once this process is
/// gone. Disarm it with [`Watchdog::disarm`] (or drop it) *before* killing the
/// targets yourself, so it never signals a PID that may have been reused.
#[derive(Debug)]
pub struct Watchdog {
    child: Child,
    // Held only so the pipe's write end stays open while we live.
    pipe: Option<ChildStdin>,
}

impl Watchdog {
    /// Spawns the watchdog. `remove_dir` is deleted after the kill, for scratch
    /// directories of statics that are never dropped.
    pub fn spawn(targets: &[Target], remove_dir: Option<&Path>) -> io::Result<Self> {
        let mut cmd = Command::new("sh");
        // "$1" is the directory (may be empty); the rest are kill arguments.
        cmd.arg("-c")
            .arg(
                // dash's `kill` rejects `--`; `-PGID` after the signal is still
                // read as a process group. One target per call, so one that is
                // already gone does not spare the others.
                r#"read -r _ignored || true
dir=$1; shift
for target in "$@"; do kill -KILL "$target" 2>/dev/null; done
if [ -n "$dir" ]; then rm -rf -- "$dir"; fi"#,
            )
            .arg("kubetrain-watchdog")
            .arg(
                remove_dir
                    .map(|d| d.as_os_str().to_owned())
                    .unwrap_or_default(),
            );
        for t in targets {
            cmd.arg(t.as_kill_arg());
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: a Ctrl-C to the test run's foreground group must
            // not kill the watchdog before it has done its job.
            .process_group(0)
            .spawn()?;
        let pipe = child.stdin.take().expect("stdin was piped");
        Ok(Self {
            child,
            pipe: Some(pipe),
        })
    }

    /// Does what process exit would do: closes the pipe, so the watchdog kills
    /// its targets, and waits for it to finish.
    pub fn trigger(mut self) -> io::Result<()> {
        drop(self.pipe.take());
        self.child.wait().map(|_| ())
    }

    /// Stops the watchdog without it acting.
    pub fn disarm(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // SIGKILL: the shell is blocked in `read` and must not run the kill line.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The process groups a runner has live, by pod uid, so that its owner can kill them all
/// synchronously (the test kubelet's `Drop`, where no task gets to run again).
#[derive(Debug, Default)]
pub struct LiveGroups(std::sync::Mutex<std::collections::HashMap<String, u32>>);

impl LiveGroups {
    pub(crate) fn insert(&self, uid: &str, pgid: u32) {
        if let Ok(mut groups) = self.0.lock() {
            groups.insert(uid.to_string(), pgid);
        }
    }

    pub(crate) fn remove(&self, uid: &str, pgid: u32) {
        if let Ok(mut groups) = self.0.lock()
            && groups.get(uid) == Some(&pgid)
        {
            groups.remove(uid);
        }
    }

    /// The live groups' ids.
    pub fn pgids(&self) -> Vec<u32> {
        self.0
            .lock()
            .map(|g| g.values().copied().collect())
            .unwrap_or_default()
    }

    /// SIGKILLs every live group now.
    pub fn kill_all(&self) {
        for pgid in self.pgids() {
            Target::Group(pgid).kill_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_triggered_watchdog_kills_a_process_and_removes_its_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut victim = Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        let dog = Watchdog::spawn(&[Target::Process(victim.id())], Some(dir.path()))
            .expect("spawn watchdog");
        dog.trigger().expect("watchdog ran");
        assert_eq!(victim.wait().expect("wait").signal(), Some(9));
        assert!(!dir.path().exists());
    }

    #[test]
    fn a_triggered_watchdog_kills_a_whole_process_group() {
        // The grandchild `sleep` would survive a kill of the shell alone.
        let mut leader = Command::new("sh")
            .args(["-c", "sleep 600 & echo $!; wait"])
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn sh");
        let mut line = String::new();
        io::BufRead::read_line(
            &mut io::BufReader::new(leader.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("read grandchild pid");
        let grandchild = line.trim().to_string();
        let dog = Watchdog::spawn(&[Target::Group(leader.id())], None).expect("spawn watchdog");
        dog.trigger().expect("watchdog ran");
        assert_eq!(leader.wait().expect("wait").signal(), Some(9));
        // The grandchild is re-parented and reaped elsewhere; SIGKILL delivery
        // is asynchronous, so allow it a moment to become a zombie or vanish.
        let state = || {
            let stat =
                std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
            stat.rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next())
                .map(str::to_string)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while matches!(state().as_deref(), Some(s) if s != "Z" && s != "X")
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let last = state();
        assert!(
            matches!(last.as_deref(), None | Some("Z" | "X")),
            "grandchild state {last:?}"
        );
    }

    #[test]
    fn a_disarmed_watchdog_leaves_its_target_alone() {
        let mut victim = Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        let dog = Watchdog::spawn(&[Target::Process(victim.id())], None).expect("spawn watchdog");
        dog.disarm();
        assert!(victim.try_wait().expect("try_wait").is_none());
        victim.kill().expect("kill");
        victim.wait().expect("wait");
    }
}
