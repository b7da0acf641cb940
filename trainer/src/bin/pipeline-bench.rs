//! Pipeline benchmark: each stage's idle fraction, from the busy time the stages
//! instrument themselves, next to GPipe's bound (K-1)/(M+K-1), and the peak number of
//! stashed activations, for K stages and M micro-batches, under both schedules.
//!
//! `cargo build --release -p kubetrain-trainer && target/release/pipeline-bench`
//! (runs the `kubetrain-trainer` binary next to this one, one process per stage).
//!
//! The model is an MLP of K x `--layers-per-stage` layers of `width x width` on a synthetic
//! CSV, built so that the FLOP-balanced partition can give every stage the same work: the
//! condition GPipe's bound assumes. The first layer needs no input gradient (two products
//! per weight where the others need three), so it gets 1.5 x `width` inputs to cost as
//! much as the others; every stage then holds `--layers-per-stage` layers of equal cost,
//! and the last one the loss on top.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use kubetrain_trainer::pipeline::schedule::gpipe_bubble;
use rand::{Rng, SeedableRng, rngs::StdRng};

#[derive(Parser)]
struct Args {
    /// Stage counts (K), comma-separated.
    #[arg(long, default_value = "2,3,4")]
    stages: String,
    /// Micro-batch counts (M), comma-separated.
    #[arg(long, default_value = "1,2,4,8,16")]
    micro: String,
    /// Schedules, comma-separated.
    #[arg(long, default_value = "GPipe,1F1B")]
    schedules: String,
    /// Hidden widths and classes of the MLP (classes are capped at 256); it has 1.5 x
    /// this many inputs.
    #[arg(long, default_value_t = 256)]
    width: usize,
    /// Layers per stage: the MLP has K x this many layers. Fewer make each micro-batch's
    /// messages weigh more against its compute.
    #[arg(long, default_value_t = 8)]
    layers_per_stage: usize,
    /// The whole batch, cut into micro-batches.
    #[arg(long, default_value_t = 8192)]
    batch: usize,
    /// Steps per run; the first is warm-up and not measured.
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// Runs per configuration; the table shows the run with the median mean idle
    /// fraction (the machine is shared, and single runs catch other processes' bursts).
    #[arg(long, default_value_t = 1)]
    repeats: usize,
}

/// Inputs that make the first layer (no input gradient: 4 FLOPs per weight and example)
/// cost what every other layer (6) costs.
fn inputs(args: &Args) -> usize {
    args.width * 3 / 2
}

fn mean_idle(row: &Row) -> f64 {
    row.idle.iter().sum::<f64>() / row.idle.len() as f64
}

struct Row {
    stages: usize,
    micro: usize,
    schedule: String,
    idle: Vec<f64>,
    peak: Vec<usize>,
    step_ms: f64,
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// A loopback address of its own for one stage, on a fixed port: nothing is picked free
/// and released before the child binds it (`kubetrain_trainer::loopback`).
fn own_addr() -> String {
    format!("{}:2222", kubetrain_trainer::loopback::next_ip())
}

fn fail(message: &str) -> ! {
    eprintln!("pipeline-bench: {message}");
    std::process::exit(1)
}

/// A CSV with enough rows that every measured step is in the first epoch (no evaluation
/// inside the measured window).
fn write_dataset(dir: &Path, inputs: usize, classes: usize, rows: usize) -> PathBuf {
    let path = dir.join("pipeline-bench.csv");
    let file = std::fs::File::create(&path)
        .unwrap_or_else(|e| fail(&format!("creating {}: {e}", path.display())));
    let mut out = std::io::BufWriter::new(file);
    let mut header: Vec<String> = (0..inputs).map(|i| format!("f{i}")).collect();
    header.push("label".into());
    let mut rng = StdRng::seed_from_u64(1);
    let mut text = header.join(",");
    text.push('\n');
    for r in 0..rows {
        for _ in 0..inputs {
            let _ = write!(text, "{},", rng.random_range(0..10));
        }
        // Every class appears, so the output layer is exactly `classes` wide.
        let _ = writeln!(text, "{}", r % classes);
        if text.len() > 1 << 20 {
            out.write_all(text.as_bytes())
                .unwrap_or_else(|e| fail(&e.to_string()));
            text.clear();
        }
    }
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .unwrap_or_else(|e| fail(&e.to_string()));
    path
}

fn value<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

fn run(
    trainer: &Path,
    dir: &Path,
    args: &Args,
    csv: &Path,
    stages: usize,
    micro: usize,
    schedule: &str,
) -> Row {
    let workers: Vec<String> = (0..stages).map(|_| own_addr()).collect();
    let cluster = serde_json::json!({"ps": [], "worker": workers}).to_string();
    let training = serde_json::json!({
        "model": {"kind": "mlp", "hidden": vec![args.width; stages * args.layers_per_stage.max(1) - 1]},
        "dataset": {"path": csv, "format": "csv", "labelColumn": "label", "testFraction": 0.05},
        "optimizer": {"kind": "sgd", "learningRate": 0.01},
        "batchSize": args.batch,
        "epochs": 1,
        "seed": 1,
        "pipeline": {"microBatches": micro, "schedule": schedule},
    })
    .to_string();
    let mut children: Vec<(Child, PathBuf)> = (0..stages)
        .rev()
        .map(|i| {
            let out = dir.join(format!("stage-{i}.out"));
            let child = Command::new(trainer)
                .env("KUBETRAIN_CLUSTER", &cluster)
                .env("KUBETRAIN_ROLE", "worker")
                .env("KUBETRAIN_INDEX", i.to_string())
                .env("KUBETRAIN_JOB", "bench/pipeline")
                .env("KUBETRAIN_MODE", "ModelParallel")
                .env("KUBETRAIN_TRAINING", &training)
                .env("POD_IP", workers[i].rsplit_once(':').unwrap().0)
                .env("RUST_LOG", "warn")
                .args(["--max-steps", &args.steps.to_string()])
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&out).unwrap_or_else(|e| fail(&e.to_string())))
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| fail(&format!("starting {}: {e}", trainer.display())));
            (child, out)
        })
        .collect();
    children.reverse();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut idle = vec![0.0; stages];
    let mut peak = vec![0; stages];
    let mut window = 0.0f64;
    for (i, (child, out)) in children.iter_mut().enumerate() {
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => break,
                Ok(Some(status)) => fail(&format!(
                    "stage {i} of K={stages} M={micro} {schedule} exited {status}"
                )),
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    fail(&format!(
                        "stage {i} of K={stages} M={micro} {schedule} hung"
                    ))
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => fail(&e.to_string()),
            }
        }
        let text = std::fs::read_to_string(out).unwrap_or_default();
        let line = text
            .lines()
            .find(|l| l.contains(" finished steps="))
            .unwrap_or_else(|| fail(&format!("stage {i} printed no summary:\n{text}")));
        idle[i] = value(line, "idle_fraction").unwrap_or(f64::NAN);
        peak[i] = value(line, "peak_stash").unwrap_or(0);
        window = window.max(value(line, "window_seconds").unwrap_or(0.0));
    }
    Row {
        stages,
        micro,
        schedule: schedule.to_string(),
        idle,
        peak,
        step_ms: 1000.0 * window / (args.steps.saturating_sub(1).max(1)) as f64,
    }
}

