//! The hand-written gRPC framing decoder (`framing::Splitter`) and the chunk checks
//! behind it (`chunks::ChunkOrder`), fed what a peer could send: raw bytes, or well-framed
//! messages with bytes flipped and the stream cut short, in HTTP/2 frames cut anywhere.
//!
//! Checked, beyond "no panic": every message comes out as Start, Data adding up to its
//! length, End; the cut of the stream into frames changes nothing, errors included; a
//! decoded message framed again decodes to itself; an intact stream decodes to what was
//! framed; and a push decoded the PS's way (copied for Sync, kept in its frames for the
//! others) gives the same values both ways.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use kubetrain_trainer::model::ValueRuns;
use kubetrain_trainer::parameter_transfer::chunks::{self, ChunkOrder};
use kubetrain_trainer::parameter_transfer::framing::{
    FrameError, Piece, Splitter, TensorMessage, decode_single, encode_message, encode_tensor,
};
use kubetrain_trainer::parameter_transfer::received::ReceivedTensor;
use kubetrain_trainer::proto::{PullRequest, PushChunk, PushResponse, TensorChunk};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Small enough that the fuzzer reaches it, large enough for a few messages.
const LIMIT: usize = 4096;

#[derive(Arbitrary, Debug)]
enum Input {
    /// Bytes as they come, for either message type.
    Raw {
        tensor_chunks: bool,
        cuts: Vec<u16>,
        stream: Vec<u8>,
    },
    /// Pushes framed as a worker frames them, then damaged.
    Framed {
        messages: Vec<Chunk>,
        flips: Vec<(u16, u8)>,
        truncate: Option<u16>,
        cuts: Vec<u16>,
        /// The shard length the PS expects.
        shard_len: u8,
    },
    /// The small messages read whole.
    Single { pull: bool, bytes: Vec<u8> },
    /// The chunk checks on their own, with lengths a decoder could report.
    Order {
        limit: u64,
        chunks: Vec<(u64, u64, u16)>,
    },
}

#[derive(Arbitrary, Debug)]
struct Chunk {
    worker_id: u8,
    base_version: u64,
    step: u64,
    offset: u8,
    total_len: u8,
    /// Fields of a newer peer, put before the payload.
    unknown: Option<(u8, u64)>,
    data: Vec<u8>,
}

/// What a splitter reported for one message.
#[derive(Debug, PartialEq)]
struct Seen<M> {
    head: M,
    data: Vec<u8>,
    /// The payload's pieces as fed.
    pieces: usize,
}

/// Everything a splitter reported: the messages, and the error it stopped at.
type Split<M> = (Vec<Seen<M>>, Option<FrameError>);

/// Feeds `stream` cut at `cuts`, checking the order of the pieces.
fn split<M: TensorMessage + PartialEq + std::fmt::Debug>(stream: &[u8], cuts: &[u16]) -> Split<M> {
    let mut splitter = Splitter::<M>::new(LIMIT);
    let mut seen = Vec::new();
    let mut current: Option<(M, usize, Vec<u8>, usize)> = None;
    let mut on = |piece: Piece<'_, M>| -> Result<(), FrameError> {
        match piece {
            Piece::Start { head, data_len } => {
                assert!(current.is_none(), "Start inside a message");
                assert!(data_len <= LIMIT, "{data_len} bytes past the limit");
                current = Some((head, data_len, Vec::new(), 0));
            }
            Piece::Data(data) => {
                let (_, len, got, pieces) = current.as_mut().expect("Data before Start");
                assert!(!data.is_empty(), "an empty Data piece");
                got.extend_from_slice(data);
                *pieces += 1;
                assert!(got.len() <= *len, "more data than announced");
            }
            Piece::End => {
                let (head, len, data, pieces) = current.take().expect("End before Start");
                assert_eq!(data.len(), len, "End before all the data");
                seen.push(Seen { head, data, pieces });
            }
        }
        Ok(())
    };
    let mut cuts: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();
    let mut at = 0;
    for cut in cuts.into_iter().chain([stream.len()]) {
        if let Err(e) = splitter.feed(&stream[at..cut], &mut on) {
            return (seen, Some(e));
        }
        at = cut;
    }
    let end = splitter.finish().err();
    assert!(
        current.is_none() || end.is_some(),
        "a message open at a clean end"
    );
    (seen, end)
}

