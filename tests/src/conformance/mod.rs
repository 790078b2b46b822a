//! Conformance suites: the promises of the `Store` and `Bus` traits, written once as
//! generic cases and run against every implementation.
//!
//! A case is an `async fn` taking the implementation under test (made fresh for it, in
//! its own namespace, so parallel cases never see each other). The macros
//! [`store_conformance!`](crate::store_conformance) and
//! [`bus_conformance!`](crate::bus_conformance) expand one `#[tokio::test]` per case for
//! one backend, so a new backend is one line in `tests/tests/store_conformance.rs` or
//! `tests/tests/bus_conformance.rs`.
//!
//! # Layout
//! - [`store`]: `Store` cases, the backends under test, memcached processes for the
//!   cases only a network store has (two servers, a restart).
//! - [`bus`]: `Bus` cases and the backends under test.

pub mod bus;
pub mod store;
