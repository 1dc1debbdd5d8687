//! Winograd convolution for 3x3 stride-1 layers (Lavin & Gray 2015): the forward pass by
//! F(2x2, 3x3) or F(4x4, 3x3), each m x m block of outputs costing (m + 2)² multiply-adds per
//! (input, output) channel pair instead of 9m² (16 instead of 36, 36 instead of 144), and the
//! weight gradient by F(3x3, 2x2) or F(3x3, 4x4), m x m tiles of dy as the filter, (m + 2)²
//! per tile instead of 9m²; each at the price of transforming into tiles and back. The cost
//! model picks the tile per layer and pass ([`tile_size`], [`weight_tile_size`]): the larger
//! one needs heavier transforms and covers an output that is not a multiple of 4 with more
//! waste.
//!
//! ```text
//!   forward, per sample, vectors over channels (NHWC keeps them contiguous), α = m + 2:
//!     V[ξ][t][c] = (Bᵀ d B)[ξ]       d: the α x α input tile t, ξ one of its α² positions
//!     M[ξ][t][f] = Σ_c V[ξ][t][c] · U[ξ][c][f]     α² matrix products (tiles x C) x (C x F)
//!     y[tile t]  = Aᵀ M[·][t] A  (+ bias, epilogue)   m x m pixels, those inside the output
//!   U[ξ][c][f] = (G w[·][·][c][f] Gᵀ)[ξ], computed once a step by [`transform_weights`]
//!
//!   weight gradient: V as above (its own Bᵀ), D[ξ][t][f] = (A g Aᵀ)[ξ] for dy's m x m tile g,
//!     M[ξ][c][f] = Σ_samples Σ_t V[ξ][t][c] · D[ξ][t][f],   dw = Oᵀ M O (3x3), in Rust
//!     (F(m x m, 3x3)'s matrices with A and G exchanged: [`weight_transforms`])
//! ```
//!
//! The transforms are emitted from their matrices ([`combine`]: ±1 as adds and subtracts,
//! other coefficients as fused multiply-adds), a vector of channels at a time so that a 6x6
//! tile stays in registers; the inference tiles' input transform by the factors of Bᵀ's rows
//! instead ([`factored_input`]), and their output transform with Aᵀ's ±p columns paired
//! ([`apply_paired`]). The products run on the register-blocked kernel of conv.rs (up to
//! 5 rows x 8 channels). The input gradient stays direct: the same operation as the forward pass (a
//! valid convolution of dy padded by 2 with the kernel flipped and transposed), but measured
//! on mnist.cnn's conv2d_1 (batch 128, 2 threads) F(2x2) took 8.3 ms against the direct
//! kernel's 7.6: 13x13 outputs are 49 tiles of 2x2 (or 16 of 4x4, covering 16x16), and the
//! padded copy of dy and the larger scratch ate the saving; the cost model agrees (2.16M
//! multiply-adds' worth for F(2x2), 2.31M for F(4x4), 2.23M direct, per sample). Measured
//! again after the staged transforms (2026-12-02, the forward kernel over dy padded by 2 into
//! dx, alternated with the direct kernel in one process, 30 rounds, 2 threads): conv2d_1's
//! block backward 1–6% faster with F(4x4), 5% slower to 2% faster with F(2x2), within the
//! noise of the training step; not kept.
//!
//! At inference a pooled block may also take F(5x5, 3x3) or F(6x6, 3x3) ([`inference_tile_size`]):
//! fewer products again (a 10x10 output is four 5x5 tiles, 49 products each per channel pair
//! against 225 direct), heavier transforms, more rounding.
//!
//! Numerically the transforms add and subtract values of the input's magnitude; F(2x2)'s G
//! has halves, exact in f32, F(4x4)'s sixths and twelfths, and its Bᵀ and Aᵀ coefficients up
//! to 8, so F(4x4) rounds more. Both are within 1e-4 of the direct sum on the shapes of the
//! tests here and of tests/jit.rs (the differential tests' tolerance); F(5x5) and F(6x6), with
//! coefficients up to 16 and 32, within 3e-4 (~2x F(4x4)'s error, measured on 32 channels).

use cranelift_codegen::ir::{InstBuilder as _, Value};

use super::conv::{
    ConvShape, Epilogue, Width, accumulate, accumulators, add_sums, for_chunks, for_pixel_blocks,
    for_vectors, load_chunk, packed_index, store_chunk,
};
use super::emit::Emit;
use super::math::constant;

/// Input channels per task of the weight gradient (rows of its register block).
const WEIGHT_ROWS: usize = 4;
/// Samples whose tiles the weight gradient's products run over in one pass, accumulators
/// kept in registers: mnist.cnn's conv2d_1 has 9 tiles of 4x4 a sample.
const WEIGHT_SAMPLES: usize = 2;
/// The largest input tile's side: F(6x6, 3x3)'s 8.
const MAX_ALPHA: usize = 8;
/// Pieces of a batch that the weight gradient runs as separate calls, at most.
const WEIGHT_PIECES: usize = 8;

/// Pieces of a batch of `n` samples that [`weight_gradient`] runs as, each with an M of its
/// own: as many as there are samples, up to 8. Fixed by the batch size, so that the sums
/// (each piece's, then the pieces' in order) do not depend on the thread count; 8 keeps 8
/// threads busy, and costs 8 M's to zero and add (mnist.cnn's conv2d_1: 295 KB each).
pub fn weight_pieces(n: usize) -> usize {
    n.clamp(1, WEIGHT_PIECES)
}

/// A 3x3 stride-1 convolution computed by tiles of m x m outputs (m = 2 or 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WinogradShape {
    /// The convolution: `hp`, `wp` are the input buffer's height and width per sample; `oh`,
    /// `ow` the outputs computed (tiles cover them, so the buffer needs m·⌈oh/m⌉ + 2 rows and
    /// m·⌈ow/m⌉ + 2 columns: see [`WinogradShape::new`]).
    pub conv: ConvShape,
    /// Tiles down and across: ⌈oh/m⌉, ⌈ow/m⌉.
    pub th: usize,
    pub tw: usize,
    /// The output tile's size: F(m x m, 3x3).
    pub m: usize,
    /// Whether the products run in 512-bit vectors, where the CPU has AVX-512F: the forward
    /// pass's ([`super::avx512::products`], U then laid out for them by
    /// [`transform_weights_into`]) or the weight gradient's ([`super::avx512::weight_products`]).
    pub wide: bool,
}

impl WinogradShape {
    /// F(m x m, 3x3) for `conv`: `None` unless it is 3x3 with stride 1, m is 2 or 4, and its
    /// input buffer holds every tile's (m + 2) x (m + 2) window (the caller pads sizes that
    /// are not multiples of m by the rows or columns missing). m = 5 and 6 are for the forward
    /// pass at inference ([`inference_tile_size`]).
    pub fn new(conv: ConvShape, m: usize) -> Option<Self> {
        let square = conv.kh == 3 && conv.kw == 3 && conv.sh == 1 && conv.sw == 1;
        let (th, tw) = (conv.oh.div_ceil(m), conv.ow.div_ceil(m));
        let fits = m * th + 2 <= conv.hp && m * tw + 2 <= conv.wp;
        let known = matches!(m, 2 | 4 | 5 | 6);
        let wide = super::avx512::available();
        (known && square && fits && conv.oh > 0 && conv.ow > 0).then_some(WinogradShape {
            conv,
            th,
            tw,
            m,
            wide,
        })
    }

    /// The weight gradient's tiles, F(3x3, m x m): m x m blocks of dy (a partial last row or
    /// column where m does not divide OH or OW) over (m + 2) x (m + 2) windows of the layer's
    /// padded input, which a 3x3 stride-1 layer has exactly OH + 2 rows and OW + 2 columns of.
    /// `None` for other layers, or m other than 2 and 4 ([`weight_tile_size`] picks it).
    pub fn for_weights(conv: ConvShape, m: usize) -> Option<Self> {
        let square = conv.kh == 3 && conv.kw == 3 && conv.sh == 1 && conv.sw == 1;
        let exact = conv.hp == conv.oh + 2 && conv.wp == conv.ow + 2;
        let (th, tw) = (conv.oh.div_ceil(m), conv.ow.div_ceil(m));
        let known = m == 2 || m == 4;
        let wide = super::avx512::available();
        (known && square && exact && conv.oh > 0 && conv.ow > 0).then_some(WinogradShape {
            conv,
            th,
            tw,
            m,
            wide,
        })
    }

    /// Tasks of [`weight_gradient`]: one per position ξ and group of 4 input channels.
    pub fn weight_tasks(&self) -> usize {
        self.positions() * self.conv.c.div_ceil(WEIGHT_ROWS)
    }

    /// Elements of U ([`transform_weights`]): a (C, F) plane per position, packed by chunks
    /// of output channels as [`super::conv::pack_weights`] packs a kernel, or, for the wide
    /// products, a (C, F') plane, F' = F rounded up to 16, row-major, the columns past F zero.
    pub fn weights_len(&self) -> usize {
        self.positions() * self.weights_plane()
    }

