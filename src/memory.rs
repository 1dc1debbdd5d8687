//! The memory plan: every buffer one training step (or one inference pass) uses — values,
//! gradients, the tape's batch statistics and dropout masks, parameter gradients, each step's
//! scratch — placed at an offset in one arena, so that buffers whose lifetimes do not overlap
//! share memory and the step allocates nothing.
//!
//! ```text
//!   steps:      F(conv) F(relu) F(pool) … Loss … B(pool) B(relu) B(conv) Update
//!   value(conv)   ├───────────────────────────────────────────────┤     (read by B(conv))
//!   value(relu)           ├──────────────────────────┤
//!   grad(relu)                                  ├──────────┤
//!   scratch(t)    ├┤                                                     (one step only)
//! ```
//!
//! A buffer is live from the first step that touches it to the last; the plan places the
//! largest buffers first, each at the lowest offset where it overlaps no live-together buffer
//! placed before it. The interpreter asks for a buffer at a step, and the arena checks that the
//! plan has it live there: a step that touched a buffer the plan did not expect it to would
//! panic, never read memory that another buffer reuses.
//!
//! Architecture invariant: the plan knows which steps touch which buffers and how big they are;
//! it knows nothing of kernels (a backend says what scratch each step needs and which blocks it
//! runs fused).

use std::collections::HashMap;
use std::fmt;

use crate::autodiff::{Program, Step};
use crate::ir::fuse::Block;
use crate::ir::{NodeId, Op};

/// One buffer of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Buffer {
    /// A node's value for the batch (the input's is the batch itself).
    Value(NodeId),
    /// The loss's gradient with respect to a node's value.
    Grad(NodeId),
    /// A batchnorm's batch statistics: C means, then C variances.
    Stats(NodeId),
    /// A dropout layer's mask.
    Mask(NodeId),
    /// The gradient of a parameter (by index in the program's parameters).
    ParamGrad(usize),
    /// What step `t`'s kernels use while they run and not after.
    Scratch(usize),
    /// A second gradient contribution to a value read twice, written at step `t` and added in.
    Contribution(usize),
}

/// Which pass a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Forward (up to the logits), loss, backward, update.
    Train,
    /// The inference forward pass up to the output.
    Infer,
}

/// Where a buffer lives in the arena, and for which steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub offset: usize,
    /// Elements (for the plan's batch size; a smaller batch uses a prefix).
    pub len: usize,
    /// First and last step (inclusive) that touch it.
    pub live: [usize; 2],
}

/// What a backend tells the planner: which fused blocks it runs as one unit, and how much
/// scratch each step's kernels take for a batch of `n`.
pub trait StepNeeds {
    fn fuses(&self, block: &Block, pass: Pass) -> bool;
    fn scratch(&self, program: &Program, step: Step, pass: Pass, n: usize) -> usize;

    /// Whether, at inference, the backend runs fused block `first` inside the step of fused
    /// block `second`, which reads only `first`'s value, sample by sample (so that a sample of
    /// that value is still in cache when `second` reads it). Asked only of such pairs.
    fn pairs(&self, _first: &Block, _second: &Block) -> bool {
        false
    }

    /// Whether, in training, the backend runs the max pool after fused block `block`
    /// (`block.pool`) inside the block's steps: the block's forward step writes the pool's value
    /// and its backward step reads the pool's gradient; the pool's own steps run nothing, and
    /// the block's value and its gradient are never written. Asked only of fused blocks that
    /// have such a pool.
    fn takes_pool(&self, _block: &Block) -> bool {
        false
    }
}

