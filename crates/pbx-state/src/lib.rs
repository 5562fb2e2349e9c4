//! The replicated state machine: users, the location service (bindings) and cluster
//! settings change only by [`Command`]s applied in log order by [`State::apply`].
//!
//! `apply` is deterministic: no clock and no randomness inside. Time comes in the command
//! (stamped by the Raft leader when it proposes the command), and so does
//! the cluster secret.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

pub mod bindings;
pub mod cdr;
mod names;
pub mod users_csv;
pub mod voicemail;

pub use bindings::{Binding, ContactUpdate, ContactView, RegisterOp};
pub use cdr::{parse_utc, utc_datetime, Cdr, CdrKeep, CdrLog, CdrStart};
pub use names::{validate_context, validate_user_name, MAX_USER_NAME};
pub use voicemail::{Voicemail, VoicemailOp, VoicemailOutcome};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot encode or decode state: {0}")]
    Codec(#[from] bincode::Error),
    #[error("state snapshot: {0}")]
    Format(String),
    #[error("user name {name:?}: {why}")]
    UserName { name: String, why: String },
    #[error("context {0:?}: empty, or with whitespace or ']'")]
    Context(String),
    #[error("users CSV: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    UsersCsv(Vec<users_csv::LineError>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The user name, which is also the extension.
    pub name: String,
    /// Digest HA1 = H(user:realm:password) for MD5 and SHA-256, lower-case hex.
    pub ha1_md5: String,
    pub ha1_sha256: String,
    /// The realm the HA1s were computed for.
    pub realm: String,
    /// Dialplan context the user's calls run in.
    pub context: String,
    pub caller_id_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    pub fn as_str(&self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }
    /// Bound to a connection held by one node.
    pub fn is_connection_bound(&self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterSettings {
    pub domain: String,
    pub realm: String,
    /// Key for stateless digest nonces that every node can verify.
    pub nonce_secret: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// First command of a cluster; ignored once settings exist.
    Initialize(ClusterSettings),
    UpsertUser(User),
    /// Adds users that do not exist yet; existing ones are left alone (seeding from the
    /// initial users file must not overwrite changes made since).
    SeedUsers(Vec<User>),
    RemoveUser {
        name: String,
    },
    Register {
        aor: String,
        now_ms: u64,
        call_id: String,
        cseq: u32,
        op: RegisterOp,
        max_contacts: u32,
    },
    /// Purges bindings expired at `now_ms`.
    SweepExpired {
        now_ms: u64,
    },
    /// Replaces the dialplan. Validated again here, so a bad dialplan never replaces a
    /// good one whoever proposed it; the one replaced goes to the history.
    SetDialplan {
        source: String,
        now_ms: u64,
    },
    /// Several commands committed as one log entry (group commit); applied in order,
    /// answered one response each.
    Batch(Vec<Command>),
    /// A call was answered on its owner node, or its record changed there (new SDP, a
    /// CSeq beyond the recorded headroom): both dialogs and their media, enough for
    /// another node to resume the call. Ignored when the call has moved to another
    /// owner or a later adoption meanwhile (a stale owner cannot take it back).
    CallAnswered(CallRecord),
    /// The call ended on `owner` (`None`: whoever owns it; an operator's cleanup).
    /// Ignored when the call has moved to another owner meanwhile.
    CallEnded {
        id: String,
        owner: Option<u64>,
        epoch: u32,
    },
    /// The calls of a node that left the cluster (removed): their records are dropped.
    CallsOfOwnerEnded {
        owner: u64,
    },
    /// The calls of `from` (all of them, or those named in `only`) move to the nodes in
    /// `to`, spread over them in call-id order: one decision, the same on every node.
    /// A call that is no longer `from`'s is left alone, so the same adoption twice moves
    /// nothing. With `to` empty, the calls are dropped (nobody can take them).
    AdoptCalls {
        from: u64,
        to: Vec<u64>,
        only: Option<Vec<String>>,
        /// The leader's clock, for the record's history.
        now_ms: u64,
    },
    /// An administrator removes an AOR's bindings: all, or those with this contact URI.
    RemoveBindings {
        aor: String,
        uri: Option<String>,
    },
    /// A node stops (or resumes) taking new calls and registrations.
    SetDraining {
        node: u64,
        draining: bool,
    },
    /// An administrator's change, recorded in the same log entry as the change.
    Audit(AuditEntry),
    /// An answered call's start details, for its record if another node ends it
    /// (sent with its first [`Command::CallAnswered`]).
    CdrOpened(CdrStart),
    /// A call ended: its record, and (`owner` Some) the end of its answered-call
    /// record as [`Command::CallEnded`] does — ignored, record included, when the call
    /// has moved to another owner meanwhile (that owner writes the record).
    CallFinished {
        cdr: Cdr,
        owner: Option<u64>,
        epoch: u32,
        keep: CdrKeep,
    },
    /// The leader stored the records up to `through` in PostgreSQL.
    CdrsShipped {
        through: u64,
    },
    /// A change to the mailboxes (ADR 0014), at the leader's clock.
    Voicemail {
        op: VoicemailOp,
        now_ms: u64,
    },
}

/// Who changed what, and when (the leader's clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: u64,
    /// As the admin client said (`user@host`) and where the call came from.
    pub actor: String,
    /// The node that took the admin call.
    pub node: u64,
    pub action: String,
}

/// How many audit entries the state keeps (oldest dropped first).
pub const AUDIT_KEPT: usize = 1000;

impl Command {
    /// Stamps the proposing node's clock into the command: the leader calls this just
    /// before proposing, so absolute expiries come from one clock, not from whichever
    /// node happened to receive the REGISTER.
    pub fn stamp(&mut self, now_ms: u64) {
        match self {
            Command::Register { now_ms: at, op, .. } => {
                *at = now_ms;
                if let RegisterOp::Update(updates) = op {
                    updates.iter_mut().for_each(|u| u.stamp(now_ms));
                }
            }
            Command::SetDialplan { now_ms: at, .. }
            | Command::AdoptCalls { now_ms: at, .. }
            | Command::Voicemail { now_ms: at, .. } => *at = now_ms,
            Command::Audit(e) => e.at_ms = now_ms,
            Command::Batch(list) => list.iter_mut().for_each(|c| c.stamp(now_ms)),
            Command::Initialize(_)
            | Command::CdrOpened(_)
            | Command::CallFinished { .. }
            | Command::CdrsShipped { .. }
            | Command::CallAnswered(_)
            | Command::CallEnded { .. }
            | Command::CallsOfOwnerEnded { .. }
            | Command::RemoveBindings { .. }
            | Command::SetDraining { .. }
            | Command::UpsertUser(_)
            | Command::SeedUsers(_)
            | Command::RemoveUser { .. }
            | Command::SweepExpired { .. } => {}
        }
    }
}

/// An answered call as its owner node recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The caller's Call-ID: the call's name in the cluster.
    pub id: String,
    /// The node that runs the call (holds its transactions and media).
    pub owner: u64,
    /// How many times the call was adopted: an owner's record of an older epoch is
    /// stale and ignored.
    pub epoch: u32,
    /// The nodes that ran the call before its owner, oldest first, with the time each
    /// handed it on (the leader's clock).
    pub history: Vec<(u64, u64)>,
    pub caller: String,
    /// The extension dialled.
    pub callee: String,
    pub answered_at_ms: u64,
    /// What the call is doing.
    pub activity: Activity,
    /// The caller's leg first, then the callee's (none for the node's own
    /// applications).
    pub legs: Vec<LegRecord>,
}

