use kubetrain_api::{OptimizerKind, OptimizerSpec};

use crate::parameter_transfer::received::ReceivedTensor;

use super::*;

fn shard(consistency: Consistency, workers: usize) -> (Shard, Instant) {
    let spec = OptimizerSpec {
        kind: OptimizerKind::Sgd,
        learning_rate: 1.0,
        momentum: None,
        beta1: None,
        beta2: None,
        epsilon: None,
    };
    let now = Instant::now();
    let opt = Optimizer::new(&spec, 2);
    (
        Shard::new(10, vec![0.0, 0.0], opt, 0, consistency, workers, now),
        now,
    )
}

#[test]
fn sync_applies_the_rank_ordered_mean_once_all_pushed() {
    let (mut s, now) = shard(Consistency::Sync, 2);
    assert_eq!(
        s.push(1, 0, 0, vec![1.0, 2.0], now),
        Ok(PushOutcome::Pending)
    );
    assert_eq!(s.pull_decision(1, 1, 1, now), Ok(PullDecision::Wait));
    assert_eq!(
        s.push(0, 0, 0, vec![3.0, 4.0], now),
        Ok(PushOutcome::Applied { version: 1 })
    );
    assert_eq!(s.params(), &[-2.0, -3.0]);
    assert_eq!(s.pull_decision(1, 1, 1, now), Ok(PullDecision::Ready));
    // A gradient for an old version is refused, not silently mixed in.
    assert_eq!(
        s.push(0, 0, 0, vec![1.0, 1.0], now),
        Err(ShardError::Stale {
            base: 0,
            version: 1
        })
    );
}

#[test]
fn sync_continues_without_workers_that_are_done() {
    let (mut s, now) = shard(Consistency::Sync, 2);
    s.mark_done(1, now).unwrap();
    assert_eq!(
        s.push(0, 0, 0, vec![1.0, 1.0], now),
        Ok(PushOutcome::Applied { version: 1 })
    );
}

#[test]
fn bad_input_is_an_error() {
    let (mut s, now) = shard(Consistency::Async, 2);
    assert!(matches!(
        s.push(0, 0, 0, vec![1.0], now),
        Err(ShardError::WrongLength { .. })
    ));
    assert!(matches!(
        s.push(5, 0, 0, vec![1.0, 1.0], now),
        Err(ShardError::UnknownWorker { .. })
    ));
    assert!(matches!(
        s.register(9, now),
        Err(ShardError::UnknownWorker { .. })
    ));
    assert!(matches!(
        s.push(0, 3, 0, vec![1.0, 1.0], now),
        Err(ShardError::Stale { .. })
    ));
    assert_eq!(
        s.pull_decision(0, 7, 0, now),
        Ok(PullDecision::Restarted { version: 0 })
    );
}

fn momentum_shard(workers: usize) -> Shard {
    let spec = OptimizerSpec {
        kind: OptimizerKind::Sgd,
        learning_rate: 0.5,
        momentum: Some(0.9),
        beta1: None,
        beta2: None,
        epsilon: None,
    };
    Shard::new(
        0,
        vec![1.0, 2.0, 3.0],
        Optimizer::new(&spec, 3),
        0,
        Consistency::Async,
        workers,
        Instant::now(),
    )
}

/// `values` as received in two pieces, the cut inside a value.
fn wire(values: &[f32]) -> ReceivedTensor {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut wire = ReceivedTensor::default();
    wire.push(bytes::Bytes::copy_from_slice(&bytes[..5]));
    wire.push(bytes::Bytes::copy_from_slice(&bytes[5..]));
    wire
}

#[test]
fn wire_pushes_equal_plain_ones() {
    let now = Instant::now();
    let (g1, g2) = (vec![1.0, -1.0, 0.5], vec![0.25, 2.0, -3.0]);
    let mut s = momentum_shard(2);
    assert_eq!(
        s.push_received(1, 0, 0, &wire(&g2), 2, now),
        Ok(PushOutcome::Applied { version: 1 })
    );
    assert_eq!(
        s.push_received(0, 0, 0, &wire(&g1), 1, now),
        Ok(PushOutcome::Applied { version: 2 })
    );
    let mut plain = momentum_shard(2);
    plain.push(1, 0, 0, g2.clone(), now).unwrap();
    plain.push(0, 0, 0, g1.clone(), now).unwrap();
    assert_eq!(s.params(), plain.params());
    assert_eq!(s.optimizer(), plain.optimizer());
    assert_eq!(s.staleness_histogram(), plain.staleness_histogram());
    // Sync sums it with the others' first, as a plain push.
    let (mut sync, _) = shard(Consistency::Sync, 1);
    assert_eq!(
        sync.push_received(0, 0, 0, &wire(&[1.0, 2.0]), 2, now),
        Ok(PushOutcome::Applied { version: 1 })
    );
    assert_eq!(sync.params(), &[-1.0, -2.0]);
}

