//! `idemproxy demo`: the failure from the field, replayed in a few seconds with no setup.
//!
//! A message queue delivers "extend subscription by 1 year" five times: twice one after the
//! other (redelivery after a lost ack), then three copies at once (a consumer group
//! rebalancing). The same deliveries go once straight to a non-idempotent subscriptions
//! service, and once through idemproxy on a temporary sled store. Then one delivery times out
//! after the service acted, and the consumer retries: directly it extends again; through
//! idemproxy the unknown outcome is looked up with the service's `GetExtension` (its in-doubt
//! probe) and the retry gets the real answer. The demo runs the real sidecar
//! (`server::start`), the real proxy and a real tonic service over loopback.

use crate::config::RunSettings;
use crate::pb::idemproxy::demo::v1::subscriptions_client::SubscriptionsClient;
use crate::pb::idemproxy::demo::v1::subscriptions_server::{Subscriptions, SubscriptionsServer};
use crate::pb::idemproxy::demo::v1::{ExtendRequest, GetExtensionRequest, Subscription};
use anyhow::Context;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::Channel;

/// The year every demo subscription is paid until before the story starts.
const START_YEAR: u32 = 2026;
/// How many times the queue delivers the one message.
const SEQUENTIAL_DELIVERIES: usize = 2;
const CONCURRENT_DELIVERIES: usize = 3;
/// The consumer's deadline in the second story, and how late the service answers there.
const DEADLINE: Duration = Duration::from_millis(300);
const LATE_ANSWER: Duration = Duration::from_secs(2);
/// How long the consumer waits before it retries.
const RETRY_AFTER: Duration = Duration::from_millis(700);

/// The non-idempotent service: every call extends again.
#[derive(Default)]
struct SubscriptionService {
    subscriptions: Mutex<HashMap<String, Subscription>>,
    /// What each message's extension left, for `GetExtension`.
    extended_by: Mutex<HashMap<String, Subscription>>,
    /// Messages whose next answer comes late (after the consumer's deadline).
    answer_late: Mutex<HashSet<String>>,
}

impl SubscriptionService {
    /// Extends the subscription by the request's years: what it is now.
    fn extend_now(&self, request: &ExtendRequest) -> Subscription {
        let mut subscriptions = self
            .subscriptions
            .lock()
            .expect("demo lock is never poisoned");
        let subscription = subscriptions
            .entry(request.subscription_id.clone())
            .or_insert_with(|| Subscription {
                subscription_id: request.subscription_id.clone(),
                paid_until_year: START_YEAR,
                extensions: 0,
            });
        subscription.paid_until_year += request.years;
        subscription.extensions += 1;
        subscription.clone()
    }
}

#[tonic::async_trait]
impl Subscriptions for SubscriptionService {
    async fn extend(
        &self,
        request: tonic::Request<ExtendRequest>,
    ) -> Result<tonic::Response<Subscription>, tonic::Status> {
        let request = request.into_inner();
        // A little work, so concurrent deliveries overlap as they do in production.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let subscription = self.extend_now(&request);
        self.extended_by
            .lock()
            .expect("demo lock is never poisoned")
            .insert(request.message_id.clone(), subscription.clone());
        let late = self
            .answer_late
            .lock()
            .expect("demo lock is never poisoned")
            .remove(&request.message_id);
        if late {
            // Extended; the answer is held up (a pause, a slow network) past the deadline.
            tokio::time::sleep(LATE_ANSWER).await;
        }
        Ok(tonic::Response::new(subscription))
    }

    async fn get_extension(
        &self,
        request: tonic::Request<GetExtensionRequest>,
    ) -> Result<tonic::Response<Subscription>, tonic::Status> {
        let extended_by = self
            .extended_by
            .lock()
            .expect("demo lock is never poisoned");
        match extended_by.get(&request.get_ref().message_id) {
            Some(subscription) => Ok(tonic::Response::new(subscription.clone())),
            None => Err(tonic::Status::not_found("no extension for this message")),
        }
    }
}

/// What one side of the demo saw.
struct Tally {
    subscription: Subscription,
    replayed: usize,
}

/// One delivery of "extend by 1 year", within `deadline` when there is one.
fn extend_request(
    subscription_id: &str,
    message_id: &str,
    deadline: Option<Duration>,
) -> anyhow::Result<tonic::Request<ExtendRequest>> {
    // The same message every time: its id travels in the payload, no header needed.
    let mut request = tonic::Request::new(ExtendRequest {
        subscription_id: subscription_id.to_owned(),
        years: 1,
        message_id: message_id.to_owned(),
    });
    request
        .metadata_mut()
        .insert("x-caller-id", "billing-consumer".parse()?);
    if let Some(deadline) = deadline {
        request.set_timeout(deadline);
    }
    Ok(request)
}

