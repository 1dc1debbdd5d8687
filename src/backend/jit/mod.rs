//! The Cranelift backend: convolutions and dense layers (the model's FLOPs), pooling,
//! activations, the fused losses, dropout and the optimizer step compiled into machine code
//! specialized to each layer's shapes, run in parallel over the batch; the program itself (and
//! batchnorm) runs through the reference interpreter, which this backend reuses through the
//! [`Kernels`] seam. Checked against the reference, op by op and step by step, in tests/jit.rs.

pub mod activation;
pub mod conv;
pub mod eltwise;
pub mod emit;
pub mod loss;
mod math;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod winograd;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ndarray::{
    Array, Array1, Array2, Array3, Array4, ArrayD, ArrayRef, ArrayView1, ArrayView2, ArrayView4, ArrayViewD,
    Axis, CowArray, Ix1, Ix4, IxDyn, s,
};
use rayon::prelude::*;

use super::reference::ops::{BatchStats, Geometry};
use super::reference::{self, BlockBackward, BlockForward, Interpreter, Kernels, Mode, Tape};
use crate::autodiff::Program;
use crate::ir::fuse::{self, Block};
use crate::ir::train::{Loss, Optimizer};
use crate::ir::{Activation, NodeId, Op, PoolKind, Shape};
use activation::Sigmoidal;
use conv::ConvShape;
use cranelift_module::FuncId;
use emit::{Compiler, Emit, KernelFn};
use norm::NormShape;
use optim::Rule;
use pool::PoolShape;
use winograd::WinogradShape;

/// What to keep of the compilation, for `cnnc compile --emit`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Listing {
    pub clif: bool,
    pub asm: bool,
}

/// The compiled kernels of one conv2d or dense node.
#[derive(Debug, Clone, Copy)]
pub struct ConvKernels {
    pub shape: ConvShape,
    /// Padding before and after, [top, bottom, left, right].
    pub pads: [usize; 4],
    /// Buffers [x padded (N,HP,WP,C), w ([`conv::pack_weights`]), bias (F) or null,
    /// y (N,OH,OW,F)]; items: samples.
    pub forward: KernelFn,
    /// Buffers [dy, w transposed (KH,KW,F,C) and packed, dx padded and zeroed]; items: samples.
    pub backward_input: KernelFn,
    /// Buffers [x padded, dy, dw zeroed]; items: [`ConvShape::weight_tasks`]; batch: samples.
    pub backward_weights: KernelFn,
}

/// The Winograd kernels of a conv2d node whose layer the cost model gave them
/// ([`winograd::chosen`]); the runtime uses them instead of the direct ones.
#[derive(Debug, Clone, Copy)]
pub struct WinogradKernels {
    /// The forward pass: buffers as [`winograd::forward`]'s, the input padded as the layer
    /// pads it and further bottom/right up to the shape's HP x WP (odd output sizes).
    pub forward: Option<(WinogradShape, KernelFn)>,
    /// The weight gradient in the transformed domain ([`winograd::weight_gradient`]).
    pub weight_gradient: Option<(WinogradShape, KernelFn)>,
}

/// The Winograd kernels of a fused block's convolution, with the block's epilogues.
#[derive(Debug, Clone, Copy)]
pub struct BlockWinograd {
    /// Training forward, with the epilogue of [`BlockKernels::forward`].
    pub forward: (WinogradShape, KernelFn),
    /// Inference with batchnorm folded in (bias on, rectifier in the epilogue).
    pub infer: Option<(WinogradShape, KernelFn)>,
    /// Inference of a pooled block: the pixels the pool reads, one sample into its scratch.
    pub pooled: Option<(WinogradShape, KernelFn)>,
}

/// The compiled kernels of one max-pooling node.
#[derive(Debug, Clone, Copy)]
pub struct PoolKernels {
    pub shape: PoolShape,
    /// Padding before and after, [top, bottom, left, right].
    pub pads: [usize; 4],
    /// Buffers [x padded with -inf, y]; items: samples.
    pub forward: KernelFn,
    /// Buffers [x padded with -inf, dy, dx padded and zeroed]; items: samples.
    pub backward: KernelFn,
}

/// The compiled kernels of one relu or leaky relu node.
#[derive(Debug, Clone, Copy)]
pub struct RectifierKernels {
    /// Elements per sample.
    pub len: usize,
    /// Buffers [x, y]; items: samples.
    pub forward: KernelFn,
    /// Buffers [x, dy, dx]; items: samples.
    pub backward: KernelFn,
}

/// The compiled kernels of one batchnorm node that is not part of a fused block.
#[derive(Debug, Clone, Copy)]
pub struct NormKernels {
    pub shape: NormShape,
    /// See [`norm::stats`], [`norm::affine`], [`norm::grad_reduce`] and [`norm::grad_apply`],
    /// all without a rectifier.
    pub stats: KernelFn,
    pub affine: KernelFn,
    pub grad_reduce: KernelFn,
    pub grad_apply: KernelFn,
}

/// The kernels of a fused block, besides its linear node's [`ConvKernels`] (which its backward
/// pass uses) and its rectifier's (the backward of a block without batchnorm).
#[derive(Debug, Clone, Copy)]
pub struct BlockKernels {
    /// The block's linear node output per sample: pixels and channels.
    pub shape: NormShape,
    /// The rectifier's α, when the block ends in one.
    pub rectify: Option<f32>,
    /// Training forward: the convolution with the rectifier in its epilogue, or, with batchnorm,
    /// with the batch sums gathered in it ([`conv::Epilogue`]).
    pub forward: KernelFn,
    /// With batchnorm: inference with the normalization folded into the weights and bias, the
    /// rectifier in the epilogue; then normalize + rectify, and the backward's two passes.
    pub norm: Option<[KernelFn; 4]>,
    /// With a pool at inference: the convolution (batchnorm folded, rectifier in the epilogue)
    /// over the pixels the pool reads, into a per-sample scratch buffer, and the pool from it.
    pub pooled: Option<(PooledShape, [KernelFn; 2])>,
}

/// Elements per sample of a pooled block's scratch buffer (the convolution's output) and of
/// its output (the pool's).
#[derive(Debug, Clone, Copy)]
pub struct PooledShape {
    pub scratch: usize,
    pub output: usize,
}

/// The compiled kernels of one sigmoid or tanh node.
#[derive(Debug, Clone, Copy)]
pub struct SigmoidalKernels {
    pub act: Sigmoidal,
    /// Elements per sample.
    pub len: usize,
    /// Buffers [x, y]; items: samples.
    pub forward: KernelFn,
    /// Buffers [y, dy, dx]; items: samples.
    pub backward: KernelFn,
}

/// The compiled kernels of one average-pooling node.
#[derive(Debug, Clone, Copy)]
pub struct AvgPoolKernels {
    pub shape: PoolShape,
    /// Padding before and after, [top, bottom, left, right].
    pub pads: [usize; 4],
    /// Buffers [x padded with zeros, y]; items: samples.
    pub forward: KernelFn,
    /// Buffers [dy, dx padded and zeroed]; items: samples.
    pub backward: KernelFn,
}

/// The compiled kernel of one dropout node: its mask applied, forward and backward.
#[derive(Debug, Clone, Copy)]
pub struct DropoutKernel {
    /// Elements per sample.
    pub len: usize,
    /// Buffers [x or dy, mask, y or dx]; items: samples.
    pub apply: KernelFn,
}

/// The compiled kernel of one softmax node, on its own (inference).
#[derive(Debug, Clone, Copy)]
pub struct SoftmaxKernel {
    /// Rows per sample and their width.
    pub rows: usize,
    pub c: usize,
    /// Buffers [x, y]; items: samples.
    pub forward: KernelFn,
}

/// The compiled output activation fused with its loss.
#[derive(Debug, Clone, Copy)]
pub struct LossKernel {
    /// The logits' node.
    pub node: NodeId,
    pub loss: Loss,
    /// Logits per sample.
    pub k: usize,
    /// Buffers [z, labels as f32, dz, loss per sample, correct per sample (1 or 0)]; items:
    /// samples; batch: samples.
    pub kernel: KernelFn,
}

/// The compiled optimizer step, for every parameter tensor.
#[derive(Debug, Clone, Copy)]
pub struct OptimizerKernel {
    pub rule: Rule,
    /// Buffers [scalars, w, g, slots…] (see [`Rule`]); items: elements.
    pub kernel: KernelFn,
}

/// The compiled kernels of a program, by node.
pub struct JitKernels {
    convs: HashMap<NodeId, ConvKernels>,
    winograd: HashMap<NodeId, WinogradKernels>,
    /// Dense layers' forward kernel over groups of 4 samples ([`compile_dense_groups`]).
    dense_by_4: HashMap<NodeId, KernelFn>,
    /// Blocks (by output) whose gradient arrives through the relu already ([`relu_pools`]).
    masked_blocks: std::collections::HashSet<NodeId>,
    /// By the block's output node.
    block_winograd: HashMap<NodeId, BlockWinograd>,
    norms: HashMap<NodeId, NormKernels>,
    /// By the block's output node.
    blocks: HashMap<NodeId, BlockKernels>,
    pools: HashMap<NodeId, PoolKernels>,
    rectifiers: HashMap<NodeId, RectifierKernels>,
    sigmoidals: HashMap<NodeId, SigmoidalKernels>,
    avgpools: HashMap<NodeId, AvgPoolKernels>,
    dropouts: HashMap<NodeId, DropoutKernel>,
    softmaxes: HashMap<NodeId, SoftmaxKernel>,
    loss: Option<LossKernel>,
    optimizer: Option<OptimizerKernel>,
    /// How many times those last six kinds of kernels ran (see [`JitKernels::runs`]).
    runs: AtomicUsize,
    /// Owns the machine code the kernel pointers point into (in a mutex only because the
    /// module is `Send` but not `Sync`; it is never used again).
    _compiler: std::sync::Mutex<Compiler>,
    /// Wall time of compiling every kernel, in milliseconds.
    pub compile_ms: f64,
    /// (kernel name, CLIF or assembly) when a listing was asked for.
    pub listings: Vec<(String, String)>,
}

impl JitKernels {
    /// Compiles the kernels of every node of `program` that has them, and its fused loss.
    pub fn compile(program: &Program, listing: Listing) -> anyhow::Result<Self> {
        Self::compile_with(program, listing, None)
    }

