//! Who may drive a job, on the real API server with RBAC on: the operator, running as its
//! own ServiceAccount under the shipped deploy/rbac.yaml, gives a job its token Secret
//! and its NetworkPolicy before its pods, and the pods take the token from that Secret.
//! The operator may create and delete Secrets but not read them, and the API server
//! holds it to that.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use kubetrain_api::TrainingJob;
use kubetrain_api::contract;
use kubetrain_e2e::envtest::{self, server};
use kubetrain_e2e::operator::wait_for_pods;
use kubetrain_operator::controller::{self, Context};
use kubetrain_operator::metrics::Metrics;
use kubetrain_operator::plan::{OperatorPods, PlanSettings};

/// The user the operator's pods authenticate as (deploy/serviceaccounts.yaml).
const OPERATOR_USER: &str = "system:serviceaccount:kubetrain-system:kubetrain-operator";

/// `kubectl apply` of shipped manifests, as an administrator.
async fn apply(files: &[&str]) {
    let server = server().await;
    let mut kubectl = server.kubectl();
    kubectl.arg("apply");
    for file in files {
        kubectl.arg("-f").arg(envtest::workspace_root().join(file));
    }
    let out = kubectl.output().await.expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl apply {files:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client that acts as the operator's ServiceAccount, through the API server's own
/// impersonation: every request it makes is authorised by deploy/rbac.yaml alone.
async fn as_operator() -> Client {
    let mut config = server().await.config().await.expect("config");
    config.auth_info.impersonate = Some(OPERATOR_USER.to_string());
    Client::try_from(config).expect("client")
}

#[tokio::test]
async fn under_its_own_rbac_the_operator_gives_a_job_its_token_secret_and_network_policy() {
    let server = server().await;
    server.install_crd().await.unwrap_or_else(|e| panic!("{e}"));
    apply(&["deploy/namespace.yaml", "deploy/rbac.yaml"]).await;
    let ns = server
        .namespace("isolation")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let operator_client = as_operator().await;
    let settings = PlanSettings {
        job_network_policy: Some(OperatorPods {
            namespace: "kubetrain-system".into(),
            labels: [("app.kubernetes.io/component".into(), "operator".into())].into(),
        }),
        ..PlanSettings::default()
    };
    let context = Arc::new(Context::new(
        operator_client.clone(),
        settings,
        Some("test".into()),
        Arc::new(Metrics::new()),
    ));
    let operator = tokio::spawn(controller::run(context, Some(ns.name.clone())));

    let job = kubetrain_api::fixtures::JobFixture::quickstart().build();
    let job = ns
        .api::<TrainingJob>()
        .create(&PostParams::default(), &job)
        .await
        .expect("create the job");
    let uid = job.uid().expect("uid");

    // The operator creates the Secret and the policy before any pod, so pods that exist
    // mean both calls passed RBAC.
    let pods = wait_for_pods(&ns.api::<Pod>(), "quickstart", "all 3 exist", |p| {
        p.len() == 3
    })
    .await;
    let secret = ns
        .api::<Secret>()
        .get("quickstart-token")
        .await
        .expect("the job's token Secret");
    let owner = &secret.owner_references()[0];
    assert_eq!(
        (owner.uid.as_str(), owner.controller),
        (uid.as_str(), Some(true))
    );
    assert_eq!(secret.immutable, Some(true));
    let token = &secret.data.as_ref().expect("data")[contract::TOKEN_SECRET_KEY].0;
    assert_eq!(token.len(), 64);
    assert!(token.iter().all(u8::is_ascii_hexdigit));

    for pod in &pods {
        let spec = pod.spec.as_ref().expect("spec");
        let env = spec.containers[0].env.as_ref().expect("env");
        let var = env
            .iter()
            .find(|e| e.name == contract::ENV_JOB_TOKEN)
            .unwrap_or_else(|| panic!("{}: no {}", pod.name_any(), contract::ENV_JOB_TOKEN));
        let selector = var
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .expect("from the Secret, never as a literal value");
        assert_eq!(
            (selector.name.as_str(), selector.key.as_str()),
            ("quickstart-token", "token")
        );
        assert!(var.value.is_none(), "the token is not in the pod spec");
    }

    let policy = ns
        .api::<NetworkPolicy>()
        .get("quickstart")
        .await
        .expect("the job's NetworkPolicy");
    assert_eq!(policy.owner_references()[0].uid, uid);
    let spec = policy.spec.expect("spec");
    assert_eq!(
        spec.pod_selector.and_then(|s| s.match_labels).unwrap()["kubetrain.io/job-name"],
        "quickstart"
    );
    assert_eq!(spec.ingress.expect("ingress").len(), 3);

    // What the operator may not do: read the token back, or any Secret at all.
    let forbidden = Api::<Secret>::namespaced(operator_client.clone(), &ns.name)
        .get("quickstart-token")
        .await
        .expect_err("the operator can read Secrets");
    assert!(
        matches!(&forbidden, kube::Error::Api(s) if s.code == 403),
        "{forbidden}"
    );
    let forbidden = Api::<Secret>::namespaced(operator_client, &ns.name)
        .list(&Default::default())
        .await
        .expect_err("the operator can list Secrets");
    assert!(
        matches!(&forbidden, kube::Error::Api(s) if s.code == 403),
        "{forbidden}"
    );
    assert!(!operator.is_finished(), "the controller is still running");
    operator.abort();
}
