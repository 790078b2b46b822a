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
//! - `render_started`: when the worker started the render that produced the body; a tag
//!   purged at or after it retires the envelope ([`crate::tags`]).
//!
//! Layouts: version 3 adds `tags` and `render_started`. postcard is not self-describing
//! (a field cannot be added with a serde default: older bytes simply end early), so each
//! layout has its own version byte. An envelope without tags is still written as version
//! 2, byte for byte what earlier builds wrote, so gateways of the previous release keep
//! reading every fragment that does not use tags during a rolling upgrade.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::time::{now_ms, remaining};

const MAGIC: u8 = b'T';
/// Current encoding version; bump it when the layout changes. Version 1 (without
/// [`Envelope::esi`]) and version 2 (without [`Envelope::tags`]) are still read, and
/// version 2 is still written for envelopes without tags (see the module docs).
pub const VERSION: u8 = 3;
/// The layout without tags.
const VERSION_UNTAGGED: u8 = 2;

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    /// The render answer asked for ESI processing (`Surrogate-Control:
    /// content="ESI/1.0"`): only then are its `<esi:…>` tags composed. A fragment that did
    /// not opt in is served as it is, so one that reflects user input cannot make the
    /// gateway build other fragments.
    pub esi: bool,
    /// The tags of the render answer's `Surrogate-Key` (validated, distinct; see
    /// [`crate::tags`]). A failed envelope keeps those of the copy it holds.
    pub tags: Vec<String>,
    /// When the render of `body` started (worker clock, Unix ms): a purge of one of
    /// `tags` at or after it retires the envelope. Before version 3: `built_at`.
    pub render_started: u64,
}

/// Version 3, the current layout: version 2, then the tags and the render's start.
/// postcard writes a struct as its fields one after the other, so nesting version 2 gives
/// the same bytes as [`Envelope`]'s own fields; this form reads them with the body
/// borrowed.
#[derive(Deserialize)]
struct EnvelopeV3<B> {
    v2: EnvelopeV2<B>,
    tags: Vec<String>,
    render_started: u64,
}

/// Version 2 of the layout: [`Envelope`] without `tags` and `render_started`, still
/// written for envelopes without tags. Nesting version 1 gives the same bytes as listing
/// its fields again.
#[derive(Serialize, Deserialize)]
struct EnvelopeV2<B> {
    v1: EnvelopeV1<B>,
    esi: bool,
}

/// Version 1 of the layout: [`Envelope`] without `esi`. Its fragments were composed
/// whenever they carried markup, and still are until rebuilt.
///
/// Generic in the body: written from a [`Bytes`], read as a slice borrowed from the
/// stored bytes, which the decoded body then shares instead of copying.
#[derive(Serialize, Deserialize)]
struct EnvelopeV1<B> {
    status: Status,
    body: B,
    content_type: String,
    etag: String,
    built_at: u64,
    fresh_until: u64,
    stale_until: u64,
    build_ms: u32,
    attempts: u32,
    error: Option<String>,
}

impl EnvelopeV3<&[u8]> {
    fn into_envelope(self, source: &Bytes) -> Envelope {
        Envelope {
            tags: self.tags,
            render_started: self.render_started,
            ..self.v2.into_envelope(source)
        }
    }
}

impl EnvelopeV2<&[u8]> {
    fn into_envelope(self, source: &Bytes) -> Envelope {
        Envelope {
            esi: self.esi,
            ..self.v1.into_envelope(source)
        }
    }
}

