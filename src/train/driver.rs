//! The training driver: epochs of shuffled batches through a backend, validation, the
//! Keras-style log, `metrics.jsonl`, the plot, checkpoints after every epoch, and resuming.
//!
//! Architecture invariant: the driver moves data and state between the dataset, the backend and
//! the disk; it computes no op itself. Everything random derives from the seed and counters
//! (epoch, step), so a run is reproducible and a checkpoint holds all it needs to resume.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::Checked;
use crate::autodiff::{self, Program};
use crate::backend::Backend;
use crate::backend::reference::Reference;
use crate::data::Split;
use crate::fsutil::write_atomically;
use crate::ir::train::{Loss, Optimizer, TrainConfig};
use crate::rng::Rng;
use crate::train::checkpoint::{self, Checkpoint, Tensor};
use crate::train::metrics::EpochRecord;
use crate::train::plot;
use crate::train::state::{State, slot_names};

/// Which backend runs the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// Plain loops over ndarray: slow, obviously correct, the oracle.
    Reference,
    /// Convolutions and dense layers compiled with Cranelift for the model's shapes.
    #[default]
    Jit,
}

/// Builds the chosen backend for a program.
pub fn make_backend(
    kind: BackendKind,
    program: Arc<Program>,
    optimizer: Optimizer,
) -> anyhow::Result<Box<dyn Backend>> {
    Ok(match kind {
        BackendKind::Reference => Box::new(Reference::new(program, optimizer)),
        BackendKind::Jit => Box::new(crate::backend::jit::Jit::new(program, optimizer)?),
    })
}

/// The settings of a run: the train block's, with the command line's overrides applied.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: Optimizer,
    pub seed: u64,
    pub validation_split: f32,
    pub loss: Loss,
    pub backend: BackendKind,
    /// Run the fusion pass (conv/dense + batchnorm + relu as one block).
    pub fuse: bool,
    /// Also measure the test set after every epoch (not counted in the epoch's seconds), to
    /// see when a model reaches an accuracy.
    pub test_every_epoch: bool,
}

impl RunConfig {
    pub fn from_train(train: &TrainConfig) -> anyhow::Result<Self> {
        let loss = train.loss.context("the train block has no loss")?;
        Ok(RunConfig {
            epochs: train.epochs,
            batch_size: train.batch_size,
            optimizer: train.optimizer,
            seed: train.seed,
            validation_split: train.validation_split,
            loss,
            backend: BackendKind::default(),
            fuse: true,
            test_every_epoch: false,
        })
    }

    pub fn set_lr(&mut self, lr: f32) {
        match &mut self.optimizer {
            Optimizer::Sgd { lr: l, .. } | Optimizer::Adam { lr: l, .. } => *l = lr,
        }
    }
}

/// Where a run's files go, and whether it continues an earlier one.
#[derive(Debug, Clone)]
pub struct RunFiles {
    pub out_dir: PathBuf,
    pub resume: Option<PathBuf>,
}

impl RunFiles {
    pub fn checkpoint(&self) -> PathBuf {
        self.out_dir.join("checkpoint.safetensors")
    }
    pub fn metrics(&self) -> PathBuf {
        self.out_dir.join("metrics.jsonl")
    }
    pub fn plot(&self) -> PathBuf {
        self.out_dir.join("metrics.svg")
    }
}

/// Hears what a run does; the command line prints it, tests ignore it.
pub trait Observer {
    fn epoch_start(&mut self, _epoch: usize, _epochs: usize, _steps: usize) {}
    /// After each step: steps done in this epoch, running mean loss and accuracy.
    fn step(&mut self, _done: usize, _loss: f64, _accuracy: f64, _images_per_second: f64) {}
    fn epoch_end(&mut self, _record: &EpochRecord, _epochs: usize, _steps: usize) {}
    fn message(&mut self, _text: &str) {}
}

/// An observer that hears nothing.
pub struct Silent;
impl Observer for Silent {}

/// What a finished run measured.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub records: Vec<EpochRecord>,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub state: State,
}

