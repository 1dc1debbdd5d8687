//! Batch-normalization kernels, each a pass over a sample's (pixels, channels) values with the
//! per-channel arithmetic in f32x4 chunks (then one vector, then scalars, as the conv kernels):
//!
//! ```text
//!   stats:   sums[n] = (Σ_p x, Σ_p x²)                       batch statistics
//!   affine:  y = act(x·scale + shift)                         normalize (+ fused rectifier)
//!   reduce:  sums[n] = (Σ_p g, Σ_p g·x),  g = act'(dz)        the backward's two reductions
//!   apply:   dx = a·g + b·x + d                               the input gradient
//! ```
//!
//! Per-channel coefficients (scale, shift, a, b, d) come from Rust, computed from statistics
//! reduced over the batch in f64 and in sample order, so a result never depends on how the
//! samples were spread over threads. `act'` rebuilds the rectifier's mask from its output z:
//! for α ≥ 0, z > 0 exactly where the rectifier's input was. Items: samples.

use cranelift_codegen::ir::{InstBuilder as _, Value};
use cranelift_frontend::Variable;

use super::conv::{Width, for_chunks, load_chunk, store_chunk};
use super::eltwise::{rectify, rectify_gradient};
use super::emit::Emit;

/// One normalized tensor's shape per sample: `pixels` rows of `channels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormShape {
    pub pixels: usize,
    pub channels: usize,
}

impl NormShape {
    fn sample(&self) -> i64 {
        (self.pixels * self.channels) as i64
    }
}

/// Pointers to sample `n` of each buffer in `bufs` (all laid out like the sample) and of the
/// (N, 2, C) sums buffer.
fn sample_bases(e: &mut Emit, s: &NormShape, n: Value, bufs: &[Value]) -> Vec<Value> {
    let off = e.mul_k(n, s.sample());
    bufs.iter().map(|b| e.at(*b, off)).collect()
}

fn sums_base(e: &mut Emit, s: &NormShape, sums: Value, n: Value) -> Value {
    let off = e.mul_k(n, 2 * s.channels as i64);
    e.at(sums, off)
}

fn vars(e: &mut Emit, width: Width, parts: usize) -> Vec<Variable> {
    let ty = if width == Width::Scalar { super::emit::F32 } else { super::emit::F32X4 };
    let zero = e.zero(ty);
    (0..parts).map(|_| e.var(ty, zero)).collect()
}

fn parts(width: Width) -> usize {
    if width == Width::Two { 2 } else { 1 }
}

/// For each channel chunk, sums over the sample's pixels of `terms(values at the pixel)`, two
/// sums a chunk, in registers; written to the sample's (2, C) sums (not added: one writer).
fn reduce(
    e: &mut Emit,
    s: &NormShape,
    inputs: &[Value],
    sums: Value,
    terms: impl Fn(&mut Emit, &[Value], bool) -> [Value; 2] + Copy,
) {
    let (start, end) = (e.start, e.end);
    e.for_range(start, end, |e, n| {
        let bases = sample_bases(e, s, n, inputs);
        let out = sums_base(e, s, sums, n);
        for_chunks(e, s.channels, |e, c0, width| {
            let parts = parts(width);
            let first = vars(e, width, parts);
            let second = vars(e, width, parts);
            e.for_n(s.pixels, |e, p| {
                let at = e.mul_k(p, s.channels as i64);
                let at = e.add(at, c0);
                let loaded: Vec<Vec<Value>> = bases
                    .iter()
                    .map(|b| {
                        let addr = e.at(*b, at);
                        load_chunk(e, addr, 0, width)
                    })
                    .collect();
                for part in 0..parts {
                    let values: Vec<Value> = loaded.iter().map(|l| l[part]).collect();
                    let [t1, t2] = terms(e, &values, width != Width::Scalar);
                    let a = e.use_var(first[part]);
                    let a = e.ins().fadd(a, t1);
                    e.def_var(first[part], a);
                    let b = e.use_var(second[part]);
                    let b = e.ins().fadd(b, t2);
                    e.def_var(second[part], b);
                }
            });
            let base = e.at(out, c0);
            let a: Vec<Value> = first.iter().map(|v| e.use_var(*v)).collect();
            let b: Vec<Value> = second.iter().map(|v| e.use_var(*v)).collect();
            store_chunk(e, &a, base, 0);
            store_chunk(e, &b, base, s.channels as i64);
        });
    });
}

/// sums[n] = (Σ_p x, Σ_p x²) per channel. Buffers: [x, sums (N,2,C)].
pub fn stats(e: &mut Emit, s: &NormShape) {
    let (x, sums) = (e.buf(0), e.buf(1));
    reduce(e, s, &[x], sums, |e, v, _| [v[0], e.ins().fmul(v[0], v[0])]);
}

