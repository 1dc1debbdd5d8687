//! Lowering: AST → IR [`Graph`] (and the train block → [`TrainConfig`]).
//!
//! This is where the language's words are known: which layers exist, which arguments each
//! takes, their defaults and ranges, and the Keras names of layers. Every problem found is
//! reported, not just the first, each pointing at the text it is about.

use std::collections::HashMap;

use super::train::{TrainConfig, lower_train};
use super::{
    Activation, BatchNorm, Conv2d, Dense, Graph, LayerId, NodeId, Op, Padding, Pool, PoolKind, Shape,
};
use crate::diagnostic::{Diagnostic, Span};
use crate::syntax::ast::{self, Arg, LayerCall, Statement, Value, ValueKind};
use crate::syntax::suggest::{did_you_mean, suggest};

/// A lowered `.cnn` file: the model graph and, if the file has one, its training setup.
#[derive(Debug, Clone)]
pub struct Model {
    pub graph: Graph,
    pub train: Option<TrainConfig>,
}

/// Lowers a parsed file. Returns every error found.
pub fn lower(file: &ast::File) -> Result<Model, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let model = match file.models.as_slice() {
        [] => {
            errors.push(
                Diagnostic::error("the file has no model block")
                    .label(file.end, "expected `model NAME { … }`")
                    .help("a .cnn file describes one model: model mnist { input 28x28x1 … }"),
            );
            None
        }
        [model, rest @ ..] => {
            for extra in rest {
                errors.push(
                    Diagnostic::error("a .cnn file describes one model, but this one has two")
                        .label(extra.head, "second model block")
                        .secondary(model.head, "first model block"),
                );
            }
            Some(model)
        }
    };
    for extra in file.trains.iter().skip(1) {
        errors.push(
            Diagnostic::error("the file has more than one train block")
                .label(extra.head, "second train block")
                .secondary(file.trains[0].head, "first train block"),
        );
    }
    let train = match file.trains.first().map(lower_train) {
        Some(Ok(train)) => Some(train),
        Some(Err(mut e)) => {
            errors.append(&mut e);
            None
        }
        None => None,
    };
    let graph = match model.map(lower_model) {
        Some(Ok(graph)) => Some(graph),
        Some(Err(mut e)) => {
            errors.append(&mut e);
            None
        }
        None => None,
    };
    match graph {
        Some(graph) if errors.is_empty() => Ok(Model { graph, train }),
        _ => {
            errors.sort_by_key(|d| d.labels.iter().find(|l| l.primary).map(|l| l.span.start));
            Err(errors)
        }
    }
}

/// The layers of the language, the Keras class each corresponds to, and its name stem.
const LAYERS: &[(&str, &str, &str)] = &[
    ("conv2d", "Conv2D", "conv2d"),
    ("maxpool", "MaxPooling2D", "max_pooling2d"),
    ("avgpool", "AveragePooling2D", "average_pooling2d"),
    ("batchnorm", "BatchNormalization", "batch_normalization"),
    ("relu", "Activation", "activation"),
    ("leaky_relu", "LeakyReLU", "leaky_re_lu"),
    ("sigmoid", "Activation", "activation"),
    ("tanh", "Activation", "activation"),
    ("softmax", "Activation", "activation"),
    ("dropout", "Dropout", "dropout"),
    ("flatten", "Flatten", "flatten"),
    ("dense", "Dense", "dense"),
];

const ACTIVATIONS: &[&str] = &["relu", "leaky_relu", "sigmoid", "tanh", "softmax", "linear"];

/// Keras's default slope for `LeakyReLU()` layers and for `activation="leaky_relu"`.
const LEAKY_LAYER_ALPHA: f64 = 0.3;
const LEAKY_ACTIVATION_ALPHA: f64 = 0.2;

