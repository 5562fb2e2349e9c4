//! Blind transfer (RFC 3515 REFER, RFC 5589 §6): either party of a bridged call asks
//! the node to connect the other one elsewhere.
//!
//! As Asterisk does, the transferee is sent through the dialplan at the Refer-To
//! extension, in the transferor's context; it hears music while the target rings. The
//! transferor gets NOTIFYs with `message/sipfrag` progress: `100 Trying`, then how the
//! first Dial of the target ended. Answered (or the target is an application of the
//! node: an IVR, voicemail): `200 OK` and, 2 s after that NOTIFY is answered, a BYE
//! for a transferor that did not hang up itself. Not reached while the transferor is still
//! on the line: the final status, and the two parties are put back together (the
//! transferor's phone still has the call, on hold). A transferor that hung up already
//! leaves the transferee with the rest of the target's dialplan.
//!
//! A caller that transfers leaves its callee as the party the call runs for: the two
//! swap places in the call (dialogs, descriptions, relay sides), so that the call's
//! first leg is always the one the dialplan drives.
//!
//! Attended transfer (RFC 5589 §7): the transferor talks to the target in a second
//! call and sends REFER with `Refer-To: <target?Replaces=…>` naming its dialog with the
//! node in that call (RFC 3891). The call that got the REFER takes the target's dialog
//! over from the other call ([`Call::hand_over`], through the driver), moves the
//! target's media to its own relay with a re-INVITE, and the other call ends with a BYE
//! to the transferor. The transferee never sees a thing.

use std::time::Instant;

use bytes::Bytes;
use pbx_dialplan::{Action, CallerId, DialTarget, Execution, LogLevel};
use pbx_media_core::Side;
use pbx_sdp::{Direction, Sdp};
use pbx_sip_msg::{reason_phrase, HeaderName, Method, NameAddr, SipMessage};

use super::{
    side_index, side_of, BLeg, Call, Cancel, Contact, DialRequest, LegRef, LegState, MediaOp,
    Origin, Output, Phase,
};
use crate::dialog::{Destination, Dialog};

/// The dialog a `Replaces` names (RFC 3891 §6.1): its Call-ID and tags, `to_tag` being
/// the tag of the party that receives the Replaces (here: the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaces {
    pub call_id: String,
    pub to_tag: String,
    pub from_tag: String,
}

impl Replaces {
    /// `call-id;to-tag=…;from-tag=…` (other parameters, like `early-only`, ignored).
    pub fn parse(value: &str) -> Option<Replaces> {
        let mut parts = value.split(';');
        let call_id = parts.next()?.trim().to_string();
        let (mut to_tag, mut from_tag) = (None, None);
        for p in parts {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            match k.trim().to_ascii_lowercase().as_str() {
                "to-tag" => to_tag = Some(v.trim().to_string()),
                "from-tag" => from_tag = Some(v.trim().to_string()),
                _ => {}
            }
        }
        if call_id.is_empty() {
            return None;
        }
        Some(Replaces {
            call_id,
            to_tag: to_tag?,
            from_tag: from_tag?,
        })
    }

    /// The `Replaces` header of a Refer-To URI's headers (`?Replaces=…&…`, escaped):
    /// `None` without one, `Some(None)` for one that does not parse.
    fn of_uri_headers(headers: &str) -> Option<Option<Replaces>> {
        let value = headers.split('&').find_map(|h| {
            let (k, v) = h.split_once('=')?;
            k.trim().eq_ignore_ascii_case("replaces").then_some(v)
        })?;
        Some(Replaces::parse(&pbx_sip_msg::uri::unescape(value)))
    }
}

/// A party handed from one call to another in an attended transfer: its dialog with
/// the node and what it was last sent.
#[derive(Debug, Clone)]
pub struct HandOver<D> {
    dialog: Dialog<D>,
    sdp: String,
    version: u64,
    session: u64,
    targets: Vec<Option<std::net::SocketAddr>>,
    user: String,
    /// The party's domain when it is not ours.
    domain: Option<String>,
}

impl<D> HandOver<D> {
    /// The Call-ID of the handed-over party's dialog (its messages go to the new call).
    pub fn call_id(&self) -> &str {
        &self.dialog.call_id
    }
}

/// How long a NOTIFY subscription of a REFER says it lasts (RFC 3515 §2.4.4: the
/// transfer ends it well before).
const REFER_EXPIRES: u32 = 300;

/// A transferor told the transfer succeeded hangs up itself (RFC 5589 §6); one that
/// has not after this long gets a BYE.
pub(super) const TRANSFEROR_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A transfer asked for by REFER, from the route lookup to its final NOTIFY.
pub(super) struct Transfer {
    /// The REFER, until the route of its target is known ([`Call::on_route`]).
    origin: Option<Origin>,
    /// Who asked (before the parties swap places).
    by: LegRef,
    /// The transferor's leg once the transfer runs (its dialog in `legs`).
    transferor: Option<usize>,
    /// The extension of Refer-To.
    target: String,
    /// NOTIFYs are wanted (RFC 4488: `Refer-Sub: false` says not).
    notify: bool,
    /// The REFER's CSeq: the `id` of its subscription's events.
    refer_cseq: u32,
    /// The call as it was, to return to when the target is not reached.
    saved: Option<Saved>,
}

