//! What each peer has in flight (requests being answered, links being served), so
//! that one peer cannot take every slot of a shared limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// In-flight counts by peer; entries go when they reach zero.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    counts: Mutex<HashMap<String, usize>>,
}

/// One peer's slot, released when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    owner: Arc<InFlight>,
    peer: String,
}

impl InFlight {
    /// A slot for `peer` if it has fewer than `max` in flight.
    pub(crate) fn try_acquire(self: &Arc<Self>, peer: &str, max: usize) -> Option<Slot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(peer.to_string()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: Arc::clone(self),
            peer: peer.to_string(),
        })
    }
}

impl InFlight {
    /// The counts now, for weighing choices.
    pub(crate) fn snapshot(&self) -> HashMap<String, u32> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), u32::try_from(*v).unwrap_or(u32::MAX)))
            .collect()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_at_most_max_slots_and_others_are_unaffected() {
        let inflight = Arc::new(InFlight::default());
        let held: Vec<Slot> = (0..3)
            .filter_map(|_| inflight.try_acquire("a", 3))
            .collect();
        assert_eq!(held.len(), 3);
        assert!(inflight.try_acquire("a", 3).is_none());
        assert!(inflight.try_acquire("b", 3).is_some());
        drop(held);
        assert!(inflight.try_acquire("a", 3).is_some());
        assert!(
            inflight
                .counts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        );
    }
}