    /// Elements from one position's plane of U to the next.
    pub fn weights_plane(&self) -> usize {
        let f = if self.wide { super::avx512::padded_channels(self.conv.f) } else { self.conv.f };
        self.conv.c * f
    }

    /// Where U's plane holds the weight of input channel `ci` and output channel `fi`.
    pub fn weights_index(&self, ci: usize, fi: usize) -> usize {
        let (c, f) = (self.conv.c, self.conv.f);
        if self.wide { ci * super::avx512::padded_channels(f) + fi } else { packed_index(c, f, ci, fi) }
    }

    /// Tiles per sample.
    pub fn tiles(&self) -> usize {
        self.th * self.tw
    }

    /// The input tile's side, m + 2.
    pub fn alpha(&self) -> usize {
        self.m + 2
    }

    /// Positions of an input tile: (m + 2)².
    pub fn positions(&self) -> usize {
        self.alpha() * self.alpha()
    }

    /// Elements of the forward kernel's scratch, for one sample: V (positions planes of
    /// tiles·C), then M (of tiles·F), each plane [`WinogradShape::plane`] long.
    pub fn scratch(&self) -> usize {
        self.positions() * (self.plane(self.conv.c) + self.plane(self.conv.f))
    }

    /// Elements from one position's plane of the forward kernel's V (`channels` = C) or M (F)
    /// to the next: tiles·channels, rounded up to an odd number of 64-byte lines. A tile's α²
    /// values lie one in each plane, and the transforms read (write) them together. At a
    /// stride of a power of two lines they fall into a few of L1's sets: mnist.cnn's pooled
    /// F(5x5) (4 tiles) has M's planes 1 KB apart, whose 49 lines then share 4 sets of 8 ways.
    pub fn plane(&self, channels: usize) -> usize {
        const LINE: usize = 16;
        ((self.tiles() * channels).div_ceil(LINE) | 1) * LINE
    }

    /// Elements of the weight gradient's scratch: V and D (as [`WinogradShape::scratch`]'s V
    /// and M) for a group of samples.
    pub fn weight_scratch(&self) -> usize {
        WEIGHT_SAMPLES * self.scratch()
    }
}

/// The transforms of F(m x m, 3x3) (Lavin & Gray): Bᵀ (α x α) and Aᵀ (m x α), for the kernels,
/// α = m + 2; G in [`g_row`]. F(2x2, 3x3) interpolates at 0, ±1 and ∞, F(4x4, 3x3) at 0, ±1,
/// ±2 and ∞ (their usual tables); the larger tiles, for inference only, at [`points`].
struct Transforms {
    bt: Vec<Vec<f32>>,
    at: Vec<Vec<f32>>,
}

