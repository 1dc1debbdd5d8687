//! The Cranelift backend: convolutions and dense layers (the model's FLOPs), pooling,
//! activations, the fused losses, dropout and the optimizer step compiled into machine code
//! specialized to each layer's shapes, run in parallel over the batch; the program itself (and
//! batchnorm) runs through the reference interpreter, which this backend reuses through the
//! [`Kernels`] seam. Checked against the reference, op by op and step by step, in tests/jit.rs.

pub mod activation;
pub mod avx512;
pub mod ceiling;
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
    ArrayD, ArrayRef, ArrayView1, ArrayView2, ArrayView4, ArrayViewD, ArrayViewMut1, ArrayViewMut2,
    ArrayViewMut4, ArrayViewMutD, Axis, IxDyn, s,
};
use rayon::prelude::*;

use super::arena::{Scratch, piece};
use super::reference::ops::Geometry;
use super::reference::{self, BlockGrads, BlockOut, BlockTape, Interpreter, Kernels, Mode, Plain};
use crate::autodiff::{Program, Step};
use crate::ir::fuse::{self, Block};
use crate::ir::train::{Loss, Optimizer};
use crate::ir::{Activation, NodeId, Op, PoolKind, Shape};
use crate::memory::Pass;
use crate::rng::Rng;
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
    /// Buffers [x padded, dy, dw zeroed, then db zeroed with a bias]; items:
    /// [`ConvShape::weight_tasks`]; batch: samples.
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
    /// over the pixels the pool reads, into a per-sample scratch buffer, and the pool from it;
    /// or, where [`PooledShape::fused`], the convolution and the pool in one kernel
    /// ([`conv::forward_max_pooled`]), and the pool for a Winograd kernel's output.
    pub pooled: Option<(PooledShape, [KernelFn; 2])>,
    /// With batchnorm, where the block's input needs no gradient and the cost model gives it
    /// ([`weight_sums_pay`]): the backward pass as [`conv::normalized_weight_sums`].
    pub weight_sums: Option<KernelFn>,
    /// Where the block runs its max pool in training ([`trained_pool_window`]): the backward
    /// pass from the pool's gradient ([`conv::pooled_backward_weights`], or with batchnorm
    /// [`conv::pooled_weight_sums`]).
    pub pooled_backward: Option<KernelFn>,
    /// With batchnorm, there: normalize, rectify and pool in one pass
    /// ([`pool::normalized_forward`]).
    pub pooled_normalize: Option<KernelFn>,
}

