//! Updates of this build: what a newer version is, and getting it.
//!
//! The node does not know how the program it runs in is installed, so it asks
//! an [`Updater`] that the shell provides: the desktop app's is Tauri's updater
//! (a release manifest from the configured endpoint, the artifact's minisign
//! signature checked against the key the app trusts before anything is
//! installed). `swarmllm` on its own has none: its package manager updates it,
//! and the API says so. The node keeps what the last check found, tells
//! dashboards (`update_available` on the WebSocket), checks again every
//! `update_check_interval_hours`, and applies one update at a time.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

/// A boxed future, for the object-safe [`Updater`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A newer version on offer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Available {
    /// Its version.
    pub version: String,
    /// The running version.
    pub current_version: String,
    /// Its release notes (the changelog).
    pub notes: Option<String>,
    /// When it was published (RFC 3339), if the manifest says.
    pub pub_date: Option<String>,
}

/// An update that was installed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Applied {
    /// The version now installed.
    pub version: String,
    /// The running process is still the old version until it restarts.
    pub restart_required: bool,
}

/// Checking for or applying an update failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// This build cannot update itself (or has no update source configured).
    #[error("{0}")]
    Unsupported(String),
    /// Nothing newer is on offer.
    #[error("no newer version is on offer (running {0})")]
    NoUpdate(String),
    /// Another apply is running.
    #[error("an update is already being applied")]
    Busy,
    /// The update server could not be reached or answered nonsense.
    #[error("the update server: {0}")]
    Server(String),
    /// The artifact is unsigned, tampered with, signed by another key, or
    /// signed for another version: nothing was installed.
    #[error("the update was refused, its signature does not hold: {0}")]
    Signature(String),
    /// Installing the verified artifact failed.
    #[error("installing the update failed: {0}")]
    Install(String),
}

/// How this build updates itself: implemented by the shell.
pub trait Updater: Send + Sync {
    /// Asks the update source for a newer version.
    fn check(&self) -> BoxFuture<'_, Result<Option<Available>, UpdateError>>;
    /// Downloads the newer version, verifies its signature and installs it.
    fn apply(&self) -> BoxFuture<'_, Result<Applied, UpdateError>>;
}

/// What `GET /api/admin/version` and the update routes report.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateStatus {
    /// Whether this build can update itself.
    pub supported: bool,
    /// What the last check found.
    pub available: Option<Available>,
    /// The update installed since start, waiting for a restart.
    pub applied: Option<Applied>,
    /// When the last check ran (RFC 3339).
    pub last_check: Option<String>,
}

/// The node's side of updates; cloneable.
#[derive(Clone)]
pub struct Updates {
    inner: Arc<Inner>,
}

struct Inner {
    updater: OnceLock<Arc<dyn Updater>>,
    available: watch::Sender<Option<Available>>,
    applied: Mutex<Option<Applied>>,
    last_check: Mutex<Option<String>>,
    /// One apply at a time.
    applying: tokio::sync::Mutex<()>,
}

impl Default for Updates {
    fn default() -> Self {
        Updates {
            inner: Arc::new(Inner {
                updater: OnceLock::new(),
                available: watch::channel(None).0,
                applied: Mutex::new(None),
                last_check: Mutex::new(None),
                applying: tokio::sync::Mutex::new(()),
            }),
        }
    }
}

const NO_UPDATER: &str = "this build does not update itself: update it with the package \
    manager or installer it came from (the desktop app updates itself)";

impl Updates {
    /// Installs the shell's updater; `false` if one was already set.
    pub fn set_updater(&self, updater: Arc<dyn Updater>) -> bool {
        self.inner.updater.set(updater).is_ok()
    }

    fn updater(&self) -> Result<&Arc<dyn Updater>, UpdateError> {
        self.inner
            .updater
            .get()
            .ok_or_else(|| UpdateError::Unsupported(NO_UPDATER.into()))
    }

    /// Whether a shell gave this node an updater.
    pub fn supported(&self) -> bool {
        self.inner.updater.get().is_some()
    }

    /// Asks for a newer version; what it finds is kept and announced.
    pub async fn check(&self) -> Result<Option<Available>, UpdateError> {
        let found = self.updater()?.check().await;
        *self
            .inner
            .last_check
            .lock()
            .unwrap_or_else(|p| p.into_inner()) =
            Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        let found = found?;
        // Only a change wakes the dashboards.
        self.inner.available.send_if_modified(|v| {
            let changed = *v != found;
            v.clone_from(&found);
            changed
        });
        Ok(found)
    }

