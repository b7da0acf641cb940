//! Multi-process data-parallel training over loopback gRPC.

mod common;

use std::time::Duration;

use common::*;
use kubetrain_trainer::proto::GetProgressRequest;
use kubetrain_trainer::proto::progress_client::ProgressClient;
use serde_json::json;

const RUN: Duration = Duration::from_secs(90);

#[test]
fn sync_two_workers_converge_on_digits_and_report_progress() {
    let _serial = serial();
    let cluster = Cluster::new("sync", 1, 2);
    // Enough epochs that the chief is surely still training while this test reads its
    // progress and metrics after epoch 1.
    let training = digits_training(
        json!({"kind": "mlp", "hidden": [64]}),
        json!({"kind": "Sync"}),
        30,
    );
    let (chief_metrics, ps_metrics) = (
        cluster.metrics_addr("worker", 0),
        cluster.metrics_addr("ps", 0),
    );
    let mut ps = cluster.spawn(
        "ps",
        0,
        &training,
        &["--metrics-port", &METRICS_PORT.to_string()],
    );
    let mut w1 = cluster.spawn("worker", 1, &training, &[]);
    let mut chief = cluster.spawn(
        "worker",
        0,
        &training,
        &["--metrics-port", &METRICS_PORT.to_string()],
    );

    // The operator's view: GetProgress on the chief while it trains.
    chief.wait_for_output(RUN, |out| out.contains("epoch 1 done"));
    // Epochs count from 1 in the logs, as in status.progress.
    assert!(
        !chief.stdout().contains("epoch 0 done"),
        "{}",
        chief.stdout()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(async {
        let mut client = ProgressClient::connect(format!("http://{}", cluster.worker[0]))
            .await
            .unwrap();
        client
            .get_progress(GetProgressRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    assert!(
        report.step > 0 && report.total_steps > report.step,
        "{report:?}"
    );
    assert!(
        report.accuracy > 0.5 && report.loss > 0.0 && !report.finished,
        "{report:?}"
    );
    // Epochs count from 1, as the status documents: the epoch the last step was in.
    let steps_per_epoch = report.total_steps / 30;
    assert_eq!(
        u64::from(report.epoch),
        (report.step - 1) / steps_per_epoch + 1,
        "{report:?}"
    );
    let metrics = http_get(&chief_metrics, "/metrics");
    for name in [
        "kubetrain_trainer_step",
        "kubetrain_trainer_loss",
        "kubetrain_trainer_accuracy",
        "kubetrain_trainer_samples_per_second",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    let metrics = http_get(&ps_metrics, "/metrics");
    for name in [
        "kubetrain_trainer_ps_push_bytes_total",
        "kubetrain_trainer_ps_pull_bytes_total",
        "kubetrain_trainer_ps_request_duration_seconds_bucket",
        "kubetrain_trainer_ps_update_staleness_versions_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }

    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    assert!(w1.wait(RUN).success(), "{}", w1.logs());
    assert!(ps.wait(RUN).success(), "{}", ps.logs());
    let accuracy = final_value(&chief.stdout(), "test_accuracy").expect("final line");
    // 30 epochs of a 64-unit mlp reach about 0.95-0.97 on the 360 held-out digits.
    assert!(accuracy >= 0.93, "accuracy {accuracy}\n{}", chief.logs());
}

fn equivalence(workers: usize, servers: usize) {
    let _serial = serial();
    let cluster = Cluster::new(&format!("equiv{workers}"), servers, workers);
    let training = digits_training(
        json!({"kind": "mlp", "hidden": [32]}),
        json!({"kind": "Sync"}),
        50,
    );
    let dump = cluster.dir.join("params.bin");
    let mut procs: Vec<Proc> = (0..servers)
        .map(|i| cluster.spawn("ps", i, &training, &[]))
        .collect();
    for w in 1..workers {
        procs.push(cluster.spawn("worker", w, &training, &["--max-steps", "100"]));
    }
    let mut chief = cluster.spawn(
        "worker",
        0,
        &training,
        &[
            "--max-steps",
            "100",
            "--dump-params",
            dump.to_str().unwrap(),
        ],
    );
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    for p in &mut procs {
        assert!(p.wait(RUN).success(), "{}", p.logs());
    }
    let distributed = read_params(&dump);

    let spec: kubetrain_api::TrainingSpec = serde_json::from_value(training).unwrap();
    let local = kubetrain_trainer::local::train(&spec, workers, Some(100)).unwrap();
    assert_eq!(local.steps, 100);
    assert_eq!(distributed.len(), local.params.len());
    let max_diff = distributed
        .iter()
        .zip(&local.params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff <= 1e-5,
        "max |diff| {max_diff} after 100 steps with {workers} workers"
    );
    eprintln!("{workers} workers: max |param diff| vs one process = {max_diff:e}");
    // And training really moved the parameters, so the comparison means something.
    let moved = spec_init_distance(&spec, &local.params);
    assert!(moved > 0.1, "parameters barely moved ({moved})");
}

#[test]
fn sync_two_workers_match_one_process_with_double_batch() {
    equivalence(2, 1);
}

#[test]
fn sync_four_workers_over_two_shards_match_one_process_with_quadruple_batch() {
    equivalence(4, 2);
}

fn converges(consistency: serde_json::Value, name: &str) {
    let _serial = serial();
    let cluster = Cluster::new(name, 2, 2);
    let training = digits_training(json!({"kind": "mlp", "hidden": [64]}), consistency, 6);
    let mut ps: Vec<Proc> = (0..2)
        .map(|i| cluster.spawn("ps", i, &training, &[]))
        .collect();
    let mut w1 = cluster.spawn("worker", 1, &training, &[]);
    let mut chief = cluster.spawn("worker", 0, &training, &[]);
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    assert!(w1.wait(RUN).success(), "{}", w1.logs());
    for p in &mut ps {
        assert!(p.wait(RUN).success(), "{}", p.logs());
        assert!(
            p.stdout().contains("staleness"),
            "no staleness histogram\n{}",
            p.logs()
        );
    }
    let accuracy = final_value(&chief.stdout(), "test_accuracy").expect("final line");
    assert!(accuracy >= 0.9, "accuracy {accuracy}\n{}", chief.logs());
}

#[test]
fn async_converges() {
    converges(json!({"kind": "Async"}), "async");
}

#[test]
fn async_staleness_is_on_the_parameter_servers_metrics() {
    let _serial = serial();
    let cluster = Cluster::new("async-metrics", 1, 2);
    // Long enough that the run is still going when the metrics are read after epoch 1.
    let training = digits_training(
        json!({"kind": "mlp", "hidden": [64]}),
        json!({"kind": "Async"}),
        30,
    );
    let ps_metrics = cluster.metrics_addr("ps", 0);
    let _ps = cluster.spawn(
        "ps",
        0,
        &training,
        &["--metrics-port", &METRICS_PORT.to_string()],
    );
    let _w1 = cluster.spawn("worker", 1, &training, &[]);
    let mut chief = cluster.spawn("worker", 0, &training, &[]);
    chief.wait_for_output(RUN, |out| out.contains("epoch 1 done"));
    let metrics = http_get(&ps_metrics, "/metrics");
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{metrics}"))
    };
    let updates = value("kubetrain_trainer_ps_update_staleness_versions_count");
    let fresh = value("kubetrain_trainer_ps_update_staleness_versions_bucket{le=\"0.0\"}");
    let within_64 = value("kubetrain_trainer_ps_update_staleness_versions_bucket{le=\"64.0\"}");
    // Every applied update is counted; with two workers, some were behind, none far.
    let version = value("kubetrain_trainer_ps_version");
    assert!(updates > 0.0 && updates <= version, "{metrics}");
    assert!(fresh < updates, "no update was stale\n{metrics}");
    assert_eq!(within_64, updates, "{metrics}");
}

#[test]
fn bounded_staleness_converges() {
    converges(json!({"kind": "BoundedStaleness", "staleness": 2}), "bsp");
}

fn spec_init_distance(spec: &kubetrain_api::TrainingSpec, params: &[f32]) -> f32 {
    let net = kubetrain_trainer::model::Network::new(64, &[32], 10);
    let init = net.init(spec.seed);
    init.iter()
        .zip(params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_taken_metrics_port_costs_only_the_metrics_and_the_chief_leaves_its_final_progress() {
    let _serial = serial();
    let cluster = Cluster::new("last-words", 1, 1);
    let training = digits_training(json!({"kind": "softmax"}), json!({"kind": "Async"}), 2);
    // Someone else (a node exporter, another pod on the host network) holds the port.
    let _taken = std::net::TcpListener::bind(cluster.metrics_addr("worker", 0)).unwrap();
    let port = METRICS_PORT.to_string();
    let last_words = cluster.dir.join("termination-log");
    let mut ps = cluster.spawn("ps", 0, &training, &[]);
    let mut chief = cluster.spawn(
        "worker",
        0,
        &training,
        &[
            "--metrics-port",
            &port,
            "--termination-log",
            last_words.to_str().unwrap(),
        ],
    );
    assert!(chief.wait(RUN).success(), "{}", chief.logs());
    assert!(ps.wait(RUN).success(), "{}", ps.logs());
    assert!(
        chief
            .stderr()
            .contains("training without a metrics endpoint"),
        "{}",
        chief.logs()
    );

    let message = std::fs::read_to_string(&last_words).unwrap();
    let last = kubetrain_api::contract::FinalProgress::from_message(&message)
        .unwrap_or_else(|| panic!("not a final progress report: {message:?}"));
    let steps = final_value(&chief.stdout(), "steps").expect("final line");
    let accuracy = final_value(&chief.stdout(), "test_accuracy").expect("final line");
    assert_eq!(last.step as f64, steps, "{message}");
    assert_eq!(last.epoch, 2, "two epochs, counted from 1: {message}");
    assert!((last.accuracy - accuracy).abs() < 1e-4, "{message}");
    assert!(
        last.loss > 0.0 && last.samples_per_second > 0.0,
        "{message}"
    );
}
