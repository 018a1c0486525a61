//! Sidecar injection: a pod template in, the same pod template with idemproxy added out.
//!
//! One pure mutation serves both ways of injecting: `idemproxy inject` (YAML files, manual)
//! and `idemproxy injector` (the admission webhook, which turns the difference into a JSON
//! patch). It reads the pod through k8s-openapi's types, so a malformed pod is named, and
//! writes the sidecar's parts into the user's JSON value, so it never drops, reorders or
//! normalises anything of the user's own, including fields newer than the types it knows.
//! Injecting twice changes nothing: a pod that already has an `idemproxy` container is left
//! as it is.

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction,
    Lifecycle, LifecycleHandler, PodSpec, Probe, ResourceRequirements, SeccompProfile,
    SecurityContext, SleepAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;
use std::collections::BTreeMap;

/// The sidecar container's name; its presence marks a pod as injected.
pub const SIDECAR_NAME: &str = "idemproxy";
/// The volume holding the sled data dir (an emptyDir unless the pod brings its own).
pub const DATA_VOLUME: &str = "idemproxy-data";
/// The volume of the ConfigMap named by `idemproxy.io/config`.
pub const CONFIG_VOLUME: &str = "idemproxy-config";
/// The proxy's port in the pod (design §7).
pub const PROXY_PORT: u16 = 16000;
/// The ops port: health and metrics (design §7).
pub const OPS_PORT: u16 = 16090;
/// The admin port, loopback only (design §7).
pub const ADMIN_PORT: u16 = 16091;
/// Without a native sidecar, the sidecar's SIGTERM waits this long after the pod starts
/// stopping, so the endpoints are gone before it stops taking calls.
pub const PRE_STOP_SLEEP_SECONDS: i64 = 5;

/// Annotation (or label) `"false"`: never inject this pod.
pub const ANNOTATION_INJECT: &str = "idemproxy.io/inject";
/// The port the app serves gRPC on, inside the pod.
pub const ANNOTATION_APP_PORT: &str = "idemproxy.io/app-port";
/// A ConfigMap with `config.toml`, mounted at /etc/idemproxy.
pub const ANNOTATION_CONFIG: &str = "idemproxy.io/config";
/// `sled` (default), `redis` or `redis-cluster`.
pub const ANNOTATION_STORE: &str = "idemproxy.io/store";
/// The Redis URL(s) for the `redis` and `redis-cluster` stores.
pub const ANNOTATION_REDIS_URL: &str = "idemproxy.io/redis-url";
/// The sidecar image, over the injector's default.
pub const ANNOTATION_IMAGE: &str = "idemproxy.io/image";
/// `"false"`: a regular container with a preStop pause instead of a native sidecar.
pub const ANNOTATION_NATIVE: &str = "idemproxy.io/native-sidecar";

/// How the injector adds the sidecar, before a pod's annotations have their say.
#[derive(Clone, Debug)]
pub struct InjectSettings {
    /// The sidecar image.
    pub image: String,
    /// A native sidecar (an init container with `restartPolicy: Always`, Kubernetes ≥ 1.29),
    /// or a regular container with a preStop pause for older clusters.
    pub native: bool,
}

impl Default for InjectSettings {
    fn default() -> Self {
        InjectSettings {
            image: format!("idemproxy:{}", env!("CARGO_PKG_VERSION")),
            native: true,
        }
    }
}

/// What injection did to one pod template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added.
    Injected,
    /// The pod already has an `idemproxy` container: nothing changed.
    AlreadyInjected,
    /// `idemproxy.io/inject: "false"`: nothing changed.
    OptedOut,
}

