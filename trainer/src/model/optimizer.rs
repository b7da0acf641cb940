use std::ops::Range;

use kubetrain_api::{OptimizerKind, OptimizerSpec};

use super::{ModelError, StepAdjust, ValueRuns};

/// An optimizer over one contiguous slice of the parameters, with its own state.
///
/// Every update is element-wise, so a shard's optimizer does exactly what the whole-model
/// optimizer would do to those elements: sharding does not change the arithmetic.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    kind: OptimizerKind,
    learning_rate: f32,
    momentum: f32,
    beta1: f32,
    beta2: f32,
    epsilon: f32,
    state: OptimizerState,
}

/// The optimizer's per-element state: part of a shard and of its checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum OptimizerState {
    /// SGD: the velocity (all zeros and unused without momentum).
    Sgd { velocity: Vec<f32> },
    /// Adam: first and second moment estimates and the number of updates taken.
    Adam { m: Vec<f32>, v: Vec<f32>, t: u64 },
}

impl OptimizerState {
    /// The state vectors, in checkpoint order.
    pub fn vectors(&self) -> Vec<&[f32]> {
        match self {
            OptimizerState::Sgd { velocity } => vec![velocity],
            OptimizerState::Adam { m, v, .. } => vec![m, v],
        }
    }

    /// Adam's update count; 0 for SGD.
    pub fn step(&self) -> u64 {
        match self {
            OptimizerState::Sgd { .. } => 0,
            OptimizerState::Adam { t, .. } => *t,
        }
    }
}

impl Optimizer {
    /// A fresh optimizer for `len` parameters, with the spec's documented defaults.
    pub fn new(spec: &OptimizerSpec, len: usize) -> Self {
        let state = match spec.kind {
            OptimizerKind::Sgd => OptimizerState::Sgd {
                velocity: vec![0.0; len],
            },
            OptimizerKind::Adam => OptimizerState::Adam {
                m: vec![0.0; len],
                v: vec![0.0; len],
                t: 0,
            },
        };
        Self {
            kind: spec.kind,
            learning_rate: spec.learning_rate as f32,
            momentum: spec.momentum.unwrap_or(0.0) as f32,
            beta1: spec.beta1.unwrap_or(0.9) as f32,
            beta2: spec.beta2.unwrap_or(0.999) as f32,
            epsilon: spec.epsilon.unwrap_or(1e-8) as f32,
            state,
        }
    }

    /// The optimizer kind.
    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// The state, for checkpoints.
    pub fn state(&self) -> &OptimizerState {
        &self.state
    }

    /// Replaces the state with one restored from a checkpoint.
    pub fn restore(&mut self, state: OptimizerState) -> Result<(), ModelError> {
        let expected = self.state.vectors()[0].len();
        let matching = std::mem::discriminant(&state) == std::mem::discriminant(&self.state);
        let got = state.vectors()[0].len();
        if !matching || got != expected || state.vectors().iter().any(|v| v.len() != expected) {
            return Err(ModelError::GradientLength { expected, got });
        }
        self.state = state;
        Ok(())
    }

    /// One update: `params -= step(grad)`.
    pub fn apply(&mut self, params: &mut [f32], grad: &[f32]) -> Result<(), ModelError> {
        self.apply_adjusted(params, grad, StepAdjust::NONE)
    }

    /// One update, its step changed by `adjust` (a stale gradient's, [`StepAdjust`]).
    pub fn apply_adjusted(
        &mut self,
        params: &mut [f32],
        grad: &[f32],
        adjust: StepAdjust,
    ) -> Result<(), ModelError> {
        self.check_lengths(params.len(), grad.len())?;
        let (step, state) = self.begin_update(adjust);
        update(step, params, state, grad.iter().copied());
        Ok(())
    }

    /// The same update from a gradient given as runs of little-endian values (as the PS
    /// received it), read where they lie instead of being copied into a vector first. The elements are split into `threads` contiguous parts, each updated
    /// on its own thread (the caller's included), since the pass is bound by how fast one
    /// core moves memory. Bit for bit what [`Optimizer::apply`] computes.
    pub fn apply_runs(
        &mut self,
        params: &mut [f32],
        grad: &impl ValueRuns,
        threads: usize,
        adjust: StepAdjust,
    ) -> Result<(), ModelError> {
        if !grad.is_whole() {
            return Err(ModelError::GradientLength {
                expected: params.len(),
                got: grad.len(),
            });
        }
        self.check_lengths(params.len(), grad.len())?;
        let len = params.len();
        let threads = threads.clamp(1, len.max(1));
        let (step, state) = self.begin_update(adjust);
        std::thread::scope(|scope| {
            let (mut params, mut state, mut start) = (params, state, 0);
            for part in 1..=threads {
                let end = len * part / threads;
                let (mine, rest) = std::mem::take(&mut params).split_at_mut(end - start);
                let (my_state, rest_state) = state.split_at_mut(end - start);
                (params, state) = (rest, rest_state);
                let range = start..end;
                let work = move || update_from_runs(step, mine, my_state, grad, range);
                if part == threads {
                    work();
                } else {
                    scope.spawn(work);
                }
                start = end;
            }
        });
        Ok(())
    }

