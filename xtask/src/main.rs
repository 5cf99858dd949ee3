//! Project tasks: `cargo xtask setup | build | test | run`.
//!
//! Everything a fresh machine lacks is installed here, idempotently: the
//! nightly `rust-src` component and `bpf-linker` (to build the eBPF programs),
//! and the Debian packages the end-to-end tests drive (nginx, wrk, ss).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod arch;
mod bench;
mod daemon;
mod deb;
mod growth;
mod paced;
mod rootfs;
mod soak;
mod vm;

#[derive(Parser)]
#[command(name = "xtask", about = "Build, set up and test observer")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Set up, then build the release binary (target/release/observer;
    /// for another architecture, target/<rust target>/release/observer).
    Build {
        /// amd64 or arm64 (default: this machine's).
        #[arg(long, value_enum, default_value_t = arch::Arch::host())]
        arch: arch::Arch,
    },
    /// rustfmt check and clippy -D warnings on every crate (the eBPF crate on
    /// nightly for its own target).
    Lint,
    /// Set up, build, and run every test: unit tests and end-to-end tests
    /// against the real kernel and real servers (needs root).
    Test {
        /// Debian kernel series the VM stage boots with the accept-source
        /// tests (`none` skips it; `cargo xtask vm-test` runs the full matrix).
        #[arg(long = "vm-kernel", default_value = "6.12")]
        vm_kernel: String,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Measure what observing costs: served throughput, per-event kernel
    /// cost, untracked processes' syscalls, daemon CPU/RSS, growth; side by
    /// side with a bpftrace peer. Needs root; takes a few minutes.
    Bench(bench::BenchOptions),
    /// Fuzz the parsers observer owns (BTF, cgroup paths, web config,
    /// /proc/locks, durations) with cargo fuzz, each for a while.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Worker churn against a live daemon for minutes: memory must stay flat
    /// and counts exact (not part of `test`).
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
    },
    /// Boot Debian kernels under qemu and run the end-to-end tests inside,
    /// once per accept source each kernel supports; prints the matrix.
    VmTest(vm::VmOptions),
    /// Build the container image `observer:<version>` offline with buildah:
    /// the release binary and the libraries it links, on scratch
    /// (`observer:<version>-arm64` for arm64 from an amd64 machine).
    Image {
        /// amd64 or arm64 (default: this machine's).
        #[arg(long, value_enum, default_value_t = arch::Arch::host())]
        arch: arch::Arch,
    },
    /// Build the Debian package target/debian/observer_<version>_<arch>.deb:
    /// the release binary in /usr/bin, the systemd unit, a man page and the
    /// copyright file (with Debian's dpkg-deb).
    Deb {
        /// amd64 or arm64 (default: this machine's).
        #[arg(long, value_enum, default_value_t = arch::Arch::host())]
        arch: arch::Arch,
    },
    /// Set up, build, and run `observer serve` with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Debian packages the end-to-end tests drive (real servers, load
/// generators, ground truth).
const DEBIAN_PACKAGES: &[&str] = &[
    "nginx-light",
    "wrk",
    "iproute2",
    "util-linux",
    "procps",
    "curl",
    "bpftool",
    "gunicorn",
    "uwsgi-core",
    "uwsgi-plugin-python3",
    "php-fpm",
    "unicorn",
    "ruby-raindrops",
    "prometheus",
    "iptables",
    "tmux",
    "systemd",
    "buildah",
    "apache2-utils",
    "openssl",
    "liburing-dev",
    "apache2",
    "nodejs",
    "puma",
    // The image under a container runtime (tests/containers.rs): runc, as
    // crun refuses this host's hybrid cgroup layout.
    "podman",
    "runc",
    "conmon",
    // The Debian package's man page check (tests/package.rs).
    "man-db",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::Setup => setup(),
        Task::Build { arch } => {
            setup()?;
            arch.build_release().map(|_| ())
        }
        Task::Lint => {
            setup()?;
            lint()
        }
        Task::Test { vm_kernel, args } => test(&vm_kernel, &args),
        Task::Fuzz { seconds } => {
            setup()?;
            fuzz(seconds)
        }
        Task::Soak { minutes } => {
            setup()?;
            cargo(&["build", "--release", "--package", "observer"])?;
            soak::run(minutes, &workspace_root().join("target/release/observer"))
        }
        Task::Image { arch } => {
            setup()?;
            ensure_packages(&["buildah"])?;
            arch.build_release()?;
            image(arch)
        }
        Task::Deb { arch } => {
            setup()?;
            // The man page comes from this machine's binary (the same
            // `--help` on every architecture).
            arch::Arch::host().build_release()?;
            arch.build_release()?;
            deb::build(arch).map(|_| ())
        }
        Task::VmTest(opts) => {
            setup()?;
            ensure_packages(&vm::packages(opts.arch))?;
            let observer = opts.arch.build_debug()?;
            let binaries = test_binaries(opts.arch)?;
            vm::run(&opts, &binaries, &observer)
        }
        Task::Bench(opts) => {
            setup()?;
            ensure_packages(&["bpftrace", "hey"])?;
            cargo(&["build", "--release", "--package", "observer"])?;
            bench::run(&opts, &workspace_root().join("target/release/observer"))
        }
        Task::Run { args } => {
            setup()?;
            cargo(&["build", "--release", "--package", "observer"])?;
            let bin = workspace_root().join("target/release/observer");
            let mut full = vec!["serve".to_owned()];
            full.extend(args);
            println!("xtask: starting {} {}", bin.display(), full.join(" "));
            println!(
                "xtask: metrics at http://127.0.0.1:9688/metrics (unless --web.listen-address says otherwise); Ctrl-C stops"
            );
            check(Command::new(bin).args(full), "observer serve")
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn check(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    check(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .current_dir(workspace_root()),
        &format!("cargo {}", args.join(" ")),
    )
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_debian_packages()?;
    ensure_python_tools()
}

/// PyPI tools the tests use: the offline Kubernetes schema validator, and
/// uvicorn (an asyncio server with worker processes), each with the
/// command that says it is there.
const PYTHON_TOOLS: &[(&str, &[&str])] = &[
    ("kubernetes-validate", &["kubernetes-validate", "--version"]),
    ("uvicorn==0.30.6", &["python3", "-c", "import uvicorn"]),
];

fn ensure_python_tools() -> Result<()> {
    for (package, probe) in PYTHON_TOOLS {
        if output(Command::new(probe[0]).args(&probe[1..])).is_some() {
            continue;
        }
        println!("xtask: installing {package} from PyPI");
        check(
            Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--root-user-action=ignore",
                package,
            ]),
            &format!("`python3 -m pip install {package}`"),
        )?;
    }
    Ok(())
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))
        .context("no nightly Rust toolchain: install it with `rustup toolchain install nightly` (the eBPF programs build with nightly)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    println!("xtask: installing rust-src for the nightly toolchain");
    check(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        "`rustup component add rust-src --toolchain nightly`",
    )
}

