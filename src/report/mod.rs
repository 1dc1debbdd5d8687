//! Reports on a checked model: the summary table (`cnnc summary`) and its JSON form.
//!
//! Architecture invariant: reports only read the analyses' side tables; they compute no shape
//! or cost of their own.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::Checked;
use crate::ir::cost::{Flops, ReceptiveField, activation_bytes};
use crate::ir::shape::{Ignored, Pads};
use crate::ir::train::Optimizer;
use crate::ir::{Graph, Layer, Shape};

/// One row of the summary: a layer as the user wrote it.
#[derive(Debug, Clone)]
pub struct LayerRow {
    pub name: String,
    pub class: &'static str,
    pub output: Shape,
    pub params: usize,
    pub trainable_params: usize,
    pub flops: Flops,
    pub memory_bytes: usize,
    /// The padding of the layer's window op; zero for layers without one.
    pub padding: Pads,
    pub receptive_field: ReceptiveField,
    pub ignored: Option<Ignored>,
    /// The input of the layer's window op, for the note on ignored rows.
    pub window_input: Option<Shape>,
}

/// The rows of the summary, in model order (the input layer left out, as Keras does).
pub fn layer_rows(checked: &Checked) -> Vec<LayerRow> {
    let graph = &checked.model.graph;
    graph.model_layers().map(|(_, layer)| layer_row(checked, graph, layer)).collect()
}

fn layer_row(checked: &Checked, graph: &Graph, layer: &Layer) -> LayerRow {
    let (shapes, costs) = (&checked.shapes, &checked.costs);
    let output = layer.output();
    let mut row = LayerRow {
        name: layer.name.clone(),
        class: layer.class,
        output: shapes.shape(output),
        params: 0,
        trainable_params: 0,
        flops: Flops::default(),
        memory_bytes: activation_bytes(shapes.shape(output)),
        padding: Pads::default(),
        receptive_field: costs.receptive_field(output),
        ignored: None,
        window_input: None,
    };
    for &id in &layer.nodes {
        for p in costs.params(id) {
            row.params += p.numel();
            if p.trainable {
                row.trainable_params += p.numel();
            }
        }
        row.flops += costs.flops(id);
        if let Some(pads) = shapes.pads(id) {
            row.padding = pads;
            row.ignored = shapes.ignored(graph, id);
            row.window_input = Some(shapes.shape(graph.node(id).inputs[0]));
        }
    }
    row
}

/// Totals over the whole model, for one sample.
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    pub params: usize,
    pub trainable_params: usize,
    pub flops: Flops,
    /// The input and every layer's output, f32.
    pub activation_bytes: usize,
}

pub fn totals(checked: &Checked, rows: &[LayerRow]) -> Totals {
    let mut flops = Flops::default();
    for row in rows {
        flops += row.flops;
    }
    let input = activation_bytes(checked.shapes.shape(checked.model.graph.input()));
    Totals {
        params: checked.costs.total_params(),
        trainable_params: checked.costs.trainable_params(),
        flops,
        activation_bytes: input + rows.iter().map(|r| r.memory_bytes).sum::<usize>(),
    }
}