/// Loss and accuracy of a model over a split, in inference mode.
pub fn evaluate(
    backend: &mut dyn Backend,
    program: &Program,
    state: &State,
    split: &Split,
    batch_size: usize,
) -> (f64, f64) {
    let sample = split.images.len() / split.len.max(1);
    let width = program.output_width();
    let (mut loss, mut correct) = (0.0, 0usize);
    for start in (0..split.len).step_by(batch_size.max(1)) {
        let end = (start + batch_size).min(split.len);
        let probs = backend.predict(state, &split.images[start * sample..end * sample]);
        for (i, label) in split.labels[start..end].iter().enumerate() {
            let p = &probs[i * width..(i + 1) * width];
            let (l, right) = sample_loss(program.loss, p, *label);
            loss += l;
            correct += usize::from(right);
        }
    }
    let n = split.len.max(1) as f64;
    (loss / n, correct as f64 / n)
}

/// One sample's loss from probabilities (clipped as Keras clips them) and whether it is right.
fn sample_loss(loss: Option<Loss>, p: &[f32], label: u8) -> (f64, bool) {
    const EPSILON: f64 = 1e-7;
    let clip = |x: f32| f64::from(x).clamp(EPSILON, 1.0 - EPSILON);
    match loss {
        Some(Loss::BinaryCrossentropy) => {
            let q = clip(p[0]);
            let l = if label == 1 { -q.ln() } else { -(1.0 - q).ln() };
            (l, (p[0] >= 0.5) == (label == 1))
        }
        _ => {
            let predicted = argmax(p);
            (-clip(p[label as usize]).ln(), predicted == label as usize)
        }
    }
}

pub fn argmax(p: &[f32]) -> usize {
    p.iter().enumerate().fold(0, |best, (i, v)| if *v > p[best] { i } else { best })
}

