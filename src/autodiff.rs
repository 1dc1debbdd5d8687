//! Autodiff: a checked forward graph → a [`Program`], the ordered steps of one training step.
//!
//! ```text
//!   Forward(conv2d) Forward(relu) … Forward(dense) ─▶ Loss(softmax ⊗ cross-entropy)
//!                                                        │ d(logits)
//!   Update ◀─ Backward(conv2d) ◀─ Backward(relu) ◀ … ◀ Backward(dense)
//! ```
//!
//! The output activation is fused with the loss (softmax with categorical cross-entropy,
//! sigmoid with binary cross-entropy), so training never runs it on its own. Each op has one
//! gradient rule, applied by the backends at `Backward(node)`; a node's input gradient is
//! computed only when something trainable lies upstream of it.
//!
//! Architecture invariant: autodiff decides *what* is computed and in which order; how each
//! op and its gradient are computed is the backends' business.

use anyhow::{Context as _, bail};

use crate::Checked;
use crate::ir::cost::ParamSpec;
use crate::ir::fuse::{self, Block};
use crate::ir::train::Loss;
use crate::ir::{Activation, Graph, NodeId, Op, ShapeInfo};

/// One parameter tensor of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamRef {
    /// `layer/param`, as Keras names weights: `conv2d/kernel`, `batch_normalization/moving_mean`.
    pub name: String,
    pub node: NodeId,
    pub spec: ParamSpec,
}

/// One step of a training step, in execution order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Compute the node's value (training mode).
    Forward(NodeId),
    /// The fused output activation and loss: from the logits' value, the loss, the
    /// accuracy and d(logits).
    Loss,
    /// The node's gradient rule: from d(node), its parameter gradients and, when needed,
    /// d(input).
    Backward(NodeId),
    /// The optimizer step on every trainable parameter.
    Update,
}

/// A model compiled for training and inference.
#[derive(Debug, Clone)]
pub struct Program {
    pub graph: Graph,
    pub shapes: ShapeInfo,
    pub params: Vec<ParamRef>,
    /// For each node, the indices in `params` of its parameters, in [`ParamSpec`] order.
    pub node_params: Vec<Vec<usize>>,
    /// For each node, whether the backward pass needs the gradient of its value.
    pub needs_grad: Vec<bool>,
    /// Training's forward pass: every node after the input, in order (a fused block once, at
    /// its output node).
    pub forward: Vec<NodeId>,
    /// Inference: every node after the input, in order (a fused block once, at its inference
    /// output node).
    pub inference: Vec<NodeId>,
    /// Training steps; empty when the model has no loss.
    pub steps: Vec<Step>,
    pub loss: Option<Loss>,
    /// The node whose value the fused loss reads (the output activation's input).
    pub logits: NodeId,
    /// The model's output (probabilities at inference).
    pub output: NodeId,
    /// Chains that backends may run as one block (empty unless [`Program::fused`]). `steps`
    /// and `inference` then name only each block's output node, where the block runs.
    pub blocks: Vec<Block>,
}

impl Program {
    pub fn param_index(&self, name: &str) -> Option<usize> {
        self.params.iter().position(|p| p.name == name)
    }

    /// Number of output values per sample.
    pub fn output_width(&self) -> usize {
        self.shapes.shape(self.output).numel()
    }

    /// The program with the fusion pass applied: every chain [`fuse::find_blocks`] finds becomes
    /// one block, run (forward and backward) where its output node was. Parameters, their
    /// names and order stay as they were, so checkpoints move freely between the two.
    pub fn fused(mut self) -> Program {
        self.blocks = fuse::find_blocks(&self.graph, &[self.logits, self.output]);
        let inner: Vec<NodeId> =
            self.blocks.iter().flat_map(|b| b.nodes().filter(move |id| *id != b.output())).collect();
        let inner_at_inference: Vec<NodeId> = self
            .blocks
            .iter()
            .flat_map(|b| b.inference_nodes().filter(move |id| *id != b.inference_output()))
            .collect();
        self.forward.retain(|id| !inner.contains(id));
        self.inference.retain(|id| !inner_at_inference.contains(id));
        self.steps.retain(|step| match step {
            Step::Forward(id) | Step::Backward(id) => !inner.contains(id),
            Step::Loss | Step::Update => true,
        });
        // Each block keeps its output's backward step: the linear node's kernel is trainable,
        // so every node after it in the block has a gradient to pass back.
        debug_assert!(self.blocks.iter().all(|b| {
            let out = b.output();
            !self.steps.contains(&Step::Forward(out)) || self.steps.contains(&Step::Backward(out))
        }));
        self
    }

    /// The block whose output is `id`, in a fused program: in training, or at inference.
    pub fn block_ending_at(&self, id: NodeId, training: bool) -> Option<&Block> {
        let output = |b: &Block| if training { b.output() } else { b.inference_output() };
        self.blocks.iter().find(|b| output(b) == id)
    }
}