fn lower_model(block: &ast::ModelBlock) -> Result<Graph, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let mut graph = Graph::new(block.name.name.clone());

    let mut statements = block.statements.iter();
    let mut input_span = block.head;
    let input_shape = match statements.next() {
        Some(Statement::Input { value, span }) => {
            input_span = *span;
            input_shape(value).map_err(|e| errors.push(e)).ok()
        }
        other => {
            let span = match other {
                Some(Statement::Layer(layer)) => layer.span,
                _ => block.head,
            };
            errors.push(
                Diagnostic::error(format!("model `{}` has no input line", block.name.name))
                    .label(span, "expected `input HEIGHTxWIDTHxCHANNELS` before the first layer")
                    .help("start the model with its input shape: input 28x28x1"),
            );
            None
        }
    };
    let layers: Vec<&LayerCall> = statements
        .filter_map(|s| match s {
            Statement::Layer(layer) => Some(layer),
            Statement::Input { span, .. } => {
                errors.push(
                    Diagnostic::error("a model has one input line, at its start")
                        .label(*span, "another input line")
                        .help("remove this line"),
                );
                None
            }
        })
        .collect();
    if layers.is_empty() && input_shape.is_some() {
        errors.push(
            Diagnostic::error(format!("model `{}` has no layers", block.name.name))
                .label(block.head, "add layers after the input line"),
        );
    }

    let names = layer_names(&layers, &mut errors);
    let input_layer = graph.add_layer("input_layer".into(), "InputLayer", input_span);
    let mut previous =
        graph.add_node(Op::Input(input_shape.unwrap_or(Shape::Flat(1))), vec![], input_layer, input_span);
    for (call, name) in layers.iter().zip(names) {
        match lower_layer(&mut graph, call, name, previous) {
            Ok(Some(output)) => previous = output,
            Ok(None) => {}
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() { Ok(graph) } else { Err(errors) }
}

fn input_shape(value: &Value) -> Result<Shape, Diagnostic> {
    let shape = match &value.kind {
        ValueKind::Dims(d) if d.len() == 3 => {
            let [h, w, c] = [d[0], d[1], d[2]].map(|x| usize::try_from(x).unwrap_or(usize::MAX));
            Shape::Hwc { h, w, c }
        }
        ValueKind::Dims(d) if d.len() == 2 => {
            return Err(Diagnostic::error("the input shape needs a channel count")
                .label(value.span, "height x width, but no channels")
                .help(format!("write {}x{}x1 for a grayscale image", d[0], d[1])));
        }
        ValueKind::Int(n) if *n > 0 => Shape::Flat(*n as usize),
        _ => {
            return Err(Diagnostic::error("the input shape must be HEIGHTxWIDTHxCHANNELS")
                .label(value.span, format!("found {}", value.kind.describe()))
                .help("for 28x28 grayscale images: input 28x28x1"));
        }
    };
    if shape.dims().contains(&0) {
        return Err(Diagnostic::error(format!("the input shape {shape} has a zero size"))
            .label(value.span, "every size must be at least 1"));
    }
    Ok(shape)
}

/// Names every layer: the name given with `as`, else Keras's (`conv2d`, `conv2d_1`, …),
/// skipping names that a layer took with `as`.
fn layer_names(layers: &[&LayerCall], errors: &mut Vec<Diagnostic>) -> Vec<String> {
    let mut taken: HashMap<&str, Span> = HashMap::new();
    taken.insert("input_layer", Span::default());
    for alias in layers.iter().filter_map(|l| l.alias.as_ref()) {
        if let Some(first) = taken.get(alias.name.as_str()) {
            let mut d = Diagnostic::error(format!("two layers are named `{}`", alias.name))
                .label(alias.span, "second use of the name");
            if *first != Span::default() {
                d = d.secondary(*first, "first use");
            }
            errors.push(d.help("layer names must be unique"));
        } else {
            taken.insert(&alias.name, alias.span);
        }
    }
    let mut counters: HashMap<&str, usize> = HashMap::new();
    layers
        .iter()
        .map(|layer| {
            if let Some(alias) = &layer.alias {
                return alias.name.clone();
            }
            let stem = LAYERS
                .iter()
                .find(|(word, ..)| *word == layer.name.name)
                .map_or("layer", |(_, _, stem)| *stem);
            loop {
                let count = counters.entry(stem).or_insert(0);
                let name = if *count == 0 { stem.to_string() } else { format!("{stem}_{count}") };
                *count += 1;
                if !taken.contains_key(name.as_str()) {
                    return name;
                }
            }
        })
        .collect()
}

/// Lowers one layer, appending its nodes after `input`. Returns the layer's output node.
fn lower_layer(
    graph: &mut Graph,
    call: &LayerCall,
    name: String,
    input: NodeId,
) -> Result<Option<NodeId>, Vec<Diagnostic>> {
    let word = call.name.name.as_str();
    let Some(&(_, class, _)) = LAYERS.iter().find(|(w, ..)| *w == word) else {
        let known: Vec<&str> = LAYERS.iter().map(|(w, ..)| *w).collect();
        let mut d = Diagnostic::error(format!("unknown layer `{word}`"));
        let suggestion = suggest(word, &known);
        d = match &suggestion {
            Some(s) => d.label(call.name.span, did_you_mean(s)),
            None => d.label(call.name.span, "not a layer of the language"),
        };
        let mut errors = vec![d.note(format!("the layers are: {}", known.join(", ")))];
        // Check the arguments as the suggested layer's, so that `Conv2D(32, kernel_size=3)`
        // learns about `kernel` in the same run.
        if let Some(s) = suggestion {
            let (params, positional) = layer_params(&s);
            if let Err(mut e) = Args::bind(&s, &call.args, params, positional) {
                errors.append(&mut e);
            }
        }
        return Err(errors);
    };
    let (params, positional) = layer_params(word);
    let args = Args::bind(word, &call.args, params, positional)?;
    let mut errors = Vec::new();

    let layer = graph.add_layer(name, class, call.span);
    graph.set_arg_spans(layer, args.spans());
    let span = call.span;
    let output = match word {
        "conv2d" => {
            let filters = keep(
                &mut errors,
                args.required(call, "filters", "the number of filters", "conv2d(32, kernel=3)")
                    .and_then(|v| positive_int(v, "filters")),
            );
            let kernel = keep(
                &mut errors,
                args.required(call, "kernel", "a kernel size", "conv2d(32, kernel=3)")
                    .and_then(|v| size_pair(v, "kernel")),
            );
            let stride = keep(&mut errors, args.get("stride").map_or(Ok([1, 1]), |v| size_pair(v, "stride")));
            let padding = keep(&mut errors, args.get("padding").map_or(Ok(Padding::Valid), padding));
            let activation = keep(
                &mut errors,
                args.get("activation").map_or(Ok(None), |v| activation(v, LEAKY_ACTIVATION_ALPHA)),
            );
            let bias = keep(&mut errors, args.get("bias").map_or(Ok(true), |v| boolean(v, "bias")));
            match (filters, kernel, stride, padding, activation, bias) {
                (Some(filters), Some(kernel), Some(stride), Some(padding), Some(act), Some(bias)) => {
                    let conv = Conv2d { filters, kernel, stride, padding, bias };
                    let node = graph.add_node(Op::Conv2d(conv), vec![input], layer, span);
                    Some(add_activation(graph, node, act, layer, args.span_of("activation", span)))
                }
                _ => None,
            }
        }
        "maxpool" | "avgpool" => {
            let kind = if word == "maxpool" { PoolKind::Max } else { PoolKind::Avg };
            let size = keep(&mut errors, args.get("pool").map_or(Ok([2, 2]), |v| size_pair(v, "pool")));
            let stride = keep(
                &mut errors,
                args.get("stride").map_or(Ok(size.unwrap_or([1, 1])), |v| size_pair(v, "stride")),
            );
            let padding = keep(&mut errors, args.get("padding").map_or(Ok(Padding::Valid), padding));
            match (size, stride, padding) {
                (Some(size), Some(stride), Some(padding)) => {
                    let pool = Pool { kind, size, stride, padding };
                    Some(graph.add_node(Op::Pool(pool), vec![input], layer, span))
                }
                _ => None,
            }
        }
        "batchnorm" => {
            let momentum = keep(
                &mut errors,
                args.get("momentum")
                    .map_or(Ok(0.99), |v| number_in(v, "momentum", 0.0..=1.0, "between 0 and 1")),
            );
            let epsilon =
                keep(&mut errors, args.get("epsilon").map_or(Ok(1e-3), |v| positive_number(v, "epsilon")));
            match (momentum, epsilon) {
                (Some(m), Some(e)) => {
                    let bn = BatchNorm { momentum: m as f32, epsilon: e as f32 };
                    Some(graph.add_node(Op::BatchNorm(bn), vec![input], layer, span))
                }
                _ => None,
            }
        }
        "relu" | "sigmoid" | "tanh" | "softmax" | "leaky_relu" => {
            let alpha = keep(
                &mut errors,
                args.get("alpha").map_or(Ok(LEAKY_LAYER_ALPHA), |v| finite_number(v, "alpha")),
            );
            alpha.map(|alpha| {
                let act = activation_by_name(word, alpha).expect("a layer word is an activation");
                graph.add_node(Op::Activation(act), vec![input], layer, span)
            })
        }
        "dropout" => {
            let rate = keep(
                &mut errors,
                args.required(call, "rate", "a rate", "dropout(0.5)")
                    .and_then(|v| number_in(v, "the dropout rate", 0.0..1.0, "at least 0 and less than 1")),
            );
            rate.map(|rate| graph.add_node(Op::Dropout { rate: rate as f32 }, vec![input], layer, span))
        }
        "flatten" => Some(graph.add_node(Op::Flatten, vec![input], layer, span)),
        "dense" => {
            let units = keep(
                &mut errors,
                args.required(call, "units", "a number of units", "dense(10)")
                    .and_then(|v| positive_int(v, "units")),
            );
            let activation = keep(
                &mut errors,
                args.get("activation").map_or(Ok(None), |v| activation(v, LEAKY_ACTIVATION_ALPHA)),
            );
            let bias = keep(&mut errors, args.get("bias").map_or(Ok(true), |v| boolean(v, "bias")));
            match (units, activation, bias) {
                (Some(units), Some(act), Some(bias)) => {
                    let node = graph.add_node(Op::Dense(Dense { units, bias }), vec![input], layer, span);
                    Some(add_activation(graph, node, act, layer, args.span_of("activation", span)))
                }
                _ => None,
            }
        }
        _ => unreachable!("every word of LAYERS is lowered"),
    };
    if errors.is_empty() { Ok(output) } else { Err(errors) }
}

/// The arguments a layer takes, and which of them may be given by position.
fn layer_params(word: &str) -> (&'static [&'static str], &'static [&'static str]) {
    match word {
        "conv2d" => (&["filters", "kernel", "stride", "padding", "activation", "bias"], &["filters"]),
        "maxpool" | "avgpool" => (&["pool", "stride", "padding"], &["pool"]),
        "batchnorm" => (&["momentum", "epsilon"], &[]),
        "leaky_relu" => (&["alpha"], &["alpha"]),
        "dropout" => (&["rate"], &["rate"]),
        "dense" => (&["units", "activation", "bias"], &["units"]),
        _ => (&[], &[]),
    }
}

