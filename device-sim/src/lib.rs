//! Simulated device fleets and sample backends for Gatehouse.
//!
//! # Layout
//! - [`device`]: one device's TLS WebSocket connection with its own certificate, and how a
//!   refusal is classified (HTTP status and code, TLS alert, transport, timeout).
//! - [`fleet`]: loads a fleet (pki directory or manifest), connects it at a bounded rate, sends
//!   telemetry, answers commands, and reports.
//! - [`backends`]: the sample `ingest` and `control` backends that count what they receive,
//!   and `echo`, which sends every message back.
//! - [`tunnel`]: plain TCP in, TLS with one device's certificate out, for WebSocket clients
//!   that cannot present a client certificate.
//! - [`demo`]: the README's first command: everything in one process, with a summary.

pub mod backends;
pub mod demo;
pub mod device;
pub mod fleet;
pub mod tunnel;
