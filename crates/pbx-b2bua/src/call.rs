//! The call state machine.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use bytes::Bytes;
use pbx_dialplan::{
    cause_to_sip, Action, DialRequest, DialStatus, DialTarget, Disposition, Execution, LogLevel,
};
use pbx_media_core::{Mode, Side};
use pbx_sdp::{Direction, Sdp};
use pbx_sip_core::{
    ClientInvite, ClientNonInvite, ResponseAction, TimerOutcome, Timers, TransactionKey,
};
use pbx_sip_msg::{CoreHeaders, HeaderName, MessageWriter, Method, ReplyHead, SipMessage, ALLOW};
use pbx_state::{Activity, CallRecord, LegRecord, CSEQ_HEADROOM};

use crate::dialog::{Destination, Dialog, Local, Retransmit2xx, RetransmitDue};

mod resume;
mod transfer;

pub use resume::streams_needed;
pub use transfer::{HandOver, Replaces};

const SDP: &str = "application/sdp";

/// What a call needs to know about its node and its caller.
#[derive(Debug, Clone)]
pub struct CallParams {
    pub node_id: u64,
    /// The node's SIP address (Via, Contact).
    pub local: SocketAddr,
    /// Where the node serves SIP over TLS (Via and Contact on TLS legs), if it does.
    pub tls_local: Option<SocketAddr>,
    pub domain: String,
    pub server_name: String,
    pub timers: Timers,
    /// Seeds the tags, branches and Call-IDs this call makes up.
    pub seed: u64,
    /// Relay ports opened for this call, one pair per m-line of the caller's offer;
    /// `None` passes SDP through untouched (no relay configured).
    pub media: Option<MediaPorts>,
    /// The authenticated caller (user name).
    pub caller_user: String,
    /// Wall clock at `now` of [`Call::new`], for the replicated record.
    pub now_ms: u64,
    /// The time zone of the dialplan's time conditions that name none (IANA name).
    pub timezone: String,
}

/// The relay's address and, per media stream, the port for the caller's side (A) and
/// the callee's side (B).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPorts {
    pub ip: IpAddr,
    pub streams: Vec<(u16, u16)>,
}

/// One contact a Dial rings.
#[derive(Debug, Clone)]
pub struct Contact<D> {
    /// Request-URI (the registered Contact URI).
    pub uri: String,
    pub dest: D,
    /// Route headers (the binding's Path).
    pub route: Vec<String>,
    /// The user this contact belongs to.
    pub user: String,
    /// Where to send the same request next when `dest` does not answer in time, answers
    /// 503 or fails (RFC 3263 §4.3: the other targets of a resolved domain, in order).
    pub alternates: Vec<D>,
    /// The To host when it is not our domain (a target in another domain).
    pub domain: Option<String>,
}

/// With alternates to try, a target that sends nothing at all (not even 100 Trying)
/// within this time is given up for the next one, rather than after Timer B (32 s).
pub const FAILOVER_SILENCE: std::time::Duration = std::time::Duration::from_secs(4);

/// What the relay should do.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaOp {
    /// Where a side of a stream receives media (from its SDP); `None`: nowhere.
    Remote {
        stream: usize,
        side: Side,
        addr: Option<SocketAddr>,
    },
    /// Bridge the two sides, or echo what the caller sends.
    Mode(Mode),
    /// Play prompts to the caller on the first stream, then report
    /// [`MediaNotice::PlaybackDone`].
    Play {
        stream: usize,
        prompts: Vec<String>,
        payload_type: u8,
    },
    /// Stop the prompt or music playing on a stream (a key interrupted it, a held
    /// party was taken off hold).
    StopPlay { stream: usize },
    /// Music on hold of `class` to `side` of a stream, over and over, until
    /// [`MediaOp::StopPlay`]; what the other side sends is not forwarded meanwhile.
    Music {
        stream: usize,
        side: Side,
        class: String,
        payload_type: u8,
    },
    /// Report the keys the caller sends as RFC 4733 telephone-events with this payload
    /// type on a stream ([`MediaNotice::Digit`]).
    DetectDtmf {
        stream: usize,
        side: Side,
        payload_type: u8,
    },
    /// Every stream's sides trade places, sockets and all (the caller transferred the
    /// call: its callee is side A from now on).
    SwapSides,
    /// Play this audio (a voicemail message, in `payload_type`) to the caller on a
    /// stream, then report [`MediaNotice::PlaybackDone`] as for prompts.
    PlayAudio {
        stream: usize,
        audio: std::sync::Arc<[u8]>,
        payload_type: u8,
    },
    /// Record what `side` of a stream sends in `payload_type`, up to `max_bytes`
    /// ([`MediaNotice::RecordingFull`] then); [`crate::VmRequest::Store`] takes it.
    Record {
        stream: usize,
        side: Side,
        payload_type: u8,
        max_bytes: usize,
    },
}

