//! One stage's training run, in its phases: the stages agree on a plan and a resume step,
//! each loads or initialises its parameters, every step runs the schedule's passes over
//! the micro-batches and one update, and the chief evaluates and ends the job.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kubetrain_api::{PipelineSchedule, PipelineSpec};
use ndarray::Array2;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::info;

use super::peers::{self, Outbound, Peer};
use super::schedule::{self, Action, Stash};
use super::service::{Direction, Mailbox, Shapes, Shared};
use super::{
    EVENT_EVERY, Kept, Plan, StageStats, check_rows, checkpoint_dir, checkpoint_path,
    choose_resume, compute, evaluate, gather, hello_all, make_plan, unless_aborted,
    write_checkpoint, write_stage_events,
};
use crate::checkpoint;
use crate::config::Config;
use crate::data::{self, Batcher, LoadedData, Partition, Schedule};
use crate::error::TrainerError;
use crate::model::{Optimizer, StageModel, as_matrix, divergence};
use crate::parameter_transfer::chunks;
use crate::progress::ProgressState;
use crate::proto::{StagePartition, StartRequest};
use crate::run_log;
use crate::run_setup;
use crate::tensorboard::EventLog;
use crate::termination::Termination;
use crate::worker::WorkerOutcome;

/// The chief's data: the training and test examples and the batch schedule.
type ChiefData = (LoadedData, Schedule);

pub(super) async fn train(
    config: &Config,
    shared: &Arc<Shared>,
    peers: &[Peer],
    mailbox: &mut Mailbox,
    progress: Option<ProgressState>,
    events: &EventLog,
    termination: &Termination,
) -> Result<WorkerOutcome, TrainerError> {
    let (stage, stages) = (shared.stage, shared.stages);
    let training = &config.training;
    let spec = training.pipeline.clone().unwrap_or(PipelineSpec {
        micro_batches: 4,
        schedule: PipelineSchedule::default(),
    });
    let mut abort = shared.abort.subscribe();

    let (start, data) = agree_start(config, shared, peers, &spec, &mut abort, termination).await?;
    let plan = make_plan(&start, stage, stages)?;
    let _ = shared.shapes.set(Shapes {
        input_width: plan.stage.input_width(),
        output_width: plan.stage.output_width(),
        batch: plan.batch,
    });
    announce(stage, stages, &plan, &spec, progress.as_ref());

    let range = plan.stage.param_range();
    let mut optimizer = Optimizer::new(&training.optimizer, range.len());
    let mut params = initial_params(config, stage, stages, &plan, &mut optimizer)?;
    shared.params.send_replace((plan.resume, params.clone()));

    let mut links = Links::open(shared, peers, stage);
    let passes = Passes {
        model: Arc::new(plan.stage.clone()),
        order: schedule::actions(spec.schedule, stages, stage, plan.micro_sizes.len()),
        offsets: offsets(&plan.micro_sizes),
        plan: &plan,
        links: &links,
    };
    let mut batcher = data
        .as_ref()
        .map(|(d, s)| Batcher::new(*s, training.seed, 0, d.train.len()));
    let steps_per_epoch = data.as_ref().map(|(_, s)| s.steps_per_epoch as u64);
    let test = data.as_ref().and_then(|(d, _)| d.test.clone());
    let mut stats = StageStats::default();
    let mut stash: Stash<Kept> = Stash::default();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut tally = Tally::new();
    let every = training
        .checkpoint
        .as_ref()
        .map(|c| u64::from(c.every_steps.max(1)));

    for step in plan.resume..plan.total_steps {
        if let Some(reason) = abort.borrow().clone() {
            return Err(TrainerError::JobFailed(reason));
        }
        if termination.requested() {
            return Err(TrainerError::Terminated { step });
        }
        mailbox.current_step = step;
        if let (Some(progress), Some(test), Some(per)) = (&progress, &test, steps_per_epoch)
            && step > plan.resume
            && step % per == 0
        {
            let full = unless_aborted(&mut abort, gather(peers, &plan, &params, step)).await?;
            let eval = evaluate(&plan.net, full, test).await?;
            progress.evaluated(step, eval.accuracy, eval.loss);
            run_log::epoch_done(step / per, step, eval.accuracy, eval.loss);
        }
        if let (Some((d, _)), Some(b)) = (&data, batcher.as_mut()) {
            x.clear();
            y.clear();
            d.train.gather(b.indices(step), &mut x, &mut y);
        }
        let (grad, loss_sum) = passes
            .run(step, &params, (&x, &y), mailbox, &mut stash, &mut stats)
            .await?;
        stash
            .finish_step()
            .map_err(|e| TrainerError::Compute(e.to_string()))?;
        divergence::check_gradient(step + 1, &grad)?;
        let busy = Instant::now();
        optimizer.apply(Arc::make_mut(&mut params).as_mut_slice(), &grad)?;
        stats.busy += busy.elapsed().as_secs_f64();
        shared.params.send_replace((step + 1, params.clone()));
        if let (Some(every), Ok(dir)) = (every, checkpoint_dir(config))
            && ((step + 1) % every == 0 || step + 1 == plan.total_steps)
        {
            write_checkpoint(dir, stage, stages, step + 1, &plan, &params, &optimizer)?;
        }
        tally.updated(step, &mut stats, events);
        tally.trained(step, loss_sum, &plan, progress.as_ref(), steps_per_epoch)?;
    }
    stats.window = tally.window();
    stats.peak_stash = stash.peak();
    write_stage_events(events, plan.total_steps, &stats);
    events.flush();
    // Let the last tensors leave before anything else happens.
    links.close().await;
    if let Some(reason) = abort.borrow().clone() {
        return Err(TrainerError::JobFailed(reason));
    }
    let steps = plan.total_steps;
    let rate = tally.rate(steps, &plan);
    let (busy, window, idle) = (stats.busy, stats.window, stats.idle_fraction());
    run_log::stage_finished(stage, steps, busy, window, idle, stats.peak_stash);

    let evaluation = match (&progress, &test) {
        (Some(progress), Some(test)) => {
            let ending = Ending {
                steps,
                loss: tally.loss_avg.unwrap_or(tally.loss),
                rate,
            };
            let eval = chief_finishes(
                config, peers, &plan, &params, progress, test, &mut abort, ending,
            )
            .await?;
            Some(eval)
        }
        _ => {
            follower_waits(config, shared, &mut abort).await?;
            None
        }
    };
    Ok(WorkerOutcome {
        steps,
        evaluation,
        loss: tally.loss,
        samples_per_second: rate,
    })
}

