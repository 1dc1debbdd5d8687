//! The memory plan (src/memory.rs) and the arena a pass runs in: buffers that share memory
//! change no result, plans are close to the least memory any placement needs, and a step that
//! touches a buffer outside the steps the plan gave it is stopped.

use std::sync::Arc;

use cnnc::autodiff::Program;
use cnnc::backend::arena::Arena;
use cnnc::backend::jit::{JitKernels, Listing};
use cnnc::backend::reference::{self, Gradients, Kernels, Mode, Plain};
use cnnc::diagnostic::SourceFile;
use cnnc::memory::{Buffer, Pass, Plan};
use cnnc::rng::Rng;
use ndarray::{ArrayD, IxDyn};

mod common;
use common::{program, random};

/// Models with every kind of buffer: fused blocks with batchnorm (statistics, linear outputs),
/// dropout masks, flatten aliases, padded windows (scratch), sigmoid and tanh (which read their
/// output backward), average pooling.
const MODELS: [&str; 5] = [
    "input 12x12x3 conv2d(8, kernel=3, padding=same) batchnorm relu maxpool(2) conv2d(6, kernel=3) relu \
     flatten dropout(0.3) dense(5, activation=softmax)",
    "input 9x9x2 conv2d(5, kernel=2, stride=2, padding=same) maxpool(2, padding=same) flatten \
     dense(7) batchnorm relu dense(3, activation=softmax)",
    "input 10x10x4 conv2d(6, kernel=3, activation=tanh) avgpool(2, padding=same) dropout(0.2) \
     conv2d(4, kernel=3, activation=sigmoid) flatten dense(3, activation=softmax)",
    "input 17 dense(9) relu dropout(0.5) dense(6, activation=leaky_relu) dense(4, activation=softmax)",
    "input 11x11x16 conv2d(16, kernel=3) relu conv2d(9, kernel=3, padding=same) batchnorm leaky_relu \
     maxpool(2) flatten dense(3, activation=softmax)",
];

fn parameters(program: &Program, rng: &mut Rng) -> Vec<ArrayD<f32>> {
    program
        .params
        .iter()
        .map(|p| {
            let values = random(p.spec.numel(), rng);
            let values = if p.spec.name == "moving_variance" {
                values.iter().map(|v| v.abs() + 0.5).collect()
            } else {
                values
            };
            ArrayD::from_shape_vec(p.spec.shape.clone(), values).unwrap()
        })
        .collect()
}

fn assert_identical(what: &str, a: &Gradients<f32>, b: &Gradients<f32>) {
    assert_eq!(a.loss_sum.to_bits(), b.loss_sum.to_bits(), "{what}: loss");
    assert_eq!(a.correct, b.correct, "{what}: accuracy");
    assert_eq!(a.grads, b.grads, "{what}: gradients");
    assert_eq!(a.moving, b.moving, "{what}: moving statistics");
}

/// The gradients of a step in the shared arena and in one that keeps every buffer apart are
/// the same bits: no buffer is overwritten while something still reads it.
fn sharing_changes_nothing(kernels: &impl Kernels<f32>, program: &Program, what: &str) {
    let mut rng = Rng::new(29, &[program.graph.len() as u64]);
    let params = parameters(program, &mut rng);
    let batch = 7;
    let sample = program.shapes.shape(program.graph.input()).numel();
    let input = reference::batch_array(program, &random(batch * sample, &mut rng));
    let labels: Vec<u8> = (0..batch).map(|i| (i % 3) as u8).collect();
    let mode = Mode::Train { seed: 5, step: 2 };
    let shared = reference::gradients_planned(kernels, program, &params, input.clone(), &labels, mode, true);
    let apart = reference::gradients_planned(kernels, program, &params, input, &labels, mode, false);
    assert_identical(what, &shared, &apart);
    let shared_plan = reference::plan(kernels, program, Pass::Train, batch, true);
    let apart_plan = reference::plan(kernels, program, Pass::Train, batch, false);
    assert!(shared_plan.len < apart_plan.len, "{what}: sharing saved nothing ({})", shared_plan.len);
}

#[test]
fn shared_buffers_change_no_result() {
    for model in MODELS {
        let unfused = program(model);
        let fused = unfused.clone().fused();
        sharing_changes_nothing(&Plain, &unfused, &format!("{model} (reference)"));
        for (p, name) in [(&unfused, "unfused"), (&fused, "fused")] {
            let jit = JitKernels::compile(p, Listing::default()).unwrap();
            sharing_changes_nothing(&jit, p, &format!("{model} (JIT, {name})"));
        }
    }
}

