//! `idemproxy-bench` end to end, shortened: every variant runs against the real upstream, nginx
//! and sidecar processes, the report names every variant and target, the notes of an existing
//! report are kept, and no process it started (nginx's workers among them) outlives it.

use std::collections::BTreeSet;
use std::process::Command;

/// Process ids whose command name is `name`, from `/proc`.
fn pids_named(name: &str) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    for entry in std::fs::read_dir("/proc")
        .expect("/proc is readable")
        .flatten()
    {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            pids.insert(pid);
        }
    }
    pids
}

#[test]
fn a_short_benchmark_reports_every_variant_and_leaves_nothing_running() {
    let nginx_found = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .any(|path| std::path::Path::new(path).exists());
    let redis_found = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    let postgres_found = std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|versions| {
        versions
            .flatten()
            .any(|version| version.path().join("bin/postgres").is_file())
    });
    let h2load_found = std::process::Command::new("h2load")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if std::env::var_os("CI").is_some() {
        assert!(h2load_found, "scripts/test installs h2load for this test");
        assert!(nginx_found, "scripts/test installs nginx for this test");
        assert!(
            redis_found,
            "scripts/test installs redis-server for this test"
        );
        assert!(
            postgres_found,
            "scripts/test installs PostgreSQL for this test"
        );
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("BENCHMARKS.md");
    let notes = "<!-- Notes below this line are kept when the benchmark rewrites the file. -->\n\nhand-written notes\n";
    std::fs::write(&output, format!("old table\n\n{notes}")).expect("write the old report");
    let nginx_before = pids_named("nginx");
    // The benchmark starts the `idemproxy` binary beside it: `cargo test --workspace` builds
    // both (scripts/test).
    let run = Command::new(env!("CARGO_BIN_EXE_idemproxy-bench"))
        .args([
            "--rounds",
            "1",
            "--in-flight",
            "1,4",
            "--duration",
            "300ms",
            "--warmup",
            "100ms",
            "--records",
            "300",
        ])
        .arg("--output")
        .arg(&output)
        .output()
        .expect("the benchmark runs");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bench failed: {stderr}");
    let nginx_after = pids_named("nginx");
    let left: Vec<_> = nginx_after.difference(&nginx_before).collect();
    assert!(left.is_empty(), "nginx processes left running: {left:?}");

    let report = std::fs::read_to_string(&output).expect("the report is written");
    assert!(
        !report.contains("old table"),
        "the generated part is replaced"
    );
    assert!(report.ends_with(notes), "the notes are kept:\n{report}");
    // The load generator's runtime has no more workers than the cores it was pinned to:
    // two workers sharing one core cost it two fifths of its calls.
    let (workers, cores) = report
        .split("the load generator runs on ")
        .nth(1)
        .and_then(|rest| {
            let mut words = rest.split_whitespace();
            let workers: usize = words.next()?.parse().ok()?;
            let cores: usize = words.nth(3)?.parse().ok()?;
            Some((workers, cores))
        })
        .unwrap_or_else(|| panic!("the report names the load generator's workers:\n{report}"));
    assert!(
        workers <= cores,
        "the load generator runs {workers} workers on {cores} cores"
    );
    let mut variants = vec![
        "direct",
        "idemproxy passthrough",
        "idemproxy fresh keys",
        "idemproxy duplicate hits",
        "idemproxy fresh keys, flush per write",
    ];
    if nginx_found {
        variants.push("nginx grpc_pass");
    }
    if redis_found {
        variants.extend([
            "idemproxy on Redis, fresh keys",
            "idemproxy on Redis, duplicate hits",
            "idemproxy on Redis (fsync once a second), fresh keys",
            "idemproxy on Redis (fsync once a second), duplicate hits",
            "idemproxy on Redis Cluster (3 masters), fresh keys",
            "cure: Redis flag, fresh keys",
            "cure: Redis flag, duplicate hits",
            "cure: Redis flag (fsync once a second), fresh keys",
            "cure: Redis flag (fsync once a second), duplicate hits",
        ]);
    }
    if postgres_found {
        variants.extend([
            "idemproxy on PostgreSQL, fresh keys",
            "idemproxy on PostgreSQL, duplicate hits",
            "cure: PostgreSQL dedup table, fresh keys",
            "cure: PostgreSQL dedup table, duplicate hits",
            "idemproxy on PostgreSQL (synchronous standby), fresh keys",
            "idemproxy on PostgreSQL (synchronous standby), duplicate hits",
            "cure: PostgreSQL dedup table (synchronous standby), fresh keys",
            "cure: PostgreSQL dedup table (synchronous standby), duplicate hits",
        ]);
    }
    let mut store_cpu_seen = BTreeSet::new();
    for heading in ["## 1 in flight", "## 4 in flight"] {
        let section = report
            .split(heading)
            .nth(1)
            .unwrap_or_else(|| panic!("no section {heading}:\n{report}"));
        for variant in &variants {
            let row = section
                .lines()
                .find(|line| line.starts_with(&format!("| {variant} |")))
                .unwrap_or_else(|| panic!("no row for {variant} under {heading}:\n{report}"));
            let calls: f64 = row
                .split('|')
                .nth(2)
                .expect("a calls/s cell")
                .trim()
                .parse()
                .expect("calls/s is a number");
            assert!(
                calls > 0.0,
                "{variant} under {heading} made no calls: {row}"
            );
            let errors = row.split('|').nth(7).expect("an errors cell").trim();
            assert_eq!(errors, "0", "{variant} under {heading} had errors: {row}");
            // Every process's CPU is counted: the service's wherever it runs the calls (not
            // for the sidecar's replays), the store server's wherever there is one.
            let cpu = |column: usize| {
                row.split('|')
                    .nth(column)
                    .and_then(|cell| cell.trim().parse::<f64>().ok())
                    .is_some_and(|cpu| cpu > 0.0)
            };
            let replayed = variant.starts_with("idemproxy") && variant.contains("duplicate");
            assert!(
                replayed || cpu(10),
                "{variant} under {heading}: no service CPU: {row}"
            );
            assert!(cpu(12), "{variant} under {heading}: no total CPU: {row}");
            if cpu(11) {
                store_cpu_seen.insert(*variant);
            }
        }
    }
    if h2load_found {
        let section = report
            .split("## 1 in flight, h2load")
            .nth(1)
            .unwrap_or_else(|| panic!("no h2load section:\n{report}"));
        for path in ["direct", "idemproxy passthrough"] {
            let row = section
                .lines()
                .find(|line| line.starts_with(&format!("| {path} |")))
                .unwrap_or_else(|| panic!("no h2load row for {path}:\n{report}"));
            let failed = row.split('|').nth(7).expect("a failed cell").trim();
            assert_eq!(failed, "0", "h2load calls failed on {path}: {row}");
        }
        assert!(
            report.contains("passthrough added mean time per call with h2load"),
            "no P1 row for h2load:\n{report}"
        );
    }
    // A process of several threads shows CPU time in 10 ms ticks, so a short run of cheap
    // calls may show none; but the store server of every fresh-key variant on a server
    // (PostgreSQL's single-threaded processes read in nanoseconds) shows some in one
    // section at least.
    for variant in &variants {
        let on_server = variant.contains("Redis") || variant.contains("PostgreSQL");
        if on_server && variant.contains("fresh keys") {
            assert!(
                store_cpu_seen.contains(variant),
                "{variant}: no store server CPU:\n{report}"
            );
        }
    }
    for target in [
        "| P1 |", "| P2 |", "| P3 |", "| P4 |", "| P5 |", "| P6 |", "| C1 |", "| C2 |", "| C3 |",
        "| Q1 |", "| Q2 |", "| Q3 |", "| Q4 |",
    ] {
        assert!(report.contains(target), "no row {target}:\n{report}");
    }
    // The PostgreSQL targets are judged from the run's own figures when PostgreSQL is there.
    if postgres_found {
        for target in ["| Q1 |", "| Q2 |", "| Q3 |", "| Q4 |"] {
            let row = report
                .lines()
                .find(|line| line.starts_with(target))
                .expect("the row is there");
            assert!(
                !row.contains("not measured"),
                "{target} has no figures: {row}"
            );
        }
    }
    assert!(
        report.contains("(300 records found)"),
        "the restart found every record:\n{report}"
    );
    assert!(
        report.contains("× sled alone's") && report.contains("sled alone, the same records"),
        "the memory/disk run is compared with sled alone:\n{report}"
    );
}
