//! UI tests: every `tests/ui/NAME.cnn` is a model with a problem; `NAME.stderr` holds the
//! diagnostics cnnc must print for it, in full (message, file:line:column, source line, caret).
//!
//! Regenerate the expectations with `BLESS=1 cargo test --test ui`, then read the diff.

use std::path::Path;

use cnnc::diagnostic::{SourceFile, render_all};

#[test]
fn every_ui_case_renders_its_expected_diagnostics() {
    let dir = Path::new("tests/ui");
    let mut cases: Vec<_> = std::fs::read_dir(dir)
        .expect("tests/ui exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cnn"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 30, "the UI cases are missing");
    let bless = std::env::var_os("BLESS").is_some();
    let mut failures = Vec::new();
    for path in &cases {
        let name = path.to_str().expect("utf-8 path").replace('\\', "/");
        let source = SourceFile::new(name.clone(), std::fs::read_to_string(path).unwrap());
        let diagnostics = match cnnc::check(&source) {
            Ok(checked) => checked.warnings,
            Err(diagnostics) => diagnostics,
        };
        assert!(!diagnostics.is_empty(), "{name}: a UI case must produce a diagnostic");
        let actual = render_all(&diagnostics, &source);
        let expected_path = path.with_extension("stderr");
        if bless {
            std::fs::write(&expected_path, &actual).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} is missing: run with BLESS=1", expected_path.display()));
        if actual != expected {
            failures.push(format!("── {name}\n── expected:\n{expected}── actual:\n{actual}"));
        }
    }
    assert!(failures.is_empty(), "{} UI case(s) differ:\n{}", failures.len(), failures.join("\n"));
}
