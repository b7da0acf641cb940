use ndarray::{Array2, ArrayView1, ArrayView2, Axis, Slice};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::ModelError;

/// A dense network: ReLU hidden layers (none for softmax regression) and a softmax output
/// trained with cross-entropy.
///
/// Parameters live in one flat `f32` vector, layer by layer, each layer's weights
/// (`fan_in x fan_out`, row-major) followed by its biases. That flat key space is what the
/// parameter servers shard, so this layout is part of the wire contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    widths: Vec<usize>,
}

/// Loss and accuracy over a set of examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Share of examples whose arg-max class is the label.
    pub accuracy: f64,
    /// Examples evaluated.
    pub examples: usize,
}

impl Network {
    /// `inputs -> hidden... -> classes`.
    pub fn new(inputs: usize, hidden: &[usize], classes: usize) -> Self {
        let mut widths = Vec::with_capacity(hidden.len() + 2);
        widths.push(inputs);
        widths.extend_from_slice(hidden);
        widths.push(classes);
        Self { widths }
    }

    /// Input features per example.
    pub fn inputs(&self) -> usize {
        self.widths[0]
    }

    /// Output classes.
    pub fn classes(&self) -> usize {
        self.widths[self.widths.len() - 1]
    }

    /// Layer widths, input first.
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    /// Length of the flat parameter vector.
    pub fn num_params(&self) -> usize {
        self.widths.windows(2).map(|w| w[0] * w[1] + w[1]).sum()
    }

    /// `(weight offset, bias offset, fan_in, fan_out)` per layer.
    fn layout(&self) -> Vec<(usize, usize, usize, usize)> {
        let mut offset = 0;
        self.widths
            .windows(2)
            .map(|w| {
                let (fan_in, fan_out) = (w[0], w[1]);
                let weights = offset;
                let biases = weights + fan_in * fan_out;
                offset = biases + fan_out;
                (weights, biases, fan_in, fan_out)
            })
            .collect()
    }

