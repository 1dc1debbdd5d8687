//! Backends execute a [`crate::autodiff::Program`]: the reference interpreter (the oracle) and,
//! later, the Cranelift JIT.
//!
//! Architecture invariant: a backend takes a compiled program and buffers; it knows nothing of
//! the syntax, the data files or the training loop.

pub mod arena;
pub mod jit;
pub mod reference;

use crate::train::state::State;

/// What one training step measured on its batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepResult {
    /// The sum over the batch of each sample's loss.
    pub loss_sum: f64,
    /// How many samples were classified correctly.
    pub correct: usize,
}

/// A way to run a program: one training step at a time, or inference.
pub trait Backend {
    fn name(&self) -> &'static str;

    /// What was compiled for this model, and how long it took, for the log.
    fn compile_report(&self) -> Option<String> {
        None
    }

    /// The memory plan of `pass` for batches of `batch`, for the log.
    fn memory_plan(&self, _pass: crate::memory::Pass, _batch: usize) -> Option<crate::memory::Plan> {
        None
    }

    /// Forward, loss, backward and optimizer update on one batch (images NHWC, flat).
    /// `step` is the global step number: it seeds dropout masks, so that a run is reproducible
    /// and a resumed run continues exactly.
    fn train_step(&mut self, state: &mut State, images: &[f32], labels: &[u8], step: u64) -> StepResult;

    /// The model's output (probabilities) for a batch, in inference mode: batchnorm uses its
    /// moving statistics, dropout is the identity. Returns `n × outputs` values.
    fn predict(&mut self, state: &State, images: &[f32]) -> Vec<f32>;
}