/// What the call was doing before the transfer (the bridge with the transferor).
struct Saved {
    exec: Execution,
    dial: Option<DialRequest>,
    hangup_at: Option<Instant>,
    media_targets: Vec<Option<std::net::SocketAddr>>,
    /// Per side, what was last sent (the target's offer must not stay as the
    /// transferor's).
    sdp_sent: [(String, u64); 2],
    sdp_body: String,
    exten: String,
}

impl<D: Destination> Call<D> {
    /// A REFER in a dialog of this call.
    pub(super) fn on_refer(&mut self, msg: &SipMessage, origin: Origin) {
        let leg = origin.leg;
        let Some(other) = self.peer_leg(leg) else {
            self.respond_to(
                &origin,
                403,
                &[(
                    "Warning",
                    "399 pbxd \"only a connected call can be transferred\"",
                )],
                None,
            );
            return;
        };
        if self.transfer.is_some() {
            self.respond_to(&origin, 491, &[], None);
            return;
        }
        if let Some(why) = self.cannot_transfer(leg) {
            let warning = format!("399 pbxd \"{why}\"");
            self.respond_to(&origin, 403, &[("Warning", &warning)], None);
            return;
        }
        let values: Vec<&str> = msg.header_values(&HeaderName::ReferTo).collect();
        let refer_to = match values.as_slice() {
            [one] => NameAddr::parse_single(one).ok(),
            _ => None,
        };
        let Some(refer_to) = refer_to.filter(|r| r.uri.is_sip()) else {
            self.respond_to(
                &origin,
                400,
                &[("Warning", "399 pbxd \"one SIP Refer-To is needed\"")],
                None,
            );
            return;
        };
        let notify = !msg
            .header(&HeaderName::ReferSub)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"));
        match refer_to
            .uri
            .headers
            .as_deref()
            .and_then(Replaces::of_uri_headers)
        {
            Some(Some(r)) if self.leg_of(&r.call_id).is_none() => {
                return self.attended(origin, r, notify);
            }
            Some(_) => {
                self.respond_to(
                    &origin,
                    400,
                    &[("Warning", "399 pbxd \"bad Replaces in Refer-To\"")],
                    None,
                );
                return;
            }
            None => {}
        }
        let Some(target) = refer_to.uri.user_unescaped().filter(|u| !u.is_empty()) else {
            self.respond_to(&origin, 404, &[], None);
            return;
        };
        let cseq = origin.cseq;
        self.begin_blind(leg, other, target, notify, Some(origin), cseq);
    }

    /// A blind transfer by `leg` of `other` to `target` (a REFER, answered once the
    /// route is known; or the transfer keys, `origin` None).
    fn begin_blind(
        &mut self,
        leg: LegRef,
        other: LegRef,
        target: String,
        notify: bool,
        origin: Option<Origin>,
        refer_cseq: u32,
    ) {
        let (user, caller) = match (leg, other) {
            (LegRef::B(i), _) => (self.legs[i].user.clone(), self.exec.caller().clone()),
            (LegRef::A, LegRef::B(w)) => (
                self.p.caller_user.clone(),
                CallerId {
                    num: self.legs[w].user.clone(),
                    name: String::new(),
                },
            ),
            (LegRef::A, LegRef::A) => return,
        };
        self.log(
            LogLevel::Notice,
            format!("{user} transfers the call to {target}"),
        );
        self.transfer = Some(Transfer {
            refer_cseq,
            origin,
            by: leg,
            transferor: None,
            target: target.clone(),
            notify,
            saved: None,
        });
        self.out.push_back(Output::Route {
            user,
            exten: target,
            caller,
        });
    }

