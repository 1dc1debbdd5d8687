//! Pooling kernels, max and average, forward and backward, specialized to one layer's shapes.
//!
//! All work on whole channel chunks (8, 4, then single channels) of an input padded by the
//! caller. Max pooling pads with -inf (padding never wins a window); its backward pass gives
//! each window's gradient to its first maximum, as the reference does: it recomputes the
//! maximum, then walks the window in order with a per-lane "done" mask. Average pooling pads
//! with zeros and divides by the number of real pixels in the window (padding is not counted,
//! as in the reference and TensorFlow's `same`); that count is computed from the window's
//! position, so the sums and the division are the reference's, in its order.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{InstBuilder as _, MemFlagsData, Value, types};

use super::conv::{Width, for_chunks, input_offset, load_chunk, store_chunk};
use super::emit::Emit;

/// One max-pooling layer's shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    /// The padded input's height and width.
    pub hp: usize,
    pub wp: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub sh: usize,
    pub sw: usize,
}

impl PoolShape {
    /// Whether the windows tile the input exactly (kernel = stride, no pixel left over): every
    /// input pixel lies in one window, so the backward pass writes dx whole instead of adding
    /// into a zeroed one.
    pub fn tiles_exactly(&self) -> bool {
        self.kh == self.sh
            && self.kw == self.sw
            && self.hp == self.oh * self.sh
            && self.wp == self.ow * self.sw
    }
}

/// `max(a, b)` that keeps `a` when `b` is NaN, as `f32::max` does for the reference: b if
/// a < b, else a. Written as `a < b` (not `b > a`, the same lanes) because x64 lowers that
/// select to one `maxps` (where `b > a` took a compare and a blend).
pub(super) fn max(e: &mut Emit, a: Value, b: Value, width: Width) -> Value {
    let greater = e.ins().fcmp(FloatCC::LessThan, a, b);
    if width == Width::Scalar {
        e.ins().select(greater, b, a)
    } else {
        let mask = e.ins().bitcast(types::F32X4, MemFlagsData::new(), greater);
        e.ins().bitselect(mask, b, a)
    }
}

/// The element offsets, for output (n, oh, ow): of the output pixel, and of each input pixel
/// of its window, in window order.
fn window(e: &mut Emit, s: &PoolShape, n: Value, oh: Value, ow: Value) -> (Value, Vec<Value>) {
    let out = e.mul_k(n, s.oh as i64);
    let out = e.add(out, oh);
    let out = e.mul_k(out, s.ow as i64);
    let out = e.add(out, ow);
    let out = e.mul_k(out, s.c as i64);
    let mut inputs = Vec::new();
    for kh in 0..s.kh {
        for kw in 0..s.kw {
            let tap = [e.int(kh as i64), e.int(kw as i64)];
            inputs.push(input_offset(e, [s.hp, s.wp, s.c], [s.sh, s.sw], Some(n), [oh, ow], tap));
        }
    }
    (out, inputs)
}

/// Calls `body(n, oh, ow)` for every output pixel of the samples `start..end`.
fn for_each_pixel(e: &mut Emit, s: &PoolShape, mut body: impl FnMut(&mut Emit, Value, Value, Value)) {
    let (start, end) = (e.start, e.end);
    e.for_range(start, end, |e, n| {
        e.for_n(s.oh, |e, oh| {
            e.for_n(s.ow, |e, ow| body(e, n, oh, ow));
        });
    });
}

/// Calls `body(output offset, window offsets, first channel, width)` for every channel chunk
/// of every output pixel of the samples `start..end`.
fn for_each_window(
    e: &mut Emit,
    s: &PoolShape,
    mut body: impl FnMut(&mut Emit, Value, &[Value], Value, Width),
) {
    for_each_pixel(e, s, |e, n, oh, ow| {
        let (out, offsets) = window(e, s, n, oh, ow);
        for_chunks(e, s.c, |e, c0, width| body(e, out, &offsets, c0, width));
    });
}

/// y[n,oh,ow,c] = max over the window of x. Buffers: [x (padded with -inf), y]; items: samples.
pub fn forward(e: &mut Emit, s: &PoolShape) {
    let (x, y) = (e.buf(0), e.buf(1));
    pool_forward(e, s, [x, y], None);
}

/// [`forward`] of relu(x·scale + shift) per channel, each pixel normalized as
/// [`super::norm::affine`] computes it (the same bits): a batchnorm and a relu before the pool,
/// whose output is never stored. Buffers: [x (unpadded), (scale, shift) (2, C), y]; items:
/// samples.
pub fn normalized_forward(e: &mut Emit, s: &PoolShape) {
    let (x, affine, y) = (e.buf(0), e.buf(1), e.buf(2));
    pool_forward(e, s, [x, y], Some(affine));
}

