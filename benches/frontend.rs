//! How long the front end takes, stage by stage, on the seed models: parse alone against the
//! whole front end (parse, lower, infer shapes, count costs, check), side by side. The
//! project's goal is a whole training step compiled in under 50 ms; the front end's share of
//! that should stay in microseconds.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

use cnnc::diagnostic::SourceFile;

fn front_end(c: &mut Criterion) {
    for path in ["models/mnist.cnn", "models/seed002.cnn"] {
        let source = SourceFile::new(path, std::fs::read_to_string(path).unwrap());
        let mut group = c.benchmark_group(path);
        group.bench_function("parse", |b| b.iter(|| cnnc::syntax::parse(black_box(&source.text)).unwrap()));
        group.bench_function("whole front end", |b| b.iter(|| cnnc::check(black_box(&source)).unwrap()));
        group.bench_function("summary (front end + report)", |b| {
            b.iter(|| cnnc::report::summary_text(&cnnc::check(black_box(&source)).unwrap()))
        });
        group.finish();
    }
}

criterion_group!(benches, front_end);
criterion_main!(benches);
