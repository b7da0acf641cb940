//! A real kube-apiserver (1.20, built by `tests/envtest/install.sh`) with its
//! own etcd, on free loopback ports, for the "real API server" test tier
//! (DESIGN.md §6.3).
//!
//! * [`ApiServer::start`] starts a private pair; dropping it stops both.
//! * [`shared`] starts one pair per test binary, lazily, and hands out a
//!   `&'static` to it. Startup costs a few seconds, so tests share one server
//!   and isolate themselves by namespace ([`ApiServer::namespace`]). A static is
//!   never dropped, so cleanup at process exit is the [`Watchdog`]'s job: it
//!   kills both servers and removes the scratch directory when the test binary
//!   exits, however it exits.
//!
//! The servers trust a freshly generated CA; the client authenticates with a
//! static token whose user is in `system:masters` (RBAC is on, and that group
//! bypasses it). The `ServiceAccount` admission plugin is off because there is
//! no token controller to create service accounts' secrets.

use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;
use tokio::sync::OnceCell;

use kubetrain_operator::podsim::process_group::{Target, Watchdog};

/// Where `install.sh` puts the binaries, unless `KUBETRAIN_CACHE` moves it.
const DEFAULT_CACHE: &str = ".cache/kubetrain";
/// Field manager for what the harness itself writes (CRDs, namespaces).
pub const FIELD_MANAGER: &str = "kubetrain-e2e";
/// The CRD's name, as in `crds/kubetrain.io_trainingjobs.yaml`.
pub const CRD_NAME: &str = "trainingjobs.kubetrain.io";

