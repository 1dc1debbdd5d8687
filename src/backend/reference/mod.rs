//! The reference backend: interprets a [`Program`] op by op with the plain ndarray loops of
//! [`ops`]. It is the oracle that every faster backend is checked against: correctness over
//! speed. Generic over the float type so that whole-model gradients can be checked in f64.
//!
//! The interpreter runs a pass in an [`Arena`] laid out by the memory plan
//! ([`crate::memory`]): every value, gradient and tape entry is a planned buffer, and kernels
//! write their results into the buffers they are given. The reference's kernels compute with
//! [`ops`], which allocate, and copy their results in; the JIT's write in place and take their
//! temporaries from the step's planned scratch, so its training step allocates nothing.

pub mod ops;

use std::sync::Arc;

use ndarray::{
    ArrayD, ArrayRef, ArrayView1, ArrayView2, ArrayView4, ArrayViewD, ArrayViewMut1, ArrayViewMut2,
    ArrayViewMut4, ArrayViewMutD, Ix1, Ix2, Ix4, IxDyn,
};

use super::arena::{Arena, Open, Scratch};
use super::{Backend, StepResult};
use crate::autodiff::{Program, Step};
use crate::ir::fuse::Block;
use crate::ir::train::{Loss, Optimizer};
use crate::ir::{Activation, NodeId, Op, PoolKind, Shape};
use crate::memory::{self, Buffer, Pass, Plan, StepNeeds};
use crate::rng::Rng;
use crate::train::optimizer;
use crate::train::state::State;
use ops::{BatchStats, Geometry, Real};

/// The compute-heavy ops, by node: the reference computes them with [`ops`]; a faster backend
/// supplies its own (compiled for that node's shapes) and inherits everything else from the
/// interpreter, so both run the same program the same way.
///
/// Every kernel writes its results into the views it is given (all of each, unless it says
/// otherwise) and takes any temporaries from `s`: what [`Kernels::scratch`] said its step needs.
/// [`KernelsExt`] has the same kernels returning new arrays, for callers outside a pass.
#[allow(clippy::too_many_arguments)]
pub trait Kernels<T: Real>: Sync {
    /// What was compiled, and how long it took, for the log.
    fn compile_report(&self) -> Option<String> {
        None
    }

    /// Whether this backend runs `block` as one unit in `pass` ([`Kernels::block_forward_into`]
    /// and [`Kernels::block_backward_into`]); otherwise the interpreter runs its nodes one by one.
    fn fuses(&self, _block: &Block, _pass: Pass) -> bool {
        false
    }

    /// Elements of scratch the kernels of `step` take for a batch of `n` (on the current rayon
    /// thread count), at most.
    fn scratch(&self, _program: &Program, _step: Step, _pass: Pass, _n: usize) -> usize {
        0
    }

    fn conv2d_forward_into(
        &self,
        _node: NodeId,
        x: ArrayView4<T>,
        w: ArrayView4<T>,
        b: Option<ArrayView1<T>>,
        g: &Geometry,
        mut y: ArrayViewMut4<T>,
        _s: &mut Scratch<T>,
    ) {
        y.assign(&ops::conv2d_forward(x, w, b, g));
    }

    fn conv2d_backward_input_into(
        &self,
        _node: NodeId,
        dy: ArrayView4<T>,
        w: ArrayView4<T>,
        g: &Geometry,
        mut dx: ArrayViewMut4<T>,
        _s: &mut Scratch<T>,
    ) {
        let (_, h, width, _) = dx.dim();
        dx.assign(&ops::conv2d_backward_input(dy, w, [h, width], g));
    }

    /// dw, and db when the layer has a bias.
    fn conv2d_backward_weights_into(
        &self,
        _node: NodeId,
        x: ArrayView4<T>,
        dy: ArrayView4<T>,
        g: &Geometry,
        mut dw: ArrayViewMut4<T>,
        db: Option<ArrayViewMut1<T>>,
        _s: &mut Scratch<T>,
    ) {
        let (w, b) = ops::conv2d_backward_weights(x, dy, dw.dim().into(), g);
        dw.assign(&w);
        if let Some(mut db) = db {
            db.assign(&b);
        }
    }

    fn dense_forward_into(
        &self,
        _node: NodeId,
        x: ArrayView2<T>,
        w: ArrayView2<T>,
        b: Option<ArrayView1<T>>,
        mut y: ArrayViewMut2<T>,
        _s: &mut Scratch<T>,
    ) {
        y.assign(&ops::dense_forward(x, w, b));
    }

    /// dx (when asked for), dw, and db when the layer has a bias.
    fn dense_backward_into(
        &self,
        _node: NodeId,
        x: ArrayView2<T>,
        w: ArrayView2<T>,
        dy: ArrayView2<T>,
        dx: Option<ArrayViewMut2<T>>,
        mut dw: ArrayViewMut2<T>,
        db: Option<ArrayViewMut1<T>>,
        _s: &mut Scratch<T>,
    ) {
        let (x_grad, w_grad, b_grad) = ops::dense_backward(x, w, dy);
        dw.assign(&w_grad);
        if let Some(mut dx) = dx {
            dx.assign(&x_grad);
        }
        if let Some(mut db) = db {
            db.assign(&b_grad);
        }
    }

    fn maxpool_forward_into(
        &self,
        _node: NodeId,
        x: ArrayView4<T>,
        g: &Geometry,
        mut y: ArrayViewMut4<T>,
        _s: &mut Scratch<T>,
    ) {
        y.assign(&ops::maxpool_forward(x, g));
    }

    fn maxpool_backward_into(
        &self,
        _node: NodeId,
        x: ArrayView4<T>,
        dy: ArrayView4<T>,
        g: &Geometry,
        mut dx: ArrayViewMut4<T>,
        _s: &mut Scratch<T>,
    ) {
        dx.assign(&ops::maxpool_backward(x, dy, g));
    }

    /// Average pooling over the real pixels of each window.
    fn avgpool_forward_into(
        &self,
        _node: NodeId,
        x: ArrayView4<T>,
        g: &Geometry,
        mut y: ArrayViewMut4<T>,
        _s: &mut Scratch<T>,
    ) {
        y.assign(&ops::avgpool_forward(x, g));
    }

    fn avgpool_backward_into(
        &self,
        _node: NodeId,
        dy: ArrayView4<T>,
        g: &Geometry,
        mut dx: ArrayViewMut4<T>,
        _s: &mut Scratch<T>,
    ) {
        let grad = ops::avgpool_backward(dx.dim().into(), dy, g);
        dx.assign(&grad);
    }

    /// An element-wise activation (not softmax).
    fn activation_forward_into(
        &self,
        _node: NodeId,
        act: Activation,
        x: ArrayViewD<T>,
        mut y: ArrayViewMutD<T>,
        _s: &mut Scratch<T>,
    ) {
        y.zip_mut_with(&x, |y, &x| *y = activate(act, x));
    }

