//! The image under a real container runtime (podman with runc), with the
//! DaemonSet's settings read from deploy/kubernetes/observer.yaml, observing
//! a gunicorn that runs in a real container of its own: its listener shows
//! up with its network namespace and the runtime's container id, and depth,
//! accepts and busy workers match `ss` inside that namespace, the clients
//! and gunicorn's own semaphore. A host listener is checked too.
//!
//! The server's root filesystem is the host's /usr and /etc, bind-mounted
//! read-only under a directory of its own (no image can be pulled here).
mod support;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use support::{
    GUNICORN_HOOKS, Metrics, WSGI_APP, in_netns, listen, run, run_ok, ss_listen_queues, until,
};

const IMAGE: &str = concat!("localhost/observer:", env!("CARGO_PKG_VERSION"));
const SERVER_PORT: u16 = 8000;

/// `podman` on the storage that `cargo xtask image` (buildah) wrote.
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--storage-driver", "vfs"]);
    cmd
}

/// What every container here runs with: runc (crun refuses this host's
/// hybrid cgroup layout), and ulimits within the sandbox's hard limits.
fn runtime_flags() -> Vec<String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    let nofile = limit.rlim_max.min(1 << 20);
    vec![
        "--runtime".into(),
        "runc".into(),
        "--ulimit".into(),
        format!("nofile={nofile}:{nofile}"),
        "--ulimit".into(),
        "nproc=32768:32768".into(),
    ]
}

/// A running container, removed on drop.
struct Container {
    id: String,
}

impl Container {
    fn run(flags: &[String], command: &[&str]) -> Container {
        let id = run_ok(
            podman()
                .args(["run", "-d"])
                .args(runtime_flags())
                .args(flags)
                .args(command),
        );
        assert!(
            id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "podman run -d printed {id:?}"
        );
        Container { id }
    }

    /// Its first process, as the host sees it.
    fn pid(&self) -> u32 {
        run_ok(podman().args(["inspect", "-f", "{{.State.Pid}}", &self.id]))
            .parse()
            .expect("pid")
    }

    fn logs(&self) -> String {
        let out = run(podman().args(["logs", &self.id]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "-t", "0", &self.id]).output();
    }
}

/// The host's /usr and /etc, read-only, as a container's root filesystem.
struct HostRootfs {
    dir: PathBuf,
}

impl HostRootfs {
    fn new() -> HostRootfs {
        let dir = PathBuf::from(format!("/var/tmp/observer-rootfs-{}", std::process::id()));
        for sub in ["usr", "etc", "proc", "sys", "dev", "tmp", "run", "app"] {
            std::fs::create_dir_all(dir.join(sub)).expect("rootfs dir");
        }
        for link in ["bin", "lib", "lib64", "sbin"] {
            let _ = std::os::unix::fs::symlink(format!("usr/{link}"), dir.join(link));
        }
        for sub in ["usr", "etc"] {
            run_ok(
                Command::new("mount")
                    .args(["--bind", "-o", "ro", &format!("/{sub}")])
                    .arg(dir.join(sub)),
            );
        }
        HostRootfs { dir }
    }
}

