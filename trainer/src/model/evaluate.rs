//! Test-set evaluation of a whole network, the same for the data-parallel chief, the
//! first pipeline stage and the one-process reference.

use super::{Evaluation, ModelError, Network, as_matrix};
use crate::data::Examples;

/// Loss and accuracy over a set of examples, widened to f32 one slice at a time so a test
/// split stored as bytes never exists as f32 in full.
pub fn evaluate_examples(
    net: &Network,
    params: &[f32],
    examples: &Examples,
) -> Result<Evaluation, ModelError> {
    const SLICE: usize = 1024;
    let (mut loss, mut correct) = (0.0f64, 0.0f64);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let indices: Vec<usize> = (0..examples.len()).collect();
    for slice in indices.chunks(SLICE) {
        x.clear();
        y.clear();
        examples.gather(slice, &mut x, &mut y);
        let part = net.evaluate(params, as_matrix(&x, net.inputs()), &y)?;
        loss += part.loss * part.examples as f64;
        correct += part.accuracy * part.examples as f64;
    }
    let n = examples.len().max(1) as f64;
    Ok(Evaluation {
        loss: loss / n,
        accuracy: correct / n,
        examples: examples.len(),
    })
}
