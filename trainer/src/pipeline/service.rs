//! The stage's gRPC service: it only validates what arrives and hands it to the training
//! loop's mailbox, so a neighbour's call never waits for this stage's computation.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::schedule::partition;
use crate::error::TrainerError;
use crate::model::Network;
use crate::parameter_transfer::chunks::{self, Assembler};
use crate::proto::pipeline_stage_server::PipelineStage;
use crate::proto::*;

/// How long a `Parameters` call waits for the stage to reach the asked step.
const PARAMETERS_WAIT: Duration = Duration::from_secs(30);

/// Which way a tensor travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Activations, from stage i-1 to stage i.
    Forward,
    /// Output gradients, from stage i+1 to stage i.
    Backward,
}

/// A tensor of one micro-batch that arrived from a neighbour.
#[derive(Debug)]
pub struct Inbound {
    pub direction: Direction,
    pub step: u64,
    pub micro: usize,
    pub rows: usize,
    pub data: Vec<f32>,
    pub labels: Vec<u8>,
    pub loss_sum: f64,
}

/// Shapes the stage accepts, known once the chief has sent the plan.
#[derive(Debug, Clone, Copy)]
pub struct Shapes {
    pub input_width: usize,
    pub output_width: usize,
    pub batch: usize,
}

/// State shared between the service and the training loop.
pub struct Shared {
    pub stage: usize,
    pub stages: usize,
    pub incarnation: u64,
    pub checkpoints: Vec<u64>,
    pub inbox: mpsc::UnboundedSender<Inbound>,
    pub start: watch::Sender<Option<StartRequest>>,
    /// `(updates applied, parameters)`, published after every update.
    pub params: watch::Sender<(u64, Arc<Vec<f32>>)>,
    /// The first failure anyone reported; everything stops on it.
    pub abort: watch::Sender<Option<String>>,
    pub finish: watch::Sender<bool>,
    pub shapes: OnceLock<Shapes>,
}

impl Shared {
    /// The refusal of a stage that has stopped training, with the recorded reason.
    fn stopped(&self) -> Status {
        match self.abort.borrow().as_deref() {
            Some(reason) => {
                Status::unavailable(format!("this stage has stopped training: {reason}"))
            }
            None => Status::unavailable("this stage has stopped training"),
        }
    }

    /// Records `reason` unless an earlier failure already has been.
    pub fn fail(&self, reason: String) {
        self.abort.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }
}

/// What this stage accepts under the chief's plan.
pub fn shapes_of(plan: &StartRequest, stage: usize, stages: usize) -> Result<Shapes, String> {
    let widths: Vec<usize> = plan.widths.iter().map(|&w| w as usize).collect();
    let net = Network::new(
        widths[0],
        &widths[1..widths.len() - 1],
        widths[widths.len() - 1],
    );
    let ranges = partition(&net.layer_flops(), stages)?;
    let model = net
        .stage(ranges[stage].clone())
        .map_err(|e| e.to_string())?;
    Ok(Shapes {
        input_width: model.input_width(),
        output_width: model.output_width(),
        batch: plan.batch as usize,
    })
}

#[derive(Clone)]
pub struct StageService(pub Arc<Shared>);

type TensorStream = Pin<Box<dyn Stream<Item = Result<StageTensor, Status>> + Send>>;

impl StageService {
    async fn receive(
        &self,
        direction: Direction,
        mut stream: Streaming<StageTensor>,
    ) -> Result<(), Status> {
        let shared = &self.0;
        let shapes = *shared.shapes.get().ok_or_else(|| {
            Status::failed_precondition("this stage has not been started by the chief yet")
        })?;
        let (from, width) = match direction {
            Direction::Forward if shared.stage > 0 => (shared.stage - 1, shapes.input_width),
            Direction::Backward if shared.stage + 1 < shared.stages => {
                (shared.stage + 1, shapes.output_width)
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "stage {} of {} takes no {direction:?} tensors",
                    shared.stage, shared.stages
                )));
            }
        };
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty tensor stream"))?;
        if first.from_stage as usize != from {
            return Err(Status::invalid_argument(format!(
                "{direction:?} tensors for stage {} come from stage {from}, not {}",
                shared.stage, first.from_stage
            )));
        }
        let rows = first.rows as usize;
        if rows == 0 || rows > shapes.batch {
            return Err(Status::invalid_argument(format!(
                "a micro-batch of {rows} rows does not fit a batch of {}",
                shapes.batch
            )));
        }
        if direction == Direction::Forward && first.labels.len() != rows {
            return Err(Status::invalid_argument(format!(
                "{} labels for {rows} rows",
                first.labels.len()
            )));
        }
        let mut asm = Assembler::new();
        let limit = rows * width;
        let mut chunk = first.clone();
        loop {
            if chunk.step != first.step || chunk.micro_batch != first.micro_batch {
                return Err(Status::invalid_argument(
                    "a tensor stream switched micro-batch midway",
                ));
            }
            asm.add(chunk.offset, chunk.total_len, &chunk.data, limit)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            match stream.message().await? {
                Some(next) => chunk = next,
                None => break,
            }
        }
        let data = asm
            .finish()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if data.len() != limit {
            return Err(Status::invalid_argument(format!(
                "tensor of {} values is not {rows} x {width}",
                data.len()
            )));
        }
        shared
            .inbox
            .send(Inbound {
                direction,
                step: first.step,
                micro: first.micro_batch as usize,
                rows,
                data,
                labels: first.labels.to_vec(),
                loss_sum: first.loss_sum,
            })
            .map_err(|_| shared.stopped())
    }
}

