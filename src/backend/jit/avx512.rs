//! The kernels of this backend that Cranelift does not compile, for CPUs with AVX-512F:
//! Cranelift's x64 backend emits vectors of 128 bits at most, and a CPU that runs AVX-512 at
//! its full width (Zen 5: see [`super::ceiling`], 4x the f32x4 ceiling) would leave three
//! quarters of the machine to the frameworks cnnc is compared with. The heaviest loops of a
//! training step run here in 512-bit vectors: a convolution's input gradient
//! ([`backward_input`], mnist.cnn's conv2d_1's was ~40% of the step at ~85% of the f32x4
//! ceiling), Winograd's products, forward and weight gradient ([`products`],
//! [`weight_products`], which the Winograd kernels call from their JIT-compiled code between
//! their transforms), and a dense layer's forward pass ([`dense`]). Compiled by rustc from the
//! CPU's intrinsics for any shape (the loops take it at run time; register blocks are const
//! generics), checked against the reference in the tests here, between guard pages in
//! tests/jit_guard.rs and, on such a CPU, by every differential test of the backend, which then
//! runs them. `CNNC_AVX512=0` keeps the Cranelift kernels, for comparisons.
//!
//! The input gradient is the same scatter as [`super::conv::backward_input`]: for each row of
//! dy, a block of up to [`PIXELS`] pixels and up to two vectors of 16 input channels (22 of the
//! 32 zmm registers as accumulators), acc = Σ_f dy[pixel, f] · wᵀ[tap, f, channels], then
//! dx[pixel + tap] += acc, tap by tap. A last vector of fewer than 16 channels is loaded and
//! stored under a mask. Each sample is one thread's, and its elements sum in an order fixed by
//! the shape: the result does not depend on the thread count (it differs from the Cranelift
//! kernel's in the last bits: its blocks of pixels are narrower, and so order a dx element's
//! taps otherwise). The products sum as the Cranelift kernels' do: the same bits.

use super::conv::ConvShape;

/// dy pixels of a register block, at most: mnist.cnn's conv2d_1 has rows of 11.
pub const PIXELS: usize = 11;

/// Whether the kernels here run: the CPU has AVX-512F and `CNNC_AVX512` is not `0`.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && !std::env::var("CNNC_AVX512").is_ok_and(|v| v == "0")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Input channels rounded up to whole vectors of 16: the row length of [`transpose_into`]'s
/// weights.
pub fn padded_channels(c: usize) -> usize {
    c.div_ceil(16) * 16
}

/// Elements of the transposed weights ([`transpose_into`]).
pub fn transposed_len(s: &ConvShape) -> usize {
    s.kh * s.kw * s.f * padded_channels(s.c)
}

/// The kernel w (KH, KW, C, F) as wᵀ (KH, KW, F, C'), C' = [`padded_channels`], the channels
/// past C zero: a tap's row for output channel f is then whole vectors of input channels.
pub fn transpose_into(w: &[f32], s: &ConvShape, out: &mut [f32]) {
    let (taps, c, f, cp) = (s.kh * s.kw, s.c, s.f, padded_channels(s.c));
    assert_eq!((w.len(), out.len()), (taps * c * f, taps * f * cp), "a (KH, KW, C, F) kernel");
    for tap in 0..taps {
        for ff in 0..f {
            let row = &mut out[(tap * f + ff) * cp..][..cp];
            for (ci, value) in row.iter_mut().enumerate() {
                *value = if ci < c { w[(tap * c + ci) * f + ff] } else { 0.0 };
            }
        }
    }
}

