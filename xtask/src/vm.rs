//! `cargo xtask vm-test`: the end-to-end tests on other kernels, under qemu.
//!
//! For each `--kernel` series (6.1, 6.12, …) the harness:
//! 1. downloads Debian's newest `linux-image-<series>.*-<arch>` package with
//!    apt and unpacks it under `target/vm/kernels/` (cached);
//! 2. builds a tiny initramfs (busybox-static, the guest kernel's virtio,
//!    9p and overlay modules, and an init script);
//! 3. boots it under qemu (software emulation by default). The init script
//!    mounts the guest's root filesystem read-only over virtio-9p with a
//!    tmpfs overlay on top, and `target/vm/out/<release>/` read-write for
//!    results. On this machine's arch the guest's root is this machine's
//!    own, so the guest runs the very binaries, servers and test
//!    executables of the host. For arm64 (`--arch arm64` on amd64) it is an
//!    arm64 Debian root made once with mmdebstrap (`rootfs.rs`), with the
//!    workspace mounted read-only at its own path for the cross-built
//!    observer and test executables;
//! 4. inside, as root: `observer doctor`, then each test binary once per
//!    accept source that doctor says loads, forced through
//!    `OBSERVER_ACCEPT_SOURCE`; then powers off;
//! 5. reads the results back and prints one line per kernel × source (and
//!    writes `target/vm/matrix.md`, or `matrix-arm64.md` for an arm64
//!    guest on amd64: the tables docs/kernels.md shows).
use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{arch::Arch, check, output, rootfs, workspace_root};

/// Host packages the harness needs for a guest of `arch`.
pub fn packages(arch: Arch) -> Vec<&'static str> {
    let mut packages = vec!["busybox-static", "kmod", "xz-utils"];
    match arch {
        Arch::Amd64 => packages.push("qemu-system-x86"),
        Arch::Arm64 => packages.extend(["qemu-system-arm"].iter().chain(rootfs::PACKAGES)),
    }
    packages
}

/// The accept sources, best first (as `--accept-source=auto` tries them).
const SOURCES: &[&str] = &["fexit", "kprobe", "tracepoint"];

/// Modules the init script loads (with their dependencies) before it can
/// mount the host's root; built-in ones are skipped.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

#[derive(Clone, Debug, clap::Args)]
pub struct VmOptions {
    /// Debian kernel series to boot, repeatable: 6.1, 6.12, …
    #[arg(long = "kernel", required = true)]
    pub kernels: Vec<String>,
    /// End-to-end test binaries run once per accept source (comma-separated);
    /// `binary:filter` runs only the binary's tests whose names contain
    /// `filter`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "listen_queue,unix_listeners"
    )]
    pub tests: Vec<String>,
    /// Test binaries run once, with the accept source left to the test.
    #[arg(long, value_delimiter = ',', default_value = "accept_sources")]
    pub once: Vec<String>,
    /// Runs of each test binary (more to hunt flaky results).
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 3072)]
    pub memory_mib: u32,
    /// How qemu runs the guest: software emulation works everywhere; KVM is
    /// faster where the host really offers it (here /dev/kvm opens, but a
    /// nested guest hangs in its first instructions).
    #[arg(long, value_enum, default_value = "tcg")]
    pub accel: Accel,
    /// Give up on a guest after this many seconds.
    #[arg(long, default_value_t = 1500)]
    pub timeout_secs: u64,
    /// The guest's architecture: this machine's, or arm64 from amd64
    /// (emulated; the test executables cross-built).
    #[arg(long, value_enum, default_value_t = Arch::host())]
    pub arch: Arch,
}

impl VmOptions {
    /// The defaults, for one kernel (what `cargo xtask test` runs).
    pub fn one_kernel(series: &str) -> Self {
        Self::parse(&["--kernel", series])
    }

    /// What `cargo xtask test` runs on emulated arm64: doctor, the listener
    /// tests under the source `auto` picks, and one gunicorn worker test
    /// (busy = its semaphore, the pool's pids, exact accepts).
    pub fn arm64_reduced(series: &str) -> Self {
        Self::parse(&[
            "--arch",
            "arm64",
            "--kernel",
            series,
            "--tests",
            "",
            "--once",
            "listen_queue,workers:gunicorn_workers_whose_children",
        ])
    }

