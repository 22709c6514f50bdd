//! `tessera`: the command-line entry point.
//!
//! Subcommands parse their flags (every flag also reads a `TESSERA_*` environment variable) and
//! call into the library crates; all user-facing errors surface here with their full cause chain.

mod bench;
mod generate;
mod placement;
mod worker;

use std::io::IsTerminal;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Distributed inference for open-weight Mixture-of-Experts models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of one prompt (in this process, or on an embedded cluster with --tp).
    Generate(generate::GenerateArgs),
    /// Print the expert placement map (layer, expert) → rank for --tp N ranks, as JSON.
    Placement(placement::PlacementArgs),
    /// Run a worker: serves the worker control plane over gRPC and runs its shard of the model.
    Worker(worker::WorkerArgs),
    /// Performance measurements: --roofline reports decode speed against memory bandwidth.
    Bench(bench::BenchArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("warn,tessera=info,tessera_worker=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Placement(args) => placement::run(args),
        Command::Bench(args) => bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {}", describe(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, skipping causes whose text the message already contains.
fn describe(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg = format!("{msg}: {text}");
        }
    }
    msg
}
