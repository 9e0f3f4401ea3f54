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
//! - [`cluster_demo`]: `demo --cluster`: three NATS nodes, three gateways and HAProxy.
//! - [`nats`], [`haproxy`]: NATS clusters and HAProxy on loopback for the cluster demo, tests
//!   and benchmarks.

pub mod backends;
pub mod cluster_demo;
pub mod demo;
pub mod device;
pub mod fleet;
pub mod haproxy;
pub mod nats;
pub mod tunnel;
