//! Recognising redelivered readings per device, in little memory: a sliding window over the
//! device's sequence numbers (the anti-replay window of IPsec), or, for payloads without one, a
//! short ring of payload hashes. 24 bytes per device, plus the ring where there is one.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// How far below the highest sequence number a reading is still checked against the window.
/// Further below is taken as the device having restarted its counter, not as a duplicate.
pub const SEQ_WINDOW: u64 = 64;

/// What one device's recent readings were.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RecentRecord", into = "RecentRecord")]
pub struct Recent {
    /// The highest sequence number seen.
    highest: u64,
    /// A bitmap of the window below `highest`: bit `i` set means `highest - i` was seen. Bit 0 is
    /// set once a sequence number was seen, so no bit set means none was.
    bits: u64,
    /// Hashes of recent payloads without a sequence number, oldest first. Boxed (8 bytes when
    /// absent, against 32 for an empty `VecDeque`): a device whose readings have a sequence
    /// number never needs it.
    #[allow(clippy::box_collection)]
    hashes: Option<Box<VecDeque<u64>>>,
}

/// How a [`Recent`] is written in snapshots: its layout before it was packed, so snapshots of
/// either version restore in the other.
#[derive(Serialize, Deserialize)]
struct RecentRecord {
    seq: Option<(u64, u64)>,
    hashes: VecDeque<u64>,
}

impl From<RecentRecord> for Recent {
    fn from(record: RecentRecord) -> Self {
        let (highest, bits) = record
            .seq
            .map_or((0, 0), |(highest, bits)| (highest, bits | 1));
        Self {
            highest,
            bits,
            hashes: (!record.hashes.is_empty()).then(|| Box::new(record.hashes)),
        }
    }
}

impl From<Recent> for RecentRecord {
    fn from(recent: Recent) -> Self {
        Self {
            seq: (recent.bits != 0).then_some((recent.highest, recent.bits)),
            hashes: recent.hashes.map(|hashes| *hashes).unwrap_or_default(),
        }
    }
}

impl Recent {
    /// Records `seq`; true if it was already seen (a redelivery).
    pub fn seen_seq(&mut self, seq: u64) -> bool {
        let (highest, bits) = (self.highest, self.bits);
        if bits == 0 {
            (self.highest, self.bits) = (seq, 1);
            return false;
        }
        if seq > highest {
            let shift = seq - highest;
            let bits = if shift >= SEQ_WINDOW {
                0
            } else {
                bits << shift
            };
            (self.highest, self.bits) = (seq, bits | 1);
            return false;
        }
        let back = highest - seq;
        if back >= SEQ_WINDOW {
            // Far below the window: the device restarted its counter. Start a new window.
            (self.highest, self.bits) = (seq, 1);
            return false;
        }
        let bit = 1u64 << back;
        if bits & bit != 0 {
            return true;
        }
        self.bits = bits | bit;
        false
    }

    /// Records a payload hash; true if it is among the last `horizon` ones.
    pub fn seen_hash(&mut self, hash: u64, horizon: usize) -> bool {
        let hashes = self.hashes.get_or_insert_with(Box::default);
        if hashes.contains(&hash) {
            return true;
        }
        if hashes.len() >= horizon.max(1) {
            hashes.pop_front();
        }
        hashes.push_back(hash);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_number_is_seen_once() {
        let mut recent = Recent::default();
        assert!(!recent.seen_seq(10));
        assert!(recent.seen_seq(10));
        assert!(!recent.seen_seq(11));
        assert!(recent.seen_seq(10));
    }

    #[test]
    fn out_of_order_numbers_within_the_window_are_tracked() {
        let mut recent = Recent::default();
        for seq in [100, 98, 99, 97] {
            assert!(!recent.seen_seq(seq), "{seq}");
        }
        for seq in [100, 98, 99, 97] {
            assert!(recent.seen_seq(seq), "{seq}");
        }
        assert!(!recent.seen_seq(96));
        assert!(!recent.seen_seq(100 + SEQ_WINDOW));
        assert!(recent.seen_seq(100 + SEQ_WINDOW));
    }

    #[test]
    fn a_counter_far_below_the_window_is_a_device_restart() {
        let mut recent = Recent::default();
        assert!(!recent.seen_seq(5_000));
        assert!(!recent.seen_seq(0));
        assert!(!recent.seen_seq(1));
        assert!(recent.seen_seq(0));
    }

    #[test]
    fn snapshots_keep_the_layout_from_before_the_window_was_packed() {
        #[derive(Serialize, Deserialize)]
        struct Unpacked {
            seq: Option<(u64, u64)>,
            hashes: VecDeque<u64>,
        }
        fn cbor(value: &impl Serialize) -> Vec<u8> {
            let mut bytes = Vec::new();
            ciborium::into_writer(value, &mut bytes).unwrap();
            bytes
        }
        let mut recent = Recent::default();
        for seq in [7, 9] {
            recent.seen_seq(seq);
        }
        recent.seen_hash(42, 4);
        let unpacked: Unpacked = ciborium::from_reader(&cbor(&recent)[..]).unwrap();
        assert_eq!(unpacked.seq, Some((9, 0b101)));
        assert_eq!(unpacked.hashes, [42]);
        let restored: Recent = ciborium::from_reader(&cbor(&unpacked)[..]).unwrap();
        assert_eq!(restored, recent);
        let empty = Unpacked {
            seq: None,
            hashes: VecDeque::new(),
        };
        let restored: Recent = ciborium::from_reader(&cbor(&empty)[..]).unwrap();
        assert_eq!(restored, Recent::default());
    }

    #[test]
    fn payload_hashes_are_remembered_up_to_the_horizon() {
        let mut recent = Recent::default();
        for hash in 0..4 {
            assert!(!recent.seen_hash(hash, 3));
        }
        assert!(recent.seen_hash(3, 3));
        assert!(!recent.seen_hash(0, 3), "0 fell out of a horizon of 3");
    }
}
