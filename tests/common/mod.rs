//! Helpers shared by the backend tests (tests/jit.rs, tests/fusion.rs).
#![allow(dead_code)]

use cnnc::autodiff::{self, Program};
use cnnc::diagnostic::SourceFile;
use cnnc::rng::Rng;
use ndarray::ArrayD;

/// The program of `model` with a categorical cross-entropy loss.
pub fn program(model: &str) -> Program {
    program_with(model, "loss = categorical_crossentropy")
}

/// A model with its own train block entries.
pub fn program_with(model: &str, train: &str) -> Program {
    let text = format!("model m {{ {model} }}\ntrain {{ {train} }}");
    let source = SourceFile::new("case.cnn", text.as_str());
    let checked =
        cnnc::check(&source).unwrap_or_else(|d| panic!("{}", cnnc::diagnostic::render_all(&d, &source)));
    autodiff::build(&checked).unwrap()
}

/// `len` values uniform in [-1, 1).
pub fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
    (0..len).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
}

/// |expected − actual| ≤ tolerance·max(1, |expected|) everywhere.
pub fn assert_within(tolerance: f32, what: &str, expected: &ArrayD<f32>, actual: &ArrayD<f32>) {
    assert_eq!(expected.shape(), actual.shape(), "{what}");
    for (i, (x, y)) in expected.iter().zip(actual).enumerate() {
        assert!((x - y).abs() <= tolerance * x.abs().max(1.0), "{what}[{i}]: expected {x}, got {y}");
    }
}
