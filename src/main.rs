//! The `cnnc` command line: parses arguments, calls the library, prints.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cnnc::diagnostic::{Diagnostic, SourceFile, render_all};

#[derive(Parser)]
#[command(
    name = "cnnc",
    version,
    about = "A compiler for convolutional networks described in .cnn files",
    long_about = "cnnc reads a model described in a .cnn file, infers every shape, and reports on it.\n\n\
                  Examples:\n  cnnc check models/mnist.cnn\n  cnnc summary models/mnist.cnn\n  cnnc summary --json models/mnist.cnn\n  cnnc compile --emit ir models/mnist.cnn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse, infer shapes and validate a model and its train block; print "ok" or the problems.
    Check {
        /// The .cnn file.
        file: PathBuf,
        /// Treat warnings as errors (non-zero exit when there are any).
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Print the model's layers, output shapes, parameters, FLOPs, memory, padding and
    /// receptive fields.
    Summary {
        /// The .cnn file.
        file: PathBuf,
        /// Print the summary as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Treat warnings as errors (non-zero exit when there are any).
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Compile a model and print an intermediate form.
    Compile {
        /// The .cnn file.
        file: PathBuf,
        /// What to print. `ir`: the forward IR graph, one op a line, with every shape.
        /// (Cranelift IR and assembly come with the JIT backend.)
        #[arg(long, value_enum, default_value = "ir")]
        emit: Emit,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Emit {
    Ir,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { file, deny_warnings } => run(&file, deny_warnings, |_| println!("ok")),
        Command::Summary { file, json, deny_warnings } => run(&file, deny_warnings, |checked| {
            if json {
                let text = serde_json::to_string_pretty(&cnnc::report::summary_json(checked))
                    .expect("a JSON value serializes");
                println!("{text}");
            } else {
                print!("{}", cnnc::report::summary_text(checked));
            }
        }),
        Command::Compile { file, emit: Emit::Ir } => run(&file, false, |checked| {
            print!("{}", cnnc::ir::dump(&checked.model.graph, Some(&checked.shapes)));
        }),
    }
}

/// Runs the front end on `file`, prints its diagnostics, and calls `report` when it passes.
fn run(file: &std::path::Path, deny_warnings: bool, report: impl FnOnce(&cnnc::Checked)) -> ExitCode {
    let source = match cnnc::read_source(file) {
        Ok(source) => source,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match cnnc::check(&source) {
        Ok(checked) => {
            print_diagnostics(&checked.warnings, &source);
            if deny_warnings && !checked.warnings.is_empty() {
                eprintln!("error: {} warning(s), and --deny-warnings was given", checked.warnings.len());
                return ExitCode::FAILURE;
            }
            report(&checked);
            ExitCode::SUCCESS
        }
        Err(diagnostics) => {
            print_diagnostics(&diagnostics, &source);
            let errors = diagnostics.iter().filter(|d| d.is_error()).count();
            eprintln!("error: {} found {} error(s)", source.name, errors);
            ExitCode::FAILURE
        }
    }
}

fn print_diagnostics(diagnostics: &[Diagnostic], source: &SourceFile) {
    if !diagnostics.is_empty() {
        eprintln!("{}", render_all(diagnostics, source));
    }
}
