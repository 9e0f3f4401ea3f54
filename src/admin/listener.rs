//! The admin listener: plain HTTP on loopback, or HTTPS (`[admin] cert`/`key`) where an
//! operator may present an admin client certificate (`gatehouse-pki admin --name NAME`)
//! instead of the bearer token. Each accepted connection carries an [`AdminPeer`]: its
//! address and who its certificate names, which the authentication layer reads.
//!
//! TLS handshakes run in tasks of their own (bounded by [`HANDSHAKE_TIMEOUT`]), so a client
//! that stalls its handshake never holds up the next one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::admission::identity::{admin_identity, AdminIdentity};
use crate::config::AdminTls;
use crate::net::tls::{load_certs, load_key, provider, TlsError};

/// Longest TLS handshake on the admin listener: 5 s.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Who is on the other end of an admin connection.
#[derive(Debug, Clone)]
pub struct AdminPeer {
    pub addr: SocketAddr,
    /// What its client certificate names; `None` without TLS or without a certificate.
    pub identity: Option<AdminIdentity>,
}

impl Connected<IncomingStream<'_, Plain>> for AdminPeer {
    fn connect_info(stream: IncomingStream<'_, Plain>) -> Self {
        stream.remote_addr().clone()
    }
}

impl Connected<IncomingStream<'_, Tls>> for AdminPeer {
    fn connect_info(stream: IncomingStream<'_, Tls>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Plain HTTP.
pub struct Plain(pub TcpListener);

impl axum::serve::Listener for Plain {
    type Io = TcpStream;
    type Addr = AdminPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((tcp, addr)) => {
                    return (
                        tcp,
                        AdminPeer {
                            addr,
                            identity: None,
                        },
                    )
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(AdminPeer {
            addr: self.0.local_addr()?,
            identity: None,
        })
    }
}

/// HTTPS: connections whose handshake completed, with who their certificate names.
pub struct Tls {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, AdminPeer)>,
}

impl axum::serve::Listener for Tls {
    type Io = TlsStream<TcpStream>;
    type Addr = AdminPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The acceptor stopped (shutdown): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(AdminPeer {
            addr: self.local,
            identity: None,
        })
    }
}

/// The admin listener's rustls configuration: its certificate, and client certificates
/// asked for (not required: the token still works) when `client_ca` is set.
pub fn server_config(tls: &AdminTls) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs("admin.client_ca", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Verifier(format!("admin.client_ca: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(
        load_certs("admin.cert", &tls.cert)?,
        load_key("admin.key", &tls.key)?,
    )?;
    Ok(Arc::new(config))
}

/// Accepts TCP on `listener` and runs each TLS handshake in its own task until `shutdown`.
pub fn tls(listener: TcpListener, config: Arc<ServerConfig>, shutdown: CancellationToken) -> Tls {
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    let (tx, ready) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(ok) => ok,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin API accept failed");
                        continue;
                    }
                },
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(peer = %addr, error = %e, "admin API: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let identity = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|leaf| admin_identity(leaf));
                let _ = tx.send((tls, AdminPeer { addr, identity })).await;
            });
        }
    });
    Tls { local, ready }
}
