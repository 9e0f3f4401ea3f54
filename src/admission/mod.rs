//! Admission, pure: what the device's verified certificate says and what the CRLs say about
//! it ([`identity`]), the HTTP upgrade request ([`upgrade`]), which route its subprotocols
//! and type lead to ([`routing`]), and the one decision that combines them ([`decide`]).
//! Reading bytes off the socket and answering are `session::handshake`'s job; mapping a
//! refusal to an HTTP answer is `wire`'s.

pub mod cidr;
pub mod decide;
pub mod health;
pub mod identity;
pub mod proxy;
pub mod routing;
pub mod sources;
pub mod trace;
pub mod upgrade;

pub use decide::{admit, Admission, Admitted};
