//! The JIT backend against the reference, side by side: each convolution and dense layer of
//! models/mnist.cnn (forward, input gradient, weight gradient) and a whole training step, at
//! batch 128. Criterion reports throughput in images per second.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ndarray::{Array, ArrayD, Ix4};

use cnnc::autodiff::{self, Program};
use cnnc::backend::Backend;
use cnnc::backend::jit::{Jit, JitKernels, Listing};
use cnnc::backend::reference::ops::Geometry;
use cnnc::backend::reference::{Kernels, KernelsExt as _, Plain, Reference};
use cnnc::diagnostic::SourceFile;
use cnnc::ir::{Op, Shape};
use cnnc::rng::Rng;
use cnnc::train::state::State;

const BATCH: usize = 128;

fn program(path: &str) -> Program {
    let source = SourceFile::new(path, std::fs::read_to_string(path).unwrap());
    autodiff::build(&cnnc::check(&source).unwrap()).unwrap()
}

fn random(shape: &[usize], rng: &mut Rng) -> ArrayD<f32> {
    Array::from_shape_simple_fn(shape.to_vec(), || rng.next_f32() - 0.5)
}

fn layers(c: &mut Criterion) {
    cnnc::keep_freed_memory();
    let program = program("models/mnist.cnn");
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    let mut rng = Rng::new(1, &[]);
    for (id, node) in program.graph.nodes() {
        let Op::Conv2d(conv) = &node.op else { continue };
        let name = &program.graph.layer_of(id).name;
        let Shape::Hwc { h, w, c: cin } = program.shapes.shape(node.inputs[0]) else { continue };
        let Shape::Hwc { h: oh, w: ow, c: f } = program.shapes.shape(id) else { continue };
        let [wh, ww] = program.shapes.window(id).unwrap();
        let g = Geometry {
            kernel: conv.kernel,
            stride: conv.stride,
            pad_before: [wh.pad_before, ww.pad_before],
            out: [oh, ow],
        };
        let x = random(&[BATCH, h, w, cin], &mut rng).into_dimensionality::<Ix4>().unwrap();
        let k =
            random(&[conv.kernel[0], conv.kernel[1], cin, f], &mut rng).into_dimensionality::<Ix4>().unwrap();
        let dy = random(&[BATCH, oh, ow, f], &mut rng).into_dimensionality::<Ix4>().unwrap();
        let bias = conv.bias.then(|| ndarray::Array1::<f32>::zeros(f));
        let mut group = c.benchmark_group(format!("{name} {h}x{w}x{cin} -> {oh}x{ow}x{f}"));
        group.throughput(Throughput::Elements(BATCH as u64)).sample_size(10);
        let backends: [(&str, &dyn Kernels<f32>); 2] = [("reference", &Plain), ("jit", &jit)];
        for (label, kernels) in backends {
            group.bench_function(format!("forward/{label}"), |b| {
                b.iter(|| kernels.conv2d_forward(id, x.view(), k.view(), bias.as_ref().map(|b| b.view()), &g))
            });
            group.bench_function(format!("backward_input/{label}"), |b| {
                b.iter(|| kernels.conv2d_backward_input(id, dy.view(), k.view(), [h, w], &g))
            });
            group.bench_function(format!("backward_weights/{label}"), |b| {
                b.iter(|| {
                    kernels.conv2d_backward_weights(
                        id,
                        x.view(),
                        dy.view(),
                        [conv.kernel[0], conv.kernel[1], cin, f],
                        &g,
                    )
                })
            });
        }
        group.finish();
    }
}

fn training_step(c: &mut Criterion) {
    let program = Arc::new(program("models/mnist.cnn"));
    let optimizer = cnnc::ir::train::Optimizer::Adam { lr: 0.001, beta1: 0.9, beta2: 0.999, epsilon: 1e-7 };
    let mut rng = Rng::new(2, &[]);
    let images: Vec<f32> = (0..BATCH * 28 * 28).map(|_| rng.next_f32()).collect();
    let labels: Vec<u8> = (0..BATCH).map(|i| (i % 10) as u8).collect();
    let mut group = c.benchmark_group("mnist.cnn training step, batch 128");
    group.throughput(Throughput::Elements(BATCH as u64)).sample_size(10);
    let mut backends: Vec<(&str, Box<dyn Backend>)> = vec![
        ("reference", Box::new(Reference::new(program.clone(), optimizer))),
        ("jit", Box::new(Jit::new(program.clone(), optimizer).unwrap())),
    ];
    for (label, backend) in backends.iter_mut() {
        let mut state = State::init(&program, &optimizer, 42);
        let mut step = 0;
        group.bench_function(*label, |b| {
            b.iter(|| {
                step += 1;
                black_box(backend.train_step(&mut state, &images, &labels, step))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, layers, training_step);
criterion_main!(benches);