/// The summary table, as Keras's `model.summary()` prints it, with more columns.
pub fn summary_text(checked: &Checked) -> String {
    let graph = &checked.model.graph;
    let rows = layer_rows(checked);
    let totals = totals(checked, &rows);
    let input = checked.shapes.shape(graph.input());

    let header =
        ["Layer (type)", "Output Shape", "Param #", "FLOPs", "Memory", "Padding t,b,l,r", "Receptive field"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                format!("{} ({})", r.name, r.class),
                shape_tuple(r.output),
                group_digits(r.params as u64),
                si(r.flops.forward),
                readable_bytes(r.memory_bytes),
                if r.padding == Pads::default() {
                    "-".into()
                } else {
                    r.padding.as_array().map(|p| p.to_string()).join(",")
                },
                field_text(r.receptive_field),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| cells.iter().map(|c| c[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0))
        .collect();
    // Text columns are left-aligned, numbers right-aligned.
    let right = [false, false, true, true, true, false, false];
    let line = |cells: &[String]| -> String {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .zip(right)
            .map(|((c, w), r)| if r { format!("{c:>w$}") } else { format!("{c:<w$}") })
            .collect();
        format!(" {}", parts.join("   ")).trim_end().to_string()
    };
    let rule_width = widths.iter().sum::<usize>() + 3 * (widths.len() - 1) + 2;

    let mut out = String::new();
    let _ = writeln!(out, "Model: \"{}\"   input {}", graph.name, input);
    let _ = writeln!(out, "{}", "━".repeat(rule_width));
    let _ = writeln!(out, "{}", line(&header.map(String::from)));
    let _ = writeln!(out, "{}", "━".repeat(rule_width));
    for row in &cells {
        let _ = writeln!(out, "{}", line(row));
    }
    let _ = writeln!(out, "{}", "━".repeat(rule_width));
    let non_trainable = totals.params - totals.trainable_params;
    let _ = writeln!(out, " Total params: {}", params_with_bytes(totals.params));
    let _ = writeln!(out, " Trainable params: {}", params_with_bytes(totals.trainable_params));
    let _ = writeln!(out, " Non-trainable params: {}", params_with_bytes(non_trainable));
    let f = totals.flops;
    let _ = writeln!(
        out,
        " Per sample: forward {}FLOP, backward {}FLOP (input gradients {}, weight gradients {}), activations {}",
        si_unit(f.forward),
        si_unit(f.backward_input + f.backward_weights),
        si(f.backward_input),
        si(f.backward_weights),
        readable_bytes(totals.activation_bytes),
    );
    let notes = notes(checked, &rows);
    if !notes.is_empty() {
        let _ = writeln!(out, " Notes:");
        for note in notes {
            let _ = writeln!(out, "   {note}");
        }
    }
    out
}

/// Facts a reader may not expect: rows a window never reads, and input pixels that never
/// reach the output.
fn notes(checked: &Checked, rows: &[LayerRow]) -> Vec<String> {
    let mut notes = Vec::new();
    for row in rows {
        let (Some(ignored), Some(input)) = (row.ignored, row.window_input) else {
            continue;
        };
        if !ignored.any() {
            continue;
        }
        let mut parts = Vec::new();
        if ignored.rows_at_end > 0 || ignored.cols_at_end > 0 {
            parts.push(format!(
                "never reads the last {} and {} of its {input} input",
                plural(ignored.rows_at_end, "row"),
                plural(ignored.cols_at_end, "column")
            ));
        }
        if ignored.rows_between > 0 || ignored.cols_between > 0 {
            parts.push(format!(
                "skips {} and {} between windows (stride larger than the window)",
                plural(ignored.rows_between, "row"),
                plural(ignored.cols_between, "column")
            ));
        }
        notes.push(format!("{}: {}", row.name, parts.join("; ")));
    }
    let input = checked.shapes.shape(checked.model.graph.input());
    if let (Some(last), Shape::Hwc { h, w, .. }) = (rows.last(), input)
        && let ReceptiveField::Global { size: [sh, sw] } = last.receptive_field
        && (sh < h || sw < w)
    {
        notes.push(format!(
            "only {sh}x{sw} of the {h}x{w} input image can influence the output; \
                     the rest is cut off by the layers above"
        ));
    }
    notes
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") }
}

/// The summary as JSON.
pub fn summary_json(checked: &Checked) -> Value {
    let graph = &checked.model.graph;
    let rows = layer_rows(checked);
    let totals = totals(checked, &rows);
    let layers: Vec<Value> = rows
        .iter()
        .map(|r| {
            let (size, jump, start) = field_json(r.receptive_field);
            json!({
                "name": r.name,
                "type": r.class,
                "output_shape": r.output.dims(),
                "params": r.params,
                "trainable_params": r.trainable_params,
                "flops": r.flops.forward,
                "flops_backward_input": r.flops.backward_input,
                "flops_backward_weights": r.flops.backward_weights,
                "memory_bytes": r.memory_bytes,
                "padding": r.padding.as_array(),
                "receptive_field": size,
                "receptive_field_jump": jump,
                "receptive_field_start": start,
                "ignored": r.ignored.filter(Ignored::any).map(|i| json!({
                    "rows_at_end": i.rows_at_end,
                    "cols_at_end": i.cols_at_end,
                    "rows_between": i.rows_between,
                    "cols_between": i.cols_between,
                })),
            })
        })
        .collect();
    let train = checked.model.train.as_ref().map(|t| {
        let optimizer = match t.optimizer {
            Optimizer::Sgd { lr, momentum } => json!({"name": "sgd", "lr": lr, "momentum": momentum}),
            Optimizer::Adam { lr, beta1, beta2, epsilon } => {
                json!({"name": "adam", "lr": lr, "beta1": beta1, "beta2": beta2, "epsilon": epsilon})
            }
        };
        json!({
            "data": t.data.map(|d| d.name),
            "loss": t.loss.map(|l| l.name()),
            "optimizer": optimizer,
            "batch_size": t.batch_size,
            "epochs": t.epochs,
            "validation_split": t.validation_split,
            "seed": t.seed,
        })
    });
    json!({
        "model": graph.name,
        "input": checked.shapes.shape(graph.input()).dims(),
        "layers": layers,
        "total_params": totals.params,
        "trainable_params": totals.trainable_params,
        "non_trainable_params": totals.params - totals.trainable_params,
        "flops_forward": totals.flops.forward,
        "flops_backward": totals.flops.backward_input + totals.flops.backward_weights,
        "activation_bytes": totals.activation_bytes,
        "train": train,
        "notes": notes(checked, &rows),
    })
}

/// (size, jump, start) as JSON: a number when height and width agree, else [h, w].
fn field_json(field: ReceptiveField) -> (Value, Value, Value) {
    fn pair<T: Into<Value> + PartialEq + Copy>(a: T, b: T) -> Value {
        if a == b { a.into() } else { json!([a.into(), b.into()]) }
    }
    match field {
        ReceptiveField::Local([h, w]) => (pair(h.size, w.size), pair(h.jump, w.jump), pair(h.start, w.start)),
        ReceptiveField::Global { size: [h, w] } => (pair(h, w), Value::Null, Value::Null),
        ReceptiveField::None => (Value::Null, Value::Null, Value::Null),
    }
}

fn field_text(field: ReceptiveField) -> String {
    let pair = |a: usize, b: usize| {
        if a == b { a.to_string() } else { format!("{a}x{b}") }
    };
    match field {
        ReceptiveField::Local([h, w]) => {
            let start =
                if h.start == w.start { format!("{}", h.start) } else { format!("{},{}", h.start, w.start) };
            format!("{} (jump {}, start {start})", pair(h.size, w.size), pair(h.jump, w.jump))
        }
        ReceptiveField::Global { size: [h, w] } => format!("{} (all)", pair(h, w)),
        ReceptiveField::None => "-".into(),
    }
}

/// (26, 26, 32) or (1600,)
fn shape_tuple(shape: Shape) -> String {
    match shape {
        Shape::Hwc { h, w, c } => format!("({h}, {w}, {c})"),
        Shape::Flat(n) => format!("({n},)"),
    }
}

/// "34,826 (136.04 KB)", as Keras prints parameter counts.
fn params_with_bytes(params: usize) -> String {
    format!("{} ({})", group_digits(params as u64), readable_bytes(params * 4))
}

/// Bytes the way Keras prints them: two decimals, powers of 1024.
pub fn readable_bytes(bytes: usize) -> String {
    let mut size = bytes as f64;
    for unit in ["B", "KB", "MB", "GB", "TB"] {
        if size < 1024.0 {
            return format!("{size:.2} {unit}");
        }
        size /= 1024.0;
    }
    format!("{size:.2} PB")
}

/// 34826 → "34,826"
pub fn group_digits(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// 4_880_000 → "4.88M"; below 1000 the plain number.
pub fn si(n: u64) -> String {
    let x = n as f64;
    for (scale, suffix) in [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")] {
        if x >= scale {
            return format!("{:.2}{suffix}", x / scale);
        }
    }
    n.to_string()
}

/// Like [`si`], with a space before a unit that follows: "4.88 M", "960 ".
fn si_unit(n: u64) -> String {
    let s = si(n);
    match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => format!("{} {c}", &s[..s.len() - 1]),
        _ => format!("{s} "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(group_digits(34826), "34,826");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1_000_000), "1,000,000");
        assert_eq!(readable_bytes(34826 * 4), "136.04 KB");
        assert_eq!(readable_bytes(0), "0.00 B");
        assert_eq!(si(4_880_000), "4.88M");
        assert_eq!(si(960), "960");
        assert_eq!(si_unit(4_880_000), "4.88 M");
    }
}