/// The gradient that reaches the normalization: dz, through the rectifier when there is one.
fn through_rectifier(e: &mut Emit, values: &[Value], rectifier: Option<f32>, vector: bool) -> Value {
    match rectifier {
        Some(alpha) => rectify_gradient(e, values[1], values[0], alpha, vector),
        None => values[0],
    }
}

/// sums[n] = (Σ_p g, Σ_p g·x) per channel, g = dz passed back through the rectifier (when
/// `rectifier`, from its output z). Buffers: [dz, z or unused, x, sums (N,2,C)].
pub fn grad_reduce(e: &mut Emit, s: &NormShape, rectifier: Option<f32>) {
    let (dz, z, x, sums) = (e.buf(0), e.buf(1), e.buf(2), e.buf(3));
    let inputs: Vec<Value> = if rectifier.is_some() { vec![dz, x, z] } else { vec![dz, x] };
    reduce(e, s, &inputs, sums, move |e, v, vector| {
        let g = through_rectifier(e, &[v[0], *v.get(2).unwrap_or(&v[0])], rectifier, vector);
        [g, e.ins().fmul(g, v[1])]
    });
}

/// Calls `body(element offset in the sample, chunk offset in per-channel vectors, width)` for
/// every chunk of every pixel of samples start..end; the offsets include the sample's.
fn for_each_chunk(e: &mut Emit, s: &NormShape, mut body: impl FnMut(&mut Emit, Value, Value, Width)) {
    let (start, end) = (e.start, e.end);
    e.for_range(start, end, |e, n| {
        let sample = e.mul_k(n, s.sample());
        e.for_n(s.pixels, |e, p| {
            let row = e.mul_k(p, s.channels as i64);
            let row = e.add(row, sample);
            for_chunks(e, s.channels, |e, c0, width| {
                let at = e.add(row, c0);
                body(e, at, c0, width);
            });
        });
    });
}

/// y = act(x·scale + shift), per channel. Buffers: [x, scale (C), shift (C), y].
pub fn affine(e: &mut Emit, s: &NormShape, rectifier: Option<f32>) {
    let (x, scale, shift, y) = (e.buf(0), e.buf(1), e.buf(2), e.buf(3));
    for_each_chunk(e, s, |e, at, c0, width| {
        let (xa, ya, ka, sa) = (e.at(x, at), e.at(y, at), e.at(scale, c0), e.at(shift, c0));
        let xs = load_chunk(e, xa, 0, width);
        let ks = load_chunk(e, ka, 0, width);
        let ss = load_chunk(e, sa, 0, width);
        let out: Vec<Value> = (0..xs.len())
            .map(|p| {
                let v = e.fma(xs[p], ks[p], ss[p]);
                match rectifier {
                    Some(alpha) => rectify(e, v, alpha, width != Width::Scalar),
                    None => v,
                }
            })
            .collect();
        store_chunk(e, &out, ya, 0);
    });
}

/// dx = a·g + b·x + d per channel, g as in [`grad_reduce`].
/// Buffers: [dz, z or unused, x, coefficients (3, C): a, b, d, dx].
pub fn grad_apply(e: &mut Emit, s: &NormShape, rectifier: Option<f32>) {
    let (dz, z, x, coef, dx) = (e.buf(0), e.buf(1), e.buf(2), e.buf(3), e.buf(4));
    let c = s.channels as i64;
    for_each_chunk(e, s, |e, at, c0, width| {
        let vector = width != Width::Scalar;
        let (da, xa, ka, out) = (e.at(dz, at), e.at(x, at), e.at(coef, c0), e.at(dx, at));
        let ds = load_chunk(e, da, 0, width);
        let xs = load_chunk(e, xa, 0, width);
        let zs = rectifier.map(|_| {
            let za = e.at(z, at);
            load_chunk(e, za, 0, width)
        });
        let a = load_chunk(e, ka, 0, width);
        let b = load_chunk(e, ka, c, width);
        let d = load_chunk(e, ka, 2 * c, width);
        let values: Vec<Value> = (0..ds.len())
            .map(|p| {
                let inputs = match &zs {
                    Some(zs) => vec![ds[p], zs[p]],
                    None => vec![ds[p]],
                };
                let g = through_rectifier(e, &inputs, rectifier, vector);
                let t = e.fma(b[p], xs[p], d[p]);
                e.fma(a[p], g, t)
            })
            .collect();
        store_chunk(e, &values, out, 0);
    });
}
