//! Section `transport`: a 16 MiB push+pull over loopback gRPC against raw TCP, and the
//! discarding PS that is the transport's ceiling.

use super::*;
use kubetrain_trainer::parameter_transfer::{self, body, chunks, client};
use kubetrain_trainer::transport;

/// Raw TCP: send `bytes`, read as many back, `rounds` times; median seconds per round.
/// Without `update` the server echoes what it read. With it, the server is the least a
/// parameter server on a bare socket must do: read the gradient straight into an `f32`
/// buffer, apply the optimizer in place and send the parameters back (little-endian hosts,
/// as every one this runs on).
fn raw_tcp_round_trip(bytes: usize, rounds: usize, update: Option<&OptimizerSpec>) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let values = bytes / 4;
    let mut optimizer = update.map(|spec| Optimizer::new(spec, values));
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut grad = vec![0.0f32; values];
        let mut params = vec![0.5f32; values];
        for _ in 0..=rounds {
            s.read_exact(bytemuck::cast_slice_mut(&mut grad)).unwrap();
            match &mut optimizer {
                Some(optimizer) => {
                    optimizer.apply(&mut params, &grad).unwrap();
                    s.write_all(bytemuck::cast_slice(&params)).unwrap();
                }
                None => s.write_all(bytemuck::cast_slice(&grad)).unwrap(),
            }
        }
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    let out = vec![0.001f32; values];
    let mut back = vec![0.0f32; values];
    let mut times = Vec::new();
    // Round 0 warms up the socket buffers and the pages of every buffer.
    for round in 0..=rounds {
        let started = Instant::now();
        c.write_all(bytemuck::cast_slice(&out)).unwrap();
        c.read_exact(bytemuck::cast_slice_mut(&mut back)).unwrap();
        if round > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    server.join().unwrap();
    median(times)
}

