//! The JIT's plumbing: a Cranelift module for the host CPU, and [`Emit`], a small layer over
//! `FunctionBuilder` for the loops, addresses and f32x4 arithmetic that every kernel is made of.
//!
//! Every kernel has one signature, `fn(bufs: *const *mut f32, start: i64, end: i64, batch: i64)`:
//! `bufs` holds the kernel's buffers in an order the kernel defines, `start..end` is the range of
//! work items this call does (samples, or weight-gradient tasks), and `batch` the number of
//! samples in the batch. Shapes are compile-time constants.

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{AbiParam, InstBuilder, MemFlagsData, Type, Value, types};
use cranelift_codegen::isa::TargetIsa;
use cranelift_codegen::settings::{self, Configurable as _};
use cranelift_codegen::{Context, ir};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module as _, ModuleReloc, default_libcall_names};

/// A compiled kernel: see the module documentation for its arguments.
pub type KernelFn = unsafe extern "C" fn(*const *mut f32, i64, i64, i64);

/// The Cranelift module that kernels are compiled into, for the host CPU.
pub struct Compiler {
    pub module: JITModule,
    ctx: Context,
    fbc: FunctionBuilderContext,
    /// CLIF text of each kernel, kept when asked for (`cnnc compile --emit clif`).
    pub keep_clif: bool,
    /// Disassembly of each kernel, kept when asked for (`cnnc compile --emit asm`).
    pub keep_asm: bool,
    pub listings: Vec<(String, String)>,
    /// Kernels built (as CLIF) and not compiled yet: [`Compiler::finish`] compiles them.
    pending: Vec<(FuncId, String, ir::Function)>,
    /// Each defined kernel's name and code size, for the perf map ([`Compiler::finish`]).
    sizes: Vec<(FuncId, String, usize)>,
}

impl Compiler {
    /// `opt_level` is Cranelift's: "none" or "speed". ISA features (AVX, FMA) come from the host;
    /// without FMA every f32x4 `fma` would become four library calls.
    pub fn new(opt_level: &str) -> anyhow::Result<Self> {
        let mut flags = settings::builder();
        flags.set("opt_level", opt_level)?;
        flags.set("is_pic", "false")?;
        flags.set("use_colocated_libcalls", "false")?;
        flags.set("enable_verifier", if cfg!(debug_assertions) { "true" } else { "false" })?;
        let isa = cranelift_native::builder()
            .map_err(|e| anyhow::anyhow!("cannot compile for this CPU: {e}"))?
            .finish(settings::Flags::new(flags))?;
        let module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
        Ok(Compiler {
            ctx: module.make_context(),
            module,
            fbc: FunctionBuilderContext::new(),
            keep_clif: false,
            keep_asm: false,
            listings: Vec::new(),
            pending: Vec::new(),
            sizes: Vec::new(),
        })
    }

    /// Whether the host has what fast kernels need (checked by tests and reported by `bench`).
    pub fn has_fma(&self) -> bool {
        self.module.isa().isa_flags().iter().any(|f| f.name == "has_fma" && f.as_bool().unwrap_or(false))
    }

    /// Declares one kernel and builds its body, written by `body`; [`Compiler::finish`]
    /// compiles it.
    pub fn kernel(&mut self, name: &str, body: impl FnOnce(&mut Emit)) -> anyhow::Result<FuncId> {
        let ptr = self.module.target_config().pointer_type();
        let mut sig = self.module.make_signature();
        sig.params.push(AbiParam::new(ptr));
        for _ in 0..3 {
            sig.params.push(AbiParam::new(types::I64));
        }
        let id = self.module.declare_function(name, Linkage::Local, &sig)?;
        self.ctx.func.signature = sig;
        {
            let mut b = FunctionBuilder::new(&mut self.ctx.func, &mut self.fbc);
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            b.seal_block(entry);
            let params = b.block_params(entry).to_vec();
            let mut e = Emit { b, ptr, bufs: params[0], start: params[1], end: params[2], batch: params[3] };
            body(&mut e);
            e.b.ins().return_(&[]);
            e.b.seal_all_blocks();
            e.b.finalize(self.module.target_config());
        }
        if self.keep_clif {
            self.listings.push((name.to_string(), self.ctx.func.display().to_string()));
        }
        let func = std::mem::replace(&mut self.ctx.func, ir::Function::new());
        self.pending.push((id, name.to_string(), func));
        self.module.clear_context(&mut self.ctx);
        Ok(id)
    }

