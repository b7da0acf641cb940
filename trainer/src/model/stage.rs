//! A pipeline stage's share of a [`Network`]: a contiguous run of its layers, with forward
//! and backward passes that compose, stage by stage, into exactly the whole network's.
//!
//! Stages exchange post-ReLU activations forward and the gradient with respect to them
//! backward. The ReLU mask at a boundary is applied by the stage that owns the
//! pre-activation, so the receiving stage never needs its neighbour's internals.

use std::ops::Range;

use ndarray::{Array2, ArrayView1, ArrayView2, Axis};

use super::ModelError;
use super::network::{Network, mask_relu, relu, softmax_cross_entropy};

/// Layers `layers` of a network, owning parameters `params` of its flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageModel {
    /// Widths of this stage's layers, its input width first.
    widths: Vec<usize>,
    layers: Range<usize>,
    params: Range<usize>,
    /// Owns the network's output layer: no ReLU on its output, softmax loss after it.
    last: bool,
}

/// What a forward pass keeps for the backward pass of the same micro-batch.
#[derive(Debug, Clone)]
pub struct Stash {
    input: Array2<f32>,
    /// Pre-activations of every layer of the stage.
    zs: Vec<Array2<f32>>,
}

impl Stash {
    /// Rows (examples) of the micro-batch.
    pub fn rows(&self) -> usize {
        self.input.nrows()
    }
}

impl Network {
    /// Floating-point operations of each layer per example, forward and backward: what a
    /// stage balance has to equalise. Every layer costs 2·in·out forward and 2·in·out for
    /// its weight gradient; all but the first also 2·in·out for the gradient of its input
    /// (the first has nobody to send it to).
    pub fn layer_flops(&self) -> Vec<u64> {
        self.widths()
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let products = if i == 0 { 4 } else { 6 };
                products * (w[0] * w[1]) as u64 + 4 * w[1] as u64
            })
            .collect()
    }

    /// The stage made of layers `layers` (indices into the `widths().len() - 1` layers).
    pub fn stage(&self, layers: Range<usize>) -> Result<StageModel, ModelError> {
        let count = self.widths().len() - 1;
        if layers.is_empty() || layers.end > count {
            return Err(ModelError::Stage(format!(
                "layers {layers:?} are not a non-empty range of the network's {count} layers"
            )));
        }
        let size = |w: &[usize]| w[0] * w[1] + w[1];
        let start: usize = self.widths()[..=layers.start].windows(2).map(size).sum();
        let len: usize = self.widths()[layers.start..=layers.end]
            .windows(2)
            .map(size)
            .sum();
        Ok(StageModel {
            widths: self.widths()[layers.start..=layers.end].to_vec(),
            last: layers.end == count,
            layers,
            params: start..start + len,
        })
    }
}

impl StageModel {
    /// The network layers this stage computes.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// Where this stage's parameters sit in the network's flat vector.
    pub fn param_range(&self) -> Range<usize> {
        self.params.clone()
    }

    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    /// Features of one input row.
    pub fn input_width(&self) -> usize {
        self.widths[0]
    }

    /// Features of one output row (the logits on the last stage).
    pub fn output_width(&self) -> usize {
        self.widths[self.widths.len() - 1]
    }

    /// Computes the network's first layer (its input is the raw features).
    pub fn is_first(&self) -> bool {
        self.layers.start == 0
    }

    /// Computes the network's output layer.
    pub fn is_last(&self) -> bool {
        self.last
    }

