//! What `kubetrain local` shows: a live view while the job runs and a report at its end,
//! both from `status` as the operator would write it, and the chief's curves.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kube::ResourceExt;
use kubetrain_api::TrainingJob;
use kubetrain_api::contract::Role;
use kubetrain_trainer::tensorboard;

use crate::curves;
use crate::replica;

/// The live view: the chief's epochs as a bar and a summary line, or plain periodic lines,
/// all from `status.progress` as the operator would write it.
pub(super) struct View {
    multi: Option<MultiProgress>,
    epochs: Option<ProgressBar>,
    summary: Option<ProgressBar>,
    last_line: Mutex<Instant>,
}

impl View {
    pub(super) fn new(job: &TrainingJob, bars: bool) -> Self {
        use std::io::IsTerminal;
        if !(bars && std::io::stderr().is_terminal()) {
            return Self {
                multi: None,
                epochs: None,
                summary: None,
                last_line: Mutex::new(Instant::now()),
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style =
            ProgressStyle::with_template("{prefix:>10} {bar:30.cyan/blue} {pos:>6}/{len:6} {msg}")
                .expect("valid template")
                .progress_chars("=> ");
        let total = job.spec.training.as_ref().map_or(0, |t| t.epochs);
        let epochs = multi.add(ProgressBar::new(u64::from(total).max(1)).with_style(style));
        epochs.set_prefix("epochs");
        let summary = multi.add(ProgressBar::new_spinner());
        Self {
            multi: Some(multi),
            epochs: Some(epochs),
            summary: Some(summary),
            last_line: Mutex::new(Instant::now()),
        }
    }

    pub(super) fn line(&self, text: String) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    /// Redraws the view from the job's status and how many pods of a role run.
    pub(super) fn render(&self, job: &TrainingJob, running: impl Fn(Role) -> usize) {
        let status = job.status.clone().unwrap_or_default();
        let state = status
            .lifecycle()
            .map_or("Pending".to_string(), |c| c.type_.clone());
        let progress = status.progress.unwrap_or_default();
        let roles = Role::ALL
            .into_iter()
            .filter(|role| replica::replicas(job, *role) > 0)
            .map(|role| {
                let running = running(role);
                let restarts = status.replica_statuses.role(role).map_or(0, |r| r.restarts);
                format!(
                    "{role} {running}/{} running, {restarts} restarts",
                    replica::replicas(job, role)
                )
            })
            .collect::<Vec<_>>()
            .join(" | ");
        let metrics = format!(
            "loss {} | accuracy {} | {} samples/s",
            progress.loss.map_or("-".into(), |l| format!("{l:.4}")),
            progress.accuracy.map_or("-".into(), |a| format!("{a:.4}")),
            progress
                .samples_per_second
                .map_or("-".into(), |s| format!("{s:.0}")),
        );
        if let Some(summary) = &self.summary {
            if let Some(bar) = &self.epochs {
                bar.set_position(u64::try_from(progress.epoch).unwrap_or(0));
                bar.set_message(format!("step {}", progress.step));
            }
            summary.set_message(format!("{state} | {metrics} | {roles}"));
            summary.tick();
        } else {
            let mut last = self.last_line.lock().expect("view lock");
            if last.elapsed() >= Duration::from_secs(5) {
                *last = Instant::now();
                eprintln!(
                    "[{state}] step {} epoch {} | {metrics} | {roles}",
                    progress.step, progress.epoch
                );
            }
        }
    }

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.epochs {
            bar.abandon();
        }
        if let Some(summary) = &self.summary {
            summary.abandon();
        }
    }
}

/// `ps 0, workers 1`, plus the chief and the evaluator when the job has them.
fn restarts_by_role(job: &TrainingJob, status: &kubetrain_api::TrainingJobStatus) -> String {
    Role::ALL
        .into_iter()
        .filter(|role| {
            *role == Role::Ps || *role == Role::Worker || replica::replicas(job, *role) > 0
        })
        .map(|role| {
            let restarts = status.replica_statuses.role(role).map_or(0, |r| r.restarts);
            let name = if role == Role::Worker {
                "workers"
            } else {
                role.as_str()
            };
            format!("{name} {restarts}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The loss sparkline, `curves.png` and the TensorBoard command, from the chief's event
/// log under `spec.training.logDir`: the same numbers TensorBoard shows.
fn picture_rows(job: &TrainingJob, run_dir: &Path) -> Vec<(&'static str, String)> {
    let Some(log_dir) = job.spec.training.as_ref().and_then(|t| t.log_dir.as_ref()) else {
        return Vec::new();
    };
    let mut rows = vec![("tensorboard", format!("tensorboard --logdir {log_dir}"))];
    let chief = tensorboard::run_dir(Path::new(log_dir), Role::Worker, 0);
    let scalars = match tensorboard::read_scalars(&chief) {
        Ok(scalars) => scalars,
        Err(error) => {
            rows.push(("curves", format!("none: {error}")));
            return rows;
        }
    };
    let curve = |tag: &str| scalars.get(tag).cloned().unwrap_or_default();
    let (loss, accuracy) = (curve("train/loss"), curve("test/accuracy"));
    if loss.is_empty() {
        rows.push(("curves", "none: the chief logged no training step".into()));
        return rows;
    }
    let values: Vec<f32> = loss.iter().map(|&(_, v)| v).collect();
    rows.push(("loss curve", curves::sparkline(&values, 40)));
    let png = run_dir.join("curves.png");
    let drawn = curves::draw(&png, &job.name_any(), &loss, &accuracy);
    rows.push((
        "curves",
        drawn.map_or_else(|e| format!("none: {e}"), |()| png.display().to_string()),
    ));
    rows
}

/// The table printed at the end of a run.
pub(super) fn report(job: &TrainingJob, wall: Duration, run_dir: &Path) -> String {
    let status = job.status.clone().unwrap_or_default();
    let state = status
        .lifecycle()
        .map(|c| format!("{} ({}): {}", c.type_, c.reason, c.message))
        .unwrap_or_else(|| "unknown".into());
    let progress = status.progress.clone().unwrap_or_default();
    let accuracy = progress.accuracy;
    let checkpoints = job
        .spec
        .training
        .as_ref()
        .and_then(|t| t.checkpoint.as_ref())
        .map_or("none (no spec.training.checkpoint)".to_string(), |c| {
            c.path.clone()
        });
    let rows = [
        ("state", state),
        (
            "test accuracy",
            accuracy.map_or("-".into(), |a| format!("{a:.4}")),
        ),
        (
            "loss",
            progress.loss.map_or("-".into(), |l| format!("{l:.4}")),
        ),
        ("steps", progress.step.to_string()),
        ("wall time", format!("{:.1}s", wall.as_secs_f64())),
        (
            "samples/s",
            progress
                .samples_per_second
                .map_or("-".into(), |s| format!("{s:.0}")),
        ),
        ("restarts", restarts_by_role(job, &status)),
        ("logs", run_dir.display().to_string()),
        ("checkpoints", checkpoints),
    ]
    .into_iter()
    .chain(picture_rows(job, run_dir))
    .collect::<Vec<_>>();
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!("\n{} {}\n", job.name_any(), "report");
    for (key, value) in rows {
        out.push_str(&format!("  {key:<width$}  {value}\n"));
    }
    out
}
