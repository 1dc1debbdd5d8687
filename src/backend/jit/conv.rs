//! Convolution kernels (dense layers are 1x1 convolutions on 1x1 images): forward, the input
//! gradient and the weight gradient, each specialized to one layer's shapes.
//!
//! All three work on an input already padded (the caller copies it into a zero border), so no
//! kernel checks bounds. Channels are processed in chunks of 8 (two f32x4 vectors), then 4,
//! then one at a time; several output pixels share each weight load (register blocking):
//!
//! ```text
//!   for each pixel block (R pixels along a row) and channel chunk (8):
//!       acc[R][2] = bias
//!       for kh, kw, ci:  w0,w1 = weights[kh,kw,ci,chunk]
//!                        for r < R: x = splat(input[pixel r, kh, kw, ci]); acc[r] += x·w
//! ```

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{InstBuilder as _, Value};
use cranelift_frontend::Variable;

use super::emit::{Emit, F32, F32X4};

/// Output pixels computed together by the forward and input-gradient kernels.
const PIXELS: usize = 5;
/// Samples computed together by the dense kernel ([`dense`]).
const DENSE_ROWS: usize = 4;
/// Copies of the innermost loop body per iteration.
const UNROLL: usize = 4;
/// Rows of dw computed together by the weight-gradient kernel, a row being one (kh, kw, ci):
/// 4 rows x 2 vectors is 8 accumulators. Rows run across kernel taps, so a layer with few
/// input channels still fills the block (a first layer with one channel has 9 rows, where
/// blocks of channels within one tap had 1). Measured on mnist.cnn, one thread, batch 128
/// (`cnnc bench`): conv2d_1's backward pass 33.0 ms with 4 rows, 33.8 with 5, 37.5 with 6
/// (12 accumulators + 2 vectors + a broadcast and the copy Cranelift makes of it, because an
/// FMA's result takes a multiplicand's register, is one more than the 16 xmm registers: it
/// spills); 36.8 ms before, with 6 channels of one tap per block.
const WEIGHT_ROWS: usize = 4;

/// Below this many groups of rows, the weight gradient's tasks also split the output channels.
const FEW_GROUPS: usize = 8;
/// Rows of dw per weight-gradient task where there are few ([`FEW_GROUPS`]): each task then
/// covers 8 output channels, 5 rows x 2 vectors being 10 accumulators. A first layer's 9 rows
/// are 5 + 4, where groups of [`WEIGHT_ROWS`] were 4 + 4 + 1: a one-row group has 2
/// accumulators, bound by the multiply-add's latency, as slow per pixel as a full group.
const FEW_ROWS: usize = 5;

/// One convolution's shapes, as its kernels bake them in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// The padded input's height and width.
    pub hp: usize,
    pub wp: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub f: usize,
    pub oh: usize,
    pub ow: usize,
    pub sh: usize,
    pub sw: usize,
    pub bias: bool,
}

impl ConvShape {
    /// [HP, WP, C] of the padded input.
    pub fn input(&self) -> [usize; 3] {
        [self.hp, self.wp, self.c]
    }

    pub fn stride(&self) -> [usize; 2] {
        [self.sh, self.sw]
    }

    /// A dense layer's shape: a 1x1 kernel over 1x1 images ([`dense`]'s loops).
    pub fn is_point(&self) -> bool {
        [self.hp, self.wp, self.kh, self.kw, self.oh, self.ow] == [1; 6]
    }

    /// Work items of the weight-gradient kernel: one per group of rows of dw, a row being one
    /// (kh, kw, ci), and part of its output channels ([`Self::weight_parts`]).
    pub fn weight_tasks(&self) -> usize {
        self.weight_groups() * self.weight_parts()
    }

    /// Rows of dw: KH·KW·C.
    fn weight_rows(&self) -> usize {
        self.kh * self.kw * self.c
    }

    /// Whether there are fewer than [`FEW_GROUPS`] groups of [`WEIGHT_ROWS`] rows: too few
    /// tasks to spread over threads (a first layer with one input channel has 3).
    fn few_weight_rows(&self) -> bool {
        self.weight_rows().div_ceil(WEIGHT_ROWS) < FEW_GROUPS
    }

    /// Groups of rows of dw, balanced (sizes that differ by at most one) and of at most
    /// [`WEIGHT_ROWS`] rows, or [`FEW_ROWS`] where there are few.
    fn weight_groups(&self) -> usize {
        let most = if self.few_weight_rows() { FEW_ROWS } else { WEIGHT_ROWS };
        self.weight_rows().div_ceil(most)
    }

    /// Parts of 8 output channels that a weight-gradient task covers one of: all F channels
    /// in one part, unless there are few rows ([`Self::few_weight_rows`]).
    pub fn weight_parts(&self) -> usize {
        if self.few_weight_rows() { self.f.div_ceil(8) } else { 1 }
    }

    /// Elements of a shard's scratch for [`pooled_backward_weights`]: a sample's dy for one
    /// part of output channels.
    pub fn pooled_weight_scratch(&self) -> usize {
        let part = if self.weight_parts() == 1 { self.f } else { 8 };
        self.oh * self.ow * part
    }
}

/// A kernel `w` laid out (K, N) row-major (K = KH·KW·C rows of N output channels, as HWIO
/// is), repacked by chunks of output channels as the forward and input-gradient kernels read
/// it: chunk by chunk (8, 4 or 1 channels wide, as [`for_chunks`] splits N), each chunk's K
/// rows contiguous. Chunk (n0, width) starts at n0·K, its row k at n0·K + k·width: every step
/// of a kernel's inner loop reads the next 32 bytes, instead of 32 bytes from every
/// N·4-byte row.
pub fn pack_weights(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    assert_eq!(w.len(), k * n, "a (K, N) kernel");
    let mut packed = vec![0.0; w.len()];
    pack_into(k, n, |row, col| w[row * n + col], &mut packed);
    packed
}

/// [`pack_weights`] of the (K, N) matrix whose element (row, col) is `at(row, col)`, into
/// `out` (K·N elements): the input-gradient kernel's transposed weights are packed straight
/// from the layer's. Large matrices are packed a chunk per task on the worker threads: a dense
/// layer of a million weights is packed twice a step (forward and input gradient), a few
/// milliseconds of reads a cache line per row on one thread.
pub fn pack_into(k: usize, n: usize, at: impl Fn(usize, usize) -> f32 + Sync, out: &mut [f32]) {
    use rayon::prelude::*;
    /// Below this many elements one thread packs the whole matrix (mnist.cnn's largest, 18K,
    /// takes ~10 µs).
    const PARALLEL: usize = 1 << 16;
    assert_eq!(out.len(), k * n, "a (K, N) kernel");
    let pack = |n0: usize, width: usize, chunk: &mut [f32]| {
        for (row, dst) in chunk.chunks_exact_mut(width).enumerate() {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = at(row, n0 + j);
            }
        }
    };
    // the chunks of 8 columns, then the narrower ones after them
    let eights = n / 8 * 8;
    let (wide, mut rest) = out.split_at_mut(eights * k);
    if k * n >= PARALLEL {
        wide.par_chunks_mut((8 * k).max(1)).enumerate().for_each(|(i, chunk)| pack(8 * i, 8, chunk));
    } else {
        wide.chunks_mut((8 * k).max(1)).enumerate().for_each(|(i, chunk)| pack(8 * i, 8, chunk));
    }
    let mut n0 = eights;
    while n0 < n {
        let width = chunk_width(n - n0);
        let (chunk, tail) = rest.split_at_mut(k * width);
        pack(n0, width, chunk);
        rest = tail;
        n0 += width;
    }
}

/// Where [`pack_into`] puts element (row, col) of a (K, N) matrix: in the chunk of columns
/// that holds `col` (8, 4 or 1 wide, from n0), at n0·K + row·width + col − n0.
pub fn packed_index(k: usize, n: usize, row: usize, col: usize) -> usize {
    let eights = n / 8 * 8;
    let (n0, width) = match col {
        _ if col < eights => (col / 8 * 8, 8),
        _ if n - eights >= 4 && col < eights + 4 => (eights, 4),
        _ => (col, 1),
    };
    n0 * k + row * width + col - n0
}

