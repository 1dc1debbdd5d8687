//! Differential tests: the Cranelift backend against the reference, on shapes that are not
//! multiples of the vector width, strides, `same` padding with even kernels, and batches that
//! do not split evenly over threads; then a whole training step on many random models.
//!
//! Tolerance: the two backends add the same products in different orders (blocked, fused
//! multiply-add), so results differ by float rounding only: |a − b| ≤ 1e-4·max(1, |a|) for
//! values whose sums run over at most a few thousand terms of magnitude ≤ 1.

use std::sync::Arc;

use cnnc::autodiff::{self, Program};
use cnnc::backend::Backend as _;
use cnnc::backend::jit::{Jit, JitKernels, Listing};
use cnnc::backend::reference::{self, Mode, Reference};
use cnnc::diagnostic::SourceFile;
use cnnc::rng::Rng;
use cnnc::train::state::State;
use ndarray::ArrayD;

const TOLERANCE: f32 = 1e-4;

fn program(model: &str) -> Program {
    let text = format!("model m {{ {model} }}\ntrain {{ loss = categorical_crossentropy }}");
    let source = SourceFile::new("case.cnn", text.as_str());
    let checked =
        cnnc::check(&source).unwrap_or_else(|d| panic!("{}", cnnc::diagnostic::render_all(&d, &source)));
    autodiff::build(&checked).unwrap()
}

fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
    (0..len).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
}

fn assert_close(what: &str, a: &ArrayD<f32>, b: &ArrayD<f32>) {
    assert_eq!(a.shape(), b.shape(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= TOLERANCE * x.abs().max(1.0), "{what}[{i}]: reference {x}, jit {y}");
    }
}

/// Every node's forward value and every parameter's gradient agree.
fn differential(model: &str, batch: usize) {
    let program = program(model);
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    assert!(jit.kernel_count() > 0, "{model}: nothing was compiled");
    let mut rng = Rng::new(17, &[batch as u64]);
    let params: Vec<ArrayD<f32>> = program
        .params
        .iter()
        .map(|p| ArrayD::from_shape_vec(p.spec.shape.clone(), random(p.spec.numel(), &mut rng)).unwrap())
        .collect();
    let sample = program.shapes.shape(program.graph.input()).numel();
    let input = reference::batch_array(&program, &random(batch * sample, &mut rng));
    let labels: Vec<u8> = (0..batch).map(|i| (i % 3) as u8).collect();
    let mode = Mode::Train { seed: 1, step: 1 };

    let expected = reference::forward(&program, &params, input.clone(), mode, program.logits);
    let actual = reference::forward_with(&jit, &program, &params, input.clone(), mode, program.logits);
    for (id, _) in program.graph.nodes() {
        if let (Some(a), Some(b)) = (&expected.values[id.index()], &actual.values[id.index()]) {
            assert_close(&format!("{model}\nvalue of %{}", id.index()), a, b);
        }
    }
    let expected = reference::gradients(&program, &params, input.clone(), &labels, mode);
    let actual = reference::gradients_with(&jit, &program, &params, input, &labels, mode);
    assert!((expected.loss_sum - actual.loss_sum).abs() < 1e-3 * expected.loss_sum.abs().max(1.0));
    for (p, (a, b)) in program.params.iter().zip(expected.grads.iter().zip(&actual.grads)) {
        match (a, b) {
            (Some(a), Some(b)) => assert_close(&format!("{model}\ngradient of {}", p.name), a, b),
            (None, None) => {}
            _ => panic!("{}: one backend has a gradient, the other not", p.name),
        }
    }
}

#[test]
fn conv2d_odd_channels_and_pixels() {
    // 7 output channels: one vector chunk, three scalar; 5 input channels; 7 pixels a row
    differential("input 9x9x5 conv2d(7, kernel=3) flatten dense(3, activation=softmax)", 3);
}

