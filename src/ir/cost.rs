//! Cost analysis: parameters (as Keras counts them), FLOPs, activation memory and receptive
//! fields, per node, from a graph and its shapes.
//!
//! FLOP conventions (per sample): a multiply-add counts as 2. Conv2d and dense count
//! 2·MACs plus one add per output for the bias; the backward pass counts the input gradient
//! (2·MACs, zero when nothing upstream needs it: no trainable parameter before the layer) and
//! the weight gradient (2·MACs, plus one add per output for the bias) separately. Memory-bound
//! ops count their arithmetic per element: see [`elementwise_flops`].

use super::{Activation, Graph, NodeId, Op, PoolKind, Shape, ShapeInfo};

/// One parameter tensor of a layer, named and shaped as in Keras (kernels HWIO).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// `kernel`, `bias`, `gamma`, `beta`, `moving_mean`, `moving_variance`
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub trainable: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// FLOPs of one node for one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flops {
    pub forward: u64,
    pub backward_input: u64,
    pub backward_weights: u64,
}

impl std::ops::AddAssign for Flops {
    fn add_assign(&mut self, other: Flops) {
        self.forward = self.forward.saturating_add(other.forward);
        self.backward_input = self.backward_input.saturating_add(other.backward_input);
        self.backward_weights = self.backward_weights.saturating_add(other.backward_weights);
    }
}

/// What a node's output sees of the input image on one axis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Field {
    /// Pixels of the input that one output element depends on.
    pub size: usize,
    /// Distance in input pixels between neighbouring outputs.
    pub jump: usize,
    /// Centre of the first output's field, in input pixel coordinates (may be x.5, or
    /// negative where padding lies before the image).
    pub start: f64,
}

/// The receptive field of a node's output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReceptiveField {
    /// Each output element sees a window: [height, width].
    Local([Field; 2]),
    /// Each output element (after a dense layer) sees every input pixel that reached the
    /// layer: `size` is the extent of the image that can influence it, [height, width].
    Global { size: [usize; 2] },
    /// The model input is flat: there is no image to see.
    None,
}

/// Costs of every node, indexed by node.
#[derive(Debug, Clone, PartialEq)]
pub struct CostInfo {
    params: Vec<Vec<ParamSpec>>,
    flops: Vec<Flops>,
    fields: Vec<ReceptiveField>,
}

impl CostInfo {
    pub fn params(&self, id: NodeId) -> &[ParamSpec] {
        &self.params[id.index()]
    }

    pub fn flops(&self, id: NodeId) -> Flops {
        self.flops[id.index()]
    }

    pub fn receptive_field(&self, id: NodeId) -> ReceptiveField {
        self.fields[id.index()]
    }

    pub fn total_params(&self) -> usize {
        self.params.iter().flatten().map(ParamSpec::numel).sum()
    }

    pub fn trainable_params(&self) -> usize {
        self.params.iter().flatten().filter(|p| p.trainable).map(ParamSpec::numel).sum()
    }
}

/// Bytes of one f32 value.
pub const F32_BYTES: usize = 4;

/// Bytes of a node's output for one sample (f32).
pub fn activation_bytes(shape: Shape) -> usize {
    shape.numel() * F32_BYTES
}

/// The parameters of an op given its input shape, named as Keras names them.
pub fn params(op: &Op, input: Option<Shape>) -> Vec<ParamSpec> {
    let spec = |name, shape: Vec<usize>, trainable| ParamSpec { name, shape, trainable };
    match (op, input) {
        (Op::Conv2d(c), Some(input)) => {
            let mut p =
                vec![spec("kernel", vec![c.kernel[0], c.kernel[1], input.channels(), c.filters], true)];
            if c.bias {
                p.push(spec("bias", vec![c.filters], true));
            }
            p
        }
        (Op::Dense(d), Some(input)) => {
            let mut p = vec![spec("kernel", vec![input.channels(), d.units], true)];
            if d.bias {
                p.push(spec("bias", vec![d.units], true));
            }
            p
        }
        (Op::BatchNorm(_), Some(input)) => {
            let c = input.channels();
            vec![
                spec("gamma", vec![c], true),
                spec("beta", vec![c], true),
                spec("moving_mean", vec![c], false),
                spec("moving_variance", vec![c], false),
            ]
        }
        _ => Vec::new(),
    }
}

/// Arithmetic per element of memory-bound ops: (forward, backward to the input).
/// Transcendentals (exp) count as one.
fn elementwise_flops(op: &Op) -> (u64, u64) {
    match op {
        Op::Activation(Activation::Relu) => (1, 1),
        Op::Activation(Activation::LeakyRelu { .. }) => (2, 2),
        // 1 / (1 + exp(-x)); dy·y·(1 − y)
        Op::Activation(Activation::Sigmoid) => (4, 3),
        Op::Activation(Activation::Tanh) => (4, 3),
        // max, subtract, exp, sum, divide; y ⊙ (dy − Σ dy·y)
        Op::Activation(Activation::Softmax) => (5, 4),
        // training mode: mean (1), variance (3), normalize (2), scale and shift (2)
        Op::BatchNorm(_) => (8, 8),
        Op::Dropout { .. } => (1, 1),
        _ => (0, 0),
    }
}

