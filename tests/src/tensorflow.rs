//! Real TensorFlow for the bring-your-own-program tests: the pinned `tensorflow-cpu` from
//! PyPI in a cached virtualenv, installed by `tests/tensorflow/install.sh` (which
//! `scripts/test.sh` runs first).

use std::ffi::OsString;
use std::path::PathBuf;

/// The virtualenv's directory: `KUBETRAIN_TF_VENV`, else `<cache>/tf-venv`.
pub fn venv() -> PathBuf {
    if let Some(dir) = std::env::var_os("KUBETRAIN_TF_VENV") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("KUBETRAIN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kubetrain")
        });
    cache.join("tf-venv")
}

/// The virtualenv's `python`. Panics, naming the installer, when it is missing: a
/// TensorFlow test never passes without TensorFlow.
pub fn python() -> PathBuf {
    let python = venv().join("bin/python");
    assert!(
        python.is_file(),
        "no TensorFlow virtualenv at {}: run `bash tests/tensorflow/install.sh` (scripts/test.sh does)",
        venv().display()
    );
    python
}

/// `PATH` with the virtualenv's `bin` first, so a pod's `python` is the one with TensorFlow.
pub fn path_with_venv() -> OsString {
    let bin = python()
        .parent()
        .expect("python lives in bin/")
        .to_path_buf();
    let mut dirs = vec![bin];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).expect("PATH entries have no separator")
}