fn transforms(m: usize) -> Transforms {
    let rows = |r: &[&[f32]]| r.iter().map(|row| row.to_vec()).collect();
    match m {
        2 => Transforms {
            bt: rows(&[
                &[1.0, 0.0, -1.0, 0.0],
                &[0.0, 1.0, 1.0, 0.0],
                &[0.0, -1.0, 1.0, 0.0],
                &[0.0, 1.0, 0.0, -1.0],
            ]),
            at: rows(&[&[1.0, 1.0, 1.0, 0.0], &[0.0, 1.0, -1.0, -1.0]]),
        },
        4 => Transforms {
            bt: rows(&[
                &[4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
                &[0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
                &[0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
                &[0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
                &[0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
                &[0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
            ]),
            at: rows(&[
                &[1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
                &[0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
                &[0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
                &[0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
            ]),
        },
        _ => interpolated(points(m)),
    }
}

/// The finite interpolation points of F(m x m, 3x3) for the tiles past 4 (∞ is the last
/// position), m + 1 of them: 0, ±1, ±1/2 and 2 for m = 5, and F(6x6)'s usual 0, ±1, ±2, ±1/2.
/// Points of magnitude 1/2 and 2 keep the coefficients small; for F(5x5) the set with both
/// halves rounded least of the three tried in a float32 simulation (largest error over 32
/// channels of uniform ±1 values: 5.1e-5, against 7.5e-5 for 0, ±1, ±2 and one of ±1/2;
/// F(4x4) 3.3e-5 there).
fn points(m: usize) -> &'static [f64] {
    match m {
        5 => &[0.0, 1.0, -1.0, 0.5, -0.5, 2.0],
        6 => &[0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5],
        _ => unreachable!("F(m x m, 3x3) for m = 2, 4, 5 and 6 only"),
    }
}

/// Bᵀ and Aᵀ of F(m x m, 3x3) from its finite interpolation points p_i (Toom-Cook, as Lavin &
/// Gray build theirs): Aᵀ[j][i] = p_iʲ, and ∞'s column picks the top power; Bᵀ's row i holds
/// the coefficients of Π_{k≠i} (x − p_k), ∞'s those of Π_k (x − p_k). The Lagrange
/// denominators Π_{k≠i} (p_i − p_k) go into G ([`g_row`]), where they cost nothing per tile.
fn interpolated(points: &[f64]) -> Transforms {
    let alpha = points.len() + 1;
    let m = alpha - 2;
    // coefficients, lowest power first, of the product of (x − p) over `roots`
    let product = |roots: &mut dyn Iterator<Item = f64>| {
        let mut poly = vec![1.0f64];
        for root in roots {
            let mut next = vec![0.0; poly.len() + 1];
            for (power, c) in poly.iter().enumerate() {
                next[power + 1] += c;
                next[power] -= root * c;
            }
            poly = next;
        }
        poly
    };
    let mut bt: Vec<Vec<f32>> = (0..points.len())
        .map(|i| {
            let mut row = product(&mut points.iter().enumerate().filter(|&(k, _)| k != i).map(|(_, &p)| p));
            row.push(0.0);
            row.into_iter().map(|c| c as f32).collect()
        })
        .collect();
    bt.push(product(&mut points.iter().copied()).into_iter().map(|c| c as f32).collect());
    let at = (0..m)
        .map(|j| {
            let mut row: Vec<f32> = points.iter().map(|p| p.powi(j as i32) as f32).collect();
            row.push(if j == m - 1 { 1.0 } else { 0.0 });
            row
        })
        .collect();
    Transforms { bt, at }
}

/// Row ξ of G (α x 3) of F(m x m, 3x3): U = G w Gᵀ, computed in Rust every step (constant
/// tables, or three powers over a product for the larger tiles: the step allocates nothing).
fn g_row(m: usize, xi: usize) -> [f64; 3] {
    const G2: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
    const G4: [[f64; 3]; 6] = [
        [0.25, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    match m {
        2 => G2[xi],
        4 => G4[xi],
        _ => {
            let points = points(m);
            let Some(&p) = points.get(xi) else { return [0.0, 0.0, 1.0] };
            let scale: f64 =
                points.iter().enumerate().filter(|&(k, _)| k != xi).map(|(_, q)| p - q).product();
            [1.0 / scale, p / scale, p * p / scale]
        }
    }
}

/// The transforms of the weight gradient F(3x3, m x m), α = m + 2: Bᵀ (α x α) for the input's
/// tiles and A (α x m) for dy's; the output's in [`weight_output`]. They are F(m x m, 3x3)'s
/// with A and G exchanged: the trilinear form Σ_i Σ_k y'_i g_k d_{i+k} is symmetric in y' and
/// g, so Σ_i h_i d_{i+k} = (Gᵀ [(A h) ⊙ (Bᵀ d)])_k for a filter h of length m and 3 outputs k.
/// For m = 2 the halves of G move onto A (exact in f32) and the sign of the last position onto
/// Bᵀ, so that the output's coefficients are 0 and ±1.
fn weight_transforms(m: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let forward = transforms(m);
    let mut bt = forward.bt;
    let a = match m {
        2 => {
            bt[3] = vec![0.0, -1.0, 0.0, 1.0];
            vec![vec![1.0, 0.0], vec![0.5, 0.5], vec![0.5, -0.5], vec![0.0, 1.0]]
        }
        _ => (0..m + 2).map(|xi| forward.at.iter().map(|row| row[xi]).collect()).collect(),
    };
    (bt, a)
}

/// O[ξ][i] (α x 3) of the weight gradient's output dw = Oᵀ M O ([`weight_transforms`]): G of
/// F(m x m, 3x3), for m = 2 with its halves taken out.
fn weight_output(m: usize, xi: usize, i: usize) -> f64 {
    const O2: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [0.0, 0.0, 1.0]];
    match m {
        2 => O2[xi][i],
        _ => g_row(m, xi)[i],
    }
}

/// Σ_j row[j]·values[j] for one vector (or scalar) of channels each: a term with coefficient
/// +1 first (so that ±1 rows are adds and subtracts only, in index order), then the others;
/// ±1 as an add or a subtract, other coefficients by a fused multiply-add.
fn combine(e: &mut Emit, row: &[f32], values: &[Value], vector: bool) -> Value {
    let first = row.iter().position(|&k| k == 1.0).or_else(|| row.iter().position(|&k| k != 0.0));
    let first = first.expect("a transform row has a term");
    let scaled = |e: &mut Emit, k: f32| constant(e, k, vector);
    let mut acc = match row[first] {
        1.0 => values[first],
        k => {
            let k = scaled(e, k);
            e.ins().fmul(k, values[first])
        }
    };
    for (j, &k) in row.iter().enumerate() {
        acc = match k {
            _ if j == first || k == 0.0 => continue,
            1.0 => e.ins().fadd(acc, values[j]),
            -1.0 => e.ins().fsub(acc, values[j]),
            k => {
                let k = scaled(e, k);
                e.fma(k, values[j], acc)
            }
        };
    }
    acc
}

/// `matrix` · `values` (one vector or scalar each): a column of a transform.
fn apply(e: &mut Emit, matrix: &[Vec<f32>], values: &[Value], vector: bool) -> Vec<Value> {
    matrix.iter().map(|row| combine(e, row, values, vector)).collect()
}

/// [`apply`] with the pairs of columns that are equal or opposite in every row (Aᵀ's at the
/// points ±p: p^j and (−p)^j) taken first as their sum and difference, so that each row has
/// one term per pair: F(5x5)'s Aᵀ (5 x 7, two pairs) costs 16 adds a column instead of 22, and
/// as many fewer constants. It rounds differently from [`apply`] (c·(a ± b), not c·a ± c·b):
/// the inference tiles take it, training's keep the sums their accuracy was measured with.
fn apply_paired(e: &mut Emit, matrix: &[Vec<f32>], values: &[Value], vector: bool) -> Vec<Value> {
    let mut matrix = matrix.to_vec();
    let mut values = values.to_vec();
    let columns = values.len();
    for i in 0..columns {
        for k in i + 1..columns {
            let signs: Option<Vec<f32>> = matrix
                .iter()
                .map(|row| match (row[i], row[k]) {
                    (a, b) if a != 0.0 && b == a => Some(1.0),
                    (a, b) if a != 0.0 && b == -a => Some(-1.0),
                    _ => None,
                })
                .collect();
            // a pair saves a term in each row and costs one add for each of sum and difference
            let Some(signs) = signs.filter(|s| s.len() > 2) else { continue };
            let (sum, difference) = (signs.contains(&1.0), signs.contains(&-1.0));
            let (a, b) = (values[i], values[k]);
            if sum {
                values[i] = e.ins().fadd(a, b);
            }
            if difference {
                values[k] = e.ins().fsub(a, b);
            }
            for (row, sign) in matrix.iter_mut().zip(signs) {
                let coefficient = row[i];
                (row[i], row[k]) = if sign > 0.0 { (coefficient, 0.0) } else { (0.0, coefficient) };
            }
        }
    }
    apply(e, &matrix, &values, vector)
}

/// Bᵀ·d for one column of an input tile of the inference tiles (past 4), by factors of its
/// rows' polynomials instead of from the matrix: 20 adds and multiply-adds a column for
/// F(5x5) against 27 from the matrix (34 terms), 24 for F(6x6), and fewer constants.
///
/// Bᵀ's row for a point p is Π_{k≠p} (x − p_k) (for ∞, Π_k), its coefficients applied to d
/// (lowest power on d₀); a factor x shifts d by one. [`points`] are 0, pairs ±p and at most
/// one single q. With P = Π_pairs (x² − p²), an even polynomial, and E_j = d_{j+1} − q·d_j
/// (the factor x − q; E = d without a single):
///
/// ```text
///   row 0:  P on E from 0        row ∞: P on E from 1        row q: P on d from 1
///   rows ±p: a ± p·b,  a = P/(x² − p²) on E from 2,  b = the same on E from 1
/// ```
///
/// (rows ±p are x·(x − q)·P/(x² − p²)·(x ± p)). It rounds differently from the matrix: the
/// inference tiles take it, as [`apply_paired`].
fn factored_input(e: &mut Emit, points: &[f64], d: &[Value], vector: bool) -> Vec<Value> {
    let pairs: Vec<f64> = points.iter().copied().filter(|&p| p > 0.0 && points.contains(&-p)).collect();
    let singles: Vec<f64> = points.iter().copied().filter(|&p| p != 0.0 && !points.contains(&-p)).collect();
    assert!(points.contains(&0.0) && singles.len() <= 1, "points 0, pairs ±p and at most one single");
    assert_eq!(d.len(), points.len() + 1, "a column of α values");
    // Σ_i poly[i]·seq[from + 2i] for an even polynomial by its coefficients in x², monic
    let even = |e: &mut Emit, poly: &[f64], seq: &[Value], from: usize| {
        let top = poly.len() - 1;
        let mut acc = seq[from + 2 * top];
        for (i, &k) in poly.iter().enumerate().take(top).rev() {
            acc = scaled_add(e, acc, k, seq[from + 2 * i], vector);
        }
        acc
    };
    // coefficients in x² of Π (x² − p²) over `pairs` but `except`
    let product = |except: Option<f64>| {
        let mut poly = vec![1.0f64];
        for &p in pairs.iter().filter(|&&p| Some(p) != except) {
            let mut next = vec![0.0; poly.len() + 1];
            for (power, c) in poly.iter().enumerate() {
                next[power + 1] += c;
                next[power] -= p * p * c;
            }
            poly = next;
        }
        poly
    };
    let e_seq: Vec<Value> = match singles.first() {
        Some(&q) => (0..d.len() - 1).map(|j| scaled_add(e, d[j + 1], -q, d[j], vector)).collect(),
        None => d.to_vec(),
    };
    let full = product(None);
    let mut rows: Vec<Value> = Vec::with_capacity(d.len());
    let mut halves: Vec<(f64, [Value; 2])> = Vec::new();
    for &point in points {
        let row = if point == 0.0 {
            even(e, &full, &e_seq, 0)
        } else if singles.contains(&point) {
            even(e, &full, d, 1)
        } else {
            let p = point.abs();
            let [a, b] = match halves.iter().find(|(q, _)| *q == p) {
                Some(&(_, ab)) => ab,
                None => {
                    let poly = product(Some(p));
                    let ab = [even(e, &poly, &e_seq, 2), even(e, &poly, &e_seq, 1)];
                    halves.push((p, ab));
                    ab
                }
            };
            scaled_add(e, a, point, b, vector)
        };
        rows.push(row);
    }
    rows.push(even(e, &full, &e_seq, 1));
    rows
}

/// acc + k·v: an add or a subtract for k = ±1, else a multiply-add.
fn scaled_add(e: &mut Emit, acc: Value, k: f64, v: Value, vector: bool) -> Value {
    match k {
        1.0 => e.ins().fadd(acc, v),
        -1.0 => e.ins().fsub(acc, v),
        0.0 => acc,
        k => {
            let k = constant(e, k as f32, vector);
            e.fma(k, v, acc)
        }
    }
}

/// Whether the compiler picks Winograd for a 3x3 stride-1 layer with `c` input and `f`
/// output channels: the cost model counts, per 2x2 block of outputs, the direct kernel's
/// 36·C·F multiply-adds against Winograd's 16·C·F plus its transforms (32 adds a tile per
/// input channel, 24 per output channel, each also a store and a load of the scratch, taken
/// as 4 multiply-adds' worth each, since they stream through memory where the products stay
/// in registers). With few channels the transforms dominate: a first layer with one input
/// channel stays direct.
pub fn chosen(c: usize, f: usize) -> bool {
    let direct = 36 * c * f;
    let winograd = 16 * c * f + 4 * (32 * c + 24 * f);
    winograd * 10 < direct * 8
}

/// The output tile F(m x m, 3x3) the cost model picks for a layer with `c` input and `f`
/// output channels and OH x OW outputs, among m = 2 and 4: per tile, the products (α² C F
/// multiply-adds, α = m + 2) and the transforms at 4 multiply-adds' worth an add (as
/// [`chosen`]'s: Bᵀ d B takes 32 adds a tile per input channel for m = 2, 192 for m = 4;
/// Aᵀ M A 24 and 170 per output channel), times the tiles that cover the output (a 13 x 13
/// output is 49 tiles of 2x2 or 16 of 4x4, covering 14x14 and 16x16). F(4x4) must win by a
/// tenth on paper: its kernels take 10–20 ms to compile, against 2–3 for F(2x2)'s (compiled
/// in parallel with the others, which keeps mnist.cnn's compile near where F(2x2) had it).
/// Measured (2 threads, side by side, batch 128): mnist.cnn's conv2d_1 (11x11, 32 → 64;
/// counted 18% less) 9.5/9.8 → 7.5/7.2 ms forward with F(4x4), the training step 6% faster;
/// its pooled inference (10x10, which 2x2 tiles cover exactly; counted 19% more) no faster.
/// (A session before the separable weight transform and 5-pixel blocks had measured only 8%
/// on conv2d_1, and asked for a fifth.)
pub fn tile_size(c: usize, f: usize, [oh, ow]: [usize; 2]) -> usize {
    let cost = |m: usize| tile_cost(m, [c, f], [oh, ow], transform_adds(m));
    if 10 * cost(4) < 9 * cost(2) { 4 } else { 2 }
}

/// The output tile of the forward pass at inference, counted as [`tile_size`] counts, among
/// the tiles whose windows the layer's input holds (`fits`): also F(5x5) and F(6x6), whose
/// products are fewer again but whose transforms are heavier (7x7 and 8x8 input tiles) and
/// round more (~3x F(4x4)'s error in this file's tests, within 3e-4); training keeps
/// to 2 and 4, whose error its gradients and accuracy were measured with. A larger tile must
/// win by a tenth (its kernel compiles longer). mnist.cnn's pooled conv2d_1 (10x10, which
/// 5x5 tiles cover exactly): 1.08M multiply-adds' worth for F(2x2), 1.28M for F(4x4) (its
/// 3x3 tiles cover 12x12), 0.87M for F(5x5), 1.28M for F(6x6). `None` where no tile fits.
pub fn inference_tile_size(
    c: usize,
    f: usize,
    [oh, ow]: [usize; 2],
    fits: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for m in [2, 4, 5, 6].into_iter().filter(|&m| fits(m)) {
        let cost = tile_cost(m, [c, f], [oh, ow], transform_adds(m));
        best = match best {
            Some((_, least)) if 10 * cost >= 9 * least => best,
            _ => Some((m, cost)),
        };
    }
    best.map(|(m, _)| m)
}

/// The adds of F(m x m, 3x3)'s transforms per tile, counted from their matrices (each nonzero
/// coefficient past a row's first is an add or a multiply-add): Bᵀ d B, α rows and α columns
/// of Bᵀ, per input channel, and Aᵀ M A, α columns then m rows of Aᵀ, per output channel.
/// 32 and 24 for F(2x2), 192 and 170 for F(4x4), 378 and 264 for F(5x5).
fn transform_adds(m: usize) -> [usize; 2] {
    let t = transforms(m);
    let alpha = m + 2;
    let nonzero = |matrix: &[Vec<f32>]| matrix.iter().flatten().filter(|&&k| k != 0.0).count();
    [2 * alpha * (nonzero(&t.bt) - alpha), (alpha + m) * (nonzero(&t.at) - m)]
}

/// The tile of dy that the weight gradient F(3x3, m x m) takes, m = 2 or 4, counted as
/// [`tile_size`] counts: its input transform is the forward's (32 or 192 adds a tile per input
/// channel), dy's A g Aᵀ takes 24 or 120 per output channel. F(4x4) must win by a tenth. For
/// mnist.cnn's conv2d_1 (11x11, 32 → 64): 36 tiles of 2x2 or 9 of 4x4, 25% less for 4x4.
pub fn weight_tile_size(c: usize, f: usize, [oh, ow]: [usize; 2]) -> usize {
    let cost = |m: usize, transforms: [usize; 2]| tile_cost(m, [c, f], [oh, ow], transforms);
    if 10 * cost(4, [192, 120]) < 9 * cost(2, [32, 24]) { 4 } else { 2 }
}

/// Multiply-adds' worth of F(m x m) over an OH x OW grid with C x F channel pairs: per tile,
/// (m + 2)² C F products and the transforms' adds (per input and per output channel) at 4 each.
fn tile_cost(m: usize, [c, f]: [usize; 2], [oh, ow]: [usize; 2], [input, output]: [usize; 2]) -> usize {
    let tiles = oh.div_ceil(m) * ow.div_ceil(m);
    tiles * ((m + 2) * (m + 2) * c * f + 4 * (input * c + output * f))
}

/// The kernel's weights for `shape.conv`: U[ξ][c][f] = (G w[·][·][c][f] Gᵀ)[ξ] from `w` laid out
/// (3, 3, C, F) (HWIO), each ξ's (C, F) matrix packed by [`pack_weights`].
pub fn transform_weights(w: &[f32], shape: &WinogradShape) -> Vec<f32> {
    let mut u = vec![0.0; shape.weights_len()];
    transform_weights_into(w, shape, &mut u);
    u
}

/// [`transform_weights`] into `u` (positions·C·F elements). Separably, in f64 — T = G w
/// (α x 3), then U = T Gᵀ: 3α(3 + α) products for each (c, f) instead of 9α², the input
/// channels outermost and the output channels innermost, so that `w` is read in order and
/// each plane of `u` written a chunk at a time. Each of T's α rows makes α planes of `u`, one
/// contiguous piece: the worker threads take a row each. It runs every step and every
/// inference call, and on one thread it was serial time: mnist.cnn's conv2d_1 (32 → 64)
/// took 0.6–1.0 ms of the ~30 ms step, and ~0.85 ms of a batch of 1000 at inference, where
/// F(5x5)'s 49 planes are 401 KB. The same sums in the same order on any thread count.
// Tile positions are indices in the transforms' formulas: loops over them read as the math.
#[allow(clippy::needless_range_loop)]
pub fn transform_weights_into(w: &[f32], shape: &WinogradShape, u: &mut [f32]) {
    use rayon::prelude::*;
    let (c, f) = (shape.conv.c, shape.conv.f);
    assert_eq!(w.len(), 9 * c * f, "a 3x3 kernel");
    assert_eq!(u.len(), shape.weights_len(), "a plane of (C, F) per position");
    let plane = shape.weights_plane();
    let alpha = shape.alpha();
    let mut g = [[0.0f64; 3]; MAX_ALPHA];
    for (xi, row) in g.iter_mut().enumerate().take(alpha) {
        *row = g_row(shape.m, xi);
    }
    let row = |a: usize, planes: &mut [f32]| {
        for ci in 0..c {
            for fi in 0..f {
                let at = |i: usize, j: usize| f64::from(w[((i * 3 + j) * c + ci) * f + fi]);
                let t: [f64; 3] =
                    std::array::from_fn(|j| g[a][0] * at(0, j) + g[a][1] * at(1, j) + g[a][2] * at(2, j));
                let index = shape.weights_index(ci, fi);
                for b in 0..alpha {
                    let value = t[0] * g[b][0] + t[1] * g[b][1] + t[2] * g[b][2];
                    planes[b * plane + index] = value as f32;
                }
            }
        }
    };
    // the wide planes' padding columns stay zero
    if shape.wide {
        u.fill(0.0);
    }
    u.par_chunks_mut(alpha * plane).enumerate().with_max_len(1).for_each(|(a, planes)| row(a, planes));
}

/// y = conv(x, w) + b for samples start..end by F(m x m, 3x3), then `epilogue` (as
/// [`super::conv::forward`]'s). Buffers: [x (N, HP, WP, C), U ([`transform_weights`]), b (F) or
/// unused, y (N, OH, OW, F), sums (N, 2, F) or unused, scratch ([`WinogradShape::scratch`],
/// one per concurrent call)].
pub fn forward(e: &mut Emit, shape: &WinogradShape, epilogue: Epilogue) {
    let s = shape.conv;
    let (x, u, y, scratch) = (e.buf(0), e.buf(1), e.buf(3), e.buf(5));
    let bias = s.bias.then(|| e.buf(2));
    let sums = epilogue.stats.then(|| e.buf(4));
    let v = scratch;
    let m = e.at_k(scratch, (shape.positions() * shape.plane(s.c)) as i64);
    let bt = transforms(shape.m).bt;
    let (start, end) = (e.start, e.end);
    e.for_range(start, end, |e, n| {
        let xn_off = e.mul_k(n, (s.hp * s.wp * s.c) as i64);
        let xn = e.at(x, xn_off);
        let yn_off = e.mul_k(n, (s.oh * s.ow * s.f) as i64);
        let yn = e.at(y, yn_off);
        let sums_n = sums.map(|sums| {
            let off = e.mul_k(n, 2 * s.f as i64);
            e.at(sums, off)
        });
        let complete = [shape.alpha(); 2];
        let factored = (shape.m > 4).then(|| points(shape.m));
        transform_tiles(
            e,
            &bt,
            shape.m,
            [shape.th, shape.tw],
            [s.wp, s.c],
            complete,
            [xn, v],
            shape.plane(s.c),
            factored,
        );
        multiply(e, shape, v, u, m);
        let out = Output { bias, yn, sums_n, epilogue };
        transform_output(e, shape, m, out);
    });
}

/// Calls `body(ty, tx, [last row, last column])` for every tile of a th x tw grid; where
/// `partial` says that the last tile row (column) is partial, its tiles' body is emitted
/// separately, with the flag set.
fn for_tiles(
    e: &mut Emit,
    [th, tw]: [usize; 2],
    partial: [bool; 2],
    mut body: impl FnMut(&mut Emit, Value, Value, [bool; 2]),
) {
    let full = [th - usize::from(partial[0]), tw - usize::from(partial[1])];
    let mut row = |e: &mut Emit, ty: Value, last_row: bool| {
        e.for_n(full[1], |e, tx| body(e, ty, tx, [last_row, false]));
        if partial[1] {
            let tx = e.int(full[1] as i64);
            body(e, ty, tx, [last_row, true]);
        }
    };
    e.for_n(full[0], |e, ty| row(e, ty, false));
    if partial[0] {
        let ty = e.int(full[0] as i64);
        row(e, ty, true);
    }
}

/// V[ξ][t][c] = (T d Tᵀ)[ξ] for every k x k tile d of a sample at `src` (rows `width` pixels
/// of `channels` apart; tile (ty, tx) at (m·ty, m·tx)) into `dst`, whose planes (one per
/// position ξ, `plane` elements apart) hold the tiles' `channels` one after another; T = `matrix` (α x k): the input's
/// tiles by Bᵀ (k = α) and the weight gradient's tiles of dy by A (k = m). The last tile row
/// (column) holds only `rest[0]` rows (`rest[1]` columns) of the sample, k where it is
/// complete: the others are taken as zeros (the weight gradient's, where they meet only the
/// zeros that complete dy's last tiles). One vector of channels at a time, so that a 6x6 tile
/// stays in registers. With `factored` (the inference tiles' points), T is their Bᵀ, taken by
/// its factors ([`factored_input`]).
#[allow(clippy::too_many_arguments)]
// Tile positions are indices in the transforms' formulas: loops over them read as the math.
#[allow(clippy::needless_range_loop)]
fn transform_tiles(
    e: &mut Emit,
    matrix: &[Vec<f32>],
    m: usize,
    [th, tw]: [usize; 2],
    [width, channels]: [usize; 2],
    rest: [usize; 2],
    [src, dst]: [Value; 2],
    plane: usize,
    factored: Option<&[f64]>,
) {
    let (alpha, size) = (matrix.len(), matrix[0].len());
    let staging = Staging::new(e, alpha * size);
    for_tiles(e, [th, tw], rest.map(|r| r < size), |e, ty, tx, last| {
        let valid = [0, 1].map(|k| if last[k] { rest[k] } else { size });
        let origin = tile_origin(e, [ty, tx], m, [width, channels]);
        let t = e.mul_k(ty, tw as i64);
        let t = e.add(t, tx);
        // its positions' pieces of the tile, from the first channel of this one
        let t_off = e.mul_k(t, channels as i64);
        let out = e.at(dst, t_off);
        for_vectors(e, channels, |e, c0, one| {
            let vector = one != Width::Scalar;
            let base = e.add(origin, c0);
            let base = e.at(src, base);
            let transform = |e: &mut Emit, values: &[Value]| match factored {
                Some(points) => factored_input(e, points, values, vector),
                None => apply(e, matrix, values, vector),
            };
            // (T d)[a][j] into the staging at a·size + j, a column of d (one vector of
            // channels per pixel; zeros outside the sample) at a time
            let zero = e.zero(one.ty());
            for j in 0..size {
                let column: Vec<Value> = (0..size)
                    .map(|i| {
                        let inside = i < valid[0] && j < valid[1];
                        if inside {
                            load_chunk(e, base, ((i * width + j) * channels) as i64, one)[0]
                        } else {
                            zero
                        }
                    })
                    .collect();
                for (a, value) in transform(e, &column).into_iter().enumerate() {
                    staging.put(e, a * size + j, value);
                }
            }
            // then V[a][b] = Σ_j (T d)[a][j] T[b][j], a row at a time
            let out = e.at(out, c0);
            for a in 0..alpha {
                let row: Vec<Value> = (0..size).map(|j| staging.get(e, a * size + j, one)).collect();
                for (b, value) in transform(e, &row).into_iter().enumerate() {
                    let xi = a * alpha + b;
                    store_chunk(e, &[value], out, (xi * plane) as i64);
                }
            }
        });
    });
}

/// The element offset of tile (ty, tx)'s first pixel, (m·ty, m·tx), in a sample of rows
/// `width` pixels wide of `channels` channels.
fn tile_origin(e: &mut Emit, [ty, tx]: [Value; 2], m: usize, [width, channels]: [usize; 2]) -> Value {
    let row = e.mul_k(ty, (m * width) as i64);
    let col = e.mul_k(tx, m as i64);
    let pixel = e.add(row, col);
    e.mul_k(pixel, channels as i64)
}

/// Where a separable transform keeps its first pass (α·size values) for its second: a stack
/// slot of `len` vectors (a scalar takes a vector's place). Kept in registers, the values of a
/// 7x7 or 8x8 tile (with the tile's loads all first) spilled to the stack and back anyway, at
/// a stride the register allocator chose; staged here, a pass holds one column or row of them.
#[derive(Clone, Copy)]
struct Staging {
    addr: Value,
}

impl Staging {
    fn new(e: &mut Emit, len: usize) -> Self {
        use cranelift_codegen::ir::{StackSlotData, StackSlotKind};
        // 16-byte aligned
        let slot =
            e.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 16 * len as u32, 4));
        Staging { addr: e.b.ins().stack_addr(e.ptr, slot, 0) }
    }

    fn put(self, e: &mut Emit, i: usize, value: Value) {
        e.store(value, self.addr, 4 * i as i64);
    }

    fn get(self, e: &mut Emit, i: usize, width: Width) -> Value {
        load_chunk(e, self.addr, 4 * i as i64, width)[0]
    }
}

/// M[ξ] = V[ξ] (tiles x C) · U[ξ] (C x F) for every position, with conv.rs's register
/// blocks: up to 5 tiles x one chunk of output channels, over the input channels.
fn multiply(e: &mut Emit, shape: &WinogradShape, v: Value, u: Value, m: Value) {
    let s = shape.conv;
    let tiles = shape.tiles();
    if shape.wide {
        return call_wide_products(e, shape, [v, u, m]);
    }
    e.for_n(shape.positions(), |e, xi| {
        let v_off = e.mul_k(xi, shape.plane(s.c) as i64);
        let vxi = e.at(v, v_off);
        let u_off = e.mul_k(xi, (s.c * s.f) as i64);
        let uxi = e.at(u, u_off);
        let m_off = e.mul_k(xi, shape.plane(s.f) as i64);
        let mxi = e.at(m, m_off);
        for_pixel_blocks(e, tiles, |e, t0, rows| {
            let a_off = e.mul_k(t0, s.c as i64);
            let arow = e.at(vxi, a_off);
            for_chunks(e, s.f, |e, f0, width| {
                let parts = width.parts();
                let acc = accumulators(e, rows * parts, width);
                // U packed: the chunk from f0 at f0·C, its row k at k·width
                let b_off = e.mul_k(f0, s.c as i64);
                let bchunk = e.at(uxi, b_off);
                e.for_n_unrolled(s.c, 4, |e, k| {
                    let b_k = e.mul_k(k, width.lanes() as i64);
                    let baddr = e.at(bchunk, b_k);
                    let bv = load_chunk(e, baddr, 0, width);
                    let aaddr = e.at(arow, k);
                    accumulate(e, &acc, &bv, |e, r| e.at_k(aaddr, (r * s.c) as i64), width);
                });
                let c_off = e.mul_k(t0, s.f as i64);
                let c_off = e.add(c_off, f0);
                let caddr = e.at(mxi, c_off);
                for r in 0..rows {
                    let values: Vec<Value> = (0..parts).map(|p| e.use_var(acc[r * parts + p])).collect();
                    store_chunk(e, &values, caddr, (r * s.f) as i64);
                }
            });
        });
    });
}

/// [`multiply`] by a call to [`super::avx512::products`], its shape as constant arguments.
fn call_wide_products(e: &mut Emit, shape: &WinogradShape, buffers: [Value; 3]) {
    let s = shape.conv;
    let dims = [shape.positions(), shape.tiles(), s.c, s.f, shape.plane(s.c), shape.plane(s.f)];
    call_products(e, super::avx512::products, buffers, dims);
}

/// A call to one of [`super::avx512`]'s products, its dimensions as constants.
fn call_products(e: &mut Emit, products: super::avx512::Products, [a, b, c]: [Value; 3], dims: [usize; 6]) {
    use cranelift_codegen::ir::{AbiParam, Signature, types};
    let mut sig = Signature::new(e.b.func.signature.call_conv);
    sig.params.extend([AbiParam::new(e.ptr); 3]);
    sig.params.extend([AbiParam::new(types::I64); 6]);
    let sig = e.b.import_signature(sig);
    let callee = e.b.ins().iconst(e.ptr, products as usize as i64);
    let mut args = vec![a, b, c];
    args.extend(dims.map(|d| e.int(d as i64)));
    e.b.ins().call_indirect(sig, callee, &args);
}

/// Where the output transform puts its pixels.
#[derive(Clone, Copy)]
struct Output {
    bias: Option<Value>,
    yn: Value,
    sums_n: Option<Value>,
    epilogue: Epilogue,
}

/// y[m·ty + a][m·tx + b] = (Aᵀ M A)[a][b] for every tile, only the pixels inside the output:
/// the last tile row (column) holds OH − m·(th − 1) rows (columns) of them.
fn transform_output(e: &mut Emit, shape: &WinogradShape, m: Value, out: Output) {
    let s = shape.conv;
    let rest = [s.oh - shape.m * (shape.th - 1), s.ow - shape.m * (shape.tw - 1)];
    let partial = rest.map(|r| r < shape.m);
    for_tiles(e, [shape.th, shape.tw], partial, |e, ty, tx, last| {
        let valid = [0, 1].map(|k| if last[k] { rest[k] } else { shape.m });
        output_tile(e, shape, m, out, [ty, tx], valid);
    });
}

/// One tile's output pixels, `valid` rows and columns of its m x m, a vector of channels at a
/// time (in a loop: one body per tile shape, which keeps the F(4x4) and F(5x5) kernels near
/// 2,000 instructions; two vectors a body took 3,462 for mnist.cnn's F(4x4) forward).
// Tile positions are indices in the transforms' formulas: loops over them read as the math.
#[allow(clippy::needless_range_loop)]
fn output_tile(
    e: &mut Emit,
    shape: &WinogradShape,
    m: Value,
    out: Output,
    [ty, tx]: [Value; 2],
    valid: [usize; 2],
) {
    let s = shape.conv;
    let plane = shape.plane(s.f);
    let alpha = shape.alpha();
    let at = transforms(shape.m).at;
    // the inference tiles (past 4) take their pairs of points together
    let apply = if shape.m > 4 { apply_paired } else { apply };
    let t = e.mul_k(ty, shape.tw as i64);
    let t = e.add(t, tx);
    let m_t = e.mul_k(t, s.f as i64);
    let mt = e.at(m, m_t);
    // y at (m·ty, m·tx)
    let y_off = tile_origin(e, [ty, tx], shape.m, [s.ow, s.f]);
    let ybase = e.at(out.yn, y_off);
    let staging = Staging::new(e, valid[0] * alpha);
    for_vectors(e, s.f, |e, f0, one| {
        let vector = one != Width::Scalar;
        let base = e.at(mt, f0);
        // (Aᵀ M)[a][b] into the staging at a·α + b, a column of M at a time
        for b in 0..alpha {
            let column: Vec<Value> =
                (0..alpha).map(|a| load_chunk(e, base, ((a * alpha + b) * plane) as i64, one)[0]).collect();
            for (a, value) in apply(e, &at[..valid[0]], &column, vector).into_iter().enumerate() {
                staging.put(e, a * alpha + b, value);
            }
        }
        let bias = out.bias.map(|b| {
            let addr = e.at(b, f0);
            load_chunk(e, addr, 0, one)[0]
        });
        let mut stored = Vec::with_capacity(valid[0] * valid[1]);
        for a in 0..valid[0] {
            let row: Vec<Value> = (0..alpha).map(|b| staging.get(e, a * alpha + b, one)).collect();
            let y = apply(e, &at[..valid[1]], &row, vector);
            for (b, mut value) in y.into_iter().enumerate() {
                if let Some(bias) = bias {
                    value = e.ins().fadd(value, bias);
                }
                if let Some(alpha) = out.epilogue.rectify {
                    value = super::eltwise::rectify(e, value, alpha, vector);
                }
                let offset = ((a * s.ow + b) * s.f) as i64;
                let addr = e.at(ybase, f0);
                store_chunk(e, &[value], addr, offset);
                stored.push(vec![value]);
            }
        }
        if let Some(sums_n) = out.sums_n {
            let base = e.at(sums_n, f0);
            add_sums(e, &stored, base, s.f, one);
        }
    });
}

/// The weight gradient of a 3x3 stride-1 convolution by F(3x3, m x m) ([`weight_transforms`]),
/// in the transformed domain, for samples start..end: per sample, the input's (m + 2) x (m + 2)
/// tiles V = Bᵀ d B and dy's m x m tiles D = A g Aᵀ, then for every task (a position ξ and 4
/// input channels) M[ξ][c][f] += Σ_t V[ξ][t][c]·D[ξ][t][f], over the samples in order, then
/// tiles in order. Each call has an M of its own, and transforms only its own samples; the
/// caller splits the batch into [`weight_pieces`] pieces (by the batch size, not the thread
/// count, so that the sums do not depend on it) and adds the pieces' M in order. dw = Oᵀ M O
/// is taken by [`weight_gradient_output`]. With a bias, each call also sums the bias gradient
/// from D at position (1, 1), where A's row of ones (of halves, for m = 2) on both sides makes
/// each tile's sum of dy (a quarter of it): db[f] += Σ_t D[(1, 1)][t][f] ([`bias_scale`]
/// undoes the quarter). Buffers: [x (N, HP, WP, C) padded as the layer pads it, dy (N, OH,
/// OW, F), M (positions, C, F) zeroed, scratch ([`WinogradShape::weight_scratch`]), db (F)
/// zeroed, with a bias]; items: samples.
pub fn weight_gradient(e: &mut Emit, shape: &WinogradShape) {
    use cranelift_codegen::ir::condcodes::IntCC;
    let s = shape.conv;
    let (x, dy, m, scratch) = (e.buf(0), e.buf(1), e.buf(2), e.buf(3));
    let db = s.bias.then(|| e.buf(4));
    let tiles = shape.tiles();
    // a group's tiles, sample after sample, in each position's plane of V and D
    let span = WEIGHT_SAMPLES * tiles;
    let v = scratch;
    let d = e.at_k(scratch, (shape.positions() * span * s.c) as i64);
    let groups = s.c.div_ceil(WEIGHT_ROWS);
    let rows_last = s.c - (groups - 1) * WEIGHT_ROWS;
    let (bt, a) = weight_transforms(shape.m);
    // the rows (columns) of dy in the last tile row (column), and of the input under them
    let rest = [s.oh - shape.m * (shape.th - 1), s.ow - shape.m * (shape.tw - 1)];
    let (start, end) = (e.start, e.end);
    let count = e.ins().isub(end, start);
    let last = e.add_k(count, WEIGHT_SAMPLES as i64 - 1);
    let sample_groups = e.div_k(last, WEIGHT_SAMPLES as u64, u64::MAX >> 1);
    let zero = e.int(0);
    e.for_range(zero, sample_groups, |e, group_n| {
        e.for_n(WEIGHT_SAMPLES, |e, j| {
            let first = e.mul_k(group_n, WEIGHT_SAMPLES as i64);
            let first = e.add(first, start);
            let n = e.add(first, j);
            let (v_j, d_j) = (e.mul_k(j, (tiles * s.c) as i64), e.mul_k(j, (tiles * s.f) as i64));
            let (v_j, d_j) = (e.at(v, v_j), e.at(d, d_j));
            let present = e.icmp(IntCC::SignedLessThan, n, end);
            let transform = |e: &mut Emit| {
                let xn_off = e.mul_k(n, (s.hp * s.wp * s.c) as i64);
                let xn = e.at(x, xn_off);
                let dyn_off = e.mul_k(n, (s.oh * s.ow * s.f) as i64);
                let dyn_ = e.at(dy, dyn_off);
                let grid = [shape.th, shape.tw];
                transform_tiles(
                    e,
                    &bt,
                    shape.m,
                    grid,
                    [s.wp, s.c],
                    rest.map(|r| r + 2),
                    [xn, v_j],
                    span * s.c,
                    None,
                );
                transform_tiles(e, &a, shape.m, grid, [s.ow, s.f], rest, [dyn_, d_j], span * s.f, None);
                if let Some(db) = db {
                    // position (1, 1): A's row of ones (halves for m = 2) on both sides
                    let off = ((shape.alpha() + 1) * span * s.f) as i64;
                    let plane = e.at_k(d_j, off);
                    add_tile_sums(e, plane, [tiles, s.f], db);
                }
            };
            // past the call's last sample (in its last group): zeros, which add nothing
            let zeros = |e: &mut Emit| {
                zero_planes(e, v_j, shape.positions(), [tiles * s.c, span * s.c]);
                zero_planes(e, d_j, shape.positions(), [tiles * s.f, span * s.f]);
            };
            e.when_else(present, transform, zeros);
        });
        if shape.wide {
            let dims = [shape.positions(), span, s.c, s.f, 0, 0];
            return call_products(e, super::avx512::weight_products, [v, d, m], dims);
        }
        e.for_n(shape.weight_tasks(), |e, task| {
            let bound = shape.weight_tasks() as u64;
            let xi = e.div_k(task, groups as u64, bound);
            let group = e.rem_k(task, groups as u64, bound);
            let c0 = e.mul_k(group, WEIGHT_ROWS as i64);
            let place = [v, d, m];
            if rows_last == WEIGHT_ROWS {
                weight_block(e, shape, place, [xi, c0], WEIGHT_ROWS);
            } else {
                let last = e.int(groups as i64 - 1);
                let is_last = e.icmp(IntCC::Equal, group, last);
                let full = |e: &mut Emit| weight_block(e, shape, place, [xi, c0], WEIGHT_ROWS);
                e.when_else(is_last, |e| weight_block(e, shape, place, [xi, c0], rows_last), full);
            }
        });
    });
}

/// db[f] += Σ_t plane[t][f] over `tiles` tiles of `f` channels, the tiles in order.
fn add_tile_sums(e: &mut Emit, plane: Value, [tiles, f]: [usize; 2], db: Value) {
    for_vectors(e, f, |e, f0, width| {
        let addr = e.at(db, f0);
        let first = load_chunk(e, addr, 0, width)[0];
        let sum = e.var(width.ty(), first);
        let column = e.at(plane, f0);
        e.for_n(tiles, |e, t| {
            let off = e.mul_k(t, f as i64);
            let at = e.at(column, off);
            let value = load_chunk(e, at, 0, width)[0];
            let current = e.use_var(sum);
            let added = e.ins().fadd(current, value);
            e.def_var(sum, added);
        });
        let total = e.use_var(sum);
        store_chunk(e, &[total], addr, 0);
    });
}

/// What [`weight_gradient`]'s sums of D at position (1, 1) are multiplied by to be db: 4 for
/// m = 2 (a power of two: exact), 1 for m = 4.
pub fn bias_scale(shape: &WinogradShape) -> f32 {
    if shape.m == 2 { 4.0 } else { 1.0 }
}

/// Zeros `len` elements at the start of each of `planes` planes, `stride` elements apart.
fn zero_planes(e: &mut Emit, base: Value, planes: usize, [len, stride]: [usize; 2]) {
    e.for_n(planes, |e, plane| {
        let off = e.mul_k(plane, stride as i64);
        let start = e.at(base, off);
        for_vectors(e, len, |e, k, width| {
            let zero = e.zero(width.ty());
            let addr = e.at(start, k);
            store_chunk(e, &[zero], addr, 0);
        });
    });
}

/// One task's share of one group of samples: M[ξ][c0 + r][f] += Σ_t V[ξ][t][c0 + r]·D[ξ][t][f]
/// for `rows` input channels, every chunk of output channels, over the group's tiles in order,
/// accumulators loaded from M and stored back.
fn weight_block(
    e: &mut Emit,
    shape: &WinogradShape,
    [v, d, m]: [Value; 3],
    [xi, c0]: [Value; 2],
    rows: usize,
) {
    let s = shape.conv;
    let span = WEIGHT_SAMPLES * shape.tiles();
    let v_off = e.mul_k(xi, (span * s.c) as i64);
    let v_off = e.add(v_off, c0);
    let vrows = e.at(v, v_off);
    let d_off = e.mul_k(xi, (span * s.f) as i64);
    let dxi = e.at(d, d_off);
    let m_off = e.mul_k(xi, (s.c * s.f) as i64);
    let m_row = e.mul_k(c0, s.f as i64);
    let m_off = e.add(m_off, m_row);
    let mrows = e.at(m, m_off);
    for_chunks(e, s.f, |e, f0, width| {
        let parts = width.parts();
        let base = e.at(mrows, f0);
        let mut acc = Vec::with_capacity(rows * parts);
        for r in 0..rows {
            for value in load_chunk(e, base, (r * s.f) as i64, width) {
                acc.push(e.var(width.ty(), value));
            }
        }
        let dchunk = e.at(dxi, f0);
        e.for_n_unrolled(span, 4, |e, t| {
            let d_t = e.mul_k(t, s.f as i64);
            let daddr = e.at(dchunk, d_t);
            let dv = load_chunk(e, daddr, 0, width);
            let v_t = e.mul_k(t, s.c as i64);
            let vaddr = e.at(vrows, v_t);
            accumulate(e, &acc, &dv, |e, r| e.at_k(vaddr, r as i64), width);
        });
        for r in 0..rows {
            let values: Vec<Value> = (0..parts).map(|p| e.use_var(acc[r * parts + p])).collect();
            store_chunk(e, &values, base, (r * s.f) as i64);
        }
    });
}

/// dw (3, 3, C, F) = Oᵀ M O ([`weight_output`]) from [`weight_gradient`]'s M (positions, C,
/// F), summed in f64.
pub fn weight_gradient_output(m: &[f32], shape: &WinogradShape) -> Vec<f32> {
    let mut dw = vec![0.0f32; 9 * shape.conv.c * shape.conv.f];
    weight_gradient_output_into(m, shape, &mut dw);
    dw
}

/// [`weight_gradient_output`] into `dw` (9·C·F elements). Separably, T = Oᵀ M (3 x α), then
/// T O, for a run of (c, f) elements at a time: each position's plane of M is read in order,
/// once. It runs once a step, on one thread.
// Tile positions are indices in the transforms' formulas: loops over them read as the math.
#[allow(clippy::needless_range_loop)]
pub fn weight_gradient_output_into(m: &[f32], shape: &WinogradShape, dw: &mut [f32]) {
    const RUN: usize = 32;
    let plane = shape.conv.c * shape.conv.f;
    let (alpha, tile) = (shape.alpha(), shape.m);
    assert_eq!(m.len(), shape.positions() * plane, "a plane of (C, F) per position");
    assert_eq!(dw.len(), 9 * plane, "a 3x3 kernel");
    let mut t = [[[0.0f64; RUN]; 6]; 3];
    for k0 in (0..plane).step_by(RUN) {
        let len = RUN.min(plane - k0);
        t.iter_mut().flatten().for_each(|run| run.fill(0.0));
        for a in 0..alpha {
            for b in 0..alpha {
                let row = &m[(a * alpha + b) * plane + k0..][..len];
                for i in 0..3 {
                    let o = weight_output(tile, a, i);
                    if o != 0.0 {
                        for (acc, &value) in t[i][b].iter_mut().zip(row) {
                            *acc += o * f64::from(value);
                        }
                    }
                }
            }
        }
        for i in 0..3 {
            for j in 0..3 {
                let out = &mut dw[(i * 3 + j) * plane + k0..][..len];
                for (k, value) in out.iter_mut().enumerate() {
                    let sum: f64 = (0..alpha).map(|b| t[i][b][k] * weight_output(tile, b, j)).sum();
                    *value = sum as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{Array1, Array4, s};

    use super::super::emit::Compiler;
    use super::*;
    use crate::backend::reference::ops::{self, Geometry};
    use crate::rng::Rng;

    fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
        (0..len).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
    }

    fn close(what: &str, expected: &[f32], actual: &[f32]) {
        close_within(what, expected, actual, 1e-4);
    }

    /// Each element within `tolerance` of the expected one, relative where that exceeds 1.
    fn close_within(what: &str, expected: &[f32], actual: &[f32], tolerance: f32) {
        assert_eq!(expected.len(), actual.len(), "{what}");
        for (i, (x, y)) in expected.iter().zip(actual).enumerate() {
            assert!((x - y).abs() <= tolerance * x.abs().max(1.0), "{what}[{i}]: expected {x}, got {y}");
        }
    }

    /// Runs the compiled kernel over samples 0..n of `x`, laid out (n, hp, wp, c) as `shape`
    /// says; returns y and the sums.
    fn run(
        shape: &WinogradShape,
        epilogue: Epilogue,
        x: &[f32],
        u: &[f32],
        b: &[f32],
        n: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let s = shape.conv;
        let mut compiler = Compiler::new("none").unwrap();
        let id = compiler.kernel("winograd", |e| forward(e, shape, epilogue)).unwrap();
        let kernel = compiler.finish(&[id]).unwrap()[0];
        let y = vec![0.0f32; n * s.oh * s.ow * s.f];
        let sums = vec![0.0f32; n * 2 * s.f];
        let scratch = vec![0.0f32; shape.scratch()];
        let buffers = [x.as_ptr(), u.as_ptr(), b.as_ptr(), y.as_ptr(), sums.as_ptr(), scratch.as_ptr()]
            .map(|p| p as *mut f32);
        // SAFETY: every buffer has the size the kernel was compiled for.
        unsafe { kernel(buffers.as_ptr(), 0, n as i64, n as i64) };
        (y, sums)
    }

    /// `x` (n, h, w, c) inside a zero border: `before` rows and columns before, and enough
    /// after that the buffer is (hp, wp).
    fn pad(x: &Array4<f32>, before: usize, [hp, wp]: [usize; 2]) -> Vec<f32> {
        let (n, h, w, c) = x.dim();
        let mut out = Array4::<f32>::zeros((n, hp, wp, c));
        out.slice_mut(s![.., before..before + h, before..before + w, ..]).assign(x);
        out.iter().copied().collect()
    }

    /// The forward pass's error bound against the direct sum: F(5x5)'s and F(6x6)'s (inference
    /// only) are ~2x F(4x4)'s, measured on these shapes (32 channels: 5.1e-5 for F(4x4), 1.1e-4
    /// for F(5x5), 8.5e-5 for F(6x6); 1.4e-4 for both with the input transform from the matrix,
    /// before [`factored_input`]).
    fn forward_tolerance(m: usize) -> f32 {
        if m <= 4 { 1e-4 } else { 3e-4 }
    }

    #[test]
    fn forward_matches_the_direct_convolution() {
        let mut rng = Rng::new(9, &[]);
        // (n, h, w, c, f): odd and even outputs, channel counts off the vector width
        for (n, h, w, c, f) in [
            (2, 7, 9, 5, 7),
            (1, 6, 6, 8, 12),
            (3, 5, 4, 13, 3),
            (1, 4, 3, 1, 9),
            (2, 13, 11, 32, 19),
            (1, 12, 14, 6, 10),
        ] {
            let x = Array4::from_shape_vec((n, h, w, c), random(n * h * w * c, &mut rng)).unwrap();
            let wv = random(9 * c * f, &mut rng);
            let k = Array4::from_shape_vec((3, 3, c, f), wv.clone()).unwrap();
            let b = random(f, &mut rng);
            let (oh, ow) = (h - 2, w - 2);
            let g = Geometry { kernel: [3, 3], stride: [1, 1], pad_before: [0, 0], out: [oh, ow] };
            let y_ref = ops::conv2d_forward(x.view(), k.view(), Some(Array1::from(b.clone()).view()), &g);

            for m in [2, 4, 5, 6] {
                let hp = (m * oh.div_ceil(m) + 2).max(h);
                let wp = (m * ow.div_ceil(m) + 2).max(w);
                let conv = ConvShape { hp, wp, c, kh: 3, kw: 3, f, oh, ow, sh: 1, sw: 1, bias: true };
                let shape = WinogradShape::new(conv, m).expect("3x3 stride 1 with room for the tiles");
                let u = transform_weights(&wv, &shape);
                let xp = pad(&x, 0, [hp, wp]);
                let what = format!("F({m}x{m}) forward {n}x{h}x{w}x{c} -> {f}");
                let close = |what: &str, expected: &[f32], actual: &[f32]| {
                    close_within(what, expected, actual, forward_tolerance(m))
                };
                let (y, _) = run(&shape, Epilogue::default(), &xp, &u, &b, n);
                close(&what, y_ref.as_slice().unwrap(), &y);

                // relu and the batch sums in the epilogue
                let (y, sums) = run(&shape, Epilogue { rectify: Some(0.0), stats: true }, &xp, &u, &b, n);
                let relu: Vec<f32> = y_ref.iter().map(|v| v.max(0.0)).collect();
                close(&format!("{what} + relu"), &relu, &y);
                let mut expected = vec![0.0f32; n * 2 * f];
                for (i, v) in relu.iter().enumerate() {
                    let (sample, channel) = (i / (oh * ow * f), i % f);
                    expected[sample * 2 * f + channel] += v;
                    expected[sample * 2 * f + f + channel] += v * v;
                }
                close(&format!("{what}: batch sums"), &expected, &sums);
            }
        }
    }

    #[test]
    fn transformed_weights_are_g_w_gt() {
        let mut rng = Rng::new(4, &[]);
        for (c, f, m) in [(3, 13, 2), (5, 7, 4), (1, 9, 2), (8, 4, 4), (6, 5, 5), (2, 9, 6)] {
            let w = random(9 * c * f, &mut rng);
            let conv =
                ConvShape { hp: 8, wp: 8, c, kh: 3, kw: 3, f, oh: 4, ow: 4, sh: 1, sw: 1, bias: false };
            let shape = WinogradShape::new(conv, m).unwrap();
            let u = transform_weights(&w, &shape);
            let alpha = m + 2;
            let g: Vec<[f64; 3]> = (0..alpha).map(|xi| g_row(m, xi)).collect();
            for (ci, fi) in (0..c).flat_map(|ci| (0..f).map(move |fi| (ci, fi))) {
                for (a, b) in (0..alpha).flat_map(|a| (0..alpha).map(move |b| (a, b))) {
                    let mut expected = 0.0f64;
                    for (i, j) in (0..3).flat_map(|i| (0..3).map(move |j| (i, j))) {
                        expected += g[a][i] * f64::from(w[((i * 3 + j) * c + ci) * f + fi]) * g[b][j];
                    }
                    let got = u[(a * alpha + b) * shape.weights_plane() + shape.weights_index(ci, fi)];
                    let what = format!("F({m}) c={c} f={f}: U[{a}][{b}] of ({ci}, {fi})");
                    assert!((f64::from(got) - expected).abs() <= 1e-6 * expected.abs().max(1.0), "{what}");
                }
            }
        }
    }

    #[test]
    fn weight_gradient_matches_the_direct_sum() {
        let mut rng = Rng::new(12, &[]);
        // (n, h, w, c, f): outputs 1–4 rows and columns past a multiple of 4 (partial last
        // tiles of each size), channel counts off 4
        let shapes = [
            (3, 7, 9, 5, 7),
            (2, 6, 6, 8, 12),
            (1, 5, 4, 13, 3),
            (2, 4, 3, 1, 9),
            (2, 8, 12, 6, 10),
            (1, 13, 13, 9, 17),
        ];
        for (n, h, w, c, f) in shapes {
            let x = Array4::from_shape_vec((n, h, w, c), random(n * h * w * c, &mut rng)).unwrap();
            let (oh, ow) = (h - 2, w - 2);
            let dy = Array4::from_shape_vec((n, oh, ow, f), random(n * oh * ow * f, &mut rng)).unwrap();
            let g = Geometry { kernel: [3, 3], stride: [1, 1], pad_before: [0, 0], out: [oh, ow] };
            let (dw_ref, db_ref) = ops::conv2d_backward_weights(x.view(), dy.view(), [3, 3, c, f], &g);
            // with a bias the kernel also sums db (the shape with an odd last tile row has one)
            let bias = oh % 2 == 1;
            let conv = ConvShape { hp: h, wp: w, c, kh: 3, kw: 3, f, oh, ow, sh: 1, sw: 1, bias };
            for tile in [2, 4] {
                let shape = WinogradShape::for_weights(conv, tile).expect("3x3 stride 1");
                let mut compiler = Compiler::new("none").unwrap();
                let id = compiler.kernel("weights", |e| weight_gradient(e, &shape)).unwrap();
                let kernel = compiler.finish(&[id]).unwrap()[0];
                let (xs, dys): (Vec<f32>, Vec<f32>) =
                    (x.iter().copied().collect(), dy.iter().copied().collect());
                // all samples in one call, then split in two calls (into the same M), with
                // scratches of their own
                for split in [n, n / 2] {
                    let (m, sums) = (vec![0.0f32; shape.positions() * c * f], vec![0.0f32; f]);
                    for (lo, hi) in [(0, split), (split, n)] {
                        let scratch = vec![0.0f32; shape.weight_scratch()];
                        let buffers =
                            [xs.as_ptr(), dys.as_ptr(), m.as_ptr(), scratch.as_ptr(), sums.as_ptr()]
                                .map(|p| p as *mut f32);
                        // SAFETY: every buffer has the size the kernel was compiled for.
                        unsafe { kernel(buffers.as_ptr(), lo as i64, hi as i64, n as i64) };
                    }
                    let dw = weight_gradient_output(&m, &shape);
                    let what = format!("F(3x3, {tile}x{tile}) weight gradient {n}x{h}x{w}x{c} -> {f}");
                    close(&what, dw_ref.as_slice().unwrap(), &dw);
                    let db: Vec<f32> = sums.iter().map(|v| v * bias_scale(&shape)).collect();
                    let expected = if bias { db_ref.to_vec() } else { vec![0.0; f] };
                    close(&format!("{what}: bias gradient"), &expected, &db);
                }
            }
        }
    }

    #[test]
    fn weight_gradient_tiles_follow_the_cost_model() {
        // mnist.cnn's conv2d_1: 9 tiles of 4x4 against 36 of 2x2, 25% less
        assert_eq!(weight_tile_size(32, 64, [11, 11]), 4);
        // 6x7 outputs, 16 → 21: 4 tiles of 4x4 cover 8x8, 12 of 2x2 cover 6x8
        assert_eq!(weight_tile_size(16, 21, [6, 7]), 2);
        // one input channel: the 4x4 tile's heavier transforms outweigh its products
        assert_eq!(weight_tile_size(1, 32, [26, 26]), 2);
    }

    #[test]
    fn the_cost_model_keeps_thin_layers_direct() {
        assert!(!chosen(1, 32), "a first layer with one input channel");
        assert!(chosen(32, 64));
        assert!(chosen(64, 64));
    }

    #[test]
    fn the_cost_model_takes_large_tiles_where_they_cover_the_output_well() {
        // 56x56, 64 → 64: 4x4 tiles, 25% fewer multiply-adds' worth
        assert_eq!(tile_size(64, 64, [56, 56]), 4);
        assert_eq!(tile_size(128, 128, [56, 56]), 4);
        // 11x11, 32 → 64 (mnist.cnn's conv2d_1): 36 tiles of 2x2 or 9 of 4x4, both covering
        // 12x12; 4x4 counts 18% less
        assert_eq!(tile_size(32, 64, [11, 11]), 4);
        // 10x10: 25 tiles of 2x2 cover it exactly, 9 of 4x4 cover 12x12 (19% more)
        assert_eq!(tile_size(32, 64, [10, 10]), 2);
        // 13x13, 32 → 32: 49 tiles of 2x2 (14x14) or 16 of 4x4 (16x16): about even
        assert_eq!(tile_size(32, 32, [13, 13]), 2);
    }
}
