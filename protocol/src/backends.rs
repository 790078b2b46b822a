//! The store and bus a process works with.
//!
//! The gateway and workers only ever see `Arc<dyn Store>` and `Arc<dyn Bus>`. This crate
//! makes the in-process pair; the network ones come from `tessera-backends`, the one
//! place that knows which concrete implementations exist.

use std::sync::Arc;

use crate::bus::{MemoryBus, SharedBus};
use crate::config::Config;
use crate::key::Keyspace;
use crate::store::{MemoryStore, SharedStore};

/// The store and bus a process works with, plus the keyspace of its namespace.
#[derive(Debug, Clone)]
pub struct Backends {
    /// L2.
    pub store: SharedStore,
    /// The broker.
    pub bus: SharedBus,
    /// Key builder for `store.namespace`.
    pub keys: Keyspace,
}

impl Backends {
    /// In-process store and bus, as in embedded mode.
    pub fn memory(config: &Config) -> Backends {
        Backends {
            store: Arc::new(MemoryStore::new(
                config.store.memory_capacity.as_u64(),
                item_limit(config),
            )),
            bus: Arc::new(MemoryBus::new()),
            keys: Keyspace::new(&config.store.namespace),
        }
    }
}

/// The largest value the store accepts, in bytes.
pub fn item_limit(config: &Config) -> usize {
    usize::try_from(config.store.max_item_size.as_u64()).unwrap_or(usize::MAX)
}
