//! A stranger who reaches a parameter server's port (no job token, or a wrong one) tries
//! every call that once stopped or poisoned a job (#21): Shutdown, a first Register with
//! another model, a spoofed Done, a NaN push as a real worker. Each is refused as
//! UNAUTHENTICATED, and the job ends exactly as an undisturbed run of it does.

mod common;

use std::time::Duration;

use common::*;
use kubetrain_trainer::credential::JobToken;
use kubetrain_trainer::parameter_transfer::client;
use kubetrain_trainer::proto::parameter_server_client::ParameterServerClient;
use kubetrain_trainer::proto::*;
use serde_json::json;
use tonic::Code;

const RUN: Duration = Duration::from_secs(120);
const TOKEN: &str = "5f0c2a9e71d84b36a0e95c17f2d6b84e3a91c05d7e62f4b8c1a03d95e7f26b4c";
/// The real model's layer widths (digits: 64 inputs, 10 classes) and its parameter count.
const WIDTHS: [u32; 3] = [64, 64, 10];
const PARAMS: usize = 64 * 64 + 64 + 64 * 10 + 10;

fn training() -> serde_json::Value {
    digits_training(
        json!({"kind": "mlp", "hidden": [64]}),
        json!({"kind": "Sync"}),
        30,
    )
}

/// A job of 1 PS and 2 workers with the job token; with `rogue`, a stranger makes every
/// call below before the workers start (so that a first Register could lock them out)
/// and again mid-run. Returns the chief's final test accuracy and the PS's final version.
fn run(name: &str, rogue: bool) -> (f64, u64) {
    let cluster = Cluster {
        token: Some(TOKEN.to_string()),
        ..Cluster::new(name, 1, 2)
    };
    let training = training();
    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if rogue {
        runtime.block_on(every_rogue_call_is_refused(&cluster.ps[0]));
    }
    let mut w1 = cluster.spawn("worker", 1, &training, &[]);
    let mut chief = cluster.spawn("worker", 0, &training, &[]);
    if rogue {
        wait_for_step(&mut chief, &cluster.worker[0], 100);
        runtime.block_on(every_rogue_call_is_refused(&cluster.ps[0]));
    }
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    assert!(w1.wait(RUN).success(), "{}", w1.logs());
    assert!(ps.wait(RUN).success(), "{}", ps.logs());
    let accuracy = final_value(&chief.stdout(), "test_accuracy").expect("final line");
    // The PS's last words: "... shut down at version N: ...".
    let version = ps
        .stdout()
        .lines()
        .rev()
        .find_map(|l| {
            l.split("at version ")
                .nth(1)?
                .split(':')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no shutdown line\n{}", ps.logs()));
    (accuracy, version)
}

/// Every call that drives training, without the token and with a wrong one: each is
/// refused as UNAUTHENTICATED. The job's own token gets an answer, so the refusals are
/// the token's doing, not the calls'.
async fn every_rogue_call_is_refused(addr: &str) {
    let channel = connect(addr).await;
    let wrong = JobToken::new(&TOKEN.replace('5', "6")).unwrap();
    for (who, token) in [("no token", JobToken::none()), ("a wrong token", wrong)] {
        let mut client = ParameterServerClient::with_interceptor(channel.clone(), token.attach());
        let refused = |call: &str, result: Result<(), tonic::Status>| {
            let status = result.expect_err(&format!("{call} with {who} was accepted"));
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{call} with {who}: {status}"
            );
            assert!(status.message().contains("job token"), "{status}");
        };
        let register = |widths: Vec<u32>| RegisterRequest {
            worker_id: 1,
            total_params: 0,
            widths,
        };
        refused(
            "Register with another model",
            client.register(register(vec![64, 512, 10])).await.map(drop),
        );
        refused(
            "Register as worker 1",
            client.register(register(WIDTHS.to_vec())).await.map(drop),
        );
        refused(
            "Heartbeat",
            client
                .heartbeat(HeartbeatRequest { worker_id: 1 })
                .await
                .map(drop),
        );
        refused(
            "Done for worker 1",
            client.done(DoneRequest { worker_id: 1 }).await.map(drop),
        );
        refused(
            "Shutdown",
            client
                .shutdown(ShutdownRequest {
                    reason: "a stranger says so".into(),
                })
                .await
                .map(drop),
        );
        let mut poison = vec![0.01f32; PARAMS];
        poison[PARAMS / 2] = f32::NAN;
        let head = PushChunk {
            worker_id: 1,
            ..PushChunk::default()
        };
        refused(
            "Push of a NaN gradient as worker 1",
            client::push_tensor(
                (&channel, &token),
                head,
                std::sync::Arc::new(poison),
                0..PARAMS,
                Duration::from_secs(5),
            )
            .await
            .map(drop),
        );
        let pull = PullRequest {
            worker_id: 1,
            min_version: 0,
            step: 0,
        };
        refused(
            "Pull as worker 1",
            client::pull_tensor(
                (&channel, &token),
                &pull,
                Duration::from_secs(5),
                Vec::new(),
                PARAMS,
            )
            .await
            .map(drop),
        );
    }
    // With the job's token, a Heartbeat is answered: unknown-worker or not, it is not
    // refused for want of a credential.
    let own = JobToken::new(TOKEN).unwrap();
    let mut client = ParameterServerClient::with_interceptor(channel, own.attach());
    let answer = client.heartbeat(HeartbeatRequest { worker_id: 0 }).await;
    assert!(
        answer
            .as_ref()
            .map_or_else(|s| s.code() != Code::Unauthenticated, |_| true),
        "{answer:?}"
    );
}

#[test]
fn a_stranger_without_the_job_token_can_neither_stop_nor_poison_the_job() {
    let _serial = serial();
    let (undisturbed, undisturbed_version) = run("rogue-undisturbed", false);
    let (attacked, attacked_version) = run("rogue-attacked", true);
    // Sync sums in rank order: a run nothing got into is the same run.
    assert_eq!(
        attacked_version, undisturbed_version,
        "every step applied once, none lost"
    );
    assert!(
        (attacked - undisturbed).abs() <= 0.005,
        "attacked {attacked} vs undisturbed {undisturbed}"
    );
    assert!(undisturbed >= 0.9, "the run trains: {undisturbed}");
    // The mid-run round came at step 100, well before the end.
    assert!(undisturbed_version > 200, "{undisturbed_version} steps");
    println!(
        "accuracy attacked {attacked:.4} vs undisturbed {undisturbed:.4}, both {attacked_version} steps"
    );
}
