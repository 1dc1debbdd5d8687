//! The most that cnnc's kernels can reach on this machine, measured: a JIT-compiled loop of
//! f32x4 fused multiply-adds on independent accumulators, run on every worker thread at once.
//! Cranelift's x64 backend emits vectors of 128 bits at most, so this is the ceiling of every
//! Cranelift kernel, whatever the CPU's own widest vectors are. Where the CPU has wider ones
//! (AVX2's 256 bits, AVX-512's 512) the same loop on them is measured too: the ceiling of
//! code compiled for them, the peers' (oneDNN's, XLA's) and [`super::avx512`]'s. `cnnc bench`
//! prints both and gives each group's rate as a share of the wider. On this project's
//! machines: 117 GFLOP/s f32x4 against 232 at 256 bits on 2 Zen 4 cores, whose AVX-512 runs
//! 256 bits a cycle (../shared/JIT-NOTES.md: 2x); 114–121 against 430–478 at 512 bits on 2
//! Zen 5 cores (family 26, 2026-12-02, four runs of `cnnc bench`: 3.6–4.0x).

use std::time::Instant;

use cranelift_codegen::ir::InstBuilder as _;

use super::emit::{Compiler, F32X4, KernelFn};

/// Independent accumulators: more than the multiply-add's latency times its pipes (4 cycles x
/// 2 on Zen 4 and 5), so that the loop is bound by throughput alone.
const CHAINS: usize = 12;
/// Floating-point operations per iteration of the loop: a multiply and an add per lane.
const FLOPS_PER_ITERATION: f64 = (CHAINS * 4 * 2) as f64;
/// How long each timed run lasts, about.
const RUN_SECONDS: f64 = 0.02;
/// Timed runs; the fastest is the ceiling (load on the machine only ever slows a run).
const RUNS: usize = 5;

/// The ceiling, as [`measure`] found it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ceiling {
    /// f32x4 multiply-add rate of all the worker threads together, in GFLOP/s.
    pub gflops: f64,
    /// The worker threads it ran on.
    pub threads: usize,
    /// The CPU's widest floating-point vectors, in bits, where known (x86-64: 512 with
    /// AVX-512F, 256 with AVX2 and FMA, else 128).
    pub host_bits: Option<u32>,
    /// The same loop on those vectors, where they are wider than 128 bits (compiled by rustc
    /// with the CPU's intrinsics, for this measurement only): the ceiling of code built for
    /// them, such as oneDNN's and XLA's. A CPU may run its widest vectors at half their width
    /// a cycle (Zen 4's AVX-512), so the width alone does not tell.
    pub wide_gflops: Option<f64>,
}

/// The widest vectors of the host CPU, in bits.
pub fn host_vector_bits() -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(512);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Some(256);
        }
        Some(128)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// The loop, compiled: buffers [out (4 floats)], items: iterations. Each iteration takes
/// every accumulator a ← a·m + b (m = 1 − 2⁻²⁰, b = 2⁻²⁰: the values stay near 1, never
/// overflow or go subnormal); `out` gets the accumulators' sum.
struct Loop {
    kernel: KernelFn,
    /// Keeps the code alive.
    _compiler: Compiler,
}

const M: f32 = 1.0 - 1.0 / (1 << 20) as f32;
const B: f32 = 1.0 / (1 << 20) as f32;

impl Loop {
    fn compile() -> anyhow::Result<Self> {
        let mut compiler = Compiler::new("none")?;
        let id = compiler.kernel("fma_ceiling", |e| {
            let out = e.buf(0);
            let m = e.b.ins().f32const(M);
            let m = e.splat(m);
            let b = e.b.ins().f32const(B);
            let b = e.splat(b);
            let zero = e.zero(F32X4);
            let acc: Vec<_> = (0..CHAINS).map(|_| e.var(F32X4, zero)).collect();
            let (start, end) = (e.start, e.end);
            e.for_range(start, end, |e, _| {
                for a in &acc {
                    let value = e.use_var(*a);
                    let next = e.fma(value, m, b);
                    e.def_var(*a, next);
                }
            });
            let mut sum = e.use_var(acc[0]);
            for a in &acc[1..] {
                let value = e.use_var(*a);
                sum = e.b.ins().fadd(sum, value);
            }
            e.store(sum, out, 0);
        })?;
        let kernel = compiler.finish(&[id])?[0];
        Ok(Loop { kernel, _compiler: compiler })
    }

