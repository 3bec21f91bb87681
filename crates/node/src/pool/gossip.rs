//! Joining a pool over gossip (`swarmllm/pool/1`), by SPAKE2 keyed with the code.
//!
//! ```text
//! joiner                                      everyone              owner
//!   JoinStart {nameplate, node_id, A} ───────────▶ ───────────────▶ codes with that nameplate
//!                                                                  (one attempt each): SPAKE2
//!   K from A's state and B; check the  ◀── JoinReply {B, owner MAC, sealed verdict} ◀──
//!   owner's MAC (wrong code: it fails)
//!   JoinFinish {joiner MAC, signature} ──────────▶ ───────────────▶ check MAC: redeem, record
//!   (checks every signature)          ◀── State {body, owner signature} ◀──
//! ```
//!
//! The code never travels, nor anything computed from it that an observer could
//! test guesses against: the joiner and the owner run SPAKE2 (RustCrypto's
//! `spake2`) with the code's hash as the password, the joiner's node id as one
//! identity, and derive their keys from the SPAKE2 secret and the whole
//! transcript (nameplate, both node ids, both SPAKE2 messages, the exchange id).
//! Each side proves it holds the key with a MAC, so a proof cannot be replayed for
//! another node or exchange, and a wrong code learns nothing but "no". Only the
//! first two characters of the code (the nameplate, as magic-wormhole's) travel in
//! the clear so the owner can find the join meant for it; each join costs the
//! code one of its few online attempts.
//!
//! Gossip authors are authenticated by gossipsub's own Ed25519 message signatures;
//! a message whose claimed node is not its author is dropped. The member signs its
//! acceptance; the owner signs the pool state, which lists each member's
//! acceptance signature, and members accept a state only when all verify.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{Member, PoolError, PoolState, Pools, code_hash, nameplate, parse_code};
use crate::identity::{self, Identity};
use crate::net::Network;
use crate::pipeline::activation::{self, Direction, SessionKey};
use spake2::{Ed25519Group, Identity as PakeIdentity, Password, Spake2};

/// How long a member waits for an owner's verdict.
const VERDICT_WAIT: Duration = Duration::from_secs(10);
/// SPAKE2's identity of the owner's side (the joiner's is its node id; the
/// owner's node id is bound in through the transcript).
const JOIN_OWNER: &[u8] = b"swarmllm pool owner";
/// Replies a joiner examines per join.
const MAX_REPLIES: u32 = 8;
/// Joins an owner keeps waiting for their finish, and for how long.
const MAX_EXCHANGES: usize = 64;
const EXCHANGE_TTL: Duration = Duration::from_secs(60);
const ACCEPT_TAG: &str = "swarmllm pool accept v1";
const STATE_TAG: &str = "swarmllm pool state v1";
const REMOVAL_TAG: &str = "swarmllm pool removal v1";
const PINS_TAG: &str = "swarmllm pool pins v1";
const RENAME_TAG: &str = "swarmllm pool rename v1";
/// How far ahead of the owner's clock a rename's time may be.
const RENAME_SKEW_SECS: i64 = 300;
const INVITE_CONTEXT: &str = "swarmllm pool invite v1";

/// Decodes a pool message and the signed or sealed body it carries, as far as
/// a node without the keys can (the fuzzing entry point of the pool protocol).
pub(crate) fn decode_message(bytes: &[u8]) {
    match serde_json::from_slice::<Message>(bytes) {
        Ok(Message::State { body, .. }) => {
            let _ = serde_json::from_str::<StateBody>(&body);
        }
        Ok(Message::Removal { body, .. }) => {
            let _ = serde_json::from_str::<RemovalBody>(&body);
        }
        Ok(Message::Pins { body, .. }) => {
            let _ = serde_json::from_str::<PinsBody>(&body);
        }
        Ok(Message::Rename { body, .. }) => {
            let _ = serde_json::from_str::<RenameBody>(&body);
        }
        Ok(Message::JoinReply {
            owner_node_id,
            nameplate,
            exchange_id,
            pake,
            sealed,
            ..
        }) => {
            // The joiner's side of a reply, with a fixed code.
            let b64 = base64::engine::general_purpose::STANDARD;
            let (Ok(pake_b), Ok(sealed)) = (b64.decode(&pake), b64.decode(&sealed)) else {
                return;
            };
            let (state, pake_a) = joiner_pake([7; 32], "fuzz", "joiner");
            if let Ok(secret) = state.finish(&pake_b) {
                let keys = JoinKeys::derive(
                    &secret,
                    &nameplate,
                    "joiner",
                    &owner_node_id,
                    &pake_a,
                    &pake_b,
                    &exchange_id,
                );
                let _ = keys.open(&sealed);
            }
        }
        _ => {}
    }
}

