use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec, SecretKeySelector,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;

fn pod(container: Container) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("mnist-worker-0".into()),
            namespace: Some("ml".into()),
            uid: Some("u-1".into()),
            labels: Some([("team".to_string(), "vision".to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            hostname: Some("mnist-worker-0".into()),
            subdomain: Some("mnist".into()),
            containers: vec![
                Container {
                    name: "sidecar".into(),
                    command: Some(vec!["sleep".into()]),
                    ..Container::default()
                },
                container,
            ],
            termination_grace_period_seconds: Some(7),
            ..PodSpec::default()
        }),
        status: None,
    }
}

fn trainer(command: Option<Vec<&str>>, env: Vec<EnvVar>) -> Container {
    Container {
        name: contract::TRAINER_CONTAINER.into(),
        command: command.map(|c| c.into_iter().map(String::from).collect()),
        args: Some(vec!["--data".into(), "/data/train".into()]),
        env: Some(env),
        ..Container::default()
    }
}

fn var(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn from(name: &str, source: EnvVarSource) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(source),
    }
}

fn field(path: &str) -> EnvVarSource {
    EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.into(),
            api_version: None,
        }),
        ..EnvVarSource::default()
    }
}

struct World {
    network: PodNetwork,
    mounts: PathMap,
    secrets: Vec<Secret>,
    commands: Commands,
}

impl World {
    fn new() -> Self {
        let mut mounts = PathMap::default();
        mounts.mount("/data", "/host/data");
        let mut commands = Commands::default();
        let trainer = Program {
            path: "/build/kubetrain".into(),
            leading_args: vec!["trainer".into()],
        };
        commands
            .by_name
            .insert("kubetrain-trainer".into(), trainer.clone());
        commands.default = Some(trainer);
        Self {
            network: PodNetwork::new(contract::DEFAULT_PORT),
            mounts,
            secrets: Vec::new(),
            commands,
        }
    }

    fn prepare(&mut self, pod: &Pod, unset: &[&str]) -> Result<Launch, LaunchError> {
        prepare(
            pod,
            &mut LaunchContext {
                pod_ip: Ipv4Addr::new(127, 0, 0, 9),
                host_ip: Ipv4Addr::LOCALHOST,
                network: &mut self.network,
                mounts: &self.mounts,
                secrets: &self.secrets,
                commands: &self.commands,
                termination_log: "/runs/mnist-worker-0.termination-log".into(),
                unset,
            },
        )
    }
}

fn value<'a>(launch: &'a Launch, name: &str) -> Option<&'a str> {
    launch
        .env
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn commands_are_substituted_by_name_or_file_name_with_their_leading_args() {
    let mut world = World::new();
    let full = world
        .prepare(
            &pod(trainer(
                Some(vec!["/usr/local/bin/kubetrain-trainer", "worker"]),
                vec![],
            )),
            &[],
        )
        .expect("launch");
    assert_eq!(full.program, PathBuf::from("/build/kubetrain"));
    assert_eq!(
        full.args,
        ["trainer", "worker", "--data", "/host/data/train"]
    );

    let other = world
        .prepare(&pod(trainer(Some(vec!["/data/run.sh"]), vec![])), &[])
        .expect("launch");
    assert_eq!(other.program, PathBuf::from("/host/data/run.sh"));
    assert_eq!(other.args, ["--data", "/host/data/train"]);
}

#[test]
fn a_container_without_a_command_runs_the_default_or_cannot_start() {
    let mut world = World::new();
    let launch = world
        .prepare(&pod(trainer(None, vec![])), &[])
        .expect("launch");
    assert_eq!(launch.program, PathBuf::from("/build/kubetrain"));
    assert_eq!(launch.args, ["trainer", "--data", "/host/data/train"]);
    assert_eq!(launch.grace, Duration::from_secs(7));

    world.commands.default = None;
    let err = world
        .prepare(&pod(trainer(None, vec![])), &[])
        .expect_err("no default");
    assert!(matches!(err, LaunchError::NoCommand { ref container, .. } if container == "trainer"));
}

#[test]
fn env_values_get_loopback_addresses_mounts_downward_api_and_the_termination_file() {
    let mut world = World::new();
    let env = vec![
        var("PEERS", "mnist-ps-0.mnist.ml.svc:2222"),
        var("DATA", "/data/train"),
        var(
            contract::ENV_TERMINATION_LOG,
            contract::DEFAULT_TERMINATION_MESSAGE_PATH,
        ),
        var(contract::ENV_METRICS_PORT, "9090"),
        from("NAME", field("metadata.name")),
        from("TEAM", field("metadata.labels['team']")),
        from("MY_IP", field("status.podIP")),
    ];
    let launch = world
        .prepare(&pod(trainer(None, env)), &[contract::ENV_METRICS_PORT])
        .expect("launch");
    let ps = world
        .network
        .address(&("ml".into(), "mnist".into(), "mnist-ps-0".into()));
    assert_eq!(
        value(&launch, "PEERS"),
        Some(format!("{}:{}", ps.ip, ps.port).as_str())
    );
    assert_eq!(value(&launch, "DATA"), Some("/host/data/train"));
    assert_eq!(
        value(&launch, contract::ENV_TERMINATION_LOG),
        Some("/runs/mnist-worker-0.termination-log")
    );
    assert_eq!(value(&launch, contract::ENV_METRICS_PORT), None);
    assert_eq!(value(&launch, "NAME"), Some("mnist-worker-0"));
    assert_eq!(value(&launch, "TEAM"), Some("vision"));
    assert_eq!(value(&launch, "MY_IP"), Some("127.0.0.9"));
    // Set for every pod, as the trainer binds its own address from them.
    assert_eq!(value(&launch, contract::ENV_POD_IP), Some("127.0.0.9"));
    assert_eq!(value(&launch, "HOSTNAME"), Some("mnist-worker-0"));
}

#[test]
fn secret_values_resolve_and_missing_or_unsupported_sources_say_which_var() {
    let mut world = World::new();
    world.secrets.push(Secret {
        metadata: ObjectMeta {
            name: Some("mnist-token".into()),
            ..ObjectMeta::default()
        },
        string_data: Some([("token".to_string(), "s3cret".to_string())].into()),
        ..Secret::default()
    });
    let secret = |key: &str| EnvVarSource {
        secret_key_ref: Some(SecretKeySelector {
            name: "mnist-token".into(),
            key: key.into(),
            optional: None,
        }),
        ..EnvVarSource::default()
    };
    let launch = world
        .prepare(
            &pod(trainer(None, vec![from("TOKEN", secret("token"))])),
            &[],
        )
        .expect("launch");
    assert_eq!(value(&launch, "TOKEN"), Some("s3cret"));

    let missing = world
        .prepare(
            &pod(trainer(None, vec![from("TOKEN", secret("nope"))])),
            &[],
        )
        .expect_err("missing key");
    assert!(matches!(missing, LaunchError::EnvSecret { ref var, .. } if var == "TOKEN"));

    let unsupported = world
        .prepare(
            &pod(trainer(None, vec![from("CPU", field("spec.cpu"))])),
            &[],
        )
        .expect_err("unsupported field");
    assert!(
        unsupported.to_string().contains("CPU") && unsupported.to_string().contains("spec.cpu"),
        "{unsupported}"
    );
}

#[test]
fn a_pod_without_containers_cannot_start() {
    let mut world = World::new();
    let mut empty = pod(trainer(None, vec![]));
    empty.spec.as_mut().expect("spec").containers.clear();
    assert!(matches!(
        world.prepare(&empty, &[]),
        Err(LaunchError::NoContainer { .. })
    ));
}
