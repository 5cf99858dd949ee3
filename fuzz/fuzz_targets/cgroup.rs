//! Any /proc/PID/cgroup text: container facts or none, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let info = observer::containers::parse_cgroup(text);
        assert!(info.container_id.is_empty() || info.container_id.len() == 64);
    }
});
