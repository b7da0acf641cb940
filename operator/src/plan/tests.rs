use super::*;
use kubetrain_api::contract::Role;
use kubetrain_api::fixtures::{JobFixture, QUICKSTART_YAML};

fn job(yaml: &str) -> TrainingJob {
    JobFixture::from_yaml(yaml)
        .namespace("team")
        .uid("uid-1")
        .build()
}

fn quickstart() -> TrainingJob {
    job(QUICKSTART_YAML)
}

fn env_of(pod: &Pod) -> BTreeMap<String, String> {
    let spec = pod.spec.as_ref().unwrap();
    let container = &spec.containers[main_container_index(&spec.containers)];
    container
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
        .collect()
}

#[test]
fn one_pod_per_replica_with_names_labels_and_dns() {
    let pods = pods(&quickstart(), &PlanSettings::default());
    let names: Vec<_> = pods.iter().map(|p| p.name_any()).collect();
    assert_eq!(
        names,
        [
            "quickstart-ps-0",
            "quickstart-worker-0",
            "quickstart-worker-1"
        ]
    );
    let worker1 = &pods[2];
    let labels = worker1.metadata.labels.as_ref().unwrap();
    assert_eq!(labels[contract::LABEL_JOB_NAME], "quickstart");
    assert_eq!(labels[contract::LABEL_ROLE], "worker");
    assert_eq!(labels[contract::LABEL_INDEX], "1");
    let spec = worker1.spec.as_ref().unwrap();
    assert_eq!(spec.hostname.as_deref(), Some("quickstart-worker-1"));
    assert_eq!(spec.subdomain.as_deref(), Some("quickstart"));
    assert_eq!(
        ReplicaId::from_pod(worker1),
        Some(ReplicaId {
            role: Role::Worker,
            index: 1
        })
    );
}

#[test]
fn every_pod_is_controlled_by_its_job() {
    for pod in pods(&quickstart(), &PlanSettings::default()) {
        let owners = pod.metadata.owner_references.unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "TrainingJob");
        assert_eq!(owners[0].uid, "uid-1");
        assert_eq!(owners[0].controller, Some(true));
    }
}

#[test]
fn pods_carry_the_contract_env() {
    let job = quickstart();
    let pods = pods(&job, &PlanSettings::default());
    let env = env_of(&pods[1]);
    assert_eq!(env[contract::ENV_ROLE], "worker");
    assert_eq!(env[contract::ENV_INDEX], "0");
    assert_eq!(env[contract::ENV_JOB], "team/quickstart");
    assert_eq!(env[contract::ENV_MODE], "DataParallel");
    let cluster = ClusterSpec::from_env(&env[contract::ENV_CLUSTER]).unwrap();
    assert_eq!(cluster.ps, ["quickstart-ps-0.quickstart.team.svc:2222"]);
    assert_eq!(cluster.worker.len(), 2);
    let tf: serde_json::Value = serde_json::from_str(&env[contract::ENV_TF_CONFIG]).unwrap();
    assert_eq!(
        tf["task"],
        serde_json::json!({"type": "worker", "index": 0})
    );
    let training: kubetrain_api::TrainingSpec =
        serde_json::from_str(&env[contract::ENV_TRAINING]).unwrap();
    assert_eq!(&training, job.spec.training.as_ref().unwrap());
    assert_eq!(env[contract::ENV_TERMINATION_LOG], "/dev/termination-log");
    let spec = pods[1].spec.as_ref().unwrap();
    let port = &spec.containers[0].ports.as_ref().unwrap()[0];
    assert_eq!(port.container_port, 2222);
    assert_eq!(port.name.as_deref(), Some("kubetrain"));
}

#[test]
fn default_pods_run_the_trainer_image_securely() {
    let settings = PlanSettings {
        trainer_image: "registry.example/trainer:1".into(),
        ..PlanSettings::default()
    };
    let pod = pod(
        &quickstart(),
        ReplicaId {
            role: Role::Ps,
            index: 0,
        },
        &settings,
    );
    let spec = pod.spec.unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
    let container = &spec.containers[0];
    assert_eq!(container.name, "trainer");
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/trainer:1")
    );
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
}

#[test]
fn exit_code_policy_stops_the_pod_so_the_operator_decides() {
    let pod = pod(
        &quickstart(),
        ReplicaId {
            role: Role::Worker,
            index: 0,
        },
        &PlanSettings::default(),
    );
    assert_eq!(pod.spec.unwrap().restart_policy.as_deref(), Some("Never"));
}

#[test]
fn built_in_trainers_expose_the_metrics_port_the_pod_monitor_scrapes() {
    let metrics_port = |pod: &Pod| {
        let container = &pod.spec.as_ref().unwrap().containers[0];
        container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(contract::METRICS_PORT_NAME))
            .map(|p| p.container_port)
    };
    for pod in &pods(&quickstart(), &PlanSettings::default()) {
        assert_eq!(env_of(pod)[contract::ENV_METRICS_PORT], "9090");
        assert_eq!(metrics_port(pod), Some(9090));
    }

    let off = PlanSettings {
        trainer_metrics_port: None,
        ..PlanSettings::default()
    };
    let pod = &pods(&quickstart(), &off)[0];
    assert!(!env_of(pod).contains_key(contract::ENV_METRICS_PORT));
    assert_eq!(metrics_port(pod), None);

    // A user's own image (no spec.training) serves no kubetrain metrics.
    let tensorflow = job(include_str!(
        "../../../examples/tensorflow/ps-strategy.yaml"
    ));
    let pod = &pods(&tensorflow, &PlanSettings::default())[0];
    assert!(!env_of(pod).contains_key(contract::ENV_METRICS_PORT));
    assert_eq!(metrics_port(pod), None);

    // A port chosen in the template is the one exposed.
    let mut own = quickstart();
    own.spec.replica_specs.worker.template = Some(
        serde_json::from_value(serde_json::json!({"spec": {"containers": [{
            "name": "trainer",
            "env": [{"name": contract::ENV_METRICS_PORT, "value": "8000"}]
        }]}}))
        .unwrap(),
    );
    let worker = &pods(&own, &PlanSettings::default())[1];
    assert_eq!(env_of(worker)[contract::ENV_METRICS_PORT], "8000");
    assert_eq!(metrics_port(worker), Some(8000));
}

