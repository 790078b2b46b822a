//! Tags (surrogate keys): purge every fragment that shows one thing, on every route.
//!
//! A render answer may carry `Surrogate-Key: product-42 shelf-7` (space-separated, as
//! Fastly reads it). The worker keeps the tags in the envelope, with the instant its render
//! *started* ([`Envelope::render_started`], worker clock). A purge of a tag writes the
//! instant of the purge to the tag's store key ([`Keyspace::tag`]: `{ns}:t:{tag}`), and
//! an envelope is unusable — not served, not even stale — once any of its tags was purged
//! at or after its render started: a render that raced the purge may have read the old
//! data, so it is not trusted either. Nothing is scanned or deleted: an envelope is judged
//! when it is read, by reading its tags' keys (gateways cache what they read, see the
//! gateway's `tags` module).
//!
//! The comparison crosses machines (the worker's clock against the purging gateway's), so
//! their clocks must be synchronised (NTP); a skew of *d* lets a render that started up
//! to *d* before a purge count as after it.
//!
//! Tag keys are written without expiry: a purge must outlive every envelope rendered
//! before it, whatever the routes' `fresh` + `stale` are. A key costs a few dozen bytes;
//! the keys of tags whose fragments are still read are read too, so memcached's LRU keeps
//! them and reclaims the others first.
//!
//! **Several tags at once.** A list of tags is purged tag by tag, at one instant. A purge
//! of the fragments carrying *all* of a set of tags ([`purge_all_of`]) is recorded under
//! the smallest tag of the set, in that tag's purge record ([`Keyspace::tag_record`]:
//! `{ns}:j:{tag}`, JSON, see [`Record`]), which is read beside the tag's instant: an
//! envelope carrying every tag of the set carries that one, so its record is read
//! whenever the envelope is judged. A record keeps at most [`MAX_ALL_OF`] such purges;
//! past that, the oldest is folded into a purge of the record's tag alone at its instant
//! (over-purging is safe, under-purging is not). Records are written with a
//! compare-and-swap ([`Store::update`]), on both copies of a store of several servers,
//! and copies are merged when read.
//!
//! Tags are bounded so a render answer cannot blow up an envelope or a store key: at most
//! [`MAX_TAGS`] distinct tags of at most [`MAX_TAG_LEN`] bytes, each made of token
//! characters (RFC 9110 `tchar`), so a tag never carries a space, a control character or
//! a `:` into a store key. An answer over a limit fails its build ([`TagError`]); it is
//! never cut.
//!
//! [`Envelope::render_started`]: crate::Envelope::render_started

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;
use crate::key::{Keyspace, StoreKey};
use crate::store::copies::{read_all_copies, read_registers, update_everywhere};
use crate::store::{Register, Store, StoreError};
use crate::time::now_ms;

/// The render answer header that carries a fragment's tags.
pub const HEADER: &str = "surrogate-key";
/// Most distinct tags one fragment may carry.
pub const MAX_TAGS: usize = 32;
/// Longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 128;

/// Why a tag, or a fragment's list of them, is refused. Permanent: the same answer fails
/// the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// No tag at all (an empty name).
    #[error("the tag is empty")]
    Empty,
    /// More than [`MAX_TAGS`] distinct tags.
    #[error("Surrogate-Key names {0} distinct tags; at most {MAX_TAGS} are allowed per fragment")]
    TooMany(usize),
    /// A purge naming more than [`MAX_TAGS`] distinct tags.
    #[error("{0} distinct tags named; at most {MAX_TAGS} are purged in one call")]
    TooManyToPurge(usize),
    /// A tag over [`MAX_TAG_LEN`] bytes (its first bytes are shown).
    #[error("tag {0:?}… is longer than the limit of {MAX_TAG_LEN} bytes")]
    TooLong(String),
    /// A tag with a byte that is no token character.
    #[error(
        "tag {0:?} has characters other than letters, digits and !#$%&'*+-.^_`|~ (token characters)"
    )]
    BadCharacter(String),
}