/// A message on the pool topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    JoinStart {
        /// The code's first characters.
        nameplate: String,
        node_id: String,
        device_name: Option<String>,
        /// Base64 of the joiner's SPAKE2 message.
        pake: String,
    },
    JoinReply {
        owner_node_id: String,
        /// The joiner.
        node_id: String,
        nameplate: String,
        exchange_id: String,
        /// Base64 of the owner's SPAKE2 message.
        pake: String,
        /// Hex MAC proving the owner holds the key.
        confirm: String,
        /// Base64 of the [`Verdict`] sealed with the key.
        sealed: String,
    },
    JoinFinish {
        owner_node_id: String,
        node_id: String,
        exchange_id: String,
        /// Hex MAC proving the joiner holds the key.
        confirm: String,
        /// Hex Ed25519 signature of the acceptance.
        signature: String,
    },
    Acceptance {
        pool_id: String,
        owner_node_id: String,
        invitation_id: String,
        node_id: String,
        /// Hex Ed25519 signature.
        signature: String,
    },
    State {
        /// JSON of [`StateBody`].
        body: String,
        /// Hex Ed25519 signature by the owner over the tag and `body`.
        signature: String,
    },
    Removal {
        /// JSON of [`RemovalBody`].
        body: String,
        /// Hex Ed25519 signature by the owner over the tag and `body`.
        signature: String,
    },
    Invite {
        owner_node_id: String,
        /// Nonce of the seal (random per invitation).
        seq: u64,
        /// Base64 of the sealed [`InviteBody`] (only the invitee can open it).
        sealed: String,
    },
    Pins {
        /// JSON of [`PinsBody`].
        body: String,
        /// Hex Ed25519 signature by the owner over the tag and `body`.
        signature: String,
    },
    /// A member asks the owner to rename it in the signed state.
    Rename {
        /// JSON of [`RenameBody`].
        body: String,
        /// Hex Ed25519 signature by the member over the tag and `body`.
        signature: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct InviteBody {
    pool_id: String,
    pool_name: String,
    invitation_id: String,
    node_id: String,
}

/// An invitation this device received and has not answered.
#[derive(Debug, Clone, Serialize)]
pub struct ReceivedInvitation {
    /// Invitation id (accept with it).
    pub invitation_id: String,
    /// Pool id.
    pub pool_id: String,
    /// Pool name.
    pub pool_name: String,
    /// The owner.
    pub owner_node_id: String,
    /// Unix seconds.
    pub received_at: i64,
}

fn invite_key(identity: &Identity, peer: &str, owner: &str) -> Option<SessionKey> {
    let public = identity::x25519_public(peer)?;
    let mut session = [0u8; 16];
    session.copy_from_slice(&blake3::derive_key(INVITE_CONTEXT, owner.as_bytes())[..16]);
    Some(SessionKey::agree(
        &identity.x25519_secret(),
        &public,
        &session,
    ))
}

/// The owner's complete pin list.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PinsBody {
    pool_id: String,
    owner_node_id: String,
    pins: Vec<super::Pin>,
    issued_at: i64,
}

/// A member's new name for itself. The owner applies only a newer one than the
/// last it applied for that member, so a replayed rename changes nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RenameBody {
    pool_id: String,
    owner_node_id: String,
    node_id: String,
    device_name: String,
    issued_at: i64,
}

/// An owner's checks of a rename gossiped by `author`: for this owner, by the
/// member it renames, signed by it, newer than `last` (the last applied for
/// it) and not from the future, with a name this device would accept.
fn check_rename(
    owner: &str,
    author: &str,
    body: &str,
    signature: &str,
    now: i64,
    last: Option<i64>,
) -> Result<RenameBody, &'static str> {
    let mut rename: RenameBody = serde_json::from_str(body).map_err(|_| "unreadable")?;
    if rename.owner_node_id != owner {
        return Err("not for this owner");
    }
    if rename.node_id != author {
        return Err("a device may rename only itself");
    }
    if !verify_hex(
        author,
        format!("{RENAME_TAG}\n{body}").as_bytes(),
        signature,
    ) {
        return Err("bad signature");
    }
    if rename.issued_at > now + RENAME_SKEW_SECS {
        return Err("from the future");
    }
    if last.is_some_and(|l| rename.issued_at <= l) {
        return Err("not newer than the last one applied");
    }
    rename.device_name = super::device_name(&rename.device_name).map_err(|_| "bad name")?;
    Ok(rename)
}

/// A removal notice: a fresh nonce and a timestamp make a replay detectable.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RemovalBody {
    pool_id: String,
    owner_node_id: String,
    node_id: String,
    nonce: String,
    issued_at: i64,
}

/// What an owner answers a join with (sealed with the exchange's key).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum Verdict {
    Invited {
        pool_id: String,
        pool_name: String,
        invitation_id: String,
    },
    Refused {
        /// `used`, `expired` or `full`.
        reason: String,
    },
}

/// The keys of one join, from the SPAKE2 secret and the whole transcript.
struct JoinKeys {
    transcript: [u8; 32],
    owner_confirm: [u8; 32],
    joiner_confirm: [u8; 32],
    seal: [u8; 32],
}

impl JoinKeys {
    fn derive(
        secret: &[u8],
        plate: &str,
        joiner: &str,
        owner: &str,
        pake_a: &[u8],
        pake_b: &[u8],
        exchange_id: &str,
    ) -> Self {
        let mut h = blake3::Hasher::new();
        for part in [
            plate.as_bytes(),
            joiner.as_bytes(),
            owner.as_bytes(),
            pake_a,
            pake_b,
            exchange_id.as_bytes(),
        ] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let transcript = *h.finalize().as_bytes();
        let key = |context: &str| {
            let mut h = blake3::Hasher::new_derive_key(context);
            h.update(secret);
            h.update(&transcript);
            *h.finalize().as_bytes()
        };
        Self {
            transcript,
            owner_confirm: key("swarmllm pool join owner confirm v1"),
            joiner_confirm: key("swarmllm pool join joiner confirm v1"),
            seal: key("swarmllm pool join seal v1"),
        }
    }

    fn owner_mac(&self) -> String {
        blake3::keyed_hash(&self.owner_confirm, &self.transcript)
            .to_hex()
            .to_string()
    }

    fn joiner_mac(&self) -> String {
        blake3::keyed_hash(&self.joiner_confirm, &self.transcript)
            .to_hex()
            .to_string()
    }

    /// ChaCha20-Poly1305 under a key used for this one message (nonce zero).
    fn seal(&self, plain: &[u8]) -> Vec<u8> {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        chacha20poly1305::ChaCha20Poly1305::new((&self.seal).into())
            .encrypt(
                &chacha20poly1305::Nonce::default(),
                Payload {
                    msg: plain,
                    aad: &self.transcript,
                },
            )
            .unwrap_or_default()
    }

    fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        chacha20poly1305::ChaCha20Poly1305::new((&self.seal).into())
            .decrypt(
                &chacha20poly1305::Nonce::default(),
                Payload {
                    msg: sealed,
                    aad: &self.transcript,
                },
            )
            .ok()
    }
}

