//! DTMF carried as RFC 4733 telephone-events: the event payload, and a receiver that
//! turns a stream of event packets into one digit per key press.
//!
//! A key press is sent as several packets that share the RTP timestamp of the event's
//! start (§2.5.1.2): updates while the key is held, then an end packet, usually sent
//! three times (§2.5.1.4). The receiver reports a digit at the first packet of an event
//! it has not seen (so a digit is not lost when the end packets are) and ignores the
//! rest, and late packets of an event already passed.

/// One RFC 4733 §2.3 event payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelephoneEvent {
    /// 0–9, 10 `*`, 11 `#`, 12–15 `A`–`D`, 16 flash.
    pub event: u8,
    pub end: bool,
    /// Power level in −dBm0 (0–63).
    pub volume: u8,
    /// In timestamp units since the event's start.
    pub duration: u16,
}

impl TelephoneEvent {
    /// The first event of a payload (redundant events of RFC 2198 are not used here);
    /// `None` when it is shorter than the four bytes of one event.
    pub fn parse(payload: &[u8]) -> Option<TelephoneEvent> {
        let [event, flags, d0, d1, ..] = *payload else {
            return None;
        };
        Some(TelephoneEvent {
            event,
            end: flags & 0x80 != 0,
            volume: flags & 0x3f,
            duration: u16::from_be_bytes([d0, d1]),
        })
    }

    /// The key: `0`–`9`, `*`, `#`, `A`–`D`; `None` for flash and other events.
    pub fn digit(&self) -> Option<char> {
        digit_of(self.event)
    }
}

/// The key of DTMF event `event` (RFC 4733 §3.2).
pub fn digit_of(event: u8) -> Option<char> {
    match event {
        0..=9 => Some(char::from(b'0' + event)),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some(char::from(b'A' + event - 12)),
        _ => None,
    }
}

/// The RFC 4733 event of key `digit` (the inverse of [`digit_of`]).
pub fn event_of(digit: char) -> Option<u8> {
    match digit.to_ascii_uppercase() {
        d @ '0'..='9' => Some(d as u8 - b'0'),
        '*' => Some(10),
        '#' => Some(11),
        d @ 'A'..='D' => Some(d as u8 - b'A' + 12),
        _ => None,
    }
}

/// Digits from one side's telephone-event packets.
#[derive(Debug, Clone, Default)]
pub struct DtmfReceiver {
    /// (SSRC, RTP timestamp) of the newest event seen.
    last: Option<(u32, u32)>,
    /// Its event code, longest duration seen and whether its end was seen: a key held
    /// past the 16-bit duration goes on as a new segment (RFC 4733 §2.5.1.3).
    event: u8,
    duration: u16,
    ended: bool,
}

/// A timestamp this far behind the newest event's (2 s at 8 kHz) means the stream
/// started over, not a late packet.
const RESTART_BEHIND: i32 = 16_000;

impl DtmfReceiver {
    /// A telephone-event packet (its SSRC, timestamp and payload): the key pressed when
    /// it starts an event not seen before.
    pub fn on_event(&mut self, ssrc: u32, timestamp: u32, payload: &[u8]) -> Option<char> {
        let ev = TelephoneEvent::parse(payload)?;
        if let Some((last_ssrc, last_ts)) = self.last {
            let ahead = timestamp.wrapping_sub(last_ts);
            // Same event (updates, the redundant end packets), or a late packet of an
            // earlier one (its timestamp behind the newest, modulo wrap-around). Far
            // behind is no late packet but a stream started over with the same SSRC
            // (a phone after a re-INVITE, a recording played again): a new event.
            let restarted = (ahead as i32) < -RESTART_BEHIND;
            if last_ssrc == ssrc && (ahead as i32) <= 0 && !restarted {
                if ahead == 0 {
                    self.duration = self.duration.max(ev.duration);
                    self.ended |= ev.end;
                }
                return None;
            }
            // The next segment of a key still held: it starts where the last one ended.
            let continues = last_ssrc == ssrc
                && ev.event == self.event
                && !self.ended
                && self.duration == u16::MAX
                && ahead <= u32::from(u16::MAX) + 1_600;
            if continues {
                self.last = Some((ssrc, timestamp));
                self.duration = ev.duration;
                self.ended = ev.end;
                return None;
            }
        }
        self.last = Some((ssrc, timestamp));
        self.event = ev.event;
        self.duration = ev.duration;
        self.ended = ev.end;
        ev.digit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: u8, end: bool, duration: u16) -> [u8; 4] {
        let d = duration.to_be_bytes();
        [event, if end { 0x80 | 10 } else { 10 }, d[0], d[1]]
    }