/// Why a pod could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The pod template does not decode as a Kubernetes pod.
    #[error("{what} is not a valid pod template: {reason}")]
    InvalidPod {
        /// Which object.
        what: String,
        /// The decoder's words.
        reason: String,
    },
    /// No app port: neither the annotation nor a container port says where the app listens.
    #[error("{what}: set the annotation {ANNOTATION_APP_PORT} to the port the app serves gRPC on (no container declares a port)")]
    NoAppPort {
        /// Which object.
        what: String,
    },
    /// An annotation with a value it cannot have.
    #[error("{what}: annotation {name}={value:?} {why}")]
    BadAnnotation {
        /// Which object.
        what: String,
        /// The annotation.
        name: &'static str,
        /// Its value.
        value: String,
        /// What it must be.
        why: &'static str,
    },
    /// A document of a YAML input that is not YAML.
    #[error("document {index} is not valid YAML: {reason}")]
    Yaml {
        /// 1-based position in the input.
        index: usize,
        /// The parser's words.
        reason: String,
    },
}

/// Adds the sidecar to a pod template (`{metadata, spec}`: a Pod, or a workload's
/// `spec.template`). `what` names the object in errors; `claimed_volumes` are the volumes the
/// workload provides besides the pod's own (a StatefulSet's `volumeClaimTemplates`), so a
/// claim named `idemproxy-data` keeps the records on a persistent volume.
pub fn inject_template(
    template: &mut Value,
    settings: &InjectSettings,
    what: &str,
    claimed_volumes: &[String],
) -> Result<Outcome, InjectError> {
    let invalid = |reason: String| InjectError::InvalidPod {
        what: what.to_owned(),
        reason,
    };
    let Some(object) = template.as_object_mut() else {
        return Err(invalid("not an object".into()));
    };
    let metadata: ObjectMeta = decode(object.get("metadata")).map_err(&invalid)?;
    let spec: PodSpec = decode(object.get("spec")).map_err(&invalid)?;
    let annotations = Annotations::of(&metadata, what);
    if annotations.get(ANNOTATION_INJECT) == Some("false")
        || metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ANNOTATION_INJECT))
            == Some(&"false".into())
    {
        return Ok(Outcome::OptedOut);
    }
    let containers = spec.containers.iter();
    if containers
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == SIDECAR_NAME)
    {
        return Ok(Outcome::AlreadyInjected);
    }
    let plan = Plan::resolve(&annotations, &spec, settings)?;
    let spec_value = object
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| invalid("has no spec".into()))?;
    let sidecar = serde_json::to_value(plan.container()).expect("a Container serialises");
    let list = if plan.native {
        "initContainers"
    } else {
        "containers"
    };
    // First: a native sidecar starts before the other init containers need the network,
    // and a regular one is started first by the kubelet.
    array_at(spec_value, list).insert(0, sidecar);
    let has_volume = |name: &str| {
        spec.volumes.iter().flatten().any(|v| v.name == name)
            || claimed_volumes.iter().any(|claimed| claimed == name)
    };
    if !has_volume(DATA_VOLUME) {
        array_at(spec_value, "volumes").push(volume_value(Volume {
            name: DATA_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        }));
    }
    if let Some(config_map) = &plan.config_map {
        if !has_volume(CONFIG_VOLUME) {
            array_at(spec_value, "volumes").push(volume_value(Volume {
                name: CONFIG_VOLUME.into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: config_map.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }));
        }
    }
    Ok(Outcome::Injected)
}

fn decode<T: serde::de::DeserializeOwned + Default>(value: Option<&Value>) -> Result<T, String> {
    match value {
        None | Some(Value::Null) => Ok(T::default()),
        Some(value) => T::deserialize(value).map_err(|e| e.to_string()),
    }
}

fn array_at<'a>(object: &'a mut serde_json::Map<String, Value>, name: &str) -> &'a mut Vec<Value> {
    let slot = object
        .entry(name)
        .or_insert_with(|| Value::Array(Vec::new()));
    if !slot.is_array() {
        // `null` (as YAML writes an empty key): decoding accepted it, so it means "none".
        *slot = Value::Array(Vec::new());
    }
    slot.as_array_mut().expect("made an array above")
}

fn volume_value(volume: Volume) -> Value {
    serde_json::to_value(volume).expect("a Volume serialises")
}

/// A pod's annotations, read with the object's name at hand for errors.
struct Annotations<'a> {
    map: Option<&'a BTreeMap<String, String>>,
    what: &'a str,
}

