//! `kubetrain local` end to end: real trainer processes on loopback, driven by the same
//! plan and decide functions as the operator.

// `kubetrain local` exists only with the `local` feature (on by default).
#![cfg(feature = "local")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kubetrain_api::TrainingJob;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn kubetrain() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kubetrain"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run_local(manifest: &Path, run_dir: &Path) -> Output {
    kubetrain()
        .args(["local", "-o", "yaml", "--no-progress-bars", "-f"])
        .arg(manifest)
        .arg("--run-dir")
        .arg(run_dir)
        .output()
        .expect("kubetrain runs")
}

fn final_job(output: &Output) -> TrainingJob {
    serde_yaml::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "-o yaml is not a TrainingJob ({e}); stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn true_condition(job: &TrainingJob) -> String {
    job.status
        .as_ref()
        .and_then(|s| s.lifecycle())
        .map(|c| c.type_.clone())
        .unwrap_or_default()
}

#[test]
fn the_quickstart_succeeds_with_a_real_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_local(&repo().join("examples/quickstart.yaml"), dir.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kubetrain local failed:\n{stderr}");

    let printed: f64 = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("test accuracy"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no test accuracy in the report:\n{stderr}"));
    assert!(
        printed >= 0.9,
        "quickstart accuracy {printed} < 0.9\n{stderr}"
    );

    let job = final_job(&output);
    assert_eq!(true_condition(&job), "Succeeded");
    let status = job.status.unwrap();
    let progress = status.progress.expect("progress in status");
    assert!(
        (progress.accuracy.unwrap() - printed).abs() < 1e-3,
        "status and report agree"
    );
    assert_eq!(progress.epoch, 15);
    assert!(progress.step > 0);
    assert_eq!(status.replica_statuses.worker.succeeded, 2);
    assert!(status.start_time.is_some() && status.completion_time.is_some());
    let run = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .expect("a run directory")
        .unwrap()
        .path();
    for pod in [
        "quickstart-ps-0",
        "quickstart-worker-0",
        "quickstart-worker-1",
    ] {
        assert!(
            run.join(format!("{pod}.log")).is_file(),
            "log of {pod} in {}",
            run.display()
        );
    }

    // The picture of the run: the report names it, and it is a real, non-blank PNG.
    let png = run.join("curves.png");
    assert!(
        stderr.contains(&format!("curves         {}", png.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("tensorboard --logdir {}", run.display())),
        "{stderr}"
    );
    let sparkline = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("loss curve"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no loss sparkline in the report:\n{stderr}"));
    assert_eq!(sparkline.chars().count(), 40, "{sparkline}");
    assert!(
        sparkline.starts_with('█') && sparkline.ends_with('▁'),
        "a falling loss: {sparkline}"
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((frame.width, frame.height), (1200, 450));
    let pixels = &pixels[..frame.buffer_size()];
    let step = frame.color_type.samples();
    let inked = pixels
        .chunks(step)
        .filter(|p| p.iter().take(3).any(|&c| c < 200))
        .count();
    let total = pixels.len() / step;
    // Axes, labels and two curves ink a few percent of the picture; blank would be 0.
    assert!(
        inked * 100 > total && inked * 4 < total,
        "{inked} of {total} pixels inked"
    );
    let blue_curve = pixels
        .chunks(step)
        .filter(|p| p[2] > 200 && p[0] < 80 && p[1] < 80)
        .count();
    let red_curve = pixels
        .chunks(step)
        .filter(|p| p[0] > 200 && p[1] < 80 && p[2] < 80)
        .count();
    assert!(
        blue_curve > 300 && red_curve > 300,
        "loss {blue_curve} and accuracy {red_curve} curve pixels"
    );
}

#[test]
fn an_invalid_spec_exits_with_the_operators_invalid_spec_message() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(repo().join("examples/quickstart.yaml"))
        .unwrap()
        .replace(
            "    consistency: {kind: Sync}",
            "    consistency: {kind: Sync}\n    pipeline: {microBatches: 4}",
        );
    std::fs::write(&manifest, &text).unwrap();
    let output = run_local(&manifest, dir.path());
    assert_eq!(output.status.code(), Some(2));
    let job: TrainingJob = serde_yaml::from_str(&text).unwrap();
    // The operator's InvalidSpec condition message is exactly this text.
    let expected = format!("invalid spec: {}", job.spec.validate().unwrap_err());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&expected),
        "stderr {stderr:?} lacks {expected:?}"
    );
    assert!(stderr.contains("spec.training.pipeline"));

    std::fs::write(
        &manifest,
        "apiVersion: kubetrain.io/v1alpha1\nkind: TrainingJob\nspec: [",
    )
    .unwrap();
    let output = run_local(&manifest, dir.path());
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.yaml is not a valid TrainingJob"),
        "{stderr}"
    );
}

#[test]
fn a_misspelt_field_is_named_instead_of_silently_defaulted() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("typo.yaml");
    let text = std::fs::read_to_string(repo().join("examples/quickstart.yaml")).unwrap();
    assert!(
        text.contains("    batchSize:"),
        "the quickstart sets batchSize"
    );
    std::fs::write(&manifest, text.replace("    batchSize:", "    batchsize:")).unwrap();
    let output = run_local(&manifest, dir.path());
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "invalid spec: spec.training.batchsize (did you mean batchSize?): unknown field"
        ),
        "{stderr}"
    );
}

