//! The fusion pass: finds the chains that backends run as one block,
//!
//! ```text
//!   conv2d | dense  ─▶  [batchnorm]  ─▶  [relu | leaky_relu(α ≥ 0)]
//! ```
//!
//! (at least two of the three), so that a conv's epilogue can gather the batch statistics and a
//! single pass can normalize, scale, shift and rectify. A chain is only fused where nothing else
//! reads its inner values: every node but the last has exactly one consumer, the next one, and
//! is neither the model's output nor a value the loss reads. At inference a block also takes
//! in an unpadded max-pooling layer that follows it (`pool`): its input then never leaves the cache.
//!
//! Pure analysis, like the rest of `ir/`: it returns blocks and leaves the graph alone; the
//! program records them (autodiff) and each backend decides how to run them.

use super::{Activation, Graph, NodeId, Op, Padding, PoolKind};

/// One fused chain. Its value is its last node's; its input is the linear node's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// The conv2d or dense node.
    pub linear: NodeId,
    pub norm: Option<NodeId>,
    /// A relu, or a leaky relu with α ≥ 0 (so that the output's sign tells the input's: the
    /// backward pass rebuilds the mask from the output instead of keeping the pre-activation).
    pub act: Option<NodeId>,
    /// A max-pooling node without padding after the chain, fused at inference; in training only
    /// where a backend can do without the block's value, which the pool's backward pass reads
    /// (the JIT recomputes it, or rebuilds it from the convolution's output, for some first
    /// layers); otherwise training keeps it separate.
    pub pool: Option<NodeId>,
}

impl Block {
    /// The node whose value is the block's value in training.
    pub fn output(&self) -> NodeId {
        self.act.or(self.norm).unwrap_or(self.linear)
    }

    /// The block's nodes in training, in order.
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> {
        std::iter::once(self.linear).chain(self.norm).chain(self.act)
    }

    /// The node whose value is the block's value at inference.
    pub fn inference_output(&self) -> NodeId {
        self.pool.unwrap_or(self.output())
    }

    /// The block's nodes at inference, in order.
    pub fn inference_nodes(&self) -> impl Iterator<Item = NodeId> {
        self.nodes().chain(self.pool)
    }
}

/// The rectifier's α when `op` is one the block can fuse.
pub fn fusable_rectifier(op: &Op) -> Option<f32> {
    match *op {
        Op::Activation(Activation::Relu) => Some(0.0),
        Op::Activation(Activation::LeakyRelu { alpha }) if alpha >= 0.0 => Some(alpha),
        _ => None,
    }
}

/// Every fusable chain of `graph`, in order. `keep` lists nodes whose values something outside
/// the graph reads (the loss's logits, the output): they may end a block, never sit inside one.
pub fn find_blocks(graph: &Graph, keep: &[NodeId]) -> Vec<Block> {
    let mut consumers = vec![Vec::new(); graph.len()];
    for (id, node) in graph.nodes() {
        for input in &node.inputs {
            consumers[input.index()].push(id);
        }
    }
    // The single consumer of `id`, when `id` may sit inside a block.
    let next = |id: NodeId| match consumers[id.index()].as_slice() {
        [only] if !keep.contains(&id) && graph.output() != Some(id) => Some(*only),
        _ => None,
    };
    let mut blocks = Vec::new();
    for (id, node) in graph.nodes() {
        if !matches!(node.op, Op::Conv2d(_) | Op::Dense(_)) {
            continue;
        }
        let mut block = Block { linear: id, norm: None, act: None, pool: None };
        let mut last = id;
        if let Some(n) = next(last).filter(|n| matches!(graph.node(*n).op, Op::BatchNorm(_))) {
            block.norm = Some(n);
            last = n;
        }
        if let Some(a) = next(last).filter(|a| fusable_rectifier(&graph.node(*a).op).is_some()) {
            block.act = Some(a);
            last = a;
        }
        if block.output() == id {
            continue;
        }
        let unpadded =
            |op: &Op| matches!(op, Op::Pool(p) if p.padding == Padding::Valid && p.kind == PoolKind::Max);
        block.pool = next(last).filter(|p| unpadded(&graph.node(*p).op));
        blocks.push(block);
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::SourceFile;

    fn blocks(text: &str) -> Vec<Vec<String>> {
        let checked = crate::check(&SourceFile::new("t.cnn", text)).unwrap();
        let graph = &checked.model.graph;
        let output = graph.output().unwrap();
        find_blocks(graph, &[output])
            .iter()
            .map(|b| b.nodes().map(|id| graph.node(id).op.name().to_string()).collect())
            .collect()
    }

    #[test]
    fn finds_every_chain_shape() {
        let found = blocks(
            "model m { input 12x12x3
               conv2d(4, kernel=3, bias=false) batchnorm relu
               conv2d(4, kernel=3, activation=relu)
               conv2d(4, kernel=1) batchnorm
               conv2d(4, kernel=1) leaky_relu(alpha=0.1)
               flatten dense(5, activation=relu) dense(3) }",
        );
        let names: Vec<String> = found.iter().map(|b| b.join("+")).collect();
        assert_eq!(
            names,
            ["conv2d+batchnorm+relu", "conv2d+relu", "conv2d+batchnorm", "conv2d+leaky_relu", "dense+relu"]
        );
    }

    #[test]
    fn an_unpadded_pool_after_a_block_joins_it_at_inference() {
        let text = "model m { input 12x12x1 conv2d(4, kernel=3, activation=relu) maxpool(2)
                    conv2d(4, kernel=3, padding=same) batchnorm relu avgpool(2, padding=same)
                    conv2d(3, kernel=1) maxpool(2) flatten dense(3) }";
        let checked = crate::check(&SourceFile::new("t.cnn", text)).unwrap();
        let graph = &checked.model.graph;
        let found = find_blocks(graph, &[graph.output().unwrap()]);
        let pools: Vec<Option<&str>> =
            found.iter().map(|b| b.pool.map(|p| graph.node(p).op.name())).collect();
        // the second block's pool is padded (and average); the lone conv before the last pool is
        // no block
        assert_eq!(pools, [Some("maxpool"), None]);
        assert_eq!(found[0].inference_output(), NodeId::from_index(3));
        assert_eq!(found[0].output(), NodeId::from_index(2));
    }

    #[test]
    fn leaves_chains_it_cannot_run_as_one_block() {
        // A negative α makes the output's sign useless as a mask; a lone conv is no chain; the
        // output node cannot sit inside a block; sigmoid is not a rectifier.
        let found = blocks(
            "model m { input 8x8x1
               conv2d(2, kernel=3) leaky_relu(alpha=-0.5)
               conv2d(2, kernel=3) maxpool(2)
               conv2d(2, kernel=1, activation=sigmoid)
               flatten dense(3) batchnorm }",
        );
        let names: Vec<String> = found.iter().map(|b| b.join("+")).collect();
        assert_eq!(names, ["dense+batchnorm"]);
        let kept = {
            let text = "model m { input 4x4x1 conv2d(2, kernel=3) relu }";
            let checked = crate::check(&SourceFile::new("t.cnn", text)).unwrap();
            let graph = &checked.model.graph;
            let conv = NodeId::from_index(1);
            find_blocks(graph, &[conv])
        };
        assert!(kept.is_empty(), "a kept value cannot be inside a block: {kept:?}");
    }
}