/// The plan of one pass for batches of up to `batch` samples.
#[derive(Debug, Clone)]
pub struct Plan {
    pub pass: Pass,
    pub batch: usize,
    /// The steps in the order they run; `Scratch(t)` and `Contribution(t)` name step `t`.
    pub steps: Vec<Step>,
    placed: HashMap<Buffer, Placed>,
    /// For each value read twice, the step that writes its gradient first (the others add in).
    first_grad: HashMap<NodeId, usize>,
    /// Whether each block runs fused (as the backend said when planning).
    fused: Vec<bool>,
    /// At inference, for each block, the block that runs inside its step ([`Plan::paired`]).
    paired: Vec<Option<usize>>,
    /// In training, for each block, whether its steps run its pool's ([`Plan::takes_pool`]).
    pooled: Vec<bool>,
    /// The arena's size in elements.
    pub len: usize,
    /// What the buffers would take without sharing, in elements.
    pub unshared: usize,
}

/// Offsets are multiples of this many elements (64 bytes of f32: one cache line).
const ALIGN: usize = 16;

impl Plan {
    /// Plans `pass` of `program` for batches of up to `batch`. With `reuse` false every buffer
    /// stays live for the whole pass (nothing shared): what a caller that wants every value
    /// afterwards needs, and the baseline the tests compare the shared plan with.
    pub fn new(program: &Program, pass: Pass, batch: usize, needs: &impl StepNeeds, reuse: bool) -> Plan {
        let steps = timeline(program, pass);
        let fused: Vec<bool> = program.blocks.iter().map(|b| needs.fuses(b, pass)).collect();
        let paired = pairs(program, pass, &steps, &fused, needs);
        let pooled: Vec<bool> = program
            .blocks
            .iter()
            .zip(&fused)
            .map(|(b, &fused)| pass == Pass::Train && fused && b.pool.is_some() && needs.takes_pool(b))
            .collect();
        let mut scratch: Vec<usize> = steps
            .iter()
            .map(|&step| match step {
                Step::Forward(id) | Step::Backward(id) if pool_in_block(program, &pooled, id).is_some() => 0,
                _ => needs.scratch(program, step, pass, batch),
            })
            .collect();
        // a pair's step holds both blocks' scratch; the first block's own step runs nothing
        for (t, &step) in steps.iter().enumerate() {
            if let Some(first) = step_block(program, pass, step).and_then(|second| paired[second]) {
                scratch[t] += std::mem::take(&mut scratch[t - 1]);
                debug_assert_eq!(
                    step_block(program, pass, steps[t - 1]),
                    Some(first),
                    "pairs are adjacent steps"
                );
            }
        }
        let mut touched: Vec<(Buffer, usize)> = Vec::new();
        let mut first_grad = HashMap::new();
        for (t, &step) in steps.iter().enumerate() {
            let mut access = |b: Buffer| touched.push((b, t));
            accesses(program, pass, [&fused, &pooled], &paired, step, &mut access);
            if scratch[t] > 0 {
                touched.push((Buffer::Scratch(t), t));
            }
        }
        // The input is written before the first step; at inference the output is read after
        // the last.
        touched.push((Buffer::Value(program.graph.input()), 0));
        if pass == Pass::Infer {
            touched.push((Buffer::Value(program.output), steps.len().saturating_sub(1)));
        }
        // Gradient writes after the first to the same value go through a contribution.
        let mut grad_writes: HashMap<NodeId, Vec<usize>> = HashMap::new();
        for (t, step) in steps.iter().enumerate() {
            if let Step::Backward(id) = *step {
                let v = backward_input(program, id);
                if program.needs_grad[v.index()] {
                    grad_writes.entry(v).or_default().push(t);
                }
            }
        }
        let mut extra = Vec::new();
        for (v, ts) in &grad_writes {
            if ts.len() > 1 {
                first_grad.insert(*v, ts[0]);
                extra.extend(ts[1..].iter().map(|&t| (Buffer::Contribution(t), t)));
            }
        }
        touched.extend(extra);

        let last = steps.len().saturating_sub(1);
        let mut live: HashMap<Buffer, [usize; 2]> = HashMap::new();
        for (b, t) in touched {
            let b = alias(program, pass, b);
            let range = live.entry(b).or_insert([t, t]);
            range[0] = range[0].min(t);
            range[1] = range[1].max(t);
        }
        if !reuse {
            for range in live.values_mut() {
                *range = [0, last];
            }
        }
        let mut buffers: Vec<(Buffer, usize, [usize; 2])> = live
            .into_iter()
            .map(|(b, range)| (b, buffer_len(program, &steps, &scratch, b, batch), range))
            .filter(|(_, len, _)| *len > 0)
            .collect();
        // Largest first, then by first use, then by name: the same plan on every run.
        buffers.sort_by_key(|&(b, len, range)| (std::cmp::Reverse(len), range, format!("{b:?}")));
        let mut placed: HashMap<Buffer, Placed> = HashMap::new();
        let mut order: Vec<Placed> = Vec::new();
        for (b, len, range) in buffers {
            let offset = lowest_fit(&order, len, range);
            let p = Placed { offset, len, live: range };
            order.push(p);
            placed.insert(b, p);
        }
        let len = order.iter().map(|p| p.offset + p.len).max().unwrap_or(0);
        let unshared = order.iter().map(|p| p.len).sum();
        let plan = Plan { pass, batch, steps, placed, first_grad, fused, paired, pooled, len, unshared };
        plan.check();
        plan
    }

