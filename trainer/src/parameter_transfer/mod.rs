//! The `ParameterTransfer` calls (Push and Pull), framed by hand on top of tonic's HTTP/2
//! client and server.
//!
//! Through tonic's codec a 16 MiB tensor is copied three times in user space: prost's
//! encoder copies it into tonic's send buffer, tonic's decoder copies the received HTTP/2
//! frames into its own buffer, and the receiver copies the decoded `bytes` into its f32
//! tensor. Here the tensor's own memory goes to HTTP/2 as is, and the receiver copies each
//! HTTP/2 frame straight into its tensor: one copy, as with a socket. The connection, its
//! windows and frame size, deadlines (`grpc-timeout`), status codes and trailers are all
//! still tonic's and standard gRPC, so a generated `ParameterTransferClient` can call the
//! PS, and tests do.
//!
//! `client` is the worker's side, `body` what both sides read and write (the PS's handler,
//! `ps::server::parameter_transfer`, is the PS's own), `framing` the gRPC messages around a
//! tensor, `chunks` a tensor cut into chunks and put back together, and `received` a
//! tensor kept in the frames it arrived in.

pub mod body;
pub mod chunks;
pub mod client;
pub mod framing;
pub mod received;

pub const PUSH_PATH: &str = "/kubetrain.v1.ParameterTransfer/Push";
pub const PULL_PATH: &str = "/kubetrain.v1.ParameterTransfer/Pull";
const GRPC_CONTENT_TYPE: &str = "application/grpc";