/// The width of the next chunk when `left` channels remain (see [`for_chunks`]).
fn chunk_width(left: usize) -> usize {
    match left {
        8.. => 8,
        4.. => 4,
        _ => 1,
    }
}

/// A chunk of channels: two vectors, one vector, or one scalar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Width {
    Two,
    One,
    Scalar,
}

impl Width {
    pub(super) fn parts(self) -> usize {
        if self == Width::Two { 2 } else { 1 }
    }

    /// Channels in the chunk.
    pub(super) fn lanes(self) -> usize {
        match self {
            Width::Two => 8,
            Width::One => 4,
            Width::Scalar => 1,
        }
    }

    pub(super) fn ty(self) -> cranelift_codegen::ir::Type {
        if self == Width::Scalar { F32 } else { F32X4 }
    }
}

/// Calls `body(first channel, width)` for every chunk of `total` channels.
pub(super) fn for_chunks(e: &mut Emit, total: usize, mut body: impl FnMut(&mut Emit, Value, Width)) {
    let full = total / 8;
    e.for_n(full, |e, i| {
        let first = e.mul_k(i, 8);
        body(e, first, Width::Two);
    });
    let mut next = full * 8;
    if total - next >= 4 {
        let first = e.int(next as i64);
        body(e, first, Width::One);
        next += 4;
    }
    for channel in next..total {
        let first = e.int(channel as i64);
        body(e, first, Width::Scalar);
    }
}

/// Calls `body(first channel, width)` for every vector of 4 of `total` channels (in a loop),
/// then for each channel left over (`Width::Scalar`).
pub(super) fn for_vectors(e: &mut Emit, total: usize, mut body: impl FnMut(&mut Emit, Value, Width)) {
    e.for_n(total / 4, |e, i| {
        let first = e.mul_k(i, 4);
        body(e, first, Width::One);
    });
    for channel in total / 4 * 4..total {
        let first = e.int(channel as i64);
        body(e, first, Width::Scalar);
    }
}

/// The vectors (or scalar) of one chunk at `addr + offset`.
pub(super) fn load_chunk(e: &mut Emit, addr: Value, offset: i64, width: Width) -> Vec<Value> {
    match width {
        Width::Scalar => vec![e.load(addr, offset)],
        _ => (0..width.parts()).map(|p| e.load4(addr, offset + 4 * p as i64)).collect(),
    }
}

pub(super) fn store_chunk(e: &mut Emit, values: &[Value], addr: Value, offset: i64) {
    for (p, v) in values.iter().enumerate() {
        e.store(*v, addr, offset + 4 * p as i64);
    }
}

/// A scalar from memory, broadcast when the chunk is a vector.
fn broadcast(e: &mut Emit, addr: Value, offset: i64, width: Width) -> Value {
    let x = e.load(addr, offset);
    if width == Width::Scalar { x } else { e.splat(x) }
}

/// The register block's inner step: for each of its rows r, acc[r] += broadcast(the scalar at
/// `row(r)`) · `vectors` (one chunk of weights or gradients).
pub(super) fn accumulate(
    e: &mut Emit,
    acc: &[Variable],
    vectors: &[Value],
    mut row: impl FnMut(&mut Emit, usize) -> Value,
    width: Width,
) {
    accumulate_with(e, acc, vectors, |e, r| {
        let addr = row(e, r);
        broadcast(e, addr, 0, width)
    });
}

/// [`accumulate`] with row r's scalar, already in every lane, from `scalar(r)`.
fn accumulate_with(
    e: &mut Emit,
    acc: &[Variable],
    vectors: &[Value],
    mut scalar: impl FnMut(&mut Emit, usize) -> Value,
) {
    let parts = vectors.len();
    for (r, accs) in acc.chunks(parts).enumerate() {
        let scalar = scalar(e, r);
        for (a, v) in accs.iter().zip(vectors) {
            let current = e.use_var(*a);
            let sum = e.fma(scalar, *v, current);
            e.def_var(*a, sum);
        }
    }
}

pub(super) fn accumulators(e: &mut Emit, count: usize, width: Width) -> Vec<Variable> {
    let zero = e.zero(width.ty());
    (0..count).map(|_| e.var(width.ty(), zero)).collect()
}

/// The element offset, in an (N, HP, WP, C) padded input, of the pixel that output (oh, ow)
/// reads at kernel tap (kh, kw): ((n·HP + oh·sh + kh)·WP + ow·sw + kw)·C. `n` is `None` when
/// the base pointer already points at the sample.
#[allow(clippy::too_many_arguments)]
pub(super) fn input_offset(
    e: &mut Emit,
    [hp, wp, c]: [usize; 3],
    [sh, sw]: [usize; 2],
    n: Option<Value>,
    [oh, ow]: [Value; 2],
    [kh, kw]: [Value; 2],
) -> Value {
    let mut row = e.mul_k(oh, sh as i64);
    if let Some(n) = n {
        let sample = e.mul_k(n, hp as i64);
        row = e.add(row, sample);
    }
    let row = e.add(row, kh);
    let row = e.mul_k(row, wp as i64);
    let col = e.mul_k(ow, sw as i64);
    let col = e.add(col, kw);
    let pixel = e.add(row, col);
    e.mul_k(pixel, c as i64)
}

/// The element offset of row (kh, kw, 0) of the chunk from `first` in a kernel packed by
/// [`pack_weights`] with `per_tap` rows a tap: first·K + (kh·KW + kw)·per_tap·width.
fn packed_tap_offset(
    e: &mut Emit,
    s: &ConvShape,
    [kh, kw]: [Value; 2],
    per_tap: usize,
    first: Value,
    width: Width,
) -> Value {
    let chunk = e.mul_k(first, (s.kh * s.kw * per_tap) as i64);
    let tap = e.mul_k(kh, s.kw as i64);
    let tap = e.add(tap, kw);
    let offset = e.mul_k(tap, (per_tap * width.lanes()) as i64);
    e.add(chunk, offset)
}

/// Calls `body(first pixel, pixels)` for the blocks of a row of `ow` pixels: as few blocks
/// as [`PIXELS`] allows, of sizes that differ by at most one (36 pixels are 4 blocks of 5 and
/// 4 of 4, not 7 of 5 and one of 1: a block of one pixel keeps two accumulators busy).
pub(super) fn for_pixel_blocks(e: &mut Emit, ow: usize, body: impl FnMut(&mut Emit, Value, usize)) {
    for_blocks(e, ow, PIXELS, body);
}

/// What the forward kernel does with its accumulators besides storing them, while they are
/// still in registers (the fusion pass's epilogues).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Epilogue {
    /// Rectify with this α (0: relu) before storing.
    pub rectify: Option<f32>,
    /// Add each sample's per-channel Σy and Σy² (of the stored values) into buffer 4,
    /// laid out (N, 2, F) and zeroed by the caller: what batchnorm's statistics need.
    pub stats: bool,
}

