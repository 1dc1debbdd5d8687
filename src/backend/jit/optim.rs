//! Optimizer steps on one parameter tensor, as `train::optimizer::update` computes them (the
//! same operations in the same order, so the results are bit for bit the same), in f32x4 with
//! a scalar tail. The work items are the tensor's elements, so one kernel serves every
//! parameter. The scalars that change from step to step or come from the train block (lr,
//! Adam's bias-corrected step size…) are read from a small buffer that the caller fills.

use cranelift_codegen::ir::{InstBuilder as _, Value};

use super::eltwise::load;
use super::emit::Emit;
use super::math::for_elements_between;
use crate::ir::train::Optimizer;
use crate::train::optimizer::adam_step_size;

/// Which update rule a kernel applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// w −= lr·g. Buffers: [scalars [lr], w, g].
    Sgd,
    /// v = momentum·v − lr·g; w += v. Buffers: [scalars [lr, momentum], w, g, v].
    Momentum,
    /// m += (g − m)(1 − β1); v += (g² − v)(1 − β2); w −= α·m / (√v + ε).
    /// Buffers: [scalars [α, 1 − β1, 1 − β2, ε], w, g, m, v].
    Adam,
}

impl Rule {
    /// The rule that `optimizer` applies.
    pub fn of(optimizer: &Optimizer) -> Rule {
        match *optimizer {
            Optimizer::Sgd { momentum: 0.0, .. } => Rule::Sgd,
            Optimizer::Sgd { .. } => Rule::Momentum,
            Optimizer::Adam { .. } => Rule::Adam,
        }
    }

    /// The contents of the scalars buffer for `optimizer` at 1-based step `iteration` (SGD
    /// uses the first two).
    pub fn scalars(optimizer: &Optimizer, iteration: u64) -> [f32; 4] {
        match *optimizer {
            Optimizer::Sgd { lr, momentum } => [lr, momentum, 0.0, 0.0],
            Optimizer::Adam { lr, beta1, beta2, epsilon } => {
                [adam_step_size(lr, beta1, beta2, iteration), 1.0 - beta1, 1.0 - beta2, epsilon]
            }
        }
    }
}

/// Scalar `i` of the scalars buffer, broadcast for a vector step.
fn scalar(e: &mut Emit, scalars: Value, i: i64, vector: bool) -> Value {
    let s = e.load(scalars, i);
    if vector { e.splat(s) } else { s }
}

/// One optimizer step on elements start..end. Buffers: see [`Rule`].
pub fn step(e: &mut Emit, rule: Rule) {
    let scalars = e.buf(0);
    let (w, g) = (e.buf(1), e.buf(2));
    let slots: Vec<Value> = match rule {
        Rule::Sgd => vec![],
        Rule::Momentum => vec![e.buf(3)],
        Rule::Adam => vec![e.buf(3), e.buf(4)],
    };
    let (start, end) = (e.start, e.end);
    for_elements_between(e, start, end, |e, i, vector| {
        let (wa, ga) = (e.at(w, i), e.at(g, i));
        let wv = load(e, wa, vector);
        let gv = load(e, ga, vector);
        match rule {
            Rule::Sgd => {
                let lr = scalar(e, scalars, 0, vector);
                let step = e.ins().fmul(lr, gv);
                let new = e.ins().fsub(wv, step);
                e.store(new, wa, 0);
            }
            Rule::Momentum => {
                let (lr, momentum) = (scalar(e, scalars, 0, vector), scalar(e, scalars, 1, vector));
                let va = e.at(slots[0], i);
                let v = load(e, va, vector);
                let kept = e.ins().fmul(momentum, v);
                let step = e.ins().fmul(lr, gv);
                let v = e.ins().fsub(kept, step);
                e.store(v, va, 0);
                let new = e.ins().fadd(wv, v);
                e.store(new, wa, 0);
            }
            Rule::Adam => {
                let alpha = scalar(e, scalars, 0, vector);
                let (one_minus_beta1, one_minus_beta2) =
                    (scalar(e, scalars, 1, vector), scalar(e, scalars, 2, vector));
                let epsilon = scalar(e, scalars, 3, vector);
                let (ma, va) = (e.at(slots[0], i), e.at(slots[1], i));
                let m = load(e, ma, vector);
                let v = load(e, va, vector);
                let dm = e.ins().fsub(gv, m);
                let dm = e.ins().fmul(dm, one_minus_beta1);
                let m = e.ins().fadd(m, dm);
                e.store(m, ma, 0);
                let g2 = e.ins().fmul(gv, gv);
                let dv = e.ins().fsub(g2, v);
                let dv = e.ins().fmul(dv, one_minus_beta2);
                let v = e.ins().fadd(v, dv);
                e.store(v, va, 0);
                let numerator = e.ins().fmul(alpha, m);
                let root = e.ins().sqrt(v);
                let denominator = e.ins().fadd(root, epsilon);
                let step = e.ins().fdiv(numerator, denominator);
                let new = e.ins().fsub(wv, step);
                e.store(new, wa, 0);
            }
        }
    });
}