/// Elements per sample of a pooled block's scratch buffer (the convolution's output) and of
/// its output (the pool's).
#[derive(Debug, Clone, Copy)]
pub struct PooledShape {
    pub scratch: usize,
    pub output: usize,
    /// Whether the first kernel pools too (a max pool whose windows tile the convolution's
    /// output, after a rectifier with α ≥ 0 or none, where no Winograd kernel takes the
    /// convolution): it writes the pool's output itself, for all the samples, with no scratch.
    pub fused: bool,
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

/// The compiled kernels of one dropout node.
#[derive(Debug, Clone, Copy)]
pub struct DropoutKernel {
    /// Elements per sample.
    pub len: usize,
    /// The mask applied, forward and backward. Buffers [x or dy, mask, y or dx]; items: samples.
    pub apply: KernelFn,
    /// Training forward: the mask drawn and applied ([`eltwise::dropout_forward`]).
    pub forward: KernelFn,
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
    /// Whether two pooled blocks in a row run as one step at inference, sample by sample
    /// ([`Kernels::pairs`]): on, unless `CNNC_PAIR=0` (for comparisons).
    pub pair_blocks: bool,
    /// Whether convolutions' input gradients and dense layers' forward passes run in 512-bit
    /// vectors ([`avx512`]): where the CPU has AVX-512F, unless `CNNC_AVX512=0`. Winograd's
    /// products take the same test, when their kernels are compiled (`WinogradShape::wide`).
    pub wide: bool,
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
            let input = program.graph.node(block.linear).inputs[0];
            let sums =
                block.norm.is_some() && !program.needs_grad[input.index()] && weight_sums_pay(&conv_shape);
            if sums {
                ids.push(compiler.kernel(&format!("{name}_backward_sums"), |e| {
                    conv::normalized_weight_sums(e, &conv_shape, rectify)
                })?);
            }
            let pooled_backward = trained_pool_window(program, block, &conv_shape, sums);
            match (pooled_backward, block.pool) {
                (Some(window), Some(pool)) if block.norm.is_some() => {
                    let (ps, _) =
                        pool_shape(program, pool, &program.graph.node(pool).op).expect("a max pool");
                    ids.push(compiler.kernel(&format!("{name}_backward_sums_pooled"), |e| {
                        conv::pooled_weight_sums(e, &conv_shape, window)
                    })?);
                    ids.push(
                        compiler.kernel(&format!("{name}_normalize_pooled"), |e| {
                            pool::normalized_forward(e, &ps)
                        })?,
                    );
                }
                (Some(window), _) => ids.push(compiler.kernel(&format!("{name}_backward_pooled"), |e| {
                    conv::pooled_backward_weights(e, &conv_shape, window)
                })?),
                (None, _) => {}
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
                // windows that tile the rows and columns read, and a rectifier that commutes
                // with the max: one kernel for both
                let tiling =
                    ps.kh == ps.sh && ps.kw == ps.sw && [rows, cols] == [ps.oh * ps.kh, ps.ow * ps.kw];
                // (where a Winograd kernel takes the convolution, this one is only its fallback)
                let by_winograd = pooled_block_winograd(&conv_shape, &conv_part).is_some();
                let fused =
                    tiling && rectify.is_none_or(|a| a >= 0.0) && !conv_part.is_point() && !by_winograd;
                let window = [ps.kh, ps.kw];
                ids.push(if fused {
                    compiler.kernel(&format!("{name}_infer_conv_pool"), |e| {
                        conv::forward_max_pooled(e, &conv_part, window, rectify)
                    })?
                } else {
                    compiler
                        .kernel(&format!("{name}_infer_pooled"), |e| conv::forward(e, &conv_part, epilogue))?
                });
                ids.push(compiler.kernel(&format!("{name}_pool"), |e| pool::forward(e, &pool_part))?);
                let (scratch, output) = (rows * cols * conv_shape.f, ps.oh * ps.ow * ps.c);
                pooled = Some(PooledShape { scratch, output, fused });
            }
            let flags = [block.norm.is_some(), sums, pooled_backward.is_some()];
            pending_blocks.push((block.output(), shape, rectify, flags, pooled, ids));
        }
        let mut ids: Vec<_> = pending.iter().flat_map(|p| p.3).collect();
        ids.extend(pending_pools.iter().flat_map(|p| p.3));
        ids.extend(pending_rectifiers.iter().flat_map(|p| p.2));
        ids.extend(pending_norms.iter().flat_map(|p| p.2));
        ids.extend(pending_blocks.iter().flat_map(|p| p.5.iter().copied()));
        // Every kernel is compiled in one finish: the longest (an F(4x4) Winograd kernel, ~20
        // ms) then overlaps all the others on the worker threads.
        let rest = compile_rest(&mut compiler, program, optimizer)?;
        let winograd = compile_winograd(&mut compiler, program)?;
        let main = ids.len();
        ids.extend(&rest.ids);
        ids.extend(&winograd.ids);
        let all = compiler.finish(&ids)?;
        let (code, later) = all.split_at(main);
        let (rest_code, winograd_code) = later.split_at(rest.ids.len());
        let others = (rest.bind)(rest_code);
        let (winograd, block_winograd) = (winograd.bind)(winograd_code);
        let ids = &ids[..main];
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
        for (output, shape, rectify, [has_norm, has_sums, has_pooled_backward], pooled, ids) in pending_blocks
        {
            let (fns, tail) = rest.split_at(ids.len());
            rest = tail;
            let norm = has_norm.then(|| [fns[1], fns[2], fns[3], fns[4]]);
            let weight_sums = has_sums.then(|| fns[5]);
            // after the forward kernel, the four of batchnorm and the sums' kernel, each where
            // built; with batchnorm, the pooled normalize after it
            let at = 1 + 4 * usize::from(has_norm) + usize::from(has_sums);
            let pooled_backward = has_pooled_backward.then(|| fns[at]);
            let pooled_normalize = (has_pooled_backward && has_norm).then(|| fns[at + 1]);
            let pooled = pooled.map(|p| (p, [fns[fns.len() - 2], fns[fns.len() - 1]]));
            let kernels = BlockKernels {
                shape,
                rectify,
                forward: fns[0],
                norm,
                pooled,
                weight_sums,
                pooled_backward,
                pooled_normalize,
            };
            blocks.insert(output, kernels);
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
        let listings = std::mem::take(&mut compiler.listings);
        Ok(JitKernels {
            convs,
            winograd,
            block_winograd,
            masked_blocks: relu_pools.values().copied().collect(),
            norms,
            blocks,
            pools,
            rectifiers,
            sigmoidals: others.sigmoidals,
            avgpools: others.avgpools,
            dropouts: others.dropouts,
            softmaxes: others.softmaxes,
            loss: others.loss,
            optimizer: others.optimizer,
            runs: AtomicUsize::new(0),
            _compiler: std::sync::Mutex::new(compiler),
            compile_ms: started.elapsed().as_secs_f64() * 1e3,
            pair_blocks: std::env::var("CNNC_PAIR").map_or(true, |v| v != "0"),
            wide: avx512::available(),
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
            + self.dropouts.len() * 2
            + self.softmaxes.len()
            + usize::from(self.loss.is_some())
            + usize::from(self.optimizer.is_some())
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

/// Builds the element-wise activations, average pools, dropouts, softmaxes, the fused loss
/// and the optimizer step: their kernels' ids, and what makes them [`Rest`] once compiled
/// (given the ids' entry points, in order).
fn compile_rest<'p>(
    compiler: &mut Compiler,
    program: &'p Program,
    optimizer: Option<&Optimizer>,
) -> anyhow::Result<Built<impl FnOnce(&[KernelFn]) -> Rest + use<'p>>> {
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
            let d =
                define(compiler, &mut ids, &format!("{name}_forward"), |e| eltwise::dropout_forward(e, len))?;
            dropouts.push((id, len, [f, d]));
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
    let bind = move |code: &[KernelFn]| Rest {
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
            .map(|(id, len, [f, d])| (id, DropoutKernel { len, apply: code[f], forward: code[d] }))
            .collect(),
        softmaxes: softmaxes
            .into_iter()
            .map(|(id, rows, c, f)| (id, SoftmaxKernel { rows, c, forward: code[f] }))
            .collect(),
        loss: fused.map(|(loss, k, i)| LossKernel { node: program.logits, loss, k, kernel: code[i] }),
        optimizer: step.map(|(rule, i)| OptimizerKernel { rule, kernel: code[i] }),
    };
    Ok(Built { ids, bind })
}

/// A pooled block's convolution at inference: only the rows and columns some window of the
/// pool `ps` reads (a `floor` drops the rest), with a bias when batchnorm is folded in.
fn pooled_conv_shape(conv: &ConvShape, ps: &PoolShape, block: &Block) -> ConvShape {
    let rows = (ps.oh - 1) * ps.sh + ps.kh;
    let cols = (ps.ow - 1) * ps.sw + ps.kw;
    ConvShape { oh: rows, ow: cols, bias: conv.bias || block.norm.is_some(), ..*conv }
}

/// Whether a normalizing block's backward pass takes [`conv::normalized_weight_sums`] (where its
/// input needs no gradient): a convolution with at most [`WEIGHT_SUMS_ROWS`] rows of dw, whose
/// sums then cost 2·K multiply-adds per output pixel and channel against the K of the weight
/// kernel and the passes that write dc and read it back (unless `CNNC_WEIGHT_SUMS=0`, for
/// comparisons).
fn weight_sums_pay(conv: &ConvShape) -> bool {
    let rows = conv.kh * conv.kw * conv.c;
    !conv.is_point() && rows <= WEIGHT_SUMS_ROWS && !std::env::var("CNNC_WEIGHT_SUMS").is_ok_and(|v| v == "0")
}

/// The most rows of dw (KH·KW·C) for which [`weight_sums_pay`]. Measured (the block's backward,
/// 2 threads, batch 128, alternated in one run with `CNNC_WEIGHT_SUMS=0`): 3x3 over one
/// channel 1.49–1.55x faster (32 filters, 32x32) and 1.01–1.10x (16 filters, 28x28); 2x2 over
/// three channels (12 rows, 32 filters) 1.15–1.45x; 3x3 over two (18 rows) 1.11–1.13x; but
/// 4x4 over one channel (16 rows, 16 filters) 0.78–0.80x, 5x5 (25 rows) 0.62–0.66x and 3x3 over
/// three channels (27 rows) 0.74–0.84x.
const WEIGHT_SUMS_ROWS: usize = 12;

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
    let m = winograd_tile(conv);
    let hp = conv.hp.max(m * conv.oh.div_ceil(m) + 2);
    let wp = conv.wp.max(m * conv.ow.div_ceil(m) + 2);
    WinogradShape::new(ConvShape { hp, wp, ..*conv }, m)
}

/// The Winograd tile for `conv` in training: the cost model's ([`winograd::tile_size`]), or
/// the one `CNNC_WINOGRAD=2` or `=4` asks for (for comparisons).
fn winograd_tile(conv: &ConvShape) -> usize {
    forced_tile()
        .filter(|&m| m <= 4)
        .unwrap_or_else(|| winograd::tile_size(conv.c, conv.f, [conv.oh, conv.ow]))
}

/// The tile that `CNNC_WINOGRAD` = 2, 4, 5 or 6 asks for, if any (5 and 6 only at inference).
fn forced_tile() -> Option<usize> {
    std::env::var("CNNC_WINOGRAD").ok()?.parse().ok().filter(|m| matches!(m, 2 | 4 | 5 | 6))
}

/// The window of the max pool after `block` where the block runs the pool in training
/// ([`Kernels::takes_pool`]): a block whose input needs no gradient (a first layer: no input
/// gradient kernel needs dy) and which ends in a relu, followed by a max pool whose windows
/// tile the convolution's output. Without batchnorm, where the weight gradient is the direct
/// kernel's: the forward pass is then the inference kernel of the convolution and the pool in
/// one ([`conv::forward_max_pooled`]) and the backward pass [`conv::pooled_backward_weights`],
/// which recomputes the convolution's output instead of reading the block's. With batchnorm,
/// where the block has the sums' kernel (`sums`) and a row of windows fits its staging: the
/// forward pass normalizes, rectifies and pools in one pass over the convolution's output
/// ([`pool::normalized_forward`]) and the backward pass is [`conv::pooled_weight_sums`], which
/// takes g from the pool's gradient. Unless `CNNC_POOL_TRAIN=0`, for comparisons.
fn trained_pool_window(program: &Program, block: &Block, conv: &ConvShape, sums: bool) -> Option<[usize; 2]> {
    let pool = block.pool?;
    let relu = block.act.and_then(|a| fuse::fusable_rectifier(&program.graph.node(a).op)) == Some(0.0);
    let input = program.graph.node(block.linear).inputs[0];
    let (ps, pads) = pool_shape(program, pool, &program.graph.node(pool).op)?;
    let tiles = pads == [0; 4] && ps.tiles_exactly() && [ps.hp, ps.wp] == [conv.oh, conv.ow];
    let window = [ps.kh, ps.kw];
    let kernels = match block.norm {
        Some(_) => sums && conv::pooled_sums_staging(conv, window) <= POOLED_SUMS_STAGING,
        None => {
            let tile = winograd::weight_tile_size(conv.c, conv.f, [conv.oh, conv.ow]);
            let winograd_weights = winograd_wanted(conv) && WinogradShape::for_weights(*conv, tile).is_some();
            !winograd_weights && !conv.is_point()
        }
    };
    let wanted = !std::env::var("CNNC_POOL_TRAIN").is_ok_and(|v| v == "0");
    (wanted && relu && tiles && !program.needs_grad[input.index()] && kernels).then_some(window)
}

/// The most bytes of [`conv::pooled_weight_sums`]'s staging (a stack slot of the kernel's):
/// mnist_bn.cnn's first layer takes 13 KB.
const POOLED_SUMS_STAGING: usize = 64 << 10;

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

/// The Winograd shape of a pooled block's convolution at inference, which reads the layer's
/// padded input as it is: the inference cost model's tile ([`winograd::inference_tile_size`])
/// among those whose windows fit that input, or the one `CNNC_WINOGRAD` forces where it fits.
fn pooled_winograd(conv: &ConvShape) -> Option<WinogradShape> {
    let fits = |m: usize| WinogradShape::new(*conv, m).is_some();
    let m = forced_tile()
        .filter(|&m| fits(m))
        .or_else(|| winograd::inference_tile_size(conv.c, conv.f, [conv.oh, conv.ow], fits))?;
    WinogradShape::new(*conv, m)
}

/// The Winograd shape of a pooled block's convolution `part` (the pixels the pool reads of the
/// layer `conv`) at inference, where the layer has Winograd's kernels at all
/// ([`winograd_shape`]) and a tile fits ([`pooled_winograd`]): one predicate for the block's
/// kernels and for Winograd's, so that they agree on which kernel convolves.
fn pooled_block_winograd(conv: &ConvShape, part: &ConvShape) -> Option<WinogradShape> {
    winograd_shape(conv)?;
    pooled_winograd(part)
}

/// Whether the cost model gives `conv` Winograd's kernels (and `CNNC_WINOGRAD=0` does not
/// take them away).
fn winograd_wanted(conv: &ConvShape) -> bool {
    !std::env::var("CNNC_WINOGRAD").is_ok_and(|v| v == "0") && winograd::chosen(conv.c, conv.f)
}

/// Kernels built and not compiled yet: their ids, and what puts their entry points (given in
/// the ids' order) into the backend's tables.
struct Built<B> {
    ids: Vec<FuncId>,
    bind: B,
}

/// The Winograd kernels of a program's conv2d nodes and blocks, by node.
type WinogradMaps = (HashMap<NodeId, WinogradKernels>, HashMap<NodeId, BlockWinograd>);

/// Builds the Winograd kernels of every conv2d node and block whose layer the cost model gives
/// them: their ids, and what makes the maps of them once compiled (as [`compile_rest`]).
fn compile_winograd(
    compiler: &mut Compiler,
    program: &Program,
) -> anyhow::Result<Built<impl FnOnce(&[KernelFn]) -> WinogradMaps + use<>>> {
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
        let tile = winograd::weight_tile_size(conv.c, conv.f, [conv.oh, conv.ow]);
        let weights = match WinogradShape::for_weights(conv, tile).filter(|_| winograd_wanted(&conv)) {
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
        // A block that ends in a pool runs its pooled kernels at inference (compiled for every
        // such block), never the unpooled one: not compiled (an F(4x4) kernel takes 10–20 ms).
        let infer = match block.norm.filter(|_| block.pool.is_none()) {
            Some(_) => {
                let folded_shape =
                    WinogradShape::new(ConvShape { bias: true, ..shape.conv }, shape.m).expect("as above");
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
            Some((ps, _)) => match pooled_block_winograd(&conv, &pooled_conv_shape(&conv, &ps, block)) {
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
    let bind = move |code: &[KernelFn]| {
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
        (convs, blocks)
    };
    Ok(Built { ids, bind })
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

/// Buffer pointers handed to kernels running on several threads: up to eight, in place (a
/// step allocates nothing).
#[derive(Clone, Copy)]
struct Buffers {
    ptrs: [*mut f32; 8],
    len: usize,
}
// SAFETY: each kernel call writes only the part of its output that belongs to its own range
// of work items (samples, or weight-gradient tasks), or its shard's own scratch; everything
// else it only reads.
unsafe impl Sync for Buffers {}
unsafe impl Send for Buffers {}

impl Buffers {
    fn new(ptrs: &[*mut f32]) -> Self {
        let mut all = Buffers { ptrs: [std::ptr::null_mut(); 8], len: 0 };
        for &p in ptrs {
            all = all.with(p);
        }
        all
    }

    /// Buffer `i` (a method, so that closures capture the whole `Sync` list).
    fn get(&self, i: usize) -> *mut f32 {
        self.ptrs[i]
    }

    /// The buffers and one more.
    fn with(mut self, last: *mut f32) -> Self {
        assert!(self.len < self.ptrs.len(), "kernels take at most eight buffers");
        self.ptrs[self.len] = last;
        self.len += 1;
        self
    }

    /// The last buffer replaced by `last`.
    fn with_last(mut self, last: *mut f32) -> Self {
        self.ptrs[self.len - 1] = last;
        self
    }

    fn as_ptr(&self) -> *const *mut f32 {
        self.ptrs.as_ptr()
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

    fn kernel(self) -> KernelFn {
        match self {
            ConvForward::Direct(k) | ConvForward::Winograd(_, k) => k,
        }
    }

    /// Elements of the weights as this kernel reads them.
    fn weights_len(self, conv: &ConvShape) -> usize {
        match self {
            ConvForward::Direct(_) => conv.kh * conv.kw * conv.c * conv.f,
            ConvForward::Winograd(shape, _) => shape.weights_len(),
        }
    }

    /// The weights as this kernel reads them, from the layer's HWIO kernel `w`, into `out`.
    fn prepare_weights(self, conv: &ConvShape, w: &[f32], out: &mut [f32]) {
        match self {
            ConvForward::Direct(_) => {
                let (k, n) = (conv.kh * conv.kw * conv.c, conv.f);
                conv::pack_into(k, n, |row, col| w[row * n + col], out)
            }
            ConvForward::Winograd(shape, _) => winograd::transform_weights_into(w, &shape, out),
        }
    }

    /// Elements of scratch one call (one shard) needs.
    fn scratch(self) -> usize {
        match self {
            ConvForward::Direct(_) => 0,
            ConvForward::Winograd(shape, _) => shape.scratch(),
        }
    }

    /// The padding of the kernel's input: the layer's, and for Winograd's tiles further
    /// bottom/right.
    fn pads(self, conv: &ConvKernels) -> [usize; 4] {
        let [top, bottom, left, right] = conv.pads;
        match self {
            ConvForward::Direct(_) => conv.pads,
            ConvForward::Winograd(shape, _) => {
                [top, bottom + shape.conv.hp - conv.shape.hp, left, right + shape.conv.wp - conv.shape.wp]
            }
        }
    }

    /// Scratch of [`conv_forward_into`] for `n` samples.
    fn scratch_for(self, conv: &ConvKernels, n: usize) -> usize {
        piece(padded_len(n, input_hwc(conv), self.pads(conv)))
            + piece(self.weights_len(&conv.shape))
            + piece(shard_count(n) * self.scratch())
    }
}

/// The unpadded input (H, W, C) of a convolution's kernels.
fn input_hwc(conv: &ConvKernels) -> [usize; 3] {
    let s = &conv.shape;
    [s.hp - conv.pads[0] - conv.pads[1], s.wp - conv.pads[2] - conv.pads[3], s.c]
}

/// `x` (N, H, W, C) through a convolution's forward pass into `y`, with its bias and batch
/// sums (null when the kernel has none): padded as the layer pads it (and further
/// bottom/right for Winograd's tiles), the weights `w` (HWIO) prepared as the kernel reads
/// them, both in scratch ([`ConvForward::scratch_for`]).
#[allow(clippy::too_many_arguments)]
fn conv_forward_into(
    forward: ConvForward,
    conv: &ConvKernels,
    x: ArrayView4<f32>,
    w: &[f32],
    bias: *mut f32,
    y: *mut f32,
    sums: *mut f32,
    s: &mut Scratch<f32>,
) {
    let n = x.dim().0;
    let xp = padded_into(x, forward.pads(conv), 0.0, s);
    let weights = s.take(forward.weights_len(&conv.shape));
    forward.prepare_weights(&conv.shape, w, weights);
    let buffers = Buffers::new(&[xp, weights.as_mut_ptr(), bias, y, sums]);
    match forward {
        ConvForward::Direct(kernel) => run(kernel, buffers, n, n),
        ConvForward::Winograd(shape, kernel) => run_with_scratch(kernel, buffers, shape.scratch(), n, n, s),
    }
}

/// How many shards [`shards`] splits `items` into.
fn shard_count(items: usize) -> usize {
    rayon::current_num_threads().min(items).max(1)
}

/// `items` work items split into one contiguous range per thread, in parallel: (shard, lo, hi).
fn shards(items: usize) -> impl ParallelIterator<Item = (usize, usize, usize)> {
    let shards = shard_count(items);
    (0..shards)
        .into_par_iter()
        .map(move |shard| (shard, items * shard / shards, items * (shard + 1) / shards))
}

/// [`run`] for a kernel whose last buffer is a scratch of `per_shard` elements: each shard
/// gets its own, zeroed, from `s` (`shard_count(items) · per_shard` elements).
fn run_with_scratch(
    kernel: KernelFn,
    buffers: Buffers,
    per_shard: usize,
    items: usize,
    batch: usize,
    s: &mut Scratch<f32>,
) {
    let own = s.zeroed(shard_count(items) * per_shard);
    let buffers = buffers.with(own.as_mut_ptr());
    shards(items).for_each(|(shard, lo, hi)| {
        // SAFETY: the scratch holds shard_count(items) pieces of `per_shard` elements.
        let all = buffers.with_last(unsafe { buffers.get(buffers.len - 1).add(shard * per_shard) });
        // SAFETY: the buffers have the shapes the kernel was compiled for, the items lo..hi lie
        // within them, and the scratch piece is this shard's alone.
        unsafe { kernel(all.as_ptr(), lo as i64, hi as i64, batch as i64) };
    });
}

/// Winograd's weight gradient ([`winograd::weight_gradient`]) of a batch of `n` samples of x
/// and dy: the batch in [`winograd::weight_pieces`] pieces on the worker threads, each with
/// an M, a scratch and (with a bias) sums for db of its own, then the pieces' M and sums added
/// in order ([`add_pieces`]). Returns M and the sums (in [`winograd::bias_scale`]
/// units), in the first piece's place.
fn winograd_weight_pieces<'s>(
    kernel: KernelFn,
    shape: &WinogradShape,
    [x, dy]: [*mut f32; 2],
    n: usize,
    s: &mut Scratch<'s, f32>,
) -> (&'s mut [f32], Option<&'s mut [f32]>) {
    let (pieces, plane) = (winograd::weight_pieces(n), shape.positions() * shape.conv.c * shape.conv.f);
    let f = shape.conv.f;
    let m = s.zeroed(pieces * plane);
    let scratch = s.take(pieces * shape.weight_scratch());
    let mut sums = shape.conv.bias.then(|| s.zeroed(pieces * f));
    let sums_ptr = sums.as_mut().map_or(std::ptr::null_mut(), |b| b.as_mut_ptr());
    let buffers = Buffers::new(&[x, dy, m.as_mut_ptr(), scratch.as_mut_ptr(), sums_ptr]);
    (0..pieces).into_par_iter().with_max_len(1).for_each(|piece| {
        let (lo, hi) = (n * piece / pieces, n * (piece + 1) / pieces);
        let sums = buffers.get(4);
        // SAFETY: M, the scratch and the sums hold `pieces` pieces of their sizes, each
        // piece's its own.
        let own = unsafe {
            Buffers::new(&[
                buffers.get(0),
                buffers.get(1),
                buffers.get(2).add(piece * plane),
                buffers.get(3).add(piece * shape.weight_scratch()),
                if sums.is_null() { sums } else { sums.add(piece * f) },
            ])
        };
        // SAFETY: x and dy hold the batch's samples as the kernel was compiled for them, and
        // samples lo..hi lie within them.
        unsafe { kernel(own.as_ptr(), lo as i64, hi as i64, n as i64) };
    });
    (add_pieces(m, plane), sums.map(|sums| add_pieces(sums, f)))
}

/// The pieces of `len` elements that `all` holds, added in order into the first (in parallel
/// over runs of elements, each summing the pieces in order): the first piece, returned.
fn add_pieces(all: &mut [f32], len: usize) -> &mut [f32] {
    const RUN: usize = 4096;
    let (first, rest) = all.split_at_mut(len);
    first.par_chunks_mut(RUN).enumerate().for_each(|(run, sums)| {
        for other in rest.chunks_exact(len) {
            for (sum, value) in sums.iter_mut().zip(&other[run * RUN..]) {
                *sum += value;
            }
        }
    });
    first
}

/// Runs `kernel` over `items` work items, split into one contiguous shard per thread.
fn run(kernel: KernelFn, buffers: Buffers, items: usize, batch: usize) {
    shards(items).for_each(|(_, lo, hi)| {
        // SAFETY: the buffers have the shapes the kernel was compiled for (checked by the
        // callers' asserts), and the items lo..hi lie within them.
        unsafe { kernel(buffers.as_ptr(), lo as i64, hi as i64, batch as i64) }
    });
}

/// A block's convolution weights (HWIO, checked against the kernel's shape) and its bias, if
/// it has one.
fn conv_params<'p>(
    program: &Program,
    block: &Block,
    params: &'p [ArrayD<f32>],
    sh: &ConvShape,
) -> (&'p [f32], Option<&'p [f32]>) {
    let indices = &program.node_params[block.linear.index()];
    let w = params[indices[0]].as_slice().expect("row-major");
    assert_eq!(w.len(), sh.kh * sh.kw * sh.c * sh.f, "the kernel was compiled for this weight");
    (w, sh.bias.then(|| params[indices[1]].as_slice().expect("row-major")))
}

/// The bias pointer a kernel takes: null without one (the kernel was compiled not to read it).
fn bias_ptr(b: Option<&[f32]>) -> *mut f32 {
    b.map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut f32)
}

/// A fused block's batchnorm: its ε and its parameter `i` (γ, β, moving mean, moving variance),
/// per channel; `None` without one.
fn block_norm<'a>(
    program: &'a Program,
    block: &Block,
    params: &'a [ArrayD<f32>],
) -> Option<(f32, impl Fn(usize) -> &'a [f32] + Copy + 'a)> {
    let norm = block.norm?;
    let Op::BatchNorm(bn) = program.graph.node(norm).op else { unreachable!("a batchnorm") };
    let indices = &program.node_params[norm.index()];
    Some((bn.epsilon, move |i: usize| params[indices[i]].as_slice().expect("per channel")))
}

/// At inference, `block`'s batchnorm folded into its convolution's weights `w·s` and bias
/// `(b − mean)·s + β`, s = γ/σ, in `s` (summed in f64); `None` without a batchnorm.
fn fold_norm<'s>(
    program: &Program,
    block: &Block,
    params: &[ArrayD<f32>],
    sh: &ConvShape,
    (w, b): (&[f32], Option<&[f32]>),
    s: &mut Scratch<'s, f32>,
) -> Option<(&'s [f32], *mut f32)> {
    let (epsilon, p) = block_norm(program, block, params)?;
    let (gamma, beta, mean, var) = (p(0), p(1), p(2), p(3));
    let scale = |f: usize| f64::from(gamma[f]) * (1.0 / (f64::from(var[f]) + f64::from(epsilon)).sqrt());
    let weights = s.take(w.len());
    for (i, (out, v)) in weights.iter_mut().zip(w).enumerate() {
        *out = (f64::from(*v) * scale(i % sh.f)) as f32;
    }
    let bias = s.take(sh.f);
    for (f, out) in bias.iter_mut().enumerate() {
        let b0 = b.map_or(0.0, |b| f64::from(b[f]));
        *out = ((b0 - f64::from(mean[f])) * scale(f) + f64::from(beta[f])) as f32;
    }
    Some((&*weights, bias.as_mut_ptr()))
}

/// A pooled block at inference, prepared (its weights and padded input in the step's scratch),
/// to run a sample at a time: the convolution (`conv`, buffers x, w, b) of a sample into a
/// scratch buffer of one sample, then the pool (`pool`) from it into y. The scratch stays in
/// cache: the convolution's output never goes to memory. A fused block's one kernel does both,
/// with no scratch. Each shard's scratch (`shape.scratch + conv.scratch()` elements) is the
/// run's own.
struct PooledRun {
    conv: ConvForward,
    pool: KernelFn,
    /// x, w, b, y, and the shards' scratch.
    buffers: Buffers,
    x_sample: usize,
    shape: PooledShape,
    per_shard: usize,
    n: usize,
}

impl PooledRun {
    fn new(
        conv: ConvForward,
        pool: KernelFn,
        [x, w, b, y]: [*mut f32; 4],
        x_sample: usize,
        shape: PooledShape,
        n: usize,
        s: &mut Scratch<f32>,
    ) -> Self {
        let per_shard = if shape.fused { 0 } else { shape.scratch + conv.scratch() };
        let own = s.zeroed(shard_count(n) * per_shard);
        let buffers = Buffers::new(&[x, w, b, y, own.as_mut_ptr()]);
        PooledRun { conv, pool, buffers, x_sample, shape, per_shard, n }
    }

    /// Every sample, a shard a thread.
    fn run(&self) {
        if self.shape.fused {
            let buffers = Buffers::new(&self.buffers.ptrs[..4]);
            return run(self.conv.kernel(), buffers, self.n, self.n);
        }
        shards(self.n).for_each(|(shard, lo, hi)| (lo..hi).for_each(|i| self.sample(shard, i)));
    }

    /// Sample `i` on shard `shard`'s scratch.
    fn sample(&self, shard: usize, i: usize) {
        assert!(i < self.n && shard < shard_count(self.n), "sample {i} of {}, shard {shard}", self.n);
        let [x, w, b, y, own] = [0, 1, 2, 3, 4].map(|k| self.buffers.get(k));
        let kernel = self.conv.kernel();
        if self.shape.fused {
            // SAFETY: the fused kernel was compiled for these buffers' batch; sample i lies in it.
            return unsafe { kernel([x, w, b, y].as_ptr(), i as i64, i as i64 + 1, self.n as i64) };
        }
        // SAFETY: the shard's piece of the scratch: the convolution's output, then its tiles.
        let (scratch, tiles) = unsafe {
            (own.add(shard * self.per_shard), own.add(shard * self.per_shard + self.shape.scratch))
        };
        // SAFETY: x holds n samples of `x_sample` elements and y n of `shape.output`, so both
        // offsets stay inside them; the kernels were compiled for one sample of these shapes
        // (the convolution's output is `shape.scratch` elements; a Winograd kernel's own
        // scratch is `tiles`).
        unsafe {
            let buffers = [x.add(i * self.x_sample), w, b, scratch, std::ptr::null_mut(), tiles];
            kernel(buffers.as_ptr(), 0, 1, 1);
            let pool_buffers = [scratch, y.add(i * self.shape.output)];
            (self.pool)(pool_buffers.as_ptr(), 0, 1, 1);
        }
    }
}

/// Elements of [`padded_into`]'s copy of `n` samples of (H, W, C) inside `pads`.
fn padded_len(n: usize, [h, w, c]: [usize; 3], pads: [usize; 4]) -> usize {
    if pads == [0; 4] { 0 } else { n * (h + pads[0] + pads[1]) * (w + pads[2] + pads[3]) * c }
}

/// `x` (N,H,W,C) inside a border of `pads` filled with `border`, in scratch; `x` itself when
/// there is no border (no copy: a full pass over memory saved).
fn padded_into(x: ArrayView4<f32>, pads: [usize; 4], border: f32, s: &mut Scratch<f32>) -> *mut f32 {
    if pads == [0; 4] {
        return contiguous(&x);
    }
    let (n, h, w, c) = x.dim();
    let dims = (n, h + pads[0] + pads[1], w + pads[2] + pads[3], c);
    let out = s.take(padded_len(n, [h, w, c], pads));
    let mut padded = ArrayViewMut4::from_shape(dims, out).expect("the padded size");
    // sample by sample on the worker threads, each sample's border and inside while in cache
    padded.axis_iter_mut(Axis(0)).into_par_iter().zip(x.axis_iter(Axis(0))).for_each(|(mut p, xs)| {
        p.fill(border);
        p.slice_mut(s![pads[0]..pads[0] + h, pads[2]..pads[2] + w, ..]).assign(&xs);
    });
    padded.as_mut_ptr()
}

/// The pointer of a row-major array (kernels index their buffers as dense arrays).
fn contiguous<D: ndarray::Dimension>(a: &ArrayRef<f32, D>) -> *mut f32 {
    assert!(a.is_standard_layout(), "kernels read row-major buffers");
    a.as_ptr() as *mut f32
}

/// The pointer of an output view (row-major).
fn out_ptr<D: ndarray::Dimension>(a: &mut ArrayRef<f32, D>) -> *mut f32 {
    assert!(a.is_standard_layout(), "kernels write row-major buffers");
    a.as_mut_ptr()
}

/// A gradient kernel's output `dx` (N,H,W,C), written through a zeroed buffer padded by
/// `pads` (in scratch; `dx` itself, zeroed, without padding), then cropped into `dx` by
/// [`crop_into`].
fn padded_output(dx: &mut ArrayViewMut4<f32>, pads: [usize; 4], s: &mut Scratch<f32>) -> *mut f32 {
    if pads == [0; 4] {
        dx.fill(0.0);
        return out_ptr(dx);
    }
    let (n, h, w, c) = dx.dim();
    s.zeroed(padded_len(n, [h, w, c], pads)).as_mut_ptr()
}

/// The inside of the padded buffer `dxp` that [`padded_output`] gave into `dx`.
fn crop_into(dxp: *mut f32, pads: [usize; 4], dx: &mut ArrayViewMut4<f32>) {
    if pads == [0; 4] {
        return;
    }
    let (n, h, w, c) = dx.dim();
    let dims = (n, h + pads[0] + pads[1], w + pads[2] + pads[3], c);
    // SAFETY: `dxp` is the scratch buffer of these dims that `padded_output` returned.
    let padded = unsafe { ArrayView4::from_shape_ptr(dims, dxp) };
    dx.assign(&padded.slice(s![.., pads[0]..pads[0] + h, pads[2]..pads[2] + w, ..]));
}

/// How many samples of `len` elements `total` elements hold (whole samples only).
fn samples(len: usize, total: usize) -> usize {
    assert_eq!(total % len.max(1), 0, "the kernel was compiled for this sample size");
    total / len.max(1)
}

impl JitKernels {
    /// [`run`], counted in [`JitKernels::runs`].
    fn run_counted(&self, kernel: KernelFn, buffers: Buffers, items: usize, batch: usize) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        run(kernel, buffers, items, batch);
    }

    /// The forward kernel of conv or dense `node` as it runs.
    fn conv_forward_kernel(&self, node: NodeId, k: &ConvKernels) -> ConvForward {
        ConvForward::of(k.forward, self.winograd.get(&node).and_then(|wk| wk.forward))
    }

    /// Scratch of [`Kernels::conv2d_forward_into`] (and dense) for `n` samples.
    fn conv_forward_scratch(&self, node: NodeId, n: usize) -> usize {
        let Some(k) = self.convs.get(&node) else { return 0 };
        self.conv_forward_kernel(node, k).scratch_for(k, n)
    }

    /// Scratch of [`Kernels::conv2d_backward_weights_into`] for `n` samples.
    fn conv_weights_scratch(&self, node: NodeId, n: usize) -> usize {
        let Some(k) = self.convs.get(&node) else { return 0 };
        let s = &k.shape;
        let padded = piece(padded_len(n, input_hwc(k), k.pads));
        match self.winograd.get(&node).and_then(|wk| wk.weight_gradient) {
            Some((shape, _)) => {
                let (pieces, m) = (winograd::weight_pieces(n), shape.positions() * s.c * s.f);
                let sums = if s.bias { piece(pieces * s.f) } else { 0 };
                padded + piece(pieces * m) + piece(pieces * shape.weight_scratch()) + sums
            }
            None => padded,
        }
    }

    /// Scratch of [`Kernels::conv2d_backward_input_into`] for `n` samples.
    fn conv_input_scratch(&self, node: NodeId, n: usize) -> usize {
        let Some(k) = self.convs.get(&node) else { return 0 };
        let s = &k.shape;
        // the weights transposed: packed for the Cranelift kernel, padded to whole vectors for
        // the AVX-512 one
        let weights =
            if self.wide && !s.is_point() { avx512::transposed_len(s) } else { s.kh * s.kw * s.c * s.f };
        piece(weights) + piece(padded_len(n, input_hwc(k), k.pads))
    }

    /// Scratch of a node's forward kernel in `pass` (unfused) for `n` samples.
    fn node_forward_scratch(&self, program: &Program, id: NodeId, pass: Pass, n: usize) -> usize {
        match program.graph.node(id).op {
            Op::Conv2d(_) | Op::Dense(_) => self.conv_forward_scratch(id, n),
            Op::Pool(p) => {
                let found = match p.kind {
                    PoolKind::Max => self.pools.get(&id).map(|k| (k.pads, k.shape)),
                    PoolKind::Avg => self.avgpools.get(&id).map(|k| (k.pads, k.shape)),
                };
                found.map_or(0, |(pads, shape)| piece(padded_len(n, pool_input(&shape, pads), pads)))
            }
            Op::BatchNorm(_) => match (self.norms.get(&id), pass) {
                (Some(k), Pass::Train) => piece(2 * n * k.shape.channels) + piece(2 * k.shape.channels),
                (Some(k), Pass::Infer) => 2 * piece(2 * k.shape.channels),
                (None, _) => 0,
            },
            _ => 0,
        }
    }

    /// Scratch of a node's backward kernels (unfused) for `n` samples.
    fn node_backward_scratch(&self, program: &Program, id: NodeId, n: usize) -> usize {
        let node = program.graph.node(id);
        let need_dx = program.needs_grad[node.inputs[0].index()];
        match node.op {
            Op::Conv2d(_) | Op::Dense(_) => {
                self.conv_weights_scratch(id, n) + if need_dx { self.conv_input_scratch(id, n) } else { 0 }
            }
            Op::Pool(p) => match p.kind {
                PoolKind::Max => self
                    .pools
                    .get(&id)
                    .map_or(0, |k| 2 * piece(padded_len(n, pool_input(&k.shape, k.pads), k.pads))),
                PoolKind::Avg => self
                    .avgpools
                    .get(&id)
                    .map_or(0, |k| piece(padded_len(n, pool_input(&k.shape, k.pads), k.pads))),
            },
            Op::BatchNorm(_) => self
                .norms
                .get(&id)
                .map_or(0, |k| piece(2 * n * k.shape.channels) + piece(3 * k.shape.channels)),
            _ => 0,
        }
    }

    /// The kernels of a fused block, when this backend runs it as one.
    fn block_kernels(&self, block: &Block) -> Option<(&BlockKernels, &ConvKernels)> {
        let k = self.blocks.get(&block.output())?;
        let conv = self.convs.get(&block.linear)?;
        let backward_ready = block.norm.is_some()
            || self.masked_blocks.contains(&block.output())
            || block.act.is_some_and(|act| self.rectifiers.contains_key(&act));
        backward_ready.then_some((k, conv))
    }

    /// Scratch of a fused block's forward pass.
    fn block_forward_scratch(&self, block: &Block, pass: Pass, n: usize) -> usize {
        let Some((k, conv)) = self.block_kernels(block) else { return 0 };
        let s = &conv.shape;
        let wino = self.block_winograd.get(&block.output());
        match pass {
            Pass::Train if self.takes_pool(block) && block.norm.is_none() => {
                self.block_forward_scratch(block, Pass::Infer, n)
            }
            Pass::Infer => {
                let folded =
                    if block.norm.is_some() { piece(s.kh * s.kw * s.c * s.f) + piece(s.f) } else { 0 };
                if let (Some(_), Some((shape, [direct, _]))) = (block.pool, k.pooled) {
                    let forward = ConvForward::of(direct, wino.and_then(|wk| wk.pooled));
                    let per_shard = if shape.fused { 0 } else { shape.scratch + forward.scratch() };
                    return folded
                        + piece(forward.weights_len(s))
                        + piece(padded_len(n, input_hwc(conv), conv.pads))
                        + piece(shard_count(n) * per_shard);
                }
                folded + self.block_infer_kernel(block, k).scratch_for(conv, n)
            }
            Pass::Train => {
                let forward = ConvForward::of(k.forward, wino.map(|wk| wk.forward));
                let norm = if block.norm.is_some() { piece(2 * n * s.f) + piece(2 * s.f) } else { 0 };
                forward.scratch_for(conv, n) + norm
            }
        }
    }

    /// A pooled block at inference, its weights prepared (batchnorm folded in) in `s`, reading
    /// the padded input `xp` and writing its pool's output `y`, for `n` samples.
    fn pooled_run(
        &self,
        program: &Program,
        block: &Block,
        params: &[ArrayD<f32>],
        [xp, y]: [*mut f32; 2],
        n: usize,
        s: &mut Scratch<f32>,
    ) -> PooledRun {
        let (k, conv) = self.block_kernels(block).expect("the backend said it fuses this block");
        let (Some(_), Some((shape, [direct, pool]))) = (block.pool, k.pooled) else {
            unreachable!("a pooled block at inference")
        };
        let sh = &conv.shape;
        let (w, b) = conv_params(program, block, params, sh);
        let (weights, bp) = fold_norm(program, block, params, sh, (w, b), s).unwrap_or((w, bias_ptr(b)));
        let wino = self.block_winograd.get(&block.output());
        let forward = ConvForward::of(direct, wino.and_then(|wk| wk.pooled));
        debug_assert!(
            !shape.fused || matches!(forward, ConvForward::Direct(_)),
            "no Winograd kernel for a fused pool"
        );
        let prepared = s.take(forward.weights_len(sh));
        forward.prepare_weights(sh, weights, prepared);
        let x_sample = sh.hp * sh.wp * sh.c;
        PooledRun::new(forward, pool, [xp, prepared.as_mut_ptr(), bp, y], x_sample, shape, n, s)
    }

    /// The inference kernel of a block without a pool.
    fn block_infer_kernel(&self, block: &Block, k: &BlockKernels) -> ConvForward {
        let wino = self.block_winograd.get(&block.output());
        match k.norm {
            Some([infer, ..]) => ConvForward::of(infer, wino.and_then(|wk| wk.infer)),
            None => ConvForward::of(k.forward, wino.map(|wk| wk.forward)),
        }
    }

    /// Scratch of a fused block's backward pass.
    fn block_backward_scratch(&self, program: &Program, block: &Block, n: usize) -> usize {
        let Some((_, conv)) = self.block_kernels(block) else { return 0 };
        let s = &conv.shape;
        let dc = piece(n * s.oh * s.ow * s.f);
        let input = program.graph.node(block.linear).inputs[0];
        // the sums' pass, where the block has it (and the other, in case dx is asked for after all)
        let sums = match self.blocks.get(&block.output()).and_then(|k| k.weight_sums) {
            Some(_) => {
                let rows = s.kh * s.kw * s.c;
                piece(2 * s.f)
                    + piece(padded_len(n, input_hwc(conv), conv.pads))
                    + piece(n * (2 + 2 * rows) * s.f)
                    + piece(n * rows)
            }
            None => 0,
        };
        let epilogue = match block.norm {
            Some(_) => piece(2 * n * s.f) + piece(3 * s.f) + dc,
            None if self.masked_blocks.contains(&block.output()) => 0,
            None => dc,
        };
        let dx = if program.needs_grad[input.index()] { self.conv_input_scratch(block.linear, n) } else { 0 };
        // the pooled backward pass, where the block has it: x padded, a piece of dy a shard
        let pooled = match self.blocks.get(&block.output()).and_then(|k| k.pooled_backward) {
            Some(_) if block.norm.is_none() => {
                piece(padded_len(n, input_hwc(conv), conv.pads))
                    + piece(s.kh * s.kw * s.c * s.f)
                    + piece(shard_count(s.weight_tasks()) * s.pooled_weight_scratch())
            }
            _ => 0,
        };
        sums.max(pooled).max(epilogue + self.conv_weights_scratch(block.linear, n) + dx)
    }
}

/// The unpadded input (H, W, C) of a pooling kernel.
fn pool_input(shape: &PoolShape, pads: [usize; 4]) -> [usize; 3] {
    [shape.hp - pads[0] - pads[1], shape.wp - pads[2] - pads[3], shape.c]
}

/// A dense layer as the 1x1 convolution of a 1x1 image.
const POINT: Geometry = Geometry { kernel: [1, 1], stride: [1, 1], pad_before: [0, 0], out: [1, 1] };

impl Kernels<f32> for JitKernels {
    fn compile_report(&self) -> Option<String> {
        Some(format!("compiled {} kernels in {:.1} ms", self.kernel_count(), self.compile_ms))
    }

