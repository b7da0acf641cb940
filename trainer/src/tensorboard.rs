//! TensorBoard event files under `spec.training.logDir`: the chief's train and test
//! curves, each parameter server's Async staleness and each pipeline stage's busy/idle
//! time, one TensorBoard run (sub-folder) per process: `worker-0`, `ps-0`, ...
//!
//! The format is TFRecord framing (length, masked CRC-32C, data, masked CRC-32C) around
//! `tensorflow.Event` protos. The three messages needed are declared here for the prost
//! that the gRPC code already uses; tensorboard-rs was passed over (unmaintained since
//! 2022, and built on protobuf 2 and image 0.23). The reader is here too, so that
//! `kubetrain local` draws its curves from the same files TensorBoard reads.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prost::Message;

/// `tensorflow.Event`, the fields kubetrain writes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// The first event of every file: `brain.Event:2`.
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a scalar (`simple_value`), which TensorBoard shows in
/// its Scalars tab.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

const FILE_VERSION: &str = "brain.Event:2";

/// CRC-32C as TFRecord stores it: rotated and offset, so that a CRC of data that itself
/// holds CRCs is not degenerate.
pub fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

/// One TFRecord: the length and the data, each followed by its masked CRC.
pub fn record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// An event of scalars at `step`.
pub fn scalars_event(wall_time: f64, step: u64, values: &[(&str, f64)]) -> Event {
    Event {
        wall_time,
        step: i64::try_from(step).unwrap_or(i64::MAX),
        file_version: None,
        summary: Some(Summary {
            value: values
                .iter()
                .map(|(tag, value)| SummaryValue {
                    tag: (*tag).to_string(),
                    simple_value: Some(*value as f32),
                })
                .collect(),
        }),
    }
}

/// Why an event file could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum EventReadError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: record at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: usize,
        what: &'static str,
    },
}

/// The events of one file's bytes. A record cut short at the end is where a writer that
/// is still running (or was killed) stopped, and ends the list rather than failing it.
pub fn parse_events(bytes: &[u8]) -> Result<Vec<Event>, (usize, &'static str)> {
    let mut events = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 12 {
        let header = &bytes[at..at + 8];
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        if masked_crc(header) != crc {
            return Err((at, "length CRC mismatch"));
        }
        let length = u64::from_le_bytes(header.try_into().expect("8 bytes"));
        let Some(end) = usize::try_from(length)
            .ok()
            .and_then(|n| (at + 12).checked_add(n))
            .filter(|end| end + 4 <= bytes.len())
        else {
            break;
        };
        let data = &bytes[at + 12..end];
        let crc = u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes"));
        if masked_crc(data) != crc {
            return Err((at, "data CRC mismatch"));
        }
        events.push(Event::decode(data).map_err(|_| (at, "not an Event proto"))?);
        at = end + 4;
    }
    Ok(events)
}

/// Every scalar in the event files of one run folder, by tag, as (step, value) in the
/// order written.
pub fn read_scalars(run: &Path) -> Result<BTreeMap<String, Vec<(u64, f32)>>, EventReadError> {
    let read = |path: &Path| {
        let source = |source| EventReadError::Read {
            path: path.to_path_buf(),
            source,
        };
        std::fs::read(path).map_err(source)
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(run)
        .map_err(|source| EventReadError::Read {
            path: run.to_path_buf(),
            source,
        })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("tfevents"))
        })
        .collect();
    // The names start with the creation time in seconds: a restarted process's file sorts
    // after the one before it (within a second, the same pid and host, by nanoseconds).
    files.sort();
    let mut scalars: BTreeMap<String, Vec<(u64, f32)>> = BTreeMap::new();
    for path in files {
        let events =
            parse_events(&read(&path)?).map_err(|(offset, what)| EventReadError::Corrupt {
                path: path.clone(),
                offset,
                what,
            })?;
        for event in events {
            for value in event.summary.into_iter().flat_map(|s| s.value) {
                if let Some(v) = value.simple_value {
                    let step = u64::try_from(event.step).unwrap_or(0);
                    scalars.entry(value.tag).or_default().push((step, v));
                }
            }
        }
    }
    Ok(scalars)
}

/// The run folder of one process: `<logDir>/<role>-<index>`.
pub fn run_dir(log_dir: &Path, role: impl std::fmt::Display, index: usize) -> PathBuf {
    log_dir.join(format!("{role}-{index}"))
}

/// One process's event file, shared by whatever in the process reports. A clone writes to
/// the same file; [`EventLog::off`] writes nothing.
#[derive(Clone, Default)]
pub struct EventLog(Option<Arc<Mutex<Writer>>>);

struct Writer {
    out: BufWriter<File>,
    path: PathBuf,
    flushed: Instant,
    failed: bool,
}

