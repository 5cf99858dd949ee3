//! Any bytes given as kernel BTF: an error, never a panic or a hang.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = observer::kernel::btf::Btf::parse(data) {
        let _ = btf.member_offset("tcp_sock", &["rcvq_space", "time"]);
        let _ = btf.member_offset("sock_common", &["skc_net", "net"]);
    }
});
