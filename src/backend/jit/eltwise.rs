//! Element-wise kernels: relu and leaky relu, forward and backward, and the product that
//! applies a dropout mask, over whole samples in f32x4 with a scalar tail. `alpha` (0 for
//! relu) and the sample size are baked in.
//!
//! relu(x) = x > 0 ? x : α·x, which for α = 0 is 0 for NaN too, as `f32::max(x, 0)` gives.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{InstBuilder as _, MemFlagsData, Value, types};

use super::emit::Emit;

/// Calls `body(offset, vector?)` over `len` elements: f32x4 steps, then single elements.
pub(super) fn for_elements(e: &mut Emit, len: usize, mut body: impl FnMut(&mut Emit, Value, bool)) {
    e.for_n(len / 4, |e, i| {
        let offset = e.mul_k(i, 4);
        body(e, offset, true);
    });
    for k in (len / 4) * 4..len {
        let offset = e.int(k as i64);
        body(e, offset, false);
    }
}

pub(super) fn load(e: &mut Emit, addr: Value, vector: bool) -> Value {
    if vector { e.load4(addr, 0) } else { e.load(addr, 0) }
}

/// out = f(inputs) element by element, over whole samples of `len` elements: buffers
/// [input 0, …, input `inputs − 1`, out]; items: samples. `f` gets the loaded values (f32x4
/// or single f32, as its `bool` says) and returns the result.
pub(super) fn map_samples(
    e: &mut Emit,
    len: usize,
    inputs: usize,
    mut f: impl FnMut(&mut Emit, &[Value], bool) -> Value,
) {
    let bufs: Vec<Value> = (0..=inputs).map(|i| e.buf(i)).collect();
    let (start, end) = (e.start, e.end);
    e.for_range(start, end, |e, n| {
        let base = e.mul_k(n, len as i64);
        for_elements(e, len, |e, offset, vector| {
            let at = e.add(base, offset);
            let values: Vec<Value> = bufs[..inputs]
                .iter()
                .map(|b| {
                    let addr = e.at(*b, at);
                    load(e, addr, vector)
                })
                .collect();
            let out = f(e, &values, vector);
            let addr = e.at(bufs[inputs], at);
            e.store(out, addr, 0);
        });
    });
}

/// `x > 0 ? a : b`, lane by lane, b = 0 where `None`. Written as `0 < x` (the same lanes), which
/// x64 lowers to one `maxps` where the select is relu's (a = x, b = that same 0), instead of
/// a compare, a blend and two loads of zero: every relu epilogue of a convolution.
fn where_positive(e: &mut Emit, x: Value, a: Value, b: Option<Value>, vector: bool) -> Value {
    let ty = if vector { types::F32X4 } else { types::F32 };
    let zero = e.zero(ty);
    let b = b.unwrap_or(zero);
    let positive = e.ins().fcmp(FloatCC::LessThan, zero, x);
    if vector {
        let mask = e.ins().bitcast(types::F32X4, MemFlagsData::new(), positive);
        e.ins().bitselect(mask, a, b)
    } else {
        e.ins().select(positive, a, b)
    }
}

/// α·v, the branch for x ≤ 0; none (a zero) for relu, which also maps NaN to 0.
fn times_alpha(e: &mut Emit, v: Value, alpha: f32, vector: bool) -> Option<Value> {
    if alpha == 0.0 {
        return None;
    }
    let k = e.ins().f32const(alpha);
    let k = if vector { e.splat(k) } else { k };
    Some(e.ins().fmul(v, k))
}

/// x > 0 ? x : α·x, for a value (vector or scalar) already in a register.
pub(super) fn rectify(e: &mut Emit, x: Value, alpha: f32, vector: bool) -> Value {
    let negative = times_alpha(e, x, alpha, vector);
    where_positive(e, x, x, negative, vector)
}

/// x > 0 ? d : α·d: the rectifier's gradient d passed back through it, x its input or output
/// (the same sign for α ≥ 0).
pub(super) fn rectify_gradient(e: &mut Emit, x: Value, d: Value, alpha: f32, vector: bool) -> Value {
    let negative = times_alpha(e, d, alpha, vector);
    where_positive(e, x, d, negative, vector)
}