#[test]
fn a_refused_wire_push_changes_nothing() {
    let now = Instant::now();
    let mut s = momentum_shard(1);
    let before = (s.params().to_vec(), s.optimizer().clone());
    assert!(matches!(
        s.push_received(0, 0, 0, &wire(&[1.0, 1.0]), 1, now),
        Err(ShardError::WrongLength { .. })
    ));
    assert!(matches!(
        s.push_received(0, 4, 0, &wire(&[1.0; 3]), 1, now),
        Err(ShardError::Stale { .. })
    ));
    assert!(matches!(
        s.push_received(3, 0, 0, &wire(&[1.0; 3]), 1, now),
        Err(ShardError::UnknownWorker { .. })
    ));
    assert_eq!((s.params().to_vec(), s.optimizer().clone()), before);
    assert_eq!(s.version(), 0);
}

#[test]
fn a_wire_push_cut_inside_a_value_is_refused_in_sync_too() {
    // Found by `fuzz/` (target `push`): Sync copied the whole values and dropped the rest.
    let now = Instant::now();
    let (mut s, _) = shard(Consistency::Sync, 1);
    let mut cut = wire(&[1.0, 2.0]);
    cut.push(bytes::Bytes::from_static(&[0x3f]));
    assert_eq!(
        s.push_received(0, 0, 0, &cut, 1, now),
        Err(ShardError::WrongLength {
            expected: 2,
            got: 2
        })
    );
    assert_eq!((s.version(), s.params()), (0, &[0.0, 0.0][..]));
    // Nothing of it is pending: the next whole push completes the step on its own.
    assert_eq!(
        s.push_received(0, 0, 0, &wire(&[1.0, 2.0]), 1, now),
        Ok(PushOutcome::Applied { version: 1 })
    );
    assert_eq!(s.params(), &[-1.0, -2.0]);
}

#[test]
fn a_non_finite_gradient_is_refused_naming_the_worker_and_changes_nothing() {
    let now = Instant::now();
    for consistency in [
        Consistency::Sync,
        Consistency::Async,
        Consistency::BoundedStaleness(1),
    ] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut s = momentum_shard(2);
            s.consistency = consistency;
            let before = (s.params().to_vec(), s.optimizer().clone());
            let refused = ShardError::NonFinite {
                worker: 1,
                step: 0,
                index: 2,
            };
            assert_eq!(
                s.push(1, 0, 0, vec![1.0, 0.5, bad], now),
                Err(refused.clone())
            );
            assert_eq!(
                s.push_received(1, 0, 0, &wire(&[1.0, 0.5, bad]), 1, now),
                Err(refused.clone())
            );
            assert!(refused.to_string().starts_with("worker 1 pushed"));
            assert_eq!((s.params().to_vec(), s.optimizer().clone()), before);
            assert_eq!(s.version(), 0);
            // The refused worker's clock did not move: in Sync nothing is pending from it,
            // so worker 0 alone cannot complete the step.
            if consistency == Consistency::Sync {
                assert_eq!(s.push(0, 0, 0, vec![1.0; 3], now), Ok(PushOutcome::Pending));
            }
        }
    }
}

#[test]
fn a_pull_in_flight_keeps_its_version_and_its_buffer_is_reused() {
    let now = Instant::now();
    let mut s = momentum_shard(1);
    let sent = s.snapshot();
    s.push_received(0, 0, 0, &wire(&[1.0; 3]), 1, now).unwrap();
    // The pull still sends version 0, unchanged; the shard moved on in a copy.
    assert_eq!(*sent, vec![1.0, 2.0, 3.0]);
    assert_eq!(s.params(), &[0.5, 1.5, 2.5]);
    let sent_at = sent.as_ptr();
    drop(sent);
    // Another pull in flight: the next update's copy goes to version 0's buffer.
    let second = s.snapshot();
    s.push(0, 1, 1, vec![1.0; 3], now).unwrap();
    assert_eq!(s.params().as_ptr(), sent_at);
    assert_eq!(*second, vec![0.5, 1.5, 2.5]);
    let mut plain = momentum_shard(1);
    plain.push(0, 0, 0, vec![1.0; 3], now).unwrap();
    plain.push(0, 1, 1, vec![1.0; 3], now).unwrap();
    assert_eq!(s.params(), plain.params());
}

