//! PostgreSQL under Patroni (issue 42): a real etcd and a two-member Patroni cluster
//! (`synchronous_mode_strict`, `pg_rewind`), each member and each of two sidecars (the real
//! binary, on the multi-host URL with `target_session_attrs=read-write`) on a host of a
//! network of the test's own (`support/netns.rs`), one counting upstream, callers with
//! retries and hedged copies spread over both sidecars (`support/failover.rs`, the load of
//! `tests/failover.rs`). Under load, rounds of:
//!
//! - **kill**: the leader's PostgreSQL and its Patroni SIGKILLed; Patroni promotes the
//!   standby on its own; the old member's Patroni started again rejoins (`pg_rewind`);
//! - **switchover**: `patronictl switchover`, as an operator runs it;
//! - **isolated**: the leader cut off from the standby, from etcd and from sidecar B, sidecar
//!   A still reaching it; Patroni demotes it and promotes the standby; the cut heals and the
//!   old leader rejoins (`pg_rewind`);
//! - **cut from standby**: the leader cut off from the standby and from sidecar B for 5 s,
//!   still holding etcd's leader key: no failover, writes wait for the standby.
//!
//! Every key is retried until it is answered, then every answer asked for again through both
//! sidecars: 0 keys executed twice, 0 answers lost, in every round. Each round prints how long
//! the sidecars did not serve (the longest time either answered no probe, a fresh key sent
//! one after another) and its IN_DOUBT answers; the last line sums them up by scenario.
//! `IDEMPROXY_PATRONI_ROUNDS=N` runs N rounds of each scenario (default 1).
//!
//! The same isolation with Patroni's default asynchronous replication must lose answers: the
//! old leader acknowledges what sidecar A writes until Patroni demotes it, and its rewind
//! throws that away. That shows the check can fail.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;
use support::binary::{self, BinarySidecar};
use support::failover::{Load, Prober, Verdict};
use support::ledger;
use support::netns::Network;
use support::patroni::{Cluster, ETCD_HOST, MEMBER_HOSTS};
use tokio::task::block_in_place;
use tokio::time::Instant;

/// The hosts of the two sidecars: A always reaches the leader, B is cut off from it.
const SIDECAR_HOSTS: [&str; 2] = ["sidecar-a", "sidecar-b"];

/// Keys in flight at once.
const IN_FLIGHT: usize = 16;

/// What a caller waits between two of its keys, so that a round's keys stay in the hundreds.
const PAUSE: Duration = Duration::from_millis(100);

/// At most this many keys a round.
const KEYS_MAX: usize = 5_000;

/// Keys ended before the fault, and again after the cluster settled.
const BEFORE_FAULT: usize = 40;
const AFTER_SETTLED: usize = 40;

/// How long the leader stays cut off from its standby while it keeps etcd's leader key:
/// longer than the sidecars' `--store-timeout` and than a walsender's timeout.
const CUT_HELD: Duration = Duration::from_secs(8);

/// Serialises this file's tests: each runs a cluster, and the machine's cores are few.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a round does to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Kill,
    Switchover,
    Isolated,
    CutFromStandby,
}

impl Scenario {
    const ALL: [Scenario; 4] = [
        Scenario::Kill,
        Scenario::Switchover,
        Scenario::Isolated,
        Scenario::CutFromStandby,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Kill => "kill",
            Scenario::Switchover => "switchover",
            Scenario::Isolated => "isolated",
            Scenario::CutFromStandby => "cut from standby",
        }
    }

    /// Does it to the cluster whose leader is `leader`; returns once the fault is over (the
    /// old leader started again, the switchover done, the cut healed).
    fn inflict(self, net: &Network, cluster: &mut Cluster, leader: usize) {
        let (old, new) = (MEMBER_HOSTS[leader], MEMBER_HOSTS[1 - leader]);
        match self {
            Scenario::Kill => {
                cluster.kill(leader);
                cluster.wait_leading(net, 1 - leader);
                cluster.restart(net, leader);
            }
            Scenario::Switchover => cluster.switchover(net, leader),
            Scenario::Isolated => {
                net.cut(old, &[new, ETCD_HOST, SIDECAR_HOSTS[1]]);
                cluster.wait_leading(net, 1 - leader);
                net.heal();
            }
            Scenario::CutFromStandby => {
                net.cut(old, &[new, SIDECAR_HOSTS[1]]);
                // The fault's length, not a wait for something to happen.
                std::thread::sleep(CUT_HELD);
                net.heal();
            }
        }
    }
}

/// What one round saw.
#[derive(Debug)]
struct Round {
    scenario: Scenario,
    verdict: Verdict,
    /// The longest time either sidecar answered no probe, from the fault on.
    serve_again: Duration,
}

/// The cluster, the sidecars on it and the upstream behind them; dropped in this order
/// (the network last: a member cut off from etcd cannot stop cleanly).
struct Setup {
    _sidecars: Vec<(BinarySidecar, tempfile::TempDir)>,
    cluster: Cluster,
    upstream: ledger::LedgerHandle,
    addrs: [SocketAddr; 2],
    net: Network,
}

