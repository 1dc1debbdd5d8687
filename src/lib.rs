//! cnnc: a declarative model-graph compiler for convolutional networks.
//!
//! The pipeline, one module a stage (see ARCHITECTURE.md):
//! `.cnn` text → [`syntax::parse`] → AST → [`ir::lower::lower`] → IR graph →
//! [`ir::infer_shapes`] → shapes → [`ir::cost::analyze`] → costs → [`check`] → reports.

pub mod autodiff;
pub mod backend;
pub mod bench;
pub mod check;
pub mod data;
pub mod diagnostic;
pub mod fsutil;
pub mod ir;
pub mod memory;
pub mod report;
pub mod rng;
pub mod syntax;
pub mod train;

use diagnostic::{Diagnostic, SourceFile};
use ir::ShapeInfo;
use ir::cost::CostInfo;
use ir::lower::Model;

/// A model that parsed, lowered, has every shape inferred and passed every check.
#[derive(Debug, Clone)]
pub struct Checked {
    pub model: Model,
    pub shapes: ShapeInfo,
    pub costs: CostInfo,
    /// Lint warnings: the model is legal, but probably not what was meant.
    pub warnings: Vec<Diagnostic>,
}

/// Runs the front end on a source text: parse, lower, infer shapes, count costs, check.
/// On failure returns every diagnostic found (errors, and warnings found before them).
///
/// ```
/// use cnnc::diagnostic::SourceFile;
///
/// let source = SourceFile::new("tiny.cnn", "model tiny { input 8x8x1  conv2d(4, kernel=3)  flatten  dense(2) }");
/// let checked = cnnc::check(&source).unwrap();
/// let output = checked.model.graph.output().unwrap();
/// assert_eq!(checked.shapes.shape(output).dims(), vec![2]);
/// assert_eq!(checked.costs.total_params(), 3 * 3 * 4 + 4 + 6 * 6 * 4 * 2 + 2);
///
/// let broken = SourceFile::new("broken.cnn", "model m { input 8x8x1  dense(2) }");
/// let errors = cnnc::check(&broken).unwrap_err();
/// assert_eq!(errors[0].message, "dense needs a flat input, but its input is 8x8x1");
/// ```
pub fn check(source: &SourceFile) -> Result<Checked, Vec<Diagnostic>> {
    let ast = syntax::parse(&source.text).map_err(|e| vec![e])?;
    let model = ir::lower::lower(&ast)?;
    let shapes = ir::infer_shapes(&model.graph).map_err(|e| vec![e])?;
    let costs = ir::cost::analyze(&model.graph, &shapes);
    let warnings = check::lint(&model.graph, &shapes, &costs);
    let errors = match &model.train {
        Some(train) => check::check_train(&model.graph, &shapes, train),
        None => Vec::new(),
    };
    if !errors.is_empty() {
        return Err(warnings.into_iter().chain(errors).collect());
    }
    Ok(Checked { model, shapes, costs, warnings })
}

/// Reads a `.cnn` file.
pub fn read_source(path: &std::path::Path) -> anyhow::Result<SourceFile> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    Ok(SourceFile::new(path.display().to_string(), text))
}

/// Makes glibc keep freed memory for reuse. A training step allocates and frees the same large
/// buffers over and over; by default glibc hands blocks above its mmap threshold, and the
/// tops of the worker threads' arenas, back to the kernel at every free, and every step then
/// pays for page faults, zeroing and TLB shootdowns (measured with perf: from a fifth to a
/// third of a JIT step, 1,320 against 2,180 images/s on mnist.cnn). One arena with high
/// thresholds keeps the blocks in the heap. Call it once, before any thread starts; binaries
/// (the CLI, benches) do, the library never does on its own.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
