//! Training end to end on the shipped MNIST fixtures (1000 training and 300 test digits):
//! learning happens, runs are reproducible, resuming continues exactly, and bad checkpoints,
//! bad data and NaNs stop with clear messages.

use std::path::{Path, PathBuf};
use std::process::Command;

use cnnc::data::{self, Split};
use cnnc::diagnostic::SourceFile;
use cnnc::train::driver::{self, RunConfig, RunFiles, Silent};

fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("train-tests").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn checked(text: &str) -> cnnc::Checked {
    cnnc::check(&SourceFile::new("t.cnn", text)).unwrap()
}

/// A small convnet on the fixtures, so that a test trains in a second or two.
const SMALL: &str = "model small {
    input 28x28x1
    conv2d(8, kernel=3, stride=2, activation=relu)
    maxpool(2)
    flatten
    dropout(0.2)
    dense(10, activation=softmax)
}
train { data = mnist  loss = categorical_crossentropy  optimizer = adam(lr=0.003)  batch_size = 32  epochs = 2  seed = 3 }";

/// (train, validation, test) from the fixtures; `limit` cuts the training set first.
fn fixtures(limit: usize) -> (Split, Option<Split>, Split) {
    let files = data::fetch::find_in(Path::new("tests/fixtures/mnist")).expect("fixtures are shipped");
    let dataset = data::load(data::dataset("mnist").unwrap(), &files).unwrap();
    let (train, validation) = dataset.train.take(limit).split_off_validation(0.1).unwrap();
    (train, validation, dataset.test)
}

fn run(text: &str, config: &RunConfig, limit: usize, files: &RunFiles) -> anyhow::Result<driver::RunSummary> {
    let checked = checked(text);
    let (train, validation, test) = fixtures(limit);
    driver::train(&checked, text, config, &train, validation.as_ref(), &test, files, &mut Silent)
}

fn config(text: &str) -> RunConfig {
    RunConfig::from_train(checked(text).model.train.as_ref().unwrap()).unwrap()
}

fn files(dir: &Path) -> RunFiles {
    RunFiles { out_dir: dir.to_path_buf(), resume: None }
}

