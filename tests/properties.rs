//! Property tests: the front end never panics. Random layer stacks (valid syntax, any sizes,
//! legal or not), random edits of a real model, and random bytes must all end in `Ok` or in
//! diagnostics that point inside the text.

use cnnc::diagnostic::SourceFile;
use proptest::prelude::*;

/// Runs the whole front end and renders whatever it reports; panics only on a bug.
fn front_end(text: &str) -> Result<cnnc::Checked, Vec<cnnc::diagnostic::Diagnostic>> {
    let source = SourceFile::new("prop.cnn", text);
    let result = cnnc::check(&source);
    let diagnostics = match &result {
        Ok(checked) => {
            // every report is computable for a model that checks
            let _ = cnnc::report::summary_text(checked);
            let _ = cnnc::report::summary_json(checked);
            checked.warnings.clone()
        }
        Err(d) => {
            assert!(!d.is_empty(), "an error result carries diagnostics");
            d.clone()
        }
    };
    for d in &diagnostics {
        for label in &d.labels {
            assert!(label.span.start <= label.span.end && label.span.end <= text.len());
        }
        let _ = d.render(&source);
    }
    result
}

fn size() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (1i64..6).prop_map(|k| k.to_string()),
        4 => (1u64..6, 1u64..6).prop_map(|(h, w)| format!("{h}x{w}")),
        1 => Just("0".to_string()),
        1 => Just("-1".to_string()),
        1 => Just("4000000000".to_string()),
    ]
}

fn layer() -> impl Strategy<Value = String> {
    let padding = prop_oneof![
        4 => Just("valid".to_string()),
        4 => Just("same".to_string()),
        2 => (0u64..4).prop_map(|p| p.to_string()),
        1 => Just("3000000000".to_string())
    ];
    let activation = prop::sample::select(vec!["relu", "linear", "softmax", "sigmoid", "tanh", "leaky_relu"]);
    prop_oneof![
        (0i64..40, size(), size(), padding.clone(), activation.clone(), any::<bool>()).prop_map(
            |(f, k, s, p, a, b)| format!(
                "conv2d({f}, kernel={k}, stride={s}, padding={p}, activation={a}, bias={b})"
            )
        ),
        (size(), size(), padding).prop_map(|(k, s, p)| format!("maxpool({k}, stride={s}, padding={p})")),
        size().prop_map(|k| format!("avgpool({k})")),
        Just("batchnorm".to_string()),
        Just("relu".to_string()),
        Just("softmax".to_string()),
        Just("leaky_relu(0.1)".to_string()),
        (0u32..12).prop_map(|r| format!("dropout(0.{r})")),
        Just("flatten".to_string()),
        (0i64..300, activation).prop_map(|(u, a)| format!("dense({u}, activation={a})")),
    ]
}

fn model() -> impl Strategy<Value = String> {
    (1u64..40, 1u64..40, 1u64..4, prop::collection::vec(layer(), 0..8), prop::bool::weighted(0.2)).prop_map(
        |(h, w, c, layers, train)| {
            let mut text = format!("model m {{\n    input {h}x{w}x{c}\n");
            for layer in layers {
                text += &format!("    {layer}\n");
            }
            text += "}\n";
            if train {
                text += "train {\n    data = mnist\n    loss = categorical_crossentropy\n}\n";
            }
            text
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_layer_stacks_never_panic(text in model()) {
        if let Ok(checked) = front_end(&text) {
            // a model that checks has a shape for every layer, and positive sizes everywhere
            for (_, layer) in checked.model.graph.model_layers() {
                let shape = checked.shapes.shape(layer.output());
                prop_assert!(shape.dims().iter().all(|d| *d >= 1), "{text}");
            }
        }
    }

    #[test]
    fn random_bytes_never_panic_the_parser(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = front_end(&text);
    }

    #[test]
    fn random_edits_of_a_real_model_never_panic(cut in 0usize..600, len in 0usize..20, insert in "[a-z0-9(),=x# \n{}.-]{0,8}") {
        let original = std::fs::read_to_string("models/mnist.cnn").unwrap();
        let mut cut = cut.min(original.len());
        while !original.is_char_boundary(cut) { cut -= 1; }
        let mut end = (cut + len).min(original.len());
        while !original.is_char_boundary(end) { end -= 1; }
        let text = format!("{}{insert}{}", &original[..cut], &original[end..]);
        let _ = front_end(&text);
    }
}

/// The random-stack property is only worth something if many generated models are legal:
/// make sure a fair share of them check, and a fair share fail.
#[test]
fn random_layer_stacks_cover_both_outcomes() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    let strategy = model();
    let samples = 400;
    let ok = (0..samples)
        .filter(|_| front_end(&strategy.new_tree(&mut runner).unwrap().current()).is_ok())
        .count();
    eprintln!("{ok} of {samples} random models check");
    assert!(ok >= samples / 5 && ok <= samples * 4 / 5, "{ok} of {samples} random models check");
}
