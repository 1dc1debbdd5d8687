//! The `cnnc` command line: parses arguments, calls the library, prints.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use cnnc::autodiff::Program;
use cnnc::diagnostic::{Diagnostic, SourceFile, render_all};
use cnnc::memory::{Pass, Plan};
use cnnc::train::driver::{self, RunConfig, RunFiles};
use cnnc::train::metrics::EpochRecord;

#[derive(Parser)]
#[command(
    name = "cnnc",
    version,
    about = "A compiler for convolutional networks described in .cnn files",
    long_about = "cnnc reads a model described in a .cnn file, infers every shape, reports on it, and trains it.\n\n\
                  Examples:\n  cnnc check models/mnist.cnn\n  cnnc summary models/mnist.cnn\n  \
                  cnnc train models/mnist.cnn --epochs 1\n  cnnc eval models/mnist.cnn --weights runs/mnist/checkpoint.safetensors\n  \
                  cnnc compile --emit ir models/mnist.cnn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Turn the fusion pass off: run conv/dense, batchnorm and relu as separate kernels
    /// (for comparisons; results agree within float rounding).
    #[arg(long, global = true)]
    no_fuse: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Parse, infer shapes and validate a model and its train block; print "ok" or the problems.
    Check {
        /// The .cnn file.
        file: PathBuf,
        /// Treat warnings as errors (non-zero exit when there are any).
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Print the model's layers, output shapes, parameters, FLOPs, memory, padding and
    /// receptive fields, and the size of the arena its compiled training step and inference
    /// run in (for the train block's batch size, 32 without one, on this many threads).
    Summary {
        /// The .cnn file.
        file: PathBuf,
        /// Print the summary as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also report how many kernels the model compiles to and how long that took.
        #[arg(long)]
        compile: bool,
        /// Treat warnings as errors (non-zero exit when there are any).
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Compile a model and print an intermediate form.
    Compile {
        /// The .cnn file.
        file: PathBuf,
        /// What to print. `ir`: the forward IR graph, one op a line, with every shape;
        /// `clif`: the Cranelift IR of the compiled kernels; `asm`: their machine code;
        /// `memory`: the memory plan of the training step and of inference, buffer by buffer
        /// (for the train block's batch size, 32 without one).
        #[arg(long, value_enum, default_value = "ir")]
        emit: Emit,
        /// With clif or asm: only the kernels whose name contains this (e.g. conv2d_1_forward).
        #[arg(long)]
        kernel: Option<String>,
    },
    /// Train a model on its dataset, as its train block says. Writes checkpoint.safetensors,
    /// metrics.jsonl and metrics.svg into the output directory after every epoch.
    Train(TrainArgs),
    /// Print a trained model's loss and accuracy on its dataset's test set.
    Eval {
        /// The .cnn file.
        file: PathBuf,
        /// A checkpoint written by `cnnc train`.
        #[arg(long)]
        weights: PathBuf,
        /// Images per inference batch.
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
        /// Worker threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Print the predicted class and the probabilities for images: PNG files (the model's
    /// height x width, grayscale or color; light digits on a dark background, as MNIST), or an
    /// IDX image file (every image in it, or those chosen with --index).
    Predict {
        /// The .cnn file.
        file: PathBuf,
        /// A checkpoint written by `cnnc train`.
        #[arg(long)]
        weights: PathBuf,
        /// PNG or IDX files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// For IDX files: the 0-based indices of the images to predict.
        #[arg(long, value_delimiter = ',')]
        index: Vec<usize>,
    },
    /// Time training steps and inference of the model compiled with and without fusion, side
    /// by side (A/B interleaved after warm-up), on random data: a table per layer group and
    /// phase with median times, GFLOP/s, their share of the machine's f32x4 multiply-add
    /// ceiling (measured first) and the fused/unfused speedup.
    Bench {
        /// The .cnn file.
        file: PathBuf,
        /// Training batch size [default: the train block's, else 128].
        #[arg(long)]
        batch_size: Option<usize>,
        /// Inference batch size.
        #[arg(long, default_value_t = 1000)]
        inference_batch_size: usize,
        /// Worker threads [default: one per core].
        #[arg(long)]
        threads: Option<usize>,
        /// Untimed steps of each program before timing.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed rounds (each: one training step and one inference batch of each program).
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Datasets: fetch and locate them.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Download a dataset into the cache directory ($CNNC_DATA, else ~/.cache/cnnc) and verify it.
    Fetch {
        /// mnist (fashion_mnist comes from Debian: apt-get install dataset-fashion-mnist).
        name: String,
    },
    /// Print where cnnc looks for datasets.
    Dir,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// The .cnn file.
    file: PathBuf,
    /// Epochs to train (overrides the train block).
    #[arg(long)]
    epochs: Option<usize>,
    /// Samples per batch (overrides the train block).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Learning rate (overrides the optimizer's).
    #[arg(long)]
    lr: Option<f32>,
    /// Seed of every random choice: initialization, shuffling, dropout (overrides the train block).
    #[arg(long)]
    seed: Option<u64>,
    /// Train on the first N training samples only (the validation split is taken from these).
    #[arg(long)]
    limit: Option<usize>,
    /// Which backend runs the kernels.
    #[arg(long, value_enum, default_value = "jit")]
    backend: BackendKind,
    /// Worker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the checkpoint, metrics.jsonl and the plot go (default: runs/<model name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from a checkpoint written by `cnnc train` (same model, optimizer and batch size).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// No progress bar; one line per epoch (also the default when stdout is not a terminal).
    #[arg(long)]
    quiet: bool,
    /// Also measure the test set after every epoch: test_loss and test_accuracy in the log and
    /// in metrics.jsonl, to see when the model reaches an accuracy. The epoch's seconds do not
    /// include it.
    #[arg(long)]
    test_every_epoch: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Emit {
    Ir,
    Clif,
    Asm,
    Memory,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendKind {
    /// Plain loops over ndarray: slow, obviously correct, the oracle.
    Reference,
    /// Convolutions and dense layers compiled with Cranelift for the model's shapes.
    Jit,
}

impl From<BackendKind> for driver::BackendKind {
    fn from(kind: BackendKind) -> Self {
        match kind {
            BackendKind::Reference => driver::BackendKind::Reference,
            BackendKind::Jit => driver::BackendKind::Jit,
        }
    }
}

fn main() -> ExitCode {
    cnnc::keep_freed_memory();
    let cli = Cli::parse();
    let fuse = !cli.no_fuse;
    match cli.command {
        Command::Check { file, deny_warnings } => run(&file, deny_warnings, |_, _| {
            println!("ok");
            Ok(())
        }),
        Command::Summary { file, json, compile, deny_warnings } => run(&file, deny_warnings, |checked, _| {
            let program = cnnc::autodiff::build_with(checked, fuse)?;
            let optimizer = checked.model.train.as_ref().map(|t| &t.optimizer);
            let kernels =
                cnnc::backend::jit::JitKernels::compile_with(&program, Default::default(), optimizer)?;
            let plans = memory_plans(&kernels, &program, checked);
            if json {
                let mut value = cnnc::report::summary_json(checked);
                if compile {
                    let (count, ms) = (kernels.kernel_count(), kernels.compile_ms);
                    value["compile"] = serde_json::json!({"kernels": count, "milliseconds": ms});
                }
                value["arena"] = plans
                    .iter()
                    .map(|plan| {
                        let pass = if plan.pass == Pass::Train { "train" } else { "inference" };
                        let bytes = serde_json::json!({
                            "batch": plan.batch,
                            "threads": rayon::current_num_threads(),
                            "bytes": 4 * plan.len,
                            "unshared_bytes": 4 * plan.unshared,
                        });
                        (pass.to_string(), bytes)
                    })
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", cnnc::report::summary_text(checked));
                for plan in &plans {
                    println!(" Memory: {plan}, {} thread(s)", rayon::current_num_threads());
                }
                if compile {
                    println!(" Compiled {} kernels in {:.1} ms", kernels.kernel_count(), kernels.compile_ms);
                }
            }
            Ok(())
        }),
        Command::Compile { file, emit, kernel } => {
            run(&file, false, |checked, _| compile(checked, emit, kernel.as_deref(), fuse))
        }
        Command::Train(args) => {
            let file = args.file.clone();
            run(&file, false, |checked, source| {
                with_threads(args.threads, || train(checked, source, &args, fuse))
            })
        }
        Command::Eval { file, weights, batch_size, threads } => run(&file, false, |checked, _| {
            with_threads(threads, || eval(checked, &weights, batch_size, fuse))
        }),
        Command::Predict { file, weights, images, index } => {
            run(&file, false, |checked, _| predict(checked, &weights, &images, &index, fuse))
        }
        Command::Bench { file, batch_size, inference_batch_size, threads, warmup, rounds, json } => {
            run(&file, false, |checked, _| {
                with_threads(threads, || {
                    let batch_size = batch_size.unwrap_or_else(|| cnnc::bench::default_batch_size(checked));
                    let options = cnnc::bench::Options { batch_size, inference_batch_size, warmup, rounds };
                    let report = cnnc::bench::run(checked, options)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report.json())?);
                    } else {
                        print!("{}", report.text());
                    }
                    Ok(())
                })
            })
        }
        Command::Data { command } => finish(data(command)),
    }
}

/// Runs the front end on `file`, prints its diagnostics, and calls `then` when it passes.
fn run(
    file: &Path,
    deny_warnings: bool,
    then: impl FnOnce(&cnnc::Checked, &SourceFile) -> anyhow::Result<()>,
) -> ExitCode {
    let source = match cnnc::read_source(file) {
        Ok(source) => source,
        Err(e) => return finish(Err(e)),
    };
    match cnnc::check(&source) {
        Ok(checked) => {
            print_diagnostics(&checked.warnings, &source);
            if deny_warnings && !checked.warnings.is_empty() {
                eprintln!("error: {} warning(s), and --deny-warnings was given", checked.warnings.len());
                return ExitCode::FAILURE;
            }
            finish(then(&checked, &source))
        }
        Err(diagnostics) => {
            print_diagnostics(&diagnostics, &source);
            let errors = diagnostics.iter().filter(|d| d.is_error()).count();
            eprintln!("error: {} found {} error(s)", source.name, errors);
            ExitCode::FAILURE
        }
    }
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_diagnostics(diagnostics: &[Diagnostic], source: &SourceFile) {
    if !diagnostics.is_empty() {
        eprintln!("{}", render_all(diagnostics, source));
    }
}

/// The memory plans of the JIT's training step (when the model trains) and inference, for
/// batches of the train block's batch size (32 without one).
fn memory_plans(
    kernels: &cnnc::backend::jit::JitKernels,
    program: &Program,
    checked: &cnnc::Checked,
) -> Vec<Plan> {
    let batch = checked.model.train.as_ref().map_or(32, |t| t.batch_size);
    let passes = if program.steps.is_empty() { vec![Pass::Infer] } else { vec![Pass::Train, Pass::Infer] };
    passes
        .into_iter()
        .map(|pass| cnnc::backend::reference::plan(kernels, program, pass, batch, true))
        .collect()
}

fn with_threads(threads: Option<usize>, f: impl FnOnce() -> anyhow::Result<()> + Send) -> anyhow::Result<()> {
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        builder = builder.num_threads(n);
    }
    builder.build().context("cannot start the worker threads")?.install(f)
}

fn dataset_of(checked: &cnnc::Checked) -> anyhow::Result<&'static cnnc::data::DatasetInfo> {
    let train =
        checked.model.train.as_ref().context("the file has no train block: add one with `data = mnist`")?;
    train.data.context(
        "the train block names no dataset: add `data = mnist` (or fashion_mnist); \
         this model can be checked and summarized, not trained",
    )
}

fn load_dataset(info: &'static cnnc::data::DatasetInfo) -> anyhow::Result<cnnc::data::Dataset> {
    let files = cnnc::data::fetch::locate(info, true, &mut |line| eprintln!("{line}"))?;
    cnnc::data::load(info, &files)
}

fn train(checked: &cnnc::Checked, source: &SourceFile, args: &TrainArgs, fuse: bool) -> anyhow::Result<()> {
    let train_block = checked.model.train.as_ref().context("the file has no train block")?;
    let mut config = RunConfig::from_train(train_block)?;
    if let Some(e) = args.epochs {
        if e == 0 {
            bail!("--epochs must be at least 1");
        }
        config.epochs = e;
    }
    if let Some(b) = args.batch_size {
        if b == 0 {
            bail!("--batch-size must be at least 1");
        }
        config.batch_size = b;
    }
    if let Some(lr) = args.lr {
        if !(lr > 0.0 && lr.is_finite()) {
            bail!("--lr must be a positive number, got {lr}");
        }
        config.set_lr(lr);
    }
    if let Some(s) = args.seed {
        config.seed = s;
    }
    let info = dataset_of(checked)?;
    let data = load_dataset(info)?;
    let mut train_split = data.train;
    if let Some(limit) = args.limit {
        train_split = train_split.take(limit);
    }
    let (train_split, validation) = train_split.split_off_validation(config.validation_split)?;
    let out_dir = args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(&checked.model.graph.name));
    let files = RunFiles { out_dir, resume: args.resume.clone() };
    config.backend = args.backend.into();
    config.fuse = fuse;
    config.test_every_epoch = args.test_every_epoch;
    let backend_name = match config.backend {
        driver::BackendKind::Reference => "reference",
        driver::BackendKind::Jit => "jit",
    };
    println!(
        "Training {} on {} ({} train, {} validation, {} test) with the {backend_name} backend, {} thread(s)",
        checked.model.graph.name,
        info.name,
        train_split.len,
        validation.as_ref().map_or(0, |v| v.len),
        data.test.len,
        rayon::current_num_threads()
    );
    let interactive = !args.quiet && std::io::stdout().is_terminal();
    let mut observer = Console::new(interactive);
    let summary = driver::train(
        checked,
        &source.text,
        &config,
        &train_split,
        validation.as_ref(),
        &data.test,
        &files,
        &mut observer,
    )?;
    println!(
        "Test: loss: {:.4} - accuracy: {:.4} ({} images)",
        summary.test_loss, summary.test_accuracy, data.test.len
    );
    println!(
        "Wrote {}, {} and {}",
        files.checkpoint().display(),
        files.metrics().display(),
        files.plot().display()
    );
    Ok(())
}