/// How long the API server gets to answer `/readyz` with `ok`. A cold start is
/// 3–10 s on 2 cores; a loaded CI machine gets generous slack.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const POLL_INTERVAL: Duration = Duration::from_millis(200);
const CRD_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything that can go wrong bringing up or using the test API server.
#[derive(Debug, thiserror::Error)]
pub enum EnvtestError {
    #[error(
        "{name} not found at {} — run `tests/envtest/install.sh` (or point {env_var} at a binary)",
        path.display()
    )]
    BinaryMissing {
        name: &'static str,
        path: PathBuf,
        env_var: &'static str,
    },
    #[error("neither HOME nor KUBETRAIN_CACHE is set, so the binary cache cannot be located")]
    NoCacheDir,
    #[error("creating the scratch directory: {0}")]
    ScratchDir(#[source] io::Error),
    #[error("generating certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    #[error("writing {}: {source}", path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spawning {name}: {source}")]
    Spawn {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("spawning the exit watchdog: {0}")]
    Watchdog(#[source] io::Error),
    #[error("{name} exited during startup ({status}); last log lines:\n{log_tail}")]
    ExitedDuringStartup {
        name: &'static str,
        status: ExitStatus,
        log_tail: String,
    },
    #[error(
        "{name} not ready within {timeout:?} (last error: {last_error}); last log lines:\n{log_tail}"
    )]
    NotReady {
        name: &'static str,
        timeout: Duration,
        last_error: String,
        log_tail: String,
    },
    #[error("loading the generated kubeconfig: {0}")]
    Kubeconfig(#[from] KubeconfigError),
    #[error("building a kube client: {0}")]
    Client(#[source] kube::Error),
    #[error("creating namespace {name}: {source}")]
    CreateNamespace {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading CRD file {}: {source}", path.display())]
    ReadCrd {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parsing CRD file {}: {source}", path.display())]
    ParseCrd {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("CRD file {} has no metadata.name", path.display())]
    CrdWithoutName { path: PathBuf },
    #[error("applying CRD {name}: {source}")]
    ApplyCrd {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("CRD {name} not Established within {timeout:?}")]
    CrdNotEstablished { name: String, timeout: Duration },
    #[error("waiting for CRD {name} to be Established: {source}")]
    WaitCrd {
        name: String,
        #[source]
        source: kube::runtime::wait::Error,
    },
}

/// Paths of the two server binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
}

impl Binaries {
    /// `KUBETRAIN_ETCD` / `KUBETRAIN_APISERVER` if set, else
    /// `${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}/bin/{etcd,kube-apiserver}`.
    /// Fails (rather than skipping tests) when either is missing.
    pub fn locate() -> Result<Self, EnvtestError> {
        let cache = match (
            std::env::var_os("KUBETRAIN_CACHE"),
            std::env::var_os("HOME"),
        ) {
            (Some(c), _) => PathBuf::from(c),
            (None, Some(home)) => PathBuf::from(home).join(DEFAULT_CACHE),
            (None, None) => return Err(EnvtestError::NoCacheDir),
        };
        let pick = |env_var: &'static str, name: &'static str| {
            let path = std::env::var_os(env_var)
                .map(PathBuf::from)
                .unwrap_or_else(|| cache.join("bin").join(name));
            if is_executable(&path) {
                Ok(path)
            } else {
                Err(EnvtestError::BinaryMissing {
                    name,
                    path,
                    env_var,
                })
            }
        };
        Ok(Self {
            etcd: pick("KUBETRAIN_ETCD", "etcd")?,
            kube_apiserver: pick("KUBETRAIN_APISERVER", "kube-apiserver")?,
        })
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A running etcd + kube-apiserver pair. Dropping it kills both and removes
/// the scratch directory.
#[derive(Debug)]
pub struct ApiServer {
    watchdog: Option<Watchdog>,
    // Fields drop in declaration order after `Drop::drop`: the processes must
    // be dead before their scratch directory is removed.
    procs: Procs,
    dir: Option<TempDir>,
    kubeconfig: PathBuf,
    url: String,
    apiserver_log: PathBuf,
    etcd_log: PathBuf,
    namespaces: AtomicU32,
}

static SHARED: OnceCell<ApiServer> = OnceCell::const_new();

/// The test binary's shared API server, started on first use.
///
/// Each test should make its own [`Client`] (via [`ApiServer::client`] or
/// [`ApiServer::namespace`]): a client's connections belong to the tokio
/// runtime that made them, and every `#[tokio::test]` has its own runtime.
pub async fn shared() -> Result<&'static ApiServer, EnvtestError> {
    SHARED.get_or_try_init(ApiServer::start).await
}

/// [`shared`] for a test: a server that cannot start fails the test, with the install hint
/// in the message, instead of handing back an error for every test to unwrap.
pub async fn server() -> &'static ApiServer {
    match shared().await {
        Ok(s) => s,
        Err(e) => panic!("test API server unavailable: {e}"),
    }
}

/// A fresh namespace on the shared server with the TrainingJob CRD installed; any failure
/// fails the test.
pub async fn namespace_with_crd(prefix: &str) -> TestNamespace {
    let server = server().await;
    server.install_crd().await.unwrap_or_else(|e| panic!("{e}"));
    server
        .namespace(prefix)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A namespace created for one test, with a client for it.
#[derive(Clone)]
pub struct TestNamespace {
    pub client: Client,
    pub name: String,
}

impl TestNamespace {
    /// A namespaced API handle in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl ApiServer {
    /// Starts etcd and kube-apiserver on a loopback address of their own, on their
    /// well-known ports, and waits until `/readyz` says `ok`. No port is picked free and
    /// released before they bind it: between the two, the kernel could give it to any
    /// outgoing connection on the machine.
    pub async fn start() -> Result<Self, EnvtestError> {
        let bins = Binaries::locate()?;
        let dir = scratch_dir()?;
        let root = dir.path().to_path_buf();

        let ip = kubetrain_trainer::loopback::next_ip();
        let (etcd_client, etcd_peer, secure_port) = (2379, 2380, 6443);

        let pki = Pki::generate(ip)?;
        let write = |name: &str, contents: &str| -> Result<PathBuf, EnvtestError> {
            let path = root.join(name);
            fs::write(&path, contents).map_err(|source| EnvtestError::WriteFile {
                path: path.clone(),
                source,
            })?;
            Ok(path)
        };
        let ca_crt = write("ca.crt", &pki.ca_pem)?;
        let serving_crt = write("apiserver.crt", &pki.serving_pem)?;
        let serving_key = write("apiserver.key", &pki.serving_key_pem)?;
        let sa_key = write("sa.key", &pki.sa_key_pem)?;
        let sa_pub = write("sa.pub", &pki.sa_pub_pem)?;
        let token = unique_token();
        let tokens = write(
            "tokens.csv",
            &format!("{token},kubetrain-e2e-admin,kubetrain-e2e-admin,\"system:masters\"\n"),
        )?;

        let etcd_log = root.join("etcd.log");
        let etcd_url = format!("http://{ip}:{etcd_client}");
        let peer_url = format!("http://{ip}:{etcd_peer}");
        let mut etcd_cmd = Command::new(&bins.etcd);
        etcd_cmd
            .arg("--name=envtest")
            .arg(format!("--data-dir={}", root.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=envtest={peer_url}"))
            .arg("--logger=zap")
            .arg("--log-level=warn");
        // `Procs` kills whatever it holds when dropped, so every early return
        // below stops what was already started.
        let mut procs = Procs {
            etcd: Some(spawn_logged(etcd_cmd, "etcd", &etcd_log)?),
            apiserver: None,
        };
        wait_for_tcp(
            "etcd",
            procs.etcd.as_mut().expect("just set"),
            SocketAddr::from((ip, etcd_client)),
            &etcd_log,
            READY_TIMEOUT,
        )
        .await?;

        let apiserver_log = root.join("kube-apiserver.log");
        let mut api_cmd = Command::new(&bins.kube_apiserver);
        api_cmd
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg(format!("--bind-address={ip}"))
            .arg(format!("--advertise-address={ip}"))
            .arg(format!("--secure-port={secure_port}"))
            // 1.20 still opens an unauthenticated port 8080 by default; parallel
            // servers would clash on it.
            .arg("--insecure-port=0")
            .arg(format!("--cert-dir={}", root.join("certs").display()))
            .arg(format!("--tls-cert-file={}", serving_crt.display()))
            .arg(format!("--tls-private-key-file={}", serving_key.display()))
            .arg(format!("--token-auth-file={}", tokens.display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            // No token controller runs, so pods could not get their token volume.
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--allow-privileged=true")
            // Less background work on a 2-core machine; nothing here tests APF.
            .arg("--enable-priority-and-fairness=false")
            .arg("--profiling=false")
            .arg("--v=1");
        procs.apiserver = Some(spawn_logged(api_cmd, "kube-apiserver", &apiserver_log)?);

        let targets: Vec<Target> = [&procs.apiserver, &procs.etcd]
            .into_iter()
            .flatten()
            .map(|c| Target::Process(c.id()))
            .collect();
        let watchdog = Watchdog::spawn(&targets, Some(&root)).map_err(EnvtestError::Watchdog)?;

        let kubeconfig = root.join("kubeconfig");
        let url = format!("https://{ip}:{secure_port}");
        fs::write(&kubeconfig, kubeconfig_yaml(&url, &ca_crt, &token)).map_err(|source| {
            EnvtestError::WriteFile {
                path: kubeconfig.clone(),
                source,
            }
        })?;
        // `server` owns everything now: an error below drops it, which stops both.
        let mut server = Self {
            watchdog: Some(watchdog),
            procs,
            dir: Some(dir),
            kubeconfig,
            url,
            apiserver_log,
            etcd_log,
            namespaces: AtomicU32::new(0),
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> Result<(), EnvtestError> {
        let client = self.client().await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some((name, status)) = self.procs.exited() {
                let log = if name == "etcd" {
                    &self.etcd_log
                } else {
                    &self.apiserver_log
                };
                return Err(EnvtestError::ExitedDuringStartup {
                    name,
                    status,
                    log_tail: log_tail(log),
                });
            }
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("static request is valid");
            let last_error = match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => format!("/readyz said {body:?}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(EnvtestError::NotReady {
                    name: "kube-apiserver",
                    timeout: READY_TIMEOUT,
                    last_error,
                    log_tail: log_tail(&self.apiserver_log),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Path of a kubeconfig (admin token) for this server; hand it to `kubectl`
    /// or to the operator under test.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.A.B.C:6443`, on the server's own loopback address.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The API server's log file, for failure messages.
    pub fn apiserver_log(&self) -> &Path {
        &self.apiserver_log
    }

    /// The last lines of the API server's log.
    pub fn apiserver_log_tail(&self) -> String {
        log_tail(&self.apiserver_log)
    }

    /// The kube `Config` for this server (admin token, trusts the test CA).
    pub async fn config(&self) -> Result<Config, EnvtestError> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        Ok(Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)
    }

    /// A new client. Make one per tokio runtime (i.e. per test).
    pub async fn client(&self) -> Result<Client, EnvtestError> {
        Client::try_from(self.config().await?).map_err(EnvtestError::Client)
    }

    /// Creates a fresh namespace `<prefix>-<n>` and returns it with a client.
    /// Namespaces are not deleted afterwards: without the namespace controller
    /// they would only hang in `Terminating`, and the server is throwaway.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace, EnvtestError> {
        let client = self.client().await?;
        let n = self.namespaces.fetch_add(1, Ordering::Relaxed);
        let name = namespace_name(prefix, n);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("kubetrain.io/e2e".to_string(), "true".to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .map_err(|source| EnvtestError::CreateNamespace {
                name: name.clone(),
                source,
            })?;
        Ok(TestNamespace { client, name })
    }

    /// Installs the project's CRD (`crds/kubetrain.io_trainingjobs.yaml`) and
    /// waits until it is Established. Idempotent (server-side apply).
    pub async fn install_crd(&self) -> Result<(), EnvtestError> {
        self.install_crd_from(&crd_path()).await
    }

    /// Installs a CRD from a YAML file and waits until it is Established.
    pub async fn install_crd_from(&self, path: &Path) -> Result<(), EnvtestError> {
        let text = fs::read_to_string(path).map_err(|source| EnvtestError::ReadCrd {
            path: path.to_path_buf(),
            source,
        })?;
        // Applied as untyped JSON: a typed round trip through k8s-openapi's
        // `JSONSchemaProps` turned `default: ''` into `default: null` (rejected by
        // the server), and the file should reach the server exactly as written.
        let crd: serde_json::Value =
            serde_yaml::from_str(&text).map_err(|source| EnvtestError::ParseCrd {
                path: path.to_path_buf(),
                source,
            })?;
        let name = crd
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .map(str::to_string)
            .ok_or_else(|| EnvtestError::CrdWithoutName {
                path: path.to_path_buf(),
            })?;
        let client = self.client().await?;
        let api = Api::<CustomResourceDefinition>::all(client);
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .map_err(|source| EnvtestError::ApplyCrd {
            name: name.clone(),
            source,
        })?;
        match tokio::time::timeout(
            CRD_TIMEOUT,
            await_condition(api, &name, conditions::is_crd_established()),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => Err(EnvtestError::WaitCrd { name, source }),
            Err(_) => Err(EnvtestError::CrdNotEstablished {
                name,
                timeout: CRD_TIMEOUT,
            }),
        }
    }

    /// A `kubectl` command already pointed at this server (`--kubeconfig`).
    /// `KUBECTL` overrides the binary.
    pub fn kubectl(&self) -> tokio::process::Command {
        let bin = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd.kill_on_drop(true);
        cmd
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Disarm first so the watchdog never signals PIDs we are about to reap.
        if let Some(w) = self.watchdog.take() {
            w.disarm();
        }
        self.procs.stop();
        // TempDir removes the scratch directory (etcd data, certs, logs) when the
        // field drops, unless asked to keep it for debugging.
        if let Some(dir) = self.dir.take()
            && std::env::var_os("KUBETRAIN_KEEP_ENVTEST").is_some()
        {
            let kept = dir.keep();
            eprintln!("kept envtest directory {}", kept.display());
        }
    }
}

/// A binary of the workspace, built on demand (debug profile), so `cargo test -p
/// kubetrain-e2e` alone works too: cargo builds other packages' binaries only for
/// `--workspace` runs. Blocking: call it from `spawn_blocking` in async tests.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    build_workspace_binary(package, bin, false)
}

/// [`workspace_binary`] in the release profile, for benchmarks.
pub fn workspace_release_binary(package: &str, bin: &str) -> PathBuf {
    build_workspace_binary(package, bin, true)
}

fn build_workspace_binary(package: &str, bin: &str, release: bool) -> PathBuf {
    let root = workspace_root();
    let mut cargo = std::process::Command::new(env!("CARGO"));
    cargo.args(["build", "--quiet", "-p", package, "--bin", bin]);
    if release {
        cargo.arg("--release");
    }
    let status = cargo.current_dir(&root).status().expect("cargo runs");
    assert!(status.success(), "building {package} --bin {bin} failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let binary = target
        .join(if release { "release" } else { "debug" })
        .join(bin);
    assert!(binary.is_file(), "no {bin} binary at {}", binary.display());
    binary
}

/// The CRD file generated by `crdgen`, relative to the workspace root.
pub fn crd_path() -> PathBuf {
    workspace_root()
        .join("crds")
        .join("kubetrain.io_trainingjobs.yaml")
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The two server processes; dropping kills and reaps both.
#[derive(Debug)]
struct Procs {
    etcd: Option<Child>,
    apiserver: Option<Child>,
}

impl Procs {
    /// The first process found to have exited, if any.
    fn exited(&mut self) -> Option<(&'static str, ExitStatus)> {
        let check = |name, child: &mut Option<Child>| {
            child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .map(|status| (name, status))
        };
        check("kube-apiserver", &mut self.apiserver).or_else(|| check("etcd", &mut self.etcd))
    }

    fn stop(&mut self) {
        // The apiserver first: it holds etcd connections and would log noise.
        for child in [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            kill_and_reap(&mut child);
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop();
    }
}

fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

fn spawn_logged(mut cmd: Command, name: &'static str, log: &Path) -> Result<Child, EnvtestError> {
    let file = File::create(log).map_err(|source| EnvtestError::WriteFile {
        path: log.to_path_buf(),
        source,
    })?;
    let err = file.try_clone().map_err(|source| EnvtestError::WriteFile {
        path: log.to_path_buf(),
        source,
    })?;
    cmd.stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|source| EnvtestError::Spawn { name, source })
}

async fn wait_for_tcp(
    name: &'static str,
    child: &mut Child,
    addr: SocketAddr,
    log: &Path,
    timeout: Duration,
) -> Result<(), EnvtestError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(EnvtestError::ExitedDuringStartup {
                name,
                status,
                log_tail: log_tail(log),
            });
        }
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(EnvtestError::NotReady {
                    name,
                    timeout,
                    last_error: e.to_string(),
                    log_tail: log_tail(log),
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Scratch space: in /dev/shm when available, because etcd fsyncs every write
/// and a tmpfs makes that free; the data is throwaway anyway.
fn scratch_dir() -> Result<TempDir, EnvtestError> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("kubetrain-envtest-");
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = builder.tempdir_in(shm)
    {
        return Ok(dir);
    }
    builder.tempdir().map_err(EnvtestError::ScratchDir)
}

fn unique_token() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    // Loopback-only throwaway server: uniqueness matters, secrecy does not.
    format!("kubetrain-e2e-{}-{nanos:x}", std::process::id())
}

fn namespace_name(prefix: &str, n: u32) -> String {
    let mut base: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    base.truncate(50);
    let base = base.trim_matches('-');
    let base = if base.is_empty() { "test" } else { base };
    format!("{base}-{n}")
}

fn kubeconfig_yaml(url: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: envtest
  cluster:
    server: {url}
    certificate-authority: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: envtest
  context:
    cluster: envtest
    user: admin
    namespace: default
current-context: envtest
",
        ca = ca.display()
    )
}

/// Last lines of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
    const LINES: usize = 40;
    match fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The generated key material.
struct Pki {
    ca_pem: String,
    serving_pem: String,
    serving_key_pem: String,
    sa_key_pem: String,
    sa_pub_pem: String,
}

impl Pki {
    /// `ip`: the address the API server serves on, named in its certificate.
    fn generate(ip: Ipv4Addr) -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "kubetrain-envtest-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let serving_key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(vec![
            ip.to_string(),
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "kubernetes.default.svc".to_string(),
        ])?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &issuer)?;

        // ECDSA P-256 (rcgen's default); kube-apiserver 1.20 reads PKCS#8 and
        // PKIX PEM keys for service-account signing.
        let sa_key = KeyPair::generate()?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            serving_pem: serving_cert.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            sa_key_pem: sa_key.serialize_pem(),
            sa_pub_pem: sa_key.public_key_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_are_dns_labels() {
        assert_eq!(namespace_name("CRD_round trip", 3), "crd-round-trip-3");
        assert_eq!(namespace_name("--", 0), "test-0");
        assert!(namespace_name(&"x".repeat(80), 12).len() <= 63);
    }

    #[test]
    fn missing_binary_error_names_the_install_script() {
        let err = EnvtestError::BinaryMissing {
            name: "kube-apiserver",
            path: PathBuf::from("/nowhere/kube-apiserver"),
            env_var: "KUBETRAIN_APISERVER",
        };
        assert!(err.to_string().contains("tests/envtest/install.sh"));
    }
}
