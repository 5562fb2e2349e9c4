//! The call layer of a node: one task per call driving a [`pbx_b2bua::Call`], its relay
//! streams and its timers. The SIP decisions (admission, which contacts to ring) are the
//! endpoint's ([`pbx_endpoint`]); messages reach a call through the endpoint's routes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pbx_b2bua::{
    Call, CallParams, Contact, HandOver, MediaNotice, MediaOp, MediaPorts, Output, Replaces,
};
use pbx_dialplan::{DialTarget, LogLevel};
use pbx_dns::locate::{DeadTargets, Destination, SipTransport, SplitMix, Target};
use pbx_endpoint::{lock, CallMessage, Dest, Endpoint, NewCall, Refused, SkipReason};
use pbx_media::{MediaConfig, MediaEvent, MediaRelay, Stream};
use pbx_media_core::Mode;
use pbx_peer::{BoxFuture, CallMedia, Cluster, MediaCounters};
use pbx_sdp::Sdp;
use pbx_sip_core::{Timers, TransactionKey};
use pbx_state::{Command, Transport};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::Instrument;

use crate::config::Config;
use crate::transport::Io;
use crate::{unix_ms, NodeError};

/// A call's input queue: the endpoint's handle on a running call.
pub(crate) type CallTx = mpsc::UnboundedSender<CallInput>;
/// The node's SIP endpoint.
pub(crate) type SipEndpoint = Endpoint<CallTx>;

/// What a call's task is told.
// Most inputs are SIP messages: boxing them would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
pub(crate) enum CallInput {
    /// A request or response of the call, routed by Call-ID.
    Sip(CallMessage),
    /// The answer to an asynchronous [`Output::Resolve`] (a target in another domain).
    Resolved {
        contacts: Vec<Contact<Dest>>,
        unreachable: u16,
    },
    /// A request to this destination could not be sent (no connection, TLS failed).
    TransportError(Dest),
    /// From the admin API: the media counters, and hang up with `hangup`.
    Control {
        hangup: bool,
        reply: oneshot::Sender<Vec<MediaCounters>>,
    },
    /// The call runs elsewhere now, or must not run here any more (fencing): stop
    /// without a word to the phones, keeping the relay running for `grace` (so media
    /// flows until the new owner's re-INVITEs have moved the phones).
    Release { grace: Duration },
    /// Another call's attended transfer takes the far party of this call's dialog
    /// `replaces` names ([`Call::hand_over`]).
    HandOver {
        replaces: Replaces,
        /// The call taking the party over: its dialog's messages go there at once.
        to: mpsc::UnboundedSender<CallInput>,
        reply: oneshot::Sender<Result<HandOver<Dest>, String>>,
    },
    /// The answer to this call's [`Output::Replace`].
    HandedOver(Result<HandOver<Dest>, String>),
    /// The answer to this call's [`Output::Voicemail`].
    Voicemail(pbx_b2bua::VmReply),
}

/// What became of a call this process ran (see [`CallLayer::fate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    Running,
    /// Ended here (its end is on its way to the replicated state).
    Ended,
    /// Stopped without ending: it is someone else's now, or must become so.
    Released,
}

/// How long the fate of a call that ended or left is kept once it is not recorded:
/// longer than its records can take to be committed (the record writer tries for ~20 s).
const FATE_MEMORY: Duration = Duration::from_secs(60);

/// Q.850 cause of a call hung up by an operator (normal clearing, as Asterisk's
/// `channel request hangup`).
const CAUSE_ADMIN_HANGUP: u16 = 16;

/// The node's side of the `CallControl` peer RPC and of the local admin API.
pub(crate) struct CallControlHook(pub(crate) Weak<CallLayer>);

impl pbx_peer::CallControl for CallControlHook {
    fn calls(&self, call_ids: Vec<String>, hangup: bool) -> BoxFuture<Vec<CallMedia>> {
        let layer = self.0.upgrade();
        Box::pin(async move {
            let Some(layer) = layer else {
                return Vec::new();
            };
            let mut asked = Vec::new();
            for id in call_ids {
                if let Some(tx) = layer.endpoint.call(&id) {
                    let (reply, rx) = oneshot::channel();
                    if tx.send(CallInput::Control { hangup, reply }).is_ok() {
                        asked.push((id, rx));
                    }
                }
            }
            let mut out = Vec::new();
            for (call_id, rx) in asked {
                // A call that ended meanwhile drops the sender: left out.
                if let Ok(streams) = rx.await {
                    out.push(CallMedia { call_id, streams });
                }
            }
            out
        })
    }
}

/// Loaded prompts by (name, payload type); `None`: no such file.
type PromptCache = HashMap<(String, u8), Option<Arc<[u8]>>>;

