//! Gatehouse: an mTLS WebSocket gateway for device fleets.
//!
//! # Layout
//! - [`config`]: the TOML file layer and the validated `Config`; every default and limit.
//! - [`identity`]: pure: what a verified device certificate says, CRL serial index, admission
//!   verdicts on certificate and registry record.
//! - [`registry`]: the sled device registry (id, type, status, certificate fingerprints) with
//!   its in-memory lookup index.
//! - [`frames`]: pure: strict JSON and CBOR decoding into the JSON data model; error frames.
//! - [`schema`]: per-device-type JSON Schemas, compiled once, reloadable as a whole.
//! - [`policy`]: pure: which schema a frame needs, decode plus validate, invalid-frame limit.
//! - [`rejections`]: counters per (type, route, reason) and the rejection log limiter.
//! - [`deadletter`]: the bounded per-device store of rejected frames (sled) and its writer.
//! - [`routing`]: pure: subprotocol routes, device-type policy, round-robin backend order.
//! - [`upgrade`]: pure: parse and validate the HTTP upgrade request, write the 101.
//! - [`error`]: the one mapping of refusals to HTTP statuses and session ends to close codes.
//! - [`tls`]: rustls server config (client certs, CRLs, resumption), reload; backend client TLS.
//! - [`backend`]: opens the backend WebSocket with the identity headers.
//! - [`relay`]: moves frames both ways with bounded buffering and passes close frames through.
//! - [`session`]: one connection from TCP accept to the end-of-session log line.
//! - [`server`]: loads everything, runs the accept loop, CRL refresher, admin API, shutdown.
//! - [`admin`]: the loopback admin API (axum) and its blocking client for the CLI.

pub mod admin;
pub mod audit;
pub mod auditlog;
pub mod backend;
pub mod command;
pub mod config;
pub mod deadletter;
pub mod error;
pub mod frames;
pub mod identity;
pub mod policy;
pub mod registry;
pub mod rejections;
pub mod relay;
pub mod routing;
pub mod schema;
pub mod server;
pub mod session;
pub mod tls;
pub mod upgrade;

pub use config::Config;
pub use server::{run, Server};