#[test]
fn a_users_template_is_kept_and_the_env_goes_into_the_tensorflow_container() {
    let job = job(include_str!(
        "../../../examples/tensorflow/ps-strategy.yaml"
    ));
    let pods = pods(&job, &PlanSettings::default());
    assert_eq!(pods.len(), 4);
    let spec = pods[2].spec.as_ref().unwrap();
    let container = &spec.containers[0];
    assert_eq!(container.name, "tensorflow");
    assert_eq!(
        container.image.as_deref(),
        Some("tensorflow/tensorflow:2.21.0")
    );
    let requests = container
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap();
    assert_eq!(
        requests["memory"].0, "2Gi",
        "the worker template, not the chief's or the PS's"
    );
    let env = env_of(&pods[2]);
    assert!(env.contains_key(contract::ENV_TF_CONFIG));
    assert!(
        !env.contains_key(contract::ENV_TRAINING),
        "no training block, no KUBETRAIN_TRAINING"
    );
}

#[test]
fn chief_and_evaluator_pods_are_planned_like_the_other_roles() {
    let mut job = job(include_str!(
        "../../../examples/tensorflow/ps-strategy.yaml"
    ));
    let mut evaluator = job.spec.replica_specs.ps.clone().unwrap();
    evaluator.replicas = 1;
    job.spec.replica_specs.evaluator = Some(evaluator);
    let pods = pods(&job, &PlanSettings::default());
    let names: Vec<_> = pods.iter().map(|p| p.name_any()).collect();
    assert_eq!(
        names,
        [
            "tf-ps-chief-0",
            "tf-ps-ps-0",
            "tf-ps-worker-0",
            "tf-ps-worker-1",
            "tf-ps-evaluator-0"
        ]
    );
    for (pod, role) in pods
        .iter()
        .zip(["chief", "ps", "worker", "worker", "evaluator"])
    {
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[contract::LABEL_ROLE], role);
        assert_eq!(labels[contract::LABEL_JOB_NAME], "tf-ps");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.hostname.as_deref(), Some(pod.name_any().as_str()));
        assert_eq!(spec.subdomain.as_deref(), Some("tf-ps"));
        assert_eq!(
            pod.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        let tf: serde_json::Value =
            serde_json::from_str(&env_of(pod)[contract::ENV_TF_CONFIG]).unwrap();
        assert_eq!(tf["task"]["type"], role);
        let cluster = tf["cluster"].as_object().unwrap();
        if role == "evaluator" {
            assert_eq!(cluster.keys().collect::<Vec<_>>(), ["evaluator"]);
        } else {
            assert_eq!(
                cluster.keys().collect::<Vec<_>>(),
                ["chief", "ps", "worker"]
            );
            assert_eq!(cluster["chief"][0], "tf-ps-chief-0.tf-ps.team.svc:2222");
        }
    }
    let chief = &pods[0];
    assert_eq!(
        ReplicaId::from_pod(chief),
        Some(ReplicaId {
            role: Role::Chief,
            index: 0
        })
    );
}

#[test]
fn contract_env_goes_into_the_trainer_container_among_sidecars() {
    let job = job(r#"
apiVersion: kubetrain.io/v1alpha1
kind: TrainingJob
metadata: {name: side}
spec:
  replicaSpecs:
    worker:
      replicas: 1
      template:
        metadata: {labels: {team: ml}}
        spec:
          nodeSelector: {gpu: "true"}
          containers:
            - {name: log-shipper, image: fluent-bit}
            - name: trainer
              image: mine
              terminationMessagePath: /run/last-words
              env: [{name: KUBETRAIN_ROLE, value: wrong}, {name: MY_FLAG, value: "1"}]
"#);
    let pod = pod(
        &job,
        ReplicaId {
            role: Role::Worker,
            index: 0,
        },
        &PlanSettings::default(),
    );
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.node_selector.as_ref().unwrap()["gpu"], "true");
    assert!(
        spec.containers[0].env.is_none(),
        "the sidecar is left alone"
    );
    let env = env_of(&pod);
    assert_eq!(
        env[contract::ENV_ROLE],
        "worker",
        "the contract wins over the template"
    );
    assert_eq!(env["MY_FLAG"], "1");
    assert_eq!(
        env[contract::ENV_TERMINATION_LOG],
        "/run/last-words",
        "the trainer writes where the kubelet reads"
    );
    assert_eq!(pod.metadata.labels.as_ref().unwrap()["team"], "ml");
}

#[test]
fn the_service_is_headless_and_selects_the_job() {
    let job = quickstart();
    let svc = service(&job, &PlanSettings::default());
    assert_eq!(svc.name_any(), "quickstart");
    let spec = svc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(
        spec.selector.unwrap()[contract::LABEL_JOB_NAME],
        "quickstart"
    );
    assert_eq!(spec.ports.unwrap()[0].port, 2222);
    assert!(svc.metadata.owner_references.is_some());
}