/// dx[n, oh·sh + kh, ow·sw + kw, c] += Σ_f dy[n, oh, ow, f] · wᵀ[kh, kw, f, c] for the samples
/// `samples`, into dx padded as the layer pads its input (HP x WP x C a sample).
///
/// # Safety
/// [`available`] said yes; `dy` holds (N, OH, OW, F), `wt` [`transposed_len`] elements from
/// [`transpose_into`], `dx` (N, HP, WP, C), for every sample in `samples`, and no other thread
/// writes those samples of dx.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn backward_input(
    s: &ConvShape,
    [dy, wt]: [*const f32; 2],
    dx: *mut f32,
    samples: std::ops::Range<usize>,
) {
    let blocks = s.ow.div_ceil(PIXELS);
    for n in samples {
        // SAFETY: sample n lies inside each buffer (the caller's contract).
        let (dyn_, dxn) = unsafe { (dy.add(n * s.oh * s.ow * s.f), dx.add(n * s.hp * s.wp * s.c)) };
        for oh in 0..s.oh {
            for b in 0..blocks {
                // balanced blocks: 23 pixels are 8, 8 and 7, not 11, 11 and 1
                let ow0 = s.ow * b / blocks;
                let pixels = s.ow * (b + 1) / blocks - ow0;
                let at = Block { s, dy: dyn_, wt, dx: dxn, oh, ow0 };
                // SAFETY: as the caller's, for this sample's rows.
                unsafe { at.run(pixels) };
            }
        }
    }
}

/// One block of pixels of a dy row, from (oh, ow0) of a sample.
#[cfg(target_arch = "x86_64")]
struct Block<'s> {
    s: &'s ConvShape,
    dy: *const f32,
    wt: *const f32,
    dx: *mut f32,
    oh: usize,
    ow0: usize,
}