pub(crate) struct CallLayer {
    node_id: u64,
    endpoint: Arc<SipEndpoint>,
    io: Arc<Io>,
    cluster: Cluster,
    /// Wakes the endpoint's timer when a call's response started a sooner timer.
    wake: Arc<Notify>,
    relay: Option<MediaRelay>,
    /// Calls started, answered and ended, and their set-up times (metrics).
    counts: Arc<crate::metrics::NodeCounts>,
    /// How long the cluster keeps call detail records (in each record's command).
    cdr_keep: pbx_state::CdrKeep,
    sounds_dir: PathBuf,
    /// The dialplan's default time zone (`[calls] timezone`, resolved at start).
    timezone: String,
    prompts: Mutex<PromptCache>,
    seed: AtomicU64,
    /// Call records on their way to the replicated state ([`record_writer`]).
    records: mpsc::UnboundedSender<Command>,
    /// The RFC 3263 client for targets in other domains (made on first use).
    resolver: tokio::sync::OnceCell<Option<Arc<pbx_resolver::SipResolver>>>,
    resolvers: Vec<SocketAddr>,
    /// Servers that timed out or answered 503 recently: tried last.
    dead: Mutex<DeadTargets>,
    /// The answered calls this process ran, by id: the record's epoch, what became of
    /// the call (ADR 0010) and since when.
    fates: Mutex<HashMap<String, (u32, Fate, Instant)>>,
    domain: String,
}

impl CallLayer {
    pub(crate) fn new(
        config: &Config,
        endpoint: Arc<SipEndpoint>,
        io: Arc<Io>,
        cluster: Cluster,
        wake: Arc<Notify>,
        counts: Arc<crate::metrics::NodeCounts>,
    ) -> Result<CallLayer, NodeError> {
        let c = &config.calls;
        let relay = if c.relay_media {
            let relay = MediaRelay::new(MediaConfig {
                ip: c.rtp_ip.unwrap_or(io.local_addr.ip()),
                port_min: c.rtp_port_min,
                port_max: c.rtp_port_max,
                no_media_timeout: if c.no_media_timeout == 0 {
                    Duration::from_secs(u64::from(u32::MAX))
                } else {
                    Duration::from_secs(c.no_media_timeout)
                },
                threads: c.relay_threads,
                batch_window: Duration::from_micros(c.relay_batch_us),
            })
            .map_err(|e| NodeError::Media(e.to_string()))?;
            Some(relay)
        } else {
            None
        };
        let (records, rx) = mpsc::unbounded_channel();
        tokio::spawn(record_writer(cluster.clone(), rx));
        Ok(CallLayer {
            records,
            node_id: config.node.id,
            endpoint,
            io,
            cluster,
            wake,
            relay,
            counts,
            cdr_keep: config.cdr.keep(),
            sounds_dir: config.resolve(&c.sounds_dir),
            timezone: c.time_zone(),
            prompts: Mutex::new(HashMap::new()),
            seed: AtomicU64::new(rand::random::<u64>() & !0xffff | config.node.id),
            resolver: tokio::sync::OnceCell::new(),
            resolvers: config.dns.resolvers.clone(),
            dead: Mutex::new(DeadTargets::new(Duration::from_secs(
                config.dns.dead_target_secs,
            ))),
            fates: Mutex::new(HashMap::new()),
            domain: config.cluster.domain.clone(),
        })
    }

    pub(crate) fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The media relay (None: media goes phone to phone).
    pub(crate) fn relay(&self) -> Option<&MediaRelay> {
        self.relay.as_ref()
    }

    /// What became of call `id` in this process, at which epoch of its record.
    pub(crate) fn fate(&self, id: &str) -> Option<(u32, Fate)> {
        lock(&self.fates)
            .get(id)
            .map(|(epoch, fate, _)| (*epoch, *fate))
    }

    fn set_fate(&self, id: &str, epoch: u32, fate: Fate) {
        lock(&self.fates).insert(id.to_string(), (epoch, fate, Instant::now()));
    }

    /// Forgets the fates of calls that are not running, not recorded, and settled for
    /// [`FATE_MEMORY`]: a call that ended before its answer record was committed must
    /// not look, once that record lands, like a call of this node nobody runs (which
    /// the survival watcher would adopt).
    pub(crate) fn forget_fates(&self, recorded: impl Fn(&str) -> bool) {
        lock(&self.fates).retain(|id, (_, f, at)| {
            *f == Fate::Running || recorded(id) || at.elapsed() < FATE_MEMORY
        });
    }

    /// Stops call `id` without a word to the phones (see [`CallInput::Release`]).
    pub(crate) fn release(&self, id: &str, grace: Duration) -> bool {
        let Some(tx) = self.endpoint.call(id) else {
            return false;
        };
        tx.send(CallInput::Release { grace }).is_ok()
    }

