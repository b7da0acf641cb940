//! SIGTERM, which Kubernetes sends a pod's containers on every preemption, drain and
//! delete, and follows with SIGKILL after the pod's grace period (30 s unless the pod says
//! otherwise). A PS uses that time to write a final checkpoint; a worker to end the step
//! it is in, so that no half-applied work is left behind.

use tokio::sync::watch;

/// Exit code of a worker or stage that stopped between steps on SIGTERM: 128 + 15, what a
/// shell reports for a process SIGTERM ended, so `restartPolicy: ExitCode` retries it.
pub const EXIT_TERMINATED: u8 = 143;

/// Whether SIGTERM has arrived. Clones share one listener.
#[derive(Clone)]
pub struct Termination(watch::Receiver<bool>);

impl Termination {
    /// Starts listening; call once per process, inside the runtime. Where no handler can
    /// be installed the process keeps the default (SIGTERM ends it at once), and this
    /// never fires.
    pub fn listen() -> Self {
        let (tx, rx) = watch::channel(false);
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                tokio::spawn(async move {
                    if signal.recv().await.is_some() {
                        tracing::info!("SIGTERM received: stopping at the next safe point");
                        tx.send_replace(true);
                    }
                    // Keep `signal` alive, so a second SIGTERM does not kill the process
                    // in the middle of its final checkpoint.
                    std::future::pending::<()>().await;
                });
            }
            Err(error) => {
                tracing::warn!(%error, "no SIGTERM handler: SIGTERM will stop this process at once")
            }
        }
        Self(rx)
    }

    /// A listener that never fires, for callers that run a role in-process.
    pub fn never() -> Self {
        Self(watch::channel(false).1)
    }

    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Runs `work` unless SIGTERM comes first (then `None`). For start-up waits, which
    /// have nothing to finish or save: a worker still registering when its pod is deleted
    /// would otherwise retry a gone PS for the whole grace period, and hold the pod so.
    pub async fn unless_requested<T>(
        &self,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let mut stop = self.clone();
        tokio::select! {
            done = work => Some(done),
            () = stop.wait() => None,
        }
    }

    /// Returns once SIGTERM has arrived (never, for [`Termination::never`]).
    pub async fn wait(&mut self) {
        if self.0.wait_for(|&t| t).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listener_that_never_fires_is_never_requested() {
        let mut never = Termination::never();
        assert!(!never.requested());
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), never.wait()).await;
        assert!(waited.is_err(), "wait() returned without a signal");
    }
}
