//! The example payments service (proto/idemproxy/example/v1/payments.proto) as a real tonic
//! upstream that counts every execution, for the policy tests.

use idemproxy::pb::idemproxy::example::v1::payments_server::{Payments, PaymentsServer};
use idemproxy::pb::idemproxy::example::v1::{
    BalanceReply, BalanceRequest, ChargeReply, ChargeRequest, GetChargeRequest, Payment,
    PayoutEvent, PayoutRequest, RefundReply, RefundRequest,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
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
    /// GetCharge calls, and those that carried idemproxy's probe header and which caller.
    pub lookups: AtomicU64,
    pub probe_callers: Mutex<Vec<String>>,
    /// GetCharge answers UNAVAILABLE while set.
    pub lookups_unavailable: AtomicBool,
    /// The charges made, by payment serial.
    pub charged: Mutex<HashMap<String, ChargeReply>>,
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
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::SeqCst)
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
        // A trace id of `fail-before-charge` or `fail-after-charge` (left out of the
        // fingerprint, so a retry may differ) answers INTERNAL, an unknown outcome to the
        // sidecar, without or after charging; `hang-after-charge` answers 3 s late.
        let then = Some(request.get_ref().trace_id.clone());
        if then.as_deref() == Some("fail-before-charge") {
            return Err(Status::internal("the charge broke before it was made"));
        }
        let execution = self.executions.charges.fetch_add(1, Ordering::SeqCst) + 1;
        let serial = request
            .get_ref()
            .payment
            .as_ref()
            .map(|p| p.serial.clone())
            .unwrap_or_default();
        let reply = ChargeReply {
            charge_id: format!("ch-{serial}-{execution}"),
            execution,
        };
        self.executions
            .charged
            .lock()
            .unwrap()
            .insert(serial, reply.clone());
        if then.as_deref() == Some("fail-after-charge") {
            return Err(Status::internal(
                "the charge was made, then its answer broke",
            ));
        }
        if then.as_deref() == Some("hang-after-charge") {
            // Long enough for a test to kill the sidecar while the call runs.
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        }
        Ok(Response::new(reply))
    }

    async fn get_charge(
        &self,
        request: Request<GetChargeRequest>,
    ) -> Result<Response<ChargeReply>, Status> {
        self.executions.lookups.fetch_add(1, Ordering::SeqCst);
        if request.metadata().get("idempotency-probe").is_some() {
            let caller = request
                .metadata()
                .get("x-caller-id")
                .and_then(|value| value.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            self.executions.probe_callers.lock().unwrap().push(caller);
        }
        if self.executions.lookups_unavailable.load(Ordering::SeqCst) {
            return Err(Status::unavailable("the ledger is down"));
        }
        let charged = self.executions.charged.lock().unwrap();
        match charged.get(&request.get_ref().serial) {
            Some(reply) => Ok(Response::new(reply.clone())),
            None => Err(Status::not_found("no charge under this serial")),
        }
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

/// A charge of 500 cents on card 4242 under `serial`, as `caller` (the `x-caller-id`
/// header); `behaviour` is the service's trace id (`fail-after-charge`,
/// `fail-before-charge`, `hang-after-charge`, or anything: charge and answer), which the
/// fingerprint leaves out, so a retry may carry another.
pub fn charge(serial: &str, caller: &str, behaviour: &str) -> Request<ChargeRequest> {
    let mut request = Request::new(ChargeRequest {
        payment: Some(Payment {
            serial: serial.into(),
            card: "4242".into(),
        }),
        amount_cents: 500,
        trace_id: behaviour.into(),
        ..ChargeRequest::default()
    });
    request
        .metadata_mut()
        .insert("x-caller-id", caller.parse().unwrap());
    request
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
