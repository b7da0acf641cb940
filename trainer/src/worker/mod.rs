//! The data-parallel worker loop: pull parameters from every PS, compute the gradient of
//! one batch of this worker's partition, push each PS its slice; the chief (worker 0) also
//! evaluates, reports progress and ends the job.

mod links;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::consistency::Consistency;
use crate::data::{self, Batcher, Examples, Partition};
use crate::error::TrainerError;
use crate::model::{Evaluation, Network, as_matrix, divergence, evaluate_examples};
use crate::parameter_transfer::chunks;
use crate::progress::{ProgressService, ProgressState};
use crate::proto::progress_server::ProgressServer;
use crate::ps::shard_ranges;
use crate::run_log;
use crate::run_setup;
use crate::termination::Termination;
use crate::transport;
use links::{Links, StepError};

/// What a worker reports when it finishes.
#[derive(Debug, Clone)]
pub struct WorkerOutcome {
    pub steps: u64,
    /// Chief only: test-set evaluation of the final parameters.
    pub evaluation: Option<Evaluation>,
    pub loss: f64,
    pub samples_per_second: f64,
}

/// How long a step in progress may go on after SIGTERM: ample for a step that can end
/// (milliseconds), well inside the pod's grace period for one that cannot.
const STEP_GRACE_ON_SIGTERM: Duration = Duration::from_secs(1);