/// A stage's running account of its steps: the measured window, the loss, and when it
/// last logged.
struct Tally {
    started: Instant,
    window_start: Option<Instant>,
    last_line: Instant,
    last_event: Instant,
    /// The chief's smoothed loss.
    loss_avg: Option<f64>,
    /// The last step's loss.
    loss: f64,
}

impl Tally {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            window_start: None,
            last_line: now,
            last_event: now,
            loss_avg: None,
            loss: 0.0,
        }
    }

    /// Step `step`'s update is done: the stage's busy and idle time go to its event log.
    fn updated(&mut self, step: u64, stats: &mut StageStats, events: &EventLog) {
        // The first step pays for connections and warm-up: the measured window starts after
        // it, and the busy time counted so far is dropped with it.
        if self.window_start.is_none() {
            self.window_start = Some(Instant::now());
            stats.busy = 0.0;
        }
        if self.last_event.elapsed() >= EVENT_EVERY {
            self.last_event = Instant::now();
            stats.window = self.window();
            write_stage_events(events, step + 1, stats);
        }
    }

    /// Step `step`'s loss; on the chief (`progress`) it is checked for divergence,
    /// published and logged.
    fn trained(
        &mut self,
        step: u64,
        loss_sum: f64,
        plan: &Plan,
        progress: Option<&ProgressState>,
        steps_per_epoch: Option<u64>,
    ) -> Result<(), TrainerError> {
        let loss = loss_sum / plan.batch as f64;
        self.loss = loss;
        let Some(progress) = progress else {
            return Ok(());
        };
        let smoothed = self.loss_avg.map_or(loss, |a| 0.9 * a + 0.1 * loss);
        self.loss_avg = Some(smoothed);
        divergence::check_loss(step + 1, loss, smoothed, plan.net.classes())?;
        let rate = self.rate(step + 1, plan);
        // Counting from 1, as status.progress.epoch does.
        let epoch = steps_per_epoch.map_or(0, |per| step / per + 1) as u32;
        progress.trained(step + 1, plan.total_steps, epoch, smoothed, rate);
        if self.last_line.elapsed() >= Duration::from_secs(2) {
            self.last_line = Instant::now();
            let total = plan.total_steps;
            run_log::training(0, step + 1, total, u64::from(epoch), smoothed, rate);
        }
        Ok(())
    }

    fn window(&self) -> f64 {
        self.window_start.map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    /// Samples per second since the start, with `done` the steps trained by then.
    fn rate(&self, done: u64, plan: &Plan) -> f64 {
        (done - plan.resume) as f64 * plan.batch as f64
            / self.started.elapsed().as_secs_f64().max(1e-9)
    }
}

