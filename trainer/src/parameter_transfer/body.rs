//! The bodies of `ParameterTransfer` calls and answers: pieces already in memory going out,
//! data frames coming in, and the answers a server gives.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use tonic::Status;

use super::GRPC_CONTENT_TYPE;
use super::chunks;
use super::framing::{FrameError, decode_single, encode_message, encode_tensor};
use crate::proto::{PushResponse, TensorChunk};
use crate::transport;

impl From<FrameError> for Status {
    fn from(e: FrameError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

/// A body that sends pieces already in memory, then (server side) the gRPC trailers.
pub struct Pieces {
    pieces: Box<dyn Iterator<Item = Bytes> + Send>,
    trailers: Option<http::HeaderMap>,
}

impl Pieces {
    pub fn new(pieces: impl Iterator<Item = Bytes> + Send + 'static) -> Self {
        Self {
            pieces: Box::new(pieces),
            trailers: None,
        }
    }

    /// The same, ending with the trailers of a successful call.
    pub fn with_ok_trailers(pieces: impl Iterator<Item = Bytes> + Send + 'static) -> Self {
        let mut trailers = http::HeaderMap::new();
        // `add_header` only fails on a message that is not a valid header value; "" is.
        let _ = Status::ok("").add_header(&mut trailers);
        Self {
            pieces: Box::new(pieces),
            trailers: Some(trailers),
        }
    }
}

impl http_body::Body for Pieces {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        Poll::Ready(match this.pieces.next() {
            Some(piece) => Some(Ok(Frame::data(piece))),
            None => this.trailers.take().map(|t| Ok(Frame::trailers(t))),
        })
    }
}

/// A gRPC answer (headers, then the body's messages and an OK status).
pub fn ok_response(body: Pieces) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(GRPC_CONTENT_TYPE),
    );
    response
}

/// A failed call, as a trailers-only answer.
pub fn error_response(status: Status) -> http::Response<tonic::body::Body> {
    status.into_http()
}

/// A Push answer: the shard's version after the push, then the OK trailers.
pub fn push_answer(version: u64) -> Pieces {
    Pieces::with_ok_trailers(std::iter::once(encode_message(&PushResponse { version })))
}

/// A Pull answer: `values` at `version`, in chunks that borrow the vector (no copy on
/// little-endian hosts), then the OK trailers.
pub fn parameters_answer(version: u64, values: Arc<Vec<f32>>) -> Pieces {
    let total_len = values.len();
    let pieces = chunks::encode_chunks(values, 0..total_len).flat_map(move |(offset, data)| {
        let head = TensorChunk {
            version,
            offset,
            total_len: total_len as u64,
            data: Bytes::new(),
        };
        encode_tensor(&head, data)
    });
    Pieces::with_ok_trailers(pieces)
}

/// Reads a request's whole body: the data frames, in order.
pub async fn read_request(
    mut body: tonic::body::Body,
    mut on_data: impl FnMut(Bytes) -> Result<(), Status>,
) -> Result<(), Status> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            on_data(data)?;
        }
    }
    Ok(())
}

/// Reads a request that carries one small message.
pub async fn read_single<M: prost::Message + Default>(
    body: tonic::body::Body,
) -> Result<M, Status> {
    let mut whole = BytesMut::new();
    read_request(body, |data| {
        append_small(&mut whole, &data, || {
            Status::invalid_argument("request message too large")
        })
    })
    .await?;
    Ok(decode_single(&whole)?)
}

/// Appends a piece of a small message that is read whole, within the message size cap.
pub(super) fn append_small(
    whole: &mut BytesMut,
    data: &[u8],
    too_large: impl FnOnce() -> Status,
) -> Result<(), Status> {
    if whole.len() + data.len() > transport::MAX_MESSAGE_BYTES {
        return Err(too_large());
    }
    whole.extend_from_slice(data);
    Ok(())
}
