//! `cargo xtask deb`: a Debian package of the release binary, made with
//! Debian's own `dpkg-deb` (the one the host's dpkg pins; no cargo-deb to
//! install). It holds what a node_exporter user gets from Debian: the
//! binary in /usr/bin, the systemd unit (deploy/systemd/observer.service,
//! pointed at /usr/bin; installed, not enabled), a man page made from every
//! command's `--help`, and the copyright file.
use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{arch::Arch, check, output, workspace_root};

const MAINTAINER: &str = "observer developers <observer@localhost>";

/// Builds `target/debian/observer_<version>_<arch>.deb` from the release
/// binary for `arch` (its man page from this machine's, which runs here)
/// and returns its path.
pub fn build(arch: Arch) -> Result<PathBuf> {
    let root = workspace_root();
    let binary = arch.release_binary();
    let host_binary = Arch::host().release_binary();
    let version = observer_version(&host_binary)?;
    let arch_name = arch.debian();
    let out_dir = root.join("target/debian");
    let stage = out_dir.join(format!("root-{arch_name}"));
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(&stage)?;

    let bin = stage.join("usr/bin/observer");
    fs::create_dir_all(parent(&bin)?)?;
    check(
        Command::new(arch.tool("strip"))
            .args(["--strip-unneeded", "-o"])
            .arg(&bin)
            .arg(&binary),
        "strip the observer binary",
    )?;
    write(
        &stage.join("lib/systemd/system/observer.service"),
        &unit(&fs::read_to_string(
            root.join("deploy/systemd/observer.service"),
        )?),
        0o644,
    )?;
    write_gzipped(
        &stage.join("usr/share/man/man1/observer.1.gz"),
        &man_page(&host_binary, &version)?,
    )?;
    write(
        &stage.join("usr/share/doc/observer/copyright"),
        COPYRIGHT,
        0o644,
    )?;
    for (name, text) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        write(&stage.join("DEBIAN").join(name), text, 0o755)?;
    }
    let installed_kib = du_kib(&stage)?;
    write(
        &stage.join("DEBIAN/control"),
        &control(
            &version,
            arch_name,
            &glibc_needed(arch, &binary)?,
            installed_kib,
        ),
        0o644,
    )?;

    let deb = out_dir.join(format!("observer_{version}_{arch_name}.deb"));
    check(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
        "dpkg-deb --build",
    )?;
    println!("xtask: built {}", deb.display());
    Ok(deb)
}

fn parent(path: &Path) -> Result<&Path> {
    path.parent()
        .with_context(|| format!("{} has no parent", path.display()))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    fs::create_dir_all(parent(path)?)?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// gzip -9n: no name or time stamp in the header, as Debian wants.
fn write_gzipped(path: &Path, text: &str) -> Result<()> {
    fs::create_dir_all(parent(path)?)?;
    let mut gzip = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting gzip")?;
    gzip.stdin
        .take()
        .context("gzip's stdin")?
        .write_all(text.as_bytes())?;
    let out = gzip.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed ({})", out.status);
    }
    fs::write(path, out.stdout)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// "observer 0.1.0" → "0.1.0".
fn observer_version(binary: &Path) -> Result<String> {
    let text = output(Command::new(binary).arg("--version"))
        .with_context(|| format!("{} --version (build it first)", binary.display()))?;
    text.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("unexpected --version output {text:?}"))
}

/// The newest GLIBC_x.y symbol version the binary needs.
fn glibc_needed(arch: Arch, binary: &Path) -> Result<String> {
    let symbols = output(Command::new(arch.tool("objdump")).arg("-T").arg(binary))
        .with_context(|| format!("{} -T on the observer binary", arch.tool("objdump")))?;
    let newest = symbols
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let (major, minor) = v.split_once('.')?;
            Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?))
        })
        .max()
        .context("the binary names no GLIBC symbol version")?;
    Ok(format!("{}.{}", newest.0, newest.1))
}

