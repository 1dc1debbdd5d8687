//! A plot of loss and accuracy per epoch (train and validation), as a standalone SVG.
//!
//! It draws what it is given and judges nothing about training. It must never panic and never
//! write a non-finite coordinate, whatever the values: NaN and infinite points are skipped, so a
//! series with a gap is drawn as separate pieces.
//!
//! ```text
//!            model name: loss and accuracy per epoch
//!                 ─── train   - - - validation
//!   loss                             accuracy
//!   ┌────────────────────┐           ┌────────────────────┐
//!   │\                   │           │        ______------│
//!   │ \___               │           │   __---            │
//!   │     ‾‾‾‾‾----______│           │  /                 │
//!   └────────────────────┘           └────────────────────┘
//!           epoch                              epoch
//! ```

use std::fmt::Write as _;

use super::metrics::EpochRecord;

const WIDTH: f64 = 920.0;
const HEIGHT: f64 = 400.0;
const PANEL_TOP: f64 = 96.0;
const PANEL_HEIGHT: f64 = 236.0;
const PANEL_WIDTH: f64 = 350.0;
/// Where each panel's plot area starts; room on the left of each for the y tick labels.
const PANEL_LEFTS: [f64; 2] = [80.0, 530.0];
const TRAIN_COLOR: &str = "#1f77b4";
const VALIDATION_COLOR: &str = "#e8590c";
const DASH: &str = "7 4";
/// Past this many points per series the markers would blur into the line; isolated points
/// (one epoch, or a value between two gaps) are always marked, or they would not show at all.
const MAX_MARKED_POINTS: usize = 40;