/// y[n,oh,ow,f] = b[f] + Σ x[n, oh·sh+kh, ow·sw+kw, c] · w[kh,kw,c,f], for samples start..end,
/// then `epilogue`. Buffers: [x (padded), w ((KH·KW·C, F) packed by [`pack_weights`]), b (F)
/// or unused, y, sums (N,2,F)].
pub fn forward(e: &mut Emit, s: &ConvShape, epilogue: Epilogue) {
    let (x, w, y) = (e.buf(0), e.buf(1), e.buf(3));
    let bias = s.bias.then(|| e.buf(2));
    let sums = epilogue.stats.then(|| e.buf(4));
    if s.is_point() {
        return dense(e, [s.c, s.f], Rows { x, w, bias, y, sums }, epilogue);
    }
    let (start, end) = (e.start, e.end);
    let input = Input::new(e, s);
    e.for_range(start, end, |e, n| {
        let xn = input.sample(e, s, x, n);
        let yn_off = e.mul_k(n, (s.oh * s.ow * s.f) as i64);
        let yn = e.at(y, yn_off);
        let sums_n = sums.map(|sums| {
            let off = e.mul_k(n, 2 * s.f as i64);
            e.at(sums, off)
        });
        e.for_n(s.oh, |e, oh| {
            for_pixel_blocks(e, s.ow, |e, ow0, pixels| {
                for_chunks(e, s.f, |e, f0, width| {
                    let parts = width.parts();
                    let acc = pixel_block(
                        e,
                        s,
                        [xn, w, bias.unwrap_or(xn)],
                        [oh, ow0],
                        pixels,
                        f0,
                        width,
                        input.spread(),
                    );
                    let pixel = e.mul_k(oh, s.ow as i64);
                    let pixel = e.add(pixel, ow0);
                    let y_off = e.mul_k(pixel, s.f as i64);
                    let y_off = e.add(y_off, f0);
                    let ybase = e.at(yn, y_off);
                    let mut rows = Vec::with_capacity(pixels);
                    for r in 0..pixels {
                        let mut values: Vec<Value> =
                            (0..parts).map(|p| e.use_var(acc[r * parts + p])).collect();
                        if let Some(alpha) = epilogue.rectify {
                            let vector = width != Width::Scalar;
                            values = values
                                .iter()
                                .map(|v| super::eltwise::rectify(e, *v, alpha, vector))
                                .collect();
                        }
                        store_chunk(e, &values, ybase, (r * s.f) as i64);
                        rows.push(values);
                    }
                    if let Some(sums_n) = sums_n {
                        let base = e.at(sums_n, f0);
                        add_sums(e, &rows, base, s.f, width);
                    }
                });
            });
        });
    });
}

/// The largest sample whose one input channel [`spread_sample`] copies, in bytes (4 lanes per
/// element): a 28x28 image takes 12.5 KB of the kernel's stack frame.
const SPREAD_BYTES: usize = 64 << 10;

/// Where the direct kernels read a sample of their (padded) input: in x itself, or, where the
/// convolution has one input channel and a sample fits in [`SPREAD_BYTES`], in a stack slot
/// that [`spread_sample`] copies it into.
#[derive(Clone, Copy)]
struct Input {
    spread: Option<cranelift_codegen::ir::StackSlot>,
}

impl Input {
    fn new(e: &mut Emit, s: &ConvShape) -> Self {
        use cranelift_codegen::ir::{StackSlotData, StackSlotKind};
        let bytes = s.hp * s.wp * 16;
        let spread = (s.c == 1 && s.f >= 4 && bytes <= SPREAD_BYTES).then(|| {
            // 16-byte aligned
            e.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, bytes as u32, 4))
        });
        Input { spread }
    }

    /// Sample `n` of x, spread where the kernel spreads it.
    fn sample(self, e: &mut Emit, s: &ConvShape, x: Value, n: Value) -> Value {
        let xn_off = e.mul_k(n, (s.hp * s.wp * s.c) as i64);
        let xn = e.at(x, xn_off);
        self.spread.map_or(xn, |slot| spread_sample(e, s, xn, slot))
    }

    fn spread(self) -> bool {
        self.spread.is_some()
    }
}

/// One sample of a one-channel input at `xn`, each element in all 4 lanes, in `slot`; its
/// address. The register blocks then load each pixel's broadcast as one vector (`vmovups`)
/// where they took a scalar load and a register broadcast, which also takes a vector pipe:
/// Cranelift folds a load into a splat only where nothing above it is used twice, and a row's
/// broadcast is used by every vector of the chunk. The first layer's fused conv+pool went from
/// 12.6–13.5 to 11.8–12.4 ms a batch of 1000 on one thread (the best three of six alternated
/// runs), after a copy of 784 vectors a sample. The same products, in the same order.
fn spread_sample(e: &mut Emit, s: &ConvShape, xn: Value, slot: cranelift_codegen::ir::StackSlot) -> Value {
    let xb = e.b.ins().stack_addr(e.ptr, slot, 0);
    e.for_n(s.hp * s.wp, |e, p| {
        let src = e.at(xn, p);
        let v = e.load(src, 0);
        let v = e.splat(v);
        let p4 = e.mul_k(p, 4);
        let dst = e.at(xb, p4);
        e.store(v, dst, 0);
    });
    xb
}

/// The accumulators of one register block of [`forward`]: `pixels` outputs from (oh, ow0)
/// along a row, one chunk of output channels from f0: the bias (where `s.bias`, from `b`;
/// `b` is not read otherwise), then Σ over the taps and input channels in order. With
/// `spread`, `xn` is [`spread_sample`]'s copy.
#[allow(clippy::too_many_arguments)]
fn pixel_block(
    e: &mut Emit,
    s: &ConvShape,
    [xn, w, b]: [Value; 3],
    [oh, ow0]: [Value; 2],
    pixels: usize,
    f0: Value,
    width: Width,
    spread: bool,
) -> Vec<Variable> {
    // a spread x holds each element in 4 lanes, at 4x its offset
    let lanes = if spread { 4 } else { 1 };
    let parts = width.parts();
    let acc = accumulators(e, pixels * parts, width);
    if s.bias {
        let addr = e.at(b, f0);
        let b = load_chunk(e, addr, 0, width);
        for (i, a) in acc.iter().enumerate() {
            e.def_var(*a, b[i % parts]);
        }
    }
    // With few input channels the tap loops are most of the work: unroll them.
    let taps = if s.c < UNROLL { [s.kh, s.kw] } else { [1, 1] };
    // The block's first tap, (0, 0), in x and w; the others lie a constant offset from it
    // where the tap loops are unrolled, so that each tap's loads take it as an immediate
    // (the whole offset per tap was four integer instructions beside its 8 multiply-adds).
    let zero = e.int(0);
    let x_off = input_offset(e, s.input(), s.stride(), None, [oh, ow0], [zero, zero]);
    let x_off = e.mul_k(x_off, lanes);
    let xfirst = e.at(xn, x_off);
    let w_off = packed_tap_offset(e, s, [zero, zero], s.c, f0, width);
    let wfirst = e.at(w, w_off);
    e.for_n_unrolled(s.kh, taps[0], |e, kh| {
        e.for_n_unrolled(s.kw, taps[1], |e, kw| {
            // x at (kh, kw) from the block's first pixel: (kh·WP + kw)·C
            let row = e.mul_k(kh, s.wp as i64);
            let pixel = e.add(row, kw);
            let x_tap = e.mul_k(pixel, s.c as i64 * lanes);
            let xbase = e.at(xfirst, x_tap);
            // w (packed) at (kh, kw, 0) of the chunk from f0
            let tap = e.mul_k(kh, s.kw as i64);
            let tap = e.add(tap, kw);
            let w_tap = e.mul_k(tap, (s.c * width.lanes()) as i64);
            let wbase = e.at(wfirst, w_tap);
            e.for_n_unrolled(s.c, UNROLL, |e, ci| {
                let wci_off = e.mul_k(ci, width.lanes() as i64);
                let waddr = e.at(wbase, wci_off);
                let wv = load_chunk(e, waddr, 0, width);
                let ci = e.mul_k(ci, lanes);
                let xaddr = e.at(xbase, ci);
                let step = (s.sw * s.c) as i64 * lanes;
                accumulate_with(e, &acc, &wv, |e, r| {
                    let offset = r as i64 * step;
                    match width {
                        Width::Scalar => e.load(xaddr, offset),
                        _ if spread => e.load4(xaddr, offset),
                        _ => broadcast(e, xaddr, offset, width),
                    }
                });
            });
        });
    });
    acc
}