fn du_kib(dir: &Path) -> Result<u64> {
    let text = output(Command::new("du").args(["-sk"]).arg(dir)).context("du -sk")?;
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du -sk output")
}

fn control(version: &str, arch: &str, glibc: &str, installed_kib: u64) -> String {
    format!(
        "Package: observer\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\n\
         Depends: libc6 (>= {glibc}), libgcc-s1\n\
         Section: net\n\
         Priority: optional\n\
         Description: why requests wait before any worker sees them (eBPF)\n \
         observer measures, from the kernel, the listen (accept) queues of every\n \
         TCP and Unix-domain listening socket of the host and the worker\n \
         processes that accept from them: queue depth and limit, each\n \
         connection's wait in the queue, drops, busy and idle workers. It\n \
         serves them as Prometheus metrics (observer serve, the systemd unit\n \
         observer.service) and shows them at the command line (listeners,\n \
         trace, top, doctor). Nothing in the observed servers changes.\n"
    )
}

/// The repository's unit, with the binary where the package puts it.
fn unit(repo_unit: &str) -> String {
    repo_unit
        .lines()
        .filter(|l| !l.starts_with("# Install:") && !l.starts_with("# /etc/systemd/system/"))
        .map(|l| l.replace("/usr/local/bin/observer", "/usr/bin/observer"))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// A man page from `observer --help` and each command's `--help`.
fn man_page(binary: &Path, version: &str) -> Result<String> {
    let help = |args: &[&str]| -> Result<String> {
        output(Command::new(binary).args(args))
            .with_context(|| format!("observer {}", args.join(" ")))
    };
    let top = help(&["--help"])?;
    let commands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect();
    let mut page = format!(
        ".TH OBSERVER 1 \"\" \"observer {version}\" \"User Commands\"\n\
         .SH NAME\n\
         observer \\- why requests wait before any worker sees them\n\
         .SH SYNOPSIS\n\
         .B observer\n\
         [\\fIOPTIONS\\fR] \\fICOMMAND\\fR\n\
         .SH DESCRIPTION\n"
    );
    page.push_str(&preformatted(&top));
    for command in &commands {
        page.push_str(&format!(".SH \"OBSERVER {}\"\n", command.to_uppercase()));
        page.push_str(&preformatted(&help(&[command, "--help"])?));
    }
    page.push_str(
        ".SH FILES\n\
         .TP\n\
         .I /lib/systemd/system/observer.service\n\
         the daemon's unit (not enabled on install: \\fBsystemctl enable \\-\\-now observer\\fR)\n\
         .SH SEE ALSO\n\
         The project's README and its docs/ pages: metrics, rules, alerts and dashboard.\n",
    );
    Ok(page)
}

/// Text kept as printed, with roff's special characters escaped.
fn preformatted(text: &str) -> String {
    let mut out = String::from(".nf\n");
    for line in text.lines() {
        let escaped = line.replace('\\', "\\e");
        // A leading dot or quote would be read as a request.
        if escaped.starts_with('.') || escaped.starts_with('\'') {
            out.push_str("\\&");
        }
        out.push_str(&escaped);
        out.push('\n');
    }
    out.push_str(".fi\n");
    out
}

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: observer

Files: *
Copyright: The observer developers
License: MIT or Apache-2.0

License: MIT
 Permission is hereby granted, free of charge, to any person obtaining a copy
 of this software and associated documentation files (the \"Software\"), to deal
 in the Software without restriction, including without limitation the rights
 to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 copies of the Software, and to permit persons to whom the Software is
 furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in
 all copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN
 THE SOFTWARE.

License: Apache-2.0
 On Debian systems, the complete text of the Apache License, Version 2.0
 can be found in /usr/share/common-licenses/Apache-2.0.
";

/// Reloads systemd's units; the service is left for the operator to enable
/// (a privileged eBPF daemon starts when asked to).
const POSTINST: &str = "\
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
";

const PRERM: &str = "\
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ \"$1\" = remove ]; then
    systemctl stop observer.service >/dev/null 2>&1 || true
fi
";

const POSTRM: &str = "\
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
";