    /// Compiles the kernels of `program`, and the update step of `optimizer` when given.
    pub fn compile_with(
        program: &Program,
        listing: Listing,
        optimizer: Option<&Optimizer>,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        // Cranelift's "none" measured faster than "speed" on every conv kernel of mnist.cnn (forward
        // 9.7 vs 13.3 ms, input gradient 8.0 vs 10.9, weight gradient 37.9 vs 44.7 at batch 128):
        // "speed" sinks loop-invariant address arithmetic into the inner loops of these
        // hand-blocked kernels. CNNC_JIT_OPT overrides it for experiments.
        let opt_level = std::env::var("CNNC_JIT_OPT").unwrap_or_else(|_| "none".into());
        let mut compiler = Compiler::new(&opt_level)?;
        compiler.keep_clif = listing.clif;
        compiler.keep_asm = listing.asm;
        let mut pending = Vec::new();
        let mut pending_pools = Vec::new();
        let mut pending_rectifiers = Vec::new();
        let relu_pools = relu_pools(program);
        for (id, node) in program.graph.nodes() {
            let alpha = match node.op {
                Op::Activation(Activation::Relu) => Some(0.0),
                Op::Activation(Activation::LeakyRelu { alpha }) => Some(alpha),
                _ => None,
            };
            if let Some(alpha) = alpha {
                let len = program.shapes.shape(id).numel();
                let name = format!("{}_{}", program.graph.layer_of(id).name, node.op.name());
                let f = compiler.kernel(&format!("{name}_forward"), |e| eltwise::forward(e, len, alpha))?;
                let b = compiler.kernel(&format!("{name}_backward"), |e| eltwise::backward(e, len, alpha))?;
                pending_rectifiers.push((id, len, [f, b]));
            }
            if let Some((shape, pads)) = pool_shape(program, id, &node.op) {
                let name = program.graph.layer_of(id).name.clone();
                let f = compiler.kernel(&format!("{name}_forward"), |e| pool::forward(e, &shape))?;
                let masked = relu_pools.contains_key(&id);
                let b =
                    compiler.kernel(&format!("{name}_backward"), |e| pool::backward(e, &shape, masked))?;
                pending_pools.push((id, shape, pads, [f, b]));
            }
            let Some((shape, pads)) = conv_shape(program, id, &node.op) else { continue };
            let name = program.graph.layer_of(id).name.clone();
            let f = compiler.kernel(&format!("{name}_forward"), |e| {
                conv::forward(e, &shape, conv::Epilogue::default())
            })?;
            let bi =
                compiler.kernel(&format!("{name}_backward_input"), |e| conv::backward_input(e, &shape))?;
            let bw = compiler
                .kernel(&format!("{name}_backward_weights"), |e| conv::backward_weights(e, &shape))?;
            pending.push((id, shape, pads, [f, bi, bw]));
        }
        let mut pending_norms = Vec::new();
        for (id, node) in program.graph.nodes() {
            if !matches!(node.op, Op::BatchNorm(_)) || program.blocks.iter().any(|b| b.norm == Some(id)) {
                continue;
            }
            let shape = norm_shape(program, id);
            let name = program.graph.layer_of(id).name.clone();
            let ids = [
                compiler.kernel(&format!("{name}_stats"), |e| norm::stats(e, &shape))?,
                compiler.kernel(&format!("{name}_forward"), |e| norm::affine(e, &shape, None))?,
                compiler
                    .kernel(&format!("{name}_backward_reduce"), |e| norm::grad_reduce(e, &shape, None))?,
                compiler.kernel(&format!("{name}_backward"), |e| norm::grad_apply(e, &shape, None))?,
            ];
            pending_norms.push((id, shape, ids));
        }
        let mut pending_blocks = Vec::new();
        for block in &program.blocks {
            let Some((conv_shape, _)) =
                conv_shape(program, block.linear, &program.graph.node(block.linear).op)
            else {
                continue;
            };
            let rectify = block.act.and_then(|a| fuse::fusable_rectifier(&program.graph.node(a).op));
            let shape = norm_shape(program, block.linear);
            // `conv2d_block_forward`, …: named after the block's first layer, as `--emit ir` shows it.
            let name = format!("{}_block", program.graph.layer_of(block.linear).name);
            let epilogue = conv::Epilogue {
                rectify: rectify.filter(|_| block.norm.is_none()),
                stats: block.norm.is_some(),
            };
            let forward =
                compiler.kernel(&format!("{name}_forward"), |e| conv::forward(e, &conv_shape, epilogue))?;
            let mut ids = vec![forward];
            if block.norm.is_some() {
                let folded = ConvShape { bias: true, ..conv_shape };
                let epilogue = conv::Epilogue { rectify, stats: false };
                ids.push(compiler.kernel(&format!("{name}_infer"), |e| conv::forward(e, &folded, epilogue))?);
                ids.push(
                    compiler.kernel(&format!("{name}_normalize"), |e| norm::affine(e, &shape, rectify))?,
                );
                ids.push(
                    compiler.kernel(&format!("{name}_backward_reduce"), |e| {
                        norm::grad_reduce(e, &shape, rectify)
                    })?,
                );
                ids.push(
                    compiler.kernel(&format!("{name}_backward"), |e| norm::grad_apply(e, &shape, rectify))?,
                );
            }
            // At inference, the pool that follows: the convolution computes only the rows and
            // columns some window reads (a `floor` drops the rest), one sample at a time into
            // a scratch buffer that stays in cache, and the pool reads it there.
            let mut pooled = None;
            if let Some(pool) = block.pool {
                let (ps, _) = pool_shape(program, pool, &program.graph.node(pool).op).expect("a max pool");
                let conv_part = pooled_conv_shape(&conv_shape, &ps, block);
                let (rows, cols) = (conv_part.oh, conv_part.ow);
                let pool_part = PoolShape { hp: rows, wp: cols, ..ps };
                let epilogue = conv::Epilogue { rectify, stats: false };
                ids.push(
                    compiler.kernel(&format!("{name}_infer_pooled"), |e| {
                        conv::forward(e, &conv_part, epilogue)
                    })?,
                );
                ids.push(compiler.kernel(&format!("{name}_pool"), |e| pool::forward(e, &pool_part))?);
                pooled =
                    Some(PooledShape { scratch: rows * cols * conv_shape.f, output: ps.oh * ps.ow * ps.c });
            }
            pending_blocks.push((block.output(), shape, rectify, block.norm.is_some(), pooled, ids));
        }
        let mut ids: Vec<_> = pending.iter().flat_map(|p| p.3).collect();
        ids.extend(pending_pools.iter().flat_map(|p| p.3));
        ids.extend(pending_rectifiers.iter().flat_map(|p| p.2));
        ids.extend(pending_norms.iter().flat_map(|p| p.2));
        ids.extend(pending_blocks.iter().flat_map(|p| p.5.iter().copied()));
        let code = compiler.finish(&ids)?;
        let (code, mut rest) = code.split_at(
            ids.len() - pending_norms.len() * 4 - pending_blocks.iter().map(|p| p.5.len()).sum::<usize>(),
        );
        let mut norms = HashMap::new();
        for (id, shape, _) in pending_norms {
            let (fns, tail) = rest.split_at(4);
            rest = tail;
            norms.insert(
                id,
                NormKernels { shape, stats: fns[0], affine: fns[1], grad_reduce: fns[2], grad_apply: fns[3] },
            );
        }
        let mut blocks = HashMap::new();
        for (output, shape, rectify, has_norm, pooled, ids) in pending_blocks {
            let (fns, tail) = rest.split_at(ids.len());
            rest = tail;
            let norm = has_norm.then(|| [fns[1], fns[2], fns[3], fns[4]]);
            let pooled = pooled.map(|p| (p, [fns[fns.len() - 2], fns[fns.len() - 1]]));
            blocks.insert(output, BlockKernels { shape, rectify, forward: fns[0], norm, pooled });
        }
        let (conv_code, rest) = code.split_at(pending.len() * 3);
        let (pool_code, rectifier_code) = rest.split_at(pending_pools.len() * 2);
        let rectifiers = pending_rectifiers
            .into_iter()
            .zip(rectifier_code.chunks(2))
            .map(|((id, len, _), fns)| (id, RectifierKernels { len, forward: fns[0], backward: fns[1] }))
            .collect();
        let pools = pending_pools
            .into_iter()
            .zip(pool_code.chunks(2))
            .map(|((id, shape, pads, _), fns)| {
                (id, PoolKernels { shape, pads, forward: fns[0], backward: fns[1] })
            })
            .collect();
        let convs = pending
            .into_iter()
            .zip(conv_code.chunks(3))
            .map(|((id, shape, pads, _), fns)| {
                (
                    id,
                    ConvKernels {
                        shape,
                        pads,
                        forward: fns[0],
                        backward_input: fns[1],
                        backward_weights: fns[2],
                    },
                )
            })
            .collect();
        let rest = compile_rest(&mut compiler, program, optimizer)?;
        let (winograd, block_winograd) = compile_winograd(&mut compiler, program)?;
        let dense_by_4 = compile_dense_groups(&mut compiler, program)?;
        let listings = std::mem::take(&mut compiler.listings);
        Ok(JitKernels {
            convs,
            winograd,
            block_winograd,
            dense_by_4,
            masked_blocks: relu_pools.values().copied().collect(),
            norms,
            blocks,
            pools,
            rectifiers,
            sigmoidals: rest.sigmoidals,
            avgpools: rest.avgpools,
            dropouts: rest.dropouts,
            softmaxes: rest.softmaxes,
            loss: rest.loss,
            optimizer: rest.optimizer,
            runs: AtomicUsize::new(0),
            _compiler: std::sync::Mutex::new(compiler),
            compile_ms: started.elapsed().as_secs_f64() * 1e3,
            listings,
        })
    }

    /// The kernels of a conv2d or dense node, to call directly (tests of memory safety).
    pub fn conv(&self, node: NodeId) -> Option<ConvKernels> {
        self.convs.get(&node).copied()
    }

    /// The Winograd kernels of a conv2d node, when its layer has them.
    pub fn winograd(&self, node: NodeId) -> Option<WinogradKernels> {
        self.winograd.get(&node).copied()
    }

    /// The Winograd kernels of the block whose output is `node`, when it has them.
    pub fn block_winograd(&self, node: NodeId) -> Option<BlockWinograd> {
        self.block_winograd.get(&node).copied()
    }

    /// A dense node's forward kernel over groups of 4 samples, to call directly.
    pub fn dense_by_4(&self, node: NodeId) -> Option<KernelFn> {
        self.dense_by_4.get(&node).copied()
    }

    /// The kernels of a max-pooling node, to call directly.
    pub fn pool(&self, node: NodeId) -> Option<PoolKernels> {
        self.pools.get(&node).copied()
    }