impl EnvelopeV1<&[u8]> {
    /// The envelope, its body a view of `source`, the bytes this was read from.
    fn into_envelope(self, source: &Bytes) -> Envelope {
        Envelope {
            status: self.status,
            body: source.slice_ref(self.body),
            content_type: self.content_type,
            etag: self.etag,
            built_at: self.built_at,
            fresh_until: self.fresh_until,
            stale_until: self.stale_until,
            build_ms: self.build_ms,
            attempts: self.attempts,
            error: self.error,
            esi: true,
            tags: Vec::new(),
            render_started: self.built_at,
        }
    }
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
            esi: false,
            tags: Vec::new(),
            render_started: now,
        }
    }

    /// The same envelope with the tags of its render, which started at `render_started`
    /// (Unix ms). The tags must be valid ([`crate::tags::check`]).
    #[must_use]
    pub fn with_tags(mut self, tags: Vec<String>, render_started: u64) -> Self {
        // Without tags the start matters to nobody and is not stored (version 2): keep
        // it what decoding gives, `built_at`.
        self.render_started = if tags.is_empty() {
            self.built_at
        } else {
            render_started
        };
        self.tags = tags;
        self
    }

    /// Whether a purge of one of its tags retired it, given when each tag was last purged
    /// (`None` or 0: never): purged at or after its render started. The render may have
    /// read the data the purge was about, so a render racing a purge is not trusted.
    pub fn retired_by(&self, purged_at: impl Fn(&str) -> Option<u64>) -> bool {
        self.tags
            .iter()
            .any(|t| purged_at(t).is_some_and(|at| self.retired_at(at)))
    }

    /// Whether a purge of one of its tags at `purged_at` (Unix ms; 0: never) retires it.
    pub fn retired_at(&self, purged_at: u64) -> bool {
        purged_at > 0 && purged_at >= self.render_started
    }

    /// The same envelope, composed (`esi = true`) or served as it is.
    #[must_use]
    pub fn with_esi(mut self, esi: bool) -> Self {
        self.esi = esi;
        self
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
                esi: false,
                tags: Vec::new(),
                render_started: now,
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

    /// The stored envelope `held` as a soft purge at `now` leaves it: no longer fresh
    /// (`fresh_until` brought to `now`), still servable until its `stale_until`, which is
    /// never before the `fresh_until` it had (so even a route with `stale = 0` serves it
    /// while it is rebuilt, until it would have stopped being fresh). The bytes and TTL
    /// to store, for [`Store::update`](crate::Store::update); `None` when there is none,
    /// or it is not fresh anyway.
    pub fn soft_purged(held: Option<&[u8]>, now: u64) -> Option<(Vec<u8>, Duration)> {
        let envelope = Envelope::decode(&Bytes::copy_from_slice(held?)).ok()?;
        if envelope.fresh_until <= now {
            return None;
        }
        let envelope = Envelope {
            fresh_until: now,
            ..envelope
        };
        Some((envelope.encode(), envelope.store_ttl(now)))
    }

    /// How long the store should keep it, from `now`: until the later deadline.
    pub fn store_ttl(&self, now: u64) -> Duration {
        remaining(now, self.fresh_until.max(self.stale_until))
    }

    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        // postcard into a Vec cannot fail for these plain types; fall back to an empty
        // payload (which decodes as Corrupt, i.e. a miss) rather than panic.
        if self.tags.is_empty() {
            let mut out = vec![MAGIC, VERSION_UNTAGGED];
            out.extend(postcard::to_stdvec(&self.as_v2()).unwrap_or_default());
            return out;
        }
        let mut out = vec![MAGIC, VERSION];
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    /// Its version 2 layout (no tags). The body is shared, not copied.
    fn as_v2(&self) -> EnvelopeV2<Bytes> {
        EnvelopeV2 {
            v1: EnvelopeV1 {
                status: self.status,
                body: self.body.clone(),
                content_type: self.content_type.clone(),
                etag: self.etag.clone(),
                built_at: self.built_at,
                fresh_until: self.fresh_until,
                stale_until: self.stale_until,
                build_ms: self.build_ms,
                attempts: self.attempts,
                error: self.error.clone(),
            },
            esi: self.esi,
        }
    }

    /// Decodes bytes from the store. The body shares `bytes` (no copy).
    pub fn decode(bytes: &Bytes) -> Result<Envelope, DecodeError> {
        let corrupt = |e: postcard::Error| DecodeError::Corrupt(e.to_string());
        match &bytes[..] {
            [MAGIC, VERSION, rest @ ..] => postcard::from_bytes::<EnvelopeV3<&[u8]>>(rest)
                .map(|v3| {
                    let mut e = v3.into_envelope(bytes);
                    let (tags, started) = (std::mem::take(&mut e.tags), e.render_started);
                    e.with_tags(tags, started)
                })
                .map_err(corrupt),
            [MAGIC, VERSION_UNTAGGED, rest @ ..] => postcard::from_bytes::<EnvelopeV2<&[u8]>>(rest)
                .map(|v2| v2.into_envelope(bytes))
                .map_err(corrupt),
            [MAGIC, 1, rest @ ..] => postcard::from_bytes::<EnvelopeV1<&[u8]>>(rest)
                .map(|v1| v1.into_envelope(bytes))
                .map_err(corrupt),
            [MAGIC, other, ..] => Err(DecodeError::Version(*other)),
            _ => Err(DecodeError::NotAnEnvelope),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`Envelope::decode`] of a copy of `bytes`.
    fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        Envelope::decode(&Bytes::copy_from_slice(bytes))
    }

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
        assert_eq!(decode(&e.encode()).unwrap(), e);
        let f = Envelope::failed("upstream 500".into(), Duration::from_secs(5), 4, None);
        assert_eq!(decode(&f.encode()).unwrap(), f);
    }

    #[test]
    fn a_decoded_body_shares_the_stored_bytes() {
        for e in [sample(), sample().with_tags(vec!["t".into()], 7)] {
            let stored = Bytes::from(e.encode());
            let decoded = Envelope::decode(&stored).unwrap();
            assert_eq!(decoded, e);
            let within = stored.as_ptr_range();
            assert!(
                within.contains(&decoded.body.as_ptr()),
                "the body was copied out of the stored bytes"
            );
        }
    }

    #[test]
    fn overhead_is_small() {
        let e = sample();
        let overhead = e.encode().len() - e.body.len();
        assert!(overhead < 120, "{overhead} bytes of overhead");
    }

    #[test]
    fn version_1_is_read_as_composed() {
        let e = sample();
        let v1 = EnvelopeV1 {
            status: e.status,
            body: e.body.clone(),
            content_type: e.content_type.clone(),
            etag: e.etag.clone(),
            built_at: e.built_at,
            fresh_until: e.fresh_until,
            stale_until: e.stale_until,
            build_ms: e.build_ms,
            attempts: e.attempts,
            error: None,
        };
        let mut bytes = vec![MAGIC, 1];
        bytes.extend(postcard::to_stdvec(&v1).unwrap());
        let decoded = decode(&bytes).unwrap();
        assert!(decoded.esi, "version 1 fragments were composed");
        assert_eq!(decoded, e.clone().with_esi(true));
        assert!(!e.esi, "a new envelope is not composed unless it asked");
        let esi = e.with_esi(true);
        assert_eq!(decode(&esi.encode()), Ok(esi));
    }

    #[test]
    fn tagged_envelopes_use_version_3_and_untagged_ones_stay_version_2() {
        let plain = sample();
        let bytes = plain.encode();
        assert_eq!(&bytes[..2], &[MAGIC, 2], "readable by the previous release");
        // Exactly what version 2 wrote: the fields up to `esi`, which the version 3
        // layout starts with.
        let v3 = postcard::to_stdvec(&plain).unwrap();
        assert!(v3.starts_with(&bytes[2..]) && v3.len() > bytes.len() - 2);
        assert_eq!(decode(&bytes), Ok(plain.clone()));

        let tagged = plain
            .clone()
            .with_tags(vec!["product-42".into(), "shelf-7".into()], 1_000);
        let bytes = tagged.encode();
        assert_eq!(&bytes[..2], &[MAGIC, VERSION]);
        assert_eq!(decode(&bytes), Ok(tagged.clone()));
        for cut in 2..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        // A failure keeps the copy's tags and render start: a purge retires the copy too.
        let failed = Envelope::failed("boom".into(), Duration::from_secs(5), 2, Some(&tagged));
        assert_eq!(failed.tags, tagged.tags);
        assert_eq!(failed.render_started, 1_000);
        assert_eq!(decode(&failed.encode()), Ok(failed));
    }

    #[test]
    fn a_tag_purged_at_or_after_the_render_start_retires_it() {
        let e = sample().with_tags(vec!["a".into(), "b".into()], 1_000);
        let purged = |tag: &'static str, at: u64| move |t: &str| (t == tag).then_some(at);
        assert!(!e.retired_by(|_| None));
        assert!(!e.retired_by(purged("b", 999)), "purged before the render");
        assert!(e.retired_by(purged("b", 1_000)), "purged as it started");
        assert!(
            e.retired_by(purged("a", 5_000)),
            "purged while or after it rendered"
        );
        assert!(!e.retired_by(purged("c", 5_000)), "another tag");
        assert!(!e.retired_by(|_| Some(0)), "0 is never purged");
        assert!(
            !sample().retired_by(|_| Some(u64::MAX)),
            "no tags, nothing to retire"
        );
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let good = sample().encode();
        assert_eq!(decode(b""), Err(DecodeError::NotAnEnvelope));
        assert_eq!(decode(b"hello"), Err(DecodeError::NotAnEnvelope));
        assert_eq!(decode(&[MAGIC, 99, 1, 2]), Err(DecodeError::Version(99)));
        for cut in 2..good.len() {
            assert!(
                matches!(decode(&good[..cut]), Err(DecodeError::Corrupt(_))),
                "truncated at {cut} decoded"
            );
        }
        let mut flipped = good.clone();
        flipped[2] = 0xff;
        assert!(decode(&flipped).is_err());
    }

    #[test]
    fn a_soft_purge_ends_freshness_and_keeps_the_stale_window() {
        let e = Envelope::ready(
            Bytes::from_static(b"x"),
            "text/html".into(),
            Duration::from_secs(60),
            Duration::ZERO,
            1,
            1,
        );
        let now = e.built_at + 1_000;
        let (bytes, ttl) = Envelope::soft_purged(Some(&e.encode()), now).unwrap();
        let soft = Envelope::decode(&Bytes::from(bytes)).unwrap();
        assert_eq!(soft.freshness(now), Freshness::Stale);
        assert!(
            soft.servable(now),
            "served stale until it would have stopped being fresh"
        );
        assert_eq!(soft.stale_until, e.fresh_until);
        assert_eq!(ttl, Duration::from_secs(59));
        assert_eq!(Envelope::soft_purged(None, now), None);
        assert_eq!(Envelope::soft_purged(Some(b"junk"), now), None);
        assert_eq!(
            Envelope::soft_purged(Some(&e.encode()), e.fresh_until),
            None,
            "not fresh"
        );
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

    /// `failed` with a TTL of `ttl_ms`, and the instants just before and after it ran.
    fn failed_between(ttl_ms: u64, previous: Option<&Envelope>) -> (u64, Envelope, u64) {
        let before = now_ms();
        let f = Envelope::failed(
            "upstream 503".into(),
            Duration::from_millis(ttl_ms),
            4,
            previous,
        );
        (before, f, now_ms())
    }

    #[test]
    fn a_failure_that_keeps_a_copy_is_remembered_for_failed_ttl_only() {
        let good = sample();
        let (before, f, after) = failed_between(5_000, Some(&good));
        // The negative-cache deadline is the failure's own, not the copy's fresh one.
        assert!(
            (before + 5_000..=after + 5_000).contains(&f.fresh_until),
            "fresh_until {} not failed_ttl after {before}..{after}",
            f.fresh_until
        );
        assert!(f.fresh_until < good.fresh_until);
        assert_eq!(f.freshness(f.fresh_until - 1), Freshness::Failed);
        assert_eq!(f.freshness(f.fresh_until), Freshness::FailedExpired);
        // Everything about the copy is the copy's; the outcome is the failure's.
        assert_eq!(f.etag, good.etag);
        assert_eq!(f.content_type, good.content_type);
        assert_eq!(f.built_at, good.built_at);
        assert_eq!(f.build_ms, good.build_ms);
        assert_eq!(f.attempts, 4);
        assert_eq!(f.error.as_deref(), Some("upstream 503"));
    }

    #[test]
    fn a_failure_without_a_copy_has_nothing_to_serve() {
        let (before, f, after) = failed_between(5_000, None);
        assert_eq!(f.status, Status::Failed);
        assert!((before + 5_000..=after + 5_000).contains(&f.fresh_until));
        assert_eq!(f.stale_until, f.fresh_until);
        assert!((before..=after).contains(&f.built_at));
        assert!(f.body.is_empty() && f.etag.is_empty() && f.content_type.is_empty());
        assert_eq!((f.build_ms, f.attempts), (0, 4));
        assert!(
            !f.servable(before),
            "nothing to serve, even before the deadline"
        );
        assert_eq!(f.freshness(before), Freshness::Failed);
        assert_eq!(f.freshness(f.fresh_until), Freshness::FailedExpired);
        assert_eq!(f.store_ttl(f.fresh_until - 5_000), Duration::from_secs(5));
    }

    #[test]
    fn the_store_keeps_an_envelope_until_its_later_deadline() {
        let mut good = sample();
        // A copy about to go stale, failing with a longer negative TTL: the failure must
        // outlive the copy in the store.
        good.stale_until = now_ms() + 1_000;
        let (_, f, _) = failed_between(60_000, Some(&good));
        assert_eq!(f.stale_until, good.stale_until);
        assert_eq!(
            f.store_ttl(good.stale_until),
            Duration::from_millis(f.fresh_until - good.stale_until)
        );
        assert_eq!(f.store_ttl(f.fresh_until), Duration::ZERO);
        let e = sample();
        assert_eq!(
            e.store_ttl(e.fresh_until),
            Duration::from_secs(600),
            "a ready envelope stays for its stale window"
        );
    }

    #[test]
    fn ready_records_the_build() {
        let before = now_ms();
        let e = sample();
        assert_eq!(e.status, Status::Ready);
        assert!((before..=now_ms()).contains(&e.built_at));
        assert_eq!(e.fresh_until, e.built_at + 60_000);
        assert_eq!(e.stale_until, e.built_at + 660_000);
        assert_eq!((e.build_ms, e.attempts), (312, 1));
        assert_eq!(e.etag, etag_of(&e.body));
        assert_eq!(e.error, None);
        assert_eq!(
            &e.encode()[..2],
            &[MAGIC, VERSION_UNTAGGED],
            "no tags: version 2"
        );
        let tagged = e.with_tags(vec!["t".into()], 1);
        assert_eq!(&tagged.encode()[..2], &[MAGIC, VERSION]);
    }

    #[test]
    fn etag_depends_on_body() {
        assert_eq!(etag_of(b"a"), etag_of(b"a"));
        assert_ne!(etag_of(b"a"), etag_of(b"b"));
        assert!(etag_of(b"a").starts_with('"') && etag_of(b"a").ends_with('"'));
    }
}