/// The value of `result`, or `None` with its error kept for the report.
fn keep<T>(errors: &mut Vec<Diagnostic>, result: Result<T, Diagnostic>) -> Option<T> {
    result.map_err(|e| errors.push(e)).ok()
}

fn add_activation(
    graph: &mut Graph,
    node: NodeId,
    activation: Option<Activation>,
    layer: LayerId,
    span: Span,
) -> NodeId {
    match activation {
        Some(act) => graph.add_node(Op::Activation(act), vec![node], layer, span),
        None => node,
    }
}

/// A layer's arguments, matched to its parameter names.
struct Args<'a> {
    bound: Vec<(&'static str, &'a Arg)>,
}

impl<'a> Args<'a> {
    /// Matches positional arguments to `positional` and named ones to `params`, reporting
    /// unknown, duplicate and surplus arguments.
    fn bind(
        layer: &str,
        args: &'a [Arg],
        params: &[&'static str],
        positional: &[&'static str],
    ) -> Result<Self, Vec<Diagnostic>> {
        let mut bound: Vec<(&'static str, &'a Arg)> = Vec::new();
        let mut errors = Vec::new();
        let mut next_positional = positional.iter();
        for arg in args {
            let param = match &arg.name {
                None => match next_positional.next() {
                    Some(p) => *p,
                    None => {
                        let takes = match positional {
                            [] => format!("{layer} takes no positional arguments"),
                            [p] => format!("{layer} takes one positional argument ({p})"),
                            _ => format!("{layer} takes {} positional arguments", positional.len()),
                        };
                        let mut d = Diagnostic::error(format!("too many arguments for {layer}"))
                            .label(arg.span, takes);
                        if !params.is_empty() {
                            d = d.help(format!(
                                "name the others: {}",
                                params.iter().map(|p| format!("{p}=…")).collect::<Vec<_>>().join(", ")
                            ));
                        }
                        errors.push(d);
                        continue;
                    }
                },
                Some(name) => match params.iter().find(|p| **p == name.name) {
                    Some(p) => *p,
                    None => {
                        let mut d = Diagnostic::error(format!("{layer} has no argument `{}`", name.name));
                        d = match suggest(&name.name, params) {
                            Some(s) => d.label(name.span, did_you_mean(&s)),
                            None => d.label(name.span, "unknown argument"),
                        };
                        errors.push(if params.is_empty() {
                            d.note(format!("{layer} takes no arguments"))
                        } else {
                            d.note(format!("{layer} takes: {}", params.join(", ")))
                        });
                        continue;
                    }
                },
            };
            if let Some((_, first)) = bound.iter().find(|(p, _)| *p == param) {
                errors.push(
                    Diagnostic::error(format!("`{param}` is given twice"))
                        .label(arg.span, "given again here")
                        .secondary(first.span, "first given here"),
                );
                continue;
            }
            bound.push((param, arg));
        }
        if errors.is_empty() { Ok(Args { bound }) } else { Err(errors) }
    }

    fn get(&self, param: &str) -> Option<&'a Value> {
        self.bound.iter().find(|(p, _)| *p == param).map(|(_, a)| &a.value)
    }

    fn span_of(&self, param: &str, default: Span) -> Span {
        self.bound.iter().find(|(p, _)| *p == param).map_or(default, |(_, a)| a.span)
    }

    fn spans(&self) -> Vec<(&'static str, Span)> {
        self.bound.iter().map(|(p, a)| (*p, a.span)).collect()
    }

    fn required(
        &self,
        call: &LayerCall,
        param: &str,
        what: &str,
        example: &str,
    ) -> Result<&'a Value, Diagnostic> {
        self.get(param).ok_or_else(|| {
            Diagnostic::error(format!("{} needs {what}", call.name.name))
                .label(call.span, format!("`{param}` is missing"))
                .help(format!("for example: {example}"))
        })
    }
}

