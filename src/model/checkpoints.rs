//! Where a term's owned partitions stood in the cluster stream at each snapshot barrier: the
//! JetStream source notes it as it sends the barrier, and the cluster's state saver splits the
//! snapshot by partition with it. Shared through this layer because the source and the cluster
//! adapters stand on their own.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

/// Where each owned partition stood at every snapshot barrier of a term: the source notes it
/// ([`Checkpoints::mark`]) as it sends the barrier, and the saver looks up the snapshot's LSN
/// ([`Checkpoints::at`]) to split it. Snapshots reach the saver in barrier order, so marks
/// before the one looked up are dropped; at most [`Checkpoints::CAP`] wait (a barrier every
/// snapshot interval, taken off as soon as the snapshot is saved), the oldest dropped beyond,
/// whose snapshot is then not saved (a warning; the next one is).
#[derive(Debug, Default)]
pub struct Checkpoints {
    marks: Mutex<VecDeque<(u64, Positions)>>,
}

/// Per owned partition, the first stream sequence not yet delivered.
pub type Positions = Arc<[(u32, u64)]>;

impl Checkpoints {
    pub const CAP: usize = 64;

    /// At barrier `lsn`, each owned partition's first stream sequence not yet delivered.
    pub fn mark(&self, lsn: u64, positions: Positions) {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        if marks.back().is_some_and(|(last, _)| *last == lsn) {
            // No delivery since the last barrier: the same positions.
            return;
        }
        if marks.len() == Self::CAP {
            marks.pop_front();
        }
        marks.push_back((lsn, positions));
    }

    /// The positions marked at barrier `lsn`, forgetting earlier ones; kept for a second look
    /// (the last snapshot comes again once its outbox is up to date).
    pub fn at(&self, lsn: u64) -> Option<Positions> {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        while marks.front().is_some_and(|(marked, _)| *marked < lsn) {
            marks.pop_front();
        }
        marks
            .front()
            .filter(|(marked, _)| *marked == lsn)
            .map(|(_, positions)| positions.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_give_each_barrier_its_positions_and_forget_earlier_ones() {
        let checkpoints = Checkpoints::default();
        let at = |positions: &[(u32, u64)]| -> Arc<[(u32, u64)]> { positions.into() };
        checkpoints.mark(10, at(&[(1, 50), (3, 7)]));
        checkpoints.mark(10, at(&[(1, 99)]));
        checkpoints.mark(20, at(&[(1, 60), (3, 7)]));
        checkpoints.mark(30, at(&[(1, 61), (3, 90)]));
        assert_eq!(checkpoints.at(20).as_deref(), Some(&[(1, 60), (3, 7)][..]));
        assert_eq!(
            checkpoints.at(20).as_deref(),
            Some(&[(1, 60), (3, 7)][..]),
            "the last snapshot comes again with its outbox up to date"
        );
        assert_eq!(checkpoints.at(10), None, "earlier marks are gone");
        assert_eq!(checkpoints.at(25), None, "no barrier at 25");
        assert_eq!(checkpoints.at(30).as_deref(), Some(&[(1, 61), (3, 90)][..]));
        for lsn in 0..(Checkpoints::CAP as u64 + 5) {
            checkpoints.mark(100 + lsn, at(&[(0, lsn)]));
        }
        assert_eq!(
            checkpoints.at(100),
            None,
            "the oldest beyond the cap is dropped"
        );
        assert_eq!(checkpoints.at(105).as_deref(), Some(&[(0, 5)][..]));
    }
}