    /// The gradient of an element-wise activation (not softmax), from its input x and output y.
    fn activation_backward_into(
        &self,
        _node: NodeId,
        act: Activation,
        x: ArrayViewD<T>,
        y: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        mut dx: ArrayViewMutD<T>,
        _s: &mut Scratch<T>,
    ) {
        dx.assign(&activation_gradient(act, x, y, dy));
    }

    /// Batchnorm in training over (rows, channels): the output and the batch statistics
    /// (`stats`: C means, then C variances).
    fn batchnorm_forward_train_into(
        &self,
        _node: NodeId,
        x: ArrayView2<T>,
        [gamma, beta]: [ArrayView1<T>; 2],
        epsilon: T,
        mut y: ArrayViewMut2<T>,
        stats: ArrayViewMut1<T>,
        _s: &mut Scratch<T>,
    ) {
        let (out, batch) = ops::batchnorm_forward_train(x, gamma, beta, epsilon);
        y.assign(&out);
        write_stats(stats, &batch);
    }

    /// Batchnorm at inference, with the moving statistics `[mean, variance]`.
    fn batchnorm_forward_infer_into(
        &self,
        _node: NodeId,
        x: ArrayView2<T>,
        [gamma, beta]: [ArrayView1<T>; 2],
        [mean, var]: [ArrayView1<T>; 2],
        epsilon: T,
        mut y: ArrayViewMut2<T>,
        _s: &mut Scratch<T>,
    ) {
        y.assign(&ops::batchnorm_forward_infer(x, gamma, beta, mean, var, epsilon));
    }

    /// dx (when asked for), dgamma and dbeta, from the batch statistics `stats`.
    fn batchnorm_backward_into(
        &self,
        _node: NodeId,
        x: ArrayView2<T>,
        dy: ArrayView2<T>,
        gamma: ArrayView1<T>,
        stats: ArrayView1<T>,
        epsilon: T,
        dx: Option<ArrayViewMut2<T>>,
        [mut dgamma, mut dbeta]: [ArrayViewMut1<T>; 2],
        _s: &mut Scratch<T>,
    ) {
        let (x_grad, g, b) = ops::batchnorm_backward(x, dy, gamma, &read_stats(stats), epsilon);
        if let Some(mut dx) = dx {
            dx.assign(&x_grad);
        }
        dgamma.assign(&g);
        dbeta.assign(&b);
    }

    /// A fused block's forward pass as one unit; called only when [`Kernels::fuses`] says so.
    fn block_forward_into(
        &self,
        _program: &Program,
        _block: &Block,
        _params: &[ArrayD<T>],
        _x: ArrayViewD<T>,
        _mode: Mode,
        _out: BlockOut<'_, T>,
        _s: &mut Scratch<T>,
    ) {
        unreachable!("a backend that fuses blocks runs them")
    }

    /// Whether this backend runs fused block `first` inside the step of `second` at inference
    /// ([`crate::memory::StepNeeds::pairs`]), by [`Kernels::block_pair_forward_into`].
    fn pairs(&self, _first: &Block, _second: &Block) -> bool {
        false
    }

    /// At inference, fused blocks `first` and `second` (which reads only `first`'s value) as
    /// one step, sample by sample; called only when [`Kernels::pairs`] says so. `x` is
    /// `first`'s input, `values` the two blocks' values.
    fn block_pair_forward_into(
        &self,
        _program: &Program,
        _blocks: [&Block; 2],
        _params: &[ArrayD<T>],
        _x: ArrayViewD<T>,
        _values: [ArrayViewMutD<'_, T>; 2],
        _s: &mut Scratch<T>,
    ) {
        unreachable!("a backend that pairs blocks runs them")
    }

    /// A fused block's backward pass from d(block value) `dz`, with what its forward pass kept.
    fn block_backward_into(
        &self,
        _program: &Program,
        _block: &Block,
        _params: &[ArrayD<T>],
        _x: ArrayViewD<T>,
        _tape: BlockTape<'_, T>,
        _dz: ArrayViewD<T>,
        _grads: BlockGrads<'_, T>,
        _s: &mut Scratch<T>,
    ) {
        unreachable!("a backend that fuses blocks runs them")
    }

    /// Whether this backend runs the max pool after fused block `block` inside the block's
    /// steps in training ([`crate::memory::StepNeeds::takes_pool`]): its
    /// [`Kernels::block_forward_into`] then writes the pool's value into `out.value` (the
    /// block's own is never kept), and [`Kernels::block_pool_backward_into`] takes the block's
    /// backward pass.
    fn takes_pool(&self, _block: &Block) -> bool {
        false
    }

    /// [`Kernels::block_backward_into`] with the backward pass of the max pool that follows the
    /// block (`block.pool`) before it, from d(pool value) `dp`; `tape.value` is the pool's
    /// value. Called only when [`Kernels::takes_pool`] says so.
    fn block_pool_backward_into(
        &self,
        _program: &Program,
        _block: &Block,
        _params: &[ArrayD<T>],
        _x: ArrayViewD<T>,
        _tape: BlockTape<'_, T>,
        _dp: ArrayViewD<T>,
        _grads: BlockGrads<'_, T>,
        _s: &mut Scratch<T>,
    ) {
        unreachable!("a backend that takes a pool's backward pass runs it")
    }

    /// Softmax over the last axis, on its own (the output at inference).
    fn softmax_forward_into(
        &self,
        _node: NodeId,
        x: ArrayView2<T>,
        mut y: ArrayViewMut2<T>,
        _s: &mut Scratch<T>,
    ) {
        y.assign(&ops::softmax_forward(x));
    }

    /// The output activation fused with its cross-entropy, on the logits z (N,K) of node
    /// `node`: d(logits) into `dz`; returns (Σ loss, correct).
    fn loss_into(
        &self,
        _node: NodeId,
        loss: Loss,
        z: ArrayView2<T>,
        labels: &[u8],
        mut dz: ArrayViewMut2<T>,
        _s: &mut Scratch<T>,
    ) -> (f64, usize) {
        let (sum, correct, grad) = match loss {
            Loss::CategoricalCrossentropy | Loss::SparseCategoricalCrossentropy => {
                ops::softmax_cross_entropy(z, labels)
            }
            Loss::BinaryCrossentropy => ops::sigmoid_binary_cross_entropy(z, labels),
        };
        dz.assign(&grad);
        (sum, correct)
    }

    /// Dropout's training forward: the mask of `stream` ([`dropout_mask_from`]) into `mask`,
    /// then y = x·mask.
    fn dropout_forward_into(
        &self,
        node: NodeId,
        x: ArrayViewD<T>,
        stream: &Rng,
        rate: f32,
        [mut mask, y]: [ArrayViewMutD<T>; 2],
        s: &mut Scratch<T>,
    ) {
        dropout_mask_from(mask.as_slice_mut().expect("contiguous"), rate, stream);
        self.dropout_apply_into(node, x, mask.view(), y, s);
    }

    /// A dropout mask applied: y = x·mask forward, dx = dy·mask backward.
    fn dropout_apply_into(
        &self,
        _node: NodeId,
        x: ArrayViewD<T>,
        mask: ArrayViewD<T>,
        mut y: ArrayViewMutD<T>,
        _s: &mut Scratch<T>,
    ) {
        ndarray::Zip::from(&mut y).and(&x).and(&mask).for_each(|y, &x, &m| *y = x * m);
    }

    /// One optimizer step on parameter `index` (training runs in f32).
    fn optimizer_update(
        &self,
        _index: usize,
        optimizer: &Optimizer,
        param: &mut ArrayD<f32>,
        grad: &ArrayRef<f32, IxDyn>,
        slots: &mut [ArrayD<f32>],
        iteration: u64,
    ) {
        optimizer::update(optimizer, param, grad, slots, iteration)
    }
}

/// Where a fused block's forward pass writes.
pub struct BlockOut<'a, T> {
    /// The block's value (its output node's; at inference, its pool's when it has one).
    pub value: ArrayViewMutD<'a, T>,
    /// The linear node's output, kept for the backward pass of a block that normalizes.
    pub linear: Option<ArrayViewMutD<'a, T>>,
    /// The batch statistics of the block's batchnorm, in training (C means, C variances).
    pub stats: Option<ArrayViewMut1<'a, T>>,
}

