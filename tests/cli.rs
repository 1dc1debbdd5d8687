//! The `cnnc` binary as a user runs it: exit codes, where output goes, and messages.

use std::process::{Command, Output};

fn cnnc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cnnc")).args(args).output().expect("cnnc runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_prints_ok_for_a_good_model() {
    let out = cnnc(&["check", "models/mnist.cnn"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ok\n");
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn check_points_at_the_error_and_fails() {
    let out = cnnc(&["check", "tests/ui/dense_before_flatten.cnn"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--> tests/ui/dense_before_flatten.cnn:7:5"), "{stderr}");
    assert!(stderr.contains("28→26→13→11→5"), "{stderr}");
    assert!(stderr.contains("5·5·64 = 1600 inputs"), "{stderr}");
    assert!(stderr.ends_with("error: tests/ui/dense_before_flatten.cnn found 1 error(s)\n"), "{stderr}");
    assert_eq!(text(&out.stdout), "");
}

#[test]
fn warnings_pass_unless_denied() {
    let out = cnnc(&["check", "models/seed000.cnn"]);
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("warning: dense holds 98.9% of the model's parameters"));
    assert_eq!(text(&out.stdout), "ok\n");

    let denied = cnnc(&["check", "--deny-warnings", "models/seed000.cnn"]);
    assert_eq!(denied.status.code(), Some(1));
    assert!(text(&denied.stderr).contains("--deny-warnings"));
    assert_eq!(text(&denied.stdout), "");
}

#[test]
fn summary_prints_a_table_and_json() {
    let out = cnnc(&["summary", "models/mnist.cnn"]);
    assert!(out.status.success());
    let table = text(&out.stdout);
    assert!(table.starts_with("Model: \"mnist\""), "{table}");
    assert!(table.contains("Total params: 34,826 (136.04 KB)"), "{table}");

    let out = cnnc(&["summary", "--json", "models/mnist.cnn"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(json["model"], "mnist");
    assert_eq!(json["input"], serde_json::json!([28, 28, 1]));
    assert_eq!(json["total_params"], 34_826);
    assert_eq!(json["layers"][0]["output_shape"], serde_json::json!([26, 26, 32]));
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = cnnc(&["check", "no/such/model.cnn"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("error: cannot read `no/such/model.cnn`"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}

#[test]
fn a_file_that_is_not_text_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("cnnc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("binary.cnn");
    std::fs::write(&path, [0xff, 0xfe, 0x00, 0x41]).unwrap();
    let out = cnnc(&["check", path.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot read"), "{stderr}");
    assert!(stderr.contains("UTF-8"), "{stderr}");
}

#[test]
fn help_explains_the_commands() {
    let out = cnnc(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for word in ["check", "summary", "Examples"] {
        assert!(help.contains(word), "{help}");
    }
    let out = cnnc(&["summary", "--help"]);
    assert!(text(&out.stdout).contains("--json"));
}

#[test]
fn usage_errors_exit_with_2() {
    assert_eq!(cnnc(&["summary"]).status.code(), Some(2));
    assert_eq!(cnnc(&["frobnicate", "x.cnn"]).status.code(), Some(2));
}

#[test]
fn compile_emits_the_ir_with_shapes() {
    let out = cnnc(&["compile", "--emit", "ir", "--no-fuse", "models/mnist.cnn"]);
    assert!(out.status.success());
    let ir = text(&out.stdout);
    assert!(ir.starts_with("graph mnist {\n  %0 = input() 28x28x1 : 28x28x1  # input_layer\n"), "{ir}");
    assert!(
        ir.contains(
            "%1 = conv2d(%0) filters=32 kernel=3x3 stride=1x1 padding=valid bias=true : 26x26x32  # conv2d\n"
        ),
        "{ir}"
    );
    assert!(ir.contains("%2 = relu(%1) : 26x26x32  # conv2d\n"), "{ir}");
    assert!(ir.contains("= softmax(%"), "{ir}");
}

#[test]
fn compile_emits_cranelift_ir_and_machine_code() {
    let clif = cnnc(&["compile", "--emit", "clif", "--kernel", "conv2d_1_forward", "models/mnist.cnn"]);
    assert!(clif.status.success(), "{}", text(&clif.stderr));
    let out = text(&clif.stdout);
    assert!(out.starts_with("; kernel conv2d_1_forward\n"), "{out}");
    assert!(out.contains("fma"), "{out}");
    let stderr = text(&clif.stderr);
    let count: usize = stderr
        .strip_prefix("compiled ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no compile report: {stderr}"));
    // 3 per conv/dense, 2 per pool and relu at least; more for fused blocks and other ops
    assert!(count >= 3 * 3 + 2 * 2 + 2 * 2, "{stderr}");

    let asm = cnnc(&["compile", "--emit", "asm", "--kernel", "dense_backward_weights", "models/mnist.cnn"]);
    assert!(text(&asm.stdout).contains("vfmadd"), "{}", text(&asm.stdout));

    let none = cnnc(&["compile", "--emit", "asm", "--kernel", "nothing_like_this", "models/mnist.cnn"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(text(&none.stderr).contains("the kernels are: conv2d_forward"), "{}", text(&none.stderr));
}

#[test]
fn summary_can_report_the_compile_time() {
    let out = cnnc(&["summary", "--compile", "--json", "models/mnist.cnn"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["compile"]["kernels"].as_u64().unwrap() >= 17, "{json}");
    assert!(json["compile"]["milliseconds"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_training_flags_are_refused_before_any_work() {
    // Each is refused before the dataset is looked at, so no test data is needed.
    for (flag, message) in [
        ("--epochs=0", "--epochs must be at least 1"),
        ("--batch-size=0", "--batch-size must be at least 1"),
        ("--lr=-1", "--lr must be a positive number"),
        ("--threads=0", "--threads must be at least 1"),
    ] {
        let out = cnnc(&["train", "models/mnist.cnn", flag]);
        assert_eq!(out.status.code(), Some(1), "{flag}");
        assert!(text(&out.stderr).contains(message), "{flag}: {}", text(&out.stderr));
    }
}

#[test]
fn compile_shows_fused_blocks_unless_fusion_is_off() {
    let fused = text(&cnnc(&["compile", "--emit", "ir", "models/mnist_bn.cnn"]).stdout);
    assert!(fused.contains("%3 = conv2d+batchnorm+relu(%0) filters=32"), "{fused}");
    assert!(!fused.contains("= batchnorm("), "{fused}");
    let unfused = text(&cnnc(&["compile", "--emit", "ir", "--no-fuse", "models/mnist_bn.cnn"]).stdout);
    assert!(unfused.contains("%2 = batchnorm(%1)"), "{unfused}");
    assert!(!unfused.contains('+'), "{unfused}");
}

#[test]
fn bench_reports_fused_and_unfused_side_by_side() {
    let out = cnnc(&[
        "bench",
        "models/mnist_bn.cnn",
        "--batch-size",
        "3",
        "--inference-batch-size",
        "5",
        "--warmup",
        "1",
        "--rounds",
        "2",
        "--threads",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["model"], "mnist_bn");
    assert_eq!((report["batch_size"].as_u64(), report["threads"].as_u64()), (Some(3), Some(2)));
    for part in ["train", "inference"] {
        let fused = report[part]["fused_img_s"].as_f64().unwrap();
        let unfused = report[part]["unfused_img_s"].as_f64().unwrap();
        let speedup = report[part]["speedup"].as_f64().unwrap();
        assert!(fused > 0.0 && unfused > 0.0, "{part}: {report}");
        assert!((speedup - fused / unfused).abs() < 1e-6 * speedup, "{part}: {report}");
    }
    let kernels = report["kernels"].as_array().unwrap();
    // the first block runs its max pool in training too: one group with it
    let block = "conv2d+batch_normalization+activation+max_pooling2d/forward";
    for fused in [true, false] {
        let row = kernels.iter().find(|k| k["name"] == block && k["fused"] == fused).expect(block);
        assert!(row["median_ms"].as_f64().unwrap() > 0.0 && row["gflops"].as_f64().unwrap() > 0.0, "{row}");
    }
    // the machine's f32x4 ceiling, measured on the bench's threads, and the widest vectors' one
    // where the CPU has wider vectors
    let ceiling = &report["ceiling"];
    assert!(ceiling["gflops"].as_f64().is_some_and(|g| g > 0.0), "{ceiling}");
    assert_eq!(ceiling["threads"].as_u64(), Some(2));
    if ceiling["host_vector_bits"].as_u64().is_some_and(|bits| bits > 128) {
        assert!(ceiling["wide_gflops"].as_f64().is_some_and(|g| g > 0.0), "{ceiling}");
    }
    let bad = cnnc(&["bench", "models/mnist_bn.cnn", "--rounds", "0"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("--rounds must be at least 1"), "{}", text(&bad.stderr));
}
