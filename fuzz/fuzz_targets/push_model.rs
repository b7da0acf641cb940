//! The consistency rules as the design states them, written out plainly for the `push`
//! target to hold the shard to: per worker what the shard knows (registered, last seen,
//! clock, done, dead, a pending Sync gradient), and the answers that follow.

use std::time::{Duration, Instant};

use kubetrain_trainer::consistency::Consistency;
use kubetrain_trainer::ps::{PullDecision, ShardError};

#[derive(Debug, Clone, Default)]
struct Worker {
    registered: bool,
    seen: Option<Instant>,
    clock: u64,
    done: bool,
    dead: bool,
    pending: Option<Vec<f32>>,
}

/// What a push does by the rules.
#[derive(Debug)]
pub enum Pushed {
    Pending,
    /// The shard moves on by this gradient (Sync: the mean of the step's).
    Applied(Vec<f32>),
}

/// What a liveness check does by the rules.
pub struct Liveness {
    pub newly_dead: Vec<u32>,
    /// Sync: the worker the job failed for, by this check.
    pub failed: Option<u32>,
    pub already_failed: bool,
}

pub struct Model {
    version: u64,
    consistency: Consistency,
    workers: Vec<Worker>,
    len: usize,
    failed: bool,
    started: Instant,
    applied_on_arrival: u64,
}

impl Model {
    pub fn new(
        version: u64,
        consistency: Consistency,
        workers: usize,
        len: usize,
        now: Instant,
    ) -> Self {
        Self {
            version,
            consistency,
            workers: vec![Worker::default(); workers],
            len,
            failed: false,
            started: now,
            applied_on_arrival: 0,
        }
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn failed(&self) -> bool {
        self.failed
    }

    pub fn applied_on_arrival(&self) -> u64 {
        self.applied_on_arrival
    }

    pub fn done_and_dead(&self) -> (Vec<u32>, Vec<u32>) {
        let which = |f: fn(&Worker) -> bool| {
            (0..self.workers.len() as u32)
                .filter(|&i| f(&self.workers[i as usize]))
                .collect()
        };
        (which(|w| w.done), which(|w| w.dead))
    }

    fn worker(&mut self, worker: u32) -> Result<&mut Worker, ShardError> {
        let workers = self.workers.len();
        self.workers
            .get_mut(worker as usize)
            .ok_or(ShardError::UnknownWorker { worker, workers })
    }

    pub fn touch(&mut self, worker: u32, now: Instant) -> Result<(), ShardError> {
        self.worker(worker)?.seen = Some(now);
        Ok(())
    }

    /// A (re)started worker is alive and training; in Sync it resumes at the held step,
    /// one past it if its gradient for it is in.
    pub fn register(&mut self, worker: u32, now: Instant) -> Result<u64, ShardError> {
        let (version, sync) = (self.version, self.consistency == Consistency::Sync);
        let w = self.worker(worker)?;
        (w.registered, w.seen, w.dead, w.done) = (true, Some(now), false, false);
        if sync {
            w.clock = version + u64::from(w.pending.is_some());
        }
        Ok(w.clock)
    }

    pub fn done(&mut self, worker: u32, now: Instant) -> Result<Option<Vec<f32>>, ShardError> {
        let w = self.worker(worker)?;
        (w.done, w.seen) = (true, Some(now));
        Ok(self.complete_sync())
    }

    pub fn fail(&mut self) {
        self.failed = true;
    }

    /// Refusals in the order the shard checks: a failed job, the length, non-finite
    /// values, then the worker and its base version.
    pub fn push(
        &mut self,
        worker: u32,
        base: u64,
        step: u64,
        values: &[f32],
        now: Instant,
    ) -> Result<Pushed, ShardError> {
        if self.failed {
            return Err(ShardError::Failed("the PS gave up".into()));
        }
        if values.len() != self.len {
            return Err(ShardError::WrongLength {
                expected: self.len,
                got: values.len(),
            });
        }
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(ShardError::NonFinite {
                worker,
                step,
                index,
            });
        }
        let (version, sync) = (self.version, self.consistency == Consistency::Sync);
        let w = self.worker(worker)?;
        w.seen = Some(now);
        if base > version || (sync && base != version) {
            return Err(ShardError::Stale { base, version });
        }
        // Having pushed step t, the worker has done t + 1 steps (none past the last one).
        w.clock = w.clock.max(step.saturating_add(1));
        if sync {
            w.pending = Some(values.to_vec());
            return Ok(match self.complete_sync() {
                Some(mean) => Pushed::Applied(mean),
                None => Pushed::Pending,
            });
        }
        self.version += 1;
        self.applied_on_arrival += 1;
        Ok(Pushed::Applied(values.to_vec()))
    }