    /// How many kernels were compiled.
    pub fn kernel_count(&self) -> usize {
        let blocks: usize = self
            .blocks
            .values()
            .map(|b| 1 + if b.norm.is_some() { 4 } else { 0 } + if b.pooled.is_some() { 2 } else { 0 })
            .sum();
        self.convs.len() * 3
            + (self.pools.len() + self.rectifiers.len()) * 2
            + self.norms.len() * 4
            + blocks
            + (self.sigmoidals.len() + self.avgpools.len()) * 2
            + self.dropouts.len()
            + self.softmaxes.len()
            + usize::from(self.loss.is_some())
            + usize::from(self.optimizer.is_some())
            + self.dense_by_4.len()
            + self
                .winograd
                .values()
                .map(|k| usize::from(k.forward.is_some()) + usize::from(k.weight_gradient.is_some()))
                .sum::<usize>()
            + self
                .block_winograd
                .values()
                .map(|k| 1 + usize::from(k.infer.is_some()) + usize::from(k.pooled.is_some()))
                .sum::<usize>()
    }

    /// The kernels of a batchnorm node outside any block, to call directly.
    pub fn norm(&self, node: NodeId) -> Option<NormKernels> {
        self.norms.get(&node).copied()
    }

    /// The fused kernels of the block whose output is `node`.
    pub fn block(&self, node: NodeId) -> Option<BlockKernels> {
        self.blocks.get(&node).copied()
    }

    /// The kernels of a relu or leaky relu node, to call directly.
    pub fn rectifier(&self, node: NodeId) -> Option<RectifierKernels> {
        self.rectifiers.get(&node).copied()
    }

    /// The kernels of a sigmoid or tanh node, to call directly.
    pub fn sigmoidal(&self, node: NodeId) -> Option<SigmoidalKernels> {
        self.sigmoidals.get(&node).copied()
    }

    /// The kernels of an average-pooling node, to call directly.
    pub fn avgpool(&self, node: NodeId) -> Option<AvgPoolKernels> {
        self.avgpools.get(&node).copied()
    }

    /// The kernel of a dropout node, to call directly.
    pub fn dropout(&self, node: NodeId) -> Option<DropoutKernel> {
        self.dropouts.get(&node).copied()
    }

    /// The kernel of a softmax node (inference), to call directly.
    pub fn softmax(&self, node: NodeId) -> Option<SoftmaxKernel> {
        self.softmaxes.get(&node).copied()
    }

    /// The fused output activation and loss, when the program has one.
    pub fn fused_loss(&self) -> Option<LossKernel> {
        self.loss
    }

    /// The optimizer step, when compiled for one.
    pub fn optimizer(&self) -> Option<OptimizerKernel> {
        self.optimizer
    }

    /// How many times a sigmoid, tanh, average-pooling, dropout, softmax, loss or optimizer
    /// kernel ran through [`Kernels`]: tests tell by it that an op used its kernel rather than
    /// the reference's fallback, which computes the same bits for several of them.
    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::Relaxed)
    }

    /// [`run`], counted in [`JitKernels::runs`].
    fn run(&self, kernel: KernelFn, buffers: &Buffers, items: usize, batch: usize) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        run(kernel, buffers, items, batch);
    }

    /// [`map_samples`], counted in [`JitKernels::runs`].
    fn map_samples(&self, kernel: KernelFn, len: usize, inputs: &[ArrayViewD<f32>]) -> ArrayD<f32> {
        self.runs.fetch_add(1, Ordering::Relaxed);
        map_samples(kernel, len, inputs)
    }
}

/// The kernels [`compile_rest`] adds to the convolutions, max pools and rectifiers.
struct Rest {
    sigmoidals: HashMap<NodeId, SigmoidalKernels>,
    avgpools: HashMap<NodeId, AvgPoolKernels>,
    dropouts: HashMap<NodeId, DropoutKernel>,
    softmaxes: HashMap<NodeId, SoftmaxKernel>,
    loss: Option<LossKernel>,
    optimizer: Option<OptimizerKernel>,
}

/// Defines one kernel and returns its place in `ids`.
fn define(
    compiler: &mut Compiler,
    ids: &mut Vec<FuncId>,
    name: &str,
    body: impl FnOnce(&mut Emit),
) -> anyhow::Result<usize> {
    ids.push(compiler.kernel(name, body)?);
    Ok(ids.len() - 1)
}

/// Compiles the element-wise activations, average pools, dropouts, softmaxes, the fused loss
/// and the optimizer step, and finalizes them.
fn compile_rest(
    compiler: &mut Compiler,
    program: &Program,
    optimizer: Option<&Optimizer>,
) -> anyhow::Result<Rest> {
    let mut ids = Vec::new();
    let mut sigmoidals = Vec::new();
    let mut avgpools = Vec::new();
    let mut dropouts = Vec::new();
    let mut softmaxes = Vec::new();
    for (id, node) in program.graph.nodes() {
        let name = format!("{}_{}", program.graph.layer_of(id).name, node.op.name());
        let len = program.shapes.shape(id).numel();
        let act = match node.op {
            Op::Activation(Activation::Sigmoid) => Some(Sigmoidal::Sigmoid),
            Op::Activation(Activation::Tanh) => Some(Sigmoidal::Tanh),
            _ => None,
        };
        if let Some(act) = act {
            let f =
                define(compiler, &mut ids, &format!("{name}_forward"), |e| activation::forward(e, len, act))?;
            let b = define(compiler, &mut ids, &format!("{name}_backward"), |e| {
                activation::backward(e, len, act)
            })?;
            sigmoidals.push((id, act, len, [f, b]));
        }
        if let Some((shape, pads)) = pool_shape_of(program, id, &node.op, PoolKind::Avg) {
            let name = program.graph.layer_of(id).name.clone();
            let f = define(compiler, &mut ids, &format!("{name}_forward"), |e| {
                pool::avg_forward(e, &shape, pads)
            })?;
            let b = define(compiler, &mut ids, &format!("{name}_backward"), |e| {
                pool::avg_backward(e, &shape, pads)
            })?;
            avgpools.push((id, shape, pads, [f, b]));
        }
        if let Op::Dropout { .. } = node.op {
            let f = define(compiler, &mut ids, &format!("{name}_apply"), |e| eltwise::product(e, len))?;
            dropouts.push((id, len, f));
        }
        if let Op::Activation(Activation::Softmax) = node.op {
            let c = *program.shapes.shape(id).dims().last().expect("a shape has an axis");
            let rows = len / c.max(1);
            let f = define(compiler, &mut ids, &format!("{name}_forward"), |e| {
                loss::softmax_forward(e, rows, c)
            })?;
            softmaxes.push((id, rows, c, f));
        }
    }
    let mut fused = None;
    if let (Some(kind), false) = (program.loss, program.steps.is_empty()) {
        let k = program.shapes.shape(program.logits).numel();
        let index = match kind {
            Loss::CategoricalCrossentropy | Loss::SparseCategoricalCrossentropy => {
                Some(define(compiler, &mut ids, "softmax_cross_entropy", |e| {
                    loss::softmax_cross_entropy(e, k)
                })?)
            }
            // The reference reads one logit a sample; other widths stay with it.
            Loss::BinaryCrossentropy if k == 1 => Some(define(
                compiler,
                &mut ids,
                "sigmoid_binary_cross_entropy",
                loss::sigmoid_binary_cross_entropy,
            )?),
            Loss::BinaryCrossentropy => None,
        };
        fused = index.map(|i| (kind, k, i));
    }
    let step = match optimizer {
        Some(optimizer) => {
            let rule = Rule::of(optimizer);
            let name = format!("{rule:?}_step").to_lowercase();
            Some((rule, define(compiler, &mut ids, &name, |e| optim::step(e, rule))?))
        }
        None => None,
    };
    let code = compiler.finish(&ids)?;
    Ok(Rest {
        sigmoidals: sigmoidals
            .into_iter()
            .map(|(id, act, len, [f, b])| {
                (id, SigmoidalKernels { act, len, forward: code[f], backward: code[b] })
            })
            .collect(),
        avgpools: avgpools
            .into_iter()
            .map(|(id, shape, pads, [f, b])| {
                (id, AvgPoolKernels { shape, pads, forward: code[f], backward: code[b] })
            })
            .collect(),
        dropouts: dropouts
            .into_iter()
            .map(|(id, len, f)| (id, DropoutKernel { len, apply: code[f] }))
            .collect(),
        softmaxes: softmaxes
            .into_iter()
            .map(|(id, rows, c, f)| (id, SoftmaxKernel { rows, c, forward: code[f] }))
            .collect(),
        loss: fused.map(|(loss, k, i)| LossKernel { node: program.logits, loss, k, kernel: code[i] }),
        optimizer: step.map(|(rule, i)| OptimizerKernel { rule, kernel: code[i] }),
    })
}

/// A pooled block's convolution at inference: only the rows and columns some window of the
/// pool `ps` reads (a `floor` drops the rest), with a bias when batchnorm is folded in.
fn pooled_conv_shape(conv: &ConvShape, ps: &PoolShape, block: &Block) -> ConvShape {
    let rows = (ps.oh - 1) * ps.sh + ps.kh;
    let cols = (ps.ow - 1) * ps.sw + ps.kw;
    ConvShape { oh: rows, ow: cols, bias: conv.bias || block.norm.is_some(), ..*conv }
}

/// Whether `id` is the convolution (or dense layer) of a fused block, whose forward pass the
/// block's own kernels run.
fn in_block(program: &Program, id: NodeId) -> bool {
    program.blocks.iter().any(|b| b.linear == id)
}

/// The Winograd shape of a 3x3 stride-1 convolution that the cost model gives it (unless
/// `CNNC_WINOGRAD=0`, which keeps every layer direct, for comparisons): the input buffer
/// grown bottom/right to hold every tile.
fn winograd_shape(conv: &ConvShape) -> Option<WinogradShape> {
    if !winograd_wanted(conv) {
        return None;
    }
    let hp = conv.hp.max(2 * conv.oh.div_ceil(2) + 2);
    let wp = conv.wp.max(2 * conv.ow.div_ceil(2) + 2);
    WinogradShape::new(ConvShape { hp, wp, ..*conv })
}

