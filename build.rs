//! Link options for the `outpost` binary.
//!
//! On Linux with glibc, relative relocations are packed (`DT_RELR`, GNU ld ≥ 2.38 and
//! glibc ≥ 2.36, both in Debian 12): the loader then reads a few KiB of relocation bitmaps at
//! start instead of ~450 KiB of `.rela.dyn` entries, which is resident memory of every
//! running Outpost. Set `OUTPOST_NO_PACKED_RELOCS=1` when building for an older glibc.

fn main() {
    println!("cargo:rerun-if-env-changed=OUTPOST_NO_PACKED_RELOCS");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" && std::env::var_os("OUTPOST_NO_PACKED_RELOCS").is_none() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