/// What a fused block's backward pass reads of its forward pass.
pub struct BlockTape<'a, T> {
    pub value: ArrayViewD<'a, T>,
    pub linear: Option<ArrayViewD<'a, T>>,
    pub stats: Option<ArrayView1<'a, T>>,
}

/// Where a fused block's backward pass writes.
pub struct BlockGrads<'a, T> {
    /// d(block input), when asked for.
    pub dx: Option<ArrayViewMutD<'a, T>>,
    /// The linear node's kernel, in the parameter's shape.
    pub dw: ArrayViewMutD<'a, T>,
    pub db: Option<ArrayViewMut1<'a, T>>,
    /// The batchnorm's dgamma and dbeta.
    pub norm: Option<[ArrayViewMut1<'a, T>; 2]>,
}

/// Batch statistics into a buffer of C means then C variances.
fn write_stats<T: Real>(mut out: ArrayViewMut1<T>, stats: &BatchStats<T>) {
    let c = stats.mean.len();
    out.slice_mut(ndarray::s![..c]).assign(&stats.mean);
    out.slice_mut(ndarray::s![c..]).assign(&stats.var);
}

/// Batch statistics from a buffer of C means then C variances.
pub fn read_stats<T: Real>(stats: ArrayView1<T>) -> BatchStats<T> {
    let c = stats.len() / 2;
    BatchStats {
        mean: stats.slice(ndarray::s![..c]).to_owned(),
        var: stats.slice(ndarray::s![c..]).to_owned(),
    }
}

/// The kernels returning new arrays, for callers outside a planned pass (tests, tools): each
/// allocates its outputs and any scratch.
pub trait KernelsExt<T: Real>: Kernels<T> {
    fn conv2d_forward(
        &self,
        node: NodeId,
        x: ArrayView4<T>,
        w: ArrayView4<T>,
        b: Option<ArrayView1<T>>,
        g: &Geometry,
    ) -> ndarray::Array4<T> {
        let mut y = ndarray::Array4::zeros((x.dim().0, g.out[0], g.out[1], w.dim().3));
        self.conv2d_forward_into(node, x, w, b, g, y.view_mut(), &mut Scratch::heap(&Default::default()));
        y
    }

    fn conv2d_backward_input(
        &self,
        node: NodeId,
        dy: ArrayView4<T>,
        w: ArrayView4<T>,
        input_hw: [usize; 2],
        g: &Geometry,
    ) -> ndarray::Array4<T> {
        let mut dx = ndarray::Array4::zeros((dy.dim().0, input_hw[0], input_hw[1], w.dim().2));
        self.conv2d_backward_input_into(
            node,
            dy,
            w,
            g,
            dx.view_mut(),
            &mut Scratch::heap(&Default::default()),
        );
        dx
    }

    fn conv2d_backward_weights(
        &self,
        node: NodeId,
        x: ArrayView4<T>,
        dy: ArrayView4<T>,
        kernel_shape: [usize; 4],
        g: &Geometry,
    ) -> (ndarray::Array4<T>, ndarray::Array1<T>) {
        let mut dw = ndarray::Array4::zeros(kernel_shape);
        let mut db = ndarray::Array1::zeros(kernel_shape[3]);
        let heap = Default::default();
        self.conv2d_backward_weights_into(
            node,
            x,
            dy,
            g,
            dw.view_mut(),
            Some(db.view_mut()),
            &mut Scratch::heap(&heap),
        );
        (dw, db)
    }

    fn maxpool_forward(&self, node: NodeId, x: ArrayView4<T>, g: &Geometry) -> ndarray::Array4<T> {
        let mut y = ndarray::Array4::zeros((x.dim().0, g.out[0], g.out[1], x.dim().3));
        self.maxpool_forward_into(node, x, g, y.view_mut(), &mut Scratch::heap(&Default::default()));
        y
    }

    fn maxpool_backward(
        &self,
        node: NodeId,
        x: ArrayView4<T>,
        dy: ArrayView4<T>,
        g: &Geometry,
    ) -> ndarray::Array4<T> {
        let mut dx = ndarray::Array4::zeros(x.raw_dim());
        self.maxpool_backward_into(node, x, dy, g, dx.view_mut(), &mut Scratch::heap(&Default::default()));
        dx
    }

    fn avgpool_forward(&self, node: NodeId, x: ArrayView4<T>, g: &Geometry) -> ndarray::Array4<T> {
        let mut y = ndarray::Array4::zeros((x.dim().0, g.out[0], g.out[1], x.dim().3));
        self.avgpool_forward_into(node, x, g, y.view_mut(), &mut Scratch::heap(&Default::default()));
        y
    }

    fn avgpool_backward(
        &self,
        node: NodeId,
        input_shape: [usize; 4],
        dy: ArrayView4<T>,
        g: &Geometry,
    ) -> ndarray::Array4<T> {
        let mut dx = ndarray::Array4::zeros(input_shape);
        self.avgpool_backward_into(node, dy, g, dx.view_mut(), &mut Scratch::heap(&Default::default()));
        dx
    }

    fn activation_forward(&self, node: NodeId, act: Activation, x: ArrayViewD<T>) -> ArrayD<T> {
        let mut y = ArrayD::zeros(x.raw_dim());
        self.activation_forward_into(node, act, x, y.view_mut(), &mut Scratch::heap(&Default::default()));
        y
    }

    fn activation_backward(
        &self,
        node: NodeId,
        act: Activation,
        x: ArrayViewD<T>,
        y: ArrayViewD<T>,
        dy: ArrayViewD<T>,
    ) -> ArrayD<T> {
        let mut dx = ArrayD::zeros(x.raw_dim());
        self.activation_backward_into(
            node,
            act,
            x,
            y,
            dy,
            dx.view_mut(),
            &mut Scratch::heap(&Default::default()),
        );
        dx
    }

