//! What Tessera's gateway and fragment workers must agree on.
//!
//! Both sides of the worker pattern link this crate, so anything that crosses a process
//! boundary is defined here exactly once: the configuration file, how a request becomes a
//! cache key, the envelope stored for a fragment, the JSON messages on the broker, and the
//! two backends every component talks through.
//!
//! # Layout
//! - [`config`]: the TOML schema, environment overrides and validation.
//! - [`key`]: fragment identity (allow-listed params, vary values, generation) and store keys.
//! - [`envelope`]: the versioned, compact value stored for a fragment.
//! - [`message`]: `BuildRequest` and events, JSON with a `v` field.
//! - [`store`]: the `Store` trait (memcached semantics) and its in-memory twin.
//! - [`memcached`]: the `Store` on memcached servers.
//! - [`bus`]: the `Bus` trait (AMQP semantics) and its in-process twin.
//! - [`amqp`]: the `Bus` on RabbitMQ, with its topology and reconnection.
//! - [`backends`]: picks memory or network implementations from the configuration.
//! - [`web`]: the accept loop, body type, problems and admin pieces both binaries serve.
//! - [`process`]: logging set-up and shutdown signals shared by both binaries.
//! - [`time`]: wall-clock milliseconds shared by envelopes and messages.

pub mod amqp;
pub mod backends;
pub mod bus;
pub mod config;
pub mod envelope;
pub mod key;
pub mod memcached;
pub mod message;
pub mod process;
pub mod store;
pub mod time;
pub mod web;

pub use backends::Backends;
pub use bus::{Bus, BusError, Consumer, DeadLetter, Delivery, Notice, QueueStats, Subscription};
pub use config::{Config, ConfigError, FragmentRoute};
pub use envelope::{Envelope, Status};
pub use key::{FragmentKeys, Identity, Keyspace, StoreKey};
pub use message::{BuildRequest, Event};
pub use store::{Store, StoreError};
