//! The endpoint: what happens to each message a node reads.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pbx_dialplan::{CallerId, DialTarget, Execution};
use pbx_registrar::{HandlerConfig, Inbound, Outcome, PendingRegister, RequestHandler};
use pbx_sip_core::{RequestDisposition, ServerTable, TableEvent, Timers, TransactionKey};
use pbx_sip_msg::{
    parse_datagram, parse_stream_message, reply_to_unparseable, response_target, CoreHeaders,
    HeaderName, Limits, MessageWriter, Method, ReplyHead, SipError, SipMessage,
};
use pbx_state::{Response, State, Transport};

use crate::admission::{self, Contacts, PlanCache, Refused};
use crate::outcomes::RegisterOutcomes;
use crate::overload::{Overload, OverloadConfig, ShedCounts, Verdict};
use crate::relayed::RelayedCalls;
use crate::{CallMessage, Dest, EndpointError, Event, Link, NewCall, Transmit};

/// What an endpoint needs to know about its node.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub node_id: u64,
    /// The node's SIP address: a contact registered from it would be a loop.
    pub local_addr: SocketAddr,
    pub limits: Limits,
    pub timers: Timers,
    /// Retry-After (seconds) on a 503 for a write that could not be committed or a call
    /// the node cannot take.
    pub retry_after: u32,
    /// Calls this node runs at most; more get 503.
    pub max_calls: usize,
    /// How long a relayed call is remembered without traffic (a long call with no
    /// re-INVITE or refresh keeps working for that long).
    pub relayed_call_idle: Duration,
    /// The request pipeline's configuration (registrar rules, digest, throttling).
    pub handler: HandlerConfig,
    /// What new work is shed under overload, and floods from one address.
    pub overload: OverloadConfig,
    /// How UDP phones are reached: at their Contact or where they registered from.
    pub nat: crate::NatPolicy,
    /// The node's TLS address (its Contact for phones on TLS), if it listens for TLS.
    pub tls_addr: Option<SocketAddr>,
    /// Message waiting NOTIFYs also to registered phones that do not subscribe (those
    /// registered on this node), as Asterisk's unsolicited MWI.
    pub unsolicited_mwi: bool,
    /// Randomness for the tags and Call-IDs of the NOTIFYs this endpoint sends.
    pub seed: u64,
}

impl EndpointConfig {
    pub const DEFAULT_RELAYED_CALL_IDLE: Duration = Duration::from_secs(12 * 3600);
}

/// A REGISTER whose command is being committed: hand it back to
/// [`Endpoint::commit_done`]. It carries the transaction and the response's head, so
/// the endpoint keeps no table of pending commits.
#[derive(Debug)]
pub struct CommitToken {
    key: TransactionKey,
    dest: Dest,
    pending: PendingRegister,
    /// When the commit was handed out (its delay feeds overload control).
    started: Instant,
}

impl CommitToken {
    /// The Call-ID of the request waiting for the commit.
    pub fn call_id(&self) -> &str {
        self.pending.call_id()
    }
}

/// The calls this node runs: where their messages go (`C`, the driver's handle on a
/// call), and how many count against the call limit.
#[derive(Debug)]
struct Calls<C> {
    routes: HashMap<String, C>,
    active: usize,
}

/// The SIP endpoint of a node; `C` is the driver's handle on a running call.
pub struct Endpoint<C> {
    config: EndpointConfig,
    handler: RequestHandler,
    table: Mutex<ServerTable<Dest>>,
    calls: Mutex<Calls<C>>,
    relayed: Mutex<RelayedCalls>,
    plan: Mutex<PlanCache>,
    /// Retransmissions made by [`Endpoint::handle_timeout`], for [`Endpoint::poll_transmit`].
    transmits: Mutex<VecDeque<Transmit>>,
    /// A final response to an INVITE started a retransmission timer (Timer G) that may
    /// be sooner than what the driver sleeps for.
    timers_moved: AtomicBool,
    overload: Overload,
    registers: RegisterOutcomes,
    /// Message-waiting subscriptions, and what each mailbox's counts were when the
    /// replicated state was last looked at (`None`: not looked at yet).
    mwi: Mutex<(
        crate::mwi::Subscriptions,
        Option<HashMap<String, crate::mwi::Counts>>,
    )>,
}

