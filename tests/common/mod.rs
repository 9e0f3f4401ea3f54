//! Test harness: a real gateway on 127.0.0.1:0 with certificates minted per test, real backend
//! WebSocket servers the test drives by hand, and a real TLS WebSocket device client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gatehouse::model::Enrollment;
use gatehouse::storage::DeviceStore;
use gatehouse::Server;
use gatehouse_pki::{CertificateAuthority, DeviceCertOptions, IssuedCert, Revocation};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderMap, HeaderValue};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

pub type DeviceSocket = WebSocketStream<TlsStream<TcpStream>>;
/// A device's socket and the gateway's 101 response.
pub type Connected = (
    DeviceSocket,
    tokio_tungstenite::tungstenite::handshake::client::Response,
);

/// Upper bound for any single wait in a test, so a bug fails the test instead of hanging it.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.expect("timed out")
}

/// The code and reason of the close frame a WebSocket receives next (skipping data).
pub async fn close_of<S>(ws: &mut S) -> (u16, String)
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match next_msg(ws).await {
            Message::Close(Some(f)) => return (f.code.into(), f.reason.to_string()),
            Message::Close(None) => panic!("close without a code"),
            _ => continue,
        }
    }
}

/// The next message of a WebSocket, within [`WAIT`].
pub async fn next_msg<S>(ws: &mut S) -> tokio_tungstenite::tungstenite::Message
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures_util::StreamExt;
    within(ws.next())
        .await
        .expect("stream ended")
        .expect("read error")
}

/// Runs the `gatehouse` binary with `args`, the config pointed at this gateway's real admin
/// port (the test config says 127.0.0.1:0). Returns (success, stdout, stderr).
pub async fn gatehouse_cli(gw: &Gateway, args: &[&str]) -> (bool, String, String) {
    let text = std::fs::read_to_string(&gw.config_path).unwrap().replace(
        "listen = \"127.0.0.1:0\"\ntoken_file",
        &format!("listen = \"{}\"\ntoken_file", gw.admin_addr),
    );
    let cli_config = gw.dir.path().join("cli.toml");
    std::fs::write(&cli_config, text).unwrap();
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("{config}", cli_config.to_str().unwrap()))
        .collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Any byte stream a backend connection can run over (plain TCP or TLS).
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A backend WebSocket server. Each accepted connection arrives on `conns` with the headers of
/// its upgrade request, for the test to drive.
pub struct Backend {
    pub addr: SocketAddr,
    pub conns: mpsc::UnboundedReceiver<BackendConn>,
}

pub struct BackendConn {
    pub headers: HeaderMap,
    /// Whether the gateway presented a client certificate (TLS backends only).
    pub client_cert: bool,
    pub ws: WebSocketStream<Box<dyn Io>>,
}

impl Backend {
    pub async fn start() -> Backend {
        Self::start_with(None).await
    }

    /// A `wss://` backend whose TLS acceptor is `tls` (which may require client certificates).
    pub async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Backend {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), tls)
    }

    /// A `ws://` backend on a listener the test bound (e.g. at an address that was dead).
    pub fn start_on(listener: TcpListener) -> Backend {
        Self::serve(listener, None)
    }

    fn serve(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) -> Backend {
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let (io, client_cert): (Box<dyn Io>, bool) = match tls {
                        None => (Box::new(tcp), false),
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let has_cert = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .is_some_and(|c| !c.is_empty());
                            (Box::new(stream), has_cert)
                        }
                    };
                    let mut headers = HeaderMap::new();
                    #[allow(clippy::result_large_err)] // tungstenite's callback signature
                    let cb = |req: &Request, mut resp: Response| {
                        headers = req.headers().clone();
                        if let Some(p) = req.headers().get("sec-websocket-protocol") {
                            let first = p
                                .to_str()
                                .unwrap()
                                .split(',')
                                .next()
                                .unwrap()
                                .trim()
                                .to_string();
                            resp.headers_mut().insert(
                                "sec-websocket-protocol",
                                HeaderValue::from_str(&first).unwrap(),
                            );
                        }
                        Ok(resp)
                    };
                    if let Ok(ws) = tokio_tungstenite::accept_hdr_async(io, cb).await {
                        let _ = tx.send(BackendConn {
                            headers,
                            client_cert,
                            ws,
                        });
                    }
                });
            }
        });
        Backend { addr, conns: rx }
    }

    /// A `wss://` backend requiring a client certificate from `ca`. Returns it and the
    /// `[backend]` config lines (CA bundle, the gateway's client certificate) for the gateway;
    /// the files go to `dir`.
    pub async fn start_tls(ca: &CertificateAuthority, dir: &std::path::Path) -> (Backend, String) {
        let server = ca
            .issue_server(
                &["localhost".into()],
                &["127.0.0.1".parse().unwrap()],
                time::Duration::days(1),
            )
            .unwrap();
        let client = ca
            .issue_client("gatehouse-gateway", time::Duration::days(1))
            .unwrap();
        std::fs::write(dir.join("backend-ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.join("gw-client.pem"), &client.cert_pem).unwrap();
        std::fs::write(dir.join("gw-client.key"), &client.key_pem).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.cert_der().to_vec()))
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            gatehouse::net::tls::provider(),
        )
        .build()
        .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(gatehouse::net::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(server.cert_der.clone())],
                PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let backend =
            Self::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await;
        let lines = format!(
            "ca = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n",
            dir.join("backend-ca.pem"),
            dir.join("gw-client.pem"),
            dir.join("gw-client.key")
        );
        (backend, lines)
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    pub fn wss_url(&self, path: &str) -> String {
        format!("wss://localhost:{}{path}", self.addr.port())
    }

    pub async fn next(&mut self) -> BackendConn {
        within(self.conns.recv())
            .await
            .expect("backend channel closed")
    }
}

