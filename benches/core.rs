//! Micro-benchmarks of the per-call pieces: key derivation, fingerprinting, and a durable
//! claim + completion on each store — on sled with group commit against a flush per write,
//! with many writers at once, which is where group commit shows. `cargo bench --bench core`.

#![allow(clippy::unwrap_used)] // Benchmark setup: a failed unwrap is a failed run.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use idemproxy::key::{fingerprint, Key};
use idemproxy::record::{self, ClaimRequest, Response};
use idemproxy::store::memory::MemoryStore;
use idemproxy::store::sled::{SledOptions, SledStore};
use idemproxy::store::{Operation, Store};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn keys(c: &mut Criterion) {
    c.bench_function("key derivation", |b| {
        b.iter(|| {
            Key::derive(
                black_box("/payments.v1.Payments/Charge"),
                black_box("billing"),
                black_box(b"order-7f3a-1"),
            )
        })
    });
    let body = vec![7u8; 1024];
    let mut group = c.benchmark_group("fingerprint");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("1 KiB request", |b| {
        b.iter(|| fingerprint(black_box(&body)))
    });
    group.finish();
}

/// One durable claim and completion of a fresh key: what a first attempt costs the store.
async fn claim_and_complete<S: Store>(store: &S, n: u64) {
    let key = Key::derive("/bench.Svc/Do", "-", &n.to_be_bytes());
    let mut token = [1u8; 16];
    token[8..].copy_from_slice(&n.to_be_bytes());
    let request = ClaimRequest {
        fingerprint: &[3; 32],
        method: "/bench.Svc/Do",
        caller: "-",
        token,
        now_ms: 1,
        lease_until_ms: 60_000,
        expires_ms: 86_400_000,
        sole_owner: Some([1; 8]),
        retry_in_doubt: false,
        origin: None,
        at_quota: false,
        serial: None,
    };
    store
        .update(Operation::Claim, &key, |current| {
            record::claim(current, &request)
        })
        .await
        .unwrap();
    let response = Response {
        http_status: 200,
        body: vec![0; 64].into(),
        ..Response::default()
    };
    store
        .update(Operation::Complete, &key, |current| {
            record::complete(current, &token, Some(response.clone()), 2, 86_400_000)
        })
        .await
        .unwrap();
}

/// `writers` tasks each doing claim + completion; returns when all are done.
async fn concurrent<S: Store>(store: &Arc<S>, counter: &AtomicU64, writers: u64) {
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let store = store.clone();
            let n = counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move { claim_and_complete(&*store, n).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

fn stores(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("claim + complete, 32 writers");
    group.throughput(Throughput::Elements(32));
    group.measurement_time(Duration::from_secs(5));
    let memory = Arc::new(MemoryStore::new(u64::MAX));
    let counter = AtomicU64::new(0);
    group.bench_function("memory", |b| {
        b.to_async(&runtime)
            .iter(|| concurrent(&memory, &counter, 32))
    });
    for per_write in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SledStore::open(&SledOptions {
                dir: dir.path().to_owned(),
                cache_bytes: 8 << 20,
                bytes_max: u64::MAX,
                evict_when_full: false,
                flush_per_write: per_write,
                flush_timeout: Duration::from_secs(30),
                pack_records: 16_384,
            })
            .unwrap(),
        );
        let name = if per_write {
            "flush per write"
        } else {
            "group commit"
        };
        group.bench_function(BenchmarkId::new("sled", name), |b| {
            b.to_async(&runtime)
                .iter(|| concurrent(&store, &counter, 32))
        });
    }
    group.finish();
}

criterion_group!(benches, keys, stores);
criterion_main!(benches);
