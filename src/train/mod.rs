//! Training: the epoch loop, optimizers, metrics, progress, checkpoints and plots.

pub mod checkpoint;
pub mod metrics;
pub mod optimizer;
pub mod plot;
pub mod state;