    /// The answered calls running here.
    pub(crate) fn running(&self) -> Vec<String> {
        lock(&self.fates)
            .iter()
            .filter(|(_, (_, f, _))| *f == Fate::Running)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Sends a call's response through its server transaction `key`.
    fn respond(&self, key: &TransactionKey, status: u16, bytes: Bytes) {
        self.send_answer(self.endpoint.respond(Instant::now(), key, status, bytes));
    }

    /// Sends what the endpoint answered through a server transaction, and wakes the
    /// endpoint's timer when that answer started a sooner one (Timer G).
    fn send_answer(&self, answer: Option<pbx_endpoint::Transmit>) {
        if let Some(t) = answer {
            self.io.send(t.dest, t.bytes);
        }
        if self.endpoint.take_timers_moved() {
            self.wake.notify_one();
        }
    }

    /// The prompts as one G.711 stream (`pt` 0: .ulaw, 8: .alaw); missing files are
    /// skipped with a warning.
    fn prompt_audio(&self, names: &[String], pt: u8) -> Arc<[u8]> {
        let ext = if pt == 8 { "alaw" } else { "ulaw" };
        let mut audio = Vec::new();
        for name in names {
            let mut cache = lock(&self.prompts);
            let entry = cache.entry((name.clone(), pt)).or_insert_with(|| {
                let path = self.sounds_dir.join(format!("{name}.{ext}"));
                match std::fs::read(&path) {
                    Ok(b) => Some(b.into()),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "prompt not found");
                        None
                    }
                }
            });
            if let Some(a) = entry {
                audio.extend_from_slice(a);
            }
        }
        audio.into()
    }
}

impl CallLayer {
    /// The music of on-hold class `class`: every `.ulaw` (`pt` 0) or `.alaw` file of
    /// `sounds_dir/moh/<class>/`, in name order, as one stream (cached, like prompts).
    fn music_audio(&self, class: &str, pt: u8) -> Arc<[u8]> {
        let ext = if pt == 8 { "alaw" } else { "ulaw" };
        // Not a prompt name (those never start with NUL): the two never collide.
        let key = (format!("\0moh/{class}"), pt);
        let mut cache = lock(&self.prompts);
        let entry = cache.entry(key).or_insert_with(|| {
            // A class is a plain name, never a path.
            if class.is_empty()
                || !class
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                tracing::warn!(class, "music on hold: not a class name");
                return None;
            }
            let dir = self.sounds_dir.join("moh").join(class);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|d| {
                    d.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|e| e == ext))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            let mut audio = Vec::new();
            for f in &files {
                match std::fs::read(f) {
                    Ok(b) => audio.extend_from_slice(&b),
                    Err(e) => tracing::warn!(path = %f.display(), error = %e, "music on hold file"),
                }
            }
            if audio.is_empty() {
                tracing::warn!(dir = %dir.display(), "music on hold: no .{ext} files for this class");
                return None;
            }
            Some(audio.into())
        });
        entry.clone().unwrap_or_else(|| Arc::from(Vec::new()))
    }
}

