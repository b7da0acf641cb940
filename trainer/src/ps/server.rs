use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

use super::registration::{self, ExpectedModel, RefusedModel};
use super::shard::{Shard, ShardError};
use super::shard_ranges;
use super::staleness;
use crate::checkpoint::{self, ShardCheckpoint};
use crate::config::Config;
use crate::data;
use crate::error::TrainerError;
use crate::metrics::PsMetrics;
use crate::model::{Network, Optimizer};
use crate::proto::parameter_server_server::{ParameterServer, ParameterServerServer};
use crate::proto::*;
use crate::run_log;
use crate::tensorboard::EventLog;
use crate::termination::Termination;
use crate::transport;
use kubetrain_api::validation::effective_hidden;

mod parameter_transfer;
mod push_slots;

/// How long a pull waits server-side before telling the worker to ask again. Bounded so a
/// blocked call never outlives its deadline; the worker simply re-issues it.
const PULL_WAIT: Duration = Duration::from_secs(5);
/// See [`run_ps`]'s server.
const MAX_STREAMS_PER_CONNECTION: u32 = 32;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(40);
/// After giving up on the job, how long the PS keeps answering so workers hear why.
const FAILURE_GRACE: Duration = Duration::from_secs(2);

struct State {
    shard: Option<Shard>,
    widths: Option<Vec<usize>>,
    total_params: usize,
    last_contact: Instant,
    /// SIGTERM arrived and the final checkpoint is written: no further push is applied, so
    /// the checkpoint holds every update this PS acknowledged.
    stopping: bool,
}

struct Inner {
    index: usize,
    servers: usize,
    workers: Vec<String>,
    config: Config,
    /// The model registrations must describe.
    expected: ExpectedModel,
    incarnation: u64,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    finish: watch::Sender<Option<Result<(), String>>>,
    metrics: PsMetrics,
    checkpoint: Option<(PathBuf, u64)>,
    /// Serialises checkpoint writes; holds the newest version written.
    written: Arc<Mutex<u64>>,
    events: EventLog,
    /// When the staleness was last logged, and the histogram then.
    staleness_logged: Mutex<(Instant, BTreeMap<u64, u64>)>,
    /// Bounds the pushes arriving at once, and so the memory they hold.
    push_slots: Arc<push_slots::PushSlots>,
}

/// How often the PS adds the staleness of recent updates to its event log.
const STALENESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct PsService(Arc<Inner>);