/// The plan every stage trains by. The chief reads the data, learns from every stage which
/// checkpoints it holds, and sends the plan with the step to resume from; the others wait
/// for it.
async fn agree_start(
    config: &Config,
    shared: &Arc<Shared>,
    peers: &[Peer],
    spec: &PipelineSpec,
    abort: &mut watch::Receiver<Option<String>>,
    termination: &Termination,
) -> Result<(StartRequest, Option<ChiefData>), TrainerError> {
    let training = &config.training;
    if shared.stage == 0 {
        let (dataset, seed) = (training.dataset.clone(), training.seed);
        let loaded = tokio::task::spawn_blocking(move || {
            data::load(&dataset, seed, Partition { index: 0, count: 1 }, true)
        })
        .await
        .map_err(|e| TrainerError::Compute(e.to_string()))??;
        let (net, schedule, total_steps) =
            run_setup::training_shape(training, &loaded, 1, config.max_steps)?;
        let lists = termination
            .unless_requested(hello_all(config, shared, peers))
            .await
            .ok_or(TrainerError::Terminated { step: 0 })??;
        let plan = StartRequest {
            widths: net.widths().iter().map(|&w| w as u32).collect(),
            batch: schedule.batch as u32,
            micro_batches: spec.micro_batches.clamp(1, schedule.batch as u32),
            total_steps,
            resume_step: choose_resume(&lists),
        };
        let mut calls = JoinSet::new();
        for p in peers {
            let (p, plan) = (p.clone(), plan.clone());
            calls.spawn(async move { p.start(plan).await });
        }
        while let Some(r) = calls.join_next().await {
            r.map_err(|e| TrainerError::Compute(e.to_string()))??;
        }
        return Ok((plan, Some((loaded, schedule))));
    }
    let mut rx = shared.start.subscribe();
    let mut stop = termination.clone();
    tokio::select! {
        r = tokio::time::timeout(config.idle_timeout, rx.wait_for(Option::is_some)) => {
            let start = r.map_err(|_| TrainerError::JobFailed(format!(
                "stage 0 ({}) did not start this stage within {:.0}s (--idle-timeout-secs)",
                config.cluster.worker[0], config.idle_timeout.as_secs_f64()
            )))?
            .map_err(|_| TrainerError::JobFailed("start channel closed".into()))?
            .clone()
            .expect("waited for Some");
            Ok((start, None))
        }
        r = abort.wait_for(Option::is_some) => {
            let reason = r.ok().and_then(|r| r.clone()).unwrap_or_default();
            Err(TrainerError::JobFailed(reason))
        }
        () = stop.wait() => Err(TrainerError::Terminated { step: 0 }),
    }
}