/// The most memory live at one step: no placement can use less.
fn peak(plan: &Plan) -> usize {
    let buffers = plan.buffers();
    (0..plan.steps.len())
        .map(|t| buffers.iter().filter(|(_, p)| p.live[0] <= t && t <= p.live[1]).map(|(_, p)| p.len).sum())
        .max()
        .unwrap_or(0)
}

/// The models of models/, training and inference: the arena is within 15% of the lower bound
/// (the most memory live at one step), and smaller than the buffers without sharing.
#[test]
fn plans_come_close_to_the_least_memory_possible() {
    for name in ["mnist", "mnist_bn", "lenet5", "strided", "seed002"] {
        let path = format!("{}/models/{name}.cnn", env!("CARGO_MANIFEST_DIR"));
        let source = SourceFile::new(&path, std::fs::read_to_string(&path).unwrap());
        let checked = cnnc::check(&source).unwrap();
        let program = cnnc::autodiff::build_with(&checked, true).unwrap();
        let jit = JitKernels::compile(&program, Listing::default()).unwrap();
        for pass in [Pass::Train, Pass::Infer] {
            let plan = reference::plan(&jit, &program, pass, 64, true);
            let least = peak(&plan);
            assert!(plan.len >= least, "{name} {pass:?}: the plan overlaps live buffers");
            assert!(plan.len * 100 <= least * 115, "{name} {pass:?}: {} for a peak of {least}", plan.len);
            assert!(plan.len < plan.unshared, "{name} {pass:?}: nothing shared");
        }
    }
}

/// A buffer asked for at a step where the plan does not have it live is refused: the arena
/// would otherwise hand out memory that another buffer uses at that step.
#[test]
#[should_panic(expected = "which the plan has live over steps")]
fn a_buffer_is_refused_outside_its_live_steps() {
    let program = program("input 8x8x1 conv2d(4, kernel=3) relu flatten dense(3, activation=softmax)");
    let plan = reference::plan::<f32>(&Plain, &program, Pass::Train, 2, true);
    let relu = cnnc::ir::NodeId::from_index(2);
    let live = plan.get(&program, Buffer::Grad(relu)).expect("the relu's gradient").live;
    assert!(live[0] > 0, "the relu's gradient is not live at the first step");
    let mut arena: Arena<f32> = Arena::new(plan, 1);
    let open = arena.open(&program);
    // SAFETY: the only view.
    let _ = unsafe { open.view(Buffer::Grad(relu), 0, IxDyn(&[2, 6, 6, 4])) };
}

/// A backend's arena is planned once for the batch size and reused; a smaller last batch fits
/// it, a larger one plans it anew. Training through `Backend` (the arena) matches the
/// reference's gradients applied by hand.
#[test]
fn the_backend_trains_in_its_arena_across_batch_sizes() {
    use cnnc::backend::Backend as _;
    use cnnc::backend::jit::Jit;
    use cnnc::ir::train::Optimizer;
    use cnnc::train::state::State;
    let program = Arc::new(program(MODELS[0]).fused());
    let optimizer = Optimizer::Sgd { lr: 0.1, momentum: 0.0 };
    let mut jit = Jit::new(program.clone(), optimizer).unwrap();
    let mut state = State::init(&program, &optimizer, 4);
    let mut rng = Rng::new(3, &[]);
    let sample = program.shapes.shape(program.graph.input()).numel();
    for (step, (batch, planned)) in [(6usize, 6), (4, 6), (9, 9), (9, 9)].into_iter().enumerate() {
        let images = random(batch * sample, &mut rng);
        let labels: Vec<u8> = (0..batch).map(|i| (i % 5) as u8).collect();
        let before = state.params.clone();
        let mode = Mode::Train { seed: state.seed, step: step as u64 };
        let input = reference::batch_array(&program, &images);
        let expected = reference::gradients(&program, &before, input, &labels, mode);
        let result = jit.train_step(&mut state, &images, &labels, step as u64);
        assert!((result.loss_sum - expected.loss_sum).abs() < 1e-3 * expected.loss_sum.abs().max(1.0));
        for (i, p) in program.params.iter().enumerate() {
            let Some(grad) = &expected.grads[i] else { continue };
            let stepped = &before[i] - &(grad * 0.1f32);
            common::assert_within(1e-3, &format!("step {step}: {}", p.name), &stepped, &state.params[i]);
        }
        assert_eq!(jit.arena_plan(Pass::Train).map(|p| p.batch), Some(planned), "step {step}");
    }
}
