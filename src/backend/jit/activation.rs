//! Sigmoid and tanh kernels, forward and backward, over whole samples in f32x4 with a scalar
//! tail (the sample size baked in), built on the exp of [`super::math`].
//!
//! Measured against f64 on every 2053rd f32 of [-100, 100] (tests/jit.rs): max relative error
//! 1.66e-7 for sigmoid and 1.40e-7 for tanh, as good as the reference's own f32 functions
//! (1.66e-7 and 1.49e-7); tests hold them to 2.5e-7, and to 4e-7 of the reference. The
//! backward kernels compute exactly the reference's products, in its order, from the forward
//! value.

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{InstBuilder as _, Value};

use super::eltwise::map_samples;
use super::emit::Emit;
use super::math::{choose, compare, constant, exp};

/// The S-shaped activations compiled here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sigmoidal {
    Sigmoid,
    Tanh,
}

/// σ(x), stable on both sides as `ops::sigmoid`: with e = exp(−|x|), 1/(1+e) for x ≥ 0 and
/// e/(1+e) below, so exp never overflows.
pub(super) fn sigmoid(e: &mut Emit, x: Value, vector: bool) -> Value {
    let magnitude = e.ins().fabs(x);
    let minus = e.ins().fneg(magnitude);
    let ex = exp(e, minus, vector);
    sigmoid_from_exp(e, x, ex, vector)
}

/// σ(x) given ex = exp(−|x|).
pub(super) fn sigmoid_from_exp(e: &mut Emit, x: Value, ex: Value, vector: bool) -> Value {
    let (zero, one) = (constant(e, 0.0, vector), constant(e, 1.0, vector));
    let denominator = e.ins().fadd(one, ex);
    let nonnegative = compare(e, FloatCC::GreaterThanOrEqual, x, zero);
    let numerator = choose(e, nonnegative, one, ex, vector);
    e.ins().fdiv(numerator, denominator)
}

/// Below this |x|, tanh comes from its odd polynomial (Cephes' `tanhf`); above, from exp.
const TANH_POLYNOMIAL_BELOW: f32 = 0.625;

/// tanh x: x + x·s·P(s) with s = x² for small |x| (where 1 − e^−2|x| would cancel); else
/// sign(x)·(1 − e)/(1 + e) with e = exp(−2|x|) ≤ 0.29, which never overflows.
fn tanh(e: &mut Emit, x: Value, vector: bool) -> Value {
    let s = e.ins().fmul(x, x);
    let mut p = constant(e, -5.704_988_7e-3, vector);
    for c in [2.063_909e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1] {
        let c = constant(e, c, vector);
        p = e.fma(p, s, c);
    }
    let ps = e.ins().fmul(p, s);
    let small = e.fma(ps, x, x);

    let magnitude = e.ins().fabs(x);
    let minus_two = constant(e, -2.0, vector);
    let argument = e.ins().fmul(magnitude, minus_two);
    let ex = exp(e, argument, vector);
    let one = constant(e, 1.0, vector);
    let numerator = e.ins().fsub(one, ex);
    let denominator = e.ins().fadd(one, ex);
    let t = e.ins().fdiv(numerator, denominator);
    let minus_t = e.ins().fneg(t);
    let zero = constant(e, 0.0, vector);
    let negative = compare(e, FloatCC::LessThan, x, zero);
    let large = choose(e, negative, minus_t, t, vector);

    let bound = constant(e, TANH_POLYNOMIAL_BELOW, vector);
    let is_small = compare(e, FloatCC::LessThan, magnitude, bound);
    choose(e, is_small, small, large, vector)
}

/// y = f(x). Buffers: [x, y]; items: samples of `len` elements.
pub fn forward(e: &mut Emit, len: usize, act: Sigmoidal) {
    map_samples(e, len, 1, |e, v, vector| match act {
        Sigmoidal::Sigmoid => sigmoid(e, v[0], vector),
        Sigmoidal::Tanh => tanh(e, v[0], vector),
    });
}

/// From the forward value y: sigmoid dx = dy·y·(1 − y), tanh dx = dy·(1 − y²), each in the
/// reference's order of operations. Buffers: [y, dy, dx]; items: samples of `len` elements.
pub fn backward(e: &mut Emit, len: usize, act: Sigmoidal) {
    map_samples(e, len, 2, |e, v, vector| {
        let (y, d) = (v[0], v[1]);
        let one = constant(e, 1.0, vector);
        match act {
            Sigmoidal::Sigmoid => {
                let dy = e.ins().fmul(d, y);
                let complement = e.ins().fsub(one, y);
                e.ins().fmul(dy, complement)
            }
            Sigmoidal::Tanh => {
                let square = e.ins().fmul(y, y);
                let complement = e.ins().fsub(one, square);
                e.ins().fmul(d, complement)
            }
        }
    });
}
