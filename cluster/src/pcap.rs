//! The pcap capture format (libpcap's classic one, which tcpdump and Wireshark read): a global
//! header, then one record per frame. Pure encoding; the hub's taps write it live.
//!
//! Written in the host's byte order with the microsecond magic `0xa1b2c3d4` (readers detect
//! the order from the magic), version 2.4, link type Ethernet (1) and a snap length of 65535
//! bytes: a longer frame is recorded cut to that, with its original length.

use std::time::SystemTime;

/// The magic of a microsecond-resolution capture, in the writer's byte order.
pub const MAGIC: u32 = 0xa1b2_c3d4;
/// The longest frame a record holds whole.
pub const SNAPLEN: u32 = 65_535;
/// `LINKTYPE_ETHERNET`: every record is an Ethernet frame.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// The size of a record's header (before the frame's bytes).
pub const RECORD_HEADER: usize = 16;

/// The file's first 24 bytes.
pub fn global_header() -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&MAGIC.to_ne_bytes());
    h[4..6].copy_from_slice(&2u16.to_ne_bytes()); // version 2.4
    h[6..8].copy_from_slice(&4u16.to_ne_bytes());
    // thiszone (GMT offset) and sigfigs: 0.
    h[16..20].copy_from_slice(&SNAPLEN.to_ne_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_ne_bytes());
    h
}

/// One record: `frame` seen at `at` (a time before the epoch is recorded as the epoch).
pub fn record(at: SystemTime, frame: &[u8]) -> Vec<u8> {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let incl = frame.len().min(SNAPLEN as usize);
    let mut r = Vec::with_capacity(RECORD_HEADER + incl);
    // The classic format's seconds are 32 bits (until 2106, read unsigned).
    r.extend_from_slice(&(since.as_secs() as u32).to_ne_bytes());
    r.extend_from_slice(&since.subsec_micros().to_ne_bytes());
    r.extend_from_slice(&(incl as u32).to_ne_bytes());
    r.extend_from_slice(&(u32::try_from(frame.len()).unwrap_or(u32::MAX)).to_ne_bytes());
    r.extend_from_slice(&frame[..incl]);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn u32_at(b: &[u8], i: usize) -> u32 {
        u32::from_ne_bytes(b[i..i + 4].try_into().unwrap())
    }

    #[test]
    fn the_global_header_names_ethernet_in_microseconds() {
        let h = global_header();
        assert_eq!(u32_at(&h, 0), 0xa1b2_c3d4);
        assert_eq!(u16::from_ne_bytes([h[4], h[5]]), 2);
        assert_eq!(u16::from_ne_bytes([h[6], h[7]]), 4);
        assert_eq!(u32_at(&h, 8), 0, "thiszone");
        assert_eq!(u32_at(&h, 12), 0, "sigfigs");
        assert_eq!(u32_at(&h, 16), 65_535);
        assert_eq!(u32_at(&h, 20), 1);
        if cfg!(target_endian = "little") {
            assert_eq!(&h[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        }
    }

    #[test]
    fn a_record_carries_its_time_lengths_and_bytes() {
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let frame: Vec<u8> = (0..60u8).collect();
        let r = record(at, &frame);
        assert_eq!(r.len(), RECORD_HEADER + 60);
        assert_eq!(u32_at(&r, 0), 1_700_000_000);
        assert_eq!(u32_at(&r, 4), 123_456, "microseconds, truncated");
        assert_eq!(u32_at(&r, 8), 60);
        assert_eq!(u32_at(&r, 12), 60);
        assert_eq!(&r[16..], &frame[..]);
    }

    #[test]
    fn a_frame_longer_than_the_snap_length_is_cut_with_its_length_kept() {
        let frame = vec![7u8; 65_536];
        let r = record(SystemTime::UNIX_EPOCH, &frame);
        assert_eq!(u32_at(&r, 8), 65_535);
        assert_eq!(u32_at(&r, 12), 65_536);
        assert_eq!(r.len(), RECORD_HEADER + 65_535);
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(u32_at(&record(before, b"x"), 0), 0);
    }
}