    /// Compiles the kernels built since the last call, on the worker threads (each on its own:
    /// they share nothing; mnist.cnn's F(4x4) kernels take 10–20 ms each, most of it
    /// register allocation), defines and finalizes them, and returns the entry points of `ids`.
    ///
    /// With `CNNC_PERF_MAP` set, also appends each kernel's address, size and name to
    /// `/tmp/perf-<pid>.map`, where `perf report` looks up the names of JIT-compiled code
    /// (a tool for profiling: any failure to write it is ignored).
    pub fn finish(&mut self, ids: &[FuncId]) -> anyhow::Result<Vec<KernelFn>> {
        use rayon::prelude::*;
        let isa = self.module.isa();
        let floor = u64::from(isa.function_alignment().minimum).max(isa.symbol_alignment());
        let keep_asm = self.keep_asm;
        // The largest first, each a task of its own (the longest should not start last), then
        // back in the order they were built.
        let mut pending: Vec<_> = std::mem::take(&mut self.pending).into_iter().enumerate().collect();
        pending.sort_by_key(|(_, (_, _, func))| std::cmp::Reverse(func.dfg.num_insts()));
        let mut compiled: Vec<(usize, anyhow::Result<Compiled>)> = pending
            .into_par_iter()
            .with_max_len(1)
            .map(|(i, (id, name, func))| (i, compile(isa, keep_asm, id, name, func)))
            .collect();
        compiled.sort_by_key(|(i, _)| *i);
        for (_, kernel) in compiled {
            let Compiled { id, name, code, alignment, relocs, asm } = kernel?;
            self.module.define_function_bytes(id, alignment.max(floor), &code, &relocs)?;
            if let Some(asm) = asm {
                self.listings.push((name.clone(), asm));
            }
            self.sizes.push((id, name, code.len()));
        }
        self.module.finalize_definitions()?;
        if std::env::var_os("CNNC_PERF_MAP").is_some() {
            self.write_perf_map(ids);
        }
        Ok(ids.iter().map(|id| code_pointer(self.module.get_finalized_function(*id))).collect())
    }

    fn write_perf_map(&self, ids: &[FuncId]) {
        use std::io::Write as _;
        let mut lines = String::new();
        for (id, name, size) in self.sizes.iter().filter(|(id, ..)| ids.contains(id)) {
            let address = self.module.get_finalized_function(*id) as usize;
            lines += &format!("{address:x} {size:x} cnnc::{name}\n");
        }
        let path = format!("/tmp/perf-{}.map", std::process::id());
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
        let _ = file.and_then(|mut f| f.write_all(lines.as_bytes()));
    }
}

/// One kernel's machine code, compiled apart from the module ([`Compiler::finish`]).
struct Compiled {
    id: FuncId,
    name: String,
    code: Vec<u8>,
    alignment: u64,
    relocs: Vec<ModuleReloc>,
    /// The disassembly, when asked for.
    asm: Option<String>,
}

fn compile(
    isa: &dyn TargetIsa,
    keep_asm: bool,
    id: FuncId,
    name: String,
    func: ir::Function,
) -> anyhow::Result<Compiled> {
    let mut ctx = Context::for_function(func);
    ctx.set_disasm(keep_asm);
    let mut control = ControlPlane::default();
    ctx.compile(isa, &mut control).map_err(|e| {
        anyhow::anyhow!("kernel {name}: {}", cranelift_codegen::print_errors::pretty_error(e.func, e.inner))
    })?;
    let code = ctx.compiled_code().expect("just compiled");
    let alignment = u64::from(code.buffer.alignment);
    let relocs =
        code.buffer.relocs().iter().map(|r| ModuleReloc::from_mach_reloc(r, &ctx.func, id)).collect();
    let asm = keep_asm.then(|| code.vcode.clone().unwrap_or_default());
    Ok(Compiled { id, name, code: code.code_buffer().to_vec(), alignment, relocs, asm })
}

