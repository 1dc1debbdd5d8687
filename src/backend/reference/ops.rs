//! Every op's forward and backward, as plain loops over ndarray arrays, generic over the float
//! type: f32 for training, f64 for gradient checks against finite differences.
//!
//! Layouts: values are NHWC (`x is (N,H,W,C)`), flat values (N,C); conv kernels HWIO
//! (KH,KW,C,F), dense kernels (IN,OUT). Loops that write disjoint outputs run in parallel over
//! samples or kernel taps; every sum is taken in a fixed order, so results do not depend on
//! the number of threads.

use ndarray::{Array1, Array2, Array4, ArrayView1, ArrayView2, ArrayView4, ArrayViewMut1, Zip, s};
use num_traits::Float;

/// The float types the reference backend runs in.
pub trait Real:
    Float
    + ndarray::LinalgScalar
    + ndarray::ScalarOperand
    + Send
    + Sync
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::ops::DivAssign
    + std::fmt::Debug
{
    fn of(x: f64) -> Self {
        <Self as num_traits::NumCast>::from(x).expect("every f64 converts")
    }
}
impl Real for f32 {}
impl Real for f64 {}

/// A window op's geometry: kernel, stride, padding before (top, left), output size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pad_before: [usize; 2],
    pub out: [usize; 2],
}

impl Geometry {
    /// The input row (or column) that output `o` reads at kernel tap `k`, if inside the image.
    #[inline]
    fn input_index(&self, axis: usize, o: usize, k: usize, len: usize) -> Option<usize> {
        (o * self.stride[axis] + k).checked_sub(self.pad_before[axis]).filter(|&i| i < len)
    }
}

// -- convolution --

/// x is (N,H,W,C), w is (KH,KW,C,F), b is (F); returns (N,OH,OW,F).
pub fn conv2d_forward<T: Real>(
    x: ArrayView4<T>,
    w: ArrayView4<T>,
    b: Option<ArrayView1<T>>,
    g: &Geometry,
) -> Array4<T> {
    let (n, h, wd, c) = x.dim();
    let f = w.dim().3;
    let mut out = Array4::<T>::zeros((n, g.out[0], g.out[1], f));
    Zip::from(out.outer_iter_mut()).and(x.outer_iter()).par_for_each(|mut out, x| {
        for oh in 0..g.out[0] {
            for ow in 0..g.out[1] {
                let mut acc = out.slice_mut(s![oh, ow, ..]);
                if let Some(b) = &b {
                    acc.assign(b);
                }
                for kh in 0..g.kernel[0] {
                    let Some(ih) = g.input_index(0, oh, kh, h) else { continue };
                    for kw in 0..g.kernel[1] {
                        let Some(iw) = g.input_index(1, ow, kw, wd) else { continue };
                        for ci in 0..c {
                            let xv = x[[ih, iw, ci]];
                            acc.scaled_add(xv, &w.slice(s![kh, kw, ci, ..]));
                        }
                    }
                }
            }
        }
    });
    out
}

/// dx[n,ih,iw,c] = Σ dy[n,oh,ow,f] · w[kh,kw,c,f] over the taps that read (ih,iw).
pub fn conv2d_backward_input<T: Real>(
    dy: ArrayView4<T>,
    w: ArrayView4<T>,
    input_hw: [usize; 2],
    g: &Geometry,
) -> Array4<T> {
    let n = dy.dim().0;
    let c = w.dim().2;
    let mut dx = Array4::<T>::zeros((n, input_hw[0], input_hw[1], c));
    Zip::from(dx.outer_iter_mut()).and(dy.outer_iter()).par_for_each(|mut dx, dy| {
        for oh in 0..g.out[0] {
            for ow in 0..g.out[1] {
                let dy_px = dy.slice(s![oh, ow, ..]);
                for kh in 0..g.kernel[0] {
                    let Some(ih) = g.input_index(0, oh, kh, input_hw[0]) else { continue };
                    for kw in 0..g.kernel[1] {
                        let Some(iw) = g.input_index(1, ow, kw, input_hw[1]) else { continue };
                        for ci in 0..c {
                            dx[[ih, iw, ci]] += dy_px.dot(&w.slice(s![kh, kw, ci, ..]));
                        }
                    }
                }
            }
        }
    });
    dx
}

