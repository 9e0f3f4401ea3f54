//! Gatehouse: an mTLS WebSocket gateway for device fleets.
//!
//! # Layout
//! - [`config`]: the TOML file layer and the validated `Config`; every default and limit.
//! - [`identity`]: pure: what a verified device certificate says, CRL serial index, admission
//!   verdicts on certificate and registry record.
//! - [`registry`]: the sled device registry (id, type, status, certificate fingerprints) with
//!   its in-memory lookup index.
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
pub mod backend;
pub mod config;
pub mod error;
pub mod identity;
pub mod registry;
pub mod relay;
pub mod routing;
pub mod server;
pub mod session;
pub mod tls;
pub mod upgrade;

pub use config::Config;
pub use server::{run, Server};
