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

/// Voicemail audio between members (ADR 0014): a blob put on another member is on its
/// store when the call returns, is read back from there checked against its name, and a
/// member without a blob store, or a blob it does not hold, says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_go_to_a_member_and_come_back_checked() {
    let clusters = start(3, &LinkFaults::default()).await;
    let stores: Vec<Arc<pbx_storage::MemBlobs>> = (0..2)
        .map(|_| Arc::new(pbx_storage::MemBlobs::default()))
        .collect();
    clusters[0].serve_blobs(stores[0].clone());
    clusters[1].serve_blobs(stores[1].clone());
    let audio: Arc<[u8]> = (0..200_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    // The members' addresses come with the membership: known to each before it talks.
    for c in &clusters {
        voters_known(c).await;
    }
    let id = clusters[0].put_blob(2, audio.clone()).await.unwrap();
    assert_eq!(id, pbx_storage::BlobId::of(&audio));
    assert!(pbx_storage::BlobStore::contains(&*stores[1], &id));
    assert!(!pbx_storage::BlobStore::contains(&*stores[0], &id));
    // Its own store too, through the same call.
    clusters[0].put_blob(1, audio.clone()).await.unwrap();
    assert!(pbx_storage::BlobStore::contains(&*stores[0], &id));
    let back = clusters[2].get_blob(2, id).await.unwrap();
    assert_eq!(back.as_deref(), Some(&audio[..]));
    let other = pbx_storage::BlobId::of(b"not there");
    assert_eq!(clusters[0].get_blob(2, other).await.unwrap(), None);
    // Node 3 keeps no blobs: refused, not lost silently.
    assert!(clusters[0].put_blob(3, audio.clone()).await.is_err());
    // On a majority: two of the three voters are enough; the third one's refusal is
    // not a failure.
    let message: Arc<[u8]> = vec![7u8; 48_000].into();
    voters_known(&clusters[1]).await;
    let (id, holders) = clusters[1]
        .put_blob_on_majority(message.clone())
        .await
        .unwrap();
    assert_eq!(holders.len(), 2, "{holders:?}");
    assert!(holders.iter().all(|n| *n == 1 || *n == 2), "{holders:?}");
    assert!(pbx_storage::BlobStore::contains(&*stores[0], &id));
    // With one store only, no majority: an error, never a false success.
    let lonely = start(3, &LinkFaults::default()).await;
    lonely[0].serve_blobs(Arc::new(pbx_storage::MemBlobs::default()));
    voters_known(&lonely[0]).await;
    let err = lonely[0].put_blob_on_majority(message).await.unwrap_err();
    assert!(err.to_string().contains("reached 1 of the 2"), "{err}");
    for c in &lonely {
        c.shutdown().await;
    }
    for c in &clusters {
        c.shutdown().await;
    }
}

/// Waits until `c` knows the three voters (the cluster formed).
async fn voters_known(c: &Cluster) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while c.voters().len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cluster did not form"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
