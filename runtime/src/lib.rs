//! What Tessera's two binaries run on besides the contract: the HTTP server loop and
//! admin pieces they both serve, the upstream HTTP client they both use, and their
//! process conventions (logging, signals).
//!
//! # Layout
//! - [`web`]: the accept loop, body type, problems and admin pieces both binaries serve.
//! - [`upstream`]: the pooled HTTP/1.1 client for the upstream application.
//! - [`process`]: logging set-up and shutdown signals.
//! - [`reload`]: the live configuration, and its reload on SIGHUP.
//! - [`throttle`]: repeated warnings written once per kind per interval, the rest counted
//!   ([`warn_throttled!`]).
//! - [`otel`]: OpenTelemetry traces (off by default): spans, W3C context in and out.
//! - [`coding`]: decoding `gzip`/`deflate`/`br` bodies from the upstream, with a limit.

pub mod coding;
pub mod otel;
pub mod process;
pub mod reload;
pub mod throttle;
pub mod upstream;
pub mod web;
