//! GEMM candidates for the trainer's step, measured in one run (issue #18):
//! matrixmultiply (ndarray's default) at 1 and at all threads, OpenBLAS through
//! ndarray's `blas` feature, and faer, each at 1 and at all threads.
//!
//! `cargo run --release --manifest-path bench/gemm/Cargo.toml`
//!
//! Each candidate runs in a child process of its own, because matrixmultiply and OpenBLAS
//! read their thread count from the environment once per process.

// Links OpenBLAS, which ndarray_blas's `.dot()` calls through CBLAS.
use blas_src as _;
use std::process::Command;
use std::time::Instant;

/// One GEMM of the training step, Fashion-MNIST mlp 784-256-10 at batch 256:
/// `out (m×n) = op(a) · op(b)`, `op` transposing a row-major operand where `*_t`.
#[derive(Clone, Copy)]
struct Shape {
    m: usize,
    k: usize,
    n: usize,
    a_t: bool,
    b_t: bool,
}

const STEP: [Shape; 5] = [
    Shape {
        m: 256,
        k: 784,
        n: 256,
        a_t: false,
        b_t: false,
    },
    Shape {
        m: 256,
        k: 256,
        n: 10,
        a_t: false,
        b_t: false,
    },
    Shape {
        m: 256,
        k: 256,
        n: 10,
        a_t: true,
        b_t: false,
    },
    Shape {
        m: 256,
        k: 10,
        n: 256,
        a_t: false,
        b_t: true,
    },
    Shape {
        m: 784,
        k: 256,
        n: 256,
        a_t: true,
        b_t: false,
    },
];

const SQUARE: Shape = Shape {
    m: 1024,
    k: 1024,
    n: 1024,
    a_t: false,
    b_t: false,
};

fn flops(s: &Shape) -> f64 {
    2.0 * (s.m * s.k * s.n) as f64
}

/// Deterministic operands: a's stored shape is (m, k), or (k, m) when transposed.
fn operands(s: &Shape) -> (Vec<f32>, Vec<f32>) {
    let value = |i: usize| ((i * 2654435761) % 1000) as f32 / 1000.0 - 0.5;
    let a = (0..s.m * s.k).map(value).collect();
    let b = (0..s.k * s.n).map(|i| value(i + 7)).collect();
    (a, b)
}

fn matrixmultiply(s: &Shape, a: &[f32], b: &[f32]) -> Vec<f32> {
    use ndarray::ArrayView2;
    let av = if s.a_t {
        ArrayView2::from_shape((s.k, s.m), a)
            .unwrap()
            .reversed_axes()
    } else {
        ArrayView2::from_shape((s.m, s.k), a).unwrap()
    };
    let bv = if s.b_t {
        ArrayView2::from_shape((s.n, s.k), b)
            .unwrap()
            .reversed_axes()
    } else {
        ArrayView2::from_shape((s.k, s.n), b).unwrap()
    };
    av.dot(&bv).into_raw_vec_and_offset().0
}

fn openblas(s: &Shape, a: &[f32], b: &[f32]) -> Vec<f32> {
    use ndarray_blas::ArrayView2;
    let av = if s.a_t {
        ArrayView2::from_shape((s.k, s.m), a)
            .unwrap()
            .reversed_axes()
    } else {
        ArrayView2::from_shape((s.m, s.k), a).unwrap()
    };
    let bv = if s.b_t {
        ArrayView2::from_shape((s.n, s.k), b)
            .unwrap()
            .reversed_axes()
    } else {
        ArrayView2::from_shape((s.k, s.n), b).unwrap()
    };
    av.dot(&bv).into_raw_vec_and_offset().0
}

fn faer(s: &Shape, a: &[f32], b: &[f32], threads: usize) -> Vec<f32> {
    use faer::{Accum, MatMut, MatRef, Par};
    let av = if s.a_t {
        MatRef::from_row_major_slice(a, s.k, s.m).transpose()
    } else {
        MatRef::from_row_major_slice(a, s.m, s.k)
    };
    let bv = if s.b_t {
        MatRef::from_row_major_slice(b, s.n, s.k).transpose()
    } else {
        MatRef::from_row_major_slice(b, s.k, s.n)
    };
    let mut out = vec![0.0f32; s.m * s.n];
    let par = if threads > 1 {
        Par::rayon(threads)
    } else {
        Par::Seq
    };
    faer::linalg::matmul::matmul(
        MatMut::from_row_major_slice_mut(&mut out, s.m, s.n),
        Accum::Replace,
        av,
        bv,
        1.0f32,
        par,
    );
    out
}