/// [`forward`] followed by a max pool whose windows (`window`, its stride too, no padding) tile
/// the convolution's outputs, for inference: y[n, py, px, f] = ε(max over the window of the
/// convolution), ε the rectifier (α ≥ 0, so that it commutes with the max: the same bits as
/// rectifying first). The convolution's OH x OW are the rows and columns the windows read.
/// Each window row is a register block (whole windows, up to [`PIXELS`] pixels); its maxima
/// go into y, and the next rows' are taken with them there: the convolution's output is
/// never stored (only the running maxima, in y), and no pool pass reads it back. Buffers: [x (padded), w (packed),
/// b (F) or unused, y (N, OH / wh, OW / ww, F)].
pub fn forward_max_pooled(e: &mut Emit, s: &ConvShape, window: [usize; 2], rectify: Option<f32>) {
    let (x, w, y) = (e.buf(0), e.buf(1), e.buf(3));
    let b = e.buf(2);
    let [wh, ww] = window;
    assert!(s.oh.is_multiple_of(wh) && s.ow.is_multiple_of(ww), "windows that tile the convolution's output");
    assert!(rectify.is_none_or(|a| a >= 0.0), "a rectifier that commutes with the max");
    let (ph, pw) = (s.oh / wh, s.ow / ww);
    // whole windows per block: up to PIXELS pixels, at least one window
    let per_block = (PIXELS / ww).max(1);
    let (start, end) = (e.start, e.end);
    let input = Input::new(e, s);
    e.for_range(start, end, |e, n| {
        let xn = input.sample(e, s, x, n);
        let yn_off = e.mul_k(n, (ph * pw * s.f) as i64);
        let yn = e.at(y, yn_off);
        e.for_n(ph, |e, py| {
            for_blocks(e, pw, per_block, |e, px0, windows| {
                for_chunks(e, s.f, |e, f0, width| {
                    let parts = width.parts();
                    let vector = width != Width::Scalar;
                    let y_off = e.mul_k(py, pw as i64);
                    let y_off = e.add(y_off, px0);
                    let y_off = e.mul_k(y_off, s.f as i64);
                    let y_off = e.add(y_off, f0);
                    let ybase = e.at(yn, y_off);
                    let ow0 = e.mul_k(px0, ww as i64);
                    for dy in 0..wh {
                        let oh = e.mul_k(py, wh as i64);
                        let oh = e.add_k(oh, dy as i64);
                        let acc =
                            pixel_block(e, s, [xn, w, b], [oh, ow0], windows * ww, f0, width, input.spread());
                        // each window's maximum so far, in the pool's order (row by row)
                        let one = if vector { Width::One } else { Width::Scalar };
                        for q in 0..windows {
                            for p in 0..parts {
                                let at = |e: &mut Emit, i: usize| e.use_var(acc[(q * ww + i) * parts + p]);
                                let offset = (q * s.f + 4 * p) as i64;
                                let mut best =
                                    if dy == 0 { at(e, 0) } else { load_chunk(e, ybase, offset, one)[0] };
                                for i in usize::from(dy == 0)..ww {
                                    let v = at(e, i);
                                    best = super::pool::max(e, best, v, one);
                                }
                                if dy == wh - 1
                                    && let Some(alpha) = rectify
                                {
                                    best = super::eltwise::rectify(e, best, alpha, vector);
                                }
                                store_chunk(e, &[best], ybase, offset);
                            }
                        }
                    }
                });
            });
        });
    });
}

/// Calls `body(first, count)` for blocks of up to `most` of `total` items, balanced (sizes
/// that differ by at most one): [`for_pixel_blocks`]'s pixels, [`forward_max_pooled`]'s windows.
fn for_blocks(e: &mut Emit, total: usize, most: usize, mut body: impl FnMut(&mut Emit, Value, usize)) {
    let blocks = total.div_ceil(most);
    let (small, larger) = (total / blocks, total % blocks);
    if larger > 0 {
        e.for_n(larger, |e, b| {
            let first = e.mul_k(b, (small + 1) as i64);
            body(e, first, small + 1);
        });
    }
    e.for_n(blocks - larger, |e, b| {
        let first = e.mul_k(b, small as i64);
        let first = e.add_k(first, (larger * (small + 1)) as i64);
        body(e, first, small);
    });
}

/// The buffers of a [`dense`] product.
struct Rows {
    /// (N, K), a sample a row.
    x: Value,
    /// (K, F) packed by [`pack_weights`].
    w: Value,
    bias: Option<Value>,
    /// (N, F).
    y: Value,
    /// (N, 2, F), zeroed: each sample's Σy and Σy² ([`Epilogue::stats`]).
    sums: Option<Value>,
}

/// [`forward`] and [`backward_input`] of a dense layer (a 1x1 convolution of 1x1 images):
/// Y = X·W (+ bias, then `epilogue`) for the samples start..end, with the loops the other way
/// round: chunks of output channels outermost, then blocks of [`DENSE_ROWS`] samples. Each chunk
/// of W (K x 8) is then read from memory once per call, and from cache by every block after
/// the first, where one sample at a time read all of W once per sample (a 1024 x 1024 layer:
/// 4 MB a sample, memory-bound at a fifth of the FMA peak). Each output is summed in the
/// order [`forward`]'s per-pixel loops sum it (bias, then k = 0, 1, …): the same bits.
fn dense(e: &mut Emit, [k, n]: [usize; 2], io: Rows, epilogue: Epilogue) {
    let (start, end) = (e.start, e.end);
    let rows = e.ins().isub(end, start);
    // a call covers at most a batch: far fewer than 2^30 samples
    let blocks = e.div_k(rows, DENSE_ROWS as u64, 1 << 30);
    let done = e.mul_k(blocks, DENSE_ROWS as i64);
    let rest = e.ins().isub(rows, done);
    let rest_first = e.add(done, start);
    for_chunks(e, n, |e, f0, width| {
        let zero = e.int(0);
        e.for_range(zero, blocks, |e, b| {
            let first = e.mul_k(b, DENSE_ROWS as i64);
            let first = e.add(first, start);
            dense_block(e, [k, n], &io, epilogue, [first, f0], DENSE_ROWS, width);
        });
        for count in 1..DENSE_ROWS {
            let wanted = e.int(count as i64);
            let here = e.icmp(IntCC::Equal, rest, wanted);
            e.when(here, |e| dense_block(e, [k, n], &io, epilogue, [rest_first, f0], count, width));
        }
    });
}

/// One block of [`dense`]: `count` samples from `first`, one chunk of outputs from `f0`.
fn dense_block(
    e: &mut Emit,
    [k, n]: [usize; 2],
    io: &Rows,
    epilogue: Epilogue,
    [first, f0]: [Value; 2],
    count: usize,
    width: Width,
) {
    let parts = width.parts();
    let acc = accumulators(e, count * parts, width);
    if let Some(bias) = io.bias {
        let addr = e.at(bias, f0);
        let b = load_chunk(e, addr, 0, width);
        for (i, a) in acc.iter().enumerate() {
            e.def_var(*a, b[i % parts]);
        }
    }
    // W packed: the chunk from f0 at f0·K, its row kk at kk·width
    let w_off = e.mul_k(f0, k as i64);
    let wbase = e.at(io.w, w_off);
    let x_off = e.mul_k(first, k as i64);
    let xbase = e.at(io.x, x_off);
    e.for_n_unrolled(k, UNROLL, |e, kk| {
        let wk_off = e.mul_k(kk, width.lanes() as i64);
        let waddr = e.at(wbase, wk_off);
        let wv = load_chunk(e, waddr, 0, width);
        let xaddr = e.at(xbase, kk);
        accumulate(e, &acc, &wv, |e, r| e.at_k(xaddr, (r * k) as i64), width);
    });
    let y_off = e.mul_k(first, n as i64);
    let y_off = e.add(y_off, f0);
    let ybase = e.at(io.y, y_off);
    for r in 0..count {
        let mut values: Vec<Value> = (0..parts).map(|p| e.use_var(acc[r * parts + p])).collect();
        if let Some(alpha) = epilogue.rectify {
            let vector = width != Width::Scalar;
            values = values.iter().map(|v| super::eltwise::rectify(e, *v, alpha, vector)).collect();
        }
        store_chunk(e, &values, ybase, (r * n) as i64);
        if let Some(sums) = io.sums {
            // sample first + r's sums: (first + r)·2F + f0
            let sample = e.add_k(first, r as i64);
            let off = e.mul_k(sample, 2 * n as i64);
            let off = e.add(off, f0);
            let base = e.at(sums, off);
            add_sums(e, &[values], base, n, width);
        }
    }
}

