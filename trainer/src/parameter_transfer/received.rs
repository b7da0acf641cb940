//! A tensor as it was received: its little-endian `f32` bytes, kept in the pieces (HTTP/2
//! frames) they arrived in instead of being copied into a vector. A piece may end inside a
//! value. The parameter server applies a push straight from these bytes.

use std::ops::Range;

use bytes::Bytes;

use crate::model::ValueRuns;

/// The received bytes of one tensor, in order.
#[derive(Debug, Default, Clone)]
pub struct ReceivedTensor {
    pieces: Vec<Bytes>,
    bytes: usize,
}

impl ReceivedTensor {
    /// Appends the next piece of the tensor's bytes.
    pub fn push(&mut self, piece: Bytes) {
        self.bytes += piece.len();
        self.pieces.push(piece);
    }
}

impl ValueRuns for ReceivedTensor {
    fn len(&self) -> usize {
        self.bytes / 4
    }

    fn is_whole(&self) -> bool {
        self.bytes.is_multiple_of(4)
    }

    /// In runs that borrow the pieces; only a value cut between two pieces is put
    /// together, on the way.
    fn runs(&self, range: Range<usize>, emit: &mut dyn FnMut(usize, &[[u8; 4]])) {
        let (lo, hi) = (range.start * 4, range.end.min(self.len()) * 4);
        let mut whole = ValueCarry::default();
        let mut at = 0;
        for piece in &self.pieces {
            let (start, end) = (at, at + piece.len());
            at = end;
            if end <= lo {
                continue;
            }
            if start >= hi {
                break;
            }
            let part = &piece[lo.saturating_sub(start)..hi.min(end) - start];
            whole.feed(part, |index, run| emit(range.start + index, run));
        }
    }
}

/// Cuts bytes that arrive in pieces cut anywhere into runs of whole values; only a value
/// split between two pieces is put together, in a 4-byte carry.
#[derive(Debug, Default)]
struct ValueCarry {
    carry: [u8; 4],
    carried: usize,
    /// Values emitted so far.
    values: usize,
}

impl ValueCarry {
    /// Feeds the next piece; `emit(index, run)` gets each run of whole values, `index`
    /// counting values from the first piece.
    fn feed(&mut self, mut piece: &[u8], mut emit: impl FnMut(usize, &[[u8; 4]])) {
        if self.carried > 0 {
            let take = (4 - self.carried).min(piece.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&piece[..take]);
            self.carried += take;
            piece = &piece[take..];
            if self.carried < 4 {
                return;
            }
            emit(self.values, std::slice::from_ref(&self.carry));
            self.values += 1;
            self.carried = 0;
        }
        let whole = piece.len() / 4 * 4;
        let run: &[[u8; 4]] = bytemuck::cast_slice(&piece[..whole]);
        if !run.is_empty() {
            emit(self.values, run);
            self.values += run.len();
        }
        let rest = &piece[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// `values` as wire bytes cut at random places.
    pub(crate) fn cut_at_random(values: &[f32], rng: &mut StdRng) -> ReceivedTensor {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut cuts: Vec<usize> = (0..rng.random_range(0..12))
            .map(|_| rng.random_range(0..=bytes.len()))
            .collect();
        cuts.extend([0, bytes.len()]);
        cuts.sort_unstable();
        let mut wire = ReceivedTensor::default();
        for piece in cuts.windows(2) {
            wire.push(Bytes::copy_from_slice(&bytes[piece[0]..piece[1]]));
        }
        wire
    }

    #[test]
    fn any_range_of_any_cutting_gives_its_values_in_order() {
        let values: Vec<f32> = (0..97).map(|i| i as f32 * 0.37 - 11.0).collect();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let wire = cut_at_random(&values, &mut rng);
            assert_eq!(wire.len(), values.len());
            let start = rng.random_range(0..=values.len());
            let end = rng.random_range(start..=values.len());
            let mut got = Vec::new();
            wire.runs(start..end, &mut |index, run| {
                assert_eq!(index, start + got.len(), "runs come in order, none skipped");
                got.extend(run.iter().map(|b| f32::from_le_bytes(*b)));
            });
            assert_eq!(got, values[start..end]);
            let mut all = Vec::new();
            wire.extend_into(&mut all);
            assert_eq!(all, values);
        }
    }

    #[test]
    fn the_first_non_finite_value_is_found_wherever_the_pieces_cut() {
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..200 {
            let mut values: Vec<f32> = (0..61).map(|i| i as f32 - 30.0).collect();
            assert_eq!(cut_at_random(&values, &mut rng).first_non_finite(), None);
            let first = rng.random_range(0..values.len());
            values[first] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][first % 3];
            if first + 1 < values.len() {
                let later = rng.random_range(first + 1..values.len());
                values[later] = f32::NAN;
            }
            assert_eq!(
                cut_at_random(&values, &mut rng).first_non_finite(),
                Some(first)
            );
        }
    }

    #[test]
    fn a_value_cut_off_at_the_end_is_not_a_value() {
        let mut wire = ReceivedTensor::default();
        wire.push(Bytes::from_static(&[0, 0, 128, 63, 0, 0]));
        assert_eq!((wire.len(), wire.is_whole()), (1, false));
        let mut got = Vec::new();
        wire.runs(0..5, &mut |_, run| got.extend_from_slice(run));
        assert_eq!(got, [1.0f32.to_le_bytes()]);
    }

    /// The optimizer's pass over values cut inside frames, which only this tensor does.
    #[test]
    fn updates_from_pieces_cut_anywhere_equal_applied_ones() {
        use crate::model::{Optimizer, StepAdjust};
        use kubetrain_api::{OptimizerKind, OptimizerSpec};
        let mut rng = StdRng::seed_from_u64(3);
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adam] {
            let spec = OptimizerSpec {
                kind,
                learning_rate: 0.1,
                momentum: (kind == OptimizerKind::Sgd).then_some(0.9),
                beta1: None,
                beta2: None,
                epsilon: None,
            };
            for threads in [1, 2, 3, 50] {
                let mut applied = Optimizer::new(&spec, 37);
                let mut from_pieces = applied.clone();
                let mut p: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 1.0).collect();
                let mut q = p.clone();
                for step in 0..4 {
                    let g: Vec<f32> = (0..37).map(|i| (i as f32 - step as f32) * 0.3).collect();
                    applied.apply(&mut p, &g).unwrap();
                    let wire = cut_at_random(&g, &mut rng);
                    from_pieces
                        .apply_runs(&mut q, &wire, threads, StepAdjust::NONE)
                        .unwrap();
                }
                assert_eq!(p, q, "{kind:?}, {threads} threads");
                assert_eq!(applied, from_pieces, "{kind:?}, {threads} threads");
            }
        }
    }
}