async fn deliver(
    client: &mut SubscriptionsClient<Channel>,
    subscription_id: &str,
    message_id: &str,
) -> anyhow::Result<(Subscription, bool)> {
    let request = extend_request(subscription_id, message_id, None)?;
    let response = client.extend(request).await?;
    let replayed = response.metadata().get("idempotency-replayed").is_some();
    Ok((response.into_inner(), replayed))
}

/// The second story: a delivery whose answer comes after the consumer's deadline, then its
/// retry. What the service ended with, and whether the retry's answer came from the
/// service's lookup.
async fn timeout_story(
    channel: Channel,
    subscription_id: &str,
    message_id: &str,
) -> anyhow::Result<(Subscription, bool)> {
    let mut client = SubscriptionsClient::new(channel);
    let first = extend_request(subscription_id, message_id, Some(DEADLINE))?;
    anyhow::ensure!(
        client.extend(first).await.is_err(),
        "the late answer arrived within the deadline"
    );
    tokio::time::sleep(RETRY_AFTER).await;
    let retry = extend_request(subscription_id, message_id, Some(Duration::from_secs(5)))?;
    let response = client.extend(retry).await?;
    let looked_up = response
        .metadata()
        .get("idempotency-resolved-by")
        .is_some_and(|by| by == "probe");
    Ok((response.into_inner(), looked_up))
}

/// Delivers the one message as the queue does and returns what the service ended with.
async fn replay_story(
    channel: Channel,
    subscription_id: &str,
    message_id: &str,
) -> anyhow::Result<Tally> {
    let mut client = SubscriptionsClient::new(channel);
    let mut replayed = 0;
    let mut last = None;
    for _ in 0..SEQUENTIAL_DELIVERIES {
        let (subscription, was_replayed) =
            deliver(&mut client, subscription_id, message_id).await?;
        replayed += usize::from(was_replayed);
        last = Some(subscription);
    }
    let concurrent = (0..CONCURRENT_DELIVERIES).map(|_| {
        let mut client = client.clone();
        let subscription_id = subscription_id.to_owned();
        let message_id = message_id.to_owned();
        tokio::spawn(async move { deliver(&mut client, &subscription_id, &message_id).await })
    });
    for delivery in concurrent.collect::<Vec<_>>() {
        let (subscription, was_replayed) = delivery.await??;
        replayed += usize::from(was_replayed);
        if last
            .as_ref()
            .is_none_or(|s: &Subscription| subscription.extensions > s.extensions)
        {
            last = Some(subscription);
        }
    }
    let subscription = last.context("the queue delivered nothing")?;
    Ok(Tally {
        subscription,
        replayed,
    })
}

async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

/// Runs the demo and prints the two outcomes side by side.
pub async fn run() -> anyhow::Result<()> {
    let service_listener = TcpListener::bind("127.0.0.1:0").await?;
    let service_addr = service_listener.local_addr()?;
    let subscriptions = std::sync::Arc::new(SubscriptionService::default());
    let service = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SubscriptionsServer::from_arc(subscriptions.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(
                service_listener,
            )),
    );
    // Removed when dropped, at the end of the demo.
    let data_dir = tempfile::Builder::new()
        .prefix("idemproxy-demo-")
        .tempdir()?;
    // The service's annotated descriptors: they name `message_id` as the key field.
    let descriptors = data_dir.path().join("subscriptions.binpb");
    std::fs::write(&descriptors, crate::pb::DEMO_DESCRIPTOR_SET)?;
    let config = crate::config::resolve(RunSettings {
        listen: "127.0.0.1:0".parse()?,
        upstream: Some(format!("http://{service_addr}")),
        data_dir: data_dir.path().to_owned(),
        max_store_bytes: 64 << 20,
        descriptor_set: vec![descriptors],
        ops_listen: "127.0.0.1:0".parse()?,
        drain_timeout: Duration::from_secs(5),
        admin_listen: "127.0.0.1:0".parse()?,
        // A call's lease is its deadline and this: the second story's call is given up
        // soon after its deadline, and its outcome looked up.
        lease_margin: Duration::from_millis(200),
        ..RunSettings::default()
    })?;
    // OTEL_EXPORTER_OTLP_ENDPOINT set: the demo's calls show up in the collector's traces.
    let telemetry = crate::telemetry::Telemetry::from_env(&crate::telemetry::process_env, "sled")?;
    // The demo prints a story: its sidecar's start-up warnings (records in the clear, no
    // descriptors ...) belong to a real deployment, not to it. Errors still show, and RUST_LOG
    // still wins.
    telemetry.init_logs_at("error");
    let telemetry = std::sync::Arc::new(telemetry);
    let sidecar = crate::server::start_with(&config, telemetry.clone()).await?;
    let total = SEQUENTIAL_DELIVERIES + CONCURRENT_DELIVERIES;

    println!("A message queue delivers \"extend subscription by 1 year\" {total} times:");
    println!("{SEQUENTIAL_DELIVERIES} redeliveries one after the other, then {CONCURRENT_DELIVERIES} copies at once.\n");
    let direct = replay_story(connect(service_addr).await?, "sub-direct", "msg-7f3a").await?;
    let proxied = replay_story(
        connect(sidecar.proxy_addr).await?,
        "sub-proxied",
        "msg-7f3a",
    )
    .await?;

    print_first_story(&direct, &proxied, total);
    let looked_up = second_story(&subscriptions, service_addr, sidecar.proxy_addr).await;

    sidecar.stop().await;
    service.abort();
    let flushed = tokio::task::spawn_blocking(move || telemetry.shutdown());
    let _ = tokio::time::timeout(Duration::from_secs(3), flushed).await;
    anyhow::ensure!(
        proxied.subscription.extensions == 1,
        "idemproxy let the message execute {} times",
        proxied.subscription.extensions
    );
    anyhow::ensure!(
        looked_up?,
        "the retry was not answered by the service's lookup"
    );
    Ok(())
}

