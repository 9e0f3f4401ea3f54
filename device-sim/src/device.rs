//! One simulated device's connection: its own client certificate, a TLS WebSocket to the
//! gateway, and a classification of every way the gateway can refuse it.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::WebSocketStream;

pub type DeviceSocket = WebSocketStream<Stream>;

/// A device's transport: TLS with its certificate (`wss://`, every gateway and proxy), or
/// plain TCP (`ws://`, only for measuring the direct path to a backend without a proxy).
pub enum Stream {
    Tls(Box<TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Where and how devices connect.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub server_name: ServerName<'static>,
    pub url: String,
    /// `wss://` (the default for everything but a direct backend baseline).
    pub tls: bool,
}

impl Target {
    /// Parses `wss://HOST:PORT/PATH` (or `ws://`, without TLS: for measuring the direct path
    /// to a backend); HOST must resolve (an IP or `localhost`).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: tokio_tungstenite::tungstenite::http::Uri = url.parse()?;
        let tls = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => {
                anyhow::bail!("gateway URL must start with wss:// (or ws:// for a direct backend)")
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| anyhow::anyhow!("gateway URL has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let ip: IpAddr = if host == "localhost" {
            IpAddr::from([127, 0, 0, 1])
        } else {
            host.parse().map_err(|_| {
                anyhow::anyhow!("gateway host {host:?} must be an IP address or localhost")
            })?
        };
        Ok(Self {
            addr: SocketAddr::new(ip, port),
            server_name: ServerName::try_from(host)?,
            url: url.to_string(),
            tls,
        })
    }
}

/// Loads a CA bundle for verifying the gateway.
pub fn roots(ca_pem: &Path) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem)? {
        roots.add(cert?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "{}: no certificate", ca_pem.display());
    Ok(Arc::new(roots))
}

/// A TLS client config presenting this device's certificate.
pub fn client_config(
    roots: Arc<RootCertStore>,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> anyhow::Result<Arc<ClientConfig>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)?;
    let config = ClientConfig::builder_with_provider(gatehouse::net::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// Why a connection attempt did not produce a session.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refused {
    /// The gateway answered with an HTTP status (and its `x-gatehouse-refusal` code).
    Http {
        status: u16,
        code: String,
        /// The response's `Retry-After`, in delta-seconds.
        retry_after: Option<Duration>,
    },
    /// The TLS handshake failed (the alert or error).
    Tls(String),
    /// TCP or other transport failure.
    Transport(String),
    Timeout,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Http { status, code, .. } => write!(f, "HTTP {status} {code}"),
            Refused::Tls(e) => write!(f, "TLS {e}"),
            Refused::Transport(e) => write!(f, "transport: {e}"),
            Refused::Timeout => f.write_str("timeout"),
        }
    }
}

impl Refused {
    /// How long the gateway asked the device to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Refused::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn classify_io(e: &std::io::Error) -> Refused {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return Refused::Tls(match tls {
            rustls::Error::AlertReceived(alert) => format!("alert {alert:?}"),
            other => other.to_string(),
        });
    }
    Refused::Transport(e.kind().to_string())
}

/// The code and reason of the next close frame on `ws` (data frames skipped), if one comes
/// within `within`.
pub async fn next_close(ws: &mut DeviceSocket, within: Duration) -> Option<(u16, String)> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    tokio::time::timeout(within, async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Close(frame) = msg {
                return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Connects one device: TCP (from `source`, if given), TLS, WebSocket upgrade offering
/// `protocols`. Returns the socket and the subprotocol the gateway chose.
pub async fn connect(
    target: &Target,
    config: Arc<ClientConfig>,
    protocols: &str,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<(DeviceSocket, String), Refused> {
    let attempt = async {
        let socket = if target.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| classify_io(&e))?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| classify_io(&e))?;
        }
        let tcp = socket
            .connect(target.addr)
            .await
            .map_err(|e| classify_io(&e))?;
        let _ = tcp.set_nodelay(true);
        let stream = if target.tls {
            Stream::Tls(Box::new(
                tokio_rustls::TlsConnector::from(config)
                    .connect(target.server_name.clone(), tcp)
                    .await
                    .map_err(|e| classify_io(&e))?,
            ))
        } else {
            Stream::Plain(tcp)
        };
        let mut request = target
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| Refused::Transport(e.to_string()))?;
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(protocols).map_err(|e| Refused::Transport(e.to_string()))?,
        );
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_message_size(Some(1 << 20))
            .max_frame_size(Some(1 << 20));
        match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
            Ok((ws, resp)) => {
                let proto = resp
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                Ok((ws, proto))
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(Refused::Http {
                status: resp.status().as_u16(),
                code: resp
                    .headers()
                    .get("x-gatehouse-refusal")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string(),
                retry_after: resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(crate::fleet::backoff::parse_retry_after),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Io(e)) => Err(classify_io(&e)),
            Err(e) => Err(Refused::Transport(e.to_string())),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(Refused::Timeout))
}
