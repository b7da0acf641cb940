//! The worker's side of `ParameterTransfer`: Push and Pull of a tensor over a tonic HTTP/2
//! channel, each chunk sent from the tensor's own memory and each received frame copied
//! straight into place.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tonic::codegen::Service;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::body::{Pieces, append_small};
use super::chunks::{self, ChunkOrder};
use super::framing::{Piece, Splitter, decode_single, encode_message, encode_tensor};
use super::{GRPC_CONTENT_TYPE, PULL_PATH, PUSH_PATH};
use crate::credential::JobToken;
use crate::proto::{PullRequest, PushChunk, PushResponse, TensorChunk};
use crate::transport;

/// A PS to call: its channel, and the job token every call carries.
pub type Peer<'a> = (&'a Channel, &'a JobToken);

/// Calls `path` with the request body `pieces`; returns the answer's body once its headers
/// say the call was taken (`None`: it succeeded with nothing to say). The deadline travels
/// as `grpc-timeout` for the server; the caller also bounds its own wait.
async fn call(
    (channel, token): Peer<'_>,
    path: &'static str,
    pieces: Pieces,
    deadline: Duration,
) -> Result<Option<tonic::body::Body>, Status> {
    let mut request = http::Request::new(tonic::body::Body::new(pieces));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(path);
    *request.version_mut() = http::Version::HTTP_2;
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(GRPC_CONTENT_TYPE),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    headers.insert("grpc-timeout", grpc_timeout(deadline));
    token.attach_to(headers);
    let mut channel = channel.clone();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    if let Some(status) = Status::from_header_map(response.headers()) {
        // Trailers-only: the call ended before it sent anything.
        return match status.code() {
            Code::Ok => Ok(None),
            _ => Err(status),
        };
    }
    if response.status() != http::StatusCode::OK {
        let code = match response.status() {
            http::StatusCode::NOT_FOUND => Code::Unimplemented,
            http::StatusCode::TOO_MANY_REQUESTS
            | http::StatusCode::BAD_GATEWAY
            | http::StatusCode::SERVICE_UNAVAILABLE
            | http::StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
            _ => Code::Internal,
        };
        return Err(Status::new(
            code,
            format!("HTTP status {} instead of a gRPC answer", response.status()),
        ));
    }
    Ok(Some(response.into_body()))
}

/// `grpc-timeout` in milliseconds (the format allows at most 8 digits).
fn grpc_timeout(deadline: Duration) -> http::HeaderValue {
    let millis = deadline.as_millis().clamp(1, 99_999_999);
    http::HeaderValue::from_str(&format!("{millis}m")).expect("digits and a unit")
}

/// Reads an answer's body to its end, handing over each data frame; Ok when its trailers
/// say the call succeeded.
async fn read_answer(
    body: Option<tonic::body::Body>,
    mut on_data: impl FnMut(Bytes) -> Result<(), Status>,
) -> Result<(), Status> {
    let Some(mut body) = body else {
        return Ok(());
    };
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => on_data(data)?,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return match Status::from_header_map(&trailers) {
                        Some(status) if status.code() == Code::Ok => Ok(()),
                        Some(status) => Err(status),
                        None => Err(Status::unknown("answer ended without a grpc-status")),
                    };
                }
            }
        }
    }
    // The peer went away mid-answer (hyper reports a reset stream as a clean end).
    Err(Status::unavailable("answer ended without a grpc-status"))
}

/// Pushes `values[range]` as this worker's gradient for one shard, each chunk sent without
/// copying it; returns the shard's version after the push.
pub async fn push_tensor(
    peer: Peer<'_>,
    head: PushChunk,
    values: Arc<Vec<f32>>,
    range: Range<usize>,
    deadline: Duration,
) -> Result<u64, Status> {
    let total_len = range.len() as u64;
    let pieces = chunks::encode_chunks(values, range).flat_map(move |(offset, data)| {
        let head = PushChunk {
            offset,
            total_len,
            data: Bytes::new(),
            ..head.clone()
        };
        encode_tensor(&head, data)
    });
    let call = async {
        let body = call(peer, PUSH_PATH, Pieces::new(pieces), deadline).await?;
        let mut answer = BytesMut::new();
        read_answer(body, |data| {
            append_small(&mut answer, &data, || {
                Status::internal("push answer too large")
            })
        })
        .await?;
        decode_single::<PushResponse>(&answer)
            .map(|answer| answer.version)
            .map_err(|e| Status::internal(format!("bad push answer: {e}")))
    };
    tokio::time::timeout(deadline, call)
        .await
        .unwrap_or_else(|_| Err(Status::unavailable("push timed out")))
}

/// Pulls one shard's `len` parameters into `buffer` (recycled: a fresh multi-MiB vector
/// costs more in page faults than filling it), copying each HTTP/2 frame straight into
/// place; returns their version and the filled buffer.
pub async fn pull_tensor(
    peer: Peer<'_>,
    request: &PullRequest,
    deadline: Duration,
    mut buffer: Vec<f32>,
    len: usize,
) -> Result<(u64, Vec<f32>), Status> {
    buffer.resize(len, 0.0);
    let mut order = ChunkOrder::new();
    let mut version = None;
    let (mut start, mut count, mut filled) = (0, 0, 0);
    let bad = |e: String| Status::internal(format!("bad parameter chunk: {e}"));
    pull(peer, request, deadline, |piece| {
        match piece {
            Piece::Start { head, data_len } => {
                if *version.get_or_insert(head.version) != head.version {
                    return Err(bad("version changed mid-stream".into()));
                }
                count = order
                    .check(head.offset, head.total_len, data_len, len)
                    .map_err(|e| bad(e.to_string()))?;
                start = head.offset as usize;
                filled = 0;
            }
            Piece::Data(data) => {
                chunks::write_le_bytes(&mut buffer[start..start + count], filled, data);
                filled += data.len();
            }
            Piece::End => chunks::from_le_in_place(&mut buffer[start..start + count]),
        }
        Ok(())
    })
    .await?;
    order
        .finish()
        .map_err(|e| Status::unavailable(format!("parameter stream ended early: {e}")))?;
    match order.total() {
        Some(total) if total == len => Ok((version.unwrap_or(0), buffer)),
        got => Err(Status::internal(format!(
            "got {} parameters, expected {len}",
            got.unwrap_or(0)
        ))),
    }
}

/// Pulls parameters: `on` sees each chunk's head, its data in pieces, and its end.
async fn pull(
    peer: Peer<'_>,
    request: &PullRequest,
    deadline: Duration,
    mut on: impl FnMut(Piece<'_, TensorChunk>) -> Result<(), Status>,
) -> Result<(), Status> {
    let call = async {
        let request = Pieces::new(std::iter::once(encode_message(request)));
        let body = call(peer, PULL_PATH, request, deadline).await?;
        let mut splitter = Splitter::<TensorChunk>::new(transport::MAX_MESSAGE_BYTES);
        read_answer(body, |data| {
            splitter.feed(&data, &mut on).map_err(|e: Status| {
                Status::internal(format!("bad parameter stream: {}", e.message()))
            })
        })
        .await?;
        splitter
            .finish()
            .map_err(|e| Status::unavailable(format!("parameter stream ended early: {e}")))
    };
    tokio::time::timeout(deadline, call)
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("pull timed out")))
}