#[test]
fn a_stale_gradient_gives_up_the_momentum_asynchrony_adds_unless_told_to_apply_it() {
    // Worker 0's push is fresh; worker 1's, against the same version, is one behind.
    let second_step = |policy| {
        let now = Instant::now();
        let mut s = momentum_shard(2).with_stale_gradients(policy);
        s.push(0, 0, 0, vec![1.0; 3], now).unwrap();
        let after_first = s.params()[0];
        s.push(1, 0, 0, vec![1.0; 3], now).unwrap();
        (after_first, after_first - s.params()[0])
    };
    // lr 0.5, momentum 0.9: the fresh update is 0.5 in every policy.
    let (first, applied) = second_step(StaleGradients::Apply);
    assert_eq!(first, 0.5);
    assert!((applied - 0.5 * 1.9).abs() < 1e-6, "{applied}");
    // Two workers leave updates about one behind: asynchrony's momentum is about 1/2,
    // and the velocity keeps only about 0.4 of its 1.0.
    let (first, corrected) = second_step(StaleGradients::CorrectMomentum);
    assert_eq!(first, 0.5);
    assert!((corrected - 0.5 * 1.4).abs() < 0.01, "{corrected}");
    let (_, scaled) = second_step(StaleGradients::ScaleLearningRate);
    assert!((scaled - 0.25 * 1.9).abs() < 1e-6, "{scaled}");
    // The default is the one that converges at Sync's settings.
    assert_eq!(StaleGradients::default(), StaleGradients::CorrectMomentum);
}

#[test]
fn async_records_staleness() {
    let (mut s, now) = shard(Consistency::Async, 2);
    s.push(0, 0, 0, vec![1.0, 1.0], now).unwrap();
    s.push(1, 0, 0, vec![1.0, 1.0], now).unwrap();
    s.push(0, 2, 1, vec![1.0, 1.0], now).unwrap();
    assert_eq!(
        s.staleness_histogram()
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect::<Vec<_>>(),
        vec![(0, 2), (1, 1)]
    );
}

#[test]
fn bounded_staleness_holds_back_the_fastest() {
    let (mut s, now) = shard(Consistency::BoundedStaleness(1), 2);
    for step in 0..2 {
        assert_eq!(s.pull_decision(0, 0, step, now), Ok(PullDecision::Ready));
        s.push(0, s.version(), step, vec![0.0, 0.0], now).unwrap();
    }
    // Worker 0 has done 2 steps, worker 1 none: step 2 is 2 ahead of the slowest.
    assert_eq!(s.pull_decision(0, 0, 2, now), Ok(PullDecision::Wait));
    s.push(1, s.version(), 0, vec![0.0, 0.0], now).unwrap();
    assert_eq!(s.pull_decision(0, 0, 2, now), Ok(PullDecision::Ready));
    // A finished worker no longer holds anyone back.
    s.mark_done(1, now).unwrap();
    assert_eq!(s.pull_decision(0, 0, 9, now), Ok(PullDecision::Ready));
}

#[test]
fn a_step_at_the_end_of_the_range_wraps_nothing() {
    let (mut s, now) = shard(Consistency::BoundedStaleness(2), 2);
    // A rogue pull claims both workers are at the last step there is. The first is
    // held back by the second, which is still at 0.
    assert_eq!(s.pull_decision(0, 0, u64::MAX, now), Ok(PullDecision::Wait));
    assert_eq!(
        s.pull_decision(1, 0, u64::MAX, now),
        Ok(PullDecision::Ready)
    );
    // slowest + staleness once wrapped to 1, and every later pull waited for good.
    assert_eq!(s.pull_decision(0, 0, 5, now), Ok(PullDecision::Ready));
    assert_eq!(
        s.pull_decision(0, u64::MAX, 5, now),
        Ok(PullDecision::Restarted { version: 0 })
    );
}

#[test]
fn a_push_for_the_last_step_there_is_wraps_nothing() {
    // Found by `fuzz/` (target `push`): `step + 1` overflowed in `admit`.
    for consistency in [
        Consistency::Sync,
        Consistency::Async,
        Consistency::BoundedStaleness(2),
    ] {
        let (mut s, now) = shard(consistency, 2);
        let outcome = s.push(0, 0, u64::MAX, vec![1.0, 1.0], now);
        let expected = match consistency {
            Consistency::Sync => PushOutcome::Pending,
            _ => PushOutcome::Applied { version: 1 },
        };
        assert_eq!(outcome, Ok(expected), "{consistency:?}");
    }
    // The pushing worker's clock stops at the end of the range, so it holds nobody
    // back, and is itself held back by the slowest.
    let (mut s, now) = shard(Consistency::BoundedStaleness(2), 2);
    s.push(0, 0, u64::MAX, vec![1.0, 1.0], now).unwrap();
    assert_eq!(s.pull_decision(1, 0, 2, now), Ok(PullDecision::Ready));
    assert_eq!(s.pull_decision(0, 0, u64::MAX, now), Ok(PullDecision::Wait));
}

