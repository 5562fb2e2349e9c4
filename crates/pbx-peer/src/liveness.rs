//! Which other members are alive: every node probes every other one over the peer link
//! a few times a second (the `Ping` RPC, on the connection Raft uses).
//!
//! Two kinds of failure tell different stories (ADR 0010):
//! - **refused** — the connection is refused or reset at once: nothing listens at the
//!   node's address, its process is gone (a kill, a crash, a restart). Declared dead
//!   after [`LivenessConfig::dead_after_refused`], short: a dead process cannot act.
//! - **silent** — no answer within the probe timeout: the node or the network is
//!   down, or the node is cut off and may still be running. Declared dead only after
//!   [`LivenessConfig::dead_after_silence`], longer than the time a cut-off node takes
//!   to fence itself (stop its calls), so its calls are never run twice.
//!
//! A single answer makes a node alive again.
//!
//! The same probes tell a node whether *it* is cut off: when fewer than a majority of
//! the voters (itself included) answered lately, it does not campaign for leadership
//! (it could not win, and the higher term it would bring back would depose a healthy
//! leader: what Raft's pre-vote prevents), and past `fence_after` it stops its calls.
//! Nor does a follower campaign while its leader still answers its probes: heartbeats
//! that arrive late because the cores are busy are not a failure (a leader that answers
//! probes but sends no heartbeats for [`STUCK_LEADER_LEASES`] leases is one). This is
//! what lets the election timeout be short without spurious elections.
//!
//! The verdicts are [`Probes`]'s, pure and tested on virtual time; the task that sends
//! the probes is [`run`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster::Shared;
use crate::{NodeId, PeerError};

/// How members are probed and when one counts as dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    pub probe_every: Duration,
    /// A probe without an answer by then is a silent one.
    pub probe_timeout: Duration,
    pub dead_after_refused: Duration,
    pub dead_after_silence: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            probe_every: Duration::from_millis(100),
            probe_timeout: Duration::from_millis(500),
            dead_after_refused: Duration::from_millis(200),
            dead_after_silence: Duration::from_millis(3000),
        }
    }
}

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Answered,
    Refused,
    Silent,
}

/// A member as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Answered its last probe (or has not been probed yet).
    Alive,
    /// Failing, not long enough to be declared dead.
    Suspect,
    /// Refused for `dead_after_refused`, or silent for `dead_after_silence`.
    Dead,
}

#[derive(Debug, Clone, Copy, Default)]
struct Health {
    /// When the current run of failures began; `None` while it answers.
    failing_since: Option<Instant>,
    /// Every failure of the run was a refusal.
    only_refused: bool,
    last_answer: Option<Instant>,
    /// The last log index its last answer reported.
    last_log: u64,
}

/// The probe results of every member, and the verdicts on them and on this node.
#[derive(Debug)]
pub struct Probes {
    config: LivenessConfig,
    peers: HashMap<NodeId, Health>,
    /// The last time a majority of the voters answered (this node counting as one).
    majority_at: Instant,
}

impl Probes {
    pub fn new(config: LivenessConfig, now: Instant) -> Probes {
        Probes {
            config,
            peers: HashMap::new(),
            majority_at: now,
        }
    }

    /// A member answered lately: within a probe timeout and interval.
    fn answers(&self, node: NodeId, now: Instant) -> bool {
        self.answered_within(
            node,
            now,
            self.config.probe_timeout + self.config.probe_every,
        )
    }

    /// Whether `node` answered a probe within `window` before `now`.
    pub fn answered_within(&self, node: NodeId, now: Instant, window: Duration) -> bool {
        self.peers
            .get(&node)
            .and_then(|h| h.last_answer)
            .is_some_and(|at| now.saturating_duration_since(at) <= window)
    }

    /// Whether this node (`me`) may campaign for leadership now (see the module doc):
    /// only when a majority of `voters` answers it, and not while `leader` answered one
    /// of its probes within `hold` — unless no heartbeat came for `stuck` (`silent`: time
    /// since the leader's last append reached this node).
    #[allow(clippy::too_many_arguments)]
    pub fn campaign(
        &mut self,
        now: Instant,
        me: NodeId,
        voters: &[NodeId],
        leader: Option<NodeId>,
        hold: Duration,
        silent: Duration,
        stuck: Duration,
    ) -> Campaign {
        if !self.reaches_majority(now, me, voters) {
            return Campaign::NoMajority;
        }
        let answers = leader.filter(|l| *l != me).is_some_and(|l| {
            self.answered_within(l, now, hold) && self.state(l, now) != PeerState::Dead
        });
        if answers && silent <= stuck {
            Campaign::LeaderAnswers
        } else {
            Campaign::Yes
        }
    }

