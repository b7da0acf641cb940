//! Pods played by local processes: what `kubetrain local` and the test kubelet share.
//!
//! A process is not a pod: it has no network namespace of its own, no cluster DNS and no
//! volumes. This module gives both runners one answer to each of those, so that a program
//! sees the same world under `kubetrain local` as under the end-to-end harness:
//!
//! - [`container`]: a process's exit as a container state, the restart policy, and the
//!   crash-loop backoff.
//! - [`network`]: every pod gets its own loopback address, and its contract port is mapped
//!   to a host port of its own, so programs that bind `0.0.0.0:<port>` (TensorFlow's
//!   servers do) never collide. Cluster DNS names in the pod's env become those addresses.
//! - [`forward`]: the pod's contract port on its own address is forwarded to the mapped
//!   port, so whoever dials `podIP:2222`, as the operator does for progress, still
//!   arrives.
//! - [`paths`]: container paths of mounted volumes become host directories in argv and
//!   env.
//! - [`secrets`]: env values from Secrets, as a kubelet resolves `secretKeyRef`.
//! - [`termination`]: what a process left at its termination-message path, for the
//!   terminated container state.
//! - [`launch`]: the program, argv and env a pod's main container starts as.
//! - [`pod_status`]: the status a kubelet writes as the container runs, backs off and ends.
//! - [`process_group`]: each process in a group of its own, killed even when the runner
//!   dies.
//! - [`run`]: the kubelet's loop for one pod: start, report, restart, stop. The runners
//!   differ only in where the status goes.

pub mod container;
pub mod forward;
pub mod launch;
pub mod network;
pub mod paths;
pub mod pod_status;
pub mod process_group;
pub mod run;
pub mod secrets;
pub mod termination;
