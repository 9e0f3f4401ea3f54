//! The runtime snapshot: what may change while the gateway runs (the runtime configuration,
//! the compiled schemas, the backend connector built from it), one value behind an
//! `ArcSwap`. Sessions read it at defined points: the handshake takes one snapshot for its
//! whole length (routes, timeouts, limits, connector), and every frame is validated against
//! the schemas of the snapshot in force. A reload builds a complete new snapshot and swaps it
//! in; on any error the old one stays. TLS material has its own swap in `net::tls` (the CRL
//! refresher changes it on its own); a configuration reload swaps both.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::RuntimeConfig;
use crate::net::backend::Connector;
use crate::net::tls::TlsError;
use crate::schema::SchemaSet;

/// One consistent set of what may change while running.
pub struct Live {
    pub config: RuntimeConfig,
    pub schemas: Arc<SchemaSet>,
    pub connector: Connector,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("routes", &self.config.routes.iter().count())
            .field("schemas", &self.schemas)
            .finish_non_exhaustive()
    }
}

/// The swappable snapshot sessions, the admin API and reloads share.
pub type LiveHandle = Arc<ArcSwap<Live>>;

impl Live {
    /// A snapshot of `config` with `schemas`: builds the backend connector (its TLS client
    /// configuration is read from the files `config.backend` names).
    pub fn build(config: RuntimeConfig, schemas: SchemaSet) -> Result<Self, TlsError> {
        let backend_tls = crate::net::tls::backend_client_config(&config.backend)?;
        let connector = Connector::new(
            backend_tls,
            config.backend.connect_timeout,
            crate::net::websocket_config(&config.websocket),
        );
        Ok(Self {
            config,
            schemas: Arc::new(schemas),
            connector,
        })
    }

    /// The same snapshot with other schemas.
    pub fn with_schemas(&self, schemas: Arc<SchemaSet>) -> Self {
        Self {
            config: self.config.clone(),
            schemas,
            connector: self.connector.clone(),
        }
    }
}
