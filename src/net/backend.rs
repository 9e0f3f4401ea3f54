//! Backend connections: opens a WebSocket to a backend of the chosen route (round-robin,
//! skipping backends that fail), carrying the subprotocol and the device identity headers.
//! Does not decide the route (`admission::routing`) nor relay frames (`session::relay`).

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;
use tokio_util::either::Either;

use crate::admission::routing::{BackendUrl, Route};

pub type BackendStream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;
pub type BackendSocket = WebSocketStream<BackendStream>;

pub const HEADER_DEVICE_ID: &str = "x-gatehouse-device-id";
pub const HEADER_DEVICE_TYPE: &str = "x-gatehouse-device-type";
pub const HEADER_CERT_SHA256: &str = "x-gatehouse-cert-sha256";
pub const HEADER_CONNECTION_ID: &str = "x-gatehouse-connection-id";

/// The identity passed to the backend.
#[derive(Debug, Clone)]
pub struct DeviceIdentity<'a> {
    pub device_id: &'a str,
    pub device_type: &'a str,
    pub cert_sha256: &'a str,
    pub connection_id: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("connect to {0} timed out")]
    Timeout(String),
    #[error("connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url} needs TLS but backend.ca is not configured")]
    NoTls { url: String },
    #[error("{url}: invalid TLS server name")]
    ServerName { url: String },
    #[error("TLS to {url}: {source}")]
    Tls {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("WebSocket upgrade to {url}: {source}")]
    Upgrade {
        url: String,
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
}

/// Opens backend WebSockets.
#[derive(Clone)]
pub struct Connector {
    tls: Option<TlsConnector>,
    connect_timeout: Duration,
    websocket: WebSocketConfig,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl Connector {
    pub fn new(
        tls: Option<Arc<ClientConfig>>,
        connect_timeout: Duration,
        websocket: WebSocketConfig,
    ) -> Self {
        Self {
            tls: tls.map(TlsConnector::from),
            connect_timeout,
            websocket,
        }
    }

    /// Tries the route's backends in round-robin order. Returns the first that accepts, or
    /// every failure when none does.
    pub async fn connect_route<'r>(
        &self,
        route: &'r Route,
        identity: &DeviceIdentity<'_>,
        forward_headers: &[(String, Vec<u8>)],
    ) -> Result<(BackendSocket, &'r BackendUrl), Vec<BackendError>> {
        let mut errors = Vec::new();
        for backend in route.backend_order() {
            match self
                .connect(backend, &route.subprotocol, identity, forward_headers)
                .await
            {
                Ok(socket) => return Ok((socket, backend)),
                Err(e) => {
                    tracing::warn!(backend = %backend, error = %e, "backend connection failed, trying the next");
                    errors.push(e);
                }
            }
        }
        Err(errors)
    }

    /// Connects to one backend within the connect timeout.
    pub async fn connect(
        &self,
        backend: &BackendUrl,
        subprotocol: &str,
        identity: &DeviceIdentity<'_>,
        forward_headers: &[(String, Vec<u8>)],
    ) -> Result<BackendSocket, BackendError> {
        tokio::time::timeout(
            self.connect_timeout,
            self.connect_inner(backend, subprotocol, identity, forward_headers),
        )
        .await
        .map_err(|_| BackendError::Timeout(backend.url.clone()))?
    }

    async fn connect_inner(
        &self,
        backend: &BackendUrl,
        subprotocol: &str,
        identity: &DeviceIdentity<'_>,
        forward_headers: &[(String, Vec<u8>)],
    ) -> Result<BackendSocket, BackendError> {
        let upgrade_err = |source| BackendError::Upgrade {
            url: backend.url.clone(),
            source: Box::new(source),
        };
        let mut request = backend
            .url
            .as_str()
            .into_client_request()
            .map_err(upgrade_err)?;
        let headers = request.headers_mut();
        for (name, value) in forward_headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                headers.append(name, value);
            }
        }
        let identity_headers = [
            (HEADER_DEVICE_ID, identity.device_id),
            (HEADER_DEVICE_TYPE, identity.device_type),
            (HEADER_CERT_SHA256, identity.cert_sha256),
            (HEADER_CONNECTION_ID, identity.connection_id),
            ("sec-websocket-protocol", subprotocol),
        ];
        for (name, value) in identity_headers {
            // Ids, types and hex are validated tokens; a failure here is a bug, not input.
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }

        let tcp = TcpStream::connect((backend.host.as_str(), backend.port))
            .await
            .map_err(|source| BackendError::Connect {
                url: backend.url.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let stream = if backend.tls {
            let tls = self.tls.as_ref().ok_or_else(|| BackendError::NoTls {
                url: backend.url.clone(),
            })?;
            let name = ServerName::try_from(backend.host.clone()).map_err(|_| {
                BackendError::ServerName {
                    url: backend.url.clone(),
                }
            })?;
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(|source| BackendError::Tls {
                    url: backend.url.clone(),
                    source,
                })?;
            Either::Right(stream)
        } else {
            Either::Left(tcp)
        };
        let (socket, _response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(self.websocket))
                .await
                .map_err(upgrade_err)?;
        Ok(socket)
    }
}
