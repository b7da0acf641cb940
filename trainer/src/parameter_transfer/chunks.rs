//! A tensor as `ParameterTransfer` chunks: little-endian bytes of `f32`s, cut into chunks
//! of [`CHUNK_BYTES`], and put back together in order on the other side.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::transport::CHUNK_BYTES;

/// Little-endian bytes of a tensor.
pub fn to_bytes(values: &[f32]) -> Bytes {
    #[cfg(target_endian = "little")]
    {
        Bytes::copy_from_slice(bytemuck::cast_slice(values))
    }
    #[cfg(not(target_endian = "little"))]
    {
        let mut out = vec![0u8; values.len() * 4];
        for (dst, v) in out.chunks_exact_mut(4).zip(values) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        Bytes::from(out)
    }
}

/// A range of a shared tensor seen as its bytes, so a chunk can be sent without copying:
/// on little-endian targets the in-memory f32s already are the wire format.
#[cfg(target_endian = "little")]
struct TensorBytes {
    values: Arc<Vec<f32>>,
    range: Range<usize>,
}

#[cfg(target_endian = "little")]
impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.values[self.range.clone()])
    }
}

/// Cuts a tensor's bytes into `(offset in f32 elements, chunk)` pieces sharing one buffer.
pub fn chunks(bytes: &Bytes) -> impl Iterator<Item = (u64, Bytes)> + '_ {
    (0..bytes.len().div_ceil(CHUNK_BYTES).max(1)).map(move |i| {
        let start = i * CHUNK_BYTES;
        let end = (start + CHUNK_BYTES).min(bytes.len());
        ((start / 4) as u64, bytes.slice(start..end))
    })
}

/// Cuts `values[range]` into chunks as the stream is polled. On little-endian targets each
/// chunk borrows the tensor (zero copy: the `Arc` keeps it alive until sent); elsewhere a
/// chunk is encoded when polled, so encoding overlaps with sending the previous one.
/// Yields `(offset within the range in f32 elements, bytes)`.
pub fn encode_chunks(
    values: Arc<Vec<f32>>,
    range: Range<usize>,
) -> impl Iterator<Item = (u64, Bytes)> + Send + 'static {
    let per = CHUNK_BYTES / 4;
    let len = range.len();
    (0..len.div_ceil(per).max(1)).map(move |i| {
        let start = i * per;
        let end = (start + per).min(len);
        let piece = range.start + start..range.start + end;
        #[cfg(target_endian = "little")]
        let data = Bytes::from_owner(TensorBytes {
            values: values.clone(),
            range: piece,
        });
        #[cfg(not(target_endian = "little"))]
        let data = to_bytes(&values[piece]);
        (start as u64, data)
    })
}

/// Appends little-endian f32 `data` (a whole number of values) to `values`.
pub fn extend_from_le(values: &mut Vec<f32>, data: &[u8]) {
    #[cfg(target_endian = "little")]
    {
        // A plain memcpy. The chunk's bytes need not be 4-aligned inside the receive
        // buffer; then copy into the (aligned) f32 storage viewed as bytes instead. (A
        // decoding loop that writes each value once, without the zero-fill, was no faster:
        // the PS used 23.6 ms of CPU per 16 MiB push+pull against 23.0 ms, perf.)
        match bytemuck::try_cast_slice::<u8, f32>(data) {
            Ok(floats) => values.extend_from_slice(floats),
            Err(_) => {
                let old = values.len();
                values.resize(old + data.len() / 4, 0.0);
                bytemuck::cast_slice_mut::<f32, u8>(&mut values[old..]).copy_from_slice(data);
            }
        }
    }
    #[cfg(not(target_endian = "little"))]
    values.extend(
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
}

/// Copies little-endian tensor bytes into `values`, starting `at` bytes in. The bytes of
/// one value may come in different calls (an HTTP/2 frame can end inside one); once all
/// have arrived, [`from_le_in_place`] makes them native.
pub fn write_le_bytes(values: &mut [f32], at: usize, data: &[u8]) {
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(values);
    bytes[at..at + data.len()].copy_from_slice(data);
}

/// Values written by [`write_le_bytes`] as native f32 (nothing to do on little-endian
/// targets).
pub fn from_le_in_place(values: &mut [f32]) {
    #[cfg(target_endian = "big")]
    for v in values.iter_mut() {
        *v = f32::from_bits(u32::from_le(v.to_bits()));
    }
    #[cfg(target_endian = "little")]
    let _ = values;
}

/// A chunk of a tensor that does not fit where it claims to go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk of {0} bytes is not a whole number of f32 values")]
    Ragged(usize),
    #[error("chunk at offset {offset} with {len} values overruns a tensor of {total}")]
    OutOfRange {
        offset: u64,
        len: usize,
        total: usize,
    },
    #[error("chunk at offset {offset} leaves a gap or overlap (expected offset {expected})")]
    OutOfOrder { offset: u64, expected: usize },
    #[error("tensor truncated: got {got} of {total} values")]
    Truncated { got: usize, total: usize },
    #[error("tensor length changed mid-stream from {first} to {now}")]
    LengthChanged { first: usize, now: usize },
}

/// The checks every received tensor passes, without keeping the values: chunks in order,
/// whole f32s, within a length that stays the same and is capped by the caller.
#[derive(Debug, Default, Clone)]
pub struct ChunkOrder {
    next: usize,
    total: Option<usize>,
}

