//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator
//! replicas exactly one reconciles (and writes) at a time.
//!
//! The rules (who may hold the lease next) are a pure function; the loop around it only
//! reads and writes the Lease with optimistic concurrency (resourceVersion), so two
//! candidates can never both win the same term.
//!
//! kube-runtime has no leader election; the `kube-leader-election` crate was passed over
//! because it trails kube's major versions, and the whole mechanism is one Lease and a
//! compare-and-swap.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{PostParams, ResourceExt};
use kube::{Api, Client};
use tracing::{info, warn};

/// Timing of the election, as client-go's defaults scaled for a small operator.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How long a lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// How often the leader renews, and candidates retry.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// PURE: the lease spec `me` should write at `now`, or None when another live holder has it.
pub fn next_lease(
    current: Option<&LeaseSpec>,
    me: &str,
    now: Timestamp,
    timing: Timing,
) -> Option<LeaseSpec> {
    let now_micro = MicroTime(now);
    let duration_secs = i32::try_from(timing.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let fresh = |transitions: i32| LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(duration_secs),
        acquire_time: Some(now_micro.clone()),
        renew_time: Some(now_micro.clone()),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let Some(current) = current else {
        return Some(fresh(0));
    };
    let holder = current.holder_identity.as_deref().unwrap_or("");
    if holder == me {
        return Some(LeaseSpec {
            renew_time: Some(now_micro),
            lease_duration_seconds: Some(duration_secs),
            ..current.clone()
        });
    }
    let valid_for = SignedDuration::from_secs(i64::from(
        current.lease_duration_seconds.unwrap_or(duration_secs),
    ));
    let expired = current
        .renew_time
        .as_ref()
        .is_none_or(|renewed| renewed.0 + valid_for <= now);
    (holder.is_empty() || expired).then(|| fresh(current.lease_transitions.unwrap_or(0) + 1))
}

/// A candidate for one Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
}

/// Leadership was lost (another replica took the lease, or it could not be renewed in time).
#[derive(Debug, thiserror::Error)]
#[error("lost leadership of lease {lease}: {reason}")]
pub struct LostLeadership {
    /// The lease.
    pub lease: String,
    /// Why.
    pub reason: String,
}

impl Elector {
    /// A candidate `identity` for lease `name` in `namespace`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
        }
    }

    /// One try: Ok(true) when `identity` holds the lease afterwards.
    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let existing = self.api.get_opt(&self.name).await?;
        let Some(spec) = next_lease(
            existing.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            Timestamp::now(),
            self.timing,
        ) else {
            return Ok(false);
        };
        let result = match existing {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                // Replace carries the resourceVersion we read: a concurrent writer makes
                // this fail with 409 instead of both believing they lead.
                lease.spec = Some(spec);
                let name = lease.name_any();
                self.api
                    .replace(&name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate leads.
    pub async fn acquire(&self) {
        let mut announced = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(false) if !announced => {
                    info!(lease = %self.name, "another replica leads; standing by");
                    announced = true;
                }
                Ok(false) => {}
                Err(error) => warn!(%error, lease = %self.name, "leader election"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Renews the lease until it is lost; returns why. A leader that cannot renew for a
    /// whole lease duration stops, because by then another replica may lead.
    pub async fn hold(&self) -> LostLeadership {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry_period).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    return LostLeadership {
                        lease: self.name.clone(),
                        reason: "another replica holds it".into(),
                    };
                }
                Err(error) => warn!(%error, "renewing the lease"),
            }
            // Stop a little before the lease can expire for the others.
            if last_renewed.elapsed() + self.timing.retry_period >= self.timing.lease_duration {
                return LostLeadership {
                    lease: self.name.clone(),
                    reason: "could not renew within the lease duration".into(),
                };
            }
        }
    }

    /// Gives the lease up on a clean shutdown, so a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        let name = lease.name_any();
        if let Err(error) = self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            warn!(%error, "releasing the lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn a_missing_lease_is_taken() {
        let spec = next_lease(None, "a", t(0), Timing::default()).unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(spec.lease_duration_seconds, Some(15));
    }

    #[test]
    fn the_holder_renews_and_keeps_its_acquire_time() {
        let held = next_lease(None, "a", t(0), Timing::default()).unwrap();
        let renewed = next_lease(Some(&held), "a", t(5), Timing::default()).unwrap();
        assert_eq!(renewed.acquire_time, held.acquire_time);
        assert_eq!(renewed.renew_time, Some(MicroTime(t(5))));
    }

    #[test]
    fn a_live_lease_of_another_is_left_alone_until_it_expires() {
        let held = next_lease(None, "a", t(0), Timing::default()).unwrap();
        assert!(next_lease(Some(&held), "b", t(14), Timing::default()).is_none());
        let taken = next_lease(Some(&held), "b", t(15), Timing::default()).unwrap();
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.lease_transitions, Some(1));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let mut held = next_lease(None, "a", t(0), Timing::default()).unwrap();
        held.holder_identity = None;
        assert!(next_lease(Some(&held), "b", t(1), Timing::default()).is_some());
    }
}
