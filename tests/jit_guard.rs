//! Memory safety of the compiled kernels (convolution, dense, pooling, batchnorm and fused blocks, activations, dropout,
//! softmax, the fused losses, the optimizer step): every buffer is placed flush against an inaccessible
//! guard page, after its end and (in a second run) before its start, so a kernel that reads or
//! writes one element outside its buffers crashes the test. Shapes are odd on purpose (channel
//! tails, pixel-block tails, strides, padding). The results are compared with the ordinary,
//! heap-allocated path, so the test also shows the kernels really ran.

use cnnc::autodiff;
use cnnc::backend::jit::activation::Sigmoidal;
use cnnc::backend::jit::avx512;
use cnnc::backend::jit::conv::pack_weights;
use cnnc::backend::jit::{JitKernels, Listing};
use cnnc::backend::reference::ops::Geometry;
use cnnc::backend::reference::{KernelsExt as _, Plain};
use cnnc::diagnostic::SourceFile;
use cnnc::ir::Activation;
use cnnc::rng::Rng;
use ndarray::{Array1, Array2, Array4, ArrayD, s};

/// An f32 buffer between two PROT_NONE pages, touching one of them.
struct Guarded {
    region: *mut libc::c_void,
    region_len: usize,
    ptr: *mut f32,
    len: usize,
}

impl Guarded {
    fn new(data: &[f32], flush_with_end: bool) -> Guarded {
        let page = 4096;
        let bytes = (data.len() * 4).max(4);
        let data_pages = bytes.div_ceil(page);
        let region_len = (data_pages + 2) * page;
        // SAFETY: a fresh anonymous mapping; the guard pages are made inaccessible, and the data
        // pages are only touched through `ptr..ptr+len`, which lies inside them.
        unsafe {
            let region = libc::mmap(
                std::ptr::null_mut(),
                region_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(region, libc::MAP_FAILED);
            let base = region as *mut u8;
            assert_eq!(libc::mprotect(region, page, libc::PROT_NONE), 0);
            assert_eq!(libc::mprotect(base.add((data_pages + 1) * page) as *mut _, page, libc::PROT_NONE), 0);
            let start = if flush_with_end {
                base.add((data_pages + 1) * page - data.len() * 4)
            } else {
                base.add(page)
            };
            let ptr = start as *mut f32;
            std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len());
            Guarded { region, region_len, ptr, len: data.len() }
        }
    }

    fn to_vec(&self) -> Vec<f32> {
        // SAFETY: ptr..ptr+len was written in `new` and lies inside the mapping.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len).to_vec() }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.region, self.region_len) };
    }
}

fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
    (0..len).map(|_| rng.next_f32() - 0.5).collect()
}

fn close(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{what}[{i}]: {x} vs {y}");
    }
}

fn zeros(len: usize, flush_with_end: bool) -> Guarded {
    Guarded::new(&vec![0.0; len], flush_with_end)
}

fn check(model: &str, batch: usize) -> Vec<&'static str> {
    check_with(model, "loss = categorical_crossentropy", batch)
}