    /// Whether a majority of `voters` answered lately, `me` counting as one (a node
    /// that is not a voter never has one); remembered for [`Probes::cut_off_for`].
    pub fn reaches_majority(&mut self, now: Instant, me: NodeId, voters: &[NodeId]) -> bool {
        let reached = voters
            .iter()
            .filter(|v| **v == me || self.answers(**v, now))
            .count();
        let ok = reached * 2 > voters.len();
        if ok {
            self.majority_at = now;
        }
        ok
    }

    /// How long no majority has answered (zero while one does).
    pub fn cut_off_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.majority_at)
    }

    pub fn record(&mut self, node: NodeId, now: Instant, probe: Probe) {
        let h = self.peers.entry(node).or_default();
        match probe {
            Probe::Answered => {
                *h = Health {
                    last_answer: Some(now),
                    last_log: h.last_log,
                    ..Health::default()
                }
            }
            Probe::Refused | Probe::Silent => {
                if h.failing_since.is_none() {
                    h.failing_since = Some(now);
                    h.only_refused = true;
                }
                h.only_refused &= probe == Probe::Refused;
            }
        }
    }

    pub fn state(&self, node: NodeId, now: Instant) -> PeerState {
        let Some(h) = self.peers.get(&node) else {
            return PeerState::Alive;
        };
        let Some(since) = h.failing_since else {
            return PeerState::Alive;
        };
        let failing = now.saturating_duration_since(since);
        let limit = if h.only_refused {
            self.config.dead_after_refused
        } else {
            self.config.dead_after_silence
        };
        if failing >= limit {
            PeerState::Dead
        } else {
            PeerState::Suspect
        }
    }

    /// Notes the last log index a member's answer reported.
    pub fn note_log(&mut self, node: NodeId, last_log_index: u64) {
        self.peers.entry(node).or_default().last_log = last_log_index;
    }

    /// Whether a member other than `except` that answered within `window` reported a
    /// log beyond `mine`: it can win an election this node cannot (its log is more up
    /// to date), and this node's campaigns would only delay it. Reports are at most a
    /// probe old and logs only grow, so "beyond" is a fact, never a guess.
    pub fn log_behind(&self, mine: u64, now: Instant, window: Duration, except: NodeId) -> bool {
        self.peers.iter().any(|(id, h)| {
            *id != except
                && h.last_log > mine
                && h.last_answer
                    .is_some_and(|at| now.saturating_duration_since(at) <= window)
        })
    }

    /// Whether `node`'s process is gone: dead by refusals only (nothing listens at its
    /// address), not by silence (which a partition also explains).
    pub fn gone(&self, node: NodeId, now: Instant) -> bool {
        self.state(node, now) == PeerState::Dead
            && self.peers.get(&node).is_some_and(|h| h.only_refused)
    }

    /// Forgets nodes that are no longer members.
    pub fn retain(&mut self, members: &[NodeId]) {
        self.peers.retain(|n, _| members.contains(n));
    }
}

/// [`Probes::campaign`]'s verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Campaign {
    Yes,
    /// It could not win, and the term it would raise would depose the healthy leader
    /// when it comes back.
    NoMajority,
    /// Late heartbeats from a leader that answers probes are load, not failure.
    LeaderAnswers,
}

/// How many leases a follower waits for heartbeats from a leader that still answers its
/// probes before it campaigns anyway (the leader's Raft is stuck, its peer link is not).
pub const STUCK_LEADER_LEASES: u32 = 3;