/// Adds Σ_r rows[r] and Σ_r rows[r]² (one chunk of channels) into the sums at `base` and
/// `base + f`.
pub(super) fn add_sums(e: &mut Emit, rows: &[Vec<Value>], base: Value, f: usize, width: Width) {
    let old_sum = load_chunk(e, base, 0, width);
    let old_sq = load_chunk(e, base, f as i64, width);
    let mut sum = old_sum;
    let mut sq = old_sq;
    for row in rows {
        for (p, v) in row.iter().enumerate() {
            sum[p] = e.ins().fadd(sum[p], *v);
            sq[p] = e.fma(*v, *v, sq[p]);
        }
    }
    store_chunk(e, &sum, base, 0);
    store_chunk(e, &sq, base, f as i64);
}

/// dx[n, oh·sh+kh, ow·sw+kw, c] += Σ_f dy[n,oh,ow,f] · wt[kh,kw,f,c], for samples start..end,
/// into a zeroed, padded dx. Buffers: [dy, wt (the kernel transposed to KH,KW,F,C, as
/// (KH·KW·F, C) packed by [`pack_weights`]), dx].
pub fn backward_input(e: &mut Emit, s: &ConvShape) {
    let (dy, wt, dx) = (e.buf(0), e.buf(1), e.buf(2));
    if s.is_point() {
        // dx = dy · wᵀ, each element written once (into the zeroed dx: the same values)
        let rows = Rows { x: dy, w: wt, bias: None, y: dx, sums: None };
        return dense(e, [s.f, s.c], rows, Epilogue::default());
    }
    let (start, end) = (e.start, e.end);
    e.for_range(start, end, |e, n| {
        let dyn_off = e.mul_k(n, (s.oh * s.ow * s.f) as i64);
        let dyn_ = e.at(dy, dyn_off);
        let dxn_off = e.mul_k(n, (s.hp * s.wp * s.c) as i64);
        let dxn = e.at(dx, dxn_off);
        e.for_n(s.oh, |e, oh| {
            for_pixel_blocks(e, s.ow, |e, ow0, pixels| {
                let pixel = e.mul_k(oh, s.ow as i64);
                let pixel = e.add(pixel, ow0);
                let dy_off = e.mul_k(pixel, s.f as i64);
                let dybase = e.at(dyn_, dy_off);
                e.for_n(s.kh, |e, kh| {
                    e.for_n(s.kw, |e, kw| {
                        for_chunks(e, s.c, |e, c0, width| {
                            let parts = width.parts();
                            let acc = accumulators(e, pixels * parts, width);
                            let w_off = packed_tap_offset(e, s, [kh, kw], s.f, c0, width);
                            let wbase = e.at(wt, w_off);
                            e.for_n_unrolled(s.f, UNROLL, |e, f| {
                                let wf_off = e.mul_k(f, width.lanes() as i64);
                                let waddr = e.at(wbase, wf_off);
                                let wv = load_chunk(e, waddr, 0, width);
                                let daddr = e.at(dybase, f);
                                accumulate(e, &acc, &wv, |e, r| e.at_k(daddr, (r * s.f) as i64), width);
                            });
                            let dx_off = input_offset(e, s.input(), s.stride(), None, [oh, ow0], [kh, kw]);
                            let dx_off = e.add(dx_off, c0);
                            let dxbase = e.at(dxn, dx_off);
                            for r in 0..pixels {
                                let offset = (r * s.sw * s.c) as i64;
                                let old = load_chunk(e, dxbase, offset, width);
                                let new: Vec<Value> = (0..parts)
                                    .map(|p| {
                                        let a = e.use_var(acc[r * parts + p]);
                                        e.ins().fadd(old[p], a)
                                    })
                                    .collect();
                                store_chunk(e, &new, dxbase, offset);
                            }
                        });
                    });
                });
            });
        });
    });
}

/// dw[kh,kw,c,f] = Σ over the batch's samples and output pixels of
/// x[n, oh·sh+kh, ow·sw+kw, c] · dy[n,oh,ow,f], for tasks start..end, a task being a group of
/// [`WEIGHT_ROWS`] consecutive rows (kh, kw, c) of dw: each owns its part of dw and sums in a fixed
/// order, so the result does not depend on how tasks are spread over threads.
/// Samples are the outer loop: each sample's x and dy stay in cache while every task of this
/// call passes over them, instead of the whole batch streaming from memory once per task.
/// With a bias, the tasks of the last group of rows also sum db[f] = Σ dy[n,oh,ow,f] over the
/// batch's samples and pixels, in the order that dw's elements sum, while dy is in registers.
/// Buffers: [x (padded), dy, dw (KH,KW,C,F)], then db (F) with a bias, each zeroed.
pub fn backward_weights(e: &mut Emit, s: &ConvShape) {
    weights_backward(e, s, None);
}

/// [`backward_weights`] of a block conv → relu whose output y only a max pool reads, unpadded,
/// with windows (`window`, its stride too) that tile y, where the pool runs inside the block in
/// training and y is never stored: the forward pass writes only the pool's output. For each
/// part of output channels, once a sample (by the first of the part's tasks in the shard's
/// range), y is recomputed from x as the forward kernel computes it ([`pixel_block`]: the same
/// products in the same order, so the same bits) into the shard's scratch, and turned there,
/// window by window, into dy as the pool's and the relu's backward passes would give it from
/// the pool's gradient dp ([`pool::window_gradient`]); the part's tasks then read it. No pass
/// over memory the size of y is left: not y's write, nor the pool's two reads of it, nor dy's
/// write and read. Buffers: [x (padded), dp (N, OH/wh, OW/ww, F), dw, db (F) or unused, w
/// ((KH·KW·C, F) packed by [`pack_weights`]), b (F) or unused, scratch
/// ([`ConvShape::pooled_weight_scratch`] a shard)], dw and db zeroed.
pub fn pooled_backward_weights(e: &mut Emit, s: &ConvShape, window: [usize; 2]) {
    assert!(
        s.oh.is_multiple_of(window[0]) && s.ow.is_multiple_of(window[1]),
        "windows that tile the convolution's output"
    );
    weights_backward(e, s, Some(window));
}

/// Where a weight-gradient task reads dy: rows of `stride` elements a pixel from `base` (its
/// sample's first pixel), its channels from `first` in each.
#[derive(Clone, Copy)]
struct Grad {
    base: Value,
    stride: usize,
    first: Value,
}