#[test]
fn conv2d_wide_chunks_and_tails() {
    // 19 = 8 + 8 + 3 output channels; 13 = 3 groups of 4 + 1 input channels
    differential(
        "input 8x7x13 conv2d(19, kernel=2) conv2d(6, kernel=3, bias=false) flatten dense(3, activation=softmax)",
        5,
    );
}

#[test]
fn conv2d_stride_2_and_same_padding_with_even_kernels() {
    differential(
        "input 11x10x3 conv2d(9, kernel=4, stride=2, padding=same) conv2d(5, kernel=2x3, stride=2x1, padding=same) \
         flatten dense(3, activation=softmax)",
        4,
    );
}

#[test]
fn conv2d_explicit_padding_and_rectangular_kernels() {
    differential(
        "input 6x9x2 conv2d(4, kernel=3x1, padding=2x1) conv2d(12, kernel=1x3, stride=3) flatten dense(3, activation=softmax)",
        3,
    );
}

#[test]
fn dense_layers_of_awkward_widths() {
    differential("input 37 dense(21) dense(9, activation=relu) dense(3, activation=softmax)", 7);
}

#[test]
fn a_batch_that_does_not_split_evenly_and_a_batch_of_one() {
    let model = "input 12x12x1 conv2d(8, kernel=3, activation=relu) maxpool(2) conv2d(16, kernel=3) flatten dense(3, activation=softmax)";
    differential(model, 1);
    differential(model, 5);
    differential(model, 13);
}

#[test]
fn batchnorm_pooling_and_dropout_around_compiled_kernels() {
    differential(
        "input 10x10x3 conv2d(6, kernel=3, padding=same, bias=false) batchnorm relu maxpool(2) \
         conv2d(10, kernel=2) avgpool(2) flatten dropout(0.3) dense(3, activation=softmax)",
        6,
    );
}

/// A whole training step (loss, every gradient, the updated weights) on random models.
#[test]
fn random_models_take_the_same_training_step() {
    let mut rng = Rng::new(2024, &[]);
    for case in 0..25 {
        let h = 6 + rng.below(10);
        let w = 6 + rng.below(10);
        let c = 1 + rng.below(5);
        let mut layers = format!("input {h}x{w}x{c} ");
        let (mut size_h, mut size_w) = (h, w);
        for _ in 0..1 + rng.below(3) {
            let filters = 1 + rng.below(20);
            let k = 1 + rng.below(4);
            let stride = 1 + rng.below(2);
            let same = rng.below(2) == 0;
            if !same && (size_h < k || size_w < k) {
                break;
            }
            let padding = if same { "same" } else { "valid" };
            layers += &format!(
                "conv2d({filters}, kernel={k}, stride={stride}, padding={padding}, activation=relu) "
            );
            (size_h, size_w) = if same {
                (size_h.div_ceil(stride), size_w.div_ceil(stride))
            } else {
                ((size_h - k) / stride + 1, (size_w - k) / stride + 1)
            };
        }
        layers +=
            &format!("flatten dense({}, activation=tanh) dense(3, activation=softmax)", 2 + rng.below(12));
        let program = Arc::new(program(&layers));
        let optimizer =
            cnnc::ir::train::Optimizer::Adam { lr: 0.01, beta1: 0.9, beta2: 0.999, epsilon: 1e-7 };
        let mut reference_state = State::init(&program, &optimizer, case);
        let mut jit_state = reference_state.clone();
        let batch = 1 + rng.below(9);
        let images = random(batch * h * w * c, &mut rng);
        let labels: Vec<u8> = (0..batch).map(|_| rng.below(3) as u8).collect();
        let a =
            Reference::new(program.clone(), optimizer).train_step(&mut reference_state, &images, &labels, 0);
        let b = Jit::new(program.clone(), optimizer).unwrap().train_step(&mut jit_state, &images, &labels, 0);
        assert!(
            (a.loss_sum - b.loss_sum).abs() < 1e-3 * a.loss_sum.max(1.0),
            "{layers}: loss {} vs {}",
            a.loss_sum,
            b.loss_sum
        );
        assert_eq!(a.correct, b.correct, "{layers}");
        for (p, (x, y)) in program.params.iter().zip(reference_state.params.iter().zip(&jit_state.params)) {
            assert_close(&format!("{layers}\nupdated {}", p.name), x, y);
        }
    }
}