// -- value conversions, shared with the train block --

pub(super) fn positive_int(value: &Value, what: &str) -> Result<usize, Diagnostic> {
    match value.kind {
        ValueKind::Int(n) if n >= 1 => usize::try_from(n).map_err(|_| too_large(value, what)),
        ValueKind::Int(n) => Err(Diagnostic::error(format!("{what} must be at least 1, got {n}"))
            .label(value.span, "must be a positive whole number")),
        _ => Err(wrong_kind(value, what, "a whole number")),
    }
}

fn too_large(value: &Value, what: &str) -> Diagnostic {
    Diagnostic::error(format!("{what} is too large")).label(value.span, "too large")
}

pub(super) fn wrong_kind(value: &Value, what: &str, expected: &str) -> Diagnostic {
    Diagnostic::error(format!("{what} must be {expected}, got {}", value.kind.show()))
        .label(value.span, format!("expected {expected}"))
}

/// `3` → [3, 3]; `3x5` → [3, 5] (height x width).
fn size_pair(value: &Value, what: &str) -> Result<[usize; 2], Diagnostic> {
    let pair = match &value.kind {
        ValueKind::Int(_) => {
            let k = positive_int(value, what)?;
            [k, k]
        }
        ValueKind::Dims(d) if d.len() == 2 => {
            if d.contains(&0) {
                return Err(Diagnostic::error(format!("{what} must be at least 1 on each axis"))
                    .label(value.span, "has a zero size"));
            }
            let h = usize::try_from(d[0]).map_err(|_| too_large(value, what))?;
            let w = usize::try_from(d[1]).map_err(|_| too_large(value, what))?;
            [h, w]
        }
        _ => return Err(wrong_kind(value, what, "a size like 3 or 3x5")),
    };
    Ok(pair)
}

