//! Section `throughput`: 1 PS + 2 workers against one process.

use super::*;

/// 1 PS + 2 workers against one process, same model, per-worker batch and samples.
pub(super) fn throughput(
    args: &Args,
    batch: u32,
    bin: &Path,
    dir: &Path,
    fashion: &DatasetSpec,
    mlp: &ModelSpec,
) {
    let epochs = args.throughput_epochs;
    println!(
        "## Throughput: Fashion-MNIST mlp 784-256-10, batch {batch} per process, {epochs} epoch(s), {} repeats\n",
        args.throughput_repeats
    );
    println!(
        "| repeat | 1 process, batch {batch} (baseline) | 2 independent processes at once (ceiling) | 1 PS + 2 workers Sync | ratio | 1 PS + 2 workers Async | ratio | load average |\n|---|---|---|---|---|---|---|---|"
    );
    let (mut sync_ratios, mut async_ratios, mut ceilings) = (Vec::new(), Vec::new(), Vec::new());
    for repeat in 0..args.throughput_repeats {
        let spec = training(mlp.clone(), fashion.clone(), batch, epochs, 0.05);
        let one = match local::train(&spec, 1, None) {
            Ok(one) => one,
            Err(e) => {
                println!("skipped: {e}\n");
                return;
            }
        };
        // What this machine gives two compute-bound processes at the moment: two
        // independent one-process trainings at once. No data-parallel run can beat it.
        let pair: f64 = std::thread::scope(|scope| {
            let runs: Vec<_> = (0..2)
                .map(|_| scope.spawn(|| local::train(&spec, 1, None)))
                .collect();
            runs.into_iter()
                .map(|r| r.join().unwrap().map_or(0.0, |o| o.samples_per_second))
                .sum()
        });
        let ceiling = pair / one.samples_per_second;
        ceilings.push(ceiling);
        let sync = distributed(
            bin,
            &spec,
            1,
            2,
            &dir.join(format!("tp-sync-{batch}-{repeat}")),
        );
        let mut async_spec = spec.clone();
        async_spec.consistency.kind = kubetrain_api::ConsistencyKind::Async;
        let asy = distributed(
            bin,
            &async_spec,
            1,
            2,
            &dir.join(format!("tp-async-{batch}-{repeat}")),
        );
        let (rs, ra) = (
            sync.samples_per_second / one.samples_per_second,
            asy.samples_per_second / one.samples_per_second,
        );
        sync_ratios.push(rs);
        async_ratios.push(ra);
        println!(
            "| {} | {:.0} samples/s | {pair:.0} samples/s ({ceiling:.2}x) | {:.0} samples/s ({}) | {rs:.2}x | {:.0} samples/s ({}) | {ra:.2}x | {} |",
            repeat + 1,
            one.samples_per_second,
            sync.samples_per_second,
            sync.timing,
            asy.samples_per_second,
            asy.timing,
            load_average()
        );
    }
    println!(
        "\nmedian ratio, 2 workers / 1 process: Sync **{:.2}x**, Async **{:.2}x** (target >= 1.2x); two independent processes: {:.2}x\n",
        median(sync_ratios),
        median(async_ratios),
        median(ceilings)
    );
}