/// Locks `m`, taking over a lock a panicking holder poisoned: every critical section
/// here and in the node's drivers leaves its data consistent, so there is nothing to
/// refuse. The node's drivers use this one too.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<C: Clone> Endpoint<C> {
    pub fn new(config: EndpointConfig) -> Result<Self, EndpointError> {
        Ok(Endpoint {
            handler: RequestHandler::new(config.handler.clone())?,
            table: Mutex::new(ServerTable::new(config.timers)),
            calls: Mutex::new(Calls {
                routes: HashMap::new(),
                active: 0,
            }),
            relayed: Mutex::new(RelayedCalls::new(config.relayed_call_idle)),
            plan: Mutex::new(PlanCache::default()),
            transmits: Mutex::new(VecDeque::new()),
            timers_moved: AtomicBool::new(false),
            overload: Overload::new(config.overload),
            registers: RegisterOutcomes::default(),
            mwi: Mutex::new((
                crate::mwi::Subscriptions::new(
                    pbx_b2bua::Local {
                        addr: config.local_addr,
                        tls_addr: config.tls_addr,
                    },
                    config.timers,
                    config.handler.server_name.clone(),
                    config.seed,
                ),
                None,
            )),
            config,
        })
    }

    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }

    /// The driver read a datagram (`waiting`) or found its UDP socket empty: a socket
    /// that stays non-empty is a receive backlog (overload control).
    pub fn udp_queue(&self, now: Instant, waiting: bool) {
        self.overload.receive_queue(now, waiting);
    }

    /// What overload control shed so far.
    pub fn shed_counts(&self) -> ShedCounts {
        self.overload.counts()
    }

    /// How the REGISTERs taken so far were answered.
    pub fn register_outcomes(&self) -> &RegisterOutcomes {
        &self.registers
    }

    /// (sources banned now for failed authentication, bans started since start).
    pub fn bans(&self, now_ms: u64) -> (usize, u64) {
        self.handler.bans(now_ms)
    }

    /// Server transactions in the table (in flight or absorbing retransmissions).
    pub fn transactions(&self) -> usize {
        lock(&self.table).len()
    }

    /// REGISTER commits handed to the cluster and not finished yet.
    pub fn pending_commits(&self) -> usize {
        self.overload.pending_commits()
    }

    /// The name this node puts in Server headers.
    pub fn server_name(&self) -> &str {
        &self.handler.config().server_name
    }

    /// Handles one message: a whole datagram (`link` UDP) or one framed message of a
    /// stream. `now_ms` is the wall clock (bindings expire on it); `state` is called
    /// once, for requests no transaction or call takes.
    pub fn handle<S, F>(
        &self,
        now: Instant,
        now_ms: u64,
        source: SocketAddr,
        link: Link,
        data: &[u8],
        state: F,
    ) -> Option<Event<C>>
    where
        F: FnOnce() -> S,
        S: Deref<Target = State>,
    {
        if link == Link::Udp && data.iter().all(|b| b.is_ascii_whitespace()) {
            return None; // UDP keep-alive (CRLF), nothing to answer
        }
        if link == Link::Udp && crate::stun::is_stun(data) {
            // RFC 5626 §4.4.2 keep-alive: a STUN Binding request on the SIP port.
            return crate::stun::binding_response(data, source).map(|bytes| {
                Event::Transmit(Transmit {
                    dest: Dest::Udp(source),
                    bytes: bytes.into(),
                })
            });
        }
        let parsed = if link == Link::Udp {
            parse_datagram(data, &self.config.limits)
        } else {
            parse_stream_message(data, &self.config.limits)
        };
        let msg = match parsed {
            Ok(m) => m,
            Err(e) => return Some(self.answer_unparseable(&e, source, link)),
        };
        if let Link::Conn(..) = link {
            if let Some(node) = msg
                .header(&HeaderName::CallId)
                .and_then(|id| lock(&self.relayed).lookup(now, id))
            {
                return Some(Event::Relay {
                    node,
                    source,
                    bytes: data.to_vec(),
                });
            }
        }
        if !msg.is_request() {
            // Responses belong to a call's client transactions, found by Call-ID, or
            // answer a message-waiting NOTIFY.
            let core = CoreHeaders::extract(&msg).ok()?;
            let status = msg.status().unwrap_or(0);
            if core.cseq.method == Method::Notify
                && lock(&self.mwi).0.on_response(now, &core, status)
            {
                return None;
            }
            let call = self.call(&core.call_id)?;
            return Some(Event::ToCall(call, CallMessage::Response { msg, core }));
        }
        let core = match CoreHeaders::extract(&msg) {
            Ok(c) => c,
            Err(e) => {
                let status = e.status().unwrap_or(400);
                let bytes = reply_to_unparseable(
                    &msg.headers,
                    status,
                    e.reason(),
                    source,
                    UNPARSEABLE_SERVER,
                )?;
                return Some(Event::Transmit(Transmit {
                    dest: reply_destination(source, link, None),
                    bytes: Bytes::from(bytes),
                }));
            }
        };
        self.on_request(now, now_ms, msg, core, source, link, state)
    }

    #[allow(clippy::too_many_arguments)]
    fn on_request<S, F>(
        &self,
        now: Instant,
        now_ms: u64,
        msg: SipMessage,
        core: CoreHeaders,
        source: SocketAddr,
        link: Link,
        state: F,
    ) -> Option<Event<C>>
    where
        F: FnOnce() -> S,
        S: Deref<Target = State>,
    {
        let reliable = link != Link::Udp;
        let method = msg.method().cloned().unwrap_or(Method::Ack);
        let dest = match link {
            Link::Udp => Dest::Udp(response_target(&core.vias[0], source, false)),
            other => reply_destination(source, other, Some(&core.vias[0].transport)),
        };
        let key = TransactionKey::for_request(&method, msg.request_uri().unwrap_or(""), &core);
        match lock(&self.table).on_request(now, &key, &method) {
            RequestDisposition::New => {}
            RequestDisposition::Retransmission(Some(bytes)) => {
                return Some(Event::Transmit(Transmit { dest, bytes }))
            }
            RequestDisposition::Retransmission(None) | RequestDisposition::AckAbsorbed => {
                return None
            }
        }
        if method == Method::Subscribe && core.to.tag().is_some() {
            // A refresh (or end) of a subscription this node keeps.
            let state = state();
            let answer = lock(&self.mwi)
                .0
                .refresh(now, &msg, &core, source, |m| state.voicemail.counts(m));
            return match answer {
                Some(bytes) => self.respond_stateful(now, key, &method, reliable, dest, 200, bytes),
                None => {
                    // Not one of ours (expired, or kept by a node that died): the
                    // phone subscribes anew.
                    let head = ReplyHead::new(&core, source, self.server_name());
                    let mut w = MessageWriter::response(481);
                    head.write(&mut w, 481);
                    let bytes = Bytes::from(w.finish(b""));
                    self.respond_stateful(now, key, &method, reliable, dest, 481, bytes)
                }
            };
        }
        if let Some(call) = self.call(&core.call_id) {
            // A request of a call's dialogs (or a CANCEL of its INVITE).
            if method != Method::Ack {
                lock(&self.table).create(key.clone(), &method, reliable, dest);
            }
            return Some(Event::ToCall(
                call,
                CallMessage::Request {
                    msg,
                    core,
                    key,
                    source,
                },
            ));
        }
        // New work only from here on: retransmissions and the requests of running
        // calls were served above, whatever the load.
        let register = method == Method::Register;
        if method != Method::Ack {
            let starts_call = method == Method::Invite && core.to.tag().is_none();
            match self.overload.admit(now, source.ip(), register, starts_call) {
                Verdict::Admit => {}
                Verdict::Drop => {
                    if register {
                        self.registers.dropped();
                    }
                    return None;
                }
                Verdict::Shed => {
                    if register {
                        self.registers.answered(503);
                    }
                    return Some(Event::Transmit(Transmit {
                        dest,
                        bytes: self.overloaded(&core, source),
                    }));
                }
            }
        }
        let state = state();
        let outcome = self.handler.handle(
            Inbound {
                msg: &msg,
                core: &core,
                source,
                transport: dest.transport(),
            },
            &state,
            now_ms,
        );
        if register {
            match &outcome {
                Outcome::Drop => self.registers.dropped(),
                Outcome::Reply { status, .. } => self.registers.answered(*status),
                // Counted when the commit is done.
                Outcome::Commit { .. } | Outcome::Call { .. } | Outcome::Subscribe { .. } => {}
            }
        }
        match outcome {
            Outcome::Drop => None,
            Outcome::Subscribe { mailbox } => {
                let domain = state.settings.as_ref().map_or("", |s| s.domain.as_str());
                let account = format!("sip:{mailbox}@{domain}");
                let counts = state.voicemail.counts(&mailbox);
                let ok = lock(&self.mwi)
                    .0
                    .subscribe(now, &msg, &core, source, dest, mailbox, account, counts);
                self.respond_stateful(now, key, &method, reliable, dest, 200, ok)
            }
            Outcome::Call { caller } => {
                lock(&self.table).create(key.clone(), &method, reliable, dest);
                Some(self.admit(now, &state, msg, core, key, source, dest, caller))
            }
            Outcome::Reply {
                bytes,
                stateful: false,
                ..
            } => Some(Event::Transmit(Transmit {
                dest,
                bytes: Bytes::from(bytes),
            })),
            Outcome::Reply {
                status,
                bytes,
                stateful: true,
            } => {
                let out = {
                    let mut table = lock(&self.table);
                    table.create(key.clone(), &method, reliable, dest);
                    table.respond(now, &key, status, Bytes::from(bytes))
                };
                self.timers_moved.store(true, Ordering::Relaxed);
                out.ok()
                    .map(|bytes| Event::Transmit(Transmit { dest, bytes }))
            }
            Outcome::Commit { command, pending } => {
                // The transaction absorbs retransmissions while the command commits.
                lock(&self.table).create(key.clone(), &method, reliable, dest);
                self.overload.commit_started();
                Some(Event::Commit {
                    command,
                    token: CommitToken {
                        key,
                        dest,
                        pending,
                        started: now,
                    },
                })
            }
        }
    }

    /// Answers a request through a new server transaction (which absorbs its
    /// retransmissions); wakes the timer for what the answer queued (a NOTIFY).
    #[allow(clippy::too_many_arguments)]
    fn respond_stateful(
        &self,
        now: Instant,
        key: TransactionKey,
        method: &Method,
        reliable: bool,
        dest: Dest,
        status: u16,
        bytes: Bytes,
    ) -> Option<Event<C>> {
        let out = {
            let mut table = lock(&self.table);
            table.create(key.clone(), method, reliable, dest);
            table.respond(now, &key, status, bytes)
        };
        self.timers_moved.store(true, Ordering::Relaxed);
        out.ok()
            .map(|bytes| Event::Transmit(Transmit { dest, bytes }))
    }

    /// The replicated state changed: subscribers whose mailbox's counts changed get a
    /// NOTIFY, and (with unsolicited MWI) so do the phones registered on this node for a
    /// mailbox whose counts changed and that do not subscribe here. The first look only
    /// learns the counts.
    pub fn mailboxes_changed(&self, now: Instant, state: &State, now_ms: u64) {
        let mut mwi = lock(&self.mwi);
        let (subs, seen) = &mut *mwi;
        subs.counts_changed(now, |m| state.voicemail.counts(m));
        let counts: HashMap<String, crate::mwi::Counts> = state
            .voicemail
            .boxes
            .keys()
            .map(|m| (m.clone(), state.voicemail.counts(m)))
            .collect();
        let before = seen.replace(counts.clone());
        if let (Some(before), true) = (before, self.config.unsolicited_mwi) {
            for (mailbox, c) in &counts {
                if before.get(mailbox).copied().unwrap_or_default() == *c
                    || mailbox.contains('@')
                    || subs.has_subscriber(mailbox)
                {
                    continue;
                }
                self.unsolicited_mwi(subs, now, state, mailbox, *c, now_ms);
            }
        }
        self.timers_moved.store(true, Ordering::Relaxed);
    }

    /// A REGISTER of `aor` was committed through this node: a phone that does not
    /// subscribe learns its mailbox's state at once (as Asterisk sends MWI on
    /// registration) when the mailbox holds messages. What to send, after the 200. The
    /// state is read only then: every other REGISTER costs a map lookup.
    pub fn registered<S, F>(&self, now: Instant, aor: &str, now_ms: u64, state: F) -> Vec<Transmit>
    where
        F: FnOnce() -> S,
        S: Deref<Target = State>,
    {
        if !self.config.unsolicited_mwi {
            return Vec::new();
        }
        {
            let mwi = lock(&self.mwi);
            let counts = mwi.1.as_ref().and_then(|seen| seen.get(aor).copied());
            if counts.unwrap_or_default() == (0, 0) || mwi.0.has_subscriber(aor) {
                return Vec::new();
            }
        }
        // The state before the subscriptions, as everywhere else.
        let state = state();
        let counts = state.voicemail.counts(aor);
        let mut mwi = lock(&self.mwi);
        let subs = &mut mwi.0;
        self.unsolicited_mwi(subs, now, &state, aor, counts, now_ms);
        std::iter::from_fn(|| subs.poll_transmit()).collect()
    }

    /// An unsolicited NOTIFY of `counts` to each phone of `mailbox` registered on this
    /// node (the node holding a phone's registration tells it; no other does).
    fn unsolicited_mwi(
        &self,
        subs: &mut crate::mwi::Subscriptions,
        now: Instant,
        state: &State,
        mailbox: &str,
        counts: crate::mwi::Counts,
        now_ms: u64,
    ) {
        let mine: Vec<&str> = state
            .bindings
            .get(mailbox)
            .into_iter()
            .flatten()
            .filter(|b| b.node_id == self.config.node_id)
            .map(|b| b.uri.as_str())
            .collect();
        if mine.is_empty() {
            return;
        }
        let domain = state.settings.as_ref().map_or("", |s| s.domain.as_str());
        let account = format!("sip:{mailbox}@{domain}");
        let found = self.contacts(
            state,
            &[DialTarget::User(mailbox.to_string())],
            false,
            now_ms,
        );
        for contact in found
            .contacts
            .iter()
            .filter(|c| mine.contains(&c.uri.as_str()))
        {
            subs.unsolicited(now, contact, &account, counts);
        }
    }

    /// Message-waiting subscriptions kept here.
    pub fn subscriptions(&self) -> usize {
        lock(&self.mwi).0.len()
    }

    /// The 503 for new work shed under overload: stateless (a retransmission gets
    /// another), Retry-After, and a Warning saying why.
    fn overloaded(&self, core: &CoreHeaders, source: SocketAddr) -> Bytes {
        let head = ReplyHead::new(core, source, self.server_name());
        let mut w = MessageWriter::response(503);
        head.write(&mut w, 503);
        w.header("Retry-After", &self.config.retry_after.to_string());
        w.header("Warning", "399 pbxd \"overloaded: new work is shed\"");
        Bytes::from(w.finish(b""))
    }

    /// Answers what can be answered; [`Event::Unanswerable`] when nothing can be (no
    /// Via to reply to).
    fn answer_unparseable(&self, e: &SipError, source: SocketAddr, link: Link) -> Event<C> {
        let (
            Some(status),
            SipError::Malformed {
                partial, reason, ..
            },
        ) = (e.status(), e)
        else {
            return Event::Unanswerable;
        };
        let headers = partial
            .as_ref()
            .map(|p| p.headers.as_slice())
            .unwrap_or(&[]);
        match reply_to_unparseable(headers, status, reason, source, UNPARSEABLE_SERVER) {
            Some(b) => Event::Transmit(Transmit {
                dest: reply_destination(source, link, None),
                bytes: Bytes::from(b),
            }),
            None => Event::Unanswerable,
        }
    }

    /// Call admission for an authenticated INVITE whose server transaction is open.
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &self,
        now: Instant,
        state: &State,
        msg: SipMessage,
        core: CoreHeaders,
        key: TransactionKey,
        source: SocketAddr,
        dest: Dest,
        caller: String,
    ) -> Event<C> {
        let refused = |reason: Refused| {
            let transmit = self.refuse_with(now, &core, &key, source, &reason);
            Event::CallRefused { transmit, reason }
        };
        if self.active_calls() >= self.config.max_calls {
            return refused(Refused::CallLimit {
                limit: self.config.max_calls,
            });
        }
        // RFC 3891: the caller takes a party of another call; no dialplan runs.
        let routed = match msg.header(&HeaderName::Replaces) {
            Some(value) => admission::replacing(state, &caller, &msg, &core, value),
            None => match lock(&self.plan).get(state) {
                Some(plan) => admission::route(plan, state, &caller, &msg, &core),
                None => Err(Refused::NoDialplan),
            },
        };
        match routed {
            Ok(r) => Event::StartCall(Box::new(NewCall {
                msg,
                core,
                key,
                source,
                dest,
                caller,
                exten: r.exten,
                secure: r.secure,
                domain: r.domain,
                exec: r.exec,
                replaces: r.replaces,
            })),
            Err(reason) => refused(reason),
        }
    }

    /// Refuses an admitted INVITE the driver cannot start (no media ports): the
    /// response to send.
    pub fn refuse(&self, now: Instant, call: &NewCall, reason: &Refused) -> Option<Transmit> {
        self.refuse_with(now, &call.core, &call.key, call.source, reason)
    }

    fn refuse_with(
        &self,
        now: Instant,
        core: &CoreHeaders,
        key: &TransactionKey,
        source: SocketAddr,
        reason: &Refused,
    ) -> Option<Transmit> {
        let status = reason.status();
        let head = ReplyHead::new(core, source, self.server_name());
        let mut w = MessageWriter::response(status);
        head.write(&mut w, status);
        if status == 503 {
            w.header("Retry-After", &self.config.retry_after.to_string());
        }
        w.header_fmt("Warning", format_args!("399 pbxd \"{}\"", reason.warning()));
        self.respond(now, key, status, Bytes::from(w.finish(b"")))
    }

    /// The answer to a REGISTER whose command was committed (`Ok`, the state machine's
    /// response) or not (`Err`: 503 with Retry-After, never a 200 the cluster cannot
    /// keep), sent through its transaction.
    pub fn commit_done<E>(
        &self,
        now: Instant,
        now_ms: u64,
        token: CommitToken,
        result: Result<Response, E>,
    ) -> Option<Transmit> {
        let CommitToken {
            key,
            dest,
            pending,
            started,
        } = token;
        self.overload
            .commit_finished(now, now.saturating_duration_since(started));
        let (status, bytes) = match result {
            Ok(resp) => self.handler.finish_register(pending, resp, now_ms),
            Err(_) => self.handler.unavailable(pending, self.config.retry_after),
        };
        self.registers.answered(status);
        let bytes = lock(&self.table)
            .respond(now, &key, status, Bytes::from(bytes))
            .ok()?;
        Some(Transmit { dest, bytes })
    }

    /// A call answers its server transaction `key`: what to send, and where.
    pub fn respond(
        &self,
        now: Instant,
        key: &TransactionKey,
        status: u16,
        bytes: Bytes,
    ) -> Option<Transmit> {
        let out = {
            let mut table = lock(&self.table);
            let dest = table.dest(key)?;
            table
                .respond(now, key, status, bytes)
                .ok()
                .map(|bytes| Transmit { dest, bytes })
        };
        if status >= 200 {
            self.timers_moved.store(true, Ordering::Relaxed);
        }
        out
    }

    /// True (once) when a response started a transaction timer that may be sooner than
    /// the last [`Endpoint::poll_timeout`]: the driver's timer should look again.
    pub fn take_timers_moved(&self) -> bool {
        self.timers_moved.load(Ordering::Relaxed)
            && self.timers_moved.swap(false, Ordering::Relaxed)
    }

    /// When [`Endpoint::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let table = lock(&self.table).poll_timeout();
        let relayed = lock(&self.relayed).poll_timeout();
        let mwi = lock(&self.mwi).0.poll_timeout();
        [table, relayed, mwi].into_iter().flatten().min()
    }

    /// Fires the timers due at `now`: retransmissions wait in
    /// [`Endpoint::poll_transmit`]; transactions whose ACK never came (Timer H) and
    /// relayed calls idle for too long are forgotten.
    pub fn handle_timeout(&self, now: Instant) {
        let mut events = Vec::new();
        lock(&self.table).handle_timeout(now, &mut events);
        lock(&self.relayed).handle_timeout(now);
        lock(&self.mwi).0.handle_timeout(now);
        if events.is_empty() {
            return;
        }
        let mut transmits = lock(&self.transmits);
        for e in events {
            if let TableEvent::Retransmit(dest, bytes) = e {
                transmits.push_back(Transmit { dest, bytes });
            }
        }
    }

    /// A retransmission due after [`Endpoint::handle_timeout`].
    pub fn poll_transmit(&self) -> Option<Transmit> {
        lock(&self.transmits)
            .pop_front()
            .or_else(|| lock(&self.mwi).0.poll_transmit())
    }

    /// The call that owns this Call-ID, if any.
    pub fn call(&self, call_id: &str) -> Option<C> {
        lock(&self.calls).routes.get(call_id).cloned()
    }

    /// A call started for an admitted INVITE: its messages (by Call-ID) go to `call`
    /// and it counts against the call limit until [`Endpoint::call_ended`].
    pub fn start_call(&self, call_id: &str, call: C) {
        let mut calls = lock(&self.calls);
        calls.routes.insert(call_id.to_string(), call);
        calls.active += 1;
    }

    /// Messages with this Call-ID (a call's other legs) go to `call` too.
    pub fn claim_call_id(&self, call_id: &str, call: C) {
        lock(&self.calls).routes.insert(call_id.to_string(), call);
    }

    /// A started call ended: it no longer counts against the call limit (its Call-IDs
    /// stay routed until [`Endpoint::release_call_ids`]).
    pub fn call_ended(&self) {
        let mut calls = lock(&self.calls);
        calls.active = calls.active.saturating_sub(1);
    }

    /// A call is gone: its Call-IDs are no longer routed.
    pub fn release_call_ids<'a>(&self, call_ids: impl IntoIterator<Item = &'a String>) {
        let mut calls = lock(&self.calls);
        for id in call_ids {
            calls.routes.remove(id);
        }
    }

    /// Calls counting against the call limit.
    pub fn active_calls(&self) -> usize {
        lock(&self.calls).active
    }

    /// The dialplan for a transfer's target: `exten` in the context of `user` (the
    /// transferor), run for the transferee `caller` (its name filled in from the user
    /// table when the call does not know it).
    pub fn transfer_route(
        &self,
        state: &State,
        user: &str,
        exten: &str,
        caller: CallerId,
    ) -> Result<Execution, String> {
        let plan = lock(&self.plan)
            .get(state)
            .ok_or_else(|| "no dialplan yet".to_string())?;
        let caller = if caller.name.is_empty() {
            admission::caller_id(state, &caller.num, None)
        } else {
            caller
        };
        let context = admission::context_of(state, user);
        Execution::start(plan, context, exten, caller).map_err(|e| e.to_string())
    }

    /// The contacts a Dial of `targets` rings, from the registered bindings (`now_ms`:
    /// wall clock). A `sips:` call (`secure`) rings TLS contacts only.
    pub fn contacts(
        &self,
        state: &State,
        targets: &[DialTarget],
        secure: bool,
        now_ms: u64,
    ) -> Contacts {
        admission::contacts(
            self.config.node_id,
            self.config.local_addr,
            self.config.nat,
            state,
            targets,
            secure,
            now_ms,
        )
    }

    /// Another node (`from_node`) sends `message` to a phone connected here: the phone
    /// answers on its connection, and its messages of that call go back to that node.
    pub fn note_relayed(&self, now: Instant, from_node: u64, message: &[u8]) {
        if let Ok(msg) = parse_stream_message(message, &self.config.limits) {
            if let Some(call_id) = msg.header(&HeaderName::CallId) {
                lock(&self.relayed).note(now, call_id, from_node);
            }
        }
    }

    /// Relayed calls remembered now.
    pub fn relayed_calls(&self) -> usize {
        lock(&self.relayed).len()
    }

    /// The call a message that could not be sent belongs to, when it is a request of a
    /// call (RFC 3263 §4.3: like a 503, the call tries the next server at once).
    pub fn call_of_unsent(&self, bytes: &[u8]) -> Option<C> {
        let msg = parse_stream_message(bytes, &self.config.limits).ok()?;
        if !msg.is_request() {
            return None;
        }
        self.call(msg.header(&HeaderName::CallId)?)
    }
}

/// The Server header of answers to requests too broken to be handled.
const UNPARSEABLE_SERVER: &str = "pbxd";

/// Where the response to a request that came over `link` goes.
fn reply_destination(source: SocketAddr, link: Link, via_transport: Option<&str>) -> Dest {
    match link {
        Link::Conn(id, transport) => Dest::Conn(id, source, transport),
        Link::Peer(node) => Dest::Peer(
            node,
            source,
            match via_transport {
                Some(t) if t.eq_ignore_ascii_case("TLS") => Transport::Tls,
                _ => Transport::Tcp,
            },
        ),
        Link::Udp => Dest::Udp(source),
    }
}
