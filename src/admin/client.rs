//! The blocking client of the admin API, for the CLI: one request helper, one method per
//! endpoint. The server side is `admin`.

use std::sync::Arc;
use std::time::Duration;

use crate::config::AdminToken;

use super::{AuditVerdict, EnrollRequest, ErrorBody, Health, CLIENT_TIMEOUT};
use crate::model::{Device, DeviceStatus, Enrollment};
use crate::policy::rejections::RejectionCount;
use crate::storage::DeadLetter;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("admin API at {0} is not reachable")]
    Unreachable(String),
    #[error("admin API: {0}")]
    Http(String),
    #[error("admin API refused: {status}: {message}")]
    Refused { status: u16, message: String },
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

    fn finish<T: serde::de::DeserializeOwned>(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut resp = result.map_err(|e| match e {
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed => {
                ClientError::Unreachable(self.base.clone())
            }
            other => ClientError::Http(other.to_string()),
        })?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            resp.body_mut()
                .read_json::<T>()
                .map_err(|e| ClientError::Http(format!("unexpected answer: {e}")))
        } else {
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or(text);
            Err(ClientError::Refused { status, message })
        }
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token.expose())
    }

    /// `GET path` and the JSON answer.
    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", self.auth())
            .call();
        self.finish(r)
    }

    /// `POST path` with `body` as JSON (or nothing) and the JSON answer.
    fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T, ClientError> {
        let request = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", self.auth());
        let r = match body {
            Some(b) => request.send_json(b),
            None => request.send_empty(),
        };
        self.finish(r)
    }

    /// `GET /metrics`: the Prometheus text.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let r = self
            .agent
            .get(format!("{}/metrics", self.base))
            .header("Authorization", self.auth())
            .call();
        let mut resp = r.map_err(|e| match e {
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed => {
                ClientError::Unreachable(self.base.clone())
            }
            other => ClientError::Http(other.to_string()),
        })?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        if (200..300).contains(&status) {
            Ok(text)
        } else {
            Err(ClientError::Refused {
                status,
                message: text,
            })
        }
    }

    pub fn health(&self) -> Result<Health, ClientError> {
        self.get("/v1/health")
    }

    /// One page of the devices `query` selects.
    pub fn list_page(
        &self,
        query: &crate::model::DeviceQuery,
    ) -> Result<crate::model::DevicePage, ClientError> {
        let mut params: Vec<(&str, String)> = Vec::new();
        if let Some(t) = &query.device_type {
            params.push(("type", t.clone()));
        }
        if let Some(s) = query.status {
            params.push(("status", s.as_str().to_string()));
        }
        if let Some(l) = &query.label {
            params.push(("label", l.clone()));
        }
        if let Some(a) = &query.after {
            params.push(("after", a.clone()));
        }
        if let Some(n) = query.limit {
            params.push(("limit", n.to_string()));
        }
        let r = self
            .agent
            .get(format!("{}/v1/devices", self.base))
            .query_pairs(params.iter().map(|(k, v)| (*k, v.as_str())))
            .header("Authorization", self.auth())
            .call();
        self.finish(r)
    }

    /// Every device `query` selects, page after page.
    pub fn list(&self, query: &crate::model::DeviceQuery) -> Result<Vec<Device>, ClientError> {
        let mut query = query.clone();
        let mut all = Vec::new();
        loop {
            let page = self.list_page(&query)?;
            all.extend(page.devices);
            match page.next_after {
                Some(next) => query.after = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// The device's record and its live sessions.
    pub fn show(&self, id: &str) -> Result<super::DeviceView, ClientError> {
        self.get(&format!("/v1/devices/{id}"))
    }

    pub fn enroll(&self, devices: Vec<Enrollment>) -> Result<Vec<Device>, ClientError> {
        self.post("/v1/devices", Some(&EnrollRequest { devices }))
    }

    pub fn set_status(&self, id: &str, status: DeviceStatus) -> Result<Device, ClientError> {
        let verb = match status {
            DeviceStatus::Active => "resume",
            DeviceStatus::Suspended => "suspend",
            DeviceStatus::Revoked => "revoke",
        };
        self.post(&format!("/v1/devices/{id}/{verb}"), None::<&()>)
    }

    /// Live sessions that `filter` selects (device ids, types and routes are tokens: no
    /// escaping needed).
    pub fn sessions(
        &self,
        filter: &crate::session::table::Filter,
    ) -> Result<Vec<crate::session::table::LiveSession>, ClientError> {
        let query: Vec<String> = [
            ("device", &filter.device),
            ("type", &filter.device_type),
            ("route", &filter.route),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
        if query.is_empty() {
            self.get("/v1/sessions")
        } else {
            self.get(&format!("/v1/sessions?{}", query.join("&")))
        }
    }

    /// Removes one certificate from a device.
    pub fn remove_certificate(&self, id: &str, sha256: &str) -> Result<Device, ClientError> {
        let r = self
            .agent
            .delete(format!(
                "{}/v1/devices/{id}/certificates/{sha256}",
                self.base
            ))
            .header("Authorization", self.auth())
            .call();
        self.finish(r)
    }

    /// Ends the device's sessions (or one connection of it) with `reason`.
    pub fn kick(
        &self,
        id: &str,
        reason: &str,
        connection: Option<&str>,
    ) -> Result<super::Ended, ClientError> {
        self.post(
            &format!("/v1/devices/{id}/kick"),
            Some(&super::KickRequest {
                reason: reason.to_string(),
                connection: connection.map(str::to_string),
            }),
        )
    }

    /// Starts draining the gateway.
    pub fn drain(&self, grace_ms: Option<u64>) -> Result<super::DrainReport, ClientError> {
        self.post("/v1/drain", Some(&super::DrainRequest { grace_ms }))
    }

    pub fn deadletters(&self, id: &str) -> Result<Vec<DeadLetter>, ClientError> {
        self.get(&format!("/v1/devices/{id}/deadletters"))
    }

    pub fn rejections(&self) -> Result<Vec<RejectionCount>, ClientError> {
        self.get("/v1/stats/rejections")
    }

    /// Limit and budget hits per (device type, route, limit); budgets at accept have type
    /// and route `-`.
    pub fn limit_hits(&self) -> Result<Vec<RejectionCount>, ClientError> {
        self.get("/v1/stats/limits")
    }

    pub fn audit_verify(&self, device: Option<&str>) -> Result<Vec<AuditVerdict>, ClientError> {
        match device {
            Some(d) => self.get(&format!("/v1/audit/verify?device={d}")),
            None => self.get("/v1/audit/verify"),
        }
    }

    pub fn audit_show(&self, device: &str) -> Result<Vec<crate::audit::Record>, ClientError> {
        self.get(&format!("/v1/audit/{device}"))
    }

    pub fn reload_schemas(&self) -> Result<Health, ClientError> {
        self.post("/v1/schemas/reload", None::<&()>)
    }

    /// Reloads the whole runtime configuration (like SIGHUP).
    pub fn reload(&self) -> Result<super::ReloadReport, ClientError> {
        self.post("/v1/reload", None::<&()>)
    }

    pub fn reload_tls(&self) -> Result<Health, ClientError> {
        self.post("/v1/tls/reload", None::<&()>)
    }
}
