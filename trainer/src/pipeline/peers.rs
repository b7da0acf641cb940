//! Connections to the other stages: tensor senders that keep the training loop from
//! waiting on the network, heartbeats, and the best-effort calls of start and end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Request;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::warn;

use super::service::{Direction, Shared};
use crate::credential::{Attach, JobToken};
use crate::error::TrainerError;
use crate::parameter_transfer::chunks;
use crate::proto::pipeline_stage_client::PipelineStageClient;
use crate::proto::*;
use crate::transport;

/// Forward and Backward only queue the tensor on the receiver; 10 s is far beyond any
/// healthy transfer and still ends a stuck call long before a person would notice.
pub const TENSOR_DEADLINE: Duration = Duration::from_secs(10);
const START_DEADLINE: Duration = Duration::from_secs(5);
const PARAMETERS_DEADLINE: Duration = Duration::from_secs(40);
const ABORT_DEADLINE: Duration = Duration::from_secs(1);
const FINISH_DEADLINE: Duration = Duration::from_secs(5);

/// Another stage.
#[derive(Clone)]
pub struct Peer {
    pub stage: usize,
    pub addr: String,
    pub client: PipelineStageClient<InterceptedService<Channel, Attach>>,
}

impl Peer {
    pub fn new(stage: usize, addr: &str, token: &JobToken) -> Result<Self, TrainerError> {
        let channel = transport::channel(addr).map_err(|e| TrainerError::Connect {
            role: "worker",
            index: stage,
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            stage,
            addr: addr.to_string(),
            client: PipelineStageClient::with_interceptor(channel, token.attach())
                .max_decoding_message_size(transport::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(transport::MAX_MESSAGE_BYTES),
        })
    }

    /// `stage 2 (host:port)`: how every message names a peer.
    pub fn name(&self) -> String {
        format!("stage {} ({})", self.stage, self.addr)
    }

    pub async fn hello(
        &self,
        from: usize,
        stages: usize,
        deadline: Duration,
    ) -> Result<HelloResponse, tonic::Status> {
        let mut client = self.client.clone();
        Ok(client
            .hello(with_deadline(
                HelloRequest {
                    from_stage: from as u32,
                    stages: stages as u32,
                },
                deadline,
            ))
            .await?
            .into_inner())
    }

    pub async fn start(&self, plan: StartRequest) -> Result<(), TrainerError> {
        let mut client = self.client.clone();
        client
            .start(with_deadline(plan, START_DEADLINE))
            .await
            .map_err(|s| {
                TrainerError::JobFailed(format!(
                    "{} refused the start: {}",
                    self.name(),
                    s.message()
                ))
            })?;
        Ok(())
    }

    /// The peer's parameters after `min_step` updates.
    pub async fn parameters(&self, min_step: u64, limit: usize) -> Result<Vec<f32>, TrainerError> {
        let fail = |why: String| {
            TrainerError::JobFailed(format!("fetching the parameters of {}: {why}", self.name()))
        };
        let mut client = self.client.clone();
        let mut stream = client
            .parameters(with_deadline(
                ParametersRequest { min_step },
                PARAMETERS_DEADLINE,
            ))
            .await
            .map_err(|s| fail(s.to_string()))?
            .into_inner();
        let mut asm = chunks::Assembler::new();
        while let Some(chunk) = stream.message().await.map_err(|s| fail(s.to_string()))? {
            asm.add(chunk.offset, chunk.total_len, &chunk.data, limit)
                .map_err(|e| fail(e.to_string()))?;
        }
        asm.finish().map_err(|e| fail(e.to_string()))
    }

    pub async fn abort(&self, from: usize, reason: String) {
        let mut client = self.client.clone();
        let _ = client
            .abort(with_deadline(
                AbortRequest {
                    from_stage: from as u32,
                    reason,
                },
                ABORT_DEADLINE,
            ))
            .await;
    }

    pub async fn finish(&self) {
        let mut client = self.client.clone();
        if let Err(e) = client
            .finish(with_deadline(
                FinishRequest {
                    reason: "training finished".into(),
                },
                FINISH_DEADLINE,
            ))
            .await
        {
            warn!(peer = %self.name(), "could not tell the stage to finish: {e}");
        }
    }
}

pub fn with_deadline<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    request
}