/// Starts a call the endpoint admitted: opens its relay streams (or refuses it, 503,
/// when no ports are free) and its task.
pub(crate) fn start_call(layer: &Arc<CallLayer>, new: NewCall) {
    // One relay stream per m-line the caller offers (at least one, for our own offer).
    let n = Sdp::parse(&new.msg.body).map_or(1, |s| s.media.len().max(1));
    let (streams, media) = match open_streams(layer, n) {
        Ok(opened) => opened,
        Err(e) => {
            tracing::warn!(error = %e, "no RTP ports: 503");
            layer.send_answer(
                layer
                    .endpoint
                    .refuse(Instant::now(), &new, &Refused::NoMediaPorts),
            );
            return;
        }
    };
    let NewCall {
        msg,
        core,
        key,
        source,
        dest,
        caller,
        exten,
        secure,
        domain,
        exec,
        replaces,
    } = new;
    // One reading for the call's clock and its record's start: the answer time is
    // this plus the monotonic time since, so it is never before the start (two readings
    // could straddle a millisecond and put the start after a quick answer).
    let start_ms = unix_ms();
    let params = CallParams {
        node_id: layer.node_id,
        local: layer.io.local_addr,
        tls_local: layer.io.tls_addr,
        domain,
        server_name: layer.endpoint.server_name().to_string(),
        timers: Timers::default(),
        seed: layer.seed.fetch_add(1 << 16, Ordering::Relaxed),
        media,
        caller_user: caller.clone(),
        now_ms: start_ms,
        timezone: layer.timezone.clone(),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    layer.endpoint.start_call(&core.call_id, tx.clone());
    let call = match replaces {
        Some(r) => Call::replacing(
            Instant::now(),
            params,
            &msg,
            &core,
            key,
            source,
            dest,
            exec,
            r,
        ),
        None => Call::new(Instant::now(), params, &msg, &core, key, source, dest, exec),
    };
    tracing::info!(%caller, %exten, "call started");
    layer.counts.calls.started.fetch_add(1, Ordering::Relaxed);
    let span = tracing::Span::current();
    let (clid, dcontext) = call.cdr_parties();
    let start = Some((
        Instant::now(),
        pbx_state::CdrStart {
            uniqueid: core.call_id.clone(),
            start_ms,
            answer_ms: 0,
            src: caller,
            clid,
            dst: exten,
            dcontext,
        },
    ));
    tokio::spawn(run_call(layer.clone(), call, tx, rx, streams, secure, start).instrument(span));
}

/// The task of one call: feeds it messages, timer ticks and media events, carries out
/// what it asks for.
async fn run_call(
    layer: Arc<CallLayer>,
    mut call: Call<Dest>,
    tx: mpsc::UnboundedSender<CallInput>,
    mut rx: mpsc::UnboundedReceiver<CallInput>,
    mut streams: Vec<Stream>,
    secure: bool,
    start: Option<(Instant, pbx_state::CdrStart)>,
) {
    let claimed = vec![call.id().to_string()];
    let (media_tx, mut media_rx) = mpsc::unbounded_channel();
    for s in streams.iter_mut() {
        if let Some(mut ev) = s.take_events() {
            let media_tx = media_tx.clone();
            tokio::spawn(async move {
                while let Some(e) = ev.recv().await {
                    if media_tx.send(e).is_err() {
                        break;
                    }
                }
            });
        }
    }
    let mut task = CallTask {
        tx,
        claimed,
        streams,
        active: true,
        secure,
        start,
        answered_ms: None,
        play_seq: 0,
        recording: None,
    };
    let mut released = None;
    loop {
        while let Some(out) = call.poll_output() {
            carry_out(&layer, &mut call, out, &mut task);
        }
        if call.is_done() {
            break;
        }
        let deadline = call
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            input = rx.recv() => {
                let now = Instant::now();
                match input {
                    Some(CallInput::Sip(CallMessage::Request { msg, core, key, source })) => {
                        call.on_request(now, &msg, &core, key, source);
                    }
                    Some(CallInput::Sip(CallMessage::Response { msg, core })) => {
                        call.on_response(now, &msg, &core)
                    }
                    Some(CallInput::Resolved { contacts, unreachable }) => {
                        call.on_resolved(now, contacts, unreachable);
                    }
                    Some(CallInput::TransportError(dest)) => call.on_transport_error(now, &dest),
                    Some(CallInput::Control { hangup, reply }) => {
                        let _ = reply.send(task.streams.iter().map(|s| s.counters().into()).collect());
                        if hangup {
                            tracing::info!(call = call.id(), "hung up by an operator");
                            call.hangup_now(now, CAUSE_ADMIN_HANGUP);
                        }
                    }
                    Some(CallInput::HandOver { replaces, to, reply }) => {
                        let handed = call.hand_over(now, &replaces);
                        if let Ok(h) = &handed {
                            // Its dialog is the other call's now: routed there before
                            // anything else of it arrives, and not unrouted when this
                            // call ends.
                            layer.endpoint.claim_call_id(h.call_id(), to);
                            task.claimed.retain(|id| id != h.call_id());
                        }
                        if let Err(Ok(h)) = reply.send(handed) {
                            // The other call ended while asking: the party is nobody's.
                            tracing::warn!(call = call.id(), party = h.call_id(), "a party handed over was lost: its call ended");
                            layer.endpoint.release_call_ids([&h.call_id().to_string()]);
                        }
                    }
                    Some(CallInput::HandedOver(handed)) => call.on_handover(now, handed),
                    Some(CallInput::Voicemail(reply)) => call.on_voicemail(now, reply),
                    Some(CallInput::Release { grace }) => {
                        released = Some(grace);
                        break;
                    }
                    None => break,
                }
            }
            Some(ev) = media_rx.recv() => {
                let notice = match ev {
                    MediaEvent::NoMedia => MediaNotice::NoMedia,
                    MediaEvent::PlaybackDone(id) if id == task.play_seq => MediaNotice::PlaybackDone,
                    MediaEvent::PlaybackDone(_) => continue,
                    MediaEvent::Digit(side, d) => MediaNotice::Digit(side, d),
                    MediaEvent::RecordingFull => MediaNotice::RecordingFull,
                };
                call.on_media(Instant::now(), notice);
            }
            _ = tokio::time::sleep_until(deadline.into()) => call.handle_timeout(Instant::now()),
        }
    }
    if task.active {
        layer.endpoint.call_ended();
    }
    layer.endpoint.release_call_ids(&task.claimed);
    if let Some(grace) = released {
        tracing::info!(
            call = call.id(),
            epoch = call.epoch(),
            "call released: it runs elsewhere"
        );
        layer.set_fate(call.id(), call.epoch(), Fate::Released);
        // Make before break: the relay keeps forwarding while the new owner moves the
        // phones (a drained node's calls); none at all for a fenced node.
        let streams = std::mem::take(&mut task.streams);
        if !grace.is_zero() && !streams.is_empty() {
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                drop(streams);
            });
        }
    }
}

/// What the task of one call keeps beside the call itself.
struct CallTask {
    /// The call's own input queue (for answers that come later, like DNS).
    tx: mpsc::UnboundedSender<CallInput>,
    /// Call-IDs routed to this call.
    claimed: Vec<String>,
    streams: Vec<Stream>,
    /// Still counted in the node's active calls.
    active: bool,
    /// A `sips:` call: only TLS targets.
    secure: bool,
    /// When the INVITE of a call started here came in, and what its record needs of
    /// it (None for a call adopted from another node: its start is in the cluster).
    start: Option<(Instant, pbx_state::CdrStart)>,
    /// When this node saw it answered (unix ms).
    answered_ms: Option<u64>,
    /// The latest prompt or music started: a PlaybackDone of an earlier prompt (in
    /// flight when a key stopped it) is not the call's business.
    play_seq: u32,
    /// The stream recording for voicemail, until a request takes the recording.
    recording: Option<usize>,
}

