//! Checkpoints: a self-describing safetensors bundle of named f32 tensors and string metadata,
//! one file, readable by any safetensors reader (Python's `safetensors` included).
//!
//! This module knows nothing about models, layers or optimizers: tensor names, shapes and
//! metadata keys are the caller's. It must never leave a half-written checkpoint where a good
//! one was, and never panic on a file's bytes, whatever they are.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use anyhow::{Context as _, bail};
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};

/// One named f32 tensor, row-major (C order), as safetensors stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// e.g. `conv2d/kernel`, `batch_normalization/moving_mean`, `optimizer/adam/m/conv2d/kernel`.
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Everything a checkpoint holds. `load` returns the tensors sorted by name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Checkpoint {
    pub tensors: Vec<Tensor>,
    /// Stored in the file's `__metadata__` header (string to string, as safetensors allows).
    pub metadata: BTreeMap<String, String>,
}

impl Tensor {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        Tensor { name: name.into(), shape, data }
    }
}

impl Checkpoint {
    /// The tensor called `name`, if the checkpoint has it.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Each tensor's name and shape, in the checkpoint's order: what [`diff_shapes`] compares.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect()
    }

    /// The metadata value for `key`; an error naming the key when it is absent.
    pub fn meta(&self, key: &str) -> anyhow::Result<&str> {
        match self.metadata.get(key) {
            Some(value) => Ok(value),
            None => bail!("the checkpoint has no `{key}` in its metadata"),
        }
    }

    /// The metadata value for `key`, parsed (an epoch count, a learning rate); an error naming
    /// the key and the value when it is absent or does not parse.
    pub fn meta_parse<T>(&self, key: &str) -> anyhow::Result<T>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        let value = self.meta(key)?;
        value.parse().map_err(|e| anyhow::anyhow!("the checkpoint's `{key}` is `{value}`: {e}"))
    }
}

/// Writes `checkpoint` to `path` atomically: either the new checkpoint is there, complete, or
/// whatever was at `path` before is untouched.
pub fn save(path: &Path, checkpoint: &Checkpoint) -> anyhow::Result<()> {
    let save = || -> anyhow::Result<()> {
        let bytes = to_bytes(checkpoint)?;
        crate::fsutil::write_atomically(path, &bytes)
    };
    save().with_context(|| format!("cannot save checkpoint `{}`", path.display()))
}

/// Reads a checkpoint written by [`save`] (or by any safetensors writer, if every tensor is F32).
pub fn load(path: &Path) -> anyhow::Result<Checkpoint> {
    let bytes = fs::read(path).with_context(|| format!("cannot read checkpoint `{}`", path.display()))?;
    from_bytes(&bytes).with_context(|| format!("cannot load checkpoint `{}`", path.display()))
}

/// One line per tensor that is missing from `found`, unexpected in it, or shaped differently;
/// empty when the checkpoint fits the model. Model order first, then the unexpected ones.
pub fn diff_shapes(expected: &[(String, Vec<usize>)], found: &Checkpoint) -> Vec<String> {
    let mut lines = Vec::new();
    for (name, shape) in expected {
        match found.tensor(name) {
            None => lines.push(format!("{name}: the model has {shape:?}, the checkpoint lacks it")),
            Some(t) if t.shape != *shape => {
                lines.push(format!("{name}: checkpoint has {:?}, the model has {shape:?}", t.shape))
            }
            Some(_) => {}
        }
    }
    let expected_names: BTreeSet<&str> = expected.iter().map(|(name, _)| name.as_str()).collect();
    for t in &found.tensors {
        if !expected_names.contains(t.name.as_str()) {
            lines.push(format!("{}: checkpoint has {:?}, the model has no such tensor", t.name, t.shape));
        }
    }
    lines
}

