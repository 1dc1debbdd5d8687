//! The syntax tree of a `.cnn` file: what was written, with a span on every piece.
//!
//! The AST knows no layer, argument or dataset names; those are checked when it is lowered.

use crate::diagnostic::Span;

/// A whole `.cnn` file: its blocks in source order.
#[derive(Debug, Clone, PartialEq)]
pub struct File {
    pub models: Vec<ModelBlock>,
    pub trains: Vec<TrainBlock>,
    /// Where the file ends, for errors about something missing.
    pub end: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// `model NAME { statements }`
#[derive(Debug, Clone, PartialEq)]
pub struct ModelBlock {
    pub name: Ident,
    pub statements: Vec<Statement>,
    /// The `model NAME` head, for errors about the block as a whole.
    pub head: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    /// `input 28x28x1`
    Input { value: Value, span: Span },
    /// `conv2d(32, kernel=3) as stem`
    Layer(LayerCall),
}

#[derive(Debug, Clone, PartialEq)]
pub struct LayerCall {
    pub name: Ident,
    pub args: Vec<Arg>,
    pub alias: Option<Ident>,
    pub span: Span,
}

/// A positional (`name` is `None`) or named argument.
#[derive(Debug, Clone, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Value,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub kind: ValueKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ValueKind {
    /// A number written without a point or exponent: `32`, `-1`.
    Int(i64),
    /// A number with a point or exponent: `0.5`, `1e-3`.
    Float(f64),
    /// `3x3`, `28x28x1`
    Dims(Vec<u64>),
    /// A bare word: `relu`, `same`, `true`, `mnist`.
    Ident(String),
    /// `adam(lr=0.001)`
    Call { name: Ident, args: Vec<Arg> },
}

impl ValueKind {
    /// The value, short, for messages: `2.5`, `3x3x3`, `` `yes` ``.
    pub fn show(&self) -> String {
        match self {
            ValueKind::Int(n) => n.to_string(),
            ValueKind::Float(x) => x.to_string(),
            ValueKind::Dims(d) => d.iter().map(u64::to_string).collect::<Vec<_>>().join("x"),
            ValueKind::Ident(w) => format!("`{w}`"),
            ValueKind::Call { name, .. } => format!("`{}(…)`", name.name),
        }
    }

    /// How the value is called in messages: "a number", "a word", …
    pub fn describe(&self) -> &'static str {
        match self {
            ValueKind::Int(_) => "a whole number",
            ValueKind::Float(_) => "a number",
            ValueKind::Dims(_) => "a size like 3x3",
            ValueKind::Ident(_) => "a word",
            ValueKind::Call { .. } => "a call",
        }
    }
}

/// `train { key = value ... }`
#[derive(Debug, Clone, PartialEq)]
pub struct TrainBlock {
    pub entries: Vec<Entry>,
    pub head: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: Ident,
    pub value: Value,
    pub span: Span,
}