/// The job the transport's PS runs: Async, so each push is applied as it arrives, with
/// the SGD-momentum optimizer of every example job. Its model is the one the pushes are
/// for, since a PS accepts only its own spec's model.
fn transport_training() -> TrainingSpec {
    let mut spec = training(
        ModelSpec {
            kind: ModelKind::Mlp,
            hidden: TRANSPORT_WIDTHS[1..3].iter().map(|&w| w as u32).collect(),
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
    spec
}

/// Median seconds per push+pull, per push and per pull, and the payload size.
struct GrpcTimes {
    round: f64,
    push: f64,
    pull: f64,
    bytes: usize,
}

/// The transport's model: a digits MLP 64 -> 2009 -> 2009 -> 10, 4,190,784 parameters,
/// 3,520 values short of 16 MiB.
const TRANSPORT_WIDTHS: [usize; 4] = [64, 2009, 2009, 10];

fn transport_params() -> usize {
    TRANSPORT_WIDTHS
        .windows(2)
        .map(|w| w[0] * w[1] + w[1])
        .sum()
}

/// gRPC: push a 16 MiB gradient to a PS in its own process (the real `kubetrain-trainer`
/// binary) and pull the parameters back, as a worker does.
fn grpc_round_trip(bin: &Path, rounds: usize, dir: &Path) -> GrpcTimes {
    let addr = own_addr();
    let cluster = ClusterSpec {
        ps: vec![addr.to_string()],
        worker: vec!["127.0.0.1:1".into()],
        ..ClusterSpec::default()
    };
    let spec = transport_training();
    let mut ps = Command::new(bin)
        .env("KUBETRAIN_CLUSTER", cluster.to_env())
        .env("KUBETRAIN_ROLE", "ps")
        .env("KUBETRAIN_INDEX", "0")
        .env("KUBETRAIN_TRAINING", serde_json::to_string(&spec).unwrap())
        .env("POD_IP", addr.ip().to_string())
        .env("RUST_LOG", "warn")
        // This client sends no heartbeats; Async does not need them.
        .args(["--heartbeat-timeout-ms", "600000"])
        .stdout(std::fs::File::create(dir.join("transport-ps.out")).unwrap())
        .stderr(std::fs::File::create(dir.join("transport-ps.err")).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let times = push_pull_rounds(addr, rounds, Server::TrainerPs, dir);
    let status = ps.wait().unwrap();
    assert!(status.success(), "the PS failed; logs in {}", dir.display());
    times
}

/// The same rounds against [`serve_discarding_ps`] in its own process (this binary again):
/// the same HTTP/2 connection, framing and answers as the real PS, but a push is read,
/// held to its end and dropped, and every pull answers one fixed vector. This is what the
/// transport alone costs: the ceiling for any PS that also applies the push.
fn discarding_round_trip(rounds: usize, dir: &Path) -> GrpcTimes {
    let addr = own_addr();
    let mut server = Command::new(std::env::current_exe().unwrap())
        .args(["--discarding-ps-addr", &addr.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("discarding-ps.err")).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let times = push_pull_rounds(addr, rounds, Server::Discarding, dir);
    let _ = server.kill();
    let _ = server.wait();
    times
}

/// Which server [`push_pull_rounds`] talks to.
#[derive(Clone, Copy, PartialEq)]
enum Server {
    /// The real PS: registered with first, shut down after.
    TrainerPs,
    /// [`serve_discarding_ps`]: no registration, killed after.
    Discarding,
}

/// One worker's push+pull rounds over the worker's own calls (`parameter_transfer::client`), on a runtime
/// shaped like a data-parallel worker's: one async thread besides this one.
fn push_pull_rounds(
    addr: std::net::SocketAddr,
    rounds: usize,
    server: Server,
    dir: &Path,
) -> GrpcTimes {
    let params = transport_params();
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = dir.to_path_buf();
    // On a task of the runtime, as the worker's pushes and pulls are: there they share the
    // async thread with the connection, which matters for where a pulled frame is cached
    // when it is copied.
    let rounds_task = async move {
        let started = Instant::now();
        let channel = transport::channel(&addr.to_string()).unwrap();
        let deadline = Duration::from_secs(30);
        let token = JobToken::none();
        let grad = std::sync::Arc::new(vec![0.001f32; params]);
        let push = |version: u64, step: u64| {
            let head = PushChunk {
                worker_id: 0,
                base_version: version,
                step,
                ..Default::default()
            };
            client::push_tensor((&channel, &token), head, grad.clone(), 0..params, deadline)
        };
        // Until the server is up: the PS's registration, or (discarding) a first push.
        let mut client = loop {
            let c = ParameterServerClient::new(channel.clone())
                .max_decoding_message_size(transport::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(transport::MAX_MESSAGE_BYTES);
            let up = match server {
                Server::TrainerPs => {
                    let req = RegisterRequest {
                        worker_id: 0,
                        total_params: params as u64,
                        widths: TRANSPORT_WIDTHS.iter().map(|&w| w as u32).collect(),
                    };
                    c.clone().register(req).await.is_ok()
                }
                Server::Discarding => push(0, 0).await.is_ok(),
            };
            if up {
                break c;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the server did not come up; logs in {}",
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut version = 0;
        let mut buffer = Vec::new();
        let (mut rounds_t, mut pushes, mut pulls) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..=rounds {
            let started = Instant::now();
            push(version, round as u64).await.unwrap();
            let pushed = started.elapsed().as_secs_f64();
            let request = PullRequest {
                worker_id: 0,
                min_version: 0,
                step: round as u64 + 1,
            };
            // Reuses the receive buffer as the worker does.
            let (pulled, values) = client::pull_tensor(
                (&channel, &token),
                &request,
                deadline,
                std::mem::take(&mut buffer),
                params,
            )
            .await
            .unwrap();
            version = pulled;
            buffer = values;
            let t = started.elapsed().as_secs_f64();
            // Round 0 warms up the connection, the windows and both sides' buffers.
            if round > 0 {
                rounds_t.push(t);
                pushes.push(pushed);
                pulls.push(t - pushed);
            }
        }
        if server == Server::TrainerPs {
            let _ = client
                .shutdown(ShutdownRequest {
                    reason: "bench over".into(),
                })
                .await;
        }
        GrpcTimes {
            round: median(rounds_t),
            push: median(pushes),
            pull: median(pulls),
            bytes: params * 4,
        }
    };
    client_runtime.block_on(async { tokio::spawn(rounds_task).await.unwrap() })
}

/// The least a gRPC parameter server can do (see [`discarding_round_trip`]).
#[derive(Clone)]
struct DiscardingPs(std::sync::Arc<Vec<f32>>);

impl NamedService for DiscardingPs {
    const NAME: &'static str = "kubetrain.v1.ParameterTransfer";
}

impl Service<http::Request<tonic::body::Body>> for DiscardingPs {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let params = self.0.clone();
        Box::pin(async move {
            let (head, body) = request.into_parts();
            let answer = match head.uri.path() {
                parameter_transfer::PUSH_PATH => {
                    // Held to the end of the push, as the PS holds them to apply it, so
                    // that receiving allocates as the PS's receiving does.
                    let mut frames = Vec::new();
                    body::read_request(body, |frame| {
                        frames.push(frame);
                        Ok(())
                    })
                    .await
                    .map(|()| body::push_answer(1))
                }
                parameter_transfer::PULL_PATH => body::read_single::<PullRequest>(body)
                    .await
                    .map(|_| body::parameters_answer(1, params)),
                path => Err(tonic::Status::unimplemented(format!("no method {path}"))),
            };
            Ok(match answer {
                Ok(pieces) => body::ok_response(pieces),
                Err(status) => body::error_response(status),
            })
        })
    }
}

/// Serves [`DiscardingPs`] at `addr` with the PS's transport settings and runtime, until
/// killed.
pub(super) fn serve_discarding_ps(addr: std::net::SocketAddr) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let params = std::sync::Arc::new(vec![0.5f32; transport_params()]);
        transport::server()
            .add_service(DiscardingPs(params))
            .serve_with_incoming(transport::incoming(listener))
            .await
            .unwrap();
    });
}

pub(super) fn transport(args: &Args, bin: &Path, dir: &Path) {
    let optimizer = transport_training().optimizer;
    let mut runs = Vec::new();
    for _ in 0..args.transport_repeats {
        let grpc = grpc_round_trip(bin, args.rounds, dir);
        let ceiling = discarding_round_trip(args.rounds, dir);
        let raw = raw_tcp_round_trip(grpc.bytes, args.rounds, None);
        let raw_ps = raw_tcp_round_trip(grpc.bytes, args.rounds, Some(&optimizer));
        runs.push((grpc, ceiling, raw, raw_ps));
    }
    let mib = runs[0].0.bytes as f64 / (1 << 20) as f64;
    println!(
        "## Push + pull of {mib:.1} MiB over loopback, PS in its own process ({} repeats x {} rounds, median per round)\n",
        args.transport_repeats, args.rounds
    );
    println!(
        "| repeat | raw TCP write + echo | raw TCP PS, same update | gRPC, PS discards the push | gRPC push + pull (PS) | of which push | of which pull | ratio to raw TCP | ceiling: discarding PS to raw TCP | ratio to raw TCP PS |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let (mut ratios, mut ceilings, mut ps_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (grpc, discard, raw, raw_ps)) in runs.iter().enumerate() {
        let (ratio, ceiling, ps_ratio) =
            (raw / grpc.round, raw / discard.round, raw_ps / grpc.round);
        ratios.push(ratio);
        ceilings.push(ceiling);
        ps_ratios.push(ps_ratio);
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {ratio:.2}x | {ceiling:.2}x | {ps_ratio:.2}x |",
            i + 1,
            raw * 1e3,
            raw_ps * 1e3,
            discard.round * 1e3,
            grpc.round * 1e3,
            grpc.push * 1e3,
            grpc.pull * 1e3
        );
    }
    let raw = median(runs.iter().map(|r| r.2).collect());
    let raw_ps = median(runs.iter().map(|r| r.3).collect());
    let discard = median(runs.iter().map(|r| r.1.round).collect());
    let grpc = median(runs.iter().map(|r| r.0.round).collect());
    println!(
        "\nmedian: raw TCP {:.1} ms ({:.0} MiB/s both ways), raw TCP PS {:.1} ms, discarding gRPC PS {:.1} ms, gRPC PS {:.1} ms ({:.0} MiB/s); median ratio gRPC / raw TCP throughput: **{:.2}x** (target >= 0.6x); the same with a PS that discards every push (the transport alone): {:.2}x; gRPC / raw TCP PS doing the same SGD-momentum update: {:.2}x\n",
        raw * 1e3,
        2.0 * mib / raw,
        raw_ps * 1e3,
        discard * 1e3,
        grpc * 1e3,
        2.0 * mib / grpc,
        median(ratios),
        median(ceilings),
        median(ps_ratios)
    );

    // Where the gRPC time goes: the conversions and the optimizer alone, in this process,
    // best of 5 (the first pass over fresh memory pays page faults).
    let values = vec![0.5f32; runs[0].0.bytes / 4];
    let mut opt = Optimizer::new(
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
            chunks::encode_chunks(shared.clone(), 0..values.len()).collect();
        encode = encode.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut asm = chunks::Assembler::with_buffer(std::mem::take(&mut recv));
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
        "CPU work inside one round trip, measured alone: f32->bytes {:.2} ms (x2: push and pull), bytes->f32 {:.2} ms (x2), SGD-momentum update {:.2} ms\n",
        encode * 1e3,
        decode * 1e3,
        apply * 1e3
    );
}
