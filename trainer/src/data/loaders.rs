use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use super::{DataError, Examples, Features, LoadedData, Partition, assign};

/// The built-in datasets' shapes, which [`super::shape`] reports without loading them.
pub(super) const DIGITS_INPUTS: usize = 64;
pub(super) const DIGITS_CLASSES: usize = 10;
pub(super) const FASHION_MNIST_INPUTS: usize = 28 * 28;
pub(super) const FASHION_MNIST_CLASSES: usize = 10;

/// The 8x8 UCI digits (1,797 examples, CC BY 4.0), as scikit-learn ships them: 64 pixel
/// columns in 0..16, then the label.
pub const DIGITS_CSV_GZ: &[u8] = include_bytes!("../../data/digits.csv.gz");

const FASHION_HINT: &str = "install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) or set spec.training.dataset.path to a directory holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz";

fn test_count(total: usize, fraction: f64) -> usize {
    ((total as f64) * fraction).round() as usize
}

/// Keeps the chosen rows of a row-major table.
fn take_rows<T: Copy>(values: &[T], width: usize, rows: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        out.extend_from_slice(&values[r * width..(r + 1) * width]);
    }
    out
}

/// A whole labelled table before it is split.
struct Table<T> {
    values: Vec<T>,
    labels: Vec<u8>,
    inputs: usize,
    classes: usize,
    scale: f32,
    wrap: fn(Vec<T>) -> Features,
}

/// How to cut a table: the seed, the test share, and whose partition to keep.
struct Cut {
    seed: u64,
    fraction: f64,
    partition: Partition,
    with_test: bool,
}

fn split_table<T: Copy>(table: Table<T>, cut: Cut) -> LoadedData {
    let total = table.labels.len();
    let (train, test) = assign(
        total,
        test_count(total, cut.fraction),
        cut.seed,
        cut.partition,
    );
    let subset = |rows: &[usize]| Examples {
        inputs: table.inputs,
        features: (table.wrap)(take_rows(&table.values, table.inputs, rows)),
        scale: table.scale,
        labels: rows.iter().map(|&r| table.labels[r]).collect(),
    };
    LoadedData {
        inputs: table.inputs,
        classes: table.classes,
        train_total: total - test.len(),
        train: subset(&train),
        test: cut.with_test.then(|| subset(&test)),
    }
}

pub(super) fn digits(
    seed: u64,
    fraction: f64,
    partition: Partition,
    with_test: bool,
) -> Result<LoadedData, DataError> {
    let path = PathBuf::from("<built-in digits>");
    let corrupt = |reason: String| DataError::Corrupt {
        path: path.clone(),
        reason,
        hint: "the trainer binary is damaged; rebuild it".into(),
    };
    let mut text = String::new();
    GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| corrupt(e.to_string()))?;
    let (mut pixels, mut labels) = (Vec::with_capacity(1797 * 64), Vec::with_capacity(1797));
    for (line_no, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != 65 {
            return Err(corrupt(format!(
                "line {}: {} columns, expected 65",
                line_no + 1,
                cells.len()
            )));
        }
        for cell in &cells {
            let v: f32 = cell
                .trim()
                .parse()
                .map_err(|_| corrupt(format!("line {}: {cell:?} is not a number", line_no + 1)))?;
            if !(0.0..=16.0).contains(&v) {
                return Err(corrupt(format!(
                    "line {}: {v} is outside 0..16",
                    line_no + 1
                )));
            }
            pixels.push(v as u8);
        }
        labels.push(pixels.pop().unwrap_or_default());
    }
    Ok(split_table(
        Table {
            values: pixels,
            labels,
            inputs: DIGITS_INPUTS,
            classes: DIGITS_CLASSES,
            scale: 1.0 / 16.0,
            wrap: Features::U8,
        },
        Cut {
            seed,
            fraction,
            partition,
            with_test,
        },
    ))
}

/// Reads a gzipped IDX file's header and hands the body over as a reader.
fn open_idx(
    path: &Path,
    magic: u32,
) -> Result<(Vec<usize>, BufReader<GzDecoder<std::fs::File>>), DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Open {
        path: path.to_path_buf(),
        source,
        hint: FASHION_HINT.into(),
    })?;
    let mut reader = BufReader::with_capacity(1 << 16, GzDecoder::new(file));
    let corrupt = |reason: String| DataError::Corrupt {
        path: path.to_path_buf(),
        reason,
        hint: FASHION_HINT.into(),
    };
    let mut word = [0u8; 4];
    reader
        .read_exact(&mut word)
        .map_err(|e| corrupt(format!("no IDX header ({e})")))?;
    let found = u32::from_be_bytes(word);
    if found != magic {
        return Err(corrupt(format!(
            "IDX magic {found:#010x}, expected {magic:#010x}"
        )));
    }
    let mut dims = Vec::new();
    for _ in 0..(magic & 0xff) {
        reader
            .read_exact(&mut word)
            .map_err(|e| corrupt(format!("truncated IDX header ({e})")))?;
        dims.push(u32::from_be_bytes(word) as usize);
    }
    Ok((dims, reader))
}