fn weights_backward(e: &mut Emit, s: &ConvShape, pooled: Option<[usize; 2]>) {
    let (x, dy, dw) = (e.buf(0), e.buf(1), e.buf(2));
    let db = s.bias.then(|| e.buf(3));
    let staged = pooled.map(|window| (window, [e.buf(4), e.buf(5)], e.buf(6)));
    let (groups, parts) = (s.weight_groups(), s.weight_parts());
    // balanced groups of rows: the first `larger` have one row more
    let (small, larger) = (s.weight_rows() / groups, s.weight_rows() % groups);
    let channels_last = s.f - (parts - 1) * 8;
    let channels_full = if parts == 1 { s.f } else { 8 };
    let (start, end, batch) = (e.start, e.end, e.batch);
    let zero = e.int(0);
    e.for_range(zero, batch, |e, n| {
        e.for_range(start, end, |e, task| {
            let bound = s.weight_tasks() as u64;
            // part-major: a shard's tasks share output channels, and the lines of dy they read
            let part = e.div_k(task, groups as u64, bound);
            let group = e.rem_k(task, groups as u64, bound);
            let f0 = e.mul_k(part, 8);
            // the last part may be narrower: a variant for it, chosen at run time
            let by_part = |e: &mut Emit, body: &dyn Fn(&mut Emit, usize)| {
                if channels_last == channels_full {
                    return body(e, channels_full);
                }
                let final_part = e.int(parts as i64 - 1);
                let is_last = e.icmp(IntCC::Equal, part, final_part);
                e.when_else(is_last, |e| body(e, channels_last), |e| body(e, channels_full));
            };
            let grad = match staged {
                None => {
                    let off = e.mul_k(n, (s.oh * s.ow * s.f) as i64);
                    Grad { base: e.at(dy, off), stride: s.f, first: f0 }
                }
                Some((window, [w, b], scratch)) => {
                    // the part's dy, staged by the first of its tasks in this shard's range
                    let first_task = e.icmp(IntCC::Equal, task, start);
                    let zero = e.int(0);
                    let first_group = e.icmp(IntCC::Equal, group, zero);
                    let fresh = e.ins().bor(first_task, first_group);
                    let stage = |e: &mut Emit, channels: usize| {
                        let part = (f0, channels, channels_full);
                        stage_pool_gradient(e, s, window, [x, w, b, dy, scratch], n, part);
                    };
                    e.when(fresh, |e| by_part(e, &stage));
                    Grad { base: scratch, stride: channels_full, first: zero }
                }
            };
            let by_rows = |e: &mut Emit, rows: usize, k0: Value, bias: Option<Value>| {
                let body = |e: &mut Emit, channels: usize| {
                    weight_rows(e, s, [x, dw], grad, bias, k0, n, rows, (f0, channels))
                };
                by_part(e, &body);
            };
            // the last group (one of the smaller) also sums db over its part's channels
            let smaller = |e: &mut Emit, k0: Value| match db {
                None => by_rows(e, small, k0, None),
                Some(db) => {
                    let final_group = e.int(groups as i64 - 1);
                    let is_last = e.icmp(IntCC::Equal, group, final_group);
                    e.when_else(
                        is_last,
                        |e| by_rows(e, small, k0, Some(db)),
                        |e| by_rows(e, small, k0, None),
                    );
                }
            };
            if larger == 0 {
                let k0 = e.mul_k(group, small as i64);
                smaller(e, k0);
            } else {
                let first_small = e.int(larger as i64);
                let is_larger = e.icmp(IntCC::UnsignedLessThan, group, first_small);
                e.when_else(
                    is_larger,
                    |e| {
                        let k0 = e.mul_k(group, small as i64 + 1);
                        by_rows(e, small + 1, k0, None);
                    },
                    |e| {
                        let k0 = e.mul_k(group, small as i64);
                        let k0 = e.add_k(k0, larger as i64);
                        smaller(e, k0);
                    },
                );
            }
        });
    });
}

/// Sample n's part of `rows` rows of the weight gradient from row k0 (a row is one kh, kw, c)
/// and `channels` output channels from `first`, added into dw (zeroed by the caller): each
/// chunk's accumulators are loaded from dw, run over the sample's output pixels, and stored
/// back. Each dw element sums over samples, then output rows, then columns, in order. With
/// `db`, the chunk's dy is also added into db's accumulators (loaded and stored as dw's).
#[allow(clippy::too_many_arguments)]
fn weight_rows(
    e: &mut Emit,
    s: &ConvShape,
    [x, dw]: [Value; 2],
    grad: Grad,
    db: Option<Value>,
    k0: Value,
    n: Value,
    rows: usize,
    (first, channels): (Value, usize),
) {
    // Row k reads x at (n, oh·sh + kh, ow·sw + kw, c), (kh, kw, c) from k = (kh·KW + kw)·C + c:
    // its base is sample n's x plus (kh·WP + kw)·C + c.
    let xn_off = e.mul_k(n, (s.hp * s.wp * s.c) as i64);
    let xn = e.at(x, xn_off);
    let xrows: Vec<Value> = (0..rows)
        .map(|r| {
            let k = e.add_k(k0, r as i64);
            let (rows, taps) = ((s.kh * s.kw * s.c) as u64, (s.kh * s.kw) as u64);
            let tap = e.div_k(k, s.c as u64, rows);
            let c = e.rem_k(k, s.c as u64, rows);
            let kh = e.div_k(tap, s.kw as u64, taps);
            let kw = e.rem_k(tap, s.kw as u64, taps);
            let off = e.mul_k(kh, s.wp as i64);
            let off = e.add(off, kw);
            let off = e.mul_k(off, s.c as i64);
            let off = e.add(off, c);
            e.at(xn, off)
        })
        .collect();
    let w_off = e.mul_k(k0, s.f as i64);
    let dwbase = e.at(dw, w_off);
    for_chunks(e, channels, |e, c0, width| {
        let f0 = e.add(first, c0);
        let g0 = e.add(grad.first, c0);
        let parts = width.parts();
        let base = e.at(dwbase, f0);
        let mut acc: Vec<Variable> = Vec::with_capacity(rows * parts);
        for j in 0..rows {
            for v in load_chunk(e, base, (j * s.f) as i64, width) {
                acc.push(e.var(width.ty(), v));
            }
        }
        let bias = db.map(|db| {
            let addr = e.at(db, f0);
            let sums: Vec<Variable> =
                load_chunk(e, addr, 0, width).into_iter().map(|v| e.var(width.ty(), v)).collect();
            (addr, sums)
        });
        e.for_n(s.oh, |e, oh| {
            // the output row's pixels start at (oh·sh·WP)·C past each row's base
            let x_row = e.mul_k(oh, (s.sh * s.wp * s.c) as i64);
            let d_off = e.mul_k(oh, (s.ow * grad.stride) as i64);
            let d_off = e.add(d_off, g0);
            let dyrow = e.at(grad.base, d_off);
            e.for_n_unrolled(s.ow, UNROLL, |e, ow| {
                let xo = e.mul_k(ow, (s.sw * s.c) as i64);
                let index = e.add(x_row, xo);
                let dofs = e.mul_k(ow, grad.stride as i64);
                let daddr = e.at(dyrow, dofs);
                let dv = load_chunk(e, daddr, 0, width);
                if let Some((_, sums)) = &bias {
                    for (sum, v) in sums.iter().zip(&dv) {
                        let current = e.use_var(*sum);
                        let added = e.ins().fadd(current, *v);
                        e.def_var(*sum, added);
                    }
                }
                accumulate(e, &acc, &dv, |e, r| e.at(xrows[r], index), width);
            });
        });
        for j in 0..rows {
            let values: Vec<Value> = (0..parts).map(|p| e.use_var(acc[j * parts + p])).collect();
            store_chunk(e, &values, base, (j * s.f) as i64);
        }
        if let Some((addr, sums)) = bias {
            let values: Vec<Value> = sums.iter().map(|v| e.use_var(*v)).collect();
            store_chunk(e, &values, addr, 0);
        }
    });
}

