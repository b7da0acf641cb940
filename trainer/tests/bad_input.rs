//! A parameter server answers malformed requests with an error status and keeps serving.

mod common;

use std::time::Duration;

use common::*;
use kubetrain_trainer::proto::parameter_server_client::ParameterServerClient;
use kubetrain_trainer::proto::*;
use serde_json::json;
use tonic::Code;
use tonic::transport::Channel;

async fn connect(addr: &str) -> Channel {
    for _ in 0..100 {
        if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("PS at {addr} never came up");
}

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
    client: &mut ParameterServerClient<Channel>,
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
    let training = digits_training(json!({"kind": "softmax"}), json!({"kind": "Async"}), 1);
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

        // Before any registration there is no shard to push to.
        let err = push(&mut client, vec![chunk(0, 0, 15, 15)])
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
        let err = push(&mut client, vec![chunk(0, 0, 14, 14)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        // Truncated tensor: 8 of 15 values.
        let err = push(&mut client, vec![chunk(0, 0, 15, 8)])
            .await
            .unwrap_err();
        assert!(
            err.code() == Code::InvalidArgument && err.message().contains("truncated"),
            "{err}"
        );
        // Out-of-range keys: a chunk past the end of the shard.
        let err = push(&mut client, vec![chunk(0, 0, 15, 10), chunk(0, 10, 15, 10)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let err = push(&mut client, vec![chunk(0, 100, 15, 1)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        // Bytes that are not whole f32 values.
        let mut ragged = chunk(0, 0, 15, 15);
        ragged.data = vec![0u8; 59].into();
        let err = push(&mut client, vec![ragged]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        // Unknown worker ids everywhere.
        let err = push(&mut client, vec![chunk(7, 0, 15, 15)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let err = client
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
        let err = push(&mut client, vec![]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");

        // Still healthy, and a well-formed push works.
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "kubetrain.v1.ParameterServer".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            status.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        assert_eq!(
            push(&mut client, vec![chunk(0, 0, 15, 15)]).await.unwrap(),
            1
        );
        client
            .shutdown(ShutdownRequest {
                reason: "test over".into(),
            })
            .await
            .unwrap();
    });
    assert!(ps.wait(Duration::from_secs(30)).success(), "{}", ps.logs());
}