async fn set_up(synchronous: bool) -> Setup {
    let hosts = [
        ETCD_HOST,
        MEMBER_HOSTS[0],
        MEMBER_HOSTS[1],
        SIDECAR_HOSTS[0],
        SIDECAR_HOSTS[1],
    ];
    let net = Network::new(&hosts);
    let cluster = block_in_place(|| Cluster::start(&net, synchronous));
    let upstream = ledger::start().await;
    let url = cluster.url(&net);
    let mut sidecars = Vec::new();
    let mut addrs = Vec::new();
    for host in SIDECAR_HOSTS {
        let dir = tempfile::tempdir().unwrap();
        let upstream_inside = net.reach_from(host, upstream.addr).await;
        let mut extra = vec![
            "--store",
            "postgres",
            "--postgres-url",
            &url,
            "--store-timeout",
            "1s",
            "--default-lease",
            "2s",
            "--lease-margin",
            "0s",
            "--max-in-flight-wait",
            "1s",
        ];
        if synchronous {
            extra.push("--postgres-require-sync-replica");
        }
        let args = binary::run_args(upstream_inside, dir.path(), &extra);
        let wrapper = net.on(host);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let sidecar = binary::start_under(&wrapper, &args, &[]).await;
        addrs.push(net.expose(host, sidecar.addr).await);
        sidecars.push((sidecar, dir));
    }
    Setup {
        net,
        cluster,
        upstream,
        addrs: [addrs[0], addrs[1]],
        _sidecars: sidecars,
    }
}

/// One round of `scenario` under load, named `run` (its keys' prefix).
async fn round(setup: &mut Setup, scenario: Scenario, run: &str) -> Round {
    let (net, cluster, addrs) = (&setup.net, &mut setup.cluster, setup.addrs);
    let leader = block_in_place(|| cluster.settled(net));
    let probers = addrs.map(|addr| Prober::start(addr, run));
    let load = Load::start(addrs, run, KEYS_MAX, IN_FLIGHT, PAUSE);
    load.wait_for(BEFORE_FAULT, "answers before the fault")
        .await;
    let fault = Instant::now();
    block_in_place(|| {
        scenario.inflict(net, cluster, leader);
        cluster.settled(net);
    });
    let settled = load.ended_so_far();
    load.wait_for(settled + AFTER_SETTLED, "answers after the cluster settled")
        .await;
    let [a, b] = probers;
    let serve_again = a
        .longest_silence_since(fault)
        .await
        .max(b.longest_silence_since(fault).await);
    load.stop();
    let verdict = load.finish(&setup.upstream.state).await;
    Round {
        scenario,
        verdict,
        serve_again,
    }
}

/// Rounds of each scenario the test runs: 1, or `IDEMPROXY_PATRONI_ROUNDS`.
fn rounds() -> usize {
    std::env::var("IDEMPROXY_PATRONI_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// One line per scenario: keys, answered, IN_DOUBT, executed twice, lost, serve-again p50
/// and max.
fn summary(rounds: &[Round]) -> String {
    let mut lines = Vec::new();
    for scenario in Scenario::ALL {
        let of: Vec<&Round> = rounds.iter().filter(|r| r.scenario == scenario).collect();
        if of.is_empty() {
            continue;
        }
        let sum = |f: fn(&Verdict) -> usize| of.iter().map(|r| f(&r.verdict)).sum::<usize>();
        let mut serve: Vec<Duration> = of.iter().map(|r| r.serve_again).collect();
        serve.sort();
        lines.push(format!(
            "{}: {} rounds, {} keys, {} answered, {} IN_DOUBT, {} executed twice, {} lost, \
             serve again p50 {:.1} s, max {:.1} s",
            scenario.name(),
            of.len(),
            sum(|v| v.acknowledged + v.in_doubt),
            sum(|v| v.acknowledged),
            sum(|v| v.in_doubt),
            sum(|v| v.executed_twice),
            sum(|v| v.lost),
            serve[(serve.len() - 1) / 2].as_secs_f64(),
            serve[serve.len() - 1].as_secs_f64(),
        ));
    }
    lines.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_failovers_switchovers_and_partitions_lose_nothing_and_run_nothing_twice() {
    let _alone = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut setup = set_up(true).await;
    let mut done = Vec::new();
    for cycle in 1..=rounds() {
        for scenario in Scenario::ALL {
            let number = done.len() + 1;
            let round = round(&mut setup, scenario, &format!("r{number}-")).await;
            println!(
                "round {number} (cycle {cycle}), {}: {:?}, serve again after {:.1} s",
                scenario.name(),
                round.verdict,
                round.serve_again.as_secs_f64()
            );
            let verdict = round.verdict;
            assert!(
                verdict.acknowledged >= BEFORE_FAULT,
                "round {number}: {verdict:?}"
            );
            assert_eq!(verdict.executed_twice, 0, "round {number}: {verdict:?}");
            assert_eq!(verdict.lost, 0, "round {number}: {verdict:?}");
            done.push(round);
        }
    }
    println!("{}", summary(&done));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_with_asynchronous_replication_is_caught_losing_answers() {
    let _alone = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut setup = set_up(false).await;
    let round = round(&mut setup, Scenario::Isolated, "async-").await;
    println!("asynchronous replication, isolated leader: {round:?}");
    assert!(
        round.verdict.lost + round.verdict.executed_twice > 0,
        "the check found nothing lost with asynchronous replication: it cannot fail ({round:?})"
    );
}
