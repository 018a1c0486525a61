//! The alerts and the dashboard on a real Prometheus (issue 40): Debian's `prometheus`
//! scrapes three real sidecars every second with `deploy/prometheus/alerts.yaml` loaded. One
//! enforces, and holds an outcome that waits for an operator (its service answered INTERNAL
//! on a method with no probe) and refused a call for want of buffers; one observes (the
//! rollout mode); one lost its Redis and forwards its fail-open method unprotected. Every
//! expression of the dashboard and of the rules evaluates without error, those the scenario
//! feeds return data, and exactly the alerts it calls for are firing or pending. The rules
//! shipped twice (the rule file, the PrometheusRule) are the same, and the PodMonitor scrapes
//! the port the sidecar serves its metrics on.

// Helpers of tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use idemproxy::pb::idemproxy::testing::v1::ledger_client::LedgerClient;
use idemproxy::pb::idemproxy::testing::v1::ApplyRequest;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use support::http::free_addr;
use support::prometheus::Prometheus;
use support::redis::RedisServer;
use support::{add, apply, binary, client, eventually, ledger, reason, was_replayed};
use tonic::transport::Channel;

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yaml");
const COMPONENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/kubernetes/components/monitoring"
);
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/idemproxy.json");

/// How long Prometheus may take to show what the scenario did: a few scrapes and evaluations.
const SEEN_WITHIN: Duration = Duration::from_secs(30);

/// Metrics the alerts or the dashboard use that this scenario does not make, and why; every
/// other metric they name must have data.
const NOT_FED: [(&str, &str); 2] = [
    (
        "idemproxy_probes_total",
        "no method here declares an in-doubt probe",
    ),
    (
        "idemproxy_postgres_sync_standbys",
        "only the PostgreSQL store reports it",
    ),
];
/// What each alert must be once the scenario ran; every alert of the rule file is here.
const EXPECTED: [(&str, &str); 10] = [
    ("IdemproxyOutcomeWaitingForOperator", "firing"),
    ("IdemproxyBuffersExhausted", "firing"),
    ("IdemproxyFailOpenForwarding", "firing"),
    // Redis is down: not ready, and store errors, but not yet for their `for`.
    ("IdemproxyStoreUnavailable", "pending"),
    ("IdemproxyStoreErrors", "pending"),
    ("IdemproxyInDoubtProbesGaveUp", "inactive"),
    ("IdemproxyStoreFailedForGood", "inactive"),
    ("IdemproxyNoSynchronousStandby", "inactive"),
    ("IdemproxyInDoubtAging", "inactive"),
    ("IdemproxyInDoubtNearExpiry", "inactive"),
];

