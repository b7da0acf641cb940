//! The data-parallel worker loop: pull parameters from every PS, compute the gradient of
//! one batch of this worker's partition, push each PS its slice; the chief (worker 0) also
//! evaluates, reports progress and ends the job.

mod links;
mod steps;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::consistency::Consistency;
use crate::data::{self, Examples, Partition};
use crate::error::TrainerError;
use crate::model::Evaluation;
use crate::parameter_transfer::chunks;
use crate::progress::{ProgressService, ProgressState};
use crate::proto::progress_server::ProgressServer;
use crate::ps::shard_ranges;
use crate::run_log;
use crate::run_setup;
use crate::termination::Termination;
use crate::transport;
use links::{Links, StepError};
use steps::{StepLoop, evaluate};

/// What a worker reports when it finishes.
#[derive(Debug, Clone)]
pub struct WorkerOutcome {
    pub steps: u64,
    /// Chief only: test-set evaluation of the final parameters.
    pub evaluation: Option<Evaluation>,
    pub loss: f64,
    pub samples_per_second: f64,
}

/// Runs one worker to the end of training.
/// `progress` is the chief's shared progress (None on other workers).
/// `termination` stops it between steps (or within a moment, if the step cannot end).
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
    // Sync: the parameter servers hold a step for a lost worker's replacement for the
    // grace period, and fail the job past it; waiting here only ends a wait the PS
    // would end anyway.
    let stall_limit = if sync {
        config.ps_timeout + config.training.consistency.worker_grace_period()
    } else {
        config.ps_timeout
    };
    let mut steps = StepLoop::new(
        index,
        workers,
        sync,
        net,
        Arc::new(data.train),
        data.test.map(Arc::new),
        progress,
        schedule,
        links,
        total_steps,
        resume,
        stall_limit,
        seed,
    );
    let trained = steps.run(&termination, &abort).await?;
    let evaluation = match (steps.progress.clone(), steps.test.clone()) {
        (Some(progress), Some(test)) => {
            let eval = final_evaluation(&mut steps, &config, test, &abort).await?;
            progress.finished(total_steps, eval.accuracy, eval.loss);
            run_log::final_result(
                eval.accuracy,
                eval.loss,
                trained.loss,
                total_steps,
                trained.samples_per_second,
                Some(&trained.timing),
            );
            Some(eval)
        }
        _ => {
            let (loss, rate) = (trained.loss, trained.samples_per_second);
            run_log::worker_finished(index, steps.step, loss, rate, &trained.timing);
            None
        }
    };
    heartbeat.abort();
    server.abort();
    Ok(WorkerOutcome {
        steps: steps.step,
        evaluation,
        loss: trained.loss,
        samples_per_second: trained.samples_per_second,
    })
}

/// The chief's end: once every worker is done, the final parameters' test accuracy (and
/// `--dump-params`), then the parameter servers are told to stop.
async fn final_evaluation(
    steps: &mut StepLoop,
    config: &Config,
    test: Arc<Examples>,
    abort: &watch::Receiver<Option<String>>,
) -> Result<Evaluation, TrainerError> {
    steps.links.wait_for_workers(abort).await?;
    let params = loop {
        match steps.links.pull_all(steps.total_steps, false).await {
            Ok(params) => break params,
            Err(StepError::Retry(_)) if steps.last_progress.elapsed() <= config.ps_timeout => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(StepError::Retry(why)) => return Err(TrainerError::JobFailed(why)),
            Err(StepError::Fatal(e)) => return Err(e),
        }
    };
    let eval = evaluate(steps.net.clone(), params.clone(), test)
        .await
        .map_err(|e| match e {
            StepError::Fatal(e) => e,
            StepError::Retry(why) => TrainerError::Compute(why),
        })?;
    if let Some(path) = &config.dump_params {
        dump(path, &params)?;
    }
    steps.links.shutdown_all("training finished").await;
    Ok(eval)
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
