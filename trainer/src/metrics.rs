//! Prometheus metrics (`kubetrain_trainer_*`) and their `/metrics` HTTP endpoint.
//!
//! The endpoint is axum, as the operator's is: a hand-written server that read the request
//! in one go failed any request split across TCP segments.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
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
    /// Counted per chunk as it arrives, pushes that are later refused included, while
    /// `push_bytes` counts applied pushes: the gap is what is still on its way in.
    pub push_received_bytes: Counter,
    pub pull_bytes: Counter,
    pub request_duration: Histogram,
    pub version: Gauge<i64>,
    /// Async and BoundedStaleness: how many versions behind each applied gradient was.
    pub update_staleness: Histogram,
}

impl Default for PsMetrics {
    fn default() -> Self {
        Self {
            push_bytes: Counter::default(),
            push_received_bytes: Counter::default(),
            pull_bytes: Counter::default(),
            request_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            version: Gauge::default(),
            update_staleness: Histogram::new([
                0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0,
            ]),
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
            "push_received_bytes",
            "Gradient bytes received so far, counted per chunk, refused pushes included",
            self.push_received_bytes.clone(),
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
        r.register(
            "update_staleness_versions",
            "Async and BoundedStaleness: versions behind of each applied gradient",
            self.update_staleness.clone(),
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
    Ok(serve_on(listener, registry))
}

/// Serves `registry` at `/metrics` on a bound listener.
pub fn serve_on(listener: TcpListener, registry: Arc<Registry>) -> tokio::task::JoinHandle<()> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let metrics = get(move || {
        let registry = registry.clone();
        async move {
            let mut body = String::new();
            match encode(&mut body, &registry) {
                Ok(()) => (
                    StatusCode::OK,
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                ),
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    "encoding the metrics failed\n".to_string(),
                ),
            }
        }
    });
    let app = axum::Router::new()
        .route("/metrics", metrics)
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics\n") });
    tokio::spawn(async move {
        // Serving ends only with an accept error the listener cannot recover from; the
        // trainer's work does not depend on its metrics.
        if let Err(error) = axum::serve(listener, app).await {
            tracing::warn!(%error, "the metrics endpoint stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let mut registry = Registry::default();
        ChiefMetrics::default().register(&mut registry);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, serve_on(listener, Arc::new(registry)))
    }

    #[tokio::test]
    async fn a_request_split_across_writes_is_answered_whole() {
        let (addr, _server) = server().await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.set_nodelay(true).unwrap();
        client.write_all(b"GET /metr").await.unwrap();
        client.flush().await.unwrap();
        // Half a request must get no answer: the server waits for the rest.
        let mut early = [0u8; 1];
        let answered = tokio::time::timeout(Duration::from_millis(200), client.read(&mut early));
        assert!(
            answered.await.is_err(),
            "the server answered half a request"
        );
        client
            .write_all(b"ics HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        client.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(
            response.contains("application/openmetrics-text"),
            "{response}"
        );
        assert!(response.contains("kubetrain_trainer_step"), "{response}");
    }

    #[tokio::test]
    async fn other_paths_are_not_found() {
        let (addr, _server) = server().await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        client.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");
        assert!(response.ends_with("try /metrics\n"), "{response}");
    }
}
