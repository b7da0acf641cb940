//! The PS side of `ParameterTransfer`: gradients in, parameters out, framed by
//! [`crate::parameter_transfer`] so that a tensor is copied at most once in user space (an Async
//! or BoundedStaleness push not at all).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::transport::server::TcpConnectInfo;

use super::{Inner, PULL_WAIT, status_of};
use crate::parameter_transfer::body::{self, Pieces};
use crate::parameter_transfer::chunks::{self, ChunkOrder};
use crate::parameter_transfer::framing::{Piece, Splitter};
use crate::parameter_transfer::received::ReceivedTensor;
use crate::parameter_transfer::{PULL_PATH, PUSH_PATH};
use crate::proto::{PullRequest, PushChunk};
use crate::ps::shard::{PullDecision, PushOutcome};
use crate::transport;

/// Serves `kubetrain.v1.ParameterTransfer` next to the generated `ParameterServer` service.
#[derive(Clone)]
pub(super) struct TransferService(pub(super) Arc<Inner>);

impl NamedService for TransferService {
    const NAME: &'static str = "kubetrain.v1.ParameterTransfer";
}

impl Service<http::Request<Body>> for TransferService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move {
            let (head, body) = request.into_parts();
            // Before a byte of the body is read: a stranger's push allocates nothing.
            if let Err(refused) = inner.config.token.check_headers(&head.headers) {
                return Ok(body::error_response(refused));
            }
            let answer = match head.uri.path() {
                PUSH_PATH => {
                    let connection = head
                        .extensions
                        .get::<TcpConnectInfo>()
                        .and_then(TcpConnectInfo::remote_addr);
                    match inner.push_slots.take(connection) {
                        // Held until the push is applied or refused.
                        Ok(_slot) => push(&inner, body).await.map(body::push_answer),
                        Err(refused) => Err(refused),
                    }
                }
                PULL_PATH => pull(&inner, body).await,
                path => Err(Status::unimplemented(format!("no method {path}"))),
            };
            Ok(match answer {
                Ok(pieces) => body::ok_response(pieces),
                Err(status) => body::error_response(status),
            })
        })
    }
}

/// Where a push's bytes go as they arrive.
enum Gradient {
    /// Sync: copied into a vector, to be summed with the other workers' gradients. The
    /// chunk being received: its first value, its length, and its bytes so far. The
    /// vector grows only as bytes arrive (unless it is a recycled one, already whole), so
    /// a push head that announces a shard and sends nothing costs nothing.
    Copied {
        values: Vec<f32>,
        start: usize,
        len: usize,
        filled: usize,
    },
    /// Async and BoundedStaleness: the HTTP/2 frames' bytes, kept where they lie (no copy)
    /// and applied from there once the whole push is in. A push that breaks off is never
    /// applied, so it changes nothing.
    Kept(ReceivedTensor),
}

impl Gradient {
    fn begin_chunk(&mut self, chunk_start: usize, chunk_len: usize) {
        if let Gradient::Copied {
            start, len, filled, ..
        } = self
        {
            (*start, *len, *filled) = (chunk_start, chunk_len, 0);
        }
    }

    fn data(&mut self, data: Bytes) {
        match self {
            Gradient::Copied {
                values,
                start,
                len,
                filled,
            } => {
                // Splitter hands over no more bytes than the chunk announced.
                let end = (*start + (*filled + data.len()).div_ceil(4)).min(*start + *len);
                if values.len() < end {
                    values.resize(end, 0.0);
                }
                chunks::write_le_bytes(&mut values[*start..end], *filled, &data);
                *filled += data.len();
            }
            Gradient::Kept(wire) => wire.push(data),
        }
    }

    fn end_chunk(&mut self) {
        if let Gradient::Copied {
            values, start, len, ..
        } = self
        {
            chunks::from_le_in_place(&mut values[*start..*start + *len]);
        }
    }
}