    #[test]
    fn parses_the_payload() {
        let e = TelephoneEvent::parse(&ev(11, true, 1280)).unwrap();
        assert_eq!(
            e,
            TelephoneEvent {
                event: 11,
                end: true,
                volume: 10,
                duration: 1280
            }
        );
        assert_eq!(e.digit(), Some('#'));
        assert_eq!(TelephoneEvent::parse(&[1, 2, 3]), None);
        assert_eq!(digit_of(16), None);
        for d in "0123456789*#ABCD".chars() {
            assert_eq!(digit_of(event_of(d).unwrap()), Some(d));
        }
    }

    #[test]
    fn one_digit_per_key_press_whatever_the_packets() {
        let mut r = DtmfReceiver::default();
        // Key 1: start, two updates, three end packets.
        assert_eq!(r.on_event(7, 1000, &ev(1, false, 160)), Some('1'));
        assert_eq!(r.on_event(7, 1000, &ev(1, false, 320)), None);
        assert_eq!(r.on_event(7, 1000, &ev(1, false, 480)), None);
        for _ in 0..3 {
            assert_eq!(r.on_event(7, 1000, &ev(1, true, 640)), None);
        }
        // Key 1 again: a new event (new timestamp) even though the digit is the same.
        assert_eq!(r.on_event(7, 3000, &ev(1, false, 160)), Some('1'));
        // Only the end packets of key 2 arrived: still one digit.
        assert_eq!(r.on_event(7, 5000, &ev(2, true, 800)), Some('2'));
        assert_eq!(r.on_event(7, 5000, &ev(2, true, 800)), None);
        // A late packet of key 1 changes nothing.
        assert_eq!(r.on_event(7, 3000, &ev(1, true, 640)), None);
        // Timestamps wrap around.
        let mut r = DtmfReceiver::default();
        assert_eq!(r.on_event(7, u32::MAX - 100, &ev(3, false, 160)), Some('3'));
        assert_eq!(r.on_event(7, 60, &ev(4, false, 160)), Some('4'));
        // A new source (the phone restarted its stream) starts over.
        assert_eq!(r.on_event(9, 0, &ev(5, false, 160)), Some('5'));
        // Flash is not a digit.
        assert_eq!(r.on_event(9, 800, &ev(16, false, 160)), None);
    }

    #[test]
    fn a_key_held_past_the_longest_duration_is_one_press() {
        let mut r = DtmfReceiver::default();
        assert_eq!(r.on_event(7, 1000, &ev(5, false, 160)), Some('5'));
        assert_eq!(r.on_event(7, 1000, &ev(5, false, u16::MAX)), None);
        // The next segment: a new timestamp 65535 later, same key, no end seen.
        let next = 1000 + u32::from(u16::MAX);
        assert_eq!(r.on_event(7, next, &ev(5, false, 160)), None);
        assert_eq!(r.on_event(7, next, &ev(5, true, 4000)), None);
        // Pressed again afterwards: a new press.
        assert_eq!(r.on_event(7, next + 8000, &ev(5, false, 160)), Some('5'));
        // Another key right after a saturated segment is a new press.
        let mut r = DtmfReceiver::default();
        r.on_event(7, 0, &ev(1, false, u16::MAX));
        assert_eq!(
            r.on_event(7, u32::from(u16::MAX), &ev(2, false, 160)),
            Some('2')
        );
    }

    #[test]
    fn a_stream_started_over_with_the_same_ssrc_gives_new_keys() {
        let mut r = DtmfReceiver::default();
        assert_eq!(r.on_event(7, 92_640, &ev(11, false, 160)), Some('#'));
        assert_eq!(r.on_event(7, 92_640, &ev(11, true, 800)), None);
        // A late end packet of an earlier key (100 ms behind): nothing.
        assert_eq!(r.on_event(7, 91_840, &ev(3, true, 800)), None);
        // Ten seconds behind: the stream started over.
        assert_eq!(r.on_event(7, 13_280, &ev(1, false, 160)), Some('1'));
        assert_eq!(r.on_event(7, 31_040, &ev(3, false, 160)), Some('3'));
    }
}
