//! Which container (and Kubernetes pod) a process runs in, from its cgroup
//! path, like cAdvisor and ebpf_exporter's cgroup decoder: no container
//! runtime or Kubernetes API is asked.
//!
//! - container id: a 64-hex path segment, bare (cgroupfs driver:
//!   `/docker/<id>`, `/kubepods/burstable/pod<uid>/<id>`) or inside a systemd
//!   scope (`docker-<id>.scope`, `cri-containerd-<id>.scope`,
//!   `crio-<id>.scope`, `libpod-<id>.scope`);
//! - pod uid: `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice`;
//! - pod name and namespace: read inside the container's own filesystem (its
//!   hostname, and the service-account namespace file), only for processes in
//!   a mount namespace other than ours.
use std::collections::HashMap;

/// What the metrics label a listener with when its process is in a container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    pub container_id: String,
    pub pod_uid: String,
    pub pod: String,
    pub namespace: String,
}

const SCOPE_PREFIXES: &[&str] = &[
    "docker-",
    "cri-containerd-",
    "crio-",
    "libpod-",
    "containerd-",
];

fn container_id_of(segment: &str) -> Option<&str> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = SCOPE_PREFIXES
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

fn pod_uid_of(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice").unwrap_or(segment);
    let uid = name
        .rsplit_once("-pod")
        .map(|(_, uid)| uid)
        .or_else(|| name.strip_prefix("pod"))?;
    let uid = uid.replace('_', "-");
    (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(uid)
}

/// Parses /proc/PID/cgroup (v1 and v2 lines: `hierarchy:controllers:path`).
pub fn parse_cgroup(text: &str) -> ContainerInfo {
    let mut info = ContainerInfo::default();
    for path in text.lines().filter_map(|l| l.splitn(3, ':').nth(2)) {
        for segment in path.split('/') {
            if let Some(id) = container_id_of(segment) {
                info.container_id = id.to_owned();
            }
            if let Some(uid) = pod_uid_of(segment) {
                info.pod_uid = uid;
            }
        }
    }
    info
}

/// Reads a process's container facts; `None` outside a container.
fn read_container(pid: u32) -> Option<ContainerInfo> {
    let mut info = parse_cgroup(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?);
    if info.container_id.is_empty() {
        return None;
    }
    let own_mnt = std::fs::read_link("/proc/self/ns/mnt").ok();
    let separate_fs =
        own_mnt.is_some() && std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok() != own_mnt;
    if !info.pod_uid.is_empty() && separate_fs {
        let inside = |path: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/root{path}"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        info.pod = inside("/etc/hostname");
        info.namespace = inside("/var/run/secrets/kubernetes.io/serviceaccount/namespace");
    }
    Some(info)
}

/// Container facts per process, read once per process while it lives.
#[derive(Default)]
pub struct ContainerCache {
    by_pid: HashMap<u32, Option<ContainerInfo>>,
}

impl ContainerCache {
    pub fn lookup(&mut self, pid: u32) -> Option<ContainerInfo> {
        self.by_pid
            .entry(pid)
            .or_insert_with(|| read_container(pid))
            .clone()
    }

    /// Forgets processes not in `alive` (pids are reused).
    pub fn retain(&mut self, alive: impl Fn(u32) -> bool) {
        self.by_pid.retain(|pid, _| alive(*pid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c2b9e8d7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f10";

    #[test]
    fn docker_systemd_scope() {
        let info = parse_cgroup(&format!("0::/system.slice/docker-{ID}.scope\n"));
        assert_eq!(info.container_id, ID);
        assert_eq!(info.pod_uid, "");
    }

    #[test]
    fn kubernetes_systemd_driver_gives_container_and_pod_uid() {
        let line = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/cri-containerd-{ID}.scope"
        );
        let info = parse_cgroup(&line);
        assert_eq!(info.container_id, ID);
        assert_eq!(info.pod_uid, "0a1b2c3d-4e5f-6789-abcd-ef0123456789");
    }

    #[test]
    fn kubernetes_cgroupfs_driver_on_cgroup_v1() {
        let text = format!(
            "4:memory:/kubepods/besteffort/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789/{ID}\n1:cpu:/\n"
        );
        let info = parse_cgroup(&text);
        assert_eq!(
            (info.container_id.as_str(), info.pod_uid.as_str()),
            (ID, "0a1b2c3d-4e5f-6789-abcd-ef0123456789")
        );
    }

    #[test]
    fn host_processes_and_other_hex_names_are_not_containers() {
        // A 32-hex sandbox cgroup is not a container id.
        let info = parse_cgroup(
            "4:memory:/process_api/9bed1a1a49a6ff70d3030a6d69a80e92\n0::/user.slice/session-3.scope\n",
        );
        assert_eq!(info, ContainerInfo::default());
    }
}