    fn fuses(&self, block: &Block, pass: Pass) -> bool {
        // At inference a block with a pool ends at the pool: its kernels must include it.
        let pooled = |k: &BlockKernels| pass == Pass::Train || block.pool.is_none() || k.pooled.is_some();
        self.block_kernels(block).is_some_and(|(k, _)| pooled(k))
    }

    fn pairs(&self, first: &Block, second: &Block) -> bool {
        let pooled =
            |b: &Block| b.pool.is_some() && self.block_kernels(b).is_some_and(|(k, _)| k.pooled.is_some());
        // the second reads the first's value as it is: no padded copy
        let unpadded = self.convs.get(&second.linear).is_some_and(|c| c.pads == [0; 4]);
        self.pair_blocks && pooled(first) && pooled(second) && unpadded
    }

    fn takes_pool(&self, block: &Block) -> bool {
        // without batchnorm, the forward pass is the inference kernel of the convolution and
        // its pool in one
        let forward = |k: &BlockKernels| match block.norm {
            Some(_) => k.pooled_normalize.is_some(),
            None => k.pooled.is_some_and(|(shape, _)| shape.fused),
        };
        self.blocks.get(&block.output()).is_some_and(|k| k.pooled_backward.is_some() && forward(k))
    }

    fn block_pool_backward_into(
        &self,
        program: &Program,
        block: &Block,
        params: &[ArrayD<f32>],
        x: ArrayViewD<f32>,
        tape: BlockTape<'_, f32>,
        dp: ArrayViewD<f32>,
        grads: BlockGrads<'_, f32>,
        s: &mut Scratch<f32>,
    ) {
        let (k, conv) = self.block_kernels(block).expect("the backend said it fuses this block");
        let kernel = k.pooled_backward.expect("the backend said it takes this block's pool");
        let sh = conv.shape;
        let n = x.shape()[0];
        let pooled = k.pooled.expect("a pooled block").0;
        assert_eq!(
            (tape.value.len(), dp.len()),
            (n * pooled.output, n * pooled.output),
            "the pool's value and gradient"
        );
        let BlockGrads { dx, mut dw, db, norm } = grads;
        assert!(dx.is_none(), "a block whose input needs no gradient");
        let [h, w_in, c] = input_hwc(conv);
        let x4 = x.into_shape_with_order((n, h, w_in, c)).expect("the block's input");
        let xp = padded_into(x4, conv.pads, 0.0, s);
        if let Some(batchnorm) = block_norm(program, block, params) {
            // the sums' pass, g from the pool's gradient ([`conv::pooled_weight_sums`])
            let grads = BlockGrads { dx, dw, db, norm };
            return sums_backward(
                kernel,
                &sh,
                k.rectify,
                batchnorm,
                [xp, contiguous(&dp)],
                tape,
                grads,
                n,
                s,
            );
        }
        assert!(norm.is_none(), "a block without batchnorm");
        dw.fill(0.0);
        let dwp = out_ptr(&mut dw);
        assert_eq!(db.is_some(), sh.bias, "a bias gradient for a layer with a bias");
        let dbp = db.map_or(std::ptr::null_mut(), |mut db| {
            db.fill(0.0);
            out_ptr(&mut db)
        });
        // the convolution's weights as the forward kernel reads them, to recompute its output
        let (w, b) = conv_params(program, block, params, &sh);
        let packed = s.take(w.len());
        ConvForward::Direct(k.forward).prepare_weights(&sh, w, packed);
        let buffers = Buffers::new(&[xp, contiguous(&dp), dwp, dbp, packed.as_mut_ptr(), bias_ptr(b)]);
        run_with_scratch(kernel, buffers, sh.pooled_weight_scratch(), sh.weight_tasks(), n, s);
    }

