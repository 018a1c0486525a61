//! The test upstream: a tonic Ledger service that counts every execution.

use idemproxy::pb::idemproxy::testing::v1::ledger_server::{Ledger, LedgerServer};
use idemproxy::pb::idemproxy::testing::v1::{ApplyReply, ApplyRequest};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// `fail_code` that makes the service act and then drop the call: its task panics, so the
/// HTTP/2 stream is reset after the request was processed.
pub const RESET_AFTER_ACTING: u32 = 1000;

/// What the service has done.
#[derive(Default)]
pub struct LedgerState {
    executions: AtomicU64,
    arrivals: AtomicU64,
    balances: Mutex<HashMap<String, i64>>,
    per_account: Mutex<HashMap<String, u64>>,
    traceparents: Mutex<Vec<String>>,
}

impl LedgerState {
    /// Executions of every method, in total.
    pub fn executions(&self) -> u64 {
        self.executions.load(Ordering::SeqCst)
    }

    /// Apply calls that reached the service, counted as they arrive (before any delay).
    pub fn arrivals(&self) -> u64 {
        self.arrivals.load(Ordering::SeqCst)
    }

    /// Executions for one account.
    pub fn executions_of(&self, account: &str) -> u64 {
        self.per_account
            .lock()
            .unwrap()
            .get(account)
            .copied()
            .unwrap_or(0)
    }

    /// The `traceparent` metadata of every Apply call that reached the service, in order.
    pub fn traceparents(&self) -> Vec<String> {
        self.traceparents.lock().unwrap().clone()
    }

    /// Every account executed more than once, with its count.
    pub fn executed_twice(&self) -> Vec<(String, u64)> {
        let per_account = self.per_account.lock().unwrap();
        per_account
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(a, n)| (a.clone(), *n))
            .collect()
    }

    fn act(&self, request: &ApplyRequest) -> ApplyReply {
        let execution = self.executions.fetch_add(1, Ordering::SeqCst) + 1;
        *self
            .per_account
            .lock()
            .unwrap()
            .entry(request.account.clone())
            .or_insert(0) += 1;
        let mut balances = self.balances.lock().unwrap();
        let balance = balances.entry(request.account.clone()).or_insert(0);
        *balance += request.amount;
        ApplyReply {
            balance: *balance,
            execution,
            padding: vec![b'p'; request.reply_padding_bytes as usize],
        }
    }
}

fn failure(request: &ApplyRequest) -> Status {
    let code = tonic::Code::from(request.fail_code as i32);
    let mut status = if request.with_details {
        Status::with_details(
            code,
            request.fail_message.clone(),
            b"\x08\x01opaque-details".to_vec().into(),
        )
    } else {
        Status::new(code, request.fail_message.clone())
    };
    status
        .metadata_mut()
        .insert("x-ledger-trailer", "kept".parse().unwrap());
    status
}

/// The service.
#[derive(Clone, Default)]
pub struct LedgerService {
    pub state: Arc<LedgerState>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ApplyReply, Status>> + Send>>;

#[tonic::async_trait]
impl Ledger for LedgerService {
    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<ApplyReply>, Status> {
        self.state.arrivals.fetch_add(1, Ordering::SeqCst);
        if let Some(traceparent) = request.metadata().get("traceparent") {
            let traceparent = traceparent.to_str().unwrap_or("(not ASCII)").to_owned();
            self.state.traceparents.lock().unwrap().push(traceparent);
        }
        let request = request.into_inner();
        if request.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(request.delay_ms.into())).await;
        }
        let reply = self.state.act(&request);
        if request.fail_code == RESET_AFTER_ACTING {
            panic!("test upstream: acted, now dropping the call");
        }
        if request.fail_code != 0 {
            return Err(failure(&request));
        }
        let mut response = Response::new(reply.clone());
        response.metadata_mut().insert(
            "x-ledger-execution",
            reply.execution.to_string().parse().unwrap(),
        );
        Ok(response)
    }

    type WatchStream = ReplyStream;

    async fn watch(&self, request: Request<ApplyRequest>) -> Result<Response<ReplyStream>, Status> {
        let request = request.into_inner();
        let reply = self.state.act(&request);
        let mut items: Vec<Result<ApplyReply, Status>> = (0..request.stream_messages)
            .map(|_| Ok(reply.clone()))
            .collect();
        if request.fail_code != 0 {
            items.push(Err(failure(&request)));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn collect(
        &self,
        request: Request<Streaming<ApplyRequest>>,
    ) -> Result<Response<ApplyReply>, Status> {
        let mut stream = request.into_inner();
        let mut last = ApplyReply::default();
        while let Some(item) = stream.message().await? {
            last = self.state.act(&item);
        }
        Ok(Response::new(last))
    }

    type ChatStream = ReplyStream;

    async fn chat(
        &self,
        request: Request<Streaming<ApplyRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let mut stream = request.into_inner();
        let state = self.state.clone();
        let replies = async_stream(move |tx| async move {
            while let Ok(Some(item)) = stream.message().await {
                if tx.send(Ok(state.act(&item))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(replies))
    }
}

fn async_stream<F, Fut>(body: F) -> ReplyStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<ApplyReply, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A running ledger.
pub struct LedgerHandle {
    pub addr: SocketAddr,
    pub state: Arc<LedgerState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LedgerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the ledger on a free loopback port.
pub async fn start() -> LedgerHandle {
    start_on(TcpListener::bind("127.0.0.1:0").await.expect("binds")).await
}

/// Starts the ledger on `listener`.
pub async fn start_on(listener: TcpListener) -> LedgerHandle {
    let addr = listener.local_addr().expect("bound");
    let service = LedgerService::default();
    let state = service.state.clone();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(LedgerServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    LedgerHandle { addr, state, task }
}