fn status_of(e: ShardError) -> Status {
    match e {
        ShardError::UnknownWorker { .. }
        | ShardError::WrongLength { .. }
        | ShardError::NonFinite { .. }
        | ShardError::Model(_) => Status::invalid_argument(e.to_string()),
        ShardError::Stale { .. } => Status::failed_precondition(e.to_string()),
        ShardError::Failed(_) => Status::aborted(e.to_string()),
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving rather than cascade.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn check_worker(&self, worker: u32) -> Result<(), Status> {
        if (worker as usize) < self.workers.len() {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "unknown worker {worker}: this job has workers 0..{}",
                self.workers.len()
            )))
        }
    }

    /// Builds the shard on the first registration: from the checkpoint if there is one,
    /// else from the seed.
    fn init_shard(&self, widths: Vec<usize>) -> Result<Shard, Status> {
        let net = Network::new(
            widths[0],
            &widths[1..widths.len() - 1],
            widths[widths.len() - 1],
        );
        let total = net.num_params();
        let range = shard_ranges(total, self.servers)[self.index].clone();
        let mut optimizer = Optimizer::new(&self.config.training.optimizer, range.len());
        let mut version = 0;
        let mut params = None;
        if let Some((dir, _)) = &self.checkpoint {
            let newest = checkpoint::file_name(dir, self.index, self.servers);
            let found = checkpoint::read_newest(&newest).map_err(|e| {
                error!(ps = self.index, "{e}");
                Status::failed_precondition(e.to_string())
            })?;
            if let Some(checkpoint::Resume {
                from,
                skipped: Some(skipped),
                ..
            }) = &found
            {
                warn!(ps = self.index, older = %from.display(), "{skipped}; resuming from the checkpoint before it, which is at most everySteps steps older");
            }
            match found {
                Some(checkpoint::Resume {
                    checkpoint: ckpt,
                    from: path,
                    ..
                }) if ckpt.start == range.start
                    && ckpt.end == range.end
                    && ckpt.total_params == total =>
                {
                    optimizer.restore(ckpt.optimizer).map_err(|e| {
                        Status::internal(format!("checkpoint {}: {e}", path.display()))
                    })?;
                    version = ckpt.version;
                    params = Some(ckpt.params);
                    info!(ps = self.index, version, path = %path.display(), "resumed shard from checkpoint");
                }
                Some(checkpoint::Resume {
                    checkpoint: ckpt,
                    from: path,
                    ..
                }) => {
                    return Err(Status::failed_precondition(format!(
                        "checkpoint {} holds [{}, {}) of {} parameters but this model needs [{}, {}) of {total}; delete it or point checkpoint.path elsewhere",
                        path.display(),
                        ckpt.start,
                        ckpt.end,
                        ckpt.total_params,
                        range.start,
                        range.end
                    )));
                }
                None => {}
            }
        }
        let params =
            params.unwrap_or_else(|| net.init_range(self.config.training.seed, range.clone()));
        info!(
            ps = self.index,
            start = range.start,
            end = range.end,
            total,
            version,
            "shard ready"
        );
        Ok(Shard::new(
            range.start,
            params,
            optimizer,
            version,
            self.config.consistency,
            self.workers.len(),
            Instant::now(),
        )
        .with_stale_gradients(
            self.config
                .training
                .consistency
                .stale_gradients
                .unwrap_or_default(),
        ))
    }

    /// Logs the staleness of the updates applied since the last time, at most once per
    /// [`STALENESS_EVERY`] unless `force`. Sync updates are never stale, and log nothing.
    fn log_staleness(&self, shard: &Shard, force: bool) {
        if !self.events.is_on() {
            return;
        }
        let mut logged = self
            .staleness_logged
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !force && logged.0.elapsed() < STALENESS_EVERY {
            return;
        }
        let now = shard.staleness_histogram();
        if let Some(w) = staleness::window(&logged.1, now) {
            self.events.scalars(
                shard.version(),
                &[
                    ("staleness/mean", w.mean),
                    ("staleness/max", w.max as f64),
                    ("staleness/updates", w.updates as f64),
                ],
            );
        }
        *logged = (Instant::now(), now.clone());
        if force {
            self.events.flush();
        }
    }

    /// SIGTERM: the final checkpoint, written while holding the state, so that no push
    /// lands between it and the stop; then the server ends as after a Shutdown.
    fn stop_for_sigterm(&self) {
        let mut state = self.lock();
        state.stopping = true;
        let version = state.shard.as_ref().map_or(0, Shard::version);
        if let Some(shard) = &state.shard {
            self.maybe_checkpoint(shard, state.total_params, true);
            self.log_staleness(shard, true);
        }
        drop(state);
        info!(
            ps = self.index,
            version,
            checkpoint = self.checkpoint.is_some(),
            "stopping on SIGTERM"
        );
        self.finish.send_replace(Some(Ok(())));
    }

    fn maybe_checkpoint(&self, shard: &Shard, total_params: usize, force: bool) {
        let Some((dir, every)) = &self.checkpoint else {
            return;
        };
        let version = shard.version();
        if !force && (version == 0 || !version.is_multiple_of(*every)) {
            return;
        }
        let ckpt = ShardCheckpoint {
            version,
            start: shard.start,
            end: shard.end,
            total_params,
            params: shard.params().to_vec(),
            optimizer: shard.optimizer().state().clone(),
        };
        let path = checkpoint::file_name(dir, self.index, self.servers);
        let written = self.written.clone();
        let index = self.index;
        let write = move || {
            let mut newest = written.lock().unwrap_or_else(|p| p.into_inner());
            if *newest >= ckpt.version && ckpt.version != 0 && !force {
                return;
            }
            let started = Instant::now();
            match checkpoint::write(&path, &ckpt) {
                Ok(()) => {
                    *newest = ckpt.version;
                    info!(
                        ps = index,
                        version = ckpt.version,
                        millis = started.elapsed().as_millis() as u64,
                        "checkpoint written"
                    );
                }
                Err(e) => warn!(ps = index, "{e}"),
            }
        };
        if force {
            write();
        } else {
            tokio::task::spawn_blocking(write);
        }
    }
}

