//! Plain HTTP/1.1 for the ops port's probes and `/metrics`, and free ports for listeners.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` over HTTP/1.1: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

/// A loopback address nothing listens on (the port is free when this returns).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The sum of every series of `name` in a `/metrics` text whose labels include each of
/// `labels` (`name{...} value` or `name value`); `None` when no series matches.
pub fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (series_labels, value) = match rest.strip_prefix('{') {
            Some(rest) => match rest.split_once("} ") {
                Some(split) => split,
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest.trim_start()),
            None => continue,
        };
        let matches = labels
            .iter()
            .all(|(label, value)| series_labels.contains(&format!("{label}=\"{value}\"")));
        if let (true, Ok(value)) = (matches, value.trim().parse::<f64>()) {
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}
