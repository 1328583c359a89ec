//! `outpost-cli` turns a command line into action: it parses arguments (clap), derives the
//! effective configuration (defaults → TOML file → `OUTPOST_*` environment → flags, via
//! figment), sets up logging, and runs the chosen command. `anyhow` is allowed here and in the
//! binary only.

mod config;
mod serve;

pub use config::Config;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "outpost",
    version,
    about = "A container registry for sites that are only sometimes online"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the registry (root role).
    Serve(serve::ServeArgs),
    /// Print the effective configuration (defaults, file, environment and flags merged).
    Config(serve::ServeArgs),
}

/// Entry point of the `outpost` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Config(args) => config::Config::load(&args).map(|c| {
            println!("{}", c.to_toml());
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