#[test]
fn kernels_are_compiled_with_fused_multiply_add() {
    let program = program("input 6x6x4 conv2d(8, kernel=3) flatten dense(3, activation=softmax)");
    let jit = JitKernels::compile(&program, Listing { clif: false, asm: true }).unwrap();
    let (name, asm) = jit.listings.iter().find(|(n, _)| n == "conv2d_forward").expect("the conv's listing");
    assert!(asm.contains("vfmadd"), "{name} has no fused multiply-add:\n{asm}");
    assert!(!asm.contains("fmaf"), "{name} calls fmaf instead of using the instruction");
}

#[test]
fn dense_layers_too_large_for_cache_use_the_matrix_product() {
    // 1100 x 1000 weights: above the compiled kernel's limit of 2^20, so the layer falls back
    // to ndarray's cache-blocked product; the small one after it is compiled.
    let program = program("input 1100 dense(1000) dense(3, activation=softmax)");
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    let dense = |i: usize| cnnc::ir::NodeId::from_index(i);
    assert!(jit.conv(dense(1)).is_none());
    assert!(jit.conv(dense(2)).is_some());
    differential("input 1100 dense(1000) dense(3, activation=softmax)", 2);
}

#[test]
fn max_pooling_with_padding_overlap_and_ties() {
    // relu before the pools makes many exact zeros: ties, where the gradient must go to the
    // first maximum of each window, as the reference sends it
    differential(
        "input 9x10x3 conv2d(7, kernel=2, activation=relu) maxpool(3, stride=1) \
         maxpool(2, stride=2, padding=same) conv2d(11, kernel=1, activation=relu) maxpool(2, padding=1) \
         flatten dense(3, activation=softmax)",
        4,
    );
}

/// The pooling gradient alone, on inputs full of ties (only 0 and 1): each window's gradient
/// must reach its first maximum only, as in the reference.
#[test]
fn max_pooling_gradient_goes_to_the_first_of_tied_maxima() {
    use cnnc::backend::reference::ops::Geometry;
    use cnnc::backend::reference::{Kernels as _, Plain};
    use ndarray::Array4;
    let program =
        program("input 7x8x5 maxpool(3, stride=2, padding=same) flatten dense(3, activation=softmax)");
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    let pool = cnnc::ir::NodeId::from_index(1);
    assert!(jit.pool(pool).is_some());
    let [wh, ww] = program.shapes.window(pool).unwrap();
    let g =
        Geometry { kernel: [3, 3], stride: [2, 2], pad_before: [wh.pad_before, ww.pad_before], out: [4, 4] };
    let mut rng = Rng::new(9, &[]);
    let x = Array4::from_shape_simple_fn((3, 7, 8, 5), || if rng.next_f32() < 0.5 { 0.0f32 } else { 1.0 });
    let dy = Array4::from_shape_simple_fn((3, 4, 4, 5), || rng.next_f32());
    let expected = Plain.maxpool_backward(pool, x.view(), dy.view(), &g);
    let actual = jit.maxpool_backward(pool, x.view(), dy.view(), &g);
    assert_close("maxpool input gradient", &expected.into_dyn(), &actual.into_dyn());
    let expected = Plain.maxpool_forward(pool, x.view(), &g);
    let actual = jit.maxpool_forward(pool, x.view(), &g);
    assert_close("maxpool output", &expected.into_dyn(), &actual.into_dyn());
}

#[test]
fn relu_and_leaky_relu_of_odd_sizes() {
    // 5x5x3 = 75 elements a sample: 18 vectors and 3 single elements
    differential(
        "input 7x7x2 conv2d(3, kernel=3, activation=relu) leaky_relu(alpha=0.1) conv2d(5, kernel=2, activation=leaky_relu) \
         flatten dense(9) relu dense(3, activation=softmax)",
        3,
    );
}