    fn block_pair_forward_into(
        &self,
        program: &Program,
        [first, second]: [&Block; 2],
        params: &[ArrayD<f32>],
        x: ArrayViewD<f32>,
        [mut between, mut value]: [ArrayViewMutD<'_, f32>; 2],
        s: &mut Scratch<f32>,
    ) {
        let (_, conv) = self.block_kernels(first).expect("the backend said it pairs these blocks");
        let n = x.shape()[0];
        let [h, w, c] = input_hwc(conv);
        let x4 = x.into_shape_with_order((n, h, w, c)).expect("the first block's input");
        let xp = padded_into(x4, conv.pads, 0.0, s);
        let (between, y) = (out_ptr(&mut between), out_ptr(&mut value));
        let first = self.pooled_run(program, first, params, [xp, between], n, s);
        let second = self.pooled_run(program, second, params, [between, y], n, s);
        shards(n).for_each(|(shard, lo, hi)| {
            for i in lo..hi {
                first.sample(shard, i);
                second.sample(shard, i);
            }
        });
    }

    fn scratch(&self, program: &Program, step: Step, pass: Pass, n: usize) -> usize {
        let nodes = |id: NodeId, training: bool| -> Vec<NodeId> {
            match program.block_ending_at(id, training) {
                Some(b) if training => b.nodes().collect(),
                Some(b) => b.inference_nodes().collect(),
                None => vec![id],
            }
        };
        match step {
            Step::Forward(id) => match program.block_ending_at(id, pass == Pass::Train) {
                Some(b) if self.fuses(b, pass) => self.block_forward_scratch(b, pass, n),
                _ => nodes(id, pass == Pass::Train)
                    .into_iter()
                    .map(|node| self.node_forward_scratch(program, node, pass, n))
                    .max()
                    .unwrap_or(0),
            },
            Step::Backward(id) => match program.block_ending_at(id, true) {
                Some(b) if self.fuses(b, pass) => self.block_backward_scratch(program, b, n),
                _ => nodes(id, true)
                    .into_iter()
                    .map(|node| self.node_backward_scratch(program, node, n))
                    .max()
                    .unwrap_or(0),
            },
            Step::Loss => self.loss.map_or(0, |_| piece(3 * n)),
            Step::Update => 0,
        }
    }

    fn conv2d_forward_into(
        &self,
        node: NodeId,
        x: ArrayView4<f32>,
        w: ArrayView4<f32>,
        b: Option<ArrayView1<f32>>,
        g: &Geometry,
        mut y: ArrayViewMut4<f32>,
        s: &mut Scratch<f32>,
    ) {
        let Some(k) = self.convs.get(&node) else {
            return y.assign(&reference::ops::conv2d_forward(x, w, b, g));
        };
        let sh = &k.shape;
        let n = x.dim().0;
        let [top, bottom, left, right] = k.pads;
        assert_eq!((x.dim().1 + top + bottom, x.dim().2 + left + right, x.dim().3), (sh.hp, sh.wp, sh.c));
        assert_eq!(w.dim(), (sh.kh, sh.kw, sh.c, sh.f));
        assert_eq!(y.dim(), (n, sh.oh, sh.ow, sh.f));
        assert_eq!(b.is_some(), sh.bias, "the kernel was compiled for this node's bias");
        assert!(b.as_ref().is_none_or(|b| b.len() == sh.f));
        let bias = b.as_ref().map_or(std::ptr::null_mut(), |b| contiguous(b));
        let w = w.as_slice().expect("row-major");
        let yp = out_ptr(&mut y);
        let forward = self.conv_forward_kernel(node, k);
        conv_forward_into(forward, k, x, w, bias, yp, std::ptr::null_mut(), s);
    }

    fn conv2d_backward_input_into(
        &self,
        node: NodeId,
        dy: ArrayView4<f32>,
        w: ArrayView4<f32>,
        g: &Geometry,
        mut dx: ArrayViewMut4<f32>,
        s: &mut Scratch<f32>,
    ) {
        let Some(k) = self.convs.get(&node) else {
            let (_, h, width, _) = dx.dim();
            return dx.assign(&reference::ops::conv2d_backward_input(dy, w, [h, width], g));
        };
        let sh = &k.shape;
        let n = dy.dim().0;
        assert_eq!(dy.dim(), (n, sh.oh, sh.ow, sh.f));
        assert_eq!(w.dim(), (sh.kh, sh.kw, sh.c, sh.f));
        let [h, width, c] = input_hwc(k);
        assert_eq!(dx.dim(), (n, h, width, c));
        let w = w.as_slice().expect("row-major");
        if self.wide && !sh.is_point() {
            let wt = s.take(avx512::transposed_len(sh));
            avx512::transpose_into(w, sh, wt);
            let wt = wt.as_ptr();
            let dxp = padded_output(&mut dx, k.pads, s);
            let dyp = contiguous(&dy);
            let buffers = Buffers::new(&[dyp, wt.cast_mut(), dxp]);
            shards(n).for_each(|(_, lo, hi)| {
                let [dy, wt, dx] = [0, 1, 2].map(|i| buffers.get(i));
                // SAFETY: `wide` is set only where AVX-512F is; dy is (N, OH, OW, F) and dx
                // (N, HP, WP, C) padded (the asserts above), wt transposed for this shape, and
                // each shard writes only its own samples of dx.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx512::backward_input(sh, [dy, wt], dx, lo..hi)
                };
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("AVX-512 without x86-64: {:?}", (dy, wt, dx, lo, hi));
            });
            return crop_into(dxp, k.pads, &mut dx);
        }
        // The weights transposed to (KH, KW, F, C), packed by chunks of input channels.
        let wt = s.take(w.len());
        let (taps, c, f) = (sh.kh * sh.kw, sh.c, sh.f);
        conv::pack_into(taps * f, c, |row, ci| w[((row / f) * c + ci) * f + row % f], wt);
        // a dense layer's kernel writes every element of dx once: no zeroed buffer to add into
        let dxp = if sh.is_point() { out_ptr(&mut dx) } else { padded_output(&mut dx, k.pads, s) };
        run(k.backward_input, Buffers::new(&[contiguous(&dy), wt.as_mut_ptr(), dxp]), n, n);
        crop_into(dxp, k.pads, &mut dx);
    }

