//! Any /proc/locks text, and any duration flag.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = observer::kernel::procfs::parse_proc_locks(text);
        let _ = observer::views::duration::parse_duration(text);
    }
});
