//! What one epoch of training measured, as logged, written to `metrics.jsonl` and plotted.

/// One epoch's results. Validation values are `None` when there is no validation split.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub seconds: f64,
    pub images_per_second: f64,
}
