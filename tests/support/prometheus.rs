//! A real Prometheus for the tests: Debian's `prometheus` (installed by `scripts/test`) on a
//! free loopback port, scraping the test's targets and evaluating its rule files every second,
//! its data in a temp dir, killed when dropped; its HTTP API read with hyper's client.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// A running `prometheus`.
pub struct Prometheus {
    child: tokio::process::Child,
    /// Where its HTTP API listens.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// How often Prometheus scrapes and evaluates: the shortest its settings allow to be useful.
pub const INTERVAL: &str = "1s";

impl Prometheus {
    /// Starts Prometheus scraping `GET /metrics` of each of `targets` (job `idemproxy`) and
    /// evaluating `rule_files`, both every second; returns once it says it is ready.
    pub async fn start(targets: &[SocketAddr], rule_files: &[&Path]) -> Prometheus {
        let version = std::process::Command::new("prometheus")
            .arg("--version")
            .output();
        assert!(
            version.is_ok_and(|output| output.status.success()),
            "Debian's prometheus is not installed: run scripts/test, which installs it"
        );
        let dir = tempfile::tempdir().expect("a temp dir");
        // JSON is YAML: the paths and addresses need no quoting rules of their own.
        let config = serde_json::json!({
            "global": {
                "scrape_interval": INTERVAL,
                "scrape_timeout": INTERVAL,
                "evaluation_interval": INTERVAL,
            },
            "rule_files": rule_files,
            "scrape_configs": [{
                "job_name": "idemproxy",
                "metrics_path": "/metrics",
                "static_configs": [{
                    "targets": targets.iter().map(ToString::to_string).collect::<Vec<_>>(),
                }],
            }],
        });
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config.to_string()).expect("writes the config");
        let addr = super::http::free_addr();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("a log file");
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus starts");
        let prometheus = Prometheus { child, addr, dir };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while prometheus
            .get_raw("/-/ready")
            .await
            .map(|(status, _)| status)
            != Some(200)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus not ready within 60 s:\n{}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        prometheus
    }

    /// What Prometheus logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The warnings and errors Prometheus logged so far (a failed scrape, a rule's error).
    pub fn warnings(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|line| !line.contains("level=info"))
            .collect();
        format!("Prometheus' warnings and errors:\n{}", lines.join("\n"))
    }

    /// `GET path` (with its query string): (status, body), or `None` while nothing listens.
    async fn get_raw(&self, path: &str) -> Option<(u16, Bytes)> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.ok()?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .ok()?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header("host", self.addr.to_string())
            .body(Empty::<Bytes>::new())
            .expect("a request");
        let response = sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    }

    /// `GET /api/v1/{endpoint}`: its `data` when Prometheus answers `success`, else its
    /// error, said in full.
    pub async fn api(&self, endpoint: &str) -> Result<serde_json::Value, String> {
        let (status, body) = self
            .get_raw(&format!("/api/v1/{endpoint}"))
            .await
            .expect("prometheus answers");
        let answer: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|error| panic!("{endpoint}: {error}: {body:?}"));
        match (status, answer["status"].as_str()) {
            (200, Some("success")) => Ok(answer["data"].clone()),
            _ => Err(format!("{endpoint}: HTTP {status}: {answer}")),
        }
    }

    /// The instant vector `expr` evaluates to now, or Prometheus' error.
    pub async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let data = self
            .api(&format!("query?query={}", percent_encoded(expr)))
            .await?;
        match data["resultType"].as_str() {
            Some("vector") => Ok(data["result"].as_array().cloned().unwrap_or_default()),
            other => Err(format!("{expr}: a {other:?}, not an instant vector")),
        }
    }

    /// Every rule Prometheus loaded, as `/api/v1/rules` shows it (health, last error, state).
    pub async fn rules(&self) -> Vec<serde_json::Value> {
        let data = self.api("rules").await.expect("the rules");
        let groups = data["groups"].as_array().cloned().unwrap_or_default();
        groups
            .iter()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The alerts pending or firing now, with their labels and annotations.
    pub async fn alerts(&self) -> Vec<serde_json::Value> {
        let data = self.api("alerts").await.expect("the alerts");
        data["alerts"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// `text` as a URL's query value: every byte but the unreserved ones as `%XX`.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}