fn print_first_story(direct: &Tally, proxied: &Tally, total: usize) {
    println!(
        "{:<34} {:>16} {:>22}",
        "", "service directly", "through idemproxy"
    );
    println!("{:<34} {:>16} {:>22}", "deliveries", total, total);
    println!(
        "{:<34} {:>16} {:>22}",
        "times the service executed",
        direct.subscription.extensions,
        proxied.subscription.extensions
    );
    println!(
        "{:<34} {:>16} {:>22}",
        "subscription extended by (years)",
        direct.subscription.paid_until_year - START_YEAR,
        proxied.subscription.paid_until_year - START_YEAR
    );
    println!(
        "{:<34} {:>16} {:>22}",
        "paid until", direct.subscription.paid_until_year, proxied.subscription.paid_until_year
    );
    println!(
        "{:<34} {:>16} {:>22}",
        "duplicates answered from the record", direct.replayed, proxied.replayed
    );
    println!(
        "\nThe customer paid for 1 year. Directly, the service granted {}; through idemproxy, {}.",
        direct.subscription.paid_until_year - START_YEAR,
        proxied.subscription.paid_until_year - START_YEAR
    );
}

/// The second story, told on both sides: whether the retry through idemproxy was answered by
/// the service's lookup.
async fn second_story(
    service: &SubscriptionService,
    service_addr: std::net::SocketAddr,
    proxy_addr: std::net::SocketAddr,
) -> anyhow::Result<bool> {
    let (direct_message, proxied_message) = ("msg-81b2-direct", "msg-81b2-proxied");
    service
        .answer_late
        .lock()
        .expect("demo lock is never poisoned")
        .extend([direct_message.to_owned(), proxied_message.to_owned()]);
    println!(
        "\nThen a delivery times out: the service extends the subscription, but its answer comes"
    );
    println!(
        "after the consumer's {} ms deadline, so the consumer retries.\n",
        DEADLINE.as_millis()
    );
    let direct = connect(service_addr).await?;
    let (direct, _) = timeout_story(direct, "sub-direct-2", direct_message).await?;
    let proxied = connect(proxy_addr).await?;
    let (proxied, looked_up) = timeout_story(proxied, "sub-proxied-2", proxied_message).await?;
    println!(
        "{:<34} {:>16} {:>22}",
        "", "service directly", "through idemproxy"
    );
    println!(
        "{:<34} {:>16} {:>22}",
        "times the service executed", direct.extensions, proxied.extensions
    );
    println!(
        "{:<34} {:>16} {:>22}",
        "subscription extended by (years)",
        direct.paid_until_year - START_YEAR,
        proxied.paid_until_year - START_YEAR
    );
    println!(
        "{:<34} {:>16} {:>22}",
        "the retry was answered by",
        "a 2nd extension",
        if looked_up { "a lookup (probe)" } else { "?" }
    );
    println!(
        "\nThrough idemproxy, the unknown outcome was looked up with the service's own GetExtension"
    );
    println!("(its in-doubt probe), and the retry got the real answer: extended once.");
    Ok(looked_up && proxied.extensions == 1)
}
