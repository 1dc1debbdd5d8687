//! Checkpoints: a self-describing safetensors bundle of named tensors and metadata.