/// Turns finalized code into a callable kernel.
///
/// # Safety
/// The pointer comes from `JITModule::get_finalized_function` for a function declared with
/// the kernel signature in [`Compiler::kernel`]; the module (and so the code) lives as long
/// as the `Compiler`, which the kernels' owner keeps alive.
fn code_pointer(code: *const u8) -> KernelFn {
    unsafe { std::mem::transmute::<*const u8, KernelFn>(code) }
}

/// Loads and stores of f32 data: the buffers never trap and are 4-byte aligned only, so the
/// `aligned` flag (which would let x64 fold a 16-byte-aligned memory operand) is not set.
fn data() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Builds one kernel's body.
pub struct Emit<'a> {
    pub b: FunctionBuilder<'a>,
    pub ptr: Type,
    bufs: Value,
    pub start: Value,
    pub end: Value,
    pub batch: Value,
}

impl<'a> Emit<'a> {
    /// The base pointer of buffer `i`.
    pub fn buf(&mut self, i: usize) -> Value {
        let offset = (i * 8) as i32;
        let flags = MemFlagsData::new().with_notrap().with_readonly();
        self.b.ins().load(self.ptr, flags, self.bufs, offset)
    }

    pub fn int(&mut self, v: i64) -> Value {
        self.b.ins().iconst(types::I64, v)
    }

    /// The value of `v` when it is an integer constant. Index arithmetic on constants (the
    /// unrolled copies of a loop body, loops of one iteration) is folded here: kernels compile
    /// at opt level `none`, which folds nothing, and x64 then multiplies constants loaded from
    /// memory inside the inner loops.
    fn constant(&self, v: Value) -> Option<i64> {
        let ir::ValueDef::Result(inst, 0) = self.b.func.dfg.value_def(v) else { return None };
        match self.b.func.dfg.insts[inst] {
            ir::InstructionData::UnaryImm { opcode: ir::Opcode::Iconst, imm } => Some(imm.bits()),
            _ => None,
        }
    }

    pub fn add(&mut self, a: Value, b: Value) -> Value {
        match (self.constant(a), self.constant(b)) {
            (Some(x), Some(y)) => self.int(x + y),
            (Some(x), None) => self.add_k(b, x),
            (None, Some(y)) => self.add_k(a, y),
            (None, None) => self.b.ins().iadd(a, b),
        }
    }

    /// a + k. Where `a` is itself some b + k₀, b + (k₀ + k): x64 takes one constant into a
    /// load's address, and a second one costs an instruction (a register set to it).
    pub fn add_k(&mut self, a: Value, k: i64) -> Value {
        if let Some(x) = self.constant(a) {
            return self.int(x + k);
        }
        if k == 0 {
            return a;
        }
        if let ir::ValueDef::Result(inst, 0) = self.b.func.dfg.value_def(a)
            && let ir::InstructionData::Binary { opcode: ir::Opcode::Iadd, args: [b, k0] } =
                self.b.func.dfg.insts[inst]
            && let Some(k0) = self.constant(k0)
        {
            return self.b.ins().iadd_imm_s(b, k0 + k);
        }
        self.b.ins().iadd_imm_s(a, k)
    }

    pub fn mul_k(&mut self, a: Value, k: i64) -> Value {
        match self.constant(a) {
            Some(x) => self.int(x * k),
            None if k == 1 => a,
            None => self.b.ins().imul_imm_s(a, k),
        }
    }

    /// ⌊a / d⌋ for 0 ≤ a < `bound`, d a constant: a multiply and a shift by the reciprocal
    /// m = ⌈2^s / d⌉ with bound·d ≤ 2^s, exact over that range (the error a·(m·d − 2^s) / 2^s
    /// stays below a/2^s < 1/d). Opt level `none` would emit a division instruction, tens of
    /// cycles, which the weight gradient needs for every row of every task of every sample.
    pub fn div_k(&mut self, a: Value, d: u64, bound: u64) -> Value {
        assert!(d > 0, "a division by a constant that is not zero");
        if let Some(x) = self.constant(a) {
            return self.int(x / d as i64);
        }
        if d.is_power_of_two() {
            return self.b.ins().ushr_imm_u(a, i64::from(d.trailing_zeros()));
        }
        let shift = u128::from(bound.max(1)) * u128::from(d);
        let s = 128 - (shift - 1).leading_zeros();
        let m = (1u128 << s).div_ceil(u128::from(d));
        if s >= 64 || u128::from(bound) * m >= 1u128 << 63 {
            return self.b.ins().udiv_imm_u(a, d as i64);
        }
        let product = self.b.ins().imul_imm_s(a, m as i64);
        self.b.ins().ushr_imm_u(product, i64::from(s))
    }

