//! Model-parallel training: the network's layers are cut into one stage per worker, and
//! micro-batches flow through the stages forward and back over gRPC.
//!
//! Worker i is stage i; worker 0 (the chief) also reads the data, sends the plan, reports
//! progress and evaluates. Each stage owns its layers' parameters and optimizer state;
//! every step ends with a flush and one synchronous update, so the result equals
//! single-process full-batch training. The planning is pure ([`schedule`]); this module
//! is the I/O shell around it.

mod peers;
pub mod schedule;
mod service;
mod train;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ndarray::Array2;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

use crate::checkpoint::{self, ShardCheckpoint};
use crate::config::Config;
use crate::error::TrainerError;
use crate::model::evaluate_examples;
use crate::model::{Network, Optimizer, StageModel};
use crate::progress::{ProgressService, ProgressState};
use crate::proto::StartRequest;
use crate::proto::pipeline_stage_server::PipelineStageServer;
use crate::proto::progress_server::ProgressServer;
use crate::tensorboard::EventLog;
use crate::termination::Termination;
use crate::transport;
use crate::worker::WorkerOutcome;
use peers::Peer;
use service::{Inbound, Mailbox, Shared, StageService};

/// Instrumented time of one stage, for the logs and the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageStats {
    /// Seconds spent computing (forward, backward, update) in the measured window.
    pub busy: f64,
    /// Seconds of the measured window: every step after the first, which pays for
    /// connection setup.
    pub window: f64,
    pub peak_stash: usize,
}

impl StageStats {
    pub fn idle_fraction(&self) -> f64 {
        if self.window <= 0.0 {
            0.0
        } else {
            (1.0 - self.busy / self.window).max(0.0)
        }
    }
}

/// A micro-batch's forward state until its backward pass; on the last stage also the
/// gradient of the loss with respect to the logits and the summed loss.
type Kept = (crate::model::Stash, Option<(Array2<f32>, f64)>);

/// The plan every stage derives from the chief's `Start`.
struct Plan {
    net: Network,
    ranges: Vec<std::ops::Range<usize>>,
    stage: StageModel,
    batch: usize,
    micro_sizes: Vec<usize>,
    total_steps: u64,
    resume: u64,
}

/// How often a stage adds its busy and idle time to the event log.
const EVENT_EVERY: Duration = Duration::from_secs(1);

fn write_stage_events(events: &EventLog, step: u64, stats: &StageStats) {
    events.scalars(
        step,
        &[
            ("pipeline/busy_seconds", stats.busy),
            (
                "pipeline/idle_seconds",
                (stats.window - stats.busy).max(0.0),
            ),
            ("pipeline/idle_fraction", stats.idle_fraction()),
        ],
    );
}

