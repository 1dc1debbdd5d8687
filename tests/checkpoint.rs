//! Checkpoint files on disk: exact round trips, atomic saves that fail cleanly, and loads that
//! turn every kind of bad file into an error naming it, never a panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cnnc::train::checkpoint::{self, Checkpoint, Tensor};
use proptest::prelude::*;

/// A fresh, empty directory for one test, removed when the test ends (if it passed).
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("checkpoint-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Values a float format can get wrong: signed zeros, subnormals, extremes, infinities.
fn awkward_values() -> Vec<f32> {
    vec![
        0.0,
        -0.0,
        1.0,
        -1.5,
        f32::MIN_POSITIVE,
        f32::from_bits(1),            // smallest subnormal
        -f32::from_bits(0x007f_ffff), // largest subnormal, negative
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::EPSILON,
        std::f32::consts::PI,
        1e-30,
        3.4e38,
        -7.25e-12,
    ]
}

fn sample() -> Checkpoint {
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "cnnc-checkpoint-1".to_string());
    metadata.insert("epoch".to_string(), "3".to_string());
    metadata.insert("model".to_string(), "lenet \"5\" — ünïcode".to_string());
    Checkpoint {
        tensors: vec![
            Tensor::new("conv2d/kernel", vec![2, 2, 1, 4], awkward_values()),
            Tensor::new("conv2d/bias", vec![4], vec![0.1, -0.2, 0.3, -0.0]),
            Tensor::new("batch_normalization/moving_mean", vec![4], vec![1e-3, 2e3, -3e-3, 4.0]),
            Tensor::new(
                "optimizer/adam/m/conv2d/kernel",
                vec![16],
                (0..16).map(|i| i as f32 / 7.0).collect(),
            ),
            Tensor::new("optimizer/adam/step", vec![], vec![42.0]),
        ],
        metadata,
    }
}

fn bits(tensor: &Tensor) -> Vec<u32> {
    tensor.data.iter().map(|x| x.to_bits()).collect()
}

fn error_text(result: anyhow::Result<Checkpoint>) -> String {
    format!("{:#}", result.expect_err("loading should fail"))
}

#[test]
fn round_trip_is_bit_exact_and_sorted_by_name() {
    let dir = TestDir::new("round-trip");
    let path = dir.path("model.safetensors");
    let original = sample();
    checkpoint::save(&path, &original).unwrap();
    let loaded = checkpoint::load(&path).unwrap();

    let mut expected = original.tensors.clone();
    expected.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(loaded.tensors.len(), expected.len());
    for (got, want) in loaded.tensors.iter().zip(&expected) {
        assert_eq!(got.name, want.name);
        assert_eq!(got.shape, want.shape, "{}", want.name);
        assert_eq!(bits(got), bits(want), "{}", want.name);
    }
    assert_eq!(loaded.metadata, original.metadata);
    assert_eq!(dir.files(), ["model.safetensors"]);
}

#[test]
fn saving_twice_writes_the_same_bytes() {
    let dir = TestDir::new("deterministic");
    let (a, b) = (dir.path("a.safetensors"), dir.path("b.safetensors"));
    checkpoint::save(&a, &sample()).unwrap();
    let mut reordered = sample();
    reordered.tensors.reverse();
    checkpoint::save(&b, &reordered).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

/// `save` lays the file out itself (for stable metadata order); with at most one metadata key
/// the order question does not arise, and its bytes must be exactly the safetensors crate's.
#[test]
fn layout_matches_the_safetensors_crate() {
    let dir = TestDir::new("layout");
    let mut one_key = sample();
    one_key.metadata.retain(|k, _| k == "model");
    let mut no_metadata = sample();
    no_metadata.metadata.clear();
    for (what, checkpoint) in [("one metadata key", one_key), ("no metadata", no_metadata)] {
        let path = dir.path("ckpt.safetensors");
        checkpoint::save(&path, &checkpoint).unwrap();
        let data: Vec<Vec<u8>> = checkpoint
            .tensors
            .iter()
            .map(|t| t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = checkpoint.tensors.iter().zip(&data).map(|(t, bytes)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), bytes);
            (t.name.clone(), view.unwrap())
        });
        let metadata =
            (!checkpoint.metadata.is_empty()).then(|| checkpoint.metadata.clone().into_iter().collect());
        let expected = safetensors::serialize(views, metadata).unwrap();
        assert!(std::fs::read(&path).unwrap() == expected, "{what}: bytes differ from the crate's");
    }
}

#[test]
fn save_replaces_an_existing_checkpoint() {
    let dir = TestDir::new("replace");
    let path = dir.path("ckpt.safetensors");
    checkpoint::save(&path, &sample()).unwrap();
    let newer = Checkpoint { tensors: vec![Tensor::new("w", vec![1], vec![9.0])], metadata: BTreeMap::new() };
    checkpoint::save(&path, &newer).unwrap();
    assert_eq!(checkpoint::load(&path).unwrap(), newer);
    assert_eq!(dir.files(), ["ckpt.safetensors"]);
}

