//! Datasets, partitioning across workers, and per-epoch batching.
//!
//! Every worker derives the same train/test split and the same partition map from the
//! seed, then keeps only its own partition in memory. Sources that are bytes (IDX images,
//! the 0..16 digits pixels) stay bytes; one batch at a time is widened to `f32`.

mod loaders;

use std::path::PathBuf;

use kubetrain_api::{BuiltinDataset, DatasetSpec};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};

pub use loaders::DIGITS_CSV_GZ;

/// Where Debian's `dataset-fashion-mnist` package puts the gzipped IDX files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// The held-out share for datasets without their own test split, unless the spec says.
pub const DEFAULT_TEST_FRACTION: f64 = 0.2;

/// A dataset could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file is missing or unreadable.
    #[error("reading dataset file {path}: {source}; {hint}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
        hint: String,
    },
    /// A file was read but its content is not what the format says.
    #[error("parsing dataset file {path}: {reason}; {hint}")]
    Corrupt {
        path: PathBuf,
        reason: String,
        hint: String,
    },
    /// The spec names no usable dataset.
    #[error("choosing the dataset: {0}")]
    Spec(String),
    /// Too few examples to give every worker a batch.
    #[error("partitioning the dataset: {0}")]
    TooSmall(String),
}

/// Which share of the training examples a worker owns: those at positions `j` of the
/// seeded shuffle with `j % count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub index: usize,
    pub count: usize,
}

/// Feature storage: bytes when the source is bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Features {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

/// A set of labelled examples, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Examples {
    pub inputs: usize,
    pub features: Features,
    /// Multiplier applied when bytes are widened to f32 (1/16 for digits, 1/255 for IDX).
    pub scale: f32,
    pub labels: Vec<u8>,
}

impl Examples {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// No examples at all.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Appends the chosen examples, as f32, to `x` and their labels to `y`.
    pub fn gather(&self, indices: &[usize], x: &mut Vec<f32>, y: &mut Vec<u8>) {
        let d = self.inputs;
        for &i in indices {
            match &self.features {
                Features::U8(bytes) => x.extend(
                    bytes[i * d..(i + 1) * d]
                        .iter()
                        .map(|&b| b as f32 * self.scale),
                ),
                Features::F32(values) => x.extend_from_slice(&values[i * d..(i + 1) * d]),
            }
            y.push(self.labels[i]);
        }
    }

    /// Bytes of feature storage (for memory reports).
    pub fn feature_bytes(&self) -> usize {
        match &self.features {
            Features::U8(b) => b.len(),
            Features::F32(v) => v.len() * 4,
        }
    }
}

/// One worker's view of a dataset.
#[derive(Debug, Clone)]
pub struct LoadedData {
    /// Feature count.
    pub inputs: usize,
    /// Class count (labels are `0..classes`).
    pub classes: usize,
    /// Training examples in the whole dataset (all partitions).
    pub train_total: usize,
    /// This worker's partition of the training examples.
    pub train: Examples,
    /// The test split, when asked for.
    pub test: Option<Examples>,
}

/// Labels are stored as bytes, so no dataset has more classes than this.
pub const MAX_CLASSES: usize = 256;

/// The ends of the model a dataset fixes, known without reading its examples: the
/// feature count, and the class count where the dataset declares it (the builtins). A
/// CSV's classes are the largest label + 1, which only a full read tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataShape {
    pub inputs: usize,
    pub classes: Option<usize>,
}

/// The [`DataShape`] of the dataset the spec names; a CSV's header is read for it.
pub fn shape(spec: &DatasetSpec) -> Result<DataShape, DataError> {
    match (spec.builtin, &spec.path) {
        (Some(BuiltinDataset::Digits), _) => Ok(DataShape {
            inputs: loaders::DIGITS_INPUTS,
            classes: Some(loaders::DIGITS_CLASSES),
        }),
        (Some(BuiltinDataset::FashionMnist), _) => Ok(DataShape {
            inputs: loaders::FASHION_MNIST_INPUTS,
            classes: Some(loaders::FASHION_MNIST_CLASSES),
        }),
        (None, Some(path)) => {
            let label = spec.label_column.as_deref().unwrap_or("label");
            Ok(DataShape {
                inputs: loaders::csv_inputs(path.as_ref(), label)?,
                classes: None,
            })
        }
        (None, None) => Err(DataError::Spec(
            "name a dataset: builtin digits or fashion-mnist, or a csv path".into(),
        )),
    }
}

/// Reads the dataset the spec names, keeping `partition`'s training examples and, when
/// `with_test`, the test split.
pub fn load(
    spec: &DatasetSpec,
    seed: u64,
    partition: Partition,
    with_test: bool,
) -> Result<LoadedData, DataError> {
    if partition.count == 0 || partition.index >= partition.count {
        return Err(DataError::Spec(format!(
            "worker {} of {} does not exist",
            partition.index, partition.count
        )));
    }
    let fraction = spec.test_fraction.unwrap_or(DEFAULT_TEST_FRACTION);
    match (spec.builtin, &spec.path) {
        (Some(BuiltinDataset::Digits), _) => loaders::digits(seed, fraction, partition, with_test),
        (Some(BuiltinDataset::FashionMnist), path) => {
            let dir = path.as_deref().unwrap_or(FASHION_MNIST_DIR);
            loaders::fashion_mnist(dir.as_ref(), seed, partition, with_test)
        }
        (None, Some(path)) => {
            let label = spec.label_column.as_deref().unwrap_or("label");
            loaders::csv_file(path.as_ref(), label, seed, fraction, partition, with_test)
        }
        (None, None) => Err(DataError::Spec(
            "name a dataset: builtin digits or fashion-mnist, or a csv path".into(),
        )),
    }
}

