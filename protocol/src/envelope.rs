//! The value stored for a fragment.
//!
//! An envelope is written by the worker that built (or failed to build) a fragment and read
//! by every gateway. It is encoded as a two-byte header (`b'T'`, format version) followed
//! by postcard, which keeps a 2 KB fragment's overhead to a few dozen bytes. Bytes that do
//! not decode — another program's value, a truncated item, an older or newer format — are
//! a [`DecodeError`], which callers treat as a miss, never a panic.
//!
//! Times are Unix milliseconds (see [`crate::time`]):
//! - `fresh_until`: served without a rebuild until then. For a `failed` envelope this is
//!   the negative-cache deadline: no new build before it.
//! - `stale_until`: a `ready` body may still be served (while a rebuild runs, or as
//!   stale-if-error) until then. memcached expires the item at the later of the two.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::time::{now_ms, remaining};

const MAGIC: u8 = b'T';
/// Current encoding version; bump it when the layout changes.
pub const VERSION: u8 = 1;

/// Outcome of the last build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Built; `body` is the fragment.
    Ready,
    /// The last build failed with `error`. `body`, when not empty, is the last good copy,
    /// servable until `stale_until` (stale-if-error).
    Failed,
}

/// A fragment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Outcome of the last build.
    pub status: Status,
    /// The fragment (or, when failed, the last good copy or nothing).
    pub body: Bytes,
    /// `Content-Type` of the body.
    pub content_type: String,
    /// Strong ETag of the body, quoted, e.g. `"3f2a…"`.
    pub etag: String,
    /// When the body was rendered.
    pub built_at: u64,
    /// See the module docs.
    pub fresh_until: u64,
    /// See the module docs.
    pub stale_until: u64,
    /// Wall time of the successful render, in milliseconds.
    pub build_ms: u32,
    /// Render attempts the last build took.
    pub attempts: u32,
    /// Why the last build failed (`Failed` only).
    pub error: Option<String>,
}

/// The bytes are not an envelope this version can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Empty or not starting with the magic byte.
    #[error("not a Tessera envelope")]
    NotAnEnvelope,
    /// Written by a different format version.
    #[error("envelope format version {0} is not supported (this build reads {VERSION})")]
    Version(u8),
    /// Corrupt or truncated.
    #[error("corrupt envelope: {0}")]
    Corrupt(String),
}

/// The strong ETag of `body`: a quoted 128-bit BLAKE3 prefix.
pub fn etag_of(body: &[u8]) -> String {
    format!("\"{}\"", &blake3::hash(body).to_hex()[..32])
}

/// How a gateway should treat an envelope at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Ready and fresh: serve it.
    Fresh,
    /// Ready but past fresh: serve it and request one rebuild.
    Stale,
    /// Failed, within its negative TTL; [`Envelope::servable`] says if a copy exists.
    Failed,
    /// Failed and past its negative TTL: request a rebuild; serve the copy if servable.
    FailedExpired,
}

impl Envelope {
    /// A freshly built fragment.
    pub fn ready(
        body: Bytes,
        content_type: String,
        fresh: Duration,
        stale: Duration,
        build_ms: u32,
        attempts: u32,
    ) -> Self {
        let now = now_ms();
        Envelope {
            status: Status::Ready,
            etag: etag_of(&body),
            body,
            content_type,
            built_at: now,
            fresh_until: crate::time::add_ms(now, fresh),
            stale_until: crate::time::add_ms(now, fresh + stale),
            build_ms,
            attempts,
            error: None,
        }
    }

    /// A failed build. `previous` is the envelope it replaces, whose body is kept as the
    /// stale-if-error copy while it is still within its stale window.
    pub fn failed(
        error: String,
        failed_ttl: Duration,
        attempts: u32,
        previous: Option<&Envelope>,
    ) -> Self {
        let now = now_ms();
        let fresh_until = crate::time::add_ms(now, failed_ttl);
        match previous.filter(|p| p.servable(now)) {
            Some(p) => Envelope {
                status: Status::Failed,
                fresh_until,
                attempts,
                error: Some(error),
                ..p.clone()
            },
            None => Envelope {
                status: Status::Failed,
                body: Bytes::new(),
                content_type: String::new(),
                etag: String::new(),
                built_at: now,
                fresh_until,
                stale_until: fresh_until,
                build_ms: 0,
                attempts,
                error: Some(error),
            },
        }
    }

