//! The fusion pass: fused blocks (conv/dense + batchnorm + relu run by the JIT's fused kernels)
//! against the same model unfused, run by the reference and by the JIT's separate kernels —
//! training (values, loss, every gradient, the moving statistics) and inference (batchnorm
//! folded into the weights), on channel counts that are not multiples of 4.
//!
//! Tolerance: |a − b| ≤ 1e-3·max(1, |a|). The fused batchnorm takes its variance as
//! E[x²] − E[x]² from per-sample f32 sums (the reference: two passes), and its inference
//! folds the normalization into the weights, so results differ by rounding that the division
//! by σ can magnify: about 1e-6·(1 + mean²/var) relative in the variance, for the values
//! here (|x| ≲ 5, mean²/var ≲ 10) far below 1e-3. Everything without batchnorm agrees to 1e-4
//! (tests/jit.rs).

use cnnc::autodiff::Program;
use cnnc::backend::jit::{JitKernels, Listing};
use cnnc::backend::reference::{self, Gradients, Mode};
use cnnc::ir::NodeId;
use cnnc::memory::{Buffer, Pass};
use cnnc::rng::Rng;
use ndarray::ArrayD;

mod common;
use common::{assert_within, program, random};

const TOLERANCE: f32 = 1e-3;

fn assert_close(what: &str, a: &ArrayD<f32>, b: &ArrayD<f32>) {
    assert_within(TOLERANCE, what, a, b);
}

/// Random parameters; variances (moving_variance) positive, as training keeps them.
fn parameters(program: &Program, rng: &mut Rng) -> Vec<ArrayD<f32>> {
    program
        .params
        .iter()
        .map(|p| {
            let mut values = random(p.spec.numel(), rng);
            if p.name.ends_with("moving_variance") {
                values.iter_mut().for_each(|v| *v = v.abs() + 0.5);
            }
            ArrayD::from_shape_vec(p.spec.shape.clone(), values).unwrap()
        })
        .collect()
}

fn assert_same_gradients(what: &str, program: &Program, a: &Gradients<f32>, b: &Gradients<f32>) {
    let tolerance = 1e-3 * a.loss_sum.abs().max(1.0);
    assert!((a.loss_sum - b.loss_sum).abs() < tolerance, "{what}: loss {} vs {}", a.loss_sum, b.loss_sum);
    for (p, (x, y)) in program.params.iter().zip(a.grads.iter().zip(&b.grads)) {
        match (x, y) {
            (Some(x), Some(y)) => assert_close(&format!("{what}\ngradient of {}", p.name), x, y),
            (None, None) => {}
            _ => panic!("{what}: {}: one has a gradient, the other not", p.name),
        }
    }
    assert_eq!(a.moving.len(), b.moving.len(), "{what}: moving statistics");
    for ((i, x), (j, y)) in a.moving.iter().zip(&b.moving) {
        assert_eq!(i, j);
        assert_close(&format!("{what}\nnew {}", program.params[*i].name), x, y);
    }
}

