//! Distributed runs of the real `kubetrain-trainer` binary, one process per PS and worker.

use super::*;

pub(super) struct RunResult {
    /// The chief's mean time per step in pull, compute and push.
    pub(super) timing: String,
    pub(super) accuracy: f64,
    pub(super) samples_per_second: f64,
    pub(super) seconds: f64,
    pub(super) peak_rss_kib: Vec<(String, u64)>,
    /// Async: the mean of PS 0's staleness histogram, from its last line.
    pub(super) mean_staleness: Option<f64>,
}

/// The mean of the histogram in a PS's `kubetrain-trainer: ps N staleness {0: 12, 1: 3}`.
fn mean_staleness(ps_stdout: &str) -> Option<f64> {
    let histogram = ps_stdout
        .lines()
        .find_map(|l| l.split_once(" staleness {"))?
        .1
        .trim_end_matches('}');
    let (mut updates, mut sum) = (0f64, 0f64);
    for entry in histogram.split(',') {
        let (behind, count) = entry.split_once(':')?;
        let (behind, count): (f64, f64) = (behind.trim().parse().ok()?, count.trim().parse().ok()?);
        updates += count;
        sum += behind * count;
    }
    (updates > 0.0).then(|| sum / updates)
}

/// `servers` PS + `workers` workers as separate processes of the real binary.
pub(super) fn distributed(
    bin: &Path,
    spec: &TrainingSpec,
    servers: usize,
    workers: usize,
    dir: &Path,
) -> RunResult {
    let cluster = ClusterSpec {
        ps: (0..servers).map(|_| own_addr().to_string()).collect(),
        worker: (0..workers).map(|_| own_addr().to_string()).collect(),
        ..ClusterSpec::default()
    };
    std::fs::create_dir_all(dir).unwrap();
    let spawn = |role: &str, index: usize| {
        let name = format!("{role}-{index}");
        let own = if role == "ps" {
            &cluster.ps
        } else {
            &cluster.worker
        };
        let ip = own[index].rsplit_once(':').unwrap().0.to_string();
        Command::new(bin)
            .env("KUBETRAIN_CLUSTER", cluster.to_env())
            .env("KUBETRAIN_ROLE", role)
            .env("KUBETRAIN_INDEX", index.to_string())
            .env("KUBETRAIN_TRAINING", serde_json::to_string(spec).unwrap())
            .env("POD_IP", ip)
            .env("RUST_LOG", "warn")
            .stdout(std::fs::File::create(dir.join(format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    };
    let started = Instant::now();
    let mut children: Vec<_> = (0..servers)
        .map(|p| (format!("ps-{p}"), spawn("ps", p)))
        .collect();
    for w in (0..workers).rev() {
        children.push((format!("worker-{w}"), spawn("worker", w)));
    }
    let mut peaks: Vec<(String, u64)> = children.iter().map(|(n, _)| (n.clone(), 0)).collect();
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let mut running = false;
        for (i, (_, child)) in children.iter_mut().enumerate() {
            if let Some(kib) = peak_rss_kib(child.id()) {
                peaks[i].1 = peaks[i].1.max(kib);
            }
            if child.try_wait().unwrap().is_none() {
                running = true;
            }
        }
        if !running {
            break;
        }
        if Instant::now() > deadline {
            for (_, c) in &mut children {
                let _ = c.kill();
            }
            panic!("distributed run timed out; logs in {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seconds = started.elapsed().as_secs_f64();
    let out = std::fs::read_to_string(dir.join("worker-0.out")).unwrap();
    let line = out
        .lines()
        .find(|l| l.starts_with("kubetrain-trainer: final"))
        .unwrap_or_else(|| panic!("no final line; logs in {}", dir.display()));
    let value = |key: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    RunResult {
        timing: format!(
            "pull {:.1} / compute {:.1} / push {:.1} ms",
            value("pull_ms"),
            value("compute_ms"),
            value("push_ms")
        ),
        accuracy: value("test_accuracy"),
        samples_per_second: value("samples_per_second"),
        seconds,
        peak_rss_kib: peaks,
        mean_staleness: std::fs::read_to_string(dir.join("ps-0.out"))
            .ok()
            .and_then(|out| mean_staleness(&out)),
    }
}

pub(super) fn rss_cell(run: &RunResult) -> String {
    run.peak_rss_kib
        .iter()
        .map(|(n, k)| format!("{n} {:.1}", *k as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join(", ")
}