fn compile(checked: &cnnc::Checked, emit: Emit, kernel: Option<&str>, fuse: bool) -> anyhow::Result<()> {
    if emit == Emit::Ir {
        let program = cnnc::autodiff::build_with(checked, fuse)?;
        print!("{}", cnnc::ir::dump(&program.graph, Some(&program.shapes), &program.blocks));
        return Ok(());
    }
    let program = cnnc::autodiff::build_with(checked, fuse)?;
    let listing = cnnc::backend::jit::Listing { clif: emit == Emit::Clif, asm: emit == Emit::Asm };
    let optimizer = checked.model.train.as_ref().map(|t| &t.optimizer);
    let kernels = cnnc::backend::jit::JitKernels::compile_with(&program, listing, optimizer)?;
    if emit == Emit::Memory {
        for plan in memory_plans(&kernels, &program, checked) {
            println!("{}", plan.describe(&program));
        }
        return Ok(());
    }
    let mut shown = 0;
    for (name, text) in kernels.listings.iter().filter(|(name, _)| kernel.is_none_or(|k| name.contains(k))) {
        println!("; kernel {name}\n{text}");
        shown += 1;
    }
    if shown == 0 {
        let names: Vec<&str> = kernels.listings.iter().map(|(n, _)| n.as_str()).collect();
        bail!("no compiled kernel matches `{}`; the kernels are: {}", kernel.unwrap_or(""), names.join(", "));
    }
    eprintln!("compiled {} kernels in {:.1} ms", kernels.kernel_count(), kernels.compile_ms);
    Ok(())
}