/// A valid tag: 1 to [`MAX_TAG_LEN`] token characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    /// Checks `name` and makes it a tag.
    pub fn new(name: &str) -> Result<Tag, TagError> {
        if name.is_empty() {
            return Err(TagError::Empty);
        }
        if name.len() > MAX_TAG_LEN {
            let shown: String = name.chars().take(32).collect();
            return Err(TagError::TooLong(shown));
        }
        if !name.bytes().all(is_tchar) {
            return Err(TagError::BadCharacter(
                name.chars().take(MAX_TAG_LEN).collect(),
            ));
        }
        Ok(Tag(name.to_string()))
    }

    /// The tag named by a percent-encoded URL path segment (`DELETE /tags/{tag}`).
    pub fn from_path_segment(segment: &str) -> Result<Tag, TagError> {
        let name = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        Tag::new(&name)
    }

    /// The tags named by a percent-encoded URL path segment, separated by commas (a comma
    /// is no token character): `DELETE /tags/a,b`. Repeats count once; at most
    /// [`MAX_TAGS`].
    pub fn list_from_path_segment(segment: &str) -> Result<Vec<Tag>, TagError> {
        let names = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        let mut tags: Vec<Tag> = Vec::new();
        for name in names.split(',') {
            let tag = Tag::new(name)?;
            if !tags.contains(&tag) {
                tags.push(tag);
            }
        }
        if tags.len() > MAX_TAGS {
            return Err(TagError::TooManyToPurge(tags.len()));
        }
        Ok(tags)
    }

    /// The tag as a URL path segment: token characters that are not unreserved in a URL
    /// (`%`, `#`, …) percent-encoded.
    pub fn path_segment(&self) -> String {
        crate::key::encode(&self.0)
    }

    /// The tag's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The tags of a render answer's `Surrogate-Key` values (several header lines are read as
/// one list): split on whitespace, repeats dropped, first-seen order kept. Refused whole
/// when a tag or the count is over a limit, or a value is not text.
pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<String>, TagError> {
    let mut tags: Vec<String> = Vec::new();
    // Repeats are found in a set: an answer's headers may name tens of thousands of tags
    // before the count is refused, and a scan of the list for each would be quadratic.
    let mut seen: HashSet<&str> = HashSet::new();
    for value in values {
        let text = std::str::from_utf8(value)
            .map_err(|_| TagError::BadCharacter(String::from_utf8_lossy(value).into_owned()))?;
        for name in text.split_ascii_whitespace() {
            let tag = Tag::new(name)?;
            if seen.insert(name) {
                tags.push(tag.0);
            }
        }
    }
    check_count(tags.len())?;
    Ok(tags)
}

/// Checks a list of tags a builder produced: each valid, no more than [`MAX_TAGS`]
/// distinct ones.
pub fn check(tags: &[String]) -> Result<(), TagError> {
    for tag in tags {
        Tag::new(tag)?;
    }
    let mut distinct: Vec<&String> = tags.iter().collect();
    distinct.sort();
    distinct.dedup();
    check_count(distinct.len())
}

fn check_count(n: usize) -> Result<(), TagError> {
    if n > MAX_TAGS {
        return Err(TagError::TooMany(n));
    }
    Ok(())
}

/// Records a purge of `tag` now; returns its instant (Unix ms), the one events carry.
///
/// The key only grows ([`Register::raise`]): a purge that lands after a later one (two
/// gateways purging the tag at once) never moves it back. On a store of several servers
/// it is kept on two of them, so a purge is neither refused nor lost while one is out.
pub async fn purge(store: &dyn Store, keys: &Keyspace, tag: &Tag) -> Result<u64, StoreError> {
    purge_each(store, keys, std::slice::from_ref(tag)).await
}

