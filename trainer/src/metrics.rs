//! Prometheus metrics (`kubetrain_trainer_*`) and a minimal `/metrics` HTTP endpoint.
//!
//! The endpoint is a few lines over a TCP listener: one GET path, no keep-alive, so a
//! full HTTP stack would not earn its weight here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::error::TrainerError;

/// Gauges the chief updates as it trains.
#[derive(Clone, Default)]
pub struct ChiefMetrics {
    pub step: Gauge<i64>,
    pub epoch: Gauge<i64>,
    pub loss: Gauge<f64, AtomicU64>,
    pub accuracy: Gauge<f64, AtomicU64>,
    pub samples_per_second: Gauge<f64, AtomicU64>,
    pub finished: Gauge<i64>,
}

impl ChiefMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("kubetrain_trainer");
        r.register("step", "Global training step", self.step.clone());
        r.register("epoch", "Current epoch", self.epoch.clone());
        r.register("loss", "Recent mean training loss", self.loss.clone());
        r.register("accuracy", "Latest test accuracy", self.accuracy.clone());
        r.register(
            "samples_per_second",
            "Training throughput of the whole job",
            self.samples_per_second.clone(),
        );
        r.register(
            "finished",
            "1 once training has finished",
            self.finished.clone(),
        );
    }
}

/// Traffic and latency counters of a parameter server.
#[derive(Clone)]
pub struct PsMetrics {
    pub push_bytes: Counter,
    pub pull_bytes: Counter,
    pub request_duration: Histogram,
    pub version: Gauge<i64>,
}

impl Default for PsMetrics {
    fn default() -> Self {
        Self {
            push_bytes: Counter::default(),
            pull_bytes: Counter::default(),
            request_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            version: Gauge::default(),
        }
    }
}

impl PsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("kubetrain_trainer_ps");
        r.register(
            "push_bytes",
            "Gradient bytes received",
            self.push_bytes.clone(),
        );
        r.register(
            "pull_bytes",
            "Parameter bytes sent",
            self.pull_bytes.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Push and pull handling time, waits included",
            self.request_duration.clone(),
        );
        r.register(
            "version",
            "Shard version (updates applied)",
            self.version.clone(),
        );
    }
}

/// Serves `registry` at `http://addr/metrics` until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
) -> Result<tokio::task::JoinHandle<()>, TrainerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| TrainerError::Metrics { addr, source })?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    socket.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = if path == "/metrics" || path.starts_with("/metrics?") {
                    let mut body = String::new();
                    match encode(&mut body, &registry) {
                        Ok(()) => ("200 OK", body),
                        Err(_) => ("500 Internal Server Error", String::new()),
                    }
                } else {
                    ("404 Not Found", "try /metrics\n".to_string())
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    }))
}