/// What the relay reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaNotice {
    /// No packet for the configured time.
    NoMedia,
    /// The latest [`MediaOp::Play`] finished (the driver drops the report of a prompt
    /// a later Play, Music or StopPlay already replaced).
    PlaybackDone,
    /// A key pressed on a side (RFC 4733).
    Digit(Side, char),
    /// The recording of [`MediaOp::Record`] is as long as it may be.
    RecordingFull,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output<D> {
    /// Answer a server transaction of the driver's table (which retransmits non-2xx
    /// finals and absorbs retransmitted requests).
    Respond {
        key: TransactionKey,
        status: u16,
        bytes: Bytes,
    },
    /// Send a request, an ACK or a retransmission.
    Send {
        dest: D,
        bytes: Bytes,
    },
    /// Find the contacts of these targets and call [`Call::on_resolved`].
    Resolve(Vec<DialTarget>),
    /// Start the dialplan at `exten` in the context of `user` (a transfer's target,
    /// for the transferee `caller`) and call [`Call::on_route`].
    Route {
        user: String,
        exten: String,
        caller: pbx_dialplan::CallerId,
    },
    /// Ask the call that has this dialog to hand its other party over
    /// ([`Call::hand_over`]) and give the result to [`Call::on_handover`].
    Replace(Replaces),
    /// Messages with this Call-ID belong to this call from now on.
    ClaimCallId(String),
    Media(MediaOp),
    Log {
        level: LogLevel,
        message: String,
    },
    /// The call was answered: replicate its record.
    Record(Box<CallRecord>),
    /// Voicemail needs the cluster: answer with [`Call::on_voicemail`] (except
    /// `Store` after the call ended, and `Discard`).
    Voicemail(crate::VmRequest),
    /// A destination timed out or answered 503: remember it as dead for a while.
    TargetFailed(D),
    /// The call is over for its users (transactions may linger to absorb
    /// retransmissions until [`Call::is_done`]).
    Ended {
        cause: u16,
        answered: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LegRef {
    A,
    B(usize),
}

/// What the dialplan is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Resolving,
    Dialing {
        deadline: Option<Instant>,
    },
    Bridged(usize),
    Playing,
    /// Prompts a key interrupts (Background, Read).
    Prompting,
    /// Keys awaited until then (WaitExten, Read, the digits after the first).
    Collecting(Instant),
    /// MusicOnHold(), until then or until the caller hangs up.
    Music(Option<Instant>),
    /// Transfer() sent the caller's phone a REFER (this CSeq): its outcome awaited
    /// until then.
    Referring {
        cseq: u32,
        until: Instant,
    },
    /// An INVITE with Replaces waits for the other call to hand its party over.
    Replacing,
    /// VoiceMail() or VoiceMailMain() runs ([`crate::voicemail::Session`]).
    Voicemail,
    Echo,
    Waiting(Instant),
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LegState {
    /// INVITE sent, nothing but 100 back.
    Trying,
    Early,
    Answered,
    /// Final non-2xx (0: no response at all), or cancelled/hung up.
    Done(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancel {
    No,
    /// CANCEL as soon as a provisional response arrives (§9.1).
    Wanted,
    Sent,
}

struct ALeg<D> {
    /// The caller's INVITE transaction and what its responses repeat (`None` for a call
    /// resumed on another node: its INVITE was answered long ago).
    key: Option<TransactionKey>,
    head: Option<ReplyHead>,
    dialog: Dialog<D>,
    invite_cseq: u32,
    max_forwards: u32,
    exten: String,
    offer: Option<Sdp>,
    /// The offer's text, as the caller sent it.
    offer_raw: Bytes,
    final_sent: bool,
    answered: bool,
    ringing_sent: bool,
}

struct BLeg<D> {
    /// Which Dial this leg belongs to.
    generation: u32,
    dialog: Dialog<D>,
    /// The INVITE's client transaction (`None` for a resumed call's callee leg).
    tx: Option<ClientInvite>,
    invite: Bytes,
    state: LegState,
    cancel: Cancel,
    /// §9.1: a cancelled leg whose final response never comes is given up.
    give_up_at: Option<Instant>,
    user: String,
    /// What this leg was placed for, with the alternates still to try.
    target: Contact<D>,
    /// Silence until then moves on to the next alternate ([`FAILOVER_SILENCE`]).
    failover_at: Option<Instant>,
}

enum ClientTx {
    Invite(ClientInvite),
    NonInvite(ClientNonInvite),
}

/// A server transaction waiting for the other leg's answer to a relayed request.
struct Origin {
    key: TransactionKey,
    head: ReplyHead,
    leg: LegRef,
    method: Method,
    cseq: u32,
}

/// A request this call sent (BYE, CANCEL, re-INVITE, relayed INFO…).
struct Pending<D> {
    leg: LegRef,
    dest: D,
    cseq: u32,
    method: Method,
    tx: ClientTx,
    origin: Option<Origin>,
    answered: bool,
    /// A re-INVITE that moves the leg to this node (a resumed call): its answer
    /// tells the relay where the phone is, its failure ends the call.
    reanchor: bool,
    /// The final NOTIFY of a transfer: the transferor gets a BYE once it is answered.
    then_bye: bool,
}

/// One call through the B2BUA. `D` is the driver's destination type.
pub struct Call<D> {
    /// The call's id: its caller's Call-ID when it started (the record's key).
    id: String,
    p: CallParams,
    local: Local,
    started: Instant,
    next_id: u64,
    exec: Execution,
    out: VecDeque<Output<D>>,
    a: ALeg<D>,
    legs: Vec<BLeg<D>>,
    generation: u32,
    dial: Option<DialRequest>,
    phase: Phase,
    pending: Vec<Pending<D>>,
    /// Payload type of the caller's stream when the node itself answers.
    app_pt: Option<u8>,
    /// The voicemail application running, in [`Phase::Voicemail`].
    vm: Option<Box<crate::voicemail::Session>>,
    /// Which sides hold the call (answered here, see `hold_here`); the other hears
    /// music while exactly one does.
    holds: [bool; 2],
    /// The stream music on hold plays on.
    music_stream: Option<usize>,
    /// Music plays to the caller while WaitExten waits (its `m` option).
    music_waiting: bool,
    /// Per side: the SDP we anchored last and the version we sent it with.
    sdp_sent: [(String, u64); 2],
    /// Per side, the `o=` session id of our descriptions (kept by a node resuming the
    /// call; a party handed over from another call keeps the one it knows).
    session: [u64; 2],
    /// Per side: the description we sent last, and where the side receives media.
    sdp_body: [String; 2],
    media_targets: [Vec<Option<SocketAddr>>; 2],
    /// The node's application that answered the caller, while no leg is bridged.
    app_name: Option<&'static str>,
    hangup_at: Option<Instant>,
    answered_at: Option<Instant>,
    answered_at_ms: u64,
    /// The record's adoption count and earlier owners (see [`CallRecord`]).
    epoch: u32,
    history: Vec<(u64, u64)>,
    /// What the replicated record last said; a difference is recorded again (see
    /// [`Call::poll_output`]).
    recorded: Option<Recorded>,
    /// Moving re-INVITEs refused by glare (491): when to send them again, and how many
    /// were refused so far.
    reanchor_retry: Vec<(Instant, LegRef)>,
    glare_tries: u32,
    /// A blind transfer asked for by REFER.
    transfer: Option<transfer::Transfer>,
    /// When transferors that did not hang up after their transfer get a BYE.
    transferor_bye: Vec<(Instant, usize)>,
    /// The caller's leg's domain when it is not ours (a callee in another domain that
    /// took the caller's place in a transfer), as a B-leg's `target.domain` says it.
    a_domain: Option<String>,
    /// Keys of Dial's `t`/`T` during the bridge.
    keys: transfer::FeatureKeys,
}

/// What the replicated record of a call last said, of what changes while it runs.
#[derive(Debug, Clone, PartialEq)]
struct Recorded {
    /// The local CSeqs of the caller's and the callee's dialog.
    cseqs: [u32; 2],
    sdp: [String; 2],
    app: Option<&'static str>,
}

fn side_of(leg: LegRef) -> Side {
    match leg {
        LegRef::A => Side::A,
        LegRef::B(_) => Side::B,
    }
}

impl<D: Destination> Call<D> {
    /// A new call for an authenticated INVITE without a To tag. The driver has opened
    /// the server transaction `key` and the relay streams in `params.media`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        now: Instant,
        params: CallParams,
        invite: &SipMessage,
        core: &CoreHeaders,
        key: TransactionKey,
        source: SocketAddr,
        dest: D,
        exec: Execution,
    ) -> Call<D> {
        let mut call = Call::answering(now, params, invite, core, key, source, dest, exec);
        call.run(now);
        call
    }

    /// A call for an INVITE with `Replaces` (RFC 3891): no dialplan; the caller takes
    /// the place of the party of another call's dialog `replaces` names
    /// ([`Output::Replace`], then [`Call::on_handover`]).
    #[allow(clippy::too_many_arguments)]
    pub fn replacing(
        now: Instant,
        params: CallParams,
        invite: &SipMessage,
        core: &CoreHeaders,
        key: TransactionKey,
        source: SocketAddr,
        dest: D,
        exec: Execution,
        replaces: Replaces,
    ) -> Call<D> {
        let mut call = Call::answering(now, params, invite, core, key, source, dest, exec);
        if call.a.offer.is_none() {
            // Checked before the other call gives its party up (a late offer would need
            // offers to both): RFC 3891 lets us refuse.
            call.respond_a(
                488,
                None,
                &[(
                    "Warning",
                    "399 pbxd \"an INVITE with Replaces needs an offer\"",
                )],
            );
            call.finish(now, 88, None);
            return call;
        }
        call.phase = Phase::Replacing;
        call.log(
            LogLevel::Notice,
            format!(
                "INVITE with Replaces: taking over the dialog {}",
                replaces.call_id
            ),
        );
        call.out.push_back(Output::Replace(replaces));
        call
    }

    /// The call of a caller's INVITE, answered 100, before the dialplan runs.
    #[allow(clippy::too_many_arguments)]
    fn answering(
        now: Instant,
        params: CallParams,
        invite: &SipMessage,
        core: &CoreHeaders,
        key: TransactionKey,
        source: SocketAddr,
        dest: D,
        exec: Execution,
    ) -> Call<D> {
        let head = ReplyHead::new(core, source, &params.server_name);
        let dialog = Dialog::uas(invite, core, &head, dest);
        let exten = invite
            .request_uri()
            .and_then(|u| pbx_sip_msg::Uri::parse(u).ok())
            .and_then(|u| u.user_unescaped())
            .unwrap_or_default();
        let offer = (!invite.body.is_empty())
            .then(|| Sdp::parse(&invite.body).ok())
            .flatten();
        let a = ALeg {
            key: Some(key),
            head: Some(head),
            dialog,
            invite_cseq: core.cseq.seq,
            max_forwards: core.max_forwards.unwrap_or(70),
            exten,
            offer_raw: if offer.is_some() {
                invite.body.clone()
            } else {
                Bytes::new()
            },
            offer,
            final_sent: false,
            answered: false,
            ringing_sent: false,
        };
        let mut call = Call::with_caller(now, params, exec, a);
        call.respond_a(100, None, &[]);
        call
    }

    /// A call with its caller's leg, before anything happened: the state both a new
    /// call and a resumed one start from.
    fn with_caller(now: Instant, params: CallParams, exec: Execution, a: ALeg<D>) -> Call<D> {
        Call {
            id: a.dialog.call_id.clone(),
            local: Local {
                addr: params.local,
                tls_addr: params.tls_local,
            },
            started: now,
            next_id: 0,
            exec,
            out: VecDeque::new(),
            a,
            legs: Vec::new(),
            generation: 0,
            dial: None,
            phase: Phase::Running,
            pending: Vec::new(),
            app_pt: None,
            vm: None,
            holds: [false; 2],
            music_stream: None,
            music_waiting: false,
            sdp_sent: Default::default(),
            session: [params.seed & 0xffff_ffff; 2],
            sdp_body: Default::default(),
            media_targets: Default::default(),
            app_name: None,
            hangup_at: None,
            answered_at: None,
            answered_at_ms: 0,
            epoch: 0,
            history: Vec::new(),
            recorded: None,
            reanchor_retry: Vec::new(),
            glare_tries: 0,
            transfer: None,
            transferor_bye: Vec::new(),
            a_domain: None,
            keys: Default::default(),
            p: params,
        }
    }

    /// The caller's Call-ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn poll_output(&mut self) -> Option<Output<D>> {
        if self.out.is_empty() {
            self.record_if_changed();
        }
        self.out.pop_front()
    }

    /// How many times the call was adopted (its record's epoch).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The call is over and no transaction of it needs the driver any more.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Ended
            && self.pending.is_empty()
            && self.a.dialog.retransmit.is_none()
            && self.legs.iter().all(|l| {
                matches!(l.state, LegState::Done(_))
                    && l.tx.as_ref().and_then(ClientInvite::poll_timeout).is_none()
                    && l.dialog.retransmit.is_none()
            })
    }

    /// The call is over and nothing more is expected from the caller's side: its Call-ID
    /// may start a new call (a phone retrying with the same Call-ID).
    pub fn caller_done(&self) -> bool {
        self.phase == Phase::Ended
            && self.a.dialog.retransmit.is_none()
            && !self.pending.iter().any(|p| p.leg == LegRef::A)
    }

    pub fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    fn id_token(&mut self) -> String {
        self.next_id += 1;
        format!("{:x}{:x}", self.p.seed, self.next_id)
    }

    fn branch(&mut self) -> String {
        format!("z9hG4bK{}", self.id_token())
    }

    fn now_ms(&self, now: Instant) -> u64 {
        self.p.now_ms + now.saturating_duration_since(self.started).as_millis() as u64
    }

    fn log(&mut self, level: LogLevel, message: String) {
        self.out.push_back(Output::Log { level, message });
    }

    // ----- the dialplan -------------------------------------------------------------

    /// Runs the dialplan until it waits for something.
    fn run(&mut self, now: Instant) {
        let (ms, tz) = (self.now_ms(now), self.p.timezone.clone());
        self.exec.set_clock(ms, &tz);
        while self.phase == Phase::Running {
            let action = self.exec.next_action();
            if self.transfer_action(now, &action) {
                return; // the target was not reached: back with the transferor
            }
            match action {
                Action::Answer => {
                    self.app_name = Some("Answer");
                    self.answer_with_app(now)
                }
                Action::Ringing => {
                    if !self.a.final_sent && !self.a.ringing_sent {
                        self.a.ringing_sent = true;
                        self.respond_a(180, None, &[]);
                    }
                }
                Action::Progress => {
                    if !self.a.final_sent {
                        let body = self.app_sdp();
                        self.respond_a(183, body.as_deref(), &[]);
                    }
                }
                Action::Dial(req) => {
                    let targets = req.targets.clone();
                    if req.ringing && !self.a.final_sent && !self.a.ringing_sent {
                        self.a.ringing_sent = true;
                        self.respond_a(180, None, &[]);
                    }
                    self.dial = Some(req);
                    self.phase = Phase::Resolving;
                    self.out.push_back(Output::Resolve(targets));
                }
                Action::Playback { prompts, noanswer } => {
                    self.play_prompts(now, "Playback", prompts, noanswer, Phase::Playing);
                }
                Action::Background {
                    prompts,
                    noanswer,
                    skip_unanswered,
                } => {
                    if skip_unanswered && !self.a.answered {
                        continue;
                    }
                    self.prompt_app(now, "Background", prompts, noanswer);
                    if self.phase == Phase::Running && self.exec.collecting() {
                        // No media to play on: the prompts are skipped, as when they end.
                        self.exec.prompts_done();
                    }
                }
                Action::MusicOnHold { class, duration } => {
                    self.app_name = Some("MusicOnHold");
                    self.answer_with_app(now);
                    if self.phase != Phase::Running {
                        continue;
                    }
                    match self.app_pt {
                        Some(payload_type) => {
                            self.out.push_back(Output::Media(MediaOp::Music {
                                stream: self.app_stream(),
                                side: Side::A,
                                class,
                                payload_type,
                            }));
                            self.phase = Phase::Music(duration.map(|d| now + d));
                        }
                        None => self.log(
                            LogLevel::Warning,
                            "MusicOnHold: no G.711 media with the caller, skipped".into(),
                        ),
                    }
                }
                Action::WaitExten { timeout, music } => {
                    self.app_name = Some("WaitExten");
                    self.phase = Phase::Collecting(now + timeout);
                    if let (Some(class), Some(payload_type)) = (music, self.app_pt) {
                        self.music_waiting = true;
                        self.out.push_back(Output::Media(MediaOp::Music {
                            stream: self.app_stream(),
                            side: Side::A,
                            class,
                            payload_type,
                        }));
                    }
                }
                Action::Read {
                    prompts,
                    noanswer,
                    skip_unanswered,
                } => {
                    if skip_unanswered && !self.a.answered {
                        self.exec.read_skipped("SKIPPED");
                        continue;
                    }
                    self.prompt_app(now, "Read", prompts, noanswer);
                    if self.phase == Phase::Running {
                        // Nothing to play: wait for the first key at once.
                        let step = self.exec.prompts_done();
                        self.collected(now, step);
                    }
                }
                Action::Echo => {
                    self.app_name = Some("Echo");
                    self.answer_with_app(now);
                    if self.phase == Phase::Running {
                        self.phase = Phase::Echo;
                        self.out.push_back(Output::Media(MediaOp::Mode(Mode::Echo)));
                    }
                }
                Action::Wait(d) => self.phase = Phase::Waiting(now + d),
                Action::Transfer(target) => self.transfer_app(now, target),
                Action::Busy => self.hangup(now, 17, None),
                Action::Congestion => self.hangup(now, 34, None),
                Action::Hangup { cause } => self.hangup(now, cause, None),
                Action::Log { level, message } => self.log(level, message),
                Action::VoiceMail {
                    mailboxes,
                    greeting,
                    skip_instructions,
                } => {
                    let caller_id = self.exec.caller().clid();
                    self.voicemail_app(now, "VoiceMail", |pt| {
                        crate::voicemail::Session::leave(
                            mailboxes,
                            greeting,
                            skip_instructions,
                            caller_id,
                            pt,
                        )
                    });
                }
                Action::VoiceMailMain { mailbox, skip_pin } => {
                    self.voicemail_app(now, "VoiceMailMain", |pt| {
                        crate::voicemail::Session::main(mailbox, skip_pin, pt, now)
                    });
                }
            }
        }
    }

    /// Answers and starts a voicemail application on the caller's G.711 media.
    fn voicemail_app(
        &mut self,
        now: Instant,
        app: &'static str,
        session: impl FnOnce(u8) -> crate::voicemail::Session,
    ) {
        self.app_name = Some(app);
        self.answer_with_app(now);
        if self.phase != Phase::Running {
            return;
        }
        match self.app_pt {
            Some(pt) => {
                self.vm = Some(Box::new(session(pt)));
                self.phase = Phase::Voicemail;
                self.pump_voicemail(now);
            }
            None => {
                self.exec.voicemail_finished("FAILED");
                self.log(
                    LogLevel::Warning,
                    format!("{app}: no G.711 media with the caller, skipped"),
                );
            }
        }
    }

    /// Carries out what the voicemail session asks.
    fn pump_voicemail(&mut self, now: Instant) {
        let stream = self.app_stream();
        let pt = self.app_pt.unwrap_or(0);
        while let Some(step) = self.vm.as_mut().and_then(|v| v.poll_step()) {
            use crate::voicemail::VmStep;
            match step {
                VmStep::Prompts(prompts) => self.out.push_back(Output::Media(MediaOp::Play {
                    stream,
                    prompts,
                    payload_type: pt,
                })),
                VmStep::Audio(audio) => self.out.push_back(Output::Media(MediaOp::PlayAudio {
                    stream,
                    audio,
                    payload_type: pt,
                })),
                VmStep::StopPlay => self
                    .out
                    .push_back(Output::Media(MediaOp::StopPlay { stream })),
                VmStep::Record { max_bytes } => {
                    self.out.push_back(Output::Media(MediaOp::Record {
                        stream,
                        side: Side::A,
                        payload_type: pt,
                        max_bytes,
                    }))
                }
                VmStep::Request(r) => self.out.push_back(Output::Voicemail(r)),
                VmStep::Finished(status) => {
                    self.vm = None;
                    if let Some(status) = status {
                        self.exec.voicemail_finished(status);
                    }
                    if self.phase == Phase::Voicemail {
                        self.phase = Phase::Running;
                        self.run(now);
                    }
                    return;
                }
            }
        }
    }

    /// The driver's answer to an [`Output::Voicemail`].
    pub fn on_voicemail(&mut self, now: Instant, reply: crate::VmReply) {
        if self.phase != Phase::Voicemail {
            return;
        }
        if let Some(v) = self.vm.as_mut() {
            v.on_reply(now, reply);
        }
        self.pump_voicemail(now);
    }

    /// Answers (unless `noanswer`: early media) and plays `prompts` that a key
    /// interrupts (Phase::Prompting); stays Running when there is nothing to play on.
    fn prompt_app(
        &mut self,
        now: Instant,
        app: &'static str,
        prompts: Vec<String>,
        noanswer: bool,
    ) {
        self.play_prompts(now, app, prompts, noanswer, Phase::Prompting);
    }

    /// Answers as `app` (unless `noanswer`: early media) and plays `prompts` in `phase`
    /// (`Playing`: to their end; `Prompting`: a key interrupts them); stays Running when
    /// there is nothing to play, or nothing to play on.
    fn play_prompts(
        &mut self,
        now: Instant,
        app: &'static str,
        prompts: Vec<String>,
        noanswer: bool,
        phase: Phase,
    ) {
        if noanswer {
            if !self.a.final_sent {
                let body = self.app_sdp();
                self.respond_a(183, body.as_deref(), &[]);
            }
        } else {
            self.app_name = Some(app);
            self.answer_with_app(now);
        }
        if self.phase != Phase::Running || prompts.is_empty() {
            return; // answering failed and ended the call, or nothing to play
        }
        match self.app_pt {
            Some(pt) => {
                self.phase = phase;
                self.out.push_back(Output::Media(MediaOp::Play {
                    stream: self.app_stream(),
                    prompts,
                    payload_type: pt,
                }));
            }
            None => self.log(
                LogLevel::Warning,
                format!("{app}: no G.711 media with the caller, prompts skipped"),
            ),
        }
    }

    /// A key from the caller (RFC 4733 or SIP INFO) while the dialplan collects them.
    fn on_digit(&mut self, now: Instant, digit: char) {
        if self.phase == Phase::Voicemail {
            if let Some(v) = self.vm.as_mut() {
                v.on_digit(now, digit);
            }
            return self.pump_voicemail(now);
        }
        if !matches!(self.phase, Phase::Prompting | Phase::Collecting(_)) {
            return;
        }
        let step = self.exec.digit(digit);
        if step != pbx_dialplan::Collected::Ignored {
            // As in Asterisk, a key stops the prompt, and WaitExten's music.
            let music = std::mem::take(&mut self.music_waiting);
            if self.phase == Phase::Prompting || music {
                self.out.push_back(Output::Media(MediaOp::StopPlay {
                    stream: self.app_stream(),
                }));
            }
        }
        self.collected(now, step);
    }

    /// What the dialplan said of a key, a timer or the end of the prompts.
    fn collected(&mut self, now: Instant, step: pbx_dialplan::Collected) {
        match step {
            pbx_dialplan::Collected::Ignored => {}
            pbx_dialplan::Collected::More(wait) => self.phase = Phase::Collecting(now + wait),
            pbx_dialplan::Collected::Done => {
                self.phase = Phase::Running;
                self.run(now);
            }
        }
    }

    /// Dial targets resolved: ring every contact in parallel. `unreachable` is the
    /// status when there are none (404 unknown user, 480 nobody registered).
    pub fn on_resolved(&mut self, now: Instant, contacts: Vec<Contact<D>>, unreachable: u16) {
        if self.phase != Phase::Resolving {
            return;
        }
        let req = self.dial.clone().unwrap_or_default();
        if contacts.is_empty() {
            if self.transferring() && self.transfer_failed(now, unreachable) {
                return;
            }
            self.exec
                .dial_finished(DialStatus::ChanUnavail, Some(unreachable));
            self.phase = Phase::Running;
            return self.run(now);
        }
        self.generation += 1;
        for c in contacts {
            self.start_leg(now, c, &req);
        }
        self.phase = Phase::Dialing {
            deadline: req.timeout.map(|t| now + t),
        };
    }

    fn start_leg(&mut self, now: Instant, c: Contact<D>, req: &DialRequest) {
        let call_id = format!("{}@pbx", self.id_token());
        let tag = self.id_token();
        let branch = self.branch();
        let caller = req
            .caller_id
            .clone()
            .unwrap_or_else(|| self.exec.caller().clone());
        let from_uri = format!("<sip:{}@{}>", caller.num, self.p.domain);
        let local = if caller.name.is_empty() {
            format!("{from_uri};tag={tag}")
        } else {
            format!("\"{}\" {from_uri};tag={tag}", caller.name.replace('"', ""))
        };
        let to = format!(
            "<sip:{}@{}>",
            c.user,
            c.domain.as_deref().unwrap_or(&self.p.domain)
        );
        let transport = c.dest.transport();
        let body = self.offer_for_b();
        let max_forwards = self.a.max_forwards.saturating_sub(1).min(70);
        let mut w = MessageWriter::request(&Method::Invite, &c.uri);
        w.header("Via", &self.local.via(transport, &branch))
            .header("Max-Forwards", &max_forwards.to_string())
            .header("From", &local)
            .header("To", &to)
            .header("Call-ID", &call_id)
            .header("CSeq", "1 INVITE");
        for r in &c.route {
            w.header("Route", r);
        }
        w.header("Contact", &self.local.contact(transport))
            .header("Allow", ALLOW)
            .header("User-Agent", &self.p.server_name);
        let bytes = Bytes::from(match &body {
            Some((ct, b)) => {
                w.header("Content-Type", ct);
                w.finish(b)
            }
            None => w.finish(b""),
        });
        let tx = match ClientInvite::new(
            now,
            bytes.clone(),
            transport.is_connection_bound(),
            self.p.timers,
        ) {
            Ok(tx) => Some(tx),
            Err(e) => {
                return self.log(LogLevel::Warning, format!("cannot call {}: {e}", c.uri));
            }
        };
        self.out.push_back(Output::ClaimCallId(call_id.clone()));
        self.out.push_back(Output::Send {
            dest: c.dest.clone(),
            bytes: bytes.clone(),
        });
        let failover_at = (!c.alternates.is_empty()).then(|| now + FAILOVER_SILENCE);
        let target = c.clone();
        self.legs.push(BLeg {
            generation: self.generation,
            failover_at,
            target,
            dialog: Dialog {
                call_id,
                local,
                local_tag: tag,
                remote: to,
                remote_tag: None,
                remote_target: c.uri,
                route_set: c.route,
                local_cseq: 1,
                remote_cseq: 0,
                dest: c.dest,
                retransmit: None,
                last_ack: None,
            },
            tx,
            invite: bytes,
            state: LegState::Trying,
            cancel: Cancel::No,
            give_up_at: None,
            user: c.user,
        });
    }

    /// The Dial is over without an answer (all failed, timed out): on with the plan.
    fn dial_failed(&mut self, now: Instant, status: DialStatus, sip: Option<u16>) {
        let generation = self.generation;
        for i in 0..self.legs.len() {
            if self.legs[i].generation == generation {
                self.cancel_leg(now, i);
            }
        }
        if self.transferring() {
            let code = sip.unwrap_or(match status {
                DialStatus::Busy => 486,
                DialStatus::NoAnswer => 480,
                _ => 503,
            });
            if self.transfer_failed(now, code) {
                return;
            }
        }
        self.exec.dial_finished(status, sip);
        self.phase = Phase::Running;
        self.run(now);
    }

    /// Checks whether every leg of the current Dial failed.
    fn check_dial(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Dialing { .. }) {
            return;
        }
        let current: Vec<LegState> = self
            .legs
            .iter()
            .filter(|l| l.generation == self.generation)
            .map(|l| l.state)
            .collect();
        if current.iter().any(|s| !matches!(s, LegState::Done(_))) {
            return;
        }
        let codes: Vec<u16> = current
            .iter()
            .filter_map(|s| match s {
                LegState::Done(c) if *c != 0 => Some(*c),
                _ => None,
            })
            .collect();
        let best = best_failure(&codes);
        self.dial_failed(now, DialStatus::from_sip(best), best);
    }

    // ----- SDP and media ------------------------------------------------------------

    fn media_ports(&self, side: Side) -> Option<(IpAddr, Vec<u16>)> {
        let m = self.p.media.as_ref()?;
        Some((
            m.ip,
            m.streams
                .iter()
                .map(|(a, b)| if side == Side::A { *a } else { *b })
                .collect(),
        ))
    }

    /// The description to send to `side` for a description the other side sent: the
    /// relay's address and ports, the version bumped only when it changed.
    fn anchored_for(&mut self, side: Side, sdp: &Sdp, raw: &[u8]) -> Vec<u8> {
        let Some((ip, ports)) = self.media_ports(side) else {
            return raw.to_vec();
        };
        let i = if side == Side::A { 0 } else { 1 };
        let source = String::from_utf8_lossy(raw).into_owned();
        if self.sdp_sent[i].0 != source {
            self.sdp_sent[i] = (source, self.sdp_sent[i].1 + 1);
        }
        let body = sdp.anchored(ip, &ports, self.session[i], self.sdp_sent[i].1);
        self.sdp_body[i].clone_from(&body);
        body.into_bytes()
    }

    /// Tells the relay where `side` receives media according to its SDP.
    fn learn_media(&mut self, side: Side, sdp: &Sdp) {
        let k = if side == Side::A { 0 } else { 1 };
        self.media_targets[k] = sdp.media.iter().map(|m| m.rtp_target()).collect();
        let Some(m) = &self.p.media else { return };
        let n = m.streams.len();
        for (i, media) in sdp.media.iter().enumerate().take(n) {
            self.out.push_back(Output::Media(MediaOp::Remote {
                stream: i,
                side,
                addr: media.rtp_target(),
            }));
        }
    }

    /// The offer for a B-leg: the caller's, anchored; our own when it sent none.
    fn offer_for_b(&mut self) -> Option<(&'static str, Vec<u8>)> {
        if self.transferring() {
            if let Some(offer) = self.transfer_offer() {
                let raw = self.a.offer_raw.clone();
                return Some((SDP, self.anchored_for(Side::B, &offer, &raw)));
            }
        }
        match self.a.offer.clone() {
            Some(offer) => {
                let raw = self.a.offer_raw.clone();
                Some((SDP, self.anchored_for(Side::B, &offer, &raw)))
            }
            None => {
                let (ip, ports) = self.media_ports(Side::B)?;
                let port = *ports.first()?;
                let body = pbx_sdp::offer_g711(ip, port, self.session[1], 1);
                self.sdp_body[1].clone_from(&body);
                // Version 1 is taken: the next description to B is a later one.
                self.sdp_sent[1].1 = self.sdp_sent[1].1.max(1);
                Some((SDP, body.into_bytes()))
            }
        }
    }

    /// The stream the node's own applications use.
    fn app_stream(&self) -> usize {
        self.a
            .offer
            .as_ref()
            .and_then(Sdp::g711_stream)
            .unwrap_or(0)
    }

    /// The node's own answer to the caller (Answer, Echo, Playback): G.711 at the
    /// relay. Sets the relay's caller side. `None` without media.
    fn app_sdp(&mut self) -> Option<String> {
        let m = self.p.media.clone()?;
        let stream = self.app_stream();
        let (port, _) = *m.streams.get(stream)?;
        match self.a.offer.clone() {
            Some(offer) => {
                // The version moves only when what we answer changes (a hold, a new
                // codec), as RFC 3264 §8 asks; 183 and 200 of one offer carry the same.
                let version = self.sdp_sent[0].1.max(1);
                let (mut sdp, pt) = offer.answer_g711(m.ip, port, self.session[0], version)?;
                if !self.sdp_body[0].is_empty() && self.sdp_body[0] != sdp {
                    let next = offer.answer_g711(m.ip, port, self.session[0], version + 1)?;
                    sdp = next.0;
                    self.sdp_sent[0].1 = version + 1;
                } else {
                    self.sdp_sent[0].1 = version;
                }
                self.app_pt = Some(pt);
                if let Some(te) = offer.media.get(stream).and_then(|s| s.telephone_event()) {
                    self.out.push_back(Output::Media(MediaOp::DetectDtmf {
                        stream,
                        side: Side::A,
                        payload_type: te,
                    }));
                }
                self.media_targets[0] = offer.media.iter().map(|m| m.rtp_target()).collect();
                self.out.push_back(Output::Media(MediaOp::Remote {
                    stream,
                    side: Side::A,
                    addr: offer.media.get(stream).and_then(|s| s.rtp_target()),
                }));
                self.sdp_body[0].clone_from(&sdp);
                Some(sdp)
            }
            None => {
                self.app_pt = Some(0);
                self.out.push_back(Output::Media(MediaOp::DetectDtmf {
                    stream,
                    side: Side::A,
                    payload_type: pbx_sdp::OFFERED_TELEPHONE_EVENT,
                }));
                let sdp = pbx_sdp::offer_g711(m.ip, port, self.session[0], 1);
                self.sdp_body[0].clone_from(&sdp);
                Some(sdp)
            }
        }
    }

    // ----- the caller's leg ---------------------------------------------------------

    /// A response to the caller's INVITE.
    fn respond_a(&mut self, status: u16, sdp: Option<&str>, extra: &[(&str, &str)]) {
        let (Some(key), Some(head)) = (self.a.key.clone(), self.a.head.as_ref()) else {
            return; // a resumed call: its INVITE was answered on another node
        };
        let mut w = MessageWriter::response(status);
        head.write(&mut w, status);
        if status > 100 && status < 300 {
            w.header(
                "Contact",
                &self.local.contact(self.a.dialog.dest.transport()),
            );
            w.header("Allow", ALLOW);
        }
        for (n, v) in extra {
            w.header(n, v);
        }
        let bytes = Bytes::from(match sdp {
            Some(b) => {
                w.header("Content-Type", SDP);
                w.finish(b.as_bytes())
            }
            None => w.finish(b""),
        });
        if status >= 200 {
            self.a.final_sent = true;
        }
        self.out.push_back(Output::Respond { key, status, bytes });
    }

    /// A 2xx to the caller's INVITE, retransmitted until its ACK.
    fn answer_a(&mut self, now: Instant, sdp: Option<&[u8]>) {
        if self.a.final_sent {
            return;
        }
        let body = sdp.map(|b| String::from_utf8_lossy(b).into_owned());
        self.respond_a(200, body.as_deref(), &[]);
        self.a.answered = true;
        self.answered_at = Some(now);
        if let Some(Output::Respond { bytes, .. }) = self.out.back() {
            if !self.a.dialog.reliable() {
                let b = bytes.clone();
                self.a.dialog.retransmit = Some(Retransmit2xx::new(
                    now,
                    self.a.invite_cseq,
                    b,
                    &self.p.timers,
                ));
            }
        }
    }

    /// Answer by the node itself; a caller without a usable codec gets 488.
    fn answer_with_app(&mut self, now: Instant) {
        if self.a.final_sent {
            return;
        }
        let sdp = self.app_sdp();
        if sdp.is_none() && self.p.media.is_some() {
            self.respond_a(
                488,
                None,
                &[("Warning", "305 pbxd \"no G.711 audio offered\"")],
            );
            return self.finish(now, 88, None);
        }
        self.answer_a(now, sdp.as_deref().map(str::as_bytes));
        self.record(now, None);
    }

    fn record(&mut self, now: Instant, winner: Option<usize>) {
        self.answered_at_ms = self.now_ms(now);
        if winner.is_some() {
            self.app_name = None;
        }
        self.push_record();
    }

    /// The call's replicated record as it stands (answered calls only).
    fn push_record(&mut self) {
        let transport = |d: &Dialog<D>| d.dest.transport();
        let mut legs = vec![leg_record(
            &self.a.dialog,
            self.local.contact(transport(&self.a.dialog)),
            &self.sdp_body[0],
            &self.media_targets[0],
        )];
        if let Phase::Bridged(w) = self.phase {
            let d = &self.legs[w].dialog;
            legs.push(leg_record(
                d,
                self.local.contact(transport(d)),
                &self.sdp_body[1],
                &self.media_targets[1],
            ));
        }
        let b_cseq = legs.get(1).map_or(0, |l| l.local_cseq);
        self.recorded = Some(Recorded {
            cseqs: [legs[0].local_cseq, b_cseq],
            sdp: self.sdp_body.clone(),
            app: self.app_name,
        });
        let activity = match self.app_name {
            Some(app) if legs.len() == 1 => Activity::Application(app.to_string()),
            _ => Activity::Bridged,
        };
        self.out.push_back(Output::Record(Box::new(CallRecord {
            id: self.id.clone(),
            owner: self.p.node_id,
            epoch: self.epoch,
            history: self.history.clone(),
            caller: self.p.caller_user.clone(),
            callee: self.a.exten.clone(),
            answered_at_ms: self.answered_at_ms,
            activity,
            legs,
        })));
    }

    /// Records the call again when what another node needs to resume it changed: a
    /// description sent on a leg (hold, resume, a new codec), or a local CSeq halfway
    /// through the headroom a survivor adds (RFC 3261 §12.2.1.1: it must continue above
    /// anything this node sent).
    fn record_if_changed(&mut self) {
        let Some(r) = &self.recorded else {
            return;
        };
        if self.phase == Phase::Ended {
            return;
        }
        let b_cseq = match self.phase {
            Phase::Bridged(w) => self.legs[w].dialog.local_cseq,
            _ => r.cseqs[1],
        };
        let moved = |now: u32, then: u32| now.saturating_sub(then) >= CSEQ_HEADROOM / 2;
        if r.sdp != self.sdp_body
            || r.app != self.app_name
            || moved(self.a.dialog.local_cseq, r.cseqs[0])
            || moved(b_cseq, r.cseqs[1])
        {
            self.push_record();
        }
    }

    // ----- ending -------------------------------------------------------------------

    /// Ends the call with a Q.850 cause: the caller gets the matching final response
    /// or a BYE, every B-leg a CANCEL or a BYE. `by` already hung up.
    fn hangup(&mut self, now: Instant, cause: u16, by: Option<LegRef>) {
        if self.phase == Phase::Ended {
            return;
        }
        if !self.a.final_sent {
            self.respond_a(cause_to_sip(cause), None, &[]);
        } else if self.a.answered && by != Some(LegRef::A) {
            self.send_in_dialog(now, LegRef::A, Method::Bye, &[], None, None);
        }
        self.finish(now, cause, by);
    }

    fn finish(&mut self, now: Instant, cause: u16, by: Option<LegRef>) {
        if self.phase == Phase::Ended {
            return;
        }
        if self.transferring() {
            // The transferee hung up (or the call was ended) before the target answered.
            self.notify_transfer(now, 487, true);
            self.transfer = None;
        }
        for i in 0..self.legs.len() {
            if by != Some(LegRef::B(i)) {
                self.cancel_leg(now, i);
            }
        }
        if let Some(mut v) = self.vm.take() {
            // A message being recorded is kept: hanging up is how callers end one.
            v.on_hangup();
            while let Some(step) = v.poll_step() {
                if let crate::voicemail::VmStep::Request(r) = step {
                    self.out.push_back(Output::Voicemail(r));
                }
            }
        }
        self.phase = Phase::Ended;
        for a in self.exec.hangup_handler(cause) {
            if let Action::Log { level, message } = a {
                self.log(level, message);
            }
        }
        self.out.push_back(Output::Ended {
            cause,
            answered: self.a.answered,
        });
    }

    /// Stops a B-leg: CANCEL while it rings, BYE once answered.
    fn cancel_leg(&mut self, now: Instant, i: usize) {
        match (self.legs[i].state, self.legs[i].cancel) {
            (LegState::Trying, Cancel::No) => self.legs[i].cancel = Cancel::Wanted,
            (LegState::Early, Cancel::No) => self.send_cancel(now, i),
            (LegState::Answered, _) => {
                self.legs[i].state = LegState::Done(200);
                self.send_in_dialog(now, LegRef::B(i), Method::Bye, &[], None, None);
            }
            _ => {}
        }
    }

    fn send_cancel(&mut self, now: Instant, i: usize) {
        self.legs[i].cancel = Cancel::Sent;
        self.legs[i].give_up_at = Some(now + self.p.timers.t1x64());
        let Ok(invite) =
            pbx_sip_msg::parse_datagram(&self.legs[i].invite, &pbx_sip_msg::Limits::default())
        else {
            return;
        };
        let leg = &self.legs[i];
        let mut w = MessageWriter::request(&Method::Cancel, invite.request_uri().unwrap_or(""));
        for name in [
            HeaderName::Via,
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
        ] {
            if let Some(v) = invite.header(&name) {
                w.header(name.as_str(), v);
            }
        }
        w.header("CSeq", "1 CANCEL").header("Max-Forwards", "70");
        for r in invite.header_values(&HeaderName::Route) {
            w.header("Route", r);
        }
        let bytes = Bytes::from(w.finish(b""));
        let dest = leg.dialog.dest.clone();
        let reliable = leg.dialog.reliable();
        self.out.push_back(Output::Send {
            dest: dest.clone(),
            bytes: bytes.clone(),
        });
        self.pending.push(Pending {
            leg: LegRef::B(i),
            dest,
            cseq: 1,
            method: Method::Cancel,
            tx: ClientTx::NonInvite(ClientNonInvite::new(now, bytes, reliable, self.p.timers)),
            origin: None,
            answered: false,
            reanchor: false,
            then_bye: false,
        });
    }

    // ----- requests in dialogs ------------------------------------------------------

    fn dialog(&self, leg: LegRef) -> &Dialog<D> {
        match leg {
            LegRef::A => &self.a.dialog,
            LegRef::B(i) => &self.legs[i].dialog,
        }
    }

    fn dialog_mut(&mut self, leg: LegRef) -> &mut Dialog<D> {
        match leg {
            LegRef::A => &mut self.a.dialog,
            LegRef::B(i) => &mut self.legs[i].dialog,
        }
    }

    /// Sends a request in a leg's dialog through a client transaction of its own.
    fn send_in_dialog(
        &mut self,
        now: Instant,
        leg: LegRef,
        method: Method,
        extra: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
        origin: Option<Origin>,
    ) {
        let branch = self.branch();
        let local = self.local.clone();
        let timers = self.p.timers;
        let d = self.dialog_mut(leg);
        let (cseq, bytes) = d.request(&local, &method, &branch, extra, body);
        let dest = d.dest.clone();
        let reliable = d.reliable();
        let tx = if method == Method::Invite {
            match ClientInvite::new(now, bytes.clone(), reliable, timers) {
                Ok(tx) => ClientTx::Invite(tx),
                Err(_) => return,
            }
        } else {
            ClientTx::NonInvite(ClientNonInvite::new(now, bytes.clone(), reliable, timers))
        };
        self.out.push_back(Output::Send {
            dest: dest.clone(),
            bytes,
        });
        self.pending.push(Pending {
            leg,
            dest,
            cseq,
            method,
            tx,
            origin,
            answered: false,
            reanchor: false,
            then_bye: false,
        });
    }

    /// A response to a request that arrived on `leg`.
    fn respond_to(
        &mut self,
        to: &Origin,
        status: u16,
        extra: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
    ) -> Bytes {
        let mut w = MessageWriter::response(status);
        to.head.write(&mut w, status);
        if (200..300).contains(&status)
            && matches!(to.method, Method::Invite | Method::Update | Method::Refer)
        {
            w.header(
                "Contact",
                &self.local.contact(self.dialog(to.leg).dest.transport()),
            );
        }
        for (n, v) in extra {
            w.header(n, v);
        }
        let bytes = Bytes::from(match body {
            Some((ct, b)) => {
                w.header("Content-Type", ct);
                w.finish(b)
            }
            None => w.finish(b""),
        });
        self.out.push_back(Output::Respond {
            key: to.key.clone(),
            status,
            bytes: bytes.clone(),
        });
        bytes
    }

    fn leg_of(&self, call_id: &str) -> Option<LegRef> {
        if call_id == self.a.dialog.call_id {
            return Some(LegRef::A);
        }
        self.legs
            .iter()
            .position(|l| l.dialog.call_id == call_id)
            .map(LegRef::B)
    }

    /// The leg bridged with `leg`, if any.
    fn peer_leg(&self, leg: LegRef) -> Option<LegRef> {
        match (self.phase, leg) {
            (Phase::Bridged(w), LegRef::A) => Some(LegRef::B(w)),
            (Phase::Bridged(w), LegRef::B(i)) if i == w => Some(LegRef::A),
            _ => None,
        }
    }

    /// A request with one of this call's Call-IDs that no server transaction matched.
    /// The driver opened a server transaction `key` for it (not for ACK).
    pub fn on_request(
        &mut self,
        now: Instant,
        msg: &SipMessage,
        core: &CoreHeaders,
        key: TransactionKey,
        source: SocketAddr,
    ) {
        let Some(method) = msg.method().cloned() else {
            return;
        };
        let Some(leg) = self.leg_of(&core.call_id) else {
            return;
        };
        let head = ReplyHead::new(core, source, &self.p.server_name);
        if method == Method::Ack {
            return self.on_ack(msg, core, leg);
        }
        let origin = Origin {
            key,
            head,
            leg,
            method: method.clone(),
            cseq: core.cseq.seq,
        };
        if method == Method::Cancel {
            self.respond_to(&origin, 200, &[], None);
            if leg == LegRef::A && !self.a.final_sent {
                self.respond_a(487, None, &[]);
                if self.dial.is_some() {
                    self.exec.dial_finished(DialStatus::Cancel, None);
                }
                self.finish(now, 16, Some(LegRef::A));
            }
            return;
        }
        // In a dialog: our tag must be in To, the CSeq must grow (§12.2.2).
        let ours = self.dialog(leg).local_tag.clone();
        if core.to.tag() != Some(ours.as_str()) {
            self.respond_to(&origin, 481, &[], None);
            return;
        }
        let d = self.dialog_mut(leg);
        if core.cseq.seq <= d.remote_cseq {
            self.respond_to(&origin, 500, &[("Retry-After", "1")], None);
            return;
        }
        d.remote_cseq = core.cseq.seq;
        match method {
            Method::Bye => {
                self.respond_to(&origin, 200, &[], None);
                if let LegRef::B(i) = leg {
                    let was_winner = self.phase == Phase::Bridged(i);
                    self.legs[i].state = LegState::Done(200);
                    if !was_winner {
                        return; // a leg that lost the race hanging up
                    }
                }
                self.hangup(now, 16, Some(leg));
            }
            Method::Invite | Method::Update => self.on_offer(now, msg, origin),
            Method::Info | Method::Options => match self.peer_leg(leg) {
                Some(other) => {
                    let ct = msg.header(&HeaderName::ContentType).map(str::to_string);
                    let body = ct.as_deref().map(|c| (c, &msg.body[..]));
                    self.send_in_dialog(now, other, method.clone(), &[], body, Some(origin));
                    // Dial's t/T keys may come as SIP INFO too (relayed all the same).
                    if method == Method::Info {
                        if let Some(d) = info_digit(ct.as_deref().unwrap_or(""), &msg.body) {
                            self.feature_key(now, side_of(leg), d);
                        }
                    }
                }
                None => {
                    let extra: &[(&str, &str)] = if method == Method::Options {
                        &[("Allow", ALLOW), ("Accept", SDP)]
                    } else {
                        &[]
                    };
                    self.respond_to(&origin, 200, extra, None);
                    if method == Method::Info && leg == LegRef::A {
                        let ct = msg.header(&HeaderName::ContentType).unwrap_or("");
                        if let Some(d) = info_digit(ct, &msg.body) {
                            self.on_digit(now, d);
                        }
                    }
                }
            },
            Method::Refer => self.on_refer(msg, origin),
            // No subscription of ours exists (RFC 6665 §4.1.3).
            Method::Notify => self.on_notify(now, msg, origin),
            Method::Subscribe | Method::Message | Method::Publish | Method::Prack => {
                self.respond_to(&origin, 405, &[("Allow", ALLOW)], None);
            }
            _ => {
                self.respond_to(&origin, 501, &[("Allow", ALLOW)], None);
            }
        }
    }

    fn on_ack(&mut self, msg: &SipMessage, core: &CoreHeaders, leg: LegRef) {
        let late_answer = leg == LegRef::A && self.a.offer.is_none() && !msg.body.is_empty();
        let d = self.dialog_mut(leg);
        if d.retransmit
            .as_ref()
            .is_some_and(|r| r.cseq == core.cseq.seq)
        {
            d.retransmit = None;
        }
        if late_answer {
            // The caller sent no offer; our 2xx offered, its ACK answers.
            if let Ok(sdp) = Sdp::parse(&msg.body) {
                self.learn_media(Side::A, &sdp);
                self.a.offer = Some(sdp);
                self.a.offer_raw = msg.body.clone();
            }
        }
    }

    /// A re-INVITE or UPDATE: relayed to the bridged leg with the SDP anchored, or
    /// answered by the node for its own applications.
    fn on_offer(&mut self, now: Instant, msg: &SipMessage, origin: Origin) {
        let (leg, method) = (origin.leg, origin.method.clone());
        let busy = self.pending.iter().any(|p| {
            p.method == Method::Invite
                && !p.answered
                && (p.leg == leg || p.origin.as_ref().is_some_and(|o| o.leg == leg))
        });
        if busy && method == Method::Invite {
            // §14.1: glare with an offer in progress.
            self.respond_to(&origin, 491, &[], None);
            return;
        }
        let sdp = (!msg.body.is_empty())
            .then(|| Sdp::parse(&msg.body).ok())
            .flatten();
        if !msg.body.is_empty() && sdp.is_none() {
            self.respond_to(&origin, 488, &[], None);
            return;
        }
        let side = side_of(leg);
        match (self.peer_leg(leg), sdp) {
            // Hold, and the resume after it: answered here, music to the other side
            // (as Asterisk does: the held party never sees a re-INVITE).
            (Some(_), Some(sdp))
                if (sdp.hold().is_some() || self.holds[side_index(side)])
                    && self.can_answer_here(side, &sdp) =>
            {
                self.learn_media(side, &sdp);
                if leg == LegRef::A {
                    self.a.offer = Some(sdp.clone());
                    self.a.offer_raw = msg.body.clone();
                }
                let hold = sdp.hold();
                self.hold_here(now, origin, side, hold, Some(&sdp));
            }
            // A resume without SDP (some phones): our offer in the 200, sendrecv.
            (Some(_), None)
                if method == Method::Invite
                    && self.holds[side_index(side)]
                    && self.p.media.is_some() =>
            {
                self.hold_here(now, origin, side, None, None);
            }
            (Some(other), Some(sdp)) => {
                self.learn_media(side, &sdp);
                if leg == LegRef::A {
                    self.a.offer = Some(sdp.clone());
                    self.a.offer_raw = msg.body.clone();
                }
                let body = self.anchored_for(side_of(other), &sdp, &msg.body);
                self.send_in_dialog(now, other, method, &[], Some((SDP, &body)), Some(origin));
            }
            (_, sdp) => {
                // Our own answer: the node's application, or a refresh without SDP.
                if let (Some(sdp), LegRef::A) = (&sdp, leg) {
                    self.a.offer = Some(sdp.clone());
                    self.a.offer_raw = msg.body.clone();
                }
                let answer = if leg == LegRef::A && self.peer_leg(leg).is_none() {
                    self.app_sdp()
                } else {
                    let i = if side == Side::A { 0 } else { 1 };
                    (!self.sdp_sent[i].0.is_empty()).then(|| {
                        let last = self.sdp_sent[i].0.clone();
                        match Sdp::parse(last.as_bytes()) {
                            Ok(s) => String::from_utf8_lossy(&self.anchored_for(
                                side,
                                &s,
                                last.as_bytes(),
                            ))
                            .into_owned(),
                            Err(_) => last,
                        }
                    })
                };
                let body = answer.as_deref().map(|b| (SDP, b.as_bytes()));
                let cseq = self.dialog(leg).remote_cseq;
                let bytes = self.respond_to(&origin, 200, &[], body);
                if method == Method::Invite && !self.dialog(leg).reliable() {
                    let timers = self.p.timers;
                    self.dialog_mut(leg).retransmit =
                        Some(Retransmit2xx::new(now, cseq, bytes, &timers));
                }
            }
        }
    }

    /// Answers a hold (`hold`: the direction to answer with) or a resume from `side`
    /// itself, with the other side's description as last sent, and starts or stops the
    /// music the other side hears.
    /// Whether a hold or resume from `side` can be answered here: the node anchors the
    /// media, and the description last sent to `side` has the offer's streams.
    fn can_answer_here(&self, side: Side, offer: &Sdp) -> bool {
        let i = if side == Side::A { 0 } else { 1 };
        let last = if self.sdp_sent[i].0.is_empty() {
            &self.sdp_body[i]
        } else {
            &self.sdp_sent[i].0
        };
        self.p.media.is_some()
            && Sdp::parse(last.as_bytes()).is_ok_and(|s| s.media.len() == offer.media.len())
    }

    fn hold_here(
        &mut self,
        now: Instant,
        origin: Origin,
        side: Side,
        hold: Option<Direction>,
        offer: Option<&Sdp>,
    ) {
        let (leg, method) = (origin.leg, origin.method.clone());
        let i = if side == Side::A { 0 } else { 1 };
        // The other side's description as it came; on a call resumed from another
        // node only what was sent (its direction maybe the hold's: a resume sends
        // sendrecv).
        let (theirs, direction) = if self.sdp_sent[i].0.is_empty() {
            let sent = Sdp::parse(self.sdp_body[i].as_bytes()).ok();
            (sent, Some(hold.unwrap_or(Direction::SendRecv)))
        } else {
            (Sdp::parse(self.sdp_sent[i].0.as_bytes()).ok(), hold)
        };
        let answer = theirs.as_ref().and_then(|theirs| {
            let mut answer = theirs.clone();
            if let Some(dir) = direction {
                for m in answer.media.iter_mut().filter(|m| m.kind == "audio") {
                    m.direction = dir;
                }
            }
            // A stream the offer disables stays disabled in the answer (RFC 3264 §6).
            if let Some(offer) = offer {
                for (m, o) in answer.media.iter_mut().zip(&offer.media) {
                    if o.port == 0 {
                        m.port = 0;
                    }
                }
            }
            let (ip, ports) = self.media_ports(side)?;
            // A new version only when the description changes (RFC 3264 §8).
            let mut body = answer.anchored(ip, &ports, self.session[i], self.sdp_sent[i].1);
            if body != self.sdp_body[i] {
                self.sdp_sent[i].1 += 1;
                body = answer.anchored(ip, &ports, self.session[i], self.sdp_sent[i].1);
            }
            self.sdp_body[i].clone_from(&body);
            Some(body)
        });
        let body = answer.as_deref().map(|b| (SDP, b.as_bytes()));
        let cseq = self.dialog(leg).remote_cseq;
        let bytes = self.respond_to(&origin, 200, &[], body);
        if method == Method::Invite && !self.dialog(leg).reliable() {
            let timers = self.p.timers;
            self.dialog_mut(leg).retransmit = Some(Retransmit2xx::new(now, cseq, bytes, &timers));
        }
        let before = self.music_side();
        let was = self.holds[i];
        self.holds[i] = hold.is_some();
        let after = self.music_side();
        match (was, hold.is_some()) {
            (false, true) => self.log(LogLevel::Notice, format!("{side:?} put the call on hold")),
            (true, false) => self.log(LogLevel::Notice, format!("{side:?} resumed the call")),
            _ => {}
        }
        if before == after {
            return;
        }
        if let Some(stream) = self.music_stream.take() {
            self.out
                .push_back(Output::Media(MediaOp::StopPlay { stream }));
        }
        if let Some(to) = after {
            self.start_music(to, None);
        }
    }

    /// Who hears music on hold: the one party not holding while the other holds.
    pub(crate) fn music_side(&self) -> Option<Side> {
        match self.holds {
            [true, false] => Some(Side::B),
            [false, true] => Some(Side::A),
            _ => None,
        }
    }

    /// Music on hold to `to`, in the codec of its description (`description`, else the
    /// one the other side was last sent).
    pub(crate) fn start_music(&mut self, to: Side, description: Option<Sdp>) {
        let k = if to == Side::A { 1 } else { 0 };
        let description = description.or_else(|| {
            let text = if self.sdp_sent[k].0.is_empty() {
                &self.sdp_body[k]
            } else {
                &self.sdp_sent[k].0
            };
            Sdp::parse(text.as_bytes()).ok()
        });
        let Some((stream, payload_type)) = description.as_ref().and_then(Sdp::g711_receive) else {
            return self.log(
                LogLevel::Notice,
                format!("on hold: no G.711 with {to:?}, no music"),
            );
        };
        let class = self.exec.music_class();
        self.log(
            LogLevel::Notice,
            format!("music on hold ({class}) to {to:?}"),
        );
        self.music_stream = Some(stream);
        self.out.push_back(Output::Media(MediaOp::Music {
            stream,
            side: to,
            class,
            payload_type,
        }));
    }

    // ----- responses ----------------------------------------------------------------

    /// A response with one of this call's Call-IDs.
    pub fn on_response(&mut self, now: Instant, msg: &SipMessage, core: &CoreHeaders) {
        let Some(status) = msg.status() else { return };
        let Some(leg) = self.leg_of(&core.call_id) else {
            return;
        };
        if let LegRef::B(i) = leg {
            // The leg's own INVITE; a dialog taken over (a transfer, a swap) has none,
            // and its CSeq 1 may be a re-INVITE of ours (in `pending`).
            if core.cseq.method == Method::Invite && core.cseq.seq == 1 && self.legs[i].tx.is_some()
            {
                return self.on_leg_response(now, i, status, msg, core);
            }
        }
        let Some(idx) = self
            .pending
            .iter()
            .position(|p| p.leg == leg && p.cseq == core.cseq.seq && p.method == core.cseq.method)
        else {
            // A 2xx retransmitted after its transaction ended: ACK it again.
            let d = self.dialog(leg);
            if let Some((cseq, ack)) = &d.last_ack {
                if *cseq == core.cseq.seq && (200..300).contains(&status) {
                    let (dest, bytes) = (d.dest.clone(), ack.clone());
                    self.out.push_back(Output::Send { dest, bytes });
                }
            }
            return;
        };
        let action = match &mut self.pending[idx].tx {
            ClientTx::Invite(tx) => tx.on_response(now, status, &core.to.raw),
            ClientTx::NonInvite(tx) => tx.on_response(now, status),
        };
        let dest = self.pending[idx].dest.clone();
        match action {
            ResponseAction::Absorb => return,
            ResponseAction::ResendAck(b) => {
                self.out.push_back(Output::Send { dest, bytes: b });
                return;
            }
            ResponseAction::DeliverAndAck(b) => self.out.push_back(Output::Send {
                dest: dest.clone(),
                bytes: b,
            }),
            ResponseAction::Deliver => {}
        }
        if status < 200 {
            return;
        }
        let method = self.pending[idx].method.clone();
        let cseq = self.pending[idx].cseq;
        if method == Method::Invite && status < 300 {
            let branch = self.branch();
            let local = self.local.clone();
            let d = self.dialog_mut(leg);
            if d.last_ack.as_ref().is_some_and(|(c, _)| *c == cseq) {
                let bytes = d
                    .last_ack
                    .as_ref()
                    .map(|(_, b)| b.clone())
                    .unwrap_or_default();
                self.out.push_back(Output::Send { dest, bytes });
                return;
            }
            let ack = d.ack(&local, cseq, &branch);
            self.out.push_back(Output::Send { dest, bytes: ack });
        }
        if self.pending[idx].answered {
            return;
        }
        self.pending[idx].answered = true;
        if method == Method::Refer && leg == LegRef::A {
            self.on_refer_answer(now, cseq, status);
        }
        if self.pending[idx].reanchor {
            return self.on_reanchor_answer(now, leg, status, &msg.body);
        }
        if std::mem::take(&mut self.pending[idx].then_bye) {
            self.bye_transferor(now, leg);
        }
        let Some(origin) = self.pending[idx].origin.take() else {
            if method == Method::Bye || method == Method::Cancel {
                self.pending.remove(idx);
            }
            return;
        };
        // Relay the final answer to the leg that asked.
        let sdp = (matches!(method, Method::Invite | Method::Update) && !msg.body.is_empty())
            .then(|| Sdp::parse(&msg.body).ok())
            .flatten();
        let body: Option<(String, Vec<u8>)> = match &sdp {
            Some(sdp) => {
                self.learn_media(side_of(leg), sdp);
                Some((
                    SDP.to_string(),
                    self.anchored_for(side_of(origin.leg), sdp, &msg.body),
                ))
            }
            None if !msg.body.is_empty() => msg
                .header(&HeaderName::ContentType)
                .map(|ct| (ct.to_string(), msg.body.to_vec())),
            None => None,
        };
        let bytes = self.respond_to(
            &origin,
            status,
            &[],
            body.as_ref().map(|(c, b)| (c.as_str(), &b[..])),
        );
        if origin.method == Method::Invite
            && (200..300).contains(&status)
            && !self.dialog(origin.leg).reliable()
        {
            let timers = self.p.timers;
            self.dialog_mut(origin.leg).retransmit =
                Some(Retransmit2xx::new(now, origin.cseq, bytes, &timers));
        }
    }

    /// A response to a B-leg's INVITE.
    fn on_leg_response(
        &mut self,
        now: Instant,
        i: usize,
        status: u16,
        msg: &SipMessage,
        core: &CoreHeaders,
    ) {
        // The target answers: no failover to the next one any more.
        self.legs[i].failover_at = None;
        let Some(tx) = self.legs[i].tx.as_mut() else {
            return; // a resumed leg: its INVITE was answered on another node
        };
        let action = tx.on_response(now, status, &core.to.raw);
        let dest = self.legs[i].dialog.dest.clone();
        match action {
            ResponseAction::Absorb => return,
            ResponseAction::ResendAck(b) => {
                return self.out.push_back(Output::Send { dest, bytes: b });
            }
            ResponseAction::DeliverAndAck(b) => self.out.push_back(Output::Send {
                dest: dest.clone(),
                bytes: b,
            }),
            ResponseAction::Deliver => {}
        }
        let current = self.legs[i].generation == self.generation
            && matches!(self.phase, Phase::Dialing { .. });
        match status {
            100 => {}
            101..=199 => {
                let leg = &mut self.legs[i];
                if leg.state == LegState::Trying {
                    leg.state = LegState::Early;
                }
                if let Some(tag) = core.to.tag() {
                    leg.dialog.remote_tag = Some(tag.to_string());
                    leg.dialog.remote = core.to.raw.clone();
                    leg.dialog.learn_target(msg, true);
                }
                if leg.cancel == Cancel::Wanted {
                    return self.send_cancel(now, i);
                }
                if !current || self.a.final_sent {
                    return;
                }
                let sdp = (!msg.body.is_empty())
                    .then(|| Sdp::parse(&msg.body).ok())
                    .flatten();
                match sdp {
                    Some(sdp) => {
                        // Early media: the callee's answer, anchored.
                        self.learn_media(Side::B, &sdp);
                        self.out
                            .push_back(Output::Media(MediaOp::Mode(Mode::Bridge)));
                        let body = self.anchored_for(Side::A, &sdp, &msg.body);
                        let body = String::from_utf8_lossy(&body).into_owned();
                        self.respond_a(status, Some(&body), &[]);
                    }
                    None if !self.a.ringing_sent => {
                        self.a.ringing_sent = true;
                        self.respond_a(180, None, &[]);
                    }
                    None => {}
                }
            }
            200..=299 => {
                let branch = self.branch();
                let local = self.local.clone();
                let leg = &mut self.legs[i];
                if leg.dialog.last_ack.is_some() {
                    // Retransmitted 2xx: our ACK got lost.
                    let bytes = leg.dialog.last_ack.as_ref().map(|(_, b)| b.clone());
                    if let Some(bytes) = bytes {
                        self.out.push_back(Output::Send { dest, bytes });
                    }
                    return;
                }
                leg.dialog.remote_tag = core.to.tag().map(str::to_string);
                leg.dialog.remote = core.to.raw.clone();
                leg.dialog.learn_target(msg, true);
                let ack = leg.dialog.ack(&local, 1, &branch);
                self.out.push_back(Output::Send { dest, bytes: ack });
                let wins = current && self.legs[i].cancel == Cancel::No;
                if !wins {
                    // Answered after another leg won or the call ended.
                    self.legs[i].state = LegState::Done(200);
                    self.send_in_dialog(now, LegRef::B(i), Method::Bye, &[], None, None);
                    return;
                }
                self.legs[i].state = LegState::Answered;
                self.phase = Phase::Bridged(i);
                for j in 0..self.legs.len() {
                    if j != i && self.legs[j].generation == self.generation {
                        self.cancel_leg(now, j);
                    }
                }
                self.exec.dial_finished(DialStatus::Answer, Some(status));
                let user = self.legs[i].user.clone();
                self.log(LogLevel::Verbose, format!("{user} answered"));
                let sdp = (!msg.body.is_empty())
                    .then(|| Sdp::parse(&msg.body).ok())
                    .flatten();
                let transferred = self.transferring();
                self.watch_feature_keys(sdp.as_ref());
                let body = sdp.map(|sdp| {
                    self.learn_media(Side::B, &sdp);
                    if transferred {
                        // The transferee keeps the description it has (the target
                        // was offered its codecs): no new one is sent to it.
                        self.sdp_sent[0].0 = String::from_utf8_lossy(&msg.body).into_owned();
                        Vec::new()
                    } else {
                        self.anchored_for(Side::A, &sdp, &msg.body)
                    }
                });
                self.out
                    .push_back(Output::Media(MediaOp::Mode(Mode::Bridge)));
                if !self.a.final_sent {
                    self.answer_a(now, body.as_deref());
                }
                if let Some(d) = self.dial.as_ref().and_then(|d| d.max_duration) {
                    self.hangup_at = Some(now + d);
                }
                if transferred {
                    self.transfer_succeeded(now);
                }
                self.record(now, Some(i));
            }
            _ => {
                self.legs[i].state = LegState::Done(status);
                if current && status == 503 {
                    return self.fail_over(now, i, "answered 503");
                }
                if current {
                    self.check_dial(now);
                }
            }
        }
    }

    /// Leg `i`'s destination failed (silence, Timer B, 503 or a transport error, said by
    /// `why`): the same request to the next alternate, as a new leg of the same Dial;
    /// none left: the Dial goes on.
    fn fail_over(&mut self, now: Instant, i: usize, why: &str) {
        let failed = self.legs[i].dialog.dest.clone();
        self.out.push_back(Output::TargetFailed(failed.clone()));
        let mut next = self.legs[i].target.clone();
        if next.alternates.is_empty() || self.legs[i].cancel != Cancel::No {
            return self.check_dial(now);
        }
        next.dest = next.alternates.remove(0);
        self.log(
            LogLevel::Notice,
            format!(
                "{} {why} for {}: trying {}",
                failed.describe(),
                next.uri,
                next.dest.describe()
            ),
        );
        let req = self.dial.clone().unwrap_or_default();
        self.start_leg(now, next, &req);
    }

    /// A message to `dest` could not be sent (connection refused or reset, TLS
    /// handshake failed): RFC 3263 §4.3 treats it like a 503, so a leg still waiting for
    /// its first response there moves on to the next target at once.
    pub fn on_transport_error(&mut self, now: Instant, dest: &D) {
        // A leg this call is being moved to cannot be reached from here.
        if let Some(p) = self
            .pending
            .iter_mut()
            .find(|p| p.reanchor && !p.answered && &p.dest == dest)
        {
            p.answered = true;
            let leg = p.leg;
            self.log(
                LogLevel::Notice,
                format!("{}: transport error", dest.describe()),
            );
            self.on_reanchor_answer(now, leg, 0, &[]);
        }
        for i in 0..self.legs.len() {
            let leg = &self.legs[i];
            if leg.state == LegState::Trying && &leg.dialog.dest == dest {
                self.legs[i].state = LegState::Done(503);
                self.legs[i].failover_at = None;
                if self.legs[i].generation == self.generation {
                    self.log(
                        LogLevel::Notice,
                        format!("{}: transport error", dest.describe()),
                    );
                    self.fail_over(now, i, "could not be reached");
                }
            }
        }
    }

    // ----- media and timers ---------------------------------------------------------

    pub fn on_media(&mut self, now: Instant, notice: MediaNotice) {
        match notice {
            MediaNotice::PlaybackDone if self.phase == Phase::Playing => {
                self.phase = Phase::Running;
                self.run(now);
            }
            MediaNotice::PlaybackDone if self.phase == Phase::Prompting => {
                let step = self.exec.prompts_done();
                self.collected(now, step);
            }
            MediaNotice::PlaybackDone if self.phase == Phase::Voicemail => {
                if let Some(v) = self.vm.as_mut() {
                    v.on_played(now);
                }
                self.pump_voicemail(now);
            }
            MediaNotice::RecordingFull if self.phase == Phase::Voicemail => {
                if let Some(v) = self.vm.as_mut() {
                    v.on_recording_full();
                }
                self.pump_voicemail(now);
            }
            MediaNotice::PlaybackDone | MediaNotice::RecordingFull => {}
            MediaNotice::Digit(side, d) if matches!(self.phase, Phase::Bridged(_)) => {
                self.feature_key(now, side, d)
            }
            MediaNotice::Digit(Side::A, d) => self.on_digit(now, d),
            MediaNotice::Digit(Side::B, _) => {}
            MediaNotice::NoMedia => {
                // As Asterisk's rtptimeout: whatever the call is doing with the caller.
                if matches!(
                    self.phase,
                    Phase::Bridged(_)
                        | Phase::Echo
                        | Phase::Music(_)
                        | Phase::Playing
                        | Phase::Prompting
                        | Phase::Collecting(_)
                        | Phase::Voicemail
                ) {
                    self.log(LogLevel::Notice, "no media: call ended".into());
                    // Q.850 41, temporary failure: what Asterisk's rtptimeout uses.
                    self.hangup(now, 41, None);
                }
            }
        }
    }

    /// Hangs up from outside (admin, node shutdown).
    /// The caller's id and the dialplan context the call runs in now (for its record).
    pub fn cdr_parties(&self) -> (String, String) {
        (self.exec.caller().clid(), self.exec.context().to_string())
    }

    /// How the call ended as Asterisk's CDR would say it, given the cause it ended
    /// with (see [`Disposition::of`]).
    pub fn disposition(&self, cause: u16) -> Disposition {
        Disposition::of(cause, self.a.answered, self.exec.var("DIALSTATUS"))
    }

    pub fn hangup_now(&mut self, now: Instant, cause: u16) {
        self.hangup(now, cause, None);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut take = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for l in &self.legs {
            take(l.tx.as_ref().and_then(ClientInvite::poll_timeout));
            if !matches!(l.state, LegState::Done(_)) {
                take(l.give_up_at);
                take(l.failover_at);
            }
            take(l.dialog.retransmit.as_ref().map(Retransmit2xx::deadline));
        }
        for p in &self.pending {
            take(match &p.tx {
                ClientTx::Invite(tx) => tx.poll_timeout(),
                ClientTx::NonInvite(tx) => tx.poll_timeout(),
            });
        }
        take(
            self.a
                .dialog
                .retransmit
                .as_ref()
                .map(Retransmit2xx::deadline),
        );
        match self.phase {
            Phase::Dialing { deadline } => take(deadline),
            Phase::Waiting(at) | Phase::Collecting(at) => take(Some(at)),
            Phase::Music(at) => take(at),
            Phase::Referring { until, .. } => take(Some(until)),
            Phase::Voicemail => take(self.vm.as_ref().and_then(|v| v.poll_timeout())),
            _ => {}
        }
        if self.phase != Phase::Ended {
            take(self.hangup_at);
            for (at, _) in &self.transferor_bye {
                take(Some(*at));
            }
            take(self.keys.deadline());
            for (at, _) in &self.reanchor_retry {
                take(Some(*at));
            }
        }
        t
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..self.legs.len() {
            let outcome = self.legs[i]
                .tx
                .as_mut()
                .map_or(TimerOutcome::Idle, |tx| tx.handle_timeout(now));
            match outcome {
                // A leg given up for the next target stops retransmitting.
                TimerOutcome::Retransmit(_) if self.legs[i].state == LegState::Done(0) => {}
                TimerOutcome::Retransmit(bytes) => {
                    let dest = self.legs[i].dialog.dest.clone();
                    self.out.push_back(Output::Send { dest, bytes });
                }
                TimerOutcome::TimedOut => {
                    if !matches!(self.legs[i].state, LegState::Done(_)) {
                        // Timer B: nothing answered at all.
                        self.legs[i].state = LegState::Done(0);
                        if self.legs[i].generation == self.generation {
                            self.fail_over(now, i, "did not answer");
                        }
                    }
                }
                TimerOutcome::Idle | TimerOutcome::Terminated => {}
            }
            if self.legs[i].failover_at.is_some_and(|at| now >= at)
                && self.legs[i].state == LegState::Trying
            {
                self.legs[i].failover_at = None;
                self.legs[i].state = LegState::Done(0);
                if self.legs[i].generation == self.generation {
                    self.fail_over(now, i, "did not answer");
                }
            }
            if self.legs[i].give_up_at.is_some_and(|at| now >= at)
                && !matches!(self.legs[i].state, LegState::Done(_))
            {
                self.legs[i].state = LegState::Done(0);
            }
            self.dialog_timer(now, LegRef::B(i));
        }
        self.dialog_timer(now, LegRef::A);
        let mut k = 0;
        while k < self.pending.len() {
            let outcome = match &mut self.pending[k].tx {
                ClientTx::Invite(tx) => tx.handle_timeout(now),
                ClientTx::NonInvite(tx) => tx.handle_timeout(now),
            };
            match outcome {
                TimerOutcome::Retransmit(bytes) => {
                    let dest = self.pending[k].dest.clone();
                    self.out.push_back(Output::Send { dest, bytes });
                    k += 1;
                }
                TimerOutcome::TimedOut | TimerOutcome::Terminated => {
                    let p = self.pending.remove(k);
                    if p.then_bye && !p.answered {
                        self.bye_transferor(now, p.leg);
                    }
                    if let Some(o) = p.origin {
                        // The other leg never answered the relayed request.
                        self.respond_to(&o, 408, &[], None);
                    }
                    if p.reanchor && !p.answered {
                        self.on_reanchor_answer(now, p.leg, 0, &[]);
                    }
                }
                TimerOutcome::Idle => k += 1,
            }
        }
        match self.phase {
            Phase::Dialing { deadline: Some(at) } if now >= at => {
                self.dial_failed(now, DialStatus::NoAnswer, None)
            }
            Phase::Waiting(at) if now >= at => {
                self.phase = Phase::Running;
                self.run(now);
            }
            Phase::Referring { until, .. } if now >= until => {
                self.transfer_app_done(now, "FAILURE", None);
            }
            Phase::Music(Some(at)) if now >= at => {
                let stream = self.app_stream();
                self.out
                    .push_back(Output::Media(MediaOp::StopPlay { stream }));
                self.phase = Phase::Running;
                self.run(now);
            }
            Phase::Collecting(at) if now >= at => {
                if std::mem::take(&mut self.music_waiting) {
                    let stream = self.app_stream();
                    self.out
                        .push_back(Output::Media(MediaOp::StopPlay { stream }));
                }
                let step = self.exec.collect_timeout();
                self.collected(now, step);
            }
            Phase::Voicemail => {
                if let Some(v) = self.vm.as_mut() {
                    v.on_timeout(now);
                }
                self.pump_voicemail(now);
            }
            _ => {}
        }
        self.retry_reanchor(now);
        self.transferor_bye_due(now);
        if self.keys.deadline().is_some_and(|at| now >= at) {
            self.keyed_transfer();
        }
        if self.hangup_at.is_some_and(|at| now >= at) && self.phase != Phase::Ended {
            self.hangup_at = None;
            self.hangup(now, 16, None);
        }
    }

    fn dialog_timer(&mut self, now: Instant, leg: LegRef) {
        let timers = self.p.timers;
        match self.dialog_mut(leg).retransmit_due(now, &timers) {
            RetransmitDue::Idle => {}
            RetransmitDue::Resend(bytes) => {
                let dest = self.dialog(leg).dest.clone();
                self.out.push_back(Output::Send { dest, bytes });
            }
            RetransmitDue::GaveUp => {
                // §13.3.1.4: no ACK for our 2xx: the dialog ends with a BYE.
                self.log(LogLevel::Notice, "no ACK for 2xx: call ended".into());
                if leg == LegRef::A {
                    self.a.answered = true;
                }
                self.hangup(now, 41, None);
            }
        }
    }
}