fn carry_out(
    layer: &Arc<CallLayer>,
    call: &mut Call<Dest>,
    out: Output<Dest>,
    task: &mut CallTask,
) {
    let CallTask {
        tx,
        claimed,
        streams,
        active,
        secure,
        start,
        answered_ms,
        play_seq,
        recording,
    } = task;
    let secure = *secure;
    match out {
        Output::Respond { key, status, bytes } => layer.respond(&key, status, bytes),
        Output::Send { dest, bytes } => layer.io.send(dest, bytes),
        Output::Resolve(targets) => {
            let (contacts, unreachable) = resolve(layer, &targets, secure);
            let remote: Vec<(String, String)> = targets
                .iter()
                .filter_map(|t| match t {
                    DialTarget::Uri { user, host } => Some((user.clone(), host.clone())),
                    DialTarget::User(_) => None,
                })
                .collect();
            if remote.is_empty() {
                call.on_resolved(Instant::now(), contacts, unreachable);
            } else {
                // DNS takes time: the call gets the answer as an input.
                let layer = layer.clone();
                let tx = tx.clone();
                let seed = layer.seed.fetch_add(1 << 16, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut contacts = contacts;
                    for (user, host) in remote {
                        contacts.extend(resolve_remote(&layer, &user, &host, seed, secure).await);
                    }
                    let _ = tx.send(CallInput::Resolved {
                        contacts,
                        unreachable,
                    });
                });
            }
        }
        Output::TargetFailed(dest) => {
            let located = match dest {
                Dest::Udp(a) => Some((a, SipTransport::Udp)),
                Dest::Conn(_, a, Transport::Tcp) => Some((a, SipTransport::Tcp)),
                Dest::Conn(_, a, Transport::Tls) => Some((a, SipTransport::Tls)),
                _ => None,
            };
            if let Some((addr, transport)) = located {
                tracing::info!(call = call.id(), target = %addr, transport = transport.naptr_service(), "target failed: tried last for a while");
                let mut dead = lock(&layer.dead);
                // Phones' failures land here too: forget what has expired as we go.
                dead.expire(Instant::now());
                dead.mark_dead(
                    Target {
                        addr: addr.ip(),
                        port: addr.port(),
                        transport,
                    },
                    Instant::now(),
                );
            }
        }
        Output::ClaimCallId(id) => {
            layer.endpoint.claim_call_id(&id, tx.clone());
            claimed.push(id);
        }
        Output::Media(op) => match op {
            MediaOp::Remote { stream, side, addr } => {
                if let Some(s) = streams.get(stream) {
                    s.set_remote(side, addr);
                }
            }
            MediaOp::Mode(m) => streams.iter().for_each(|s| s.set_mode(m)),
            MediaOp::Play {
                stream,
                prompts,
                payload_type,
            } => {
                *play_seq += 1;
                match streams.get(stream) {
                    Some(s) => s.play(
                        layer.prompt_audio(&prompts, payload_type),
                        payload_type,
                        *play_seq,
                    ),
                    None => call.on_media(Instant::now(), MediaNotice::PlaybackDone),
                }
            }
            MediaOp::Music {
                stream,
                side,
                class,
                payload_type,
            } => {
                *play_seq += 1;
                if let Some(s) = streams.get(stream) {
                    let audio = layer.music_audio(&class, payload_type);
                    if !audio.is_empty() {
                        s.play_music(side, audio, payload_type);
                    }
                }
            }
            MediaOp::StopPlay { stream } => {
                *play_seq += 1;
                if let Some(s) = streams.get(stream) {
                    s.stop_play();
                }
            }
            MediaOp::DetectDtmf {
                stream,
                side,
                payload_type,
            } => {
                if let Some(s) = streams.get(stream) {
                    s.detect_dtmf(side, Some(payload_type));
                }
            }
            MediaOp::SwapSides => streams.iter_mut().for_each(Stream::swap_sides),
            MediaOp::PlayAudio {
                stream,
                audio,
                payload_type,
            } => {
                *play_seq += 1;
                match streams.get(stream) {
                    Some(s) => s.play(audio, payload_type, *play_seq),
                    None => call.on_media(Instant::now(), MediaNotice::PlaybackDone),
                }
            }
            MediaOp::Record {
                stream,
                side,
                payload_type,
                max_bytes,
            } => {
                if let Some(s) = streams.get(stream) {
                    s.record(side, payload_type, max_bytes);
                    *recording = Some(stream);
                }
            }
        },
        Output::Voicemail(req) => {
            // The recording goes with the request that keeps or drops it, taken before
            // the call's end stops the relay.
            let taken = match req {
                pbx_b2bua::VmRequest::Store { .. } | pbx_b2bua::VmRequest::Discard => recording
                    .take()
                    .and_then(|i| streams.get(i))
                    .map(Stream::take_recording),
                _ => None,
            };
            crate::voicemail::request(&layer.cluster, req, taken, tx.clone());
        }
        Output::Route {
            user,
            exten,
            caller,
        } => {
            let route = {
                let state = layer.cluster.read();
                layer.endpoint.transfer_route(&state, &user, &exten, caller)
            };
            call.on_route(Instant::now(), route);
        }
        Output::Replace(replaces) => {
            // The replaced dialog's call runs on this node (a phone keeps both calls on
            // the node it uses); its task hands the party over.
            let Some(other) = layer.endpoint.call(&replaces.call_id) else {
                return call.on_handover(
                    Instant::now(),
                    Err("the replaced call is not on this node".into()),
                );
            };
            let (reply, answer) = oneshot::channel();
            let to = tx.clone();
            if other
                .send(CallInput::HandOver {
                    replaces,
                    to,
                    reply,
                })
                .is_err()
            {
                return call.on_handover(Instant::now(), Err("the replaced call ended".into()));
            }
            let me = tx.clone();
            tokio::spawn(async move {
                // A call task answers at once; this only guards against one stuck.
                let handed = match tokio::time::timeout(Duration::from_secs(10), answer).await {
                    Ok(Ok(handed)) => handed,
                    _ => Err("the replaced call did not answer".into()),
                };
                let _ = me.send(CallInput::HandedOver(handed));
            });
        }
        Output::Log { level, message } => match level {
            LogLevel::Error => tracing::error!(call = call.id(), "{message}"),
            LogLevel::Warning => tracing::warn!(call = call.id(), "{message}"),
            LogLevel::Notice | LogLevel::Verbose => tracing::info!(call = call.id(), "{message}"),
            LogLevel::Debug => tracing::debug!(call = call.id(), "{message}"),
        },
        Output::Record(record) => {
            layer.set_fate(&record.id, record.epoch, Fate::Running);
            let first = answered_ms.is_none();
            let answer_ms = *answered_ms.get_or_insert(record.answered_at_ms);
            let _ = layer.records.send(Command::CallAnswered(*record));
            if let (true, Some((started, info))) = (first, start.as_ref()) {
                let c = &layer.counts.calls;
                c.answered.fetch_add(1, Ordering::Relaxed);
                c.setup.observe(started.elapsed().as_secs_f64());
                // With its first record: what an adopter needs for the call's CDR.
                let _ = layer.records.send(Command::CdrOpened(pbx_state::CdrStart {
                    answer_ms,
                    ..info.clone()
                }));
            }
        }
        Output::Ended { cause, answered } => {
            let disposition = call.disposition(cause);
            tracing::info!(
                call = call.id(),
                cause,
                answered,
                disposition = disposition.cdr_name(),
                "call ended"
            );
            layer.counts.calls.ended(disposition);
            if *active {
                *active = false;
                layer.endpoint.call_ended();
            }
            // Dropping the streams stops the relay and frees the ports.
            streams.clear();
            if answered {
                layer.set_fate(call.id(), call.epoch(), Fate::Ended);
            }
            let cdr = call_record(
                layer,
                call,
                start.as_ref().map(|s| &s.1),
                answered.then_some(*answered_ms).flatten(),
                cause,
                disposition,
            );
            let _ = layer.records.send(Command::CallFinished {
                cdr,
                owner: answered.then_some(layer.node_id),
                epoch: call.epoch(),
                keep: layer.cdr_keep,
            });
        }
    }
}