/// Runs pipeline stage `config.index` to the end of training.
/// `events` gets the stage's busy and idle time (and, on the chief, the progress's curves).
pub async fn run_stage(
    config: Config,
    progress: Option<ProgressState>,
    events: EventLog,
    termination: Termination,
) -> Result<WorkerOutcome, TrainerError> {
    let stage = config.index;
    let stages = config.cluster.worker.len();
    let dir = config
        .training
        .checkpoint
        .as_ref()
        .map(|c| PathBuf::from(&c.path));
    let checkpoints = match &dir {
        Some(dir) => {
            checkpoint::probe_writable(dir)?;
            list_checkpoints(dir, stage, stages)?
        }
        None => Vec::new(),
    };
    let (inbox, inbox_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        stage,
        stages,
        incarnation: rand::random(),
        checkpoints,
        inbox,
        start: watch::channel(None).0,
        params: watch::channel((0, Arc::new(Vec::new()))).0,
        abort: watch::channel(None).0,
        finish: watch::channel(false).0,
        shapes: OnceLock::new(),
    });
    let server = serve(&config, shared.clone(), progress.clone()).await?;
    let peers: Vec<Peer> = config
        .cluster
        .worker
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != stage)
        .map(|(i, addr)| Peer::new(i, addr, &config.token))
        .collect::<Result<_, _>>()?;
    let heartbeats: Vec<JoinHandle<()>> = peers
        .iter()
        .map(|p| {
            peers::heartbeat(
                p.clone(),
                shared.clone(),
                config.heartbeat_interval,
                config.heartbeat_timeout,
                config.idle_timeout,
            )
        })
        .collect();
    // The mailbox outlives `train`: a stage that fails keeps accepting its neighbours'
    // tensors until it has recorded why and told them, so they hear the cause (naming the
    // stage that died) rather than a refusal.
    let mut mailbox = Mailbox::new(inbox_rx, shared.abort.subscribe(), config.ps_timeout);
    let result = train::train(
        &config,
        &shared,
        &peers,
        &mut mailbox,
        progress,
        &events,
        &termination,
    )
    .await;
    if let Err(e) = &result {
        // Tell everyone at once rather than leave each to time out on its own. A stage that
        // only relays someone else's abort does not echo it.
        let relayed = shared
            .abort
            .borrow()
            .as_ref()
            .is_some_and(|r| r.contains("stopped the job:"));
        if !relayed {
            let reason = match e {
                TrainerError::JobFailed(why) => why.clone(),
                other => other.to_string(),
            };
            shared.fail(reason.clone());
            let mut calls = JoinSet::new();
            for p in &peers {
                let (p, reason) = (p.clone(), reason.clone());
                calls.spawn(async move { p.abort(stage, reason).await });
            }
            while calls.join_next().await.is_some() {}
        }
    }
    for h in heartbeats {
        h.abort();
    }
    server.abort();
    result
}

/// Runs a pass off the async workers. Computing inline would block a runtime thread for
/// milliseconds, and a task parked behind it (the ack of a neighbour's tensor, this
/// stage's own sends) would wait the whole pass: the pipeline would degenerate into
/// taking turns.
async fn compute<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::model::ModelError> + Send + 'static,
) -> Result<T, TrainerError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| TrainerError::Compute(e.to_string()))?
        .map_err(Into::into)
}

fn check_rows(t: &Inbound, rows: usize) -> Result<(), TrainerError> {
    if t.rows != rows {
        return Err(TrainerError::JobFailed(format!(
            "micro-batch {} of step {} has {} rows, expected {rows}",
            t.micro, t.step, t.rows
        )));
    }
    Ok(())
}

fn make_plan(start: &StartRequest, stage: usize, stages: usize) -> Result<Plan, TrainerError> {
    let widths: Vec<usize> = start.widths.iter().map(|&w| w as usize).collect();
    let net = Network::new(
        widths[0],
        &widths[1..widths.len() - 1],
        widths[widths.len() - 1],
    );
    let ranges = schedule::partition(&net.layer_flops(), stages).map_err(TrainerError::Config)?;
    let model = net.stage(ranges[stage].clone())?;
    let batch = start.batch as usize;
    Ok(Plan {
        micro_sizes: schedule::micro_batch_sizes(batch, start.micro_batches as usize),
        stage: model,
        ranges,
        net,
        batch,
        total_steps: start.total_steps,
        resume: start.resume_step,
    })
}