    /// Where `buffer` lives (after aliases: a flatten's value is its input's), if the pass has it.
    pub fn get(&self, program: &Program, buffer: Buffer) -> Option<Placed> {
        self.placed.get(&alias(program, self.pass, buffer)).copied()
    }

    /// Whether block `i` of the program runs fused in this plan.
    pub fn runs_fused(&self, program: &Program, block: &Block) -> bool {
        program.blocks.iter().position(|b| b == block).is_some_and(|i| self.fused[i])
    }

    /// At inference, the block that runs inside the step of `block` (the block before it,
    /// whose value it reads), sample by sample, where the backend pairs them; that block's
    /// own step then runs nothing.
    pub fn paired(&self, program: &Program, block: &Block) -> Option<Block> {
        let i = program.blocks.iter().position(|b| b == block)?;
        self.paired[i].map(|first| program.blocks[first])
    }

    /// Whether, in training, `block`'s steps run its pool's too: the forward step writes the
    /// pool's value, the backward step reads the pool's gradient ([`StepNeeds::takes_pool`]).
    pub fn takes_pool(&self, program: &Program, block: &Block) -> bool {
        program.blocks.iter().position(|b| b == block).is_some_and(|i| self.pooled[i])
    }

    /// Whether node `id` is a pool whose steps run inside its block's ([`Plan::takes_pool`]):
    /// then its own steps run nothing.
    pub fn runs_in_block(&self, program: &Program, id: NodeId) -> bool {
        pool_in_block(program, &self.pooled, id).is_some()
    }

    /// Whether `block` runs inside the next step ([`Plan::paired`]).
    pub fn runs_in_next_step(&self, program: &Program, block: &Block) -> bool {
        let i = program.blocks.iter().position(|b| b == block);
        i.is_some_and(|i| self.paired.contains(&Some(i)))
    }

    /// Whether the gradient of `v` written at step `t` is its first (written in place), or adds
    /// to what an earlier step wrote (through `Contribution(t)`).
    pub fn writes_first_grad(&self, v: NodeId, t: usize) -> bool {
        self.first_grad.get(&v).is_none_or(|&first| first == t)
    }

    /// Every buffer and where it lives, by offset.
    pub fn buffers(&self) -> Vec<(Buffer, Placed)> {
        let mut all: Vec<_> = self.placed.iter().map(|(b, p)| (*b, *p)).collect();
        all.sort_by_key(|(b, p)| (p.offset, p.live, format!("{b:?}")));
        all
    }

