//! Credits: a ledger of signed work and transfers, in SQLite.
//!
//! A node earns credits for pipeline work it serves others (per layer × token
//! forwarded, per token sampled) and spends them for work it asks of others. Every
//! movement is one [`Entry`] naming a payer and a payee, signed by *both* over the
//! same bytes, and kept by both:
//!
//! * **receipt** — after a split generation the requester asks each hop for one;
//!   the hop (payee) signs what it served, the requester (payer) checks the work
//!   against its own count and countersigns;
//! * **transfer** — `POST /api/v1/wallet/send`: the sender signs, the recipient
//!   countersigns;
//! * **pool_forward** — a pool member forwards the part of a receipt it does not
//!   keep (the owner's credit split) to the pool's owner; it carries the receipt,
//!   so the owner can check the amount.
//!
//! Neither side can invent an entry (it needs the other's signature) or deny one
//! (the other holds its signature). A balance is derived from entries only
//! (`earned − spent`), and [`Ledger::verify`] re-checks every signature and the
//! cached totals. Amounts are integer micro-credits on disk and on the wire; the
//! HTTP API shows credits as decimals.

mod ledger;
mod service;
pub(crate) use service::decode_message;

pub use ledger::{Balance, Ledger, LedgerError, Transaction, Verification};
pub use service::{Credits, CreditsError, LeaderboardRow, RatesFn, SendError};

use serde::{Deserialize, Serialize};

use crate::identity::{self, Identity};

/// Micro-credits per credit.
pub const MICRO: i64 = 1_000_000;
/// The largest amount one entry may carry (a billion credits): far above any
/// real payment, and low enough that no number of entries a ledger will ever
/// hold can overflow its 64-bit totals unnoticed (totals are checked as well).
pub const MAX_AMOUNT: i64 = 1_000_000_000 * MICRO;
const SIGNING_TAG: &str = "swarmllm credit v1";

/// Credits as a decimal for the API.
pub fn to_credits(micro: i64) -> f64 {
    micro as f64 / MICRO as f64
}

/// Decimal credits to micro-credits (`None` if negative, not finite or above
/// [`MAX_AMOUNT`]).
pub fn from_credits(credits: f64) -> Option<i64> {
    (credits.is_finite() && (0.0..=(MAX_AMOUNT / MICRO) as f64).contains(&credits))
        .then(|| (credits * MICRO as f64).round() as i64)
}

/// What an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Pipeline work served (payee) for a requester (payer).
    Receipt,
    /// Credits sent from one node to another.
    Transfer,
    /// A pool member's forward of its earnings to the pool owner.
    PoolForward,
}

impl Kind {
    /// The name stored in SQLite and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Receipt => "receipt",
            Kind::Transfer => "transfer",
            Kind::PoolForward => "pool_forward",
        }
    }
}

/// Prices in micro-credits. The default is the configuration's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rates {
    /// Per layer × token a node runs for someone else.
    pub per_layer_token: i64,
    /// Per token a node samples for someone else.
    pub per_token: i64,
}

impl Default for Rates {
    fn default() -> Self {
        Rates::from_credits(0.0001, 0.01)
    }
}

impl Rates {
    /// From decimal credits (config values, already validated).
    pub fn from_credits(per_layer_token: f64, per_token: f64) -> Self {
        Rates {
            per_layer_token: from_credits(per_layer_token).unwrap_or(0),
            per_token: from_credits(per_token).unwrap_or(0),
        }
    }

    /// The price of `work`, saturating rather than overflowing.
    pub fn price(&self, work: &Work) -> i64 {
        let layers = (work.layer_tokens as i64).saturating_mul(self.per_layer_token);
        let tokens = (work.tokens_generated as i64).saturating_mul(self.per_token);
        layers.saturating_add(tokens)
    }

    /// As decimals for the API.
    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "per_layer_token": to_credits(self.per_layer_token),
            "per_token": to_credits(self.per_token),
        })
    }
}

/// Work one node did for another within one pipeline session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Work {
    /// Model id.
    pub model_id: String,
    /// Hex pipeline session id.
    pub session: String,
    /// Token rows × layers run.
    pub layer_tokens: u64,
    /// Tokens sampled.
    pub tokens_generated: u64,
}

/// The signed content of an entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Body {
    /// What it records.
    pub kind: Kind,
    /// Unique id (hex).
    pub id: String,
    /// Node id whose balance goes down.
    pub payer: String,
    /// Node id whose balance goes up.
    pub payee: String,
    /// Micro-credits, 1..=[`MAX_AMOUNT`].
    pub amount: i64,
    /// Unix seconds when made.
    pub timestamp: i64,
    /// Sender's note (transfers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memo: Option<String>,
    /// The work paid for (receipts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<Work>,
    /// The rates the amount was computed with (receipts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rates: Option<Rates>,
    /// The receipt a pool forward passes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Box<Entry>>,
}

