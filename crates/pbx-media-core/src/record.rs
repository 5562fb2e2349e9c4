//! Recording what one side says as G.711 audio, in order: a voicemail message or a
//! greeting (ADR 0014). Sans-IO: the relay hands it each RTP packet of the side.

use rtp_rs::RtpReader;

/// A gap longer than this (in packets, 20 ms each) is not filled with silence beyond
/// it: a phone that stopped sending (silence suppression, a hold) is not a minute of
/// recorded nothing.
const MAX_GAP_PACKETS: usize = 50;

/// The audio of one side, in sequence order.
#[derive(Debug)]
pub struct Recorder {
    payload_type: u8,
    /// A byte of silence in the codec (μ-law 0xFF, A-law 0xD5).
    silence: u8,
    max: usize,
    audio: Vec<u8>,
    /// The next sequence number expected, per source.
    next: Option<(u32, u16)>,
    /// Bytes in the last packet (the gap filler's packet size).
    frame: usize,
}

impl Recorder {
    /// Records packets of `payload_type` (0 PCMU, 8 PCMA) up to `max_bytes` of audio.
    pub fn new(payload_type: u8, max_bytes: usize) -> Recorder {
        Recorder {
            payload_type,
            silence: if payload_type == 8 { 0xD5 } else { 0xFF },
            max: max_bytes,
            audio: Vec::new(),
            next: None,
            frame: 160,
        }
    }

    /// One datagram from the recorded side. Other payload types (telephone-events,
    /// comfort noise) and late or repeated packets are left out; a gap is filled with
    /// silence (at most a second of it). False once the recording is full.
    pub fn on_rtp(&mut self, data: &[u8]) -> bool {
        if self.is_full() {
            return false;
        }
        let Ok(rtp) = RtpReader::new(data) else {
            return true;
        };
        if rtp.payload_type() != self.payload_type {
            return true;
        }
        let seq = u16::from(rtp.sequence_number());
        let ssrc = rtp.ssrc();
        if let Some((source, next)) = self.next {
            if source == ssrc {
                let ahead = seq.wrapping_sub(next) as i16;
                if ahead < 0 {
                    return true; // late, or a repeat
                }
                let missing = (ahead as usize).min(MAX_GAP_PACKETS);
                let fill = missing * self.frame;
                self.audio
                    .extend(std::iter::repeat_n(self.silence, fill.min(self.room())));
            }
        }
        let payload = rtp.payload();
        if !payload.is_empty() {
            self.frame = payload.len();
        }
        let take = payload.len().min(self.room());
        self.audio.extend_from_slice(&payload[..take]);
        self.next = Some((ssrc, seq.wrapping_add(1)));
        !self.is_full()
    }

    fn room(&self) -> usize {
        self.max.saturating_sub(self.audio.len())
    }

    pub fn is_full(&self) -> bool {
        self.audio.len() >= self.max
    }

    /// The length recorded, in milliseconds (8 bytes a millisecond).
    pub fn duration_ms(&self) -> u64 {
        self.audio.len() as u64 / 8
    }

    /// The audio recorded.
    pub fn into_audio(self) -> Vec<u8> {
        self.audio
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtp_rs::{RtpPacketBuilder, Seq};

    fn packet(pt: u8, seq: u16, ssrc: u32, fill: u8) -> Vec<u8> {
        RtpPacketBuilder::new()
            .payload_type(pt)
            .sequence(Seq::from(seq))
            .timestamp(u32::from(seq) * 160)
            .ssrc(ssrc)
            .payload(&[fill; 160])
            .build()
            .unwrap()
    }

    #[test]
    fn packets_are_kept_in_order_and_gaps_are_silence() {
        let mut r = Recorder::new(0, 10_000);
        assert!(r.on_rtp(&packet(0, 10, 1, 1)));
        assert!(r.on_rtp(&packet(101, 11, 1, 9)), "events are not audio");
        assert!(r.on_rtp(&packet(0, 11, 1, 2)));
        assert!(r.on_rtp(&packet(0, 11, 1, 2)), "a repeat");
        assert!(r.on_rtp(&packet(0, 13, 1, 4)), "12 lost");
        assert!(r.on_rtp(&packet(0, 12, 1, 3)), "12 late: left out");
        assert!(r.on_rtp(b"not rtp"));
        assert_eq!(r.duration_ms(), 80);
        let audio = r.into_audio();
        let chunks: Vec<u8> = audio.chunks(160).map(|c| c[0]).collect();
        assert_eq!(chunks, vec![1, 2, 0xFF, 4]);
    }

    #[test]
    fn a_new_source_goes_on_and_the_cap_stops_it() {
        let mut r = Recorder::new(8, 400);
        assert!(r.on_rtp(&packet(8, 65_535, 1, 1)));
        // Another SSRC (the phone restarted its stream): no gap filled.
        assert!(r.on_rtp(&packet(8, 7, 2, 2)));
        // Full at 400 bytes: the third packet is cut to what fits.
        assert!(!r.on_rtp(&packet(8, 8, 2, 3)));
        assert!(!r.on_rtp(&packet(8, 9, 2, 4)));
        let audio = r.into_audio();
        assert_eq!(audio.len(), 400);
        assert_eq!(audio[399], 3);
    }

    #[test]
    fn a_long_silence_is_filled_with_one_second_at_most() {
        let mut r = Recorder::new(8, 1_000_000);
        r.on_rtp(&packet(8, 1, 5, 1));
        r.on_rtp(&packet(8, 1_001, 5, 2));
        // 160 + 50 × 160 of A-law silence + 160.
        let audio = r.into_audio();
        assert_eq!(audio.len(), 160 * 52);
        assert_eq!(audio[200], 0xD5);
    }
}