/// Max pools (with the block they read) whose input is a fused block's relu output and which
/// are its only reader: their backward kernel passes the gradient through the relu too (the
/// window's maximum is positive exactly where the relu's input is), and the block skips its
/// own pass over the relu's mask: one pass over the block's output less.
fn relu_pools(program: &Program) -> HashMap<NodeId, NodeId> {
    let mut pools = HashMap::new();
    for block in &program.blocks {
        let relu = block.act.map(|a| fuse::fusable_rectifier(&program.graph.node(a).op));
        if block.norm.is_some() || relu != Some(Some(0.0)) {
            continue;
        }
        let out = block.output();
        let readers: Vec<NodeId> =
            program.graph.nodes().filter(|(_, node)| node.inputs.contains(&out)).map(|(id, _)| id).collect();
        if let [reader] = readers[..]
            && matches!(program.graph.node(reader).op, Op::Pool(p) if p.kind == PoolKind::Max)
        {
            pools.insert(reader, out);
        }
    }
    pools
}

/// A dense layer's forward kernel for groups of 4 samples: the 1x1 convolution of a 1x4
/// "image" of samples, so that 4 samples share each weight load (4 x 8 accumulators) where
/// one sample alone has a chain of C multiply-adds per accumulator, bound by the FMA's
/// latency. Each output still sums over its inputs in the same order: the same bits.
fn compile_dense_groups(
    compiler: &mut Compiler,
    program: &Program,
) -> anyhow::Result<HashMap<NodeId, KernelFn>> {
    let mut ids = Vec::new();
    let mut nodes = Vec::new();
    for (id, node) in program.graph.nodes() {
        let Op::Dense(_) = node.op else { continue };
        let Some((shape, _)) = conv_shape(program, id, &node.op).filter(|_| !in_block(program, id)) else {
            continue;
        };
        let group = ConvShape { wp: 4, ow: 4, ..shape };
        let name = format!("{}_forward_by_4", program.graph.layer_of(id).name);
        nodes.push((
            id,
            define(compiler, &mut ids, &name, |e| conv::forward(e, &group, conv::Epilogue::default()))?,
        ));
    }
    let code = compiler.finish(&ids)?;
    Ok(nodes.into_iter().map(|(id, i)| (id, code[i])).collect())
}

/// Whether the cost model gives `conv` Winograd's kernels (and `CNNC_WINOGRAD=0` does not
/// take them away).
fn winograd_wanted(conv: &ConvShape) -> bool {
    !std::env::var("CNNC_WINOGRAD").is_ok_and(|v| v == "0") && winograd::chosen(conv.c, conv.f)
}

/// Compiles the Winograd kernels of every conv2d node and block whose layer the cost model
/// gives them.
#[allow(clippy::type_complexity)]
fn compile_winograd(
    compiler: &mut Compiler,
    program: &Program,
) -> anyhow::Result<(HashMap<NodeId, WinogradKernels>, HashMap<NodeId, BlockWinograd>)> {
    let mut ids = Vec::new();
    let mut convs = Vec::new();
    for (id, node) in program.graph.nodes() {
        let Some((conv, _)) = conv_shape(program, id, &node.op) else { continue };
        let name = program.graph.layer_of(id).name.clone();
        // A block's convolution runs forward in the block's own kernels (compiled below).
        let forward = match winograd_shape(&conv).filter(|_| !in_block(program, id)) {
            Some(shape) => Some((
                shape,
                define(compiler, &mut ids, &format!("{name}_winograd_forward"), |e| {
                    winograd::forward(e, &shape, conv::Epilogue::default())
                })?,
            )),
            None => None,
        };
        let weights = match WinogradShape::for_weights(conv).filter(|_| winograd_wanted(&conv)) {
            Some(shape) => Some((
                shape,
                define(compiler, &mut ids, &format!("{name}_winograd_backward_weights"), |e| {
                    winograd::weight_gradient(e, &shape)
                })?,
            )),
            None => None,
        };
        if forward.is_some() || weights.is_some() {
            convs.push((id, forward, weights));
        }
    }
    let mut blocks = Vec::new();
    for block in &program.blocks {
        let Some((conv, _)) = conv_shape(program, block.linear, &program.graph.node(block.linear).op) else {
            continue;
        };
        let Some(shape) = winograd_shape(&conv) else { continue };
        let rectify = block.act.and_then(|a| fuse::fusable_rectifier(&program.graph.node(a).op));
        let name = format!("{}_block", program.graph.layer_of(block.linear).name);
        let epilogue =
            conv::Epilogue { rectify: rectify.filter(|_| block.norm.is_none()), stats: block.norm.is_some() };
        let forward = define(compiler, &mut ids, &format!("{name}_winograd_forward"), |e| {
            winograd::forward(e, &shape, epilogue)
        })?;
        let folded = conv::Epilogue { rectify, stats: false };
        let infer = match block.norm {
            Some(_) => {
                let folded_shape =
                    WinogradShape::new(ConvShape { bias: true, ..shape.conv }).expect("as above");
                let i = define(compiler, &mut ids, &format!("{name}_winograd_infer"), |e| {
                    winograd::forward(e, &folded_shape, folded)
                })?;
                Some((folded_shape, i))
            }
            None => None,
        };
        // The pooled block at inference reads one sample of the layer's padded input as it is.
        let pooled = match block.pool.and_then(|pool| pool_shape(program, pool, &program.graph.node(pool).op))
        {
            Some((ps, _)) => match WinogradShape::new(pooled_conv_shape(&conv, &ps, block)) {
                Some(pooled_shape) => {
                    let i = define(compiler, &mut ids, &format!("{name}_winograd_infer_pooled"), |e| {
                        winograd::forward(e, &pooled_shape, folded)
                    })?;
                    Some((pooled_shape, i))
                }
                None => None,
            },
            None => None,
        };
        blocks.push((block.output(), (shape, forward), infer, pooled));
    }
    let code = compiler.finish(&ids)?;
    let convs = convs
        .into_iter()
        .map(|(id, forward, weights)| {
            let kernels = WinogradKernels {
                forward: forward.map(|(shape, f)| (shape, code[f])),
                weight_gradient: weights.map(|(shape, w)| (shape, code[w])),
            };
            (id, kernels)
        })
        .collect();
    let blocks = blocks
        .into_iter()
        .map(|(output, (shape, f), infer, pooled)| {
            let kernels = BlockWinograd {
                forward: (shape, code[f]),
                infer: infer.map(|(s, i)| (s, code[i])),
                pooled: pooled.map(|(s, i)| (s, code[i])),
            };
            (output, kernels)
        })
        .collect();
    Ok((convs, blocks))
}

/// The largest dense weight matrix (elements) compiled into a kernel: 4 MB of f32.
const DENSE_MAX_WEIGHTS: usize = 1 << 20;

/// The kernel shape of a conv2d or dense node (dense: a 1x1 convolution of a 1x1 image).
fn conv_shape(program: &Program, id: NodeId, op: &Op) -> Option<(ConvShape, [usize; 4])> {
    if !matches!(op, Op::Conv2d(_) | Op::Dense(_)) {
        return None;
    }
    let input = program.shapes.shape(program.graph.node(id).inputs[0]);
    match (op, input, program.shapes.shape(id)) {
        (Op::Conv2d(c), Shape::Hwc { h, w, c: cin }, Shape::Hwc { h: oh, w: ow, .. }) => {
            let [wh, ww] = program.shapes.window(id)?;
            let pads = [wh.pad_before, wh.pad_after, ww.pad_before, ww.pad_after];
            let shape = ConvShape {
                hp: h + pads[0] + pads[1],
                wp: w + pads[2] + pads[3],
                c: cin,
                kh: c.kernel[0],
                kw: c.kernel[1],
                f: c.filters,
                oh,
                ow,
                sh: c.stride[0],
                sw: c.stride[1],
                bias: c.bias,
            };
            Some((shape, pads))
        }
        // The dense kernel is a 1x1 convolution that streams its whole weight matrix once per
        // sample: right while the matrix stays in cache, ruinous for a 12544x7744 one (388 MB a
        // sample). Larger layers use ndarray's cache-blocked matrix product instead.
        (Op::Dense(d), Shape::Flat(n), _) if n.saturating_mul(d.units) <= DENSE_MAX_WEIGHTS => {
            let shape = ConvShape {
                hp: 1,
                wp: 1,
                c: n,
                kh: 1,
                kw: 1,
                f: d.units,
                oh: 1,
                ow: 1,
                sh: 1,
                sw: 1,
                bias: d.bias,
            };
            Some((shape, [0; 4]))
        }
        _ => None,
    }
}

/// A node's value per sample as (pixels, channels).
fn norm_shape(program: &Program, id: NodeId) -> NormShape {
    let shape = program.shapes.shape(id);
    let channels = shape.channels();
    NormShape { pixels: shape.numel() / channels.max(1), channels }
}

/// The kernel shape of a max-pooling node.
fn pool_shape(program: &Program, id: NodeId, op: &Op) -> Option<(PoolShape, [usize; 4])> {
    pool_shape_of(program, id, op, PoolKind::Max)
}

/// The kernel shape of a pooling node of `kind`.
fn pool_shape_of(program: &Program, id: NodeId, op: &Op, kind: PoolKind) -> Option<(PoolShape, [usize; 4])> {
    let Op::Pool(p) = op else { return None };
    if p.kind != kind {
        return None;
    }
    let input = program.shapes.shape(program.graph.node(id).inputs[0]);
    let (Shape::Hwc { h, w, c }, Shape::Hwc { h: oh, w: ow, .. }) = (input, program.shapes.shape(id)) else {
        return None;
    };
    let [wh, ww] = program.shapes.window(id)?;
    let pads = [wh.pad_before, wh.pad_after, ww.pad_before, ww.pad_after];
    let shape = PoolShape {
        hp: h + pads[0] + pads[1],
        wp: w + pads[2] + pads[3],
        c,
        kh: p.size[0],
        kw: p.size[1],
        oh,
        ow,
        sh: p.stride[0],
        sw: p.stride[1],
    };
    Some((shape, pads))
}

/// Buffer pointers handed to kernels running on several threads.
struct Buffers(Vec<*mut f32>);
// SAFETY: each kernel call writes only the part of its output that belongs to its own range
// of work items (samples, or weight-gradient tasks); everything else it only reads.
unsafe impl Sync for Buffers {}

impl Buffers {
    /// Buffer `i` (a method, so that closures capture the whole `Sync` list, not its `Vec`).
    fn get(&self, i: usize) -> *mut f32 {
        self.0[i]
    }

    /// The buffers and one more.
    fn with(&self, last: *mut f32) -> Vec<*mut f32> {
        let mut all = self.0.clone();
        all.push(last);
        all
    }
}

/// A convolution's forward kernel as compiled for one use: the direct one, or Winograd's.
#[derive(Clone, Copy)]
enum ConvForward {
    Direct(KernelFn),
    Winograd(WinogradShape, KernelFn),
}

