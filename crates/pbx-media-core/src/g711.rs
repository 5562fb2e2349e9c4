//! G.711 μ-law and A-law (ITU-T G.711), each to and from 16-bit linear: a message
//! recorded from a phone speaking one law is played to a phone speaking the other.

/// μ-law byte to linear.
pub fn ulaw_to_linear(u: u8) -> i16 {
    let u = !u;
    let exponent = (u >> 4) & 0x07;
    let mantissa = i32::from(u & 0x0F);
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    if u & 0x80 != 0 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

/// Linear to μ-law byte.
pub fn linear_to_ulaw(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32_635;
    let mut s = i32::from(sample);
    let sign = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    let s = s.min(CLIP) + BIAS;
    let exponent = (7 - (s >> 7).leading_zeros().saturating_sub(24)).min(7) as i32;
    let exponent = if s < 0x100 { 0 } else { exponent };
    let mantissa = (s >> (exponent + 3)) & 0x0F;
    !(sign | (exponent << 4) as u8 | mantissa as u8)
}

/// A-law byte to linear.
pub fn alaw_to_linear(a: u8) -> i16 {
    let a = a ^ 0x55;
    let exponent = i32::from((a >> 4) & 0x07);
    let mantissa = i32::from(a & 0x0F);
    let magnitude = match exponent {
        0 => (mantissa << 4) + 8,
        e => ((mantissa << 4) + 0x108) << (e - 1),
    };
    if a & 0x80 != 0 {
        magnitude as i16
    } else {
        -magnitude as i16
    }
}

/// Linear to A-law byte.
pub fn linear_to_alaw(sample: i16) -> u8 {
    let s = i32::from(sample);
    let (sign, magnitude) = if s >= 0 { (0x80, s) } else { (0x00, -s - 1) };
    let magnitude = magnitude.min(0x7FFF);
    let byte = if magnitude < 0x100 {
        (magnitude >> 4) as u8
    } else {
        // The segment: the position of the highest bit above bit 7.
        let exponent = (31 - magnitude.leading_zeros() as i32 - 7).clamp(1, 7);
        let mantissa = (magnitude >> (exponent + 3)) & 0x0F;
        ((exponent << 4) | mantissa) as u8
    };
    (sign | byte) ^ 0x55
}

/// `audio` in payload type `from` (0 PCMU, 8 PCMA) as payload type `to`.
pub fn transcode(audio: &[u8], from: u8, to: u8) -> Vec<u8> {
    match (from, to) {
        (0, 8) => audio
            .iter()
            .map(|&b| linear_to_alaw(ulaw_to_linear(b)))
            .collect(),
        (8, 0) => audio
            .iter()
            .map(|&b| linear_to_ulaw(alaw_to_linear(b)))
            .collect(),
        _ => audio.to_vec(),
    }
}

/// `audio` (payload type 0 PCMU or 8 PCMA, 8 kHz mono) as a WAV file: format 7 (μ-law)
/// or 6 (A-law) as written, with the `fact` chunk non-PCM formats carry.
pub fn wav(audio: &[u8], payload_type: u8) -> Vec<u8> {
    let format: u16 = if payload_type == 8 { 6 } else { 7 };
    let n = audio.len() as u32;
    let mut w = Vec::with_capacity(58 + audio.len() + 1);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(50 + n + (n & 1)).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&18u32.to_le_bytes());
    w.extend_from_slice(&format.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes()); // mono
    w.extend_from_slice(&8000u32.to_le_bytes()); // samples a second
    w.extend_from_slice(&8000u32.to_le_bytes()); // bytes a second
    w.extend_from_slice(&1u16.to_le_bytes()); // block align
    w.extend_from_slice(&8u16.to_le_bytes()); // bits a sample
    w.extend_from_slice(&0u16.to_le_bytes()); // no extension
    w.extend_from_slice(b"fact");
    w.extend_from_slice(&4u32.to_le_bytes());
    w.extend_from_slice(&n.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&n.to_le_bytes());
    w.extend_from_slice(audio);
    if n & 1 == 1 {
        w.push(0); // chunks are padded to an even length
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each law's 256 codes survive a round trip through linear, silence is silence,
    /// and the other law keeps a sample within that law's step.
    #[test]
    fn both_laws_round_trip_and_convert() {
        for b in 0..=255u8 {
            let u = ulaw_to_linear(b);
            // 0x7F and 0xFF are both zero in μ-law.
            if b != 0x7F {
                assert_eq!(linear_to_ulaw(u), b, "μ-law {b:#x} ({u})");
            }
            let a = alaw_to_linear(b);
            assert_eq!(linear_to_alaw(a), b, "A-law {b:#x} ({a})");
        }
        assert_eq!(ulaw_to_linear(0xFF), 0);
        assert_eq!(alaw_to_linear(0xD5), 8);
        assert_eq!(linear_to_alaw(0), 0xD5);
        assert_eq!(linear_to_ulaw(0), 0xFF);
        for s in [-32_000i16, -1_000, -100, 0, 100, 1_000, 8_000, 32_000] {
            let via = alaw_to_linear(transcode(&[linear_to_ulaw(s)], 0, 8)[0]);
            let err = (i32::from(via) - i32::from(s)).abs();
            assert!(err <= i32::from(s).abs() / 16 + 16, "{s} became {via}");
        }
        assert_eq!(transcode(&[1, 2], 0, 0), vec![1, 2]);
    }

    #[test]
    fn a_wav_holds_the_audio_as_recorded() {
        let w = wav(&[0xFF, 0x7F, 0x00], 0);
        assert_eq!(&w[..4], b"RIFF");
        assert_eq!(
            u32::from_le_bytes(w[4..8].try_into().unwrap()) as usize,
            w.len() - 8
        );
        assert_eq!(u16::from_le_bytes([w[20], w[21]]), 7);
        assert_eq!(&w[38..42], b"fact");
        assert_eq!(&w[50..54], b"data");
        assert_eq!(&w[58..61], &[0xFF, 0x7F, 0x00]);
        assert_eq!(w.len(), 62, "padded to an even length");
        assert_eq!(u16::from_le_bytes([wav(&[], 8)[20], 0]), 6);
    }
}
