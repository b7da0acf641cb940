use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kubetrain_api::StaleGradients;

use crate::consistency::Consistency;
use crate::model::{ModelError, Optimizer, StaleSteps, ValueRuns};

/// A request the shard refuses. Each maps to a gRPC status; none panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("unknown worker {worker}: this job has workers 0..{workers}")]
    UnknownWorker { worker: u32, workers: usize },
    #[error("gradient has {got} elements but this shard holds {expected}")]
    WrongLength { expected: usize, got: usize },
    #[error(
        "gradient was computed against version {base} but this shard is at {version}; register again and pull"
    )]
    Stale { base: u64, version: u64 },
    #[error(
        "worker {worker} pushed a gradient for step {step} with a NaN or infinite value at shard offset {index}; refused, the shard is unchanged"
    )]
    NonFinite {
        worker: u32,
        step: u64,
        index: usize,
    },
    #[error("the job has failed: {0}")]
    Failed(String),
    #[error("updating the shard: {0}")]
    Model(#[from] ModelError),
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The shard moved to a new version.
    Applied { version: u64 },
    /// Sync: kept until the other workers' gradients arrive.
    Pending,
}

/// Whether a pull may be answered now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullDecision {
    Ready,
    Wait,
    Failed(String),
    /// The worker asks for a version this shard never reached: the PS restarted from a
    /// checkpoint behind the worker.
    Restarted {
        version: u64,
    },
}

#[derive(Debug, Clone, Default)]
struct WorkerState {
    registered: bool,
    last_seen: Option<Instant>,
    /// Steps completed, as far as this shard knows.
    clock: u64,
    done: bool,
    dead: bool,
    pending: Option<Vec<f32>>,
}

/// One parameter server's shard: parameters, optimizer state, version, and the per-worker
/// bookkeeping that the consistency rules need. Pure state: time is passed in.
#[derive(Debug)]
pub struct Shard {
    pub start: usize,
    pub end: usize,
    /// Shared with pulls in flight; an update copies only if one still holds the old
    /// version (copy-on-write, [`params_mut`]), so steady-state pulls cost no copy at all.
    params: Arc<Vec<f32>>,
    /// Earlier versions that pulls were still sending when they were replaced; once the
    /// last such pull ends, the next copy-on-write reuses one instead of allocating.
    retired: Vec<Arc<Vec<f32>>>,
    optimizer: Optimizer,
    version: u64,
    consistency: Consistency,
    workers: Vec<WorkerState>,
    /// Async/BoundedStaleness: how many versions behind each applied gradient was.
    staleness: BTreeMap<u64, u64>,
    /// Async/BoundedStaleness: how a stale gradient's update is scaled.
    stale_steps: StaleSteps,
    failure: Option<String>,
    started: Instant,
    /// Gradient buffers already applied, for the next pushes to decode into.
    spare: Vec<Vec<f32>>,
}

impl Shard {
    pub fn new(
        start: usize,
        params: Vec<f32>,
        optimizer: Optimizer,
        version: u64,
        consistency: Consistency,
        workers: usize,
        now: Instant,
    ) -> Self {
        Self {
            start,
            end: start + params.len(),
            params: Arc::new(params),
            retired: Vec::new(),
            optimizer,
            version,
            consistency,
            workers: vec![WorkerState::default(); workers],
            staleness: BTreeMap::new(),
            stale_steps: StaleSteps::new(StaleGradients::default(), workers),
            failure: None,
            started: now,
            spare: Vec::new(),
        }
    }