/// bpf-linker built against the nightly toolchain's own LLVM shared library,
/// so that no system LLVM is needed.
fn ensure_bpf_linker() -> Result<()> {
    if output(Command::new("bpf-linker").arg("--version")).is_some() {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("`rustc +nightly --print sysroot` failed")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .find_map(|n| {
            n.strip_prefix("lib")
                .and_then(|n| n.strip_suffix(".so"))
                .filter(|n| n.starts_with("LLVM"))
                .map(str::to_owned)
        })
        .with_context(|| {
            format!(
                "no libLLVM*.so in {}: the nightly toolchain lacks its LLVM library",
                lib.display()
            )
        })?;
    let major = llvm
        .trim_start_matches("LLVM-")
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or_default()
        .to_owned();
    println!("xtask: building bpf-linker {BPF_LINKER_VERSION} against {llvm} (about a minute)");
    let rustflags = format!(
        "-L {0} -C link-arg=-l{llvm} -C link-arg=-Wl,-rpath,{0}",
        lib.display()
    );
    check(
        Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major},no-llvm-linking"),
            ])
            .env("RUSTFLAGS", rustflags),
        "building bpf-linker (see the cargo output above; it needs crates.io)",
    )
}

fn is_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.ends_with("install ok installed"))
}

fn ensure_debian_packages() -> Result<()> {
    ensure_packages(DEBIAN_PACKAGES)
}

fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing Debian packages: {}", missing.join(" "));
    check(
        Command::new("apt-get").args(["update", "-qq"]),
        "`apt-get update` (run setup as root)",
    )?;
    check(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("`apt-get install {}`", missing.join(" ")),
    )
}

/// The image tag `cargo xtask image` builds for this machine's
/// architecture; another architecture's gets its name as a suffix.
const IMAGE: &str = concat!("observer:", env!("CARGO_PKG_VERSION"));

fn image_tag(arch: arch::Arch) -> String {
    format!("{IMAGE}{}", arch.suffix())
}

/// Stages target/image/<arch>/root (binary + the shared libraries it
/// loads) and builds deploy/container/Containerfile from it.
fn image(arch: arch::Arch) -> Result<()> {
    let root = workspace_root();
    let binary = arch.release_binary();
    let context = root.join("target/image").join(arch.debian());
    let _ = std::fs::remove_dir_all(&context);
    let stage = |from: &Path, to: &str| -> Result<()> {
        let dest = context.join("root").join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().context("staged path has a parent")?)?;
        std::fs::copy(from, &dest).with_context(|| format!("staging {}", from.display()))?;
        Ok(())
    };
    stage(&binary, "/usr/local/bin/observer")?;
    for (here, there) in arch.libraries(&binary)? {
        stage(&here, &there)?;
    }
    std::fs::copy(
        root.join("deploy/container/Containerfile"),
        context.join("Containerfile"),
    )?;
    check(
        Command::new("buildah")
            .args(["--storage-driver", "vfs", "bud", "--quiet"])
            .args(["--os", "linux", "--arch", arch.debian()])
            .args(["-f", "Containerfile", "-t", &image_tag(arch), "."])
            .current_dir(&context),
        "buildah bud",
    )?;
    println!("xtask: built image {}", image_tag(arch));
    Ok(())
}

