//! Dead workers and restarted parameter servers: nothing hangs, and training either
//! finishes, resumes, or fails fast naming the peer.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const RUN: Duration = Duration::from_secs(120);

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
fn sync_training_fails_past_the_grace_period_naming_the_dead_worker() {
    let _serial = serial();
    let cluster = Cluster::new("kill-sync", 1, 2);
    let training = long_training(json!({"kind": "Sync", "workerGracePeriodSeconds": 1}), None);
    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    let mut w1 = cluster.spawn("worker", 1, &training, &[]);
    let mut chief = cluster.spawn("worker", 0, &training, &[]);
    wait_for_step(&mut chief, &cluster.worker[0], 50);
    w1.kill();
    let killed = Instant::now();
    let status = chief.wait(Duration::from_secs(30));
    let took = killed.elapsed();
    assert!(!status.success(), "chief should fail\n{}", chief.logs());
    // Detection within 4 s (heartbeat timeout 3 s, grace 1 s), plus telling the chief.
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
    assert!(
        chief.stderr().contains("workerGracePeriodSeconds"),
        "{}",
        chief.logs()
    );
    assert!(!ps.wait(Duration::from_secs(30)).success(), "{}", ps.logs());
    assert!(ps.stderr().contains(&named), "{}", ps.logs());
}

