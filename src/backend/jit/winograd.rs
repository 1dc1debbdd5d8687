//! Winograd convolution F(2x2, 3x3) for 3x3 stride-1 layers: each 2x2 block of outputs costs
//! 16 multiply-adds per (input, output) channel pair instead of 36, at the price of
//! transforming the input into tiles and the products back into pixels (Lavin & Gray 2015).
//!
//! ```text
//!   per sample, vectors over channels (NHWC keeps them contiguous):
//!     V[ξ][t][c] = (Bᵀ d B)[ξ]       d: the 4x4 input tile t, ξ one of its 16 positions
//!     M[ξ][t][f] = Σ_c V[ξ][t][c] · U[ξ][c][f]     16 matrix products (tiles x C) x (C x F)
//!     y[tile t]  = Aᵀ M[·][t] A  (+ bias, epilogue)   2x2 pixels, those inside the output
//!   U[ξ][c][f] = (G w[·][·][c][f] Gᵀ)[ξ], computed once a step by [`transform_weights`]
//! ```
//!
//! The products run on the register-blocked kernel of conv.rs (4 tiles x 8 channels).
//!
//! Only the forward pass (training and inference) uses it. The input gradient is the same
//! operation (a valid convolution of dy padded by 2 with the kernel flipped and transposed),
//! but measured on mnist.cnn's conv2d_1 (batch 128, 2 threads) it took 8.3 ms against the
//! direct kernel's 7.6: 13x13 outputs are 49 tiles (a partial register block of one), the
//! padded copy of dy and the larger scratch ate the saving.
//!
//! Numerically the transforms add and subtract values of the input's magnitude, and G's
//! halves are exact in f32, so the result differs from the direct sum only by rounding
//! (measured in tests/jit.rs against the reference: within its 1e-4 tolerance).

use cranelift_codegen::ir::{InstBuilder as _, Value};

use super::conv::{
    ConvShape, Epilogue, Width, accumulate, accumulators, add_sums, for_chunks, for_pixel_blocks, load_chunk,
    pack_weights, store_chunk,
};
use super::emit::Emit;

/// Positions of a 4x4 tile.
const XI: usize = 16;

/// A 3x3 stride-1 convolution computed by tiles of 2x2 outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WinogradShape {
    /// The convolution: `hp`, `wp` are the input buffer's height and width per sample; `oh`,
    /// `ow` the outputs computed (tiles cover them, so the buffer needs 2·⌈oh/2⌉ + 2 rows and
    /// 2·⌈ow/2⌉ + 2 columns: see [`WinogradShape::new`]).
    pub conv: ConvShape,
    /// Tiles down and across: ⌈oh/2⌉, ⌈ow/2⌉.
    pub th: usize,
    pub tw: usize,
}

impl WinogradShape {
    /// `None` unless `conv` is 3x3 with stride 1 and its input buffer holds every tile's 4x4
    /// window (the caller pads odd sizes by one more row or column).
    pub fn new(conv: ConvShape) -> Option<Self> {
        let square = conv.kh == 3 && conv.kw == 3 && conv.sh == 1 && conv.sw == 1;
        let (th, tw) = (conv.oh.div_ceil(2), conv.ow.div_ceil(2));
        let fits = 2 * th + 2 <= conv.hp && 2 * tw + 2 <= conv.wp;
        (square && fits && conv.oh > 0 && conv.ow > 0).then_some(WinogradShape { conv, th, tw })
    }

    /// Tiles per sample.
    pub fn tiles(&self) -> usize {
        self.th * self.tw
    }