impl ConvForward {
    /// Winograd's kernel when there is one.
    fn of(direct: KernelFn, winograd: Option<(WinogradShape, KernelFn)>) -> Self {
        winograd.map_or(ConvForward::Direct(direct), |(shape, kernel)| ConvForward::Winograd(shape, kernel))
    }

    /// The weights as this kernel reads them, from the layer's HWIO kernel `w`.
    fn weights(self, conv: &ConvShape, w: &[f32]) -> Vec<f32> {
        match self {
            ConvForward::Direct(_) => conv::pack_weights(w, conv.kh * conv.kw * conv.c, conv.f),
            ConvForward::Winograd(shape, _) => winograd::transform_weights(w, &shape),
        }
    }

    /// Elements of scratch a call needs.
    fn scratch(self) -> usize {
        match self {
            ConvForward::Direct(_) => 0,
            ConvForward::Winograd(shape, _) => shape.scratch(),
        }
    }
}

/// `x` (N, H, W, C) through a convolution's forward pass into `y`, with its bias and batch
/// sums (null when the kernel has none): padded as the layer pads it (and further
/// bottom/right for Winograd's tiles), the weights `w` (HWIO) prepared as the kernel reads them.
#[allow(clippy::too_many_arguments)]
fn conv_forward_into(
    forward: ConvForward,
    conv: &ConvKernels,
    x: ArrayView4<f32>,
    w: &[f32],
    bias: *mut f32,
    y: *mut f32,
    sums: *mut f32,
) {
    let s = &conv.shape;
    let n = x.dim().0;
    let [top, bottom, left, right] = conv.pads;
    let pads = match forward {
        ConvForward::Direct(_) => conv.pads,
        ConvForward::Winograd(shape, _) => {
            [top, bottom + shape.conv.hp - s.hp, left, right + shape.conv.wp - s.wp]
        }
    };
    let xp = padded(x, pads);
    let weights = forward.weights(s, w);
    let buffers = vec![ptr(&xp), weights.as_ptr() as *mut f32, bias, y, sums];
    run_conv(forward, buffers, n);
}

/// Runs a convolution's forward kernel over `n` samples: `buffers` as the kernel takes them,
/// but for Winograd's scratch, which each shard allocates.
fn run_conv(forward: ConvForward, buffers: Vec<*mut f32>, n: usize) {
    match forward {
        ConvForward::Direct(kernel) => run(kernel, &Buffers(buffers), n, n),
        ConvForward::Winograd(shape, kernel) => run_with_scratch(kernel, buffers, shape.scratch(), n, n),
    }
}

/// `items` work items split into one contiguous range per thread, in parallel.
fn shards(items: usize) -> impl ParallelIterator<Item = (usize, usize)> {
    let shards = rayon::current_num_threads().min(items).max(1);
    (0..shards).into_par_iter().map(move |shard| (items * shard / shards, items * (shard + 1) / shards))
}

/// [`run`] for a kernel whose last buffer is a scratch of `scratch` elements: each shard
/// allocates its own.
fn run_with_scratch(kernel: KernelFn, buffers: Vec<*mut f32>, scratch: usize, items: usize, batch: usize) {
    let buffers = Buffers(buffers);
    shards(items).for_each(|(lo, hi)| {
        let mut own = vec![0.0f32; scratch];
        let all = buffers.with(own.as_mut_ptr());
        // SAFETY: the buffers have the shapes the kernel was compiled for, the items lo..hi lie
        // within them, and the scratch is this shard's alone.
        unsafe { kernel(all.as_ptr(), lo as i64, hi as i64, batch as i64) };
    });
}

/// Runs `kernel` over `items` work items, split into one contiguous shard per thread.
fn run(kernel: KernelFn, buffers: &Buffers, items: usize, batch: usize) {
    shards(items).for_each(|(lo, hi)| {
        // SAFETY: the buffers have the shapes the kernel was compiled for (checked by the
        // callers' asserts), and the items lo..hi lie within them.
        unsafe { kernel(buffers.0.as_ptr(), lo as i64, hi as i64, batch as i64) }
    });
}

/// A pooled block at inference: for each sample, the convolution (`conv`, buffers x, w, b)
/// into a scratch buffer of one sample, then the pool (`pool`) from it into y. The scratch
/// stays in cache: the convolution's output never goes to memory.
fn run_pooled(
    conv: ConvForward,
    pool: KernelFn,
    [x, w, b, y]: [*mut f32; 4],
    x_sample: usize,
    shape: PooledShape,
    n: usize,
) {
    let buffers = Buffers(vec![x, w, b, y]);
    shards(n).for_each(|(lo, hi)| {
        let mut scratch = vec![0.0f32; shape.scratch];
        let mut tiles = vec![0.0f32; conv.scratch()];
        let [x, w, b, y] = [0, 1, 2, 3].map(|i| buffers.get(i));
        let kernel = match conv {
            ConvForward::Direct(k) | ConvForward::Winograd(_, k) => k,
        };
        for i in lo..hi {
            // SAFETY: x holds n samples of `x_sample` elements and y n of `shape.output`, so both
            // offsets stay inside them; the kernels were compiled for one sample of these
            // shapes (the convolution's output is `shape.scratch` elements: the scratch; a
            // Winograd kernel's own scratch is `tiles`).
            unsafe {
                let buffers = [
                    x.add(i * x_sample),
                    w,
                    b,
                    scratch.as_mut_ptr(),
                    std::ptr::null_mut(),
                    tiles.as_mut_ptr(),
                ];
                kernel(buffers.as_ptr(), 0, 1, 1);
                let pool_buffers = [scratch.as_mut_ptr(), y.add(i * shape.output)];
                pool(pool_buffers.as_ptr(), 0, 1, 1);
            }
        }
    });
}

