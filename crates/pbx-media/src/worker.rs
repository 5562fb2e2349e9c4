//! A relay thread: one poll loop (epoll through mio) for many streams.
//!
//! One task per stream woke the tokio scheduler for every packet and read each socket
//! twice (the packet, then `EAGAIN`). Here a thread owns the sockets of its streams and
//! their sessions: one `epoll_wait` reports the ready sockets of many calls, one
//! `recvmmsg` per ready socket takes what it holds (fewer than asked for means it is
//! drained, so no `EAGAIN` round), and the packets it gave go out with one `sendmmsg`
//! (`sendto` for one). While packets flow a thread polls at most once per batch window
//! (1 ms by default): a wake-up per window, not per packet, and the window's packets
//! in one pass. Arrival times (for jitter) are the kernel's (`SO_TIMESTAMPNS`): the
//! clock is read once per wake-up, not per packet; nothing is allocated on the
//! forwarding path. Prompts and music are paced by a timer heap. A flooded port gets a
//! few batches per wake-up like any other; a panic while forwarding ends that stream
//! only.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    MultiHeaders, SockaddrStorage,
};
use nix::sys::time::TimeSpec;
use pbx_media_core::{Mode, RelaySession, Side, StreamStats};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{MediaEvent, RelayTotals, StreamCounters};

/// Datagrams taken from one socket, and sent to one, per system call.
const BATCH: usize = 8;
/// Counters, totals and the no-media check, for every stream of the thread.
const TICK: Duration = Duration::from_secs(1);
/// The waker's token; a socket's is `slot * 4 + index`.
const WAKE: Token = Token(usize::MAX);
/// Batched receives from one socket per wake-up; a socket with more waiting is kept
/// for the next round (a flooded port cannot starve the thread's other streams).
const ROUNDS: usize = 4;
/// Samples per 20 ms packet of G.711 at 8 kHz.
const FRAME: usize = 160;
/// A prompt further behind than this skips ahead instead of bursting.
const PLAY_BEHIND: Duration = Duration::from_millis(100);

/// Socket index → (side, RTCP or not): `[A rtp, A rtcp, B rtp, B rtcp]`.
const SOCKETS: [(Side, bool); 4] = [
    (Side::A, false),
    (Side::A, true),
    (Side::B, false),
    (Side::B, true),
];

fn socket_index(side: Side, rtcp: bool) -> usize {
    match (side, rtcp) {
        (Side::A, false) => 0,
        (Side::A, true) => 1,
        (Side::B, false) => 2,
        (Side::B, true) => 3,
    }
}

pub(crate) enum Control {
    Remote(Side, Option<SocketAddr>),
    Mode(Mode),
    Play {
        audio: Arc<[u8]>,
        payload_type: u8,
        side: Side,
        looped: bool,
        id: u32,
    },
    StopPlay,
    Dtmf(Side, Option<u8>),
    Swap,
    Record {
        side: Side,
        payload_type: u8,
        max_bytes: usize,
    },
    TakeRecording(oneshot::Sender<Vec<u8>>),
}

/// A new stream for a thread: its bound sockets and where it reports.
pub(crate) struct Opening {
    pub sockets: [std::net::UdpSocket; 4],
    pub ports: [u16; 2],
    pub mode: Mode,
    pub counters: watch::Sender<StreamCounters>,
    pub events: mpsc::UnboundedSender<MediaEvent>,
}

pub(crate) enum Command {
    Open(Box<Opening>),
    Control(Control),
    /// The stream's handle was dropped: close its sockets, give its ports back.
    Close,
}

/// How the relay and its streams reach a thread. The thread ends once every holder
/// is gone (its channel disconnected) and it has no stream left.
pub(crate) struct Link {
    tx: std_mpsc::Sender<(u64, Command)>,
    waker: Waker,
    /// Set while a wake-up is pending: commands sent meanwhile need no other.
    flagged: Arc<AtomicBool>,
}

impl Link {
    /// False when the thread is gone.
    pub(crate) fn send(&self, id: u64, cmd: Command) -> bool {
        if self.tx.send((id, cmd)).is_err() {
            return false;
        }
        if !self.flagged.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
        true
    }
}

