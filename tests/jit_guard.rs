//! Memory safety of the compiled kernels (convolution, dense, max pooling, rectifiers): every buffer is placed flush against an inaccessible
//! guard page, after its end and (in a second run) before its start, so a kernel that reads or
//! writes one element outside its buffers crashes the test. Shapes are odd on purpose (channel
//! tails, pixel-block tails, strides, padding). The results are compared with the ordinary,
//! heap-allocated path, so the test also shows the kernels really ran.

use cnnc::autodiff;
use cnnc::backend::jit::{JitKernels, Listing};
use cnnc::backend::reference::Kernels as _;
use cnnc::backend::reference::ops::Geometry;
use cnnc::diagnostic::SourceFile;
use cnnc::rng::Rng;
use ndarray::{Array1, Array4};

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

fn check(model: &str, batch: usize) {
    let text = format!("model m {{ {model} }}\ntrain {{ loss = categorical_crossentropy }}");
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
        let (dw_ref, _) =
            reference.conv2d_backward_weights(id, x4.view(), dy4.view(), [s.kh, s.kw, s.c, s.f], &g);

        for flush_with_end in [true, false] {
            let gx = Guarded::new(&x, flush_with_end);
            let gw = Guarded::new(&w, flush_with_end);
            let gb = Guarded::new(&b, flush_with_end);
            let gy = Guarded::new(&vec![0.0; batch * s.oh * s.ow * s.f], flush_with_end);
            let gdy = Guarded::new(&dy, flush_with_end);
            let gwt = Guarded::new(&wt, flush_with_end);
            let gdx = Guarded::new(&vec![0.0; x.len()], flush_with_end);
            let gdw = Guarded::new(&vec![0.0; w.len()], flush_with_end);
            let bias_ptr = if s.bias { gb.ptr } else { std::ptr::null_mut() };
            // SAFETY: each buffer has exactly the shape the kernel was compiled for; were a
            // kernel to step outside one, the guard page would stop the test with a fault.
            unsafe {
                (k.forward)([gx.ptr, gw.ptr, bias_ptr, gy.ptr].as_ptr(), 0, batch as i64, batch as i64);
                (k.backward_input)([gdy.ptr, gwt.ptr, gdx.ptr].as_ptr(), 0, batch as i64, batch as i64);
                (k.backward_weights)(
                    [gx.ptr, gdy.ptr, gdw.ptr].as_ptr(),
                    0,
                    s.weight_tasks() as i64,
                    batch as i64,
                );
            }
            let name = format!("{model} / {}", program.graph.layer_of(id).name);
            close(&format!("{name} forward"), y_ref.as_slice().unwrap(), &gy.to_vec());
            close(&format!("{name} input gradient"), dx_ref.as_slice().unwrap(), &gdx.to_vec());
            close(&format!("{name} weight gradient"), dw_ref.as_slice().unwrap(), &gdw.to_vec());
        }
        checked_nodes += 1;
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
    }
    assert!(checked_nodes > 0);
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
}
