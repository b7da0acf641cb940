//! PURE: who may drive a job. Each job with the built-in trainer gets a token in a Secret
//! it owns (the trainer refuses calls without it), and each job a NetworkPolicy that
//! admits to its pods only the job's own pods, the operator (for progress) and metric
//! scrapes. The token is random, so it is made at the edge ([`new_token`]) and passed in.
//! The threat model is in docs/deploy.md.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kubetrain_api::TrainingJob;
use kubetrain_api::contract;
use rand::Rng;

#[cfg(test)]
use crate::plan::OperatorPods;
use crate::plan::{PlanSettings, child_meta};
use crate::replica::job_labels;

/// 32 random bytes as 64 hex digits, from the operating system's generator (through
/// `rand`'s thread-local ChaCha, seeded from it).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the job's pods get a token: only the built-in trainer checks one.
pub fn uses_token(job: &TrainingJob) -> bool {
    job.spec.training.is_some()
}

/// The job's token Secret. Immutable: the running pods hold this token, so a changed
/// one could only lock out the pods started after the change.
pub fn token_secret(job: &TrainingJob, token: &str) -> Secret {
    Secret {
        metadata: child_meta(
            job,
            contract::token_secret_name(&job.name_any()),
            job_labels(job),
        ),
        immutable: Some(true),
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(
            contract::TOKEN_SECRET_KEY.to_string(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The job's NetworkPolicy, or None when `--job-network-policy` is off. It selects the
/// job's pods and admits, on ingress only:
/// - every port from the job's own pods (a TensorFlow program picks its own ports);
/// - the trainer port from the operator's pods, for progress;
/// - the port named `metrics` from anywhere, for Prometheus (counters, no control).
///
/// NetworkPolicies add up, so a user's own policy can admit more.
pub fn network_policy(job: &TrainingJob, settings: &PlanSettings) -> Option<NetworkPolicy> {
    let operator = settings.job_network_policy.as_ref()?;
    let job_pods = LabelSelector {
        match_labels: Some(BTreeMap::from([(
            contract::LABEL_JOB_NAME.to_string(),
            job.name_any(),
        )])),
        match_expressions: None,
    };
    let tcp = |port: IntOrString| NetworkPolicyPort {
        port: Some(port),
        protocol: Some("TCP".to_string()),
        end_port: None,
    };
    let mut ingress = vec![
        NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(job_pods.clone()),
                ..NetworkPolicyPeer::default()
            }]),
            ports: None,
        },
        NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        "kubernetes.io/metadata.name".to_string(),
                        operator.namespace.clone(),
                    )])),
                    match_expressions: None,
                }),
                pod_selector: Some(LabelSelector {
                    match_labels: Some(operator.labels.clone()),
                    match_expressions: None,
                }),
                ip_block: None,
            }]),
            ports: Some(vec![tcp(IntOrString::Int(i32::from(settings.port)))]),
        },
    ];
    if settings.trainer_metrics_port.is_some() && job.spec.training.is_some() {
        ingress.push(NetworkPolicyIngressRule {
            from: None,
            ports: Some(vec![tcp(IntOrString::String(
                contract::METRICS_PORT_NAME.to_string(),
            ))]),
        });
    }
    Some(NetworkPolicy {
        metadata: child_meta(job, job.name_any(), job_labels(job)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(job_pods),
            policy_types: Some(vec!["Ingress".to_string()]),
            ingress: Some(ingress),
            egress: None,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quickstart() -> TrainingJob {
        kubetrain_api::fixtures::JobFixture::quickstart()
            .namespace("team")
            .uid("uid-1")
            .build()
    }

    fn settings() -> PlanSettings {
        PlanSettings {
            job_network_policy: Some(OperatorPods {
                namespace: "kubetrain-system".into(),
                labels: BTreeMap::from([("app.kubernetes.io/name".into(), "kubetrain".into())]),
            }),
            ..PlanSettings::default()
        }
    }

    #[test]
    fn tokens_are_64_hex_digits_and_differ() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn the_token_secret_is_owned_by_the_job_and_immutable() {
        let job = quickstart();
        let secret = token_secret(&job, "t0k3n");
        assert_eq!(secret.metadata.name.as_deref(), Some("quickstart-token"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("team"));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("TrainingJob", "uid-1")
        );
        assert_eq!(secret.immutable, Some(true));
        assert_eq!(secret.data.unwrap()["token"].0, b"t0k3n");
    }

    #[test]
    fn the_policy_admits_the_job_the_operator_on_the_trainer_port_and_metric_scrapes() {
        let job = quickstart();
        let policy = network_policy(&job, &settings()).unwrap();
        let spec = policy.spec.unwrap();
        let own = BTreeMap::from([(
            "kubetrain.io/job-name".to_string(),
            "quickstart".to_string(),
        )]);
        assert_eq!(spec.pod_selector.unwrap().match_labels.unwrap(), own);
        assert_eq!(spec.policy_types.unwrap(), ["Ingress"]);
        let ingress = spec.ingress.unwrap();
        assert_eq!(ingress.len(), 3);
        let from_job = &ingress[0].from.as_ref().unwrap()[0];
        assert_eq!(
            from_job
                .pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref(),
            Some(&own)
        );
        assert!(from_job.namespace_selector.is_none(), "same namespace only");
        let operator = &ingress[1].from.as_ref().unwrap()[0];
        assert_eq!(
            operator
                .namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["kubernetes.io/metadata.name"],
            "kubetrain-system"
        );
        assert_eq!(
            ingress[1].ports.as_ref().unwrap()[0].port,
            Some(IntOrString::Int(2222))
        );
        assert!(ingress[2].from.is_none());
        assert_eq!(
            ingress[2].ports.as_ref().unwrap()[0].port,
            Some(IntOrString::String("metrics".into()))
        );
        assert_eq!(
            policy.metadata.owner_references.unwrap()[0].uid,
            "uid-1",
            "deleted with the job"
        );
    }

    #[test]
    fn no_policy_when_turned_off_and_no_token_for_a_users_own_program() {
        let job = quickstart();
        assert!(network_policy(&job, &PlanSettings::default()).is_none());
        let mut own_program = job.clone();
        own_program.spec.training = None;
        assert!(!uses_token(&own_program));
        assert!(uses_token(&job));
        let policy = network_policy(&own_program, &settings()).unwrap();
        assert_eq!(
            policy.spec.unwrap().ingress.unwrap().len(),
            2,
            "no metrics port"
        );
    }
}