fn eval(checked: &cnnc::Checked, weights: &Path, batch_size: usize, fuse: bool) -> anyhow::Result<()> {
    if checked.model.train.as_ref().and_then(|t| t.loss).is_none() {
        bail!("the file's train block names no loss, so there is nothing to evaluate against");
    }
    let program = std::sync::Arc::new(cnnc::autodiff::build_with(checked, fuse)?);
    let state = driver::load_weights(&program, weights)?;
    let data = load_dataset(dataset_of(checked)?)?;
    let optimizer = checked.model.train.as_ref().map(|t| t.optimizer).expect("checked above");
    let mut backend = driver::make_backend(driver::BackendKind::Jit, program.clone(), optimizer)?;
    let (loss, accuracy) =
        driver::evaluate(backend.as_mut(), &program, &state, &data.test, batch_size.max(1));
    println!("Test: loss: {loss:.4} - accuracy: {accuracy:.4} ({} images)", data.test.len);
    Ok(())
}

fn predict(
    checked: &cnnc::Checked,
    weights: &Path,
    paths: &[PathBuf],
    indices: &[usize],
    fuse: bool,
) -> anyhow::Result<()> {
    let program = std::sync::Arc::new(cnnc::autodiff::build_with(checked, fuse)?);
    let state = driver::load_weights(&program, weights)?;
    let input = program.shapes.shape(program.graph.input());
    let optimizer = checked
        .model
        .train
        .as_ref()
        .map_or(cnnc::ir::train::Optimizer::Sgd { lr: 0.01, momentum: 0.0 }, |t| t.optimizer);
    let mut backend = driver::make_backend(driver::BackendKind::Jit, program.clone(), optimizer)?;
    for path in paths {
        for (label, image) in cnnc::data::image::read_for_model(path, input, indices)? {
            let probs = backend.predict(&state, &image);
            let class = driver::argmax(&probs);
            let listed: Vec<String> = probs.iter().enumerate().map(|(i, p)| format!("{i}: {p:.4}")).collect();
            println!("{label}: class {class} (p = {:.4})  [{}]", probs[class], listed.join(", "));
        }
    }
    Ok(())
}