/// What an answered call is doing, for whoever resumes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activity {
    /// The two legs talk through the relay.
    Bridged,
    /// The node's own application (Echo, Playback, ...) with the caller.
    Application(String),
}

/// How far beyond a recorded local CSeq a node resuming a dialog starts: the owner
/// records the dialog again before its CSeq passes half of it, so a survivor's requests
/// are always above anything the dead owner can have sent (RFC 3261 §12.2.1.1).
pub const CSEQ_HEADROOM: u32 = 1000;

/// One dialog of a call, as the node sees it (RFC 3261 §12 dialog state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegRecord {
    pub call_id: String,
    /// Our From/To value, with our tag.
    pub local: String,
    /// The peer's, with its tag.
    pub remote: String,
    pub remote_target: String,
    pub route_set: Vec<String>,
    pub local_cseq: u32,
    pub remote_cseq: u32,
    /// Where the peer's messages come from / go to.
    pub peer: String,
    pub transport: Transport,
    /// The Contact URI this node gave the peer (a target refresh changes it).
    pub contact: String,
    /// The last SDP this node sent on the leg (its `o=` session id and version, the
    /// codecs and payload types agreed); empty when none.
    pub sdp_sent: String,
    /// Per media stream, where the peer receives RTP (from its last SDP).
    pub media_targets: Vec<Option<std::net::SocketAddr>>,
    /// A connection-bound phone's RFC 5626 `+sip.instance` (from its binding): how its
    /// new flow is found when it registers again, from a new port and often with a new
    /// Contact, after the node holding its connection died.
    pub instance: Option<String>,
}

/// The dialplan as committed: its source text and version (1, 2, … in commit order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDialplan {
    pub version: u64,
    pub source: String,
    pub committed_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Done,
    /// The AOR's current bindings after a REGISTER, as the 200 OK lists them.
    Bindings(Vec<ContactView>),
    /// RFC 3261 §10.3 steps 6/7: same Call-ID with a CSeq not higher than stored.
    OutOfOrder,
    /// More new contacts in one request than the per-AOR limit.
    TooManyContacts,
    NoSuchUser,
    Swept(usize),
    /// The new dialplan's version.
    DialplanVersion(u64),
    Batch(Vec<Response>),
    /// The dialplan was refused: each problem as `line N: reason`.
    InvalidDialplan(Vec<String>),
    /// A call's record from a node that no longer owns it: ignored.
    Stale,
    Voicemail(VoicemailOutcome),
}

