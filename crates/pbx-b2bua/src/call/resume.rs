//! Resuming a call on another node (its owner died, was cut off, or is drained): the
//! dialogs and media from the replicated [`CallRecord`], and one re-INVITE per leg that
//! moves it here — a target refresh with this node's Contact, a CSeq above anything the
//! old owner can have sent, and the description the leg had, at this node's relay, with
//! the same `o=` session id and the version incremented (RFC 3264 §8).

use std::time::{Duration, Instant};

use bytes::Bytes;
use pbx_dialplan::{CallerId, Execution, LogLevel};
use pbx_media_core::{Mode, Side};
use pbx_sdp::{Direction, Sdp};
use pbx_sip_msg::NameAddr;
use pbx_state::{Activity, CallRecord, LegRecord, CSEQ_HEADROOM};

use super::{ALeg, BLeg, Call, CallParams, Contact, LegRef, LegState, MediaOp, Output, Phase};
use super::{Cancel, SDP};
use crate::dialog::{Destination, Dialog};
use crate::B2buaError;

/// Q.850 41 (temporary failure): a resumed call that cannot go on.
const CAUSE_NOT_RESUMED: u16 = 41;

/// §14.1: after a 491 to our re-INVITE, wait before trying again: 0–2 s when the
/// other side made the Call-ID (the caller's leg), 2.1–4 s when we did (callee's).
const GLARE_WAIT_A: Duration = Duration::from_millis(1000);
const GLARE_WAIT_B: Duration = Duration::from_millis(3000);
/// Re-INVITEs refused with 491 are tried this many times in all.
const GLARE_TRIES: u32 = 3;

/// How many relay streams a resumed call needs (one per m-line the caller's leg had).
pub fn streams_needed(record: &CallRecord) -> usize {
    record
        .legs
        .first()
        .and_then(|l| Sdp::parse(l.sdp_sent.as_bytes()).ok())
        .map_or(1, |s| s.media.len().max(1))
}

/// The tag of a recorded From/To value.
fn tag_of(value: &str) -> Option<String> {
    NameAddr::parse_single(value)
        .ok()?
        .tag()
        .map(str::to_string)
}

fn dialog_from<D>(leg: &LegRecord, dest: D) -> Result<Dialog<D>, B2buaError> {
    let local_tag = tag_of(&leg.local).ok_or_else(|| B2buaError::Record {
        call_id: leg.call_id.clone(),
        why: "the leg's local From/To has no tag".into(),
    })?;
    Ok(Dialog {
        call_id: leg.call_id.clone(),
        local: leg.local.clone(),
        local_tag,
        remote: leg.remote.clone(),
        remote_tag: tag_of(&leg.remote),
        remote_target: leg.remote_target.clone(),
        route_set: leg.route_set.clone(),
        // Above anything the old owner can have sent (it records again before it uses
        // half of the headroom).
        local_cseq: leg.local_cseq.saturating_add(CSEQ_HEADROOM),
        remote_cseq: leg.remote_cseq,
        dest,
        retransmit: None,
        last_ack: None,
    })
}

