//! The model as an IR graph: one node per primitive op, in an arena addressed by [`NodeId`].
//!
//! A source layer may lower to more than one node (`conv2d(…, activation=relu)` is a conv node
//! and a relu node); the [`Layer`] table groups nodes back into the layers the user wrote, for
//! reports. Spans live beside the nodes, never inside them.
//!
//! Architecture invariant: `ir/` does no I/O and knows nothing of text syntax, backends or
//! Cranelift. Analyses ([`infer_shapes`], [`cost::analyze`]) return side tables and never
//! mutate the graph.

pub mod cost;
pub mod fuse;
pub mod lower;
pub mod shape;
pub mod train;

use crate::diagnostic::Span;

pub use shape::{Shape, ShapeInfo, infer_shapes};

/// A typed handle to a node of a [`Graph`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The handle of the node at `index`; for tests and tables indexed by node.
    pub fn from_index(index: usize) -> Self {
        NodeId(index as u32)
    }
}

/// A typed handle to a [`Layer`] of a [`Graph`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerId(u32);

impl LayerId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Every op of the language. Grouped as they behave: the source, ops with parameters, windowed
/// ops, and ops that keep or reshape the value element by element.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    // -- source --
    /// The model input, one sample (batch aside).
    Input(Shape),

    // -- with parameters --
    Conv2d(Conv2d),
    Dense(Dense),
    BatchNorm(BatchNorm),

    // -- windows --
    Pool(Pool),

    // -- element-wise and reshaping --
    Activation(Activation),
    /// Inverted dropout: zero a `rate` fraction in training, identity at inference.
    Dropout {
        rate: f32,
    },
    Flatten,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2d {
    pub filters: usize,
    /// [height, width]
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: Padding,
    pub bias: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dense {
    pub units: usize,
    pub bias: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNorm {
    pub momentum: f32,
    pub epsilon: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    Avg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub kind: PoolKind,
    pub size: [usize; 2],
    pub stride: [usize; 2],
    pub padding: Padding,
}

/// How a window op pads its input. Resolved to pixels per side by shape inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// No padding.
    Valid,
    /// Keras/TensorFlow `same`: out = ceil(in / stride), the odd pixel on the bottom/right.
    Same,
    /// The same number of pixels on both sides of each axis: [height, width].
    Explicit([usize; 2]),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Relu,
    LeakyRelu {
        alpha: f32,
    },
    Sigmoid,
    Tanh,
    /// Over the last axis (channels), as Keras.
    Softmax,
}

impl Activation {
    pub fn name(&self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::LeakyRelu { .. } => "leaky_relu",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
            Activation::Softmax => "softmax",
        }
    }
}

impl Op {
    /// The op's name in messages and IR dumps.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input(_) => "input",
            Op::Conv2d(_) => "conv2d",
            Op::Dense(_) => "dense",
            Op::BatchNorm(_) => "batchnorm",
            Op::Pool(Pool { kind: PoolKind::Max, .. }) => "maxpool",
            Op::Pool(Pool { kind: PoolKind::Avg, .. }) => "avgpool",
            Op::Activation(a) => a.name(),
            Op::Dropout { .. } => "dropout",
            Op::Flatten => "flatten",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub layer: LayerId,
}

/// A layer as the user wrote it, with its Keras name and class.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// Unique in the model: `conv2d`, `conv2d_1`, … or the name given with `as`.
    pub name: String,
    /// The Keras class it corresponds to: `Conv2D`, `MaxPooling2D`, …
    pub class: &'static str,
    pub span: Span,
    /// Spans of the arguments, by name, for errors that are about one of them.
    pub arg_spans: Vec<(&'static str, Span)>,
    /// The nodes this layer lowered to, in order; the last one is the layer's output.
    pub nodes: Vec<NodeId>,
}

impl Layer {
    /// The span of argument `name` if it was written, else of the whole layer.
    pub fn arg_span(&self, name: &str) -> Span {
        self.arg_spans.iter().find(|(n, _)| *n == name).map_or(self.span, |(_, s)| *s)
    }

    pub fn output(&self) -> NodeId {
        *self.nodes.last().expect("a layer has at least one node")
    }
}

