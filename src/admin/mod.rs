//! The operators' API (`idemproxy.v1.Admin`, design: issue "operator tools"): find, list,
//! resolve and purge records, and count them; `keys export` is `ListRecords` page after page.
//! No answer carries a recorded response's bytes (only its status and size), and serials go
//! only to a listing that asks for them. Served on its own listener, loopback by default, with
//! an optional bearer token; grpc.health.v1 and server reflection beside it so grpcurl works.
//! Every change goes through `record.rs` transitions and one `Store::update`, and is logged
//! with who, what and when. `cli.rs` is the `idemproxy keys` client.

pub mod cli;

use crate::engine::{Clock, SystemClock};
use crate::key::{self, Key};
use crate::pb::idemproxy::v1 as pb;
use crate::pb::idemproxy::v1::admin_server::{Admin, AdminServer};
use crate::record::probe::Waiting;
use crate::record::{self, Change, Header, Record, Resolved, Response, State};
use crate::store::{Operation, Store, StoreError, PAGE_RECORDS_MAX};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response as Reply, Status};

/// Pages scanned for one `ListRecords` answer at most, so a filter that matches little
/// cannot make one request walk the whole store.
const LIST_SCANS_MAX: usize = 16;

/// Records `GetStats` counts at most.
const STATS_RECORDS_MAX: usize = 10_000_000;

/// The admin service over the sidecar's store (the same store stack the engine writes
/// through, so records are shown opened and an operator's answer is sealed like the
/// service's when encryption at rest is on).
pub struct AdminService<S> {
    store: Arc<S>,
    /// The backend's name, for `GetStats`.
    backend: &'static str,
    clock: SystemClock,
    retention: Duration,
}

impl<S: Store> AdminService<S> {
    /// The service over `store` (a `backend` store); `retention` is given to records an
    /// operator completes.
    pub fn new(store: Arc<S>, backend: &'static str, retention: Duration) -> AdminService<S> {
        AdminService {
            store,
            backend,
            clock: SystemClock::new(),
            retention,
        }
    }

    /// An operator's change of the record of `key`.
    async fn update<T: Send>(
        &self,
        key: &Key,
        transition: impl FnMut(Option<&Record>) -> (Change, T) + Send,
    ) -> Result<T, StoreError> {
        self.store
            .update(Operation::Operator, key, transition)
            .await
    }

    /// The record of `key` as it is now.
    async fn read(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        self.store
            .update(Operation::Read, key, |current| {
                (Change::Keep, current.cloned())
            })
            .await
    }
}

fn view(key: &Key, record: &Record, now_ms: u64) -> pb::RecordView {
    pb::RecordView {
        key_hash: key.hex(),
        state: record::state_name(record::effective_state(record, now_ms)).to_owned(),
        method: record.method.clone(),
        caller: record.caller.clone(),
        created_ms: record.created_ms,
        completed_ms: record.completed_ms,
        expires_ms: record.expires_ms,
        lease_until_ms: record.lease_until_ms,
        grpc_status: record
            .response
            .as_ref()
            .map(|response| response.grpc_status),
        response_bytes: record.response.as_ref().map_or(0, |r| r.body.len() as u64),
        fingerprint: key::hex(&record.fingerprint),
        in_doubt_reason: record.in_doubt_reason.clone(),
        response_not_kept: record.response_not_kept,
        trace_id: record
            .origin_trace
            .get(..16)
            .map(key::hex)
            .unwrap_or_default(),
        resolved_by: if record
            .response
            .as_ref()
            .is_some_and(|r| r.resolved_by_probe)
        {
            "probe".to_owned()
        } else {
            String::new()
        },
        probes: record.probes,
        next_probe_ms: record.next_probe_ms,
        waiting_for: record::probe::waiting_for(record, now_ms)
            .map(|waiting| waiting.name().to_owned())
            .unwrap_or_default(),
        // Only a listing that asks for serials shows them (`list_records`).
        serial: String::new(),
    }
}

fn store_status(error: StoreError) -> Status {
    Status::unavailable(format!("the store failed: {error}"))
}