/// Checks the checkpoint and lays it out as safetensors bytes.
fn to_bytes(checkpoint: &Checkpoint) -> anyhow::Result<Vec<u8>> {
    let mut seen = BTreeSet::new();
    for t in &checkpoint.tensors {
        if t.name.is_empty() {
            bail!("a tensor has an empty name");
        }
        // The header is one JSON object: a tensor with this name would collide with the metadata.
        if t.name == "__metadata__" {
            bail!("a tensor cannot be called `__metadata__`");
        }
        if !seen.insert(t.name.as_str()) {
            bail!("two tensors are called `{}`", t.name);
        }
        let count = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if count != Some(t.data.len()) {
            let holds = count.map_or("more than usize::MAX".to_string(), |n| n.to_string());
            bail!(
                "tensor `{}` has {} values, but its shape {:?} holds {holds}",
                t.name,
                t.data.len(),
                t.shape
            );
        }
    }

    // The header is written here rather than by `safetensors::serialize`, which passes the
    // metadata through a `HashMap` and so orders its keys differently on every run. Written here,
    // the same checkpoint always gives the same bytes (and the same hash). The layout is the
    // crate's: tensors sorted by name, header padded with spaces to a multiple of 8 bytes.
    let mut tensors: Vec<&Tensor> = checkpoint.tensors.iter().collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    if !checkpoint.metadata.is_empty() {
        header.insert("__metadata__".to_string(), serde_json::json!(checkpoint.metadata));
    }
    let mut offset = 0usize;
    for t in &tensors {
        let end = t
            .data
            .len()
            .checked_mul(4)
            .and_then(|n| n.checked_add(offset))
            .context("checkpoint too large")?;
        let info = serde_json::json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [offset, end] });
        header.insert(t.name.clone(), info);
        offset = end;
    }
    let mut header = serde_json::to_vec(&header)?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let mut bytes = Vec::with_capacity(8 + header.len() + offset);
    bytes.extend((header.len() as u64).to_le_bytes());
    bytes.extend(header);
    for t in &tensors {
        bytes.extend(t.data.iter().flat_map(|x| x.to_le_bytes()));
    }
    Ok(bytes)
}