fn padding(value: &Value) -> Result<Padding, Diagnostic> {
    match &value.kind {
        ValueKind::Ident(word) if word == "valid" => Ok(Padding::Valid),
        ValueKind::Ident(word) if word == "same" => Ok(Padding::Same),
        ValueKind::Ident(word) => {
            let mut d = Diagnostic::error(format!("unknown padding `{word}`"));
            d = match suggest(word, &["valid", "same"]) {
                Some(s) => d.label(value.span, did_you_mean(&s)),
                None => d.label(value.span, "expected valid, same, or a number of pixels"),
            };
            Err(d)
        }
        ValueKind::Int(p) if *p >= 0 => Ok(Padding::Explicit([*p as usize; 2])),
        ValueKind::Int(p) => Err(Diagnostic::error(format!("padding must not be negative, got {p}"))
            .label(value.span, "negative padding")),
        ValueKind::Dims(d) if d.len() == 2 => {
            let h = usize::try_from(d[0]).map_err(|_| too_large(value, "padding"))?;
            let w = usize::try_from(d[1]).map_err(|_| too_large(value, "padding"))?;
            Ok(Padding::Explicit([h, w]))
        }
        _ => Err(wrong_kind(value, "padding", "valid, same, a number of pixels or HxW")),
    }
}

