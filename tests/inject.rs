//! `idemproxy inject` through the real binary: golden files for each kind of workload, both
//! sidecar modes, idempotence, and clear refusals. `UPDATE_GOLDEN=1` rewrites the golden
//! files after a deliberate change (review the diff: it is what users' pods will get).
//! The golden outputs are also validated against the Kubernetes schemas by `scripts/test`.

mod support;

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject")
}

fn inject(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(support::binary::path())
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut input = child.stdin.take().expect("stdin is piped");
    input
        .write_all(stdin.unwrap_or("").as_bytes())
        .expect("writes stdin");
    drop(input);
    child.wait_with_output().expect("the binary exits")
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "inject failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("YAML is UTF-8")
}

/// Injects `input` with `flags`, compares with the golden file, and checks that injecting
/// the result again changes nothing. The parsed documents.
fn check_golden(input: &str, flags: &[&str], golden: &str) -> Vec<Value> {
    let path = dir().join(input);
    let mut args = vec!["-f", path.to_str().expect("UTF-8 path")];
    args.extend_from_slice(flags);
    let injected = stdout_of(&inject(&args, None));
    let golden_path = dir().join(golden);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden_path, &injected).expect("writes the golden file");
    }
    let expected = std::fs::read_to_string(&golden_path).expect("the golden file exists");
    assert_eq!(
        injected, expected,
        "{input} {flags:?} differs from {golden}"
    );
    let mut again_args = vec!["-f", "-"];
    again_args.extend_from_slice(flags);
    let again = stdout_of(&inject(&again_args, Some(&injected)));
    assert_eq!(
        again, injected,
        "injecting {golden} a second time changed it"
    );
    documents(&injected)
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|document| serde::Deserialize::deserialize(document).expect("the output is YAML"))
        .collect()
}

fn named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|c| c["name"] == name)
}

fn args_of(container: &Value) -> Vec<&str> {
    let args = container["args"].as_array().expect("the sidecar has args");
    args.iter().filter_map(Value::as_str).collect()
}

#[test]
fn a_deployment_gets_a_native_sidecar_and_its_service_is_untouched() {
    let docs = check_golden("deployment.yaml", &[], "deployment.golden.yaml");
    let spec = &docs[0]["spec"]["template"]["spec"];
    let sidecar = named(&spec["initContainers"], "idemproxy").expect("an init container");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert!(args_of(sidecar).contains(&"http://127.0.0.1:50051"));
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sidecar["securityContext"]["runAsUser"], 65532);
    assert!(named(&spec["containers"], "idemproxy").is_none());
    assert_eq!(spec["containers"][0]["env"][0]["name"], "LOG_LEVEL");
    let data = named(&spec["volumes"], "idemproxy-data").expect("a data volume");
    assert!(data["emptyDir"].is_object());
    assert_eq!(docs[1]["kind"], "Service");
    assert!(docs[1]["spec"].get("template").is_none());
}

#[test]
fn without_native_sidecars_the_sidecar_is_a_container_that_stops_last() {
    let docs = check_golden(
        "deployment.yaml",
        &["--no-native-sidecar"],
        "deployment.non-native.golden.yaml",
    );
    let spec = &docs[0]["spec"]["template"]["spec"];
    assert!(spec.get("initContainers").is_none());
    let sidecar = named(&spec["containers"], "idemproxy").expect("a container");
    assert!(sidecar.get("restartPolicy").is_none());
    assert_eq!(sidecar["lifecycle"]["preStop"]["sleep"]["seconds"], 5);
    assert!(args_of(sidecar)
        .windows(2)
        .any(|w| w == ["--drain-timeout", "20s"]));
    assert_eq!(spec["containers"][1]["name"], "orders");
}