fn main() {
    let args = Args::parse();
    let trainer = std::env::current_exe()
        .map(|p| p.with_file_name("kubetrain-trainer"))
        .unwrap_or_else(|e| fail(&e.to_string()));
    if !trainer.exists() {
        fail(&format!(
            "{} not found: cargo build --release -p kubetrain-trainer",
            trainer.display()
        ));
    }
    let dir = std::env::temp_dir().join(format!("kubetrain-pipeline-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(&e.to_string()));
    // Train split: 95 % of the rows; one epoch must cover every step.
    let classes = args.width.min(256);
    let rows = (args.batch * (args.steps + 1)) * 100 / 95 + classes;
    let csv = write_dataset(&dir, inputs(&args), classes, rows);
    let parse = |s: &str| -> Vec<usize> {
        list(s)
            .iter()
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| fail(&format!("not a number: {v}")))
            })
            .collect()
    };
    let (all_stages, all_micro) = (parse(&args.stages), parse(&args.micro));
    println!(
        "MLP: {} inputs, {} layers per stage of width {}; batch {}; {} steps per run (first not measured); median of {} run(s); {} cores",
        inputs(&args),
        args.layers_per_stage.max(1),
        args.width,
        args.batch,
        args.steps,
        args.repeats.max(1),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "| K | M | schedule | GPipe bound | idle per stage | mean idle | mean - bound (pp) | peak stash per stage | ms/step |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for &k in &all_stages {
        for &m in &all_micro {
            for schedule in list(&args.schedules) {
                let mut runs: Vec<Row> = (0..args.repeats.max(1))
                    .map(|_| run(&trainer, &dir, &args, &csv, k, m, &schedule))
                    .collect();
                runs.sort_by(|a, b| mean_idle(a).total_cmp(&mean_idle(b)));
                let row = runs.swap_remove(runs.len() / 2);
                let bound = gpipe_bubble(k, m);
                let mean = mean_idle(&row);
                println!(
                    "| {} | {} | {} | {:.3} | {} | {:.3} | {:+.1} | {} | {:.1} |",
                    row.stages,
                    row.micro,
                    row.schedule,
                    bound,
                    row.idle
                        .iter()
                        .map(|i| format!("{i:.3}"))
                        .collect::<Vec<_>>()
                        .join(" / "),
                    mean,
                    100.0 * (mean - bound),
                    row.peak
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(" / "),
                    row.step_ms
                );
                rows.push(row);
            }
        }
    }
    let within = rows
        .iter()
        .filter(|r| (mean_idle(r) - gpipe_bubble(r.stages, r.micro)).abs() <= 0.05)
        .count();
    let stash_ok = rows
        .iter()
        .filter(|r| r.schedule == "1F1B")
        .all(|r| r.peak.iter().all(|&p| p <= r.stages));
    println!();
    println!(
        "{within} of {} runs have a mean idle fraction within 5 pp of GPipe's bound; 1F1B peak stash <= K in every run: {stash_ok}",
        rows.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