/// Probes every other member every `probe_every`, one probe in flight per member.
pub(crate) async fn run(shared: Arc<Shared>, probes: Arc<Mutex<Probes>>) {
    let config = shared.config.liveness;
    let mut tick = tokio::time::interval(config.probe_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let in_flight: Arc<Mutex<std::collections::HashSet<NodeId>>> = Arc::default();
    let mut stopped = shared.stopped.subscribe();
    let mut campaigning = true;
    let mut hasten = Hasten::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        let me = shared.config.node_id;
        let (members, voters): (Vec<(NodeId, String)>, Vec<NodeId>) = {
            let m = shared.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            (
                membership
                    .nodes()
                    .filter(|(id, _)| **id != me)
                    .map(|(id, n)| (*id, n.peer_addr.clone()))
                    .collect(),
                membership.voter_ids().collect(),
            )
        };
        let leader = shared.raft.metrics().borrow().current_leader;
        let verdict = {
            let ids: Vec<NodeId> = members.iter().map(|(id, _)| *id).collect();
            let mut p = crate::lock(&probes);
            p.retain(&ids);
            p.campaign(
                Instant::now(),
                me,
                &voters,
                leader,
                shared.config.election_timeout_min,
                shared.since_leader_contact(),
                shared.config.election_timeout_max * STUCK_LEADER_LEASES,
            )
        };
        let campaign = verdict == Campaign::Yes;
        if campaign != campaigning {
            campaigning = campaign;
            shared.raft.runtime_config().elect(campaign);
            match verdict {
                Campaign::Yes => tracing::info!("taking part in elections again"),
                Campaign::NoMajority => {
                    tracing::warn!("no majority answers probes: not campaigning for leadership")
                }
                Campaign::LeaderAnswers => {
                    tracing::debug!(?leader, "the leader answers probes: not campaigning")
                }
            }
        }
        if verdict != Campaign::NoMajority {
            hasten.election(&shared, &probes);
        }
        for (id, addr) in members {
            if !crate::lock(&in_flight).insert(id) {
                continue;
            }
            let (shared, probes, in_flight) = (shared.clone(), probes.clone(), in_flight.clone());
            tokio::spawn(async move {
                let sent = Instant::now();
                let outcome = tokio::time::timeout(
                    config.probe_timeout,
                    shared.pool.ping(id, &addr, config.probe_timeout),
                )
                .await;
                let probe = match outcome {
                    Ok(Ok(last_log)) => {
                        crate::lock(&probes).note_log(id, last_log);
                        Probe::Answered
                    }
                    // Refused, or the connection reset under a probe in flight, well
                    // before the timeout: nobody listens there (any more). A live node
                    // answers the next probe, and only refusals for
                    // `dead_after_refused` make it dead.
                    Ok(Err(PeerError::Unreachable(_) | PeerError::Transport(_)))
                        if sent.elapsed() < config.probe_timeout / 2 =>
                    {
                        Probe::Refused
                    }
                    Ok(Err(_)) | Err(_) => Probe::Silent,
                };
                let was = {
                    let mut p = crate::lock(&probes);
                    let was = p.state(id, Instant::now());
                    p.record(id, Instant::now(), probe);
                    was
                };
                if probe == Probe::Answered && was != PeerState::Alive {
                    tracing::info!(node = id, "peer answers probes again");
                } else if probe != Probe::Answered && was == PeerState::Alive {
                    tracing::info!(node = id, ?probe, "peer stopped answering probes");
                }
                crate::lock(&in_flight).remove(&id);
            });
        }
    }
}

/// Elections after a leader's failure, sooner than openraft's timers would hold them.
///
/// - **The leader's process is gone** ([`Probes::gone`]): campaign at once, and again
///   every half probe interval (staggered by node id) while no live leader is known. The
///   first round is refused by the followers whose lease still runs (openraft 0.9
///   refuses votes for `election_timeout_max` after the last append), but each follower
///   that campaigns turns its own vote into an uncommitted one, which the lease does not
///   protect: the next round, one term higher, wins. Only a follower whose log is not
///   behind another's campaigns again (a follower behind cannot win, and its rising
///   term would keep the one ahead from winning). Leader death to a new leader is then
///   the time to see the refusals plus a round or two, not a lease. Safe for Raft: terms
///   and logs decide, the lease only delays; and a process that is gone leads nothing.
/// - **The leader stopped answering our probes and sending appends** for
///   `election_timeout_min` (hung, or cut off from us): the same. Followers that still
///   hear it keep refusing (their lease runs), so a follower cut off alone raises only
///   its own term; after [`QUICK_ROUNDS`] rounds it campaigns once per
///   `election_timeout_min`.
#[derive(Debug, Default)]
struct Hasten {
    /// The leader this node last knew (candidates know none).
    leader: Option<NodeId>,
    asked: Option<Instant>,
    /// Campaigns since the leader was last seen alive.
    rounds: u32,
}