impl<'a> Annotations<'a> {
    fn of(metadata: &'a ObjectMeta, what: &'a str) -> Self {
        Annotations {
            map: metadata.annotations.as_ref(),
            what,
        }
    }

    fn get(&self, name: &str) -> Option<&'a str> {
        self.map.and_then(|m| m.get(name)).map(String::as_str)
    }

    fn bad(&self, name: &'static str, value: &str, why: &'static str) -> InjectError {
        InjectError::BadAnnotation {
            what: self.what.to_owned(),
            name,
            value: value.to_owned(),
            why,
        }
    }

    fn boolean(&self, name: &'static str, default: bool) -> Result<bool, InjectError> {
        match self.get(name) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(other) => Err(self.bad(name, other, "must be \"true\" or \"false\"")),
        }
    }
}

/// The sidecar of one pod, resolved from the settings and the pod's annotations.
struct Plan {
    image: String,
    native: bool,
    app_port: u16,
    config_map: Option<String>,
    store: Option<String>,
    redis_url: Option<String>,
}

impl Plan {
    fn resolve(
        annotations: &Annotations<'_>,
        spec: &PodSpec,
        settings: &InjectSettings,
    ) -> Result<Plan, InjectError> {
        let app_port = match annotations.get(ANNOTATION_APP_PORT) {
            Some(value) => value
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| {
                    annotations.bad(ANNOTATION_APP_PORT, value, "must be a port, 1-65535")
                })?,
            None => first_container_port(spec).ok_or_else(|| InjectError::NoAppPort {
                what: annotations.what.to_owned(),
            })?,
        };
        if [PROXY_PORT, OPS_PORT, ADMIN_PORT].contains(&app_port) {
            let value = app_port.to_string();
            return Err(annotations.bad(
                ANNOTATION_APP_PORT,
                &value,
                "is one of the sidecar's own ports (16000, 16090, 16091): move the app",
            ));
        }
        let store = annotations.get(ANNOTATION_STORE);
        if let Some(store) = store.filter(|s| !["sled", "redis", "redis-cluster"].contains(s)) {
            return Err(annotations.bad(
                ANNOTATION_STORE,
                store,
                "must be sled, redis or redis-cluster",
            ));
        }
        let non_empty = |name: &'static str| match annotations.get(name) {
            Some("") => Err(annotations.bad(name, "", "must not be empty")),
            other => Ok(other.map(str::to_owned)),
        };
        Ok(Plan {
            image: non_empty(ANNOTATION_IMAGE)?.unwrap_or_else(|| settings.image.clone()),
            native: annotations.boolean(ANNOTATION_NATIVE, settings.native)?,
            app_port,
            config_map: non_empty(ANNOTATION_CONFIG)?,
            store: store.map(str::to_owned),
            redis_url: non_empty(ANNOTATION_REDIS_URL)?,
        })
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec!["run".into()];
        if self.config_map.is_some() {
            args.extend(["--config".into(), "/etc/idemproxy/config.toml".into()]);
        }
        args.extend([
            "--upstream".into(),
            format!("http://127.0.0.1:{}", self.app_port),
            "--listen".into(),
            format!("0.0.0.0:{PROXY_PORT}"),
            "--ops-listen".into(),
            format!("0.0.0.0:{OPS_PORT}"),
            "--data-dir".into(),
            "/var/lib/idemproxy".into(),
        ]);
        if !self.native {
            // The preStop pause comes out of the same grace period (30 s by default).
            args.extend(["--drain-timeout".into(), "20s".into()]);
        }
        if let Some(store) = &self.store {
            args.extend(["--store".into(), store.clone()]);
        }
        if let Some(url) = &self.redis_url {
            args.extend(["--redis-url".into(), url.clone()]);
        }
        args
    }

    fn container(&self) -> Container {
        let probe = |path: &str, period_seconds, failure_threshold| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.into()),
                port: IntOrString::String("idemproxy-ops".into()),
                ..Default::default()
            }),
            period_seconds: Some(period_seconds),
            failure_threshold: Some(failure_threshold),
            ..Default::default()
        };
        let port = |name: &str, port: u16| ContainerPort {
            name: Some(name.into()),
            container_port: i32::from(port),
            ..Default::default()
        };
        let mut mounts = vec![VolumeMount {
            name: DATA_VOLUME.into(),
            mount_path: "/var/lib/idemproxy".into(),
            ..Default::default()
        }];
        if self.config_map.is_some() {
            mounts.push(VolumeMount {
                name: CONFIG_VOLUME.into(),
                mount_path: "/etc/idemproxy".into(),
                read_only: Some(true),
                ..Default::default()
            });
        }
        let quantity = |q: &str| Quantity(q.into());
        Container {
            name: SIDECAR_NAME.into(),
            image: Some(self.image.clone()),
            args: Some(self.args()),
            restart_policy: self.native.then(|| "Always".into()),
            ports: Some(vec![
                port("idemproxy-grpc", PROXY_PORT),
                port("idemproxy-ops", OPS_PORT),
            ]),
            // The app starts only once this passes: the store is open and writable.
            startup_probe: Some(probe("/readyz", 1, 60)),
            readiness_probe: Some(probe("/readyz", 5, 3)),
            liveness_probe: Some(probe("/livez", 10, 3)),
            lifecycle: (!self.native).then(|| Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    sleep: Some(SleepAction {
                        seconds: PRE_STOP_SLEEP_SECONDS,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".into(), quantity("100m")),
                    ("memory".into(), quantity("64Mi")),
                ])),
                limits: Some(BTreeMap::from([("memory".into(), quantity("256Mi"))])),
                ..Default::default()
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Default::default()
                }),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            volume_mounts: Some(mounts),
            ..Default::default()
        }
    }
}