/// The fused program on the JIT against the unfused one on the reference and on the JIT.
fn fused_matches_unfused(model: &str, batch: usize, blocks: usize) {
    let unfused = program(model);
    let fused = program(model).fused();
    assert_eq!(fused.blocks.len(), blocks, "{model}: blocks {:?}", fused.blocks);
    let jit_fused = JitKernels::compile(&fused, Listing::default()).unwrap();
    let jit_unfused = JitKernels::compile(&unfused, Listing::default()).unwrap();
    for block in &fused.blocks {
        let kernels = jit_fused.block(block.output());
        assert!(kernels.is_some(), "{model}: block {block:?} has no fused kernels");
        assert_eq!(kernels.unwrap().pooled.is_some(), block.pool.is_some(), "{model}: {block:?}");
    }
    let mut rng = Rng::new(5, &[batch as u64]);
    let params = parameters(&unfused, &mut rng);
    let sample = unfused.shapes.shape(unfused.graph.input()).numel();
    let input = reference::batch_array(&unfused, &random(batch * sample, &mut rng));
    let labels: Vec<u8> = (0..batch).map(|i| (i % 3) as u8).collect();

    let train = Mode::Train { seed: 3, step: 7 };
    let expected = reference::gradients(&unfused, &params, input.clone(), &labels, train);
    let actual = reference::gradients_with(&jit_fused, &fused, &params, input.clone(), &labels, train);
    assert_same_gradients(&format!("{model} (fused vs reference)"), &unfused, &expected, &actual);
    let separate = reference::gradients_with(&jit_unfused, &unfused, &params, input.clone(), &labels, train);
    assert_same_gradients(&format!("{model} (fused vs unfused JIT)"), &unfused, &separate, &actual);

    for mode in [train, Mode::Infer] {
        let last = if mode == Mode::Infer { unfused.output } else { unfused.logits };
        let expected = reference::forward(&unfused, &params, input.clone(), mode, last);
        let actual = reference::forward_with(&jit_fused, &fused, &params, input.clone(), mode, last);
        let mut compared = 0;
        for (id, _) in unfused.graph.nodes() {
            if let (Some(a), Some(b)) = (&expected.values[id.index()], &actual.values[id.index()]) {
                assert_close(&format!("{model} ({mode:?})\nvalue of %{}", id.index()), a, b);
                compared += 1;
            }
        }
        // inner block values are not kept; at inference, flatten and dropout take their input
        let bound = unfused.graph.len().saturating_sub(3 * blocks + 2);
        assert!(compared >= bound, "{model}: only {compared} values compared");
        assert!(actual.values[last.index()].is_some(), "{model}: the last value was compared");
    }
}

#[test]
fn conv_batchnorm_relu_blocks_with_odd_channels() {
    // 7 = 4 + 3 and 19 = 8 + 8 + 3 channels: every chunk width of the kernels; the first block's
    // input needs no gradient, the second's does.
    let model = "input 9x8x3 conv2d(7, kernel=3, bias=false) batchnorm relu \
                 conv2d(19, kernel=2, stride=2, padding=same) batchnorm relu flatten dense(3, activation=softmax)";
    fused_matches_unfused(model, 1, 2);
    fused_matches_unfused(model, 5, 2);
    fused_matches_unfused(model, 13, 2);
}

#[test]
fn blocks_whose_input_needs_no_gradient_sum_their_weight_gradient_without_dc() {
    // conv::normalized_weight_sums: a bias, a stride, padding and a leaky relu with 6 = 4 + 1 + 1
    // channels (one input channel, which the kernel spreads: 9 rows of dw, in 2 groups); no
    // rectifier, three input channels (12 rows, in 3 groups); and a pool after the block, with a
    // batch whose samples split unevenly over the threads.
    let models = [
        "input 10x9x1 conv2d(6, kernel=3, stride=2, padding=same) batchnorm leaky_relu(alpha=0.1) \
         flatten dense(3, activation=softmax)",
        "input 7x8x3 conv2d(5, kernel=2) batchnorm flatten dense(3, activation=softmax)",
        "input 11x10x1 conv2d(9, kernel=3, bias=false) batchnorm relu maxpool(2) flatten dense(3, activation=softmax)",
    ];
    for model in models {
        let fused = program(model).fused();
        let jit = JitKernels::compile(&fused, Listing::default()).unwrap();
        let kernels = jit.block(fused.blocks[0].output()).unwrap();
        assert!(kernels.weight_sums.is_some(), "{model}: the sums kernel was compiled");
        for batch in [1, 7] {
            fused_matches_unfused(model, batch, 1);
        }
    }
    // only where nothing upstream needs the block's input gradient (not the second block), and
    // dw has few rows (not 3x3 over three channels: 27 rows, where the three passes are faster)
    for (model, expected) in [
        (
            "input 9x8x1 conv2d(7, kernel=3, bias=false) batchnorm relu \
             conv2d(5, kernel=1, bias=false) batchnorm relu flatten dense(3, activation=softmax)",
            [true, false],
        ),
        (
            "input 9x8x3 conv2d(7, kernel=3, bias=false) batchnorm relu \
             conv2d(5, kernel=1, bias=false) batchnorm relu flatten dense(3, activation=softmax)",
            [false, false],
        ),
    ] {
        let fused = program(model).fused();
        let jit = JitKernels::compile(&fused, Listing::default()).unwrap();
        let sums: Vec<bool> =
            fused.blocks.iter().map(|b| jit.block(b.output()).unwrap().weight_sums.is_some()).collect();
        assert_eq!(sums, expected, "{model}");
    }
}

