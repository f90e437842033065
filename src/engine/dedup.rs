//! Recognising redelivered readings per device, in little memory: a sliding window over the
//! device's sequence numbers (the anti-replay window of IPsec), or, for payloads without one, a
//! short ring of payload hashes. 16 bytes per device, plus the ring where there is one.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::num::NonZeroU64;

/// How far below the highest sequence number a reading is still checked against the window.
/// Further below is taken as the device having restarted its counter, not as a duplicate.
pub const SEQ_WINDOW: u64 = 64;

/// What one device's recent readings were.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RecentRecord", into = "RecentRecord")]
pub struct Recent(Seen);

/// Two words: the sequence window inline, for the devices that send sequence numbers (bit 0 of
/// `bits` is set once one was seen, so the window is never zero, and zero there tells the other
/// variant apart); anything else boxed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Seq {
        /// The highest sequence number seen.
        highest: u64,
        /// A bitmap of the window below `highest`: bit `i` set means `highest - i` was seen.
        bits: NonZeroU64,
    },
    /// Nothing seen yet (`None`), or payload hashes (with a sequence window too, if the device
    /// also sent sequence numbers).
    Other(Option<Box<Mixed>>),
}

impl Default for Seen {
    fn default() -> Self {
        Seen::Other(None)
    }
}

/// A device's window when it has payload hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Mixed {
    highest: u64,
    /// As in [`Seen::Seq`]; zero when no sequence number was seen.
    bits: u64,
    /// Hashes of recent payloads without a sequence number, oldest first.
    hashes: VecDeque<u64>,
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
        Self(match NonZeroU64::new(bits) {
            Some(bits) if record.hashes.is_empty() => Seen::Seq { highest, bits },
            _ if record.hashes.is_empty() => Seen::Other(None),
            _ => Seen::Other(Some(Box::new(Mixed {
                highest,
                bits,
                hashes: record.hashes,
            }))),
        })
    }
}

impl From<Recent> for RecentRecord {
    fn from(recent: Recent) -> Self {
        let (highest, bits) = recent.window();
        Self {
            seq: (bits != 0).then_some((highest, bits)),
            hashes: match recent.0 {
                Seen::Other(Some(mixed)) => mixed.hashes,
                _ => VecDeque::new(),
            },
        }
    }
}

impl Recent {
    /// The sequence window as (highest, bits); bits is zero if no sequence number was seen.
    fn window(&self) -> (u64, u64) {
        match &self.0 {
            Seen::Seq { highest, bits } => (*highest, bits.get()),
            Seen::Other(None) => (0, 0),
            Seen::Other(Some(mixed)) => (mixed.highest, mixed.bits),
        }
    }

    fn set_window(&mut self, highest: u64, bits: NonZeroU64) {
        match &mut self.0 {
            Seen::Other(Some(mixed)) => (mixed.highest, mixed.bits) = (highest, bits.get()),
            seen => *seen = Seen::Seq { highest, bits },
        }
    }

    /// Records `seq`; true if it was already seen (a redelivery).
    pub fn seen_seq(&mut self, seq: u64) -> bool {
        let (highest, bits) = self.window();
        let one = NonZeroU64::MIN;
        if bits == 0 {
            self.set_window(seq, one);
            return false;
        }
        if seq > highest {
            let shift = seq - highest;
            let bits = if shift >= SEQ_WINDOW {
                0
            } else {
                bits << shift
            };
            self.set_window(seq, one | bits);
            return false;
        }
        let back = highest - seq;
        if back >= SEQ_WINDOW {
            // Far below the window: the device restarted its counter. Start a new window.
            self.set_window(seq, one);
            return false;
        }
        let bit = 1u64 << back;
        if bits & bit != 0 {
            return true;
        }
        self.set_window(highest, one | bits | bit);
        false
    }

    /// Records a payload hash; true if it is among the last `horizon` ones.
    pub fn seen_hash(&mut self, hash: u64, horizon: usize) -> bool {
        if let Seen::Other(Some(mixed)) = &mut self.0 {
            return remember(&mut mixed.hashes, hash, horizon);
        }
        let (highest, bits) = self.window();
        let mut mixed = Box::new(Mixed {
            highest,
            bits,
            hashes: VecDeque::new(),
        });
        let seen = remember(&mut mixed.hashes, hash, horizon);
        self.0 = Seen::Other(Some(mixed));
        seen
    }
}

/// Records `hash` in a ring of the last `horizon`; true if it was there already.
fn remember(hashes: &mut VecDeque<u64>, hash: u64, horizon: usize) -> bool {
    if hashes.contains(&hash) {
        return true;
    }
    if hashes.len() >= horizon.max(1) {
        hashes.pop_front();
    }
    hashes.push_back(hash);
    false
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
        use crate::operators::test_support::cbor;
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
        let seq_only = Unpacked {
            seq: Some((9, 0b101)),
            hashes: VecDeque::new(),
        };
        let restored: Recent = ciborium::from_reader(&cbor(&seq_only)[..]).unwrap();
        assert_eq!(cbor(&restored), cbor(&seq_only));
        assert_eq!(std::mem::size_of::<Recent>(), 16);
    }

    #[test]
    fn a_device_with_both_keeps_its_window_when_hashes_start() {
        let mut recent = Recent::default();
        assert!(!recent.seen_seq(10));
        assert!(!recent.seen_hash(1, 4));
        assert!(recent.seen_seq(10));
        assert!(!recent.seen_seq(11));
        assert!(recent.seen_hash(1, 4));
        assert!(recent.seen_seq(11));
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
