//! Benchmarks of the trainer, each next to a baseline measured in the same run:
//! gRPC push+pull of 16 MiB vs raw TCP on loopback, 2 workers + 1 PS vs one process,
//! Fashion-MNIST accuracy, checkpoint time for 1M parameters, peak RSS.
//!
//! `cargo build --release -p kubetrain-trainer && target/release/trainer-bench`
//! (the multi-process parts run the `kubetrain-trainer` binary next to this one).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use kubetrain_api::contract::{ClusterSpec, Role};
use kubetrain_api::{
    BuiltinDataset, ConsistencySpec, DatasetSpec, ModelKind, ModelSpec, OptimizerKind,
    OptimizerSpec, TrainingSpec,
};
use kubetrain_trainer::config::Config;
use kubetrain_trainer::metrics::PsMetrics;
use kubetrain_trainer::model::OptimizerState;
use kubetrain_trainer::net;
use kubetrain_trainer::proto::parameter_server_client::ParameterServerClient;
use kubetrain_trainer::proto::*;
use kubetrain_trainer::ps::checkpoint::{self, ShardCheckpoint};
use kubetrain_trainer::{local, ps};

#[derive(Parser)]
struct Args {
    /// Directory with Fashion-MNIST's gzipped IDX files.
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    fashion_dir: String,
    /// Epochs per Fashion-MNIST run.
    #[arg(long, default_value_t = 3)]
    epochs: u32,
    /// Repetitions of the 16 MiB round trip.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    }
}

/// Raw TCP: send `bytes`, read them back, `rounds` times; seconds per round.
fn raw_tcp_round_trip(bytes: usize, rounds: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; bytes];
        for _ in 0..rounds {
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        }
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    let out = vec![1u8; bytes];
    let mut back = vec![0u8; bytes];
    let started = Instant::now();
    for _ in 0..rounds {
        c.write_all(&out).unwrap();
        c.read_exact(&mut back).unwrap();
    }
    let t = started.elapsed().as_secs_f64() / rounds as f64;
    server.join().unwrap();
    t
}