/// Runs one worker to the end of training.
/// `progress` is the chief's shared progress (None on other workers).
/// `termination` stops it between steps (or within [`STEP_GRACE_ON_SIGTERM`], if the step
/// cannot end).
pub async fn run_worker(
    config: Config,
    progress: Option<ProgressState>,
    termination: Termination,
) -> Result<WorkerOutcome, TrainerError> {
    let chief = config.is_chief();
    let workers = config.cluster.worker.len();
    let training = config.training.clone();

    // Serve health (and the chief's progress) before anything slow, so readiness reflects
    // that the process is up.
    let server = serve(&config, progress.clone()).await?;

    let (dataset, seed, index) = (training.dataset.clone(), training.seed, config.index);
    let load = tokio::task::spawn_blocking(move || {
        data::load(
            &dataset,
            seed,
            Partition {
                index,
                count: workers,
            },
            chief,
        )
    });
    let data = termination
        .unless_requested(load)
        .await
        .ok_or(TrainerError::Terminated { step: 0 })?
        .map_err(|e| TrainerError::Compute(e.to_string()))??;
    let (net, schedule, total_steps) =
        run_setup::training_shape(&training, &data, workers, config.max_steps)?;
    let net = Arc::new(net);
    info!(
        worker = index,
        examples = data.train.len(),
        feature_bytes = data.train.feature_bytes(),
        params = net.num_params(),
        batch = schedule.batch,
        steps_per_epoch = schedule.steps_per_epoch,
        total_steps,
        "worker ready"
    );
    let ranges = shard_ranges(net.num_params(), config.cluster.ps.len());
    let mut links = Links::new(&config, ranges, net.widths())?;
    let sync = config.consistency == Consistency::Sync;
    let resume = termination
        .unless_requested(links.register_all(sync))
        .await
        .ok_or(TrainerError::Terminated { step: 0 })??;
    if resume > total_steps {
        return Err(TrainerError::JobFailed(format!(
            "the parameter servers report step {resume}, past this job's {total_steps} steps; their checkpoint is from another run: point spec.training.checkpoint.path elsewhere"
        )));
    }
    if resume > 0 {
        info!(
            worker = index,
            step = resume,
            "continuing from the step the parameter servers last saw"
        );
    }

    let (abort_tx, abort) = watch::channel(None::<String>);
    let heartbeat = tokio::spawn(links.heartbeats(config.heartbeat_interval, abort_tx));

    let test = data.test.map(Arc::new);
    let mut batcher = Batcher::new(schedule, seed, index, data.train.len());
    let train = Arc::new(data.train);
    // Sync: the parameter servers hold a step for a lost worker's replacement for the
    // grace period, and fail the job past it; waiting here only ends a wait the PS
    // would end anyway.
    let stall_limit = if sync {
        config.ps_timeout + config.training.consistency.worker_grace_period()
    } else {
        config.ps_timeout
    };
    let started = Instant::now();
    let mut last_line = Instant::now();
    let mut loss_avg: Option<f64> = None;
    let mut last_progress = Instant::now();
    let mut step = resume;
    let global_batch = (schedule.batch * workers) as f64;
    let mut steps_done = 0u64;
    // Time spent pulling, computing (data + gradient) and pushing, for the final line: where
    // a step's time goes decides what to optimise. (Sync pulls the next step's parameters
    // during the push, so there the push time includes waiting for the other workers.)
    let mut timing = [Duration::ZERO; 3];
    // Sync: the next step's parameters, pulled while this step's push was under way.
    let mut prefetched: Option<Vec<f32>> = None;
    // The widened batch buffers, kept across steps instead of allocated for each one.
    let mut batch: (Vec<f32>, Vec<u8>) = (Vec::new(), Vec::new());

    let mut stop = termination.clone();
    while step < total_steps {
        if let Some(reason) = abort.borrow().clone() {
            return Err(TrainerError::JobFailed(reason));
        }
        if termination.requested() {
            // Pushed gradients are applied; nothing of this worker is half-way anywhere.
            return Err(TrainerError::Terminated { step });
        }
        let attempt = async {
            let t0 = Instant::now();
            let params = match prefetched.take() {
                Some(params) => params,
                None => links.pull_all(step, sync).await?,
            };
            let t1 = Instant::now();
            let epoch = schedule.epoch_of(step);
            if let (Some(progress), Some(test)) = (&progress, &test)
                && step > 0
                && step % schedule.steps_per_epoch as u64 == 0
            {
                let eval = evaluate(net.clone(), params.clone(), test.clone()).await?;
                progress.evaluated(step, eval.accuracy, eval.loss);
                run_log::epoch_done(epoch, step, eval.accuracy, eval.loss);
            }
            let indices = batcher.indices(step).to_vec();
            let (net2, train2) = (net.clone(), train.clone());
            let (mut x, mut y) = std::mem::take(&mut batch);
            let (result, params, x, y) = tokio::task::spawn_blocking(move || {
                x.clear();
                y.clear();
                train2.gather(&indices, &mut x, &mut y);
                let result = net2.loss_and_gradient(&params, as_matrix(&x, net2.inputs()), &y);
                (result, params, x, y)
            })
            .await
            .map_err(|e| StepError::Fatal(TrainerError::Compute(e.to_string())))?;
            batch = (x, y);
            links.recycle(params);
            let (loss, grad) = result.map_err(|e| StepError::Fatal(e.into()))?;
            divergence::check_gradient(step + 1, &grad).map_err(|e| StepError::Fatal(e.into()))?;
            let t2 = Instant::now();
            let mut next = None;
            if sync && step + 1 < total_steps {
                // A failed pull only means the next step pulls again (its error has already
                // marked the PS for re-registration where needed).
                next = links.push_and_pull(step, Arc::new(grad)).await?.ok();
            } else {
                links.push_all(step, Arc::new(grad)).await?;
            }
            Ok::<_, StepError>((loss, [t1 - t0, t2 - t1, t2.elapsed()], next))
        };
        let outcome = {
            tokio::pin!(attempt);
            tokio::select! {
            outcome = &mut attempt => outcome,
            () = stop.wait() => {
                // The step in progress gets a moment to end; one that cannot (its PS is
                // gone too, say) is abandoned rather than retried past the grace period.
                // Nothing is half-applied: a push that breaks off is never applied, and
                // Sync's replacement redoes a step whose gradient is in on some shards only.
                match tokio::time::timeout(STEP_GRACE_ON_SIGTERM, &mut attempt).await {
                    Ok(outcome) => outcome,
                    Err(_) => return Err(TrainerError::Terminated { step }),
                }
            }
            }
        };
        match outcome {
            Ok((loss, times, next)) => {
                prefetched = next;
                for (total, t) in timing.iter_mut().zip(times) {
                    *total += t;
                }
                step += 1;
                steps_done += 1;
                last_progress = Instant::now();
                let smoothed = loss_avg.map_or(loss, |a| 0.9 * a + 0.1 * loss);
                loss_avg = Some(smoothed);
                divergence::check_loss(step, loss, smoothed, net.classes())?;
                let rate =
                    steps_done as f64 * global_batch / started.elapsed().as_secs_f64().max(1e-9);
                // Counting from 1, as status.progress.epoch does, in the log line too.
                let epoch = schedule.epoch_of(step.saturating_sub(1)) as u32 + 1;
                let loss = loss_avg.unwrap_or_default();
                if let Some(progress) = &progress {
                    progress.trained(step, total_steps, epoch, loss, rate);
                }
                if last_line.elapsed() >= Duration::from_secs(2) {
                    last_line = Instant::now();
                    run_log::training(index, step, total_steps, u64::from(epoch), loss, rate);
                }
            }
            Err(StepError::Retry(why)) => {
                if last_progress.elapsed() > stall_limit {
                    return Err(TrainerError::JobFailed(format!(
                        "no training progress for {:.0}s (--ps-timeout-secs, plus Sync's workerGracePeriodSeconds): {why}",
                        last_progress.elapsed().as_secs_f64()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(StepError::Fatal(e)) => return Err(e),
        }
    }
    links.done_all().await;
    let rate = steps_done as f64 * global_batch / started.elapsed().as_secs_f64().max(1e-9);
    let loss = loss_avg.unwrap_or_default();
    let per_step = |t: Duration| t.as_secs_f64() * 1e3 / steps_done.max(1) as f64;
    let timing = format!(
        "pull_ms={:.2} compute_ms={:.2} push_ms={:.2}",
        per_step(timing[0]),
        per_step(timing[1]),
        per_step(timing[2])
    );

    let mut evaluation = None;
    if let (Some(progress), Some(test)) = (&progress, test) {
        links.wait_for_workers(&abort).await?;
        let params = loop {
            match links.pull_all(total_steps, false).await {
                Ok(params) => break params,
                Err(StepError::Retry(_)) if last_progress.elapsed() <= config.ps_timeout => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(StepError::Retry(why)) => return Err(TrainerError::JobFailed(why)),
                Err(StepError::Fatal(e)) => return Err(e),
            }
        };
        let eval = evaluate(net.clone(), params.clone(), test)
            .await
            .map_err(|e| match e {
                StepError::Fatal(e) => e,
                StepError::Retry(why) => TrainerError::Compute(why),
            })?;
        if let Some(path) = &config.dump_params {
            dump(path, &params)?;
        }
        links.shutdown_all("training finished").await;
        progress.finished(total_steps, eval.accuracy, eval.loss);
        let (accuracy, test_loss) = (eval.accuracy, eval.loss);
        run_log::final_result(accuracy, test_loss, loss, total_steps, rate, Some(&timing));
        evaluation = Some(eval);
    } else {
        run_log::worker_finished(index, step, loss, rate, &timing);
    }
    heartbeat.abort();
    server.abort();
    Ok(WorkerOutcome {
        steps: step,
        evaluation,
        loss,
        samples_per_second: rate,
    })
}

async fn evaluate(
    net: Arc<Network>,
    params: Vec<f32>,
    test: Arc<Examples>,
) -> Result<Evaluation, StepError> {
    tokio::task::spawn_blocking(move || evaluate_examples(&net, &params, &test))
        .await
        .map_err(|e| StepError::Fatal(TrainerError::Compute(e.to_string())))?
        .map_err(|e| StepError::Fatal(e.into()))
}

fn dump(path: &Path, params: &[f32]) -> Result<(), TrainerError> {
    std::fs::write(path, chunks::to_bytes(params)).map_err(|source| TrainerError::DumpParams {
        path: path.to_path_buf(),
        source,
    })
}

/// The worker's own gRPC server: health for everyone, Progress on the chief.
async fn serve(
    config: &Config,
    progress: Option<ProgressState>,
) -> Result<tokio::task::JoinHandle<()>, TrainerError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .map_err(|source| TrainerError::Bind {
            addr: config.bind,
            source,
        })?;
    let mut router = transport::server().add_service(health);
    if let Some(progress) = progress {
        reporter
            .set_serving::<ProgressServer<ProgressService>>()
            .await;
        router = router.add_service(ProgressServer::new(ProgressService(progress)));
    }
    info!(addr = %config.bind, chief = config.is_chief(), "worker listening");
    Ok(tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming(transport::incoming(listener))
            .await
        {
            warn!("worker gRPC server stopped: {e}");
        }
    }))
}
