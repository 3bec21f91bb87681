//! The keys of each link: an X25519 secret per peer (cached), a key per session
//! derived from it, and the seals of what a step carries on the link.

use super::activation::{self, Direction, Header, LinkSecret, SessionKey};
use super::wire::{self, Envelope, StepFailure};
use super::{MAX_LINKS, Pipeline};
use crate::identity;

impl Pipeline {
    pub(super) fn link_key(
        &self,
        peer: &str,
        session: &[u8; 16],
    ) -> Result<SessionKey, StepFailure> {
        let cached = self
            .inner
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned();
        let secret = match cached {
            Some(secret) => secret,
            None => {
                let public = identity::x25519_public(peer).ok_or_else(|| StepFailure {
                    failed_hop: Some(peer.to_string()),
                    message: format!("{peer} is not a valid node id"),
                })?;
                let secret = LinkSecret::agree(&self.inner.x25519, &public);
                let mut links = self.inner.links.lock().unwrap_or_else(|p| p.into_inner());
                if links.len() >= MAX_LINKS {
                    links.clear();
                }
                links.insert(peer.to_string(), secret.clone());
                secret
            }
        };
        Ok(SessionKey::derive(&secret, session))
    }

    pub(super) fn seal_hidden(
        &self,
        env: &Envelope,
        session: [u8; 16],
        to: &str,
        hidden: &[f32],
    ) -> Result<Vec<u8>, StepFailure> {
        let n_tokens = env.n_tokens;
        let n_embd = hidden.len() / n_tokens.max(1) as usize;
        let key = self.link_key(to, &session)?;
        let allowed = env.dtype().map_err(|e| self.own_failure(e.to_string()))?;
        let dtype = self
            .inner
            .link_speeds
            .choose(to, allowed, self.inner.config.slow_link_mbps);
        self.inner.link_speeds.sent(to, dtype);
        activation::seal(
            &key,
            Header {
                dtype,
                session,
                start_pos: env.pos,
                n_tokens,
                n_embd: n_embd as u32,
                seq: env.seq,
            },
            Direction::Forward,
            hidden,
        )
        .map_err(|e| self.own_failure(e.to_string()))
    }

    pub(super) fn seal_result(
        &self,
        env: &Envelope,
        session: [u8; 16],
        sampled: Option<&wire::Sampled>,
    ) -> Result<Vec<u8>, StepFailure> {
        let key = self.link_key(&env.requester, &session)?;
        let plain = wire::encode_result(sampled);
        Ok(activation::seal_message(
            &key,
            env.seq,
            Direction::Backward,
            &result_aad(env),
            &plain,
        ))
    }
}

pub(super) fn step_aad(env: &Envelope) -> Vec<u8> {
    format!(
        "step:{}:{}:{}:{}",
        env.session, env.seq, env.pos, env.n_tokens
    )
    .into_bytes()
}

pub(super) fn result_aad(env: &Envelope) -> Vec<u8> {
    format!("result:{}:{}", env.session, env.seq).into_bytes()
}