/// A backend that accepts TCP connections and never answers: each accepted socket arrives
/// on the channel (and is held open), so a test knows the gateway is waiting on it.
pub async fn black_hole() -> (SocketAddr, mpsc::UnboundedReceiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if tx.send(tcp).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// An address where nothing listens (bound, then released).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

#[derive(Clone)]
pub struct RouteSpec {
    pub subprotocol: &'static str,
    pub kind: &'static str,
    pub device_types: Vec<&'static str>,
    pub backends: Vec<String>,
    /// More keys for this [[route]] (frame rules).
    pub extra: &'static str,
}

pub struct Options {
    pub routes: Vec<RouteSpec>,
    /// Extra lines for an [audit] section; with `Some`, a signing key is made in the test dir.
    pub audit: Option<String>,
    pub stale_crl: &'static str,
    pub session_resumption: bool,
    pub handshake_timeout_ms: u64,
    pub shutdown_grace_ms: u64,
    pub backend_connect_timeout_ms: u64,
    pub max_message_bytes: usize,
    /// More keys for the [backend] section.
    pub extra: String,
    /// Schema directory; the repository's `schemas/` when `None`.
    pub schemas_dir: Option<PathBuf>,
    /// More sections at the end of the file.
    pub tail: String,
    /// More keys for the [server] section.
    pub server_extra: String,
    /// More keys for the [admin] section.
    pub admin_extra: String,
    /// A `[cluster]` section in place of `[registry]` (see `gatehouse_sim::nats::NatsCluster::section`).
    pub cluster: Option<String>,
    /// The CA to issue the server certificate from (several gateways of one fleet share it);
    /// a fresh one when absent.
    pub ca: Option<Arc<CertificateAuthority>>,
    /// The audit signing key (gateways of one cluster share it); a fresh one when absent.
    pub audit_key: Option<Arc<gatehouse_pki::AuditKey>>,
}

impl Options {
    pub fn new(routes: Vec<RouteSpec>) -> Self {
        Self {
            routes,
            audit: None,
            stale_crl: "refuse",
            session_resumption: true,
            handshake_timeout_ms: 5000,
            shutdown_grace_ms: 5000,
            backend_connect_timeout_ms: 2000,
            max_message_bytes: 65536,
            extra: String::new(),
            schemas_dir: None,
            tail: String::new(),
            server_extra: String::new(),
            admin_extra: String::new(),
            cluster: None,
            ca: None,
            audit_key: None,
        }
    }
}

/// A running gateway with its PKI.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub admin_token: String,
    pub config_path: PathBuf,
    pub dir: tempfile::TempDir,
    pub ca: Arc<CertificateAuthority>,
    pub registry: Arc<dyn DeviceStore>,
    pub tls: Arc<gatehouse::net::tls::TlsState>,
    pub deadletters: Arc<dyn gatehouse::storage::DeadLetterStore>,
    /// The runtime snapshot in force (configuration, schemas), swapped on reload.
    pub live: gatehouse::live::LiveHandle,
    pub audit: Option<gatehouse::audit::AuditLog>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    revoked: std::sync::Mutex<Vec<Revocation>>,
}