#[test]
fn blocks_without_batchnorm_and_with_leaky_relu_or_bias() {
    let model = "input 7x7x2 conv2d(5, kernel=3, activation=relu) conv2d(6, kernel=2) batchnorm leaky_relu(alpha=0.2) \
                 conv2d(9, kernel=1) batchnorm flatten dense(11, activation=relu) dense(3, activation=softmax)";
    fused_matches_unfused(model, 6, 4);
}

#[test]
fn dense_batchnorm_blocks() {
    let model =
        "input 23 dense(13, bias=false) batchnorm relu dense(6) batchnorm dense(3, activation=softmax)";
    fused_matches_unfused(model, 7, 2);
}

#[test]
fn a_block_after_pooling_and_before_dropout() {
    let model = "input 12x11x1 maxpool(2) conv2d(10, kernel=3, padding=same, bias=false) batchnorm relu \
                 maxpool(2) flatten dropout(0.4) dense(3, activation=softmax)";
    fused_matches_unfused(model, 4, 1);
}

#[test]
fn pools_fused_at_inference_with_floors_strides_and_overlap() {
    // 19x19 → maxpool(2): the floor drops the last row and column, which the pooled block
    // does not compute; maxpool(3, stride=2) overlaps (and drops one row); 2x3 windows with
    // stride 1x2
    let model = "input 21x21x3 conv2d(9, kernel=3, bias=false) batchnorm relu maxpool(2) \
                 conv2d(13, kernel=2, activation=relu) maxpool(3, stride=2) \
                 conv2d(5, kernel=1) batchnorm maxpool(2x3, stride=1x2) flatten dense(3, activation=softmax)";
    fused_matches_unfused(model, 3, 3);
    fused_matches_unfused(model, 8, 3);
}

#[test]
fn convolutions_and_max_pools_in_one_kernel_at_inference() {
    // windows that tile what they read: 14x15 → maxpool(2) drops a column, 7 windows a row
    // (blocks of 2, 2, 2, 1), 13 = 8 + 4 + 1 channels; then 3x3 windows (one a block) after a
    // leaky relu (α ≥ 0 commutes with the max), 6 = 4 + 1 + 1 channels; then batchnorm folded in
    let model = "input 16x17x1 conv2d(13, kernel=3, activation=relu) maxpool(2) \
                 conv2d(6, kernel=2) leaky_relu(alpha=0.2) maxpool(3) \
                 conv2d(5, kernel=1, bias=false) batchnorm relu maxpool(2) flatten dense(3, activation=softmax)";
    let fused = program(model).fused();
    let jit = JitKernels::compile(&fused, Listing::default()).unwrap();
    let pooled: Vec<bool> = fused
        .blocks
        .iter()
        .filter(|b| b.pool.is_some())
        .map(|b| jit.block(b.output()).and_then(|k| k.pooled).is_some_and(|(shape, _)| shape.fused))
        .collect();
    assert_eq!(pooled, [true, true, true], "{model}: each block's pool in its convolution's kernel");
    fused_matches_unfused(model, 1, fused.blocks.len());
    fused_matches_unfused(model, 5, fused.blocks.len());

    // 48 = 6 chunks of 8 output channels, 2x2 windows in blocks of 2 (6 a row); then 16 without
    // a bias, 3x3 windows after a leaky relu
    let model = "input 12x15x2 conv2d(48, kernel=3, activation=relu) maxpool(2) \
                 conv2d(16, kernel=2, bias=false) leaky_relu(alpha=0.2) maxpool(3) flatten dense(3, activation=softmax)";
    let fused = program(model).fused();
    let jit = JitKernels::compile(&fused, Listing::default()).unwrap();
    let pooled: Vec<bool> = fused
        .blocks
        .iter()
        .map(|b| jit.block(b.output()).and_then(|k| k.pooled).is_some_and(|(shape, _)| shape.fused))
        .collect();
    assert_eq!(pooled, [true, true], "{model}: each block's pool in its convolution's kernel");
    fused_matches_unfused(model, 3, fused.blocks.len());

    // overlapping windows (and the 19x19 → 9x9 floor) keep the pool a pass of its own
    let model = "input 21x21x3 conv2d(9, kernel=3, activation=relu) maxpool(3, stride=2) flatten dense(3, activation=softmax)";
    let fused = program(model).fused();
    let jit = JitKernels::compile(&fused, Listing::default()).unwrap();
    let kernels = jit.block(fused.blocks[0].output()).and_then(|k| k.pooled).expect("a pooled block");
    assert!(!kernels.0.fused, "{model}: overlapping windows");
    fused_matches_unfused(model, 2, 1);
}

