//! `proxy.yaml` on arbitrary text: `cuttle::config::load_str` (what `load` does after reading
//! the file: YAML parsing with its budgets, unknown-key tracking, settings validation, policy
//! compilation), then the diagnostics `cuttle check` would print. Only "no panic" is asserted.
//!
//! Relative paths in the text resolve under a directory that does not exist, so `policy_file`,
//! key files and TLS files fail to read instead of reaching the disk.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/cuttle-fuzz/proxy.yaml");
    match cuttle::config::load_str(text, path, &cuttle_fuzz::world_env) {
        Ok(loaded) => {
            let _ = loaded.warnings.to_string();
        }
        Err(diags) => {
            let _ = diags.to_string();
        }
    }
});
