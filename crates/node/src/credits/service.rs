//! The network side of the ledger: receipts after split generations, transfers,
//! pool forwards, and the balance summaries behind tiers and the leaderboard.
//!
//! Messages travel on `/swarmllm/rpc/1` as [`Request::Credit`] (JSON):
//!
//! * `ask_receipt {session}` — requester → hop, after a generation; the hop
//!   answers `receipt {entry}` signed by itself (payee) for the work it recorded
//!   for that session and requester;
//! * `settle {entry}` — requester → hop: the same receipt countersigned; the hop
//!   checks it is the one it offered, stores it and answers `stored`;
//! * `propose {entry}` — payer → payee for transfers and pool forwards; the payee
//!   checks, countersigns, stores and answers `settled {entry}`.
//!
//! The requester countersigns a receipt only if the work claimed is at most what
//! it sent through that hop (it counts every step it sent, including attempts
//! that failed mid-chain) and the amount is at most its own price for that work.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::ledger::{Balance, Ledger, LedgerError};
use super::{Body, Entry, Kind, Party, Rates, Work, forward_id, forwarded_part};
use crate::identity::Identity;
use crate::net::announce::CreditSummary;
use crate::net::frame::{Request, Response};
use crate::net::{InboundStep, Network};
use crate::pool::Pools;

/// How long a hop keeps unpaid work for a receipt request.
const SERVED_TTL: Duration = Duration::from_secs(600);
/// Unpaid sessions a hop keeps (oldest dropped first).
const MAX_SERVED: usize = 4096;
/// How often queued pool forwards are retried.
const FORWARD_RETRY: Duration = Duration::from_secs(10);

/// A credit operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreditsError {
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A blocking task failed.
    #[error("credit task failed: {0}")]
    Task(String),
}

