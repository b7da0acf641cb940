//! A tensor given as runs of little-endian `f32` values where they already lie, so that an
//! update can read a received gradient without copying it into a vector first. The
//! transport implements it for what it received; the math here needs nothing else of it.

use std::ops::Range;

/// Little-endian `f32` values, read in runs.
pub trait ValueRuns: Sync {
    /// Whole values available.
    fn len(&self) -> usize;

    /// Whether the bytes are a whole number of values (a tensor cut off inside a value is
    /// not a gradient).
    fn is_whole(&self) -> bool;

    /// Calls `emit(index, run)` for the values `range`, in order and each once, `index`
    /// being the first value's index in the whole tensor. Indices past
    /// [`ValueRuns::len`] are not emitted.
    fn runs(&self, range: Range<usize>, emit: &mut dyn FnMut(usize, &[[u8; 4]]));

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The index of the first NaN or infinite value, if any.
    fn first_non_finite(&self) -> Option<usize> {
        let mut found = None;
        self.runs(0..self.len(), &mut |index, run| {
            if found.is_none() {
                found = run
                    .iter()
                    .position(|b| !f32::from_le_bytes(*b).is_finite())
                    .map(|i| index + i);
            }
        });
        found
    }

    /// The values as native `f32`s, appended to `out`.
    fn extend_into(&self, out: &mut Vec<f32>) {
        out.reserve(self.len());
        self.runs(0..self.len(), &mut |_, run| {
            out.extend(run.iter().map(|b| f32::from_le_bytes(*b)));
        });
    }
}
