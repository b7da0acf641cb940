//! kubetrain's gRPC protocols and the code tonic generates for them: `ParameterServer` and
//! `ParameterTransfer` (the PS), `PipelineStage` (model-parallel stages) and `Progress`
//! (the chief). A crate of its own so that the operator, which only asks the chief for
//! progress, builds without the trainer's math.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("kubetrain.v1");