/// Logs the plan, prints the partition (chief) and puts it into the chief's progress.
fn announce(
    stage: usize,
    stages: usize,
    plan: &Plan,
    spec: &PipelineSpec,
    progress: Option<&ProgressState>,
) {
    let partition: Vec<StagePartition> = plan
        .ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let flops = plan.net.layer_flops()[r.clone()].iter().sum();
            let params = plan
                .net
                .stage(r.clone())
                .map(|s| s.num_params())
                .unwrap_or(0);
            StagePartition {
                stage: i as u32,
                first_layer: r.start as u32,
                end_layer: r.end as u32,
                flops,
                params: params as u64,
            }
        })
        .collect();
    let described: Vec<String> = partition
        .iter()
        .map(|p| {
            format!(
                "stage {}: layers [{}, {}) flops={} params={}",
                p.stage, p.first_layer, p.end_layer, p.flops, p.params
            )
        })
        .collect();
    info!(
        stage,
        stages,
        layers = ?plan.stage.layers(),
        widths = ?plan.net.widths(),
        micro_batches = plan.micro_sizes.len(),
        schedule = ?spec.schedule,
        total_steps = plan.total_steps,
        resume = plan.resume,
        partition = %described.join("; "),
        "pipeline stage ready"
    );
    if stage == 0 {
        run_log::pipeline_partition(&described.join("; "));
    }
    if let Some(progress) = progress {
        progress.update(|r| {
            r.partition = partition.clone();
            r.total_steps = plan.total_steps;
            r.step = plan.resume;
        });
    }
}

/// Parameters and optimizer state: from the agreed checkpoint, or the same seeded
/// initialisation the single-process trainer uses, cut to this stage's layers.
fn initial_params(
    config: &Config,
    stage: usize,
    stages: usize,
    plan: &Plan,
    optimizer: &mut Optimizer,
) -> Result<Arc<Vec<f32>>, TrainerError> {
    let range = plan.stage.param_range();
    if plan.resume == 0 {
        return Ok(Arc::new(
            plan.net.init_range(config.training.seed, range.clone()),
        ));
    }
    let dir = checkpoint_dir(config)?;
    let path = checkpoint_path(dir, stage, stages, plan.resume);
    let ckpt = checkpoint::read(&path)?.ok_or_else(|| {
        TrainerError::JobFailed(format!(
            "the stages agreed to resume from step {} but {} is gone",
            plan.resume,
            path.display()
        ))
    })?;
    if (ckpt.start, ckpt.end, ckpt.total_params) != (range.start, range.end, plan.net.num_params())
    {
        return Err(TrainerError::JobFailed(format!(
            "{} holds parameters [{}, {}) of {}, but this stage has [{}, {}) of {}; delete the checkpoints to start over",
            path.display(),
            ckpt.start,
            ckpt.end,
            ckpt.total_params,
            range.start,
            range.end,
            plan.net.num_params()
        )));
    }
    optimizer.restore(ckpt.optimizer)?;
    info!(stage, step = plan.resume, path = %path.display(), "resumed stage from checkpoint");
    Ok(Arc::new(ckpt.params))
}

/// Where each micro-batch starts in the step's batch.
fn offsets(micro_sizes: &[usize]) -> Vec<usize> {
    micro_sizes
        .iter()
        .scan(0, |at, &n| {
            let start = *at;
            *at += n;
            Some(start)
        })
        .collect()
}

/// The stage's senders to its neighbours, and their names for the mailbox.
struct Links {
    to_next: Option<mpsc::UnboundedSender<Outbound>>,
    to_prev: Option<mpsc::UnboundedSender<Outbound>>,
    next_name: String,
    prev_name: String,
    senders: Vec<JoinHandle<()>>,
}

impl Links {
    fn open(shared: &Arc<Shared>, peers: &[Peer], stage: usize) -> Self {
        let next = peers.iter().find(|p| p.stage == stage + 1).cloned();
        let prev = peers
            .iter()
            .find(|p| stage > 0 && p.stage == stage - 1)
            .cloned();
        let mut senders = Vec::new();
        let mut open = |peer: Option<Peer>, direction| {
            peer.map(|p| {
                let (tx, task) = peers::sender(p, stage, direction, shared.clone());
                senders.push(task);
                tx
            })
        };
        let to_next = open(next.clone(), Direction::Forward);
        let to_prev = open(prev.clone(), Direction::Backward);
        Self {
            to_next,
            to_prev,
            next_name: next.as_ref().map(Peer::name).unwrap_or_default(),
            prev_name: prev.as_ref().map(Peer::name).unwrap_or_default(),
            senders,
        }
    }

