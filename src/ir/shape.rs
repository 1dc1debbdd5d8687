//! Shape inference: the static shape of every value, the padding each window op applies, and
//! the input rows and columns a window op never reads.
//!
//! The output-size formula lives here and only here ([`window_output_len`]); the report and
//! the backends use it through [`ShapeInfo`].

use std::fmt;

use super::{Graph, NodeId, Op, Padding};
use crate::diagnostic::Diagnostic;

/// The shape of one sample's value (the batch axis is implicit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// height x width x channels (NHWC without the N)
    Hwc { h: usize, w: usize, c: usize },
    /// A vector: after `flatten` or `dense`.
    Flat(usize),
}

impl Shape {
    pub fn numel(&self) -> usize {
        match *self {
            Shape::Hwc { h, w, c } => h * w * c,
            Shape::Flat(n) => n,
        }
    }

    /// The size of the last axis: channels, or the vector's length.
    pub fn channels(&self) -> usize {
        match *self {
            Shape::Hwc { c, .. } => c,
            Shape::Flat(n) => n,
        }
    }

    pub fn dims(&self) -> Vec<usize> {
        match *self {
            Shape::Hwc { h, w, c } => vec![h, w, c],
            Shape::Flat(n) => vec![n],
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Hwc { h, w, c } => write!(f, "{h}x{w}x{c}"),
            Shape::Flat(n) => write!(f, "{n}"),
        }
    }
}

/// Pixels of padding on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pads {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Pads {
    pub fn as_array(&self) -> [usize; 4] {
        [self.top, self.bottom, self.left, self.right]
    }
}

/// Input rows and columns that a window op never reads: at the end, because `floor` drops
/// what does not fill a last window, and between windows, when the stride exceeds the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ignored {
    pub rows_at_end: usize,
    pub cols_at_end: usize,
    pub rows_between: usize,
    pub cols_between: usize,
}

impl Ignored {
    pub fn any(&self) -> bool {
        *self != Ignored::default()
    }
}

/// The geometry of a window op on one axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub kernel: usize,
    pub stride: usize,
    pub pad_before: usize,
    pub pad_after: usize,
}

/// Everything shape inference learns, indexed by node.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeInfo {
    shapes: Vec<Shape>,
    /// For window ops (conv, pool): the geometry on each axis, [height, width].
    windows: Vec<Option<[Window; 2]>>,
}

impl ShapeInfo {
    pub fn shape(&self, id: NodeId) -> Shape {
        self.shapes[id.index()]
    }

    pub fn window(&self, id: NodeId) -> Option<[Window; 2]> {
        self.windows[id.index()]
    }

    pub fn pads(&self, id: NodeId) -> Option<Pads> {
        self.window(id).map(|[h, w]| Pads {
            top: h.pad_before,
            bottom: h.pad_after,
            left: w.pad_before,
            right: w.pad_after,
        })
    }

    /// What the window op at `id` never reads of its input.
    pub fn ignored(&self, graph: &Graph, id: NodeId) -> Option<Ignored> {
        let [wh, ww] = self.window(id)?;
        let input = self.shape(graph.node(id).inputs[0]);
        let output = self.shape(id);
        let (Shape::Hwc { h: ih, w: iw, .. }, Shape::Hwc { h: oh, w: ow, .. }) = (input, output) else {
            return None;
        };
        let (rows_at_end, rows_between) = ignored_on_axis(ih, oh, wh);
        let (cols_at_end, cols_between) = ignored_on_axis(iw, ow, ww);
        Some(Ignored { rows_at_end, cols_at_end, rows_between, cols_between })
    }
}

/// Output length of a window op on one axis: floor((L + P − K) / S) + 1, with P the total
/// padding. `None` when the kernel does not fit the padded input.
pub fn window_output_len(len: usize, window: Window) -> Option<usize> {
    let padded = len.checked_add(window.pad_before)?.checked_add(window.pad_after)?;
    let span = padded.checked_sub(window.kernel)?;
    Some(span / window.stride + 1)
}

/// Keras/TensorFlow `same` padding on one axis: out = ceil(L / S); the padding needed for
/// that, split with the odd pixel after (bottom/right).
pub fn same_padding(len: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = len.div_ceil(stride);
    let needed = ((out.saturating_sub(1)) * stride + kernel).saturating_sub(len);
    let before = needed / 2;
    (before, needed - before)
}

/// (rows never read at the end, rows never read between windows) on one axis.
fn ignored_on_axis(len: usize, out: usize, w: Window) -> (usize, usize) {
    let padded = len + w.pad_before + w.pad_after;
    let used = (out - 1) * w.stride + w.kernel;
    let at_end = (padded - used).saturating_sub(w.pad_after);
    let between = (out - 1) * w.stride.saturating_sub(w.kernel);
    (at_end, between)
}

fn window_on_axis(len: usize, kernel: usize, stride: usize, padding: Padding, axis: usize) -> Window {
    let (pad_before, pad_after) = match padding {
        Padding::Valid => (0, 0),
        Padding::Same => same_padding(len, kernel, stride),
        Padding::Explicit(p) => (p[axis], p[axis]),
    };
    Window { kernel, stride, pad_before, pad_after }
}