    /// The driver's answer to [`Output::Route`]: the dialplan at the transfer's target in
    /// the transferor's context, or why there is none (the REFER gets 404).
    pub fn on_route(&mut self, now: Instant, route: Result<Execution, String>) {
        let Some(t) = self.transfer.as_mut().filter(|t| t.saved.is_none()) else {
            return;
        };
        let origin = t.origin.take();
        let (by, target, notify) = (t.by, t.target.clone(), t.notify);
        let Phase::Bridged(w) = self.phase else {
            // The call ended or changed while the route was looked up.
            self.transfer = None;
            if let Some(origin) = origin {
                self.respond_to(&origin, 481, &[], None);
            }
            return;
        };
        let exec = match route {
            Ok(exec) => exec,
            Err(why) => {
                self.transfer = None;
                self.log(
                    LogLevel::Notice,
                    format!("transfer to {target} refused: {why}"),
                );
                match origin {
                    Some(origin) => {
                        self.respond_to(&origin, 404, &[], None);
                    }
                    // Keyed: the transferor hears its music stop, the call goes on.
                    None => self.resume_after_keys(),
                }
                return;
            }
        };
        if let Some(origin) = origin {
            self.accept_refer(&origin, notify);
        }
        if by == LegRef::A {
            self.swap_parties(w);
        }
        let saved = Saved {
            exec: std::mem::replace(&mut self.exec, exec),
            dial: self.dial.take(),
            hangup_at: self.hangup_at.take(),
            media_targets: self.media_targets[1].clone(),
            sdp_sent: self.sdp_sent.clone(),
            sdp_body: self.sdp_body[1].clone(),
            exten: std::mem::replace(&mut self.a.exten, target),
        };
        if let Some(t) = self.transfer.as_mut() {
            t.transferor = Some(w);
            t.saved = Some(saved);
        }
        self.notify_transfer(now, 100, false);
        // The transferee hears music until the target answers (or an application of
        // the node takes it), whatever the holds were.
        if let Some(stream) = self.music_stream.take() {
            self.out
                .push_back(Output::Media(MediaOp::StopPlay { stream }));
        }
        self.start_music(Side::A, None);
        self.app_name = Some("Transfer");
        self.app_pt = self.transferee_codec();
        if let Some((stream, pt)) = self
            .a
            .offer
            .as_ref()
            .and_then(|o| Some((o.g711_stream()?, o.media.get(o.g711_stream()?)?)))
            .and_then(|(i, m)| Some((i, m.telephone_event()?)))
        {
            self.out.push_back(Output::Media(MediaOp::DetectDtmf {
                stream,
                side: Side::A,
                payload_type: pt,
            }));
        }
        self.phase = Phase::Running;
        self.run(now);
    }

    /// The transferor's leg once the final NOTIFY is answered (or timed out): a BYE,
    /// unless it hung up itself.
    pub(super) fn bye_transferor(&mut self, now: Instant, leg: LegRef) {
        if let LegRef::B(w) = leg {
            self.transferor_bye.push((now + TRANSFEROR_GRACE, w));
        }
    }

    /// The grace of [`TRANSFEROR_GRACE`] is over: a BYE for a transferor still there.
    pub(super) fn transferor_bye_due(&mut self, now: Instant) {
        let due: Vec<usize> = self
            .transferor_bye
            .iter()
            .filter(|(at, _)| now >= *at)
            .map(|(_, w)| *w)
            .collect();
        self.transferor_bye.retain(|(at, _)| now < *at);
        for w in due {
            if self.legs[w].state == LegState::Answered && self.phase != Phase::Bridged(w) {
                self.legs[w].state = LegState::Done(200);
                self.send_in_dialog(now, LegRef::B(w), Method::Bye, &[], None, None);
            }
        }
    }

    /// `202 Accepted` for a REFER; `Refer-Sub: false` echoed when no NOTIFYs are
    /// wanted (RFC 4488).
    fn accept_refer(&mut self, origin: &Origin, notify: bool) {
        let extra: &[(&str, &str)] = if notify {
            &[]
        } else {
            &[("Refer-Sub", "false")]
        };
        self.respond_to(origin, 202, extra, None);
    }