/// `x` (N,H,W,C) inside a zero border of `pads`.
fn padded(x: ArrayView4<'_, f32>, pads: [usize; 4]) -> CowArray<'_, f32, Ix4> {
    padded_with(x, pads, 0.0)
}

/// `x` inside a border of `pads` filled with `border`: `x` itself when there is no border and
/// it is row-major already (no copy: a full pass over memory saved), else a copy.
fn padded_with(x: ArrayView4<'_, f32>, pads: [usize; 4], border: f32) -> CowArray<'_, f32, Ix4> {
    if pads == [0; 4] && x.is_standard_layout() {
        return CowArray::from(x);
    }
    let (n, h, w, c) = x.dim();
    let mut out = Array4::from_elem((n, h + pads[0] + pads[1], w + pads[2] + pads[3], c), border);
    out.slice_mut(s![.., pads[0]..pads[0] + h, pads[2]..pads[2] + w, ..]).assign(&x);
    CowArray::from(out)
}

fn ptr<D: ndarray::Dimension>(a: &ndarray::ArrayRef<f32, D>) -> *mut f32 {
    a.as_ptr() as *mut f32
}

/// An output that `fill` has a kernel write in full: allocated but not zeroed (zeroing would
/// be one more pass over memory). `fill` gets the buffer's pointer.
fn written<D: ndarray::Dimension>(dim: D, fill: impl FnOnce(*mut f32)) -> Array<f32, D> {
    let mut y = Array::<f32, D>::uninit(dim);
    fill(y.as_mut_ptr() as *mut f32);
    // SAFETY: every caller's kernel writes each element of its output (the forward kernels
    // store every output pixel and channel; the element-wise kernels every element).
    unsafe { y.assume_init() }
}

/// Runs an element-wise kernel over whole samples: buffers [inputs…, output], the inputs of
/// one shape, each sample `len` elements.
fn map_samples(kernel: KernelFn, len: usize, inputs: &[ArrayViewD<f32>]) -> ArrayD<f32> {
    let inputs: Vec<_> = inputs.iter().map(|a| a.as_standard_layout()).collect();
    let n = inputs[0].shape()[0];
    for a in &inputs {
        assert_eq!(a.shape(), inputs[0].shape());
        assert_eq!(a.len(), n * len, "the kernel was compiled for this sample size");
    }
    let mut out = ArrayD::<f32>::zeros(inputs[0].raw_dim());
    let mut buffers: Vec<*mut f32> = inputs.iter().map(|a| a.as_ptr() as *mut f32).collect();
    buffers.push(out.as_mut_ptr());
    run(kernel, &Buffers(buffers), n, n);
    out
}

impl Kernels<f32> for JitKernels {
    fn compile_report(&self) -> Option<String> {
        Some(format!("compiled {} kernels in {:.1} ms", self.kernel_count(), self.compile_ms))
    }

    fn conv2d_forward(
        &self,
        node: NodeId,
        x: ArrayView4<f32>,
        w: ArrayView4<f32>,
        b: Option<ArrayView1<f32>>,
        g: &Geometry,
    ) -> Array4<f32> {
        let Some(k) = self.convs.get(&node) else { return reference::ops::conv2d_forward(x, w, b, g) };
        let s = &k.shape;
        let n = x.dim().0;
        let w = w.as_standard_layout();
        let b = b.map(|b| b.as_standard_layout().to_owned());
        let [top, bottom, left, right] = k.pads;
        assert_eq!((x.dim().1 + top + bottom, x.dim().2 + left + right, x.dim().3), (s.hp, s.wp, s.c));
        assert_eq!(w.dim(), (s.kh, s.kw, s.c, s.f));
        assert_eq!(b.is_some(), s.bias, "the kernel was compiled for this node's bias");
        assert!(b.as_ref().is_none_or(|b| b.len() == s.f));
        let bias = b.as_ref().map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut f32);
        let w = w.as_slice().expect("row-major");
        if let Some(by_4) = self.dense_by_4.get(&node) {
            // groups of 4 samples, then the rest one by one
            let x = x.as_standard_layout();
            let packed = conv::pack_weights(w, s.c, s.f);
            let (groups, rest) = (n / 4, n % 4);
            return written(Ix4(n, 1, 1, s.f), |y| {
                let wp = packed.as_ptr() as *mut f32;
                run(*by_4, &Buffers(vec![ptr(&x), wp, bias, y]), groups, groups);
                if rest > 0 {
                    // SAFETY: x holds n samples of C inputs and y n of F outputs; the last `rest`
                    // start after the 4·groups done.
                    let (xr, yr) = unsafe { (ptr(&x).add(4 * groups * s.c), y.add(4 * groups * s.f)) };
                    run(k.forward, &Buffers(vec![xr, wp, bias, yr]), rest, rest);
                }
            });
        }
        let forward = ConvForward::of(k.forward, self.winograd.get(&node).and_then(|wk| wk.forward));
        written(Ix4(n, s.oh, s.ow, s.f), |y| {
            conv_forward_into(forward, k, x, w, bias, y, std::ptr::null_mut())
        })
    }

    fn conv2d_backward_input(
        &self,
        node: NodeId,
        dy: ArrayView4<f32>,
        w: ArrayView4<f32>,
        input_hw: [usize; 2],
        g: &Geometry,
    ) -> Array4<f32> {
        let Some(k) = self.convs.get(&node) else {
            return reference::ops::conv2d_backward_input(dy, w, input_hw, g);
        };
        let s = &k.shape;
        let n = dy.dim().0;
        let dy = dy.as_standard_layout();
        assert_eq!(dy.dim(), (n, s.oh, s.ow, s.f));
        let wt = w.permuted_axes([0, 1, 3, 2]).as_standard_layout().to_owned();
        let wt = conv::pack_weights(wt.as_slice().expect("row-major"), s.kh * s.kw * s.f, s.c);
        let dxp = Array4::<f32>::zeros((n, s.hp, s.wp, s.c));
        let buffers = vec![dy.as_ptr() as *mut f32, wt.as_ptr() as *mut f32, ptr(&dxp)];
        run(k.backward_input, &Buffers(buffers), n, n);
        let [top, _, left, _] = k.pads;
        if k.pads == [0; 4] {
            dxp
        } else {
            dxp.slice(s![.., top..top + input_hw[0], left..left + input_hw[1], ..]).to_owned()
        }
    }

    fn conv2d_backward_weights(
        &self,
        node: NodeId,
        x: ArrayView4<f32>,
        dy: ArrayView4<f32>,
        kernel_shape: [usize; 4],
        g: &Geometry,
    ) -> (Array4<f32>, Array1<f32>) {
        let Some(k) = self.convs.get(&node) else {
            return reference::ops::conv2d_backward_weights(x, dy, kernel_shape, g);
        };
        let s = &k.shape;
        let n = x.dim().0;
        let xp = padded(x, k.pads);
        let dy = dy.as_standard_layout();
        assert_eq!(dy.dim(), (n, s.oh, s.ow, s.f));
        let dw = if let Some((shape, kernel)) = self.winograd.get(&node).and_then(|wk| wk.weight_gradient) {
            let m = vec![0.0f32; 16 * s.c * s.f];
            let buffers = vec![ptr(&xp), dy.as_ptr() as *mut f32, m.as_ptr() as *mut f32];
            run_with_scratch(kernel, buffers, shape.scratch(), shape.weight_tasks(), n);
            let dw = winograd::weight_gradient_output(&m, s.c, s.f);
            Array4::from_shape_vec((s.kh, s.kw, s.c, s.f), dw).expect("a 3x3 kernel's gradient")
        } else {
            let dw = Array4::<f32>::zeros((s.kh, s.kw, s.c, s.f));
            let buffers = vec![ptr(&xp), dy.as_ptr() as *mut f32, ptr(&dw)];
            run(k.backward_weights, &Buffers(buffers), s.weight_tasks(), n);
            dw
        };
        let db =
            dy.view().into_shape_with_order((n * s.oh * s.ow, s.f)).expect("row-major").sum_axis(Axis(0));
        (dw, db)
    }

    fn activation_forward(&self, node: NodeId, act: Activation, x: ArrayViewD<f32>) -> ArrayD<f32> {
        if let Some(k) = self.sigmoidals.get(&node) {
            return self.map_samples(k.forward, k.len, &[x]);
        }
        let Some(k) = self.rectifiers.get(&node) else { return x.mapv(|v| reference::activate(act, v)) };
        let x = x.as_standard_layout();
        let n = x.shape()[0];
        assert_eq!(x.len(), n * k.len);
        written(x.raw_dim(), |y| run(k.forward, &Buffers(vec![x.as_ptr() as *mut f32, y]), n, n))
    }

    fn activation_backward(
        &self,
        node: NodeId,
        act: Activation,
        x: ArrayViewD<f32>,
        y: ArrayViewD<f32>,
        dy: ArrayViewD<f32>,
    ) -> ArrayD<f32> {
        if let Some(k) = self.sigmoidals.get(&node) {
            return self.map_samples(k.backward, k.len, &[y, dy]);
        }
        let Some(k) = self.rectifiers.get(&node) else {
            return reference::activation_gradient(act, x, y, dy);
        };
        let x = x.as_standard_layout();
        let dy = dy.as_standard_layout();
        let n = x.shape()[0];
        assert_eq!((x.len(), dy.len()), (n * k.len, n * k.len));
        written(x.raw_dim(), |dx| {
            run(k.backward, &Buffers(vec![x.as_ptr() as *mut f32, dy.as_ptr() as *mut f32, dx]), n, n)
        })
    }

    fn maxpool_forward(&self, node: NodeId, x: ArrayView4<f32>, g: &Geometry) -> Array4<f32> {
        let Some(k) = self.pools.get(&node) else { return reference::ops::maxpool_forward(x, g) };
        let s = &k.shape;
        let n = x.dim().0;
        let xp = padded_with(x, k.pads, f32::NEG_INFINITY);
        assert_eq!((xp.dim().1, xp.dim().2, xp.dim().3), (s.hp, s.wp, s.c));
        written(Ix4(n, s.oh, s.ow, s.c), |y| run(k.forward, &Buffers(vec![ptr(&xp), y]), n, n))
    }

    fn maxpool_backward(
        &self,
        node: NodeId,
        x: ArrayView4<f32>,
        dy: ArrayView4<f32>,
        g: &Geometry,
    ) -> Array4<f32> {
        let Some(k) = self.pools.get(&node) else { return reference::ops::maxpool_backward(x, dy, g) };
        let s = &k.shape;
        let (n, h, w, _) = x.dim();
        let xp = padded_with(x, k.pads, f32::NEG_INFINITY);
        let dy = dy.as_standard_layout();
        assert_eq!(dy.dim(), (n, s.oh, s.ow, s.c));
        let dxp = Array4::<f32>::zeros((n, s.hp, s.wp, s.c));
        run(k.backward, &Buffers(vec![ptr(&xp), dy.as_ptr() as *mut f32, ptr(&dxp)]), n, n);
        let [top, _, left, _] = k.pads;
        if k.pads == [0; 4] { dxp } else { dxp.slice(s![.., top..top + h, left..left + w, ..]).to_owned() }
    }

    fn dense_forward(
        &self,
        node: NodeId,
        x: ArrayView2<f32>,
        w: ArrayView2<f32>,
        b: Option<ArrayView1<f32>>,
    ) -> Array2<f32> {
        if !self.convs.contains_key(&node) {
            return reference::ops::dense_forward(x, w, b);
        }
        let (n, inputs) = x.dim();
        let units = w.dim().1;
        let x4 = x.into_shape_with_order((n, 1, 1, inputs)).expect("row-major input");
        let w4 = w.into_shape_with_order((1, 1, inputs, units)).expect("row-major kernel");
        let g = Geometry { kernel: [1, 1], stride: [1, 1], pad_before: [0, 0], out: [1, 1] };
        let y = self.conv2d_forward(node, x4, w4, b, &g);
        y.into_shape_with_order((n, units)).expect("row-major output")
    }

    fn dense_backward(
        &self,
        node: NodeId,
        x: ArrayView2<f32>,
        w: ArrayView2<f32>,
        dy: ArrayView2<f32>,
    ) -> (Array2<f32>, Array2<f32>, Array1<f32>) {
        if !self.convs.contains_key(&node) {
            return reference::ops::dense_backward(x, w, dy);
        }
        let (n, inputs) = x.dim();
        let units = w.dim().1;
        let g = Geometry { kernel: [1, 1], stride: [1, 1], pad_before: [0, 0], out: [1, 1] };
        let x = x.as_standard_layout();
        let w = w.as_standard_layout();
        let dy = dy.as_standard_layout();
        let x4 = x.view().into_shape_with_order((n, 1, 1, inputs)).expect("row-major");
        let w4 = w.view().into_shape_with_order((1, 1, inputs, units)).expect("row-major");
        let dy4 = dy.view().into_shape_with_order((n, 1, 1, units)).expect("row-major");
        let dx = self.conv2d_backward_input(node, dy4, w4, [1, 1], &g);
        let (dw, db) = self.conv2d_backward_weights(node, x4, dy4, [1, 1, inputs, units], &g);
        (
            dx.into_shape_with_order((n, inputs)).expect("row-major"),
            dw.into_shape_with_order((inputs, units)).expect("row-major"),
            db,
        )
    }

    fn batchnorm_forward_train(
        &self,
        node: NodeId,
        x: ArrayView2<f32>,
        gamma: ArrayView1<f32>,
        beta: ArrayView1<f32>,
        epsilon: f32,
    ) -> (Array2<f32>, BatchStats<f32>) {
        let Some(k) = self.norms.get(&node) else {
            return reference::ops::batchnorm_forward_train(x, gamma, beta, epsilon);
        };
        let dim = x.dim();
        let x = x.as_standard_layout().into_dyn();
        let (y, stats) = self.normalize([k.stats, k.affine], k.shape, &x, [gamma, beta], epsilon);
        (y.into_shape_with_order(dim).expect("row-major"), stats)
    }

    fn batchnorm_forward_infer(
        &self,
        node: NodeId,
        x: ArrayView2<f32>,
        [gamma, beta]: [ArrayView1<f32>; 2],
        [mean, var]: [ArrayView1<f32>; 2],
        epsilon: f32,
    ) -> Array2<f32> {
        let Some(k) = self.norms.get(&node) else {
            return reference::ops::batchnorm_forward_infer(x, gamma, beta, mean, var, epsilon);
        };
        let dim = x.dim();
        let x = x.as_standard_layout().into_dyn();
        let stats = BatchStats { mean: mean.to_owned(), var: var.to_owned() };
        let y = self.affine(k.affine, k.shape, &x, &stats, [gamma, beta], epsilon);
        y.into_shape_with_order(dim).expect("row-major")
    }

    fn batchnorm_backward(
        &self,
        node: NodeId,
        x: ArrayView2<f32>,
        dy: ArrayView2<f32>,
        gamma: ArrayView1<f32>,
        stats: &BatchStats<f32>,
        epsilon: f32,
    ) -> (Array2<f32>, Array1<f32>, Array1<f32>) {
        let Some(k) = self.norms.get(&node) else {
            return reference::ops::batchnorm_backward(x, dy, gamma, stats, epsilon);
        };
        let dim = x.dim();
        let x = x.as_standard_layout().into_dyn();
        let dy = dy.as_standard_layout().into_dyn();
        let kernels = [k.grad_reduce, k.grad_apply];
        let (dx, dgamma, dbeta) =
            self.normalize_backward(kernels, k.shape, &x, None, &dy, gamma, stats, epsilon);
        (dx.into_shape_with_order(dim).expect("row-major"), dgamma, dbeta)
    }

    fn block_forward(
        &self,
        program: &Program,
        block: &Block,
        params: &[ArrayD<f32>],
        x: ArrayViewD<f32>,
        mode: Mode,
    ) -> Option<BlockForward<f32>> {
        let k = self.blocks.get(&block.output())?;
        let conv = self.convs.get(&block.linear)?;
        let s = &conv.shape;
        let n = x.shape()[0];
        let x4 = x.as_standard_layout();
        let x4 = x4
            .view()
            .into_shape_with_order((
                n,
                s.hp - conv.pads[0] - conv.pads[1],
                s.wp - conv.pads[2] - conv.pads[3],
                s.c,
            ))
            .expect("the block's input");
        let indices = &program.node_params[block.linear.index()];
        let w = params[indices[0]].as_standard_layout();
        assert_eq!(w.len(), s.kh * s.kw * s.c * s.f, "the kernel was compiled for this weight");
        let wino = self.block_winograd.get(&block.output());
        let b = s.bias.then(|| params[indices[1]].as_standard_layout());
        let bias_ptr = b.as_ref().map_or(std::ptr::null_mut(), |b| ptr(b));
        let dims = |id: NodeId| {
            let mut dims = vec![n];
            dims.extend(program.shapes.shape(id).dims());
            IxDyn(&dims)
        };
        // The block's batchnorm: its ε and parameter `i` (γ, β, moving mean, moving variance).
        let norm = block.norm.map(|norm| {
            let Op::BatchNorm(bn) = program.graph.node(norm).op else { unreachable!("a batchnorm") };
            let indices = &program.node_params[norm.index()];
            let p =
                move |i: usize| params[indices[i]].view().into_dimensionality::<Ix1>().expect("per channel");
            (bn.epsilon, p)
        });
        if mode == Mode::Infer {
            // Batchnorm folded into the convolution: w·s and (b − mean)·s + β, s = γ/σ.
            let folded = norm.map(|(epsilon, p)| {
                let stats = BatchStats { mean: p(2).to_owned(), var: p(3).to_owned() };
                let inv = inverse_std(&stats, epsilon);
                let (gamma, beta) = (p(0), p(1));
                let scale: Vec<f64> = (0..s.f).map(|f| f64::from(gamma[f]) * inv[f]).collect();
                let weights: Vec<f32> =
                    w.iter().enumerate().map(|(i, v)| (f64::from(*v) * scale[i % s.f]) as f32).collect();
                let bias: Vec<f32> = (0..s.f)
                    .map(|f| {
                        let b0 = b.as_ref().map_or(0.0, |b| f64::from(b.as_slice().expect("standard")[f]));
                        ((b0 - f64::from(stats.mean[f])) * scale[f] + f64::from(beta[f])) as f32
                    })
                    .collect();
                (weights, bias)
            });
            let weights = folded.as_ref().map_or_else(|| w.as_slice().expect("row-major"), |(w, _)| w);
            let bp = folded.as_ref().map_or(bias_ptr, |(_, b)| b.as_ptr() as *mut f32);
            if let (Some(pool), Some((shape, [direct, pool_kernel]))) = (block.pool, k.pooled) {
                let conv_kernel = ConvForward::of(direct, wino.and_then(|wk| wk.pooled));
                let prepared = conv_kernel.weights(s, weights);
                let xp = padded(x4, conv.pads);
                let x_sample = s.hp * s.wp * s.c;
                let buffers = |y| [ptr(&xp), prepared.as_ptr() as *mut f32, bp, y];
                let y = written(dims(pool), |y| {
                    run_pooled(conv_kernel, pool_kernel, buffers(y), x_sample, shape, n)
                });
                return Some(BlockForward { value: y, linear: None, stats: None });
            }
            let forward = match k.norm {
                Some([infer, ..]) => ConvForward::of(infer, wino.and_then(|wk| wk.infer)),
                None => ConvForward::of(k.forward, wino.map(|wk| wk.forward)),
            };
            let y = written(dims(block.output()), |y| {
                conv_forward_into(forward, conv, x4, weights, bp, y, std::ptr::null_mut())
            });
            return Some(BlockForward { value: y, linear: None, stats: None });
        }
        let out = dims(block.output());
        assert_eq!(ndarray::Dimension::size(&out), n * s.oh * s.ow * s.f);
        let forward = ConvForward::of(k.forward, wino.map(|wk| wk.forward));
        let w = w.as_slice().expect("row-major");
        let (Some((epsilon, p)), Some([_, normalize, ..])) = (norm, k.norm) else {
            let y =
                written(out, |y| conv_forward_into(forward, conv, x4, w, bias_ptr, y, std::ptr::null_mut()));
            return Some(BlockForward { value: y, linear: None, stats: None });
        };
        let sums = Array3::<f32>::zeros((n, 2, s.f));
        let y = written(out, |y| conv_forward_into(forward, conv, x4, w, bias_ptr, y, ptr(&sums)));
        let stats = statistics(&sums, n * k.shape.pixels);
        let z = self.affine(normalize, k.shape, &y, &stats, [p(0), p(1)], epsilon);
        Some(BlockForward { value: z, linear: Some(y), stats: Some(stats) })
    }

    fn block_backward(
        &self,
        program: &Program,
        block: &Block,
        params: &[ArrayD<f32>],
        x: ArrayViewD<f32>,
        tape: &Tape<f32>,
        dz: ArrayViewD<f32>,
        need_dx: bool,
    ) -> Option<BlockBackward<f32>> {
        let k = self.blocks.get(&block.output())?;
        let conv = self.convs.get(&block.linear)?;
        let s = conv.shape;
        let n = x.shape()[0];
        let taped = |id: NodeId| tape.values[id.index()].as_ref().expect("the block's forward pass kept it");
        let z = taped(block.output());
        let dz = dz.as_standard_layout();
        let mut grads = Vec::new();
        let dc = match (block.norm, k.norm) {
            (Some(norm), Some([_, _, reduce, apply])) => {
                let Op::BatchNorm(bn) = program.graph.node(norm).op else { unreachable!("a batchnorm") };
                let indices = &program.node_params[norm.index()];
                let gamma = params[indices[0]].view().into_dimensionality::<Ix1>().expect("per channel");
                let stats =
                    tape.stats[norm.index()].as_ref().expect("training forward keeps batch statistics");
                let rectified = k.rectify.map(|_| &**z);
                let (dc, dgamma, dbeta) = self.normalize_backward(
                    [reduce, apply],
                    k.shape,
                    taped(block.linear),
                    rectified,
                    &dz,
                    gamma,
                    stats,
                    bn.epsilon,
                );
                grads.push((indices[0], dgamma.into_dyn()));
                grads.push((indices[1], dbeta.into_dyn()));
                CowArray::from(dc)
            }
            // the max pool after the block passed its gradient through the relu already
            _ if self.masked_blocks.contains(&block.output()) => CowArray::from(dz.view()),
            _ => {
                let act = block.act.expect("a block without batchnorm ends in a rectifier");
                let r = self.rectifiers.get(&act)?;
                assert_eq!(z.len(), n * r.len);
                CowArray::from(written(z.raw_dim(), |dc| {
                    run(r.backward, &Buffers(vec![ptr(z), ptr(&dz), dc]), n, n)
                }))
            }
        };
        let dc4 = dc.view().into_shape_with_order((n, s.oh, s.ow, s.f)).expect("row-major");
        let (h, w) = (s.hp - conv.pads[0] - conv.pads[1], s.wp - conv.pads[2] - conv.pads[3]);
        let x = x.as_standard_layout();
        let x4 = x.view().into_shape_with_order((n, h, w, s.c)).expect("the block's input");
        let g = match program.graph.node(block.linear).op {
            Op::Conv2d(_) => reference::geometry(program, block.linear),
            _ => Geometry { kernel: [1, 1], stride: [1, 1], pad_before: [0, 0], out: [1, 1] },
        };
        let indices = &program.node_params[block.linear.index()];
        let weights = &params[indices[0]];
        let (dw, db) = self.conv2d_backward_weights(block.linear, x4, dc4, [s.kh, s.kw, s.c, s.f], &g);
        grads.push((indices[0], dw.into_shape_with_order(weights.raw_dim()).expect("same size").into_dyn()));
        if s.bias {
            grads.push((indices[1], db.into_dyn()));
        }
        let dx = need_dx.then(|| {
            let w4 = weights.view().into_shape_with_order((s.kh, s.kw, s.c, s.f)).expect("row-major kernel");
            let dx = self.conv2d_backward_input(block.linear, dc4, w4, [h, w], &g);
            dx.into_shape_with_order(x.raw_dim()).expect("same size").into_dyn()
        });
        Some(BlockBackward { dx, grads })
    }

    fn avgpool_forward(&self, node: NodeId, x: ArrayView4<f32>, g: &Geometry) -> Array4<f32> {
        let Some(k) = self.avgpools.get(&node) else { return reference::ops::avgpool_forward(x, g) };
        let s = &k.shape;
        let n = x.dim().0;
        let xp = padded(x, k.pads);
        assert_eq!((xp.dim().1, xp.dim().2, xp.dim().3), (s.hp, s.wp, s.c));
        let y = Array4::<f32>::zeros((n, s.oh, s.ow, s.c));
        self.run(k.forward, &Buffers(vec![ptr(&xp), ptr(&y)]), n, n);
        y
    }

    fn avgpool_backward(
        &self,
        node: NodeId,
        input_shape: [usize; 4],
        dy: ArrayView4<f32>,
        g: &Geometry,
    ) -> Array4<f32> {
        let Some(k) = self.avgpools.get(&node) else {
            return reference::ops::avgpool_backward(input_shape, dy, g);
        };
        let s = &k.shape;
        let [n, h, w, c] = input_shape;
        let [top, bottom, left, right] = k.pads;
        assert_eq!((h + top + bottom, w + left + right, c), (s.hp, s.wp, s.c));
        let dy = dy.as_standard_layout();
        assert_eq!(dy.dim(), (n, s.oh, s.ow, s.c));
        let dxp = Array4::<f32>::zeros((n, s.hp, s.wp, s.c));
        self.run(k.backward, &Buffers(vec![dy.as_ptr() as *mut f32, ptr(&dxp)]), n, n);
        if k.pads == [0; 4] { dxp } else { dxp.slice(s![.., top..top + h, left..left + w, ..]).to_owned() }
    }

    fn softmax_forward(&self, node: NodeId, x: ArrayView2<f32>) -> Array2<f32> {
        let Some(k) = self.softmaxes.get(&node) else { return reference::ops::softmax_forward(x) };
        let x = x.as_standard_layout();
        let (m, c) = x.dim();
        assert_eq!(c, k.c);
        assert_eq!(m % k.rows.max(1), 0, "whole samples");
        let n = m / k.rows.max(1);
        let mut y = Array2::<f32>::zeros((m, c));
        self.run(k.forward, &Buffers(vec![x.as_ptr() as *mut f32, y.as_mut_ptr()]), n, n);
        y
    }

    fn loss(&self, node: NodeId, loss: Loss, z: ArrayView2<f32>, labels: &[u8]) -> (f64, usize, Array2<f32>) {
        let Some(k) = self.loss.filter(|k| k.node == node && k.loss == loss) else {
            return reference::Plain.loss(node, loss, z, labels);
        };
        let z = z.as_standard_layout();
        let (n, classes) = z.dim();
        assert_eq!(classes, k.k);
        assert_eq!(labels.len(), n, "one label a sample");
        if loss != Loss::BinaryCrossentropy {
            assert!(labels.iter().all(|&l| usize::from(l) < classes), "every label names a class");
        }
        let labels: Vec<f32> = labels.iter().map(|&l| f32::from(l)).collect();
        let mut dz = Array2::<f32>::zeros((n, classes));
        let mut losses = vec![0.0f32; n];
        let mut correct = vec![0.0f32; n];
        let buffers = vec![
            z.as_ptr() as *mut f32,
            labels.as_ptr() as *mut f32,
            dz.as_mut_ptr(),
            losses.as_mut_ptr(),
            correct.as_mut_ptr(),
        ];
        self.run(k.kernel, &Buffers(buffers), n, n);
        // In sample order, as the reference sums them.
        let loss_sum = losses.iter().fold(0.0, |sum, &l| sum + f64::from(l));
        (loss_sum, correct.iter().filter(|&&c| c != 0.0).count(), dz)
    }

    fn dropout_apply(&self, node: NodeId, x: ArrayViewD<f32>, mask: ArrayViewD<f32>) -> ArrayD<f32> {
        let Some(k) = self.dropouts.get(&node) else { return &x * &mask };
        self.map_samples(k.apply, k.len, &[x, mask])
    }

    fn optimizer_update(
        &self,
        _index: usize,
        optimizer: &Optimizer,
        param: &mut ArrayD<f32>,
        grad: &ArrayD<f32>,
        slots: &mut [ArrayD<f32>],
        iteration: u64,
    ) {
        let compiled = self.optimizer.filter(|k| k.rule == Rule::of(optimizer));
        let standard = param.is_standard_layout() && slots.iter().all(|s| s.is_standard_layout());
        let Some(k) = compiled.filter(|_| standard) else {
            return crate::train::optimizer::update(optimizer, param, grad, slots, iteration);
        };
        let grad = grad.as_standard_layout();
        assert_eq!(grad.shape(), param.shape());
        assert!(slots.iter().all(|s| s.shape() == param.shape()));
        let scalars = Rule::scalars(optimizer, iteration);
        let mut buffers = vec![scalars.as_ptr() as *mut f32, param.as_mut_ptr(), grad.as_ptr() as *mut f32];
        buffers.extend(slots.iter_mut().map(|s| s.as_mut_ptr()));
        let expected = match k.rule {
            Rule::Sgd => 3,
            Rule::Momentum => 4,
            Rule::Adam => 5,
        };
        assert_eq!(buffers.len(), expected, "the optimizer keeps its slots");
        let len = param.len();
        self.run(k.kernel, &Buffers(buffers), len, len);
    }
}

/// Per-channel sums gathered per sample, (N, 2, C), reduced over samples in order, in f64:
/// the two sums of every channel.
fn reduce_sums(sums: &Array3<f32>) -> [Vec<f64>; 2] {
    let c = sums.dim().2;
    let mut out = [vec![0.0; c], vec![0.0; c]];
    for sample in sums.outer_iter() {
        for (k, row) in sample.outer_iter().enumerate() {
            for (acc, v) in out[k].iter_mut().zip(row) {
                *acc += f64::from(*v);
            }
        }
    }
    out
}

/// The batch statistics from the (Σx, Σx²) sums of `m` values per channel: biased variance.
fn statistics(sums: &Array3<f32>, m: usize) -> BatchStats<f32> {
    let [sum, sq] = reduce_sums(sums);
    let m = m as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / m).collect();
    // E[x²] − E[x]², never below zero (rounding can take it there for a constant channel).
    let var = sq.iter().zip(&mean).map(|(q, mu)| (q / m - mu * mu).max(0.0) as f32).collect();
    BatchStats { mean: mean.into_iter().map(|v| v as f32).collect(), var }
}

