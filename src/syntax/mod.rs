//! The front end's first stage: `.cnn` text → [`ast::File`], with pest.
//!
//! Parse errors are turned into [`Diagnostic`]s that name what was expected in words a user
//! knows. This module does not know which layers or arguments exist: lowering decides that.

pub mod ast;
pub mod suggest;

use pest::Parser as _;
use pest::iterators::Pair;

use crate::diagnostic::{Diagnostic, Span};
use ast::*;

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/cnn.pest"]
struct CnnParser;

/// Parses a whole `.cnn` source text.
pub fn parse(text: &str) -> Result<File, Diagnostic> {
    let mut pairs = CnnParser::parse(Rule::file, text).map_err(|e| parse_error(text, e))?;
    let file = pairs.next().expect("the file rule always yields one pair");
    let mut models = Vec::new();
    let mut trains = Vec::new();
    for pair in file.into_inner() {
        match pair.as_rule() {
            Rule::model_block => models.push(model_block(pair)?),
            Rule::train_block => trains.push(train_block(pair)?),
            Rule::EOI => {}
            rule => unreachable!("unexpected {rule:?} in file"),
        }
    }
    Ok(File { models, trains, end: Span::new(text.len(), text.len()) })
}

/// The meaningful children of a pair: punctuation and keywords left out.
fn children(pair: Pair<Rule>) -> impl Iterator<Item = Pair<Rule>> {
    pair.into_inner().filter(|p| {
        !matches!(
            p.as_rule(),
            Rule::lbrace
                | Rule::rbrace
                | Rule::lparen
                | Rule::rparen
                | Rule::comma
                | Rule::equals
                | Rule::kw_model
                | Rule::kw_train
                | Rule::kw_input
                | Rule::kw_as
        )
    })
}

fn span(pair: &Pair<Rule>) -> Span {
    let s = pair.as_span();
    Span::new(s.start(), s.end())
}

fn ident(pair: Pair<Rule>) -> Ident {
    debug_assert_eq!(pair.as_rule(), Rule::ident);
    Ident { name: pair.as_str().to_string(), span: span(&pair) }
}

fn model_block(pair: Pair<Rule>) -> Result<ModelBlock, Diagnostic> {
    let start = pair.as_span().start();
    let mut inner = children(pair);
    let name = ident(inner.next().expect("model name"));
    let head = Span::new(start, name.span.end);
    let mut statements = Vec::new();
    for pair in inner {
        match pair.as_rule() {
            Rule::input_stmt => {
                let span = span(&pair);
                let value = value(children(pair).next().expect("input value"))?;
                statements.push(Statement::Input { value, span });
            }
            Rule::layer => statements.push(Statement::Layer(layer(pair)?)),
            rule => unreachable!("unexpected {rule:?} in model block"),
        }
    }
    Ok(ModelBlock { name, statements, head })
}

fn layer(pair: Pair<Rule>) -> Result<LayerCall, Diagnostic> {
    let span = span(&pair);
    let mut inner = children(pair);
    let name = ident(inner.next().expect("layer name"));
    let mut args = Vec::new();
    let mut alias = None;
    for pair in inner {
        match pair.as_rule() {
            Rule::arg_list => args = arg_list(pair)?,
            Rule::alias => alias = Some(ident(children(pair).next().expect("alias name"))),
            rule => unreachable!("unexpected {rule:?} in layer"),
        }
    }
    Ok(LayerCall { name, args, alias, span })
}

fn arg_list(pair: Pair<Rule>) -> Result<Vec<Arg>, Diagnostic> {
    children(pair).map(arg).collect()
}

fn arg(pair: Pair<Rule>) -> Result<Arg, Diagnostic> {
    let span = span(&pair);
    let inner = pair.into_inner().next().expect("arg body");
    match inner.as_rule() {
        Rule::named_arg => {
            let mut parts = children(inner);
            let name = ident(parts.next().expect("arg name"));
            let value = value(parts.next().expect("arg value"))?;
            Ok(Arg { name: Some(name), value, span })
        }
        Rule::value => Ok(Arg { name: None, value: value(inner)?, span }),
        rule => unreachable!("unexpected {rule:?} in arg"),
    }
}

