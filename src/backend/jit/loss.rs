//! The output activations: softmax alone (inference), and fused with their cross-entropy for
//! training, softmax + categorical cross-entropy and sigmoid + binary cross-entropy. Rows are
//! walked in f32x4 with a scalar tail, the row width baked in.
//!
//! The loss kernels write each sample's loss and whether it was classified correctly (1 or 0)
//! to per-sample buffers; the caller sums them in sample order, so the totals do not depend on
//! how samples were split over threads. Labels come as f32 (exact for class numbers).

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{InstBuilder as _, Value, types};
use cranelift_frontend::Variable;

use super::activation::sigmoid_from_exp;
use super::eltwise::{for_elements, load};
use super::emit::Emit;
use super::math::{choose, compare, constant, exp, float_type, for_elements_between, lanes, log};

/// How an accumulator's lanes are combined, and how the tail's scalar joins them.
#[derive(Debug, Clone, Copy)]
enum Reduce {
    Sum,
    Max,
    Min,
}

impl Reduce {
    fn apply(self, e: &mut Emit, a: Value, b: Value, vector: bool) -> Value {
        match self {
            Reduce::Sum => e.ins().fadd(a, b),
            // `b > a ? b : a`: keeps a when b is NaN, as `f32::max` in the reference's folds.
            Reduce::Max => {
                let greater = compare(e, FloatCC::GreaterThan, b, a);
                choose(e, greater, b, a, vector)
            }
            Reduce::Min => {
                let less = compare(e, FloatCC::LessThan, b, a);
                choose(e, less, b, a, vector)
            }
        }
    }
}

/// Folds a row of `len` elements into scalars: `step(accumulators, offset, vector?)` returns
/// the new accumulators; a vector set runs over the f32x4 steps and a scalar set over the
/// tail, combined at the end lane by lane as `(l0 ∘ l1) ∘ (l2 ∘ l3) ∘ tail`.
fn fold_row(
    e: &mut Emit,
    len: usize,
    accumulators: &[(f32, Reduce)],
    mut step: impl FnMut(&mut Emit, &[Value], Value, bool) -> Vec<Value>,
) -> Vec<Value> {
    let vars: Vec<[Variable; 2]> = accumulators
        .iter()
        .map(|&(init, _)| {
            [false, true].map(|vector| {
                let v = constant(e, init, vector);
                e.var(float_type(vector), v)
            })
        })
        .collect();
    for_elements(e, len, |e, offset, vector| {
        let current: Vec<Value> = vars.iter().map(|v| e.use_var(v[vector as usize])).collect();
        let next = step(e, &current, offset, vector);
        for (v, value) in vars.iter().zip(next) {
            e.def_var(v[vector as usize], value);
        }
    });
    vars.iter()
        .zip(accumulators)
        .map(|(v, &(_, reduce))| {
            let vector = e.use_var(v[1]);
            let [l0, l1, l2, l3] = lanes(e, vector);
            let a = reduce.apply(e, l0, l1, false);
            let b = reduce.apply(e, l2, l3, false);
            let lanes = reduce.apply(e, a, b, false);
            let tail = e.use_var(v[0]);
            reduce.apply(e, lanes, tail, false)
        })
        .collect()
}

/// The maximum of the row at `row` (NaN ignored, as the reference's fold).
fn row_max(e: &mut Emit, x: Value, row: Value, len: usize) -> Value {
    let max = fold_row(e, len, &[(f32::NEG_INFINITY, Reduce::Max)], |e, acc, offset, vector| {
        let at = e.add(row, offset);
        let addr = e.at(x, at);
        let v = load(e, addr, vector);
        vec![Reduce::Max.apply(e, acc[0], v, vector)]
    });
    max[0]
}

/// The indices of the elements at `offset` as floats: [i, i+1, i+2, i+3] or i.
fn index(e: &mut Emit, offset: Value, vector: bool) -> Value {
    let i = e.ins().fcvt_from_sint(types::F32, offset);
    if !vector {
        return i;
    }
    let mut iota = constant(e, 0.0, true);
    for lane in 1..4u8 {
        let k = e.ins().f32const(f32::from(lane));
        iota = e.ins().insertlane(iota, k, lane);
    }
    let i = e.splat(i);
    e.ins().fadd(i, iota)
}

/// Softmax over each row of `c` elements, `rows` rows a sample: y = exp(x − max) / Σ.
/// Buffers: [x, y]; items: samples.
pub fn softmax_forward(e: &mut Emit, rows: usize, c: usize) {
    let (x, y) = (e.buf(0), e.buf(1));
    let (start, end) = (e.start, e.end);
    e.for_range(start, end, |e, n| {
        let first = e.mul_k(n, rows as i64);
        e.for_n(rows, |e, r| {
            let row = e.add(first, r);
            let row = e.mul_k(row, c as i64);
            let max = row_max(e, x, row, c);
            let sum = fold_row(e, c, &[(0.0, Reduce::Sum)], |e, acc, offset, vector| {
                let at = e.add(row, offset);
                let (xa, ya) = (e.at(x, at), e.at(y, at));
                let v = load(e, xa, vector);
                let m = if vector { e.splat(max) } else { max };
                let shifted = e.ins().fsub(v, m);
                let ex = exp(e, shifted, vector);
                e.store(ex, ya, 0);
                vec![e.ins().fadd(acc[0], ex)]
            })[0];
            for_elements(e, c, |e, offset, vector| {
                let at = e.add(row, offset);
                let ya = e.at(y, at);
                let v = load(e, ya, vector);
                let s = if vector { e.splat(sum) } else { sum };
                let p = e.ins().fdiv(v, s);
                e.store(p, ya, 0);
            });
        });
    });
}