    fn parse(args: &[&str]) -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            opts: VmOptions,
        }
        let args = std::iter::once("vm-test").chain(args.iter().copied());
        <Defaults as clap::Parser>::parse_from(args).opts
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Accel {
    Tcg,
    Kvm,
}

/// A Debian kernel package, unpacked under target/vm/kernels/<package>.
struct Kernel {
    package: String,
    dir: PathBuf,
    /// `uname -r` of the guest, e.g. 6.1.0-50-amd64.
    release: String,
    vmlinuz: PathBuf,
    /// lib/modules/<release> of the unpacked package.
    modules: PathBuf,
}

impl Kernel {
    /// Where `package` is (or will be) unpacked.
    fn named(package: &str) -> Self {
        let dir = workspace_root().join("target/vm/kernels").join(package);
        let release = package.trim_start_matches("linux-image-").to_owned();
        Kernel {
            package: package.to_owned(),
            vmlinuz: dir.join("boot").join(format!("vmlinuz-{release}")),
            modules: dir.join("lib/modules").join(&release),
            dir,
            release,
        }
    }

    fn is_unpacked(&self) -> bool {
        self.modules.join("modules.dep").exists()
    }
}

/// One test binary's outcome under one accept source.
#[derive(Debug, Default)]
struct Outcome {
    passed: Vec<String>,
    failed: Vec<String>,
    /// The binary ran to completion (printed its `test result:` line).
    finished: bool,
}

pub fn run(opts: &VmOptions, binaries: &BTreeMap<String, PathBuf>, observer: &Path) -> Result<()> {
    // `--once ''` (or `--tests ''`) runs none.
    let mut opts = opts.clone();
    opts.tests.retain(|t| !t.is_empty());
    opts.once.retain(|t| !t.is_empty());
    let opts = &opts;
    for test in opts.tests.iter().chain(&opts.once) {
        let (name, _) = binary_and_filter(test);
        ensure!(
            binaries.contains_key(name),
            "no end-to-end test binary named {name}"
        );
    }
    // The guests run copies, so that rebuilding meanwhile cannot change them.
    let (binaries, observer) = snapshot_binaries(binaries, observer)?;
    let mut rows = Vec::new();
    let mut failures = 0;
    let guest_root = if opts.arch.is_host() {
        PathBuf::from("/")
    } else {
        rootfs::arm64()?
    };
    for series in &opts.kernels {
        let kernel = fetch_kernel(series, opts.arch)?;
        let out = workspace_root().join("target/vm/out").join(&kernel.release);
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let initramfs = build_initramfs(&kernel, &guest_root)?;
        std::fs::write(
            out.join("guest.sh"),
            guest_script(opts, &kernel, &binaries, &observer),
        )?;
        let started = Instant::now();
        boot(opts, &kernel, &initramfs, &guest_root, &out)?;
        println!(
            "xtask: {} ran its tests in {:.0} s",
            kernel.release,
            started.elapsed().as_secs_f64()
        );
        let (kernel_rows, kernel_failures) = read_results(opts, &kernel, &out)?;
        rows.extend(kernel_rows);
        failures += kernel_failures;
    }
    let table = matrix_table(&rows);
    println!("\n{table}");
    let matrix = workspace_root().join(format!("target/vm/matrix{}.md", opts.arch.suffix()));
    std::fs::write(&matrix, &table)?;
    println!("xtask: matrix written to {}", matrix.display());
    if failures > 0 {
        bail!("{failures} test binary run(s) failed in the VMs (logs under target/vm/out/)");
    }
    Ok(())
}

/// Copies the observer binary and the test binaries to target/vm/bin.
fn snapshot_binaries(
    binaries: &BTreeMap<String, PathBuf>,
    observer: &Path,
) -> Result<(BTreeMap<String, PathBuf>, PathBuf)> {
    let dir = workspace_root().join("target/vm/bin");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let copy = |from: &Path, name: &str| -> Result<PathBuf> {
        let to = dir.join(name);
        std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
        Ok(to)
    };
    let copies = binaries
        .iter()
        .map(|(name, path)| Ok((name.clone(), copy(path, name)?)))
        .collect::<Result<_>>()?;
    Ok((copies, copy(observer, "observer")?))
}