/// Runs a Sync job of 1 PS and 2 workers to the end; with `replace_at`, worker 1 is
/// killed once the chief is past that step, and a new worker 1 is started only after
/// the PS has noticed it gone (as a pod recreated elsewhere would be). Returns the final
/// test accuracy and the PS's log.
fn sync_run(name: &str, replace_at: Option<u64>) -> (f64, String) {
    let cluster = Cluster::new(name, 1, 2);
    // The default grace (120 s) applies: the test sets none.
    let training = long_training(json!({"kind": "Sync"}), None);
    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    let mut w1 = cluster.spawn("worker", 1, &training, &[]);
    let mut chief = cluster.spawn("worker", 0, &training, &[]);
    if let Some(step) = replace_at {
        wait_for_step(&mut chief, &cluster.worker[0], step);
        w1.kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ps.stderr().contains("holding the step for its replacement") {
            assert!(Instant::now() < deadline, "PS never noticed\n{}", ps.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        w1 = cluster.spawn("worker", 1, &training, &[]);
    }
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    assert!(w1.wait(RUN).success(), "{}", w1.logs());
    assert!(ps.wait(RUN).success(), "{}", ps.logs());
    if replace_at.is_some() {
        assert!(
            w1.stderr().contains("continuing from the step"),
            "{}",
            w1.logs()
        );
    }
    let accuracy = final_value(&chief.stdout(), "test_accuracy").expect("final line");
    (accuracy, ps.stderr())
}

#[test]
fn sync_holds_the_step_for_a_replaced_worker_and_ends_as_an_undisturbed_run() {
    let _serial = serial();
    let (undisturbed, _) = sync_run("sync-undisturbed", None);
    let (replaced, ps_log) = sync_run("sync-replaced", Some(50));
    assert!(ps_log.contains("marked dead"), "{ps_log}");
    // Sync sums in rank order and the replacement redoes exactly the held step, so the
    // run is the same run; the bound is 0.5 pp.
    assert!(
        (replaced - undisturbed).abs() <= 0.005,
        "replaced {replaced} vs undisturbed {undisturbed}\n{ps_log}"
    );
}

/// A Sync job of 1 PS (checkpointing every `every` versions) and 2 workers, started:
/// `[ps, worker 1, chief]`.
fn checkpointed_sync(name: &str, every: u64) -> (Cluster, serde_json::Value, [Proc; 3]) {
    let cluster = Cluster::new(name, 1, 2);
    let checkpoint =
        json!({"path": cluster.dir.join("ckpt").to_str().unwrap(), "everySteps": every});
    let training = long_training(json!({"kind": "Sync"}), Some(checkpoint));
    let procs = [
        cluster.spawn("ps", 0, &training, &[]),
        cluster.spawn("worker", 1, &training, &[]),
        cluster.spawn("worker", 0, &training, &[]),
    ];
    (cluster, training, procs)
}

/// The version a PS's stdout says it shut down at.
fn shutdown_version(ps: &Proc) -> u64 {
    ps.stdout()
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
        .unwrap_or_else(|| panic!("no shutdown line\n{}", ps.logs()))
}

/// `key=<number>` from the first stderr line that contains `what`.
fn logged(log: &str, what: &str, key: &str) -> Option<u64> {
    log.lines().find(|l| l.contains(what)).and_then(|l| {
        l.split(&format!("{key}="))
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

#[test]
fn a_parameter_server_stopped_by_sigterm_checkpoints_everything_and_loses_no_step() {
    let _serial = serial();
    // Checkpoints far apart: only the final one can hold the version the PS stops at.
    let every = 1000u64;
    let (cluster, training, [mut ps, mut w1, mut chief]) = checkpointed_sync("ps-sigterm", every);
    let at_term = wait_for_step(&mut chief, &cluster.worker[0], 150);
    ps.terminate();
    // Well inside the default 30 s grace period.
    let exit = ps.wait(Duration::from_secs(10));
    assert!(exit.success(), "PS exit {exit}\n{}", ps.logs());
    let stopped = logged(&ps.stderr(), "stopping on SIGTERM", "version")
        .unwrap_or_else(|| panic!("no SIGTERM line\n{}", ps.logs()));
    assert!(stopped >= at_term, "stopped at {stopped}, before {at_term}");
    assert!(stopped < every, "the periodic checkpoint never ran");

    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    assert!(w1.wait(RUN).success(), "{}", w1.logs());
    assert!(ps.wait(RUN).success(), "{}", ps.logs());
    let resumed = logged(&ps.stderr(), "resumed shard from checkpoint", "version")
        .unwrap_or_else(|| panic!("the PS did not resume\n{}", ps.logs()));
    assert_eq!(resumed, stopped, "resumed from the final checkpoint");
    // Sync applies one version per step: every step applied before SIGTERM was kept, and
    // none twice.
    let total = final_value(&chief.stdout(), "steps").unwrap() as u64;
    assert_eq!(shutdown_version(&ps), total, "{}", ps.logs());
    let accuracy = final_value(&chief.stdout(), "test_accuracy").unwrap();
    assert!(accuracy >= 0.9, "accuracy {accuracy}\n{}", chief.logs());
}

#[test]
fn a_worker_stopped_by_sigterm_ends_its_step_and_exits_143() {
    let _serial = serial();
    let cluster = Cluster::new("worker-sigterm", 1, 2);
    let training = long_training(json!({"kind": "Async"}), None);
    let _ps = cluster.spawn("ps", 0, &training, &[]);
    let mut w1 = cluster.spawn("worker", 1, &training, &[]);
    let mut chief = cluster.spawn("worker", 0, &training, &[]);
    wait_for_step(&mut chief, &cluster.worker[0], 20);
    w1.terminate();
    let exit = w1.wait(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(143), "{}", w1.logs());
    let log = w1.stderr();
    assert!(
        log.contains("stopped by SIGTERM between steps, after step "),
        "{log}"
    );
    chief.kill();
}

#[test]
fn a_worker_stopped_by_sigterm_while_registering_exits_143_at_once() {
    let _serial = serial();
    // No PS ever comes up: the worker retries its Register until SIGTERM.
    let cluster = Cluster::new("register-sigterm", 1, 2);
    let training = long_training(json!({"kind": "Async"}), None);
    let mut w1 = cluster.spawn("worker", 1, &training, &[]);
    w1.wait_for_log(Duration::from_secs(30), |log| log.contains("worker ready"));
    let sent = Instant::now();
    w1.terminate();
    let exit = w1.wait(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(143), "{}", w1.logs());
    // Not the pod's whole grace period of retries against a PS that is gone.
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "took {:?}",
        sent.elapsed()
    );
}

#[test]
fn a_damaged_checkpoint_is_logged_and_the_one_before_it_resumes_the_run() {
    let _serial = serial();
    let every = 20u64;
    let (cluster, training, [mut ps, mut w1, mut chief]) = checkpointed_sync("ps-damaged", every);
    wait_for_step(&mut chief, &cluster.worker[0], 150);
    ps.kill();
    // As a copy cut short would leave it. A kill between the writer's two renames leaves
    // no newest file at all; then a damaged one stands in for it.
    let newest = cluster.dir.join("ckpt").join("ps-0-of-1.ckpt");
    let bytes = std::fs::read(&newest).unwrap_or_else(|_| b"KTCKPT01 cut short".to_vec());
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    assert!(w1.wait(RUN).success(), "{}", w1.logs());
    assert!(ps.wait(RUN).success(), "{}", ps.logs());
    let log = ps.stderr();
    assert!(
        log.contains("ps-0-of-1.ckpt") && log.contains("resuming from the checkpoint before it"),
        "{log}"
    );
    let resumed = logged(&log, "resumed shard from checkpoint", "version")
        .unwrap_or_else(|| panic!("the PS did not resume\n{log}"));
    assert!(
        resumed > 0 && resumed.is_multiple_of(every),
        "{resumed}\n{log}"
    );
    let accuracy = final_value(&chief.stdout(), "test_accuracy").unwrap();
    assert!(accuracy >= 0.9, "accuracy {accuracy}\n{}", chief.logs());
}

#[test]
fn restarted_parameter_server_resumes_from_its_checkpoint() {
    let _serial = serial();
    let every = 20u64;
    let (cluster, training, [mut ps, mut w1, mut chief]) = checkpointed_sync("ps-restart", every);
    let at_kill = wait_for_step(&mut chief, &cluster.worker[0], 150);
    let noticed = chief.stderr().matches("registering again").count();
    ps.kill();
    // The PS comes back only once the chief has found it gone, as after a real crash.
    chief.wait_for_log(RUN, |log| {
        log.matches("registering again").count() > noticed
    });
    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    assert!(w1.wait(RUN).success(), "{}", w1.logs());
    assert!(ps.wait(RUN).success(), "{}", ps.logs());

    let resumed = logged(&ps.stderr(), "resumed shard from checkpoint", "version")
        .unwrap_or_else(|| panic!("the PS did not resume from a checkpoint\n{}", ps.logs()));
    // The version it resumed from is one a periodic checkpoint wrote.
    assert!(
        resumed > 0 && resumed.is_multiple_of(every),
        "resumed from version {resumed}\n{}",
        ps.logs()
    );
    let total = final_value(&chief.stdout(), "steps").unwrap() as u64;
    let final_version = shutdown_version(&ps);
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
