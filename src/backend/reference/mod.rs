//! The reference backend: interprets a [`Program`] op by op with the plain ndarray loops of
//! [`ops`]. It is the oracle that every faster backend is checked against: correctness over
//! speed. Generic over the float type so that whole-model gradients can be checked in f64.

pub mod ops;

use std::sync::Arc;

use ndarray::{
    Array1, Array2, Array4, ArrayD, ArrayView1, ArrayView2, ArrayView4, ArrayViewD, Ix1, Ix2, Ix4, IxDyn,
};

use super::{Backend, StepResult};
use crate::autodiff::{Program, Step};
use crate::ir::fuse::Block;
use crate::ir::train::{Loss, Optimizer};
use crate::ir::{Activation, NodeId, Op, PoolKind, Shape};
use crate::rng::Rng;
use crate::train::optimizer;
use crate::train::state::State;
use ops::{BatchStats, Geometry, Real};

/// The compute-heavy ops, by node: the reference computes them with [`ops`]; a faster backend
/// supplies its own (compiled for that node's shapes) and inherits everything else from the
/// interpreter, so both run the same program the same way.
pub trait Kernels<T: Real>: Sync {
    /// What was compiled, and how long it took, for the log.
    fn compile_report(&self) -> Option<String> {
        None
    }

    fn conv2d_forward(
        &self,
        _node: NodeId,
        x: ArrayView4<T>,
        w: ArrayView4<T>,
        b: Option<ArrayView1<T>>,
        g: &Geometry,
    ) -> Array4<T> {
        ops::conv2d_forward(x, w, b, g)
    }

    fn conv2d_backward_input(
        &self,
        _node: NodeId,
        dy: ArrayView4<T>,
        w: ArrayView4<T>,
        input_hw: [usize; 2],
        g: &Geometry,
    ) -> Array4<T> {
        ops::conv2d_backward_input(dy, w, input_hw, g)
    }

    fn conv2d_backward_weights(
        &self,
        _node: NodeId,
        x: ArrayView4<T>,
        dy: ArrayView4<T>,
        kernel_shape: [usize; 4],
        g: &Geometry,
    ) -> (Array4<T>, Array1<T>) {
        ops::conv2d_backward_weights(x, dy, kernel_shape, g)
    }

    fn dense_forward(
        &self,
        _node: NodeId,
        x: ArrayView2<T>,
        w: ArrayView2<T>,
        b: Option<ArrayView1<T>>,
    ) -> Array2<T> {
        ops::dense_forward(x, w, b)
    }

    fn maxpool_forward(&self, _node: NodeId, x: ArrayView4<T>, g: &Geometry) -> Array4<T> {
        ops::maxpool_forward(x, g)
    }

    fn maxpool_backward(
        &self,
        _node: NodeId,
        x: ArrayView4<T>,
        dy: ArrayView4<T>,
        g: &Geometry,
    ) -> Array4<T> {
        ops::maxpool_backward(x, dy, g)
    }

    /// An element-wise activation (not softmax).
    fn activation_forward(&self, _node: NodeId, act: Activation, x: ArrayViewD<T>) -> ArrayD<T> {
        x.mapv(|v| activate(act, v))
    }

    /// The gradient of an element-wise activation (not softmax), from its input x and output y.
    fn activation_backward(
        &self,
        _node: NodeId,
        act: Activation,
        x: ArrayViewD<T>,
        y: ArrayViewD<T>,
        dy: ArrayViewD<T>,
    ) -> ArrayD<T> {
        activation_gradient(act, x, y, dy)
    }

    /// Batchnorm in training over (rows, channels): the output and the batch statistics.
    fn batchnorm_forward_train(
        &self,
        _node: NodeId,
        x: ArrayView2<T>,
        gamma: ArrayView1<T>,
        beta: ArrayView1<T>,
        epsilon: T,
    ) -> (Array2<T>, BatchStats<T>) {
        ops::batchnorm_forward_train(x, gamma, beta, epsilon)
    }

    /// Batchnorm at inference, with the moving statistics `[mean, variance]`.
    fn batchnorm_forward_infer(
        &self,
        _node: NodeId,
        x: ArrayView2<T>,
        [gamma, beta]: [ArrayView1<T>; 2],
        [mean, var]: [ArrayView1<T>; 2],
        epsilon: T,
    ) -> Array2<T> {
        ops::batchnorm_forward_infer(x, gamma, beta, mean, var, epsilon)
    }