/// Sample n's dy for the `channels` output channels from `first` ([`pooled_backward_weights`])
/// into `out` (OH·OW pixels of `stride` elements, the channels from 0): y = relu(conv(x)), as
/// the forward kernel computes it, then, window by window in place, the gradient the pool
/// gives each pixel from dp, through the relu.
fn stage_pool_gradient(
    e: &mut Emit,
    s: &ConvShape,
    [wh, ww]: [usize; 2],
    [x, w, b, dp, out]: [Value; 5],
    n: Value,
    (first, channels, stride): (Value, usize, usize),
) {
    let xn_off = e.mul_k(n, (s.hp * s.wp * s.c) as i64);
    let xn = e.at(x, xn_off);
    e.for_n(s.oh, |e, oh| {
        for_pixel_blocks(e, s.ow, |e, ow0, pixels| {
            for_chunks(e, channels, |e, c0, width| {
                let f0 = e.add(first, c0);
                let parts = width.parts();
                let acc = pixel_block(e, s, [xn, w, b], [oh, ow0], pixels, f0, width, false);
                let pixel = e.mul_k(oh, s.ow as i64);
                let pixel = e.add(pixel, ow0);
                let o_off = e.mul_k(pixel, stride as i64);
                let o_off = e.add(o_off, c0);
                let obase = e.at(out, o_off);
                for r in 0..pixels {
                    let values: Vec<Value> = (0..parts)
                        .map(|p| {
                            let v = e.use_var(acc[r * parts + p]);
                            super::eltwise::rectify(e, v, 0.0, width != Width::Scalar)
                        })
                        .collect();
                    store_chunk(e, &values, obase, (r * stride) as i64);
                }
            });
        });
    });
    let (ph, pw) = (s.oh / wh, s.ow / ww);
    let dpn_off = e.mul_k(n, (ph * pw * s.f) as i64);
    let dpn_off = e.add(dpn_off, first);
    let dpn = e.at(dp, dpn_off);
    e.for_n(ph, |e, py| {
        e.for_n(pw, |e, px| {
            // the window's first pixel; the others at constant offsets from it
            let row = e.mul_k(py, (wh * s.ow) as i64);
            let col = e.mul_k(px, ww as i64);
            let pixel = e.add(row, col);
            let window = e.mul_k(py, pw as i64);
            let window = e.add(window, px);
            let pixels: Vec<i64> =
                (0..wh).flat_map(|i| (0..ww).map(move |j| ((i * s.ow + j) * stride) as i64)).collect();
            for_chunks(e, channels, |e, c0, width| {
                let o_off = e.mul_k(pixel, stride as i64);
                let o_off = e.add(o_off, c0);
                let at = e.at(out, o_off);
                let loads: Vec<Vec<Value>> = pixels.iter().map(|p| load_chunk(e, at, *p, width)).collect();
                let dp_off = e.mul_k(window, s.f as i64);
                let dp_off = e.add(dp_off, c0);
                let dpw = e.at(dpn, dp_off);
                let grad = load_chunk(e, dpw, 0, width);
                let shares = super::pool::window_gradient(e, &loads, &grad, true, width);
                for (p, share) in pixels.iter().zip(shares) {
                    store_chunk(e, &share, at, *p);
                }
            });
        });
    });
}

/// Rows of dw that [`normalized_weight_sums`] runs over a run of pixels together: two
/// accumulators a row, so 5 rows (or 4 and the batchnorm's two sums) take 10 of the 16 vector
/// registers, beside the pixel's g, y − μ and a broadcast of x.
const NORM_ROWS: usize = 5;

/// Bytes of the staging of [`normalized_weight_sums`], at most: g and y − μ of a run of
/// pixels, which stay in L1 while each group of rows passes over them.
const NORM_STAGING_BYTES: usize = 16 << 10;

/// The backward pass of a block conv → batchnorm (→ rectifier) whose input needs no gradient,
/// as per-sample sums from which the caller takes dw, dγ and dβ: the convolution's output
/// gradient dc is never written, nor read back. The batchnorm's backward makes dc, per output
/// channel f, a·g + b·(y − μ) + d (a, b, d from the batch's sums below, y the convolution's
/// output, μ its batch mean, g = dz passed back through the rectifier, whose mask comes from
/// its input y·scale + shift, recomputed as the normalize kernel computes it: z is not read), so
///
/// ```text
///   dw[k][f] = a·Σ x_k·g + b·Σ x_k·(y − μ) + d·Σ x_k
/// ```
///
/// over the batch's output pixels, x_k the input under row k = (kh, kw, c) of dw. For each
/// sample n, into its (2 + 2K) x F sums (zeroed by the caller; K = KH·KW·C): Σ g and
/// Σ g·(y − μ), then Σ x_k·g for the K rows, then Σ x_k·(y − μ); each over the output pixels
/// in order. An output row is taken in runs of pixels: first g and y − μ of the run, every
/// channel, into a staging slot (a pass that reads dz and y in order, as the prefetchers
/// like), then, a vector of channels at a time, groups of [`NORM_ROWS`] rows over the run, from
/// the staging in L1. Buffers: [x (padded), dz, (scale, shift) (2, F) with a rectifier, else
/// unused, y, μ (F), sums (N, 2 + 2K, F)]; items: samples.
pub fn normalized_weight_sums(e: &mut Emit, s: &ConvShape, rectifier: Option<f32>) {
    weight_sums(e, s, rectifier, None);
}

/// [`normalized_weight_sums`] of a block conv → batchnorm → relu whose output only a max pool
/// reads, unpadded, with windows (`window`, its stride too) that tile it, where the pool runs
/// inside the block in training and the block's output z is never stored: g, the gradient of
/// the relu's input, comes from the pool's gradient dp instead of dz, window by window
/// ([`pool::window_gradient`] over relu(y·scale + shift), rebuilt as the normalize kernel
/// computes it). A run is a row of windows: its `window[0]` rows of pixels staged together.
/// Buffers: as [`normalized_weight_sums`]'s, with dp (N, OH/wh, OW/ww, F) for dz; items: samples.
pub fn pooled_weight_sums(e: &mut Emit, s: &ConvShape, window: [usize; 2]) {
    assert!(
        s.oh.is_multiple_of(window[0]) && s.ow.is_multiple_of(window[1]),
        "windows that tile the convolution's output"
    );
    weight_sums(e, s, Some(0.0), Some(window));
}

/// The bytes of [`pooled_weight_sums`]'s staging: g and y − μ of a row of windows.
pub fn pooled_sums_staging(s: &ConvShape, window: [usize; 2]) -> usize {
    8 * window[0] * s.ow * s.f
}

