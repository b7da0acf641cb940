//! PURE: the `GangPending` condition from what the controller saw of a gang-scheduled
//! job's PodGroup, and whether its pods may be created yet.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kubetrain_api::condition::{reasons, types};

use super::conditions::upsert;
use super::{Decider, GANG_CRD_RECHECK, GANG_PENDING_RECHECK, JobEvent};
use crate::gang::{self, GangObservation};
use crate::replica::{self, ReplicaId};

impl Decider<'_> {
    /// Sets `GangPending` from what the controller saw of the gang; false when pods must
    /// not be created (the PodGroup CRD is missing).
    pub(super) fn gang_allows_pods(&mut self, by_replica: &BTreeMap<ReplicaId, &Pod>) -> bool {
        let was = |reason: &str| {
            self.status
                .conditions
                .iter()
                .any(|c| c.type_ == types::GANG_PENDING && c.reason == reason)
        };
        match self.gang {
            GangObservation::Off => true,
            GangObservation::NotConfigured => {
                let message = "runPolicy.schedulingPolicy.gang is true, but the operator runs \
                    without --gang-scheduler: pods are scheduled one by one by the default \
                    scheduler. Start the operator with --gang-scheduler volcano or \
                    scheduler-plugins (Helm value gangScheduler)"
                    .to_string();
                if !was(reasons::GANG_SCHEDULER_NOT_CONFIGURED) {
                    self.events.push(JobEvent::warning(
                        reasons::GANG_SCHEDULER_NOT_CONFIGURED,
                        "ScheduleGang",
                        message.clone(),
                    ));
                }
                // Shown although False: it is the one place the user learns why the
                // gang they asked for is not there.
                upsert(
                    &mut self.status.conditions,
                    types::GANG_PENDING,
                    false,
                    reasons::GANG_SCHEDULER_NOT_CONFIGURED,
                    message,
                    self.now,
                );
                true
            }
            GangObservation::CrdMissing { scheduler, detail } => {
                let resource = scheduler.api_resource();
                let message = format!(
                    "gang scheduling needs the PodGroup CRD {} ({}), which this cluster does \
                     not serve ({detail}); no pods are created until it is installed. Install \
                     {scheduler:?}, or set runPolicy.schedulingPolicy.gang to false",
                    resource.api_version, resource.plural,
                );
                if !was(reasons::POD_GROUP_CRD_MISSING) {
                    self.events.push(JobEvent::warning(
                        reasons::POD_GROUP_CRD_MISSING,
                        "ScheduleGang",
                        message.clone(),
                    ));
                }
                self.set_detail(
                    types::GANG_PENDING,
                    true,
                    reasons::POD_GROUP_CRD_MISSING,
                    message,
                );
                self.wake_in(GANG_CRD_RECHECK);
                false
            }
            GangObservation::Group(group) => {
                let wanted = replica::replica_ids(self.job);
                let pending = wanted
                    .iter()
                    .filter(|r| !by_replica.get(r).is_some_and(|p| gang::is_scheduled(p)))
                    .count();
                if group.admitted() || pending == 0 {
                    self.set_detail(
                        types::GANG_PENDING,
                        false,
                        reasons::GANG_ADMITTED,
                        format!(
                            "PodGroup {} admitted the gang of {} pods",
                            group.name,
                            wanted.len()
                        ),
                    );
                } else {
                    let phase = if group.phase.is_empty() {
                        "not yet seen by the scheduler".to_string()
                    } else {
                        format!("phase {}", group.phase)
                    };
                    let why = group
                        .unschedulable
                        .as_ref()
                        .map_or(String::new(), |u| format!("; scheduler: {u}"));
                    self.wake_in(GANG_PENDING_RECHECK);
                    let reason = if group.unschedulable.is_some() {
                        reasons::GANG_UNSCHEDULABLE
                    } else {
                        reasons::POD_GROUP_PENDING
                    };
                    self.set_detail(
                        types::GANG_PENDING,
                        true,
                        reason,
                        format!(
                            "PodGroup {} ({phase}) has not admitted the gang: {pending} of {} \
                             pods still pending, minMember {}{why}",
                            group.name,
                            wanted.len(),
                            gang::min_member(self.job),
                        ),
                    );
                }
                true
            }
        }
    }
}
