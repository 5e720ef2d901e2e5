//! Sealed `requestState` for 2026-07-28 approvals (SPEC §6, MCP-NOTES §5.2).
//!
//! A 2026-07-28 host is asked by answering the call with `input_required`; it retries the call
//! with the human's answer and the opaque `requestState` the proxy gave it. The state is the
//! proxy's only memory of the question, and the host (or anything between) may tamper with it,
//! so it is sealed: `apie1.<payload>.<mac>`, base64url, with an HMAC-SHA256 under a key that
//! lives only in this process. The payload binds the tool, the SHA-256 of the arguments, an
//! expiry and a nonce; a nonce opens once (replays are refused). The upstream's own
//! `requestState` and `inputResponses`, when the call carried them, ride inside, so they reach
//! the upstream again with the approved retry.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::Sha256;

/// Every sealed state starts with this.
pub const PREFIX: &str = "apie1.";

/// What a sealed state carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub tool: String,
    pub arguments_sha256: String,
    /// Milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// Single use; doubles as the approval id.
    pub nonce: String,
    /// The human already approved; the upstream asked for more input (its own MRTR round).
    #[serde(default)]
    pub approved: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_responses: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error("the approval state is not one this proxy issued")]
    Forged,
    #[error("the approval state has expired")]
    Expired,
    #[error("the approval state was already used")]
    Replayed,
}

/// Seals and opens states with this process's key, and remembers the nonces used.
pub struct Sealer {
    key: [u8; 32],
    used: Mutex<HashMap<String, u64>>,
}

impl Sealer {
    pub fn new() -> Sealer {
        let mut key = [0u8; 32];
        // Without randomness no state could be trusted; a zero key is refused below.
        if getrandom::fill(&mut key).is_err() {
            tracing::error!("no randomness for the approval key: 2026-07-28 approvals disabled");
            key = [0; 32];
        }
        Sealer {
            key,
            used: Mutex::new(HashMap::new()),
        }
    }

    fn usable(&self) -> bool {
        self.key != [0; 32]
    }

    fn mac(&self, payload: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(PREFIX.as_bytes());
        mac.update(payload.as_bytes());
        mac
    }

    /// The state to hand the host, or `None` when sealing is impossible.
    pub fn seal(&self, grant: &Grant) -> Option<String> {
        if !self.usable() {
            return None;
        }
        let payload = B64.encode(serde_json::to_vec(grant).ok()?);
        let tag = B64.encode(self.mac(&payload).finalize().into_bytes());
        Some(format!("{PREFIX}{payload}.{tag}"))
    }

    /// Opens a state: it must carry this process's MAC, be unexpired at `now_ms`, and not have
    /// been opened before. Opening uses the nonce up.
    pub fn open(&self, state: &str, now_ms: u64) -> Result<Grant, Refused> {
        let rest = state.strip_prefix(PREFIX).ok_or(Refused::Forged)?;
        let (payload, tag) = rest.split_once('.').ok_or(Refused::Forged)?;
        let tag = B64.decode(tag).map_err(|_| Refused::Forged)?;
        if !self.usable() {
            return Err(Refused::Forged);
        }
        self.mac(payload)
            .verify_slice(&tag)
            .map_err(|_| Refused::Forged)?;
        let bytes = B64.decode(payload).map_err(|_| Refused::Forged)?;
        let grant: Grant = serde_json::from_slice(&bytes).map_err(|_| Refused::Forged)?;
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.retain(|_, expires| *expires > now_ms);
        if used.contains_key(&grant.nonce) {
            return Err(Refused::Replayed);
        }
        if grant.expires_ms <= now_ms {
            return Err(Refused::Expired);
        }
        used.insert(grant.nonce.clone(), grant.expires_ms);
        Ok(grant)
    }
}

impl Default for Sealer {
    fn default() -> Self {
        Sealer::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(expires_ms: u64) -> Grant {
        Grant {
            tool: "deploy".into(),
            arguments_sha256: "abc".into(),
            expires_ms,
            nonce: super::super::new_id(),
            approved: false,
            inner_state: Some("upstream-state".into()),
            inner_responses: None,
        }
    }

    #[test]
    fn a_state_opens_once_with_everything_it_carried() {
        let sealer = Sealer::new();
        let g = grant(2_000);
        let state = sealer.seal(&g).unwrap();
        assert!(state.starts_with(PREFIX));
        assert_eq!(sealer.open(&state, 1_000), Ok(g));
        assert_eq!(sealer.open(&state, 1_000), Err(Refused::Replayed));
    }

    #[test]
    fn tampered_foreign_and_expired_states_are_refused() {
        let sealer = Sealer::new();
        let state = sealer.seal(&grant(2_000)).unwrap();
        // Flip one character of the payload.
        let mut bytes = state.clone().into_bytes();
        let i = PREFIX.len() + 3;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert_eq!(sealer.open(&tampered, 1_000), Err(Refused::Forged));
        assert_eq!(
            Sealer::new().open(&state, 1_000),
            Err(Refused::Forged),
            "another process's key"
        );
        for junk in ["", "apie1.", "apie1.x.y", "opaque-upstream-state"] {
            assert_eq!(sealer.open(junk, 1_000), Err(Refused::Forged), "{junk}");
        }
        assert_eq!(sealer.open(&state, 2_000), Err(Refused::Expired));
    }
}
