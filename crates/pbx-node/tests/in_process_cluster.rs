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

/// openraft 0.9 has no transfer message: the target wins its first campaign because
/// the old leader grants its vote at once (ADR 0011). Should an openraft upgrade change
/// that, transfers fall back to waiting out a lease, and this test says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_in_one_round_and_writes_follow_it() {
    use pbx_peer::HandOver;
    let c = TestCluster::start().await;
    let first = c.wait_leader_among(&[1, 2, 3], None).await;
    let mut alice = Phone::new("alice", "alice-pw").await;
    c.register_ok(&mut alice, first).await;
    let mut leader = first;
    for _ in 0..2 {
        let target = others(leader)[0];
        let how = c
            .node(leader)
            .cluster
            .transfer_leadership(Some(target))
            .await
            .expect("transfer");
        assert_eq!(how, HandOver::OneRound, "{leader} -> {target}");
        assert_eq!(c.wait_leader_among(&[1, 2, 3], Some(leader)).await, target);
        // Writes through the old leader go to the new one.
        let mut bob = Phone::new("bob", "bob-pw").await;
        c.register_ok(&mut bob, leader).await;
        c.wait_binding(target, "bob").await;
        leader = target;
    }
    c.shutdown().await;
}

/// alice calls bob through node `via` (digest on the INVITE, bob answers, alice ACKs).
/// Returns alice's dialog headers (From, To with the node's tag) and bob's INVITE.
async fn answered_call(
    c: &TestCluster,
    via: u64,
    alice: &Phone,
    bob: &Phone,
) -> (String, String, pbx_sip_msg::SipMessage) {
    let node = c.node(via).sip_addr;
    let invite = |cseq: u32, auth: Option<String>| {
        let sdp = support::phone_sdp(alice.addr, 30_000, 1);
        let auth = auth.map_or(String::new(), |a| format!("Proxy-Authorization: {a}\r\n"));
        format!(
            "INVITE sip:bob@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP {a};rport;branch=z9hG4bKinv{cseq}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:alice@pbx.test>;tag=al\r\nTo: <sip:bob@pbx.test>\r\n\
             Call-ID: survive-1\r\nCSeq: {cseq} INVITE\r\nContact: <sip:alice@{a}>\r\n{auth}\
             Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len(),
            a = alice.addr
        )
    };
    alice
        .socket
        .send_to(invite(1, None).as_bytes(), node)
        .await
        .unwrap();
    let (challenge, _) =
        support::recv_until(&alice.socket, "407", LIMIT, |m| m.status() == Some(407)).await;
    // §17.1.1.3: the 407 is acknowledged in its transaction (else it is resent).
    let ack407 = format!(
        "ACK sip:bob@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP {a};rport;branch=z9hG4bKinv1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@pbx.test>;tag=al\r\nTo: {to}\r\n\
         Call-ID: survive-1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        a = alice.addr,
        to = challenge.header(&HeaderName::To).unwrap()
    );
    alice.socket.send_to(ack407.as_bytes(), node).await.unwrap();
    let auth = support::answer_challenge(
        &challenge,
        "INVITE",
        "sip:bob@pbx.test",
        "alice",
        "alice-pw",
    );
    alice
        .socket
        .send_to(invite(2, Some(auth)).as_bytes(), node)
        .await
        .unwrap();
    let (to_bob, from) = support::recv_until(&bob.socket, "INVITE to bob", LIMIT, |m| {
        m.method() == Some(&pbx_sip_msg::Method::Invite)
    })
    .await;
    let ok = support::response_to(
        &to_bob,
        200,
        "bt",
        bob.addr,
        &support::phone_sdp(bob.addr, 31_000, 1),
    );
    bob.socket.send_to(ok.as_bytes(), from).await.unwrap();
    let (answer, _) = support::recv_until(&alice.socket, "200 to alice", LIMIT, |m| {
        m.status() == Some(200)
    })
    .await;
    let from_h = answer.header(&HeaderName::From).unwrap().to_string();
    let to_h = answer.header(&HeaderName::To).unwrap().to_string();
    let ack = format!(
        "ACK sip:pbx@{node} SIP/2.0\r\nVia: SIP/2.0/UDP {a};rport;branch=z9hG4bKack\r\n\
         Max-Forwards: 70\r\nFrom: {from_h}\r\nTo: {to_h}\r\nCall-ID: survive-1\r\nCSeq: 2 ACK\r\n\
         Content-Length: 0\r\n\r\n",
        a = alice.addr
    );
    alice.socket.send_to(ack.as_bytes(), node).await.unwrap();
    (from_h, to_h, to_bob)
}