    /// Why `leg` may not transfer the call now, if it may not: only a party of the
    /// domain transfers (its context routes the target; a party from outside has none),
    /// only through the relay (the transferee keeps its media address), and not while a
    /// request on the call waits for its answer.
    fn cannot_transfer(&self, leg: LegRef) -> Option<&'static str> {
        let external = match leg {
            LegRef::A => self.a_domain.is_some(),
            LegRef::B(i) => self.legs[i].target.domain.is_some(),
        };
        if external {
            return Some("a party from another domain cannot transfer");
        }
        if self.p.media.is_none() {
            return Some("transfers need the media relay");
        }
        if self
            .pending
            .iter()
            .any(|p| !p.answered && (p.method == Method::Invite || p.method == Method::Update))
        {
            return Some("an offer is in progress; try again");
        }
        None
    }

    /// The payload type the transferee receives (from the description it was sent),
    /// for the node's own prompts to it.
    fn transferee_codec(&self) -> Option<u8> {
        Sdp::parse(self.sdp_body[0].as_bytes())
            .ok()
            .and_then(|s| s.g711_receive())
            .map(|(_, pt)| pt)
    }

    /// The caller transfers: its callee becomes the call's first party (leg A, relay
    /// side A), the caller's dialog takes the callee's place in `legs[w]`.
    fn swap_parties(&mut self, w: usize) {
        std::mem::swap(&mut self.a.dialog, &mut self.legs[w].dialog);
        self.a.key = None;
        self.a.head = None;
        self.legs[w].tx = None;
        self.sdp_sent.swap(0, 1);
        self.session.swap(0, 1);
        self.sdp_body.swap(0, 1);
        self.media_targets.swap(0, 1);
        self.holds.swap(0, 1);
        if let Some(m) = self.p.media.as_mut() {
            for s in &mut m.streams {
                *s = (s.1, s.0);
            }
        }
        self.out.push_back(Output::Media(MediaOp::SwapSides));
        // The caller's address was latched by the relay, not learnt: take it from its
        // offer, to point the relay back at it should the transfer fail.
        if self.media_targets[1].is_empty() {
            if let Some(offer) = &self.a.offer {
                self.media_targets[1] = offer.media.iter().map(|m| m.rtp_target()).collect();
            }
        }
        // The transferee's description: the source of what the transferor was sent.
        let theirs = self.sdp_sent[1].0.clone();
        self.a.offer = Sdp::parse(theirs.as_bytes()).ok();
        self.a.offer_raw = Bytes::from(theirs);
        let transferee = std::mem::take(&mut self.legs[w].user);
        self.legs[w].user = std::mem::replace(&mut self.p.caller_user, transferee);
        // Whether each party is from another domain goes with it.
        std::mem::swap(&mut self.a_domain, &mut self.legs[w].target.domain);
        // What refers to the two legs follows them.
        let flip = |l: LegRef| match l {
            LegRef::A => LegRef::B(w),
            LegRef::B(i) if i == w => LegRef::A,
            other => other,
        };
        for p in &mut self.pending {
            p.leg = flip(p.leg);
            if let Some(o) = p.origin.as_mut() {
                o.leg = flip(o.leg);
            }
        }
        for (_, l) in &mut self.reanchor_retry {
            *l = flip(*l);
        }
        if let Some(d) = self.dial.as_mut() {
            d.transfer_by.swap(0, 1);
        }
        self.keys = FeatureKeys::default();
    }

    /// The offer for the transfer target: the transferee's description, with only the
    /// codecs it uses now, so that the target's answer needs no new offer to it.
    pub(super) fn transfer_offer(&self) -> Option<Sdp> {
        let mut offer = self.a.offer.clone()?;
        let told = Sdp::parse(self.sdp_body[0].as_bytes()).ok()?;
        offer.keep_formats_of(&told);
        if !self.holds[0] {
            for m in offer.media.iter_mut().filter(|m| m.kind == "audio") {
                m.direction = Direction::SendRecv;
            }
        }
        Some(offer)
    }

    /// Whether a transfer is running (past its 202, not decided yet).
    pub(super) fn transferring(&self) -> bool {
        self.transfer.as_ref().is_some_and(|t| t.saved.is_some())
    }

    /// An action of the target's dialplan: one that keeps the transferee with the node
    /// (an application) completes the transfer, one that ends the call fails it.
    /// Returns true when the action is not to be carried out (the parties are back).
    pub(super) fn transfer_action(&mut self, now: Instant, action: &Action) -> bool {
        if !self.transferring() {
            return false;
        }
        match action {
            Action::Answer
            | Action::Playback { .. }
            | Action::Background { .. }
            | Action::MusicOnHold { .. }
            | Action::WaitExten { .. }
            | Action::Read { .. }
            | Action::Echo => {
                self.transfer_succeeded(now);
                false
            }
            Action::Busy => self.transfer_failed(now, 486),
            Action::Congestion => self.transfer_failed(now, 503),
            Action::Hangup { cause } => {
                self.transfer_failed(now, pbx_dialplan::cause_to_sip(*cause))
            }
            _ => false,
        }
    }

    /// The target answered, or the transferee is with one of the node's applications.
    pub(super) fn transfer_succeeded(&mut self, now: Instant) {
        let Some(t) = self.transfer.take() else {
            return;
        };
        self.log(
            LogLevel::Notice,
            format!("transfer to {} completed", t.target),
        );
        if let Some(stream) = self.music_stream.take() {
            self.out
                .push_back(Output::Media(MediaOp::StopPlay { stream }));
        }
        // The transferor's hold is over for the transferee.
        self.holds[1] = false;
        self.app_name = None;
        let Some(w) = t.transferor else {
            return;
        };
        if self.legs[w].state != LegState::Answered {
            return; // hung up already
        }
        if t.notify {
            self.transfer = Some(t);
            self.notify_transfer(now, 200, true);
            self.transfer = None;
            // The BYE follows the NOTIFY's answer (see `on_response`).
            if let Some(p) = self.pending.last_mut() {
                p.then_bye = true;
            }
        } else {
            self.bye_transferor(now, LegRef::B(w));
        }
    }

    /// The target was not reached (`status`, the SIP status for the NOTIFY): with the
    /// transferor still there, the parties are connected again and true is returned.
    pub(super) fn transfer_failed(&mut self, now: Instant, status: u16) -> bool {
        let Some((w, target)) = self
            .transfer
            .as_ref()
            .and_then(|t| Some((t.transferor?, t.target.clone())))
        else {
            return false;
        };
        if self.legs[w].state != LegState::Answered {
            // The transferor hung up: the target's dialplan goes on for the transferee.
            self.transfer = None;
            self.log(
                LogLevel::Notice,
                format!("transfer to {target} failed ({status}); the transferor left"),
            );
            return false;
        }
        self.log(
            LogLevel::Notice,
            format!("transfer to {target} failed ({status}): back to the transferor"),
        );
        self.notify_transfer(now, status, true);
        let Some(saved) = self.transfer.take().and_then(|t| t.saved) else {
            return false;
        };
        self.exec = saved.exec;
        self.dial = saved.dial;
        self.hangup_at = saved.hangup_at;
        self.a.exten = saved.exten;
        self.sdp_sent = saved.sdp_sent;
        self.sdp_body[1] = saved.sdp_body;
        self.app_name = None;
        self.phase = Phase::Bridged(w);
        // Unknown (latched) addresses are unset: the relay latches the transferor again.
        let n = self.p.media.as_ref().map_or(0, |m| m.streams.len());
        for stream in 0..n {
            let addr = saved.media_targets.get(stream).copied().flatten();
            self.out.push_back(Output::Media(MediaOp::Remote {
                stream,
                side: Side::B,
                addr,
            }));
        }
        self.media_targets[1] = saved.media_targets;
        self.out
            .push_back(Output::Media(MediaOp::Mode(pbx_media_core::Mode::Bridge)));
        // Music only if the transferor still holds.
        if let Some(stream) = self.music_stream.take() {
            self.out
                .push_back(Output::Media(MediaOp::StopPlay { stream }));
        }
        if let Some(to) = self.music_side() {
            self.start_music(to, None);
        }
        true
    }

    /// A NOTIFY of the transfer's progress to the transferor (`final_`: the last one).
    pub(super) fn notify_transfer(&mut self, now: Instant, status: u16, final_: bool) {
        let Some(t) = self.transfer.as_ref() else {
            return;
        };
        let Some(w) = t.transferor else {
            return;
        };
        if !t.notify || self.legs[w].state != LegState::Answered {
            return;
        }
        let event = format!("refer;id={}", t.refer_cseq);
        let state = if final_ {
            "terminated;reason=noresource".to_string()
        } else {
            format!("active;expires={REFER_EXPIRES}")
        };
        let frag = format!("SIP/2.0 {status} {}\r\n", reason_phrase(status));
        self.send_in_dialog(
            now,
            LegRef::B(w),
            Method::Notify,
            &[("Event", &event), ("Subscription-State", &state)],
            Some(("message/sipfrag;version=2.0", frag.as_bytes())),
            None,
        );
    }
}