/// Records a purge of each of `tags` at one instant, now; returns it (Unix ms).
pub async fn purge_each(
    store: &dyn Store,
    keys: &Keyspace,
    tags: &[Tag],
) -> Result<u64, StoreError> {
    let at = now_ms();
    let store_keys: Vec<StoreKey> = tags.iter().map(|t| keys.tag(t)).collect();
    let raised = futures_util::future::join_all(
        store_keys
            .iter()
            .map(|k| async move { Register::of(store, k).raise(at).await }),
    )
    .await;
    for r in raised {
        r?;
    }
    Ok(at)
}

/// Most purges of several tags at once one tag's record keeps; past it the oldest is
/// folded into a purge of the tag alone.
pub const MAX_ALL_OF: usize = 16;

/// A purge of every fragment carrying all of `tags`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllOf {
    /// When (Unix ms).
    pub at: u64,
    /// The tags, sorted and distinct, at least two.
    pub tags: Vec<String>,
}

/// What a tag's purge record holds ([`Keyspace::tag_record`]), as JSON:
/// `{"folded":1700000000000,"all_of":[{"at":1700000000500,"tags":["a","b"]}]}`, each
/// field left out when empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Purges of several tags folded for want of room: a purge of the record's tag alone
    /// at this instant (Unix ms; 0 for none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub folded: u64,
    /// Purges of several tags at once whose smallest tag is the record's, oldest first,
    /// at most [`MAX_ALL_OF`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub all_of: Vec<AllOf>,
    /// The last soft purge of the record's tag (Unix ms; 0 for none): what rendered
    /// before it is stale, served while one rebuild runs ([`Verdict::Stale`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub soft: u64,
}

/// What the purges of its tags make of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Untouched.
    Usable,
    /// Softly purged: stale, whatever its `fresh_until` says (served within its stale
    /// window while it is rebuilt).
    Stale,
    /// Purged: never served again.
    Retired,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Record {
    /// The record in `bytes`; one that does not decode (another program's value) counts
    /// as empty.
    pub fn decode(bytes: &[u8]) -> Record {
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    /// JSON bytes for the store.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Adds what `other` holds: the later instant of each purge wins, then the oldest
    /// purges past [`MAX_ALL_OF`] are folded.
    pub fn merge(&mut self, other: &Record) {
        self.folded = self.folded.max(other.folded);
        self.soft = self.soft.max(other.soft);
        for purge in &other.all_of {
            match self.all_of.iter_mut().find(|p| p.tags == purge.tags) {
                Some(p) => p.at = p.at.max(purge.at),
                None => self.all_of.push(purge.clone()),
            }
        }
        self.all_of.sort_by_key(|p| p.at);
        while self.all_of.len() > MAX_ALL_OF {
            let oldest = self.all_of.remove(0);
            self.folded = self.folded.max(oldest.at);
        }
    }

    /// Whether it retires `envelope`: a folded purge or a purge of tags it all carries,
    /// at or after its render started.
    pub fn retires(&self, envelope: &Envelope) -> bool {
        envelope.retired_at(self.folded)
            || self.all_of.iter().any(|p| {
                envelope.retired_at(p.at) && p.tags.iter().all(|t| envelope.tags.contains(t))
            })
    }
}

/// What is known of one tag's purges: its last purge and its record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purges {
    /// When the tag was last purged (Unix ms; 0 for never).
    pub at: u64,
    /// Its purge record.
    pub record: Arc<Record>,
}

impl Purges {
    /// Whether they retire `envelope` (which carries the tag).
    pub fn retires(&self, envelope: &Envelope) -> bool {
        envelope.retired_at(self.at) || self.record.retires(envelope)
    }

    /// What they make of `envelope` (which carries the tag).
    pub fn verdict(&self, envelope: &Envelope) -> Verdict {
        if self.retires(envelope) {
            Verdict::Retired
        } else if envelope.retired_at(self.record.soft) {
            Verdict::Stale
        } else {
            Verdict::Usable
        }
    }