/// dw[kh,kw,c,f] = Σ over n,oh,ow of x[n,ih,iw,c] · dy[n,oh,ow,f]; db[f] = Σ dy[…,f].
pub fn conv2d_backward_weights<T: Real>(
    x: ArrayView4<T>,
    dy: ArrayView4<T>,
    kernel_shape: [usize; 4],
    g: &Geometry,
) -> (Array4<T>, Array1<T>) {
    let [kh_n, kw_n, c, f] = kernel_shape;
    let (n, h, wd, _) = x.dim();
    let mut dw = Array4::<T>::zeros((kh_n, kw_n, c, f));
    // One kernel tap per task: each owns its slice of dw, summed in (n, oh, ow) order.
    let mut taps = dw.view_mut().into_shape_with_order((kh_n * kw_n, c, f)).expect("contiguous");
    Zip::indexed(taps.outer_iter_mut()).par_for_each(|tap, mut dw_tap| {
        let (kh, kw) = (tap / kw_n, tap % kw_n);
        for s_ in 0..n {
            for oh in 0..g.out[0] {
                let Some(ih) = g.input_index(0, oh, kh, h) else { continue };
                for ow in 0..g.out[1] {
                    let Some(iw) = g.input_index(1, ow, kw, wd) else { continue };
                    let dy_px = dy.slice(s![s_, oh, ow, ..]);
                    for ci in 0..c {
                        let xv = x[[s_, ih, iw, ci]];
                        dw_tap.slice_mut(s![ci, ..]).scaled_add(xv, &dy_px);
                    }
                }
            }
        }
    });
    let db = sum_rows(dy.into_shape_with_order((n * g.out[0] * g.out[1], f)).expect("contiguous"));
    (dw, db)
}

/// Σ over rows, in row order: (M,C) → (C).
fn sum_rows<T: Real>(a: ArrayView2<T>) -> Array1<T> {
    let mut acc = Array1::<T>::zeros(a.dim().1);
    for row in a.outer_iter() {
        acc += &row;
    }
    acc
}

// -- dense --

/// x is (N,IN), w is (IN,OUT); returns (N,OUT).
pub fn dense_forward<T: Real>(x: ArrayView2<T>, w: ArrayView2<T>, b: Option<ArrayView1<T>>) -> Array2<T> {
    let mut y = x.dot(&w);
    if let Some(b) = b {
        y += &b;
    }
    y
}

/// Returns (dx, dw, db): dx = dy·wᵀ, dw = xᵀ·dy, db = Σ dy.
pub fn dense_backward<T: Real>(
    x: ArrayView2<T>,
    w: ArrayView2<T>,
    dy: ArrayView2<T>,
) -> (Array2<T>, Array2<T>, Array1<T>) {
    (dy.dot(&w.t()), x.t().dot(&dy), sum_rows(dy))
}

// -- pooling --

/// Max pooling; padding never wins (windows are guaranteed to hold a real pixel). Loops run
/// over whole channel rows, so the compiler vectorizes them.
pub fn maxpool_forward<T: Real>(x: ArrayView4<T>, g: &Geometry) -> Array4<T> {
    let (n, h, w, c) = x.dim();
    let mut out = Array4::<T>::from_elem((n, g.out[0], g.out[1], c), T::neg_infinity());
    Zip::from(out.outer_iter_mut()).and(x.outer_iter()).par_for_each(|mut out, x| {
        for oh in 0..g.out[0] {
            for ow in 0..g.out[1] {
                let mut best = out.slice_mut(s![oh, ow, ..]);
                for_window(g, oh, ow, [h, w], |ih, iw| {
                    Zip::from(&mut best).and(x.slice(s![ih, iw, ..])).for_each(|b, &v| *b = b.max(v));
                });
            }
        }
    });
    out
}

/// The gradient of each window goes to its first maximum: the max is recomputed, then the
/// window is walked in order and each channel's gradient lands on the first pixel equal to it.
pub fn maxpool_backward<T: Real>(x: ArrayView4<T>, dy: ArrayView4<T>, g: &Geometry) -> Array4<T> {
    let (_, h, w, c) = x.dim();
    let mut dx = Array4::<T>::zeros(x.dim());
    Zip::from(dx.outer_iter_mut()).and(x.outer_iter()).and(dy.outer_iter()).par_for_each(|mut dx, x, dy| {
        let mut best = Array1::<T>::zeros(c);
        let mut done = vec![false; c];
        for oh in 0..g.out[0] {
            for ow in 0..g.out[1] {
                best.fill(T::neg_infinity());
                for_window(g, oh, ow, [h, w], |ih, iw| {
                    Zip::from(&mut best).and(x.slice(s![ih, iw, ..])).for_each(|b, &v| *b = b.max(v));
                });
                done.fill(false);
                let grad = dy.slice(s![oh, ow, ..]);
                for_window(g, oh, ow, [h, w], |ih, iw| {
                    let xs = x.slice(s![ih, iw, ..]);
                    let mut target = dx.slice_mut(s![ih, iw, ..]);
                    for ci in 0..c {
                        if !done[ci] && xs[ci] == best[ci] {
                            target[ci] += grad[ci];
                            done[ci] = true;
                        }
                    }
                });
            }
        }
    });
    dx
}

