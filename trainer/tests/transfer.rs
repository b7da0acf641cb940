//! Large pushes, which the PS keeps as received and applies from the frames' bytes on
//! several threads, apply exactly the optimizer's update; a push that breaks off changes
//! nothing; a push that another push overtakes is applied after it, in the order they
//! completed; a push with a NaN in it is refused whole.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kubetrain_trainer::credential::JobToken;
use kubetrain_trainer::parameter_transfer::chunks;
use kubetrain_trainer::parameter_transfer::client;
use kubetrain_trainer::proto::parameter_server_client::ParameterServerClient;
use kubetrain_trainer::proto::parameter_transfer_client::ParameterTransferClient;
use kubetrain_trainer::proto::*;
use kubetrain_trainer::transport;
use serde_json::json;
use tonic::Code;
use tonic::transport::Channel;

/// A digits MLP 64 -> 4096 -> 10: 311,306 parameters, above the PS's threshold for
/// applying a push on a blocking thread, split over several. The PS's spec names the same
/// model, as a PS accepts no other.
const WIDTHS: [u32; 3] = [64, 4096, 10];
const PARAMS: usize = 64 * 4096 + 4096 + 4096 * 10 + 10;
const LR: f32 = 0.05;
const MU: f32 = 0.9;
const DEADLINE: Duration = Duration::from_secs(10);

fn gradient(seed: u32) -> Arc<Vec<f32>> {
    Arc::new(
        (0..PARAMS)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect(),
    )
}

/// SGD with momentum, as the optimizer computes it.
fn sgd(params: &mut [f32], velocity: &mut [f32], grad: &[f32]) {
    for ((p, v), g) in params.iter_mut().zip(velocity.iter_mut()).zip(grad) {
        *v = MU * *v + g;
        *p -= LR * *v;
    }
}

async fn pull(channel: &Channel, worker_id: u32, min_version: u64) -> (u64, Vec<f32>) {
    let request = PullRequest {
        worker_id,
        min_version,
        step: 0,
    };
    client::pull_tensor(
        (channel, &JobToken::none()),
        &request,
        DEADLINE,
        Vec::new(),
        PARAMS,
    )
    .await
    .unwrap()
}

/// One worker's whole push, framed as the worker frames it; the shard's version after it.
async fn push(channel: &Channel, worker_id: u32, base_version: u64, grad: &Arc<Vec<f32>>) -> u64 {
    client::push_tensor(
        (channel, &JobToken::none()),
        head(worker_id, base_version),
        grad.clone(),
        0..PARAMS,
        DEADLINE,
    )
    .await
    .unwrap()
}

/// Gradient bytes the PS has received so far, from its `/metrics`.
async fn received_bytes(metrics: &str) -> f64 {
    let metrics = metrics.to_string();
    let text = tokio::task::spawn_blocking(move || http_get(&metrics, "/metrics"))
        .await
        .unwrap();
    sample(&text, "kubetrain_trainer_ps_push_received_bytes_total")
        .unwrap_or_else(|| panic!("no push_received_bytes in\n{text}"))
}

fn head(worker_id: u32, base_version: u64) -> PushChunk {
    PushChunk {
        worker_id,
        base_version,
        ..Default::default()
    }
}

/// The worker's chunks of `grad`, as a stock client sends them.
fn chunks(worker_id: u32, base_version: u64, grad: &Arc<Vec<f32>>) -> Vec<PushChunk> {
    chunks::encode_chunks(grad.clone(), 0..PARAMS)
        .map(|(offset, data)| PushChunk {
            offset,
            total_len: PARAMS as u64,
            data,
            ..head(worker_id, base_version)
        })
        .collect()
}

