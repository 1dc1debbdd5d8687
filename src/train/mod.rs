//! Training: the epoch loop, optimizers, metrics, progress, checkpoints and plots.

pub mod checkpoint;
pub mod metrics;
pub mod plot;
