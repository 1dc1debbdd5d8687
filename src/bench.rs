//! `cnnc bench`: the model compiled twice, with and without the fusion pass, timed side by side.
//!
//! Both programs start from the same weights and see the same random batch. After warm-up
//! steps, each round runs one training step of each (A/B interleaved, the order alternating
//! every round, so that a noisy neighbour or a frequency change hits both alike), then one
//! inference batch of each. Every step is profiled per program step, and steps are grouped
//! as the fused program groups them: a block (`conv2d+batch_normalization+activation`) is one
//! row in both columns, the unfused row being the sum of its separate kernels. Reported
//! times are medians over the rounds.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;

use crate::Checked;
use crate::autodiff::{self, Program, Step};
use crate::backend::Backend as _;
use crate::backend::jit::Jit;
use crate::backend::jit::ceiling::{self, Ceiling};
use crate::backend::reference::{self, Profile};
use crate::ir::NodeId;
use crate::ir::fuse::Block;
use crate::ir::train::Optimizer;
use crate::memory::Pass;
use crate::rng::Rng;
use crate::train::state::State;

/// How to run the benchmark.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub batch_size: usize,
    pub inference_batch_size: usize,
    pub warmup: usize,
    pub rounds: usize,
}

/// One row of the table: a group of nodes in one phase.
#[derive(Debug, Clone)]
pub struct Row {
    /// The group's layers joined by `+`, as the fused IR names them.
    pub name: String,
    /// `forward`, `backward`, `loss`, `update` or `inference`.
    pub phase: &'static str,
    pub fused_ms: f64,
    pub unfused_ms: f64,
    /// Floating-point operations of the group in this phase, for the whole batch (none for
    /// the loss and the update, whose cost is not counted).
    pub flops: Option<f64>,
}

/// Medians of the whole step and of every row.
#[derive(Debug, Clone)]
pub struct Report {
    pub model: String,
    pub batch_size: usize,
    pub inference_batch_size: usize,
    pub threads: usize,
    pub rounds: usize,
    /// Median seconds of a training step, fused and unfused.
    pub train: [f64; 2],
    /// Median seconds of an inference batch, fused and unfused.
    pub inference: [f64; 2],
    /// Milliseconds to compile every kernel, fused and unfused.
    pub compile_ms: [f64; 2],
    /// The machine's multiply-add ceilings, measured after the warm-up.
    pub ceiling: Ceiling,
    pub rows: Vec<Row>,
}