/// gRPC: push a 16 MiB gradient to an in-process PS and pull the parameters back.
fn grpc_round_trip(rounds: usize) -> (f64, usize) {
    // 2048 -> 2047 softmax: 4,194,303 parameters, one value short of 16 MiB.
    let widths = [2048usize, 2047];
    let params = widths[0] * widths[1] + widths[1];
    let port = free_port();
    let cluster = ClusterSpec {
        ps: vec![format!("127.0.0.1:{port}")],
        worker: vec!["127.0.0.1:1".into()],
    };
    let mut spec = training(
        ModelSpec {
            kind: ModelKind::Softmax,
            hidden: vec![],
        },
        DatasetSpec {
            builtin: Some(BuiltinDataset::Digits),
            ..Default::default()
        },
        32,
        1,
        0.01,
    );
    spec.consistency.kind = kubetrain_api::ConsistencyKind::Async;
    let config = Config {
        cluster,
        role: Role::Ps,
        index: 0,
        job: "bench".into(),
        training: spec,
        consistency: ps::Consistency::Async,
        bind: format!("127.0.0.1:{port}").parse().unwrap(),
        metrics: None,
        dump_params: None,
        heartbeat_timeout: Duration::from_secs(600),
        heartbeat_interval: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(600),
        ps_timeout: Duration::from_secs(60),
        max_steps: None,
    };
    // The PS gets its own runtime (2 threads), like a separate process would.
    let ps_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ps_task = ps_runtime.spawn(ps::run_ps(config, PsMetrics::default()));
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let per_round = client_runtime.block_on(async {
        let mut client = loop {
            let channel = net::channel(&format!("127.0.0.1:{port}")).unwrap();
            let mut c = ParameterServerClient::new(channel)
                .max_decoding_message_size(net::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(net::MAX_MESSAGE_BYTES);
            let req = RegisterRequest {
                worker_id: 0,
                total_params: params as u64,
                widths: widths.iter().map(|&w| w as u32).collect(),
            };
            if c.register(req).await.is_ok() {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let grad = std::sync::Arc::new(vec![0.001f32; params]);
        let mut version = 0;
        let mut total = 0.0;
        let mut buffer = Vec::new();
        let (mut push_total, mut pull_total) = (0.0, 0.0);
        for round in 0..=rounds {
            let started = Instant::now();
            let chunks =
                net::encode_chunks(grad.clone(), 0..params).map(move |(offset, data)| PushChunk {
                    worker_id: 0,
                    base_version: version,
                    step: round as u64,
                    offset,
                    total_len: params as u64,
                    data,
                });
            version = client
                .push(tokio_stream::iter(chunks))
                .await
                .unwrap()
                .into_inner()
                .version;
            let pushed = started.elapsed().as_secs_f64();
            let mut stream = client
                .pull(PullRequest {
                    worker_id: 0,
                    min_version: 0,
                    step: round as u64 + 1,
                })
                .await
                .unwrap()
                .into_inner();
            // Reuses the receive buffer as the worker does.
            let mut asm = net::Assembler::with_buffer(std::mem::take(&mut buffer));
            while let Some(chunk) = stream.message().await.unwrap() {
                asm.add(chunk.offset, chunk.total_len, &chunk.data, params)
                    .unwrap();
            }
            buffer = asm.finish().unwrap();
            assert_eq!(buffer.len(), params);
            let t = started.elapsed().as_secs_f64();
            // Round 0 warms up the connection and windows.
            if round > 0 {
                total += t;
                push_total += pushed;
                pull_total += t - pushed;
            }
        }
        let _ = client
            .shutdown(ShutdownRequest {
                reason: "bench over".into(),
            })
            .await;
        eprintln!(
            "push {:.1} ms, pull {:.1} ms per round",
            push_total * 1e3 / rounds as f64,
            pull_total * 1e3 / rounds as f64
        );
        total / rounds as f64
    });
    let _ = ps_runtime.block_on(ps_task);
    (per_round, params * 4)
}

struct RunResult {
    accuracy: f64,
    samples_per_second: f64,
    seconds: f64,
    peak_rss_kib: Vec<(String, u64)>,
}

/// 1 PS + `workers` workers as separate processes of the real binary.
fn distributed(bin: &Path, spec: &TrainingSpec, workers: usize, dir: &Path) -> RunResult {
    let cluster = ClusterSpec {
        ps: vec![format!("127.0.0.1:{}", free_port())],
        worker: (0..workers)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect(),
    };
    std::fs::create_dir_all(dir).unwrap();
    let spawn = |role: &str, index: usize| {
        let name = format!("{role}-{index}");
        Command::new(bin)
            .env("KUBETRAIN_CLUSTER", cluster.to_env())
            .env("KUBETRAIN_ROLE", role)
            .env("KUBETRAIN_INDEX", index.to_string())
            .env("KUBETRAIN_TRAINING", serde_json::to_string(spec).unwrap())
            .env("POD_IP", "127.0.0.1")
            .env("RUST_LOG", "warn")
            .stdout(std::fs::File::create(dir.join(format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    };
    let started = Instant::now();
    let mut children = vec![("ps-0".to_string(), spawn("ps", 0))];
    for w in (0..workers).rev() {
        children.push((format!("worker-{w}"), spawn("worker", w)));
    }
    let mut peaks: Vec<(String, u64)> = children.iter().map(|(n, _)| (n.clone(), 0)).collect();
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let mut running = false;
        for (i, (_, child)) in children.iter_mut().enumerate() {
            if let Some(kib) = peak_rss_kib(child.id()) {
                peaks[i].1 = peaks[i].1.max(kib);
            }
            if child.try_wait().unwrap().is_none() {
                running = true;
            }
        }
        if !running {
            break;
        }
        if Instant::now() > deadline {
            for (_, c) in &mut children {
                let _ = c.kill();
            }
            panic!("distributed run timed out; logs in {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seconds = started.elapsed().as_secs_f64();
    let out = std::fs::read_to_string(dir.join("worker-0.out")).unwrap();
    let line = out
        .lines()
        .find(|l| l.starts_with("kubetrain-trainer: final"))
        .unwrap_or_else(|| panic!("no final line; logs in {}", dir.display()));
    let value = |key: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    RunResult {
        accuracy: value("test_accuracy"),
        samples_per_second: value("samples_per_second"),
        seconds,
        peak_rss_kib: peaks,
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

fn main() {
    let args = Args::parse();
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
    println!(
        "# kubetrain-trainer benchmarks ({} cores)\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // 1. Transport.
    let (grpc, bytes) = grpc_round_trip(args.rounds);
    let raw = raw_tcp_round_trip(bytes, args.rounds);
    let mib = bytes as f64 / (1 << 20) as f64;
    println!("## Push + pull of {mib:.1} MiB over loopback\n");
    println!("| path | time per push+pull | throughput (both directions) |\n|---|---|---|");
    println!(
        "| raw TCP (baseline: write, echo back) | {:.1} ms | {:.0} MiB/s |",
        raw * 1e3,
        2.0 * mib / raw
    );
    println!(
        "| gRPC Push + Pull to a PS (incl. SGD update of 4.2M params) | {:.1} ms | {:.0} MiB/s |",
        grpc * 1e3,
        2.0 * mib / grpc
    );
    println!(
        "\nratio gRPC / raw TCP throughput: **{:.2}x** (target >= 0.6x)\n",
        raw / grpc
    );

    // Where the gRPC time goes: the conversions and the optimizer alone, in this process,
    // best of 5 (the first pass over fresh memory pays page faults).
    let values = vec![0.5f32; bytes / 4];
    let mut opt = kubetrain_trainer::model::Optimizer::new(
        &OptimizerSpec {
            kind: OptimizerKind::Sgd,
            learning_rate: 0.01,
            momentum: Some(0.9),
            beta1: None,
            beta2: None,
            epsilon: None,
        },
        values.len(),
    );
    let mut params = values.clone();
    let shared = std::sync::Arc::new(values.clone());
    let mut recv = Vec::new();
    let (mut encode, mut decode, mut apply) = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..5 {
        let t = Instant::now();
        let encoded: Vec<(u64, bytes::Bytes)> =
            net::encode_chunks(shared.clone(), 0..values.len()).collect();
        encode = encode.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut asm = net::Assembler::with_buffer(std::mem::take(&mut recv));
        for (offset, chunk) in &encoded {
            asm.add(*offset, values.len() as u64, chunk, values.len())
                .unwrap();
        }
        let decoded = asm.finish().unwrap();
        decode = decode.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        opt.apply(&mut params, &decoded).unwrap();
        apply = apply.min(t.elapsed().as_secs_f64());
        recv = decoded;
    }
    println!(
        "CPU work inside one round trip, measured alone: f32->bytes {:.1} ms (x2: push and pull), bytes->f32 {:.1} ms (x2), SGD-momentum update {:.1} ms\n",
        encode * 1e3,
        decode * 1e3,
        apply * 1e3
    );

    // 2. Checkpoint.
    let (write, read, size) = checkpoint_time(&dir);
    println!(
        "## Checkpoint of 1M parameters with Adam state ({:.1} MiB)\n",
        size as f64 / (1 << 20) as f64
    );
    println!(
        "write (temp + fsync + rename + dir fsync): {:.1} ms; read + verify: {:.1} ms\n",
        write * 1e3,
        read * 1e3
    );

    // 3. Throughput: 2 workers + 1 PS vs one process with the same global batch.
    let digits = DatasetSpec {
        builtin: Some(BuiltinDataset::Digits),
        ..Default::default()
    };
    let mlp = |hidden: Vec<u32>| ModelSpec {
        kind: ModelKind::Mlp,
        hidden,
    };
    let spec = training(mlp(vec![128]), digits.clone(), 32, 20, 0.05);
    let one = local::train(&spec, 2, None).unwrap();
    let run = distributed(&bin, &spec, 2, &dir.join("digits"));
    println!("## Throughput, digits mlp [128], batch 32 per worker, 20 epochs\n");
    println!("| setup | samples/s | test accuracy |\n|---|---|---|");
    println!(
        "| 1 process, batch 64 (baseline) | {:.0} | {:.4} |",
        one.samples_per_second, one.evaluation.accuracy
    );
    println!(
        "| 1 PS + 2 workers, Sync, batch 32 each | {:.0} | {:.4} |",
        run.samples_per_second, run.accuracy
    );
    println!(
        "\nratio distributed / one process: {:.2}x\n",
        run.samples_per_second / one.samples_per_second
    );

    // 4. Fashion-MNIST.
    let fashion = DatasetSpec {
        builtin: Some(BuiltinDataset::FashionMnist),
        path: Some(args.fashion_dir.clone()),
        ..Default::default()
    };
    println!(
        "## Fashion-MNIST ({} epochs, sgd momentum 0.9, batch 64 per worker)\n",
        args.epochs
    );
    println!(
        "| model | setup | test accuracy | samples/s | wall time | peak RSS |\n|---|---|---|---|---|---|"
    );
    for (name, model, lr) in [
        (
            "softmax",
            ModelSpec {
                kind: ModelKind::Softmax,
                hidden: vec![],
            },
            0.01,
        ),
        ("mlp [256]", mlp(vec![256]), 0.05),
    ] {
        let spec = training(model, fashion.clone(), 64, args.epochs, lr);
        let started = Instant::now();
        match local::train(&spec, 1, None) {
            Ok(one) => println!(
                "| {name} | 1 process | {:.4} | {:.0} | {:.1} s | {} MiB (bench process) |",
                one.evaluation.accuracy,
                one.samples_per_second,
                started.elapsed().as_secs_f64(),
                peak_rss_kib(std::process::id()).unwrap_or(0) / 1024
            ),
            Err(e) => {
                println!("| {name} | skipped: {e} | | | | |");
                continue;
            }
        }
        let sub = dir.join(format!("fashion-{}", name.replace([' ', '[', ']'], "")));
        std::fs::create_dir_all(&sub).unwrap();
        let run = distributed(&bin, &spec, 2, &sub);
        let rss: Vec<String> = run
            .peak_rss_kib
            .iter()
            .map(|(n, k)| format!("{n} {} MiB", k / 1024))
            .collect();
        println!(
            "| {name} | 1 PS + 2 workers, Sync | {:.4} | {:.0} | {:.1} s | {} |",
            run.accuracy,
            run.samples_per_second,
            run.seconds,
            rss.join(", ")
        );
    }
    println!();
    let _ = std::fs::remove_dir_all(&dir);
}
