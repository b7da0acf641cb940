//! Properties of the shard's consistency rules, over generated workers, gradients, arrival
//! orders and clocks (the unit tests in `shard.rs` pin single scenarios; `fuzz/`'s `push`
//! target drives arbitrary call sequences against a model).

use std::time::Instant;

use kubetrain_api::{OptimizerKind, OptimizerSpec};
use proptest::prelude::*;

use super::shard::{PullDecision, PushOutcome, Shard, ShardError};
use crate::consistency::Consistency;
use crate::model::Optimizer;

const LEN: usize = 3;

/// SGD at rate 1 without momentum: a shard's parameters move by exactly the gradient it
/// applied, so the applied gradient can be read off them.
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
    let params = vec![0.5, -1.0, 2.0];
    let opt = Optimizer::new(&spec, LEN);
    (
        Shard::new(0, params, opt, 0, consistency, workers, now),
        now,
    )
}

/// Gradients in quarters: exact in f32, so sums do not depend on rounding luck.
fn gradient() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec((-64i8..64).prop_map(|q| f32::from(q) * 0.25), LEN)
}

/// One Sync step: every worker's gradient and the order they arrive in.
fn sync_step(workers: usize) -> impl Strategy<Value = (Vec<Vec<f32>>, Vec<usize>)> {
    let order = Just((0..workers).collect::<Vec<_>>()).prop_shuffle();
    (prop::collection::vec(gradient(), workers), order)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The mean the rules say a Sync step applies: summed in rank order, then scaled.
fn rank_ordered_mean(grads: &[&Vec<f32>]) -> Vec<f32> {
    let mut sum = grads[0].clone();
    for g in &grads[1..] {
        sum.iter_mut().zip(g.iter()).for_each(|(s, g)| *s += g);
    }
    let scale = 1.0 / grads.len() as f32;
    sum.iter().map(|s| s * scale).collect()
}

/// Pushes one Sync step in `order`; checks the step completes exactly at the last live
/// worker's gradient and moves the parameters by the mean of the live workers' gradients.
fn run_sync_step(
    s: &mut Shard,
    now: Instant,
    grads: &[Vec<f32>],
    order: &[usize],
    done: &[bool],
) -> Result<(), TestCaseError> {
    let version = s.version();
    let before = s.params().to_vec();
    let live: Vec<usize> = order.iter().copied().filter(|&w| !done[w]).collect();
    for (i, &w) in live.iter().enumerate() {
        let outcome = s.push(w as u32, version, version, grads[w].clone(), now);
        if i + 1 < live.len() {
            prop_assert_eq!(outcome, Ok(PushOutcome::Pending));
            prop_assert_eq!(s.version(), version);
            prop_assert_eq!(bits(s.params()), bits(&before));
            // The next step's parameters are not there until every live worker is in.
            let pull = s.pull_decision(w as u32, version + 1, version + 1, now);
            prop_assert_eq!(pull, Ok(PullDecision::Wait));
        } else {
            prop_assert_eq!(
                outcome,
                Ok(PushOutcome::Applied {
                    version: version + 1
                })
            );
        }
    }
    let pushed: Vec<&Vec<f32>> = (0..grads.len())
        .filter(|&w| !done[w])
        .map(|w| &grads[w])
        .collect();
    let mean = rank_ordered_mean(&pushed);
    let want: Vec<f32> = before.iter().zip(&mean).map(|(p, g)| p - g).collect();
    prop_assert_eq!(bits(s.params()), bits(&want));
    prop_assert_eq!(s.version(), version + 1);
    for &w in &live {
        let pull = s.pull_decision(w as u32, version + 1, version + 1, now);
        prop_assert_eq!(pull, Ok(PullDecision::Ready));
    }
    Ok(())
}

/// A call of a worker on an Async or BoundedStaleness shard.
#[derive(Debug, Clone)]
enum Call {
    Push { worker: u32, behind: u64, step: u64 },
    Pull { worker: u32, step: u64 },
    Done { worker: u32 },
}

/// Steps near zero, near each other and at the very end of the range.
fn step() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..12,
        1 => (0u64..4).prop_map(|d| u64::MAX - d),
        1 => any::<u64>(),
    ]
}

fn call(workers: u32) -> impl Strategy<Value = Call> {
    prop_oneof![
        3 => (0..workers, 0u64..4, step())
            .prop_map(|(worker, behind, step)| Call::Push { worker, behind, step }),
        3 => (0..workers, step()).prop_map(|(worker, step)| Call::Pull { worker, step }),
        1 => (0..workers).prop_map(|worker| Call::Done { worker }),
    ]
}

/// What the shard has been told of each worker: steps done (its clock) and whether done.
#[derive(Debug, Clone, Copy, Default)]
struct Clock {
    steps: u64,
    done: bool,
}

fn slowest_live(clocks: &[Clock]) -> Option<u64> {
    clocks.iter().filter(|c| !c.done).map(|c| c.steps).min()
}

