//! Recognising redelivered readings per device, in little memory: a sliding window over the
//! device's sequence numbers (16 bytes per device, the anti-replay window of IPsec), or, for
//! payloads without one, a short ring of payload hashes.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// How far below the highest sequence number a reading is still checked against the window.
/// Further below is taken as the device having restarted its counter, not as a duplicate.
pub const SEQ_WINDOW: u64 = 64;

/// What one device's recent readings were.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recent {
    /// The highest sequence number seen, and a bitmap of the window below it: bit `i` set means
    /// `highest - i` was seen.
    seq: Option<(u64, u64)>,
    /// Hashes of recent payloads without a sequence number, oldest first.
    hashes: VecDeque<u64>,
}

impl Recent {
    /// Records `seq`; true if it was already seen (a redelivery).
    pub fn seen_seq(&mut self, seq: u64) -> bool {
        let Some((highest, bits)) = self.seq else {
            self.seq = Some((seq, 1));
            return false;
        };
        if seq > highest {
            let shift = seq - highest;
            let bits = if shift >= SEQ_WINDOW {
                0
            } else {
                bits << shift
            };
            self.seq = Some((seq, bits | 1));
            return false;
        }
        let back = highest - seq;
        if back >= SEQ_WINDOW {
            // Far below the window: the device restarted its counter. Start a new window.
            self.seq = Some((seq, 1));
            return false;
        }
        let bit = 1u64 << back;
        if bits & bit != 0 {
            return true;
        }
        self.seq = Some((highest, bits | bit));
        false
    }

    /// Records a payload hash; true if it is among the last `horizon` ones.
    pub fn seen_hash(&mut self, hash: u64, horizon: usize) -> bool {
        if self.hashes.contains(&hash) {
            return true;
        }
        if self.hashes.len() >= horizon.max(1) {
            self.hashes.pop_front();
        }
        self.hashes.push_back(hash);
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
    fn payload_hashes_are_remembered_up_to_the_horizon() {
        let mut recent = Recent::default();
        for hash in 0..4 {
            assert!(!recent.seen_hash(hash, 3));
        }
        assert!(recent.seen_hash(3, 3));
        assert!(!recent.seen_hash(0, 3), "0 fell out of a horizon of 3");
    }
}