    fn batchnorm_forward_train(
        &self,
        node: NodeId,
        x: ArrayView2<T>,
        gamma: ArrayView1<T>,
        beta: ArrayView1<T>,
        epsilon: T,
    ) -> (ndarray::Array2<T>, BatchStats<T>) {
        let mut y = ndarray::Array2::zeros(x.raw_dim());
        let mut stats = ndarray::Array1::zeros(2 * x.dim().1);
        let heap = Default::default();
        self.batchnorm_forward_train_into(
            node,
            x,
            [gamma, beta],
            epsilon,
            y.view_mut(),
            stats.view_mut(),
            &mut Scratch::heap(&heap),
        );
        (y, read_stats(stats.view()))
    }

    fn batchnorm_forward_infer(
        &self,
        node: NodeId,
        x: ArrayView2<T>,
        affine: [ArrayView1<T>; 2],
        moving: [ArrayView1<T>; 2],
        epsilon: T,
    ) -> ndarray::Array2<T> {
        let mut y = ndarray::Array2::zeros(x.raw_dim());
        let heap = Default::default();
        self.batchnorm_forward_infer_into(
            node,
            x,
            affine,
            moving,
            epsilon,
            y.view_mut(),
            &mut Scratch::heap(&heap),
        );
        y
    }

    /// (dx, dgamma, dbeta)
    fn batchnorm_backward(
        &self,
        node: NodeId,
        x: ArrayView2<T>,
        dy: ArrayView2<T>,
        gamma: ArrayView1<T>,
        stats: &BatchStats<T>,
        epsilon: T,
    ) -> (ndarray::Array2<T>, ndarray::Array1<T>, ndarray::Array1<T>) {
        let c = x.dim().1;
        let mut dx = ndarray::Array2::zeros(x.raw_dim());
        let (mut dgamma, mut dbeta) = (ndarray::Array1::zeros(c), ndarray::Array1::zeros(c));
        let mut packed = ndarray::Array1::zeros(2 * c);
        write_stats(packed.view_mut(), stats);
        let heap = Default::default();
        self.batchnorm_backward_into(
            node,
            x,
            dy,
            gamma,
            packed.view(),
            epsilon,
            Some(dx.view_mut()),
            [dgamma.view_mut(), dbeta.view_mut()],
            &mut Scratch::heap(&heap),
        );
        (dx, dgamma, dbeta)
    }

    fn softmax_forward(&self, node: NodeId, x: ArrayView2<T>) -> ndarray::Array2<T> {
        let mut y = ndarray::Array2::zeros(x.raw_dim());
        self.softmax_forward_into(node, x, y.view_mut(), &mut Scratch::heap(&Default::default()));
        y
    }

    /// (Σ loss, correct, dz)
    fn loss(
        &self,
        node: NodeId,
        loss: Loss,
        z: ArrayView2<T>,
        labels: &[u8],
    ) -> (f64, usize, ndarray::Array2<T>) {
        let mut dz = ndarray::Array2::zeros(z.raw_dim());
        let (sum, correct) =
            self.loss_into(node, loss, z, labels, dz.view_mut(), &mut Scratch::heap(&Default::default()));
        (sum, correct, dz)
    }

    /// (mask, y)
    fn dropout_forward(
        &self,
        node: NodeId,
        x: ArrayViewD<T>,
        stream: &Rng,
        rate: f32,
    ) -> (ArrayD<T>, ArrayD<T>) {
        let (mut mask, mut y) = (ArrayD::zeros(x.raw_dim()), ArrayD::zeros(x.raw_dim()));
        let heap = Default::default();
        self.dropout_forward_into(
            node,
            x,
            stream,
            rate,
            [mask.view_mut(), y.view_mut()],
            &mut Scratch::heap(&heap),
        );
        (mask, y)
    }

    fn dropout_apply(&self, node: NodeId, x: ArrayViewD<T>, mask: ArrayViewD<T>) -> ArrayD<T> {
        let mut y = ArrayD::zeros(x.raw_dim());
        self.dropout_apply_into(node, x, mask, y.view_mut(), &mut Scratch::heap(&Default::default()));
        y
    }
}

impl<T: Real, K: Kernels<T> + ?Sized> KernelsExt<T> for K {}

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

impl Mode {
    fn pass(self) -> Pass {
        match self {
            Mode::Train { .. } => Pass::Train,
            Mode::Infer => Pass::Infer,
        }
    }
}

/// Every node's value from one forward pass, and the batch statistics of its batchnorms.
#[derive(Debug, Clone)]
pub struct Tape<T> {
    pub values: Vec<Option<ArrayD<T>>>,
    pub stats: Vec<Option<BatchStats<T>>>,
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
    /// The arenas of the training step and of inference, planned for the largest batch seen.
    arenas: [Option<Arena<f32>>; 2],
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

/// The kernels' answers to the memory planner.
struct Needs<'k, K, T>(&'k K, std::marker::PhantomData<T>);

impl<T: Real, K: Kernels<T>> StepNeeds for Needs<'_, K, T> {
    fn fuses(&self, block: &Block, pass: Pass) -> bool {
        self.0.fuses(block, pass)
    }

    fn scratch(&self, program: &Program, step: Step, pass: Pass, n: usize) -> usize {
        self.0.scratch(program, step, pass, n)
    }

    fn pairs(&self, first: &Block, second: &Block) -> bool {
        self.0.pairs(first, second)
    }

    fn takes_pool(&self, block: &Block) -> bool {
        self.0.takes_pool(block)
    }
}

/// The memory plan `kernels` run `pass` of `program` in, for batches of up to `batch`.
pub fn plan<T: Real>(
    kernels: &impl Kernels<T>,
    program: &Program,
    pass: Pass,
    batch: usize,
    reuse: bool,
) -> Plan {
    Plan::new(program, pass, batch, &Needs(kernels, std::marker::PhantomData::<T>), reuse)
}

/// The arena in `slot` for a batch of `n`: planned again (once) when the batch is larger than
/// any before or the thread count changed, else the one of the last pass.
fn arena_for<'s>(
    slot: &'s mut Option<Arena<f32>>,
    kernels: &impl Kernels<f32>,
    program: &Program,
    pass: Pass,
    n: usize,
) -> &'s mut Arena<f32> {
    if !slot.as_ref().is_some_and(|a| a.fits(n)) {
        let batch = slot.as_ref().map_or(n, |a| a.plan.batch.max(n));
        *slot = Some(Arena::new(plan(kernels, program, pass, batch, true), rayon::current_num_threads()));
    }
    slot.as_mut().expect("planned above")
}

impl<K: Kernels<f32>> Interpreter<K> {
    pub fn with_kernels(name: &'static str, program: Arc<Program>, optimizer: Optimizer, kernels: K) -> Self {
        Interpreter { program, optimizer, kernels, name, profile: None, arenas: [None, None] }
    }

    /// The memory plan of `pass` for batches of `batch` (what `cnnc summary` reports).
    pub fn plan(&self, pass: Pass, batch: usize) -> Plan {
        plan(&self.kernels, &self.program, pass, batch, true)
    }