    /// Runs `iterations` on every thread of the current rayon pool at once; the seconds that
    /// took.
    fn run_everywhere(&self, iterations: usize) -> f64 {
        let kernel = self.kernel;
        time_everywhere(|| run(kernel, iterations)[0])
    }
}

fn run(kernel: KernelFn, iterations: usize) -> [f32; 4] {
    let mut out = [0.0f32; 4];
    let bufs = [out.as_mut_ptr()];
    // SAFETY: the kernel writes 4 floats into buffer 0, which `out` holds, and reads no other
    // memory.
    unsafe { kernel(bufs.as_ptr(), 0, iterations as i64, 0) };
    out
}

/// Measures the ceiling on the current rayon pool (about 0.1 s).
pub fn measure() -> anyhow::Result<Ceiling> {
    let threads = rayon::current_num_threads();
    let lp = Loop::compile()?;
    // a short run to size the timed ones (and to wake the threads and the vector units)
    let probe = 1 << 20;
    let seconds = lp.run_everywhere(probe).max(1e-6);
    let iterations = ((probe as f64 * RUN_SECONDS / seconds) as usize).max(probe);
    // GFLOP/s of the fastest of the timed runs, `flops` an iteration on every thread
    let rate = |flops: f64, run: &dyn Fn() -> f64| {
        let best = (0..RUNS).map(|_| run()).fold(f64::INFINITY, f64::min);
        flops * iterations as f64 * threads as f64 / best / 1e9
    };
    let gflops = rate(FLOPS_PER_ITERATION, &|| lp.run_everywhere(iterations));
    let host_bits = host_vector_bits();
    let wide_gflops = host_bits.filter(|bits| *bits > 128).and_then(|bits| {
        let wide = wide_loop(bits)?;
        let lanes = bits as usize / 32;
        Some(rate((CHAINS * lanes * 2) as f64, &|| time_everywhere(|| wide(iterations))))
    });
    Ok(Ceiling { gflops, threads, host_bits, wide_gflops })
}

/// Seconds that `f` takes, run on every thread of the current rayon pool at once.
fn time_everywhere(f: impl Fn() -> f32 + Sync) -> f64 {
    let started = Instant::now();
    std::hint::black_box(rayon::broadcast(|_| f()));
    started.elapsed().as_secs_f64()
}

/// [`Loop`]'s recurrence on vectors of `bits`, for `iterations`; it returns a sum of the
/// accumulators, so that the loop is not optimized away.
fn wide_loop(bits: u32) -> Option<fn(usize) -> f32> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (both): called only where `host_vector_bits` found the features enabled.
        match bits {
            512 => Some(|n| unsafe { wide::fma512(n) }),
            256 => Some(|n| unsafe { wide::fma256(n) }),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = bits;
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use super::{B, CHAINS, M};

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma512(iterations: usize) -> f32 {
        let (m, b) = (_mm512_set1_ps(M), _mm512_set1_ps(B));
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iterations {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, m, b);
            }
        }
        acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma256(iterations: usize) -> f32 {
        let (m, b) = (_mm256_set1_ps(M), _mm256_set1_ps(B));
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for _ in 0..iterations {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, m, b);
            }
        }
        acc.iter().map(|a| _mm256_cvtss_f32(*a)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop does the work it is timed for: its sum is the one the same recurrence gives in
    /// Rust, with `mul_add` (a fused multiply-add rounds once, as the kernel's does).
    #[test]
    fn the_loop_computes_what_it_claims() {
        let lp = Loop::compile().unwrap();
        for iterations in [0, 1, 7, 1000] {
            let mut a = 0.0f32;
            for _ in 0..iterations {
                a = a.mul_add(M, B);
            }
            // twelve equal accumulators, summed left to right
            let mut sum = a;
            for _ in 1..CHAINS {
                sum += a;
            }
            assert_eq!(run(lp.kernel, iterations), [sum; 4], "{iterations} iterations");
        }
    }

    #[test]
    fn the_ceiling_is_a_rate() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let ceiling = pool.install(measure).unwrap();
        assert_eq!(ceiling.threads, 1);
        assert!(ceiling.gflops.is_finite() && ceiling.gflops > 0.0, "{ceiling:?}");
        if let Some(wide) = ceiling.wide_gflops {
            assert!(wide.is_finite() && wide > 0.0, "{ceiling:?}");
            assert!(ceiling.host_bits.is_some_and(|bits| bits > 128));
        }
    }
}