/// Which examples go where: `(train positions of this partition, test indices)`, both as
/// indices into the source file. The same seed gives every worker the same map.
pub(crate) fn assign(
    total: usize,
    test_count: usize,
    seed: u64,
    partition: Partition,
) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..total).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x5eed_da7a));
    let test = order[..test_count].to_vec();
    let train = order[test_count..]
        .iter()
        .enumerate()
        .filter(|(j, _)| j % partition.count == partition.index)
        .map(|(_, &i)| i)
        .collect();
    (train, test)
}

/// How many examples each step takes and how many steps make an epoch. Every worker gets
/// the same numbers (from the smallest partition), so Sync workers stay in lock-step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub batch: usize,
    pub steps_per_epoch: usize,
}

impl Schedule {
    /// The schedule for `train_total` examples over `workers` partitions.
    pub fn new(train_total: usize, workers: usize, batch_size: usize) -> Result<Self, DataError> {
        let smallest = train_total / workers.max(1);
        if smallest == 0 {
            return Err(DataError::TooSmall(format!(
                "{train_total} training examples cannot be shared by {workers} workers; use fewer workers or more data"
            )));
        }
        let batch = batch_size.clamp(1, smallest);
        Ok(Self {
            batch,
            steps_per_epoch: smallest / batch,
        })
    }

    /// The epoch a global step belongs to.
    pub fn epoch_of(&self, step: u64) -> u64 {
        step / self.steps_per_epoch as u64
    }
}

/// Per-epoch reshuffled batches over one partition.
#[derive(Debug, Clone)]
pub struct Batcher {
    schedule: Schedule,
    seed: u64,
    worker: usize,
    len: usize,
    epoch: Option<u64>,
    order: Vec<usize>,
}

impl Batcher {
    pub fn new(schedule: Schedule, seed: u64, worker: usize, len: usize) -> Self {
        Self {
            schedule,
            seed,
            worker,
            len,
            epoch: None,
            order: Vec::new(),
        }
    }

    /// The partition-local example indices of global step `step`.
    pub fn indices(&mut self, step: u64) -> &[usize] {
        let epoch = self.schedule.epoch_of(step);
        if self.epoch != Some(epoch) {
            self.order = (0..self.len).collect();
            let seed = self.seed
                ^ (epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                ^ ((self.worker as u64 + 1).wrapping_mul(0xc2b2_ae3d_27d4_eb4f));
            self.order.shuffle(&mut StdRng::seed_from_u64(seed));
            self.epoch = Some(epoch);
        }
        let within = (step % self.schedule.steps_per_epoch as u64) as usize;
        let b = self.schedule.batch;
        &self.order[within * b..(within + 1) * b]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_disjoint_and_cover_the_training_split() {
        let (mut all, mut tests) = (Vec::new(), None);
        for index in 0..3 {
            let (train, test) = assign(100, 20, 7, Partition { index, count: 3 });
            all.extend(train);
            tests.get_or_insert(test.clone());
            assert_eq!(tests.as_ref(), Some(&test));
        }
        all.extend(tests.unwrap());
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn batches_reshuffle_per_epoch_and_repeat_per_seed() {
        let schedule = Schedule::new(40, 2, 5).unwrap();
        assert_eq!(
            schedule,
            Schedule {
                batch: 5,
                steps_per_epoch: 4
            }
        );
        let mut a = Batcher::new(schedule, 1, 0, 20);
        let mut b = Batcher::new(schedule, 1, 0, 20);
        let first: Vec<usize> = a.indices(0).to_vec();
        assert_eq!(first, b.indices(0));
        let next_epoch = a.indices(4).to_vec();
        assert_ne!(first, next_epoch);
        let mut seen: Vec<usize> = (0..4).flat_map(|s| a.indices(s).to_vec()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 20);
    }

    #[test]
    fn digits_load_and_partition() {
        let spec = DatasetSpec {
            builtin: Some(BuiltinDataset::Digits),
            ..Default::default()
        };
        let part = load(&spec, 42, Partition { index: 1, count: 2 }, true).unwrap();
        assert_eq!((part.inputs, part.classes), (64, 10));
        let test = part.test.unwrap();
        assert_eq!(part.train_total + test.len(), 1797);
        assert_eq!(part.train.len(), part.train_total / 2);
        assert!(matches!(part.train.features, Features::U8(_)));
    }

    #[test]
    fn missing_fashion_mnist_names_path_and_fix() {
        let spec = DatasetSpec {
            builtin: Some(BuiltinDataset::FashionMnist),
            path: Some("/nonexistent/fmnist".into()),
            ..Default::default()
        };
        let err = load(&spec, 1, Partition { index: 0, count: 1 }, false).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/nonexistent/fmnist/train-images-idx3-ubyte.gz"),
            "{text}"
        );
        assert!(
            text.contains("apt-get install dataset-fashion-mnist"),
            "{text}"
        );
    }
}
