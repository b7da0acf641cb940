//! Transport settings shared by every client and server, and tensor <-> bytes helpers.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tonic::transport::{Channel, Endpoint, Server};

/// Largest tensor payload per message (the limit is 4 MiB). Small enough that encoding,
/// sending and decoding of consecutive chunks overlap: a 16 MiB push+pull on loopback took
/// ~42 ms with 256 KiB chunks against ~60 ms with 1 MiB and ~72 ms with 4 MiB (trainer-bench).
pub const CHUNK_BYTES: usize = 256 << 10;
/// Accepted message size: a chunk plus headroom for the other fields.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// HTTP/2 flow-control windows. The defaults (64 KiB) stall a 16 MiB push on round trips.
pub const STREAM_WINDOW: u32 = 32 << 20;
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// HTTP/2 frame size: fewer frames per chunk than the 16 KiB default.
pub const MAX_FRAME: u32 = 1 << 20;

/// A lazily connecting channel to a peer. Lazy so that a PS that is down (or restarting)
/// does not fail construction; each call connects (again) on demand.
pub fn channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// A server builder with the same windows and frame size.
pub fn server() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
}

/// Accepted connections of `listener`, with Nagle off: tensor messages are written in
/// pieces and would otherwise wait ~40 ms for delayed ACKs on every step. (The server
/// builder's own `tcp_nodelay` only applies to listeners it binds itself.)
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Little-endian bytes of a tensor.
pub fn to_bytes(values: &[f32]) -> Bytes {
    // Written as a zip over fixed 4-byte chunks so the compiler turns it into a plain copy.
    let mut out = vec![0u8; values.len() * 4];
    for (dst, v) in out.chunks_exact_mut(4).zip(values) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

/// Cuts a tensor's bytes into `(offset in f32 elements, chunk)` pieces sharing one buffer.
pub fn chunks(bytes: &Bytes) -> impl Iterator<Item = (u64, Bytes)> + '_ {
    (0..bytes.len().div_ceil(CHUNK_BYTES).max(1)).map(move |i| {
        let start = i * CHUNK_BYTES;
        let end = (start + CHUNK_BYTES).min(bytes.len());
        ((start / 4) as u64, bytes.slice(start..end))
    })
}

/// Encodes `values[range]` chunk by chunk as the stream is polled, so encoding one chunk
/// overlaps with sending the previous one instead of serialising the whole tensor first.
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
        (
            start as u64,
            to_bytes(&values[range.start + start..range.start + end]),
        )
    })
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

/// Reassembles a tensor from in-order chunks, validating every piece.
#[derive(Debug)]
pub struct Assembler {
    values: Vec<f32>,
    total: Option<usize>,
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
            total: None,
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
                self.values.reserve_exact(total_usize);
            }
            Some(first) if first != total_usize => {
                return Err(ChunkError::LengthChanged {
                    first,
                    now: total_usize,
                });
            }
            Some(_) => {}
        }
        if !data.len().is_multiple_of(4) {
            return Err(ChunkError::Ragged(data.len()));
        }
        let len = data.len() / 4;
        if offset != self.values.len() as u64 {
            return Err(ChunkError::OutOfOrder {
                offset,
                expected: self.values.len(),
            });
        }
        if self.values.len() + len > total_usize {
            return Err(ChunkError::OutOfRange {
                offset,
                len,
                total: total_usize,
            });
        }
        self.values.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        Ok(())
    }

    /// The whole tensor, or an error when chunks are missing.
    pub fn finish(self) -> Result<Vec<f32>, ChunkError> {
        let total = self.total.unwrap_or(0);
        if self.values.len() != total {
            return Err(ChunkError::Truncated {
                got: self.values.len(),
                total,
            });
        }
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