/// Starts relay thread `index`.
pub(crate) fn spawn(
    index: usize,
    free: Arc<Mutex<VecDeque<u16>>>,
    totals: Arc<RelayTotals>,
    no_media_timeout: Duration,
    window: Duration,
) -> std::io::Result<Link> {
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKE)?;
    let (tx, rx) = std_mpsc::channel();
    let flagged = Arc::new(AtomicBool::new(false));
    let flag = flagged.clone();
    std::thread::Builder::new()
        .name(format!("pbx-relay-{index}"))
        .spawn(move || {
            // The message headers hold raw pointers (not Send): made on the thread.
            let mut worker = Worker {
                poll,
                rx,
                flagged: flag,
                free,
                totals,
                no_media_timeout,
                window,
                slots: Vec::new(),
                vacant: Vec::new(),
                ids: HashMap::new(),
                timers: BinaryHeap::new(),
                next_play: 0,
                io: BatchIo::new(),
            };
            // A panic outside a stream's forwarding (caught there) is a bug; the
            // thread carries on with its streams rather than take them all down.
            while std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run())).is_err() {
                tracing::error!("relay thread panicked: going on");
            }
        })?;
    Ok(Link { tx, waker, flagged })
}

/// A prompt being sent to a side: G.711 bytes, one 20 ms packet at a time.
struct Playback {
    /// Who hears it; what the other side sends is not forwarded to it meanwhile.
    side: Side,
    /// Music on hold: starts over at the end, never reports done.
    looped: bool,
    /// Reported with [`MediaEvent::PlaybackDone`].
    id: u32,
    /// Which timer entries are this playback's (entries of a stopped one are stale).
    generation: u64,
    audio: Arc<[u8]>,
    pos: usize,
    payload_type: u8,
    seq: u16,
    timestamp: u32,
    ssrc: u32,
    next: Instant,
    marker: bool,
}

