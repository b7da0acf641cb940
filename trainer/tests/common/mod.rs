//! Runs real `kubetrain-trainer` processes on loopback. Every wait has a timeout and every
//! child is killed when its handle drops, so a broken trainer fails a test instead of
//! hanging it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The trainers time heartbeats; tests running side by side on 2 cores would starve them.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every process listens on a loopback address of its own (`kubetrain_trainer::loopback`),
/// on these fixed ports: no port is picked free and released before a child binds it.
pub const GRPC_PORT: u16 = 2222;
pub const METRICS_PORT: u16 = 9090;

/// A fresh loopback address with the gRPC port: `127.A.B.C:2222`.
pub fn own_addr() -> String {
    format!("{}:{GRPC_PORT}", kubetrain_trainer::loopback::next_ip())
}

/// `GET path` from `host:port`, read to the end (`Connection: close`).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

/// The value of a Prometheus sample named exactly `name` (no labels) in `text`.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kubetrain-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Addresses of a job on loopback, each on its own free port.
#[derive(Clone)]
pub struct Cluster {
    pub ps: Vec<String>,
    pub worker: Vec<String>,
    pub dir: PathBuf,
    /// `KUBETRAIN_JOB_TOKEN` for every process, as the operator gives every pod.
    pub token: Option<String>,
}

impl Cluster {
    pub fn new(name: &str, ps: usize, workers: usize) -> Self {
        let addr = |_| own_addr();
        Self {
            ps: (0..ps).map(addr).collect(),
            worker: (0..workers).map(addr).collect(),
            dir: temp_dir(name),
            token: None,
        }
    }

    /// The address `role`/`index` listens on.
    pub fn addr(&self, role: &str, index: usize) -> &str {
        match role {
            "ps" => &self.ps[index],
            _ => &self.worker[index],
        }
    }

    /// Where `role`/`index` serves `/metrics` when started with `--metrics-port
    /// METRICS_PORT`.
    pub fn metrics_addr(&self, role: &str, index: usize) -> String {
        let ip = self.addr(role, index).rsplit_once(':').unwrap().0;
        format!("{ip}:{METRICS_PORT}")
    }

    pub fn json(&self) -> String {
        serde_json::json!({"ps": self.ps, "worker": self.worker}).to_string()
    }

    /// Starts one process; `extra` are additional flags.
    pub fn spawn(
        &self,
        role: &str,
        index: usize,
        training: &serde_json::Value,
        extra: &[&str],
    ) -> Proc {
        let name = format!("{role}-{index}");
        // A restarted process appends to the same logs.
        let open = |ext: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(format!("{name}.{ext}")))
                .unwrap()
        };
        let mut command = Command::new(env!("CARGO_BIN_EXE_kubetrain-trainer"));
        if let Some(token) = &self.token {
            command.env("KUBETRAIN_JOB_TOKEN", token);
        }
        let child = command
            .env("KUBETRAIN_CLUSTER", self.json())
            .env("KUBETRAIN_ROLE", role)
            .env("KUBETRAIN_INDEX", index.to_string())
            .env("KUBETRAIN_JOB", "test/job")
            .env("KUBETRAIN_TRAINING", training.to_string())
            .env("POD_IP", self.addr(role, index).rsplit_once(':').unwrap().0)
            .env("RUST_LOG", "info")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(open("out"))
            .stderr(open("err"))
            .spawn()
            .unwrap();
        Proc {
            child,
            name,
            dir: self.dir.clone(),
        }
    }
}

pub struct Proc {
    child: Child,
    pub name: String,
    dir: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.out", self.name))).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.err", self.name))).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        format!(
            "--- {} stdout\n{}\n--- {} stderr\n{}",
            self.name,
            self.stdout(),
            self.name,
            self.stderr()
        )
    }

    /// Waits for exit; panics (after killing) past the timeout.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not exit within {timeout:?}\n{}",
                    self.name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, as the kubelet sends it first on every delete, drain and preemption.
    pub fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM sent");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Polls stdout until `pred` holds; panics past the timeout.
    pub fn wait_for_output(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) {
        self.wait_until(timeout, Self::stdout, pred)
    }

    /// Polls stderr (the trainer's log) until `pred` holds; panics past the timeout.
    pub fn wait_for_log(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) {
        self.wait_until(timeout, Self::stderr, pred)
    }

    fn wait_until(
        &mut self,
        timeout: Duration,
        read: fn(&Self) -> String,
        pred: impl Fn(&str) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !pred(&read(self)) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) before the expected output\n{}",
                    self.name,
                    self.logs()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not print the expected output within {timeout:?}\n{}",
                    self.name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `key=value` from the chief's final line.
pub fn final_value(stdout: &str, key: &str) -> Option<f64> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("kubetrain-trainer: final "))?;
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

/// The largest `step=N` a worker has printed.
pub fn last_step(stdout: &str) -> u64 {
    stdout
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("step="))
        .filter_map(|v| v.split('/').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

pub fn read_params(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn digits_training(
    model: serde_json::Value,
    consistency: serde_json::Value,
    epochs: u32,
) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "dataset": {"builtin": "digits"},
        "optimizer": {"kind": "sgd", "learningRate": 0.05, "momentum": 0.9},
        "batchSize": 32,
        "epochs": epochs,
        "seed": 7,
        "consistency": consistency,
    })
}

/// Ends a test's PS the way the chief does, so that the test can then expect a clean exit.
pub async fn shut_down_ps(
    client: &mut kubetrain_trainer::proto::parameter_server_client::ParameterServerClient<
        tonic::transport::Channel,
    >,
) {
    client
        .shutdown(kubetrain_trainer::proto::ShutdownRequest {
            reason: "test over".into(),
        })
        .await
        .unwrap();
}

/// Polls the chief's Progress service until it reports `step >= min`.
pub fn wait_for_step(chief: &mut Proc, address: &str, min: u64) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let step = runtime.block_on(async {
            let mut client = kubetrain_trainer::proto::progress_client::ProgressClient::connect(
                format!("http://{address}"),
            )
            .await
            .ok()?;
            let report = tokio::time::timeout(
                Duration::from_secs(2),
                client.get_progress(kubetrain_trainer::proto::GetProgressRequest {}),
            )
            .await
            .ok()?
            .ok()?;
            Some(report.into_inner().step)
        });
        if let Some(step) = step.filter(|&s| s >= min) {
            return step;
        }
        assert!(
            Instant::now() < deadline,
            "chief never reached step {min}\n{}",
            chief.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A connected channel to a trainer that is starting, retried for up to 10 s.
pub async fn connect(addr: &str) -> tonic::transport::Channel {
    for _ in 0..100 {
        if let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("PS at {addr} never came up");
}