    /// The plan's invariant: two buffers live at a common step never overlap in the arena.
    /// Checked on every plan (it is small: tens of buffers).
    fn check(&self) {
        let all: Vec<_> = self.placed.iter().collect();
        for (i, (a, p)) in all.iter().enumerate() {
            assert!(p.offset + p.len <= self.len, "{a:?} lies inside the arena");
            for (b, q) in &all[i + 1..] {
                let together = p.live[0] <= q.live[1] && q.live[0] <= p.live[1];
                let overlap = p.offset < q.offset + q.len && q.offset < p.offset + p.len;
                assert!(!(together && overlap), "the memory plan put {a:?} and {b:?} in the same place");
            }
        }
    }
}

impl Plan {
    /// The plan buffer by buffer, one a line: offset, size, the steps it is live over, and
    /// what it holds (`cnnc compile --emit memory`).
    pub fn describe(&self, program: &Program) -> String {
        use std::fmt::Write as _;
        let node = |id: NodeId| format!("%{} {}", id.index(), program.graph.layer_of(id).name);
        let step = |t: usize| match self.steps[t] {
            Step::Forward(id) => format!("{t}:forward %{}", id.index()),
            Step::Backward(id) => format!("{t}:backward %{}", id.index()),
            Step::Loss => format!("{t}:loss"),
            Step::Update => format!("{t}:update"),
        };
        let mut out = format!("{self}\n");
        let _ = writeln!(out, "{:>12} {:>12}  {:<36} buffer", "offset", "size", "live");
        for (buffer, p) in self.buffers() {
            let what = match buffer {
                Buffer::Value(id) => format!("value of {}", node(id)),
                Buffer::Grad(id) => format!("gradient of {}", node(id)),
                Buffer::Stats(id) => format!("batch statistics of {}", node(id)),
                Buffer::Mask(id) => format!("dropout mask of {}", node(id)),
                Buffer::ParamGrad(i) => format!("gradient of {}", program.params[i].name),
                Buffer::Scratch(t) => format!("scratch of step {t}"),
                Buffer::Contribution(t) => format!("gradient contribution of step {t}"),
            };
            let live = format!("{} .. {}", step(p.live[0]), step(p.live[1]));
            let bytes = |elements: usize| crate::report::readable_bytes(4 * elements);
            let _ = writeln!(out, "{:>12} {:>12}  {live:<36} {what}", bytes(p.offset), bytes(p.len));
        }
        out
    }
}

impl fmt::Display for Plan {
    /// One line: the arena's size, against the buffers' total.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.pass {
            Pass::Train => "a training step",
            Pass::Infer => "inference",
        };
        write!(
            f,
            "arena {} for {what} of batch {} ({} buffers, {} without sharing)",
            crate::report::readable_bytes(4 * self.len),
            self.batch,
            self.placed.len(),
            crate::report::readable_bytes(4 * self.unshared),
        )
    }
}

/// The lowest aligned offset where `len` elements overlap none of `placed` that are live
/// during `range`.
fn lowest_fit(placed: &[Placed], len: usize, range: [usize; 2]) -> usize {
    let mut busy: Vec<[usize; 2]> = placed
        .iter()
        .filter(|p| p.live[0] <= range[1] && range[0] <= p.live[1])
        .map(|p| [p.offset, p.offset + p.len])
        .collect();
    busy.sort_unstable();
    let mut offset = 0;
    for [start, end] in busy {
        if offset + len <= start {
            break;
        }
        offset = offset.max(end.next_multiple_of(ALIGN));
    }
    offset
}

/// The steps of `pass` in the order the interpreter runs them.
pub fn timeline(program: &Program, pass: Pass) -> Vec<Step> {
    match pass {
        Pass::Infer => program.inference.iter().map(|&id| Step::Forward(id)).collect(),
        Pass::Train => {
            let forward =
                program.forward.iter().filter(|id| **id <= program.logits).map(|&id| Step::Forward(id));
            let rest = program.steps.iter().filter(|s| !matches!(s, Step::Forward(_))).copied();
            forward.chain(rest).collect()
        }
    }
}