/// The newest `linux-image-<series>.…-<arch>` Debian offers (not cloud, rt,
/// unsigned or dbg), downloaded and unpacked once.
fn fetch_kernel(series: &str, arch: Arch) -> Result<Kernel> {
    let apt = Apt::for_kernel(series, arch)?;
    let cached = newest_kernel_package(&apt, series, arch)
        .ok()
        .map(|name| Kernel::named(&name));
    if let Some(cached) = cached.filter(Kernel::is_unpacked) {
        return Ok(cached);
    }
    // Not cached: refresh the lists first, so that the name is one the
    // mirror still serves.
    check(
        apt.command("apt-get").args(["update", "-qq"]),
        "`apt-get update`",
    )?;
    let kernel = Kernel::named(&newest_kernel_package(&apt, series, arch)?);
    if !kernel.is_unpacked() {
        download_kernel(&apt, &kernel)?;
    }
    Ok(kernel)
}

/// Debian releases whose kernels the host's apt lists lack: the series, and
/// the suites that carry its newest package (the release and its security
/// updates).
const OLDER_RELEASES: [(&str, &str, &str); 1] = [("5.10", "bullseye", "bullseye-security")];

/// apt as the host has it, or with lists of its own for an older Debian
/// release's kernels or another architecture's (under
/// target/vm/apt/<release>[-<arch>]): the host's sources and architectures
/// stay as they are.
struct Apt {
    options: Vec<String>,
}

impl Apt {
    fn for_kernel(series: &str, arch: Arch) -> Result<Apt> {
        let older = OLDER_RELEASES.iter().find(|(s, _, _)| *s == series);
        let (release, security) = match older {
            Some((_, release, security)) => (release.to_string(), security.to_string()),
            None if arch.is_host() => {
                return Ok(Apt {
                    options: Vec::new(),
                });
            }
            None => {
                let release = host_release()?;
                let security = format!("{release}-security");
                (release, security)
            }
        };
        let dir = crate::workspace_root()
            .join("target/vm/apt")
            .join(format!("{release}{}", arch.suffix()));
        std::fs::create_dir_all(dir.join("lists/partial"))?;
        std::fs::create_dir_all(dir.join("cache/archives/partial"))?;
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        std::fs::write(
            dir.join("sources.list"),
            format!(
                "deb [signed-by={keyring}] http://deb.debian.org/debian {release} main\n\
                 deb [signed-by={keyring}] http://deb.debian.org/debian {release}-updates main\n\
                 deb [signed-by={keyring}] http://deb.debian.org/debian-security {security} main\n"
            ),
        )?;
        let at = |name: &str| dir.join(name).display().to_string();
        Ok(Apt {
            options: vec![
                format!("-oDir::Etc::SourceList={}", at("sources.list")),
                "-oDir::Etc::SourceParts=/nonexistent".into(),
                format!("-oDir::State::Lists={}", at("lists")),
                format!("-oDir::Cache={}", at("cache")),
                format!("-oAPT::Architecture={}", arch.debian()),
                format!("-oAPT::Architectures={}", arch.debian()),
            ],
        })
    }

    /// `program` (apt-get, apt-cache) with these lists.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.args(&self.options);
        command
    }
}

/// This machine's Debian release (`VERSION_CODENAME`, e.g. bookworm).
pub fn host_release() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .context("/etc/os-release names no VERSION_CODENAME (is this Debian?)")
}

