//! A container's termination message, as a kubelet reads it: whatever the process left at
//! its `terminationMessagePath`, cut at the kubelet's limit. Both runners put it into the
//! terminated container state, where the operator reads why a trainer stopped (for example
//! a `Diverged` run) and a short job's final progress.

use std::path::Path;

/// What a real kubelet keeps of a termination message.
pub const LIMIT: usize = 4096;

/// The message at `path`, trimmed; None when there is no file or it is empty.
pub fn read(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let kept = &bytes[..bytes.len().min(LIMIT)];
    let message = String::from_utf8_lossy(kept).trim().to_string();
    (!message.is_empty()).then_some(message)
}

/// A new container start has no message yet: the file a previous run left is removed.
pub fn clear(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_trimmed_cut_at_the_limit_and_absent_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("termination-log");
        assert_eq!(read(&path), None, "no file");
        std::fs::write(&path, "  \n").unwrap();
        assert_eq!(read(&path), None, "blank");
        std::fs::write(&path, "training diverged at step 4\n").unwrap();
        assert_eq!(read(&path).as_deref(), Some("training diverged at step 4"));
        std::fs::write(&path, "x".repeat(LIMIT + 100)).unwrap();
        assert_eq!(read(&path).map(|m| m.len()), Some(LIMIT));
        clear(&path);
        assert_eq!(read(&path), None, "cleared");
    }
}
