//! Link options for the `outpost` binary.
//!
//! On Linux with glibc, relative relocations are packed (`DT_RELR`, GNU ld ≥ 2.38 and
//! glibc ≥ 2.36, both in Debian 12): the loader then reads a few KiB of relocation bitmaps at
//! start instead of ~450 KiB of `.rela.dyn` entries, which is resident memory of every
//! running Outpost. Set `NO_PACKED_RELOCS=1` when building for an older glibc.
//!
//! Release builds on Linux with glibc also place the functions that run while the server
//! starts and idles (listed in `link/hot-symbols.txt`, written by `bench/hot_symbols.py`)
//! together at the front of the code, in an output section `.text.hot`. The kernel maps a
//! binary's code into a process in whole page-cache folios, so code that start-up touches here
//! and there across 11 MB of text made ~9 MiB of it resident; packed together it is ~2.5 MiB.
//! This is a linker script with one `INSERT`, which GNU ld and lld read; gold and mold cannot,
//! so a build that asks for them in `RUSTFLAGS` links without it. Names that no longer exist
//! are ignored, so a stale list only costs memory. Set `NO_HOT_LAYOUT=1` to link without it.
//! (These switches are not `OUTPOST_*` variables: Outpost reads all of those as settings.)

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=NO_PACKED_RELOCS");
    println!("cargo:rerun-if-env-changed=OUTPOST_NO_PACKED_RELOCS");
    println!("cargo:rerun-if-env-changed=NO_HOT_LAYOUT");
    println!("cargo:rerun-if-changed=link/hot-symbols.txt");
    commit_id();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let linux_gnu = os == "linux" && env == "gnu";
    // The switch's old name still works: a binary built for an older glibc must not get
    // packed relocations because its builder kept the old variable.
    let old_name = std::env::var_os("OUTPOST_NO_PACKED_RELOCS").is_some();
    if old_name {
        println!(
            "cargo:warning=OUTPOST_NO_PACKED_RELOCS is now NO_PACKED_RELOCS (outpost serve refuses unknown OUTPOST_* variables)"
        );
    }
    if linux_gnu && std::env::var_os("NO_PACKED_RELOCS").is_none() && !old_name {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    if linux_gnu && release && std::env::var_os("NO_HOT_LAYOUT").is_none() {
        // gold and mold reject the linker script; leave it out when RUSTFLAGS choose them.
        let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
        match ["fuse-ld=gold", "fuse-ld=mold", "ld.gold", "ld.mold"]
            .iter()
            .find(|l| flags.contains(*l))
        {
            Some(l) => {
                println!(
                    "cargo:warning=RUSTFLAGS ask for {l}, which cannot read the hot-layout linker script; linking without it"
                );
            }
            None => hot_layout(),
        }
    }
}

/// `BUILT_FROM_COMMIT`: the commit the binary is built from (12 hex digits), or empty outside a
/// git checkout (a source tarball) or without git. The version every node shows and reports
/// to its parent carries it, so an operator can tell builds of one release apart. (Not an
/// `OUTPOST_*` name: `cargo test` sets it for the tests too, and their servers would refuse it.)
fn commit_id() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_default();
    // Built again when HEAD moves: a new commit on the branch changes the branch's ref (loose
    // or packed), a checkout changes HEAD. Only paths that exist are named: cargo would run a
    // build script with a missing one every time.
    if !commit.is_empty() {
        let branch = git(&["symbolic-ref", "-q", "HEAD"]);
        for what in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
            if let Some(p) = git(&["rev-parse", "--git-path", what])
                && std::path::Path::new(&p).exists()
            {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    }
    println!("cargo:rustc-env=BUILT_FROM_COMMIT={commit}");
}

/// `name` with `Cs<base62>_` and `B<base62>_` turned into `Cs*_` and `B*_`. Matching
/// more than the one symbol is harmless: it only moves another function next to the hot ones.
fn path_free(name: &str) -> String {
    let b = name.as_bytes();
    let mut out = String::with_capacity(name.len());
    let mut i = 0;
    while i < b.len() {
        let (lead, skip) = if b[i] == b'C' && b.get(i + 1) == Some(&b's') {
            ("Cs", 2)
        } else if b[i] == b'B' {
            ("B", 1)
        } else {
            out.push(b[i] as char);
            i += 1;
            continue;
        };
        let start = i + skip;
        let mut j = start;
        while j < b.len() && b[j].is_ascii_alphanumeric() {
            j += 1;
        }
        // `Cs` needs at least one character before its `_`; `B` may have none (`B_`).
        if j < b.len() && b[j] == b'_' && (lead == "B" || j > start) {
            out.push_str(lead);
            out.push_str("*_");
            i = j + 1;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Writes the linker script for `.text.hot` into `OUT_DIR` and passes it to the linker.
fn hot_layout() {
    let Ok(list) = std::fs::read_to_string("link/hot-symbols.txt") else {
        println!("cargo:warning=link/hot-symbols.txt is missing; linking without the hot layout");
        return;
    };
    let mut script = String::from("SECTIONS {\n  .text.hot : {\n");
    // Only plain symbol names: anything a linker script would read as a pattern or a token
    // (`*`, `?`, `[`, quotes, parentheses, spaces) is left out rather than escaped.
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'.'))
    };
    for name in list.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        if plain(name) {
            // A name listed as `NAME.llvm.*` stands for any `.llvm.<hash>` suffix: LLVM
            // derives that hash from the whole code unit, paths included, so it changes with
            // the checkout's directory and with any edit next to the function. `#[cold]`
            // functions (vector growth, hash-table rehash) are in `.text.unlikely.*`.
            // A Rust name listed up to its hash (`…17h`) stands for any hash: the list keeps
            // names that are unique without it that way, so they survive a new compiler.
            let name = match name.strip_suffix(".llvm.") {
                Some(base) => format!("{base}.llvm.*"),
                None if name.ends_with("17h") => format!("{name}*"),
                None => name.to_string(),
            };
            // A v0-mangled name (`_R…`) carries each crate's disambiguator (`Cs<hash>_`),
            // which for a workspace crate comes from its path: a checkout in another
            // directory would match none of our generic instances. Those parts, and the back
            // references whose offsets move with them (`B<offset>_`), match anything.
            let name = if name.starts_with("_R") {
                path_free(&name)
            } else {
                name
            };
            let _ = writeln!(script, "    *(.text.{name} .text.unlikely.{name})");
        }
    }
    script.push_str("  }\n} INSERT BEFORE .text;\n");
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return;
    };
    let path = out.join("hot-layout.ld");
    if let Err(e) = std::fs::write(&path, script) {
        println!(
            "cargo:warning=cannot write {}: {e}; linking without the hot layout",
            path.display()
        );
        return;
    }
    // Separate arguments, not `-Wl,-T,<path>`: the compiler driver splits that at commas.
    for arg in ["-Xlinker", "-T", "-Xlinker"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins={}", path.display());
}