/// The groups of the fused program in training (`training`) or at inference: (name, nodes),
/// in order. A layer that lowered to several groups (`dense(10, activation=softmax)`) names the
/// later ones by their op too. At inference a block that `in_next_step` says runs inside the
/// next block's step ([`crate::memory::Plan::paired`]) is one group with it: the step's time
/// is both blocks'. In training a block whose steps run its pool's (`takes_pool`,
/// [`crate::memory::Plan::takes_pool`]) is one group with the pool.
fn groups(
    program: &Program,
    training: bool,
    in_next_step: impl Fn(&Block) -> bool,
    takes_pool: impl Fn(&Block) -> bool,
) -> Vec<(String, Vec<NodeId>)> {
    let mut groups: Vec<(String, Vec<NodeId>)> = Vec::new();
    let mut carried: Vec<NodeId> = Vec::new();
    for &id in if training { &program.forward } else { &program.inference } {
        if training && program.blocks.iter().any(|b| b.pool == Some(id) && takes_pool(b)) {
            continue; // in its block's group
        }
        let mut nodes: Vec<NodeId> = std::mem::take(&mut carried);
        match program.block_ending_at(id, training) {
            Some(b) if training && takes_pool(b) => nodes.extend(b.inference_nodes()),
            Some(b) if training => nodes.extend(b.nodes()),
            Some(b) if in_next_step(b) => {
                carried = b.inference_nodes().collect();
                continue;
            }
            Some(b) => nodes.extend(b.inference_nodes()),
            None => nodes.push(id),
        }
        let mut names: Vec<&str> = nodes.iter().map(|n| program.graph.layer_of(*n).name.as_str()).collect();
        names.dedup();
        let mut name = names.join("+");
        if groups.iter().any(|(n, _)| *n == name) {
            name = format!("{name} ({})", program.graph.node(id).op.name());
        }
        groups.push((name, nodes));
    }
    groups
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Runs the benchmark on the current rayon pool.
pub fn run(checked: &Checked, options: Options) -> anyhow::Result<Report> {
    if options.batch_size == 0 || options.inference_batch_size == 0 {
        bail!("batch sizes must be at least 1");
    }
    if options.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let train = checked.model.train.as_ref();
    let optimizer =
        train.map_or(Optimizer::Adam { lr: 1e-3, beta1: 0.9, beta2: 0.999, epsilon: 1e-7 }, |t| t.optimizer);
    let seed = train.map_or(42, |t| t.seed);
    let unfused = Arc::new(autodiff::build_with(checked, false)?);
    let fused = Arc::new(autodiff::build_with(checked, true)?);
    if unfused.loss.is_none() {
        bail!("the model has no loss to train with: add a train block with `loss = …`");
    }
    let mut backends = [Jit::new(fused.clone(), optimizer)?, Jit::new(unfused.clone(), optimizer)?];
    let compile_ms = [backends[0].kernels.compile_ms, backends[1].kernels.compile_ms];
    let mut states = [State::init(&fused, &optimizer, seed), State::init(&unfused, &optimizer, seed)];

    let sample = unfused.shapes.shape(unfused.graph.input()).numel();
    let classes = unfused.output_width().max(2);
    let mut rng = Rng::new(seed, &[0xBE_4C4]);
    let largest = options.batch_size.max(options.inference_batch_size);
    let images: Vec<f32> = (0..largest * sample).map(|_| rng.next_f32()).collect();
    let labels: Vec<u8> = (0..options.batch_size).map(|_| rng.below(classes.min(256)) as u8).collect();
    let train_images = &images[..options.batch_size * sample];
    let infer_images = &images[..options.inference_batch_size * sample];

    for step in 0..options.warmup as u64 {
        for (backend, state) in backends.iter_mut().zip(states.iter_mut()) {
            backend.train_step(state, train_images, &labels, step);
            backend.predict(state, infer_images);
        }
    }
    let ceiling = ceiling::measure()?;
    // Rows: (group, phase) for the training groups' forward and backward passes, then the
    // inference groups, then the loss and the update.
    let plan = reference::plan(&backends[0].kernels, &fused, Pass::Infer, options.inference_batch_size, true);
    let train_plan = reference::plan(&backends[0].kernels, &fused, Pass::Train, options.batch_size, true);
    let training = groups(&fused, true, |_| false, |b| train_plan.takes_pool(&fused, b));
    let inference = groups(&fused, false, |b| plan.runs_in_next_step(&fused, b), |_| false);
    let mut keys: Vec<(&str, &'static str, &[NodeId])> = Vec::new();
    for phase in ["forward", "backward"] {
        keys.extend(training.iter().map(|(name, nodes)| (name.as_str(), phase, nodes.as_slice())));
    }
    keys.extend(inference.iter().map(|(name, nodes)| (name.as_str(), "inference", nodes.as_slice())));
    keys.push(("loss", "loss", &[]));
    keys.push(("update", "update", &[]));
    let row_of = |id: Option<NodeId>, phase: &str| {
        keys.iter()
            .position(|(_, p, nodes)| *p == phase && id.is_none_or(|id| nodes.contains(&id)))
            .expect("every node has a group")
    };
    let mut step_times = [Vec::new(), Vec::new()];
    let mut infer_times = [Vec::new(), Vec::new()];
    let mut row_times = vec![[Vec::new(), Vec::new()]; keys.len()];
    for round in 0..options.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let (backend, state) = (&mut backends[which], &mut states[which]);
            backend.profile = Some(Profile::default());
            let started = Instant::now();
            backend.train_step(state, train_images, &labels, (options.warmup + round) as u64);
            step_times[which].push(started.elapsed().as_secs_f64());
            let train_profile = backend.profile.replace(Profile::default()).expect("profiling");
            let started = Instant::now();
            std::hint::black_box(backend.predict(state, infer_images));
            infer_times[which].push(started.elapsed().as_secs_f64());
            let infer_profile = backend.profile.take().expect("profiling");
            let mut totals = vec![0.0; keys.len()];
            for (step, seconds) in &train_profile.entries {
                let row = match *step {
                    Step::Forward(id) => row_of(Some(id), "forward"),
                    Step::Backward(id) => row_of(Some(id), "backward"),
                    Step::Loss => row_of(None, "loss"),
                    Step::Update => row_of(None, "update"),
                };
                totals[row] += seconds;
            }
            for (step, seconds) in &infer_profile.entries {
                if let Step::Forward(id) = *step {
                    totals[row_of(Some(id), "inference")] += seconds;
                }
            }
            for (row, total) in row_times.iter_mut().zip(totals) {
                row[which].push(total);
            }
        }
    }

    let mut rows = Vec::new();
    for ((name, phase, nodes), times) in keys.iter().zip(row_times.iter_mut()) {
        let [fused_ms, unfused_ms] = [median(&mut times[0]) * 1e3, median(&mut times[1]) * 1e3];
        // A phase a group does not have (no backward before the first trainable layer).
        if fused_ms == 0.0 && unfused_ms == 0.0 {
            continue;
        }
        let per_sample: f64 = nodes
            .iter()
            .map(|n| {
                let f = checked.costs.flops(*n);
                if *phase == "backward" {
                    let input = unfused.graph.node(*n).inputs[0];
                    let dx = if unfused.needs_grad[input.index()] { f.backward_input } else { 0 };
                    (dx + f.backward_weights) as f64
                } else {
                    f.forward as f64
                }
            })
            .sum();
        let batch = if *phase == "inference" { options.inference_batch_size } else { options.batch_size };
        let flops = (!nodes.is_empty()).then_some(per_sample * batch as f64);
        rows.push(Row { name: name.to_string(), phase, fused_ms, unfused_ms, flops });
    }
    let order = ["forward", "backward", "loss", "update", "inference"];
    rows.sort_by_key(|r| order.iter().position(|p| *p == r.phase));
    Ok(Report {
        model: checked.model.graph.name.clone(),
        batch_size: options.batch_size,
        inference_batch_size: options.inference_batch_size,
        threads: rayon::current_num_threads(),
        rounds: options.rounds,
        train: [median(&mut step_times[0]), median(&mut step_times[1])],
        inference: [median(&mut infer_times[0]), median(&mut infer_times[1])],
        compile_ms,
        ceiling,
        rows,
    })
}