/// Everything the cluster agrees on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct State {
    pub settings: Option<ClusterSettings>,
    pub users: BTreeMap<String, User>,
    pub bindings: HashMap<String, Vec<Binding>>,
    pub dialplan: Option<StoredDialplan>,
    /// Earlier dialplans, oldest first, at most [`DIALPLAN_HISTORY`].
    pub dialplan_history: Vec<StoredDialplan>,
    /// Answered calls in progress, by id.
    pub calls: BTreeMap<String, CallRecord>,
    /// The ids of the calls that ended last, oldest first (at most [`ENDED_KEPT`]): a
    /// late record of one of them (from a node that ran it before it moved) is stale.
    ended_calls: std::collections::VecDeque<String>,
    ended_set: std::collections::BTreeSet<String>,
    /// Nodes being drained: they take no new calls or registrations.
    pub draining: std::collections::BTreeSet<u64>,
    /// Administrators' changes, oldest first, at most [`AUDIT_KEPT`].
    pub audit: std::collections::VecDeque<AuditEntry>,
    /// Call detail records (encoded after the rest in a snapshot: format 6).
    #[serde(skip)]
    pub cdrs: CdrLog,
    /// Mailboxes and messages (after the records in a snapshot: format 7).
    #[serde(skip)]
    pub voicemail: Voicemail,
}

/// How many ended calls' ids a [`State`] remembers, to refuse their late records.
pub const ENDED_KEPT: usize = 10_000;

/// How many replaced dialplans are kept (for show, diff and rollback).
pub const DIALPLAN_HISTORY: usize = 20;

impl State {
    /// The mailbox `key` (`1001`, `1001@sales`): one with an entry (a PIN set,
    /// messages), or the mailbox every user has by its name in the `default` voicemail
    /// context.
    pub fn mailbox(&self, key: &str) -> Option<voicemail::Mailbox> {
        if let Some(m) = self.voicemail.boxes.get(key) {
            return Some(m.clone());
        }
        (!key.contains('@') && self.users.contains_key(key)).then(voicemail::Mailbox::default)
    }

    pub fn apply(&mut self, cmd: Command) -> Response {
        match cmd {
            Command::Initialize(s) => {
                if self.settings.is_none() {
                    self.settings = Some(s);
                }
                Response::Done
            }
            Command::UpsertUser(u) => {
                self.users.insert(u.name.clone(), u);
                Response::Done
            }
            Command::SeedUsers(users) => {
                for u in users {
                    self.users.entry(u.name.clone()).or_insert(u);
                }
                Response::Done
            }
            Command::RemoveUser { name } => {
                if self.users.remove(&name).is_none() {
                    return Response::NoSuchUser;
                }
                self.bindings.remove(&name);
                Response::Done
            }
            Command::Register {
                aor,
                now_ms,
                call_id,
                cseq,
                op,
                max_contacts,
            } => self.register(aor, now_ms, &call_id, cseq, op, max_contacts),
            Command::SweepExpired { now_ms } => {
                let mut n = 0;
                self.bindings.retain(|_, list| {
                    let before = list.len();
                    list.retain(|b| b.is_live(now_ms));
                    n += before - list.len();
                    !list.is_empty()
                });
                Response::Swept(n)
            }
            Command::SetDialplan { source, now_ms } => {
                if let Err(e) = pbx_dialplan::Dialplan::parse(&source) {
                    return Response::InvalidDialplan(match e {
                        pbx_dialplan::DialplanError::Invalid(list) => {
                            list.iter().map(|l| l.to_string()).collect()
                        }
                        other => vec![other.to_string()],
                    });
                }
                if let Some(cur) = self.dialplan.as_ref().filter(|d| d.source == source) {
                    // The same text again (two nodes seeding at once): no new version.
                    return Response::DialplanVersion(cur.version);
                }
                let version = self.dialplan.as_ref().map_or(1, |d| d.version + 1);
                let new = StoredDialplan {
                    version,
                    source,
                    committed_at_ms: now_ms,
                };
                if let Some(old) = self.dialplan.replace(new) {
                    self.dialplan_history.push(old);
                    let excess = self.dialplan_history.len().saturating_sub(DIALPLAN_HISTORY);
                    self.dialplan_history.drain(..excess);
                }
                Response::DialplanVersion(version)
            }
            Command::Batch(list) => {
                Response::Batch(list.into_iter().map(|c| self.apply(c)).collect())
            }
            Command::CallAnswered(record) => {
                let stale = match self.calls.get(&record.id) {
                    Some(c) => (c.epoch, c.owner) != (record.epoch, record.owner),
                    // Only a new call's first record creates one: an adopted call's
                    // record, or one of a call that ended, comes too late.
                    None => record.epoch > 0 || self.ended_set.contains(&record.id),
                };
                if stale {
                    return Response::Stale;
                }
                self.calls.insert(record.id.clone(), record);
                Response::Done
            }
            Command::CallEnded { id, owner, epoch } => {
                if !self.end_call(&id, owner, epoch) {
                    return Response::Stale;
                }
                self.cdrs.open.remove(&id);
                Response::Done
            }
            Command::CdrOpened(start) => {
                // Only for a call that is running (a late one of an ended call is stale).
                if self.ended_set.contains(&start.uniqueid) {
                    return Response::Stale;
                }
                self.cdrs.opened(start);
                Response::Done
            }
            Command::CallFinished {
                cdr,
                owner,
                epoch,
                keep,
            } => {
                if owner.is_some() && !self.end_call(&cdr.uniqueid, owner, epoch) {
                    return Response::Stale;
                }
                self.cdrs.record(cdr, keep);
                Response::Done
            }
            Command::Voicemail { op, now_ms } => {
                Response::Voicemail(self.voicemail.apply(op, now_ms))
            }
            Command::CdrsShipped { through } => {
                self.cdrs.shipped(through);
                Response::Done
            }
            Command::AdoptCalls {
                from,
                to,
                only,
                now_ms,
            } => {
                let mut moved = 0;
                let mut next = 0;
                // A set: a node handing back a thousand calls names them all.
                let only: Option<std::collections::BTreeSet<String>> =
                    only.map(|o| o.into_iter().collect());
                let ids: Vec<String> = self
                    .calls
                    .values()
                    .filter(|c| c.owner == from)
                    .filter(|c| only.as_ref().is_none_or(|o| o.contains(&c.id)))
                    .map(|c| c.id.clone())
                    .collect();
                for id in ids {
                    if to.is_empty() {
                        if let Some(c) = self.calls.remove(&id) {
                            self.record_dropped(&c, now_ms);
                        }
                        self.remember_ended(id);
                        moved += 1;
                        continue;
                    }
                    if let Some(c) = self.calls.get_mut(&id) {
                        c.history.push((c.owner, now_ms));
                        c.owner = to[next % to.len()];
                        c.epoch += 1;
                        next += 1;
                        moved += 1;
                    }
                }
                Response::Swept(moved)
            }
            Command::Audit(entry) => {
                self.audit.push_back(entry);
                while self.audit.len() > AUDIT_KEPT {
                    self.audit.pop_front();
                }
                Response::Done
            }
            Command::SetDraining { node, draining } => {
                if draining {
                    self.draining.insert(node);
                } else {
                    self.draining.remove(&node);
                }
                Response::Done
            }
            Command::RemoveBindings { aor, uri } => {
                let Some(list) = self.bindings.get_mut(&aor) else {
                    return Response::Swept(0);
                };
                let before = list.len();
                match &uri {
                    Some(u) => list.retain(|b| &b.uri != u),
                    None => list.clear(),
                }
                let removed = before - list.len();
                if list.is_empty() {
                    self.bindings.remove(&aor);
                }
                Response::Swept(removed)
            }
            Command::CallsOfOwnerEnded { owner } => {
                let gone: Vec<String> = self
                    .calls
                    .values()
                    .filter(|c| c.owner == owner)
                    .map(|c| c.id.clone())
                    .collect();
                for id in &gone {
                    if let Some(c) = self.calls.remove(id) {
                        // No clock in this command: the last time the record names.
                        let last = c
                            .history
                            .iter()
                            .map(|(_, at)| *at)
                            .fold(c.answered_at_ms, u64::max);
                        self.record_dropped(&c, last);
                    }
                }
                Response::Swept(gone.len())
            }
        }
    }