    /// Adds what `other` says: the later purge, both records.
    pub fn merge(&mut self, other: &Purges) {
        self.at = self.at.max(other.at);
        if *other.record == Record::default() {
            return;
        }
        Arc::make_mut(&mut self.record).merge(&other.record);
    }
}

/// Records a purge of every fragment carrying all of `tags` now, under the smallest
/// tag's record; returns its instant (Unix ms). A single tag is purged alone.
pub async fn purge_all_of(
    store: &dyn Store,
    keys: &Keyspace,
    tags: &[Tag],
) -> Result<u64, StoreError> {
    let mut set: Vec<&Tag> = tags.iter().collect();
    set.sort();
    set.dedup();
    let [home, ..] = set[..] else {
        return Err(StoreError::Protocol("no tag to purge".into()));
    };
    if set.len() == 1 {
        return purge(store, keys, home).await;
    }
    let purge = AllOf {
        at: now_ms(),
        tags: set.iter().map(|t| t.to_string()).collect(),
    };
    let add = Record {
        folded: 0,
        all_of: vec![purge.clone()],
        soft: 0,
    };
    update_record(store, &keys.tag_record(home), &add).await?;
    Ok(purge.at)
}

/// Records a soft purge of each of `tags` now, in their purge records; returns its
/// instant (Unix ms). What rendered before it is stale ([`Verdict::Stale`]).
pub async fn soft_purge(
    store: &dyn Store,
    keys: &Keyspace,
    tags: &[Tag],
) -> Result<u64, StoreError> {
    let add = Record {
        soft: now_ms(),
        ..Record::default()
    };
    let store_keys: Vec<StoreKey> = tags.iter().map(|t| keys.tag_record(t)).collect();
    let updated = futures_util::future::join_all(
        store_keys
            .iter()
            .map(|k| async { update_record(store, k, &add).await }),
    )
    .await;
    for u in updated {
        u?;
    }
    Ok(add.soft)
}

/// Merges `add` into the purge record at `key`, on every copy.
async fn update_record(store: &dyn Store, key: &StoreKey, add: &Record) -> Result<(), StoreError> {
    let change = |held: Option<&[u8]>| {
        let mut record = held.map(Record::decode).unwrap_or_default();
        record.merge(add);
        Some((record.encode(), std::time::Duration::ZERO))
    };
    update_everywhere(store, key, &change).await.map(|_| ())
}

/// What is known of each of `tags`' purges, read from the store: their instants (in one
/// `get_many` per server holding copies of their keys, the largest copy counting) and
/// their records (every copy merged), at once. Tags that are not valid (an envelope
/// written by another program) are left out: they can never have been purged.
pub async fn read(
    store: &dyn Store,
    keys: &Keyspace,
    tags: &[&str],
) -> Result<HashMap<String, Purges>, StoreError> {
    let valid: Vec<(Tag, &str)> = tags
        .iter()
        .filter_map(|t| Tag::new(t).ok().map(|tag| (tag, *t)))
        .collect();
    if valid.is_empty() {
        return Ok(HashMap::new());
    }
    let instants: Vec<StoreKey> = valid.iter().map(|(t, _)| keys.tag(t)).collect();
    let records: Vec<StoreKey> = valid.iter().map(|(t, _)| keys.tag_record(t)).collect();
    let (found, held) = tokio::join!(
        read_registers(store, &instants),
        read_all_copies(store, &records)
    );
    let (found, held) = (found?, held?);
    Ok(valid
        .iter()
        .zip(instants.iter().zip(&records))
        .map(|((_, name), (instant, record))| {
            let mut merged = Record::default();
            for copy in held.get(record).into_iter().flatten() {
                merged.merge(&Record::decode(copy));
            }
            let purges = Purges {
                at: found.get(instant).copied().unwrap_or(0),
                record: Arc::new(merged),
            };
            (name.to_string(), purges)
        })
        .collect())
}

