//! Sections `accuracy` and `async`: Fashion-MNIST accuracy of one process, Sync and Async,
//! at the same settings.

use super::*;

/// Test accuracy of one process, 4 Sync workers and 4 Async workers (2 PS each) at the
/// same epochs; peak RSS of every process of the distributed runs.
pub(super) fn accuracy(
    args: &Args,
    bin: &Path,
    dir: &Path,
    fashion: &DatasetSpec,
    mlp: &ModelSpec,
) {
    let (batch, epochs, lr) = (args.batch, args.epochs, args.lr);
    let global = batch * 4;
    println!(
        "## Fashion-MNIST mlp 784-256-10: {epochs} epochs, SGD lr {lr} momentum 0.9, batch {batch} per worker\n"
    );
    println!(
        "| setup | test accuracy | vs 1 process | samples/s | wall time | peak RSS (MiB) |\n|---|---|---|---|---|---|"
    );
    // One process stepping through the same 4 partitions' batches at once (batch 4 x
    // `batch`): exactly what Sync computes, so any gap is the distributed system's.
    let mut spec = training(mlp.clone(), fashion.clone(), batch, epochs, lr);
    let started = Instant::now();
    let one = match local::train(&spec, 4, None) {
        Ok(one) => one,
        Err(e) => {
            println!("skipped: {e}\n");
            return;
        }
    };
    let base = one.evaluation.accuracy;
    println!(
        "| 1 process, batch {global} = 4 partitions x {batch} (baseline) | {base:.4} | | {:.0} | {:.1} s | bench process {:.1} |",
        one.samples_per_second,
        started.elapsed().as_secs_f64(),
        peak_rss_kib(std::process::id()).unwrap_or(0) as f64 / 1024.0
    );
    let sync = distributed(bin, &spec, 2, 4, &dir.join("acc-sync"));
    // The same learning rate and momentum: users run Async with the settings tuned for
    // Sync, and the PS's stale-gradient default has to make them work.
    spec.consistency.kind = kubetrain_api::ConsistencyKind::Async;
    let asy = distributed(bin, &spec, 2, 4, &dir.join("acc-async"));
    for (name, run) in [("Sync", &sync), ("Async", &asy)] {
        println!(
            "| 2 PS + 4 workers, {name}, batch {batch} each, lr {lr} momentum 0.9 | {:.4} | {:+.2} pp | {:.0} | {:.1} s | {} |",
            run.accuracy,
            (run.accuracy - base) * 100.0,
            run.samples_per_second,
            run.seconds,
            rss_cell(run)
        );
    }
    let peak = [&sync, &asy]
        .iter()
        .flat_map(|r| r.peak_rss_kib.iter().map(|(_, k)| *k))
        .max()
        .unwrap_or(0);
    println!(
        "\n1 process >= 0.88: {}; Sync within 0.5 pp: {}; Async within 1 pp: {}; largest peak RSS {:.1} MiB (target <= 64 MiB)\n",
        base >= 0.88,
        (sync.accuracy - base).abs() <= 0.005,
        (asy.accuracy - base).abs() <= 0.01,
        peak as f64 / 1024.0
    );
}

/// Async at the settings a user tunes for Sync (issue #18): Fashion-MNIST mlp 784-256-10,
/// batch 256 per worker, 3 epochs, SGD lr 0.1 momentum 0.9, 1 PS; 2 and 4 workers. Each
/// stale-gradient policy against Sync with the same workers, interleaved repeat by repeat.
pub(super) fn asynchrony(
    args: &Args,
    bin: &Path,
    dir: &Path,
    fashion: &DatasetSpec,
    mlp: &ModelSpec,
) {
    let policies: Vec<kubetrain_api::StaleGradients> = args
        .stale_gradients
        .split(',')
        .map(|p| {
            serde_json::from_value(serde_json::Value::String(p.trim().into()))
                .expect("--stale-gradients: ScaleLearningRate, CorrectMomentum or Apply")
        })
        .collect();
    let repeats = args.async_repeats;
    println!(
        "## Async at Sync's settings: Fashion-MNIST mlp 784-256-10, batch 256 per worker, 3 epochs, SGD lr 0.1 momentum 0.9, 1 PS, {repeats} repeats\n"
    );
    println!(
        "| workers | run | test accuracy per repeat | median | samples/s median | vs Sync samples/s | mean staleness |\n|---|---|---|---|---|---|---|"
    );
    let workers: Vec<usize> = args
        .async_workers
        .split(',')
        .map(|w| w.trim().parse().expect("--async-workers: numbers"))
        .collect();
    for workers in workers {
        let spec = training(mlp.clone(), fashion.clone(), 256, 3, 0.1);
        let mut rows: Vec<(String, Vec<RunResult>)> = std::iter::once("Sync".to_string())
            .chain(policies.iter().map(|p| format!("Async, {p:?}")))
            .map(|name| (name, Vec::new()))
            .collect();
        for repeat in 0..repeats {
            for (i, (_, runs)) in rows.iter_mut().enumerate() {
                let mut spec = spec.clone();
                if i > 0 {
                    spec.consistency.kind = kubetrain_api::ConsistencyKind::Async;
                    spec.consistency.stale_gradients = Some(policies[i - 1]);
                    if let Some(lr) = args.async_lr {
                        spec.optimizer.learning_rate = lr;
                    }
                    if let Some(momentum) = args.async_momentum {
                        spec.optimizer.momentum = Some(momentum);
                    }
                }
                let run_dir = dir.join(format!("async-{workers}-{i}-{repeat}"));
                runs.push(distributed(bin, &spec, 1, workers, &run_dir));
            }
        }
        let sync_rate = median(rows[0].1.iter().map(|r| r.samples_per_second).collect());
        for (name, runs) in &rows {
            let accuracies: Vec<f64> = runs.iter().map(|r| r.accuracy).collect();
            let rate = median(runs.iter().map(|r| r.samples_per_second).collect());
            let staleness = median(runs.iter().filter_map(|r| r.mean_staleness).collect());
            println!(
                "| {workers} | {name} | {} | **{:.4}** | {rate:.0} | {:.2}x | {} |",
                accuracies
                    .iter()
                    .map(|a| format!("{a:.4}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                median(accuracies.clone()),
                rate / sync_rate,
                if staleness.is_nan() {
                    "-".to_string()
                } else {
                    format!("{staleness:.2}")
                }
            );
        }
    }
    println!(
        "\ntargets: Async median >= 0.845 with 2 workers and >= 0.84 with 4, at >= 0.9x Sync's samples/s\n"
    );
}
