//! When a run has diverged. The softmax loss clamps the probability of the true class at
//! 1e-12, so parameters gone to NaN show a finite loss of 27.6 and a run that diverged
//! would otherwise "succeed" with garbage. A worker checks each step's numbers here and
//! fails with [`Diverged`], which the trainer turns into its own exit code
//! (`kubetrain_api::contract::EXIT_DIVERGED`) and the operator into the reason `Diverged`.

/// A smoothed training loss above this many times a uniform guess's (`ln classes`) counts
/// as exploded: a healthy run starts near a uniform guess and falls from there, so five
/// times that is no early wobble. For 10 classes the bound is 11.5; the clamped loss of
/// NaN parameters is 27.6.
pub const EXPLODED_LOSS_FACTOR: f64 = 5.0;

/// Training has diverged: the step and what gave it away.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "training diverged at step {step}: {why}; lower spec.training.optimizer.learningRate (or momentum) and start again"
)]
pub struct Diverged {
    pub step: u64,
    pub why: String,
}

/// A gradient with a NaN or infinite value cannot be applied.
pub fn check_gradient(step: u64, gradient: &[f32]) -> Result<(), Diverged> {
    match gradient.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Diverged {
            step,
            why: format!("the gradient has {} at parameter {index}", gradient[index]),
        }),
    }
}

/// The batch loss must be finite, and the smoothed loss within
/// [`EXPLODED_LOSS_FACTOR`] times a uniform guess's.
pub fn check_loss(step: u64, batch: f64, smoothed: f64, classes: usize) -> Result<(), Diverged> {
    if !batch.is_finite() {
        return Err(Diverged {
            step,
            why: format!("the batch loss is {batch}"),
        });
    }
    let uniform = (classes.max(2) as f64).ln();
    let limit = EXPLODED_LOSS_FACTOR * uniform;
    if !smoothed.is_finite() || smoothed > limit {
        return Err(Diverged {
            step,
            why: format!(
                "the smoothed loss is {smoothed:.2}, more than {EXPLODED_LOSS_FACTOR}x a uniform guess's {uniform:.2}"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finite_gradient_passes_and_the_first_bad_value_is_named() {
        assert_eq!(check_gradient(3, &[0.0, -1e30, 5.0]), Ok(()));
        let nan = check_gradient(7, &[0.0, 1.0, f32::NAN, f32::INFINITY]).unwrap_err();
        assert_eq!(nan.step, 7);
        assert_eq!(nan.why, "the gradient has NaN at parameter 2");
        let inf = check_gradient(8, &[f32::NEG_INFINITY]).unwrap_err();
        assert_eq!(inf.why, "the gradient has -inf at parameter 0");
        let text = nan.to_string();
        assert!(text.starts_with("training diverged at step 7: "), "{text}");
        assert!(
            text.contains("spec.training.optimizer.learningRate"),
            "{text}"
        );
    }

    #[test]
    fn a_loss_near_a_uniform_guess_passes_and_an_exploded_one_does_not() {
        // 10 classes: ln 10 = 2.30, the bound is 11.5.
        assert_eq!(check_loss(1, 2.4, 2.4, 10), Ok(()));
        assert_eq!(
            check_loss(1, 30.0, 11.0, 10),
            Ok(()),
            "one bad batch is smoothed"
        );
        let exploded = check_loss(90, 27.6, 12.0, 10).unwrap_err();
        assert_eq!(exploded.step, 90);
        assert!(exploded.why.contains("12.00"), "{}", exploded.why);
        assert!(exploded.why.contains("2.30"), "{}", exploded.why);
        // Two classes: ln 2 = 0.69, the bound is 3.47.
        assert_eq!(check_loss(1, 0.7, 0.7, 2), Ok(()));
        assert!(check_loss(1, 4.0, 3.5, 2).is_err());
    }

    #[test]
    fn a_non_finite_loss_fails_at_once() {
        for bad in [f64::NAN, f64::INFINITY] {
            assert!(check_loss(2, bad, 1.0, 10).is_err());
            assert!(check_loss(2, 1.0, bad, 10).is_err());
        }
    }
}
