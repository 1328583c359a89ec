//! The `outpost` binary: everything lives in `outpost-cli`; this only hands over control.

fn main() -> std::process::ExitCode {
    let commit = env!("BUILT_FROM_COMMIT");
    let version = match commit.is_empty() {
        true => env!("CARGO_PKG_VERSION").to_string(),
        false => format!("{}+{commit}", env!("CARGO_PKG_VERSION")),
    };
    outpost_cli::main(version)
}