#[tonic::async_trait]
impl PipelineStage for StageService {
    async fn hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloResponse>, Status> {
        let req = request.into_inner();
        if req.stages as usize != self.0.stages {
            return Err(Status::invalid_argument(format!(
                "stage {} thinks the pipeline has {} stages; this one has {}",
                req.from_stage, req.stages, self.0.stages
            )));
        }
        Ok(Response::new(HelloResponse {
            stage: self.0.stage as u32,
            stages: self.0.stages as u32,
            checkpoints: self.0.checkpoints.clone(),
            incarnation: self.0.incarnation,
        }))
    }

    async fn start(&self, request: Request<StartRequest>) -> Result<Response<StageAck>, Status> {
        let req = request.into_inner();
        // Bounded so that a hostile plan cannot make this stage allocate without limit.
        let params: u64 = req
            .widths
            .windows(2)
            .map(|w| u64::from(w[0]) * u64::from(w[1]) + u64::from(w[1]))
            .sum();
        if req.widths.len() < 2
            || req.widths.iter().any(|&w| w == 0 || w > 1 << 24)
            || params > 1 << 30
            || req.batch == 0
        {
            return Err(Status::invalid_argument(format!(
                "plan with widths {:?} and batch {} is not a network",
                req.widths, req.batch
            )));
        }
        // The shapes must be in place before the chief's first tensor can arrive, which is
        // as soon as this call returns.
        let shapes =
            shapes_of(&req, self.0.stage, self.0.stages).map_err(Status::invalid_argument)?;
        let mut taken = true;
        self.0.start.send_if_modified(|s| match s {
            None => {
                *s = Some(req.clone());
                true
            }
            Some(old) => {
                taken = *old == req;
                false
            }
        });
        if !taken {
            return Err(Status::failed_precondition(
                "this stage was already started with a different plan",
            ));
        }
        let _ = self.0.shapes.set(shapes);
        Ok(Response::new(StageAck {}))
    }

    async fn forward(
        &self,
        request: Request<Streaming<StageTensor>>,
    ) -> Result<Response<StageAck>, Status> {
        self.receive(Direction::Forward, request.into_inner())
            .await?;
        Ok(Response::new(StageAck {}))
    }

    async fn backward(
        &self,
        request: Request<Streaming<StageTensor>>,
    ) -> Result<Response<StageAck>, Status> {
        self.receive(Direction::Backward, request.into_inner())
            .await?;
        Ok(Response::new(StageAck {}))
    }

    type ParametersStream = TensorStream;

