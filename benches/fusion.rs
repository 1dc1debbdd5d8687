//! Fused against unfused (the fusion pass on and off), both on the JIT, side by side: a whole
//! training step (forward and backward) and an inference batch of models/mnist_bn.cnn at batch
//! 128, and of one wide block (56x56x64 → conv 3x3 64 → batchnorm → relu) at batch 16.
//! Criterion reports throughput in images per second. `cnnc bench` gives the per-layer view.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use cnnc::autodiff;
use cnnc::backend::Backend as _;
use cnnc::backend::jit::Jit;
use cnnc::diagnostic::SourceFile;
use cnnc::rng::Rng;
use cnnc::train::state::State;

const WIDE_BLOCK: &str = "model wide_block {
    input 56x56x64
    conv2d(64, kernel=3, padding=same, bias=false)
    batchnorm
    relu
    maxpool(56)
    flatten
    dense(10, activation=softmax)
}
train { loss = categorical_crossentropy  optimizer = adam(lr=0.001) }";

fn compare(c: &mut Criterion, name: &str, source: SourceFile, batch: usize) {
    let checked = cnnc::check(&source).unwrap();
    let optimizer = checked.model.train.as_ref().unwrap().optimizer;
    let mut rng = Rng::new(3, &[]);
    let mut group = c.benchmark_group(format!("{name} batch {batch}"));
    group.throughput(Throughput::Elements(batch as u64)).sample_size(10);
    for fuse in [true, false] {
        let program = Arc::new(autodiff::build_with(&checked, fuse).unwrap());
        let sample = program.shapes.shape(program.graph.input()).numel();
        let images: Vec<f32> = (0..batch * sample).map(|_| rng.next_f32()).collect();
        let labels: Vec<u8> = (0..batch).map(|i| (i % 10) as u8).collect();
        let mut backend = Jit::new(program.clone(), optimizer).unwrap();
        let mut state = State::init(&program, &optimizer, 1);
        let label = if fuse { "fused" } else { "unfused" };
        let mut step = 0;
        group.bench_function(format!("train step/{label}"), |b| {
            b.iter(|| {
                step += 1;
                black_box(backend.train_step(&mut state, &images, &labels, step))
            })
        });
        group.bench_function(format!("inference/{label}"), |b| {
            b.iter(|| black_box(backend.predict(&state, &images)))
        });
    }
    group.finish();
}

fn fusion(c: &mut Criterion) {
    cnnc::keep_freed_memory();
    let path = "models/mnist_bn.cnn";
    compare(c, "mnist_bn", SourceFile::new(path, std::fs::read_to_string(path).unwrap()), 128);
    compare(c, "wide block", SourceFile::new("wide_block.cnn", WIDE_BLOCK), 16);
}

criterion_group!(benches, fusion);
criterion_main!(benches);
