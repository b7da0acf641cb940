//! Benchmarks of the trainer, each next to a baseline measured in the same run:
//! gRPC push+pull of 16 MiB vs raw TCP on loopback, 2 workers + 1 PS vs one process,
//! Fashion-MNIST accuracy, checkpoint time for 1M parameters, peak RSS.
//!
//! `cargo build --release -p kubetrain-trainer && target/release/trainer-bench`
//! (the multi-process parts run the `kubetrain-trainer` binary next to this one).

mod accuracy;
mod compute;
mod runs;
mod tensorflow;
mod throughput;
mod transport;

use std::convert::Infallible;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use clap::Parser;
use kubetrain_api::contract::ClusterSpec;
use kubetrain_api::{
    BuiltinDataset, ConsistencySpec, DatasetSpec, ModelKind, ModelSpec, OptimizerKind,
    OptimizerSpec, TrainingSpec,
};
use kubetrain_trainer::checkpoint::{self, ShardCheckpoint};
use kubetrain_trainer::credential::JobToken;
use kubetrain_trainer::local;
use kubetrain_trainer::model::{Optimizer, OptimizerState};
use kubetrain_trainer::proto::parameter_server_client::ParameterServerClient;
use kubetrain_trainer::proto::*;
use tonic::codegen::Service;
use tonic::server::NamedService;

use accuracy::{accuracy, asynchrony};
use compute::{compute, compute_child};
use runs::{RunResult, distributed, rss_cell};
use tensorflow::tensorflow;
use throughput::throughput;
use transport::{serve_discarding_ps, transport};

#[derive(Parser)]
struct Args {
    /// Directory with Fashion-MNIST's gzipped IDX files.
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    fashion_dir: String,
    /// Comma-separated sections to run.
    #[arg(
        long,
        default_value = "transport,checkpoint,throughput,accuracy,async,tensorflow"
    )]
    sections: String,
    /// Rounds of the 16 MiB push+pull per repeat (after one warm-up round).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Repeats of the transport measurement (a fresh PS process each).
    #[arg(long, default_value_t = 5)]
    transport_repeats: usize,
    /// Accuracy runs: epochs.
    #[arg(long, default_value_t = 20)]
    epochs: u32,
    /// Accuracy runs: batch per worker (the one-process baseline takes 4x this).
    #[arg(long, default_value_t = 64)]
    batch: u32,
    /// Accuracy runs: learning rate (momentum 0.9).
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Async runs (section `async`): how stale gradients are applied, comma-separated;
    /// each gets its own rows.
    #[arg(long, default_value = "ScaleLearningRate,CorrectMomentum,Apply")]
    stale_gradients: String,
    /// Async runs: repeats of each setup (medians are reported).
    #[arg(long, default_value_t = 3)]
    async_repeats: usize,
    /// Async runs: worker counts, comma-separated (1 PS each).
    #[arg(long, default_value = "2,4")]
    async_workers: String,
    /// Async runs, for exploring: the Async rows' learning rate instead of Sync's 0.1.
    #[arg(long)]
    async_lr: Option<f64>,
    /// Async runs, for exploring: the Async rows' momentum instead of Sync's 0.9.
    #[arg(long)]
    async_momentum: Option<f64>,
    /// Throughput runs: batch per process (comma-separated: one table each).
    #[arg(long, default_value = "256,1024")]
    throughput_batch: String,
    /// Throughput runs: epochs.
    #[arg(long, default_value_t = 2)]
    throughput_epochs: u32,
    /// Throughput runs: repeats.
    #[arg(long, default_value_t = 3)]
    throughput_repeats: usize,
    /// Section `tensorflow`: the Python with tensorflow-cpu (tests/tensorflow/install.sh
    /// makes this virtualenv).
    #[arg(long, default_value = "~/.cache/kubetrain/tf-venv/bin/python")]
    tf_python: String,
    /// Section `tensorflow`: repeats (TensorFlow and kubetrain interleaved).
    #[arg(long, default_value_t = 3)]
    tf_repeats: usize,
    /// Internal: one single-process training (section `compute`) in this process, whose
    /// matrix products run on MATMUL_NUM_THREADS threads; prints samples/s and the 1024³
    /// sgemm GFLOP/s.
    #[arg(long, hide = true)]
    compute_child: bool,
    /// Internal: serve the discarding PS at this address (the transport's ceiling) and
    /// nothing else.
    #[arg(long, hide = true)]
    discarding_ps_addr: Option<std::net::SocketAddr>,
}