    async fn parameters(
        &self,
        request: Request<ParametersRequest>,
    ) -> Result<Response<TensorStream>, Status> {
        let min_step = request.into_inner().min_step;
        let mut rx = self.0.params.subscribe();
        let mut abort = self.0.abort.subscribe();
        // A stage that has stopped will never reach `min_step`: say why at once instead of
        // letting the caller wait out the deadline. Parameters it already has still go out.
        let reached = async {
            tokio::select! {
                biased;
                reached = rx.wait_for(|(s, _)| *s >= min_step) => {
                    reached.map(|r| r.clone()).map_err(|_| self.0.stopped())
                }
                _ = abort.wait_for(Option::is_some) => Err(self.0.stopped()),
            }
        };
        let (step, params) = tokio::time::timeout(PARAMETERS_WAIT, reached)
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "stage {} did not reach step {min_step} within {PARAMETERS_WAIT:?}",
                    self.0.stage
                ))
            })??;
        let total = params.len() as u64;
        let stage = self.0.stage as u32;
        let len = params.len();
        let chunks = chunks::encode_chunks(params, 0..len).map(move |(offset, data)| {
            Ok(StageTensor {
                from_stage: stage,
                step,
                offset,
                total_len: total,
                data,
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<StageAck>, Status> {
        let req = request.into_inner();
        self.0.fail(format!(
            "stage {} stopped the job: {}",
            req.from_stage, req.reason
        ));
        Ok(Response::new(StageAck {}))
    }

    async fn finish(&self, _: Request<FinishRequest>) -> Result<Response<StageAck>, Status> {
        self.0.finish.send_replace(true);
        Ok(Response::new(StageAck {}))
    }
}

/// Inbound tensors held until the schedule asks for them: neighbours run ahead of this
/// stage's order, and the two directions arrive interleaved.
pub struct Mailbox {
    rx: mpsc::UnboundedReceiver<Inbound>,
    abort: watch::Receiver<Option<String>>,
    held: HashMap<(Direction, u64, usize), Inbound>,
    timeout: Duration,
    /// Steps before this one are finished: a tensor for them is a protocol error.
    pub current_step: u64,
}

impl Mailbox {
    pub fn new(
        rx: mpsc::UnboundedReceiver<Inbound>,
        abort: watch::Receiver<Option<String>>,
        timeout: Duration,
    ) -> Self {
        Self {
            rx,
            abort,
            held: HashMap::new(),
            timeout,
            current_step: 0,
        }
    }

    /// The tensor of `micro` in `step` going `direction`; `from` names the neighbour in the
    /// error when it never comes.
    pub async fn take(
        &mut self,
        direction: Direction,
        step: u64,
        micro: usize,
        from: &str,
    ) -> Result<Inbound, TrainerError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(t) = self.held.remove(&(direction, step, micro)) {
                return Ok(t);
            }
            if let Some(reason) = self.abort.borrow().clone() {
                return Err(TrainerError::JobFailed(reason));
            }
            tokio::select! {
                got = self.rx.recv() => {
                    let Some(t) = got else {
                        return Err(TrainerError::JobFailed("the stage's service stopped".into()));
                    };
                    if t.step < self.current_step {
                        return Err(TrainerError::JobFailed(format!(
                            "{:?} tensor of micro-batch {} arrived for finished step {} (now at {})",
                            t.direction, t.micro, t.step, self.current_step
                        )));
                    }
                    let key = (t.direction, t.step, t.micro);
                    if self.held.insert(key, t).is_some() {
                        return Err(TrainerError::JobFailed(format!(
                            "{:?} tensor of step {} micro-batch {} arrived twice",
                            key.0, key.1, key.2
                        )));
                    }
                }
                _ = self.abort.changed() => {}
                _ = tokio::time::sleep_until(deadline.into()) => {
                    return Err(TrainerError::JobFailed(format!(
                        "waited {:.0}s for the {} of step {step} micro-batch {micro} from {from} (--ps-timeout-secs)",
                        self.timeout.as_secs_f64(),
                        match direction {
                            Direction::Forward => "activations",
                            Direction::Backward => "gradient",
                        }
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(updates: u64) -> Arc<Shared> {
        Arc::new(Shared {
            stage: 1,
            stages: 2,
            incarnation: 1,
            checkpoints: Vec::new(),
            inbox: mpsc::unbounded_channel().0,
            start: watch::channel(None).0,
            params: watch::channel((updates, Arc::new(vec![1.0, 2.0]))).0,
            abort: watch::channel(None).0,
            finish: watch::channel(false).0,
            shapes: OnceLock::new(),
        })
    }

    async fn parameters(service: &StageService, min_step: u64) -> Result<(), Status> {
        service
            .parameters(Request::new(ParametersRequest { min_step }))
            .await
            .map(drop)
    }

    #[tokio::test]
    async fn a_stopped_stage_refuses_parameters_at_once_with_its_reason() {
        let service = StageService(shared(3));
        // Waiting for step 5 when the stage fails: answered at once, not after 30 s.
        let waiting = tokio::spawn({
            let service = service.clone();
            async move { parameters(&service, 5).await }
        });
        tokio::task::yield_now().await;
        service.0.fail("stage 0 is gone".into());
        let err = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("answered without waiting out the deadline")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("stage 0 is gone"), "{err}");
        // Asked after the failure: the same.
        let err = parameters(&service, 5).await.unwrap_err();
        assert!(err.message().contains("stage 0 is gone"), "{err}");
        // Parameters it already has still go out.
        parameters(&service, 3).await.unwrap();
    }
}