/// Softmax + categorical cross-entropy on logits z (N,K) against integer labels:
/// loss = ln Σ exp(z − max) + max − z[label]; dz = (softmax(z) − onehot) / N; correct when
/// the first maximum is the label. Buffers: [z, labels, dz, loss, correct]; items: samples.
pub fn softmax_cross_entropy(e: &mut Emit, k: usize) {
    let (z, labels, dz, loss, correct) = (e.buf(0), e.buf(1), e.buf(2), e.buf(3), e.buf(4));
    let batch = e.batch;
    let batch = e.ins().fcvt_from_sint(types::F32, batch);
    let (start, end) = (e.start, e.end);
    e.for_range(start, end, |e, n| {
        let row = e.mul_k(n, k as i64);
        let label_at = e.at(labels, n);
        let label = e.load(label_at, 0);
        let max = row_max(e, z, row, k);
        // Pass 2: exp(z − max) into dz, their sum, z[label], and the first index of the max.
        let reductions = [(0.0, Reduce::Sum), (0.0, Reduce::Sum), (f32::INFINITY, Reduce::Min)];
        let folded = fold_row(e, k, &reductions, |e, acc, offset, vector| {
            let at = e.add(row, offset);
            let (za, da) = (e.at(z, at), e.at(dz, at));
            let v = load(e, za, vector);
            let (m, l) = if vector { (e.splat(max), e.splat(label)) } else { (max, label) };
            let shifted = e.ins().fsub(v, m);
            let ex = exp(e, shifted, vector);
            e.store(ex, da, 0);
            let i = index(e, offset, vector);
            let zero = constant(e, 0.0, vector);
            let is_label = compare(e, FloatCC::Equal, i, l);
            let picked = choose(e, is_label, v, zero, vector);
            let infinity = constant(e, f32::INFINITY, vector);
            let is_max = compare(e, FloatCC::Equal, v, m);
            let candidate = choose(e, is_max, i, infinity, vector);
            vec![
                e.ins().fadd(acc[0], ex),
                e.ins().fadd(acc[1], picked),
                Reduce::Min.apply(e, acc[2], candidate, vector),
            ]
        });
        let (sum, z_label, argmax) = (folded[0], folded[1], folded[2]);
        // Pass 3: dz = (p − onehot) / N with p = exp / Σ.
        for_elements(e, k, |e, offset, vector| {
            let at = e.add(row, offset);
            let da = e.at(dz, at);
            let ex = load(e, da, vector);
            let (s, l, b) =
                if vector { (e.splat(sum), e.splat(label), e.splat(batch)) } else { (sum, label, batch) };
            let p = e.ins().fdiv(ex, s);
            let i = index(e, offset, vector);
            let is_label = compare(e, FloatCC::Equal, i, l);
            let (zero, one) = (constant(e, 0.0, vector), constant(e, 1.0, vector));
            let onehot = choose(e, is_label, one, zero, vector);
            let d = e.ins().fsub(p, onehot);
            let d = e.ins().fdiv(d, b);
            e.store(d, da, 0);
        });
        let log_sum = log(e, sum, false);
        let log_sum = e.ins().fadd(log_sum, max);
        let l = e.ins().fsub(log_sum, z_label);
        let at = e.at(loss, n);
        e.store(l, at, 0);
        let hit = compare(e, FloatCC::Equal, argmax, label);
        let (zero, one) = (constant(e, 0.0, false), constant(e, 1.0, false));
        let flag = choose(e, hit, one, zero, false);
        let at = e.at(correct, n);
        e.store(flag, at, 0);
    });
}

/// Sigmoid + binary cross-entropy on logits z (N,1), stable for any z:
/// loss = max(z,0) − z·y + ln(1 + e^−|z|); dz = (σ(z) − y) / N; correct when σ(z) ≥ ½ is
/// label = 1. Samples four at a time. Buffers: [z, labels, dz, loss, correct]; items: samples.
pub fn sigmoid_binary_cross_entropy(e: &mut Emit) {
    let (z, labels, dz, loss, correct) = (e.buf(0), e.buf(1), e.buf(2), e.buf(3), e.buf(4));
    let batch = e.batch;
    let batch = e.ins().fcvt_from_sint(types::F32, batch);
    let (start, end) = (e.start, e.end);
    for_elements_between(e, start, end, |e, i, vector| {
        let (za, ya) = (e.at(z, i), e.at(labels, i));
        let v = load(e, za, vector);
        let y = load(e, ya, vector);
        let magnitude = e.ins().fabs(v);
        let minus = e.ins().fneg(magnitude);
        let ex = exp(e, minus, vector);
        let p = sigmoid_from_exp(e, v, ex, vector);
        let (zero, one) = (constant(e, 0.0, vector), constant(e, 1.0, vector));
        let positive = compare(e, FloatCC::GreaterThan, v, zero);
        let relu = choose(e, positive, v, zero, vector);
        let zy = e.ins().fmul(v, y);
        let l = e.ins().fsub(relu, zy);
        let softplus = e.ins().fadd(one, ex);
        let softplus = log(e, softplus, vector);
        let l = e.ins().fadd(l, softplus);
        let at = e.at(loss, i);
        e.store(l, at, 0);
        let b = if vector { e.splat(batch) } else { batch };
        let d = e.ins().fsub(p, y);
        let d = e.ins().fdiv(d, b);
        let at = e.at(dz, i);
        e.store(d, at, 0);
        let half = constant(e, 0.5, vector);
        let says_one = compare(e, FloatCC::GreaterThanOrEqual, p, half);
        let is_one = compare(e, FloatCC::Equal, y, one);
        let agree = e.ins().icmp(IntCC::Equal, says_one, is_one);
        let flag = choose(e, agree, one, zero, vector);
        let at = e.at(correct, i);
        e.store(flag, at, 0);
    });
}
