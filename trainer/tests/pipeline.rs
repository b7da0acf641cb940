//! Model-parallel pipelines: real `kubetrain-trainer` stage processes on loopback.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kubetrain_trainer::model::Network;
use kubetrain_trainer::proto::GetProgressRequest;
use kubetrain_trainer::proto::pipeline_stage_client::PipelineStageClient;
use kubetrain_trainer::proto::progress_client::ProgressClient;
use kubetrain_trainer::proto::*;
use serde_json::json;
use tonic::Code;

const RUN: Duration = Duration::from_secs(120);
const MP: [&str; 2] = ["--mode", "ModelParallel"];

fn pipeline_training(
    hidden: &[u32],
    schedule: &str,
    micro_batches: u32,
    optimizer: serde_json::Value,
    epochs: u32,
) -> serde_json::Value {
    json!({
        "model": {"kind": "mlp", "hidden": hidden},
        "dataset": {"builtin": "digits"},
        "optimizer": optimizer,
        "batchSize": 32,
        "epochs": epochs,
        "seed": 7,
        "pipeline": {"microBatches": micro_batches, "schedule": schedule},
    })
}

/// Starts every stage of a pipeline; the chief last, with `chief_extra`.
fn spawn_stages(
    cluster: &Cluster,
    training: &serde_json::Value,
    extra: &[&str],
    chief_extra: &[&str],
) -> (Proc, Vec<Proc>) {
    let mut args: Vec<&str> = MP.to_vec();
    args.extend(extra);
    let others = (1..cluster.worker.len())
        .map(|i| cluster.spawn("worker", i, training, &args))
        .collect();
    args.extend(chief_extra);
    (cluster.spawn("worker", 0, training, &args), others)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs `steps` pipelined steps and the same steps in one process with the whole batch;
/// returns (pipeline params, single-process params).
fn pipeline_and_local(
    name: &str,
    stages: usize,
    training: &serde_json::Value,
    steps: u64,
) -> (Vec<f32>, Vec<f32>) {
    let cluster = Cluster::new(name, 0, stages);
    let dump = cluster.dir.join("params.bin");
    let max = steps.to_string();
    let (mut chief, mut others) = spawn_stages(
        &cluster,
        training,
        &["--max-steps", &max],
        &["--dump-params", dump.to_str().unwrap()],
    );
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    for p in &mut others {
        assert!(p.wait(RUN).success(), "{}", p.logs());
    }
    let spec: kubetrain_api::TrainingSpec = serde_json::from_value(training.clone()).unwrap();
    let local = kubetrain_trainer::local::train(&spec, 1, Some(steps)).unwrap();
    assert_eq!(local.steps, steps);
    (read_params(&dump), local.params)
}

#[test]
fn pipeline_gradients_equal_full_batch_gradients() {
    let _serial = serial();
    let hidden = [32u32, 16];
    let net = Network::new(64, &[32, 16], 10);
    let init = net.init(7);
    // Plain SGD with learning rate 1 for one step: the parameters move by exactly the
    // gradient, so comparing parameters compares gradients.
    let sgd = json!({"kind": "sgd", "learningRate": 1.0});
    for stages in [2, 3] {
        for micro in [1, 4] {
            for schedule in ["GPipe", "1F1B"] {
                let training = pipeline_training(&hidden, schedule, micro, sgd.clone(), 1);
                let name = format!("pipe-grad-{stages}-{micro}-{schedule}");
                let (piped, local) = pipeline_and_local(&name, stages, &training, 1);
                let g_pipe: Vec<f32> = init.iter().zip(&piped).map(|(a, b)| a - b).collect();
                let g_local: Vec<f32> = init.iter().zip(&local).map(|(a, b)| a - b).collect();
                let diff = max_diff(&g_pipe, &g_local);
                let largest = g_local.iter().fold(0.0f32, |m, g| m.max(g.abs()));
                eprintln!(
                    "K={stages} M={micro} {schedule}: max |grad diff| {diff:e} (largest |grad| {largest})"
                );
                assert!(largest > 1e-2, "the gradient is trivially small: {largest}");
                assert!(
                    diff <= 1e-5,
                    "K={stages} M={micro} {schedule}: max |grad diff| {diff}"
                );
            }
        }
    }
}

#[test]
fn pipelined_training_tracks_full_batch_training_over_many_steps() {
    let _serial = serial();
    let momentum = json!({"kind": "sgd", "learningRate": 0.05, "momentum": 0.9});
    for (stages, micro, schedule) in [(2, 4, "1F1B"), (3, 4, "GPipe")] {
        let training = pipeline_training(&[32, 16], schedule, micro, momentum.clone(), 5);
        let name = format!("pipe-steps-{stages}-{micro}");
        let (piped, local) = pipeline_and_local(&name, stages, &training, 60);
        let diff = max_diff(&piped, &local);
        let init = Network::new(64, &[32, 16], 10).init(7);
        let moved = max_diff(&init, &local);
        eprintln!("K={stages} M={micro} {schedule}: max |param diff| after 60 steps {diff:e}");
        assert!(
            moved > 0.05,
            "training barely moved the parameters ({moved})"
        );
        assert!(
            diff <= 1e-5,
            "K={stages} M={micro}: max |param diff| {diff}"
        );
    }
}

fn progress(address: &str) -> Option<ProgressReport> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = ProgressClient::connect(format!("http://{address}"))
            .await
            .ok()?;
        let report = tokio::time::timeout(
            Duration::from_secs(2),
            client.get_progress(GetProgressRequest {}),
        )
        .await
        .ok()?
        .ok()?;
        Some(report.into_inner())
    })
}

