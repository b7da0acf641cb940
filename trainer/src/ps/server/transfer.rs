//! The PS side of `ParameterTransfer`: gradients in, parameters out, framed by
//! [`crate::tensor_wire`] so that a tensor is copied at most once in user space (a staged
//! push not at all).

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

use super::{Inner, PULL_WAIT, status_of};
use crate::net::{self, ChunkOrder, WholeValues};
use crate::proto::{PullRequest, PushChunk};
use crate::ps::shard::{PullDecision, PushOutcome, StagedPush};
use crate::tensor_wire::{self, Piece, Pieces, Splitter};

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
            let answer = match head.uri.path() {
                tensor_wire::PUSH_PATH => push(&inner, body).await.map(tensor_wire::push_answer),
                tensor_wire::PULL_PATH => pull(&inner, body).await,
                path => Err(Status::unimplemented(format!("no method {path}"))),
            };
            Ok(match answer {
                Ok(pieces) => tensor_wire::ok_response(pieces),
                Err(status) => tensor_wire::error_response(status),
            })
        })
    }
}

/// Takes a gradient chunk by chunk, straight from the HTTP/2 frames. A Sync push is copied
/// into a gradient, to be summed with the other workers'. A staged push (Async and
/// BoundedStaleness apply a push as it arrives, staged so that a push that breaks off
/// changes nothing) is staged from the frames' bytes where they lie, with no copy.
struct GradientWriter {
    inner: Arc<Inner>,
    /// The whole gradient: written for a Sync push, and for a staged push only in the rare
    /// case that another push overtakes it, which then falls back to a plain apply.
    gradient: Vec<f32>,
    staged: Option<StagedPush>,
    /// A staged push's frames with the byte offset each starts at in the gradient: kept
    /// (not copied) for that fallback.
    frames: Vec<(usize, Bytes)>,
    values: WholeValues,
    /// The chunk being received: its first value, its length, and its bytes so far.
    start: usize,
    len: usize,
    filled: usize,
}

impl GradientWriter {
    fn begin_chunk(&mut self, start: usize, len: usize) {
        (self.start, self.len, self.filled) = (start, len, 0);
        self.values.reset();
    }

    fn data(&mut self, data: Bytes) {
        match &mut self.staged {
            Some(push) => {
                self.frames
                    .push((self.start * 4 + self.filled, data.clone()));
                if let Some(shard) = self.inner.lock().shard.as_ref() {
                    let start = self.start;
                    self.values.feed(&data, |index, run| {
                        shard.stage_le(push, start + index, run);
                    });
                }
            }
            None => {
                let chunk = &mut self.gradient[self.start..self.start + self.len];
                net::write_le_bytes(chunk, self.filled, &data);
            }
        }
        self.filled += data.len();
    }

    fn end_chunk(&mut self) {
        if self.staged.is_none() {
            net::from_le_in_place(&mut self.gradient[self.start..self.start + self.len]);
        }
    }

    /// The whole gradient of a staged push, from its kept frames.
    fn assemble(&mut self) {
        for (at, data) in self.frames.drain(..) {
            net::write_le_bytes(&mut self.gradient, at, &data);
        }
        net::from_le_in_place(&mut self.gradient);
    }
}

/// What the receiving task hands the staging thread.
enum ToStager {
    Begin { start: usize, len: usize },
    Data(Bytes),
    End,
}

/// Where the gradient is written: on the receiving task, or, for a large staged push, on a
/// blocking thread, so that staging (the optimizer's pass, as long as the transfer itself)
/// runs on the other core while this task keeps receiving.
enum Writer {
    Inline(GradientWriter),
    Offloaded {
        to: std::sync::mpsc::Sender<ToStager>,
        done: tokio::task::JoinHandle<GradientWriter>,
    },
}

/// Pushes of at least this many values are staged on a blocking thread; below it the hand-
/// off costs more than it saves.
const OFFLOAD_VALUES: usize = 1 << 18;

impl Writer {
    fn begin_chunk(&mut self, start: usize, len: usize) {
        match self {
            Writer::Inline(w) => w.begin_chunk(start, len),
            Writer::Offloaded { to, .. } => {
                let _ = to.send(ToStager::Begin { start, len });
            }
        }
    }

    fn data(&mut self, frame: &Bytes, data: &[u8]) {
        match self {
            Writer::Inline(w) => w.data(frame.slice_ref(data)),
            Writer::Offloaded { to, .. } => {
                let _ = to.send(ToStager::Data(frame.slice_ref(data)));
            }
        }
    }

    fn end_chunk(&mut self) {
        match self {
            Writer::Inline(w) => w.end_chunk(),
            Writer::Offloaded { to, .. } => {
                let _ = to.send(ToStager::End);
            }
        }
    }

    async fn finish(self) -> Result<GradientWriter, Status> {
        match self {
            Writer::Inline(w) => Ok(w),
            Writer::Offloaded { to, done } => {
                drop(to);
                done.await
                    .map_err(|e| Status::internal(format!("staging the push failed: {e}")))
            }
        }
    }
}

fn offload(mut writer: GradientWriter) -> Writer {
    let (to, from) = std::sync::mpsc::channel();
    let done = tokio::task::spawn_blocking(move || {
        for message in from {
            match message {
                ToStager::Begin { start, len } => writer.begin_chunk(start, len),
                ToStager::Data(data) => writer.data(data),
                ToStager::End => writer.end_chunk(),
            }
        }
        writer
    });
    Writer::Offloaded { to, done }
}