    fn conv2d_backward_weights_into(
        &self,
        node: NodeId,
        x: ArrayView4<f32>,
        dy: ArrayView4<f32>,
        g: &Geometry,
        mut dw: ArrayViewMut4<f32>,
        db: Option<ArrayViewMut1<f32>>,
        s: &mut Scratch<f32>,
    ) {
        let Some(k) = self.convs.get(&node) else {
            return Plain.conv2d_backward_weights_into(node, x, dy, g, dw, db, s);
        };
        let sh = &k.shape;
        let n = x.dim().0;
        assert_eq!(dy.dim(), (n, sh.oh, sh.ow, sh.f));
        assert_eq!(dw.dim(), (sh.kh, sh.kw, sh.c, sh.f));
        let xp = padded_into(x, k.pads, 0.0, s);
        let dyp = contiguous(&dy);
        let dwp = out_ptr(&mut dw);
        // the kernels sum db with dw: a layer has a db exactly where its kernels have a bias
        assert_eq!(db.is_some(), sh.bias, "a bias gradient for a layer with a bias");
        let mut db = db.map(|db| db.into_slice().expect("contiguous"));
        if let Some((shape, kernel)) = self.winograd.get(&node).and_then(|wk| wk.weight_gradient) {
            let (m, sums) = winograd_weight_pieces(kernel, &shape, [xp, dyp], n, s);
            let dw = dw.as_slice_mut().expect("row-major");
            winograd::weight_gradient_output_into(m, &shape, dw);
            if let (Some(db), Some(sums)) = (db, sums) {
                let scale = winograd::bias_scale(&shape);
                db.iter_mut().zip(sums).for_each(|(out, sum)| *out = scale * *sum);
            }
        } else {
            dw.fill(0.0);
            let dbp = db.as_mut().map_or(std::ptr::null_mut(), |db| {
                db.fill(0.0);
                db.as_mut_ptr()
            });
            run(k.backward_weights, Buffers::new(&[xp, dyp, dwp, dbp]), sh.weight_tasks(), n);
        }
    }

