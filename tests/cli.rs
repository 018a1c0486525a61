//! The binary's command line: settings from flags, `IDEMPROXY_*` variables and a TOML file
//! (flag > env > file > default), and a clear, non-zero exit naming any bad setting.

mod support;

use std::process::Command;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let output = Command::new(support::binary::path())
        .args(args)
        .env_remove("IDEMPROXY_UPSTREAM")
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_OPS_LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code().unwrap_or(-1), stderr)
}

#[test]
fn a_bad_flag_stops_the_start_and_is_named() {
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "run",
                "--upstream",
                "http://127.0.0.1:1",
                "--retention",
                "forever",
            ],
            "--retention",
        ),
        (&["run", "--upstream", "ftp://x"], "--upstream"),
        (&["run"], "--upstream is required"),
        (
            &[
                "run",
                "--upstream",
                "http://127.0.0.1:1",
                "--listen",
                "nowhere",
            ],
            "--listen",
        ),
        (
            &[
                "run",
                "--upstream",
                "http://127.0.0.1:1",
                "--max-request-bytes",
                "0",
            ],
            "--max-request-bytes",
        ),
    ];
    for (args, named) in cases {
        let (code, stderr) = run(args, &[]);
        assert_ne!(code, 0, "{args:?} must fail");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn environment_and_file_settings_are_read_and_named_when_bad() {
    let (code, stderr) = run(
        &["run"],
        &[
            ("IDEMPROXY_UPSTREAM", "http://127.0.0.1:1"),
            ("IDEMPROXY_RETENTION", "bogus"),
        ],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--retention") && stderr.contains("bogus"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        "upstream = \"http://127.0.0.1:1\"\nkey-header = \"Not Valid\"\n",
    )
    .unwrap();
    let (code, stderr) = run(&["run", "--config", file.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--key-header"), "{stderr}");

    std::fs::write(
        &file,
        "upstream = \"http://127.0.0.1:1\"\nretension = \"1h\"\n",
    )
    .unwrap();
    let (code, stderr) = run(&["run", "--config", file.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("retension"),
        "an unknown key is named: {stderr}"
    );

    let (code, stderr) = run(&["run", "--config", "/nonexistent/idemproxy.toml"], &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("/nonexistent/idemproxy.toml"), "{stderr}");

    // Issue 30: the log format was read past the settings, and a typo fell back silently.
    let (code, stderr) = run(
        &["run"],
        &[
            ("IDEMPROXY_UPSTREAM", "http://127.0.0.1:1"),
            ("IDEMPROXY_LOG_FORMAT", "jsno"),
        ],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("IDEMPROXY_LOG_FORMAT=jsno"), "{stderr}");
}

#[test]
fn redis_sentinel_settings_that_cannot_work_stop_the_start_and_are_named() {
    let sentinel = [
        "run",
        "--upstream",
        "http://127.0.0.1:1",
        "--store",
        "redis-sentinel",
    ];
    let with = |more: &[&'static str]| [&sentinel[..], more].concat();
    // Each case: the arguments, the environment, what the error must name.
    type Case<'a> = (Vec<&'a str>, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 6] = [
        (with(&[]), &[], "--redis-sentinels is required"),
        (
            with(&["--redis-sentinels", "s-0"]),
            &[],
            "--redis-sentinels",
        ),
        (
            with(&["--redis-sentinels", "s-0:26379,s-1:26379"]),
            &[],
            "--redis-master-name is required",
        ),
        (
            with(&["--redis-master-name", "orders"]),
            &[("IDEMPROXY_REDIS_SENTINELS", "s-0:26379,http://s-1:26379")],
            "--redis-sentinels",
        ),
        (
            with(&[
                "--redis-sentinels",
                "s-0:26379",
                "--redis-master-name",
                "two words",
            ]),
            &[],
            "--redis-master-name",
        ),
        (
            vec![
                "run",
                "--upstream",
                "http://127.0.0.1:1",
                "--store",
                "redis-cluster",
                "--redis-url",
                "redis://127.0.0.1:7000",
                "--redis-wait-replicas",
                "1",
            ],
            &[],
            "--redis-wait-replicas",
        ),
    ];
    for (args, env, named) in cases {
        let (code, stderr) = run(&args, env);
        assert_ne!(code, 0, "{args:?} must fail");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        "upstream = \"http://127.0.0.1:1\"\nstore = \"redis-sentinel\"\nredis-sentinels = \"s-0:26379\"\n",
    )
    .unwrap();
    let (code, stderr) = run(&["run", "--config", file.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("redis-master-name"), "{stderr}");
}

#[tokio::test]
async fn flags_win_over_environment_which_wins_over_the_file() {
    let upstream = support::ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    // The file names one key header and listen address, the environment another key header
    // and the flag another address: the environment and the flag win.
    std::fs::write(
        &file,
        format!(
            "upstream = \"http://{}\"\nkey-header = \"x-from-file\"\nlisten = \"127.0.0.1:1\"\n",
            upstream.addr
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut child = tokio::process::Command::new(support::binary::path())
        .args([
            "run",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&data)
        .env("IDEMPROXY_KEY_HEADER", "x-from-env")
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_OPS_LISTEN", "127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let addr = support::binary::listening_addr(stderr).await;
    let mut client = support::client(addr).await;
    for _ in 0..2 {
        let mut request = tonic::Request::new(support::add("precedence", 1));
        request
            .metadata_mut()
            .insert("x-from-env", "k1".parse().unwrap());
        client.apply(request).await.expect("answered");
    }
    assert_eq!(
        upstream.state.executions(),
        1,
        "the env's key header is the one in force"
    );
    child.kill().await.unwrap();
}

/// `--worker-threads` is the runtime's size, as the runtime itself reports it (the setting
/// was once parsed and never applied).
#[tokio::test]
async fn worker_threads_sizes_the_runtime() {
    let upstream = support::ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    for (extra, workers) in [(&[][..], 1), (&["--worker-threads", "3"][..], 3)] {
        let args = support::binary::run_args(upstream.addr, dir.path(), extra);
        let sidecar = support::binary::start(&args).await;
        let line = &sidecar.listening_line;
        assert!(line.contains(&format!("\"workers\":{workers}")), "{line}");
        sidecar.kill().await;
    }
}

#[test]
fn the_example_config_file_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/config.example.toml");
    let config = idemproxy::config::load(["--config", path])
        .expect("the shipped example parses and validates");
    assert_eq!(config.listen.to_string(), "0.0.0.0:16000");
}

#[test]
fn the_kubernetes_config_files_are_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");
    for (file, store) in [
        ("base/config.toml", "sled"),
        ("overlays/redis/config.toml", "redis"),
        ("overlays/redis-sentinel/config.toml", "redis"),
        ("overlays/postgres/config.toml", "postgres"),
    ] {
        let path = std::path::Path::new(dir).join(file);
        // The PostgreSQL overlay's URL is in its file (its password comes from a Secret).
        let argv = vec!["--config".into(), path.into_os_string()];
        let config =
            idemproxy::config::load(argv).unwrap_or_else(|error| panic!("{file}: {error}"));
        let chosen = match config.store {
            idemproxy::config::StoreChoice::Sled => "sled",
            idemproxy::config::StoreChoice::Redis(_) => "redis",
            idemproxy::config::StoreChoice::Postgres(_) => "postgres",
        };
        assert_eq!(chosen, store, "{file} chooses its store");
    }
}

#[test]
fn check_prints_the_policy_or_names_what_is_broken() {
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let example = format!("{proto_dir}/idemproxy/example/v1/payments.proto");
    let output = Command::new(support::binary::path())
        .args(["check", "--upstream", "http://127.0.0.1:1"])
        .args(["--proto", &example, "--proto-path", proto_dir])
        .output()
        .expect("the binary runs");
    let table = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(
        table.contains("/idemproxy.example.v1.Payments/Refund        reject"),
        "{table}"
    );

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.proto");
    std::fs::write(
        &broken,
        "syntax = \"proto3\";\npackage b;\nimport \"idemproxy/v1/annotations.proto\";\n\
         service S { rpc Up(stream M) returns (stream M) { option (idemproxy.v1.method) = { require_key: true }; } }\n\
         message M { string id = 1; }\n",
    )
    .unwrap();
    let broken = broken.display().to_string();
    let dir_text = dir.path().display().to_string();
    let (code, stderr) = run(
        &[
            "check",
            "--upstream",
            "http://127.0.0.1:1",
            "--proto",
            &broken,
            "--proto-path",
            &dir_text,
        ],
        &[],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("/b.S/Up: bidirectional"), "{stderr}");
    // The same problem stops `run`.
    let (code, stderr) = run(
        &[
            "run",
            "--upstream",
            "http://127.0.0.1:1",
            "--proto",
            &broken,
            "--proto-path",
            &dir_text,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &dir_text,
        ],
        &[],
    );
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("/b.S/Up: bidirectional"), "{stderr}");
}

/// Regression (issue 21): a CI job that lints annotated protos has no service address; only
/// `--reflection` needs `--upstream`.
#[test]
fn check_needs_no_upstream_unless_it_asks_the_service() {
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let example = format!("{proto_dir}/idemproxy/example/v1/payments.proto");
    let output = Command::new(support::binary::path())
        .args(["check", "--proto", &example, "--proto-path", proto_dir])
        .env_remove("IDEMPROXY_UPSTREAM")
        .output()
        .expect("the binary runs");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("/idemproxy.example.v1.Payments/Refund"),
        "{table}"
    );

    let (code, stderr) = run(&["check", "--reflection"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--reflection") && stderr.contains("--upstream"),
        "{stderr}"
    );
}

/// Regression (issue 21): the demo prints its story and nothing else, even when its output is
/// not a terminal (its sidecar's start-up warnings were the first line, as JSON).
#[test]
fn the_demo_prints_its_story_and_no_log_lines() {
    let output = Command::new(support::binary::path())
        .arg("demo")
        .env_remove("RUST_LOG")
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the demo failed: {stderr}");
    assert!(
        stdout.starts_with("A message queue delivers"),
        "the story comes first:\n{stdout}"
    );
    assert_eq!(stderr, "", "no log lines beside the story");
}

/// `idemproxy --help` lists what operators use, and nothing of the benchmark (its own crate,
/// `bench/`), shown or hidden.
#[test]
fn the_help_lists_only_the_operators_commands() {
    let output = Command::new(support::binary::path())
        .arg("--help")
        .output()
        .expect("the binary runs");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .expect("a list of commands")
        .lines()
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(
        commands,
        [
            "run",
            "check",
            "keys",
            "inject",
            "injector",
            "demo",
            "accept-loss",
            "help"
        ],
        "{help}"
    );
    for hidden in ["bench", "bench-load", "bench-upstream", "bench-sled"] {
        let output = Command::new(support::binary::path())
            .args([hidden, "--help"])
            .output()
            .expect("the binary runs");
        assert!(
            !output.status.success(),
            "`idemproxy {hidden}` still exists"
        );
    }
}