fn pool_forward(e: &mut Emit, s: &PoolShape, [x, y]: [Value; 2], affine: Option<Value>) {
    for_each_window(e, s, |e, out, offsets, c0, width| {
        let coefficients = affine.map(|affine| {
            let at = e.at(affine, c0);
            [load_chunk(e, at, 0, width), load_chunk(e, at, s.c as i64, width)]
        });
        let mut best: Option<Vec<Value>> = None;
        for offset in offsets {
            let at = e.add(*offset, c0);
            let addr = e.at(x, at);
            let mut v = load_chunk(e, addr, 0, width);
            if let Some([scale, shift]) = &coefficients {
                v = (0..v.len())
                    .map(|p| {
                        let z = e.fma(v[p], scale[p], shift[p]);
                        super::eltwise::rectify(e, z, 0.0, width != Width::Scalar)
                    })
                    .collect();
            }
            best = Some(match best {
                None => v,
                Some(b) => b.iter().zip(&v).map(|(b, v)| max(e, *b, *v, width)).collect(),
            });
        }
        let at = e.add(out, c0);
        let addr = e.at(y, at);
        store_chunk(e, &best.expect("a window has a pixel"), addr, 0);
    });
}

/// dx (padded, zeroed) += dy at each window's first maximum. With `through_relu` (x is a
/// relu's output, whose backward pass the caller then skips), only where that maximum is
/// positive: dx is then the gradient of the relu's input. Where the windows tile the input
/// exactly ([`PoolShape::tiles_exactly`]) every pixel of dx is stored (dy or 0) and dx needs
/// no zeroing: one pass over it instead of three. Buffers: [x (padded with -inf), dy, dx];
/// items: samples.
pub fn backward(e: &mut Emit, s: &PoolShape, through_relu: bool) {
    let (x, dy, dx) = (e.buf(0), e.buf(1), e.buf(2));
    for_each_window(e, s, |e, out, offsets, c0, width| {
        let loads: Vec<Vec<Value>> = offsets
            .iter()
            .map(|offset| {
                let at = e.add(*offset, c0);
                let addr = e.at(x, at);
                load_chunk(e, addr, 0, width)
            })
            .collect();
        let at = e.add(out, c0);
        let addr = e.at(dy, at);
        let grad = load_chunk(e, addr, 0, width);
        let shares = window_gradient(e, &loads, &grad, through_relu, width);
        for (offset, share) in offsets.iter().zip(shares) {
            let at = e.add(*offset, c0);
            let addr = e.at(dx, at);
            let new = if s.tiles_exactly() {
                share
            } else {
                let old = load_chunk(e, addr, 0, width);
                old.iter().zip(&share).map(|(a, b)| e.ins().fadd(*a, *b)).collect()
            };
            store_chunk(e, &new, addr, 0);
        }
    });
}

/// The gradient a max pool's window passes to each of its pixels, in window order: `grad`
/// (one chunk of dy) at the first pixel of `loads` (the window's pixels, one chunk each) that
/// equals their maximum, zero at the others; with `through_relu` (the pixels are a relu's
/// output), zero too where that maximum is not positive, which is the gradient of the relu's
/// input. A per-lane "done" mask keeps later equal pixels from taking it again.
pub(super) fn window_gradient(
    e: &mut Emit,
    loads: &[Vec<Value>],
    grad: &[Value],
    through_relu: bool,
    width: Width,
) -> Vec<Vec<Value>> {
    let mut best = loads[0].clone();
    for v in &loads[1..] {
        best = best.iter().zip(v).map(|(b, v)| max(e, *b, *v, width)).collect();
    }
    let zero = e.zero(if width == Width::Scalar { types::F32 } else { types::F32X4 });
    // v where the mask is set, else 0 (for vectors the mask's bits and v's: one `andps`)
    let select = |e: &mut Emit, mask: Value, v: Value| {
        if width == Width::Scalar {
            e.ins().select(mask, v, zero)
        } else {
            let mask = e.ins().bitcast(types::F32X4, MemFlagsData::new(), mask);
            e.ins().band(mask, v)
        }
    };
    let mut grad = grad.to_vec();
    if through_relu {
        // the gradient continues through the relu that made x: none where the maximum is 0
        grad = grad
            .iter()
            .zip(&best)
            .map(|(g, b)| {
                let positive = e.ins().fcmp(FloatCC::GreaterThan, *b, zero);
                select(e, positive, *g)
            })
            .collect();
    }
    // Lanes whose maximum has been found: no gradient for later equal pixels.
    let mut done: Option<Vec<Value>> = None;
    let mut shares = Vec::with_capacity(loads.len());
    for v in loads {
        let mut share = Vec::new();
        let mut now_done = Vec::new();
        for p in 0..v.len() {
            let equal = e.ins().fcmp(FloatCC::Equal, v[p], best[p]);
            let take = match &done {
                None => equal,
                Some(d) => e.ins().band_not(equal, d[p]),
            };
            share.push(select(e, take, grad[p]));
            now_done.push(match &done {
                None => equal,
                Some(d) => e.ins().bor(d[p], equal),
            });
        }
        shares.push(share);
        done = Some(now_done);
    }
    shares
}

