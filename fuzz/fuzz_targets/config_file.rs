//! A config file's text: parsed, then resolved into settings as `run` would.
#![no_main]

use idemproxy::config::{self, RunArgs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Settings that name files (tokens, passwords, CAs) are read at resolve: a fuzzed path
    // could name /dev/zero. Those readers are not what this target is about.
    if text.contains("-file") {
        return;
    }
    let Ok(file) = config::parse_file(text) else {
        return;
    };
    let args = RunArgs {
        upstream: Some("http://127.0.0.1:50051".into()),
        ..RunArgs::default()
    };
    let _ = config::resolve(args, file);
});