/// A loopback address of its own for one process, on a fixed port: nothing is picked free
/// and released before the child binds it (`kubetrain_trainer::loopback`).
fn own_addr() -> std::net::SocketAddr {
    (kubetrain_trainer::loopback::next_ip(), 2222).into()
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn training(
    model: ModelSpec,
    dataset: DatasetSpec,
    batch: u32,
    epochs: u32,
    lr: f64,
) -> TrainingSpec {
    TrainingSpec {
        model,
        dataset,
        optimizer: OptimizerSpec {
            kind: OptimizerKind::Sgd,
            learning_rate: lr,
            momentum: Some(0.9),
            beta1: None,
            beta2: None,
            epsilon: None,
        },
        batch_size: batch,
        epochs,
        seed: 42,
        consistency: ConsistencySpec::default(),
        checkpoint: None,
        pipeline: None,
        log_dir: None,
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

fn checkpoint_time(dir: &Path) -> (f64, f64, usize) {
    let len = 1_000_000;
    let ckpt = ShardCheckpoint {
        version: 1,
        start: 0,
        end: len,
        total_params: len,
        params: vec![0.5; len],
        optimizer: OptimizerState::Adam {
            m: vec![0.1; len],
            v: vec![0.2; len],
            t: 1,
        },
    };
    let path = dir.join("bench.ckpt");
    let mut write = f64::MAX;
    let mut read = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        checkpoint::write(&path, &ckpt).unwrap();
        write = write.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        checkpoint::read(&path).unwrap().unwrap();
        read = read.min(t.elapsed().as_secs_f64());
    }
    let size = std::fs::metadata(&path).unwrap().len() as usize;
    (write, read, size)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn main() {
    let args = Args::parse();
    if let Some(addr) = args.discarding_ps_addr {
        serve_discarding_ps(addr);
        return;
    }
    if args.compute_child {
        compute_child(&args);
        return;
    }
    let bin = std::env::current_exe()
        .unwrap()
        .with_file_name("kubetrain-trainer");
    assert!(
        bin.exists(),
        "build the trainer binary first: {} is missing",
        bin.display()
    );
    let dir = std::env::temp_dir().join(format!("kubetrain-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let wants = |section: &str| args.sections.split(',').any(|s| s.trim() == section);
    println!(
        "# kubetrain-trainer benchmarks ({} cores, load average {} at start)\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );

    if wants("transport") {
        transport(&args, &bin, &dir);
    }
    if wants("checkpoint") {
        let (write, read, size) = checkpoint_time(&dir);
        println!(
            "## Checkpoint of 1M parameters with Adam state ({:.1} MiB)\n",
            size as f64 / (1 << 20) as f64
        );
        println!(
            "write (temp + fsync + rename + dir fsync): {:.1} ms (target <= 100 ms: {:.2}x of the budget); read + verify: {:.1} ms\n",
            write * 1e3,
            write * 1e3 / 100.0,
            read * 1e3
        );
    }
    let fashion = DatasetSpec {
        builtin: Some(BuiltinDataset::FashionMnist),
        path: Some(args.fashion_dir.clone()),
        ..Default::default()
    };
    let mlp = ModelSpec {
        kind: ModelKind::Mlp,
        hidden: vec![256],
    };
    if wants("throughput") {
        for batch in args.throughput_batch.split(',') {
            let batch = batch.trim().parse().expect("--throughput-batch: numbers");
            throughput(&args, batch, &bin, &dir, &fashion, &mlp);
        }
    }
    if wants("accuracy") {
        accuracy(&args, &bin, &dir, &fashion, &mlp);
    }
    if wants("async") {
        asynchrony(&args, &bin, &dir, &fashion, &mlp);
    }
    if wants("tensorflow") {
        tensorflow(&args, &bin, &dir, &fashion, &mlp);
    }
    if wants("compute") {
        compute(&args);
    }
    println!("load average at end: {}", load_average());
    let _ = std::fs::remove_dir_all(&dir);
}