/// The SVG for `records`: loss on the left, accuracy on the right, train solid and validation
/// dashed (when the records have validation values).
pub fn loss_accuracy_svg(model_name: &str, records: &[EpochRecord]) -> String {
    let mut svg = Svg::new();
    let title = format!("{}: loss and accuracy per epoch", escape_xml(model_name));
    svg.add(format_args!("<title>{title}</title>"));
    svg.add(format_args!(r##"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>"##));
    svg.add(format_args!(
        r#"<text x="{}" y="32" text-anchor="middle" font-size="18" font-weight="bold">{title}</text>"#,
        WIDTH / 2.0
    ));
    if records.is_empty() {
        svg.add(format_args!(
            r##"<text x="{}" y="{}" text-anchor="middle" font-size="16" fill="#666666">no epochs yet</text>"##,
            WIDTH / 2.0,
            HEIGHT / 2.0
        ));
        return svg.finish();
    }

    let epochs: Vec<f64> = records.iter().map(|r| r.epoch as f64).collect();
    let x = epoch_axis(&epochs);
    let loss = series(records, |r| Some(r.loss));
    let val_loss = series(records, |r| r.val_loss);
    let accuracy = series(records, |r| Some(r.accuracy));
    let val_accuracy = series(records, |r| r.val_accuracy);
    legend(&mut svg, val_loss.is_some() || val_accuracy.is_some());

    let panels = [
        ("loss", loss_axis(&[&loss, &val_loss]), [loss, val_loss]),
        ("accuracy", accuracy_axis(&[&accuracy, &val_accuracy]), [accuracy, val_accuracy]),
    ];
    for ((heading, y, [train, validation]), left) in panels.into_iter().zip(PANEL_LEFTS) {
        let panel = Panel { left, x: &x, y: &y };
        panel.draw_frame(&mut svg, heading);
        if let Some(values) = train {
            panel.draw_series(&mut svg, "train", &epochs, &values, TRAIN_COLOR, None);
        }
        if let Some(values) = validation {
            panel.draw_series(&mut svg, "validation", &epochs, &values, VALIDATION_COLOR, Some(DASH));
        }
    }
    svg.finish()
}

/// SVG text being built. Writing to a `String` cannot fail, so `add` drops the `fmt::Result`.
struct Svg(String);

impl Svg {
    fn new() -> Svg {
        let mut svg = Svg(String::new());
        svg.add(format_args!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        ));
        svg
    }

    fn add(&mut self, element: std::fmt::Arguments) {
        let _ = self.0.write_fmt(element);
        self.0.push('\n');
    }

    fn finish(mut self) -> String {
        self.0.push_str("</svg>\n");
        self.0
    }
}

/// One series' values, one per record; `None` when no record has a value at all.
fn series(records: &[EpochRecord], value: impl Fn(&EpochRecord) -> Option<f64>) -> Option<Vec<f64>> {
    let values: Vec<Option<f64>> = records.iter().map(value).collect();
    // A record without a value is a gap, like NaN.
    values.iter().any(Option::is_some).then(|| values.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
}

fn legend(svg: &mut Svg, with_validation: bool) {
    let entries: &[(&str, &str, Option<&str>)] = if with_validation {
        &[("train", TRAIN_COLOR, None), ("validation", VALIDATION_COLOR, Some(DASH))]
    } else {
        &[("train", TRAIN_COLOR, None)]
    };
    // Each entry: a 28-px line sample, a gap, the label; about 110 px in all.
    let mut x = WIDTH / 2.0 - 55.0 * entries.len() as f64;
    svg.add(format_args!(r#"<g class="legend">"#));
    for (label, color, dash) in entries {
        svg.add(format_args!(
            r#"<line x1="{x}" y1="56" x2="{}" y2="56" stroke="{color}" stroke-width="2.5"{}/>"#,
            x + 28.0,
            dash_attribute(*dash)
        ));
        svg.add(format_args!(r#"<text x="{}" y="60">{label}</text>"#, x + 34.0));
        x += 110.0;
    }
    svg.add(format_args!("</g>"));
}

fn dash_attribute(dash: Option<&str>) -> String {
    dash.map(|d| format!(r#" stroke-dasharray="{d}""#)).unwrap_or_default()
}

/// A value range and where its ticks go.
#[derive(Debug, Clone, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    step: f64,
}

impl Axis {
    /// `lo..hi` (with `lo < hi`, both finite) with ticks every `step`.
    fn new(lo: f64, hi: f64, step: f64) -> Axis {
        // Counted in steps, not added up in values: near f64::MAX a sum overflows where the
        // multiple of the step does not. Bounded, so no step can make it loop long.
        let (first, last) = ((lo / step - 1e-9).ceil(), hi / step + 1e-9);
        let ticks = (0..=50)
            .map(|i| first + i as f64)
            .take_while(|&k| k <= last)
            .map(|k| k * step)
            .filter(|tick| tick.is_finite())
            .collect();
        Axis { lo, hi, ticks, step }
    }

    /// Where `v` falls, 0 at `lo` and 1 at `hi`. The halves keep `hi - lo` finite even for a
    /// range as wide as `-f64::MAX..f64::MAX`.
    fn fraction(&self, v: f64) -> f64 {
        (v / 2.0 - self.lo / 2.0) / (self.hi / 2.0 - self.lo / 2.0)
    }

    fn label(&self, v: f64) -> String {
        // A tick that should be 0 but came out as -0.0 or 1e-17 would print as "-0.00".
        let v = if v.abs() < self.step * 1e-6 { 0.0 } else { v };
        if self.step >= 1e5 || self.step < 1e-6 {
            return if v == 0.0 { "0".to_string() } else { format!("{v:e}") };
        }
        // Enough decimals to tell neighbouring ticks apart: step 0.02 needs 2.
        let decimals = (-self.step.log10() - 1e-9).ceil().max(0.0) as usize;
        format!("{v:.decimals$}")
    }
}

/// The smallest round step (1, 2 or 5 × 10^k) that crosses `span` in at most `max_ticks` steps.
fn nice_step(span: f64, max_ticks: f64) -> f64 {
    let raw = if span.is_finite() { span / max_ticks } else { f64::MAX / max_ticks };
    if raw.is_nan() || raw <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|&step| step >= raw).unwrap_or(raw)
}

/// Epochs are whole numbers: integer ticks, and one epoch sits in the middle of its panel.
fn epoch_axis(epochs: &[f64]) -> Axis {
    let (lo, hi) = min_max(epochs.iter().copied()).unwrap_or((1.0, 1.0));
    if hi - lo < 1.0 {
        return Axis::new(lo - 0.5, hi + 0.5, 1.0);
    }
    let axis = Axis::new(lo, hi, nice_step(hi - lo, 8.0).max(1.0));
    // A little room at both ends keeps the first and last markers off the frame; the ticks stay
    // within the epochs trained (no "epoch 0").
    let pad = (hi - lo) * 0.03;
    Axis { lo: lo - pad, hi: hi + pad, ..axis }
}

/// From 0 (or below, for a negative loss) up to a round number above the largest loss.
fn loss_axis(series: &[&Option<Vec<f64>>]) -> Axis {
    let (min, max) = min_max(finite_values(series)).unwrap_or((0.0, 1.0));
    let (lo, hi) = (min.min(0.0), max.max(0.0));
    let hi = if hi > lo { hi } else { lo + 1.0 };
    let step = nice_step(hi - lo, 5.0);
    rounded_axis(lo, hi, step)
}

/// From a round number below the lowest accuracy up to 1, so that the differences show.
fn accuracy_axis(series: &[&Option<Vec<f64>>]) -> Axis {
    let (min, max) = min_max(finite_values(series)).unwrap_or((0.0, 1.0));
    let hi = max.max(1.0);
    let lo = if min < hi { min } else { hi - 0.1 };
    // `hi - 0.1` is `hi` itself for huge values; an empty range would put every point at NaN.
    let lo = if lo < hi { lo } else { hi - hi.abs() * 0.5 };
    let step = nice_step(hi - lo, 5.0);
    let axis = rounded_axis(lo, hi, step);
    // Accuracies are never negative; rounding down must not invent a negative range.
    if axis.lo < 0.0 && lo >= 0.0 { Axis::new(0.0, axis.hi, step) } else { axis }
}

/// `lo..hi` widened to whole steps, unless widening overflows.
fn rounded_axis(lo: f64, hi: f64, step: f64) -> Axis {
    let rounded_lo = (lo / step + 1e-9).floor() * step;
    let rounded_hi = (hi / step - 1e-9).ceil() * step;
    let lo = if rounded_lo.is_finite() { rounded_lo } else { lo };
    let hi = if rounded_hi.is_finite() { rounded_hi } else { hi };
    Axis::new(lo, hi, step)
}

fn finite_values<'a>(series: &'a [&Option<Vec<f64>>]) -> impl Iterator<Item = f64> + 'a {
    series.iter().copied().flatten().flatten().copied().filter(|v| v.is_finite())
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// One plot area: its place on the page and its two axes.
struct Panel<'a> {
    left: f64,
    x: &'a Axis,
    y: &'a Axis,
}

impl Panel<'_> {
    fn bottom(&self) -> f64 {
        PANEL_TOP + PANEL_HEIGHT
    }

    /// The page coordinates of a data point, or `None` when they would not be finite numbers.
    fn place(&self, epoch: f64, value: f64) -> Option<(f64, f64)> {
        let px = self.left + self.x.fraction(epoch) * PANEL_WIDTH;
        let py = self.bottom() - self.y.fraction(value) * PANEL_HEIGHT;
        (px.is_finite() && py.is_finite()).then_some((px, py))
    }

    /// Heading, grid, ticks, tick labels and the frame.
    fn draw_frame(&self, svg: &mut Svg, heading: &str) {
        let (left, top, bottom, right) = (self.left, PANEL_TOP, self.bottom(), self.left + PANEL_WIDTH);
        svg.add(format_args!(r#"<g class="axes">"#));
        svg.add(format_args!(
            r#"<text x="{left}" y="{}" font-size="14" font-weight="bold">{heading}</text>"#,
            top - 12.0
        ));
        for &tick in &self.y.ticks {
            let y = bottom - self.y.fraction(tick) * PANEL_HEIGHT;
            svg.add(format_args!(
                r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#e6e6e6"/>"##
            ));
            svg.add(format_args!(
                r##"<line x1="{}" y1="{y:.1}" x2="{left}" y2="{y:.1}" stroke="#555555"/>"##,
                left - 5.0
            ));
            svg.add(format_args!(
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 8.0,
                y + 4.0,
                self.y.label(tick)
            ));
        }
        for &tick in &self.x.ticks {
            let x = left + self.x.fraction(tick) * PANEL_WIDTH;
            svg.add(format_args!(
                r##"<line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{}" stroke="#555555"/>"##,
                bottom + 5.0
            ));
            svg.add(format_args!(
                r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
                bottom + 19.0,
                self.x.label(tick)
            ));
        }
        svg.add(format_args!(
            r##"<rect x="{left}" y="{top}" width="{PANEL_WIDTH}" height="{PANEL_HEIGHT}" fill="none" stroke="#555555"/>"##
        ));
        svg.add(format_args!(
            r#"<text x="{}" y="{}" text-anchor="middle">epoch</text>"#,
            left + PANEL_WIDTH / 2.0,
            bottom + 40.0
        ));
        svg.add(format_args!("</g>"));
    }

    /// A polyline through each run of consecutive finite points, and markers where needed.
    fn draw_series(
        &self,
        svg: &mut Svg,
        name: &str,
        epochs: &[f64],
        values: &[f64],
        color: &str,
        dash: Option<&str>,
    ) {
        let points: Vec<Option<(f64, f64)>> = epochs
            .iter()
            .zip(values)
            .map(|(&e, &v)| if v.is_finite() { self.place(e, v) } else { None })
            .collect();
        let runs: Vec<&[Option<(f64, f64)>]> =
            points.split(Option::is_none).filter(|run| !run.is_empty()).collect();
        let mark_all = points.iter().flatten().count() <= MAX_MARKED_POINTS;

        svg.add(format_args!(r#"<g class="series {name}">"#));
        for run in &runs {
            if run.len() > 1 {
                let coordinates: Vec<String> =
                    run.iter().flatten().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                svg.add(format_args!(
                    r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{} stroke-linejoin="round"/>"#,
                    coordinates.join(" "),
                    dash_attribute(dash)
                ));
            }
            if mark_all || run.len() == 1 {
                for (x, y) in run.iter().flatten() {
                    svg.add(format_args!(r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#));
                }
            }
        }
        svg.add(format_args!("</g>"));
    }
}

fn escape_xml(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            // XML 1.0 forbids most control characters even when escaped.
            c if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => escaped.push('\u{fffd}'),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: usize, loss: f64, accuracy: f64, validation: Option<(f64, f64)>) -> EpochRecord {
        EpochRecord {
            epoch,
            loss,
            accuracy,
            val_loss: validation.map(|v| v.0),
            val_accuracy: validation.map(|v| v.1),
            seconds: 1.0,
            images_per_second: 100.0,
            test_loss: None,
            test_accuracy: None,
        }
    }

    /// `n` epochs of a plausible run, with validation values when `validation`.
    fn run(n: usize, validation: bool) -> Vec<EpochRecord> {
        (1..=n)
            .map(|e| {
                let f = e as f64;
                record(e, 2.0 / f, 1.0 - 0.5 / f, validation.then_some((2.2 / f, 0.98 - 0.5 / f)))
            })
            .collect()
    }

    /// Checks the SVG's shape and returns the names of the elements it opens, in order.
    /// Panics when a tag is unclosed, closed out of order, or the document is not one `<svg>`.
    fn elements(svg: &str) -> Vec<String> {
        assert!(svg.starts_with("<svg "), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
        let (mut open, mut names) = (Vec::new(), Vec::new());
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("a tag is never left open") + start;
            let tag = &rest[start + 1..end];
            assert!(!tag.contains('<'), "`<` inside a tag: {tag}");
            if let Some(closing) = tag.strip_prefix('/') {
                assert_eq!(open.pop().as_deref(), Some(closing), "closing tag out of order");
            } else {
                let name =
                    tag.split_whitespace().next().unwrap_or_default().trim_end_matches('/').to_string();
                names.push(name.clone());
                if !tag.ends_with('/') {
                    open.push(name);
                }
            }
            rest = &rest[end + 1..];
        }
        assert!(open.is_empty(), "unclosed: {open:?}");
        assert_eq!(names.iter().filter(|n| *n == "svg").count(), 1);
        names
    }

    /// Every number in a coordinate attribute, which must all be finite.
    fn assert_coordinates_finite(svg: &str) {
        for attribute in ["x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "points"] {
            for piece in svg.split(&format!(" {attribute}=\"")).skip(1) {
                let value = &piece[..piece.find('"').unwrap()];
                for number in value.split([' ', ',']) {
                    let parsed: f64 = number.parse().unwrap_or_else(|_| panic!("{attribute}=\"{value}\""));
                    assert!(parsed.is_finite(), "{attribute}=\"{value}\"");
                }
            }
        }
        for text in ["NaN", "inf"] {
            assert!(!svg.contains(text), "{text} in the SVG");
        }
    }

    #[test]
    fn each_series_present_is_drawn() {
        let mut nan_in_middle = run(3, false);
        nan_in_middle[1].loss = f64::NAN;
        let mut late_validation = run(3, false);
        late_validation[2].val_loss = Some(0.5);
        late_validation[2].val_accuracy = Some(0.9);
        let mut infinite_validation = run(4, true);
        infinite_validation[0].val_loss = Some(f64::INFINITY);
        infinite_validation[3].val_loss = Some(f64::NEG_INFINITY);

        // (what, records, series groups, polylines, markers)
        let cases = [
            ("empty", vec![], 0, 0, 0),
            ("one epoch", run(1, false), 2, 0, 2),
            ("one epoch with validation", run(1, true), 4, 0, 4),
            ("three epochs with validation", run(3, true), 4, 4, 12),
            ("validation from epoch 3 on", late_validation, 4, 2, 8),
            // loss: epoch 1 and 3 alone (marked); accuracy: one line.
            ("NaN loss at epoch 2", nan_in_middle, 2, 1, 5),
            // validation loss: epochs 2 and 3 only.
            ("infinite validation loss", infinite_validation, 4, 4, 14),
            ("too many epochs to mark", run(50, false), 2, 2, 0),
        ];
        for (what, records, series, polylines, markers) in cases {
            let svg = loss_accuracy_svg("m", &records);
            let names = elements(&svg);
            assert_coordinates_finite(&svg);
            let count = |element: &str| names.iter().filter(|n| *n == element).count();
            assert_eq!(svg.matches(r#"class="series "#).count(), series, "{what}: series\n{svg}");
            assert_eq!(count("polyline"), polylines, "{what}: polylines\n{svg}");
            assert_eq!(count("circle"), markers, "{what}: markers\n{svg}");
            assert_eq!(svg.contains("no epochs yet"), records.is_empty(), "{what}");
            assert_eq!(svg.contains(">validation</text>"), series == 4, "{what}: legend");
            assert_eq!(svg.matches("stroke-dasharray").count() > 0, series == 4, "{what}: dashes");
        }
    }

    #[test]
    fn one_huge_accuracy_still_gives_finite_coordinates() {
        // Found by the property test below: min = max = f64::MAX left the axis empty.
        let svg = loss_accuracy_svg("m", &[record(0, 0.0, f64::MAX, None)]);
        assert_coordinates_finite(&svg);
    }

    #[test]
    fn extreme_values_give_finite_coordinates() {
        let extremes = [f64::MAX, -f64::MAX, f64::MIN_POSITIVE, -0.0, 1e300, -1e-300];
        let cases: Vec<Vec<EpochRecord>> = vec![
            extremes.iter().enumerate().map(|(i, &v)| record(i + 1, v, v, Some((-v, v)))).collect(),
            vec![record(1, f64::MAX, f64::MAX, None), record(2, -f64::MAX, -f64::MAX, None)],
            vec![record(1, f64::NAN, f64::INFINITY, Some((f64::NEG_INFINITY, f64::NAN)))],
            vec![record(usize::MAX, 1.0, 0.5, None), record(0, 0.5, 0.7, None)],
            vec![record(3, 0.1, 0.9, None), record(3, 0.2, 0.8, None)],
            vec![record(1, 1e-320, 1.0, None), record(2, 5e-324, 1.0 - f64::EPSILON, None)],
        ];
        for records in cases {
            let svg = loss_accuracy_svg("m", &records);
            elements(&svg);
            assert_coordinates_finite(&svg);
        }
    }

    #[test]
    fn model_name_is_escaped() {
        let svg = loss_accuracy_svg(r#"<a href="x">Tom & 'Jerry'</a>"#, &run(2, true));
        elements(&svg);
        let escaped = "&lt;a href=&quot;x&quot;&gt;Tom &amp; &apos;Jerry&apos;&lt;/a&gt;";
        assert_eq!(svg.matches(escaped).count(), 2, "in <title> and in the heading");
        assert!(!svg.contains("<a "));
        assert_eq!(escape_xml("bell\u{7}"), "bell\u{fffd}");
    }

    #[test]
    fn axes_span_the_values_with_round_ends() {
        let some = |values: &[f64]| Some(values.to_vec());
        // (values, expected lo, expected hi)
        let loss_cases = [
            (some(&[1.92, 0.17]), 0.0, 2.0),
            (some(&[0.031, 0.0049]), 0.0, 0.04),
            (some(&[230.0, 12.0]), 0.0, 250.0),
            (some(&[0.0, 0.0]), 0.0, 1.0),
            (some(&[0.4, -0.3]), -0.4, 0.4),
            (some(&[f64::NAN, f64::INFINITY]), 0.0, 1.0),
        ];
        for (values, lo, hi) in loss_cases {
            let axis = loss_axis(&[&values, &None]);
            assert!((axis.lo - lo).abs() < 1e-12 && (axis.hi - hi).abs() < 1e-12, "{values:?}: {axis:?}");
        }
        let accuracy_cases = [
            (some(&[0.6, 0.97]), 0.6, 1.0),
            (some(&[0.913, 0.99]), 0.9, 1.0),
            (some(&[1.0, 1.0]), 0.9, 1.0),
            (some(&[0.05, 0.5]), 0.0, 1.0),
            (some(&[0.987, 0.9991]), 0.985, 1.0),
        ];
        for (values, lo, hi) in accuracy_cases {
            let axis = accuracy_axis(&[&values, &None]);
            assert!((axis.lo - lo).abs() < 1e-12 && (axis.hi - hi).abs() < 1e-12, "{values:?}: {axis:?}");
            assert!(axis.ticks.len() >= 3, "{values:?}: {axis:?}");
        }
    }

    #[test]
    fn ticks_and_labels() {
        // (lo, hi, step, expected labels)
        let cases: [(f64, f64, f64, &[&str]); 5] = [
            (0.0, 2.0, 0.5, &["0.0", "0.5", "1.0", "1.5", "2.0"]),
            (0.9, 1.0, 0.02, &["0.90", "0.92", "0.94", "0.96", "0.98", "1.00"]),
            (-0.4, 0.4, 0.2, &["-0.4", "-0.2", "0.0", "0.2", "0.4"]),
            (0.7, 12.3, 2.0, &["2", "4", "6", "8", "10", "12"]),
            (0.0, 4e6, 2e6, &["0", "2e6", "4e6"]),
        ];
        for (lo, hi, step, expected) in cases {
            let axis = Axis::new(lo, hi, step);
            let labels: Vec<String> = axis.ticks.iter().map(|&t| axis.label(t)).collect();
            assert_eq!(labels, expected, "{lo}..{hi} by {step}");
        }
        // (epochs, expected tick labels)
        let epoch_cases: [(&[f64], &[&str]); 4] = [
            (&[1.0], &["1"]),
            (&[1.0, 2.0], &["1", "2"]),
            (&[1.0, 12.0], &["2", "4", "6", "8", "10", "12"]),
            (&[1.0, 100.0], &["20", "40", "60", "80", "100"]),
        ];
        for (epochs, expected) in epoch_cases {
            let axis = epoch_axis(epochs);
            let labels: Vec<String> = axis.ticks.iter().map(|&t| axis.label(t)).collect();
            assert_eq!(labels, expected, "{epochs:?}");
            assert!(axis.lo < epochs[0] && axis.hi > *epochs.last().unwrap(), "{epochs:?}: {axis:?}");
        }
    }

    fn any_value() -> impl proptest::strategy::Strategy<Value = f64> {
        use proptest::prelude::*;
        prop_oneof![
            4 => 0.0..3.0f64,
            1 => any::<f64>(),
            1 => prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::MAX, -f64::MAX, -0.0]),
        ]
    }

    proptest::proptest! {
        #[test]
        fn any_records_give_a_well_formed_svg(
            records in proptest::collection::vec(
                (0usize..1000, any_value(), any_value(), proptest::option::of((any_value(), any_value()))),
                0..60,
            )
        ) {
            let records: Vec<EpochRecord> =
                records.into_iter().map(|(e, loss, acc, val)| record(e, loss, acc, val)).collect();
            let svg = loss_accuracy_svg("m", &records);
            elements(&svg);
            assert_coordinates_finite(&svg);
        }
    }
}
