//! The examples the command line's `--help` shows, run as a user would copy them: in order,
//! against a fresh root, each must succeed.

use crate::support::{ADMIN_PASSWORD, Outpost};

/// The `outpost …` lines of the examples in `outpost <command> --help` (a line ending in `\`
/// goes on on the next), leaving out those with a placeholder (`<…>`).
fn examples(command: &[&str]) -> Vec<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(command)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{command:?} --help");
    let help = String::from_utf8(out.stdout).unwrap();
    let (_, tail) = help
        .split_once("\nExample")
        .unwrap_or_else(|| panic!("`outpost {} --help` has no examples", command.join(" ")));
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in tail.lines() {
        let line = line.trim();
        if current.is_empty() && !line.starts_with("outpost ") {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    lines.retain(|l| !l.contains('<'));
    assert!(!lines.is_empty(), "{command:?}: no runnable example");
    lines
}

#[test]
fn the_examples_in_help_run_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(&dir.path().join("root"), &[]);
    let site_dir = dir.path().join("site");
    let usb = dir.path().join("usb");
    let commands: &[&[&str]] = &[
        &["scope-map", "create"],
        &["token", "create"],
        &["connected-registry", "create"],
        &["connected-registry", "update"],
        &["connected-registry", "get-settings"],
        &["connected-registry", "export"],
    ];
    for command in commands {
        for example in examples(command) {
            let line = example
                .replacen("outpost ", "\"$OUTPOST_BIN\" ", 1)
                .replace("/var/lib/outpost", site_dir.to_str().unwrap())
                .replace("/media/usb", usb.to_str().unwrap());
            let out = std::process::Command::new("sh")
                .args(["-c", &line])
                .env("OUTPOST_BIN", env!("CARGO_BIN_EXE_outpost"))
                .env("OUTPOST_REGISTRY", root.url(""))
                .env("OUTPOST_USERNAME", "admin")
                .env("OUTPOST_PASSWORD", ADMIN_PASSWORD)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "the example `{example}` from `outpost {} --help` failed: {}",
                command.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // The export example's `then, at the site` line ran too: the site's directory has the
    // connected registry's configuration.
    assert!(site_dir.join("sync/config.json").exists());
}
