//! The JIT's training step allocates nothing: every value, gradient, tape entry and kernel
//! temporary lives in the arena planned before the first step. Counted by a global allocator,
//! in a test binary of its own (one test: nothing else allocates while it counts).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use cnnc::backend::Backend as _;
use cnnc::backend::jit::Jit;
use cnnc::ir::train::Optimizer;
use cnnc::rng::Rng;
use cnnc::train::state::State;

mod common;
use common::{program, random};

/// Counts allocations (and reallocations) while `COUNTING` is on, on every thread.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as the caller asked.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as the caller asked.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as the caller asked.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by `f`.
fn allocations(f: impl FnOnce()) -> usize {
    ALLOCATIONS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    f();
    COUNTING.store(false, Ordering::Relaxed);
    ALLOCATIONS.load(Ordering::Relaxed)
}

#[test]
fn jit_training_steps_allocate_nothing() {
    // The counter counts.
    assert_eq!(allocations(|| drop(std::hint::black_box(vec![1u8; 10]))), 1);
    // Fused blocks with batchnorm and a Winograd layer (32 → 32 channels, 3x3), a padded
    // window, a pool through the relu, dropout, a dense batchnorm block, sigmoid, average
    // pooling; a first block whose backward is its weight sums (conv::normalized_weight_sums);
    // Adam and SGD with momentum.
    let models = [
        "input 12x12x3 conv2d(32, kernel=3, padding=same) batchnorm relu conv2d(32, kernel=3) relu maxpool(2) \
         flatten dropout(0.4) dense(9) batchnorm relu dense(5, activation=softmax)",
        "input 10x10x2 conv2d(6, kernel=3, activation=sigmoid) avgpool(2, padding=same) \
         conv2d(5, kernel=2, stride=2, padding=same) maxpool(2, padding=same) flatten dense(4, activation=softmax)",
        "input 10x10x1 conv2d(8, kernel=3, bias=false) batchnorm relu maxpool(2) flatten dense(4, activation=softmax)",
    ];
    let optimizers = [
        Optimizer::Adam { lr: 0.001, beta1: 0.9, beta2: 0.999, epsilon: 1e-7 },
        Optimizer::Sgd { lr: 0.01, momentum: 0.9 },
    ];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for model in models {
        for optimizer in optimizers {
            let program = Arc::new(program(model).fused());
            let mut jit = Jit::new(program.clone(), optimizer).unwrap();
            let winograd = (0..program.graph.len())
                .map(cnnc::ir::NodeId::from_index)
                .any(|id| jit.kernels.winograd(id).is_some() || jit.kernels.block_winograd(id).is_some());
            assert_eq!(
                winograd,
                model.contains("conv2d(32"),
                "{model}: Winograd where the cost model picks it"
            );
            let mut state = State::init(&program, &optimizer, 2);
            let sample = program.shapes.shape(program.graph.input()).numel();
            let mut rng = Rng::new(8, &[]);
            let batches: Vec<(Vec<f32>, Vec<u8>)> = [13usize, 13, 13, 6]
                .iter()
                .map(|&n| (random(n * sample, &mut rng), (0..n).map(|i| (i % 4) as u8).collect()))
                .collect();
            pool.install(|| {
                // The first step plans and allocates the arena; then none allocates, the
                // smaller last batch included.
                let (images, labels) = &batches[0];
                jit.train_step(&mut state, images, labels, 0);
                for (step, (images, labels)) in batches.iter().enumerate().skip(1) {
                    let count = allocations(|| {
                        jit.train_step(&mut state, images, labels, step as u64);
                    });
                    assert_eq!(count, 0, "{model}, {optimizer:?}: step {step} allocated {count} times");
                }
                // Inference allocates only the probabilities it returns.
                let (images, _) = &batches[1];
                jit.predict(&state, images);
                let count = allocations(|| {
                    std::hint::black_box(jit.predict(&state, images));
                });
                assert_eq!(count, 1, "{model}: inference allocated {count} times");
            });
        }
    }
}