fn selected(selector: Option<pb::KeySelector>) -> Result<Key, Status> {
    use pb::key_selector::Key as Selector;
    match selector.and_then(|selector| selector.key) {
        Some(Selector::KeyHash(hash)) => Key::from_hex(&hash).ok_or_else(|| {
            Status::invalid_argument(format!("key_hash {hash:?} is not 64 hex digits"))
        }),
        Some(Selector::Call(call)) => {
            key::validate_serial(call.serial.as_bytes())
                .map_err(|error| Status::invalid_argument(error.to_string()))?;
            if !call.method.starts_with('/') {
                return Err(Status::invalid_argument(
                    "method is written /package.Service/Method",
                ));
            }
            let caller = if call.caller.is_empty() {
                key::ANONYMOUS_CALLER
            } else {
                &call.caller
            };
            Ok(Key::derive(&call.method, caller, call.serial.as_bytes()))
        }
        None => Err(Status::invalid_argument(
            "name the record: key_hash, or method + caller + serial",
        )),
    }
}

fn peer<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), |addr| addr.to_string())
}

/// The record as it was before an operator's change, or why the change was refused.
fn applied(key: &Key, resolved: Resolved, wanted: &str) -> Result<Record, Status> {
    match resolved {
        Resolved::Applied(before) => Ok(*before),
        Resolved::NotFound => Err(Status::not_found(format!("no record for key {key}"))),
        Resolved::Refused(state) => Err(Status::failed_precondition(format!(
            "record {key} is {}; {wanted}",
            record::state_name(state)
        ))),
    }
}

/// A trailers-only answer with `code` and `message`, as a service would send an error.
fn error_response(code: u32, message: &str) -> Response {
    let header = |name: &str, value: &str| Header {
        name: name.to_owned(),
        value: bytes::Bytes::copy_from_slice(value.as_bytes()),
    };
    let mut headers = vec![
        header("content-type", "application/grpc"),
        header("grpc-status", &code.to_string()),
    ];
    if !message.is_empty() {
        headers.push(header(
            "grpc-message",
            &crate::status::percent_encode(message),
        ));
    }
    Response {
        http_status: 200,
        headers,
        trailers_only: true,
        grpc_status: code,
        ..Response::default()
    }
}

#[tonic::async_trait]
impl<S: Store> Admin for AdminService<S> {
    async fn get_record(
        &self,
        request: Request<pb::GetRecordRequest>,
    ) -> Result<Reply<pb::RecordView>, Status> {
        let key = selected(request.into_inner().key)?;
        let found = self.read(&key).await.map_err(store_status)?;
        match found {
            Some(record) => Ok(Reply::new(view(&key, &record, self.clock.now_ms()))),
            None => Err(Status::not_found(format!("no record for key {key}"))),
        }
    }

    async fn list_records(
        &self,
        request: Request<pb::ListRecordsRequest>,
    ) -> Result<Reply<pb::ListRecordsResponse>, Status> {
        let peer = peer(&request);
        let filter = request.into_inner();
        refuse_unknown_names(&filter)?;
        let page_size = match filter.page_size {
            0 => 100,
            size => (size as usize).min(PAGE_RECORDS_MAX),
        };
        let mut cursor = if filter.page_token.is_empty() {
            None
        } else {
            Some(decode_token(&filter.page_token)?)
        };
        if filter.with_serial && cursor.is_none() {
            // Serials are what a caller sends to be answered from a record: say who read them.
            tracing::warn!(%peer, "operator listed records with their serials");
        }
        let now_ms = self.clock.now_ms();
        let mut records = Vec::new();
        for _ in 0..LIST_SCANS_MAX {
            let page = self
                .store
                .scan(cursor.take(), page_size - records.len())
                .await
                .map_err(store_status)?;
            for (key, record) in &page.records {
                let mut shown = view(key, record, now_ms);
                if listed(&filter, &shown, now_ms) {
                    if filter.with_serial {
                        shown.serial = String::from_utf8_lossy(&record.serial).into_owned();
                    }
                    records.push(shown);
                }
            }
            cursor = page.next;
            if cursor.is_none() || records.len() >= page_size {
                break;
            }
        }
        Ok(Reply::new(pb::ListRecordsResponse {
            records,
            next_page_token: cursor.map(|bytes| key::hex(&bytes)).unwrap_or_default(),
        }))
    }

