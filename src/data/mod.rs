//! Datasets: the registry of what cnnc can train on.
//!
//! Architecture invariant: the registry is plain data; the compiler front end consults it to
//! check a model against its dataset, and must not read files through it.

pub mod fetch;
pub mod idx;

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
