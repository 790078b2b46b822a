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
//! Tags are bounded so a render answer cannot blow up an envelope or a store key: at most
//! [`MAX_TAGS`] distinct tags of at most [`MAX_TAG_LEN`] bytes, each made of token
//! characters (RFC 9110 `tchar`), so a tag never carries a space, a control character or
//! a `:` into a store key. An answer over a limit fails its build ([`TagError`]); it is
//! never cut.
//!
//! [`Envelope::render_started`]: crate::Envelope::render_started

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::envelope::Envelope;
use crate::key::{Keyspace, StoreKey};
use crate::store::copies::read_registers;
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
    let at = now_ms();
    Register::of(store, &keys.tag(tag)).raise(at).await?;
    Ok(at)
}

/// When each of `tags` was last purged (Unix ms; 0 for never), in one `get_many` per
/// server holding copies of their keys (the largest copy counts). Tags that are not valid
/// (an envelope written by another program) are left out: they can never have been
/// purged.
pub async fn purged_at(
    store: &dyn Store,
    keys: &Keyspace,
    tags: &[&str],
) -> Result<HashMap<String, u64>, StoreError> {
    let valid: Vec<(StoreKey, &str)> = tags
        .iter()
        .filter_map(|t| Tag::new(t).ok().map(|tag| (keys.tag(&tag), *t)))
        .collect();
    if valid.is_empty() {
        return Ok(HashMap::new());
    }
    let store_keys: Vec<StoreKey> = valid.iter().map(|(k, _)| k.clone()).collect();
    let found = read_registers(store, &store_keys).await?;
    Ok(valid
        .into_iter()
        .map(|(key, tag)| (tag.to_string(), found.get(&key).copied().unwrap_or(0)))
        .collect())
}

/// Whether a tag purge retired `envelope`, read from the store (no cache): for callers
/// outside the gateway's hit path, e.g. a worker deciding whether a fragment is still
/// fresh. Envelopes without tags cost nothing.
pub async fn retired(
    store: &dyn Store,
    keys: &Keyspace,
    envelope: &Envelope,
) -> Result<bool, StoreError> {
    if envelope.tags.is_empty() {
        return Ok(false);
    }
    let names: Vec<&str> = envelope.tags.iter().map(String::as_str).collect();
    let purged = purged_at(store, keys, &names).await?;
    Ok(envelope.retired_by(|t| purged.get(t).copied()))
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
        let found = purged_at(&store, &ks, &["a", "b", "not valid"])
            .await
            .unwrap();
        assert_eq!(found.get("a"), Some(&0));
        assert_eq!(found.get("b"), Some(&at));
        assert_eq!(found.get("not valid"), None);
    }
}