/// Trains `checked` on `train` (validating on `validation`, testing on `test`).
#[allow(clippy::too_many_arguments)]
pub fn train(
    checked: &Checked,
    source_text: &str,
    config: &RunConfig,
    train: &Split,
    validation: Option<&Split>,
    test: &Split,
    files: &RunFiles,
    observer: &mut dyn Observer,
) -> anyhow::Result<RunSummary> {
    let program = Arc::new(autodiff::build_with(checked, config.fuse)?);
    let mut backend = make_backend(config.backend, program.clone(), config.optimizer)?;
    if let Some(report) = backend.compile_report() {
        observer.message(&report);
    }
    if let Some(plan) = backend.memory_plan(crate::memory::Pass::Train, config.batch_size) {
        observer.message(&format!("memory: {plan}"));
    }
    std::fs::create_dir_all(&files.out_dir)
        .with_context(|| format!("cannot create the output directory `{}`", files.out_dir.display()))?;

    let (mut state, mut records, start_epoch, mut step) = match &files.resume {
        Some(path) => {
            let resumed = resume(&program, config, path)?;
            observer.message(&format!("resuming from {} after epoch {}", path.display(), resumed.2));
            resumed
        }
        None => (State::init(&program, &config.optimizer, config.seed), Vec::new(), 0, 0),
    };
    if train.len == 0 {
        bail!("there are no training samples (check --limit and validation_split)");
    }
    let sample = train.images.len() / train.len;
    let steps_per_epoch = train.len.div_ceil(config.batch_size);
    let mut images = Vec::with_capacity(config.batch_size * sample);
    let mut labels = Vec::with_capacity(config.batch_size);

    for epoch in start_epoch..config.epochs {
        observer.epoch_start(epoch + 1, config.epochs, steps_per_epoch);
        let started = Instant::now();
        let mut order: Vec<usize> = (0..train.len).collect();
        Rng::new(config.seed, &[0x5AFF1E, epoch as u64]).shuffle(&mut order);
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
        for (batch_index, batch) in order.chunks(config.batch_size).enumerate() {
            images.clear();
            labels.clear();
            for &i in batch {
                images.extend_from_slice(&train.images[i * sample..(i + 1) * sample]);
                labels.push(train.labels[i]);
            }
            let result = backend.train_step(&mut state, &images, &labels, step);
            if !result.loss_sum.is_finite() {
                let kept = if epoch > 0 || files.resume.is_some() {
                    format!(
                        "the last good checkpoint, from epoch {epoch}, is kept at {}",
                        files.checkpoint().display()
                    )
                } else {
                    "no checkpoint was written".to_string()
                };
                bail!(
                    "the loss became {} at epoch {}, step {} (global step {}): training stopped; {kept}. \
                     Try a smaller learning rate (--lr).",
                    result.loss_sum,
                    epoch + 1,
                    batch_index + 1,
                    step + 1
                );
            }
            step += 1;
            loss_sum += result.loss_sum;
            correct += result.correct;
            seen += batch.len();
            let rate = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
            observer.step(batch_index + 1, loss_sum / seen as f64, correct as f64 / seen as f64, rate);
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let (val_loss, val_accuracy) = match validation {
            Some(v) if v.len > 0 => {
                let (l, a) = evaluate(backend.as_mut(), &program, &state, v, config.batch_size);
                (Some(l), Some(a))
            }
            _ => (None, None),
        };
        let seconds = started.elapsed().as_secs_f64();
        let (test_loss, test_accuracy) = if config.test_every_epoch {
            let (l, a) = evaluate(backend.as_mut(), &program, &state, test, config.batch_size);
            (Some(l), Some(a))
        } else {
            (None, None)
        };
        let record = EpochRecord {
            epoch: epoch + 1,
            loss: loss_sum / seen as f64,
            accuracy: correct as f64 / seen as f64,
            val_loss,
            val_accuracy,
            seconds,
            images_per_second: seen as f64 / train_seconds.max(1e-9),
            test_loss,
            test_accuracy,
        };
        records.push(record.clone());
        observer.epoch_end(&record, config.epochs, steps_per_epoch);
        let ckpt = to_checkpoint(&program, config, &state, source_text, epoch + 1, step, &records);
        checkpoint::save(&files.checkpoint(), &ckpt)?;
        write_metrics(files, &records, None)?;
        write_atomically(&files.plot(), plot::loss_accuracy_svg(&program.graph.name, &records).as_bytes())?;
    }

    let (test_loss, test_accuracy) = evaluate(backend.as_mut(), &program, &state, test, config.batch_size);
    write_metrics(files, &records, Some((test_loss, test_accuracy)))?;
    Ok(RunSummary { records, test_loss, test_accuracy, state })
}

/// metrics.jsonl: one object per epoch, then the test results once known.
fn write_metrics(files: &RunFiles, records: &[EpochRecord], test: Option<(f64, f64)>) -> anyhow::Result<()> {
    let mut text = String::new();
    for r in records {
        text += &format!("{}\n", r.to_json());
    }
    if let Some((loss, accuracy)) = test {
        text += &format!("{}\n", json!({"test_loss": loss, "test_accuracy": accuracy}));
    }
    write_atomically(&files.metrics(), text.as_bytes())
}

fn optimizer_name(optimizer: &Optimizer) -> String {
    match optimizer {
        Optimizer::Sgd { lr, momentum } => format!("sgd(lr={lr}, momentum={momentum})"),
        Optimizer::Adam { lr, beta1, beta2, epsilon } => {
            format!("adam(lr={lr}, beta1={beta1}, beta2={beta2}, epsilon={epsilon})")
        }
    }
}

/// The state as a checkpoint: parameters under their Keras names, optimizer slots under
/// `optimizer/<slot>/<name>`, and what resuming needs in the metadata.
pub fn to_checkpoint(
    program: &Program,
    config: &RunConfig,
    state: &State,
    source_text: &str,
    epoch: usize,
    step: u64,
    records: &[EpochRecord],
) -> Checkpoint {
    let mut tensors = Vec::new();
    for (p, value) in program.params.iter().zip(&state.params) {
        tensors.push(Tensor {
            name: p.name.clone(),
            shape: value.shape().to_vec(),
            data: value.iter().copied().collect(),
        });
    }
    let names = slot_names(&config.optimizer);
    for (p, slots) in program.params.iter().zip(&state.slots) {
        for (slot, value) in names.iter().zip(slots) {
            tensors.push(Tensor {
                name: format!("optimizer/{slot}/{}", p.name),
                shape: value.shape().to_vec(),
                data: value.iter().copied().collect(),
            });
        }
    }
    let history: Vec<serde_json::Value> = records.iter().map(EpochRecord::to_json).collect();
    let metadata = [
        ("format", "cnnc-checkpoint/1".to_string()),
        ("model", program.graph.name.clone()),
        ("source", source_text.to_string()),
        ("epoch", epoch.to_string()),
        ("step", step.to_string()),
        ("iterations", state.iterations.to_string()),
        ("seed", state.seed.to_string()),
        ("batch_size", config.batch_size.to_string()),
        ("optimizer", optimizer_name(&config.optimizer)),
        ("history", serde_json::to_string(&history).expect("JSON values serialize")),
    ];
    Checkpoint { tensors, metadata: metadata.into_iter().map(|(k, v)| (k.to_string(), v)).collect() }
}

/// The tensor names and shapes a checkpoint of this program must hold.
pub fn expected_tensors(program: &Program, optimizer: Option<&Optimizer>) -> Vec<(String, Vec<usize>)> {
    let mut expected: Vec<(String, Vec<usize>)> =
        program.params.iter().map(|p| (p.name.clone(), p.spec.shape.clone())).collect();
    if let Some(optimizer) = optimizer {
        for p in program.params.iter().filter(|p| p.spec.trainable) {
            for slot in slot_names(optimizer) {
                expected.push((format!("optimizer/{slot}/{}", p.name), p.spec.shape.clone()));
            }
        }
    }
    expected
}

/// Reads the parameters (only) of a checkpoint into a fresh state, checking every shape.
pub fn load_weights(program: &Program, path: &Path) -> anyhow::Result<State> {
    let ckpt = checkpoint::load(path)?;
    let problems = checkpoint::diff_shapes(&expected_tensors(program, None), &without_optimizer(&ckpt));
    if !problems.is_empty() {
        bail!("`{}` does not fit this model:\n  {}", path.display(), problems.join("\n  "));
    }
    let mut state = State::init(program, &Optimizer::Sgd { lr: 0.01, momentum: 0.0 }, 0);
    for (index, p) in program.params.iter().enumerate() {
        state.params[index] = tensor_array(&ckpt, &p.name)?;
    }
    Ok(state)
}

fn without_optimizer(ckpt: &Checkpoint) -> Checkpoint {
    Checkpoint {
        tensors: ckpt.tensors.iter().filter(|t| !t.name.starts_with("optimizer/")).cloned().collect(),
        metadata: ckpt.metadata.clone(),
    }
}

fn tensor_array(ckpt: &Checkpoint, name: &str) -> anyhow::Result<ndarray::ArrayD<f32>> {
    let t = ckpt
        .tensors
        .iter()
        .find(|t| t.name == name)
        .with_context(|| format!("the checkpoint has no tensor `{name}`"))?;
    ndarray::ArrayD::from_shape_vec(t.shape.clone(), t.data.clone())
        .with_context(|| format!("tensor `{name}` is malformed"))
}

type Resumed = (State, Vec<EpochRecord>, usize, u64);

/// Restores a run from its checkpoint, refusing one whose tensors do not fit the model.
fn resume(program: &Program, config: &RunConfig, path: &Path) -> anyhow::Result<Resumed> {
    let ckpt = checkpoint::load(path)?;
    let problems = checkpoint::diff_shapes(&expected_tensors(program, Some(&config.optimizer)), &ckpt);
    if !problems.is_empty() {
        bail!(
            "cannot resume from `{}`: it does not fit this model and optimizer:\n  {}",
            path.display(),
            problems.join("\n  ")
        );
    }
    let meta = |key: &str| -> anyhow::Result<String> {
        ckpt.metadata
            .get(key)
            .cloned()
            .with_context(|| format!("`{}` lacks `{key}` in its metadata", path.display()))
    };
    let number = |key: &str| -> anyhow::Result<u64> {
        meta(key)?.parse().with_context(|| format!("`{}` has a malformed `{key}`", path.display()))
    };
    let batch_size = number("batch_size")? as usize;
    if batch_size != config.batch_size {
        bail!(
            "`{}` was trained with batch size {batch_size}, this run uses {}: resuming would not continue the same run",
            path.display(),
            config.batch_size
        );
    }
    let mut state = State::init(program, &config.optimizer, number("seed")?);
    state.iterations = number("iterations")?;
    let names = slot_names(&config.optimizer);
    for (index, p) in program.params.iter().enumerate() {
        state.params[index] = tensor_array(&ckpt, &p.name)?;
        for (slot, name) in names.iter().enumerate().take(state.slots[index].len()) {
            state.slots[index][slot] = tensor_array(&ckpt, &format!("optimizer/{name}/{}", p.name))?;
        }
    }
    let history: Vec<serde_json::Value> = serde_json::from_str(&meta("history")?)
        .with_context(|| format!("`{}` has a malformed history", path.display()))?;
    let records = history.iter().map(EpochRecord::from_json).collect();
    Ok((state, records, number("epoch")? as usize, number("step")?))
}
