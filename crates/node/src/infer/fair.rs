//! Fair shares of the engine's queue among its clients (the node's own key and
//! each client key, see [`crate::keys`]).
//!
//! Two rules, so that one busy client can neither starve nor lock out another:
//!
//! - **Admission**: one client may hold at most half the waiting places
//!   ([`Shares::share`]); past it its next request gets 429 while others still
//!   find room.
//! - **Order**: waiting jobs are taken round-robin across clients, first come
//!   first served within one client ([`FairQueue`]). A client that sends one
//!   request behind another's ten waits for one of them, not ten.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::Job;

/// Waiting jobs per client, counted from submission until a job is taken for a
/// sequence. Bounded: a client with nothing waiting has no entry, and clients
/// are the node's key plus at most [`crate::keys::MAX_KEYS`] client keys.
#[derive(Debug, Default)]
pub(crate) struct Shares {
    waiting: Mutex<HashMap<String, usize>>,
}

impl Shares {
    /// Waiting places one client may hold out of `max_queue`.
    pub(crate) fn share(max_queue: usize) -> usize {
        max_queue.div_ceil(2).max(1)
    }

    /// Counts one more job for `client` unless it already holds `share`;
    /// `Err` gives how many it holds.
    pub(crate) fn try_add(&self, client: &str, share: usize) -> Result<(), usize> {
        let mut map = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let held = map.get(client).copied().unwrap_or(0);
        if held >= share {
            return Err(held);
        }
        map.insert(client.to_string(), held + 1);
        Ok(())
    }

    /// One of `client`'s jobs left the queue (taken, or refused after counting).
    pub(crate) fn remove(&self, client: &str) {
        let mut map = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(client);
            }
        }
    }

    /// Jobs `client` has waiting.
    pub(crate) fn waiting(&self, client: &str) -> usize {
        let map = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        map.get(client).copied().unwrap_or(0)
    }
}

/// The engine thread's waiting jobs, one line per client, served round-robin.
#[derive(Default)]
pub(crate) struct FairQueue {
    /// Clients with jobs waiting, the next to be served first.
    lines: VecDeque<(String, VecDeque<Job>)>,
}

impl FairQueue {
    /// Whether no job waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Adds `job` to the end of its client's line.
    pub(crate) fn push(&mut self, job: Job) {
        match self
            .lines
            .iter_mut()
            .find(|(c, _)| *c == job.request.client)
        {
            Some((_, line)) => line.push_back(job),
            None => self
                .lines
                .push_back((job.request.client.clone(), VecDeque::from([job]))),
        }
    }

    /// The next job: the oldest of the client at the front, which then goes to
    /// the back (or leaves when it has nothing more waiting).
    #[cfg(test)]
    pub(crate) fn pop(&mut self) -> Option<Job> {
        self.pop_if(|_| true)
    }

    /// The next job if `ok` accepts it; else it stays first in line (a
    /// request for another LoRA adapter waits for the running ones to end
    /// without being overtaken).
    pub(crate) fn pop_if(&mut self, ok: impl FnOnce(&Job) -> bool) -> Option<Job> {
        if !ok(self.lines.front()?.1.front()?) {
            return None;
        }
        let (client, mut line) = self.lines.pop_front()?;
        let job = line.pop_front();
        if !line.is_empty() {
            self.lines.push_back((client, line));
        }
        job
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::{GenerateRequest, SamplingParams};
    use std::time::Instant;

    fn job(client: &str, prompt: &str) -> Job {
        let (events, _) = tokio::sync::mpsc::channel(1);
        Job {
            request: GenerateRequest {
                prompt: prompt.into(),
                params: SamplingParams::default(),
                client: client.into(),
                adapter: None,
            },
            events,
            enqueued: Instant::now(),
        }
    }

    #[test]
    fn clients_take_turns_and_each_keeps_its_order() {
        let mut q = FairQueue::default();
        for p in ["a1", "a2", "a3"] {
            q.push(job("a", p));
        }
        q.push(job("b", "b1"));
        q.push(job("c", "c1"));
        q.push(job("b", "b2"));
        let order: Vec<String> = std::iter::from_fn(|| q.pop().map(|j| j.request.prompt)).collect();
        assert_eq!(order, ["a1", "b1", "c1", "a2", "b2", "a3"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_client_holds_at_most_its_share() {
        let s = Shares::default();
        let share = Shares::share(4);
        assert_eq!(share, 2);
        assert_eq!(Shares::share(1), 1);
        assert!(s.try_add("a", share).is_ok());
        assert!(s.try_add("a", share).is_ok());
        assert_eq!(s.try_add("a", share), Err(2));
        assert!(
            s.try_add("b", share).is_ok(),
            "another client still has room"
        );
        s.remove("a");
        assert!(s.try_add("a", share).is_ok());
        s.remove("a");
        s.remove("a");
        s.remove("b");
        assert_eq!((s.waiting("a"), s.waiting("b")), (0, 0));
        assert!(
            s.waiting.lock().expect("lock").is_empty(),
            "no entry left behind"
        );
    }
}
