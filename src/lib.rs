//! Gatehouse: an mTLS WebSocket gateway for device fleets.
//!
//! # Layout
//! The pure core decides and owns no I/O: it imports no tokio, tungstenite, sled, `std::fs`
//! or sockets, and reads no clock (`.ci/pure-core` checks this in CI):
//! - [`model`]: devices, their status and certificate fingerprints, enrollments, changes.
//! - [`admission`]: the verified certificate, CRL index, upgrade request, routes, and the one
//!   `admit()` that decides whether a connection becomes a session.
//! - [`frames`]: strict JSON and CBOR decoding into the JSON data model; error frames.
//! - [`policy`]: which schema a frame needs, the invalid-frame limit, open commands,
//!   rejection accounting.
//! - [`schema`]: the compiled per-device-type schemas and validation.
//! - [`wire`]: the one map from a refusal or a session end to the wire.
//! - [`audit::record`]: audit record format, hash chain, checkpoints, verification.
//!
//! The shell around it does the I/O:
//! - [`config`]: the TOML file layer, the validated startup and runtime layers, defaults.
//! - [`storage`]: the `DeviceStore` and `DeadLetterStore` traits and their sled
//!   implementations, the registry's in-memory index and change feed.
//! - [`cluster`]: the same stores on NATS JetStream, shared by several gateways.
//! - [`audit`]: the audit writer thread (segment files, group commit) and reader.
//! - [`net`]: rustls configs, the backend connector, session worker runtimes.
//! - [`session`]: one connection: handshake, frame steps, relay, lifecycle.
//! - [`admin`]: the loopback admin API and its blocking client.
//! - [`live`]: the runtime snapshot (runtime configuration, schemas, backend connector)
//!   behind one `ArcSwap`, read by sessions at defined points and swapped on reload.
//! - [`control`]: operator actions (reloads) that the admin API and signals share.
//! - [`server`]: loading before binding, the accept loop, shutdown.

pub mod admin;
pub mod admission;
pub mod audit;
pub mod cluster;
pub mod config;
pub mod control;
pub mod frames;
pub mod live;
pub mod metrics;
pub mod model;
pub mod net;
pub mod policy;
pub mod schema;
pub mod server;
pub mod session;
pub mod storage;
pub mod wire;

pub use config::Config;
pub use server::{run, Server};
