//! The architectures observer's artifacts are built for: this machine's
//! own, or arm64 from an x86_64 machine with Debian's cross toolchain
//! (which setup installs when a task asks for arm64).
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, check, ensure_packages, output, workspace_root};

/// An architecture, by its Debian name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    #[value(alias = "x86_64")]
    Amd64,
    #[value(alias = "aarch64")]
    Arm64,
}

/// Debian packages that build and inspect arm64 binaries on an x86_64
/// machine: the cross linker and C library, and binutils for arm64 ELF.
const ARM64_CROSS_PACKAGES: &[&str] = &[
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "binutils-aarch64-linux-gnu",
];

impl Arch {
    /// The architecture of this machine (the one xtask was built for).
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }

    /// Its name in Debian (`dpkg --print-architecture`) and in OCI images.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    fn rust_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    fn gnu_triplet(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-linux-gnu",
            Arch::Arm64 => "aarch64-linux-gnu",
        }
    }

    pub fn is_host(self) -> bool {
        self == Arch::host()
    }

    /// What a name of an artifact or cache gains for this architecture:
    /// nothing for this machine's, `-arm64` for another
    /// (`observer:0.1.0-arm64`, `matrix-arm64.md`).
    pub fn suffix(self) -> String {
        if self.is_host() {
            String::new()
        } else {
            format!("-{}", self.debian())
        }
    }

    /// A binutils tool (`strip`, `objdump`, `readelf`) that reads this
    /// architecture's ELF files.
    pub fn tool(self, name: &str) -> String {
        if self.is_host() {
            name.to_owned()
        } else {
            format!("{}-{name}", self.gnu_triplet())
        }
    }

    /// Where `cargo xtask build --arch` leaves the release binary.
    pub fn release_binary(self) -> PathBuf {
        self.binary("release")
    }

    /// Where cargo leaves the binary of `profile` (release, debug) for
    /// this architecture.
    fn binary(self, profile: &str) -> PathBuf {
        let target = workspace_root().join("target");
        let dir = if self.is_host() {
            target
        } else {
            target.join(self.rust_target())
        };
        dir.join(profile).join("observer")
    }

    /// Installs what building for this architecture needs beyond setup's:
    /// for another architecture, Debian's cross toolchain and Rust's
    /// standard library for its target.
    pub fn ensure_toolchain(self) -> Result<()> {
        if self.is_host() {
            return Ok(());
        }
        if self != Arch::Arm64 || Arch::host() != Arch::Amd64 {
            bail!(
                "building for {} on {} is not set up: build on an {} machine, or for arm64 on amd64",
                self.debian(),
                Arch::host().debian(),
                self.debian()
            );
        }
        ensure_packages(ARM64_CROSS_PACKAGES)?;
        let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))
            .context("`rustup target list --installed` failed (is Rust installed with rustup?)")?;
        if !installed.lines().any(|l| l.trim() == self.rust_target()) {
            println!(
                "xtask: installing Rust's standard library for {}",
                self.rust_target()
            );
            check(
                Command::new("rustup").args(["target", "add", self.rust_target()]),
                &format!("`rustup target add {}`", self.rust_target()),
            )?;
        }
        Ok(())
    }

    /// Builds the release binary for this architecture (the eBPF programs
    /// with it: aya-build compiles them for the target's registers).
    pub fn build_release(self) -> Result<PathBuf> {
        self.ensure_toolchain()?;
        let mut args = vec!["build", "--release", "--package", "observer"];
        args.extend(self.cargo_target());
        cargo(&args)?;
        Ok(self.release_binary())
    }

    /// Builds the debug binary (what the end-to-end tests run) for this
    /// architecture.
    pub fn build_debug(self) -> Result<PathBuf> {
        self.ensure_toolchain()?;
        let mut args = vec!["build", "--package", "observer"];
        args.extend(self.cargo_target());
        cargo(&args)?;
        Ok(self.binary("debug"))
    }

    /// cargo's `--target` for this architecture (none for this machine's).
    pub fn cargo_target(self) -> Vec<&'static str> {
        if self.is_host() {
            Vec::new()
        } else {
            vec!["--target", self.rust_target()]
        }
    }

    /// The shared libraries `binary` loads, its dynamic loader included:
    /// each as (the file here, its path on a target system).
    pub fn libraries(self, binary: &Path) -> Result<Vec<(PathBuf, String)>> {
        if self.is_host() {
            let text = output(Command::new("ldd").arg(binary))
                .with_context(|| format!("ldd {}", binary.display()))?;
            return text
                .split_whitespace()
                .filter(|w| w.starts_with('/'))
                .map(|path| {
                    let real =
                        std::fs::canonicalize(path).with_context(|| format!("resolving {path}"))?;
                    Ok((real, path.to_owned()))
                })
                .collect();
        }
        self.cross_libraries(binary)
    }

    /// [`Arch::libraries`] without running the binary: its loader and the
    /// `NEEDED` entries of it and of each library, found in the cross C
    /// library (`/usr/<triplet>/lib`) and placed where Debian puts them.
    fn cross_libraries(self, binary: &Path) -> Result<Vec<(PathBuf, String)>> {
        let sysroot = PathBuf::from("/usr").join(self.gnu_triplet()).join("lib");
        let (interpreter, mut pending) = self.dynamic_section(binary)?;
        let interpreter = interpreter.context("the binary names no program interpreter")?;
        let loader_name = Path::new(&interpreter)
            .file_name()
            .context("the program interpreter's name")?;
        let mut found = vec![(sysroot.join(loader_name), interpreter.clone())];
        let mut seen: BTreeSet<String> = BTreeSet::from([loader_name.to_string_lossy().into()]);
        while let Some(name) = pending.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let here = sysroot.join(&name);
            if !here.exists() {
                bail!(
                    "{name}, which the binary needs, is not in {} (is {} installed?)",
                    sysroot.display(),
                    ARM64_CROSS_PACKAGES[1]
                );
            }
            pending.extend(self.dynamic_section(&here)?.1);
            let target = format!("/lib/{}/{name}", self.gnu_triplet());
            found.push((std::fs::canonicalize(&here)?, target));
        }
        Ok(found)
    }

    /// An ELF file's program interpreter and the libraries it needs.
    fn dynamic_section(self, elf: &Path) -> Result<(Option<String>, Vec<String>)> {
        let text = output(
            Command::new(self.tool("readelf"))
                .args(["--program-headers", "--dynamic", "--wide"])
                .arg(elf),
        )
        .with_context(|| format!("{} on {}", self.tool("readelf"), elf.display()))?;
        let between = |line: &str, start: &str| -> Option<String> {
            let rest = &line[line.find(start)? + start.len()..];
            Some(rest[..rest.find(']')?].to_owned())
        };
        let interpreter = text
            .lines()
            .find_map(|l| between(l, "[Requesting program interpreter: "));
        let needed = text
            .lines()
            .filter(|l| l.contains("(NEEDED)"))
            .filter_map(|l| between(l, "Shared library: ["))
            .collect();
        Ok((interpreter, needed))
    }
}