    /// Ends call `id` if it is `owner`'s at `epoch` (None: whoever's); false otherwise.
    fn end_call(&mut self, id: &str, owner: Option<u64>, epoch: u32) -> bool {
        let ours = self
            .calls
            .get(id)
            .is_some_and(|c| owner.is_none_or(|o| o == c.owner && epoch == c.epoch));
        if ours {
            self.calls.remove(id);
            self.remember_ended(id.to_string());
        }
        ours
    }

    /// The record of an answered call dropped with its node (nobody could take it
    /// over): it ended when it was dropped, cause 41 (temporary failure).
    fn record_dropped(&mut self, c: &CallRecord, end_ms: u64) {
        let mut nodes: Vec<u64> = c.history.iter().map(|(n, _)| *n).collect();
        nodes.push(c.owner);
        self.cdrs.record(
            Cdr {
                uniqueid: c.id.clone(),
                start_ms: 0,
                answer_ms: Some(c.answered_at_ms),
                end_ms: end_ms.max(c.answered_at_ms),
                src: c.caller.clone(),
                clid: String::new(),
                dst: c.callee.clone(),
                dcontext: String::new(),
                disposition: "ANSWERED".into(),
                hangup_cause: 41,
                nodes,
                seq: 0,
            },
            CdrKeep::DEFAULT,
        );
    }

    fn remember_ended(&mut self, id: String) {
        if self.ended_set.insert(id.clone()) {
            self.ended_calls.push_back(id);
        }
        while self.ended_calls.len() > ENDED_KEPT {
            if let Some(old) = self.ended_calls.pop_front() {
                self.ended_set.remove(&old);
            }
        }
    }

    /// RFC 3261 §10.3 steps 6–8 (the rules are in [`bindings::register`]).
    fn register(
        &mut self,
        aor: String,
        now_ms: u64,
        call_id: &str,
        cseq: u32,
        op: RegisterOp,
        max_contacts: u32,
    ) -> Response {
        // Edited in place: expired bindings are gone for good (they were invisible).
        let mut list = self.bindings.remove(&aor).unwrap_or_default();
        let response = bindings::register(&mut list, now_ms, call_id, cseq, op, max_contacts);
        if !list.is_empty() {
            self.bindings.insert(aor, list);
        }
        response
    }