pub fn device_options() -> DeviceCertOptions {
    DeviceCertOptions::default()
}

/// A test directory with certificates, CRL, admin token and a config file.
pub struct Prepared {
    pub dir: tempfile::TempDir,
    pub ca: Arc<CertificateAuthority>,
    pub config_path: PathBuf,
    pub admin_token: String,
}

/// Writes everything a gateway needs into a fresh directory.
pub fn prepare(options: &Options) -> Prepared {
    let dir = tempfile::tempdir().unwrap();

    let ca = options.ca.clone().unwrap_or_else(|| {
        Arc::new(CertificateAuthority::generate("Test CA", time::Duration::days(30)).unwrap())
    });
    let server = ca
        .issue_server(
            &["localhost".into()],
            &["127.0.0.1".parse().unwrap()],
            time::Duration::days(30),
        )
        .unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), &server.cert_pem).unwrap();
    std::fs::write(dir.path().join("server.key"), &server.key_pem).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let crl = ca
        .crl_pem(
            &[],
            1,
            now - time::Duration::minutes(1),
            now + time::Duration::days(1),
        )
        .unwrap();
    std::fs::write(dir.path().join("crl.pem"), crl).unwrap();
    let token = "test-admin-token-0123456789".to_string();
    std::fs::write(dir.path().join("admin.token"), &token).unwrap();

    let mut routes = String::new();
    for r in &options.routes {
        routes.push_str(&format!(
                "[[route]]\nsubprotocol = {:?}\nkind = {:?}\ndevice_types = {:?}\nbackends = {:?}\n{}\n\n",
                r.subprotocol, r.kind, r.device_types, r.backends, r.extra
            ));
    }
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
handshake_timeout_ms = {hs}
close_timeout_ms = 2000
shutdown_grace_ms = {grace}
{server_extra}

[tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"
crl = ["crl.pem"]
stale_crl = "{stale}"
session_resumption = {resume}
crl_refresh_ms = 3600000

{stores}

[admin]
listen = "127.0.0.1:0"
token_file = "admin.token"
{admin_extra}

[websocket]
max_message_bytes = {max_msg}
max_frame_bytes = {max_msg}

[schemas]
dir = {schemas:?}

[backend]
connect_timeout_ms = {connect}
{extra}
{routes}
{tail}"#,
        hs = options.handshake_timeout_ms,
        grace = options.shutdown_grace_ms,
        connect = options.backend_connect_timeout_ms,
        stale = options.stale_crl,
        resume = options.session_resumption,
        max_msg = options.max_message_bytes,
        extra = options.extra,
        schemas = options
            .schemas_dir
            .clone()
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")),
        tail = options.tail,
        server_extra = options.server_extra,
        admin_extra = options.admin_extra,
        stores = options
            .cluster
            .clone()
            .unwrap_or_else(|| "[registry]\npath = \"registry\"\n".into()),
    );
    let mut text = text;
    if let Some(extra) = &options.audit {
        let key = options
            .audit_key
            .clone()
            .unwrap_or_else(|| Arc::new(gatehouse_pki::AuditKey::generate().unwrap()));
        std::fs::write(dir.path().join("audit.key"), &key.private_pem).unwrap();
        std::fs::write(dir.path().join("audit.pub"), key.public_line()).unwrap();
        text.push_str(&format!(
                "\n[audit]\ndir = \"audit\"\nsigning_key = \"audit.key\"\npublic_key = \"audit.pub\"\n{extra}\n"
            ));
    }
    let config_path = dir.path().join("gatehouse.toml");
    std::fs::write(&config_path, text).unwrap();
    Prepared {
        dir,
        ca,
        config_path,
        admin_token: token,
    }
}