#[tonic::async_trait]
impl ParameterServer for PsService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let inner = &self.0;
        let req = request.into_inner();
        inner.check_worker(req.worker_id)?;
        let widths: Vec<usize> = req.widths.iter().map(|&w| w as usize).collect();
        let total = registration::check(&inner.expected, &widths).map_err(|e| match e {
            RefusedModel::NotTheSpec { .. } => Status::failed_precondition(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        })?;
        if req.total_params != total as u64 {
            return Err(Status::invalid_argument(format!(
                "total_params {} does not match the widths' {total} parameters",
                req.total_params
            )));
        }
        let mut state = inner.lock();
        match &state.widths {
            Some(known) if *known != widths => {
                return Err(Status::failed_precondition(format!(
                    "worker {} has model widths {:?} but this PS serves {known:?}; every worker must run the same spec.training",
                    req.worker_id, widths
                )));
            }
            Some(_) => {}
            None => {
                let shard = inner.init_shard(widths.clone())?;
                state.shard = Some(shard);
                state.widths = Some(widths);
                state.total_params = total;
            }
        }
        state.last_contact = Instant::now();
        let shard = state
            .shard
            .as_mut()
            .ok_or_else(|| Status::internal("shard missing"))?;
        let worker_step = shard
            .register(req.worker_id, Instant::now())
            .map_err(status_of)?;
        let response = RegisterResponse {
            start: shard.start as u64,
            end: shard.end as u64,
            version: shard.version(),
            worker_step,
            incarnation: inner.incarnation,
        };
        drop(state);
        info!(
            ps = inner.index,
            worker = req.worker_id,
            worker_step,
            "worker registered"
        );
        inner.notify();
        Ok(Response::new(response))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let inner = &self.0;
        let req = request.into_inner();
        inner.check_worker(req.worker_id)?;
        let mut state = inner.lock();
        state.last_contact = Instant::now();
        let Some(shard) = state.shard.as_mut() else {
            return Ok(Response::new(HeartbeatResponse {
                incarnation: inner.incarnation,
                ..Default::default()
            }));
        };
        shard
            .touch(req.worker_id, Instant::now())
            .map_err(status_of)?;
        Ok(Response::new(HeartbeatResponse {
            version: shard.version(),
            incarnation: inner.incarnation,
            done_workers: shard.done_workers(),
            dead_workers: shard.dead_workers(),
            failure: shard.failure().unwrap_or_default().to_string(),
        }))
    }

    async fn done(&self, request: Request<DoneRequest>) -> Result<Response<DoneResponse>, Status> {
        let inner = &self.0;
        let req = request.into_inner();
        inner.check_worker(req.worker_id)?;
        let mut state = inner.lock();
        state.last_contact = Instant::now();
        if let Some(shard) = state.shard.as_mut() {
            shard
                .mark_done(req.worker_id, Instant::now())
                .map_err(status_of)?;
        }
        drop(state);
        info!(ps = inner.index, worker = req.worker_id, "worker done");
        inner.notify();
        Ok(Response::new(DoneResponse {}))
    }

    async fn shutdown(
        &self,
        request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        let inner = &self.0;
        let reason = request.into_inner().reason;
        let state = inner.lock();
        let version = state.shard.as_ref().map_or(0, Shard::version);
        if let Some(shard) = &state.shard {
            inner.maybe_checkpoint(shard, state.total_params, true);
            inner.log_staleness(shard, true);
            let histogram = shard.staleness_histogram();
            if !histogram.is_empty() {
                info!(
                    ps = inner.index,
                    "staleness histogram (versions behind: updates): {histogram:?}"
                );
                run_log::ps_staleness(inner.index, &histogram);
            }
        }
        drop(state);
        run_log::ps_shutdown(inner.index, version, &reason);
        inner.finish.send_replace(Some(Ok(())));
        Ok(Response::new(ShutdownResponse { version }))
    }
}

