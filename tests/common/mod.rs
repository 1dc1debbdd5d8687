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

/// A training step's loss, gradients and new moving statistics on 1 thread and on 3: the same
/// bits, since every sum runs in a fixed order.
pub fn assert_same_on_1_and_3_threads(
    kernels: &cnnc::backend::jit::JitKernels,
    program: &Program,
    params: &[ArrayD<f32>],
    input: &ArrayD<f32>,
    labels: &[u8],
) {
    use cnnc::backend::reference::{self, Mode};
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mode = Mode::Train { seed: 1, step: 0 };
        pool.install(|| reference::gradients_with(kernels, program, params, input.clone(), labels, mode))
    };
    let (one, three) = (run(1), run(3));
    assert_eq!(one.loss_sum.to_bits(), three.loss_sum.to_bits());
    for (a, b) in one.grads.iter().zip(&three.grads) {
        assert_eq!(a, b);
    }
    for ((_, a), (_, b)) in one.moving.iter().zip(&three.moving) {
        assert_eq!(a, b);
    }
}