    /// Closes the senders and waits until what they hold has left.
    async fn close(&mut self) {
        self.to_next = None;
        self.to_prev = None;
        for task in self.senders.drain(..) {
            let _ = task.await;
        }
    }
}

/// One step's passes over the micro-batches, in the schedule's order.
struct Passes<'a> {
    model: Arc<StageModel>,
    order: Vec<Action>,
    offsets: Vec<usize>,
    plan: &'a Plan,
    links: &'a Links,
}

impl Passes<'_> {
    /// Runs the step's forward and backward passes; returns this stage's gradient and, on
    /// the last stage, the step's summed loss (the others add what the next stage sent).
    async fn run(
        &self,
        step: u64,
        params: &Arc<Vec<f32>>,
        (x, y): (&[f32], &[u8]),
        mailbox: &mut Mailbox,
        stash: &mut Stash<Kept>,
        stats: &mut StageStats,
    ) -> Result<(Vec<f32>, f64), TrainerError> {
        let mut grad = vec![0.0f32; self.model.num_params()];
        let mut loss_sum = 0.0f64;
        for &action in &self.order {
            match action {
                Action::Forward(m) => {
                    self.forward(step, m, params, (x, y), mailbox, stash, stats)
                        .await?;
                }
                Action::Backward(m) => {
                    let (g, micro_loss) = self
                        .backward(step, m, params, grad, mailbox, stash, stats)
                        .await?;
                    grad = g;
                    loss_sum += micro_loss;
                }
            }
        }
        Ok((grad, loss_sum))
    }

    #[allow(clippy::too_many_arguments)] // the step's state, borrowed pass by pass
    async fn forward(
        &self,
        step: u64,
        m: usize,
        params: &Arc<Vec<f32>>,
        (x, y): (&[f32], &[u8]),
        mailbox: &mut Mailbox,
        stash: &mut Stash<Kept>,
        stats: &mut StageStats,
    ) -> Result<(), TrainerError> {
        let model = &self.model;
        let rows = self.plan.micro_sizes[m];
        let (input, labels) = if model.is_first() {
            let (a, width) = (self.offsets[m], model.input_width());
            (
                as_matrix(&x[a * width..(a + rows) * width], width).to_owned(),
                y[a..a + rows].to_vec(),
            )
        } else {
            let t = mailbox
                .take(Direction::Forward, step, m, &self.links.prev_name)
                .await?;
            check_rows(&t, rows)?;
            let input = Array2::from_shape_vec((rows, model.input_width()), t.data)
                .map_err(|e| TrainerError::Compute(e.to_string()))?;
            (input, t.labels)
        };
        let (m2, p2, batch) = (model.clone(), params.clone(), self.plan.batch);
        let (output, kept, tail, labels, took) = compute(move || {
            let busy = Instant::now();
            let (output, kept) = m2.forward(&p2, input.view())?;
            let tail = if m2.is_last() {
                Some(m2.loss_gradient(&output, &labels, batch)?)
            } else {
                None
            };
            Ok((output, kept, tail, labels, busy.elapsed()))
        })
        .await?;
        stats.busy += took.as_secs_f64();
        stash
            .put(m, (kept, tail.map(|(l, d)| (d, l))))
            .map_err(|e| TrainerError::Compute(e.to_string()))?;
        if let Some(tx) = &self.links.to_next {
            let _ = tx.send(Outbound {
                step,
                micro: m,
                rows,
                data: output.into_raw_vec_and_offset().0,
                labels,
                loss_sum: 0.0,
            });
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)] // the step's state, borrowed pass by pass
    async fn backward(
        &self,
        step: u64,
        m: usize,
        params: &Arc<Vec<f32>>,
        grad: Vec<f32>,
        mailbox: &mut Mailbox,
        stash: &mut Stash<Kept>,
        stats: &mut StageStats,
    ) -> Result<(Vec<f32>, f64), TrainerError> {
        let model = &self.model;
        let (kept, tail) = stash
            .take(m)
            .map_err(|e| TrainerError::Compute(e.to_string()))?;
        let (d_output, micro_loss) = match tail {
            Some(t) => t,
            None => {
                let t = mailbox
                    .take(Direction::Backward, step, m, &self.links.next_name)
                    .await?;
                check_rows(&t, kept.rows())?;
                let d = Array2::from_shape_vec((t.rows, model.output_width()), t.data)
                    .map_err(|e| TrainerError::Compute(e.to_string()))?;
                (d, t.loss_sum)
            }
        };
        let (m2, p2, mut g2) = (model.clone(), params.clone(), grad);
        let (upstream, kept, g2, took) = compute(move || {
            let busy = Instant::now();
            let upstream = m2.backward(&p2, &kept, d_output.view(), &mut g2)?;
            Ok((upstream, kept, g2, busy.elapsed()))
        })
        .await?;
        stats.busy += took.as_secs_f64();
        if let (Some(tx), Some(up)) = (&self.links.to_prev, upstream) {
            let _ = tx.send(Outbound {
                step,
                micro: m,
                rows: kept.rows(),
                data: up.into_raw_vec_and_offset().0,
                labels: Vec::new(),
                loss_sum: micro_loss,
            });
        }
        Ok((g2, micro_loss))
    }
}

