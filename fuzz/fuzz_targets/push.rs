//! A PS shard (a small model) in each consistency mode, fed any sequence of the calls the
//! PS makes on it (register, push, push of a received wire tensor, pull decision, done,
//! liveness checks, the PS giving up), with steps and versions anywhere in `u64`.
//!
//! Each call is also made on a reference model of the documented rules (`Model`), and on
//! a twin shard that gets every wire push as a plain one. Checked, beyond "no panic" and
//! no overflow: every answer is the model's; versions never go back and move by at most
//! one per call; a refused push changes neither parameters, optimizer state nor version;
//! Sync applies the rank-ordered mean exactly when every worker still training is in;
//! a wire push does bit for bit what a plain one does; a pull in flight keeps its values.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use kubetrain_api::{OptimizerKind, OptimizerSpec};
use kubetrain_trainer::consistency::Consistency;
use kubetrain_trainer::model::Optimizer;
use kubetrain_trainer::parameter_transfer::received::ReceivedTensor;
use kubetrain_trainer::ps::{PullDecision, PushOutcome, Shard, ShardError};
use libfuzzer_sys::fuzz_target;

#[path = "push_model.rs"]
mod model;

use model::Model;

#[derive(Arbitrary, Debug)]
struct Input {
    params: u8,
    workers: u8,
    mode: Mode,
    optimizer: Opt,
    version: u16,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Mode {
    Sync,
    Async,
    Bounded(Num),
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum Opt {
    /// SGD with learning rate 1 and no momentum: the applied gradient is readable off
    /// the parameters, so the model checks it.
    Plain,
    Momentum,
    Adam,
}

/// A step, a version or a bound, anywhere in `u64` but mostly where the action is.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Num {
    Small(u8),
    /// `u64::MAX` minus this.
    Top(u8),
    Any(u64),
}

impl Num {
    fn get(self) -> u64 {
        match self {
            Num::Small(n) => u64::from(n),
            Num::Top(n) => u64::MAX - u64::from(n),
            Num::Any(n) => n,
        }
    }
}

/// A version relative to the shard's, or any.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Base {
    Current,
    Behind(u8),
    Ahead(u8),
    Abs(Num),
}