    fn activation_forward_into(
        &self,
        node: NodeId,
        act: Activation,
        x: ArrayViewD<f32>,
        mut y: ArrayViewMutD<f32>,
        _s: &mut Scratch<f32>,
    ) {
        let kernel = match (self.sigmoidals.get(&node), self.rectifiers.get(&node)) {
            (Some(k), _) => Some((k.forward, k.len, true)),
            (None, Some(k)) => Some((k.forward, k.len, false)),
            (None, None) => None,
        };
        let Some((kernel, len, counted)) = kernel else {
            return y.zip_mut_with(&x, |y, &x| *y = reference::activate(act, x));
        };
        assert_eq!(x.shape(), y.shape());
        let n = samples(len, x.len());
        let buffers = Buffers::new(&[contiguous(&x), out_ptr(&mut y)]);
        if counted { self.run_counted(kernel, buffers, n, n) } else { run(kernel, buffers, n, n) }
    }

    fn activation_backward_into(
        &self,
        node: NodeId,
        act: Activation,
        x: ArrayViewD<f32>,
        y: ArrayViewD<f32>,
        dy: ArrayViewD<f32>,
        mut dx: ArrayViewMutD<f32>,
        _s: &mut Scratch<f32>,
    ) {
        assert_eq!((x.shape(), y.shape()), (dy.shape(), dy.shape()));
        assert_eq!(dx.shape(), dy.shape());
        if let Some(k) = self.sigmoidals.get(&node) {
            let n = samples(k.len, y.len());
            let buffers = Buffers::new(&[contiguous(&y), contiguous(&dy), out_ptr(&mut dx)]);
            return self.run_counted(k.backward, buffers, n, n);
        }
        let Some(k) = self.rectifiers.get(&node) else {
            return dx.assign(&reference::activation_gradient(act, x, y, dy));
        };
        let n = samples(k.len, x.len());
        run(k.backward, Buffers::new(&[contiguous(&x), contiguous(&dy), out_ptr(&mut dx)]), n, n);
    }

    fn maxpool_forward_into(
        &self,
        node: NodeId,
        x: ArrayView4<f32>,
        g: &Geometry,
        mut y: ArrayViewMut4<f32>,
        s: &mut Scratch<f32>,
    ) {
        let Some(k) = self.pools.get(&node) else { return y.assign(&reference::ops::maxpool_forward(x, g)) };
        let sh = &k.shape;
        let n = x.dim().0;
        assert_eq!((x.dim().1, x.dim().2, x.dim().3), pool_input(sh, k.pads).into());
        assert_eq!(y.dim(), (n, sh.oh, sh.ow, sh.c));
        let xp = padded_into(x, k.pads, f32::NEG_INFINITY, s);
        run(k.forward, Buffers::new(&[xp, out_ptr(&mut y)]), n, n);
    }

    fn maxpool_backward_into(
        &self,
        node: NodeId,
        x: ArrayView4<f32>,
        dy: ArrayView4<f32>,
        g: &Geometry,
        mut dx: ArrayViewMut4<f32>,
        s: &mut Scratch<f32>,
    ) {
        let Some(k) = self.pools.get(&node) else {
            return dx.assign(&reference::ops::maxpool_backward(x, dy, g));
        };
        let sh = &k.shape;
        let n = x.dim().0;
        assert_eq!((x.dim().1, x.dim().2, x.dim().3), pool_input(sh, k.pads).into());
        assert_eq!(dy.dim(), (n, sh.oh, sh.ow, sh.c));
        assert_eq!(dx.dim(), x.dim());
        let xp = padded_into(x, k.pads, f32::NEG_INFINITY, s);
        // a kernel that writes every pixel (windows that tile the input) needs no zeroed dx
        let dxp = if k.pads == [0; 4] && sh.tiles_exactly() {
            out_ptr(&mut dx)
        } else {
            padded_output(&mut dx, k.pads, s)
        };
        run(k.backward, Buffers::new(&[xp, contiguous(&dy), dxp]), n, n);
        crop_into(dxp, k.pads, &mut dx);
    }

    fn dense_forward_into(
        &self,
        node: NodeId,
        x: ArrayView2<f32>,
        w: ArrayView2<f32>,
        b: Option<ArrayView1<f32>>,
        mut y: ArrayViewMut2<f32>,
        s: &mut Scratch<f32>,
    ) {
        if !self.convs.contains_key(&node) {
            return y.assign(&reference::ops::dense_forward(x, w, b));
        }
        let (n, inputs) = x.dim();
        let units = w.dim().1;
        if self.wide {
            // the bias, then the products added to it in 512-bit vectors
            match b {
                Some(b) => y.rows_mut().into_iter().for_each(|mut row| row.assign(&b)),
                None => y.fill(0.0),
            }
            let buffers = Buffers::new(&[contiguous(&x), contiguous(&w), out_ptr(&mut y)]);
            shards(n).for_each(|(_, lo, hi)| {
                let [x, w, y] = [0, 1, 2].map(|i| buffers.get(i));
                // SAFETY: AVX-512F is there (`wide`); x is (N, K), w (K, F) and y (N, F), all
                // row-major, and each shard writes its own rows of y.
                unsafe { avx512::dense(x.add(lo * inputs), w, y.add(lo * units), [hi - lo, inputs, units]) }
            });
            return;
        }
        let x4 = x.into_shape_with_order((n, 1, 1, inputs)).expect("row-major input");
        let w4 = w.into_shape_with_order((1, 1, inputs, units)).expect("row-major kernel");
        let y4 = y.view_mut().into_shape_with_order((n, 1, 1, units)).expect("row-major output");
        self.conv2d_forward_into(node, x4, w4, b, &POINT, y4, s);
    }

    fn dense_backward_into(
        &self,
        node: NodeId,
        x: ArrayView2<f32>,
        w: ArrayView2<f32>,
        dy: ArrayView2<f32>,
        dx: Option<ArrayViewMut2<f32>>,
        mut dw: ArrayViewMut2<f32>,
        db: Option<ArrayViewMut1<f32>>,
        s: &mut Scratch<f32>,
    ) {
        if !self.convs.contains_key(&node) {
            return Plain.dense_backward_into(node, x, w, dy, dx, dw, db, s);
        }
        let (n, inputs) = x.dim();
        let units = w.dim().1;
        let x4 = x.into_shape_with_order((n, 1, 1, inputs)).expect("row-major");
        let w4 = w.into_shape_with_order((1, 1, inputs, units)).expect("row-major");
        let dy4 = dy.into_shape_with_order((n, 1, 1, units)).expect("row-major");
        let dw4 = dw.view_mut().into_shape_with_order((1, 1, inputs, units)).expect("row-major");
        self.conv2d_backward_weights_into(node, x4, dy4, &POINT, dw4, db, s);
        if let Some(dx) = dx {
            let dx4 = dx.into_shape_with_order((n, 1, 1, inputs)).expect("row-major");
            self.conv2d_backward_input_into(node, dy4, w4, &POINT, dx4, s);
        }
    }

    fn batchnorm_forward_train_into(
        &self,
        node: NodeId,
        x: ArrayView2<f32>,
        affine: [ArrayView1<f32>; 2],
        epsilon: f32,
        mut y: ArrayViewMut2<f32>,
        mut stats: ArrayViewMut1<f32>,
        s: &mut Scratch<f32>,
    ) {
        let Some(k) = self.norms.get(&node) else {
            return Plain.batchnorm_forward_train_into(node, x, affine, epsilon, y, stats, s);
        };
        let n = samples(k.shape.pixels * k.shape.channels, x.len());
        let sums = s.zeroed(n * 2 * k.shape.channels);
        run(k.stats, Buffers::new(&[contiguous(&x), sums.as_mut_ptr()]), n, n);
        let stats = stats.as_slice_mut().expect("contiguous");
        statistics_into(sums, n, k.shape.channels, n * k.shape.pixels, stats);
        affine_into(k.affine, k.shape, contiguous(&x), stats, affine, epsilon, out_ptr(&mut y), n, s);
    }

    fn batchnorm_forward_infer_into(
        &self,
        node: NodeId,
        x: ArrayView2<f32>,
        [gamma, beta]: [ArrayView1<f32>; 2],
        [mean, var]: [ArrayView1<f32>; 2],
        epsilon: f32,
        mut y: ArrayViewMut2<f32>,
        s: &mut Scratch<f32>,
    ) {
        let Some(k) = self.norms.get(&node) else {
            return y.assign(&reference::ops::batchnorm_forward_infer(x, gamma, beta, mean, var, epsilon));
        };
        let c = k.shape.channels;
        let n = samples(k.shape.pixels * c, x.len());
        let moving = s.take(2 * c);
        moving[..c].copy_from_slice(mean.as_slice().expect("contiguous"));
        moving[c..].copy_from_slice(var.as_slice().expect("contiguous"));
        affine_into(k.affine, k.shape, contiguous(&x), moving, [gamma, beta], epsilon, out_ptr(&mut y), n, s);
    }

    fn batchnorm_backward_into(
        &self,
        node: NodeId,
        x: ArrayView2<f32>,
        dy: ArrayView2<f32>,
        gamma: ArrayView1<f32>,
        stats: ArrayView1<f32>,
        epsilon: f32,
        dx: Option<ArrayViewMut2<f32>>,
        [mut dgamma, mut dbeta]: [ArrayViewMut1<f32>; 2],
        s: &mut Scratch<f32>,
    ) {
        let Some(k) = self.norms.get(&node) else {
            return Plain.batchnorm_backward_into(node, x, dy, gamma, stats, epsilon, dx, [dgamma, dbeta], s);
        };
        let n = samples(k.shape.pixels * k.shape.channels, x.len());
        let dx = dx.map(|mut dx| out_ptr(&mut dx));
        let grads = [out_ptr(&mut dgamma), out_ptr(&mut dbeta)];
        let (x, dy, stats) = (contiguous(&x), contiguous(&dy), stats.as_slice().expect("contiguous"));
        normalize_backward(
            [k.grad_reduce, k.grad_apply],
            k.shape,
            [x, std::ptr::null_mut(), dy],
            gamma,
            stats,
            epsilon,
            dx,
            grads,
            n,
            s,
        );
    }

    fn block_forward_into(
        &self,
        program: &Program,
        block: &Block,
        params: &[ArrayD<f32>],
        x: ArrayViewD<f32>,
        mode: Mode,
        out: BlockOut<'_, f32>,
        s: &mut Scratch<f32>,
    ) {
        let (k, conv) = self.block_kernels(block).expect("the backend said it fuses this block");
        let sh = &conv.shape;
        let n = x.shape()[0];
        let [h, w_in, c] = input_hwc(conv);
        let x4 = x.into_shape_with_order((n, h, w_in, c)).expect("the block's input");
        let (w, b) = conv_params(program, block, params, sh);
        let wino = self.block_winograd.get(&block.output());
        let bias_ptr = bias_ptr(b);
        let norm = block_norm(program, block, params);
        let BlockOut { mut value, linear, stats } = out;
        let yp = out_ptr(&mut value);
        if mode != Mode::Infer && self.takes_pool(block) && block.norm.is_none() {
            // the pool's value, for the samples at once: the block's own is not kept
            assert_eq!(value.len(), n * k.pooled.expect("a pooled block").0.output, "the pool's value");
            let xp = padded_into(x4, conv.pads, 0.0, s);
            return self.pooled_run(program, block, params, [xp, yp], n, s).run();
        }
        if mode == Mode::Infer {
            if block.pool.is_some() && k.pooled.is_some() {
                let xp = padded_into(x4, conv.pads, 0.0, s);
                return self.pooled_run(program, block, params, [xp, yp], n, s).run();
            }
            let (weights, bp) = fold_norm(program, block, params, sh, (w, b), s).unwrap_or((w, bias_ptr));
            let forward = self.block_infer_kernel(block, k);
            return conv_forward_into(forward, conv, x4, weights, bp, yp, std::ptr::null_mut(), s);
        }
        // the block's value, or its pool's where it runs the pool (checked there)
        assert!(self.takes_pool(block) || value.len() == n * sh.oh * sh.ow * sh.f, "the block's value");
        let forward = ConvForward::of(k.forward, wino.map(|wk| wk.forward));
        let (Some((epsilon, p)), Some([_, normalize, ..]), Some(mut linear), Some(mut stats)) =
            (norm, k.norm, linear, stats)
        else {
            return conv_forward_into(forward, conv, x4, w, bias_ptr, yp, std::ptr::null_mut(), s);
        };
        let sums = s.zeroed(n * 2 * sh.f);
        let lp = out_ptr(&mut linear);
        conv_forward_into(forward, conv, x4, w, bias_ptr, lp, sums.as_mut_ptr(), s);
        let stats = stats.as_slice_mut().expect("contiguous");
        statistics_into(sums, n, sh.f, n * k.shape.pixels, stats);
        let affine = [p(0), p(1)].map(ArrayView1::from);
        if let Some(pooled) = k.pooled_normalize.filter(|_| self.takes_pool(block)) {
            // normalized, rectified and pooled in one pass: the block's own value is not kept
            assert_eq!(value.len(), n * k.pooled.expect("a pooled block").0.output, "the pool's value");
            let coefficients = s.take(2 * sh.f);
            affine_coefficients(stats, affine, epsilon, coefficients);
            return run(pooled, Buffers::new(&[lp, coefficients.as_mut_ptr(), yp]), n, n);
        }
        affine_into(normalize, k.shape, lp, stats, affine, epsilon, yp, n, s);
    }

