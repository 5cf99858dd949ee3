//! Builds the eBPF programs (observer-ebpf) with the nightly toolchain and
//! bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! `cargo xtask setup` installs both when they are missing.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args(["metadata", "--format-version=1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    let text = String::from_utf8(metadata.stdout).context("cargo metadata output")?;
    let root = text
        .split("\"manifest_path\":\"")
        .filter_map(|s| s.split('"').next())
        .find(|p| p.ends_with("observer-ebpf/Cargo.toml"))
        .and_then(|p| p.strip_suffix("/Cargo.toml"))
        .ok_or_else(|| anyhow!("observer-ebpf package not found in the workspace"))?
        .to_owned();
    let package = aya_build::Package {
        name: "observer-ebpf",
        root_dir: &root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "building the eBPF programs (observer-ebpf) failed: see the compiler output above; if \
         the nightly rust-src component or bpf-linker is missing, run `cargo xtask setup`",
    )
}