/// Streams an IDX images file and its labels, keeping only the wanted rows, in the order
/// `wanted` lists them.
fn read_idx_rows(dir: &Path, stem: &str, wanted: &[usize]) -> Result<(usize, Examples), DataError> {
    let images = dir.join(format!("{stem}-images-idx3-ubyte.gz"));
    let labels_path = dir.join(format!("{stem}-labels-idx1-ubyte.gz"));
    let (dims, mut image_reader) = open_idx(&images, 0x0000_0803)?;
    let (label_dims, mut label_reader) = open_idx(&labels_path, 0x0000_0801)?;
    let corrupt = |path: &Path, reason: String| DataError::Corrupt {
        path: path.to_path_buf(),
        reason,
        hint: FASHION_HINT.into(),
    };
    let (n, inputs) = (dims[0], dims[1] * dims[2]);
    if label_dims[0] != n {
        return Err(corrupt(
            &labels_path,
            format!("{} labels for {n} images", label_dims[0]),
        ));
    }
    // slot[i] = where example i goes in the kept set.
    let mut slot = vec![usize::MAX; n];
    for (k, &i) in wanted.iter().enumerate() {
        if i < n {
            slot[i] = k;
        }
    }
    let mut pixels = vec![0u8; wanted.len() * inputs];
    let mut labels = vec![0u8; wanted.len()];
    let mut row = vec![0u8; inputs];
    let mut all_labels = vec![0u8; n];
    label_reader
        .read_exact(&mut all_labels)
        .map_err(|e| corrupt(&labels_path, format!("truncated: {e}")))?;
    for (i, &k) in slot.iter().enumerate() {
        image_reader
            .read_exact(&mut row)
            .map_err(|e| corrupt(&images, format!("truncated at image {i} of {n}: {e}")))?;
        if k != usize::MAX {
            pixels[k * inputs..(k + 1) * inputs].copy_from_slice(&row);
            labels[k] = all_labels[i];
        }
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= 10) {
        return Err(corrupt(
            &labels_path,
            format!("label {bad} is not a Fashion-MNIST class (0..9)"),
        ));
    }
    Ok((
        n,
        Examples {
            inputs,
            features: Features::U8(pixels),
            scale: 1.0 / 255.0,
            labels,
        },
    ))
}

pub(super) fn fashion_mnist(
    dir: &Path,
    seed: u64,
    partition: Partition,
    with_test: bool,
) -> Result<LoadedData, DataError> {
    // The size is in the header; read it before deciding the partition map.
    let images = dir.join("train-images-idx3-ubyte.gz");
    let (dims, _) = open_idx(&images, 0x0000_0803)?;
    let total = dims[0];
    let (train_rows, _) = assign(total, 0, seed, partition);
    let (_, train) = read_idx_rows(dir, "train", &train_rows)?;
    let test = if with_test {
        let (dims, _) = open_idx(&dir.join("t10k-images-idx3-ubyte.gz"), 0x0000_0803)?;
        let all: Vec<usize> = (0..dims[0]).collect();
        Some(read_idx_rows(dir, "t10k", &all)?.1)
    } else {
        None
    };
    Ok(LoadedData {
        inputs: train.inputs,
        classes: FASHION_MNIST_CLASSES,
        train_total: total,
        train,
        test,
    })
}

/// An open CSV file past its header: the remaining lines, the header's column count, the
/// label's column, and how to report a corrupt file.
struct CsvHead {
    lines: std::io::Lines<BufReader<std::fs::File>>,
    columns: usize,
    label_at: usize,
    hint: String,
}

impl CsvHead {
    fn open(path: &Path, label_column: &str) -> Result<Self, DataError> {
        let hint = format!(
            "give a CSV file with a header row, numeric feature columns and an integer column {label_column:?} (spec.training.dataset.labelColumn)"
        );
        let file = std::fs::File::open(path).map_err(|source| DataError::Open {
            path: path.to_path_buf(),
            source,
            hint: format!("mount the file at this path or fix spec.training.dataset.path; {hint}"),
        })?;
        let corrupt = |reason: String| DataError::Corrupt {
            path: path.to_path_buf(),
            reason,
            hint: hint.clone(),
        };
        let mut lines = BufReader::new(file).lines();
        let header = lines
            .next()
            .ok_or_else(|| corrupt("the file is empty".into()))?
            .map_err(|e| corrupt(e.to_string()))?;
        let columns: Vec<&str> = header.split(',').map(str::trim).collect();
        let label_at = columns
            .iter()
            .position(|c| *c == label_column)
            .ok_or_else(|| {
                corrupt(format!(
                    "no column named {label_column:?} in header {columns:?}"
                ))
            })?;
        let columns = columns.len();
        Ok(Self {
            lines,
            columns,
            label_at,
            hint,
        })
    }
}

