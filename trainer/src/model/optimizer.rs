use kubetrain_api::{OptimizerKind, OptimizerSpec};

use super::ModelError;

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
        if grad.len() != params.len() || self.state.vectors()[0].len() != params.len() {
            return Err(ModelError::GradientLength {
                expected: params.len(),
                got: grad.len(),
            });
        }
        let lr = self.learning_rate;
        match &mut self.state {
            OptimizerState::Sgd { velocity } => {
                if self.momentum == 0.0 {
                    for (p, g) in params.iter_mut().zip(grad) {
                        *p -= lr * g;
                    }
                } else {
                    let mu = self.momentum;
                    for ((p, g), v) in params.iter_mut().zip(grad).zip(velocity.iter_mut()) {
                        *v = mu * *v + g;
                        *p -= lr * *v;
                    }
                }
            }
            OptimizerState::Adam { m, v, t } => {
                *t += 1;
                let (b1, b2, eps) = (self.beta1, self.beta2, self.epsilon);
                let c1 = 1.0 - b1.powi(*t as i32);
                let c2 = 1.0 - b2.powi(*t as i32);
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
        Ok(())
    }
}

/// One update computed piece by piece into buffers of its own, leaving the optimizer and
/// the parameters untouched until [`Optimizer::commit_staged`]. A parameter server uses it
/// to apply a gradient while the gradient is still arriving; if the rest never comes the
/// staged update is simply dropped, and nothing was corrupted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StagedUpdate {
    params: Vec<f32>,
    /// The optimizer's state vectors after the update, in [`OptimizerState::vectors`] order
    /// (none for SGD without momentum, whose velocity is unused).
    state: Vec<Vec<f32>>,
    done: usize,
}

impl StagedUpdate {
    /// Elements staged so far (always a prefix).
    pub fn staged(&self) -> usize {
        self.done
    }

    /// Hands over a spare buffer (say, parameters no longer in use) for the next update's
    /// parameters, so staging does not allocate.
    pub fn reuse_params(&mut self, buffer: Vec<f32>) {
        self.params = buffer;
    }
}

impl Optimizer {
    fn stages_state(&self) -> usize {
        match (&self.state, self.momentum == 0.0) {
            (OptimizerState::Sgd { .. }, true) => 0,
            (OptimizerState::Sgd { .. }, false) => 1,
            (OptimizerState::Adam { .. }, _) => 2,
        }
    }

    /// Prepares `scratch` (any earlier staged update, for its buffers) to stage an update of
    /// all `len` parameters.
    pub fn begin_staged(&self, mut scratch: StagedUpdate, len: usize) -> StagedUpdate {
        scratch.params.resize(len, 0.0);
        scratch.state.resize_with(self.stages_state(), Vec::new);
        for v in &mut scratch.state {
            v.resize(len, 0.0);
        }
        scratch.done = 0;
        scratch
    }

    /// Stages the update of `params[offset..offset + grad.len()]`, which must follow the
    /// part staged before. Bit for bit what [`Optimizer::apply`] computes. The gradient is
    /// in its wire form, little-endian `f32` values at any alignment, so that a parameter
    /// server stages straight from the bytes it received instead of copying them first.
    pub fn stage_le(
        &self,
        staged: &mut StagedUpdate,
        params: &[f32],
        offset: usize,
        grad: &[[u8; 4]],
    ) -> Result<(), ModelError> {
        let grad = grad.iter().map(|b| f32::from_le_bytes(*b));
        let end = offset + grad.len();
        let len = staged.params.len();
        if offset != staged.done
            || end > len
            || params.len() != len
            || self.state.vectors()[0].len() != len
            || staged.state.len() != self.stages_state()
        {
            return Err(ModelError::GradientLength {
                expected: len.saturating_sub(staged.done),
                got: grad.len(),
            });
        }
        let lr = self.learning_rate;
        let p_in = &params[offset..end];
        let p_out = &mut staged.params[offset..end];
        match (&self.state, staged.state.as_mut_slice()) {
            (OptimizerState::Sgd { .. }, []) => {
                for ((out, p), g) in p_out.iter_mut().zip(p_in).zip(grad) {
                    *out = *p - lr * g;
                }
            }
            (OptimizerState::Sgd { velocity }, [v_out]) => {
                let mu = self.momentum;
                for ((((out, p), g), v), v_out) in p_out
                    .iter_mut()
                    .zip(p_in)
                    .zip(grad)
                    .zip(&velocity[offset..end])
                    .zip(&mut v_out[offset..end])
                {
                    *v_out = mu * *v + g;
                    *out = *p - lr * *v_out;
                }
            }
            (OptimizerState::Adam { m, v, t }, [m_out, v_out]) => {
                let t = *t + 1;
                let (b1, b2, eps) = (self.beta1, self.beta2, self.epsilon);
                let c1 = 1.0 - b1.powi(t as i32);
                let c2 = 1.0 - b2.powi(t as i32);
                for (((((out, p), g), (m, m_out)), v), v_out) in p_out
                    .iter_mut()
                    .zip(p_in)
                    .zip(grad)
                    .zip(m[offset..end].iter().zip(&mut m_out[offset..end]))
                    .zip(&v[offset..end])
                    .zip(&mut v_out[offset..end])
                {
                    *m_out = b1 * *m + (1.0 - b1) * g;
                    *v_out = b2 * *v + (1.0 - b2) * g * g;
                    let m_hat = *m_out / c1;
                    let v_hat = *v_out / c2;
                    *out = *p - lr * m_hat / (v_hat.sqrt() + eps);
                }
            }
            _ => unreachable!("begin_staged sized the state for this optimizer"),
        }
        staged.done = end;
        Ok(())
    }

