//! What Tessera's gateway and fragment workers must agree on.
//!
//! Both sides of the worker pattern link this crate, so anything that crosses a process
//! boundary is defined here exactly once: the configuration file, how a request becomes a
//! cache key, the envelope stored for a fragment, the JSON messages on the broker, and the
//! two backends every component talks through, with their in-process twins.
//!
//! It is the lean part of the workspace: it links no network client and no HTTP stack,
//! so a program that only publishes `BuildRequest`s or reads envelopes needs nothing
//! else. The memcached and RabbitMQ implementations live in `tessera-backends`; the HTTP
//! server loop, the upstream client and logging set-up in `tessera-runtime`.
//!
//! # Layout
//! - [`config`]: the TOML schema, environment overrides and validation.
//! - [`key`]: fragment identity (allow-listed params, vary values, generation) and store keys.
//! - [`envelope`]: the versioned, compact value stored for a fragment.
//! - [`message`]: `BuildRequest` and events, JSON with a `v` field.
//! - [`tags`]: surrogate keys: parsing and limits, tag purges, whether one retired an envelope.
//! - [`surrogate`]: `Surrogate-Control`: whether an answer asks for ESI; the
//!   `Surrogate-Capability` every upstream request carries.
//! - [`lease`]: the pending lease, sole owner of "exactly one build per key".
//! - [`store`]: the `Store` trait (memcached semantics) and its in-memory twin.
//! - [`bus`]: the `Bus` trait (AMQP semantics) and its in-process twin.
//! - [`backends`]: the store and bus a process works with; the in-process pair.
//! - [`error`]: [`Cause`](error::Cause), the source kept under store, bus and upstream errors.
//! - [`time`]: wall-clock milliseconds shared by envelopes and messages.

pub mod backends;
pub mod bus;
pub mod config;
pub mod envelope;
pub mod error;
pub mod key;
pub mod lease;
pub mod message;
pub mod store;
pub mod surrogate;
pub mod tags;
pub mod time;

pub use backends::Backends;
pub use bus::{
    Bus, BusError, Consumer, DeadAction, DeadLetter, DeadPick, Delivery, Notice, QueueStats,
    Subscription,
};
pub use config::{Backend, Config, ConfigError, FragmentRoute};
pub use envelope::{Envelope, Status};
pub use error::Cause;
pub use key::{FragmentKeys, Identity, Keyspace, StoreKey};
pub use lease::{Acquired, Claim, Lease};
pub use message::{BuildRequest, Event, Purge};
pub use store::{Store, StoreError};
