//! PURE: condition bookkeeping. Exactly one lifecycle condition is True; detail conditions
//! are added once they are first True; a transition time moves only when a status flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kubetrain_api::JobCondition;
use kubetrain_api::condition::{reasons, types};

use super::Decider;

impl Decider<'_> {
    /// Makes `type_` the one True lifecycle condition.
    pub(super) fn set_lifecycle(
        &mut self,
        type_: &'static str,
        reason: &'static str,
        message: String,
    ) {
        let now = self.now;
        for other in types::LIFECYCLE.iter().filter(|t| **t != type_) {
            if let Some(c) = self
                .status
                .conditions
                .iter_mut()
                .find(|c| c.type_ == *other)
                && c.is_true()
            {
                *c = JobCondition {
                    type_: c.type_.clone(),
                    status: "False".into(),
                    reason: reasons::SUPERSEDED.into(),
                    message: format!("the job is now {type_}"),
                    last_transition_time: Some(Time(now)),
                };
            }
        }
        upsert(
            &mut self.status.conditions,
            type_,
            true,
            reason,
            message,
            now,
        );
    }

    /// Sets a detail condition; a False detail that never was True is not added.
    pub(super) fn set_detail(
        &mut self,
        type_: &'static str,
        on: bool,
        reason: &str,
        message: String,
    ) {
        let exists = self.status.conditions.iter().any(|c| c.type_ == type_);
        if on || exists {
            upsert(
                &mut self.status.conditions,
                type_,
                on,
                reason,
                message,
                self.now,
            );
        }
    }
}

/// Inserts or updates a condition; lastTransitionTime moves only when the status flips.
pub(super) fn upsert(
    conditions: &mut Vec<JobCondition>,
    type_: &str,
    on: bool,
    reason: &str,
    message: String,
    now: Timestamp,
) {
    let status = if on { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Some(Time(now));
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message;
        }
        None => conditions.push(JobCondition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: Some(Time(now)),
        }),
    }
}

/// Lifecycle conditions first in their fixed order, then details by name, so the State
/// column (the first True condition) always shows the lifecycle state.
pub(super) fn sort_conditions(conditions: &mut [JobCondition]) {
    let rank = |c: &JobCondition| {
        types::LIFECYCLE
            .iter()
            .position(|t| *t == c.type_)
            .unwrap_or(types::LIFECYCLE.len())
    };
    conditions.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.type_.cmp(&b.type_)));
}