impl Gateway {
    pub async fn start(options: Options) -> Gateway {
        let Prepared {
            dir,
            ca,
            config_path,
            admin_token: token,
        } = prepare(&options);
        let config = gatehouse::Config::load(&config_path).unwrap();

        let shutdown = CancellationToken::new();
        let server = Server::new(config, shutdown.clone()).await.unwrap();
        let registry = server.registry();
        let tls = server.tls();
        let deadletters = server.deadletters();
        let live = server.live();
        let audit = server.audit();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let task = tokio::spawn(async move {
            server.serve(listener, Some(admin)).await.unwrap();
        });
        Gateway {
            addr,
            admin_addr,
            admin_token: token,
            config_path,
            dir,
            ca,
            registry,
            tls,
            deadletters,
            live,
            audit,
            shutdown,
            task,
            revoked: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Issues a device certificate without enrolling it.
    pub fn issue(&self, id: &str) -> IssuedCert {
        self.ca.issue_device(id, &device_options()).unwrap()
    }

    /// Issues and enrolls a device.
    pub fn enroll(&self, id: &str, device_type: &str) -> IssuedCert {
        let cert = self.issue(id);
        self.registry
            .enroll(Enrollment {
                id: id.into(),
                device_type: device_type.into(),
                sha256: cert.fingerprint_hex(),
                labels: Default::default(),
            })
            .unwrap();
        cert
    }

    /// Adds the certificate to the CRL file and reloads TLS.
    pub fn revoke_in_crl(&self, cert: &IssuedCert) {
        let now = time::OffsetDateTime::now_utc();
        let mut revoked = self.revoked.lock().unwrap();
        revoked.push(Revocation {
            serial: cert.serial.clone(),
            revoked_at: now - time::Duration::seconds(1),
        });
        let crl = self
            .ca
            .crl_pem(
                &revoked,
                revoked.len() as u64 + 1,
                now - time::Duration::minutes(1),
                now + time::Duration::days(1),
            )
            .unwrap();
        std::fs::write(self.dir.path().join("crl.pem"), crl).unwrap();
        self.tls.reload().unwrap();
    }

    pub fn client_config(&self, cert: Option<&IssuedCert>) -> Arc<ClientConfig> {
        client_config(self.ca.cert_pem(), cert)
    }

    /// Connects a device with a fresh TLS client config.
    pub async fn connect(
        &self,
        cert: Option<&IssuedCert>,
        protocols: &[&str],
    ) -> Result<Connected, ConnectError> {
        connect(self.addr, self.client_config(cert), protocols, &[]).await
    }

    /// Connects until the gateway admits the device (each refusal comes at once while a
    /// budget, an ejection or a slot is in the way), within [`WAIT`].
    pub async fn connect_eventually(&self, cert: &IssuedCert, protocols: &[&str]) -> Connected {
        within(async {
            loop {
                if let Ok(conn) = self.connect(Some(cert), protocols).await {
                    return conn;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
    }

    /// Waits until the dead-letter writer has stored `n` frames in all.
    pub async fn dead_letters_stored(&self, n: u64) {
        let mut rx = self.deadletters.stored();
        within(rx.wait_for(|stored| *stored >= n)).await.unwrap();
    }

    pub fn admin_client(&self) -> gatehouse::admin::AdminClient {
        gatehouse::admin::AdminClient::new(
            self.admin_addr,
            gatehouse::config::AdminToken::new(&self.admin_token).unwrap(),
        )
    }

    /// One admin API call, decoded as `T` (off the runtime: the client blocks).
    pub async fn api<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        call: gatehouse::admin::Call,
    ) -> Result<T, gatehouse::admin::ClientError> {
        let client = self.admin_client();
        tokio::task::spawn_blocking(move || client.call(call))
            .await
            .unwrap()
    }

    /// One admin API call, its answer as text.
    pub async fn api_text(
        &self,
        call: gatehouse::admin::Call,
    ) -> Result<String, gatehouse::admin::ClientError> {
        let client = self.admin_client();
        tokio::task::spawn_blocking(move || client.call_text(call))
            .await
            .unwrap()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        within(self.task).await.unwrap();
    }
}

pub fn client_config(ca_pem: &str, cert: Option<&IssuedCert>) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = ClientConfig::builder_with_provider(gatehouse::net::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        Some(c) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(c.cert_der.clone())],
                PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

#[derive(Debug)]
pub enum ConnectError {
    /// The gateway answered the upgrade with an HTTP status.
    Http {
        status: u16,
        body: String,
        refusal: Option<String>,
    },
    /// TLS or transport failure (alerts show up here).
    Transport(String),
}

impl ConnectError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ConnectError::Http { status, .. } => Some(*status),
            ConnectError::Transport(_) => None,
        }
    }
}

/// Asserts that a connection attempt was answered with HTTP `status` and refusal `code`.
pub fn assert_refused(result: Result<Connected, ConnectError>, status: u16, code: &str) {
    match result {
        Err(ConnectError::Http {
            status: got,
            refusal,
            ..
        }) => {
            assert_eq!(got, status);
            assert_eq!(refusal.as_deref(), Some(code));
        }
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

pub async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    protocols: &[&str],
    extra_headers: &[(&str, &str)],
) -> Result<Connected, ConnectError> {
    let tls = connect_tls(addr, config).await?;
    upgrade(tls, addr, protocols, extra_headers).await
}

/// Connects from the local address `source` (e.g. 127.0.0.2: every 127/8 address works on
/// loopback), then TLS and the upgrade.
pub async fn connect_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    protocols: &[&str],
) -> Result<Connected, ConnectError> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let tcp = socket
        .connect(addr)
        .await
        .map_err(|e| ConnectError::Transport(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| ConnectError::Transport(e.to_string()))?;
    upgrade(tls, addr, protocols, &[]).await
}

/// Connects as a PROXY protocol v2 balancer would: the header naming `device` first, then
/// the device's TLS and upgrade through the same connection.
pub async fn connect_proxied(
    device: SocketAddr,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    protocols: &[&str],
) -> Result<Connected, ConnectError> {
    use tokio::io::AsyncWriteExt;
    let mut tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| ConnectError::Transport(e.to_string()))?;
    tcp.write_all(&gatehouse::admission::proxy::encode(device, addr))
        .await
        .map_err(|e| ConnectError::Transport(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| ConnectError::Transport(e.to_string()))?;
    upgrade(tls, addr, protocols, &[]).await
}

/// Whether the gateway closes a fresh TCP connection from `source` at once (before any TLS):
/// it reads end of stream (or a reset) without having sent anything.
pub async fn closed_at_accept(source: std::net::IpAddr, addr: SocketAddr) -> bool {
    use tokio::io::AsyncReadExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let Ok(mut tcp) = socket.connect(addr).await else {
        return true;
    };
    let mut buf = [0u8; 1];
    matches!(
        // Closed at accept means at once; an admitted connection waits for its ClientHello.
        tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// TLS only, so a test can look at the session before the upgrade.
pub async fn connect_tls(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<TlsStream<TcpStream>, ConnectError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| ConnectError::Transport(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| ConnectError::Transport(e.to_string()))
}

pub async fn upgrade(
    tls: TlsStream<TcpStream>,
    addr: SocketAddr,
    protocols: &[&str],
    extra_headers: &[(&str, &str)],
) -> Result<Connected, ConnectError> {
    let mut request = format!("wss://localhost:{}/", addr.port())
        .into_client_request()
        .unwrap();
    if !protocols.is_empty() {
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&protocols.join(", ")).unwrap(),
        );
    }
    for (k, v) in extra_headers {
        let name =
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        request
            .headers_mut()
            .append(name, HeaderValue::from_str(v).unwrap());
    }
    tokio_tungstenite::client_async(request, tls)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(resp) => ConnectError::Http {
                status: resp.status().as_u16(),
                refusal: resp
                    .headers()
                    .get("x-gatehouse-refusal")
                    .map(|v| v.to_str().unwrap().to_string()),
                body: resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            },
            other => ConnectError::Transport(other.to_string()),
        })
}