    fn block_backward_into(
        &self,
        program: &Program,
        block: &Block,
        params: &[ArrayD<f32>],
        x: ArrayViewD<f32>,
        tape: BlockTape<'_, f32>,
        dz: ArrayViewD<f32>,
        grads: BlockGrads<'_, f32>,
        s: &mut Scratch<f32>,
    ) {
        let (k, conv) = self.block_kernels(block).expect("the backend said it fuses this block");
        let sh = conv.shape;
        let n = x.shape()[0];
        let z = contiguous(&tape.value);
        let dzp = contiguous(&dz);
        let BlockGrads { dx, mut dw, db, norm } = grads;
        let batchnorm = block_norm(program, block, params);
        if let (None, Some(kernel), Some(batchnorm)) = (&dx, k.weight_sums, batchnorm) {
            let [h, w_in, c] = input_hwc(conv);
            let x4 = x.into_shape_with_order((n, h, w_in, c)).expect("the block's input");
            let xp = padded_into(x4, conv.pads, 0.0, s);
            let grads = BlockGrads { dx, dw, db, norm };
            return sums_backward(kernel, &sh, k.rectify, batchnorm, [xp, dzp], tape, grads, n, s);
        }
        let dc_len = n * sh.oh * sh.ow * sh.f;
        let dc: *mut f32 = match (batchnorm, k.norm) {
            (Some((epsilon, p)), Some([_, _, reduce, apply])) => {
                let gamma = ArrayView1::from(p(0));
                let stats = tape.stats.expect("training forward keeps batch statistics");
                let linear = contiguous(&tape.linear.expect("a normalizing block keeps its linear output"));
                let rectified = if k.rectify.is_some() { z } else { std::ptr::null_mut() };
                let [mut dgamma, mut dbeta] = norm.expect("the batchnorm's gradients");
                let dc = s.take(dc_len).as_mut_ptr();
                let stats = stats.as_slice().expect("contiguous");
                let grads = [out_ptr(&mut dgamma), out_ptr(&mut dbeta)];
                normalize_backward(
                    [reduce, apply],
                    k.shape,
                    [linear, rectified, dzp],
                    gamma,
                    stats,
                    epsilon,
                    Some(dc),
                    grads,
                    n,
                    s,
                );
                dc
            }
            // the max pool after the block passed its gradient through the relu already
            _ if self.masked_blocks.contains(&block.output()) => dzp,
            _ => {
                let act = block.act.expect("a block without batchnorm ends in a rectifier");
                let r = self.rectifiers.get(&act).expect("the backend said it fuses this block");
                assert_eq!(tape.value.len(), n * r.len);
                let dc = s.take(dc_len).as_mut_ptr();
                run(r.backward, Buffers::new(&[z, dzp, dc]), n, n);
                dc
            }
        };
        // SAFETY: `dc` holds the block's linear output gradient, (N, OH, OW, F): dz itself, or
        // the scratch written above.
        let dc4 = unsafe { ArrayView4::from_shape_ptr((n, sh.oh, sh.ow, sh.f), dc) };
        let [h, w_in, c] = input_hwc(conv);
        let x4 = x.into_shape_with_order((n, h, w_in, c)).expect("the block's input");
        let g = match program.graph.node(block.linear).op {
            Op::Conv2d(_) => reference::geometry(program, block.linear),
            _ => POINT,
        };
        let indices = &program.node_params[block.linear.index()];
        let weights = &params[indices[0]];
        let dw4 = dw.view_mut().into_shape_with_order((sh.kh, sh.kw, sh.c, sh.f)).expect("row-major kernel");
        self.conv2d_backward_weights_into(block.linear, x4, dc4, &g, dw4, db, s);
        if let Some(dx) = dx {
            let w4 =
                weights.view().into_shape_with_order((sh.kh, sh.kw, sh.c, sh.f)).expect("row-major kernel");
            let dx4 = dx.into_shape_with_order((n, h, w_in, c)).expect("the block's input");
            self.conv2d_backward_input_into(block.linear, dc4, w4, &g, dx4, s);
        }
    }

    fn avgpool_forward_into(
        &self,
        node: NodeId,
        x: ArrayView4<f32>,
        g: &Geometry,
        mut y: ArrayViewMut4<f32>,
        s: &mut Scratch<f32>,
    ) {
        let Some(k) = self.avgpools.get(&node) else {
            return y.assign(&reference::ops::avgpool_forward(x, g));
        };
        let sh = &k.shape;
        let n = x.dim().0;
        assert_eq!((x.dim().1, x.dim().2, x.dim().3), pool_input(sh, k.pads).into());
        assert_eq!(y.dim(), (n, sh.oh, sh.ow, sh.c));
        let xp = padded_into(x, k.pads, 0.0, s);
        y.fill(0.0);
        self.run_counted(k.forward, Buffers::new(&[xp, out_ptr(&mut y)]), n, n);
    }

    fn avgpool_backward_into(
        &self,
        node: NodeId,
        dy: ArrayView4<f32>,
        g: &Geometry,
        mut dx: ArrayViewMut4<f32>,
        s: &mut Scratch<f32>,
    ) {
        let Some(k) = self.avgpools.get(&node) else {
            let grad = reference::ops::avgpool_backward(dx.dim().into(), dy, g);
            return dx.assign(&grad);
        };
        let sh = &k.shape;
        let n = dy.dim().0;
        assert_eq!((dx.dim().1, dx.dim().2, dx.dim().3), pool_input(sh, k.pads).into());
        assert_eq!(dy.dim(), (n, sh.oh, sh.ow, sh.c));
        let dxp = padded_output(&mut dx, k.pads, s);
        self.run_counted(k.backward, Buffers::new(&[contiguous(&dy), dxp]), n, n);
        crop_into(dxp, k.pads, &mut dx);
    }

    fn softmax_forward_into(
        &self,
        node: NodeId,
        x: ArrayView2<f32>,
        mut y: ArrayViewMut2<f32>,
        _s: &mut Scratch<f32>,
    ) {
        let Some(k) = self.softmaxes.get(&node) else { return y.assign(&reference::ops::softmax_forward(x)) };
        let (m, c) = x.dim();
        assert_eq!(c, k.c);
        assert_eq!(y.dim(), (m, c));
        let n = samples(k.rows, m);
        self.run_counted(k.forward, Buffers::new(&[contiguous(&x), out_ptr(&mut y)]), n, n);
    }

    fn loss_into(
        &self,
        node: NodeId,
        loss: Loss,
        z: ArrayView2<f32>,
        labels: &[u8],
        mut dz: ArrayViewMut2<f32>,
        s: &mut Scratch<f32>,
    ) -> (f64, usize) {
        let Some(k) = self.loss.filter(|k| k.node == node && k.loss == loss) else {
            return Plain.loss_into(node, loss, z, labels, dz, s);
        };
        let (n, classes) = z.dim();
        assert_eq!(classes, k.k);
        assert_eq!(dz.dim(), (n, classes));
        assert_eq!(labels.len(), n, "one label a sample");
        if loss != Loss::BinaryCrossentropy {
            assert!(labels.iter().all(|&l| usize::from(l) < classes), "every label names a class");
        }
        let scratch = s.take(3 * n);
        let (as_f32, rest) = scratch.split_at_mut(n);
        let (losses, correct) = rest.split_at_mut(n);
        for (out, &l) in as_f32.iter_mut().zip(labels) {
            *out = f32::from(l);
        }
        let buffers = Buffers::new(&[
            contiguous(&z),
            as_f32.as_mut_ptr(),
            out_ptr(&mut dz),
            losses.as_mut_ptr(),
            correct.as_mut_ptr(),
        ]);
        self.run_counted(k.kernel, buffers, n, n);
        // In sample order, as the reference sums them.
        let loss_sum = losses.iter().fold(0.0, |sum, &l| sum + f64::from(l));
        (loss_sum, correct.iter().filter(|&&c| c != 0.0).count())
    }

    fn dropout_forward_into(
        &self,
        node: NodeId,
        x: ArrayViewD<f32>,
        stream: &Rng,
        rate: f32,
        [mut mask, mut y]: [ArrayViewMutD<f32>; 2],
        s: &mut Scratch<f32>,
    ) {
        let Some(k) = self.dropouts.get(&node) else {
            return Plain.dropout_forward_into(node, x, stream, rate, [mask, y], s);
        };
        assert_eq!((x.shape(), mask.shape()), (y.shape(), y.shape()));
        let n = samples(k.len, x.len());
        let scale = (1.0 / (1.0 - f64::from(rate))) as f32;
        let key = [stream.base(), crate::rng::unit_threshold(rate), u64::from(scale.to_bits())];
        let buffers =
            Buffers::new(&[contiguous(&x), key.as_ptr() as *mut f32, out_ptr(&mut mask), out_ptr(&mut y)]);
        self.run_counted(k.forward, buffers, n, n);
    }

    fn dropout_apply_into(
        &self,
        node: NodeId,
        x: ArrayViewD<f32>,
        mask: ArrayViewD<f32>,
        mut y: ArrayViewMutD<f32>,
        _s: &mut Scratch<f32>,
    ) {
        let Some(k) = self.dropouts.get(&node) else {
            return ndarray::Zip::from(&mut y).and(&x).and(&mask).for_each(|y, &x, &m| *y = x * m);
        };
        assert_eq!((x.shape(), mask.shape()), (y.shape(), y.shape()));
        let n = samples(k.len, x.len());
        self.run_counted(k.apply, Buffers::new(&[contiguous(&x), contiguous(&mask), out_ptr(&mut y)]), n, n);
    }

