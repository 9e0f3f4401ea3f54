//! The blocking client of the admin API, for the CLI and the tests: one generic
//! [`AdminClient::call`] that sends a [`Call`] (method, path, query, JSON body) and decodes the
//! answer into whatever type the caller asks for, or turns the API's one error shape into
//! [`ClientError::Refused`]. Endpoints are not methods here: docs/admin-api.md lists them, and
//! `gatehouse api METHOD PATH` reaches any of them. The server side is `admin`.

use std::sync::Arc;
use std::time::Duration;

use crate::config::AdminToken;

use super::{ErrorBody, CLIENT_TIMEOUT};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("admin API at {0} is not reachable")]
    Unreachable(String),
    #[error("admin API: {0}")]
    Http(String),
    #[error("admin API refused: {status} {code}: {message}")]
    Refused {
        status: u16,
        /// The stable code of the error body (`not-found`, `conflict`, ...).
        code: String,
        message: String,
    },
}

/// The HTTP methods the admin API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Delete,
}

impl std::str::FromStr for Method {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "GET" => Ok(Self::Get),
            "POST" => Ok(Self::Post),
            "DELETE" => Ok(Self::Delete),
            other => Err(ClientError::Http(format!(
                "method {other:?}: the admin API uses GET, POST and DELETE"
            ))),
        }
    }
}

/// One request to the admin API: `Call::post("/v1/devices/lock-1/kick").json(&body)`.
#[derive(Debug, Clone)]
pub struct Call {
    method: Method,
    path: String,
    query: Option<String>,
    body: Option<Result<Vec<u8>, String>>,
}

impl Call {
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            query: None,
            body: None,
        }
    }

    pub fn get(path: impl Into<String>) -> Self {
        Self::new(Method::Get, path)
    }

    pub fn post(path: impl Into<String>) -> Self {
        Self::new(Method::Post, path)
    }

    pub fn delete(path: impl Into<String>) -> Self {
        Self::new(Method::Delete, path)
    }

    /// The query string from a struct's fields (absent options left out), e.g. a
    /// `DeviceQuery` or a session `Filter`.
    pub fn query(mut self, query: &impl serde::Serialize) -> Self {
        match serde_urlencoded::to_string(query) {
            Ok(q) if q.is_empty() => self.query = None,
            Ok(q) => self.query = Some(q),
            Err(e) => self.body = Some(Err(format!("query: {e}"))),
        }
        self
    }

    /// `body` as the JSON request body.
    pub fn json(mut self, body: &impl serde::Serialize) -> Self {
        self.body = Some(serde_json::to_vec(body).map_err(|e| format!("body: {e}")));
        self
    }

    /// A body that is already JSON text (`gatehouse api --data`), checked before it is sent.
    pub fn json_text(mut self, text: &str) -> Self {
        self.body = Some(
            serde_json::from_str::<serde_json::Value>(text)
                .map(|_| text.as_bytes().to_vec())
                .map_err(|e| format!("--data is not JSON: {e}")),
        );
        self
    }

    fn target(&self, base: &str) -> String {
        match &self.query {
            Some(q) if self.path.contains('?') => format!("{base}{}&{q}", self.path),
            Some(q) => format!("{base}{}?{q}", self.path),
            None => format!("{base}{}", self.path),
        }
    }
}

/// Blocking client for the CLI.
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    token: AdminToken,
    agent: ureq::Agent,
}

impl AdminClient {
    pub fn new(addr: std::net::SocketAddr, token: AdminToken) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(CLIENT_TIMEOUT))
            .build()
            .into();
        Self {
            base: format!("http://{addr}"),
            token,
            agent,
        }
    }

    /// A client over HTTPS (an admin listener with `[admin] cert`), trusting the CA bundle in
    /// `ca_pem` for the listener's certificate, which must name `addr`'s IP address.
    pub fn https(
        addr: std::net::SocketAddr,
        token: AdminToken,
        ca_pem: &std::path::Path,
    ) -> Result<Self, ClientError> {
        use rustls_pki_types::pem::PemObject;
        let roots = rustls_pki_types::CertificateDer::pem_file_iter(ca_pem)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ClientError::Http(format!("{}: {e}", ca_pem.display())))?;
        if roots.is_empty() {
            return Err(ClientError::Http(format!(
                "{}: no certificate",
                ca_pem.display()
            )));
        }
        let roots: Vec<ureq::tls::Certificate<'static>> = roots
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(crate::net::tls::provider())
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(CLIENT_TIMEOUT))
            .tls_config(tls)
            .build()
            .into();
        Ok(Self {
            base: format!("https://{addr}"),
            token,
            agent,
        })
    }

    /// The client for the admin listener `config` describes: HTTPS when it has a
    /// certificate (trusting `[admin] ca`, else `tls.client_ca`), plain HTTP otherwise.
    pub fn for_config(config: &crate::config::Config) -> Option<Result<Self, ClientError>> {
        let admin = config.admin.as_ref()?;
        Some(match &admin.tls {
            None => Ok(Self::new(admin.listen, admin.token.clone())),
            Some(t) => Self::https(
                admin.listen,
                admin.token.clone(),
                t.ca.as_deref().unwrap_or(&config.runtime.tls.client_ca),
            ),
        })
    }

    /// Whether something answers on the admin address (a running gateway).
    pub fn is_up(addr: std::net::SocketAddr) -> bool {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
    }

    /// Sends `call` and decodes its JSON answer as `T`.
    pub fn call<T: serde::de::DeserializeOwned>(&self, call: Call) -> Result<T, ClientError> {
        let text = self.call_text(call)?;
        serde_json::from_str(&text)
            .map_err(|e| ClientError::Http(format!("unexpected answer: {e}")))
    }

    /// Sends `call` and returns its answer as text (`/metrics`, or an answer printed as it
    /// comes). A refusal becomes [`ClientError::Refused`] with the error body's code.
    pub fn call_text(&self, call: Call) -> Result<String, ClientError> {
        let url = call.target(&self.base);
        let auth = format!("Bearer {}", self.token.expose());
        let body = call.body.transpose().map_err(ClientError::Http)?;
        let sent = match (call.method, body) {
            (Method::Get, None) => self.agent.get(url).header("Authorization", auth).call(),
            (Method::Delete, None) => self.agent.delete(url).header("Authorization", auth).call(),
            (Method::Post, None) => self
                .agent
                .post(url)
                .header("Authorization", auth)
                .send_empty(),
            (Method::Post, Some(body)) => self
                .agent
                .post(url)
                .header("Authorization", auth)
                .header("Content-Type", "application/json")
                .send(&body[..]),
            (m, Some(_)) => {
                return Err(ClientError::Http(format!(
                    "{m:?} {}: this method takes no body",
                    call.path
                )))
            }
        };
        let mut resp = sent.map_err(|e| match e {
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed => {
                ClientError::Unreachable(self.base.clone())
            }
            other => ClientError::Http(other.to_string()),
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::Http(format!("reading the answer: {e}")))?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => ClientError::Refused {
                status,
                code: b.code,
                message: b.error,
            },
            Err(_) => ClientError::Refused {
                status,
                code: String::new(),
                message: text.trim().to_string(),
            },
        })
    }
}
