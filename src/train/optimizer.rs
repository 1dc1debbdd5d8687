//! Optimizer steps, as Keras 3 computes them.

use ndarray::{ArrayD, ArrayRef, IxDyn, Zip};

use crate::ir::train::Optimizer;

/// Applies one optimizer step to a trainable parameter, given its gradient and slots.
/// `iteration` is the 1-based step number (Adam's bias correction).
pub fn update(
    optimizer: &Optimizer,
    param: &mut ArrayD<f32>,
    grad: &ArrayRef<f32, IxDyn>,
    slots: &mut [ArrayD<f32>],
    iteration: u64,
) {
    match *optimizer {
        // Keras: v = momentum·v − lr·g; w += v   (plain w −= lr·g without momentum)
        Optimizer::Sgd { lr, momentum } => match slots {
            [] => Zip::from(param).and(grad).for_each(|w, &g| *w -= lr * g),
            [velocity] => Zip::from(param).and(grad).and(velocity).for_each(|w, &g, v| {
                *v = momentum * *v - lr * g;
                *w += *v;
            }),
            _ => unreachable!("sgd keeps at most one slot"),
        },
        // Keras: α = lr·√(1−β2ᵗ)/(1−β1ᵗ); m += (g−m)(1−β1); v += (g²−v)(1−β2); w −= α·m/(√v+ε)
        Optimizer::Adam { lr, beta1, beta2, epsilon } => {
            let [m, v] = slots else { unreachable!("adam keeps two slots") };
            let alpha = adam_step_size(lr, beta1, beta2, iteration);
            Zip::from(param).and(grad).and(m).and(v).for_each(|w, &g, m, v| {
                *m += (g - *m) * (1.0 - beta1);
                *v += (g * g - *v) * (1.0 - beta2);
                *w -= alpha * *m / (v.sqrt() + epsilon);
            });
        }
    }
}

/// Adam's bias-corrected step size at 1-based step `iteration`: α = lr·√(1−β2ᵗ)/(1−β1ᵗ),
/// computed in f64.
pub fn adam_step_size(lr: f32, beta1: f32, beta2: f32, iteration: u64) -> f32 {
    let t = iteration as i32;
    let alpha = f64::from(lr) * (1.0 - f64::from(beta2).powi(t)).sqrt() / (1.0 - f64::from(beta1).powi(t));
    alpha as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;

    #[test]
    fn adam_first_step_moves_each_weight_by_about_lr() {
        // After one step m = (1−β1)g, v = (1−β2)g², α = lr·√(1−β2)/(1−β1): the step is
        // lr·g/|g| (up to ε), whatever the gradient's size.
        let opt = Optimizer::Adam { lr: 0.001, beta1: 0.9, beta2: 0.999, epsilon: 1e-7 };
        let mut w = arr1(&[1.0f32, 1.0, 1.0]).into_dyn();
        let g = arr1(&[0.5f32, -20.0, 1e-3]).into_dyn();
        let mut slots = vec![ArrayD::zeros(w.raw_dim()), ArrayD::zeros(w.raw_dim())];
        update(&opt, &mut w, &g, &mut slots, 1);
        let moved: Vec<f32> = w.iter().map(|x| 1.0 - x).collect();
        assert!((moved[0] - 0.001).abs() < 1e-6 && (moved[1] + 0.001).abs() < 1e-6, "{moved:?}");
        assert!((moved[2] - 0.001).abs() < 1e-5, "{moved:?}");
    }

    #[test]
    fn sgd_with_and_without_momentum() {
        let plain = Optimizer::Sgd { lr: 0.1, momentum: 0.0 };
        let mut w = arr1(&[1.0f32]).into_dyn();
        update(&plain, &mut w, &arr1(&[2.0f32]).into_dyn(), &mut [], 1);
        assert_eq!(w[[0]], 0.8);

        let heavy = Optimizer::Sgd { lr: 0.1, momentum: 0.5 };
        let mut w = arr1(&[1.0f32]).into_dyn();
        let mut slots = vec![ArrayD::zeros(w.raw_dim())];
        update(&heavy, &mut w, &arr1(&[2.0f32]).into_dyn(), &mut slots, 1);
        update(&heavy, &mut w, &arr1(&[2.0f32]).into_dyn(), &mut slots, 2);
        // v1 = −0.2, w = 0.8; v2 = −0.1 − 0.2 = −0.3, w = 0.5
        assert!((w[[0]] - 0.5).abs() < 1e-6, "{}", w[[0]]);
    }
}