    fn check_lengths(&self, params: usize, grad: usize) -> Result<(), ModelError> {
        if grad != params || self.state.vectors()[0].len() != params {
            return Err(ModelError::GradientLength {
                expected: params,
                got: grad,
            });
        }
        Ok(())
    }

    /// Starts one update: Adam counts it, and its bias corrections use the new count and
    /// this update's β1 (as if it had always been that: with the configured β1 instead,
    /// a lowered one would make the first steps several times too large).
    fn begin_update(&mut self, adjust: StepAdjust) -> (Step, StateSlices<'_>) {
        let mut step = Step {
            lr: self.learning_rate * adjust.lr_scale,
            mu: adjust.momentum(self.momentum),
            b1: adjust.momentum(self.beta1),
            b2: self.beta2,
            eps: self.epsilon,
            c1: 1.0,
            c2: 1.0,
        };
        let state = match &mut self.state {
            OptimizerState::Sgd { .. } if self.momentum == 0.0 => StateSlices::Plain,
            OptimizerState::Sgd { velocity } => StateSlices::Momentum(velocity),
            OptimizerState::Adam { m, v, t } => {
                *t += 1;
                step.c1 = 1.0 - step.b1.powi(*t as i32);
                step.c2 = 1.0 - self.beta2.powi(*t as i32);
                StateSlices::Adam { m, v }
            }
        };
        (step, state)
    }
}

/// The constants of one update.
#[derive(Debug, Clone, Copy)]
struct Step {
    lr: f32,
    mu: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    /// Adam's bias corrections for this update's step count.
    c1: f32,
    c2: f32,
}

/// The optimizer's state for the elements an update touches.
enum StateSlices<'a> {
    /// SGD without momentum: none.
    Plain,
    Momentum(&'a mut [f32]),
    Adam {
        m: &'a mut [f32],
        v: &'a mut [f32],
    },
}

impl<'a> StateSlices<'a> {
    fn split_at_mut(self, mid: usize) -> (Self, Self) {
        match self {
            StateSlices::Plain => (StateSlices::Plain, StateSlices::Plain),
            StateSlices::Momentum(v) => {
                let (a, b) = v.split_at_mut(mid);
                (StateSlices::Momentum(a), StateSlices::Momentum(b))
            }
            StateSlices::Adam { m, v } => {
                let ((m1, m2), (v1, v2)) = (m.split_at_mut(mid), v.split_at_mut(mid));
                (
                    StateSlices::Adam { m: m1, v: v1 },
                    StateSlices::Adam { m: m2, v: v2 },
                )
            }
        }
    }

    fn part(&mut self, range: Range<usize>) -> StateSlices<'_> {
        match self {
            StateSlices::Plain => StateSlices::Plain,
            StateSlices::Momentum(v) => StateSlices::Momentum(&mut v[range]),
            StateSlices::Adam { m, v } => StateSlices::Adam {
                m: &mut m[range.clone()],
                v: &mut v[range],
            },
        }
    }
}

/// The update of `params` (and their state) by the gradient values `grad`, element-wise.
fn update(step: Step, params: &mut [f32], state: StateSlices<'_>, grad: impl Iterator<Item = f32>) {
    let Step {
        lr,
        mu,
        b1,
        b2,
        eps,
        c1,
        c2,
    } = step;
    match state {
        StateSlices::Plain => {
            for (p, g) in params.iter_mut().zip(grad) {
                *p -= lr * g;
            }
        }
        StateSlices::Momentum(velocity) => {
            for ((p, g), v) in params.iter_mut().zip(grad).zip(velocity.iter_mut()) {
                *v = mu * *v + g;
                *p -= lr * *v;
            }
        }
        StateSlices::Adam { m, v } => {
            for (((p, g), m), v) in params
                .iter_mut()
                .zip(grad)
                .zip(m.iter_mut())
                .zip(v.iter_mut())
            {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                let m_hat = *m / c1;
                let v_hat = *v / c2;
                *p -= lr * m_hat / (v_hat.sqrt() + eps);
            }
        }
    }
}