/// What the chief reports when training ends.
struct Ending {
    steps: u64,
    loss: f64,
    rate: f64,
}

/// The chief's end: the final evaluation on every stage's parameters, the last progress,
/// and Finish to every stage.
#[allow(clippy::too_many_arguments)] // one call site
async fn chief_finishes(
    config: &Config,
    peers: &[Peer],
    plan: &Plan,
    params: &Arc<Vec<f32>>,
    progress: &ProgressState,
    test: &data::Examples,
    abort: &mut watch::Receiver<Option<String>>,
    Ending { steps, loss, rate }: Ending,
) -> Result<crate::model::Evaluation, TrainerError> {
    let full = unless_aborted(abort, gather(peers, plan, params, steps)).await?;
    let eval = evaluate(&plan.net, full.clone(), test).await?;
    if let Some(path) = &config.dump_params {
        std::fs::write(path, chunks::to_bytes(&full)).map_err(|source| {
            TrainerError::DumpParams {
                path: path.clone(),
                source,
            }
        })?;
    }
    progress.finished(steps, eval.accuracy, eval.loss);
    let mut calls = JoinSet::new();
    for p in peers {
        let p = p.clone();
        calls.spawn(async move { p.finish().await });
    }
    while calls.join_next().await.is_some() {}
    run_log::final_result(eval.accuracy, eval.loss, loss, steps, rate, None);
    Ok(eval)
}

/// Any other stage's end: the chief still needs its parameters for the final evaluation,
/// so it serves them until the chief says Finish.
async fn follower_waits(
    config: &Config,
    shared: &Arc<Shared>,
    abort: &mut watch::Receiver<Option<String>>,
) -> Result<(), TrainerError> {
    let mut finish = shared.finish.subscribe();
    tokio::select! {
        r = tokio::time::timeout(config.idle_timeout, finish.wait_for(|f| *f)) => {
            if r.is_err() {
                return Err(TrainerError::JobFailed(format!(
                    "stage 0 ({}) did not finish the job within {:.0}s after the last step (--idle-timeout-secs)",
                    config.cluster.worker[0], config.idle_timeout.as_secs_f64()
                )));
            }
            // Give the Finish reply time to leave before the process (and its server)
            // goes, so the chief does not see a broken connection.
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(())
        }
        r = abort.wait_for(Option::is_some) => {
            let reason = r.ok().and_then(|r| r.clone()).unwrap_or_default();
            Err(TrainerError::JobFailed(reason))
        }
    }
}