/// How many of the rows (or columns) [o·stride, o·stride + kernel) of the padded input lie in
/// the real image, [first, end).
fn covered(e: &mut Emit, o: Value, stride: usize, kernel: usize, first: usize, end: usize) -> Value {
    let lo = e.mul_k(o, stride as i64);
    let hi = e.add_k(lo, kernel as i64);
    let (first, end) = (e.int(first as i64), e.int(end as i64));
    let before = e.icmp(IntCC::SignedLessThan, lo, first);
    let lo = e.ins().select(before, first, lo);
    let after = e.icmp(IntCC::SignedGreaterThan, hi, end);
    let hi = e.ins().select(after, end, hi);
    e.ins().isub(hi, lo)
}

/// The divisor of window (oh, ow): its number of real pixels, as an f32 (a vector of them
/// for a vector chunk). `pads` is [top, bottom, left, right].
fn window_count(e: &mut Emit, s: &PoolShape, pads: [usize; 4], oh: Value, ow: Value) -> Value {
    let rows = covered(e, oh, s.sh, s.kh, pads[0], s.hp - pads[1]);
    let cols = covered(e, ow, s.sw, s.kw, pads[2], s.wp - pads[3]);
    let count = e.ins().imul(rows, cols);
    e.ins().fcvt_from_sint(types::F32, count)
}

fn divisor(e: &mut Emit, count: Value, width: Width) -> Value {
    if width == Width::Scalar { count } else { e.splat(count) }
}

/// y[n,oh,ow,c] = Σ x over the window / its real pixel count. Buffers: [x (padded with zeros),
/// y]; items: samples.
pub fn avg_forward(e: &mut Emit, s: &PoolShape, pads: [usize; 4]) {
    let (x, y) = (e.buf(0), e.buf(1));
    for_each_pixel(e, s, |e, n, oh, ow| {
        let (out, offsets) = window(e, s, n, oh, ow);
        let count = window_count(e, s, pads, oh, ow);
        for_chunks(e, s.c, |e, c0, width| {
            let zero = e.zero(if width == Width::Scalar { types::F32 } else { types::F32X4 });
            let mut sum = vec![zero; if width == Width::Two { 2 } else { 1 }];
            for offset in &offsets {
                let at = e.add(*offset, c0);
                let addr = e.at(x, at);
                let v = load_chunk(e, addr, 0, width);
                sum = sum.iter().zip(&v).map(|(a, b)| e.ins().fadd(*a, *b)).collect();
            }
            let d = divisor(e, count, width);
            let mean: Vec<Value> = sum.iter().map(|v| e.ins().fdiv(*v, d)).collect();
            let at = e.add(out, c0);
            let addr = e.at(y, at);
            store_chunk(e, &mean, addr, 0);
        });
    });
}

/// dx (padded, zeroed) += dy / count at every pixel of each window, windows and pixels in the
/// reference's order. Buffers: [dy, dx]; items: samples.
pub fn avg_backward(e: &mut Emit, s: &PoolShape, pads: [usize; 4]) {
    let (dy, dx) = (e.buf(0), e.buf(1));
    for_each_pixel(e, s, |e, n, oh, ow| {
        let (out, offsets) = window(e, s, n, oh, ow);
        let count = window_count(e, s, pads, oh, ow);
        for_chunks(e, s.c, |e, c0, width| {
            let at = e.add(out, c0);
            let addr = e.at(dy, at);
            let grad = load_chunk(e, addr, 0, width);
            let d = divisor(e, count, width);
            let share: Vec<Value> = grad.iter().map(|g| e.ins().fdiv(*g, d)).collect();
            for offset in &offsets {
                let at = e.add(*offset, c0);
                let addr = e.at(dx, at);
                let old = load_chunk(e, addr, 0, width);
                let new: Vec<Value> = old.iter().zip(&share).map(|(a, b)| e.ins().fadd(*a, *b)).collect();
                store_chunk(e, &new, addr, 0);
            }
        });
    });
}