fn gflops(flops: Option<f64>, ms: f64) -> Option<f64> {
    flops.filter(|_| ms > 0.0).map(|f| f / (ms * 1e-3) / 1e9)
}

impl Report {
    fn images_per_second(&self, seconds: f64, batch: usize) -> f64 {
        if seconds > 0.0 { batch as f64 / seconds } else { 0.0 }
    }

    /// The table: one line per group and phase, then the whole step and inference.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "{}: batch {} (inference {}), {} thread{}, median of {} rounds\n",
            self.model,
            self.batch_size,
            self.inference_batch_size,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.rounds
        );
        let _ = writeln!(
            out,
            "compiled in {:.1} ms fused, {:.1} ms unfused",
            self.compile_ms[0], self.compile_ms[1]
        );
        let _ = writeln!(out, "{}\n", self.ceiling_line());
        // a paired group's long name overflows its own line rather than widening every line
        let width =
            self.rows.iter().map(|r| r.name.len() + r.phase.len() + 1).max().unwrap_or(10).clamp(18, 56);
        let _ = writeln!(
            out,
            "{:<width$}  {:>10}  {:>10}  {:>8}  {:>7}  {:>8}  {:>7}",
            "group/phase", "fused ms", "unfused ms", "GFLOP/s", "peak", "unfused", "speedup"
        );
        let gf = |v: Option<f64>| v.map_or("-".to_string(), |g| format!("{g:.1}"));
        for row in &self.rows {
            let _ = writeln!(
                out,
                "{:<width$}  {:>10.3}  {:>10.3}  {:>8}  {:>7}  {:>8}  {:>6.2}x",
                if row.name == row.phase { row.name.clone() } else { format!("{} {}", row.name, row.phase) },
                row.fused_ms,
                row.unfused_ms,
                gf(gflops(row.flops, row.fused_ms)),
                gflops(row.flops, row.fused_ms)
                    .map_or("-".to_string(), |g| format!("{:.0}%", 100.0 * g / self.peak())),
                gf(gflops(row.flops, row.unfused_ms)),
                speedup(row.unfused_ms, row.fused_ms)
            );
        }
        let _ = writeln!(
            out,
            "(GFLOP/s counts a direct convolution's FLOPs: on Winograd's kernels, 3x3 stride-1 layers\n\
             do fewer, and theirs is the rate a direct kernel would need to match them; peak: the fused\n\
             rate as a share of the machine's widest ceiling above, past 100% only where Winograd's are)"
        );
        out.push('\n');
        for (what, [fused, unfused], batch) in [
            ("training step", self.train, self.batch_size),
            ("inference batch", self.inference, self.inference_batch_size),
        ] {
            let _ = writeln!(
                out,
                "{what:<16} fused {:>8.2} ms ({:>7.0} img/s)   unfused {:>8.2} ms ({:>7.0} img/s)   speedup {:.2}x",
                fused * 1e3,
                self.images_per_second(fused, batch),
                unfused * 1e3,
                self.images_per_second(unfused, batch),
                speedup(unfused, fused)
            );
        }
        out
    }

    /// What the ceilings are: the f32x4 one, and the widest vectors' where the CPU has wider.
    fn ceiling_line(&self) -> String {
        let c = &self.ceiling;
        let threads = if c.threads == 1 { "thread" } else { "threads" };
        let mut line = format!(
            "multiply-add ceiling on {} {threads}: {:.1} GFLOP/s in f32x4 (the most a Cranelift kernel reaches)",
            c.threads, c.gflops
        );
        if let (Some(bits), Some(wide)) = (c.host_bits, c.wide_gflops) {
            // cnnc's own wide kernels are AVX-512's only
            let who = if bits == 512 {
                "where cnnc's AVX-512 kernels run, and the peers' code"
            } else {
                "the peers' code"
            };
            line += &format!(", {wide:.1} in this CPU's {bits}-bit vectors ({:.1}x: {who})", wide / c.gflops);
        }
        line
    }

    /// The machine's peak: its widest vectors' ceiling.
    fn peak(&self) -> f64 {
        self.ceiling.wide_gflops.unwrap_or(self.ceiling.gflops)
    }

    /// The report as JSON (the fields `cnnc bench --json` documents).
    pub fn json(&self) -> serde_json::Value {
        let pair = |[fused, unfused]: [f64; 2], batch: usize| {
            serde_json::json!({
                "fused_img_s": self.images_per_second(fused, batch),
                "unfused_img_s": self.images_per_second(unfused, batch),
                "speedup": speedup(unfused, fused),
                "fused_ms": fused * 1e3,
                "unfused_ms": unfused * 1e3,
            })
        };
        let mut kernels = Vec::new();
        for row in &self.rows {
            for (fused, ms) in [(true, row.fused_ms), (false, row.unfused_ms)] {
                kernels.push(serde_json::json!({
                    "name": format!("{}/{}", row.name, row.phase),
                    "fused": fused,
                    "median_ms": ms,
                    "gflops": gflops(row.flops, ms),
                }));
            }
        }
        serde_json::json!({
            "model": self.model,
            "batch_size": self.batch_size,
            "inference_batch_size": self.inference_batch_size,
            "threads": self.threads,
            "rounds": self.rounds,
            "compile_ms": {"fused": self.compile_ms[0], "unfused": self.compile_ms[1]},
            "ceiling": {
                "gflops": self.ceiling.gflops,
                "threads": self.ceiling.threads,
                "host_vector_bits": self.ceiling.host_bits,
                "wide_gflops": self.ceiling.wide_gflops,
            },
            "train": pair(self.train, self.batch_size),
            "inference": pair(self.inference, self.inference_batch_size),
            "kernels": kernels,
        })
    }
}

fn speedup(unfused: f64, fused: f64) -> f64 {
    if fused > 0.0 { unfused / fused } else { 0.0 }
}

/// The batch size of the model's train block, or 128.
pub fn default_batch_size(checked: &Checked) -> usize {
    checked.model.train.as_ref().map_or(128, |t| t.batch_size)
}
