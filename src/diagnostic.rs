//! Diagnostics: an error or warning with labelled source spans, rendered like rustc.
//!
//! Every stage of the compiler reports problems as [`Diagnostic`]s that point into the source
//! text; rendering needs only the [`SourceFile`]. This module knows nothing about the language.

use std::fmt::Write as _;

/// A byte range in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }

    /// The smallest span that covers both.
    pub fn join(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

/// A named source text, as the user gave it.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        SourceFile { name: name.into(), text: text.into() }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = self.clamp(offset);
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = self.text[line_start..offset].chars().count() + 1;
        (line, col)
    }

    /// The text of a 1-based line, without its line break.
    fn line_text(&self, line: usize) -> &str {
        self.text.split('\n').nth(line - 1).unwrap_or("").trim_end_matches('\r')
    }

    /// Clamps an offset into the text and onto a character boundary.
    fn clamp(&self, offset: usize) -> usize {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        offset
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    pub span: Span,
    pub message: String,
    pub primary: bool,
}

/// An error or a warning, with the places in the source it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    pub labels: Vec<Label>,
    pub notes: Vec<String>,
    pub helps: Vec<String>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Self {
        Self::new(Severity::Error, message.into())
    }

    pub fn warning(message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, message.into())
    }

    fn new(severity: Severity, message: String) -> Self {
        Diagnostic { severity, message, labels: Vec::new(), notes: Vec::new(), helps: Vec::new() }
    }

    /// The place the diagnostic is about (underlined with `^`).
    pub fn label(mut self, span: Span, message: impl Into<String>) -> Self {
        self.labels.push(Label { span, message: message.into(), primary: true });
        self
    }

    /// A related place (underlined with `-`).
    pub fn secondary(mut self, span: Span, message: impl Into<String>) -> Self {
        self.labels.push(Label { span, message: message.into(), primary: false });
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.helps.push(help.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The 1-based line and column of the primary label, if any.
    pub fn position(&self, source: &SourceFile) -> Option<(usize, usize)> {
        let label = self.labels.iter().find(|l| l.primary).or(self.labels.first())?;
        Some(source.line_col(label.span.start))
    }

    /// Renders the diagnostic the way rustc does:
    ///
    /// ```text
    /// error: unknown layer `Conv2D`
    ///  --> model.cnn:3:5
    ///   |
    /// 3 |     Conv2D(32, kernel=3)
    ///   |     ^^^^^^ did you mean `conv2d`?
    /// ```
    pub fn render(&self, source: &SourceFile) -> String {
        let mut out = String::new();
        let word = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let _ = writeln!(out, "{word}: {}", self.message);

        let mut labels: Vec<&Label> = self.labels.iter().collect();
        labels.sort_by_key(|l| (l.span.start, !l.primary));
        let lines: Vec<usize> = labels.iter().map(|l| source.line_col(l.span.start).0).collect();
        let gutter = lines.iter().max().map_or(0, |l| l.to_string().len());
        let pad = " ".repeat(gutter);

        if let Some((line, col)) = self.position(source) {
            let _ = writeln!(out, "{pad}--> {}:{line}:{col}", source.name);
        } else {
            let _ = writeln!(out, "{pad}--> {}", source.name);
        }
        if !labels.is_empty() {
            let _ = writeln!(out, "{pad} |");
        }
        let mut previous_line = None;
        for (label, &line) in labels.iter().zip(&lines) {
            let text = source.line_text(line);
            if previous_line != Some(line) {
                if previous_line.is_some_and(|p| line > p + 1) {
                    let _ = writeln!(out, "{pad}...");
                }
                let _ = writeln!(out, "{line:>gutter$} | {}", expand_tabs(text));
            }
            previous_line = Some(line);
            let (start_col, underline) = underline_extent(source, label.span, text);
            let mark = if label.primary { "^" } else { "-" };
            let marks = mark.repeat(underline.max(1));
            let message =
                if label.message.is_empty() { String::new() } else { format!(" {}", label.message) };
            let _ = writeln!(out, "{pad} | {}{marks}{message}", " ".repeat(start_col));
        }
        if !self.notes.is_empty() || !self.helps.is_empty() {
            if !labels.is_empty() {
                let _ = writeln!(out, "{pad} |");
            }
            for note in &self.notes {
                let _ = writeln!(out, "{pad} = note: {note}");
            }
            for help in &self.helps {
                let _ = writeln!(out, "{pad} = help: {help}");
            }
        }
        out
    }
}

/// Display column (0-based, tabs expanded) where a span starts on its line, and how many
/// columns to underline: to the span's end, or to the end of the line for a multi-line span.
fn underline_extent(source: &SourceFile, span: Span, line_text: &str) -> (usize, usize) {
    let start = source.clamp(span.start);
    let line_start = source.text[..start].rfind('\n').map_or(0, |i| i + 1);
    let prefix = &source.text[line_start..start];
    let start_col = display_width(prefix);
    let end = source.clamp(span.end.max(start));
    let within_line = &source.text[start..end];
    let covered = within_line.split('\n').next().unwrap_or("");
    let mut width = display_width(covered);
    if width == 0 && start_col >= display_width(line_text) {
        width = 1; // a point at the end of the line or file
    }
    (start_col, width)
}

fn display_width(text: &str) -> usize {
    text.chars().map(|c| if c == '\t' { 4 } else { 1 }).sum()
}

fn expand_tabs(text: &str) -> String {
    text.replace('\t', "    ")
}

/// Renders a list of diagnostics one after the other, separated by blank lines.
pub fn render_all(diagnostics: &[Diagnostic], source: &SourceFile) -> String {
    diagnostics.iter().map(|d| d.render(source)).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters() {
        let source = SourceFile::new("m.cnn", "ab\n\tµx\n");
        assert_eq!(source.line_col(0), (1, 1));
        assert_eq!(source.line_col(3), (2, 1));
        assert_eq!(source.line_col(6), (2, 3)); // after the tab and the two-byte µ
        assert_eq!(source.line_col(100), (3, 1));
    }

    #[test]
    fn renders_like_rustc() {
        let source = SourceFile::new("m.cnn", "model m {\n    Conv2D(3)\n}\n");
        let d = Diagnostic::error("unknown layer `Conv2D`")
            .label(Span::new(14, 20), "did you mean `conv2d`?")
            .note("a note");
        assert_eq!(
            d.render(&source),
            "error: unknown layer `Conv2D`\n --> m.cnn:2:5\n  |\n2 |     Conv2D(3)\n  |     ^^^^^^ did you mean `conv2d`?\n  |\n  = note: a note\n"
        );
    }

    #[test]
    fn a_point_at_the_end_of_the_file_gets_one_caret() {
        let source = SourceFile::new("m.cnn", "model m {");
        let d = Diagnostic::error("unclosed").label(Span::new(9, 9), "here");
        assert!(d.render(&source).contains("1 | model m {\n  |          ^ here\n"));
    }
}