/// [`update`] of the elements `range` (of the whole tensor) from the gradient's runs;
/// `params` and `state` hold just those elements.
fn update_from_runs(
    step: Step,
    params: &mut [f32],
    mut state: StateSlices<'_>,
    grad: &impl ValueRuns,
    range: Range<usize>,
) {
    let first = range.start;
    grad.runs(range, &mut |index, run| {
        let span = index - first..index - first + run.len();
        update(
            step,
            &mut params[span.clone()],
            state.part(span),
            run.iter().map(|b| f32::from_le_bytes(*b)),
        );
    });
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use rand::Rng;

    use super::*;

    /// A gradient as runs of little-endian values cut at random value boundaries; what
    /// the transport does with values cut inside a frame is its own tests' business.
    struct Runs {
        runs: Vec<Vec<[u8; 4]>>,
        ragged: bool,
    }

    impl Runs {
        fn cut_at_random(values: &[f32], rng: &mut StdRng) -> Self {
            let mut runs = Vec::new();
            let mut rest: Vec<[u8; 4]> = values.iter().map(|v| v.to_le_bytes()).collect();
            while !rest.is_empty() {
                let take = rng.random_range(1..=rest.len());
                runs.push(rest.drain(..take).collect());
            }
            Self {
                runs,
                ragged: false,
            }
        }
    }

    impl ValueRuns for Runs {
        fn len(&self) -> usize {
            self.runs.iter().map(Vec::len).sum()
        }

        fn is_whole(&self) -> bool {
            !self.ragged
        }

        fn runs(&self, range: Range<usize>, emit: &mut dyn FnMut(usize, &[[u8; 4]])) {
            let mut at = 0;
            for run in &self.runs {
                let (lo, hi) = (range.start.max(at), range.end.min(at + run.len()));
                if lo < hi {
                    emit(lo, &run[lo - at..hi - at]);
                }
                at += run.len();
            }
        }
    }

    fn spec(kind: OptimizerKind) -> OptimizerSpec {
        OptimizerSpec {
            kind,
            learning_rate: 0.1,
            momentum: (kind == OptimizerKind::Sgd).then_some(0.9),
            beta1: None,
            beta2: None,
            epsilon: None,
        }
    }

    #[test]
    fn sharded_updates_equal_whole_updates() {
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adam] {
            let mut whole = Optimizer::new(&spec(kind), 6);
            let (mut left, mut right) = (
                Optimizer::new(&spec(kind), 2),
                Optimizer::new(&spec(kind), 4),
            );
            let mut p = vec![1.0, -2.0, 3.0, 0.5, 0.0, 1.5];
            let mut q = p.clone();
            for step in 0..5 {
                let g: Vec<f32> = (0..6).map(|i| (i as f32 - step as f32) * 0.3).collect();
                whole.apply(&mut p, &g).unwrap();
                left.apply(&mut q[..2], &g[..2]).unwrap();
                right.apply(&mut q[2..], &g[2..]).unwrap();
            }
            assert_eq!(p, q, "{kind:?}");
        }
    }

    #[test]
    fn adam_first_step_moves_by_learning_rate() {
        let mut opt = Optimizer::new(&spec(OptimizerKind::Adam), 2);
        let mut p = vec![0.0, 0.0];
        opt.apply(&mut p, &[5.0, -0.01]).unwrap();
        assert!(
            (p[0] + 0.1).abs() < 1e-4 && (p[1] - 0.1).abs() < 1e-3,
            "{p:?}"
        );
        assert_eq!(opt.state().step(), 1);
    }

    #[test]
    fn updates_from_runs_equal_applied_ones() {
        let mut sgd0 = spec(OptimizerKind::Sgd);
        sgd0.momentum = None;
        let mut rng = StdRng::seed_from_u64(3);
        for spec in [spec(OptimizerKind::Sgd), spec(OptimizerKind::Adam), sgd0] {
            for threads in [1, 2, 3, 50] {
                let mut applied = Optimizer::new(&spec, 37);
                let mut from_runs = applied.clone();
                let mut p: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 1.0).collect();
                let mut q = p.clone();
                for step in 0..4 {
                    let g: Vec<f32> = (0..37).map(|i| (i as f32 - step as f32) * 0.3).collect();
                    applied.apply(&mut p, &g).unwrap();
                    let runs = Runs::cut_at_random(&g, &mut rng);
                    from_runs
                        .apply_runs(&mut q, &runs, threads, StepAdjust::NONE)
                        .unwrap();
                }
                assert_eq!(p, q, "{spec:?}, {threads} threads");
                assert_eq!(applied, from_runs, "{spec:?}, {threads} threads");
            }
        }
    }

    #[test]
    fn a_run_gradient_of_the_wrong_length_changes_nothing() {
        let mut opt = Optimizer::new(&spec(OptimizerKind::Adam), 4);
        let before = opt.clone();
        let mut params = vec![1.0; 4];
        let short = Runs {
            runs: vec![vec![[0; 4]; 3]],
            ragged: false,
        };
        assert!(
            opt.apply_runs(&mut params, &short, 2, StepAdjust::NONE)
                .is_err()
        );
        // Four whole values, but the bytes went on into a fifth.
        let ragged = Runs {
            runs: vec![vec![[0; 4]; 4]],
            ragged: true,
        };
        assert!(
            opt.apply_runs(&mut params, &ragged, 1, StepAdjust::NONE)
                .is_err()
        );
        assert_eq!((opt, params), (before, vec![1.0; 4]));
    }

    #[test]
    fn mismatched_gradient_is_an_error() {
        let mut opt = Optimizer::new(&spec(OptimizerKind::Sgd), 3);
        assert!(opt.apply(&mut [0.0; 3], &[1.0; 2]).is_err());
    }
}