#[test]
fn the_loss_falls_and_accuracy_rises_well_above_chance() {
    let dir = scratch("learns");
    let mut config = config(SMALL);
    config.epochs = 4;
    let summary = run(SMALL, &config, 1000, &files(&dir)).unwrap();
    let losses: Vec<f64> = summary.records.iter().map(|r| r.loss).collect();
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "the training loss should fall every epoch: {losses:?}");
    assert!(summary.test_accuracy > 0.6, "test accuracy {} (chance is 0.1)", summary.test_accuracy);
    assert!(summary.records.last().unwrap().val_accuracy.unwrap() > 0.6);

    // metrics.jsonl: one line per epoch, then the test results; the plot beside it
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    for (i, line) in lines[..4].iter().enumerate() {
        assert_eq!(line["epoch"], i + 1);
        for key in ["loss", "accuracy", "val_loss", "val_accuracy", "seconds", "images_per_second"] {
            assert!(line[key].as_f64().is_some_and(f64::is_finite), "{key} in {line}");
        }
    }
    assert_eq!(lines[4]["test_accuracy"].as_f64().unwrap(), summary.test_accuracy);
    let svg = std::fs::read_to_string(dir.join("metrics.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

#[test]
fn the_test_set_measured_every_epoch_changes_nothing_else() {
    let plain = run(SMALL, &config(SMALL), 300, &files(&scratch("test-plain"))).unwrap();
    let dir = scratch("test-every-epoch");
    let mut every = config(SMALL);
    every.test_every_epoch = true;
    let measured = run(SMALL, &every, 300, &files(&dir)).unwrap();
    assert_eq!(measured.state, plain.state, "measuring the test set must not touch the training");
    assert!(plain.records.iter().all(|r| r.test_accuracy.is_none()));
    // the last epoch's test accuracy is the run's: the same weights, the same test set
    let last = measured.records.last().unwrap();
    assert_eq!(last.test_accuracy, Some(measured.test_accuracy));
    assert_eq!(last.test_loss, Some(measured.test_loss));
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (line, record) in lines.iter().zip(&measured.records) {
        assert_eq!(line["test_accuracy"].as_f64(), record.test_accuracy, "{line}");
        assert!(line["test_loss"].as_f64().is_some_and(f64::is_finite), "{line}");
    }
}

#[test]
fn the_same_seed_gives_the_same_weights() {
    let a = run(SMALL, &config(SMALL), 300, &files(&scratch("seed-a"))).unwrap();
    let b = run(SMALL, &config(SMALL), 300, &files(&scratch("seed-b"))).unwrap();
    assert_eq!(a.state, b.state);
    let mut other = config(SMALL);
    other.seed = 4;
    let c = run(SMALL, &other, 300, &files(&scratch("seed-c"))).unwrap();
    assert_ne!(a.state.params, c.state.params);
}

#[test]
fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let whole = run(SMALL, &config(SMALL), 300, &files(&scratch("whole"))).unwrap();

    let dir = scratch("interrupted");
    let mut first = config(SMALL);
    first.epochs = 1;
    run(SMALL, &first, 300, &files(&dir)).unwrap();
    let resumed_files =
        RunFiles { out_dir: scratch("resumed"), resume: Some(dir.join("checkpoint.safetensors")) };
    let resumed = run(SMALL, &config(SMALL), 300, &resumed_files).unwrap();

    assert_eq!(resumed.state, whole.state, "weights, optimizer slots and step count must match bit for bit");
    assert_eq!(resumed.records.len(), 2);
    assert_eq!(resumed.records[1].loss, whole.records[1].loss);
    assert_eq!(resumed.test_loss, whole.test_loss);
}

#[test]
fn resuming_a_different_model_names_the_tensors_that_differ() {
    let dir = scratch("differ");
    let mut one = config(SMALL);
    one.epochs = 1;
    run(SMALL, &one, 100, &files(&dir)).unwrap();
    let wider = SMALL.replace("conv2d(8,", "conv2d(12,");
    let resume = RunFiles { out_dir: scratch("differ-2"), resume: Some(dir.join("checkpoint.safetensors")) };
    let error = run(&wider, &config(&wider), 100, &resume).unwrap_err().to_string();
    assert!(error.contains("cannot resume"), "{error}");
    assert!(error.contains("conv2d/kernel"), "{error}");
    assert!(error.contains("dense/kernel"), "{error}");
}

#[test]
fn a_nan_stops_training_and_keeps_the_last_good_checkpoint() {
    let dir = scratch("nan");
    let mut one = config(SMALL);
    one.epochs = 1;
    run(SMALL, &one, 200, &files(&dir)).unwrap();
    let good = std::fs::read(dir.join("checkpoint.safetensors")).unwrap();

    let mut exploding = config(SMALL);
    exploding.set_lr(1e30);
    let resume = RunFiles { out_dir: dir.clone(), resume: Some(dir.join("checkpoint.safetensors")) };
    let error = run(SMALL, &exploding, 200, &resume).unwrap_err().to_string();
    assert!(error.contains("the loss became"), "{error}");
    assert!(error.contains("at epoch 2, step"), "{error}");
    assert!(error.contains("from epoch 1, is kept"), "{error}");
    assert_eq!(
        std::fs::read(dir.join("checkpoint.safetensors")).unwrap(),
        good,
        "the good checkpoint is untouched"
    );
}

// -- the command line --

fn cnnc(args: &[&str], data_dir: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cnnc")).args(args).env("CNNC_DATA", data_dir).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn train_eval_and_predict_from_the_command_line() {
    let dir = scratch("cli");
    let model = dir.join("small.cnn");
    std::fs::write(&model, SMALL).unwrap();
    let out = dir.join("run");
    let (model, out_s) = (model.to_str().unwrap(), out.to_str().unwrap());
    let train = cnnc(
        &["train", model, "--epochs", "1", "--limit", "300", "--out", out_s, "--quiet"],
        "tests/fixtures",
    );
    let stdout = text(&train.stdout);
    assert!(train.status.success(), "{stdout}{}", text(&train.stderr));
    // SMALL has no validation_split: all 300 samples train, in 10 batches of 32
    assert!(stdout.contains("Training small on mnist (300 train, 0 validation, 300 test)"), "{stdout}");
    assert!(stdout.contains("with the jit backend"), "{stdout}");
    let compiled =
        stdout.lines().find_map(|l| l.strip_prefix("compiled ")).unwrap_or_else(|| panic!("{stdout}"));
    let (count, rest) = compiled.split_once(" kernels in ").unwrap_or_else(|| panic!("{stdout}"));
    assert!(count.parse::<usize>().unwrap() >= 10 && rest.ends_with(" ms"), "{stdout}");
    assert!(stdout.contains("Epoch 1/1 - 10/10 steps"), "{stdout}");
    assert!(!stdout.contains("val_accuracy"), "{stdout}");
    assert!(stdout.contains("Test: loss: "), "{stdout}");

    let weights = out.join("checkpoint.safetensors");
    let weights = weights.to_str().unwrap();
    let eval = cnnc(&["eval", model, "--weights", weights], "tests/fixtures");
    assert!(eval.status.success(), "{}", text(&eval.stderr));
    assert!(text(&eval.stdout).starts_with("Test: loss: "), "{}", text(&eval.stdout));

    let predict = cnnc(
        &[
            "predict",
            model,
            "--weights",
            weights,
            "tests/fixtures/mnist/t10k-images-idx3-ubyte.gz",
            "--index",
            "0,1",
        ],
        "tests/fixtures",
    );
    let lines = text(&predict.stdout);
    assert!(predict.status.success(), "{}", text(&predict.stderr));
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert!(lines.starts_with("tests/fixtures/mnist/t10k-images-idx3-ubyte.gz[0]: class "), "{lines}");
}

#[test]
fn a_broken_checkpoint_is_refused_with_a_message() {
    let dir = scratch("broken");
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"not a checkpoint at all").unwrap();
    let out = cnnc(&["eval", "models/mnist.cnn", "--weights", garbage.to_str().unwrap()], "tests/fixtures");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("garbage.safetensors"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn corrupt_data_is_refused_with_a_message() {
    let dir = scratch("corrupt-data");
    std::fs::create_dir_all(dir.join("mnist")).unwrap();
    for entry in std::fs::read_dir("tests/fixtures/mnist").unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join("mnist").join(path.file_name().unwrap())).unwrap();
    }
    // cut the training images short
    let images = dir.join("mnist/train-images-idx3-ubyte.gz");
    let bytes = std::fs::read(&images).unwrap();
    std::fs::write(&images, &bytes[..bytes.len() / 2]).unwrap();
    let out = cnnc(
        &["train", "models/mnist.cnn", "--epochs", "1", "--out", dir.join("run").to_str().unwrap()],
        dir.to_str().unwrap(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("train-images-idx3-ubyte.gz"), "{stderr}");
    assert!(!dir.join("run/checkpoint.safetensors").exists());
}

#[test]
fn a_model_without_a_dataset_cannot_be_trained() {
    let out = cnnc(&["train", "models/seed002.cnn"], "tests/fixtures");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("names no dataset"), "{}", text(&out.stderr));
}

#[test]
fn the_thread_count_does_not_change_the_result() {
    let in_pool = |threads: usize, name: &str| {
        let files = files(&scratch(name));
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| run(SMALL, &config(SMALL), 200, &files).unwrap())
    };
    let one = in_pool(1, "threads-1");
    let three = in_pool(3, "threads-3");
    assert_eq!(one.state, three.state, "every sum is taken in a fixed order");
}
