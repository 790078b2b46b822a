//! The [`Store`](tessera_protocol::Store) operations, once for every [`Place`] a call
//! may go to: each key at its home (the store itself) or every key on one server (a
//! copy of a key kept twice).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use memcache::exp::{MetaCommand, ReturnCode};
use tessera_protocol::key::StoreKey;
use tessera_protocol::store::{Change, StoreError, check_size};

use super::cluster::{Cluster, Place};
use super::commands::{self, applied, classify, counted, found, number, too_large, unexpected};
use super::pipeline::Reply;

/// Tries of a raise whose key others keep changing.
const RAISE_TRIES: usize = 5;

impl Cluster {
    /// The one command's answer.
    async fn one(
        self: &Arc<Self>,
        place: Place,
        key: &StoreKey,
        command: MetaCommand,
        write: bool,
    ) -> Result<Reply, StoreError> {
        let mut answers = self.run(place, vec![(key, command)], write).await?;
        answers
            .pop()
            .ok_or_else(|| StoreError::Protocol("memcached: an answer is missing".into()))?
            .map_err(classify)
    }

    /// `first` then `second` (on one server), each one's own answer.
    async fn pair(
        self: &Arc<Self>,
        place: Place,
        first: (&StoreKey, MetaCommand),
        second: (&StoreKey, MetaCommand),
    ) -> Result<[Result<Reply, StoreError>; 2], StoreError> {
        let mut answers = self
            .run(place, vec![first, second], true)
            .await?
            .into_iter();
        match (answers.next(), answers.next()) {
            (Some(a), Some(b)) => Ok([a.map_err(classify), b.map_err(classify)]),
            _ => Err(StoreError::Protocol(
                "memcached: an answer is missing".into(),
            )),
        }
    }

    pub(super) async fn get(
        self: &Arc<Self>,
        place: Place,
        key: &StoreKey,
    ) -> Result<Option<Bytes>, StoreError> {
        found(self.one(place, key, commands::get(key)?, false).await?)
    }