/// How long written events may sit in the buffer: TensorBoard (and a user refreshing it)
/// sees a live run this far behind at most.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

impl EventLog {
    pub fn off() -> Self {
        Self(None)
    }

    /// Creates the run folder and a new event file in it, and writes its first event: a
    /// folder that cannot be written fails here, at start, not silently later.
    pub fn create(run: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(run)?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        // A restarted container is pid 1 on the same host again: the nanoseconds keep a
        // restart within the same second from colliding with its predecessor's file.
        let path = run.join(format!(
            "events.out.tfevents.{}.{host}.{}.{:09}.kubetrain",
            now.as_secs(),
            std::process::id(),
            now.subsec_nanos()
        ));
        let mut out = BufWriter::new(File::create_new(&path)?);
        let first = Event {
            wall_time: now.as_secs_f64(),
            step: 0,
            file_version: Some(FILE_VERSION.into()),
            summary: None,
        };
        out.write_all(&record(&first.encode_to_vec()))?;
        out.flush()?;
        Ok(Self(Some(Arc::new(Mutex::new(Writer {
            out,
            path,
            flushed: Instant::now(),
            failed: false,
        })))))
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Appends scalars at `step`. Curves are for watching, not the work: a write that
    /// fails is logged once and the log goes quiet, while training goes on.
    pub fn scalars(&self, step: u64, values: &[(&str, f64)]) {
        let Some(writer) = &self.0 else { return };
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        if w.failed {
            return;
        }
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let bytes = record(&scalars_event(wall, step, values).encode_to_vec());
        let mut result = w.out.write_all(&bytes);
        if result.is_ok() && w.flushed.elapsed() >= FLUSH_EVERY {
            result = w.out.flush();
            w.flushed = Instant::now();
        }
        if let Err(error) = result {
            w.failed = true;
            tracing::warn!(path = %w.path.display(), %error, "TensorBoard events no longer written");
        }
    }

    /// Writes out what is buffered: at the end of training, so the last points are there.
    pub fn flush(&self) {
        let Some(writer) = &self.0 else { return };
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        if !w.failed
            && let Err(error) = w.out.flush()
        {
            w.failed = true;
            tracing::warn!(path = %w.path.display(), %error, "TensorBoard events no longer written");
        }
        w.flushed = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC-32C("123456789") is the standard check value 0xE3069283; TensorFlow's
        // crc32c::Mask rotates it right by 15 and adds 0xa282ead8.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // ((c >> 15) | (c << 17)) + 0xa282ead8, worked out by hand.
        assert_eq!(masked_crc(b"123456789"), 0xc78ab0e5);
    }

    #[test]
    fn records_round_trip_and_a_cut_tail_ends_the_list() {
        let events = [
            scalars_event(1.5, 3, &[("train/loss", 0.25), ("test/accuracy", 0.875)]),
            scalars_event(2.5, 4, &[("train/loss", 0.125)]),
        ];
        let mut bytes: Vec<u8> = events
            .iter()
            .flat_map(|e| record(&e.encode_to_vec()))
            .collect();
        assert_eq!(parse_events(&bytes).unwrap(), events);
        bytes.truncate(bytes.len() - 3);
        assert_eq!(parse_events(&bytes).unwrap(), events[..1]);
        bytes[20] ^= 0xff;
        assert_eq!(parse_events(&bytes).unwrap_err().1, "data CRC mismatch");
    }

    #[test]
    fn a_written_log_reads_back_by_tag_across_restarts() {
        let dir = std::env::temp_dir().join(format!("kubetrain-tb-{}", std::process::id()));
        let run = run_dir(&dir, "worker", 0);
        let _ = std::fs::remove_dir_all(&dir);
        let log = EventLog::create(&run).unwrap();
        log.scalars(1, &[("train/loss", 2.0)]);
        log.scalars(2, &[("train/loss", 1.0), ("test/accuracy", 0.5)]);
        log.flush();
        // The same process (pid, host, most likely second) again, as a restarted
        // container is: a file of its own, read after the first.
        let restarted = EventLog::create(&run).unwrap();
        restarted.scalars(3, &[("train/loss", 0.5)]);
        restarted.flush();
        assert_eq!(std::fs::read_dir(&run).unwrap().count(), 2);
        let scalars = read_scalars(&run).unwrap();
        assert_eq!(scalars["train/loss"], [(1, 2.0), (2, 1.0), (3, 0.5)]);
        assert_eq!(scalars["test/accuracy"], [(2, 0.5)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_folder_fails_at_create() {
        let file = std::env::temp_dir().join(format!("kubetrain-tb-file-{}", std::process::id()));
        std::fs::write(&file, b"not a folder").unwrap();
        assert!(EventLog::create(&file.join("worker-0")).is_err());
        std::fs::remove_file(&file).unwrap();
    }
}
