//! Gradient checks: for every op, the reference backend's analytic gradients equal central
//! finite differences of the loss, in f64.
//!
//! Each case is a tiny model around the op, with a trainable layer before it (so the op's
//! input gradient is exercised) and after it. Every parameter element is perturbed by ±h,
//! h = 1e-5: the central difference's truncation error is O(h²) ≈ 1e-10 and its rounding
//! error ≈ 1e-16/h ≈ 1e-11, so a tolerance of 1e-6 (relative to max(1, |g|)) leaves ample
//! margin while any wrong term in a gradient rule shows up at 1e-3 or more.

use cnnc::autodiff::{self, Program};
use cnnc::backend::reference::{self, Mode};
use cnnc::diagnostic::SourceFile;
use cnnc::rng::Rng;
use ndarray::ArrayD;

const H: f64 = 1e-5;
const TOLERANCE: f64 = 1e-6;

fn program(model: &str, loss: &str) -> Program {
    let text = format!("model m {{ {model} }}\ntrain {{ loss = {loss} }}");
    let checked = cnnc::check(&SourceFile::new("case.cnn", text.as_str())).unwrap_or_else(|d| {
        panic!("{}", cnnc::diagnostic::render_all(&d, &SourceFile::new("case.cnn", text.as_str())))
    });
    autodiff::build(&checked).unwrap()
}

/// Random parameters (batchnorm statistics kept sane), a random batch and labels.
fn setup(program: &Program, batch: usize, seed: u64) -> (Vec<ArrayD<f64>>, ArrayD<f64>, Vec<u8>) {
    let mut rng = Rng::new(seed, &[]);
    let mut uniform = |lo: f64, hi: f64| lo + (hi - lo) * f64::from(rng.next_f32());
    let params = program
        .params
        .iter()
        .map(|p| {
            let (lo, hi) = match p.spec.name {
                "gamma" => (0.5, 1.5),
                "moving_variance" => (0.5, 2.0),
                _ => (-0.5, 0.5),
            };
            ArrayD::from_shape_simple_fn(p.spec.shape.clone(), || uniform(lo, hi))
        })
        .collect();
    let sample = program.shapes.shape(program.graph.input()).numel();
    let images: Vec<f64> = (0..batch * sample).map(|_| uniform(0.0, 1.0)).collect();
    let classes = program.shapes.shape(program.logits).numel().max(2) as f64;
    let labels = (0..batch).map(|_| uniform(0.0, classes - 1e-9).floor() as u8).collect();
    (params, reference::batch_array(program, &images), labels)
}

fn mean_loss(
    program: &Program,
    params: &[ArrayD<f64>],
    input: &ArrayD<f64>,
    labels: &[u8],
    mode: Mode,
) -> f64 {
    let g = reference::gradients(program, params, input.clone(), labels, mode);
    g.loss_sum / labels.len() as f64
}