/// The most elements one value (per sample) or one weight tensor may have: 2^32, far beyond
/// any model that fits in memory, and small enough that every later count fits in 64 bits.
pub const MAX_ELEMENTS: usize = 1 << 32;

/// Infers the shape of every node, or explains, with the shape's history, why one cannot be.
pub fn infer_shapes(graph: &Graph) -> Result<ShapeInfo, Diagnostic> {
    let mut info = ShapeInfo { shapes: Vec::new(), windows: Vec::new() };
    for (id, node) in graph.nodes() {
        let input = node.inputs.first().map(|i| info.shape(*i));
        let (shape, window) = match (&node.op, input) {
            (Op::Input(shape), _) => (*shape, None),
            (op, None) => unreachable!("{} has no input", op.name()),
            (Op::Conv2d(conv), Some(input)) => {
                let (h, w, windows) =
                    infer_window(graph, &info, id, input, conv.kernel, conv.stride, conv.padding)?;
                (Shape::Hwc { h, w, c: conv.filters }, Some(windows))
            }
            (Op::Pool(pool), Some(input)) => {
                let (h, w, windows) =
                    infer_window(graph, &info, id, input, pool.size, pool.stride, pool.padding)?;
                (Shape::Hwc { h, w, c: input.channels() }, Some(windows))
            }
            (Op::Dense(dense), Some(Shape::Flat(_))) => (Shape::Flat(dense.units), None),
            (Op::Dense(_), Some(input @ Shape::Hwc { h, w, c })) => {
                let layer = graph.layer_of(id);
                let flat = h
                    .checked_mul(w)
                    .and_then(|hw| hw.checked_mul(c))
                    .map_or("too many".into(), |n| n.to_string());
                return Err(Diagnostic::error(format!(
                    "{} needs a flat input, but its input is {input}",
                    layer.name
                ))
                .label(layer.span, format!("gets {input} here"))
                .note(format!("shape so far: {}", history(graph, &info, id)))
                .help(format!(
                    "add `flatten` before it: {} would then expect {h}·{w}·{c} = {flat} inputs",
                    layer.name
                )));
            }
            (Op::Flatten, Some(input)) => (Shape::Flat(input.numel()), None),
            (Op::BatchNorm(_) | Op::Activation(_) | Op::Dropout { .. }, Some(input)) => (input, None),
        };
        check_size(graph, id, "output", &shape.dims())?;
        if let (Op::Conv2d(conv), Some(input)) = (&node.op, input) {
            let kernel = [conv.kernel[0], conv.kernel[1], input.channels(), conv.filters];
            check_size(graph, id, "kernel", &kernel)?;
        }
        if let (Op::Dense(dense), Some(input)) = (&node.op, input) {
            check_size(graph, id, "kernel", &[input.numel(), dense.units])?;
        }
        info.shapes.push(shape);
        info.windows.push(window);
    }
    Ok(info)
}

/// Rejects a value or weight with more than [`MAX_ELEMENTS`] elements.
fn check_size(graph: &Graph, id: NodeId, what: &str, dims: &[usize]) -> Result<(), Diagnostic> {
    let numel = dims.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
    if numel.is_some_and(|n| n <= MAX_ELEMENTS) {
        return Ok(());
    }
    let layer = graph.layer_of(id);
    let shape = dims.iter().map(usize::to_string).collect::<Vec<_>>().join("x");
    let subject = match graph.node(id).op {
        Op::Input(_) => format!("the input {shape}"),
        _ => format!("{}: its {what} ({shape})", layer.name),
    };
    Err(Diagnostic::error(format!("{subject} has more elements than cnnc supports (2^32)"))
        .label(layer.span, "too large")
        .help("check the sizes, strides and padding of this layer and the ones before it"))
}