/// Computes parameters, FLOPs and receptive fields for every node.
pub fn analyze(graph: &Graph, shapes: &ShapeInfo) -> CostInfo {
    let mut info = CostInfo { params: Vec::new(), flops: Vec::new(), fields: Vec::new() };
    // Whether some node before this one has trainable parameters: only then does the
    // backward pass need this node's input gradient.
    let mut trainable_upstream = vec![false; graph.len()];
    for (id, node) in graph.nodes() {
        let input_id = node.inputs.first().copied();
        let input = input_id.map(|i| shapes.shape(i));
        let output = shapes.shape(id);
        let params = params(&node.op, input);
        let needs_input_grad = input_id.is_some_and(|i| trainable_upstream[i.index()]);
        trainable_upstream[id.index()] = needs_input_grad || params.iter().any(|p| p.trainable);

        let flops = node_flops(&node.op, input, output, needs_input_grad);
        let field = match input_id {
            None => match output {
                Shape::Hwc { .. } => ReceptiveField::Local([Field { size: 1, jump: 1, start: 0.0 }; 2]),
                Shape::Flat(_) => ReceptiveField::None,
            },
            Some(i) => next_field(graph, shapes, &node.op, id, info.fields[i.index()]),
        };
        info.params.push(params);
        info.flops.push(flops);
        info.fields.push(field);
    }
    info
}

fn node_flops(op: &Op, input: Option<Shape>, output: Shape, needs_input_grad: bool) -> Flops {
    // Sizes are bounded by shape inference, but their products with kernel areas may still
    // exceed 64 bits for absurd models: counts saturate rather than wrap.
    let out = output.numel() as u64;
    let input_grad = |flops: u64| if needs_input_grad { flops } else { 0 };
    match op {
        Op::Conv2d(c) => {
            let cin = input.map_or(0, |s| s.channels()) as u64;
            let macs = out.saturating_mul((c.kernel[0] * c.kernel[1]) as u64).saturating_mul(cin);
            let bias = if c.bias { out } else { 0 };
            matmul_flops(macs, bias, needs_input_grad)
        }
        Op::Dense(d) => {
            let macs = (input.map_or(0, |s| s.numel()) as u64).saturating_mul(d.units as u64);
            let bias = if d.bias { out } else { 0 };
            matmul_flops(macs, bias, needs_input_grad)
        }
        Op::Pool(p) => {
            let window = (p.size[0] * p.size[1]) as u64;
            let (forward, backward) = match p.kind {
                // compares per window; the gradient goes to one argmax per window
                PoolKind::Max => (out.saturating_mul(window - 1), out),
                // adds and one divide per window; the gradient is spread over the window
                PoolKind::Avg => (out.saturating_mul(window), out.saturating_mul(window)),
            };
            Flops { forward, backward_input: input_grad(backward), backward_weights: 0 }
        }
        Op::BatchNorm(_) => {
            let (f, b) = elementwise_flops(op);
            // dgamma: Σ dy·x̂ (2 per element), dbeta: Σ dy (1 per element)
            Flops { forward: f * out, backward_input: input_grad(b * out), backward_weights: 3 * out }
        }
        Op::Activation(_) | Op::Dropout { .. } => {
            let (f, b) = elementwise_flops(op);
            Flops { forward: f * out, backward_input: input_grad(b * out), backward_weights: 0 }
        }
        Op::Input(_) | Op::Flatten => Flops::default(),
    }
}

/// Conv2d and dense: 2 FLOPs per multiply-add, one add per output for the bias.
fn matmul_flops(macs: u64, bias: u64, needs_input_grad: bool) -> Flops {
    let flops = macs.saturating_mul(2);
    Flops {
        forward: flops.saturating_add(bias),
        backward_input: if needs_input_grad { flops } else { 0 },
        backward_weights: flops.saturating_add(bias),
    }
}

fn next_field(
    graph: &Graph,
    shapes: &ShapeInfo,
    op: &Op,
    id: NodeId,
    previous: ReceptiveField,
) -> ReceptiveField {
    match (op, previous) {
        (Op::Conv2d(_) | Op::Pool(_), ReceptiveField::Local(fields)) => {
            let windows = shapes.window(id).expect("window ops have a window");
            ReceptiveField::Local([0, 1].map(|axis| {
                let (f, w) = (fields[axis], windows[axis]);
                Field {
                    size: f.size.saturating_add((w.kernel - 1).saturating_mul(f.jump)),
                    jump: f.jump.saturating_mul(w.stride),
                    start: f.start + ((w.kernel as f64 - 1.0) / 2.0 - w.pad_before as f64) * f.jump as f64,
                }
            }))
        }
        (Op::Dense(_), ReceptiveField::Local(fields)) => {
            // The union of what every input element sees, clipped to the image.
            let Some(Shape::Hwc { h, w, .. }) = spatial_input(graph, shapes, id) else {
                return ReceptiveField::None;
            };
            let image = image_size(graph, shapes);
            let extent = |f: Field, len: usize, image_len: usize| {
                let half = (f.size as f64 - 1.0) / 2.0;
                let lo = (f.start - half).max(0.0);
                let hi = (f.start + (len - 1) as f64 * f.jump as f64 + half).min(image_len as f64 - 1.0);
                (hi - lo + 1.0).max(0.0) as usize
            };
            ReceptiveField::Global { size: [extent(fields[0], h, image[0]), extent(fields[1], w, image[1])] }
        }
        (_, field) => field,
    }
}

/// The shape of the last spatial (height x width x channels) value before `id`.
fn spatial_input(graph: &Graph, shapes: &ShapeInfo, id: NodeId) -> Option<Shape> {
    let mut node = graph.node(id).inputs.first().copied();
    while let Some(n) = node {
        if let s @ Shape::Hwc { .. } = shapes.shape(n) {
            return Some(s);
        }
        node = graph.node(n).inputs.first().copied();
    }
    None
}

/// [height, width] of the model's input image.
fn image_size(graph: &Graph, shapes: &ShapeInfo) -> [usize; 2] {
    for (id, node) in graph.nodes() {
        if let (Op::Input(_), Shape::Hwc { h, w, .. }) = (&node.op, shapes.shape(id)) {
            return [h, w];
        }
    }
    [0, 0]
}
