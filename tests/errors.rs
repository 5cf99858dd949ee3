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
