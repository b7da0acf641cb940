//! Dead workers and restarted parameter servers: nothing hangs, and training either
//! finishes, resumes, or fails fast naming the peer.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kubetrain_trainer::proto::GetProgressRequest;
use kubetrain_trainer::proto::progress_client::ProgressClient;
use serde_json::json;

const RUN: Duration = Duration::from_secs(120);

/// Polls the chief's Progress service until it reports `step >= min`.
fn wait_for_step(chief: &mut Proc, address: &str, min: u64) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let step = runtime.block_on(async {
            let mut client = ProgressClient::connect(format!("http://{address}"))
                .await
                .ok()?;
            let report = tokio::time::timeout(
                Duration::from_secs(2),
                client.get_progress(GetProgressRequest {}),
            )
            .await
            .ok()?
            .ok()?;
            Some(report.into_inner().step)
        });
        if let Some(step) = step.filter(|&s| s >= min) {
            return step;
        }
        assert!(
            Instant::now() < deadline,
            "chief never reached step {min}\n{}",
            chief.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn long_training(
    consistency: serde_json::Value,
    checkpoint: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut training = digits_training(json!({"kind": "mlp", "hidden": [64]}), consistency, 40);
    if let Some(checkpoint) = checkpoint {
        training["checkpoint"] = checkpoint;
    }
    training
}

#[test]
fn async_training_finishes_when_a_worker_dies() {
    let _serial = serial();
    let cluster = Cluster::new("kill-async", 1, 3);
    let training = long_training(json!({"kind": "Async"}), None);
    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    let mut w1 = cluster.spawn("worker", 1, &training, &[]);
    let mut w2 = cluster.spawn("worker", 2, &training, &[]);
    let mut chief = cluster.spawn("worker", 0, &training, &[]);
    wait_for_step(&mut chief, &cluster.worker[0], 50);
    w1.kill();
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    assert!(w2.wait(RUN).success(), "{}", w2.logs());
    assert!(ps.wait(RUN).success(), "{}", ps.logs());
    assert!(ps.stderr().contains("marked dead"), "{}", ps.logs());
    let accuracy = final_value(&chief.stdout(), "test_accuracy").expect("final line");
    assert!(accuracy >= 0.9, "accuracy {accuracy}\n{}", chief.logs());
}

#[test]
fn restarted_worker_registers_again_and_continues() {
    let _serial = serial();
    let cluster = Cluster::new("worker-restart", 1, 2);
    let training = long_training(json!({"kind": "Async"}), None);
    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    let mut w1 = cluster.spawn("worker", 1, &training, &[]);
    let mut chief = cluster.spawn("worker", 0, &training, &[]);
    wait_for_step(&mut chief, &cluster.worker[0], 100);
    w1.kill();
    let mut w1 = cluster.spawn("worker", 1, &training, &[]);
    assert!(w1.wait(RUN).success(), "{}", w1.logs());
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    assert!(ps.wait(RUN).success(), "{}", ps.logs());
    // The second incarnation picked up where the PS last saw the first one.
    assert!(
        w1.stderr().contains("continuing from the step"),
        "{}",
        w1.logs()
    );
}

#[test]
fn sync_training_fails_fast_naming_the_dead_worker() {
    let _serial = serial();
    let cluster = Cluster::new("kill-sync", 1, 2);
    let training = long_training(json!({"kind": "Sync"}), None);
    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    let mut w1 = cluster.spawn("worker", 1, &training, &[]);
    let mut chief = cluster.spawn("worker", 0, &training, &[]);
    wait_for_step(&mut chief, &cluster.worker[0], 50);
    w1.kill();
    let killed = Instant::now();
    let status = chief.wait(Duration::from_secs(30));
    let took = killed.elapsed();
    assert!(!status.success(), "chief should fail\n{}", chief.logs());
    // Detection within 5 s (heartbeat timeout 3 s), plus the time to tell the chief.
    assert!(
        took < Duration::from_secs(8),
        "chief took {took:?} to fail\n{}",
        chief.logs()
    );
    let named = format!("worker 1 ({})", cluster.worker[1]);
    assert!(
        chief.stderr().contains(&named),
        "chief error should name {named}\n{}",
        chief.logs()
    );
    assert!(!ps.wait(Duration::from_secs(30)).success(), "{}", ps.logs());
    assert!(ps.stderr().contains(&named), "{}", ps.logs());
}

#[test]
fn restarted_parameter_server_resumes_from_its_checkpoint() {
    let _serial = serial();
    let cluster = Cluster::new("ps-restart", 1, 2);
    let every = 20u64;
    let checkpoint =
        json!({"path": cluster.dir.join("ckpt").to_str().unwrap(), "everySteps": every});
    let training = long_training(json!({"kind": "Sync"}), Some(checkpoint));
    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    let mut w1 = cluster.spawn("worker", 1, &training, &[]);
    let mut chief = cluster.spawn("worker", 0, &training, &[]);
    let at_kill = wait_for_step(&mut chief, &cluster.worker[0], 150);
    ps.kill();
    std::thread::sleep(Duration::from_millis(500));
    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    assert!(w1.wait(RUN).success(), "{}", w1.logs());
    assert!(ps.wait(RUN).success(), "{}", ps.logs());

    let log = ps.stderr();
    let resumed: u64 = log
        .lines()
        .find(|l| l.contains("resumed shard from checkpoint"))
        .and_then(|l| {
            l.split("version=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("the PS did not resume from a checkpoint\n{}", ps.logs()));
    // The version it resumed from is one a periodic checkpoint wrote.
    assert!(
        resumed > 0 && resumed.is_multiple_of(every),
        "resumed from version {resumed}\n{}",
        ps.logs()
    );
    let total = final_value(&chief.stdout(), "steps").unwrap() as u64;
    let final_version: u64 = ps
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
        .expect("shutdown line");
    // Updates after the last *completed* checkpoint are lost. Checkpoints are written off
    // the request path, so when the kill lands while the newest one is still being written
    // (a slow fsync on a loaded machine spans many fast steps) the one before it counts:
    // at most two intervals (plus the update in flight), never more.
    assert!(
        final_version + 2 * every + 1 >= total,
        "version {final_version} of {total} steps (killed at {at_kill})\n{}",
        ps.logs()
    );
    // The updates after that checkpoint are lost, never added: none are lost only when the
    // kill landed right after a checkpoint, before the next update (seen once in CI).
    assert!(
        final_version <= total,
        "version {final_version} after {total} steps (resumed from {resumed})\n{}",
        ps.logs()
    );
    let accuracy = final_value(&chief.stdout(), "test_accuracy").unwrap();
    assert!(accuracy >= 0.9, "accuracy {accuracy}\n{}", chief.logs());
}
