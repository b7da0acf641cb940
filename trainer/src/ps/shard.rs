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
mod tests {
    use kubetrain_api::{OptimizerKind, OptimizerSpec};

    use crate::parameter_transfer::received::ReceivedTensor;

    use super::*;

    fn shard(consistency: Consistency, workers: usize) -> (Shard, Instant) {
        let spec = OptimizerSpec {
            kind: OptimizerKind::Sgd,
            learning_rate: 1.0,
            momentum: None,
            beta1: None,
            beta2: None,
            epsilon: None,
        };
        let now = Instant::now();
        let opt = Optimizer::new(&spec, 2);
        (
            Shard::new(10, vec![0.0, 0.0], opt, 0, consistency, workers, now),
            now,
        )
    }

    #[test]
    fn sync_applies_the_rank_ordered_mean_once_all_pushed() {
        let (mut s, now) = shard(Consistency::Sync, 2);
        assert_eq!(
            s.push(1, 0, 0, vec![1.0, 2.0], now),
            Ok(PushOutcome::Pending)
        );
        assert_eq!(s.pull_decision(1, 1, 1, now), Ok(PullDecision::Wait));
        assert_eq!(
            s.push(0, 0, 0, vec![3.0, 4.0], now),
            Ok(PushOutcome::Applied { version: 1 })
        );
        assert_eq!(s.params(), &[-2.0, -3.0]);
        assert_eq!(s.pull_decision(1, 1, 1, now), Ok(PullDecision::Ready));
        // A gradient for an old version is refused, not silently mixed in.
        assert_eq!(
            s.push(0, 0, 0, vec![1.0, 1.0], now),
            Err(ShardError::Stale {
                base: 0,
                version: 1
            })
        );
    }