/// Whether a hex MAC equals `expected`, compared in constant time.
fn mac_matches(expected: &str, given: &str) -> bool {
    use subtle::ConstantTimeEq;
    expected.len() == given.len() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

/// The joiner's SPAKE2 state, made again from its seed for each reply (a state
/// is consumed by one `finish`, and several owners may answer a nameplate).
fn joiner_pake(seed: [u8; 32], password: &str, joiner: &str) -> (Spake2<Ed25519Group>, Vec<u8>) {
    use rand::SeedableRng;
    Spake2::<Ed25519Group>::start_a_with_rng(
        &Password::new(password.as_bytes()),
        &PakeIdentity::new(joiner.as_bytes()),
        &PakeIdentity::new(JOIN_OWNER),
        rand::rngs::StdRng::from_seed(seed),
    )
}

/// A join this node is making.
struct Joining {
    seed: [u8; 32],
    /// The code's hash: the SPAKE2 password.
    password: String,
    pake: Vec<u8>,
    replies: u32,
    done: Option<oneshot::Sender<Joined>>,
}

/// The owner's answer that proved it knows the code.
struct Joined {
    owner: String,
    exchange_id: String,
    keys: JoinKeys,
    verdict: Verdict,
}

/// A join an owner answered and waits to see finished.
struct Exchange {
    keys: JoinKeys,
    code_hash: String,
    joiner: String,
    device_name: Option<String>,
    pool_id: String,
    invitation_id: String,
    at: std::time::Instant,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateBody {
    pool_id: String,
    name: String,
    owner_node_id: String,
    members: Vec<SignedMember>,
    issued_at: i64,
    /// Share of earnings members keep (absent from older owners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credit_split_pct: Option<u32>,
    /// The pool's rate overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rates: Option<crate::credits::Rates>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SignedMember {
    node_id: String,
    device_name: Option<String>,
    role: String,
    joined_at: i64,
    acceptance_invitation: Option<String>,
    acceptance_sig: Option<String>,
    /// The owner's contribution level for the member (0–100), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    contribution: Option<u32>,
}

fn accept_message(pool_id: &str, owner: &str, node_id: &str, invitation_id: &str) -> Vec<u8> {
    format!("{ACCEPT_TAG}\n{pool_id}\n{owner}\n{node_id}\n{invitation_id}").into_bytes()
}

fn verify_hex(node_id: &str, message: &[u8], sig_hex: &str) -> bool {
    let mut bytes = [0u8; 64];
    hex::decode_to_slice(sig_hex, &mut bytes).is_ok()
        && identity::verify(
            node_id,
            message,
            &ed25519_dalek::Signature::from_bytes(&bytes),
        )
}

/// The network side of a node's pools.
#[derive(Clone)]
pub(super) struct PoolNet {
    pools: Pools,
    identity: Identity,
    network: Network,
    /// Joins this node is making, by nameplate.
    joining: Arc<Mutex<HashMap<String, Joining>>>,
    /// Joins this owner answered, by exchange id.
    exchanges: Arc<Mutex<HashMap<String, Exchange>>>,
    /// Invitations by node id this device received.
    received: Arc<Mutex<Vec<ReceivedInvitation>>>,
    /// The owner's side: each member's last applied rename (its `issued_at`);
    /// only members of its pool get an entry.
    renamed: Arc<Mutex<HashMap<String, i64>>>,
    /// A member's side: the name it asked the owner for, until the owner's
    /// signed state carries it.
    wanted_name: Arc<Mutex<Option<String>>>,
}

impl Pools {
    /// Starts answering pool gossip on `network` (owners redeem codes, members
    /// take verdicts and pool states).
    pub fn attach(&self, network: Network, identity: Identity, tasks: crate::tasks::Tasks) {
        let (tx, mut rx) = mpsc::channel(256);
        network.set_pool_handler(tx);
        let net = PoolNet {
            // The records without the link back to this PoolNet: no reference
            // cycle, so a stopped node drops its pools (and its database).
            pools: Pools {
                net: Arc::new(std::sync::OnceLock::new()),
                ..self.clone()
            },
            identity,
            network,
            joining: Arc::new(Mutex::new(HashMap::new())),
            exchanges: Arc::new(Mutex::new(HashMap::new())),
            received: Arc::new(Mutex::new(Vec::new())),
            renamed: Arc::new(Mutex::new(HashMap::new())),
            wanted_name: Arc::new(Mutex::new(None)),
        };
        let _ = self.net.set(net.clone());
        let each = tasks.clone();
        let per_author = Arc::new(crate::net::inflight::InFlight::default());
        tasks.spawn(async move {
            while let Some((author, bytes)) = rx.recv().await {
                // Gossip is best effort: past 8 of one author's messages in
                // flight, the rest are dropped.
                let Some(slot) = per_author.try_acquire(&author, 8) else {
                    continue;
                };
                let net = net.clone();
                each.spawn(async move {
                    net.on_message(&author, &bytes).await;
                    drop(slot);
                });
            }
        });
    }

    /// Joins a pool with an invite code: runs SPAKE2 with the owner that holds
    /// the code, accepts the pool it offers. Wrong codes get
    /// [`PoolError::UnknownCode`] once no owner has proved it holds the code in time.
    pub async fn join(
        &self,
        code: &str,
        device_name: Option<String>,
    ) -> Result<PoolState, PoolError> {
        let code = parse_code(code)?;
        let net = self
            .net
            .get()
            .cloned()
            .ok_or_else(|| PoolError::Invalid("this node has no P2P network".into()))?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.check_can_join())
            .await
            .map_err(|e| PoolError::Invalid(e.to_string()))??;
        let plate = nameplate(&code).to_string();
        let password = code_hash(&code);
        let seed: [u8; 32] = rand::random();
        let (_, pake) = joiner_pake(seed, &password, &self.node_id);
        let (tx, rx) = oneshot::channel();
        net.joining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                plate.clone(),
                Joining {
                    seed,
                    password,
                    pake: pake.clone(),
                    replies: 0,
                    done: Some(tx),
                },
            );
        let request = Message::JoinStart {
            nameplate: plate.clone(),
            node_id: self.node_id.clone(),
            device_name: device_name.clone(),
            pake: base64::engine::general_purpose::STANDARD.encode(&pake),
        };
        let outcome = async {
            net.publish(&request).await?;
            tokio::time::timeout(VERDICT_WAIT, rx)
                .await
                .map_err(|_| PoolError::UnknownCode)?
                .map_err(|_| PoolError::UnknownCode)
        }
        .await;
        net.joining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&plate);
        let joined = outcome?;
        match joined.verdict {
            Verdict::Refused { reason } => Err(match reason.as_str() {
                "used" => PoolError::CodeUsed,
                "expired" => PoolError::CodeExpired,
                "full" => PoolError::Full(0),
                other => PoolError::Invalid(format!("the owner refused: {other}")),
            }),
            Verdict::Invited {
                pool_id,
                pool_name,
                invitation_id,
            } => {
                let owner = joined.owner;
                let signature = hex::encode(
                    net.identity
                        .sign(&accept_message(
                            &pool_id,
                            &owner,
                            &self.node_id,
                            &invitation_id,
                        ))
                        .to_bytes(),
                );
                let this = self.clone();
                let (p, n, o, d) = (pool_id, pool_name, owner.clone(), device_name);
                let state = tokio::task::spawn_blocking(move || {
                    this.enter_as_member(&p, &n, &o, d.as_deref())
                })
                .await
                .map_err(|e| PoolError::Invalid(e.to_string()))??;
                net.publish(&Message::JoinFinish {
                    owner_node_id: owner,
                    node_id: self.node_id.clone(),
                    exchange_id: joined.exchange_id,
                    confirm: joined.keys.joiner_mac(),
                    signature,
                })
                .await?;
                Ok(state)
            }
        }
    }
}

