//! Message waiting (RFC 3842), sans-IO: the subscriptions phones keep to their
//! mailbox's `message-summary` on this node, and the NOTIFYs that light their lamps —
//! at once, on every refresh, and whenever the mailbox's counts change in the
//! replicated state (whichever node took the message). Phones that do not subscribe
//! can get the same NOTIFY unsolicited, out of any dialog, as Asterisk sends them.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pbx_b2bua::{Dialog, Local};
use pbx_sip_core::{ClientNonInvite, ResponseAction, TimerOutcome, Timers};
use pbx_sip_msg::{CoreHeaders, HeaderName, MessageWriter, Method, ReplyHead, SipMessage};

use crate::{Dest, Transmit};

/// Subscription lengths granted: the phone's ask, within these (RFC 3842 has no
/// default; an hour is what phones ask and Asterisk grants).
pub const MIN_EXPIRES: u32 = 60;
pub const MAX_EXPIRES: u32 = 3600;
const DEFAULT_EXPIRES: u32 = 3600;

/// New and old messages of a mailbox.
pub type Counts = (usize, usize);

/// The body of a NOTIFY: `application/simple-message-summary` (RFC 3842 §5.2).
pub fn summary(account: &str, (new, old): Counts) -> String {
    format!(
        "Messages-Waiting: {}\r\nMessage-Account: {account}\r\nVoice-Message: {new}/{old} (0/0)\r\n",
        if new > 0 { "yes" } else { "no" }
    )
}

struct Subscription {
    mailbox: String,
    /// `sip:1001@domain`, the Message-Account.
    account: String,
    dialog: Dialog<Dest>,
    expires_at: Instant,
    /// The counts the phone was last told (or is being told).
    told: Option<Counts>,
    /// A NOTIFY in flight (its CSeq); one at a time, in order (RFC 6665 §4.2.2).
    notifying: Option<(u32, ClientNonInvite)>,
    /// What changed while a NOTIFY was in flight (the counts, and whether it is the
    /// final one): sent once that one is answered.
    next: Option<(Counts, bool)>,
    /// The final NOTIFY (terminated) is out: forgotten once it is answered.
    ending: bool,
}

/// Every subscription this node keeps, by Call-ID.
pub struct Subscriptions {
    subs: HashMap<String, Subscription>,
    /// Unsolicited NOTIFYs in flight, by Call-ID (their answers are absorbed).
    unsolicited: HashMap<String, (Dest, ClientNonInvite)>,
    local: Local,
    timers: Timers,
    server_name: String,
    out: VecDeque<Transmit>,
    seed: u64,
    next: u64,
}

