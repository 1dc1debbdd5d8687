//! Element-wise kernels: relu and leaky relu, forward and backward, and the product that
//! applies a dropout mask, over whole samples in f32x4 with a scalar tail. `alpha` (0 for
//! relu) and the sample size are baked in.
//!
//! relu(x) = x > 0 ? x : α·x, which for α = 0 is 0 for NaN too, as `f32::max(x, 0)` gives.

use cranelift_codegen::ir::condcodes::FloatCC;
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

/// `x > 0 ? a : b`, lane by lane.
fn where_positive(e: &mut Emit, x: Value, a: Value, b: Value, vector: bool) -> Value {
    let ty = if vector { types::F32X4 } else { types::F32 };
    let zero = e.zero(ty);
    let positive = e.ins().fcmp(FloatCC::GreaterThan, x, zero);
    if vector {
        let mask = e.ins().bitcast(types::F32X4, MemFlagsData::new(), positive);
        e.ins().bitselect(mask, a, b)
    } else {
        e.ins().select(positive, a, b)
    }
}

/// α·v, the branch for x ≤ 0; a constant zero for relu (which also maps NaN to 0).
fn times_alpha(e: &mut Emit, v: Value, alpha: f32, vector: bool) -> Value {
    if alpha == 0.0 {
        return e.zero(if vector { types::F32X4 } else { types::F32 });
    }
    let k = e.ins().f32const(alpha);
    let k = if vector { e.splat(k) } else { k };
    e.ins().fmul(v, k)
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