impl<D: Destination> Call<D> {
    /// A REFER with Replaces: the replaced dialog's call must hand its other party
    /// over ([`Output::Replace`]).
    fn attended(&mut self, origin: Origin, replaces: Replaces, notify: bool) {
        self.log(
            LogLevel::Notice,
            format!(
                "attended transfer: replacing the dialog {}",
                replaces.call_id
            ),
        );
        self.transfer = Some(Transfer {
            refer_cseq: origin.cseq,
            by: origin.leg,
            origin: Some(origin),
            transferor: None,
            target: replaces.call_id.clone(),
            notify,
            saved: None,
        });
        self.out.push_back(Output::Replace(replaces));
    }

    /// Another call's attended transfer takes the party at the other end of the dialog
    /// `replaces` names: it leaves this call without a word (its dialog goes with it),
    /// and the transferor, on the named dialog, is hung up.
    pub fn hand_over(&mut self, now: Instant, replaces: &Replaces) -> Result<HandOver<D>, String> {
        let x = self
            .leg_of(&replaces.call_id)
            .ok_or("no such dialog in this call")?;
        let d = self.dialog(x);
        let remote = d.remote_tag.as_deref().unwrap_or("");
        // Some phones give the tags from their own point of view: either way round.
        let named = (d.local_tag == replaces.to_tag && remote == replaces.from_tag)
            || (d.local_tag == replaces.from_tag && remote == replaces.to_tag);
        if !named {
            return Err("the tags do not name a dialog of this call".into());
        }
        let z = self.peer_leg(x).ok_or("the call is not connected")?;
        if self.transfer.is_some() {
            return Err("the call is being transferred".into());
        }
        let k = side_index(side_of(z));
        let (user, domain) = match z {
            LegRef::A => (self.p.caller_user.clone(), self.a_domain.clone()),
            LegRef::B(w) => (
                self.legs[w].user.clone(),
                self.legs[w].target.domain.clone(),
            ),
        };
        let handed = HandOver {
            dialog: self.dialog(z).clone(),
            sdp: self.sdp_body[k].clone(),
            version: self.sdp_sent[k].1,
            session: self.session[k],
            targets: self.media_targets[k].clone(),
            user: user.clone(),
            domain,
        };
        match z {
            LegRef::A => self.a.dialog.retransmit = None,
            LegRef::B(w) => {
                self.legs[w].state = LegState::Done(200);
                self.legs[w].dialog.retransmit = None;
            }
        }
        self.pending.retain(|p| p.leg != z);
        if let Some(stream) = self.music_stream.take() {
            self.out
                .push_back(Output::Media(MediaOp::StopPlay { stream }));
        }
        self.log(
            LogLevel::Notice,
            format!("{user} handed over to another call (attended transfer)"),
        );
        self.hangup(now, 16, Some(z));
        Ok(handed)
    }