/// The buffer that `b` shares: a flatten's value is its input's (a flat arena needs no
/// reshape), and so is a dropout's at inference; the gradient of a flatten's input is the
/// flatten's gradient when nothing else reads that input.
fn alias(program: &Program, pass: Pass, b: Buffer) -> Buffer {
    match b {
        Buffer::Value(id) => match passes_through(program, pass, id) {
            Some(input) => alias(program, pass, Buffer::Value(input)),
            None => b,
        },
        Buffer::Grad(id) => match gradient_passes_back(program, id) {
            Some(flatten) => alias(program, pass, Buffer::Grad(flatten)),
            None => b,
        },
        _ => b,
    }
}

/// The input of `id` when `id`'s value is its input's value as it is.
pub fn passes_through(program: &Program, pass: Pass, id: NodeId) -> Option<NodeId> {
    let node = program.graph.node(id);
    match node.op {
        Op::Flatten => Some(node.inputs[0]),
        Op::Dropout { .. } if pass == Pass::Infer => Some(node.inputs[0]),
        _ => None,
    }
}

/// The flatten whose gradient is `id`'s gradient: its only reader.
pub fn gradient_passes_back(program: &Program, id: NodeId) -> Option<NodeId> {
    let mut readers = program.graph.nodes().filter(|(_, n)| n.inputs.contains(&id));
    match (readers.next(), readers.next()) {
        (Some((reader, node)), None) if matches!(node.op, Op::Flatten) => Some(reader),
        _ => None,
    }
}

/// Elements of `b` for a batch of `n`, step `t`'s scratch being `scratch[t]`.
fn buffer_len(program: &Program, steps: &[Step], scratch: &[usize], b: Buffer, n: usize) -> usize {
    let per_sample = |id: NodeId| n * program.shapes.shape(id).numel();
    match b {
        Buffer::Value(id) | Buffer::Grad(id) | Buffer::Mask(id) => per_sample(id),
        Buffer::Stats(id) => 2 * program.shapes.shape(id).channels(),
        Buffer::ParamGrad(i) => program.params[i].spec.numel(),
        Buffer::Scratch(t) => scratch[t],
        Buffer::Contribution(t) => match steps[t] {
            Step::Backward(id) => per_sample(backward_input(program, id)),
            _ => unreachable!("contributions come from backward steps"),
        },
    }
}

/// The node whose gradient a backward step at `id` writes: its input (a block's linear input).
fn backward_input(program: &Program, id: NodeId) -> NodeId {
    let first = program.block_ending_at(id, true).map_or(id, |b| b.linear);
    program.graph.node(first).inputs[0]
}

/// The block ending at `id` in `pass`, and whether it runs fused.
fn block_at<'p>(program: &'p Program, fused: &[bool], id: NodeId, pass: Pass) -> Option<(&'p Block, bool)> {
    let i = step_block(program, pass, Step::Forward(id))?;
    Some((&program.blocks[i], fused[i]))
}

/// The index of the block whose step `step` is, in `pass`.
fn step_block(program: &Program, pass: Pass, step: Step) -> Option<usize> {
    let Step::Forward(id) = step else { return None };
    program
        .blocks
        .iter()
        .position(|b| if pass == Pass::Train { b.output() } else { b.inference_output() } == id)
}