impl PoolNet {
    /// `body` as JSON and this node's hex signature over `tag` and it.
    fn signed(&self, tag: &str, body: &impl Serialize) -> Result<(String, String), PoolError> {
        let body = serde_json::to_string(body).map_err(|e| PoolError::Invalid(e.to_string()))?;
        let signature = hex::encode(
            self.identity
                .sign(format!("{tag}\n{body}").as_bytes())
                .to_bytes(),
        );
        Ok((body, signature))
    }

    /// Publishes, retrying briefly while the gossip mesh forms.
    async fn publish(&self, message: &Message) -> Result<(), PoolError> {
        if self.network.connected().is_empty() {
            // Alone: no mesh is forming, nobody to wait for.
            return Err(PoolError::Invalid(
                "no peer to send the pool message to: this device is connected to none".into(),
            ));
        }
        let bytes = serde_json::to_vec(message).map_err(|e| PoolError::Invalid(e.to_string()))?;
        let mut last = String::new();
        for _ in 0..20 {
            match self.network.publish_pool(bytes.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(PoolError::Invalid(format!(
            "no peer to send the pool message to: {last}"
        )))
    }

    async fn on_message(&self, author: &str, bytes: &[u8]) {
        let Ok(message) = serde_json::from_slice::<Message>(bytes) else {
            tracing::debug!(author = %&author[..author.len().min(12)], "unreadable pool message");
            return;
        };
        match message {
            Message::JoinStart {
                nameplate,
                node_id,
                device_name,
                pake,
            } if node_id == author => {
                self.on_join_start(nameplate, node_id, device_name, &pake)
                    .await
            }
            Message::JoinReply {
                owner_node_id,
                node_id,
                nameplate,
                exchange_id,
                pake,
                confirm,
                sealed,
            } if owner_node_id == author && node_id == self.pools.node_id => self.on_join_reply(
                &owner_node_id,
                &nameplate,
                &exchange_id,
                &pake,
                &confirm,
                &sealed,
            ),
            Message::JoinFinish {
                owner_node_id,
                node_id,
                exchange_id,
                confirm,
                signature,
            } if node_id == author && owner_node_id == self.pools.node_id => {
                self.on_join_finish(&node_id, &exchange_id, &confirm, &signature)
                    .await
            }
            Message::Acceptance {
                pool_id,
                owner_node_id,
                invitation_id,
                node_id,
                signature,
            } if node_id == author && owner_node_id == self.pools.node_id => {
                let ok = verify_hex(
                    &node_id,
                    &accept_message(&pool_id, &owner_node_id, &node_id, &invitation_id),
                    &signature,
                );
                if !ok {
                    tracing::warn!(node = %node_id, "pool acceptance with a bad signature; ignored");
                    return;
                }
                let pools = self.pools.clone();
                let recorded = tokio::task::spawn_blocking(move || {
                    pools.record_acceptance(&pool_id, &node_id, &invitation_id, &signature)
                })
                .await;
                if matches!(recorded, Ok(Ok(true))) {
                    self.publish_state().await;
                }
            }
            Message::State { body, signature } => self.on_state(author, &body, &signature).await,
            Message::Removal { body, signature } => {
                self.on_removal(author, &body, &signature).await
            }
            Message::Pins { body, signature } => self.on_pins(author, &body, &signature).await,
            Message::Rename { body, signature } => self.on_rename(author, &body, &signature).await,
            Message::Invite {
                owner_node_id,
                seq,
                sealed,
            } if owner_node_id == author => self.on_invite(&owner_node_id, seq, &sealed),
            _ => tracing::debug!("pool message whose claimed sender is not its author; ignored"),
        }
    }

    /// The owner's side: for each of its codes with this nameplate (each charged
    /// an attempt), a SPAKE2 reply with its MAC and the sealed verdict.
    async fn on_join_start(
        &self,
        plate: String,
        joiner: String,
        device_name: Option<String>,
        pake: &str,
    ) {
        let b64 = base64::engine::general_purpose::STANDARD;
        let Ok(pake_a) = b64.decode(pake) else {
            return;
        };
        if plate.len() != super::NAMEPLATE_LEN
            || !plate.bytes().all(|b| super::CODE_ALPHABET.contains(&b))
            || pake_a.len() > 64
            || device_name.as_ref().is_some_and(|d| d.len() > 64)
        {
            return;
        }
        let pools = self.pools.clone();
        let p = plate.clone();
        let Ok(Ok(candidates)) =
            tokio::task::spawn_blocking(move || pools.join_candidates(&p)).await
        else {
            return;
        };
        let me = self.pools.node_id.clone();
        for c in candidates {
            let (state, pake_b) = Spake2::<Ed25519Group>::start_b_with_rng(
                &Password::new(c.code_hash.as_bytes()),
                &PakeIdentity::new(joiner.as_bytes()),
                &PakeIdentity::new(JOIN_OWNER),
                rand::rngs::OsRng,
            );
            let Ok(secret) = state.finish(&pake_a) else {
                return; // not a SPAKE2 message: nothing to answer
            };
            let exchange_id = hex::encode(rand::random::<[u8; 16]>());
            let keys = JoinKeys::derive(
                &secret,
                &plate,
                &joiner,
                &me,
                &pake_a,
                &pake_b,
                &exchange_id,
            );
            let verdict = match c.refused {
                Some(reason) => Verdict::Refused {
                    reason: reason.into(),
                },
                None => Verdict::Invited {
                    pool_id: c.pool_id.clone(),
                    pool_name: c.pool_name.clone(),
                    invitation_id: uuid::Uuid::new_v4().to_string(),
                },
            };
            let reply = Message::JoinReply {
                owner_node_id: me.clone(),
                node_id: joiner.clone(),
                nameplate: plate.clone(),
                exchange_id: exchange_id.clone(),
                pake: b64.encode(&pake_b),
                confirm: keys.owner_mac(),
                sealed: b64.encode(keys.seal(&serde_json::to_vec(&verdict).unwrap_or_default())),
            };
            if let Verdict::Invited { invitation_id, .. } = verdict {
                let mut exchanges = self.exchanges.lock().unwrap_or_else(|p| p.into_inner());
                exchanges.retain(|_, e| e.at.elapsed() < EXCHANGE_TTL);
                if exchanges.len() >= MAX_EXCHANGES {
                    continue;
                }
                exchanges.insert(
                    exchange_id,
                    Exchange {
                        keys,
                        code_hash: c.code_hash,
                        joiner: joiner.clone(),
                        device_name: device_name.clone(),
                        pool_id: c.pool_id,
                        invitation_id,
                        at: std::time::Instant::now(),
                    },
                );
            }
            let _ = self.publish(&reply).await;
        }
    }

    /// The joiner's side: a reply whose MAC verifies came from the owner of the
    /// code (a wrong code, or another pool's code with the same nameplate, fails
    /// here and is ignored).
    fn on_join_reply(
        &self,
        owner: &str,
        plate: &str,
        exchange_id: &str,
        pake: &str,
        confirm: &str,
        sealed: &str,
    ) {
        let b64 = base64::engine::general_purpose::STANDARD;
        let (Ok(pake_b), Ok(sealed)) = (b64.decode(pake), b64.decode(sealed)) else {
            return;
        };
        if exchange_id.len() > 64 || pake_b.len() > 64 {
            return;
        }
        let mut joining = self.joining.lock().unwrap_or_else(|p| p.into_inner());
        let Some(j) = joining.get_mut(plate) else {
            return;
        };
        if j.replies >= MAX_REPLIES {
            return;
        }
        j.replies += 1;
        let me = &self.pools.node_id;
        let (state, _) = joiner_pake(j.seed, &j.password, me);
        let Ok(secret) = state.finish(&pake_b) else {
            return;
        };
        let keys = JoinKeys::derive(&secret, plate, me, owner, &j.pake, &pake_b, exchange_id);
        if !mac_matches(&keys.owner_mac(), confirm) {
            tracing::debug!("a join reply that does not prove the code; ignored");
            return;
        }
        let Some(verdict) = keys
            .open(&sealed)
            .and_then(|plain| serde_json::from_slice::<Verdict>(&plain).ok())
        else {
            return;
        };
        if let Some(done) = j.done.take() {
            let _ = done.send(Joined {
                owner: owner.to_string(),
                exchange_id: exchange_id.to_string(),
                keys,
                verdict,
            });
        }
    }

    /// The owner's last step: the joiner proved it holds the key (so it knows
    /// the code) and signed its acceptance: the code is redeemed and the device
    /// recorded, once.
    async fn on_join_finish(
        &self,
        joiner: &str,
        exchange_id: &str,
        confirm: &str,
        signature: &str,
    ) {
        // The exchange is taken only by the proof of its own joiner: a bogus
        // finish (an observer knows the exchange id) must not spoil it.
        let exchange = {
            let mut exchanges = self.exchanges.lock().unwrap_or_else(|p| p.into_inner());
            match exchanges.get(exchange_id) {
                None => return,
                Some(ex)
                    if ex.joiner == joiner
                        && ex.at.elapsed() < EXCHANGE_TTL
                        && mac_matches(&ex.keys.joiner_mac(), confirm) =>
                {
                    exchanges.remove(exchange_id)
                }
                Some(_) => None,
            }
        };
        let Some(ex) = exchange else {
            tracing::warn!(node = %joiner, "a pool join finish that does not prove the code; ignored");
            // Only a replay or a forgery fails here: it costs its author trust.
            self.network.report_bad_frame(joiner);
            return;
        };
        let me = &self.pools.node_id;
        if !verify_hex(
            joiner,
            &accept_message(&ex.pool_id, me, joiner, &ex.invitation_id),
            signature,
        ) {
            return;
        }
        let pools = self.pools.clone();
        let (joiner, signature) = (joiner.to_string(), signature.to_string());
        let recorded = tokio::task::spawn_blocking(move || -> Result<bool, PoolError> {
            pools.redeem(
                &ex.code_hash,
                &joiner,
                ex.device_name.as_deref(),
                &ex.invitation_id,
            )?;
            pools.record_acceptance(&ex.pool_id, &joiner, &ex.invitation_id, &signature)
        })
        .await;
        match recorded {
            Ok(Ok(true)) => self.publish_state().await,
            Ok(Err(e)) => tracing::info!(error = %e, "a pool join could not be completed"),
            _ => {}
        }
    }

    /// The owner announces the pool's members with their acceptance signatures.
    async fn publish_state(&self) {
        let pools = self.pools.clone();
        let Ok(Ok(Some(body))) = tokio::task::spawn_blocking(move || pools.signed_members()).await
        else {
            return;
        };
        let pool_id = body.pool_id.clone();
        let Ok((body, signature)) = self.signed(STATE_TAG, &body) else {
            return;
        };
        if self
            .publish(&Message::State { body, signature })
            .await
            .is_err()
        {
            return;
        }
        // The pin list travels with every state, so a device that joined or was
        // away since the pins last changed gets them too.
        let pools = self.pools.clone();
        if let Ok(Ok(pins)) = tokio::task::spawn_blocking(move || pools.pins()).await {
            let _ = self.publish_pins(&pool_id, pins).await;
        }
    }

    fn on_invite(&self, owner: &str, seq: u64, sealed: &str) {
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(sealed) else {
            return;
        };
        let Some(key) = invite_key(&self.identity, owner, owner) else {
            return;
        };
        // Not for this device: it cannot be opened here, which is the point.
        let Ok(plain) =
            activation::open_message(&key, seq, Direction::Backward, owner.as_bytes(), &bytes)
        else {
            return;
        };
        let Ok(body) = serde_json::from_slice::<InviteBody>(&plain) else {
            return;
        };
        if body.node_id != self.pools.node_id {
            return;
        }
        let mut received = self.received.lock().unwrap_or_else(|p| p.into_inner());
        // A device keeps its most recent invitations only: owners cannot fill it.
        const MAX_RECEIVED: usize = 32;
        if received.len() >= MAX_RECEIVED {
            received.remove(0);
        }
        if !received
            .iter()
            .any(|r| r.invitation_id == body.invitation_id)
        {
            tracing::info!(pool = %body.pool_name, "pool invitation received");
            received.push(ReceivedInvitation {
                invitation_id: body.invitation_id,
                pool_id: body.pool_id,
                pool_name: body.pool_name,
                owner_node_id: owner.to_string(),
                received_at: (self.pools.clock)(),
            });
        }
    }

    async fn on_pins(&self, author: &str, body: &str, signature: &str) {
        let Ok(list) = serde_json::from_str::<PinsBody>(body) else {
            return;
        };
        if list.owner_node_id != author
            || !verify_hex(author, format!("{PINS_TAG}\n{body}").as_bytes(), signature)
        {
            tracing::warn!("pool pin list with a bad owner signature; ignored");
            return;
        }
        let pools = self.pools.clone();
        let pins = list.pins.clone();
        let applied = tokio::task::spawn_blocking(move || {
            pools.apply_pins(&list.pool_id, &list.owner_node_id, &list.pins)
        })
        .await;
        if matches!(applied, Ok(Ok(true))) {
            self.pools.notify_pins(&pins);
        }
    }

    /// The owner publishes the whole pin list, signed.
    pub(super) async fn publish_pins(
        &self,
        pool_id: &str,
        pins: Vec<super::Pin>,
    ) -> Result<(), PoolError> {
        let (body, signature) = self.signed(
            PINS_TAG,
            &PinsBody {
                pool_id: pool_id.to_string(),
                owner_node_id: self.pools.node_id.clone(),
                pins,
                issued_at: (self.pools.clock)(),
            },
        )?;
        self.publish(&Message::Pins { body, signature }).await
    }

    async fn on_removal(&self, author: &str, body: &str, signature: &str) {
        let Ok(notice) = serde_json::from_str::<RemovalBody>(body) else {
            return;
        };
        if notice.owner_node_id != author
            || !verify_hex(
                author,
                format!("{REMOVAL_TAG}\n{body}").as_bytes(),
                signature,
            )
        {
            tracing::warn!("pool removal notice with a bad owner signature; ignored");
            return;
        }
        let pools = self.pools.clone();
        let applied = tokio::task::spawn_blocking(move || {
            pools.apply_removal(
                &notice.pool_id,
                &notice.owner_node_id,
                &notice.node_id,
                &notice.nonce,
                notice.issued_at,
            )
        })
        .await;
        match applied {
            Ok(Ok(true)) => tracing::info!("applied a pool removal notice"),
            Ok(Ok(false)) => {
                tracing::debug!("pool removal notice ignored (stale, replayed or not ours)")
            }
            _ => {}
        }
    }

    /// The owner tells the pool that `node_id` was removed, then re-publishes the
    /// member list.
    pub(super) async fn announce_removal(
        &self,
        pool_id: &str,
        node_id: &str,
    ) -> Result<(), PoolError> {
        let (body, signature) = self.signed(
            REMOVAL_TAG,
            &RemovalBody {
                pool_id: pool_id.to_string(),
                owner_node_id: self.pools.node_id.clone(),
                node_id: node_id.to_string(),
                nonce: hex::encode(rand::random::<[u8; 16]>()),
                issued_at: (self.pools.clock)(),
            },
        )?;
        self.publish(&Message::Removal { body, signature }).await?;
        self.publish_state().await;
        Ok(())
    }

    async fn on_state(&self, author: &str, body: &str, signature: &str) {
        let Ok(state) = serde_json::from_str::<StateBody>(body) else {
            return;
        };
        if state.owner_node_id != author
            || !verify_hex(author, format!("{STATE_TAG}\n{body}").as_bytes(), signature)
        {
            tracing::warn!("pool state with a bad owner signature; ignored");
            return;
        }
        // Every member but the owner must have signed its own acceptance.
        let valid = state.members.iter().all(|m| {
            m.role == "owner" && m.node_id == state.owner_node_id
                || match (&m.acceptance_invitation, &m.acceptance_sig) {
                    (Some(inv), Some(sig)) => verify_hex(
                        &m.node_id,
                        &accept_message(&state.pool_id, &state.owner_node_id, &m.node_id, inv),
                        sig,
                    ),
                    _ => false,
                }
        });
        if !valid {
            tracing::warn!(pool = %state.pool_id, "pool state with a member lacking a valid acceptance; ignored");
            return;
        }
        let pools = self.pools.clone();
        let members: Vec<Member> = state
            .members
            .iter()
            .map(|m| Member {
                node_id: m.node_id.clone(),
                // A name this device would refuse to set is shown as none.
                device_name: m
                    .device_name
                    .as_deref()
                    .and_then(|n| super::device_name(n).ok()),
                role: m.role.clone(),
                joined_at: m.joined_at,
                accepted: true,
                // Bounded here: a level past 100 is read as 100.
                contribution: m.contribution.map(|c| c.min(100)),
            })
            .collect();
        let settings = state.credit_split_pct.map(|split| (split, state.rates));
        // The name this device asked for, if the owner has not applied it yet.
        let me = &self.pools.node_id;
        let listed = members
            .iter()
            .find(|m| m.node_id == *me)
            .map(|m| m.device_name.clone());
        let resend = {
            let mut wanted = self.wanted_name.lock().unwrap_or_else(|p| p.into_inner());
            match (&*wanted, listed) {
                (Some(w), Some(Some(has))) if *w == has => {
                    *wanted = None;
                    None
                }
                (Some(w), Some(_)) => Some(w.clone()),
                _ => None,
            }
        };
        let (pool_id, owner) = (state.pool_id.clone(), state.owner_node_id.clone());
        let _ = tokio::task::spawn_blocking(move || {
            pools.apply_state(&state.pool_id, &state.owner_node_id, &members, settings)
        })
        .await;
        if let Some(name) = resend {
            // At most one rename per owner state; the owner ignores one that is
            // not newer than the last it applied, so this cannot loop.
            let _ = self.send_rename(&pool_id, &owner, &name).await;
        }
    }

    /// A member asks the owner to carry its new name in the signed state.
    async fn send_rename(&self, pool_id: &str, owner: &str, name: &str) -> Result<(), PoolError> {
        *self.wanted_name.lock().unwrap_or_else(|p| p.into_inner()) = Some(name.to_string());
        let (body, signature) = self.signed(
            RENAME_TAG,
            &RenameBody {
                pool_id: pool_id.to_string(),
                owner_node_id: owner.to_string(),
                node_id: self.pools.node_id.clone(),
                device_name: name.to_string(),
                issued_at: (self.pools.clock)(),
            },
        )?;
        self.publish(&Message::Rename { body, signature }).await
    }

    /// The owner's side of a rename: signed by the member it renames, newer
    /// than the last one applied for it; then the pool hears the new state.
    async fn on_rename(&self, author: &str, body: &str, signature: &str) {
        let last = self
            .renamed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(author)
            .copied();
        let now = (self.pools.clock)();
        let rename = match check_rename(&self.pools.node_id, author, body, signature, now, last) {
            Ok(rename) => rename,
            Err(why) => {
                tracing::debug!("pool rename ignored: {why}");
                return;
            }
        };
        let pools = self.pools.clone();
        let (pool_id, node_id, name) = (
            rename.pool_id.clone(),
            rename.node_id.clone(),
            rename.device_name.clone(),
        );
        let applied =
            tokio::task::spawn_blocking(move || pools.apply_rename(&pool_id, &node_id, &name))
                .await;
        if matches!(applied, Ok(Ok(true))) {
            // Only members get an entry: the map is bounded by the pool's size.
            self.renamed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(rename.node_id, rename.issued_at);
            self.publish_state().await;
        }
    }
}

impl Pools {
    /// Invites a device by node id (owner only); the invitation travels sealed for
    /// that device, which lists it until it accepts.
    pub async fn invite_node(&self, node_id: &str) -> Result<PoolState, PoolError> {
        let this = self.clone();
        let n = node_id.to_string();
        let invitation = tokio::task::spawn_blocking(move || this.invite(&n))
            .await
            .map_err(|e| PoolError::Invalid(e.to_string()))??;
        let net = self
            .net
            .get()
            .ok_or_else(|| PoolError::Invalid("this node has no P2P network".into()))?;
        let key = invite_key(&net.identity, node_id, &self.node_id)
            .ok_or_else(|| PoolError::Invalid(format!("'{node_id}' is not a node id")))?;
        let seq: u64 = rand::random();
        let plain = serde_json::to_vec(&InviteBody {
            pool_id: invitation.pool_id,
            pool_name: invitation.pool_name,
            invitation_id: invitation.invitation_id,
            node_id: node_id.to_string(),
        })
        .map_err(|e| PoolError::Invalid(e.to_string()))?;
        let sealed = activation::seal_message(
            &key,
            seq,
            Direction::Backward,
            self.node_id.as_bytes(),
            &plain,
        );
        net.publish(&Message::Invite {
            owner_node_id: self.node_id.clone(),
            seq,
            sealed: base64::engine::general_purpose::STANDARD.encode(sealed),
        })
        .await?;
        self.state()
    }

    /// Invitations this device received and has not answered.
    pub fn invitations(&self) -> Vec<ReceivedInvitation> {
        self.net
            .get()
            .map(|n| n.received.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Accepts a received invitation: signs it, records the pool, tells the owner.
    pub async fn accept(
        &self,
        invitation_id: &str,
        device_name: Option<String>,
    ) -> Result<PoolState, PoolError> {
        let net = self
            .net
            .get()
            .cloned()
            .ok_or_else(|| PoolError::Invalid("this node has no P2P network".into()))?;
        let invitation = net
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|r| r.invitation_id == invitation_id)
            .cloned()
            .ok_or_else(|| {
                PoolError::Invalid(format!("no pending invitation '{invitation_id}'"))
            })?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.check_can_join())
            .await
            .map_err(|e| PoolError::Invalid(e.to_string()))??;
        let signature = hex::encode(
            net.identity
                .sign(&accept_message(
                    &invitation.pool_id,
                    &invitation.owner_node_id,
                    &self.node_id,
                    &invitation.invitation_id,
                ))
                .to_bytes(),
        );
        let this = self.clone();
        let inv = invitation.clone();
        let state = tokio::task::spawn_blocking(move || {
            this.enter_as_member(
                &inv.pool_id,
                &inv.pool_name,
                &inv.owner_node_id,
                device_name.as_deref(),
            )
        })
        .await
        .map_err(|e| PoolError::Invalid(e.to_string()))??;
        net.publish(&Message::Acceptance {
            pool_id: invitation.pool_id,
            owner_node_id: invitation.owner_node_id,
            invitation_id: invitation.invitation_id.clone(),
            node_id: self.node_id.clone(),
            signature,
        })
        .await?;
        net.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|r| r.invitation_id != invitation.invitation_id);
        Ok(state)
    }

    /// Adds or removes a pin (owner only) and sends the pool the signed pin list;
    /// a pin on the owner itself takes effect here at once.
    pub async fn pin(&self, pin: super::Pin, add: bool) -> Result<Vec<super::Pin>, PoolError> {
        let this = self.clone();
        let p = pin.clone();
        let (pool_id, pins) = tokio::task::spawn_blocking(move || this.change_pin(&p, add))
            .await
            .map_err(|e| PoolError::Invalid(e.to_string()))??;
        if add {
            self.notify_pins(std::slice::from_ref(&pin));
        }
        if let Some(net) = self.net.get()
            && let Err(e) = net.publish_pins(&pool_id, pins.clone()).await
        {
            // Saved here; the devices get the list with the owner's next state.
            tracing::info!("pins not sent now: {e}");
        }
        Ok(pins)
    }

    /// Removes a device (owner only) and tells the pool with a signed notice.
    pub async fn remove(&self, node_id: &str) -> Result<PoolState, PoolError> {
        let this = self.clone();
        let n = node_id.to_string();
        let pool_id = tokio::task::spawn_blocking(move || this.remove_member(&n))
            .await
            .map_err(|e| PoolError::Invalid(e.to_string()))??;
        if let Some(net) = self.net.get() {
            net.announce_removal(&pool_id, node_id).await?;
        }
        self.state()
    }

    /// Renames this device in its pool: here at once, and for every device
    /// through the owner's signed state (the owner republishes it; a member asks
    /// the owner with a signed rename and asks again on each state that does
    /// not carry the name yet, so an owner offline now gets it later).
    pub async fn rename_device(&self, name: &str) -> Result<PoolState, PoolError> {
        let this = self.clone();
        let n = name.to_string();
        let state = tokio::task::spawn_blocking(move || this.set_device_name(&n))
            .await
            .map_err(|e| PoolError::Invalid(e.to_string()))??;
        let Some(net) = self.net.get() else {
            return Ok(state);
        };
        if state.role.as_deref() == Some("owner") {
            net.publish_state().await;
        } else if let (Some(pool_id), Some(owner)) = (&state.pool_id, &state.owner_node_id) {
            let name = super::device_name(name)?;
            if let Err(e) = net.send_rename(pool_id, owner, &name).await {
                tracing::info!("the pool's owner will get the new name later: {e}");
            }
        }
        Ok(state)
    }

    /// Tells the pool's devices the current settings (credit split, rates): the
    /// owner republishes its signed state.
    pub async fn publish_settings(&self) {
        if let Some(net) = self.net.get() {
            net.publish_state().await;
        }
    }

    /// The owner's state document, or `None` when this node owns no pool.
    fn signed_members(&self) -> Result<Option<StateBody>, PoolError> {
        let state = self.state()?;
        if state.role.as_deref() != Some("owner") {
            return Ok(None);
        }
        let sigs = self.acceptances()?;
        let (_, rates) = self.rates()?;
        Ok(Some(StateBody {
            credit_split_pct: state.credit_split_pct,
            rates,
            pool_id: state.pool_id.unwrap_or_default(),
            name: state.name.unwrap_or_default(),
            owner_node_id: state.owner_node_id.unwrap_or_default(),
            issued_at: (self.clock)(),
            members: state
                .members
                .into_iter()
                .filter_map(|m| {
                    let sig = sigs.get(&m.node_id).cloned();
                    if m.role != "owner" && sig.is_none() {
                        return None; // invited but not yet accepted
                    }
                    Some(SignedMember {
                        node_id: m.node_id,
                        device_name: m.device_name,
                        role: m.role,
                        joined_at: m.joined_at,
                        acceptance_invitation: sig.as_ref().map(|s| s.0.clone()),
                        acceptance_sig: sig.map(|s| s.1),
                        contribution: m.contribution,
                    })
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rename body signed by `signer`.
    fn rename(signer: &Identity, owner: &str, node: &str, name: &str, at: i64) -> (String, String) {
        let body = serde_json::to_string(&RenameBody {
            pool_id: "p".into(),
            owner_node_id: owner.into(),
            node_id: node.into(),
            device_name: name.into(),
            issued_at: at,
        })
        .expect("json");
        let sig = hex::encode(
            signer
                .sign(format!("{RENAME_TAG}\n{body}").as_bytes())
                .to_bytes(),
        );
        (body, sig)
    }

    #[test]
    fn a_rename_counts_only_from_the_member_itself_fresh_and_well_formed() {
        let (owner, member, rogue) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        let (o, m, r) = (owner.node_id(), member.node_id(), rogue.node_id());
        let check = |author: &str, (body, sig): (String, String), last| {
            check_rename(&o, author, &body, &sig, 1_000, last).map(|r| r.device_name)
        };
        assert_eq!(
            check(&m, rename(&member, &o, &m, " Desk PC ", 900), None),
            Ok("Desk PC".into())
        );
        // Another device renaming the member, under its own name or the member's.
        assert!(check(&r, rename(&rogue, &o, &m, "owned", 900), None).is_err());
        assert!(check(&m, rename(&rogue, &o, &m, "owned", 900), None).is_err());
        // For another owner; replayed; from the future; a bad name; garbage.
        assert!(check(&m, rename(&member, &r, &m, "x", 900), None).is_err());
        assert!(check(&m, rename(&member, &o, &m, "x", 900), Some(900)).is_err());
        assert!(
            check(
                &m,
                rename(&member, &o, &m, "x", 1_000 + RENAME_SKEW_SECS + 1),
                None
            )
            .is_err()
        );
        assert!(check(&m, rename(&member, &o, &m, "bell\u{7}", 900), None).is_err());
        assert!(check(&m, rename(&member, &o, &m, &"x".repeat(65), 900), None).is_err());
        assert!(check_rename(&o, &m, "{\"pool_id\": 1}", "zz", 1_000, None).is_err());
    }
}
