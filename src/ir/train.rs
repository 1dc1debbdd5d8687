//! The train block: dataset, loss, optimizer and loop settings, with Keras's defaults.
//!
//! Values are range-checked here; whether they fit the model (the loss against the last layer,
//! the dataset against the input) is [`crate::check`]'s job.

use super::lower::{number_in, positive_int, positive_number, wrong_kind};
use crate::data::{self, DatasetInfo};
use crate::diagnostic::{Diagnostic, Span};
use crate::syntax::ast::{self, Value, ValueKind};
use crate::syntax::suggest::{did_you_mean, suggest};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    CategoricalCrossentropy,
    SparseCategoricalCrossentropy,
    BinaryCrossentropy,
}

impl Loss {
    pub fn name(self) -> &'static str {
        match self {
            Loss::CategoricalCrossentropy => "categorical_crossentropy",
            Loss::SparseCategoricalCrossentropy => "sparse_categorical_crossentropy",
            Loss::BinaryCrossentropy => "binary_crossentropy",
        }
    }
}

const LOSSES: &[Loss] =
    &[Loss::CategoricalCrossentropy, Loss::SparseCategoricalCrossentropy, Loss::BinaryCrossentropy];

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    Sgd { lr: f32, momentum: f32 },
    Adam { lr: f32, beta1: f32, beta2: f32, epsilon: f32 },
}

/// Keras's defaults.
pub const SGD_DEFAULT_LR: f64 = 0.01;
pub const ADAM_DEFAULT_LR: f64 = 0.001;

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// `None` when the file names no dataset (a model for benchmarks only).
    pub data: Option<&'static DatasetInfo>,
    pub loss: Option<Loss>,
    pub optimizer: Optimizer,
    pub batch_size: usize,
    pub epochs: usize,
    pub validation_split: f32,
    pub seed: u64,
    /// The `train` keyword, and each entry by key, for messages about them.
    pub head: Span,
    pub spans: Vec<(&'static str, Span)>,
}

impl TrainConfig {
    /// The span of the entry `key` if written, else of the `train` keyword.
    pub fn span(&self, key: &str) -> Span {
        self.spans.iter().find(|(k, _)| *k == key).map_or(self.head, |(_, s)| *s)
    }
}

const KEYS: &[&str] = &["data", "loss", "optimizer", "batch_size", "epochs", "validation_split", "seed"];

pub(super) fn lower_train(block: &ast::TrainBlock) -> Result<TrainConfig, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let mut config = TrainConfig {
        data: None,
        loss: None,
        optimizer: Optimizer::Adam { lr: ADAM_DEFAULT_LR as f32, beta1: 0.9, beta2: 0.999, epsilon: 1e-7 },
        batch_size: 32,
        epochs: 1,
        validation_split: 0.0,
        seed: 0,
        head: block.head,
        spans: Vec::new(),
    };
    for entry in &block.entries {
        let key = entry.key.name.as_str();
        let Some(&key) = KEYS.iter().find(|k| **k == key) else {
            let mut d = Diagnostic::error(format!("unknown train setting `{key}`"));
            d = match suggest(key, KEYS) {
                Some(s) => d.label(entry.key.span, did_you_mean(&s)),
                None => d.label(entry.key.span, "unknown setting"),
            };
            errors.push(d.note(format!("the settings are: {}", KEYS.join(", "))));
            continue;
        };
        if let Some((_, first)) = config.spans.iter().find(|(k, _)| *k == key) {
            errors.push(
                Diagnostic::error(format!("`{key}` is set twice"))
                    .label(entry.span, "set again here")
                    .secondary(*first, "first set here"),
            );
            continue;
        }
        config.spans.push((key, entry.span));
        let value = &entry.value;
        let result = match key {
            "data" => dataset(value).map(|d| config.data = Some(d)),
            "loss" => loss(value).map(|l| config.loss = Some(l)),
            "optimizer" => optimizer(value).map(|o| config.optimizer = o),
            "batch_size" => positive_int(value, "batch_size").map(|b| config.batch_size = b),
            "epochs" => positive_int(value, "epochs").map(|e| config.epochs = e),
            "validation_split" => {
                number_in(value, "validation_split", 0.0..1.0, "at least 0 and less than 1")
                    .map(|v| config.validation_split = v as f32)
            }
            "seed" => match value.kind {
                ValueKind::Int(n) if n >= 0 => {
                    let _: () = config.seed = n as u64;
                    Ok(())
                }
                ValueKind::Int(n) => Err(Diagnostic::error(format!("seed must be 0 or more, got {n}"))
                    .label(value.span, "negative seed")),
                _ => Err(wrong_kind(value, "seed", "a whole number")),
            },
            _ => unreachable!("every key is handled"),
        };
        if let Err(e) = result {
            errors.push(e);
        }
    }
    if errors.is_empty() { Ok(config) } else { Err(errors) }
}