    /// Whether the body may be served at `now`: a ready body until `stale_until`, a
    /// failed envelope's last good copy likewise.
    pub fn servable(&self, now: u64) -> bool {
        !self.etag.is_empty() && now < self.stale_until
    }

    /// How to treat it at `now`.
    pub fn freshness(&self, now: u64) -> Freshness {
        match (self.status, now < self.fresh_until) {
            (Status::Ready, true) => Freshness::Fresh,
            (Status::Ready, false) => Freshness::Stale,
            (Status::Failed, true) => Freshness::Failed,
            (Status::Failed, false) => Freshness::FailedExpired,
        }
    }

    /// How long the store should keep it, from `now`: until the later deadline.
    pub fn store_ttl(&self, now: u64) -> Duration {
        remaining(now, self.fresh_until.max(self.stale_until))
    }

    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![MAGIC, VERSION];
        // postcard into a Vec cannot fail for these plain types; fall back to an empty
        // payload (which decodes as Corrupt, i.e. a miss) rather than panic.
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    /// Decodes bytes from the store.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        match bytes {
            [MAGIC, VERSION, rest @ ..] => {
                postcard::from_bytes(rest).map_err(|e| DecodeError::Corrupt(e.to_string()))
            }
            [MAGIC, other, ..] => Err(DecodeError::Version(*other)),
            _ => Err(DecodeError::NotAnEnvelope),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope::ready(
            Bytes::from_static(b"<ul><li>1</li></ul>"),
            "text/html; charset=utf-8".into(),
            Duration::from_secs(60),
            Duration::from_secs(600),
            312,
            1,
        )
    }

    #[test]
    fn round_trips() {
        let e = sample();
        assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        let f = Envelope::failed("upstream 500".into(), Duration::from_secs(5), 4, None);
        assert_eq!(Envelope::decode(&f.encode()).unwrap(), f);
    }

    #[test]
    fn overhead_is_small() {
        let e = sample();
        let overhead = e.encode().len() - e.body.len();
        assert!(overhead < 120, "{overhead} bytes of overhead");
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let good = sample().encode();
        assert_eq!(Envelope::decode(b""), Err(DecodeError::NotAnEnvelope));
        assert_eq!(Envelope::decode(b"hello"), Err(DecodeError::NotAnEnvelope));
        assert_eq!(
            Envelope::decode(&[MAGIC, 99, 1, 2]),
            Err(DecodeError::Version(99))
        );
        for cut in 2..good.len() {
            assert!(
                matches!(Envelope::decode(&good[..cut]), Err(DecodeError::Corrupt(_))),
                "truncated at {cut} decoded"
            );
        }
        let mut flipped = good.clone();
        flipped[2] = 0xff;
        assert!(Envelope::decode(&flipped).is_err());
    }

    #[test]
    fn freshness_follows_the_deadlines() {
        let e = sample();
        assert_eq!(e.freshness(e.fresh_until - 1), Freshness::Fresh);
        assert_eq!(e.freshness(e.fresh_until), Freshness::Stale);
        assert!(e.servable(e.stale_until - 1));
        assert!(!e.servable(e.stale_until));
        assert_eq!(e.store_ttl(e.built_at), Duration::from_secs(660));
    }

    #[test]
    fn failure_keeps_the_last_good_copy_while_servable() {
        let good = sample();
        let f = Envelope::failed("boom".into(), Duration::from_secs(5), 4, Some(&good));
        assert_eq!(f.status, Status::Failed);
        assert_eq!(f.body, good.body);
        assert_eq!(f.stale_until, good.stale_until);
        assert!(f.servable(now_ms()));
        assert_eq!(f.error.as_deref(), Some("boom"));

        let mut expired = good.clone();
        expired.stale_until = 1;
        let f = Envelope::failed("boom".into(), Duration::from_secs(5), 4, Some(&expired));
        assert!(f.body.is_empty());
        assert!(!f.servable(now_ms()));
        assert_eq!(f.freshness(now_ms()), Freshness::Failed);
    }

    #[test]
    fn etag_depends_on_body() {
        assert_eq!(etag_of(b"a"), etag_of(b"a"));
        assert_ne!(etag_of(b"a"), etag_of(b"b"));
        assert!(etag_of(b"a").starts_with('"') && etag_of(b"a").ends_with('"'));
    }
}