/// Pushes of at least this many values are applied on a blocking thread, split over up to
/// [`MAX_APPLY_THREADS`] threads; below it the hand-off costs more than it saves.
const PARALLEL_VALUES: usize = 1 << 18;
/// The optimizer's pass over a large push is bound by how fast one core moves memory, so
/// it is split over the cores the PS may use, up to this many (two measured here: the
/// 16 MiB SGD-momentum pass went from ~5 ms to ~2.5 ms).
const MAX_APPLY_THREADS: usize = 4;

/// Looked up once: `available_parallelism` reads the cgroup's CPU quota from files.
static APPLY_THREADS: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_APPLY_THREADS)
});

/// The shard exists once the first worker has registered.
fn not_registered() -> Status {
    Status::failed_precondition("no worker has registered yet; call Register first")
}

/// A push as it arrives: its identity and the checks on every chunk.
struct IncomingPush {
    inner: Arc<Inner>,
    limit: usize,
    key: Option<(u32, u64, u64)>,
    order: ChunkOrder,
    /// Set by the first chunk.
    gradient: Option<Gradient>,
    bytes: u64,
}

impl IncomingPush {
    fn take(&mut self, frame: &Bytes, piece: Piece<'_, PushChunk>) -> Result<(), Status> {
        match piece {
            Piece::Start { head, data_len } => self.start_chunk(head, data_len),
            Piece::Data(data) => {
                if let Some(g) = &mut self.gradient {
                    g.data(frame.slice_ref(data));
                }
                Ok(())
            }
            Piece::End => {
                if let Some(g) = &mut self.gradient {
                    g.end_chunk();
                }
                Ok(())
            }
        }
    }

    fn start_chunk(&mut self, chunk: PushChunk, data_len: usize) -> Result<(), Status> {
        let key = (chunk.worker_id, chunk.base_version, chunk.step);
        match self.key {
            None => {
                self.inner.check_worker(chunk.worker_id)?;
                self.key = Some(key);
                let mut state = self.inner.lock();
                let shard = state.shard.as_mut().ok_or_else(not_registered)?;
                self.gradient = Some(if shard.applies_on_arrival() {
                    Gradient::Kept(ReceivedTensor::default())
                } else {
                    let mut values = shard.take_spare();
                    // A recycled buffer already has this length: no zero-fill, no page
                    // faults. A new one only reserves address space; `data` fills it.
                    if values.len() != self.limit {
                        values.clear();
                        values.reserve_exact(self.limit);
                    }
                    Gradient::Copied {
                        values,
                        start: 0,
                        len: 0,
                        filled: 0,
                    }
                });
            }
            Some(k) if k != key => {
                return Err(Status::invalid_argument(
                    "worker_id, base_version and step must not change within one push",
                ));
            }
            Some(_) => {}
        }
        if chunk.total_len != self.limit as u64 {
            return Err(Status::invalid_argument(format!(
                "gradient of {} values pushed to a shard of {}",
                chunk.total_len, self.limit
            )));
        }
        let len = self
            .order
            .check(chunk.offset, chunk.total_len, data_len, self.limit)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(g) = &mut self.gradient {
            g.begin_chunk(chunk.offset as usize, len);
        }
        self.bytes += data_len as u64;
        self.inner
            .metrics
            .push_received_bytes
            .inc_by(data_len as u64);
        Ok(())
    }
}

/// Receives one worker's gradient and applies it as the consistency model says; returns
/// the shard's version after it.
async fn push(inner: &Arc<Inner>, body: Body) -> Result<u64, Status> {
    let started = Instant::now();
    let limit = match inner.lock().shard.as_ref() {
        Some(shard) => shard.end - shard.start,
        None => return Err(not_registered()),
    };
    let mut incoming = IncomingPush {
        inner: inner.clone(),
        limit,
        key: None,
        order: ChunkOrder::new(),
        gradient: None,
        bytes: 0,
    };
    let mut splitter = Splitter::<PushChunk>::new(transport::MAX_MESSAGE_BYTES);
    body::read_request(body, |frame: Bytes| {
        splitter.feed(&frame, &mut |piece| incoming.take(&frame, piece))
    })
    .await?;
    splitter.finish()?;
    let IncomingPush {
        key,
        gradient,
        order,
        bytes,
        ..
    } = incoming;
    let (Some((worker, base, step)), Some(gradient)) = (key, gradient) else {
        return Err(Status::invalid_argument("empty push: no chunks"));
    };
    order
        .finish()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    inner.metrics.push_bytes.inc_by(bytes);
    let version = if limit >= PARALLEL_VALUES {
        let threads = *APPLY_THREADS;
        let inner = inner.clone();
        tokio::task::spawn_blocking(move || apply(&inner, (worker, base, step), gradient, threads))
            .await
            .map_err(|e| Status::internal(format!("applying the push failed: {e}")))??
    } else {
        apply(inner, (worker, base, step), gradient, 1)?
    };
    inner
        .metrics
        .request_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(version)
}