    #[test]
    fn sync_continues_without_workers_that_are_done() {
        let (mut s, now) = shard(Consistency::Sync, 2);
        s.mark_done(1, now).unwrap();
        assert_eq!(
            s.push(0, 0, 0, vec![1.0, 1.0], now),
            Ok(PushOutcome::Applied { version: 1 })
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        let (mut s, now) = shard(Consistency::Async, 2);
        assert!(matches!(
            s.push(0, 0, 0, vec![1.0], now),
            Err(ShardError::WrongLength { .. })
        ));
        assert!(matches!(
            s.push(5, 0, 0, vec![1.0, 1.0], now),
            Err(ShardError::UnknownWorker { .. })
        ));
        assert!(matches!(
            s.register(9, now),
            Err(ShardError::UnknownWorker { .. })
        ));
        assert!(matches!(
            s.push(0, 3, 0, vec![1.0, 1.0], now),
            Err(ShardError::Stale { .. })
        ));
        assert_eq!(
            s.pull_decision(0, 7, 0, now),
            Ok(PullDecision::Restarted { version: 0 })
        );
    }

    fn momentum_shard(workers: usize) -> Shard {
        let spec = OptimizerSpec {
            kind: OptimizerKind::Sgd,
            learning_rate: 0.5,
            momentum: Some(0.9),
            beta1: None,
            beta2: None,
            epsilon: None,
        };
        Shard::new(
            0,
            vec![1.0, 2.0, 3.0],
            Optimizer::new(&spec, 3),
            0,
            Consistency::Async,
            workers,
            Instant::now(),
        )
    }

    /// `values` as received in two pieces, the cut inside a value.
    fn wire(values: &[f32]) -> ReceivedTensor {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut wire = ReceivedTensor::default();
        wire.push(bytes::Bytes::copy_from_slice(&bytes[..5]));
        wire.push(bytes::Bytes::copy_from_slice(&bytes[5..]));
        wire
    }

    #[test]
    fn wire_pushes_equal_plain_ones() {
        let now = Instant::now();
        let (g1, g2) = (vec![1.0, -1.0, 0.5], vec![0.25, 2.0, -3.0]);
        let mut s = momentum_shard(2);
        assert_eq!(
            s.push_received(1, 0, 0, &wire(&g2), 2, now),
            Ok(PushOutcome::Applied { version: 1 })
        );
        assert_eq!(
            s.push_received(0, 0, 0, &wire(&g1), 1, now),
            Ok(PushOutcome::Applied { version: 2 })
        );
        let mut plain = momentum_shard(2);
        plain.push(1, 0, 0, g2.clone(), now).unwrap();
        plain.push(0, 0, 0, g1.clone(), now).unwrap();
        assert_eq!(s.params(), plain.params());
        assert_eq!(s.optimizer(), plain.optimizer());
        assert_eq!(s.staleness_histogram(), plain.staleness_histogram());
        // Sync sums it with the others' first, as a plain push.
        let (mut sync, _) = shard(Consistency::Sync, 1);
        assert_eq!(
            sync.push_received(0, 0, 0, &wire(&[1.0, 2.0]), 2, now),
            Ok(PushOutcome::Applied { version: 1 })
        );
        assert_eq!(sync.params(), &[-1.0, -2.0]);
    }

    #[test]
    fn a_refused_wire_push_changes_nothing() {
        let now = Instant::now();
        let mut s = momentum_shard(1);
        let before = (s.params().to_vec(), s.optimizer().clone());
        assert!(matches!(
            s.push_received(0, 0, 0, &wire(&[1.0, 1.0]), 1, now),
            Err(ShardError::WrongLength { .. })
        ));
        assert!(matches!(
            s.push_received(0, 4, 0, &wire(&[1.0; 3]), 1, now),
            Err(ShardError::Stale { .. })
        ));
        assert!(matches!(
            s.push_received(3, 0, 0, &wire(&[1.0; 3]), 1, now),
            Err(ShardError::UnknownWorker { .. })
        ));
        assert_eq!((s.params().to_vec(), s.optimizer().clone()), before);
        assert_eq!(s.version(), 0);
    }

    #[test]
    fn a_wire_push_cut_inside_a_value_is_refused_in_sync_too() {
        // Found by `fuzz/` (target `push`): Sync copied the whole values and dropped the rest.
        let now = Instant::now();
        let (mut s, _) = shard(Consistency::Sync, 1);
        let mut cut = wire(&[1.0, 2.0]);
        cut.push(bytes::Bytes::from_static(&[0x3f]));
        assert_eq!(
            s.push_received(0, 0, 0, &cut, 1, now),
            Err(ShardError::WrongLength {
                expected: 2,
                got: 2
            })
        );
        assert_eq!((s.version(), s.params()), (0, &[0.0, 0.0][..]));
        // Nothing of it is pending: the next whole push completes the step on its own.
        assert_eq!(
            s.push_received(0, 0, 0, &wire(&[1.0, 2.0]), 1, now),
            Ok(PushOutcome::Applied { version: 1 })
        );
        assert_eq!(s.params(), &[-1.0, -2.0]);
    }

    #[test]
    fn a_non_finite_gradient_is_refused_naming_the_worker_and_changes_nothing() {
        let now = Instant::now();
        for consistency in [
            Consistency::Sync,
            Consistency::Async,
            Consistency::BoundedStaleness(1),
        ] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut s = momentum_shard(2);
                s.consistency = consistency;
                let before = (s.params().to_vec(), s.optimizer().clone());
                let refused = ShardError::NonFinite {
                    worker: 1,
                    step: 0,
                    index: 2,
                };
                assert_eq!(
                    s.push(1, 0, 0, vec![1.0, 0.5, bad], now),
                    Err(refused.clone())
                );
                assert_eq!(
                    s.push_received(1, 0, 0, &wire(&[1.0, 0.5, bad]), 1, now),
                    Err(refused.clone())
                );
                assert!(refused.to_string().starts_with("worker 1 pushed"));
                assert_eq!((s.params().to_vec(), s.optimizer().clone()), before);
                assert_eq!(s.version(), 0);
                // The refused worker's clock did not move: in Sync nothing is pending from it,
                // so worker 0 alone cannot complete the step.
                if consistency == Consistency::Sync {
                    assert_eq!(s.push(0, 0, 0, vec![1.0; 3], now), Ok(PushOutcome::Pending));
                }
            }
        }
    }

    #[test]
    fn a_pull_in_flight_keeps_its_version_and_its_buffer_is_reused() {
        let now = Instant::now();
        let mut s = momentum_shard(1);
        let sent = s.snapshot();
        s.push_received(0, 0, 0, &wire(&[1.0; 3]), 1, now).unwrap();
        // The pull still sends version 0, unchanged; the shard moved on in a copy.
        assert_eq!(*sent, vec![1.0, 2.0, 3.0]);
        assert_eq!(s.params(), &[0.5, 1.5, 2.5]);
        let sent_at = sent.as_ptr();
        drop(sent);
        // Another pull in flight: the next update's copy goes to version 0's buffer.
        let second = s.snapshot();
        s.push(0, 1, 1, vec![1.0; 3], now).unwrap();
        assert_eq!(s.params().as_ptr(), sent_at);
        assert_eq!(*second, vec![0.5, 1.5, 2.5]);
        let mut plain = momentum_shard(1);
        plain.push(0, 0, 0, vec![1.0; 3], now).unwrap();
        plain.push(0, 1, 1, vec![1.0; 3], now).unwrap();
        assert_eq!(s.params(), plain.params());
    }

    #[test]
    fn a_stale_gradient_gives_up_the_momentum_asynchrony_adds_unless_told_to_apply_it() {
        // Worker 0's push is fresh; worker 1's, against the same version, is one behind.
        let second_step = |policy| {
            let now = Instant::now();
            let mut s = momentum_shard(2).with_stale_gradients(policy);
            s.push(0, 0, 0, vec![1.0; 3], now).unwrap();
            let after_first = s.params()[0];
            s.push(1, 0, 0, vec![1.0; 3], now).unwrap();
            (after_first, after_first - s.params()[0])
        };
        // lr 0.5, momentum 0.9: the fresh update is 0.5 in every policy.
        let (first, applied) = second_step(StaleGradients::Apply);
        assert_eq!(first, 0.5);
        assert!((applied - 0.5 * 1.9).abs() < 1e-6, "{applied}");
        // Two workers leave updates about one behind: asynchrony's momentum is about 1/2,
        // and the velocity keeps only about 0.4 of its 1.0.
        let (first, corrected) = second_step(StaleGradients::CorrectMomentum);
        assert_eq!(first, 0.5);
        assert!((corrected - 0.5 * 1.4).abs() < 0.01, "{corrected}");
        let (_, scaled) = second_step(StaleGradients::ScaleLearningRate);
        assert!((scaled - 0.25 * 1.9).abs() < 1e-6, "{scaled}");
        // The default is the one that converges at Sync's settings.
        assert_eq!(StaleGradients::default(), StaleGradients::CorrectMomentum);
    }

    #[test]
    fn async_records_staleness() {
        let (mut s, now) = shard(Consistency::Async, 2);
        s.push(0, 0, 0, vec![1.0, 1.0], now).unwrap();
        s.push(1, 0, 0, vec![1.0, 1.0], now).unwrap();
        s.push(0, 2, 1, vec![1.0, 1.0], now).unwrap();
        assert_eq!(
            s.staleness_histogram()
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect::<Vec<_>>(),
            vec![(0, 2), (1, 1)]
        );
    }

    #[test]
    fn bounded_staleness_holds_back_the_fastest() {
        let (mut s, now) = shard(Consistency::BoundedStaleness(1), 2);
        for step in 0..2 {
            assert_eq!(s.pull_decision(0, 0, step, now), Ok(PullDecision::Ready));
            s.push(0, s.version(), step, vec![0.0, 0.0], now).unwrap();
        }
        // Worker 0 has done 2 steps, worker 1 none: step 2 is 2 ahead of the slowest.
        assert_eq!(s.pull_decision(0, 0, 2, now), Ok(PullDecision::Wait));
        s.push(1, s.version(), 0, vec![0.0, 0.0], now).unwrap();
        assert_eq!(s.pull_decision(0, 0, 2, now), Ok(PullDecision::Ready));
        // A finished worker no longer holds anyone back.
        s.mark_done(1, now).unwrap();
        assert_eq!(s.pull_decision(0, 0, 9, now), Ok(PullDecision::Ready));
    }

    #[test]
    fn a_step_at_the_end_of_the_range_wraps_nothing() {
        let (mut s, now) = shard(Consistency::BoundedStaleness(2), 2);
        // A rogue pull claims both workers are at the last step there is. The first is
        // held back by the second, which is still at 0.
        assert_eq!(s.pull_decision(0, 0, u64::MAX, now), Ok(PullDecision::Wait));
        assert_eq!(
            s.pull_decision(1, 0, u64::MAX, now),
            Ok(PullDecision::Ready)
        );
        // slowest + staleness once wrapped to 1, and every later pull waited for good.
        assert_eq!(s.pull_decision(0, 0, 5, now), Ok(PullDecision::Ready));
        assert_eq!(
            s.pull_decision(0, u64::MAX, 5, now),
            Ok(PullDecision::Restarted { version: 0 })
        );
    }

    #[test]
    fn a_push_for_the_last_step_there_is_wraps_nothing() {
        // Found by `fuzz/` (target `push`): `step + 1` overflowed in `admit`.
        for consistency in [
            Consistency::Sync,
            Consistency::Async,
            Consistency::BoundedStaleness(2),
        ] {
            let (mut s, now) = shard(consistency, 2);
            let outcome = s.push(0, 0, u64::MAX, vec![1.0, 1.0], now);
            let expected = match consistency {
                Consistency::Sync => PushOutcome::Pending,
                _ => PushOutcome::Applied { version: 1 },
            };
            assert_eq!(outcome, Ok(expected), "{consistency:?}");
        }
        // The pushing worker's clock stops at the end of the range, so it holds nobody
        // back, and is itself held back by the slowest.
        let (mut s, now) = shard(Consistency::BoundedStaleness(2), 2);
        s.push(0, 0, u64::MAX, vec![1.0, 1.0], now).unwrap();
        assert_eq!(s.pull_decision(1, 0, 2, now), Ok(PullDecision::Ready));
        assert_eq!(s.pull_decision(0, 0, u64::MAX, now), Ok(PullDecision::Wait));
    }

    #[test]
    fn sync_holds_the_step_for_a_silent_worker_and_fails_naming_it_past_the_grace() {
        let (mut s, now) = shard(Consistency::Sync, 2);
        s.register(0, now).unwrap();
        s.register(1, now).unwrap();
        let addrs = vec!["a:1".to_string(), "b:2".to_string()];
        let (timeout, grace, startup) = (
            Duration::from_secs(3),
            Duration::from_secs(120),
            Duration::from_secs(60),
        );
        let at = |secs| now + Duration::from_secs(secs);
        s.touch(0, at(4)).unwrap();
        assert_eq!(
            s.check_liveness(at(4), timeout, grace, startup, &addrs),
            vec![1]
        );
        // Dead, but within the grace: the step waits for worker 1, the job has not failed.
        assert_eq!(s.failure(), None);
        assert_eq!(s.dead_workers(), vec![1]);
        s.touch(0, at(100)).unwrap();
        assert!(
            s.check_liveness(at(100), timeout, grace, startup, &addrs)
                .is_empty()
        );
        assert_eq!(s.failure(), None);
        assert_eq!(s.pull_decision(0, 1, 1, at(100)), Ok(PullDecision::Wait));

        // Past the grace with no replacement, the job fails naming the worker and the field.
        s.touch(0, at(125)).unwrap();
        s.check_liveness(at(125), timeout, grace, startup, &addrs);
        let failure = s.failure().unwrap();
        assert!(failure.contains("worker 1 (b:2)"), "{failure}");
        assert!(failure.contains("workerGracePeriodSeconds"), "{failure}");
        assert!(matches!(
            s.pull_decision(0, 0, 0, now),
            Ok(PullDecision::Failed(_))
        ));
    }

    #[test]
    fn a_replaced_sync_worker_resumes_at_the_held_step_and_the_step_completes() {
        let (mut s, now) = shard(Consistency::Sync, 2);
        let addrs = vec!["a:1".to_string(), "b:2".to_string()];
        let (timeout, grace, startup) = (
            Duration::from_secs(3),
            Duration::from_secs(120),
            Duration::from_secs(60),
        );
        for w in 0..2 {
            s.register(w, now).unwrap();
        }
        // Step 0 completes; worker 1's pull for step 1 (sent beside its push) raises its
        // clock, then worker 0 pushes step 1 and worker 1 dies before its own push lands.
        s.push(0, 0, 0, vec![1.0; 2], now).unwrap();
        s.push(1, 0, 0, vec![1.0; 2], now).unwrap();
        assert_eq!(s.version(), 1);
        assert_eq!(s.pull_decision(1, 2, 2, now), Ok(PullDecision::Wait));
        s.push(0, 1, 1, vec![1.0; 2], now).unwrap();
        let later = now + Duration::from_secs(10);
        s.touch(0, later).unwrap();
        assert_eq!(
            s.check_liveness(later, timeout, grace, startup, &addrs),
            vec![1]
        );
        assert_eq!(s.version(), 1, "the step is held for worker 1");

        // The replacement resumes at step 1, the held one, not at its old clock (2).
        assert_eq!(s.register(1, later), Ok(1));
        assert_eq!(s.pull_decision(1, 1, 1, later), Ok(PullDecision::Ready));
        let outcome = s.push(1, 1, 1, vec![1.0; 2], later).unwrap();
        assert_eq!(outcome, PushOutcome::Applied { version: 2 });
        assert_eq!(s.dead_workers(), Vec::<u32>::new());
        assert_eq!(s.failure(), None);

        // A worker whose gradient was in when it died resumes one step on, and waits for
        // the step to complete before it pulls.
        s.push(1, 2, 2, vec![1.0; 2], later).unwrap();
        assert_eq!(s.register(1, later), Ok(3));
        assert_eq!(s.pull_decision(1, 3, 3, later), Ok(PullDecision::Wait));
        s.push(0, 2, 2, vec![1.0; 2], later).unwrap();
        assert_eq!(s.pull_decision(1, 3, 3, later), Ok(PullDecision::Ready));
    }
}