/// Campaigns a node starts in quick succession after its leader failed; the second
/// normally wins (see [`Hasten`]).
const QUICK_ROUNDS: u32 = 3;

impl Hasten {
    fn election(&mut self, shared: &Arc<Shared>, probes: &Arc<Mutex<Probes>>) {
        let me = shared.config.node_id;
        let (state, current) = {
            let m = shared.raft.metrics();
            let m = m.borrow();
            (m.state, m.current_leader)
        };
        if !matches!(
            state,
            openraft::ServerState::Follower | openraft::ServerState::Candidate
        ) || current == Some(me)
        {
            self.leader = None;
            self.rounds = 0;
            return;
        }
        if current.is_some() {
            self.leader = current;
        }
        let Some(leader) = self.leader else {
            return;
        };
        let now = Instant::now();
        let hold = shared.config.election_timeout_min;
        let (gone, answers) = {
            let p = crate::lock(probes);
            (p.gone(leader, now), p.answered_within(leader, now, hold))
        };
        let stagger = Duration::from_millis(30 * (me % 8));
        let due = gone || (!answers && shared.since_leader_contact() > hold + stagger);
        if !due {
            self.rounds = 0;
            return;
        }
        // Long enough for the other followers to have seen the leader fail and
        // campaigned once themselves (probes are half a probe interval apart on average).
        let retry = if self.rounds < QUICK_ROUNDS {
            shared.config.liveness.probe_every / 2 + stagger
        } else {
            hold + stagger
        };
        // Every follower campaigns once (that is what frees its vote from the lease);
        // after that only those whose log is not behind another live member's.
        let behind = self.rounds > 0
            && crate::lock(probes).log_behind(shared.last_log_index(), now, hold, leader);
        if !behind && self.asked.is_none_or(|at| at.elapsed() > retry) {
            if self.rounds == 0 {
                tracing::info!(
                    leader,
                    gone,
                    "the leader is gone or silent: campaigning now"
                );
            }
            self.rounds += 1;
            self.asked = Some(now);
            let raft = shared.raft.clone();
            tokio::spawn(async move {
                let _ = raft.trigger().elect().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_is_dead_soon_silence_only_later_and_one_answer_revives() {
        let config = LivenessConfig::default();
        let t0 = Instant::now();
        let mut p = Probes::new(config, t0);
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(p.state(2, t0), PeerState::Alive, "not probed yet");
        // Node 2's process is gone: refusals.
        p.record(2, ms(0), Probe::Refused);
        assert_eq!(p.state(2, ms(100)), PeerState::Suspect);
        p.record(2, ms(200), Probe::Refused);
        assert_eq!(p.state(2, ms(300)), PeerState::Dead);
        // Node 3 is cut off: silence, dead only after the longer delay.
        p.record(3, ms(0), Probe::Silent);
        p.record(3, ms(500), Probe::Refused);
        assert_eq!(p.state(3, ms(2999)), PeerState::Suspect, "silence seen");
        assert_eq!(p.state(3, ms(3000)), PeerState::Dead);
        // An answer makes it alive at once.
        p.record(3, ms(3100), Probe::Answered);
        assert_eq!(p.state(3, ms(3100)), PeerState::Alive);
        p.retain(&[3]);
        assert_eq!(p.state(2, ms(4000)), PeerState::Alive, "forgotten");
    }

    #[test]
    fn a_node_that_reaches_no_majority_knows_for_how_long() {
        let config = LivenessConfig::default();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut p = Probes::new(config, t0);
        let voters = [1, 2, 3];
        p.record(2, ms(0), Probe::Answered);
        assert!(p.reaches_majority(ms(10), 1, &voters), "itself and node 2");
        // Node 2 stops answering; node 3 never did.
        p.record(2, ms(100), Probe::Silent);
        assert!(
            p.reaches_majority(ms(600), 1, &voters),
            "2's answer is recent"
        );
        assert!(!p.reaches_majority(ms(700), 1, &voters));
        assert_eq!(p.cut_off_for(ms(2700)), Duration::from_millis(2100));
        p.record(3, ms(2800), Probe::Answered);
        assert!(p.reaches_majority(ms(2800), 1, &voters));
        assert_eq!(p.cut_off_for(ms(2800)), Duration::ZERO);
        // A single voter is its own majority.
        assert!(p.reaches_majority(ms(9000), 1, &[1]));
    }

    #[test]
    fn a_leader_that_answered_lately_holds_elections_off() {
        let config = LivenessConfig::default();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let (hold, stuck) = (Duration::from_millis(500), Duration::from_millis(3000));
        let quiet = |n| Duration::from_millis(n);
        let voters = [1, 2, 3];
        let mut p = Probes::new(config, t0);
        p.record(2, ms(100), Probe::Answered);
        p.record(3, ms(100), Probe::Answered);
        // Node 1 follows leader 2, whose heartbeats are late but whose probes answer.
        assert_eq!(
            p.campaign(ms(200), 1, &voters, Some(2), hold, quiet(1500), stuck),
            Campaign::LeaderAnswers
        );
        // Its Raft stuck: no heartbeat for longer than `stuck`, probes still answered.
        assert_eq!(
            p.campaign(ms(200), 1, &voters, Some(2), hold, quiet(3001), stuck),
            Campaign::Yes
        );
        // The leader's process is gone: refusals. Suspect at first (its last answer is
        // recent), a campaign as soon as the refusals make it dead, before `hold`.
        p.record(2, ms(300), Probe::Refused);
        p.record(3, ms(450), Probe::Answered);
        assert_eq!(
            p.campaign(ms(450), 1, &voters, Some(2), hold, quiet(450), stuck),
            Campaign::LeaderAnswers,
            "refused for 150 ms only"
        );
        assert!(!p.gone(2, ms(450)));
        assert_eq!(
            p.campaign(ms(500), 1, &voters, Some(2), hold, quiet(500), stuck),
            Campaign::Yes
        );
        assert!(p.gone(2, ms(500)));
        assert_eq!(
            p.campaign(ms(601), 2, &voters, Some(2), hold, quiet(0), stuck),
            Campaign::Yes,
            "the leader's own view"
        );
        // Cut off from both: no campaign, whatever the leader does.
        p.record(3, ms(700), Probe::Silent);
        assert_eq!(
            p.campaign(ms(1300), 1, &voters, Some(2), hold, quiet(1300), stuck),
            Campaign::NoMajority
        );
    }

    #[test]
    fn silence_is_never_gone_and_a_hung_leader_is_left_after_hold() {
        let config = LivenessConfig::default();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let (hold, stuck) = (Duration::from_millis(500), Duration::from_millis(3000));
        let voters = [1, 2, 3];
        let mut p = Probes::new(config, t0);
        p.record(2, ms(100), Probe::Answered);
        p.record(3, ms(100), Probe::Answered);
        // Leader 2 hangs: probes time out.
        p.record(2, ms(700), Probe::Silent);
        p.record(3, ms(700), Probe::Answered);
        assert_eq!(
            p.campaign(
                ms(700),
                1,
                &voters,
                Some(2),
                hold,
                Duration::from_millis(700),
                stuck
            ),
            Campaign::Yes,
            "no answer within hold"
        );
        assert!(!p.gone(2, ms(9000)), "silence may be a partition");
        assert_eq!(p.state(2, ms(3700)), PeerState::Dead, "dead for adoption");
        // A refusal after silence does not make the run a refusal-only one.
        p.record(2, ms(3800), Probe::Refused);
        assert!(!p.gone(2, ms(9000)));
    }

    #[test]
    fn a_follower_behind_another_live_one_knows_it() {
        let config = LivenessConfig::default();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let window = Duration::from_millis(500);
        let mut p = Probes::new(config, t0);
        p.record(2, ms(0), Probe::Answered);
        p.note_log(2, 120);
        p.record(3, ms(0), Probe::Answered);
        p.note_log(3, 100);
        assert!(p.log_behind(110, ms(100), window, 9), "node 2 has 120");
        assert!(
            !p.log_behind(120, ms(100), window, 9),
            "equal is not behind"
        );
        assert!(
            !p.log_behind(110, ms(100), window, 2),
            "the dead leader does not count"
        );
        assert!(
            !p.log_behind(110, ms(600), window, 9),
            "node 2's answer is too old"
        );
        // A later answer keeps the reported log until the next report.
        p.record(2, ms(700), Probe::Answered);
        assert!(p.log_behind(110, ms(700), window, 9));
    }
}