/// At inference, for each block, the block run inside its step ([`StepNeeds::pairs`]): the
/// fused block of the step just before it, when that block's value is read only by this
/// one's linear node (and is not the model's output). A block that holds another is not itself
/// run inside the next one: pairs do not nest.
fn pairs(
    program: &Program,
    pass: Pass,
    steps: &[Step],
    fused: &[bool],
    needs: &impl StepNeeds,
) -> Vec<Option<usize>> {
    let mut paired = vec![None; program.blocks.len()];
    if pass != Pass::Infer {
        return paired;
    }
    for t in 1..steps.len() {
        let (Some(first), Some(second)) =
            (step_block(program, pass, steps[t - 1]), step_block(program, pass, steps[t]))
        else {
            continue;
        };
        let (a, b) = (&program.blocks[first], &program.blocks[second]);
        let value = a.inference_output();
        let readers = program.graph.nodes().filter(|(_, n)| n.inputs.contains(&value)).count();
        let only_reader = program.graph.node(b.linear).inputs[0] == value && readers == 1;
        // the first does not already hold a block of its own
        let free = paired[first].is_none();
        if fused[first]
            && fused[second]
            && only_reader
            && value != program.output
            && free
            && needs.pairs(a, b)
        {
            paired[second] = Some(first);
        }
    }
    paired
}

/// The block whose steps run those of pool `id`, if one does (in training).
fn pool_in_block<'p>(program: &'p Program, pooled: &[bool], id: NodeId) -> Option<&'p Block> {
    program.blocks.iter().zip(pooled).find(|(b, takes)| **takes && b.pool == Some(id)).map(|(b, _)| b)
}

