//! A config file's text: parsed, then laid under the flags and resolved as `run` would.
#![no_main]

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
    if idemproxy::config::parse_file(text).is_err() {
        return;
    }
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let path = dir.path().join("config.toml");
    if std::fs::write(&path, text).is_err() {
        return;
    }
    let argv = [
        "--upstream".as_ref(),
        "http://127.0.0.1:50051".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ];
    let _ = idemproxy::config::load(argv);
});