/// The call's detail record as this node knows it at its end: from its start when it
/// ran it from the start, else what the cluster's record of the call says (the state
/// machine completes it from the start details the first node committed). `answer_ms`:
/// None for a call that was not answered.
fn call_record(
    layer: &CallLayer,
    call: &Call<Dest>,
    start: Option<&pbx_state::CdrStart>,
    answer_ms: Option<u64>,
    cause: u16,
    disposition: pbx_dialplan::Disposition,
) -> pbx_state::Cdr {
    let (history, recorded) = {
        let st = layer.cluster.read();
        match st.calls.get(call.id()) {
            Some(r) => (
                r.history.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
                Some((r.caller.clone(), r.callee.clone())),
            ),
            None => (Vec::new(), None),
        }
    };
    let mut nodes = history;
    if nodes.last() != Some(&layer.node_id) {
        nodes.push(layer.node_id);
    }
    let (src, dst) = match (start, &recorded) {
        (Some(s), _) => (s.src.clone(), s.dst.clone()),
        (None, Some((caller, callee))) => (caller.clone(), callee.clone()),
        (None, None) => (String::new(), String::new()),
    };
    pbx_state::Cdr {
        uniqueid: call.id().to_string(),
        start_ms: start.map_or(0, |s| s.start_ms),
        answer_ms,
        end_ms: unix_ms(),
        src,
        clid: start.map(|s| s.clid.clone()).unwrap_or_default(),
        dst,
        dcontext: start.map(|s| s.dcontext.clone()).unwrap_or_default(),
        disposition: disposition.cdr_name().to_string(),
        hangup_cause: cause,
        nodes,
        seq: 0,
    }
}

/// Opens `n` relay streams (none without a relay): the streams and the ports the call
/// writes into its SDP. An error when the port pool is exhausted (the streams opened
/// are closed again).
fn open_streams(layer: &CallLayer, n: usize) -> Result<(Vec<Stream>, Option<MediaPorts>), String> {
    let Some(relay) = &layer.relay else {
        return Ok((Vec::new(), None));
    };
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        streams.push(relay.open(Mode::Bridge).map_err(|e| e.to_string())?);
    }
    let ports = MediaPorts {
        ip: relay.ip(),
        streams: streams.iter().map(|s| (s.port_a, s.port_b)).collect(),
    };
    Ok((streams, Some(ports)))
}