pub fn telemetry_route(backends: Vec<String>) -> RouteSpec {
    RouteSpec {
        subprotocol: "telemetry.v1",
        kind: "telemetry",
        device_types: vec!["env-sensor", "door-lock"],
        backends,
        extra: "",
    }
}

pub fn control_route(backends: Vec<String>) -> RouteSpec {
    RouteSpec {
        subprotocol: "control.v1",
        kind: "control",
        device_types: vec!["door-lock"],
        backends,
        extra: "",
    }
}

/// A valid env-sensor reading (JSON).
pub fn reading(seq: u64) -> String {
    format!(
        r#"{{"type":"reading","seq":{seq},"ts":1764000000000,"temperature_c":21.5,"humidity_pct":40.0}}"#
    )
}

/// A schema directory whose schemas accept anything (for tests about the relay itself).
pub fn permissive_schemas(dir: &std::path::Path) -> PathBuf {
    for (t, kinds) in [
        ("env-sensor", vec!["telemetry"]),
        ("door-lock", vec!["telemetry", "command"]),
    ] {
        std::fs::create_dir_all(dir.join(t)).unwrap();
        for k in kinds {
            std::fs::write(dir.join(t).join(format!("{k}.schema.json")), "{}").unwrap();
        }
    }
    dir.to_path_buf()
}