    /// Elements of the kernel's scratch: V (16·tiles·C) then M (16·tiles·F), for one sample.
    pub fn scratch(&self) -> usize {
        XI * self.tiles() * (self.conv.c + self.conv.f)
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

/// G (4x3): U = G g Gᵀ.
const G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

/// The kernel's weights for `shape.conv`: U[ξ][c][f] = (G w[·][·][c][f] Gᵀ)[ξ] from `w` laid out
/// (3, 3, C, F) (HWIO), each ξ's (C, F) matrix packed by [`pack_weights`].
// Tile positions are indices in the transforms' formulas: loops over them read as the math.
#[allow(clippy::needless_range_loop)]
pub fn transform_weights(w: &[f32], shape: &WinogradShape) -> Vec<f32> {
    let (c, f) = (shape.conv.c, shape.conv.f);
    assert_eq!(w.len(), 9 * c * f, "a 3x3 kernel");
    let at = |i: usize, j: usize, ci: usize, fi: usize| f64::from(w[((i * 3 + j) * c + ci) * f + fi]);
    let mut u = Vec::with_capacity(XI * c * f);
    for xi in 0..XI {
        let (a, b) = (xi / 4, xi % 4);
        let mut plane = vec![0.0f32; c * f];
        for ci in 0..c {
            for fi in 0..f {
                let mut sum = 0.0;
                for i in 0..3 {
                    for j in 0..3 {
                        sum += G[a][i] * at(i, j, ci, fi) * G[b][j];
                    }
                }
                plane[ci * f + fi] = sum as f32;
            }
        }
        u.extend(pack_weights(&plane, c, f));
    }
    u
}

/// y = conv(x, w) + b for samples start..end by F(2x2, 3x3), then `epilogue` (as
/// [`super::conv::forward`]'s). Buffers: [x (N, HP, WP, C), U ([`transform_weights`]), b (F) or
/// unused, y (N, OH, OW, F), sums (N, 2, F) or unused, scratch ([`WinogradShape::scratch`],
/// one per concurrent call)].
pub fn forward(e: &mut Emit, shape: &WinogradShape, epilogue: Epilogue) {
    let s = shape.conv;
    let (x, u, y, scratch) = (e.buf(0), e.buf(1), e.buf(3), e.buf(5));
    let bias = s.bias.then(|| e.buf(2));
    let sums = epilogue.stats.then(|| e.buf(4));
    let tiles = shape.tiles();
    let v = scratch;
    let m = e.at_k(scratch, (XI * tiles * s.c) as i64);
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
        transform_input(e, shape, xn, v);
        multiply(e, shape, v, u, m);
        let out = Output { bias, yn, sums_n, epilogue };
        transform_output(e, shape, m, out);
    });
}

/// V[ξ][t][c] = (Bᵀ d B)[ξ] for every tile t of the sample at `xn`.
// Tile positions are indices in the transforms' formulas: loops over them read as the math.
#[allow(clippy::needless_range_loop)]
fn transform_input(e: &mut Emit, shape: &WinogradShape, xn: Value, v: Value) {
    let s = shape.conv;
    let tiles = shape.tiles();
    e.for_n(shape.th, |e, ty| {
        e.for_n(shape.tw, |e, tx| {
            // the tile's top-left input pixel: (2·ty, 2·tx)
            let row = e.mul_k(ty, (2 * s.wp) as i64);
            let col = e.mul_k(tx, 2);
            let pixel = e.add(row, col);
            let origin = e.mul_k(pixel, s.c as i64);
            let t = e.mul_k(ty, shape.tw as i64);
            let t = e.add(t, tx);
            for_chunks(e, s.c, |e, c0, width| {
                let base = e.add(origin, c0);
                let base = e.at(xn, base);
                // d[i][j]: one chunk of channels per position
                let d: Vec<Vec<Vec<Value>>> = (0..4)
                    .map(|i| {
                        (0..4).map(|j| load_chunk(e, base, ((i * s.wp + j) * s.c) as i64, width)).collect()
                    })
                    .collect();
                let rows: Vec<Vec<Vec<Value>>> =
                    (0..4).map(|j| bt_column(e, [0, 1, 2, 3].map(|i| &d[i][j]))).collect();
                // rows[j][a] = (Bᵀ d)[a][j]; now the columns: V[a][b] = Σ_j (Bᵀ d)[a][j] B[j][b]
                for a in 0..4 {
                    let out = bt_column(e, [0, 1, 2, 3].map(|j| &rows[j][a]));
                    for (b, values) in out.iter().enumerate() {
                        let xi = a * 4 + b;
                        let off = e.mul_k(t, s.c as i64);
                        let off = e.add_k(off, (xi * tiles * s.c) as i64);
                        let off = e.add(off, c0);
                        let addr = e.at(v, off);
                        store_chunk(e, values, addr, 0);
                    }
                }
            });
        });
    });
}