/// Every buffer `step` reads or writes (the interpreter's `run_step` touches exactly these).
fn accesses(
    program: &Program,
    pass: Pass,
    [fused, pooled]: [&[bool]; 2],
    paired: &[Option<usize>],
    step: Step,
    access: &mut impl FnMut(Buffer),
) {
    let input = |id: NodeId| program.graph.node(id).inputs[0];
    if let Step::Forward(id) | Step::Backward(id) = step
        && pool_in_block(program, pooled, id).is_some()
    {
        // runs inside the block's step
        return;
    }
    // the pool a block's steps run, whose value (and gradient) stand for the block's
    let taken = |id: NodeId| {
        let i = step_block(program, Pass::Train, Step::Forward(id))?;
        program.blocks[i].pool.filter(|_| pooled[i])
    };
    if let Some(i) = step_block(program, pass, step) {
        if paired.contains(&Some(i)) {
            // runs inside the next step
            return;
        }
        if let Some(first) = paired[i] {
            let a = &program.blocks[first];
            access(Buffer::Value(input(a.linear)));
            access(Buffer::Value(a.inference_output()));
        }
    }
    let params = |id: NodeId, access: &mut dyn FnMut(Buffer)| {
        for &i in &program.node_params[id.index()] {
            if program.params[i].spec.trainable {
                access(Buffer::ParamGrad(i));
            }
        }
    };
    match step {
        Step::Forward(id) => match block_at(program, fused, id, pass) {
            Some((b, true)) => {
                access(Buffer::Value(input(b.linear)));
                access(Buffer::Value(if pass == Pass::Train { taken(id).unwrap_or(id) } else { id }));
                if let (Some(norm), Pass::Train) = (b.norm, pass) {
                    access(Buffer::Value(b.linear));
                    access(Buffer::Stats(norm));
                }
            }
            found => {
                let nodes: Vec<NodeId> = match (found, pass) {
                    (Some((b, _)), Pass::Infer) => b.inference_nodes().collect(),
                    (Some((b, _)), Pass::Train) => b.nodes().collect(),
                    (None, _) => vec![id],
                };
                for id in nodes {
                    access(Buffer::Value(input(id)));
                    access(Buffer::Value(id));
                    match (&program.graph.node(id).op, pass) {
                        (Op::BatchNorm(_), Pass::Train) => access(Buffer::Stats(id)),
                        (Op::Dropout { .. }, Pass::Train) => access(Buffer::Mask(id)),
                        _ => {}
                    }
                }
            }
        },
        Step::Loss => {
            access(Buffer::Value(program.logits));
            access(Buffer::Grad(program.logits));
        }
        Step::Backward(id) => {
            let (nodes, fused_block): (Vec<NodeId>, _) = match block_at(program, fused, id, Pass::Train) {
                Some((b, true)) => (b.nodes().collect(), Some(b)),
                Some((b, false)) => (b.nodes().collect(), None),
                None => (vec![id], None),
            };
            if let Some(b) = fused_block {
                // the block's value and gradient, or its pool's where the block runs the pool
                let value = taken(id).unwrap_or(id);
                access(Buffer::Grad(value));
                access(Buffer::Value(input(b.linear)));
                access(Buffer::Value(value));
                if let Some(norm) = b.norm {
                    access(Buffer::Value(b.linear));
                    access(Buffer::Stats(norm));
                }
            }
            for &n in nodes.iter().rev() {
                if fused_block.is_none() {
                    access(Buffer::Grad(n));
                    access(Buffer::Value(input(n)));
                    access(Buffer::Value(n));
                    match program.graph.node(n).op {
                        Op::BatchNorm(_) => access(Buffer::Stats(n)),
                        Op::Dropout { .. } => access(Buffer::Mask(n)),
                        _ => {}
                    }
                }
                params(n, access);
                let v = input(n);
                if program.needs_grad[v.index()] && (fused_block.is_none() || n == nodes[0]) {
                    access(Buffer::Grad(v));
                }
            }
        }
        Step::Update => {
            for (i, p) in program.params.iter().enumerate() {
                if p.spec.trainable {
                    access(Buffer::ParamGrad(i));
                }
            }
            for (id, node) in program.graph.nodes() {
                if matches!(node.op, Op::BatchNorm(_)) && id <= program.logits {
                    access(Buffer::Stats(id));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::SourceFile;

    /// Runs every block node by node, with no scratch: what the reference needs.
    struct Plain;

    impl StepNeeds for Plain {
        fn fuses(&self, _: &Block, _: Pass) -> bool {
            false
        }

        fn scratch(&self, _: &Program, _: Step, _: Pass, _: usize) -> usize {
            0
        }
    }

    fn program(model: &str) -> Program {
        let text = format!("model m {{ {model} }}\ntrain {{ loss = categorical_crossentropy }}");
        let checked = crate::check(&SourceFile::new("m.cnn", text.as_str())).unwrap();
        crate::autodiff::build(&checked).unwrap()
    }

    #[test]
    fn buffers_live_at_different_steps_share_memory() {
        let program = program(
            "input 6x6x2 conv2d(3, kernel=3) relu flatten dense(4) relu dense(2, activation=softmax)",
        );
        let plan = Plan::new(&program, Pass::Infer, 5, &Plain, true);
        let at = |id: usize| plan.get(&program, Buffer::Value(NodeId::from_index(id))).unwrap();
        // input → conv (%1) → relu (%2) → flatten (%3, the relu's buffer) → dense (%4) → …:
        // the input is dead once the conv has read it; a later value takes its memory.
        assert_eq!(at(3), at(2), "a flatten's value is its input's buffer");
        let input = at(0);
        assert_eq!(input.live, [0, 0]);
        let reused = plan.buffers().into_iter().any(|(_, p)| {
            p.live[0] > 0 && p.offset < input.offset + input.len && input.offset < p.offset + p.len
        });
        assert!(reused, "{}", plan.describe(&program));
        let apart = Plan::new(&program, Pass::Infer, 5, &Plain, false);
        assert!(plan.len < apart.len && apart.len >= apart.unshared);
    }

    #[test]
    #[should_panic(expected = "in the same place")]
    fn the_check_finds_live_buffers_placed_on_each_other() {
        let program = program("input 6x6x2 conv2d(3, kernel=3) relu flatten dense(2, activation=softmax)");
        let mut plan = Plan::new(&program, Pass::Train, 3, &Plain, true);
        for placed in plan.placed.values_mut() {
            placed.offset = 0;
        }
        plan.check();
    }
}
