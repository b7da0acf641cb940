//! The kubetrain operator: TrainingJob -> pods, headless Service and truthful status.
//!
//! `plan`, `decide` and `progress` are pure and hold every decision; `controller` (the
//! cluster) and `local` (one machine, feature `local`) are thin shells that carry the
//! decisions out.
#![forbid(unsafe_code)]

pub mod api_requests;
pub mod cached_pod;
pub mod cli;
pub mod controller;
#[cfg(feature = "local")]
pub mod curves;
pub mod decide;
pub mod gang;
pub mod isolation;
pub mod leader;
#[cfg(feature = "local")]
pub mod local;
pub mod metrics;
pub mod plan;
pub mod pod_cache;
pub mod pod_state;
#[cfg(feature = "local")]
pub mod podsim;
pub mod progress;
pub mod replica;
pub mod telemetry;
