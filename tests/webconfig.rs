//! `--web.config.file`: TLS and basic auth, checked with real tools: openssl
//! makes the certificate, htpasswd the bcrypt hash, curl is the client.
mod support;

use std::process::{Command, Stdio};

use support::{free_port, observer_bin, run};

struct Setup {
    dir: std::path::PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup() -> Setup {
    let dir = std::env::temp_dir().join(format!("observer-web-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let openssl = run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args([
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.crt",
        ])
        .current_dir(&dir));
    assert!(
        openssl.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&openssl.stderr)
    );
    let htpasswd = run(Command::new("htpasswd").args(["-nbBC", "10", "alice", "s3cret"]));
    let line = String::from_utf8_lossy(&htpasswd.stdout).trim().to_owned();
    let hash = line.strip_prefix("alice:").expect("htpasswd line");
    std::fs::write(
        dir.join("web.yml"),
        format!("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\nbasic_auth_users:\n  alice: '{hash}'\n"),
    )
    .expect("web.yml");
    Setup { dir }
}

/// curl's HTTP status for `url` (000 when no HTTP response came back).
fn curl(setup: &Setup, url: &str, user: Option<&str>) -> String {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
        "--cacert",
    ])
    .arg(setup.dir.join("server.crt"));
    if let Some(u) = user {
        cmd.args(["-u", u]);
    }
    String::from_utf8_lossy(&run(cmd.arg(url)).stdout).into_owned()
}

#[test]
fn tls_and_basic_auth_admit_only_the_right_client() {
    let setup = setup();
    let port = free_port();
    let mut daemon = Command::new(observer_bin())
        .args([
            "serve",
            "--web.listen-address",
            &format!("127.0.0.1:{port}"),
            "--web.config.file",
        ])
        .arg(setup.dir.join("web.yml"))
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("observer");
    let https = format!("https://127.0.0.1:{port}/metrics");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while curl(&setup, &https, Some("alice:s3cret")) != "200" {
        assert!(
            std::time::Instant::now() < deadline,
            "never served https with the right password"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let wrong = curl(&setup, &https, Some("alice:wrong"));
    let anonymous = curl(&setup, &https, None);
    let unknown = curl(&setup, &https, Some("mallory:s3cret"));
    let plain = curl(
        &setup,
        &format!("http://127.0.0.1:{port}/metrics"),
        Some("alice:s3cret"),
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert_eq!(
        (wrong.as_str(), anonymous.as_str(), unknown.as_str()),
        ("401", "401", "401")
    );
    assert_ne!(plain, "200", "plain HTTP must not be served on a TLS port");
}

#[test]
fn a_broken_web_config_is_one_error_line() {
    let setup = setup();
    std::fs::write(
        setup.dir.join("bad.yml"),
        "tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n",
    )
    .expect("bad");
    let out = run(Command::new(observer_bin())
        .args([
            "serve",
            "--web.listen-address",
            "127.0.0.1:0",
            "--web.config.file",
        ])
        .arg(setup.dir.join("bad.yml")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--web.config.file") && stderr.contains("missing.crt"),
        "{stderr}"
    );
}