#[test]
fn winograd_blocks_with_batchnorm_relu_and_pools() {
    // 16 -> 24 at 9x9 (odd: a last tile row and column of one pixel) with batchnorm, then
    // 24 -> 20 with relu; both pooled at inference, on Winograd's kernels (asserted)
    let model = "input 9x9x16 conv2d(24, kernel=3, padding=same) batchnorm relu maxpool(2) \
                 conv2d(20, kernel=3, activation=relu) maxpool(2) flatten dense(3, activation=softmax)";
    let fused = program(model).fused();
    let jit = JitKernels::compile(&fused, Listing::default()).unwrap();
    for block in &fused.blocks {
        let kernels = jit.block_winograd(block.output()).expect("a Winograd block");
        assert!(kernels.pooled.is_some(), "{block:?}: the pooled inference kernel too");
        // the pooled kernel serves inference: no unpooled one is compiled
        assert!(kernels.infer.is_none(), "{block:?}");
    }
    fused_matches_unfused(model, 3, 2);
    fused_matches_unfused(model, 6, 2);

    // 11x11 outputs of which a 2x2 pool reads 10x10 (as mnist.cnn's conv2d_1): the pooled
    // inference kernel by 5x5 tiles, with batchnorm folded in and with a relu only; 40 output
    // channels, 32 input channels (the error grows with them: F(5x5) rounds ~3x F(4x4))
    for model in [
        "input 13x13x32 conv2d(40, kernel=3, bias=false) batchnorm relu maxpool(2) flatten dense(3, activation=softmax)",
        "input 13x13x32 conv2d(40, kernel=3, activation=relu) maxpool(2) flatten dense(3, activation=softmax)",
    ] {
        let fused = program(model).fused();
        let jit = JitKernels::compile(&fused, Listing::default()).unwrap();
        let kernels = jit.block_winograd(fused.blocks[0].output()).expect("a Winograd block");
        assert_eq!(kernels.pooled.map(|(shape, _)| shape.m), Some(5), "{model}: F(5x5) at inference");
        fused_matches_unfused(model, 3, 1);
    }

    // without a pool, a batchnorm block runs its folded inference kernel (F(4x4) here: 11x11)
    let model = "input 13x13x32 conv2d(64, kernel=3, bias=false) batchnorm relu \
                 conv2d(20, kernel=3) batchnorm flatten dense(3, activation=softmax)";
    let fused = program(model).fused();
    let jit = JitKernels::compile(&fused, Listing::default()).unwrap();
    let first = jit.block_winograd(fused.blocks[0].output()).expect("a Winograd block");
    assert!(first.infer.is_some_and(|(shape, _)| shape.m == 4), "the folded F(4x4) inference kernel");
    for block in &fused.blocks {
        let kernels = jit.block_winograd(block.output()).expect("a Winograd block");
        assert!(kernels.infer.is_some() && kernels.pooled.is_none(), "{block:?}");
    }
    fused_matches_unfused(model, 3, 2);
}