fn wait_for_step(chief: &mut Proc, address: &str, min: u64) -> ProgressReport {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(report) = progress(address).filter(|r| r.step >= min) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "chief never reached step {min}\n{}",
            chief.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pipeline_converges_like_one_data_parallel_worker_and_reports_progress() {
    let _serial = serial();
    let hidden = [64u32, 32];
    let sgd = json!({"kind": "sgd", "learningRate": 0.05, "momentum": 0.9});
    let epochs = 15;

    // The data-parallel reference: one PS and one worker.
    let dp = Cluster::new("pipe-conv-dp", 1, 1);
    let mut dp_training = pipeline_training(&hidden, "1F1B", 4, sgd.clone(), epochs);
    dp_training.as_object_mut().unwrap().remove("pipeline");
    let mut ps = dp.spawn("ps", 0, &dp_training, &[]);
    let mut worker = dp.spawn("worker", 0, &dp_training, &[]);
    assert!(worker.wait(RUN).success(), "{}", worker.logs());
    assert!(ps.wait(RUN).success(), "{}", ps.logs());
    let dp_accuracy = final_value(&worker.stdout(), "test_accuracy").expect("final line");

    let cluster = Cluster::new("pipe-conv", 0, 3);
    let training = pipeline_training(&hidden, "1F1B", 4, sgd, epochs);
    let port = METRICS_PORT.to_string();
    let (mut chief, mut others) =
        spawn_stages(&cluster, &training, &[], &["--metrics-port", &port]);

    // The operator's view while it trains: steps, loss, accuracy and the partition.
    chief.wait_for_output(RUN, |out| out.contains("epoch 1 done"));
    // Epochs count from 1 in the logs, as in status.progress and in data-parallel mode.
    assert!(
        !chief.stdout().contains("epoch 0 done"),
        "{}",
        chief.stdout()
    );
    let metrics = http_get(&cluster.metrics_addr("worker", 0), "/metrics");
    for name in [
        "kubetrain_trainer_step",
        "kubetrain_trainer_loss",
        "kubetrain_trainer_accuracy",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }

    let report = wait_for_step(&mut chief, &cluster.worker[0], 1);
    assert!(
        report.step > 0 && report.total_steps > report.step && !report.finished,
        "{report:?}"
    );
    assert!(report.accuracy > 0.5 && report.loss > 0.0, "{report:?}");
    assert_eq!(report.partition.len(), 3, "{report:?}");
    assert_eq!(report.partition[0].first_layer, 0);
    assert_eq!(report.partition[2].end_layer, 3);
    for w in report.partition.windows(2) {
        assert_eq!(w[0].end_layer, w[1].first_layer, "{report:?}");
    }
    let total_params: u64 = report.partition.iter().map(|p| p.params).sum();
    assert_eq!(
        total_params as usize,
        Network::new(64, &[64, 32], 10).num_params()
    );
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    for p in &mut others {
        assert!(p.wait(RUN).success(), "{}", p.logs());
        assert!(
            p.stdout().contains("finished steps="),
            "no stage summary\n{}",
            p.logs()
        );
    }
    let out = chief.stdout();
    assert!(
        out.contains("pipeline partition stage 0: layers [0,"),
        "{out}"
    );
    let accuracy = final_value(&out, "test_accuracy").expect("final line");
    for key in ["test_loss", "loss", "steps", "samples_per_second"] {
        assert!(final_value(&out, key).is_some(), "{key} missing:\n{out}");
    }
    eprintln!("pipeline accuracy {accuracy}, data-parallel accuracy {dp_accuracy}");
    assert!(accuracy >= 0.9, "accuracy {accuracy}\n{}", chief.logs());
    assert!(
        (accuracy - dp_accuracy).abs() <= 0.005,
        "pipeline {accuracy} vs data-parallel {dp_accuracy}"
    );
}

#[test]
fn a_dead_stage_fails_every_other_stage_fast_naming_it() {
    let _serial = serial();
    let sgd = json!({"kind": "sgd", "learningRate": 0.05, "momentum": 0.9});
    let training = pipeline_training(&[64, 32], "1F1B", 4, sgd, 500);
    for victim in [0usize, 1, 2] {
        let cluster = Cluster::new(&format!("pipe-kill-{victim}"), 0, 3);
        let (chief, others) = spawn_stages(&cluster, &training, &[], &[]);
        let mut procs = vec![chief];
        procs.extend(others);
        wait_for_step(&mut procs[0], &cluster.worker[0], 30);
        procs[victim].kill();
        let killed = Instant::now();
        let named = format!("stage {victim} ({})", cluster.worker[victim]);
        for (i, p) in procs.iter_mut().enumerate() {
            if i == victim {
                continue;
            }
            let status = p.wait(Duration::from_secs(30));
            let took = killed.elapsed();
            assert!(!status.success(), "stage {i} should fail\n{}", p.logs());
            assert!(
                took < Duration::from_secs(6),
                "stage {i} took {took:?} to fail\n{}",
                p.logs()
            );
            let err = p.stderr();
            let line = err
                .lines()
                .find(|l| l.starts_with("kubetrain-trainer: error:"))
                .unwrap_or_else(|| panic!("no error line\n{}", p.logs()));
            assert!(
                line.contains(&named),
                "stage {i}: {line} should name {named}"
            );
        }
    }
}

#[test]
fn restarted_stages_resume_from_their_checkpoints() {
    let _serial = serial();
    let cluster = Cluster::new("pipe-ckpt", 0, 2);
    let ckpt = cluster.dir.join("ckpt");
    let sgd = json!({"kind": "sgd", "learningRate": 0.05, "momentum": 0.9});
    let mut training = pipeline_training(&[64, 32], "GPipe", 4, sgd, 4);
    training["checkpoint"] = json!({"path": ckpt.to_str().unwrap(), "everySteps": 10});
    let (mut chief, mut others) = spawn_stages(&cluster, &training, &[], &[]);
    wait_for_step(&mut chief, &cluster.worker[0], 35);
    others[0].kill();
    assert!(
        !chief.wait(Duration::from_secs(30)).success(),
        "{}",
        chief.logs()
    );
    // The pods' restart: both stages come back and agree on a common checkpoint.
    let (mut chief, mut others) = spawn_stages(&cluster, &training, &[], &[]);
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    assert!(others[0].wait(RUN).success(), "{}", others[0].logs());
    for p in [&chief, &others[0]] {
        let log = p.stderr();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("resumed stage from checkpoint"))
            .unwrap_or_else(|| panic!("no resume\n{}", p.logs()));
        assert!(
            line.contains("step=30") || line.contains("step=40"),
            "{line}"
        );
    }
    let accuracy = final_value(&chief.stdout(), "test_accuracy").expect("final line");
    assert!(accuracy >= 0.9, "accuracy {accuracy}\n{}", chief.logs());
    // Only the newest two checkpoints per stage are kept.
    let files = std::fs::read_dir(&ckpt).unwrap().count();
    assert_eq!(
        files,
        4,
        "{:?}",
        std::fs::read_dir(&ckpt).unwrap().collect::<Vec<_>>()
    );
}