    /// a mod d for 0 ≤ a < `bound`, d a constant (see [`Emit::div_k`]).
    pub fn rem_k(&mut self, a: Value, d: u64, bound: u64) -> Value {
        let q = self.div_k(a, d, bound);
        let qd = self.mul_k(q, d as i64);
        if let (Some(x), Some(y)) = (self.constant(a), self.constant(qd)) {
            return self.int(x - y);
        }
        self.b.ins().isub(a, qd)
    }

    /// `base + index` elements of f32.
    pub fn at(&mut self, base: Value, index: Value) -> Value {
        if let Some(k) = self.constant(index) {
            return self.add_k(base, k * 4);
        }
        let bytes = self.b.ins().ishl_imm_u(index, 2);
        self.b.ins().iadd(base, bytes)
    }

    /// `base + k` elements of f32, k a constant.
    pub fn at_k(&mut self, base: Value, k: i64) -> Value {
        self.add_k(base, k * 4)
    }

    pub fn load(&mut self, addr: Value, offset_elems: i64) -> Value {
        self.b.ins().load(types::F32, data(), addr, (offset_elems * 4) as i32)
    }

    pub fn load4(&mut self, addr: Value, offset_elems: i64) -> Value {
        self.b.ins().load(types::F32X4, data(), addr, (offset_elems * 4) as i32)
    }

    pub fn store(&mut self, value: Value, addr: Value, offset_elems: i64) {
        self.b.ins().store(data(), value, addr, (offset_elems * 4) as i32);
    }

    pub fn splat(&mut self, scalar: Value) -> Value {
        self.b.ins().splat(types::F32X4, scalar)
    }

    pub fn zero(&mut self, ty: Type) -> Value {
        let z = self.b.ins().f32const(0.0f32);
        if ty == types::F32X4 { self.splat(z) } else { z }
    }

    pub fn fma(&mut self, a: Value, b: Value, c: Value) -> Value {
        self.b.ins().fma(a, b, c)
    }

    pub fn var(&mut self, ty: Type, init: Value) -> Variable {
        let v = self.b.declare_var(ty);
        self.b.def_var(v, init);
        v
    }

    /// `for i in lo..hi { body(i) }`, lo and hi at run time.
    pub fn for_range(&mut self, lo: Value, hi: Value, body: impl FnOnce(&mut Self, Value)) {
        let header = self.b.create_block();
        let inner = self.b.create_block();
        let exit = self.b.create_block();
        let i = self.var(types::I64, lo);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let iv = self.b.use_var(i);
        let more = self.b.ins().icmp(IntCC::SignedLessThan, iv, hi);
        self.b.ins().brif(more, inner, &[], exit, &[]);
        self.b.switch_to_block(inner);
        self.b.seal_block(inner);
        let iv = self.b.use_var(i);
        body(self, iv);
        let iv = self.b.use_var(i);
        let next = self.b.ins().iadd_imm_s(iv, 1);
        self.b.def_var(i, next);
        self.b.ins().jump(header, &[]);
        self.b.seal_block(header);
        self.b.switch_to_block(exit);
        self.b.seal_block(exit);
    }

    /// `for i in 0..n`, n a constant; no loop at all when n is 1.
    pub fn for_n(&mut self, n: usize, body: impl FnOnce(&mut Self, Value)) {
        match n {
            0 => {}
            1 => {
                let zero = self.int(0);
                body(self, zero);
            }
            _ => {
                let (lo, hi) = (self.int(0), self.int(n as i64));
                self.for_range(lo, hi, body);
            }
        }
    }

    /// `for i in 0..n`, n a constant, the body emitted `unroll` times per iteration (and once
    /// for each of the `n % unroll` last values): fewer branches and index updates per FMA.
    pub fn for_n_unrolled(&mut self, n: usize, unroll: usize, mut body: impl FnMut(&mut Self, Value)) {
        let unroll = unroll.max(1);
        self.for_n(n / unroll, |e, i| {
            let base = e.mul_k(i, unroll as i64);
            for j in 0..unroll {
                let index = e.add_k(base, j as i64);
                body(e, index);
            }
        });
        for j in (n / unroll) * unroll..n {
            let index = self.int(j as i64);
            body(self, index);
        }
    }