/// Runs a parameter server until the chief shuts it down (Ok) or it gives up (Err).
/// `events` gets the staleness of Async and BoundedStaleness updates.
/// On SIGTERM (`termination`) it writes a final checkpoint, stops applying pushes and
/// exits 0.
pub async fn run_ps(
    config: Config,
    metrics: PsMetrics,
    events: EventLog,
    mut termination: Termination,
) -> Result<(), TrainerError> {
    let incarnation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let checkpoint = config
        .training
        .checkpoint
        .as_ref()
        .map(|c| (PathBuf::from(&c.path), u64::from(c.every_steps.max(1))));
    if let Some((dir, _)) = &checkpoint {
        checkpoint::probe_writable(dir)?;
    }
    let (finish, finished) = watch::channel(None);
    let inner = Arc::new(Inner {
        index: config.index,
        servers: config.cluster.ps.len(),
        workers: config.cluster.worker.clone(),
        incarnation,
        state: Mutex::new(State {
            shard: None,
            widths: None,
            total_params: 0,
            last_contact: Instant::now(),
            stopping: false,
        }),
        changed: watch::channel(0).0,
        finish,
        metrics,
        checkpoint,
        written: Arc::new(Mutex::new(0)),
        events,
        staleness_logged: Mutex::new((Instant::now(), BTreeMap::new())),
        push_slots: push_slots::PushSlots::for_workers(config.cluster.worker.len()),
        expected: expected_model(&config),
        config: config.clone(),
    });

    let watchdog = tokio::spawn(watchdog(inner.clone()));
    let on_sigterm = tokio::spawn({
        let inner = inner.clone();
        async move {
            termination.wait().await;
            inner.stop_for_sigterm();
        }
    });
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<ParameterServerServer<PsService>>()
        .await;
    reporter
        .set_serving::<parameter_transfer::TransferService>()
        .await;
    let service = InterceptedService::new(
        ParameterServerServer::new(PsService(inner.clone()))
            .max_decoding_message_size(transport::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(transport::MAX_MESSAGE_BYTES),
        config.token.require(),
    );
    if !config.token.is_set() {
        warn!(
            ps = config.index,
            "KUBETRAIN_JOB_TOKEN is unset: this parameter server accepts calls from anyone who reaches its port"
        );
    }
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .map_err(|source| TrainerError::Bind {
            addr: config.bind,
            source,
        })?;
    info!(ps = config.index, addr = %config.bind, consistency = ?config.consistency, "parameter server listening");
    let mut signal = finished.clone();
    let server = transport::server()
        // Per connection: a worker has a push, a pull, a heartbeat and a control call
        // open at most; far more is a flood, and each open stream costs memory.
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        // No call of a worker's takes this long (its own deadlines are 5 to 30 s): a
        // request that stalls is ended, and its push slot freed.
        .timeout(REQUEST_TIMEOUT)
        .add_service(health)
        .add_service(service)
        .add_service(parameter_transfer::TransferService(inner.clone()))
        .serve_with_incoming_shutdown(transport::incoming(listener), async move {
            signal.wait_for(Option::is_some).await.map(|_| ()).ok();
        });
    tokio::pin!(server);
    let mut waiter = finished.clone();
    let outcome = tokio::select! {
        served = &mut server => {
            served?;
            finished.borrow().clone().unwrap_or(Ok(()))
        }
        _ = async { waiter.wait_for(Option::is_some).await.map(|_| ()) } => {
            let outcome = finished.borrow().clone().unwrap_or(Ok(()));
            // Let in-flight answers (the Shutdown reply, failure statuses) go out, but do not
            // wait on idle client connections.
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut server).await;
            outcome
        }
    };
    watchdog.abort();
    on_sigterm.abort();
    outcome.map_err(TrainerError::PsGaveUp)
}

/// The model this PS's own spec describes. A CSV dataset may be mounted on the workers
/// only; then its width is taken from the first registration.
fn expected_model(config: &Config) -> ExpectedModel {
    let hidden = effective_hidden(&config.training.model)
        .iter()
        .map(|&h| h as usize)
        .collect();
    let data = match data::shape(&config.training.dataset) {
        Ok(shape) => Some(shape),
        Err(error) => {
            warn!(ps = config.index, %error, "cannot read the dataset here; the first registration's input width is taken");
            None
        }
    };
    ExpectedModel::new(hidden, data)
}

/// Marks silent workers dead, fails a Sync job that lost one, and ends a PS nobody talks to.
async fn watchdog(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut failed_at: Option<Instant> = None;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let mut state = inner.lock();
        let idle = now.saturating_duration_since(state.last_contact);
        if let Some(shard) = state.shard.as_mut() {
            let had_failure = shard.failure().is_some();
            let dead = shard.check_liveness(
                now,
                inner.config.heartbeat_timeout,
                inner.config.training.consistency.worker_grace_period(),
                inner.config.idle_timeout,
                &inner.workers,
            );
            for w in &dead {
                if shard.applies_on_arrival() {
                    warn!(ps = inner.index, worker = w, addr = %inner.workers[*w as usize], "worker stopped heartbeating; marked dead, going on without it");
                } else {
                    warn!(ps = inner.index, worker = w, addr = %inner.workers[*w as usize], grace_s = inner.config.training.consistency.worker_grace_period().as_secs(), "worker stopped heartbeating; marked dead, holding the step for its replacement");
                }
            }
            if let (false, Some(reason)) = (had_failure, shard.failure()) {
                error!(ps = inner.index, "{reason}");
                failed_at = Some(now);
            }
            if !dead.is_empty() {
                drop(state);
                inner.notify();
                state = inner.lock();
            }
        }
        let failure = state
            .shard
            .as_ref()
            .and_then(|s| s.failure().map(str::to_string));
        drop(state);
        if let (Some(at), Some(reason)) = (failed_at, failure) {
            if now.saturating_duration_since(at) >= FAILURE_GRACE {
                inner.finish.send_replace(Some(Err(reason)));
                return;
            }
            continue;
        }
        if idle > inner.config.idle_timeout {
            let reason = format!(
                "no worker contact for {:.0}s (--idle-timeout-secs); the job's workers are gone",
                idle.as_secs_f64()
            );
            error!(ps = inner.index, "{reason}");
            if let Some(shard) = inner.lock().shard.as_mut() {
                shard.fail(reason.clone());
            }
            inner.finish.send_replace(Some(Err(reason)));
            return;
        }
    }
}