/// Checks every compiled kernel of the model; returns the kinds it checked.
fn check_with(model: &str, train: &str, batch: usize) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    let text = format!("model m {{ {model} }}\ntrain {{ {train} }}");
    let checked = cnnc::check(&SourceFile::new("guard.cnn", text.as_str())).unwrap();
    let program = autodiff::build(&checked).unwrap();
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    let mut rng = Rng::new(5, &[batch as u64]);
    let mut checked_nodes = 0;
    for (id, _) in program.graph.nodes() {
        let Some(k) = jit.conv(id) else { continue };
        let s = k.shape;
        let x = random(batch * s.hp * s.wp * s.c, &mut rng);
        let w = random(s.kh * s.kw * s.c * s.f, &mut rng);
        let b = random(s.f, &mut rng);
        let dy = random(batch * s.oh * s.ow * s.f, &mut rng);
        let wt = Array4::from_shape_vec((s.kh, s.kw, s.c, s.f), w.clone())
            .unwrap()
            .permuted_axes([0, 1, 3, 2])
            .as_standard_layout()
            .iter()
            .copied()
            .collect::<Vec<f32>>();
        // The same computations through the ordinary path, on the padded input as given.
        let g =
            Geometry { kernel: [s.kh, s.kw], stride: [s.sh, s.sw], pad_before: [0, 0], out: [s.oh, s.ow] };
        let x4 = Array4::from_shape_vec((batch, s.hp, s.wp, s.c), x.clone()).unwrap();
        let w4 = Array4::from_shape_vec((s.kh, s.kw, s.c, s.f), w.clone()).unwrap();
        let dy4 = Array4::from_shape_vec((batch, s.oh, s.ow, s.f), dy.clone()).unwrap();
        let bias = Array1::from(b.clone());
        let reference = cnnc::backend::reference::Plain;
        let y_ref = reference.conv2d_forward(id, x4.view(), w4.view(), s.bias.then(|| bias.view()), &g);
        let dx_ref = reference.conv2d_backward_input(id, dy4.view(), w4.view(), [s.hp, s.wp], &g);
        let (dw_ref, db_ref) =
            reference.conv2d_backward_weights(id, x4.view(), dy4.view(), [s.kh, s.kw, s.c, s.f], &g);

        for flush_with_end in [true, false] {
            let gx = Guarded::new(&x, flush_with_end);
            // The kernels read their weights packed by chunks of output channels.
            let gw = Guarded::new(&pack_weights(&w, s.kh * s.kw * s.c, s.f), flush_with_end);
            let gb = Guarded::new(&b, flush_with_end);
            let gy = Guarded::new(&vec![0.0; batch * s.oh * s.ow * s.f], flush_with_end);
            let gdy = Guarded::new(&dy, flush_with_end);
            let gwt = Guarded::new(&pack_weights(&wt, s.kh * s.kw * s.f, s.c), flush_with_end);
            let gdx = Guarded::new(&vec![0.0; x.len()], flush_with_end);
            let gdw = Guarded::new(&vec![0.0; w.len()], flush_with_end);
            let gdb = Guarded::new(&vec![0.0; s.f], flush_with_end);
            let (bias_ptr, db_ptr) =
                if s.bias { (gb.ptr, gdb.ptr) } else { (std::ptr::null_mut(), std::ptr::null_mut()) };
            // SAFETY: each buffer has exactly the shape the kernel was compiled for; were a
            // kernel to step outside one, the guard page would stop the test with a fault.
            unsafe {
                (k.forward)([gx.ptr, gw.ptr, bias_ptr, gy.ptr].as_ptr(), 0, batch as i64, batch as i64);
                (k.backward_input)([gdy.ptr, gwt.ptr, gdx.ptr].as_ptr(), 0, batch as i64, batch as i64);
                // with a bias, it sums db too
                (k.backward_weights)(
                    [gx.ptr, gdy.ptr, gdw.ptr, db_ptr].as_ptr(),
                    0,
                    s.weight_tasks() as i64,
                    batch as i64,
                );
            }
            let name = format!("{model} / {}", program.graph.layer_of(id).name);
            close(&format!("{name} forward"), y_ref.as_slice().unwrap(), &gy.to_vec());
            close(&format!("{name} input gradient"), dx_ref.as_slice().unwrap(), &gdx.to_vec());
            close(&format!("{name} weight gradient"), dw_ref.as_slice().unwrap(), &gdw.to_vec());
            if s.bias {
                close(&format!("{name} bias gradient"), db_ref.as_slice().unwrap(), &gdb.to_vec());
            }
            // the input gradient in 512-bit vectors, which replaces that kernel on such CPUs
            // (its last vector of channels loads and stores under a mask)
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") && !s.is_point() {
                let mut transposed = vec![0.0; avx512::transposed_len(&s)];
                avx512::transpose_into(&w, &s, &mut transposed);
                let gwide = Guarded::new(&transposed, flush_with_end);
                let gdx = Guarded::new(&vec![0.0; x.len()], flush_with_end);
                // SAFETY: AVX-512F is there, and the buffers have the shapes of `s`.
                unsafe { avx512::backward_input(&s, [gdy.ptr, gwide.ptr], gdx.ptr, 0..batch) };
                close(&format!("{name} input gradient (AVX-512)"), dx_ref.as_slice().unwrap(), &gdx.to_vec());
                kinds.push("conv input gradient (AVX-512)");
            }
        }
        checked_nodes += 1;
        kinds.push("conv");
    }
    for (id, _) in program.graph.nodes() {
        let Some(k) = jit.pool(id) else { continue };
        let s = k.shape;
        let x = random(batch * s.hp * s.wp * s.c, &mut rng);
        let dy = random(batch * s.oh * s.ow * s.c, &mut rng);
        let g =
            Geometry { kernel: [s.kh, s.kw], stride: [s.sh, s.sw], pad_before: [0, 0], out: [s.oh, s.ow] };
        let x4 = Array4::from_shape_vec((batch, s.hp, s.wp, s.c), x.clone()).unwrap();
        let dy4 = Array4::from_shape_vec((batch, s.oh, s.ow, s.c), dy.clone()).unwrap();
        let reference = cnnc::backend::reference::Plain;
        let y_ref = reference.maxpool_forward(id, x4.view(), &g);
        let dx_ref = reference.maxpool_backward(id, x4.view(), dy4.view(), &g);
        for flush_with_end in [true, false] {
            let gx = Guarded::new(&x, flush_with_end);
            let gy = Guarded::new(&vec![0.0; dy.len()], flush_with_end);
            let gdy = Guarded::new(&dy, flush_with_end);
            let gdx = Guarded::new(&vec![0.0; x.len()], flush_with_end);
            // SAFETY: as for the convolutions above.
            unsafe {
                (k.forward)([gx.ptr, gy.ptr].as_ptr(), 0, batch as i64, batch as i64);
                (k.backward)([gx.ptr, gdy.ptr, gdx.ptr].as_ptr(), 0, batch as i64, batch as i64);
            }
            let name = format!("{model} / {}", program.graph.layer_of(id).name);
            close(&format!("{name} forward"), y_ref.as_slice().unwrap(), &gy.to_vec());
            close(&format!("{name} input gradient"), dx_ref.as_slice().unwrap(), &gdx.to_vec());
        }
        checked_nodes += 1;
        kinds.push("maxpool");
    }
    for (id, node) in program.graph.nodes() {
        let Some(k) = jit.rectifier(id) else { continue };
        let cnnc::ir::Op::Activation(act) = node.op else { unreachable!("rectifiers are activations") };
        let x = random(batch * k.len, &mut rng);
        let dy = random(batch * k.len, &mut rng);
        let xd = ndarray::ArrayD::from_shape_vec(vec![batch, k.len], x.clone()).unwrap();
        let dyd = ndarray::ArrayD::from_shape_vec(vec![batch, k.len], dy.clone()).unwrap();
        let reference = cnnc::backend::reference::Plain;
        let y_ref = reference.activation_forward(id, act, xd.view());
        let dx_ref = reference.activation_backward(id, act, xd.view(), y_ref.view(), dyd.view());
        for flush_with_end in [true, false] {
            let (gx, gdy) = (Guarded::new(&x, flush_with_end), Guarded::new(&dy, flush_with_end));
            let (gy, gdx) = (
                Guarded::new(&vec![0.0; x.len()], flush_with_end),
                Guarded::new(&vec![0.0; x.len()], flush_with_end),
            );
            // SAFETY: as for the convolutions above.
            unsafe {
                (k.forward)([gx.ptr, gy.ptr].as_ptr(), 0, batch as i64, batch as i64);
                (k.backward)([gx.ptr, gdy.ptr, gdx.ptr].as_ptr(), 0, batch as i64, batch as i64);
            }
            close("rectifier forward", y_ref.as_slice().unwrap(), &gy.to_vec());
            close("rectifier gradient", dx_ref.as_slice().unwrap(), &gdx.to_vec());
        }
        checked_nodes += 1;
        kinds.push("rectifier");
    }
    for (id, _) in program.graph.nodes() {
        let Some(k) = jit.sigmoidal(id) else { continue };
        let act = match k.act {
            Sigmoidal::Sigmoid => Activation::Sigmoid,
            Sigmoidal::Tanh => Activation::Tanh,
        };
        let x: Vec<f32> = random(batch * k.len, &mut rng).iter().map(|v| v * 40.0).collect();
        let dy = random(batch * k.len, &mut rng);
        let xd = ArrayD::from_shape_vec(vec![batch, k.len], x.clone()).unwrap();
        let dyd = ArrayD::from_shape_vec(vec![batch, k.len], dy.clone()).unwrap();
        let y_ref = Plain.activation_forward(id, act, xd.view());
        let dx_ref = Plain.activation_backward(id, act, xd.view(), y_ref.view(), dyd.view());
        let y = y_ref.as_slice().unwrap();
        for flush_with_end in [true, false] {
            let (gx, gy_in, gdy) = (
                Guarded::new(&x, flush_with_end),
                Guarded::new(y, flush_with_end),
                Guarded::new(&dy, flush_with_end),
            );
            let (gy, gdx) = (zeros(x.len(), flush_with_end), zeros(x.len(), flush_with_end));
            // SAFETY: as for the convolutions above.
            unsafe {
                (k.forward)([gx.ptr, gy.ptr].as_ptr(), 0, batch as i64, batch as i64);
                (k.backward)([gy_in.ptr, gdy.ptr, gdx.ptr].as_ptr(), 0, batch as i64, batch as i64);
            }
            close(&format!("{act:?} forward"), y, &gy.to_vec());
            close(&format!("{act:?} gradient"), dx_ref.as_slice().unwrap(), &gdx.to_vec());
        }
        checked_nodes += 1;
        kinds.push("sigmoidal");
    }
    for (id, _) in program.graph.nodes() {
        let Some(k) = jit.avgpool(id) else { continue };
        let s = k.shape;
        let [top, bottom, left, right] = k.pads;
        let (h, w) = (s.hp - top - bottom, s.wp - left - right);
        let x = Array4::from_shape_vec((batch, h, w, s.c), random(batch * h * w * s.c, &mut rng)).unwrap();
        let dy = random(batch * s.oh * s.ow * s.c, &mut rng);
        let dy4 = Array4::from_shape_vec((batch, s.oh, s.ow, s.c), dy.clone()).unwrap();
        let g = Geometry {
            kernel: [s.kh, s.kw],
            stride: [s.sh, s.sw],
            pad_before: [top, left],
            out: [s.oh, s.ow],
        };
        let y_ref = Plain.avgpool_forward(id, x.view(), &g);
        let dx_ref = Plain.avgpool_backward(id, [batch, h, w, s.c], dy4.view(), &g);
        let mut xp = Array4::<f32>::zeros((batch, s.hp, s.wp, s.c));
        xp.slice_mut(s![.., top..top + h, left..left + w, ..]).assign(&x);
        let xp = xp.as_slice().unwrap().to_vec();
        for flush_with_end in [true, false] {
            let (gx, gdy) = (Guarded::new(&xp, flush_with_end), Guarded::new(&dy, flush_with_end));
            let (gy, gdx) = (zeros(dy.len(), flush_with_end), zeros(xp.len(), flush_with_end));
            // SAFETY: as for the convolutions above.
            unsafe {
                (k.forward)([gx.ptr, gy.ptr].as_ptr(), 0, batch as i64, batch as i64);
                (k.backward)([gdy.ptr, gdx.ptr].as_ptr(), 0, batch as i64, batch as i64);
            }
            let dxp = Array4::from_shape_vec((batch, s.hp, s.wp, s.c), gdx.to_vec()).unwrap();
            let dx: Vec<f32> = dxp.slice(s![.., top..top + h, left..left + w, ..]).iter().copied().collect();
            let name = format!("{model} / {}", program.graph.layer_of(id).name);
            close(&format!("{name} forward"), y_ref.as_slice().unwrap(), &gy.to_vec());
            close(&format!("{name} input gradient"), dx_ref.as_slice().unwrap(), &dx);
        }
        checked_nodes += 1;
        kinds.push("avgpool");
    }
    for (id, _) in program.graph.nodes() {
        let Some(k) = jit.dropout(id) else { continue };
        let x = random(batch * k.len, &mut rng);
        let mask = random(batch * k.len, &mut rng);
        let expected: Vec<f32> = x.iter().zip(&mask).map(|(a, b)| a * b).collect();
        for flush_with_end in [true, false] {
            let (gx, gmask) = (Guarded::new(&x, flush_with_end), Guarded::new(&mask, flush_with_end));
            let gy = zeros(x.len(), flush_with_end);
            // SAFETY: as for the convolutions above.
            unsafe { (k.apply)([gx.ptr, gmask.ptr, gy.ptr].as_ptr(), 0, batch as i64, batch as i64) };
            close("dropout", &expected, &gy.to_vec());
        }
        checked_nodes += 1;
        kinds.push("dropout");
    }
    for (id, _) in program.graph.nodes() {
        let Some(k) = jit.softmax(id) else { continue };
        let x: Vec<f32> = random(batch * k.rows * k.c, &mut rng).iter().map(|v| v * 20.0).collect();
        let x2 = Array2::from_shape_vec((batch * k.rows, k.c), x.clone()).unwrap();
        let y_ref = Plain.softmax_forward(id, x2.view());
        for flush_with_end in [true, false] {
            let (gx, gy) = (Guarded::new(&x, flush_with_end), zeros(x.len(), flush_with_end));
            // SAFETY: as for the convolutions above.
            unsafe { (k.forward)([gx.ptr, gy.ptr].as_ptr(), 0, batch as i64, batch as i64) };
            close("softmax", y_ref.as_slice().unwrap(), &gy.to_vec());
        }
        checked_nodes += 1;
        kinds.push("softmax");
    }
    if let Some(k) = jit.fused_loss() {
        let z: Vec<f32> = random(batch * k.k, &mut rng).iter().map(|v| v * 20.0).collect();
        let classes = if k.k == 1 { 2 } else { k.k };
        let labels: Vec<u8> = (0..batch).map(|_| rng.below(classes) as u8).collect();
        let z2 = Array2::from_shape_vec((batch, k.k), z.clone()).unwrap();
        let (loss_ref, correct_ref, dz_ref) = Plain.loss(program.logits, k.loss, z2.view(), &labels);
        let label_values: Vec<f32> = labels.iter().map(|&l| f32::from(l)).collect();
        for flush_with_end in [true, false] {
            let (gz, glabels) =
                (Guarded::new(&z, flush_with_end), Guarded::new(&label_values, flush_with_end));
            let (gdz, gloss, gcorrect) =
                (zeros(z.len(), flush_with_end), zeros(batch, flush_with_end), zeros(batch, flush_with_end));
            let buffers = [gz.ptr, glabels.ptr, gdz.ptr, gloss.ptr, gcorrect.ptr];
            // SAFETY: as for the convolutions above.
            unsafe { (k.kernel)(buffers.as_ptr(), 0, batch as i64, batch as i64) };
            let loss: f64 = gloss.to_vec().iter().map(|&l| f64::from(l)).sum();
            assert!(
                (loss - loss_ref).abs() <= 1e-5 * loss_ref.abs().max(1.0),
                "{model}: loss {loss_ref} vs {loss}"
            );
            assert_eq!(gcorrect.to_vec().iter().filter(|&&c| c == 1.0).count(), correct_ref, "{model}");
            close(&format!("{model} dz"), dz_ref.as_slice().unwrap(), &gdz.to_vec());
        }
        checked_nodes += 1;
        kinds.push("loss");
    }
    assert!(checked_nodes > 0);
    kinds
}

