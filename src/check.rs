//! Checks that need the whole model: the train block against the model, and lints.
//!
//! Errors here are what cannot train (a loss that does not fit the last layer, a dataset whose
//! images are not the model's input); warnings are legal models that are probably mistakes.

use crate::diagnostic::Diagnostic;
use crate::ir::cost::CostInfo;
use crate::ir::train::{Loss, TrainConfig};
use crate::ir::{Activation, Graph, Op, Shape, ShapeInfo};
use crate::report::group_digits;

/// The share of all parameters above which one dense layer gets a warning.
const DENSE_SHARE_WARNING: f64 = 0.5;

/// Checks the train block against the model. Returns the errors.
pub fn check_train(graph: &Graph, shapes: &ShapeInfo, train: &TrainConfig) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    let output = graph.output().expect("a lowered graph has nodes");
    let input = shapes.shape(graph.input());
    let classes = train.data.map(|d| d.classes);

    if let Some(data) = train.data {
        let [h, w, c] = data.image_shape;
        let image = Shape::Hwc { h, w, c };
        if input != image {
            errors.push(
                Diagnostic::error(format!(
                    "{} images are {image}, but the model's input is {input}",
                    data.name
                ))
                .label(train.span("data"), format!("{} images are {image}", data.name))
                .secondary(graph.layer_of(graph.input()).span, "the model's input")
                .help(format!("use `input {image}`")),
            );
        }
    }

    let Some(loss) = train.loss else {
        errors.push(
            Diagnostic::error("the train block has no loss")
                .label(train.head, "add `loss = …` to this block")
                .help("for a softmax output: loss = categorical_crossentropy"),
        );
        return errors;
    };
    let last_op = &graph.node(output).op;
    let width = shapes.shape(output);
    let last_layer = graph.layer_of(output);
    let loss_span = train.span("loss");
    match loss {
        Loss::CategoricalCrossentropy | Loss::SparseCategoricalCrossentropy => {
            let wanted = classes.map_or("a softmax output".to_string(), |n| {
                format!("a softmax output {n} wide (the dataset's classes)")
            });
            let found = match (last_op, width) {
                (Op::Activation(Activation::Softmax), Shape::Flat(n)) if classes.is_none_or(|c| c == n) => {
                    None
                }
                (Op::Activation(Activation::Softmax), Shape::Flat(n)) => {
                    Some(format!("{} is {n} wide", last_layer.name))
                }
                (Op::Activation(Activation::Softmax), shape) => {
                    Some(format!("{} outputs {shape}, not a vector", last_layer.name))
                }
                _ => Some(format!("{} does not end in softmax", last_layer.name)),
            };
            if let Some(found) = found {
                let help = match classes {
                    Some(n) => format!("end the model with dense({n}, activation=softmax)"),
                    None => "end the model with a dense layer with activation=softmax".into(),
                };
                errors.push(
                    Diagnostic::error(format!("{} needs {wanted}, but {found}", loss.name()))
                        .label(loss_span, format!("needs {wanted}"))
                        .secondary(last_layer.span, found)
                        .help(help),
                );
            }
        }
        Loss::BinaryCrossentropy => {
            let found = match (last_op, width) {
                (Op::Activation(Activation::Sigmoid), Shape::Flat(1)) => None,
                (Op::Activation(Activation::Sigmoid), shape) => {
                    Some(format!("{} outputs {shape}", last_layer.name))
                }
                _ => Some(format!("{} does not end in sigmoid", last_layer.name)),
            };
            if let Some(found) = found {
                errors.push(
                    Diagnostic::error(format!(
                        "binary_crossentropy needs a sigmoid output 1 wide, but {found}"
                    ))
                    .label(loss_span, "needs a sigmoid output 1 wide")
                    .secondary(last_layer.span, found)
                    .help("end the model with dense(1, activation=sigmoid)"),
                );
            }
            if let Some(data) = train.data.filter(|d| d.classes != 2) {
                errors.push(
                    Diagnostic::error(format!(
                        "binary_crossentropy is for two classes, but {} has {}",
                        data.name, data.classes
                    ))
                    .label(loss_span, "needs two classes")
                    .secondary(train.span("data"), format!("{} classes", data.classes))
                    .help(format!(
                        "for {} classes: loss = categorical_crossentropy, and dense({}, activation=softmax) last",
                        data.classes, data.classes
                    )),
                );
            }
        }
    }
    errors
}

/// Warnings about legal models that are probably mistakes.
pub fn lint(graph: &Graph, shapes: &ShapeInfo, costs: &CostInfo) -> Vec<Diagnostic> {
    let mut warnings = Vec::new();
    let nodes: Vec<_> = graph.nodes().collect();
    for pair in nodes.windows(2) {
        let ((a_id, a), (b_id, b)) = (pair[0], pair[1]);
        let (layer_a, layer_b) = (graph.layer_of(a_id), graph.layer_of(b_id));
        let is_softmax = |op: &Op| matches!(op, Op::Activation(Activation::Softmax));
        if is_softmax(&a.op) && is_softmax(&b.op) {
            warnings.push(
                Diagnostic::warning("two softmaxes in a row")
                    .label(graph.span(b_id), "this softmax")
                    .secondary(graph.span(a_id), "follows this one")
                    .note("a softmax of probabilities flattens them towards uniform and slows learning")
                    .help("remove one of them"),
            );
        }
        if matches!(a.op, Op::Dropout { .. }) && matches!(b.op, Op::BatchNorm(_)) {
            warnings.push(
                Diagnostic::warning(format!("{} comes directly before {}", layer_a.name, layer_b.name))
                    .label(layer_b.span, "batchnorm after dropout")
                    .secondary(layer_a.span, "dropout")
                    .note("dropout changes the variance batchnorm learns in training but not at inference (the \"variance shift\")")
                    .help("put dropout after batchnorm, or after the last batchnorm of the model"),
            );
        }
        if matches!((&b.op, shapes.shape(a_id)), (Op::Flatten, Shape::Flat(_))) {
            warnings.push(
                Diagnostic::warning(format!("{} flattens a value that is already flat", layer_b.name))
                    .label(layer_b.span, "does nothing")
                    .help("remove it"),
            );
        }
    }
    let total = costs.total_params();
    let parametric_layers = graph.nodes().filter(|(id, _)| !costs.params(*id).is_empty()).count();
    for (id, node) in graph.nodes() {
        // A model whose only parametric layer is dense has nothing to move the weight to.
        if !matches!(node.op, Op::Dense(_)) || parametric_layers < 2 {
            continue;
        }
        let params: usize = costs.params(id).iter().map(|p| p.numel()).sum();
        if params as f64 > DENSE_SHARE_WARNING * total as f64 {
            let layer = graph.layer_of(id);
            let share = 100.0 * params as f64 / total as f64;
            let input = shapes.shape(node.inputs[0]);
            warnings.push(
                Diagnostic::warning(format!(
                    "{} holds {share:.1}% of the model's parameters ({} of {})",
                    layer.name,
                    group_digits(params as u64),
                    group_digits(total as u64)
                ))
                .label(
                    layer.span,
                    format!(
                        "{} inputs x {} units",
                        group_digits(input.numel() as u64),
                        group_digits(shapes.shape(id).numel() as u64)
                    ),
                )
                .note("a dense layer this large is slow to train and tends to overfit")
                .help("shrink its input with more pooling or strided convolutions before flatten"),
            );
        }
    }
    warnings
}