    /// Deterministic initial parameters: He-uniform for ReLU layers, Glorot-uniform for the
    /// output, zero biases. Every process derives the same vector from the same seed, so
    /// parameter servers need not exchange initial values.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        self.init_range(seed, 0..self.num_params())
    }

    /// `init(seed)[range]`, holding only the range: a PS initialises its own shard of a
    /// model that may not fit in its memory whole. The random stream is the same, so
    /// every PS's shard matches the whole model's initialisation.
    pub fn init_range(&self, seed: u64, range: std::ops::Range<usize>) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = vec![0.0f32; range.len()];
        let layers = self.layout();
        let last = layers.len() - 1;
        for (i, &(weights, _, fan_in, fan_out)) in layers.iter().enumerate() {
            let limit = if i == last {
                (6.0 / (fan_in + fan_out) as f64).sqrt()
            } else {
                (6.0 / fan_in as f64).sqrt()
            } as f32;
            for p in weights..weights + fan_in * fan_out {
                if p >= range.end {
                    return params;
                }
                let value = rng.random_range(-limit..limit);
                if p >= range.start {
                    params[p - range.start] = value;
                }
            }
        }
        params
    }

    fn check(&self, params: &[f32], x: &ArrayView2<f32>, labels: &[u8]) -> Result<(), ModelError> {
        if params.len() != self.num_params() {
            return Err(ModelError::ParameterCount {
                expected: self.num_params(),
                got: params.len(),
            });
        }
        if x.ncols() != self.inputs() {
            return Err(ModelError::FeatureCount {
                expected: self.inputs(),
                got: x.ncols(),
            });
        }
        if labels.len() != x.nrows() {
            return Err(ModelError::Labels(format!(
                "{} labels for {} examples",
                labels.len(),
                x.nrows()
            )));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= self.classes()) {
            return Err(ModelError::Labels(format!(
                "label {bad} is out of range for {} classes",
                self.classes()
            )));
        }
        Ok(())
    }

    fn layer_views<'a>(
        &self,
        params: &'a [f32],
    ) -> Vec<(ArrayView2<'a, f32>, ArrayView1<'a, f32>)> {
        self.layout()
            .into_iter()
            .map(|(w, b, fan_in, fan_out)| {
                let weights = ArrayView2::from_shape((fan_in, fan_out), &params[w..b])
                    .expect("layout matches num_params, checked before");
                let biases = ArrayView1::from(&params[b..b + fan_out]);
                (weights, biases)
            })
            .collect()
    }

    /// Pre-activations of every layer (the last one is the logits).
    fn forward(&self, params: &[f32], x: &ArrayView2<f32>) -> Vec<Array2<f32>> {
        let layers = self.layer_views(params);
        let mut outputs: Vec<Array2<f32>> = Vec::with_capacity(layers.len());
        for (i, (weights, biases)) in layers.iter().enumerate() {
            let z = match i {
                0 => x.dot(weights),
                _ => outputs[i - 1].mapv(relu).dot(weights),
            } + biases;
            outputs.push(z);
        }
        outputs
    }

    /// Mean cross-entropy loss of a batch and its gradient with respect to every parameter.
    pub fn loss_and_gradient(
        &self,
        params: &[f32],
        x: ArrayView2<f32>,
        labels: &[u8],
    ) -> Result<(f64, Vec<f32>), ModelError> {
        self.check(params, &x, labels)?;
        let batch = x.nrows();
        if batch == 0 {
            return Ok((0.0, vec![0.0; params.len()]));
        }
        let zs = self.forward(params, &x);
        let logits = zs.last().expect("a network has at least one layer");
        let (loss, mut delta) = softmax_cross_entropy(logits, labels);
        // d(mean loss)/d(logits) = (softmax - onehot) / batch.
        delta.mapv_inplace(|d| d / batch as f32);

        let mut grad = vec![0.0f32; params.len()];
        let layers = self.layer_views(params);
        let layout = self.layout();
        for i in (0..layers.len()).rev() {
            let (w_off, b_off, fan_in, fan_out) = layout[i];
            let input = match i {
                0 => x.to_owned(),
                _ => zs[i - 1].mapv(relu),
            };
            let d_weights = input.t().dot(&delta);
            let d_biases = delta.sum_axis(Axis(0));
            grad[w_off..b_off].copy_from_slice(
                d_weights
                    .as_slice()
                    .expect("a fresh dot product is standard layout"),
            );
            grad[b_off..b_off + fan_out].copy_from_slice(
                d_biases
                    .as_slice()
                    .expect("a fresh reduction is standard layout"),
            );
            if i > 0 {
                let mut upstream = delta.dot(&layers[i].0.t());
                mask_relu(&mut upstream, &zs[i - 1]);
                debug_assert_eq!(upstream.ncols(), fan_in);
                delta = upstream;
            }
        }
        Ok((loss, grad))
    }

    /// Mean loss only (finite-difference checks, evaluation).
    pub fn loss(
        &self,
        params: &[f32],
        x: ArrayView2<f32>,
        labels: &[u8],
    ) -> Result<f64, ModelError> {
        Ok(self.evaluate(params, x, labels)?.loss)
    }

    /// Loss and accuracy, in slices of 512 examples to bound memory.
    pub fn evaluate(
        &self,
        params: &[f32],
        x: ArrayView2<f32>,
        labels: &[u8],
    ) -> Result<Evaluation, ModelError> {
        self.check(params, &x, labels)?;
        let n = x.nrows();
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        for start in (0..n).step_by(512) {
            let end = (start + 512).min(n);
            let xs = x.slice_axis(Axis(0), Slice::from(start..end));
            let zs = self.forward(params, &xs);
            let logits = zs.last().expect("a network has at least one layer");
            let (loss, _) = softmax_cross_entropy(logits, &labels[start..end]);
            loss_sum += loss * (end - start) as f64;
            for (row, &label) in logits.rows().into_iter().zip(&labels[start..end]) {
                if argmax(row) == label as usize {
                    correct += 1;
                }
            }
        }
        let denom = n.max(1) as f64;
        Ok(Evaluation {
            loss: loss_sum / denom,
            accuracy: correct as f64 / denom,
            examples: n,
        })
    }
}

pub(super) fn relu(z: f32) -> f32 {
    z.max(0.0)
}

/// Zeroes the gradient wherever the ReLU's input `z` was not positive.
pub(super) fn mask_relu(delta: &mut Array2<f32>, z: &Array2<f32>) {
    // A select rather than a conditional store, so the loop vectorises: as a branch it
    // cost a tenth of a pipeline stage's compute time on random signs.
    delta.zip_mut_with(z, |d, &z| *d = if z <= 0.0 { 0.0 } else { *d });
}