#[test]
fn conv_kernels_stay_inside_their_buffers() {
    check(
        "input 9x11x5 conv2d(7, kernel=3, stride=2, padding=same) conv2d(13, kernel=2x3) flatten dense(3, activation=softmax)",
        3,
    );
    check(
        "input 7x6x1 conv2d(19, kernel=4, padding=same, bias=false) flatten dense(3, activation=softmax)",
        1,
    );
    // input channels of 19 and 40: a masked vector after one and after two whole ones; rows of
    // 23 and 21 pixels: several blocks
    let kinds = check(
        "input 5x25x19 conv2d(40, kernel=3) conv2d(6, kernel=3) flatten dense(3, activation=softmax)",
        2,
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert_eq!(kinds.iter().filter(|k| k.contains("AVX-512")).count(), 4, "{kinds:?}");
    }
}

#[test]
fn pool_and_rectifier_kernels_stay_inside_their_buffers() {
    check(
        "input 9x10x7 maxpool(3, stride=2, padding=same) maxpool(2, stride=1) flatten dense(3, activation=softmax)",
        3,
    );
}

#[test]
fn dense_kernels_stay_inside_their_buffers() {
    check("input 37 dense(21) dense(9, bias=false) dense(3, activation=softmax)", 5);

    // Dense kernels loop over chunks of outputs, then blocks of 5 samples of the call's range:
    // ranges that start inside the batch and end in partial blocks, with batchnorm's sums
    let text = "model m { input 37 dense(21, bias=false) batchnorm dense(3, activation=softmax) }
                train { loss = categorical_crossentropy }";
    let program =
        autodiff::build(&cnnc::check(&SourceFile::new("guard.cnn", text)).unwrap()).unwrap().fused();
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    let node = cnnc::ir::NodeId::from_index(1);
    let k = jit.conv(node).expect("a dense layer has kernels");
    // the block's training forward gathers the sums in its epilogue
    let block = jit.block(cnnc::ir::NodeId::from_index(2)).expect("dense → batchnorm is a block");
    let mut rng = Rng::new(51, &[]);
    let (batch, inputs, units) = (13, 37, 21);
    let x = random(batch * inputs, &mut rng);
    let w = random(inputs * units, &mut rng);
    let dy = random(batch * units, &mut rng);
    let x4 = Array4::from_shape_vec((batch, 1, 1, inputs), x.clone()).unwrap();
    let w4 = Array4::from_shape_vec((1, 1, inputs, units), w.clone()).unwrap();
    let dy4 = Array4::from_shape_vec((batch, 1, 1, units), dy.clone()).unwrap();
    let g = Geometry { kernel: [1, 1], stride: [1, 1], pad_before: [0, 0], out: [1, 1] };
    let y_ref = Plain.conv2d_forward(node, x4.view(), w4.view(), None, &g);
    let dx_ref = Plain.conv2d_backward_input(node, dy4.view(), w4.view(), [1, 1], &g);
    let packed = pack_weights(&w, inputs, units);
    let wt: Vec<f32> = (0..units * inputs).map(|i| w[(i % inputs) * units + i / inputs]).collect();
    let packed_t = pack_weights(&wt, units, inputs);
    // remainders after blocks of 5: 3, 3, 4, 2, 1, none (an empty range)
    for (start, end) in [(0, 13), (3, 11), (0, 9), (1, 13), (5, 6), (2, 2)] {
        for flush in [true, false] {
            let (y0, dx0, sums0) =
                (vec![0.0; batch * units], vec![0.0; batch * inputs], vec![0.0; batch * 2 * units]);
            let out =
                run_guarded(block.forward, &[&x, &packed, &[], &y0, &sums0], [start, end, batch], flush);
            let back = run_guarded(k.backward_input, &[&dy, &packed_t, &dx0], [start, end, batch], flush);
            let rows = |v: &[f32], width: usize, inside: bool| -> Vec<f32> {
                v.chunks(width)
                    .enumerate()
                    .flat_map(|(i, row)| {
                        let keep = (start..end).contains(&i);
                        row.iter().map(move |x| if keep == inside { *x } else { 0.0 })
                    })
                    .collect()
            };
            let what = format!("dense over samples {start}..{end}");
            close(&format!("{what}: forward"), &rows(y_ref.as_slice().unwrap(), units, true), &out[3]);
            close(
                &format!("{what}: input gradient"),
                &rows(dx_ref.as_slice().unwrap(), inputs, true),
                &back[2],
            );
            assert!(rows(&out[3], units, false).iter().all(|v| *v == 0.0), "{what}: rows outside the range");
            assert!(
                rows(&back[2], inputs, false).iter().all(|v| *v == 0.0),
                "{what}: rows outside the range"
            );
            // the batchnorm block's sums: Σy and Σy² per sample, only for the range
            let y_rows = rows(y_ref.as_slice().unwrap(), units, true);
            let sums: Vec<f32> =
                y_rows.chunks(units).flat_map(|r| r.iter().copied().chain(r.iter().map(|v| v * v))).collect();
            close(&format!("{what}: batch sums"), &sums, &out[4]);
        }
    }
}