/// Starts a call adopted from its record (ADR 0010): opens its relay streams and its
/// task, which moves the phones here by re-INVITEs. False when it cannot (no ports, a
/// record that cannot be resumed): the call counts as released here, so the survival
/// watcher hands it on to another node.
pub(crate) fn start_resumed(layer: &Arc<CallLayer>, record: &pbx_state::CallRecord) -> bool {
    layer.set_fate(&record.id, record.epoch, Fate::Running);
    let (streams, media) = match open_streams(layer, pbx_b2bua::streams_needed(record)) {
        Ok(opened) => opened,
        Err(e) => {
            tracing::warn!(call = %record.id, error = %e, "no RTP ports to adopt a call: handed on");
            layer.set_fate(&record.id, record.epoch, Fate::Released);
            return false;
        }
    };
    let dests: Option<Vec<Dest>> = {
        let state = layer.cluster.read();
        record
            .legs
            .iter()
            .map(|l| pbx_endpoint::resume_dest(&state, l, layer.node_id, unix_ms()))
            .collect()
    };
    let params = CallParams {
        node_id: layer.node_id,
        local: layer.io.local_addr,
        tls_local: layer.io.tls_addr,
        domain: layer.domain.clone(),
        server_name: layer.endpoint.server_name().to_string(),
        timers: Timers::default(),
        seed: layer.seed.fetch_add(1 << 16, Ordering::Relaxed),
        media,
        caller_user: record.caller.clone(),
        now_ms: unix_ms(),
        timezone: layer.timezone.clone(),
    };
    let resumed = dests
        .ok_or_else(|| "a leg's address cannot be read".to_string())
        .and_then(|d| Call::resume(Instant::now(), params, record, d).map_err(|e| e.to_string()));
    let call = match resumed {
        Ok(call) => call,
        Err(e) => {
            tracing::warn!(call = %record.id, error = %e, "adopted call not resumed");
            layer.set_fate(&record.id, record.epoch, Fate::Released);
            return false;
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    layer.endpoint.start_call(&record.id, tx.clone());
    let span = tracing::info_span!("call", node = layer.node_id, call_id = %record.id, epoch = record.epoch);
    tokio::spawn(run_call(layer.clone(), call, tx, rx, streams, false, None).instrument(span));
    true
}

/// A target in another domain, located by RFC 3263 over UDP, TCP and (with CA roots)
/// TLS: the first server to try and the others as alternates, servers that failed
/// recently last. `host` may carry `;transport=udp|tcp|tls`; a `sips:` call (`secure`)
/// only goes over TLS. None when the domain resolves to nothing usable.
async fn resolve_remote(
    layer: &Arc<CallLayer>,
    user: &str,
    host: &str,
    seed: u64,
    secure: bool,
) -> Option<Contact<Dest>> {
    let resolver = layer
        .resolver
        .get_or_init(|| async {
            let made = if layer.resolvers.is_empty() {
                pbx_resolver::SipResolver::system()
            } else {
                pbx_resolver::SipResolver::with_servers(&layer.resolvers)
            };
            match made {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    tracing::error!(error = %e, "no DNS resolver: calls to other domains fail");
                    None
                }
            }
        })
        .await
        .clone()?;
    let (hostport, params) = host.split_once(';').unwrap_or((host, ""));
    let transport = params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("transport")
            .then(|| SipTransport::from_param(v.trim()))?
    });
    let (name, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()),
        _ => (hostport.to_string(), None),
    };
    let mut supported = vec![SipTransport::Udp, SipTransport::Tcp];
    if layer.io.tls_client() {
        supported.push(SipTransport::Tls);
    }
    let resolution = resolver
        .resolve(
            Destination {
                host: name.clone(),
                port,
                transport,
                sips: secure,
            },
            &supported,
        )
        .await;
    let targets = {
        let dead = lock(&layer.dead);
        resolution.targets(&mut SplitMix::new(seed), &dead, Instant::now())
    };
    let mut dests = Vec::new();
    for t in targets {
        let addr = SocketAddr::new(t.addr, t.port);
        match t.transport {
            _ if secure && t.transport != SipTransport::Tls => continue,
            SipTransport::Udp => dests.push(Dest::Udp(addr)),
            SipTransport::Tcp => dests.push(Dest::Conn(0, addr, Transport::Tcp)),
            SipTransport::Tls if layer.io.tls_client() => {
                // The certificate must name the domain called (RFC 5922 §4.1).
                layer.io.expect_tls_name(addr, &name);
                dests.push(Dest::Conn(0, addr, Transport::Tls));
            }
            _ => {}
        }
    }
    let mut dests = dests.into_iter();
    let Some(first) = dests.next() else {
        tracing::warn!(%user, %host, secure, "no SIP server found for the domain (RFC 3263)");
        return None;
    };
    let alternates: Vec<Dest> = dests.collect();
    tracing::info!(%user, %host, first = %pbx_b2bua::Destination::describe(&first), alternates = alternates.len(), "located (RFC 3263)");
    let scheme = if secure { "sips" } else { "sip" };
    Some(Contact {
        uri: format!("{scheme}:{user}@{hostport}"),
        dest: first,
        route: Vec::new(),
        user: user.to_string(),
        alternates,
        domain: Some(name),
    })
}

