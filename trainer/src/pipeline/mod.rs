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

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kubetrain_api::validation::effective_hidden;
use kubetrain_api::{PipelineSchedule, PipelineSpec};
use ndarray::Array2;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

use crate::checkpoint::{self, ShardCheckpoint};
use crate::config::Config;
use crate::data::{self, Batcher, Partition, Schedule};
use crate::error::TrainerError;
use crate::model::{Network, Optimizer, StageModel, as_matrix, divergence};
use crate::parameter_transfer::chunks;
use crate::progress::{ProgressService, ProgressState};
use crate::proto::pipeline_stage_server::PipelineStageServer;
use crate::proto::progress_server::ProgressServer;
use crate::proto::{StagePartition, StartRequest};
use crate::tensorboard::EventLog;
use crate::termination::Termination;
use crate::transport;
use crate::worker::{WorkerOutcome, evaluate_examples};
use peers::{Outbound, Peer};
use schedule::{Action, Stash};
use service::{Direction, Inbound, Mailbox, Shapes, Shared, StageService};

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
    let result = train(
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

async fn train(
    config: &Config,
    shared: &Arc<Shared>,
    peers: &[Peer],
    mailbox: &mut Mailbox,
    progress: Option<ProgressState>,
    events: &EventLog,
    termination: &Termination,
) -> Result<WorkerOutcome, TrainerError> {
    let stage = shared.stage;
    let stages = shared.stages;
    let training = &config.training;
    let spec = training.pipeline.clone().unwrap_or(PipelineSpec {
        micro_batches: 4,
        schedule: PipelineSchedule::default(),
    });
    let mut abort = shared.abort.subscribe();

    // The chief reads the data and sends the plan; the others wait for it.
    let mut data = None;
    let start = if stage == 0 {
        let (dataset, seed) = (training.dataset.clone(), training.seed);
        let loaded = tokio::task::spawn_blocking(move || {
            data::load(&dataset, seed, Partition { index: 0, count: 1 }, true)
        })
        .await
        .map_err(|e| TrainerError::Compute(e.to_string()))??;
        let hidden: Vec<usize> = effective_hidden(&training.model)
            .iter()
            .map(|&h| h as usize)
            .collect();
        let net = Network::new(loaded.inputs, &hidden, loaded.classes);
        let schedule = Schedule::new(loaded.train_total, 1, training.batch_size as usize)?;
        let mut total_steps = u64::from(training.epochs) * schedule.steps_per_epoch as u64;
        if let Some(max) = config.max_steps {
            total_steps = total_steps.min(max);
        }
        let lists = termination
            .unless_requested(hello_all(config, shared, peers))
            .await
            .ok_or(TrainerError::Terminated { step: 0 })??;
        let resume = choose_resume(&lists);
        let plan = StartRequest {
            widths: net.widths().iter().map(|&w| w as u32).collect(),
            batch: schedule.batch as u32,
            micro_batches: spec.micro_batches.clamp(1, schedule.batch as u32),
            total_steps,
            resume_step: resume,
        };
        let mut calls = JoinSet::new();
        for p in peers {
            let (p, plan) = (p.clone(), plan.clone());
            calls.spawn(async move { p.start(plan).await });
        }
        while let Some(r) = calls.join_next().await {
            r.map_err(|e| TrainerError::Compute(e.to_string()))??;
        }
        data = Some((loaded, schedule));
        plan
    } else {
        let mut rx = shared.start.subscribe();
        let mut stop = termination.clone();
        tokio::select! {
            r = tokio::time::timeout(config.idle_timeout, rx.wait_for(Option::is_some)) => {
                r.map_err(|_| TrainerError::JobFailed(format!(
                    "stage 0 ({}) did not start this stage within {:.0}s (--idle-timeout-secs)",
                    config.cluster.worker[0], config.idle_timeout.as_secs_f64()
                )))?
                .map_err(|_| TrainerError::JobFailed("start channel closed".into()))?
                .clone()
                .expect("waited for Some")
            }
            r = abort.wait_for(Option::is_some) => {
                let reason = r.ok().and_then(|r| r.clone()).unwrap_or_default();
                return Err(TrainerError::JobFailed(reason));
            }
            () = stop.wait() => return Err(TrainerError::Terminated { step: 0 }),
        }
    };
    let plan = make_plan(&start, stage, stages)?;
    let _ = shared.shapes.set(Shapes {
        input_width: plan.stage.input_width(),
        output_width: plan.stage.output_width(),
        batch: plan.batch,
    });
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
        println!(
            "kubetrain-trainer: pipeline partition {}",
            described.join("; ")
        );
    }
    if let Some(progress) = &progress {
        progress.update(|r| {
            r.partition = partition.clone();
            r.total_steps = plan.total_steps;
            r.step = plan.resume;
        });
    }

    // Parameters and optimizer state: from the agreed checkpoint, or the same seeded
    // initialisation the single-process trainer uses, cut to this stage's layers.
    let range = plan.stage.param_range();
    let mut optimizer = Optimizer::new(&training.optimizer, range.len());
    let mut params: Arc<Vec<f32>> = if plan.resume > 0 {
        let dir = checkpoint_dir(config)?;
        let path = checkpoint_path(dir, stage, stages, plan.resume);
        let ckpt = checkpoint::read(&path)?.ok_or_else(|| {
            TrainerError::JobFailed(format!(
                "the stages agreed to resume from step {} but {} is gone",
                plan.resume,
                path.display()
            ))
        })?;
        if (ckpt.start, ckpt.end, ckpt.total_params)
            != (range.start, range.end, plan.net.num_params())
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
        Arc::new(ckpt.params)
    } else {
        Arc::new(plan.net.init_range(training.seed, range.clone()))
    };
    shared.params.send_replace((plan.resume, params.clone()));

    let next = peers.iter().find(|p| p.stage == stage + 1).cloned();
    let prev = peers
        .iter()
        .find(|p| stage > 0 && p.stage == stage - 1)
        .cloned();
    let mut senders: Vec<JoinHandle<()>> = Vec::new();
    let to_next = next.clone().map(|p| {
        let (tx, task) = peers::sender(p, stage, Direction::Forward, shared.clone());
        senders.push(task);
        tx
    });
    let to_prev = prev.clone().map(|p| {
        let (tx, task) = peers::sender(p, stage, Direction::Backward, shared.clone());
        senders.push(task);
        tx
    });
    let next_name = next.as_ref().map(Peer::name).unwrap_or_default();
    let prev_name = prev.as_ref().map(Peer::name).unwrap_or_default();

    let order = schedule::actions(spec.schedule, stages, stage, plan.micro_sizes.len());
    let offsets: Vec<usize> = plan
        .micro_sizes
        .iter()
        .scan(0, |at, &n| {
            let start = *at;
            *at += n;
            Some(start)
        })
        .collect();
    let mut batcher = data
        .as_ref()
        .map(|(d, s)| Batcher::new(*s, training.seed, 0, d.train.len()));
    let steps_per_epoch = data.as_ref().map(|(_, s)| s.steps_per_epoch as u64);
    let test = data.as_ref().and_then(|(d, _)| d.test.clone());
    let model = Arc::new(plan.stage.clone());
    let mut stats = StageStats::default();
    let mut stash: Stash<Kept> = Stash::default();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let started = Instant::now();
    let mut window_start: Option<Instant> = None;
    let mut last_line = Instant::now();
    let mut last_event = Instant::now();
    let mut loss_avg: Option<f64> = None;
    let mut loss = 0.0;
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
            println!(
                "kubetrain-trainer: epoch {} done step={step} test_accuracy={:.4} test_loss={:.4}",
                step / per,
                eval.accuracy,
                eval.loss
            );
        }
        if let (Some((d, _)), Some(b)) = (&data, batcher.as_mut()) {
            x.clear();
            y.clear();
            d.train.gather(b.indices(step), &mut x, &mut y);
        }
        let mut grad = vec![0.0f32; model.num_params()];
        let mut loss_sum = 0.0f64;
        for &action in &order {
            match action {
                Action::Forward(m) => {
                    let rows = plan.micro_sizes[m];
                    let (input, labels) = if model.is_first() {
                        let (a, width) = (offsets[m], model.input_width());
                        (
                            as_matrix(&x[a * width..(a + rows) * width], width).to_owned(),
                            y[a..a + rows].to_vec(),
                        )
                    } else {
                        let t = mailbox
                            .take(Direction::Forward, step, m, &prev_name)
                            .await?;
                        check_rows(&t, rows)?;
                        let input = Array2::from_shape_vec((rows, model.input_width()), t.data)
                            .map_err(|e| TrainerError::Compute(e.to_string()))?;
                        (input, t.labels)
                    };
                    let (m2, p2, batch) = (model.clone(), params.clone(), plan.batch);
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
                    if let Some(tx) = &to_next {
                        let _ = tx.send(Outbound {
                            step,
                            micro: m,
                            rows,
                            data: output.into_raw_vec_and_offset().0,
                            labels,
                            loss_sum: 0.0,
                        });
                    }
                }
                Action::Backward(m) => {
                    let (kept, tail) = stash
                        .take(m)
                        .map_err(|e| TrainerError::Compute(e.to_string()))?;
                    let (d_output, micro_loss) = match tail {
                        Some(t) => t,
                        None => {
                            let t = mailbox
                                .take(Direction::Backward, step, m, &next_name)
                                .await?;
                            check_rows(&t, kept.rows())?;
                            let d = Array2::from_shape_vec((t.rows, model.output_width()), t.data)
                                .map_err(|e| TrainerError::Compute(e.to_string()))?;
                            (d, t.loss_sum)
                        }
                    };
                    let (m2, p2, mut g2) =
                        (model.clone(), params.clone(), std::mem::take(&mut grad));
                    let (upstream, kept, g2, took) = compute(move || {
                        let busy = Instant::now();
                        let upstream = m2.backward(&p2, &kept, d_output.view(), &mut g2)?;
                        Ok((upstream, kept, g2, busy.elapsed()))
                    })
                    .await?;
                    grad = g2;
                    stats.busy += took.as_secs_f64();
                    loss_sum += micro_loss;
                    if let (Some(tx), Some(up)) = (&to_prev, upstream) {
                        let _ = tx.send(Outbound {
                            step,
                            micro: m,
                            rows: kept.rows(),
                            data: up.into_raw_vec_and_offset().0,
                            labels: Vec::new(),
                            loss_sum: micro_loss,
                        });
                    }
                }
            }
        }
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
        // The first step pays for connections and warm-up: the measured window starts after
        // it, and the busy time counted so far is dropped with it.
        if window_start.is_none() {
            window_start = Some(Instant::now());
            stats.busy = 0.0;
        }
        if last_event.elapsed() >= EVENT_EVERY {
            last_event = Instant::now();
            stats.window = window_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
            write_stage_events(events, step + 1, &stats);
        }

        loss = loss_sum / plan.batch as f64;
        if let Some(progress) = &progress {
            let smoothed = loss_avg.map_or(loss, |a| 0.9 * a + 0.1 * loss);
            loss_avg = Some(smoothed);
            divergence::check_loss(step + 1, loss, smoothed, plan.net.classes())?;
            let done = step + 1 - plan.resume;
            let rate = done as f64 * plan.batch as f64 / started.elapsed().as_secs_f64().max(1e-9);
            // Counting from 1, as status.progress.epoch does.
            let epoch = steps_per_epoch.map_or(0, |per| step / per + 1) as u32;
            progress.update(|r| {
                r.step = step + 1;
                r.epoch = epoch;
                r.loss = loss_avg.unwrap_or_default();
                r.samples_per_second = rate;
            });
            if last_line.elapsed() >= Duration::from_secs(2) {
                last_line = Instant::now();
                println!(
                    "kubetrain-trainer: worker 0 step={}/{} epoch={epoch} loss={:.4} samples_per_second={rate:.1}",
                    step + 1,
                    plan.total_steps,
                    loss_avg.unwrap_or_default()
                );
            }
        }
    }
    stats.window = window_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
    stats.peak_stash = stash.peak();
    write_stage_events(events, plan.total_steps, &stats);
    events.flush();
    // Let the last tensors leave before anything else happens.
    drop(to_next);
    drop(to_prev);
    for task in senders {
        let _ = task.await;
    }
    if let Some(reason) = abort.borrow().clone() {
        return Err(TrainerError::JobFailed(reason));
    }
    let steps = plan.total_steps;
    let rate = (steps - plan.resume) as f64 * plan.batch as f64
        / started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "kubetrain-trainer: stage {stage} finished steps={steps} busy_seconds={:.4} window_seconds={:.4} idle_fraction={:.4} peak_stash={}",
        stats.busy,
        stats.window,
        stats.idle_fraction(),
        stats.peak_stash
    );

    let mut evaluation = None;
    if let (Some(progress), Some(test)) = (&progress, &test) {
        let full = unless_aborted(&mut abort, gather(peers, &plan, &params, steps)).await?;
        let eval = evaluate(&plan.net, full.clone(), test).await?;
        if let Some(path) = &config.dump_params {
            std::fs::write(path, chunks::to_bytes(&full)).map_err(|source| {
                TrainerError::DumpParams {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        let loss = loss_avg.unwrap_or(loss);
        progress.evaluated(steps, eval.accuracy, eval.loss);
        progress.update(|r| {
            r.finished = true;
            r.final_accuracy = eval.accuracy;
            r.accuracy = eval.accuracy;
            r.step = steps;
        });
        let mut calls = JoinSet::new();
        for p in peers {
            let p = p.clone();
            calls.spawn(async move { p.finish().await });
        }
        while calls.join_next().await.is_some() {}
        println!(
            "kubetrain-trainer: final test_accuracy={:.4} test_loss={:.4} loss={loss:.4} steps={steps} samples_per_second={rate:.1}",
            eval.accuracy, eval.loss
        );
        evaluation = Some(eval);
    } else {
        // The chief still needs this stage's parameters for the final evaluation.
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
            }
            r = abort.wait_for(Option::is_some) => {
                let reason = r.ok().and_then(|r| r.clone()).unwrap_or_default();
                return Err(TrainerError::JobFailed(reason));
            }
        }
    }
    Ok(WorkerOutcome {
        steps,
        evaluation,
        loss,
        samples_per_second: rate,
    })
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