impl<D: Destination> Call<D> {
    /// A call adopted from the replicated record: `dests` says where each recorded leg
    /// is reached from here (caller first). The driver routes the call's id to it (the
    /// callee's Call-ID comes as [`Output::ClaimCallId`]) and opened
    /// [`streams_needed`] relay streams in `params.media`.
    ///
    /// A bridged call and an Echo are moved here by re-INVITEs. A call inside another
    /// application (Playback, and what the dialplan would have run after it) is ended
    /// with a BYE: where the application was is not replicated, and replaying a prompt
    /// from the start, or the dialplan from the top, is worse than a clean end.
    pub fn resume(
        now: Instant,
        params: CallParams,
        record: &CallRecord,
        dests: Vec<D>,
    ) -> Result<Call<D>, B2buaError> {
        let bad = |why: &str| B2buaError::Record {
            call_id: record.id.clone(),
            why: why.into(),
        };
        if record.legs.is_empty() || dests.len() != record.legs.len() {
            return Err(bad("one destination per recorded leg is needed"));
        }
        let mut dests = dests.into_iter();
        let a_rec = &record.legs[0];
        let a_dialog = dialog_from(a_rec, dests.next().ok_or_else(|| bad("no caller"))?)?;
        let bridged = record.activity == Activity::Bridged && record.legs.len() == 2;
        let b = match (bridged, record.legs.get(1), dests.next()) {
            (true, Some(rec), Some(dest)) => Some(dialog_from(rec, dest)?),
            (true, _, _) => return Err(bad("a bridged call needs two legs")),
            _ => None,
        };
        let sent = |i: usize| {
            record
                .legs
                .get(i)
                .and_then(|l| Sdp::parse(l.sdp_sent.as_bytes()).ok())
        };
        let (a_sdp, b_sdp) = (sent(0), sent(1));
        let session_of =
            |sdp: &Option<Sdp>| sdp.as_ref().and_then(|s| s.session_id.parse::<u64>().ok());
        let session_a = session_of(&a_sdp).unwrap_or(params.seed & 0xffff_ffff);
        let session = [session_a, session_of(&b_sdp).unwrap_or(session_a)];
        let caller = CallerId {
            num: record.caller.clone(),
            name: String::new(),
        };
        let a = ALeg {
            key: None,
            head: None,
            dialog: a_dialog,
            invite_cseq: 0,
            max_forwards: 70,
            exten: record.callee.clone(),
            offer_raw: Bytes::from(a_rec.sdp_sent.clone()),
            offer: a_sdp.clone(),
            final_sent: true,
            answered: true,
            ringing_sent: true,
        };
        let mut call = Call::with_caller(now, params, Execution::finished(caller), a);
        // After a transfer by the caller the first leg is the callee's dialog: the call
        // keeps its id, and the driver must route that leg's Call-ID here too.
        call.id.clone_from(&record.id);
        if a_rec.call_id != record.id {
            call.out
                .push_back(Output::ClaimCallId(a_rec.call_id.clone()));
        }
        call.generation = 1;
        call.session = session;
        call.media_targets = [
            a_rec.media_targets.clone(),
            record
                .legs
                .get(1)
                .map(|l| l.media_targets.clone())
                .unwrap_or_default(),
        ];
        call.app_name = match &record.activity {
            Activity::Application(app) if app == "Echo" => Some("Echo"),
            Activity::Application(_) => Some("Answer"),
            Activity::Bridged => None,
        };
        call.answered_at = Some(now);
        call.answered_at_ms = record.answered_at_ms;
        call.epoch = record.epoch;
        call.history = record.history.clone();
        // The caller's Call-ID is the call's: the driver routes it when it starts the call.
        if let Some(dialog) = b {
            call.out
                .push_back(Output::ClaimCallId(dialog.call_id.clone()));
            let target = Contact {
                uri: dialog.remote_target.clone(),
                dest: dialog.dest.clone(),
                route: dialog.route_set.clone(),
                user: record.callee.clone(),
                alternates: Vec::new(),
                domain: None,
            };
            call.legs.push(BLeg {
                generation: 1,
                dialog,
                tx: None,
                invite: Bytes::new(),
                state: LegState::Answered,
                cancel: Cancel::No,
                give_up_at: None,
                user: record.callee.clone(),
                target,
                failover_at: None,
            });
            call.phase = Phase::Bridged(0);
        } else if call.app_name == Some("Echo") {
            call.phase = Phase::Echo;
        } else {
            call.log(
                LogLevel::Notice,
                "resumed inside an application: ended (where it was is not replicated)".into(),
            );
            call.hangup(now, CAUSE_NOT_RESUMED, None);
            return Ok(call);
        }
        // Media goes where each side received it until its answer says otherwise.
        for (k, side) in [(0, Side::A), (1, Side::B)] {
            let n = call.p.media.as_ref().map_or(0, |m| m.streams.len());
            for (stream, addr) in call.media_targets[k]
                .clone()
                .into_iter()
                .enumerate()
                .take(n)
            {
                call.out
                    .push_back(Output::Media(MediaOp::Remote { stream, side, addr }));
            }
        }
        let mode = if call.phase == Phase::Echo {
            Mode::Echo
        } else {
            Mode::Bridge
        };
        call.out.push_back(Output::Media(MediaOp::Mode(mode)));
        // A call on hold stays on hold, the music playing again from here: holds are
        // answered by the node, so `recvonly`/`inactive` sent to a side means it holds.
        if bridged {
            let holding = |sent: &Option<Sdp>| {
                sent.as_ref().is_some_and(|s| {
                    s.media
                        .iter()
                        .find(|m| m.kind == "audio" && m.port != 0)
                        .is_some_and(|m| {
                            matches!(m.direction, Direction::RecvOnly | Direction::Inactive)
                        })
                })
            };
            call.holds = [holding(&a_sdp), holding(&b_sdp)];
            if let Some(to) = call.music_side() {
                // What was sent to the holder is the held party's description.
                let holder = if to == Side::A { &b_sdp } else { &a_sdp };
                call.start_music(to, holder.clone());
            }
        }
        let legs = if bridged {
            vec![(LegRef::A, a_sdp), (LegRef::B(0), b_sdp)]
        } else {
            vec![(LegRef::A, a_sdp)]
        };
        for (leg, sdp) in legs {
            let Some(sdp) = sdp else {
                call.log(
                    LogLevel::Warning,
                    "no description recorded for a leg: the call cannot be moved".into(),
                );
                call.hangup(now, CAUSE_NOT_RESUMED, None);
                return Ok(call);
            };
            call.reanchor(now, leg, &sdp);
        }
        call.log(
            LogLevel::Notice,
            format!(
                "resumed (adoption {}, from node {})",
                record.epoch,
                record.history.last().map_or(0, |h| h.0)
            ),
        );
        // Recorded at once: were this node to die too, the next one starts from here.
        call.push_record();
        Ok(call)
    }

