//! Three clusters in this test process, on port-0 listeners and in-memory stores, with
//! the links between them cut by fault injection. Waits are on Raft metrics, bounded by
//! a deadline that only fails the test; nothing sleeps for a fixed time.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use openraft::{RaftMetrics, ServerState};
use pbx_peer::{Cluster, ClusterConfig, LinkFaults, MemStore, Member, NodeId, PeerError};
use pbx_state::Command;

/// How long any wait may take before the test fails.
const LIMIT: Duration = Duration::from_secs(15);

/// Starts nodes 1..=n sharing one fault table; the lowest id forms the cluster.
async fn start(n: u64, faults: &LinkFaults) -> Vec<Cluster> {
    let listeners: Vec<(NodeId, TcpListener)> = (1..=n)
        .map(|id| (id, TcpListener::bind("127.0.0.1:0").unwrap()))
        .collect();
    let members: BTreeMap<NodeId, Member> = listeners
        .iter()
        .map(|(id, l)| {
            let member = Member {
                peer_addr: l.local_addr().unwrap().to_string(),
                // Not served here: only recorded in the membership.
                sip_addr: format!("127.0.0.1:{}", 5060 + id),
            };
            (*id, member)
        })
        .collect();
    let mut clusters = Vec::new();
    for (id, listener) in listeners {
        let config = ClusterConfig {
            node_id: id,
            cluster_id: "in-process".into(),
            member: members[&id].clone(),
            initial_members: members.clone(),
            heartbeat: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(300),
            election_timeout_max: Duration::from_millis(600),
            snapshot_every: 1000,
            max_batch: 64,
            max_inflight: 4,
            log_kept_after_snapshot: 100,
            write_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_millis(500),
            faults: faults.clone(),
            liveness: Default::default(),
        };
        let store = Arc::new(MemStore::new());
        clusters.push(Cluster::start_on(config, store, listener).await.unwrap());
    }
    clusters
}

/// Waits until `done` holds for the metrics of `c`.
async fn wait_for(
    c: &Cluster,
    what: &str,
    mut done: impl FnMut(&RaftMetrics<NodeId, Member>) -> bool,
) -> RaftMetrics<NodeId, Member> {
    let mut rx = c.metrics();
    let waited = tokio::time::timeout(LIMIT, async {
        loop {
            let m = rx.borrow_and_update().clone();
            if done(&m) {
                return m;
            }
            rx.changed().await.expect("raft stopped");
        }
    })
    .await;
    waited.unwrap_or_else(|_| panic!("node {}: no {what} within {LIMIT:?}", c.node_id()))
}

/// Waits until `c` sees a leader other than `not`, and returns it.
async fn leader_of(c: &Cluster, not: Option<NodeId>) -> NodeId {
    let m = wait_for(c, "leader", |m| {
        m.current_leader.is_some() && m.current_leader != not
    })
    .await;
    m.current_leader.unwrap()
}

fn drain(node: u64) -> Command {
    Command::SetDraining {
        node,
        draining: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_loss_re_election_and_catch_up() {
    let faults = LinkFaults::new();
    let nodes = start(3, &faults).await;
    let by_id = |id: NodeId| &nodes[id as usize - 1];

    let leader = leader_of(&nodes[0], None).await;
    for n in &nodes {
        assert_eq!(leader_of(n, None).await, leader);
    }
    // A write sent to a follower is forwarded to the leader.
    let follower = nodes.iter().find(|n| n.node_id() != leader).unwrap();
    follower.propose(drain(7)).await.unwrap();
    // Committed on the leader; applied here once the follower hears the commit index.
    let committed = by_id(leader).metrics().borrow().last_applied;
    wait_for(follower, "apply", |m| m.last_applied >= committed).await;
    assert!(follower.read().draining.contains(&7));

    // Cut the leader off: the other two elect one of themselves.
    faults.isolate(leader);
    let rest: Vec<&Cluster> = nodes.iter().filter(|n| n.node_id() != leader).collect();
    let new_leader = leader_of(rest[0], Some(leader)).await;
    assert_ne!(new_leader, leader);
    assert_eq!(leader_of(rest[1], Some(leader)).await, new_leader);
    by_id(new_leader).propose(drain(8)).await.unwrap();
    // The cut-off node cannot commit: its write is refused, not acknowledged.
    match by_id(leader).propose(drain(9)).await {
        Err(PeerError::Unavailable(_)) => {}
        other => panic!("a write on the isolated node: {other:?}"),
    }

    // Healed, the old leader follows the new one and catches up.
    faults.heal();
    let last = by_id(new_leader).metrics().borrow().last_applied;
    let m = wait_for(by_id(leader), "catch-up", |m| {
        m.state == ServerState::Follower && m.last_applied >= last
    })
    .await;
    assert_eq!(m.current_leader, Some(new_leader));
    assert!(by_id(leader).read().draining.contains(&8));
    for n in &nodes {
        n.shutdown().await;
    }
}