/// The key a SIP INFO carries: `application/dtmf-relay` (`Signal=5`, Cisco's format
/// most phones use) or `application/dtmf` (the key alone).
pub(crate) fn info_digit(content_type: &str, body: &[u8]) -> Option<char> {
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let body = std::str::from_utf8(body).ok()?;
    let key = match ct.as_str() {
        "application/dtmf-relay" => body.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            k.trim().eq_ignore_ascii_case("signal").then(|| v.trim())
        })?,
        "application/dtmf" => body.trim(),
        _ => return None,
    };
    let mut chars = key.chars();
    let c = chars.next()?;
    if chars.next().is_some() {
        // Some phones send the event number (10 for *, 11 for #).
        return key
            .parse::<u8>()
            .ok()
            .and_then(pbx_media_core::dtmf::digit_of);
    }
    let c = c.to_ascii_uppercase();
    matches!(c, '0'..='9' | '*' | '#' | 'A'..='D').then_some(c)
}

/// 0 for the caller's side, 1 for the callee's.
fn side_index(side: Side) -> usize {
    if side == Side::A {
        0
    } else {
        1
    }
}

/// RFC 3261 §16.7 step 6, as Asterisk reports a failed Dial: busy wins (someone is
/// there), then 6xx, then the lowest 4xx, 5xx, 3xx.
fn best_failure(codes: &[u16]) -> Option<u16> {
    if let Some(b) = codes.iter().find(|c| matches!(c, 486 | 600)) {
        return Some(*b);
    }
    let class = |lo: u16, hi: u16| codes.iter().copied().filter(|c| (lo..hi).contains(c)).min();
    class(600, 700)
        .or_else(|| class(400, 500))
        .or_else(|| class(500, 600))
        .or_else(|| class(300, 400))
}

fn leg_record<D: Destination>(
    d: &Dialog<D>,
    contact: String,
    sdp_sent: &str,
    media_targets: &[Option<SocketAddr>],
) -> LegRecord {
    LegRecord {
        contact,
        sdp_sent: sdp_sent.to_string(),
        media_targets: media_targets.to_vec(),
        call_id: d.call_id.clone(),
        local: d.local.clone(),
        remote: d.remote.clone(),
        remote_target: d.remote_target.clone(),
        route_set: d.route_set.clone(),
        local_cseq: d.local_cseq,
        remote_cseq: d.remote_cseq,
        peer: d.dest.describe(),
        transport: d.dest.transport(),
        // The node knows the phone's registration; it fills this in (pbx_endpoint).
        instance: None,
    }
}
