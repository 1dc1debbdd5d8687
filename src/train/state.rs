//! The training state: parameters, optimizer slots and the step counter, and how a fresh
//! state is initialized (as Keras does).

use ndarray::ArrayD;

use crate::autodiff::Program;
use crate::ir::train::Optimizer;
use crate::rng::Rng;

/// Everything a training run changes. Saved in checkpoints; restoring it resumes exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// One tensor per [`Program::params`] entry, Keras shapes (kernels HWIO).
    pub params: Vec<ArrayD<f32>>,
    /// The optimizer's slots per parameter (Adam: m and v; SGD with momentum: the velocity;
    /// none for non-trainable parameters).
    pub slots: Vec<Vec<ArrayD<f32>>>,
    /// Optimizer steps taken so far (Keras's `iterations`); Adam's bias correction uses it.
    pub iterations: u64,
    /// The run's seed: dropout masks and shuffles derive from it and counters.
    pub seed: u64,
}

impl State {
    /// Keras's initialization: Glorot-uniform kernels, zero biases, batchnorm gamma 1, beta 0,
    /// moving mean 0, moving variance 1. Each kernel draws from its own stream of `seed`.
    pub fn init(program: &Program, optimizer: &Optimizer, seed: u64) -> State {
        let params: Vec<ArrayD<f32>> = program
            .params
            .iter()
            .enumerate()
            .map(|(index, p)| {
                let shape = p.spec.shape.clone();
                match p.spec.name {
                    "kernel" => glorot_uniform(&shape, Rng::new(seed, &[0x1417, index as u64])),
                    "gamma" | "moving_variance" => ArrayD::ones(shape),
                    _ => ArrayD::zeros(shape),
                }
            })
            .collect();
        let slots = program
            .params
            .iter()
            .zip(&params)
            .map(|(p, value)| {
                let count = if p.spec.trainable { optimizer_slots(optimizer) } else { 0 };
                vec![ArrayD::zeros(value.raw_dim()); count]
            })
            .collect();
        State { params, slots, iterations: 0, seed }
    }
}

/// How many slots the optimizer keeps per trainable parameter.
pub fn optimizer_slots(optimizer: &Optimizer) -> usize {
    match optimizer {
        Optimizer::Sgd { momentum, .. } if *momentum == 0.0 => 0,
        Optimizer::Sgd { .. } => 1,
        Optimizer::Adam { .. } => 2,
    }
}

/// The slots' names, for checkpoints: `optimizer/adam/m/conv2d/kernel`.
pub fn slot_names(optimizer: &Optimizer) -> &'static [&'static str] {
    match optimizer {
        Optimizer::Sgd { momentum, .. } if *momentum == 0.0 => &[],
        Optimizer::Sgd { .. } => &["sgd/velocity"],
        Optimizer::Adam { .. } => &["adam/m", "adam/v"],
    }
}

/// Uniform in ±√(6 / (fan_in + fan_out)); for a conv kernel (KH,KW,C,F) the fans are
/// KH·KW·C and KH·KW·F, for a dense kernel (IN,OUT) they are IN and OUT.
fn glorot_uniform(shape: &[usize], mut rng: Rng) -> ArrayD<f32> {
    let receptive: usize = shape[..shape.len() - 2].iter().product();
    let fan_in = receptive * shape[shape.len() - 2];
    let fan_out = receptive * shape[shape.len() - 1];
    let limit = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
    ArrayD::from_shape_simple_fn(shape.to_vec(), || (rng.next_f32() * 2.0 - 1.0) * limit)
}