#[test]
fn activation_and_average_pooling_kernels_stay_inside_their_buffers() {
    // 91 and 5·7·13 elements a sample; windows cut by `same` and explicit padding; 13 channels
    let kinds = check("input 7x13x1 sigmoid tanh flatten dense(3, activation=softmax)", 5);
    assert_eq!(kinds.iter().filter(|k| **k == "sigmoidal").count(), 2);
    let kinds = check(
        "input 9x10x13 avgpool(3, stride=2, padding=same) avgpool(2, stride=1, padding=1) \
         flatten dense(3, activation=softmax)",
        3,
    );
    assert_eq!(kinds.iter().filter(|k| **k == "avgpool").count(), 2);
}

#[test]
fn dropout_softmax_and_loss_kernels_stay_inside_their_buffers() {
    let kinds = check("input 5x3x7 softmax flatten dropout(0.3) dense(19, activation=softmax)", 13);
    for kind in ["softmax", "dropout", "loss"] {
        assert!(kinds.contains(&kind), "{kind}: {kinds:?}");
    }
    for batch in [13, 1] {
        let binary = "input 5x3x7 flatten dense(1, activation=sigmoid)";
        let kinds = check_with(binary, "loss = binary_crossentropy", batch);
        assert!(kinds.contains(&"loss"), "{kinds:?}");
    }
}