    /// Sends `leg` a re-INVITE with the description it had, at this node's relay.
    pub(super) fn reanchor(&mut self, now: Instant, leg: LegRef, had: &Sdp) {
        let side = super::side_of(leg);
        let i = if side == Side::A { 0 } else { 1 };
        let version = had.session_version + 1;
        let body = match self.media_ports(side) {
            Some((ip, ports)) => had.anchored(ip, &ports, self.session[i], version),
            // No relay: the phones talk directly; only the signalling moves.
            None => self.sdp_body_or(i, had),
        };
        self.sdp_sent[i] = (String::new(), version);
        self.sdp_body[i].clone_from(&body);
        self.send_in_dialog(
            now,
            leg,
            pbx_sip_msg::Method::Invite,
            &[],
            Some((SDP, body.as_bytes())),
            None,
        );
        if let Some(p) = self.pending.last_mut() {
            p.reanchor = true;
        }
    }

    fn sdp_body_or(&self, i: usize, had: &Sdp) -> String {
        if self.sdp_body[i].is_empty() {
            let ports: Vec<u16> = had.media.iter().map(|m| m.port).collect();
            let ip = had
                .connection
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            had.anchored(ip, &ports, self.session[i], had.session_version)
        } else {
            self.sdp_body[i].clone()
        }
    }

    /// The answer to a moving re-INVITE: 2xx tells the relay where the leg's phone
    /// is; 491 (glare) is tried again later; anything else ends the call.
    pub(super) fn on_reanchor_answer(
        &mut self,
        now: Instant,
        leg: LegRef,
        status: u16,
        body: &[u8],
    ) {
        if !self.a.final_sent {
            // The re-INVITE of an INVITE with Replaces: its answer answers the caller.
            return self.replaced_answer(now, leg, status, body);
        }
        if (200..300).contains(&status) {
            if let Ok(sdp) = Sdp::parse(body) {
                self.learn_media(super::side_of(leg), &sdp);
            }
            let who = if leg == LegRef::A { "caller" } else { "callee" };
            self.log(LogLevel::Verbose, format!("{who} moved to this node"));
            return;
        }
        if status == 491 && self.glare_tries < GLARE_TRIES {
            self.glare_tries += 1;
            let wait = if leg == LegRef::A {
                GLARE_WAIT_A
            } else {
                GLARE_WAIT_B
            };
            self.reanchor_retry.push((now + wait, leg));
            return;
        }
        self.log(
            LogLevel::Notice,
            format!("re-INVITE to move the call answered {status}: call ended"),
        );
        let cause = if status == 0 {
            CAUSE_NOT_RESUMED
        } else {
            pbx_dialplan::sip_to_cause(status)
        };
        self.hangup(now, cause, None);
    }

    /// Re-INVITEs refused by glare, due again.
    pub(super) fn retry_reanchor(&mut self, now: Instant) {
        let due: Vec<LegRef> = self
            .reanchor_retry
            .iter()
            .filter(|(at, _)| now >= *at)
            .map(|(_, leg)| *leg)
            .collect();
        self.reanchor_retry.retain(|(at, _)| now < *at);
        for leg in due {
            if self.phase == Phase::Ended {
                return;
            }
            let i = if leg == LegRef::A { 0 } else { 1 };
            match Sdp::parse(self.sdp_body[i].as_bytes()) {
                Ok(had) => self.reanchor(now, leg, &had),
                Err(_) => self.hangup(now, CAUSE_NOT_RESUMED, None),
            }
        }
    }
}
