//! A parameter server answers malformed requests with an error status and keeps serving.
//! The tensor calls go through tonic's own generated `ParameterTransferClient` here, while
//! the PS frames them by hand (`parameter_transfer`): that they understand each other is part of
//! what this test checks.

mod common;

use std::time::Duration;

use common::*;
use kubetrain_trainer::credential::JobToken;
use kubetrain_trainer::parameter_transfer::client;
use kubetrain_trainer::proto::parameter_server_client::ParameterServerClient;
use kubetrain_trainer::proto::parameter_transfer_client::ParameterTransferClient;
use kubetrain_trainer::proto::*;
use serde_json::json;
use tonic::Code;
use tonic::transport::Channel;

fn chunk(worker_id: u32, offset: u64, total_len: u64, floats: usize) -> PushChunk {
    PushChunk {
        worker_id,
        base_version: 0,
        step: 0,
        offset,
        total_len,
        data: vec![0u8; floats * 4].into(),
    }
}

async fn push(
    client: &mut ParameterTransferClient<Channel>,
    chunks: Vec<PushChunk>,
) -> Result<u64, tonic::Status> {
    client
        .push(tokio_stream::iter(chunks))
        .await
        .map(|r| r.into_inner().version)
}

#[test]
fn parameter_server_rejects_bad_input_without_crashing() {
    let _serial = serial();
    let cluster = Cluster::new("badinput", 1, 2);
    // A 4-feature CSV: the PS reads its header, so the spec's model is a 4 -> 3 softmax of
    // 15 parameters (3 classes; a CSV's class count is only bounded, at 256).
    let csv = cluster.dir.join("four.csv");
    std::fs::write(&csv, "a,b,c,d,label\n1,2,3,4,0\n4,3,2,1,2\n").unwrap();
    let mut training = digits_training(json!({"kind": "softmax"}), json!({"kind": "Async"}), 1);
    training["dataset"] = json!({"path": csv.to_str().unwrap(), "format": "csv"});
    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = tokio::time::timeout(Duration::from_secs(30), connect(&cluster.ps[0]))
            .await
            .unwrap();
        let mut client = ParameterServerClient::new(channel.clone());
        let mut tensors = ParameterTransferClient::new(channel.clone());

        // Before any registration there is no shard to push to.
        let err = push(&mut tensors, vec![chunk(0, 0, 15, 15)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

        let register = |worker_id, total_params, widths: Vec<u32>| RegisterRequest {
            worker_id,
            total_params,
            widths,
        };
        let err = client
            .register(register(9, 15, vec![4, 3]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("unknown worker 9"), "{err}");
        let err = client
            .register(register(0, 99, vec![4, 3]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let err = client
            .register(register(0, 0, vec![u32::MAX, u32::MAX, u32::MAX]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let err = client.register(register(0, 0, vec![4])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        // Models other than the spec's are refused before anyone registered, so they lock
        // nobody out, with errors that stay short: the widths that aborted a PS under a
        // 2.5 GiB limit, and 100,000 widths that came back as a 362 KB error.
        for widths in [vec![16384, 16384], vec![4; 100_000]] {
            let total = widths
                .windows(2)
                .map(|w| w[0] as u64 * w[1] as u64 + w[1] as u64);
            let err = client
                .register(register(0, total.sum(), widths))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
            assert!(
                err.message()
                    .contains("are not this job's model [4, classes]"),
                "{err}"
            );
            assert!(err.message().len() < 300, "{} bytes", err.message().len());
        }
        // A 4 -> 3 softmax model: 15 parameters, all on this one PS.
        let ok = client
            .register(register(0, 15, vec![4, 3]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((ok.start, ok.end), (0, 15));
        // A second worker with a different model is refused.
        let err = client
            .register(register(1, 10 * 3 + 3, vec![10, 3]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

        // Wrong shape: the gradient claims another length than the shard's.
        let err = push(&mut tensors, vec![chunk(0, 0, 14, 14)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        // Truncated tensor: 8 of 15 values.
        let err = push(&mut tensors, vec![chunk(0, 0, 15, 8)])
            .await
            .unwrap_err();
        assert!(
            err.code() == Code::InvalidArgument && err.message().contains("truncated"),
            "{err}"
        );
        // Out-of-range keys: a chunk past the end of the shard.
        let err = push(
            &mut tensors,
            vec![chunk(0, 0, 15, 10), chunk(0, 10, 15, 10)],
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let err = push(&mut tensors, vec![chunk(0, 100, 15, 1)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        // Bytes that are not whole f32 values.
        let mut ragged = chunk(0, 0, 15, 15);
        ragged.data = vec![0u8; 59].into();
        let err = push(&mut tensors, vec![ragged]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        // Unknown worker ids everywhere.
        let err = push(&mut tensors, vec![chunk(7, 0, 15, 15)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let err = tensors
            .pull(PullRequest {
                worker_id: 7,
                min_version: 0,
                step: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let err = client
            .heartbeat(HeartbeatRequest { worker_id: 7 })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let err = client.done(DoneRequest { worker_id: 7 }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        // An empty push.
        let err = push(&mut tensors, vec![]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");

        // Still healthy (both services), and a well-formed push works.
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        for service in [
            "kubetrain.v1.ParameterServer",
            "kubetrain.v1.ParameterTransfer",
        ] {
            let request = tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            };
            let status = health.check(request).await.unwrap().into_inner();
            assert_eq!(
                status.status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                "{service}"
            );
        }
        let mut gradient = chunk(0, 0, 15, 15);
        let values: Vec<f32> = (0..15).map(|i| i as f32 - 7.0).collect();
        gradient.data = bytemuck::cast_slice::<f32, u8>(&values).to_vec().into();
        assert_eq!(push(&mut tensors, vec![gradient]).await.unwrap(), 1);

        // The parameters after that push, read by a stock tonic client and by the
        // worker's hand-framed one, are the same values.
        let request = PullRequest {
            worker_id: 0,
            min_version: 1,
            step: 1,
        };
        let mut stream = tensors.pull(request).await.unwrap().into_inner();
        let mut stock = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            assert_eq!((chunk.version, chunk.offset, chunk.total_len), (1, 0, 15));
            stock.extend(
                chunk
                    .data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        let wire = kubetrain_trainer::transport::channel(&cluster.ps[0]).unwrap();
        let token = JobToken::none();
        let pull_framed = |len| {
            client::pull_tensor(
                (&wire, &token),
                &request,
                Duration::from_secs(5),
                Vec::new(),
                len,
            )
        };
        let (version, framed) = pull_framed(15).await.unwrap();
        assert_eq!(version, 1);
        assert_eq!(stock, framed);
        assert!(stock.iter().any(|&v| v != 0.0), "{stock:?}");
        // A pull that expects a different shard size is refused by the worker's side.
        let err = pull_framed(14).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{err}");
        shut_down_ps(&mut client).await;
    });
    assert!(ps.wait(Duration::from_secs(30)).success(), "{}", ps.logs());
}

/// Values the API server would have refused still reach a trainer whose env is written
/// by hand: each is named at start, with a non-zero exit, never a panic.
#[test]
fn bad_training_values_are_refused_at_start_naming_the_field() {
    let _serial = serial();
    let base = digits_training(json!({"kind": "softmax"}), json!({"kind": "Sync"}), 1);
    let with = |pointer: &str, value: serde_json::Value| {
        let mut training = base.clone();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        training.pointer_mut(parent).unwrap()[key] = value;
        training
    };
    let mut misspelt = base.clone();
    let batch = misspelt
        .as_object_mut()
        .unwrap()
        .remove("batchSize")
        .unwrap();
    misspelt["batchsize"] = batch;
    let cases = [
        (
            with("/dataset/testFraction", json!(7)),
            "spec.training.dataset.testFraction",
        ),
        (
            with("/dataset/testFraction", json!(-0.5)),
            "spec.training.dataset.testFraction",
        ),
        (
            with("/optimizer/learningRate", json!(-1)),
            "spec.training.optimizer.learningRate",
        ),
        (
            with("/optimizer/momentum", json!(5)),
            "spec.training.optimizer.momentum",
        ),
        (
            with("/dataset/path", json!("/tmp/x.csv")),
            "spec.training.dataset.path",
        ),
        (
            misspelt,
            "spec.training.batchsize (did you mean batchSize?)",
        ),
        // A folder below a file can never be created: refused at start, not mid-run.
        (
            with("/logDir", json!("/dev/null/tensorboard")),
            "spec.training.logDir: creating TensorBoard events in /dev/null/tensorboard",
        ),
    ];
    for (i, (training, field)) in cases.into_iter().enumerate() {
        // A cluster (and so a log folder) per case: logs of one name are appended to.
        let cluster = Cluster::new(&format!("badvalues-{i}"), 1, 1);
        for role in ["ps", "worker"] {
            let mut process = cluster.spawn(role, 0, &training, &[]);
            let status = process.wait(Duration::from_secs(30));
            let stderr = process.stderr();
            assert!(!status.success(), "{role} accepted {training}");
            assert!(status.code().is_some(), "{role} died of a signal: {stderr}");
            assert!(
                stderr.contains(field),
                "{role}: {field} not named in\n{stderr}"
            );
            assert!(!stderr.contains("panicked"), "{role} panicked:\n{stderr}");
        }
    }
}

#[test]
fn an_unwritable_checkpoint_path_fails_the_parameter_server_at_start() {
    let _serial = serial();
    let mut training = digits_training(json!({"kind": "softmax"}), json!({"kind": "Sync"}), 1);
    // Below a file no directory can be made, for root too.
    training["checkpoint"] = json!({"path": "/dev/null/ckpt", "everySteps": 10});
    let cluster = Cluster::new("unwritable-ckpt", 1, 1);
    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    let status = ps.wait(Duration::from_secs(30));
    let stderr = ps.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("spec.training.checkpoint.path: /dev/null/ckpt is not writable here"),
        "{stderr}"
    );
    assert!(!stderr.contains("parameter server listening"), "{stderr}");
}

#[test]
fn a_missing_contract_variable_is_named_and_left_as_last_words() {
    let dir = temp_dir("missing-env");
    let last_words = dir.join("termination-log");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kubetrain-trainer"))
        .env_clear()
        .env("KUBETRAIN_ROLE", "worker")
        .env("KUBETRAIN_INDEX", "0")
        .env("KUBETRAIN_TRAINING", "{}")
        .env("KUBETRAIN_TERMINATION_LOG", &last_words)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("KUBETRAIN_CLUSTER (or --cluster <CLUSTER>)"),
        "{stderr}"
    );
    let written = std::fs::read_to_string(&last_words).expect("a termination message");
    assert!(written.contains("KUBETRAIN_CLUSTER"), "{written}");
}