fn newest_kernel_package(apt: &Apt, series: &str, arch: Arch) -> Result<String> {
    let names = output(apt.command("apt-cache").args(["pkgnames", "linux-image-"]))
        .context("apt-cache pkgnames failed")?;
    let prefix = format!("linux-image-{series}.");
    let suffix = format!("-{}", arch.debian());
    let mut candidates: Vec<&str> = names
        .lines()
        .filter(|n| n.starts_with(&prefix) && n.ends_with(&suffix))
        .filter(|n| {
            !["cloud", "-rt-", "unsigned", "dbg"]
                .iter()
                .any(|x| n.contains(x))
        })
        .collect();
    candidates.sort_by_key(|n| version_key(n));
    candidates
        .last()
        .map(|n| n.to_string())
        .with_context(|| format!("Debian offers no {prefix}*{suffix} package"))
}

/// apt-get download, unpack, depmod.
fn download_kernel(apt: &Apt, kernel: &Kernel) -> Result<()> {
    let (package, dir) = (&kernel.package, &kernel.dir);
    println!("xtask: downloading {package}");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    check(
        apt.command("apt-get")
            .args(["download", package])
            .current_dir(dir),
        &format!("apt-get download {package}"),
    )?;
    let deb = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    check(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir),
        "dpkg-deb -x",
    )?;
    std::fs::remove_file(&deb)?;
    check(
        Command::new("depmod")
            .arg("-b")
            .arg(dir)
            .arg(&kernel.release),
        "depmod",
    )
}

/// Numeric parts of a package name, for "newest" ordering (6.12.9 < 6.12.10).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok())
        .collect()
}

/// `BOOT_MODULES` and their dependencies, in load order, as paths relative
/// to the modules directory (from modules.dep, whose dependency lists put the
/// deepest last).
fn boot_modules(modules_dep: &str) -> Vec<String> {
    let deps: BTreeMap<String, Vec<String>> = modules_dep
        .lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((
                module.to_owned(),
                deps.split_whitespace().map(str::to_owned).collect(),
            ))
        })
        .collect();
    let module_name = |path: &str| {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for wanted in BOOT_MODULES {
        // Not in modules.dep: built into this kernel.
        let Some((path, path_deps)) = deps.iter().find(|(p, _)| module_name(p) == *wanted) else {
            continue;
        };
        for module in path_deps.iter().rev().chain([path]) {
            if seen.insert(module.clone()) {
                order.push(module.clone());
            }
        }
    }
    order
}