/// An entry as stored and sent: the body's exact JSON text and both signatures
/// (hex; empty while the second party has not signed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The [`Body`] as JSON text; signatures cover exactly these bytes.
    pub body: String,
    /// The payer's Ed25519 signature.
    pub payer_sig: String,
    /// The payee's Ed25519 signature.
    pub payee_sig: String,
}

/// Which side of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party {
    /// The node paying.
    Payer,
    /// The node paid.
    Payee,
}

/// Why an entry was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum EntryError {
    /// Not an entry.
    #[error("malformed credit entry: {0}")]
    Malformed(String),
    /// A signature is missing or does not verify.
    #[error("the {0} signature of credit entry {1} does not verify")]
    BadSignature(&'static str, String),
    /// The content is not acceptable (amount, parties, kind…).
    #[error("{0}")]
    Invalid(String),
}

fn signing_message(body: &str) -> Vec<u8> {
    format!("{SIGNING_TAG}\n{body}").into_bytes()
}

impl Entry {
    /// A new entry with `body`, signed by `identity` as `party`.
    pub fn new(body: &Body, identity: &Identity, party: Party) -> Self {
        let body = serde_json::to_string(body).unwrap_or_default();
        let mut entry = Entry {
            body,
            payer_sig: String::new(),
            payee_sig: String::new(),
        };
        entry.sign(identity, party);
        entry
    }

    /// Adds `identity`'s signature as `party`.
    pub fn sign(&mut self, identity: &Identity, party: Party) {
        let sig = hex::encode(identity.sign(&signing_message(&self.body)).to_bytes());
        match party {
            Party::Payer => self.payer_sig = sig,
            Party::Payee => self.payee_sig = sig,
        }
    }

    /// Parses the body and checks its basic sanity (no signatures).
    pub fn body(&self) -> Result<Body, EntryError> {
        let body: Body =
            serde_json::from_str(&self.body).map_err(|e| EntryError::Malformed(e.to_string()))?;
        if body.amount <= 0 || body.amount > MAX_AMOUNT {
            return Err(EntryError::Invalid(format!(
                "an amount of {} µcredits (1..={MAX_AMOUNT})",
                body.amount
            )));
        }
        if body.payer == body.payee {
            return Err(EntryError::Invalid("payer and payee are the same".into()));
        }
        if identity::x25519_public(&body.payer).is_none()
            || identity::x25519_public(&body.payee).is_none()
        {
            return Err(EntryError::Invalid(
                "payer or payee is not a node id".into(),
            ));
        }
        if body.id.is_empty() || body.id.len() > 128 {
            return Err(EntryError::Invalid("a missing or oversized id".into()));
        }
        Ok(body)
    }

    /// Whether `party`'s signature is present and valid.
    pub fn signed_by(&self, body: &Body, party: Party) -> bool {
        let (node, sig) = match party {
            Party::Payer => (&body.payer, &self.payer_sig),
            Party::Payee => (&body.payee, &self.payee_sig),
        };
        let mut bytes = [0u8; 64];
        hex::decode_to_slice(sig, &mut bytes).is_ok()
            && identity::verify(
                node,
                &signing_message(&self.body),
                &ed25519_dalek::Signature::from_bytes(&bytes),
            )
    }

    /// Parses the body and checks `party`'s signature.
    pub fn verify_half(&self, party: Party) -> Result<Body, EntryError> {
        let body = self.body()?;
        if !self.signed_by(&body, party) {
            let who = match party {
                Party::Payer => "payer",
                Party::Payee => "payee",
            };
            return Err(EntryError::BadSignature(who, body.id));
        }
        Ok(body)
    }

    /// Parses the body and checks both signatures (and a forward's receipt).
    pub fn verify(&self) -> Result<Body, EntryError> {
        let body = self.verify_half(Party::Payer)?;
        if !self.signed_by(&body, Party::Payee) {
            return Err(EntryError::BadSignature("payee", body.id));
        }
        if body.kind == Kind::PoolForward {
            let source = body
                .source
                .as_ref()
                .ok_or_else(|| EntryError::Invalid("a pool forward without its receipt".into()))?
                .verify()?;
            if source.payee != body.payer || source.kind != Kind::Receipt {
                return Err(EntryError::Invalid(
                    "a pool forward of a receipt its sender did not earn".into(),
                ));
            }
            if body.amount > source.amount {
                return Err(EntryError::Invalid(
                    "a pool forward larger than its receipt".into(),
                ));
            }
        }
        Ok(body)
    }
}