/// Applies a received push (`key`: worker, base version, step) to the shard; returns the
/// shard's version after it.
fn apply(
    inner: &Inner,
    (worker, base, step): (u32, u64, u64),
    gradient: Gradient,
    threads: usize,
) -> Result<u64, Status> {
    let mut state = inner.lock();
    state.last_contact = Instant::now();
    if state.stopping {
        return Err(Status::unavailable(
            "parameter server is stopping (SIGTERM); push again once it is back",
        ));
    }
    let state = &mut *state;
    let total_params = state.total_params;
    let shard = state
        .shard
        .as_mut()
        .ok_or_else(|| Status::internal("shard missing"))?;
    let now = Instant::now();
    let outcome = match gradient {
        Gradient::Copied { values, .. } => shard.push(worker, base, step, values, now),
        Gradient::Kept(wire) => shard.push_received(worker, base, step, &wire, threads, now),
    }
    .map_err(status_of)?;
    let version = shard.version();
    if let PushOutcome::Applied { .. } = outcome {
        inner.metrics.version.set(version as i64);
        if shard.applies_on_arrival() {
            // This push moved the shard by one version, from `version - 1`.
            let behind = version.saturating_sub(1).saturating_sub(base);
            inner.metrics.update_staleness.observe(behind as f64);
        }
        inner.maybe_checkpoint(shard, total_params, false);
        inner.log_staleness(shard, false);
    }
    inner.notify();
    Ok(version)
}

/// Waits until the consistency model lets the worker have the parameters, then sends them
/// in chunks that borrow the shard's current parameter vector.
async fn pull(inner: &Arc<Inner>, body: Body) -> Result<Pieces, Status> {
    let started = Instant::now();
    let req: PullRequest = body::read_single(body).await?;
    inner.check_worker(req.worker_id)?;
    let mut changes = inner.changed.subscribe();
    let deadline = tokio::time::Instant::now() + PULL_WAIT;
    let (version, payload) = loop {
        {
            let mut state = inner.lock();
            state.last_contact = Instant::now();
            let state = &mut *state;
            let shard = state.shard.as_mut().ok_or_else(not_registered)?;
            match shard
                .pull_decision(req.worker_id, req.min_version, req.step, Instant::now())
                .map_err(status_of)?
            {
                PullDecision::Ready => break (shard.version(), shard.snapshot()),
                PullDecision::Wait => {}
                PullDecision::Failed(reason) => {
                    return Err(Status::aborted(format!("the job has failed: {reason}")));
                }
                PullDecision::Restarted { version } => {
                    return Err(Status::failed_precondition(format!(
                        "worker asks for version {} but this PS is at {version} (restarted from a checkpoint); register again",
                        req.min_version
                    )));
                }
            }
        }
        // Woken by any push, registration, death or failure; re-check then.
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Status::unavailable("parameter server is shutting down")),
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "not ready for worker {} step {} (min version {}) within {:?}; ask again",
                    req.worker_id, req.step, req.min_version, PULL_WAIT
                )));
            }
        }
    };
    let total_len = payload.len();
    inner.metrics.pull_bytes.inc_by(total_len as u64 * 4);
    inner
        .metrics
        .request_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(body::parameters_answer(version, payload))
}