#[test]
fn a_stage_rejects_bad_calls_and_keeps_serving() {
    let _serial = serial();
    let cluster = Cluster::new("pipe-bad", 0, 2);
    let sgd = json!({"kind": "sgd", "learningRate": 0.05});
    let training = pipeline_training(&[8], "1F1B", 2, sgd, 1);
    // Stage 1 alone: no chief will ever start it, so we play the chief.
    let mut stage = cluster.spawn(
        "worker",
        1,
        &training,
        &[MP[0], MP[1], "--idle-timeout-secs", "60"],
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = None;
        for _ in 0..100 {
            if let Ok(c) =
                PipelineStageClient::connect(format!("http://{}", cluster.worker[1])).await
            {
                client = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut client = client.expect("stage never came up");
        let tensor = |from: u32, rows: u32, floats: usize, labels: usize| StageTensor {
            from_stage: from,
            step: 0,
            micro_batch: 0,
            rows,
            offset: 0,
            total_len: floats as u64,
            data: vec![0u8; floats * 4].into(),
            labels: vec![0u8; labels].into(),
            loss_sum: 0.0,
        };
        let err = client
            .forward(tokio_stream::iter(vec![tensor(0, 1, 8, 1)]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
        let err = client
            .hello(HelloRequest {
                from_stage: 0,
                stages: 5,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let err = client
            .start(StartRequest {
                widths: vec![64],
                batch: 4,
                micro_batches: 2,
                total_steps: 1,
                resume_step: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        client
            .start(StartRequest {
                widths: vec![64, 8, 10],
                batch: 4,
                micro_batches: 2,
                total_steps: 1,
                resume_step: 0,
            })
            .await
            .unwrap();
        // Now started: stage 1 takes 2 x 8 activations from stage 0, nothing else.
        for (bad, why) in [
            (tensor(1, 2, 16, 2), "wrong sender"),
            (tensor(0, 2, 15, 2), "wrong shape"),
            (tensor(0, 9, 72, 9), "more rows than the batch"),
            (tensor(0, 2, 16, 1), "labels missing"),
        ] {
            let err = client
                .forward(tokio_stream::iter(vec![bad]))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{why}: {err}");
        }
        let err = client
            .backward(tokio_stream::iter(vec![tensor(2, 2, 20, 0)]))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "the last stage takes no gradients: {err}"
        );
        // Still alive and answering.
        let hello = client
            .hello(HelloRequest {
                from_stage: 0,
                stages: 2,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(hello.stage, 1);
    });
    stage.kill();
}