#[test]
fn sync_holds_the_step_for_a_silent_worker_and_fails_naming_it_past_the_grace() {
    let (mut s, now) = shard(Consistency::Sync, 2);
    s.register(0, now).unwrap();
    s.register(1, now).unwrap();
    let addrs = vec!["a:1".to_string(), "b:2".to_string()];
    let (timeout, grace, startup) = (
        Duration::from_secs(3),
        Duration::from_secs(120),
        Duration::from_secs(60),
    );
    let at = |secs| now + Duration::from_secs(secs);
    s.touch(0, at(4)).unwrap();
    assert_eq!(
        s.check_liveness(at(4), timeout, grace, startup, &addrs),
        vec![1]
    );
    // Dead, but within the grace: the step waits for worker 1, the job has not failed.
    assert_eq!(s.failure(), None);
    assert_eq!(s.dead_workers(), vec![1]);
    s.touch(0, at(100)).unwrap();
    assert!(
        s.check_liveness(at(100), timeout, grace, startup, &addrs)
            .is_empty()
    );
    assert_eq!(s.failure(), None);
    assert_eq!(s.pull_decision(0, 1, 1, at(100)), Ok(PullDecision::Wait));

    // Past the grace with no replacement, the job fails naming the worker and the field.
    s.touch(0, at(125)).unwrap();
    s.check_liveness(at(125), timeout, grace, startup, &addrs);
    let failure = s.failure().unwrap();
    assert!(failure.contains("worker 1 (b:2)"), "{failure}");
    assert!(failure.contains("workerGracePeriodSeconds"), "{failure}");
    assert!(matches!(
        s.pull_decision(0, 0, 0, now),
        Ok(PullDecision::Failed(_))
    ));
}

#[test]
fn a_replaced_sync_worker_resumes_at_the_held_step_and_the_step_completes() {
    let (mut s, now) = shard(Consistency::Sync, 2);
    let addrs = vec!["a:1".to_string(), "b:2".to_string()];
    let (timeout, grace, startup) = (
        Duration::from_secs(3),
        Duration::from_secs(120),
        Duration::from_secs(60),
    );
    for w in 0..2 {
        s.register(w, now).unwrap();
    }
    // Step 0 completes; worker 1's pull for step 1 (sent beside its push) raises its
    // clock, then worker 0 pushes step 1 and worker 1 dies before its own push lands.
    s.push(0, 0, 0, vec![1.0; 2], now).unwrap();
    s.push(1, 0, 0, vec![1.0; 2], now).unwrap();
    assert_eq!(s.version(), 1);
    assert_eq!(s.pull_decision(1, 2, 2, now), Ok(PullDecision::Wait));
    s.push(0, 1, 1, vec![1.0; 2], now).unwrap();
    let later = now + Duration::from_secs(10);
    s.touch(0, later).unwrap();
    assert_eq!(
        s.check_liveness(later, timeout, grace, startup, &addrs),
        vec![1]
    );
    assert_eq!(s.version(), 1, "the step is held for worker 1");

    // The replacement resumes at step 1, the held one, not at its old clock (2).
    assert_eq!(s.register(1, later), Ok(1));
    assert_eq!(s.pull_decision(1, 1, 1, later), Ok(PullDecision::Ready));
    let outcome = s.push(1, 1, 1, vec![1.0; 2], later).unwrap();
    assert_eq!(outcome, PushOutcome::Applied { version: 2 });
    assert_eq!(s.dead_workers(), Vec::<u32>::new());
    assert_eq!(s.failure(), None);

    // A worker whose gradient was in when it died resumes one step on, and waits for
    // the step to complete before it pulls.
    s.push(1, 2, 2, vec![1.0; 2], later).unwrap();
    assert_eq!(s.register(1, later), Ok(3));
    assert_eq!(s.pull_decision(1, 3, 3, later), Ok(PullDecision::Wait));
    s.push(0, 2, 2, vec![1.0; 2], later).unwrap();
    assert_eq!(s.pull_decision(1, 3, 3, later), Ok(PullDecision::Ready));
}
