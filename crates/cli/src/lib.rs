//! `outpost-cli` turns a command line into action: it parses arguments (clap), derives the
//! effective configuration (defaults → TOML file → `OUTPOST_*` environment → flags, via
//! figment), sets up logging, and runs the chosen command. `anyhow` is allowed here and in the
//! binary only.

mod bundle;
mod client;
mod config;
mod connected;
mod listen;
mod manage;
mod memory;
mod serve;
mod tls;
mod webhook;

pub use config::Config;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
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
    #[command(flatten)]
    conn: client::Connection,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the registry: a root, a connected registry (--connection-string) or a mirror of a
    /// plain registry (upstream_url).
    Serve(serve::ServeArgs),
    /// Print the effective configuration (defaults, file, environment and flags merged).
    Config(serve::ServeArgs),
    /// Manage scope maps (az acr scope-map).
    #[command(subcommand)]
    ScopeMap(manage::ScopeMapCmd),
    /// Manage tokens (az acr token).
    #[command(subcommand)]
    Token(manage::TokenCmd),
    /// Manage connected registries (az acr connected-registry).
    #[command(subcommand)]
    ConnectedRegistry(connected::ConnectedRegistryCmd),
    /// Run garbage collection now: delete blobs that no manifest references.
    Gc(manage::GcArgs),
    /// Is everything an image needs here (every platform, every blob)? Exits 1 if not, 2 if
    /// it could not ask (registry unreachable, wrong credentials).
    Readiness(manage::ReadinessArgs),
    /// Store an offline bundle (from `connected-registry export`) in a stopped site's data
    /// directory.
    Import(ImportArgs),
}

#[derive(clap::Args, Debug)]
struct ImportArgs {
    /// The site's data directory (the site must be stopped)
    #[arg(long)]
    data_dir: std::path::PathBuf,
    /// The bundle directory `connected-registry export` wrote
    #[arg(long)]
    dir: std::path::PathBuf,
    /// The site's `blob_store` (`s3://…` or `az://…`), for a site whose server has not started
    /// yet; otherwise the one its data directory recorded is used
    #[arg(long, env = "OUTPOST_BLOB_STORE")]
    blob_store: Option<String>,
}

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// Entry point of the `outpost` binary.
/// Runs the command line. `version` is the build's (the release, and the commit it was built
/// from when known), shown by `--version`, the status page and reported to a parent.
pub fn main(version: String) -> ExitCode {
    let version = outpost_registry::set_version(version);
    let matches = Cli::command().version(version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // The innermost subcommand's matches (for flags whose repeated groups derive flattens).
    let mut leaf = &matches;
    while let Some((_, m)) = leaf.subcommand() {
        leaf = m;
    }
    let answers = !matches!(
        cli.command,
        Command::Serve(_) | Command::Config(_) | Command::Import(_)
    );
    let readiness = matches!(cli.command, Command::Readiness(_));
    if !matches!(cli.command, Command::Serve(_)) {
        restore_sigpipe();
    }
    let result = match cli.command {
        _ if !answers && cli.conn.query.is_some() => Err(anyhow::anyhow!(
            "--query selects from the answer of a management command (token, scope-map, connected-registry, gc, readiness); this command has none"
        )),
        Command::Serve(args) => serve::run(args),
        Command::Config(args) => config::Config::load(&args).and_then(|c| {
            // What `serve` checks before it starts, short of starting.
            serve::check_data_dir_owner(&c)?;
            if let (Some(cert), Some(key)) = (&c.tls_cert, &c.tls_key) {
                tls::Certificate::load(cert, key)?;
            }
            match cli.conn.output {
                client::Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&c.to_json()).unwrap_or_default()
                ),
                client::Output::Table => println!("{}", c.to_toml()),
                // Only whether the configuration loads: the exit status.
                client::Output::None => {}
                client::Output::Tsv => anyhow::bail!(
                    "outpost config prints TOML (the default) or JSON (--output json); \
                     --output tsv does not apply"
                ),
            }
            Ok(())
        }),
        Command::ScopeMap(cmd) => block_on(manage::scope_map(&cli.conn, cmd, leaf)),
        Command::Token(cmd) => block_on(manage::token(&cli.conn, cmd, leaf)),
        Command::ConnectedRegistry(cmd) => block_on(connected::run(&cli.conn, cmd)),
        Command::Gc(args) => block_on(manage::gc(&cli.conn, args)),
        Command::Readiness(args) => block_on(manage::readiness(&cli.conn, args)),
        Command::Import(args) => block_on(bundle::import(
            &args.data_dir,
            &args.dir,
            args.blob_store.as_deref(),
            cli.conn.output == client::Output::Json,
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if readiness && e.downcast_ref::<manage::NotReady>().is_none() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Rust ignores SIGPIPE, so printing to a pipe whose reader has gone (`outpost token list |
/// head -1`) fails, and `println!` panics. A command that prints ends quietly instead, as
/// `ls` or `grep` do, killed by the signal. Not for `serve`: a client closing its connection
/// must not end the server.
fn restore_sigpipe() {
    // SAFETY: sets the disposition of one signal to its default, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_definition_is_consistent() {
        // Catches clashing short flags, bad defaults and the like for every subcommand.
        Cli::command().debug_assert();
    }

    #[test]
    fn a_password_that_begins_with_a_hyphen_is_a_password() {
        // Generated base64url secrets begin with `-` one time in 64; clap must not read
        // `--password -5ab…` as an unknown flag.
        let cli = Cli::try_parse_from([
            "outpost",
            "token",
            "list",
            "--password",
            "-5ab_c",
            "--username",
            "admin",
        ])
        .expect("parses");
        assert_eq!(cli.conn.password.as_deref(), Some("-5ab_c"));
        assert_eq!(cli.conn.username.as_deref(), Some("admin"));
    }
}
