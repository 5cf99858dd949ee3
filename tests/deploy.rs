//! The systemd unit as shipped: its capability set is the least that works.
//! The daemon runs as an unprivileged user with exactly those capabilities
//! and reports a real gunicorn pool correctly; with any one of them removed it
//! refuses to start with one line naming it.
mod support;

use std::{
    io::Write as _,
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::{Metrics, free_port, http_get, observer_bin, run, ss_listen_queues};

fn unit_file() -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/observer.service"),
    )
    .expect("deploy/systemd/observer.service")
}

/// The capabilities the unit grants (AmbientCapabilities=), e.g. "CAP_BPF".
fn unit_capabilities() -> Vec<String> {
    unit_file()
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("AmbientCapabilities= in the unit")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `setpriv` arguments: user nobody, with exactly `caps` (ambient, so they
/// survive the exec of a non-root process).
fn as_nobody_with(caps: &[String]) -> Vec<String> {
    let set = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let set = if set.is_empty() {
        "-all".to_owned()
    } else {
        format!("-all,{set}")
    };
    ["--reuid=65534", "--regid=65534", "--clear-groups"]
        .iter()
        .map(|s| s.to_string())
        .chain([
            format!("--inh-caps={set}"),
            format!("--ambient-caps={set}"),
            format!("--bounding-set={set}"),
        ])
        .collect()
}

const APP: &str = "import time\ndef app(environ, start_response):\n    time.sleep(float(environ.get('QUERY_STRING') or 0))\n    start_response('200 OK', [])\n    return [b'ok']\n";

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let unit = unit_file().replace(
        "/usr/local/bin/observer",
        &observer_bin().display().to_string(),
    );
    let path = std::env::temp_dir().join(format!("observer-{}.service", std::process::id()));
    std::fs::write(&path, unit).expect("write unit");
    let out = run(Command::new("systemd-analyze").args(["verify", &path.display().to_string()]));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&path);
    let about_ours: Vec<&str> = said.lines().filter(|l| l.contains("observer-")).collect();
    assert!(
        out.status.success() && about_ours.is_empty(),
        "systemd-analyze verify: {about_ours:?}"
    );
}