fn first_container_port(spec: &PodSpec) -> Option<u16> {
    let ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten());
    ports
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .find_map(|p| u16::try_from(p.container_port).ok())
}

/// Where a workload of this kind keeps its pod template: a path of object keys from the
/// document's root, or `None` for kinds that hold no pod.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Injects every pod template of one Kubernetes object (a `List`'s items included); objects
/// that hold no pod are left as they are. The outcomes, one per pod template.
pub fn inject_object(
    object: &mut Value,
    settings: &InjectSettings,
) -> Result<Vec<Outcome>, InjectError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if kind == "List" {
        let mut outcomes = Vec::new();
        for item in object
            .get_mut("items")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            outcomes.extend(inject_object(item, settings)?);
        }
        return Ok(outcomes);
    }
    let Some(path) = template_path(&kind) else {
        return Ok(Vec::new());
    };
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)");
    let what = format!("{kind} {name}");
    let claims = object
        .pointer("/spec/volumeClaimTemplates")
        .and_then(Value::as_array);
    let claimed_volumes: Vec<String> = claims
        .into_iter()
        .flatten()
        .filter_map(|claim| claim.pointer("/metadata/name")?.as_str().map(str::to_owned))
        .collect();
    let mut template = &mut *object;
    for step in path {
        template = match template.get_mut(*step) {
            Some(next) => next,
            None => {
                return Err(InjectError::InvalidPod {
                    what,
                    reason: format!("has no {}", path.join(".")),
                })
            }
        };
    }
    Ok(vec![inject_template(
        template,
        settings,
        &what,
        &claimed_volumes,
    )?])
}

/// `idemproxy inject`: every document of a YAML stream, with the sidecar added to each pod
/// template, as a YAML stream again (comments are not kept; everything else is).
pub fn inject_yaml(input: &str, settings: &InjectSettings) -> Result<String, InjectError> {
    let mut documents = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
        let yaml_error = |e: serde_yaml_ng::Error| InjectError::Yaml {
            index: index + 1,
            reason: e.to_string(),
        };
        let mut value: Value = serde::Deserialize::deserialize(document).map_err(yaml_error)?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, settings)?;
        documents.push(serde_yaml_ng::to_string(&value).map_err(yaml_error)?);
    }
    Ok(documents.join("---\n"))
}