/// A forward's id, derived from its receipt so each receipt is forwarded once.
pub fn forward_id(receipt_id: &str) -> String {
    format!("fwd-{receipt_id}")
}

/// The part of `amount` a member forwards when it keeps `split_pct` percent.
pub fn forwarded_part(amount: i64, split_pct: u32) -> i64 {
    let keep = amount.saturating_mul(i64::from(split_pct.min(100))) / 100;
    amount - keep
}

/// Tier names by balance percentile, best first.
pub fn tier(percentile: f64) -> &'static str {
    match percentile {
        p if p >= 90.0 => "platinum",
        p if p >= 75.0 => "gold",
        p if p >= 50.0 => "silver",
        _ => "bronze",
    }
}

/// The percentile of `mine` among `all` balances: the share strictly below it.
pub fn percentile(mine: i64, all: &[i64]) -> f64 {
    if all.is_empty() {
        return 0.0;
    }
    let below = all.iter().filter(|b| **b < mine).count();
    100.0 * below as f64 / all.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(payer: &Identity, payee: &Identity, amount: i64) -> Body {
        Body {
            kind: Kind::Transfer,
            id: "t1".into(),
            payer: payer.node_id(),
            payee: payee.node_id(),
            amount,
            timestamp: 1000,
            memo: Some("hi".into()),
            work: None,
            rates: None,
            source: None,
        }
    }

    #[test]
    fn both_signatures_are_needed_and_cover_the_body() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let mut entry = Entry::new(&body(&a, &b, 5), &a, Party::Payer);
        assert!(entry.verify_half(Party::Payer).is_ok());
        assert!(matches!(
            entry.verify(),
            Err(EntryError::BadSignature("payee", _))
        ));
        entry.sign(&b, Party::Payee);
        assert_eq!(entry.verify().expect("valid").amount, 5);

        // Edited after signing.
        let mut tampered = entry.clone();
        tampered.body = tampered.body.replace("\"amount\":5", "\"amount\":500");
        assert!(matches!(
            tampered.verify(),
            Err(EntryError::BadSignature(..))
        ));
        // Signed by the wrong node.
        let mut forged = Entry::new(&body(&a, &b, 5), &b, Party::Payer);
        forged.sign(&b, Party::Payee);
        assert!(forged.verify().is_err());
        // Nonsense.
        let junk = Entry {
            body: "{".into(),
            payer_sig: String::new(),
            payee_sig: String::new(),
        };
        assert!(matches!(junk.verify(), Err(EntryError::Malformed(_))));
        let neg = Entry::new(&body(&a, &b, -1), &a, Party::Payer);
        assert!(matches!(neg.body(), Err(EntryError::Invalid(_))));
    }

    #[test]
    fn a_forward_must_carry_its_members_receipt() {
        let (req, member, owner) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        let mut receipt_body = body(&req, &member, 1000);
        receipt_body.kind = Kind::Receipt;
        let mut receipt = Entry::new(&receipt_body, &member, Party::Payee);
        receipt.sign(&req, Party::Payer);
        let fwd = |amount: i64, source: Entry| {
            let mut b = body(&member, &owner, amount);
            b.kind = Kind::PoolForward;
            b.id = forward_id("t1");
            b.source = Some(Box::new(source));
            let mut e = Entry::new(&b, &member, Party::Payer);
            e.sign(&owner, Party::Payee);
            e
        };
        assert!(fwd(800, receipt.clone()).verify().is_ok());
        assert!(fwd(1001, receipt.clone()).verify().is_err());
        let mut bad = receipt.clone();
        bad.payer_sig = receipt.payee_sig.clone();
        assert!(fwd(800, bad).verify().is_err());
        assert_eq!(forwarded_part(1000, 20), 800);
        assert_eq!(forwarded_part(7, 50), 4);
    }

    #[test]
    fn tiers_follow_percentiles() {
        let all = [0, 0, 10, 20, 30, 40, 50, 60, 70, 100];
        assert_eq!(tier(percentile(100, &all)), "platinum");
        assert_eq!(tier(percentile(0, &all)), "bronze");
        assert_eq!(tier(percentile(60, &all)), "silver");
        assert_eq!(percentile(5, &[]), 0.0);
        assert_eq!(from_credits(-1.0), None);
        assert_eq!(from_credits(1.5), Some(1_500_000));
        let rates = Rates::from_credits(0.0001, 0.01);
        let w = Work {
            layer_tokens: 3000,
            tokens_generated: 10,
            ..Work::default()
        };
        assert_eq!(rates.price(&w), 300_000 + 100_000);
    }
}