/// `POST /api/v1/wallet/send` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// Bad recipient, amount or memo.
    #[error("{0}")]
    Invalid(String),
    /// Not enough credits.
    #[error("not enough credits: {required} needed, {available} available")]
    Insufficient {
        /// Micro-credits asked for.
        required: i64,
        /// Micro-credits available.
        available: i64,
    },
    /// The recipient cannot be reached.
    #[error("the recipient is unreachable: {0}")]
    Unreachable(String),
    /// The recipient refused to countersign.
    #[error("the recipient refused the transfer: {0}")]
    Refused(String),
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Decodes a credit message as the handler does and checks any entry it carries
/// (the fuzzing entry point of the credit protocol).
pub(crate) fn decode_message(bytes: &[u8]) {
    if let Ok(Message::Settle { entry } | Message::Propose { entry }) =
        serde_json::from_slice::<Message>(bytes)
    {
        let _ = entry.verify();
        let _ = entry.verify_half(Party::Payer);
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Message {
    AskReceipt { session: String },
    Settle { entry: Entry },
    Propose { entry: Entry },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Reply {
    Receipt { entry: Entry },
    Settled { entry: Entry },
    Stored,
}

/// Work served for one session, not yet receipted.
struct Served {
    requester: String,
    work: Work,
    at: Instant,
}

/// One row of `GET /api/identity/leaderboard`.
#[derive(Debug, Clone, Serialize)]
pub struct LeaderboardRow {
    /// Node id.
    pub node_id: String,
    /// Nickname, if announced.
    pub nickname: Option<String>,
    /// Balance in micro-credits.
    pub balance: i64,
    /// Earned, micro-credits.
    pub earned: i64,
    /// Spent, micro-credits.
    pub spent: i64,
    /// Ledger entries.
    pub entries: i64,
    /// Whether this is this node.
    pub is_self: bool,
}

/// Reads the node's configured rates (live, so a config change applies at once).
pub type RatesFn = Arc<dyn Fn() -> Rates + Send + Sync>;

/// The credits of a node; cheap to clone.
#[derive(Clone)]
pub struct Credits {
    inner: Arc<Inner>,
}

struct Inner {
    ledger: Ledger,
    identity: Identity,
    node_id: String,
    pools: Pools,
    rates: OnceLock<RatesFn>,
    network: OnceLock<Network>,
    /// Session (hex) → unpaid work this node served.
    served: Mutex<HashMap<String, Served>>,
    /// Entry id → (requester, the receipt offered).
    offered: Mutex<HashMap<String, (String, Entry, Instant)>>,
    /// The last totals, for announcements (which cannot wait on the database).
    totals: Mutex<Balance>,
    /// The node's tasks (set when a network is attached).
    tasks: crate::tasks::LateTasks,
    /// Unsolicited transfers accepted from each peer in its current minute.
    transfers: Mutex<HashMap<String, (Instant, u32)>>,
}

/// Unsolicited transfers one peer may propose a minute.
const TRANSFERS_PER_MINUTE: u32 = 10;
/// Peers whose transfer count is tracked (windows older than a minute go first).
const MAX_TRANSFER_WINDOWS: usize = 4096;

impl std::fmt::Debug for Credits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credits")
            .field("node_id", &self.inner.node_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CreditsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CreditsError::Task(e.to_string()))
}

fn refuse(code: u16, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

impl Credits {
    /// The credits of the node with `identity`, over `ledger`.
    pub fn new(ledger: Ledger, identity: Identity, pools: Pools) -> Self {
        let totals = ledger.balance().unwrap_or_default();
        // A cheap consistency check at start (sums in SQL); checking every
        // signature is `GET /api/admin/credits?verify=true`.
        match ledger.recomputed() {
            Ok(sums) if sums != totals => tracing::error!(
                ?sums, cached = ?totals, "the credit ledger's cached totals do not match its entries"
            ),
            Err(e) => tracing::error!(error = %e, "cannot check the credit ledger"),
            Ok(_) => {}
        }
        Credits {
            inner: Arc::new(Inner {
                ledger,
                node_id: identity.node_id(),
                identity,
                pools,
                rates: OnceLock::new(),
                network: OnceLock::new(),
                served: Mutex::new(HashMap::new()),
                offered: Mutex::new(HashMap::new()),
                totals: Mutex::new(totals),
                transfers: Mutex::new(HashMap::new()),
                tasks: crate::tasks::LateTasks::default(),
            }),
        }
    }

    /// Where the configured rates come from (set once by the node; read per use
    /// so a config change applies at once).
    pub fn set_rates(&self, rates: RatesFn) {
        let _ = self.inner.rates.set(rates);
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    /// Starts answering credit messages on `network` and delivering queued
    /// pool forwards and settles, as some of `tasks`.
    pub fn attach(&self, network: Network, tasks: crate::tasks::Tasks) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<InboundStep>(64);
        network.set_credit_handler(tx);
        let _ = self.inner.network.set(network);
        self.inner.tasks.set(tasks);
        let this = self.clone();
        let per_peer = Arc::new(crate::net::inflight::InFlight::default());
        self.spawn(async move {
            while let Some(msg) = rx.recv().await {
                // A peer gets a few messages handled at once; the rest wait their
                // turn in its own retries, not in this node's memory.
                let Some(slot) = per_peer.try_acquire(&msg.from, 4) else {
                    msg.responder
                        .send(refuse(429, "too many credit messages in flight"))
                        .await;
                    continue;
                };
                let handler = this.clone();
                this.spawn(async move {
                    let _slot = slot;
                    let Request::Credit(bytes) = msg.request else {
                        return;
                    };
                    let response = handler.handle(&msg.from, &bytes).await;
                    msg.responder.send(response).await;
                });
            }
        });
        let this = self.clone();
        self.spawn(async move {
            let mut tick = tokio::time::interval(FORWARD_RETRY);
            loop {
                tick.tick().await;
                this.deliver_forwards().await;
                this.deliver_settles().await;
            }
        });
    }

    /// Cached totals (for announcements).
    pub fn summary(&self) -> CreditSummary {
        let b = *lock(&self.inner.totals);
        CreditSummary {
            balance: b.balance(),
            earned: b.earned,
            spent: b.spent,
            entries: b.entries,
        }
    }

    async fn refresh_totals(&self) {
        let ledger = self.inner.ledger.clone();
        if let Ok(Ok(b)) = blocking(move || ledger.balance()).await {
            *lock(&self.inner.totals) = b;
        }
    }

    /// The rates for work between this node and `peer`: the pool's overrides when
    /// both are devices of this node's pool, else this node's configured rates.
    /// Reads the database: call it off the async runtime.
    pub fn rates_with(&self, peer: &str) -> Rates {
        let own = self.rates();
        let Ok((_, Some(pool_rates))) = self.inner.pools.rates() else {
            return own;
        };
        match self.inner.pools.accepted_members() {
            Ok(m) if m.contains(peer) && m.contains(&self.inner.node_id) => pool_rates,
            _ => own,
        }
    }

    /// The configured rates.
    pub fn rates(&self) -> Rates {
        match self.inner.rates.get() {
            Some(f) => f(),
            None => Rates::default(),
        }
    }

    // ---- the serving side -------------------------------------------------

    async fn handle(&self, from: &str, bytes: &[u8]) -> Response {
        let message: Message = match serde_json::from_slice(bytes) {
            Ok(m) => m,
            Err(e) => {
                if let Some(net) = self.inner.network.get() {
                    net.report_bad_frame(from);
                }
                return refuse(400, format!("malformed credit message: {e}"));
            }
        };
        match message {
            Message::AskReceipt { session } => {
                // Pricing reads the pool's rates from the database.
                let (this, from) = (self.clone(), from.to_string());
                blocking(move || this.offer_receipt(&from, &session))
                    .await
                    .unwrap_or_else(|e| refuse(500, e.to_string()))
            }
            Message::Settle { entry } => self.on_settle(from, entry).await,
            Message::Propose { entry } => self.on_propose(from, entry).await,
        }
    }

    fn offer_receipt(&self, from: &str, session: &str) -> Response {
        let served = {
            let mut served = lock(&self.inner.served);
            match served.get(session) {
                Some(s) if s.requester == from => served.remove(session),
                Some(_) => return refuse(403, "that session was requested by another node"),
                None => None,
            }
        };
        let Some(served) = served else {
            return refuse(404, "no unpaid work for that session");
        };
        let rates = self.rates_with(from);
        let amount = rates.price(&served.work);
        if amount <= 0 {
            return refuse(404, "the work served for that session is free");
        }
        let body = Body {
            kind: Kind::Receipt,
            id: hex::encode(rand::random::<[u8; 16]>()),
            payer: from.to_string(),
            payee: self.inner.node_id.clone(),
            amount,
            timestamp: now(),
            memo: None,
            work: Some(served.work),
            rates: Some(rates),
            source: None,
        };
        let entry = Entry::new(&body, &self.inner.identity, Party::Payee);
        let mut offered = lock(&self.inner.offered);
        offered.retain(|_, (_, _, at)| at.elapsed() < SERVED_TTL);
        offered.insert(body.id, (from.to_string(), entry.clone(), Instant::now()));
        reply(&Reply::Receipt { entry })
    }

    async fn on_settle(&self, from: &str, entry: Entry) -> Response {
        let id = match entry.body() {
            Ok(b) => b.id,
            Err(e) => return refuse(400, e.to_string()),
        };
        let offered = lock(&self.inner.offered).remove(&id);
        let Some((requester, mine, _)) = offered else {
            // A settle sent again (its first answer was lost, or this node
            // restarted): a receipt this node signed, countersigned by the payer
            // that sends it, is stored once; storing it again is a no-op.
            return match entry.verify() {
                Ok(body)
                    if body.kind == Kind::Receipt
                        && body.payee == self.inner.node_id
                        && body.payer == from =>
                {
                    match self.store_earning(entry, &body).await {
                        Ok(()) => reply(&Reply::Stored),
                        Err(e) => refuse(500, e.to_string()),
                    }
                }
                _ => refuse(404, format!("no receipt {id} was offered")),
            };
        };
        if requester != from || mine.body != entry.body || mine.payee_sig != entry.payee_sig {
            tracing::warn!(peer = %crate::net::short_id(from), receipt = %id,
                "a settled receipt differs from the one offered; refused");
            return refuse(409, "the receipt differs from the one offered");
        }
        let body = match entry.verify() {
            Ok(b) => b,
            Err(e) => return refuse(400, e.to_string()),
        };
        match self.store_earning(entry, &body).await {
            Ok(()) => reply(&Reply::Stored),
            Err(e) => refuse(500, e.to_string()),
        }
    }

    /// Stores a receipt this node earned; a pool member queues the owner's part
    /// in the same transaction and delivers it.
    async fn store_earning(&self, entry: Entry, body: &Body) -> Result<(), CreditsError> {
        let (this, receipt) = (self.clone(), body.clone());
        blocking(move || match this.forward_for(&entry, &receipt) {
            Some((id, owner, fwd)) => this
                .inner
                .ledger
                .record_with_forward(&entry, Some((&id, &owner, &fwd))),
            None => this.inner.ledger.record(&entry),
        })
        .await??;
        tracing::info!(amount = super::to_credits(body.amount), payer = %crate::net::short_id(&body.payer),
            "credit receipt stored");
        self.refresh_totals().await;
        let this = self.clone();
        self.spawn(async move { this.deliver_forwards().await });
        Ok(())
    }

    /// Runs `task` as one of the node's tasks.
    fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.inner.tasks.spawn(task);
    }

    /// The payer-signed forward of `receipt` to the pool owner, if this node is a
    /// pool member that keeps less than all of it.
    fn forward_for(&self, receipt: &Entry, body: &Body) -> Option<(String, String, Entry)> {
        let state = self.inner.pools.state().ok()?;
        if state.role.as_deref() != Some("member") {
            return None;
        }
        let owner = state.owner_node_id?;
        let amount = forwarded_part(body.amount, state.credit_split_pct.unwrap_or(0));
        if amount <= 0 || owner == self.inner.node_id {
            return None;
        }
        let id = forward_id(&body.id);
        let fwd = Body {
            kind: Kind::PoolForward,
            id: id.clone(),
            payer: self.inner.node_id.clone(),
            payee: owner.clone(),
            amount,
            timestamp: now(),
            memo: state.pool_id,
            work: None,
            rates: None,
            source: Some(Box::new(receipt.clone())),
        };
        Some((
            id,
            owner,
            Entry::new(&fwd, &self.inner.identity, Party::Payer),
        ))
    }

    async fn on_propose(&self, from: &str, mut entry: Entry) -> Response {
        let body = match entry.verify_half(Party::Payer) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(peer = %crate::net::short_id(from), error = %e, "credit proposal refused");
                return refuse(400, e.to_string());
            }
        };
        if body.payer != from {
            return refuse(403, "the payer is not the sender");
        }
        if body.payee != self.inner.node_id {
            return refuse(400, "the payee is not this node");
        }
        match body.kind {
            Kind::Transfer => {}
            Kind::Receipt => return refuse(400, "receipts are offered by the hop, not proposed"),
            Kind::PoolForward => {
                let (this, forward) = (self.clone(), body.clone());
                match blocking(move || this.check_forward(&forward)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(message)) => return refuse(403, message),
                    Err(e) => return refuse(500, e.to_string()),
                }
            }
        }
        if body.memo.as_ref().is_some_and(|m| m.len() > 256) {
            return refuse(400, "memo longer than 256 bytes");
        }
        if body.kind == Kind::Transfer && !self.transfer_allowed(from) {
            return refuse(
                429,
                format!("more than {TRANSFERS_PER_MINUTE} transfers a minute"),
            );
        }
        entry.sign(&self.inner.identity, Party::Payee);
        let ledger = self.inner.ledger.clone();
        let stored = entry.clone();
        match blocking(move || ledger.record(&stored)).await {
            Ok(Ok(_)) => {
                tracing::info!(kind = body.kind.as_str(), amount = super::to_credits(body.amount),
                    from = %crate::net::short_id(from), "credits received");
                self.refresh_totals().await;
                reply(&Reply::Settled { entry })
            }
            Ok(Err(LedgerError::Conflict(id))) => {
                refuse(409, format!("entry {id} is already recorded differently"))
            }
            Ok(Err(e @ (LedgerError::Entry(_) | LedgerError::Overflow(_)))) => {
                refuse(400, e.to_string())
            }
            Ok(Err(e)) => refuse(500, e.to_string()),
            Err(e) => refuse(500, e.to_string()),
        }
    }

    /// Counts an unsolicited transfer from `peer`; false past the limit.
    fn transfer_allowed(&self, peer: &str) -> bool {
        let mut windows = lock(&self.inner.transfers);
        let minute = Duration::from_secs(60);
        if windows.len() >= MAX_TRANSFER_WINDOWS && !windows.contains_key(peer) {
            windows.retain(|_, (start, _)| start.elapsed() < minute);
            if windows.len() >= MAX_TRANSFER_WINDOWS {
                return false;
            }
        }
        let window = windows
            .entry(peer.to_string())
            .or_insert((Instant::now(), 0));
        if window.0.elapsed() >= minute {
            *window = (Instant::now(), 0);
        }
        window.1 += 1;
        window.1 <= TRANSFERS_PER_MINUTE
    }

    /// An owner accepts a forward from an accepted member of its pool, carrying
    /// a valid receipt the member earned, for at least the owner's share.
    fn check_forward(&self, body: &Body) -> Result<(), String> {
        let state = self.inner.pools.state().map_err(|e| e.to_string())?;
        if state.role.as_deref() != Some("owner") {
            return Err("this node owns no pool".into());
        }
        if !state
            .members
            .iter()
            .any(|m| m.node_id == body.payer && m.accepted)
        {
            return Err("the sender is not a device of this pool".into());
        }
        let source = body
            .source
            .as_ref()
            .ok_or("a pool forward without its receipt")?
            .verify()
            .map_err(|e| e.to_string())?;
        if source.kind != Kind::Receipt || source.payee != body.payer {
            return Err("the receipt was not earned by the sender".into());
        }
        if body.id != forward_id(&source.id) {
            return Err("the forward's id does not match its receipt".into());
        }
        let due = forwarded_part(source.amount, state.credit_split_pct.unwrap_or(0));
        if body.amount < due || body.amount > source.amount {
            return Err(format!(
                "a forward of {} for a receipt of {} (due: {due})",
                body.amount, source.amount
            ));
        }
        Ok(())
    }

    // ---- the paying side ----------------------------------------------------

    /// After a generation: asks every other node that served it for a receipt and
    /// countersigns the ones that match `work` (per node, what this node sent).
    pub async fn settle(&self, work: Vec<(String, Work)>) {
        for (node, sent) in work {
            if node == self.inner.node_id || sent.layer_tokens == 0 {
                continue;
            }
            if let Err(e) = self.settle_one(&node, &sent).await {
                tracing::warn!(hop = %crate::net::short_id(&node), error = %e, "no credit receipt");
            }
        }
    }

    async fn settle_one(&self, node: &str, sent: &Work) -> Result<(), String> {
        let ask = Message::AskReceipt {
            session: sent.session.clone(),
        };
        let Reply::Receipt { mut entry } = self.call(node, &ask).await? else {
            return Err("unexpected answer".into());
        };
        let body = entry.verify_half(Party::Payee).map_err(|e| e.to_string())?;
        let claimed = body.work.clone().unwrap_or_default();
        let (this, peer) = (self.clone(), node.to_string());
        let my_price = blocking(move || this.rates_with(&peer))
            .await
            .map_err(|e| e.to_string())?
            .price(&claimed);
        let fair = body.kind == Kind::Receipt
            && body.payer == self.inner.node_id
            && body.payee == node
            && claimed.session == sent.session
            && claimed.model_id == sent.model_id
            && claimed.layer_tokens <= sent.layer_tokens
            && claimed.tokens_generated <= sent.tokens_generated
            && body.amount <= my_price;
        if !fair {
            return Err(format!(
                "refusing a receipt for more than was sent ({} layer-tokens, {} tokens, {} µcredits)",
                claimed.layer_tokens, claimed.tokens_generated, body.amount
            ));
        }
        entry.sign(&self.inner.identity, Party::Payer);
        let ledger = self.inner.ledger.clone();
        let (stored, hop) = (entry.clone(), node.to_string());
        blocking(move || ledger.record_settle(&stored, &hop))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.refresh_totals().await;
        self.deliver_settle(node, &body.id, entry).await
    }

    /// Sends the settle of receipt `id` to `hop`; a confirmed (or finally
    /// refused) settle leaves the queue, an unreachable hop is tried again.
    async fn deliver_settle(&self, hop: &str, id: &str, entry: Entry) -> Result<(), String> {
        let outcome = self.call(hop, &Message::Settle { entry }).await;
        let done = match &outcome {
            Ok(Reply::Stored) | Err(CallError::Refused(_)) => true,
            Ok(_) | Err(CallError::Unreachable(_)) => false,
        };
        if done {
            let (ledger, id) = (self.inner.ledger.clone(), id.to_string());
            let _ = blocking(move || ledger.settled(&id)).await;
        }
        match outcome {
            Ok(Reply::Stored) => Ok(()),
            Ok(_) => Err("unexpected answer".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Settles that did not reach their hop, sent again.
    pub async fn deliver_settles(&self) {
        let ledger = self.inner.ledger.clone();
        let Ok(Ok(pending)) = blocking(move || ledger.pending_settles()).await else {
            return;
        };
        for (id, hop, entry) in pending {
            match self.deliver_settle(&hop, &id, entry).await {
                Ok(()) => tracing::info!(receipt = %id, "a delayed settle reached its hop"),
                Err(e) => tracing::debug!(receipt = %id, error = %e, "settle still pending"),
            }
        }
    }

    /// Sends `amount` micro-credits to `to` as a dual-signed transfer.
    pub async fn send(
        &self,
        to: &str,
        amount: i64,
        memo: Option<String>,
    ) -> Result<Entry, SendError> {
        if crate::identity::x25519_public(to).is_none() {
            return Err(SendError::Invalid(
                "`to` must be a node id (64 hex characters)".into(),
            ));
        }
        if to == self.inner.node_id {
            return Err(SendError::Invalid(
                "cannot send credits to this node itself".into(),
            ));
        }
        if amount <= 0 {
            return Err(SendError::Invalid("`amount` must be positive".into()));
        }
        if memo.as_ref().is_some_and(|m| m.len() > 256) {
            return Err(SendError::Invalid("`memo` is longer than 256 bytes".into()));
        }
        let ledger = self.inner.ledger.clone();
        let available = blocking(move || ledger.balance())
            .await
            .map_err(|e| SendError::Invalid(e.to_string()))??
            .balance();
        if amount > available {
            return Err(SendError::Insufficient {
                required: amount,
                available,
            });
        }
        let body = Body {
            kind: Kind::Transfer,
            id: format!("tx_{}", hex::encode(rand::random::<[u8; 12]>())),
            payer: self.inner.node_id.clone(),
            payee: to.to_string(),
            amount,
            timestamp: now(),
            memo,
            work: None,
            rates: None,
            source: None,
        };
        let entry = Entry::new(&body, &self.inner.identity, Party::Payer);
        let answer = self
            .call(
                to,
                &Message::Propose {
                    entry: entry.clone(),
                },
            )
            .await;
        let settled = match answer {
            Ok(Reply::Settled { entry: settled }) => settled,
            Ok(_) => return Err(SendError::Refused("unexpected answer".into())),
            Err(CallError::Unreachable(e)) => return Err(SendError::Unreachable(e)),
            Err(CallError::Refused(e)) => return Err(SendError::Refused(e)),
        };
        if settled.body != entry.body || settled.payer_sig != entry.payer_sig {
            return Err(SendError::Refused(
                "the countersigned transfer was altered".into(),
            ));
        }
        let ledger = self.inner.ledger.clone();
        let stored = settled.clone();
        blocking(move || ledger.record(&stored))
            .await
            .map_err(|e| SendError::Invalid(e.to_string()))??;
        self.refresh_totals().await;
        Ok(settled)
    }

    /// Delivers queued pool forwards to the owner (each settles once).
    pub async fn deliver_forwards(&self) {
        let ledger = self.inner.ledger.clone();
        let Ok(Ok(pending)) = blocking(move || ledger.pending_forwards()).await else {
            return;
        };
        for (id, owner, entry) in pending {
            match self
                .call(
                    &owner,
                    &Message::Propose {
                        entry: entry.clone(),
                    },
                )
                .await
            {
                Ok(Reply::Settled { entry: settled })
                    if settled.body == entry.body && settled.payer_sig == entry.payer_sig =>
                {
                    let ledger = self.inner.ledger.clone();
                    match blocking(move || ledger.record(&settled)).await {
                        Ok(Ok(_)) => {
                            tracing::info!(forward = %id, "credits forwarded to the pool owner");
                            self.refresh_totals().await;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(forward = %id, error = %e, "forward not stored")
                        }
                        Err(e) => tracing::warn!(forward = %id, error = %e, "forward not stored"),
                    }
                }
                Ok(_) => tracing::warn!(forward = %id, "the pool owner answered a forward oddly"),
                Err(CallError::Unreachable(_)) => return, // retried later
                Err(CallError::Refused(reason)) => {
                    tracing::warn!(forward = %id, %reason, "the pool owner refused a forward; dropped");
                    let ledger = self.inner.ledger.clone();
                    let _ = blocking(move || ledger.drop_forward(&id)).await;
                }
            }
        }
    }

    async fn call(&self, node: &str, message: &Message) -> Result<Reply, CallError> {
        let network = self
            .inner
            .network
            .get()
            .ok_or_else(|| CallError::Unreachable("this node has no P2P network".into()))?;
        let bytes = serde_json::to_vec(message).unwrap_or_default();
        match network.request(node, Request::Credit(bytes)).await {
            Ok(Response::Credit(b)) => serde_json::from_slice(&b)
                .map_err(|e| CallError::Refused(format!("malformed answer: {e}"))),
            Ok(Response::Error { code, message }) if code >= 500 => {
                Err(CallError::Unreachable(message))
            }
            Ok(Response::Error { message, .. }) => Err(CallError::Refused(message)),
            Ok(other) => Err(CallError::Refused(format!("unexpected answer {other:?}"))),
            Err(e) => Err(CallError::Unreachable(e.to_string())),
        }
    }

    // ---- views ----------------------------------------------------------------

    /// Every node's last announced totals (this node's current ones included),
    /// highest balance first.
    pub async fn leaderboard(&self) -> Vec<LeaderboardRow> {
        let mine = self.summary();
        let mut rows = vec![LeaderboardRow {
            node_id: self.inner.node_id.clone(),
            nickname: None,
            balance: mine.balance,
            earned: mine.earned,
            spent: mine.spent,
            entries: mine.entries,
            is_self: true,
        }];
        if let Some(net) = self.inner.network.get() {
            let records = net.peer_records(10_000).await;
            for r in records {
                let Some(c) = r
                    .load
                    .get("credits")
                    .and_then(|c| serde_json::from_value::<CreditSummary>(c.clone()).ok())
                else {
                    continue;
                };
                if r.node_id == self.inner.node_id {
                    continue;
                }
                rows.push(LeaderboardRow {
                    node_id: r.node_id,
                    nickname: r.nickname,
                    balance: c.balance,
                    earned: c.earned,
                    spent: c.spent,
                    entries: c.entries,
                    is_self: false,
                });
            }
        }
        rows.sort_by(|a, b| b.balance.cmp(&a.balance).then(a.node_id.cmp(&b.node_id)));
        rows
    }

    /// This node's tier and percentile among the nodes it knows.
    pub async fn standing(&self) -> (String, f64, usize) {
        let rows = self.leaderboard().await;
        let balances: Vec<i64> = rows.iter().map(|r| r.balance).collect();
        let p = super::percentile(self.summary().balance, &balances);
        (super::tier(p).to_string(), p, rows.len())
    }

    /// A JSON view of a ledger entry for the API.
    pub fn entry_json(entry: &Entry) -> Value {
        let body: Value = serde_json::from_str(&entry.body).unwrap_or(Value::Null);
        json!({ "body": body, "signed_body": entry.body, "payer_sig": entry.payer_sig, "payee_sig": entry.payee_sig })
    }
}

/// Work served for others is remembered per session until its receipt; work
/// requested is settled in the background.
impl crate::pipeline::Accounting for Credits {
    fn served(
        &self,
        requester: &str,
        session: &str,
        model_id: &str,
        layer_tokens: u64,
        sampled: bool,
    ) {
        if requester == self.inner.node_id {
            return;
        }
        let mut served = lock(&self.inner.served);
        if served.len() >= MAX_SERVED && !served.contains_key(session) {
            served.retain(|_, s| s.at.elapsed() < SERVED_TTL);
            if served.len() >= MAX_SERVED {
                return; // unpaid work is forgotten rather than memory unbounded
            }
        }
        let s = served.entry(session.to_string()).or_insert_with(|| Served {
            requester: requester.to_string(),
            work: Work {
                model_id: model_id.to_string(),
                session: session.to_string(),
                layer_tokens: 0,
                tokens_generated: 0,
            },
            at: Instant::now(),
        });
        if s.requester != requester || s.work.model_id != model_id {
            return;
        }
        s.work.layer_tokens += layer_tokens;
        s.work.tokens_generated += u64::from(sampled);
        s.at = Instant::now();
    }

    fn requested(&self, work: Vec<(String, Work)>) {
        let this = self.clone();
        self.spawn(async move { this.settle(work).await });
    }

    fn price(&self, node: &str, work: &Work) -> i64 {
        self.rates_with(node).price(work)
    }
}

/// Why a credit call failed.
#[derive(Debug)]
enum CallError {
    /// Transport failure or the peer's internal error (worth retrying).
    Unreachable(String),
    /// The peer refused (4xx) or answered nonsense.
    Refused(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(m) => write!(f, "unreachable: {m}"),
            CallError::Refused(m) => write!(f, "refused: {m}"),
        }
    }
}

impl From<CallError> for String {
    fn from(e: CallError) -> String {
        e.to_string()
    }
}

fn reply(r: &Reply) -> Response {
    Response::Credit(serde_json::to_vec(r).unwrap_or_default())
}