    /// Takes a fully staged update: the optimizer moves to its new state and the new
    /// parameters are returned, with the old state's buffers as scratch for the next one.
    pub fn commit_staged(
        &mut self,
        mut staged: StagedUpdate,
    ) -> Result<(Vec<f32>, StagedUpdate), ModelError> {
        let len = self.state.vectors()[0].len();
        if staged.done != len || staged.params.len() != len {
            return Err(ModelError::GradientLength {
                expected: len,
                got: staged.done,
            });
        }
        match (&mut self.state, staged.state.as_mut_slice()) {
            (OptimizerState::Sgd { .. }, []) => {}
            (OptimizerState::Sgd { velocity }, [v]) => std::mem::swap(velocity, v),
            (OptimizerState::Adam { m, v, t }, [m2, v2]) => {
                std::mem::swap(m, m2);
                std::mem::swap(v, v2);
                *t += 1;
            }
            _ => {
                return Err(ModelError::GradientLength {
                    expected: len,
                    got: staged.done,
                });
            }
        }
        let params = std::mem::take(&mut staged.params);
        staged.done = 0;
        Ok((params, staged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Values in their wire form.
    fn le(values: &[f32]) -> Vec<[u8; 4]> {
        values.iter().map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn staged_updates_equal_applied_ones() {
        let mut sgd0 = spec(OptimizerKind::Sgd);
        sgd0.momentum = None;
        for spec in [spec(OptimizerKind::Sgd), spec(OptimizerKind::Adam), sgd0] {
            let mut applied = Optimizer::new(&spec, 7);
            let mut staged_opt = applied.clone();
            let mut p: Vec<f32> = (0..7).map(|i| i as f32 * 0.25 - 1.0).collect();
            let mut q = p.clone();
            let mut scratch = StagedUpdate::default();
            for step in 0..4 {
                let g: Vec<f32> = (0..7).map(|i| (i as f32 - step as f32) * 0.3).collect();
                applied.apply(&mut p, &g).unwrap();
                let mut staged = staged_opt.begin_staged(scratch, 7);
                let wire = le(&g);
                for (offset, piece) in [(0, 0..3), (3, 3..3), (3, 3..7)] {
                    staged_opt
                        .stage_le(&mut staged, &q, offset, &wire[piece])
                        .unwrap();
                }
                // Nothing moves before the commit.
                assert_ne!(q, p);
                let (next, rest) = staged_opt.commit_staged(staged).unwrap();
                q = next;
                scratch = rest;
            }
            assert_eq!(p, q, "{spec:?}");
            assert_eq!(applied, staged_opt, "{spec:?}");
        }
    }

    #[test]
    fn incomplete_or_out_of_order_staging_is_refused() {
        let opt = Optimizer::new(&spec(OptimizerKind::Sgd), 4);
        let params = vec![0.0; 4];
        let mut staged = opt.begin_staged(StagedUpdate::default(), 4);
        assert!(opt.stage_le(&mut staged, &params, 2, &le(&[1.0])).is_err());
        opt.stage_le(&mut staged, &params, 0, &le(&[1.0, 1.0]))
            .unwrap();
        assert!(
            opt.stage_le(&mut staged, &params, 2, &le(&[1.0; 3]))
                .is_err()
        );
        let mut opt = opt;
        assert!(opt.commit_staged(staged).is_err());
    }

    #[test]
    fn mismatched_gradient_is_an_error() {
        let mut opt = Optimizer::new(&spec(OptimizerKind::Sgd), 3);
        assert!(opt.apply(&mut [0.0; 3], &[1.0; 2]).is_err());
    }
}