fn yaml(path: &str) -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{path}: {error}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// The prometheus-operator copy of the rules is the rule file's, and promtool accepts it.
#[test]
fn the_prometheus_rule_holds_the_rules_of_alerts_yaml() {
    let rules = yaml(RULES);
    let resource = yaml(&format!("{COMPONENT}/prometheusrule.yaml"));
    assert_eq!(resource["kind"], "PrometheusRule");
    assert!(
        rules["groups"].as_sequence().is_some_and(|g| !g.is_empty()),
        "{RULES} has rule groups"
    );
    assert!(
        resource["spec"]["groups"] == rules["groups"],
        "the PrometheusRule's spec.groups differ from {RULES}: write it again with the command in its header"
    );
    let dir = tempfile::tempdir().unwrap();
    let embedded = dir.path().join("prometheusrule.rules.yaml");
    std::fs::write(
        &embedded,
        serde_yaml_ng::to_string(&resource["spec"]).unwrap(),
    )
    .unwrap();
    let check = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&embedded)
        .output()
        .expect("promtool runs (scripts/test installs Debian's prometheus)");
    assert!(
        check.status.success(),
        "promtool check rules on the PrometheusRule's rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

/// The container port named `name` of the `idemproxy` container in a pod template.
fn sidecar_port(pod_spec: &serde_yaml_ng::Value, name: &str) -> Option<i64> {
    let containers = ["initContainers", "containers"]
        .iter()
        .filter_map(|field| pod_spec[*field].as_sequence())
        .flatten();
    let sidecar = containers
        .into_iter()
        .find(|container| container["name"] == "idemproxy")?;
    let port = sidecar["ports"]
        .as_sequence()?
        .iter()
        .find(|port| port["name"] == name)?;
    port["containerPort"].as_i64()
}

/// The PodMonitor scrapes `/metrics` on the port the example's sidecar and an injected one
/// name for the ops listener.
#[test]
fn the_pod_monitor_scrapes_the_sidecars_ops_port() {
    let monitor = yaml(&format!("{COMPONENT}/podmonitor.yaml"));
    assert_eq!(monitor["kind"], "PodMonitor");
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let port = endpoint["port"].as_str().expect("a named port");
    let ops = i64::from(idemproxy::inject::OPS_PORT);
    let base = yaml(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/base/deployment.yaml"
    ));
    assert_eq!(
        sidecar_port(&base["spec"]["template"]["spec"], port),
        Some(ops),
        "the example's sidecar serves its metrics on {port}"
    );
    let golden = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/inject/deployment.golden.yaml"
    );
    // The Deployment, first of the golden output's documents.
    let text = std::fs::read_to_string(golden).unwrap();
    let first = serde_yaml_ng::Deserializer::from_str(&text).next().unwrap();
    let injected = serde_yaml_ng::Value::deserialize(first).unwrap();
    assert_eq!(injected["kind"], "Deployment", "{golden}");
    assert_eq!(
        sidecar_port(&injected["spec"]["template"]["spec"], port),
        Some(ops),
        "an injected sidecar serves its metrics on {port}"
    );
}

/// A binary sidecar with its ops and admin listeners on ports known in advance.
struct Running {
    sidecar: binary::BinarySidecar,
    ops: SocketAddr,
    admin: SocketAddr,
}

/// Starts `idemproxy run` in front of `upstream`, records in `dir`, with `extra` flags.
async fn start(upstream: SocketAddr, dir: &std::path::Path, extra: &[&str]) -> Running {
    let (ops, admin) = (free_addr(), free_addr());
    let (ops_arg, admin_arg) = (ops.to_string(), admin.to_string());
    let mut flags = vec!["--ops-listen", &ops_arg, "--admin-listen", &admin_arg];
    flags.extend_from_slice(extra);
    let sidecar = binary::start(&binary::run_args(upstream, dir, &flags)).await;
    Running {
        sidecar,
        ops,
        admin,
    }
}

/// `apply` with a `grpc-timeout` (a hung call fails the test instead of holding it).
async fn call(
    client: &mut LedgerClient<Channel>,
    request: ApplyRequest,
    key: &str,
) -> Result<tonic::Response<idemproxy::pb::idemproxy::testing::v1::ApplyReply>, tonic::Status> {
    let mut request = tonic::Request::new(request);
    request.set_timeout(Duration::from_secs(10));
    request
        .metadata_mut()
        .insert("idempotency-key", key.parse().unwrap());
    client.apply(request).await
}

/// Records IN_FLIGHT on the sidecar whose admin API is `admin`, as `keys ls` lists them.
async fn in_flight(admin: SocketAddr) -> usize {
    let admin = admin.to_string();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        binary::keys(&admin, &["ls", "--state", "IN_FLIGHT", "--json"])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    binary::json(&out)["records"].as_array().map_or(0, Vec::len)
}

