//! The lines a run prints on stdout for people: one function per kind of line, so each
//! format is written once for the data-parallel worker, the pipeline stage and the PS.
//!
//! They are logs, not an interface: the operator and `kubetrain local` read progress from
//! the chief's `Progress` service and its termination message. trainer-bench and the
//! trainer's own tests read the `final` and `finished` lines back.

use std::fmt::Debug;

/// The chief evaluated the test set after `epoch` epochs (`step` steps).
pub fn epoch_done(epoch: u64, step: u64, accuracy: f64, loss: f64) {
    println!(
        "kubetrain-trainer: epoch {epoch} done step={step} test_accuracy={accuracy:.4} test_loss={loss:.4}"
    );
}

/// A worker's (or the first stage's) progress, every few seconds.
pub fn training(worker: usize, step: u64, total: u64, epoch: u64, loss: f64, rate: f64) {
    println!(
        "kubetrain-trainer: worker {worker} step={step}/{total} epoch={epoch} loss={loss:.4} samples_per_second={rate:.1}"
    );
}

/// The chief's result once training is over; `timing` adds the worker's per-step split.
pub fn final_result(
    accuracy: f64,
    test_loss: f64,
    loss: f64,
    steps: u64,
    rate: f64,
    timing: Option<&str>,
) {
    let timing = timing.map_or(String::new(), |t| format!(" {t}"));
    println!(
        "kubetrain-trainer: final test_accuracy={accuracy:.4} test_loss={test_loss:.4} loss={loss:.4} steps={steps} samples_per_second={rate:.1}{timing}"
    );
}

/// A worker other than the chief is done.
pub fn worker_finished(worker: usize, steps: u64, loss: f64, rate: f64, timing: &str) {
    println!(
        "kubetrain-trainer: worker {worker} finished steps={steps} loss={loss:.4} samples_per_second={rate:.1} {timing}"
    );
}

/// How the first stage cut the model into stages.
pub fn pipeline_partition(described: &str) {
    println!("kubetrain-trainer: pipeline partition {described}");
}

/// A pipeline stage is done, with its measured busy time (pipeline-bench reads it).
pub fn stage_finished(stage: usize, steps: u64, busy: f64, window: f64, idle: f64, peak: usize) {
    println!(
        "kubetrain-trainer: stage {stage} finished steps={steps} busy_seconds={busy:.4} window_seconds={window:.4} idle_fraction={idle:.4} peak_stash={peak}"
    );
}

/// A PS's staleness histogram (versions behind: updates) as it shuts down.
pub fn ps_staleness(ps: usize, histogram: &impl Debug) {
    println!("kubetrain-trainer: ps {ps} staleness {histogram:?}");
}

/// A PS shuts down.
pub fn ps_shutdown(ps: usize, version: u64, reason: &str) {
    println!("kubetrain-trainer: ps {ps} shutting down at version {version}: {reason}");
}
