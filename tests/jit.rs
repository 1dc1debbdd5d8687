//! Differential tests: the Cranelift backend against the reference, on shapes that are not
//! multiples of the vector width, strides, `same` padding with even kernels, and batches that
//! do not split evenly over threads; then a whole training step on many random models.
//!
//! Tolerance: the two backends add the same products in different orders (blocked, fused
//! multiply-add), so results differ by float rounding only: |a − b| ≤ 1e-4·max(1, |a|) for
//! values whose sums run over at most a few thousand terms of magnitude ≤ 1.

use std::sync::Arc;

use cnnc::autodiff::Program;
use cnnc::backend::Backend as _;
use cnnc::backend::jit::{Jit, JitKernels, Listing};
use cnnc::backend::reference::ops::Geometry;
use cnnc::backend::reference::{self, Kernels as _, KernelsExt as _, Mode, Plain, Reference};
use cnnc::ir::{Activation, NodeId, Op};
use cnnc::rng::Rng;
use cnnc::train::state::State;
use ndarray::{Array2, ArrayD, IxDyn};

mod common;
use common::{assert_within, program, program_with, random};

const TOLERANCE: f32 = 1e-4;

fn assert_close(what: &str, a: &ArrayD<f32>, b: &ArrayD<f32>) {
    assert_within(TOLERANCE, what, a, b);
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

    // The interpreter runs each node's kernel once forward, and once backward where the
    // node's input needs a gradient (softmax has no backward kernel); then the loss's.
    let counted: Vec<NodeId> = program
        .inference
        .iter()
        .copied()
        .filter(|&id| id <= program.logits)
        .filter(|&id| {
            jit.sigmoidal(id).is_some()
                || jit.avgpool(id).is_some()
                || jit.dropout(id).is_some()
                || jit.softmax(id).is_some()
        })
        .collect();
    let backward = counted
        .iter()
        .filter(|&&id| {
            jit.softmax(id).is_none() && program.needs_grad[program.graph.node(id).inputs[0].index()]
        })
        .count();

    let expected = reference::forward(&program, &params, input.clone(), mode, program.logits);
    let runs = jit.runs();
    let actual = reference::forward_with(&jit, &program, &params, input.clone(), mode, program.logits);
    assert_eq!(jit.runs() - runs, counted.len(), "{model}: kernels run forward");
    for (id, _) in program.graph.nodes() {
        if let (Some(a), Some(b)) = (&expected.values[id.index()], &actual.values[id.index()]) {
            assert_close(&format!("{model}\nvalue of %{}", id.index()), a, b);
        }
    }
    let expected = reference::gradients(&program, &params, input.clone(), &labels, mode);
    let runs = jit.runs();
    let actual = reference::gradients_with(&jit, &program, &params, input, &labels, mode);
    let loss = usize::from(jit.fused_loss().is_some());
    assert_eq!(jit.runs() - runs, counted.len() + loss + backward, "{model}: kernels run in a step");
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
fn first_layers_with_one_input_channel() {
    // 9 rows of dw: weight-gradient tasks of 5 + 4 rows, split into 8 output channels each
    // (4 parts; 2 parts, the last of 4 channels), at a batch of 5
    for model in [
        "input 12x11x1 conv2d(32, kernel=3, activation=relu) maxpool(2) flatten dense(10, activation=softmax)",
        "input 9x9x1 conv2d(12, kernel=3) flatten dense(3, activation=softmax)",
    ] {
        differential(model, 5);
    }
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
fn winograd_for_wide_3x3_stride_1_layers() {
    // 16 -> 21 -> 24 channels: wide enough that the cost model picks Winograd (asserted);
    // 6x7 then 6x7 outputs (a last tile column of one pixel), valid and `same` padding
    let model = "input 8x9x16 conv2d(21, kernel=3) conv2d(24, kernel=3, padding=same, bias=false) \
                 flatten dense(3, activation=softmax)";
    let jit = JitKernels::compile(&program(model), Listing::default()).unwrap();
    for node in [1, 2] {
        let kernels = jit.winograd(NodeId::from_index(node)).expect("Winograd kernels");
        assert!(kernels.forward.is_some(), "conv %{node}'s forward pass runs Winograd");
        assert!(kernels.weight_gradient.is_some(), "conv %{node}'s weight gradient runs Winograd");
    }
    differential(model, 1);
    differential(model, 5);
}

#[test]
fn winograd_weight_gradient_by_4x4_tiles_of_dy() {
    // 11x11 outputs (as mnist.cnn's conv2d_1): 9 tiles of 4x4, the last row and column of
    // each 3 wide; an odd batch leaves the last group of samples partial
    let model = "input 13x13x32 conv2d(40, kernel=3, activation=relu) flatten dense(3, activation=softmax)";
    let jit = JitKernels::compile(&program(model), Listing::default()).unwrap();
    let kernels = jit.winograd(NodeId::from_index(1)).expect("Winograd kernels");
    assert_eq!(kernels.weight_gradient.map(|(shape, _)| shape.m), Some(4), "F(3x3, 4x4)");
    differential(model, 1);
    differential(model, 5);
}

/// Winograd's weight gradient runs the batch in pieces fixed by its size, added in order: the
/// same bits on 1 thread and 3, by 2x2 tiles of dy (6x7 outputs) and by 4x4 (11x11).
#[test]
fn winograd_gradients_do_not_depend_on_the_thread_count() {
    for (input, filters, batch) in [([8, 9, 16], 21, 7), ([13, 13, 32], 40, 5)] {
        let [h, w, c] = input;
        let model = format!(
            "input {h}x{w}x{c} conv2d({filters}, kernel=3, activation=relu) flatten dense(3, activation=softmax)"
        );
        let program = program(&model);
        let jit = JitKernels::compile(&program, Listing::default()).unwrap();
        assert!(jit.winograd(NodeId::from_index(1)).is_some_and(|k| k.weight_gradient.is_some()));
        let mut rng = Rng::new(23, &[]);
        let params: Vec<ArrayD<f32>> = program
            .params
            .iter()
            .map(|p| ArrayD::from_shape_vec(p.spec.shape.clone(), random(p.spec.numel(), &mut rng)).unwrap())
            .collect();
        let input = reference::batch_array(&program, &random(batch * h * w * c, &mut rng));
        let labels: Vec<u8> = (0..batch).map(|i| (i % 3) as u8).collect();
        common::assert_same_on_1_and_3_threads(&jit, &program, &params, &input, &labels);
    }
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

/// A whole training step (loss, every gradient, the updated weights) on random models: relu,
/// sigmoid and tanh convolutions, average pooling, dropout, both cross-entropies, and the three
/// optimizer rules.
#[test]
fn random_models_take_the_same_training_step() {
    use cnnc::ir::train::Optimizer;
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
            let activation = ["relu", "sigmoid", "tanh"][rng.below(3)];
            layers += &format!(
                "conv2d({filters}, kernel={k}, stride={stride}, padding={padding}, activation={activation}) "
            );
            (size_h, size_w) = if same {
                (size_h.div_ceil(stride), size_w.div_ceil(stride))
            } else {
                ((size_h - k) / stride + 1, (size_w - k) / stride + 1)
            };
            if rng.below(3) == 0 {
                layers += "avgpool(2, padding=same) ";
                (size_h, size_w) = (size_h.div_ceil(2), size_w.div_ceil(2));
            }
        }
        layers += "flatten ";
        if rng.below(2) == 0 {
            layers += "dropout(0.3) ";
        }
        let binary = case % 3 == 2;
        let (output, loss, classes) = if binary {
            ("dense(1, activation=sigmoid)", "binary_crossentropy", 2)
        } else {
            ("dense(3, activation=softmax)", "categorical_crossentropy", 3)
        };
        layers += &format!("dense({}, activation=tanh) {output}", 2 + rng.below(12));
        let program = Arc::new(program_with(&layers, &format!("loss = {loss}")));
        let optimizer = match rng.below(3) {
            0 => Optimizer::Adam { lr: 0.01, beta1: 0.9, beta2: 0.999, epsilon: 1e-7 },
            1 => Optimizer::Sgd { lr: 0.05, momentum: 0.9 },
            _ => Optimizer::Sgd { lr: 0.05, momentum: 0.0 },
        };
        let mut reference_state = State::init(&program, &optimizer, case);
        let mut jit_state = reference_state.clone();
        let batch = 1 + rng.below(9);
        let images = random(batch * h * w * c, &mut rng);
        let labels: Vec<u8> = (0..batch).map(|_| rng.below(classes) as u8).collect();
        let mut jit = Jit::new(program.clone(), optimizer).unwrap();
        assert!(jit.kernels.fused_loss().is_some() && jit.kernels.optimizer().is_some(), "{layers}");
        let a =
            Reference::new(program.clone(), optimizer).train_step(&mut reference_state, &images, &labels, 0);
        let b = jit.train_step(&mut jit_state, &images, &labels, 0);
        // the loss, then one optimizer step a parameter, at least
        assert!(jit.kernels.runs() > program.params.len(), "{layers}");
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
        for (p, (x, y)) in program.params.iter().zip(reference_state.slots.iter().zip(&jit_state.slots)) {
            for (x, y) in x.iter().zip(y) {
                assert_close(&format!("{layers}\noptimizer slot of {}", p.name), x, y);
            }
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

// -- the kernels that replaced the interpreter's element-wise, pooling, loss and optimizer ops,
// -- called through the `Kernels` seam at op level, so that no error hides downstream

fn node(i: usize) -> NodeId {
    NodeId::from_index(i)
}

/// `f()`, checking that it ran a compiled kernel: several kernels compute the reference's
/// bits, so a method that fell back to the reference would pass unnoticed.
fn compiled<T>(jit: &JitKernels, f: impl FnOnce() -> T) -> T {
    let before = jit.runs();
    let result = f();
    assert!(jit.runs() > before, "the op ran the reference's code, not its kernel");
    result
}

/// Values of `shape` uniform in ±`scale`.
fn random_array(shape: &[usize], scale: f32, rng: &mut Rng) -> ArrayD<f32> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || (rng.next_f32() * 2.0 - 1.0) * scale)
}

/// |a − b| ≤ rel·|a| + abs, element by element (NaN only against NaN).
fn assert_near(what: &str, expected: &ArrayD<f32>, actual: &ArrayD<f32>, rel: f32, abs: f32) {
    assert_eq!(expected.shape(), actual.shape(), "{what}");
    for (i, (x, y)) in expected.iter().zip(actual).enumerate() {
        let ok = (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= rel * x.abs() + abs;
        assert!(ok, "{what}[{i}]: reference {x}, jit {y}");
    }
}

/// The same bits (or both NaN): for kernels that do the reference's operations in its order.
fn assert_identical(what: &str, expected: &ArrayD<f32>, actual: &ArrayD<f32>) {
    assert_near(what, expected, actual, 0.0, 0.0);
}

fn geometry_of(program: &Program, id: NodeId) -> Geometry {
    let [h, w] = program.shapes.window(id).unwrap();
    let dims = program.shapes.shape(id).dims();
    Geometry {
        kernel: [h.kernel, w.kernel],
        stride: [h.stride, w.stride],
        pad_before: [h.pad_before, w.pad_before],
        out: [dims[0], dims[1]],
    }
}

fn batch_shape(program: &Program, id: NodeId, batch: usize) -> Vec<usize> {
    let mut shape = vec![batch];
    shape.extend(program.shapes.shape(id).dims());
    shape
}

/// Sigmoid and tanh: max relative error against f64 over every 2053rd f32 of [-100, 100],
/// exact limits at ±inf, NaN kept. Measured: sigmoid 1.66e-7, tanh 1.40e-7 (the reference's
/// own f32 sigmoid and tanh: 1.66e-7 and 1.49e-7), so the bound is 2.5e-7, about 2 ulp. Below
/// −87.3 sigmoid flushes to 0 where the true value is below 1.2e-38.
#[test]
fn sigmoid_and_tanh_are_within_a_few_ulp_of_f64() {
    let program = program("input 7x13x1 sigmoid tanh flatten dense(3, activation=softmax)");
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    let mut xs = Vec::new();
    let mut bits = 0u32;
    while f32::from_bits(bits) <= 100.0 {
        xs.extend([f32::from_bits(bits), -f32::from_bits(bits)]);
        bits += 2053;
    }
    xs.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.0]);
    let len = 7 * 13;
    xs.resize(xs.len().div_ceil(len) * len, 0.5);
    let x = ArrayD::from_shape_vec(IxDyn(&[xs.len() / len, 7, 13, 1]), xs.clone()).unwrap();
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    let cases = [(1, Activation::Sigmoid, sigmoid as fn(f64) -> f64), (2, Activation::Tanh, f64::tanh)];
    for (id, act, exact) in cases {
        assert!(jit.sigmoidal(node(id)).is_some(), "{act:?} was compiled");
        let y = compiled(&jit, || jit.activation_forward(node(id), act, x.view()));
        let y_ref = Plain.activation_forward(node(id), act, x.view());
        let (mut worst, mut worst_ref) = (0.0f64, 0.0f64);
        for ((&x, &y), &r) in xs.iter().zip(y.iter()).zip(y_ref.iter()) {
            let t = exact(f64::from(x));
            if x.is_nan() {
                assert!(y.is_nan(), "{act:?}({x}) = {y}");
            } else if t.abs() < 1.2e-38 {
                assert!(f64::from(y).abs() <= 1.2e-38, "{act:?}({x}) = {y}, not flushed");
            } else {
                worst = worst.max(((f64::from(y) - t) / t).abs());
                worst_ref = worst_ref.max(((f64::from(r) - t) / t).abs());
            }
        }
        eprintln!("{act:?}: max relative error {worst:.3e} (the reference's {worst_ref:.3e})");
        assert!(worst <= 2.5e-7, "{act:?}: max relative error {worst:e}");
    }
}

/// Sigmoid and tanh forward and backward against the reference's f32 functions, on a sample
/// size of 91 (22 vectors and 3 single elements) and batches of 1, 5 and 13. Forward: both are
/// within 2.5e-7 of the truth, so within 4e-7 of each other (plus the flush to zero below
/// 1.2e-38). The backward kernels do the reference's products in its order: identical bits.
#[test]
fn sigmoid_and_tanh_kernels_match_the_reference() {
    let program = program("input 7x13x1 sigmoid tanh flatten dense(3, activation=softmax)");
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    for batch in [1, 5, 13] {
        let mut rng = Rng::new(31, &[batch as u64]);
        for (id, act) in [(1, Activation::Sigmoid), (2, Activation::Tanh)] {
            assert!(jit.sigmoidal(node(id)).is_some());
            let x = random_array(&[batch, 7, 13, 1], 12.0, &mut rng);
            let dy = random_array(&[batch, 7, 13, 1], 1.0, &mut rng);
            let y_ref = Plain.activation_forward(node(id), act, x.view());
            let y_jit = compiled(&jit, || jit.activation_forward(node(id), act, x.view()));
            assert_near(&format!("{act:?} forward, batch {batch}"), &y_ref, &y_jit, 4e-7, 1.2e-38);
            let dx_ref = Plain.activation_backward(node(id), act, x.view(), y_ref.view(), dy.view());
            let dx_jit =
                compiled(&jit, || jit.activation_backward(node(id), act, x.view(), y_ref.view(), dy.view()));
            assert_identical(&format!("{act:?} backward, batch {batch}"), &dx_ref, &dx_jit);
        }
    }
}

/// Average pooling, forward and backward, with `same` and explicit padding (windows that hold
/// 1 to 9 real pixels), overlap and 13 channels (8 + 4 + 1): the kernels add the same values
/// in the same order and divide by the same count as the reference, so the bits agree.
#[test]
fn average_pooling_counts_only_real_pixels_as_the_reference() {
    let program = program(
        "input 7x9x13 avgpool(3, stride=2, padding=same) avgpool(2, stride=1, padding=1) \
         avgpool(2) flatten dense(3, activation=softmax)",
    );
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    for batch in [1, 5, 13] {
        let mut rng = Rng::new(41, &[batch as u64]);
        for id in (1..4).map(node) {
            assert!(jit.avgpool(id).is_some(), "node {id:?} was compiled");
            let input = program.graph.node(id).inputs[0];
            let g = geometry_of(&program, id);
            let x = random_array(&batch_shape(&program, input, batch), 1.0, &mut rng);
            let dy = random_array(&batch_shape(&program, id, batch), 1.0, &mut rng);
            let x4 = x.view().into_dimensionality().unwrap();
            let dy4 = dy.view().into_dimensionality().unwrap();
            let what = format!("avgpool {:?}, batch {batch}", id);
            let expected = Plain.avgpool_forward(id, x4, &g);
            let actual = compiled(&jit, || jit.avgpool_forward(id, x4, &g));
            assert_identical(&format!("{what} forward"), &expected.into_dyn(), &actual.into_dyn());
            let shape: [usize; 4] = x4.dim().into();
            let expected = Plain.avgpool_backward(id, shape, dy4, &g);
            let actual = compiled(&jit, || jit.avgpool_backward(id, shape, dy4, &g));
            assert_identical(&format!("{what} backward"), &expected.into_dyn(), &actual.into_dyn());
        }
    }
}

/// Softmax on its own: across the channels of every pixel (15 rows of 7 a sample) and over a
/// dense layer's 19 outputs (4 vectors and 3 single elements).
#[test]
fn softmax_kernel_matches_the_reference() {
    let program = program("input 5x3x7 softmax flatten dense(19) softmax dense(3, activation=softmax)");
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    for batch in [1, 5, 13] {
        let mut rng = Rng::new(43, &[batch as u64]);
        for (id, c) in [(1, 7), (4, 19), (6, 3)] {
            let id = node(id);
            assert!(matches!(program.graph.node(id).op, Op::Activation(Activation::Softmax)));
            assert!(jit.softmax(id).is_some());
            let x = random_array(&[batch * program.shapes.shape(id).numel() / c, c], 30.0, &mut rng);
            let x = x.into_dimensionality().unwrap();
            let expected = Plain.softmax_forward(id, x.view()).into_dyn();
            let actual = compiled(&jit, || jit.softmax_forward(id, x.view())).into_dyn();
            assert_near(&format!("softmax of {c}, batch {batch}"), &expected, &actual, 1e-6, 1e-38);
        }
    }
}

/// Logits in [-2, 2] with ties (the first maximum decides what was predicted): no one class
/// dominates, so the logarithm's argument spreads over [1, K].
fn logits(n: usize, k: usize, rng: &mut Rng) -> Array2<f32> {
    Array2::from_shape_simple_fn((n, k), || ((rng.next_f32() * 2.0 - 1.0) * 8.0).round() * 0.25)
}

fn check_loss(program: &Program, jit: &JitKernels, loss: cnnc::ir::train::Loss, k: usize, batch: usize) {
    let fused = jit.fused_loss().expect("the loss was compiled");
    assert_eq!((fused.loss, fused.k), (loss, k));
    let mut rng = Rng::new(47, &[batch as u64, k as u64]);
    let z = logits(batch, k, &mut rng);
    let classes = if k == 1 { 2 } else { k };
    let labels: Vec<u8> = (0..batch).map(|_| rng.below(classes) as u8).collect();
    let what = format!("{loss:?} of {k}, batch {batch}");
    let (loss_ref, correct_ref, dz_ref) = Plain.loss(program.logits, loss, z.view(), &labels);
    let (loss_jit, correct_jit, dz_jit) = compiled(jit, || jit.loss(program.logits, loss, z.view(), &labels));
    assert!((loss_ref - loss_jit).abs() <= 1e-6 * loss_ref.abs() + 1e-6, "{what}: {loss_ref} vs {loss_jit}");
    assert_eq!(correct_ref, correct_jit, "{what}: correct");
    assert_near(&format!("{what}: dz"), &dz_ref.into_dyn(), &dz_jit.into_dyn(), 1e-6, 1e-9);
}

/// Softmax + cross-entropy (categorical and sparse share the kernel) on 7 and 19 classes, and
/// sigmoid + binary cross-entropy (samples four at a time, then one at a time).
#[test]
fn fused_loss_kernels_match_the_reference() {
    use cnnc::ir::train::Loss;
    for k in [7, 19] {
        for loss in [Loss::CategoricalCrossentropy, Loss::SparseCategoricalCrossentropy] {
            let program = program_with(
                &format!("input 5 dense({k}, activation=softmax)"),
                &format!("loss = {}", loss.name()),
            );
            let jit = JitKernels::compile(&program, Listing::default()).unwrap();
            for batch in [1, 5, 13] {
                check_loss(&program, &jit, loss, k, batch);
            }
        }
    }
    let program = program_with("input 5 dense(1, activation=sigmoid)", "loss = binary_crossentropy");
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    for batch in [1, 5, 13] {
        check_loss(&program, &jit, Loss::BinaryCrossentropy, 1, batch);
    }
}

/// Dropout's mask applied forward and backward, on 91 elements a sample: the same products.
#[test]
fn dropout_kernel_applies_the_reference_mask() {
    let program = program("input 7x13x1 dropout(0.4) flatten dense(3, activation=softmax)");
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    let id = node(1);
    assert!(jit.dropout(id).is_some());
    for batch in [1, 5, 13] {
        let mut rng = Rng::new(53, &[batch as u64]);
        let x = random_array(&[batch, 7, 13, 1], 1.0, &mut rng);
        let mask = reference::dropout_mask::<f32>(x.raw_dim(), 0.4, 7, batch as u64, id);
        assert!(mask.iter().any(|&m| m == 0.0) && mask.iter().any(|&m| m != 0.0));
        let expected = Plain.dropout_apply(id, x.view(), mask.view());
        let actual = compiled(&jit, || jit.dropout_apply(id, x.view(), mask.view()));
        assert_identical(&format!("dropout, batch {batch}"), &expected, &actual);
        // The training forward kernel draws the same mask in place and applies it.
        let stream = reference::dropout_stream(7, batch as u64, id);
        let (drawn, y) = compiled(&jit, || jit.dropout_forward(id, x.view(), &stream, 0.4));
        assert_identical(&format!("dropout's mask, batch {batch}"), &mask, &drawn);
        assert_identical(&format!("dropout forward, batch {batch}"), &expected, &y);
    }
}

/// SGD, SGD with momentum and Adam, three steps on tensors of 91 and 13 elements: the kernel
/// does optimizer.rs's operations in its order, so weights and slots keep the same bits.
#[test]
fn optimizer_kernels_take_the_reference_step() {
    use cnnc::ir::train::Optimizer;
    use cnnc::train::state::optimizer_slots;
    let program = program("input 7 dense(13) dense(3, activation=softmax)");
    let optimizers = [
        Optimizer::Sgd { lr: 0.05, momentum: 0.0 },
        Optimizer::Sgd { lr: 0.05, momentum: 0.9 },
        Optimizer::Adam { lr: 0.01, beta1: 0.9, beta2: 0.999, epsilon: 1e-7 },
    ];
    for optimizer in optimizers {
        let jit = JitKernels::compile_with(&program, Listing::default(), Some(&optimizer)).unwrap();
        assert!(jit.optimizer().is_some());
        let mut rng = Rng::new(59, &[]);
        for shape in [vec![7, 13], vec![13]] {
            let mut w_ref = random_array(&shape, 1.0, &mut rng);
            let mut slots_ref = vec![ArrayD::zeros(w_ref.raw_dim()); optimizer_slots(&optimizer)];
            let (mut w_jit, mut slots_jit) = (w_ref.clone(), slots_ref.clone());
            for iteration in 1..=3 {
                let g = random_array(&shape, 2.0, &mut rng);
                let plain: &dyn cnnc::backend::reference::Kernels<f32> = &Plain;
                plain.optimizer_update(0, &optimizer, &mut w_ref, &g, &mut slots_ref, iteration);
                compiled(&jit, || {
                    jit.optimizer_update(0, &optimizer, &mut w_jit, &g, &mut slots_jit, iteration)
                });
                let what = format!("{optimizer:?} on {shape:?}, step {iteration}");
                assert_identical(&what, &w_ref, &w_jit);
                for (a, b) in slots_ref.iter().zip(&slots_jit) {
                    assert_identical(&format!("{what}, slot"), a, b);
                }
            }
        }
    }
}

/// The new kernels inside whole models, node by node and gradient by gradient, batches 1, 5, 13.
#[test]
fn sigmoid_tanh_average_pooling_and_dropout_in_whole_models() {
    let model = "input 9x7x5 conv2d(7, kernel=2, activation=tanh) avgpool(3, stride=2, padding=same) \
                 conv2d(13, kernel=2, activation=sigmoid) avgpool(2, padding=1) flatten dropout(0.4) \
                 dense(3, activation=softmax)";
    let program = program(model);
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    let kinds = program.graph.nodes().filter(|(id, _)| {
        jit.sigmoidal(*id).is_some() || jit.avgpool(*id).is_some() || jit.dropout(*id).is_some()
    });
    assert_eq!(kinds.count(), 5, "tanh, sigmoid, two average pools and dropout are compiled");
    for batch in [1, 5, 13] {
        differential(model, batch);
    }
}

/// Inference (`predict`) runs the output softmax's kernel, and the sigmoid's.
#[test]
fn prediction_runs_the_output_kernels() {
    for (model, loss) in [
        (
            "input 7x5x3 conv2d(4, kernel=2, activation=tanh) flatten dense(19, activation=softmax)",
            "categorical_crossentropy",
        ),
        ("input 7x5x3 conv2d(4, kernel=2) flatten dense(1, activation=sigmoid)", "binary_crossentropy"),
    ] {
        let program = Arc::new(program_with(model, &format!("loss = {loss}")));
        let optimizer = cnnc::ir::train::Optimizer::Sgd { lr: 0.1, momentum: 0.0 };
        let state = State::init(&program, &optimizer, 3);
        let images = random(5 * 7 * 5 * 3, &mut Rng::new(61, &[]));
        let mut jit = Jit::new(program.clone(), optimizer).unwrap();
        let expected = Reference::new(program.clone(), optimizer).predict(&state, &images);
        let runs = jit.kernels.runs();
        let actual = jit.predict(&state, &images);
        let output_kernels = program
            .inference
            .iter()
            .filter(|&&id| jit.kernels.softmax(id).is_some() || jit.kernels.sigmoidal(id).is_some());
        assert_eq!(jit.kernels.runs() - runs, output_kernels.count(), "{model}");
        assert!(jit.kernels.runs() > runs, "{model}");
        let shape = vec![expected.len()];
        let (expected, actual) = (
            ArrayD::from_shape_vec(shape.clone(), expected).unwrap(),
            ArrayD::from_shape_vec(shape, actual).unwrap(),
        );
        assert_close(model, &expected, &actual);
    }
}