/// The JIT's separate batchnorm kernels (outside any block), against the reference op by op.
#[test]
fn unfused_batchnorm_kernels_match_the_reference() {
    use cnnc::backend::reference::{KernelsExt as _, Plain};
    use ndarray::{Array1, Array2};
    let program = program("input 5x3x13 batchnorm flatten dense(3, activation=softmax)");
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    let node = NodeId::from_index(1);
    assert!(jit.norm(node).is_some(), "the batchnorm was compiled");
    let mut rng = Rng::new(8, &[]);
    let rows = 3 * 15;
    // channels offset by up to 3 from zero, so that the variance is not E[x²]
    let x = Array2::from_shape_fn((rows, 13), |(_, c)| rng.next_f32() * 2.0 + c as f32 / 4.0);
    let dy = Array2::from_shape_fn((rows, 13), |_| rng.next_f32() - 0.5);
    let gamma = Array1::from_shape_fn(13, |_| rng.next_f32() + 0.5);
    let beta = Array1::from_shape_fn(13, |_| rng.next_f32());
    let eps = 1e-3;
    let (ey, es) = Plain.batchnorm_forward_train(node, x.view(), gamma.view(), beta.view(), eps);
    let (ay, stats) = jit.batchnorm_forward_train(node, x.view(), gamma.view(), beta.view(), eps);
    assert_close("batchnorm output", &ey.into_dyn(), &ay.into_dyn());
    assert_close("batch mean", &es.mean.clone().into_dyn(), &stats.mean.clone().into_dyn());
    assert_close("batch variance", &es.var.clone().into_dyn(), &stats.var.clone().into_dyn());
    let (edx, edg, edb) = Plain.batchnorm_backward(node, x.view(), dy.view(), gamma.view(), &es, eps);
    let (adx, adg, adb) = jit.batchnorm_backward(node, x.view(), dy.view(), gamma.view(), &es, eps);
    assert_close("batchnorm input gradient", &edx.into_dyn(), &adx.into_dyn());
    assert_close("dgamma", &edg.into_dyn(), &adg.into_dyn());
    assert_close("dbeta", &edb.into_dyn(), &adb.into_dyn());
    let moving = [es.mean.view(), es.var.view()];
    let e = Plain.batchnorm_forward_infer(node, x.view(), [gamma.view(), beta.view()], moving, eps);
    let a = jit.batchnorm_forward_infer(node, x.view(), [gamma.view(), beta.view()], moving, eps);
    assert_close("batchnorm at inference", &e.into_dyn(), &a.into_dyn());
}

/// Batch statistics are reduced in sample order: the same bits on 1 thread and on 3.
#[test]
fn a_first_block_runs_its_max_pool_in_training() {
    // the pool inside the block's steps, where the block's input needs no gradient, it ends in
    // a relu and its max pool tiles its output. Without batchnorm (conv::forward_max_pooled
    // forward, conv::pooled_backward_weights backward): one input channel (9 rows of dw, tasks
    // of 8 output channels), 13 = 8 + 4 + 1 channels, 10x8 → 5x4; three input channels with
    // padding (27 rows: tasks of all 6 = 4 + 1 + 1 channels), 2x3 windows (8x9 → 4x3), then a
    // block whose input does need a gradient (it keeps the pool's steps). With batchnorm
    // (pool::normalized_forward, conv::pooled_weight_sums): the same shapes, within the sums'
    // kernel's 12 rows (3x3 over one channel, 2x2 over three with a bias)
    let models = [
        (
            "input 12x10x1 conv2d(13, kernel=3, activation=relu) maxpool(2) flatten dense(3, activation=softmax)",
            1,
        ),
        (
            "input 8x9x3 conv2d(6, kernel=3, padding=same, activation=relu) maxpool(2x3) \
             conv2d(5, kernel=1, activation=relu) maxpool(2x1) flatten dense(3, activation=softmax)",
            2,
        ),
        (
            "input 12x10x1 conv2d(13, kernel=3, bias=false) batchnorm relu maxpool(2) \
             flatten dense(3, activation=softmax)",
            1,
        ),
        (
            "input 9x10x3 conv2d(6, kernel=2) batchnorm relu maxpool(2x3) \
             conv2d(5, kernel=1, bias=false) batchnorm relu maxpool(2x1) flatten dense(3, activation=softmax)",
            2,
        ),
        // 16 output channels: two whole chunks of 8 a register block
        (
            "input 12x10x1 conv2d(16, kernel=3, activation=relu) maxpool(2) flatten dense(3, activation=softmax)",
            1,
        ),
    ];
    for (model, blocks) in models {
        let fused = program(model).fused();
        let jit = JitKernels::compile(&fused, Listing::default()).unwrap();
        let takes: Vec<bool> =
            fused.blocks.iter().map(|b| jit.block(b.output()).unwrap().pooled_backward.is_some()).collect();
        let mut expected = vec![false; blocks];
        expected[0] = true;
        assert_eq!(takes, expected, "{model}");
        let plan = reference::plan(&jit, &fused, Pass::Train, 4, true);
        let first = fused.blocks[0];
        assert!(plan.takes_pool(&fused, &first), "{model}");
        assert!(plan.runs_in_block(&fused, first.pool.unwrap()), "{model}");
        // the block's value and its gradient (the pool's input and its gradient) are never written
        assert!(plan.get(&fused, Buffer::Value(first.output())).is_none(), "{model}");
        assert!(plan.get(&fused, Buffer::Grad(first.output())).is_none(), "{model}");
        for batch in [1, 7] {
            fused_matches_unfused(model, batch, blocks);
        }
    }
    // (CNNC_POOL_TRAIN=0 is read when compiling: not tested here, the environment is shared)

    // ties: channels with zero weights hold the same value at every pixel (their bias, or
    // batchnorm's β), so each window's gradient goes to its first pixel (as the reference's),
    // whose patch of x the weight gradient then sums
    for model in [models[0].0, models[2].0, models[4].0] {
        let (unfused, fused) = (program(model), program(model).fused());
        let jit = JitKernels::compile(&fused, Listing::default()).unwrap();
        let mut rng = Rng::new(9, &[]);
        let mut params = parameters(&unfused, &mut rng);
        let f = params[0].shape()[3];
        for (i, w) in params[0].iter_mut().enumerate() {
            if (i % f).is_multiple_of(2) {
                *w = 0.0;
            }
        }
        // a positive bias (or β), so that the tied channels pass a gradient
        params[1].iter_mut().for_each(|b| *b = b.abs() + 0.1);
        let sample = unfused.shapes.shape(unfused.graph.input()).numel();
        let input = reference::batch_array(&unfused, &random(3 * sample, &mut rng));
        let labels = [0, 1, 2];
        let train = Mode::Train { seed: 1, step: 2 };
        let expected = reference::gradients(&unfused, &params, input.clone(), &labels, train);
        let actual = reference::gradients_with(&jit, &fused, &params, input.clone(), &labels, train);
        assert_same_gradients(&format!("{model} (ties)"), &unfused, &expected, &actual);
        // 3 threads split the weight gradient's 4 parts of channels (2 tasks each) mid-part:
        // each shard recomputes dy for the parts it starts in
        common::assert_same_on_1_and_3_threads(&jit, &fused, &params, &input, &labels);
    }
}

