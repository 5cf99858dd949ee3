//! The arm64 guest's root filesystem: Debian (this machine's release) for
//! arm64 with the servers and tools the end-to-end tests drive, made once
//! with mmdebstrap under target/vm/arm64/root. Its packages' maintainer
//! scripts run under qemu-user, which binfmt_misc hands arm64 programs to.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{check, workspace_root};

/// Host packages that make the root: mmdebstrap, its foreign-architecture
/// check, and qemu-user for the arm64 programs that run while it is made.
pub const PACKAGES: &[&str] = &["mmdebstrap", "arch-test", "qemu-user-static"];

/// What the guest runs: the servers and truths of the tests the arm64
/// stage runs (ss and ip, gunicorn, nginx, bpftool, promtool, a C compiler
/// and liburing for the io_uring acceptor), and busybox for the initramfs.
const GUEST_PACKAGES: &[&str] = &[
    "iproute2",
    "prometheus",
    "procps",
    "python3",
    "gunicorn",
    "nginx-light",
    "bpftool",
    "gcc",
    "libc6-dev",
    "liburing-dev",
    "busybox-static",
    "kmod",
    "util-linux",
];

/// The arm64 root, made if it is not there yet (a few minutes, once).
pub fn arm64() -> Result<PathBuf> {
    let dir = workspace_root().join("target/vm/arm64");
    let root = dir.join("root");
    let stamp = root.join(".observer-packages");
    let wanted = GUEST_PACKAGES.join(",");
    if std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(root);
    }
    register_binfmt()?;
    let release = crate::vm::host_release()?;
    let partial = dir.join("root.partial");
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&dir)?;
    println!("xtask: making the arm64 guest's root with mmdebstrap (a few minutes, once)");
    check(
        Command::new("mmdebstrap")
            .args(["--arch=arm64", "--variant=minbase", "--quiet"])
            .arg(format!("--include={wanted}"))
            .arg(&release)
            .arg(&partial)
            .arg("http://deb.debian.org/debian"),
        "mmdebstrap of the arm64 root (see its output above)",
    )?;
    std::fs::rename(&partial, &root)?;
    std::fs::write(&stamp, &wanted)?;
    Ok(root)
}

/// Registers qemu-user for arm64 programs with binfmt_misc (mounting it
/// where it is not), as the qemu-user-static package describes.
fn register_binfmt() -> Result<()> {
    let binfmt = std::path::Path::new("/proc/sys/fs/binfmt_misc");
    if !binfmt.join("register").exists() {
        check(
            Command::new("mount")
                .args(["-t", "binfmt_misc", "binfmt_misc"])
                .arg(binfmt),
            "mounting binfmt_misc (arm64 programs run under qemu-user while the root is made)",
        )?;
    }
    if binfmt.join("qemu-aarch64").exists() {
        return Ok(());
    }
    let rule = std::fs::read_to_string("/usr/lib/binfmt.d/qemu-aarch64.conf")
        .context("reading qemu-user-static's /usr/lib/binfmt.d/qemu-aarch64.conf")?;
    if let Err(e) = std::fs::write(binfmt.join("register"), rule.trim()) {
        bail!("registering qemu-aarch64 with binfmt_misc failed: {e}");
    }
    Ok(())
}