/// Most time call records wait to be batched into one Raft entry.
const RECORD_BATCH_WINDOW: Duration = Duration::from_millis(50);
const RECORD_BATCH_MAX: usize = 2000;

/// Replicates call records in the background, batched: at most one Raft entry per
/// [`RECORD_BATCH_WINDOW`] (plus the ones queued while a batch commits), and a call that
/// ended before its record left the node never reaches the log. A call never waits for
/// Raft; a batch that cannot be committed is retried, then dropped with a warning (the
/// records are the list of calls, not the calls: a stale one goes when its owner
/// restarts).
/// Names a record's connection-bound phones by their RFC 5626 instance, from their
/// bindings or the call's previous record: an adopter finds them by it on a new flow.
fn with_instances(cluster: &Cluster, r: &mut pbx_state::CallRecord) {
    if !r
        .legs
        .iter()
        .any(|l| l.transport.is_connection_bound() && l.instance.is_none())
    {
        return;
    }
    let state = cluster.read();
    let previous = state.calls.get(&r.id);
    let now = unix_ms();
    for (i, leg) in r.legs.iter_mut().enumerate() {
        let prev = previous
            .and_then(|p| p.legs.get(i))
            .filter(|p| p.call_id == leg.call_id);
        leg.instance = pbx_endpoint::leg_instance(&state, leg, prev, now);
    }
}

async fn record_writer(cluster: Cluster, mut rx: mpsc::UnboundedReceiver<Command>) {
    while let Some(first) = rx.recv().await {
        let mut batch: Vec<Option<Command>> = Vec::new();
        // Where each call's answer record and start details sit in this batch.
        let mut answered: HashMap<String, (usize, Option<usize>)> = HashMap::new();
        let mut add = |cmd: Command, batch: &mut Vec<Option<Command>>| match cmd {
            Command::CallFinished {
                cdr,
                owner,
                epoch,
                keep,
            } => {
                // Answered and ended within one batch: the answer never reaches the log
                // (unless it was adopted: the adopter's end must replace the old
                // record), only the call's detail record does.
                let owner = match answered.remove(&cdr.uniqueid) {
                    Some((i, opened)) if epoch == 0 => {
                        batch[i] = None;
                        if let Some(j) = opened {
                            batch[j] = None;
                        }
                        None
                    }
                    _ => owner,
                };
                batch.push(Some(Command::CallFinished {
                    cdr,
                    owner,
                    epoch,
                    keep,
                }));
            }
            Command::CallAnswered(mut r) => {
                with_instances(&cluster, &mut r);
                answered.insert(r.id.clone(), (batch.len(), None));
                batch.push(Some(Command::CallAnswered(r)));
            }
            Command::CdrOpened(start) => {
                if let Some((_, opened)) = answered.get_mut(&start.uniqueid) {
                    *opened = Some(batch.len());
                }
                batch.push(Some(Command::CdrOpened(start)));
            }
            other => batch.push(Some(other)),
        };
        add(first, &mut batch);
        let window = tokio::time::sleep(RECORD_BATCH_WINDOW);
        tokio::pin!(window);
        while batch.len() < RECORD_BATCH_MAX {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(c) => add(c, &mut batch),
                    None => break,
                },
                _ = &mut window => break,
            }
        }
        let batch: Vec<Command> = batch.into_iter().flatten().collect();
        if batch.is_empty() {
            continue;
        }
        let n = batch.len();
        // Call detail records are not given up: a batch with one is retried until the
        // cluster takes it (calls' other records are only worth it for a while).
        let keep_trying = batch
            .iter()
            .any(|c| matches!(c, Command::CallFinished { .. }));
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match cluster.propose(Command::Batch(batch.clone())).await {
                Ok(_) => break,
                Err(e) if keep_trying || attempt < 5 => {
                    if attempt % 10 == 5 {
                        tracing::warn!(error = %e, attempt, records = n, "call records not committed yet");
                    } else {
                        tracing::debug!(error = %e, attempt, "call records not committed yet");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, records = n, "call records dropped");
                    break;
                }
            }
        }
    }
}

/// The contacts of the Dial targets, and the status when there are none (404: no such
/// user, 480: nobody registered); the endpoint chooses them.
fn resolve(layer: &CallLayer, targets: &[DialTarget], secure: bool) -> (Vec<Contact<Dest>>, u16) {
    let chosen = {
        let state = layer.cluster.read();
        layer.endpoint.contacts(&state, targets, secure, unix_ms())
    };
    for s in &chosen.skipped {
        let (user, uri) = (&s.user, &s.uri);
        match s.reason {
            SkipReason::Loop => {
                tracing::warn!(%user, %uri, "contact points at this node: skipped (loop)")
            }
            SkipReason::NotTls => {
                tracing::info!(%user, %uri, "sips: call: contact not on TLS skipped")
            }
        }
    }
    (chosen.contacts, chosen.unreachable)
}