    fn views<'a>(&self, params: &'a [f32]) -> Vec<(ArrayView2<'a, f32>, ArrayView1<'a, f32>)> {
        let mut offset = 0;
        self.widths
            .windows(2)
            .map(|w| {
                let (fan_in, fan_out) = (w[0], w[1]);
                let weights = ArrayView2::from_shape(
                    (fan_in, fan_out),
                    &params[offset..][..fan_in * fan_out],
                )
                .expect("params length checked against the stage");
                offset += fan_in * fan_out;
                let biases = ArrayView1::from(&params[offset..offset + fan_out]);
                offset += fan_out;
                (weights, biases)
            })
            .collect()
    }

    fn check_params(&self, params: &[f32]) -> Result<(), ModelError> {
        if params.len() != self.num_params() {
            return Err(ModelError::ParameterCount {
                expected: self.num_params(),
                got: params.len(),
            });
        }
        Ok(())
    }

    /// The stage's output for `input`: post-ReLU activations for the next stage, or the
    /// logits on the last stage; and the stash its backward pass needs.
    pub fn forward(
        &self,
        params: &[f32],
        input: ArrayView2<f32>,
    ) -> Result<(Array2<f32>, Stash), ModelError> {
        self.check_params(params)?;
        if input.ncols() != self.input_width() {
            return Err(ModelError::FeatureCount {
                expected: self.input_width(),
                got: input.ncols(),
            });
        }
        let layers = self.views(params);
        let mut zs: Vec<Array2<f32>> = Vec::with_capacity(layers.len());
        for (i, (weights, biases)) in layers.iter().enumerate() {
            let z = match i {
                0 => input.dot(weights),
                _ => zs[i - 1].mapv(relu).dot(weights),
            } + biases;
            zs.push(z);
        }
        let z = zs.last().expect("a stage has at least one layer");
        let output = if self.last { z.clone() } else { z.mapv(relu) };
        Ok((
            output,
            Stash {
                input: input.to_owned(),
                zs,
            },
        ))
    }

    /// Last stage: the summed cross-entropy of a micro-batch and the gradient of the mean
    /// loss over the whole batch of `batch` examples with respect to its logits. Dividing
    /// by the whole batch (not the micro-batch) is what makes the micro-batch gradients
    /// add up to the full-batch gradient.
    pub fn loss_gradient(
        &self,
        logits: &Array2<f32>,
        labels: &[u8],
        batch: usize,
    ) -> Result<(f64, Array2<f32>), ModelError> {
        if !self.last {
            return Err(ModelError::Stage(
                "only the last stage computes the loss".into(),
            ));
        }
        if labels.len() != logits.nrows() {
            return Err(ModelError::Labels(format!(
                "{} labels for {} examples",
                labels.len(),
                logits.nrows()
            )));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= self.output_width()) {
            return Err(ModelError::Labels(format!(
                "label {bad} is out of range for {} classes",
                self.output_width()
            )));
        }
        if batch < labels.len() || batch == 0 {
            return Err(ModelError::Labels(format!(
                "a micro-batch of {} is larger than its batch of {batch}",
                labels.len()
            )));
        }
        let (mean, mut delta) = softmax_cross_entropy(logits, labels);
        delta.mapv_inplace(|d| d / batch as f32);
        Ok((mean * labels.len() as f64, delta))
    }

    /// Backward pass of one micro-batch: adds its parameter gradient into `grad` and
    /// returns the gradient with respect to the stage's input (None on the first stage,
    /// which has no one to send it to). `d_output` is the gradient with respect to what
    /// [`forward`](Self::forward) returned.
    pub fn backward(
        &self,
        params: &[f32],
        stash: &Stash,
        d_output: ArrayView2<f32>,
        grad: &mut [f32],
    ) -> Result<Option<Array2<f32>>, ModelError> {
        self.check_params(params)?;
        if grad.len() != params.len() {
            return Err(ModelError::GradientLength {
                expected: params.len(),
                got: grad.len(),
            });
        }
        if d_output.dim() != (stash.rows(), self.output_width()) {
            return Err(ModelError::Stage(format!(
                "output gradient is {:?}, expected {:?}",
                d_output.dim(),
                (stash.rows(), self.output_width())
            )));
        }
        let layers = self.views(params);
        let last = layers.len() - 1;
        let mut delta = d_output.to_owned();
        if !self.last {
            mask_relu(&mut delta, &stash.zs[last]);
        }
        // Offsets of each layer's weights within this stage's slice.
        let mut offsets = Vec::with_capacity(layers.len());
        let mut offset = 0;
        for w in self.widths.windows(2) {
            offsets.push(offset);
            offset += w[0] * w[1] + w[1];
        }
        for i in (0..layers.len()).rev() {
            let d_weights = match i {
                0 => stash.input.t().dot(&delta),
                _ => stash.zs[i - 1].mapv(relu).t().dot(&delta),
            };
            let d_biases = delta.sum_axis(Axis(0));
            let w_len = d_weights.len();
            let at = &mut grad[offsets[i]..];
            for (g, d) in at[..w_len].iter_mut().zip(d_weights.iter()) {
                *g += d;
            }
            for (g, d) in at[w_len..w_len + d_biases.len()]
                .iter_mut()
                .zip(d_biases.iter())
            {
                *g += d;
            }
            if i > 0 {
                let mut upstream = delta.dot(&layers[i].0.t());
                mask_relu(&mut upstream, &stash.zs[i - 1]);
                delta = upstream;
            } else if !self.is_first() {
                return Ok(Some(delta.dot(&layers[0].0.t())));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::model::as_matrix;

    /// Runs `cuts` as a pipeline over micro-batches and returns the loss and gradient.
    fn pipelined(
        net: &Network,
        params: &[f32],
        cuts: &[Range<usize>],
        x: &[f32],
        y: &[u8],
        micro: usize,
    ) -> (f64, Vec<f32>) {
        let stages: Vec<StageModel> = cuts.iter().map(|r| net.stage(r.clone()).unwrap()).collect();
        let mut grad = vec![0.0f32; params.len()];
        let mut loss = 0.0;
        let rows = y.len();
        let per = rows.div_ceil(micro);
        for start in (0..rows).step_by(per) {
            let end = (start + per).min(rows);
            let mut act =
                as_matrix(&x[start * net.inputs()..end * net.inputs()], net.inputs()).to_owned();
            let mut stashes = Vec::new();
            for s in &stages {
                let p = &params[s.param_range()];
                let (out, stash) = s.forward(p, act.view()).unwrap();
                stashes.push(stash);
                act = out;
            }
            let last = stages.last().unwrap();
            let (l, mut d) = last.loss_gradient(&act, &y[start..end], rows).unwrap();
            loss += l;
            for (s, stash) in stages.iter().zip(&stashes).rev() {
                let r = s.param_range();
                let up = s
                    .backward(&params[r.clone()], stash, d.view(), &mut grad[r])
                    .unwrap();
                match up {
                    Some(up) => d = up,
                    None => assert!(s.is_first()),
                }
            }
        }
        (loss / rows as f64, grad)
    }

    #[test]
    fn stages_compose_into_the_whole_network_gradient() {
        let net = Network::new(6, &[9, 7, 5], 4);
        let mut rng = StdRng::seed_from_u64(3);
        let x: Vec<f32> = (0..13 * 6).map(|_| rng.random_range(-1.0..1.0)).collect();
        let y: Vec<u8> = (0..13).map(|_| rng.random_range(0..4)).collect();
        let mut params = net.init(5);
        for p in params.iter_mut() {
            *p += 0.03;
        }
        let (loss, grad) = net
            .loss_and_gradient(&params, as_matrix(&x, 6), &y)
            .unwrap();
        for cuts in [
            std::iter::once(0..4).collect(),
            vec![0..1, 1..4],
            vec![0..2, 2..3, 3..4],
            vec![0..1, 1..2, 2..3, 3..4],
        ] {
            for micro in [1, 3, 13] {
                let (l, g) = pipelined(&net, &params, &cuts, &x, &y, micro);
                assert!((l - loss).abs() < 1e-5, "{cuts:?}/{micro}: {l} vs {loss}");
                let diff = g
                    .iter()
                    .zip(&grad)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(diff < 1e-6, "{cuts:?}/{micro}: max |diff| {diff}");
            }
        }
    }

    #[test]
    fn stage_ranges_tile_the_parameter_vector() {
        let net = Network::new(64, &[128, 64], 10);
        let a = net.stage(0..1).unwrap();
        let b = net.stage(1..3).unwrap();
        assert_eq!(a.param_range(), 0..64 * 128 + 128);
        assert_eq!(b.param_range().start, a.param_range().end);
        assert_eq!(b.param_range().end, net.num_params());
        assert!(a.is_first() && !a.is_last() && b.is_last() && !b.is_first());
        assert_eq!((b.input_width(), b.output_width()), (128, 10));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let net = Network::new(4, &[3], 2);
        assert!(net.stage(1..1).is_err());
        assert!(net.stage(0..3).is_err());
        let s = net.stage(1..2).unwrap();
        let p = vec![0.0; s.num_params()];
        assert!(matches!(
            s.forward(&p, as_matrix(&[0.0; 8], 4)),
            Err(ModelError::FeatureCount { .. })
        ));
        assert!(s.forward(&p[1..], as_matrix(&[0.0; 6], 3)).is_err());
        let (logits, stash) = s.forward(&p, as_matrix(&[0.0; 6], 3)).unwrap();
        assert!(s.loss_gradient(&logits, &[0, 5], 2).is_err());
        assert!(s.loss_gradient(&logits, &[0, 1], 1).is_err());
        let mut g = vec![0.0; s.num_params()];
        assert!(
            s.backward(&p, &stash, as_matrix(&[0.0; 3], 1), &mut g)
                .is_err()
        );
        let first = net.stage(0..1).unwrap();
        let (h, _) = first
            .forward(&vec![0.0; first.num_params()], as_matrix(&[0.0; 4], 4))
            .unwrap();
        assert!(first.loss_gradient(&h, &[0], 1).is_err());
    }
}