#[test]
fn a_diverging_run_fails_as_diverged_naming_the_step_without_a_crash_loop() {
    // The quickstart at a learning rate 1,000 times its own. Both workers restart in place
    // on failure (OnFailure), which without the Diverged rule would crash-loop up to the
    // backoff limit and end BackoffLimitExceeded.
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("diverges.yaml");
    let text = std::fs::read_to_string(repo().join("examples/quickstart.yaml")).unwrap();
    let text = text
        .replace("learningRate: 0.05", "learningRate: 50")
        .replace("restartPolicy: ExitCode", "restartPolicy: OnFailure");
    assert!(text.contains("learningRate: 50") && !text.contains("ExitCode"));
    std::fs::write(&manifest, text).unwrap();
    let output = run_local(&manifest, dir.path());
    assert_eq!(output.status.code(), Some(1));
    let job = final_job(&output);
    let failed = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.is_true()))
        .expect("a true condition")
        .clone();
    assert_eq!(
        (failed.type_.as_str(), failed.reason.as_str()),
        ("Failed", "Diverged")
    );
    let message = &failed.message;
    assert!(message.starts_with("pod quickstart-worker-"), "{message}");
    assert!(
        message.contains(": training diverged at step "),
        "{message}"
    );
    assert!(
        message.contains("spec.training.optimizer.learningRate"),
        "{message}"
    );
    let restarts = job
        .status
        .as_ref()
        .unwrap()
        .replica_statuses
        .worker
        .restarts;
    assert!(
        restarts <= 2,
        "at most one restart per worker, got {restarts}"
    );
}

/// A job long enough to act on while it runs.
fn long_job(dir: &Path, epochs: u32, worker_policy: &str) -> PathBuf {
    let manifest = dir.join("long.yaml");
    std::fs::write(
        &manifest,
        format!(
            r#"apiVersion: kubetrain.io/v1alpha1
kind: TrainingJob
metadata: {{name: long}}
spec:
  replicaSpecs:
    ps: {{replicas: 1}}
    worker: {{replicas: 2, restartPolicy: {worker_policy}}}
  training:
    model: {{kind: mlp, hidden: [32]}}
    dataset: {{builtin: digits}}
    optimizer: {{kind: sgd, learningRate: 0.05}}
    batchSize: 16
    epochs: {epochs}
    consistency: {{kind: Async}}
  runPolicy: {{backoffLimit: 5}}
"#
        ),
    )
    .unwrap();
    manifest
}

/// Direct children of `pid` that are pods' processes, from /proc: each pod's process also
/// has a watchdog (`kubetrain-watchdog`, see `podsim::process_group`), which is left out.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // The parent PID is the second field after the parenthesised command name.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        let watchdog = std::fs::read(format!("/proc/{child}/cmdline"))
            .is_ok_and(|c| c.split(|&b| b == 0).any(|arg| arg == b"kubetrain-watchdog"));
        if ppid.and_then(|p| p.parse::<u32>().ok()) == Some(pid) && !watchdog {
            out.push(child);
        }
    }
    out
}

fn env_of(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
        .unwrap_or_default()
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the process still runs (a zombie has exited; only its parent's wait is missing).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next())
                != Some('Z')
        })
        .unwrap_or(false)
}

#[test]
fn sigint_stops_every_process_within_five_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = long_job(dir.path(), 1000, "OnFailure");
    let mut runner = kubetrain()
        .args(["local", "--no-progress-bars", "-f"])
        .arg(&manifest)
        .arg("--run-dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = runner.id();
    let kids = wait_for("three trainer processes", Duration::from_secs(30), || {
        let kids = children(pid);
        (kids.len() == 3).then_some(kids)
    });

    let sent = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGINT).unwrap();
    let status = wait_for("the runner to exit", Duration::from_secs(5), || {
        runner.try_wait().unwrap()
    });
    assert!(sent.elapsed() <= Duration::from_secs(5));
    assert!(!status.success(), "an interrupted job is not a success");
    for kid in kids {
        assert!(!alive(kid), "trainer process {kid} outlived the runner");
    }
    // As a kubelet would, the runner sent SIGTERM first: the PS stopped on its own.
    let logs: String = walk(dir.path())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    assert!(logs.contains("stopping on SIGTERM"), "{logs}");
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn killing_a_worker_triggers_its_restart_policy() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = long_job(dir.path(), 60, "OnFailure");
    let runner = kubetrain()
        .args(["local", "-o", "yaml", "--no-progress-bars", "-f"])
        .arg(&manifest)
        .arg("--run-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = runner.id();
    let worker1 = wait_for("worker 1", Duration::from_secs(30), || {
        children(pid).into_iter().find(|&kid| {
            let env = env_of(kid);
            env.contains("KUBETRAIN_ROLE=worker") && env.contains("KUBETRAIN_INDEX=1")
        })
    });
    // Killed once it trains (registered with the PS), not while it is still starting.
    // Its log is in the run's own folder, `<run dir>/long-<time>/`.
    wait_for("worker 1 to register", Duration::from_secs(60), || {
        let log = walk(dir.path())
            .into_iter()
            .find(|p| p.file_name().is_some_and(|n| n == "long-worker-1.log"))?;
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.contains("registered").then_some(())
    });
    kill(Pid::from_raw(worker1 as i32), Signal::SIGKILL).unwrap();

    let output = runner.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let job = final_job(&output);
    let status = job.status.clone().unwrap();
    assert!(
        status.replica_statuses.worker.restarts >= 1,
        "the killed worker was restarted in place: {:?}\n{stderr}",
        status.replica_statuses
    );
    assert_eq!(true_condition(&job), "Succeeded", "{stderr}");
    assert!(output.status.success());
}