/// Builds the program of a checked model and, when `fuse`, applies the fusion pass.
pub fn build_with(checked: &Checked, fuse: bool) -> anyhow::Result<Program> {
    let program = build(checked)?;
    Ok(if fuse { program.fused() } else { program })
}

/// Builds the program of a checked model; `loss` is the train block's, if any.
pub fn build(checked: &Checked) -> anyhow::Result<Program> {
    let graph = checked.model.graph.clone();
    let shapes = checked.shapes.clone();
    let loss = checked.model.train.as_ref().and_then(|t| t.loss);
    let output = graph.output().context("the model has no nodes")?;

    let mut params = Vec::new();
    let mut node_params = Vec::new();
    let mut needs_grad = vec![false; graph.len()];
    for (id, node) in graph.nodes() {
        let mut indices = Vec::new();
        for spec in checked.costs.params(id) {
            indices.push(params.len());
            let name = format!("{}/{}", graph.layer_of(id).name, spec.name);
            params.push(ParamRef { name, node: id, spec: spec.clone() });
        }
        let trainable_here = checked.costs.params(id).iter().any(|p| p.trainable);
        let upstream = node.inputs.iter().any(|i| needs_grad[i.index()]);
        needs_grad[id.index()] = trainable_here || upstream;
        node_params.push(indices);
    }

    let inference: Vec<NodeId> = graph.nodes().skip(1).map(|(id, _)| id).collect();
    let (logits, steps) = match loss {
        None => (output, Vec::new()),
        Some(loss) => {
            let logits = fused_logits(&graph, output, loss)?;
            let forward: Vec<NodeId> = inference.iter().copied().filter(|id| *id <= logits).collect();
            let mut steps: Vec<Step> = forward.iter().map(|&id| Step::Forward(id)).collect();
            steps.push(Step::Loss);
            for &id in forward.iter().rev() {
                let has_params = !node_params[id.index()].is_empty();
                let input_needs = graph.node(id).inputs.iter().any(|i| needs_grad[i.index()]);
                if has_params || input_needs {
                    steps.push(Step::Backward(id));
                }
            }
            steps.push(Step::Update);
            (logits, steps)
        }
    };
    Ok(Program {
        graph,
        shapes,
        params,
        node_params,
        needs_grad,
        forward: inference.clone(),
        inference,
        steps,
        loss,
        logits,
        output,
        blocks: Vec::new(),
    })
}

/// The node whose value the loss reads: the input of the output activation it fuses with.
fn fused_logits(graph: &Graph, output: NodeId, loss: Loss) -> anyhow::Result<NodeId> {
    let node = graph.node(output);
    let expected = match loss {
        Loss::CategoricalCrossentropy | Loss::SparseCategoricalCrossentropy => Activation::Softmax,
        Loss::BinaryCrossentropy => Activation::Sigmoid,
    };
    match &node.op {
        Op::Activation(a) if *a == expected => Ok(node.inputs[0]),
        op => bail!(
            "{} needs the model to end in {}, but it ends in {}",
            loss.name(),
            expected.name(),
            op.name()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::SourceFile;

    fn program(text: &str) -> Program {
        let checked = crate::check(&SourceFile::new("t.cnn", text)).unwrap();
        build(&checked).unwrap()
    }

    #[test]
    fn mnist_steps_run_forward_then_loss_then_backward_in_reverse() {
        let p = program(&std::fs::read_to_string("models/mnist.cnn").unwrap());
        let names: Vec<String> = p
            .steps
            .iter()
            .map(|s| match s {
                Step::Forward(id) => format!("F{}", id.index()),
                Step::Backward(id) => format!("B{}", id.index()),
                Step::Loss => "L".into(),
                Step::Update => "U".into(),
            })
            .collect();
        // %10 (softmax) is fused into the loss; %1 conv's input gradient is not needed but its
        // weights are, so B1 stays.
        assert_eq!(names.join(" "), "F1 F2 F3 F4 F5 F6 F7 F8 F9 L B9 B8 B7 B6 B5 B4 B3 B2 B1 U");
        assert_eq!(p.logits.index(), 9);
        let names: Vec<&str> = p.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "conv2d/kernel",
                "conv2d/bias",
                "conv2d_1/kernel",
                "conv2d_1/bias",
                "dense/kernel",
                "dense/bias"
            ]
        );
        assert!(!p.needs_grad[0], "the input needs no gradient");
    }

    #[test]
    fn layers_before_the_first_parameter_get_no_backward_step() {
        let p = program(
            "model m { input 8x8x1 maxpool(2) conv2d(2, kernel=3) flatten dense(3, activation=softmax) }
             train { loss = categorical_crossentropy }",
        );
        assert!(!p.steps.contains(&Step::Backward(NodeId::from_index(1))), "{:?}", p.steps);
        assert!(p.steps.contains(&Step::Backward(NodeId::from_index(2))));
    }
}