/// The re-INVITE a survivor sends a phone to move its call: answered 200 with the phone's
/// description; returns it and the address it came from.
async fn answer_reinvite(phone: &Phone, port: u16) -> (pbx_sip_msg::SipMessage, SocketAddr) {
    let (reinvite, from) = support::recv_until(&phone.socket, "re-INVITE", LIMIT, |m| {
        m.method() == Some(&pbx_sip_msg::Method::Invite)
    })
    .await;
    let ok = support::response_to(
        &reinvite,
        200,
        "x",
        phone.addr,
        &support::phone_sdp(phone.addr, port, 2),
    );
    phone.socket.send_to(ok.as_bytes(), from).await.unwrap();
    support::recv_until(&phone.socket, "ACK of the re-INVITE", LIMIT, |m| {
        m.method() == Some(&pbx_sip_msg::Method::Ack)
    })
    .await;
    (reinvite, from)
}

/// alice and bob registered through a follower, and alice's answered call to bob
/// through it, recorded (both legs) on every node.
struct FollowerCall {
    leader: u64,
    owner: u64,
    alice: Phone,
    bob: Phone,
    /// alice's From and To in her dialog with the node.
    from_h: String,
    to_h: String,
}

async fn call_on_a_follower(c: &TestCluster) -> FollowerCall {
    let leader = c.wait_leader_among(&[1, 2, 3], None).await;
    let owner = others(leader)[0];
    let mut alice = Phone::new("alice", "alice-pw").await;
    let mut bob = Phone::new("bob", "bob-pw").await;
    c.register_ok(&mut alice, owner).await;
    c.register_ok(&mut bob, owner).await;
    c.wait_binding(owner, "bob").await;
    let (from_h, to_h, _) = answered_call(c, owner, &alice, &bob).await;
    wait_until("the call recorded on every node", LIMIT, || async {
        (1..=3)
            .all(|id| {
                c.node(id)
                    .cluster
                    .read()
                    .calls
                    .get("survive-1")
                    .is_some_and(|r| r.owner == owner && r.legs.len() == 2)
            })
            .then_some(())
    })
    .await;
    FollowerCall {
        leader,
        owner,
        alice,
        bob,
        from_h,
        to_h,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_call_survives_its_node_and_is_hung_up_on_the_adopter() {
    let mut c = TestCluster::start().await;
    let FollowerCall {
        owner,
        alice,
        bob,
        from_h,
        to_h,
        ..
    } = call_on_a_follower(&c).await;

    c.stop(owner).await;
    // Each phone gets one re-INVITE from the same survivor: a target refresh there,
    // with the call's media at its relay.
    let (to_alice, adopter_addr) = answer_reinvite(&alice, 30_002).await;
    let (to_bob, bob_from) = answer_reinvite(&bob, 31_002).await;
    assert_eq!(adopter_addr, bob_from, "one adopter moves both legs");
    let adopter = others(owner)
        .into_iter()
        .find(|&id| c.node(id).sip_addr == adopter_addr)
        .expect("a survivor adopted the call");
    assert_eq!(
        to_alice.header(&HeaderName::Contact),
        Some(format!("<sip:pbx@{adopter_addr}>").as_str())
    );
    let ac = pbx_sip_msg::CoreHeaders::extract(&to_alice).unwrap();
    assert_eq!(ac.call_id, "survive-1");
    assert!(ac.cseq.seq > pbx_state::CSEQ_HEADROOM);
    let body = String::from_utf8_lossy(&to_alice.body);
    assert!(
        body.contains(&format!("c=IN IP4 {}", adopter_addr.ip())),
        "{body}"
    );
    let bob_body = String::from_utf8_lossy(&to_bob.body);
    assert!(bob_body.contains("m=audio "), "{bob_body}");
    for id in others(owner) {
        wait_until("the record names the adopter", LIMIT, || async {
            c.node(id)
                .cluster
                .read()
                .calls
                .get("survive-1")
                .is_some_and(|r| r.owner == adopter && r.epoch == 1 && r.history[0].0 == owner)
                .then_some(())
        })
        .await;
    }
    // No second re-INVITE comes (one decision, one adopter).
    assert!(
        support::recv_from(&alice.socket, Duration::from_millis(500))
            .await
            .is_none(),
        "nothing more for alice"
    );

    // alice hangs up on the adopter: bob gets the BYE, the record ends.
    let bye = format!(
        "BYE sip:pbx@{adopter_addr} SIP/2.0\r\nVia: SIP/2.0/UDP {a};rport;branch=z9hG4bKbye\r\n\
         Max-Forwards: 70\r\nFrom: {from_h}\r\nTo: {to_h}\r\nCall-ID: survive-1\r\nCSeq: 3 BYE\r\n\
         Content-Length: 0\r\n\r\n",
        a = alice.addr
    );
    alice
        .socket
        .send_to(bye.as_bytes(), adopter_addr)
        .await
        .unwrap();
    support::recv_until(&alice.socket, "200 to the BYE", LIMIT, |m| {
        m.status() == Some(200)
    })
    .await;
    let (bye_to_bob, from) = support::recv_until(&bob.socket, "BYE to bob", LIMIT, |m| {
        m.method() == Some(&pbx_sip_msg::Method::Bye)
    })
    .await;
    let ok = support::response_to(&bye_to_bob, 200, "x", bob.addr, "");
    bob.socket.send_to(ok.as_bytes(), from).await.unwrap();
    for id in others(owner) {
        wait_until("the call's record gone", LIMIT, || async {
            (!c.node(id).cluster.read().calls.contains_key("survive-1")).then_some(())
        })
        .await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_owner_fences_its_call_and_one_survivor_adopts_it_once() {
    let c = TestCluster::start().await;
    let FollowerCall {
        owner, alice, bob, ..
    } = call_on_a_follower(&c).await;

    // Silence, not refusal: the links to and from the owner hang (a network cut).
    let hang = pbx_peer::Fault::Delay(Duration::from_secs(3600));
    for other in others(owner) {
        c.net.set(owner, other, hang);
        c.net.set(other, owner, hang);
    }
    let (_, adopter_addr) = answer_reinvite(&alice, 30_002).await;
    let (_, bob_from) = answer_reinvite(&bob, 31_002).await;
    assert_eq!(adopter_addr, bob_from);
    assert_ne!(adopter_addr, c.node(owner).sip_addr);
    // The cut-off owner had stopped the call before it was adopted: it no longer
    // counts it, and nothing comes from it after the partition heals.
    assert!(
        c.node(owner).cluster.cut_off_for() > Duration::from_millis(1500),
        "adopted only after the owner fenced itself"
    );
    c.net.heal();
    wait_until("the old owner follows the adoption", LIMIT, || async {
        c.node(owner)
            .cluster
            .read()
            .calls
            .get("survive-1")
            .is_some_and(|r| r.owner != owner && r.epoch == 1)
            .then_some(())
    })
    .await;
    for phone in [&alice, &bob] {
        if let Some((m, from)) = support::recv_from(&phone.socket, Duration::from_millis(700)).await
        {
            panic!("unexpected {m:?} from {from} after the adoption");
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_hands_its_call_over_without_ending_it() {
    let c = TestCluster::start().await;
    let FollowerCall {
        leader,
        owner,
        alice,
        bob,
        ..
    } = call_on_a_follower(&c).await;
    // What `pbxctl node drain --migrate` commits.
    let to = c
        .node(leader)
        .cluster
        .read()
        .call_takers(owner, &[1, 2, 3], |_| true);
    let moved = c
        .node(leader)
        .cluster
        .propose(pbx_state::Command::AdoptCalls {
            from: owner,
            to,
            only: None,
            now_ms: unix_ms(),
        })
        .await
        .unwrap();
    assert_eq!(moved, pbx_state::Response::Swept(1));
    let (_, adopter_addr) = answer_reinvite(&alice, 30_002).await;
    let (_, bob_from) = answer_reinvite(&bob, 31_002).await;
    assert_eq!(adopter_addr, bob_from);
    assert_ne!(
        adopter_addr,
        c.node(owner).sip_addr,
        "moved off the drained node"
    );
    for phone in [&alice, &bob] {
        if let Some((m, from)) = support::recv_from(&phone.socket, Duration::from_millis(700)).await
        {
            panic!("unexpected {m:?} from {from}: the old owner hands over silently");
        }
    }
    c.shutdown().await;
}
