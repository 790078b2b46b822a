//! Chooses the store and bus implementations from the configuration.
//!
//! The gateway and workers only ever see `Arc<dyn Store>` and `Arc<dyn Bus>`; this is the
//! one place that knows which concrete implementations exist.

use std::sync::Arc;

use crate::amqp::AmqpBus;
use crate::bus::{MemoryBus, SharedBus};
use crate::config::Config;
use crate::key::Keyspace;
use crate::memcached::MemcachedStore;
use crate::store::{MemoryStore, SharedStore};

/// Connecting to a backend failed at start-up.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The store could not be set up.
    #[error("store: {0}")]
    Store(String),
    /// The bus could not be set up.
    #[error("bus: {0}")]
    Bus(String),
}

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

    /// The backends the configuration names: memcached and AMQP when given, the
    /// in-process ones otherwise. Does no network I/O: servers that are down are reached
    /// on first use, and calls fail with `Unavailable` until then.
    pub async fn connect(config: &Config) -> Result<Backends, BackendError> {
        let memory = Backends::memory(config);
        let store: SharedStore = if config.store.memcached.is_empty() {
            memory.store
        } else {
            Arc::new(
                MemcachedStore::new(
                    &config.store.memcached,
                    config.store.timeout,
                    item_limit(config),
                )
                .map_err(|e| BackendError::Store(e.to_string()))?,
            )
        };
        let bus: SharedBus = match &config.bus.amqp {
            Some(url) => Arc::new(AmqpBus::with_queue_expiry(
                url,
                &config.store.namespace,
                config.bus.queue_expiry,
            )),
            None => memory.bus,
        };
        Ok(Backends {
            store,
            bus,
            keys: memory.keys,
        })
    }
}

/// The largest value the store accepts, in bytes.
pub fn item_limit(config: &Config) -> usize {
    usize::try_from(config.store.max_item_size.as_u64()).unwrap_or(usize::MAX)
}