impl Drop for HostRootfs {
    fn drop(&mut self) {
        for sub in ["usr", "etc"] {
            let _ = Command::new("umount").arg(self.dir.join(sub)).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The observer container's flags, from the DaemonSet's manifest: each
/// setting the manifest makes is turned into podman's flag, and the test
/// fails if one is no longer there (so the two cannot drift).
fn daemonset_flags() -> (Vec<String>, Vec<String>) {
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/observer.yaml"),
    )
    .expect("deploy/kubernetes/observer.yaml");
    let has = |line: &str| manifest.lines().any(|l| l.trim() == line);
    let mut flags = Vec::new();
    assert!(has("hostPID: true"), "the DaemonSet no longer says hostPID");
    flags.push("--pid=host".to_owned());
    let caps = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: ["))
        .and_then(|l| l.strip_suffix(']'))
        .expect("capabilities add: [...] in the DaemonSet");
    flags.push("--cap-drop=ALL".to_owned());
    for cap in caps.split(',') {
        flags.push(format!("--cap-add=CAP_{}", cap.trim().trim_matches('"')));
    }
    assert!(has(r#"drop: ["ALL"]"#), "capabilities drop ALL");
    assert!(has("readOnlyRootFilesystem: true"));
    flags.push("--read-only".to_owned());
    assert!(has("allowPrivilegeEscalation: false"));
    flags.push("--security-opt=no-new-privileges".to_owned());
    assert!(has("type: Unconfined"), "seccompProfile Unconfined");
    flags.push("--security-opt=seccomp=unconfined".to_owned());
    assert!(has("memory: 256Mi"), "the memory limit");
    flags.push("--memory=256m".to_owned());
    // Every hostPath volume, mounted where the manifest mounts it.
    let mounts: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("mountPath: "))
        .collect();
    let host_paths: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("path: "))
        .filter(|p| p.starts_with("/sys/"))
        .collect();
    assert_eq!(mounts, host_paths, "each volume mounted at its host path");
    assert!(mounts.contains(&"/sys/kernel/tracing"), "{mounts:?}");
    for path in mounts {
        flags.push(format!("--volume={path}:{path}:ro"));
    }
    // Its own network namespace (the pod's): no hostNetwork.
    assert!(!has("hostNetwork: true"));
    flags.push("--network=none".to_owned());
    // The container's arguments, in order.
    let args: Vec<String> = manifest
        .lines()
        .skip_while(|l| l.trim() != "args:")
        .skip(1)
        .take_while(|l| l.trim_start().starts_with('-') || l.trim_start().starts_with('#'))
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(str::to_owned)
        .collect();
    assert_eq!(args.first().map(String::as_str), Some("serve"), "{args:?}");
    (flags, args)
}

/// GET /metrics from inside the observer container's network namespace.
fn scrape_in(pid: u32) -> Option<Metrics> {
    let out = run(Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n"])
        .args([
            "curl",
            "-sf",
            "--max-time",
            "10",
            "http://127.0.0.1:9688/metrics",
        ]));
    out.status
        .success()
        .then(|| Metrics::parse(&String::from_utf8_lossy(&out.stdout)))
}

fn netns_inode(pid: u32) -> String {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("netns link");
    let text = link.to_string_lossy();
    text.trim_start_matches("net:[")
        .trim_end_matches(']')
        .to_owned()
}

/// Recv-Q of the listener on `port`, per `ss` in `pid`'s network namespace.
fn ss_depth_in(pid: u32, port: u16) -> f64 {
    let out = run_ok(
        Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-n"])
            .args(["ss", "-Hltn", &format!("sport = :{port}")]),
    );
    out.split_whitespace()
        .nth(1)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listener on {port}: {out:?}"))
}

/// One HTTP/1.0 request for a reply delayed by `sleep_s`, from inside
/// `pid`'s network namespace; returns whether it got a 200.
fn request_in(pid: u32, sleep_s: f64) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let stream = in_netns(format!("/proc/{pid}/ns/net"), || {
            TcpStream::connect(("127.0.0.1", SERVER_PORT))
        });
        let Ok(mut s) = stream else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
        let _ = write!(s, "GET /?{sleep_s} HTTP/1.0\r\n\r\n");
        let mut reply = String::new();
        s.read_to_string(&mut reply).is_ok() && reply.contains(" 200 ")
    })
}

