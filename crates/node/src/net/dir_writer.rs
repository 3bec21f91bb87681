//! Peer-directory writes, applied one at a time in the order the event loop made
//! them.
//!
//! Why not one blocking task per write: the pool runs them in any order, so a
//! peer's "connected" could land before the "disconnected" that came first and
//! leave a live peer marked inactive for good.

use std::sync::mpsc;

use super::directory::Directory;
use crate::store::StoreError;

/// Writes waiting to be applied; beyond this a write is dropped (and logged)
/// rather than let a flood of peer events grow memory without bound.
const QUEUE: usize = 4096;

type Job = (
    &'static str,
    Box<dyn FnOnce(&Directory) -> Result<(), StoreError> + Send>,
);

/// The sending side; the writer thread ends when it is dropped.
pub(super) struct DirectoryWriter {
    tx: mpsc::SyncSender<Job>,
}

impl DirectoryWriter {
    /// Starts the writer thread over `directory`.
    pub(super) fn spawn(directory: Directory) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        std::thread::Builder::new()
            .name("p2p-directory".into())
            .spawn(move || {
                for (what, job) in rx {
                    if let Err(e) = job(&directory) {
                        tracing::warn!(error = %e, "peer directory: {what} failed");
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Queues `job` behind every write queued before it.
    pub(super) fn write(
        &self,
        what: &'static str,
        job: impl FnOnce(&Directory) -> Result<(), StoreError> + Send + 'static,
    ) {
        match self.tx.try_send((what, Box::new(job))) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                tracing::warn!("peer directory: write queue full; {what} dropped");
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                tracing::debug!("peer directory: writer stopped; {what} dropped");
            }
        }
    }
}
