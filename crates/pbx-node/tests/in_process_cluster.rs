//! Three nodes in this test process on port-0 listeners, their peer links going through
//! one fault table (`pbx_peer::LinkFaults`): leader loss and re-election, a partitioned
//! node answering 503, forwarding from a follower, catch-up after a partition heals.
//! Every wait is on state (Raft status, applied bindings), never a fixed sleep.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use pbx_node::{unix_ms, Config, Listeners, Node};
use pbx_peer::LinkFaults;
use pbx_sip_msg::HeaderName;
use support::{wait_until, Phone};

/// Elections and commits on a busy two-core machine take well under this.
const LIMIT: Duration = Duration::from_secs(30);

const USERS: &str = "alice,alice-pw\nbob,bob-pw\ncarol,carol-pw\ndave,dave-pw\n";

struct TestCluster {
    nodes: Vec<Option<Node>>,
    net: LinkFaults,
    _dir: tempfile::TempDir,
}

fn config(dir: &Path, id: u64, sip: SocketAddr, peer: SocketAddr, members: &str) -> Config {
    let text = format!(
        "[node]\nid = {id}\ndata_dir = \"data{id}\"\nsip_addr = \"{sip}\"\npeer_addr = \"{peer}\"\n\
         [cluster]\nid = \"in-process\"\ndomain = \"pbx.test\"\nusers_file = \"users.csv\"\n\
         heartbeat_ms = 100\nelection_timeout_min_ms = 600\nelection_timeout_max_ms = 1200\n\
         write_timeout_ms = 1500\nretry_after = 3\nmembers = [{members}]\n"
    );
    Config::parse(&text, Path::new("node.toml"), dir.to_path_buf()).unwrap()
}