    /// The nodes that may take over `from`'s calls: the voters other than `from` that
    /// are alive and not being drained (drained ones too when nobody else is left).
    pub fn call_takers(&self, from: u64, voters: &[u64], alive: impl Fn(u64) -> bool) -> Vec<u64> {
        let candidates: Vec<u64> = voters
            .iter()
            .copied()
            .filter(|v| *v != from && alive(*v))
            .collect();
        let undrained: Vec<u64> = candidates
            .iter()
            .copied()
            .filter(|v| !self.draining.contains(v))
            .collect();
        if undrained.is_empty() {
            candidates
        } else {
            undrained
        }
    }

    /// The AOR's bindings that are live at `now_ms` (expired ones are invisible at once).
    pub fn bindings_of(&self, aor: &str, now_ms: u64) -> Vec<Binding> {
        self.bindings
            .get(aor)
            .map(|l| l.iter().filter(|b| b.is_live(now_ms)).cloned().collect())
            .unwrap_or_default()
    }

    /// True when some binding has expired at `now_ms` and a sweep would remove it.
    pub fn has_expired_bindings(&self, now_ms: u64) -> bool {
        self.bindings.values().flatten().any(|b| !b.is_live(now_ms))
    }

    pub fn binding_count(&self) -> usize {
        self.bindings.values().map(Vec::len).sum()
    }

    /// The snapshot format: a magic and format version, then the state. A node never
    /// guesses at bytes written by another format: it refuses them by name.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let mut out = Vec::with_capacity(1024);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_FORMAT.to_be_bytes());
        bincode::serialize_into(&mut out, self)?;
        bincode::serialize_into(&mut out, &self.cdrs)?;
        bincode::serialize_into(&mut out, &self.voicemail)?;
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<State, StateError> {
        let body = bytes
            .strip_prefix(SNAPSHOT_MAGIC)
            .ok_or(StateError::Format("not a pbxd state snapshot".into()))?;
        if body.len() < 2 {
            return Err(StateError::Format("truncated snapshot".into()));
        }
        let format = u16::from_be_bytes([body[0], body[1]]);
        if !(5..=SNAPSHOT_FORMAT).contains(&format) {
            return Err(StateError::Format(format!(
                "snapshot format {format}, this pbxd reads formats 5 to {SNAPSHOT_FORMAT}"
            )));
        }
        let mut rest = &body[2..];
        let mut state: State = bincode::deserialize_from(&mut rest)?;
        // Format 5 had no call detail records.
        if format >= 6 {
            state.cdrs = bincode::deserialize_from(&mut rest)?;
            state.cdrs.reindex();
        }
        // Formats 5 and 6 had no mailboxes.
        if format >= 7 {
            state.voicemail = bincode::deserialize_from(&mut rest)?;
        }
        Ok(state)
    }
}

const SNAPSHOT_MAGIC: &[u8] = b"PBXS";
/// Bumped whenever [`State`]'s encoding changes.
/// 4: call records with epoch, history, activity and each leg's contact and media.
/// 6: call detail records after the state (format 5 is read as having none).
/// 7: mailboxes after the records (formats 5 and 6 are read as having none).
const SNAPSHOT_FORMAT: u16 = 7;