/// Parses safetensors bytes into a checkpoint, tensors sorted by name.
fn from_bytes(bytes: &[u8]) -> anyhow::Result<Checkpoint> {
    const NOT_SAFETENSORS: &str = "not a valid safetensors file (is this a cnnc checkpoint?)";
    check_offsets_within(bytes).context(NOT_SAFETENSORS)?;
    let (header_len, header) = SafeTensors::read_metadata(bytes).context(NOT_SAFETENSORS)?;
    // `read_metadata` has checked that the header's offsets tile the rest of the file exactly.
    let data = bytes.get(8 + header_len..).context(NOT_SAFETENSORS)?;

    let mut tensors = Vec::new();
    for (name, info) in header.tensors() {
        if info.dtype != Dtype::F32 {
            bail!("tensor `{name}` has dtype {:?}, but cnnc checkpoints hold only F32", info.dtype);
        }
        let (start, end) = info.data_offsets;
        let raw = data.get(start..end).with_context(|| format!("tensor `{name}`: {NOT_SAFETENSORS}"))?;
        let data = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        tensors.push(Tensor { name, shape: info.shape.clone(), data });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let metadata = metadata_of(&header);
    Ok(Checkpoint { tensors, metadata })
}

fn metadata_of(header: &Metadata) -> BTreeMap<String, String> {
    header.metadata().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Refuses a header whose data offsets point past the end of the file.
///
/// The safetensors crate (0.8) adds the last offset to the header length unchecked, so an offset
/// near `u64::MAX` would overflow, and with overflow checks on (our release profile) panic. Such
/// an offset is wrong anyway; anything this check cannot read is left for the crate to report.
fn check_offsets_within(bytes: &[u8]) -> anyhow::Result<()> {
    let Some(header) = header_json(bytes) else { return Ok(()) };
    let file_len = bytes.len() as u64;
    for (name, info) in &header {
        let offsets = info.get("data_offsets").and_then(|o| o.as_array());
        for offset in offsets.into_iter().flatten().filter_map(|o| o.as_u64()) {
            if offset > file_len {
                bail!(
                    "tensor `{name}` claims data at byte {offset}, past the end of the {file_len}-byte file"
                );
            }
        }
    }
    Ok(())
}

/// The header as a JSON object, when the length prefix and the JSON are readable.
fn header_json(bytes: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = usize::try_from(len).ok()?.checked_add(8)?;
    match serde_json::from_slice(bytes.get(8..end)?).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(name, shape.to_vec(), (0..n).map(|i| i as f32).collect())
    }

    fn ckpt(tensors: Vec<Tensor>) -> Checkpoint {
        Checkpoint { tensors, metadata: BTreeMap::new() }
    }

    #[test]
    fn invalid_checkpoints_are_refused_before_writing() {
        // (tensors, the error names)
        let cases = [
            (
                vec![Tensor::new("a", vec![2, 3], vec![0.0; 5])],
                "tensor `a` has 5 values, but its shape [2, 3] holds 6",
            ),
            (vec![Tensor::new("a", vec![], vec![])], "tensor `a` has 0 values, but its shape [] holds 1"),
            (vec![Tensor::new("a", vec![usize::MAX, 2], vec![])], "holds more than usize::MAX"),
            (vec![t("a", &[2]), t("b", &[1]), t("a", &[2])], "two tensors are called `a`"),
            (vec![t("", &[1])], "a tensor has an empty name"),
            (vec![t("__metadata__", &[1])], "cannot be called `__metadata__`"),
        ];
        for (tensors, expected) in cases {
            let error = to_bytes(&ckpt(tensors)).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} should contain {expected:?}");
        }
    }

    #[test]
    fn empty_and_scalar_tensors_are_valid() {
        let cases = [
            ckpt(vec![]),
            ckpt(vec![Tensor::new("scalar", vec![], vec![2.5])]),
            ckpt(vec![Tensor::new("empty", vec![0, 4], vec![])]),
        ];
        for checkpoint in cases {
            let back = from_bytes(&to_bytes(&checkpoint).unwrap()).unwrap();
            assert_eq!(back, checkpoint);
        }
    }

    #[test]
    fn load_sorts_tensors_by_name() {
        let checkpoint = ckpt(vec![t("z", &[1]), t("a/b", &[2]), t("a", &[3])]);
        let back = from_bytes(&to_bytes(&checkpoint).unwrap()).unwrap();
        let names: Vec<&str> = back.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "a/b", "z"]);
    }

    #[test]
    fn metadata_helpers() {
        let mut checkpoint = ckpt(vec![]);
        checkpoint.metadata.insert("epoch".into(), "7".into());
        checkpoint.metadata.insert("lr".into(), "fast".into());
        assert_eq!(checkpoint.meta("epoch").unwrap(), "7");
        assert_eq!(checkpoint.meta_parse::<usize>("epoch").unwrap(), 7);
        let cases = [
            ("model", "the checkpoint has no `model` in its metadata"),
            ("lr", "the checkpoint's `lr` is `fast`: invalid float literal"),
        ];
        for (key, expected) in cases {
            assert_eq!(checkpoint.meta_parse::<f64>(key).unwrap_err().to_string(), expected);
        }
    }

    /// A model's tensors, as the test cases write them.
    type Shapes<'a> = &'a [(&'a str, &'a [usize])];

    #[test]
    fn diff_shapes_names_each_disagreement() {
        let expected = |pairs: Shapes| -> Vec<(String, Vec<usize>)> {
            pairs.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect()
        };
        let found = ckpt(vec![t("conv2d/kernel", &[3, 3, 1, 16]), t("conv2d/bias", &[16])]);
        // (the model's tensors, expected lines)
        let cases: [(Shapes, &[&str]); 4] = [
            (&[("conv2d/kernel", &[3, 3, 1, 16]), ("conv2d/bias", &[16])], &[]),
            (&[("conv2d/bias", &[16]), ("conv2d/kernel", &[3, 3, 1, 16])], &[]),
            (
                &[("conv2d/kernel", &[3, 3, 1, 32]), ("conv2d/bias", &[16])],
                &["conv2d/kernel: checkpoint has [3, 3, 1, 16], the model has [3, 3, 1, 32]"],
            ),
            (
                &[("conv2d/kernel", &[3, 3, 1, 16]), ("dense/kernel", &[16, 10])],
                &[
                    "dense/kernel: the model has [16, 10], the checkpoint lacks it",
                    "conv2d/bias: checkpoint has [16], the model has no such tensor",
                ],
            ),
        ];
        for (model, lines) in cases {
            assert_eq!(diff_shapes(&expected(model), &found), lines, "{model:?}");
        }
        assert_eq!(diff_shapes(&[], &ckpt(vec![])), Vec::<String>::new());
    }
}