    /// (dx, dgamma, dbeta)
    fn batchnorm_backward(
        &self,
        _node: NodeId,
        x: ArrayView2<T>,
        dy: ArrayView2<T>,
        gamma: ArrayView1<T>,
        stats: &BatchStats<T>,
        epsilon: T,
    ) -> (Array2<T>, Array1<T>, Array1<T>) {
        ops::batchnorm_backward(x, dy, gamma, stats, epsilon)
    }

    /// Runs a fused block's forward pass as one unit; `None` when this backend has no fused
    /// kernels for it, and the interpreter runs the block's nodes one by one.
    fn block_forward(
        &self,
        _program: &Program,
        _block: &Block,
        _params: &[ArrayD<T>],
        _x: ArrayViewD<T>,
        _mode: Mode,
    ) -> Option<BlockForward<T>> {
        None
    }

    /// A fused block's backward pass from d(block value); called only for blocks whose forward
    /// pass [`Kernels::block_forward`] ran, with that pass's tape.
    #[allow(clippy::too_many_arguments)]
    fn block_backward(
        &self,
        _program: &Program,
        _block: &Block,
        _params: &[ArrayD<T>],
        _x: ArrayViewD<T>,
        _tape: &Tape<T>,
        _dz: ArrayViewD<T>,
        _need_dx: bool,
    ) -> Option<BlockBackward<T>> {
        None
    }

    /// (dx, dw, db)
    fn dense_backward(
        &self,
        _node: NodeId,
        x: ArrayView2<T>,
        w: ArrayView2<T>,
        dy: ArrayView2<T>,
    ) -> (Array2<T>, Array2<T>, Array1<T>) {
        ops::dense_backward(x, w, dy)
    }

    /// Average pooling over the real pixels of each window.
    fn avgpool_forward(&self, _node: NodeId, x: ArrayView4<T>, g: &Geometry) -> Array4<T> {
        ops::avgpool_forward(x, g)
    }

    fn avgpool_backward(
        &self,
        _node: NodeId,
        input_shape: [usize; 4],
        dy: ArrayView4<T>,
        g: &Geometry,
    ) -> Array4<T> {
        ops::avgpool_backward(input_shape, dy, g)
    }

    /// Softmax over the last axis, on its own (the output at inference).
    fn softmax_forward(&self, _node: NodeId, x: ArrayView2<T>) -> Array2<T> {
        ops::softmax_forward(x)
    }

    /// The output activation fused with its cross-entropy, on the logits z (N,K) of node
    /// `node`: (Σ loss, correct, dz).
    fn loss(&self, _node: NodeId, loss: Loss, z: ArrayView2<T>, labels: &[u8]) -> (f64, usize, Array2<T>) {
        match loss {
            Loss::CategoricalCrossentropy | Loss::SparseCategoricalCrossentropy => {
                ops::softmax_cross_entropy(z, labels)
            }
            Loss::BinaryCrossentropy => ops::sigmoid_binary_cross_entropy(z, labels),
        }
    }

    /// A dropout mask applied: y = x·mask forward, dx = dy·mask backward.
    fn dropout_apply(&self, _node: NodeId, x: ArrayViewD<T>, mask: ArrayViewD<T>) -> ArrayD<T> {
        &x * &mask
    }

    /// One optimizer step on parameter `index` (training runs in f32).
    fn optimizer_update(
        &self,
        _index: usize,
        optimizer: &Optimizer,
        param: &mut ArrayD<f32>,
        grad: &ArrayD<f32>,
        slots: &mut [ArrayD<f32>],
        iteration: u64,
    ) {
        optimizer::update(optimizer, param, grad, slots, iteration)
    }
}

/// What a fused block's forward pass leaves on the tape.
#[derive(Debug, Clone)]
pub struct BlockForward<T> {
    /// The block's value (its output node's).
    pub value: ArrayD<T>,
    /// The linear node's output, when the backward pass needs it (a block that normalizes).
    pub linear: Option<ArrayD<T>>,
    /// The batch statistics of the block's batchnorm, in training.
    pub stats: Option<BatchStats<T>>,
}