/// Average pooling over the real pixels of each window (padding is not counted, as in
/// TensorFlow's `same`).
pub fn avgpool_forward<T: Real>(x: ArrayView4<T>, g: &Geometry) -> Array4<T> {
    let (n, h, w, c) = x.dim();
    let mut out = Array4::<T>::zeros((n, g.out[0], g.out[1], c));
    Zip::from(out.outer_iter_mut()).and(x.outer_iter()).par_for_each(|mut out, x| {
        for oh in 0..g.out[0] {
            for ow in 0..g.out[1] {
                let mut count = 0usize;
                for_window(g, oh, ow, [h, w], |ih, iw| {
                    count += 1;
                    let mut acc = out.slice_mut(s![oh, ow, ..]);
                    acc += &x.slice(s![ih, iw, ..]);
                });
                let mut acc = out.slice_mut(s![oh, ow, ..]);
                acc /= T::of(count as f64);
            }
        }
    });
    out
}

pub fn avgpool_backward<T: Real>(input_shape: [usize; 4], dy: ArrayView4<T>, g: &Geometry) -> Array4<T> {
    let [n, h, w, c] = input_shape;
    let mut dx = Array4::<T>::zeros((n, h, w, c));
    Zip::from(dx.outer_iter_mut()).and(dy.outer_iter()).par_for_each(|mut dx, dy| {
        for oh in 0..g.out[0] {
            for ow in 0..g.out[1] {
                let mut count = 0usize;
                for_window(g, oh, ow, [h, w], |_, _| count += 1);
                let share = dy.slice(s![oh, ow, ..]).mapv(|d| d / T::of(count as f64));
                for_window(g, oh, ow, [h, w], |ih, iw| {
                    let mut target = dx.slice_mut(s![ih, iw, ..]);
                    target += &share;
                });
            }
        }
    });
    dx
}

/// Calls `f(ih, iw)` for every real (non-padding) input pixel of window (oh, ow), in order.
#[inline]
fn for_window(g: &Geometry, oh: usize, ow: usize, hw: [usize; 2], mut f: impl FnMut(usize, usize)) {
    for kh in 0..g.kernel[0] {
        let Some(ih) = g.input_index(0, oh, kh, hw[0]) else { continue };
        for kw in 0..g.kernel[1] {
            let Some(iw) = g.input_index(1, ow, kw, hw[1]) else { continue };
            f(ih, iw);
        }
    }
}

// -- batch normalization (over every axis but the last; x viewed as (M,C)) --

/// What the training-mode forward keeps for the backward pass.
#[derive(Debug, Clone)]
pub struct BatchStats<T> {
    pub mean: Array1<T>,
    /// Biased (divided by M), as Keras uses for normalizing and for the moving variance.
    pub var: Array1<T>,
}

/// Training mode: normalize with the batch's statistics.
pub fn batchnorm_forward_train<T: Real>(
    x: ArrayView2<T>,
    gamma: ArrayView1<T>,
    beta: ArrayView1<T>,
    epsilon: T,
) -> (Array2<T>, BatchStats<T>) {
    let m = T::of(x.dim().0 as f64);
    let mean = sum_rows(x) / m;
    let centered = &x - &mean;
    let var = sum_rows((&centered * &centered).view()) / m;
    let inv_std = var.mapv(|v| T::one() / (v + epsilon).sqrt());
    let y = &centered * &(&inv_std * &gamma) + beta;
    (y, BatchStats { mean, var })
}

/// Inference mode: normalize with the moving statistics.
pub fn batchnorm_forward_infer<T: Real>(
    x: ArrayView2<T>,
    gamma: ArrayView1<T>,
    beta: ArrayView1<T>,
    moving_mean: ArrayView1<T>,
    moving_var: ArrayView1<T>,
    epsilon: T,
) -> Array2<T> {
    let scale = moving_var.mapv(|v| T::one() / (v + epsilon).sqrt()) * gamma;
    (&x - &moving_mean) * &scale + beta
}