const FUZZ_TARGETS: &[&str] = &["btf", "cgroup", "web_config", "proc_locks"];

/// Runs every fuzz target for `seconds` (installing cargo-fuzz if missing).
fn fuzz(seconds: u64) -> Result<()> {
    if output(Command::new("cargo").args(["+nightly", "fuzz", "--version"])).is_none() {
        println!("xtask: installing cargo-fuzz from crates.io (a few minutes, once)");
        check(
            Command::new("cargo").args(["+nightly", "install", "cargo-fuzz", "--locked"]),
            "`cargo +nightly install cargo-fuzz`",
        )?;
    }
    for target in FUZZ_TARGETS {
        println!("xtask: fuzzing {target} for {seconds} s");
        check(
            Command::new("cargo")
                .args([
                    "+nightly",
                    "fuzz",
                    "run",
                    target,
                    "--",
                    &format!("-max_total_time={seconds}"),
                ])
                .current_dir(workspace_root().join("fuzz")),
            &format!("fuzz target {target} (a crash input is saved under fuzz/artifacts/{target})"),
        )?;
    }
    Ok(())
}

fn lint() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "observer-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    check(
        Command::new("cargo")
            .args([
                "+nightly",
                "clippy",
                "--package",
                "observer-ebpf",
                "--release",
            ])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(workspace_root()),
        "clippy on observer-ebpf",
    )
}

fn test(vm_kernel: &str, args: &[String]) -> Result<()> {
    setup()?;
    lint()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!(
            "the end-to-end tests load eBPF programs and start servers: run `cargo xtask test` as root"
        );
    }
    cargo(&["build", "--package", "observer"])?;
    // The image too (release build), so that the tests can inspect it.
    cargo(&["build", "--release", "--package", "observer"])?;
    image(arch::Arch::host())?;
    deb::build(arch::Arch::host())?;
    // arm64's too, cross-built, for the package tests to inspect.
    if arch::Arch::host() == arch::Arch::Amd64 {
        arch::Arch::Arm64.build_release()?;
        image(arch::Arch::Arm64)?;
        deb::build(arch::Arch::Arm64)?;
    }
    let bin = workspace_root().join("target/debug/observer");
    // Unit tests run in parallel; end-to-end tests one at a time, so that one
    // test's load does not skew another's timings.
    cargo(&[
        "test",
        "--package",
        "observer",
        "--package",
        "observer-common",
    ])?;
    let mut e2e = vec![
        "test",
        "--package",
        "observer-tests",
        "--",
        "--test-threads=1",
    ];
    e2e.extend(args.iter().map(String::as_str));
    check(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(&e2e)
            .env("OBSERVER_BIN", &bin)
            .current_dir(workspace_root()),
        "end-to-end tests",
    )?;
    // Busy/idle as kernels before 5.18 read it: the worker tests again,
    // with the /proc sampler in place of the BPF one.
    if args.is_empty() {
        check(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "test",
                    "--package",
                    "observer-tests",
                    "--test",
                    "workers",
                    "--",
                    "--test-threads=1",
                ])
                .env("OBSERVER_BIN", &bin)
                .env("OBSERVER_THREAD_SAMPLER", "proc")
                .current_dir(workspace_root()),
            "worker tests with the /proc thread sampler",
        )?;
    }
    // The same figures on another kernel, where fexit and kprobe load too.
    if vm_kernel != "none" {
        ensure_packages(&vm::packages(arch::Arch::host()))?;
        vm::run(
            &vm::VmOptions::one_kernel(vm_kernel),
            &test_binaries(arch::Arch::host())?,
            &bin,
        )?;
        // arm64 too, emulated: the reduced set (`cargo xtask vm-test --arch
        // arm64` runs the full one).
        if arch::Arch::host() == arch::Arch::Amd64 {
            let arm64 = arch::Arch::Arm64;
            ensure_packages(&vm::packages(arm64))?;
            let observer = arm64.build_debug()?;
            vm::run(
                &vm::VmOptions::arm64_reduced(vm_kernel),
                &test_binaries(arm64)?,
                &observer,
            )?;
        }
    }
    // The parsers we own, briefly (cargo xtask fuzz runs longer).
    fuzz(10)
}

/// Builds the end-to-end test binaries and returns them by test name.
fn test_binaries(arch: arch::Arch) -> Result<std::collections::BTreeMap<String, PathBuf>> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "test",
            "--package",
            "observer-tests",
            "--no-run",
            "--message-format=json",
        ])
        .args(arch.cargo_target())
        .current_dir(workspace_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the end-to-end tests failed");
    }
    let mut binaries = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(name), Some(executable)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            binaries.insert(name.to_owned(), PathBuf::from(executable));
        }
    }
    Ok(binaries)
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