/// A fused block's gradients.
#[derive(Debug, Clone)]
pub struct BlockBackward<T> {
    /// d(block input), when asked for.
    pub dx: Option<ArrayD<T>>,
    /// (parameter index, gradient) for each trainable parameter of the block.
    pub grads: Vec<(usize, ArrayD<T>)>,
}

/// The reference's own kernels: [`ops`], as they are.
pub struct Plain;
impl<T: Real> Kernels<T> for Plain {}

/// Whether ops run as in training (batch statistics, dropout) or inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `step` seeds the dropout masks together with the run's `seed`.
    Train {
        seed: u64,
        step: u64,
    },
    Infer,
}

/// Every node's value from one forward pass, and what the backward pass needs besides.
#[derive(Debug, Clone)]
pub struct Tape<T> {
    pub values: Vec<Option<ArrayD<T>>>,
    pub stats: Vec<Option<BatchStats<T>>>,
    masks: Vec<Option<ArrayD<T>>>,
}

/// The result of a forward and backward pass, before any update.
#[derive(Debug, Clone)]
pub struct Gradients<T> {
    pub loss_sum: f64,
    pub correct: usize,
    /// Per parameter; `None` for non-trainable ones.
    pub grads: Vec<Option<ArrayD<T>>>,
    /// New values of the batchnorm moving statistics: (parameter index, value).
    pub moving: Vec<(usize, ArrayD<T>)>,
}

/// A backend that interprets the program, taking its compute-heavy kernels from `K`: the
/// reference ([`Plain`]) and the JIT (compiled kernels) differ only there.
pub struct Interpreter<K> {
    program: Arc<Program>,
    optimizer: Optimizer,
    pub kernels: K,
    name: &'static str,
    /// Wall time of each step, gathered while `Some` (`cnnc bench`).
    pub profile: Option<Profile>,
}

/// Seconds spent in each step of the program, in the order they ran ([`Step::Forward`] also
/// times inference; a fused block is timed at its output node).
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub entries: Vec<(Step, f64)>,
}

impl Profile {
    fn time<R>(profile: &mut Option<&mut Profile>, step: Step, f: impl FnOnce() -> R) -> R {
        let Some(profile) = profile else { return f() };
        let started = std::time::Instant::now();
        let result = f();
        profile.entries.push((step, started.elapsed().as_secs_f64()));
        result
    }
}

/// The reference backend for training in f32.
pub type Reference = Interpreter<Plain>;

impl Reference {
    pub fn new(program: Arc<Program>, optimizer: Optimizer) -> Self {
        Interpreter::with_kernels("reference", program, optimizer, Plain)
    }
}

impl<K: Kernels<f32>> Interpreter<K> {
    pub fn with_kernels(name: &'static str, program: Arc<Program>, optimizer: Optimizer, kernels: K) -> Self {
        Interpreter { program, optimizer, kernels, name, profile: None }
    }
}

impl<K: Kernels<f32>> Backend for Interpreter<K> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn compile_report(&self) -> Option<String> {
        self.kernels.compile_report()
    }

    fn train_step(&mut self, state: &mut State, images: &[f32], labels: &[u8], step: u64) -> StepResult {
        let program = &self.program;
        let input = batch_array(program, images);
        let mode = Mode::Train { seed: state.seed, step };
        let mut profile = self.profile.as_mut();
        let g = gradients_profiled(&self.kernels, program, &state.params, input, labels, mode, &mut profile);
        for (index, value) in g.moving {
            state.params[index] = value;
        }
        state.iterations += 1;
        Profile::time(&mut profile, Step::Update, || {
            for (index, grad) in g.grads.iter().enumerate() {
                if let Some(grad) = grad {
                    let slots = &mut state.slots[index];
                    let param = &mut state.params[index];
                    self.kernels.optimizer_update(
                        index,
                        &self.optimizer,
                        param,
                        grad,
                        slots,
                        state.iterations,
                    );
                }
            }
        });
        StepResult { loss_sum: g.loss_sum, correct: g.correct }
    }

    fn predict(&mut self, state: &State, images: &[f32]) -> Vec<f32> {
        let program = &self.program;
        let input = batch_array(program, images);
        let mut profile = self.profile.as_mut();
        let (kernels, params) = (&self.kernels, &state.params);
        let tape =
            forward_profiled(kernels, program, params, input, Mode::Infer, program.output, &mut profile);
        tape.values[program.output.index()]
            .as_ref()
            .expect("the output was computed")
            .iter()
            .copied()
            .collect()
    }
}