impl Command {
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        Ok(bincode::serialize(self)?)
    }

    pub fn decode(bytes: &[u8]) -> Result<Command, StateError> {
        Ok(bincode::deserialize(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialplan_validated_versioned_and_kept_in_history() {
        let mut st = State::default();
        let good = "[default]\nexten => 1,1,Answer()\n";
        let set = |source: &str, now_ms| Command::SetDialplan {
            source: source.into(),
            now_ms,
        };
        assert_eq!(st.apply(set(good, 1)), Response::DialplanVersion(1));
        let Response::InvalidDialplan(errs) = st.apply(set("[default]\nexten => 1,1,Nope()\n", 2))
        else {
            panic!("a bad dialplan must be refused");
        };
        assert!(
            errs[0].starts_with("line 2: unknown application"),
            "{errs:?}"
        );
        assert_eq!(
            st.dialplan.as_ref().unwrap().source,
            good,
            "the good one stays"
        );
        for i in 0..25 {
            st.apply(set(&format!("{good};{i}\n"), 3 + i));
        }
        assert_eq!(st.dialplan.as_ref().unwrap().version, 26);
        assert_eq!(st.dialplan_history.len(), DIALPLAN_HISTORY);
        assert_eq!(st.dialplan_history.last().unwrap().version, 25);
    }

    #[test]
    fn snapshots_carry_mailboxes_and_read_format_6_as_having_none() {
        let mut st = State::default();
        let saved = st.apply(Command::Voicemail {
            op: VoicemailOp::Save {
                mailbox: "1002".into(),
                blob: "ab".repeat(32),
                codec: voicemail::Codec::Pcmu,
                size: 8000,
                duration_ms: 1000,
                caller_id: "1001".into(),
                holders: vec![1, 2],
            },
            now_ms: 5,
        });
        assert_eq!(
            saved,
            Response::Voicemail(VoicemailOutcome::Saved { id: 1 })
        );
        let back = State::decode(&st.encode().unwrap()).unwrap();
        assert_eq!(back.voicemail, st.voicemail);
        assert_eq!(back.voicemail.counts("1002"), (1, 0));
        // Format 6: the state and the records, no mailboxes.
        let mut six = SNAPSHOT_MAGIC.to_vec();
        six.extend_from_slice(&6u16.to_be_bytes());
        bincode::serialize_into(&mut six, &st).unwrap();
        bincode::serialize_into(&mut six, &st.cdrs).unwrap();
        let old = State::decode(&six).unwrap();
        assert_eq!(old.voicemail, Voicemail::default());
        assert_eq!(old.users, st.users);
    }

    #[test]
    fn snapshots_carry_their_format() {
        let st = State::default();
        let bytes = st.encode().unwrap();
        assert_eq!(State::decode(&bytes).unwrap(), st);
        let mut other = bytes.clone();
        other[5] = 99;
        let e = State::decode(&other).unwrap_err().to_string();
        assert!(e.contains("format"), "{e}");
        assert!(State::decode(b"garbage").is_err());
    }

    fn binding(uri: &str, call_id: &str, cseq: u32, now: u64, expires: u32) -> ContactUpdate {
        ContactUpdate {
            binding: Binding {
                uri: uri.into(),
                uri_key: uri.into(),
                params: String::new(),
                q: None,
                expires_at_ms: now + expires as u64 * 1000,
                call_id: call_id.into(),
                cseq,
                instance: None,
                reg_id: None,
                path: vec![],
                source: "127.0.0.1:5060".into(),
                transport: Transport::Udp,
                node_id: 1,
                user_agent: None,
                registered_at_ms: now,
            },
            expires_secs: expires,
        }
    }

    fn reg(
        st: &mut State,
        now: u64,
        call_id: &str,
        cseq: u32,
        ups: Vec<ContactUpdate>,
    ) -> Response {
        st.apply(Command::Register {
            aor: "alice".into(),
            now_ms: now,
            call_id: call_id.into(),
            cseq,
            op: RegisterOp::Update(ups),
            max_contacts: 3,
        })
    }

    #[test]
    fn add_refresh_and_remove() {
        let mut st = State::default();
        let r = reg(
            &mut st,
            0,
            "c1",
            1,
            vec![binding("sip:a@1", "c1", 1, 0, 60)],
        );
        assert!(matches!(r, Response::Bindings(ref b) if b.len() == 1));
        let r = reg(
            &mut st,
            1000,
            "c2",
            1,
            vec![binding("sip:a@2", "c2", 1, 1000, 60)],
        );
        assert!(matches!(r, Response::Bindings(ref b) if b.len() == 2));
        // Refresh with higher CSeq updates in place.
        reg(
            &mut st,
            2000,
            "c1",
            2,
            vec![binding("sip:a@1", "c1", 2, 2000, 120)],
        );
        let b = st.bindings_of("alice", 2000);
        assert_eq!(b.len(), 2);
        assert!(b
            .iter()
            .any(|b| b.uri == "sip:a@1" && b.expires_at_ms == 122_000));
        // expires=0 removes.
        reg(
            &mut st,
            3000,
            "c1",
            3,
            vec![binding("sip:a@1", "c1", 3, 3000, 0)],
        );
        assert_eq!(st.bindings_of("alice", 3000).len(), 1);
    }

    #[test]
    fn stale_cseq_is_refused_and_changes_nothing() {
        let mut st = State::default();
        reg(
            &mut st,
            0,
            "c1",
            5,
            vec![binding("sip:a@1", "c1", 5, 0, 60)],
        );
        let before = st.clone();
        assert_eq!(
            reg(
                &mut st,
                10,
                "c1",
                5,
                vec![binding("sip:a@1", "c1", 5, 10, 60)]
            ),
            Response::OutOfOrder
        );
        assert_eq!(
            st.apply(Command::Register {
                aor: "alice".into(),
                now_ms: 10,
                call_id: "c1".into(),
                cseq: 4,
                op: RegisterOp::RemoveAll,
                max_contacts: 3
            }),
            Response::OutOfOrder
        );
        assert_eq!(st, before);
        // A different Call-ID may update whatever its CSeq.
        assert!(matches!(
            reg(
                &mut st,
                10,
                "c9",
                1,
                vec![binding("sip:a@1", "c9", 1, 10, 60)]
            ),
            Response::Bindings(_)
        ));
    }

    #[test]
    fn the_same_contact_twice_in_one_request_is_one_binding() {
        let mut st = State::default();
        let r = reg(
            &mut st,
            0,
            "c1",
            1,
            vec![
                binding("sip:a@1", "c1", 1, 0, 60),
                binding("sip:a@1", "c1", 1, 0, 120),
            ],
        );
        assert!(
            matches!(r, Response::Bindings(ref b) if b.len() == 1),
            "{r:?}"
        );
        assert_eq!(st.bindings_of("alice", 0)[0].expires_at_ms, 120_000);
    }

    #[test]
    fn expired_bindings_are_invisible_and_swept() {
        let mut st = State::default();
        reg(
            &mut st,
            0,
            "c1",
            1,
            vec![binding("sip:a@1", "c1", 1, 0, 10)],
        );
        assert_eq!(st.bindings_of("alice", 9_999).len(), 1);
        assert!(st.bindings_of("alice", 10_000).is_empty());
        assert_eq!(
            st.apply(Command::SweepExpired { now_ms: 10_000 }),
            Response::Swept(1)
        );
        assert!(st.bindings.is_empty());
    }

    #[test]
    fn contact_limit_evicts_oldest_but_refuses_a_flood() {
        let mut st = State::default();
        for i in 0..3u64 {
            let uri = format!("sip:a@{i}");
            reg(
                &mut st,
                i,
                &format!("c{i}"),
                1,
                vec![binding(&uri, &format!("c{i}"), 1, i, 60)],
            );
        }
        reg(
            &mut st,
            10,
            "c9",
            1,
            vec![binding("sip:a@9", "c9", 1, 10, 60)],
        );
        let uris: Vec<String> = st
            .bindings_of("alice", 10)
            .into_iter()
            .map(|b| b.uri)
            .collect();
        assert_eq!(uris.len(), 3);
        assert!(
            !uris.contains(&"sip:a@0".to_string()),
            "oldest evicted: {uris:?}"
        );
        let flood = (0..4)
            .map(|i| binding(&format!("sip:f@{i}"), "cf", 1, 20, 60))
            .collect();
        assert_eq!(reg(&mut st, 20, "cf", 1, flood), Response::TooManyContacts);
    }

    #[test]
    fn outbound_instance_replaces_its_flow() {
        let mut st = State::default();
        let mut a = binding("sip:a@1", "c1", 1, 0, 60);
        a.binding.instance = Some("<urn:uuid:1>".into());
        a.binding.reg_id = Some(1);
        reg(&mut st, 0, "c1", 1, vec![a]);
        let mut b = binding("sip:a@2", "c1", 2, 5, 60);
        b.binding.instance = Some("<urn:uuid:1>".into());
        b.binding.reg_id = Some(1);
        reg(&mut st, 5, "c1", 2, vec![b]);
        let now = st.bindings_of("alice", 5);
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].uri, "sip:a@2");
    }

    #[test]
    fn apply_is_deterministic_and_snapshots_round_trip() {
        let cmds = vec![
            Command::Initialize(ClusterSettings {
                domain: "pbx.test".into(),
                realm: "pbx.test".into(),
                nonce_secret: vec![1; 32],
            }),
            Command::SeedUsers(vec![User {
                name: "alice".into(),
                ha1_md5: "x".into(),
                ha1_sha256: "y".into(),
                realm: "pbx.test".into(),
                context: "default".into(),
                caller_id_name: None,
            }]),
            Command::Register {
                aor: "alice".into(),
                now_ms: 5,
                call_id: "c".into(),
                cseq: 1,
                op: RegisterOp::Update(vec![binding("sip:a@1", "c", 1, 5, 60)]),
                max_contacts: 3,
            },
        ];
        let (mut a, mut b) = (State::default(), State::default());
        for c in &cmds {
            let bytes = c.encode().unwrap();
            assert_eq!(
                a.apply(c.clone()),
                b.apply(Command::decode(&bytes).unwrap())
            );
        }
        assert_eq!(a, b);
        assert_eq!(State::decode(&a.encode().unwrap()).unwrap(), a);
    }

    fn finished(id: &str, owner: Option<u64>, epoch: u32, start_ms: u64) -> Command {
        Command::CallFinished {
            cdr: Cdr {
                uniqueid: id.into(),
                start_ms,
                answer_ms: Some(20),
                end_ms: 90_000,
                src: "1000".into(),
                clid: String::new(),
                dst: "1001".into(),
                dcontext: String::new(),
                disposition: "ANSWERED".into(),
                hangup_cause: 16,
                nodes: vec![owner.unwrap_or(0)],
                seq: 0,
            },
            owner,
            epoch,
            keep: CdrKeep::DEFAULT,
        }
    }

    #[test]
    fn a_call_is_one_record_whoever_ends_it() {
        let mut st = State::default();
        st.apply(Command::CallAnswered(call("a", 1)));
        st.apply(Command::CdrOpened(CdrStart {
            uniqueid: "a".into(),
            start_ms: 3,
            answer_ms: 5,
            src: "1000".into(),
            clid: "\"One\" <1000>".into(),
            dst: "1001".into(),
            dcontext: "office".into(),
        }));
        st.apply(Command::AdoptCalls {
            from: 1,
            to: vec![2],
            only: None,
            now_ms: 50,
        });
        // The old owner's end comes too late: ignored, no record from it.
        assert_eq!(st.apply(finished("a", Some(1), 0, 3)), Response::Stale);
        assert!(st.cdrs.records.is_empty());
        // The adopter's end (it never knew the start) is the call's one record.
        assert_eq!(st.apply(finished("a", Some(2), 1, 0)), Response::Done);
        assert!(st.calls.is_empty());
        let c = &st.cdrs.records[0];
        assert_eq!((c.start_ms, c.answer_ms, c.end_ms), (3, Some(5), 90_000));
        assert_eq!((c.dcontext.as_str(), c.seq), ("office", 1));
        // An unanswered call has no running record: its record goes in as it is.
        let mut busy = finished("b", None, 0, 7);
        if let Command::CallFinished { cdr, .. } = &mut busy {
            cdr.answer_ms = None;
            cdr.disposition = "BUSY".into();
        }
        assert_eq!(st.apply(busy), Response::Done);
        assert_eq!(st.cdrs.records.len(), 2);
        assert_eq!(
            st.apply(Command::CdrsShipped { through: 9 }),
            Response::Done
        );
        assert_eq!(st.cdrs.shipped_through, 2, "not past the last record");
    }

    #[test]
    fn calls_dropped_with_their_node_are_recorded() {
        let mut st = State::default();
        st.apply(Command::CallAnswered(call("a", 1)));
        st.apply(Command::AdoptCalls {
            from: 1,
            to: Vec::new(),
            only: None,
            now_ms: 60_000,
        });
        let c = &st.cdrs.records[0];
        assert_eq!((c.end_ms, c.hangup_cause), (60_000, 41));
        assert_eq!(c.billsec(), 59);
        st.apply(Command::CallAnswered(call("b", 3)));
        assert_eq!(
            st.apply(Command::CallsOfOwnerEnded { owner: 3 }),
            Response::Swept(1)
        );
        assert_eq!(st.cdrs.records.len(), 2);
    }

    #[test]
    fn snapshots_carry_call_records_and_read_format_5() {
        let mut st = State::default();
        st.apply(finished("a", None, 0, 1));
        let bytes = st.encode().unwrap();
        let mut back = State::decode(&bytes).unwrap();
        assert_eq!(back, st);
        // The index of ids comes back with the records: the same call is not recorded twice.
        back.apply(finished("a", None, 0, 1));
        assert_eq!(back.cdrs.records.len(), 1);
        // A format 5 snapshot: the same state without records.
        let mut v5 = SNAPSHOT_MAGIC.to_vec();
        v5.extend_from_slice(&5u16.to_be_bytes());
        bincode::serialize_into(&mut v5, &st).unwrap();
        let old = State::decode(&v5).unwrap();
        assert!(old.cdrs.records.is_empty());
        assert_eq!(old.calls, st.calls);
    }

    fn call(id: &str, owner: u64) -> CallRecord {
        CallRecord {
            id: id.into(),
            owner,
            epoch: 0,
            history: Vec::new(),
            caller: "1000".into(),
            callee: "1001".into(),
            answered_at_ms: 5,
            activity: Activity::Bridged,
            legs: Vec::new(),
        }
    }

    #[test]
    fn adoption_spreads_a_nodes_calls_once_and_fences_the_old_owner() {
        let mut st = State::default();
        for (id, owner) in [("a", 1), ("b", 1), ("c", 1), ("d", 2)] {
            assert_eq!(
                st.apply(Command::CallAnswered(call(id, owner))),
                Response::Done
            );
        }
        let adopt = Command::AdoptCalls {
            from: 1,
            to: vec![2, 3],
            only: None,
            now_ms: 77,
        };
        assert_eq!(st.apply(adopt.clone()), Response::Swept(3));
        let owners: Vec<(u64, u32)> = st.calls.values().map(|c| (c.owner, c.epoch)).collect();
        assert_eq!(
            owners,
            [(2, 1), (3, 1), (2, 1), (2, 0)],
            "a b c spread, d untouched"
        );
        assert_eq!(st.calls["a"].history, [(1, 77)]);
        // The same decision again (two proposers) moves nothing.
        assert_eq!(st.apply(adopt), Response::Swept(0));

        // The old owner's late record and end are stale: the call stays adopted.
        assert_eq!(
            st.apply(Command::CallAnswered(call("a", 1))),
            Response::Stale
        );
        let end_old = Command::CallEnded {
            id: "a".into(),
            owner: Some(1),
            epoch: 0,
        };
        assert_eq!(st.apply(end_old), Response::Stale);
        assert_eq!(st.calls["a"].owner, 2);
        // The adopter's record and end are not.
        let mut newer = call("a", 2);
        newer.epoch = 1;
        assert_eq!(st.apply(Command::CallAnswered(newer)), Response::Done);
        let end = Command::CallEnded {
            id: "a".into(),
            owner: Some(2),
            epoch: 1,
        };
        assert_eq!(st.apply(end), Response::Done);
        assert!(!st.calls.contains_key("a"));
        // Records that come after the end (the adopter's, or a node's that ran the call
        // before) do not bring it back.
        let mut late = call("a", 2);
        late.epoch = 1;
        assert_eq!(st.apply(Command::CallAnswered(late)), Response::Stale);
        assert_eq!(
            st.apply(Command::CallAnswered(call("a", 1))),
            Response::Stale
        );
        assert!(!st.calls.contains_key("a"));

        // Named calls only; nobody to take them: dropped.
        let only = Command::AdoptCalls {
            from: 2,
            to: vec![3],
            only: Some(vec!["d".into()]),
            now_ms: 80,
        };
        assert_eq!(st.apply(only), Response::Swept(1));
        assert_eq!((st.calls["d"].owner, st.calls["c"].owner), (3, 2));
        let none = Command::AdoptCalls {
            from: 2,
            to: vec![],
            only: None,
            now_ms: 81,
        };
        assert_eq!(st.apply(none), Response::Swept(1));
        assert!(!st.calls.contains_key("c"));
    }
}
