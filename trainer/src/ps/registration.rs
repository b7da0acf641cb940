//! Which model a PS accepts a registration for: the one its own `spec.training` describes.
//! Every pod of a job gets the same spec, so a Register with other layer widths comes
//! from a misconfigured pod or from a stranger, and must neither lock the real workers
//! out (by being first) nor make the PS allocate a shard it cannot hold.

use crate::data::{DataShape, MAX_CLASSES};

/// Largest model a PS accepts (4 GiB of f32 across all shards), whatever the spec says.
pub const MAX_PARAMS: usize = 1 << 30;
/// At most this many widths are echoed back in an error.
const SHOWN_WIDTHS: usize = 6;

/// What the PS knows of the model before any worker registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedModel {
    /// The dataset's feature count; None when this PS cannot read the dataset (a CSV that
    /// is mounted only on the workers), and then the first registration's is taken.
    pub inputs: Option<usize>,
    /// The spec's hidden layers.
    pub hidden: Vec<usize>,
    /// The dataset's class count where it declares one (the builtins); otherwise at most
    /// [`MAX_CLASSES`].
    pub classes: Option<usize>,
}

impl ExpectedModel {
    pub fn new(hidden: Vec<usize>, data: Option<DataShape>) -> Self {
        Self {
            inputs: data.map(|d| d.inputs),
            hidden,
            classes: data.and_then(|d| d.classes),
        }
    }

    fn describe(&self) -> String {
        let end = |v: Option<usize>, what: &str| v.map_or(what.to_string(), |v| v.to_string());
        let mut parts = vec![end(self.inputs, "inputs")];
        parts.extend(self.hidden.iter().map(usize::to_string));
        parts.push(end(self.classes, "classes"));
        format!("[{}]", parts.join(", "))
    }
}

/// Why a registration's widths are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefusedModel {
    /// Not a model at all: answered `INVALID_ARGUMENT`.
    #[error(
        "layer widths {0} do not describe a model: give input and output widths, all at least 1"
    )]
    Malformed(String),
    /// Too large for any PS: `INVALID_ARGUMENT`.
    #[error(
        "a model with widths {widths} has {total} parameters; this trainer holds at most {MAX_PARAMS}"
    )]
    TooLarge { widths: String, total: u128 },
    /// Another model than the spec's: `FAILED_PRECONDITION`.
    #[error(
        "widths {got} are not this job's model {expected} (from its spec.training); every pod must run the same spec.training"
    )]
    NotTheSpec { got: String, expected: String },
}

/// Checks a registration's `widths` against the model the PS expects; returns the model's
/// parameter count.
pub fn check(expected: &ExpectedModel, widths: &[usize]) -> Result<usize, RefusedModel> {
    if widths.len() < 2 || widths.contains(&0) {
        return Err(RefusedModel::Malformed(short(widths)));
    }
    // Counted in u128 so hostile widths cannot overflow.
    let total: u128 = widths
        .windows(2)
        .map(|w| w[0] as u128 * w[1] as u128 + w[1] as u128)
        .sum();
    if total > MAX_PARAMS as u128 {
        return Err(RefusedModel::TooLarge {
            widths: short(widths),
            total,
        });
    }
    let (first, last) = (widths[0], widths[widths.len() - 1]);
    let hidden = &widths[1..widths.len() - 1];
    let matches = hidden == expected.hidden.as_slice()
        && expected.inputs.is_none_or(|i| i == first)
        && match expected.classes {
            Some(c) => c == last,
            None => last <= MAX_CLASSES,
        };
    if !matches {
        return Err(RefusedModel::NotTheSpec {
            got: short(widths),
            expected: expected.describe(),
        });
    }
    Ok(total as usize)
}

/// `widths` for an error message: all of them when few, else the first ones and a count,
/// so that a hostile list of 100,000 widths does not come back as a 362 KB error.
fn short(widths: &[usize]) -> String {
    if widths.len() <= SHOWN_WIDTHS {
        return format!("{widths:?}");
    }
    let shown: Vec<String> = widths[..SHOWN_WIDTHS]
        .iter()
        .map(usize::to_string)
        .collect();
    format!("[{}, ... ({} widths)]", shown.join(", "), widths.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits_mlp() -> ExpectedModel {
        ExpectedModel::new(
            vec![64],
            Some(DataShape {
                inputs: 64,
                classes: Some(10),
            }),
        )
    }

    #[test]
    fn the_specs_model_is_accepted_with_its_parameter_count() {
        assert_eq!(
            check(&digits_mlp(), &[64, 64, 10]),
            Ok(64 * 64 + 64 + 64 * 10 + 10)
        );
    }

    #[test]
    fn any_other_model_is_refused_naming_both() {
        for widths in [
            &[64, 32, 10][..],
            &[64, 10],
            &[63, 64, 10],
            &[64, 64, 11],
            &[16384, 16384],
            &[64, 64, 64, 10],
        ] {
            let err = check(&digits_mlp(), widths).unwrap_err();
            assert!(
                matches!(err, RefusedModel::NotTheSpec { .. }),
                "{widths:?}: {err}"
            );
            let text = err.to_string();
            assert!(
                text.contains("[64, 64, 10] (from its spec.training)"),
                "{text}"
            );
        }
    }

    #[test]
    fn an_unreadable_csv_takes_the_first_inputs_and_bounds_the_classes() {
        let csv = ExpectedModel::new(
            vec![8],
            Some(DataShape {
                inputs: 4,
                classes: None,
            }),
        );
        assert_eq!(check(&csv, &[4, 8, 3]), Ok(4 * 8 + 8 + 8 * 3 + 3));
        assert!(check(&csv, &[5, 8, 3]).is_err());
        let unreadable = ExpectedModel::new(vec![8], None);
        assert!(check(&unreadable, &[1000, 8, MAX_CLASSES]).is_ok());
        let err = check(&unreadable, &[4, 8, MAX_CLASSES + 1]).unwrap_err();
        assert!(err.to_string().contains("[inputs, 8, classes]"), "{err}");
    }

    #[test]
    fn malformed_and_oversized_widths_are_invalid_and_the_error_stays_short() {
        let expected = digits_mlp();
        assert!(matches!(
            check(&expected, &[64]),
            Err(RefusedModel::Malformed(_))
        ));
        assert!(matches!(
            check(&expected, &[64, 0, 10]),
            Err(RefusedModel::Malformed(_))
        ));
        let unreadable = ExpectedModel::new(vec![], None);
        assert!(matches!(
            check(&unreadable, &[usize::MAX, 200]),
            Err(RefusedModel::TooLarge { .. })
        ));
        let many: Vec<usize> = (1..=100_000).collect();
        let text = check(&expected, &many).unwrap_err().to_string();
        assert!(text.len() < 300, "{} bytes: {text}", text.len());
        assert!(
            text.contains("[1, 2, 3, 4, 5, 6, ... (100000 widths)]"),
            "{text}"
        );
    }
}