/// Checks every trainable parameter's gradient against central differences.
fn gradcheck(model: &str, loss: &str) {
    let program = program(model, loss);
    let (mut params, input, labels) = setup(&program, 3, 11);
    let mode = Mode::Train { seed: 5, step: 9 };
    let analytic = reference::gradients(&program, &params, input.clone(), &labels, mode);
    let mut checked = 0;
    for (index, param) in program.params.iter().enumerate() {
        let Some(grad) = &analytic.grads[index] else {
            assert!(!param.spec.trainable, "{} has no gradient", param.name);
            continue;
        };
        assert_eq!(grad.shape(), params[index].shape(), "{}", param.name);
        for i in 0..params[index].len() {
            let original = params[index].as_slice().unwrap()[i];
            params[index].as_slice_mut().unwrap()[i] = original + H;
            let plus = mean_loss(&program, &params, &input, &labels, mode);
            params[index].as_slice_mut().unwrap()[i] = original - H;
            let minus = mean_loss(&program, &params, &input, &labels, mode);
            params[index].as_slice_mut().unwrap()[i] = original;
            let numeric = (plus - minus) / (2.0 * H);
            let g = grad.as_slice().unwrap()[i];
            let error = (g - numeric).abs() / g.abs().max(numeric.abs()).max(1.0);
            assert!(
                error < TOLERANCE,
                "{model}\n{}[{i}]: analytic {g:.10}, numeric {numeric:.10}",
                param.name
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no gradient was checked for {model}");
}

const CE: &str = "categorical_crossentropy";

#[test]
fn conv2d_stride_2_valid() {
    gradcheck("input 9x9x3 conv2d(5, kernel=3, stride=2) flatten dense(3, activation=softmax)", CE);
}

#[test]
fn conv2d_same_odd_kernel_feeding_a_conv() {
    gradcheck(
        "input 7x7x2 conv2d(3, kernel=3, padding=same) conv2d(5, kernel=3, padding=same) flatten dense(2, activation=softmax)",
        CE,
    );
}

#[test]
fn conv2d_same_even_kernel_stride_2_asymmetric_padding() {
    gradcheck(
        "input 7x6x3 conv2d(3, kernel=2) conv2d(5, kernel=4, stride=2, padding=same) flatten dense(3, activation=softmax)",
        CE,
    );
}

#[test]
fn conv2d_rectangular_kernel_explicit_padding_no_bias() {
    gradcheck(
        "input 6x7x1 conv2d(2, kernel=1) conv2d(3, kernel=2x3, stride=2x1, padding=1x2, bias=false) flatten dense(2, activation=softmax)",
        CE,
    );
}

#[test]
fn dense_with_and_without_bias() {
    gradcheck("input 5 dense(7, bias=false) dense(6, activation=tanh) dense(3, activation=softmax)", CE);
}

#[test]
fn maxpool_valid_and_same() {
    gradcheck(
        "input 9x9x2 conv2d(3, kernel=2) maxpool(2) maxpool(3, stride=2, padding=same) flatten dense(2, activation=softmax)",
        CE,
    );
}

#[test]
fn avgpool_same_padding_excludes_the_pad() {
    gradcheck(
        "input 7x7x2 conv2d(3, kernel=2) avgpool(3, stride=2, padding=same) avgpool(2, padding=1) flatten dense(2, activation=softmax)",
        CE,
    );
}

#[test]
fn batchnorm_on_images_and_vectors() {
    gradcheck(
        "input 6x6x2 conv2d(5, kernel=3, bias=false) batchnorm relu flatten dense(4) batchnorm(momentum=0.9) dense(3, activation=softmax)",
        CE,
    );
}

#[test]
fn activations() {
    gradcheck(
        "input 4x4x2 conv2d(3, kernel=2, activation=leaky_relu) sigmoid conv2d(3, kernel=2, activation=tanh) leaky_relu(alpha=0.1) flatten dense(5, activation=relu) softmax dense(3, activation=softmax)",
        CE,
    );
}

#[test]
fn dropout_uses_its_mask_in_both_directions() {
    gradcheck(
        "input 5x5x1 conv2d(3, kernel=2) dropout(0.4) flatten dense(4) dropout(0.3) dense(3, activation=softmax)",
        CE,
    );
}

#[test]
fn sparse_categorical_and_binary_losses() {
    gradcheck(
        "input 4x4x1 conv2d(2, kernel=3) flatten dense(4, activation=softmax)",
        "sparse_categorical_crossentropy",
    );
    gradcheck("input 4x4x1 conv2d(2, kernel=3) flatten dense(1, activation=sigmoid)", "binary_crossentropy");
}

#[test]
fn a_whole_small_model() {
    gradcheck(
        "input 10x10x1 conv2d(4, kernel=3, activation=relu) maxpool(2) conv2d(6, kernel=3, padding=same, bias=false) batchnorm relu flatten dropout(0.25) dense(5, activation=softmax)",
        CE,
    );
}

/// The f32 backend that trains computes the same gradients as the f64 one checked above.
#[test]
fn f32_gradients_match_f64() {
    let program = program(
        "input 8x8x3 conv2d(5, kernel=3, stride=2, padding=same) batchnorm relu flatten dense(3, activation=softmax)",
        CE,
    );
    let (params, input, labels) = setup(&program, 4, 3);
    let mode = Mode::Train { seed: 1, step: 2 };
    let g64 = reference::gradients(&program, &params, input.clone(), &labels, mode);
    let params32: Vec<ArrayD<f32>> = params.iter().map(|p| p.mapv(|v| v as f32)).collect();
    let g32 = reference::gradients(&program, &params32, input.mapv(|v| v as f32), &labels, mode);
    assert!((g64.loss_sum - g32.loss_sum).abs() < 1e-5 * g64.loss_sum.abs().max(1.0));
    for (a, b) in g64.grads.iter().zip(&g32.grads) {
        let (Some(a), Some(b)) = (a, b) else { continue };
        for (x, y) in a.iter().zip(b) {
            assert!((x - f64::from(*y)).abs() < 1e-4 * x.abs().max(1e-2), "{x} vs {y}");
        }
    }
}
