//! The node's background work: one tracker and one shutdown token for every task
//! a node spawns (network loop, pipeline links and steps, downloads, credit and
//! pool handlers, retries), so that stopping a node ends all of them and an
//! in-process node (the desktop app, tests) releases its database and ports.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Spawns tasks that end with the node. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// The runtime the node started on: tasks go there even when spawned from
    /// a thread outside it (a GUI shell's main thread).
    runtime: Option<tokio::runtime::Handle>,
}

impl Tasks {
    /// Tasks that stop when `shutdown` is cancelled, on the current runtime.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            tracker: TaskTracker::new(),
            shutdown,
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// Runs `task` until it ends or the node shuts down (then it is dropped at
    /// its next await point).
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let shutdown = self.shutdown.clone();
        let task = async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = task => {}
            }
        };
        match &self.runtime {
            Some(runtime) => drop(self.tracker.spawn_on(task, runtime)),
            None => drop(self.tracker.spawn(task)),
        }
    }

    /// Cancelled when the node shuts down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Shuts down and waits up to `limit` for every task to end; whether all did.
    pub async fn stop(&self, limit: Duration) -> bool {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(limit, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// A subsystem's hold on the node's tasks, given when the subsystem is attached
/// to a network; before that (a node without P2P) its tasks run untracked.
#[derive(Debug, Default)]
pub(crate) struct LateTasks(std::sync::OnceLock<Tasks>);

impl LateTasks {
    /// Takes the node's tasks (the first call wins).
    pub(crate) fn set(&self, tasks: Tasks) {
        let _ = self.0.set(tasks);
    }

    /// Runs `task` as one of the node's tasks, or as a plain task before any.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match self.0.get() {
            Some(tasks) => tasks.spawn(task),
            None => {
                tokio::spawn(task);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_ends_every_task_even_endless_ones() {
        let tasks = Tasks::default();
        for _ in 0..3 {
            tasks.spawn(async {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
        assert_eq!(tasks.running(), 3);
        assert!(tasks.stop(Duration::from_secs(5)).await);
        assert_eq!(tasks.running(), 0);
    }
}