/// Chief: waits for every stage to answer, and collects the checkpoints each found.
async fn hello_all(
    config: &Config,
    shared: &Shared,
    peers: &[Peer],
) -> Result<Vec<Vec<u64>>, TrainerError> {
    let mut lists = vec![shared.checkpoints.clone()];
    let began = Instant::now();
    for p in peers {
        loop {
            match p.hello(0, shared.stages, Duration::from_secs(2)).await {
                Ok(r) => {
                    lists.push(r.checkpoints);
                    break;
                }
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    return Err(TrainerError::Config(format!(
                        "{}: {}",
                        p.name(),
                        s.message()
                    )));
                }
                Err(s) if began.elapsed() > config.idle_timeout => {
                    return Err(TrainerError::JobFailed(format!(
                        "{} did not come up within {:.0}s (--idle-timeout-secs): {}",
                        p.name(),
                        config.idle_timeout.as_secs_f64(),
                        s.message()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(lists)
}

/// The latest step every stage has a checkpoint of (0: none in common). Stages write at
/// the same steps and none can run more than one checkpoint interval ahead of another,
/// so keeping the last two per stage always leaves one in common.
pub fn choose_resume(lists: &[Vec<u64>]) -> u64 {
    let Some((first, rest)) = lists.split_first() else {
        return 0;
    };
    first
        .iter()
        .copied()
        .filter(|s| rest.iter().all(|l| l.contains(s)))
        .max()
        .unwrap_or(0)
}

fn checkpoint_dir(config: &Config) -> Result<&Path, TrainerError> {
    config
        .training
        .checkpoint
        .as_ref()
        .map(|c| Path::new(&c.path))
        .ok_or_else(|| TrainerError::Config("no checkpoint path".into()))
}

fn checkpoint_prefix(stage: usize, stages: usize) -> String {
    format!("stage-{stage}-of-{stages}-step-")
}

fn checkpoint_path(dir: &Path, stage: usize, stages: usize, step: u64) -> PathBuf {
    dir.join(format!("{}{step}.ckpt", checkpoint_prefix(stage, stages)))
}

/// Steps of this stage's checkpoints in `dir`, ascending.
fn list_checkpoints(dir: &Path, stage: usize, stages: usize) -> Result<Vec<u64>, TrainerError> {
    let prefix = checkpoint_prefix(stage, stages);
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(checkpoint::CheckpointError::Read {
                path: dir.to_path_buf(),
                source,
            }
            .into());
        }
    };
    let mut steps: Vec<u64> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix(&prefix)?
                .strip_suffix(".ckpt")?
                .parse()
                .ok()
        })
        .collect();
    steps.sort_unstable();
    Ok(steps)
}

/// Writes this stage's checkpoint for `step` and keeps only the newest two.
fn write_checkpoint(
    dir: &Path,
    stage: usize,
    stages: usize,
    step: u64,
    plan: &Plan,
    params: &[f32],
    optimizer: &Optimizer,
) -> Result<(), TrainerError> {
    let range = plan.stage.param_range();
    let path = checkpoint_path(dir, stage, stages, step);
    checkpoint::write(
        &path,
        &ShardCheckpoint {
            version: step,
            start: range.start,
            end: range.end,
            total_params: plan.net.num_params(),
            params: params.to_vec(),
            optimizer: optimizer.state().clone(),
        },
    )?;
    // A stage's checkpoints are named by step, so the `.prev` that `write` keeps when a
    // step is written again (after resuming from an earlier one) is only a stale copy.
    remove_stale(&checkpoint::previous(&path), stage, step);
    let steps = list_checkpoints(dir, stage, stages)?;
    for old in steps.iter().rev().skip(2) {
        let path = checkpoint_path(dir, stage, stages, *old);
        remove_stale(&path, stage, *old);
        remove_stale(&checkpoint::previous(&path), stage, *old);
    }
    Ok(())
}

fn remove_stale(path: &Path, stage: usize, step: u64) {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            warn!(stage, step, "could not remove an old checkpoint: {e}");
        }
        _ => {}
    }
}

/// Chief: every stage's parameters after `step` updates, as the network's flat vector.
/// Runs `call` unless the job fails first. A peer's answer may wait on a stage that has
/// died (a Parameters call waits for its step), and the call's deadline is only a header
/// the peer's server enforces, so nothing else would end the wait: the heartbeats that
/// noticed the death only set `abort`.
async fn unless_aborted<T>(
    abort: &mut watch::Receiver<Option<String>>,
    call: impl std::future::Future<Output = Result<T, TrainerError>>,
) -> Result<T, TrainerError> {
    tokio::select! {
        r = call => r,
        r = abort.wait_for(Option::is_some) => {
            let reason = r.ok().and_then(|r| r.clone()).unwrap_or_default();
            Err(TrainerError::JobFailed(reason))
        }
    }
}

