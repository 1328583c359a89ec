//! The `outpost` binary: everything lives in `outpost-cli`; this only hands over control.

fn main() -> std::process::ExitCode {
    outpost_cli::main()
}