#[test]
fn fused_training_does_not_depend_on_the_thread_count() {
    let model =
        "input 8x8x2 conv2d(6, kernel=3, bias=false) batchnorm relu flatten dense(3, activation=softmax)";
    let fused = program(model).fused();
    let jit = JitKernels::compile(&fused, Listing::default()).unwrap();
    let mut rng = Rng::new(11, &[]);
    let params = parameters(&fused, &mut rng);
    let input = reference::batch_array(&fused, &random(7 * 128, &mut rng));
    let labels = [0, 1, 2, 0, 1, 2, 0];
    common::assert_same_on_1_and_3_threads(&jit, &fused, &params, &input, &labels);
}

/// Which of `program`'s blocks run inside the next block's step at inference on `jit`.
fn inside_next_step(jit: &JitKernels, program: &Program) -> Vec<bool> {
    let plan = reference::plan(jit, program, Pass::Infer, 4, true);
    program.blocks.iter().map(|b| plan.runs_in_next_step(program, b)).collect()
}

#[test]
fn pooled_blocks_in_a_row_run_as_one_step_at_inference() {
    // mnist.cnn's shape, smaller: a one-channel first layer whose pool is in its kernel, then
    // an unpadded block with batchnorm folded in; three pooled blocks in a row pair only the
    // first two; a padded second block reads a padded copy, and does not pair
    let cases = [
        (
            "input 28x28x1 conv2d(9, kernel=3, activation=relu) maxpool(2) \
          conv2d(13, kernel=3, bias=false) batchnorm relu maxpool(2) flatten dense(3, activation=softmax)",
            vec![true, false],
        ),
        (
            "input 16x17x1 conv2d(13, kernel=3, activation=relu) maxpool(2) \
          conv2d(6, kernel=2) leaky_relu(alpha=0.2) maxpool(3) \
          conv2d(5, kernel=1, bias=false) batchnorm relu maxpool(2) flatten dense(3, activation=softmax)",
            vec![true, false, false],
        ),
        (
            "input 9x9x16 conv2d(24, kernel=3, padding=same) batchnorm relu maxpool(2) \
          conv2d(20, kernel=3, activation=relu) maxpool(2) flatten dense(3, activation=softmax)",
            vec![true, false],
        ),
        (
            "input 12x12x3 conv2d(8, kernel=3, activation=relu) maxpool(2) \
          conv2d(7, kernel=3, padding=same, activation=relu) maxpool(2) flatten dense(3, activation=softmax)",
            vec![false, false],
        ),
    ];
    for (model, pairs) in cases {
        let fused = program(model).fused();
        let mut jit = JitKernels::compile(&fused, Listing::default()).unwrap();
        assert_eq!(inside_next_step(&jit, &fused), pairs, "{model}");
        let mut rng = Rng::new(17, &[]);
        let params = parameters(&fused, &mut rng);
        let sample = fused.shapes.shape(fused.graph.input()).numel();
        for batch in [1, 6] {
            let input = reference::batch_array(&fused, &random(batch * sample, &mut rng));
            let expected = reference::forward(&fused, &params, input.clone(), Mode::Infer, fused.output);
            jit.pair_blocks = true;
            let paired =
                reference::forward_with(&jit, &fused, &params, input.clone(), Mode::Infer, fused.output);
            jit.pair_blocks = false;
            assert_eq!(inside_next_step(&jit, &fused), vec![false; pairs.len()], "{model}");
            let apart =
                reference::forward_with(&jit, &fused, &params, input.clone(), Mode::Infer, fused.output);
            let mut compared = 0;
            for (id, _) in fused.graph.nodes() {
                let what = format!("{model} (batch {batch})\nvalue of %{}", id.index());
                if let (Some(a), Some(b)) = (&expected.values[id.index()], &paired.values[id.index()]) {
                    assert_close(&what, a, b);
                    // the same kernels on the same samples: the same bits, paired or not
                    assert_eq!(Some(b), apart.values[id.index()].as_ref(), "{what}: paired against apart");
                    compared += 1;
                }
            }
            // the input, each block's value (the pair's first included) and the output
            assert!(compared > pairs.len() + 1, "{model}: only {compared} values compared");
            // a pass that stops at the pair's first block still runs the pair's step
            jit.pair_blocks = true;
            let first = fused.blocks[0].inference_output();
            let until = reference::forward_with(&jit, &fused, &params, input.clone(), Mode::Infer, first);
            let value = until.values[first.index()].as_ref().expect("the first block's value");
            assert_eq!(
                Some(value),
                paired.values[first.index()].as_ref(),
                "{model}: stopped at the first block"
            );
        }
    }
}