    pub(super) async fn get_many(
        self: &Arc<Self>,
        place: Place,
        keys: &[StoreKey],
    ) -> Result<HashMap<StoreKey, Bytes>, StoreError> {
        let gets = keys
            .iter()
            .map(|k| Ok((k, commands::get(k)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let answers = self.run(place, gets, false).await?;
        let mut values = HashMap::with_capacity(keys.len());
        for (key, answer) in keys.iter().zip(answers) {
            if let Some(value) = found(answer.map_err(classify)?)? {
                values.insert(key.clone(), value);
            }
        }
        Ok(values)
    }

    pub(super) async fn add(
        self: &Arc<Self>,
        place: Place,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        check_size(value, self.max_item_size)?;
        let add = commands::set(key, value, ttl, true)?;
        let reply = self.one(place, key, add, true).await;
        too_large(reply.and_then(applied), value.len(), self.max_item_size)
    }

    pub(super) async fn set(
        self: &Arc<Self>,
        place: Place,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_size(value, self.max_item_size)?;
        let set = commands::set(key, value, ttl, false)?;
        let reply = self.one(place, key, set, true).await;
        let stored = reply.and_then(|r| match r.rc {
            ReturnCode::Hd => Ok(()),
            _ => Err(unexpected(&r)),
        });
        too_large(stored, value.len(), self.max_item_size)
    }

    /// The add and the get as one exchange (the caller made sure the two keys share a
    /// server): the get runs after the add.
    pub(super) async fn add_then_get(
        self: &Arc<Self>,
        place: Place,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
        then: &StoreKey,
    ) -> Result<Option<Option<Bytes>>, StoreError> {
        check_size(value, self.max_item_size)?;
        let [added, read] = self
            .pair(
                place,
                (key, commands::set(key, value, ttl, true)?),
                (then, commands::get(then)?),
            )
            .await?;
        if !too_large(added.and_then(applied), value.len(), self.max_item_size)? {
            return Ok(None);
        }
        Ok(Some(found(read?)?))
    }

    /// The set and the delete as one exchange (the caller made sure the two keys share a
    /// server): the delete runs after the set, even when the set failed.
    pub(super) async fn set_then_delete(
        self: &Arc<Self>,
        place: Place,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
        then: &StoreKey,
    ) -> Result<Result<bool, StoreError>, StoreError> {
        check_size(value, self.max_item_size)?;
        let [stored, deleted] = self
            .pair(
                place,
                (key, commands::set(key, value, ttl, false)?),
                (then, commands::delete(then)?),
            )
            .await?;
        match too_large(stored, value.len(), self.max_item_size)? {
            r if r.rc == ReturnCode::Hd => {}
            other => return Err(unexpected(&other)),
        }
        Ok(deleted.and_then(applied))
    }

    pub(super) async fn delete(
        self: &Arc<Self>,
        place: Place,
        key: &StoreKey,
    ) -> Result<bool, StoreError> {
        applied(self.one(place, key, commands::delete(key)?, true).await?)
    }

    pub(super) async fn incr(
        self: &Arc<Self>,
        place: Place,
        key: &StoreKey,
        delta: u64,
    ) -> Result<Option<u64>, StoreError> {
        counted(
            self.one(place, key, commands::incr(key, delta)?, true)
                .await?,
        )
    }

    /// Read with its CAS, then replaced only if unchanged (or added when absent); read
    /// again when someone changed it in between.
    pub(super) async fn raise(
        self: &Arc<Self>,
        place: Place,
        key: &StoreKey,
        to: u64,
    ) -> Result<u64, StoreError> {
        let value = to.to_string();
        for _ in 0..RAISE_TRIES {
            let read = self
                .one(place, key, commands::get_with_cas(key)?, false)
                .await?;
            let cas = read.cas;
            let Some(held) = found(read)? else {
                if self
                    .add(place, key, value.as_bytes(), Duration::ZERO)
                    .await?
                {
                    return Ok(to);
                }
                continue;
            };
            let held = number(&held)?;
            if held >= to {
                return Ok(held);
            }
            let cas =
                cas.ok_or_else(|| StoreError::Protocol("memcached: no CAS returned".into()))?;
            let replace = commands::set_if_unchanged(key, value.as_bytes(), Duration::ZERO, cas)?;
            let reply = self.one(place, key, replace, true).await?;
            match reply.rc {
                ReturnCode::Hd => return Ok(to),
                // Changed or gone since it was read: read again.
                ReturnCode::Ex | ReturnCode::Nf | ReturnCode::Ns => {}
                _ => return Err(unexpected(&reply)),
            }
        }
        Err(StoreError::Protocol(format!(
            "memcached: {key} keeps changing"
        )))
    }

    /// Read with its CAS, `change` applied, then replaced only if unchanged (or added
    /// when absent); again when someone changed it in between.
    pub(super) async fn update(
        self: &Arc<Self>,
        place: Place,
        key: &StoreKey,
        change: &Change<'_>,
    ) -> Result<Option<Bytes>, StoreError> {
        for _ in 0..RAISE_TRIES {
            let read = self
                .one(place, key, commands::get_with_cas(key)?, false)
                .await?;
            let cas = read.cas;
            let held = found(read)?;
            let Some((value, ttl)) = change(held.as_deref()) else {
                return Ok(held);
            };
            let Some(held) = held else {
                if self.add(place, key, &value, ttl).await? {
                    return Ok(Some(Bytes::from(value)));
                }
                continue;
            };
            if value[..] == held[..] {
                return Ok(Some(held));
            }
            check_size(&value, self.max_item_size)?;
            let cas =
                cas.ok_or_else(|| StoreError::Protocol("memcached: no CAS returned".into()))?;
            let replace = commands::set_if_unchanged(key, &value, ttl, cas)?;
            let reply = self.one(place, key, replace, true).await?;
            match reply.rc {
                ReturnCode::Hd => return Ok(Some(Bytes::from(value))),
                // Changed or gone since it was read: read again.
                ReturnCode::Ex | ReturnCode::Nf | ReturnCode::Ns => {}
                _ => return Err(unexpected(&reply)),
            }
        }
        Err(StoreError::Protocol(format!(
            "memcached: {key} keeps changing"
        )))
    }
}