#[test]
fn the_image_under_podman_with_the_daemonsets_settings_sees_a_containerised_gunicorn_and_the_host()
{
    assert!(
        !run_ok(podman().args(["images", "-q", IMAGE])).is_empty(),
        "no image {IMAGE}: run `cargo xtask image` (cargo xtask test builds it)"
    );
    // The server: gunicorn, 2 sync workers, in a container of its own.
    let rootfs = HostRootfs::new();
    let app = tempdir("app");
    std::fs::write(app.join("app.py"), WSGI_APP).expect("app.py");
    std::fs::write(app.join("hooks.py"), GUNICORN_HOOKS).expect("hooks.py");
    std::fs::write(app.join("busy"), "0").expect("busy");
    let server = Container::run(
        &[
            "--network=none".into(),
            format!("--volume={}:/app", app.display()),
            "--workdir=/app".into(),
            "--env=BUSY_FILE=/app/busy".into(),
            // A boolean flag: the root filesystem is the first argument.
            "--rootfs".into(),
        ],
        &[
            &rootfs.dir.display().to_string(),
            "python3",
            "-m",
            "gunicorn",
            "-c",
            "hooks.py",
            "-w",
            "2",
            "-b",
            &format!("0.0.0.0:{SERVER_PORT}"),
            "--backlog",
            "64",
            "app:app",
        ],
    );
    let server_pid = server.pid();
    let server_netns = netns_inode(server_pid);
    until("gunicorn to listen in its container", 30, || {
        let out = run(Command::new("nsenter")
            .args(["-t", &server_pid.to_string(), "-n"])
            .args(["ss", "-Hltn", &format!("sport = :{SERVER_PORT}")]));
        (!out.stdout.is_empty()).then_some(())
    });

    // A host listener with two connections queued.
    let host = listen("127.0.0.1:0".parse().expect("addr"), 8);
    let host_port = host.local_addr().expect("addr").port();
    let _queued: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", host_port)).expect("connect"))
        .collect();

    // The observer, with the DaemonSet's settings.
    let (flags, args) = daemonset_flags();
    let mut command = vec![IMAGE];
    command.extend(args.iter().map(String::as_str));
    let observer = Container::run(&flags, &command);
    let observer_pid = observer.pid();
    let first = until("observer's first /metrics in its container", 60, || {
        scrape_in(observer_pid)
    });
    assert!(
        first.text.contains("observer_build_info"),
        "{}\n{}",
        first.text,
        observer.logs()
    );

    // The kernel lockdown mode, from the host's securityfs the manifest mounts.
    let host_lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown")
        .ok()
        .and_then(|t| Some(t[t.find('[')? + 1..t.find(']')?].to_owned()))
        .unwrap_or_else(|| "none".into());
    assert_eq!(
        first.get("observer_build_info", &[("lockdown", &host_lockdown)]),
        Some(1.0),
        "lockdown in the container vs the host's {host_lockdown}:\n{}",
        first.text
    );

    // The host listener: depth = ss.
    let m = scrape_in(observer_pid).expect("scrape");
    assert_eq!(ss_listen_queues(host_port), vec![(2, 8)]);
    assert_eq!(
        m.get(
            "observer_listen_queue_length",
            &[("port", &host_port.to_string())]
        ),
        Some(2.0),
        "host listener depth vs ss (2):\n{}",
        observer.logs()
    );

    // The server's listener: in its netns, with podman's container id.
    let port = SERVER_PORT.to_string();
    let listener = [("port", port.as_str()), ("netns", server_netns.as_str())];
    assert!(
        m.get("observer_listen_queue_length", &listener).is_some(),
        "no series for gunicorn's listener in netns {server_netns}:\n{}",
        m.text
    );
    assert!(
        m.get(
            "observer_listen_queue_length",
            &[
                listener[0],
                listener[1],
                ("container_id", server.id.as_str())
            ]
        )
        .is_some(),
        "container_id is not podman's {}:\n{}",
        server.id,
        m.text
    );

    // Load: 2 slow requests keep both workers busy, 3 more wait in the queue.
    let slow: Vec<_> = (0..2).map(|_| request_in(server_pid, 4.0)).collect();
    until("gunicorn's semaphore at 2", 20, || {
        (std::fs::read_to_string(app.join("busy")).ok()?.trim() == "2").then_some(())
    });
    let queued: Vec<_> = (0..3).map(|_| request_in(server_pid, 0.1)).collect();
    until("3 queued, per ss in the server's netns", 20, || {
        (ss_depth_in(server_pid, SERVER_PORT) == 3.0).then_some(())
    });
    let m = scrape_in(observer_pid).expect("scrape");
    let depth = m.get("observer_listen_queue_length", &listener);
    let busy = m.get(
        "observer_workers",
        &[listener[0], listener[1], ("state", "busy")],
    );
    let truth_depth = ss_depth_in(server_pid, SERVER_PORT);
    let truth_busy = std::fs::read_to_string(app.join("busy")).unwrap_or_default();
    println!(
        "gunicorn in container {} (netns {server_netns}): depth {depth:?} (ss {truth_depth}), \
         busy {busy:?} (semaphore {})",
        &server.id[..12],
        truth_busy.trim()
    );
    assert_eq!(
        depth,
        Some(truth_depth),
        "depth vs ss in the server's netns"
    );
    assert_eq!(
        busy,
        truth_busy.trim().parse::<f64>().ok(),
        "busy workers vs gunicorn's semaphore:\n{}",
        m.text
    );

    // Every request served: accepted = the clients' 5.
    let served = slow
        .into_iter()
        .chain(queued)
        .map(|r| r.join().unwrap_or(false))
        .filter(|served| *served)
        .count();
    assert_eq!(served, 5, "{}", server.logs());
    let m = scrape_in(observer_pid).expect("scrape");
    let accepted = m.get("observer_connections_accepted_total", &listener);
    assert_eq!(accepted, Some(5.0), "accepted vs the clients' 5");
    drop(host);
    let _ = std::fs::remove_dir_all(&app);
}