/// The stream decoded in frames cut at `cuts` and in one piece: the same messages and
/// the same error, and each message framed again decodes to itself.
fn split_checked<M: TensorMessage + PartialEq + Clone + HasData + std::fmt::Debug>(
    stream: &[u8],
    cuts: &[u16],
) -> Split<M> {
    let (cut, cut_error) = split::<M>(stream, cuts);
    let (whole, whole_error) = split::<M>(stream, &[]);
    assert_eq!(cut_error, whole_error, "the frames' cut changed the error");
    assert_eq!(
        cut.len(),
        whole.len(),
        "the frames' cut changed the messages"
    );
    for (a, b) in cut.iter().zip(&whole) {
        assert_eq!((&a.head, &a.data), (&b.head, &b.data));
        assert!(a.head.data_is_empty(), "the payload leaked into the head");
        let [prefix, data] = encode_tensor(&a.head, Bytes::copy_from_slice(&a.data));
        let again = [prefix.as_ref(), data.as_ref()].concat();
        let (mut back, error) = split::<M>(&again, &[]);
        assert_eq!(
            error, None,
            "a decoded message does not decode once framed again"
        );
        let back = back.pop().expect("one message");
        assert_eq!((back.head, back.data), (a.head.clone(), a.data.clone()));
    }
    (cut, cut_error)
}

trait HasData {
    fn data_is_empty(&self) -> bool;
}