/// target/vm/initramfs-<release>.cpio: busybox, the boot modules
/// (decompressed), /init and /dev/console.
fn build_initramfs(kernel: &Kernel, guest_root: &Path) -> Result<PathBuf> {
    let path = workspace_root().join(format!("target/vm/initramfs-{}.cpio", kernel.release));
    let dep = std::fs::read_to_string(kernel.modules.join("modules.dep"))?;
    let mut cpio = Cpio::default();
    for dir in [
        "bin", "dev", "proc", "sys", "lower", "rw", "newroot", "modules",
    ] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    let busybox_path = guest_root.join("bin/busybox");
    let busybox = std::fs::read(&busybox_path)
        .with_context(|| format!("reading {} (busybox-static)", busybox_path.display()))?;
    cpio.file("bin/busybox", 0o755, &busybox);
    let mut order = String::new();
    for (i, module) in boot_modules(&dep).iter().enumerate() {
        let source = kernel.modules.join(module);
        let bytes = if module.ends_with(".xz") {
            let out = Command::new("xz").arg("-dc").arg(&source).output()?;
            ensure!(out.status.success(), "xz -d {} failed", source.display());
            out.stdout
        } else {
            std::fs::read(&source).with_context(|| format!("reading {}", source.display()))?
        };
        let name = format!("{i:02}.ko");
        cpio.file(&format!("modules/{name}"), 0o644, &bytes);
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file("modules/order", 0o644, order.as_bytes());
    cpio.file("init", 0o755, INIT.as_bytes());
    std::fs::write(&path, cpio.finish()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The initramfs' /init: load the boot modules, put the guest's root (ro,
/// 9p) under a tmpfs overlay, mount the results share and, where the
/// command line names one (`observer.workspace=`), the workspace at that
/// path, and hand over to /vmout/guest.sh in the new root. Any failure
/// powers the guest off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
fail() { echo "vm-init: $*"; echo o > /proc/sysrq-trigger; sleep 10; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/modules/$m" || echo "vm-init: insmod $m failed"; done < /modules/order
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower || fail "mounting the host root over 9p"
mount -t tmpfs -o size=60% tmpfs /rw || fail "tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "overlay"
mkdir -p /newroot/vmout
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 vmout /newroot/vmout || fail "mounting vmout"
ws=$(sed -n 's/.*observer\.workspace=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$ws" ]; then
  mkdir -p "/newroot$ws"
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose workspace "/newroot$ws" || fail "mounting the workspace"
fi
for d in proc sys dev; do mount --move /$d /newroot/$d; done
exec switch_root /newroot /bin/sh /vmout/guest.sh
"#;

/// What the guest runs as root once it is in the host's filesystem.
fn guest_script(
    opts: &VmOptions,
    kernel: &Kernel,
    binaries: &BTreeMap<String, PathBuf>,
    observer: &Path,
) -> String {
    let root = workspace_root();
    let mut script = format!(
        r#"set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
export OBSERVER_BIN={observer} RUST_BACKTRACE=1
# /tmp stays the overlay's (writes land in its tmpfs): a fresh tmpfs there
# would hide a checkout under /tmp. /run gets its own.
mount -t tmpfs tmpfs /run
# POSIX semaphores and shared memory (Python's multiprocessing, in gunicorn hooks).
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mkdir -p /lib/modules/{release} && mount --bind {modules} /lib/modules/{release}
ip link set lo up
cd {root}
echo "vm: $(uname -r) up"
{observer} doctor > /vmout/doctor.txt 2>&1; echo "exit $?" >> /vmout/doctor.txt
cat /vmout/doctor.txt
run() {{ # <results file> <binary> <test name filter> [env assignments…]
  out=$1; bin=$2; filter=$3; shift 3
  echo "vm: $out"
  env "$@" "$bin" --test-threads=1 --show-output "$filter" > "/vmout/$out" 2>&1; echo "exit $?" >> "/vmout/$out"
  grep -E '^test result|FAILED|panicked' "/vmout/$out"
}}
"#,
        observer = observer.display(),
        release = kernel.release,
        modules = kernel.modules.display(),
        root = root.display(),
    );
    // Each run of each test binary, results in /vmout/<prefix>.<test>.<i>.txt.
    let runs = |prefix: &str, tests: &[String], env: &str| {
        let mut lines = String::new();
        for test in tests {
            for i in 1..=opts.repeat {
                let (name, filter) = binary_and_filter(test);
                let binary = binaries[name].display();
                let _ = writeln!(
                    lines,
                    "  run {prefix}.{test}.{i}.txt {binary} '{filter}' {env}"
                );
            }
        }
        lines
    };
    for source in SOURCES {
        script.push_str(&format!(
            "if grep -q '^ok   {source} ' /vmout/doctor.txt; then\n  :\n"
        ));
        script.push_str(&runs(
            source,
            &opts.tests,
            &format!("OBSERVER_ACCEPT_SOURCE={source}"),
        ));
        script.push_str("fi\n");
    }
    script.push_str(&runs("auto", &opts.once, ""));
    script.push_str("sync\necho 'vm: done'\necho o > /proc/sysrq-trigger\nsleep 30\n");
    script
}

/// Boots the kernel and waits for it to power off, with the console in
/// `out/console.log`.
fn boot(
    opts: &VmOptions,
    kernel: &Kernel,
    initramfs: &Path,
    guest_root: &Path,
    out: &Path,
) -> Result<()> {
    let console = std::fs::File::create(out.join("console.log"))?;
    println!(
        "xtask: booting {} under qemu (console: {})",
        kernel.release,
        out.join("console.log").display()
    );
    let virtfs = |path: &Path, tag: &str, ro: bool| {
        format!(
            "local,path={},mount_tag={tag},security_model=none,multidevs=remap{}",
            path.display(),
            if ro { ",readonly=on" } else { "" }
        )
    };
    let machine = Machine::of(opts.arch, opts.accel)?;
    let mut append = format!(
        "console={} rdinit=/init panic=-1 quiet loglevel=3 mitigations=off",
        machine.console
    );
    let mut qemu = Command::new(machine.qemu);
    qemu.args(&machine.args)
        .args(["-smp", "2", "-m", &opts.memory_mib.to_string()])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-virtfs", &virtfs(guest_root, "hostroot", true)])
        .args(["-virtfs", &virtfs(out, "vmout", false)]);
    if guest_root != Path::new("/") {
        // The guest's root is not this machine's: the workspace (observer,
        // the test executables, the kernel's modules) at its own path.
        let workspace = workspace_root();
        let _ = write!(append, " observer.workspace={}", workspace.display());
        qemu.args(["-virtfs", &virtfs(&workspace, "workspace", true)]);
    }
    let mut qemu = qemu
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .with_context(|| format!("starting {}", machine.qemu))?;
    let deadline = Instant::now() + Duration::from_secs(opts.timeout_secs);
    loop {
        if let Some(status) = qemu.try_wait()? {
            ensure!(
                status.success(),
                "qemu exited with {status} (see console.log)"
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            let _ = qemu.wait();
            bail!(
                "{} did not finish within {} s (see {})",
                kernel.release,
                opts.timeout_secs,
                out.join("console.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// How qemu emulates a guest of one architecture.
struct Machine {
    qemu: &'static str,
    args: Vec<&'static str>,
    /// The guest's serial console device.
    console: &'static str,
}

impl Machine {
    fn of(arch: Arch, accel: Accel) -> Result<Machine> {
        Ok(match (arch, accel) {
            (Arch::Amd64, Accel::Tcg) => Machine {
                qemu: "qemu-system-x86_64",
                args: vec!["-accel", "tcg,thread=multi", "-cpu", "max"],
                console: "ttyS0",
            },
            (Arch::Amd64, Accel::Kvm) => Machine {
                qemu: "qemu-system-x86_64",
                args: vec!["-accel", "kvm", "-cpu", "host,-arch-capabilities"],
                console: "ttyS0",
            },
            // The `virt` board; `max` with the cheaper pointer
            // authentication algorithm, which emulates much faster.
            (Arch::Arm64, Accel::Tcg) => Machine {
                qemu: "qemu-system-aarch64",
                args: vec![
                    "-machine",
                    "virt",
                    "-accel",
                    "tcg,thread=multi",
                    "-cpu",
                    "max,pauth-impdef=on",
                ],
                console: "ttyAMA0",
            },
            (Arch::Arm64, Accel::Kvm) if Arch::host() != Arch::Arm64 => {
                bail!(
                    "--accel kvm runs a guest of this machine's arch only: use --accel tcg for arm64"
                )
            }
            (Arch::Arm64, Accel::Kvm) => Machine {
                qemu: "qemu-system-aarch64",
                args: vec!["-machine", "virt", "-accel", "kvm", "-cpu", "host"],
                console: "ttyAMA0",
            },
        })
    }
}

/// One row of the matrix.
struct Row {
    kernel: String,
    source: String,
    result: String,
}

/// Reads every results file of one kernel; returns its matrix rows and the
/// number of failed runs.
fn read_results(opts: &VmOptions, kernel: &Kernel, out: &Path) -> Result<(Vec<Row>, usize)> {
    let doctor = std::fs::read_to_string(out.join("doctor.txt")).with_context(|| {
        format!(
            "{} wrote no doctor.txt: the guest did not get to run (see {})",
            kernel.release,
            out.join("console.log").display()
        )
    })?;
    let mut rows = Vec::new();
    let mut failures = 0;
    // Every run of `test` under `prefix` (a source, or auto), merged.
    let outcome_of = |prefix: &str, test: &str| {
        let mut merged = Outcome {
            finished: true,
            ..Outcome::default()
        };
        for i in 1..=opts.repeat {
            let file = out.join(format!("{prefix}.{test}.{i}.txt"));
            let one = parse_outcome(&std::fs::read_to_string(file).unwrap_or_default());
            merged.passed.extend(one.passed);
            merged.failed.extend(one.failed);
            merged.finished &= one.finished;
        }
        merged
    };
    let mut report = |source: &str, tests: &[String]| -> Result<String> {
        let mut cells = Vec::new();
        for test in tests {
            let outcome = outcome_of(source, test);
            let ok = outcome.finished && outcome.failed.is_empty();
            if !ok {
                failures += 1;
            }
            println!(
                "xtask: {} {source:<10} {test:<15} {} passed, {} failed{}",
                kernel.release,
                outcome.passed.len(),
                outcome.failed.len(),
                if outcome.finished {
                    String::new()
                } else {
                    " (did not finish)".into()
                }
            );
            for name in &outcome.failed {
                println!("xtask:     FAILED {name}");
            }
            cells.push(format!(
                "{test} {}/{}{}",
                outcome.passed.len(),
                outcome.passed.len() + outcome.failed.len(),
                if ok { "" } else { " FAIL" }
            ));
        }
        Ok(cells.join(", "))
    };
    for source in SOURCES {
        let line = doctor
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(source))
            .unwrap_or("");
        let result = if line.starts_with("ok") {
            let results = report(source, &opts.tests)?;
            if results.is_empty() {
                "loads".to_owned()
            } else {
                format!("loads; {results}")
            }
        } else {
            let why = line
                .split_whitespace()
                .skip(2)
                .collect::<Vec<_>>()
                .join(" ");
            format!("refused: {}", why.split(" — ").next().unwrap_or(&why))
        };
        rows.push(Row {
            kernel: kernel.release.clone(),
            source: source.to_string(),
            result,
        });
    }
    if !opts.once.is_empty() {
        let auto_source = doctor
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("programs"))
            .find_map(|l| l.split("accept source ").nth(1)?.split(',').next())
            .unwrap_or("?")
            .to_owned();
        rows.push(Row {
            kernel: kernel.release.clone(),
            source: format!("auto → {auto_source}"),
            result: report("auto", &opts.once)?,
        });
    }
    Ok((rows, failures))
}

/// `binary[:filter]`: the test binary, and the filter on its tests' names
/// (empty: all of them).
fn binary_and_filter(test: &str) -> (&str, &str) {
    test.split_once(':').unwrap_or((test, ""))
}

/// Test names that passed and failed in libtest's plain output.
/// Which tests of one binary's libtest output passed and failed. A test
/// that prints (the guest runs them with `--nocapture`) splits its
/// "test name ... ok" line in two, so the closing `successes:` and
/// `failures:` lists of names count too.
fn parse_outcome(text: &str) -> Outcome {
    let mut passed = std::collections::BTreeSet::new();
    let mut failed = std::collections::BTreeSet::new();
    let mut finished = false;
    // In a closing list: Some(true) successes, Some(false) failures.
    let mut list: Option<bool> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("test ") {
            if let Some(name) = rest.strip_suffix(" ... ok") {
                passed.insert(name.to_owned());
            } else if let Some(name) = rest.strip_suffix(" ... FAILED") {
                failed.insert(name.to_owned());
            }
        }
        finished |= line.starts_with("test result: ");
        match line {
            "successes:" => list = Some(true),
            "failures:" => list = Some(false),
            "" => list = None,
            _ => {
                let name = line.strip_prefix("    ").filter(|n| {
                    !n.is_empty()
                        && n.chars()
                            .all(|c| c.is_alphanumeric() || c == '_' || c == ':')
                });
                match (list, name) {
                    (Some(true), Some(name)) => passed.insert(name.to_owned()),
                    (Some(false), Some(name)) => failed.insert(name.to_owned()),
                    _ => false,
                };
            }
        }
    }
    Outcome {
        passed: passed.into_iter().collect(),
        failed: failed.into_iter().collect(),
        finished,
    }
}

fn matrix_table(rows: &[Row]) -> String {
    let mut table =
        String::from("| kernel | accept source | result (tests passed/run) |\n|---|---|---|\n");
    for row in rows {
        let _ = writeln!(
            table,
            "| {} | {} | {} |",
            row.kernel, row.source, row.result
        );
    }
    table
}

/// A newc ("070701") cpio archive, enough for an initramfs.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let _ = write!(self.bytes, "070701");
        for field in fields {
            let _ = write!(self.bytes, "{field:08x}");
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_modules_come_after_their_dependencies_and_built_ins_are_skipped() {
        let dep = "kernel/fs/netfs/netfs.ko.xz:\n\
                   kernel/net/9p/9pnet.ko.xz: kernel/fs/netfs/netfs.ko.xz\n\
                   kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n\
                   kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n\
                   kernel/fs/overlayfs/overlay.ko.xz:\n";
        assert_eq!(
            boot_modules(dep),
            [
                "kernel/fs/netfs/netfs.ko.xz",
                "kernel/net/9p/9pnet.ko.xz",
                "kernel/net/9p/9pnet_virtio.ko.xz",
                "kernel/fs/9p/9p.ko.xz",
                "kernel/fs/overlayfs/overlay.ko.xz",
            ]
        );
    }

    #[test]
    fn one_kernel_takes_the_command_line_defaults() {
        let opts = VmOptions::one_kernel("6.12");
        assert_eq!(opts.kernels, ["6.12"]);
        assert_eq!(opts.tests, ["listen_queue", "unix_listeners"]);
        assert_eq!(opts.once, ["accept_sources"]);
    }

    #[test]
    fn the_guest_runs_each_test_per_loading_source_and_the_others_once() {
        let kernel = Kernel {
            package: "linux-image-6.12.1".into(),
            dir: "/d".into(),
            release: "6.12.1".into(),
            vmlinuz: "/k".into(),
            modules: "/m".into(),
        };
        let binaries = BTreeMap::from([
            ("listen_queue".to_owned(), PathBuf::from("/b/lq")),
            ("unix_listeners".to_owned(), PathBuf::from("/b/ul")),
            ("accept_sources".to_owned(), PathBuf::from("/b/as")),
        ]);
        let script = guest_script(
            &VmOptions::one_kernel("6.12"),
            &kernel,
            &binaries,
            Path::new("/b/observer"),
        );
        assert!(script.contains(
            "if grep -q '^ok   kprobe ' /vmout/doctor.txt; then\n  :\n  \
             run kprobe.listen_queue.1.txt /b/lq '' OBSERVER_ACCEPT_SOURCE=kprobe\n  \
             run kprobe.unix_listeners.1.txt /b/ul '' OBSERVER_ACCEPT_SOURCE=kprobe\nfi\n"
        ));
        assert_eq!(
            script
                .matches("run auto.accept_sources.1.txt /b/as")
                .count(),
            1
        );
        assert!(script.contains("mount --bind /m /lib/modules/6.12.1"));
        let mut filtered = VmOptions::one_kernel("6.12");
        filtered.once = vec!["accept_sources:fexit".into()];
        let script = guest_script(&filtered, &kernel, &binaries, Path::new("/b/observer"));
        assert!(script.contains("run auto.accept_sources:fexit.1.txt /b/as 'fexit' \n"));
    }

    #[test]
    fn newest_kernel_package_sorts_numerically() {
        let mut names = [
            "linux-image-6.12.9+deb12-amd64",
            "linux-image-6.12.10+deb12-amd64",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names[1], "linux-image-6.12.10+deb12-amd64");
    }

    #[test]
    fn tests_that_print_are_read_from_the_closing_lists() {
        let outcome = parse_outcome(
            "running 2 tests\ntest a ... printed\nok\ntest b ... more\nFAILED\n\n\
             successes:\n    a\n\nfailures:\n\n---- b stdout ----\n   0: x::y\n\n\
             failures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed\n",
        );
        assert_eq!(outcome.passed, ["a"]);
        assert_eq!(outcome.failed, ["b"]);
        assert!(outcome.finished);
    }

    #[test]
    fn libtest_output_is_read_test_by_test() {
        let outcome = parse_outcome(
            "running 2 tests\ntest a ... ok\ntest b ... FAILED\n\ntest result: FAILED. 1 passed; 1 failed\n",
        );
        assert_eq!(outcome.passed, ["a"]);
        assert_eq!(outcome.failed, ["b"]);
        assert!(outcome.finished);
    }
}