#[test]
fn under_the_runtimes_default_seccomp_profile_the_image_names_the_cause() {
    let (mut flags, _) = daemonset_flags();
    flags.retain(|f| !f.starts_with("--security-opt=seccomp"));
    for command in [["doctor"].as_slice(), ["serve"].as_slice()] {
        let mut full = vec![IMAGE];
        full.extend_from_slice(command);
        let out = run(podman()
            .args(["run", "--rm"])
            .args(runtime_flags())
            .args(&flags)
            .args(&full));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{command:?} succeeded:\n{text}");
        assert!(
            text.contains("seccomp profile blocks bpf()") && text.contains("seccomp=unconfined"),
            "{command:?}:\n{text}"
        );
    }
}

#[test]
fn without_the_bpf_capability_the_image_names_it() {
    let (mut flags, _) = daemonset_flags();
    flags.retain(|f| f != "--cap-add=CAP_BPF");
    let out = run(podman()
        .args(["run", "--rm"])
        .args(runtime_flags())
        .args(&flags)
        .args([IMAGE, "serve"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("missing privileges") && stderr.contains("CAP_BPF"),
        "{stderr}"
    );
}

fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("observer-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The arm64 image `cargo xtask image --arch arm64` builds on an amd64
/// machine (as `cargo xtask test` does).
const ARM64_IMAGE: &str = concat!("localhost/observer:", env!("CARGO_PKG_VERSION"), "-arm64");

#[test]
fn the_arm64_image_says_arm64_and_holds_an_aarch64_binary_with_its_loader_and_libraries() {
    if run_ok(Command::new("dpkg").arg("--print-architecture")) != "amd64" {
        return; // built only where it is a cross build
    }
    let arch = run_ok(podman().args([
        "image",
        "inspect",
        "--format",
        "{{.Architecture}}/{{.Os}}",
        ARM64_IMAGE,
    ]));
    assert_eq!(arch, "arm64/linux");
    let root = PathBuf::from(run_ok(podman().args(["image", "mount", ARM64_IMAGE])));
    let read = |path: &str| std::fs::read(root.join(path.trim_start_matches('/')));
    let binary = read("/usr/local/bin/observer").expect("the binary in the image");
    let unmount = || run(podman().args(["image", "unmount", ARM64_IMAGE]));
    let header = support::elf_class_and_machine(&binary);
    let loader = read("/lib/ld-linux-aarch64.so.1").map(|b| b.len());
    let libc = read("/lib/aarch64-linux-gnu/libc.so.6").map(|b| b.len());
    unmount();
    assert_eq!(
        header,
        Some((support::ELF_64_BIT, support::EM_AARCH64)),
        "a 64-bit arm64 binary"
    );
    assert!(
        loader.is_ok_and(|n| n > 0),
        "the arm64 loader is in the image"
    );
    assert!(libc.is_ok_and(|n| n > 0), "arm64 glibc is in the image");
}