fn data(command: DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Dir => {
            println!("{}", cnnc::data::fetch::data_dir().display());
            Ok(())
        }
        DataCommand::Fetch { name } => {
            let info = cnnc::data::dataset(&name).with_context(|| {
                format!("unknown dataset `{name}`; known: {}", cnnc::data::dataset_names().join(", "))
            })?;
            let files = cnnc::data::fetch::locate(info, true, &mut |line| eprintln!("{line}"))?;
            println!(
                "{} is ready: {}",
                info.name,
                files.train_images.parent().unwrap_or(Path::new(".")).display()
            );
            Ok(())
        }
    }
}

/// Prints training progress: a progress bar per epoch on a terminal, one line per epoch always.
struct Console {
    bar: Option<indicatif::ProgressBar>,
    interactive: bool,
}

impl Console {
    fn new(interactive: bool) -> Self {
        Console { bar: None, interactive }
    }
}

impl driver::Observer for Console {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, steps: usize) {
        if self.interactive {
            let bar = indicatif::ProgressBar::new(steps as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "Epoch {prefix} {pos}/{len} [{bar:30}] {msg} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{epoch}/{epochs}"));
            self.bar = Some(bar);
        }
    }

    fn step(&mut self, done: usize, loss: f64, accuracy: f64, images_per_second: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            bar.set_message(format!(
                "loss: {loss:.4} - accuracy: {accuracy:.4} - {images_per_second:.0} img/s"
            ));
        }
    }

    fn epoch_end(&mut self, r: &EpochRecord, epochs: usize, steps: usize) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let mut line = format!(
            "Epoch {}/{epochs} - {steps}/{steps} steps - {:.1}s - {:.0} img/s - loss: {:.4} - accuracy: {:.4}",
            r.epoch, r.seconds, r.images_per_second, r.loss, r.accuracy
        );
        if let (Some(l), Some(a)) = (r.val_loss, r.val_accuracy) {
            line += &format!(" - val_loss: {l:.4} - val_accuracy: {a:.4}");
        }
        if let (Some(l), Some(a)) = (r.test_loss, r.test_accuracy) {
            line += &format!(" - test_loss: {l:.4} - test_accuracy: {a:.4}");
        }
        println!("{line}");
    }

    fn message(&mut self, text: &str) {
        println!("{text}");
    }
}