    async fn resolve_record(
        &self,
        request: Request<pb::ResolveRecordRequest>,
    ) -> Result<Reply<pb::RecordView>, Status> {
        use pb::resolve_record_request::Resolution;
        let peer = peer(&request);
        let asked = request.into_inner();
        let key = selected(asked.key)?;
        if asked.operator.trim().is_empty() {
            return Err(Status::invalid_argument("name the operator who decides"));
        }
        let now_ms = self.clock.now_ms();
        let (resolved, how) = match asked.resolution {
            Some(Resolution::Forget(_)) => {
                let resolved = self
                    .update(&key, |current| record::resolve_forget(current, now_ms))
                    .await;
                (resolved, "forget".to_owned())
            }
            Some(Resolution::Complete(complete)) => {
                if complete.grpc_status == 0 || complete.grpc_status > 16 {
                    return Err(Status::invalid_argument(
                        "complete with a status from 1 to 16: an OK answer needs the service's response message, which only the service has (forget the record to let a retry run instead)",
                    ));
                }
                let response = error_response(complete.grpc_status, &complete.grpc_message);
                let expires_ms = now_ms + self.retention.as_millis() as u64;
                let resolved = self
                    .update(&key, |current| {
                        record::resolve_complete(current, response.clone(), now_ms, expires_ms)
                    })
                    .await;
                (
                    resolved,
                    format!("complete with status {}", complete.grpc_status),
                )
            }
            None => return Err(Status::invalid_argument("choose forget or complete")),
        };
        let before = applied(
            &key,
            resolved.map_err(store_status)?,
            "only IN_DOUBT records are resolved",
        )?;
        tracing::warn!(
            key = %key.short(),
            operator = %asked.operator,
            reason = %asked.reason,
            %peer,
            resolution = %how,
            "operator resolved an IN_DOUBT record"
        );
        let after = self.read(&key).await.map_err(store_status)?;
        Ok(Reply::new(view(
            &key,
            after.as_ref().unwrap_or(&before),
            now_ms,
        )))
    }

    async fn purge_records(
        &self,
        request: Request<pb::PurgeRecordsRequest>,
    ) -> Result<Reply<pb::PurgeRecordsResponse>, Status> {
        use pb::purge_records_request::Target;
        let peer = peer(&request);
        let asked = request.into_inner();
        let now_ms = self.clock.now_ms();
        let purged = match asked.target {
            Some(Target::Key(selector)) => {
                let key = selected(Some(selector))?;
                let resolved = self
                    .update(&key, |current| record::purge(current, now_ms))
                    .await
                    .map_err(store_status)?;
                let refusal = "a call may still be running under it; wait for its lease to end";
                applied(&key, resolved, refusal)?;
                tracing::warn!(key = %key.short(), operator = %asked.operator, %peer, "operator purged a record");
                1
            }
            Some(Target::AllExpired(true)) => {
                let store = self.store.clone();
                let done = tokio::task::spawn_blocking(move || store.maintain(now_ms))
                    .await
                    .map_err(|error| Status::internal(error.to_string()))?
                    .map_err(store_status)?;
                tracing::info!(expired = done.expired, operator = %asked.operator, %peer, "operator purged expired records");
                done.expired
            }
            _ => return Err(Status::invalid_argument("name a record, or all_expired")),
        };
        Ok(Reply::new(pb::PurgeRecordsResponse { purged }))
    }

    async fn get_stats(&self, _: Request<pb::GetStatsRequest>) -> Result<Reply<pb::Stats>, Status> {
        let now_ms = self.clock.now_ms();
        let mut stats = pb::Stats {
            backend: self.backend.to_owned(),
            store_bytes: self.store.usage().bytes,
            ..pb::Stats::default()
        };
        let mut cursor = None;
        let mut seen = 0usize;
        loop {
            let page = self
                .store
                .scan(cursor.take(), PAGE_RECORDS_MAX)
                .await
                .map_err(store_status)?;
            for (_, record) in &page.records {
                stats.records += 1;
                match record::effective_state(record, now_ms) {
                    State::InFlight => stats.in_flight += 1,
                    State::Completed => stats.completed += 1,
                    State::InDoubt | State::Unspecified => stats.in_doubt += 1,
                }
                if stats.oldest_created_ms == 0 || record.created_ms < stats.oldest_created_ms {
                    stats.oldest_created_ms = record.created_ms;
                }
            }
            seen += page.records.len();
            cursor = page.next;
            if cursor.is_none() || seen >= STATS_RECORDS_MAX {
                break;
            }
        }
        Ok(Reply::new(stats))
    }
}

