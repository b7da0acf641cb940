//! gRPC messages that carry a tensor, encoded and decoded without copying the tensor.
//!
//! A gRPC message is a 5-byte prefix (compressed flag, big-endian length) and a protobuf
//! message. Ours are small fields followed by one large `bytes data` field. Encoding writes
//! the prefix, the small fields and the data field's key and length into a small buffer and
//! sends the tensor's own bytes after it. Decoding ([`Splitter`]) parses the small fields
//! with prost and hands the data to the caller piece by piece, straight out of the HTTP/2
//! frames, so the caller copies it once, into its tensor.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::proto::{PushChunk, TensorChunk};

/// Prefix of every gRPC message: compressed flag and length.
const PREFIX: usize = 5;
/// Bound on the small fields before `data`: ours take under 50 bytes.
const MAX_HEAD: usize = 4096;

/// A protobuf message whose last field is a tensor payload (`bytes data`).
pub trait TensorMessage: Message + Default {
    /// The payload's field number; the message's highest.
    const DATA_FIELD: u32;
}

impl TensorMessage for PushChunk {
    const DATA_FIELD: u32 = 6;
}

impl TensorMessage for TensorChunk {
    const DATA_FIELD: u32 = 4;
}

/// A byte stream that is not the gRPC framing of the expected messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("compressed gRPC messages are not accepted; send them uncompressed")]
    Compressed,
    #[error("gRPC message of {len} bytes exceeds the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("malformed protobuf: {0}")]
    Malformed(String),
    #[error("a field follows `data` (field {0}); `data` must be the message's last field")]
    FieldAfterData(u32),
    #[error("the fields before `data` exceed {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the stream ended inside a gRPC message")]
    Truncated,
}

/// One gRPC message: `head` (whose data field must be empty) with `data` as its payload, as
/// two pieces to send one after the other. `data` is not copied.
pub fn encode_tensor<M: TensorMessage>(head: &M, data: Bytes) -> [Bytes; 2] {
    let fields = head.encoded_len();
    let len = fields + key_len(M::DATA_FIELD) + encoded_len_varint(data.len() as u64) + data.len();
    let mut out = BytesMut::with_capacity(PREFIX + len - data.len());
    out.put_u8(0);
    out.put_u32(len as u32);
    head.encode_raw(&mut out);
    encode_key(M::DATA_FIELD, WireType::LengthDelimited, &mut out);
    encode_varint(data.len() as u64, &mut out);
    [out.freeze(), data]
}

/// One small gRPC message, copied as usual.
pub fn encode_message<M: Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(PREFIX + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    message.encode_raw(&mut out);
    out.freeze()
}

/// The one gRPC message in `buf` (a small request or answer, read whole).
pub fn decode_single<M: Message + Default>(buf: &[u8]) -> Result<M, FrameError> {
    if buf.len() < PREFIX {
        return Err(FrameError::Truncated);
    }
    if buf[0] != 0 {
        return Err(FrameError::Compressed);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    match buf.len() - PREFIX {
        n if n < len => Err(FrameError::Truncated),
        n if n > len => Err(FrameError::Malformed(
            "more than one message where one was expected".into(),
        )),
        _ => M::decode(&buf[PREFIX..]).map_err(|e| FrameError::Malformed(e.to_string())),
    }
}

/// What a [`Splitter`] finds in the stream, in order: for every message a `Start`, the
/// payload in `Data` pieces adding up to `data_len` bytes, then `End`.
#[derive(Debug, PartialEq)]
pub enum Piece<'a, M> {
    Start { head: M, data_len: usize },
    Data(&'a [u8]),
    End,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Collecting the 5-byte prefix into `head`.
    Prefix,
    /// Collecting the small fields; `skip` bytes of the current field's value remain.
    Fields { remaining: usize, skip: usize },
    /// Passing the payload through; `after` bytes of the message follow it.
    Data { remaining: usize, after: usize },
}

/// Decodes a stream of gRPC messages of type `M` fed in arbitrary pieces (HTTP/2 frames).
#[derive(Debug)]
pub struct Splitter<M> {
    state: State,
    /// The prefix, then the message's bytes up to the payload.
    head: Vec<u8>,
    /// Where the field being parsed starts in `head`.
    field: usize,
    limit: usize,
    _message: std::marker::PhantomData<fn() -> M>,
}

/// The field at the start of `buf`, if its key (and length or value) is complete.
enum FieldHead {
    Incomplete,
    /// The payload field; its length.
    Data(usize),
    /// Another field, with this many bytes of its value still to come.
    Other(usize),
}

/// A varint at the start of `buf`: `None` when it continues past the end.
fn varint(buf: &[u8]) -> Option<Result<(u64, usize), FrameError>> {
    let mut value = 0u64;
    for (i, &byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(Ok((value, i + 1)));
        }
    }
    (buf.len() >= 10).then(|| Err(FrameError::Malformed("varint longer than 10 bytes".into())))
}