    fn optimizer_update(
        &self,
        _index: usize,
        optimizer: &Optimizer,
        param: &mut ArrayD<f32>,
        grad: &ArrayRef<f32, IxDyn>,
        slots: &mut [ArrayD<f32>],
        iteration: u64,
    ) {
        let compiled = self.optimizer.filter(|k| k.rule == Rule::of(optimizer));
        let standard = param.is_standard_layout()
            && grad.is_standard_layout()
            && slots.iter().all(|s| s.is_standard_layout());
        let Some(k) = compiled.filter(|_| standard) else {
            return crate::train::optimizer::update(optimizer, param, grad, slots, iteration);
        };
        assert_eq!(grad.shape(), param.shape());
        assert!(slots.iter().all(|s| s.shape() == param.shape()));
        let scalars = Rule::scalars(optimizer, iteration);
        let mut buffers = Buffers::new(&[scalars.as_ptr() as *mut f32, param.as_mut_ptr(), contiguous(grad)]);
        for slot in slots.iter_mut() {
            buffers = buffers.with(slot.as_mut_ptr());
        }
        let expected = match k.rule {
            Rule::Sgd => 3,
            Rule::Momentum => 4,
            Rule::Adam => 5,
        };
        assert_eq!(buffers.len, expected, "the optimizer keeps its slots");
        let len = param.len();
        self.run_counted(k.kernel, buffers, len, len);
    }
}

/// Channel `k`'s two sums from per-sample sums (N, 2, C), reduced over samples in order, in f64.
fn reduce_sums(sums: &[f32], n: usize, c: usize, k: usize) -> [f64; 2] {
    let mut out = [0.0; 2];
    for i in 0..n {
        out[0] += f64::from(sums[2 * i * c + k]);
        out[1] += f64::from(sums[(2 * i + 1) * c + k]);
    }
    out
}

/// The batch statistics from per-sample sums (N, 2, C) of Σx and Σx² over `m` values per
/// channel, reduced over samples in order in f64, into `out` (C means, then C biased
/// variances).
fn statistics_into(sums: &[f32], n: usize, c: usize, m: usize, out: &mut [f32]) {
    assert_eq!((sums.len(), out.len()), (n * 2 * c, 2 * c));
    let m = m as f64;
    for k in 0..c {
        let [sum, sq] = reduce_sums(sums, n, c, k);
        let mean = sum / m;
        out[k] = mean as f32;
        // E[x²] − E[x]², never below zero (rounding can take it there for a constant channel).
        out[c + k] = (sq / m - mean * mean).max(0.0) as f32;
    }
}

/// 1/√(var + ε) of channel `k` of `stats` (C means, C variances), in f64.
fn inverse_std(stats: &[f32], k: usize, epsilon: f32) -> f64 {
    let c = stats.len() / 2;
    1.0 / (f64::from(stats[c + k]) + f64::from(epsilon)).sqrt()
}

/// y = act((x − mean)·γ/σ + β) over `n` samples with an affine kernel (scale and shift in
/// scratch).
#[allow(clippy::too_many_arguments)]
fn affine_into(
    kernel: KernelFn,
    shape: NormShape,
    x: *mut f32,
    stats: &[f32],
    gamma_beta: [ArrayView1<f32>; 2],
    epsilon: f32,
    y: *mut f32,
    n: usize,
    s: &mut Scratch<f32>,
) {
    let coefficients = s.take(2 * shape.channels);
    let (scale, shift) = affine_coefficients(stats, gamma_beta, epsilon, coefficients);
    run(kernel, Buffers::new(&[x, scale.as_mut_ptr(), shift.as_mut_ptr(), y]), n, n);
}

/// The normalization's per-channel scale γ/σ and shift β − μ·γ/σ (in f64, then f32) into
/// `out` (2, C): the values the affine kernel applies, which the weight sums' kernel applies
/// again to rebuild the rectifier's mask bit for bit.
fn affine_coefficients<'o>(
    stats: &[f32],
    [gamma, beta]: [ArrayView1<f32>; 2],
    epsilon: f32,
    out: &'o mut [f32],
) -> (&'o mut [f32], &'o mut [f32]) {
    let (scale, shift) = out.split_at_mut(out.len() / 2);
    for k in 0..scale.len() {
        let inv = inverse_std(stats, k, epsilon);
        scale[k] = (f64::from(gamma[k]) * inv) as f32;
        shift[k] = (f64::from(beta[k]) - f64::from(stats[k]) * f64::from(gamma[k]) * inv) as f32;
    }
    (scale, shift)
}

/// The batchnorm backward with the reduce/apply kernels over `n` samples: from [x, z, dz]
/// (z the rectifier's output when the kernels pass the gradient back through one, else
/// null), dgamma and dbeta into `grads`, and dx (when asked for). The batchnorm's sums (Σg,
/// Σg·x) give (dgamma, dbeta) and the coefficients (a, b, d) of dx = a·g + b·x + d, which is
/// γ/(M·σ)·(M·g − dbeta − x̂·dgamma) expanded.
#[allow(clippy::too_many_arguments)]
fn normalize_backward(
    [reduce, apply]: [KernelFn; 2],
    shape: NormShape,
    [x, z, dz]: [*mut f32; 3],
    gamma: ArrayView1<f32>,
    stats: &[f32],
    epsilon: f32,
    dx: Option<*mut f32>,
    [dgamma, dbeta]: [*mut f32; 2],
    n: usize,
    s: &mut Scratch<f32>,
) {
    let c = shape.channels;
    let sums = s.zeroed(n * 2 * c);
    run(reduce, Buffers::new(&[dz, z, x, sums.as_mut_ptr()]), n, n);
    let coef = s.take(3 * c);
    let m = (n * shape.pixels) as f64;
    for k in 0..c {
        let [sum_g, sum_gx] = reduce_sums(sums, n, c, k);
        let inv = inverse_std(stats, k, epsilon);
        let (g, mean) = (f64::from(gamma[k]), f64::from(stats[k]));
        let db = sum_g;
        let dg = inv * (sum_gx - mean * db);
        // SAFETY: dgamma and dbeta hold C elements each.
        unsafe {
            *dgamma.add(k) = dg as f32;
            *dbeta.add(k) = db as f32;
        }
        coef[k] = (g * inv) as f32;
        coef[c + k] = (-g * inv * inv * dg / m) as f32;
        coef[2 * c + k] = (-g * inv * db / m + g * inv * inv * mean * dg / m) as f32;
    }
    if let Some(dx) = dx {
        run(apply, Buffers::new(&[dz, z, x, coef.as_mut_ptr(), dx]), n, n);
    }
}

/// A normalizing block's backward pass by its sums' kernel `kernel` ([`conv::normalized_weight_sums`],
/// or [`conv::pooled_weight_sums`] with the pool's gradient for dz), from its padded input `xp`
/// and `dz`; the rectifier's mask (where it has one) rebuilt from y with the forward's
/// coefficients.
#[allow(clippy::too_many_arguments)]
fn sums_backward<'p>(
    kernel: KernelFn,
    sh: &ConvShape,
    rectify: Option<f32>,
    (epsilon, p): (f32, impl Fn(usize) -> &'p [f32]),
    [xp, dz]: [*mut f32; 2],
    tape: BlockTape<'_, f32>,
    grads: BlockGrads<'_, f32>,
    n: usize,
    s: &mut Scratch<f32>,
) {
    let [gamma, beta] = [p(0), p(1)];
    let stats = tape.stats.expect("training forward keeps batch statistics");
    let stats = stats.as_slice().expect("contiguous");
    let y = contiguous(&tape.linear.expect("a normalizing block keeps its linear output"));
    let affine = match rectify {
        Some(_) => {
            let out = s.take(2 * sh.f);
            affine_coefficients(stats, [gamma, beta].map(ArrayView1::from), epsilon, out);
            out.as_mut_ptr()
        }
        None => std::ptr::null_mut(),
    };
    let BlockGrads { mut dw, db, norm, .. } = grads;
    let dw = dw.as_slice_mut().expect("row-major kernel");
    let grads =
        (dw, db.map(|db| db.into_slice().expect("contiguous")), norm.expect("the batchnorm's gradients"));
    normalized_weights_backward(kernel, sh, [xp, dz, affine, y], gamma, stats, epsilon, grads, n, s);
}

/// A normalizing block's backward by [`conv::normalized_weight_sums`]: its per-sample sums over
/// `n` samples of [x (padded), dz, (scale, shift) or null, y], and Σ x_k per sample ([`input_sums`]), reduced
/// over the samples in order in f64, give dγ = Σ g·x̂ and dβ = Σ g, then dc's coefficients (as
/// [`normalize_backward`]'s, with y centred: dc = a·g + b·(y − μ) + d, d = −γ·dβ/(M·σ)) and
/// dw[k][f] = a·Σ x_k·g + b·Σ x_k·(y − μ) + d·Σ x_k; a bias's db = Σ dc = a·dβ + M·d, which
/// is zero but for rounding, as it is through dc.
#[allow(clippy::too_many_arguments)]
fn normalized_weights_backward(
    kernel: KernelFn,
    sh: &ConvShape,
    [xp, dz, affine, y]: [*mut f32; 4],
    gamma: &[f32],
    stats: &[f32],
    epsilon: f32,
    (dw, mut db, [mut dgamma, mut dbeta]): (&mut [f32], Option<&mut [f32]>, [ArrayViewMut1<f32>; 2]),
    n: usize,
    s: &mut Scratch<f32>,
) {
    let (rows, f) = (sh.kh * sh.kw * sh.c, sh.f);
    let per_sample = (2 + 2 * rows) * f;
    let sums = s.zeroed(n * per_sample);
    let mean = stats.as_ptr().cast_mut();
    run(kernel, Buffers::new(&[xp, dz, affine, y, mean, sums.as_mut_ptr()]), n, n);
    let inputs = s.take(n * rows);
    input_sums(xp, sh, inputs);
    // element j of the samples' sums, over the batch in order
    let total = |all: &[f32], stride: usize, j: usize| {
        all.iter().skip(j).step_by(stride).map(|v| f64::from(*v)).sum::<f64>()
    };
    // Σ x_k over the batch, once for every channel (a block has at most WEIGHT_SUMS_ROWS rows)
    let mut input_totals = [0.0; WEIGHT_SUMS_ROWS];
    assert!(rows <= WEIGHT_SUMS_ROWS, "the sums kernel was compiled for at most {WEIGHT_SUMS_ROWS} rows");
    for (k, out) in input_totals.iter_mut().enumerate().take(rows) {
        *out = total(inputs, rows, k);
    }
    let m = (n * sh.oh * sh.ow) as f64;
    let dgamma = dgamma.as_slice_mut().expect("contiguous");
    let dbeta = dbeta.as_slice_mut().expect("contiguous");
    for ch in 0..f {
        let inv = inverse_std(stats, ch, epsilon);
        let g = f64::from(gamma[ch]);
        let (sum_g, sum_gc) = (total(sums, per_sample, ch), total(sums, per_sample, f + ch));
        let dg = inv * sum_gc;
        dgamma[ch] = dg as f32;
        dbeta[ch] = sum_g as f32;
        let (a, b, d) = (g * inv, -g * inv * inv * dg / m, -g * inv * sum_g / m);
        for k in 0..rows {
            let xg = total(sums, per_sample, (2 + k) * f + ch);
            let xc = total(sums, per_sample, (2 + rows + k) * f + ch);
            dw[k * f + ch] = (a * xg + b * xc + d * input_totals[k]) as f32;
        }
        if let Some(db) = db.as_mut() {
            db[ch] = (a * sum_g + m * d) as f32;
        }
    }
}

/// Σ x_k over the output pixels of each sample of a convolution's padded input at `xp`, for
/// each row k = (kh, kw, c) of its dw, into `out` (N, K): in f64, in pixel order.
fn input_sums(xp: *mut f32, sh: &ConvShape, out: &mut [f32]) {
    let (sample, rows) = (sh.hp * sh.wp * sh.c, sh.kh * sh.kw * sh.c);
    let n = out.len() / rows;
    // SAFETY: the caller's padded input holds `n` samples of HP x WP x C.
    let x = unsafe { std::slice::from_raw_parts(xp, n * sample) };
    out.par_chunks_mut(rows).zip(x.par_chunks_exact(sample)).for_each(|(sums, xn)| {
        for (k, sum) in sums.iter_mut().enumerate() {
            let (tap, c) = (k / sh.c, k % sh.c);
            let first = (tap / sh.kw * sh.wp + tap % sh.kw) * sh.c + c;
            let mut total = 0.0f64;
            for oh in 0..sh.oh {
                for ow in 0..sh.ow {
                    total += f64::from(xn[first + (oh * sh.sh * sh.wp + ow * sh.sw) * sh.c]);
                }
            }
            *sum = total as f32;
        }
    });
}

/// The JIT backend: the interpreter with compiled kernels.
pub type Jit = Interpreter<JitKernels>;

impl Jit {
    pub fn new(program: Arc<Program>, optimizer: Optimizer) -> anyhow::Result<Self> {
        let kernels = JitKernels::compile_with(&program, Listing::default(), Some(&optimizer))?;
        Ok(Interpreter::with_kernels("jit", program, optimizer, kernels))
    }
}