/// A flat batch of images as an (N, …input shape) array.
pub fn batch_array<T: Real>(program: &Program, images: &[T]) -> ArrayD<T> {
    let sample = program.shapes.shape(program.graph.input());
    let n = images.len() / sample.numel();
    let mut shape = vec![n];
    shape.extend(sample.dims());
    ArrayD::from_shape_vec(IxDyn(&shape), images.to_vec()).expect("images hold whole samples")
}

/// Runs the forward pass up to and including `last`, with the reference's kernels.
pub fn forward<T: Real>(
    program: &Program,
    params: &[ArrayD<T>],
    input: ArrayD<T>,
    mode: Mode,
    last: NodeId,
) -> Tape<T> {
    forward_with(&Plain, program, params, input, mode, last)
}

/// Forward, fused loss and backward on one batch with the reference's kernels; returns the
/// gradients without applying them.
pub fn gradients<T: Real>(
    program: &Program,
    params: &[ArrayD<T>],
    input: ArrayD<T>,
    labels: &[u8],
    mode: Mode,
) -> Gradients<T> {
    gradients_with(&Plain, program, params, input, labels, mode)
}

/// Runs the forward pass up to and including `last`.
pub fn forward_with<T: Real>(
    kernels: &impl Kernels<T>,
    program: &Program,
    params: &[ArrayD<T>],
    input: ArrayD<T>,
    mode: Mode,
    last: NodeId,
) -> Tape<T> {
    forward_profiled(kernels, program, params, input, mode, last, &mut None)
}

fn forward_profiled<T: Real>(
    kernels: &impl Kernels<T>,
    program: &Program,
    params: &[ArrayD<T>],
    input: ArrayD<T>,
    mode: Mode,
    last: NodeId,
    profile: &mut Option<&mut Profile>,
) -> Tape<T> {
    let len = program.graph.len();
    let mut tape = Tape { values: vec![None; len], stats: vec![None; len], masks: vec![None; len] };
    tape.values[0] = Some(input);
    let order = if mode == Mode::Infer { &program.inference } else { &program.forward };
    for &id in order.iter().filter(|id| **id <= last) {
        Profile::time(profile, Step::Forward(id), || {
            forward_step(kernels, program, params, &mut tape, id, mode)
        });
    }
    tape
}

/// Computes node `id`'s value (or, at a block's output, the whole block's) onto the tape.
fn forward_step<T: Real>(
    kernels: &impl Kernels<T>,
    program: &Program,
    params: &[ArrayD<T>],
    tape: &mut Tape<T>,
    id: NodeId,
    mode: Mode,
) {
    let block = program.block_ending_at(id, mode != Mode::Infer);
    let fused = block.and_then(|b| {
        let x = value(tape, program.graph.node(b.linear).inputs[0]);
        kernels.block_forward(program, b, params, x, mode).map(|out| (b, out))
    });
    if let Some((block, out)) = fused {
        tape.values[id.index()] = Some(row_major(out.value));
        tape.values[block.linear.index()] = out.linear.map(row_major);
        if let Some(norm) = block.norm {
            tape.stats[norm.index()] = out.stats;
        }
        return;
    }
    if mode == Mode::Infer && block.is_none() && pass_through(program, tape, id) {
        return;
    }
    let nodes: Vec<NodeId> = match block {
        Some(b) if mode == Mode::Infer => b.inference_nodes().collect(),
        Some(b) => b.nodes().collect(),
        None => vec![id],
    };
    for id in nodes {
        let (value, stats, mask) = forward_node(kernels, program, params, tape, id, mode);
        tape.values[id.index()] = Some(row_major(value));
        tape.stats[id.index()] = stats;
        tape.masks[id.index()] = mask;
    }
}