/// The optimizer kernels on 37 elements (9 vectors and a single one) and on a single element,
/// over the whole range and over a range that starts inside the tensor (as a second shard).
#[test]
fn optimizer_kernels_stay_inside_their_buffers() {
    use cnnc::backend::jit::optim::Rule;
    use cnnc::ir::train::Optimizer;
    let text = "model m { input 3 dense(2, activation=softmax) }\ntrain { loss = categorical_crossentropy }";
    let program = autodiff::build(&cnnc::check(&SourceFile::new("guard.cnn", text)).unwrap()).unwrap();
    let optimizers = [
        Optimizer::Sgd { lr: 0.1, momentum: 0.0 },
        Optimizer::Sgd { lr: 0.1, momentum: 0.9 },
        Optimizer::Adam { lr: 0.01, beta1: 0.9, beta2: 0.999, epsilon: 1e-7 },
    ];
    let mut rng = Rng::new(11, &[]);
    for optimizer in optimizers {
        let jit = JitKernels::compile_with(&program, Listing::default(), Some(&optimizer)).unwrap();
        let k = jit.optimizer().expect("the optimizer step was compiled");
        let slots = cnnc::train::state::optimizer_slots(&optimizer);
        for (len, start) in [(37, 0), (37, 10), (1, 0)] {
            let w = random(len, &mut rng);
            let g = random(len, &mut rng);
            let slot_values: Vec<Vec<f32>> =
                (0..slots).map(|_| random(len, &mut rng).iter().map(|v| v.abs()).collect()).collect();
            let mut w_ref = ArrayD::from_shape_vec(vec![len], w.clone()).unwrap();
            let mut slots_ref: Vec<ArrayD<f32>> =
                slot_values.iter().map(|s| ArrayD::from_shape_vec(vec![len], s.clone()).unwrap()).collect();
            let g_ref = ArrayD::from_shape_vec(vec![len], g.clone()).unwrap();
            cnnc::train::optimizer::update(&optimizer, &mut w_ref, &g_ref, &mut slots_ref, 3);
            let scalars = Rule::scalars(&optimizer, 3);
            for flush_with_end in [true, false] {
                let gscalars = Guarded::new(&scalars, flush_with_end);
                let (gw, gg) = (Guarded::new(&w, flush_with_end), Guarded::new(&g, flush_with_end));
                let gslots: Vec<Guarded> =
                    slot_values.iter().map(|s| Guarded::new(s, flush_with_end)).collect();
                let mut buffers = vec![gscalars.ptr, gw.ptr, gg.ptr];
                buffers.extend(gslots.iter().map(|s| s.ptr));
                // SAFETY: every buffer holds `len` elements (the scalars, what the rule reads).
                unsafe {
                    if start > 0 {
                        (k.kernel)(buffers.as_ptr(), 0, start as i64, len as i64);
                    }
                    (k.kernel)(buffers.as_ptr(), start as i64, len as i64, len as i64);
                }
                let what = format!("{optimizer:?}, {len} elements from {start}");
                close(&what, w_ref.as_slice().unwrap(), &gw.to_vec());
                for (a, b) in slots_ref.iter().zip(&gslots) {
                    close(&format!("{what}, slot"), a.as_slice().unwrap(), &b.to_vec());
                }
            }
        }
    }
}

/// Calls `kernel` on guarded copies of `buffers` (an empty one is passed as null), items
/// start..end, batch `batch`; returns the buffers' contents afterwards.
fn run_guarded(
    kernel: cnnc::backend::jit::emit::KernelFn,
    buffers: &[&[f32]],
    [start, end, batch]: [usize; 3],
    flush_with_end: bool,
) -> Vec<Vec<f32>> {
    let guarded: Vec<Option<Guarded>> =
        buffers.iter().map(|b| (!b.is_empty()).then(|| Guarded::new(b, flush_with_end))).collect();
    let pointers: Vec<*mut f32> =
        guarded.iter().map(|g| g.as_ref().map_or(std::ptr::null_mut(), |g| g.ptr)).collect();
    // SAFETY: each buffer has the length the kernel was compiled for (the callers build them
    // from its shapes); a kernel stepping outside one faults on the guard page.
    unsafe { kernel(pointers.as_ptr(), start as i64, end as i64, batch as i64) };
    guarded.iter().map(|g| g.as_ref().map_or(Vec::new(), Guarded::to_vec)).collect()
}