    /// The driver's answer to [`Output::Replace`]: the party taken over from the other
    /// call joins this one in the transferor's place, or why not (the REFER is refused).
    pub fn on_handover(&mut self, now: Instant, handed: Result<HandOver<D>, String>) {
        if self.phase == Phase::Replacing {
            return self.replaced(now, handed);
        }
        let origin = self.transfer.as_mut().and_then(|t| t.origin.take());
        let w = match (self.phase, &origin) {
            (Phase::Bridged(w), Some(_)) => w,
            _ => {
                // Ended meanwhile: a party handed over has nowhere to go.
                self.transfer = None;
                if let Some(origin) = origin {
                    self.respond_to(&origin, 481, &[], None);
                }
                if let Ok(h) = handed {
                    self.adopt(h, LegState::Done(200));
                    let k = self.legs.len() - 1;
                    self.send_in_dialog(now, LegRef::B(k), Method::Bye, &[], None, None);
                }
                return;
            }
        };
        let Some(origin) = origin else {
            return;
        };
        let h = match handed {
            Ok(h) => h,
            Err(why) => {
                self.transfer = None;
                self.log(
                    LogLevel::Notice,
                    format!("attended transfer refused: {why}"),
                );
                let warning = format!("399 pbxd \"{}\"", why.replace('"', ""));
                self.respond_to(&origin, 403, &[("Warning", &warning)], None);
                return;
            }
        };
        let by = origin.leg;
        let notify = self.transfer.as_ref().is_some_and(|t| t.notify);
        self.accept_refer(&origin, notify);
        if by == LegRef::A {
            self.swap_parties(w);
        }
        if let Some(t) = self.transfer.as_mut() {
            t.transferor = Some(w);
        }
        let user = h.user.clone();
        self.log(
            LogLevel::Notice,
            format!("attended transfer: {user} takes the transferor's place"),
        );
        let had = Sdp::parse(h.sdp.as_bytes()).ok();
        self.session[1] = h.session;
        self.sdp_sent[1] = (String::new(), h.version);
        self.sdp_body[1].clone_from(&h.sdp);
        self.media_targets[1].clone_from(&h.targets);
        let n = self.p.media.as_ref().map_or(0, |m| m.streams.len());
        for (stream, addr) in h.targets.iter().copied().enumerate().take(n) {
            self.out.push_back(Output::Media(MediaOp::Remote {
                stream,
                side: Side::B,
                addr,
            }));
        }
        self.adopt(h, LegState::Answered);
        let k = self.legs.len() - 1;
        self.phase = Phase::Bridged(k);
        self.a.exten = user;
        if let Some(stream) = self.music_stream.take() {
            self.out
                .push_back(Output::Media(MediaOp::StopPlay { stream }));
        }
        self.holds[1] = false;
        self.out
            .push_back(Output::Media(MediaOp::Mode(pbx_media_core::Mode::Bridge)));
        self.notify_transfer(now, 200, true);
        match self
            .pending
            .last_mut()
            .filter(|p| p.method == Method::Notify)
        {
            Some(p) => p.then_bye = true,
            None => self.bye_transferor(now, LegRef::B(w)),
        }
        self.transfer = None;
        // The target's media to this call's relay, in the transferee's codecs.
        match had {
            Some(mut had) => {
                if let Ok(told) = Sdp::parse(self.sdp_body[0].as_bytes()) {
                    had.keep_formats_of(&told);
                }
                self.reanchor(now, LegRef::B(k), &had);
            }
            None => self.log(
                LogLevel::Warning,
                "attended transfer: no description for the target; its media stays put".into(),
            ),
        }
        self.push_record();
    }

    /// A party taken over from another call as a new answered leg of this one.
    fn adopt(&mut self, h: HandOver<D>, state: LegState) {
        self.generation += 1;
        self.out
            .push_back(Output::ClaimCallId(h.dialog.call_id.clone()));
        let target = Contact {
            uri: h.dialog.remote_target.clone(),
            dest: h.dialog.dest.clone(),
            route: h.dialog.route_set.clone(),
            user: h.user.clone(),
            alternates: Vec::new(),
            domain: h.domain,
        };
        self.legs.push(BLeg {
            generation: self.generation,
            dialog: h.dialog,
            tx: None,
            invite: Bytes::new(),
            state,
            cancel: Cancel::No,
            give_up_at: None,
            user: h.user,
            target,
            failover_at: None,
        });
    }
}

