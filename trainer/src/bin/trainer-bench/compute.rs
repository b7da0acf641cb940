//! Section `compute`: one process with its matrix products on 1 and on every thread.

use super::*;

/// The GEMM flops of one training step of mlp 784-256-10 at batch 256: the two forward
/// products, and backward the two weight gradients and the one upstream product.
const STEP_GEMM_FLOPS: f64 = 2.0 * (256.0 * 784.0 * 256.0 * 2.0 + 256.0 * 256.0 * 10.0 * 3.0);

/// Child of [`compute`]: samples/s of one process training Fashion-MNIST (batch 256, 1
/// epoch), then the best of five 1024³ sgemms, as `samples_per_second gflops`.
pub(super) fn compute_child(args: &Args) {
    let fashion = DatasetSpec {
        builtin: Some(BuiltinDataset::FashionMnist),
        path: Some(args.fashion_dir.clone()),
        ..Default::default()
    };
    let mlp = ModelSpec {
        kind: ModelKind::Mlp,
        hidden: vec![256],
    };
    let spec = training(mlp, fashion, 256, 1, 0.1);
    let one = local::train(&spec, 1, None).expect("single-process training");
    let a = ndarray::Array2::<f32>::from_shape_fn((1024, 1024), |(i, j)| {
        ((i * 31 + j) % 17) as f32 / 17.0
    });
    let mut best = f64::MAX;
    for _ in 0..6 {
        let t = Instant::now();
        std::hint::black_box(a.dot(&a));
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{} {}",
        one.samples_per_second,
        2.0 * 1024f64.powi(3) / best / 1e9
    );
}

/// One process's samples/s with its matrix products on 1 thread and on every core,
/// interleaved, 3 repeats each (issue #18), and the step's GEMM GFLOP/s against the
/// machine's sgemm peak measured by the same children.
pub(super) fn compute(args: &Args) {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "## Compute threads: one process, Fashion-MNIST mlp 784-256-10, batch 256, 1 epoch, matrix products on 1 and {all} threads\n"
    );
    let exe = std::env::current_exe().unwrap();
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (i, threads) in [1, all].into_iter().enumerate() {
            let out = Command::new(&exe)
                .args(["--compute-child", "--fashion-dir", &args.fashion_dir])
                .env("MATMUL_NUM_THREADS", threads.to_string())
                .stderr(Stdio::inherit())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let v: Vec<f64> = text
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            match v[..] {
                [rate, gflops] => runs[i].push((rate, gflops)),
                _ => {
                    println!("skipped: the child printed {text:?}\n");
                    return;
                }
            }
        }
    }
    let peak = runs.iter().flatten().map(|r| r.1).fold(0.0, f64::max);
    println!(
        "| threads | samples/s per repeat | median | step GEMM GFLOP/s | share of the sgemm peak | 1024³ sgemm GFLOP/s per repeat |\n|---|---|---|---|---|---|"
    );
    let mut medians = Vec::new();
    for (threads, r) in [1, all].into_iter().zip(&runs) {
        let rate = median(r.iter().map(|x| x.0).collect());
        medians.push(rate);
        let gflops = rate / 256.0 * STEP_GEMM_FLOPS / 1e9;
        println!(
            "| {threads} | {} | {rate:.0} | {gflops:.1} | {:.0} % | {} |",
            r.iter()
                .map(|x| format!("{:.0}", x.0))
                .collect::<Vec<_>>()
                .join(", "),
            100.0 * gflops / peak,
            r.iter()
                .map(|x| format!("{:.1}", x.1))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "\nspeed-up from 1 to {all} threads: **{:.2}x** (target >= 1.7x); machine sgemm peak measured here {peak:.1} GFLOP/s (best 1024³ of any child)\n",
        medians[1] / medians[0]
    );
}
