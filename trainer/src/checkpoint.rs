//! Checkpoints of a PS shard or a pipeline stage: parameters, optimizer state and version
//! in one file per shard or stage, written
//! atomically (temp file, fsync, rename, fsync of the directory) so a crash mid-write
//! leaves the previous checkpoint intact. The one before is kept as `.ckpt.prev`: a
//! checkpoint damaged after it was written (a truncated copy, a bad disk) costs one
//! interval of steps instead of the run.
//!
//! Layout: `KTCKPT01`, u32 LE header length, JSON header, the parameters and then each
//! optimizer state vector as LE f32, and a trailing u64 LE FNV-1a checksum of all before.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::OptimizerState;

const MAGIC: &[u8; 8] = b"KTCKPT01";

/// A checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("writing checkpoint {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "reading checkpoint {path}: {reason}; delete the file to start this shard from scratch"
    )]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "spec.training.checkpoint.path: {path} is not writable here ({source}); mount a writable volume at that path in this pod, or remove spec.training.checkpoint"
    )]
    Unwritable {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Proves at start that `dir` takes checkpoints: creates it, then writes, syncs and
/// removes a probe file. An unwritable path then fails the pod at once, naming the field,
/// instead of warning at every write while the job goes on to succeed with no checkpoint.
pub fn probe_writable(dir: &Path) -> Result<(), CheckpointError> {
    let err = |source| CheckpointError::Unwritable {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let probe = dir.join(format!(".kubetrain-write-probe-{}", std::process::id()));
    let written = std::fs::File::create(&probe).and_then(|mut file| {
        file.write_all(b"probe")?;
        file.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    written.map_err(err)
}

/// Everything a shard needs to resume.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardCheckpoint {
    pub version: u64,
    pub start: usize,
    pub end: usize,
    pub total_params: usize,
    pub params: Vec<f32>,
    pub optimizer: OptimizerState,
}

#[derive(Serialize, Deserialize)]
struct Header {
    version: u64,
    start: usize,
    end: usize,
    total_params: usize,
    optimizer: String,
    adam_step: u64,
}

/// `ps-<index>-of-<count>.ckpt` in the checkpoint directory.
pub fn file_name(dir: &Path, index: usize, count: usize) -> PathBuf {
    dir.join(format!("ps-{index}-of-{count}.ckpt"))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

pub(super) fn encode(ckpt: &ShardCheckpoint) -> Vec<u8> {
    let (kind, adam_step) = match &ckpt.optimizer {
        OptimizerState::Sgd { .. } => ("sgd", 0),
        OptimizerState::Adam { t, .. } => ("adam", *t),
    };
    let header = serde_json::to_vec(&Header {
        version: ckpt.version,
        start: ckpt.start,
        end: ckpt.end,
        total_params: ckpt.total_params,
        optimizer: kind.into(),
        adam_step,
    })
    .expect("a checkpoint header always serialises");
    let vectors = ckpt.optimizer.vectors();
    let mut out =
        Vec::with_capacity(16 + header.len() + 4 * ckpt.params.len() * (1 + vectors.len()));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    for v in std::iter::once(ckpt.params.as_slice()).chain(vectors) {
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    let sum = fnv1a(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Writes the checkpoint to `path` atomically.
pub fn write(path: &Path, ckpt: &ShardCheckpoint) -> Result<(), CheckpointError> {
    let err = |source| CheckpointError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = path.with_extension("ckpt.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(err)?;
    file.write_all(&encode(ckpt)).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    // A crash between the renames leaves only `.prev`, which `read_newest` then takes.
    match std::fs::rename(path, previous(path)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    std::fs::rename(&tmp, path).map_err(err)?;
    // The rename itself must survive a crash too.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)?;
    Ok(())
}

/// Where the checkpoint before the one at `path` is kept.
pub fn previous(path: &Path) -> PathBuf {
    path.with_extension("ckpt.prev")
}

/// A checkpoint to resume from, and the newer one that could not be read, if any.
#[derive(Debug)]
pub struct Resume {
    pub checkpoint: ShardCheckpoint,
    pub from: PathBuf,
    pub skipped: Option<CheckpointError>,
}

/// The newest readable checkpoint of `path`: the file itself, else the one before it.
/// `Ok(None)` when there is neither; an error when neither can be read.
pub fn read_newest(path: &Path) -> Result<Option<Resume>, CheckpointError> {
    let skipped = match read(path) {
        Ok(Some(checkpoint)) => {
            return Ok(Some(Resume {
                checkpoint,
                from: path.to_path_buf(),
                skipped: None,
            }));
        }
        Ok(None) => None,
        Err(e) => Some(e),
    };
    let older = previous(path);
    match (read(&older), skipped) {
        (Ok(Some(checkpoint)), skipped) => Ok(Some(Resume {
            checkpoint,
            from: older,
            skipped,
        })),
        (Ok(None), None) => Ok(None),
        // The newest is damaged and there is nothing older: its error says what to do.
        (Ok(None), Some(e)) | (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(e),
    }
}

/// Reads a checkpoint; `Ok(None)` when there is none yet.
pub fn read(path: &Path) -> Result<Option<ShardCheckpoint>, CheckpointError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CheckpointError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    decode(&bytes)
        .map(Some)
        .map_err(|reason| CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason,
        })
}

pub(super) fn decode(bytes: &[u8]) -> Result<ShardCheckpoint, String> {
    if bytes.len() < 20 || &bytes[..8] != MAGIC {
        return Err("not a kubetrain shard checkpoint (bad magic)".into());
    }
    let (body, tail) = bytes.split_at(bytes.len() - 8);
    let stored = u64::from_le_bytes(tail.try_into().map_err(|_| "short file")?);
    if fnv1a(body) != stored {
        return Err("checksum mismatch (truncated or corrupted)".into());
    }
    let header_len = u32::from_le_bytes(body[8..12].try_into().map_err(|_| "short file")?) as usize;
    let header_end = 12usize
        .checked_add(header_len)
        .filter(|&e| e <= body.len())
        .ok_or("header length past end of file")?;
    let header: Header =
        serde_json::from_slice(&body[12..header_end]).map_err(|e| format!("bad header: {e}"))?;
    if header.end < header.start {
        return Err("shard range is inverted".into());
    }
    let len = header.end - header.start;
    let vectors = match header.optimizer.as_str() {
        "sgd" => 1,
        "adam" => 2,
        other => return Err(format!("unknown optimizer {other:?}")),
    };
    let payload = &body[header_end..];
    // The header's range is untrusted: its size in bytes may not fit in a usize at all.
    let expected = len
        .checked_mul(4 * (1 + vectors))
        .ok_or_else(|| format!("shard range of {len} parameters is larger than any file"))?;
    if payload.len() != expected {
        return Err(format!(
            "payload has {} bytes, expected {expected}",
            payload.len(),
        ));
    }
    let mut floats = payload
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let mut take = || floats.by_ref().take(len).collect::<Vec<f32>>();
    let params = take();
    let optimizer = match vectors {
        1 => OptimizerState::Sgd { velocity: take() },
        _ => OptimizerState::Adam {
            m: take(),
            v: take(),
            t: header.adam_step,
        },
    };
    Ok(ShardCheckpoint {
        version: header.version,
        start: header.start,
        end: header.end,
        total_params: header.total_params,
        params,
        optimizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writable_directory_passes_the_probe_and_keeps_no_file() {
        let dir = std::env::temp_dir().join(format!("kubetrain-probe-{}", std::process::id()));
        let nested = dir.join("a/b");
        probe_writable(&nested).unwrap();
        assert_eq!(std::fs::read_dir(&nested).unwrap().count(), 0);
        // Below a file no directory can exist, for root too.
        let err = probe_writable(Path::new("/dev/null/ckpt")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("spec.training.checkpoint.path: /dev/null/ckpt is not writable here"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn checkpoint(version: u64) -> ShardCheckpoint {
        ShardCheckpoint {
            version,
            start: 0,
            end: 3,
            total_params: 3,
            params: vec![version as f32; 3],
            optimizer: OptimizerState::Sgd {
                velocity: vec![0.5; 3],
            },
        }
    }

    #[test]
    fn a_damaged_checkpoint_falls_back_to_the_one_before_and_says_why() {
        let dir = std::env::temp_dir().join(format!("kubetrain-prev-{}", std::process::id()));
        let path = dir.join("ps-0-of-1.ckpt");
        assert!(read_newest(&path).unwrap().is_none(), "nothing yet");
        write(&path, &checkpoint(100)).unwrap();
        write(&path, &checkpoint(200)).unwrap();
        let newest = read_newest(&path).unwrap().unwrap();
        assert_eq!(
            (newest.checkpoint.version, newest.skipped.is_none()),
            (200, true)
        );
        assert_eq!(read(&previous(&path)).unwrap().unwrap().version, 100);

        // Truncated, as by a copy cut short: the one before is taken, and the reason kept.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let resumed = read_newest(&path).unwrap().unwrap();
        assert_eq!(resumed.checkpoint.version, 100);
        assert_eq!(resumed.from, previous(&path));
        let why = resumed.skipped.unwrap().to_string();
        assert!(why.contains("ps-0-of-1.ckpt"), "{why}");

        // Gone (a crash between the two renames): the one before, with nothing skipped.
        std::fs::remove_file(&path).unwrap();
        let resumed = read_newest(&path).unwrap().unwrap();
        assert_eq!(
            (resumed.checkpoint.version, resumed.skipped.is_none()),
            (100, true)
        );

        // Both damaged: an error naming the newest, never a silent fresh start.
        std::fs::write(&path, &bytes[..10]).unwrap();
        std::fs::write(previous(&path), &bytes[..10]).unwrap();
        let err = read_newest(&path).unwrap_err().to_string();
        assert!(err.contains("ps-0-of-1.ckpt:"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_range_larger_than_any_file_is_refused() {
        // Found by `fuzz/` (target `checkpoint`): the payload size, 8 bytes a parameter
        // here, overflowed; without overflow checks 2^61 + 1 parameters wrapped to 8 bytes.
        let header = br#"{"version":1,"start":0,"end":2305843009213693953,"total_params":1,"optimizer":"sgd","adam_step":0}"#;
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 8]);
        let sum = fnv1a(&bytes);
        bytes.extend_from_slice(&sum.to_le_bytes());
        let err = decode(&bytes).unwrap_err();
        assert!(err.contains("2305843009213693953 parameters"), "{err}");
    }

    #[test]
    fn round_trips_and_detects_corruption() {
        let dir = std::env::temp_dir().join(format!("kubetrain-ckpt-{}", std::process::id()));
        let path = file_name(&dir, 1, 2);
        assert_eq!(read(&path).unwrap(), None);
        let ckpt = ShardCheckpoint {
            version: 7,
            start: 3,
            end: 6,
            total_params: 6,
            params: vec![1.0, 2.0, 3.0],
            optimizer: OptimizerState::Adam {
                m: vec![0.1; 3],
                v: vec![0.2; 3],
                t: 7,
            },
        };
        write(&path, &ckpt).unwrap();
        assert_eq!(read(&path).unwrap(), Some(ckpt));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 5);
        std::fs::write(&path, bytes).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(
            err.contains("checksum") && err.contains("ps-1-of-2.ckpt"),
            "{err}"
        );
    }
}
