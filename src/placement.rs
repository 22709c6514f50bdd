//! `tessera placement`: prints the expert placement map a cluster of `--tp N` ranks would use.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tessera_common::{PlacementMap, load_model_spec};

#[derive(Args, Debug)]
pub struct PlacementArgs {
    /// Hugging Face model folder (only config.json is read).
    #[arg(long, env = "TESSERA_MODEL")]
    model: PathBuf,
    /// Number of ranks.
    #[arg(long, default_value_t = 1, env = "TESSERA_TP")]
    tp: usize,
}

pub fn run(args: PlacementArgs) -> Result<()> {
    let spec = load_model_spec(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?;
    spec.check_tensor_parallel(args.tp)?;
    let map = PlacementMap::contiguous(&spec, args.tp);
    println!("{}", serde_json::to_string_pretty(&map)?);
    Ok(())
}