/// Whether a tag purge retired `envelope`, read from the store (no cache): for callers
/// outside the gateway's hit path, e.g. a worker deciding whether a copy may be kept for
/// stale-if-error. Envelopes without tags cost nothing.
pub async fn retired(
    store: &dyn Store,
    keys: &Keyspace,
    envelope: &Envelope,
) -> Result<bool, StoreError> {
    Ok(judge(store, keys, envelope).await? == Verdict::Retired)
}

/// What the purges of its tags make of `envelope`, read from the store (no cache): the
/// worst of its tags' verdicts.
pub async fn judge(
    store: &dyn Store,
    keys: &Keyspace,
    envelope: &Envelope,
) -> Result<Verdict, StoreError> {
    if envelope.tags.is_empty() {
        return Ok(Verdict::Usable);
    }
    let names: Vec<&str> = envelope.tags.iter().map(String::as_str).collect();
    let purged = read(store, keys, &names).await?;
    let worst = purged.values().map(|p| p.verdict(envelope)).max();
    Ok(worst.unwrap_or(Verdict::Usable))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::MemoryStore;

    fn values(v: &[&'static str]) -> Vec<&'static [u8]> {
        v.iter().map(|s| s.as_bytes()).collect()
    }

    #[test]
    fn header_values_are_split_deduplicated_and_kept_in_order() {
        assert_eq!(
            parse(values(&["product-42  shelf-7", "product-42\tsale"])).unwrap(),
            vec!["product-42", "shelf-7", "sale"]
        );
        assert_eq!(parse(values(&["", "  "])).unwrap(), Vec::<String>::new());
        assert_eq!(
            parse(values(&["a!#$%&'*+-.^_`|~Z9"])).unwrap(),
            vec!["a!#$%&'*+-.^_`|~Z9"]
        );
    }

    #[test]
    fn limits_hold_exactly_at_the_limit() {
        let at: Vec<String> = (0..MAX_TAGS).map(|i| format!("t{i}")).collect();
        assert_eq!(parse([at.join(" ").as_bytes()]).unwrap().len(), MAX_TAGS);
        let past: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
        let e = parse([past.join(" ").as_bytes()]).unwrap_err();
        assert_eq!(e, TagError::TooMany(MAX_TAGS + 1));
        assert!(e.to_string().contains("at most 32"), "{e}");
        // Repeats count once.
        let repeated = format!("{} t0 t1", at.join(" "));
        assert_eq!(parse([repeated.as_bytes()]).unwrap().len(), MAX_TAGS);
        assert!(check(&at).is_ok());
        assert_eq!(check(&past), Err(TagError::TooMany(MAX_TAGS + 1)));

        let long = "x".repeat(MAX_TAG_LEN);
        assert_eq!(parse([long.as_bytes()]).unwrap(), vec![long.clone()]);
        let longer = "x".repeat(MAX_TAG_LEN + 1);
        let e = parse([longer.as_bytes()]).unwrap_err();
        assert!(matches!(e, TagError::TooLong(_)));
        assert!(e.to_string().contains("128 bytes"), "{e}");
    }

    #[test]
    fn only_token_characters_are_tags() {
        for bad in ["a:b", "a/b", "a\"b", "é", "a,b", "(x)", "a\u{7f}"] {
            assert!(
                matches!(Tag::new(bad), Err(TagError::BadCharacter(_))),
                "{bad:?}"
            );
            assert!(parse([bad.as_bytes()]).is_err(), "{bad:?}");
        }
        assert_eq!(Tag::new(""), Err(TagError::Empty));
        assert!(parse([&b"ok \xff"[..]]).is_err(), "not UTF-8");
        assert!(
            check(&["a b".to_string()]).is_err(),
            "a builder's tag with a space"
        );
    }

    #[test]
    fn tags_travel_in_url_paths() {
        for name in ["product-42", "a!#$%&'*+-.^_`|~Z9", "100%"] {
            let tag = Tag::new(name).unwrap();
            assert_eq!(Tag::from_path_segment(&tag.path_segment()), Ok(tag));
        }
        assert_eq!(Tag::new("a#b").unwrap().path_segment(), "a%23b");
        assert!(
            Tag::from_path_segment("a%2Fb").is_err(),
            "a slash is no tag character"
        );
        assert!(Tag::from_path_segment("a%20b").is_err());
        assert_eq!(Tag::from_path_segment(""), Err(TagError::Empty));
        let list = Tag::list_from_path_segment("a,b%23c,a").unwrap();
        assert_eq!(list, vec![Tag::new("a").unwrap(), Tag::new("b#c").unwrap()]);
        assert_eq!(
            Tag::list_from_path_segment("a%2Cb").unwrap().len(),
            2,
            "an encoded comma separates too"
        );
        assert_eq!(Tag::list_from_path_segment("a,,b"), Err(TagError::Empty));
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
        assert_eq!(
            Tag::list_from_path_segment(&many.join(",")),
            Err(TagError::TooManyToPurge(MAX_TAGS + 1))
        );
    }

    #[test]
    fn tag_keys_are_short_and_clean() {
        let ks = Keyspace::new(&"n".repeat(crate::config::MAX_NAMESPACE));
        let tag = Tag::new(&"~".repeat(MAX_TAG_LEN)).unwrap();
        let key = ks.tag(&tag);
        assert!(key.as_str().len() <= 250, "{key}");
        assert!(key.as_str().bytes().all(|b| b.is_ascii_graphic()));
        assert_eq!(
            Keyspace::new("t").tag(&Tag::new("p-1").unwrap()).as_str(),
            "t:t:p-1"
        );
    }

    fn tagged(tags: &[&str], render_started: u64) -> Envelope {
        Envelope::ready(
            bytes::Bytes::from_static(b"x"),
            "text/html".into(),
            Duration::from_secs(60),
            Duration::from_secs(600),
            1,
            1,
        )
        .with_tags(tags.iter().map(|t| t.to_string()).collect(), render_started)
    }

    #[tokio::test]
    async fn a_purge_retires_what_rendered_before_or_with_it() {
        let store = MemoryStore::new(1 << 20, 1 << 20);
        let ks = Keyspace::new("t");
        let before = tagged(&["a", "b"], now_ms() - 10);
        let other = tagged(&["c"], now_ms() - 10);
        assert!(!retired(&store, &ks, &before).await.unwrap());
        let at = purge(&store, &ks, &Tag::new("b").unwrap()).await.unwrap();
        assert!(retired(&store, &ks, &before).await.unwrap());
        assert!(!retired(&store, &ks, &other).await.unwrap());
        // A render that started in the purge's millisecond may have read the old data.
        assert!(retired(&store, &ks, &tagged(&["b"], at)).await.unwrap());
        assert!(!retired(&store, &ks, &tagged(&["b"], at + 1)).await.unwrap());
        let found = read(&store, &ks, &["a", "b", "not valid"]).await.unwrap();
        assert_eq!(found["a"].at, 0);
        assert_eq!(found["b"].at, at);
        assert_eq!(found.get("not valid"), None);
    }

    fn tags(names: &[&str]) -> Vec<Tag> {
        names.iter().map(|n| Tag::new(n).unwrap()).collect()
    }

    #[tokio::test]
    async fn an_all_of_purge_retires_only_what_carries_every_tag() {
        let store = MemoryStore::new(1 << 20, 1 << 20);
        let ks = Keyspace::new("t");
        let start = now_ms() - 10;
        let (both, more, one, other) = (
            tagged(&["b", "a"], start),
            tagged(&["c", "a", "b"], start),
            tagged(&["a"], start),
            tagged(&["b", "c"], start),
        );
        let at = purge_all_of(&store, &ks, &tags(&["b", "a", "b"]))
            .await
            .unwrap();
        assert!(retired(&store, &ks, &both).await.unwrap());
        assert!(retired(&store, &ks, &more).await.unwrap());
        assert!(!retired(&store, &ks, &one).await.unwrap());
        assert!(!retired(&store, &ks, &other).await.unwrap());
        assert!(
            !retired(&store, &ks, &tagged(&["a", "b"], at + 1))
                .await
                .unwrap()
        );
        // Recorded under the smallest tag, not as a purge of either tag.
        let found = read(&store, &ks, &["a", "b"]).await.unwrap();
        assert_eq!((found["a"].at, found["b"].at), (0, 0));
        assert_eq!(found["a"].record.all_of[0].tags, vec!["a", "b"]);
        assert!(found["b"].record.all_of.is_empty());
        // One tag is a plain purge.
        let at = purge_all_of(&store, &ks, &tags(&["c"])).await.unwrap();
        assert_eq!(read(&store, &ks, &["c"]).await.unwrap()["c"].at, at);
    }

    #[tokio::test]
    async fn a_list_is_purged_tag_by_tag_at_one_instant() {
        let store = MemoryStore::new(1 << 20, 1 << 20);
        let ks = Keyspace::new("t");
        let at = purge_each(&store, &ks, &tags(&["x", "y"])).await.unwrap();
        let found = read(&store, &ks, &["x", "y", "z"]).await.unwrap();
        assert_eq!((found["x"].at, found["y"].at, found["z"].at), (at, at, 0));
    }

    #[test]
    fn a_full_record_folds_its_oldest_purge_into_one_of_its_tag() {
        let mut record = Record::default();
        for i in 0..=MAX_ALL_OF as u64 {
            record.merge(&Record {
                folded: 0,
                all_of: vec![AllOf {
                    at: 100 + i,
                    tags: vec!["a".into(), format!("b{i}")],
                }],
                soft: 0,
            });
        }
        assert_eq!(record.all_of.len(), MAX_ALL_OF);
        assert_eq!(record.folded, 100, "the oldest, folded");
        assert_eq!(record.all_of[0].at, 101);
        // Folded: retires whatever carries the tag, rendered before it (over-purging).
        assert!(record.retires(&tagged(&["a"], 100)));
        assert!(!record.retires(&tagged(&["a"], 101)));
        // The same set again keeps one entry, at the later instant.
        let again = Record {
            folded: 0,
            all_of: vec![AllOf {
                at: 500,
                tags: vec!["a".into(), "b3".into()],
            }],
            soft: 0,
        };
        record.merge(&again);
        assert_eq!(record.all_of.len(), MAX_ALL_OF);
        assert_eq!(record.all_of.last().unwrap(), &again.all_of[0]);
        // On the wire.
        assert_eq!(
            Record::decode(&again.encode()),
            again,
            "{}",
            String::from_utf8_lossy(&again.encode())
        );
        assert_eq!(
            again.encode(),
            br#"{"all_of":[{"at":500,"tags":["a","b3"]}]}"#
        );
        assert_eq!(Record::decode(b"not json"), Record::default());
    }

    #[tokio::test]
    async fn a_soft_purge_makes_stale_what_rendered_before_it() {
        let store = MemoryStore::new(1 << 20, 1 << 20);
        let ks = Keyspace::new("t");
        let before = tagged(&["a", "b"], now_ms() - 10);
        let at = soft_purge(&store, &ks, &tags(&["b"])).await.unwrap();
        assert_eq!(judge(&store, &ks, &before).await.unwrap(), Verdict::Stale);
        assert!(
            !retired(&store, &ks, &before).await.unwrap(),
            "kept for stale-if-error"
        );
        let after = tagged(&["b"], at + 1);
        assert_eq!(judge(&store, &ks, &after).await.unwrap(), Verdict::Usable);
        // A hard purge is worse.
        purge(&store, &ks, &Tag::new("a").unwrap()).await.unwrap();
        assert_eq!(judge(&store, &ks, &before).await.unwrap(), Verdict::Retired);
        assert_eq!(
            read(&store, &ks, &["b"]).await.unwrap()["b"].record.soft,
            at
        );
    }
}