fn field_head(buf: &[u8], data_field: u32) -> Result<FieldHead, FrameError> {
    let Some(key) = varint(buf) else {
        return Ok(FieldHead::Incomplete);
    };
    let (key, used) = key?;
    let rest = &buf[used..];
    let field =
        u32::try_from(key >> 3).map_err(|_| FrameError::Malformed("field number".into()))?;
    let wire = WireType::try_from(key & 7).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if field == 0 {
        return Err(FrameError::Malformed("field number 0".into()));
    }
    Ok(match wire {
        WireType::Varint => match varint(rest) {
            None => FieldHead::Incomplete,
            Some(v) => v.map(|_| FieldHead::Other(0))?,
        },
        WireType::SixtyFourBit => FieldHead::Other(8),
        WireType::ThirtyTwoBit => FieldHead::Other(4),
        WireType::LengthDelimited => match varint(rest) {
            None => FieldHead::Incomplete,
            Some(v) => {
                let len =
                    usize::try_from(v?.0).map_err(|_| FrameError::Malformed("length".into()))?;
                if field == data_field {
                    FieldHead::Data(len)
                } else {
                    FieldHead::Other(len)
                }
            }
        },
        WireType::StartGroup | WireType::EndGroup => {
            return Err(FrameError::Malformed("groups are not supported".into()));
        }
    })
}

