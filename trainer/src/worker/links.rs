//! The worker's connections to every parameter server, with the retry rules: which
//! failures mean "ask again", which mean "the PS restarted, register again", and which end
//! the job.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tracing::{info, warn};

use crate::config::Config;
use crate::credential::{Attach, JobToken};
use crate::error::TrainerError;
use crate::parameter_transfer::client;
use crate::proto::parameter_server_client::ParameterServerClient;
use crate::proto::*;
use crate::transport;

const UNARY_DEADLINE: Duration = Duration::from_secs(5);
/// A pull may wait up to the PS's own 5 s bound; this covers that plus the transfer.
const PULL_DEADLINE: Duration = Duration::from_secs(15);
const PUSH_DEADLINE: Duration = Duration::from_secs(30);

/// Why a step did not complete.
#[derive(Debug)]
pub enum StepError {
    /// Redo the step (after re-registering where needed).
    Retry(String),
    /// End the worker.
    Fatal(TrainerError),
}

type PullTasks = JoinSet<(usize, Result<(u64, Vec<f32>), Status>)>;
type PushTasks = JoinSet<(usize, u64, Result<u64, Status>)>;

#[derive(Clone)]
struct Link {
    index: usize,
    addr: String,
    client: PsClient,
    /// The same connection, for the hand-framed tensor calls.
    channel: Channel,
    range: Range<usize>,
    /// Sync: the version the next pull needs (0: whatever is current).
    need: u64,
    /// The version of the parameters last pulled (the base of the next push).
    base: u64,
    stale: bool,
}

pub struct Links {
    worker: u32,
    total: usize,
    widths: Vec<u32>,
    links: Vec<Link>,
    ps_timeout: Duration,
    expected_workers: usize,
    /// Per-PS receive buffers and the assembled parameter vector, reused every step:
    /// fresh multi-MiB allocations cost more in page faults than filling them.
    spare: Vec<Vec<f32>>,
    spare_params: Vec<f32>,
    /// Sent with every push and pull.
    token: JobToken,
}

/// A control-call client whose calls carry the job token.
type PsClient = ParameterServerClient<InterceptedService<Channel, Attach>>;

fn with_deadline<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    request
}