    /// The plan of the arena that `pass` ran in last, if it ran.
    pub fn arena_plan(&self, pass: Pass) -> Option<&Plan> {
        self.arenas[usize::from(pass == Pass::Infer)].as_ref().map(|a| &a.plan)
    }
}

impl<K: Kernels<f32>> Backend for Interpreter<K> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn compile_report(&self) -> Option<String> {
        self.kernels.compile_report()
    }

    fn memory_plan(&self, pass: Pass, batch: usize) -> Option<Plan> {
        Some(self.plan(pass, batch))
    }

    fn train_step(&mut self, state: &mut State, images: &[f32], labels: &[u8], step: u64) -> StepResult {
        let program = Arc::clone(&self.program);
        let n = images.len() / program.shapes.shape(program.graph.input()).numel();
        let mode = Mode::Train { seed: state.seed, step };
        let mut profile = self.profile.take();
        let kernels = &self.kernels;
        let arena = arena_for(&mut self.arenas[0], kernels, &program, Pass::Train, n);
        let (loss_sum, correct) = {
            let run = Run {
                kernels,
                program: &program,
                params: &state.params,
                arena: arena.open(&program),
                n,
                mode,
            };
            run.input(images);
            run.train(labels, &mut profile.as_mut())
        };
        let arena = arena.open(&program);
        let last = arena.plan().steps.len() - 1;
        // The moving statistics, then the optimizer step on every parameter with a gradient.
        for_each_moving(&program, &arena, last, |index, batch, momentum| {
            let moving = state.params[index].view_mut().into_dimensionality::<Ix1>().expect("per channel");
            ops::update_moving(moving, batch, momentum);
        });
        state.iterations += 1;
        let optimizer = &self.optimizer;
        Profile::time(&mut profile.as_mut(), Step::Update, || {
            for (index, p) in program.params.iter().enumerate() {
                if !p.spec.trainable {
                    continue;
                }
                // SAFETY: as above.
                let grad = unsafe { arena.view(Buffer::ParamGrad(index), last, IxDyn(&p.spec.shape)) };
                let (param, slots) = (&mut state.params[index], &mut state.slots[index]);
                kernels.optimizer_update(index, optimizer, param, &grad, slots, state.iterations);
            }
        });
        self.profile = profile;
        StepResult { loss_sum, correct }
    }

    fn predict(&mut self, state: &State, images: &[f32]) -> Vec<f32> {
        let program = Arc::clone(&self.program);
        let n = images.len() / program.shapes.shape(program.graph.input()).numel();
        let mut profile = self.profile.take();
        let kernels = &self.kernels;
        let arena = arena_for(&mut self.arenas[1], kernels, &program, Pass::Infer, n).open(&program);
        let run = Run { kernels, program: &program, params: &state.params, arena, n, mode: Mode::Infer };
        run.input(images);
        run.forward(&mut profile.as_mut());
        self.profile = profile;
        let last = run.arena.plan().steps.len().saturating_sub(1);
        // SAFETY: the pass is over; this is the only view.
        let out = unsafe { run.arena.view(Buffer::Value(program.output), last, run.dims(program.output)) };
        out.iter().copied().collect()
    }
}
/// The dims of batchnorm `id`'s statistics buffer: C means, then C variances.
fn stats_dims(program: &Program, id: NodeId) -> IxDyn {
    IxDyn(&[2 * program.shapes.shape(id).channels()])
}

