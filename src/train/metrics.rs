//! What one epoch of training measured, as logged, written to `metrics.jsonl` and plotted.

use serde_json::{Value, json};

/// One epoch's results. Validation values are `None` when there is no validation split, test
/// values unless the run measures the test set after every epoch (`--test-every-epoch`).
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    /// The epoch's wall time: its training steps and the validation, not the test.
    pub seconds: f64,
    pub images_per_second: f64,
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
}

impl EpochRecord {
    /// The record as one line of `metrics.jsonl` (and of a checkpoint's history): the test
    /// values only where they were measured.
    pub fn to_json(&self) -> Value {
        let mut value = json!({
            "epoch": self.epoch,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
        });
        if let (Some(loss), Some(accuracy)) = (self.test_loss, self.test_accuracy) {
            value["test_loss"] = json!(loss);
            value["test_accuracy"] = json!(accuracy);
        }
        value
    }

    /// A record from [`EpochRecord::to_json`]'s form; missing numbers read as NaN (losses,
    /// accuracies), 0 (epoch, times) or absent (validation, test).
    pub fn from_json(r: &Value) -> Self {
        EpochRecord {
            epoch: r["epoch"].as_u64().unwrap_or(0) as usize,
            loss: r["loss"].as_f64().unwrap_or(f64::NAN),
            accuracy: r["accuracy"].as_f64().unwrap_or(f64::NAN),
            val_loss: r["val_loss"].as_f64(),
            val_accuracy: r["val_accuracy"].as_f64(),
            seconds: r["seconds"].as_f64().unwrap_or(0.0),
            images_per_second: r["images_per_second"].as_f64().unwrap_or(0.0),
            test_loss: r["test_loss"].as_f64(),
            test_accuracy: r["test_accuracy"].as_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_its_json_form() {
        let mut record = EpochRecord {
            epoch: 3,
            loss: 0.25,
            accuracy: 0.9,
            val_loss: Some(0.5),
            val_accuracy: None,
            seconds: 1.5,
            images_per_second: 400.0,
            test_loss: None,
            test_accuracy: None,
        };
        assert_eq!(EpochRecord::from_json(&record.to_json()), record);
        assert!(record.to_json().get("test_accuracy").is_none(), "no test values unless measured");
        (record.test_loss, record.test_accuracy) = (Some(0.1), Some(0.99));
        assert_eq!(EpochRecord::from_json(&record.to_json()), record);
        assert_eq!(record.to_json()["test_accuracy"], json!(0.99));
    }
}
