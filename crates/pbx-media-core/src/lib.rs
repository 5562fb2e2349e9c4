//! RTP relay sessions, sans-IO. A [`RelaySession`] joins two sides of a call (or one,
//! for echo): each side has a socket on the node and a remote address, first from SDP,
//! then latched to where that side's packets really come from (symmetric RTP, RFC 4961,
//! so phones behind NAT work). After latching, packets from any other source are
//! dropped (no injection into a running call). Every packet from a side updates that
//! side's [`StreamStats`]: packets, bytes, loss and interarrival jitter (RFC 3550
//! §6.4.1, A.3, A.8).
//!
//! The per-packet path (`on_packet`) allocates nothing and takes no lock: the driver
//! owns the session in the task that owns the sockets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rtp_rs::{RtpReader, Seq};

pub mod dtmf;
mod record;

pub use record::Recorder;
pub mod g711;

use dtmf::DtmfReceiver;

/// One side of a relay: `A` is the caller's leg, `B` the callee's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    fn idx(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// Counters of the RTP received from one side.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamStats {
    pub packets: u64,
    pub bytes: u64,
    /// Packets expected by sequence number but never received (RFC 3550 A.3).
    pub lost: u64,
    /// Interarrival jitter in timestamp units (RFC 3550 A.8), as an estimate.
    pub jitter: f64,
    /// Datagrams that were not RTP, or came from another source after latching.
    pub dropped: u64,
    pub ssrc: Option<u32>,
    base_seq: u32,
    /// Highest sequence number, extended with its wrap count.
    max_ext_seq: u32,
    /// (arrival, RTP timestamp) of the previous packet, for jitter.
    prev: Option<(Instant, u32)>,
    /// Counters when the current SSRC started.
    packets_before_source: u64,
    lost_before_source: u64,
}

impl StreamStats {
    /// Counts one RTP packet; false when `data` is not RTP version 2.
    pub fn on_rtp(&mut self, now: Instant, data: &[u8], clock_rate: u32) -> bool {
        let Ok(rtp) = RtpReader::new(data) else {
            self.dropped += 1;
            return false;
        };
        if rtp.version() != 2 {
            self.dropped += 1;
            return false;
        }
        let seq = rtp.sequence_number();
        let seq16: u16 = u16::from(seq);
        if self.ssrc != Some(rtp.ssrc()) {
            // A new source (first packet, or the phone restarted its stream).
            self.ssrc = Some(rtp.ssrc());
            self.packets_before_source = self.packets;
            self.lost_before_source = self.lost;
            self.base_seq = u32::from(seq16);
            self.max_ext_seq = u32::from(seq16);
            self.prev = None;
        } else {
            let max16 = Seq::from(self.max_ext_seq as u16);
            let delta = seq - max16;
            if delta > 0 {
                self.max_ext_seq = self.max_ext_seq.wrapping_add(delta as u32);
            }
        }
        self.packets += 1;
        self.bytes += data.len() as u64;
        let expected = u64::from(self.max_ext_seq.wrapping_sub(self.base_seq)) + 1;
        // Per source; a new SSRC starts over, earlier losses stay counted.
        let received_this_source = self.received_since_base();
        self.lost = self.lost_before_source + expected.saturating_sub(received_this_source);
        let ts = rtp.timestamp();
        if let Some((t0, ts0)) = self.prev {
            let arrival = now.saturating_duration_since(t0).as_secs_f64() * f64::from(clock_rate);
            let d = (arrival - f64::from(ts.wrapping_sub(ts0) as i32)).abs();
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.prev = Some((now, ts));
        true
    }

    fn received_since_base(&self) -> u64 {
        self.packets - self.packets_before_source
    }

    /// Jitter in milliseconds at `clock_rate`.
    pub fn jitter_ms(&self, clock_rate: u32) -> f64 {
        self.jitter * 1000.0 / f64::from(clock_rate.max(1))
    }
}

/// Media counters of one relayed stream as reported (to the admin API, across the peer
/// link): what the relay received from side a (the caller's) and side b (the callee's),
/// jitter in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MediaCounters {
    pub a_packets: u64,
    pub a_bytes: u64,
    pub a_lost: u64,
    pub a_jitter_ms: f64,
    pub b_packets: u64,
    pub b_bytes: u64,
    pub b_lost: u64,
    pub b_jitter_ms: f64,
    /// Wall clock (Unix ms) of the first RTP packet from each side; 0: none yet. On a
    /// call's new owner, when media flowed again after the move.
    pub a_first_ms: u64,
    pub b_first_ms: u64,
}

/// What a relay does with the packets of a side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A's packets go to B and B's to A.
    Bridge,
    /// Every packet goes back where it came from (the Echo application).
    Echo,
}

