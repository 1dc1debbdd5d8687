//! Training: the epoch loop, optimizers, metrics, progress, checkpoints and plots.

pub mod checkpoint;
pub mod driver;
pub mod metrics;
pub mod optimizer;
pub mod plot;
pub mod state;