impl Base {
    fn get(self, version: u64) -> u64 {
        match self {
            Base::Current => version,
            Base::Behind(n) => version.saturating_sub(u64::from(n)),
            Base::Ahead(n) => version.saturating_add(u64::from(n)),
            Base::Abs(n) => n.get(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
struct Grad {
    /// Quarters, so that sums and means are exact.
    values: Vec<i8>,
    /// Cut or padded to the shard's length.
    fit: bool,
    poison: Option<(u8, u8)>,
}

impl Grad {
    fn get(&self, len: usize) -> Vec<f32> {
        let mut v: Vec<f32> = self.values.iter().map(|&q| f32::from(q) * 0.25).collect();
        if self.fit {
            v.resize(len, 0.0);
        }
        if let Some((at, kind)) = self.poison
            && !v.is_empty()
        {
            let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][usize::from(kind % 3)];
            let at = usize::from(at) % v.len();
            v[at] = bad;
        }
        v
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Register(u8),
    Touch(u8),
    Done(u8),
    Push {
        worker: u8,
        base: Base,
        step: Num,
        grad: Grad,
    },
    PushWire {
        worker: u8,
        base: Base,
        step: Num,
        grad: Grad,
        cuts: Vec<u8>,
        /// Bytes of a value cut off at the end.
        ragged: u8,
        threads: u8,
    },
    Pull {
        worker: u8,
        min_version: Base,
        step: Num,
    },
    /// Milliseconds pass.
    Wait(u16),
    Liveness {
        timeout: u8,
        grace: u8,
        startup: u8,
    },
    Fail,
    /// A pull starts sending the current parameters.
    Snapshot,
    /// The pulls in flight end.
    Sent,
}

/// The wire form of `values`, cut into pieces at `cuts`, with `ragged` stray bytes.
fn wire(values: &[f32], cuts: &[u8], ragged: u8) -> ReceivedTensor {
    let mut bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    bytes.extend(std::iter::repeat_n(0x7f, usize::from(ragged % 4)));
    let mut cuts: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) % (bytes.len() + 1))
        .collect();
    cuts.extend([0, bytes.len()]);
    cuts.sort_unstable();
    let mut wire = ReceivedTensor::default();
    for piece in cuts.windows(2) {
        wire.push(Bytes::copy_from_slice(&bytes[piece[0]..piece[1]]));
    }
    wire
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// What must not change when a push is refused, and must agree between the twins.
#[derive(Debug, PartialEq)]
struct Observed {
    version: u64,
    params: Vec<u32>,
    optimizer: Vec<Vec<u32>>,
    adam_step: u64,
    staleness: Vec<(u64, u64)>,
    failure: Option<String>,
    done: Vec<u32>,
    dead: Vec<u32>,
}

fn observe(shard: &Shard) -> Observed {
    let state = shard.optimizer().state();
    Observed {
        version: shard.version(),
        params: bits(shard.params()),
        optimizer: state.vectors().into_iter().map(bits).collect(),
        adam_step: state.step(),
        staleness: shard
            .staleness_histogram()
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect(),
        failure: shard.failure().map(str::to_string),
        done: shard.done_workers(),
        dead: shard.dead_workers(),
    }
}

fn new_shard(input: &Input, len: usize, workers: usize, now: Instant) -> Shard {
    let (momentum, kind) = match input.optimizer {
        Opt::Plain => (None, OptimizerKind::Sgd),
        Opt::Momentum => (Some(0.9), OptimizerKind::Sgd),
        Opt::Adam => (None, OptimizerKind::Adam),
    };
    let spec = OptimizerSpec {
        kind,
        learning_rate: 1.0,
        momentum,
        beta1: None,
        beta2: None,
        epsilon: None,
    };
    let params = (0..len).map(|i| i as f32 - 1.5).collect();
    Shard::new(
        7,
        params,
        Optimizer::new(&spec, len),
        u64::from(input.version),
        consistency(input.mode),
        workers,
        now,
    )
}

fn consistency(mode: Mode) -> Consistency {
    match mode {
        Mode::Sync => Consistency::Sync,
        Mode::Async => Consistency::Async,
        Mode::Bounded(s) => Consistency::BoundedStaleness(s.get()),
    }
}

/// The shard, its twin (plain pushes only), the model, the clock and the pulls in flight.
struct Run {
    shard: Shard,
    twin: Shard,
    model: Model,
    now: Instant,
    in_flight: Vec<(Arc<Vec<f32>>, Vec<u32>)>,
    plain: bool,
}

impl Run {
    fn push(&mut self, worker: u32, base: u64, step: u64, values: Vec<f32>) {
        let before = observe(&self.shard);
        let now = self.now;
        let expected = self.model.push(worker, base, step, &values, now);
        let got = self.shard.push(worker, base, step, values.clone(), now);
        let twin = self.twin.push(worker, base, step, values, now);
        assert_eq!(got, twin);
        self.check_push(got, expected, &before);
    }

    fn push_received(
        &mut self,
        worker: u32,
        base: u64,
        step: u64,
        grad: &Grad,
        op: (&[u8], u8, u8),
    ) {
        let (cuts, ragged, threads) = op;
        let values = grad.get(self.shard.params().len());
        let tensor = wire(&values, cuts, ragged);
        let threads = usize::from(threads % 3) + 1;
        let before = observe(&self.shard);
        let now = self.now;
        let got = self
            .shard
            .push_received(worker, base, step, &tensor, threads, now);
        if ragged % 4 != 0 {
            // Not a whole number of values: refused as it stands, whatever else it says.
            assert!(got.is_err(), "a ragged wire tensor was taken: {got:?}");
            assert_eq!(
                observe(&self.shard),
                before,
                "a refused push changed the shard"
            );
            return;
        }
        let expected = self.model.push(worker, base, step, &values, now);
        let twin = self.twin.push(worker, base, step, values, now);
        assert_eq!(got, twin, "a wire push answers otherwise than a plain one");
        self.check_push(got, expected, &before);
    }

    fn check_push(
        &mut self,
        got: Result<PushOutcome, ShardError>,
        expected: Result<model::Pushed, ShardError>,
        before: &Observed,
    ) {
        use ShardError::Failed;
        let after = observe(&self.shard);
        match (got, expected) {
            (Err(got), Err(expected)) => {
                // The failure's reason is the shard's to word.
                if !matches!((&got, &expected), (Failed(_), Failed(_))) {
                    assert_eq!(got, expected);
                }
                assert_eq!(&after, before, "a refused push changed the shard");
            }
            (Ok(PushOutcome::Pending), Ok(model::Pushed::Pending)) => {
                assert_eq!(
                    (after.version, &after.params),
                    (before.version, &before.params)
                );
            }
            (Ok(PushOutcome::Applied { version }), Ok(model::Pushed::Applied(gradient))) => {
                assert_eq!(version, before.version + 1);
                assert_eq!(version, after.version);
                self.check_applied(&before.params, &gradient);
            }
            (got, expected) => panic!("shard said {got:?}, the rules {expected:?}"),
        }
    }

    /// With plain SGD at rate 1 the parameters moved by exactly the applied gradient.
    fn check_applied(&self, before: &[u32], gradient: &[f32]) {
        if !self.plain {
            return;
        }
        let want: Vec<f32> = before
            .iter()
            .zip(gradient)
            .map(|(p, g)| f32::from_bits(*p) - 1.0 * g)
            .collect();
        assert_eq!(
            bits(self.shard.params()),
            bits(&want),
            "not the expected update"
        );
    }

    fn done(&mut self, worker: u32) {
        let before = observe(&self.shard);
        let expected = self.model.done(worker, self.now);
        let got = self.shard.mark_done(worker, self.now);
        assert_eq!(got, self.twin.mark_done(worker, self.now));
        match (got, expected) {
            (Ok(()), Ok(applied)) => {
                let version = self.shard.version();
                assert_eq!(version, before.version + u64::from(applied.is_some()));
                if let Some(gradient) = applied {
                    self.check_applied(&before.params, &gradient);
                }
            }
            (Err(got), Err(expected)) => assert_eq!(got, expected),
            (got, expected) => panic!("shard said {got:?}, the rules {expected:?}"),
        }
    }

    fn liveness(&mut self, timeout: u8, grace: u8, startup: u8) {
        let secs = |s: u8| Duration::from_millis(u64::from(s) * 50);
        let (timeout, grace, startup) = (secs(timeout), secs(grace), secs(startup));
        let addresses: Vec<String> = (0..self.model.workers()).map(|i| format!("w{i}")).collect();
        let expected = self.model.liveness(self.now, timeout, grace, startup);
        let got = self
            .shard
            .check_liveness(self.now, timeout, grace, startup, &addresses);
        let twin = self
            .twin
            .check_liveness(self.now, timeout, grace, startup, &addresses);
        assert_eq!(got, twin);
        assert_eq!(got, expected.newly_dead, "other workers were declared dead");
        match (self.shard.failure(), expected.failed) {
            (Some(reason), Some(worker)) => {
                assert!(
                    reason.starts_with(&format!("worker {worker} (w{worker}) ")),
                    "{reason}"
                );
            }
            (None, None) => {}
            (Some(reason), None) if expected.already_failed => assert!(!reason.is_empty()),
            (got, expected) => panic!("failure {got:?}, the rules {expected:?}"),
        }
    }

    fn step(&mut self, op: &Op) {
        let workers = self.model.workers() as u32;
        // One more than there are: the shard must refuse a stranger.
        let who = |w: u8| u32::from(w) % (workers + 1);
        let version = self.shard.version();
        let now = self.now;
        match op {
            Op::Register(w) => {
                let got = self.shard.register(who(*w), now);
                assert_eq!(got, self.twin.register(who(*w), now));
                assert_eq!(got, self.model.register(who(*w), now));
            }
            Op::Touch(w) => {
                let got = self.shard.touch(who(*w), now);
                assert_eq!(got, self.twin.touch(who(*w), now));
                assert_eq!(got, self.model.touch(who(*w), now));
            }
            Op::Done(w) => self.done(who(*w)),
            Op::Push {
                worker,
                base,
                step,
                grad,
            } => {
                let values = grad.get(self.shard.params().len());
                self.push(who(*worker), base.get(version), step.get(), values);
            }
            Op::PushWire {
                worker,
                base,
                step,
                grad,
                cuts,
                ragged,
                threads,
            } => {
                let op = (cuts.as_slice(), *ragged, *threads);
                self.push_received(who(*worker), base.get(version), step.get(), grad, op);
            }
            Op::Pull {
                worker,
                min_version,
                step,
            } => {
                let (w, min, step) = (who(*worker), min_version.get(version), step.get());
                let got = self.shard.pull_decision(w, min, step, now);
                assert_eq!(got, self.twin.pull_decision(w, min, step, now));
                let expected = self.model.pull(w, min, step, now);
                match (&got, &expected) {
                    (Ok(PullDecision::Failed(_)), Ok(PullDecision::Failed(_))) => {}
                    _ => assert_eq!(got, expected, "worker {w} min {min} step {step}"),
                }
            }
            Op::Wait(ms) => self.now += Duration::from_millis(u64::from(*ms)),
            Op::Liveness {
                timeout,
                grace,
                startup,
            } => self.liveness(*timeout, *grace, *startup),
            Op::Fail => {
                self.shard.fail("the PS gave up".into());
                self.twin.fail("the PS gave up".into());
                self.model.fail();
            }
            Op::Snapshot if self.in_flight.len() < 3 => {
                let sent = self.shard.snapshot();
                let copy = bits(&sent);
                self.in_flight.push((sent, copy));
            }
            Op::Snapshot => {}
            Op::Sent => self.in_flight.clear(),
        }
    }

    fn check(&self, version_before: u64) {
        let (shard, twin) = (observe(&self.shard), observe(&self.twin));
        assert_eq!(shard, twin, "the wire pushes and the plain ones diverged");
        assert!(shard.version >= version_before, "the version went back");
        assert!(
            shard.version - version_before <= 1,
            "two versions in one call"
        );
        assert_eq!(shard.version, self.model.version());
        assert_eq!((shard.done, shard.dead), self.model.done_and_dead());
        assert_eq!(shard.failure.is_some(), self.model.failed());
        let applied: u64 = shard.staleness.iter().map(|(_, n)| n).sum();
        assert_eq!(applied, self.model.applied_on_arrival());
        for (sent, copy) in &self.in_flight {
            assert_eq!(&bits(sent), copy, "a pull in flight saw its values change");
        }
    }
}

fuzz_target!(|input: Input| {
    let len = usize::from(input.params % 6) + 1;
    let workers = usize::from(input.workers % 4) + 1;
    let now = Instant::now();
    let shard = new_shard(&input, len, workers, now);
    let twin = new_shard(&input, len, workers, now);
    let model = Model::new(
        u64::from(input.version),
        consistency(input.mode),
        workers,
        len,
        now,
    );
    let mut run = Run {
        shard,
        twin,
        model,
        now,
        in_flight: Vec::new(),
        plain: input.optimizer == Opt::Plain,
    };
    for op in &input.ops {
        let version = run.shard.version();
        run.step(op);
        run.check(version);
    }
});