/// How long `Transfer()` waits for the outcome of its REFER (the final NOTIFY).
const TRANSFER_APP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl<D: Destination> Call<D> {
    /// `Transfer()`: the caller's phone is sent elsewhere, with a 302 before the
    /// answer, with a REFER (RFC 3515) after it; `${TRANSFERSTATUS}` says how it went.
    pub(super) fn transfer_app(&mut self, now: Instant, target: DialTarget) {
        let uri = match &target {
            DialTarget::User(u) => format!("sip:{u}@{}", self.p.domain),
            DialTarget::Uri { user, host } => format!("sip:{user}@{host}"),
        };
        if !self.a.final_sent {
            self.log(LogLevel::Notice, format!("Transfer: redirected to {uri}"));
            self.respond_a(302, None, &[("Contact", &format!("<{uri}>"))]);
            self.exec.transfer_finished("SUCCESS", Some(302));
            return self.finish(now, 16, None);
        }
        if !self.a.answered {
            return self.exec.transfer_finished("FAILURE", None);
        }
        self.log(LogLevel::Notice, format!("Transfer: REFER to {uri}"));
        let refer_to = format!("<{uri}>");
        let referred_by = format!("<sip:{}@{}>", self.a.exten, self.p.domain);
        self.send_in_dialog(
            now,
            LegRef::A,
            Method::Refer,
            &[("Refer-To", &refer_to), ("Referred-By", &referred_by)],
            None,
            None,
        );
        self.phase = Phase::Referring {
            cseq: self.a.dialog.local_cseq,
            until: now + TRANSFER_APP_WAIT,
        };
    }

    /// The answer to `Transfer()`'s REFER: a refusal ends it, a 2xx waits for NOTIFYs.
    pub(super) fn on_refer_answer(&mut self, now: Instant, cseq: u32, status: u16) {
        if !matches!(self.phase, Phase::Referring { cseq: c, .. } if c == cseq) {
            return;
        }
        if (200..300).contains(&status) {
            return;
        }
        let verdict = if matches!(status, 405 | 420 | 501) {
            "UNSUPPORTED"
        } else {
            "FAILURE"
        };
        self.transfer_app_done(now, verdict, Some(status));
    }

    /// A NOTIFY in a dialog of this call: the progress of `Transfer()`'s REFER from
    /// the caller's phone; there is no other subscription (481).
    pub(super) fn on_notify(&mut self, now: Instant, msg: &SipMessage, origin: Origin) {
        let refer_event = msg
            .header(&HeaderName::Event)
            .is_some_and(|e| e.trim().to_ascii_lowercase().starts_with("refer"));
        if !(refer_event
            && origin.leg == LegRef::A
            && matches!(self.phase, Phase::Referring { .. }))
        {
            self.respond_to(&origin, 481, &[], None);
            return;
        }
        self.respond_to(&origin, 200, &[], None);
        let status = std::str::from_utf8(&msg.body)
            .ok()
            .and_then(|b| b.trim_start().strip_prefix("SIP/2.0 "))
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse::<u16>().ok());
        let terminated = msg
            .header(&HeaderName::SubscriptionState)
            .is_some_and(|s| s.trim().to_ascii_lowercase().starts_with("terminated"));
        match status {
            Some(s) if (200..300).contains(&s) => self.transfer_app_done(now, "SUCCESS", Some(s)),
            Some(s) if s >= 300 => self.transfer_app_done(now, "FAILURE", Some(s)),
            _ if terminated => self.transfer_app_done(now, "FAILURE", status),
            _ => {}
        }
    }

    /// `Transfer()` is over: the dialplan goes on with `${TRANSFERSTATUS}` set.
    pub(super) fn transfer_app_done(&mut self, now: Instant, verdict: &str, sip: Option<u16>) {
        self.log(
            LogLevel::Notice,
            format!("Transfer: {verdict} ({})", sip.unwrap_or(0)),
        );
        self.exec.transfer_finished(verdict, sip);
        self.phase = Phase::Running;
        self.run(now);
    }
}

impl<D: Destination> Call<D> {
    /// An INVITE with Replaces got the party of the replaced dialog: it is offered the
    /// caller's description (a re-INVITE in its dialog), and its answer answers the
    /// caller ([`Call::replaced_answer`]). No such dialog here: 481 (RFC 3891 §3).
    fn replaced(&mut self, now: Instant, handed: Result<HandOver<D>, String>) {
        let h = match handed {
            Ok(h) => h,
            Err(why) => {
                self.log(
                    LogLevel::Notice,
                    format!("INVITE with Replaces refused: {why}"),
                );
                let warning = format!("399 pbxd \"{}\"", why.replace('"', ""));
                self.respond_a(481, None, &[("Warning", &warning)]);
                return self.finish(now, 16, None);
            }
        };
        let user = h.user.clone();
        self.session[1] = h.session;
        self.sdp_sent[1] = (String::new(), h.version);
        self.sdp_body[1].clone_from(&h.sdp);
        self.media_targets[1].clone_from(&h.targets);
        self.adopt(h, LegState::Answered);
        let k = self.legs.len() - 1;
        self.phase = Phase::Bridged(k);
        self.log(
            LogLevel::Notice,
            format!("{user} is taken over by the INVITE with Replaces"),
        );
        let Some((ct, offer)) = self.a.offer.is_some().then(|| self.offer_for_b()).flatten() else {
            // `replacing` refused a caller without an offer; nothing to offer here.
            self.log(
                LogLevel::Notice,
                "INVITE with Replaces: no offer for the party: refused".into(),
            );
            return self.hangup(now, 88, None);
        };
        self.send_in_dialog(
            now,
            LegRef::B(k),
            Method::Invite,
            &[],
            Some((ct, &offer)),
            None,
        );
        if let Some(p) = self.pending.last_mut() {
            p.reanchor = true;
        }
    }