/// Bᵀ applied to four values (each a chunk of channels): [d0 − d2, d1 + d2, d2 − d1, d1 − d3].
fn bt_column(e: &mut Emit, d: [&Vec<Value>; 4]) -> Vec<Vec<Value>> {
    let terms: [(usize, usize, bool); 4] = [(0, 2, false), (1, 2, true), (2, 1, false), (1, 3, false)];
    terms
        .iter()
        .map(|&(a, b, add)| {
            (0..d[0].len())
                .map(|p| if add { e.ins().fadd(d[a][p], d[b][p]) } else { e.ins().fsub(d[a][p], d[b][p]) })
                .collect()
        })
        .collect()
}

/// M[ξ] = V[ξ] (tiles x C) · U[ξ] (C x F) for the 16 positions, with conv.rs's register
/// blocks: 4 tiles x one chunk of output channels, over the input channels.
fn multiply(e: &mut Emit, shape: &WinogradShape, v: Value, u: Value, m: Value) {
    let s = shape.conv;
    let tiles = shape.tiles();
    e.for_n(XI, |e, xi| {
        let v_off = e.mul_k(xi, (tiles * s.c) as i64);
        let vxi = e.at(v, v_off);
        let u_off = e.mul_k(xi, (s.c * s.f) as i64);
        let uxi = e.at(u, u_off);
        let m_off = e.mul_k(xi, (tiles * s.f) as i64);
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

/// Where the output transform puts its pixels.
#[derive(Clone, Copy)]
struct Output {
    bias: Option<Value>,
    yn: Value,
    sums_n: Option<Value>,
    epilogue: Epilogue,
}

/// y[2ty + a][2tx + b] = (Aᵀ M A)[a][b] for every tile, only the pixels inside the output:
/// the last tile row (column) holds one row (column) of them when OH (OW) is odd.
fn transform_output(e: &mut Emit, shape: &WinogradShape, m: Value, out: Output) {
    let s = shape.conv;
    let (full_rows, full_cols) = (s.oh / 2, s.ow / 2);
    let tile_rows = |e: &mut Emit, ty: Value, valid_rows: usize| {
        e.for_n(full_cols, |e, tx| output_tile(e, shape, m, out, [ty, tx], [valid_rows, 2]));
        if s.ow % 2 == 1 {
            let tx = e.int(full_cols as i64);
            output_tile(e, shape, m, out, [ty, tx], [valid_rows, 1]);
        }
    };
    e.for_n(full_rows, |e, ty| tile_rows(e, ty, 2));
    if s.oh % 2 == 1 {
        let ty = e.int(full_rows as i64);
        tile_rows(e, ty, 1);
    }
}

/// One tile's output pixels, `valid` rows and columns of its 2x2.
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
    let tiles = shape.tiles();
    let t = e.mul_k(ty, shape.tw as i64);
    let t = e.add(t, tx);
    let m_t = e.mul_k(t, s.f as i64);
    let mt = e.at(m, m_t);
    // y at (2ty, 2tx)
    let row = e.mul_k(ty, (2 * s.ow) as i64);
    let col = e.mul_k(tx, 2);
    let pixel = e.add(row, col);
    let y_off = e.mul_k(pixel, s.f as i64);
    let ybase = e.at(out.yn, y_off);
    for_chunks(e, s.f, |e, f0, width| {
        let parts = width.parts();
        let base = e.at(mt, f0);
        let mv: Vec<Vec<Value>> =
            (0..XI).map(|xi| load_chunk(e, base, (xi * tiles * s.f) as i64, width)).collect();
        // Aᵀ on each column b of M: [m0 + m1 + m2, m1 − m2 − m3]
        let at_column = |e: &mut Emit, col: [&Vec<Value>; 4]| -> [Vec<Value>; 2] {
            let mut first = Vec::with_capacity(parts);
            let mut second = Vec::with_capacity(parts);
            for p in 0..parts {
                let s01 = e.ins().fadd(col[0][p], col[1][p]);
                first.push(e.ins().fadd(s01, col[2][p]));
                let d12 = e.ins().fsub(col[1][p], col[2][p]);
                second.push(e.ins().fsub(d12, col[3][p]));
            }
            [first, second]
        };
        // rows[b][a] = (Aᵀ M)[a][b]
        let rows: Vec<[Vec<Value>; 2]> =
            (0..4).map(|b| at_column(e, [0, 1, 2, 3].map(|a| &mv[a * 4 + b]))).collect();
        let bias = out.bias.map(|b| {
            let addr = e.at(b, f0);
            load_chunk(e, addr, 0, width)
        });
        let mut stored = Vec::with_capacity(4);
        for a in 0..valid[0] {
            let y = at_column(e, [0, 1, 2, 3].map(|b| &rows[b][a]));
            for (b, values) in y.into_iter().enumerate().take(valid[1]) {
                let mut values = values;
                if let Some(bias) = &bias {
                    values = values.iter().zip(bias).map(|(v, b)| e.ins().fadd(*v, *b)).collect();
                }
                if let Some(alpha) = out.epilogue.rectify {
                    let vector = width != Width::Scalar;
                    values = values.iter().map(|v| super::eltwise::rectify(e, *v, alpha, vector)).collect();
                }
                let offset = ((a * s.ow + b) * s.f) as i64;
                let addr = e.at(ybase, f0);
                store_chunk(e, &values, addr, offset);
                stored.push(values);
            }
        }
        if let Some(sums_n) = out.sums_n {
            let base = e.at(sums_n, f0);
            add_sums(e, &stored, base, s.f, width);
        }
    });
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
        assert_eq!(expected.len(), actual.len(), "{what}");
        for (i, (x, y)) in expected.iter().zip(actual).enumerate() {
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{what}[{i}]: expected {x}, got {y}");
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

    #[test]
    fn forward_matches_the_direct_convolution() {
        let mut rng = Rng::new(9, &[]);
        // (n, h, w, c, f): odd and even outputs, channel counts off the vector width
        for (n, h, w, c, f) in [(2, 7, 9, 5, 7), (1, 6, 6, 8, 12), (3, 5, 4, 13, 3), (1, 4, 3, 1, 9)] {
            let x = Array4::from_shape_vec((n, h, w, c), random(n * h * w * c, &mut rng)).unwrap();
            let wv = random(9 * c * f, &mut rng);
            let k = Array4::from_shape_vec((3, 3, c, f), wv.clone()).unwrap();
            let b = random(f, &mut rng);
            let (oh, ow) = (h - 2, w - 2);
            let g = Geometry { kernel: [3, 3], stride: [1, 1], pad_before: [0, 0], out: [oh, ow] };
            let y_ref = ops::conv2d_forward(x.view(), k.view(), Some(Array1::from(b.clone()).view()), &g);

            let hp = (2 * oh.div_ceil(2) + 2).max(h);
            let wp = (2 * ow.div_ceil(2) + 2).max(w);
            let conv = ConvShape { hp, wp, c, kh: 3, kw: 3, f, oh, ow, sh: 1, sw: 1, bias: true };
            let shape = WinogradShape::new(conv).expect("3x3 stride 1 with room for the tiles");
            let u = transform_weights(&wv, &shape);
            let xp = pad(&x, 0, [hp, wp]);
            let (y, _) = run(&shape, Epilogue::default(), &xp, &u, &b, n);
            close(&format!("forward {n}x{h}x{w}x{c} -> {f}"), y_ref.as_slice().unwrap(), &y);

            // relu and the batch sums in the epilogue
            let (y, sums) = run(&shape, Epilogue { rectify: Some(0.0), stats: true }, &xp, &u, &b, n);
            let relu: Vec<f32> = y_ref.iter().map(|v| v.max(0.0)).collect();
            close("forward + relu", &relu, &y);
            let mut expected = vec![0.0f32; n * 2 * f];
            for (i, v) in relu.iter().enumerate() {
                let (sample, channel) = (i / (oh * ow * f), i % f);
                expected[sample * 2 * f + channel] += v;
                expected[sample * 2 * f + f + channel] += v * v;
            }
            close("batch sums", &expected, &sums);
        }
    }

    #[test]
    fn the_cost_model_keeps_thin_layers_direct() {
        assert!(!chosen(1, 32), "a first layer with one input channel");
        assert!(chosen(32, 64));
        assert!(chosen(64, 64));
    }
}