/// One media stream of a call through the node (RTP; RTCP uses a session of its own on
/// the next ports with `count_rtp = false`).
#[derive(Debug, Clone)]
pub struct RelaySession {
    mode: Mode,
    remote: [Option<SocketAddr>; 2],
    latched: [bool; 2],
    stats: [StreamStats; 2],
    count_rtp: bool,
    clock_rate: u32,
    last_packet: Instant,
    /// Each side's RFC 4733 telephone-event payload type, when its digits are wanted.
    events: [Option<u8>; 2],
    dtmf: [DtmfReceiver; 2],
    /// The key pressed by the last packet, until taken.
    digit: Option<(Side, char)>,
}

impl RelaySession {
    pub fn new(now: Instant, mode: Mode, count_rtp: bool) -> Self {
        RelaySession {
            mode,
            remote: [None, None],
            latched: [false, false],
            stats: [StreamStats::default(), StreamStats::default()],
            count_rtp,
            clock_rate: 8000,
            last_packet: now,
            events: [None, None],
            dtmf: Default::default(),
            digit: None,
        }
    }

    /// Detects the keys `side` presses, sent as telephone-events with `payload_type`
    /// (the number its SDP gave them); `None` stops.
    pub fn detect_dtmf(&mut self, side: Side, payload_type: Option<u8>) {
        self.events[side.idx()] = payload_type;
    }

    /// The key the last packet pressed (see [`RelaySession::detect_dtmf`]).
    pub fn take_digit(&mut self) -> Option<(Side, char)> {
        self.digit.take()
    }

    /// Where a side's SDP says it receives media. A new address (re-INVITE) clears the
    /// latch: the side may really have moved.
    pub fn set_remote(&mut self, side: Side, addr: Option<SocketAddr>) {
        let i = side.idx();
        if self.remote[i] != addr {
            self.remote[i] = addr;
            self.latched[i] = false;
        }
    }

    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    /// The two sides trade places (a transfer made the callee the party the call runs
    /// for): what is kept per side goes with its socket.
    pub fn swap_sides(&mut self) {
        self.remote.swap(0, 1);
        self.latched.swap(0, 1);
        self.stats.swap(0, 1);
        self.events.swap(0, 1);
        self.dtmf.swap(0, 1);
        self.digit = None;
    }

    pub fn set_clock_rate(&mut self, hz: u32) {
        self.clock_rate = hz.max(1);
    }

    /// A datagram arrived on `side`'s socket from `src`: where to send it (`None`: drop).
    pub fn on_packet(
        &mut self,
        now: Instant,
        side: Side,
        src: SocketAddr,
        data: &[u8],
    ) -> Option<SocketAddr> {
        let i = side.idx();
        if self.latched[i] && self.remote[i] != Some(src) {
            self.stats[i].dropped += 1;
            return None;
        }
        if !self.latched[i] {
            self.remote[i] = Some(src);
            self.latched[i] = true;
        }
        if self.count_rtp && !self.stats[i].on_rtp(now, data, self.clock_rate) {
            return None;
        }
        // Checked on the second byte first: nothing parsed for ordinary audio.
        if let (Some(pt), Some(b)) = (self.events[i], data.get(1)) {
            if b & 0x7f == pt {
                if let Ok(rtp) = RtpReader::new(data) {
                    if let Some(d) =
                        self.dtmf[i].on_event(rtp.ssrc(), rtp.timestamp(), rtp.payload())
                    {
                        self.digit = Some((side, d));
                    }
                }
            }
        }
        self.last_packet = now;
        match self.mode {
            Mode::Echo => Some(src),
            Mode::Bridge => self.remote[side.other().idx()],
        }
    }

    pub fn stats(&self, side: Side) -> &StreamStats {
        &self.stats[side.idx()]
    }

    pub fn remote(&self, side: Side) -> Option<SocketAddr> {
        self.remote[side.idx()]
    }