    /// Downloads, verifies and installs the newer version (checking first).
    pub async fn apply(&self) -> Result<Applied, UpdateError> {
        let updater = self.updater()?;
        let Ok(_one) = self.inner.applying.try_lock() else {
            return Err(UpdateError::Busy);
        };
        let applied = updater.apply().await?;
        tracing::info!(version = %applied.version, "update installed; it runs after a restart");
        *self.inner.applied.lock().unwrap_or_else(|p| p.into_inner()) = Some(applied.clone());
        self.inner.available.send_replace(None);
        Ok(applied)
    }

    /// Follows what checks find (for `update_available`).
    pub fn watch(&self) -> watch::Receiver<Option<Available>> {
        self.inner.available.subscribe()
    }

    /// Where updates stand.
    pub fn status(&self) -> UpdateStatus {
        UpdateStatus {
            supported: self.supported(),
            available: self.inner.available.borrow().clone(),
            applied: self
                .inner
                .applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            last_check: self
                .inner
                .last_check
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// Checks a minute after start, then every `every` (not at all when zero),
    /// until `stop`. A failed check is logged, not retried sooner.
    pub(crate) async fn check_periodically(
        self,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        if every.is_zero() {
            return;
        }
        let mut wait = Duration::from_secs(60).min(every);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            match self.check().await {
                Ok(Some(a)) => tracing::info!(version = %a.version, "an update is available"),
                Ok(None) => tracing::debug!("no update available"),
                Err(UpdateError::Unsupported(why)) => {
                    tracing::debug!(%why, "no update checks");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "checking for updates failed"),
            }
            wait = every;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// An updater that offers `version` and counts applies.
    struct Fake {
        offer: Mutex<Option<Available>>,
        applies: AtomicU32,
        gate: tokio::sync::Notify,
    }

    impl Updater for Fake {
        fn check(&self) -> BoxFuture<'_, Result<Option<Available>, UpdateError>> {
            Box::pin(async move { Ok(self.offer.lock().expect("lock").clone()) })
        }
        fn apply(&self) -> BoxFuture<'_, Result<Applied, UpdateError>> {
            Box::pin(async move {
                self.gate.notified().await;
                self.applies.fetch_add(1, Ordering::SeqCst);
                Ok(Applied {
                    version: "9.9.9".into(),
                    restart_required: true,
                })
            })
        }
    }

    fn offer() -> Available {
        Available {
            version: "9.9.9".into(),
            current_version: "0.1.0".into(),
            notes: Some("notes".into()),
            pub_date: None,
        }
    }

    #[tokio::test]
    async fn without_an_updater_every_call_says_so() {
        let u = Updates::default();
        assert!(!u.supported());
        assert!(matches!(u.check().await, Err(UpdateError::Unsupported(_))));
        assert!(matches!(u.apply().await, Err(UpdateError::Unsupported(_))));
    }

    #[tokio::test]
    async fn a_check_announces_a_change_once_and_applies_run_one_at_a_time() {
        let u = Updates::default();
        let fake = Arc::new(Fake {
            offer: Mutex::new(Some(offer())),
            applies: AtomicU32::new(0),
            gate: tokio::sync::Notify::new(),
        });
        assert!(u.set_updater(fake.clone()));
        let mut seen = u.watch();
        assert_eq!(u.check().await, Ok(Some(offer())));
        assert!(seen.has_changed().expect("open"));
        seen.borrow_and_update();
        // The same offer again is no news.
        u.check().await.expect("check");
        assert!(!seen.has_changed().expect("open"));
        assert!(u.status().last_check.is_some());

        let first = tokio::spawn({
            let u = u.clone();
            async move { u.apply().await }
        });
        // Wait until the first apply holds the lock, then a second is refused.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while u.inner.applying.try_lock().is_ok() {
            assert!(std::time::Instant::now() < deadline, "apply never started");
            tokio::task::yield_now().await;
        }
        assert_eq!(u.apply().await, Err(UpdateError::Busy));
        fake.gate.notify_one();
        let applied = first.await.expect("join").expect("applied");
        assert_eq!(applied.version, "9.9.9");
        assert_eq!(fake.applies.load(Ordering::SeqCst), 1);
        let status = u.status();
        assert_eq!(status.applied, Some(applied));
        assert_eq!(status.available, None);
    }
}