fn argmax(row: ArrayView1<f32>) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Mean cross-entropy (accumulated in f64) and `softmax - onehot` per example. Pipeline
/// stages use this same function, so pipelined and whole gradients agree bit for bit.
pub(super) fn softmax_cross_entropy(logits: &Array2<f32>, labels: &[u8]) -> (f64, Array2<f32>) {
    let mut probs = logits.clone();
    let mut loss = 0.0f64;
    for (mut row, &label) in probs.rows_mut().into_iter().zip(labels) {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum: f32 = row.sum();
        row.mapv_inplace(|v| v / sum);
        loss -= (row[label as usize].max(1e-12) as f64).ln();
        row[label as usize] -= 1.0;
    }
    let n = labels.len().max(1) as f64;
    (loss / n, probs)
}

/// Turns a flat row-major slice into a matrix view of `cols` columns.
pub fn as_matrix(data: &[f32], cols: usize) -> ArrayView2<'_, f32> {
    let rows = data.len().checked_div(cols).unwrap_or(0);
    ArrayView2::from_shape((rows, cols), &data[..rows * cols]).expect("rows * cols fits data")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy_batch(n: usize, inputs: usize, classes: usize, seed: u64) -> (Vec<f32>, Vec<u8>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x = (0..n * inputs)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let y = (0..n).map(|_| rng.random_range(0..classes as u8)).collect();
        (x, y)
    }

    fn check_gradient(net: &Network, seed: u64) {
        let (x, y) = toy_batch(7, net.inputs(), net.classes(), seed);
        let x = as_matrix(&x, net.inputs());
        let mut params = net.init(seed);
        // Non-zero biases, so their gradients are exercised away from the symmetric start.
        for p in params.iter_mut() {
            *p += 0.05;
        }
        let (_, grad) = net.loss_and_gradient(&params, x, &y).unwrap();
        let eps = 1e-3f32;
        for k in (0..params.len()).step_by(3) {
            let orig = params[k];
            params[k] = orig + eps;
            let up = net.loss(&params, x, &y).unwrap();
            params[k] = orig - eps;
            let down = net.loss(&params, x, &y).unwrap();
            params[k] = orig;
            let numeric = (up - down) / (2.0 * eps as f64);
            let analytic = grad[k] as f64;
            let tolerance = 2e-3 + 2e-2 * numeric.abs().max(analytic.abs());
            assert!(
                (numeric - analytic).abs() <= tolerance,
                "param {k}: numeric {numeric} vs analytic {analytic}"
            );
        }
    }

    #[test]
    fn softmax_regression_gradient_matches_finite_differences() {
        check_gradient(&Network::new(5, &[], 3), 1);
    }

    #[test]
    fn mlp_gradient_matches_finite_differences() {
        check_gradient(&Network::new(6, &[8, 5], 4), 2);
    }

    #[test]
    fn init_is_deterministic_per_seed() {
        let net = Network::new(64, &[32], 10);
        assert_eq!(net.init(7), net.init(7));
        let whole = net.init(7);
        for range in [
            0..0,
            0..whole.len(),
            3..17,
            10..whole.len(),
            whole.len()..whole.len(),
        ] {
            assert_eq!(
                net.init_range(7, range.clone()),
                whole[range.clone()],
                "{range:?}"
            );
        }
        assert_ne!(net.init(7), net.init(8));
        assert_eq!(net.num_params(), 64 * 32 + 32 + 32 * 10 + 10);
    }

    #[test]
    fn wrong_shapes_are_errors_not_panics() {
        let net = Network::new(4, &[3], 2);
        let params = net.init(0);
        let x = vec![0.0; 10];
        assert!(matches!(
            net.loss_and_gradient(&params, as_matrix(&x, 5), &[0, 1]),
            Err(ModelError::FeatureCount { .. })
        ));
        assert!(matches!(
            net.loss_and_gradient(&params[1..], as_matrix(&x[..8], 4), &[0, 1]),
            Err(ModelError::ParameterCount { .. })
        ));
        assert!(matches!(
            net.loss_and_gradient(&params, as_matrix(&x[..8], 4), &[0, 7]),
            Err(ModelError::Labels(_))
        ));
    }
}
