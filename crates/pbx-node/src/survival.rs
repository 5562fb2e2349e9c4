//! Calls that survive their node (ADR 0010). Every node runs [`run`]:
//! - **fencing**: a node cut off from the majority longer than `fence_after` stops its
//!   answered calls, silently (no BYE, no media): once it has been silent for
//!   `dead_after_silence` the others adopt them, and a call must never run twice;
//! - **adoption** (the leader): the calls of a member its probes find dead go to the
//!   live members by one committed [`Command::AdoptCalls`];
//! - **resuming**: calls the replicated state gives this node and that it does not run
//!   are started here from their records (re-INVITE of both legs);
//! - **handing back**: a call that the state gives to another node (or a later epoch)
//!   while it runs here is released; calls this node released while cut off, still
//!   recorded as its own, are handed to the others once it is back.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pbx_peer::{Cluster, PeerState};
use pbx_state::{CallRecord, Command};

use crate::calls::{self, CallLayer, Fate};
use crate::unix_ms;

/// How often the state and the probes are looked at.
const TICK: Duration = Duration::from_millis(50);
/// A proposal about one node's calls is not repeated sooner than this.
const PROPOSE_EVERY: Duration = Duration::from_secs(1);
/// How long an adopted call waits for a TCP/TLS phone whose connection died with the
/// old owner to register again through a live node before it is resumed anyway (and
/// that leg fails). RFC 5626 §4.5 flow recovery waits a random 50–100 % of 30 s × 2 after
/// the first failure (baresip: 30–60 s); the rest is margin for DNS and the REGISTER.
const FLOW_WAIT: Duration = Duration::from_secs(90);
/// A call moved away while it runs here keeps its relay this long (make before break:
/// the new owner's re-INVITEs move the phones meanwhile).
pub(crate) const HANDOVER_GRACE: Duration = Duration::from_secs(2);

pub(crate) async fn run(layer: Arc<CallLayer>, cluster: Cluster, fence_after: Duration) {
    // Decisions are taken on the local state: it must not be one a restart left behind
    // (calls recorded as this node's that the others took over meanwhile).
    while !(cluster.is_ready() && cluster.catch_up(Duration::from_secs(5)).await) {
        tokio::time::sleep(TICK).await;
    }
    let me = layer.node_id();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fenced = false;
    let mut proposed: HashMap<u64, Instant> = HashMap::new();
    let mut last_forget = Instant::now();
    // Adopted calls waiting for a connection-bound phone to come back, since when.
    let mut waiting: HashMap<String, Instant> = HashMap::new();
    loop {
        tick.tick().await;
        let cut_off = cluster.cut_off_for();
        if cut_off > fence_after {
            if !fenced {
                fenced = true;
                let running = layer.running();
                for id in &running {
                    layer.release(id, Duration::ZERO);
                }
                tracing::warn!(
                    cut_off_ms = cut_off.as_millis() as u64,
                    calls = running.len(),
                    "cut off from the majority: answered calls stopped (fencing); the others adopt them"
                );
            }
            continue;
        }
        if fenced && cut_off.is_zero() {
            // Back: what happened meanwhile must be applied before acting on it.
            if !cluster.catch_up(Duration::from_secs(5)).await {
                continue;
            }
            fenced = false;
            tracing::info!("majority reached again: calls handled again");
        }
        if fenced {
            continue;
        }
        let mut adopt: Vec<CallRecord> = Vec::new();
        let mut moved_away: Vec<String> = Vec::new();
        let mut orphans: Vec<String> = Vec::new();
        let mut owners: BTreeSet<u64> = BTreeSet::new();
        {
            let state = cluster.read();
            for c in state.calls.values() {
                owners.insert(c.owner);
                let fate = layer.fate(&c.id);
                if c.owner == me {
                    match fate {
                        None => adopt.push(c.clone()),
                        Some((epoch, _)) if epoch < c.epoch => adopt.push(c.clone()),
                        Some((_, Fate::Released)) => orphans.push(c.id.clone()),
                        Some(_) => {}
                    }
                } else if let Some((epoch, Fate::Running)) = fate {
                    if epoch <= c.epoch {
                        moved_away.push(c.id.clone());
                    }
                }
            }
            if last_forget.elapsed() > Duration::from_secs(1) {
                last_forget = Instant::now();
                layer.forget_fates(|id| state.calls.contains_key(id));
            }
        }
        for id in moved_away {
            tracing::info!(call = %id, "call adopted by another node: released here");
            layer.release(&id, HANDOVER_GRACE);
        }
        waiting.retain(|id, _| adopt.iter().any(|r| &r.id == id));
        for record in adopt {
            // The node the call was taken from holds a phone's connection only if it
            // answers probes (a drained node): after a death this node's own probes may
            // not have called it dead yet.
            let from = record.history.last().map(|(n, _)| *n);
            let reachable = {
                let state = cluster.read();
                pbx_endpoint::legs_reachable(&state, &record.legs, unix_ms(), |n| {
                    let seen = cluster.peer_state(n);
                    n == me
                        || seen == PeerState::Alive
                        || (Some(n) != from && seen != PeerState::Dead)
                })
            };
            if !reachable {
                let since = *waiting.entry(record.id.clone()).or_insert_with(|| {
                    tracing::info!(call = %record.id, "adopted call waits for its TCP/TLS phone to register again");
                    Instant::now()
                });
                if since.elapsed() < FLOW_WAIT {
                    continue;
                }
            }
            waiting.remove(&record.id);
            if calls::start_resumed(&layer, &record) {
                tracing::info!(call = %record.id, epoch = record.epoch, "adopting call");
            }
        }
        if !orphans.is_empty() {
            propose_adoption(&cluster, me, Some(orphans), &mut proposed);
        }
        if cluster.is_leader() {
            for owner in owners {
                if owner != me && cluster.peer_state(owner) == PeerState::Dead {
                    propose_adoption(&cluster, owner, None, &mut proposed);
                }
            }
        }
    }
}

/// Proposes that `from`'s calls (or those in `only`) go to the live members; at most
/// once per [`PROPOSE_EVERY`] per node, in the background.
fn propose_adoption(
    cluster: &Cluster,
    from: u64,
    only: Option<Vec<String>>,
    proposed: &mut HashMap<u64, Instant>,
) {
    if proposed
        .get(&from)
        .is_some_and(|at| at.elapsed() < PROPOSE_EVERY)
    {
        return;
    }
    proposed.insert(from, Instant::now());
    let to = {
        let state = cluster.read();
        state.call_takers(from, &cluster.voters(), |n| {
            cluster.peer_state(n) != PeerState::Dead
        })
    };
    let cluster = cluster.clone();
    tokio::spawn(async move {
        let cmd = Command::AdoptCalls {
            from,
            to: to.clone(),
            only,
            now_ms: unix_ms(),
        };
        match cluster.propose(cmd).await {
            Ok(pbx_state::Response::Swept(n)) if n > 0 => {
                tracing::warn!(node = from, calls = n, to = ?to, "calls of node adopted")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(node = from, error = %e, "adoption not committed yet"),
        }
    });
}
