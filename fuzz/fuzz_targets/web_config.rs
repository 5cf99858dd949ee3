//! Any --web.config.file text: a configuration or one error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = observer::webconfig::WebConfig::parse(text, std::path::Path::new("/nonexistent"));
    }
});