/// 1/√(var + ε) per channel, in f64.
fn inverse_std(stats: &BatchStats<f32>, epsilon: f32) -> Vec<f64> {
    stats.var.iter().map(|v| 1.0 / (f64::from(*v) + f64::from(epsilon)).sqrt()).collect()
}

/// The batchnorm backward: from the (Σg, Σg·x) sums, (dgamma, dbeta) and the coefficients
/// (a, b, d) of dx = a·g + b·x + d, which is γ/(M·σ)·(M·g − dbeta − x̂·dgamma) expanded.
fn norm_gradient(
    sums: &Array3<f32>,
    m: usize,
    gamma: ArrayView1<f32>,
    stats: &BatchStats<f32>,
    epsilon: f32,
) -> (Array1<f32>, Array1<f32>, Array2<f32>) {
    let [sum_g, sum_gx] = reduce_sums(sums);
    let inv = inverse_std(stats, epsilon);
    let m = m as f64;
    let c = gamma.len();
    let (mut dgamma, mut dbeta, mut coef) = (Array1::zeros(c), Array1::zeros(c), Array2::zeros((3, c)));
    for k in 0..c {
        let (g, mean, inv) = (f64::from(gamma[k]), f64::from(stats.mean[k]), inv[k]);
        let db = sum_g[k];
        let dg = inv * (sum_gx[k] - mean * db);
        dgamma[k] = dg as f32;
        dbeta[k] = db as f32;
        coef[[0, k]] = (g * inv) as f32;
        coef[[1, k]] = (-g * inv * inv * dg / m) as f32;
        coef[[2, k]] = (-g * inv * db / m + g * inv * inv * mean * dg / m) as f32;
    }
    (dgamma, dbeta, coef)
}

