//! kubetrain-e2e: the real-API-server test harness (DESIGN.md §6.3–6.4).
//!
//! * [`envtest`]: etcd + kube-apiserver on loopback, a namespace per test, CRD
//!   install, kubeconfig for `kubectl`.
//! * [`dashboard`]: the Grafana dashboard's queries, variables substituted.
//! * [`deploy_tools`]: the real `helm` and `kubernetes-validate`.
//! * [`http`]: bare HTTP/1.0 requests to the processes under test.
//! * [`kubelet`]: a test kubelet that runs pods as local processes and reports
//!   their status, so pods created by the operator actually run.
//! * [`metrics_text`]: the operator's `/metrics`, read back.
//! * [`process`]: the process-cleanup guarantees both rely on.
//! * [`prometheus`]: a real Prometheus, scraping as the chart's monitors say.
//! * [`tensorflow`]: the cached virtualenv with real TensorFlow.
//! * [`volumes`]: the test kubelet's ConfigMap, emptyDir and hostPath mounts.
//!
//! See `tests/README.md` for what this harness does not emulate.
#![forbid(unsafe_code)]

pub mod dashboard;
pub mod deploy_tools;
pub mod envtest;
pub mod http;
pub mod kubelet;
pub mod metrics_text;
pub mod operator;
pub mod operator_log;
pub mod pod_secrets;
pub mod prometheus;
pub mod tensorflow;
pub mod volumes;

pub use envtest::{ApiServer, Binaries, EnvtestError, TestNamespace, shared};
pub use kubelet::{Kubelet, KubeletConfig, KubeletError};