impl TestCluster {
    /// Binds every node's sockets on port 0 first, so each configuration can list the
    /// others' real addresses, then starts the three nodes on one fault table.
    async fn start() -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("users.csv"), USERS).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut bound = Vec::new();
        for id in 1..=3 {
            let listeners = Listeners::bind(&config(dir.path(), id, any, any, "")).unwrap();
            let sip = listeners.udp.local_addr().unwrap();
            let peer = listeners.peer.local_addr().unwrap();
            bound.push((id, sip, peer, listeners));
        }
        let members = bound
            .iter()
            .map(|(id, sip, peer, _)| {
                format!("{{ id = {id}, peer = \"{peer}\", sip = \"{sip}\" }}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        let net = LinkFaults::new();
        let mut nodes = Vec::new();
        for (id, sip, peer, listeners) in bound {
            let config = config(dir.path(), id, sip, peer, &members);
            let node = Node::start_on_network(config, listeners, net.clone())
                .await
                .unwrap();
            nodes.push(Some(node));
        }
        let c = TestCluster {
            nodes,
            net,
            _dir: dir,
        };
        c.wait_leader_among(&[1, 2, 3], None).await;
        wait_until("every node ready", LIMIT, || async {
            (1..=3)
                .all(|id| c.node(id).cluster.status().ready)
                .then_some(())
        })
        .await;
        c
    }

    fn node(&self, id: u64) -> &Node {
        self.nodes[id as usize - 1].as_ref().expect("node running")
    }

    /// Waits until the nodes `ids` agree on one leader among them (other than `not`).
    async fn wait_leader_among(&self, ids: &[u64], not: Option<u64>) -> u64 {
        wait_until("one leader agreed on", LIMIT, || async {
            let leaders: Vec<_> = ids
                .iter()
                .map(|&id| self.node(id).cluster.status().leader_id)
                .collect();
            let first = leaders[0]?;
            (leaders.iter().all(|l| *l == Some(first))
                && ids.contains(&first)
                && Some(first) != not
                && self.node(first).cluster.serving_writes())
            .then_some(first)
        })
        .await
    }

    /// Registers `phone` through node `id`, retrying 503s (every 20 ms) until the write
    /// is taken.
    async fn register_ok(&self, phone: &mut Phone, id: u64) {
        let addr = self.node(id).sip_addr;
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let r = phone.register(addr).await;
            match r.status() {
                Some(200) => return,
                Some(503) => {}
                other => panic!("REGISTER through node {id}: {other:?}"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "REGISTER through node {id} not taken within {LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_binding(&self, id: u64, user: &str) {
        wait_until(&format!("{user}'s binding on node {id}"), LIMIT, || async {
            (!self
                .node(id)
                .cluster
                .read()
                .bindings_of(user, unix_ms())
                .is_empty())
            .then_some(())
        })
        .await
    }

    async fn stop(&mut self, id: u64) {
        if let Some(node) = self.nodes[id as usize - 1].take() {
            node.stop().await;
        }
    }

    async fn shutdown(mut self) {
        for id in 1..=3 {
            self.stop(id).await;
        }
    }
}

fn others(id: u64) -> Vec<u64> {
    (1..=3).filter(|&n| n != id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_a_register_and_every_node_applies_it() {
    let c = TestCluster::start().await;
    let leader = c.wait_leader_among(&[1, 2, 3], None).await;
    let follower = others(leader)[0];
    let mut alice = Phone::new("alice", "alice-pw").await;
    c.register_ok(&mut alice, follower).await;
    for id in 1..=3 {
        c.wait_binding(id, "alice").await;
    }
    let b = c
        .node(leader)
        .cluster
        .read()
        .bindings_of("alice", unix_ms());
    assert_eq!(b.len(), 1);
    assert_eq!(
        b[0].node_id, follower,
        "the binding names the node it came in on"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_lost_the_survivors_elect_another_and_take_writes() {
    let mut c = TestCluster::start().await;
    let leader = c.wait_leader_among(&[1, 2, 3], None).await;
    let term = c.node(leader).cluster.status().term;
    c.stop(leader).await;
    let survivors = others(leader);
    let new_leader = c.wait_leader_among(&survivors, Some(leader)).await;
    assert!(c.node(new_leader).cluster.status().term > term);
    let mut bob = Phone::new("bob", "bob-pw").await;
    c.register_ok(&mut bob, survivors[1]).await;
    for &id in &survivors {
        c.wait_binding(id, "bob").await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_answers_503_and_catches_up_when_the_partition_heals() {
    let c = TestCluster::start().await;
    let leader = c.wait_leader_among(&[1, 2, 3], None).await;
    let cut = others(leader)[0];
    c.net.isolate(cut);

    // Its writes cannot be committed: 503 with Retry-After, never a 200, nothing applied.
    let mut carol = Phone::new("carol", "carol-pw").await;
    let answer = carol.register(c.node(cut).sip_addr).await;
    assert_eq!(answer.status(), Some(503), "{answer:?}");
    assert_eq!(answer.header(&HeaderName::RetryAfter), Some("3"));
    // The majority goes on.
    let mut dave = Phone::new("dave", "dave-pw").await;
    c.register_ok(&mut dave, leader).await;
    assert!(c
        .node(cut)
        .cluster
        .read()
        .bindings_of("carol", unix_ms())
        .is_empty());

    c.net.heal();
    c.wait_binding(cut, "dave").await;
    c.register_ok(&mut carol, cut).await;
    for id in 1..=3 {
        c.wait_binding(id, "carol").await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_stops_taking_writes_and_follows_the_new_one_after_healing() {
    let c = TestCluster::start().await;
    let old = c.wait_leader_among(&[1, 2, 3], None).await;
    c.net.isolate(old);
    let majority = others(old);
    let new = c.wait_leader_among(&majority, Some(old)).await;

    // Without a recent majority the old leader refuses writes instead of answering 200.
    let mut alice = Phone::new("alice", "alice-pw").await;
    let answer = alice.register(c.node(old).sip_addr).await;
    assert_eq!(answer.status(), Some(503), "{answer:?}");
    let mut bob = Phone::new("bob", "bob-pw").await;
    c.register_ok(&mut bob, new).await;

    c.net.heal();
    let agreed = c.wait_leader_among(&[1, 2, 3], Some(old)).await;
    assert_eq!(agreed, new, "the returning node does not depose the leader");
    c.wait_binding(old, "bob").await;
    c.shutdown().await;
}