/// A push as it arrives: its identity and the checks on every chunk.
struct IncomingPush {
    inner: Arc<Inner>,
    limit: usize,
    key: Option<(u32, u64, u64)>,
    order: ChunkOrder,
    /// Set by the first chunk.
    writer: Option<Writer>,
    spare: Vec<f32>,
    bytes: u64,
}

impl IncomingPush {
    fn take(&mut self, frame: &Bytes, piece: Piece<'_, PushChunk>) -> Result<(), Status> {
        match piece {
            Piece::Start { head, data_len } => self.start_chunk(head, data_len),
            Piece::Data(data) => {
                if let Some(w) = &mut self.writer {
                    w.data(frame, data);
                }
                Ok(())
            }
            Piece::End => {
                if let Some(w) = &mut self.writer {
                    w.end_chunk();
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
                let staged = self
                    .inner
                    .lock()
                    .shard
                    .as_mut()
                    .and_then(|shard| shard.begin_staged(chunk.base_version));
                let mut gradient = std::mem::take(&mut self.spare);
                // A recycled buffer already has this length: no zero-fill, no page faults.
                gradient.resize(self.limit, 0.0);
                let offloaded = staged.is_some() && self.limit >= OFFLOAD_VALUES;
                let writer = GradientWriter {
                    inner: self.inner.clone(),
                    gradient,
                    staged,
                    frames: Vec::new(),
                    values: WholeValues::default(),
                    start: 0,
                    len: 0,
                    filled: 0,
                };
                self.writer = Some(if offloaded {
                    offload(writer)
                } else {
                    Writer::Inline(writer)
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
        if let Some(w) = &mut self.writer {
            w.begin_chunk(chunk.offset as usize, len);
        }
        self.bytes += data_len as u64;
        Ok(())
    }
}

/// Receives one worker's gradient and applies it as the consistency model says; returns
/// the shard's version after it.
async fn push(inner: &Arc<Inner>, body: Body) -> Result<u64, Status> {
    let started = Instant::now();
    let (limit, spare) = {
        let mut state = inner.lock();
        match state.shard.as_mut() {
            Some(shard) => (shard.end - shard.start, shard.take_spare()),
            None => {
                return Err(Status::failed_precondition(
                    "no worker has registered yet; call Register first",
                ));
            }
        }
    };
    let mut incoming = IncomingPush {
        inner: inner.clone(),
        limit,
        key: None,
        order: ChunkOrder::new(),
        writer: None,
        spare,
        bytes: 0,
    };
    let mut splitter = Splitter::<PushChunk>::new(net::MAX_MESSAGE_BYTES);
    let received = tensor_wire::read_request(body, |frame: Bytes| {
        splitter.feed(&frame, &mut |piece| incoming.take(&frame, piece))
    })
    .await
    .and_then(|()| Ok(splitter.finish()?));
    let IncomingPush {
        key,
        writer,
        order,
        bytes,
        ..
    } = incoming;
    // Even a failed push waits for its staging thread, which must not outlive it.
    let writer = match writer {
        Some(w) => Some(w.finish().await?),
        None => None,
    };
    received?;
    let (Some((worker, base, step)), Some(mut writer)) = (key, writer) else {
        return Err(Status::invalid_argument("empty push: no chunks"));
    };
    order
        .finish()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    inner.metrics.push_bytes.inc_by(bytes);
    let mut state = inner.lock();
    state.last_contact = Instant::now();
    let state = &mut *state;
    let total_params = state.total_params;
    let shard = state
        .shard
        .as_mut()
        .ok_or_else(|| Status::internal("shard missing"))?;
    let outcome = match writer.staged.take() {
        Some(push) => {
            if !shard.staged_is_current(&push) {
                writer.assemble();
            }
            let gradient = std::mem::take(&mut writer.gradient);
            shard.push_staged(worker, base, step, push, gradient, Instant::now())
        }
        None => shard.push(worker, base, step, writer.gradient, Instant::now()),
    }
    .map_err(status_of)?;
    let version = shard.version();
    if let PushOutcome::Applied { .. } = outcome {
        inner.metrics.version.set(version as i64);
        inner.maybe_checkpoint(shard, total_params, false);
    }
    inner.notify();
    inner
        .metrics
        .request_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(version)
}

/// Waits until the consistency model lets the worker have the parameters, then sends them
/// in chunks that borrow the shard's current parameter vector.
async fn pull(inner: &Arc<Inner>, body: Body) -> Result<Pieces, Status> {
    let started = Instant::now();
    let req: PullRequest = tensor_wire::read_single(body).await?;
    inner.check_worker(req.worker_id)?;
    let mut changes = inner.changed.subscribe();
    let deadline = tokio::time::Instant::now() + PULL_WAIT;
    let (version, payload) = loop {
        {
            let mut state = inner.lock();
            state.last_contact = Instant::now();
            let state = &mut *state;
            let shard = state.shard.as_mut().ok_or_else(|| {
                Status::failed_precondition("no worker has registered yet; call Register first")
            })?;
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
    Ok(tensor_wire::parameters_answer(version, payload))
}