/// Batchnorm's four kernels (alone, and fused with a leaky relu in a block), the conv
/// kernel that gathers the batch sums in its epilogue, and a pooled block's two inference
/// kernels, on guarded buffers; results against plain loops written out here.
#[test]
fn batchnorm_and_fused_block_kernels_stay_inside_their_buffers() {
    let text =
        "model m { input 7x5x13 batchnorm conv2d(7, kernel=2, bias=false) batchnorm leaky_relu(alpha=0.2) \
                conv2d(6, kernel=2) relu maxpool(2) flatten dense(3, activation=softmax) }
                train { loss = categorical_crossentropy }";
    let program =
        autodiff::build(&cnnc::check(&SourceFile::new("guard.cnn", text)).unwrap()).unwrap().fused();
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    let node = |i: usize| cnnc::ir::NodeId::from_index(i);
    let mut rng = Rng::new(21, &[]);
    let batch = 3;

    // (stats,) normalize, reduce, apply with their rectifier's α, over (batch, pixels, channels)
    let lone = jit.norm(node(1)).expect("the first batchnorm is on its own");
    let block = jit.block(node(4)).expect("conv → batchnorm → leaky relu is a block");
    let [_, normalize, reduce, apply] = block.norm.expect("the block normalizes");
    let cases = [
        (lone.shape, None, Some(lone.stats), [lone.affine, lone.grad_reduce, lone.grad_apply]),
        // a block gathers its statistics in the conv's epilogue (checked below)
        (block.shape, Some(0.2f32), None, [normalize, reduce, apply]),
    ];
    for (shape, alpha, stats, [affine, grad_reduce, grad_apply]) in cases {
        let (p, c) = (shape.pixels, shape.channels);
        let len = batch * p * c;
        let x = random(len, &mut rng);
        let dz = random(len, &mut rng);
        let scale = random(c, &mut rng);
        let shift = random(c, &mut rng);
        let coef = random(3 * c, &mut rng);
        let act = |v: f32| match alpha {
            Some(a) if v <= 0.0 => a * v,
            _ => v,
        };
        let z: Vec<f32> = (0..len).map(|i| act(x[i] * scale[i % c] + shift[i % c])).collect();
        let g = |i: usize| match alpha {
            Some(a) if z[i] <= 0.0 => a * dz[i],
            _ => dz[i],
        };
        let mut sums = vec![0.0f32; batch * 2 * c];
        let mut grad_sums = vec![0.0f32; batch * 2 * c];
        for (i, &v) in x.iter().enumerate() {
            let (n, k) = (i / (p * c), i % c);
            sums[n * 2 * c + k] += v;
            sums[n * 2 * c + c + k] += v * v;
            grad_sums[n * 2 * c + k] += g(i);
            grad_sums[n * 2 * c + c + k] += g(i) * v;
        }
        let dx: Vec<f32> =
            (0..len).map(|i| coef[i % c] * g(i) + coef[c + i % c] * x[i] + coef[2 * c + i % c]).collect();
        let z_in: &[f32] = if alpha.is_some() { &z } else { &[] };
        for flush in [true, false] {
            let zero = vec![0.0; batch * 2 * c];
            if let Some(stats) = stats {
                let out = run_guarded(stats, &[&x, &zero], [0, batch, batch], flush);
                close("stats", &sums, &out[1]);
            }
            let out = run_guarded(affine, &[&x, &scale, &shift, &vec![0.0; len]], [0, batch, batch], flush);
            close("normalize", &z, &out[3]);
            let out = run_guarded(grad_reduce, &[&dz, z_in, &x, &zero], [1, batch, batch], flush);
            close("backward sums (samples 1..)", &grad_sums[2 * c..], &out[3][2 * c..]);
            let out =
                run_guarded(grad_apply, &[&dz, z_in, &x, &coef, &vec![0.0; len]], [0, batch, batch], flush);
            close("input gradient", &dx, &out[4]);
        }
    }

    // The block's conv with the batch sums in its epilogue (7x5x13 → 6x4x7).
    let conv = jit.conv(node(2)).unwrap().shape;
    let x = random(batch * conv.hp * conv.wp * conv.c, &mut rng);
    let w = random(conv.kh * conv.kw * conv.c * conv.f, &mut rng);
    let g = Geometry { kernel: [2, 2], stride: [1, 1], pad_before: [0, 0], out: [conv.oh, conv.ow] };
    let x4 = Array4::from_shape_vec((batch, conv.hp, conv.wp, conv.c), x.clone()).unwrap();
    let w4 = Array4::from_shape_vec((conv.kh, conv.kw, conv.c, conv.f), w.clone()).unwrap();
    let y = Plain.conv2d_forward(node(2), x4.view(), w4.view(), None, &g);
    let y = y.as_slice().unwrap();
    let mut sums = vec![0.0f32; batch * 2 * conv.f];
    for (i, v) in y.iter().enumerate() {
        let (n, k) = (i / (conv.oh * conv.ow * conv.f), i % conv.f);
        sums[n * 2 * conv.f + k] += v;
        sums[n * 2 * conv.f + conv.f + k] += v * v;
    }
    for flush in [true, false] {
        let packed = pack_weights(&w, conv.kh * conv.kw * conv.c, conv.f);
        let buffers: [&[f32]; 5] = [&x, &packed, &[], &vec![0.0; y.len()], &vec![0.0; sums.len()]];
        let out = run_guarded(block.forward, &buffers, [0, batch, batch], flush);
        close("conv with batch sums: output", y, &out[3]);
        close("conv with batch sums: sums", &sums, &out[4]);
    }

    // The pooled block at inference (6x4x7 → conv 2x2 with bias → 5x3x6 → relu → maxpool 2 →
    // 2x1x6): the conv computes only the 4x2 pixels the pool reads, and its windows tile
    // them, so one kernel convolves and pools, the whole batch a call.
    let pooled = jit.block(node(6)).expect("conv → relu is a block");
    let (shape, [conv_kernel, _]) = pooled.pooled.expect("the max pool joins it at inference");
    assert!(shape.fused, "2x2 windows that tile the pixels read: one kernel");
    let conv = jit.conv(node(5)).unwrap().shape;
    let x = random(batch * conv.hp * conv.wp * conv.c, &mut rng);
    let w = random(conv.kh * conv.kw * conv.c * conv.f, &mut rng);
    let b = random(conv.f, &mut rng);
    let g = Geometry { kernel: [2, 2], stride: [1, 1], pad_before: [0, 0], out: [conv.oh, conv.ow] };
    let x4 = Array4::from_shape_vec((batch, conv.hp, conv.wp, conv.c), x.clone()).unwrap();
    let w4 = Array4::from_shape_vec((conv.kh, conv.kw, conv.c, conv.f), w.clone()).unwrap();
    let b1 = Array1::from(b.clone());
    let y = Plain.conv2d_forward(node(5), x4.view(), w4.view(), Some(b1.view()), &g).mapv(|v| v.max(0.0));
    let pool_g =
        Geometry { kernel: [2, 2], stride: [2, 2], pad_before: [0, 0], out: [conv.oh / 2, conv.ow / 2] };
    let expected = Plain.maxpool_forward(node(7), y.view(), &pool_g);
    assert_eq!(expected.len(), batch * shape.output);
    for flush in [true, false] {
        let packed = pack_weights(&w, conv.kh * conv.kw * conv.c, conv.f);
        let out = run_guarded(
            conv_kernel,
            &[&x, &packed, &b, &vec![0.0; expected.len()]],
            [0, batch, batch],
            flush,
        );
        close("convolution and pool in one kernel", expected.as_slice().unwrap(), &out[3]);
    }
}