    /// The taken-over party's answer to the re-INVITE: the caller's INVITE is answered
    /// with it (anchored), or refused with its status and the party hung up.
    pub(super) fn replaced_answer(&mut self, now: Instant, leg: LegRef, status: u16, body: &[u8]) {
        let LegRef::B(k) = leg else {
            return;
        };
        if !(200..300).contains(&status) {
            self.log(
                LogLevel::Notice,
                format!("INVITE with Replaces: the re-INVITE was answered {status}"),
            );
            let cause = if status == 0 {
                pbx_dialplan::sip_to_cause(408)
            } else {
                pbx_dialplan::sip_to_cause(status)
            };
            return self.hangup(now, cause, None);
        }
        let answer = Sdp::parse(body).ok().map(|sdp| {
            self.learn_media(Side::B, &sdp);
            self.anchored_for(Side::A, &sdp, body)
        });
        self.out
            .push_back(Output::Media(MediaOp::Mode(pbx_media_core::Mode::Bridge)));
        self.answer_a(now, answer.as_deref());
        self.record(now, Some(k));
    }
}

/// How long the transfer keys wait for the next digit of the number (Asterisk's
/// `transferdigittimeout`).
const TRANSFER_DIGIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Keys pressed during a bridged call, for Dial's `t`/`T`.
#[derive(Debug, Default)]
pub(super) struct FeatureKeys {
    /// Per side, the last keys (to spot [`pbx_dialplan::BLIND_TRANSFER_KEYS`]).
    recent: [String; 2],
    /// A side keying the number of a blind transfer, the digits so far, and when the
    /// number is taken as complete.
    number: Option<(Side, String, Instant)>,
}

impl FeatureKeys {
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.number.as_ref().map(|(_, _, at)| *at)
    }
}

impl<D: Destination> Call<D> {
    /// A call bridged by a Dial with `t`/`T`: the keys of the sides it names are
    /// watched (RFC 4733, the payload type each side's description gave them).
    pub(super) fn watch_feature_keys(&mut self, answer: Option<&Sdp>) {
        let Some(by) = self.dial.as_ref().map(|d| d.transfer_by) else {
            return;
        };
        self.keys = FeatureKeys::default();
        for (side, sdp) in [(Side::A, self.a.offer.clone()), (Side::B, answer.cloned())] {
            if !by[side_index(side)] {
                continue;
            }
            let Some(sdp) = sdp else { continue };
            let Some(stream) = sdp.g711_stream() else {
                continue;
            };
            if let Some(pt) = sdp.media.get(stream).and_then(|m| m.telephone_event()) {
                self.out.push_back(Output::Media(MediaOp::DetectDtmf {
                    stream,
                    side,
                    payload_type: pt,
                }));
            }
        }
    }

    /// A key from a side of the bridged call: `#1` then a number (ended by `#` or 3 s
    /// of silence) transfers the other party blind, as Asterisk's Dial `t`/`T`. The
    /// keys still reach the other party (the relay does not swallow them).
    pub(super) fn feature_key(&mut self, now: Instant, side: Side, key: char) {
        let i = side_index(side);
        if !self.dial.as_ref().is_some_and(|d| d.transfer_by[i]) || self.transfer.is_some() {
            return;
        }
        match &mut self.keys.number {
            Some((s, number, until)) if *s == side => {
                if key == '#' {
                    return self.keyed_transfer();
                }
                number.push(key);
                *until = now + TRANSFER_DIGIT_TIMEOUT;
                return;
            }
            Some(_) => return,
            None => {}
        }
        let wanted = pbx_dialplan::BLIND_TRANSFER_KEYS;
        let recent = &mut self.keys.recent[i];
        recent.push(key);
        if recent.len() > wanted.len() {
            recent.remove(0);
        }
        if recent == wanted {
            recent.clear();
            self.keys.number = Some((side, String::new(), now + TRANSFER_DIGIT_TIMEOUT));
            self.log(
                LogLevel::Notice,
                format!("{side:?} keyed a transfer: waiting for the number"),
            );
            // The other party waits with music, as for a REFER.
            if let Some(stream) = self.music_stream.take() {
                self.out
                    .push_back(Output::Media(MediaOp::StopPlay { stream }));
            }
            self.start_music(side.other(), None);
        }
    }

    /// The number of a keyed transfer is complete (`#`, or its digit timeout).
    pub(super) fn keyed_transfer(&mut self) {
        let Some((side, number, _)) = self.keys.number.take() else {
            return;
        };
        let Phase::Bridged(w) = self.phase else {
            return;
        };
        if number.is_empty() {
            self.log(
                LogLevel::Notice,
                "transfer keys without a number: ignored".into(),
            );
            return self.resume_after_keys();
        }
        let (by, other) = match side {
            Side::A => (LegRef::A, LegRef::B(w)),
            Side::B => (LegRef::B(w), LegRef::A),
        };
        if let Some(why) = self.cannot_transfer(by) {
            self.log(LogLevel::Notice, format!("keyed transfer refused: {why}"));
            return self.resume_after_keys();
        }
        self.begin_blind(by, other, number, false, None, 0);
    }

    /// A keyed transfer that does not happen: the music it started stops (unless a
    /// hold still wants it).
    fn resume_after_keys(&mut self) {
        if let Some(stream) = self.music_stream.take() {
            self.out
                .push_back(Output::Media(MediaOp::StopPlay { stream }));
        }
        if let Some(to) = self.music_side() {
            self.start_music(to, None);
        }
    }
}