fn infer_window(
    graph: &Graph,
    info: &ShapeInfo,
    id: NodeId,
    input: Shape,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: Padding,
) -> Result<(usize, usize, [Window; 2]), Diagnostic> {
    let layer = graph.layer_of(id);
    let op = graph.node(id).op.name();
    let Shape::Hwc { h, w, .. } = input else {
        let who = if layer.name == op { op.to_string() } else { format!("{} ({op})", layer.name) };
        return Err(Diagnostic::error(format!(
            "{who} needs a height x width x channels input, but its input is flat ({input})"
        ))
        .label(layer.span, "gets a flat input here")
        .note(format!("shape so far: {}", history(graph, info, id)))
        .help(format!("move the {op} before `flatten`, or remove it")));
    };
    let windows = [
        window_on_axis(h, kernel[0], stride[0], padding, 0),
        window_on_axis(w, kernel[1], stride[1], padding, 1),
    ];
    // A pooling window must always hold a real pixel (a max over padding alone is -inf), so
    // explicit pool padding is limited to half the window, as in PyTorch. `same` never needs more.
    if let (Op::Pool(_), Padding::Explicit(p)) = (&graph.node(id).op, padding)
        && (p[0] > kernel[0] / 2 || p[1] > kernel[1] / 2)
    {
        return Err(Diagnostic::error(format!(
            "{}: padding {}x{} is more than half the pool size {}x{}",
            layer.name, p[0], p[1], kernel[0], kernel[1]
        ))
        .label(layer.arg_span("padding"), "too much padding for this pool")
        .note("some windows would see only padding")
        .help(format!("use at most {}x{}, or padding=same", kernel[0] / 2, kernel[1] / 2)));
    }
    let (out_h, out_w) = match (window_output_len(h, windows[0]), window_output_len(w, windows[1])) {
        (Some(oh), Some(ow)) => (oh, ow),
        _ => {
            let what = if matches!(graph.node(id).op, Op::Pool(_)) { "pool size" } else { "kernel" };
            let arg = if what == "kernel" { "kernel" } else { "pool" };
            let padded_h = h.saturating_add(windows[0].pad_before).saturating_add(windows[0].pad_after);
            let padded_w = w.saturating_add(windows[1].pad_before).saturating_add(windows[1].pad_after);
            let padded = if padded_h == h && padded_w == w {
                format!("{h}x{w} input")
            } else {
                format!("padded input {padded_h}x{padded_w}")
            };
            return Err(Diagnostic::error(format!(
                "{}: {what} {}x{} is larger than its {padded}",
                layer.name, kernel[0], kernel[1]
            ))
            .label(
                layer.arg_span(arg),
                format!("{}x{} does not fit in {padded_h}x{padded_w}", kernel[0], kernel[1]),
            )
            .note(format!("shape so far: {}", history(graph, info, id)))
            .help(match graph.node(id).op {
                Op::Pool(_) => "use a smaller pool, or remove an earlier pooling layer".to_string(),
                _ => "use padding=same, a smaller kernel, or fewer pooling layers before it".to_string(),
            }));
        }
    };
    Ok((out_h, out_w, windows))
}

/// How the spatial size came to be, from the input to the value that `id` receives:
/// "28→26→13→11→5", or "28x20→26x18" when height and width differ; "→1600" once flat.
pub fn history(graph: &Graph, info: &ShapeInfo, id: NodeId) -> String {
    let mut chain = Vec::new();
    let mut node = graph.node(id).inputs.first().copied();
    while let Some(n) = node {
        chain.push(info.shape(n));
        node = graph.node(n).inputs.first().copied();
    }
    chain.reverse();
    let square = chain.iter().all(|s| !matches!(s, Shape::Hwc { h, w, .. } if h != w));
    let mut parts: Vec<String> = Vec::new();
    for shape in chain {
        let part = match shape {
            Shape::Hwc { h, .. } if square => h.to_string(),
            Shape::Hwc { h, w, .. } => format!("{h}x{w}"),
            Shape::Flat(n) => format!("flat {n}"),
        };
        if parts.last() != Some(&part) {
            parts.push(part);
        }
    }
    parts.join("→")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(kernel: usize, stride: usize, pad_before: usize, pad_after: usize) -> Window {
        Window { kernel, stride, pad_before, pad_after }
    }

    #[test]
    fn output_length_formula() {
        // (len, window, expected)
        let cases = [
            (28, w(3, 1, 0, 0), Some(26)),
            (26, w(2, 2, 0, 0), Some(13)),
            (11, w(2, 2, 0, 0), Some(5)),
            (5, w(3, 2, 1, 1), Some(3)),
            (2, w(3, 1, 0, 0), None),
            (2, w(3, 1, 1, 0), Some(1)),
        ];
        for (len, window, expected) in cases {
            assert_eq!(window_output_len(len, window), expected, "{len} {window:?}");
        }
    }

    #[test]
    fn same_padding_matches_tensorflow() {
        // (len, kernel, stride) → (before, after); TensorFlow puts the odd pixel after.
        let cases = [
            ((28, 3, 1), (1, 1)),
            ((28, 4, 1), (1, 2)),
            ((28, 3, 2), (0, 1)),
            ((27, 3, 2), (1, 1)),
            ((5, 1, 3), (0, 0)),
            ((7, 2, 2), (0, 1)),
        ];
        for ((len, kernel, stride), expected) in cases {
            let pads = same_padding(len, kernel, stride);
            assert_eq!(pads, expected, "len {len} kernel {kernel} stride {stride}");
            let window = w(kernel, stride, pads.0, pads.1);
            assert_eq!(window_output_len(len, window), Some(len.div_ceil(stride)));
        }
    }

    #[test]
    fn ignored_rows() {
        // maxpool 2 on 11 ignores the last row; stride 3 with window 2 skips one row each time.
        assert_eq!(ignored_on_axis(11, 5, w(2, 2, 0, 0)), (1, 0));
        assert_eq!(ignored_on_axis(12, 6, w(2, 2, 0, 0)), (0, 0));
        assert_eq!(ignored_on_axis(9, 3, w(2, 3, 0, 0)), (1, 2));
        assert_eq!(ignored_on_axis(28, 14, w(3, 2, 0, 1)), (0, 0));
    }
}