/// A pooled block whose windows overlap, at inference: the convolution's kernel (the pixels
/// the pool reads, 7x7 of 8x8) into a scratch buffer of one sample, then the pool's kernel,
/// both on guarded buffers.
#[test]
fn pooled_blocks_with_overlapping_windows_stay_inside_their_buffers() {
    let text = "model m { input 9x9x5 conv2d(6, kernel=2) relu maxpool(3, stride=2) flatten dense(3, activation=softmax) }
                train { loss = categorical_crossentropy }";
    let program =
        autodiff::build(&cnnc::check(&SourceFile::new("guard.cnn", text)).unwrap()).unwrap().fused();
    let jit = JitKernels::compile(&program, Listing::default()).unwrap();
    let node = |i: usize| cnnc::ir::NodeId::from_index(i);
    let mut rng = Rng::new(22, &[]);
    let pooled = jit.block(node(2)).expect("conv → relu is a block");
    let (shape, [conv_kernel, pool_kernel]) = pooled.pooled.expect("the max pool joins it at inference");
    assert!(!shape.fused, "overlapping windows: the pool runs on its own");
    let conv = jit.conv(node(1)).unwrap().shape;
    let x = random(conv.hp * conv.wp * conv.c, &mut rng);
    let w = random(conv.kh * conv.kw * conv.c * conv.f, &mut rng);
    let b = random(conv.f, &mut rng);
    let (rows, cols) = (shape.scratch / conv.f / 7, 7);
    assert_eq!([rows, cols], [7, 7], "the pixels 3x3 windows of stride 2 read of 8x8");
    let g = Geometry { kernel: [2, 2], stride: [1, 1], pad_before: [0, 0], out: [rows, cols] };
    let x4 = Array4::from_shape_vec((1, conv.hp, conv.wp, conv.c), x.clone()).unwrap();
    let w4 = Array4::from_shape_vec((conv.kh, conv.kw, conv.c, conv.f), w.clone()).unwrap();
    let b1 = Array1::from(b.clone());
    let y = Plain.conv2d_forward(node(1), x4.view(), w4.view(), Some(b1.view()), &g).mapv(|v| v.max(0.0));
    let pool_g = Geometry { kernel: [3, 3], stride: [2, 2], pad_before: [0, 0], out: [3, 3] };
    let expected = Plain.maxpool_forward(node(3), y.view(), &pool_g);
    assert_eq!(expected.len(), shape.output);
    for flush in [true, false] {
        let packed = pack_weights(&w, conv.kh * conv.kw * conv.c, conv.f);
        let scratch =
            run_guarded(conv_kernel, &[&x, &packed, &b, &vec![0.0; shape.scratch]], [0, 1, 1], flush);
        let out = run_guarded(pool_kernel, &[&scratch[3], &vec![0.0; shape.output]], [0, 1, 1], flush);
        close("pooled block", expected.as_slice().unwrap(), &out[1]);
    }
}