/// At inference, an op that passes its input through (flatten, dropout) takes the input's
/// value instead of copying it, when it is that value's only reader: nothing reads it again.
/// Returns whether it did.
fn pass_through<T: Real>(program: &Program, tape: &mut Tape<T>, id: NodeId) -> bool {
    let node = program.graph.node(id);
    let input = node.inputs[0];
    let readers = program.graph.nodes().filter(|(_, n)| n.inputs.contains(&input)).count();
    if !matches!(node.op, Op::Flatten | Op::Dropout { .. }) || readers != 1 || input == program.output {
        return false;
    }
    let Some(x) = tape.values[input.index()].take() else { return false };
    let mut dims = vec![x.shape()[0]];
    dims.extend(program.shapes.shape(id).dims());
    tape.values[id.index()] = Some(reshape(x, &dims));
    true
}

/// Forward, fused loss and backward on one batch; returns the gradients without applying them.
pub fn gradients_with<T: Real>(
    kernels: &impl Kernels<T>,
    program: &Program,
    params: &[ArrayD<T>],
    input: ArrayD<T>,
    labels: &[u8],
    mode: Mode,
) -> Gradients<T> {
    gradients_profiled(kernels, program, params, input, labels, mode, &mut None)
}

fn gradients_profiled<T: Real>(
    kernels: &impl Kernels<T>,
    program: &Program,
    params: &[ArrayD<T>],
    input: ArrayD<T>,
    labels: &[u8],
    mode: Mode,
    profile: &mut Option<&mut Profile>,
) -> Gradients<T> {
    let loss = program.loss.expect("a program with training steps has a loss");
    let tape = forward_profiled(kernels, program, params, input, mode, program.logits, profile);
    let mut dvalues: Vec<Option<ArrayD<T>>> = vec![None; program.graph.len()];
    let mut result =
        Gradients { loss_sum: 0.0, correct: 0, grads: vec![None; params.len()], moving: Vec::new() };
    for step in &program.steps {
        match *step {
            Step::Forward(_) | Step::Update => {}
            Step::Loss => {
                let z = value(&tape, program.logits).into_dimensionality::<Ix2>().expect("logits are flat");
                let (loss_sum, correct, dz) =
                    Profile::time(profile, Step::Loss, || kernels.loss(program.logits, loss, z, labels));
                result.loss_sum = loss_sum;
                result.correct = correct;
                dvalues[program.logits.index()] = Some(dz.into_dyn());
            }
            Step::Backward(id) => {
                let dy =
                    dvalues[id.index()].take().expect("the gradient of a node is ready before its rule runs");
                Profile::time(profile, *step, || {
                    backward_step(kernels, program, params, &tape, id, dy, &mut dvalues, &mut result.grads)
                });
            }
        }
    }
    if let Mode::Train { .. } = mode {
        result.moving = moving_updates(program, params, &tape);
    }
    result
}

/// Node `id`'s gradient rule (or, at a block's output, the whole block's), from d(`id`).
#[allow(clippy::too_many_arguments)]
fn backward_step<T: Real>(
    kernels: &impl Kernels<T>,
    program: &Program,
    params: &[ArrayD<T>],
    tape: &Tape<T>,
    id: NodeId,
    dy: ArrayD<T>,
    dvalues: &mut [Option<ArrayD<T>>],
    grads: &mut [Option<ArrayD<T>>],
) {
    let Some(block) = program.block_ending_at(id, true) else {
        backward_node(kernels, program, params, tape, id, dy, dvalues, grads);
        return;
    };
    let input = program.graph.node(block.linear).inputs[0];
    let need_dx = program.needs_grad[input.index()];
    let x = value(tape, input);
    match kernels.block_backward(program, block, params, x, tape, dy.view(), need_dx) {
        Some(out) => {
            for (index, grad) in out.grads {
                grads[index] = Some(grad);
            }
            if let Some(dx) = out.dx {
                add_gradient(dvalues, input, dx);
            }
        }
        None => {
            dvalues[id.index()] = Some(dy);
            for id in block.nodes().collect::<Vec<_>>().into_iter().rev() {
                let dy = dvalues[id.index()].take().expect("the block's next node passed it back");
                backward_node(kernels, program, params, tape, id, dy, dvalues, grads);
            }
        }
    }
}

fn value<T: Real>(tape: &Tape<T>, id: NodeId) -> ndarray::ArrayViewD<'_, T> {
    tape.values[id.index()].as_ref().expect("inputs are computed before their consumers").view()
}