    /// How long no packet has passed (for the no-media timeout).
    pub fn idle(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtp_rs::RtpPacketBuilder;

    fn rtp(seq: u16, ts: u32, ssrc: u32) -> Vec<u8> {
        RtpPacketBuilder::new()
            .payload_type(0)
            .sequence(Seq::from(seq))
            .timestamp(ts)
            .ssrc(ssrc)
            .payload(&[0xff; 160])
            .build()
            .unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn bridges_and_latches_to_the_real_source() {
        let t0 = Instant::now();
        let mut s = RelaySession::new(t0, Mode::Bridge, true);
        s.set_remote(Side::A, Some(addr("10.0.0.1:4000"))); // SDP says so (private IP)
        s.set_remote(Side::B, Some(addr("192.0.2.2:5000")));
        // A's packets really come from its NAT's address: latch there.
        let nat = addr("198.51.100.7:61000");
        assert_eq!(
            s.on_packet(t0, Side::A, nat, &rtp(1, 0, 7)),
            Some(addr("192.0.2.2:5000"))
        );
        assert_eq!(s.remote(Side::A), Some(nat));
        assert_eq!(
            s.on_packet(t0, Side::B, addr("192.0.2.2:5000"), &rtp(9, 0, 8)),
            Some(nat)
        );
        // After latching, another source cannot inject media.
        assert_eq!(
            s.on_packet(t0, Side::A, addr("203.0.113.9:1"), &rtp(2, 160, 7)),
            None
        );
        assert_eq!(s.stats(Side::A).dropped, 1);
        // A re-INVITE moves A: the latch is released.
        s.set_remote(Side::A, Some(addr("10.0.0.1:4002")));
        assert!(s
            .on_packet(t0, Side::A, addr("198.51.100.7:61002"), &rtp(3, 320, 7))
            .is_some());
    }

    #[test]
    fn detects_the_keys_of_a_side_and_still_forwards_them() {
        let t0 = Instant::now();
        let mut s = RelaySession::new(t0, Mode::Bridge, true);
        s.set_remote(Side::B, Some(addr("192.0.2.2:5000")));
        let a = addr("192.0.2.1:4000");
        let event = |seq: u16, ts: u32, key: u8, end: bool| {
            RtpPacketBuilder::new()
                .payload_type(101)
                .sequence(Seq::from(seq))
                .timestamp(ts)
                .ssrc(7)
                .payload(&[key, if end { 0x8a } else { 0x0a }, 0, 160])
                .build()
                .unwrap()
        };
        // Not asked for: forwarded, not detected.
        assert!(s
            .on_packet(t0, Side::A, a, &event(1, 0, 5, false))
            .is_some());
        assert_eq!(s.take_digit(), None);
        s.detect_dtmf(Side::A, Some(101));
        assert!(s
            .on_packet(t0, Side::A, a, &event(2, 800, 9, false))
            .is_some());
        assert_eq!(s.take_digit(), Some((Side::A, '9')));
        assert!(s
            .on_packet(t0, Side::A, a, &event(3, 800, 9, true))
            .is_some());
        assert_eq!(s.take_digit(), None);
        // Audio is not mistaken for an event.
        assert!(s.on_packet(t0, Side::A, a, &rtp(4, 960, 7)).is_some());
        assert_eq!(s.take_digit(), None);
    }

    #[test]
    fn echo_returns_to_sender() {
        let t0 = Instant::now();
        let mut s = RelaySession::new(t0, Mode::Echo, true);
        let a = addr("127.0.0.1:4000");
        assert_eq!(s.on_packet(t0, Side::A, a, &rtp(1, 0, 1)), Some(a));
    }

    #[test]
    fn counts_loss_across_wrap_and_jitter() {
        let t0 = Instant::now();
        let mut st = StreamStats::default();
        // 65533..=65535, 0, (1 lost), 2, 3 at exactly 20 ms: 1 lost, no jitter.
        let seqs = [65533u16, 65534, 65535, 0, 2, 3];
        let slots = [0u32, 1, 2, 3, 5, 6];
        for (seq, slot) in seqs.iter().zip(slots) {
            let now = t0 + Duration::from_millis(20 * u64::from(slot));
            assert!(st.on_rtp(now, &rtp(*seq, slot * 160, 42), 8000));
        }
        assert_eq!(st.packets, 6);
        assert_eq!(st.lost, 1);
        assert!(st.jitter < 0.01, "{}", st.jitter);
        // Late packets raise the jitter estimate.
        st.on_rtp(
            t0 + Duration::from_millis(20 * 7 + 30),
            &rtp(4, 7 * 160, 42),
            8000,
        );
        assert!(st.jitter_ms(8000) > 1.0, "{}", st.jitter_ms(8000));
        assert!(!st.on_rtp(t0, b"not rtp", 8000));
        assert_eq!(st.dropped, 1);
    }

    #[test]
    fn new_ssrc_starts_over_without_false_loss() {
        let t0 = Instant::now();
        let mut st = StreamStats::default();
        st.on_rtp(t0, &rtp(100, 0, 1), 8000);
        st.on_rtp(t0, &rtp(5000, 0, 2), 8000);
        st.on_rtp(t0, &rtp(5001, 160, 2), 8000);
        assert_eq!(st.lost, 0);
        assert_eq!(st.packets, 3);
    }
}