impl<M: TensorMessage> Splitter<M> {
    /// Accepts messages of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            state: State::Prefix,
            head: Vec::with_capacity(64),
            field: PREFIX,
            limit,
            _message: std::marker::PhantomData,
        }
    }

    /// Feeds the next piece of the stream; calls `on` for what it completes. Stops at the
    /// first error, from the stream or from `on`.
    pub fn feed<E: From<FrameError>>(
        &mut self,
        mut input: &[u8],
        on: &mut impl FnMut(Piece<'_, M>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !input.is_empty() {
            match self.state {
                State::Prefix => {
                    let n = (PREFIX - self.head.len()).min(input.len());
                    self.head.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.head.len() == PREFIX {
                        if self.head[0] != 0 {
                            return Err(FrameError::Compressed.into());
                        }
                        let len = u32::from_be_bytes([
                            self.head[1],
                            self.head[2],
                            self.head[3],
                            self.head[4],
                        ]) as usize;
                        if len > self.limit {
                            return Err(FrameError::TooLarge {
                                len,
                                limit: self.limit,
                            }
                            .into());
                        }
                        self.state = State::Fields {
                            remaining: len,
                            skip: 0,
                        };
                        if len == 0 {
                            self.end_without_data(on)?;
                        }
                    }
                }
                State::Fields { remaining, skip } if skip > 0 => {
                    let n = skip.min(input.len());
                    self.head.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = State::Fields {
                        remaining: remaining - n,
                        skip: skip - n,
                    };
                    if skip == n {
                        self.field = self.head.len();
                        if remaining == n {
                            self.end_without_data(on)?;
                        }
                    }
                }
                State::Fields { remaining, .. } => {
                    if self.head.len() >= PREFIX + MAX_HEAD {
                        return Err(FrameError::HeadTooLarge.into());
                    }
                    // Field keys and lengths are a few bytes: take them one at a time.
                    self.head.push(input[0]);
                    input = &input[1..];
                    let remaining = remaining - 1;
                    match field_head(&self.head[self.field..], M::DATA_FIELD)? {
                        FieldHead::Incomplete if remaining == 0 => {
                            return Err(FrameError::Malformed(
                                "message ends inside a field".into(),
                            )
                            .into());
                        }
                        FieldHead::Incomplete => self.state = State::Fields { remaining, skip: 0 },
                        FieldHead::Data(len) => {
                            if len > remaining {
                                return Err(FrameError::Malformed(
                                    "`data` overruns its message".into(),
                                )
                                .into());
                            }
                            let head = M::decode(&self.head[PREFIX..self.field])
                                .map_err(|e| FrameError::Malformed(e.to_string()))?;
                            on(Piece::Start {
                                head,
                                data_len: len,
                            })?;
                            self.state = State::Data {
                                remaining: len,
                                after: remaining - len,
                            };
                            if len == 0 {
                                self.end_data(remaining, on)?;
                            }
                        }
                        FieldHead::Other(len) => {
                            if len > remaining {
                                return Err(FrameError::Malformed(
                                    "a field overruns its message".into(),
                                )
                                .into());
                            }
                            if self.head.len() + len > PREFIX + MAX_HEAD {
                                return Err(FrameError::HeadTooLarge.into());
                            }
                            self.state = State::Fields {
                                remaining,
                                skip: len,
                            };
                            if len == 0 {
                                self.field = self.head.len();
                                if remaining == 0 {
                                    self.end_without_data(on)?;
                                }
                            }
                        }
                    }
                }
                State::Data { remaining, after } => {
                    let n = remaining.min(input.len());
                    on(Piece::Data(&input[..n]))?;
                    input = &input[n..];
                    self.state = State::Data {
                        remaining: remaining - n,
                        after,
                    };
                    if remaining == n {
                        self.end_data(after, on)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The payload is complete; `after` bytes of the message follow it.
    fn end_data<E: From<FrameError>>(
        &mut self,
        after: usize,
        on: &mut impl FnMut(Piece<'_, M>) -> Result<(), E>,
    ) -> Result<(), E> {
        if after > 0 {
            return Err(FrameError::FieldAfterData(M::DATA_FIELD).into());
        }
        on(Piece::End)?;
        self.reset();
        Ok(())
    }

    /// A message without a payload field: all of it was small fields.
    fn end_without_data<E: From<FrameError>>(
        &mut self,
        on: &mut impl FnMut(Piece<'_, M>) -> Result<(), E>,
    ) -> Result<(), E> {
        let head =
            M::decode(&self.head[PREFIX..]).map_err(|e| FrameError::Malformed(e.to_string()))?;
        on(Piece::Start { head, data_len: 0 })?;
        on(Piece::End)?;
        self.reset();
        Ok(())
    }

    fn reset(&mut self) {
        self.state = State::Prefix;
        self.head.clear();
        self.field = PREFIX;
    }

    /// Ok when the stream ended between messages.
    pub fn finish(&self) -> Result<(), FrameError> {
        match (self.state, self.head.is_empty()) {
            (State::Prefix, true) => Ok(()),
            _ => Err(FrameError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// What a splitter reports, with the data pieces joined.
    #[derive(Debug, PartialEq)]
    enum Seen<M> {
        Message(M, Vec<u8>),
    }

    fn split_all<M: TensorMessage>(
        stream: &[u8],
        cuts: &[usize],
    ) -> Result<Vec<Seen<M>>, FrameError> {
        let mut splitter = Splitter::<M>::new(1 << 20);
        let mut seen = Vec::new();
        let mut current: Option<(M, usize, Vec<u8>)> = None;
        let mut on = |piece: Piece<'_, M>| -> Result<(), FrameError> {
            match piece {
                Piece::Start { head, data_len } => {
                    assert!(current.is_none(), "Start inside a message");
                    current = Some((head, data_len, Vec::new()));
                }
                Piece::Data(data) => current.as_mut().expect("Data before Start").2.extend(data),
                Piece::End => {
                    let (head, len, data) = current.take().expect("End before Start");
                    assert_eq!(data.len(), len);
                    seen.push(Seen::Message(head, data));
                }
            }
            Ok(())
        };
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            let cut = cut.clamp(at, stream.len());
            splitter.feed(&stream[at..cut], &mut on)?;
            at = cut;
        }
        splitter.finish()?;
        Ok(seen)
    }

    fn framed(message: &impl Message) -> Vec<u8> {
        encode_message(message).to_vec()
    }

    fn chunk(offset: u64, data: Vec<u8>) -> PushChunk {
        PushChunk {
            worker_id: 3,
            base_version: 70_000,
            step: 9,
            offset,
            total_len: 1 << 40,
            data: data.into(),
        }
    }

    #[test]
    fn hand_framed_messages_are_what_prost_encodes() {
        for len in [0usize, 1, 4, 1000] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let message = chunk(5, data.clone());
            let mut head = message.clone();
            head.data = Bytes::new();
            let [a, b] = encode_tensor(&head, Bytes::from(data));
            let ours = [a.as_ref(), b.as_ref()].concat();
            let theirs = framed(&message);
            if len > 0 {
                assert_eq!(ours, theirs, "{len} bytes of data");
            }
            // Either way both decode to the same message.
            for stream in [&ours, &theirs] {
                let seen = split_all::<PushChunk>(stream, &[]).unwrap();
                assert_eq!(
                    seen,
                    vec![Seen::Message(head.clone(), message.data.to_vec())]
                );
            }
        }
    }

    #[test]
    fn any_cut_of_the_stream_gives_the_same_messages() {
        let messages: Vec<PushChunk> = (0..5)
            .map(|i| chunk(i * 100, (0..(i * 37) as usize).map(|b| b as u8).collect()))
            .collect();
        let stream: Vec<u8> = messages.iter().flat_map(framed).collect();
        let expected: Vec<_> = messages
            .iter()
            .map(|m| {
                let mut head = m.clone();
                head.data = Bytes::new();
                Seen::Message(head, m.data.to_vec())
            })
            .collect();
        // Byte by byte, then random cuts.
        let every: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(split_all::<PushChunk>(&stream, &every).unwrap(), expected);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut cuts: Vec<usize> = (0..rng.random_range(0..8))
                .map(|_| rng.random_range(0..stream.len()))
                .collect();
            cuts.sort_unstable();
            assert_eq!(
                split_all::<PushChunk>(&stream, &cuts).unwrap(),
                expected,
                "{cuts:?}"
            );
        }
    }

    #[test]
    fn unknown_fields_before_the_data_are_skipped() {
        // Field 15 as varint, field 16 as a string, field 17 as fixed64, field 18 as
        // fixed32 (a newer peer's additions), then the payload.
        let mut body = Vec::new();
        TensorChunk {
            version: 4,
            offset: 0,
            total_len: 2,
            data: Bytes::new(),
        }
        .encode_raw(&mut body);
        encode_key(15, WireType::Varint, &mut body);
        encode_varint(300, &mut body);
        encode_key(16, WireType::LengthDelimited, &mut body);
        encode_varint(3, &mut body);
        body.extend_from_slice(b"abc");
        encode_key(17, WireType::SixtyFourBit, &mut body);
        body.extend_from_slice(&[1; 8]);
        encode_key(18, WireType::ThirtyTwoBit, &mut body);
        body.extend_from_slice(&[2; 4]);
        encode_key(4, WireType::LengthDelimited, &mut body);
        encode_varint(8, &mut body);
        body.extend_from_slice(&[9; 8]);
        let mut stream = vec![0];
        stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
        stream.extend_from_slice(&body);
        let every: Vec<usize> = (1..stream.len()).collect();
        let seen = split_all::<TensorChunk>(&stream, &every).unwrap();
        let Seen::Message(head, data) = &seen[0];
        assert_eq!(
            (head.version, head.total_len, data.as_slice()),
            (4, 2, &[9u8; 8][..])
        );
    }

    #[test]
    fn a_message_without_data_is_one_without_payload() {
        let head = TensorChunk {
            version: 1,
            offset: 0,
            total_len: 0,
            data: Bytes::new(),
        };
        let stream = [framed(&head), framed(&TensorChunk::default())].concat();
        let seen = split_all::<TensorChunk>(&stream, &[3, 6]).unwrap();
        assert_eq!(
            seen,
            vec![
                Seen::Message(head, vec![]),
                Seen::Message(TensorChunk::default(), vec![])
            ]
        );
    }

    #[test]
    fn malformed_streams_are_errors_not_panics() {
        let good = framed(&chunk(0, vec![1; 16]));
        // Compressed flag.
        let mut compressed = good.clone();
        compressed[0] = 1;
        assert_eq!(
            split_all::<PushChunk>(&compressed, &[]),
            Err(FrameError::Compressed)
        );
        // Longer than the limit.
        let mut huge = good.clone();
        huge[1..5].copy_from_slice(&(2u32 << 20).to_be_bytes());
        assert!(matches!(
            split_all::<PushChunk>(&huge, &[]),
            Err(FrameError::TooLarge { .. })
        ));
        // Cut short, inside the prefix, the fields and the payload.
        for end in [3, 8, good.len() - 1] {
            assert_eq!(
                split_all::<PushChunk>(&good[..end], &[]),
                Err(FrameError::Truncated),
                "cut at {end}"
            );
        }
        // A field after the payload.
        let mut after = good[5..].to_vec();
        encode_key(1, WireType::Varint, &mut after);
        encode_varint(2, &mut after);
        let mut stream = vec![0];
        stream.extend_from_slice(&(after.len() as u32).to_be_bytes());
        stream.extend_from_slice(&after);
        assert_eq!(
            split_all::<PushChunk>(&stream, &[]),
            Err(FrameError::FieldAfterData(6))
        );
        // A payload longer than its message, a group, a varint of 11 bytes, and fields of
        // garbage after a valid prefix.
        for body in [
            vec![0x32, 0x10, 1, 2],
            vec![0x0b, 0x0c],
            vec![
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            vec![0x00, 0x01],
            vec![0x08],
        ] {
            let mut stream = vec![0];
            stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
            stream.extend_from_slice(&body);
            assert!(
                matches!(
                    split_all::<PushChunk>(&stream, &[]),
                    Err(FrameError::Malformed(_))
                ),
                "{body:?}"
            );
        }
        // Small fields that never end.
        let mut endless = vec![0];
        endless.extend_from_slice(&(10_000u32).to_be_bytes());
        for _ in 0..5000 {
            endless.extend_from_slice(&[0x08, 0x01]);
        }
        assert_eq!(
            split_all::<PushChunk>(&endless, &[]),
            Err(FrameError::HeadTooLarge)
        );
        // One big field before the payload: refused before it is buffered.
        let mut big = Vec::new();
        encode_key(15, WireType::LengthDelimited, &mut big);
        encode_varint(1 << 19, &mut big);
        big.resize(big.len() + (1 << 19), 7);
        let mut stream = vec![0];
        stream.extend_from_slice(&(big.len() as u32).to_be_bytes());
        stream.extend_from_slice(&big);
        assert_eq!(
            split_all::<PushChunk>(&stream, &[]),
            Err(FrameError::HeadTooLarge)
        );
    }

    #[test]
    fn single_messages_decode_whole() {
        let answer = crate::proto::PushResponse { version: 12 };
        assert_eq!(
            decode_single::<crate::proto::PushResponse>(&framed(&answer)),
            Ok(answer)
        );
        let bytes = framed(&answer);
        assert_eq!(
            decode_single::<crate::proto::PushResponse>(&bytes[..bytes.len() - 1]),
            Err(FrameError::Truncated)
        );
        assert!(
            decode_single::<crate::proto::PushResponse>(&[bytes.clone(), bytes].concat()).is_err()
        );
    }
}
