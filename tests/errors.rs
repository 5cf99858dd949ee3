//! Bad input and missing prerequisites: one clear line naming the problem and
//! the fix, a non-zero exit, never a panic or a backtrace.
mod support;

use std::{net::TcpListener, process::Command};

use support::{observer_bin, run};

/// Runs observer with `args` (through `wrapper` if given) and returns its
/// exit code and stderr, after checking it failed without panicking.
fn fails(wrapper: &[&str], args: &[&str]) -> (i32, String) {
    let bin = observer_bin();
    let out = match wrapper.split_first() {
        Some((cmd, rest)) => run(Command::new(cmd).args(rest).arg(&bin).args(args)),
        None => run(Command::new(&bin).args(args)),
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "observer {args:?} succeeded; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "panic: {stderr}"
    );
    (out.status.code().unwrap_or(-1), stderr)
}

/// Our own errors are exactly one line starting with "error:".
fn one_error_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0]
}

#[test]
fn an_unknown_flag_is_rejected_with_usage() {
    let (code, stderr) = fails(&[], &["serve", "--no-such-flag"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}

#[test]
fn a_malformed_listen_address_names_the_flag() {
    let (code, stderr) = fails(&[], &["serve", "--web.listen-address", "localhost"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--web.listen-address"), "{stderr}");
}

#[test]
fn a_bad_listener_selector_names_the_forms_it_takes() {
    for bad in ["8000", "port:0", "port:9000-8000", "proto:tcp"] {
        let (code, stderr) = fails(&[], &["serve", "--collector.listeners.include", bad]);
        assert_eq!(code, 2, "{bad}: {stderr}");
        assert!(stderr.contains("--collector.listeners.include"), "{stderr}");
        assert!(stderr.contains(bad), "{bad}: {stderr}");
    }
    let (_, stderr) = fails(&[], &["serve", "--collector.listeners.exclude", "pid:1"]);
    assert!(stderr.contains("use port, addr, path or netns"), "{stderr}");
}

#[test]
fn a_telemetry_path_without_slash_is_refused() {
    let (_, stderr) = fails(
        &[],
        &[
            "serve",
            "--web.listen-address",
            "127.0.0.1:0",
            "--web.telemetry-path",
            "metrics",
        ],
    );
    assert!(
        one_error_line(&stderr).contains("--web.telemetry-path"),
        "{stderr}"
    );
}

#[test]
fn a_port_in_use_is_one_line_naming_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, stderr) = fails(&[], &["serve", "--web.listen-address", &addr]);
    assert_eq!(code, 1);
    let line = one_error_line(&stderr);
    assert!(
        line.contains(&addr) && line.contains("--web.listen-address"),
        "{line}"
    );
}

#[test]
fn missing_kernel_btf_names_the_kernel_option_needed() {
    let (code, stderr) = fails(
        &[],
        &[
            "serve",
            "--web.listen-address",
            "127.0.0.1:0",
            "--kernel.btf",
            "/nonexistent/vmlinux",
        ],
    );
    assert_eq!(code, 1);
    let line = one_error_line(&stderr);
    assert!(
        line.contains("CONFIG_DEBUG_INFO_BTF") && line.contains("/nonexistent/vmlinux"),
        "{line}"
    );
}

#[test]
fn without_privileges_the_error_names_the_missing_capabilities() {
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ];
    let (code, stderr) = fails(&nobody, &["serve", "--web.listen-address", "127.0.0.1:0"]);
    assert_eq!(code, 1);
    let line = one_error_line(&stderr);
    assert!(
        line.contains("CAP_BPF") && line.contains("CAP_PERFMON") && line.contains("root"),
        "{line}"
    );
}

/// Installs, in the child about to exec, a seccomp filter that fails
/// bpf(2) with EPERM, as a container runtime's default profile does.
fn deny_bpf_syscall(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // Classic BPF: load the arch; if not x86-64, allow; load the syscall
    // number; bpf → EPERM; anything else → allow.
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let filter = [
        libc::sock_filter {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 4,
        }, // ld arch
        libc::sock_filter {
            code: 0x15,
            jt: 0,
            jf: 3,
            k: AUDIT_ARCH_X86_64,
        },
        libc::sock_filter {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 0,
        }, // ld nr
        libc::sock_filter {
            code: 0x15,
            jt: 0,
            jf: 1,
            k: libc::SYS_bpf as u32,
        },
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x0005_0000 | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x7fff_0000,
        }, // allow
    ];
    // SAFETY: between fork and exec only async-signal-safe calls (prctl);
    // `filter` is a local array copied into the closure, alive for the call.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn under_a_seccomp_profile_that_blocks_bpf_serve_and_doctor_say_so() {
    let bin = observer_bin();
    let mut serve = Command::new(&bin);
    serve.args(["serve", "--web.listen-address", "127.0.0.1:0"]);
    deny_bpf_syscall(&mut serve);
    let out = run(&mut serve);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = one_error_line(&stderr);
    assert!(
        line.contains("seccomp profile blocks bpf()") && line.contains("seccomp=unconfined"),
        "{line}"
    );

    let mut doctor = Command::new(&bin);
    doctor.arg("doctor");
    deny_bpf_syscall(&mut doctor);
    let out = run(&mut doctor);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL seccomp") && l.contains("seccomp=unconfined")),
        "{stdout}"
    );
    // No line with an empty reason (a mark, a name and nothing else).
    for line in stdout
        .lines()
        .filter(|l| l.starts_with("ok") || l.starts_with("FAIL") || l.starts_with("warn"))
    {
        assert!(
            line.split_whitespace().count() > 2,
            "empty reason: {line:?}\n{stdout}"
        );
    }
}

#[test]
fn without_the_bpf_capability_doctor_names_it() {
    let no_bpf = [
        "setpriv",
        "--inh-caps=-bpf,-sys_admin",
        "--bounding-set=-bpf,-sys_admin",
    ];
    let bin = observer_bin();
    let out = run(Command::new(no_bpf[0])
        .args(&no_bpf[1..])
        .arg(&bin)
        .arg("doctor"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL privileges") && l.contains("missing CAP_BPF")),
        "{stdout}"
    );
}

#[test]
fn where_securityfs_cannot_be_mounted_doctor_says_lockdown_is_unknown_and_why() {
    // A container's view: no securityfs, and no CAP_SYS_ADMIN to mount it
    // (a private mount namespace, so the host's mount stays).
    let bin = observer_bin();
    let script = format!(
        "umount /sys/kernel/security && \
         setpriv --inh-caps=-sys_admin --bounding-set=-sys_admin {} doctor",
        bin.display()
    );
    let out =
        run(Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains(" lockdown "))
        .unwrap_or_else(|| {
            panic!(
                "no lockdown line:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        line.contains("unknown: securityfs is not mounted here and mounting it failed")
            && line.contains("/sys/kernel/security"),
        "{line}"
    );
}