fn value(pair: Pair<Rule>) -> Result<Value, Diagnostic> {
    let span = span(&pair);
    let inner = pair.into_inner().next().expect("value body");
    let text = inner.as_str();
    let kind = match inner.as_rule() {
        Rule::call => {
            let mut parts = children(inner);
            let name = ident(parts.next().expect("call name"));
            let args = arg_list(parts.next().expect("call args"))?;
            ValueKind::Call { name, args }
        }
        Rule::dims => {
            let dims = text.split('x').map(|d| d.parse::<u64>()).collect::<Result<Vec<_>, _>>();
            ValueKind::Dims(dims.map_err(|_| too_large(span, text))?)
        }
        Rule::number if text.contains(['.', 'e', 'E']) => {
            let x: f64 = text.parse().map_err(|_| too_large(span, text))?;
            if !x.is_finite() {
                return Err(too_large(span, text));
            }
            ValueKind::Float(x)
        }
        Rule::number => ValueKind::Int(text.parse().map_err(|_| too_large(span, text))?),
        Rule::ident => ValueKind::Ident(text.to_string()),
        rule => unreachable!("unexpected {rule:?} in value"),
    };
    Ok(Value { kind, span })
}

fn too_large(span: Span, text: &str) -> Diagnostic {
    Diagnostic::error(format!("the number `{text}` is too large")).label(span, "does not fit in 64 bits")
}

fn train_block(pair: Pair<Rule>) -> Result<TrainBlock, Diagnostic> {
    let head = span(&pair.clone().into_inner().next().expect("train keyword"));
    let mut entries = Vec::new();
    for pair in children(pair) {
        let span = span(&pair);
        let mut parts = children(pair);
        let key = ident(parts.next().expect("entry key"));
        let value = value(parts.next().expect("entry value"))?;
        entries.push(Entry { key, value, span });
    }
    Ok(TrainBlock { entries, head })
}

/// Turns pest's error into a diagnostic that names what was expected in plain words.
fn parse_error(text: &str, error: pest::error::Error<Rule>) -> Diagnostic {
    let offset = match error.location {
        pest::error::InputLocation::Pos(p) => p,
        pest::error::InputLocation::Span((s, _)) => s,
    };
    let mut expected: Vec<&str> = match &error.variant {
        pest::error::ErrorVariant::ParsingError { positives, .. } => {
            positives.iter().filter_map(|r| describe_rule(*r)).collect()
        }
        pest::error::ErrorVariant::CustomError { .. } => Vec::new(),
    };
    expected.sort();
    expected.dedup();
    let found = found_at(text, offset);
    let what = if expected.is_empty() {
        format!("unexpected {found}")
    } else {
        format!("expected {}, found {found}", one_of(&expected))
    };
    let unclosed = offset == text.len() && expected.contains(&"`}`");
    let message = if unclosed {
        "syntax error: the file ends before a block is closed".to_string()
    } else {
        format!("syntax error: {what}")
    };
    let mut diagnostic = Diagnostic::error(message);
    let at = missing_token_position(text, offset);
    diagnostic = if expected.is_empty() {
        let end = text[offset..].chars().next().map_or(offset, |c| offset + c.len_utf8());
        diagnostic.label(Span::new(offset, end), "not understood here")
    } else if at < offset {
        // What is missing belongs after the previous token, on its line, as rustc shows it.
        diagnostic.label(Span::new(at, at), format!("expected {} here", one_of(&expected)))
    } else {
        let end = text[offset..].chars().next().map_or(offset, |c| offset + c.len_utf8());
        diagnostic.label(Span::new(offset, end), format!("expected {}", one_of(&expected)))
    };
    if unclosed {
        diagnostic = diagnostic.help("add the missing `}`");
    }
    if text[offset..].starts_with(['"', '\'']) {
        diagnostic = diagnostic.help("values are written without quotes: `data = mnist`");
    }
    if text[offset..].starts_with(':') {
        diagnostic = diagnostic.help("settings are written `key = value`");
    }
    diagnostic
}

