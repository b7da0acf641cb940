//! How a parameter server scales the update of a stale gradient: one computed against
//! parameters that `τ` other updates have since moved (Async, BoundedStaleness).
//!
//! Asynchrony acts as momentum of its own, about `τ / (1 + τ)` (Mitliagkas et al. 2016,
//! "Asynchrony begets momentum"). On top of the momentum tuned for Sync it makes the run
//! oscillate, so each policy takes some of the step back. Pure: the shard passes each
//! update's `τ` in.

use kubetrain_api::StaleGradients;

/// How one update departs from the optimizer's configured step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepAdjust {
    /// Multiplies the learning rate.
    pub lr_scale: f32,
    /// The momentum asynchrony adds, which the update's explicit momentum (SGD's `μ`,
    /// Adam's `β1`) gives up: `μ' = max(0, μ - this)`, the total of the two being about
    /// their sum (Zhang & Mitliagkas 2017, YellowFin's closed-loop momentum).
    pub asynchrony_momentum: f32,
}

impl StepAdjust {
    /// A fresh gradient's update, exactly as configured.
    pub const NONE: Self = Self {
        lr_scale: 1.0,
        asynchrony_momentum: 0.0,
    };

    /// The explicit momentum `momentum` becomes for this update.
    pub fn momentum(&self, momentum: f32) -> f32 {
        if self.asynchrony_momentum <= 0.0 {
            return momentum;
        }
        (momentum - self.asynchrony_momentum).max(0.0)
    }
}

/// One shard's policy, with the running mean staleness that `CorrectMomentum` needs.
#[derive(Debug, Clone, PartialEq)]
pub struct StaleSteps {
    policy: StaleGradients,
    mean: f64,
}

/// How much of the mean each new update's staleness makes up: about the last 50 updates.
const MEAN_WEIGHT: f64 = 0.02;

impl StaleSteps {
    /// `workers` equally fast workers leave each update `workers - 1` behind, which is
    /// where the running mean starts.
    pub fn new(policy: StaleGradients, workers: usize) -> Self {
        Self {
            policy,
            mean: workers.saturating_sub(1) as f64,
        }
    }

    /// The adjustment of an update `behind` versions stale.
    pub fn adjust(&mut self, behind: u64) -> StepAdjust {
        self.mean += MEAN_WEIGHT * (behind as f64 - self.mean);
        match self.policy {
            StaleGradients::Apply => StepAdjust::NONE,
            StaleGradients::ScaleLearningRate => StepAdjust {
                lr_scale: 1.0 / (1.0 + behind as f32),
                asynchrony_momentum: 0.0,
            },
            StaleGradients::CorrectMomentum => StepAdjust {
                lr_scale: 1.0,
                asynchrony_momentum: (self.mean / (1.0 + self.mean)) as f32,
            },
        }
    }

    /// The running mean staleness, in versions.
    pub fn mean(&self) -> f64 {
        self.mean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_gradient_is_applied_as_configured_by_every_policy() {
        for policy in [
            StaleGradients::Apply,
            StaleGradients::ScaleLearningRate,
            StaleGradients::CorrectMomentum,
        ] {
            let adjust = StaleSteps::new(policy, 1).adjust(0);
            assert_eq!(adjust.lr_scale, 1.0, "{policy:?}");
            assert_eq!(adjust.momentum(0.9), 0.9, "{policy:?}");
        }
    }

    #[test]
    fn scale_learning_rate_divides_by_one_plus_the_staleness() {
        let mut steps = StaleSteps::new(StaleGradients::ScaleLearningRate, 2);
        assert_eq!(steps.adjust(1).lr_scale, 0.5);
        assert_eq!(steps.adjust(3).lr_scale, 0.25);
        assert_eq!(steps.adjust(3).momentum(0.9), 0.9);
    }

    #[test]
    fn correct_momentum_gives_up_the_momentum_asynchrony_adds() {
        // Two equally fast workers: one update behind on average, asynchrony's momentum
        // 1/2, so 0.9 becomes 0.4.
        let mut steps = StaleSteps::new(StaleGradients::CorrectMomentum, 2);
        let adjust = steps.adjust(1);
        assert_eq!(adjust.lr_scale, 1.0);
        assert!((adjust.momentum(0.9) - 0.4).abs() < 1e-6);
        // Four: 3/4 of it, 0.15 left. Many more: none, never a negative momentum.
        let four = StaleSteps::new(StaleGradients::CorrectMomentum, 4).adjust(3);
        assert!((four.momentum(0.9) - 0.15).abs() < 1e-6);
        let many = StaleSteps::new(StaleGradients::CorrectMomentum, 20).adjust(19);
        assert_eq!(many.momentum(0.9), 0.0);
        assert_eq!(many.momentum(0.0), 0.0);
    }

    #[test]
    fn the_mean_follows_the_staleness_that_arrives() {
        let mut steps = StaleSteps::new(StaleGradients::CorrectMomentum, 4);
        for _ in 0..500 {
            steps.adjust(0);
        }
        assert!(steps.mean() < 0.01, "{}", steps.mean());
        assert!((steps.adjust(0).momentum(0.9) - 0.9).abs() < 0.01);
    }

    #[test]
    fn apply_changes_nothing() {
        let mut steps = StaleSteps::new(StaleGradients::Apply, 8);
        assert_eq!(steps.adjust(12), StepAdjust::NONE);
    }
}
