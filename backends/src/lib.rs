//! The network backends of Tessera: the [`Store`] on memcached and the [`Bus`] on
//! RabbitMQ, and [`connect`], which picks them or the in-process twins from the
//! configuration.
//!
//! The contract they implement lives in `tessera-protocol`; a program that only needs the
//! types (keys, envelope, messages) links that crate alone.
//!
//! # Layout
//! - [`memcached`]: the `Store` on memcached servers, with failover when one is out.
//! - [`amqp`]: the `Bus` on RabbitMQ, with its topology and reconnection.
//!
//! [`Store`]: tessera_protocol::Store
//! [`Bus`]: tessera_protocol::Bus

pub mod amqp;
pub mod memcached;

use std::sync::Arc;

use tessera_protocol::backends::item_limit;
use tessera_protocol::bus::SharedBus;
use tessera_protocol::store::SharedStore;
use tessera_protocol::{Backends, BusError, Config, StoreError};

use crate::amqp::AmqpBus;
use crate::memcached::{Failover, MemcachedStore};

/// Connecting to a backend failed at start-up.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The store could not be set up.
    #[error("store: {0}")]
    Store(#[source] StoreError),
    /// The bus could not be set up.
    #[error("bus: {0}")]
    Bus(#[source] BusError),
}

/// The backends the configuration names in its resolved
/// [`Backend`](tessera_protocol::Backend): memcached and AMQP when given, the in-process
/// ones otherwise. Does no network I/O: servers that are down are reached on first use,
/// and calls fail with `Unavailable` until then.
pub async fn connect(config: &Config) -> Result<Backends, BackendError> {
    let memory = Backends::memory(config);
    let store: SharedStore = match config.backend.memcached() {
        None => memory.store,
        Some(servers) => Arc::new(
            MemcachedStore::with_failover(
                servers,
                config.store.timeout,
                item_limit(config),
                Failover::of(&config.store),
            )
            .map_err(BackendError::Store)?,
        ),
    };
    let bus: SharedBus = match config.backend.amqp() {
        Some(nodes) => Arc::new(
            AmqpBus::on_nodes(
                &nodes
                    .iter()
                    .map(|u| u.as_str().to_string())
                    .collect::<Vec<_>>(),
                &config.store.namespace,
                config.bus.queue_expiry,
            )
            .with_queue_type(config.bus.queue_type)
            .with_queues(&[config.queues(), config.background_queues()].concat()),
        ),
        None => memory.bus,
    };
    Ok(Backends {
        store,
        bus,
        keys: memory.keys,
    })
}