    /// Applies stale gradients as `policy` says (the default otherwise).
    pub fn with_stale_gradients(mut self, policy: StaleGradients) -> Self {
        self.stale_steps = StaleSteps::new(policy, self.workers.len());
        self
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// This version's parameters, without copying them.
    pub fn snapshot(&self) -> Arc<Vec<f32>> {
        self.params.clone()
    }

    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// A buffer to decode the next gradient into (empty if none is spare).
    pub fn take_spare(&mut self) -> Vec<f32> {
        self.spare.pop().unwrap_or_default()
    }

    fn recycle(&mut self, buffer: Vec<f32>) {
        // Enough for the pushes in flight at once; more would only hold memory.
        if self.spare.len() < self.workers.len().min(4) {
            self.spare.push(buffer);
        }
    }

    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    pub fn staleness_histogram(&self) -> &BTreeMap<u64, u64> {
        &self.staleness
    }

    fn worker(&mut self, worker: u32) -> Result<&mut WorkerState, ShardError> {
        let workers = self.workers.len();
        self.workers
            .get_mut(worker as usize)
            .ok_or(ShardError::UnknownWorker { worker, workers })
    }

    /// Any contact from a worker proves it alive.
    pub fn touch(&mut self, worker: u32, now: Instant) -> Result<(), ShardError> {
        let w = self.worker(worker)?;
        w.last_seen = Some(now);
        Ok(())
    }

    /// A worker (re)announces itself; returns the steps this shard has seen it complete.
    pub fn register(&mut self, worker: u32, now: Instant) -> Result<u64, ShardError> {
        let (version, sync) = (self.version, self.consistency == Consistency::Sync);
        let w = self.worker(worker)?;
        w.registered = true;
        w.last_seen = Some(now);
        // A restarted worker is alive again: Async / BoundedStaleness keep going with it,
        // and Sync, which held the step for it, takes its gradient again.
        w.dead = false;
        w.done = false;
        if sync {
            // In Sync every worker is at the shard's version, or one step past it when its
            // gradient is in and waits for the others. The clock cannot say which: the
            // pull for step t+1 goes out beside the push of step t, and may be all that
            // arrived before the worker died.
            w.clock = version + u64::from(w.pending.is_some());
        }
        Ok(w.clock)
    }

    pub fn mark_done(&mut self, worker: u32, now: Instant) -> Result<(), ShardError> {
        let w = self.worker(worker)?;
        w.done = true;
        w.last_seen = Some(now);
        // Sync: the remaining workers may now be complete without this one.
        self.try_apply_sync()?;
        Ok(())
    }

    pub fn done_workers(&self) -> Vec<u32> {
        (0..self.workers.len() as u32)
            .filter(|&i| self.workers[i as usize].done)
            .collect()
    }

    pub fn dead_workers(&self) -> Vec<u32> {
        (0..self.workers.len() as u32)
            .filter(|&i| self.workers[i as usize].dead)
            .collect()
    }

    /// Every worker has finished or died: nothing more will arrive.
    pub fn all_finished(&self) -> bool {
        self.workers.iter().all(|w| w.done || w.dead)
    }

    /// Bookkeeping and checks every push passes: a known worker, a usable base version.
    fn admit(&mut self, worker: u32, base: u64, step: u64, now: Instant) -> Result<(), ShardError> {
        let version = self.version;
        let consistency = self.consistency;
        let w = self.worker(worker)?;
        w.last_seen = Some(now);
        if base > version || (consistency == Consistency::Sync && base != version) {
            return Err(ShardError::Stale { base, version });
        }
        // `step` comes off the wire: a push for the last step there is must not wrap (or,
        // with overflow checks, panic while the shard's lock is held).
        w.clock = w.clock.max(step.saturating_add(1));
        Ok(())
    }

    /// A worker's gradient for this shard, computed against `base` at its step `step`.
    pub fn push(
        &mut self,
        worker: u32,
        base: u64,
        step: u64,
        gradient: Vec<f32>,
        now: Instant,
    ) -> Result<PushOutcome, ShardError> {
        if let Some(reason) = &self.failure {
            return Err(ShardError::Failed(reason.clone()));
        }
        let expected = self.params.len();
        if gradient.len() != expected {
            return Err(ShardError::WrongLength {
                expected,
                got: gradient.len(),
            });
        }
        if let Some(index) = gradient.iter().position(|v| !v.is_finite()) {
            return Err(ShardError::NonFinite {
                worker,
                step,
                index,
            });
        }
        self.admit(worker, base, step, now)?;
        let version = self.version;
        match self.consistency {
            Consistency::Sync => {
                if let Some(w) = self.workers.get_mut(worker as usize) {
                    w.pending = Some(gradient);
                }
                match self.try_apply_sync()? {
                    true => Ok(PushOutcome::Applied {
                        version: self.version,
                    }),
                    false => Ok(PushOutcome::Pending),
                }
            }
            Consistency::Async | Consistency::BoundedStaleness(_) => {
                *self.staleness.entry(version - base).or_default() += 1;
                let adjust = self.stale_steps.adjust(version - base);
                self.optimizer.apply_adjusted(
                    params_mut(&mut self.params, &mut self.retired),
                    &gradient,
                    adjust,
                )?;
                self.version += 1;
                self.recycle(gradient);
                Ok(PushOutcome::Applied {
                    version: self.version,
                })
            }
        }
    }

    /// Whether a push is applied on its own as soon as it is in (Async, BoundedStaleness),
    /// rather than summed with the other workers' first (Sync).
    pub fn applies_on_arrival(&self) -> bool {
        self.consistency != Consistency::Sync
    }

    /// A worker's whole gradient as it was received (runs of little-endian values where
    /// they lie, [`ValueRuns`]), applied in place on
    /// `threads` threads without being copied into a vector first. Only a complete push
    /// gets here, so one that breaks off changes nothing. Sync, which sums the gradients
    /// before applying them, copies it and goes on as [`Shard::push`].
    pub fn push_received(
        &mut self,
        worker: u32,
        base: u64,
        step: u64,
        gradient: &impl ValueRuns,
        threads: usize,
        now: Instant,
    ) -> Result<PushOutcome, ShardError> {
        // A tensor that ends inside a value is refused below in every mode: copying only
        // its whole values would take a cut-off push for a complete one.
        if !self.applies_on_arrival() && gradient.is_whole() {
            let mut values = self.take_spare();
            values.clear();
            gradient.extend_into(&mut values);
            return self.push(worker, base, step, values, now);
        }
        if let Some(reason) = &self.failure {
            return Err(ShardError::Failed(reason.clone()));
        }
        let expected = self.params.len();
        if gradient.len() != expected || !gradient.is_whole() {
            return Err(ShardError::WrongLength {
                expected,
                got: gradient.len(),
            });
        }
        if let Some(index) = gradient.first_non_finite() {
            return Err(ShardError::NonFinite {
                worker,
                step,
                index,
            });
        }
        self.admit(worker, base, step, now)?;
        *self.staleness.entry(self.version - base).or_default() += 1;
        let adjust = self.stale_steps.adjust(self.version - base);
        self.optimizer.apply_runs(
            params_mut(&mut self.params, &mut self.retired),
            gradient,
            threads,
            adjust,
        )?;
        self.version += 1;
        Ok(PushOutcome::Applied {
            version: self.version,
        })
    }

    /// Sync: once every worker still training has pushed, applies the mean of the pending
    /// gradients, summed in rank order so the result does not depend on arrival order.
    fn try_apply_sync(&mut self) -> Result<bool, ShardError> {
        if self.consistency != Consistency::Sync {
            return Ok(false);
        }
        let waiting = self.workers.iter().any(|w| !w.done && w.pending.is_none());
        let count = self.workers.iter().filter(|w| w.pending.is_some()).count();
        if waiting || count == 0 {
            return Ok(false);
        }
        // Sum into the lowest rank's buffer (0 + g == g, so this is the plain rank-order sum).
        let mut pending = self.workers.iter_mut().filter_map(|w| w.pending.take());
        let mut sum = pending.next().unwrap_or_default();
        let mut used = Vec::new();
        for g in pending {
            for (s, g) in sum.iter_mut().zip(&g) {
                *s += g;
            }
            used.push(g);
        }
        let scale = 1.0 / count as f32;
        sum.iter_mut().for_each(|s| *s *= scale);
        self.optimizer
            .apply(params_mut(&mut self.params, &mut self.retired), &sum)?;
        self.version += 1;
        for buffer in used.into_iter().chain([sum]) {
            self.recycle(buffer);
        }
        Ok(true)
    }

    /// May `worker`, about to run step `step`, have parameters of at least `min_version`?
    pub fn pull_decision(
        &mut self,
        worker: u32,
        min_version: u64,
        step: u64,
        now: Instant,
    ) -> Result<PullDecision, ShardError> {
        if let Some(reason) = &self.failure {
            return Ok(PullDecision::Failed(reason.clone()));
        }
        let version = self.version;
        let w = self.worker(worker)?;
        w.last_seen = Some(now);
        // Pulling for step t means t steps are done.
        w.clock = w.clock.max(step);
        // Steps and versions come off the wire: no value may wrap an addition here.
        if min_version > version.saturating_add(1) {
            return Ok(PullDecision::Restarted { version });
        }
        match self.consistency {
            Consistency::Sync if version < min_version => Ok(PullDecision::Wait),
            Consistency::Sync | Consistency::Async => Ok(PullDecision::Ready),
            Consistency::BoundedStaleness(s) => {
                let slowest = self
                    .workers
                    .iter()
                    .filter(|w| !w.done && !w.dead)
                    .map(|w| w.clock)
                    .min();
                match slowest {
                    Some(slowest) if step > slowest.saturating_add(s) => Ok(PullDecision::Wait),
                    _ => Ok(PullDecision::Ready),
                }
            }
        }
    }

    /// Marks workers silent for longer than `timeout` dead (never-registered ones get
    /// `startup` from the shard's start). Returns the newly dead. Sync holds the step for
    /// a dead worker, so that its replacement can register again; it fails the job, with
    /// a message naming the worker, once one has been silent for longer than `grace` (or
    /// never registered within `startup`).
    pub fn check_liveness(
        &mut self,
        now: Instant,
        timeout: Duration,
        grace: Duration,
        startup: Duration,
        addresses: &[String],
    ) -> Vec<u32> {
        let mut newly_dead = Vec::new();
        for (i, w) in self.workers.iter_mut().enumerate() {
            if w.done || w.dead {
                continue;
            }
            let silent = match w.last_seen {
                Some(seen) => now.saturating_duration_since(seen) > timeout,
                None => now.saturating_duration_since(self.started) > startup,
            };
            if silent {
                w.dead = true;
                newly_dead.push(i as u32);
            }
        }
        if self.consistency == Consistency::Sync && self.failure.is_none() {
            let lost = self.workers.iter().position(|w| {
                w.dead
                    && !w.done
                    && (!w.registered
                        || w.last_seen
                            .is_some_and(|seen| now.saturating_duration_since(seen) > grace))
            });
            if let Some(first) = lost {
                let address = addresses.get(first).map_or("?", String::as_str);
                let what = if self.workers[first].registered {
                    format!(
                        "sent nothing for more than {:.0}s (spec.training.consistency.workerGracePeriodSeconds) and no replacement registered",
                        grace.as_secs_f64()
                    )
                } else {
                    format!("never registered within {:.0}s", startup.as_secs_f64())
                };
                self.failure = Some(format!(
                    "worker {first} ({address}) {what}; Sync training cannot continue without it"
                ));
            }
        }
        newly_dead
    }

    /// Sets the failure reason (used when the PS itself gives up).
    pub fn fail(&mut self, reason: String) {
        self.failure.get_or_insert(reason);
    }
}

/// The parameters, to update in place. If a pull is still sending this version, the update
/// goes to a copy, in the buffer of an earlier version that no pull holds any more (memory
/// touched before: no page faults), and the pull keeps the version it is sending.
fn params_mut<'a>(
    params: &'a mut Arc<Vec<f32>>,
    retired: &mut Vec<Arc<Vec<f32>>>,
) -> &'a mut [f32] {
    if Arc::get_mut(params).is_none() {
        let mut copy = take_unshared(retired);
        copy.clear();
        copy.extend_from_slice(params);
        let sent = std::mem::replace(params, Arc::new(copy));
        // Two cover the pulls of one version in flight while the next is applied; more
        // would only hold memory.
        if retired.len() < 2 {
            retired.push(sent);
        }
    }
    Arc::get_mut(params)
        .map(Vec::as_mut_slice)
        .unwrap_or_default()
}

/// The buffer of a retired version that no pull holds any more (empty if none).
fn take_unshared(retired: &mut Vec<Arc<Vec<f32>>>) -> Vec<f32> {
    match retired.iter().position(|v| Arc::strong_count(v) == 1) {
        Some(i) => Arc::try_unwrap(retired.swap_remove(i)).unwrap_or_default(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests;