/// For each batchnorm of the training step, in order, each of its moving statistics: `f(its
/// parameter index, the batch's value of it, the momentum)`, from the statistics the step left
/// in the arena (read at step `last`, the update).
fn for_each_moving<T: Real>(
    program: &Program,
    arena: &Open<'_, T>,
    last: usize,
    mut f: impl FnMut(usize, ArrayView1<'_, T>, f32),
) {
    for (id, node) in program.graph.nodes() {
        let (Op::BatchNorm(bn), true) = (&node.op, id <= program.logits) else { continue };
        // SAFETY: the update step only reads the statistics and the gradients.
        let stats = unsafe { arena.view(Buffer::Stats(id), last, stats_dims(program, id)) };
        let stats = stats.into_dimensionality::<Ix1>().expect("per channel");
        let c = stats.len() / 2;
        let indices = &program.node_params[id.index()];
        for (slot, half) in [(2, 0), (3, 1)] {
            f(indices[slot], stats.slice(ndarray::s![half * c..(half + 1) * c]), bn.momentum);
        }
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

/// Runs the forward pass (of `mode`: training's stops at the logits) and returns every value
/// up to and including `last`: the pass runs in an arena that keeps every buffer (nothing shared).
pub fn forward_with<T: Real>(
    kernels: &impl Kernels<T>,
    program: &Program,
    params: &[ArrayD<T>],
    input: ArrayD<T>,
    mode: Mode,
    last: NodeId,
) -> Tape<T> {
    let n = input.shape()[0];
    let mut arena = Arena::new(plan(kernels, program, mode.pass(), n, false), rayon::current_num_threads());
    let run = Run { kernels, program, params, arena: arena.open(program), n, mode };
    run.input(input.as_standard_layout().as_slice().expect("row-major"));
    run.forward_until(last, &mut None);
    let end = run.arena.plan().steps.len().saturating_sub(1);
    let mut tape = Tape { values: vec![None; program.graph.len()], stats: vec![None; program.graph.len()] };
    for (id, _) in program.graph.nodes() {
        if id > last || run.arena.plan().get(program, Buffer::Value(id)).is_none() {
            continue;
        }
        // SAFETY: the pass is over; views are only read.
        tape.values[id.index()] =
            Some(unsafe { run.arena.view(Buffer::Value(id), end, run.dims(id)) }.to_owned());
        if run.arena.plan().get(program, Buffer::Stats(id)).is_some() {
            let dims = stats_dims(program, id);
            // SAFETY: as above.
            let stats = unsafe { run.arena.view(Buffer::Stats(id), end, dims) };
            tape.stats[id.index()] =
                Some(read_stats(stats.into_dimensionality::<Ix1>().expect("per channel")));
        }
    }
    tape
}

/// Forward, fused loss and backward on one batch; returns the gradients without applying them.
/// Runs in the arena that training uses (buffers shared as planned).
pub fn gradients_with<T: Real>(
    kernels: &impl Kernels<T>,
    program: &Program,
    params: &[ArrayD<T>],
    input: ArrayD<T>,
    labels: &[u8],
    mode: Mode,
) -> Gradients<T> {
    gradients_planned(kernels, program, params, input, labels, mode, true)
}

/// [`gradients_with`], in an arena that shares buffers (`reuse`) or keeps each apart.
pub fn gradients_planned<T: Real>(
    kernels: &impl Kernels<T>,
    program: &Program,
    params: &[ArrayD<T>],
    input: ArrayD<T>,
    labels: &[u8],
    mode: Mode,
    reuse: bool,
) -> Gradients<T> {
    let n = input.shape()[0];
    let mut arena = Arena::new(plan(kernels, program, Pass::Train, n, reuse), rayon::current_num_threads());
    let run = Run { kernels, program, params, arena: arena.open(program), n, mode };
    run.input(input.as_standard_layout().as_slice().expect("row-major"));
    let (loss_sum, correct) = run.train(labels, &mut None);
    let last = run.arena.plan().steps.len() - 1;
    let mut result = Gradients { loss_sum, correct, grads: vec![None; params.len()], moving: Vec::new() };
    for (index, p) in program.params.iter().enumerate() {
        if p.spec.trainable {
            // SAFETY: the pass is over; views are only read.
            let grad = unsafe { run.arena.view(Buffer::ParamGrad(index), last, IxDyn(&p.spec.shape)) };
            result.grads[index] = Some(grad.to_owned());
        }
    }
    for_each_moving(program, &run.arena, last, |index, batch, momentum| {
        let mut moving = params[index].clone().into_dimensionality::<Ix1>().expect("per channel");
        ops::update_moving(moving.view_mut(), batch, T::of(f64::from(momentum)));
        result.moving.push((index, moving.into_dyn()));
    });
    result
}

/// One pass of a program in an open arena.
struct Run<'a, K, T> {
    kernels: &'a K,
    program: &'a Program,
    params: &'a [ArrayD<T>],
    arena: Open<'a, T>,
    n: usize,
    mode: Mode,
}

impl<'a, T: Real, K: Kernels<T>> Run<'a, K, T> {
    /// Node `id`'s value's dims for this batch (no allocation: four axes at most).
    fn dims(&self, id: NodeId) -> IxDyn {
        match self.program.shapes.shape(id) {
            Shape::Hwc { h, w, c } => IxDyn(&[self.n, h, w, c]),
            Shape::Flat(k) => IxDyn(&[self.n, k]),
        }
    }

    fn value(&self, id: NodeId, t: usize) -> ArrayViewD<'a, T> {
        // SAFETY: a step reads its inputs and writes other buffers (the plan keeps buffers live
        // at the same step apart); no step takes a mutable view of a value it reads.
        unsafe { self.arena.view(Buffer::Value(id), t, self.dims(id)) }
    }

    /// A buffer the step at `t` writes.
    fn out(&self, buffer: Buffer, t: usize, dims: IxDyn) -> ArrayViewMutD<'a, T> {
        // SAFETY: each step takes one mutable view of each buffer it writes and reads none of
        // them while it does.
        unsafe { self.arena.view_mut(buffer, t, dims) }
    }

    fn param(&self, id: NodeId, k: usize) -> ArrayViewD<'a, T> {
        self.params[self.program.node_params[id.index()][k]].view()
    }

    fn param_grad(&self, id: NodeId, k: usize, t: usize) -> ArrayViewMutD<'a, T> {
        let index = self.program.node_params[id.index()][k];
        self.out(Buffer::ParamGrad(index), t, IxDyn(&self.program.params[index].spec.shape))
    }

    /// The batch into the input's buffer.
    fn input(&self, images: &[T]) {
        let input = self.program.graph.input();
        let mut x = self.out(Buffer::Value(input), 0, self.dims(input));
        x.as_slice_mut().expect("a buffer is contiguous").copy_from_slice(images);
    }

    /// The whole forward pass of the mode.
    fn forward(&self, profile: &mut Option<&mut Profile>) {
        self.forward_until(self.program.output, profile);
    }

    fn forward_until(&self, last: NodeId, profile: &mut Option<&mut Profile>) {
        let (program, plan) = (self.program, self.arena.plan());
        // whether the step before runs inside this one (a pair at inference): then this one
        // runs even past `last`, to compute the value that step left to it
        let mut carried = false;
        for (t, &step) in plan.steps.iter().enumerate() {
            let Step::Forward(id) = step else { break };
            if id > last && !carried {
                break;
            }
            let block = program.block_ending_at(id, self.mode.pass() == Pass::Train);
            carried =
                block.is_some_and(|b| self.mode.pass() == Pass::Infer && plan.runs_in_next_step(program, b));
            Profile::time(profile, step, || self.forward_step(t, id));
        }
    }

    /// Forward, loss and backward: (Σ loss, correct); the gradients stay in the arena.
    fn train(&self, labels: &[u8], profile: &mut Option<&mut Profile>) -> (f64, usize) {
        let loss = self.program.loss.expect("a program with training steps has a loss");
        let mut result = (0.0, 0);
        for (t, &step) in self.arena.plan().steps.iter().enumerate() {
            match step {
                Step::Forward(id) => Profile::time(profile, step, || self.forward_step(t, id)),
                Step::Loss => {
                    let logits = self.program.logits;
                    let z = rows(self.value(logits, t));
                    let dz = self.out(Buffer::Grad(logits), t, self.dims(logits));
                    let dz = dz.into_dimensionality::<Ix2>().expect("logits are flat");
                    // SAFETY: the step's only scratch.
                    let mut s = unsafe { self.arena.scratch(t) };
                    result = Profile::time(profile, step, || {
                        self.kernels.loss_into(logits, loss, z, labels, dz, &mut s)
                    });
                }
                Step::Backward(id) => Profile::time(profile, step, || self.backward_step(t, id)),
                Step::Update => {}
            }
        }
        result
    }

    /// Node `id`'s value (or, at a block's output, the whole block's) at step `t`.
    fn forward_step(&self, t: usize, id: NodeId) {
        let (program, pass) = (self.program, self.mode.pass());
        let block = program.block_ending_at(id, pass == Pass::Train);
        let plan = self.arena.plan();
        if pass == Pass::Train && plan.runs_in_block(program, id) {
            return; // a pool whose block's step runs it
        }
        match block {
            // at inference, run inside the next block's step
            Some(b) if pass == Pass::Infer && plan.runs_in_next_step(program, b) => {}
            Some(b) if pass == Pass::Infer && plan.paired(program, b).is_some() => {
                let first = plan.paired(program, b).expect("a pair");
                let x = self.value(program.graph.node(first.linear).inputs[0], t);
                let between = first.inference_output();
                let values = [
                    self.out(Buffer::Value(between), t, self.dims(between)),
                    self.out(Buffer::Value(id), t, self.dims(id)),
                ];
                // SAFETY: the step's only scratch.
                let mut s = unsafe { self.arena.scratch(t) };
                self.kernels.block_pair_forward_into(program, [&first, b], self.params, x, values, &mut s);
            }
            Some(b) if plan.runs_fused(program, b) => {
                let x = self.value(program.graph.node(b.linear).inputs[0], t);
                let training = pass == Pass::Train;
                let norm = b.norm.filter(|_| training);
                // the block's value, or its pool's where the block runs the pool
                let value = b.pool.filter(|_| training && plan.takes_pool(program, b)).unwrap_or(id);
                let out = BlockOut {
                    value: self.out(Buffer::Value(value), t, self.dims(value)),
                    linear: norm.map(|_| self.out(Buffer::Value(b.linear), t, self.dims(b.linear))),
                    stats: norm.map(|norm| {
                        let stats = self.out(Buffer::Stats(norm), t, stats_dims(self.program, norm));
                        stats.into_dimensionality::<Ix1>().expect("per channel")
                    }),
                };
                // SAFETY: the step's only scratch.
                let mut s = unsafe { self.arena.scratch(t) };
                self.kernels.block_forward_into(program, b, self.params, x, self.mode, out, &mut s);
            }
            Some(b) if pass == Pass::Infer => b.inference_nodes().for_each(|id| self.forward_node(t, id)),
            Some(b) => b.nodes().for_each(|id| self.forward_node(t, id)),
            None => self.forward_node(t, id),
        }
    }

    fn forward_node(&self, t: usize, id: NodeId) {
        let (program, kernels) = (self.program, self.kernels);
        if memory::passes_through(program, self.mode.pass(), id).is_some() {
            return;
        }
        let node = program.graph.node(id);
        let x = self.value(node.inputs[0], t);
        let y = self.out(Buffer::Value(id), t, self.dims(id));
        // SAFETY: the step's only scratch (a block run node by node opens it once a node).
        let mut s = unsafe { self.arena.scratch(t) };
        let s = &mut s;
        match &node.op {
            Op::Input(_) => unreachable!("the input is not computed"),
            Op::Conv2d(conv) => {
                let w = self.param(id, 0).into_dimensionality::<Ix4>().expect("HWIO kernel");
                let b = conv.bias.then(|| self.param(id, 1).into_dimensionality::<Ix1>().expect("bias"));
                let (x, y) = (four(x), four_mut(y));
                kernels.conv2d_forward_into(id, x, w, b, &geometry(program, id), y, s);
            }
            Op::Dense(dense) => {
                let w = self.param(id, 0).into_dimensionality::<Ix2>().expect("dense kernel");
                let b = dense.bias.then(|| self.param(id, 1).into_dimensionality::<Ix1>().expect("bias"));
                let (x, y) = (
                    x.into_dimensionality::<Ix2>().expect("flat"),
                    y.into_dimensionality::<Ix2>().expect("flat"),
                );
                kernels.dense_forward_into(id, x, w, b, y, s);
            }
            Op::BatchNorm(bn) => {
                let p = |k| self.param(id, k).into_dimensionality::<Ix1>().expect("per channel");
                let eps = T::of(f64::from(bn.epsilon));
                match self.mode {
                    Mode::Train { .. } => {
                        let stats = self.out(Buffer::Stats(id), t, stats_dims(self.program, id));
                        let stats = stats.into_dimensionality::<Ix1>().expect("per channel");
                        kernels.batchnorm_forward_train_into(
                            id,
                            rows(x),
                            [p(0), p(1)],
                            eps,
                            rows_mut(y),
                            stats,
                            s,
                        );
                    }
                    Mode::Infer => kernels.batchnorm_forward_infer_into(
                        id,
                        rows(x),
                        [p(0), p(1)],
                        [p(2), p(3)],
                        eps,
                        rows_mut(y),
                        s,
                    ),
                }
            }
            Op::Pool(pool) => {
                let g = geometry(program, id);
                match pool.kind {
                    PoolKind::Max => kernels.maxpool_forward_into(id, four(x), &g, four_mut(y), s),
                    PoolKind::Avg => kernels.avgpool_forward_into(id, four(x), &g, four_mut(y), s),
                }
            }
            Op::Activation(Activation::Softmax) => kernels.softmax_forward_into(id, rows(x), rows_mut(y), s),
            Op::Activation(act) => kernels.activation_forward_into(id, *act, x, y, s),
            Op::Dropout { rate } => {
                let Mode::Train { seed, step } = self.mode else {
                    unreachable!("dropout passes through at inference")
                };
                let mask = self.out(Buffer::Mask(id), t, self.dims(id));
                kernels.dropout_forward_into(id, x, &dropout_stream(seed, step, id), *rate, [mask, y], s);
            }
            Op::Flatten => unreachable!("a flatten passes its input through"),
        }
    }

    /// Where the step at `t` writes the gradient of `input`: in place when it is the first to,
    /// else into its contribution (added in by [`Run::add_contribution`]).
    fn grad_out(&self, input: NodeId, t: usize) -> ArrayViewMutD<'a, T> {
        let buffer = if self.arena.plan().writes_first_grad(input, t) {
            Buffer::Grad(input)
        } else {
            Buffer::Contribution(t)
        };
        self.out(buffer, t, self.dims(input))
    }

    fn add_contribution(&self, input: NodeId, t: usize) {
        if self.arena.plan().writes_first_grad(input, t) {
            return;
        }
        // SAFETY: the step's writes are over; the contribution is only read.
        let extra = unsafe { self.arena.view(Buffer::Contribution(t), t, self.dims(input)) };
        let mut acc = self.out(Buffer::Grad(input), t, self.dims(input));
        acc += &extra;
    }

    /// Node `id`'s gradient rule (or, at a block's output, the whole block's), from d(`id`).
    fn backward_step(&self, t: usize, id: NodeId) {
        let program = self.program;
        if self.arena.plan().runs_in_block(program, id) {
            return; // a pool whose block's backward step runs it
        }
        let Some(block) = program.block_ending_at(id, true) else {
            self.backward_node(t, id);
            return;
        };
        if !self.arena.plan().runs_fused(program, block) {
            for id in [block.act, block.norm, Some(block.linear)].into_iter().flatten() {
                self.backward_node(t, id);
            }
            return;
        }
        let input = program.graph.node(block.linear).inputs[0];
        let need_dx = program.needs_grad[input.index()];
        // the block's value and gradient, or its pool's where the block runs the pool
        let pool = block.pool.filter(|_| self.arena.plan().takes_pool(program, block));
        let from = pool.unwrap_or(id);
        let tape = BlockTape {
            value: self.value(from, t),
            linear: block.norm.map(|_| self.value(block.linear, t)),
            stats: block.norm.map(|norm| {
                // SAFETY: read only.
                let stats =
                    unsafe { self.arena.view(Buffer::Stats(norm), t, stats_dims(self.program, norm)) };
                stats.into_dimensionality::<Ix1>().expect("per channel")
            }),
        };
        // SAFETY: read only.
        let dz = unsafe { self.arena.view(Buffer::Grad(from), t, self.dims(from)) };
        let linear_bias = match &program.graph.node(block.linear).op {
            Op::Conv2d(c) => c.bias,
            Op::Dense(d) => d.bias,
            _ => unreachable!("a block starts with conv2d or dense"),
        };
        let grads = BlockGrads {
            dx: need_dx.then(|| self.grad_out(input, t)),
            dw: self.param_grad(block.linear, 0, t),
            db: linear_bias
                .then(|| self.param_grad(block.linear, 1, t).into_dimensionality::<Ix1>().expect("bias")),
            norm: block.norm.map(|norm| {
                [0, 1].map(|k| self.param_grad(norm, k, t).into_dimensionality::<Ix1>().expect("per channel"))
            }),
        };
        let x = self.value(input, t);
        // SAFETY: the step's only scratch.
        let mut s = unsafe { self.arena.scratch(t) };
        match pool {
            Some(_) => {
                self.kernels.block_pool_backward_into(program, block, self.params, x, tape, dz, grads, &mut s)
            }
            None => self.kernels.block_backward_into(program, block, self.params, x, tape, dz, grads, &mut s),
        }
        if need_dx {
            self.add_contribution(input, t);
        }
    }

    fn backward_node(&self, t: usize, id: NodeId) {
        let (program, kernels) = (self.program, self.kernels);
        let node = program.graph.node(id);
        let input = node.inputs[0];
        let need_dx = program.needs_grad[input.index()];
        if matches!(node.op, Op::Flatten) && memory::gradient_passes_back(program, input) == Some(id) {
            return; // the input's gradient is this gradient's buffer
        }
        let x = self.value(input, t);
        // SAFETY: read only.
        let dy = unsafe { self.arena.view(Buffer::Grad(id), t, self.dims(id)) };
        let dx = need_dx.then(|| self.grad_out(input, t));
        // SAFETY: the step's only scratch (a block run node by node opens it once a node).
        let mut s = unsafe { self.arena.scratch(t) };
        let s = &mut s;
        match &node.op {
            Op::Input(_) => unreachable!("the input has no gradient rule"),
            Op::Conv2d(conv) => {
                let g = geometry(program, id);
                let w = self.param(id, 0).into_dimensionality::<Ix4>().unwrap();
                let (x, dy) = (four(x), four(dy));
                let dw = four_mut(self.param_grad(id, 0, t));
                let db = conv.bias.then(|| self.param_grad(id, 1, t).into_dimensionality::<Ix1>().unwrap());
                kernels.conv2d_backward_weights_into(id, x, dy, &g, dw, db, s);
                if let Some(dx) = dx {
                    kernels.conv2d_backward_input_into(id, dy, w, &g, four_mut(dx), s);
                }
            }
            Op::Dense(dense) => {
                let w = self.param(id, 0).into_dimensionality::<Ix2>().unwrap();
                let dw = self.param_grad(id, 0, t).into_dimensionality::<Ix2>().unwrap();
                let db = dense.bias.then(|| self.param_grad(id, 1, t).into_dimensionality::<Ix1>().unwrap());
                let (x, dy) =
                    (x.into_dimensionality::<Ix2>().unwrap(), dy.into_dimensionality::<Ix2>().unwrap());
                let dx = dx.map(|dx| dx.into_dimensionality::<Ix2>().unwrap());
                kernels.dense_backward_into(id, x, w, dy, dx, dw, db, s);
            }
            Op::BatchNorm(bn) => {
                // SAFETY: read only.
                let stats = unsafe { self.arena.view(Buffer::Stats(id), t, stats_dims(self.program, id)) };
                let stats = stats.into_dimensionality::<Ix1>().unwrap();
                let gamma = self.param(id, 0).into_dimensionality::<Ix1>().unwrap();
                let eps = T::of(f64::from(bn.epsilon));
                let affine = [0, 1].map(|k| self.param_grad(id, k, t).into_dimensionality::<Ix1>().unwrap());
                kernels.batchnorm_backward_into(
                    id,
                    rows(x),
                    rows(dy),
                    gamma,
                    stats,
                    eps,
                    dx.map(rows_mut),
                    affine,
                    s,
                );
            }
            Op::Pool(pool) => {
                if let Some(dx) = dx {
                    let g = geometry(program, id);
                    match pool.kind {
                        PoolKind::Max => {
                            kernels.maxpool_backward_into(id, four(x), four(dy), &g, four_mut(dx), s)
                        }
                        PoolKind::Avg => kernels.avgpool_backward_into(id, four(dy), &g, four_mut(dx), s),
                    }
                }
            }
            Op::Activation(act) => {
                if let Some(dx) = dx {
                    let y = self.value(id, t);
                    match act {
                        Activation::Softmax => {
                            rows_mut(dx).assign(&ops::softmax_backward(rows(y), rows(dy)));
                        }
                        _ => kernels.activation_backward_into(id, *act, x, y, dy, dx, s),
                    }
                }
            }
            Op::Dropout { .. } => {
                if let Some(dx) = dx {
                    // SAFETY: read only.
                    let mask = unsafe { self.arena.view(Buffer::Mask(id), t, self.dims(id)) };
                    kernels.dropout_apply_into(id, dy, mask, dx, s);
                }
            }
            Op::Flatten => {
                if let Some(mut dx) = dx {
                    let dy = dy.as_slice().expect("contiguous");
                    dx.as_slice_mut().expect("contiguous").copy_from_slice(dy);
                }
            }
        }
        if need_dx {
            self.add_contribution(input, t);
        }
    }
}