/// The enforcing sidecar's scenario: a replay; an outcome left unknown (INTERNAL, no probe)
/// and its retry refused; a duplicate that waits for its first attempt; a call refused
/// because the buffers budget (1 MiB) holds a 700 kB call still running.
async fn enforce(sidecar: &Running, ledger: &ledger::LedgerHandle) {
    let mut client = client(sidecar.sidecar.addr).await;
    call(&mut client, add("paid", 1), "paid-1").await.unwrap();
    let replay = call(&mut client, add("paid", 1), "paid-1").await.unwrap();
    assert!(was_replayed(&replay));
    let broken = ApplyRequest {
        fail_code: tonic::Code::Internal as u32,
        ..add("broken", 1)
    };
    let unknown = call(&mut client, broken.clone(), "broken-1").await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::Internal);
    let refused = call(&mut client, broken, "broken-1").await.unwrap_err();
    assert_eq!(reason(&refused), "IDEMPOTENCY_OUTCOME_UNKNOWN");

    let slow = |account: &str, delay_ms| ApplyRequest {
        delay_ms,
        ..add(account, 1)
    };
    let mut first = client.clone();
    let running =
        tokio::spawn(async move { call(&mut first, slow("slow", 1_500), "slow-1").await });
    eventually(SEEN_WITHIN, "the slow call to be claimed", || async {
        in_flight(sidecar.admin).await == 1
    })
    .await;
    let waited = call(&mut client, slow("slow", 1_500), "slow-1").await;
    assert!(
        was_replayed(&waited.unwrap()),
        "the duplicate waited for it"
    );
    running.await.unwrap().unwrap();

    let large = |letter: &str| ApplyRequest {
        delay_ms: 3_000,
        ..add(&letter.repeat(700_000), 1)
    };
    let mut first = client.clone();
    let held = tokio::spawn(async move { call(&mut first, large("h"), "held-1").await });
    eventually(SEEN_WITHIN, "the large call to be claimed", || async {
        in_flight(sidecar.admin).await == 1
    })
    .await;
    let refused = call(&mut client, large("g"), "greedy-1").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(reason(&refused), "IDEMPOTENCY_BUFFERS_EXHAUSTED");
    held.await.unwrap().unwrap();
    assert_eq!(
        ledger.state.executed_twice(),
        vec![],
        "no key executed twice"
    );
}

/// The observing sidecar's scenario: a first attempt and its duplicate, both forwarded (what
/// enforcing would have done is counted), and a key reused with another request.
async fn observe(sidecar: &Running, ledger: &ledger::LedgerHandle) {
    let mut client = client(sidecar.sidecar.addr).await;
    for _ in 0..2 {
        let answer = call(&mut client, add("observed", 1), "observed-1").await;
        assert!(!was_replayed(&answer.unwrap()), "observe mode forwards");
    }
    call(&mut client, add("observed", 2), "observed-1")
        .await
        .unwrap();
    assert_eq!(ledger.state.executions_of("observed"), 3, "every call ran");
}

/// The fail-open sidecar's scenario: its Redis killed, a keyed call is forwarded unprotected.
async fn fail_open(sidecar: &Running, redis: &mut RedisServer, ledger: &ledger::LedgerHandle) {
    let mut client = client(sidecar.sidecar.addr).await;
    call(&mut client, add("open", 1), "open-1").await.unwrap();
    redis.kill();
    let answer = call(&mut client, add("unprotected", 1), "open-2").await;
    assert!(!was_replayed(
        &answer.expect("forwarded although the store is down")
    ));
    assert_eq!(ledger.state.executions_of("unprotected"), 1);
}

