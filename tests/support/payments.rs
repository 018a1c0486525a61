//! The example payments service (proto/idemproxy/example/v1/payments.proto) as a real tonic
//! upstream that counts every execution, for the policy tests.

use idemproxy::pb::idemproxy::example::v1::payments_server::{Payments, PaymentsServer};
use idemproxy::pb::idemproxy::example::v1::{
    BalanceReply, BalanceRequest, ChargeReply, ChargeRequest, PayoutEvent, PayoutRequest,
    RefundReply, RefundRequest,
};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Executions of each method.
#[derive(Default)]
pub struct Executions {
    pub charges: AtomicU64,
    pub refunds: AtomicU64,
    pub balances: AtomicU64,
    pub payouts: AtomicU64,
}

impl Executions {
    pub fn charges(&self) -> u64 {
        self.charges.load(Ordering::SeqCst)
    }
    pub fn refunds(&self) -> u64 {
        self.refunds.load(Ordering::SeqCst)
    }
    pub fn balances(&self) -> u64 {
        self.balances.load(Ordering::SeqCst)
    }
    pub fn payouts(&self) -> u64 {
        self.payouts.load(Ordering::SeqCst)
    }
}

#[derive(Default, Clone)]
struct Service {
    executions: Arc<Executions>,
}

type Events = Pin<Box<dyn Stream<Item = Result<PayoutEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Payments for Service {
    type PayoutStream = Events;

    async fn payout(&self, request: Request<PayoutRequest>) -> Result<Response<Events>, Status> {
        let execution = self.executions.payouts.fetch_add(1, Ordering::SeqCst) + 1;
        let events: Vec<Result<PayoutEvent, Status>> = (1..=request.get_ref().steps)
            .map(|step| Ok(PayoutEvent { step, execution }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn charge(
        &self,
        request: Request<ChargeRequest>,
    ) -> Result<Response<ChargeReply>, Status> {
        let execution = self.executions.charges.fetch_add(1, Ordering::SeqCst) + 1;
        let serial = request
            .get_ref()
            .payment
            .as_ref()
            .map(|p| p.serial.clone())
            .unwrap_or_default();
        Ok(Response::new(ChargeReply {
            charge_id: format!("ch-{serial}-{execution}"),
            execution,
        }))
    }

    async fn refund(&self, _: Request<RefundRequest>) -> Result<Response<RefundReply>, Status> {
        let execution = self.executions.refunds.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Response::new(RefundReply { execution }))
    }

    async fn get_balance(
        &self,
        _: Request<BalanceRequest>,
    ) -> Result<Response<BalanceReply>, Status> {
        let execution = self.executions.balances.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Response::new(BalanceReply {
            balance_cents: 100,
            execution,
        }))
    }
}

/// A running payments service.
pub struct PaymentsHandle {
    pub addr: SocketAddr,
    pub executions: Arc<Executions>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PaymentsHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Which server reflection the service also serves.
#[derive(Debug, Clone, Copy)]
pub enum Reflection {
    V1,
    V1Alpha,
}

/// Starts the service on a free loopback port.
pub async fn start() -> PaymentsHandle {
    start_with(None).await
}

/// Starts the service, with server reflection of its annotated descriptors when asked.
pub async fn start_with(reflection: Option<Reflection>) -> PaymentsHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let addr = listener.local_addr().expect("bound");
    let service = Service::default();
    let executions = service.executions.clone();
    let reflecting = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(idemproxy::pb::EXAMPLE_DESCRIPTOR_SET);
    let (v1, v1alpha) = match reflection {
        None => (None, None),
        Some(Reflection::V1) => (Some(reflecting.build_v1().unwrap()), None),
        Some(Reflection::V1Alpha) => (None, Some(reflecting.build_v1alpha().unwrap())),
    };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(
                PaymentsServer::new(service)
                    .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
            )
            .add_optional_service(v1)
            .add_optional_service(v1alpha)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    PaymentsHandle {
        addr,
        executions,
        task,
    }
}