/// A forward model graph. Nodes are stored in topological order: every node comes after its
/// inputs, so one pass in index order visits producers before consumers.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    pub name: String,
    nodes: Vec<Node>,
    spans: Vec<Span>,
    layers: Vec<Layer>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph { name: name.into(), nodes: Vec::new(), spans: Vec::new(), layers: Vec::new() }
    }

    /// Starts a new layer; nodes added after this belong to it.
    pub fn add_layer(&mut self, name: String, class: &'static str, span: Span) -> LayerId {
        let id = LayerId(self.layers.len() as u32);
        self.layers.push(Layer { name, class, span, arg_spans: Vec::new(), nodes: Vec::new() });
        id
    }

    pub fn set_arg_spans(&mut self, layer: LayerId, arg_spans: Vec<(&'static str, Span)>) {
        self.layers[layer.index()].arg_spans = arg_spans;
    }

    /// Adds a node to `layer`, reading `inputs`, written at `span`.
    pub fn add_node(&mut self, op: Op, inputs: Vec<NodeId>, layer: LayerId, span: Span) -> NodeId {
        debug_assert!(inputs.iter().all(|i| i.index() < self.nodes.len()), "topological order");
        let id = NodeId(self.nodes.len() as u32);
        self.nodes.push(Node { op, inputs, layer });
        self.spans.push(span);
        self.layers[layer.index()].nodes.push(id);
        id
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    pub fn span(&self, id: NodeId) -> Span {
        self.spans[id.index()]
    }

    pub fn layer(&self, id: LayerId) -> &Layer {
        &self.layers[id.index()]
    }

    pub fn layer_of(&self, id: NodeId) -> &Layer {
        self.layer(self.node(id).layer)
    }

    pub fn nodes(&self) -> impl ExactSizeIterator<Item = (NodeId, &Node)> {
        self.nodes.iter().enumerate().map(|(i, n)| (NodeId(i as u32), n))
    }

    pub fn layers(&self) -> impl ExactSizeIterator<Item = (LayerId, &Layer)> {
        self.layers.iter().enumerate().map(|(i, l)| (LayerId(i as u32), l))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The model's input node: the first one.
    pub fn input(&self) -> NodeId {
        NodeId(0)
    }

    /// The node whose value is the model's output: the last one.
    pub fn output(&self) -> Option<NodeId> {
        self.nodes.len().checked_sub(1).map(|i| NodeId(i as u32))
    }

    /// The layers that are not the input, in order.
    pub fn model_layers(&self) -> impl Iterator<Item = (LayerId, &Layer)> {
        self.layers().filter(|(_, l)| !matches!(self.node(l.nodes[0]).op, Op::Input(_)))
    }
}

/// The IR as text, one node a line: `%3 = maxpool(%2) size=2x2 stride=2x2 padding=valid  # max_pooling2d`.
/// A fused block (see [`fuse`]) is one line at its output node, its ops joined by `+`:
/// `%3 = conv2d+batchnorm+relu(%0) filters=32 … momentum=0.99 epsilon=0.001 : (26,26,32)  # conv2d, …`.
pub fn dump(graph: &Graph, shapes: Option<&ShapeInfo>, blocks: &[fuse::Block]) -> String {
    use std::fmt::Write as _;
    let mut out = format!("graph {} {{\n", graph.name);
    for (id, _) in graph.nodes() {
        let members: Vec<NodeId> = match blocks.iter().find(|b| b.nodes().any(|n| n == id)) {
            Some(block) if block.output() != id => continue,
            Some(block) => block.nodes().collect(),
            None => vec![id],
        };
        let first = graph.node(members[0]);
        let inputs: Vec<String> = first.inputs.iter().map(|i| format!("%{}", i.index())).collect();
        let names: Vec<&str> = members.iter().map(|m| graph.node(*m).op.name()).collect();
        let attrs: String = members.iter().map(|m| op_attributes(&graph.node(*m).op)).collect();
        let mut layers: Vec<&str> = members.iter().map(|m| graph.layer_of(*m).name.as_str()).collect();
        layers.dedup();
        let shape = shapes.map_or(String::new(), |s| format!(" : {}", s.shape(id)));
        let _ = writeln!(
            out,
            "  %{} = {}({}){attrs}{shape}  # {}",
            id.index(),
            names.join("+"),
            inputs.join(", "),
            layers.join(", ")
        );
    }
    out.push_str("}\n");
    out
}

/// An op's attributes as the IR dump shows them, each with a leading space.
fn op_attributes(op: &Op) -> String {
    match op {
        Op::Input(shape) => format!(" {shape}"),
        Op::Conv2d(c) => format!(
            " filters={} kernel={}x{} stride={}x{} padding={} bias={}",
            c.filters,
            c.kernel[0],
            c.kernel[1],
            c.stride[0],
            c.stride[1],
            padding_text(c.padding),
            c.bias
        ),
        Op::Dense(d) => format!(" units={} bias={}", d.units, d.bias),
        Op::BatchNorm(b) => format!(" momentum={} epsilon={}", b.momentum, b.epsilon),
        Op::Pool(p) => format!(
            " size={}x{} stride={}x{} padding={}",
            p.size[0],
            p.size[1],
            p.stride[0],
            p.stride[1],
            padding_text(p.padding)
        ),
        Op::Activation(Activation::LeakyRelu { alpha }) => format!(" alpha={alpha}"),
        Op::Dropout { rate } => format!(" rate={rate}"),
        Op::Activation(_) | Op::Flatten => String::new(),
    }
}

fn padding_text(padding: Padding) -> String {
    match padding {
        Padding::Valid => "valid".into(),
        Padding::Same => "same".into(),
        Padding::Explicit([h, w]) => format!("{h}x{w}"),
    }
}