async fn gather(
    peers: &[Peer],
    plan: &Plan,
    own: &Arc<Vec<f32>>,
    step: u64,
) -> Result<Vec<f32>, TrainerError> {
    let mut full = Vec::with_capacity(plan.net.num_params());
    full.extend_from_slice(own);
    for (i, range) in plan.ranges.iter().enumerate().skip(1) {
        let peer = peers
            .iter()
            .find(|p| p.stage == i)
            .ok_or_else(|| TrainerError::Config(format!("no address for stage {i}")))?;
        let expected = plan.net.stage(range.clone())?.num_params();
        let part = peer.parameters(step, expected).await?;
        if part.len() != expected {
            return Err(TrainerError::JobFailed(format!(
                "{} sent {} parameters, expected {expected}",
                peer.name(),
                part.len()
            )));
        }
        full.extend_from_slice(&part);
    }
    Ok(full)
}

async fn evaluate(
    net: &Network,
    params: Vec<f32>,
    test: &crate::data::Examples,
) -> Result<crate::model::Evaluation, TrainerError> {
    let (net, test) = (net.clone(), test.clone());
    tokio::task::spawn_blocking(move || evaluate_examples(&net, &params, &test))
        .await
        .map_err(|e| TrainerError::Compute(e.to_string()))?
        .map_err(Into::into)
}

/// The stage's gRPC server: the stage service and health for everyone, Progress on the
/// chief.
async fn serve(
    config: &Config,
    shared: Arc<Shared>,
    progress: Option<ProgressState>,
) -> Result<JoinHandle<()>, TrainerError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .map_err(|source| TrainerError::Bind {
            addr: config.bind,
            source,
        })?;
    let stage = InterceptedService::new(
        PipelineStageServer::new(StageService(shared))
            .max_decoding_message_size(transport::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(transport::MAX_MESSAGE_BYTES),
        config.token.require(),
    );
    if !config.token.is_set() {
        warn!(
            stage = config.index,
            "KUBETRAIN_JOB_TOKEN is unset: this stage accepts calls from anyone who reaches its port"
        );
    }
    reporter
        .set_serving::<PipelineStageServer<StageService>>()
        .await;
    let mut router = transport::server().add_service(health).add_service(stage);
    if let Some(progress) = progress {
        reporter
            .set_serving::<ProgressServer<ProgressService>>()
            .await;
        router = router.add_service(ProgressServer::new(ProgressService(progress)));
    }
    info!(addr = %config.bind, stage = config.index, "pipeline stage listening");
    Ok(tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming(transport::incoming(listener))
            .await
        {
            warn!("stage gRPC server stopped: {e}");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_is_the_latest_checkpoint_every_stage_has() {
        assert_eq!(choose_resume(&[vec![], vec![]]), 0);
        assert_eq!(choose_resume(&[vec![100, 200], vec![100, 200]]), 200);
        // Stage 1 died before writing step 200.
        assert_eq!(choose_resume(&[vec![100, 200], vec![0, 100]]), 100);
        assert_eq!(choose_resume(&[vec![200], vec![100]]), 0);
    }

    #[test]
    fn checkpoints_are_listed_per_stage() {
        let dir = std::env::temp_dir().join(format!("kubetrain-stage-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(list_checkpoints(&dir, 0, 2).unwrap(), Vec::<u64>::new());
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "stage-0-of-2-step-20.ckpt",
            "stage-0-of-2-step-3.ckpt",
            "stage-1-of-2-step-9.ckpt",
            "stage-0-of-3-step-1.ckpt",
            "junk",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        assert_eq!(list_checkpoints(&dir, 0, 2).unwrap(), vec![3, 20]);
        assert_eq!(list_checkpoints(&dir, 1, 2).unwrap(), vec![9]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
