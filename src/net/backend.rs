//! Backend connections: opens a WebSocket to a backend of the chosen route (round-robin,
//! skipping backends that fail or are ejected), carrying the subprotocol, the device identity
//! headers, the forwarding headers the gateway writes from the address it saw, and the
//! device's headers the route allows. The [`HealthTable`] keeps each backend's passive health
//! (`admission::health`) across reloads. Does not decide the route (`admission::routing`)
//! nor relay frames (`session::relay`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::metrics::Metrics;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;
use tokio_util::either::Either;

use crate::admission::health::{BackendHealth, Change, HealthRules};
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
    /// The device's address as the gateway saw it.
    pub peer: IpAddr,
    /// The session's `traceparent`, and the device's `tracestate` when its trace continues.
    pub traceparent: &'a str,
    pub tracestate: Option<&'a str>,
}

/// `Forwarded` (RFC 7239) for a client address: IPv6 quoted in brackets.
fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// Every backend's passive health, by URL; kept across reloads.
#[derive(Debug)]
pub struct HealthTable {
    epoch: tokio::time::Instant,
    backends: Mutex<HashMap<String, BackendHealth>>,
    metrics: Option<Arc<Metrics>>,
}

impl Default for HealthTable {
    fn default() -> Self {
        Self {
            epoch: tokio::time::Instant::now(),
            backends: Mutex::new(HashMap::new()),
            metrics: None,
        }
    }
}

impl HealthTable {
    /// A table that also counts connects, their latency and ejections in `metrics`.
    pub fn with_metrics(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..Self::default()
        }
    }

    /// One connect attempt for `route`: its time when it succeeded.
    fn observe(&self, route: &str, took: Option<Duration>) {
        let Some(m) = &self.metrics else { return };
        let route = crate::metrics::Route {
            route: route.to_string(),
        };
        match took {
            Some(t) => m
                .backend_connect_ms
                .get_or_create(&route)
                .observe(t.as_secs_f64() * 1000.0),
            None => {
                m.backend_connect_failures.get_or_create(&route).inc();
            }
        }
    }

    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.epoch)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BackendHealth>> {
        self.backends.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `url` may be tried now.
    pub fn available(&self, url: &str) -> bool {
        let now = self.now();
        self.lock().get(url).is_none_or(|h| h.available(now))
    }

    /// Records a connect outcome; logs ejections and recoveries.
    pub fn record(&self, url: &str, ok: bool, rules: &HealthRules) {
        let now = self.now();
        let change = {
            let mut backends = self.lock();
            if ok && !backends.contains_key(url) {
                return;
            }
            let health = backends.entry(url.to_string()).or_default();
            let change = if ok {
                health.succeeded()
            } else {
                health.failed(now, rules)
            };
            if ok {
                backends.remove(url);
            }
            change
        };
        match change {
            Change::None => {}
            Change::Ejected { for_, nth } => {
                if let Some(m) = &self.metrics {
                    m.backend_ejections.inc();
                }
                tracing::warn!(
                    backend = url,
                    ejected_ms = for_.as_millis() as u64,
                    ejections_in_row = nth,
                    "backend ejected from its pool after failed connects"
                )
            }
            Change::Recovered => {
                tracing::info!(backend = url, "backend recovered; back in its pool")
            }
        }
    }

    /// The backends ejected now.
    pub fn ejected(&self) -> Vec<String> {
        let now = self.now();
        let mut out: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, h)| h.is_ejected(now))
            .map(|(u, _)| u.clone())
            .collect();
        out.sort();
        out
    }
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
    #[error("every backend of the route is ejected after failed connects")]
    AllEjected,
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

    /// Tries the route's backends that are not ejected, in round-robin order. Returns the
    /// first that accepts, or every failure when none does (only [`BackendError::AllEjected`]
    /// when none could be tried).
    pub async fn connect_route<'r>(
        &self,
        route: &'r Route,
        identity: &DeviceIdentity<'_>,
        forward_headers: &[(String, Vec<u8>)],
        health: &HealthTable,
        rules: &HealthRules,
        keepalive: Option<Duration>,
    ) -> Result<(BackendSocket, &'r BackendUrl), Vec<BackendError>> {
        let mut errors = Vec::new();
        for backend in route.backend_order() {
            if !health.available(&backend.url) {
                continue;
            }
            let started = tokio::time::Instant::now();
            match self
                .connect(
                    backend,
                    &route.subprotocol,
                    identity,
                    forward_headers,
                    keepalive,
                )
                .await
            {
                Ok(socket) => {
                    health.observe(&route.subprotocol, Some(started.elapsed()));
                    health.record(&backend.url, true, rules);
                    return Ok((socket, backend));
                }
                Err(e) => {
                    tracing::warn!(backend = %backend, error = %e, "backend connection failed, trying the next");
                    health.observe(&route.subprotocol, None);
                    health.record(&backend.url, false, rules);
                    errors.push(e);
                }
            }
        }
        if errors.is_empty() {
            errors.push(BackendError::AllEjected);
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
        keepalive: Option<Duration>,
    ) -> Result<BackendSocket, BackendError> {
        tokio::time::timeout(
            self.connect_timeout,
            self.connect_inner(backend, subprotocol, identity, forward_headers, keepalive),
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
        keepalive: Option<Duration>,
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
        if let Ok(value) = HeaderValue::from_str(identity.traceparent) {
            headers.insert(HeaderName::from_static("traceparent"), value);
        }
        if let Some(Ok(value)) = identity.tracestate.map(HeaderValue::from_str) {
            headers.insert(HeaderName::from_static("tracestate"), value);
        }
        // The gateway's own view of where the device is; the device's claims never pass.
        let forwarding = [
            ("x-forwarded-for", identity.peer.to_string()),
            ("forwarded", forwarded_for(identity.peer)),
        ];
        for (name, value) in forwarding {
            if let Ok(value) = HeaderValue::from_str(&value) {
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
        super::keepalive(&tcp, keepalive);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_health_table_ejects_and_restores_by_url() {
        let table = HealthTable::default();
        let rules = HealthRules {
            eject_after: 2,
            base: Duration::from_secs(1),
            max: Duration::from_secs(4),
        };
        let (a, b) = ("ws://a/", "ws://b/");
        table.record(a, true, &rules);
        table.record(a, false, &rules);
        assert!(table.available(a));
        table.record(a, false, &rules);
        assert!(!table.available(a) && table.available(b));
        assert_eq!(table.ejected(), vec![a.to_string()]);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(table.available(a), "tried again after the backoff");
        table.record(a, true, &rules);
        assert!(table.ejected().is_empty());
        assert_eq!(forwarded_for("10.0.0.1".parse().unwrap()), "for=10.0.0.1");
        assert_eq!(forwarded_for("::1".parse().unwrap()), "for=\"[::1]\"");
    }
}