impl Playback {
    /// The next packet into `out` (no allocation); its length, or None at the end.
    fn packet(&mut self, out: &mut [u8; 12 + FRAME]) -> Option<usize> {
        if self.looped && self.pos >= self.audio.len() && !self.audio.is_empty() {
            self.pos = 0;
        }
        if self.pos >= self.audio.len() {
            return None;
        }
        let chunk = &self.audio[self.pos..(self.pos + FRAME).min(self.audio.len())];
        out[0] = 0x80;
        out[1] = self.payload_type | if self.marker { 0x80 } else { 0 };
        out[2..4].copy_from_slice(&self.seq.to_be_bytes());
        out[4..8].copy_from_slice(&self.timestamp.to_be_bytes());
        out[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        out[12..12 + chunk.len()].copy_from_slice(chunk);
        self.marker = false;
        self.pos += FRAME;
        self.seq = self.seq.wrapping_add(1);
        self.timestamp = self.timestamp.wrapping_add(FRAME as u32);
        self.next += Duration::from_millis(20);
        Some(12 + chunk.len())
    }
}

/// One stream as its thread holds it.
struct Slot {
    sockets: [UdpSocket; 4],
    ports: [u16; 2],
    rtp: RelaySession,
    rtcp: RelaySession,
    /// What was last added to the relay's totals, per side.
    added: [StreamStats; 2],
    counters: watch::Sender<StreamCounters>,
    events: mpsc::UnboundedSender<MediaEvent>,
    reported_dead: bool,
    play: Option<Playback>,
    recording: Option<(Side, pbx_media_core::Recorder)>,
    /// Unix ms of the first RTP packet from A and from B (0: none yet).
    first_ms: [u64; 2],
    /// Seeds each prompt's SSRC (RFC 3550 §8: a new source per prompt).
    ssrc: u32,
}

impl Slot {
    fn flush(&mut self, totals: &RelayTotals) {
        for (k, side) in [Side::A, Side::B].into_iter().enumerate() {
            let now = self.rtp.stats(side);
            totals.add(now, &self.added[k]);
            self.added[k] = *now;
        }
    }
}

/// The buffers and message headers of the batched system calls, reused for every
/// socket (allocated once per thread).
struct BatchIo {
    bufs: Box<[[u8; 2048]; BATCH]>,
    recv_headers: MultiHeaders<SockaddrStorage>,
    send_headers: MultiHeaders<SockaddrStorage>,
    /// Per datagram of the last receive: its length, source and the kernel's arrival
    /// time (CLOCK_REALTIME, `SO_TIMESTAMPNS`).
    got: [(usize, Option<SocketAddr>, Option<Duration>); BATCH],
    /// Per datagram to forward: its buffer index and destination (into one socket).
    out: [(usize, Option<SockaddrStorage>); BATCH],
}

impl BatchIo {
    fn new() -> BatchIo {
        BatchIo {
            bufs: Box::new([[0u8; 2048]; BATCH]),
            // Every relay socket asks for timestamps, so every datagram carries one
            // control message of this size (the headers' control length, which the
            // kernel sets per receive, stays the same).
            recv_headers: MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(TimeSpec))),
            send_headers: MultiHeaders::preallocate(BATCH, None),
            got: [(0, None, None); BATCH],
            out: [(0, None); BATCH],
        }
    }

    /// Takes up to [`BATCH`] datagrams from `sock` into `bufs`/`got`: how many.
    fn receive(&mut self, sock: &UdpSocket) -> Result<usize, Errno> {
        let mut slices: [[IoSliceMut<'_>; 1]; BATCH] =
            self.bufs.each_mut().map(|b| [IoSliceMut::new(b)]);
        let results = recvmmsg(
            sock.as_raw_fd(),
            &mut self.recv_headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )?;
        let mut k = 0;
        for r in results {
            let src = r.address.as_ref().and_then(to_std);
            let mut at = None;
            if let Ok(cmsgs) = r.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmTimestampns(t) = c {
                        at = Some(Duration::from(t));
                    }
                }
            }
            self.got[k] = (r.bytes, src, at);
            k += 1;
        }
        Ok(k)
    }

    /// Sends the first `n` entries of `out` through `sock`: one `sendto`, or one
    /// `sendmmsg` for several. A full send buffer drops (as the network would).
    fn send(&mut self, sock: &UdpSocket, n: usize) {
        if n == 1 {
            let (b, to) = self.out[0];
            if let Some(to) = to.as_ref().and_then(to_std) {
                let len = self.got[b].0;
                let _ = sock.send_to(&self.bufs[b][..len], to);
            }
            return;
        }
        let mut slices: [[IoSlice<'_>; 1]; BATCH] = [[IoSlice::new(&[])]; BATCH];
        let mut addrs: [Option<SockaddrStorage>; BATCH] = [None; BATCH];
        for (j, (b, to)) in self.out[..n].iter().enumerate() {
            slices[j] = [IoSlice::new(&self.bufs[*b][..self.got[*b].0])];
            addrs[j] = *to;
        }
        let _ = sendmmsg(
            sock.as_raw_fd(),
            &mut self.send_headers,
            slices[..n].iter(),
            &addrs[..n],
            [] as [ControlMessage<'_>; 0],
            MsgFlags::MSG_DONTWAIT,
        );
    }
}

/// Both clocks read once per wake-up: kernel arrival times (real time) become
/// [`Instant`]s.
struct Clock {
    instant: Instant,
    /// Real time at `instant`, since the Unix epoch.
    real: Duration,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            instant: Instant::now(),
            real: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }

    /// When a datagram stamped `at` arrived (the wake-up's time when unstamped, or
    /// stamped "later" by a clock step).
    fn arrival(&self, at: Option<Duration>) -> Instant {
        at.and_then(|at| self.real.checked_sub(at))
            .and_then(|ago| self.instant.checked_sub(ago))
            .unwrap_or(self.instant)
    }
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        Some(SocketAddr::V4((*v4).into()))
    } else {
        a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
    }
}

struct Worker {
    poll: Poll,
    rx: std_mpsc::Receiver<(u64, Command)>,
    flagged: Arc<AtomicBool>,
    free: Arc<Mutex<VecDeque<u16>>>,
    totals: Arc<RelayTotals>,
    no_media_timeout: Duration,
    /// At most one poll per window while packets flow (batching); zero: none.
    window: Duration,
    slots: Vec<Option<Slot>>,
    vacant: Vec<usize>,
    /// Stream id → slot.
    ids: HashMap<u64, usize>,
    /// When each playing prompt's next packet is due: (time, slot, generation).
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    next_play: u64,
    io: BatchIo,
}