/// Winograd's forward kernel (a layer with odd outputs, so the input is grown by a row and a
/// column, and a fused block with the batch sums in its epilogue) on guarded buffers: the
/// input, the transformed weights, the output, the sums and the scratch, each exactly as
/// long as the shapes say. Results against the reference convolution.
#[test]
fn winograd_kernels_stay_inside_their_buffers() {
    let text = "model m { input 8x9x16 conv2d(21, kernel=3) conv2d(24, kernel=3, padding=same, bias=false) \
                batchnorm relu flatten dense(3, activation=softmax) }
                train { loss = categorical_crossentropy }";
    let program = autodiff::build(&cnnc::check(&SourceFile::new("guard.cnn", text)).unwrap()).unwrap();
    let fused = program.clone().fused();
    let (jit, jit_fused) = (
        JitKernels::compile(&program, Listing::default()).unwrap(),
        JitKernels::compile(&fused, Listing::default()).unwrap(),
    );
    let node = |i: usize| cnnc::ir::NodeId::from_index(i);
    let mut rng = Rng::new(31, &[]);
    let batch = 3;
    let block = jit_fused.block_winograd(node(4)).expect("conv → batchnorm → relu runs Winograd");
    let cases = [
        (
            jit.winograd(node(1)).and_then(|k| k.forward).expect("conv2d runs Winograd"),
            jit.conv(node(1)).unwrap(),
            false,
        ),
        (block.forward, jit_fused.conv(node(2)).unwrap(), true),
    ];
    for ((shape, kernel), conv, stats) in cases {
        let (s, w_shape) = (conv.shape, shape.conv);
        let (h, w) = (s.hp - conv.pads[0] - conv.pads[1], s.wp - conv.pads[2] - conv.pads[3]);
        let x = random(batch * h * w * s.c, &mut rng);
        let k = random(9 * s.c * s.f, &mut rng);
        let b = random(s.f, &mut rng);
        let x4 = Array4::from_shape_vec((batch, h, w, s.c), x).unwrap();
        let k4 = Array4::from_shape_vec((3, 3, s.c, s.f), k.clone()).unwrap();
        let g = Geometry {
            kernel: [3, 3],
            stride: [1, 1],
            pad_before: [conv.pads[0], conv.pads[2]],
            out: [s.oh, s.ow],
        };
        let bias = Array1::from(b.clone());
        let y_ref = Plain.conv2d_forward(node(1), x4.view(), k4.view(), s.bias.then(|| bias.view()), &g);
        // the input in the kernel's grown buffer: the layer's padding before, zeros after
        let mut xp = Array4::<f32>::zeros((batch, w_shape.hp, w_shape.wp, s.c));
        xp.slice_mut(s![.., conv.pads[0]..conv.pads[0] + h, conv.pads[2]..conv.pads[2] + w, ..]).assign(&x4);
        let xp: Vec<f32> = xp.iter().copied().collect();
        let u = cnnc::backend::jit::winograd::transform_weights(&k, &shape);
        let bias: &[f32] = if s.bias { &b } else { &[] };
        let sums_len = if stats { batch * 2 * s.f } else { 0 };
        for flush in [true, false] {
            let buffers: [&[f32]; 6] =
                [&xp, &u, bias, &vec![0.0; y_ref.len()], &vec![0.0; sums_len], &vec![0.0; shape.scratch()]];
            let out = run_guarded(kernel, &buffers, [0, batch, batch], flush);
            close("winograd forward", y_ref.as_slice().unwrap(), &out[3]);
            if stats {
                let y = y_ref.as_slice().unwrap();
                let mut sums = vec![0.0f32; batch * 2 * s.f];
                for (i, v) in y.iter().enumerate() {
                    let (n, c) = (i / (s.oh * s.ow * s.f), i % s.f);
                    sums[n * 2 * s.f + c] += v;
                    sums[n * 2 * s.f + s.f + c] += v * v;
                }
                close("winograd batch sums", &sums, &out[4]);
            }
        }
    }
}

/// Winograd's weight-gradient kernels, F(3x3, 2x2) and F(3x3, 4x4) (odd outputs: partial
/// last tiles), on guarded buffers, the batch split over two calls into one M (a piece of
/// one sample, a partial group of samples, then one of two), each with a scratch of its own.
#[test]
fn winograd_weight_gradient_stays_inside_its_buffers() {
    // 6x7 outputs take 2x2 tiles of dy, 11x11 (as mnist.cnn's conv2d_1) 4x4 tiles
    for (input, filters, tile) in [("8x9x16", 21, 2), ("13x13x32", 40, 4)] {
        let text = format!(
            "model m {{ input {input} conv2d({filters}, kernel=3) flatten dense(3, activation=softmax) }}
             train {{ loss = categorical_crossentropy }}"
        );
        let program =
            autodiff::build(&cnnc::check(&SourceFile::new("guard.cnn", text.as_str())).unwrap()).unwrap();
        let jit = JitKernels::compile(&program, Listing::default()).unwrap();
        let node = cnnc::ir::NodeId::from_index(1);
        let (shape, kernel) =
            jit.winograd(node).and_then(|k| k.weight_gradient).expect("the weight gradient runs Winograd");
        assert_eq!(shape.m, tile, "{input}: the cost model's tile");
        let s = shape.conv;
        let batch = 3;
        let mut rng = Rng::new(41, &[]);
        let x = random(batch * s.hp * s.wp * s.c, &mut rng);
        let dy = random(batch * s.oh * s.ow * s.f, &mut rng);
        let x4 = Array4::from_shape_vec((batch, s.hp, s.wp, s.c), x.clone()).unwrap();
        let dy4 = Array4::from_shape_vec((batch, s.oh, s.ow, s.f), dy.clone()).unwrap();
        let g = Geometry { kernel: [3, 3], stride: [1, 1], pad_before: [0, 0], out: [s.oh, s.ow] };
        let (dw_ref, db_ref) =
            Plain.conv2d_backward_weights(node, x4.view(), dy4.view(), [3, 3, s.c, s.f], &g);
        assert!(s.bias, "the layers have a bias, which the kernel sums too");
        for flush in [true, false] {
            let (mut m, mut sums) = (vec![0.0f32; shape.positions() * s.c * s.f], vec![0.0f32; s.f]);
            for (lo, hi) in [(0, batch / 2), (batch / 2, batch)] {
                let buffers: [&[f32]; 5] = [&x, &dy, &m, &vec![0.0; shape.weight_scratch()], &sums];
                let mut out = run_guarded(kernel, &buffers, [lo, hi, batch], flush);
                sums = out.swap_remove(4);
                m = out.swap_remove(2);
            }
            let dw = cnnc::backend::jit::winograd::weight_gradient_output(&m, &shape);
            close("winograd weight gradient", dw_ref.as_slice().unwrap(), &dw);
            let scale = cnnc::backend::jit::winograd::bias_scale(&shape);
            let db: Vec<f32> = sums.iter().map(|v| v * scale).collect();
            close("winograd bias gradient", db_ref.as_slice().unwrap(), &db);
        }
    }
}