/// Calls to each sidecar, fresh keys and their duplicates, five a second: rates over the last
/// minute have data whatever the moment of each scrape.
fn keep_calling(sidecars: [SocketAddr; 3]) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut clients = Vec::new();
        for addr in sidecars {
            clients.push(client(addr).await);
        }
        for n in 0u64.. {
            for (which, client) in clients.iter_mut().enumerate() {
                let key = format!("steady-{which}-{n}");
                for _ in 0..2 {
                    let _ = apply(client, add(&key, 1), Some(&key), None).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// The three sidecars, each in front of a ledger of its own.
struct Sidecars {
    enforcing: (Running, ledger::LedgerHandle),
    observing: (Running, ledger::LedgerHandle),
    open: (Running, ledger::LedgerHandle),
    redis: RedisServer,
    _dir: tempfile::TempDir,
}

impl Sidecars {
    async fn start() -> Sidecars {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger::start().await;
        let buffers = [
            "--max-request-bytes",
            "1MiB",
            "--max-buffered-bytes",
            "1MiB",
        ];
        let enforcing = (
            start(ledger.addr, &dir.path().join("a"), &buffers).await,
            ledger,
        );
        // Records kept 2 s: the sweeper expires them while Prometheus watches.
        let observe = [
            "--mode",
            "observe",
            "--retention",
            "2s",
            "--sweep-interval",
            "100ms",
        ];
        let ledger = ledger::start().await;
        let observing = (
            start(ledger.addr, &dir.path().join("b"), &observe).await,
            ledger,
        );
        let redis = RedisServer::start();
        let config = dir.path().join("fail-open.toml");
        let rule = "[methods.\"/idemproxy.testing.v1.Ledger/Apply\"]\nfail-open = true\n";
        std::fs::write(&config, rule).unwrap();
        let (url, config) = (redis.url(), config.display().to_string());
        let on_redis = [
            "--store",
            "redis",
            "--redis-url",
            &url,
            "--store-timeout",
            "1s",
        ];
        let flags = [&on_redis[..], &["--config", &config]].concat();
        let ledger = ledger::start().await;
        let open = (
            start(ledger.addr, &dir.path().join("c"), &flags).await,
            ledger,
        );
        Sidecars {
            enforcing,
            observing,
            open,
            redis,
            _dir: dir,
        }
    }

    fn all(&self) -> [&Running; 3] {
        [&self.enforcing.0, &self.observing.0, &self.open.0]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_the_dashboard_and_the_alerts_on_real_sidecars() {
    let mut sidecars = Sidecars::start().await;
    let rules = [std::path::Path::new(RULES)];
    let prometheus = Prometheus::start(&sidecars.all().map(|running| running.ops), &rules).await;

    enforce(&sidecars.enforcing.0, &sidecars.enforcing.1).await;
    observe(&sidecars.observing.0, &sidecars.observing.1).await;
    fail_open(&sidecars.open.0, &mut sidecars.redis, &sidecars.open.1).await;
    let calls = keep_calling(sidecars.all().map(|running| running.sidecar.addr));

    alerts_are_as_the_scenario_calls_for(&prometheus).await;
    every_rule_evaluates_without_error(&prometheus).await;
    alert_expressions_evaluate_on_exported_metrics(&prometheus).await;
    dashboard_expressions_return_data(&prometheus).await;
    calls.abort();
    assert_eq!(
        sidecars.enforcing.1.state.executed_twice(),
        vec![],
        "no key executed twice where the sidecar enforces"
    );
}

/// Reads with `read` every 100 ms until `done` holds of what it read, or `SEEN_WITHIN`
/// passes; returns the last reading, for the caller to assert on with its details.
async fn poll<T, F, Fut>(mut read: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + SEEN_WITHIN;
    loop {
        let reading = read().await;
        if done(&reading) || tokio::time::Instant::now() >= deadline {
            return reading;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every alerting rule's name and state (inactive, pending, firing), as Prometheus has them.
async fn alert_states(prometheus: &Prometheus) -> BTreeMap<String, String> {
    let rules = prometheus.rules().await;
    rules
        .iter()
        .filter(|rule| rule["type"] == "alerting")
        .map(|rule| {
            let name = rule["name"].as_str().unwrap_or_default().to_owned();
            (name, rule["state"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

async fn alerts_are_as_the_scenario_calls_for(prometheus: &Prometheus) {
    let expected: BTreeMap<String, String> = EXPECTED
        .iter()
        .map(|(name, state)| ((*name).to_owned(), (*state).to_owned()))
        .collect();
    let states = poll(|| alert_states(prometheus), |states| *states == expected).await;
    assert_eq!(states, expected, "{}", prometheus.warnings());
    // What an operator reads: every template expanded, the sidecar named.
    for alert in prometheus.alerts().await {
        let annotations = &alert["annotations"];
        for field in ["summary", "description", "runbook"] {
            let text = annotations[field].as_str().unwrap_or_default();
            assert!(
                !text.is_empty() && !text.contains("error expanding"),
                "{field} of {alert}"
            );
        }
        let instance = alert["labels"]["instance"].as_str().unwrap();
        let summary = annotations["summary"].as_str().unwrap();
        assert!(summary.contains(instance), "{summary} names {instance}");
    }
}

async fn every_rule_evaluates_without_error(prometheus: &Prometheus) {
    let rules = poll(
        || prometheus.rules(),
        |rules| rules.iter().all(|rule| rule["health"] != "unknown"),
    )
    .await;
    let loaded = yaml(RULES)["groups"][0]["rules"]
        .as_sequence()
        .map_or(0, Vec::len);
    assert_eq!(rules.len(), loaded, "Prometheus loaded every rule");
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
        assert_eq!(rule["lastError"].as_str().unwrap_or_default(), "", "{rule}");
    }
}

/// The metrics `expr` names: its words that start as idemproxy's do, less the label names
/// Prometheus knows (`labels`), outside label matchers.
fn metric_names(expr: &str, labels: &[String]) -> Vec<String> {
    let mut outside_matchers = String::new();
    let mut depth = 0;
    for c in expr.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ if depth == 0 => outside_matchers.push(c),
            _ => {}
        }
    }
    outside_matchers
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("idemproxy_") || word.starts_with("rpc_server_"))
        .filter(|word| !labels.iter().any(|label| label == word))
        .map(str::to_owned)
        .collect()
}

/// Every label name Prometheus has seen.
async fn label_names(prometheus: &Prometheus) -> Vec<String> {
    let labels = prometheus.api("labels").await.expect("the label names");
    serde_json::from_value(labels).expect("a list of names")
}

/// Each alert's expression evaluates, and every metric it names has data (but those this
/// scenario does not make, `NOT_FED`): a renamed metric fails here, not in production.
async fn alert_expressions_evaluate_on_exported_metrics(prometheus: &Prometheus) {
    let labels = label_names(prometheus).await;
    let rules = yaml(RULES)["groups"][0]["rules"].clone();
    for rule in rules.as_sequence().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        if let Err(error) = prometheus.query(expr).await {
            panic!("{}: {error}", rule["alert"].as_str().unwrap());
        }
        for name in metric_names(expr, &labels) {
            if NOT_FED.iter().any(|(not_fed, _)| *not_fed == name) {
                continue;
            }
            let series = prometheus.query(&name).await.unwrap();
            assert!(
                !series.is_empty(),
                "no series of {name}, which {expr} names"
            );
        }
    }
}

/// Whether an instant vector holds a finite number (not an empty result, nor the NaN of a
/// ratio or quantile over nothing).
fn has_a_finite_value(vector: &Result<Vec<serde_json::Value>, String>) -> bool {
    vector.as_ref().is_ok_and(|series| {
        series.iter().any(|one| {
            one["value"][1]
                .as_str()
                .and_then(|value| value.parse::<f64>().ok())
                .is_some_and(f64::is_finite)
        })
    })
}

/// Every query of the dashboard (its variables as Grafana would fill them: all methods, a
/// one-minute rate) evaluates, and returns a number unless it is about what this scenario
/// does not make; so does the method variable's own query.
async fn dashboard_expressions_return_data(prometheus: &Prometheus) {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let labels = label_names(prometheus).await;
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$method", ".*");
            let title = panel["title"].as_str().unwrap();
            let mut fed = true;
            for name in metric_names(&expr, &labels) {
                if NOT_FED.iter().any(|(not_fed, _)| *not_fed == name) {
                    fed = false;
                    continue;
                }
                let series = prometheus.query(&name).await.unwrap();
                assert!(!series.is_empty(), "{title}: no series of {name}");
            }
            let answer = if fed {
                poll(|| prometheus.query(&expr), has_a_finite_value).await
            } else {
                prometheus.query(&expr).await
            };
            assert!(answer.is_ok(), "{title}: {answer:?}");
            assert!(
                !fed || has_a_finite_value(&answer),
                "{title}: {expr} has no data: {answer:?}"
            );
            queried += 1;
        }
    }
    assert!(queried >= 25, "the dashboard's queries ({queried} found)");
    let variable = &dashboard["templating"]["list"][1]["query"];
    assert_eq!(
        variable,
        "label_values(idemproxy_requests_total, rpc_method)"
    );
    let methods = prometheus
        .api("label/rpc_method/values?match[]=idemproxy_requests_total")
        .await
        .unwrap();
    assert!(
        methods
            .as_array()
            .is_some_and(|methods| !methods.is_empty()),
        "the method variable has values: {methods}"
    );
}