/// y = x > 0 ? x : α·x. Buffers: [x, y]; items: samples of `len` elements.
pub fn forward(e: &mut Emit, len: usize, alpha: f32) {
    map_samples(e, len, 1, |e, v, vector| rectify(e, v[0], alpha, vector));
}

/// dx = x > 0 ? dy : α·dy. Buffers: [x, dy, dx]; items: samples of `len` elements.
pub fn backward(e: &mut Emit, len: usize, alpha: f32) {
    map_samples(e, len, 2, |e, v, vector| rectify_gradient(e, v[0], v[1], alpha, vector));
}

/// y = a·b: a dropout mask applied, forward (x·mask) and backward (dy·mask) alike.
/// Buffers: [a, b, y]; items: samples of `len` elements.
pub fn product(e: &mut Emit, len: usize) {
    map_samples(e, len, 2, |e, v, _| e.ins().fmul(v[0], v[1]));
}

/// Dropout's training forward pass, drawing its mask in place: element g of the batch (sample
/// by sample) is kept when the top 24 bits of SplitMix64's `mix(base + (g + 1)·GAMMA)` are at
/// least `threshold` (see `rng::unit_threshold`), its mask value then `scale`, else 0; y = x·mask.
/// This is the mask `reference::dropout_mask` draws, bit for bit, in one pass instead of a
/// pass of hashing in Rust (which the compiler vectorizes badly: 64-bit multiplies have no
/// SSE/AVX2 instruction) and one of products. Buffers: [x, key ([base, threshold] as u64,
/// then `scale` as f32), mask, y]; items: samples of `len` elements.
pub fn dropout_forward(e: &mut Emit, len: usize) {
    use crate::rng::{GAMMA, MIX, MIX_LAST_SHIFT};
    let (x, key, mask, y) = (e.buf(0), e.buf(1), e.buf(2), e.buf(3));
    let flags = MemFlagsData::new().with_notrap().with_readonly();
    let base = e.ins().load(types::I64, flags, key, 0);
    let threshold = e.ins().load(types::I64, flags, key, 8);
    let scale = e.ins().load(types::I32, flags, key, 16);
    let (start, end) = (e.start, e.end);
    e.for_range(start, end, |e, n| {
        let first = e.mul_k(n, len as i64);
        // base + (g + 1)·GAMMA, kept in a variable that steps by GAMMA
        let count = e.add_k(first, 1);
        let step = e.ins().imul_imm_s(count, GAMMA as i64);
        let start = e.ins().iadd(base, step);
        let counter = e.var(types::I64, start);
        e.for_n(len, |e, j| {
            let g = e.add(first, j);
            let mut z = e.use_var(counter);
            let next = e.ins().iadd_imm_s(z, GAMMA as i64);
            e.def_var(counter, next);
            for (shift, multiplier) in MIX {
                let shifted = e.ins().ushr_imm_u(z, i64::from(shift));
                let mixed = e.ins().bxor(z, shifted);
                z = e.ins().imul_imm_s(mixed, multiplier as i64);
            }
            let shifted = e.ins().ushr_imm_u(z, i64::from(MIX_LAST_SHIFT));
            let z = e.ins().bxor(z, shifted);
            let top = e.ins().ushr_imm_u(z, 40);
            // keep ? scale : 0 without a branch (a select becomes one, mispredicted half the
            // time at rate 0.5): the scale's bits and-ed with 0 or all ones
            let keep = e.icmp(IntCC::UnsignedGreaterThanOrEqual, top, threshold);
            let keep = e.ins().uextend(types::I32, keep);
            let ones = e.ins().ineg(keep);
            let bits = e.ins().band(ones, scale);
            let m = e.ins().bitcast(types::F32, MemFlagsData::new(), bits);
            let xaddr = e.at(x, g);
            let xv = e.load(xaddr, 0);
            let yv = e.ins().fmul(xv, m);
            let maddr = e.at(mask, g);
            e.store(m, maddr, 0);
            let yaddr = e.at(y, g);
            e.store(yv, yaddr, 0);
        });
    });
}