impl Subscriptions {
    pub fn new(local: Local, timers: Timers, server_name: String, seed: u64) -> Subscriptions {
        Subscriptions {
            subs: HashMap::new(),
            unsolicited: HashMap::new(),
            local,
            timers,
            server_name,
            out: VecDeque::new(),
            seed,
            next: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    fn token(&mut self) -> String {
        self.next += 1;
        format!("{:x}{:x}", self.seed, self.next)
    }

    fn expires(msg: &SipMessage) -> u32 {
        msg.header(&HeaderName::Expires)
            .and_then(|v| v.trim().parse::<u32>().ok())
            .map_or(DEFAULT_EXPIRES, |e| {
                if e == 0 {
                    0
                } else {
                    e.clamp(MIN_EXPIRES, MAX_EXPIRES)
                }
            })
    }

    /// A new subscription to `mailbox` (authenticated by the endpoint): the 200 to send
    /// back, and the first NOTIFY queued ([`Subscriptions::poll_transmit`]).
    #[allow(clippy::too_many_arguments)]
    pub fn subscribe(
        &mut self,
        now: Instant,
        msg: &SipMessage,
        core: &CoreHeaders,
        source: std::net::SocketAddr,
        dest: Dest,
        mailbox: String,
        account: String,
        counts: Counts,
    ) -> Bytes {
        let head = ReplyHead::new(core, source, &self.server_name);
        let expires = Self::expires(msg);
        let dialog = Dialog::uas(msg, core, &head, dest);
        let ok = self.ok(&head, &dialog, expires);
        let call_id = core.call_id.clone();
        if expires == 0 {
            // A fetch (RFC 6665 §4.4.3): one NOTIFY with the state, then nothing.
            let sub = self.new_sub(now, mailbox, account, dialog, 0);
            self.subs.insert(call_id.clone(), sub);
            self.notify(now, &call_id, counts, true);
            return ok;
        }
        let sub = self.new_sub(now, mailbox, account, dialog, expires);
        self.subs.insert(call_id.clone(), sub);
        self.notify(now, &call_id, counts, false);
        ok
    }

    fn new_sub(
        &self,
        now: Instant,
        mailbox: String,
        account: String,
        dialog: Dialog<Dest>,
        expires: u32,
    ) -> Subscription {
        Subscription {
            mailbox,
            account,
            dialog,
            expires_at: now + Duration::from_secs(u64::from(expires)),
            told: None,
            notifying: None,
            next: None,
            ending: false,
        }
    }

    fn ok(&self, head: &ReplyHead, dialog: &Dialog<Dest>, expires: u32) -> Bytes {
        let mut w = MessageWriter::response(200);
        head.write(&mut w, 200);
        w.header("Contact", &self.local.contact(dialog.dest.transport()));
        w.header("Expires", &expires.to_string());
        Bytes::from(w.finish(b""))
    }

    /// A SUBSCRIBE inside one of this node's subscriptions (a refresh, or Expires 0 to
    /// end it): its response, or `None` when it is not one of them.
    pub fn refresh(
        &mut self,
        now: Instant,
        msg: &SipMessage,
        core: &CoreHeaders,
        source: std::net::SocketAddr,
        counts_of: impl Fn(&str) -> Counts,
    ) -> Option<Bytes> {
        let sub = self.subs.get_mut(&core.call_id)?;
        if core.to.tag() != Some(sub.dialog.local_tag.as_str())
            || core.from.tag() != sub.dialog.remote_tag.as_deref()
        {
            return None;
        }
        let head = ReplyHead::new(core, source, &self.server_name);
        if core.cseq.seq <= sub.dialog.remote_cseq {
            // Out of order (§12.2.2): 500.
            let mut w = MessageWriter::response(500);
            head.write(&mut w, 500);
            return Some(Bytes::from(w.finish(b"")));
        }
        sub.dialog.remote_cseq = core.cseq.seq;
        let expires = Self::expires(msg);
        sub.expires_at = now + Duration::from_secs(u64::from(expires));
        let mailbox = sub.mailbox.clone();
        let dialog = sub.dialog.clone();
        let ok = self.ok(&head, &dialog, expires);
        // A refresh gets the state again (§4.2.1.2); an unsubscribe gets the last one.
        if let Some(s) = self.subs.get_mut(&core.call_id) {
            s.told = None;
        }
        self.notify(now, &core.call_id, counts_of(&mailbox), expires == 0);
        Some(ok)
    }

    /// The replicated state changed: a NOTIFY to every subscriber whose mailbox's
    /// counts are not what it was told.
    pub fn counts_changed(&mut self, now: Instant, counts_of: impl Fn(&str) -> Counts) {
        let changed: Vec<(String, Counts)> = self
            .subs
            .iter()
            .filter(|(_, s)| !s.ending)
            .filter_map(|(id, s)| {
                let c = counts_of(&s.mailbox);
                (s.told != Some(c)).then(|| (id.clone(), c))
            })
            .collect();
        for (id, c) in changed {
            self.notify(now, &id, c, false);
        }
    }

    /// Sends the NOTIFY of `counts` (the final one with `last`), or marks it due when
    /// one is in flight.
    fn notify(&mut self, now: Instant, call_id: &str, counts: Counts, last: bool) {
        let branch = format!("z9hG4bK{}", self.token());
        let local = self.local.clone();
        let timers = self.timers;
        let Some(sub) = self.subs.get_mut(call_id) else {
            return;
        };
        if sub.notifying.is_some() {
            let was_last = sub.next.is_some_and(|(_, l)| l);
            sub.next = Some((counts, last || was_last));
            return;
        }
        let remaining = sub.expires_at.saturating_duration_since(now).as_secs();
        let state = if last || remaining == 0 {
            "terminated;reason=timeout".to_string()
        } else {
            format!("active;expires={remaining}")
        };
        let body = summary(&sub.account, counts);
        let (cseq, bytes) = sub.dialog.request(
            &local,
            &Method::Notify,
            &branch,
            &[("Event", "message-summary"), ("Subscription-State", &state)],
            Some(("application/simple-message-summary", body.as_bytes())),
        );
        let reliable = sub.dialog.reliable();
        sub.notifying = Some((
            cseq,
            ClientNonInvite::new(now, bytes.clone(), reliable, timers),
        ));
        sub.told = Some(counts);
        sub.ending |= last || remaining == 0;
        self.out.push_back(Transmit {
            dest: sub.dialog.dest,
            bytes,
        });
    }

    /// A NOTIFY sent unsolicited (no subscription) to a registered phone (`contact`) of
    /// the mailbox whose address is `account` (its address of record as well).
    pub fn unsolicited(
        &mut self,
        now: Instant,
        contact: &pbx_b2bua::Contact<Dest>,
        account: &str,
        counts: Counts,
    ) {
        let (uri, route, dest) = (&contact.uri, &contact.route, contact.dest);
        let call_id = format!("mwi-{}", self.token());
        let branch = format!("z9hG4bK{}", self.token());
        let tag = self.token();
        let t = dest.transport();
        let mut w = MessageWriter::request(&Method::Notify, uri);
        w.header("Via", &self.local.via(t, &branch))
            .header("Max-Forwards", "70")
            .header_fmt("From", format_args!("<{account}>;tag={tag}"))
            .header_fmt("To", format_args!("<{account}>"))
            .header("Call-ID", &call_id)
            .header("CSeq", "1 NOTIFY");
        for r in route {
            w.header("Route", r);
        }
        w.header("Contact", &self.local.contact(t))
            .header("Event", "message-summary")
            .header("Subscription-State", "active")
            .header("Content-Type", "application/simple-message-summary");
        let bytes = Bytes::from(w.finish(summary(account, counts).as_bytes()));
        let reliable = t.is_connection_bound();
        let tx = ClientNonInvite::new(now, bytes.clone(), reliable, self.timers);
        self.unsolicited.insert(call_id, (dest, tx));
        self.out.push_back(Transmit { dest, bytes });
    }

    /// A response to a NOTIFY of ours: true when it was one (absorbed here).
    pub fn on_response(&mut self, now: Instant, core: &CoreHeaders, status: u16) -> bool {
        if core.cseq.method != Method::Notify {
            return false;
        }
        if let Some((_, tx)) = self.unsolicited.get_mut(&core.call_id) {
            if status >= 200 {
                tx.on_response(now, status);
                self.unsolicited.remove(&core.call_id);
            }
            return true;
        }
        let Some(sub) = self.subs.get_mut(&core.call_id) else {
            return false;
        };
        let Some((cseq, tx)) = sub.notifying.as_mut() else {
            return true; // a late retransmitted answer
        };
        if *cseq != core.cseq.seq {
            return true;
        }
        if matches!(tx.on_response(now, status), ResponseAction::Absorb) || status < 200 {
            return true;
        }
        sub.notifying = None;
        let next = sub.next.take();
        if !(200..300).contains(&status) || (sub.ending && next.is_none()) {
            // 481: the phone forgot it; any failure ends it (§4.2.2); so does the
            // answer to the final NOTIFY.
            self.subs.remove(&core.call_id);
            return true;
        }
        if let Some((counts, last)) = next {
            let id = core.call_id.clone();
            self.notify(now, &id, counts, last);
        }
        true
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let subs = self.subs.values().flat_map(|s| {
            let tx = s.notifying.as_ref().and_then(|(_, t)| t.poll_timeout());
            let exp = (!s.ending).then_some(s.expires_at);
            tx.into_iter().chain(exp)
        });
        let unsolicited = self
            .unsolicited
            .values()
            .filter_map(|(_, t)| t.poll_timeout());
        subs.chain(unsolicited).min()
    }

    /// Retransmissions, NOTIFYs that got no answer (the subscription ends), and
    /// subscriptions that ran out (a final NOTIFY).
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut dead = Vec::new();
        let mut expired = Vec::new();
        for (id, s) in self.subs.iter_mut() {
            if let Some((_, tx)) = s.notifying.as_mut() {
                match tx.handle_timeout(now) {
                    TimerOutcome::Retransmit(bytes) => self.out.push_back(Transmit {
                        dest: s.dialog.dest,
                        bytes,
                    }),
                    TimerOutcome::TimedOut => dead.push(id.clone()),
                    TimerOutcome::Terminated | TimerOutcome::Idle => {}
                }
            }
            if !s.ending && now >= s.expires_at {
                expired.push((id.clone(), s.told.unwrap_or_default()));
            }
        }
        for id in dead {
            self.subs.remove(&id);
        }
        for (id, counts) in expired {
            if self.subs.contains_key(&id) {
                self.notify(now, &id, counts, true);
            }
        }
        let mut done = Vec::new();
        for (id, (dest, tx)) in self.unsolicited.iter_mut() {
            match tx.handle_timeout(now) {
                TimerOutcome::Retransmit(bytes) => {
                    self.out.push_back(Transmit { dest: *dest, bytes })
                }
                TimerOutcome::TimedOut | TimerOutcome::Terminated => done.push(id.clone()),
                TimerOutcome::Idle => {}
            }
        }
        for id in done {
            self.unsolicited.remove(&id);
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// Whether a subscription to `mailbox` exists here (its phone needs no unsolicited
    /// NOTIFY).
    pub fn has_subscriber(&self, mailbox: &str) -> bool {
        self.subs
            .values()
            .any(|s| s.mailbox == mailbox && !s.ending)
    }
}