/// `activation=…`: `None` for `linear`.
fn activation(value: &Value, default_alpha: f64) -> Result<Option<Activation>, Diagnostic> {
    let (word, alpha) = match &value.kind {
        ValueKind::Ident(word) => (word, default_alpha),
        ValueKind::Call { name, args } if name.name == "leaky_relu" => {
            let bound =
                Args::bind("leaky_relu", args, &["alpha"], &["alpha"]).map_err(|mut e| e.remove(0))?;
            let alpha = bound.get("alpha").map_or(Ok(default_alpha), |v| finite_number(v, "alpha"))?;
            (&name.name, alpha)
        }
        _ => {
            return Err(wrong_kind(value, "activation", "an activation such as relu"));
        }
    };
    if word == "linear" {
        return Ok(None);
    }
    activation_by_name(word, alpha).map(Some).ok_or_else(|| {
        let mut d = Diagnostic::error(format!("unknown activation `{word}`"));
        d = match suggest(word, ACTIVATIONS) {
            Some(s) => d.label(value.span, did_you_mean(&s)),
            None => d.label(value.span, "not an activation"),
        };
        d.note(format!("the activations are: {}", ACTIVATIONS.join(", ")))
    })
}

fn activation_by_name(word: &str, alpha: f64) -> Option<Activation> {
    Some(match word {
        "relu" => Activation::Relu,
        "leaky_relu" => Activation::LeakyRelu { alpha: alpha as f32 },
        "sigmoid" => Activation::Sigmoid,
        "tanh" => Activation::Tanh,
        "softmax" => Activation::Softmax,
        _ => return None,
    })
}

fn boolean(value: &Value, what: &str) -> Result<bool, Diagnostic> {
    match &value.kind {
        ValueKind::Ident(w) if w == "true" => Ok(true),
        ValueKind::Ident(w) if w == "false" => Ok(false),
        _ => Err(wrong_kind(value, what, "true or false")),
    }
}

pub(super) fn finite_number(value: &Value, what: &str) -> Result<f64, Diagnostic> {
    match value.kind {
        ValueKind::Int(n) => Ok(n as f64),
        ValueKind::Float(x) => Ok(x),
        _ => Err(wrong_kind(value, what, "a number")),
    }
}

pub(super) fn positive_number(value: &Value, what: &str) -> Result<f64, Diagnostic> {
    let x = finite_number(value, what)?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err(Diagnostic::error(format!("{what} must be greater than 0, got {x}"))
            .label(value.span, "must be positive"))
    }
}

pub(super) fn number_in(
    value: &Value,
    what: &str,
    range: impl std::ops::RangeBounds<f64>,
    words: &str,
) -> Result<f64, Diagnostic> {
    let x = finite_number(value, what)?;
    if range.contains(&x) {
        Ok(x)
    } else {
        Err(Diagnostic::error(format!("{what} must be {words}, got {x}"))
            .label(value.span, format!("must be {words}")))
    }
}
