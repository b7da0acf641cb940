//! Section `tensorflow`: TensorFlow's ParameterServerStrategy beside kubetrain.

use super::*;

/// One run of `bench/tensorflow/ps_strategy.py`: samples/s and test accuracy from the JSON
/// line it ends with, or why there is none.
fn tensorflow_run(python: &Path, mode: &str) -> Result<(f64, f64), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/tensorflow/ps_strategy.py");
    let out = Command::new(python)
        .arg(&script)
        .args(["--mode", mode, "--workers", "2"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(last).map_err(|_| {
        format!(
            "{} --mode {mode} exited {} without its JSON line",
            script.display(),
            out.status
        )
    })?;
    let number = |key: &str| {
        json[key]
            .as_f64()
            .ok_or_else(|| format!("no {key} in {last}"))
    };
    Ok((number("samples_per_second")?, number("test_accuracy")?))
}

/// TensorFlow's ParameterServerStrategy (tensorflow-cpu from PyPI) beside kubetrain, with
/// the same settings, interleaved repeat by repeat: Fashion-MNIST mlp 784-256-10, batch
/// 256 per worker, 3 epochs, SGD lr 0.1 momentum 0.9 (momentum slots on the PS), 1 PS + 2
/// workers, and each one's single process.
pub(super) fn tensorflow(
    args: &Args,
    bin: &Path,
    dir: &Path,
    fashion: &DatasetSpec,
    mlp: &ModelSpec,
) {
    let python = match args.tf_python.strip_prefix("~/") {
        Some(rest) => std::env::home_dir().unwrap_or_default().join(rest),
        None => args.tf_python.clone().into(),
    };
    let repeats = args.tf_repeats;
    println!(
        "## Side by side with TensorFlow's ParameterServerStrategy: Fashion-MNIST mlp 784-256-10, batch 256 per worker, 3 epochs, SGD lr 0.1 momentum 0.9, {repeats} repeats\n"
    );
    let spec = training(mlp.clone(), fashion.clone(), 256, 3, 0.1);
    let mut async_spec = spec.clone();
    async_spec.consistency.kind = kubetrain_api::ConsistencyKind::Async;
    let names = [
        "TensorFlow, 1 process",
        "TensorFlow PS, 1 PS + 2 workers (async)",
        "kubetrain, 1 process",
        "kubetrain Sync, 1 PS + 2 workers",
        "kubetrain Async, 1 PS + 2 workers",
    ];
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); names.len()];
    let mut peak_kib = 0;
    for repeat in 0..repeats {
        for (i, mode) in ["single", "ps"].into_iter().enumerate() {
            match tensorflow_run(&python, mode) {
                Ok(run) => runs[i].push(run),
                Err(e) => {
                    println!(
                        "skipped: {e} (install TensorFlow with tests/tensorflow/install.sh)\n"
                    );
                    return;
                }
            }
        }
        match local::train(&spec, 1, None) {
            Ok(one) => runs[2].push((one.samples_per_second, one.evaluation.accuracy)),
            Err(e) => {
                println!("skipped: {e}\n");
                return;
            }
        }
        for (i, spec) in [(3, &spec), (4, &async_spec)] {
            let run = distributed(bin, spec, 1, 2, &dir.join(format!("tf-{i}-{repeat}")));
            peak_kib = peak_kib.max(run.peak_rss_kib.iter().map(|(_, k)| *k).max().unwrap_or(0));
            runs[i].push((run.samples_per_second, run.accuracy));
        }
    }
    println!(
        "| run | samples/s per repeat | median samples/s | vs TensorFlow PS | test accuracy per repeat | median accuracy |\n|---|---|---|---|---|---|"
    );
    let medians: Vec<(f64, f64)> = runs
        .iter()
        .map(|r| {
            (
                median(r.iter().map(|x| x.0).collect()),
                median(r.iter().map(|x| x.1).collect()),
            )
        })
        .collect();
    for (name, (r, m)) in names.iter().zip(runs.iter().zip(&medians)) {
        let list = |f: fn(&(f64, f64)) -> String| r.iter().map(f).collect::<Vec<_>>().join(", ");
        println!(
            "| {name} | {} | {:.0} | {:.2}x | {} | **{:.4}** |",
            list(|x| format!("{:.0}", x.0)),
            m.0,
            m.0 / medians[1].0,
            list(|x| format!("{:.4}", x.1)),
            m.1
        );
    }
    let (tf_ps, tf_one) = (medians[1], medians[0]);
    for (name, m) in [("Sync", medians[3]), ("Async", medians[4])] {
        println!(
            "\nkubetrain {name}: {:.2}x TensorFlow PS's samples/s (target >= 2x), accuracy {:+.2} pp against it (target >= 0); {:.2}x TensorFlow's single process (stretch > 1x)",
            m.0 / tf_ps.0,
            (m.1 - tf_ps.1) * 100.0,
            m.0 / tf_one.0
        );
    }
    println!(
        "\nlargest peak RSS of a kubetrain process: {:.1} MiB (target <= 64 MiB)\n",
        peak_kib as f64 / 1024.0
    );
}