#[test]
fn with_exactly_the_units_capabilities_an_unprivileged_daemon_reports_a_real_pool() {
    let caps = unit_capabilities();
    assert_eq!(caps.len(), 5, "{caps:?}");
    let dir = std::env::temp_dir().join(format!("observer-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("app.py"), APP).expect("app");
    let app_port = free_port();
    let mut gunicorn = Command::new("gunicorn")
        .args(["-w", "2", "-b", &format!("127.0.0.1:{app_port}"), "app:app"])
        .current_dir(&dir)
        .stderr(Stdio::null())
        .spawn()
        .expect("gunicorn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while ss_listen_queues(app_port).is_empty() {
        assert!(Instant::now() < deadline, "gunicorn did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let port = free_port();
    let mut daemon = Command::new("setpriv")
        .args(as_nobody_with(&caps))
        .arg(observer_bin())
        .args([
            "serve",
            "--web.listen-address",
            &format!("127.0.0.1:{port}"),
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("observer under setpriv");
    let scrape = || http_get(port, "/metrics").map(|t| Metrics::parse(&t));
    let pool = |m: &Metrics, state: &str| {
        m.get(
            "observer_workers",
            &[("port", &app_port.to_string()), ("state", state)],
        )
    };
    // No requests: both workers idle (the truth: nothing in flight).
    let deadline = Instant::now() + Duration::from_secs(20);
    let idle = loop {
        if let Some(m) = scrape()
            && pool(&m, "idle") == Some(2.0)
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "unprivileged daemon never showed 2 idle workers"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(pool(&idle, "busy"), Some(0.0));
    // One request in flight (1 s): exactly one busy.
    let mut client = TcpStream::connect(("127.0.0.1", app_port)).expect("connect");
    write!(client, "GET /?1 HTTP/1.0\r\n\r\n").expect("request");
    std::thread::sleep(Duration::from_millis(400));
    let busy = scrape().expect("scrape");
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = gunicorn.kill();
    let _ = gunicorn.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(pool(&busy, "busy"), Some(1.0), "{}", busy.text);
}

/// The unit's one optional capability: without it the daemon runs, and
/// only the drops of TCP_DEFER_ACCEPT listeners go unexported.
const OPTIONAL: &str = "CAP_SYSLOG";

#[test]
fn with_any_one_required_capability_fewer_the_daemon_names_it_and_refuses() {
    let caps = unit_capabilities();
    for dropped in caps.iter().filter(|c| *c != OPTIONAL) {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        let out = run(Command::new("setpriv")
            .args(as_nobody_with(&fewer))
            .arg(observer_bin())
            .args(["serve", "--web.listen-address", "127.0.0.1:0"]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(out.status.code(), Some(1), "without {dropped}: {stderr}");
        assert_eq!(lines.len(), 1, "without {dropped}, one line: {stderr}");
        assert!(
            lines[0].contains(dropped.as_str()),
            "without {dropped}: {stderr}"
        );
    }
}

/// `observer doctor` as the unit's user, with `caps`.
fn doctor_as_nobody_with(caps: &[String]) -> (Option<i32>, String) {
    let out = run(Command::new("setpriv")
        .args(as_nobody_with(caps))
        .arg(observer_bin())
        .arg("doctor"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn without_the_optional_capability_doctor_says_what_it_costs_and_serve_can_run() {
    let caps = unit_capabilities();
    assert!(caps.iter().any(|c| c == OPTIONAL), "{caps:?}");
    let (code, all) = doctor_as_nobody_with(&caps);
    assert_eq!(code, Some(0), "{all}");
    let line = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no {name} line:\n{text}"))
            .to_owned()
    };
    assert!(line(&all, "privileges").contains(OPTIONAL), "{all}");
    let fewer: Vec<String> = caps.iter().filter(|c| *c != OPTIONAL).cloned().collect();
    let (code, without) = doctor_as_nobody_with(&fewer);
    assert_eq!(code, Some(0), "serve can still run:\n{without}");
    assert!(
        line(&without, "privileges").contains(&format!("without {OPTIONAL}")),
        "{without}"
    );
    let drops = line(&without, "drops");
    assert!(
        drops.starts_with("warn") && drops.contains(OPTIONAL),
        "{without}"
    );
}

/// Runs `kubernetes-validate --strict` on `files`; every resource of
/// `kinds` (`kind/name`) must have passed.
fn validated_strictly(files: &[std::path::PathBuf], kinds: &[&str]) {
    let out = run(Command::new("kubernetes-validate")
        .arg("--strict")
        .args(files));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && !said.contains("ERROR"), "{said}");
    for kind in kinds {
        assert!(
            said.contains(&format!("passed for resource {kind}")),
            "{kind} not validated:\n{said}"
        );
    }
}

#[test]
fn the_kubernetes_manifests_validate_against_the_schemas() {
    let manifest =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/observer.yaml");
    validated_strictly(
        std::slice::from_ref(&manifest),
        &[
            "namespace/observer",
            "serviceaccount/observer",
            "daemonset/observer",
            "service/observer",
        ],
    );
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    assert!(text.contains("privileged: false") && !text.contains("privileged: true"));
}

/// The autoscaling recipe: the HPA and prometheus-adapter's rules against
/// Kubernetes' schemas, KEDA's ScaledObject against KEDA's own CRD (kept in
/// tests/fixtures), strictly: a field either schema does not define fails.
#[test]
fn the_autoscaling_manifests_validate_against_their_schemas() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/autoscaling");
    validated_strictly(
        &[
            dir.join("hpa.yaml"),
            dir.join("prometheus-adapter-rules.yaml"),
        ],
        &[
            "horizontalpodautoscaler/web",
            "configmap/prometheus-adapter-observer",
        ],
    );
    let crd = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/keda.sh_scaledobjects.yaml");
    let check = r#"
import sys, yaml, jsonschema
def strict(s):
    if isinstance(s, dict):
        if 'properties' in s and 'additionalProperties' not in s \
                and not s.get('x-kubernetes-preserve-unknown-fields'):
            s['additionalProperties'] = False
        for v in s.values():
            strict(v)
    elif isinstance(s, list):
        for v in s:
            strict(v)
    return s
crd = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d)
schema = next(v for v in crd['spec']['versions'] if v['name'] == 'v1alpha1')
doc = yaml.safe_load(open(sys.argv[2]))
assert doc['kind'] == 'ScaledObject', doc['kind']
jsonschema.validate(doc, strict(schema['schema']['openAPIV3Schema']))
print('valid')
"#;
    let out = run(Command::new("python3")
        .args(["-c", check])
        .arg(&crd)
        .arg(dir.join("keda-scaledobject.yaml")));
    assert!(
        out.status.success(),
        "the ScaledObject against KEDA's CRD: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn buildah(args: &[&str]) -> String {
    let out = run(Command::new("buildah")
        .arg("--storage-driver")
        .arg("vfs")
        .args(args));
    assert!(
        out.status.success(),
        "buildah {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn the_image_built_by_xtask_is_small_and_its_binary_runs_on_its_own_libraries() {
    let tag = concat!("observer:", env!("CARGO_PKG_VERSION"));
    let config = buildah(&[
        "inspect",
        "--type",
        "image",
        "--format",
        "{{.OCIv1.Config.Entrypoint}} {{.OCIv1.Config.Cmd}}",
        tag,
    ]);
    assert_eq!(
        config,
        "[/usr/local/bin/observer] [serve --web.listen-address=0.0.0.0:9688]"
    );
    // No container runtime can run here (the sandbox forbids its setrlimit
    // calls), so run the image's binary in its own root filesystem instead.
    let container = buildah(&["from", tag]);
    let root = buildah(&["mount", &container]);
    let out = run(Command::new("chroot")
        .arg(&root)
        .args(["/usr/local/bin/observer", "--version"]));
    let size_kib: u64 = run(Command::new("du").args(["-sk", &root]))
        .stdout
        .split(|b| b.is_ascii_whitespace())
        .next()
        .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
        .unwrap_or(u64::MAX);
    buildah(&["umount", &container]);
    buildah(&["rm", &container]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        concat!("observer ", env!("CARGO_PKG_VERSION"))
    );
    assert!(size_kib < 16 * 1024, "image root is {size_kib} KiB");
}
