//! PURE pipeline planning: the FLOP-balanced partition of layers into stages, the order
//! in which a stage runs its forward and backward passes, and the stash of activations
//! waiting for their backward pass. No I/O: the gRPC stage is a shell around these.

use std::collections::BTreeMap;
use std::ops::Range;

use kubetrain_api::PipelineSchedule;

/// Cuts layers with costs `flops` into `stages` contiguous, non-empty runs so that the
/// most expensive stage is as cheap as possible (the pipeline runs at the pace of its
/// slowest stage). Ties go to the earliest cut, so every process derives the same plan.
pub fn partition(flops: &[u64], stages: usize) -> Result<Vec<Range<usize>>, String> {
    let layers = flops.len();
    if stages == 0 || stages > layers {
        return Err(format!(
            "{stages} pipeline stages cannot be cut from {layers} layer(s): use between 1 and {layers} workers"
        ));
    }
    let prefix: Vec<u64> = std::iter::once(0)
        .chain(flops.iter().scan(0u64, |sum, &f| {
            *sum += f;
            Some(*sum)
        }))
        .collect();
    let cost = |a: usize, b: usize| prefix[b] - prefix[a];
    // best[k][j]: the smallest possible maximum stage cost of layers 0..j in k stages;
    // cut[k][j]: where the last of those k stages starts.
    let mut best = vec![vec![u64::MAX; layers + 1]; stages + 1];
    let mut cut = vec![vec![0usize; layers + 1]; stages + 1];
    best[0][0] = 0;
    for k in 1..=stages {
        for j in k..=layers {
            for i in (k - 1)..j {
                if best[k - 1][i] == u64::MAX {
                    continue;
                }
                let candidate = best[k - 1][i].max(cost(i, j));
                if candidate < best[k][j] {
                    best[k][j] = candidate;
                    cut[k][j] = i;
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(stages);
    let mut end = layers;
    for k in (1..=stages).rev() {
        let start = cut[k][end];
        ranges.push(start..end);
        end = start;
    }
    ranges.reverse();
    Ok(ranges)
}

/// Micro-batch sizes of a batch: as equal as possible, the first ones one larger.
pub fn micro_batch_sizes(batch: usize, micro_batches: usize) -> Vec<usize> {
    let m = micro_batches.clamp(1, batch.max(1));
    (0..m)
        .map(|i| batch / m + usize::from(i < batch % m))
        .collect()
}

/// One unit of a stage's work within a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Forward(usize),
    Backward(usize),
}

/// The order in which `stage` (of `stages`) runs the passes of `micro` micro-batches in
/// one step. Every schedule ends with all backwards done, then the synchronous update.
///
/// - GPipe: all forwards, then all backwards.
/// - 1F1B (PipeDream-Flush): `stages - stage - 1` warm-up forwards, then alternate one
///   forward and one backward, then drain. A stage holds at most `stages - stage`
///   micro-batches' activations, never more than K.
pub fn actions(kind: PipelineSchedule, stages: usize, stage: usize, micro: usize) -> Vec<Action> {
    let mut out = Vec::with_capacity(2 * micro);
    match kind {
        PipelineSchedule::GPipe => {
            out.extend((0..micro).map(Action::Forward));
            out.extend((0..micro).map(Action::Backward));
        }
        PipelineSchedule::OneForwardOneBackward => {
            let warmup = stages.saturating_sub(stage + 1).min(micro);
            out.extend((0..warmup).map(Action::Forward));
            for m in warmup..micro {
                out.push(Action::Forward(m));
                out.push(Action::Backward(m - warmup));
            }
            out.extend((micro - warmup..micro).map(Action::Backward));
        }
    }
    out
}

/// A pass arrived or was asked for out of order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StashError {
    #[error("micro-batch {0} was forwarded twice in one step")]
    Duplicate(usize),
    #[error("backward of micro-batch {0} before its forward")]
    Missing(usize),
    #[error("step ended with micro-batches {0:?} still waiting for their backward pass")]
    Unfinished(Vec<usize>),
}

/// Activations kept between a micro-batch's forward and backward passes, with the peak
/// count (the memory bound 1F1B exists for).
#[derive(Debug, Clone)]
pub struct Stash<T> {
    slots: BTreeMap<usize, T>,
    peak: usize,
}

impl<T> Default for Stash<T> {
    fn default() -> Self {
        Self {
            slots: BTreeMap::new(),
            peak: 0,
        }
    }
}

impl<T> Stash<T> {
    pub fn put(&mut self, micro: usize, value: T) -> Result<(), StashError> {
        if self.slots.contains_key(&micro) {
            return Err(StashError::Duplicate(micro));
        }
        self.slots.insert(micro, value);
        self.peak = self.peak.max(self.slots.len());
        Ok(())
    }

    pub fn take(&mut self, micro: usize) -> Result<T, StashError> {
        self.slots.remove(&micro).ok_or(StashError::Missing(micro))
    }

    /// Checks the step left nothing behind.
    pub fn finish_step(&self) -> Result<(), StashError> {
        if self.slots.is_empty() {
            Ok(())
        } else {
            Err(StashError::Unfinished(self.slots.keys().copied().collect()))
        }
    }

    /// The most activations ever held at once.
    pub fn peak(&self) -> usize {
        self.peak
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// What an idealised run of a schedule looks like: every forward costs `forward`, every
/// backward `backward`, messages are free. The benchmark prints it next to the measured
/// numbers; the tests use it to prove the schedules never deadlock.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulation {
    /// Time from the first action to the last, the same for every stage (the flush).
    pub makespan: f64,
    pub idle_fraction: Vec<f64>,
    pub peak_stash: Vec<usize>,
}

/// Plays one step of the schedule on `stages` stages. Err when the stages' orders
/// deadlock (one waits for a pass its neighbour will only run later).
pub fn simulate(
    kind: PipelineSchedule,
    stages: usize,
    micro: usize,
    forward: f64,
    backward: f64,
) -> Result<Simulation, String> {
    let orders: Vec<Vec<Action>> = (0..stages)
        .map(|s| actions(kind, stages, s, micro))
        .collect();
    let mut next = vec![0usize; stages];
    let mut clock = vec![0.0f64; stages];
    let mut done_f = vec![vec![None::<f64>; micro]; stages];
    let mut done_b = vec![vec![None::<f64>; micro]; stages];
    let mut stashes: Vec<Stash<()>> = (0..stages).map(|_| Stash::default()).collect();
    loop {
        let mut progressed = false;
        for s in 0..stages {
            while let Some(&action) = orders[s].get(next[s]) {
                let ready = match action {
                    Action::Forward(_) if s == 0 => Some(0.0),
                    Action::Forward(m) => done_f[s - 1][m],
                    Action::Backward(m) if s == stages - 1 => done_f[s][m],
                    Action::Backward(m) => done_b[s + 1][m],
                };
                let Some(ready) = ready else { break };
                let start = clock[s].max(ready);
                match action {
                    Action::Forward(m) => {
                        clock[s] = start + forward;
                        done_f[s][m] = Some(clock[s]);
                        stashes[s].put(m, ()).map_err(|e| e.to_string())?;
                    }
                    Action::Backward(m) => {
                        clock[s] = start + backward;
                        done_b[s][m] = Some(clock[s]);
                        stashes[s].take(m).map_err(|e| e.to_string())?;
                    }
                }
                next[s] += 1;
                progressed = true;
            }
        }
        if next.iter().zip(&orders).all(|(n, o)| *n == o.len()) {
            break;
        }
        if !progressed {
            return Err(format!(
                "{kind:?} with {stages} stages and {micro} micro-batches deadlocks at {next:?}"
            ));
        }
    }
    let makespan = clock.iter().copied().fold(0.0, f64::max);
    let busy = micro as f64 * (forward + backward);
    Ok(Simulation {
        makespan,
        idle_fraction: (0..stages).map(|_| 1.0 - busy / makespan).collect(),
        peak_stash: stashes.iter().map(Stash::peak).collect(),
    })
}

/// GPipe's bubble: the idle share of every stage with equal stage costs.
pub fn gpipe_bubble(stages: usize, micro: usize) -> f64 {
    (stages as f64 - 1.0) / (micro as f64 + stages as f64 - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use PipelineSchedule::{GPipe, OneForwardOneBackward as OneFOneB};

    #[test]
    fn partition_balances_flops_and_covers_every_layer() {
        assert_eq!(partition(&[10, 10, 1], 2).unwrap(), vec![0..1, 1..3]);
        assert_eq!(partition(&[1, 10, 10], 2).unwrap(), vec![0..2, 2..3]);
        assert_eq!(
            partition(&[5, 5, 5, 5], 4).unwrap(),
            vec![0..1, 1..2, 2..3, 3..4]
        );
        assert_eq!(partition(&[1, 1, 1, 9], 2).unwrap(), vec![0..3, 3..4]);
        assert_eq!(partition(&[7], 1).unwrap(), vec![0..1]);
        assert!(partition(&[1, 2], 3).is_err());
        assert!(partition(&[1, 2], 0).is_err());
        // Exhaustive check against brute force on small cases.
        let flops = [3u64, 9, 2, 7, 4, 4];
        for k in 1..=flops.len() {
            let got = partition(&flops, k).unwrap();
            let max_of = |r: &[Range<usize>]| {
                r.iter()
                    .map(|r| flops[r.clone()].iter().sum::<u64>())
                    .max()
                    .unwrap()
            };
            let mut best = u64::MAX;
            for mask in 0u32..(1 << (flops.len() - 1)) {
                if mask.count_ones() as usize != k - 1 {
                    continue;
                }
                let mut cuts = vec![0];
                cuts.extend((1..flops.len()).filter(|i| mask & (1 << (i - 1)) != 0));
                cuts.push(flops.len());
                let ranges: Vec<_> = cuts.windows(2).map(|w| w[0]..w[1]).collect();
                best = best.min(max_of(&ranges));
            }
            assert_eq!(max_of(&got), best, "k={k}: {got:?}");
            assert_eq!(got.len(), k);
            assert!(got.iter().all(|r| !r.is_empty()));
            assert_eq!((got[0].start, got[k - 1].end), (0, flops.len()));
        }
    }

    #[test]
    fn micro_batches_split_evenly() {
        assert_eq!(micro_batch_sizes(10, 4), vec![3, 3, 2, 2]);
        assert_eq!(micro_batch_sizes(8, 1), vec![8]);
        assert_eq!(micro_batch_sizes(3, 8), vec![1, 1, 1]);
    }

    #[test]
    fn every_micro_batch_runs_forward_then_backward_exactly_once() {
        for kind in [GPipe, OneFOneB] {
            for stages in 1..=5 {
                for micro in 1..=9 {
                    for stage in 0..stages {
                        let order = actions(kind, stages, stage, micro);
                        assert_eq!(order.len(), 2 * micro);
                        let mut stash = Stash::default();
                        for a in order {
                            match a {
                                Action::Forward(m) => stash.put(m, ()).unwrap(),
                                Action::Backward(m) => stash.take(m).unwrap(),
                            }
                        }
                        stash.finish_step().unwrap();
                        let bound = match kind {
                            GPipe => micro,
                            OneFOneB => (stages - stage).min(micro),
                        };
                        assert_eq!(stash.peak(), bound, "{kind:?} {stage}/{stages} M={micro}");
                    }
                }
            }
        }
    }

    #[test]
    fn schedules_never_deadlock_and_gpipe_meets_its_bubble() {
        for kind in [GPipe, OneFOneB] {
            for stages in 1..=5 {
                for micro in [1, 2, 4, 8, 16] {
                    let sim = simulate(kind, stages, micro, 1.0, 2.0).unwrap();
                    assert!(sim.peak_stash.iter().all(|&p| p <= micro));
                    if kind == OneFOneB {
                        assert!(sim.peak_stash.iter().all(|&p| p <= stages));
                    }
                    // Both flush every step, so both have exactly GPipe's bubble when
                    // stages cost the same.
                    for idle in &sim.idle_fraction {
                        assert!(
                            (idle - gpipe_bubble(stages, micro)).abs() < 1e-9,
                            "{kind:?} K={stages} M={micro}: {idle}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn stash_rejects_out_of_order_passes() {
        let mut s = Stash::default();
        assert_eq!(s.take(0), Err(StashError::Missing(0)));
        s.put(1, "a").unwrap();
        assert_eq!(s.put(1, "b"), Err(StashError::Duplicate(1)));
        assert_eq!(s.finish_step(), Err(StashError::Unfinished(vec![1])));
        assert_eq!(s.take(1), Ok("a"));
        assert!(s.is_empty());
    }
}