/// Plays `calls` on a shard; checks each push bumps the version by one and each pull
/// decision against the clocks. `bound` is None for Async.
fn play(bound: Option<u64>, workers: u32, calls: &[Call]) -> Result<(), TestCaseError> {
    let consistency = bound.map_or(Consistency::Async, Consistency::BoundedStaleness);
    let (mut s, now) = shard(consistency, workers as usize);
    let mut clocks = vec![Clock::default(); workers as usize];
    let mut applied = 0u64;
    for call in calls {
        let version = s.version();
        match *call {
            Call::Push {
                worker,
                behind,
                step,
            } => {
                let base = version.saturating_sub(behind);
                let outcome = s.push(worker, base, step, vec![0.25; LEN], now);
                prop_assert_eq!(
                    outcome,
                    Ok(PushOutcome::Applied {
                        version: version + 1
                    })
                );
                applied += 1;
                let c = &mut clocks[worker as usize];
                c.steps = c.steps.max(step.saturating_add(1));
            }
            Call::Pull { worker, step } => {
                let decision = s.pull_decision(worker, 0, step, now);
                let c = &mut clocks[worker as usize];
                c.steps = c.steps.max(step);
                let ahead = match (bound, slowest_live(&clocks)) {
                    (Some(bound), Some(slowest)) => {
                        u128::from(step) > u128::from(slowest) + u128::from(bound)
                    }
                    _ => false,
                };
                let expected = if ahead {
                    PullDecision::Wait
                } else {
                    PullDecision::Ready
                };
                prop_assert_eq!(decision, Ok(expected), "step {} clocks {:?}", step, clocks);
            }
            Call::Done { worker } => {
                s.mark_done(worker, now).unwrap();
                clocks[worker as usize].done = true;
                prop_assert_eq!(s.version(), version);
            }
        }
    }
    prop_assert_eq!(s.version(), applied);
    let histogram: u64 = s.staleness_histogram().values().sum();
    prop_assert_eq!(histogram, applied);
    Ok(())
}

proptest! {
    #[test]
    fn sync_applies_each_step_once_every_live_worker_is_in(
        (workers, steps, done) in (1usize..=4).prop_flat_map(|n| (
            Just(n),
            prop::collection::vec(sync_step(n), 1..6),
            prop::collection::vec(any::<bool>(), n),
        ))
    ) {
        let mut done = done;
        // At least one worker is still training.
        done[0] = false;
        let (mut s, now) = shard(Consistency::Sync, workers);
        for (w, &d) in done.iter().enumerate() {
            if d {
                s.mark_done(w as u32, now).unwrap();
            }
        }
        for (i, (grads, order)) in steps.iter().enumerate() {
            prop_assert_eq!(s.version(), i as u64);
            run_sync_step(&mut s, now, grads, order, &done)?;
        }
        prop_assert_eq!(s.version(), steps.len() as u64);
        prop_assert!(s.staleness_histogram().is_empty(), "Sync updates are never stale");
    }

    #[test]
    fn sync_refuses_gradients_for_any_other_version_and_changes_nothing(
        workers in 1usize..=3,
        base in prop_oneof![1u64..5, Just(u64::MAX)],
        step in step(),
        grad in gradient(),
    ) {
        let (mut s, now) = shard(Consistency::Sync, workers);
        let before = bits(s.params());
        let refused = s.push(0, base, step, grad, now);
        prop_assert_eq!(refused, Err(ShardError::Stale { base, version: 0 }));
        prop_assert_eq!((s.version(), bits(s.params())), (0, before));
    }

    #[test]
    fn async_bumps_the_version_by_one_per_accepted_push(
        (workers, calls) in (1u32..=4).prop_flat_map(|n| {
            (Just(n), prop::collection::vec(call(n), 0..40))
        })
    ) {
        play(None, workers, &calls)?;
    }

    #[test]
    fn bounded_staleness_holds_back_exactly_the_pulls_too_far_ahead(
        bound in prop_oneof![4 => 0u64..4, 1 => (0u64..3).prop_map(|d| u64::MAX - d)],
        (workers, calls) in (1u32..=4).prop_flat_map(|n| {
            (Just(n), prop::collection::vec(call(n), 0..40))
        })
    ) {
        play(Some(bound), workers, &calls)?;
    }

    #[test]
    fn the_last_step_there_is_wraps_nothing(
        consistency in prop_oneof![
            Just(Consistency::Sync),
            Just(Consistency::Async),
            (0u64..3).prop_map(Consistency::BoundedStaleness),
        ],
        min_version in prop_oneof![Just(2u64), Just(u64::MAX)],
    ) {
        let (mut s, now) = shard(consistency, 2);
        // A version this shard never reached: it restarted behind the worker.
        let restarted = s.pull_decision(0, min_version, u64::MAX, now);
        prop_assert_eq!(restarted, Ok(PullDecision::Restarted { version: 0 }));
        // Worker 1 is still at step 0: a pull for the last step waits for it under a
        // bound, and is answered otherwise.
        let pull = s.pull_decision(0, 0, u64::MAX, now);
        let expected = match consistency {
            Consistency::BoundedStaleness(_) => PullDecision::Wait,
            _ => PullDecision::Ready,
        };
        prop_assert_eq!(pull, Ok(expected));
        let push = s.push(0, 0, u64::MAX, vec![0.5; LEN], now);
        let expected = match consistency {
            Consistency::Sync => PushOutcome::Pending,
            _ => PushOutcome::Applied { version: 1 },
        };
        prop_assert_eq!(push, Ok(expected));
        // The worker at the end of the range holds nobody back.
        let behind = s.pull_decision(1, 0, 1, now);
        prop_assert_eq!(behind, Ok(PullDecision::Ready));
    }
}