#[test]
fn a_failed_save_leaves_the_old_checkpoint_and_no_temp_files() {
    let dir = TestDir::new("atomic");
    let path = dir.path("ckpt.safetensors");
    checkpoint::save(&path, &sample()).unwrap();
    let before = std::fs::read(&path).unwrap();

    let mut mismatched = sample();
    mismatched.tensors[1].data.push(1.0);
    let mut duplicated = sample();
    duplicated.tensors.push(Tensor::new("conv2d/bias", vec![1], vec![0.0]));
    let in_the_way = dir.path("in-the-way");
    std::fs::create_dir(&in_the_way).unwrap();
    // (what is wrong, the checkpoint, where it goes, the error names)
    let cases = [
        ("data longer than its shape", mismatched, path.clone(), "tensor `conv2d/bias` has 5 values"),
        ("a duplicate name", duplicated, path.clone(), "two tensors are called `conv2d/bias`"),
        (
            "a missing directory",
            sample(),
            dir.path("missing/ckpt.safetensors"),
            "cannot create temporary file",
        ),
        // A directory in the way makes the rename itself fail, after the temp file is written.
        ("a directory at the target", sample(), in_the_way, "cannot rename"),
    ];
    for (what, checkpoint, target, expected) in cases {
        let error = format!("{:#}", checkpoint::save(&target, &checkpoint).unwrap_err());
        assert!(error.contains(&format!("cannot save checkpoint `{}`", target.display())), "{what}: {error}");
        assert!(error.contains(expected), "{what}: {error:?} should contain {expected:?}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "{what}: the old checkpoint changed");
        assert_eq!(dir.files(), ["ckpt.safetensors", "in-the-way"], "{what}: files left behind");
    }
}

#[test]
fn load_errors_name_the_file_and_the_problem() {
    let dir = TestDir::new("load-errors");
    let good = dir.path("good.safetensors");
    checkpoint::save(&good, &sample()).unwrap();
    let good_bytes = std::fs::read(&good).unwrap();

    let f64_tensor = [1.0f64, 2.0];
    let f64_bytes: Vec<u8> = f64_tensor.iter().flat_map(|x| x.to_le_bytes()).collect();
    let f32_bytes: Vec<u8> = [1.0f32].iter().flat_map(|x| x.to_le_bytes()).collect();
    let mixed = safetensors::serialize(
        [
            (
                "a/f32",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &f32_bytes).unwrap(),
            ),
            (
                "b/f64",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![2], &f64_bytes).unwrap(),
            ),
        ],
        None,
    )
    .unwrap();

    // (file, contents, the error names)
    let cases: [(&str, Option<Vec<u8>>, &str); 6] = [
        ("missing.safetensors", None, "cannot read checkpoint"),
        ("empty.safetensors", Some(vec![]), "is this a cnnc checkpoint?"),
        ("text.safetensors", Some(b"model lenet { input 28x28x1 }".to_vec()), "is this a cnnc checkpoint?"),
        (
            "truncated.safetensors",
            Some(good_bytes[..good_bytes.len() - 4].to_vec()),
            "is this a cnnc checkpoint?",
        ),
        ("padded.safetensors", Some([&good_bytes[..], &[0u8; 4]].concat()), "is this a cnnc checkpoint?"),
        ("f64.safetensors", Some(mixed), "tensor `b/f64` has dtype F64, but cnnc checkpoints hold only F32"),
    ];
    for (file, contents, expected) in cases {
        let path = dir.path(file);
        if let Some(bytes) = contents {
            std::fs::write(&path, bytes).unwrap();
        }
        let error = error_text(checkpoint::load(&path));
        assert!(error.contains(&format!("checkpoint `{}`", path.display())), "{file}: {error}");
        assert!(error.contains(expected), "{file}: {error:?} should contain {expected:?}");
    }
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    let dir = TestDir::new("truncations");
    let good = dir.path("good.safetensors");
    checkpoint::save(&good, &sample()).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path("cut.safetensors");
    for len in 0..bytes.len() {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let error = error_text(checkpoint::load(&cut));
        assert!(error.contains("is this a cnnc checkpoint?"), "cut at {len}: {error}");
    }
}

/// A header whose offsets add up to nearly `u64::MAX`: the safetensors crate's own end-of-data
/// sum would overflow on it.
#[test]
fn offsets_past_the_end_are_an_error_not_an_overflow() {
    let dir = TestDir::new("overflow");
    let big = (1u64 << 61) - 1; // the most U8 elements whose bit count fits in a u64
    let mut entries = Vec::new();
    let mut start = 0u64;
    for (i, size) in std::iter::repeat_n(big, 8).chain([4]).enumerate() {
        entries.push(format!(
            r#""t{i}":{{"dtype":"U8","shape":[{size}],"data_offsets":[{start},{}]}}"#,
            start + size
        ));
        start += size;
    }
    let header = format!("{{{}}}", entries.join(","));
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    let path = dir.path("overflow.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let error = error_text(checkpoint::load(&path));
    assert!(error.contains("past the end of the"), "{error}");
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let dir = TestDir::new("random");
        let path = dir.path("random.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let _ = checkpoint::load(&path);
    }

    #[test]
    fn corrupted_valid_files_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let dir = TestDir::new("corrupted");
        let path = dir.path("corrupted.safetensors");
        checkpoint::save(&path, &sample()).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        for (index, byte) in edits {
            let i = index.index(bytes.len());
            bytes[i] = byte;
        }
        std::fs::write(&path, &bytes).unwrap();
        let _ = checkpoint::load(&path);
    }
}
