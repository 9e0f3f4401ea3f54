//! The blocking client of the admin API, for the CLI: one request helper, one method per
//! endpoint. The server side is `admin`.

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

    pub fn health(&self) -> Result<Health, ClientError> {
        let r = self
            .agent
            .get(format!("{}/v1/health", self.base))
            .header("Authorization", self.auth())
            .call();
        self.finish(r)
    }

    pub fn list(&self) -> Result<Vec<Device>, ClientError> {
        let r = self
            .agent
            .get(format!("{}/v1/devices", self.base))
            .header("Authorization", self.auth())
            .call();
        self.finish(r)
    }

    pub fn show(&self, id: &str) -> Result<Device, ClientError> {
        let r = self
            .agent
            .get(format!("{}/v1/devices/{id}", self.base))
            .header("Authorization", self.auth())
            .call();
        self.finish(r)
    }

    pub fn enroll(&self, devices: Vec<Enrollment>) -> Result<Vec<Device>, ClientError> {
        let r = self
            .agent
            .post(format!("{}/v1/devices", self.base))
            .header("Authorization", self.auth())
            .send_json(&EnrollRequest { devices });
        self.finish(r)
    }

    pub fn set_status(&self, id: &str, status: DeviceStatus) -> Result<Device, ClientError> {
        let verb = match status {
            DeviceStatus::Active => "resume",
            DeviceStatus::Suspended => "suspend",
            DeviceStatus::Revoked => "revoke",
        };
        let r = self
            .agent
            .post(format!("{}/v1/devices/{id}/{verb}", self.base))
            .header("Authorization", self.auth())
            .send_empty();
        self.finish(r)
    }

    pub fn deadletters(&self, id: &str) -> Result<Vec<DeadLetter>, ClientError> {
        let r = self
            .agent
            .get(format!("{}/v1/devices/{id}/deadletters", self.base))
            .header("Authorization", self.auth())
            .call();
        self.finish(r)
    }

    pub fn rejections(&self) -> Result<Vec<RejectionCount>, ClientError> {
        let r = self
            .agent
            .get(format!("{}/v1/stats/rejections", self.base))
            .header("Authorization", self.auth())
            .call();
        self.finish(r)
    }

    pub fn audit_verify(&self, device: Option<&str>) -> Result<Vec<AuditVerdict>, ClientError> {
        let mut url = format!("{}/v1/audit/verify", self.base);
        if let Some(d) = device {
            url.push_str(&format!("?device={d}"));
        }
        let r = self
            .agent
            .get(url)
            .header("Authorization", self.auth())
            .call();
        self.finish(r)
    }

    pub fn audit_show(&self, device: &str) -> Result<Vec<crate::audit::Record>, ClientError> {
        let r = self
            .agent
            .get(format!("{}/v1/audit/{device}", self.base))
            .header("Authorization", self.auth())
            .call();
        self.finish(r)
    }

    pub fn reload_schemas(&self) -> Result<Health, ClientError> {
        let r = self
            .agent
            .post(format!("{}/v1/schemas/reload", self.base))
            .header("Authorization", self.auth())
            .send_empty();
        self.finish(r)
    }

    pub fn reload_tls(&self) -> Result<Health, ClientError> {
        let r = self
            .agent
            .post(format!("{}/v1/tls/reload", self.base))
            .header("Authorization", self.auth())
            .send_empty();
        self.finish(r)
    }
}
