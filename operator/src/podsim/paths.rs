//! Mounted volumes for processes: a container path becomes a host directory.
//!
//! A process sees the host's file system, so a volume mounted at `/opt/train` in the pod is
//! a directory somewhere else here. The command line and env name container paths; each
//! value that starts with a mount's container path is pointed at its host directory.

use std::path::{Path, PathBuf};

/// Container path → host directory, longest container path first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathMap {
    mounts: Vec<(String, PathBuf)>,
}

impl PathMap {
    /// Adds a mount: `container` (absolute, as in a volumeMount's mountPath) is `host`.
    pub fn mount(&mut self, container: impl Into<String>, host: impl Into<PathBuf>) {
        let container = container.into().trim_end_matches('/').to_string();
        self.mounts.retain(|(c, _)| *c != container);
        self.mounts.push((container, host.into()));
        // The most specific mount wins, as in a container.
        self.mounts
            .sort_by_key(|(container, _)| std::cmp::Reverse(container.len()));
    }

    /// Whether no mount is known.
    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty()
    }

    /// `value` with a leading container path (or one after `=`, as in `--data=/opt/x`)
    /// replaced by its host directory.
    pub fn apply(&self, value: &str) -> String {
        if let Some(mapped) = self.map_path(value) {
            return mapped;
        }
        if let Some((key, path)) = value.split_once('=')
            && let Some(mapped) = self.map_path(path)
        {
            return format!("{key}={mapped}");
        }
        value.to_string()
    }

    fn map_path(&self, value: &str) -> Option<String> {
        self.mounts.iter().find_map(|(container, host)| {
            let rest = value.strip_prefix(container.as_str())?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            Some(join(host, rest.trim_start_matches('/')))
        })
    }
}

fn join(host: &Path, rest: &str) -> String {
    if rest.is_empty() {
        host.display().to_string()
    } else {
        host.join(rest).display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> PathMap {
        let mut map = PathMap::default();
        map.mount("/opt/train/", "/home/me/examples/tensorflow");
        map.mount("/opt/train/data", "/srv/data");
        map
    }

    #[test]
    fn paths_under_a_mount_point_at_the_host_directory() {
        let map = map();
        assert_eq!(
            map.apply("/opt/train/train.py"),
            "/home/me/examples/tensorflow/train.py"
        );
        assert_eq!(map.apply("/opt/train"), "/home/me/examples/tensorflow");
        assert_eq!(map.apply("/opt/train/data/x.csv"), "/srv/data/x.csv");
        assert_eq!(
            map.apply("--program=/opt/train/mwms.py"),
            "--program=/home/me/examples/tensorflow/mwms.py"
        );
    }

    #[test]
    fn other_values_are_left_alone() {
        let map = map();
        for v in ["/opt/training/x", "python", "opt/train/x", "a=b", ""] {
            assert_eq!(map.apply(v), v, "{v}");
        }
        assert!(PathMap::default().is_empty());
    }
}
