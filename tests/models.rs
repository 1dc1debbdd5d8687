//! Golden tests for every model in models/: the layer shapes and parameter counts are written
//! out by hand here (checked against Keras's arithmetic), and the full summary, text and JSON,
//! is compared with tests/golden/. Regenerate the golden files with
//! `BLESS=1 cargo test --test models`, then read the diff.

use std::path::Path;

use cnnc::diagnostic::SourceFile;
use serde_json::Value;

fn check_file(path: &str) -> cnnc::Checked {
    let source = SourceFile::new(path, std::fs::read_to_string(path).unwrap());
    cnnc::check(&source)
        .unwrap_or_else(|d| panic!("{path} does not check:\n{}", cnnc::diagnostic::render_all(&d, &source)))
}

fn summary(path: &str) -> Value {
    cnnc::report::summary_json(&check_file(path))
}

/// (layer name, output shape, params) for each layer, then (total, trainable) params.
type Expected = (&'static [(&'static str, &'static [usize], usize)], usize, usize);

const MODELS: &[(&str, Expected)] = &[
    (
        "models/mnist.cnn",
        (
            &[
                ("conv2d", &[26, 26, 32], 320),
                ("max_pooling2d", &[13, 13, 32], 0),
                ("conv2d_1", &[11, 11, 64], 18_496),
                ("max_pooling2d_1", &[5, 5, 64], 0),
                ("flatten", &[1600], 0),
                ("dropout", &[1600], 0),
                ("dense", &[10], 16_010),
            ],
            34_826,
            34_826,
        ),
    ),
    (
        "models/mnist_bn.cnn",
        (
            &[
                ("conv2d", &[26, 26, 32], 288),
                ("batch_normalization", &[26, 26, 32], 128),
                ("activation", &[26, 26, 32], 0),
                ("max_pooling2d", &[13, 13, 32], 0),
                ("conv2d_1", &[11, 11, 64], 18_432),
                ("batch_normalization_1", &[11, 11, 64], 256),
                ("activation_1", &[11, 11, 64], 0),
                ("max_pooling2d_1", &[5, 5, 64], 0),
                ("flatten", &[1600], 0),
                ("dropout", &[1600], 0),
                ("dense", &[10], 16_010),
            ],
            35_114,
            34_922,
        ),
    ),
    (
        "models/seed000.cnn",
        (
            &[
                ("conv2d", &[28, 28, 32], 320),
                ("conv2d_1", &[28, 28, 64], 18_496),
                ("conv2d_2", &[28, 28, 64], 36_928),
                ("max_pooling2d", &[14, 14, 64], 0),
                ("flatten", &[12_544], 0),
                ("dense", &[7744], 97_148_480),
                ("dense_1", &[128], 991_360),
                ("dense_2", &[10], 1290),
            ],
            98_196_874,
            98_196_874,
        ),
    ),
    (
        "models/seed002.cnn",
        (
            &[
                ("conv2d", &[98, 98, 512], 5120),
                ("batch_normalization", &[98, 98, 512], 2048),
                ("activation", &[98, 98, 512], 0),
                ("max_pooling2d", &[32, 32, 512], 0),
                ("dropout", &[32, 32, 512], 0),
                ("conv2d_1", &[30, 30, 256], 1_179_904),
                ("batch_normalization_1", &[30, 30, 256], 1024),
                ("activation_1", &[30, 30, 256], 0),
                ("max_pooling2d_1", &[10, 10, 256], 0),
                ("dropout_1", &[10, 10, 256], 0),
                ("conv2d_2", &[8, 8, 128], 295_040),
                ("batch_normalization_2", &[8, 8, 128], 512),
                ("activation_2", &[8, 8, 128], 0),
                ("max_pooling2d_2", &[2, 2, 128], 0),
                ("dropout_2", &[2, 2, 128], 0),
                ("flatten", &[512], 0),
                ("dense", &[1], 513),
            ],
            1_484_161,
            1_482_369,
        ),
    ),
    (
        "models/lenet5.cnn",
        (
            &[
                ("c1", &[28, 28, 6], 156),
                ("s2", &[14, 14, 6], 0),
                ("c3", &[10, 10, 16], 2416),
                ("s4", &[5, 5, 16], 0),
                ("flatten", &[400], 0),
                ("c5", &[120], 48_120),
                ("f6", &[84], 10_164),
                ("output", &[10], 850),
            ],
            61_706,
            61_706,
        ),
    ),
    (
        "models/strided.cnn",
        (
            &[
                ("conv2d", &[14, 14, 16], 144),
                ("batch_normalization", &[14, 14, 16], 64),
                ("leaky_re_lu", &[14, 14, 16], 0),
                ("conv2d_1", &[7, 7, 32], 4608),
                ("batch_normalization_1", &[7, 7, 32], 128),
                ("leaky_re_lu_1", &[7, 7, 32], 0),
                ("conv2d_2", &[4, 4, 64], 32_832),
                ("activation", &[4, 4, 64], 0),
                ("flatten", &[1024], 0),
                ("dense", &[10], 10_250),
            ],
            48_026,
            47_930,
        ),
    ),
];

#[test]
fn every_model_has_its_shapes_and_parameter_counts() {
    for (path, (layers, total, trainable)) in MODELS {
        let json = summary(path);
        let actual: Vec<(String, Vec<usize>, usize)> = json["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let shape =
                    l["output_shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize);
                (
                    l["name"].as_str().unwrap().to_string(),
                    shape.collect(),
                    l["params"].as_u64().unwrap() as usize,
                )
            })
            .collect();
        let expected: Vec<(String, Vec<usize>, usize)> =
            layers.iter().map(|(n, s, p)| (n.to_string(), s.to_vec(), *p)).collect();
        assert_eq!(actual, expected, "{path}");
        assert_eq!(json["total_params"], *total, "{path}");
        assert_eq!(json["trainable_params"], *trainable, "{path}");
        assert_eq!(json["non_trainable_params"], total - trainable, "{path}");
    }
}

#[test]
fn every_model_file_is_covered() {
    let mut files: Vec<String> = std::fs::read_dir("models")
        .unwrap()
        .map(|e| format!("models/{}", e.unwrap().file_name().to_str().unwrap()))
        .filter(|p| p.ends_with(".cnn"))
        .collect();
    files.sort();
    let mut covered: Vec<String> = MODELS.iter().map(|(p, _)| p.to_string()).collect();
    covered.sort();
    assert_eq!(files, covered, "add the new model to MODELS");
}

#[test]
fn mnist_summary_prints_keras_totals() {
    let text = cnnc::report::summary_text(&check_file("models/mnist.cnn"));
    for expected in [
        "(26, 26, 32)",
        "(13, 13, 32)",
        "(11, 11, 64)",
        "(5, 5, 64)",
        "(1600,)",
        "(10,)",
        "Total params: 34,826 (136.04 KB)",
        "Trainable params: 34,826 (136.04 KB)",
        "Non-trainable params: 0 (0.00 B)",
        "max_pooling2d_1: never reads the last 1 row and 1 column of its 11x11x64 input",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
}

#[test]
fn mnist_flops_match_hand_counts() {
    let json = summary("models/mnist.cnn");
    let layer = |i: usize, key: &str| json["layers"][i][key].as_u64().unwrap();
    // conv2d: 2·26·26·32·3·3·1 MACs→FLOPs, + bias and relu, one each per output
    assert_eq!(layer(0, "flops"), 2 * 26 * 26 * 32 * 9 + 2 * 26 * 26 * 32);
    // the conv's own input gradient is never needed (nothing trainable is upstream of it);
    // its relu's is, to reach the conv's weights: one per element
    assert_eq!(layer(0, "flops_backward_input"), 26 * 26 * 32);
    assert_eq!(layer(0, "flops_backward_weights"), 2 * 26 * 26 * 32 * 9 + 26 * 26 * 32);
    // conv2d_1: 2·11·11·64·3·3·32, + its relu's gradient, one per element
    assert_eq!(layer(2, "flops_backward_input"), 2 * 11 * 11 * 64 * 9 * 32 + 11 * 11 * 64);
    // maxpool 2x2: 3 compares per output
    assert_eq!(layer(1, "flops"), 13 * 13 * 32 * 3);
    // dense: 2·1600·10 + bias + softmax (5 per element)
    assert_eq!(layer(6, "flops"), 2 * 1600 * 10 + 10 + 5 * 10);
    assert_eq!(json["flops_forward"], 4_963_356);
}

#[test]
fn receptive_fields_and_padding() {
    let json = summary("models/mnist.cnn");
    let fields: Vec<(u64, Option<u64>, Option<f64>)> = json["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["receptive_field"].as_u64().unwrap(),
                l["receptive_field_jump"].as_u64(),
                l["receptive_field_start"].as_f64(),
            )
        })
        .collect();
    assert_eq!(fields[0], (3, Some(1), Some(1.0)));
    assert_eq!(fields[1], (4, Some(2), Some(1.5)));
    assert_eq!(fields[2], (8, Some(2), Some(3.5)));
    assert_eq!(fields[3], (10, Some(4), Some(4.5)));
    // the dense layer sees rows 0..=25: the last two rows and columns never reach the output
    assert_eq!(fields[6], (26, None, None));

    let strided = summary("models/strided.cnn");
    let padding = |i: usize| strided["layers"][i]["padding"].clone();
    // TensorFlow's `same` with stride 2 on even sizes puts the one pixel bottom/right
    assert_eq!(padding(0), serde_json::json!([0, 1, 0, 1]));
    assert_eq!(padding(3), serde_json::json!([0, 1, 0, 1]));
    // kernel 4 on 7 with stride 2: out 4, needs 3 pixels, 1 before and 2 after
    assert_eq!(padding(6), serde_json::json!([1, 2, 1, 2]));
}

#[test]
fn summaries_match_golden_files() {
    let bless = std::env::var_os("BLESS").is_some();
    let mut failures = Vec::new();
    for (path, _) in MODELS {
        let checked = check_file(path);
        let stem = Path::new(path).file_stem().unwrap().to_str().unwrap();
        let outputs = [
            (format!("tests/golden/{stem}.summary.txt"), cnnc::report::summary_text(&checked)),
            (
                format!("tests/golden/{stem}.summary.json"),
                serde_json::to_string_pretty(&cnnc::report::summary_json(&checked)).unwrap() + "\n",
            ),
        ];
        for (golden, actual) in outputs {
            if bless {
                std::fs::write(&golden, &actual).unwrap();
            } else {
                let expected = std::fs::read_to_string(&golden)
                    .unwrap_or_else(|_| panic!("{golden} is missing: run with BLESS=1"));
                if expected != actual {
                    failures.push(format!("{golden} differs; actual:\n{actual}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