/// Refuses a state or a wait that is none: a typo must not read as "no record is in that
/// state".
fn refuse_unknown_names(filter: &pb::ListRecordsRequest) -> Result<(), Status> {
    if !filter.state.is_empty() && record::state_named(&filter.state).is_none() {
        return Err(Status::invalid_argument(format!(
            "state {:?} is not a record state; use one of {}",
            filter.state,
            record::STATE_NAMES.join(", ")
        )));
    }
    let waits = [Waiting::Probe, Waiting::Operator].map(Waiting::name);
    if !filter.waiting_for.is_empty() && !waits.contains(&filter.waiting_for.as_str()) {
        return Err(Status::invalid_argument(format!(
            "waiting_for {:?} is not what a record waits for; use one of {}",
            filter.waiting_for,
            waits.join(", ")
        )));
    }
    Ok(())
}

/// Whether the record `shown` passes the filters of a `ListRecords` request at `now_ms`.
fn listed(filter: &pb::ListRecordsRequest, shown: &pb::RecordView, now_ms: u64) -> bool {
    let old_enough = now_ms.saturating_sub(shown.created_ms) >= filter.older_than_ms;
    (filter.state.is_empty() || filter.state == shown.state)
        && (filter.method.is_empty() || filter.method == shown.method)
        && (filter.caller.is_empty() || filter.caller == shown.caller)
        && (filter.waiting_for.is_empty() || filter.waiting_for == shown.waiting_for)
        && old_enough
        && shown.created_ms >= filter.created_since_ms
}

fn decode_token(token: &str) -> Result<Vec<u8>, Status> {
    key::unhex(token)
        .filter(|bytes| bytes.len() <= 128)
        .ok_or_else(|| {
            Status::invalid_argument(format!("page_token {token:?} is not one this API gave"))
        })
}

/// Checks the bearer token on every admin call when one is configured.
#[derive(Clone)]
pub struct TokenCheck {
    token: Option<Arc<str>>,
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compare in constant time, so the answer's timing does not leak the token.
        let same = given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0;
        if same {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "a valid admin bearer token is required",
            ))
        }
    }
}

/// How long an admin client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// TLS connections accepted on `listener`, each handshake on a task of its own (so a client
/// that stalls holds up no other), with the newest certificates `tls` holds.
fn tls_incoming(
    listener: tokio::net::TcpListener,
    tls: Arc<crate::tls::Reloading>,
) -> impl futures_util::Stream<
    Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
> {
    let (handshaken, mut incoming) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // The server stopped: nothing takes connections any more.
                () = handshaken.closed() => return,
            };
            let Ok((stream, addr)) = accepted else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let acceptor = tls.acceptor();
            let handshaken = handshaken.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = handshaken.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%addr, %error, "admin TLS handshake failed"),
                    Err(_) => tracing::debug!(%addr, "admin TLS handshake timed out"),
                }
            });
        }
    });
    futures_util::stream::poll_fn(move |cx| incoming.poll_recv(cx))
}

/// Serves the admin API, health and reflection on `listener` until `shutdown`; over TLS when
/// `tls` is set (required off loopback: the bearer token must not cross a network in clear).
pub async fn serve<S: Store>(
    listener: tokio::net::TcpListener,
    service: AdminService<S>,
    (token, tls): (Option<String>, Option<Arc<crate::tls::Reloading>>),
    shutdown: impl std::future::Future<Output = ()>,
) {
    let check = TokenCheck {
        token: token.map(Arc::from),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServer<AdminService<S>>>().await;
    // Reflection v1, and v1alpha for the clients that still ask it (older grpcurl, grpcui,
    // Postman, Python's grpc_reflection.v1alpha), as grpc-go and grpc-java serve both.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::ADMIN_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) =
        match (reflection().build_v1(), reflection().build_v1alpha()) {
            (Ok(v1), Ok(v1alpha)) => (Some(v1), Some(v1alpha)),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%error, "admin reflection unavailable");
                (None, None)
            }
        };
    let router = tonic::transport::Server::builder()
        .add_service(AdminServer::with_interceptor(service, check))
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha);
    let served = match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls_incoming(listener, tls), shutdown)
                .await
        }
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    };
    if let Err(error) = served {
        tracing::error!(%error, "the admin listener failed");
    }
}
