//! Datasets: the registry of what cnnc can train on, and loading a dataset into memory.
//!
//! Architecture invariant: the registry is plain data; the compiler front end consults it to
//! check a model against its dataset, and must not read files through it. Loading (`load`) is
//! for the training driver: it checks the files against the registry entry and scales pixels,
//! and must not shuffle, batch or augment.

pub mod fetch;
pub mod idx;
pub mod image;

use std::path::Path;

pub use fetch::{DatasetFiles, locate};

/// What the compiler needs to know of a dataset to check a model against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetInfo {
    /// The name used in `data = …`.
    pub name: &'static str,
    /// One image: [height, width, channels].
    pub image_shape: [usize; 3],
    pub classes: usize,
    pub train_samples: usize,
    pub test_samples: usize,
}

pub const DATASETS: &[DatasetInfo] = &[
    DatasetInfo {
        name: "mnist",
        image_shape: [28, 28, 1],
        classes: 10,
        train_samples: 60_000,
        test_samples: 10_000,
    },
    DatasetInfo {
        name: "fashion_mnist",
        image_shape: [28, 28, 1],
        classes: 10,
        train_samples: 60_000,
        test_samples: 10_000,
    },
];

pub fn dataset(name: &str) -> Option<&'static DatasetInfo> {
    DATASETS.iter().find(|d| d.name == name)
}

pub fn dataset_names() -> Vec<&'static str> {
    DATASETS.iter().map(|d| d.name).collect()
}

/// One split of a dataset in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// `len` images, NHWC, pixels scaled to [0, 1].
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
    pub len: usize,
    /// One image: [height, width, channels].
    pub image_shape: [usize; 3],
}

/// A dataset in memory, with the registry entry it was checked against.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub info: &'static DatasetInfo,
    pub train: Split,
    pub test: Split,
}

/// Reads and checks a dataset's four files: image and label counts agree, images have the
/// registry's shape, labels are below its class count. Every error names the file at fault.
/// Sample counts may differ from the registry's, so that cut-down copies (the test fixtures)
/// load too.
pub fn load(info: &'static DatasetInfo, files: &DatasetFiles) -> anyhow::Result<Dataset> {
    let train = load_split(info, &files.train_images, &files.train_labels)?;
    let test = load_split(info, &files.test_images, &files.test_labels)?;
    Ok(Dataset { info, train, test })
}

fn load_split(info: &DatasetInfo, images_path: &Path, labels_path: &Path) -> anyhow::Result<Split> {
    let images = idx::read_images(images_path)?;
    let labels = idx::read_labels(labels_path)?;
    let [h, w, c] = info.image_shape;
    // IDX image files are grayscale: one byte a pixel.
    if [images.rows, images.cols, 1] != [h, w, c] {
        anyhow::bail!(
            "`{}` holds {}x{}x1 images, but {}'s are {h}x{w}x{c}",
            images_path.display(),
            images.rows,
            images.cols,
            info.name
        );
    }
    if images.count != labels.len() {
        anyhow::bail!(
            "`{}` holds {} images but `{}` holds {} labels; they must be the same samples",
            images_path.display(),
            images.count,
            labels_path.display(),
            labels.len()
        );
    }
    if let Some((i, label)) = labels.iter().enumerate().find(|&(_, &l)| usize::from(l) >= info.classes) {
        anyhow::bail!(
            "`{}`: label {label} of sample {i} is out of range; {} has {} classes (0 to {})",
            labels_path.display(),
            info.name,
            info.classes,
            info.classes.saturating_sub(1)
        );
    }
    let images = images.pixels.iter().map(|&p| f32::from(p) / 255.0).collect();
    Ok(Split { images, len: labels.len(), labels, image_shape: info.image_shape })
}

impl Split {
    /// Elements in one image.
    pub fn image_len(&self) -> usize {
        self.image_shape.iter().product()
    }

    /// The first `n` samples (all of them when there are fewer).
    pub fn take(&self, n: usize) -> Split {
        self.range(0, n.min(self.len))
    }

    /// Splits off the last `fraction` of the samples for validation, as Keras' `fit` does
    /// with `validation_split`: no shuffling, and the same split point. `None` when
    /// `fraction` is 0. Fails, as Keras does, when either side would be empty.
    pub fn split_off_validation(self, fraction: f32) -> anyhow::Result<(Split, Option<Split>)> {
        if fraction == 0.0 {
            return Ok((self, None));
        }
        let at = validation_split_at(self.len, fraction)?;
        let validation = self.range(at, self.len);
        Ok((self.range(0, at), Some(validation)))
    }

    fn range(&self, start: usize, end: usize) -> Split {
        let n = self.image_len();
        Split {
            images: self.images[start * n..end * n].to_vec(),
            labels: self.labels[start..end].to_vec(),
            len: end - start,
            image_shape: self.image_shape,
        }
    }
}

/// Keras' split point: `int(math.floor(len * (1.0 - validation_split)))`. Keras computes in
/// float64 from the number the user wrote; the f32 is widened through its shortest decimal
/// form so that 0.1 means 0.1 (widening its bits would give 0.100000001…, and 1000 samples
/// would split at 899 instead of Keras' 900).
pub fn validation_split_at(len: usize, fraction: f32) -> anyhow::Result<usize> {
    if !(0.0..1.0).contains(&fraction) {
        anyhow::bail!("validation_split must be at least 0 and less than 1, not {fraction}");
    }
    let fraction: f64 = fraction.to_string().parse().unwrap_or(f64::from(fraction));
    // len * (1 - fraction) lies in [0, len], so the cast neither wraps nor saturates.
    let at = (len as f64 * (1.0 - fraction)).floor() as usize;
    if at == 0 || at == len {
        anyhow::bail!(
            "the training data holds {len} samples, too few to split into training and validation \
             sets with validation_split = {fraction}; use more data or another validation_split"
        );
    }
    Ok(at)
}