fn weight_sums(e: &mut Emit, s: &ConvShape, rectifier: Option<f32>, pooled: Option<[usize; 2]>) {
    use cranelift_codegen::ir::{StackSlotData, StackSlotKind};
    let (x, dz, affine, y, mean, sums) = (e.buf(0), e.buf(1), e.buf(2), e.buf(3), e.buf(4), e.buf(5));
    let rows = s.kh * s.kw * s.c;
    let input = Input::new(e, s);
    // a spread x holds each element in 4 lanes, at 4x its offset
    let lanes = if input.spread() { 4 } else { 1 };
    // row k's x from the pixel's first tap: (kh·WP + kw)·C + c, k = (kh·KW + kw)·C + c
    let row_offset = |k: usize| {
        let (tap, c) = (k / s.c, k % s.c);
        ((tap / s.kw * s.wp + tap % s.kw) * s.c + c) as i64 * lanes
    };
    // balanced groups of rows, the two batchnorm sums counting as one more row, in the first
    let units = rows + 1;
    let groups = units.div_ceil(NORM_ROWS);
    let bounds: Vec<usize> = (0..=groups).map(|g| (units * g / groups).saturating_sub(1)).collect();
    let per_sample = (2 + 2 * rows) * s.f;
    // the staging: g of the run's pixels (F each), then y − μ; with a pool, a run is a row of
    // windows (`band` rows of pixels)
    let band = pooled.map_or(1, |[wh, _]| wh);
    let run = match pooled {
        Some(_) => s.ow,
        None => (NORM_STAGING_BYTES / (8 * s.f)).clamp(1, s.ow),
    };
    let slot = e.b.create_sized_stack_slot(StackSlotData::new(
        StackSlotKind::ExplicitSlot,
        (8 * band * run * s.f) as u32,
        4,
    ));
    let (start, end) = (e.start, e.end);
    e.for_range(start, end, |e, n| {
        let xn = input.sample(e, s, x, n);
        let out_off = e.mul_k(n, per_sample as i64);
        let out = e.at(sums, out_off);
        let d_off = e.mul_k(n, (s.oh * s.ow * s.f) as i64);
        let yn = e.at(y, d_off);
        let dzn = match pooled {
            Some([wh, ww]) => {
                let dp_off = e.mul_k(n, (s.oh / wh * (s.ow / ww) * s.f) as i64);
                e.at(dz, dp_off)
            }
            None => e.at(dz, d_off),
        };
        let per_channel = |e: &mut Emit, base: Value, f0: Value, offset: usize, width: Width| {
            let addr = e.at(base, f0);
            load_chunk(e, addr, offset as i64, width)[0]
        };
        e.for_n(s.oh / band, |e, first_row| {
            let oh0 = e.mul_k(first_row, band as i64);
            for_blocks(e, s.ow, run, |e, ow0, pixels| {
                let staged = e.b.ins().stack_addr(e.ptr, slot, 0);
                let centred_at = (band * pixels * s.f) as i64;
                let first = e.mul_k(oh0, s.ow as i64);
                let first = e.add(first, ow0);
                let first = e.mul_k(first, s.f as i64);
                let ya = e.at(yn, first);
                match pooled {
                    // g and y − μ of the run's pixels, in order
                    None => {
                        let dza = e.at(dzn, first);
                        e.for_n(pixels, |e, p| {
                            let at = e.mul_k(p, s.f as i64);
                            for_vectors(e, s.f, |e, f0, width| {
                                let vector = width != Width::Scalar;
                                let at = e.add(at, f0);
                                let load = |e: &mut Emit, base: Value| {
                                    let addr = e.at(base, at);
                                    load_chunk(e, addr, 0, width)[0]
                                };
                                let dv = load(e, dza);
                                let yv = load(e, ya);
                                // the rectifier's input, as the normalize kernel computed it: the
                                // same bits, so the same sign as its output z
                                let g = match rectifier {
                                    Some(alpha) => {
                                        let [scale, shift] =
                                            [0, s.f].map(|o| per_channel(e, affine, f0, o, width));
                                        let v = e.fma(yv, scale, shift);
                                        super::eltwise::rectify_gradient(e, v, dv, alpha, vector)
                                    }
                                    None => dv,
                                };
                                let mu = per_channel(e, mean, f0, 0, width);
                                let centred = e.ins().fsub(yv, mu);
                                let to = e.at(staged, at);
                                store_chunk(e, &[g], to, 0);
                                store_chunk(e, &[centred], to, centred_at);
                            });
                        });
                    }
                    // the same, a window at a time: g from the pool's gradient at the window's
                    // first maximum of z = relu(y·scale + shift), rebuilt as the normalize
                    // kernel computed it
                    Some([wh, ww]) => {
                        let row = e.mul_k(first_row, (s.ow / ww) as i64);
                        e.for_n(pixels / ww, |e, q| {
                            let window = e.add(row, q);
                            let col = e.mul_k(q, ww as i64);
                            let pixels_at: Vec<i64> =
                                (0..wh).flat_map(|i| (0..ww).map(move |j| (i * s.ow + j) as i64)).collect();
                            for_vectors(e, s.f, |e, f0, width| {
                                let vector = width != Width::Scalar;
                                let [scale, shift] = [0, s.f].map(|o| per_channel(e, affine, f0, o, width));
                                let mu = per_channel(e, mean, f0, 0, width);
                                let at = e.mul_k(col, s.f as i64);
                                let at = e.add(at, f0);
                                let from = e.at(ya, at);
                                let ys: Vec<Value> = pixels_at
                                    .iter()
                                    .map(|p| load_chunk(e, from, p * s.f as i64, width)[0])
                                    .collect();
                                let zs: Vec<Vec<Value>> = ys
                                    .iter()
                                    .map(|yv| {
                                        let v = e.fma(*yv, scale, shift);
                                        vec![super::eltwise::rectify(e, v, 0.0, vector)]
                                    })
                                    .collect();
                                let dp_at = e.mul_k(window, s.f as i64);
                                let dp_at = e.add(dp_at, f0);
                                let dp_addr = e.at(dzn, dp_at);
                                let dp = load_chunk(e, dp_addr, 0, width);
                                let shares = super::pool::window_gradient(e, &zs, &dp, true, width);
                                let to = e.at(staged, at);
                                for ((p, yv), g) in pixels_at.iter().zip(&ys).zip(shares) {
                                    let centred = e.ins().fsub(*yv, mu);
                                    // row i of the band at i·pixels·F in the staging
                                    let (i, j) = (*p as usize / s.ow, *p as usize % s.ow);
                                    let offset = ((i * pixels + j) * s.f) as i64;
                                    store_chunk(e, &g, to, offset);
                                    store_chunk(e, &[centred], to, centred_at + offset);
                                }
                            });
                        });
                    }
                }
                for i in 0..band {
                    let oh = e.add_k(oh0, i as i64);
                    let x_off = e.mul_k(oh, (s.sh * s.wp * s.c) as i64 * lanes);
                    let x_row = e.at(xn, x_off);
                    let x_first = e.mul_k(ow0, (s.sw * s.c) as i64 * lanes);
                    let x_first = e.at(x_row, x_first);
                    let staged_row = e.at_k(staged, (i * pixels * s.f) as i64);
                    for_vectors(e, s.f, |e, f0, width| {
                        let base = e.at(out, f0);
                        let stage = e.at(staged_row, f0);
                        for group in 0..groups {
                            let (k0, k1) = (bounds[group], bounds[group + 1]);
                            // the sums' rows this group adds into: (Σ g, Σ g·(y − μ)) first, then
                            // a pair (Σ x_k·g, Σ x_k·(y − μ)) for each of its rows k
                            let mut slots: Vec<usize> = if group == 0 { vec![0, 1] } else { Vec::new() };
                            slots.extend((k0..k1).flat_map(|k| [2 + k, 2 + rows + k]));
                            let acc: Vec<Variable> = slots
                                .iter()
                                .map(|&j| {
                                    let v = load_chunk(e, base, (j * s.f) as i64, width)[0];
                                    e.var(width.ty(), v)
                                })
                                .collect();
                            e.for_n_unrolled(pixels, UNROLL, |e, p| {
                                let at = e.mul_k(p, s.f as i64);
                                let from = e.at(stage, at);
                                let g = load_chunk(e, from, 0, width)[0];
                                let centred = load_chunk(e, from, centred_at, width)[0];
                                let add = |e: &mut Emit, slot: usize, scale: Option<Value>, v: Value| {
                                    let current = e.use_var(acc[slot]);
                                    let sum = match scale {
                                        Some(k) => e.fma(k, v, current),
                                        None => e.ins().fadd(current, v),
                                    };
                                    e.def_var(acc[slot], sum);
                                };
                                let mut slot = 0;
                                if group == 0 {
                                    add(e, 0, None, g);
                                    add(e, 1, Some(g), centred);
                                    slot = 2;
                                }
                                let xo = e.mul_k(p, (s.sw * s.c) as i64 * lanes);
                                let xp = e.at(x_first, xo);
                                for k in k0..k1 {
                                    let xv = match width {
                                        Width::Scalar => e.load(xp, row_offset(k)),
                                        _ if input.spread() => e.load4(xp, row_offset(k)),
                                        _ => broadcast(e, xp, row_offset(k), width),
                                    };
                                    add(e, slot, Some(xv), g);
                                    add(e, slot + 1, Some(xv), centred);
                                    slot += 2;
                                }
                            });
                            for (&j, a) in slots.iter().zip(&acc) {
                                let v = e.use_var(*a);
                                store_chunk(e, &[v], base, (j * s.f) as i64);
                            }
                        }
                    });
                }
            });
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_index_finds_what_pack_into_wrote() {
        // column counts with chunks of 8, 4 and 1, and without some of them
        // and one large enough to be packed on the worker threads
        for (k, n) in [(3, 8), (5, 13), (2, 7), (4, 3), (9, 20), (1, 1), (300, 230)] {
            let mut packed = vec![0.0; k * n];
            pack_into(k, n, |row, col| (row * n + col) as f32, &mut packed);
            for row in 0..k {
                for col in 0..n {
                    assert_eq!(
                        packed[packed_index(k, n, row, col)],
                        (row * n + col) as f32,
                        "({k}, {n}) at ({row}, {col})"
                    );
                }
            }
        }
    }
}
