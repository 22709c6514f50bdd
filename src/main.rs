//! `tessera`: the command-line entry point.
//!
//! Subcommands parse their flags (every flag also reads a `TESSERA_*` environment variable) and
//! call into the library crates; all user-facing errors surface here with their full cause chain.

mod bench;
mod demo;
mod device;
mod generate;
mod loadgen;
mod membership;
mod placement;
mod serve;
mod tls;
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
    /// Run a coordinator whose workers register with it (--listen) or in etcd (--etcd): forms
    /// the group of --tp workers it finds, serves like `serve`, and re-forms the group when a
    /// worker is lost.
    Coordinator(serve::CoordinatorArgs),
    /// Serve a model over the OpenAI-compatible HTTP API and the tessera.v1 gRPC API.
    Serve(serve::ServeArgs),
    /// Run a worker: serves the worker control plane over gRPC and runs its shard of the model.
    Worker(worker::WorkerArgs),
    /// Benchmarks: load a running server (--url: throughput, TTFT and inter-token latency
    /// percentiles), or --roofline: decode speed against this machine's memory bandwidth.
    Bench(bench::BenchArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            EnvFilter::new("warn,tessera=info,tessera_worker=info,tessera_coordinator=info")
        }))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Placement(args) => placement::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Coordinator(args) => serve::run_coordinator(args),
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