/// Returns (dx, dgamma, dbeta):
///   dbeta = Σ dy,  dgamma = Σ dy·x̂,
///   dx = γ/(M·σ) · (M·dy − dbeta − x̂·dgamma),  with x̂ = (x − mean)/σ, σ = √(var + ε).
pub fn batchnorm_backward<T: Real>(
    x: ArrayView2<T>,
    dy: ArrayView2<T>,
    gamma: ArrayView1<T>,
    stats: &BatchStats<T>,
    epsilon: T,
) -> (Array2<T>, Array1<T>, Array1<T>) {
    let m = T::of(x.dim().0 as f64);
    let inv_std = stats.var.mapv(|v| T::one() / (v + epsilon).sqrt());
    let x_hat = (&x - &stats.mean) * &inv_std;
    let dbeta = sum_rows(dy);
    let dgamma = sum_rows((&dy * &x_hat).view());
    let term = &dy * m - &dbeta - &(&x_hat * &dgamma);
    let dx = term * &(&gamma * &inv_std / m);
    (dx, dgamma, dbeta)
}

/// moving = moving·momentum + batch·(1 − momentum), as Keras.
pub fn update_moving<T: Real>(moving: ArrayViewMut1<T>, batch: ArrayView1<T>, momentum: T) {
    Zip::from(moving).and(batch).for_each(|m, &b| *m = *m * momentum + b * (T::one() - momentum));
}

// -- element-wise --

pub fn relu<T: Real>(x: T) -> T {
    x.max(T::zero())
}

pub fn leaky_relu<T: Real>(x: T, alpha: T) -> T {
    if x > T::zero() { x } else { alpha * x }
}

pub fn sigmoid<T: Real>(x: T) -> T {
    // Stable on both sides: exp never overflows.
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

/// Softmax over the last axis of a (M,C) value.
pub fn softmax_forward<T: Real>(x: ArrayView2<T>) -> Array2<T> {
    let mut y = x.to_owned();
    for mut row in y.outer_iter_mut() {
        let max = row.fold(T::neg_infinity(), |a, &b| a.max(b));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row /= sum;
    }
    y
}

/// dx = y ⊙ (dy − Σ dy·y), row by row.
pub fn softmax_backward<T: Real>(y: ArrayView2<T>, dy: ArrayView2<T>) -> Array2<T> {
    let mut dx = Array2::<T>::zeros(y.dim());
    Zip::from(dx.outer_iter_mut()).and(y.outer_iter()).and(dy.outer_iter()).for_each(|mut dx, y, dy| {
        let dot = y.dot(&dy);
        Zip::from(&mut dx).and(&y).and(&dy).for_each(|d, &y, &g| *d = y * (g - dot));
    });
    dx
}

// -- losses fused with the output activation (z are the logits, (N,K)) --

/// Softmax + categorical cross-entropy against integer labels, computed from the logits with
/// log-sum-exp. Returns (Σ loss, correct, dz) with dz = (softmax(z) − onehot) / N.
pub fn softmax_cross_entropy<T: Real>(z: ArrayView2<T>, labels: &[u8]) -> (f64, usize, Array2<T>) {
    let n = T::of(z.dim().0 as f64);
    let mut dz = softmax_forward(z);
    let mut loss = 0.0;
    let mut correct = 0;
    for ((row, mut d), &label) in z.outer_iter().zip(dz.outer_iter_mut()).zip(labels) {
        let label = label as usize;
        let max = row.fold(T::neg_infinity(), |a, &b| a.max(b));
        let log_sum = row.fold(T::zero(), |a, &v| a + (v - max).exp()).ln() + max;
        loss += (log_sum - row[label]).to_f64().unwrap_or(f64::NAN);
        if argmax(row) == label {
            correct += 1;
        }
        d[label] -= T::one();
        d /= n;
    }
    (loss, correct, dz)
}

/// Sigmoid + binary cross-entropy on (N,1) logits, stable for any z:
/// loss = max(z,0) − z·y + log(1 + e^−|z|). Returns (Σ loss, correct, dz), dz = (σ(z) − y)/N.
pub fn sigmoid_binary_cross_entropy<T: Real>(z: ArrayView2<T>, labels: &[u8]) -> (f64, usize, Array2<T>) {
    let n = T::of(z.dim().0 as f64);
    let mut dz = Array2::<T>::zeros(z.dim());
    let mut loss = 0.0;
    let mut correct = 0;
    for (i, &label) in labels.iter().enumerate() {
        let (zi, y) = (z[[i, 0]], T::of(f64::from(label)));
        let l = zi.max(T::zero()) - zi * y + (T::one() + (-zi.abs()).exp()).ln();
        loss += l.to_f64().unwrap_or(f64::NAN);
        let p = sigmoid(zi);
        if (p >= T::of(0.5)) == (label == 1) {
            correct += 1;
        }
        dz[[i, 0]] = (p - y) / n;
    }
    (loss, correct, dz)
}

/// Index of the first maximum.
pub fn argmax<T: Real>(row: ArrayView1<T>) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}