#[test]
fn large_pushes_apply_exactly_and_atomically() {
    let _serial = serial();
    let cluster = Cluster::new("transfer", 1, 2);
    let training = digits_training(
        json!({"kind": "mlp", "hidden": [WIDTHS[1]]}),
        // Plain optimizer steps, so that the expected parameters are `sgd`'s: how a stale
        // push is scaled is the shard's unit tests' business.
        json!({"kind": "Async", "staleGradients": "Apply"}),
        1,
    );
    // The test's client sends no heartbeats.
    let port = METRICS_PORT.to_string();
    let flags = ["--heartbeat-timeout-ms", "600000", "--metrics-port", &port];
    let mut ps = cluster.spawn("ps", 0, &training, &flags);
    let metrics = cluster.metrics_addr("ps", 0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = transport::channel(&cluster.ps[0]).unwrap();
        let mut control = ParameterServerClient::new(channel.clone());
        let mut registered = false;
        for _ in 0..100 {
            for worker_id in 0..2 {
                let request = RegisterRequest {
                    worker_id,
                    total_params: PARAMS as u64,
                    widths: WIDTHS.to_vec(),
                };
                registered = control.register(request).await.is_ok();
            }
            if registered {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(registered, "the PS never came up: {}", ps.logs());

        let (version, mut expected) = pull(&channel, 0, 0).await;
        assert_eq!(version, 0);
        let mut velocity = vec![0.0f32; PARAMS];

        // A whole push is exactly one optimizer step.
        let g1 = gradient(1);
        let version = push(&channel, 0, 0, &g1).await;
        assert_eq!(version, 1);
        sgd(&mut expected, &mut velocity, &g1);
        assert_eq!(pull(&channel, 0, 1).await, (1, expected.clone()));

        // Pushes that break off, after some chunks were received, change nothing.
        let mut stock = ParameterTransferClient::new(channel.clone());
        let g2 = gradient(2);
        let mut out_of_order = chunks(0, 1, &g2);
        out_of_order.swap(2, 3);
        let err = stock
            .push(tokio_stream::iter(out_of_order))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let mut truncated = chunks(0, 1, &g2);
        truncated.truncate(truncated.len() / 2);
        let err = stock.push(tokio_stream::iter(truncated)).await.unwrap_err();
        assert!(err.message().contains("truncated"), "{err}");
        assert_eq!(pull(&channel, 0, 1).await, (1, expected.clone()));

        // Worker 0 sends half its push and stalls; worker 1's whole push overtakes it.
        let (send, receive) = tokio::sync::mpsc::channel(64);
        let slow = tokio::spawn({
            let mut stock = stock.clone();
            async move {
                stock
                    .push(tokio_stream::wrappers::ReceiverStream::new(receive))
                    .await
            }
        });
        let slow_chunks = chunks(0, 1, &g2);
        let half = slow_chunks.len() / 2;
        let half_bytes: usize = slow_chunks[..half].iter().map(|c| c.data.len()).sum();
        let before = received_bytes(&metrics).await;
        let mut slow_chunks = slow_chunks.into_iter();
        for chunk in slow_chunks.by_ref().take(half) {
            send.send(chunk).await.unwrap();
        }
        // The other push must land while the PS holds this half, or the case is not tested.
        let holds_half = before + half_bytes as f64;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while received_bytes(&metrics).await < holds_half {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the PS never received the first half of the slow push: {}",
                ps.logs()
            );
            tokio::task::yield_now().await;
        }
        let g3 = gradient(3);
        let version = push(&channel, 1, 1, &g3).await;
        assert_eq!(version, 2);
        for chunk in slow_chunks {
            send.send(chunk).await.unwrap();
        }
        drop(send);
        let version = slow.await.unwrap().unwrap().into_inner().version;
        assert_eq!(version, 3);
        sgd(&mut expected, &mut velocity, &g3);
        sgd(&mut expected, &mut velocity, &g2);
        assert_eq!(pull(&channel, 0, 3).await, (3, expected.clone()));

        // One chunk larger than an HTTP/2 frame (1 MiB), whose fields before the payload
        // are not a whole number of values long: the frame boundary cuts a value in two,
        // as any client with other frame sizes may, and the PS applies it all the same.
        let g4 = gradient(4);
        let one_chunk = PushChunk {
            total_len: PARAMS as u64,
            data: chunks::to_bytes(&g4),
            ..head(0, 3)
        };
        let fields = prost::Message::encoded_len(&one_chunk) - PARAMS * 4;
        assert_ne!((5 + fields) % 4, 0, "the frame boundary must cut a value");
        assert!(PARAMS * 4 > transport::MAX_FRAME as usize);
        let version = stock
            .push(tokio_stream::iter([one_chunk]))
            .await
            .unwrap()
            .into_inner()
            .version;
        assert_eq!(version, 4);
        sgd(&mut expected, &mut velocity, &g4);
        assert_eq!(pull(&channel, 0, 4).await, (4, expected.clone()));

        // A poisoned push, NaN in its last chunk: refused whole, naming the worker, and the
        // parameters and momentum are as they were (the next good push lands as computed).
        let mut poisoned = gradient(5).as_ref().clone();
        poisoned[PARAMS - 7] = f32::NAN;
        let err = client::push_tensor(
            (&channel, &JobToken::none()),
            head(1, 4),
            Arc::new(poisoned),
            0..PARAMS,
            DEADLINE,
        )
        .await
        .unwrap_err();
        let text = format!("{err:?}");
        assert!(text.contains("worker 1 pushed a gradient"), "{text}");
        assert!(text.contains("NaN or infinite"), "{text}");
        assert!(text.contains(&format!("offset {}", PARAMS - 7)), "{text}");
        assert_eq!(pull(&channel, 0, 4).await, (4, expected.clone()));
        let g6 = gradient(6);
        assert_eq!(push(&channel, 1, 4, &g6).await, 5);
        sgd(&mut expected, &mut velocity, &g6);
        assert_eq!(pull(&channel, 0, 5).await, (5, expected));

        shut_down_ps(&mut control).await;
    });
    assert!(ps.wait(Duration::from_secs(30)).success(), "{}", ps.logs());
}