#[test]
fn a_statefulset_keeps_its_init_containers_and_its_claim_and_takes_its_annotations() {
    let docs = check_golden("statefulset.yaml", &[], "statefulset.golden.yaml");
    let spec = &docs[0]["spec"]["template"]["spec"];
    let init = spec["initContainers"].as_array().expect("init containers");
    assert_eq!(init.len(), 2);
    assert_eq!(init[0]["name"], "idemproxy");
    assert_eq!(init[1]["name"], "migrate");
    let sidecar = &init[0];
    assert_eq!(sidecar["image"], "registry.example/idemproxy:0.1.0");
    let args = args_of(sidecar);
    assert!(args
        .windows(2)
        .any(|w| w == ["--config", "/etc/idemproxy/config.toml"]));
    assert!(args.windows(2).any(|w| w == ["--store", "redis"]));
    assert!(args.contains(&"http://127.0.0.1:9090"));
    assert!(
        named(&spec["volumes"], "idemproxy-data").is_none(),
        "the claim template provides the data volume"
    );
    let config = named(&spec["volumes"], "idemproxy-config").expect("the config volume");
    assert_eq!(config["configMap"]["name"], "ledger-idemproxy");
}

#[test]
fn jobs_and_cronjobs_are_injected() {
    let docs = check_golden("job.yaml", &[], "job.golden.yaml");
    let job = &docs[0]["spec"]["template"]["spec"];
    let sidecar = named(&job["initContainers"], "idemproxy").expect("the Job's sidecar");
    assert!(args_of(sidecar).contains(&"http://127.0.0.1:7000"));
    let cron = &docs[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    let sidecar = named(&cron["initContainers"], "idemproxy").expect("the CronJob's sidecar");
    assert!(args_of(sidecar).contains(&"http://127.0.0.1:7100"));
}

#[test]
fn a_list_honours_opt_out_and_the_per_pod_mode() {
    let docs = check_golden("pods.yaml", &[], "pods.golden.yaml");
    let items = docs[0]["items"].as_array().expect("items");
    let skipped = &items[0]["spec"];
    assert_eq!(skipped["containers"].as_array().map(Vec::len), Some(1));
    assert!(skipped.get("volumes").is_none());
    let classic = &items[1]["spec"];
    assert!(named(&classic["containers"], "idemproxy").is_some());
    assert!(classic.get("initContainers").is_none());
}

#[test]
fn a_pod_without_an_app_port_is_refused_naming_the_annotation() {
    let path = dir().join("no-port.yaml");
    let output = inject(&["-f", path.to_str().expect("UTF-8 path")], None);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Deployment portless"), "{stderr}");
    assert!(stderr.contains("idemproxy.io/app-port"), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing half-written to stdout");
}

#[test]
fn bad_annotations_and_bad_yaml_are_refused_with_what_is_wrong() {
    let pod = |annotation: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    {annotation}\n\
             spec:\n  containers:\n    - name: app\n      image: app:1\n      ports: [{{containerPort: 50051}}]\n"
        )
    };
    let cases = [
        (
            pod("idemproxy.io/app-port: \"http\""),
            "idemproxy.io/app-port",
        ),
        (
            pod("idemproxy.io/app-port: \"16000\""),
            "sidecar's own ports",
        ),
        (
            pod("idemproxy.io/store: \"etcd\""),
            "sled, redis or redis-cluster",
        ),
        (
            pod("idemproxy.io/native-sidecar: \"yes\""),
            "\"true\" or \"false\"",
        ),
        (
            "kind: Pod\nspec: [unclosed\n".to_owned(),
            "document 1 is not valid YAML",
        ),
        (
            "kind: Pod\nmetadata: {name: p}\nspec:\n  containers: 3\n".to_owned(),
            "Pod p is not a valid pod template",
        ),
    ];
    for (input, expected) in cases {
        let output = inject(&["-f", "-"], Some(&input));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{input}: {stderr}");
        assert!(stderr.contains(expected), "{input}: {stderr}");
    }
}

#[test]
fn objects_without_pods_pass_through_unchanged() {
    let input = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: '1'\n";
    let output = stdout_of(&inject(&["-f", "-"], Some(input)));
    assert_eq!(documents(&output), documents(input));
}