/// The number of feature columns of a CSV dataset, from its header alone.
pub(super) fn csv_inputs(path: &Path, label_column: &str) -> Result<usize, DataError> {
    Ok(CsvHead::open(path, label_column)?.columns - 1)
}

pub(super) fn csv_file(
    path: &Path,
    label_column: &str,
    seed: u64,
    fraction: f64,
    partition: Partition,
    with_test: bool,
) -> Result<LoadedData, DataError> {
    let CsvHead {
        lines,
        columns,
        label_at,
        hint,
    } = CsvHead::open(path, label_column)?;
    let corrupt = |reason: String| DataError::Corrupt {
        path: path.to_path_buf(),
        reason,
        hint: hint.clone(),
    };
    let inputs = columns - 1;
    let (mut values, mut labels) = (Vec::new(), Vec::new());
    for (n, line) in lines.enumerate() {
        let line = line.map_err(|e| corrupt(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != columns {
            return Err(corrupt(format!(
                "line {}: {} columns, header has {}",
                n + 2,
                cells.len(),
                columns
            )));
        }
        for (c, cell) in cells.iter().enumerate() {
            if c == label_at {
                let label: u8 = cell.parse().map_err(|_| {
                    corrupt(format!(
                        "line {}: label {cell:?} is not an integer in 0..=255",
                        n + 2
                    ))
                })?;
                labels.push(label);
            } else {
                let v: f32 = cell
                    .parse()
                    .map_err(|_| corrupt(format!("line {}: {cell:?} is not a number", n + 2)))?;
                values.push(v);
            }
        }
    }
    if labels.is_empty() {
        return Err(corrupt("no data rows".into()));
    }
    let classes = labels.iter().copied().max().unwrap_or(0) as usize + 1;
    Ok(split_table(
        Table {
            values,
            labels,
            inputs,
            classes,
            scale: 1.0,
            wrap: Features::F32,
        },
        Cut {
            seed,
            fraction,
            partition,
            with_test,
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn idx_dir(name: &str, n: u32, truncate: bool) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kubetrain-idx-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for stem in ["train", "t10k"] {
            let mut images = vec![0, 0, 8, 3];
            for d in [n, 2, 2] {
                images.extend(d.to_be_bytes());
            }
            images.extend((0..n * 4).map(|i| i as u8));
            if truncate {
                images.truncate(images.len() - 3);
            }
            let mut labels = vec![0, 0, 8, 1];
            labels.extend(n.to_be_bytes());
            labels.extend((0..n).map(|i| (i % 10) as u8));
            std::fs::write(
                dir.join(format!("{stem}-images-idx3-ubyte.gz")),
                gz(&images),
            )
            .unwrap();
            std::fs::write(
                dir.join(format!("{stem}-labels-idx1-ubyte.gz")),
                gz(&labels),
            )
            .unwrap();
        }
        dir
    }

    #[test]
    fn idx_partition_keeps_bytes_and_labels_together() {
        let dir = idx_dir("ok", 12, false);
        let data = fashion_mnist(&dir, 3, Partition { index: 1, count: 3 }, true).unwrap();
        assert_eq!(data.train.len(), 4);
        assert_eq!(data.test.as_ref().unwrap().len(), 12);
        let Features::U8(px) = &data.train.features else {
            panic!()
        };
        for (k, &label) in data.train.labels.iter().enumerate() {
            // Example i has pixels 4i..4i+3 and label i % 10.
            let i = px[k * 4] as usize / 4;
            assert_eq!(label as usize, i % 10);
        }
    }

    #[test]
    fn truncated_idx_is_a_clear_error() {
        let dir = idx_dir("trunc", 12, true);
        let err = fashion_mnist(&dir, 3, Partition { index: 0, count: 1 }, false).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(
            err.to_string().contains("train-images-idx3-ubyte.gz"),
            "{err}"
        );
    }

    #[test]
    fn csv_reads_label_column_by_name() {
        let path = std::env::temp_dir().join(format!("kubetrain-csv-{}.csv", std::process::id()));
        let mut text = String::from("a,kind,b\n");
        for i in 0..10 {
            text.push_str(&format!("{i}.5,{},{}\n", i % 3, -i));
        }
        std::fs::write(&path, text).unwrap();
        let data = csv_file(
            &path,
            "kind",
            1,
            0.2,
            Partition { index: 0, count: 1 },
            true,
        )
        .unwrap();
        assert_eq!((data.inputs, data.classes, data.train_total), (2, 3, 8));
        let err = csv_file(
            &path,
            "nope",
            1,
            0.2,
            Partition { index: 0, count: 1 },
            true,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("no column named \"nope\""),
            "{err}"
        );
    }
}