impl ChunkOrder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks one chunk of `data_len` bytes; returns its length in f32 values. `limit` caps
    /// `total` so a hostile length cannot make the receiver allocate.
    pub fn check(
        &mut self,
        offset: u64,
        total: u64,
        data_len: usize,
        limit: usize,
    ) -> Result<usize, ChunkError> {
        let total_usize = usize::try_from(total).unwrap_or(usize::MAX);
        match self.total {
            None => {
                if total_usize > limit {
                    return Err(ChunkError::OutOfRange {
                        offset,
                        len: 0,
                        total: limit,
                    });
                }
                self.total = Some(total_usize);
            }
            Some(first) if first != total_usize => {
                return Err(ChunkError::LengthChanged {
                    first,
                    now: total_usize,
                });
            }
            Some(_) => {}
        }
        if !data_len.is_multiple_of(4) {
            return Err(ChunkError::Ragged(data_len));
        }
        let len = data_len / 4;
        if offset != self.next as u64 {
            return Err(ChunkError::OutOfOrder {
                offset,
                expected: self.next,
            });
        }
        if self.next + len > total_usize {
            return Err(ChunkError::OutOfRange {
                offset,
                len,
                total: total_usize,
            });
        }
        self.next += len;
        Ok(len)
    }

    /// The announced length, once a chunk has been seen.
    pub fn total(&self) -> Option<usize> {
        self.total
    }

    /// Ok when every value has arrived.
    pub fn finish(&self) -> Result<(), ChunkError> {
        let total = self.total.unwrap_or(0);
        if self.next != total {
            return Err(ChunkError::Truncated {
                got: self.next,
                total,
            });
        }
        Ok(())
    }
}

/// Reassembles a tensor from in-order chunks, validating every piece.
#[derive(Debug)]
pub struct Assembler {
    values: Vec<f32>,
    order: ChunkOrder,
}

impl Assembler {
    pub fn new() -> Self {
        Self::with_buffer(Vec::new())
    }

    /// Assembles into a recycled buffer: a fresh 16 MiB allocation costs more in page
    /// faults than decoding into it.
    pub fn with_buffer(mut buffer: Vec<f32>) -> Self {
        buffer.clear();
        Self {
            values: buffer,
            order: ChunkOrder::new(),
        }
    }

    /// Adds one chunk. `limit` caps `total` so a hostile length cannot make us allocate.
    pub fn add(
        &mut self,
        offset: u64,
        total: u64,
        data: &[u8],
        limit: usize,
    ) -> Result<(), ChunkError> {
        let first = self.order.total().is_none();
        self.order.check(offset, total, data.len(), limit)?;
        if first {
            self.values.reserve_exact(
                self.order
                    .total()
                    .unwrap_or(0)
                    .saturating_sub(self.values.len()),
            );
        }
        extend_from_le(&mut self.values, data);
        Ok(())
    }

    /// The whole tensor, or an error when chunks are missing.
    pub fn finish(self) -> Result<Vec<f32>, ChunkError> {
        self.order.finish()?;
        Ok(self.values)
    }
}

impl Default for Assembler {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_reassemble() {
        let values: Vec<f32> = (0..(CHUNK_BYTES / 2)).map(|i| i as f32).collect();
        let bytes = to_bytes(&values);
        let mut asm = Assembler::new();
        let pieces: Vec<_> = chunks(&bytes).collect();
        assert_eq!(pieces.len(), 2);
        for (offset, piece) in pieces {
            assert!(piece.len() <= CHUNK_BYTES);
            asm.add(offset, values.len() as u64, &piece, usize::MAX)
                .unwrap();
        }
        assert_eq!(asm.finish().unwrap(), values);
    }

    #[test]
    fn lazy_chunks_match_eager_ones() {
        let values: Vec<f32> = (0..(CHUNK_BYTES / 4 * 2 + 5)).map(|i| i as f32).collect();
        let eager: Vec<_> = chunks(&to_bytes(&values[3..])).collect();
        let lazy: Vec<_> = encode_chunks(Arc::new(values.clone()), 3..values.len()).collect();
        assert_eq!(eager, lazy);
        assert_eq!(encode_chunks(Arc::new(vec![]), 0..0).count(), 1);
    }

    #[test]
    fn bad_chunks_are_errors() {
        let mut asm = Assembler::new();
        assert!(matches!(
            asm.add(0, 4, &[0; 5], 10),
            Err(ChunkError::Ragged(5))
        ));
        let mut asm = Assembler::new();
        assert!(matches!(
            asm.add(0, 1, &[0; 8], 10),
            Err(ChunkError::OutOfRange { .. })
        ));
        let mut asm = Assembler::new();
        assert!(matches!(
            asm.add(0, 100, &[0; 8], 10),
            Err(ChunkError::OutOfRange { .. })
        ));
        let mut asm = Assembler::new();
        asm.add(0, 4, &[0; 8], 10).unwrap();
        assert!(matches!(
            asm.add(3, 4, &[0; 4], 10),
            Err(ChunkError::OutOfOrder { .. })
        ));
        assert!(matches!(
            asm.finish(),
            Err(ChunkError::Truncated { got: 2, total: 4 })
        ));
    }
}