fn four<T>(x: ArrayViewD<'_, T>) -> ArrayView4<'_, T> {
    x.into_dimensionality::<Ix4>().expect("NHWC")
}

fn four_mut<T>(x: ArrayViewMutD<'_, T>) -> ArrayViewMut4<'_, T> {
    x.into_dimensionality::<Ix4>().expect("NHWC")
}

/// Views an (N, …, C) value as (M, C): every axis but the last folded into rows.
fn rows<T: Real>(x: ArrayViewD<'_, T>) -> ArrayView2<'_, T> {
    let c = *x.shape().last().expect("values have a batch axis");
    let m = x.len() / c.max(1);
    x.into_shape_with_order((m, c)).expect("values are row-major")
}

fn rows_mut<T: Real>(x: ArrayViewMutD<'_, T>) -> ArrayViewMut2<'_, T> {
    let c = *x.shape().last().expect("values have a batch axis");
    let m = x.len() / c.max(1);
    x.into_shape_with_order((m, c)).expect("values are row-major")
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

/// Inverted dropout: each element is kept with probability 1 − rate and scaled by 1/(1 − rate).
/// Element i's draw is draw i of the stream (seed, step, node): it depends on nothing else, so
/// the mask is drawn in parallel, in blocks, with one mix per element.
pub fn dropout_mask<T: Real>(dim: IxDyn, rate: f32, seed: u64, step: u64, node: NodeId) -> ArrayD<T> {
    let mut mask = ArrayD::zeros(dim);
    dropout_mask_from(mask.as_slice_mut().expect("row-major"), rate, &dropout_stream(seed, step, node));
    mask
}

/// The stream of dropout node `node`'s mask at training step `step` of the run `seed`.
pub fn dropout_stream(seed: u64, step: u64, node: NodeId) -> Rng {
    Rng::new(seed, &[0xD_4090_u64, step, node.index() as u64])
}

/// [`dropout_mask`] of `stream` into `mask` (every element written).
pub fn dropout_mask_from<T: Real>(mask: &mut [T], rate: f32, stream: &Rng) {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 14;
    let keep = T::of(1.0 / (1.0 - f64::from(rate)));
    // draw ≥ rate, decided on the draw's integer bits (the same answer, without a conversion)
    let threshold = crate::rng::unit_threshold(rate);
    mask.par_chunks_mut(BLOCK).enumerate().for_each(|(block, out)| {
        let first = (block * BLOCK) as u64;
        for (index, m) in (first..).zip(out.iter_mut()) {
            *m = if stream.nth_at_least(index, threshold) { keep } else { T::zero() };
        }
    });
}