fn word<'a>(value: &'a Value, what: &str, expected: &str) -> Result<&'a str, Diagnostic> {
    match &value.kind {
        ValueKind::Ident(w) => Ok(w),
        _ => Err(wrong_kind(value, what, expected)),
    }
}

fn unknown(value: &Value, what: &str, word: &str, known: &[&str]) -> Diagnostic {
    let mut d = Diagnostic::error(format!("unknown {what} `{word}`"));
    d = match suggest(word, known) {
        Some(s) => d.label(value.span, did_you_mean(&s)),
        None => d.label(value.span, format!("not a known {what}")),
    };
    d.note(format!("known: {}", known.join(", ")))
}

fn dataset(value: &Value) -> Result<&'static DatasetInfo, Diagnostic> {
    let name = word(value, "data", "a dataset name such as mnist")?;
    data::dataset(name).ok_or_else(|| unknown(value, "dataset", name, &data::dataset_names()))
}

fn loss(value: &Value) -> Result<Loss, Diagnostic> {
    let name = word(value, "loss", "a loss such as categorical_crossentropy")?;
    LOSSES.iter().copied().find(|l| l.name() == name).ok_or_else(|| {
        let names: Vec<&str> = LOSSES.iter().map(|l| l.name()).collect();
        unknown(value, "loss", name, &names)
    })
}

fn optimizer(value: &Value) -> Result<Optimizer, Diagnostic> {
    let (name, args): (&str, &[ast::Arg]) = match &value.kind {
        ValueKind::Ident(w) => (w, &[]),
        ValueKind::Call { name, args } => (&name.name, args),
        _ => {
            return Err(wrong_kind(value, "optimizer", "an optimizer such as adam(lr=0.001)"));
        }
    };
    let params: &[&str] = match name {
        "sgd" => &["lr", "momentum"],
        "adam" => &["lr", "beta1", "beta2", "epsilon"],
        _ => return Err(unknown(value, "optimizer", name, &["sgd", "adam"])),
    };
    let mut found: Vec<(&str, &Value)> = Vec::new();
    for arg in args {
        let Some(arg_name) = &arg.name else {
            return Err(Diagnostic::error(format!("{name}'s arguments are named"))
                .label(arg.span, "name this argument")
                .help(format!("for example: {name}(lr=0.001)")));
        };
        let Some(&param) = params.iter().find(|p| **p == arg_name.name) else {
            let mut d = Diagnostic::error(format!("{name} has no argument `{}`", arg_name.name));
            d = match suggest(&arg_name.name, params) {
                Some(s) => d.label(arg_name.span, did_you_mean(&s)),
                None => d.label(arg_name.span, "unknown argument"),
            };
            return Err(d.note(format!("{name} takes: {}", params.join(", "))));
        };
        if let Some((_, first)) = found.iter().find(|(p, _)| *p == param) {
            return Err(Diagnostic::error(format!("`{param}` is given twice"))
                .label(arg.span, "given again here")
                .secondary(first.span, "first given here"));
        }
        found.push((param, &arg.value));
    }
    let get = |p: &str, default: f64, check: &dyn Fn(&Value) -> Result<f64, Diagnostic>| {
        found.iter().find(|(q, _)| *q == p).map_or(Ok(default), |(_, v)| check(v)).map(|x| x as f32)
    };
    let unit =
        |what: &'static str| move |v: &Value| number_in(v, what, 0.0..1.0, "at least 0 and less than 1");
    let lr = |v: &Value| positive_number(v, "lr");
    Ok(match name {
        "sgd" => Optimizer::Sgd {
            lr: get("lr", SGD_DEFAULT_LR, &lr)?,
            momentum: get("momentum", 0.0, &unit("momentum"))?,
        },
        _ => Optimizer::Adam {
            lr: get("lr", ADAM_DEFAULT_LR, &lr)?,
            beta1: get("beta1", 0.9, &unit("beta1"))?,
            beta2: get("beta2", 0.999, &unit("beta2"))?,
            epsilon: get("epsilon", 1e-7, &|v| positive_number(v, "epsilon"))?,
        },
    })
}