/// The window of a conv or pooling node as the ops take it.
pub fn geometry(program: &Program, id: NodeId) -> Geometry {
    let [h, w] = program.shapes.window(id).expect("a window op has a window");
    let Shape::Hwc { h: oh, w: ow, .. } = program.shapes.shape(id) else {
        unreachable!("window ops output HWC")
    };
    Geometry {
        kernel: [h.kernel, w.kernel],
        stride: [h.stride, w.stride],
        pad_before: [h.pad_before, w.pad_before],
        out: [oh, ow],
    }
}

/// Views an (N, …, C) value as (M, C): every axis but the last folded into rows.
fn rows<T: Real>(x: ndarray::ArrayViewD<'_, T>) -> ndarray::ArrayView2<'_, T> {
    let c = *x.shape().last().expect("values have a batch axis");
    let m = x.len() / c.max(1);
    x.into_shape_with_order((m, c)).expect("values are row-major")
}

type NodeOutput<T> = (ArrayD<T>, Option<BatchStats<T>>, Option<ArrayD<T>>);

fn forward_node<T: Real>(
    kernels: &impl Kernels<T>,
    program: &Program,
    params: &[ArrayD<T>],
    tape: &Tape<T>,
    id: NodeId,
    mode: Mode,
) -> NodeOutput<T> {
    let node = program.graph.node(id);
    let x = value(tape, node.inputs[0]);
    let p = |k: usize| params[program.node_params[id.index()][k]].view();
    let output_dims = {
        let mut d = vec![x.shape()[0]];
        d.extend(program.shapes.shape(id).dims());
        d
    };
    match &node.op {
        Op::Input(_) => unreachable!("the input is not computed"),
        Op::Conv2d(conv) => {
            let w = p(0).into_dimensionality::<Ix4>().expect("HWIO kernel");
            let b = conv.bias.then(|| p(1).into_dimensionality::<Ix1>().expect("bias"));
            let x4 = x.into_dimensionality::<Ix4>().expect("NHWC input");
            (kernels.conv2d_forward(id, x4, w, b, &geometry(program, id)).into_dyn(), None, None)
        }
        Op::Dense(dense) => {
            let w = p(0).into_dimensionality::<Ix2>().expect("dense kernel");
            let b = dense.bias.then(|| p(1).into_dimensionality::<Ix1>().expect("bias"));
            let x2 = x.into_dimensionality::<Ix2>().expect("flat input");
            (kernels.dense_forward(id, x2, w, b).into_dyn(), None, None)
        }
        Op::BatchNorm(bn) => {
            let (gamma, beta) =
                (p(0).into_dimensionality::<Ix1>().unwrap(), p(1).into_dimensionality::<Ix1>().unwrap());
            let eps = T::of(f64::from(bn.epsilon));
            match mode {
                Mode::Train { .. } => {
                    let (y, stats) = kernels.batchnorm_forward_train(id, rows(x), gamma, beta, eps);
                    (reshape(y.into_dyn(), &output_dims), Some(stats), None)
                }
                Mode::Infer => {
                    let (mean, var) = (
                        p(2).into_dimensionality::<Ix1>().unwrap(),
                        p(3).into_dimensionality::<Ix1>().unwrap(),
                    );
                    let y = kernels.batchnorm_forward_infer(id, rows(x), [gamma, beta], [mean, var], eps);
                    (reshape(y.into_dyn(), &output_dims), None, None)
                }
            }
        }
        Op::Pool(pool) => {
            let x4 = x.into_dimensionality::<Ix4>().expect("NHWC input");
            let g = geometry(program, id);
            let y = match pool.kind {
                PoolKind::Max => kernels.maxpool_forward(id, x4, &g),
                PoolKind::Avg => kernels.avgpool_forward(id, x4, &g),
            };
            (y.into_dyn(), None, None)
        }
        Op::Activation(Activation::Softmax) => {
            (reshape(kernels.softmax_forward(id, rows(x)).into_dyn(), &output_dims), None, None)
        }
        Op::Activation(act) => (kernels.activation_forward(id, *act, x), None, None),
        Op::Dropout { rate } => match mode {
            Mode::Infer => (x.to_owned(), None, None),
            Mode::Train { seed, step } => {
                let mask = dropout_mask::<T>(x.raw_dim(), *rate, seed, step, id);
                (kernels.dropout_apply(id, x, mask.view()), None, Some(mask))
            }
        },
        Op::Flatten => (reshape(x.to_owned(), &output_dims), None, None),
    }
}

/// The reference's gradient of an element-wise activation.
pub fn activation_gradient<T: Real>(
    act: Activation,
    x: ArrayViewD<T>,
    y: ArrayViewD<T>,
    dy: ArrayViewD<T>,
) -> ArrayD<T> {
    match act {
        Activation::Relu => {
            ndarray::Zip::from(&dy).and(&x).map_collect(|&d, &x| if x > T::zero() { d } else { T::zero() })
        }
        Activation::LeakyRelu { alpha } => {
            let alpha = T::of(f64::from(alpha));
            ndarray::Zip::from(&dy).and(&x).map_collect(|&d, &x| if x > T::zero() { d } else { alpha * d })
        }
        Activation::Sigmoid => ndarray::Zip::from(&dy).and(&y).map_collect(|&d, &y| d * y * (T::one() - y)),
        Activation::Tanh => ndarray::Zip::from(&dy).and(&y).map_collect(|&d, &y| d * (T::one() - y * y)),
        Activation::Softmax => unreachable!("softmax is not element-wise"),
    }
}

/// The reference's element-wise activation.
pub fn activate<T: Real>(act: Activation, v: T) -> T {
    match act {
        Activation::Relu => ops::relu(v),
        Activation::LeakyRelu { alpha } => ops::leaky_relu(v, T::of(f64::from(alpha))),
        Activation::Sigmoid => ops::sigmoid(v),
        Activation::Tanh => v.tanh(),
        Activation::Softmax => unreachable!("softmax is not element-wise"),
    }
}

/// Every stored value and gradient is row-major, so that views can be reshaped freely (a
/// matrix product may return its result in column-major order).
fn row_major<T: Real>(x: ArrayD<T>) -> ArrayD<T> {
    if x.is_standard_layout() { x } else { x.as_standard_layout().into_owned() }
}

fn reshape<T: Real>(x: ArrayD<T>, dims: &[usize]) -> ArrayD<T> {
    row_major(x).into_shape_with_order(IxDyn(dims)).expect("same number of elements")
}

/// Inverted dropout: each element is kept with probability 1 − rate and scaled by 1/(1 − rate).
/// Element i's draw is draw i of the stream (seed, step, node): it depends on nothing else, so
/// the mask is drawn in parallel, in blocks, with one mix per element.
pub fn dropout_mask<T: Real>(dim: IxDyn, rate: f32, seed: u64, step: u64, node: NodeId) -> ArrayD<T> {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 14;
    let stream = Rng::new(seed, &[0xD_4090_u64, step, node.index() as u64]);
    let keep = T::of(1.0 / (1.0 - f64::from(rate)));
    let mut mask = vec![T::zero(); ndarray::Dimension::size(&dim)];
    mask.par_chunks_mut(BLOCK).enumerate().for_each(|(block, out)| {
        for (j, m) in out.iter_mut().enumerate() {
            if stream.nth_f32((block * BLOCK + j) as u64) >= rate {
                *m = keep;
            }
        }
    });
    ArrayD::from_shape_vec(dim, mask).expect("one draw per element")
}

#[allow(clippy::too_many_arguments)]
fn backward_node<T: Real>(
    kernels: &impl Kernels<T>,
    program: &Program,
    params: &[ArrayD<T>],
    tape: &Tape<T>,
    id: NodeId,
    dy: ArrayD<T>,
    dvalues: &mut [Option<ArrayD<T>>],
    grads: &mut [Option<ArrayD<T>>],
) {
    let node = program.graph.node(id);
    let input = node.inputs[0];
    let need_dx = program.needs_grad[input.index()];
    let x = value(tape, input);
    let indices = &program.node_params[id.index()];
    let p = |k: usize| params[indices[k]].view();
    let input_dims = x.shape().to_vec();
    let dx: Option<ArrayD<T>> = match &node.op {
        Op::Input(_) => unreachable!("the input has no gradient rule"),
        Op::Conv2d(conv) => {
            let g = geometry(program, id);
            let w = p(0).into_dimensionality::<Ix4>().unwrap();
            let dy4 = dy.view().into_dimensionality::<Ix4>().unwrap();
            let x4 = x.view().into_dimensionality::<Ix4>().unwrap();
            let kernel_shape: [usize; 4] = w.dim().into();
            let (dw, db) = kernels.conv2d_backward_weights(id, x4, dy4, kernel_shape, &g);
            grads[indices[0]] = Some(dw.into_dyn());
            if conv.bias {
                grads[indices[1]] = Some(db.into_dyn());
            }
            need_dx.then(|| {
                kernels.conv2d_backward_input(id, dy4, w, [input_dims[1], input_dims[2]], &g).into_dyn()
            })
        }
        Op::Dense(dense) => {
            let w = p(0).into_dimensionality::<Ix2>().unwrap();
            let (dx, dw, db) = kernels.dense_backward(
                id,
                x.into_dimensionality::<Ix2>().unwrap(),
                w,
                dy.view().into_dimensionality::<Ix2>().unwrap(),
            );
            grads[indices[0]] = Some(dw.into_dyn());
            if dense.bias {
                grads[indices[1]] = Some(db.into_dyn());
            }
            need_dx.then(|| dx.into_dyn())
        }
        Op::BatchNorm(bn) => {
            let stats = tape.stats[id.index()].as_ref().expect("training forward keeps batch statistics");
            let gamma = p(0).into_dimensionality::<Ix1>().unwrap();
            let eps = T::of(f64::from(bn.epsilon));
            let (dx, dgamma, dbeta) =
                kernels.batchnorm_backward(id, rows(x), rows(dy.view()), gamma, stats, eps);
            grads[indices[0]] = Some(dgamma.into_dyn());
            grads[indices[1]] = Some(dbeta.into_dyn());
            need_dx.then(|| reshape(dx.into_dyn(), &input_dims))
        }
        Op::Pool(pool) => need_dx.then(|| {
            let g = geometry(program, id);
            let dy4 = dy.view().into_dimensionality::<Ix4>().unwrap();
            let x4 = x.into_dimensionality::<Ix4>().unwrap();
            match pool.kind {
                PoolKind::Max => kernels.maxpool_backward(id, x4, dy4, &g).into_dyn(),
                PoolKind::Avg => kernels.avgpool_backward(id, x4.dim().into(), dy4, &g).into_dyn(),
            }
        }),
        Op::Activation(act) => need_dx.then(|| {
            let y = value(tape, id);
            match act {
                Activation::Softmax => {
                    reshape(ops::softmax_backward(rows(y), rows(dy.view())).into_dyn(), &input_dims)
                }
                _ => kernels.activation_backward(id, *act, x, y, dy.view()),
            }
        }),
        Op::Dropout { .. } => need_dx.then(|| {
            let mask = tape.masks[id.index()].as_ref().expect("training forward keeps the mask");
            kernels.dropout_apply(id, dy.view(), mask.view())
        }),
        Op::Flatten => need_dx.then(|| reshape(dy, &input_dims)),
    };
    if let Some(dx) = dx {
        add_gradient(dvalues, input, dx);
    }
}

/// Adds `dx` into the gradient of `input` gathered so far (a value read twice gets both).
fn add_gradient<T: Real>(dvalues: &mut [Option<ArrayD<T>>], input: NodeId, dx: ArrayD<T>) {
    let dx = row_major(dx);
    match &mut dvalues[input.index()] {
        Some(acc) => *acc += &dx,
        slot => *slot = Some(dx),
    }
}

/// The moving statistics each batchnorm node would have after this batch.
fn moving_updates<T: Real>(
    program: &Program,
    params: &[ArrayD<T>],
    tape: &Tape<T>,
) -> Vec<(usize, ArrayD<T>)> {
    let mut updates = Vec::new();
    for (id, node) in program.graph.nodes() {
        let (Op::BatchNorm(bn), Some(stats)) = (&node.op, &tape.stats[id.index()]) else { continue };
        let indices = &program.node_params[id.index()];
        let momentum = T::of(f64::from(bn.momentum));
        for (slot, batch) in [(2, &stats.mean), (3, &stats.var)] {
            let mut moving =
                params[indices[slot]].clone().into_dimensionality::<Ix1>().expect("per-channel statistic");
            ops::update_moving(&mut moving, batch, momentum);
            updates.push((indices[slot], moving.into_dyn()));
        }
    }
    updates
}
