//! The meta commands the store sends (built by `memcache::exp`) and how their answers
//! read: pure functions, no I/O.

use std::time::Duration;

use bytes::Bytes;
use memcache::exp::{
    ArithmeticOptions, DeleteOptions, Error as McError, GetOptions, MetaCommand, ReturnCode,
    SetMode, SetOptions, build_arithmetic, build_delete, build_get, build_set,
};
use tessera_protocol::Cause;
use tessera_protocol::key::StoreKey;
use tessera_protocol::store::StoreError;
use tessera_protocol::time::ceil_secs;

use super::pipeline::Reply;

/// Longest expiration memcached reads as relative seconds.
const MAX_RELATIVE_EXPIRY: u64 = 30 * 24 * 3600;

/// `mg <key> v`: the value, or a miss.
pub(super) fn get(key: &StoreKey) -> Result<MetaCommand, StoreError> {
    build_get(key.as_str(), &GetOptions::default()).map_err(classify)
}

/// `mg <key> v c`: the value and its CAS, or a miss.
pub(super) fn get_with_cas(key: &StoreKey) -> Result<MetaCommand, StoreError> {
    let mut options = GetOptions::default();
    options.return_cas = true;
    build_get(key.as_str(), &options).map_err(classify)
}

/// `ms <key> <size> T<ttl>`, with `ME` (add: only if absent) when `add`.
pub(super) fn set(
    key: &StoreKey,
    value: &[u8],
    ttl: Duration,
    add: bool,
) -> Result<MetaCommand, StoreError> {
    let mut options = SetOptions::default();
    options.ttl = Some(expiry(ttl));
    if add {
        options.mode = SetMode::Add;
    }
    build_set(key.as_str(), value, &options).map_err(classify)
}

/// `ms <key> <size> T<ttl> C<cas>`: replaces the value only if nobody changed it since it
/// was read with `cas`.
pub(super) fn set_if_unchanged(
    key: &StoreKey,
    value: &[u8],
    ttl: Duration,
    cas: u64,
) -> Result<MetaCommand, StoreError> {
    let mut options = SetOptions::default();
    options.ttl = Some(expiry(ttl));
    options.compare_cas = Some(cas);
    build_set(key.as_str(), value, &options).map_err(classify)
}

/// `md <key>`.
pub(super) fn delete(key: &StoreKey) -> Result<MetaCommand, StoreError> {
    build_delete(key.as_str(), &DeleteOptions::default()).map_err(classify)
}

/// `ma <key> D<delta> v`: never creates (`NF` when absent).
pub(super) fn incr(key: &StoreKey, delta: u64) -> Result<MetaCommand, StoreError> {
    let mut options = ArithmeticOptions::default();
    options.delta = Some(delta);
    build_arithmetic(key.as_str(), &options).map_err(classify)
}

/// A lookup's value: `VA` is a hit, `EN` a miss.
pub(super) fn found(reply: Reply) -> Result<Option<Bytes>, StoreError> {
    match reply.rc {
        ReturnCode::Va => Ok(reply.value),
        ReturnCode::En => Ok(None),
        _ => Err(unexpected(&reply)),
    }
}

/// Whether a write was applied: `HD`, or `NS` / `NF` when it was not.
pub(super) fn applied(reply: Reply) -> Result<bool, StoreError> {
    match reply.rc {
        ReturnCode::Hd => Ok(true),
        ReturnCode::Ns | ReturnCode::Nf => Ok(false),
        _ => Err(unexpected(&reply)),
    }
}

/// The new value of an `incr`, `None` when the key was absent.
pub(super) fn counted(reply: Reply) -> Result<Option<u64>, StoreError> {
    match (reply.rc, &reply.value) {
        (ReturnCode::Va, Some(digits)) => number(digits).map(Some),
        (ReturnCode::Nf, _) => Ok(None),
        _ => Err(unexpected(&reply)),
    }
}

/// A decimal number stored as a value.
pub(super) fn number(digits: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.trim().parse().ok())
        .ok_or_else(|| StoreError::Protocol("memcached: a bad counter value".into()))
}

/// An answer of the wrong kind.
pub(super) fn unexpected(reply: &Reply) -> StoreError {
    StoreError::Protocol(format!("memcached: unexpected answer {:?}", reply.rc))
}

/// A `memcache` error as a store error.
pub(super) fn classify(e: McError) -> StoreError {
    match e {
        McError::Server(m) if m.contains("too large") => StoreError::TooLarge { size: 0, max: 0 },
        // The connection failed, or the server did not answer (see `pipeline`).
        e @ McError::Io(_) => StoreError::Unavailable(Cause::context("memcached", e)),
        other => StoreError::Protocol(format!("memcached: {other}")),
    }
}

/// memcached's own size refusal, reported with the real sizes.
pub(super) fn too_large<T>(
    result: Result<T, StoreError>,
    size: usize,
    max: usize,
) -> Result<T, StoreError> {
    match result {
        Err(StoreError::TooLarge { .. }) => Err(StoreError::TooLarge { size, max }),
        other => other,
    }
}

/// memcached's expiry: whole seconds, 0 = never; beyond 30 days a Unix time.
fn expiry(ttl: Duration) -> u32 {
    let secs = ceil_secs(ttl);
    let secs = if secs > MAX_RELATIVE_EXPIRY {
        tessera_protocol::time::now_ms() / 1000 + secs
    } else {
        secs
    };
    u32::try_from(secs).unwrap_or(u32::MAX)
}