/// `predict` in its shared arena, where the pair's step reuses memory the plan frees.
#[test]
fn prediction_with_paired_blocks_matches_the_reference() {
    use cnnc::backend::Backend as _;
    let model = "input 20x20x1 conv2d(11, kernel=3, activation=relu) maxpool(2) \
                 conv2d(10, kernel=3, bias=false) batchnorm relu maxpool(2) flatten dropout(0.3) \
                 dense(7, activation=relu) dense(3, activation=softmax)";
    let program = std::sync::Arc::new(program(model).fused());
    let optimizer = cnnc::ir::train::Optimizer::Sgd { lr: 0.1, momentum: 0.0 };
    let state = cnnc::train::state::State::init(&program, &optimizer, 5);
    let mut jit = cnnc::backend::jit::Jit::new(program.clone(), optimizer).unwrap();
    assert_eq!(inside_next_step(&jit.kernels, &program)[..2], [true, false], "{model}");
    let mut reference = cnnc::backend::reference::Reference::new(program.clone(), optimizer);
    for batch in [1, 9, 4] {
        let images = random(batch * 400, &mut Rng::new(23, &[batch as u64]));
        let expected = reference.predict(&state, &images);
        let actual = jit.predict(&state, &images);
        let shape = vec![expected.len()];
        let (expected, actual) = (
            ArrayD::from_shape_vec(shape.clone(), expected).unwrap(),
            ArrayD::from_shape_vec(shape, actual).unwrap(),
        );
        assert_close(&format!("{model} (batch {batch})"), &expected, &actual);
    }
}
