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

    #[test]
    fn mismatched_gradient_is_an_error() {
        let mut opt = Optimizer::new(&spec(OptimizerKind::Sgd), 3);
        assert!(opt.apply(&mut [0.0; 3], &[1.0; 2]).is_err());
    }
}