impl JitKernels {
    /// Batchnorm training forward over `x` (M·…, C) with the stats/affine kernels `k` (or a
    /// block's): returns y and the batch statistics. `x` holds `n` samples.
    fn normalize(
        &self,
        [stats_fn, affine]: [KernelFn; 2],
        shape: NormShape,
        x: &ArrayRef<f32, IxDyn>,
        [gamma, beta]: [ArrayView1<f32>; 2],
        epsilon: f32,
    ) -> (ArrayD<f32>, BatchStats<f32>) {
        let n = x.len() / (shape.pixels * shape.channels);
        assert_eq!(x.len(), n * shape.pixels * shape.channels);
        let sums = Array3::<f32>::zeros((n, 2, shape.channels));
        run(stats_fn, &Buffers(vec![ptr(x), ptr(&sums)]), n, n);
        let stats = statistics(&sums, n * shape.pixels);
        let y = self.affine(affine, shape, x, &stats, [gamma, beta], epsilon);
        (y, stats)
    }

    /// y = act((x − mean)·γ/σ + β) with the affine kernel.
    fn affine(
        &self,
        kernel: KernelFn,
        shape: NormShape,
        x: &ArrayRef<f32, IxDyn>,
        stats: &BatchStats<f32>,
        [gamma, beta]: [ArrayView1<f32>; 2],
        epsilon: f32,
    ) -> ArrayD<f32> {
        let n = x.len() / (shape.pixels * shape.channels);
        let inv = inverse_std(stats, epsilon);
        let scale: Array1<f32> = (0..shape.channels).map(|k| (f64::from(gamma[k]) * inv[k]) as f32).collect();
        let shift: Array1<f32> = (0..shape.channels)
            .map(|k| (f64::from(beta[k]) - f64::from(stats.mean[k]) * f64::from(gamma[k]) * inv[k]) as f32)
            .collect();
        written(x.raw_dim(), |y| run(kernel, &Buffers(vec![ptr(x), ptr(&scale), ptr(&shift), y]), n, n))
    }

    /// The batchnorm backward with the reduce/apply kernels: (dx, dgamma, dbeta). `z` is the
    /// rectifier's output when the kernels pass the gradient back through one.
    #[allow(clippy::too_many_arguments)]
    fn normalize_backward(
        &self,
        [reduce, apply]: [KernelFn; 2],
        shape: NormShape,
        x: &ArrayRef<f32, IxDyn>,
        z: Option<&ArrayRef<f32, IxDyn>>,
        dz: &ArrayRef<f32, IxDyn>,
        gamma: ArrayView1<f32>,
        stats: &BatchStats<f32>,
        epsilon: f32,
    ) -> (ArrayD<f32>, Array1<f32>, Array1<f32>) {
        let n = x.len() / (shape.pixels * shape.channels);
        assert_eq!((dz.len(), z.map_or(x.len(), |z| z.len())), (x.len(), x.len()));
        let z = z.map_or(std::ptr::null_mut(), ptr);
        let sums = Array3::<f32>::zeros((n, 2, shape.channels));
        run(reduce, &Buffers(vec![ptr(dz), z, ptr(x), ptr(&sums)]), n, n);
        let (dgamma, dbeta, coef) = norm_gradient(&sums, n * shape.pixels, gamma, stats, epsilon);
        let dx =
            written(x.raw_dim(), |dx| run(apply, &Buffers(vec![ptr(dz), z, ptr(x), ptr(&coef), dx]), n, n));
        (dx, dgamma, dbeta)
    }
}

/// The JIT backend: the interpreter with compiled kernels.
pub type Jit = Interpreter<JitKernels>;

impl Jit {
    pub fn new(program: Arc<Program>, optimizer: Optimizer) -> anyhow::Result<Self> {
        let kernels = JitKernels::compile_with(&program, Listing::default(), Some(&optimizer))?;
        Ok(Interpreter::with_kernels("jit", program, optimizer, kernels))
    }
}