fn run(candidate: &str, s: &Shape, a: &[f32], b: &[f32], threads: usize) -> Vec<f32> {
    match candidate {
        "matrixmultiply" => matrixmultiply(s, a, b),
        "openblas" => openblas(s, a, b),
        "faer" => faer(s, a, b, threads),
        other => panic!("unknown candidate {other}"),
    }
}

/// Best seconds per call over repeats that add up to at least `budget` seconds.
fn time(candidate: &str, s: &Shape, threads: usize, budget: f64) -> f64 {
    let (a, b) = operands(s);
    for _ in 0..3 {
        std::hint::black_box(run(candidate, s, &a, &b, threads));
    }
    let (mut best, mut spent) = (f64::MAX, 0.0);
    while spent < budget {
        let t = Instant::now();
        std::hint::black_box(run(candidate, s, &a, &b, threads));
        let e = t.elapsed().as_secs_f64();
        best = best.min(e);
        spent += e;
    }
    best
}

/// Child: one candidate at one thread count; prints `step_s square_s max_rel_error`.
fn child(candidate: &str, threads: usize) {
    let mut worst = 0f64;
    for s in &STEP {
        let (a, b) = operands(s);
        let want = matrixmultiply(s, &a, &b);
        let got = run(candidate, s, &a, &b, threads);
        for (w, g) in want.iter().zip(&got) {
            worst = worst.max(((w - g).abs() / w.abs().max(1.0)) as f64);
        }
    }
    let step: f64 = STEP.iter().map(|s| time(candidate, s, threads, 0.3)).sum();
    let square = time(candidate, &SQUARE, threads, 1.0);
    println!("{step} {square} {worst}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, candidate, threads] = args.as_slice()
        && flag == "--child"
    {
        child(candidate, threads.parse().unwrap());
        return;
    }
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let step_flops: f64 = STEP.iter().map(flops).sum();
    println!(
        "# GEMM for the trainer's step: mlp 784-256-10, batch 256 ({:.1} MFLOP per step), {all} cores\n",
        step_flops / 1e6
    );
    println!(
        "| candidate | threads | step GEMMs | GFLOP/s, step | GFLOP/s, 1024³ sgemm | speed-up, step, 1 → {all} threads | max relative error vs matrixmultiply |\n|---|---|---|---|---|---|---|"
    );
    let mut rows = Vec::new();
    for candidate in ["matrixmultiply", "openblas", "faer"] {
        let mut one = None;
        for threads in [1, all] {
            let out = Command::new(std::env::current_exe().unwrap())
                .args(["--child", candidate, &threads.to_string()])
                .env("MATMUL_NUM_THREADS", threads.to_string())
                .env("OPENBLAS_NUM_THREADS", threads.to_string())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let v: Vec<f64> = text
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            let [step, square, err] = v[..] else {
                println!(
                    "| {candidate} | {threads} | failed: {} | | | | |",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                );
                continue;
            };
            let speedup = one
                .map(|o: f64| format!("{:.2}x", o / step))
                .unwrap_or_default();
            one.get_or_insert(step);
            rows.push((candidate, threads, step, square));
            println!(
                "| {candidate} | {threads} | {:.2} ms | {:.1} | {:.1} | {speedup} | {err:.1e} |",
                step * 1e3,
                step_flops / step / 1e9,
                flops(&SQUARE) / square / 1e9
            );
        }
    }
    let peak = rows
        .iter()
        .map(|r| flops(&SQUARE) / r.3)
        .fold(0.0, f64::max);
    println!(
        "\nmachine sgemm peak measured here (best 1024³ of any candidate): {:.1} GFLOP/s",
        peak / 1e9
    );
    for (candidate, threads, step, _) in rows {
        println!(
            "- {candidate} at {threads} thread(s): step GEMMs at {:.0} % of that peak",
            100.0 * step_flops / step / peak
        );
    }
}