    /// Sync: once every worker still training has its gradient in, the step's mean,
    /// summed in rank order.
    fn complete_sync(&mut self) -> Option<Vec<f32>> {
        if self.consistency != Consistency::Sync {
            return None;
        }
        let waiting = self.workers.iter().any(|w| !w.done && w.pending.is_none());
        let count = self.workers.iter().filter(|w| w.pending.is_some()).count();
        if waiting || count == 0 {
            return None;
        }
        let mut sum = vec![0.0f32; self.len];
        for g in self.workers.iter_mut().filter_map(|w| w.pending.take()) {
            sum.iter_mut().zip(&g).for_each(|(s, g)| *s += g);
        }
        let scale = 1.0 / count as f32;
        sum.iter_mut().for_each(|s| *s *= scale);
        self.version += 1;
        Some(sum)
    }

    pub fn pull(
        &mut self,
        worker: u32,
        min_version: u64,
        step: u64,
        now: Instant,
    ) -> Result<PullDecision, ShardError> {
        if self.failed {
            return Ok(PullDecision::Failed(String::new()));
        }
        let version = self.version;
        let w = self.worker(worker)?;
        w.seen = Some(now);
        // About to run step t: t steps are done.
        w.clock = w.clock.max(step);
        if min_version > version.saturating_add(1) {
            return Ok(PullDecision::Restarted { version });
        }
        Ok(match self.consistency {
            Consistency::Sync if version < min_version => PullDecision::Wait,
            Consistency::Sync | Consistency::Async => PullDecision::Ready,
            Consistency::BoundedStaleness(s) => {
                let slowest = self
                    .workers
                    .iter()
                    .filter(|w| !w.done && !w.dead)
                    .map(|w| w.clock)
                    .min();
                // More than `s` steps ahead of the slowest live worker waits for it.
                match slowest {
                    Some(slowest) if u128::from(step) > u128::from(slowest) + u128::from(s) => {
                        PullDecision::Wait
                    }
                    _ => PullDecision::Ready,
                }
            }
        })
    }

    pub fn liveness(
        &mut self,
        now: Instant,
        timeout: Duration,
        grace: Duration,
        startup: Duration,
    ) -> Liveness {
        let started = self.started;
        let mut newly_dead = Vec::new();
        for (i, w) in self.workers.iter_mut().enumerate() {
            let silent = match w.seen {
                Some(seen) => now.saturating_duration_since(seen) > timeout,
                None => now.saturating_duration_since(started) > startup,
            };
            if !w.done && !w.dead && silent {
                w.dead = true;
                newly_dead.push(i as u32);
            }
        }
        let already_failed = self.failed;
        let mut failed = None;
        if self.consistency == Consistency::Sync && !self.failed {
            // Sync holds the step for a dead worker until its grace runs out (or it never
            // registered at all); then the job fails, naming the first such worker.
            failed = self
                .workers
                .iter()
                .position(|w| {
                    w.dead
                        && !w.done
                        && (!w.registered
                            || w.seen
                                .is_some_and(|seen| now.saturating_duration_since(seen) > grace))
                })
                .map(|i| i as u32);
            self.failed = failed.is_some();
        }
        Liveness {
            newly_dead,
            failed,
            already_failed,
        }
    }
}