/// Where a missing token should go: right after the previous token when the parser stopped on
/// a later line (skipping a comment at the end of that line), else `offset` itself.
fn missing_token_position(text: &str, offset: usize) -> usize {
    let before = &text[..offset];
    let trimmed = before.trim_end();
    if !before[trimmed.len()..].contains('\n') {
        return offset;
    }
    let line_start = trimmed.rfind('\n').map_or(0, |i| i + 1);
    let line = &trimmed[line_start..];
    let code = match line.find('#') {
        Some(hash) => line[..hash].trim_end(),
        None => line,
    };
    if code.is_empty() { offset } else { line_start + code.len() }
}

fn found_at(text: &str, offset: usize) -> String {
    let rest = &text[offset..];
    match rest.chars().next() {
        None => "the end of the file".into(),
        Some('\n') | Some('\r') => "the end of the line".into(),
        Some(c) if c.is_alphanumeric() || c == '_' => {
            let word: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            format!("`{word}`")
        }
        Some(c) => format!("`{c}`"),
    }
}

fn one_of(items: &[&str]) -> String {
    match items {
        [] => "something else".into(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

fn describe_rule(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::EOI => "the end of the file",
        Rule::model_block | Rule::kw_model => "`model`",
        Rule::train_block | Rule::kw_train => "`train`",
        Rule::input_stmt | Rule::kw_input => "`input`",
        Rule::layer => "a layer",
        Rule::alias | Rule::kw_as => "`as`",
        Rule::entry => "a setting `key = value`",
        Rule::arg_list => "`(`",
        Rule::arg | Rule::named_arg => "an argument",
        Rule::value | Rule::call | Rule::dims | Rule::number | Rule::int => "a value",
        Rule::ident => "a name",
        Rule::lbrace => "`{`",
        Rule::rbrace => "`}`",
        Rule::lparen => "`(`",
        Rule::rparen => "`)`",
        Rule::comma => "`,`",
        Rule::equals => "`=`",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layers_args_and_aliases() {
        let file = parse("model m { input 28x28x1  conv2d(32, kernel=3x3) as stem flatten }").unwrap();
        let statements = &file.models[0].statements;
        assert_eq!(statements.len(), 3);
        let Statement::Layer(conv) = &statements[1] else { panic!("not a layer") };
        assert_eq!(conv.name.name, "conv2d");
        assert_eq!(conv.alias.as_ref().unwrap().name, "stem");
        assert_eq!(conv.args[0].value.kind, ValueKind::Int(32));
        assert_eq!(conv.args[1].value.kind, ValueKind::Dims(vec![3, 3]));
    }

    #[test]
    fn numbers_keep_their_kind() {
        let file = parse("train { a = 1  b = 0.5  c = 1e-3  d = -2  e = adam(lr=0.1) }").unwrap();
        let kinds: Vec<_> = file.trains[0].entries.iter().map(|e| e.value.kind.clone()).collect();
        assert_eq!(kinds[0], ValueKind::Int(1));
        assert_eq!(kinds[1], ValueKind::Float(0.5));
        assert_eq!(kinds[2], ValueKind::Float(1e-3));
        assert_eq!(kinds[3], ValueKind::Int(-2));
        assert!(matches!(kinds[4], ValueKind::Call { .. }));
    }

    #[test]
    fn keywords_are_not_names_but_prefixes_are() {
        assert!(parse("model input { }").is_err());
        assert!(parse("model models { inputs }").is_ok());
    }

    #[test]
    fn a_missing_paren_is_reported_where_it_is_missing() {
        let error = parse("model m {\n  conv2d(32, kernel=3  # comment\n}").unwrap_err();
        assert_eq!(error.message, "syntax error: expected `)` or `,`, found `}`");
        // right after `kernel=3`, not at the `}` on the next line
        assert_eq!(error.labels[0].span.start, 31);
    }
}
