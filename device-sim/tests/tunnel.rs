//! The conformance run's plumbing: the tunnel presents the device's certificate over TLS for a
//! plain client, and the echo backend sends every message back unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gatehouse_pki::{CertificateAuthority, DeviceCertOptions};
use gatehouse_sim::backends::{self, BackendStats, Kind};
use gatehouse_sim::device::{self, Target};
use gatehouse_sim::tunnel;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("timed out")
}

#[tokio::test]
async fn the_tunnel_carries_a_plain_connection_over_tls_with_the_device_certificate() {
    let ca = CertificateAuthority::generate("tunnel test CA", time::Duration::days(1)).unwrap();
    let server = ca
        .issue_server(&["localhost".to_string()], &[], time::Duration::days(1))
        .unwrap();
    let dev = ca
        .issue_device("cam-1", &DeviceCertOptions::default())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();

    // A TLS server that requires a client certificate from the CA and echoes bytes.
    let roots = device::roots(&ca_path).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        gatehouse::net::tls::provider(),
    )
    .build()
    .unwrap();
    let server_config =
        rustls::ServerConfig::builder_with_provider(gatehouse::net::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(server.cert_der.to_vec())],
                PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let tls_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = tls_listener.local_addr().unwrap();
    let served = tokio::spawn(async move {
        let (tcp, _) = tls_listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(b"world").await.unwrap();
        tls.shutdown().await.unwrap();
        (presented, buf)
    });

    let config =
        device::client_config(roots, dev.cert_pem.as_bytes(), dev.key_pem.as_bytes()).unwrap();
    let target = Target::parse(&format!("wss://localhost:{}/", tls_addr.port())).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tunnel_addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let tunnel = tokio::spawn(tunnel::serve(listener, target, config, stop.clone()));

    let mut plain = TcpStream::connect(tunnel_addr).await.unwrap();
    plain.write_all(b"hello").await.unwrap();
    let mut answer = Vec::new();
    within(plain.read_to_end(&mut answer)).await.unwrap();
    assert_eq!(answer, b"world");
    let (presented, got) = within(served).await.unwrap();
    assert_eq!(&got, b"hello");
    assert_eq!(
        presented, dev.cert_der,
        "the device's certificate was presented"
    );
    stop.cancel();
    within(tunnel).await.unwrap();
}

#[tokio::test]
async fn the_echo_backend_sends_every_message_back_unchanged() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(BackendStats::default());
    let stop = CancellationToken::new();
    let served = tokio::spawn(backends::serve(
        listener,
        Kind::Echo {
            max_message_bytes: 4 << 20,
        },
        stats.clone(),
        stop.clone(),
    ));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
        .await
        .unwrap();
    let big = vec![7u8; 2 << 20];
    for msg in [
        Message::text("not json at all"),
        Message::binary(vec![0xff, 0x00, 0xfe]),
        Message::binary(big),
    ] {
        ws.send(msg.clone()).await.unwrap();
        assert_eq!(within(ws.next()).await.unwrap().unwrap(), msg);
    }
    stop.cancel();
    within(served).await.unwrap();
}