impl HasData for PushChunk {
    fn data_is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl HasData for TensorChunk {
    fn data_is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// A push, framed as `push_tensor` frames it (plus unknown fields when asked for).
fn frame(chunk: &Chunk) -> Vec<u8> {
    let head = PushChunk {
        worker_id: u32::from(chunk.worker_id),
        base_version: chunk.base_version,
        step: chunk.step,
        offset: u64::from(chunk.offset),
        total_len: u64::from(chunk.total_len),
        data: Bytes::new(),
    };
    let [prefix, data] = encode_tensor(&head, Bytes::copy_from_slice(&chunk.data));
    let framed = [prefix.as_ref(), data.as_ref()].concat();
    let Some((field, value)) = chunk.unknown else {
        return framed;
    };
    // Fields 7.. are unknown to this PS: a varint one goes before the payload's key.
    let mut body = Vec::new();
    head.encode_raw(&mut body);
    prost::encoding::encode_key(
        7 + u32::from(field),
        prost::encoding::WireType::Varint,
        &mut body,
    );
    prost::encoding::encode_varint(value, &mut body);
    body.extend_from_slice(&framed[5 + head.encoded_len()..]);
    let mut out = vec![0];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn framed(messages: &[Chunk], flips: &[(u16, u8)], truncate: Option<u16>, cuts: &[u16], len: u8) {
    let mut stream: Vec<u8> = messages.iter().flat_map(frame).collect();
    let intact = flips.is_empty() && truncate.is_none();
    for &(at, xor) in flips {
        if !stream.is_empty() {
            let at = usize::from(at) % stream.len();
            stream[at] ^= xor;
        }
    }
    if let Some(end) = truncate {
        stream.truncate(usize::from(end));
    }
    let (seen, error) = split_checked::<PushChunk>(&stream, cuts);
    if intact {
        let fits = messages.iter().all(|m| m.data.len() + 64 <= LIMIT);
        if fits {
            assert_eq!(error, None, "an intact stream is refused");
            assert_eq!(seen.len(), messages.len());
            for (got, sent) in seen.iter().zip(messages) {
                assert_eq!(got.data, sent.data);
                assert_eq!(got.head.step, sent.step);
                assert_eq!(got.head.base_version, sent.base_version);
            }
        }
    }
    if error.is_none() {
        receive_push(&stream, cuts, usize::from(len));
    }
}

/// A push received as `ps::server::transfer` receives it: the chunk checks, then the
/// values copied into place (Sync) and kept in their frames (the others), which must agree.
fn receive_push(stream: &[u8], cuts: &[u16], limit: usize) {
    let mut cuts: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();
    cuts.push(stream.len());
    let mut splitter = Splitter::<PushChunk>::new(LIMIT);
    let mut order = ChunkOrder::new();
    let mut copied = vec![0.0f32; limit];
    let mut kept = ReceivedTensor::default();
    let (mut start, mut len, mut filled) = (0, 0, 0);
    let mut key = None;
    let mut at = 0;
    for cut in cuts {
        let frame = Bytes::copy_from_slice(&stream[at..cut]);
        at = cut;
        // Refusals of the push itself, as the PS would answer them, end it like bad framing.
        let refuse = |why: String| FrameError::Malformed(why);
        let fed = splitter.feed(&frame, &mut |piece| -> Result<(), FrameError> {
            match piece {
                Piece::Start { head, data_len } => {
                    let k = (head.worker_id, head.base_version, head.step);
                    if *key.get_or_insert(k) != k || head.total_len != limit as u64 {
                        return Err(refuse("another push".into()));
                    }
                    len = order
                        .check(head.offset, head.total_len, data_len, limit)
                        .map_err(|e| refuse(e.to_string()))?;
                    assert_eq!(len * 4, data_len);
                    (start, filled) = (head.offset as usize, 0);
                    assert!(start + len <= limit, "a chunk past the shard passed");
                }
                Piece::Data(data) => {
                    chunks::write_le_bytes(&mut copied[start..start + len], filled, data);
                    filled += data.len();
                    kept.push(frame.slice_ref(data));
                }
                Piece::End => chunks::from_le_in_place(&mut copied[start..start + len]),
            }
            Ok(())
        });
        if fed.is_err() {
            return;
        }
    }
    if order.finish().is_err() || key.is_none() {
        return;
    }
    assert_eq!(order.total(), Some(limit));
    assert_eq!((kept.len(), kept.is_whole()), (limit, true));
    let mut from_frames = Vec::new();
    kept.extend_into(&mut from_frames);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&from_frames),
        bits(&copied),
        "the two receive paths differ"
    );
    assert_eq!(
        kept.first_non_finite(),
        copied.iter().position(|v| !v.is_finite())
    );
}

/// The chunk checks: what they accept lies end to end within the announced length.
fn order(limit: u64, chunks: &[(u64, u64, u16)]) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut order = ChunkOrder::new();
    let mut next = 0usize;
    for &(offset, total, data_len) in chunks {
        let data_len = usize::from(data_len);
        match order.check(offset, total, data_len, limit) {
            Ok(len) => {
                assert_eq!((len * 4, offset), (data_len, next as u64));
                next += len;
                let total = order.total().expect("a total once a chunk passed");
                assert!(
                    total <= limit && next <= total,
                    "{next} of {total}, limit {limit}"
                );
            }
            Err(_) => return,
        }
    }
    assert_eq!(order.finish().is_ok(), order.total().unwrap_or(0) == next);
}

/// The small messages, read whole: decoded or refused, and what decodes re-encodes.
fn single(pull: bool, bytes: &[u8]) {
    if pull {
        if let Ok(request) = decode_single::<PullRequest>(bytes) {
            let again = encode_message(&request);
            assert_eq!(decode_single::<PullRequest>(&again), Ok(request));
        }
    } else if let Ok(answer) = decode_single::<PushResponse>(bytes) {
        let again = encode_message(&answer);
        assert_eq!(decode_single::<PushResponse>(&again), Ok(answer));
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw {
            tensor_chunks,
            cuts,
            stream,
        } => {
            if tensor_chunks {
                split_checked::<TensorChunk>(&stream, &cuts);
            } else if split_checked::<PushChunk>(&stream, &cuts).1.is_none() {
                receive_push(&stream, &cuts, 16);
            }
        }
        Input::Framed {
            messages,
            flips,
            truncate,
            cuts,
            shard_len,
        } => framed(&messages, &flips, truncate, &cuts, shard_len),
        Input::Single { pull, bytes } => single(pull, &bytes),
        Input::Order { limit, chunks } => order(limit, &chunks),
    }
});