    /// Runs `then` only when `cond` (an integer) is non-zero.
    pub fn when(&mut self, cond: Value, then: impl FnOnce(&mut Self)) {
        let yes = self.b.create_block();
        let done = self.b.create_block();
        self.b.ins().brif(cond, yes, &[], done, &[]);
        self.b.switch_to_block(yes);
        self.b.seal_block(yes);
        then(self);
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(done);
        self.b.seal_block(done);
    }

    /// `then` where `cond` holds, else `otherwise`: one branch, two bodies.
    pub fn when_else(
        &mut self,
        cond: Value,
        then: impl FnOnce(&mut Self),
        otherwise: impl FnOnce(&mut Self),
    ) {
        let (yes, no, done) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
        self.b.ins().brif(cond, yes, &[], no, &[]);
        self.b.switch_to_block(yes);
        self.b.seal_block(yes);
        then(self);
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(no);
        self.b.seal_block(no);
        otherwise(self);
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(done);
        self.b.seal_block(done);
    }

    pub fn icmp(&mut self, cc: IntCC, a: Value, b: Value) -> Value {
        self.b.ins().icmp(cc, a, b)
    }

    pub fn ins(&mut self) -> cranelift_frontend::FuncInstBuilder<'_, 'a> {
        self.b.ins()
    }

    pub fn use_var(&mut self, v: Variable) -> Value {
        self.b.use_var(v)
    }

    pub fn def_var(&mut self, v: Variable, value: Value) {
        self.b.def_var(v, value)
    }
}

/// The vector type kernels compute in: 128 bits, the widest Cranelift's x64 backend has.
pub const F32X4: ir::Type = types::F32X4;
pub const F32: ir::Type = types::F32;

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles a kernel that, for each item i, reads a[i] (i64) and writes a[i] / d and
    /// a[i] mod d as [`Emit::div_k`] and [`Emit::rem_k`] compute them for values below `bound`.
    fn div_rem(d: u64, bound: u64, values: &[u64]) -> Vec<(u64, u64)> {
        let mut compiler = Compiler::new("none").unwrap();
        let id = compiler
            .kernel("div_rem", |e| {
                let (a, q, r) = (e.buf(0), e.buf(1), e.buf(2));
                let (start, end) = (e.start, e.end);
                e.for_range(start, end, |e, i| {
                    let offset = e.ins().ishl_imm_u(i, 3);
                    let [a, q, r] = [a, q, r].map(|b| e.add(b, offset));
                    let x = e.ins().load(types::I64, data(), a, 0);
                    let quotient = e.div_k(x, d, bound);
                    let remainder = e.rem_k(x, d, bound);
                    e.ins().store(data(), quotient, q, 0);
                    e.ins().store(data(), remainder, r, 0);
                });
            })
            .unwrap();
        let kernel = compiler.finish(&[id]).unwrap()[0];
        let (q, r) = (vec![0u64; values.len()], vec![0u64; values.len()]);
        let buffers = [values.as_ptr(), q.as_ptr(), r.as_ptr()].map(|p| p as *mut f32);
        // SAFETY: the three buffers hold values.len() 8-byte elements, the items' range.
        unsafe { kernel(buffers.as_ptr(), 0, values.len() as i64, 0) };
        q.into_iter().zip(r).collect()
    }

    #[test]
    fn division_by_constants_is_exact_below_the_bound() {
        let cases: [(u64, u64); 7] =
            [(3, 288), (7, 1 << 16), (9, 100_003), (13, 1 << 20), (1600, 1 << 22), (8, 1000), (3, 1 << 32)];
        for (d, bound) in cases {
            // Every value up to 2^17, then the last 2^16 below the bound.
            let mut values: Vec<u64> = (0..bound.min(1 << 17)).collect();
            values.extend(bound.saturating_sub(1 << 16)..bound);
            for (a, (q, r)) in values.iter().zip(div_rem(d, bound, &values)) {
                assert_eq!((q, r), (a / d, a % d), "{a} / {d} (below {bound})");
            }
        }
    }
}