#[cfg(target_arch = "x86_64")]
impl Block<'_> {
    /// Every tap and vector of channels of the block, `pixels` ≤ [`PIXELS`] long.
    #[target_feature(enable = "avx512f")]
    unsafe fn run(&self, pixels: usize) {
        // SAFETY (every arm): the caller's.
        unsafe {
            match pixels {
                11 => self.taps::<11>(),
                10 => self.taps::<10>(),
                9 => self.taps::<9>(),
                8 => self.taps::<8>(),
                7 => self.taps::<7>(),
                6 => self.taps::<6>(),
                5 => self.taps::<5>(),
                4 => self.taps::<4>(),
                3 => self.taps::<3>(),
                2 => self.taps::<2>(),
                1 => self.taps::<1>(),
                _ => unreachable!("blocks of 1 to {PIXELS} pixels"),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn taps<const R: usize>(&self) {
        let s = self.s;
        let cp = padded_channels(s.c);
        for kh in 0..s.kh {
            for kw in 0..s.kw {
                let tap = kh * s.kw + kw;
                // two vectors of channels at a time, then one where one is left
                let mut c0 = 0;
                // SAFETY (both): the caller's; the vectors from c0 lie within C' of wᵀ's row,
                // and the masks keep dx's loads and stores within C.
                while c0 + 16 < s.c {
                    unsafe { self.vectors::<R, 2>([tap, kh, kw], c0, cp) };
                    c0 += 32;
                }
                if c0 < s.c {
                    unsafe { self.vectors::<R, 1>([tap, kh, kw], c0, cp) };
                }
            }
        }
    }

    /// acc[r][v] = Σ_f dy[r, f] · wᵀ[tap, f, c0 + 16v..], then dx += acc, for V vectors of
    /// channels from c0, the last under a mask where it passes C.
    #[target_feature(enable = "avx512f")]
    unsafe fn vectors<const R: usize, const V: usize>(
        &self,
        [tap, kh, kw]: [usize; 3],
        c0: usize,
        cp: usize,
    ) {
        use std::arch::x86_64::*;
        let s = self.s;
        // the lanes of each vector inside C: all 16, but for the last
        let masks: [__mmask16; V] = std::array::from_fn(|v| {
            let left = s.c.saturating_sub(c0 + 16 * v).min(16);
            ((1u32 << left) - 1) as __mmask16
        });
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        // SAFETY: the caller's: wᵀ's row holds C' ≥ c0 + 16V channels, dy's block R pixels.
        unsafe {
            let w = self.wt.add(tap * s.f * cp + c0);
            let dy = self.dy.add((self.oh * s.ow + self.ow0) * s.f);
            for f in 0..s.f {
                let wv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(w.add(f * cp + 16 * v)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let d = _mm512_set1_ps(*dy.add(r * s.f + f));
                    for v in 0..V {
                        acc[v] = _mm512_fmadd_ps(d, wv[v], acc[v]);
                    }
                }
            }
            let row = (self.oh * s.sh + kh) * s.wp + self.ow0 * s.sw + kw;
            for (r, acc) in acc.iter().enumerate() {
                let p = self.dx.add((row + r * s.sw) * s.c + c0);
                for v in 0..V {
                    let p = p.add(16 * v);
                    let old = _mm512_maskz_loadu_ps(masks[v], p);
                    _mm512_mask_storeu_ps(p, masks[v], _mm512_add_ps(old, acc[v]));
                }
            }
        }
    }
}

/// The signature of [`products`] and [`weight_products`], which Winograd's kernels call with
/// their shape as constants.
pub type Products = unsafe extern "C" fn(*const f32, *const f32, *mut f32, i64, i64, i64, i64, i64, i64);

/// Rows of a product's register block, at most: 6 rows x 4 vectors of 16 output channels are
/// 24 of the 32 zmm registers.
const ROWS: usize = 6;
/// Vectors of output channels of the block, at most.
const COLUMNS: usize = 4;

/// Winograd's forward products in 512-bit vectors, for one sample: M[ξ][t][f] = Σ_c V[ξ][t][c]
/// · U[ξ][c][f] for every position ξ < `positions`, t < `tiles`, f < `f`, the sums over c in
/// order from zero, as [`super::winograd`]'s f32x4 kernel sums them (the same bits). V's
/// planes are `plane_c` elements apart, rows of `c`; M's `plane_f` apart, rows of `f`; U's
/// planes (C, F'), F' = [`padded_channels`] of F, row-major.
///
/// # Safety
/// AVX-512F is there ([`available`] said yes when the kernels were compiled); v, u and m hold
/// the planes described.
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn products(
    v: *const f32,
    u: *const f32,
    m: *mut f32,
    positions: i64,
    tiles: i64,
    c: i64,
    f: i64,
    plane_c: i64,
    plane_f: i64,
) {
    let [positions, tiles, c, f, plane_c, plane_f] =
        [positions, tiles, c, f, plane_c, plane_f].map(|d| d as usize);
    let fp = padded_channels(f);
    for xi in 0..positions {
        // SAFETY: the planes of position ξ (the caller's contract).
        let product = unsafe {
            Product {
                a: v.add(xi * plane_c),
                a_row: c,
                a_k: 1,
                b: u.add(xi * c * fp),
                b_k: fp,
                out: m.add(xi * plane_f),
                k: c,
                accumulate: false,
            }
        };
        // SAFETY: as above.
        unsafe { product.run([tiles, f]) };
    }
}

/// Winograd's weight-gradient products in 512-bit vectors, for one group of samples' tiles:
/// M[ξ][c][f] += Σ_t V[ξ][t][c] · D[ξ][t][f] for every position ξ < `positions`, c < `c`, f <
/// `f`, over the `span` tiles in order, each element of M added to in the order of
/// [`super::winograd`]'s f32x4 kernel (the same bits). V's planes are span·C elements apart,
/// D's span·F, M's C·F (rows of F). The last two arguments are unused.
///
/// # Safety
/// As [`products`]'.
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn weight_products(
    v: *const f32,
    d: *const f32,
    m: *mut f32,
    positions: i64,
    span: i64,
    c: i64,
    f: i64,
    _: i64,
    _: i64,
) {
    let [positions, span, c, f] = [positions, span, c, f].map(|x| x as usize);
    for xi in 0..positions {
        // SAFETY: the planes of position ξ (the caller's contract).
        let product = unsafe {
            Product {
                a: v.add(xi * span * c),
                a_row: 1,
                a_k: c,
                b: d.add(xi * span * f),
                b_k: f,
                out: m.add(xi * c * f),
                k: span,
                accumulate: true,
            }
        };
        // SAFETY: as above.
        unsafe { product.run([c, f]) };
    }
}

/// A dense layer's forward pass in 512-bit vectors, for `rows` samples: y[r][j] += Σ_k x[r][k] ·
/// w[k][j], x (rows, K) and w (K, F) row-major, y (rows, F) holding the bias (or zeros), the
/// sums over k in order after it, as the Cranelift kernel ([`super::conv::forward`] of a 1x1
/// layer) sums them: the same bits.
///
/// # Safety
/// AVX-512F is there ([`available`]); the buffers hold the shapes described.
pub unsafe fn dense(x: *const f32, w: *const f32, y: *mut f32, [rows, k, f]: [usize; 3]) {
    let product = Product { a: x, a_row: k, a_k: 1, b: w, b_k: f, out: y, k, accumulate: true };
    // SAFETY: the caller's.
    unsafe { product.run([rows, f]) };
}

/// out[r][j] (+)= Σ_k a[r·a_row + k·a_k] · b[k·b_k + j] for the rows r and columns j of a
/// [rows, columns] product, out's rows `columns` apart, in register blocks of up to [`ROWS`]
/// x [`COLUMNS`] vectors (balanced), each sum over k in order, from zero or from out.
struct Product {
    a: *const f32,
    a_row: usize,
    a_k: usize,
    b: *const f32,
    b_k: usize,
    out: *mut f32,
    k: usize,
    accumulate: bool,
}

impl Product {
    /// # Safety
    /// AVX-512F is there, and the buffers hold the rows and columns (b's loads and out's
    /// loads and stores are masked at the last column).
    unsafe fn run(&self, [rows, columns]: [usize; 2]) {
        #[cfg(target_arch = "x86_64")]
        {
            let vectors = columns.div_ceil(16);
            // one vector a row (a dense layer of 10 outputs) takes twice the rows: 12 chains of
            // multiply-adds hide their latency where 6 would not
            let most = if vectors == 1 { 2 * ROWS } else { ROWS };
            let (row_blocks, column_blocks) = (rows.div_ceil(most), vectors.div_ceil(COLUMNS));
            for rb in 0..row_blocks {
                let r0 = rows * rb / row_blocks;
                let r = rows * (rb + 1) / row_blocks - r0;
                for cb in 0..column_blocks {
                    let v0 = vectors * cb / column_blocks;
                    let g = vectors * (cb + 1) / column_blocks - v0;
                    // SAFETY: the caller's, for this block of rows and columns.
                    unsafe { self.block_of(r, g, [r0, 16 * v0], columns) };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("AVX-512 without x86-64: {rows} x {columns}")
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn block_of(&self, rows: usize, vectors: usize, at: [usize; 2], columns: usize) {
        macro_rules! dispatch {
            ($($r:literal),*) => {
                match (rows, vectors) {
                    $(
                        ($r, 1) => self.block::<$r, 1>(at, columns),
                        ($r, 2) => self.block::<$r, 2>(at, columns),
                        ($r, 3) => self.block::<$r, 3>(at, columns),
                        ($r, 4) => self.block::<$r, 4>(at, columns),
                    )*
                    _ => unreachable!("blocks of 1 to {ROWS} rows and 1 to {COLUMNS} vectors, or 12 rows and 1"),
                }
            };
        }
        // SAFETY (every arm): the caller's.
        unsafe {
            match (rows, vectors) {
                (7, 1) => self.block::<7, 1>(at, columns),
                (8, 1) => self.block::<8, 1>(at, columns),
                (9, 1) => self.block::<9, 1>(at, columns),
                (10, 1) => self.block::<10, 1>(at, columns),
                (11, 1) => self.block::<11, 1>(at, columns),
                (12, 1) => self.block::<12, 1>(at, columns),
                _ => dispatch!(1, 2, 3, 4, 5, 6),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const R: usize, const G: usize>(&self, [r0, j0]: [usize; 2], columns: usize) {
        use std::arch::x86_64::*;
        let masks: [__mmask16; G] = std::array::from_fn(|g| {
            let left = columns.saturating_sub(j0 + 16 * g).min(16);
            ((1u32 << left) - 1) as __mmask16
        });
        // SAFETY: the caller's; the masks keep b's and out's accesses within their columns.
        unsafe {
            let out = self.out.add(r0 * columns + j0);
            let mut acc = [[_mm512_setzero_ps(); G]; R];
            if self.accumulate {
                for (r, acc) in acc.iter_mut().enumerate() {
                    for g in 0..G {
                        acc[g] = _mm512_maskz_loadu_ps(masks[g], out.add(r * columns + 16 * g));
                    }
                }
            }
            let a = self.a.add(r0 * self.a_row);
            let b = self.b.add(j0);
            for k in 0..self.k {
                let bk: [__m512; G] =
                    std::array::from_fn(|g| _mm512_maskz_loadu_ps(masks[g], b.add(k * self.b_k + 16 * g)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*a.add(r * self.a_row + k * self.a_k));
                    for g in 0..G {
                        acc[g] = _mm512_fmadd_ps(x, bk[g], acc[g]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for g in 0..G {
                    _mm512_mask_storeu_ps(out.add(r * columns + 16 * g), masks[g], acc[g]);
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::backend::reference::ops::{Geometry, conv2d_backward_input};
    use crate::rng::Rng;
    use ndarray::Array4;

    fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
        (0..len).map(|_| rng.next_f32() - 0.5).collect()
    }

    /// Against the reference, on shapes whose channels are not whole vectors (1, 5, 19, 40:
    /// a masked vector alone, after one, after two) and whose rows are not whole blocks (13 =
    /// 7 + 6 pixels, 23 = 8 + 8 + 7), with strides and non-square kernels; and the same bits
    /// whichever ranges of samples the calls split the batch into.
    #[test]
    fn matches_the_reference_on_odd_shapes() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512F (the Cranelift kernel runs instead)");
            return;
        }
        let shapes = [
            // (c, f, kernel, stride, output)
            (1, 3, [3, 3], [1, 1], [4, 13]),
            (5, 7, [3, 2], [2, 1], [3, 23]),
            (19, 4, [2, 3], [1, 2], [5, 11]),
            (40, 9, [3, 3], [1, 1], [2, 12]),
            (32, 64, [3, 3], [1, 1], [11, 11]),
        ];
        let mut rng = Rng::new(3, &[512]);
        for (c, f, [kh, kw], [sh, sw], [oh, ow]) in shapes {
            let (hp, wp) = ((oh - 1) * sh + kh, (ow - 1) * sw + kw);
            let s = ConvShape { hp, wp, c, kh, kw, f, oh, ow, sh, sw, bias: false };
            let n = 3;
            let dy = random(n * oh * ow * f, &mut rng);
            let w = random(kh * kw * c * f, &mut rng);
            let mut wt = vec![0.0; transposed_len(&s)];
            transpose_into(&w, &s, &mut wt);
            let g = Geometry { kernel: [kh, kw], stride: [sh, sw], pad_before: [0, 0], out: [oh, ow] };
            let dy4 = Array4::from_shape_vec((n, oh, ow, f), dy.clone()).unwrap();
            let w4 = Array4::from_shape_vec((kh, kw, c, f), w).unwrap();
            let expected = conv2d_backward_input(dy4.view(), w4.view(), [hp, wp], &g);
            let mut runs = Vec::new();
            for split in [vec![(0, n)], vec![(0, 1), (1, n)]] {
                let mut dx = vec![0.0; n * hp * wp * c];
                for (lo, hi) in split {
                    let dx_ptr = dx.as_mut_ptr();
                    // SAFETY: AVX-512F is there; the buffers have the shapes of `s`.
                    unsafe { backward_input(&s, [dy.as_ptr(), wt.as_ptr()], dx_ptr, lo..hi) };
                }
                for (i, (a, b)) in dx.iter().zip(expected.iter()).enumerate() {
                    assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "c {c} f {f}: dx[{i}] {a} vs {b}");
                }
                runs.push(dx);
            }
            assert_eq!(runs[0], runs[1], "c {c} f {f}: the split changed the bits");
        }
    }
}