/// One micro-batch's tensor on its way to a neighbour.
pub struct Outbound {
    pub step: u64,
    pub micro: usize,
    pub rows: usize,
    pub data: Vec<f32>,
    pub labels: Vec<u8>,
    pub loss_sum: f64,
}

/// A queue to `peer` drained by its own task, in order, so computing the next micro-batch
/// overlaps sending this one. A failed send fails the job, naming the peer.
pub fn sender(
    peer: Peer,
    from: usize,
    direction: Direction,
    shared: Arc<Shared>,
) -> (mpsc::UnboundedSender<Outbound>, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
    let task = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let (step, micro) = (out.step, out.micro);
            let header = StageTensor {
                from_stage: from as u32,
                step,
                micro_batch: micro as u32,
                rows: out.rows as u32,
                labels: out.labels.into(),
                loss_sum: out.loss_sum,
                ..Default::default()
            };
            let len = out.data.len();
            let mut first = Some(header.clone());
            let chunks: Vec<StageTensor> = chunks::encode_chunks(Arc::new(out.data), 0..len)
                .map(|(offset, data)| StageTensor {
                    offset,
                    total_len: len as u64,
                    data,
                    ..first.take().unwrap_or_else(|| StageTensor {
                        labels: Default::default(),
                        ..header.clone()
                    })
                })
                .collect();
            let mut client = peer.client.clone();
            let stream = tokio_stream::iter(chunks);
            let result = match direction {
                Direction::Forward => client.forward(with_deadline(stream, TENSOR_DEADLINE)).await,
                Direction::Backward => {
                    client
                        .backward(with_deadline(stream, TENSOR_DEADLINE))
                        .await
                }
            };
            if let Err(status) = result {
                let what = match direction {
                    Direction::Forward => "activations",
                    Direction::Backward => "gradient",
                };
                shared.fail(format!(
                    "{} did not take the {what} of step {step} micro-batch {micro}: {}",
                    peer.name(),
                    status.message()
                ));
                return;
            }
        }
    });
    (tx, task)
}

/// Heartbeats `peer` until the job ends. A peer that has not answered for `timeout`, or
/// that answers as a new process, fails the job naming it. Before the first answer the
/// peer may still be starting, so the grace is `startup` instead.
pub fn heartbeat(
    peer: Peer,
    shared: Arc<Shared>,
    interval: Duration,
    timeout: Duration,
    startup: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let began = Instant::now();
        let mut last_ok: Option<Instant> = None;
        let mut incarnation = None;
        let mut last_error = String::new();
        let deadline = interval.clamp(Duration::from_millis(200), Duration::from_secs(2));
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if *shared.finish.borrow() || shared.abort.borrow().is_some() {
                return;
            }
            match peer.hello(shared.stage, shared.stages, deadline).await {
                Ok(r) => {
                    if *incarnation.get_or_insert(r.incarnation) != r.incarnation {
                        shared.fail(format!(
                            "{} restarted mid-run and lost its pipeline state",
                            peer.name()
                        ));
                        return;
                    }
                    last_ok = Some(Instant::now());
                }
                Err(status) => {
                    last_error = status.message().to_string();
                    if status.code() == tonic::Code::InvalidArgument {
                        shared.fail(format!("{} disagrees: {last_error}", peer.name()));
                        return;
                    }
                }
            }
            let (since, grace) = match last_ok {
                Some(t) => (t.elapsed(), timeout),
                None => (began.elapsed(), startup),
            };
            if since > grace && !*shared.finish.borrow() {
                shared.fail(format!(
                    "{} has not answered heartbeats for {:.1}s: {last_error}",
                    peer.name(),
                    since.as_secs_f64()
                ));
                return;
            }
        }
    })
}