impl Worker {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now() + TICK;
        // Sockets left with datagrams after their rounds (flooded): read again before
        // waiting, as edge-triggered readiness will not report them again.
        let mut backlog: Vec<(usize, usize)> = Vec::new();
        let mut again: Vec<(usize, usize)> = Vec::new();
        loop {
            let now = Instant::now();
            let due = if backlog.is_empty() {
                self.timers
                    .peek()
                    .map_or(next_tick, |Reverse((t, _, _))| next_tick.min(*t))
            } else {
                now
            };
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(due.saturating_duration_since(now)))
            {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "relay poll failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            let clock = Clock::now();
            let woke = clock.instant;
            // Commands first: a prompt asked for before a packet arrived applies to it.
            // (A socket closed here may leave a stale event below: its slot is empty,
            // or reused by a stream opened here, whose socket is then just read.)
            // Cleared before the queue is read: a command sent after this wakes us.
            self.flagged.swap(false, Ordering::AcqRel);
            loop {
                match self.rx.try_recv() {
                    Ok((id, cmd)) => self.command(id, cmd),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        // Every handle is gone, so every stream was closed above.
                        let ids: Vec<u64> = self.ids.keys().copied().collect();
                        for id in ids {
                            self.close(id);
                        }
                        return;
                    }
                }
            }
            let ready = events
                .iter()
                .map(|ev| ev.token())
                .filter(|t| *t != WAKE)
                .map(|t| (t.0 / 4, t.0 % 4));
            for (slot, index) in ready.chain(std::mem::take(&mut backlog)) {
                let more = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.readable(slot, index, &clock)
                }));
                match more {
                    Ok(true) => again.push((slot, index)),
                    Ok(false) => {}
                    Err(_) => self.fail(slot),
                }
            }
            std::mem::swap(&mut backlog, &mut again);
            let now = Instant::now();
            self.play_due(now);
            if now >= next_tick {
                self.tick(now);
                next_tick = now + TICK;
            }
            // Let the next packets gather: a wake-up (a context switch, ~µs) per
            // window instead of per packet or two. Idle, the poll above blocks.
            if (!events.is_empty() || !backlog.is_empty()) && !self.window.is_zero() {
                let spent = Instant::now().saturating_duration_since(woke);
                if let Some(rest) = self.window.checked_sub(spent) {
                    std::thread::sleep(rest);
                }
            }
        }
    }

    /// Socket `index` of `slot` is readable: forward what it holds, up to [`ROUNDS`]
    /// batches; true when it may hold more (to be read again before the next wait).
    fn readable(&mut self, slot: usize, index: usize, clock: &Clock) -> bool {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return false;
        };
        let (side, is_rtcp) = SOCKETS[index];
        for _ in 0..ROUNDS {
            let k = match self.io.receive(&s.sockets[index]) {
                Ok(k) => k,
                // Drained: edge-triggered readiness reports the next arrival.
                Err(Errno::EAGAIN) => return false,
                // Anything else (a pending socket error such as an ICMP report) is
                // consumed by the read that returned it: read on.
                Err(e) => {
                    tracing::debug!(error = %e, "relay receive failed");
                    continue;
                }
            };
            // Forwarded datagrams, grouped by the socket they leave through.
            let mut out_socket = None;
            let mut n_out = 0;
            for j in 0..k {
                let (len, src, at) = self.io.got[j];
                let Some(src) = src else { continue };
                let data = &self.io.bufs[j][..len];
                let session = if is_rtcp { &mut s.rtcp } else { &mut s.rtp };
                let dest = session.on_packet(clock.arrival(at), side, src, data);
                if let Some((side, digit)) = session.take_digit() {
                    let _ = s.events.send(MediaEvent::Digit(side, digit));
                }
                // Only what the relay took from the side's phone (its latched address).
                if let Some((_, r)) = s
                    .recording
                    .as_mut()
                    .filter(|(r_side, _)| *r_side == side && !is_rtcp)
                {
                    if !r.is_full() && s.rtp.remote(side) == Some(src) && !r.on_rtp(data) {
                        let _ = s.events.send(MediaEvent::RecordingFull);
                    }
                }
                let Some(dest) = dest else { continue };
                if !is_rtcp {
                    s.reported_dead = false;
                    // Once per side and stream: when media (re)started through here.
                    let f = &mut s.first_ms[if side == Side::A { 0 } else { 1 }];
                    if *f == 0 {
                        *f = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(1, |d| d.as_millis() as u64);
                    }
                }
                // Out through the socket of the side the packet goes to (echo: the same
                // side), so the phone sees it come from the address its SDP names.
                let out_side = if dest == src { side } else { side.other() };
                // A side hearing a prompt or music hears nothing else.
                if !is_rtcp && s.play.as_ref().is_some_and(|p| p.side == out_side) {
                    continue;
                }
                let out = socket_index(out_side, is_rtcp);
                if let Some(o) = out_socket.filter(|o| *o != out) {
                    // Another socket than the batch so far (a mode change): flush.
                    self.io.send(&s.sockets[o], n_out);
                    n_out = 0;
                }
                out_socket = Some(out);
                self.io.out[n_out] = (j, Some(SockaddrStorage::from(dest)));
                n_out += 1;
            }
            if let Some(o) = out_socket.filter(|_| n_out > 0) {
                self.io.send(&s.sockets[o], n_out);
            }
            // Fewer than asked for: the socket is drained (edge-triggered readiness
            // reports the next arrival).
            if k < BATCH {
                return false;
            }
        }
        true
    }

    /// A stream whose packet made the relay panic (a bug): it alone ends (the call
    /// hears "no media"), its ports go back, the thread goes on with the others.
    fn fail(&mut self, slot: usize) {
        let Some(Some(s)) = self.slots.get(slot) else {
            return;
        };
        tracing::error!(port_a = s.ports[0], "relay stream failed: closed");
        let _ = s.events.send(MediaEvent::NoMedia);
        let id = self
            .ids
            .iter()
            .find_map(|(id, v)| (*v == slot).then_some(*id));
        if let Some(id) = id {
            self.close(id);
        }
    }

    fn command(&mut self, id: u64, cmd: Command) {
        match cmd {
            Command::Open(o) => self.open(id, *o),
            Command::Close => self.close(id),
            Command::Control(c) => {
                let Some(&slot) = self.ids.get(&id) else {
                    return;
                };
                self.control(slot, c);
            }
        }
    }

    fn open(&mut self, id: u64, o: Opening) {
        let slot = self.vacant.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        for sock in &o.sockets {
            // Arrival times for jitter from the kernel: exact, and no clock read per
            // packet (a datagram may wait up to a batch window before it is read).
            let _ = setsockopt(sock, sockopt::ReceiveTimestampns, &true);
        }
        let mut sockets = o.sockets.map(UdpSocket::from_std);
        for (i, sock) in sockets.iter_mut().enumerate() {
            if let Err(e) =
                self.poll
                    .registry()
                    .register(sock, Token(slot * 4 + i), Interest::READABLE)
            {
                tracing::error!(error = %e, "cannot watch a relay socket");
            }
        }
        let now = Instant::now();
        let ssrc = u32::from(o.ports[0]).wrapping_mul(0x9e37_79b9);
        let s = Slot {
            sockets,
            ports: o.ports,
            rtp: RelaySession::new(now, o.mode, true),
            rtcp: RelaySession::new(now, o.mode, false),
            added: [StreamStats::default(), StreamStats::default()],
            counters: o.counters,
            events: o.events,
            reported_dead: false,
            play: None,
            recording: None,
            first_ms: [0; 2],
            ssrc,
        };
        s.counters.send_replace(StreamCounters::default());
        self.slots[slot] = Some(s);
        self.ids.insert(id, slot);
    }

    fn close(&mut self, id: u64) {
        let Some(slot) = self.ids.remove(&id) else {
            return;
        };
        let Some(mut s) = self.slots[slot].take() else {
            return;
        };
        self.vacant.push(slot);
        s.flush(&self.totals);
        let (a, b) = (s.rtp.stats(Side::A), s.rtp.stats(Side::B));
        tracing::info!(
            port_a = s.ports[0],
            port_b = s.ports[1],
            a_packets = a.packets,
            a_lost = a.lost,
            a_jitter_ms = format_args!("{:.1}", a.jitter_ms(8000)),
            a_dropped = a.dropped,
            b_packets = b.packets,
            b_lost = b.lost,
            b_jitter_ms = format_args!("{:.1}", b.jitter_ms(8000)),
            b_dropped = b.dropped,
            "media stream closed"
        );
        for sock in s.sockets.iter_mut() {
            let _ = self.poll.registry().deregister(sock);
        }
        let ports = s.ports;
        // Closed before the ports are given back: a port is never handed out while
        // still bound.
        drop(s);
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ports);
    }

    fn control(&mut self, slot: usize, c: Control) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        match c {
            Control::Remote(side, addr) => {
                s.rtp.set_remote(side, addr);
                s.rtcp.set_remote(
                    side,
                    addr.map(|a| SocketAddr::new(a.ip(), a.port().wrapping_add(1))),
                );
            }
            Control::Mode(m) => {
                s.rtp.set_mode(m);
                s.rtcp.set_mode(m);
            }
            Control::Play {
                audio,
                payload_type,
                side,
                looped,
                id,
            } => {
                s.ssrc = s.ssrc.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                self.next_play += 1;
                let now = Instant::now();
                s.play = Some(Playback {
                    side,
                    looped,
                    id,
                    generation: self.next_play,
                    audio,
                    pos: 0,
                    payload_type,
                    seq: (s.ssrc >> 16) as u16,
                    timestamp: s.ssrc.rotate_left(7),
                    ssrc: s.ssrc,
                    next: now,
                    marker: true,
                });
                self.timers.push(Reverse((now, slot, self.next_play)));
            }
            Control::StopPlay => s.play = None,
            Control::Dtmf(side, pt) => s.rtp.detect_dtmf(side, pt),
            Control::Swap => {
                s.sockets.swap(0, 2);
                s.sockets.swap(1, 3);
                s.ports.swap(0, 1);
                s.rtp.swap_sides();
                s.rtcp.swap_sides();
                s.added.swap(0, 1);
                s.first_ms.swap(0, 1);
                if let Some(p) = s.play.as_mut() {
                    p.side = p.side.other();
                }
                // Tokens name the socket's index.
                for (i, sock) in s.sockets.iter_mut().enumerate() {
                    let _ = self.poll.registry().reregister(
                        sock,
                        Token(slot * 4 + i),
                        Interest::READABLE,
                    );
                }
            }
            Control::Record {
                side,
                payload_type,
                max_bytes,
            } => {
                s.recording = Some((side, pbx_media_core::Recorder::new(payload_type, max_bytes)));
            }
            Control::TakeRecording(reply) => {
                let audio = s
                    .recording
                    .take()
                    .map(|(_, r)| r.into_audio())
                    .unwrap_or_default();
                let _ = reply.send(audio);
            }
        }
    }

    /// Sends the prompt packets that are due.
    fn play_due(&mut self, now: Instant) {
        let mut frame = [0u8; 12 + FRAME];
        while let Some(&Reverse((at, slot, generation))) = self.timers.peek() {
            if at > now {
                return;
            }
            self.timers.pop();
            let Some(Some(s)) = self.slots.get_mut(slot) else {
                continue;
            };
            let Some(p) = s.play.as_mut().filter(|p| p.generation == generation) else {
                continue;
            };
            if now.saturating_duration_since(p.next) > PLAY_BEHIND {
                p.next = now;
            }
            match p.packet(&mut frame) {
                Some(n) => {
                    if let Some(dest) = s.rtp.remote(p.side) {
                        let _ = s.sockets[socket_index(p.side, false)].send_to(&frame[..n], dest);
                    }
                    self.timers.push(Reverse((p.next, slot, generation)));
                }
                None => {
                    let id = p.id;
                    s.play = None;
                    let _ = s.events.send(MediaEvent::PlaybackDone(id));
                }
            }
        }
    }

    /// Once a second: publish counters, add to the totals, report silent streams.
    fn tick(&mut self, now: Instant) {
        for s in self.slots.iter_mut().flatten() {
            s.flush(&self.totals);
            s.counters.send_replace(StreamCounters {
                from_a: *s.rtp.stats(Side::A),
                from_b: *s.rtp.stats(Side::B),
                first_ms: s.first_ms,
            });
            if !s.reported_dead && s.rtp.idle(now) >= self.no_media_timeout {
                s.reported_dead = true;
                let _ = s.events.send(MediaEvent::NoMedia);
            }
        }
    }
}
