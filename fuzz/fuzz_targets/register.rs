//! The pure part of the PS's Register handler: a registration's layer widths checked
//! against the model the PS's own spec describes, then the shard built from the widths it
//! accepts, as `ps::server` builds it.
//!
//! Checked, beyond "no panic": the verdict is the documented one (malformed, too large,
//! not the spec, or the parameter count); the count is the model's own and within
//! `MAX_PARAMS`, so no accepted registration makes the PS allocate past the cap; the
//! error stays short whatever the widths; and the shard built holds exactly its range.
#![no_main]

use std::time::Instant;

use arbitrary::Arbitrary;
use kubetrain_api::{OptimizerKind, OptimizerSpec};
use kubetrain_trainer::consistency::Consistency;
use kubetrain_trainer::data::{DataShape, MAX_CLASSES};
use kubetrain_trainer::model::{Network, Optimizer};
use kubetrain_trainer::ps::fuzzing::{ExpectedModel, MAX_PARAMS, RefusedModel, check};
use kubetrain_trainer::ps::{PushOutcome, Shard, shard_ranges};
use libfuzzer_sys::fuzz_target;

/// Accepted models up to this many parameters are built for real; larger ones (up to the
/// 4 GiB cap) would only test the allocator against libFuzzer's RSS limit.
const BUILD: usize = 1 << 18;

#[derive(Arbitrary, Debug)]
struct Input {
    hidden: Vec<u32>,
    /// The dataset's shape where this PS can read it.
    data: Option<(u32, Option<u32>)>,
    widths: Widths,
    servers: u8,
    index: u8,
    workers: u8,
    adam: bool,
    seed: u64,
}

#[derive(Arbitrary, Debug)]
enum Widths {
    /// Whatever a stranger sends (`repeated uint32 widths`).
    Raw(Vec<u32>),
    /// The spec's hidden layers between these ends, where the spec does not fix them.
    Spec { inputs: u32, classes: u32 },
}

fn widths(input: &Input) -> Vec<usize> {
    match &input.widths {
        Widths::Raw(w) => w.iter().map(|&w| w as usize).collect(),
        Widths::Spec { inputs, classes } => {
            let (i, c) = match input.data {
                Some((i, c)) => (i, c.unwrap_or(*classes)),
                None => (*inputs, *classes),
            };
            std::iter::once(i)
                .chain(input.hidden.iter().copied())
                .chain([c])
                .map(|w| w as usize)
                .collect()
        }
    }
}

/// The parameter count in arithmetic that cannot overflow.
fn exact_total(widths: &[usize]) -> u128 {
    widths
        .windows(2)
        .map(|w| w[0] as u128 * w[1] as u128 + w[1] as u128)
        .sum()
}

fn refused(expected: &ExpectedModel, widths: &[usize], error: &RefusedModel) {
    let malformed = widths.len() < 2 || widths.contains(&0);
    match error {
        RefusedModel::Malformed(_) => assert!(malformed),
        RefusedModel::TooLarge { total, .. } => {
            assert!(!malformed);
            assert_eq!(*total, exact_total(widths));
            assert!(*total > MAX_PARAMS as u128);
        }
        RefusedModel::NotTheSpec { .. } => {
            assert!(!malformed && exact_total(widths) <= MAX_PARAMS as u128);
        }
    }
    // The stranger's widths are cut short; only the spec's own model is echoed in full.
    let spec = 24 * (expected.hidden.len() + 2);
    let text = error.to_string();
    assert!(text.len() <= 400 + spec, "{} bytes of error", text.len());
}

fn accepted(expected: &ExpectedModel, widths: &[usize], total: usize, input: &Input) {
    assert!(widths.len() >= 2 && !widths.contains(&0));
    assert!(total <= MAX_PARAMS);
    assert_eq!(total as u128, exact_total(widths));
    let (first, last) = (widths[0], widths[widths.len() - 1]);
    assert_eq!(&widths[1..widths.len() - 1], expected.hidden.as_slice());
    assert!(expected.inputs.is_none_or(|i| i == first));
    assert!(expected.classes.map_or(last <= MAX_CLASSES, |c| c == last));
    let net = Network::new(first, &widths[1..widths.len() - 1], last);
    assert_eq!(
        net.num_params(),
        total,
        "the model counts its parameters otherwise"
    );

    let servers = usize::from(input.servers).max(1);
    let ranges = shard_ranges(total, servers);
    assert_eq!(ranges.len(), servers);
    assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
    assert_eq!((ranges[0].start, ranges[servers - 1].end), (0, total));
    let range = ranges[usize::from(input.index) % servers].clone();
    if total > BUILD {
        return;
    }
    let spec = OptimizerSpec {
        kind: if input.adam {
            OptimizerKind::Adam
        } else {
            OptimizerKind::Sgd
        },
        learning_rate: 0.1,
        momentum: None,
        beta1: None,
        beta2: None,
        epsilon: None,
    };
    let params = net.init(input.seed)[range.clone()].to_vec();
    let optimizer = Optimizer::new(&spec, range.len());
    let workers = usize::from(input.workers % 8) + 1;
    let now = Instant::now();
    let mut shard = Shard::new(
        range.start,
        params,
        optimizer,
        0,
        Consistency::Async,
        workers,
        now,
    );
    assert_eq!((shard.start, shard.end), (range.start, range.end));
    assert_eq!(shard.params().len(), range.len());
    assert!(shard.params().iter().all(|p| p.is_finite()));
    assert_eq!(shard.register(0, now), Ok(0));
    let zero = vec![0.0; range.len()];
    assert_eq!(
        shard.push(0, 0, 0, zero, now),
        Ok(PushOutcome::Applied { version: 1 })
    );
}

fuzz_target!(|input: Input| {
    let hidden = input.hidden.iter().map(|&h| h as usize).collect();
    let data = input.data.map(|(inputs, classes)| DataShape {
        inputs: inputs as usize,
        classes: classes.map(|c| c as usize),
    });
    let expected = ExpectedModel::new(hidden, data);
    let widths = widths(&input);
    match check(&expected, &widths) {
        Ok(total) => accepted(&expected, &widths, total, &input),
        Err(error) => refused(&expected, &widths, &error),
    }
});