impl Links {
    pub fn new(
        config: &Config,
        ranges: Vec<Range<usize>>,
        widths: &[usize],
    ) -> Result<Self, TrainerError> {
        let links = config
            .cluster
            .ps
            .iter()
            .zip(ranges)
            .enumerate()
            .map(|(index, (addr, range))| {
                let channel = transport::channel(addr).map_err(|e| TrainerError::Connect {
                    role: "ps",
                    index,
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
                Ok(Link {
                    index,
                    addr: addr.clone(),
                    client: ParameterServerClient::with_interceptor(
                        channel.clone(),
                        config.token.attach(),
                    )
                    .max_decoding_message_size(transport::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(transport::MAX_MESSAGE_BYTES),
                    channel,
                    range,
                    need: 0,
                    base: 0,
                    stale: true,
                })
            })
            .collect::<Result<Vec<_>, TrainerError>>()?;
        Ok(Self {
            worker: config.index as u32,
            total: widths.windows(2).map(|w| w[0] * w[1] + w[1]).sum(),
            widths: widths.iter().map(|&w| w as u32).collect(),
            links,
            ps_timeout: config.ps_timeout,
            expected_workers: config.cluster.worker.len(),
            spare: vec![Vec::new(); config.cluster.ps.len()],
            spare_params: Vec::new(),
            token: config.token.clone(),
        })
    }

    /// Registers with one PS, retrying while it is unreachable (starting or restarting),
    /// for at most `--ps-timeout-secs`.
    async fn register(&mut self, i: usize) -> Result<u64, TrainerError> {
        let started = Instant::now();
        let link = &mut self.links[i];
        loop {
            let request = RegisterRequest {
                worker_id: self.worker,
                total_params: self.total as u64,
                widths: self.widths.clone(),
            };
            let result = tokio::time::timeout(
                UNARY_DEADLINE,
                link.client.register(with_deadline(request, UNARY_DEADLINE)),
            )
            .await;
            let status = match result {
                Ok(Ok(response)) => {
                    let r = response.into_inner();
                    if (r.start as usize, r.end as usize) != (link.range.start, link.range.end) {
                        return Err(TrainerError::Connect {
                            role: "ps",
                            index: link.index,
                            addr: link.addr.clone(),
                            reason: format!(
                                "it holds [{}, {}) but this worker expects [{}, {}); are the PS and worker configured with the same cluster?",
                                r.start, r.end, link.range.start, link.range.end
                            ),
                        });
                    }
                    link.need = 0;
                    link.base = r.version;
                    link.stale = false;
                    info!(
                        ps = link.index,
                        version = r.version,
                        incarnation = r.incarnation,
                        "registered"
                    );
                    return Ok(r.worker_step);
                }
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded("register timed out"),
            };
            match status.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {}
                _ => {
                    return Err(TrainerError::Rpc {
                        call: "Register",
                        index: link.index,
                        addr: link.addr.clone(),
                        status,
                    });
                }
            }
            if started.elapsed() > self.ps_timeout {
                return Err(TrainerError::Connect {
                    role: "ps",
                    index: link.index,
                    addr: link.addr.clone(),
                    reason: format!(
                        "unreachable for {:.0}s (--ps-timeout-secs): {}",
                        started.elapsed().as_secs_f64(),
                        status.message()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Registers with every PS; returns the step to continue from.
    ///
    /// Sync takes the lowest step any shard reports, and waits for that version: a worker
    /// that died half-way through a push has its gradient in on some shards only, and
    /// redoing the step (the same batch on the same parameters) replaces those. Async
    /// and BoundedStaleness count steps per shard and take the furthest.
    pub async fn register_all(&mut self, sync: bool) -> Result<u64, TrainerError> {
        let mut steps = Vec::with_capacity(self.links.len());
        for i in 0..self.links.len() {
            steps.push(self.register(i).await?);
        }
        let resume = if sync {
            steps.iter().copied().min()
        } else {
            steps.iter().copied().max()
        }
        .unwrap_or(0);
        if sync {
            for link in &mut self.links {
                link.need = resume;
            }
        }
        Ok(resume)
    }

    async fn reregister_stale(&mut self) -> Result<(), StepError> {
        for i in 0..self.links.len() {
            if self.links[i].stale {
                self.register(i).await.map_err(StepError::Fatal)?;
            }
        }
        Ok(())
    }

    /// Sorts a failed call into retry, re-register, or fatal.
    fn classify(&mut self, i: usize, call: &'static str, status: Status) -> StepError {
        let link = &mut self.links[i];
        match status.code() {
            Code::Aborted => StepError::Fatal(TrainerError::JobFailed(format!(
                "ps {} ({}) reports: {}",
                link.index,
                link.addr,
                status.message()
            ))),
            // A PS that has as many pushes arriving as it takes at once read none of this
            // one: pushing again is safe.
            Code::DeadlineExceeded | Code::ResourceExhausted => {
                StepError::Retry(format!("{call} on ps {}: {}", link.index, status.message()))
            }
            Code::FailedPrecondition
            | Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Internal => {
                if !link.stale {
                    warn!(ps = link.index, addr = %link.addr, "{call} failed ({}); registering again", status.message());
                }
                link.stale = true;
                StepError::Retry(format!(
                    "{call} on ps {} ({}): {}",
                    link.index,
                    link.addr,
                    status.message()
                ))
            }
            _ => StepError::Fatal(TrainerError::Rpc {
                call,
                index: link.index,
                addr: link.addr.clone(),
                status,
            }),
        }
    }

    /// Pulls every shard for step `step` and assembles the full parameter vector.
    pub async fn pull_all(&mut self, step: u64, sync: bool) -> Result<Vec<f32>, StepError> {
        self.reregister_stale().await?;
        let needs: Vec<u64> = self.links.iter().map(|l| l.need).collect();
        let tasks = self.start_pull(step, sync.then_some(needs.as_slice()));
        self.finish_pull(tasks).await
    }

    /// Sync: pushes this step's gradient and, at the same time, asks for the parameters of
    /// the next step (the version this push completes). The pull then waits on the PS
    /// instead of being sent after the push's answer: one round trip less per step.
    pub async fn push_and_pull(
        &mut self,
        step: u64,
        grad: Arc<Vec<f32>>,
    ) -> Result<Result<Vec<f32>, StepError>, StepError> {
        let needs = self
            .links
            .iter()
            .map(|l| next_version(l.index, l.base))
            .collect::<Result<Vec<u64>, _>>()?;
        let pull = self.start_pull(step + 1, Some(&needs));
        let push = self.start_push(step, grad);
        // A failed push drops (aborts) the pull, which would otherwise wait in vain.
        self.finish_push(push).await?;
        Ok(self.finish_pull(pull).await)
    }

    /// Starts pulling every shard; `needs` holds each shard's minimum version (Sync).
    fn start_pull(&mut self, step: u64, needs: Option<&[u64]>) -> PullTasks {
        let mut tasks = JoinSet::new();
        for (i, link) in self.links.iter().enumerate() {
            let channel = link.channel.clone();
            let request = PullRequest {
                worker_id: self.worker,
                min_version: needs.map_or(0, |n| n[i]),
                step,
            };
            let len = link.range.len();
            let buffer = std::mem::take(&mut self.spare[i]);
            let token = self.token.clone();
            tasks.spawn(async move {
                let result =
                    client::pull_tensor((&channel, &token), &request, PULL_DEADLINE, buffer, len)
                        .await;
                (i, result)
            });
        }
        tasks
    }

    async fn finish_pull(&mut self, mut tasks: PullTasks) -> Result<Vec<f32>, StepError> {
        // Every range is overwritten below, so the old values need no clearing.
        let mut params = std::mem::take(&mut self.spare_params);
        params.resize(self.total, 0.0);
        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            let (i, result) =
                joined.map_err(|e| StepError::Fatal(TrainerError::Compute(e.to_string())))?;
            match result {
                Ok((version, mut values)) => {
                    let link = &mut self.links[i];
                    if link.range.len() == params.len() {
                        // One PS holds every parameter: its buffer is the whole vector.
                        std::mem::swap(&mut params, &mut values);
                    } else {
                        params[link.range.clone()].copy_from_slice(&values);
                    }
                    link.base = version;
                    self.spare[i] = values;
                }
                Err(status) => {
                    let error = self.classify(i, "Pull", status);
                    // A fatal error wins over a retry from another shard.
                    if failure.is_none() || matches!(error, StepError::Fatal(_)) {
                        failure = Some(error);
                    }
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(params),
        }
    }

    /// Hands a parameter vector from `pull_all` back for reuse.
    pub fn recycle(&mut self, params: Vec<f32>) {
        self.spare_params = params;
    }

    /// Pushes each PS its slice of the gradient, computed on the versions last pulled.
    pub async fn push_all(&mut self, step: u64, grad: Arc<Vec<f32>>) -> Result<(), StepError> {
        let tasks = self.start_push(step, grad);
        self.finish_push(tasks).await
    }

    fn start_push(&self, step: u64, grad: Arc<Vec<f32>>) -> PushTasks {
        let mut tasks = JoinSet::new();
        for (i, link) in self.links.iter().enumerate() {
            let channel = link.channel.clone();
            let head = PushChunk {
                worker_id: self.worker,
                base_version: link.base,
                step,
                ..Default::default()
            };
            let (base, grad, range) = (link.base, grad.clone(), link.range.clone());
            let token = self.token.clone();
            tasks.spawn(async move {
                // On a timeout, whether the push landed is unknown: it comes back as
                // Unavailable, so the worker registers again and redoes the step.
                let result =
                    client::push_tensor((&channel, &token), head, grad, range, PUSH_DEADLINE).await;
                (i, base, result)
            });
        }
        tasks
    }

    async fn finish_push(&mut self, mut tasks: PushTasks) -> Result<(), StepError> {
        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            let (i, base, result) =
                joined.map_err(|e| StepError::Fatal(TrainerError::Compute(e.to_string())))?;
            match result {
                Ok(_) => match next_version(self.links[i].index, base) {
                    Ok(need) => self.links[i].need = need,
                    Err(error) => failure = Some(error),
                },
                Err(status) => {
                    let error = self.classify(i, "Push", status);
                    if failure.is_none() || matches!(error, StepError::Fatal(_)) {
                        failure = Some(error);
                    }
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Tells every PS this worker has finished (best effort: a PS that is gone needs no
    /// telling).
    pub async fn done_all(&mut self) {
        for link in &mut self.links {
            let request = with_deadline(
                DoneRequest {
                    worker_id: self.worker,
                },
                UNARY_DEADLINE,
            );
            if let Err(e) = tokio::time::timeout(UNARY_DEADLINE, link.client.done(request)).await {
                warn!(
                    ps = link.index,
                    "telling the PS this worker is done timed out: {e}"
                );
            }
        }
    }

    /// Chief: waits until every other worker is done or dead, so the final evaluation sees
    /// all updates.
    pub async fn wait_for_workers(
        &mut self,
        abort: &watch::Receiver<Option<String>>,
    ) -> Result<(), TrainerError> {
        let workers = self.workers_expected();
        let link = &mut self.links[0];
        let mut unreachable_since: Option<Instant> = None;
        loop {
            if let Some(reason) = abort.borrow().clone() {
                return Err(TrainerError::JobFailed(reason));
            }
            let request = with_deadline(
                HeartbeatRequest {
                    worker_id: self.worker,
                },
                UNARY_DEADLINE,
            );
            match tokio::time::timeout(UNARY_DEADLINE, link.client.heartbeat(request)).await {
                Ok(Ok(response)) => {
                    let r = response.into_inner();
                    if !r.failure.is_empty() {
                        return Err(TrainerError::JobFailed(r.failure));
                    }
                    unreachable_since = None;
                    let finished = r.done_workers.len()
                        + r.dead_workers
                            .iter()
                            .filter(|d| !r.done_workers.contains(d))
                            .count();
                    if finished >= workers {
                        if !r.dead_workers.is_empty() {
                            warn!(dead = ?r.dead_workers, "finishing without workers that died");
                        }
                        return Ok(());
                    }
                }
                _ => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.ps_timeout {
                        return Err(TrainerError::Connect {
                            role: "ps",
                            index: link.index,
                            addr: link.addr.clone(),
                            reason: "unreachable while waiting for the other workers to finish"
                                .into(),
                        });
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn workers_expected(&self) -> usize {
        self.expected_workers
    }

    /// Chief: ends the job on every PS.
    pub async fn shutdown_all(&mut self, reason: &str) {
        for link in &mut self.links {
            let request = with_deadline(
                ShutdownRequest {
                    reason: reason.into(),
                },
                UNARY_DEADLINE,
            );
            match tokio::time::timeout(UNARY_DEADLINE, link.client.shutdown(request)).await {
                Ok(Ok(_)) => info!(ps = link.index, "parameter server shut down"),
                Ok(Err(status)) => warn!(ps = link.index, "shutting down the PS failed: {status}"),
                Err(_) => warn!(ps = link.index, "shutting down the PS timed out"),
            }
        }
    }

    /// Heartbeats every PS until aborted; reports a job failure any PS announces.
    pub fn heartbeats(
        &self,
        interval: Duration,
        abort: watch::Sender<Option<String>>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let clients: Vec<PsClient> = self.links.iter().map(|l| l.client.clone()).collect();
        let worker = self.worker;
        async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let mut tasks = JoinSet::new();
                for client in &clients {
                    let mut client = client.clone();
                    tasks.spawn(async move {
                        let request = with_deadline(
                            HeartbeatRequest { worker_id: worker },
                            Duration::from_secs(1),
                        );
                        tokio::time::timeout(Duration::from_secs(1), client.heartbeat(request))
                            .await
                    });
                }
                while let Some(Ok(result)) = tasks.join_next().await {
                    if let Ok(Ok(response)) = result {
                        let failure = response.into_inner().failure;
                        if !failure.is_empty() {
                            abort.send_replace(Some(failure));
                        }
                    }
                }
            }
        }
    }
}

/// The version after `base`, which a PS reported. Checked: a PS (or something posing as
/// one) that reports the last representable version must not make the worker wrap
/// around to 0 or panic.
fn next_version(ps: usize, base: u64) -> Result<u64, StepError> {
    base.checked_add(1).ok_or_else(|| {
        StepError::Fatal(TrainerError::JobFailed(format!(
            "ps {ps} reports version {base}, after which there is none; its state is corrupt"
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_after_the_last_one_is_an_error_not_a_wrap() {
        assert_eq!(next_version(0, 41).ok(), Some(42));
        match next_version(2, u64::MAX) {
            Err(StepError::Fatal(TrainerError::JobFailed(why))) => {
                assert!(
                    why.starts_with("ps 2 reports version 18446744073709551615"),
                    "{why}"
                )
            }
            other => panic!("expected a fatal error, got {:?}", other.map_err(|_| ())),
        }
    }
}
