//! The real `helm` and `kubernetes-validate` the deploy checks and the Prometheus test
//! run: installed (pinned, cached, idempotent) by `tests/deploy/install-tools.sh`, which
//! the first caller runs. `KUBETRAIN_HELM` and `KUBETRAIN_KUBERNETES_VALIDATE` point at
//! other binaries (the script is then not run). A missing tool fails the caller; nothing
//! is skipped.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::envtest::workspace_root;

/// The release name every chart test renders.
pub const RELEASE: &str = "kubetrain";

/// Paths of the two tools.
pub struct Tools {
    /// `helm`.
    pub helm: PathBuf,
    /// `kubernetes-validate`.
    pub validate: PathBuf,
}

/// The tools, installed on first use.
pub fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let cache = std::env::var_os("KUBETRAIN_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                    .join(".cache/kubetrain")
            });
        let helm = std::env::var_os("KUBETRAIN_HELM").map(PathBuf::from);
        let validate = std::env::var_os("KUBETRAIN_KUBERNETES_VALIDATE").map(PathBuf::from);
        if helm.is_none() || validate.is_none() {
            let script = workspace_root().join("tests/deploy/install-tools.sh");
            let out = Command::new("bash")
                .arg(&script)
                .env("KUBETRAIN_CACHE", &cache)
                .output()
                .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
            assert!(
                out.status.success(),
                "{} failed (helm and kubernetes-validate are required):\n{}{}",
                script.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let tools = Tools {
            helm: helm.unwrap_or_else(|| cache.join("bin/helm")),
            validate: validate.unwrap_or_else(|| cache.join("bin/kubernetes-validate")),
        };
        for tool in [&tools.helm, &tools.validate] {
            assert!(
                tool.is_file(),
                "{} is missing: run `bash tests/deploy/install-tools.sh` (or set \
                 KUBETRAIN_HELM / KUBETRAIN_KUBERNETES_VALIDATE)",
                tool.display()
            );
        }
        tools
    })
}

/// Runs a command from the workspace root; returns (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .current_dir(workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `helm <args>` from the workspace root.
pub fn helm(args: &[&str]) -> (bool, String, String) {
    run(Command::new(&tools().helm).args(args))
}

/// `helm template` of the chart in `namespace` with the given extra args; panics on error.
pub fn render(namespace: &str, extra: &[&str]) -> String {
    let mut args = vec!["template", RELEASE, "charts/kubetrain", "-n", namespace];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = helm(&args);
    assert!(ok, "helm {args:?} failed:\n{stderr}");
    stdout
}
