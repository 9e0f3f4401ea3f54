//! A TLS tunnel with one device's identity: accepts plain TCP and carries each connection to
//! the gateway over TLS, presenting the device's certificate. It lets a WebSocket client that
//! cannot present a client certificate (the Autobahn|Testsuite fuzzing client, a browser
//! tool, `websocat`) speak to the gateway as that device: the client sends `ws://` to the
//! tunnel and the gateway sees `wss://` from the device.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::device::Target;

/// How long one connection may take to reach the gateway and finish its TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `shutdown`; each accepted connection gets its own TLS connection to `target`.
pub async fn serve(
    listener: TcpListener,
    target: Target,
    config: Arc<ClientConfig>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let (plain, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(ok) => ok,
                Err(e) => {
                    tracing::warn!(error = %e, "tunnel accept failed");
                    continue;
                }
            },
        };
        let (target, config, shutdown) = (target.clone(), config.clone(), shutdown.clone());
        tracker.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = carry(plain, &target, config) => if let Err(e) = r {
                    tracing::warn!(%peer, error = %e, "tunnel connection ended with an error");
                },
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn carry(
    mut plain: TcpStream,
    target: &Target,
    config: Arc<ClientConfig>,
) -> std::io::Result<()> {
    let _ = plain.set_nodelay(true);
    let mut tls = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let tcp = TcpStream::connect(target.addr).await?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(config)
            .connect(target.server_name.clone(), tcp)
            .await
    })
    .await
    .map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "gateway handshake timed out")
    })??;
    tokio::io::copy_bidirectional(&mut plain, &mut tls).await?;
    Ok(())
}
